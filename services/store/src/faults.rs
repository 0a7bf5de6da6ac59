//! Fault injection for the raft transport: partitions, message loss and
//! delay. Used by the in-process cluster harness; a production replica's
//! `Faults` is empty and costs one uncontended read lock per batch.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use raft::eraftpb::MessageType;

use crate::types::NodeId;

#[derive(Default)]
struct State {
    /// Directed links that carry nothing.
    cut: HashSet<(NodeId, NodeId)>,
    /// Nodes cut off from every other node.
    isolated: HashSet<NodeId>,
    /// Directed links that carry no log entries nor snapshots (heartbeats
    /// and votes still pass).
    log_held: HashSet<(NodeId, NodeId)>,
    /// Probability in [0, 1] that a message is dropped.
    drop_rate: f64,
    /// Added to every batch a peer sends.
    delay: Duration,
    /// Nodes whose raft log writes stall (take this long) until then.
    disk_stalled: HashMap<NodeId, Instant>,
}

/// Whether a message of `kind` carries log entries or a snapshot.
pub fn carries_log(kind: MessageType) -> bool {
    matches!(kind, MessageType::MsgAppend | MessageType::MsgSnapshot)
}

/// Shared fault settings; clones see the same settings.
#[derive(Clone, Default)]
pub struct Faults(Arc<RwLock<State>>);

impl Faults {
    /// Cuts every link between a node in `a` and a node in `b`, both ways.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut s = self.0.write().expect("faults lock poisoned");
        for &x in a {
            for &y in b {
                s.cut.insert((x, y));
                s.cut.insert((y, x));
            }
        }
    }

    /// Cuts `node` off from every other node, both ways, whoever they are.
    pub fn isolate(&self, node: NodeId) {
        self.0
            .write()
            .expect("faults lock poisoned")
            .isolated
            .insert(node);
    }

    /// Drops the log entries and snapshots `from` sends to `to`, and only
    /// those: `to` hears `from`'s heartbeats but cannot catch up from it.
    pub fn hold_log(&self, from: NodeId, to: NodeId) {
        self.0
            .write()
            .expect("faults lock poisoned")
            .log_held
            .insert((from, to));
    }

    /// Removes every partition, loss and delay.
    pub fn heal(&self) {
        *self.0.write().expect("faults lock poisoned") = State::default();
    }

    pub fn set_drop_rate(&self, rate: f64) {
        self.0.write().expect("faults lock poisoned").drop_rate = rate.clamp(0.0, 1.0);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.0.write().expect("faults lock poisoned").delay = delay;
    }

    /// Whether a message from `from` to `to` gets through.
    pub fn passes(&self, from: NodeId, to: NodeId) -> bool {
        let s = self.0.read().expect("faults lock poisoned");
        if s.cut.contains(&(from, to)) || s.isolated.contains(&from) || s.isolated.contains(&to) {
            return false;
        }
        s.drop_rate == 0.0 || rand::random::<f64>() >= s.drop_rate
    }

    /// Whether a message of `kind` from `from` to `to` gets through.
    pub fn carries(&self, from: NodeId, to: NodeId, kind: MessageType) -> bool {
        !(carries_log(kind) && self.log_held(from, to)) && self.passes(from, to)
    }

    /// Whether `hold_log(from, to)` is in force.
    pub fn log_held(&self, from: NodeId, to: NodeId) -> bool {
        self.0
            .read()
            .expect("faults lock poisoned")
            .log_held
            .contains(&(from, to))
    }

    pub fn delay(&self) -> Duration {
        self.0.read().expect("faults lock poisoned").delay
    }

    /// `node`'s raft log writes stall for the next `for_` (as a disk that
    /// stops answering does): a write started meanwhile ends when it ends.
    pub fn stall_disk(&self, node: NodeId, for_: Duration) {
        self.0
            .write()
            .expect("faults lock poisoned")
            .disk_stalled
            .insert(node, Instant::now() + for_);
    }

    /// How much longer `node`'s disk stalls (zero: it does not).
    pub fn disk_stall(&self, node: NodeId) -> Duration {
        self.0
            .read()
            .expect("faults lock poisoned")
            .disk_stalled
            .get(&node)
            .map_or(Duration::ZERO, |until| {
                until.saturating_duration_since(Instant::now())
            })
    }
}
