//! `loadtest sim`: the store's deterministic simulator (`chat_store::sim`)
//! over many seeds, or one seed replayed with its trace.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use chat_store::sim::{self, KnownBug, SimOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run this seed only (a failing run prints its seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Seeds to run, from --first-seed on.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value_t = 6)]
    clients: usize,
    #[arg(long, default_value_t = 3)]
    conversations: usize,
    /// Virtual seconds of faults and sends per run.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// The replicas' dedup window; shorter than retries last, it makes
    /// dedup records expire during the run.
    #[arg(long, default_value_t = 3600)]
    dedup_window_secs: u64,
    /// Wipes and replacements do not wait for replicas with new disks to
    /// catch up (double faults): only safety is checked, a group that
    /// stops making progress passes.
    #[arg(long)]
    double_faults: bool,
    /// Run without faults.
    #[arg(long)]
    no_faults: bool,
    /// Disks acknowledge fdatasync without making anything durable (a
    /// planted bug: runs must fail, showing the checkers catch it).
    #[arg(long)]
    lying_disks: bool,
    /// Inject these faults instead of the seed's (what a shrunk failure
    /// prints): AT_MS:crash:REPLICA:DOWN_MS, AT_MS:wipe:REPLICA:DOWN_MS,
    /// AT_MS:isolate:REPLICA, AT_MS:cut:FROM:TO, AT_MS:heal,
    /// AT_MS:replace:REPLICA, AT_MS:clock:REPLICA:MS, AT_MS:transfer,
    /// separated by commas.
    #[arg(long)]
    plan: Option<String>,
    /// On a failure, do not look for a smaller set of faults that fails
    /// the same way.
    #[arg(long)]
    no_shrink: bool,
    /// Print every event of the run (with --seed).
    #[arg(long)]
    trace: bool,
    /// Put back a bug the replica logic once had, to watch the simulator
    /// find it: early-vote, stale-lost-log, bootstrap-vote or revote-after-wipe.
    #[arg(long, value_parser = parse_bug)]
    known_bug: Option<KnownBug>,
    /// Threads running seeds side by side (each run is one thread).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

fn parse_bug(s: &str) -> Result<KnownBug, String> {
    match s {
        "early-vote" => Ok(KnownBug::EarlyVote),
        "stale-lost-log" => Ok(KnownBug::StaleLostLog),
        "revote-after-wipe" => Ok(KnownBug::RevoteAfterWipe),
        "bootstrap-vote" => Ok(KnownBug::BootstrapVote),
        _ => Err(format!(
            "unknown bug {s:?}: expected early-vote, stale-lost-log, bootstrap-vote or revote-after-wipe"
        )),
    }
}

/// What the runs that passed add up to.
#[derive(Default)]
struct Totals {
    runs: u64,
    events: u64,
    acked: usize,
    crashes: u64,
    duplicates: u64,
    stored_anew: u64,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let opts = SimOptions {
        replicas: args.replicas,
        clients: args.clients,
        conversations: args.conversations,
        duration: Duration::from_secs(args.duration_secs),
        faults: !args.no_faults,
        lying_disks: args.lying_disks,
        known_bug: args.known_bug,
        dedup_window: Duration::from_secs(args.dedup_window_secs),
        double_faults: args.double_faults,
        trace: args.trace,
        plan: args
            .plan
            .as_deref()
            .map(sim::parse_plan)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?,
        ..SimOptions::default()
    };
    if args.replicas == 0 || args.clients == 0 || args.jobs == 0 {
        bail!("--replicas, --clients and --jobs must be at least 1");
    }
    let seeds = match args.seed {
        Some(s) => s..s + 1,
        None => args.first_seed..args.first_seed + args.seeds,
    };
    let started = Instant::now();
    let next = AtomicU64::new(seeds.start);
    let stop = AtomicBool::new(false);
    let totals = Mutex::new(Totals::default());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    match sim::run(seed, &opts) {
                        Ok(r) => {
                            if args.seed.is_some() {
                                print_one(seed, &r);
                            }
                            let mut t = totals.lock().expect("totals");
                            t.runs += 1;
                            t.events += r.events;
                            t.acked += r.acked;
                            t.crashes += r.crashes;
                            t.duplicates += r.duplicates;
                            t.stored_anew += r.stored_anew;
                            if args.seed.is_none() && t.runs.is_multiple_of(5000) {
                                eprintln!(
                                    "{} seeds passed in {:.0} s",
                                    t.runs,
                                    started.elapsed().as_secs_f64()
                                );
                            }
                        }
                        Err(f) => {
                            stop.store(true, Ordering::Relaxed);
                            failures.lock().expect("failures").push(f);
                        }
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().expect("failures");
    failures.sort_by_key(|f| f.seed);
    if let Some(f) = failures.into_iter().next() {
        for line in &f.trace {
            println!("{line}");
        }
        println!("FAIL {f}");
        if !args.no_shrink {
            let before = f
                .opts
                .plan
                .clone()
                .unwrap_or_else(|| sim::fault_plan(f.seed, &opts));
            if let Some((plan, small)) = sim::shrink(f.seed, &opts, 300) {
                println!(
                    "shrunk from {} faults to {}: {}\nreplay: {}",
                    before.len(),
                    plan.len(),
                    small.what,
                    small.replay_command()
                );
            }
        }
        return Ok(false);
    }
    let Totals {
        runs,
        events,
        acked,
        crashes,
        duplicates,
        stored_anew,
    } = totals.into_inner().expect("totals");
    println!(
        "PASS {runs} seed(s): {events} events, {acked} appends acknowledged, {duplicates} retries answered as duplicates, {stored_anew} stored anew after the dedup window, {crashes} crashes, in {:.1} s ({:.2} seeds/s on {} thread(s))",
        started.elapsed().as_secs_f64(),
        runs as f64 / started.elapsed().as_secs_f64(),
        args.jobs
    );
    Ok(true)
}

fn print_one(seed: u64, r: &sim::SimReport) {
    for line in &r.trace {
        println!("{line}");
    }
    println!(
        "seed {seed}: {} events, {} acknowledged, {} crashes, {} partitions, {} clock steps, {} leadership transfers, {} disks wiped, {} replicas replaced, {} snapshots sent, {} terms with a leader, commit index {}, {} duplicates, {} stored anew, trace hash {:016x}",
        r.events,
        r.acked,
        r.crashes,
        r.partitions,
        r.clock_steps,
        r.transfers,
        r.wipes,
        r.replacements,
        r.snapshots,
        r.elections,
        r.committed,
        r.duplicates,
        r.stored_anew,
        r.trace_hash
    );
}
