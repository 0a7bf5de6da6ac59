//! Token-bucket rate limits, one bucket per key (user, client IP).
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second; a
//! request takes one. The buckets live in shards behind short locks (the
//! shard is picked by the key's hash, so callers rarely meet). Memory is
//! bounded: a shard that outgrows its share of `max_keys` first forgets the
//! buckets that are full (those keys have been quiet long enough to be owed
//! nothing), and if that is not enough, forgets everything it holds, which
//! errs towards letting traffic through rather than growing without bound
//! under a flood of new keys.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 16;

/// One key's allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: u32,
    /// Most tokens held (the largest burst allowed).
    pub burst: u32,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * f64::from(rate.per_second)).min(f64::from(rate.burst));
        self.at = now;
    }
}

pub struct KeyedBuckets<K> {
    rate: Rate,
    max_keys: usize,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<K, Bucket>>>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(SHARDS),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token from `key`'s bucket, or says how long until one is
    /// there.
    pub fn check<Q>(&self, key: &Q, now: Instant) -> Result<(), Duration>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_n(key, 1, now)
    }

    /// Takes `n` tokens (a cost, such as bytes) from `key`'s bucket, or
    /// says how long until they are there. A cost above the burst is
    /// charged as the burst: it passes once the bucket is full.
    pub fn check_n<Q>(&self, key: &Q, n: u32, now: Instant) -> Result<(), Duration>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let cost = f64::from(n.min(self.rate.burst).max(1));
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= self.max_keys / SHARDS {
            let rate = self.rate;
            map.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < f64::from(rate.burst)
            });
            if map.len() >= self.max_keys / SHARDS {
                map.clear();
            }
        }
        if !map.contains_key(key) {
            map.insert(
                key.to_owned(),
                Bucket {
                    tokens: f64::from(self.rate.burst),
                    at: now,
                },
            );
        }
        let Some(b) = map.get_mut(key) else {
            return Ok(());
        };
        b.refill(self.rate, now);
        if b.tokens >= cost {
            b.tokens -= cost;
            return Ok(());
        }
        let per_second = f64::from(self.rate.per_second.max(1));
        Err(Duration::from_secs_f64((cost - b.tokens) / per_second))
    }

    /// Keys held now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_key() {
        let b = KeyedBuckets::new(
            Rate {
                per_second: 10,
                burst: 5,
            },
            1_000,
        );
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(b.check(&"alice", t0).is_ok());
        }
        let wait = b.check(&"alice", t0).expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        assert!(b.check(&"bob", t0).is_ok(), "other keys are not affected");
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.check(&"alice", t1).is_ok(), "one token back after 100 ms");
        assert!(b.check(&"alice", t1).is_err());
        // Over a long quiet spell the bucket fills to the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.check(&"alice", t2).is_ok()).count(), 5);
    }

    #[test]
    fn costs_take_as_many_tokens_and_one_above_the_burst_waits_for_a_full_bucket() {
        let b = KeyedBuckets::new(
            Rate {
                per_second: 1_000,
                burst: 4_000,
            },
            100,
        );
        let t0 = Instant::now();
        assert!(b.check_n(&"alice", 3_000, t0).is_ok());
        let wait = b.check_n(&"alice", 3_000, t0).expect_err("1,000 left");
        assert_eq!(wait, Duration::from_secs(2));
        let t1 = t0 + Duration::from_secs(2);
        assert!(b.check_n(&"alice", 1_000_000, t1).is_err(), "not full yet");
        let t2 = t1 + Duration::from_secs(1);
        assert!(
            b.check_n(&"alice", 1_000_000, t2).is_ok(),
            "full: charged the burst"
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_new_keys() {
        let b = KeyedBuckets::new(
            Rate {
                per_second: 1,
                burst: 2,
            },
            64,
        );
        let now = Instant::now();
        for k in 0..10_000u32 {
            let _ = b.check(&k, now);
        }
        assert!(b.len() <= 64, "{} keys held", b.len());
    }
}
