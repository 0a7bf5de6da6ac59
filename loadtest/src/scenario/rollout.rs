//! What a canary drill showed: when the rollout advanced, aborted or was
//! promoted, when errors began and stopped, and how many users and
//! requests they reached (the blast radius) against the canary's weight.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use super::SendRecord;
use super::report::Slo;

/// The drill's plan as it ended, and when things happened.
pub struct RolloutRecord {
    pub plan: chat_rollout::Plan,
    /// Wall-clock ms of the load's start (decisions carry wall-clock times).
    pub epoch_ms: i64,
    pub canary_started_s: f64,
    /// When the plan was seen promoted or aborted.
    pub finished_s: Option<f64>,
    pub interval_s: f64,
}

#[derive(Serialize, Debug)]
pub struct DecisionRow {
    pub at_s: f64,
    pub check: u64,
    pub action: String,
    pub weight: u32,
    pub reason: String,
}

#[derive(Serialize, Debug)]
pub struct RolloutSummary {
    pub state: String,
    pub steps: Vec<u32>,
    pub interval_s: f64,
    pub canary_started_s: f64,
    pub decisions: Vec<DecisionRow>,
    /// First and last failed send (not shed) after the canary started.
    pub first_error_s: Option<f64>,
    pub last_error_s: Option<f64>,
    /// When the abort decision was taken.
    pub aborted_s: Option<f64>,
    /// When the drill saw the plan promoted or aborted.
    pub finished_s: Option<f64>,
    /// How long the fault reached users: from the first error to the last,
    /// or (a fault that fails nothing, added latency) from the canary's
    /// start to the abort.
    pub rollback_s: Option<f64>,
    /// Canary weight (percent) when the rollout aborted, or its highest.
    pub weight_at_end: u32,
    pub users: usize,
    pub users_with_errors: usize,
    /// Users the plan's sticky hash gave the canary at that weight.
    pub users_on_canary: usize,
    /// Users who saw errors although the hash kept them on stable.
    pub users_with_errors_off_canary: usize,
    pub sends: usize,
    pub sends_failed: usize,
}

pub fn summarize(
    r: &RolloutRecord,
    sends: &[SendRecord],
    users: &[String],
    load_start_us: u64,
) -> RolloutSummary {
    let p = &r.plan;
    let rel = |ms: i64| ((ms - r.epoch_ms) as f64 / 1e3 * 10.0).round() / 10.0;
    let decisions: Vec<DecisionRow> = p
        .decisions
        .iter()
        .map(|d| DecisionRow {
            at_s: rel(d.at_ms),
            check: d.check,
            action: d.action.clone(),
            weight: d.weight,
            reason: d.reason.clone(),
        })
        .collect();
    let aborted_s = decisions
        .iter()
        .find(|d| d.action == "abort")
        .map(|d| d.at_s);
    // The weight users were exposed to: the step the plan stood at.
    let weight_at_end = p
        .steps
        .get(p.step as usize)
        .copied()
        .unwrap_or(p.weight)
        .max(p.weight);
    let s_of = |us: u64| us.saturating_sub(load_start_us) as f64 / 1e6;
    let after = load_start_us + (r.canary_started_s * 1e6) as u64;
    let failed: Vec<&SendRecord> = sends
        .iter()
        .filter(|s| {
            s.done_us >= after && matches!(s.outcome, Err(c) if c != tonic::Code::ResourceExhausted)
        })
        .collect();
    let first_error_s = failed.iter().map(|s| s.done_us).min().map(s_of);
    let last_error_s = failed.iter().map(|s| s.done_us).max().map(s_of);
    let mut exposed = p.clone();
    exposed.state = chat_rollout::State::Running as i32;
    exposed.weight = weight_at_end;
    let on_canary: BTreeSet<u32> = (0..users.len() as u32)
        .filter(|&u| chat_rollout::is_canary(&exposed, &users[u as usize]))
        .collect();
    let erring: BTreeSet<u32> = failed.iter().map(|s| s.sender).collect();
    RolloutSummary {
        state: chat_rollout::state_name(p).to_owned(),
        steps: p.steps.clone(),
        interval_s: r.interval_s,
        canary_started_s: (r.canary_started_s * 10.0).round() / 10.0,
        decisions,
        first_error_s,
        last_error_s,
        aborted_s,
        finished_s: r.finished_s.map(|x| (x * 10.0).round() / 10.0),
        rollback_s: match (first_error_s, last_error_s) {
            (Some(a), Some(b)) => Some(b - a),
            _ => aborted_s.map(|x| x - r.canary_started_s),
        },
        weight_at_end,
        users: users.len(),
        users_with_errors: erring.len(),
        users_on_canary: on_canary.len(),
        users_with_errors_off_canary: erring.difference(&on_canary).count(),
        sends: sends.len(),
        sends_failed: failed.len(),
    }
}

fn share(n: usize, of: usize) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

/// The drill's pass criteria.
pub fn slos(s: &RolloutSummary, bad_release: bool) -> Vec<(String, Slo)> {
    if !bad_release {
        return vec![(
            "promoted".into(),
            Slo {
                target: "the canary reaches 100 %".into(),
                actual: s.state.clone().into(),
                pass: s.state == "promoted",
            },
        )];
    }
    let limit = 3.0 * s.interval_s;
    let rolled_back = s.state == "aborted" && s.rollback_s.is_some_and(|r| r <= limit);
    let w = f64::from(s.weight_at_end) / 100.0;
    let (users, reqs) = (
        share(s.users_on_canary, s.users),
        share(s.sends_failed, s.sends),
    );
    vec![
        (
            "rolled_back".into(),
            Slo {
                target: format!(
                    "aborted, the fault over within 3 intervals ({limit:.0} s) of showing"
                ),
                actual: format!(
                    "{}, the fault reached users for {}",
                    s.state,
                    s.rollback_s.map_or("-".into(), |r| format!("{r:.1} s"))
                )
                .into(),
                pass: rolled_back,
            },
        ),
        (
            "blast_radius".into(),
            Slo {
                target: format!(
                    "errors only for users the plan put on the canary; failed sends <= canary weight ({} %)",
                    s.weight_at_end
                ),
                actual: format!(
                    "{} users with errors ({} off the canary; {} of {} users on it, {:.1} %), sends {:.2} %",
                    s.users_with_errors,
                    s.users_with_errors_off_canary,
                    s.users_on_canary,
                    s.users,
                    users * 100.0,
                    reqs * 100.0
                )
                .into(),
                pass: s.users_with_errors_off_canary == 0 && reqs <= w,
            },
        ),
    ]
}

/// The report's rollout section (Markdown).
pub fn markdown(s: &RolloutSummary) -> String {
    let mut m = String::new();
    let opt = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
    let _ = writeln!(
        m,
        "\n## Rollout\n\n- canary started at {:.1} s; steps {:?} every {} s; {} (seen at {} s)\n- errors from {} s to {} s (rollback {} s); aborted at {} s\n- blast radius: {} of {} users saw errors ({} on the canary at {} %, {} off it); {} of {} sends failed\n\n| at s | check | action | weight % | reason |\n|---|---|---|---|---|",
        s.canary_started_s,
        s.steps,
        s.interval_s,
        s.state,
        opt(s.finished_s),
        opt(s.first_error_s),
        opt(s.last_error_s),
        opt(s.rollback_s),
        opt(s.aborted_s),
        s.users_with_errors,
        s.users,
        s.users_on_canary,
        s.weight_at_end,
        s.users_with_errors_off_canary,
        s.sends_failed,
        s.sends
    );
    for d in &s.decisions {
        let _ = writeln!(
            m,
            "| {:.1} | {} | {} | {} | {} |",
            d.at_s, d.check, d.action, d.weight, d.reason
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(sender: u32, done_s: f64, ok: bool) -> SendRecord {
        let us = (done_s * 1e6) as u64;
        SendRecord {
            conv: 0,
            sender,
            k: 0,
            intended_us: us,
            started_us: us,
            done_us: us,
            outcome: if ok {
                Ok(1)
            } else {
                Err(tonic::Code::Internal)
            },
        }
    }

    fn canary_set_has(plan: &chat_rollout::Plan, users: &[String], u: u32) -> bool {
        let mut p = plan.clone();
        p.state = chat_rollout::State::Running as i32;
        p.weight = 25;
        chat_rollout::is_canary(&p, &users[u as usize])
    }

    fn slos_pass(s: &RolloutSummary) -> bool {
        slos(s, true).iter().all(|(_, v)| v.pass)
    }

    #[test]
    fn the_blast_radius_counts_users_and_sends_against_the_canary_set() {
        let mut plan = chat_rollout::start(
            chat_rollout::StartArgs {
                id: "drill".into(),
                service: "router".into(),
                canary: "canary".into(),
                steps: vec![25, 100],
                interval_ms: 5_000,
                thresholds: chat_rollout::default_thresholds(),
            },
            None,
            1_000,
        )
        .unwrap();
        plan.state = chat_rollout::State::Aborted as i32;
        plan.weight = 0;
        let users: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
        let canary_user = (0..40u32)
            .find(|&u| canary_set_has(&plan, &users, u))
            .unwrap();
        let mut sends = vec![
            send(canary_user, 3.0, false),
            send(canary_user, 7.5, false),
            send(canary_user, 9.0, true),
            send(1, 0.5, false), // before the canary: not counted
        ];
        sends.extend((0..16).map(|i| send(i, 4.0, true)));
        let r = RolloutRecord {
            plan,
            epoch_ms: 0,
            canary_started_s: 2.0,
            finished_s: Some(10.0),
            interval_s: 5.0,
        };
        let s = summarize(&r, &sends, &users, 0);
        assert_eq!(
            (s.weight_at_end, s.users_with_errors, s.sends_failed),
            (25, 1, 2)
        );
        assert_eq!(s.users_with_errors_off_canary, 0);
        assert_eq!(s.rollback_s, Some(4.5));
        let slos = slos(&s, true);
        assert!(slos.iter().all(|(_, v)| v.pass), "{slos:?}");
        // An error for a user the plan kept on stable fails the drill.
        let off = (0..40u32)
            .find(|u| !canary_set_has(&r.plan, &users, *u))
            .unwrap();
        sends.push(send(off, 5.0, false));
        let s = summarize(&r, &sends, &users, 0);
        assert_eq!(s.users_with_errors_off_canary, 1);
        assert!(!slos_pass(&s));
    }
}
