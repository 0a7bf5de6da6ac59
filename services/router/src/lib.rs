//! The chat router: stateless forwarding between gateways and the store,
//! and fan-out of committed messages to the gateways of online recipients.
//!
//! Architecture Invariant: a router holds only soft state (the session
//! directory). Killing one loses no message: gateways resume from the store.

pub mod admin;
pub mod directory;
pub mod fanout;
pub mod guard;
pub mod quorum;
pub mod rollout;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use chat_proto::router::v1::router_server::RouterServer;
use chat_store_client::StoreClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use chat_resilience::layer::AdmitLayer;
use chat_resilience::limit::LimitConfig;
use chat_security::{HEALTH, Policy, Role, Rule};

use crate::directory::Directory;
use crate::fanout::Fanout;
use crate::guard::RouterGuard;
use crate::quorum::Quorum;
use crate::rollout::{Faults, Rollout};
use crate::service::RouterService;

/// The health service name clients check.
pub const HEALTH_SERVICE: &str = "chat.router.v1.Router";

#[derive(Clone, Debug)]
pub struct RouterOptions {
    /// Store replicas, host:port.
    pub store: Vec<String>,
    /// Deadline of each store call, retries included.
    pub store_timeout: Duration,
    /// Overload protection and degraded mode (off: no concurrency limit,
    /// and calls wait out their deadline while the store has no quorum).
    pub protection: bool,
    /// Release label (stable, or a canary's name in a rollout).
    pub release: String,
    /// Faults injected into client traffic (drills).
    pub faults: Faults,
    /// How long a graceful stop reports NOT_SERVING before it stops
    /// accepting calls, so gateways move their traffic away first.
    pub drain: Duration,
    /// The router's identity for mutual TLS with gateways and the store
    /// (None: plaintext, every caller trusted).
    pub tls: Option<Arc<chat_security::Tls>>,
}

/// Who may call what on a router's port: gateways, and probes for health.
pub const POLICY: Policy = Policy(&[
    HEALTH,
    Rule::roles("/chat.router.v1.Router/", &[Role::Gateway]),
]);

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            store: Vec::new(),
            store_timeout: Duration::from_secs(5),
            protection: true,
            release: chat_rollout::DEFAULT_RELEASE.to_owned(),
            faults: Faults::default(),
            drain: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// A running router.
pub struct RunningRouter {
    shutdown: CancellationToken,
    admin: Arc<admin::RouterAdmin>,
    health: tonic_health::server::HealthReporter,
    drain: Duration,
    server: tokio::task::JoinHandle<()>,
    directory: Arc<Directory>,
}

impl RunningRouter {
    pub async fn start(opts: RouterOptions, listener: TcpListener) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let store = Arc::new(
            StoreClient::new(opts.store.clone(), opts.store_timeout)?.with_tls(opts.tls.clone()),
        );
        let directory = Arc::new(Directory::default());
        let fanout = Arc::new(Fanout::new(shutdown.clone(), opts.tls.clone()));
        // Always watched (the status page shows the replicas); acted on
        // (degraded mode) only with protection on.
        let store_view = Arc::new(Quorum::default());
        tokio::spawn(
            store_view
                .clone()
                .watch(store.clone(), opts.store.clone(), shutdown.clone()),
        );
        let quorum = opts.protection.then(|| store_view.clone());
        let rollout = Rollout::new(opts.release.clone());
        tokio::spawn(rollout.clone().run(store.clone(), shutdown.clone()));
        if !opts.faults.is_off() {
            tracing::warn!(faults = ?opts.faults, "injecting faults into client traffic");
        }
        let service = RouterService {
            store,
            directory: directory.clone(),
            fanout,
            replicas: opts.store,
            store_timeout: opts.store_timeout,
            quorum,
            store_view,
            rollout,
            faults: opts.faults,
        };
        let guard = Arc::new(RouterGuard::new(opts.protection.then(LimitConfig::default)));
        let rpc = Arc::new(chat_telemetry::metrics::RpcMetrics::new(&admin::METHODS));
        let admin = Arc::new(admin::RouterAdmin {
            rpc: rpc.clone(),
            limiter: guard.limiter().cloned(),
            directory: directory.clone(),
            store_view: service.store_view.clone(),
            rollout: service.rollout.clone(),
            quorum: service.quorum.clone(),
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        chat_resilience::health::set(&health, HEALTH_SERVICE, true).await;
        let purge = directory.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => purge.purge(),
                }
            }
        });
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &opts.tls {
            server = server.tls_config(tls.server_config())?;
        }
        let router = server
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(1)))
            .http2_keepalive_timeout(Some(Duration::from_secs(2)))
            .layer(chat_telemetry::metrics::MetricsLayer::new(rpc))
            .layer(chat_security::authorize(POLICY, opts.tls.is_some()))
            .layer(chat_telemetry::trace::TraceLayer)
            .layer(AdmitLayer::new(guard).with_identity(env!("CARGO_PKG_VERSION"), &opts.release))
            .add_service(health_service)
            .add_service(RouterServer::new(service).max_decoding_message_size(64 << 20));
        let stop = shutdown.clone();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await
            {
                tracing::warn!(error = %e, "router server stopped with an error");
            }
        });
        Ok(Self {
            shutdown,
            health,
            drain: opts.drain,
            server,
            directory,
            admin,
        })
    }

    /// Serves `/metrics` on `listener` until the router stops.
    pub fn serve_admin(&self, listener: TcpListener) {
        tokio::spawn(chat_telemetry::admin::serve(
            listener,
            self.admin.clone(),
            self.shutdown.clone(),
        ));
    }

    pub fn online_users(&self) -> usize {
        self.directory.online_users()
    }

    /// Graceful stop: health turns NOT_SERVING so gateways stop choosing
    /// this router, then after the drain period it stops accepting calls
    /// and in-flight ones finish within `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        chat_resilience::health::set(&self.health, HEALTH_SERVICE, false).await;
        if !self.drain.is_zero() {
            tracing::info!(drain_ms = self.drain.as_millis() as u64, "draining");
            tokio::time::sleep(self.drain).await;
        }
        self.shutdown.cancel();
        if tokio::time::timeout(grace, &mut self.server).await.is_err() {
            self.server.abort();
        }
    }

    /// Abrupt stop: connections are cut.
    pub fn kill(self) {
        self.shutdown.cancel();
        self.server.abort();
    }
}

impl Drop for RunningRouter {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.server.abort();
    }
}
