//! Cluster behaviour through the in-process harness: real replicas on
//! 127.0.0.1, real sled directories, a fault-injecting transport.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chat_proto::store::v1 as api;
use chat_proto::store::v1::store_client::StoreClient as RawClient;
use chat_store::testkit::{Cluster, ClusterOptions};
use chat_store::{NodeId, StoreClient, StoreError};
use tonic::Code;

mod common;

use common::{append_n, append_req, create, read_all};

const WAIT: Duration = Duration::from_secs(15);

async fn stale_read(
    cluster: &Cluster,
    id: NodeId,
    conv: &str,
) -> Result<api::ReadResponse, StoreError> {
    cluster
        .client()
        .read_from(
            &cluster.addr(id),
            api::ReadRequest {
                conversation_id: conv.into(),
                limit: 1000,
                consistency: api::Consistency::Stale as i32,
                ..Default::default()
            },
        )
        .await
}

/// Asserts the conversation holds seqs 1..=n with each client id once, and
/// that every acknowledged (client id, seq) is among them.
fn assert_exactly_once(messages: &[api::StoredMessage], acked: &HashMap<String, u64>) {
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=messages.len() as u64).collect::<Vec<_>>(),
        "seqs must be gapless from 1"
    );
    let mut seen = HashSet::new();
    for m in messages {
        assert!(
            seen.insert((m.sender.clone(), m.client_msg_id.clone())),
            "duplicate message {}",
            m.client_msg_id
        );
    }
    let by_seq: HashMap<u64, &str> = messages
        .iter()
        .map(|m| (m.seq, m.client_msg_id.as_str()))
        .collect();
    for (id, seq) in acked {
        assert_eq!(
            by_seq.get(seq).copied(),
            Some(id.as_str()),
            "acknowledged {id} at seq {seq} is missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_a_leader_and_replicates_to_every_replica() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "room", &["alice", "bob"]).await;
    for i in 0..20 {
        let r = client
            .append(append_req("room", "alice", &format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(r.seq, i + 1);
    }
    let applied = cluster.node(leader).unwrap().status().applied;
    for id in cluster.ids() {
        cluster.wait_applied(id, applied, WAIT).await.unwrap();
        let r = stale_read(&cluster, id, "room").await.unwrap();
        assert!(r.stale);
        assert_eq!(r.messages.len(), 20, "replica {id}");
        assert_eq!(r.messages[7].client_msg_id, "m7");
    }
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let old = cluster.wait_leader(WAIT).await.unwrap();
    let client = Arc::new(cluster.client());
    let senders: Vec<String> = (0..8).map(|w| format!("w{w}")).collect();
    create(
        &client,
        "load",
        &senders.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, stop) = (client.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = HashMap::new();
            let mut retries = 0;
            for i in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("w{w}-{i}");
                // A real client retries the same id until it gets an answer.
                loop {
                    match client
                        .append(append_req("load", &format!("w{w}"), &id))
                        .await
                    {
                        Ok(r) => {
                            acked.insert(id, r.seq);
                            break;
                        }
                        Err(e) if e.is_retryable() => retries += 1,
                        Err(e) => panic!("append {id}: {e}"),
                    }
                }
            }
            (acked, retries)
        }));
    }
    cluster
        .node(old)
        .unwrap()
        .wait_for(WAIT, |s| s.applied > 100)
        .await
        .expect("load is flowing");
    cluster.kill(old).await;
    let survivors: Vec<NodeId> = cluster.running();
    let new = cluster.wait_leader_among(&survivors, WAIT).await.unwrap();
    assert_ne!(new, old);
    let mark = cluster.node(new).unwrap().status().applied;
    cluster
        .node(new)
        .unwrap()
        .wait_for(WAIT, |s| s.applied > mark + 100)
        .await
        .expect("writes resume");
    stop.store(true, Ordering::Relaxed);
    let mut acked = HashMap::new();
    for w in writers {
        let (a, _) = w.await.unwrap();
        acked.extend(a);
    }
    let messages = read_all(&client, "load").await;
    assert!(acked.len() > 200, "only {} acknowledged", acked.len());
    assert_exactly_once(&messages, &acked);

    // The old leader comes back and converges on the same history.
    cluster.restart(old).await.unwrap();
    let applied = cluster.node(new).unwrap().status().applied;
    cluster.wait_applied(old, applied, WAIT).await.unwrap();
    let replay = stale_read(&cluster, old, "load").await.unwrap();
    assert_eq!(replay.last_seq, messages.len() as u64);
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_can_neither_commit_nor_serve_linearizable_reads() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let old = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "p", &["a"]).await;
    client.append(append_req("p", "a", "before")).await.unwrap();

    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|&i| i != old).collect();
    cluster.faults().partition(&[old], &others);

    // Straight to the isolated replica, no retries elsewhere.
    let mut direct = RawClient::connect(format!("http://{}", cluster.addr(old)))
        .await
        .unwrap();
    let write = direct.append(append_req("p", "a", "isolated")).await;
    assert!(write.is_err(), "isolated replica acknowledged a write");
    let code = write.unwrap_err().code();
    assert!(matches!(code, Code::Unavailable), "got {code:?}");
    let read = direct
        .read(api::ReadRequest {
            conversation_id: "p".into(),
            limit: 10,
            ..Default::default()
        })
        .await;
    assert_eq!(read.map(|_| ()).unwrap_err().code(), Code::Unavailable);
    // It stops reporting healthy once it knows it has no leader.
    cluster
        .node(old)
        .unwrap()
        .wait_for(WAIT, |s| !s.serving)
        .await
        .expect("isolated replica keeps serving");

    // The majority side elects a leader and keeps committing.
    let new = cluster.wait_leader_among(&others, WAIT).await.unwrap();
    assert_ne!(new, old);
    client
        .append(append_req("p", "a", "majority"))
        .await
        .unwrap();

    cluster.faults().heal();
    let applied = cluster.node(new).unwrap().status().applied;
    cluster.wait_applied(old, applied, WAIT).await.unwrap();
    let ids: Vec<String> = read_all(&client, "p")
        .await
        .into_iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(
        ids,
        vec!["before", "majority"],
        "the isolated write must not have been stored"
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_recovers_everything_from_disk() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "r", &["a"]).await;
    for i in 0..30 {
        client
            .append(append_req("r", "a", &format!("m{i}")))
            .await
            .unwrap();
    }
    for id in cluster.ids() {
        cluster.kill(id).await;
    }
    for id in cluster.ids() {
        cluster.restart(id).await.unwrap();
    }
    cluster.wait_leader(WAIT).await.unwrap();
    let next = client
        .append(append_req("r", "a", "after-restart"))
        .await
        .unwrap();
    assert_eq!(next.seq, 31);
    let retry = client.append(append_req("r", "a", "m3")).await.unwrap();
    assert!(
        retry.duplicate && retry.seq == 4,
        "dedup state must survive restart: {retry:?}"
    );
    assert_eq!(read_all(&client, "r").await.len(), 31);
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_catches_up_by_snapshot_in_chunks_without_an_election() {
    // Chunks far smaller than the state: the file goes in dozens of them.
    let opts = ClusterOptions {
        snapshot_entries: 20,
        compact_keep: 5,
        snapshot_chunk_bytes: 1024,
        ..Default::default()
    };
    let mut cluster = Cluster::start(3, opts).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    let victim = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    create(&client, "s", &["a"]).await;
    cluster.wipe(victim).await.unwrap();
    append_n(&client, "s", "a", 100).await;
    let report = cluster.node(leader).unwrap().report().await.unwrap();
    assert!(
        report.first_index > 2,
        "leader did not compact its log: {report:?}"
    );

    let before = cluster.node(leader).unwrap().status();
    cluster.restart(victim).await.unwrap();
    let applied = cluster.node(leader).unwrap().status().applied;
    cluster.wait_applied(victim, applied, WAIT).await.unwrap();
    let caught_up = cluster.node(victim).unwrap().report().await.unwrap();
    assert!(
        caught_up.snapshot_index > 0,
        "victim replayed the log instead of installing a snapshot"
    );
    let after = cluster.node(leader).unwrap().status();
    assert_eq!(
        (after.term, after.leader),
        (before.term, Some(leader)),
        "an election happened while the wiped replica caught up"
    );
    let r = stale_read(&cluster, victim, "s").await.unwrap();
    assert_eq!(r.messages.len(), 100);
    assert_eq!(r.last_seq, 100);

    // And it keeps up afterwards, through the log.
    client.append(append_req("s", "a", "after")).await.unwrap();
    let applied = cluster.node(leader).unwrap().status().applied;
    cluster.wait_applied(victim, applied, WAIT).await.unwrap();
    assert_eq!(
        stale_read(&cluster, victim, "s").await.unwrap().last_seq,
        101
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_is_repaired_without_a_write_and_serves_only_once_caught_up() {
    let opts = ClusterOptions {
        snapshot_entries: 20,
        compact_keep: 5,
        ..Default::default()
    };
    let mut cluster = Cluster::start(3, opts).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "w", &["a"]).await;
    append_n(&client, "w", "a", 100).await;
    let before = cluster.node(leader).unwrap().status();
    // The victim acknowledged everything, so the leader has nothing left to
    // send it: only its heartbeats can reveal the loss.
    let victim = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    cluster
        .wait_applied(victim, before.applied, WAIT)
        .await
        .unwrap();
    cluster.wipe(victim).await.unwrap();
    cluster.restart(victim).await.unwrap();

    let mut status = cluster.node(victim).unwrap().watch_status();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = status.borrow_and_update().clone();
        assert!(
            !s.serving || s.applied >= before.applied,
            "the wiped replica reported serving at {s:?}, before applying {}",
            before.applied
        );
        if !s.caught_up {
            // Nor does it serve stale reads meanwhile.
            match stale_read(&cluster, victim, "w").await {
                Err(e) => assert!(matches!(e, StoreError::Unavailable(_)), "{e}"),
                // Only if it caught up in between.
                Ok(_) => assert!(cluster.node(victim).unwrap().status().caught_up),
            }
        }
        if s.serving && s.applied >= before.applied {
            break;
        }
        tokio::time::timeout_at(deadline, status.changed())
            .await
            .expect("the wiped replica did not catch up without a write")
            .unwrap();
    }
    let r = stale_read(&cluster, victim, "w").await.unwrap();
    assert_eq!(r.last_seq, 100);
    // Catching it up cost no election.
    let after = cluster.node(leader).unwrap().status();
    assert_eq!(
        (after.term, after.leader),
        (before.term, Some(leader)),
        "an election happened while the wiped replica caught up"
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_appends_return_the_original_seq_and_store_nothing() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "i", &["a", "b"]).await;
    let first = client.append(append_req("i", "a", "x")).await.unwrap();
    client.append(append_req("i", "b", "x")).await.unwrap();
    let again = client.append(append_req("i", "a", "x")).await.unwrap();
    assert_eq!(
        (again.seq, again.server_ts_ms, again.duplicate),
        (first.seq, first.server_ts_ms, true)
    );
    // A batch holding the same message twice stores it once.
    let batch = client
        .append_batch(api::AppendBatchRequest {
            items: vec![
                append_req("i", "a", "y"),
                append_req("i", "a", "y"),
                append_req("i", "zed", "z"),
            ],
        })
        .await
        .unwrap();
    let outcome = |i: usize| batch.items[i].outcome.clone().unwrap();
    let (api::append_outcome::Outcome::Ok(y1), api::append_outcome::Outcome::Ok(y2)) =
        (outcome(0), outcome(1))
    else {
        panic!("{batch:?}")
    };
    assert_eq!((y1.seq, y2.seq, y2.duplicate), (3, 3, true));
    assert!(
        matches!(outcome(2), api::append_outcome::Outcome::Error(e) if e.code == Code::NotFound as i32)
    );
    assert_eq!(read_all(&client, "i").await.len(), 3);
    // A non-member's append is refused on the leader before it is
    // proposed: it costs no raft entry.
    let proposed = |report: chat_store::node::StatusReport| report.stats.proposed_ops;
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let before = proposed(cluster.node(leader).unwrap().report().await.unwrap());
    let e = client
        .append(append_req("i", "mallory", "m1"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e:?}");
    let after = proposed(cluster.node(leader).unwrap().report().await.unwrap());
    assert_eq!(after, before, "the refused append was proposed");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_added_as_learners_promoted_and_removed() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "m", &["a"]).await;
    for i in 0..10 {
        client
            .append(append_req("m", "a", &format!("m{i}")))
            .await
            .unwrap();
    }
    // The new replica is told about one follower only.
    let hint = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let addr = cluster.start_joiner(NodeId(4), hint).await.unwrap();
    let added = client.add_learner(4, &addr).await.unwrap();
    assert!(
        added
            .replicas
            .iter()
            .any(|r| r.id == 4 && r.role == "learner"),
        "{added:?}"
    );
    let applied = cluster.node(leader).unwrap().status().applied;
    cluster
        .wait_applied(NodeId(4), applied, WAIT)
        .await
        .unwrap();
    assert_eq!(
        stale_read(&cluster, NodeId(4), "m")
            .await
            .unwrap()
            .messages
            .len(),
        10
    );
    // A learner serves stale reads but does not count for the group.
    let s = cluster.node(NodeId(4)).unwrap().status();
    assert!(s.caught_up && !s.serving, "learner status {s:?}");

    let promoted = client.promote(4).await.unwrap();
    assert!(
        promoted
            .replicas
            .iter()
            .any(|r| r.id == 4 && r.role == "voter"),
        "{promoted:?}"
    );
    let follower = cluster
        .ids()
        .into_iter()
        .find(|&i| i != leader && i != NodeId(4))
        .unwrap();
    let removed = client.remove_replica(follower.0).await.unwrap();
    let voters: Vec<u64> = removed
        .replicas
        .iter()
        .filter(|r| r.role == "voter")
        .map(|r| r.id)
        .collect();
    assert_eq!(voters.len(), 3);
    assert!(!voters.contains(&follower.0));
    cluster
        .node(NodeId(4))
        .unwrap()
        .wait_for(WAIT, |s| s.serving)
        .await
        .expect("the promoted replica reports serving");
    cluster
        .node(follower)
        .unwrap()
        .wait_for(WAIT, |s| !s.serving)
        .await
        .expect("the removed replica stops reporting serving");
    cluster.kill(follower).await;
    // With the removed replica gone for good, the new voter set commits.
    client.append(append_req("m", "a", "after")).await.unwrap();

    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let refused = client.remove_replica(leader.0).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::FailedPrecondition(m) if m.contains("transfer leadership first")),
        "{refused}"
    );
    let unknown = client.remove_replica(42).await.unwrap_err();
    assert!(matches!(unknown, StoreError::NotFound(_)), "{unknown}");
    let unknown = client.promote(42).await.unwrap_err();
    assert!(matches!(unknown, StoreError::NotFound(_)), "{unknown}");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_clear_status_and_harms_nothing() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "b", &["a"]).await;
    client.append(append_req("b", "a", "kept")).await.unwrap();
    let mut raw = RawClient::connect(format!("http://{}", cluster.addr(leader)))
        .await
        .unwrap();

    let mut big = append_req("b", "a", "big");
    big.body = vec![0; 64 * 1024 + 1];
    let cases: Vec<(api::AppendRequest, Code, &str)> = vec![
        (big, Code::InvalidArgument, "limit is 65536"),
        (
            append_req("nope", "a", "1"),
            Code::NotFound,
            "does not exist",
        ),
        (
            append_req("b", "mallory", "1"),
            Code::NotFound,
            "not a member",
        ),
        (
            append_req("", "a", "1"),
            Code::InvalidArgument,
            "conversation id is empty",
        ),
        (
            append_req("b", "a", ""),
            Code::InvalidArgument,
            "client message id is empty",
        ),
        (
            append_req("b", "a b", "1"),
            Code::InvalidArgument,
            "contains ' '",
        ),
    ];
    for (req, code, text) in cases {
        let err = raw.append(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(text),
            "{:?} lacks {text:?}",
            err.message()
        );
    }
    let err = raw
        .create_conversation(api::CreateConversationRequest {
            conversation_id: "e".into(),
            members: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = raw
        .create_conversation(api::CreateConversationRequest {
            conversation_id: "b".into(),
            members: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = raw
        .read(api::ReadRequest {
            conversation_id: "b".into(),
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let all = read_all(&client, "b").await;
    assert_eq!(
        all.iter()
            .map(|m| m.client_msg_id.as_str())
            .collect::<Vec<_>>(),
        vec!["kept"]
    );
    assert_eq!(
        client
            .get_conversation(api::GetConversationRequest {
                conversation_id: "b".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .members,
        vec!["a"]
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_points_writers_at_the_leader() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let mut raw = RawClient::connect(format!("http://{}", cluster.addr(follower)))
        .await
        .unwrap();
    let err = raw.append(append_req("x", "a", "1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.metadata()
            .get("chat-leader-addr")
            .unwrap()
            .to_str()
            .unwrap(),
        cluster.addr(leader)
    );
    // The workspace client, given only the follower, follows the hint.
    let client = StoreClient::new(vec![cluster.addr(follower)], WAIT).unwrap();
    create(&client, "x", &["a"]).await;
    assert_eq!(
        client.append(append_req("x", "a", "1")).await.unwrap().seq,
        1
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_gracefully_hands_over_before_it_exits() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let old = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "g", &["a"]).await;
    client.append(append_req("g", "a", "1")).await.unwrap();
    // The old leader saw another replica take over before it stopped: no
    // election timeout was needed.
    assert!(
        cluster.shutdown(old).await.unwrap(),
        "leadership was not handed over"
    );
    let new = cluster.wait_leader(WAIT).await.unwrap();
    assert_ne!(new, old);
    assert_eq!(
        client.append(append_req("g", "a", "2")).await.unwrap().seq,
        2
    );
    cluster.stop_all().await;
}

/// A follower gathers committed entries for a while before it applies
/// them; stopped gracefully in that window, it still leaves a state that
/// holds every entry it knew committed (an operator who stops a replica to
/// back up its directory gets all of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_gracefully_has_applied_everything_it_knew_committed() {
    let opts = ClusterOptions {
        power_cuts: true,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(3, opts).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let client = cluster.client();
    create(&client, "s", &["a"]).await;
    for i in 0..5 {
        client
            .append(append_req("s", "a", &format!("m{i}")))
            .await
            .unwrap();
    }
    // As soon as the follower knows the last append committed (before its
    // gathering window has run out), stop it.
    let target = cluster.node(leader).unwrap().status().commit;
    let deadline = tokio::time::Instant::now() + WAIT;
    let known = loop {
        let s = cluster.node(follower).unwrap().status();
        if s.commit >= target {
            break s.commit;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the follower never learned the commit"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    cluster.shutdown(follower).await.unwrap();
    let applied = cluster.disk_applied(follower).unwrap();
    assert!(
        applied >= known,
        "stopped knowing {known} committed, its state holds only up to {applied}"
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_network_slows_replication_but_loses_nothing() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "l", &["a"]).await;
    cluster.faults().set_drop_rate(0.2);
    cluster.faults().set_delay(Duration::from_millis(2));
    let mut acked = HashMap::new();
    for i in 0..50 {
        let id = format!("m{i}");
        let r = client.append(append_req("l", "a", &id)).await.unwrap();
        acked.insert(id, r.seq);
    }
    cluster.faults().heal();
    assert_exactly_once(&read_all(&client, "l").await, &acked);
    cluster.stop_all().await;
}

/// The wiped-voter sequence: A leads; X is committed on A and B while C
/// lags; then B loses its disk (`then` runs from there and leaves A unable
/// to lead). B and C are a majority by count, but only C has history and it
/// lacks X: electing it would lose X, so no leader may emerge. Once A is
/// back, the group recovers with X intact.
async fn wiped_voter_sequence<F, Fut>(conv: &str, then: F)
where
    F: FnOnce(Cluster, NodeId, NodeId) -> Fut,
    Fut: std::future::Future<Output = Cluster>,
{
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let a = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|&i| i != a).collect();
    let (b, c) = (others[0], others[1]);
    create(&client, conv, &["u"]).await;
    cluster.faults().partition(&[c], &[a, b]);
    let x = client.append(append_req(conv, "u", "x")).await.unwrap();
    cluster.wipe(b).await.unwrap();
    let mut cluster = then(cluster, a, b).await;
    let stuck = cluster
        .wait_leader_among(&[b, c], Duration::from_secs(3))
        .await;
    assert!(
        stuck.is_err(),
        "{b} and {c} elected {stuck:?} without the acknowledged write"
    );
    if cluster.node(a).is_none() {
        cluster.restart(a).await.unwrap();
    }
    cluster.faults().heal();
    cluster.wait_leader(WAIT).await.unwrap();
    let all = read_all(&client, conv).await;
    assert_eq!(
        all.iter()
            .map(|m| (m.seq, m.client_msg_id.as_str()))
            .collect::<Vec<_>>(),
        vec![(x.seq, "x")]
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_lost_its_disk_cannot_elect_a_leader_missing_acknowledged_writes() {
    // B comes back empty, A is cut off, C returns.
    wiped_voter_sequence("d", |mut cluster, a, b| async move {
        cluster.faults().heal();
        cluster.faults().partition(&[a], &cluster.ids());
        cluster.restart(b).await.unwrap();
        cluster
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_voter_that_heard_the_leader_withholds_its_vote_until_caught_up() {
    // B comes back empty and hears A's heartbeats, but A's log cannot reach
    // it, so it cannot catch up. Then A dies and C returns.
    wiped_voter_sequence("h", |mut cluster, a, b| async move {
        cluster.faults().hold_log(a, b);
        cluster.restart(b).await.unwrap();
        let mut status = cluster.node(b).unwrap().watch_status();
        tokio::time::timeout(WAIT, status.wait_for(|s| s.leader == Some(a)))
            .await
            .expect("the wiped replica never heard the leader")
            .unwrap();
        assert!(!cluster.node(b).unwrap().status().caught_up);
        cluster.kill(a).await;
        cluster.faults().heal();
        cluster
    })
    .await;
}

/// Sends raft messages to `to` as if `from` had sent them, over the raft
/// transport, and returns once `to` has taken them in.
async fn forge(cluster: &Cluster, from: NodeId, to: NodeId, msgs: Vec<raft::eraftpb::Message>) {
    use chat_proto::raft::v1::{RaftBatch, raft_transport_client::RaftTransportClient};
    use protobuf::Message as _;
    let mut raw = RaftTransportClient::connect(format!("http://{}", cluster.addr(to)))
        .await
        .unwrap();
    let batch = RaftBatch {
        from: from.0,
        messages: msgs.iter().map(|m| m.write_to_bytes().unwrap()).collect(),
        from_address: String::new(),
    };
    raw.stream(futures::stream::iter([batch])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_rejection_does_not_set_a_follower_back() {
    use raft::eraftpb::{Message, MessageType};
    let cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    create(&client, "r", &["u"]).await;
    append_n(&client, "r", "u", 20).await;
    let applied = cluster.node(leader).unwrap().status().applied;
    cluster.wait_applied(follower, applied, WAIT).await.unwrap();
    let term = cluster.node(leader).unwrap().status().term;
    let matched = |report: &chat_store::node::StatusReport| {
        report
            .replicas
            .iter()
            .find(|r| r.id == follower)
            .map(|r| r.matched)
            .unwrap()
    };
    let before = cluster.node(leader).unwrap().report().await.unwrap();
    assert!(matched(&before) >= applied);
    let rejection = |context: Vec<u8>| {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppendResponse);
        m.from = follower.0;
        m.to = leader.0;
        m.term = term;
        m.index = applied - 1;
        m.reject = true;
        m.reject_hint = applied - 1;
        m.context = context.into();
        m
    };
    // A rejection from before the follower caught up, delivered late; then
    // the follower reporting a lost log, and a duplicate of that report.
    forge(&cluster, follower, leader, vec![rejection(Vec::new())]).await;
    let loss = rejection(7u64.to_be_bytes().to_vec());
    forge(&cluster, follower, leader, vec![loss.clone()]).await;
    // Nothing else changes on the leader meanwhile: poll its counters.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    while cluster
        .node(leader)
        .unwrap()
        .report()
        .await
        .unwrap()
        .stats
        .lost_logs_repaired
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never acted on the lost-log report"
        );
        poll.tick().await;
    }
    forge(&cluster, follower, leader, vec![loss]).await;
    // Everything the leader took in before this write is handled by the
    // time the write is acknowledged.
    client.append(append_req("r", "u", "after")).await.unwrap();
    let applied = cluster.node(leader).unwrap().status().applied;
    cluster.wait_applied(follower, applied, WAIT).await.unwrap();
    let after = cluster.node(leader).unwrap().report().await.unwrap();
    assert_eq!(
        after.stats.lost_logs_repaired, 1,
        "the late rejection or the duplicate report set the follower back again"
    );
    assert_eq!(after.status.term, term, "an election happened");
    let mut cluster = cluster;
    cluster.stop_all().await;
}

/// Both followers' disks stall for several election timeouts (as one disk
/// shared by every replica does on a busy machine): the write made
/// meanwhile waits for them, but the leader keeps its term, since a
/// heartbeat's answer does not wait for the disk, and no election follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_whose_disks_stall_keep_their_leader() {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await.unwrap();
    let leader = cluster.wait_leader(WAIT).await.unwrap();
    let client = cluster.client();
    create(&client, "d", &["a"]).await;
    client.append(append_req("d", "a", "before")).await.unwrap();
    let term = cluster.node(leader).unwrap().status().term;
    let stall = Duration::from_millis(1500);
    for id in cluster.ids().into_iter().filter(|&id| id != leader) {
        cluster.faults().stall_disk(id, stall);
    }
    let started = std::time::Instant::now();
    let r = client.append(append_req("d", "a", "during")).await.unwrap();
    assert_eq!(r.seq, 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the write did not wait for a follower's disk: no stall happened"
    );
    for id in cluster.ids() {
        let s = cluster.node(id).unwrap().status();
        assert_eq!(
            (s.term, s.leader),
            (term, Some(leader)),
            "replica {id} saw an election while the disks stalled"
        );
    }
    cluster.stop_all().await;
}
