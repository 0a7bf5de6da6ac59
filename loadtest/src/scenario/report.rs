//! The run's report: JSON, a Markdown summary and an SVG chart in the run's
//! directory, a summary on stdout, and a live progress line on stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::rollout::{RolloutRecord, RolloutSummary};
use super::verify::{Verification, hist};
use super::{Args, Ctx, Load, SendRecord};

#[derive(Serialize, Debug, Clone)]
pub struct FaultRecord {
    pub at_s: f64,
    pub kind: String,
    pub target: String,
    /// Longest gap between acks from the last ack before the fault until
    /// the next fault (or the end of the load).
    pub unavailability_ms: Option<u64>,
    /// From the fault until goodput is back for good: from then until the
    /// next fault (or the end of the load), of the sends scheduled in every
    /// second-long window (taken every 100 ms) at least
    /// [`RECOVERED_GOODPUT`] were acked within [`GOOD_WITHIN_US`]. `None`:
    /// not back before the next fault or the end.
    pub recovery_s: Option<f64>,
    /// The fault took a whole tier away (no quorum), so it ends only when
    /// the tier is started again: its recovery is judged from that restart.
    pub until_restart: bool,
}

/// Goodput, as a share of the offered load, that counts as recovered.
pub const RECOVERED_GOODPUT: f64 = 0.95;

/// A send counts toward goodput when it is acked within this of being
/// scheduled (100 times the usual p99): late acks of a backlog do not make
/// up for the sends refused meanwhile, and a short stall is not a failure.
const GOOD_WITHIN_US: u64 = 1_000_000;

/// The windows of the recovery measurement, and the step between them.
const RECOVERY_WINDOW_US: u64 = 1_000_000;
const RECOVERY_STEP_US: u64 = 100_000;

impl FaultRecord {
    pub fn new(at_s: f64, kind: String, target: String) -> Self {
        Self {
            at_s: (at_s * 1000.0).round() / 1000.0,
            kind,
            target,
            unavailability_ms: None,
            recovery_s: None,
            until_restart: false,
        }
    }
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct Second {
    pub t_s: u64,
    pub offered: u64,
    pub acked: u64,
    pub failed: u64,
    pub shed: u64,
    /// Of the acked sends scheduled in this second.
    pub p99_ms: Option<f64>,
}

/// Typing calls made alongside sends, by outcome.
#[derive(Default)]
pub struct TypingTally {
    sent: AtomicU64,
    ok: AtomicU64,
    shed: AtomicU64,
    failed: AtomicU64,
}

impl TypingTally {
    pub fn record(&self, r: Result<(), tonic::Status>) {
        self.sent.fetch_add(1, Relaxed);
        let counter = match r {
            Ok(()) => &self.ok,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => &self.shed,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> TypingCounts {
        TypingCounts {
            sent: self.sent.load(Relaxed),
            ok: self.ok.load(Relaxed),
            shed: self.shed.load(Relaxed),
            failed: self.failed.load(Relaxed),
        }
    }
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct TypingCounts {
    pub sent: u64,
    pub ok: u64,
    /// Refused for overload (RESOURCE_EXHAUSTED), by a server or by the
    /// client's own throttling.
    pub shed: u64,
    pub failed: u64,
}

impl TypingCounts {
    pub fn since(&self, before: &Self) -> Self {
        Self {
            sent: self.sent - before.sent,
            ok: self.ok - before.ok,
            shed: self.shed - before.shed,
            failed: self.failed - before.failed,
        }
    }
}

/// `part` of `whole`, rounded to 0.1 %.
fn share(part: u64, whole: u64) -> f64 {
    (part as f64 / whole.max(1) as f64 * 1000.0).round() / 1000.0
}

#[derive(Serialize, Debug)]
pub struct AckLatency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Serialize, Debug)]
pub struct DeliveryLatency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Serialize, Debug)]
pub struct Slo {
    pub target: String,
    pub actual: serde_json::Value,
    pub pass: bool,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub started_at: String,
    pub duration_s: f64,
    pub load: String,
    /// Scheduled sends per second over the load phase.
    pub offered_rate: f64,
    /// congestion: acked sends/s at saturation (probe or --capacity).
    pub capacity_per_s: Option<f64>,
    /// Gateways' overload protection (off with --no-protection).
    pub overload_protection: bool,
    pub users: usize,
    pub conversations: usize,
    pub group_size: usize,
    pub body_bytes: usize,
    pub sent: u64,
    pub acked: u64,
    /// Final gRPC code → count, shed sends (RESOURCE_EXHAUSTED) excluded.
    pub failed: BTreeMap<String, u64>,
    pub shed: u64,
    /// Calls (sends and typing) the clients refused themselves, unsent,
    /// because the gateways had been refusing for overload: part of `shed`
    /// and of the typing calls shed.
    pub held_back_by_clients: u64,
    /// Typing calls (sheddable) made alongside the sends.
    pub typing: TypingCounts,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub delivery_missed: u64,
    pub delivery_duplicated: u64,
    /// Acked under a seq other than the one stored.
    pub seq_mismatch: u64,
    /// Stored although the sender saw the send fail (not an error).
    pub stored_unacked: u64,
    pub goodput_per_s: f64,
    pub ack_latency_ms: AckLatency,
    /// How late the load generator began sends against their schedule
    /// (part of send→ack; large when the generator itself is starved).
    pub start_lag_ms: DeliveryLatency,
    pub delivery_latency_ms: DeliveryLatency,
    pub max_unavailability_ms: u64,
    /// Sends not acked that were never under way during a fault window.
    pub refused_outside_faults: u64,
    /// congestion: send→ack p99 (ms) of the sends scheduled in the first
    /// 3 s of the ramp (light load) and at its top (≥ 90 % of the end rate).
    pub ramp_p99_ms: Option<(f64, f64)>,
    /// Peak resident memory of each service process at the end of the
    /// load, MiB (local target only).
    pub peak_rss_mib: BTreeMap<String, f64>,
    pub faults: Vec<FaultRecord>,
    pub timeline: Vec<Second>,
    pub slo: BTreeMap<String, Slo>,
    /// canary-*: the rollout and its blast radius.
    pub rollout: Option<RolloutSummary>,
    /// dr, corrupt-replica: what the drill did and found.
    pub drill: super::drill::DrillSummary,
    /// flood: the users' service before and under attack, and the attacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<super::flood::Summary>,
    /// Things that went wrong around the load (a fault that could not be
    /// injected, a read-back that failed, ...).
    pub notes: Vec<String>,
    pub pass: bool,
}

pub struct BuildArgs<'a> {
    pub scenario: &'a str,
    pub target: String,
    pub started_at: SystemTime,
    pub args: &'a Args,
    pub load: Load,
    pub capacity: Option<f64>,
    pub verification: Verification,
    pub sends: &'a [SendRecord],
    pub load_start_us: u64,
    pub faults: Vec<FaultRecord>,
    pub notes: Vec<String>,
    pub typing: TypingCounts,
    /// Faults, restarts or drill steps that could not be carried out.
    pub control_errors: Vec<String>,
    pub held_back_by_clients: u64,
    pub peak_rss_mib: BTreeMap<String, f64>,
    pub rollout: Option<RolloutRecord>,
    pub drill: super::drill::DrillSummary,
    pub flood: Option<super::flood::Summary>,
    /// User ids by index (for the canary assignment).
    pub users: &'a [String],
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}

/// Where the `i`th fault's window can reach at most: the next fault, or
/// the end of the load (seconds from the load's start).
fn horizon_s(faults: &[FaultRecord], i: usize, end_s: f64) -> f64 {
    faults.get(i + 1).map_or(end_s, |n| n.at_s)
}

/// The recovery SLO over the faults of a run: each must have goodput back
/// within `limit` seconds. A fault followed by the next one sooner than
/// that is judged with the next one; a fault that took a tier away is
/// judged from the tier's restart.
fn recovery_slo(faults: &[FaultRecord], end_s: f64, limit: f64) -> Slo {
    let mut worst = 0.0f64;
    let mut not_back = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        let next_s = horizon_s(faults, i, end_s);
        match f.recovery_s {
            Some(r) => worst = worst.max(r),
            None if f.until_restart => {}
            None if i + 1 < faults.len() && next_s - f.at_s < limit => {}
            None => not_back.push(format!("{} at {:.1} s", f.kind, f.at_s)),
        }
    }
    let actual = if not_back.is_empty() {
        serde_json::Value::from((worst * 10.0).round() / 10.0)
    } else {
        format!("goodput not back after {}", not_back.join(", ")).into()
    };
    Slo {
        target: format!(
            "<= {limit} (s from each fault until goodput stays >= {:.0} % of offered)",
            RECOVERED_GOODPUT * 100.0
        ),
        actual,
        pass: not_back.is_empty() && worst <= limit,
    }
}

/// Sends that did not get an ack and were never in flight during a fault
/// window: from a fault until the end of the first second-long window in
/// which goodput was back (recovery allows 5 % of that window to be
/// refused: those refusals are the fault's tail, bounded by the recovery
/// SLO), or until the next fault when it never was back. A send under way
/// when the fault struck is the fault's.
fn refused_outside(sends: &[SendRecord], start: u64, faults: &[FaultRecord], end_s: f64) -> u64 {
    let windows: Vec<(u64, u64)> = faults
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let next_s = horizon_s(faults, i, end_s);
            let until = f
                .recovery_s
                .map_or(next_s, |r| f.at_s + r + RECOVERY_WINDOW_US as f64 / 1e6);
            let us = |s: f64| start + (s * 1e6) as u64;
            (us(f.at_s), us(until))
        })
        .collect();
    let end = start + (end_s * 1e6) as u64;
    sends
        .iter()
        .filter(|r| r.outcome.is_err() && r.intended_us < end)
        .filter(|r| {
            !windows
                .iter()
                .any(|&(a, b)| r.intended_us <= b && r.done_us >= a)
        })
        .count() as u64
}

/// Microseconds from `from` until goodput is back for good before `to`:
/// the start of the first window (of [`RECOVERY_WINDOW_US`], every
/// [`RECOVERY_STEP_US`]) from which, in every window ending by `to`, at
/// least [`RECOVERED_GOODPUT`] of the sends scheduled in it were acked
/// within [`GOOD_WITHIN_US`]. `None` when the last window before `to` still
/// falls short (or no window fits).
fn recovery(sends: &[SendRecord], from: u64, to: u64) -> Option<u64> {
    if to < from + RECOVERY_WINDOW_US {
        return None;
    }
    let buckets = ((to - from) / RECOVERY_STEP_US) as usize;
    let (mut offered, mut good) = (vec![0u64; buckets], vec![0u64; buckets]);
    for r in sends {
        if r.intended_us < from {
            continue;
        }
        let i = ((r.intended_us - from) / RECOVERY_STEP_US) as usize;
        if i >= buckets {
            continue;
        }
        offered[i] += 1;
        if r.outcome.is_ok() && r.done_us.saturating_sub(r.intended_us) <= GOOD_WITHIN_US {
            good[i] += 1;
        }
    }
    let per_window = (RECOVERY_WINDOW_US / RECOVERY_STEP_US) as usize;
    let short = |k: usize| {
        let o: u64 = offered[k..k + per_window].iter().sum();
        let g: u64 = good[k..k + per_window].iter().sum();
        (g as f64) < RECOVERED_GOODPUT * o as f64
    };
    let windows = buckets + 1 - per_window;
    match (0..windows).rev().find(|&k| short(k)) {
        None => Some(0),
        Some(k) if k + 1 == windows => None,
        Some(k) => Some((k as u64 + 1) * RECOVERY_STEP_US),
    }
}

/// The longest gap between consecutive acks (`acks` sorted) from the last
/// ack before `from` through the first ack after `to`, or up to `to` when
/// none came after.
fn longest_gap(acks: &[u64], from: u64, to: u64) -> u64 {
    let i = acks.partition_point(|&t| t < from);
    let mut prev = if i > 0 { acks[i - 1] } else { from };
    let mut longest = 0;
    for &t in &acks[i..] {
        longest = longest.max(t - prev);
        prev = t;
        if t > to {
            return longest;
        }
    }
    longest.max(to.saturating_sub(prev))
}

impl Report {
    pub fn build(b: BuildArgs<'_>) -> Self {
        let a = b.args;
        let v = b.verification;
        let start = b.load_start_us;
        let end = start + (a.duration * 1e6) as u64;
        let sec = |t: u64| t.saturating_sub(start) / 1_000_000;
        let mut ack_h = hist();
        let mut failed = BTreeMap::new();
        let (mut acked, mut shed) = (0u64, 0u64);
        let last = b.sends.iter().map(|r| sec(r.done_us)).max().unwrap_or(0);
        let n_secs = (last + 1).max(a.duration.ceil() as u64) as usize;
        let mut timeline: Vec<Second> = (0..n_secs)
            .map(|t| Second {
                t_s: t as u64,
                ..Default::default()
            })
            .collect();
        let mut sec_h: Vec<Histogram<u64>> = (0..n_secs).map(|_| hist()).collect();
        let mut ack_times = Vec::new();
        let mut lag_h = hist();
        for r in b.sends {
            let _ = lag_h.record(r.started_us.saturating_sub(r.intended_us).max(1));
            let (si, sd) = (sec(r.intended_us) as usize, sec(r.done_us) as usize);
            timeline[si].offered += 1;
            match r.outcome {
                Ok(_) => {
                    acked += 1;
                    let lat = r.done_us.saturating_sub(r.intended_us).max(1);
                    let _ = ack_h.record(lat);
                    let _ = sec_h[si].record(lat);
                    timeline[sd].acked += 1;
                    ack_times.push(r.done_us);
                }
                Err(tonic::Code::ResourceExhausted) => {
                    shed += 1;
                    timeline[sd].shed += 1;
                }
                Err(c) => {
                    *failed.entry(code_name(c)).or_insert(0) += 1;
                    timeline[sd].failed += 1;
                }
            }
        }
        for (s, h) in timeline.iter_mut().zip(&sec_h) {
            if !h.is_empty() {
                s.p99_ms = Some(ms(h.value_at_quantile(0.99)));
            }
        }
        ack_times.sort_unstable();

        // Unavailability and recovery per fault.
        let mut faults = b.faults;
        let us = |s: f64| start + (s * 1e6) as u64;
        let windows: Vec<(u64, u64)> = (0..faults.len())
            .map(|i| {
                let from = us(faults[i].at_s);
                (from, us(horizon_s(&faults, i, a.duration)).max(from))
            })
            .collect();
        for (f, (from, to)) in faults.iter_mut().zip(windows) {
            f.unavailability_ms = Some(longest_gap(&ack_times, from, to) / 1000);
            f.recovery_s = recovery(b.sends, from, to).map(|us| (us as f64 / 1e5).round() / 10.0);
            f.until_restart = super::fault::KINDS
                .iter()
                .any(|(n, k)| *n == f.kind && k.takes_tier_away());
        }
        let max_unavailability_ms = if faults.is_empty() {
            longest_gap(&ack_times, start, end) / 1000
        } else {
            faults
                .iter()
                .filter_map(|f| f.unavailability_ms)
                .max()
                .unwrap_or(0)
        };

        let q = |h: &Histogram<u64>, p: f64| {
            if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(p))
            }
        };
        let dh = &v.delivery_latency;
        let in_load = b.sends.iter().filter(|r| r.intended_us < end).count() as f64;
        let goodput = b
            .sends
            .iter()
            .filter(|r| r.outcome.is_ok() && r.intended_us < end)
            .count() as f64
            / a.duration;

        let mut slo = BTreeMap::new();
        let mut zero = |name: &str, actual: u64| {
            slo.insert(
                name.to_owned(),
                Slo {
                    target: "= 0".into(),
                    actual: actual.into(),
                    pass: actual == 0,
                },
            );
        };
        zero("lost", v.lost + v.seq_mismatch);
        zero("duplicated", v.duplicated);
        zero("out_of_order", v.out_of_order);
        zero("delivery_missed", v.delivery_missed);
        zero("delivery_duplicated", v.delivery_duplicated);
        if matches!(
            b.scenario,
            "rolling-restart" | "reconnect-storm" | "canary-good-release"
        ) {
            zero("failed", failed.values().sum::<u64>() + shed);
        }
        let rollout = b
            .rollout
            .as_ref()
            .map(|r| super::rollout::summarize(r, b.sends, b.users, start));
        if let Some(r) = &rollout {
            slo.extend(super::rollout::slos(r, b.scenario == "canary-bad-release"));
        }
        slo.extend(super::drill::slos(&b.drill));
        if let Some(f) = &b.flood {
            slo.extend(super::flood::slos(f));
        }
        // A drill whose fault was never injected proves nothing.
        slo.insert(
            "drill_carried_out".into(),
            Slo {
                target: "every fault, restart and step done".into(),
                actual: b
                    .control_errors
                    .first()
                    .map_or("yes".into(), |e| e.clone().into()),
                pass: b.control_errors.is_empty(),
            },
        );
        slo.insert(
            "verified".into(),
            Slo {
                target: "every conversation read back".into(),
                actual: v.read_error.clone().map_or("yes".into(), |e| e.into()),
                pass: v.read_error.is_none(),
            },
        );
        let judged = matches!(b.load, Load::Constant(_))
            && !matches!(b.scenario, "congestion" | "canary-bad-release");
        if judged && !faults.is_empty() {
            slo.insert(
                "recovery_s".into(),
                recovery_slo(&faults, a.duration, a.max_recovery_s),
            );
        }
        // Refusals while nothing is wrong, at a load well below capacity,
        // are failures too: protection that refuses then is miscalibrated.
        let refused_outside_faults = refused_outside(b.sends, start, &faults, a.duration);
        let light = match (b.load, a.capacity) {
            (Load::Constant(r), Some(c)) => r <= c / 2.0,
            (Load::Constant(_), None) => true,
            _ => false,
        };
        if judged && light && matches!(b.scenario, "failover" | "steady" | "dr" | "corrupt-replica")
        {
            slo.insert(
                "refused_outside_faults".into(),
                Slo {
                    target: "= 0 (load at most half of capacity)".into(),
                    actual: refused_outside_faults.into(),
                    pass: refused_outside_faults == 0,
                },
            );
        }
        if faults.iter().any(|f| super::leader_fault(&f.kind)) {
            slo.insert(
                "max_unavailability_ms".into(),
                Slo {
                    target: format!("<= {}", a.max_unavailability_ms),
                    actual: max_unavailability_ms.into(),
                    pass: max_unavailability_ms <= a.max_unavailability_ms,
                },
            );
        }
        let mut ramp_p99_ms = None;
        if let Load::Ramp { to, .. } = b.load {
            let merged = |pick: &dyn Fn(&Second) -> bool| {
                let mut h = hist();
                for (sec, sh) in timeline.iter().zip(&sec_h) {
                    if (sec.t_s as f64) < a.duration && pick(sec) {
                        let _ = h.add(sh);
                    }
                }
                q(&h, 0.99)
            };
            ramp_p99_ms = Some((
                merged(&|s: &Second| s.t_s < 3),
                merged(&|s: &Second| s.offered as f64 >= 0.9 * to),
            ));
            // Goodput at the top of the ramp (offered ≥ 90 % of its end)
            // against the best 3-second goodput of the run.
            let in_load: Vec<&Second> = timeline
                .iter()
                .filter(|s| (s.t_s as f64) < a.duration)
                .collect();
            let top: Vec<u64> = in_load
                .iter()
                .filter(|s| s.offered as f64 >= 0.9 * to)
                .map(|s| s.acked)
                .collect();
            let overload = top.iter().sum::<u64>() as f64 / top.len().max(1) as f64;
            let peak = in_load
                .windows(3)
                .map(|w| w.iter().map(|s| s.acked).sum::<u64>() as f64 / 3.0)
                .fold(1.0f64, f64::max);
            let ratio = (overload / peak * 1000.0).round() / 1000.0;
            slo.insert(
                "overload_goodput_ratio".into(),
                Slo {
                    target: ">= 0.9 (acked/s at the top of the ramp ÷ best 3-s acked/s)".into(),
                    actual: ratio.into(),
                    pass: ratio >= 0.9,
                },
            );
        }
        if b.typing.sent > 0 {
            // Sheddable traffic goes first: typing is refused for overload
            // at least as often as sends are.
            let (t, s) = (
                share(b.typing.shed, b.typing.sent),
                share(shed, b.sends.len() as u64),
            );
            slo.insert(
                "sheddable_shed_first".into(),
                Slo {
                    target: "typing shed share >= send shed share".into(),
                    actual: format!("typing {:.1} %, sends {:.1} %", t * 100.0, s * 100.0).into(),
                    pass: t >= s,
                },
            );
        }
        let pass = slo.values().all(|s| s.pass);
        Report {
            scenario: b.scenario.to_owned(),
            target: b.target,
            started_at: rfc3339(b.started_at),
            duration_s: a.duration,
            load: b.load.describe(),
            offered_rate: (in_load / a.duration * 10.0).round() / 10.0,
            capacity_per_s: b.capacity.map(|c| c.round()),
            overload_protection: !a.no_protection,
            users: a.users,
            conversations: a.conversations,
            group_size: a.group_size,
            body_bytes: a.body_bytes,
            sent: b.sends.len() as u64,
            acked,
            failed,
            shed,
            typing: b.typing,
            held_back_by_clients: b.held_back_by_clients,
            lost: v.lost,
            duplicated: v.duplicated,
            out_of_order: v.out_of_order,
            delivery_missed: v.delivery_missed,
            delivery_duplicated: v.delivery_duplicated,
            seq_mismatch: v.seq_mismatch,
            stored_unacked: v.stored_unacked,
            goodput_per_s: (goodput * 10.0).round() / 10.0,
            ack_latency_ms: AckLatency {
                p50: q(&ack_h, 0.5),
                p90: q(&ack_h, 0.9),
                p99: q(&ack_h, 0.99),
                p999: q(&ack_h, 0.999),
                max: ms(ack_h.max()),
            },
            start_lag_ms: DeliveryLatency {
                p50: q(&lag_h, 0.5),
                p99: q(&lag_h, 0.99),
                max: ms(lag_h.max()),
            },
            delivery_latency_ms: DeliveryLatency {
                p50: q(dh, 0.5),
                p99: q(dh, 0.99),
                max: ms(dh.max()),
            },
            max_unavailability_ms,
            refused_outside_faults,
            ramp_p99_ms,
            peak_rss_mib: b.peak_rss_mib,
            faults,
            timeline,
            slo,
            rollout,
            drill: b.drill,
            flood: b.flood,
            notes: b
                .notes
                .into_iter()
                .chain(v.read_error)
                .chain(v.examples)
                .collect(),
            pass,
        }
    }

    /// report.json, report.md and chart.svg in `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("chart.svg"), self.svg())?;
        Ok(())
    }

    fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// The terminal summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} against {}: {} for {} s",
            self.scenario, self.target, self.load, self.duration_s
        );
        if let Some(c) = self.capacity_per_s {
            let _ = writeln!(
                s,
                "capacity (closed-loop probe or --capacity): {c:.0} acked sends/s"
            );
        }
        let _ = writeln!(
            s,
            "sent {}  acked {}  failed {} {:?}  shed {} ({} calls held back by the clients)  goodput {:.1}/s",
            self.sent,
            self.acked,
            self.failed_total(),
            self.failed,
            self.shed,
            self.held_back_by_clients,
            self.goodput_per_s
        );
        let l = &self.ack_latency_ms;
        let _ = writeln!(
            s,
            "send→ack ms: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        let d = &self.delivery_latency_ms;
        let _ = writeln!(
            s,
            "send→delivery ms: p50 {}  p99 {}  max {}",
            d.p50, d.p99, d.max
        );
        for f in &self.faults {
            let _ = write!(s, "fault at {:.1} s: {} {}", f.at_s, f.kind, f.target);
            if let Some(u) = f.unavailability_ms {
                let _ = write!(s, " (longest ack gap {u} ms");
                match f.recovery_s {
                    Some(r) => {
                        let _ = write!(s, ", goodput back after {r:.1} s)");
                    }
                    None if f.until_restart => s.push_str(", down until restarted)"),
                    None => s.push_str(", goodput not back before the next fault or the end)"),
                }
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "longest gap between acks: {} ms",
            self.max_unavailability_ms
        );
        if !self.faults.is_empty() {
            let _ = writeln!(
                s,
                "sends not acked outside the fault windows: {}",
                self.refused_outside_faults
            );
        }
        let _ = writeln!(
            s,
            "verification: lost {}, duplicated {}, out of order {}, delivery missed {}, delivery duplicated {}",
            self.lost + self.seq_mismatch,
            self.duplicated,
            self.out_of_order,
            self.delivery_missed,
            self.delivery_duplicated
        );
        if let Some(r) = &self.rollout {
            for d in &r.decisions {
                let _ = writeln!(
                    s,
                    "rollout at {:.1} s: {} -> {} % ({})",
                    d.at_s, d.action, d.weight, d.reason
                );
            }
            let _ = writeln!(
                s,
                "blast radius: {} of {} users, {} of {} sends failed; the fault reached users for {} s",
                r.users_with_errors,
                r.users,
                r.sends_failed,
                r.sends,
                r.rollback_s.map_or("-".into(), |x| format!("{x:.1}"))
            );
        }
        for l in super::drill::lines(&self.drill) {
            let _ = writeln!(s, "{l}");
        }
        for l in self.flood.iter().flat_map(super::flood::lines) {
            let _ = writeln!(s, "{l}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let failing: Vec<String> = self
            .slo
            .iter()
            .filter(|(_, v)| !v.pass)
            .map(|(k, v)| format!("{k} {} (target {})", v.actual, v.target))
            .collect();
        if failing.is_empty() {
            let _ = write!(
                s,
                "PASS: every SLO met ({})",
                self.slo.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        } else {
            let _ = write!(s, "FAIL: {}", failing.join("; "));
        }
        s
    }

    fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(
            m,
            "# loadtest {}: {}\n",
            self.scenario,
            if self.pass { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(m, "- target: {}", self.target);
        let _ = writeln!(
            m,
            "- overload protection: {}",
            if self.overload_protection {
                "on"
            } else {
                "off"
            }
        );
        let _ = writeln!(m, "- started: {}", self.started_at);
        let _ = writeln!(
            m,
            "- load: {} for {} s; {} users, {} conversations of {}, {}-byte bodies",
            self.load,
            self.duration_s,
            self.users,
            self.conversations,
            self.group_size,
            self.body_bytes
        );
        if let Some(c) = self.capacity_per_s {
            let _ = writeln!(m, "- capacity: {c:.0} acked sends/s");
        }
        let _ = writeln!(
            m,
            "\n![throughput, errors and latency over time](chart.svg)\n"
        );
        let _ = writeln!(m, "| figure | value |\n|---|---|");
        let l = &self.ack_latency_ms;
        let d = &self.delivery_latency_ms;
        for (k, v) in [
            ("offered /s", format!("{}", self.offered_rate)),
            ("sent", self.sent.to_string()),
            ("acked", self.acked.to_string()),
            (
                "failed",
                format!("{} {:?}", self.failed_total(), self.failed),
            ),
            ("shed", self.shed.to_string()),
            (
                "calls held back by the clients",
                self.held_back_by_clients.to_string(),
            ),
            (
                "sends not acked outside the fault windows",
                self.refused_outside_faults.to_string(),
            ),
            (
                "typing sent / ok / shed / failed",
                format!(
                    "{} / {} / {} / {}",
                    self.typing.sent, self.typing.ok, self.typing.shed, self.typing.failed
                ),
            ),
            ("goodput /s", format!("{}", self.goodput_per_s)),
            (
                "send start lag ms p50 / p99 / max",
                format!(
                    "{} / {} / {}",
                    self.start_lag_ms.p50, self.start_lag_ms.p99, self.start_lag_ms.max
                ),
            ),
            (
                "peak RSS MiB",
                self.peak_rss_mib
                    .iter()
                    .map(|(n, m)| format!("{n} {m}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "send→ack p99 ms, ramp start / top",
                self.ramp_p99_ms
                    .map_or("—".into(), |(lo, hi)| format!("{lo} / {hi}")),
            ),
            (
                "send→ack ms p50 / p90 / p99 / p99.9 / max",
                format!("{} / {} / {} / {} / {}", l.p50, l.p90, l.p99, l.p999, l.max),
            ),
            (
                "send→delivery ms p50 / p99 / max",
                format!("{} / {} / {}", d.p50, d.p99, d.max),
            ),
            (
                "longest gap between acks ms",
                self.max_unavailability_ms.to_string(),
            ),
            ("lost", (self.lost + self.seq_mismatch).to_string()),
            ("duplicated", self.duplicated.to_string()),
            ("out of order", self.out_of_order.to_string()),
            (
                "deliveries missed / duplicated",
                format!("{} / {}", self.delivery_missed, self.delivery_duplicated),
            ),
            (
                "stored though the send failed",
                self.stored_unacked.to_string(),
            ),
        ] {
            let _ = writeln!(m, "| {k} | {v} |");
        }
        let _ = writeln!(
            m,
            "\n## SLOs\n\n| SLO | target | actual | pass |\n|---|---|---|---|"
        );
        for (k, v) in &self.slo {
            let _ = writeln!(
                m,
                "| {k} | {} | {} | {} |",
                v.target,
                v.actual,
                if v.pass { "yes" } else { "**no**" }
            );
        }
        if !self.faults.is_empty() {
            let _ = writeln!(
                m,
                "\n## Faults\n\n| at s | kind | target | longest ack gap ms | recovery s |\n|---|---|---|---|---|"
            );
            for f in &self.faults {
                let _ = writeln!(
                    m,
                    "| {:.1} | {} | {} | {} | {} |",
                    f.at_s,
                    f.kind,
                    f.target,
                    f.unavailability_ms.map_or("-".into(), |u| u.to_string()),
                    match (f.recovery_s, f.until_restart) {
                        (Some(r), _) => format!("{r:.1}"),
                        (None, true) => "down until restarted".into(),
                        (None, false) => "**not back**".into(),
                    }
                );
            }
        }
        if let Some(r) = &self.rollout {
            m.push_str(&super::rollout::markdown(r));
        }
        let drill = super::drill::lines(&self.drill);
        if !drill.is_empty() {
            let _ = writeln!(m, "\n## Drill\n");
            for l in drill {
                let _ = writeln!(m, "- {l}");
            }
        }
        if let Some(f) = &self.flood {
            let _ = writeln!(m, "\n## Attacks\n");
            for l in super::flood::lines(f) {
                let _ = writeln!(m, "- {l}");
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(m, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(m, "- {n}");
            }
        }
        let _ = writeln!(
            m,
            "\n## Timeline\n\n| s | offered | acked | failed | shed | p99 ms |\n|---|---|---|---|---|---|"
        );
        for s in &self.timeline {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} |",
                s.t_s,
                s.offered,
                s.acked,
                s.failed,
                s.shed,
                s.p99_ms.map_or("-".into(), |p| p.to_string())
            );
        }
        m
    }

    /// Three panels over time: offered and acked per second, failed and
    /// shed per second, p99 send→ack latency; faults as vertical lines.
    fn svg(&self) -> String {
        const W: f64 = 960.0;
        const LEFT: f64 = 70.0;
        const RIGHT: f64 = 20.0;
        const PANEL: f64 = 170.0;
        const GAP: f64 = 40.0;
        const TOP: f64 = 40.0;
        let n = self.timeline.len().max(1) as f64;
        let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / n;
        let h = TOP + 3.0 * (PANEL + GAP) + 10.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="20" font-size="14">loadtest {} — {}</text>"#,
            self.scenario,
            xml(&self.load)
        );
        let max_rate = self
            .timeline
            .iter()
            .map(|t| t.offered.max(t.acked))
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let max_err = self
            .timeline
            .iter()
            .map(|t| t.failed + t.shed)
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let max_p99 = self
            .timeline
            .iter()
            .filter_map(|t| t.p99_ms)
            .fold(1.0f64, f64::max);
        let panels: [(&str, f64); 3] = [
            ("sends/s (grey offered, blue acked)", max_rate),
            ("errors/s (red failed, orange shed)", max_err),
            ("p99 send→ack ms", max_p99),
        ];
        for (i, (title, max)) in panels.iter().enumerate() {
            let y0 = TOP + i as f64 * (PANEL + GAP);
            let _ = writeln!(
                s,
                r##"<rect x="{LEFT}" y="{y0}" width="{}" height="{PANEL}" fill="none" stroke="#999"/>"##,
                W - LEFT - RIGHT
            );
            let _ = writeln!(
                s,
                r#"<text x="{LEFT}" y="{}">{}</text>"#,
                y0 - 6.0,
                xml(title)
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y0 + 10.0,
                fmt_num(*max)
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">0</text>"#,
                LEFT - 6.0,
                y0 + PANEL
            );
            let y = |v: f64| y0 + PANEL - PANEL * (v / max).min(1.0);
            let line = |pts: Vec<(f64, f64)>, color: &str| {
                let p: Vec<String> = pts
                    .iter()
                    .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
                    .collect();
                format!(
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                    p.join(" ")
                )
            };
            let centre = |t: &Second| t.t_s as f64 + 0.5;
            match i {
                0 => {
                    let _ = writeln!(
                        s,
                        "{}",
                        line(
                            self.timeline
                                .iter()
                                .map(|t| (centre(t), t.offered as f64))
                                .collect(),
                            "#999"
                        )
                    );
                    let _ = writeln!(
                        s,
                        "{}",
                        line(
                            self.timeline
                                .iter()
                                .map(|t| (centre(t), t.acked as f64))
                                .collect(),
                            "#1f77b4"
                        )
                    );
                }
                1 => {
                    let bw = (x(1.0) - x(0.0)) * 0.8;
                    for t in &self.timeline {
                        let (f, sh) = (t.failed as f64, t.shed as f64);
                        if f > 0.0 {
                            let _ = writeln!(
                                s,
                                r##"<rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="#d62728"/>"##,
                                x(t.t_s as f64),
                                y(f),
                                y0 + PANEL - y(f)
                            );
                        }
                        if sh > 0.0 {
                            let _ = writeln!(
                                s,
                                r##"<rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="#ff7f0e"/>"##,
                                x(t.t_s as f64),
                                y(f + sh),
                                y(f) - y(f + sh)
                            );
                        }
                    }
                }
                _ => {
                    let pts = self
                        .timeline
                        .iter()
                        .filter_map(|t| t.p99_ms.map(|p| (centre(t), p)))
                        .collect();
                    let _ = writeln!(s, "{}", line(pts, "#2ca02c"));
                }
            }
        }
        let bottom = TOP + 3.0 * (PANEL + GAP) - GAP;
        let step = ((n / 10.0).ceil() as u64).max(1);
        for t in (0..=n as u64).step_by(step as usize) {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{t}s</text>"#,
                x(t as f64),
                bottom + 14.0
            );
        }
        for f in &self.faults {
            let fx = x(f.at_s);
            let _ = writeln!(
                s,
                r##"<line x1="{fx:.1}" y1="{TOP}" x2="{fx:.1}" y2="{bottom}" stroke="#9467bd" stroke-dasharray="4,3"/>"##
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" fill="#9467bd" transform="rotate(-90 {:.1} {})">{} {}</text>"##,
                fx - 3.0,
                TOP + 150.0,
                fx - 3.0,
                TOP + 150.0,
                xml(&f.kind),
                xml(&f.target)
            );
            if let Some(r) = f.recovery_s.filter(|&r| r > 0.0) {
                // Where goodput is back for good: a bracket from the fault.
                let rx = x(f.at_s + r);
                let _ = writeln!(
                    s,
                    r##"<line x1="{fx:.1}" y1="{y:.1}" x2="{rx:.1}" y2="{y:.1}" stroke="#2ca02c" stroke-width="3"><title>goodput back after {r:.1} s</title></line>"##,
                    y = TOP + 4.0
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn utc(t: SystemTime) -> (i64, u32, u32, i64, i64, i64) {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    chat_telemetry::time::utc(secs as i64)
}

pub fn rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

pub fn timestamp_compact(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc(t);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// Notes and the live line on stderr; nothing in quiet mode.
pub struct Progress {
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self { quiet }
    }

    pub fn note(&self, s: &str) {
        if !self.quiet {
            eprintln!("loadtest: {s}");
        }
    }

    /// Every second (every 5 s when stderr is not a terminal): elapsed time,
    /// sends, acks and failures in the last second, in-flight, p99.
    pub fn start(&self, ctx: Arc<Ctx>, start: Instant, skip: usize) -> tokio::task::JoinHandle<()> {
        let quiet = self.quiet;
        tokio::spawn(async move {
            if quiet {
                return;
            }
            let tty = std::io::stderr().is_terminal();
            let every = if tty { 1 } else { 5 };
            let mut seen = skip;
            let mut tick = tokio::time::interval_at(start.into(), Duration::from_secs(every));
            loop {
                tick.tick().await;
                let (mut acked, mut failed, mut h) = (0u64, 0u64, hist());
                {
                    let sends = ctx.sends.lock().expect("sends lock poisoned");
                    for r in &sends[seen.min(sends.len())..] {
                        match r.outcome {
                            Ok(_) => {
                                acked += 1;
                                let _ = h.record(r.done_us.saturating_sub(r.intended_us).max(1));
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    seen = sends.len();
                }
                let line = format!(
                    "t={:>4}s  acked {:>7.0}/s  failed {:>5.0}/s  in flight {:>6}  p99 {:>8.1} ms",
                    start.elapsed().as_secs(),
                    acked as f64 / every as f64,
                    failed as f64 / every as f64,
                    ctx.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                    if h.is_empty() {
                        0.0
                    } else {
                        ms(h.value_at_quantile(0.99))
                    },
                );
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_and_gaps_count_from_the_last_ack_before() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_478_400 + 3_661);
        assert_eq!(rfc3339(t), "2026-11-24T01:01:01Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let acks = [10, 20, 30, 500, 510];
        // Fault at 25: last ack before is 20, next at 30 then 500.
        assert_eq!(longest_gap(&acks, 25, 600), 470);
        // No ack at all after the fault: the gap runs to the end.
        assert_eq!(longest_gap(&[10], 25, 600), 590);
    }

    /// 100 sends a second for `secs` seconds from 0; `acked(t_us)` says
    /// whether the send scheduled at `t_us` is acked, 5 ms later.
    fn load(secs: u64, acked: impl Fn(u64) -> bool) -> Vec<SendRecord> {
        (0..secs * 100)
            .map(|k| {
                let t = k * 10_000;
                SendRecord {
                    conv: 0,
                    sender: 0,
                    k,
                    intended_us: t,
                    started_us: t,
                    done_us: t + 5_000,
                    outcome: if acked(t) {
                        Ok(k)
                    } else {
                        Err(tonic::Code::ResourceExhausted)
                    },
                }
            })
            .collect()
    }

    #[test]
    fn recovery_is_when_goodput_stays_back_not_when_it_first_returns() {
        // Healthy throughout: back at once.
        assert_eq!(recovery(&load(10, |_| true), 0, 10_000_000), Some(0));
        // Refused for 2 s after the fault, then all acked: back after 2 s.
        let two = load(10, |t| t >= 2_000_000);
        assert_eq!(recovery(&two, 0, 10_000_000), Some(2_000_000));
        // A metastable tail: one send in four refused from 5 s on, after a
        // good stretch. Goodput returned at 2 s but did not stay.
        let tail = load(10, |t| {
            t >= 2_000_000 && (t < 5_000_000 || (t / 10_000) % 4 != 0)
        });
        assert_eq!(recovery(&tail, 0, 10_000_000), None);
        // One refusal in fifty is within 95 %.
        let few = load(10, |t| (t / 10_000) % 50 != 0);
        assert_eq!(recovery(&few, 0, 10_000_000), Some(0));
        // A short stall is no failure: a 400 ms gap whose sends are all
        // acked just after it leaves goodput whole.
        let mut stall = load(10, |_| true);
        for r in &mut stall {
            if (3_000_000..3_400_000).contains(&r.intended_us) {
                r.done_us = 3_400_000;
            }
        }
        assert_eq!(recovery(&stall, 3_000_000, 10_000_000), Some(0));
        // But sends acked seconds late (held through an outage) are not
        // goodput: back only from when acks are prompt again (4 s).
        let mut held = load(10, |_| true);
        for r in &mut held {
            if r.intended_us < 4_000_000 {
                r.done_us = 5_500_000;
            }
        }
        assert_eq!(recovery(&held, 0, 10_000_000), Some(4_000_000));
        // Too short a span to judge.
        assert_eq!(recovery(&two, 0, 900_000), None);
    }

    #[test]
    fn refusals_count_only_outside_the_fault_windows() {
        // Refused: 1.00–1.10 s (before any fault), 5.0–5.5 s (in the fault
        // window: 5.0 s until the end of the first recovered second, 7.0 s)
        // and 8.0–8.05 s (after goodput was back); 6.5–6.52 s is in the
        // first recovered second.
        let sends = load(10, |t| {
            !((1_000_000..1_100_000).contains(&t)
                || (5_000_000..5_500_000).contains(&t)
                || (6_500_000..6_520_000).contains(&t)
                || (8_000_000..8_050_000).contains(&t))
        });
        let faults = [fault(5.0, "store-leader", Some(1.0))];
        assert_eq!(refused_outside(&sends, 0, &faults, 10.0), 10 + 5);
        // A fault never recovered from covers the rest of the load.
        let never = [fault(5.0, "store-leader", None)];
        assert_eq!(refused_outside(&sends, 0, &never, 10.0), 10);
        // A send under way when the fault struck is the fault's, however
        // soon goodput was back.
        let mut stuck = load(10, |t| t != 4_990_000);
        for r in &mut stuck {
            if r.intended_us == 4_990_000 {
                r.done_us = 9_990_000;
            }
        }
        let instant = [fault(5.0, "store-leader", Some(0.0))];
        assert_eq!(refused_outside(&stuck, 0, &instant, 10.0), 0);
    }

    fn fault(at_s: f64, kind: &str, recovery_s: Option<f64>) -> FaultRecord {
        let mut f = FaultRecord::new(at_s, kind.into(), "x".into());
        f.recovery_s = recovery_s;
        f.until_restart = kind == "store-all";
        f
    }

    #[test]
    fn the_recovery_slo_judges_each_fault_and_a_lost_tier_from_its_restart() {
        let ok = recovery_slo(
            &[
                fault(5.0, "store-leader", Some(0.6)),
                fault(8.0, "start", Some(0.0)),
            ],
            20.0,
            3.0,
        );
        assert!(ok.pass, "{ok:?}");
        assert_eq!(ok.actual, serde_json::json!(0.6));
        // The store down until its restart is judged from the restart.
        let all = [
            fault(5.0, "store-all", None),
            fault(8.0, "start", Some(4.2)),
        ];
        let slow = recovery_slo(&all, 20.0, 3.0);
        assert!(!slow.pass, "{slow:?}");
        assert_eq!(slow.actual, serde_json::json!(4.2));
        // Never back before the end of the load.
        let never = recovery_slo(&[fault(5.0, "router", None)], 20.0, 3.0);
        assert!(!never.pass);
        assert!(
            never.actual.to_string().contains("router at 5.0 s"),
            "{never:?}"
        );
        // A fault the next one follows within the limit is judged with it.
        let close = [
            fault(5.0, "partition-leader", None),
            fault(6.0, "heal", Some(1.0)),
        ];
        assert!(recovery_slo(&close, 20.0, 3.0).pass);
        // But one that had the whole limit and did not come back fails.
        let long = [
            fault(5.0, "partition-leader", None),
            fault(9.0, "heal", Some(1.0)),
        ];
        assert!(!recovery_slo(&long, 20.0, 3.0).pass);
    }
}
