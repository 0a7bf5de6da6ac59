//! `chatctl local up` as a user runs it: start the cluster, send and listen
//! with chatctl, restart every tier with `chatctl rollout restart` (the
//! change guard refusing what would take too much down) while a listener
//! keeps receiving, stop it with SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use chat_tests::binary;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

const WAIT: Duration = Duration::from_secs(60);

async fn line_matching(
    lines: &mut Lines<BufReader<ChildStdout>>,
    pred: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| anyhow::anyhow!("expected line did not appear within {WAIT:?}"))??
            .ok_or_else(|| anyhow::anyhow!("output ended before the expected line"))?;
        if pred(&line) {
            return Ok(line);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_runs_a_cluster_that_chatctl_sends_and_listens_through() -> anyhow::Result<()> {
    let chatctl = binary("chatctl")?;
    let dir = tempfile::tempdir()?;
    let mut up = Command::new(&chatctl)
        .args(["local", "up", "--base-port", "0", "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(up.stdout.take().expect("piped")).lines();
    let ready = line_matching(&mut out, |l| l.starts_with("ready")).await?;
    let gateways = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("gateways="))
        .ok_or_else(|| anyhow::anyhow!("no gateways in {ready:?}"))?
        .to_owned();
    assert_eq!(gateways.split(',').count(), 2, "{ready}");
    let key = std::fs::read_to_string(dir.path().join("token.key"))?;
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(&chatctl);
        c.args(args)
            .env("CHAT_GATEWAYS", &gateways)
            .env("CHAT_TOKEN_KEY", key.trim());
        c
    };

    let created = run(&[
        "--as",
        "alice",
        "conversation",
        "create",
        "demo",
        "--members",
        "bob",
    ])
    .output()?;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let mut listen = tokio::process::Command::from(run(&["--as", "bob", "listen"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut heard = BufReader::new(listen.stdout.take().expect("piped")).lines();
    let sent = run(&["--as", "alice", "send", "demo", "hello, bob"]).output()?;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let line = line_matching(&mut heard, |l| l.contains("hello, bob")).await?;
    assert_eq!(line, "demo #1 alice: hello, bob");

    // A non-member gets one clear line and a failure status.
    let refused = run(&["--as", "mallory", "send", "demo", "x"]).output()?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("NotFound") && err.contains("not a member"),
        "{err}"
    );

    // The change guard refuses, and says why.
    let dir_arg = dir.path().to_str().expect("utf-8 path");
    for (tier, batch, why) in [
        ("store", "2", "the store needs a majority"),
        ("router", "2", "takes every instance of the tier down"),
    ] {
        let out = run(&[
            "rollout",
            "restart",
            tier,
            "--batch",
            batch,
            "--local-dir",
            dir_arg,
        ])
        .output()?;
        assert!(!out.status.success(), "{tier} x{batch} was not refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refused") && err.contains(why), "{err}");
    }
    // Rolling restarts of every tier; the listener keeps up throughout.
    for tier in ["store", "router", "gateway"] {
        let out = run(&["rollout", "restart", tier, "--local-dir", dir_arg]).output()?;
        assert!(
            out.status.success(),
            "restart {tier}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(&format!("restarted every {tier}")), "{said}");
        if tier == "store" {
            assert!(said.contains("leadership moved"), "{said}");
        }
    }
    let sent = run(&["--as", "alice", "send", "demo", "after the restarts"]).output()?;
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let repeated = std::cell::Cell::new(false);
    let line = line_matching(&mut heard, |l| {
        repeated.set(repeated.get() || l.contains("hello, bob"));
        l.contains("after the restarts")
    })
    .await?;
    assert_eq!(line, "demo #2 alice: after the restarts", "no gap");
    assert!(!repeated.get(), "the first message was delivered again");

    listen.kill().await?;
    let pid = up.id().expect("running").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    let status = tokio::time::timeout(WAIT, up.wait()).await??;
    assert!(status.success(), "local up exited with {status}");
    // Every process it started is gone: the gateways no longer answer.
    for gw in gateways.split(',') {
        assert!(
            tokio::net::TcpStream::connect(gw).await.is_err(),
            "{gw} still accepts connections"
        );
    }
    Ok(())
}
