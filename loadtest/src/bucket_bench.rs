//! `bucket-bench`: the gateway's per-user rate check, `KeyedBuckets`
//! (`governor`'s keyed limiter with this project's bound on keys held and
//! a key borrowed as the gateway holds it) against `governor`'s limiter
//! alone, on the same keys from several threads: the price of the wrapper.
//! Each check is what a call costs the gateway: one key's allowance taken,
//! or refused with a wait.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chat_resilience::bucket::{KeyedBuckets, Rate};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Distinct keys (users) the checks are spread over.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Threads checking at once.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds each limiter is measured for, per case.
    #[arg(long, default_value_t = 3.0)]
    duration_secs: f64,
}

/// One limiter under test.
trait Limiter: Send + Sync {
    /// Whether the call may go.
    fn check(&self, key: &String) -> bool;
    fn keys_held(&self) -> usize;
}

struct Ours(KeyedBuckets<String>);

impl Limiter for Ours {
    fn check(&self, key: &String) -> bool {
        self.0.check(key.as_str()).is_ok()
    }
    fn keys_held(&self) -> usize {
        self.0.len()
    }
}

struct Governor(governor::DefaultKeyedRateLimiter<String>);

impl Limiter for Governor {
    fn check(&self, key: &String) -> bool {
        self.0.check_key(key).is_ok()
    }
    fn keys_held(&self) -> usize {
        self.0.len()
    }
}

struct Outcome {
    checks: u64,
    passed: u64,
    elapsed: Duration,
    keys_held: usize,
}

fn measure(limiter: Arc<dyn Limiter>, keys: Arc<Vec<String>>, args: &Args) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.threads)
        .map(|t| {
            let (limiter, keys, stop) = (limiter.clone(), keys.clone(), stop.clone());
            std::thread::spawn(move || {
                // xorshift: a different spread of keys per thread, cheap.
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                let (mut checks, mut passed) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1024 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let key = &keys[(x % keys.len() as u64) as usize];
                        passed += u64::from(limiter.check(key));
                        checks += 1;
                    }
                }
                (checks, passed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.duration_secs));
    stop.store(true, Ordering::Relaxed);
    let (mut checks, mut passed) = (0, 0);
    for w in workers {
        let (c, p) = w.join().expect("bench thread");
        checks += c;
        passed += p;
    }
    Outcome {
        checks,
        passed,
        elapsed: started.elapsed(),
        keys_held: limiter.keys_held(),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.keys > 0 && args.threads > 0,
        "--keys and --threads must be positive"
    );
    let keys: Arc<Vec<String>> = Arc::new((0..args.keys).map(|i| format!("user-{i:08}")).collect());
    println!(
        "bucket-bench: {} keys, {} threads, {} s per case; ns per check is wall time x threads / checks",
        args.keys, args.threads, args.duration_secs
    );
    // Generous: every check passes (the cost of a call that goes on). Tight:
    // one call per key per second, nearly every check refused.
    for (case, per_second, burst) in [("generous", 1_000_000u32, 2_000_000u32), ("tight", 1, 1)] {
        let rate = Rate { per_second, burst };
        let quota = governor::Quota::per_second(NonZeroU32::new(per_second).expect("positive"))
            .allow_burst(NonZeroU32::new(burst).expect("positive"));
        let limiters: [(&str, Arc<dyn Limiter>); 2] = [
            (
                "KeyedBuckets",
                Arc::new(Ours(KeyedBuckets::new(rate, args.keys * 2))),
            ),
            (
                "governor",
                Arc::new(Governor(governor::RateLimiter::keyed(quota))),
            ),
        ];
        for (name, limiter) in limiters {
            let o = measure(limiter, keys.clone(), &args);
            let ns = o.elapsed.as_nanos() as f64 * args.threads as f64 / o.checks.max(1) as f64;
            println!(
                "{case:>8} {name:>12}: {:>6.1} M checks/s, {ns:>6.1} ns per check, {:>5.1} % passed, {} keys held",
                o.checks as f64 / o.elapsed.as_secs_f64() / 1e6,
                100.0 * o.passed as f64 / o.checks.max(1) as f64,
                o.keys_held
            );
        }
    }
    Ok(())
}
