//! Starting a plan, operators' commands on it, and who is a canary user.

use crate::{Decision, Plan, State, Thresholds};

/// Decisions kept in a plan (the oldest go first).
const MAX_DECISIONS: usize = 100;

/// Flagger's defaults in spirit: 99 % success, p99 at most 1.5 × the
/// stable one, 50 calls before judging, abort after 2 failed checks.
pub fn default_thresholds() -> Thresholds {
    Thresholds {
        min_success_permille: 990,
        max_latency_ratio: 1.5,
        latency_floor_us: 10_000,
        min_requests: 50,
        max_failed_checks: 2,
    }
}

pub fn state_name(plan: &Plan) -> &'static str {
    match plan.state() {
        State::Unspecified => "unknown",
        State::Running => "running",
        State::Paused => "paused",
        State::Aborted => "aborted",
        State::Promoted => "promoted",
    }
}

/// What `chatctl rollout start` asks for.
#[derive(Clone, Debug)]
pub struct StartArgs {
    pub id: String,
    pub service: String,
    pub canary: String,
    pub steps: Vec<u32>,
    pub interval_ms: u64,
    pub thresholds: Thresholds,
}

pub(crate) fn decide(plan: &mut Plan, at_ms: i64, action: &str, reason: String) {
    plan.decisions.push(Decision {
        at_ms,
        check: plan.check,
        action: action.to_owned(),
        weight: plan.weight,
        reason,
    });
    if plan.decisions.len() > MAX_DECISIONS {
        let extra = plan.decisions.len() - MAX_DECISIONS;
        plan.decisions.drain(..extra);
    }
}

/// Whether a plan still steers traffic and so blocks a new one.
pub fn in_progress(plan: &Plan) -> bool {
    matches!(plan.state(), State::Running | State::Paused)
}

/// A new running plan at its first step. `current` is the stored plan, if
/// any: one still in progress must be aborted or promoted first.
pub fn start(args: StartArgs, current: Option<&Plan>, now_ms: i64) -> Result<Plan, String> {
    if let Some(p) = current.filter(|p| in_progress(p)) {
        return Err(format!(
            "a rollout of {} (canary {:?}, plan {}) is {}; abort or promote it first",
            p.service,
            p.canary,
            p.id,
            state_name(p)
        ));
    }
    if args.canary.is_empty() {
        return Err("the canary release label is empty".into());
    }
    if args.steps.is_empty() || args.steps.last() != Some(&100) {
        return Err(format!("steps {:?} must end at 100", args.steps));
    }
    if args.steps.iter().any(|&s| s == 0 || s > 100) || !args.steps.is_sorted_by(|a, b| a < b) {
        return Err(format!(
            "steps {:?} must be strictly increasing percentages from 1 to 100",
            args.steps
        ));
    }
    if args.interval_ms < 1_000 {
        return Err(format!(
            "an interval of {} ms is too short to judge anything; at least 1 s",
            args.interval_ms
        ));
    }
    let t = &args.thresholds;
    if t.min_success_permille > 1_000 || t.max_latency_ratio < 1.0 || t.max_failed_checks == 0 {
        return Err(format!(
            "thresholds out of range: success {}‰ (at most 1000), latency ratio {} (at least 1), failed checks {} (at least 1)",
            t.min_success_permille, t.max_latency_ratio, t.max_failed_checks
        ));
    }
    let mut plan = Plan {
        id: args.id,
        service: args.service,
        canary: args.canary,
        weight: args.steps[0],
        steps: args.steps,
        interval_ms: args.interval_ms,
        thresholds: Some(args.thresholds),
        state: State::Running as i32,
        step: 0,
        check: 1,
        check_started_ms: now_ms,
        failed_checks: 0,
        decisions: Vec::new(),
        started_ms: now_ms,
    };
    let reason = format!("canary {} at {} %", plan.canary, plan.weight);
    decide(&mut plan, now_ms, "start", reason);
    Ok(plan)
}

/// An operator's command on a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Promote,
}

/// The plan after `cmd`, or why it does not apply.
pub fn command(plan: &Plan, cmd: Command, now_ms: i64, by: &str) -> Result<Plan, String> {
    let mut p = plan.clone();
    let state = plan.state();
    let (action, reason) = match (cmd, state) {
        (Command::Pause, State::Running) => {
            p.state = State::Paused as i32;
            ("pause", format!("paused by {by}"))
        }
        (Command::Resume, State::Paused) => {
            p.state = State::Running as i32;
            // A fresh window: what happened while paused is not judged.
            p.check += 1;
            p.check_started_ms = now_ms;
            ("resume", format!("resumed by {by}"))
        }
        (Command::Abort, State::Running | State::Paused) => {
            p.state = State::Aborted as i32;
            p.weight = 0;
            ("abort", format!("aborted by {by}"))
        }
        (Command::Promote, State::Running | State::Paused) => {
            p.state = State::Promoted as i32;
            p.weight = 100;
            p.step = (p.steps.len() as u32).saturating_sub(1);
            ("promote", format!("promoted by {by}"))
        }
        (cmd, _) => {
            return Err(format!(
                "cannot {} a rollout that is {}",
                format!("{cmd:?}").to_lowercase(),
                state_name(plan)
            ));
        }
    };
    decide(&mut p, now_ms, action, reason);
    Ok(p)
}

/// FNV-1a, stable across builds and machines (the assignment must not
/// change when a gateway restarts or is upgraded).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Whether `user`'s traffic goes to the canary now. Sticky: a user's place
/// in the plan (0..10000) never changes during a rollout, and raising the
/// weight only adds users, so nobody flips back and forth between versions.
pub fn is_canary(plan: &Plan, user: &str) -> bool {
    let weight = match plan.state() {
        State::Running | State::Paused | State::Promoted => plan.weight.min(100),
        State::Aborted | State::Unspecified => 0,
    };
    let place = fnv1a(&[plan.id.as_bytes(), user.as_bytes()]) % 10_000;
    place < u64::from(weight) * 100
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn args() -> StartArgs {
        StartArgs {
            id: "r1".into(),
            service: "router".into(),
            canary: "v2".into(),
            steps: vec![5, 25, 50, 100],
            interval_ms: 5_000,
            thresholds: default_thresholds(),
        }
    }

    #[test]
    fn a_plan_starts_at_its_first_step_and_bad_plans_are_refused() {
        let p = start(args(), None, 1_000).unwrap();
        assert_eq!((p.state(), p.weight, p.check), (State::Running, 5, 1));
        assert_eq!(p.decisions[0].action, "start");
        let err = start(args(), Some(&p), 2_000).unwrap_err();
        assert!(err.contains("abort or promote it first"), "{err}");
        for steps in [
            vec![],
            vec![5, 50],
            vec![50, 5, 100],
            vec![0, 100],
            vec![5, 5, 100],
        ] {
            let a = StartArgs { steps, ..args() };
            assert!(start(a, None, 0).is_err());
        }
        let a = StartArgs {
            interval_ms: 10,
            ..args()
        };
        assert!(start(a, None, 0).unwrap_err().contains("too short"));
        // A finished plan does not block the next.
        let done = command(&p, Command::Abort, 3_000, "test").unwrap();
        assert!(start(args(), Some(&done), 4_000).is_ok());
    }

    #[test]
    fn commands_move_the_plan_and_say_when_they_do_not_apply() {
        let p = start(args(), None, 0).unwrap();
        let paused = command(&p, Command::Pause, 10, "op").unwrap();
        assert_eq!(paused.state(), State::Paused);
        assert!(command(&paused, Command::Pause, 11, "op").is_err());
        let resumed = command(&paused, Command::Resume, 20, "op").unwrap();
        assert_eq!((resumed.check, resumed.check_started_ms), (2, 20));
        let promoted = command(&resumed, Command::Promote, 30, "op").unwrap();
        assert_eq!((promoted.state(), promoted.weight), (State::Promoted, 100));
        let err = command(&promoted, Command::Abort, 40, "op").unwrap_err();
        assert!(
            err.contains("cannot abort a rollout that is promoted"),
            "{err}"
        );
        let aborted = command(&p, Command::Abort, 50, "op").unwrap();
        assert_eq!((aborted.state(), aborted.weight), (State::Aborted, 0));
        assert_eq!(aborted.decisions.last().unwrap().reason, "aborted by op");
    }

    #[test]
    fn assignment_is_sticky_grows_with_the_weight_and_matches_it() {
        let mut p = start(args(), None, 0).unwrap();
        let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let canary = |p: &Plan| -> Vec<bool> { users.iter().map(|u| is_canary(p, u)).collect() };
        let at5 = canary(&p);
        assert_eq!(at5, canary(&p), "the same answer every time");
        p.weight = 25;
        let at25 = canary(&p);
        assert!(
            at5.iter().zip(&at25).all(|(a, b)| !a || *b),
            "raising the weight only adds canary users"
        );
        for (share, weight) in [(&at5, 5.0), (&at25, 25.0)] {
            let pct = share.iter().filter(|c| **c).count() as f64 * 100.0 / users.len() as f64;
            assert!((pct - weight).abs() < 1.0, "{pct} % for weight {weight}");
        }
        p.state = State::Aborted as i32;
        assert!(
            canary(&p).iter().all(|c| !c),
            "an aborted plan has no canary users"
        );
        p.state = State::Promoted as i32;
        p.weight = 100;
        assert!(canary(&p).iter().all(|c| *c));
        // Another rollout draws other users.
        let mut q = start(
            StartArgs {
                id: "r2".into(),
                ..args()
            },
            None,
            0,
        )
        .unwrap();
        q.weight = 5;
        assert_ne!(canary(&q), at5);
    }
}
