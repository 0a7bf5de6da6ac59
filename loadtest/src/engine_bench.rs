//! The store's per-replica write path without network or raft: for each
//! batch, persist one raft entry holding the batch, apply it to the state
//! machine, and sync. Tells whether the engine bounds the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_store::codec::encode_proposal;
use chat_store::engine::{BackgroundFlush, Engine, MemEngine, SledEngine, WriteBatch};
use chat_store::keys;
use chat_store::log_store::LogStore;
use chat_store::state_machine::{Applier, SeqCache};
use chat_store::types::{ConversationId, NewMessage, NodeId, Op, UserId};
use raft::eraftpb::{Entry, HardState};

#[derive(clap::Args)]
pub struct Args {
    /// "sled" or "mem".
    #[arg(long, default_value = "sled")]
    engine: String,
    /// Messages per raft entry (group commit size).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Conversations the messages spread over.
    #[arg(long, default_value_t = 64)]
    conversations: usize,
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Sync after every batch (as `--sync always` does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sync: bool,
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine: Arc<dyn Engine> = match args.engine.as_str() {
        "sled" => Arc::new(SledEngine::open(dir.path(), BackgroundFlush::Off)?),
        "mem" => Arc::new(MemEngine::new()),
        other => anyhow::bail!("unknown engine {other:?}"),
    };
    let log = LogStore::open(
        engine.clone(),
        NodeId(1),
        &[(NodeId(1), "127.0.0.1:1".to_owned())],
    )?;
    let user = UserId::parse("u")?;
    let convs: Vec<ConversationId> = (0..args.conversations)
        .map(|i| ConversationId::parse(&format!("c{i}")))
        .collect::<Result<_, _>>()?;
    let mut seqs = SeqCache::default();
    let mut a = Applier::new(engine.as_ref(), &mut seqs);
    for c in &convs {
        a.apply(
            &Op::CreateConversation {
                conversation: c.clone(),
                members: vec![user.clone()],
            },
            0,
        )?;
    }
    engine.write(a.finish())?;

    let body = bytes::Bytes::from(vec![b'x'; args.body_bytes]);
    let mut index = log.last_index_cached();
    let mut n = 0u64;
    let start = Instant::now();
    let mut sync_time = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(args.duration_secs) {
        let ops: Vec<Op> = (0..args.batch)
            .map(|i| {
                n += 1;
                Op::Append(NewMessage {
                    conversation: convs[i % convs.len()].clone(),
                    sender: user.clone(),
                    client_msg_id: format!("m{n}"),
                    body: body.clone(),
                })
            })
            .collect();
        index += 1;
        let mut e = Entry::default();
        e.index = index;
        e.term = 6;
        e.data = encode_proposal(index, 0, &ops).into();
        let mut hs = HardState::default();
        hs.term = 6;
        hs.commit = index - 1;
        log.persist(&[e], Some(&hs))?;
        let mut a = Applier::new(engine.as_ref(), &mut seqs);
        for op in &ops {
            a.apply(op, 0)?;
        }
        let mut b: WriteBatch = a.finish();
        b.put(keys::APPLIED, keys::encode_pair(index, 6));
        engine.write(b)?;
        if args.sync {
            let t = Instant::now();
            engine.sync()?;
            sync_time += t.elapsed();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "engine-bench: engine={} batch={} conversations={} body={}B sync={}",
        args.engine, args.batch, args.conversations, args.body_bytes, args.sync
    );
    println!(
        "messages/s: {:.0}  batches/s: {:.0}  time in sync: {:.0}%",
        n as f64 / secs,
        (index as f64) / secs,
        100.0 * sync_time.as_secs_f64() / secs
    );
    Ok(())
}
