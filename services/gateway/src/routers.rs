//! The gateway's client of the routers. Any router serves any request, so
//! each call goes to the less busy of two routers drawn at random (power of
//! two choices on calls in flight), skipping routers ejected after
//! consecutive failures ([`chat_resilience::balance`]).
//!
//! A call carries its criticality (`x-criticality`, so the router sheds in
//! the gateway's order) and a `grpc-timeout` no later than its caller's
//! deadline. A call that fails because a router is unreachable or
//! unavailable moves on to another, with exponential backoff and full
//! jitter, while the retry budget allows (about 20 % extra load at most)
//! and the deadline has not passed. A refusal that carries a
//! `retry-after-ms` hint (the router is shedding load, or the store has no
//! quorum) is never retried here: it goes back to the client, who was told
//! when to come back. Every router call is idempotent (appends carry client
//! message ids), so retrying one whose outcome is unknown never duplicates.
//!
//! Staged rollouts: every router says its release label when the gateway
//! registers its sessions, and the answer carries the router rollout plan
//! from the store. While a plan exists, each user's calls go to the canary
//! routers or to the others by the plan's sticky hash of the user
//! ([`chat_rollout::is_canary`]), falling back to any router when the
//! chosen side has none available; the outcome and latency of every call
//! are counted per side for the routers' analysis.
//!
//! Router addresses are configured as host:port. Names are resolved again
//! every `RESOLVE_EVERY`, and a router's connection moves when its address
//! changes; a failed lookup keeps the last address that resolved, so a DNS
//! outage does not empty the pool (the connection to a router that is
//! still there keeps working).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chat_proto::router::v1::router_client::RouterClient;
use chat_resilience::balance::Balancer;
use chat_resilience::deadline::{Deadline, budget};
use chat_resilience::retry::{Backoff, RetryBudget};
use chat_resilience::{Criticality, retry_after};
use chat_rollout::{Lane, Plan, Recorder};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// Calls `Router::$method` with `$req` through `$pool`, as a call of
/// criticality `$crit` on behalf of a caller with deadline `$deadline`
/// (critical, the pool's own deadline only, when omitted).
/// for user `$user`.
macro_rules! via_router {
    ($pool:expr, $user:expr, $method:ident, $req:expr) => {
        via_router!(
            $pool,
            $user,
            $method,
            $req,
            chat_resilience::Criticality::Critical,
            None
        )
    };
    ($pool:expr, $user:expr, $method:ident, $req:expr, $crit:expr, $deadline:expr) => {{
        let req = $req;
        let lane = $pool.lane_of($user);
        $pool
            .call(lane, 1, $crit, $deadline, |mut c, timeout| {
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(timeout);
                $crit.stamp(&mut r);
                chat_telemetry::trace::inject(&mut r);
                async move { c.$method(r).await }
            })
            .await
    }};
}
pub(crate) use via_router;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// How often router names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// How often every router's gRPC health is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for one health answer.
const CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// One configured router: its name, the address it last resolved to, and
/// the client connected there.
struct Slot {
    name: String,
    resolved: Option<SocketAddr>,
    channel: Channel,
    client: RouterClient<Channel>,
    /// Release label the router last said it runs.
    release: Option<String>,
}

/// The router rollout plan and its revision, as the routers last said.
type Current = Option<(u64, Plan)>;

pub struct RouterPool {
    slots: Vec<RwLock<Slot>>,
    balancer: Arc<Balancer>,
    budget: RetryBudget,
    deadline: Duration,
    plan: RwLock<Current>,
    /// Calls to canary and stable routers in the plan's current window.
    pub recorder: Recorder,
    tls: Option<Arc<chat_security::Tls>>,
}

/// Whether a failed call counts against the router's release: not client
/// errors, not load shedding, not refusals that say when to come back.
fn fails_release(s: &Status) -> bool {
    match s.code() {
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented => true,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => retry_after(s).is_none(),
        _ => false,
    }
}

/// Whether the router could not be reached or could not serve, so another
/// router (or a later try) may succeed.
fn unreachable(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
        || matches!(s.code(), Code::Unavailable | Code::Cancelled)
}

/// A channel to the router at `addr` (host:port), connected lazily, and
/// a client on it.
fn connect(
    addr: &str,
    tls: Option<&chat_security::Tls>,
) -> anyhow::Result<(Channel, RouterClient<Channel>)> {
    let ep = chat_security::endpoint(tls, addr, chat_security::Role::Router)?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true);
    let channel = ep.connect_lazy();
    let client = RouterClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    Ok((channel, client))
}

impl RouterPool {
    /// `tls`: the gateway's identity for mutual TLS with routers (None:
    /// plaintext).
    pub fn new(
        addrs: &[String],
        deadline: Duration,
        tls: Option<Arc<chat_security::Tls>>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!addrs.is_empty(), "no router addresses given");
        let slots: Vec<_> = addrs
            .iter()
            .map(|a| {
                let (channel, client) = connect(a, tls.as_deref())?;
                Ok(RwLock::new(Slot {
                    name: a.clone(),
                    resolved: a.parse().ok(),
                    channel,
                    client,
                    release: None,
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            balancer: Balancer::new(slots.len()),
            slots,
            budget: RetryBudget::default(),
            deadline,
            plan: RwLock::new(None),
            recorder: Recorder::default(),
            tls,
        })
    }

    /// Takes in every router's registration answer (`None`: it did not
    /// answer): the newest rollout plan any of them passed on first, then
    /// each router's release label, so a canary never gets traffic from a
    /// gateway that knows its label but not yet the plan.
    pub fn learn(&self, answers: &[Option<chat_proto::router::v1::RegisterSessionsResponse>]) {
        let newest = answers
            .iter()
            .flatten()
            .filter_map(|a| a.plan.as_ref().map(|p| (a.plan_revision, p)))
            .max_by_key(|(revision, _)| *revision)
            .map(|(revision, plan)| (revision, plan.clone()));
        if let Some((revision, plan)) = newest {
            let mut held = self.plan.write().expect("router plan lock poisoned");
            if held.as_ref().is_none_or(|(r, _)| *r < revision) {
                if chat_rollout::in_progress(&plan) {
                    self.recorder.window(&plan.id, plan.check);
                } else {
                    self.recorder.window("", 0);
                }
                tracing::info!(
                    plan = %plan.id, canary = %plan.canary, weight = plan.weight,
                    state = chat_rollout::state_name(&plan), "router rollout plan"
                );
                *held = Some((revision, plan));
            }
        }
        for (i, answer) in answers.iter().enumerate() {
            if let Some(a) = answer {
                self.slots[i]
                    .write()
                    .expect("router slot lock poisoned")
                    .release = Some(a.release.clone());
            }
        }
    }

    /// The rollout plan held now.
    pub fn plan(&self) -> Current {
        self.plan.read().expect("router plan lock poisoned").clone()
    }

    /// Which routers `user`'s calls go to.
    pub fn lane_of(&self, user: &str) -> Lane {
        match &*self.plan.read().expect("router plan lock poisoned") {
            None => Lane::Any,
            Some((_, p)) if chat_rollout::is_canary(p, user) => Lane::Canary,
            Some(_) => Lane::Stable,
        }
    }

    /// The side router `i` is on under the current plan.
    fn side_of(&self, i: usize, canary: Option<&str>) -> Lane {
        let Some(canary) = canary else {
            return Lane::Any;
        };
        let slot = self.slots[i].read().expect("router slot lock poisoned");
        match slot.release.as_deref() {
            Some(r) if r == canary => Lane::Canary,
            Some(_) => Lane::Stable,
            None => Lane::Any,
        }
    }

    /// The available routers of `lane`, or `None` for any router (none of
    /// that lane is available). Without a plan, routers whose release is
    /// not known yet (they have not answered a registration) are left out
    /// while others are available.
    fn candidates(&self, lane: Lane) -> (Option<Vec<usize>>, Option<String>) {
        let canary = self
            .plan
            .read()
            .expect("router plan lock poisoned")
            .as_ref()
            .map(|(_, p)| p.canary.clone());
        let now = Instant::now();
        let known = |i: usize| {
            self.slots[i]
                .read()
                .expect("router slot lock poisoned")
                .release
                .is_some()
        };
        let found: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let fits = match lane {
                    Lane::Any => known(i),
                    _ => self.side_of(i, canary.as_deref()) == lane,
                };
                fits && self.balancer.is_available(i, now)
            })
            .collect();
        ((!found.is_empty()).then_some(found), canary)
    }

    fn client(&self, i: usize) -> RouterClient<Channel> {
        self.slots[i]
            .read()
            .expect("router slot lock poisoned")
            .client
            .clone()
    }

    /// A client of every router.
    pub fn all(&self) -> Vec<RouterClient<Channel>> {
        (0..self.slots.len()).map(|i| self.client(i)).collect()
    }

    /// The address router `i` last resolved to.
    pub fn address(&self, i: usize) -> Option<SocketAddr> {
        self.slots[i]
            .read()
            .expect("router slot lock poisoned")
            .resolved
    }

    /// Resolves every router name with `resolve`; a router whose address
    /// changed is reconnected there, one whose lookup failed keeps its last
    /// address.
    pub async fn refresh<F, Fut>(&self, resolve: F)
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
    {
        for slot in &self.slots {
            let name = slot.read().expect("router slot lock poisoned").name.clone();
            let found = match resolve(name.clone()).await {
                Ok(addrs) => addrs.into_iter().next(),
                Err(e) => {
                    tracing::warn!(router = %name, error = %e, "router name did not resolve; keeping its last address");
                    None
                }
            };
            let Some(addr) = found else { continue };
            let mut s = slot.write().expect("router slot lock poisoned");
            if s.resolved == Some(addr) {
                continue;
            }
            match connect(&addr.to_string(), self.tls.as_deref()) {
                Ok((channel, client)) => {
                    tracing::info!(router = %name, address = %addr, "router address changed");
                    s.channel = channel;
                    s.client = client;
                    s.resolved = Some(addr);
                }
                Err(e) => {
                    tracing::warn!(router = %name, error = %e, "cannot connect to the new address")
                }
            }
        }
    }

    /// Asks every router's gRPC health at once; a router that does not
    /// answer SERVING in time is skipped by new calls until it does.
    pub async fn check_health(&self) {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let checks = self.slots.iter().map(|slot| {
            let channel = slot.read().expect("router slot lock poisoned").channel.clone();
            async move {
                let req = HealthCheckRequest {
                    service: crate::ROUTER_HEALTH_SERVICE.into(),
                };
                let answer =
                    tokio::time::timeout(CHECK_TIMEOUT, HealthClient::new(channel).check(req)).await;
                matches!(answer, Ok(Ok(r)) if r.get_ref().status == tonic_health::ServingStatus::Serving as i32)
            }
        });
        for (i, up) in futures::future::join_all(checks)
            .await
            .into_iter()
            .enumerate()
        {
            self.balancer.set_up(i, up);
        }
    }

    /// Checks the routers' health every `CHECK_EVERY` and re-resolves their
    /// names every `RESOLVE_EVERY`, until `stop`.
    pub async fn maintain(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut last_resolve = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            self.check_health().await;
            if last_resolve.elapsed() >= RESOLVE_EVERY {
                last_resolve = Instant::now();
                self.refresh(|name| async move {
                    tokio::net::lookup_host(name).await.map(Iterator::collect)
                })
                .await;
            }
        }
    }

    /// Whether router `i` answers health checks and is not ejected.
    pub fn available(&self, i: usize) -> bool {
        self.balancer.is_available(i, Instant::now())
    }

    pub fn available_count(&self) -> usize {
        (0..self.slots.len()).filter(|&i| self.available(i)).count()
    }

    /// Router `i` as configured (host:port).
    pub fn name(&self, i: usize) -> String {
        self.slots[i]
            .read()
            .expect("router slot lock poisoned")
            .name
            .clone()
    }

    /// Routers ejected now.
    pub fn ejected(&self) -> usize {
        self.balancer.ejected_count(Instant::now())
    }

    /// Runs `f(client, timeout)` on a router of `lane`, moving to another
    /// on failures that another may not have. The call carries `requests`
    /// requests (a batch) for the rollout analysis.
    pub async fn call<T, F, Fut>(
        &self,
        lane: Lane,
        requests: u64,
        criticality: Criticality,
        caller: Option<Deadline>,
        f: F,
    ) -> Result<T, Status>
    where
        F: Fn(RouterClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let allowed = budget(self.deadline, caller);
        // Past the caller's own deadline the caller has given up; past the
        // pool's, the routers are what failed.
        let expired = move || {
            if allowed < self.deadline {
                Status::deadline_exceeded("the caller's deadline passed before a router answered")
            } else {
                Status::unavailable("no router answered in time")
            }
        };
        let deadline = Instant::now() + allowed;
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        self.budget.deposit();
        let (allowed, canary) = self.candidates(lane);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(expired());
            }
            let i = self.balancer.pick_in(Instant::now(), allowed.as_deref());
            let side = self.side_of(i, canary.as_deref());
            let inflight = self.balancer.start(i);
            let started = Instant::now();
            let outcome = tokio::time::timeout(remaining, f(self.client(i), remaining)).await;
            drop(inflight);
            let ok = matches!(&outcome, Ok(Ok(_)))
                || matches!(&outcome, Ok(Err(s)) if !fails_release(s));
            self.recorder.record(side, ok, started.elapsed(), requests);
            let err = match outcome {
                Ok(Ok(r)) => {
                    self.balancer.success(i);
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) => s,
                Err(_) => return Err(expired()),
            };
            if !unreachable(&err) {
                self.balancer.success(i);
                return Err(err);
            }
            if retry_after(&err).is_some() {
                // The router answered: it is alive, and it said when to
                // come back.
                self.balancer.success(i);
                return Err(err);
            }
            self.balancer.failure(i, Instant::now());
            let wait = backoff.next_wait();
            if Instant::now() + wait >= deadline {
                return Err(Status::unavailable(format!(
                    "no router could serve the {criticality} call in time: {}",
                    err.message()
                )));
            }
            if !self.budget.try_withdraw() {
                return Err(Status::unavailable(format!(
                    "router call failed and the retry budget is spent: {}",
                    err.message()
                )));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(r: std::io::Result<&str>) -> std::io::Result<Vec<SocketAddr>> {
        r.map(|a| vec![a.parse().unwrap()])
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_good_address() {
        let pool =
            RouterPool::new(&["router-1.test:7101".into()], Duration::from_secs(1), None).unwrap();
        assert_eq!(pool.address(0), None, "a name, not yet resolved");
        pool.refresh(|_| async { answer(Ok("10.0.0.7:7101")) })
            .await;
        assert_eq!(pool.address(0), Some("10.0.0.7:7101".parse().unwrap()));
        pool.refresh(|_| async { answer(Err(std::io::Error::other("dns server unreachable"))) })
            .await;
        assert_eq!(pool.address(0), Some("10.0.0.7:7101".parse().unwrap()));
        pool.refresh(|_| async { Ok(Vec::new()) }).await;
        assert_eq!(
            pool.address(0),
            Some("10.0.0.7:7101".parse().unwrap()),
            "an empty answer changes nothing"
        );
        pool.refresh(|_| async { answer(Ok("10.0.0.9:7101")) })
            .await;
        assert_eq!(
            pool.address(0),
            Some("10.0.0.9:7101".parse().unwrap()),
            "a moved router is followed"
        );
    }
}
