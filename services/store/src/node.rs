//! The public face of one replica's raft node: `NodeHandle`, through which
//! gRPC handlers propose operations and wait for linearizable reads, and the
//! status every handler can read without asking the driver.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use raft::StateRole;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::StoreError;
use crate::state_machine::Reader;
use crate::types::{NodeId, Op, OpOutcome};

/// Capacity of the driver's request queue. When full, new requests fail
/// fast with `Overloaded` instead of queueing without bound.
pub const REQUEST_QUEUE: usize = 8192;
/// How long a client should wait before retrying after `Overloaded`.
pub const OVERLOAD_RETRY_AFTER: Duration = Duration::from_millis(50);

/// Raft addresses of the replicas, shared by the transport and the handlers
/// (for leader hints).
#[derive(Clone, Default)]
pub struct Addresses(Arc<RwLock<HashMap<NodeId, String>>>);

impl Addresses {
    pub fn get(&self, id: NodeId) -> Option<String> {
        self.0
            .read()
            .expect("addresses lock poisoned")
            .get(&id)
            .cloned()
    }

    pub fn set(&self, id: NodeId, addr: String) {
        self.0
            .write()
            .expect("addresses lock poisoned")
            .insert(id, addr);
    }

    pub fn remove(&self, id: NodeId) {
        self.0.write().expect("addresses lock poisoned").remove(&id);
    }

    pub fn all(&self) -> Vec<(NodeId, String)> {
        let mut v: Vec<_> = self
            .0
            .read()
            .expect("addresses lock poisoned")
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort();
        v
    }
}

/// What the driver publishes after every loop iteration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: StateRole,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub commit: u64,
    pub applied: u64,
    /// The replica has applied everything that was committed when it
    /// started, or that a leader showed it was committed when it had lost
    /// entries (a replica whose data directory is new counts only once a
    /// leader has reached it); stale reads are served only then.
    pub caught_up: bool,
    /// Caught up, knows a leader, and is a voter: the replica counts for
    /// the group (gRPC health SERVING).
    pub serving: bool,
    /// The driver has stopped (shutdown or fatal storage error).
    pub stopped: bool,
}

impl NodeStatus {
    /// A replica's status before its driver's first turn.
    pub fn starting(id: NodeId) -> Self {
        Self {
            id,
            role: StateRole::Follower,
            term: 0,
            leader: None,
            commit: 0,
            applied: 0,
            caught_up: false,
            serving: false,
            stopped: false,
        }
    }
}

/// A membership change request.
#[derive(Clone, Debug)]
pub enum MembershipChange {
    AddLearner { id: NodeId, address: String },
    Promote { id: NodeId },
    Remove { id: NodeId },
}

/// A replica's place in the group, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaView {
    pub id: NodeId,
    pub address: String,
    pub voter: bool,
    /// Matched log index (known only on the leader; 0 elsewhere).
    pub matched: u64,
}

/// Counters of the driver since start.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriverStats {
    pub proposed_entries: u64,
    pub proposed_ops: u64,
    pub readies: u64,
    pub syncs: u64,
    pub sync_micros: u64,
    pub applied_entries: u64,
    /// As leader: losses of a replica's log found and repaired (each loss
    /// once, however often the replica's rejection arrives).
    pub lost_logs_repaired: u64,
    /// Raft messages refused before raft saw them (from a replica outside
    /// the group, or an append out of order).
    pub refused_messages: u64,
}

/// A detailed status report, computed by the driver on request.
#[derive(Clone, Debug)]
pub struct StatusReport {
    pub status: NodeStatus,
    pub stats: DriverStats,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub replicas: Vec<ReplicaView>,
}

pub type OpResults = Vec<Result<OpOutcome, StoreError>>;

pub(crate) enum Request {
    Propose {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<OpResults, StoreError>>,
    },
    Read {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Membership {
        change: MembershipChange,
        reply: oneshot::Sender<Result<Vec<ReplicaView>, StoreError>>,
    },
    TransferLeader {
        target: Option<NodeId>,
        reply: oneshot::Sender<Result<NodeId, StoreError>>,
    },
    Status {
        reply: oneshot::Sender<StatusReport>,
    },
    Snapshot {
        min_index: u64,
        reply: oneshot::Sender<Result<Option<SnapshotFile>, StoreError>>,
    },
}

/// A snapshot file this replica built, ready to be read.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    pub descriptor: crate::snapshot::Descriptor,
    pub voters: Vec<NodeId>,
    pub path: std::path::PathBuf,
}

/// Handle to a running replica. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) id: NodeId,
    pub(crate) requests: mpsc::Sender<Request>,
    pub(crate) status: watch::Receiver<NodeStatus>,
    pub(crate) addresses: Addresses,
    pub(crate) reader: Reader,
}

impl NodeHandle {
    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// The leader this replica knows of, with its address.
    pub fn leader_hint(&self) -> Option<(NodeId, String)> {
        let leader = self.status.borrow().leader?;
        Some((leader, self.addresses.get(leader)?))
    }

    fn not_leader(&self) -> StoreError {
        StoreError::NotLeader {
            leader: self.leader_hint(),
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.requests.try_send(make(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Overloaded {
                retry_after: OVERLOAD_RETRY_AFTER,
            },
            mpsc::error::TrySendError::Closed(_) => StoreError::ShuttingDown,
        })?;
        rx.await.map_err(|_| StoreError::ShuttingDown)
    }

    /// Proposes operations as one unit; answers once they are committed on
    /// a majority (durably, with `sync = always`) and applied here. Each op
    /// has its own outcome.
    pub async fn propose(&self, ops: Vec<Op>) -> Result<OpResults, StoreError> {
        if self.status.borrow().role != StateRole::Leader {
            return Err(self.not_leader());
        }
        self.call(|reply| Request::Propose { ops, reply }).await?
    }

    /// Waits until this replica, as leader, has confirmed its leadership
    /// with a quorum (ReadIndex) and applied up to that point; reads after
    /// this see every write acknowledged before the call.
    pub async fn read_barrier(&self) -> Result<(), StoreError> {
        if self.status.borrow().role != StateRole::Leader {
            return Err(self.not_leader());
        }
        self.call(|reply| Request::Read { reply }).await?
    }

    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<Vec<ReplicaView>, StoreError> {
        self.call(|reply| Request::Membership { change, reply })
            .await?
    }

    /// Starts a leadership transfer; returns the chosen target.
    pub async fn transfer_leader(&self, target: Option<NodeId>) -> Result<NodeId, StoreError> {
        self.call(|reply| Request::TransferLeader { target, reply })
            .await?
    }

    /// A snapshot of the state machine at `min_index` or later, if one is
    /// built; otherwise starts a build (off the raft thread) and returns
    /// None: ask again.
    pub async fn snapshot(&self, min_index: u64) -> Result<Option<SnapshotFile>, StoreError> {
        self.call(|reply| Request::Snapshot { min_index, reply })
            .await?
    }

    pub async fn report(&self) -> Result<StatusReport, StoreError> {
        self.call(|reply| Request::Status { reply }).await
    }

    /// Waits until `pred` holds for the published status, or the deadline.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&NodeStatus) -> bool,
    ) -> Option<NodeStatus> {
        let mut rx = self.status.clone();
        let fut = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return Some(s.clone());
                    }
                    if s.stopped {
                        return None;
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.ok().flatten()
    }
}
