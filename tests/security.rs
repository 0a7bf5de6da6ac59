//! Internal ports refuse callers that are not who the method is for.
//!
//! The whole backend runs in this process with mutual TLS on every
//! internal hop (as `chatctl local up` and compose run it). Each case
//! dials one internal port as some caller (plaintext, TLS without a
//! certificate, a certificate from another CA, or a certificate of a
//! role) and makes one call. The cases where the right role calls show
//! that the refusals come from authorisation, not from a broken port.

use std::time::Duration;

use chat_proto::raft::v1::RaftBatch;
use chat_proto::raft::v1::raft_transport_client::RaftTransportClient;
use chat_proto::router::v1::gateway_delivery_client::GatewayDeliveryClient;
use chat_proto::router::v1::router_client::RouterClient;
use chat_proto::router::v1::{DeliverRequest, RegisterSessionsRequest};
use chat_proto::store::v1 as api;
use chat_proto::store::v1::store_admin_client::StoreAdminClient;
use chat_proto::store::v1::store_client::StoreClient as RawStore;
use chat_security::{Role, Tls};
use chat_tests::stack::Stack;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const WAIT: Duration = Duration::from_secs(15);

/// Who dials.
#[derive(Clone, Copy, Debug)]
enum Caller {
    /// No TLS at all.
    Plaintext,
    /// TLS that trusts the cluster's CA, no client certificate.
    NoCertificate,
    /// A certificate of the role, from a CA the cluster does not know.
    Stranger(Role),
    /// The cluster's certificate of the role.
    As(Role),
}

/// What the call must come to.
#[derive(Debug)]
enum Expect {
    /// Refused with this code.
    Code(Code),
    /// Refused before any gRPC exchange (handshake or protocol).
    NoConnection,
    /// Let through: success, or an answer from the method itself.
    Through,
}

#[derive(Clone, Copy, Debug)]
enum Call {
    StoreRead,
    StoreStatus,
    AddLearner,
    PutSetting(&'static str),
    RegisterSessions,
    Deliver,
    RouterAppend,
    RaftStream,
}

impl Call {
    /// The kind of server the call goes to.
    fn server(self) -> Role {
        match self {
            Call::StoreRead
            | Call::StoreStatus
            | Call::AddLearner
            | Call::PutSetting(_)
            | Call::RaftStream => Role::Store,
            Call::RegisterSessions | Call::RouterAppend => Role::Router,
            Call::Deliver => Role::Gateway,
        }
    }
}

struct Ctx {
    stack: Stack,
    stranger: chat_security::certs::CertSet,
    store: String,
    leader_id: u64,
}

impl Ctx {
    fn addr(&self, server: Role) -> String {
        match server {
            Role::Store => self.store.clone(),
            Role::Router => self.stack.router_addrs[0].clone(),
            Role::Gateway => self.stack.gateway_internal_addrs[0].clone(),
            Role::Operator => unreachable!("operators serve nothing"),
        }
    }

    async fn channel(&self, caller: Caller, server: Role) -> Result<Channel, String> {
        let addr = self.addr(server);
        let ca = self.stack.certs.identity(Role::Store).ca.clone();
        let ep = match caller {
            Caller::Plaintext => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
            Caller::NoCertificate => Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .domain_name(server.dns_name()),
                )
                .unwrap(),
            Caller::Stranger(role) => {
                // Its own identity, but trusting the cluster's CA, so only
                // the server can be the one that refuses.
                let own = self.stranger.identity(role);
                let tls = Tls::from_pem(
                    role,
                    ca.into_bytes(),
                    own.cert.clone().into_bytes(),
                    own.key.clone().into_bytes(),
                )
                .unwrap();
                chat_security::endpoint(Some(&tls), &addr, server).unwrap()
            }
            Caller::As(role) => {
                chat_security::endpoint(Some(&self.stack.certs.tls(role)), &addr, server).unwrap()
            }
        };
        ep.connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }

    async fn call(&self, call: Call, ch: Channel) -> Result<(), tonic::Status> {
        let timeout = Duration::from_secs(5);
        let fut = async {
            match call {
                Call::StoreRead => RawStore::new(ch)
                    .read(api::ReadRequest {
                        conversation_id: "secret".into(),
                        limit: 10,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Call::StoreStatus => StoreAdminClient::new(ch)
                    .status(api::StatusRequest::default())
                    .await
                    .map(drop),
                Call::AddLearner => StoreAdminClient::new(ch)
                    .add_learner(api::AddLearnerRequest {
                        id: 0,
                        address: "127.0.0.1:9".into(),
                    })
                    .await
                    .map(drop),
                Call::PutSetting(key) => RawStore::new(ch)
                    .put_setting(api::PutSettingRequest {
                        key: key.into(),
                        value: Vec::new(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Call::RegisterSessions => RouterClient::new(ch)
                    .register_sessions(RegisterSessionsRequest {
                        gateway_address: "127.0.0.1:9".into(),
                        user_ids: vec!["victim".into()],
                        lease_ms: 1_000,
                        rollout: None,
                    })
                    .await
                    .map(drop),
                Call::Deliver => GatewayDeliveryClient::new(ch)
                    .deliver(DeliverRequest { items: Vec::new() })
                    .await
                    .map(drop),
                Call::RouterAppend => RouterClient::new(ch)
                    .append_batch(api::AppendBatchRequest {
                        items: vec![api::AppendRequest {
                            conversation_id: "secret".into(),
                            sender: "victim".into(),
                            client_msg_id: "forged".into(),
                            body: b"not from the victim".to_vec(),
                        }],
                    })
                    .await
                    .map(drop),
                Call::RaftStream => RaftTransportClient::new(ch)
                    .stream(futures::stream::iter([RaftBatch {
                        from: self.leader_id,
                        messages: Vec::new(),
                        from_address: String::new(),
                    }]))
                    .await
                    .map(drop),
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in 5 s")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_ports_refuse_callers_the_method_is_not_for() {
    let stack = Stack::start().await.unwrap();
    let leader = stack.store.wait_leader(WAIT).await.unwrap();
    let ctx = Ctx {
        store: stack.store.addr(leader),
        leader_id: leader.0,
        stranger: chat_security::certs::generate().unwrap(),
        stack,
    };
    use Call::*;
    use Caller::*;
    use Expect::*;
    let denied = Code(tonic::Code::PermissionDenied);
    let unauthenticated = Code(tonic::Code::Unauthenticated);
    let cases: Vec<(Call, Caller, Expect)> = vec![
        // Reading any conversation straight from the store.
        (StoreRead, Plaintext, NoConnection),
        (StoreRead, NoCertificate, unauthenticated),
        (StoreRead, Stranger(Role::Router), NoConnection),
        (StoreRead, As(Role::Gateway), denied),
        (StoreRead, As(Role::Router), Through),
        // Taking the store over: adding a replica that receives everything.
        (
            AddLearner,
            NoCertificate,
            Code(tonic::Code::Unauthenticated),
        ),
        (
            AddLearner,
            As(Role::Router),
            Code(tonic::Code::PermissionDenied),
        ),
        (
            AddLearner,
            As(Role::Store),
            Code(tonic::Code::PermissionDenied),
        ),
        (AddLearner, As(Role::Operator), Through),
        (
            StoreStatus,
            As(Role::Gateway),
            Code(tonic::Code::PermissionDenied),
        ),
        (StoreStatus, As(Role::Router), Through),
        // Settings: incidents are the operators'; routers write rollout
        // plans only.
        (
            PutSetting("incidents"),
            As(Role::Gateway),
            Code(tonic::Code::PermissionDenied),
        ),
        (
            PutSetting("incidents"),
            As(Role::Router),
            Code(tonic::Code::PermissionDenied),
        ),
        (
            PutSetting("rollout/security-test"),
            As(Role::Router),
            Through,
        ),
        (PutSetting("incidents"), As(Role::Operator), Through),
        // Redirecting someone's pushes, posting as someone.
        (
            RegisterSessions,
            NoCertificate,
            Code(tonic::Code::Unauthenticated),
        ),
        (
            RegisterSessions,
            As(Role::Store),
            Code(tonic::Code::PermissionDenied),
        ),
        (RegisterSessions, As(Role::Gateway), Through),
        (
            RouterAppend,
            As(Role::Operator),
            Code(tonic::Code::PermissionDenied),
        ),
        (RouterAppend, Stranger(Role::Gateway), NoConnection),
        // Injecting messages into users' streams.
        (Deliver, Plaintext, NoConnection),
        (Deliver, NoCertificate, Code(tonic::Code::Unauthenticated)),
        (
            Deliver,
            As(Role::Gateway),
            Code(tonic::Code::PermissionDenied),
        ),
        (Deliver, As(Role::Router), Through),
        // Raft traffic from anything but a replica.
        (
            RaftStream,
            As(Role::Router),
            Code(tonic::Code::PermissionDenied),
        ),
        (
            RaftStream,
            As(Role::Operator),
            Code(tonic::Code::PermissionDenied),
        ),
        (RaftStream, As(Role::Store), Through),
    ];
    let mut failures = Vec::new();
    for (call, caller, expect) in cases {
        let outcome = match ctx.channel(caller, call.server()).await {
            Err(e) => Err(format!("no connection: {e}")),
            Ok(ch) => Ok(ctx.call(call, ch).await),
        };
        let ok = match (&expect, &outcome) {
            (NoConnection, Err(_)) => true,
            // A plaintext or foreign client may get as far as a call that
            // fails in transport.
            (NoConnection, Ok(Err(s))) => {
                !matches!(s.code(), tonic::Code::Ok) && std::error::Error::source(s).is_some()
                    || matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                    )
            }
            (Code(c), Ok(Err(s))) => s.code() == *c,
            (Through, Ok(Ok(()))) => true,
            (Through, Ok(Err(s))) => !matches!(
                s.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{call:?} as {caller:?}: expected {expect:?}, got {outcome:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The backend still serves its users after all that.
    let alice = ctx.stack.client("alice");
    alice
        .create_conversation("after", &["bob".to_string()])
        .await
        .unwrap();
    alice
        .send("after", "m1", b"still here".to_vec())
        .await
        .unwrap();
    ctx.stack.stop().await;
}

/// Raft messages that must not reach raft-rs: from a replica outside the
/// group, or an append whose entries do not follow its index (raft-rs
/// stops the process on one that rewrites committed entries). Both come
/// with a valid store certificate, as from a compromised or confused
/// replica; the follower drops them, counts them, and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_messages_are_refused_before_raft() {
    use protobuf::Message as _;
    use raft::eraftpb::{Entry, Message, MessageType};
    let stack = Stack::start().await.unwrap();
    let leader = stack.store.wait_leader(WAIT).await.unwrap();
    let follower = stack
        .store
        .ids()
        .into_iter()
        .find(|&i| i != leader)
        .unwrap();
    let alice = stack.client("alice");
    alice
        .create_conversation("raft", &["bob".to_string()])
        .await
        .unwrap();
    alice
        .send("raft", "m1", b"committed".to_vec())
        .await
        .unwrap();
    let status = stack.store.node(follower).unwrap().status();
    let (term, commit) = (status.term, status.commit);

    let stranger = {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 99;
        m.to = follower.0;
        m.term = term + 5;
        m
    };
    // From the leader's id, rewriting entry 1 (long committed) at the
    // current term.
    let rewrite = {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = leader.0;
        m.to = follower.0;
        m.term = term;
        m.index = commit;
        m.log_term = term;
        m.commit = commit;
        let mut e = Entry::default();
        e.index = 1;
        e.term = term;
        e.data = b"forged".to_vec().into();
        m.entries = vec![e].into();
        m
    };
    let ch = chat_security::endpoint(
        Some(&stack.certs.tls(Role::Store)),
        &stack.store.addr(follower),
        Role::Store,
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    RaftTransportClient::new(ch)
        .stream(futures::stream::iter([RaftBatch {
            from: leader.0,
            messages: vec![
                stranger.write_to_bytes().unwrap(),
                rewrite.write_to_bytes().unwrap(),
            ],
            from_address: String::new(),
        }]))
        .await
        .unwrap();

    let node = stack.store.node(follower).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let refused = node.report().await.unwrap().stats.refused_messages;
        if refused >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the follower refused {refused} of the 2 forged messages"
        );
        poll.tick().await;
    }
    // No election was forced by the stranger's term, the follower is
    // alive, and it keeps applying what the leader commits.
    assert_eq!(stack.store.node(leader).unwrap().status().term, term);
    alice.send("raft", "m2", b"after".to_vec()).await.unwrap();
    let applied = stack.store.node(leader).unwrap().status().applied;
    stack
        .store
        .wait_applied(follower, applied, WAIT)
        .await
        .unwrap();
    assert!(!node.status().stopped);
    stack.stop().await;
}

/// A raw client of the public API on the first gateway, calling with
/// `authorization: <auth>` (none when empty).
async fn public(stack: &Stack) -> chat_proto::chat::v1::chat_client::ChatClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{}", stack.gateway_addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    chat_proto::chat::v1::chat_client::ChatClient::new(ch)
}

fn with_auth<T>(msg: T, auth: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if !auth.is_empty() {
        r.metadata_mut()
            .insert("authorization", auth.parse().unwrap());
    }
    r
}

/// The services reflection lists on the public port, with v1 and v1alpha.
async fn listed(stack: &Stack) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let ch = Endpoint::from_shared(format!("http://{}", stack.gateway_addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut out = c1
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let v1_names = match out.message().await.unwrap().unwrap().message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1 reflection answered {other:?}"),
    };
    let mut ca = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut out = ca
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let alpha_names = match out.message().await.unwrap().unwrap().message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1alpha reflection answered {other:?}"),
    };
    (v1_names, alpha_names)
}

/// The public port: reflection shows the public API only; bad tokens,
/// out-of-range requests and non-members get clean refusals; the
/// subscription cap holds under concurrent opens; the gateway keeps
/// serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_edge_refuses_cleanly_and_keeps_serving() {
    use chat_proto::chat::v1 as cpb;
    let stack = Stack::start().await.unwrap();
    let alice = stack.client("alice");
    alice
        .create_conversation("edge", &["bob".to_string()])
        .await
        .unwrap();
    alice
        .send("edge", "m1", b"for members".to_vec())
        .await
        .unwrap();

    // Reflection: the public API and health, in both versions; nothing
    // internal.
    let (v1, alpha) = listed(&stack).await;
    for names in [&v1, &alpha] {
        assert!(names.iter().any(|n| n == "chat.v1.Chat"), "{names:?}");
        assert!(
            names.iter().any(|n| n == "grpc.health.v1.Health"),
            "{names:?}"
        );
        let internal: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with("chat.") && *n != "chat.v1.Chat")
            .collect();
        assert!(
            internal.is_empty(),
            "internal services listed: {internal:?}"
        );
    }

    // Tokens: each variant is UNAUTHENTICATED, never a crash or a pass.
    let good = format!("Bearer {}", stack.key.sign_for("alice", 600));
    let mut altered = good.clone();
    let expiry_digit = altered.rfind('.').unwrap() - 1;
    let d = altered.as_bytes()[expiry_digit];
    altered.replace_range(
        expiry_digit..=expiry_digit,
        if d == b'9' { "8" } else { "9" },
    );
    let huge = format!("Bearer {}", "a".repeat(16 << 10));
    let mut api = public(&stack).await;
    for (what, auth) in [
        ("no header", String::new()),
        ("empty bearer", "Bearer ".to_string()),
        ("another scheme", "Basic YWxpY2U6cGFzcw==".to_string()),
        ("altered expiry", altered),
        ("16 KiB token", huge),
        ("signed by another key", {
            let other =
                chat_auth::TokenKey::new(b"another deployment's signing key".to_vec()).unwrap();
            format!("Bearer {}", other.sign_for("alice", 600))
        }),
    ] {
        let r = api
            .history(with_auth(
                cpb::HistoryRequest {
                    conversation_id: "edge".into(),
                    limit: 10,
                    ..Default::default()
                },
                &auth,
            ))
            .await;
        let code = r.as_ref().map_err(|s| s.code()).err();
        assert_eq!(code, Some(Code::Unauthenticated), "{what}: {r:?}");
    }

    // Out of range: refused with INVALID_ARGUMENT.
    let e = api
        .history(with_auth(
            cpb::HistoryRequest {
                conversation_id: "edge".into(),
                limit: 1_000_000,
                ..Default::default()
            },
            &good,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Non-members: removing a member, typing and reading show nothing of
    // the conversation.
    let carol = format!("Bearer {}", stack.key.sign_for("carol", 600));
    let e = api
        .remove_member(with_auth(
            cpb::MemberRequest {
                conversation_id: "edge".into(),
                user_id: "bob".into(),
            },
            &carol,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(!e.message().contains("alice"), "{}", e.message());
    let e = api
        .send_typing(with_auth(
            cpb::TypingRequest {
                conversation_id: "edge".into(),
            },
            &carol,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = api
        .history(with_auth(
            cpb::HistoryRequest {
                conversation_id: "edge".into(),
                limit: 10,
                ..Default::default()
            },
            &carol,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The subscription cap holds when many open at once.
    let dave = format!("Bearer {}", stack.key.sign_for("dave", 600));
    let opens = (0..24).map(|_| {
        let mut c = api.clone();
        let dave = dave.clone();
        async move {
            c.subscribe(with_auth(
                cpb::SubscribeRequest {
                    cursors: Vec::new(),
                },
                &dave,
            ))
            .await
        }
    });
    let results = futures::future::join_all(opens).await;
    let opened = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<Code> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|s| s.code()))
        .collect();
    assert_eq!(
        opened,
        chat_gateway::service::MAX_SESSIONS_PER_USER,
        "refused: {refused:?}"
    );
    assert!(
        refused.iter().all(|c| *c == Code::ResourceExhausted),
        "{refused:?}"
    );
    drop(results);

    // One user's byte quota: 100 messages of 64 KiB sent at once (6.4 MiB,
    // past the 4 MiB burst however slow the machine) are partly refused
    // for bytes, and another user is not.
    alice
        .create_conversation("bulk", &["eve".to_string()])
        .await
        .unwrap();
    let eve = format!("Bearer {}", stack.key.sign_for("eve", 600));
    let sends = (0..100).map(|i| {
        let mut c = api.clone();
        let eve = eve.clone();
        async move {
            c.send(with_auth(
                cpb::SendRequest {
                    conversation_id: "bulk".into(),
                    client_msg_id: format!("bulk-{i}"),
                    body: vec![b'x'; 64 << 10],
                },
                &eve,
            ))
            .await
        }
    });
    let results = tokio::time::timeout(WAIT * 4, futures::future::join_all(sends))
        .await
        .expect("100 sends answered within a minute");
    let refused: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        refused
            .iter()
            .any(|e| e.code() == Code::ResourceExhausted && e.message().contains("message bytes")),
        "no send refused for bytes: {refused:?}"
    );
    assert!(
        refused
            .iter()
            .all(|e| matches!(e.code(), Code::ResourceExhausted | Code::Unavailable)),
        "{refused:?}"
    );
    assert!(
        refused.len() < 100,
        "the burst let nothing through: {refused:?}"
    );
    alice
        .send("bulk", "alice-1", vec![b'y'; 64 << 10])
        .await
        .unwrap();

    // And it still serves its users.
    assert_eq!(stored(&stack.client("bob"), "edge").await, 1);
    stack.stop().await;
}

/// How many messages `conversation` holds, as `client` reads them.
async fn stored(client: &chat_client::ChatClient, conversation: &str) -> usize {
    client
        .history(chat_proto::chat::v1::HistoryRequest {
            conversation_id: conversation.into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .messages
        .len()
}

/// The public port over TLS: a client that trusts the cluster's CA works
/// end to end (send, subscribe, history); a plaintext client and one that
/// trusts another CA get nowhere, and no token is sent in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_over_tls_takes_only_clients_that_verify_it() {
    let stack = Stack::start_public_tls().await.unwrap();
    let alice = stack.client("alice");
    let bob = stack.client("bob");
    alice
        .create_conversation("tls", &["bob".to_string()])
        .await
        .unwrap();
    let mut sub = bob.subscribe(std::collections::HashMap::new());
    alice.send("tls", "m1", b"over TLS".to_vec()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(chat_client::SubscriptionEvent::Event(chat_proto::chat::v1::Event {
                kind: Some(chat_client::event::Kind::Message(m)),
            }))) => {
                assert_eq!(&m.body[..], b"over TLS");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no message over TLS: {other:?}"),
        }
    }

    let token = stack.key.sign_for("alice", 600);
    let plaintext =
        chat_client::ChatClient::new(stack.gateway_addrs.clone(), &token, Duration::from_secs(2))
            .unwrap();
    assert!(plaintext.list_conversations().await.is_err());
    let other_ca = chat_security::certs::generate().unwrap();
    let fooled = chat_client::ChatClient::new_tls(
        stack.gateway_addrs.clone(),
        &token,
        Duration::from_secs(2),
        other_ca.public().ca.as_bytes(),
    )
    .unwrap();
    let e = fooled.list_conversations().await.unwrap_err();
    assert!(
        !matches!(
            e.code(),
            Code::Ok | Code::Unauthenticated | Code::PermissionDenied
        ),
        "a client that cannot verify the gateway must not get as far as a call: {e:?}"
    );
    stack.stop().await;
}

/// A `HistoryRequest` as a confused or hostile client might encode it: the
/// conversation id (a string, field 1) as a number.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbled {
    #[prost(uint64, tag = "1")]
    conversation_id: u64,
}

/// Requests the gateway cannot decode, or that are larger than it takes,
/// get a clean error, and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_clean_errors() {
    use chat_proto::chat::v1 as cpb;
    let stack = Stack::start().await.unwrap();
    let alice = stack.client("alice");
    alice
        .create_conversation("frames", &["bob".to_string()])
        .await
        .unwrap();
    let good = format!("Bearer {}", stack.key.sign_for("alice", 600));
    let ch = Endpoint::from_shared(format!("http://{}", stack.gateway_addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let e = grpc
        .unary(
            with_auth(Garbled { conversation_id: 7 }, &good),
            tonic::codegen::http::uri::PathAndQuery::from_static("/chat.v1.Chat/History"),
            tonic_prost::ProstCodec::<Garbled, cpb::HistoryResponse>::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::Internal | Code::InvalidArgument),
        "an undecodable request: {e:?}"
    );

    // Far past the largest message body the gateway decodes.
    let mut api = public(&stack).await;
    let e = api
        .send(with_auth(
            cpb::SendRequest {
                conversation_id: "frames".into(),
                client_msg_id: "huge".into(),
                body: vec![b'x'; 8 << 20],
            },
            &good,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "an oversized request: {e:?}"
    );

    // Nothing was stored, and the gateway serves on.
    alice.send("frames", "m1", b"after".to_vec()).await.unwrap();
    assert_eq!(stored(&alice, "frames").await, 1);
    stack.stop().await;
}

/// Rotating the token key with no downtime: while gateways accept two
/// keys, tokens of both work; gateways that accept only one (the other
/// retired) refuse tokens of the retired key and take the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_rotate_without_refusing_anyone_until_the_old_key_is_retired() {
    let other =
        chat_auth::TokenKey::new(b"the other signing key of this deployment".to_vec()).unwrap();
    let during = Stack::start_with_token_keys(vec![other.clone()])
        .await
        .unwrap();
    let tokens = [
        ("the current key", during.key.sign_for("alice", 600)),
        ("the other key", other.sign_for("alice", 600)),
    ];
    for (which, token) in &tokens {
        let c = chat_client::ChatClient::new(
            during.gateway_addrs.clone(),
            token,
            Duration::from_secs(5),
        )
        .unwrap();
        c.list_conversations()
            .await
            .unwrap_or_else(|e| panic!("a token of {which} during the rotation: {e:?}"));
    }
    during.stop().await;

    // Gateways that accept the current key only: the other is retired.
    let after = Stack::start().await.unwrap();
    let current = after.key.sign_for("alice", 600);
    let c = chat_client::ChatClient::new(
        after.gateway_addrs.clone(),
        &current,
        Duration::from_secs(5),
    )
    .unwrap();
    c.list_conversations()
        .await
        .expect("a token of the current key");
    let retired = other.sign_for("alice", 600);
    let c = chat_client::ChatClient::new(
        after.gateway_addrs.clone(),
        &retired,
        Duration::from_secs(5),
    )
    .unwrap();
    let e = c.list_conversations().await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("does not accept"), "{}", e.message());
    after.stop().await;
}
