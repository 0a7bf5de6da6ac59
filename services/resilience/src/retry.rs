//! Retry discipline: exponential backoff with full jitter, a retry budget
//! that caps retries at a fraction of the calls made, and client-side
//! adaptive throttling (the Google SRE book's "handling overload"): when a
//! backend has been refusing much of what it is sent, the client refuses a
//! matching share of calls itself rather than sending them, so a
//! struggling backend is not kept busy answering "no".

use std::sync::atomic::{AtomicU64, Ordering};
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
///
/// Local refusals count as requests (as in the SRE book), so once the
/// backend takes everything again the refusal rate can only fall by a
/// factor of about K per window: with K = 1.2 a client that had been
/// refusing half its calls kept refusing a quarter of them 17 s after the
/// backend came back (BENCHMARKS.md, "the whole store tier lost at
/// once"). So the throttle forgets the window's history when the backend
/// has recovered, which it learns in one of two ways:
///
/// - the backend says so: a call it took came back with [`Load::Ok`] (the
///   gateways' `chat-load` header: no refusal for overload there lately);
/// - a backend that says nothing took a call and has refused none in the
///   last half second. Under a real overload the backend keeps refusing a
///   share of what a busy client sends, so that seldom happens while
///   throttling is needed; a client sending a few calls a second may let go
///   early and is held back again by the next refusal.
///
/// A call the throttle would refuse is first held for a moment
/// ([`Throttle::HOLD`]) and decided again with the same dice: in the
/// meantime another call may have found the backend recovered. It is
/// refused then only if the backend still showed overload (a refusal, or
/// `busy`) within the last [`Throttle::EVIDENCE`]; otherwise it goes
/// out as a probe. So a client that was throttling when the backend came
/// back loses none of the calls it makes after that.
pub struct Throttle {
    /// (requests, accepts)
    window: Window<SLOTS>,
    /// When the backend last refused a call for overload, in milliseconds
    /// since `start`, + 1; 0: never.
    last_refusal: AtomicU64,
    /// When the backend last showed overload (a refusal or `busy`), in
    /// milliseconds since `start`, + 1; 0: never.
    evidence: AtomicU64,
    start: Instant,
    k: f64,
}

/// What a backend that took a call said about its load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Nothing.
    Unknown,
    /// It has refused nothing for overload lately.
    Ok,
    /// It is near its limit or refusing calls for overload.
    Busy,
}

/// How long the throttle remembers a refusal when deciding whether the
/// backend has recovered. Short, because a client refusing most of its
/// calls itself sends few; a client sending many under a real overload
/// meets a refusal well within it.
const RECENT: Duration = Duration::from_millis(500);

impl Throttle {
    /// How long a call the throttle would refuse waits to be decided again.
    pub const HOLD: Duration = Duration::from_millis(500);
    /// A held call is refused only if the backend showed overload this
    /// recently. Well below `HOLD` less the backend's own `busy`
    /// memory (100 ms), so that a call held as the backend stopped
    /// refusing is not refused on the strength of that last refusal.
    pub const EVIDENCE: Duration = Duration::from_millis(250);

    /// `k`: how many requests per accepted one the client still sends (2 in
    /// the SRE book; lower throttles sooner).
    pub fn new(k: f64) -> Self {
        Self {
            window: Window::new(SLOT),
            last_refusal: AtomicU64::new(0),
            evidence: AtomicU64::new(0),
            start: Instant::now(),
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
        if self.would_refuse_at(now, dice) {
            self.window.add(now, 1, 0);
            return false;
        }
        true
    }

    /// Whether a call with this `dice` would be refused now (counts
    /// nothing): such a call is held for [`Throttle::HOLD`], then decided
    /// by [`Throttle::attempt_after_hold_at`] with the same dice.
    pub fn would_refuse_at(&self, now: Instant, dice: f64) -> bool {
        dice < self.reject_probability(now)
    }

    /// Decides a held call: refused (and counted) only if it would still be
    /// and the backend showed overload within [`Throttle::EVIDENCE`].
    pub fn attempt_after_hold_at(&self, now: Instant, dice: f64) -> bool {
        let evidence = self.evidence.load(Ordering::Relaxed);
        let recent = evidence != 0 && self.ms(now) < evidence + Self::EVIDENCE.as_millis() as u64;
        if recent && self.would_refuse_at(now, dice) {
            self.window.add(now, 1, 0);
            return false;
        }
        true
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64 + 1
    }

    /// The backend took the call (any answer but an overload refusal) and
    /// said nothing of its load.
    pub fn accepted(&self) {
        self.accepted_at(Instant::now(), Load::Unknown);
    }

    pub fn accepted_at(&self, now: Instant, load: Load) {
        self.window.add(now, 1, 1);
        let recovered = match load {
            Load::Ok => true,
            Load::Busy => {
                self.evidence.fetch_max(self.ms(now), Ordering::Relaxed);
                false
            }
            Load::Unknown => {
                let last = self.last_refusal.load(Ordering::Relaxed);
                last == 0 || self.ms(now) >= last + RECENT.as_millis() as u64
            }
        };
        if recovered && self.reject_probability(now) > 0.0 {
            self.window.clear();
        }
    }

    /// The backend refused the call for overload.
    pub fn refused(&self) {
        self.refused_at(Instant::now());
    }

    pub fn refused_at(&self, now: Instant) {
        self.window.add(now, 1, 0);
        self.last_refusal.fetch_max(self.ms(now), Ordering::Relaxed);
        self.evidence.fetch_max(self.ms(now), Ordering::Relaxed);
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
            t.accepted_at(now, Load::Unknown);
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

    /// The backend refused everything for `secs` seconds at `rate` calls a
    /// second from `t0`, with the client throttling as it goes.
    fn outage(t: &Throttle, t0: Instant, secs: u64, rate: u64) -> Instant {
        let step = Duration::from_secs(1) / rate as u32;
        let mut now = t0;
        for i in 0..secs * rate {
            now = t0 + step * i as u32;
            if t.attempt_at(now, 0.5) {
                t.refused_at(now);
            }
        }
        now
    }

    #[test]
    fn throttle_lets_go_within_a_second_once_the_backend_takes_everything() {
        let t = Throttle::new(1.2);
        let t0 = Instant::now();
        let end = outage(&t, t0, 4, 10);
        assert!(
            t.reject_probability(end) > 0.5,
            "throttling after the outage"
        );
        // The backend is back: the calls the throttle lets through are all
        // taken. After a few of them the history is forgotten.
        let mut now = end;
        let mut taken = 0;
        while t.reject_probability(now) > 0.0 {
            now += Duration::from_millis(100);
            assert!(now - end < Duration::from_secs(2), "still throttling");
            if t.attempt_at(now, 0.99) {
                t.accepted_at(now, Load::Unknown);
                taken += 1;
            }
        }
        assert!(taken >= 1, "{taken}");
    }

    /// Evenly spread numbers in [0, 1), in no particular order.
    fn dice(i: u32) -> f64 {
        (f64::from(i) * 0.618_033_988_75).fract()
    }

    #[test]
    fn throttle_holds_while_the_backend_keeps_refusing_a_share() {
        // A steady overload: a client tries 200 calls a second against a
        // backend that takes 100 a second (10 per 100 ms) and refuses the
        // rest.
        let t = Throttle::new(1.2);
        let mut now = Instant::now();
        let (mut tried, mut sent, mut taken, mut taken_here) = (0u32, 0u32, 0u32, 0u32);
        let mut least_after_accept = 1.0f64;
        for i in 0..2_000u32 {
            now += Duration::from_millis(5);
            if i % 20 == 0 {
                taken_here = 0;
            }
            if i < 400 {
                // Two seconds to find its level; then count.
                if t.attempt_at(now, dice(i)) {
                    if taken_here < 10 {
                        taken_here += 1;
                        t.accepted_at(now, Load::Unknown);
                    } else {
                        t.refused_at(now);
                    }
                }
                continue;
            }
            tried += 1;
            if t.attempt_at(now, dice(i)) {
                sent += 1;
                if taken_here < 10 {
                    taken_here += 1;
                    taken += 1;
                    t.accepted_at(now, Load::Unknown);
                    least_after_accept = least_after_accept.min(t.reject_probability(now));
                } else {
                    t.refused_at(now);
                }
            }
        }
        // It keeps refusing a share locally: an accepted call amid refusals
        // is no sign of recovery ...
        assert!(least_after_accept > 0.1, "{least_after_accept}");
        assert!(sent < tried * 3 / 4, "sent {sent} of {tried}");
        // ... without starving itself of what the backend would take.
        assert!(taken > 1_600 / 2 / 2, "taken {taken} of a capacity of 800");
    }

    /// A client making a call every `every` from `from` for `secs` seconds,
    /// holding what the throttle would refuse as the client library does;
    /// `backend(now)`: None refuses the call, Some(load) takes it.
    /// Returns (calls made, calls refused locally, calls refused by the
    /// backend).
    fn client(
        t: &Throttle,
        from: Instant,
        every: Duration,
        secs: u64,
        backend: impl Fn(Instant) -> Option<Load>,
    ) -> (u32, u32, u32) {
        let step = Duration::from_millis(5);
        let (mut made, mut held_back, mut refused) = (0u32, 0u32, 0u32);
        let mut held: Vec<(Instant, f64)> = Vec::new();
        let mut next = from;
        let mut now = from;
        let send = |now: Instant, refused: &mut u32| match backend(now) {
            Some(load) => t.accepted_at(now, load),
            None => {
                t.refused_at(now);
                *refused += 1;
            }
        };
        while now < from + Duration::from_secs(secs) {
            for (_, dice) in held.extract_if(.., |(at, _)| *at <= now) {
                if t.attempt_after_hold_at(now, dice) {
                    send(now, &mut refused);
                } else {
                    held_back += 1;
                }
            }
            if now >= next {
                let d = dice(made);
                made += 1;
                next += every;
                if t.would_refuse_at(now, d) {
                    held.push((now + Throttle::HOLD, d));
                } else {
                    send(now, &mut refused);
                }
            }
            now += step;
        }
        (made, held_back, refused)
    }

    #[test]
    fn a_throttling_client_loses_no_call_made_after_the_backend_recovered() {
        let t = Throttle::new(1.2);
        let t0 = Instant::now();
        let back = outage(&t, t0, 4, 10);
        assert!(
            t.reject_probability(back) > 0.5,
            "throttling after the outage"
        );
        // One call taken with the gateway's word that it is shedding, or
        // none, is no sign of recovery so soon after a refusal; its word
        // that it is not is.
        let soon = back + Duration::from_millis(150);
        let probe = Throttle::new(1.2);
        outage(&probe, t0, 4, 10);
        probe.refused_at(back);
        for load in [Load::Busy, Load::Unknown] {
            probe.accepted_at(soon, load);
            assert!(probe.reject_probability(soon) > 0.5, "{load:?}");
        }
        probe.accepted_at(soon, Load::Ok);
        assert_eq!(probe.reject_probability(soon), 0.0);
        // Back at `back`: the backend takes everything and says `busy`
        // for 100 ms after its last refusal, as the gateways do.
        let (made, held_back, refused) = client(&t, back, Duration::from_millis(130), 3, |now| {
            Some(if now < back + Duration::from_millis(100) {
                Load::Busy
            } else {
                Load::Ok
            })
        });
        assert!(made > 20);
        assert_eq!((held_back, refused), (0, 0), "of {made} calls");
        // A backend that says nothing: the same, through the half second
        // without refusals.
        let t = Throttle::new(1.2);
        let back = outage(&t, t0, 4, 10);
        let (made, held_back, _) = client(&t, back, Duration::from_millis(130), 3, |_| {
            Some(Load::Unknown)
        });
        assert_eq!(held_back, 0, "of {made} calls");
    }

    #[test]
    fn held_calls_are_still_refused_under_a_steady_overload() {
        // 200 calls a second against a backend that takes 100 a second (one
        // per 10 ms slot) and says `busy` while it refuses the rest.
        let t = Throttle::new(1.2);
        let t0 = Instant::now();
        let taken_in = std::cell::Cell::new(u64::MAX);
        let backend = |now: Instant| {
            let slot = (now - t0).as_millis() as u64 / 10;
            if taken_in.get() == slot {
                return None;
            }
            taken_in.set(slot);
            Some(Load::Busy)
        };
        let (made, held_back, refused) = client(&t, t0, Duration::from_millis(5), 10, backend);
        assert!(
            held_back > made / 4,
            "held back {held_back} of {made} (backend refused {refused})"
        );
        assert!(
            made - held_back - refused > 800,
            "the backend's 1,000 mostly used"
        );
    }
}
