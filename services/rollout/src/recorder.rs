//! What a gateway counts of its calls to canary and stable routers, per
//! analysis window, without locks on the call path (a read lock that only
//! the once-per-window switch takes for writing).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::histogram::{BUCKETS, bucket};
use crate::{Report, Window};

/// Which routers a call may go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// No rollout: any router.
    Any,
    Stable,
    Canary,
}

struct Side {
    ok: AtomicU64,
    errors: AtomicU64,
    buckets: Vec<AtomicU64>,
}

impl Side {
    fn new() -> Self {
        Self {
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn window(&self) -> Window {
        Window {
            ok: self.ok.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency_buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

struct Counters {
    plan_id: String,
    check: u64,
    canary: Side,
    stable: Side,
}

impl Counters {
    fn new(plan_id: &str, check: u64) -> Arc<Self> {
        Arc::new(Self {
            plan_id: plan_id.to_owned(),
            check,
            canary: Side::new(),
            stable: Side::new(),
        })
    }
}

pub struct Recorder {
    current: RwLock<Arc<Counters>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            current: RwLock::new(Counters::new("", 0)),
        }
    }
}

impl Recorder {
    /// Counts from now on for window `check` of plan `plan_id` (empty: no
    /// rollout), starting from zero when that is a new window.
    pub fn window(&self, plan_id: &str, check: u64) {
        {
            let c = self.current.read().expect("recorder lock poisoned");
            if c.plan_id == plan_id && c.check == check {
                return;
            }
        }
        *self.current.write().expect("recorder lock poisoned") = Counters::new(plan_id, check);
    }

    /// One call's outcome: `ok` unless the router failed it (client errors
    /// and load shedding are not the release's fault and count as ok). A
    /// call carrying `n` requests (a batch of sends) counts `n` times.
    pub fn record(&self, lane: Lane, ok: bool, latency: Duration, n: u64) {
        let c = self.current.read().expect("recorder lock poisoned");
        let side = match lane {
            Lane::Any => return,
            Lane::Canary => &c.canary,
            Lane::Stable => &c.stable,
        };
        if ok {
            side.ok.fetch_add(n, Relaxed);
        } else {
            side.errors.fetch_add(n, Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        side.buckets[bucket(us)].fetch_add(n, Relaxed);
    }

    /// The current window so far (none while no rollout runs).
    pub fn report(&self) -> Option<Report> {
        let c = self.current.read().expect("recorder lock poisoned");
        if c.plan_id.is_empty() {
            return None;
        }
        Some(Report {
            plan_id: c.plan_id.clone(),
            check: c.check,
            canary: Some(c.canary.window()),
            stable: Some(c.stable.window()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_apart_and_start_from_zero() {
        let r = Recorder::default();
        r.record(Lane::Canary, true, Duration::from_millis(1), 1);
        assert!(r.report().is_none(), "no rollout, no report");
        r.window("p1", 1);
        r.record(Lane::Canary, true, Duration::from_millis(1), 1);
        r.record(Lane::Canary, false, Duration::from_millis(2), 1);
        r.record(Lane::Stable, true, Duration::from_millis(1), 5);
        r.record(Lane::Any, true, Duration::from_millis(1), 1);
        r.window("p1", 1);
        let rep = r.report().unwrap();
        let (c, s) = (rep.canary.unwrap(), rep.stable.unwrap());
        assert_eq!((rep.check, c.ok, c.errors, s.ok, s.errors), (1, 1, 1, 5, 0));
        assert_eq!(c.latency_buckets.iter().sum::<u64>(), 2);
        r.window("p1", 2);
        let rep = r.report().unwrap();
        assert_eq!((rep.check, rep.canary.unwrap().ok), (2, 0));
    }
}
