//! Reading and changing rollout plans in the store (compare-and-set, so
//! an operator's change and a router's judgement never overwrite each
//! other).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chat_rollout::Plan;
use chat_store::{StoreClient, StoreError};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A setting decoded as `M`, with its revision (`None`: never written).
pub async fn read_setting<M: prost::Message + Default>(
    store: &StoreClient,
    key: &str,
) -> anyhow::Result<Option<(u64, M)>> {
    let s = store
        .get_setting(key)
        .await
        .with_context(|| format!("reading {key}"))?;
    if s.revision == 0 {
        return Ok(None);
    }
    let m =
        M::decode(s.value.as_slice()).with_context(|| format!("the stored {key} is corrupt"))?;
    Ok(Some((s.revision, m)))
}

/// Replaces a setting with `change(current)`, retrying when someone else
/// changed it in between.
pub async fn update_setting<M, F>(store: &StoreClient, key: &str, change: F) -> anyhow::Result<M>
where
    M: prost::Message + Default,
    F: Fn(Option<&M>) -> Result<M, String>,
{
    for _ in 0..10 {
        let current = read_setting::<M>(store, key).await?;
        let next = change(current.as_ref().map(|(_, m)| m)).map_err(anyhow::Error::msg)?;
        let revision = current.as_ref().map_or(0, |(r, _)| *r);
        match store
            .put_setting(key, next.encode_to_vec(), Some(revision))
            .await
        {
            Ok(_) => return Ok(next),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e).with_context(|| format!("writing {key}")),
        }
    }
    anyhow::bail!("{key} kept changing under this command; try again")
}

/// The stored plan of `service` and its revision, if there is one.
pub async fn read(store: &StoreClient, service: &str) -> anyhow::Result<Option<(u64, Plan)>> {
    read_setting(store, &chat_rollout::plan_key(service)).await
}

/// Replaces the plan with `change(current)` (compare-and-set).
pub async fn update<F>(store: &StoreClient, service: &str, change: F) -> anyhow::Result<Plan>
where
    F: Fn(Option<&Plan>) -> Result<Plan, String>,
{
    update_setting(store, &chat_rollout::plan_key(service), change).await
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
