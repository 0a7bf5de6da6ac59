//! The router's part in staged rollouts of routers: it reads the plan from
//! the store every `REFRESH_EVERY` and hands it to gateways with their
//! session registrations; gateways hand back what they saw of canary and
//! stable routers in the plan's current window. When a window has ended,
//! a stable router judges it from every gateway's report and writes the
//! outcome back with a compare-and-set, so exactly one judgement per
//! window is stored even though every stable router tries.
//!
//! Canary routers never judge: a faulty release must not grade itself.
//!
//! The same loop reads the incident notices operators post, which routers
//! pass on to gateways the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chat_proto::status::v1::{Incident, Incidents};
use chat_rollout::{Histogram, Plan, Report, Window};
use chat_store_client::{StoreClient, StoreError};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// How often the plan is read and a due window judged.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);
/// How long after a window's end its judgement waits for the last reports
/// (gateways report at least every second).
pub const REPORT_GRACE_MS: i64 = 1_000;
/// Reports older than this are from gateways that went away.
const REPORT_TTL: Duration = Duration::from_secs(10);

/// The service whose rollout routers follow.
pub const SERVICE: &str = "router";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub struct Rollout {
    /// This router's release label.
    pub release: String,
    /// The plan and its revision as last read.
    plan: RwLock<Option<(u64, Plan)>>,
    /// Each gateway's latest report.
    reports: Mutex<HashMap<String, (Instant, Report)>>,
    /// Incident notices as last read.
    incidents: RwLock<Vec<Incident>>,
    /// The plan has been read from the store at least once.
    loaded: std::sync::atomic::AtomicBool,
}

/// The setting holding incident notices.
pub const INCIDENTS_KEY: &str = "incidents";

fn merge(into: &mut Window, w: &Window) {
    into.ok += w.ok;
    into.errors += w.errors;
    let mut h = Histogram::from_counts(&into.latency_buckets);
    h.merge(&Histogram::from_counts(&w.latency_buckets));
    into.latency_buckets = h.counts().to_vec();
}

impl Rollout {
    pub fn new(release: String) -> Arc<Self> {
        Arc::new(Self {
            release,
            plan: RwLock::new(None),
            reports: Mutex::new(HashMap::new()),
            incidents: RwLock::new(Vec::new()),
            loaded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the plan has been read since the router started. Until
    /// then the router cannot tell a gateway whether it is a canary with
    /// a plan in force, so it takes no registrations: a gateway that
    /// learnt a canary's label without the plan would send it everyone.
    pub fn loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn incidents(&self) -> Vec<Incident> {
        self.incidents
            .read()
            .expect("rollout lock poisoned")
            .clone()
    }

    pub fn plan(&self) -> Option<(u64, Plan)> {
        self.plan.read().expect("rollout lock poisoned").clone()
    }

    pub fn report(&self, gateway: &str, report: Option<Report>) {
        let Some(r) = report else { return };
        self.reports
            .lock()
            .expect("rollout lock poisoned")
            .insert(gateway.to_owned(), (Instant::now(), r));
    }

    /// Every live gateway's counts for the plan's current window, summed.
    fn window(&self, plan: &Plan) -> (Window, Window, usize) {
        let mut reports = self.reports.lock().expect("rollout lock poisoned");
        reports.retain(|_, (at, _)| at.elapsed() < REPORT_TTL);
        let (mut canary, mut stable, mut n) = (Window::default(), Window::default(), 0);
        for (_, r) in reports.values() {
            if r.plan_id != plan.id || r.check != plan.check {
                continue;
            }
            n += 1;
            merge(&mut canary, r.canary.as_ref().unwrap_or(&Window::default()));
            merge(&mut stable, r.stable.as_ref().unwrap_or(&Window::default()));
        }
        (canary, stable, n)
    }

    async fn refresh(&self, store: &StoreClient) -> Result<(), StoreError> {
        let s = store.get_setting(&chat_rollout::plan_key(SERVICE)).await?;
        let plan = if s.revision == 0 {
            None
        } else {
            match Plan::decode(s.value.as_slice()) {
                Ok(p) => Some((s.revision, p)),
                Err(e) => {
                    tracing::error!(error = %e, "the stored rollout plan does not decode; ignoring it");
                    None
                }
            }
        };
        *self.plan.write().expect("rollout lock poisoned") = plan;
        let s = store.get_setting(INCIDENTS_KEY).await?;
        match Incidents::decode(s.value.as_slice()) {
            Ok(i) => *self.incidents.write().expect("rollout lock poisoned") = i.incidents,
            Err(e) => {
                tracing::error!(error = %e, "the stored incidents do not decode; ignoring them")
            }
        }
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Judges the current window if it is due; writes the new plan.
    async fn judge(&self, store: &StoreClient) -> Result<(), StoreError> {
        let Some((revision, plan)) = self.plan() else {
            return Ok(());
        };
        let now = now_ms();
        if plan.canary == self.release || !chat_rollout::due(&plan, now, REPORT_GRACE_MS) {
            return Ok(());
        }
        let (canary, stable, gateways) = self.window(&plan);
        let Some(next) = chat_rollout::judge(&plan, &canary, &stable, now) else {
            return Ok(());
        };
        let key = chat_rollout::plan_key(SERVICE);
        match store
            .put_setting(&key, next.encode_to_vec(), Some(revision))
            .await
        {
            Ok(s) => {
                if let Some(d) = next.decisions.last() {
                    tracing::info!(
                        plan = %next.id, check = d.check, action = %d.action, weight = d.weight,
                        gateways, reason = %d.reason, "rollout decision"
                    );
                }
                *self.plan.write().expect("rollout lock poisoned") = Some((s.revision, next));
                Ok(())
            }
            // Another router judged this window first.
            Err(StoreError::Conflict(_)) => self.refresh(store).await,
            Err(e) => Err(e),
        }
    }

    /// Follows the plan and judges due windows until `stop`.
    pub async fn run(self: Arc<Self>, store: Arc<StoreClient>, stop: CancellationToken) {
        loop {
            let step = async {
                self.refresh(&store).await?;
                self.judge(&store).await
            };
            if let Err(e) = step.await {
                tracing::debug!(error = %e, "rollout plan not refreshed");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
    }
}

/// Faults a router injects into client traffic, for drills (a release with
/// a bug in its messaging logic).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Share of calls failed with INTERNAL (0 to 1).
    pub error_rate: f64,
    /// Added to every call.
    pub latency: Duration,
}

impl Faults {
    pub fn is_off(&self) -> bool {
        self.error_rate <= 0.0 && self.latency.is_zero()
    }

    /// Waits the added latency, then fails the call at the error rate.
    pub async fn inject(&self) -> Result<(), tonic::Status> {
        if self.is_off() {
            return Ok(());
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.error_rate > 0.0 && rand::random::<f64>() < self.error_rate {
            return Err(tonic::Status::internal(
                "injected fault: this router release fails a share of its calls",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(plan: &str, check: u64, canary_ok: u64) -> Report {
        let mut h = Histogram::default();
        h.record(1_000);
        Report {
            plan_id: plan.into(),
            check,
            canary: Some(Window {
                ok: canary_ok,
                errors: 1,
                latency_buckets: h.counts().to_vec(),
            }),
            stable: Some(Window::default()),
        }
    }

    #[test]
    fn reports_of_the_current_window_from_every_gateway_add_up() {
        let r = Rollout::new("stable".into());
        let plan = Plan {
            id: "p".into(),
            check: 3,
            ..Default::default()
        };
        r.report("gw-1", Some(report("p", 3, 10)));
        r.report("gw-2", Some(report("p", 3, 5)));
        r.report("gw-3", Some(report("p", 2, 100)));
        r.report("gw-4", Some(report("other", 3, 100)));
        r.report("gw-5", None);
        let (canary, _, n) = r.window(&plan);
        assert_eq!((n, canary.ok, canary.errors), (2, 15, 2));
        assert_eq!(Histogram::from_counts(&canary.latency_buckets).total(), 2);
    }

    #[tokio::test]
    async fn injected_faults_fail_about_their_share() {
        let f = Faults {
            error_rate: 0.3,
            latency: Duration::ZERO,
        };
        let mut failed = 0;
        for _ in 0..2_000 {
            if f.inject().await.is_err() {
                failed += 1;
            }
        }
        assert!((450..750).contains(&failed), "{failed} of 2000");
        assert!(Faults::default().inject().await.is_ok());
    }
}
