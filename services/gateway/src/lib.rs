//! The chat gateway: the public `chat.v1` API. Authenticates every call,
//! batches sends into `AppendBatch` calls to the routers, and delivers each
//! subscriber's messages in order, resuming from the store.
//!
//! Architecture Invariant: a gateway holds only soft state (its sessions);
//! a client whose gateway dies resumes on another from its cursors.

pub mod batcher;
pub mod guard;
pub mod routers;
pub mod service;
pub mod sessions;
pub mod status;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use chat_auth::Keyring;
use chat_proto::chat::v1::chat_server::ChatServer;
use chat_proto::router::v1 as rpb;
use chat_proto::router::v1::gateway_delivery_server::GatewayDeliveryServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use chat_resilience::incoming::paced;
use chat_resilience::layer::AdmitLayer;
use chat_security::{Policy, Role, Rule};

use crate::batcher::SendBatcher;
use crate::guard::Guard;
use crate::routers::RouterPool;
use crate::service::{ChatApi, DeliveryApi, SendChecks};
use crate::sessions::Sessions;

/// The health service name clients check.
pub const HEALTH_SERVICE: &str = "chat.v1.Chat";
/// Who may call what on the internal port: routers deliver.
pub const INTERNAL_POLICY: Policy = Policy(&[Rule::roles(
    "/chat.router.v1.GatewayDelivery/",
    &[Role::Router],
)]);

/// The health service name routers serve (checked by `RouterPool`).
pub const ROUTER_HEALTH_SERVICE: &str = "chat.router.v1.Router";

#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Routers, host:port.
    pub routers: Vec<String>,
    /// The token keys accepted, the audience and the longest lifetime.
    pub tokens: Keyring,
    /// The internal address routers deliver to (as they can reach it).
    pub internal_advertise: String,
    pub max_body_bytes: usize,
    /// Lease of the session registrations sent to routers.
    pub lease: Duration,
    /// How often each subscriber is checked against the store.
    pub sweep: sessions::Sweep,
    /// Deadline of each router call, retries included.
    pub router_timeout: Duration,
    /// Overload protection of sends; `enabled: false` also switches off
    /// the adaptive concurrency limit.
    pub admission: crate::batcher::Admission,
    /// Rate, connection and concurrency limits of the public API.
    pub limits: crate::guard::Limits,
    /// The gateway's identity for mutual TLS with routers, on the
    /// internal port (None: plaintext, every caller trusted).
    pub tls: Option<Arc<chat_security::Tls>>,
    /// The public port's certificate (None: plaintext, tokens in clear).
    pub public_tls: Option<Arc<chat_security::PublicTls>>,
    /// Release label, reported with the build version on every response.
    pub release: String,
}

/// Streams a client may reset right after opening them, unanswered, before
/// its connection is closed.
const MAX_PENDING_RESETS: usize = 32;
/// Streams the gateway may reset for a client's protocol errors before its
/// connection is closed.
const MAX_ERROR_RESETS: usize = 256;
/// Most bytes of request headers.
const MAX_HEADER_BYTES: u32 = 64 << 10;
/// A client connection is closed (gracefully) after this long.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);

/// Slack over the largest body for the rest of a `SendRequest`.
const REQUEST_OVERHEAD: usize = 16 << 10;

/// Server reflection of the public port: the public API and health only
/// (the internal services' descriptors are not in the set at all), in
/// both versions (tools still use `v1alpha`).
fn public_reflection() -> tonic_reflection::server::Builder<'static> {
    use prost::Message as _;
    let mut public = prost_types::FileDescriptorSet::decode(chat_proto::FILE_DESCRIPTOR_SET)
        .expect("the generated descriptor set decodes");
    public.file.retain(|f| f.package() == "chat.v1");
    tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(public)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("chat.v1.Chat")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

pub struct RunningGateway {
    shutdown: CancellationToken,
    admin: Arc<status::GatewayAdmin>,
    health: tonic_health::server::HealthReporter,
    servers: Vec<tokio::task::JoinHandle<()>>,
    sessions: Arc<Sessions>,
}

impl RunningGateway {
    /// Serves the public API on `public` and deliveries on `internal`.
    pub async fn start(
        opts: GatewayOptions,
        public: TcpListener,
        internal: TcpListener,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let pool = Arc::new(RouterPool::new(
            &opts.routers,
            opts.router_timeout,
            opts.tls.clone(),
        )?);
        let view = Arc::new(status::ClusterView::new(opts.routers.len()));
        let sessions = Arc::new(Sessions::default());
        let batcher = SendBatcher::start(pool.clone(), opts.admission);
        let guard = Arc::new(Guard::new(
            opts.tokens.clone(),
            &opts.limits,
            opts.admission.enabled,
        ));
        let load = Arc::new(chat_resilience::layer::LoadSignal::new());
        let rpc = Arc::new(chat_telemetry::metrics::RpcMetrics::new(&status::METHODS));
        let chat = ChatApi {
            pool: pool.clone(),
            batcher,
            sessions: sessions.clone(),
            sends: Arc::new(SendChecks {
                max_body_bytes: opts.max_body_bytes,
                byte_quota: (opts.limits.per_user_bytes.per_second > 0).then(|| {
                    chat_resilience::bucket::KeyedBuckets::new(opts.limits.per_user_bytes, 100_000)
                }),
            }),
            guard: guard.clone(),
            load: load.clone(),
            rpc: rpc.clone(),
            sweep: opts.sweep,
            stop: shutdown.clone(),
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        chat_resilience::health::set(&health, HEALTH_SERVICE, true).await;
        let reflection = public_reflection().build_v1()?;
        let reflection_v1alpha = public_reflection().build_v1alpha()?;
        let connections = Arc::new(chat_resilience::incoming::ConnectionCount::default());
        let admin = Arc::new(status::GatewayAdmin {
            view: view.clone(),
            pool: pool.clone(),
            sessions: sessions.clone(),
            rpc: rpc.clone(),
            guard: guard.clone(),
            connections: connections.clone(),
            release: opts.release.clone(),
            address: public
                .local_addr()
                .map_or_else(|_| String::new(), |a| a.to_string()),
        });
        let mut public_server = tonic::transport::Server::builder();
        if let Some(t) = &opts.public_tls {
            public_server = public_server.tls_config(t.server_config())?;
        }
        let public_router = public_server
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .max_concurrent_streams(opts.limits.max_streams_per_connection)
            // Set rather than left to tonic, which passes "no limit" to
            // hyper: streams a client opens and resets at once (HTTP/2
            // rapid reset) and streams the server had to reset for the
            // client's errors both end the connection past these.
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
            .http2_max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
            // Connections are recycled now and then, so load spreads again
            // after gateways are added; subscribers resume on their own.
            .max_connection_age(MAX_CONNECTION_AGE)
            .max_connection_age_grace(Duration::from_secs(30))
            // Room for an oversized token to reach the token check and be
            // refused as UNAUTHENTICATED rather than as a protocol error.
            .http2_max_header_list_size(MAX_HEADER_BYTES)
            .layer(chat_telemetry::metrics::MetricsLayer::new(rpc))
            .layer(chat_telemetry::trace::TraceLayer)
            .layer(
                AdmitLayer::new(guard)
                    .with_identity(env!("CARGO_PKG_VERSION"), &opts.release)
                    .with_load_signal(load),
            )
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                ChatServer::new(chat)
                    .max_decoding_message_size(opts.max_body_bytes + REQUEST_OVERHEAD),
            );
        let mut internal_server = tonic::transport::Server::builder();
        if let Some(tls) = &opts.tls {
            internal_server = internal_server.tls_config(tls.server_config())?;
        }
        let internal_router = internal_server
            .tcp_nodelay(true)
            .layer(chat_security::authorize(
                INTERNAL_POLICY,
                opts.tls.is_some(),
            ))
            .add_service(
                GatewayDeliveryServer::new(DeliveryApi {
                    sessions: sessions.clone(),
                })
                .max_decoding_message_size(64 << 20),
            );
        let mut servers = Vec::new();
        let stop = shutdown.clone();
        let incoming = paced(
            public,
            opts.limits.accept,
            opts.limits.connections,
            connections,
        );
        servers.push(tokio::spawn(async move {
            if let Err(e) = public_router
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await
            {
                tracing::warn!(error = %e, "gateway public server stopped with an error");
            }
        }));
        let stop = shutdown.clone();
        let incoming = TcpIncoming::from(internal).with_nodelay(Some(true));
        servers.push(tokio::spawn(async move {
            if let Err(e) = internal_router
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await
            {
                tracing::warn!(error = %e, "gateway internal server stopped with an error");
            }
        }));
        tokio::spawn(pool.clone().maintain(shutdown.clone()));
        tokio::spawn(register(
            pool,
            view,
            sessions.clone(),
            opts.internal_advertise,
            opts.lease,
            shutdown.clone(),
        ));
        Ok(Self {
            shutdown,
            admin,
            health,
            servers,
            sessions,
        })
    }

    /// Serves `/metrics`, `/status` and the status page on `listener`
    /// until the gateway stops.
    pub fn serve_admin(&self, listener: TcpListener) {
        tokio::spawn(chat_telemetry::admin::serve(
            listener,
            self.admin.clone(),
            self.shutdown.clone(),
        ));
    }

    pub fn session_count(&self) -> usize {
        self.sessions.count()
    }

    /// `SendStream` streams open on this gateway.
    pub fn send_stream_count(&self) -> u64 {
        self.sessions.send_streams()
    }

    /// Graceful stop: health turns NOT_SERVING, no new calls are taken,
    /// open streams are closed (their clients resume on another gateway)
    /// and in-flight calls finish within `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        chat_resilience::health::set(&self.health, HEALTH_SERVICE, false).await;
        self.shutdown.cancel();
        for s in &mut self.servers {
            if tokio::time::timeout(grace, &mut *s).await.is_err() {
                s.abort();
            }
        }
    }

    /// Abrupt stop: every connection is cut.
    pub fn kill(self) {
        self.shutdown.cancel();
        for s in &self.servers {
            s.abort();
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for s in &self.servers {
            s.abort();
        }
    }
}

/// Least time between two registrations.
const REGISTER_SPACING: Duration = Duration::from_millis(100);
/// Longest time between two registrations; also how soon subscribers hear
/// that the service became degraded or recovered.
const REGISTER_EVERY: Duration = Duration::from_secs(1);
/// How long one registration may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps every router's directory current: the full set of online users,
/// at once when it changes and every second otherwise, with this gateway's
/// counts for the rollout analysis. The routers' answers say what is
/// degraded (subscribers are told when that changes), which release each
/// router runs, and the rollout plan.
async fn register(
    pool: Arc<RouterPool>,
    view: Arc<status::ClusterView>,
    sessions: Arc<Sessions>,
    me: String,
    lease: Duration,
    stop: CancellationToken,
) {
    let lease_ms = lease.as_millis().min(u128::from(u32::MAX)) as u32;
    loop {
        let req = rpb::RegisterSessionsRequest {
            gateway_address: me.clone(),
            user_ids: sessions.users(),
            lease_ms,
            rollout: pool.recorder.report(),
        };
        let calls = pool.all().into_iter().map(|client| {
            let mut c = client;
            let req = req.clone();
            async move { tokio::time::timeout(REGISTER_TIMEOUT, c.register_sessions(req)).await }
        });
        let mut answers = Vec::new();
        for r in futures::future::join_all(calls).await {
            answers.push(match r {
                Ok(Ok(resp)) => Some(resp.into_inner()),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "session registration failed");
                    None
                }
                Err(_) => {
                    tracing::debug!("session registration timed out");
                    None
                }
            });
        }
        pool.learn(&answers);
        view.heard(&answers);
        if let Some(a) = answers.iter().flatten().next() {
            let told = sessions.set_incidents(&a.incidents);
            if told > 0 {
                tracing::info!(events = told, "incident notices changed; subscribers told");
            }
        }
        let degraded: Vec<&Vec<String>> = answers.iter().flatten().map(|a| &a.degraded).collect();
        // Degraded only as far as every router that answered says so: a
        // router that still reaches the store's majority serves normally.
        if let Some(first) = degraded.first() {
            let common: Vec<String> = first
                .iter()
                .filter(|f| degraded.iter().all(|a| a.contains(f)))
                .cloned()
                .collect();
            if sessions.set_degraded(common.clone()) {
                tracing::info!(degraded = ?common, "service status changed; subscribers told");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sessions.changed.notified() => {}
            _ = tokio::time::sleep(REGISTER_EVERY.min(lease / 3)) => {}
        }
        // Changes that come in a burst go out as one registration.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REGISTER_SPACING) => {}
        }
    }
}
