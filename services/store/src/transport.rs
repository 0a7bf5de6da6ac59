//! Raft messages between replicas over tonic gRPC. The only module (with
//! `service`) that knows tonic.
//!
//! Each peer has a bounded queue drained by its own task, which keeps one
//! client stream open and sends whatever is queued as one batch. A full
//! queue drops messages: raft retransmits, and an unbounded buffer would
//! only grow while a peer is down. Snapshots go by a unary call so that the
//! outcome can be reported back to raft. Connection failures are retried
//! with exponential backoff and full jitter.

use std::collections::HashMap;
use std::time::Duration;

use chat_proto::raft::v1::raft_transport_client::RaftTransportClient;
use chat_proto::raft::v1::raft_transport_server::RaftTransport;
use chat_proto::raft::v1::{Ack, RaftBatch};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::faults::Faults;
use crate::node::Addresses;
use crate::types::NodeId;

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 4096;
/// Batches in flight on one peer stream.
const STREAM_QUEUE: usize = 64;
/// Most messages in one batch.
const MAX_BATCH: usize = 512;
/// Capacity of the driver's inbox of received raft messages; when full,
/// received messages are dropped.
pub const INBOX: usize = 8192;
/// Largest transport message (snapshots carry the whole state machine).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Feedback from the transport to the driver.
#[derive(Debug)]
pub enum TransportEvent {
    Unreachable(NodeId),
    /// A snapshot was delivered (true) or not (false).
    Snapshot(NodeId, bool),
}

struct Peer {
    addr: String,
    tx: mpsc::Sender<Message>,
}

/// The sending half, owned by the driver.
pub struct Transport {
    id: NodeId,
    peers: HashMap<NodeId, Peer>,
    addresses: Addresses,
    events: mpsc::Sender<TransportEvent>,
    faults: Faults,
    runtime: Handle,
    shutdown: CancellationToken,
}

impl Transport {
    pub fn new(
        id: NodeId,
        addresses: Addresses,
        events: mpsc::Sender<TransportEvent>,
        faults: Faults,
        runtime: Handle,
    ) -> Self {
        Self {
            id,
            peers: HashMap::new(),
            addresses,
            events,
            faults,
            runtime,
            shutdown: CancellationToken::new(),
        }
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    pub fn set_peer(&mut self, id: NodeId, addr: String) {
        self.addresses.set(id, addr.clone());
        if self.peers.get(&id).is_some_and(|p| p.addr != addr) {
            self.peers.remove(&id);
        }
    }

    pub fn remove_peer(&mut self, id: NodeId) {
        if id != self.id {
            self.addresses.remove(id);
        }
        self.peers.remove(&id);
    }

    fn report(&self, e: TransportEvent) {
        let _ = self.events.try_send(e);
    }

    /// Queues messages for their peers; never waits.
    pub fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = NodeId(m.to);
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            if !self.faults.passes(self.id, to) {
                if is_snapshot {
                    self.report(TransportEvent::Snapshot(to, false));
                }
                continue;
            }
            if self.peers.get(&to).is_none_or(|p| p.tx.is_closed()) {
                let Some(addr) = self.addresses.get(to) else {
                    debug!(to = %to, "no address for peer; dropping message");
                    self.report(TransportEvent::Unreachable(to));
                    if is_snapshot {
                        self.report(TransportEvent::Snapshot(to, false));
                    }
                    continue;
                };
                let tx = self.spawn_peer(to, addr.clone());
                self.peers.insert(to, Peer { addr, tx });
            }
            let peer = self.peers.get(&to).expect("peer just inserted");
            if let Err(e) = peer.tx.try_send(m) {
                if is_snapshot {
                    self.report(TransportEvent::Snapshot(to, false));
                }
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    debug!(to = %to, "peer queue full; dropping message");
                }
            }
        }
    }

    fn spawn_peer(&self, to: NodeId, addr: String) -> mpsc::Sender<Message> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let link = PeerLink {
            from: self.id,
            from_address: self.addresses.get(self.id).unwrap_or_default(),
            to,
            addr,
            events: self.events.clone(),
            faults: self.faults.clone(),
            shutdown: self.shutdown.clone(),
        };
        self.runtime.spawn(link.run(rx));
        tx
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

struct PeerLink {
    from: NodeId,
    from_address: String,
    to: NodeId,
    addr: String,
    events: mpsc::Sender<TransportEvent>,
    faults: Faults,
    shutdown: CancellationToken,
}

fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true))
}

impl PeerLink {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let channel = match endpoint(&self.addr) {
                Ok(ep) => tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    c = ep.connect() => c,
                },
                Err(e) => {
                    warn!(to = %self.to, addr = %self.addr, error = %e, "invalid peer address");
                    rx.close();
                    while let Ok(m) = rx.try_recv() {
                        if m.get_msg_type() == MessageType::MsgSnapshot {
                            let _ = self
                                .events
                                .send(TransportEvent::Snapshot(self.to, false))
                                .await;
                        }
                    }
                    return;
                }
            };
            match channel {
                Ok(channel) => {
                    backoff = BACKOFF_MIN;
                    if self.stream(channel, &mut rx).await {
                        return;
                    }
                }
                Err(e) => debug!(to = %self.to, error = %e, "cannot connect to peer"),
            }
            let _ = self.events.try_send(TransportEvent::Unreachable(self.to));
            // Whatever queued while disconnected is stale; raft resends.
            while let Ok(m) = rx.try_recv() {
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    let _ = self
                        .events
                        .try_send(TransportEvent::Snapshot(self.to, false));
                }
            }
            let jittered = backoff.mul_f64(rand::random::<f64>());
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Feeds one stream until it breaks; true when the link should stop.
    async fn stream(&self, channel: Channel, rx: &mut mpsc::Receiver<Message>) -> bool {
        let mut client = RaftTransportClient::new(channel)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (stx, srx) = mpsc::channel::<RaftBatch>(STREAM_QUEUE);
        let mut call_client = client.clone();
        let mut call =
            tokio::spawn(async move { call_client.stream(ReceiverStream::new(srx)).await });
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    call.abort();
                    return true;
                }
                res = &mut call => {
                    debug!(to = %self.to, result = ?res.map(|r| r.map(|_| ())), "peer stream ended");
                    return false;
                }
                m = rx.recv() => {
                    let Some(first) = m else {
                        call.abort();
                        return true;
                    };
                    let mut messages = Vec::with_capacity(16);
                    let mut pending = Some(first);
                    while let Some(m) = pending.take().or_else(|| rx.try_recv().ok()) {
                        if m.get_msg_type() == MessageType::MsgSnapshot {
                            self.send_snapshot(&mut client, m);
                        } else if let Ok(raw) = m.write_to_bytes() {
                            messages.push(raw);
                        }
                        if messages.len() >= MAX_BATCH {
                            break;
                        }
                    }
                    if messages.is_empty() {
                        continue;
                    }
                    let delay = self.faults.delay();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let batch = RaftBatch { from: self.from.0, messages, from_address: self.from_address.clone() };
                    if stx.send(batch).await.is_err() {
                        return false;
                    }
                }
            }
        }
    }

    fn send_snapshot(&self, client: &mut RaftTransportClient<Channel>, m: Message) {
        let mut client = client.clone();
        let events = self.events.clone();
        let (from, to, from_address) = (self.from, self.to, self.from_address.clone());
        tokio::spawn(async move {
            let ok = match m.write_to_bytes() {
                Ok(raw) => {
                    let call = client.install_snapshot(RaftBatch {
                        from: from.0,
                        messages: vec![raw],
                        from_address,
                    });
                    matches!(
                        tokio::time::timeout(SNAPSHOT_TIMEOUT, call).await,
                        Ok(Ok(_))
                    )
                }
                Err(_) => false,
            };
            debug!(to = %to, ok, "snapshot sent");
            let _ = events.send(TransportEvent::Snapshot(to, ok)).await;
        });
    }
}

/// The receiving half: a gRPC service feeding the driver's inbox.
pub struct RaftService {
    pub id: NodeId,
    pub inbox: mpsc::Sender<Message>,
    pub addresses: Addresses,
    pub faults: Faults,
    pub shutdown: CancellationToken,
}

impl RaftService {
    fn decode(&self, batch: &RaftBatch) -> Result<Vec<Message>, Status> {
        if !self.faults.passes(NodeId(batch.from), self.id) {
            return Ok(Vec::new());
        }
        let from = NodeId(batch.from);
        if !batch.from_address.is_empty() && from != self.id && self.addresses.get(from).is_none() {
            debug!(peer = %from, address = %batch.from_address, "learned a peer's address");
            self.addresses.set(from, batch.from_address.clone());
        }
        batch
            .messages
            .iter()
            .map(|raw| {
                Message::parse_from_bytes(raw)
                    .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
            })
            .collect()
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn stream(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<Ack>, Status> {
        let mut stream = request.into_inner();
        loop {
            let batch = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(Status::unavailable("replica is shutting down")),
                b = stream.message() => b?,
            };
            let Some(batch) = batch else {
                return Ok(Response::new(Ack {}));
            };
            for m in self.decode(&batch)? {
                if m.to != self.id.0 {
                    continue;
                }
                if self.inbox.try_send(m).is_err() {
                    debug!("raft inbox full; dropping message");
                }
            }
        }
    }

    async fn install_snapshot(&self, request: Request<RaftBatch>) -> Result<Response<Ack>, Status> {
        let batch = request.into_inner();
        let msgs = self.decode(&batch)?;
        if msgs.is_empty() {
            return Err(Status::unavailable("link is cut"));
        }
        for m in msgs {
            if m.to != self.id.0 {
                return Err(Status::invalid_argument(format!(
                    "snapshot for replica {} sent to replica {}",
                    m.to, self.id
                )));
            }
            self.inbox
                .send(m)
                .await
                .map_err(|_| Status::unavailable("replica is shutting down"))?;
        }
        Ok(Response::new(Ack {}))
    }
}
