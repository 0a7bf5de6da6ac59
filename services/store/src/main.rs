//! `chat-store`: one replica of the message store.

use std::process::ExitCode;
use std::time::Duration;

use chat_store::Replica;
use chat_store::config::StoreConfig;
use chat_store::faults::Faults;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

/// mimalloc rather than the system allocator: fewer CPU cycles per message
/// (BENCHMARKS.md, "Batches that follow the load, and mimalloc").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cfg: StoreConfig = chat_telemetry::config::load();
    let _telemetry = chat_telemetry::trace::init("chat-store", &cfg.log, cfg.log_format);
    let opts = match cfg.validate() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chat-store: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match chat_telemetry::runtime(cfg.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-store: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("chat-store: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: StoreConfig, opts: chat_store::ReplicaOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create data directory {}: {e}",
            cfg.data_dir.display()
        )
    })?;
    let storage = chat_store::data_dir::open_storage(&cfg.data_dir, cfg.state_cache_mib << 20)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let admin = chat_telemetry::admin::bind(cfg.admin_listen, "--admin-listen")
        .await
        .map_err(anyhow::Error::msg)?;
    let faults = Faults::default();
    let id = opts.driver.id;
    if let Some(from) = cfg.fault_hold_log_from {
        tracing::warn!(
            from,
            "fault drill: log entries and snapshots from this replica are dropped"
        );
        faults.hold_log(chat_store::NodeId(from), id);
    }
    let replica = Replica::start(opts, storage, listener, faults.clone()).await?;
    let stop_admin = tokio_util::sync::CancellationToken::new();
    if let Some(l) = admin {
        let handler = std::sync::Arc::new(chat_store::admin::StoreAdminHttp {
            handle: replica.handle().clone(),
            rpc: replica.rpc().clone(),
            release: cfg.release.clone(),
        });
        tokio::spawn(chat_telemetry::admin::serve(l, handler, stop_admin.clone()));
    }
    if cfg.fault_signals {
        tokio::spawn(fault_signals(faults, id));
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
        _ = replica.stopped() => {
            anyhow::bail!("the raft driver stopped; see the log above");
        }
    }
    stop_admin.cancel();
    replica
        .shutdown(Duration::from_millis(cfg.shutdown_grace_ms))
        .await?;
    info!("stopped");
    Ok(())
}

/// `--fault-signals`: SIGUSR1 isolates this replica from its peers, SIGUSR2
/// heals it.
async fn fault_signals(faults: Faults, id: chat_store::NodeId) -> std::io::Result<()> {
    let mut cut = signal(SignalKind::user_defined1())?;
    let mut heal = signal(SignalKind::user_defined2())?;
    loop {
        tokio::select! {
            Some(()) = cut.recv() => {
                tracing::warn!("SIGUSR1: fault drill, cut off from every peer");
                faults.isolate(id);
            }
            Some(()) = heal.recv() => {
                tracing::warn!("SIGUSR2: fault drill over, peers reachable again");
                faults.heal();
            }
        }
    }
}
