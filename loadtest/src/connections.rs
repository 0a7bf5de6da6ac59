//! `connections`: very many mostly idle subscribers on one gateway. Each
//! client is its own HTTP/2 connection with a Subscribe stream, spread over
//! source addresses of 127.0.0.0/8 (the gateway caps connections per IP and
//! one address has ≈ 28,000 ports). It reports the gateway's resident
//! memory and open descriptors at each step of clients, the rate they were
//! accepted at, send→delivery latency to a sample of them at full count,
//! and, after the gateway is restarted, how long until every client is
//! subscribed again, checking that the sample missed nothing sent while it
//! was down. It runs against a local cluster it starts, or against the
//! compose cluster (`--compose`), whose public port is TLS.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf as _, BytesMut};
use chat_proto::chat::v1 as cpb;
use chatctl::local::LocalOptions;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::rawgrpc;
use crate::scenario::target::Target;

#[derive(clap::Args)]
pub struct Args {
    /// Subscribed clients in all after each step.
    #[arg(long, value_delimiter = ',', default_value = "10000,25000,50000")]
    steps: Vec<usize>,
    /// Clients that are members of a conversation that gets messages:
    /// delivery latency is measured on them, and that they miss nothing
    /// across the gateway's restart.
    #[arg(long, default_value_t = 200)]
    sample: usize,
    /// Clients per source address (under the gateway's per-IP cap).
    #[arg(long, default_value_t = 5_000)]
    per_address: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    opening: usize,
    /// Leave out the gateway restart.
    #[arg(long)]
    no_restart: bool,
    /// Run against the docker compose cluster of this file (started with
    /// deploy/up.sh) instead of a local cluster.
    #[arg(long, value_name = "FILE")]
    compose: Option<PathBuf>,
    /// Compose project name (deploy/up.sh uses CHAT_PROJECT, default chat).
    #[arg(long, default_value = "chat", env = "CHAT_PROJECT")]
    compose_project: String,
}

/// The gateway the clients connect to.
const GATEWAY: &str = "gateway-1";

/// What the clients share with the run.
#[derive(Default)]
struct Shared {
    subscribed: AtomicUsize,
    /// Sample clients' deliveries: client message id -> when it arrived.
    arrived: Mutex<HashMap<String, Instant>>,
    /// Sample clients' last seq per conversation (their resume cursors).
    cursors: Mutex<HashMap<String, u64>>,
}

fn source(i: usize, per_address: usize) -> IpAddr {
    let a = i / per_address.max(1);
    IpAddr::V4(Ipv4Addr::new(127, 1, (a / 250) as u8, (a % 250 + 1) as u8))
}

/// Lifts this process's open-file limit to what `n` connections need (the
/// cluster's processes, started after, inherit it).
fn raise_fd_limit(n: u64) -> anyhow::Result<u64> {
    let want = n + 4_096;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        anyhow::ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0,
            "getrlimit failed"
        );
        if lim.rlim_cur < want {
            let hard = lim.rlim_max;
            lim.rlim_max = hard.max(want);
            lim.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                anyhow::bail!(
                    "{n} clients need an open-file limit of {want}; the hard limit is {hard} and this process may not raise it (ulimit -Hn, or fewer --steps)"
                );
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// The gateway's resident memory (KiB) and open descriptors.
fn gateway_usage(target: &Target) -> (u64, usize) {
    let Some(pid) = target.pid(GATEWAY) else {
        return (0, 0);
    };
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (rss, fds)
}

/// One client: connects, subscribes (with its cursors), reads until the
/// stream ends, and does it again after a jittered pause, until `stop`.
async fn client(
    gateway: rawgrpc::Gateway,
    src: IpAddr,
    token: String,
    sample: bool,
    shared: Arc<Shared>,
    first: Option<tokio::sync::OwnedSemaphorePermit>,
    stop: CancellationToken,
) {
    let mut first = first;
    while !stop.is_cancelled() {
        if let Ok(body) = subscribe(&gateway, src, &token, sample, &shared).await {
            drop(first.take());
            shared.subscribed.fetch_add(1, Relaxed);
            tokio::select! {
                () = read(body, sample, &shared) => {}
                () = stop.cancelled() => {}
            }
            shared.subscribed.fetch_sub(1, Relaxed);
        }
        let pause = Duration::from_millis(200 + rand::random::<u64>() % 1_800);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => {}
        }
    }
}

async fn subscribe(
    gateway: &rawgrpc::Gateway,
    src: IpAddr,
    token: &str,
    sample: bool,
    shared: &Shared,
) -> anyhow::Result<h2::RecvStream> {
    let io = tokio::time::timeout(Duration::from_secs(10), gateway.connect(src)).await??;
    let (h2, conn) = h2::client::handshake(io).await?;
    tokio::spawn(conn);
    let mut h2 = h2.ready().await?;
    let req = gateway.request("/chat.v1.Chat/Subscribe", token);
    let (response, mut stream) = h2.send_request(req, false)?;
    let cursors = if sample {
        shared
            .cursors
            .lock()
            .expect("cursors poisoned")
            .iter()
            .map(|(c, &seq)| cpb::Cursor {
                conversation_id: c.clone(),
                last_seq: seq,
            })
            .collect()
    } else {
        Vec::new()
    };
    stream.send_data(
        rawgrpc::frame(&cpb::SubscribeRequest { cursors }.encode_to_vec()),
        true,
    )?;
    let resp = tokio::time::timeout(Duration::from_secs(30), response).await??;
    anyhow::ensure!(
        resp.status() == http::StatusCode::OK && !resp.headers().contains_key("grpc-status"),
        "refused: {:?}",
        resp.headers().get("grpc-message")
    );
    Ok(resp.into_body())
}

/// Reads events until the stream ends; a sample client notes its messages.
async fn read(mut body: h2::RecvStream, sample: bool, shared: &Shared) {
    let mut buf = BytesMut::new();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        if !sample {
            continue;
        }
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len);
            if let Ok(cpb::Event {
                kind: Some(cpb::event::Kind::Message(m)),
            }) = cpb::Event::decode(msg.freeze())
            {
                let now = Instant::now();
                shared
                    .arrived
                    .lock()
                    .expect("arrived poisoned")
                    .entry(m.client_msg_id)
                    .or_insert(now);
                let mut c = shared.cursors.lock().expect("cursors poisoned");
                let e = c.entry(m.conversation_id).or_insert(0);
                *e = (*e).max(m.seq);
            }
        }
    }
}

async fn wait_until(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while !done() {
        anyhow::ensure!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(t0.elapsed())
}

/// Sends one message to each sample conversation through the other
/// gateway, a few at a time; returns the client message ids with their
/// send times, and how many tries were shed and made again.
async fn send_round(
    sender: &chat_client::ChatClient,
    run: &str,
    sample: usize,
    round: &str,
) -> anyhow::Result<(Vec<(String, Instant)>, usize)> {
    let shed = &AtomicUsize::new(0);
    let sends = (0..sample).map(|j| async move {
        let cmid = format!("{run}-{round}-{j}");
        let at = Instant::now();
        loop {
            match sender
                .send(&format!("{run}-{j}"), &cmid, b"hello".to_vec())
                .await
            {
                Ok(_) => break,
                // Shed: again after the hint, with the same id, as a
                // client does; the latency counts from the first try.
                Err(s)
                    if s.code() == tonic::Code::ResourceExhausted
                        && at.elapsed() < Duration::from_secs(30) =>
                {
                    shed.fetch_add(1, Relaxed);
                    let hint = chat_client::retry_after(&s).unwrap_or_default();
                    tokio::time::sleep(hint.max(Duration::from_millis(50))).await;
                }
                Err(s) => anyhow::bail!("send: {:?}: {}", s.code(), s.message()),
            }
        }
        Ok::<_, anyhow::Error>((cmid, at))
    });
    // A few at a time, as a client would: the whole sample at once is a
    // burst the routers' concurrency limits may shed (compose's are small).
    use futures::{StreamExt as _, TryStreamExt as _};
    let sent = futures::stream::iter(sends)
        .buffered(SENDS_AT_ONCE)
        .try_collect()
        .await?;
    Ok((sent, shed.load(Relaxed)))
}

/// Sample sends in flight at once.
const SENDS_AT_ONCE: usize = 16;

/// Waits up to `within` for every message of `sent` to arrive; what did
/// not is counted by [`latencies`].
async fn wait_for_arrivals(shared: &Shared, sent: &[(String, Instant)], within: Duration) {
    let _ = wait_until("arrivals", within, || {
        let a = shared.arrived.lock().expect("arrived poisoned");
        sent.iter().all(|(c, _)| a.contains_key(c))
    })
    .await;
}

fn latencies(sent: &[(String, Instant)], shared: &Shared) -> (Vec<Duration>, usize) {
    let arrived = shared.arrived.lock().expect("arrived poisoned");
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(c, at)| arrived.get(c).map(|t| t.saturating_duration_since(*at)))
        .collect();
    lat.sort();
    let missing = sent.len() - lat.len();
    (lat, missing)
}

fn pct(lat: &[Duration], p: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
    lat[i].as_secs_f64() * 1000.0
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let total = *args.steps.iter().max().unwrap_or(&0);
    anyhow::ensure!(total > 0, "--steps must name at least one count");
    anyhow::ensure!(
        args.sample <= args.steps[0] && args.per_address > 0 && args.opening > 0,
        "--sample must fit in the first step; --per-address and --opening above 0"
    );
    // One descriptor per client here; a local gateway, started after,
    // inherits the limit and needs one per client too.
    let limit = raise_fd_limit(total as u64)?;
    println!("connections: open-file limit {limit}");
    let dir = tempfile::tempdir()?;
    let mut target = match &args.compose {
        Some(file) => {
            let t = Target::compose(file.clone(), args.compose_project.clone(), None)?;
            let unhealthy = t.wait_healthy(Duration::from_secs(60)).await;
            anyhow::ensure!(unhealthy.is_empty(), "not healthy: {unhealthy:?}");
            t
        }
        None => {
            let bin_dir = crate::sibling_binary(None, "chatctl")?
                .parent()
                .map(Path::to_path_buf);
            let opts = LocalOptions {
                bin_dir,
                ..LocalOptions::default()
            };
            Target::local(dir.path(), opts).await?
        }
    };
    let result = measure(&args, &mut target).await;
    target.shutdown().await;
    result
}

async fn measure(args: &Args, target: &mut Target) -> anyhow::Result<()> {
    let key = chat_auth::TokenKey::new(target.key().as_bytes().to_vec())?;
    let ca = target.gateway_ca();
    let gateways = target.gateways();
    // On compose, straight to the gateway's container on the project's
    // network: the host's port publisher (docker-proxy) in between gave up
    // after a few thousand connections here (BENCHMARKS.md), and it is the
    // gateway being measured. Clients then share one source address.
    let (gateway, spread) = match target.network_addr(GATEWAY, 7201) {
        Some(addr) => (
            rawgrpc::Gateway::new(&addr, ca.as_deref())?.named(GATEWAY)?,
            false,
        ),
        None => (rawgrpc::Gateway::new(&gateways[0], ca.as_deref())?, true),
    };
    let sender_token = key.sign_for("conn-sender", 24 * 3600);
    let sender_at = vec![gateways[1].clone()];
    let timeout = Duration::from_secs(30);
    let sender = match &ca {
        Some(ca) => chat_client::ChatClient::new_tls(sender_at, &sender_token, timeout, ca),
        None => chat_client::ChatClient::new(sender_at, &sender_token, timeout),
    }
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    // Conversations of this run (a compose cluster keeps those of earlier
    // runs).
    let run = format!(
        "conn-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    for j in 0..args.sample {
        sender
            .create_conversation(&format!("{run}-{j}"), &[format!("conn-user-{j}")])
            .await
            .map_err(|s| anyhow::anyhow!("create: {:?}: {}", s.code(), s.message()))?;
    }
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let opening = Arc::new(tokio::sync::Semaphore::new(args.opening));
    let (rss0, fds0) = gateway_usage(target);
    println!(
        "connections: {GATEWAY} at {} ({}), before any client: RSS {:.1} MiB, {fds0} descriptors",
        gateway.authority,
        target.describe(),
        rss0 as f64 / 1024.0
    );
    println!(
        "| clients | gateway RSS MiB | KiB per client since start | descriptors | accepted/s in the step |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let mut opened = 0;
    let mut tasks = tokio::task::JoinSet::new();
    for &step in &args.steps {
        let t0 = Instant::now();
        let from = opened;
        while opened < step {
            let permit = opening.clone().acquire_owned().await?;
            let token = format!(
                "Bearer {}",
                key.sign_for(&format!("conn-user-{opened}"), 24 * 3600)
            );
            tasks.spawn(client(
                gateway.clone(),
                if spread {
                    source(opened, args.per_address)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                },
                token,
                opened < args.sample,
                shared.clone(),
                Some(permit),
                stop.clone(),
            ));
            opened += 1;
        }
        let s = shared.clone();
        wait_until("every client subscribed", Duration::from_secs(600), || {
            s.subscribed.load(Relaxed) >= step
        })
        .await?;
        let secs = t0.elapsed().as_secs_f64();
        let (rss, fds) = gateway_usage(target);
        println!(
            "| {step} | {:.1} | {:.1} | {fds} | {:.0} |",
            rss as f64 / 1024.0,
            rss.saturating_sub(rss0) as f64 / step as f64,
            (step - from) as f64 / secs
        );
    }

    // Delivery at full count.
    let (sent, shed) = send_round(&sender, &run, args.sample, "live").await?;
    wait_for_arrivals(&shared, &sent, Duration::from_secs(30)).await;
    let (lat, missing) = latencies(&sent, &shared);
    println!(
        "send→delivery with {opened} subscribed, {} sample messages: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {missing} not delivered ({shed} tries shed and made again)",
        sent.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );

    if !args.no_restart {
        target.stop(GATEWAY, Duration::from_secs(10)).await?;
        let s = shared.clone();
        wait_until("every stream ended", Duration::from_secs(60), || {
            s.subscribed.load(Relaxed) == 0
        })
        .await?;
        let (during, _) = send_round(&sender, &run, args.sample, "outage").await?;
        target.restart(GATEWAY).await?;
        let s = shared.clone();
        let back = wait_until(
            "every client subscribed again",
            Duration::from_secs(900),
            || s.subscribed.load(Relaxed) >= opened,
        )
        .await?;
        wait_for_arrivals(&shared, &during, Duration::from_secs(60)).await;
        let (_, missed) = latencies(&during, &shared);
        let (rss, fds) = gateway_usage(target);
        println!(
            "{GATEWAY} restarted: all {opened} clients subscribed again {:.1} s after the restart ({:.0}/s); {missed} of {} messages sent while it was down missed; gateway RSS {:.1} MiB, {fds} descriptors",
            back.as_secs_f64(),
            opened as f64 / back.as_secs_f64().max(0.001),
            during.len(),
            rss as f64 / 1024.0
        );
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}
