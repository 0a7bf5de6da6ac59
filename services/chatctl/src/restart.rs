//! Rolling restarts and the change guard.
//!
//! A restart takes instances down one at a time (or `batch` at a time for
//! routers and gateways) and only when doing so keeps the tier serving:
//! the guard refuses to take down more than one store replica at once, to
//! start while any replica is down or behind, or to take down every
//! instance of a tier, and it says why. Before a store leader is stopped
//! its leadership is moved away; each restarted replica must be serving and
//! caught up before the next one goes.
//!
//! Where the processes run is a [`Platform`]: the local cluster of
//! `chatctl local up`, the compose cluster, or a [`LocalCluster`] the load
//! tests hold.
//!
//! [`LocalCluster`]: crate::local::LocalCluster

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chat_proto::store::v1 as api;
use chat_store::StoreClient;

/// How far (in log entries) a replica's applied index may trail the
/// leader's commit index and still count as caught up.
pub const MAX_LAG: u64 = 1_000;
/// Longest wait for a restarted instance to serve (and catch up).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(90);
/// A restarted router or gateway must stay healthy this long before the
/// next goes (its peers' health checks run every second).
pub const SETTLE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    Store,
    Router,
    Gateway,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Store => "store",
            Tier::Router => "router",
            Tier::Gateway => "gateway",
        }
    }
}

/// Where the instances run and how to restart one.
#[allow(async_fn_in_trait)]
pub trait Platform {
    /// Instance names of a tier (`store-N` is store replica N).
    fn instances(&self, tier: Tier) -> Vec<String>;
    /// Addresses of the store replicas, in instance order.
    fn store_addrs(&self) -> Vec<String>;
    /// The identity to call the store with (None: plaintext).
    fn operator_tls(&self) -> Option<std::sync::Arc<chat_security::Tls>>;
    /// Whether the instance answers SERVING.
    async fn healthy(&self, tier: Tier, name: &str) -> bool;
    /// Stops the instance gracefully and starts it again; returns once it
    /// has been started (not necessarily serving yet).
    async fn restart(&mut self, name: &str) -> anyhow::Result<()>;
}

/// One replica as the guard sees it.
#[derive(Clone, Debug)]
pub struct ReplicaState {
    pub name: String,
    /// `None`: unreachable.
    pub status: Option<api::StatusResponse>,
}

/// Refuses a store restart that would take more than one replica down at
/// once or start while one is down or behind.
pub fn check_store(replicas: &[ReplicaState], batch: usize) -> Result<(), String> {
    if batch > 1 {
        return Err(format!(
            "refused: restarting {batch} store replicas at once would leave {} of {} up, and the store needs a majority; restart one at a time",
            replicas.len().saturating_sub(batch),
            replicas.len()
        ));
    }
    let mut leader: Option<&api::StatusResponse> = None;
    for r in replicas {
        match &r.status {
            None => {
                return Err(format!(
                    "refused: {} is unreachable; restarting another replica now would take a second one down",
                    r.name
                ));
            }
            Some(s) if !s.serving => {
                return Err(format!(
                    "refused: {} is not serving yet; restarting another replica now would take a second one down",
                    r.name
                ));
            }
            Some(s) if s.role == "leader" => {
                if leader.is_none_or(|l| s.term > l.term) {
                    leader = Some(s);
                }
            }
            Some(_) => {}
        }
    }
    let leader = leader.ok_or("refused: no replica is the leader right now")?;
    for r in replicas {
        let s = r.status.as_ref().expect("checked above");
        if s.applied_index + MAX_LAG < leader.commit_index {
            return Err(format!(
                "refused: {} has applied up to {} but the leader has committed {}; wait until it catches up",
                r.name, s.applied_index, leader.commit_index
            ));
        }
    }
    Ok(())
}

/// Refuses removing replica `id` from the group unless every other
/// replica is serving (an unreachable replica is taken to be `id` itself
/// when `id` cannot be reached: removing a dead replica is how one is
/// replaced).
pub fn check_removal(replicas: &[ReplicaState], id: u64) -> Result<(), String> {
    check_out_of_group(replicas, id, "removing")
}

/// Refuses rebuilding replica `id` (its data set aside, a rejoin by
/// snapshot) unless it is stopped and every other replica is serving: a
/// rebuild takes it out of the group until it has caught up.
pub fn check_rebuild(replicas: &[ReplicaState], id: u64) -> Result<(), String> {
    if replicas
        .iter()
        .any(|r| r.status.as_ref().is_some_and(|s| s.id == id))
    {
        return Err(format!(
            "refused: replica {id} is running; stop it first (a rebuild replaces its data directory)"
        ));
    }
    check_out_of_group(replicas, id, "rebuilding")
}

fn check_out_of_group(replicas: &[ReplicaState], id: u64, action: &str) -> Result<(), String> {
    let target_reachable = replicas
        .iter()
        .any(|r| r.status.as_ref().is_some_and(|s| s.id == id));
    let mut unreachable: Vec<&str> = replicas
        .iter()
        .filter(|r| r.status.is_none())
        .map(|r| r.name.as_str())
        .collect();
    if !target_reachable && !unreachable.is_empty() {
        unreachable.remove(0);
    }
    let not_serving: Vec<&str> = replicas
        .iter()
        .filter(|r| r.status.as_ref().is_some_and(|s| s.id != id && !s.serving))
        .map(|r| r.name.as_str())
        .collect();
    let down: Vec<&str> = unreachable.into_iter().chain(not_serving).collect();
    if down.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "refused: {} down as well; {action} replica {id} now would take a second replica out of the group",
            down.join(", ")
        ))
    }
}

/// Refuses a router or gateway restart that would leave the tier with no
/// healthy instance.
pub fn check_stateless(tier: Tier, health: &[(String, bool)], batch: usize) -> Result<(), String> {
    let healthy = health.iter().filter(|(_, h)| *h).count();
    if batch == 0 {
        return Err("refused: a batch of 0 restarts nothing".into());
    }
    if batch >= health.len() {
        return Err(format!(
            "refused: restarting {batch} of {} {}s at once takes every instance of the tier down; use a smaller --batch",
            health.len(),
            tier.name()
        ));
    }
    if healthy <= batch {
        let down: Vec<&str> = health
            .iter()
            .filter(|(_, h)| !*h)
            .map(|(n, _)| n.as_str())
            .collect();
        return Err(format!(
            "refused: {} not healthy; restarting {batch} more {}(s) now would leave no {} serving",
            down.join(", "),
            tier.name(),
            tier.name()
        ));
    }
    Ok(())
}

async fn replica_states<P: Platform>(p: &P, client: &StoreClient) -> Vec<ReplicaState> {
    let mut out = Vec::new();
    for (name, addr) in p.instances(Tier::Store).into_iter().zip(p.store_addrs()) {
        let status = client.status_of(&addr).await.ok();
        out.push(ReplicaState { name, status });
    }
    out
}

/// Waits until `check` holds, polling every 200 ms, for at most `timeout`.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One step of a rolling restart.
#[derive(Clone, Debug)]
pub struct RestartStep {
    pub at: Instant,
    pub instance: String,
    pub what: String,
}

/// What a rolling restart did, step by step.
#[derive(Debug, Default)]
pub struct RestartLog {
    pub steps: Vec<RestartStep>,
}

impl RestartLog {
    fn say(&mut self, instance: &str, what: String, quiet: bool) {
        if !quiet {
            println!("{instance}: {what}");
        }
        self.steps.push(RestartStep {
            at: Instant::now(),
            instance: instance.to_owned(),
            what,
        });
    }
}

/// Restarts every instance of `tier`, one at a time (stores) or `batch` at
/// a time, after the guard agreed.
pub async fn rolling_restart<P: Platform>(
    p: &mut P,
    tier: Tier,
    batch: usize,
    quiet: bool,
) -> anyhow::Result<RestartLog> {
    let mut log = RestartLog::default();
    match tier {
        Tier::Store => restart_stores(p, batch, quiet, &mut log).await?,
        Tier::Router | Tier::Gateway => {
            let names = p.instances(tier);
            for group in names.chunks(batch.max(1)) {
                let mut health = Vec::new();
                for n in &names {
                    health.push((n.clone(), p.healthy(tier, n).await));
                }
                check_stateless(tier, &health, batch).map_err(anyhow::Error::msg)?;
                let started = Instant::now();
                for name in group {
                    log.say(name, "restarting".into(), quiet);
                    p.restart(name).await?;
                }
                for name in group {
                    wait_until(&format!("{name} healthy again"), RESTART_TIMEOUT, || {
                        p.healthy(tier, name)
                    })
                    .await?;
                    // Healthy for a while, so peers' health checks see it.
                    let settle = Instant::now() + SETTLE;
                    while Instant::now() < settle {
                        anyhow::ensure!(
                            p.healthy(tier, name).await,
                            "{name} became unhealthy again after its restart"
                        );
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    log.say(
                        name,
                        format!("serving again after {} ms", started.elapsed().as_millis()),
                        quiet,
                    );
                }
            }
        }
    }
    Ok(log)
}

async fn restart_stores<P: Platform>(
    p: &mut P,
    batch: usize,
    quiet: bool,
    log: &mut RestartLog,
) -> anyhow::Result<()> {
    let client =
        StoreClient::new(p.store_addrs(), Duration::from_secs(10))?.with_tls(p.operator_tls());
    let states = replica_states(p, &client).await;
    check_store(&states, batch).map_err(anyhow::Error::msg)?;
    // Followers first, the leader last: leadership moves once.
    let mut order: Vec<(String, String)> = p
        .instances(Tier::Store)
        .into_iter()
        .zip(p.store_addrs())
        .collect();
    order.sort_by_key(|(name, _)| {
        states
            .iter()
            .find(|s| &s.name == name)
            .and_then(|s| s.status.as_ref())
            .is_some_and(|s| s.role == "leader")
    });
    for (name, addr) in order {
        let states = replica_states(p, &client).await;
        check_store(&states, 1).map_err(anyhow::Error::msg)?;
        let me = states
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.status.clone())
            .context("replica vanished")?;
        if me.role == "leader" {
            let moved = client
                .transfer_leader(0)
                .await
                .with_context(|| format!("moving leadership away from {name}"))?;
            log.say(
                &name,
                format!(
                    "was the leader; leadership moved to replica {}",
                    moved.leader_id
                ),
                quiet,
            );
        }
        let commit = replica_states(p, &client)
            .await
            .iter()
            .filter_map(|s| s.status.as_ref())
            .filter(|s| s.role == "leader")
            .map(|s| s.commit_index)
            .max()
            .unwrap_or(me.commit_index);
        let started = Instant::now();
        log.say(&name, "restarting".into(), quiet);
        p.restart(&name).await?;
        wait_until(
            &format!("{name} serving and caught up to index {commit}"),
            RESTART_TIMEOUT,
            || {
                let client = &client;
                let addr = addr.clone();
                async move {
                    client
                        .status_of(&addr)
                        .await
                        .is_ok_and(|s| s.serving && s.applied_index >= commit)
                }
            },
        )
        .await?;
        log.say(
            &name,
            format!(
                "restarted, serving and caught up (index {commit}) after {} ms",
                started.elapsed().as_millis()
            ),
            quiet,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, role: &str, serving: bool, applied: u64, commit: u64) -> ReplicaState {
        ReplicaState {
            name: name.into(),
            status: Some(api::StatusResponse {
                role: role.into(),
                serving,
                applied_index: applied,
                commit_index: commit,
                term: 3,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_guard_keeps_a_store_majority_up() {
        let healthy = vec![
            replica("store-1", "leader", true, 5_000, 5_000),
            replica("store-2", "follower", true, 4_990, 5_000),
            replica("store-3", "follower", true, 5_000, 5_000),
        ];
        assert!(check_store(&healthy, 1).is_ok());
        let err = check_store(&healthy, 2).unwrap_err();
        assert!(err.contains("leave 1 of 3"), "{err}");

        let mut one_down = healthy.clone();
        one_down[2].status = None;
        let err = check_store(&one_down, 1).unwrap_err();
        assert!(err.contains("store-3 is unreachable"), "{err}");

        let mut behind = healthy.clone();
        behind[1] = replica("store-2", "follower", true, 100, 5_000);
        let err = check_store(&behind, 1).unwrap_err();
        assert!(err.contains("store-2 has applied up to 100"), "{err}");

        let mut starting = healthy.clone();
        starting[1] = replica("store-2", "follower", false, 5_000, 5_000);
        assert!(
            check_store(&starting, 1)
                .unwrap_err()
                .contains("not serving")
        );

        let leaderless: Vec<_> = healthy
            .iter()
            .map(|r| replica(&r.name, "candidate", true, 5_000, 5_000))
            .collect();
        assert!(
            check_store(&leaderless, 1)
                .unwrap_err()
                .contains("no replica is the leader")
        );
    }

    /// Replicas a, b, c with ids 1, 2, 3, all serving, a leading.
    fn three_serving() -> Vec<ReplicaState> {
        let mut r = vec![
            replica("a", "leader", true, 1, 1),
            replica("b", "follower", true, 1, 1),
            replica("c", "follower", true, 1, 1),
        ];
        for (i, x) in r.iter_mut().enumerate() {
            x.status.as_mut().unwrap().id = i as u64 + 1;
        }
        r
    }

    #[test]
    fn a_dead_replica_may_be_removed_but_not_a_second_one() {
        let mut r = three_serving();
        assert!(check_removal(&r, 3).is_ok());
        r[2].status = None;
        assert!(check_removal(&r, 3).is_ok(), "replacing a dead replica");
        let err = check_removal(&r, 2).unwrap_err();
        assert!(err.contains("c down as well"), "{err}");
    }

    #[test]
    fn only_a_stopped_replica_is_rebuilt_and_only_with_the_others_serving() {
        let mut r = three_serving();
        let err = check_rebuild(&r, 3).unwrap_err();
        assert!(err.contains("replica 3 is running"), "{err}");
        r[2].status = None;
        assert!(check_rebuild(&r, 3).is_ok());
        r[1].status.as_mut().unwrap().serving = false;
        let err = check_rebuild(&r, 3).unwrap_err();
        assert!(err.contains("b down as well"), "{err}");
        assert!(err.contains("rebuilding replica 3"), "{err}");
    }

    #[test]
    fn the_guard_never_takes_a_whole_tier_down() {
        let both = vec![("router-1".to_owned(), true), ("router-2".to_owned(), true)];
        assert!(check_stateless(Tier::Router, &both, 1).is_ok());
        let err = check_stateless(Tier::Router, &both, 2).unwrap_err();
        assert!(err.contains("every instance of the tier"), "{err}");
        let one = vec![
            ("router-1".to_owned(), true),
            ("router-2".to_owned(), false),
        ];
        let err = check_stateless(Tier::Router, &one, 1).unwrap_err();
        assert!(err.contains("router-2 not healthy"), "{err}");
        assert!(err.contains("no router serving"), "{err}");
        let four: Vec<_> = (1..=4).map(|i| (format!("gateway-{i}"), true)).collect();
        assert!(check_stateless(Tier::Gateway, &four, 2).is_ok());
    }
}
