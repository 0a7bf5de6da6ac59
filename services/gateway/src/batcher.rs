//! Group commit at the gateway: every `Send` joins a queue, and a batch of
//! whatever is queued goes to a router as one `AppendBatch`. Batches follow
//! the load (`Pipe`): with no batch out, the first send leaves at once;
//! while one is out, the queue fills until it comes back and the next batch
//! takes everything queued, so batches grow with the load and each one's
//! fixed cost (a router call, a store call) is shared by more sends. Only
//! when the newest batch out is late (twice the usual round trip: a router
//! or store leader that vanished) may another leave, up to
//! `MAX_IN_FLIGHT`, so one stuck call does not hold every send back.
//!
//! Admission: this queue is where work waits when the cluster is offered
//! more than it can take (everything downstream is bounded by
//! `MAX_IN_FLIGHT`).
//! With overload protection on, a send whose caller has gone away is
//! dropped unsent, and a send that waited longer than the queue-time limit
//! is refused with RESOURCE_EXHAUSTED and a `retry-after-ms` hint, so the
//! cluster spends its capacity on sends that can still be answered in time.
//! The limit applies to a standing queue only (as in CoDel): a send is
//! refused for its wait when an earlier batch, less than
//! [`STANDING_FOR`] ago, also found sends queued past the limit. A queue
//! that grew while the store stalled (a leader election: no batch came back
//! for half a second) is sent whole in the next batch, which costs one
//! batch, not a refusal per waiting user.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_proto::store::v1 as spb;
use chat_resilience::Criticality;
use chat_resilience::deadline::Deadline;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tonic::Status;

use chat_rollout::Lane;
use opentelemetry::trace::TraceContextExt as _;
use tracing::Instrument as _;

use crate::routers::RouterPool;

/// Sends queued before new ones are refused with RESOURCE_EXHAUSTED.
pub const SEND_QUEUE: usize = 16_384;
/// Most messages in one batch.
const MAX_BATCH: usize = 1_024;
/// Most body bytes in one batch (well under the routers' and the store's
/// request limits, so one big batch is never refused whole).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most batches outstanding at once (more than one only while the newest
/// is late; see `Pipe`).
const MAX_IN_FLIGHT: usize = 4;
/// A batch out for longer than twice the smoothed round trip, within these
/// bounds, is late: another may leave beside it.
const LATE_MIN: Duration = Duration::from_millis(2);
const LATE_MAX: Duration = Duration::from_millis(50);
/// How long the queue counts as standing after a batch found a send that
/// had waited past the limit.
const STANDING_FOR: Duration = Duration::from_secs(1);

/// The outcomes of a group's sends, in the group's order.
type Outcomes = Vec<Result<spb::AppendResponse, Status>>;
type Reply = oneshot::Sender<Outcomes>;
/// Sends that travel together (one unary send, or a conversation's sends
/// from one stream, kept in order in one batch), their reply, when they
/// were queued and when their caller stops waiting. The caller's span
/// travels with them, so the batch's call is traced as part of the first
/// group in it (and linked to the others).
type Queued = (
    Vec<spb::AppendRequest>,
    Reply,
    Instant,
    Option<Deadline>,
    tracing::Span,
);
type Admitted = (
    Vec<spb::AppendRequest>,
    Reply,
    Option<Deadline>,
    tracing::Span,
);

/// Overload protection of the send path.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    /// Off: every queued send is sent, however long it waited.
    pub enabled: bool,
    /// Longest a send may wait in the queue.
    pub max_queue_time: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            enabled: true,
            max_queue_time: Duration::from_millis(300),
        }
    }
}

pub use chat_resilience::overloaded;

#[derive(Clone)]
pub struct SendBatcher {
    tx: mpsc::Sender<Queued>,
}

impl SendBatcher {
    pub fn start(pool: Arc<RouterPool>, admission: Admission) -> Self {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        tokio::spawn(run(pool, rx, admission));
        Self { tx }
    }

    /// Appends one message; answered when the store has committed it.
    pub async fn send(
        &self,
        req: spb::AppendRequest,
        deadline: Option<Deadline>,
    ) -> Result<spb::AppendResponse, Status> {
        self.send_group(vec![req], deadline, Instant::now())
            .await?
            .pop()
            .unwrap_or_else(|| Err(Status::internal("no outcome for a send")))
    }

    /// Appends messages of one sender in one batch, in their order (sends
    /// of one conversation are stored in that order); answered with each
    /// one's outcome when the store has committed them. `Err`: none was
    /// sent. `waiting_since`: when the oldest of them began to wait (a
    /// stream's sends may have waited behind their conversation's previous
    /// group); the queue-time limit counts from then.
    pub async fn send_group(
        &self,
        reqs: Vec<spb::AppendRequest>,
        deadline: Option<Deadline>,
        waiting_since: Instant,
    ) -> Result<Outcomes, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send((
                reqs,
                reply,
                waiting_since,
                deadline,
                tracing::Span::current(),
            ))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => overloaded(
                    "gateway send queue is full; retry shortly",
                    Duration::from_millis(500),
                ),
                mpsc::error::TrySendError::Closed(_) => {
                    Status::unavailable("gateway is shutting down")
                }
            })?;
        rx.await
            .map_err(|_| Status::unavailable("gateway is shutting down"))
    }
}

/// Whether a queued send still goes out; answers it when it does not.
/// `late` is set when the send waited past the limit; it is refused for
/// that only when the queue was `standing` (an earlier batch found late
/// sends too, within [`STANDING_FOR`]).
fn admit(item: Queued, admission: Admission, standing: bool, late: &mut bool) -> Option<Admitted> {
    let (req, reply, queued, deadline, span) = item;
    if !admission.enabled {
        return Some((req, reply, deadline, span));
    }
    if reply.is_closed() || deadline.is_some_and(|d| d.expired()) {
        // The caller gave up (deadline, disconnect): nobody would see the ack.
        return None;
    }
    let waited = queued.elapsed();
    if waited > admission.max_queue_time {
        *late = true;
        if standing {
            let refusal = overloaded(
                format!(
                    "gateway overloaded: the send waited {} ms in the queue (limit {} ms); retry later",
                    waited.as_millis(),
                    admission.max_queue_time.as_millis()
                ),
                admission.max_queue_time,
            );
            let _ = reply.send(vec![Err(refusal); req.len()]);
            return None;
        }
    }
    Some((req, reply, deadline, span))
}

/// When the next batch may leave: at once when none is out; otherwise once
/// the newest batch out is late (out for twice the smoothed round trip,
/// within `LATE_MIN..=LATE_MAX`), or as soon as the batches out come back.
#[derive(Debug, Default)]
struct Pipe {
    out: usize,
    last_departure: Option<Instant>,
    /// Smoothed round trip of a batch (router, store and back).
    rtt: Option<Duration>,
}

impl Pipe {
    /// `None`: a batch may leave now; otherwise how long until the newest
    /// batch out counts as late.
    fn wait(&self, now: Instant) -> Option<Duration> {
        let last = self.last_departure.filter(|_| self.out > 0)?;
        let late_after = self
            .rtt
            .map_or(LATE_MAX, |r| r * 2)
            .clamp(LATE_MIN, LATE_MAX);
        late_after
            .checked_sub(now.saturating_duration_since(last))
            .filter(|d| !d.is_zero())
    }

    fn depart(&mut self, now: Instant) {
        self.out += 1;
        self.last_departure = Some(now);
    }

    fn arrive(&mut self, rtt: Duration) {
        self.out = self.out.saturating_sub(1);
        self.rtt = Some(match self.rtt {
            Some(r) => (r * 7 + rtt) / 8,
            None => rtt,
        });
    }
}

/// Waits until a batch may leave (see `Pipe`).
async fn wait_turn(pipe: &std::sync::Mutex<Pipe>, arrived: &mut watch::Receiver<()>) {
    loop {
        arrived.borrow_and_update();
        let wait = pipe
            .lock()
            .expect("batcher pipe lock poisoned")
            .wait(Instant::now());
        let Some(wait) = wait else { return };
        tokio::select! {
            r = arrived.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => return,
        }
    }
}

async fn run(pool: Arc<RouterPool>, mut rx: mpsc::Receiver<Queued>, admission: Admission) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let pipe = Arc::new(std::sync::Mutex::new(Pipe::default()));
    let (arrival, mut arrived) = watch::channel(());
    let arrival = Arc::new(arrival);
    // When a batch last found sends queued past the limit.
    let mut last_late: Option<Instant> = None;
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        wait_turn(&pipe, &mut arrived).await;
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut count = 0;
        let mut late = false;
        let standing = last_late.is_some_and(|t| t.elapsed() < STANDING_FOR);
        if let Some(x) = admit(first, admission, standing, &mut late) {
            bytes += group_bytes(&x.0);
            count += x.0.len();
            batch.push(x);
        }
        while count < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(x) => {
                    if let Some(x) = admit(x, admission, standing, &mut late) {
                        bytes += group_bytes(&x.0);
                        count += x.0.len();
                        batch.push(x);
                    }
                }
                Err(_) => break,
            }
        }
        if late {
            last_late = Some(Instant::now());
        }
        if batch.is_empty() {
            continue;
        }
        let departed = Instant::now();
        pipe.lock()
            .expect("batcher pipe lock poisoned")
            .depart(departed);
        let pool = pool.clone();
        let pipe = pipe.clone();
        let arrival = arrival.clone();
        tokio::spawn(async move {
            // One call per lane: during a rollout each sender's messages go
            // to the routers the plan gives them.
            let mut lanes: Vec<(Lane, Vec<Admitted>)> = Vec::new();
            for item in batch {
                let Some(sender) = item.0.first().map(|r| r.sender.as_str()) else {
                    let _ = item.1.send(Vec::new());
                    continue;
                };
                let lane = pool.lane_of(sender);
                match lanes.iter_mut().find(|(l, _)| *l == lane) {
                    Some((_, items)) => items.push(item),
                    None => lanes.push((lane, vec![item])),
                }
            }
            futures::future::join_all(
                lanes
                    .into_iter()
                    .map(|(lane, items)| send_batch(&pool, lane, items)),
            )
            .await;
            pipe.lock()
                .expect("batcher pipe lock poisoned")
                .arrive(departed.elapsed());
            arrival.send_replace(());
            drop(permit);
        });
    }
}

fn group_bytes(group: &[spb::AppendRequest]) -> usize {
    group.iter().map(|r| r.body.len()).sum()
}

/// The span of a batch's router call: a child of its first send's span,
/// linked to the others' (none when traces are not exported).
fn batch_span(batch: &[Admitted]) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !chat_telemetry::trace::enabled() {
        return tracing::Span::none();
    }
    let Some((_, _, _, first)) = batch.first() else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        parent: first,
        "append_batch",
        otel.name = "gateway/AppendBatch",
        messages = batch.len()
    );
    for (_, _, _, other) in &batch[1..] {
        span.add_link(other.context().span().span_context().clone());
    }
    span
}

/// Sends one batch through routers of `lane` and answers every sender.
async fn send_batch(pool: &RouterPool, lane: Lane, batch: Vec<Admitted>) {
    // The batch is worth sending until its most patient caller gives up.
    let deadline = batch
        .iter()
        .map(|(_, _, d, _)| *d)
        .try_fold(None::<Deadline>, |acc, d| {
            d.map(|d| Some(acc.map_or(d, |a| Deadline(a.0.max(d.0)))))
        })
        .flatten();
    let span = batch_span(&batch);
    let mut items = Vec::with_capacity(batch.iter().map(|g| g.0.len()).sum());
    let mut replies = Vec::with_capacity(batch.len());
    for (group, reply, _, _) in batch {
        replies.push((group.len(), reply));
        items.extend(group);
    }
    let n = items.len() as u64;
    let req = spb::AppendBatchRequest { items };
    let result = pool
        .call(
            lane,
            n,
            Criticality::Critical,
            deadline,
            |mut c, timeout| {
                let mut r = tonic::Request::new(req.clone());
                r.set_timeout(timeout);
                Criticality::Critical.stamp(&mut r);
                chat_telemetry::trace::inject(&mut r);
                async move { c.append_batch(r).await }
            },
        )
        .instrument(span)
        .await;
    match result {
        Ok(resp) => {
            let mut outcomes = resp.items.into_iter();
            for (n, reply) in replies {
                let group = (&mut outcomes)
                    .take(n)
                    .map(|o| match o.outcome {
                        Some(spb::append_outcome::Outcome::Ok(ok)) => Ok(ok),
                        Some(spb::append_outcome::Outcome::Error(e)) => {
                            Err(Status::new(tonic::Code::from(e.code), e.message))
                        }
                        None => Err(Status::internal("router returned no outcome for a message")),
                    })
                    .chain(std::iter::repeat_with(|| {
                        Err(Status::internal("router returned no outcome for a message"))
                    }))
                    .take(n)
                    .collect();
                let _ = reply.send(group);
            }
        }
        Err(s) => {
            for (n, reply) in replies {
                let _ = reply.send(vec![Err(s.clone()); n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_leaves_at_once_when_none_is_out_and_waits_for_the_one_out() {
        let mut pipe = Pipe::default();
        let t0 = Instant::now();
        assert_eq!(pipe.wait(t0), None, "nothing out: leave at once");
        pipe.depart(t0);
        pipe.arrive(Duration::from_millis(4));
        assert_eq!(pipe.wait(t0), None, "it came back: leave at once");

        let t1 = t0 + Duration::from_millis(10);
        pipe.depart(t1);
        let wait = pipe
            .wait(t1 + Duration::from_millis(1))
            .expect("one is out");
        assert_eq!(
            wait,
            Duration::from_millis(7),
            "late after twice the round trip"
        );
        pipe.arrive(Duration::from_millis(4));
        assert_eq!(pipe.wait(t1 + Duration::from_millis(1)), None);
    }

    #[test]
    fn a_late_batch_lets_another_leave_beside_it() {
        let mut pipe = Pipe::default();
        let t0 = Instant::now();
        pipe.depart(t0);
        pipe.arrive(Duration::from_millis(5));
        pipe.depart(t0);
        assert!(pipe.wait(t0 + Duration::from_millis(9)).is_some());
        assert_eq!(
            pipe.wait(t0 + Duration::from_millis(10)),
            None,
            "late: another may go"
        );
        // A second batch left beside the late one: the next waits on it.
        let t1 = t0 + Duration::from_millis(10);
        pipe.depart(t1);
        assert!(pipe.wait(t1).is_some());
    }

    #[test]
    fn lateness_is_bounded_whatever_the_round_trip() {
        let mut pipe = Pipe::default();
        let t0 = Instant::now();
        // No round trip measured yet, or a very slow one (a leader
        // election): a stuck batch still lets another go within LATE_MAX.
        pipe.depart(t0);
        assert_eq!(pipe.wait(t0), Some(LATE_MAX));
        pipe.arrive(Duration::from_secs(5));
        pipe.depart(t0);
        assert_eq!(pipe.wait(t0), Some(LATE_MAX));
        // A very fast one: not less than LATE_MIN.
        let mut fast = Pipe::default();
        fast.depart(t0);
        fast.arrive(Duration::from_micros(10));
        fast.depart(t0);
        assert_eq!(fast.wait(t0), Some(LATE_MIN));
    }

    fn queued(age: Duration) -> (Queued, oneshot::Receiver<Outcomes>) {
        let (reply, rx) = oneshot::channel();
        let at = Instant::now() - age;
        (
            (
                vec![spb::AppendRequest::default()],
                reply,
                at,
                None,
                tracing::Span::none(),
            ),
            rx,
        )
    }

    #[test]
    fn a_send_that_waited_too_long_is_refused_with_a_retry_hint() {
        let on = Admission::default();
        let (item, mut rx) = queued(on.max_queue_time + Duration::from_millis(50));
        let mut late = false;
        assert!(admit(item, on, true, &mut late).is_none());
        assert!(late);
        let status = rx
            .try_recv()
            .expect("answered")
            .remove(0)
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("waited"), "{}", status.message());
        assert_eq!(
            status.metadata().get("retry-after-ms").unwrap(),
            &on.max_queue_time.as_millis().to_string()
        );
    }

    #[test]
    fn a_queue_that_grew_in_a_stall_goes_out_whole_then_a_standing_one_is_cut() {
        let on = Admission::default();
        let old = on.max_queue_time + Duration::from_millis(200);
        // The store stalled: the first batch after it finds late sends, but
        // the batch before found none. They go out.
        let mut late = false;
        let (item, mut rx) = queued(old);
        assert!(admit(item, on, false, &mut late).is_some());
        assert!(late, "noted as late");
        assert!(rx.try_recv().is_err(), "not answered: sent");
        // The next batch finds late sends again: a standing queue. Refused.
        let (item, mut rx) = queued(old);
        assert!(admit(item, on, late, &mut false).is_none());
        let status = rx
            .try_recv()
            .expect("answered")
            .remove(0)
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn abandoned_sends_are_dropped_and_fresh_ones_pass() {
        let on = Admission::default();
        let (item, rx) = queued(Duration::ZERO);
        drop(rx);
        assert!(
            admit(item, on, true, &mut false).is_none(),
            "nobody waits for this ack"
        );
        let (item, _rx) = queued(Duration::from_millis(10));
        let mut late = false;
        assert!(admit(item, on, true, &mut late).is_some());
        assert!(!late);
    }

    #[test]
    fn sends_past_their_deadline_are_dropped() {
        let on = Admission::default();
        let (reply, _rx) = oneshot::channel();
        let gone = Deadline(Instant::now() - Duration::from_millis(1));
        let item = (
            vec![spb::AppendRequest::default()],
            reply,
            Instant::now(),
            Some(gone),
            tracing::Span::none(),
        );
        assert!(admit(item, on, true, &mut false).is_none());
    }

    #[test]
    fn with_protection_off_everything_queued_is_sent() {
        let off = Admission {
            enabled: false,
            ..Admission::default()
        };
        let (item, rx) = queued(Duration::from_secs(30));
        drop(rx);
        assert!(admit(item, off, true, &mut false).is_some());
    }
}
