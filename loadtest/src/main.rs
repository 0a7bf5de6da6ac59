//! `loadtest`: load scenarios and benchmarks of the chat backend.
//!
//! Scenarios (`steady`, `congestion`, `failover`, `rolling-restart`,
//! `reconnect-storm`, `canary-bad-release`, `canary-good-release`, `dr`,
//! `corrupt-replica`) drive chat traffic through the gateways, inject
//! faults, read everything back and write a report (JSON, Markdown, SVG);
//! the exit status is 1 when an SLO is missed. Benchmarks (`store-bench`,
//! `engine-bench`, `e2e-bench`) measure one layer's throughput and latency;
//! `rejoin-bench` a wiped replica rejoining a large store.

mod backup_bench;
mod bucket_bench;
mod connections;
mod cpu;
mod e2e_bench;
mod engine_bench;
mod rawgrpc;
mod rejoin_bench;
mod scenario;
mod sim;
mod store_bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use scenario::Scenario;

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Benchmarks and load scenarios of the chat backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A fixed offered rate for a duration, then the read-back.
    Steady(scenario::Args),
    /// Offered load ramps from a quarter of capacity to --peak-factor times
    /// it (capacity probed first unless --capacity is given).
    Congestion(scenario::Args),
    /// Steady load with faults (--fault KIND@SECONDS; default store-leader@10).
    Failover(scenario::Args),
    /// Every service restarted gracefully, one at a time, under load.
    RollingRestart(scenario::Args),
    /// Every client drops its connections and resubscribes at once.
    ReconnectStorm(scenario::Args),
    /// A faulty canary router is rolled out under load and must be rolled
    /// back by the analysis (--canary-error-rate, --canary-latency-ms).
    CanaryBadRelease(scenario::Args),
    /// A healthy canary router is rolled out to 100 % under load.
    CanaryGoodRelease(scenario::Args),
    /// Disaster recovery: an online backup mid-load (--drill-at), then
    /// every store replica's data destroyed and a new group restored from
    /// the file; what was acknowledged before the backup must be there, the
    /// rest is the measured recovery point (local only).
    Dr(scenario::Args),
    /// A follower's state file damaged under load (--drill-at): it must
    /// refuse to start, the cluster keep serving, and the guarded rebuild
    /// bring it back with every acknowledged message (local only).
    CorruptReplica(scenario::Args),
    /// A DDoS drill: well-behaved users keep sending while attackers on
    /// other loopback addresses hit the public edge from --attack-at
    /// (--attack KIND, repeatable; default every kind).
    Flood(scenario::Args),
    /// Append throughput and latency of a local store group.
    StoreBench(store_bench::Args),
    /// One replica's write path (log + apply + sync) without network or raft.
    EngineBench(engine_bench::Args),
    /// The gateway's per-user rate check (governor with the gateway's
    /// bound on keys) against the governor crate's keyed limiter alone.
    BucketBench(bucket_bench::Args),
    /// Many mostly idle subscribers on one gateway: its memory and
    /// descriptors per client, accept rate, delivery latency at that count,
    /// and every client back after a gateway restart.
    Connections(connections::Args),
    /// The store's deterministic simulator: seeded runs of the replicas'
    /// code under network, crash and clock faults, with invariant checks.
    Sim(sim::Args),
    /// Sends and deliveries through the whole cluster (`chatctl local up`).
    E2eBench(e2e_bench::Args),
    /// A replica whose disk was wiped rejoining a store of --gib GiB.
    RejoinBench(rejoin_bench::Args),
    /// A backup of a store of --gib GiB under writes, every disk lost, and
    /// a new group restored from the file.
    BackupBench(backup_bench::Args),
}

/// `given`, or the binary `name` next to this one (where cargo builds it).
pub(crate) fn sibling_binary(
    given: Option<std::path::PathBuf>,
    name: &str,
) -> anyhow::Result<std::path::PathBuf> {
    match given {
        Some(p) => Ok(p),
        None => Ok(std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow::anyhow!("no binary directory"))?
            .join(name)),
    }
}

/// Bytes of the files under `dir`, recursively.
pub(crate) fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let scenario = |s: Scenario, args| rt.block_on(scenario::run(s, args));
    let result = match cli.command {
        Cmd::Steady(args) => scenario(Scenario::Steady, args),
        Cmd::Congestion(args) => scenario(Scenario::Congestion, args),
        Cmd::Failover(args) => scenario(Scenario::Failover, args),
        Cmd::RollingRestart(args) => scenario(Scenario::RollingRestart, args),
        Cmd::ReconnectStorm(args) => scenario(Scenario::ReconnectStorm, args),
        Cmd::CanaryBadRelease(args) => scenario(Scenario::CanaryBadRelease, args),
        Cmd::CanaryGoodRelease(args) => scenario(Scenario::CanaryGoodRelease, args),
        Cmd::Dr(args) => scenario(Scenario::Dr, args),
        Cmd::CorruptReplica(args) => scenario(Scenario::CorruptReplica, args),
        Cmd::Flood(args) => scenario(Scenario::Flood, args),
        Cmd::StoreBench(args) => rt.block_on(store_bench::run(args)).map(|()| true),
        Cmd::EngineBench(args) => engine_bench::run(args).map(|()| true),
        Cmd::BucketBench(args) => bucket_bench::run(args).map(|()| true),
        Cmd::E2eBench(args) => rt.block_on(e2e_bench::run(args)).map(|()| true),
        Cmd::Connections(args) => rt.block_on(connections::run(args)).map(|()| true),
        Cmd::RejoinBench(args) => rt.block_on(rejoin_bench::run(args)).map(|()| true),
        Cmd::BackupBench(args) => rt.block_on(backup_bench::run(args)).map(|()| true),
        Cmd::Sim(args) => sim::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // An SLO was missed; the summary above says which.
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}
