//! Durability against power loss: replicas whose disks drop every byte no
//! fdatasync covered (`ClusterOptions::power_cuts`: the raft log on a file
//! system that tracks syncs, the state machine in an engine that forgets
//! unsynced writes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_proto::store::v1 as api;
use chat_store::StoreClient;
use chat_store::driver::SyncMode;
use chat_store::testkit::{Cluster, ClusterOptions};

mod common;

use common::{create, read_all};

const WAIT: Duration = Duration::from_secs(20);
const SENDERS: usize = 8;
const PER_SENDER: usize = 100;

/// Appends from concurrent senders; returns what was acknowledged, by
/// client message id.
async fn send_all(client: &Arc<StoreClient>, conv: &str) -> HashMap<String, u64> {
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let client = client.clone();
        let conv = conv.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_SENDER {
                let id = format!("s{s}-m{i}");
                let r = client
                    .append(api::AppendRequest {
                        conversation_id: conv.clone(),
                        sender: "alice".into(),
                        client_msg_id: id.clone(),
                        body: format!("body of {id}").into_bytes(),
                    })
                    .await
                    .expect("append");
                acked.push((id, r.seq));
            }
            acked
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        all.extend(t.await.expect("sender task"));
    }
    all
}

/// Acknowledged appends that are missing, or stored at another seq, or
/// stored more than once.
fn lost_or_moved(messages: &[api::StoredMessage], acked: &HashMap<String, u64>) -> Vec<String> {
    let mut stored: HashMap<&str, Vec<u64>> = HashMap::new();
    for m in messages {
        stored
            .entry(m.client_msg_id.as_str())
            .or_default()
            .push(m.seq);
    }
    let mut bad: Vec<String> = acked
        .iter()
        .filter(|(id, seq)| stored.get(id.as_str()) != Some(&vec![**seq]))
        .map(|(id, seq)| format!("{id}@{seq}: stored at {:?}", stored.get(id.as_str())))
        .collect();
    bad.sort();
    bad
}

/// A cluster with `opts`, a conversation "room", and what concurrent
/// senders got acknowledged in it.
async fn start_and_send(opts: ClusterOptions) -> (Cluster, Arc<StoreClient>, HashMap<String, u64>) {
    let cluster = Cluster::start(3, opts).await.unwrap();
    cluster.wait_leader(WAIT).await.unwrap();
    let client = Arc::new(cluster.client());
    create(&client, "room", &["alice"]).await;
    let acked = send_all(&client, "room").await;
    (cluster, client, acked)
}

async fn power_cut_everyone(cluster: &mut Cluster) {
    for id in cluster.ids() {
        cluster.power_cut(id).await.expect("power cut");
    }
}

async fn restart_everyone(cluster: &mut Cluster) {
    for id in cluster.ids() {
        cluster.restart(id).await.expect("restart");
    }
    cluster
        .wait_leader(WAIT)
        .await
        .expect("a leader after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_power_cut_on_every_replica() {
    let opts = ClusterOptions {
        power_cuts: true,
        // Compaction runs during the test, so it must respect checkpoints.
        snapshot_entries: 20,
        compact_keep: 5,
        checkpoint_interval: Duration::from_millis(100),
        ..ClusterOptions::default()
    };
    let (mut cluster, client, mut acked) = start_and_send(opts).await;
    assert_eq!(acked.len(), SENDERS * PER_SENDER);
    let syncs: u64 = cluster
        .ids()
        .iter()
        .filter_map(|id| cluster.wal_syncs(*id))
        .sum();
    assert!(syncs > 0, "no replica ever synced its raft log");
    let mut compacted = 0;
    for id in cluster.ids() {
        let report = cluster.node(id).unwrap().report().await.unwrap();
        compacted = compacted.max(report.snapshot_index);
    }
    assert!(
        compacted > chat_store::log_store::BOOTSTRAP_INDEX,
        "no replica compacted its log: the test does not exercise compaction"
    );

    // One more append right before the cut: with a checkpoint every 100 ms
    // the appends above may all be covered by now, and a cut that takes
    // nothing from any state engine proves nothing.
    let last = client
        .append(api::AppendRequest {
            conversation_id: "room".into(),
            sender: "alice".into(),
            client_msg_id: "last".into(),
            body: b"last".to_vec(),
        })
        .await
        .expect("append");
    acked.insert("last".into(), last.seq);
    let applied: Vec<u64> = cluster
        .ids()
        .iter()
        .map(|id| cluster.node(*id).unwrap().status().applied)
        .collect();
    power_cut_everyone(&mut cluster).await;
    // The state engines lost what their last checkpoint did not cover; the
    // raft logs must bring it back.
    let surviving: Vec<u64> = cluster
        .ids()
        .iter()
        .map(|id| cluster.disk_applied(*id).unwrap_or(0))
        .collect();
    assert!(
        surviving
            .iter()
            .zip(&applied)
            .any(|(after, before)| after < before),
        "the power cut took nothing from any state engine (applied {applied:?}, surviving {surviving:?}): the test proves nothing"
    );

    restart_everyone(&mut cluster).await;
    let messages = read_all(&client, "room").await;
    assert_eq!(lost_or_moved(&messages, &acked), Vec::<String>::new());
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=messages.len() as u64).collect::<Vec<_>>(),
        "seqs must be gapless from 1"
    );
    // Every replica, not only the leader, holds every acknowledged append.
    for id in cluster.ids() {
        let leader_commit = cluster
            .node(cluster.wait_leader(WAIT).await.unwrap())
            .unwrap()
            .status()
            .commit;
        cluster.wait_applied(id, leader_commit, WAIT).await.unwrap();
        let page = client
            .read_from(
                &cluster.addr(id),
                api::ReadRequest {
                    conversation_id: "room".into(),
                    limit: 1000,
                    consistency: api::Consistency::Stale as i32,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            lost_or_moved(&page.messages, &acked),
            Vec::<String>::new(),
            "replica {id}"
        );
    }
    cluster.stop_all().await;
}

/// The harness's power to fail: with the raft log synced only in the
/// background (here: never, in the test's time), a power cut on every
/// replica loses acknowledged appends, and the check above sees it. The
/// same check passing with `SyncMode::Always` is what shows the ack path
/// syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sync_on_the_ack_path_a_power_cut_loses_acknowledged_appends() {
    let opts = ClusterOptions {
        power_cuts: true,
        sync: SyncMode::Interval,
        checkpoint_interval: Duration::from_secs(3600),
        ..ClusterOptions::default()
    };
    let (mut cluster, client, acked) = start_and_send(opts).await;
    power_cut_everyone(&mut cluster).await;
    restart_everyone(&mut cluster).await;
    // Nothing after the group's start was synced; the conversation itself
    // may be gone.
    let messages = match client
        .read(api::ReadRequest {
            conversation_id: "room".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
    {
        Ok(page) => page.messages,
        Err(chat_store::StoreError::NotFound(_)) => Vec::new(),
        Err(e) => panic!("read: {e}"),
    };
    let lost = lost_or_moved(&messages, &acked);
    assert!(
        !lost.is_empty(),
        "all {} acknowledged appends survived a power cut without any sync",
        acked.len()
    );
    cluster.stop_all().await;
}
