//! Degraded mode, end to end: when the store loses its quorum, sends and
//! typing are refused at once with a retry-after hint, history and the
//! conversation list are served from a replica (history flagged stale), subscribers are told what is affected, and all of it
//! ends by itself when the quorum returns.

use std::collections::HashMap;
use std::time::Duration;

use chat_client::{ChatClient, Subscription, SubscriptionEvent, event};
use chat_proto::chat::v1 as pb;
use chat_tests::stack::Stack;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// Reads events until one satisfies `want`; fails at the deadline.
async fn wait_for(
    sub: &mut Subscription,
    what: &str,
    want: impl Fn(&pb::event::Kind) -> bool,
) -> anyhow::Result<pb::event::Kind> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => anyhow::bail!("no {what} within {WAIT:?}"),
            Ok(None) => anyhow::bail!("subscription ended while waiting for {what}"),
            Ok(Some(SubscriptionEvent::Failed(s))) => anyhow::bail!("subscription failed: {s}"),
            Ok(Some(SubscriptionEvent::Event(pb::Event { kind: Some(k) }))) if want(&k) => {
                return Ok(k);
            }
            Ok(Some(_)) => {}
        }
    }
}

fn status(k: &pb::event::Kind) -> Option<&pb::StatusEvent> {
    match k {
        event::Kind::Status(s) => Some(s),
        _ => None,
    }
}

fn message(k: &pb::event::Kind, id: &str) -> bool {
    matches!(k, event::Kind::Message(m) if m.client_msg_id == id)
}

async fn history(c: &ChatClient, conv: &str) -> Result<pb::HistoryResponse, tonic::Status> {
    c.history(pb::HistoryRequest {
        conversation_id: conv.into(),
        limit: 10,
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_store_quorum_degrades_plainly_and_recovers_by_itself() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let alice = stack.client("alice");
    let bob = stack.client("bob");
    alice
        .create_conversation("dm-ab", &["bob".to_string()])
        .await?;
    alice.send("dm-ab", "before", b"hello".to_vec()).await?;
    let mut sub = bob.subscribe(HashMap::new());
    wait_for(&mut sub, "the first message", |k| message(k, "before")).await?;

    // Two of three replicas down: no quorum.
    let ids = stack.store.ids();
    let down = [ids[0], ids[1]];
    for id in down {
        stack.store.kill(id).await;
    }
    let k = wait_for(&mut sub, "a degraded status event", |k| {
        status(k).is_some_and(|s| s.state == "degraded")
    })
    .await?;
    let s = status(&k).expect("a status event");
    for f in ["send", "typing", "history-stale"] {
        assert!(
            s.affected_features.iter().any(|a| a == f),
            "{f} missing: {s:?}"
        );
    }
    assert!(s.notice.contains("quorum"), "{}", s.notice);

    // A send fails fast and says when to come back; it is not left to wait
    // out the ten-second store deadline.
    let token = stack.key.sign_for("alice", 3600);
    let impatient = ChatClient::new(stack.gateway_addrs.clone(), &token, Duration::from_secs(3))?;
    let started = tokio::time::Instant::now();
    let err = impatient
        .send("dm-ab", "during", b"refused".to_vec())
        .await
        .expect_err("no quorum, no ack");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("quorum"), "{}", err.message());
    assert!(chat_client::retry_after(&err).is_some(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // History is still there, flagged stale.
    let page = history(&bob, "dm-ab").await?;
    assert!(
        page.stale,
        "history served without a quorum must say it is stale"
    );
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].client_msg_id, "before");

    // Conversations are listed from a replica too.
    let convs = bob.list_conversations().await?;
    assert_eq!(
        convs
            .iter()
            .map(|c| c.conversation_id.as_str())
            .collect::<Vec<_>>(),
        ["dm-ab"]
    );

    // Typing is off.
    let err = impatient.typing("dm-ab").await.expect_err("typing is off");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The quorum returns: subscribers are told, and sends work again.
    for id in down {
        stack.store.restart(id).await?;
    }
    wait_for(&mut sub, "an ok status event", |k| {
        status(k).is_some_and(|s| s.state == "ok")
    })
    .await?;
    alice.send("dm-ab", "after", b"back".to_vec()).await?;
    wait_for(&mut sub, "the message sent after recovery", |k| {
        message(k, "after")
    })
    .await?;
    let page = history(&bob, "dm-ab").await?;
    assert!(!page.stale);
    let ids: Vec<&str> = page
        .messages
        .iter()
        .map(|m| m.client_msg_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["before", "after"],
        "the refused send was never stored"
    );
    stack.stop().await;
    Ok(())
}
