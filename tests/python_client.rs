//! The public API from a client that is not this project's code and not
//! Rust: `tests/python/reflection_client.py` (grpcio, installed from PyPI
//! by `.ci/run`) discovers the API by server reflection alone, then
//! creates a conversation, sends, retries, reads history, subscribes and
//! meets two errors. Says "skipped" without Python and grpcio, except in
//! CI, where they must be there.

use std::process::Command;
use std::time::Duration;

use chat_tests::stack::Stack;

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
    if let Err(why) = python_with_grpc() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI installs Python's grpcio, so this test must run: {why}");
        }
        println!("skipped: {why}");
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
