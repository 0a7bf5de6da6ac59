//! The real `chat-store` binary: three processes on loopback, killed and
//! restarted with signals.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chat_proto::store::v1 as api;
use chat_store::StoreClient;
use chat_tests::{StoreProcess, binary, local_group};

const WAIT: Duration = Duration::from_secs(20);

struct Group {
    _dir: tempfile::TempDir,
    replicas: Vec<StoreProcess>,
    client: StoreClient,
}

fn group(n: u64) -> anyhow::Result<Group> {
    group_with(n, &[])
}

fn group_with(n: u64, extra: &[&str]) -> anyhow::Result<Group> {
    let dir = tempfile::tempdir()?;
    let replicas = local_group(&binary("chat-store")?, n, dir.path(), extra)?;
    let client = StoreClient::new(replicas.iter().map(|r| r.addr.clone()).collect(), WAIT)?;
    Ok(Group {
        _dir: dir,
        replicas,
        client,
    })
}

impl Group {
    /// Waits until some replica reports itself leader and serving.
    async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            for (i, r) in self.replicas.iter().enumerate() {
                if r.pid().is_none() {
                    continue;
                }
                if let Ok(s) = self.client.status_of(&r.addr).await
                    && s.role == "leader"
                    && s.serving
                {
                    return Ok(i);
                }
            }
            if tokio::time::Instant::now() > deadline {
                let logs: Vec<String> = self.replicas.iter().map(|r| r.log_text()).collect();
                anyhow::bail!("no leader within {WAIT:?}; logs:\n{}", logs.join("\n---\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn applied(&self, i: usize) -> u64 {
        self.client
            .status_of(&self.replicas[i].addr)
            .await
            .map_or(0, |s| s.applied_index)
    }
}

fn append(conv: &str, sender: &str, id: &str) -> api::AppendRequest {
    api::AppendRequest {
        conversation_id: conv.into(),
        sender: sender.into(),
        client_msg_id: id.into(),
        body: vec![b'x'; 256],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_process_loses_no_acknowledged_append() -> anyhow::Result<()> {
    let mut g = group(3)?;
    for r in &mut g.replicas {
        r.start()?;
    }
    g.leader().await?;
    let client = Arc::new(StoreClient::new(g.client.endpoints().to_vec(), WAIT)?);
    let senders: Vec<String> = (0..4).map(|w| format!("s{w}")).collect();
    client
        .create_conversation(api::CreateConversationRequest {
            conversation_id: "k".into(),
            members: senders.clone(),
        })
        .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, stop, acks) = (client.clone(), stop.clone(), acks.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = HashMap::new();
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("s{w}-{i}");
                let deadline = tokio::time::Instant::now() + WAIT;
                loop {
                    match client.append(append("k", &format!("s{w}"), &id)).await {
                        Ok(r) => {
                            acked.insert(id, r.seq);
                            acks.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {}
                        Err(e) => return Err(anyhow::anyhow!("append {id}: {e}")),
                    }
                }
            }
            Ok::<_, anyhow::Error>(acked)
        }));
    }
    let wait_acks = |n: usize| {
        let acks = acks.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            while acks.load(Ordering::Relaxed) < n {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "acks stalled below {n}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, anyhow::Error>(acks.load(Ordering::Relaxed))
        }
    };
    wait_acks(300).await?;
    let old = g.leader().await?;
    g.replicas[old].kill().await?;
    let before = acks.load(Ordering::Relaxed);
    wait_acks(before + 300).await?;
    stop.store(true, Ordering::Relaxed);
    let mut acked = HashMap::new();
    for w in writers {
        acked.extend(w.await??);
    }

    g.replicas[old].start()?;
    let leader = g.leader().await?;
    let target = g.applied(leader).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while g.applied(old).await < target {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "restarted replica did not catch up to {target}; its log:\n{}",
            g.replicas[old].log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut messages: Vec<api::StoredMessage> = Vec::new();
    loop {
        let after = messages.last().map_or(0, |m| m.seq);
        let page = client
            .read(api::ReadRequest {
                conversation_id: "k".into(),
                after_seq: after,
                limit: 1000,
                ..Default::default()
            })
            .await?;
        if page.messages.is_empty() {
            break;
        }
        messages.extend(page.messages);
    }
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=messages.len() as u64).collect::<Vec<_>>(),
        "gapless, in order"
    );
    let unique: HashSet<&str> = messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(unique.len(), messages.len(), "a message was stored twice");
    let by_seq: HashMap<u64, &str> = messages
        .iter()
        .map(|m| (m.seq, m.client_msg_id.as_str()))
        .collect();
    for (id, seq) in &acked {
        assert_eq!(
            by_seq.get(seq),
            Some(&id.as_str()),
            "acknowledged {id} (seq {seq}) lost"
        );
    }
    // The restarted replica holds the same history.
    let stale = g
        .client
        .read_from(
            &g.replicas[old].addr,
            api::ReadRequest {
                conversation_id: "k".into(),
                consistency: api::Consistency::Stale as i32,
                limit: 1,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(stale.last_seq, messages.len() as u64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_leader_hands_over_and_exits_cleanly() -> anyhow::Result<()> {
    let mut g = group(3)?;
    for r in &mut g.replicas {
        r.start()?;
    }
    let old = g.leader().await?;
    g.client
        .create_conversation(api::CreateConversationRequest {
            conversation_id: "t".into(),
            members: vec!["a".into()],
        })
        .await?;
    g.client.append(append("t", "a", "1")).await?;
    let status = g.replicas[old].terminate(WAIT).await?;
    assert!(
        status.success(),
        "exit status {status}: {}",
        g.replicas[old].log_text()
    );
    assert!(
        g.replicas[old]
            .log_text()
            .contains("leadership transfer before shutdown")
    );
    let new = g.leader().await?;
    assert_ne!(new, old);
    assert_eq!(g.client.append(append("t", "a", "2")).await?.seq, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_another_replica_is_refused() -> anyhow::Result<()> {
    let g = group(1)?;
    let mut first = StoreProcess::new(
        binary("chat-store")?,
        1,
        g.replicas[0].addr.clone(),
        &format!("1={}", g.replicas[0].addr),
        g.replicas[0].data_dir.clone(),
        g._dir.path().join("a.log"),
    );
    first.start()?;
    let client = StoreClient::new(vec![first.addr.clone()], WAIT)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !client.status_of(&first.addr).await.is_ok_and(|s| s.serving) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "single replica never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.terminate(WAIT).await?;
    // The same directory handed to replica 2 by a configuration mistake.
    let mut wrong = StoreProcess::new(
        binary("chat-store")?,
        2,
        first.addr.clone(),
        &format!("2={}", first.addr),
        first.data_dir.clone(),
        g._dir.path().join("b.log"),
    );
    wrong.start()?;
    let status = wrong.wait_exit(WAIT).await?;
    assert!(!status.success());
    assert!(
        wrong
            .log_text()
            .contains("data directory belongs to replica 1, not to replica 2"),
        "{}",
        wrong.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_directory_stops_the_replica_instead_of_serving_empty() -> anyhow::Result<()>
{
    // Either store of the data directory may be the damaged one: the state
    // machine's file with its head overwritten, as a bad disk would leave
    // it, or the raft log's files gone.
    type Damage = fn(&std::path::Path) -> std::io::Result<()>;
    let damages: [(&str, Damage); 2] = [
        ("state file head overwritten", |dir| {
            let db = dir.join("state").join("db");
            let len = std::fs::metadata(&db)?.len() as usize;
            std::fs::write(&db, vec![0x5a; len.min(1 << 16)])
        }),
        ("raft log files gone", |dir| {
            for f in std::fs::read_dir(dir.join("wal"))? {
                let f = f?.path();
                if f.extension()
                    .is_some_and(|e| e == "raftlog" || e == "rewrite")
                {
                    std::fs::remove_file(f)?;
                }
            }
            Ok(())
        }),
    ];
    for (what, damage) in damages {
        let mut g = group(1)?;
        g.replicas[0].start()?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while !g
            .client
            .status_of(&g.replicas[0].addr)
            .await
            .is_ok_and(|s| s.serving)
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "replica never served"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        g.client
            .create_conversation(api::CreateConversationRequest {
                conversation_id: "z".into(),
                members: vec!["a".into()],
            })
            .await?;
        g.client.append(append("z", "a", "1")).await?;
        g.replicas[0].terminate(WAIT).await?;
        damage(&g.replicas[0].data_dir)?;
        g.replicas[0].start()?;
        let status = g.replicas[0].wait_exit(WAIT).await?;
        assert!(!status.success(), "{what}: a damaged replica kept running");
        let log = g.replicas[0].log_text();
        assert!(
            log.contains("refusing to start")
                || log.contains("is damaged")
                || log.contains("cannot open"),
            "{what}: {log}"
        );
    }
    Ok(())
}

async fn health(addr: &str) -> Option<i32> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut c = HealthClient::new(channel);
    let r = c
        .check(HealthCheckRequest {
            service: "chat.store.v1.Store".into(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_serving_only_with_a_leader() -> anyhow::Result<()> {
    use tonic_health::ServingStatus;
    let mut g = group(3)?;
    g.replicas[0].start()?;
    // Alone, replica 1 has no quorum: reachable, but NOT_SERVING. It gets
    // several election timeouts to prove it stays that way.
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        if let Some(s) = health(&g.replicas[0].addr).await {
            assert_eq!(
                s,
                ServingStatus::NotServing as i32,
                "serving without a quorum"
            );
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered > 0, "health never answered");
    // A new group elects its first leader once every initial replica has
    // started (an empty data directory could be one that lost its disk).
    g.replicas[1].start()?;
    g.replicas[2].start()?;
    let deadline = tokio::time::Instant::now() + WAIT;
    for r in &g.replicas {
        while health(&r.addr).await != Some(ServingStatus::Serving as i32) {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "replica {} never reported SERVING",
                r.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn signal(p: &StoreProcess, sig: &str) -> anyhow::Result<()> {
    let pid = p
        .pid()
        .ok_or_else(|| anyhow::anyhow!("replica {} not running", p.id))?;
    anyhow::ensure!(
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success(),
        "kill {sig} {pid} failed"
    );
    Ok(())
}

/// The wiped-voter sequence with real processes: X is committed on A and B
/// while C is cut off; B's disk is wiped; B comes back and hears A (but A's
/// log cannot reach it); A dies and C returns. Electing C would lose X, so
/// no leader may emerge until A is back, and then X is there once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_voter_that_heard_the_leader_cannot_help_lose_an_acknowledged_write()
-> anyhow::Result<()> {
    let mut g = group_with(3, &["--fault-signals"])?;
    for r in &mut g.replicas {
        r.start()?;
    }
    let a = g.leader().await?;
    let (b, c) = match a {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let a_id = g.replicas[a].id.to_string();
    g.client
        .create_conversation(api::CreateConversationRequest {
            conversation_id: "v".into(),
            members: vec!["u".into()],
        })
        .await?;
    signal(&g.replicas[c], "-USR1")?;
    let x = g.client.append(append("v", "u", "x")).await?;

    g.replicas[b].kill().await?;
    std::fs::remove_dir_all(&g.replicas[b].data_dir)?;
    g.replicas[b].add_args(&["--fault-hold-log-from", &a_id]);
    g.replicas[b].start()?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(s) = g.client.status_of(&g.replicas[b].addr).await
            && s.leader_id == g.replicas[a].id
        {
            anyhow::ensure!(!s.serving, "the wiped replica serves before catching up");
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the wiped replica never heard the leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    g.replicas[a].kill().await?;
    signal(&g.replicas[c], "-USR2")?;
    // Three seconds is several election timeouts.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < watch_until {
        for i in [b, c] {
            if let Ok(s) = g.client.status_of(&g.replicas[i].addr).await {
                anyhow::ensure!(
                    s.role != "leader",
                    "replica {} became leader without the acknowledged write",
                    s.id
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    g.replicas[a].start()?;
    g.leader().await?;
    let read = g
        .client
        .read(api::ReadRequest {
            conversation_id: "v".into(),
            limit: 10,
            ..Default::default()
        })
        .await?;
    let got: Vec<(u64, &str)> = read
        .messages
        .iter()
        .map(|m| (m.seq, m.client_msg_id.as_str()))
        .collect();
    assert_eq!(got, vec![(x.seq, "x")]);
    Ok(())
}

/// `chatctl store rebuild-replica ID --data-dir DIR` against `g`.
fn rebuild(g: &Group, i: usize) -> anyhow::Result<(bool, String)> {
    let r = &g.replicas[i];
    let out = std::process::Command::new(binary("chatctl")?)
        .args([
            "--store",
            &g.client.endpoints().join(","),
            "store",
            "rebuild-replica",
            &r.id.to_string(),
            "--data-dir",
            r.data_dir.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// A follower's state file is damaged on disk: it refuses to start, the
/// operator rebuilds it with chatctl (guarded: not while it runs, not
/// while another replica is down), and started again it rejoins by
/// snapshot with every acknowledged message while the group serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_follower_is_rebuilt_with_chatctl_and_rejoins_with_everything()
-> anyhow::Result<()> {
    let mut g = group_with(3, &["--snapshot-entries", "20", "--compact-keep", "5"])?;
    for r in &mut g.replicas {
        r.start()?;
    }
    let leader = g.leader().await?;
    g.client
        .create_conversation(api::CreateConversationRequest {
            conversation_id: "r".into(),
            members: vec!["a".into()],
        })
        .await?;
    for i in 0..60 {
        g.client.append(append("r", "a", &format!("m{i}"))).await?;
    }
    let f = (0..3).find(|&i| i != leader).expect("a follower");
    let other = (0..3).find(|&i| i != leader && i != f).expect("another");

    let (ok, text) = rebuild(&g, f)?;
    assert!(!ok && text.contains("is running"), "{text}");

    g.replicas[f].terminate(WAIT).await?;
    let db = g.replicas[f].data_dir.join("state").join("db");
    let len = std::fs::metadata(&db)?.len() as usize;
    std::fs::write(&db, vec![0x5a; len.min(1 << 16)])?;
    g.replicas[f].start()?;
    assert!(
        !g.replicas[f].wait_exit(WAIT).await?.success(),
        "a damaged replica kept running"
    );

    // Not while a second replica is out too.
    g.replicas[other].terminate(WAIT).await?;
    let (ok, text) = rebuild(&g, f)?;
    assert!(!ok && text.contains("down as well"), "{text}");
    g.replicas[other].start()?;
    g.leader().await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !g
        .client
        .status_of(&g.replicas[other].addr)
        .await
        .is_ok_and(|s| s.serving)
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "replica never served again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (ok, text) = rebuild(&g, f)?;
    assert!(ok, "{text}");
    assert!(text.contains("damaged-"), "{text}");
    g.replicas[f].start()?;
    // Written while it catches up.
    for i in 60..70 {
        g.client.append(append("r", "a", &format!("m{i}"))).await?;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = g.client.status_of(&g.replicas[f].addr).await;
        let leader_commit = g
            .client
            .status_of(&g.replicas[leader].addr)
            .await?
            .commit_index;
        if let Ok(s) = s
            && s.serving
            && s.applied_index >= leader_commit
        {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the rebuilt replica did not catch up; its log:\n{}",
            g.replicas[f].log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = g
        .client
        .read_from(
            &g.replicas[f].addr,
            api::ReadRequest {
                conversation_id: "r".into(),
                limit: 1_000,
                consistency: api::Consistency::Stale as i32,
                ..Default::default()
            },
        )
        .await?;
    let ids: Vec<String> = page
        .messages
        .iter()
        .map(|m| m.client_msg_id.clone())
        .collect();
    let want: Vec<String> = (0..70).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, want);
    Ok(())
}
