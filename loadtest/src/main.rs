//! `loadtest`: benchmarks and load scenarios of the chat backend.
//!
//! `loadtest store-bench` measures the replicated store alone: it starts a
//! local group of real `chat-store` processes, drives it with closed-loop
//! appenders (each waits for its ack before sending again), and reports
//! acknowledged appends per second and append latency. Afterwards it checks
//! that every acknowledged append is stored, exactly once.

mod e2e_bench;
mod engine_bench;
mod store_bench;

use clap::{Parser, Subcommand};

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
#[allow(clippy::enum_variant_names)] // the subcommands are all benchmarks
enum Cmd {
    /// Append throughput and latency of a local store group.
    StoreBench(store_bench::Args),
    /// One replica's write path (log + apply + sync) without network or raft.
    EngineBench(engine_bench::Args),
    /// Sends and deliveries through the whole cluster (`chatctl local up`).
    E2eBench(e2e_bench::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::StoreBench(args) => rt.block_on(store_bench::run(args)),
        Cmd::EngineBench(args) => engine_bench::run(args),
        Cmd::E2eBench(args) => rt.block_on(e2e_bench::run(args)),
    }
}
