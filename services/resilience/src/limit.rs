//! Adaptive concurrency limit, in the style of Netflix's Gradient2.
//!
//! The limit is how many requests may be in flight at once. It follows the
//! ratio of a long-term RTT (the latency the service has when it is not
//! queueing) to the current RTT: while the current RTT stays within
//! `tolerance` of the long-term one the limit grows by about its square
//! root per update; when requests start to queue, the RTT rises and the
//! limit shrinks in proportion (by at most half per update). The long-term
//! RTT falls quickly and rises slowly, so a sustained overload does not
//! teach the limiter that queueing is normal.
//!
//! Samples are summed in atomics; the limit is recomputed at most once per
//! `interval` by whichever request finds the update lock free, so the hot
//! path never waits on a lock.
//!
//! Shedding order: a request of criticality `c` is admitted only while the
//! requests in flight are below `c`'s share of the limit: all of it for
//! critical, three quarters for normal, half for sheddable. As load rises,
//! sheddable requests are refused first, then normal ones, and critical
//! ones only when the whole limit is in use.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Criticality;

#[derive(Clone, Copy, Debug)]
pub struct LimitConfig {
    pub initial: usize,
    pub min: usize,
    pub max: usize,
    /// How much the RTT may exceed the long-term RTT before the limit falls.
    pub tolerance: f64,
    /// Weight of each update's new value.
    pub smoothing: f64,
    /// Least time between two updates.
    pub interval: Duration,
    /// Samples needed before an update.
    pub min_samples: u64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            initial: 256,
            min: 32,
            max: 4_096,
            tolerance: 2.0,
            smoothing: 0.3,
            interval: Duration::from_millis(100),
            min_samples: 10,
        }
    }
}

/// Share of the limit each criticality may use, in percent.
pub fn share(c: Criticality) -> usize {
    match c {
        Criticality::Critical => 100,
        Criticality::Normal => 75,
        Criticality::Sheddable => 50,
    }
}

struct Estimate {
    limit: f64,
    /// Seconds; 0 until the first update.
    long_rtt: f64,
    last_update: Instant,
}

/// Refused: the limit and what was in flight when the request came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub limit: usize,
    pub inflight: usize,
    pub criticality: Criticality,
}

pub struct Limiter {
    cfg: LimitConfig,
    limit: AtomicUsize,
    inflight: AtomicUsize,
    rtt_sum_us: AtomicU64,
    rtt_count: AtomicU64,
    max_inflight: AtomicUsize,
    estimate: Mutex<Estimate>,
    /// Requests refused, by criticality (index: `Criticality as usize`).
    rejected: [AtomicU64; 3],
}

/// A request in flight. `success` records its latency; dropping it
/// without (cancelled, failed) only frees its place.
pub struct Permit {
    limiter: Arc<Limiter>,
    start: Instant,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("start", &self.start)
            .finish()
    }
}

impl Permit {
    pub fn success(self) {
        self.success_at(Instant::now());
    }

    pub fn success_at(self, now: Instant) {
        self.limiter
            .sample(now.saturating_duration_since(self.start), now);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.inflight.fetch_sub(1, Relaxed);
    }
}

impl Limiter {
    pub fn new(cfg: LimitConfig) -> Arc<Self> {
        let initial = cfg.initial.clamp(cfg.min, cfg.max);
        Arc::new(Self {
            cfg,
            limit: AtomicUsize::new(initial),
            inflight: AtomicUsize::new(0),
            rtt_sum_us: AtomicU64::new(0),
            rtt_count: AtomicU64::new(0),
            max_inflight: AtomicUsize::new(0),
            estimate: Mutex::new(Estimate {
                limit: initial as f64,
                long_rtt: 0.0,
                last_update: Instant::now(),
            }),
            rejected: Default::default(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Relaxed)
    }

    /// `<prefix>_concurrency_limit`, `<prefix>_inflight_calls` and
    /// `<prefix>_shed_total{criticality}`.
    pub fn render_metrics(&self, page: &mut chat_telemetry::metrics::Page, prefix: &str) {
        page.single(
            &format!("{prefix}_concurrency_limit"),
            chat_telemetry::metrics::Kind::Gauge,
            "The adaptive concurrency limit now.",
            self.limit() as f64,
        );
        page.single(
            &format!("{prefix}_inflight_calls"),
            chat_telemetry::metrics::Kind::Gauge,
            "Calls holding a place under the limit.",
            self.inflight() as f64,
        );
        let shed = format!("{prefix}_shed_total");
        page.family(
            &shed,
            chat_telemetry::metrics::Kind::Counter,
            "Calls refused by the concurrency limit, by criticality.",
        );
        for c in [
            Criticality::Critical,
            Criticality::Normal,
            Criticality::Sheddable,
        ] {
            page.sample(
                &shed,
                &[("criticality", c.as_str())],
                self.rejected(c) as f64,
            );
        }
    }

    pub fn rejected(&self, c: Criticality) -> u64 {
        self.rejected[c as usize].load(Relaxed)
    }

    /// Admits a request of criticality `c` if its share of the limit has
    /// room.
    pub fn try_acquire(self: &Arc<Self>, c: Criticality) -> Result<Permit, Rejected> {
        self.try_acquire_at(c, Instant::now())
    }

    pub fn try_acquire_at(
        self: &Arc<Self>,
        c: Criticality,
        now: Instant,
    ) -> Result<Permit, Rejected> {
        let limit = self.limit();
        let cap = (limit * share(c)).div_ceil(100).max(1);
        let mut cur = self.inflight.load(Relaxed);
        loop {
            if cur >= cap {
                self.rejected[c as usize].fetch_add(1, Relaxed);
                return Err(Rejected {
                    limit,
                    inflight: cur,
                    criticality: c,
                });
            }
            match self
                .inflight
                .compare_exchange_weak(cur, cur + 1, Relaxed, Relaxed)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.max_inflight.fetch_max(cur + 1, Relaxed);
        Ok(Permit {
            limiter: self.clone(),
            start: now,
        })
    }

    fn sample(&self, rtt: Duration, now: Instant) {
        self.rtt_sum_us
            .fetch_add(rtt.as_micros().max(1) as u64, Relaxed);
        self.rtt_count.fetch_add(1, Relaxed);
        let Ok(mut est) = self.estimate.try_lock() else {
            return;
        };
        if now.saturating_duration_since(est.last_update) < self.cfg.interval
            || self.rtt_count.load(Relaxed) < self.cfg.min_samples
        {
            return;
        }
        let count = self.rtt_count.swap(0, Relaxed).max(1);
        let sum = self.rtt_sum_us.swap(0, Relaxed);
        let busiest = self.max_inflight.swap(self.inflight(), Relaxed);
        est.last_update = now;
        let short = sum as f64 / count as f64 / 1e6;
        self.update(&mut est, short, busiest);
    }

    fn update(&self, est: &mut Estimate, short: f64, busiest: usize) {
        if est.long_rtt == 0.0 {
            est.long_rtt = short;
        } else if short < est.long_rtt {
            est.long_rtt += (short - est.long_rtt) * 0.2;
        } else {
            est.long_rtt += (short - est.long_rtt) * 0.01;
        }
        let gradient = (self.cfg.tolerance * est.long_rtt / short).clamp(0.5, 1.0);
        let queue = est.limit.sqrt().max(4.0);
        let mut next = est.limit * gradient + queue;
        // Only move a limit that is being used: a service using less than
        // half of it learns nothing about how much more it could take, and
        // nothing that calls for less either. Its RTT then varies with the
        // mix of calls (a history read is ten times faster than a synced
        // send) and with stalls downstream, not with queueing here; a limit
        // that followed it drifted to its floor at a tenth of capacity and
        // refused sends during a 0.6 s store election.
        if (busiest as f64) < est.limit / 2.0 {
            next = est.limit;
        }
        est.limit = (est.limit * (1.0 - self.cfg.smoothing) + next * self.cfg.smoothing)
            .clamp(self.cfg.min as f64, self.cfg.max as f64);
        self.limit.store(est.limit.round() as usize, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(initial: usize) -> Arc<Limiter> {
        Limiter::new(LimitConfig {
            initial,
            min: 4,
            max: 1_000,
            interval: Duration::from_millis(50),
            min_samples: 1,
            ..LimitConfig::default()
        })
    }

    /// One update's worth of samples at `rtt`, with `busy` in flight.
    fn round(l: &Arc<Limiter>, busy: usize, rtt: Duration, now: &mut Instant) {
        let permits: Vec<_> = (0..busy)
            .filter_map(|_| l.try_acquire_at(Criticality::Critical, *now).ok())
            .collect();
        *now += rtt;
        for p in permits {
            p.success_at(*now);
        }
        *now += Duration::from_millis(100);
    }

    #[test]
    fn sheddable_goes_first_then_normal_then_critical() {
        let l = limiter(100);
        let mut held = Vec::new();
        for _ in 0..50 {
            held.push(l.try_acquire(Criticality::Critical).unwrap());
        }
        assert!(
            l.try_acquire(Criticality::Sheddable).is_err(),
            "half the limit in use"
        );
        assert!(l.try_acquire(Criticality::Normal).is_ok());
        for _ in 0..25 {
            held.push(l.try_acquire(Criticality::Critical).unwrap());
        }
        let r = l.try_acquire(Criticality::Normal).unwrap_err();
        assert_eq!((r.limit, r.criticality), (100, Criticality::Normal));
        while held.len() < 100 {
            held.push(l.try_acquire(Criticality::Critical).unwrap());
        }
        assert!(
            l.try_acquire(Criticality::Critical).is_err(),
            "the whole limit in use"
        );
        assert_eq!(l.rejected(Criticality::Sheddable), 1);
        assert_eq!(l.rejected(Criticality::Normal), 1);
        assert_eq!(l.rejected(Criticality::Critical), 1);
        held.clear();
        assert_eq!(l.inflight(), 0);
        assert!(l.try_acquire(Criticality::Sheddable).is_ok());
    }

    #[test]
    fn rising_latency_shrinks_the_limit_and_recovery_grows_it_back() {
        let l = limiter(100);
        let mut now = Instant::now();
        for _ in 0..5 {
            round(&l, 90, Duration::from_millis(10), &mut now);
        }
        let steady = l.limit();
        assert!(steady >= 100, "no queueing, well used: {steady}");
        // Queueing: the RTT is five times the baseline.
        for _ in 0..10 {
            round(&l, 80, Duration::from_millis(50), &mut now);
        }
        let congested = l.limit();
        assert!(congested < steady / 2, "{steady} -> {congested}");
        // The queue drains; the limit grows back.
        for _ in 0..40 {
            let busy = l.limit().min(1_000) * 9 / 10;
            round(&l, busy, Duration::from_millis(10), &mut now);
        }
        assert!(l.limit() > congested * 2, "{congested} -> {}", l.limit());
    }

    #[test]
    fn a_lightly_used_limit_does_not_drift_down_on_a_mix_of_latencies() {
        let l = limiter(100);
        let mut now = Instant::now();
        // Fast reads teach a low long-term RTT; then slower sends and a
        // stall downstream, all with a tenth of the limit in use.
        for _ in 0..20 {
            round(&l, 10, Duration::from_millis(1), &mut now);
        }
        for _ in 0..20 {
            round(&l, 10, Duration::from_millis(20), &mut now);
        }
        round(&l, 30, Duration::from_millis(600), &mut now);
        assert_eq!(l.limit(), 100);
    }

    #[test]
    fn an_idle_service_does_not_grow_its_limit() {
        let l = limiter(100);
        let mut now = Instant::now();
        for _ in 0..50 {
            round(&l, 5, Duration::from_millis(10), &mut now);
        }
        assert!(l.limit() <= 100, "{}", l.limit());
    }
}
