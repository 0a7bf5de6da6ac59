//! Staged rollouts of a canary release.
//!
//! A [`Plan`] lives in the store (setting `rollout/<service>`), so every
//! gateway and router sees the same one and it survives restarts and
//! leader changes. Operators change it with [`start`] and [`command`];
//! routers judge it with [`judge`] at the end of every analysis window,
//! from the [`Report`]s gateways send. Gateways route each user by
//! [`is_canary`], a sticky hash of the user and the plan.
//!
//! Everything here is a pure function of its inputs (the clock is passed
//! in), so the same inputs give the same decision on every router.

mod analysis;
mod histogram;
mod plan;
mod recorder;

pub use analysis::{Verdict, analyse, due, judge};
pub use histogram::Histogram;
pub use plan::{
    Command, StartArgs, command, default_thresholds, in_progress, is_canary, start, state_name,
};
pub use recorder::{Lane, Recorder};

pub use chat_proto::rollout::v1::{Decision, Plan, Report, State, Thresholds, Window};

/// The setting key of `service`'s rollout plan.
pub fn plan_key(service: &str) -> String {
    format!("rollout/{service}")
}

/// Release label of instances started without one.
pub const DEFAULT_RELEASE: &str = "stable";

/// The plan's canary weight (labelled with the canary and the state), step
/// and failed checks, as Prometheus gauges (nothing without a plan).
pub fn render_metrics(page: &mut chat_telemetry::metrics::Page, plan: Option<&Plan>) {
    let Some(p) = plan else { return };
    let weight = "chat_rollout_canary_weight_percent";
    page.family(
        weight,
        chat_telemetry::metrics::Kind::Gauge,
        "Share of users sent to the canary routers.",
    );
    let labels = [("canary", p.canary.as_str()), ("state", state_name(p))];
    page.sample(weight, &labels, f64::from(p.weight));
    page.single(
        "chat_rollout_step",
        chat_telemetry::metrics::Kind::Gauge,
        "Index of the rollout's current step.",
        f64::from(p.step),
    );
    page.single(
        "chat_rollout_failed_checks",
        chat_telemetry::metrics::Kind::Gauge,
        "Failed analysis checks of the rollout.",
        f64::from(p.failed_checks),
    );
}
