//! A mergeable latency histogram with fixed buckets, so histograms from
//! several gateways add up exactly: four linear buckets per power of two
//! microseconds, a resolution of 25 % at worst.

/// Buckets: the last starts at 2^31 µs, over half an hour.
pub const BUCKETS: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
        }
    }
}

/// The bucket of a latency in microseconds.
pub fn bucket(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    // floor(4 * log2(us)), from the bit length and the next two bits.
    let bits = 63 - us.leading_zeros() as usize;
    let frac = if bits >= 2 {
        ((us >> (bits - 2)) & 0b11) as usize
    } else {
        ((us << (2 - bits)) & 0b11) as usize
    };
    (bits * 4 + frac).min(BUCKETS - 1)
}

/// The upper bound of bucket `i` (exclusive), in microseconds: bucket
/// 4b + f holds [2^b (1 + f/4), 2^b (1 + (f+1)/4)).
pub fn upper_us(i: usize) -> u64 {
    let (b, f) = (i / 4, (i % 4) as u64);
    ((1u64 << b) * (5 + f)).div_ceil(4)
}

impl Histogram {
    pub fn from_counts(counts: &[u64]) -> Self {
        let mut h = Self::default();
        for (c, x) in h.counts.iter_mut().zip(counts) {
            *c = *x;
        }
        h
    }

    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    pub fn record(&mut self, us: u64) {
        self.counts[bucket(us)] += 1;
    }

    pub fn merge(&mut self, other: &Self) {
        for (c, x) in self.counts.iter_mut().zip(&other.counts) {
            *c += x;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0 when empty).
    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.total();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper_us(i);
            }
        }
        upper_us(BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_latencies_within_a_fifth() {
        for us in [2u64, 3, 7, 100, 999, 1_000, 12_345, 1_000_000, 60_000_000] {
            let i = bucket(us);
            assert!(us < upper_us(i), "{us} in bucket {i} below {}", upper_us(i));
            assert!(
                upper_us(i) as f64 <= us as f64 * 1.25 + 1.0,
                "{us}: {}",
                upper_us(i)
            );
        }
        assert!(bucket(1_000) < bucket(1_300));
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn merged_histograms_give_the_quantile_of_all_samples() {
        let mut fast = Histogram::default();
        let mut slow = Histogram::default();
        for _ in 0..98 {
            fast.record(1_000);
        }
        for _ in 0..2 {
            slow.record(50_000);
        }
        assert!(fast.quantile_us(0.99) < 1_300);
        fast.merge(&slow);
        let p99 = fast.quantile_us(0.99);
        assert!((50_000..60_000).contains(&p99), "{p99}");
        assert_eq!(Histogram::default().quantile_us(0.99), 0);
        assert_eq!(Histogram::from_counts(fast.counts()), fast);
    }
}
