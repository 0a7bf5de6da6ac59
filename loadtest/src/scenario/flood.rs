//! `flood`: a DDoS drill at the public edge. Well-behaved users keep sending
//! at the run's rate for the whole load phase; from `--attack-at` to its end
//! attackers hit the same gateways from other loopback addresses
//! (127.0.0.10 and up, one per attack, so the per-IP limits see them apart
//! from the users on 127.0.0.1). Each attack is bounded in rate and stops
//! with the load. The report compares the users' goodput and send→ack p99
//! under attack with the first half, counts how the gateway answered each
//! attack, and shows the gateways' peak memory.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_proto::chat::v1 as cpb;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use crate::rawgrpc;

/// The attacks, by name, and what each does.
pub const KINDS: [(&str, &str); 6] = [
    (
        "hot-user",
        "one authenticated user sending at 20x its per-user limit and opening twice the subscriptions one user may hold",
    ),
    (
        "many-users",
        "500 users from one address, each within its own limit, together at 4x the per-IP limit",
    ),
    (
        "idle-connections",
        "connections opened and never spoken on, past the per-IP connection cap",
    ),
    (
        "rapid-reset",
        "HTTP/2 streams opened and reset at once (CVE-2023-44487)",
    ),
    (
        "malformed",
        "broken HTTP/2 frames, protobuf that does not decode, and bodies far over the size limit",
    ),
    (
        "slow-readers",
        "subscriptions that never read while their conversation fills",
    ),
];

/// Subscriptions one user may hold on one gateway (the gateway's
/// `MAX_SESSIONS_PER_USER`).
const SESSIONS_PER_USER: usize = 16;
/// Identities of `many-users`.
const MANY: usize = 500;
/// Connections `idle-connections` opens.
const IDLE: usize = 1_000;
/// Streams `rapid-reset` opens and resets a second, at most, sent in a
/// burst every `RESET_BURST_EVERY` (100 streams a burst).
const RESETS_PER_SECOND: u64 = 2_000;
const RESET_BURST_EVERY: Duration = Duration::from_millis(50);
/// Subscribers of `slow-readers`, and the body size its sender fills them
/// with.
const SLOW: usize = 20;
const SLOW_BODY: usize = 60_000;

/// What the attacks need to know about the deployment.
#[derive(Clone)]
pub struct Env {
    pub key: chat_auth::TokenKey,
    /// The gateways' public CA (None: plaintext).
    pub ca: Option<Vec<u8>>,
    /// The gateway attacked (`authority`: host:port, as published), as
    /// raw connections reach it.
    pub raw: rawgrpc::Gateway,
    pub run: String,
    /// The gateways' per-user and per-IP call limits (calls a second).
    pub user_limit: u32,
    pub ip_limit: u32,
    /// The gateways' per-IP connection cap.
    pub connections_per_ip: u32,
}

/// How the gateway answered one attack.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Tally {
    pub kind: String,
    pub source: String,
    /// Calls, streams or connections the attack made.
    pub attempts: u64,
    /// Of those, how many the gateway took on.
    pub accepted: u64,
    /// How the rest ended, by gRPC code or by what the connection did.
    pub refused: BTreeMap<String, u64>,
    /// What a well-defended edge does with this attack.
    pub expectation: String,
    pub as_expected: bool,
    pub notes: Vec<String>,
}

/// Counts shared by an attack's tasks.
#[derive(Default)]
struct Counts {
    attempts: AtomicU64,
    accepted: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    notes: Mutex<Vec<String>>,
}

impl Counts {
    fn attempt(&self) {
        self.attempts.fetch_add(1, Relaxed);
    }

    fn ok(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    fn refused(&self, how: impl Into<String>) {
        *self
            .refused
            .lock()
            .expect("counts poisoned")
            .entry(how.into())
            .or_default() += 1;
    }

    fn status(&self, r: &Result<(), tonic::Status>) {
        match r {
            Ok(()) => self.ok(),
            Err(s) => {
                if s.code() == tonic::Code::Unknown {
                    self.note(format!("Unknown: {}", s.message()));
                }
                self.refused(format!("{:?}", s.code()));
            }
        }
    }

    fn note(&self, n: String) {
        let mut notes = self.notes.lock().expect("counts poisoned");
        if notes.len() < 5 {
            notes.push(n);
        }
    }

    fn refused_as(&self, how: &str) -> u64 {
        self.refused
            .lock()
            .expect("counts poisoned")
            .get(how)
            .copied()
            .unwrap_or(0)
    }

    fn tally(&self, kind: &str, source: IpAddr, expectation: String, as_expected: bool) -> Tally {
        Tally {
            kind: kind.into(),
            source: source.to_string(),
            attempts: self.attempts.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            refused: self.refused.lock().expect("counts poisoned").clone(),
            expectation,
            as_expected,
            notes: self.notes.lock().expect("counts poisoned").clone(),
        }
    }
}

/// The loopback address the `i`th attack comes from.
pub fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8))
}

/// Runs the attacks named in `kinds` from `start` until `end`, all at once.
pub async fn run(env: &Env, kinds: &[String], start: Instant, end: Instant) -> Vec<Tally> {
    tokio::time::sleep_until(start.into()).await;
    let attacks = kinds.iter().map(|k| {
        let i = KINDS.iter().position(|(n, _)| n == k).unwrap_or(0);
        attack(env, k, source(i), end)
    });
    futures::future::join_all(attacks).await
}

async fn attack(env: &Env, kind: &str, src: IpAddr, end: Instant) -> Tally {
    let counts = Arc::new(Counts::default());
    let secs = end.saturating_duration_since(Instant::now()).as_secs_f64();
    let outcome = match kind {
        "hot-user" => hot_user(env, src, end, &counts).await,
        "many-users" => many_users(env, src, end, &counts).await,
        "idle-connections" => idle_connections(env, src, end, &counts).await,
        "rapid-reset" => rapid_reset(env, src, end, &counts).await,
        "malformed" => malformed(env, src, end, &counts).await,
        "slow-readers" => slow_readers(env, src, end, &counts).await,
        other => Err(anyhow::anyhow!("no attack named {other}")),
    };
    let (expectation, met) = match outcome {
        Ok(()) => judge(env, kind, secs, &counts),
        Err(e) => ("the attack could be carried out".into(), {
            counts.note(format!("{e:#}"));
            false
        }),
    };
    counts.tally(kind, src, expectation, met)
}

/// What the gateway should have done with `kind`, and whether it did.
fn judge(env: &Env, kind: &str, secs: f64, c: &Counts) -> (String, bool) {
    let accepted = c.accepted.load(Relaxed) as f64;
    let exhausted = c.refused_as("ResourceExhausted");
    match kind {
        "hot-user" => {
            let allowed = f64::from(env.user_limit) * (secs + 2.0) * 1.1;
            (
                format!(
                    "calls past the user's limit refused RESOURCE_EXHAUSTED (at most {allowed:.0} taken on), subscriptions past {SESSIONS_PER_USER} refused"
                ),
                exhausted > 0 && accepted <= allowed,
            )
        }
        "many-users" => {
            let allowed = f64::from(env.ip_limit) * (secs + 2.0) * 1.1;
            (
                format!(
                    "calls past the per-IP limit refused RESOURCE_EXHAUSTED (at most {allowed:.0} taken on)"
                ),
                exhausted > 0 && accepted <= allowed,
            )
        }
        "idle-connections" => (
            format!(
                "connections past the per-IP cap ({}) closed at once; none held past the gateway's silence timeout",
                env.connections_per_ip
            ),
            c.refused_as("closed at once") > 0 && c.refused_as("held past the silence timeout") == 0,
        ),
        "rapid-reset" => (
            "connections that reset streams en masse closed by the gateway (GOAWAY)".into(),
            c.refused_as("connection closed by the gateway") > 0,
        ),
        "malformed" => {
            let bad = ["Unknown", "Unavailable", "held open"]
                .iter()
                .map(|k| c.refused_as(k))
                .sum::<u64>();
            (
                "every broken request refused with a clean gRPC error or the connection closed; none taken on".into(),
                accepted == 0.0 && c.attempts.load(Relaxed) > 0 && bad == 0,
            )
        }
        "slow-readers" => (
            "the subscriptions held and their conversation filled (the gateways' memory is in the report)".into(),
            accepted > 0.0,
        ),
        _ => (String::new(), false),
    }
}

/// An idle stream of work at `per_second` until `end`: calls `one` that
/// many times a second (in 10 ms steps), each call on a task of its own,
/// at most `in_flight` at once.
async fn paced<F, Fut>(per_second: f64, end: Instant, in_flight: usize, one: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let places = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let started = Instant::now();
    let mut launched = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < end {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * per_second) as u64;
        while launched < due && Instant::now() < end {
            let Ok(place) = places.clone().try_acquire_owned() else {
                // The attacker's own cap: it does not queue without bound.
                launched = due;
                break;
            };
            let work = one(launched);
            tasks.spawn(async move {
                work.await;
                drop(place);
            });
            launched += 1;
        }
        while tasks.try_join_next().is_some() {}
    }
    let grace = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            () = &mut grace => { tasks.abort_all(); break }
        }
    }
}

fn endpoint(env: &Env, src: IpAddr) -> anyhow::Result<Endpoint> {
    let scheme = if env.ca.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{}", env.raw.authority))?
        .local_address(Some(src))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(ca) = &env.ca {
        ep = ep.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )?;
    }
    Ok(ep)
}

fn chat(env: &Env, src: IpAddr) -> anyhow::Result<cpb::chat_client::ChatClient<Channel>> {
    Ok(cpb::chat_client::ChatClient::new(
        endpoint(env, src)?.connect_lazy(),
    ))
}

fn bearer(env: &Env, user: &str) -> Auth {
    format!("Bearer {}", env.key.sign_for(user, 3600))
        .parse()
        .expect("a token is ASCII")
}

fn with_auth<T>(msg: T, auth: &Auth) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", auth.clone());
    r
}

type Auth = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// An attacker `{run}-{name}`: its token, a client from `src`, and its
/// own conversation `{run}-{name}` with `members`.
async fn attacker(
    env: &Env,
    src: IpAddr,
    name: &str,
    members: Vec<String>,
) -> anyhow::Result<(Auth, cpb::chat_client::ChatClient<Channel>, String)> {
    let id = format!("{}-{name}", env.run);
    let auth = bearer(env, &id);
    let mut client = chat(env, src)?;
    create(&mut client, &auth, &id, members).await?;
    Ok((auth, client, id))
}

async fn create(
    client: &mut cpb::chat_client::ChatClient<Channel>,
    auth: &Auth,
    id: &str,
    members: Vec<String>,
) -> anyhow::Result<()> {
    let req = cpb::CreateConversationRequest {
        conversation_id: id.into(),
        members,
    };
    match client.create_conversation(with_auth(req, auth)).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(anyhow::anyhow!(
            "creating {id}: {:?}: {}",
            s.code(),
            s.message()
        )),
    }
}

/// One Send of `body_bytes`, its outcome counted in `c`.
async fn send_counted(
    client: &mut cpb::chat_client::ChatClient<Channel>,
    auth: &Auth,
    conversation_id: String,
    client_msg_id: String,
    body_bytes: usize,
    c: &Counts,
) {
    let req = cpb::SendRequest {
        conversation_id,
        client_msg_id,
        body: vec![b'.'; body_bytes],
    };
    c.status(&client.send(with_auth(req, auth)).await.map(|_| ()));
}

/// (a) One user far over its limit, sending and subscribing.
async fn hot_user(env: &Env, src: IpAddr, end: Instant, c: &Arc<Counts>) -> anyhow::Result<()> {
    let (auth, mut client, conv) = attacker(env, src, "hot", Vec::new()).await?;
    // Twice the subscriptions one user may hold, kept open, never read.
    let mut held = Vec::new();
    for _ in 0..2 * SESSIONS_PER_USER {
        c.attempt();
        let req = with_auth(cpb::SubscribeRequest::default(), &auth);
        match client.subscribe(req).await {
            Ok(s) => {
                c.ok();
                held.push(s);
            }
            Err(s) => c.refused(format!("{:?}", s.code())),
        }
    }
    let rate = 20.0 * f64::from(env.user_limit);
    let run = env.run.clone();
    paced(rate, end, 512, |k| {
        let (mut client, auth, c, conv) = (client.clone(), auth.clone(), c.clone(), conv.clone());
        let cmid = format!("{run}-hot-{k}");
        async move {
            c.attempt();
            send_counted(&mut client, &auth, conv, cmid, 64, &c).await;
        }
    })
    .await;
    drop(held);
    Ok(())
}

/// (b) Many users behind one address, each within its own limit.
async fn many_users(env: &Env, src: IpAddr, end: Instant, c: &Arc<Counts>) -> anyhow::Result<()> {
    let users: Vec<String> = (0..MANY).map(|i| format!("{}-many-{i}", env.run)).collect();
    let auths: Arc<Vec<_>> = Arc::new(users.iter().map(|u| bearer(env, u)).collect());
    let mut client = chat(env, src)?;
    // One conversation per ten users, made by its first member.
    for (g, members) in users.chunks(10).enumerate() {
        let id = format!("{}-many-{g}", env.run);
        create(&mut client, &auths[g * 10], &id, members[1..].to_vec()).await?;
    }
    let rate = 4.0 * f64::from(env.ip_limit);
    let run = env.run.clone();
    paced(rate, end, 512, |k| {
        let (mut client, auths, c) = (client.clone(), auths.clone(), c.clone());
        let u = (k as usize) % MANY;
        let conv = format!("{run}-many-{}", u / 10);
        let cmid = format!("{run}-many-{k}");
        async move {
            c.attempt();
            send_counted(&mut client, &auths[u], conv, cmid, 64, &c).await;
        }
    })
    .await;
    Ok(())
}

/// Whether the peer closes `s` within `within` (reading and dropping what
/// it sends).
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// (c) Connections opened and never spoken on.
async fn idle_connections(
    env: &Env,
    src: IpAddr,
    end: Instant,
    c: &Arc<Counts>,
) -> anyhow::Result<()> {
    let to = env.raw.addr();
    // Past the per-IP cap, so some are closed at once; the rest are held
    // until the gateway closes them or the load ends.
    let n = IDLE.max(env.connections_per_ip as usize + 100);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        if Instant::now() >= end {
            break;
        }
        c.attempt();
        let mut s = match rawgrpc::tcp_from(src, to).await {
            Ok(s) => s,
            Err(e) => {
                c.refused("connect failed");
                c.note(format!("connect: {e}"));
                continue;
            }
        };
        let c = c.clone();
        let opened = Instant::now();
        tasks.spawn(async move {
            if closed_within(&mut s, Duration::from_millis(200)).await {
                c.refused("closed at once");
                return;
            }
            c.ok();
            let left = end.saturating_duration_since(Instant::now());
            if closed_within(&mut s, left).await {
                let held = opened.elapsed();
                if held > chat_resilience::incoming::SILENCE + Duration::from_secs(5) {
                    c.refused("held past the silence timeout");
                } else {
                    c.refused("closed by the gateway when silent");
                }
            }
        });
        // Within the gateway's accept rate.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// (d) HTTP/2 rapid reset: streams opened and cancelled at once, as fast as
/// the pace allows, on one connection after another.
async fn rapid_reset(env: &Env, src: IpAddr, end: Instant, c: &Arc<Counts>) -> anyhow::Result<()> {
    let auth = format!(
        "Bearer {}",
        env.key.sign_for(&format!("{}-reset", env.run), 3600)
    );
    let started = Instant::now();
    let mut sent = 0u64;
    while Instant::now() < end {
        let io = match env.raw.connect(src).await {
            Ok(io) => io,
            Err(e) => {
                c.refused("connect failed");
                c.note(format!("connect: {e:#}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (mut h2, conn) = match h2::client::handshake(io).await {
            Ok(p) => p,
            Err(e) => {
                c.refused("handshake refused");
                c.note(format!("handshake: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let driver = tokio::spawn(conn);
        // In bursts, as the attack is made in the wild: a burst of opened
        // and reset streams lands in one read, before the server can take
        // any of them on.
        let mut tick = tokio::time::interval(RESET_BURST_EVERY);
        let closed = 'conn: loop {
            if Instant::now() >= end {
                break false;
            }
            tick.tick().await;
            let due = (started.elapsed().as_secs_f64() * RESETS_PER_SECOND as f64) as u64;
            while sent < due {
                h2 = match h2.ready().await {
                    Ok(h) => h,
                    Err(_) => break 'conn true,
                };
                let req = env.raw.request("/chat.v1.Chat/Send", &auth);
                match h2.send_request(req, false) {
                    Ok((_response, mut stream)) => {
                        stream.send_reset(h2::Reason::CANCEL);
                        c.attempt();
                        sent += 1;
                    }
                    Err(_) => break 'conn true,
                }
            }
            if driver.is_finished() {
                break true;
            }
        };
        if closed {
            c.refused("connection closed by the gateway");
        }
        driver.abort();
    }
    Ok(())
}

/// (e) Malformed and oversized requests.
async fn malformed(env: &Env, src: IpAddr, end: Instant, c: &Arc<Counts>) -> anyhow::Result<()> {
    let (auth, _, conv) = attacker(env, src, "malformed", Vec::new()).await?;
    let huge = chat(env, src)?
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let env2 = env.clone();
    paced(30.0, end, 16, |k| {
        let (c, env, conv, auth) = (c.clone(), env2.clone(), conv.clone(), auth.clone());
        let mut huge = huge.clone();
        async move {
            c.attempt();
            match k % 3 {
                // An HTTP/2 connection whose first frame after the preface
                // is garbage: the gateway must close it.
                0 => match env.raw.connect(src).await {
                    Ok(mut io) => {
                        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                        // A 16 MiB frame of an unknown type on stream 0,
                        // then noise.
                        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0x01, 0x00, 0, 0, 0, 0]);
                        bytes.extend_from_slice(&[0xAB; 512]);
                        let _ = io.write_all(&bytes).await;
                        if closed_within(&mut io, Duration::from_secs(5)).await {
                            c.refused("connection closed by the gateway");
                        } else {
                            c.refused("held open");
                        }
                    }
                    Err(e) => {
                        c.refused("connect failed");
                        c.note(format!("connect: {e:#}"));
                    }
                },
                // A body of 8 MiB.
                1 => {
                    let req = cpb::SendRequest {
                        conversation_id: conv,
                        client_msg_id: format!("big-{k}"),
                        body: vec![b'x'; 8 << 20],
                    };
                    c.status(&huge.send(with_auth(req, &auth)).await.map(|_| ()));
                }
                // A gRPC message that is not protobuf.
                _ => c.status(&bad_protobuf(&env, src, &auth).await),
            }
        }
    })
    .await;
    Ok(())
}

/// A Send whose message does not decode.
async fn bad_protobuf(env: &Env, src: IpAddr, auth: &Auth) -> Result<(), tonic::Status> {
    let unavailable = |e: String| tonic::Status::unavailable(e);
    let io = env
        .raw
        .connect(src)
        .await
        .map_err(|e| unavailable(format!("{e:#}")))?;
    let (h2, conn) = h2::client::handshake(io)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let mut h2 = h2.ready().await.map_err(|e| unavailable(e.to_string()))?;
    let auth = auth.to_str().unwrap_or_default();
    let (response, mut stream) = h2
        .send_request(env.raw.request("/chat.v1.Chat/Send", auth), false)
        .map_err(|e| unavailable(e.to_string()))?;
    // Field 1 declared as 200 bytes long, then 3 bytes.
    let _ = stream.send_data(rawgrpc::frame(&[0x0a, 0xc8, 0x01, 1, 2, 3]), true);
    let result = async {
        let resp = response.await.map_err(|e| unavailable(e.to_string()))?;
        let status = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
        };
        let (head, mut body) = resp.into_parts();
        if let Some(code) = status(&head.headers) {
            return grpc_result(code);
        }
        while body.data().await.is_some() {}
        let trailers = body
            .trailers()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        grpc_result(trailers.as_ref().and_then(status).unwrap_or(2))
    };
    let r = tokio::time::timeout(Duration::from_secs(5), result)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in 5 s")));
    driver.abort();
    r
}

fn grpc_result(code: i32) -> Result<(), tonic::Status> {
    match tonic::Code::from(code) {
        tonic::Code::Ok => Ok(()),
        c => Err(tonic::Status::new(c, "")),
    }
}

/// (f) Subscribers that never read, and a sender filling their
/// conversation within its own limits.
async fn slow_readers(env: &Env, src: IpAddr, end: Instant, c: &Arc<Counts>) -> anyhow::Result<()> {
    let readers: Vec<String> = (0..SLOW).map(|i| format!("{}-slow-{i}", env.run)).collect();
    // The sender is the conversation's maker.
    let (auth, client, conv) = attacker(env, src, "slow", readers.clone()).await?;
    // Each reader on a connection of its own, its stream's window never
    // given back.
    let mut held = Vec::new();
    for r in &readers {
        c.attempt();
        let io = env.raw.connect(src).await?;
        let (h2, conn) = h2::client::Builder::new()
            .initial_window_size(65_535)
            .handshake::<_, Bytes>(io)
            .await?;
        let driver = tokio::spawn(conn);
        let mut h2 = h2.ready().await?;
        let token = format!("Bearer {}", env.key.sign_for(r, 3600));
        let (response, mut stream) =
            h2.send_request(env.raw.request("/chat.v1.Chat/Subscribe", &token), false)?;
        stream.send_data(
            rawgrpc::frame(&cpb::SubscribeRequest::default().encode_to_vec()),
            true,
        )?;
        match tokio::time::timeout(Duration::from_secs(5), response).await {
            Ok(Ok(resp)) if resp.status() == http::StatusCode::OK => {
                held.push((h2, stream, resp, driver));
            }
            Ok(Ok(resp)) => {
                c.refused(format!("HTTP {}", resp.status()));
                driver.abort();
            }
            Ok(Err(e)) => {
                c.refused("stream refused");
                c.note(format!("subscribe: {e}"));
                driver.abort();
            }
            Err(_) => {
                c.refused("no answer");
                driver.abort();
            }
        }
    }
    // The sender, within its call limit and the gateways' default byte
    // budget (1 MiB a second).
    let per_second = (f64::from(env.user_limit) * 0.8).min(16.0);
    let run = env.run.clone();
    let sent = Arc::new(Counts::default());
    paced(per_second, end, 64, |k| {
        let (mut client, auth, sent, conv) =
            (client.clone(), auth.clone(), sent.clone(), conv.clone());
        let cmid = format!("{run}-slow-{k}");
        async move {
            send_counted(&mut client, &auth, conv, cmid, SLOW_BODY, &sent).await;
        }
    })
    .await;
    let filled = sent.accepted.load(Relaxed);
    c.accepted
        .store(if filled > 0 { held.len() as u64 } else { 0 }, Relaxed);
    c.note(format!(
        "{} subscriptions held unread while {filled} messages of {} kB went to them ({} refused)",
        held.len(),
        SLOW_BODY / 1000,
        sent.refused
            .lock()
            .expect("counts poisoned")
            .values()
            .sum::<u64>()
    ));
    for (_, _, _, driver) in held {
        driver.abort();
    }
    Ok(())
}

/// The drill's findings: the users' service before and under attack, the
/// gateways' memory, and how each attack was answered.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub attack_at_s: f64,
    /// Users' acked sends a second, scheduled from 1 s into the load until
    /// the attack, and from 1 s into the attack until the end.
    pub goodput_before: f64,
    pub goodput_during: f64,
    pub goodput_ratio: f64,
    /// Users' send→ack p99 in the same windows.
    pub p99_before_ms: f64,
    pub p99_during_ms: f64,
    pub p99_ratio: f64,
    /// The highest peak resident memory of a gateway, MiB (local target).
    pub gateway_peak_rss_mib: Option<f64>,
    pub attacks: Vec<Tally>,
    /// The SLOs' limits.
    pub max_p99_ratio: f64,
    pub max_gateway_rss_mib: f64,
}

/// Goodput and p99 of `sends` scheduled in `[from_us, to_us)`.
fn window(sends: &[super::SendRecord], from_us: u64, to_us: u64) -> (f64, f64) {
    let mut lat: Vec<u64> = sends
        .iter()
        .filter(|r| r.outcome.is_ok() && (from_us..to_us).contains(&r.intended_us))
        .map(|r| r.done_us.saturating_sub(r.intended_us))
        .collect();
    lat.sort_unstable();
    let secs = to_us.saturating_sub(from_us) as f64 / 1e6;
    let goodput = if secs > 0.0 {
        lat.len() as f64 / secs
    } else {
        0.0
    };
    let p99 = lat
        .get(((lat.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .map_or(0.0, |&us| us as f64 / 1000.0);
    (goodput, p99)
}

pub fn summarize(
    sends: &[super::SendRecord],
    load_start_us: u64,
    attack_at_s: f64,
    args: &super::Args,
    attacks: Vec<Tally>,
    peak_rss_mib: &BTreeMap<String, f64>,
) -> Summary {
    let duration_s = args.duration;
    let us = |s: f64| load_start_us + (s * 1e6) as u64;
    let (goodput_before, p99_before_ms) = window(sends, us(1.0), us(attack_at_s));
    let (goodput_during, p99_during_ms) = window(sends, us(attack_at_s + 1.0), us(duration_s));
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    Summary {
        attack_at_s,
        goodput_before: goodput_before.round(),
        goodput_during: goodput_during.round(),
        goodput_ratio: ratio(goodput_during, goodput_before),
        p99_before_ms,
        p99_during_ms,
        p99_ratio: ratio(p99_during_ms, p99_before_ms),
        gateway_peak_rss_mib: peak_rss_mib
            .iter()
            .filter(|(name, _)| name.starts_with("gateway"))
            .map(|(_, &m)| m)
            .reduce(f64::max),
        attacks,
        max_p99_ratio: args.max_p99_ratio,
        max_gateway_rss_mib: args.max_gateway_rss_mib,
    }
}

pub fn slos(s: &Summary) -> BTreeMap<String, super::report::Slo> {
    use super::report::Slo;
    let mut slo = BTreeMap::new();
    slo.insert(
        "flood_goodput_ratio".into(),
        Slo {
            target: ">= 0.95 of the users' goodput before the attack".into(),
            actual: s.goodput_ratio.into(),
            pass: s.goodput_ratio >= 0.95,
        },
    );
    slo.insert(
        "flood_p99_ratio".into(),
        Slo {
            target: format!(
                "<= {} x the users' send→ack p99 before the attack",
                s.max_p99_ratio
            ),
            actual: s.p99_ratio.into(),
            pass: s.p99_ratio <= s.max_p99_ratio,
        },
    );
    if let Some(rss) = s.gateway_peak_rss_mib {
        slo.insert(
            "flood_gateway_peak_rss_mib".into(),
            Slo {
                target: format!("<= {} MiB", s.max_gateway_rss_mib),
                actual: rss.into(),
                pass: rss <= s.max_gateway_rss_mib,
            },
        );
    }
    let missed: Vec<&str> = s
        .attacks
        .iter()
        .filter(|a| !a.as_expected)
        .map(|a| a.kind.as_str())
        .collect();
    slo.insert(
        "flood_attacks_answered".into(),
        Slo {
            target: "every attack answered as a defended edge answers it".into(),
            actual: if missed.is_empty() {
                "yes".into()
            } else {
                format!("not: {}", missed.join(", ")).into()
            },
            pass: missed.is_empty() && !s.attacks.is_empty(),
        },
    );
    slo
}

/// The findings as lines, for the summary and the Markdown report.
pub fn lines(s: &Summary) -> Vec<String> {
    let mut out = vec![format!(
        "users under attack from {:.0} s: goodput {:.0}/s before, {:.0}/s during (ratio {:.3}); send→ack p99 {:.1} ms before, {:.1} ms during (ratio {:.2}); gateway peak RSS {}",
        s.attack_at_s,
        s.goodput_before,
        s.goodput_during,
        s.goodput_ratio,
        s.p99_before_ms,
        s.p99_during_ms,
        s.p99_ratio,
        s.gateway_peak_rss_mib
            .map_or("not measured".into(), |m| format!("{m:.0} MiB"))
    )];
    for a in &s.attacks {
        let refused: Vec<String> = a.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push(format!(
            "attack {} from {}: {} made, {} taken on, {}; {}: {}",
            a.kind,
            a.source,
            a.attempts,
            a.accepted,
            if refused.is_empty() {
                "none refused".into()
            } else {
                refused.join(", ")
            },
            if a.as_expected {
                "as expected"
            } else {
                "NOT as expected"
            },
            a.expectation
        ));
        for n in &a.notes {
            out.push(format!("  {}: {n}", a.kind));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(intended_ms: u64, took_ms: u64) -> super::super::SendRecord {
        super::super::SendRecord {
            conv: 0,
            sender: 0,
            k: intended_ms,
            intended_us: intended_ms * 1000,
            started_us: intended_ms * 1000,
            done_us: (intended_ms + took_ms) * 1000,
            outcome: Ok(1),
        }
    }

    #[test]
    fn users_under_attack_are_compared_with_themselves_before_it() {
        // 100 sends a second for 10 s: 5 ms each before 5 s; from 5 s one in
        // ten takes 50 ms and one in five is refused.
        let mut sends = Vec::new();
        for i in 0..1_000u64 {
            let t = i * 10;
            if t < 5_000 {
                sends.push(acked(t, 5));
            } else if i % 5 == 0 {
                sends.push(super::super::SendRecord {
                    outcome: Err(tonic::Code::ResourceExhausted),
                    ..acked(t, 1)
                });
            } else {
                sends.push(acked(t, if i % 10 == 1 { 50 } else { 5 }));
            }
        }
        let (before, p99_before) = window(&sends, 1_000_000, 5_000_000);
        let (during, p99_during) = window(&sends, 6_000_000, 10_000_000);
        assert_eq!((before, p99_before), (100.0, 5.0));
        assert_eq!((during, p99_during), (80.0, 50.0));
    }

    #[test]
    fn an_attack_is_judged_by_how_the_gateway_answered_it() {
        let env = Env {
            key: chat_auth::TokenKey::new(b"0123456789abcdef0123456789abcdef".to_vec())
                .expect("a key"),
            ca: None,
            raw: rawgrpc::Gateway::new("127.0.0.1:1", None).expect("an address"),
            run: "t".into(),
            user_limit: 10,
            ip_limit: 100,
            connections_per_ip: 5,
        };
        // A user over its limit: refused, and no more taken on than the
        // limit allows over 10 s.
        let c = Counts::default();
        for _ in 0..100 {
            c.ok();
        }
        c.refused("ResourceExhausted");
        assert!(judge(&env, "hot-user", 10.0, &c).1);
        for _ in 0..100 {
            c.ok();
        }
        assert!(!judge(&env, "hot-user", 10.0, &c).1, "200 taken on at 10/s");
        // Broken requests: any taken on, or left hanging, is a miss.
        let m = Counts::default();
        m.attempt();
        m.refused("Internal");
        assert!(judge(&env, "malformed", 10.0, &m).1);
        m.refused("held open");
        assert!(!judge(&env, "malformed", 10.0, &m).1);
        // Idle connections: some must be closed at once past the cap.
        let i = Counts::default();
        i.ok();
        assert!(!judge(&env, "idle-connections", 10.0, &i).1);
        i.refused("closed at once");
        assert!(judge(&env, "idle-connections", 10.0, &i).1);
    }
}
