//! `SendStream`: many sends and their acknowledgements on one stream.
//!
//! The stream is authenticated once, when it opens (the admission layer),
//! and holds no place under the concurrency limit itself. Each send on it
//! spends the sender's call rate as a unary `Send` does and meets the
//! handler's checks ([`SendChecks`]), and is refused alone when it fails
//! one: the stream goes on. Each send takes a place under the concurrency
//! limit as a critical call while it is with the store, just as a unary
//! send does: the limit bounds the sends in flight, whichever way they
//! came. Sends that find the limit full are answered with
//! RESOURCE_EXHAUSTED and a retry hint.
//!
//! Order: sends to one conversation are stored in the order they came on
//! the stream. While one group of a conversation's sends is with the store,
//! the sends that follow it wait here, and go as the next group, in order,
//! in one batch, when it is answered. Sends to different conversations do
//! not wait for each other. The batcher's queue-time limit counts a
//! group's wait from when its oldest send came: under overload a standing
//! queue is cut here as it is for unary sends, so sends are refused (and
//! clients throttle themselves) instead of waiting ever longer.
//!
//! Window: at most [`WINDOW`] sends of a stream wait for their answers; a
//! send past that is refused (RESOURCE_EXHAUSTED, the caller's own limit),
//! so one stream cannot queue unbounded work in the gateway. Acks leave
//! in frames holding every answer ready at once; a caller that stops
//! reading them stops the stream being read (HTTP/2 flow control).
//!
//! The stream ends when the caller half-closes it and every send has its
//! answer, when the caller's token expires (UNAUTHENTICATED), or when the
//! gateway shuts down (UNAVAILABLE). Sends unanswered when a stream breaks
//! may have been stored: the caller sends them again with the same client
//! message ids, on any gateway, and the store keeps one of each.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_proto::chat::v1 as cpb;
use chat_proto::store::v1 as spb;
use chat_resilience::layer::{Admit as _, LoadSignal};
use chat_resilience::limit::Permit;
use chat_resilience::{Criticality, LIMIT_HEADER, retry_after};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument as _;

use crate::batcher::SendBatcher;
use crate::guard::Guard;
use crate::service::{SendChecks, User};

pub use chat_proto::chat::v1::send_stream::{MAX_FRAME_SENDS, WINDOW};
/// Ack frames queued for the caller before the stream stops reading.
pub const OUT_FRAMES: usize = 32;
/// Most sends of one conversation in one group: the concurrency limit's
/// floor, so that one conversation's group alone always fits under it.
const MAX_GROUP: usize = 32;
/// Most body bytes in one group.
const MAX_GROUP_BYTES: usize = 1 << 20;

/// A send admitted on the stream, waiting for its answer.
struct Waiting {
    tag: u64,
    append: spb::AppendRequest,
    since: Instant,
}

/// A group answered: its conversation, its sends' places under the limit,
/// their tags with when each was taken on, and their outcomes.
type GroupDone = (
    String,
    Vec<Option<Permit>>,
    Vec<(u64, Instant)>,
    // The group's trace, when traces are exported.
    Option<String>,
    Vec<Result<spb::AppendResponse, Status>>,
);

pub struct SendStream {
    pub user: User,
    pub batcher: SendBatcher,
    pub sends: Arc<SendChecks>,
    pub guard: Arc<Guard>,
    pub load: Arc<LoadSignal>,
    pub stop: tokio_util::sync::CancellationToken,
    /// Counts this stream as open while it runs.
    pub open: crate::sessions::SendStreamOpen,
    /// The stream's call span (none when traces are not exported).
    pub span: tracing::Span,
    /// Each streamed send is counted as a `Send` call, with its latency.
    pub rpc: Arc<chat_telemetry::metrics::RpcMetrics>,
}

/// The answer to one send, refused or stored.
fn ack(tag: u64, outcome: Result<spb::AppendResponse, Status>) -> cpb::SendAck {
    let outcome = match outcome {
        Ok(ok) => cpb::send_ack::Outcome::Ok(cpb::SendResponse {
            seq: ok.seq,
            server_ts_ms: ok.server_ts_ms,
        }),
        Err(s) => cpb::send_ack::Outcome::Error(cpb::SendError {
            code: s.code() as i32,
            message: s.message().to_owned(),
            retry_after_ms: retry_after(&s)
                .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
            caller_limit: s.metadata().contains_key(LIMIT_HEADER),
        }),
    };
    cpb::SendAck {
        tag,
        outcome: Some(outcome),
    }
}

impl SendStream {
    pub async fn run(
        self,
        mut inbound: tonic::Streaming<cpb::SendFrame>,
        out: mpsc::Sender<Result<cpb::AckFrame, Status>>,
    ) {
        let mut state = State::default();
        let mut groups = FuturesUnordered::new();
        let mut open = true;
        let expires = tokio::time::sleep(until_unix(self.user.1));
        tokio::pin!(expires);
        let end = loop {
            let mut acks = Vec::new();
            tokio::select! {
                frame = inbound.message(), if open => match frame {
                    Ok(Some(frame)) => {
                        if frame.sends.len() > MAX_FRAME_SENDS {
                            break Some(Status::invalid_argument(format!(
                                "a frame carried {} sends, the most is {MAX_FRAME_SENDS}",
                                frame.sends.len()
                            )));
                        }
                        for s in frame.sends {
                            if let Err(e) = self.admit(&mut state, s) {
                                self.count(&e, Instant::now());
                                acks.push(e);
                            }
                        }
                    }
                    Ok(None) => open = false,
                    // The caller went away or sent what does not decode:
                    // nobody is left to answer.
                    Err(_) => break None,
                },
                Some(done) = groups.next() => {
                    self.answer(&mut state, done, &mut acks);
                    while let Some(Some(done)) = futures::FutureExt::now_or_never(groups.next()) {
                        self.answer(&mut state, done, &mut acks);
                    }
                }
                () = &mut expires => {
                    break Some(Status::unauthenticated("the token expired; open the stream again with a new one"));
                }
                () = self.stop.cancelled() => {
                    break Some(Status::unavailable("gateway is shutting down"));
                }
            }
            // Conversations whose previous group was answered, or that had
            // none: their next group goes out.
            for conversation in std::mem::take(&mut state.ready) {
                while let Some(mut group) = state.next_group(&conversation) {
                    // A place under the concurrency limit for each send, as
                    // each unary send takes one; the sends past the limit,
                    // and so the rest of the group, are refused.
                    let mut places = Vec::with_capacity(group.len());
                    let mut refusal = None;
                    for _ in 0..group.len() {
                        match self.guard.acquire(Criticality::Critical) {
                            Ok(p) => places.push(p),
                            Err(r) => {
                                refusal = Some(r);
                                break;
                            }
                        }
                    }
                    let refused = group.split_off(places.len());
                    if let Some(refusal) = refusal {
                        self.load.refused_at(Instant::now());
                        for w in refused {
                            state.answered(w.tag);
                            let a = ack(w.tag, Err(refusal.clone()));
                            self.count(&a, w.since);
                            acks.push(a);
                        }
                    }
                    if group.is_empty() {
                        state.in_flight.remove(&conversation);
                        continue;
                    }
                    groups.push(self.send_group(conversation, places, group));
                    break;
                }
            }
            if !acks.is_empty() {
                let busy = self.guard.busy() || self.load.shedding_at(Instant::now());
                if out.send(Ok(cpb::AckFrame { acks, busy })).await.is_err() {
                    break None;
                }
            }
            if !open && state.tags.is_empty() {
                break None;
            }
        };
        if let Some(status) = end {
            let _ = out.send(Err(status)).await;
        }
    }

    /// Takes one send on: refused at once (its ack), or queued behind its
    /// conversation's group in flight.
    fn admit(&self, state: &mut State, s: cpb::StreamedSend) -> Result<(), cpb::SendAck> {
        let tag = s.tag;
        if state.tags.len() >= WINDOW {
            return Err(ack(
                tag,
                Err(chat_resilience::over_limit(
                    format!(
                        "more than {WINDOW} sends wait for their answers on this stream; wait for some"
                    ),
                    Duration::from_millis(50),
                )),
            ));
        }
        if state.tags.contains(&tag) {
            return Err(ack(
                tag,
                Err(Status::invalid_argument(format!(
                    "tag {tag} is already in use by a send waiting on this stream"
                ))),
            ));
        }
        let Some(send) = s.send else {
            return Err(ack(
                tag,
                Err(Status::invalid_argument(
                    "a streamed send without a message",
                )),
            ));
        };
        let user = &self.user.0;
        let since = Instant::now();
        let append = self
            .guard
            .check_user(user)
            .and_then(|()| self.sends.check(user, send))
            .map_err(|e| ack(tag, Err(e)))?;
        state.tags.insert(tag);
        let conversation = append.conversation_id.clone();
        let queue = state.queues.entry(conversation.clone()).or_default();
        queue.push_back(Waiting { tag, append, since });
        if !state.in_flight.contains(&conversation) && queue.len() == 1 {
            state.ready.push(conversation);
        }
        Ok(())
    }

    fn send_group(
        &self,
        conversation: String,
        places: Vec<Option<Permit>>,
        group: Vec<Waiting>,
    ) -> impl std::future::Future<Output = GroupDone> + use<> {
        let batcher = self.batcher.clone();
        let span = self.group_span(&conversation, group.len());
        // The queue is first in, first out: the first waited longest.
        let waiting_since = group.first().map_or_else(Instant::now, |w| w.since);
        async move {
            let (tags, appends): (Vec<(u64, Instant)>, Vec<spb::AppendRequest>) = group
                .into_iter()
                .map(|w| ((w.tag, w.since), w.append))
                .unzip();
            let n = appends.len();
            let outcomes = match batcher
                .send_group(appends, None, waiting_since)
                .instrument(span.clone())
                .await
            {
                Ok(outcomes) => outcomes,
                Err(e) => vec![Err(e); n],
            };
            if let Some(Ok(first)) = outcomes.first() {
                span.record("seq", first.seq);
            }
            let trace = chat_telemetry::trace::trace_id(&span);
            (conversation, places, tags, trace, outcomes)
        }
    }

    /// Counts an answered send as a `Send` call taken on at `since`.
    fn count(&self, a: &cpb::SendAck, since: Instant) {
        self.count_traced(a, since, None);
    }

    /// [`Self::count`] for a send of a traced group (its trace id becomes
    /// the latency bucket's exemplar).
    fn count_traced(&self, a: &cpb::SendAck, since: Instant, trace: Option<&str>) {
        let code = match &a.outcome {
            Some(cpb::send_ack::Outcome::Error(e)) => usize::try_from(e.code).unwrap_or(2),
            _ => 0,
        };
        self.rpc.record("Send", code, since.elapsed(), trace);
    }

    /// A group's span, when traces are exported: a trace of its own per
    /// group, named as a unary send's, so a streamed send is traced from
    /// the gateway through the router to the store as a unary one is
    /// (`seq`: the group's first), and linked to the stream's span.
    fn group_span(&self, conversation: &str, messages: usize) -> tracing::Span {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        if !chat_telemetry::trace::enabled() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            parent: None,
            "send",
            otel.name = "chat.v1.Chat/Send",
            rpc.system = "grpc",
            user = %self.user.0,
            conversation = %conversation,
            seq = tracing::field::Empty,
            messages,
        );
        span.add_link(self.span.context().span().span_context().clone());
        span
    }

    fn answer(&self, state: &mut State, done: GroupDone, acks: &mut Vec<cpb::SendAck>) {
        let (conversation, places, tags, trace, outcomes) = done;
        let now = Instant::now();
        for (((tag, since), outcome), place) in tags.into_iter().zip(outcomes).zip(places) {
            // Only a stored send feeds the limit's latency samples, as
            // only a successful unary call does.
            if let (Ok(_), Some(p)) = (&outcome, place) {
                p.success_at(now);
            }
            if let Err(s) = &outcome
                && s.code() == tonic::Code::ResourceExhausted
                && !s.metadata().contains_key(LIMIT_HEADER)
            {
                self.load.refused_at(now);
            }
            state.answered(tag);
            let a = ack(tag, outcome);
            self.count_traced(&a, since, trace.as_deref());
            acks.push(a);
        }
        state.in_flight.remove(&conversation);
        if state.queues.contains_key(&conversation) {
            state.ready.push(conversation);
        }
    }
}

#[derive(Default)]
struct State {
    /// Tags of the sends admitted and not yet answered (the window).
    tags: HashSet<u64>,
    /// Per conversation, the sends waiting to go (never an empty queue).
    queues: HashMap<String, VecDeque<Waiting>>,
    /// Conversations with a group with the store.
    in_flight: HashSet<String>,
    /// Conversations whose next group may go.
    ready: Vec<String>,
}

impl State {
    fn answered(&mut self, tag: u64) {
        self.tags.remove(&tag);
    }

    /// The next group of `conversation`, marked in flight; `None` if one
    /// already is or none waits.
    fn next_group(&mut self, conversation: &str) -> Option<Vec<Waiting>> {
        if self.in_flight.contains(conversation) {
            return None;
        }
        let Entry::Occupied(mut queue) = self.queues.entry(conversation.to_owned()) else {
            return None;
        };
        let mut group = Vec::new();
        let mut bytes = 0;
        while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            let Some(w) = queue.get_mut().pop_front() else {
                break;
            };
            bytes += w.append.body.len();
            group.push(w);
        }
        if queue.get().is_empty() {
            queue.remove();
        }
        if group.is_empty() {
            return None;
        }
        self.in_flight.insert(conversation.to_owned());
        Some(group)
    }
}

/// Time left until the unix second `at` (none left if it has passed).
fn until_unix(at: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(at).saturating_sub(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(conversation: &str, tag: u64, bytes: usize) -> Waiting {
        Waiting {
            tag,
            append: spb::AppendRequest {
                conversation_id: conversation.into(),
                body: vec![0; bytes],
                ..Default::default()
            },
            since: Instant::now(),
        }
    }

    #[test]
    fn one_group_per_conversation_at_a_time_in_order_and_bounded() {
        let mut s = State::default();
        for tag in 0..(MAX_GROUP as u64 + 10) {
            s.queues
                .entry("c".into())
                .or_default()
                .push_back(waiting("c", tag, 1));
        }
        let first = s.next_group("c").expect("a group");
        assert_eq!(first.len(), MAX_GROUP);
        assert!(
            first.iter().map(|w| w.tag).eq(0..MAX_GROUP as u64),
            "in order"
        );
        assert!(s.next_group("c").is_none(), "one group in flight at a time");
        s.in_flight.remove("c");
        let second = s.next_group("c").expect("the rest");
        assert!(
            second
                .iter()
                .map(|w| w.tag)
                .eq(MAX_GROUP as u64..MAX_GROUP as u64 + 10)
        );
        s.in_flight.remove("c");
        assert!(s.next_group("c").is_none());
        assert!(s.queues.is_empty());
    }

    #[test]
    fn a_group_stops_at_its_byte_bound() {
        let mut s = State::default();
        for tag in 0..4 {
            s.queues.entry("c".into()).or_default().push_back(waiting(
                "c",
                tag,
                MAX_GROUP_BYTES / 2,
            ));
        }
        assert_eq!(s.next_group("c").expect("a group").len(), 2);
    }
}
