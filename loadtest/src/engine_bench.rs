//! The store's per-replica write path without network or raft: for each
//! batch, append one raft entry holding the batch to the WAL (synced, as
//! `--sync always` does before acknowledging), apply it to the state
//! machine without a sync, and checkpoint the state in the background every
//! `--checkpoint-ms`, as a replica does. Tells whether storage bounds the
//! store, and what a message costs it in CPU and bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_store::checkpoint::{Checkpointer, Durable};
use chat_store::codec::encode_proposal;
use chat_store::engine::{BackgroundFlush, Engine, MemEngine, SledEngine, WriteBatch};
use chat_store::keys;
use chat_store::log_store::LogStore;
use chat_store::snapshot::Snapshots;
use chat_store::state_machine::{Applier, Heads};
use chat_store::types::{ConversationId, NewMessage, NodeId, Op, UserId};
use chat_store::wal::{RaftEngineWal, Wal};
use raft::eraftpb::{Entry, HardState};

#[derive(clap::Args)]
pub struct Args {
    /// State machine engine: "sled" or "mem".
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
    /// fdatasync the WAL after every batch (as `--sync always` does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sync: bool,
    /// Dedup window in milliseconds (entries are stamped with the time
    /// since the start, so a short window makes expiry run during the run).
    #[arg(long, default_value_t = chat_store::config::DEFAULT_DEDUP_WINDOW.as_millis() as u64)]
    dedup_window_ms: u64,
    /// Background state checkpoint interval.
    #[arg(long, default_value_t = 1000)]
    checkpoint_ms: u64,
    /// Compact the log to this many entries behind the checkpoint.
    #[arg(long, default_value_t = 10_000)]
    snapshot_entries: u64,
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state_dir = dir.path().join("state");
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir_all(&state_dir)?;
    let state: Arc<dyn Engine> = match args.engine.as_str() {
        "sled" => Arc::new(SledEngine::open(&state_dir, BackgroundFlush::Off)?),
        "mem" => Arc::new(MemEngine::new()),
        other => anyhow::bail!("unknown engine {other:?}"),
    };
    let wal: Arc<dyn Wal> = Arc::new(RaftEngineWal::open(&wal_dir)?);
    let snapshots = Snapshots::open(&dir.path().join("snap"), state.clone())?;
    let log = LogStore::open(
        wal,
        state.clone(),
        snapshots,
        NodeId(1),
        &[(NodeId(1), "127.0.0.1:1".to_owned())],
    )?;
    let user = UserId::parse("u")?;
    let convs: Vec<ConversationId> = (0..args.conversations)
        .map(|i| ConversationId::parse(&format!("c{i}")))
        .collect::<Result<_, _>>()?;
    let mut seqs = Heads::default();
    let window_ms = args.dedup_window_ms as i64;
    let mut a = Applier::new(state.as_ref(), &mut seqs, window_ms);
    for c in &convs {
        a.apply(
            &Op::CreateConversation {
                conversation: c.clone(),
                members: vec![user.clone()],
            },
            0,
        )?;
    }
    state.write(a.finish()?)?;
    let durable = Durable::new(log.applied()?.0);
    let mut checkpointer = Checkpointer::start(
        log.clone(),
        durable.clone(),
        Duration::from_millis(args.checkpoint_ms),
        None,
        "checkpoint".into(),
    )?;

    let body = bytes::Bytes::from(vec![b'x'; args.body_bytes]);
    let mut index = log.last_index_cached();
    let first = index;
    let mut n = 0u64;
    let cpu0 = crate::cpu::own_cpu().unwrap_or_default();
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
        let t = Instant::now();
        log.persist(&[e], Some(&hs), args.sync)?;
        sync_time += t.elapsed();
        let ts = start.elapsed().as_millis() as i64;
        let mut a = Applier::new(state.as_ref(), &mut seqs, window_ms);
        for op in &ops {
            a.apply(op, ts)?;
        }
        let mut b: WriteBatch = a.finish()?;
        b.put(keys::APPLIED, keys::encode_pair(index, 6));
        state.write(b)?;
        let to = index
            .saturating_sub(args.snapshot_entries)
            .min(durable.get());
        if to > log.truncated_index() + args.snapshot_entries / 2 {
            log.compact(to)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = crate::cpu::own_cpu()
        .unwrap_or_default()
        .saturating_sub(cpu0);
    checkpointer.stop();
    let batches = index - first;
    let disk = crate::dir_bytes(dir.path());
    println!(
        "engine-bench: state={} batch={} conversations={} body={}B sync={} checkpoint={}ms",
        args.engine, args.batch, args.conversations, args.body_bytes, args.sync, args.checkpoint_ms
    );
    println!(
        "messages/s: {:.0}  batches (WAL writes) /s: {:.0}  time in WAL write+sync: {:.0}%",
        n as f64 / secs,
        batches as f64 / secs,
        100.0 * sync_time.as_secs_f64() / secs
    );
    println!(
        "CPU per message: {:.2} µs (process user+system {:.2} s over {:.2} s; includes the checkpointer)",
        cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
        cpu.as_secs_f64(),
        secs
    );
    println!(
        "on disk at the end: {:.1} MiB ({:.0} B per message, bodies {} B)",
        disk as f64 / (1 << 20) as f64,
        disk as f64 / n.max(1) as f64,
        args.body_bytes
    );
    Ok(())
}
