//! The docker compose cluster (deploy/docker-compose.yml), driven through
//! its published 127.0.0.1 ports. Runs when a Docker engine and the image
//! (deploy/build-image.sh) are present, and says "skipped" otherwise.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chat_client::{ChatClient, SubscriptionEvent, event};
use chat_proto::chat::v1 as pb;
use chat_tests::free_ports;

const WAIT: Duration = Duration::from_secs(120);
const VOTERS: [&str; 3] = ["store-1", "store-2", "store-3"];

fn compose_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker-compose.yml")
}

fn image() -> String {
    std::env::var("CHAT_IMAGE").unwrap_or_else(|_| "chat-backend:local".into())
}

/// Why this environment cannot run the compose test, if it cannot.
fn unavailable() -> Option<String> {
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("docker").arg("info")) {
        return Some("no Docker engine reachable (`docker info` failed)".into());
    }
    if !ok(Command::new("docker-compose").arg("version")) {
        return Some("docker-compose is not installed".into());
    }
    if !ok(Command::new("docker").args(["image", "inspect", &image()])) {
        return Some(format!(
            "image {} is not built (run deploy/build-image.sh)",
            image()
        ));
    }
    None
}

/// A compose project; `down -v` when dropped, whatever happened.
struct Project {
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker-compose");
        c.args(["-p", &self.name, "-f"])
            .arg(compose_file())
            .args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs `docker-compose ARGS`; its output, or its error output as the
    /// error.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.compose(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every voter's container and volume gone, as with a lost site.
    fn lose_the_voters(&self) -> anyhow::Result<()> {
        self.run(&[&["stop", "-t", "2"][..], &VOTERS[..]].concat())?;
        self.run(&[&["rm", "-f"][..], &VOTERS[..]].concat())?;
        for s in VOTERS {
            self.docker(&["volume", "rm", &format!("{}_{s}", self.name)])?;
        }
        Ok(())
    }

    /// deploy/README.md's restore: each voter's new volume made from the
    /// backup `file` (a path in the containers, with `mount` bound) by the
    /// image's chatctl, then the voters started.
    fn restore_voters(&self, mount: &str, file: &str) -> anyhow::Result<()> {
        for (i, s) in VOTERS.iter().enumerate() {
            self.run(&[
                "run",
                "--rm",
                "--no-deps",
                "-v",
                mount,
                s,
                "chatctl",
                "store",
                "restore",
                file,
                "--id",
                &(i + 1).to_string(),
                "--data-dir",
                "/data",
                "--peers",
                "1=store-1:7001,2=store-2:7001,3=store-3:7001",
            ])?;
        }
        self.run(&[&["up", "-d", "--no-deps"][..], &VOTERS[..]].concat())?;
        Ok(())
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{}_1", self.name, service)
    }

    fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("docker").args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Store status rows (id, role, applied) as the operator toolbox
    /// container sees them (chatctl in the image, the operator identity).
    fn store_status(&self) -> anyhow::Result<Vec<(u64, String, u64)>> {
        self.store_status_of(&[])
    }

    /// The same, with `chatctl` flags added (`--store` to list more).
    fn store_status_of(&self, flags: &[&str]) -> anyhow::Result<Vec<(u64, String, u64)>> {
        let operator = self.container("operator");
        let out = self.docker(
            &[
                &["exec", &operator, "chatctl", "--timeout-secs", "2"][..],
                flags,
                &["store", "status"],
            ]
            .concat(),
        )?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 8 || f[2] == "unreachable:" {
                    return None;
                }
                Some((f[0].parse().ok()?, f[2].to_owned(), f[6].parse().ok()?))
            })
            .collect())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .compose(&["down", "-v", "--remove-orphans", "-t", "2"])
            .output();
    }
}

async fn wait_until<F, Fut>(what: &str, f: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

async fn collect(
    sub: &mut chat_client::Subscription,
    conv: &str,
    n: usize,
) -> anyhow::Result<Vec<pb::Message>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, sub.next()).await? {
            Some(SubscriptionEvent::Event(pb::Event {
                kind: Some(event::Kind::Message(m)),
            })) if m.conversation_id == conv => got.push(m),
            Some(SubscriptionEvent::Failed(s)) => anyhow::bail!("subscription failed: {s}"),
            Some(_) => {}
            None => anyhow::bail!("subscription ended"),
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_survives_kills_restarts_a_restore_from_backup_and_a_site_loss()
-> anyhow::Result<()> {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        if std::env::var("CI").is_ok_and(|v| v == "true")
            && Command::new("docker")
                .arg("info")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            anyhow::bail!("CI has a Docker engine, so the compose test must run: {why}");
        }
        return Ok(());
    }
    let ports = free_ports(7)?;
    let (p1, p2) = (ports[0], ports[1]);
    let key: String = (0..32)
        .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) % 256))
        .collect();
    let project = Project {
        name: format!("chattest{}", std::process::id()),
        env: vec![
            ("CHAT_IMAGE".into(), image()),
            ("CHAT_GATEWAY1_PORT".into(), p1.to_string()),
            ("CHAT_GATEWAY2_PORT".into(), p2.to_string()),
            ("CHAT_STORE1_PORT".into(), ports[2].to_string()),
            ("CHAT_STORE2_PORT".into(), ports[3].to_string()),
            ("CHAT_STORE3_PORT".into(), ports[4].to_string()),
            ("CHAT_STATUS_PORT".into(), ports[5].to_string()),
            ("CHAT_STATUS2_PORT".into(), ports[6].to_string()),
            ("CHAT_TOKEN_KEY".into(), key.clone()),
        ],
    };
    let up = project.compose(&["up", "-d"]).output()?;
    anyhow::ensure!(
        up.status.success(),
        "compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let (gw1, gw2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    // The operator identity, as deploy/up.sh copies it out; its CA also
    // verifies the gateways' public port, which is TLS here.
    let certs = tempfile::tempdir()?;
    let operator = certs.path().join("operator");
    project.docker(&[
        "cp",
        &format!("{}:/tls", project.container("operator")),
        &operator.display().to_string(),
    ])?;
    let ca = std::fs::read(operator.join("ca.crt"))?;
    let key = chat_auth::TokenKey::new(key.into_bytes())?;
    let client = |user: &str, gws: &[&String]| {
        ChatClient::new_tls(
            gws.iter().map(|s| s.to_string()).collect(),
            &key.sign_for(user, 3600),
            Duration::from_secs(30),
            &ca,
        )
    };
    let alice1 = client("alice", &[&gw1])?;
    wait_until("the cluster to accept calls", || async {
        alice1.list_conversations().await.is_ok()
    })
    .await?;
    // The public port is TLS: a plaintext client gets nowhere.
    let plain = ChatClient::new(
        vec![gw1.clone()],
        &key.sign_for("alice", 60),
        Duration::from_secs(2),
    )?;
    assert!(
        plain.list_conversations().await.is_err(),
        "the public port answered in plaintext"
    );

    // 0. The observability profile is there for users with a registry: it
    // is well formed, and the default profile (what just started, with no
    // image to pull) runs none of it.
    let compose_out = |args: &[&str]| project.run(args);
    let profile = compose_out(&["--profile", "observability", "config"])?;
    let running = project.docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project={}", project.name),
        "--format",
        "{{.Label \"com.docker.compose.service\"}}",
    ])?;
    for s in ["otel-collector", "jaeger", "prometheus", "grafana"] {
        assert!(
            profile.contains(&format!("  {s}:")),
            "{s} missing from the profile"
        );
        assert!(
            !running.lines().any(|l| l == s),
            "{s} runs in the default profile"
        );
    }
    // 3 stores, 2 routers, 2 gateways, the one-shot certs maker and the
    // operator toolbox.
    assert_eq!(running.lines().count(), 9, "{running}");
    // The status page of gateway 1 is published on 127.0.0.1.
    let status_addr = format!("127.0.0.1:{}", ports[5]);
    wait_until("the status page to show every part up", || async {
        chat_telemetry::admin::get(&status_addr, "/status")
            .await
            .is_ok_and(|(code, body)| code == 200 && body.contains("\"overall\": \"operational\""))
    })
    .await?;

    // 1. Sent through gateway 1, received by a listener on gateway 2.
    alice1.create_conversation("c", &["bob".into()]).await?;
    let bob2 = client("bob", &[&gw2])?;
    let mut sub = bob2.subscribe(HashMap::new());
    alice1
        .send("c", "hello", b"through compose".to_vec())
        .await?;
    let got = collect(&mut sub, "c", 1).await?;
    assert_eq!(got[0].client_msg_id, "hello");
    drop(sub);

    // 2. Kill the store leader's container while a client writes.
    let leader = project
        .store_status()?
        .into_iter()
        .find(|(_, role, _)| role == "leader")
        .map(|(id, _, _)| id)
        .ok_or_else(|| anyhow::anyhow!("no store leader"))?;
    let writer = client("alice", &[&gw1, &gw2])?;
    let write = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..300 {
            let id = format!("w{i}");
            writer.send("c", &id, b"x".to_vec()).await?;
            acked.push(id);
        }
        Ok::<_, tonic::Status>(acked)
    });
    let victim = format!("store-{leader}");
    tokio::time::sleep(Duration::from_millis(300)).await; // fault schedule: mid-write
    project.docker(&["kill", &project.container(&victim)])?;
    let acked = write.await??;
    let history = alice1
        .history(pb::HistoryRequest {
            conversation_id: "c".into(),
            limit: 1000,
            ..Default::default()
        })
        .await?;
    let stored: Vec<&str> = history
        .messages
        .iter()
        .map(|m| m.client_msg_id.as_str())
        .collect();
    let unique: HashSet<&str> = stored.iter().copied().collect();
    assert_eq!(unique.len(), stored.len(), "a message was stored twice");
    for id in &acked {
        assert!(unique.contains(id.as_str()), "acknowledged {id} lost");
    }
    // The killed replica comes back and catches up.
    project.docker(&["start", &project.container(&victim)])?;
    wait_until("the killed replica to catch up", || async {
        let Ok(rows) = project.store_status() else {
            return false;
        };
        let max = rows.iter().map(|r| r.2).max().unwrap_or(0);
        rows.len() == 3 && rows.iter().any(|r| r.0 == leader && r.2 == max)
    })
    .await?;

    // 3. Restart the gateways one at a time while a client listens.
    let bob = client("bob", &[&gw1, &gw2])?;
    let last = history.messages.last().map_or(0, |m| m.seq);
    let mut sub = bob.subscribe(HashMap::from([("c".to_string(), last)]));
    let mut expect = Vec::new();
    for (round, gw) in ["gateway-1", "gateway-2"].into_iter().enumerate() {
        project.docker(&["restart", "-t", "1", &project.container(gw)])?;
        for i in 0..5 {
            let id = format!("r{round}-{i}");
            writer_send(&client("alice", &[&gw1, &gw2])?, &id).await?;
            expect.push(id);
        }
    }
    expect_ids(&mut sub, &expect, "gateway restarts").await?;

    // 4. chatctl's rolling restarts against the compose cluster: the guard
    // refuses two store replicas at once; stores (leader last, leadership
    // moved first) and routers restart one at a time while bob listens.
    let stores = format!(
        "127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        ports[2], ports[3], ports[4]
    );
    let chatctl = |args: &[&str]| {
        let mut c = Command::new(chat_tests::binary("chatctl")?);
        c.args(["--store", &stores])
            .arg("--tls-dir")
            .arg(&operator)
            .args(args)
            .args(["--compose-project", &project.name]);
        anyhow::Ok(c.output()?)
    };
    // Without the operator identity the published store ports refuse.
    let anonymous = Command::new(chat_tests::binary("chatctl")?)
        .args([
            "--store",
            &stores,
            "--timeout-secs",
            "2",
            "incident",
            "list",
        ])
        .env_remove("CHAT_TLS_DIR")
        .output()?;
    assert!(
        !anonymous.status.success(),
        "the store answered a caller without a certificate: {}",
        String::from_utf8_lossy(&anonymous.stdout)
    );
    let refused = chatctl(&["rollout", "restart", "store", "--batch", "2"])?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let mut expect = Vec::new();
    for tier in ["store", "router"] {
        let out = chatctl(&["rollout", "restart", tier])?;
        assert!(
            out.status.success(),
            "restart {tier}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let id = format!("after-{tier}s");
        writer_send(&client("alice", &[&gw1, &gw2])?, &id).await?;
        expect.push(id);
    }
    expect_ids(&mut sub, &expect, "rolling restarts").await?;

    // 5. deploy/README.md's backup and restore recipe: a backup from the
    // host, every store volume lost, new volumes restored from the file by
    // the image's chatctl; the restored group holds every message of the
    // backup, under the same seqs, and takes new ones after them.
    let alice = client("alice", &[&gw1, &gw2])?;
    let before = read_all(&alice, "c").await?;
    let file = certs.path().join("chat.backup");
    let out = Command::new(chat_tests::binary("chatctl")?)
        .args(["--store", &stores])
        .arg("--tls-dir")
        .arg(&operator)
        .args(["store", "backup"])
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    project.lose_the_voters()?;
    project.restore_voters(&format!("{}:/backup:ro", file.display()), "/backup")?;
    holds_then_takes(&alice, &before, "after-restore").await?;

    // 6. deploy/README.md's zone recipe: a learner (profile `zone-b`)
    // follows the log; the voters' site is lost with its volumes; the
    // learner, stopped, is backed up offline and seeds a new group that
    // holds everything it had applied.
    compose_out(&["--profile", "zone-b", "up", "-d", "--no-deps", "store-4"])?;
    let operator_box = project.container("operator");
    wait_until("the learner to be added", || async {
        project
            .docker(&[
                "exec",
                &operator_box,
                "chatctl",
                "store",
                "add-learner",
                "4",
                "store-4:7001",
            ])
            .is_ok()
    })
    .await?;
    for i in 0..5 {
        writer_send(&alice, &format!("zone-{i}")).await?;
    }
    let with_learner = [
        "--store",
        "store-1:7001,store-2:7001,store-3:7001,store-4:7001",
    ];
    wait_until("the learner to apply everything", || async {
        let rows = project.store_status_of(&with_learner).unwrap_or_default();
        let voters = rows.iter().filter(|r| r.0 != 4).map(|r| r.2).max();
        rows.iter()
            .find(|r| r.0 == 4)
            .is_some_and(|r| voters.is_some_and(|v| r.2 >= v))
    })
    .await?;
    let before = read_all(&alice, "c").await?;
    compose_out(&["stop", "-t", "2", "store-4"])?;
    project.lose_the_voters()?;
    // A host directory the image's user (65534) may write to.
    let backups = tempfile::tempdir()?;
    std::fs::set_permissions(
        backups.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )?;
    let mount = format!("{}:/backups", backups.path().display());
    compose_out(&[
        "--profile",
        "zone-b",
        "run",
        "--rm",
        "--no-deps",
        "-v",
        &mount,
        "store-4",
        "chatctl",
        "store",
        "backup",
        "/backups/site-loss.backup",
        "--from-data-dir",
        "/data",
    ])?;
    project.restore_voters(&mount, "/backups/site-loss.backup")?;
    holds_then_takes(&alice, &before, "after-site-loss").await
}

/// The restored group holds `before` under the same seqs and takes a new
/// message, `marker`, right after them.
async fn holds_then_takes(
    alice: &ChatClient,
    before: &[chat_client::Message],
    marker: &str,
) -> anyhow::Result<()> {
    wait_until("the restored group to take a send", || async {
        writer_send(alice, marker).await.is_ok()
    })
    .await?;
    let after = read_all(alice, "c").await?;
    let seqs = |h: &[chat_client::Message]| -> Vec<(u64, String)> {
        h.iter().map(|m| (m.seq, m.client_msg_id.clone())).collect()
    };
    assert_eq!(
        seqs(&after[..before.len().min(after.len())]),
        seqs(before),
        "the restored group lost or renumbered messages"
    );
    assert_eq!(
        after[before.len()..]
            .iter()
            .map(|m| m.client_msg_id.as_str())
            .collect::<Vec<_>>(),
        [marker],
        "what follows the restored messages"
    );
    Ok(())
}

/// Every message of `conv`, page by page.
async fn read_all(c: &ChatClient, conv: &str) -> anyhow::Result<Vec<chat_client::Message>> {
    let mut all: Vec<chat_client::Message> = Vec::new();
    loop {
        let page = c
            .history(pb::HistoryRequest {
                conversation_id: conv.into(),
                after_seq: all.last().map_or(0, |m| m.seq),
                limit: 1_000,
                ..Default::default()
            })
            .await?;
        if page.messages.is_empty() {
            return Ok(all);
        }
        all.extend(page.messages);
    }
}

/// The next messages of "c" on `sub` are exactly `expect`, in order.
async fn expect_ids(
    sub: &mut chat_client::Subscription,
    expect: &[String],
    across: &str,
) -> anyhow::Result<()> {
    let got: Vec<String> = collect(sub, "c", expect.len())
        .await?
        .into_iter()
        .map(|m| m.client_msg_id)
        .collect();
    assert_eq!(got, expect, "gap or duplicate across {across}");
    Ok(())
}

async fn writer_send(c: &ChatClient, id: &str) -> Result<(), tonic::Status> {
    c.send("c", id, b"y".to_vec()).await.map(|_| ())
}
