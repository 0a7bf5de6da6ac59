//! `chat-router`: one router instance.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use chat_router::{RouterOptions, RunningRouter};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "chat-router",
    version,
    about = "Stateless router of the chat backend"
)]
struct Config {
    /// Async runtime worker threads (default: one per core).
    #[arg(long, env = "CHAT_WORKER_THREADS")]
    worker_threads: Option<usize>,

    /// Address to listen on, for gateways.
    #[arg(long, env = "CHAT_ROUTER_LISTEN", default_value = "127.0.0.1:7101")]
    listen: SocketAddr,
    /// Store replicas, host:port, comma separated.
    #[arg(long, env = "CHAT_STORE_ADDRS", value_delimiter = ',', required = true)]
    store: Vec<String>,
    /// Deadline of each store call, retries included.
    #[arg(long, env = "CHAT_ROUTER_STORE_TIMEOUT_MS", default_value_t = 5_000)]
    store_timeout_ms: u64,
    /// How long SIGTERM waits for in-flight calls.
    #[arg(long, env = "CHAT_ROUTER_SHUTDOWN_GRACE_MS", default_value_t = 3_000)]
    shutdown_grace_ms: u64,
    /// Switch off overload protection and degraded mode (for comparison
    /// runs): no concurrency limit, and while the store has no quorum calls
    /// wait out their deadline instead of failing fast.
    #[arg(long, env = "CHAT_ROUTER_NO_OVERLOAD_PROTECTION")]
    no_overload_protection: bool,
    /// Release label of this instance (a canary's name during a rollout).
    #[arg(long, env = "CHAT_RELEASE", default_value = chat_rollout::DEFAULT_RELEASE)]
    release: String,
    /// Drill: fail this share (0 to 1) of client calls with INTERNAL.
    #[arg(long, env = "CHAT_ROUTER_INJECT_ERROR_RATE", default_value_t = 0.0)]
    inject_error_rate: f64,
    /// Drill: add this latency to every client call.
    #[arg(long, env = "CHAT_ROUTER_INJECT_LATENCY_MS", default_value_t = 0)]
    inject_latency_ms: u64,
    /// On SIGTERM, report NOT_SERVING this long before stopping, so
    /// gateways move away first.
    #[arg(long, env = "CHAT_ROUTER_DRAIN_MS", default_value_t = 2_000)]
    drain_ms: u64,
    /// Admin HTTP address serving /metrics (Prometheus); off when unset.
    #[arg(long, env = "CHAT_ROUTER_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Log filter.
    #[arg(long, env = "CHAT_ROUTER_LOG", default_value = "info")]
    log: String,
    /// Log lines as `text` or `json`. Traces go over OTLP/gRPC when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "CHAT_LOG_FORMAT", default_value = "text")]
    log_format: chat_telemetry::trace::LogFormat,
    #[command(flatten)]
    tls: chat_security::TlsArgs,
}

/// mimalloc rather than the system allocator: fewer CPU cycles per message
/// (BENCHMARKS.md, "Batches that follow the load, and mimalloc").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cfg: Config = chat_telemetry::config::load();
    let _telemetry = chat_telemetry::trace::init("chat-router", &cfg.log, cfg.log_format);
    let rt = match chat_telemetry::runtime(cfg.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-router: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&cfg.inject_error_rate),
        "--inject-error-rate {} is not between 0 and 1",
        cfg.inject_error_rate
    );
    let tls = cfg.tls.load(chat_security::Role::Router)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let opts = RouterOptions {
        store: cfg.store,
        store_timeout: Duration::from_millis(cfg.store_timeout_ms),
        protection: !cfg.no_overload_protection,
        release: cfg.release.clone(),
        faults: chat_router::rollout::Faults {
            error_rate: cfg.inject_error_rate,
            latency: Duration::from_millis(cfg.inject_latency_ms),
        },
        drain: Duration::from_millis(cfg.drain_ms),
        tls,
    };
    let admin = chat_telemetry::admin::bind(cfg.admin_listen, "--admin-listen")
        .await
        .map_err(anyhow::Error::msg)?;
    let router = RunningRouter::start(opts, listener).await?;
    if let Some(l) = admin {
        router.serve_admin(l);
    }
    tracing::info!(
        address = %cfg.listen,
        version = env!("CARGO_PKG_VERSION"),
        release = %cfg.release,
        "router started"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    router
        .shutdown(Duration::from_millis(cfg.shutdown_grace_ms))
        .await;
    Ok(())
}
