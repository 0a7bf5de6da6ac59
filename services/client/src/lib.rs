//! Client library of the chat backend.
//!
//! Holds a list of gateway endpoints, never a single name. Calls go to one
//! gateway and move to the next when it is unavailable, with exponential
//! backoff and full jitter, never sooner than the server's `retry-after-ms`
//! hint, and only while the retry budget allows (about 20 % extra calls).
//! RESOURCE_EXHAUSTED (the server is shedding load) is returned at once,
//! with the hint in its metadata ([`retry_after`]); when the gateways refuse
//! much of what they are sent, the client refuses a matching share of calls
//! itself before sending them (adaptive throttling), so a shedding cluster
//! is not kept busy saying no. Such a call is held half a second first and
//! sent after all if the gateways have meanwhile said they recovered
//! (`chat-load: ok`) or shown no overload lately. `send` retries with the same client message id,
//! so a retry never stores a message twice. `subscribe` keeps a cursor per
//! conversation and, when its stream breaks, resumes on another gateway from
//! those cursors: no gap, no duplicate.

mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_proto::chat::v1 as pb;
use chat_proto::chat::v1::chat_client::ChatClient as RawClient;
use chat_resilience::Criticality;
use chat_resilience::layer::LOAD_HEADER;
use chat_resilience::retry::{Load, RetryBudget, Throttle};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

pub use chat_proto::chat::v1::{Event, Message, event};

/// Calls `Chat::$method` with `$req` and the bearer token, moving across
/// gateways on retryable errors.
macro_rules! gateway_call {
    ($self:ident, $method:ident, $req:expr) => {
        gateway_call!($self, $method, $req, Criticality::Normal)
    };
    ($self:ident, $method:ident, $req:expr, $crit:expr) => {{
        let req = $req;
        $self
            .call($crit, || {
                let mut c = $self.pick();
                let r = $self.request(req.clone());
                async move {
                    c.$method(r).await.map(|r| {
                        let said = load(r.metadata());
                        (r.into_inner(), said)
                    })
                }
            })
            .await
    }};
}

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Events buffered by a subscription before it stops reading.
const SUBSCRIPTION_BUFFER: usize = 1_024;

struct Inner {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    token: MetadataValue<tonic::metadata::Ascii>,
    next: AtomicUsize,
    deadline: Duration,
    budget: RetryBudget,
    /// One per criticality: typing being shed must not hold back sends.
    throttles: [Throttle; 3],
    throttling: std::sync::atomic::AtomicBool,
    /// Calls this client refused itself (throttling).
    held_back: std::sync::atomic::AtomicU64,
    /// Sends go on a stream (off: unary calls, as for gateways that do not
    /// serve `SendStream`).
    streaming: std::sync::atomic::AtomicBool,
    /// The send stream, started by the first streamed send.
    streamer: std::sync::OnceLock<stream::Streamer>,
}

/// A client of the gateways. Cheap to clone.
#[derive(Clone)]
pub struct ChatClient {
    inner: Arc<Inner>,
}

/// Whether trying again (on another gateway) may succeed.
pub fn retryable(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
        || matches!(
            s.code(),
            Code::Unavailable | Code::ResourceExhausted | Code::Cancelled | Code::Unknown
        )
}

/// The server's hint of when to try again, from a RESOURCE_EXHAUSTED or
/// UNAVAILABLE status.
pub use chat_resilience::retry_after;

/// Whether the server refused the call to protect itself (rather than
/// failing it).
fn refused_for_overload(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted
}

/// Whether the throttle lets a call out: one it would refuse is held for
/// [`Throttle::HOLD`] (if the deadline allows) and decided again, so a call
/// made just as the gateways recovered is sent after all.
async fn hold(throttle: &Throttle, deadline: tokio::time::Instant) -> bool {
    let dice = rand::random::<f64>();
    if !throttle.would_refuse_at(std::time::Instant::now(), dice) {
        return true;
    }
    let until = tokio::time::Instant::now() + Throttle::HOLD;
    if until >= deadline {
        return throttle.attempt_at(std::time::Instant::now(), dice);
    }
    tokio::time::sleep_until(until).await;
    throttle.attempt_after_hold_at(std::time::Instant::now(), dice)
}

/// What the gateway said about its load (`chat-load`) on a call it took.
fn load(md: &tonic::metadata::MetadataMap) -> Load {
    match md.get(LOAD_HEADER).map(|v| v.as_bytes()) {
        Some(b"ok") => Load::Ok,
        Some(b"busy") => Load::Busy,
        _ => Load::Unknown,
    }
}

fn backoff_step(backoff: &mut Duration) -> Duration {
    let wait = backoff.mul_f64(rand::random::<f64>());
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    wait
}

impl ChatClient {
    /// `endpoints`: gateways as host:port; `token`: a bearer token;
    /// `deadline`: bound of each call, retries included. Plaintext: for
    /// gateways on a trusted network (`chatctl local up` on 127.0.0.1).
    pub fn new(endpoints: Vec<String>, token: &str, deadline: Duration) -> Result<Self, Status> {
        Self::connect(endpoints, token, deadline, None)
    }

    /// As [`ChatClient::new`], over TLS: the gateways must present a
    /// certificate issued by the CA in `ca_pem` for the host each endpoint
    /// names (a DNS name or an IP address).
    pub fn new_tls(
        endpoints: Vec<String>,
        token: &str,
        deadline: Duration,
        ca_pem: &[u8],
    ) -> Result<Self, Status> {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
        Self::connect(endpoints, token, deadline, Some(tls))
    }

    fn connect(
        endpoints: Vec<String>,
        token: &str,
        deadline: Duration,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Self, Status> {
        if endpoints.is_empty() {
            return Err(Status::invalid_argument("no gateway endpoints given"));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let channels = endpoints
            .iter()
            .map(|a| {
                let bad = |e: tonic::transport::Error| {
                    Status::invalid_argument(format!("bad gateway address {a:?}: {e}"))
                };
                let mut e = Endpoint::from_shared(format!("{scheme}://{a}")).map_err(bad)?;
                if let Some(tls) = &tls {
                    e = e.tls_config(tls.clone()).map_err(bad)?;
                }
                Ok::<_, Status>(
                    e.connect_timeout(Duration::from_millis(500))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(1))
                        .keep_alive_timeout(Duration::from_secs(2))
                        .keep_alive_while_idle(true)
                        .connect_lazy(),
                )
            })
            .collect::<Result<_, _>>()?;
        let token = format!("Bearer {token}").parse().map_err(|_| {
            Status::invalid_argument("token contains characters not allowed in a header")
        })?;
        let start = rand::random::<u32>() as usize % endpoints.len();
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints,
                channels,
                token,
                next: AtomicUsize::new(start),
                deadline,
                budget: RetryBudget::default(),
                throttles: Default::default(),
                throttling: std::sync::atomic::AtomicBool::new(true),
                held_back: std::sync::atomic::AtomicU64::new(0),
                streaming: std::sync::atomic::AtomicBool::new(true),
                streamer: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Switches client-side throttling on or off (on by default; off only
    /// for comparison runs: a client that keeps sending what the servers
    /// refuse costs them the CPU the accepted calls need).
    pub fn set_throttling(&self, on: bool) {
        self.inner.throttling.store(on, Ordering::Relaxed);
    }

    /// Sends on one stream (on by default) or as one unary call each (for
    /// comparison runs; a client also falls back to unary calls by itself
    /// when a gateway does not serve `SendStream`).
    pub fn set_streaming(&self, on: bool) {
        self.inner.streaming.store(on, Ordering::Relaxed);
    }

    /// Calls this client (and its clones) refused itself, without sending
    /// them, because the gateways had been refusing calls for overload.
    pub fn held_back(&self) -> u64 {
        self.inner.held_back.load(Ordering::Relaxed)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert("authorization", self.inner.token.clone());
        r
    }

    fn pick(&self) -> RawClient<Channel> {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.channels.len();
        RawClient::new(self.inner.channels[i].clone()).max_decoding_message_size(64 << 20)
    }

    /// Runs an idempotent call, moving across gateways on retryable errors.
    /// Each attempt answers with what the gateway said of its load.
    async fn call<T, F, Fut>(&self, criticality: Criticality, f: F) -> Result<T, Status>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(T, Load), Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.deadline;
        let mut backoff = BACKOFF_MIN;
        let throttle = &self.inner.throttles[criticality as usize];
        self.inner.budget.deposit();
        loop {
            if self.inner.throttling.load(Ordering::Relaxed) && !hold(throttle, deadline).await {
                self.inner.held_back.fetch_add(1, Ordering::Relaxed);
                return Err(Status::resource_exhausted(
                    "not sent: the gateways have been refusing calls for overload, \
                     so this client is holding back a share of its calls",
                ));
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let err = match tokio::time::timeout(remaining, f()).await {
                Ok(Ok((r, said))) => {
                    throttle.accepted_at(std::time::Instant::now(), said);
                    return Ok(r);
                }
                Ok(Err(s)) => s,
                Err(_) => return Err(Status::deadline_exceeded("no gateway answered in time")),
            };
            // An overloaded server is not retried: a retry is more of the
            // load it is shedding. The status carries its `retry-after-ms`.
            if refused_for_overload(&err) {
                throttle.refused();
                return Err(err);
            }
            throttle.accepted();
            if !retryable(&err) {
                return Err(err);
            }
            // Never sooner than the hint, and spread past it: calls turned
            // away together (a store without quorum answers every send with
            // the same hint) must not come back together.
            let hint = retry_after(&err).unwrap_or_default();
            let wait =
                backoff_step(&mut backoff).max(hint.mul_f64(1.0 + rand::random::<f64>() / 2.0));
            if tokio::time::Instant::now() + wait >= deadline || !self.inner.budget.try_withdraw() {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends a message. Retrying with the same `client_msg_id` (this does it
    /// by itself) never stores it twice. Sends go on the client's send
    /// stream (bodies over 32 KiB as unary calls); sends made together to
    /// one conversation are stored in the order they were made.
    pub async fn send(
        &self,
        conversation: &str,
        client_msg_id: &str,
        body: Vec<u8>,
    ) -> Result<pb::SendResponse, Status> {
        let req = pb::SendRequest {
            conversation_id: conversation.into(),
            client_msg_id: client_msg_id.into(),
            body,
        };
        if self.inner.streaming.load(Ordering::Relaxed)
            && req.body.len() <= stream::MAX_STREAMED_BODY
        {
            let streamer = self.inner.streamer.get_or_init(|| {
                stream::Streamer::start(
                    self.inner.channels.clone(),
                    self.inner.token.clone(),
                    self.inner.next.fetch_add(1, Ordering::Relaxed),
                )
            });
            let streamed = self
                .call(Criticality::Critical, || streamer.send(req.clone()))
                .await;
            match streamed {
                Err(s) if s.code() == Code::Unimplemented => {
                    tracing::info!(
                        "the gateway does not serve SendStream; sending with unary calls"
                    );
                    self.inner.streaming.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        gateway_call!(self, send, req, Criticality::Critical)
    }

    pub async fn history(&self, req: pb::HistoryRequest) -> Result<pb::HistoryResponse, Status> {
        gateway_call!(self, history, req)
    }

    pub async fn create_conversation(
        &self,
        id: &str,
        members: &[String],
    ) -> Result<pb::Conversation, Status> {
        let req = pb::CreateConversationRequest {
            conversation_id: id.into(),
            members: members.to_vec(),
        };
        gateway_call!(self, create_conversation, req)
    }

    pub async fn add_member(
        &self,
        conversation: &str,
        user: &str,
    ) -> Result<pb::Conversation, Status> {
        let req = pb::MemberRequest {
            conversation_id: conversation.into(),
            user_id: user.into(),
        };
        gateway_call!(self, add_member, req)
    }

    pub async fn remove_member(
        &self,
        conversation: &str,
        user: &str,
    ) -> Result<pb::Conversation, Status> {
        let req = pb::MemberRequest {
            conversation_id: conversation.into(),
            user_id: user.into(),
        };
        gateway_call!(self, remove_member, req)
    }

    /// Every conversation the user belongs to, page by page.
    pub async fn list_conversations(&self) -> Result<Vec<pb::Conversation>, Status> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.list_conversations_page(&after, 0).await?;
            all.extend(page.conversations);
            if page.next.is_empty() || page.next == after {
                return Ok(all);
            }
            after = page.next;
        }
    }

    /// One page: conversations whose id sorts after `after`, at most
    /// `limit` (0: the gateway's page size).
    pub async fn list_conversations_page(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<pb::ListConversationsResponse, Status> {
        gateway_call!(
            self,
            list_conversations,
            pb::ListConversationsRequest {
                after: after.to_owned(),
                limit,
            }
        )
    }

    pub async fn typing(&self, conversation: &str) -> Result<(), Status> {
        let req = pb::TypingRequest {
            conversation_id: conversation.into(),
        };
        gateway_call!(self, send_typing, req, Criticality::Sheddable).map(|_| ())
    }

    /// Subscribes from `cursors` (conversation → last seq held). Runs until
    /// the returned `Subscription` is dropped, reconnecting by itself.
    pub fn subscribe(&self, cursors: HashMap<String, u64>) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let task = tokio::spawn(run_subscription(self.clone(), cursors, tx));
        Subscription { rx, task }
    }
}

/// Events of a subscription, in order per conversation, each message once.
pub struct Subscription {
    rx: mpsc::Receiver<SubscriptionEvent>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub enum SubscriptionEvent {
    Event(pb::Event),
    /// The stream broke; the subscription is resuming on another gateway.
    Reconnecting(Status),
    /// The gateway refused the subscription for good (bad token, bad
    /// cursors); it has ended.
    Failed(Status),
}

impl Subscription {
    pub async fn next(&mut self) -> Option<SubscriptionEvent> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_subscription(
    client: ChatClient,
    mut cursors: HashMap<String, u64>,
    tx: mpsc::Sender<SubscriptionEvent>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let req = pb::SubscribeRequest {
            cursors: cursors
                .iter()
                .map(|(c, s)| pb::Cursor {
                    conversation_id: c.clone(),
                    last_seq: *s,
                })
                .collect(),
        };
        let error = match client.pick().subscribe(client.request(req)).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            backoff = BACKOFF_MIN;
                            if let Some(pb::event::Kind::Message(m)) = &ev.kind {
                                let cursor = cursors.entry(m.conversation_id.clone()).or_insert(0);
                                if m.seq <= *cursor {
                                    continue;
                                }
                                *cursor = m.seq;
                            }
                            if tx.send(SubscriptionEvent::Event(ev)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break Status::unavailable("the gateway closed the stream"),
                        Err(s) => break s,
                    }
                }
            }
            Err(s) => s,
        };
        if !retryable(&error) && !matches!(error.code(), Code::Internal | Code::DeadlineExceeded) {
            // Unauthenticated, permission denied, invalid cursors: reconnecting
            // would fail the same way.
            let _ = tx.send(SubscriptionEvent::Failed(error)).await;
            return;
        }
        if tx
            .send(SubscriptionEvent::Reconnecting(error))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(backoff_step(&mut backoff)).await;
    }
}
