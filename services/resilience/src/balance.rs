//! Load balancing over interchangeable instances: power of two choices on
//! outstanding requests, with passive outlier ejection.
//!
//! Two instances are drawn at random and the one with fewer calls in flight
//! gets the call, which steers work away from a slow instance without a
//! global view. Instances an active health check marked down are skipped
//! while any other is up. An instance whose calls fail (connection refused, reset,
//! UNAVAILABLE) `CONSECUTIVE_FAILURES` times in a row is ejected for a
//! period that doubles with each ejection, up to `MAX_EJECTION`; it comes
//! back by itself afterwards, and its first successes shorten the next
//! ejection again. Never more than half of the instances are ejected at
//! once: past that point the failures are more likely the caller's or the
//! network's than the instances', and ejecting more would only concentrate
//! load.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Failures in a row that eject an instance.
pub const CONSECUTIVE_FAILURES: u32 = 5;
/// First ejection; each further one doubles it.
pub const BASE_EJECTION: Duration = Duration::from_secs(1);
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

struct Instance {
    /// The last active health check's verdict.
    up: AtomicBool,
    outstanding: AtomicUsize,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the balancer's start; 0: not ejected.
    ejected_until: AtomicU64,
}

pub struct Balancer {
    start: Instant,
    instances: Vec<Instance>,
}

/// A call in flight on one instance; dropping it ends the call.
pub struct InFlight {
    balancer: Arc<Balancer>,
    index: usize,
}

impl InFlight {
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.balancer.instances[self.index]
            .outstanding
            .fetch_sub(1, Relaxed);
    }
}

impl Balancer {
    pub fn new(instances: usize) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            instances: (0..instances.max(1))
                .map(|_| Instance {
                    up: AtomicBool::new(true),
                    outstanding: AtomicUsize::new(0),
                    failures: AtomicU32::new(0),
                    ejections: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                })
                .collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64 + 1
    }

    fn ejected(&self, i: usize, now_ms: u64) -> bool {
        self.instances[i].ejected_until.load(Relaxed) > now_ms
    }

    /// Instances currently ejected.
    pub fn ejected_count(&self, now: Instant) -> usize {
        let now_ms = self.ms(now);
        (0..self.len()).filter(|&i| self.ejected(i, now_ms)).count()
    }

    /// Whether instance `i` is ejected now.
    pub fn is_ejected(&self, i: usize, now: Instant) -> bool {
        self.ejected(i, self.ms(now))
    }

    /// Records an active health check's verdict on instance `i`.
    /// Whether `i` answered its last health check and is not ejected.
    pub fn is_available(&self, i: usize, now: Instant) -> bool {
        self.instances[i].up.load(Relaxed) && !self.ejected(i, self.ms(now))
    }

    pub fn set_up(&self, i: usize, up: bool) {
        if self.instances[i].up.swap(up, Relaxed) != up {
            tracing::info!(instance = i, up, "health check verdict changed");
        }
    }

    /// Chooses an instance for a call: the less busy of two drawn at random
    /// among those up and not ejected (among those not ejected when none is
    /// up, among all when every one is ejected).
    pub fn pick(&self, now: Instant) -> usize {
        self.pick_in(now, None)
    }

    /// Like [`Balancer::pick`], among `allowed` instances only (all when
    /// `None`; an empty list is taken as all).
    pub fn pick_in(&self, now: Instant, allowed: Option<&[usize]>) -> usize {
        let now_ms = self.ms(now);
        let all: Vec<usize>;
        let allowed = match allowed {
            Some(a) if !a.is_empty() => a,
            _ => {
                all = (0..self.len()).collect();
                &all
            }
        };
        let live: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|&i| !self.ejected(i, now_ms))
            .collect();
        let up: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| self.instances[i].up.load(Relaxed))
            .collect();
        let pool: Vec<usize> = if !up.is_empty() {
            up
        } else if !live.is_empty() {
            live
        } else {
            allowed.to_vec()
        };
        if pool.len() == 1 {
            return pool[0];
        }
        let a = rand::random_range(0..pool.len());
        let mut b = rand::random_range(0..pool.len() - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (pool[a], pool[b]);
        let load = |i: usize| self.instances[i].outstanding.load(Relaxed);
        if load(b) < load(a) { b } else { a }
    }

    /// Starts a call on `i`.
    pub fn start(self: &Arc<Self>, i: usize) -> InFlight {
        self.instances[i].outstanding.fetch_add(1, Relaxed);
        InFlight {
            balancer: self.clone(),
            index: i,
        }
    }

    /// The instance answered (whatever the answer, it is alive).
    pub fn success(&self, i: usize) {
        let inst = &self.instances[i];
        inst.failures.store(0, Relaxed);
        let _ = inst
            .ejections
            .fetch_update(Relaxed, Relaxed, |e| e.checked_sub(1));
    }

    /// The instance could not be reached or said it is unavailable. Returns
    /// whether this failure ejected it.
    pub fn failure(&self, i: usize, now: Instant) -> bool {
        let inst = &self.instances[i];
        let failures = inst.failures.fetch_add(1, Relaxed) + 1;
        let now_ms = self.ms(now);
        if failures < CONSECUTIVE_FAILURES || self.ejected(i, now_ms) {
            return false;
        }
        if (self.ejected_count(now) + 1) * 2 > self.len() {
            return false;
        }
        let ejections = inst.ejections.fetch_add(1, Relaxed);
        let period = BASE_EJECTION
            .saturating_mul(1 << ejections.min(16))
            .min(MAX_EJECTION);
        inst.ejected_until
            .store(now_ms + period.as_millis() as u64, Relaxed);
        inst.failures.store(0, Relaxed);
        tracing::warn!(
            instance = i,
            ejected_for_ms = period.as_millis() as u64,
            "instance ejected after consecutive failures"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail_n(b: &Balancer, i: usize, n: u32, now: Instant) -> bool {
        let mut ejected = false;
        for _ in 0..n {
            ejected |= b.failure(i, now);
        }
        ejected
    }

    #[test]
    fn the_less_busy_of_two_gets_the_call() {
        let b = Balancer::new(2);
        let now = Instant::now();
        let _busy: Vec<_> = (0..3).map(|_| b.start(0)).collect();
        for _ in 0..50 {
            assert_eq!(b.pick(now), 1);
        }
        drop(_busy);
        let mut seen = [0; 2];
        for _ in 0..200 {
            seen[b.pick(now)] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "idle instances share: {seen:?}");
    }

    #[test]
    fn a_failing_instance_is_ejected_then_returns_and_backs_off_longer() {
        let b = Balancer::new(4);
        let t0 = Instant::now();
        assert!(!fail_n(&b, 2, CONSECUTIVE_FAILURES - 1, t0));
        b.success(2);
        assert!(
            !fail_n(&b, 2, CONSECUTIVE_FAILURES - 1, t0),
            "a success resets the count"
        );
        assert!(b.failure(2, t0));
        assert!(b.is_ejected(2, t0));
        for _ in 0..100 {
            assert_ne!(b.pick(t0), 2);
        }
        // Back after the first period.
        let t1 = t0 + BASE_EJECTION + Duration::from_millis(5);
        assert!(!b.is_ejected(2, t1));
        // Still failing: ejected again, for twice as long.
        assert!(fail_n(&b, 2, CONSECUTIVE_FAILURES, t1));
        assert!(b.is_ejected(2, t1 + BASE_EJECTION * 2 - Duration::from_millis(10)));
        assert!(!b.is_ejected(2, t1 + BASE_EJECTION * 2 + Duration::from_millis(10)));
    }

    #[test]
    fn instances_marked_down_are_skipped_while_another_is_up() {
        let b = Balancer::new(3);
        let now = Instant::now();
        b.set_up(0, false);
        b.set_up(1, false);
        for _ in 0..50 {
            assert_eq!(b.pick(now), 2);
        }
        b.set_up(2, false);
        let picked: std::collections::HashSet<usize> = (0..100).map(|_| b.pick(now)).collect();
        assert_eq!(picked.len(), 3, "all down: the checks may be what is wrong");
        b.set_up(1, true);
        assert_eq!(b.pick(now), 1);
    }

    #[test]
    fn never_more_than_half_are_ejected() {
        let b = Balancer::new(4);
        let now = Instant::now();
        assert!(fail_n(&b, 0, CONSECUTIVE_FAILURES, now));
        assert!(fail_n(&b, 1, CONSECUTIVE_FAILURES, now));
        assert!(!fail_n(&b, 2, CONSECUTIVE_FAILURES * 3, now));
        assert_eq!(b.ejected_count(now), 2);
        let two = Balancer::new(2);
        assert!(fail_n(&two, 0, CONSECUTIVE_FAILURES, now));
        assert!(
            !fail_n(&two, 1, CONSECUTIVE_FAILURES, now),
            "the last one stays"
        );
        assert_eq!(two.pick(now), 1);
    }
}
