//! Reading and changing rollout plans in the store (compare-and-set, so
//! an operator's change and a router's judgement never overwrite each
//! other).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chat_rollout::Plan;
use chat_store::{StoreClient, StoreError};
use prost::Message as _;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The stored plan of `service` and its revision, if there is one.
pub async fn read(store: &StoreClient, service: &str) -> anyhow::Result<Option<(u64, Plan)>> {
    let s = store
        .get_setting(&chat_rollout::plan_key(service))
        .await
        .context("reading the rollout plan")?;
    if s.revision == 0 {
        return Ok(None);
    }
    let plan = Plan::decode(s.value.as_slice()).context("the stored rollout plan is corrupt")?;
    Ok(Some((s.revision, plan)))
}

/// Replaces the plan with `change(current)`, retrying when someone else
/// changed it in between.
pub async fn update<F>(store: &StoreClient, service: &str, change: F) -> anyhow::Result<Plan>
where
    F: Fn(Option<&Plan>) -> Result<Plan, String>,
{
    let key = chat_rollout::plan_key(service);
    for _ in 0..10 {
        let current = read(store, service).await?;
        let next = change(current.as_ref().map(|(_, p)| p)).map_err(anyhow::Error::msg)?;
        let revision = current.as_ref().map_or(0, |(r, _)| *r);
        match store
            .put_setting(&key, next.encode_to_vec(), Some(revision))
            .await
        {
            Ok(_) => return Ok(next),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e).context("writing the rollout plan"),
        }
    }
    anyhow::bail!("the rollout plan kept changing under this command; try again")
}

/// The plan as `chatctl rollout status` prints it.
pub fn describe(plan: &Plan) -> String {
    let mut out = format!(
        "rollout {} of {}: canary {:?} {} at {} % (step {} of {}: {:?}), check {}, {} failed\n",
        plan.id,
        plan.service,
        plan.canary,
        chat_rollout::state_name(plan),
        plan.weight,
        plan.step + 1,
        plan.steps.len(),
        plan.steps,
        plan.check,
        plan.failed_checks
    );
    if let Some(t) = &plan.thresholds {
        out.push_str(&format!(
            "analysis every {} s: success >= {:.1} %, p99 <= {}x stable (floor {} ms), >= {} calls, abort after {} failed checks\n",
            plan.interval_ms / 1_000,
            f64::from(t.min_success_permille) / 10.0,
            t.max_latency_ratio,
            t.latency_floor_us / 1_000,
            t.min_requests,
            t.max_failed_checks
        ));
    }
    for d in &plan.decisions {
        out.push_str(&format!(
            "  {:>8.1} s  check {:>3}  {:<8} -> {:>3} %  {}\n",
            (d.at_ms - plan.started_ms) as f64 / 1e3,
            d.check,
            d.action,
            d.weight,
            d.reason
        ));
    }
    out
}
