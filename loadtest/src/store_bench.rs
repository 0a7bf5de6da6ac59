//! Closed-loop append benchmark of a local store group.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_proto::store::v1 as api;
use chat_store::StoreClient;
use chat_store::testkit::process::{StoreProcess, local_group};
use hdrhistogram::Histogram;

#[derive(clap::Args)]
pub struct Args {
    /// Store replicas to start.
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Concurrent appenders, each waiting for its ack before the next send.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Message body size.
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Measured duration.
    #[arg(long, default_value_t = 15)]
    duration_secs: u64,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Messages per request: 1 uses Append; more uses AppendBatch (as a
    /// router that batches does). Latency is per request.
    #[arg(long, default_value_t = 1)]
    per_request: usize,
    /// gRPC connections the appenders share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// The replicas' --sync mode.
    #[arg(long, default_value = "always")]
    sync: String,
    /// The chat-store binary (default: next to this one).
    #[arg(long)]
    store_bin: Option<PathBuf>,
    /// SIGKILL the leader's process this many seconds into the measured
    /// period, and report the longest gap between acknowledgements.
    #[arg(long)]
    kill_leader_at: Option<f64>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.connections > 0 && args.replicas > 0,
        "counts must be positive"
    );
    let store_bin = crate::sibling_binary(args.store_bin.clone(), "chat-store")?;
    let dir = tempfile::tempdir()?;
    let (mut replicas, addrs, admin) = start_group(
        &store_bin,
        args.replicas,
        dir.path(),
        &["--sync", &args.sync],
        Duration::from_secs(20),
    )
    .await?;

    let clients: Vec<Arc<StoreClient>> = (0..args.connections)
        .map(|_| StoreClient::new(addrs.clone(), Duration::from_secs(20)).map(Arc::new))
        .collect::<Result<_, _>>()?;
    create_conversations(&admin, "bench", args.clients).await?;

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let end = measure_from + Duration::from_secs(args.duration_secs);
    let body = vec![b'x'; args.body_bytes];
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let client = clients[i % clients.len()].clone();
        let body = body.clone();
        let per_request = args.per_request.max(1);
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let (mut sent, mut errors) = (0u64, 0u64);
            let mut ack_times = Vec::new();
            let mut measured_msgs = 0u64;
            while Instant::now() < end {
                let items: Vec<api::AppendRequest> = (0..per_request as u64)
                    .map(|k| api::AppendRequest {
                        conversation_id: format!("bench-{i}"),
                        sender: format!("u{i}"),
                        client_msg_id: format!("{i}-{}", sent + k),
                        body: body.clone(),
                    })
                    .collect();
                let t0 = Instant::now();
                let result = if per_request == 1 {
                    client.append(items[0].clone()).await.map(|_| 1)
                } else {
                    client
                        .append_batch(api::AppendBatchRequest { items })
                        .await
                        .map(|r| {
                            r.items
                                .iter()
                                .filter(|o| {
                                    matches!(o.outcome, Some(api::append_outcome::Outcome::Ok(_)))
                                })
                                .count()
                        })
                };
                match result {
                    Ok(n) => {
                        sent += n as u64;
                        if n < per_request {
                            errors += (per_request - n) as u64;
                        }
                        if t0 >= measure_from {
                            let _ = hist.record(t0.elapsed().as_micros() as u64);
                            ack_times.push(Instant::now());
                            measured_msgs += n as u64;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (i, sent, errors, hist, ack_times, measured_msgs)
        }));
    }
    // CPU of every replica and of this generator over the measured period,
    // sampled on a schedule (not used to synchronise anything).
    let pids: Vec<Option<u32>> = replicas.iter().map(|r| r.pid()).collect();
    let cpu_sampler = tokio::spawn(async move {
        let sample = |pids: &[Option<u32>]| {
            let mut v: Vec<Option<Duration>> = pids
                .iter()
                .map(|p| p.and_then(crate::cpu::process_cpu))
                .collect();
            v.push(crate::cpu::own_cpu());
            v
        };
        tokio::time::sleep_until(measure_from.into()).await;
        let before = sample(&pids);
        tokio::time::sleep_until(end.into()).await;
        let after = sample(&pids);
        before
            .into_iter()
            .zip(after)
            .map(|(b, a)| Some(a?.saturating_sub(b?)))
            .collect::<Vec<_>>()
    });
    let mut killed = None;
    if let Some(at) = args.kill_leader_at {
        // Fault schedule, not synchronisation: the fault happens at a chosen time.
        tokio::time::sleep_until((measure_from + Duration::from_secs_f64(at)).into()).await;
        let i = leader_index(&admin, &addrs)
            .await
            .context("no leader to kill")?;
        replicas[i].kill().await?;
        killed = Some((i, Instant::now()));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut acked_per_conv = Vec::new();
    let mut errors = 0;
    let mut acks: Vec<Instant> = Vec::new();
    let mut measured_msgs = 0u64;
    for t in tasks {
        let (i, sent, e, h, times, m) = t.await?;
        measured_msgs += m;
        total.add(h)?;
        acked_per_conv.push((i, sent));
        errors += e;
        acks.extend(times);
    }
    let cpu = cpu_sampler.await?;
    acks.sort();
    let longest_gap = acks.windows(2).map(|w| (w[1] - w[0], w[0])).max();
    let requests = total.len();
    let secs = args.duration_secs as f64;
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;

    // Every acknowledged append must be there: seqs are gapless per
    // conversation, so last_seq equals the number acknowledged.
    let mut lost = 0u64;
    for (i, sent) in &acked_per_conv {
        let c = admin
            .get_conversation(api::GetConversationRequest {
                conversation_id: format!("bench-{i}"),
                ..Default::default()
            })
            .await?;
        lost += sent.saturating_sub(c.last_seq);
        anyhow::ensure!(
            c.last_seq >= *sent,
            "conversation bench-{i}: {sent} acknowledged, {} stored",
            c.last_seq
        );
    }
    let leader = admin
        .status_of(&addrs[0])
        .await
        .map(|s| s.leader_id)
        .unwrap_or(0);
    let mut replica_lines = Vec::new();
    for (n, a) in addrs.iter().enumerate() {
        if killed.is_some_and(|(k, _)| k == n) {
            replica_lines.push(format!("  replica {} (killed)", n + 1));
            continue;
        }
        let s = admin.status_of(a).await?;
        let st = s.stats.unwrap_or_default();
        let per = |x: u64, y: u64| if y == 0 { 0.0 } else { x as f64 / y as f64 };
        replica_lines.push(format!(
            "  replica {} ({}): {:.1} ops/entry proposed, {} readies, {} syncs averaging {:.2} ms, {:.2} entries applied per ready",
            s.id,
            s.role,
            per(st.proposed_ops, st.proposed_entries),
            st.readies,
            st.syncs,
            per(st.sync_micros, st.syncs) / 1000.0,
            per(st.applied_entries, st.readies),
        ));
    }
    println!(
        "store-bench: {} replicas, sync={}, {} closed-loop clients over {} connections, {}-byte bodies, {} per request",
        args.replicas, args.sync, args.clients, args.connections, args.body_bytes, args.per_request
    );
    println!(
        "measured {} s after {} s warm-up; leader replica {leader}",
        args.duration_secs, args.warmup_secs
    );
    println!(
        "acked appends/s: {:.0}  ({} per request, {:.0} requests/s)",
        measured_msgs as f64 / secs,
        args.per_request,
        requests as f64 / secs
    );
    println!(
        "request latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.50),
        ms(0.90),
        ms(0.99),
        ms(0.999),
        total.max() as f64 / 1000.0
    );
    println!("errors: {errors}  lost acknowledged appends: {lost}");
    let per_msg = |d: &Option<Duration>| match d {
        Some(d) if measured_msgs > 0 => {
            format!("{:.1}", d.as_secs_f64() * 1e6 / measured_msgs as f64)
        }
        _ => "-".to_owned(),
    };
    let (generator, stores) = cpu.split_last().context("cpu samples")?;
    println!(
        "CPU µs per acked append: replicas {}; all replicas {:.1}; load generator {}",
        stores.iter().map(per_msg).collect::<Vec<_>>().join(" / "),
        stores
            .iter()
            .flatten()
            .map(Duration::as_secs_f64)
            .sum::<f64>()
            * 1e6
            / measured_msgs.max(1) as f64,
        per_msg(generator)
    );
    if let Some((gap, from)) = longest_gap {
        println!(
            "longest gap between acks: {:.0} ms, starting {:.2} s into the measured period",
            gap.as_secs_f64() * 1000.0,
            (from - measure_from).as_secs_f64()
        );
    }
    if let Some((i, at)) = killed {
        println!(
            "leader (replica {}) SIGKILLed {:.2} s into the measured period",
            i + 1,
            (at - measure_from).as_secs_f64()
        );
    }
    for l in replica_lines {
        println!("{l}");
    }
    for r in &mut replicas {
        r.kill().await?;
    }
    Ok(())
}

/// Conversations `{prefix}-{i}` for i in 0..n, each with the one member
/// `u{i}` who writes to it.
pub(crate) async fn create_conversations(
    admin: &StoreClient,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    for i in 0..n {
        admin
            .create_conversation(api::CreateConversationRequest {
                conversation_id: format!("{prefix}-{i}"),
                members: vec![format!("u{i}")],
            })
            .await?;
    }
    Ok(())
}

/// Starts a new local group of `n` replicas under `dir` (`extra` flags to
/// each) and waits for a serving leader; returns the processes, their
/// addresses and a client of the group (`timeout` per call).
pub(crate) async fn start_group(
    store_bin: &std::path::Path,
    n: u64,
    dir: &std::path::Path,
    extra: &[&str],
    timeout: Duration,
) -> anyhow::Result<(Vec<StoreProcess>, Vec<String>, StoreClient)> {
    let mut replicas = local_group(store_bin, n, dir, extra)?;
    for r in &mut replicas {
        r.start()?;
    }
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let admin = StoreClient::new(addrs.clone(), timeout)?;
    wait_for_leader(&admin, &addrs).await?;
    Ok((replicas, addrs, admin))
}

/// The index in `addrs` of the replica that reports itself leader.
pub(crate) async fn leader_index(client: &StoreClient, addrs: &[String]) -> Option<usize> {
    for (i, a) in addrs.iter().enumerate() {
        if client.status_of(a).await.is_ok_and(|s| s.role == "leader") {
            return Some(i);
        }
    }
    None
}

async fn wait_for_leader(client: &StoreClient, addrs: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for a in addrs {
            if client
                .status_of(a)
                .await
                .is_ok_and(|s| s.role == "leader" && s.serving)
            {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no leader elected within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
