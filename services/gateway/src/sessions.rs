//! Subscribers on this gateway and the delivery to each of them.
//!
//! Each `Subscribe` call is a session with its own task. The task keeps a
//! cursor per conversation (the last seq delivered) and is the only writer
//! to the client's stream, so delivery is ordered per conversation and never
//! repeats a seq. Pushes from routers are a fast path only: a push that skips
//! seqs makes the session read the gap from the store first, and every
//! sweep interval ([`Sweep`]) the session compares its cursors with the
//! store's last seqs. A router that dies mid-delivery therefore delays
//! messages; it never loses them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_proto::chat::v1 as cpb;
use chat_proto::router::v1 as rpb;
use chat_proto::store::v1 as spb;
use tokio::sync::{Notify, mpsc};
use tonic::{Code, Status};
use tracing::debug;

use crate::routers::{RouterPool, via_router};

/// Pushes queued per session before new ones are dropped (the sweep
/// recovers dropped messages).
pub const PUSH_QUEUE: usize = 4_096;
/// Message body bytes queued per session before new pushes are dropped: a
/// subscriber that reads slowly holds at most this much of the gateway's
/// memory in pushes (the sweep recovers what was dropped).
pub const PUSH_BYTES: usize = 4 << 20;
/// Message body bytes queued in pushes across every session of a gateway:
/// past it, a session holding more than `PUSH_FLOOR` gets no more pushes
/// until it reads, so many slow readers together hold at most this much
/// (plus their floors); a session that keeps up, and so holds less than its
/// floor, is never refused for the others.
pub const PUSH_BYTES_TOTAL: usize = 64 << 20;
/// What a session may always queue, whatever the others hold.
pub const PUSH_FLOOR: usize = 256 << 10;
/// Events buffered towards one client, ready to be written (each up to a
/// message body): small, so a client that stops reading stops its session
/// after a few messages and the bounded push queue takes the rest.
pub const OUT_QUEUE: usize = 16;
/// Page size of catch-up reads.
const PAGE: u32 = 1_000;
/// How long a session holds a message that arrived ahead of a missing seq,
/// waiting for the missing one to be pushed too (pushes of one conversation
/// can come through different routers and cross), before reading the gap
/// from the store.
const GAP_WAIT: Duration = Duration::from_millis(50);
/// Longest a session waits for its token to expire (a year).
const MAX_TOKEN_WAIT_SECS: u64 = 365 * 86_400;
/// Most messages held per conversation while waiting for a gap.
const MAX_HELD: usize = 1_024;

/// An event on its way to a subscriber, boxed so that the slots of a
/// session's outgoing channel are small while it is empty.
pub type Outgoing = Box<Result<cpb::Event, Status>>;

/// What the subscriber's stream yields.
#[allow(
    clippy::boxed_local,
    reason = "the stream's map function takes the channel's item as it is"
)]
pub fn unbox(o: Outgoing) -> Result<cpb::Event, Status> {
    *o
}

/// Messages pushed ahead of a gap in one conversation, and since when.
type Held = (
    tokio::time::Instant,
    std::collections::BTreeMap<u64, spb::StoredMessage>,
);

/// What is pushed to a session. A message or typing event is one
/// allocation shared by every session it goes to (each takes its own copy
/// only when it writes it out), and a push is small, so a session's queue
/// costs little while it is empty.
pub enum Push {
    Message(Arc<spb::StoredMessage>),
    Typing(Arc<rpb::TypingEvent>),
    Status(Box<cpb::StatusEvent>),
}

impl Push {
    /// The bytes it counts for against `PUSH_BYTES`.
    fn bytes(&self) -> usize {
        match self {
            Push::Message(m) => m.body.len(),
            Push::Typing(_) | Push::Status(_) => 0,
        }
    }
}

/// Message bytes queued in every session's pushes together, and the most
/// allowed past the sessions' floors.
pub struct PushBudget {
    used: AtomicUsize,
    max: usize,
}

impl PushBudget {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes queued in pushes now, in all sessions.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The sending side of a session's push queue, bounded in count
/// (`PUSH_QUEUE`), in message bytes (`PUSH_BYTES`) and, past its floor, by
/// the gateway's budget (`PUSH_BYTES_TOTAL`); never waits.
#[derive(Clone)]
pub struct PushSender {
    tx: mpsc::Sender<Push>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    budget: Arc<PushBudget>,
}

/// The receiving side, which gives the bytes back as it takes pushes.
pub struct PushReceiver {
    rx: mpsc::Receiver<Push>,
    bytes: Arc<AtomicUsize>,
    budget: Arc<PushBudget>,
}

/// A push queue of `capacity` pushes and `max_bytes` message bytes, which
/// past `PUSH_FLOOR` bytes also draws on `budget`.
pub fn push_queue(
    capacity: usize,
    max_bytes: usize,
    budget: Arc<PushBudget>,
) -> (PushSender, PushReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        PushSender {
            tx,
            bytes: bytes.clone(),
            max_bytes,
            budget: budget.clone(),
        },
        PushReceiver { rx, bytes, budget },
    )
}

impl PushSender {
    /// Queues `p` unless the queue is full in count or bytes, or holds more
    /// than its floor while the gateway's budget is spent (then it is
    /// dropped: the session's sweep reads it from the store later).
    pub fn try_send(&self, p: Push) -> bool {
        let n = p.bytes();
        if n > 0 {
            let mine = self.bytes.fetch_add(n, Ordering::AcqRel) + n;
            let all = self.budget.used.fetch_add(n, Ordering::AcqRel) + n;
            if mine > self.max_bytes || (mine > PUSH_FLOOR && all > self.budget.max) {
                self.give_back(n);
                return false;
            }
        }
        if self.tx.try_send(p).is_err() {
            self.give_back(n);
            return false;
        }
        true
    }

    fn give_back(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.budget.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl PushReceiver {
    pub async fn recv(&mut self) -> Option<Push> {
        let p = self.rx.recv().await?;
        self.release(&p);
        Some(p)
    }

    fn release(&self, p: &Push) {
        let n = p.bytes();
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.budget.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for PushReceiver {
    /// A session that ends gives back what its queue still held.
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(p) = self.rx.try_recv() {
            self.release(&p);
        }
    }
}

/// A session's id and the queue of pushes to it.
type SessionQueue = (u64, PushSender);

/// The sessions of this gateway, by user.
pub struct Sessions {
    by_user: Mutex<HashMap<String, Vec<SessionQueue>>>,
    next: AtomicU64,
    /// Woken when the set of online users changes.
    pub changed: Notify,
    /// The service's state as subscribers were last told (`None`: ok and
    /// never degraded since this gateway started).
    status: Mutex<Option<cpb::StatusEvent>>,
    /// Open incident notices by id (`None`: not read yet).
    incidents: Mutex<Option<std::collections::BTreeMap<String, String>>>,
    /// `SendStream` streams open (they are not sessions: nothing is pushed
    /// to them but their acks).
    send_streams: AtomicU64,
    /// Bytes queued in every session's pushes.
    pub push_budget: Arc<PushBudget>,
    /// Sessions open now.
    open: AtomicUsize,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            by_user: Mutex::default(),
            next: AtomicU64::default(),
            changed: Notify::default(),
            status: Mutex::default(),
            incidents: Mutex::default(),
            send_streams: AtomicU64::default(),
            push_budget: PushBudget::new(PUSH_BYTES_TOTAL),
            open: AtomicUsize::default(),
        }
    }
}

/// Counts a send stream as open while it lives.
pub struct SendStreamOpen(Arc<Sessions>);

impl Drop for SendStreamOpen {
    fn drop(&mut self) {
        self.0.send_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

pub const STATE_INCIDENT: &str = "incident";
pub const STATE_INCIDENT_RESOLVED: &str = "incident-resolved";

fn incident_event(state: &str, text: &str) -> cpb::StatusEvent {
    cpb::StatusEvent {
        state: state.into(),
        affected_features: Vec::new(),
        notice: text.into(),
    }
}

impl Sessions {
    /// A new session of `user`, unless they already have `max` open: the
    /// check and the opening are one step, so concurrent subscribes cannot
    /// pass the cap together.
    pub fn open(&self, user: &str, max: usize) -> Option<(u64, PushReceiver)> {
        let (tx, rx) = push_queue(PUSH_QUEUE, PUSH_BYTES, self.push_budget.clone());
        // A new subscriber learns at once what is degraded now.
        if let Some(s) = self.status().filter(|s| s.state != STATE_OK) {
            let _ = tx.try_send(Push::Status(Box::new(s)));
        }
        // ... and of every open incident.
        for text in self.open_incidents() {
            let _ = tx.try_send(Push::Status(Box::new(incident_event(
                STATE_INCIDENT,
                &text,
            ))));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut g = self.by_user.lock().expect("sessions lock poisoned");
        let list = g.entry(user.to_owned()).or_default();
        if list.len() >= max {
            return None;
        }
        let first = list.is_empty();
        list.push((id, tx));
        self.open.fetch_add(1, Ordering::Relaxed);
        drop(g);
        if first {
            self.changed.notify_one();
        }
        Some((id, rx))
    }

    pub fn close(&self, user: &str, id: u64) {
        let mut g = self.by_user.lock().expect("sessions lock poisoned");
        if let Some(list) = g.get_mut(user) {
            let before = list.len();
            list.retain(|(i, _)| *i != id);
            self.open.fetch_sub(before - list.len(), Ordering::Relaxed);
            if list.is_empty() {
                g.remove(user);
                drop(g);
                self.changed.notify_one();
            }
        }
    }

    pub fn users(&self) -> Vec<String> {
        self.by_user
            .lock()
            .expect("sessions lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Send streams open now.
    pub fn send_streams(&self) -> u64 {
        self.send_streams.load(Ordering::Relaxed)
    }

    pub fn send_stream_opened(self: &Arc<Self>) -> SendStreamOpen {
        self.send_streams.fetch_add(1, Ordering::Relaxed);
        SendStreamOpen(self.clone())
    }

    /// Sessions open now (kept beside the map, so no lock is taken).
    pub fn count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The current status event, if the service has been degraded since
    /// this gateway started.
    pub fn status(&self) -> Option<cpb::StatusEvent> {
        self.status.lock().expect("sessions lock poisoned").clone()
    }

    /// Records which features are degraded and, when that changed, tells
    /// every subscriber. Returns whether it changed.
    pub fn set_degraded(&self, features: Vec<String>) -> bool {
        let event = status_event(features);
        let mut g = self.status.lock().expect("sessions lock poisoned");
        let unchanged = match &*g {
            Some(s) => s.affected_features == event.affected_features,
            None => event.state == STATE_OK,
        };
        if unchanged {
            return false;
        }
        *g = Some(event.clone());
        drop(g);
        let users = self.by_user.lock().expect("sessions lock poisoned");
        for (_, tx) in users.values().flatten() {
            let _ = tx.try_send(Push::Status(Box::new(event.clone())));
        }
        true
    }

    /// The texts of the open incidents, oldest id first.
    pub fn open_incidents(&self) -> Vec<String> {
        self.incidents
            .lock()
            .expect("sessions lock poisoned")
            .iter()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// Records the incident notices; tells every subscriber of each one
    /// posted or resolved since the last call (not of those already open
    /// when this gateway first heard of them: new subscribers are told of
    /// open ones when they subscribe). Returns how many events went out.
    pub fn set_incidents(&self, all: &[chat_proto::status::v1::Incident]) -> usize {
        let open: std::collections::BTreeMap<String, String> = all
            .iter()
            .filter(|i| i.resolved_ms == 0)
            .map(|i| (i.id.clone(), i.text.clone()))
            .collect();
        let mut g = self.incidents.lock().expect("sessions lock poisoned");
        let Some(before) = g.replace(open.clone()) else {
            return 0;
        };
        drop(g);
        let mut events = Vec::new();
        for (id, text) in &open {
            if !before.contains_key(id) {
                events.push(incident_event(STATE_INCIDENT, text));
            }
        }
        for (id, text) in &before {
            if !open.contains_key(id) {
                events.push(incident_event(STATE_INCIDENT_RESOLVED, text));
            }
        }
        if !events.is_empty() {
            let users = self.by_user.lock().expect("sessions lock poisoned");
            for (_, tx) in users.values().flatten() {
                for e in &events {
                    let _ = tx.try_send(Push::Status(Box::new(e.clone())));
                }
            }
        }
        events.len()
    }

    /// Hands a push to every session of `user`; never waits.
    pub fn push(&self, user: &str, make: impl Fn() -> Push) {
        let g = self.by_user.lock().expect("sessions lock poisoned");
        for (_, tx) in g.get(user).into_iter().flatten() {
            let _ = tx.try_send(make());
        }
    }
}

pub const STATE_OK: &str = "ok";
pub const STATE_DEGRADED: &str = "degraded";

/// What subscribers are told when `features` are degraded (none: all ok).
pub fn status_event(features: Vec<String>) -> cpb::StatusEvent {
    if features.is_empty() {
        return cpb::StatusEvent {
            state: STATE_OK.into(),
            affected_features: Vec::new(),
            notice: "all features are working again".into(),
        };
    }
    let notice = if features.iter().any(|f| f == "send") {
        "the message store has lost its quorum: sending is paused and history may be stale; \
         it resumes by itself"
    } else {
        "some features are degraded; they resume by themselves"
    };
    cpb::StatusEvent {
        state: STATE_DEGRADED.into(),
        affected_features: features,
        notice: notice.into(),
    }
}

fn to_event(m: spb::StoredMessage) -> cpb::Event {
    cpb::Event {
        kind: Some(cpb::event::Kind::Message(cpb::Message {
            conversation_id: m.conversation_id,
            seq: m.seq,
            sender: m.sender,
            client_msg_id: m.client_msg_id,
            body: m.body,
            server_ts_ms: m.server_ts_ms,
        })),
    }
}

/// How often sessions are reconciled with the store.
#[derive(Clone, Copy, Debug)]
pub struct Sweep {
    /// Each session's interval while the gateway holds few of them.
    pub every: Duration,
    /// Reconciliations a second for all of this gateway's sessions
    /// together (0: no bound). Each is a router call and a store read, so
    /// without a bound a crowd of idle subscribers would load the store in
    /// proportion to its size; past `rate × every` sessions each one's
    /// interval stretches instead.
    pub rate: u32,
}

impl Sweep {
    /// The wait before a session's next sweep while `sessions` are open,
    /// spread ±20 % so that sessions opened together (a reconnect storm)
    /// do not sweep together.
    pub fn wait(&self, sessions: usize) -> Duration {
        let spread = if self.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(sessions as f64 / f64::from(self.rate))
        };
        self.every
            .max(spread)
            .mul_f64(0.8 + 0.4 * rand::random::<f64>())
    }
}

/// One subscriber's delivery loop.
pub struct Session {
    pub user: String,
    pub cursors: HashMap<String, u64>,
    pub pool: Arc<RouterPool>,
    pub out: mpsc::Sender<Outgoing>,
    pub sweep: Sweep,
    /// The gateway's sessions (how many are open paces the sweep).
    pub sessions: Arc<Sessions>,
    /// Gateway shutdown: the stream ends with UNAVAILABLE so the client
    /// resumes elsewhere.
    pub stop: tokio_util::sync::CancellationToken,
    /// Messages pushed ahead of a gap, by conversation.
    pub held: HashMap<String, Held>,
    /// When the subscriber's token expires (unix seconds); the stream ends
    /// with UNAUTHENTICATED then.
    pub token_expires: u64,
}

/// The client went away; the session ends.
struct Gone;

impl Session {
    pub async fn run(mut self, mut pushes: PushReceiver) {
        // A sync and a gap fill make router calls, whose futures are
        // several KiB: boxed while they run, so an idle session's task,
        // one per subscriber, does not hold room for them.
        if Box::pin(self.sync()).await.is_err() {
            return;
        }
        let mut next_sweep = tokio::time::Instant::now() + self.sweep.wait(self.sessions.count());
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Capped: a far-future expiry must not overflow the clock.
        let expiry = tokio::time::Instant::now()
            + Duration::from_secs(
                self.token_expires
                    .saturating_sub(now_unix)
                    .min(MAX_TOKEN_WAIT_SECS),
            );
        loop {
            let gap_deadline = self.held.values().map(|(since, _)| *since + GAP_WAIT).min();
            let step = tokio::select! {
                _ = tokio::time::sleep_until(gap_deadline.unwrap_or_else(tokio::time::Instant::now)), if gap_deadline.is_some() => {
                    Box::pin(self.fill_expired_gaps()).await
                }
                _ = self.out.closed() => return,
                _ = tokio::time::sleep_until(expiry) => {
                    let _ = self.out.try_send(Box::new(Err(Status::unauthenticated("token expired; subscribe again with a fresh one"))));
                    return;
                }
                _ = self.stop.cancelled() => {
                    let _ = self.out.try_send(Box::new(Err(Status::unavailable("gateway is shutting down; resume on another"))));
                    return;
                }
                p = pushes.recv() => match p {
                    Some(Push::Message(m)) => self.on_message(Arc::unwrap_or_clone(m)).await,
                    Some(Push::Status(s)) => {
                        let ev = cpb::Event { kind: Some(cpb::event::Kind::Status(*s)) };
                        let _ = self.out.try_send(Box::new(Ok(ev)));
                        Ok(())
                    }
                    Some(Push::Typing(t)) => {
                        // Lowest priority: dropped when the client is behind.
                        let t = Arc::unwrap_or_clone(t);
                        let ev = cpb::Event { kind: Some(cpb::event::Kind::Typing(cpb::Typing { conversation_id: t.conversation_id, user_id: t.user_id })) };
                        let _ = self.out.try_send(Box::new(Ok(ev)));
                        Ok(())
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(next_sweep) => {
                    let r = Box::pin(self.sync()).await;
                    next_sweep = tokio::time::Instant::now() + self.sweep.wait(self.sessions.count());
                    r
                }
            };
            if step.is_err() {
                return;
            }
        }
    }

    /// Brings every conversation of the user up to the store's last seq
    /// (new conversations included), page by page through all of them.
    async fn sync(&mut self) -> Result<(), Gone> {
        let mut after = String::new();
        loop {
            let req = spb::ListConversationsRequest {
                user_id: self.user.clone(),
                after: after.clone(),
                ..Default::default()
            };
            let list = match via_router!(self.pool, &self.user, list_conversations, req) {
                Ok(l) => l,
                Err(e) => {
                    debug!(user = %self.user, error = %e, "sync skipped");
                    return Ok(());
                }
            };
            for c in list.conversations {
                let cursor = *self.cursors.entry(c.conversation_id.clone()).or_insert(0);
                if c.last_seq > cursor {
                    self.fetch(&c.conversation_id, c.last_seq).await?;
                }
            }
            if list.next.is_empty() || list.next == after {
                return Ok(());
            }
            after = list.next;
        }
    }

    async fn on_message(&mut self, m: spb::StoredMessage) -> Result<(), Gone> {
        let conv = m.conversation_id.clone();
        // Written as one loop over plain functions, so the task holds no
        // nested futures: one per subscriber, idle most of the time.
        let mut next = self.admit(m);
        while let Some(m) = next {
            if let Some(ev) = self.queue(m)? {
                Box::pin(self.send_when_read(ev)).await?;
            }
            next = self.next_held(&conv);
        }
        Ok(())
    }

    /// A pushed message if it is next in line; one already delivered is
    /// dropped, one past a gap held until the gap is filled.
    fn admit(&mut self, m: spb::StoredMessage) -> Option<spb::StoredMessage> {
        let cursor = *self.cursors.entry(m.conversation_id.clone()).or_insert(0);
        if m.seq <= cursor {
            return None;
        }
        if m.seq > cursor + 1 {
            let (_, held) = self
                .held
                .entry(m.conversation_id.clone())
                .or_insert_with(|| (tokio::time::Instant::now(), Default::default()));
            if held.len() < MAX_HELD {
                held.insert(m.seq, m);
            }
            return None;
        }
        Some(m)
    }

    /// The held message of `conv` that is now next in line, dropping those
    /// already delivered.
    fn next_held(&mut self, conv: &str) -> Option<spb::StoredMessage> {
        let cursor = self.cursors.get(conv).copied().unwrap_or(0);
        let (_, held) = self.held.get_mut(conv)?;
        while held.first_key_value().is_some_and(|(&s, _)| s <= cursor) {
            held.pop_first();
        }
        let next = match held.first_key_value() {
            Some((&s, _)) if s == cursor + 1 => held.pop_first().map(|(_, m)| m),
            _ => None,
        };
        if held.is_empty() {
            self.held.remove(conv);
        }
        next
    }

    /// Emits held messages that are now next in line.
    async fn release_held(&mut self, conv: &str) -> Result<(), Gone> {
        while let Some(m) = self.next_held(conv) {
            self.emit(m).await?;
        }
        Ok(())
    }

    /// Reads from the store the gaps no push filled in time.
    async fn fill_expired_gaps(&mut self) -> Result<(), Gone> {
        let now = tokio::time::Instant::now();
        let expired: Vec<(String, u64)> = self
            .held
            .iter()
            .filter(|(_, (since, _))| *since + GAP_WAIT <= now)
            .filter_map(|(c, (_, h))| h.last_key_value().map(|(&s, _)| (c.clone(), s)))
            .collect();
        for (conv, upto) in expired {
            self.fetch(&conv, upto).await?;
            self.release_held(&conv).await?;
            // Whatever is still held (a failed read) waits another round.
            if let Some((since, _)) = self.held.get_mut(&conv) {
                *since = tokio::time::Instant::now();
            }
        }
        Ok(())
    }

    /// Reads and delivers everything after the cursor up to `upto`.
    async fn fetch(&mut self, conv: &str, upto: u64) -> Result<(), Gone> {
        loop {
            let cursor = self.cursors.get(conv).copied().unwrap_or(0);
            if cursor >= upto {
                return Ok(());
            }
            let req = spb::ReadRequest {
                conversation_id: conv.to_owned(),
                after_seq: cursor,
                limit: PAGE,
                requester: self.user.clone(),
                ..Default::default()
            };
            let page = match via_router!(self.pool, &self.user, read, req) {
                Ok(p) => p,
                Err(e) if matches!(e.code(), Code::PermissionDenied | Code::NotFound) => {
                    // No longer a member: drop what is held. The cursor
                    // stays, so being added back never repeats a seq.
                    self.held.remove(conv);
                    return Ok(());
                }
                Err(e) => {
                    debug!(user = %self.user, conversation = conv, error = %e, "catch-up read failed; the sweep retries");
                    return Ok(());
                }
            };
            if page.messages.is_empty() {
                return Ok(());
            }
            for m in page.messages {
                if m.seq == self.cursors.get(conv).copied().unwrap_or(0) + 1 {
                    self.emit(m).await?;
                }
            }
        }
    }

    /// Queues `m` for the client, waiting for room when it is behind.
    async fn emit(&mut self, m: spb::StoredMessage) -> Result<(), Gone> {
        match self.queue(m)? {
            None => Ok(()),
            // Boxed: rare, and every subscriber's task would otherwise
            // hold room for the wait.
            Some(ev) => Box::pin(self.send_when_read(ev)).await,
        }
    }

    /// Queues `m` if there is room; gives it back as an event otherwise.
    fn queue(&mut self, m: spb::StoredMessage) -> Result<Option<Outgoing>, Gone> {
        self.cursors.insert(m.conversation_id.clone(), m.seq);
        match self.out.try_send(Box::new(Ok(to_event(m)))) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Gone),
            Err(mpsc::error::TrySendError::Full(ev)) => Ok(Some(ev)),
        }
    }

    async fn send_when_read(&self, ev: Outgoing) -> Result<(), Gone> {
        // A client that stops reading must not hold up a shutdown.
        tokio::select! {
            r = self.out.send(ev) => r.map_err(|_| Gone),
            _ = self.stop.cancelled() => Err(Gone),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> spb::StoredMessage {
        spb::StoredMessage {
            conversation_id: "c".into(),
            seq,
            sender: "a".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_holds_at_most_its_byte_budget_of_pushes() {
        let (tx, mut rx) = push_queue(100, 1_000, PushBudget::new(PUSH_BYTES_TOTAL));
        let big = |seq| {
            Push::Message(Arc::new(spb::StoredMessage {
                body: vec![0; 400],
                ..msg(seq)
            }))
        };
        assert!(tx.try_send(big(1)));
        assert!(tx.try_send(big(2)));
        assert!(
            !tx.try_send(big(3)),
            "a third 400-byte push is over 1,000 bytes"
        );
        // Small events are not counted and still go through.
        assert!(tx.try_send(Push::Status(Box::new(status_event(Vec::new())))));
        // Reading gives the bytes back.
        assert!(matches!(rx.recv().await, Some(Push::Message(m)) if m.seq == 1));
        assert!(tx.try_send(big(4)));
        assert!(!tx.try_send(big(5)));
    }

    #[tokio::test]
    async fn slow_subscribers_together_hold_at_most_the_gateways_budget_past_their_floors() {
        let body = PUSH_FLOOR / 4;
        let push = || {
            Push::Message(Arc::new(spb::StoredMessage {
                body: vec![0; body],
                ..msg(1)
            }))
        };
        // A budget of two floors and a bit; per-session caps far above.
        let budget = PushBudget::new(2 * PUSH_FLOOR + body);
        let slow: Vec<_> = (0..3)
            .map(|_| push_queue(1_000, 100 * PUSH_FLOOR, budget.clone()))
            .collect();
        // Every slow session fills its floor, whatever the budget says.
        for (tx, _) in &slow {
            for _ in 0..4 {
                assert!(tx.try_send(push()));
            }
        }
        assert_eq!(budget.used(), 3 * PUSH_FLOOR);
        // Past their floors the budget is spent: refused.
        for (tx, _) in &slow {
            assert!(!tx.try_send(push()), "past the floor with the budget spent");
        }
        assert_eq!(budget.used(), 3 * PUSH_FLOOR, "refusals give back");
        // A session that keeps up still gets its pushes.
        let (tx, mut rx) = push_queue(1_000, 100 * PUSH_FLOOR, budget.clone());
        for _ in 0..10 {
            assert!(tx.try_send(push()));
            assert!(rx.recv().await.is_some());
        }
        // A slow reader that reads frees room for the others, and one
        // that goes away gives back what it held.
        let mut slow = slow.into_iter();
        let (_tx0, mut rx0) = slow.next().expect("three");
        for _ in 0..4 {
            assert!(rx0.recv().await.is_some());
        }
        assert_eq!(budget.used(), 2 * PUSH_FLOOR);
        let (tx1, rx1) = slow.next().expect("three");
        assert!(tx1.try_send(push()), "room again");
        drop(rx1);
        assert_eq!(
            budget.used(),
            PUSH_FLOOR,
            "the closed session's bytes are back"
        );
        assert!(!tx1.try_send(push()), "nobody reads it any more");
        assert_eq!(budget.used(), PUSH_FLOOR);
    }

    #[test]
    fn a_crowd_of_sessions_stretches_the_sweep_rather_than_loading_the_store() {
        let sweep = Sweep {
            every: Duration::from_secs(2),
            rate: 500,
        };
        let within = |d: Duration, lo: u64, hi: u64| {
            d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi)
        };
        let mut spread = std::collections::BTreeSet::new();
        for _ in 0..200 {
            // Few sessions: the configured interval, spread ±20 %.
            let few = sweep.wait(100);
            assert!(within(few, 1_600, 2_400), "{few:?}");
            spread.insert(few.as_millis());
            // 10,000 sessions at 500 a second: each every 20 s (±20 %),
            // so together they stay near 500 a second.
            let many = sweep.wait(10_000);
            assert!(within(many, 16_000, 24_000), "{many:?}");
        }
        assert!(spread.len() > 20, "sweeps not spread: {spread:?}");
        let unbounded = Sweep { rate: 0, ..sweep };
        assert!(within(unbounded.wait(1_000_000), 1_600, 2_400));
    }

    #[test]
    fn open_sessions_are_counted_as_they_open_and_close() {
        let s = Sessions::default();
        let (a1, _r1) = s.open("a", 4).unwrap();
        let (_a2, _r2) = s.open("a", 4).unwrap();
        let (b1, _r3) = s.open("b", 4).unwrap();
        assert!(s.open("b", 1).is_none(), "over the cap");
        assert_eq!(s.count(), 3);
        s.close("a", a1);
        s.close("a", a1);
        s.close("nobody", b1);
        assert_eq!(s.count(), 2);
        s.close("b", b1);
        assert_eq!(s.count(), 1);
    }

    /// A session of user `b` whose only router is unreachable, with its
    /// push queue's two ends and its client stream's receiving end.
    fn session_without_routers(
        cursors: HashMap<String, u64>,
    ) -> (Session, PushReceiver, PushSender, mpsc::Receiver<Outgoing>) {
        let pool = Arc::new(
            RouterPool::new(
                &["127.0.0.1:9".to_string()],
                Duration::from_millis(50),
                None,
            )
            .unwrap(),
        );
        let (out, rx) = mpsc::channel(16);
        let (push_tx, pushes) = push_queue(16, PUSH_BYTES, PushBudget::new(PUSH_BYTES_TOTAL));
        let session = Session {
            user: "b".into(),
            cursors,
            pool,
            out,
            sweep: Sweep {
                every: Duration::from_secs(3600),
                rate: 0,
            },
            sessions: Arc::new(Sessions::default()),
            stop: tokio_util::sync::CancellationToken::new(),
            held: HashMap::new(),
            token_expires: u64::MAX,
        };
        (session, pushes, push_tx, rx)
    }

    /// An idle subscriber costs its session task; the router calls of a
    /// sync or a gap fill, each several KiB of future, are boxed for the
    /// moment they run rather than held in every task (BENCHMARKS.md, "Idle
    /// subscribers on one gateway").
    #[tokio::test]
    async fn an_idle_session_task_stays_small() {
        let (session, pushes, _push_tx, _rx) = session_without_routers(HashMap::new());
        let task = session.run(pushes);
        // 1,056 bytes on tokio 1.54; 3,392 before the router calls were
        // boxed.
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1_280, "a session's task holds {size} bytes");
    }

    #[tokio::test]
    async fn pushes_that_cross_are_delivered_in_order_once_without_store_reads() {
        // No router is reachable: any store read would fail, and the
        // messages could then only arrive through the reorder buffer.
        let (session, pushes, push_tx, mut rx) =
            session_without_routers(HashMap::from([("c".to_string(), 0)]));
        let task = tokio::spawn(session.run(pushes));
        for seq in [2, 1, 1, 3] {
            assert!(push_tx.try_send(Push::Message(Arc::new(msg(seq)))));
        }
        let mut seqs = Vec::new();
        while seqs.len() < 3 {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(cpb::event::Kind::Message(m)) = ev.kind {
                seqs.push(m.seq);
            }
        }
        assert_eq!(seqs, vec![1, 2, 3]);
        assert!(rx.try_recv().is_err(), "a message was delivered twice");
        task.abort();
    }
}
