//! The disaster-recovery drills, on a local cluster (they reach into the
//! replicas' data directories):
//!
//! - `dr`: an online backup taken through the leader halfway through the
//!   load; after the load every replica is killed and its data directory
//!   destroyed, and a new group is restored from the file (`chatctl store
//!   restore`'s procedure) and started. Every message acknowledged before
//!   the backup began must be there, once, in order; what was acknowledged
//!   after it and is gone is the measured recovery point.
//! - `corrupt-replica`: under load, a follower is stopped and its state
//!   file damaged, as a bad disk would leave it. Started again it must
//!   refuse to serve, saying which directory is damaged, while the cluster
//!   keeps serving; `chatctl store rebuild-replica`'s procedure (guarded)
//!   sets its files aside, and started again it rejoins by snapshot. After
//!   the load it must hold every acknowledged message.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chat_client::Message;
use chat_proto::store::v1 as api;
use chat_store::NodeId;
use serde::Serialize;

use super::report::Slo;
use super::target::{STORES, Target};
use super::{Ctx, SendRecord};

/// How long a restored group may take to acknowledge a send, and a
/// rebuilt replica to catch up.
const WITHIN: Duration = Duration::from_secs(60);
/// How long a damaged replica may take to refuse to start.
const REFUSES_WITHIN: Duration = Duration::from_secs(30);

/// Where `dr` puts its backup, in the local cluster's directory (removed
/// with the data unless `--keep-data`).
pub const BACKUP_FILE: &str = "dr-backup.chatbak";

/// The backup `dr` took during the load.
#[derive(Clone, Debug)]
pub struct Backup {
    /// When the backup was asked for (run epoch, µs): everything
    /// acknowledged before this is in it.
    pub started_us: u64,
    pub done_us: u64,
    pub index: u64,
    pub bytes: u64,
    pub file: PathBuf,
}

/// Takes an online backup through the leader into the cluster directory.
pub async fn backup(target: &Target, ctx: &Ctx) -> anyhow::Result<Backup> {
    let file = target.local_dir()?.join(BACKUP_FILE);
    let store = target.store_client()?;
    let started_us = ctx.us(Instant::now());
    let h = chatctl::backup::take(&store, &file).await?;
    Ok(Backup {
        started_us,
        done_us: ctx.us(Instant::now()),
        index: h.index,
        bytes: std::fs::metadata(&file).map_or(0, |m| m.len()),
        file,
    })
}

/// What the disaster and the restore took.
#[derive(Clone, Debug)]
pub struct Restored {
    pub disaster_us: u64,
    /// Writing the three data directories from the file.
    pub restore_s: f64,
    /// From the disaster until a send through the gateways was acknowledged
    /// by the restored group (the recovery time, restore included).
    pub serving_s: f64,
}

/// Kills every replica, destroys its data directory, restores a new group
/// from `b` and waits until a send through the gateways is acknowledged.
pub async fn disaster(target: &mut Target, ctx: &Arc<Ctx>, b: &Backup) -> anyhow::Result<Restored> {
    let t0 = Instant::now();
    target.inject(super::fault::FaultKind::StoreAll).await?;
    let mut voters = Vec::new();
    for (i, name) in STORES.iter().enumerate() {
        voters.push((NodeId(i as u64 + 1), target.store_addr(name)?));
    }
    for name in STORES {
        let dir = target.store_dir(name)?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("destroying {}", dir.display()))?;
    }
    let r0 = Instant::now();
    for (name, (id, _)) in STORES.iter().zip(&voters) {
        chatctl::backup::restore(&b.file, &target.store_dir(name)?, *id, &voters)?;
    }
    let restore_s = r0.elapsed().as_secs_f64();
    target.restart(&STORES.join(",")).await?;
    let conv = &ctx.convs[0];
    let client = ctx.client(conv.members[0]);
    let cmid = format!("{}-probe-restored", ctx.run);
    let deadline = t0 + WITHIN;
    loop {
        match client.send(&conv.id, &cmid, b"restored".to_vec()).await {
            Ok(_) => break,
            // Not yet: the replicas elect a leader, the routers see it.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => anyhow::bail!(
                "the restored group took no send within {WITHIN:?}: {}",
                s.message()
            ),
        }
    }
    Ok(Restored {
        disaster_us: ctx.us(t0),
        restore_s,
        serving_s: t0.elapsed().as_secs_f64(),
    })
}

/// What `corrupt-replica` did to its follower.
#[derive(Clone, Debug)]
pub struct Repair {
    pub victim: String,
    /// The damaged replica's own words on refusing to start.
    pub refusal: String,
    /// Seconds into the load: damaged, refused, rebuilt and started, caught
    /// up with the leader.
    pub damaged_s: f64,
    pub refused_s: f64,
    pub rebuilt_s: f64,
    pub caught_up_s: f64,
}

/// Stops a follower, damages its state file, checks it refuses to start,
/// rebuilds it (guarded as `chatctl store rebuild-replica` is) and waits
/// until it has caught up with the leader.
pub async fn corrupt_and_rebuild(target: &mut Target, start: Instant) -> anyhow::Result<Repair> {
    let since = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    let victim = target.store_follower().await?;
    let id: u64 = victim
        .strip_prefix("store-")
        .and_then(|n| n.parse().ok())
        .context("a store's name ends in its replica id")?;
    let dir = target.store_dir(&victim)?;
    target.kill(&victim).await?;
    damage(&dir)?;
    let damaged_s = since(Instant::now());
    target.restart(&victim).await?;
    let refused_by = Instant::now() + REFUSES_WITHIN;
    while target.running(&victim) {
        anyhow::ensure!(
            Instant::now() < refused_by,
            "{victim} kept running on a damaged data directory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_s = since(Instant::now());
    let log = std::fs::read_to_string(target.log(&victim)?).unwrap_or_default();
    let refusal = log
        .lines()
        .rev()
        .find(|l| l.contains(&*dir.to_string_lossy()))
        .map(plain)
        .with_context(|| {
            format!(
                "{victim} stopped without naming its damaged directory {}",
                dir.display()
            )
        })?;

    let store = target.store_client()?;
    let mut replicas = Vec::new();
    for name in STORES {
        replicas.push(chatctl::restart::ReplicaState {
            name: name.to_owned(),
            status: store.status_of(&target.store_addr(name)?).await.ok(),
        });
    }
    chatctl::restart::check_rebuild(&replicas, id).map_err(anyhow::Error::msg)?;
    chatctl::rebuild::set_aside(&dir, id)?;
    target.restart(&victim).await?;
    let rebuilt_s = since(Instant::now());
    caught_up(target, &store, &victim).await?;
    Ok(Repair {
        victim,
        refusal,
        damaged_s,
        refused_s,
        rebuilt_s,
        caught_up_s: since(Instant::now()),
    })
}

/// A log line without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The state machine's file with its head overwritten.
fn damage(dir: &Path) -> anyhow::Result<()> {
    let db = dir.join("state").join("db");
    let len = std::fs::metadata(&db)
        .with_context(|| format!("{} has no state file to damage", dir.display()))?
        .len() as usize;
    std::fs::write(&db, vec![0x5a; len.min(1 << 16)])
        .with_context(|| format!("damaging {}", db.display()))
}

/// Waits until `name` serves and has applied what the leader had
/// committed when it started serving.
async fn caught_up(
    target: &mut Target,
    store: &chat_store::StoreClient,
    name: &str,
) -> anyhow::Result<()> {
    let addr = target.store_addr(name)?;
    let deadline = Instant::now() + WITHIN;
    loop {
        let leader = target.store_leader().await.ok();
        let commit = match &leader {
            Some(l) => store
                .status_of(&target.store_addr(l)?)
                .await
                .ok()
                .map(|s| s.commit_index),
            None => None,
        };
        if let (Ok(s), Some(commit)) = (store.status_of(&addr).await, commit)
            && s.serving
            && s.applied_index >= commit
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} did not catch up with the leader within {WITHIN:?} of its rebuild"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages of the run stored on the rebuilt replica, read from it alone
/// once it has applied everything the leader committed; returns how many
/// of `stored` (the read-back through the gateways) it lacks.
pub async fn missing_on(
    target: &mut Target,
    ctx: &Ctx,
    name: &str,
    stored: &[Vec<Message>],
) -> anyhow::Result<u64> {
    let store = target.store_client()?;
    caught_up(target, &store, name).await?;
    let addr = target.store_addr(name)?;
    let mut missing = 0;
    for (j, msgs) in stored.iter().enumerate() {
        let conv = &ctx.convs[j];
        let mut have = HashSet::new();
        let mut after = 0;
        loop {
            let page = store
                .read_from(
                    &addr,
                    api::ReadRequest {
                        conversation_id: conv.id.clone(),
                        after_seq: after,
                        limit: 1_000,
                        consistency: api::Consistency::Stale as i32,
                        requester: ctx.users[conv.members[0] as usize].clone(),
                        ..Default::default()
                    },
                )
                .await
                .with_context(|| format!("reading {} from {name}", conv.id))?;
            let Some(last) = page.messages.last() else {
                break;
            };
            after = last.seq;
            have.extend(page.messages.into_iter().map(|m| (m.seq, m.client_msg_id)));
        }
        missing += msgs
            .iter()
            .filter(|m| !have.contains(&(m.seq, m.client_msg_id.clone())))
            .count() as u64;
    }
    Ok(missing)
}

/// The drill's part of the report.
#[derive(Serialize, Debug, Default)]
pub struct DrillSummary {
    /// dr: the backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSummary>,
    /// corrupt-replica: the damaged follower.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairSummary>,
}

#[derive(Serialize, Debug)]
pub struct BackupSummary {
    pub taken_at_s: f64,
    pub took_s: f64,
    pub raft_index: u64,
    pub bytes: u64,
    /// Sends acknowledged before the backup began (all must be restored).
    pub acked_before: u64,
    /// Acknowledged after it began: restored anyway, and gone.
    pub acked_after_restored: u64,
    pub acked_after_lost: u64,
    /// From the earliest acknowledgement that was lost until the disaster
    /// (0 when none was): how much time's writes the restore lost.
    pub recovery_point_s: f64,
    pub restore_s: Option<f64>,
    pub serving_s: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct RepairSummary {
    pub replica: String,
    pub refusal: String,
    pub damaged_at_s: f64,
    pub refused_after_s: f64,
    pub rebuilt_at_s: f64,
    pub caught_up_after_s: f64,
    /// Acknowledged messages the rebuilt replica lacks after the load.
    pub missing_on_rebuilt: Option<u64>,
}

/// What the drill did, for the report.
#[derive(Default)]
pub struct DrillRecord {
    pub backup: Option<Backup>,
    pub restored: Option<Restored>,
    pub repair: Option<Repair>,
    pub missing_on_rebuilt: Option<u64>,
}

pub fn summarize(
    r: &DrillRecord,
    sends: &[SendRecord],
    stored: Option<&HashSet<u64>>,
    start_us: u64,
) -> DrillSummary {
    let s = |us: u64| (us.saturating_sub(start_us) as f64 / 1e5).round() / 10.0;
    let backup = r.backup.as_ref().map(|b| {
        let acked = sends.iter().filter(|x| x.outcome.is_ok());
        let (mut before, mut kept, mut lost, mut earliest_lost) = (0, 0, 0, u64::MAX);
        for x in acked {
            if x.done_us < b.started_us {
                before += 1;
            } else if stored.is_some_and(|st| st.contains(&x.k)) {
                kept += 1;
            } else {
                lost += 1;
                earliest_lost = earliest_lost.min(x.done_us);
            }
        }
        let restored = r.restored.as_ref();
        BackupSummary {
            taken_at_s: s(b.started_us),
            took_s: ((b.done_us - b.started_us) as f64 / 1e5).round() / 10.0,
            raft_index: b.index,
            bytes: b.bytes,
            acked_before: before,
            acked_after_restored: kept,
            acked_after_lost: lost,
            recovery_point_s: match restored {
                Some(d) if lost > 0 => {
                    (d.disaster_us.saturating_sub(earliest_lost) as f64 / 1e5).round() / 10.0
                }
                _ => 0.0,
            },
            restore_s: restored.map(|d| (d.restore_s * 100.0).round() / 100.0),
            serving_s: restored.map(|d| (d.serving_s * 10.0).round() / 10.0),
        }
    });
    let repair = r.repair.as_ref().map(|p| RepairSummary {
        replica: p.victim.clone(),
        refusal: p.refusal.clone(),
        damaged_at_s: round1(p.damaged_s),
        refused_after_s: round1(p.refused_s - p.damaged_s),
        rebuilt_at_s: round1(p.rebuilt_s),
        caught_up_after_s: round1(p.caught_up_s - p.rebuilt_s),
        missing_on_rebuilt: r.missing_on_rebuilt,
    });
    DrillSummary { backup, repair }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The drill's SLOs: a rebuilt replica holds everything.
pub fn slos(d: &DrillSummary) -> BTreeMap<String, Slo> {
    let mut out = BTreeMap::new();
    if let Some(r) = &d.repair {
        out.insert(
            "missing_on_rebuilt_replica".into(),
            Slo {
                target: "= 0".into(),
                actual: r
                    .missing_on_rebuilt
                    .map_or("not read".into(), serde_json::Value::from),
                pass: r.missing_on_rebuilt == Some(0),
            },
        );
    }
    out
}

/// Lines for the summary and the Markdown report.
pub fn lines(d: &DrillSummary) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(b) = &d.backup {
        out.push(format!(
            "backup at {:.1} s: raft index {}, {} bytes, took {:.1} s; acked before it {} (all must be restored)",
            b.taken_at_s, b.raft_index, b.bytes, b.took_s, b.acked_before
        ));
        out.push(format!(
            "acked after the backup began: {} restored anyway, {} lost (recovery point {:.1} s)",
            b.acked_after_restored, b.acked_after_lost, b.recovery_point_s
        ));
        if let (Some(r), Some(s)) = (b.restore_s, b.serving_s) {
            out.push(format!(
                "every replica's data destroyed; restored from the file in {r:.2} s; a send acked again {s:.1} s after the disaster"
            ));
        }
    }
    if let Some(r) = &d.repair {
        out.push(format!(
            "{} damaged at {:.1} s: refused to start after {:.1} s ({}); rebuilt at {:.1} s, caught up {:.1} s later; missing on it after the load: {}",
            r.replica,
            r.damaged_at_s,
            r.refused_after_s,
            r.refusal.trim(),
            r.rebuilt_at_s,
            r.caught_up_after_s,
            r.missing_on_rebuilt
                .map_or("not read".into(), |m| m.to_string())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_lose_their_colours() {
        assert_eq!(
            plain("\x1b[2m2026\x1b[0m \x1b[31mERROR\x1b[0m data directory /x is damaged"),
            "2026 ERROR data directory /x is damaged"
        );
    }
}
