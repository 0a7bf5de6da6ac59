//! Backup and restore of a large store: fills a local group of three,
//! takes a backup through the leader while a writer keeps appending (its
//! latency during the backup is the cost to users), loses every replica's
//! disk, restores a new group from the file and reports how long each step
//! took: the recovery time of a whole-store loss.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_proto::store::v1 as api;
use chat_store::StoreClient;
use chat_store::types::NodeId;

use crate::rejoin_bench::{Fill, fill, gib, mib, rss};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    fill: Fill,
    /// Where the replicas' data and the backup go (default: a temporary
    /// directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The chat-store binary (default: next to this one).
    #[arg(long)]
    store_bin: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    args.fill.validate()?;
    let store_bin = crate::sibling_binary(args.store_bin.clone(), "chat-store")?;
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(root.join("old"))?;
    std::fs::create_dir_all(root.join("new"))?;
    let (mut old, addrs, admin) = crate::store_bench::start_group(
        &store_bin,
        3,
        &root.join("old"),
        &[],
        Duration::from_secs(30),
    )
    .await?;
    let (messages, fill_secs) = fill(&admin, &addrs, "backup", &args.fill).await?;
    let bodies = messages * args.fill.body_bytes as u64;
    println!(
        "backup-bench: filled {:.2} GiB of bodies ({messages} messages) in {fill_secs:.0} s",
        gib(bodies)
    );
    let mut last_seqs = Vec::new();
    for w in 0..args.fill.writers {
        let c = admin
            .get_conversation(api::GetConversationRequest {
                conversation_id: format!("backup-{w}"),
                ..Default::default()
            })
            .await?;
        last_seqs.push(c.last_seq);
    }
    let leader = crate::store_bench::leader_index(&admin, &addrs)
        .await
        .context("no leader after filling")?;
    let leader_pid = old[leader].pid();

    // The backup, while one writer appends small messages and measures.
    crate::store_bench::create_conversations(&admin, "during", 1).await?;
    let writer = {
        let client = StoreClient::new(addrs.clone(), Duration::from_secs(30))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut acked = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                client
                    .append(api::AppendRequest {
                        conversation_id: "during-0".into(),
                        sender: "u0".into(),
                        client_msg_id: format!("d{acked}"),
                        body: vec![b'd'; 256],
                    })
                    .await?;
                worst = worst.max(t.elapsed());
                acked += 1;
            }
            anyhow::Ok((acked, worst))
        });
        (stop, task)
    };
    let file = root.join("store.backup");
    let started = Instant::now();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Some(r) = leader_pid.and_then(rss) {
                    peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    let header = chatctl::backup::take(&admin, &file).await?;
    let backup_secs = started.elapsed().as_secs_f64();
    sampler.abort();
    writer.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, worst) = writer.1.await??;
    let size = std::fs::metadata(&file)?.len();
    println!(
        "backup: {:.2} GiB file at raft index {} in {backup_secs:.1} s ({:.0} MiB/s of bodies); leader peak RSS {:.0} MiB",
        gib(size),
        header.index,
        mib(bodies) / backup_secs,
        mib(peak.load(std::sync::atomic::Ordering::Relaxed))
    );
    println!(
        "  a writer meanwhile: {acked} appends acknowledged, the slowest in {} ms",
        worst.as_millis()
    );

    // Every disk lost; a new group from the file.
    for r in &mut old {
        r.kill().await?;
        std::fs::remove_dir_all(&r.data_dir)?;
    }
    let mut new = chat_store::testkit::process::local_group(&store_bin, 3, &root.join("new"), &[])?;
    let voters: Vec<(NodeId, String)> =
        new.iter().map(|r| (NodeId(r.id), r.addr.clone())).collect();
    let restoring = Instant::now();
    for r in &new {
        chatctl::backup::restore(&file, &r.data_dir, NodeId(r.id), &voters)?;
    }
    let restore_secs = restoring.elapsed().as_secs_f64();
    let starting = Instant::now();
    for r in &mut new {
        r.start()?;
    }
    let new_addrs: Vec<String> = new.iter().map(|r| r.addr.clone()).collect();
    let client = StoreClient::new(new_addrs.clone(), Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while crate::store_bench::leader_index(&client, &new_addrs)
        .await
        .is_none()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the restored group elected no leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let serving_secs = starting.elapsed().as_secs_f64();
    println!(
        "restore: 3 data directories in {restore_secs:.1} s ({:.1} s each), serving {serving_secs:.1} s after start: {:.1} s from the file to a serving store",
        restore_secs / 3.0,
        restore_secs + serving_secs
    );
    let mut missing = Vec::new();
    for (w, want) in last_seqs.iter().enumerate() {
        let c = client
            .get_conversation(api::GetConversationRequest {
                conversation_id: format!("backup-{w}"),
                ..Default::default()
            })
            .await?;
        if c.last_seq != *want {
            missing.push(format!("backup-{w}: {} of {want}", c.last_seq));
        }
    }
    for r in &mut new {
        r.kill().await?;
    }
    anyhow::ensure!(
        missing.is_empty(),
        "the restored store differs: {}",
        missing.join(", ")
    );
    println!("every conversation restored with the last seq it had at the backup");
    Ok(())
}
