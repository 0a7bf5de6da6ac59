//! Load scenarios: realistic chat traffic against a cluster, faults at
//! chosen moments, and afterwards a read-back proving every acknowledged
//! message is stored once, in order, and was delivered to every member.
//!
//! Traffic is open-loop by default: sends are scheduled at a constant
//! arrival rate and latency is measured from the scheduled time, so a
//! stalled server cannot hide its stall by slowing the senders down (no
//! coordinated omission). `--concurrency N` switches to closed loop: N
//! senders, each waiting for its ack, for finding capacity.

mod drill;
pub mod fault;
mod flood;
mod report;
mod rollout;
pub mod target;
mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use chat_client::{ChatClient, SubscriptionEvent, event};
use chatctl::local::LocalOptions;
use rand::Rng;
use tokio::sync::watch;

use chatctl::restart::Tier;
use fault::FaultSpec;
use report::{FaultRecord, Report};
use target::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A fixed rate for a duration.
    Steady,
    /// Offered load ramps from below to several times capacity.
    Congestion,
    /// Steady load with faults (default: the store leader killed at 10 s).
    Failover,
    /// Every service restarted one at a time under load.
    RollingRestart,
    /// Every client disconnects and reconnects at once.
    ReconnectStorm,
    /// A canary router release that fails a share of its calls is rolled
    /// out under load; the analysis must roll it back.
    CanaryBadRelease,
    /// A healthy canary router release is rolled out to 100 % under load.
    CanaryGoodRelease,
    /// An online backup mid-load, every store's data destroyed after it, a
    /// new group restored from the file.
    Dr,
    /// A follower's files damaged under load, refused, rebuilt, rejoined.
    CorruptReplica,
    /// Attacks on the public edge beside well-behaved users.
    Flood,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Congestion => "congestion",
            Scenario::Failover => "failover",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::ReconnectStorm => "reconnect-storm",
            Scenario::CanaryBadRelease => "canary-bad-release",
            Scenario::CanaryGoodRelease => "canary-good-release",
            Scenario::Dr => "dr",
            Scenario::CorruptReplica => "corrupt-replica",
            Scenario::Flood => "flood",
        }
    }

    /// Whether the scenario reaches into the replicas' data directories.
    fn is_drill(self) -> bool {
        matches!(self, Scenario::Dr | Scenario::CorruptReplica)
    }

    fn is_canary(self) -> bool {
        matches!(
            self,
            Scenario::CanaryBadRelease | Scenario::CanaryGoodRelease
        )
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Start a local cluster (3 stores, 2 routers, 2 gateways as local
    /// processes) and inject faults by signals. The default target.
    #[arg(long, conflicts_with_all = ["compose", "gateways"])]
    local: bool,
    /// Run against the docker compose cluster of this file (started with
    /// deploy/up.sh); faults through the Docker engine.
    #[arg(long, value_name = "FILE", conflicts_with = "gateways")]
    compose: Option<PathBuf>,
    /// Compose project name (deploy/up.sh uses CHAT_PROJECT, default chat).
    #[arg(long, default_value = "chat", env = "CHAT_PROJECT")]
    compose_project: String,
    /// Run against gateways that are already running (host:port, comma
    /// separated); no faults are injected, verification is the same.
    #[arg(long, value_delimiter = ',')]
    gateways: Vec<String>,
    /// The deployment's token key (with --gateways, and --compose when
    /// deploy/.env is not beside the compose file).
    #[arg(long, env = "CHAT_TOKEN_KEY", hide_env_values = true)]
    token_key: Option<String>,

    /// Simulated users, each with a Subscribe stream open.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Conversations messages are sent to.
    #[arg(long, default_value_t = 50)]
    conversations: usize,
    /// Members per conversation.
    #[arg(long, default_value_t = 3)]
    group_size: usize,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Offered sends per second (open loop). Default: 500, or for
    /// `congestion` the ramp from --capacity.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop instead: this many senders, each waiting for its ack.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Length of the load phase in seconds.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// A fault to inject, KIND@SECONDS into the load phase (repeatable).
    /// Kinds: store-leader, store-follower, store-all (every replica at
    /// once), gateway, router (SIGKILL or docker kill, restarted after
    /// --restart-after), partition-leader,
    /// partition-follower, heal, pause-leader, pause-follower, unpause.
    #[arg(long = "fault", value_name = "KIND@SECONDS")]
    faults: Vec<FaultSpec>,
    /// Seconds after which a killed service is started again; in
    /// rolling-restart, the pause between one service and the next.
    #[arg(long, default_value_t = 3.0)]
    restart_after: f64,
    /// How long one send may take, retries included, before it counts as
    /// failed.
    #[arg(long, default_value_t = 10.0)]
    send_timeout: f64,

    /// Typing calls per send (0–1), sent alongside it (default: 0.2 in
    /// congestion, 0 otherwise). Typing is sheddable: under overload it is
    /// refused before sends are.
    #[arg(long)]
    typing_per_send: Option<f64>,

    /// congestion: capacity in acked sends/s; found by a closed-loop probe
    /// when not given. failover and steady: sends refused outside the
    /// fault windows fail the run only when the offered rate is at most
    /// half of it (without it: always).
    #[arg(long)]
    capacity: Option<f64>,
    /// congestion: the ramp ends at this multiple of capacity.
    #[arg(long, default_value_t = 3.0)]
    peak_factor: f64,
    /// congestion: seconds of the capacity probe.
    #[arg(long, default_value_t = 10.0)]
    probe_secs: f64,
    /// congestion: closed-loop senders of the capacity probe (the cluster
    /// batches at every hop, so it needs many requests in flight to reach
    /// its peak).
    #[arg(long, default_value_t = 1024)]
    probe_concurrency: usize,
    /// reconnect-storm: seconds into the load phase (default: a third).
    #[arg(long)]
    storm_at: Option<f64>,
    /// dr: seconds into the load phase when the backup is taken (default:
    /// half); corrupt-replica: when the follower is damaged (default: a
    /// third).
    #[arg(long)]
    drill_at: Option<f64>,

    /// flood: an attack to run (repeatable; default: every one). Kinds:
    /// hot-user, many-users, idle-connections, rapid-reset, malformed,
    /// slow-readers.
    #[arg(long = "attack", value_name = "KIND")]
    attacks: Vec<String>,
    /// flood: seconds into the load phase when the attacks start (default:
    /// half); the users' service before it is the yardstick.
    #[arg(long)]
    attack_at: Option<f64>,
    /// flood: the gateways' per-user call limit (calls a second). A local
    /// cluster is started with it; for --compose or --gateways give the
    /// deployment's. Attacks are paced from it.
    #[arg(long, default_value_t = 20)]
    user_limit: u32,
    /// flood: the gateways' per-IP call limit (calls a second), as
    /// --user-limit.
    #[arg(long, default_value_t = 500)]
    ip_limit: u32,
    /// flood: the gateways' cap on connections from one IP, as
    /// --user-limit.
    #[arg(long, default_value_t = 500)]
    connections_per_ip: u32,
    /// flood SLO: the users' send→ack p99 under attack, as a multiple of
    /// theirs before it.
    #[arg(long, default_value_t = 2.0)]
    max_p99_ratio: f64,
    /// flood SLO (local target): the highest peak resident memory of a
    /// gateway, MiB.
    #[arg(long, default_value_t = 256.0)]
    max_gateway_rss_mib: f64,

    /// canary-*: seconds into the load phase when the rollout starts and
    /// the canary router is started.
    #[arg(long, default_value_t = 2.0)]
    canary_at: f64,
    /// canary-*: canary weights in percent, ending at 100.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    canary_steps: Vec<u32>,
    /// canary-*: analysis interval, seconds.
    #[arg(long, default_value_t = 5.0)]
    canary_interval: f64,
    /// canary-bad-release: share of the canary's calls it fails (INTERNAL).
    #[arg(long, default_value_t = 0.2)]
    canary_error_rate: f64,
    /// canary-bad-release: latency the canary adds to every call, ms.
    #[arg(long, default_value_t = 0)]
    canary_latency_ms: u64,

    /// Start the local gateways and routers with overload protection and
    /// degraded mode switched off (`--no-overload-protection`), and switch
    /// off the clients' throttling, for a side-by-side comparison.
    #[arg(long)]
    no_protection: bool,
    /// Every send as its own unary call instead of on each user's send
    /// stream (for comparison).
    #[arg(long)]
    unary_sends: bool,
    /// Local target: an extra flag for every gateway (repeatable), for
    /// example `--gateway-arg=--limit-tolerance=4`.
    #[arg(long = "gateway-arg", value_name = "ARG", allow_hyphen_values = true)]
    gateway_args: Vec<String>,
    /// SLO: longest gap between acks after a store-leader fault, in ms.
    #[arg(long, default_value_t = 2000)]
    max_unavailability_ms: u64,
    /// SLO (open-loop loads with faults): seconds from each fault until
    /// goodput stays at 95 % or more of the offered load; the load should
    /// be below capacity.
    #[arg(long, default_value_t = 3.0)]
    max_recovery_s: f64,
    /// Directory the report goes into (a subdirectory per run).
    #[arg(long, default_value = "loadtest-reports")]
    out: PathBuf,
    /// No live progress line.
    #[arg(long, short)]
    quiet: bool,
    /// Keep the local cluster's data directories after the run.
    #[arg(long)]
    keep_data: bool,
}

impl Args {
    fn validate(&self, scenario: Scenario) -> anyhow::Result<()> {
        if let Some(r) = self.rate {
            anyhow::ensure!(
                r.is_finite() && r > 0.0,
                "--rate must be more than 0, got {r}"
            );
        }
        anyhow::ensure!(
            self.concurrency != Some(0),
            "--concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.duration.is_finite() && self.duration > 0.0 && self.duration <= 3600.0,
            "--duration must be in (0, 3600] seconds"
        );
        anyhow::ensure!(self.users >= 1, "--users must be at least 1");
        anyhow::ensure!(
            self.conversations >= 1,
            "--conversations must be at least 1"
        );
        anyhow::ensure!(
            (1..=self.users).contains(&self.group_size),
            "--group-size must be between 1 and --users ({})",
            self.users
        );
        anyhow::ensure!(
            (16..=60_000).contains(&self.body_bytes),
            "--body-bytes must be between 16 and 60000"
        );
        anyhow::ensure!(
            self.send_timeout > 0.0 && self.send_timeout <= 120.0,
            "--send-timeout must be in (0, 120] seconds"
        );
        anyhow::ensure!(
            self.max_recovery_s.is_finite() && self.max_recovery_s >= 0.0,
            "--max-recovery-s must be 0 or more"
        );
        anyhow::ensure!(
            self.restart_after >= 0.0,
            "--restart-after must be 0 or more"
        );
        anyhow::ensure!(
            self.typing_per_send
                .is_none_or(|t| (0.0..=1.0).contains(&t)),
            "--typing-per-send must be between 0 and 1"
        );
        if let Some(c) = self.capacity {
            anyhow::ensure!(c > 0.0, "--capacity must be more than 0");
        }
        anyhow::ensure!(self.peak_factor > 0.0, "--peak-factor must be more than 0");
        for f in &self.faults {
            anyhow::ensure!(
                f.at_s < self.duration,
                "fault {}@{} is after the end of the load phase ({} s)",
                f.kind,
                f.at_s,
                self.duration
            );
        }
        anyhow::ensure!(
            !self.no_protection || (self.compose.is_none() && self.gateways.is_empty()),
            "--no-protection starts the gateways itself: it needs --local"
        );
        if scenario.is_canary() {
            anyhow::ensure!(
                self.compose.is_none() && self.gateways.is_empty(),
                "{} starts a canary router next to the cluster's own: it needs --local",
                scenario.name()
            );
            anyhow::ensure!(
                (0.0..=1.0).contains(&self.canary_error_rate),
                "--canary-error-rate must be between 0 and 1"
            );
            anyhow::ensure!(
                self.canary_interval >= 1.0,
                "--canary-interval must be at least 1 s"
            );
            anyhow::ensure!(
                self.canary_at < self.duration,
                "--canary-at must be within --duration"
            );
        }
        if scenario.is_drill() {
            anyhow::ensure!(
                self.compose.is_none() && self.gateways.is_empty(),
                "{} reaches into the replicas' data directories: it needs --local",
                scenario.name()
            );
            anyhow::ensure!(
                self.drill_at.is_none_or(|t| t >= 0.0 && t < self.duration),
                "--drill-at must be within --duration"
            );
        }
        if scenario == Scenario::Flood {
            for a in &self.attacks {
                anyhow::ensure!(
                    flood::KINDS.iter().any(|(k, _)| k == a),
                    "no attack named {a:?}; kinds: {}",
                    flood::KINDS.map(|(k, _)| k).join(", ")
                );
            }
            anyhow::ensure!(
                self.attack_at
                    .is_none_or(|t| t >= 1.0 && t + 2.0 <= self.duration),
                "--attack-at must leave at least 1 s before it and 2 s after it within --duration"
            );
            anyhow::ensure!(
                self.duration >= 4.0,
                "flood needs --duration of at least 4 s (a yardstick before the attack, the attack after)"
            );
            anyhow::ensure!(
                self.user_limit > 0 && self.ip_limit > 0 && self.connections_per_ip > 0,
                "--user-limit, --ip-limit and --connections-per-ip must be above 0"
            );
            anyhow::ensure!(
                self.max_p99_ratio > 0.0 && self.max_gateway_rss_mib > 0.0,
                "--max-p99-ratio and --max-gateway-rss-mib must be above 0"
            );
        }
        if !self.gateways.is_empty() {
            anyhow::ensure!(
                self.faults.is_empty() && scenario != Scenario::RollingRestart,
                "--gateways targets a cluster this tool did not start: it injects no faults there (use --local or --compose)"
            );
            anyhow::ensure!(
                self.token_key.is_some(),
                "--gateways needs the token key (--token-key or CHAT_TOKEN_KEY)"
            );
        }
        Ok(())
    }
}

/// One send and what became of it. Times are microseconds since the run's
/// epoch.
#[derive(Clone, Debug)]
struct SendRecord {
    conv: u32,
    /// The sending user's index.
    sender: u32,
    /// Sequence number of the send in this run; the client message id is
    /// derived from it.
    k: u64,
    /// When the send was scheduled (latency is measured from here).
    intended_us: u64,
    /// When the request actually left.
    started_us: u64,
    done_us: u64,
    /// The stored seq, or the final gRPC code.
    outcome: Result<u64, tonic::Code>,
}

/// A message as one subscriber received it.
#[derive(Clone, Debug)]
struct Delivery {
    conv: u32,
    seq: u64,
    k: Option<u64>,
    at_us: u64,
}

struct Conv {
    id: String,
    members: Vec<u32>,
}

/// Everything the traffic tasks share.
struct Ctx {
    run: String,
    epoch: Instant,
    users: Vec<String>,
    convs: Vec<Conv>,
    conv_index: HashMap<String, u32>,
    /// Per user; replaced wholesale by a reconnect storm.
    clients: Vec<RwLock<ChatClient>>,
    body_bytes: usize,
    sends: Mutex<Vec<SendRecord>>,
    next_k: AtomicU64,
    in_flight: AtomicU64,
    /// Per user: what its subscription delivered.
    deliveries: Vec<Mutex<Vec<Delivery>>>,
    /// Per user: the highest seq delivered per conversation index.
    delivered_upto: Vec<Mutex<HashMap<u32, u64>>>,
    gateways: Vec<String>,
    /// The CA of the gateways' public certificate (None: plaintext).
    gateway_ca: Option<Vec<u8>>,
    key: chat_auth::TokenKey,
    send_timeout: Duration,
    /// Probability a send is accompanied by a typing call.
    typing_per_send: f64,
    /// Client-side throttling (off with --no-protection).
    throttling: bool,
    /// Sends on each client's send stream (off: unary calls).
    streaming: bool,
    typing: report::TypingTally,
}

impl Ctx {
    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn cmid(&self, k: u64) -> String {
        format!("{}-{k}", self.run)
    }

    /// The send number in a client message id of this run.
    fn k_of(&self, cmid: &str) -> Option<u64> {
        cmid.strip_prefix(&self.run)?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    fn client_for(&self, user: usize) -> anyhow::Result<ChatClient> {
        let token = self.key.sign_for(&self.users[user], 24 * 3600);
        let c = match &self.gateway_ca {
            Some(ca) => ChatClient::new_tls(self.gateways.clone(), &token, self.send_timeout, ca),
            None => ChatClient::new(self.gateways.clone(), &token, self.send_timeout),
        }
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        c.set_throttling(self.throttling);
        c.set_streaming(self.streaming);
        Ok(c)
    }

    fn client(&self, user: u32) -> ChatClient {
        self.clients[user as usize]
            .read()
            .expect("client lock poisoned")
            .clone()
    }

    /// One send scheduled at `intended`: a random conversation, a random
    /// member as the sender.
    async fn send_one(self: Arc<Self>, intended: Instant) {
        tokio::time::sleep_until(intended.into()).await;
        let (conv, sender) = {
            let mut rng = rand::rng();
            let c = rng.random_range(0..self.convs.len());
            let m = &self.convs[c].members;
            (c as u32, m[rng.random_range(0..m.len())])
        };
        let k = self.next_k.fetch_add(1, Ordering::Relaxed);
        let mut body = vec![b'.'; self.body_bytes];
        let stamp = k.to_be_bytes();
        body[..8].copy_from_slice(&stamp);
        let client = self.client(sender);
        let conv_id = &self.convs[conv as usize].id;
        let typing = async {
            if self.typing_per_send > 0.0 && rand::random::<f64>() < self.typing_per_send {
                self.typing.record(client.typing(conv_id).await);
            }
        };
        let send = async {
            let started = Instant::now();
            let res = client.send(conv_id, &self.cmid(k), body).await;
            (started, Instant::now(), res)
        };
        let ((), (started, done, res)) = tokio::join!(typing, send);
        let rec = SendRecord {
            conv,
            sender,
            k,
            intended_us: self.us(intended),
            started_us: self.us(started),
            done_us: self.us(done),
            outcome: res.map(|r| r.seq).map_err(|s| s.code()),
        };
        self.sends.lock().expect("sends lock poisoned").push(rec);
    }
}

/// Offered sends per second at `t` seconds into the load phase.
#[derive(Clone, Copy, Debug)]
enum Load {
    Constant(f64),
    /// Linear from `from` to `to` over `secs`.
    Ramp {
        from: f64,
        to: f64,
        secs: f64,
    },
    Closed(usize),
}

impl Load {
    fn rate_at(self, t: f64) -> f64 {
        match self {
            Load::Constant(r) => r,
            Load::Ramp { from, to, secs } => from + (to - from) * (t / secs).clamp(0.0, 1.0),
            Load::Closed(_) => 0.0,
        }
    }

    fn describe(self) -> String {
        match self {
            Load::Constant(r) => format!("{r:.0}/s open loop"),
            Load::Ramp { from, to, .. } => format!("{from:.0}/s → {to:.0}/s open-loop ramp"),
            Load::Closed(n) => format!("closed loop, {n} senders"),
        }
    }
}

const TICK: Duration = Duration::from_millis(5);

/// Drives `load` from `start` for `secs`; returns when every send it began
/// has finished.
async fn drive(ctx: &Arc<Ctx>, load: Load, start: Instant, secs: f64) {
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Closed(n) => {
            for _ in 0..n {
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    tokio::time::sleep_until(start.into()).await;
                    while Instant::now() < end {
                        ctx.clone().send_one(Instant::now()).await;
                    }
                });
            }
        }
        _ => {
            let mut tick = tokio::time::interval_at(start.into(), TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut credit = 0.0f64;
            let mut prev = start;
            loop {
                let t = tick.tick().await.into_std();
                if t >= end {
                    break;
                }
                let dt = (t - prev).as_secs_f64();
                credit += load.rate_at((t - start).as_secs_f64()) * dt;
                let n = credit.floor();
                credit -= n;
                let n = n as u32;
                for i in 0..n {
                    // Spread evenly over the tick just passed.
                    let intended = prev + (t - prev).mul_f64(f64::from(i + 1) / f64::from(n));
                    ctx.in_flight.fetch_add(1, Ordering::Relaxed);
                    let ctx = ctx.clone();
                    tasks.spawn(async move {
                        ctx.clone().send_one(intended).await;
                        ctx.in_flight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                prev = t;
                // Reap finished sends so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// A subscriber: records what its subscription delivers; resubscribes on a
/// new connection (from its cursors) when `storm` changes.
async fn subscriber(
    ctx: Arc<Ctx>,
    user: usize,
    mut storm: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut cursors: HashMap<String, u64> = HashMap::new();
    let mut sub = ctx.client(user as u32).subscribe(cursors.clone());
    loop {
        tokio::select! {
            ev = sub.next() => {
                let Some(ev) = ev else { return };
                let SubscriptionEvent::Event(e) = ev else { continue };
                let Some(event::Kind::Message(m)) = e.kind else { continue };
                let Some(&conv) = ctx.conv_index.get(&m.conversation_id) else { continue };
                cursors.insert(m.conversation_id.clone(), m.seq);
                let d = Delivery {
                    conv,
                    seq: m.seq,
                    k: ctx.k_of(&m.client_msg_id),
                    at_us: ctx.us(Instant::now()),
                };
                ctx.deliveries[user].lock().expect("deliveries lock poisoned").push(d);
                let mut upto = ctx.delivered_upto[user].lock().expect("upto lock poisoned");
                let e = upto.entry(conv).or_insert(0);
                *e = (*e).max(m.seq);
            }
            r = storm.changed() => {
                if r.is_err() { return }
                drop(sub);
                sub = ctx.client(user as u32).subscribe(cursors.clone());
            }
            _ = stop.changed() => return,
        }
    }
}

/// Waits until `done` holds, checking every 100 ms, for at most `within`.
async fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(scenario: Scenario, mut args: Args) -> anyhow::Result<bool> {
    args.typing_per_send
        .get_or_insert(if scenario == Scenario::Congestion {
            0.2
        } else {
            0.0
        });
    args.validate(scenario)?;
    if scenario == Scenario::Failover && args.faults.is_empty() && args.gateways.is_empty() {
        args.faults
            .push("store-leader@10".parse().map_err(anyhow::Error::msg)?);
        anyhow::ensure!(
            args.duration > 10.0,
            "failover's default fault is at 10 s: give --duration over 10 or a --fault"
        );
    }
    let started_at = SystemTime::now();
    let run_id: String = format!("lt{:06x}", rand::random::<u32>() & 0xff_ffff);
    let run_dir = args.out.join(format!(
        "{}-{}",
        scenario.name(),
        report::timestamp_compact(started_at)
    ));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let progress = report::Progress::new(args.quiet);

    let target = if let Some(file) = &args.compose {
        Target::compose(
            file.clone(),
            args.compose_project.clone(),
            args.token_key.clone(),
        )?
    } else if !args.gateways.is_empty() {
        Target::Gateways {
            gateways: args.gateways.clone(),
            key: args.token_key.clone().unwrap_or_default(),
        }
    } else {
        progress.note("starting a local cluster");
        let off = || {
            if args.no_protection {
                vec!["--no-overload-protection".into()]
            } else {
                Vec::new()
            }
        };
        // flood: the limits its attacks are paced from.
        let limits = if scenario == Scenario::Flood {
            vec![
                format!("--user-rate={}", args.user_limit),
                format!("--ip-rate={}", args.ip_limit),
                format!("--max-connections-per-ip={}", args.connections_per_ip),
            ]
        } else {
            Vec::new()
        };
        let opts = LocalOptions {
            gateway_args: off()
                .into_iter()
                .chain(limits)
                .chain(args.gateway_args.iter().cloned())
                .collect(),
            router_args: off(),
            spare_routers: usize::from(scenario.is_canary()),
            ..LocalOptions::default()
        };
        Target::local(&run_dir.join("cluster"), opts).await?
    };
    let outcome = run_on(scenario, &args, target, &run_id, &progress, started_at).await;
    if !args.keep_data && args.compose.is_none() && args.gateways.is_empty() {
        for s in ["store-1", "store-2", "store-3"] {
            let _ = std::fs::remove_dir_all(run_dir.join("cluster").join(s));
        }
        let _ = std::fs::remove_file(run_dir.join("cluster").join(drill::BACKUP_FILE));
    }
    let report = outcome?;
    report.write(&run_dir)?;
    println!("{}", report.summary());
    println!("report: {}", run_dir.display());
    Ok(report.pass)
}

async fn run_on(
    scenario: Scenario,
    args: &Args,
    mut target: Target,
    run_id: &str,
    progress: &report::Progress,
    started_at: SystemTime,
) -> anyhow::Result<Report> {
    let result = async {
        let ctx = setup(args, &target, run_id, progress).await?;
        exercise(scenario, args, &mut target, &ctx, progress, started_at).await
    }
    .await;
    if let Err(e) = &result
        && let Target::Local(c) = &target
    {
        progress.note(&format!(
            "failed ({e:#}); service logs in {}",
            c.dir.join("logs").display()
        ));
    }
    target.shutdown().await;
    result
}

/// Makes the users, clients, conversations and subscriptions, and waits
/// until every subscription delivers.
async fn setup(
    args: &Args,
    target: &Target,
    run_id: &str,
    progress: &report::Progress,
) -> anyhow::Result<Arc<Ctx>> {
    let gateways = target.gateways();
    for g in &gateways {
        anyhow::ensure!(
            chatctl::local::healthy(g, "chat.v1.Chat", None, target.gateway_ca().as_deref()).await,
            "gateway {g} is unreachable or not serving (no SERVING answer on gRPC health within 3 s)"
        );
    }
    let key = chat_auth::TokenKey::new(target.key().as_bytes().to_vec())
        .map_err(|e| anyhow::anyhow!("bad token key: {e}"))?;
    let users: Vec<String> = (0..args.users).map(|i| format!("{run_id}-u{i}")).collect();
    let convs: Vec<Conv> = (0..args.conversations)
        .map(|j| Conv {
            id: format!("{run_id}-c{j}"),
            members: (0..args.group_size)
                .map(|m| ((j * args.group_size + m) % args.users) as u32)
                .collect(),
        })
        .collect();
    let conv_index = convs
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i as u32))
        .collect();
    let mut ctx = Ctx {
        run: run_id.to_owned(),
        epoch: Instant::now(),
        users,
        convs,
        conv_index,
        clients: Vec::new(),
        body_bytes: args.body_bytes,
        sends: Mutex::new(Vec::new()),
        next_k: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        deliveries: (0..args.users).map(|_| Mutex::new(Vec::new())).collect(),
        delivered_upto: (0..args.users)
            .map(|_| Mutex::new(HashMap::new()))
            .collect(),
        gateways,
        gateway_ca: target.gateway_ca(),
        key,
        send_timeout: Duration::from_secs_f64(args.send_timeout),
        typing_per_send: args.typing_per_send.unwrap_or(0.0),
        throttling: !args.no_protection,
        streaming: !args.unary_sends,
        typing: Default::default(),
    };
    ctx.clients = (0..args.users)
        .map(|u| ctx.client_for(u).map(RwLock::new))
        .collect::<Result<_, _>>()?;
    let ctx = Arc::new(ctx);

    progress.note(&format!(
        "creating {} conversations of {} members among {} users",
        args.conversations, args.group_size, args.users
    ));
    let mut set = tokio::task::JoinSet::new();
    for (j, c) in ctx.convs.iter().enumerate() {
        let client = ctx.client(c.members[0]);
        let others: Vec<String> = c.members[1..]
            .iter()
            .map(|&m| ctx.users[m as usize].clone())
            .collect();
        let id = c.id.clone();
        set.spawn(async move {
            // Setup is not measured: a refusal for overload (the cluster's
            // limiters start cold) is waited out as a user would.
            patiently(|| client.create_conversation(&id, &others))
                .await
                .map(|_| j)
        });
        if set.len() >= 32
            && let Some(r) = set.join_next().await
        {
            created(r)?;
        }
    }
    while let Some(r) = set.join_next().await {
        created(r)?;
    }
    Ok(ctx)
}

/// How long calls outside the measured load (setup, the read-back) keep
/// asking a cluster that refuses them for overload.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs `call` until it is not refused for overload, waiting each time for
/// the server's retry-after hint, for up to [`PATIENCE`]: setup and the
/// read-back check what the cluster stores, not whether it has stopped
/// shedding yet.
pub(crate) async fn patiently<T, F, Fut>(call: F) -> Result<T, tonic::Status>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let give_up = Instant::now() + PATIENCE;
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted && Instant::now() < give_up => {
                let wait = chat_client::retry_after(&s)
                    .unwrap_or(Duration::from_millis(100))
                    .clamp(Duration::from_millis(20), Duration::from_secs(1));
                tokio::time::sleep(wait).await;
            }
            r => return r,
        }
    }
}

fn created(r: Result<Result<usize, tonic::Status>, tokio::task::JoinError>) -> anyhow::Result<()> {
    r.context("join")?.map(drop).map_err(|s| {
        anyhow::anyhow!(
            "cannot create a conversation: {:?}: {}",
            s.code(),
            s.message()
        )
    })
}

/// Subscribes everyone, proves the subscriptions deliver, runs the load
/// with its faults, and verifies.
async fn exercise(
    scenario: Scenario,
    args: &Args,
    target: &mut Target,
    ctx: &Arc<Ctx>,
    progress: &report::Progress,
    started_at: SystemTime,
) -> anyhow::Result<Report> {
    let (storm_tx, storm_rx) = watch::channel(0u64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subs = Vec::new();
    for u in 0..ctx.users.len() {
        subs.push(tokio::spawn(subscriber(
            ctx.clone(),
            u,
            storm_rx.clone(),
            stop_rx.clone(),
        )));
    }
    // One probe message per conversation; the load starts once every member
    // has received its conversation's probe.
    progress.note("subscribing every user");
    for (j, c) in ctx.convs.iter().enumerate() {
        ctx.client(c.members[0])
            .send(&c.id, &format!("{}-probe-{j}", ctx.run), b"probe".to_vec())
            .await
            .map_err(|s| anyhow::anyhow!("probe send failed: {:?}: {}", s.code(), s.message()))?;
    }
    let all_subscribed = wait_for(Duration::from_secs(30), || {
        ctx.convs.iter().enumerate().all(|(j, c)| {
            c.members.iter().all(|&m| {
                ctx.delivered_upto[m as usize]
                    .lock()
                    .expect("upto lock poisoned")
                    .contains_key(&(j as u32))
            })
        })
    })
    .await;
    anyhow::ensure!(
        all_subscribed,
        "subscriptions did not deliver the probe messages within 30 s"
    );
    for d in &ctx.deliveries {
        d.lock().expect("deliveries lock poisoned").clear();
    }

    // Capacity probe for the congestion ramp.
    let mut capacity = args.capacity;
    let load = match (scenario, args.concurrency, args.rate) {
        (_, Some(n), _) => Load::Closed(n),
        (Scenario::Congestion, None, None) => {
            let cap = match capacity {
                Some(c) => c,
                None => {
                    progress.note(&format!(
                        "probing capacity: 64 closed-loop senders for {} s",
                        args.probe_secs
                    ));
                    let before = ctx.sends.lock().expect("sends lock poisoned").len();
                    let t0 = Instant::now();
                    drive(
                        ctx,
                        Load::Closed(args.probe_concurrency.max(1)),
                        t0,
                        args.probe_secs,
                    )
                    .await;
                    let acked = ctx.sends.lock().expect("sends lock poisoned")[before..]
                        .iter()
                        .filter(|r| r.outcome.is_ok())
                        .count();
                    let c = acked as f64 / args.probe_secs;
                    anyhow::ensure!(c > 0.0, "the capacity probe got no acks");
                    c
                }
            };
            capacity = Some(cap);
            Load::Ramp {
                from: 0.25 * cap,
                to: args.peak_factor * cap,
                secs: args.duration,
            }
        }
        (_, None, rate) => Load::Constant(rate.unwrap_or(500.0)),
    };
    // Messages of the probe are not part of the run's figures.
    let probe_sends = ctx.sends.lock().expect("sends lock poisoned").len();

    let load_start = Instant::now() + Duration::from_millis(200);
    let typing_before = ctx.typing.snapshot();
    progress.note(&format!(
        "{}: {} for {} s against {}",
        scenario.name(),
        load.describe(),
        args.duration,
        target.describe()
    ));
    let ticker = progress.start(ctx.clone(), load_start, probe_sends);
    let plan = Plan::new(scenario, args);
    let flood_env = match scenario {
        Scenario::Flood => Some(flood::Env {
            key: ctx.key.clone(),
            ca: ctx.gateway_ca.clone(),
            raw: crate::rawgrpc::Gateway::new(&ctx.gateways[0], ctx.gateway_ca.as_deref())?,
            run: ctx.run.clone(),
            user_limit: args.user_limit,
            ip_limit: args.ip_limit,
            connections_per_ip: args.connections_per_ip,
        }),
        _ => None,
    };
    let attack_at = args.attack_at.unwrap_or(args.duration / 2.0);
    let attack_kinds: Vec<String> = if args.attacks.is_empty() {
        flood::KINDS.iter().map(|(k, _)| (*k).to_owned()).collect()
    } else {
        args.attacks.clone()
    };
    let ((faults, mut fault_errors, rollout, mut drilled), attacks) = {
        let traffic = drive(ctx, load, load_start, args.duration);
        let controller = control(target, ctx, &plan, load_start, args, &storm_tx);
        let attackers = async {
            match &flood_env {
                Some(env) => Some(
                    flood::run(
                        env,
                        &attack_kinds,
                        load_start + Duration::from_secs_f64(attack_at),
                        load_start + Duration::from_secs_f64(args.duration),
                    )
                    .await,
                ),
                None => None,
            }
        };
        let ((), out, attacks) = tokio::join!(traffic, controller, attackers);
        (out, attacks)
    };
    ticker.abort();
    let peak_rss_mib = target.peak_rss_mib();
    if scenario == Scenario::Dr
        && let Some(b) = &drilled.backup
    {
        progress
            .note("load over; destroying every store replica's data, restoring from the backup");
        match drill::disaster(target, ctx, b).await {
            Ok(r) => drilled.restored = Some(r),
            Err(e) => fault_errors.push(format!("disaster and restore: {e:#}")),
        }
    }
    let load_end_us = ctx.us(load_start + Duration::from_secs_f64(args.duration));
    progress.note("load over; healing, then reading everything back");
    if let Err(e) = target.heal_all().await {
        progress.note(&format!("cannot heal: {e:#}"));
    }
    let healthy = target.wait_healthy(Duration::from_secs(60)).await;

    // Read everything back, then wait until every member has been delivered
    // its conversations up to the last stored seq (the last acked one when
    // the read-back failed).
    let sends: Vec<SendRecord> =
        ctx.sends.lock().expect("sends lock poisoned")[probe_sends..].to_vec();
    let stored = verify::read_back(ctx).await;
    if let (Some(r), Ok(convs)) = (&drilled.repair, &stored) {
        match drill::missing_on(target, ctx, &r.victim, convs).await {
            Ok(m) => drilled.missing_on_rebuilt = Some(m),
            Err(e) => fault_errors.push(format!("reading the rebuilt replica: {e:#}")),
        }
    }
    let stored_ks: Option<std::collections::HashSet<u64>> = stored.as_ref().ok().map(|convs| {
        convs
            .iter()
            .flatten()
            .filter_map(|m| ctx.k_of(&m.client_msg_id))
            .collect()
    });
    let mut last: HashMap<u32, u64> = HashMap::new();
    match &stored {
        Ok(convs) => {
            for (j, msgs) in convs.iter().enumerate() {
                if let Some(m) = msgs.last() {
                    last.insert(j as u32, m.seq);
                }
            }
        }
        Err(_) => {
            for r in &sends {
                if let Ok(seq) = r.outcome {
                    let e = last.entry(r.conv).or_insert(0);
                    *e = (*e).max(seq);
                }
            }
        }
    }
    let drained = wait_for(Duration::from_secs(30), || {
        last.iter().all(|(&c, &seq)| {
            ctx.convs[c as usize].members.iter().all(|&m| {
                ctx.delivered_upto[m as usize]
                    .lock()
                    .expect("upto lock poisoned")
                    .get(&c)
                    .is_some_and(|&s| s >= seq)
            })
        })
    })
    .await;
    let _ = stop_tx.send(true);
    drop(storm_tx);
    for s in subs {
        let _ = s.await;
    }
    let deliveries: Vec<Vec<Delivery>> = ctx
        .deliveries
        .iter()
        .map(|d| std::mem::take(&mut *d.lock().expect("deliveries lock poisoned")))
        .collect();
    let load_start_us = ctx.us(load_start);
    let typing = ctx.typing.snapshot().since(&typing_before);
    let control_errors = fault_errors.clone();
    let mut notes = fault_errors;
    if !healthy.is_empty() {
        notes.push(format!("not healthy after the run: {}", healthy.join(", ")));
    }
    if !drained {
        notes.push("deliveries had not caught up 30 s after the load ended".into());
    }
    let input = verify::Input {
        ctx,
        sends: &sends,
        stored,
        deliveries: &deliveries,
        load_start_us,
        load_end_us,
        recovery_point_us: drilled.backup.as_ref().map(|b| b.started_us),
    };
    let v = verify::verify(&input);
    let drill = drill::summarize(&drilled, &sends, stored_ks.as_ref(), load_start_us);
    let flood =
        attacks.map(|a| flood::summarize(&sends, load_start_us, attack_at, args, a, &peak_rss_mib));
    Ok(Report::build(report::BuildArgs {
        scenario: scenario.name(),
        target: target.describe(),
        started_at,
        args,
        load,
        capacity,
        verification: v,
        sends: &sends,
        load_start_us,
        faults,
        notes,
        typing,
        control_errors,
        held_back_by_clients: ctx
            .clients
            .iter()
            .map(|c| c.read().expect("client lock poisoned").held_back())
            .sum(),
        peak_rss_mib,
        rollout,
        drill,
        flood,
        users: &ctx.users,
    }))
}

/// What the controller does during the load phase.
struct Plan {
    faults: Vec<FaultSpec>,
    rolling_restart: bool,
    storm_at: Option<f64>,
    backup_at: Option<f64>,
    corrupt_at: Option<f64>,
    restart_after: f64,
    canary: Option<CanaryDrill>,
}

/// A router rollout under load: the plan is started, then the canary
/// router (with `faults` for a bad release).
struct CanaryDrill {
    at_s: f64,
    steps: Vec<u32>,
    interval: Duration,
    router_args: Vec<String>,
}

impl Plan {
    fn new(scenario: Scenario, args: &Args) -> Self {
        let mut faults = args.faults.clone();
        faults.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        Self {
            faults,
            rolling_restart: scenario == Scenario::RollingRestart,
            storm_at: (scenario == Scenario::ReconnectStorm)
                .then(|| args.storm_at.unwrap_or(args.duration / 3.0)),
            backup_at: (scenario == Scenario::Dr)
                .then(|| args.drill_at.unwrap_or(args.duration / 2.0)),
            corrupt_at: (scenario == Scenario::CorruptReplica)
                .then(|| args.drill_at.unwrap_or(args.duration / 3.0)),
            restart_after: args.restart_after,
            canary: scenario.is_canary().then(|| {
                let mut router_args = vec!["--release".to_owned(), CANARY_RELEASE.to_owned()];
                if scenario == Scenario::CanaryBadRelease {
                    router_args.extend([
                        "--inject-error-rate".to_owned(),
                        args.canary_error_rate.to_string(),
                        "--inject-latency-ms".to_owned(),
                        args.canary_latency_ms.to_string(),
                    ]);
                }
                CanaryDrill {
                    at_s: args.canary_at,
                    steps: args.canary_steps.clone(),
                    interval: Duration::from_secs_f64(args.canary_interval),
                    router_args,
                }
            }),
        }
    }
}

/// Release label of the drills' canary router.
const CANARY_RELEASE: &str = "canary";

/// Starts the rollout and the canary router, then follows the plan until
/// it is promoted or aborted, or the load phase ends.
async fn canary(
    target: &mut Target,
    d: &CanaryDrill,
    start: Instant,
    args: &Args,
) -> anyhow::Result<rollout::RolloutRecord> {
    use chatctl::plan;
    tokio::time::sleep_until((start + Duration::from_secs_f64(d.at_s)).into()).await;
    // Wall-clock time of the load's start, to place the plan's decisions.
    let epoch_ms = plan::now_ms() - start.elapsed().as_millis() as i64;
    let store = target.store_client()?;
    let begun = chat_rollout::StartArgs {
        id: format!("drill-{}", plan::now_ms()),
        service: "router".into(),
        canary: CANARY_RELEASE.into(),
        steps: d.steps.clone(),
        interval_ms: d.interval.as_millis() as u64,
        thresholds: chat_rollout::default_thresholds(),
    };
    plan::update(&store, "router", |current| {
        chat_rollout::start(begun.clone(), current, plan::now_ms())
    })
    .await?;
    target.start_router("router-canary", &d.router_args)?;
    let canary_started_s = start.elapsed().as_secs_f64();
    let end = start + Duration::from_secs_f64(args.duration);
    let mut last = None;
    let mut finished_s = None;
    while Instant::now() < end {
        if let Ok(Some((_, p))) = plan::read(&store, "router").await {
            let done = !chat_rollout::in_progress(&p);
            last = Some(p);
            if done {
                finished_s = Some(start.elapsed().as_secs_f64());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let plan = match last {
        Some(p) => p,
        None => plan::read(&store, "router")
            .await?
            .map(|(_, p)| p)
            .context("the rollout plan vanished")?,
    };
    Ok(rollout::RolloutRecord {
        plan,
        epoch_ms,
        canary_started_s,
        finished_s,
        interval_s: d.interval.as_secs_f64(),
    })
}

/// Injects the planned faults at their times (and restarts what they
/// killed), restarts every service in turn for a rolling restart, or
/// reconnects every client for a storm. Returns what was done and any
/// failures to do it.
async fn control(
    target: &mut Target,
    ctx: &Arc<Ctx>,
    plan: &Plan,
    start: Instant,
    args: &Args,
    storm: &watch::Sender<u64>,
) -> (
    Vec<FaultRecord>,
    Vec<String>,
    Option<rollout::RolloutRecord>,
    drill::DrillRecord,
) {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    let mut rollout = None;
    let mut drilled = drill::DrillRecord::default();
    let at = |s: f64| start + Duration::from_secs_f64(s);
    let since = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    // (time, service) of killed services to start again.
    let mut restarts: Vec<(f64, String)> = Vec::new();
    let mut faults = plan.faults.iter().peekable();
    loop {
        let next_fault = faults.peek().map(|f| f.at_s);
        let next_restart = restarts.iter().map(|r| r.0).min_by(f64::total_cmp);
        let next = match (next_fault, next_restart) {
            (None, None) => break,
            (a, b) => a.unwrap_or(f64::MAX).min(b.unwrap_or(f64::MAX)),
        };
        tokio::time::sleep_until(at(next).into()).await;
        if next_fault == Some(next) {
            let f = faults.next().expect("peeked");
            match target.inject(f.kind).await {
                Ok(victim) => {
                    if f.kind.is_kill() {
                        restarts.push((since(Instant::now()) + plan.restart_after, victim.clone()));
                    }
                    done.push(FaultRecord::new(
                        since(Instant::now()),
                        f.kind.to_string(),
                        victim,
                    ));
                }
                Err(e) => errors.push(format!("fault {}@{}: {e:#}", f.kind, f.at_s)),
            }
        } else {
            let i = restarts
                .iter()
                .position(|r| r.0 == next)
                .expect("a restart is due");
            let (_, name) = restarts.swap_remove(i);
            match target.restart(&name).await {
                Ok(()) => done.push(FaultRecord::new(
                    since(Instant::now()),
                    "start".into(),
                    name,
                )),
                Err(e) => errors.push(format!("restarting {name}: {e:#}")),
            }
        }
    }
    if let Some(s) = plan.storm_at {
        tokio::time::sleep_until(at(s).into()).await;
        // New clients (new connections) for everyone, then every subscriber
        // resubscribes from its cursors at once.
        for (u, cell) in ctx.clients.iter().enumerate() {
            match ctx.client_for(u) {
                Ok(c) => *cell.write().expect("client lock poisoned") = c,
                Err(e) => errors.push(format!("reconnect storm: {e:#}")),
            }
        }
        let _ = storm.send(1);
        done.push(FaultRecord::new(
            since(Instant::now()),
            "reconnect-storm".into(),
            format!("all {} clients", ctx.users.len()),
        ));
    }
    if let Some(s) = plan.backup_at {
        tokio::time::sleep_until(at(s).into()).await;
        match drill::backup(target, ctx).await {
            Ok(b) => {
                done.push(FaultRecord::new(
                    since(Instant::now()),
                    "backup".into(),
                    format!("raft index {}, {} bytes", b.index, b.bytes),
                ));
                drilled.backup = Some(b);
            }
            Err(e) => errors.push(format!("backup: {e:#}")),
        }
    }
    if let Some(s) = plan.corrupt_at {
        tokio::time::sleep_until(at(s).into()).await;
        match drill::corrupt_and_rebuild(target, start).await {
            Ok(r) => {
                done.push(FaultRecord::new(
                    r.damaged_s,
                    "corrupt-follower".into(),
                    r.victim.clone(),
                ));
                drilled.repair = Some(r);
            }
            Err(e) => errors.push(format!("corrupt-replica: {e:#}")),
        }
    }
    if let Some(d) = &plan.canary {
        match canary(target, d, start, args).await {
            Ok(r) => rollout = Some(r),
            Err(e) => errors.push(format!("canary rollout: {e:#}")),
        }
    }
    if plan.rolling_restart {
        tokio::time::sleep_until(at(2.0_f64.min(args.duration / 4.0)).into()).await;
        for (i, tier) in [Tier::Store, Tier::Router, Tier::Gateway]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs_f64(plan.restart_after)).await;
            }
            match target.rolling_restart(tier).await {
                Ok(log) => {
                    for step in log.steps {
                        let kind = if step.what.starts_with("was the leader") {
                            "move-leader"
                        } else if step.what == "restarting" {
                            "restart"
                        } else {
                            continue;
                        };
                        done.push(FaultRecord::new(since(step.at), kind.into(), step.instance));
                    }
                }
                Err(e) => {
                    errors.push(format!("rolling restart of the {}s: {e:#}", tier.name()));
                    break;
                }
            }
        }
        if since(Instant::now()) >= args.duration {
            errors.push("the rolling restart outlasted --duration".into());
        }
    }
    (done, errors, rollout, drilled)
}

/// Whether a fault of this kind (as named in the report) takes the store
/// leader away, so the unavailability SLO applies.
fn leader_fault(kind: &str) -> bool {
    fault::KINDS
        .iter()
        .any(|(n, k)| *n == kind && k.hits_store_leader())
}
