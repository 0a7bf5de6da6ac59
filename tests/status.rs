//! What operators and users see during trouble, against the real binaries:
//! Prometheus metrics on every service's admin port; incident notices
//! posted with chatctl reaching subscribers and the status page; the page
//! (JSON, and HTML in headless Chromium when it is installed) showing a
//! stopped store replica as down while the rest keeps serving.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chat_client::{ChatClient, SubscriptionEvent, event};
use chat_telemetry::admin::get;
use chatctl::local::{LocalCluster, LocalOptions};
use chatctl::restart::Tier;

const WAIT: Duration = Duration::from_secs(30);

async fn status(addr: &str) -> anyhow::Result<serde_json::Value> {
    let (code, body) = get(addr, "/status").await?;
    anyhow::ensure!(code == 200, "/status answered {code}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// Waits until `check` holds for the gateway's status document.
async fn status_until(
    addr: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(addr).await?;
        if check(&s) {
            return Ok(s);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; last: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The next status event on `sub`.
async fn next_status(
    sub: &mut chat_client::Subscription,
) -> anyhow::Result<chat_proto::chat::v1::StatusEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, sub.next())
            .await
            .map_err(|_| anyhow::anyhow!("no status event within {WAIT:?}"))?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        if let SubscriptionEvent::Event(e) = ev
            && let Some(event::Kind::Status(s)) = e.kind
        {
            return Ok(s);
        }
    }
}

/// Chromium's rendering of `url`, or why it cannot be had here.
fn chromium_dom(url: &str) -> Result<String, String> {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or("no chromium on PATH (.ci/run installs Debian's chromium package)")?;
    let out = std::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--dump-dom",
            url,
        ])
        .output()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{bin} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_incidents_and_the_status_page_show_what_is_wrong() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = LocalOptions {
        dir: dir.path().to_owned(),
        base_port: 0,
        bin_dir: Some(chat_tests::bin_dir()?),
        ..LocalOptions::default()
    };
    let mut cluster = LocalCluster::start(&opts)?;
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    let admin = cluster.gateway_admins()[0].clone();
    // Right after start, before the gateway has heard from every tier, the
    // page says so; it never shows an outage that is only the start.
    let first = status(&admin).await?;
    assert!(
        first["overall"] == "starting" || first["overall"] == "operational",
        "{first:#}"
    );
    let key = chat_auth::TokenKey::new(cluster.key.clone().into_bytes())?;
    let client = |user: &str| {
        ChatClient::new(
            cluster.gateways.clone(),
            &key.sign_for(user, 3600),
            Duration::from_secs(10),
        )
    };
    let alice = client("alice")?;
    alice.create_conversation("ops", &["bob".into()]).await?;
    alice.send("ops", "m1", b"hello".to_vec()).await?;

    // Metrics on every tier's admin port (either gateway and router may
    // have served the send); every metric the Grafana dashboard charts is
    // served by some service (rollout metrics appear once a rollout exists).
    let mut served = String::new();
    for (tier, expect) in [
        (
            Tier::Gateway,
            "chat_gateway_rpc_total{method=\"Send\",code=\"OK\"}",
        ),
        (
            Tier::Router,
            "chat_router_rpc_total{method=\"AppendBatch\",code=\"OK\"}",
        ),
        (
            Tier::Store,
            "chat_store_rpc_total{method=\"AppendBatch\",code=\"OK\"}",
        ),
    ] {
        let mut all = String::new();
        for name in cluster.names(tier) {
            let addr = cluster.admin_addr(&name).expect("an admin port");
            let (code, body) = get(&addr, "/metrics").await?;
            assert_eq!(code, 200, "{name}");
            assert!(body.contains("chat_build_info{service="), "{name}: {body}");
            all.push_str(&body);
        }
        assert!(all.contains(expect), "no {expect} in:\n{all}");
        served.push_str(&all);
    }
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/observability/grafana/dashboards/chat.json"),
    )?;
    let mut charted: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("chat_") && !w.starts_with("chat_rollout_"))
        .collect();
    charted.sort();
    charted.dedup();
    assert!(charted.len() > 10, "{charted:?}");
    for name in charted {
        assert!(
            served.contains(&format!("\n{name}")) || served.contains(&format!("# TYPE {name} ")),
            "the dashboard charts {name}, which no service serves"
        );
    }
    let s = status_until(&admin, "every part up", |s| s["overall"] == "operational").await?;
    assert_eq!(
        s["store"]["replicas"].as_array().map(Vec::len),
        Some(3),
        "{s:#}"
    );

    // An incident reaches subscribers and the page, and so does its end.
    let store = chat_store::StoreClient::new(cluster.stores.clone(), Duration::from_secs(10))?
        .with_tls(cluster.operator_tls());
    let bob = client("bob")?;
    let mut sub = bob.subscribe(HashMap::new());
    // The subscription is live once it delivers the first message.
    loop {
        let ev = tokio::time::timeout(WAIT, sub.next()).await?.expect("open");
        if let SubscriptionEvent::Event(e) = ev
            && matches!(e.kind, Some(event::Kind::Message(_)))
        {
            break;
        }
    }
    let posted = chatctl::incident::post(&store, "sends in eu are slow", "test").await?;
    let ev = next_status(&mut sub).await?;
    assert_eq!(
        (ev.state.as_str(), ev.notice.as_str()),
        ("incident", "sends in eu are slow")
    );
    status_until(&admin, "the incident on the page", |s| {
        s["incidents"][0]["text"] == "sends in eu are slow" && s["incidents"][0]["open"] == true
    })
    .await?;
    chatctl::incident::resolve(&store, Some(&posted.id)).await?;
    let ev = next_status(&mut sub).await?;
    assert_eq!(ev.state, "incident-resolved");

    // A stopped replica is shown down; the page itself keeps working.
    let victim = cluster.names(Tier::Store)[1].clone();
    let victim_addr = cluster.addr(&victim).expect("address");
    cluster.stop(&victim, Duration::from_secs(10)).await?;
    let s = status_until(&admin, "the stopped replica shown down", |s| {
        s["store"]["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["address"] == victim_addr.as_str() && r["state"] == "down")
    })
    .await?;
    assert_eq!(s["overall"], "degraded", "{s:#}");
    alice.send("ops", "m2", b"still works".to_vec()).await?;
    let url = format!("http://{admin}/");
    match chromium_dom(&url) {
        Ok(dom) => {
            let row =
                format!("<tr class=\"down\" data-component=\"store replica at {victim_addr}\">");
            assert!(dom.contains(&row), "no {row} in the rendered page:\n{dom}");
            assert!(dom.contains("data-overall=\"degraded\""), "{dom}");
        }
        Err(why) => println!("skipped the headless Chromium check: {why}"),
    }
    drop(sub);
    cluster.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
