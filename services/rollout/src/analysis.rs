//! Judging a canary against the stable release over one window.

use crate::histogram::Histogram;
use crate::plan::{decide, default_thresholds};
use crate::{Plan, State, Thresholds, Window};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass(String),
    Fail(String),
    /// Too few canary calls to say anything.
    NotEnoughData(String),
}

fn p99(w: &Window) -> u64 {
    Histogram::from_counts(&w.latency_buckets).quantile_us(0.99)
}

/// Canary against stable over the same window: success rate first, then
/// p99 latency (when the stable side has enough calls to compare with).
pub fn analyse(canary: &Window, stable: &Window, t: &Thresholds) -> Verdict {
    let calls = canary.ok + canary.errors;
    if calls < t.min_requests.max(1) {
        return Verdict::NotEnoughData(format!(
            "{calls} canary calls, {} needed to judge",
            t.min_requests
        ));
    }
    let stable_calls = stable.ok + stable.errors;
    let stable_pm = if stable_calls == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}", stable.ok as f64 * 100.0 / stable_calls as f64)
    };
    let success = format!(
        "success {:.1} % (stable {stable_pm} %) over {calls} calls",
        canary.ok as f64 * 100.0 / calls as f64
    );
    if canary.ok * 1_000 < u64::from(t.min_success_permille) * calls {
        return Verdict::Fail(format!(
            "{success}, below {:.1} %",
            f64::from(t.min_success_permille) / 10.0
        ));
    }
    let canary_p99 = p99(canary);
    if stable_calls < t.min_requests.max(1) {
        return Verdict::Pass(format!(
            "{success}; p99 {:.1} ms, too few stable calls to compare latency",
            canary_p99 as f64 / 1e3
        ));
    }
    let stable_p99 = p99(stable);
    let limit = ((stable_p99 as f64 * t.max_latency_ratio) as u64).max(t.latency_floor_us);
    let latency = format!(
        "p99 {:.1} ms (stable {:.1} ms, limit {:.1} ms)",
        canary_p99 as f64 / 1e3,
        stable_p99 as f64 / 1e3,
        limit as f64 / 1e3
    );
    if canary_p99 > limit {
        Verdict::Fail(format!("{success}; {latency}: too slow"))
    } else {
        Verdict::Pass(format!("{success}; {latency}"))
    }
}

/// Whether the plan's current window has ended `grace_ms` ago (the grace
/// lets the gateways' last reports of the window arrive).
pub fn due(plan: &Plan, now_ms: i64, grace_ms: i64) -> bool {
    plan.state() == State::Running
        && now_ms >= plan.check_started_ms + plan.interval_ms as i64 + grace_ms
}

/// The plan after judging its current window: advance a step on a pass
/// (the last step is promotion), repeat the window when there is not
/// enough data, count a failure and abort after too many. Every call
/// starts the next window. `None` when the plan is not running.
pub fn judge(plan: &Plan, canary: &Window, stable: &Window, now_ms: i64) -> Option<Plan> {
    if plan.state() != State::Running {
        return None;
    }
    let t = plan.thresholds.unwrap_or_else(default_thresholds);
    let mut p = plan.clone();
    let (action, reason) = match analyse(canary, stable, &t) {
        Verdict::Pass(why) => {
            let next = p.step as usize + 1;
            match p.steps.get(next) {
                Some(&w) if next + 1 < p.steps.len() => {
                    p.step = next as u32;
                    p.weight = w;
                    ("advance", why)
                }
                _ => {
                    p.step = (p.steps.len() as u32).saturating_sub(1);
                    p.weight = 100;
                    p.state = State::Promoted as i32;
                    ("promote", why)
                }
            }
        }
        Verdict::NotEnoughData(why) => ("hold", why),
        Verdict::Fail(why) => {
            p.failed_checks += 1;
            if p.failed_checks >= t.max_failed_checks {
                p.state = State::Aborted as i32;
                p.weight = 0;
                (
                    "abort",
                    format!("{why}; {} failed checks: rolled back", p.failed_checks),
                )
            } else {
                (
                    "fail",
                    format!(
                        "{why}; failed check {} of {}",
                        p.failed_checks, t.max_failed_checks
                    ),
                )
            }
        }
    };
    decide(&mut p, now_ms, action, reason);
    p.check += 1;
    p.check_started_ms = now_ms;
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{StartArgs, start};

    fn window(ok: u64, errors: u64, latency_us: u64) -> Window {
        let mut h = Histogram::default();
        for _ in 0..ok + errors {
            h.record(latency_us);
        }
        Window {
            ok,
            errors,
            latency_buckets: h.counts().to_vec(),
        }
    }

    fn plan() -> Plan {
        start(
            StartArgs {
                id: "r1".into(),
                service: "router".into(),
                canary: "v2".into(),
                steps: vec![5, 50, 100],
                interval_ms: 5_000,
                thresholds: default_thresholds(),
            },
            None,
            0,
        )
        .unwrap()
    }

    #[test]
    fn verdicts_pass_fail_and_not_enough_data() {
        let t = default_thresholds();
        let stable = window(10_000, 0, 2_000);
        assert!(matches!(
            analyse(&window(500, 2, 2_100), &stable, &t),
            Verdict::Pass(_)
        ));
        let Verdict::Fail(why) = analyse(&window(450, 50, 2_000), &stable, &t) else {
            panic!("10 % errors must fail")
        };
        assert!(why.contains("success 90.0 %"), "{why}");
        let Verdict::Fail(why) = analyse(&window(500, 0, 40_000), &stable, &t) else {
            panic!("20x slower must fail")
        };
        assert!(why.contains("too slow"), "{why}");
        // Slower than 1.5x but under the floor: noise, not a regression.
        assert!(matches!(
            analyse(&window(500, 0, 6_000), &stable, &t),
            Verdict::Pass(_)
        ));
        assert!(matches!(
            analyse(&window(49, 0, 2_000), &stable, &t),
            Verdict::NotEnoughData(_)
        ));
        // Nothing stable to compare with: judged on success alone.
        assert!(matches!(
            analyse(&window(500, 0, 900_000), &window(0, 0, 0), &t),
            Verdict::Pass(_)
        ));
    }

    #[test]
    fn passes_advance_to_promotion_and_failures_abort() {
        let good = window(1_000, 0, 1_000);
        let stable = window(1_000, 0, 1_000);
        let p = plan();
        let p = judge(&p, &good, &stable, 5_000).unwrap();
        assert_eq!((p.weight, p.check, p.check_started_ms), (50, 2, 5_000));
        let p = judge(&p, &good, &stable, 10_000).unwrap();
        assert_eq!((p.state(), p.weight), (State::Promoted, 100));
        assert!(judge(&p, &good, &stable, 15_000).is_none(), "done");

        let bad = window(900, 100, 1_000);
        let p = judge(&plan(), &bad, &stable, 5_000).unwrap();
        assert_eq!(
            (p.state(), p.weight, p.failed_checks),
            (State::Running, 5, 1)
        );
        let p = judge(&p, &window(3, 0, 1_000), &stable, 10_000).unwrap();
        assert_eq!((p.state(), p.weight), (State::Running, 5), "no data: hold");
        assert_eq!(p.decisions.last().unwrap().action, "hold");
        let p = judge(&p, &bad, &stable, 15_000).unwrap();
        assert_eq!((p.state(), p.weight), (State::Aborted, 0));
        assert!(p.decisions.last().unwrap().reason.contains("rolled back"));
    }

    #[test]
    fn a_window_is_due_after_its_interval_and_grace_while_running() {
        let p = plan();
        assert!(!due(&p, 5_000, 1_000));
        assert!(due(&p, 6_000, 1_000));
        let mut paused = p.clone();
        paused.state = State::Paused as i32;
        assert!(!due(&paused, 60_000, 1_000));
    }
}
