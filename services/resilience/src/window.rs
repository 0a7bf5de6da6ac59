//! Counters over a sliding window of time slots, kept in atomics so the
//! hot path never takes a lock. A slot is reset by the first writer that
//! finds it holding an old slot's counts; a racing writer may lose a count
//! at that moment, which the heuristics built on this tolerate.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

struct Slot {
    /// Slot number + 1; 0: never written.
    epoch: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
}

/// Two counters summed over the last `N` slots of `slot` each.
pub(crate) struct Window<const N: usize> {
    start: Instant,
    slot: Duration,
    slots: [Slot; N],
}

impl<const N: usize> Window<N> {
    pub(crate) fn new(slot: Duration) -> Self {
        Self {
            start: Instant::now(),
            slot,
            slots: std::array::from_fn(|_| Slot {
                epoch: AtomicU64::new(0),
                a: AtomicU64::new(0),
                b: AtomicU64::new(0),
            }),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.start).as_nanos() / self.slot.as_nanos().max(1)) as u64
            + 1
    }

    pub(crate) fn add(&self, now: Instant, a: u64, b: u64) {
        let e = self.epoch(now);
        let s = &self.slots[(e % N as u64) as usize];
        let seen = s.epoch.load(Relaxed);
        if seen != e && s.epoch.compare_exchange(seen, e, Relaxed, Relaxed).is_ok() {
            s.a.store(0, Relaxed);
            s.b.store(0, Relaxed);
        }
        s.a.fetch_add(a, Relaxed);
        s.b.fetch_add(b, Relaxed);
    }

    /// Forgets every count (a racing writer may keep one).
    pub(crate) fn clear(&self) {
        for s in &self.slots {
            s.a.store(0, Relaxed);
            s.b.store(0, Relaxed);
        }
    }

    /// Both counters summed over the window ending at `now`.
    pub(crate) fn sums(&self, now: Instant) -> (u64, u64) {
        let e = self.epoch(now);
        self.slots
            .iter()
            .filter(|s| {
                let se = s.epoch.load(Relaxed);
                se != 0 && se <= e && se + N as u64 > e
            })
            .fold((0, 0), |(a, b), s| {
                (a + s.a.load(Relaxed), b + s.b.load(Relaxed))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_leave_the_window_after_n_slots() {
        let w = Window::<4>::new(Duration::from_secs(1));
        let t0 = w.start;
        w.add(t0, 3, 1);
        w.add(t0 + Duration::from_millis(1_500), 2, 0);
        assert_eq!(w.sums(t0 + Duration::from_millis(1_600)), (5, 1));
        assert_eq!(w.sums(t0 + Duration::from_millis(4_100)), (2, 0));
        assert_eq!(w.sums(t0 + Duration::from_secs(9)), (0, 0));
        // A slot reused after a full turn starts from zero.
        w.add(t0 + Duration::from_secs(4), 1, 1);
        assert_eq!(w.sums(t0 + Duration::from_secs(4)), (3, 1));
    }
}
