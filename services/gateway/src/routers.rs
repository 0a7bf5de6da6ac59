//! The gateway's client of the routers: any router serves any request, so a
//! call goes to the next router in turn and moves on to another when one is
//! unavailable, with exponential backoff and full jitter, until the call's
//! deadline. Every router call is idempotent (appends carry client message
//! ids), so retrying one whose outcome is unknown never duplicates.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_proto::router::v1::router_client::RouterClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

/// Calls `Router::$method` with `$req` through `$pool`: the next router in
/// turn, another one when it is unavailable.
macro_rules! via_router {
    ($pool:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $pool
            .call(|mut c| {
                let req = req.clone();
                async move { c.$method(req).await }
            })
            .await
    }};
}
pub(crate) use via_router;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

pub struct RouterPool {
    clients: Vec<RouterClient<Channel>>,
    next: AtomicUsize,
    deadline: Duration,
}

/// Whether another router (or a later try) may succeed.
fn retryable(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
        || matches!(s.code(), Code::Unavailable | Code::Cancelled)
}

impl RouterPool {
    pub fn new(addrs: &[String], deadline: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(!addrs.is_empty(), "no router addresses given");
        let clients = addrs
            .iter()
            .map(|a| {
                let ep = Endpoint::from_shared(format!("http://{a}"))?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(1));
                Ok(RouterClient::new(ep.connect_lazy()).max_decoding_message_size(64 << 20))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            clients,
            next: AtomicUsize::new(0),
            deadline,
        })
    }

    pub fn all(&self) -> &[RouterClient<Channel>] {
        &self.clients
    }

    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(RouterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut backoff = BACKOFF_MIN;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let err = match tokio::time::timeout(remaining, f(self.clients[i].clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => s,
                Err(_) => return Err(Status::unavailable("no router answered in time")),
            };
            if !retryable(&err) {
                return Err(err);
            }
            let wait = backoff.mul_f64(rand::random::<f64>());
            backoff = (backoff * 2).min(BACKOFF_MAX);
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(Status::unavailable(format!(
                    "no router could serve the call: {}",
                    err.message()
                )));
            }
            tokio::time::sleep(wait).await;
        }
    }
}
