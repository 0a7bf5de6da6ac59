//! `loadtest sim`: the store's deterministic simulator (`chat_store::sim`)
//! over many seeds, or one seed replayed with its trace.

use std::time::{Duration, Instant};

use anyhow::bail;
use chat_store::sim::{self, SimOptions};

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
    /// Run without faults.
    #[arg(long)]
    no_faults: bool,
    /// Disks acknowledge fdatasync without making anything durable (a
    /// planted bug: runs must fail, showing the checkers catch it).
    #[arg(long)]
    lying_disks: bool,
    /// Inject these faults instead of the seed's (what a shrunk failure
    /// prints): AT_MS:crash:REPLICA:DOWN_MS, AT_MS:isolate:REPLICA,
    /// AT_MS:cut:FROM:TO, AT_MS:heal, AT_MS:clock:REPLICA:MS, AT_MS:transfer,
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
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let opts = SimOptions {
        replicas: args.replicas,
        clients: args.clients,
        conversations: args.conversations,
        duration: Duration::from_secs(args.duration_secs),
        faults: !args.no_faults,
        lying_disks: args.lying_disks,
        trace: args.trace,
        plan: args
            .plan
            .as_deref()
            .map(sim::parse_plan)
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?,
        ..SimOptions::default()
    };
    if args.replicas == 0 || args.clients == 0 {
        bail!("--replicas and --clients must be at least 1");
    }
    let seeds = match args.seed {
        Some(s) => s..s + 1,
        None => args.first_seed..args.first_seed + args.seeds,
    };
    let started = Instant::now();
    let (mut runs, mut events, mut acked, mut crashes) = (0u64, 0u64, 0usize, 0u64);
    for seed in seeds {
        match sim::run(seed, &opts) {
            Ok(r) => {
                for line in &r.trace {
                    println!("{line}");
                }
                if args.seed.is_some() {
                    println!(
                        "seed {seed}: {} events, {} acknowledged, {} crashes, {} partitions, {} clock steps, {} leadership transfers, {} disks wiped, {} replicas replaced, {} snapshots sent, {} terms with a leader, commit index {}, trace hash {:016x}",
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
                        r.trace_hash
                    );
                }
                runs += 1;
                events += r.events;
                acked += r.acked;
                crashes += r.crashes;
            }
            Err(f) => {
                for line in &f.trace {
                    println!("{line}");
                }
                println!("FAIL {f}");
                if !args.no_shrink {
                    let before = f
                        .opts
                        .plan
                        .clone()
                        .unwrap_or_else(|| sim::fault_plan(seed, &opts));
                    if let Some((plan, small)) = sim::shrink(seed, &opts, 300) {
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
        }
    }
    println!(
        "PASS {runs} seed(s): {events} events, {acked} appends acknowledged, {crashes} crashes, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(true)
}
