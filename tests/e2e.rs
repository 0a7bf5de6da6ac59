//! The whole message path in one process: client → gateway → router →
//! store → router → gateway → subscriber.

use std::collections::HashMap;
use std::time::Duration;

use chat_client::{ChatClient, Subscription, SubscriptionEvent, event};
use chat_proto::chat::v1 as pb;
use chat_tests::stack::Stack;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// Collects messages per conversation until each has its expected count.
async fn collect_all(
    sub: &mut Subscription,
    want: &[(&str, usize)],
) -> anyhow::Result<HashMap<String, Vec<pb::Message>>> {
    let mut got: HashMap<String, Vec<pb::Message>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let done = |got: &HashMap<String, Vec<pb::Message>>| {
        want.iter()
            .all(|(c, n)| got.get(*c).map_or(0, Vec::len) >= *n)
    };
    while !done(&got) {
        let ev = tokio::time::timeout_at(deadline, sub.next())
            .await
            .map_err(|_| {
                let have: Vec<String> = want
                    .iter()
                    .map(|(c, n)| format!("{c}: {}/{n}", got.get(*c).map_or(0, Vec::len)))
                    .collect();
                anyhow::anyhow!("messages missing ({})", have.join(", "))
            })?;
        match ev {
            Some(SubscriptionEvent::Event(pb::Event {
                kind: Some(event::Kind::Message(m)),
            })) => got.entry(m.conversation_id.clone()).or_default().push(m),
            Some(SubscriptionEvent::Failed(s)) => anyhow::bail!("subscription failed: {s}"),
            Some(_) => {}
            None => anyhow::bail!("subscription ended"),
        }
    }
    Ok(got)
}

async fn collect(sub: &mut Subscription, conv: &str, n: usize) -> anyhow::Result<Vec<pb::Message>> {
    Ok(collect_all(sub, &[(conv, n)])
        .await?
        .remove(conv)
        .unwrap_or_default())
}

/// Every message once, in seq order, with the expected client ids.
fn assert_in_order(got: &[pb::Message], expect_ids: &[String]) {
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seqs, sorted, "out of order or duplicated");
    let ids: Vec<String> = got.iter().map(|m| m.client_msg_id.clone()).collect();
    assert_eq!(&ids, expect_ids);
}

async fn subscribe_live(c: &ChatClient) -> Subscription {
    c.subscribe(HashMap::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_group_conversations_deliver_every_message_once_in_order() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    let users = ["ann", "bob", "cat", "dan", "eve"];
    let clients: Vec<ChatClient> = users.iter().map(|u| stack.client(u)).collect();
    clients[0]
        .create_conversation("dm-ann-bob", &["bob".into()])
        .await?;
    clients[0]
        .create_conversation(
            "group",
            &users[1..].iter().map(|u| u.to_string()).collect::<Vec<_>>(),
        )
        .await?;
    let mut subs: Vec<Subscription> = Vec::new();
    for c in &clients {
        subs.push(subscribe_live(c).await);
    }
    // Direct: ann and bob take turns.
    let mut dm_ids = Vec::new();
    for i in 0..10 {
        let (from, id) = if i % 2 == 0 {
            (0, format!("ann-{i}"))
        } else {
            (1, format!("bob-{i}"))
        };
        clients[from]
            .send("dm-ann-bob", &id, format!("hi {i}").into_bytes())
            .await?;
        dm_ids.push(id);
    }
    // Group: everyone sends concurrently; order is the store's seq order.
    let mut sends = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        sends.push(tokio::spawn(async move {
            for k in 0..8 {
                c.send("group", &format!("{i}-{k}"), b"group message".to_vec())
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for s in sends {
        s.await??;
    }
    let history = clients[2]
        .history(pb::HistoryRequest {
            conversation_id: "group".into(),
            limit: 100,
            ..Default::default()
        })
        .await?;
    let group_ids: Vec<String> = history
        .messages
        .iter()
        .map(|m| m.client_msg_id.clone())
        .collect();
    assert_eq!(group_ids.len(), 40);
    for (i, sub) in subs.iter_mut().enumerate() {
        let want: &[(&str, usize)] = if i < 2 {
            &[("dm-ann-bob", 10), ("group", 40)]
        } else {
            &[("group", 40)]
        };
        let got = collect_all(sub, want).await?;
        if i < 2 {
            assert_in_order(&got["dm-ann-bob"], &dm_ids);
        } else {
            assert!(
                !got.contains_key("dm-ann-bob"),
                "{} saw a conversation it is not in",
                users[i]
            );
        }
        assert_in_order(&got["group"], &group_ids);
    }
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_survives_its_gateway_and_a_router_dying() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let alice = stack.client("alice");
    let bob = stack.client("bob");
    alice.create_conversation("c", &["bob".into()]).await?;
    let mut sub = bob.subscribe(HashMap::new());
    let mut expect = Vec::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        alice.send("c", &id, b"x".to_vec()).await?;
        expect.push(id);
    }
    let mut got = collect(&mut sub, "c", 5).await?;
    // Kill bob's gateway abruptly and one router, and keep sending.
    let gw = stack
        .gateway_with_sessions()
        .expect("bob's subscription is on a gateway");
    stack.gateways[gw].take().expect("running").kill();
    stack.routers[0].take().expect("running").kill();
    for i in 0..10 {
        let id = format!("after-{i}");
        alice.send("c", &id, b"y".to_vec()).await?;
        expect.push(id);
    }
    got.extend(collect(&mut sub, "c", 10).await?);
    assert_in_order(&got, &expect);
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_client_gets_everything_it_missed_on_reconnect() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let alice = stack.client("alice");
    let bob = stack.client("bob");
    alice.create_conversation("o", &["bob".into()]).await?;
    alice.send("o", "m0", b"seen".to_vec()).await?;
    let mut sub = bob.subscribe(HashMap::new());
    let first = collect(&mut sub, "o", 1).await?;
    drop(sub);
    let mut expect = Vec::new();
    for i in 1..=20 {
        let id = format!("m{i}");
        alice.send("o", &id, b"while away".to_vec()).await?;
        expect.push(id);
    }
    let mut sub = bob.subscribe(HashMap::from([("o".to_string(), first[0].seq)]));
    assert_in_order(&collect(&mut sub, "o", 20).await?, &expect);
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_harms_nothing() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let alice = stack.client("alice");
    alice.create_conversation("b", &[]).await?;
    alice.send("b", "kept", b"hello".to_vec()).await?;
    let mallory = stack.client("mallory");
    let expired = chat_client::ChatClient::new(
        stack.gateway_addrs.clone(),
        &stack.key.sign("alice", 1),
        Duration::from_secs(5),
    )?;
    let forged = chat_client::ChatClient::new(
        stack.gateway_addrs.clone(),
        &chat_auth::TokenKey::new(b"some other key entirely".to_vec())?.sign_for("alice", 60),
        Duration::from_secs(5),
    )?;
    let garbage = chat_client::ChatClient::new(
        stack.gateway_addrs.clone(),
        "not-a-token",
        Duration::from_secs(5),
    )?;
    let cases: Vec<(&str, Result<pb::SendResponse, tonic::Status>, Code, &str)> = vec![
        (
            "oversized body",
            alice.send("b", "big", vec![0; 64 * 1024 + 1]).await,
            Code::InvalidArgument,
            "limit is 65536",
        ),
        (
            "unknown conversation",
            alice.send("nope", "1", b"x".to_vec()).await,
            Code::NotFound,
            "does not exist",
        ),
        (
            "non-member",
            mallory.send("b", "1", b"x".to_vec()).await,
            Code::NotFound,
            "not a member",
        ),
        (
            "empty client message id",
            alice.send("b", "", b"x".to_vec()).await,
            Code::InvalidArgument,
            "client message id is empty",
        ),
        (
            "expired token",
            expired.send("b", "2", b"x".to_vec()).await,
            Code::Unauthenticated,
            "expired",
        ),
        (
            "token signed with another key",
            forged.send("b", "3", b"x".to_vec()).await,
            Code::Unauthenticated,
            "does not accept",
        ),
        (
            "malformed token",
            garbage.send("b", "4", b"x".to_vec()).await,
            Code::Unauthenticated,
            "malformed",
        ),
    ];
    for (what, result, code, text) in cases {
        let err = result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(
            err.message().contains(text),
            "{what}: {:?} lacks {text:?}",
            err.message()
        );
    }
    // No token at all.
    let mut raw =
        pb::chat_client::ChatClient::connect(format!("http://{}", stack.gateway_addrs[0])).await?;
    let err = raw
        .list_conversations(pb::ListConversationsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Reading or joining someone else's conversation is refused.
    let err = mallory
        .history(pb::HistoryRequest {
            conversation_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("not a member"), "{}", err.message());
    let err = mallory.add_member("b", "mallory").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The same answer as for a conversation that does not exist: a
    // stranger cannot tell which ids are taken.
    let missing = mallory.add_member("no-such", "mallory").await.unwrap_err();
    assert_eq!(missing.code(), err.code());
    // Nothing stored was harmed.
    let h = alice
        .history(pb::HistoryRequest {
            conversation_id: "b".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(
        h.messages
            .iter()
            .map(|m| m.client_msg_id.as_str())
            .collect::<Vec<_>>(),
        vec!["kept"]
    );
    let convs = alice.list_conversations().await?;
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0].members, vec!["alice"]);
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_online_members_and_is_never_stored() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let alice = stack.client("alice");
    let bob = stack.client("bob");
    alice.create_conversation("t", &["bob".into()]).await?;
    let mut sub = bob.subscribe(HashMap::new());
    // The routers learn of bob's session through a lease registration;
    // typing is best effort, so send until one arrives.
    let deadline = tokio::time::Instant::now() + WAIT;
    let typing = loop {
        alice.typing("t").await?;
        if let Ok(Some(SubscriptionEvent::Event(pb::Event {
            kind: Some(event::Kind::Typing(t)),
        }))) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await
        {
            break t;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no typing indicator arrived"
        );
    };
    assert_eq!(
        (typing.conversation_id.as_str(), typing.user_id.as_str()),
        ("t", "alice")
    );
    let h = bob
        .history(pb::HistoryRequest {
            conversation_id: "t".into(),
            ..Default::default()
        })
        .await?;
    assert!(h.messages.is_empty());
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_subscription_ends_when_its_token_expires() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let short = ChatClient::new(
        stack.gateway_addrs.clone(),
        &stack.key.sign("bob", now + 2),
        Duration::from_secs(5),
    )?;
    let mut sub = short.subscribe(HashMap::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await? {
            Some(SubscriptionEvent::Failed(s)) => {
                assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message());
                break;
            }
            Some(_) => {}
            None => anyhow::bail!("subscription ended without saying why"),
        }
    }
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_open_unbounded_subscriptions() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let token = stack.key.sign_for("bob", 600);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", stack.gateway_addrs[0]))?
            .connect()
            .await?;
    let mut raw = pb::chat_client::ChatClient::new(channel);
    let request = || {
        let mut r = tonic::Request::new(pb::SubscribeRequest { cursors: vec![] });
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        r
    };
    let mut open = Vec::new();
    for _ in 0..chat_gateway::service::MAX_SESSIONS_PER_USER {
        open.push(raw.subscribe(request()).await?);
    }
    let refused = raw.subscribe(request()).await.map(|_| ()).unwrap_err();
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "{}",
        refused.message()
    );
    // Another user is unaffected.
    let alice = stack.client_of("alice", &stack.gateway_addrs[..1]);
    alice.create_conversation("x", &[]).await?;
    drop(open);
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_are_listed_page_by_page_in_id_order() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let pat = stack.client("pat");
    for id in ["e", "a", "d", "c", "b"] {
        pat.create_conversation(&format!("list-{id}"), &[]).await?;
    }
    stack
        .client("other")
        .create_conversation("list-z", &[])
        .await?;
    let ids = |p: &pb::ListConversationsResponse| {
        p.conversations
            .iter()
            .map(|c| c.conversation_id.clone())
            .collect::<Vec<_>>()
    };
    let first = pat.list_conversations_page("", 2).await?;
    assert_eq!(ids(&first), ["list-a", "list-b"]);
    let second = pat.list_conversations_page(&first.next, 2).await?;
    assert_eq!(ids(&second), ["list-c", "list-d"]);
    let last = pat.list_conversations_page(&second.next, 2).await?;
    assert_eq!(ids(&last), ["list-e"]);
    assert!(last.next.is_empty(), "{last:?}");
    assert_eq!(pat.list_conversations().await?.len(), 5);
    let e = pat.list_conversations_page("", 5_000).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    Ok(())
}

/// A subscriber catches up on every conversation it belongs to, however
/// many: the catch-up reads the list page by page (a page stops at 100,000
/// member names, so eleven full groups take two pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_reaches_conversations_past_the_first_page() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let alice = stack.client("alice");
    // Groups this large are made through the store directly (the public
    // API takes requests of at most 80 KiB).
    let mut members: Vec<String> = (0..9_998).map(|i| format!("member-{i:05}")).collect();
    members.extend(["alice".to_string(), "bob".to_string()]);
    let store = stack.store.client();
    for g in 0..11 {
        store
            .create_conversation(chat_proto::store::v1::CreateConversationRequest {
                conversation_id: format!("crowd-{g:02}"),
                members: members.clone(),
            })
            .await?;
    }
    // Sent before bob subscribes: only the catch-up can bring it.
    alice
        .send("crowd-10", "late", b"in the last group".to_vec())
        .await?;
    let bob = stack.client("bob");
    let mut sub = bob.subscribe(HashMap::new());
    let got = collect(&mut sub, "crowd-10", 1).await?;
    assert_eq!(&got[0].body[..], b"in the last group");
    Ok(())
}
