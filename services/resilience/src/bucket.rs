//! Rate limits, one allowance per key (user, client IP), on `governor`'s
//! keyed limiter (GCRA: a token bucket kept as one timestamp per key, in a
//! sharded concurrent map, read against a TSC clock).
//!
//! A key may spend up to `burst` at once and regains `per_second` a
//! second. What this module adds to the library is a bound on memory: every
//! [`CHECK_EVERY`] checks of a limiter it looks at how many keys are held,
//! and past `max_keys` it first forgets the keys whose allowance is full
//! again (they have been quiet long enough to be owed nothing), and if that
//! is not enough, forgets every key, which errs towards letting traffic
//! through rather than growing without bound under a flood of new keys. So
//! at most `max_keys` plus `CHECK_EVERY` are held.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{RateLimiter, StateStore};
use governor::{NotUntil, Quota};

/// How many checks of a limiter go between looks at its number of keys.
pub const CHECK_EVERY: u32 = 256;

/// One key's allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: u32,
    /// Most tokens held (the largest burst allowed).
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Quota {
        let burst = NonZeroU32::new(self.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let per_second = self.per_second.max(1);
        Quota::with_period(Duration::from_secs(1) / per_second)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst)
    }
}

/// The library's concurrent map, shared between the limiter and the
/// bookkeeping here (which clears it when needed).
struct Store<K: Hash + Eq + Clone>(Arc<DashMapStateStore<K>>);

impl<K: Hash + Eq + Clone> StateStore for Store<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Store<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub struct KeyedBuckets<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    rate: Rate,
    max_keys: usize,
    clock: C,
    map: Arc<DashMapStateStore<K>>,
    limiter: RateLimiter<K, Store<K>, C, NoOpMiddleware<C::Instant>>,
    /// Checks made, counted towards the next look at the key count.
    checks: AtomicU32,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self::with_clock(rate, max_keys, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> KeyedBuckets<K, C> {
    /// Buckets that read `clock` (tests pass one they move by hand).
    pub fn with_clock(rate: Rate, max_keys: usize, clock: C) -> Self {
        let map = Arc::new(DashMapStateStore::default());
        Self {
            rate,
            max_keys: max_keys.max(1),
            limiter: RateLimiter::new(rate.quota(), Store(map.clone()), clock.clone()),
            clock,
            map,
            checks: AtomicU32::new(0),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token from `key`'s bucket, or says how long until one is
    /// there.
    pub fn check<Q>(&self, key: &Q) -> Result<(), Duration>
    where
        Q: ToOwned<Owned = K> + ?Sized,
    {
        self.check_n(key, 1)
    }

    /// Takes `n` tokens (a cost, such as bytes) from `key`'s bucket, or
    /// says how long until they are there. A cost above the burst is
    /// charged as the burst: it passes once the bucket is full.
    pub fn check_n<Q>(&self, key: &Q, n: u32) -> Result<(), Duration>
    where
        Q: ToOwned<Owned = K> + ?Sized,
    {
        self.keep_bounded();
        let cost = NonZeroU32::new(n.min(self.rate.burst).max(1)).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(&key.to_owned(), cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(self.wait(&not_until)),
            // The cost is at most the burst, which always fits.
            Err(_) => Ok(()),
        }
    }

    fn wait(&self, not_until: &NotUntil<C::Instant>) -> Duration {
        not_until.wait_time_from(self.clock.now())
    }

    /// Every `CHECK_EVERY` checks of this limiter: past `max_keys`, forget
    /// the keys owed nothing, then, if still past it, every key.
    fn keep_bounded(&self) {
        let look = self.checks.fetch_add(1, Ordering::Relaxed) % CHECK_EVERY == CHECK_EVERY - 1;
        if look && self.map.len() > self.max_keys {
            self.limiter.retain_recent();
            if self.map.len() > self.max_keys {
                self.map.clear();
            }
        }
    }

    /// Keys held now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn buckets<K: Hash + Eq + Clone>(
        per_second: u32,
        burst: u32,
        max_keys: usize,
    ) -> (KeyedBuckets<K, FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let rate = Rate { per_second, burst };
        (
            KeyedBuckets::with_clock(rate, max_keys, clock.clone()),
            clock,
        )
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_key() {
        let (b, clock) = buckets::<String>(10, 5, 1_000);
        for _ in 0..5 {
            assert!(b.check("alice").is_ok());
        }
        let wait = b.check("alice").expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        assert!(b.check("bob").is_ok(), "other keys are not affected");
        clock.advance(Duration::from_millis(100));
        assert!(b.check("alice").is_ok(), "one token back after 100 ms");
        assert!(b.check("alice").is_err());
        // Over a long quiet spell the bucket fills to the burst, no more.
        clock.advance(Duration::from_secs(60));
        assert_eq!((0..10).filter(|_| b.check("alice").is_ok()).count(), 5);
    }

    #[test]
    fn costs_take_as_many_tokens_and_one_above_the_burst_waits_for_a_full_bucket() {
        let (b, clock) = buckets::<String>(1_000, 4_000, 100);
        assert!(b.check_n("alice", 3_000).is_ok());
        let wait = b.check_n("alice", 3_000).expect_err("1,000 left");
        assert_eq!(wait, Duration::from_secs(2));
        clock.advance(Duration::from_secs(2));
        assert!(b.check_n("alice", 1_000_000).is_err(), "not full yet");
        clock.advance(Duration::from_secs(1));
        assert!(
            b.check_n("alice", 1_000_000).is_ok(),
            "full: charged the burst"
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_new_keys() {
        let (b, _clock) = buckets::<u32>(1, 2, 64);
        for k in 0..10_000u32 {
            let _ = b.check(&k);
        }
        assert!(
            b.len() <= 64 + CHECK_EVERY as usize,
            "{} keys held",
            b.len()
        );
    }

    #[test]
    fn limiters_checked_in_turn_on_one_thread_each_stay_bounded() {
        // As the gateway checks the per-IP then the per-user limit of
        // every call: each must look at its own count.
        let (ip, _c1) = buckets::<u32>(1, 2, 64);
        let (user, _c2) = buckets::<u32>(1, 2, 64);
        for k in 0..10_000u32 {
            let _ = ip.check(&k);
            let _ = user.check(&k);
        }
        for b in [&ip, &user] {
            assert!(
                b.len() <= 64 + CHECK_EVERY as usize,
                "{} keys held",
                b.len()
            );
        }
    }

    #[test]
    fn a_key_that_spent_its_burst_is_kept_when_quiet_ones_are_dropped() {
        let (b, clock) = buckets::<u32>(1, 2, 300);
        for k in 1..=290 {
            let _ = b.check(&k);
        }
        // Those 290 are owed nothing after a quiet spell; key 0 spends its
        // burst; new keys then push the count past the bound, and the next
        // look drops the quiet keys only.
        clock.advance(Duration::from_secs(10));
        assert!(b.check(&0).is_ok() && b.check(&0).is_ok());
        for k in 1_000..1_000 + CHECK_EVERY {
            let _ = b.check(&k);
        }
        assert!(b.len() <= CHECK_EVERY as usize + 1, "{} keys", b.len());
        assert!(b.check(&0).is_err(), "key 0's spent burst was forgotten");
    }
}
