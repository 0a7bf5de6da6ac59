//! `SendStream`, the public API's stream of sends and acks, through real
//! gateways, routers and a raft store: order per conversation, one answer
//! per send, the window, bad sends refused alone, and a stream broken
//! mid-flight resumed on another gateway with nothing lost or stored twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chat_proto::chat::v1 as pb;
use chat_proto::chat::v1::chat_client::ChatClient as RawClient;
use chat_tests::stack::Stack;
use tokio::sync::mpsc;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// A raw stream on gateway `g`, signed in as `user`.
struct Raw {
    frames: mpsc::Sender<pb::SendFrame>,
    acks: tonic::Streaming<pb::AckFrame>,
}

async fn open(stack: &Stack, g: usize, user: &str) -> anyhow::Result<Raw> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", stack.gateway_addrs[g]))?
            .connect()
            .await?;
    let (frames, rx) = mpsc::channel(16);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", stack.key.sign_for(user, 600)).parse()?,
    );
    let acks = RawClient::new(channel).send_stream(req).await?.into_inner();
    Ok(Raw { frames, acks })
}

fn send(tag: u64, conversation: &str, id: &str) -> pb::StreamedSend {
    pb::StreamedSend {
        tag,
        send: Some(pb::SendRequest {
            conversation_id: conversation.into(),
            client_msg_id: id.into(),
            body: format!("body of {id}").into_bytes(),
        }),
    }
}

impl Raw {
    async fn frame(&self, sends: Vec<pb::StreamedSend>) -> anyhow::Result<()> {
        self.frames
            .send(pb::SendFrame { sends })
            .await
            .map_err(|_| anyhow::anyhow!("stream closed"))
    }

    /// Acks until `n` have come, each tag once.
    async fn acks(&mut self, n: usize) -> anyhow::Result<HashMap<u64, pb::send_ack::Outcome>> {
        let mut got = HashMap::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < n {
            let frame = tokio::time::timeout_at(deadline, self.acks.message())
                .await
                .map_err(|_| anyhow::anyhow!("{} of {n} acks came", got.len()))??
                .ok_or_else(|| anyhow::anyhow!("the stream ended after {} acks", got.len()))?;
            for a in frame.acks {
                let outcome = a.outcome.ok_or_else(|| anyhow::anyhow!("an empty ack"))?;
                anyhow::ensure!(
                    got.insert(a.tag, outcome).is_none(),
                    "tag {} answered twice",
                    a.tag
                );
            }
        }
        Ok(got)
    }
}

fn seq_of(outcome: &pb::send_ack::Outcome) -> Option<u64> {
    match outcome {
        pb::send_ack::Outcome::Ok(ok) => Some(ok.seq),
        pb::send_ack::Outcome::Error(_) => None,
    }
}

fn error_of(outcome: &pb::send_ack::Outcome) -> Option<&pb::SendError> {
    match outcome {
        pb::send_ack::Outcome::Error(e) => Some(e),
        pb::send_ack::Outcome::Ok(_) => None,
    }
}

/// Client message ids of a conversation's stored messages, in seq order.
async fn stored_ids(stack: &Stack, user: &str, conversation: &str) -> anyhow::Result<Vec<String>> {
    let client = stack.client(user);
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .history(pb::HistoryRequest {
                conversation_id: conversation.into(),
                after_seq: after,
                limit: 500,
                ..Default::default()
            })
            .await?;
        let Some(last) = page.messages.last() else {
            return Ok(ids);
        };
        after = last.seq;
        ids.extend(page.messages.into_iter().map(|m| m.client_msg_id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_sends_keep_order_per_conversation_and_bad_ones_are_refused_alone()
-> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let alice = stack.client("alice");
    let conversations = ["s-a", "s-b", "s-c"];
    for c in conversations {
        alice.create_conversation(c, &["bob".to_owned()]).await?;
    }
    let mut raw = open(&stack, 0, "alice").await?;
    // Three frames, the conversations interleaved, each frame sent before
    // any ack is read: 90 sends (never more than 30 with the store, under
    // the concurrency limit's floor), then bad ones among good ones.
    let mut tag = 0;
    let mut sent: HashMap<&str, Vec<(u64, String)>> = HashMap::new();
    for frame in 0..3 {
        let mut sends = Vec::new();
        for i in 0..30 {
            tag += 1;
            let c = conversations[i % 3];
            let id = format!("f{frame}-{i}");
            sends.push(send(tag, c, &id));
            sent.entry(c).or_default().push((tag, id));
        }
        raw.frame(sends).await?;
    }
    let oversized = pb::StreamedSend {
        tag: 1_001,
        send: Some(pb::SendRequest {
            conversation_id: "s-a".into(),
            client_msg_id: "too-big".into(),
            body: vec![0; 64 * 1024 + 1],
        }),
    };
    raw.frame(vec![
        send(1_000, "not a valid id!", "bad-conversation"),
        oversized,
        send(1_002, "s-a", ""),
        pb::StreamedSend {
            tag: 1_003,
            send: None,
        },
        send(1_004, "s-missing", "no-such-conversation"),
        send(1_005, "s-a", "after-the-bad-ones"),
    ])
    .await?;
    let acks = raw.acks(96).await?;
    let codes: Vec<(u64, i32)> = (1_000..=1_004)
        .map(|t| (t, error_of(&acks[&t]).map_or(0, |e| e.code)))
        .collect();
    assert_eq!(
        codes,
        vec![
            (1_000, Code::InvalidArgument as i32),
            (1_001, Code::InvalidArgument as i32),
            (1_002, Code::InvalidArgument as i32),
            (1_003, Code::InvalidArgument as i32),
            (1_004, Code::NotFound as i32),
        ],
        "each bad send refused alone with the code a unary send gets"
    );
    let too_big = error_of(&acks[&1_001]).expect("refused");
    assert!(
        too_big.message.contains("limit is 65536"),
        "{}",
        too_big.message
    );
    assert!(
        seq_of(&acks[&1_005]).is_some(),
        "the stream went on after bad sends"
    );
    // Every good send was stored, and each conversation's seqs follow the
    // order of its sends on the stream.
    for (c, sends) in &sent {
        let seqs: Vec<u64> = sends
            .iter()
            .map(|(t, _)| seq_of(&acks[t]).expect("stored"))
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{c}: seqs out of send order: {seqs:?}"
        );
        let mut want: Vec<String> = sends.iter().map(|(_, id)| id.clone()).collect();
        if *c == "s-a" {
            want.push("after-the-bad-ones".into());
        }
        assert_eq!(
            stored_ids(&stack, "alice", c).await?,
            want,
            "{c}: stored once, in order"
        );
    }
    // Tag 7 was answered, so it may be used again; a tag in use by a send
    // still waiting may not.
    raw.frame(vec![
        send(7, "s-b", "reused-tag"),
        send(7, "s-b", "tag-in-use"),
    ])
    .await?;
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let frame = tokio::time::timeout(WAIT, raw.acks.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
        answers.extend(frame.acks.into_iter().map(|a| (a.tag, a.outcome)));
    }
    assert!(answers.iter().all(|(t, _)| *t == 7), "{answers:?}");
    let stored = answers
        .iter()
        .filter(|(_, o)| o.as_ref().and_then(seq_of).is_some())
        .count();
    let in_use = answers
        .iter()
        .filter_map(|(_, o)| o.as_ref().and_then(error_of))
        .filter(|e| e.code == Code::InvalidArgument as i32 && e.message.contains("already in use"))
        .count();
    assert_eq!((stored, in_use), (1, 1), "{answers:?}");
    let b = stored_ids(&stack, "alice", "s-b").await?;
    assert_eq!(b.last().map(String::as_str), Some("reused-tag"));
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_past_the_window_are_refused_and_the_rest_are_stored() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let alice = stack.client("alice");
    alice.create_conversation("w", &[]).await?;
    let mut raw = open(&stack, 1, "alice").await?;
    // 2,048 sends to one conversation in two frames written at once: the
    // gateway sends a conversation's sends in groups of at most 32, one
    // group at a time, so most of the first frame's 1,024 are still waiting
    // when the second frame is read.
    for frame in 0..2u64 {
        let sends = (0..1_024u64)
            .map(|i| {
                let tag = frame * 1_024 + i;
                send(tag, "w", &format!("m{tag}"))
            })
            .collect();
        raw.frame(sends).await?;
    }
    let acks = raw.acks(2_048).await?;
    let refused: Vec<u64> = (0..2_048)
        .filter(|t| {
            error_of(&acks[t]).is_some_and(|e| {
                e.code == Code::ResourceExhausted as i32
                    && e.caller_limit
                    && e.retry_after_ms > 0
                    && e.message.contains("1024 sends wait")
            })
        })
        .collect();
    // The backlog of one conversation drains 32 sends per store round
    // trip; the tail of it may wait past the gateway's queue-time limit
    // and be refused for that (overload protection, as for unary sends).
    let waited_too_long = |e: &pb::SendError| {
        e.code == Code::ResourceExhausted as i32 && !e.caller_limit && e.message.contains("waited")
    };
    let other_errors: Vec<(u64, &pb::SendError)> = (0..2_048)
        .filter_map(|t| error_of(&acks[&t]).map(|e| (t, e)))
        .filter(|(t, e)| !refused.contains(t) && !waited_too_long(e))
        .collect();
    assert!(
        other_errors.is_empty(),
        "unexpected refusals: {other_errors:?}"
    );
    assert!(
        refused.len() >= 256,
        "the window let {} sends past 1,024 wait",
        2_048 - 1_024 - refused.len()
    );
    assert!(
        refused.iter().all(|t| *t >= 1_024),
        "only sends past the window are refused"
    );
    // What was taken is stored once, in send order; nothing refused is.
    let want: Vec<String> = (0..2_048)
        .filter(|t| seq_of(&acks[t]).is_some())
        .map(|t| format!("m{t}"))
        .collect();
    assert_eq!(stored_ids(&stack, "alice", "w").await?, want);
    stack.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_mid_flight_resumes_on_the_other_gateway_nothing_lost_or_twice()
-> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    let alice = stack.client("alice");
    const SENDERS: usize = 8;
    const EACH: usize = 60;
    for s in 0..SENDERS {
        alice.create_conversation(&format!("k{s}"), &[]).await?;
    }
    // Every task of one client shares its one send stream.
    let (progress, mut progressed) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let alice = alice.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..EACH {
                let ok = alice
                    .send(&format!("k{s}"), &format!("k{s}-{i}"), b"x".to_vec())
                    .await?;
                seqs.push(ok.seq);
                let _ = progress.send(());
            }
            anyhow::Ok(seqs)
        }));
    }
    drop(progress);
    // A third of the way in, the gateway holding the stream dies.
    for _ in 0..SENDERS * EACH / 3 {
        tokio::time::timeout(WAIT, progressed.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("senders stopped"))?;
    }
    let holder = stack
        .gateways
        .iter()
        .position(|g| g.as_ref().is_some_and(|g| g.send_stream_count() > 0))
        .ok_or_else(|| anyhow::anyhow!("no gateway holds the send stream"))?;
    stack.gateways[holder].take().expect("running").kill();
    let mut all = Vec::new();
    for t in tasks {
        all.push(tokio::time::timeout(WAIT, t).await???);
    }
    let other = stack.gateways[1 - holder].as_ref().expect("running");
    assert!(
        other.send_stream_count() > 0,
        "the stream moved to the other gateway"
    );
    for (s, seqs) in all.iter().enumerate() {
        let c = format!("k{s}");
        let want: Vec<String> = (0..EACH).map(|i| format!("k{s}-{i}")).collect();
        assert_eq!(
            stored_ids(&stack, "alice", &c).await?,
            want,
            "{c}: every send stored once, in order"
        );
        let unique: HashSet<u64> = seqs.iter().copied().collect();
        assert_eq!(unique.len(), EACH, "{c}: one seq per send");
    }
    stack.stop().await;
    Ok(())
}
