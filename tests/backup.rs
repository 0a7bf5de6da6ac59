//! Backup and restore as an operator does them: `chatctl store backup`
//! against a serving group, every replica's data lost, `chatctl store
//! restore` into new directories, a new group started from them.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use chat_proto::store::v1 as api;
use chat_store::StoreClient;
use chat_tests::{StoreProcess, binary, local_group};

const WAIT: Duration = Duration::from_secs(20);
const CONVERSATIONS: usize = 3;

fn chatctl(args: &[&str]) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(binary("chatctl")?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()?)
}

/// `chatctl store restore FILE` for replica `id` into `dir`.
fn restore(file: &Path, id: u64, dir: &Path, peers: &str) -> anyhow::Result<Output> {
    chatctl(&[
        "store",
        "restore",
        file.to_str().unwrap(),
        "--id",
        &id.to_string(),
        "--data-dir",
        dir.to_str().unwrap(),
        "--peers",
        peers,
    ])
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn serving_leader(client: &StoreClient, replicas: &[StoreProcess]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for r in replicas {
            if client
                .status_of(&r.addr)
                .await
                .is_ok_and(|s| s.role == "leader" && s.serving)
            {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = replicas.iter().map(|r| r.log_text()).collect();
            anyhow::bail!("no leader within {WAIT:?}; logs:\n{}", logs.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A group of three under `dir/old` (and `dir/new` made for the one
/// restored later), started, with a leader and the test's conversations.
async fn serving_group(
    store: &Path,
    dir: &Path,
) -> anyhow::Result<(Vec<StoreProcess>, Vec<String>, StoreClient)> {
    std::fs::create_dir_all(dir.join("old"))?;
    std::fs::create_dir_all(dir.join("new"))?;
    let mut old = local_group(store, 3, &dir.join("old"), &[])?;
    for r in &mut old {
        r.start()?;
    }
    let addrs: Vec<String> = old.iter().map(|r| r.addr.clone()).collect();
    let client = StoreClient::new(addrs.clone(), WAIT)?;
    serving_leader(&client, &old).await?;
    for c in 0..CONVERSATIONS {
        client
            .create_conversation(api::CreateConversationRequest {
                conversation_id: format!("c{c}"),
                members: vec!["ann".into(), "bob".into()],
            })
            .await?;
    }
    Ok((old, addrs, client))
}

/// Appends `n` messages to each conversation, numbered from `from`.
async fn write(client: &StoreClient, from: usize, n: usize) -> anyhow::Result<()> {
    for c in 0..CONVERSATIONS {
        for i in from..from + n {
            let req = api::AppendRequest {
                conversation_id: format!("c{c}"),
                sender: "ann".into(),
                client_msg_id: format!("c{c}-m{i}"),
                body: format!("message {i} of c{c}").into_bytes(),
            };
            let r = client.append(req).await?;
            anyhow::ensure!(r.seq == i as u64 + 1, "c{c} m{i} got seq {}", r.seq);
        }
    }
    Ok(())
}

/// Every message of a conversation, in seq order.
async fn read_all(client: &StoreClient, conv: &str) -> anyhow::Result<Vec<api::StoredMessage>> {
    let mut out: Vec<api::StoredMessage> = Vec::new();
    loop {
        let page = client
            .read(api::ReadRequest {
                conversation_id: conv.into(),
                after_seq: out.last().map_or(0, |m| m.seq),
                limit: 1_000,
                ..Default::default()
            })
            .await?;
        if page.messages.is_empty() {
            return Ok(out);
        }
        out.extend(page.messages);
    }
}

fn corrupt_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(from)?;
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(to, bytes)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_service_restores_a_new_group_after_every_disk_is_lost()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = binary("chat-store")?;
    let (mut old, addrs, client) = serving_group(&store, dir.path()).await?;
    write(&client, 0, 200).await?;

    // The backup, through chatctl, while the group serves.
    let backup = dir.path().join("store.backup");
    let b = backup.to_str().unwrap();
    let store_flag = addrs.join(",");
    let out = chatctl(&["--store", &store_flag, "store", "backup", b])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("bytes of state"), "{}", text(&out));
    let info = chatctl(&["store", "backup-info", b])?;
    assert!(info.status.success(), "{}", text(&info));
    // A backup is never written over another file.
    let again = chatctl(&["--store", &store_flag, "store", "backup", b])?;
    assert!(!again.status.success());
    assert!(
        text(&again).contains("never written over"),
        "{}",
        text(&again)
    );

    // Written after the backup: not in it.
    write(&client, 200, 5).await?;

    // Every replica and its disk lost.
    for r in &mut old {
        r.kill().await?;
        std::fs::remove_dir_all(&r.data_dir)?;
    }

    // A damaged backup is refused, naming the problem.
    let bad = dir.path().join("damaged.backup");
    corrupt_copy(&backup, &bad)?;
    let new_dir = dir.path().join("new");
    let mut new = local_group(&store, 3, &new_dir, &[])?;
    let peers: Vec<String> = new.iter().map(|r| format!("{}={}", r.id, r.addr)).collect();
    let peers = peers.join(",");
    let refused = restore(&bad, 1, &new[0].data_dir, &peers)?;
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("checksum does not match"),
        "{}",
        text(&refused)
    );
    assert!(!new[0].data_dir.exists(), "nothing left behind");

    // The new group, on new ports, restored from the backup.
    for r in &new {
        let out = restore(&backup, r.id, &r.data_dir, &peers)?;
        assert!(out.status.success(), "{}", text(&out));
    }
    // A directory that holds data is never restored over.
    let twice = restore(&backup, 1, &new[0].data_dir, &peers)?;
    assert!(!twice.status.success());
    assert!(text(&twice).contains("is not empty"), "{}", text(&twice));

    for r in &mut new {
        r.start()?;
    }
    let client = StoreClient::new(new.iter().map(|r| r.addr.clone()).collect(), WAIT)?;
    serving_leader(&client, &new).await?;
    for c in 0..CONVERSATIONS {
        let conv = format!("c{c}");
        let msgs = read_all(&client, &conv).await?;
        let ids: Vec<String> = msgs.iter().map(|m| m.client_msg_id.clone()).collect();
        let want: Vec<String> = (0..200).map(|i| format!("c{c}-m{i}")).collect();
        assert_eq!(
            ids, want,
            "{conv}: everything before the backup, once, in order"
        );
        assert!(msgs.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1));
        // The restored group takes writes, numbering on from the backup;
        // a retry of a message it holds is still a duplicate.
        let r = client
            .append(api::AppendRequest {
                conversation_id: conv.clone(),
                sender: "bob".into(),
                client_msg_id: format!("{conv}-after"),
                body: b"after the restore".to_vec(),
            })
            .await?;
        assert_eq!(r.seq, 201);
        let retry = client
            .append(api::AppendRequest {
                conversation_id: conv.clone(),
                sender: "ann".into(),
                client_msg_id: format!("{conv}-m7"),
                body: format!("message 7 of {conv}").into_bytes(),
            })
            .await?;
        assert_eq!(retry.seq, 8, "deduplicated against the restored state");
    }
    // Every replica of the new group holds the state (a stale read of each).
    for r in &new {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = client.status_of(&r.addr).await?;
            if s.applied_index >= s.commit_index && s.serving {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "replica {} did not catch up: {s:?}",
                r.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let page = client
            .read_from(
                &r.addr,
                api::ReadRequest {
                    conversation_id: "c0".into(),
                    limit: 1_000,
                    consistency: api::Consistency::Stale as i32,
                    ..Default::default()
                },
            )
            .await?;
        assert!(
            page.messages.len() >= 200,
            "replica {}: {}",
            r.id,
            page.messages.len()
        );
    }
    Ok(())
}

/// The voters' site is lost for good; a learner that followed the log from
/// elsewhere survives. A backup made offline from its data directory seeds
/// a new group that holds everything the learner had applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_that_outlived_the_voters_site_seeds_a_new_group() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = binary("chat-store")?;
    let (mut old, addrs, client) = serving_group(&store, dir.path()).await?;
    let voters: Vec<String> = old.iter().map(|r| format!("{}={}", r.id, r.addr)).collect();
    let learner_addr = format!("127.0.0.1:{}", chat_tests::free_port()?);
    let mut learner = StoreProcess::new(
        store.clone(),
        4,
        learner_addr.clone(),
        &voters.join(","),
        dir.path().join("learner-data"),
        dir.path().join("learner.log"),
    )
    .with_args(&["--join"]);
    learner.start()?;
    client.add_learner(4, &learner_addr).await?;
    write(&client, 0, 100).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let commit = client
            .status_of(&addrs[0])
            .await
            .map_or(0, |s| s.commit_index);
        let applied = client
            .status_of(&learner_addr)
            .await
            .map_or(0, |s| s.applied_index);
        if commit > 0 && applied >= commit {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the learner did not follow: applied {applied} of {commit}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The voters' site is gone; the learner is stopped and backed up.
    for r in &mut old {
        r.kill().await?;
    }
    learner.terminate(WAIT).await?;
    let backup = dir.path().join("from-learner.backup");
    let out = chatctl(&[
        "store",
        "backup",
        backup.to_str().unwrap(),
        "--from-data-dir",
        learner.data_dir.to_str().unwrap(),
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("note:"), "{}", text(&out));

    let mut new = local_group(&store, 3, &dir.path().join("new"), &[])?;
    let peers: Vec<String> = new.iter().map(|r| format!("{}={}", r.id, r.addr)).collect();
    let peers = peers.join(",");
    for r in &new {
        let out = restore(&backup, r.id, &r.data_dir, &peers)?;
        assert!(out.status.success(), "{}", text(&out));
    }
    for r in &mut new {
        r.start()?;
    }
    let client = StoreClient::new(new.iter().map(|r| r.addr.clone()).collect(), WAIT)?;
    serving_leader(&client, &new).await?;
    for c in 0..CONVERSATIONS {
        let msgs = read_all(&client, &format!("c{c}")).await?;
        let ids: Vec<String> = msgs.iter().map(|m| m.client_msg_id.clone()).collect();
        let want: Vec<String> = (0..100).map(|i| format!("c{c}-m{i}")).collect();
        assert_eq!(ids, want);
    }
    Ok(())
}
