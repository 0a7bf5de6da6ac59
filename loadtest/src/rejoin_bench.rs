//! A replica that lost its disk rejoining a large store: fills a local
//! group of three with messages, wipes a follower's data directory while it
//! is down, starts it again, and reports how long it takes to serve, the
//! memory of the leader and of the joiner meanwhile, the disk each replica
//! uses per byte of stored bodies, and whether an election happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_proto::store::v1 as api;
use chat_store::StoreClient;

/// How a benchmark fills a group before it measures.
#[derive(clap::Args)]
pub struct Fill {
    /// Bodies to store first, in GiB.
    #[arg(long, default_value_t = 2.0)]
    pub gib: f64,
    /// Message body size.
    #[arg(long, default_value_t = 60_000)]
    pub body_bytes: usize,
    /// Messages per AppendBatch while filling.
    #[arg(long, default_value_t = 16)]
    pub per_request: usize,
    /// Concurrent writers while filling.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
}

impl Fill {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.gib > 0.0 && self.body_bytes > 0 && self.per_request > 0 && self.writers > 0,
            "sizes and counts must be positive"
        );
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    fill: Fill,
    /// The replicas' --snapshot-chunk-bytes (default: theirs).
    #[arg(long)]
    chunk_bytes: Option<usize>,
    /// The replicas' --state-cache-mib (default: theirs).
    #[arg(long)]
    state_cache_mib: Option<u64>,
    /// The replicas' --snapshot-entries: low, so that the log is compacted
    /// and the rejoin needs a snapshot, as it would on a store that has run
    /// for a while.
    #[arg(long, default_value_t = 500)]
    snapshot_entries: u64,
    /// Give up on the rejoin after this long.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Where the replicas' data goes (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The chat-store binary (default: next to this one).
    #[arg(long)]
    store_bin: Option<PathBuf>,
}

/// Resident set size of a process now (`VmRSS`), in bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Fills a group as `f` says: concurrent writers, each to its own
/// conversation (`<prefix>-<w>`). Returns the messages stored and the
/// seconds it took.
pub(crate) async fn fill(
    admin: &StoreClient,
    addrs: &[String],
    prefix: &str,
    f: &Fill,
) -> anyhow::Result<(u64, f64)> {
    let (gib, body_bytes, per_request, writers) = (f.gib, f.body_bytes, f.per_request, f.writers);
    let target = (gib * (1u64 << 30) as f64) as u64;
    let per_msg = body_bytes as u64;
    let batches = target.div_ceil(per_msg * per_request as u64);
    let next = Arc::new(AtomicU64::new(0));
    crate::store_bench::create_conversations(admin, prefix, writers).await?;
    let filling = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = StoreClient::new(addrs.to_vec(), Duration::from_secs(30))?;
        let next = next.clone();
        let body = vec![b'r'; body_bytes];
        let conversation = format!("{prefix}-{w}");
        tasks.push(tokio::spawn(async move {
            let mut stored = 0u64;
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return anyhow::Ok(stored);
                }
                let items = (0..per_request)
                    .map(|k| api::AppendRequest {
                        conversation_id: conversation.clone(),
                        sender: format!("u{w}"),
                        client_msg_id: format!("{b}-{k}"),
                        body: body.clone(),
                    })
                    .collect();
                let r = client
                    .append_batch(api::AppendBatchRequest { items })
                    .await?;
                stored += r
                    .items
                    .iter()
                    .filter(|o| matches!(o.outcome, Some(api::append_outcome::Outcome::Ok(_))))
                    .count() as u64;
            }
        }));
    }
    let mut messages = 0u64;
    for t in tasks {
        messages += t.await??;
    }
    Ok((messages, filling.elapsed().as_secs_f64()))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    args.fill.validate()?;
    let store_bin = crate::sibling_binary(args.store_bin.clone(), "chat-store")?;
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&root)?;
    let chunk = args.chunk_bytes.map(|c| c.to_string());
    let snapshot_entries = args.snapshot_entries.to_string();
    let keep = (args.snapshot_entries / 5).to_string();
    let mut extra: Vec<&str> = vec![
        "--snapshot-entries",
        &snapshot_entries,
        "--compact-keep",
        &keep,
    ];
    if let Some(c) = &chunk {
        extra.extend(["--snapshot-chunk-bytes", c]);
    }
    let cache = args.state_cache_mib.map(|c| c.to_string());
    if let Some(c) = &cache {
        extra.extend(["--state-cache-mib", c]);
    }
    let (mut replicas, addrs, admin) =
        crate::store_bench::start_group(&store_bin, 3, &root, &extra, Duration::from_secs(30))
            .await?;

    let (messages, fill_secs) = fill(&admin, &addrs, "rejoin", &args.fill).await?;
    let per_msg = args.fill.body_bytes as u64;
    let bodies = messages * per_msg;
    println!(
        "rejoin-bench: filled {:.2} GiB of bodies ({messages} messages of {} bytes) in {fill_secs:.0} s ({:.0} MiB/s)",
        gib(bodies),
        args.fill.body_bytes,
        mib(bodies) / fill_secs
    );

    // The state everyone holds now.
    let leader = crate::store_bench::leader_index(&admin, &addrs)
        .await
        .context("no leader after filling")?;
    let before = admin.status_of(&addrs[leader]).await?;
    let victim = (0..3).find(|&i| i != leader).expect("three replicas");
    for (i, r) in replicas.iter().enumerate() {
        println!(
            "  replica {} ({}): {:.2} GiB on disk, {:.2} bytes per byte of bodies, RSS {:.0} MiB",
            r.id,
            if i == leader { "leader" } else { "follower" },
            gib(crate::dir_bytes(&r.data_dir)),
            crate::dir_bytes(&r.data_dir) as f64 / bodies.max(1) as f64,
            r.pid().and_then(rss).map_or(0.0, mib)
        );
    }

    // Wipe the victim and start it again.
    replicas[victim].kill().await?;
    std::fs::remove_dir_all(&replicas[victim].data_dir)?;
    let started = Instant::now();
    replicas[victim].start()?;
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let (mut peak_leader, mut peak_joiner) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_line = Instant::now();
    println!(
        "  (every second: seconds since restart, RSS of leader and joiner, joiner's applied index)"
    );
    let serving_after = loop {
        tick.tick().await;
        let (l, j) = (
            replicas[leader].pid().and_then(rss).unwrap_or(0),
            replicas[victim].pid().and_then(rss).unwrap_or(0),
        );
        peak_leader = peak_leader.max(l);
        peak_joiner = peak_joiner.max(j);
        let status = admin.status_of(&addrs[victim]).await;
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            println!(
                "  {:>5.1} s  leader {:>5.0} MiB  joiner {:>5.0} MiB  applied {}",
                started.elapsed().as_secs_f64(),
                mib(l),
                mib(j),
                status.as_ref().map_or(0, |s| s.applied_index)
            );
        }
        if let Ok(s) = status
            && s.serving
            && s.applied_index >= before.commit_index
        {
            break started.elapsed();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the wiped replica did not serve within {} s",
            args.timeout_secs
        );
    };
    let after = admin.status_of(&addrs[leader]).await?;
    let joined = admin.status_of(&addrs[victim]).await?;
    let read = admin
        .read_from(
            &addrs[victim],
            api::ReadRequest {
                conversation_id: "rejoin-0".into(),
                after_seq: 0,
                limit: 1,
                consistency: api::Consistency::Stale as i32,
                ..Default::default()
            },
        )
        .await?;
    let expected = admin
        .get_conversation(api::GetConversationRequest {
            conversation_id: "rejoin-0".into(),
            ..Default::default()
        })
        .await?
        .last_seq;
    println!(
        "wiped replica {} serving after {:.1} s ({:.0} MiB/s of bodies); it started from a snapshot at index {}",
        replicas[victim].id,
        serving_after.as_secs_f64(),
        mib(bodies) / serving_after.as_secs_f64(),
        joined.snapshot_index
    );
    println!(
        "peak RSS during the rejoin: leader {:.0} MiB, joiner {:.0} MiB",
        mib(peak_leader),
        mib(peak_joiner)
    );
    println!(
        "  joiner: {:.2} GiB on disk, {:.2} bytes per byte of bodies; rejoin-0 last seq {} (leader: {expected})",
        gib(crate::dir_bytes(&replicas[victim].data_dir)),
        crate::dir_bytes(&replicas[victim].data_dir) as f64 / bodies.max(1) as f64,
        read.last_seq
    );
    let election = after.term != before.term || after.leader_id != before.leader_id;
    println!(
        "leader term {} -> {}: {}",
        before.term,
        after.term,
        if election {
            "an election happened"
        } else {
            "no election"
        }
    );
    for r in &mut replicas {
        r.kill().await?;
    }
    anyhow::ensure!(!election, "an election happened during the rejoin");
    anyhow::ensure!(
        read.last_seq == expected,
        "the joiner holds {} messages of rejoin-0, the group {expected}",
        read.last_seq
    );
    Ok(())
}
