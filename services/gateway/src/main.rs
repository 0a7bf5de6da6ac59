//! `chat-gateway`: one gateway instance.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use chat_auth::{Keyring, TokenKey};
use chat_gateway::guard::Limits;
use chat_gateway::{GatewayOptions, RunningGateway};
use chat_resilience::bucket::Rate;
use chat_resilience::incoming::AcceptRate;
use chat_resilience::limit::LimitConfig;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(
    name = "chat-gateway",
    version,
    about = "Client-facing gRPC gateway of the chat backend"
)]
struct Config {
    /// Async runtime worker threads (default: one per core).
    #[arg(long, env = "CHAT_WORKER_THREADS")]
    worker_threads: Option<usize>,

    /// Public address (clients).
    #[arg(long, env = "CHAT_GATEWAY_LISTEN", default_value = "127.0.0.1:7201")]
    listen: SocketAddr,
    /// Internal address (routers deliver here).
    #[arg(
        long,
        env = "CHAT_GATEWAY_INTERNAL_LISTEN",
        default_value = "127.0.0.1:7211"
    )]
    internal_listen: SocketAddr,
    /// Internal address as routers reach it (default: --internal-listen).
    #[arg(long, env = "CHAT_GATEWAY_INTERNAL_ADVERTISE")]
    internal_advertise: Option<String>,
    /// Routers, host:port, comma separated.
    #[arg(
        long,
        env = "CHAT_ROUTER_ADDRS",
        value_delimiter = ',',
        required = true
    )]
    routers: Vec<String>,
    /// Key that signs bearer tokens (at least 16 bytes).
    #[arg(long, env = "CHAT_TOKEN_KEY", hide_env_values = true)]
    token_key: String,
    /// More keys whose tokens are accepted, comma separated: during a
    /// rotation, the next key (before signers move to it) or the previous
    /// one (until its tokens have expired).
    #[arg(
        long,
        env = "CHAT_EXTRA_TOKEN_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    extra_token_keys: Vec<String>,
    /// The deployment's name, signed into its tokens: tokens made for
    /// another deployment do not verify here even if a key is shared.
    #[arg(long, env = "CHAT_TOKEN_AUDIENCE", default_value = chat_auth::DEFAULT_AUDIENCE)]
    token_audience: String,
    /// Tokens valid for longer than this are refused.
    #[arg(long, env = "CHAT_TOKEN_MAX_LIFETIME_SECS", default_value_t = chat_auth::DEFAULT_MAX_LIFETIME_SECS)]
    token_max_lifetime_secs: u64,
    /// Largest accepted message body.
    #[arg(long, env = "CHAT_GATEWAY_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    max_body_bytes: usize,
    /// Lease of session registrations at the routers.
    #[arg(long, env = "CHAT_GATEWAY_LEASE_MS", default_value_t = 6_000)]
    lease_ms: u64,
    /// How often each subscriber is reconciled with the store.
    #[arg(long, env = "CHAT_GATEWAY_SWEEP_MS", default_value_t = 2_000)]
    sweep_ms: u64,
    /// Reconciliations a second for all subscribers together (0: no
    /// bound); with more than rate × sweep-ms subscribers, each one's
    /// interval stretches rather than the store's load growing.
    #[arg(long, env = "CHAT_GATEWAY_SWEEP_RATE", default_value_t = 500)]
    sweep_rate: u32,
    /// Deadline of each router call, retries included.
    #[arg(long, env = "CHAT_GATEWAY_ROUTER_TIMEOUT_MS", default_value_t = 5_000)]
    router_timeout_ms: u64,
    /// Longest a send may wait in the gateway's queue before it is refused
    /// with RESOURCE_EXHAUSTED (overload protection).
    #[arg(long, env = "CHAT_GATEWAY_MAX_QUEUE_MS", default_value_t = 300)]
    max_queue_ms: u64,
    /// Switch overload protection off (for comparison runs): queued sends are
    /// sent however long they waited, even when their caller has gone.
    #[arg(long, env = "CHAT_GATEWAY_NO_OVERLOAD_PROTECTION")]
    no_overload_protection: bool,
    /// Calls per second one user may make (bursts of twice that); 0: no limit.
    #[arg(long, env = "CHAT_GATEWAY_USER_RATE", default_value_t = 1_000)]
    user_rate: u32,
    /// Calls per second one client IP may make (bursts of twice that); 0: no
    /// limit.
    #[arg(long, env = "CHAT_GATEWAY_IP_RATE", default_value_t = 100_000)]
    ip_rate: u32,
    /// Message body bytes per second one user may send (bursts of four
    /// times that); 0: no quota.
    #[arg(long, env = "CHAT_GATEWAY_USER_BYTES_RATE", default_value_t = Limits::default().per_user_bytes.per_second)]
    user_bytes_rate: u32,
    /// New connections per second the gateway accepts (bursts of twice
    /// that); 0: no limit.
    #[arg(long, env = "CHAT_GATEWAY_ACCEPT_RATE", default_value_t = 2_000)]
    accept_rate: u32,
    /// Concurrent calls one connection may have open.
    #[arg(long, env = "CHAT_GATEWAY_MAX_STREAMS", default_value_t = Limits::default().max_streams_per_connection)]
    max_streams_per_connection: u32,
    /// Client connections open at once; past it new ones are closed at
    /// once (0: no cap).
    #[arg(long, env = "CHAT_GATEWAY_MAX_CONNECTIONS", default_value_t = Limits::default().connections.total)]
    max_connections: u64,
    /// Client connections open at once from one IP (0: no cap).
    #[arg(long, env = "CHAT_GATEWAY_MAX_CONNECTIONS_PER_IP", default_value_t = Limits::default().connections.per_ip)]
    max_connections_per_ip: u32,
    /// Adaptive concurrency limit: the least and the most calls in flight
    /// it allows, and how far latency may rise over its long-term level
    /// before the limit falls.
    #[arg(long, env = "CHAT_GATEWAY_LIMIT_MIN", default_value_t = LimitConfig::default().min)]
    limit_min: usize,
    #[arg(long, env = "CHAT_GATEWAY_LIMIT_MAX", default_value_t = LimitConfig::default().max)]
    limit_max: usize,
    #[arg(long, env = "CHAT_GATEWAY_LIMIT_TOLERANCE", default_value_t = LimitConfig::default().tolerance)]
    limit_tolerance: f64,
    /// Admin HTTP address: /metrics (Prometheus), /status (JSON) and the
    /// status page at /; off when unset.
    #[arg(long, env = "CHAT_GATEWAY_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Release label of this instance, reported with the build version in
    /// the `chat-release` and `chat-version` headers of every response.
    #[arg(long, env = "CHAT_RELEASE", default_value = chat_rollout::DEFAULT_RELEASE)]
    release: String,
    /// Log filter.
    #[arg(long, env = "CHAT_GATEWAY_LOG", default_value = "info")]
    log: String,
    /// Log lines as `text` or `json`. Traces go over OTLP/gRPC when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "CHAT_LOG_FORMAT", default_value = "text")]
    log_format: chat_telemetry::trace::LogFormat,
    #[command(flatten)]
    tls: chat_security::TlsArgs,
    /// Serve the public port over TLS with the certificate in DIR
    /// (tls.crt, tls.key; `chatctl certs` writes one to DIR/public).
    /// Without it the public port is plaintext and tokens travel in clear:
    /// only for 127.0.0.1 or a network you trust.
    #[arg(long, env = "CHAT_GATEWAY_PUBLIC_TLS_DIR", value_name = "DIR")]
    public_tls_dir: Option<std::path::PathBuf>,
}

// The gateway stays on the system allocator, unlike the store and the
// router: it holds one connection per client, and under mimalloc each idle
// subscribed connection cost ≈ 14 KiB more resident memory, with no CPU
// per send to show for it (BENCHMARKS.md, "Idle subscribers on one
// gateway").

fn main() -> ExitCode {
    let cfg: Config = chat_telemetry::config::load();
    let _telemetry = chat_telemetry::trace::init("chat-gateway", &cfg.log, cfg.log_format);
    let rt = match chat_telemetry::runtime(cfg.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `per_second` with bursts of twice that.
fn rate(per_second: u32) -> Rate {
    Rate {
        per_second,
        burst: per_second.saturating_mul(2),
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut keys = vec![
        TokenKey::new(cfg.token_key.into_bytes())
            .map_err(|e| anyhow::anyhow!("--token-key: {e}"))?,
    ];
    for (i, k) in cfg.extra_token_keys.into_iter().enumerate() {
        keys.push(
            TokenKey::new(k.into_bytes())
                .map_err(|e| anyhow::anyhow!("--extra-token-keys, key {}: {e}", i + 1))?,
        );
    }
    let tokens =
        Keyring::new(keys, &cfg.token_audience).with_max_lifetime(cfg.token_max_lifetime_secs);
    tracing::info!(keys = ?tokens.ids(), audience = %cfg.token_audience, "token keys accepted");
    anyhow::ensure!(
        cfg.lease_ms >= 300 && cfg.lease_ms <= 60_000,
        "--lease-ms must be in 300..=60000"
    );
    anyhow::ensure!(cfg.sweep_ms >= 100, "--sweep-ms must be at least 100");
    anyhow::ensure!(
        cfg.limit_min >= 1 && cfg.limit_min <= cfg.limit_max,
        "--limit-min must be at least 1 and at most --limit-max"
    );
    anyhow::ensure!(
        cfg.limit_tolerance >= 1.0,
        "--limit-tolerance must be at least 1"
    );
    let tls = cfg.tls.load(chat_security::Role::Gateway)?;
    let public_tls = match &cfg.public_tls_dir {
        Some(d) => Some(chat_security::PublicTls::load(d)?),
        None => {
            if !cfg.listen.ip().is_loopback() {
                tracing::warn!(
                    address = %cfg.listen,
                    "the public port is plaintext and not on loopback: tokens travel in clear \
                     (--public-tls-dir serves it over TLS)"
                );
            }
            None
        }
    };
    let public = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let internal = tokio::net::TcpListener::bind(cfg.internal_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.internal_listen))?;
    let opts = GatewayOptions {
        routers: cfg.routers,
        tokens,
        internal_advertise: cfg
            .internal_advertise
            .unwrap_or_else(|| cfg.internal_listen.to_string()),
        max_body_bytes: cfg.max_body_bytes,
        lease: Duration::from_millis(cfg.lease_ms),
        sweep: chat_gateway::sessions::Sweep {
            every: Duration::from_millis(cfg.sweep_ms),
            rate: cfg.sweep_rate,
        },
        router_timeout: Duration::from_millis(cfg.router_timeout_ms),
        admission: chat_gateway::batcher::Admission {
            enabled: !cfg.no_overload_protection,
            max_queue_time: Duration::from_millis(cfg.max_queue_ms.max(1)),
        },
        release: cfg.release.clone(),
        limits: Limits {
            per_user: rate(cfg.user_rate),
            per_ip: rate(cfg.ip_rate),
            per_user_bytes: Rate {
                per_second: cfg.user_bytes_rate,
                burst: cfg.user_bytes_rate.saturating_mul(4),
            },
            accept: AcceptRate {
                per_second: cfg.accept_rate,
                burst: cfg.accept_rate.saturating_mul(2),
            },
            max_streams_per_connection: cfg.max_streams_per_connection.max(1),
            connections: chat_resilience::incoming::ConnectionCaps {
                total: cfg.max_connections,
                per_ip: cfg.max_connections_per_ip,
            },
            concurrency: LimitConfig {
                min: cfg.limit_min,
                max: cfg.limit_max,
                initial: LimitConfig::default()
                    .initial
                    .clamp(cfg.limit_min, cfg.limit_max),
                tolerance: cfg.limit_tolerance,
                ..LimitConfig::default()
            },
        },
        tls,
        public_tls,
    };
    let admin = chat_telemetry::admin::bind(cfg.admin_listen, "--admin-listen")
        .await
        .map_err(anyhow::Error::msg)?;
    let gateway = RunningGateway::start(opts, public, internal).await?;
    if let Some(l) = admin {
        gateway.serve_admin(l);
    }
    tracing::info!(
        address = %cfg.listen,
        internal = %cfg.internal_listen,
        version = env!("CARGO_PKG_VERSION"),
        release = %cfg.release,
        "gateway started"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    gateway.shutdown(Duration::from_secs(3)).await;
    Ok(())
}
