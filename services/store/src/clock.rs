//! The replica core's clocks: the system's in production, a virtual one
//! the simulator moves (`sim`), so the same seed gives the same run.
//!
//! Two readings: a monotonic instant (apply batching, snapshot keeping) and
//! wall-clock milliseconds (the timestamp a leader puts in each entry, which
//! dedup windows and message times are measured by). The virtual wall clock
//! can be stepped backwards or forwards, as NTP does to a real one.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Default)]
pub enum Clock {
    #[default]
    System,
    Virtual(VirtualClock),
}

impl Clock {
    pub fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Virtual(v) => v.now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn wall_ms(&self) -> i64 {
        match self {
            Clock::System => system_ms(),
            Clock::Virtual(v) => v.wall_ms(),
        }
    }
}

pub fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Time that moves only when told to. Clones share it; `own_wall` gives a
/// reading of the same time with a wall clock of its own (one replica's).
#[derive(Clone)]
pub struct VirtualClock {
    time: Arc<Time>,
    /// Sum of this wall clock's steps.
    wall_step_ms: Arc<AtomicI64>,
}

struct Time {
    /// A real instant standing for virtual time zero (instants cannot be
    /// made from nothing); only differences from it mean anything.
    base: Instant,
    elapsed_ns: AtomicU64,
    wall_at_zero_ms: i64,
}

impl VirtualClock {
    /// A clock at virtual time zero, whose wall clock reads
    /// `wall_at_zero_ms` then.
    pub fn new(wall_at_zero_ms: i64) -> Self {
        Self {
            time: Arc::new(Time {
                base: Instant::now(),
                elapsed_ns: AtomicU64::new(0),
                wall_at_zero_ms,
            }),
            wall_step_ms: Arc::default(),
        }
    }

    /// The same time, read through a wall clock that steps alone.
    pub fn own_wall(&self) -> Self {
        Self {
            time: self.time.clone(),
            wall_step_ms: Arc::default(),
        }
    }

    /// Virtual time since zero.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.time.elapsed_ns.load(Ordering::Acquire))
    }

    /// Moves time forward to `to` (never back).
    pub fn advance_to(&self, to: Duration) {
        self.time
            .elapsed_ns
            .fetch_max(to.as_nanos() as u64, Ordering::AcqRel);
    }

    /// Steps this wall clock (not the monotonic one) by `ms`, either way;
    /// returns the sum of its steps so far.
    pub fn step_wall(&self, ms: i64) -> i64 {
        self.wall_step_ms.fetch_add(ms, Ordering::AcqRel) + ms
    }

    /// The instant standing for the current virtual time.
    pub fn now(&self) -> Instant {
        self.time.base + self.elapsed()
    }

    fn wall_ms(&self) -> i64 {
        self.time.wall_at_zero_ms
            + self.elapsed().as_millis() as i64
            + self.wall_step_ms.load(Ordering::Acquire)
    }
}
