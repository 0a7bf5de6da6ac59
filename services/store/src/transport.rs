//! Raft messages between replicas over tonic gRPC. The only module (with
//! `service`) that knows tonic.
//!
//! Each peer has a bounded queue drained by its own task, which keeps one
//! client stream open and sends whatever is queued as one batch. A full
//! queue drops messages: raft retransmits, and an unbounded buffer would
//! only grow while a peer is down. A snapshot's file goes first, in chunks
//! on a stream of its own, resuming from what the receiver already holds;
//! then raft's snapshot message, by a unary call so that the outcome can be
//! reported back to raft. Connection failures are retried with exponential
//! backoff and full jitter.

use std::collections::HashMap;
use std::time::Duration;

use chat_proto::raft::v1::raft_transport_client::RaftTransportClient;
use chat_proto::raft::v1::raft_transport_server::RaftTransport;
use chat_proto::raft::v1::{Ack, RaftBatch, SnapshotChunk, SnapshotFile, SnapshotReceived};
use futures::StreamExt as _;
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
use crate::snapshot::{Descriptor, Snapshots};
use crate::types::NodeId;

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 4096;
/// Batches in flight on one peer stream.
const STREAM_QUEUE: usize = 64;
/// Most messages in one batch.
const MAX_BATCH: usize = 512;
/// A batch stops growing past this many bytes (appends to a lagging
/// follower carry up to 1 MiB each), well below `MAX_MESSAGE_BYTES`.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Capacity of the driver's inbox of received raft messages; when full,
/// received messages are dropped.
pub const INBOX: usize = 8192;
/// Largest transport message: a batch of raft messages or a snapshot chunk.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Default size of a snapshot file's chunks.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A snapshot transfer fails when no chunk got through for this long.
const SNAPSHOT_STALL: Duration = Duration::from_secs(30);
/// Chunks read ahead of the network.
const SNAPSHOT_READ_AHEAD: usize = 2;

/// Feedback from the transport to the driver.
#[derive(Debug)]
pub enum TransportEvent {
    Unreachable(NodeId),
    /// A snapshot was delivered (true) or not (false).
    Snapshot(NodeId, bool),
}

/// What the driver needs of the network: where raft's messages go. The
/// `Transport` below in production; the simulator's queues in `sim`.
pub trait Network: Send {
    /// Queues messages for their peers; never waits.
    fn send(&mut self, msgs: Vec<Message>);
    fn set_peer(&mut self, id: NodeId, addr: String);
    fn remove_peer(&mut self, id: NodeId);
    fn addresses(&self) -> &Addresses;
    fn shutdown(&self);
}

impl Network for Transport {
    fn send(&mut self, msgs: Vec<Message>) {
        Transport::send(self, msgs)
    }

    fn set_peer(&mut self, id: NodeId, addr: String) {
        Transport::set_peer(self, id, addr)
    }

    fn remove_peer(&mut self, id: NodeId) {
        Transport::remove_peer(self, id)
    }

    fn addresses(&self) -> &Addresses {
        Transport::addresses(self)
    }

    fn shutdown(&self) {
        Transport::shutdown(self)
    }
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
    snapshots: LinkOptions,
}

/// How links to peers run: where snapshot files come from, in what chunks
/// they go, and the identity presented (None: plaintext).
#[derive(Clone)]
pub struct LinkOptions {
    pub files: std::sync::Arc<Snapshots>,
    pub chunk_bytes: usize,
    pub tls: Option<std::sync::Arc<chat_security::Tls>>,
}

impl Transport {
    pub fn new(
        id: NodeId,
        addresses: Addresses,
        events: mpsc::Sender<TransportEvent>,
        faults: Faults,
        runtime: Handle,
        snapshots: LinkOptions,
    ) -> Self {
        Self {
            id,
            peers: HashMap::new(),
            addresses,
            events,
            faults,
            runtime,
            shutdown: CancellationToken::new(),
            snapshots,
        }
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
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
            if !self.faults.carries(self.id, to, m.get_msg_type()) {
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
            snapshots: self.snapshots.clone(),
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
    snapshots: LinkOptions,
}

fn endpoint(
    addr: &str,
    tls: Option<&chat_security::Tls>,
) -> Result<Endpoint, chat_security::Error> {
    Ok(
        chat_security::endpoint(tls, addr, chat_security::Role::Store)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true),
    )
}

impl PeerLink {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let channel = match endpoint(&self.addr, self.snapshots.tls.as_deref()) {
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
                    let mut bytes = 0;
                    let mut pending = Some(first);
                    while let Some(m) = pending.take().or_else(|| rx.try_recv().ok()) {
                        if m.get_msg_type() == MessageType::MsgSnapshot {
                            self.send_snapshot(&mut client, m);
                        } else if let Ok(raw) = m.write_to_bytes() {
                            bytes += raw.len();
                            messages.push(raw);
                        }
                        if messages.len() >= MAX_BATCH || bytes >= MAX_BATCH_BYTES {
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
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            let result = async {
                send_snapshot_file(&mut client, from, &snapshots, &m).await?;
                let raw = m.write_to_bytes().map_err(|e| e.to_string())?;
                let call = client.install_snapshot(RaftBatch {
                    from: from.0,
                    messages: vec![raw],
                    from_address,
                });
                match tokio::time::timeout(SNAPSHOT_STALL, call).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(status.message().to_owned()),
                    Err(_) => Err("the snapshot message timed out".to_owned()),
                }
            }
            .await;
            match &result {
                Ok(()) => debug!(to = %to, "snapshot sent"),
                Err(e) => warn!(to = %to, error = %e, "snapshot not delivered; raft will retry"),
            }
            let _ = events
                .send(TransportEvent::Snapshot(to, result.is_ok()))
                .await;
        });
    }
}

/// Sends the file a snapshot message describes, from where the receiver's
/// copy ends, in chunks read ahead by at most `SNAPSHOT_READ_AHEAD`.
async fn send_snapshot_file(
    client: &mut RaftTransportClient<Channel>,
    from: NodeId,
    link: &LinkOptions,
    m: &Message,
) -> Result<(), String> {
    let d = Descriptor::decode(m.get_snapshot().get_data()).map_err(|e| e.to_string())?;
    let descriptor = d.encode();
    let held = tokio::time::timeout(
        SNAPSHOT_STALL,
        client.snapshot_progress(SnapshotFile {
            from: from.0,
            descriptor: descriptor.clone(),
        }),
    )
    .await
    .map_err(|_| "asking for the snapshot's progress timed out".to_owned())?
    .map_err(|s| s.message().to_owned())?
    .into_inner();
    if held.complete {
        return Ok(());
    }
    let path = link.files.outgoing(&d);
    let chunk_bytes = link.chunk_bytes.max(1);
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(SNAPSHOT_READ_AHEAD);
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(&path)
            .map_err(|e| format!("snapshot file {}: {e}", path.display()))?;
        let mut offset = held.received;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| format!("snapshot file {}: {e}", path.display()))?;
        let mut first = true;
        while offset < d.size {
            let want = chunk_bytes.min((d.size - offset) as usize);
            let mut data = vec![0u8; want];
            file.read_exact(&mut data)
                .map_err(|e| format!("snapshot file {}: {e}", path.display()))?;
            let chunk = SnapshotChunk {
                from: from.0,
                descriptor: if first {
                    descriptor.clone()
                } else {
                    Vec::new()
                },
                offset,
                data,
            };
            first = false;
            offset += want as u64;
            if tx.blocking_send(chunk).is_err() {
                // The call ended early; its status says why.
                return Ok(());
            }
        }
        Ok(())
    });
    // The stall timer restarts with every chunk the stream takes.
    let progress = std::sync::Arc::new(tokio::sync::Notify::new());
    let seen = progress.clone();
    let chunks = ReceiverStream::new(rx).inspect(move |_| seen.notify_one());
    let mut call = std::pin::pin!(client.send_snapshot_file(chunks));
    let reply = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = progress.notified() => {}
            _ = tokio::time::sleep(SNAPSHOT_STALL) => {
                return Err("the snapshot transfer stalled".to_owned());
            }
        }
    };
    reader
        .await
        .map_err(|e| format!("snapshot reader: {e}"))??;
    let reply = reply.map_err(|s| s.message().to_owned())?.into_inner();
    if reply.complete {
        Ok(())
    } else {
        Err(format!(
            "the receiver holds {} of {} bytes",
            reply.received, d.size
        ))
    }
}

/// The receiving half: a gRPC service feeding the driver's inbox.
pub struct RaftService {
    pub id: NodeId,
    pub inbox: mpsc::Sender<Message>,
    pub addresses: Addresses,
    pub faults: Faults,
    pub shutdown: CancellationToken,
    pub snapshots: std::sync::Arc<Snapshots>,
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
        let log_held = self.faults.log_held(from, self.id);
        let mut out = Vec::with_capacity(batch.messages.len());
        for raw in &batch.messages {
            let m = Message::parse_from_bytes(raw)
                .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
            if !(log_held && crate::faults::carries_log(m.get_msg_type())) {
                out.push(m);
            }
        }
        Ok(out)
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
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let d = Descriptor::decode(m.get_snapshot().get_data())
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if !self.snapshots.received(&d).exists() {
                    return Err(Status::failed_precondition(format!(
                        "snapshot file {}/{} has not been received; send it first",
                        d.index, d.term
                    )));
                }
            }
            self.inbox
                .send(m)
                .await
                .map_err(|_| Status::unavailable("replica is shutting down"))?;
        }
        Ok(Response::new(Ack {}))
    }

    async fn snapshot_progress(
        &self,
        request: Request<SnapshotFile>,
    ) -> Result<Response<SnapshotReceived>, Status> {
        let req = request.into_inner();
        if !self
            .faults
            .carries(NodeId(req.from), self.id, MessageType::MsgSnapshot)
        {
            return Err(Status::unavailable("link is cut"));
        }
        let d = Descriptor::decode(&req.descriptor)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let files = self.snapshots.clone();
        let (received, complete) = tokio::task::spawn_blocking(move || files.progress(&d))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(SnapshotReceived { received, complete }))
    }

    async fn send_snapshot_file(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotReceived>, Status> {
        let mut chunks = request.into_inner();
        let mut descriptor = None;
        let mut held = SnapshotReceived::default();
        while let Some(chunk) = chunks.message().await? {
            if !self
                .faults
                .carries(NodeId(chunk.from), self.id, MessageType::MsgSnapshot)
            {
                return Err(Status::unavailable("link is cut"));
            }
            let d = match descriptor {
                Some(d) => d,
                None => {
                    let d = Descriptor::decode(&chunk.descriptor)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?;
                    descriptor = Some(d);
                    d
                }
            };
            let files = self.snapshots.clone();
            let (received, complete) = tokio::task::spawn_blocking(move || {
                files.receive_chunk(&d, chunk.offset, &chunk.data)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
            held = SnapshotReceived { received, complete };
        }
        Ok(Response::new(held))
    }
}
