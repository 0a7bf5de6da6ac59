//! End-to-end benchmark: the whole cluster from `chatctl local up`, closed-
//! loop senders through the gateways, one subscriber per conversation.
//! Measures send→ack and send→delivery latency and acknowledged sends per
//! second, then checks every acknowledged message was delivered once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_client::{ChatClient, SubscriptionEvent, event};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent senders, each waiting for its ack; one conversation each.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    #[arg(long, default_value_t = 15)]
    duration_secs: u64,
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// The chatctl binary (default: next to this one).
    #[arg(long)]
    chatctl: Option<PathBuf>,
    /// Internal hops in plaintext instead of mutual TLS (for comparison).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Every send as its own unary call instead of on the client's send
    /// stream (for comparison).
    #[arg(long)]
    unary_sends: bool,
}

/// The name the load generator's own CPU is reported under.
const LOAD_GENERATOR: &str = "load generator";

/// CPU time so far of every process `local up` recorded in `run_dir`
/// (`<name>` holding "pid address"), and of this process, by name.
fn cpu_snapshot(run_dir: &std::path::Path) -> Vec<(String, Duration)> {
    let mut out: Vec<(String, Duration)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_str()?.to_owned();
            let text = std::fs::read_to_string(e.path()).ok()?;
            let pid: u32 = text.split_whitespace().next()?.parse().ok()?;
            Some((name, crate::cpu::process_cpu(pid)?))
        })
        .collect();
    out.sort();
    if let Some(own) = crate::cpu::own_cpu() {
        out.push((LOAD_GENERATOR.to_owned(), own));
    }
    out
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.body_bytes >= 8,
        "need clients and bodies of 8+ bytes"
    );
    let chatctl = crate::sibling_binary(args.chatctl.clone(), "chatctl")?;
    let dir = tempfile::tempdir()?;
    let mut up = Command::new(&chatctl);
    up.args(["local", "up", "--base-port", "0", "--dir"])
        .arg(dir.path());
    if args.insecure_plaintext {
        up.arg("--insecure-plaintext");
    }
    let mut up = up
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", chatctl.display()))?;
    let mut lines = BufReader::new(up.stdout.take().context("piped")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await? {
            if l.starts_with("ready") {
                return Ok::<_, anyhow::Error>(l);
            }
        }
        anyhow::bail!("local up ended before it was ready")
    })
    .await
    .context("cluster not ready within 60 s")??;
    let gateways: Vec<String> = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("gateways="))
        .context("no gateways in the ready line")?
        .split(',')
        .map(String::from)
        .collect();
    let key = chat_auth::TokenKey::new(
        std::fs::read_to_string(dir.path().join("token.key"))?
            .trim()
            .as_bytes()
            .to_vec(),
    )?;
    let client = |user: &str| {
        ChatClient::new(
            gateways.clone(),
            &key.sign_for(user, 3600),
            Duration::from_secs(20),
        )
    };

    let epoch = Instant::now();
    let start = Instant::now() + Duration::from_secs(1);
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let end = measure_from + Duration::from_secs(args.duration_secs);
    // CPU of every process over the measured window.
    let run_dir = dir.path().join("run");
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let before = cpu_snapshot(&run_dir);
        tokio::time::sleep_until(end.into()).await;
        (before, cpu_snapshot(&run_dir))
    });
    let mut senders = Vec::new();
    let mut listeners = Vec::new();
    for i in 0..args.clients {
        let s = client(&format!("s{i}"))?;
        s.set_streaming(!args.unary_sends);
        let r = client(&format!("r{i}"))?;
        let conv = format!("bench-{i}");
        s.create_conversation(&conv, &[format!("r{i}")]).await?;
        let mut sub = r.subscribe(HashMap::new());
        let conv_l = conv.clone();
        listeners.push(tokio::spawn(async move {
            let mut h = hist();
            let mut seqs = Vec::new();
            while let Ok(Some(ev)) =
                tokio::time::timeout_at((end + Duration::from_secs(10)).into(), sub.next()).await
            {
                if let SubscriptionEvent::Event(e) = ev
                    && let Some(event::Kind::Message(m)) = e.kind
                    && m.conversation_id == conv_l
                {
                    let sent_ns = u64::from_be_bytes(m.body[..8].try_into().expect("8 bytes"));
                    let sent = epoch + Duration::from_nanos(sent_ns);
                    if sent >= measure_from {
                        let _ = h.record(
                            epoch
                                .elapsed()
                                .saturating_sub(Duration::from_nanos(sent_ns))
                                .as_micros() as u64,
                        );
                    }
                    seqs.push(m.seq);
                    if sent >= end {
                        break;
                    }
                }
            }
            (h, seqs)
        }));
        let pad = args.body_bytes - 8;
        senders.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut h = hist();
            let (mut acked, mut measured) = (0u64, 0u64);
            let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                let mut body = ((t0 - epoch).as_nanos() as u64).to_be_bytes().to_vec();
                body.resize(8 + pad, b'x');
                match s.send(&conv, &format!("{i}-{n}"), body).await {
                    Ok(_) => {
                        acked += 1;
                        if t0 >= measure_from && t0 < end {
                            measured += 1;
                            let _ = h.record(t0.elapsed().as_micros() as u64);
                        }
                    }
                    Err(e) => {
                        *errors
                            .entry(format!("{:?}: {}", e.code(), e.message()))
                            .or_insert(0) += 1;
                        // As a client should: a refusal for overload is
                        // waited out, not answered with the next call at once.
                        if e.code() == tonic::Code::ResourceExhausted {
                            let wait =
                                chat_client::retry_after(&e).unwrap_or(Duration::from_millis(50));
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                n += 1;
                if t0 >= end {
                    break;
                }
            }
            (h, acked, measured, errors)
        }));
    }
    let (mut ack_h, mut acked, mut measured) = (hist(), 0u64, 0u64);
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let mut acked_per = Vec::new();
    for s in senders {
        let (h, a, m, e) = s.await?;
        ack_h.add(h)?;
        acked += a;
        measured += m;
        for (k, v) in e {
            *errors.entry(k).or_insert(0) += v;
        }
        acked_per.push(a);
    }
    let mut del_h = hist();
    let mut lost = 0u64;
    let mut dup = 0u64;
    for (l, a) in listeners.into_iter().zip(acked_per) {
        let (h, seqs) = l.await?;
        del_h.add(h)?;
        let mut sorted = seqs.clone();
        sorted.dedup();
        dup += (seqs.len() - sorted.len()) as u64;
        lost += a.saturating_sub(sorted.len() as u64);
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "e2e-bench: 3 store replicas (sync=always), 2 routers, 2 gateways; {} closed-loop senders, {}-byte bodies, one subscriber per conversation",
        args.clients, args.body_bytes
    );
    println!(
        "measured {} s after {} s warm-up",
        args.duration_secs, args.warmup_secs
    );
    println!(
        "acked sends/s: {:.0}",
        measured as f64 / args.duration_secs as f64
    );
    for (name, h) in [("send→ack", &ack_h), ("send→delivery", &del_h)] {
        println!(
            "{name} latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0
        );
    }
    println!(
        "acked {acked}, errors {}, acknowledged but not delivered {lost}, delivered twice {dup}",
        errors.values().sum::<u64>()
    );
    for (what, n) in &errors {
        println!("  {n} × {what}");
    }
    let (before, after) = sampler.await?;
    let per_msg = |name: &str| -> Option<f64> {
        let b = before.iter().find(|(n, _)| n == name)?.1;
        let a = after.iter().find(|(n, _)| n == name)?.1;
        Some(a.saturating_sub(b).as_micros() as f64 / measured.max(1) as f64)
    };
    let mut line = Vec::new();
    let mut services = 0.0;
    for (name, _) in &after {
        if let Some(us) = per_msg(name) {
            if name != LOAD_GENERATOR {
                services += us;
            }
            line.push(format!("{name} {us:.0}"));
        }
    }
    println!(
        "CPU µs per acked send: {}; all services {services:.0}",
        line.join(", ")
    );
    let pid = up.id().context("local up exited")?.to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), up.wait()).await;
    Ok(())
}
