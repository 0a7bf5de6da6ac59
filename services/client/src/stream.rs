//! Sends over `SendStream`: every send of a client (and its clones) shares
//! one stream to one gateway, opened when the first send is made and again
//! on the next gateway after it breaks. Sends made while others are on
//! their way leave together in one frame; acks come back in frames too.
//!
//! A send whose stream breaks before its ack fails with UNAVAILABLE, and
//! the client's retry loop sends it again (same client message id, so the
//! store keeps one) on the stream opened next. At most [`WINDOW`] sends
//! wait for acks at once, the gateway's own bound, so the gateway never
//! refuses one of this client's sends for its window.

use std::collections::HashMap;
use std::sync::Arc;

use chat_proto::chat::v1 as pb;
use chat_proto::chat::v1::chat_client::ChatClient as RawClient;
use chat_resilience::retry::Load;
use chat_resilience::{LIMIT_HEADER, with_retry_after};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Sends that may wait for their acks at once (the gateway's bound).
pub use chat_proto::chat::v1::send_stream::WINDOW;
/// Bodies larger than this go as unary calls: a frame must stay well under
/// the gateway's largest request, and one such body is a frame of its own
/// anyway.
pub const MAX_STREAMED_BODY: usize = 32 << 10;
/// Most body bytes gathered into one frame.
const FRAME_BYTES: usize = 48 << 10;
/// Most sends in one frame (the gateway's bound).
const FRAME_SENDS: usize = chat_proto::chat::v1::send_stream::MAX_FRAME_SENDS;

type Answer = Result<(pb::SendResponse, Load), Status>;

struct Outgoing {
    send: pb::SendRequest,
    reply: oneshot::Sender<Answer>,
    /// Its place in the window, given back when the gateway answers it or
    /// its stream breaks (not when its caller stops waiting: the gateway
    /// still counts it).
    place: OwnedSemaphorePermit,
}

type Pending = HashMap<u64, (oneshot::Sender<Answer>, OwnedSemaphorePermit)>;

/// The client's side of its send stream.
pub(crate) struct Streamer {
    tx: mpsc::Sender<Outgoing>,
    window: Arc<Semaphore>,
}

impl Streamer {
    /// Starts the task that owns the stream; it ends when this is dropped.
    pub(crate) fn start(channels: Vec<Channel>, token: MetadataValue<Ascii>, first: usize) -> Self {
        let (tx, rx) = mpsc::channel(WINDOW);
        tokio::spawn(run(channels, token, first, rx));
        Self {
            tx,
            window: Arc::new(Semaphore::new(WINDOW)),
        }
    }

    /// One attempt at a send: its ack, and what the gateway said of its
    /// load in the frame that carried it.
    pub(crate) async fn send(&self, send: pb::SendRequest) -> Answer {
        let place = self
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the client is closing"))?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Outgoing { send, reply, place })
            .await
            .map_err(|_| Status::unavailable("the client is closing"))?;
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("the send stream ended")))
    }
}

/// What an ack says, as a unary call would have answered.
fn answer(ack: pb::SendAck, busy: bool) -> Answer {
    let load = if busy { Load::Busy } else { Load::Ok };
    match ack.outcome {
        Some(pb::send_ack::Outcome::Ok(ok)) => Ok((ok, load)),
        Some(pb::send_ack::Outcome::Error(e)) => {
            let mut s = Status::new(Code::from(e.code), e.message);
            if e.retry_after_ms > 0 {
                s = with_retry_after(s, std::time::Duration::from_millis(e.retry_after_ms.into()));
            }
            if e.caller_limit {
                s.metadata_mut()
                    .insert(LIMIT_HEADER, MetadataValue::from_static("caller"));
            }
            Err(s)
        }
        None => Err(Status::internal("the gateway answered a send with nothing")),
    }
}

struct Open {
    /// Unbounded, so that writing a frame never waits: the task must keep
    /// reading acks while the gateway is slow to read frames (the gateway
    /// stops reading frames while its acks are not read). What it holds is
    /// bounded by the window.
    frames: mpsc::UnboundedSender<pb::SendFrame>,
    acks: tonic::Streaming<pb::AckFrame>,
}

async fn run(
    channels: Vec<Channel>,
    token: MetadataValue<Ascii>,
    mut next: usize,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut pending = Pending::new();
    let mut tag = 0u64;
    let mut open: Option<Open> = None;
    loop {
        tokio::select! {
            first = rx.recv() => {
                let Some(first) = first else { return };
                let mut batch = vec![first];
                let mut bytes = batch[0].send.body.len();
                while batch.len() < FRAME_SENDS && bytes < FRAME_BYTES {
                    let Ok(o) = rx.try_recv() else { break };
                    bytes += o.send.body.len();
                    batch.push(o);
                }
                let mut frame = pb::SendFrame { sends: Vec::with_capacity(batch.len()) };
                for o in batch {
                    tag = tag.wrapping_add(1);
                    pending.insert(tag, (o.reply, o.place));
                    frame.sends.push(pb::StreamedSend { tag, send: Some(o.send) });
                }
                let sent = match &open {
                    Some(o) => o.frames.send(frame).is_ok(),
                    None => {
                        let channel = channels[next % channels.len()].clone();
                        next = next.wrapping_add(1);
                        match start(channel, &token, frame).await {
                            Ok(o) => {
                                open = Some(o);
                                true
                            }
                            Err(s) => {
                                fail(&mut pending, &s);
                                continue;
                            }
                        }
                    }
                };
                if !sent {
                    open = None;
                    fail(&mut pending, &Status::unavailable("the send stream broke"));
                }
            }
            frame = async { open.as_mut().expect("guarded").acks.message().await }, if open.is_some() => {
                match frame {
                    Ok(Some(frame)) => {
                        for ack in frame.acks {
                            if let Some((reply, _place)) = pending.remove(&ack.tag) {
                                let _ = reply.send(answer(ack, frame.busy));
                            }
                        }
                    }
                    Ok(None) => {
                        open = None;
                        fail(&mut pending, &Status::unavailable("the gateway ended the send stream"));
                    }
                    Err(s) => {
                        open = None;
                        let s = if s.code() == Code::Unimplemented {
                            s
                        } else {
                            Status::unavailable(format!("the send stream broke: {}", s.message()))
                        };
                        fail(&mut pending, &s);
                    }
                }
            }
        }
    }
}

/// Every send waiting for an ack fails with `s`: its stream is gone.
fn fail(pending: &mut Pending, s: &Status) {
    for (_, (reply, _place)) in pending.drain() {
        let _ = reply.send(Err(s.clone()));
    }
}

/// Opens a stream on `channel` with `first` as its first frame.
async fn start(
    channel: Channel,
    token: &MetadataValue<Ascii>,
    first: pb::SendFrame,
) -> Result<Open, Status> {
    // Unbounded only in type: every frame carries sends that each hold a
    // place in the window, so at most `WINDOW` sends wait in it.
    let (frames, rx) = mpsc::unbounded_channel();
    frames
        .send(first)
        .map_err(|_| Status::internal("frame queue closed"))?;
    let mut req = Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    req.metadata_mut().insert("authorization", token.clone());
    let acks = RawClient::new(channel).send_stream(req).await?.into_inner();
    Ok(Open { frames, acks })
}
