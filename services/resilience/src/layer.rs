//! The admission layer every server puts in front of its services.
//!
//! It sees each request's head before the body is decoded, so refusing is
//! cheap: the caller's `grpc-timeout` becomes a [`Deadline`] extension,
//! then the service's [`Admit`] policy decides (rate limits, credentials,
//! the concurrency limit by criticality) and either answers at once with a
//! well-formed gRPC status or passes the request on, holding a concurrency
//! [`Permit`] until the response is ready. Only successful responses feed
//! the limiter's latency samples; failures just free their place.
//!
//! Every response, refusals and health checks included, carries the
//! server's identity (`chat-version`, `chat-release`) when one is set.
//!
//! With [`AdmitLayer::with_load_signal`], every successful response also
//! says whether the server is near its limit or has refused any call for
//! overload lately (`chat-load: busy`) or neither (`ok`), so a client whose
//! throttle is holding back calls learns at once that the server has
//! recovered instead of waiting out its own memory of the refusals.
//!
//! [`Deadline`]: crate::deadline::Deadline

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::deadline;
use crate::limit::Permit;

/// A service's admission policy.
pub trait Admit: Send + Sync + 'static {
    /// Decides on a request from its head, and may attach extensions (the
    /// authenticated user). `Ok(None)`: admitted without a concurrency
    /// permit (long-lived streams, health checks).
    fn admit(&self, parts: &mut http::request::Parts) -> Result<Option<Permit>, tonic::Status>;

    /// Whether the service is working near its limit (for the load signal:
    /// `busy` while it is).
    fn busy(&self) -> bool {
        false
    }
}

/// Response header with the server's build version.
pub const VERSION_HEADER: &str = "chat-version";
/// Response header with the server's release label.
pub const RELEASE_HEADER: &str = "chat-release";

type Identity = Arc<Vec<(http::HeaderName, http::HeaderValue)>>;

/// Response header of [`LoadSignal`].
pub const LOAD_HEADER: &str = "chat-load";

/// How long after its last refusal for overload a server still says
/// `busy`. After an outage it says `ok` this soon after it stopped
/// refusing (and its queues drained). Under a real overload the clients'
/// throttles may leave it few calls to refuse, but it works near its
/// limit ([`Admit::busy`]), so it says `busy` all along.
const SHEDDING_FOR: Duration = Duration::from_millis(100);

/// When the server last refused a call for overload (RESOURCE_EXHAUSTED
/// that is not a caller's own limit, see [`crate::over_limit`]), whoever
/// refused it: the admission policy, the service, or a backend whose
/// refusal the service passed on.
pub struct LoadSignal {
    start: Instant,
    /// Milliseconds since `start` of the last refusal, + 1; 0: never.
    last: AtomicU64,
}

impl LoadSignal {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64 + 1
    }

    pub fn refused_at(&self, now: Instant) {
        self.last.fetch_max(self.ms(now), Ordering::Relaxed);
    }

    /// Whether a call was refused for overload within [`SHEDDING_FOR`].
    pub fn shedding_at(&self, now: Instant) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        last != 0 && self.ms(now) < last + SHEDDING_FOR.as_millis() as u64
    }

    fn observe<B>(&self, resp: &mut http::Response<B>, busy: bool) {
        let now = Instant::now();
        let h = resp.headers();
        match h.get("grpc-status") {
            Some(v) if v.as_bytes() == b"8" => {
                if !h.contains_key(crate::LIMIT_HEADER) {
                    self.refused_at(now);
                }
            }
            Some(v) if v.as_bytes() != b"0" => {}
            _ => {
                let v = if busy || self.shedding_at(now) {
                    "busy"
                } else {
                    "ok"
                };
                resp.headers_mut().insert(
                    http::HeaderName::from_static(LOAD_HEADER),
                    http::HeaderValue::from_static(v),
                );
            }
        }
    }
}

impl Default for LoadSignal {
    fn default() -> Self {
        Self::new()
    }
}

pub struct AdmitLayer<P> {
    policy: Arc<P>,
    identity: Identity,
    load: Option<Arc<LoadSignal>>,
}

impl<P> AdmitLayer<P> {
    pub fn new(policy: Arc<P>) -> Self {
        Self {
            policy,
            identity: Arc::default(),
            load: None,
        }
    }

    /// Says on every successful response whether this server has refused
    /// calls for overload lately (`chat-load`); for the public edge, whose
    /// clients throttle themselves.
    /// `load` is shared with the service, which may report refusals of its
    /// own and say the same on streams.
    pub fn with_load_signal(mut self, load: Arc<LoadSignal>) -> Self {
        self.load = Some(load);
        self
    }

    /// Stamps every response with this build version and release label
    /// (values that are not valid header values are left out).
    pub fn with_identity(mut self, version: &str, release: &str) -> Self {
        let pairs = [(VERSION_HEADER, version), (RELEASE_HEADER, release)]
            .into_iter()
            .filter_map(|(k, v)| Some((http::HeaderName::from_static(k), v.parse().ok()?)))
            .collect();
        self.identity = Arc::new(pairs);
        self
    }
}

impl<P> Clone for AdmitLayer<P> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            identity: self.identity.clone(),
            load: self.load.clone(),
        }
    }
}

impl<S, P> tower_layer::Layer<S> for AdmitLayer<P> {
    type Service = Admitted<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Admitted {
            inner,
            policy: self.policy.clone(),
            identity: self.identity.clone(),
            load: self.load.clone(),
        }
    }
}

pub struct Admitted<S, P> {
    inner: S,
    policy: Arc<P>,
    identity: Identity,
    load: Option<Arc<LoadSignal>>,
}

impl<S: Clone, P> Clone for Admitted<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            identity: self.identity.clone(),
            load: self.load.clone(),
        }
    }
}

fn stamp<B, P: Admit>(
    mut resp: http::Response<B>,
    identity: &Identity,
    load: Option<(&LoadSignal, &P)>,
) -> http::Response<B> {
    for (k, v) in identity.iter() {
        resp.headers_mut().insert(k.clone(), v.clone());
    }
    if let Some((l, policy)) = load {
        l.observe(&mut resp, policy.busy());
    }
    resp
}

/// Whether a response head says the call succeeded (a unary error comes
/// back trailers-only, with `grpc-status` in the head).
fn succeeded<B>(resp: &http::Response<B>) -> bool {
    resp.headers()
        .get("grpc-status")
        .is_none_or(|v| v.as_bytes() == b"0")
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, P, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Admitted<S, P>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    P: Admit,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        if let Some(d) = deadline::from_headers(&parts.headers, Instant::now()) {
            parts.extensions.insert(d);
        }
        let identity = self.identity.clone();
        let load = self.load.clone();
        let policy = self.policy.clone();
        match self.policy.admit(&mut parts) {
            Err(status) => Box::pin(std::future::ready(Ok(stamp(
                status.into_http(),
                &identity,
                load.as_deref().map(|l| (l, &*policy)),
            )))),
            Ok(permit) => {
                let fut = self.inner.call(http::Request::from_parts(parts, body));
                Box::pin(async move {
                    let resp = fut.await?;
                    if let Some(p) = permit
                        && succeeded(&resp)
                    {
                        p.success();
                    }
                    Ok(stamp(
                        resp,
                        &identity,
                        load.as_deref().map(|l| (l, &*policy)),
                    ))
                })
            }
        }
    }
}

/// The gRPC method of a request path (`/pkg.Service/Method` → `Method`).
pub fn method(parts: &http::request::Parts) -> &str {
    parts.uri.path().rsplit('/').next().unwrap_or("")
}

/// The client's IP, as the server saw the connection (plaintext or TLS).
pub fn peer_ip(parts: &http::request::Parts) -> Option<std::net::IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = &parts.extensions;
    ext.get::<TcpConnectInfo>()
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(|t| t.get_ref())
        })
        .and_then(|i| i.remote_addr())
        .map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Criticality;
    use crate::limit::{LimitConfig, Limiter};
    use std::convert::Infallible;
    use tower_layer::Layer;
    use tower_service::Service;

    /// Refuses `Typing`, limits everything else.
    struct Policy(Arc<Limiter>);

    impl Admit for Policy {
        fn admit(&self, parts: &mut http::request::Parts) -> Result<Option<Permit>, tonic::Status> {
            if method(parts) == "Typing" {
                return Err(tonic::Status::unavailable("typing is off"));
            }
            if method(parts) == "Flood" {
                return Err(crate::over_limit("too many", Duration::from_secs(1)));
            }
            self.0
                .try_acquire(Criticality::Critical)
                .map(Some)
                .map_err(|_| tonic::Status::resource_exhausted("busy"))
        }

        fn busy(&self) -> bool {
            self.0.inflight() * 2 >= self.0.limit()
        }
    }

    #[derive(Clone)]
    struct Echo;

    impl Service<http::Request<()>> for Echo {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let d = req.extensions().get::<deadline::Deadline>().is_some();
            std::future::ready(Ok(http::Response::new(format!("deadline={d}"))))
        }
    }

    fn request(path: &str, timeout: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri(path);
        if let Some(t) = timeout {
            b = b.header("grpc-timeout", t);
        }
        b.body(()).unwrap()
    }

    #[tokio::test]
    async fn refusals_are_grpc_statuses_and_admitted_calls_carry_their_deadline() {
        let limiter = Limiter::new(LimitConfig {
            initial: 1,
            min: 1,
            ..LimitConfig::default()
        });
        let mut svc = AdmitLayer::new(Arc::new(Policy(limiter.clone())))
            .with_identity("1.2.3", "canary")
            .layer(Echo);
        let resp = svc.call(request("/x.Y/Typing", None)).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()[RELEASE_HEADER], "canary");
        let resp = svc.call(request("/x.Y/Send", Some("200m"))).await.unwrap();
        assert_eq!(resp.body(), "deadline=true");
        assert_eq!(resp.headers()[VERSION_HEADER], "1.2.3");
        assert_eq!(
            limiter.inflight(),
            0,
            "the permit is released with the response"
        );
        let held = limiter.try_acquire(Criticality::Critical).unwrap();
        let resp = svc.call(request("/x.Y/Send", None)).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "8");
        drop(held);
        assert!(
            !resp.headers().contains_key(LOAD_HEADER),
            "no load signal unless asked for"
        );
    }

    #[tokio::test]
    async fn successes_say_whether_the_server_is_busy() {
        let limiter = Limiter::new(LimitConfig {
            initial: 2,
            min: 2,
            ..LimitConfig::default()
        });
        let mut svc = AdmitLayer::new(Arc::new(Policy(limiter.clone())))
            .with_load_signal(Arc::new(LoadSignal::new()))
            .layer(Echo);
        let load = |r: &http::Response<String>| r.headers()[LOAD_HEADER].clone();
        let resp = svc.call(request("/x.Y/Send", None)).await.unwrap();
        assert_eq!(load(&resp), "ok");
        // Near its limit: busy, although it refused nothing.
        let held = limiter.try_acquire(Criticality::Critical).unwrap();
        let resp = svc.call(request("/x.Y/Send", None)).await.unwrap();
        assert_eq!(load(&resp), "busy");
        drop(held);
        // A caller over its own limit does not make the server busy.
        let resp = svc.call(request("/x.Y/Flood", None)).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "8");
        let resp = svc.call(request("/x.Y/Send", None)).await.unwrap();
        assert_eq!(load(&resp), "ok");
        // A refusal for overload does, for a moment after it.
        let held = [(); 2].map(|_| limiter.try_acquire(Criticality::Critical).unwrap());
        let resp = svc.call(request("/x.Y/Send", None)).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "8");
        drop(held);
        let resp = svc.call(request("/x.Y/Send", None)).await.unwrap();
        assert_eq!(load(&resp), "busy");
    }

    #[test]
    fn the_load_signal_says_shedding_for_a_short_while_after_a_refusal() {
        let l = LoadSignal::new();
        let t0 = Instant::now();
        assert!(!l.shedding_at(t0), "nothing refused yet");
        l.refused_at(t0 + Duration::from_secs(1));
        assert!(l.shedding_at(t0 + Duration::from_millis(1_050)));
        assert!(!l.shedding_at(t0 + Duration::from_millis(1_150)));
        // An older refusal seen late does not move the mark back.
        l.refused_at(t0);
        assert!(l.shedding_at(t0 + Duration::from_millis(1_050)));
    }
}
