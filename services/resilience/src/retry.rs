//! Retry discipline: exponential backoff with full jitter, a retry budget
//! that caps retries at a fraction of the calls made, and client-side
//! adaptive throttling (the Google SRE book's "handling overload"): when a
//! backend has been refusing much of what it is sent, the client refuses a
//! matching share of calls itself rather than sending them, so a
//! struggling backend is not kept busy answering "no".

use std::time::{Duration, Instant};

use crate::window::Window;

/// Exponential backoff with full jitter: each wait is uniform in
/// `[0, current)`, and `current` doubles up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    pub fn next_wait(&mut self) -> Duration {
        let wait = self.current.mul_f64(rand::random::<f64>());
        self.current = (self.current * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Slots of the retry budget's and the throttle's windows.
const SLOTS: usize = 10;
const SLOT: Duration = Duration::from_secs(1);

/// Retries allowed: `min_per_sec` plus `ratio` of the calls made, over the
/// last ten seconds. Every original call deposits; every retry withdraws.
pub struct RetryBudget {
    /// (calls, retries)
    window: Window<SLOTS>,
    ratio: f64,
    min_per_sec: u64,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: u64) -> Self {
        Self {
            window: Window::new(SLOT),
            ratio,
            min_per_sec,
        }
    }

    /// Records an original (not retried) call.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    pub fn deposit_at(&self, now: Instant) {
        self.window.add(now, 1, 0);
    }

    /// Whether one more retry fits in the budget; it is counted if so.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let (calls, retries) = self.window.sums(now);
        let allowed = self.min_per_sec * SLOTS as u64 + (calls as f64 * self.ratio) as u64;
        if retries >= allowed {
            return false;
        }
        self.window.add(now, 0, 1);
        true
    }
}

impl Default for RetryBudget {
    /// 20 % extra load at most, and a few retries a second for idle clients.
    fn default() -> Self {
        Self::new(0.2, 5)
    }
}

/// Client-side adaptive throttling: a call is refused locally with
/// probability `max(0, (requests - K * accepts) / (requests + 1))` over the
/// last ten seconds, where `accepts` counts calls the backend did not
/// refuse for overload. A request is counted when its outcome is known
/// (answered, refused by the backend, or refused here), never while it is
/// in flight: otherwise a quiet client's second concurrent call would be
/// refused half the time with no refusal from the backend at all.
pub struct Throttle {
    /// (requests, accepts)
    window: Window<SLOTS>,
    k: f64,
}

impl Throttle {
    /// `k`: how many requests per accepted one the client still sends (2 in
    /// the SRE book; lower throttles sooner).
    pub fn new(k: f64) -> Self {
        Self {
            window: Window::new(SLOT),
            k,
        }
    }

    /// The probability a new call is refused locally now.
    pub fn reject_probability(&self, now: Instant) -> f64 {
        let (requests, accepts) = self.window.sums(now);
        ((requests as f64 - self.k * accepts as f64) / (requests as f64 + 1.0)).max(0.0)
    }

    /// Counts a call and says whether it may be sent (false: refuse it
    /// locally, as if the backend had).
    pub fn attempt(&self) -> bool {
        self.attempt_at(Instant::now(), rand::random::<f64>())
    }

    pub fn attempt_at(&self, now: Instant, dice: f64) -> bool {
        let p = self.reject_probability(now);
        if dice < p {
            self.window.add(now, 1, 0);
            return false;
        }
        true
    }

    /// The backend took the call (any answer but an overload refusal).
    pub fn accepted(&self) {
        self.accepted_at(Instant::now());
    }

    pub fn accepted_at(&self, now: Instant) {
        self.window.add(now, 1, 1);
    }

    /// The backend refused the call for overload.
    pub fn refused(&self) {
        self.refused_at(Instant::now());
    }

    pub fn refused_at(&self, now: Instant) {
        self.window.add(now, 1, 0);
    }
}

impl Default for Throttle {
    /// k = 1.2, more eager than the SRE book's 2: on a small cluster the
    /// refusals themselves cost the CPU the accepted calls need (at 3×
    /// overload, k = 2 kept sending a third more doomed calls and halved
    /// goodput; BENCHMARKS.md).
    fn default() -> Self {
        Self::new(1.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_below_it() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let caps = [10, 20, 40, 80, 80, 80];
        for cap in caps {
            assert!(b.next_wait() < Duration::from_millis(cap));
        }
        b.reset();
        assert!(b.next_wait() < Duration::from_millis(10));
    }

    #[test]
    fn retry_budget_allows_a_fraction_of_calls_then_refuses() {
        let budget = RetryBudget::new(0.2, 0);
        let now = Instant::now();
        for _ in 0..100 {
            budget.deposit_at(now);
        }
        let granted = (0..100).filter(|_| budget.try_withdraw_at(now)).count();
        assert_eq!(granted, 20, "20 % of 100 calls");
        // Ten seconds later the calls have left the window, and so has the
        // allowance they brought.
        let later = now + Duration::from_secs(11);
        assert!(!budget.try_withdraw_at(later));
        budget.deposit_at(later);
        assert!(!budget.try_withdraw_at(later), "one call buys 0.2 retries");
    }

    #[test]
    fn retry_budget_floor_lets_idle_clients_retry() {
        let budget = RetryBudget::new(0.2, 1);
        let now = Instant::now();
        assert_eq!((0..20).filter(|_| budget.try_withdraw_at(now)).count(), 10);
    }

    #[test]
    fn throttle_refuses_locally_in_proportion_to_backend_refusals() {
        let t = Throttle::new(2.0);
        let now = Instant::now();
        // All accepted: never throttled.
        for _ in 0..100 {
            assert!(t.attempt_at(now, 0.0));
            t.accepted_at(now);
        }
        assert_eq!(t.reject_probability(now), 0.0);
        // Calls in flight are not refusals.
        for _ in 0..50 {
            assert!(t.attempt_at(now, 0.0));
        }
        assert_eq!(t.reject_probability(now), 0.0);
        // The backend now refuses everything: once requests exceed twice the
        // accepts, a growing share is refused locally.
        for _ in 0..300 {
            if t.attempt_at(now, 0.999) {
                t.refused_at(now);
            }
        }
        let p = t.reject_probability(now);
        assert!(p > 0.4 && p < 0.6, "(400 - 200) / 401 = {p}");
        assert!(!t.attempt_at(now, p - 0.01));
        assert!(t.attempt_at(now, p + 0.01));
        // Once the refusals leave the window, nothing is throttled.
        assert_eq!(t.reject_probability(now + Duration::from_secs(11)), 0.0);
    }
}
