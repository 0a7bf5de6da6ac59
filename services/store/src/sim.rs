//! Deterministic simulation of a store group: the replicas' real driver,
//! log store, WAL (raft-engine) and state machine, stepped by one thread
//! from one seeded RNG on a virtual clock, with the network, the disks and
//! the clients played by the simulator.
//!
//! What is real: `Driver` (raft-rs, the replica's message handling, group
//! commit, apply, compaction), `LogStore` over raft-engine, the state
//! machine over `MemEngine`, the checkpointer's round. What is simulated:
//! the network (`SimNet`: every message becomes an event, delayed, dropped,
//! duplicated, reordered or cut by a partition), the disk (the log writer
//! writes only when the simulator completes a write; raft-engine's files
//! live in `MemFs`, which keeps only synced bytes across a crash, as the
//! state engine does), time (`VirtualClock`; one wall clock per replica,
//! which faults step) and raft-rs's election timeouts (drawn from the seed
//! at every start).
//!
//! Checked at every step: at most one leader per term; an entry committed
//! at an index never changes (on any replica, across crashes); a leader
//! sets a follower's progress back at most once per loss of its log; a
//! client's retries of one message are acknowledged with one seq. Checked
//! at the end, after the faults stop and every replica is back: every
//! replica applied the same entries, every acknowledged append is stored
//! once, with its acknowledged seq, on every replica; seqs are gapless; no
//! client id is stored twice (unless its retries outlived the dedup
//! window); what the replicas hold is what a plain model of the state
//! machine (`Model`) makes of the committed log. A run that finds a
//! violation returns it with the seed and the command that replays it
//! (`loadtest sim --seed N --trace`).
//!
//! Snapshots are real too: the log is compacted every few hundred entries,
//! a snapshot is built by the real builder (`Snapshots::open_deferred`: at
//! a time the simulator picks, on its thread), its file travels in chunks
//! through the receiver's resumable receiving (some transfers break off and
//! resume), and the replica installs it as it would. Disk wipes (one
//! replica at a time) make a replica start over empty and catch up by
//! snapshot.
//!
//! A crash keeps what the last fdatasync covered and, half the time, a
//! random part of what was written after it (a torn tail). A replica's
//! machine can be lost for good: the operator adds a new replica as a
//! learner, promotes it once caught up and removes the old one (real
//! membership changes through the driver).
//!
//! Not simulated: the gRPC services in front of the driver, writes below
//! an fdatasync that reach the disk out of order, routers and gateways.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::eraftpb::{EntryType, Message, MessageType};
use raft::{GetEntriesContext, StateRole};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::Durable;
use crate::clock::{Clock, VirtualClock};
pub use crate::driver::KnownBug;
use crate::driver::{Driver, DriverConfig, DriverIo, SyncMode};
use crate::engine::{Engine, MemEngine};
use crate::error::StoreError;
use crate::log_store::LogStore;
use crate::node::{Addresses, MembershipChange, NodeStatus, OpResults, Request};
use crate::snapshot::Snapshots;
use crate::state_machine::Reader;
use crate::testkit::mem_fs::MemFs;
use crate::transport::{Network, TransportEvent};
use crate::types::{ConversationId, NewMessage, NodeId, Op, OpOutcome, Seq, UserId};
use crate::wal::RaftEngineWal;
use crate::writer::LogWriter;

/// What a run does; every figure is in virtual time.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub replicas: usize,
    pub clients: usize,
    pub conversations: usize,
    /// How long faults and new sends go on.
    pub duration: Duration,
    /// After that, how long the healed group has to finish every send.
    pub settle: Duration,
    pub faults: bool,
    /// The faults to inject instead of the ones drawn from the seed
    /// (`fault_plan`): what a shrunk failure replays.
    pub plan: Option<Vec<Fault>>,
    /// Disks acknowledge fdatasync without making anything durable (seven
    /// times in eight): a bug the checkers must catch (acknowledged appends
    /// and votes lost in crashes).
    pub lying_disks: bool,
    /// Keep a readable trace of every event (printed on failure).
    pub trace: bool,
    /// A bug the replica logic once had, put back: what the tests use to
    /// show the simulator finds it.
    pub known_bug: Option<KnownBug>,
    /// The replicas' dedup window (`--dedup-window-secs`). Shorter than a
    /// client's retries can last, it makes retries stored anew and dedup
    /// records expire during the run; the checkers then allow a message
    /// stored twice only when its attempts were sent at least this far
    /// apart (less the wall clocks' skew).
    pub dedup_window: Duration,
    /// Wipes and replacements do not wait for replicas with new disks to
    /// catch up, so the group's entries can be left on fewer than a
    /// majority. Safety is still checked at every step; a run that then
    /// stops making progress passes (`SimReport::stuck`), since waiting for
    /// the missing replica is the right outcome.
    pub double_faults: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            replicas: 3,
            clients: 6,
            conversations: 3,
            duration: Duration::from_secs(20),
            settle: Duration::from_secs(20),
            faults: true,
            plan: None,
            lying_disks: false,
            trace: false,
            known_bug: None,
            dedup_window: Duration::from_secs(3600),
            double_faults: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct SimReport {
    pub seed: u64,
    /// Hash of every event in order: the same seed gives the same hash.
    pub trace_hash: u64,
    pub events: u64,
    pub acked: usize,
    pub crashes: u64,
    pub partitions: u64,
    pub clock_steps: u64,
    pub transfers: u64,
    pub wipes: u64,
    /// Replicas replaced by new ones through membership changes.
    pub replacements: u64,
    /// Snapshots that reached a replica and were handed to it.
    pub snapshots: u64,
    pub elections: usize,
    pub committed: u64,
    /// Retries the state machine answered as duplicates.
    pub duplicates: u64,
    /// Messages stored more than once because a retry came after the dedup
    /// window (on replica 1; every replica holds the same).
    pub stored_anew: u64,
    /// With `double_faults`: the group stopped making progress (safely).
    pub stuck: bool,
    pub trace: Vec<String>,
}

/// A violated invariant, with what replays it.
#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub opts: SimOptions,
    pub at: Duration,
    pub what: String,
    pub trace: Vec<String>,
}

impl SimFailure {
    /// The command that runs this seed again with its trace.
    pub fn replay_command(&self) -> String {
        let o = &self.opts;
        let d = SimOptions::default();
        let mut cmd = format!("target/release/loadtest sim --seed {} --trace", self.seed);
        if o.replicas != d.replicas {
            cmd += &format!(" --replicas {}", o.replicas);
        }
        if o.clients != d.clients {
            cmd += &format!(" --clients {}", o.clients);
        }
        if o.conversations != d.conversations {
            cmd += &format!(" --conversations {}", o.conversations);
        }
        if o.duration != d.duration {
            cmd += &format!(" --duration-secs {}", o.duration.as_secs());
        }
        if o.double_faults {
            cmd += " --double-faults";
        }
        if o.dedup_window != d.dedup_window {
            cmd += &format!(" --dedup-window-secs {}", o.dedup_window.as_secs());
        }
        if !o.faults {
            cmd += " --no-faults";
        }
        if let Some(plan) = &o.plan {
            cmd += &format!(" --plan '{}'", format_plan(plan));
        }
        if o.lying_disks {
            cmd += " --lying-disks";
        }
        match o.known_bug {
            Some(KnownBug::EarlyVote) => cmd += " --known-bug early-vote",
            Some(KnownBug::StaleLostLog) => cmd += " --known-bug stale-lost-log",
            Some(KnownBug::BootstrapVote) => cmd += " --known-bug bootstrap-vote",
            Some(KnownBug::RevoteAfterWipe) => cmd += " --known-bug revote-after-wipe",
            None => {}
        }
        cmd
    }
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} at {:.3} s (virtual): {}\nreplay: {}",
            self.seed,
            self.at.as_secs_f64(),
            self.what,
            self.replay_command()
        )
    }
}

/// A fault, at a virtual time. It names replicas by machine (slot),
/// numbered from 1 in its text form (`AT_MS:KIND[:ARGS]`, as `loadtest sim
/// --plan` takes it): the replica running on that machine at the time,
/// which after a replacement has a new id (traces and failures name ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub at_ms: u64,
    pub kind: FaultKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The replica crashes (power lost) and starts again `down_ms` later.
    Crash { replica: usize, down_ms: u64 },
    /// The replica crashes and its disk is replaced by an empty one; it
    /// starts again `down_ms` later and must catch up from the others
    /// (one at a time: a second wipe before the first caught up is
    /// skipped, as losing a majority's disks loses data).
    Wipe { replica: usize, down_ms: u64 },
    /// The replica hears nothing and is heard by no one.
    Isolate { replica: usize },
    /// Messages from `from` to `to` are lost (one way).
    Cut { from: usize, to: usize },
    /// Every partition ends.
    Heal,
    /// The replica's machine is lost for good; the operator replaces it
    /// with a new replica (new id, empty disk): added as a learner,
    /// promoted once caught up, then the old one removed (one at a time,
    /// and like a wipe only while every replica's disk has caught up with
    /// the group since it was new).
    Replace { replica: usize },
    /// The replica's wall clock jumps by `ms` (either way).
    StepClock { replica: usize, ms: i64 },
    /// The leader is asked to hand leadership to the most caught-up voter.
    TransferLeader,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.at_ms)?;
        match self.kind {
            FaultKind::Crash { replica, down_ms } => write!(f, "crash:{}:{down_ms}", replica + 1),
            FaultKind::Wipe { replica, down_ms } => write!(f, "wipe:{}:{down_ms}", replica + 1),
            FaultKind::Isolate { replica } => write!(f, "isolate:{}", replica + 1),
            FaultKind::Cut { from, to } => write!(f, "cut:{}:{}", from + 1, to + 1),
            FaultKind::Heal => write!(f, "heal"),
            FaultKind::Replace { replica } => write!(f, "replace:{}", replica + 1),
            FaultKind::StepClock { replica, ms } => write!(f, "clock:{}:{ms}", replica + 1),
            FaultKind::TransferLeader => write!(f, "transfer"),
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let bad = || {
            format!(
                "fault {s:?}: expected AT_MS:crash:REPLICA:DOWN_MS, AT_MS:wipe:REPLICA:DOWN_MS, AT_MS:isolate:REPLICA, AT_MS:cut:FROM:TO, AT_MS:heal, AT_MS:replace:REPLICA, AT_MS:clock:REPLICA:MS or AT_MS:transfer"
            )
        };
        let num = |i: usize| -> Result<u64, String> {
            parts.get(i).and_then(|p| p.parse().ok()).ok_or_else(bad)
        };
        let replica = |i: usize| -> Result<usize, String> {
            match num(i)? {
                0 => Err(format!("fault {s:?}: replicas are numbered from 1")),
                n => Ok(n as usize - 1),
            }
        };
        let at_ms = num(0)?;
        let (kind, arity) = match parts.get(1).copied() {
            Some("crash") => (
                FaultKind::Crash {
                    replica: replica(2)?,
                    down_ms: num(3)?,
                },
                4,
            ),
            Some("wipe") => (
                FaultKind::Wipe {
                    replica: replica(2)?,
                    down_ms: num(3)?,
                },
                4,
            ),
            Some("isolate") => (
                FaultKind::Isolate {
                    replica: replica(2)?,
                },
                3,
            ),
            Some("cut") => (
                FaultKind::Cut {
                    from: replica(2)?,
                    to: replica(3)?,
                },
                4,
            ),
            Some("heal") => (FaultKind::Heal, 2),
            Some("replace") => (
                FaultKind::Replace {
                    replica: replica(2)?,
                },
                3,
            ),
            Some("clock") => {
                let ms = parts.get(3).and_then(|p| p.parse().ok()).ok_or_else(bad)?;
                (
                    FaultKind::StepClock {
                        replica: replica(2)?,
                        ms,
                    },
                    4,
                )
            }
            Some("transfer") => (FaultKind::TransferLeader, 2),
            _ => return Err(bad()),
        };
        if parts.len() != arity {
            return Err(bad());
        }
        Ok(Fault { at_ms, kind })
    }
}

/// Parses a comma-separated list of faults.
pub fn parse_plan(s: &str) -> Result<Vec<Fault>, String> {
    s.split(',')
        .filter(|f| !f.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// Formats faults as `parse_plan` reads them.
pub fn format_plan(plan: &[Fault]) -> String {
    plan.iter()
        .map(Fault::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The faults a seed injects: one every 0.1–1 s of the run, drawn from a
/// stream of its own (so removing one leaves the others as they were).
pub fn fault_plan(seed: u64, opts: &SimOptions) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17_0000_0000);
    let n = opts.replicas.max(1);
    let end = opts.duration.as_millis() as u64;
    let mut plan = Vec::new();
    let mut at = rng.random_range(200..800);
    while at < end {
        let replica = rng.random_range(0..n);
        let kind = match rng.random_range(0..13) {
            0..=3 => FaultKind::Crash {
                replica,
                down_ms: rng.random_range(50..1500),
            },
            11 => FaultKind::Wipe {
                replica,
                down_ms: rng.random_range(50..1500),
            },
            12 => FaultKind::Replace { replica },
            4 | 5 => FaultKind::Isolate { replica },
            6 if n > 1 => FaultKind::Cut {
                from: (replica + 1 + rng.random_range(0..n - 1)) % n,
                to: replica,
            },
            6..=8 => FaultKind::Heal,
            9 => FaultKind::StepClock {
                replica,
                ms: rng.random_range(-5_000..=5_000),
            },
            _ => FaultKind::TransferLeader,
        };
        plan.push(Fault { at_ms: at, kind });
        at += rng.random_range(100..1000);
    }
    plan
}

/// What kind of violation a failure is, to keep shrinking on one bug.
fn category(what: &str) -> &'static str {
    const KINDS: [&str; 10] = [
        "panicked",
        "two leaders",
        "progress back",
        "changed",
        "lost",
        "stored twice",
        "seq",
        "other messages",
        "no progress",
        "stopped",
    ];
    KINDS
        .iter()
        .find(|k| what.contains(*k))
        .copied()
        .unwrap_or("other")
}

/// Shrinks a failing seed's faults: drops chunks of them, then single
/// ones, as long as the run still fails the same way (at most `max_runs`
/// runs). Returns the smallest failing plan found and its failure, or
/// None when the seed does not fail.
pub fn shrink(
    seed: u64,
    opts: &SimOptions,
    max_runs: usize,
) -> Option<(Vec<Fault>, Box<SimFailure>)> {
    let quiet = SimOptions {
        trace: false,
        ..opts.clone()
    };
    let mut plan = opts.plan.clone().unwrap_or_else(|| fault_plan(seed, opts));
    let fails = |plan: &[Fault]| {
        run(
            seed,
            &SimOptions {
                plan: Some(plan.to_vec()),
                ..quiet.clone()
            },
        )
        .err()
    };
    let mut failure = fails(&plan)?;
    let kind = category(&failure.what);
    let mut runs = 1;
    let mut chunk = plan.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut removed = false;
        while i < plan.len() && runs < max_runs {
            let mut candidate = plan.clone();
            candidate.drain(i..(i + chunk).min(plan.len()));
            runs += 1;
            match fails(&candidate) {
                Some(f) if category(&f.what) == kind => {
                    plan = candidate;
                    failure = f;
                    removed = true;
                }
                _ => i += chunk,
            }
        }
        if runs >= max_runs || (chunk == 1 && !removed) {
            break;
        }
        if !removed {
            chunk = chunk.div_ceil(2);
        }
    }
    Some((plan, failure))
}

const TICK: Duration = Duration::from_millis(10);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// The log is compacted often, so a replica that was down for a second
/// or lost its disk catches up by snapshot.
const SNAPSHOT_ENTRIES: u64 = 300;
const COMPACT_KEEP: u64 = 100;
/// Chunks a snapshot file travels in.
const SNAPSHOT_CHUNK: usize = 16 << 10;
/// A client gives up on an attempt after this long and tries another
/// replica with the same client message id.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(400);

#[derive(Debug)]
enum Event {
    Tick(usize, u64),
    /// A raft message for this life of the replica: one sent to a life
    /// that has ended is lost with it (the stream it travelled on dies with
    /// the process).
    Deliver(usize, u64, Message),
    /// The disk finishes a write of this life of the replica.
    Disk(usize, u64),
    Apply(usize, u64),
    Checkpoint(usize, u64),
    Restart(usize),
    Client(usize),
    /// The plan's fault with this index.
    Fault(usize),
    /// The operator looks at its replacement under way.
    Operate,
    /// A follower reads on from its cursor.
    Follow(usize),
    /// The replica's deferred snapshot build runs.
    Build(usize, u64),
    /// A snapshot's file and then its message reach a replica (from, to).
    Transfer(usize, usize, Message),
    /// The client's attempt got no answer in time: try another replica.
    ClientTimeout(usize, u64),
    /// The client's attempt failed: try again where the answer pointed.
    Retry(usize, u64),
    /// The client's read got no answer in time: it gives it up.
    ReadTimeout(usize, u64),
}

/// The replicas' network: what the driver sends lands here and becomes
/// delivery events.
struct SimNet {
    outbox: Arc<Mutex<Vec<Message>>>,
    addresses: Addresses,
}

impl Network for SimNet {
    fn send(&mut self, msgs: Vec<Message>) {
        self.outbox.lock().expect("outbox lock").extend(msgs);
    }

    fn set_peer(&mut self, id: NodeId, addr: String) {
        self.addresses.set(id, addr);
    }

    fn remove_peer(&mut self, id: NodeId) {
        self.addresses.remove(id);
    }

    fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    fn shutdown(&self) {}
}

struct Running {
    driver: Driver,
    requests: mpsc::Sender<Request>,
    inbox: mpsc::Sender<Message>,
    events: mpsc::Sender<TransportEvent>,
    status: watch::Receiver<NodeStatus>,
    outbox: Arc<Mutex<Vec<Message>>>,
    log: LogStore,
    durable: Durable,
    /// When an Apply event is already scheduled for.
    apply_at: Option<Duration>,
    disk_busy: bool,
    /// A Build event is scheduled for the deferred snapshot build.
    build_scheduled: bool,
}

struct Replica {
    id: NodeId,
    dir: tempfile::TempDir,
    fs: MemFs,
    state: MemEngine,
    clock: VirtualClock,
    /// Bumped at every start and crash; events of an older life are void.
    life: u64,
    running: Option<Running>,
    /// Highest committed index checked against the group's history.
    checked: u64,
    /// Joined an existing group (a replacement): starts with no voters of
    /// its own and waits for the leader's snapshot.
    joiner: bool,
    /// Times this replica lost what it had acknowledged (its disk wiped;
    /// with lying disks, any crash).
    losses: u64,
}

/// The state machine's specification, applied to the committed log in
/// index order: what every replica must end up holding. Its dedup is the
/// documented rule, written plainly: a retry (conversation, sender, client
/// message id) is a duplicate while the dedup clock (the newest entry
/// timestamp so far) is less than the window past the record's timestamp;
/// otherwise it is stored anew.
#[derive(Default)]
struct Model {
    /// Committed entries not applied yet, by index (empty: no ops).
    pending: BTreeMap<u64, Vec<u8>>,
    /// Last index applied.
    applied: u64,
    clock: i64,
    /// Client message ids by seq - 1, by conversation.
    conversations: HashMap<ConversationId, Vec<String>>,
    /// (conversation, sender, client message id) → (seq, timestamp).
    dedup: HashMap<(ConversationId, UserId, String), (u64, i64)>,
}

impl Model {
    /// Applies the committed entries that follow the last applied one.
    fn advance(&mut self, window: Duration) -> Result<(), String> {
        if self.applied == 0 {
            self.applied = crate::log_store::BOOTSTRAP_INDEX;
        }
        let window = window.as_millis() as i64;
        while let Some(data) = self.pending.remove(&(self.applied + 1)) {
            self.applied += 1;
            if data.is_empty() {
                continue;
            }
            let p = crate::codec::decode_proposal(&data)
                .map_err(|e| format!("committed entry {}: {e}", self.applied))?;
            for op in &p.ops {
                self.clock = self.clock.max(p.ts_ms);
                match op {
                    Op::CreateConversation { conversation, .. } => {
                        self.conversations.entry(conversation.clone()).or_default();
                    }
                    Op::Append(m) => {
                        let Some(stored) = self.conversations.get_mut(&m.conversation) else {
                            continue;
                        };
                        let key = (
                            m.conversation.clone(),
                            m.sender.clone(),
                            m.client_msg_id.clone(),
                        );
                        if let Some(&(_, ts)) = self.dedup.get(&key)
                            && self.clock.saturating_sub(ts) < window
                        {
                            continue;
                        }
                        stored.push(m.client_msg_id.clone());
                        self.dedup.insert(key, (stored.len() as u64, p.ts_ms));
                    }
                    Op::Noop => {}
                    other => {
                        return Err(format!(
                            "committed entry {}: the model has no rule for {other:?}",
                            self.applied
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// One message a client is getting acknowledged.
struct Sending {
    op: Op,
    conversation: usize,
    /// Client message id (None: the create that precedes a client's sends).
    id: Option<String>,
    attempt: u64,
    /// Every attempt's reply that may still come, by attempt.
    replies: Vec<(u64, OpReply)>,
    acked: Option<Seq>,
}

/// Where the answer to one attempt of an operation comes.
type OpReply = oneshot::Receiver<Result<OpResults, StoreError>>;

struct Client {
    user: UserId,
    target: usize,
    sent: u64,
    current: Option<Sending>,
    /// Replies to earlier messages' attempts that may still come, with
    /// the seq each was acknowledged with.
    late: Vec<(usize, String, Seq, OpReply)>,
    /// A linearizable read in flight.
    reading: Option<Reading>,
    /// Actions so far (sends and reads), to tell its timeouts apart.
    actions: u64,
}

/// A reader that follows one conversation from a cursor with stale reads
/// on any caught-up replica, as a subscriber resuming from its cursor
/// does: what it gets must continue its cursor without a gap, and be
/// what the conversation finally holds at those seqs.
struct Follower {
    conversation: usize,
    cursor: u64,
    got: Vec<(u64, String)>,
}

/// A linearizable read: a ReadIndex barrier on the replica the client
/// thinks leads, then the conversation read from that replica's state.
struct Reading {
    conversation: usize,
    target: usize,
    invoked: Duration,
    action: u64,
    reply: oneshot::Receiver<Result<(), StoreError>>,
}

/// A read that completed: what it returned and when it was asked and
/// answered.
struct ReadSeen {
    invoked: Duration,
    answered: Duration,
    /// How many messages the read found, and the last of them: the
    /// conversation is append-only with gapless seqs, so the read saw a
    /// prefix of the final conversation when its last message is there
    /// (reading all of them every time made runs quadratic).
    count: usize,
    last: Option<(u64, String)>,
}

struct Sim {
    seed: u64,
    opts: SimOptions,
    rng: StdRng,
    clock: VirtualClock,
    now: Duration,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    slots: Vec<Option<Event>>,
    free: Vec<usize>,
    next_seq: u64,
    replicas: Vec<Replica>,
    clients: Vec<Client>,
    conversations: Vec<ConversationId>,
    users: Vec<UserId>,
    /// cut[a][b]: messages from a to b are lost.
    cut: Vec<Vec<bool>>,
    /// Leader of each term seen.
    leaders: BTreeMap<u64, NodeId>,
    /// (term, hash of data) of each committed index.
    committed: HashMap<u64, (u64, u64)>,
    /// conversation, client message id → acknowledged seq.
    acked: BTreeMap<(usize, String), Seq>,
    /// When each acknowledged append was acknowledged.
    acked_at: HashMap<(usize, String), Duration>,
    /// Completed reads, by conversation.
    reads: Vec<Vec<ReadSeen>>,
    followers: Vec<Follower>,
    hash: DefaultHasher,
    events: u64,
    report: SimReport,
    trace: Vec<String>,
    faults_on: bool,
    sending_on: bool,
    plan: Vec<Fault>,
    /// A replica whose disk is new (the group's creation, a wipe, a
    /// replacement) and has not caught up with the group yet. Wipes and
    /// replacements wait until there is none: with a replica that never
    /// had the group's entries, losing another's leaves them on fewer than
    /// a majority, beyond what a majority-replicated log can survive
    /// (the replicas then wait, safely, for the lost one to return).
    new_disk: Vec<bool>,
    /// The group's voters when it was created.
    initial_voters: Vec<(NodeId, String)>,
    /// The id the next replacement replica gets.
    next_id: u64,
    /// A replacement under way.
    operation: Option<Replacement>,
    /// (term, follower id) → the follower's progress (matched index) as
    /// the leader of that term last had it, and how many times it went
    /// back.
    progress: HashMap<(u64, u64), (u64, u64)>,
    /// The committed log applied to a model of the state machine.
    model: Model,
    /// The largest step any wall clock was off by during the run.
    skew_ms: i64,
    /// conversation, client message id → when its first and its latest
    /// attempt were sent.
    sent_between: HashMap<(usize, String), (Duration, Duration)>,
}

/// The operator replacing a lost machine, as the runbook does: the new
/// replica (a new id, an empty disk) joins as a learner, is promoted once
/// it has caught up, then the old one is removed.
struct Replacement {
    slot: usize,
    old: NodeId,
    new: NodeId,
    step: Step,
    /// The membership change asked and not yet answered, and when asked.
    asked: Option<(Duration, MembershipReply)>,
}

type MembershipReply = oneshot::Receiver<Result<Vec<crate::node::ReplicaView>, StoreError>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    AddLearner,
    CatchUp,
    Promote,
    RemoveOld,
    Done,
}

fn next_step(s: Step) -> Step {
    match s {
        Step::AddLearner => Step::CatchUp,
        Step::CatchUp => Step::Promote,
        Step::Promote => Step::RemoveOld,
        Step::RemoveOld | Step::Done => Step::Done,
    }
}

/// Runs one simulation.
pub fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, Box<SimFailure>> {
    let mut sim = Sim::new(seed, opts.clone()).map_err(|what| {
        Box::new(SimFailure {
            seed,
            opts: opts.clone(),
            at: Duration::ZERO,
            what,
            trace: Vec::new(),
        })
    })?;
    // A panic in the replicas' code (or raft-rs's, or raft-engine's) is a
    // failure of the seed like any other, with its trace and replay line.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(format!("panicked: {what}"))
        });
    match outcome {
        Ok(()) => {
            let mut report = sim.report.clone();
            report.trace_hash = sim.hash.finish();
            report.events = sim.events;
            report.acked = sim.acked.len();
            report.elections = sim.leaders.len();
            report.committed = sim.committed.keys().max().copied().unwrap_or(0);
            report.trace = std::mem::take(&mut sim.trace);
            Ok(report)
        }
        Err(what) => Err(Box::new(SimFailure {
            seed,
            opts: opts.clone(),
            at: sim.now,
            what,
            trace: std::mem::take(&mut sim.trace),
        })),
    }
}

/// A simulated replica's address (only its name matters).
fn address(id: NodeId) -> String {
    format!("sim-{id}")
}

fn entry_hash(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

impl Sim {
    fn new(seed: u64, opts: SimOptions) -> Result<Self, String> {
        let clock = VirtualClock::new(1_700_000_000_000);
        let n = opts.replicas;
        let mut replicas = Vec::with_capacity(n);
        for i in 0..n {
            let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            std::fs::create_dir_all(dir.path().join("wal")).map_err(|e| e.to_string())?;
            let fs = MemFs::default();
            if opts.lying_disks {
                fs.lie_about_syncs(8);
            }
            replicas.push(Replica {
                id: NodeId(i as u64 + 1),
                dir,
                fs,
                state: MemEngine::new(),
                clock: clock.own_wall(),
                life: 0,
                running: None,
                checked: 0,
                losses: 0,
                joiner: false,
            });
        }
        let users: Vec<UserId> = (0..opts.clients)
            .map(|c| UserId::parse(&format!("u{c}")).expect("valid user id"))
            .collect();
        let conversations = (0..opts.conversations.max(1))
            .map(|c| ConversationId::parse(&format!("c{c}")).expect("valid conversation id"))
            .collect();
        let clients = users
            .iter()
            .enumerate()
            .map(|(c, u)| Client {
                user: u.clone(),
                target: c % n,
                sent: 0,
                current: None,
                late: Vec::new(),
                reading: None,
                actions: 0,
            })
            .collect();
        let report = SimReport {
            seed,
            trace_hash: 0,
            events: 0,
            acked: 0,
            crashes: 0,
            partitions: 0,
            clock_steps: 0,
            transfers: 0,
            wipes: 0,
            replacements: 0,
            snapshots: 0,
            elections: 0,
            committed: 0,
            duplicates: 0,
            stored_anew: 0,
            stuck: false,
            trace: Vec::new(),
        };
        Ok(Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
            clock,
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            next_seq: 0,
            replicas,
            clients,
            conversations,
            users,
            cut: vec![vec![false; n]; n],
            leaders: BTreeMap::new(),
            committed: HashMap::new(),
            acked: BTreeMap::new(),
            acked_at: HashMap::new(),
            reads: (0..opts.conversations.max(1)).map(|_| Vec::new()).collect(),
            followers: (0..opts.conversations.max(1))
                .map(|conversation| Follower {
                    conversation,
                    cursor: 0,
                    got: Vec::new(),
                })
                .collect(),
            hash: DefaultHasher::new(),
            events: 0,
            report,
            trace: Vec::new(),
            faults_on: opts.faults,
            sending_on: true,
            plan: Vec::new(),
            new_disk: vec![true; opts.replicas],
            progress: HashMap::new(),
            skew_ms: 0,
            model: Model::default(),
            sent_between: HashMap::new(),
            initial_voters: (1..=n as u64)
                .map(|i| (NodeId(i), address(NodeId(i))))
                .collect(),
            next_id: n as u64 + 1,
            operation: None,
            opts,
        })
    }

    fn at(&mut self, after: Duration, e: Event) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(e);
                s
            }
            None => {
                self.slots.push(Some(e));
                self.slots.len() - 1
            }
        };
        self.next_seq += 1;
        self.queue
            .push(Reverse((self.now + after, self.next_seq, slot)));
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if self.opts.trace {
            let line = line();
            self.trace
                .push(format!("{:>9.3} {line}", self.now.as_secs_f64()));
        }
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(self.rng.random_range(lo * 1000..=hi * 1000))
    }

    fn run(&mut self) -> Result<(), String> {
        for r in 0..self.replicas.len() {
            self.start(r)?;
        }
        for c in 0..self.clients.len() {
            let d = self.ms(0, 50);
            self.at(d, Event::Client(c));
        }
        for f in 0..self.followers.len() {
            let d = self.ms(0, 100);
            self.at(d, Event::Follow(f));
        }
        if self.faults_on {
            self.plan = match &self.opts.plan {
                Some(p) => p.clone(),
                None => fault_plan(self.seed, &self.opts),
            };
            for i in 0..self.plan.len() {
                let at = Duration::from_millis(self.plan[i].at_ms);
                self.at(at, Event::Fault(i));
            }
        }
        let end = self.opts.duration;
        let deadline = end + self.opts.settle;
        let mut settled_at = None;
        while let Some(Reverse((t, _, slot))) = self.queue.pop() {
            let event = self.slots[slot].take().expect("event in its slot");
            self.free.push(slot);
            self.now = t;
            self.clock.advance_to(t);
            if t >= end && settled_at.is_none() {
                settled_at = Some(t);
                self.heal_all()?;
            }
            if t >= deadline {
                break;
            }
            self.events += 1;
            self.record(&event);
            self.handle(event)?;
            self.poll_clients()?;
            if settled_at.is_some() && self.quiet() {
                break;
            }
        }
        if !self.quiet() && self.opts.double_faults {
            // Safety was checked at every step; a group that lost its
            // entries' majority waits for the missing replica, as it must.
            self.report.stuck = true;
            return Ok(());
        }
        if !self.quiet() {
            let replicas: Vec<String> = self
                .replicas
                .iter()
                .map(|r| match &r.running {
                    Some(x) => {
                        let s = x.status.borrow();
                        format!(
                            "{} {:?} commit {} applied {}{} ({})",
                            r.id,
                            s.role,
                            s.commit,
                            s.applied,
                            if s.caught_up { "" } else { " not caught up" },
                            x.driver.describe()
                        )
                    }
                    None => format!("{} down", r.id),
                })
                .collect();
            return Err(format!(
                "no progress: {} s after the faults stopped and every replica was back, {} client(s) still wait for an acknowledgement; replacement under way: {}; replicas: {}",
                self.opts.settle.as_secs(),
                self.clients
                    .iter()
                    .filter(|c| c.current.is_some() || c.reading.is_some())
                    .count(),
                self.operation
                    .as_ref()
                    .map_or("none".to_owned(), |o| format!(
                        "{} for {} at {:?}",
                        o.new, o.old, o.step
                    )),
                replicas.join(", "),
            ));
        }
        self.check_final()
    }

    /// Every client is done and every replica has applied all the group
    /// committed.
    fn quiet(&self) -> bool {
        if self.operation.is_some() {
            return false;
        }
        if self
            .clients
            .iter()
            .any(|c| c.current.is_some() || c.reading.is_some())
        {
            return false;
        }
        let statuses: Vec<NodeStatus> = self
            .replicas
            .iter()
            .filter_map(|r| r.running.as_ref().map(|x| x.status.borrow().clone()))
            .collect();
        if statuses.len() != self.replicas.len() {
            return false;
        }
        let commit = statuses.iter().map(|s| s.commit).max().unwrap_or(0);
        statuses.iter().all(|s| s.applied == commit)
    }

    fn record(&mut self, e: &Event) {
        let now = self.now.as_nanos() as u64;
        now.hash(&mut self.hash);
        match e {
            Event::Tick(r, _) => (0u8, *r).hash(&mut self.hash),
            Event::Deliver(to, _, m) => {
                (1u8, *to, m.get_msg_type() as i32, m.from, m.term, m.index).hash(&mut self.hash);
                (m.log_term, m.commit, m.entries.len(), m.reject).hash(&mut self.hash);
            }
            Event::Disk(r, _) => (2u8, *r).hash(&mut self.hash),
            Event::Apply(r, _) => (3u8, *r).hash(&mut self.hash),
            Event::Checkpoint(r, _) => (4u8, *r).hash(&mut self.hash),
            Event::Restart(r) => (5u8, *r).hash(&mut self.hash),
            Event::Client(c) => (6u8, *c).hash(&mut self.hash),
            Event::ClientTimeout(c, a) => (7u8, *c, *a).hash(&mut self.hash),
            Event::Retry(c, a) => (9u8, *c, *a).hash(&mut self.hash),
            Event::ReadTimeout(c, a) => (10u8, *c, *a).hash(&mut self.hash),
            Event::Build(r, _) => (11u8, *r).hash(&mut self.hash),
            Event::Operate => 13u8.hash(&mut self.hash),
            Event::Follow(f) => (14u8, *f).hash(&mut self.hash),
            Event::Transfer(from, to, m) => {
                (12u8, *from, *to, m.term, m.index).hash(&mut self.hash)
            }
            Event::Fault(i) => (8u8, *i).hash(&mut self.hash),
        }
        if self.opts.trace {
            match e {
                Event::Tick(..) | Event::Checkpoint(..) => {}
                Event::Deliver(to, _, m) => {
                    let (ty, from, term, index, commit, n, reject) = (
                        m.get_msg_type(),
                        m.from,
                        m.term,
                        m.index,
                        m.commit,
                        m.entries.len(),
                        m.reject,
                    );
                    let to = self.replicas[*to].id;
                    self.note(|| {
                        format!(
                            "deliver {ty:?} {from}→{to} term {term} index {index} commit {commit} entries {n}{}",
                            if reject { " reject" } else { "" }
                        )
                    });
                }
                other => {
                    let s = format!("{other:?}");
                    self.note(|| s);
                }
            }
        }
    }

    /// Replica `r`, if it runs and is still in the life an event was
    /// scheduled for.
    fn running(&mut self, r: usize, life: u64) -> Option<&mut Running> {
        let rep = &mut self.replicas[r];
        if rep.life != life {
            return None;
        }
        rep.running.as_mut()
    }

    fn handle(&mut self, e: Event) -> Result<(), String> {
        match e {
            Event::Tick(r, life) => {
                let Some(x) = self.running(r, life) else {
                    return Ok(());
                };
                x.driver.tick();
                self.turn(r)?;
                let jitter = self.ms(0, 2);
                self.at(TICK + jitter, Event::Tick(r, life));
            }
            Event::Deliver(r, life, m) => {
                if let Some(x) = self.running(r, life) {
                    // The driver's inbox is bounded; a full one drops, as
                    // the transport's does.
                    let _ = x.inbox.try_send(m);
                    self.turn(r)?;
                }
            }
            Event::Disk(r, life) => {
                let Some(x) = self.running(r, life) else {
                    return Ok(());
                };
                x.disk_busy = false;
                x.driver.complete_writes(usize::MAX);
                self.turn(r)?;
            }
            Event::Apply(r, life) => {
                let Some(x) = self.running(r, life) else {
                    return Ok(());
                };
                x.apply_at = None;
                if x.driver.apply_due().is_some() {
                    x.driver
                        .apply_pending()
                        .map_err(|e| format!("replica {} apply: {e}", self.replicas[r].id))?;
                }
                self.turn(r)?;
            }
            Event::Checkpoint(r, life) => {
                let Some(x) = self.running(r, life) else {
                    return Ok(());
                };
                crate::checkpoint::checkpoint_and_purge(&x.log, &x.durable);
                self.at(CHECKPOINT_EVERY, Event::Checkpoint(r, life));
            }
            Event::Build(r, life) => {
                let Some(x) = self.running(r, life) else {
                    return Ok(());
                };
                x.build_scheduled = false;
                x.log.snapshots().run_deferred_build();
                self.turn(r)?;
            }
            Event::Transfer(from, to, m) => {
                let delivered = self.transfer(from, to, &m);
                if delivered && let Some(x) = self.replicas[to].running.as_ref() {
                    self.report.snapshots += 1;
                    let _ = x.inbox.try_send(m);
                    self.turn(to)?;
                }
                if let Some(x) = self.replicas[from].running.as_ref() {
                    let _ = x
                        .events
                        .try_send(TransportEvent::Snapshot(self.replicas[to].id, delivered));
                    self.turn(from)?;
                }
                let (a, b) = (self.replicas[from].id, self.replicas[to].id);
                self.note(|| format!("snapshot {a}→{b} delivered: {delivered}"));
            }
            Event::Operate => self.operate()?,
            Event::Follow(f) => {
                self.follow(f)?;
                let d = self.ms(20, 100);
                self.at(d, Event::Follow(f));
            }
            Event::Restart(r) => {
                if self.replicas[r].running.is_none() {
                    self.start(r)?;
                }
            }
            Event::Client(c) => self.client_send(c)?,
            Event::ReadTimeout(c, action) => {
                if self.clients[c]
                    .reading
                    .as_ref()
                    .is_some_and(|r| r.action == action)
                {
                    let r = self.clients[c].reading.take().expect("checked");
                    let n = self.replicas.len();
                    self.clients[c].target = (r.target + 1) % n;
                    let d = self.ms(0, 20);
                    self.at(d, Event::Client(c));
                }
            }
            Event::ClientTimeout(c, attempt) | Event::Retry(c, attempt) => {
                let stale = self.clients[c]
                    .current
                    .as_ref()
                    .is_none_or(|s| s.attempt != attempt);
                if !stale {
                    if matches!(e, Event::ClientTimeout(..)) {
                        let n = self.replicas.len();
                        self.clients[c].target = (self.clients[c].target + 1) % n;
                    }
                    self.attempt(c)?;
                }
            }
            Event::Fault(i) => {
                if self.faults_on && self.now < self.opts.duration {
                    let kind = self.plan[i].kind.clone();
                    self.inject(kind)?;
                }
            }
        }
        Ok(())
    }

    /// Starts replica `r` on what its disk holds.
    fn start(&mut self, r: usize) -> Result<(), String> {
        let voters = if self.replicas[r].joiner {
            Vec::new()
        } else {
            self.initial_voters.clone()
        };
        let peers: Vec<(NodeId, String)> = self
            .initial_voters
            .iter()
            .cloned()
            .chain(self.replicas.iter().map(|x| (x.id, address(x.id))))
            .collect();
        let timeout = self.rng.random_range(ELECTION_TICKS..2 * ELECTION_TICKS);
        let incarnation: u64 = self.rng.random();
        let rep = &mut self.replicas[r];
        rep.life += 1;
        rep.checked = 0;
        let life = rep.life;
        let id = rep.id;
        let fail = |what: &str, e: StoreError| format!("replica {id}: {what}: {e}");
        let wal = RaftEngineWal::open_with(&rep.dir.path().join("wal"), Arc::new(rep.fs.clone()))
            .map_err(|e| fail("open the WAL", e))?;
        let state: Arc<dyn Engine> = Arc::new(rep.state.clone());
        let snapshots = Snapshots::open_deferred(&rep.dir.path().join("snap"), state.clone())
            .map_err(|e| fail("open snapshots", e))?;
        let log = LogStore::open(Arc::new(wal), state.clone(), snapshots, id, &voters)
            .map_err(|e| fail("open the log", e))?;
        state.sync().map_err(|e| fail("sync the state", e))?;
        let (applied, _) = log.applied().map_err(|e| fail("read applied", e))?;
        let durable = Durable::new(applied);
        let addresses = Addresses::default();
        for (n, a) in &peers {
            addresses.set(*n, a.clone());
        }
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let (req_tx, req_rx) = mpsc::channel(crate::node::REQUEST_QUEUE);
        let (inbox_tx, inbox_rx) = mpsc::channel(crate::transport::INBOX);
        let (event_tx, event_rx) = mpsc::channel(1024);
        let (status_tx, status_rx) = watch::channel(NodeStatus::starting(id));
        let cfg = DriverConfig {
            id,
            tick: TICK,
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: HEARTBEAT_TICKS,
            sync: SyncMode::Always,
            snapshot_entries: SNAPSHOT_ENTRIES,
            compact_keep: COMPACT_KEEP,
            checkpoint_interval: CHECKPOINT_EVERY,
            wal_sync_interval: CHECKPOINT_EVERY,
            dedup_window: self.opts.dedup_window,
        };
        let io = DriverIo {
            net: Box::new(SimNet {
                outbox: outbox.clone(),
                addresses,
            }),
            writer: LogWriter::manual(log.clone()),
            clock: Clock::Virtual(rep.clock.clone()),
            incarnation,
            election_timeout: Some(timeout),
            known_bug: self.opts.known_bug,
        };
        let driver = Driver::new(
            cfg,
            log.clone(),
            durable.clone(),
            io,
            req_rx,
            inbox_rx,
            event_rx,
            status_tx,
        )
        .map_err(|e| fail("start the driver", e))?;
        rep.running = Some(Running {
            driver,
            requests: req_tx,
            inbox: inbox_tx,
            events: event_tx,
            status: status_rx,
            outbox,
            log,
            durable,
            apply_at: None,
            disk_busy: false,
            build_scheduled: false,
        });
        self.note(|| format!("start replica {id} (election timeout {timeout} ticks)"));
        let d = self.ms(0, 10);
        self.at(d, Event::Tick(r, life));
        let d = self.ms(0, 500);
        self.at(d, Event::Checkpoint(r, life));
        Ok(())
    }

    /// Kills replica `r`: what no sync covered is gone from its disk.
    fn crash(&mut self, r: usize) {
        let rep = &mut self.replicas[r];
        let Some(x) = rep.running.take() else {
            return;
        };
        rep.life += 1;
        x.driver.crash();
        // The WAL closes with the last handle on it, before its files are
        // cut below.
        drop(x.log);
        drop(x.durable);
        // Half the time, part of what was written after the last fdatasync
        // survives too, its last write possibly torn.
        let rng = &mut self.rng;
        rep.fs.crash_torn(|unsynced| {
            if unsynced == 0 || rng.random_bool(0.5) {
                0
            } else {
                rng.random_range(0..=unsynced)
            }
        });
        rep.state.power_cut();
        if self.opts.lying_disks {
            rep.losses += 1;
        }
        self.report.crashes += 1;
        let id = rep.id;
        self.note(|| format!("crash replica {id}"));
    }

    /// The slot replica `id` runs in.
    fn slot(&self, id: NodeId) -> Option<usize> {
        self.replicas.iter().position(|x| x.id == id)
    }

    /// The slot of a running replica that leads, if any.
    fn leader(&self) -> Option<usize> {
        (0..self.replicas.len()).find(|&r| {
            self.replicas[r]
                .running
                .as_ref()
                .is_some_and(|x| x.driver.raw().raft.state == StateRole::Leader)
        })
    }

    /// One look of the operator at its replacement: takes the answer to
    /// the change it asked, moves to the next step, or asks (again) the
    /// replica that leads now.
    fn operate(&mut self) -> Result<(), String> {
        let Some(mut op) = self.operation.take() else {
            return Ok(());
        };
        if let Some((at, mut rx)) = op.asked.take() {
            match rx.try_recv() {
                Ok(Ok(_)) => op.step = next_step(op.step),
                // A replacement's old replica already gone counts as
                // removed (the answer to an earlier ask was lost).
                Ok(Err(StoreError::NotFound(_))) if op.step == Step::RemoveOld => {
                    op.step = next_step(op.step)
                }
                Err(oneshot::error::TryRecvError::Empty) if self.now < at + ATTEMPT_TIMEOUT => {
                    op.asked = Some((at, rx));
                }
                // Refused, lost or unanswered: ask again below.
                _ => {}
            }
        }
        if op.step == Step::CatchUp {
            let commit = self
                .leader()
                .and_then(|l| self.replicas[l].running.as_ref())
                .map(|x| x.status.borrow().commit);
            let caught_up = self.replicas[op.slot].running.as_ref().is_some_and(|x| {
                let s = x.status.borrow();
                s.caught_up && commit.is_some_and(|c| s.applied + 100 >= c)
            });
            if caught_up {
                op.step = Step::Promote;
            }
        }
        let change = match op.step {
            Step::AddLearner => Some(MembershipChange::AddLearner {
                id: op.new,
                address: address(op.new),
            }),
            Step::Promote => Some(MembershipChange::Promote { id: op.new }),
            Step::RemoveOld => Some(MembershipChange::Remove { id: op.old }),
            Step::CatchUp | Step::Done => None,
        };
        if op.step == Step::Done {
            let (old, new) = (op.old, op.new);
            self.note(|| format!("replica {new} replaced replica {old}"));
            return Ok(());
        }
        if let Some(change) = change
            && op.asked.is_none()
            && let Some(l) = self.leader()
            && let Some(x) = self.replicas[l].running.as_ref()
        {
            let (reply, rx) = oneshot::channel();
            let step = op.step;
            let _ = x.requests.try_send(Request::Membership { change, reply });
            op.asked = Some((self.now, rx));
            let name = self.replicas[l].id;
            self.note(|| format!("operator asks replica {name}: {step:?}"));
            self.turn(l)?;
        }
        self.operation = Some(op);
        self.at(Duration::from_millis(50), Event::Operate);
        Ok(())
    }

    /// Replaces stopped replica `r`'s disk with an empty one.
    fn wipe(&mut self, r: usize) -> Result<(), String> {
        let rep = &mut self.replicas[r];
        rep.fs.wipe();
        rep.state = MemEngine::new();
        rep.losses += 1;
        let dir = rep.dir.path().to_owned();
        for sub in ["wal", "snap"] {
            let path = dir.join(sub);
            if path.exists() {
                std::fs::remove_dir_all(&path)
                    .map_err(|e| format!("wipe {}: {e}", path.display()))?;
            }
        }
        std::fs::create_dir_all(dir.join("wal")).map_err(|e| format!("wipe: {e}"))?;
        let name = self.replicas[r].id;
        self.note(|| format!("wipe replica {name}'s disk"));
        Ok(())
    }

    /// Whether a disk or a machine may be lost without making it a second
    /// fault: every replica's disk has caught up with the group since it was
    /// new, and every running replica applied the group's membership as it
    /// is (a replacement's removal of the old replica, which its leader may
    /// have reported before the followers learned it was committed: until
    /// they apply it, they count the lost replica among the voters).
    fn at_full_strength(&self) -> bool {
        if self.new_disk.contains(&true) {
            return false;
        }
        let mut ids: Vec<u64> = self.replicas.iter().map(|r| r.id.0).collect();
        ids.sort_unstable();
        self.replicas
            .iter()
            .all(|r| r.running.as_ref().is_none_or(|x| x.driver.voters() == ids))
    }

    /// A turn of replica `r`'s driver, then its outputs: messages onto the
    /// network, writes onto the disk, a due apply onto the clock; then the
    /// checks.
    fn turn(&mut self, r: usize) -> Result<(), String> {
        let Some(x) = self.replicas[r].running.as_mut() else {
            return Ok(());
        };
        if let Err(e) = x.driver.turn() {
            return Err(format!("replica {} stopped: {e}", self.replicas[r].id));
        }
        let msgs = std::mem::take(&mut *x.outbox.lock().expect("outbox lock"));
        let writes = x.driver.writes_queued() > 0 && !x.disk_busy;
        if writes {
            x.disk_busy = true;
        }
        let due = x.driver.apply_due().map(|at| {
            let from_now = at.saturating_duration_since(self.clock.now());
            self.now + from_now
        });
        let schedule_apply = match (due, x.apply_at) {
            (Some(at), None) => Some(at),
            (Some(at), Some(scheduled)) if at < scheduled => Some(at),
            _ => None,
        };
        if let Some(at) = schedule_apply {
            x.apply_at = Some(at);
        }
        let build = !x.build_scheduled && x.log.snapshots().has_deferred_build();
        if build {
            x.build_scheduled = true;
        }
        let life = self.replicas[r].life;
        if writes {
            let d = if self.rng.random_bool(0.02) {
                self.ms(20, 120)
            } else {
                self.ms(0, 2)
            };
            self.at(d, Event::Disk(r, life));
        }
        if let Some(at) = schedule_apply {
            self.at(at.saturating_sub(self.now), Event::Apply(r, life));
        }
        if build {
            let d = self.ms(5, 40);
            self.at(d, Event::Build(r, life));
        }
        for m in msgs {
            self.send(r, m);
        }
        self.check(r)
    }

    fn send(&mut self, from: usize, m: Message) {
        let Some(to) = self.slot(NodeId(m.to)) else {
            return;
        };
        if m.get_msg_type() == MessageType::MsgSnapshot {
            // The file goes first, then the message (as the transport
            // does); the sender hears whether both arrived.
            let d = self.ms(5, 50);
            self.at(d, Event::Transfer(from, to, m));
            return;
        }
        if self.faults_on && (self.cut[from][to] || self.rng.random_bool(0.01)) {
            return;
        }
        let copies = if self.faults_on && self.rng.random_bool(0.01) {
            2
        } else {
            1
        };
        let life = self.replicas[to].life;
        for _ in 0..copies {
            let d = if self.rng.random_bool(0.05) {
                self.ms(5, 60)
            } else {
                self.ms(0, 2)
            };
            self.at(d, Event::Deliver(to, life, m.clone()));
        }
    }

    /// Copies the snapshot file `m` describes from replica `from` to
    /// replica `to` in chunks, through the receiver's real resumable
    /// receiving (`Snapshots::receive_chunk`). False when either is down,
    /// the link is cut, or the file is gone or refused.
    fn transfer(&mut self, from: usize, to: usize, m: &Message) -> bool {
        if self.faults_on && (self.cut[from][to] || self.rng.random_bool(0.05)) {
            return false;
        }
        let (Some(src), Some(dst)) = (
            self.replicas[from].running.as_ref(),
            self.replicas[to].running.as_ref(),
        ) else {
            return false;
        };
        let Ok(d) = crate::snapshot::Descriptor::decode(m.get_snapshot().get_data()) else {
            return false;
        };
        let Ok(bytes) = std::fs::read(src.log.snapshots().outgoing(&d)) else {
            return false;
        };
        let dst = dst.log.snapshots();
        let Ok((mut held, mut complete)) = dst.progress(&d) else {
            return false;
        };
        // Some transfers break off after a chunk and resume next time.
        let breaks = self.faults_on && self.rng.random_bool(0.2);
        while !complete {
            let end = (held as usize + SNAPSHOT_CHUNK).min(bytes.len());
            let chunk = match bytes.get(held as usize..end) {
                Some(c) if !c.is_empty() => c,
                _ => return false,
            };
            match dst.receive_chunk(&d, held, chunk) {
                Ok((h, c)) => (held, complete) = (h, c),
                Err(_) => return false,
            }
            if breaks && !complete {
                return false;
            }
        }
        true
    }

    /// Invariants after a turn of replica `r`.
    fn check(&mut self, r: usize) -> Result<(), String> {
        let Some(x) = self.replicas[r].running.as_ref() else {
            return Ok(());
        };
        if self.new_disk[r] && x.status.borrow().caught_up {
            self.new_disk[r] = false;
        }
        let x = self.replicas[r].running.as_ref().expect("checked above");
        let raw = x.driver.raw();
        let term = raw.raft.term;
        let leads = raw.raft.state == StateRole::Leader;
        let log = &raw.raft.raft_log;
        let committed = log.committed;
        let from = self.replicas[r]
            .checked
            .max(log.first_index().saturating_sub(1))
            + 1;
        let entries = if committed >= from {
            log.slice(
                from,
                committed + 1,
                None::<u64>,
                GetEntriesContext::empty(false),
            )
            .map_err(|e| {
                format!(
                    "replica {}: read committed entries: {e}",
                    self.replicas[r].id
                )
            })?
        } else {
            Vec::new()
        };
        if leads {
            // Within a term, a leader's record of what a follower holds
            // goes back only when the follower lost it, once per loss (an
            // acknowledgement sent before a loss may still raise it after).
            for (f, pr) in raw.raft.prs().iter() {
                let Some(losses) = self.slot(NodeId(*f)).map(|s| self.replicas[s].losses) else {
                    continue;
                };
                let (was, back) = self.progress.entry((term, *f)).or_insert((pr.matched, 0));
                if pr.matched < *was {
                    *back += 1;
                    if *back > losses {
                        return Err(format!(
                            "replica {} (leading term {term}) set replica {f}'s progress back from {was} to {} ({} times), though it lost its log {losses} times",
                            self.replicas[r].id, pr.matched, back
                        ));
                    }
                }
                *was = pr.matched;
            }
            let id = self.replicas[r].id;
            match self.leaders.get(&term) {
                Some(&other) if other != id => {
                    return Err(format!(
                        "two leaders in term {term}: replicas {other} and {id}"
                    ));
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(term, id);
                    self.note(|| format!("replica {id} leads term {term}"));
                }
            }
        }
        for e in entries {
            let seen = (e.term, entry_hash(&e.data));
            match self.committed.get(&e.index) {
                Some(&first) if first != seen => {
                    return Err(format!(
                        "committed entry {} changed: replica {} holds one of term {} where one of term {} was committed",
                        e.index, self.replicas[r].id, e.term, first.0
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(e.index, seen);
                    if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                        self.model.pending.insert(e.index, e.data.to_vec());
                    } else {
                        self.model.pending.insert(e.index, Vec::new());
                    }
                }
            }
        }
        self.model.advance(self.opts.dedup_window)?;
        self.replicas[r].checked = self.replicas[r].checked.max(committed);
        Ok(())
    }

    fn inject(&mut self, kind: FaultKind) -> Result<(), String> {
        let n = self.replicas.len();
        match kind {
            FaultKind::Crash { replica, down_ms }
                if replica < n && self.replicas[replica].running.is_some() =>
            {
                self.crash(replica);
                self.at(Duration::from_millis(down_ms), Event::Restart(replica));
            }
            FaultKind::Wipe { replica, down_ms }
                if replica < n
                    && (self.opts.double_faults || self.at_full_strength())
                    && self.operation.is_none() =>
            {
                self.crash(replica);
                self.wipe(replica)?;
                self.report.wipes += 1;
                self.new_disk[replica] = true;
                self.at(Duration::from_millis(down_ms), Event::Restart(replica));
            }
            FaultKind::Replace { replica }
                if replica < n
                    && (self.opts.double_faults || self.at_full_strength())
                    && self.operation.is_none() =>
            {
                self.crash(replica);
                let old = self.replicas[replica].id;
                let new = NodeId(self.next_id);
                self.next_id += 1;
                self.wipe(replica)?;
                self.replicas[replica].id = new;
                self.replicas[replica].joiner = true;
                self.new_disk[replica] = true;
                self.report.replacements += 1;
                self.note(|| format!("replica {old}'s machine is lost; replica {new} replaces it"));
                self.start(replica)?;
                self.operation = Some(Replacement {
                    slot: replica,
                    old,
                    new,
                    step: Step::AddLearner,
                    asked: None,
                });
                self.at(Duration::from_millis(10), Event::Operate);
            }
            FaultKind::Isolate { replica } if replica < n => {
                for o in 0..n {
                    if o != replica {
                        self.cut[replica][o] = true;
                        self.cut[o][replica] = true;
                    }
                }
                self.report.partitions += 1;
                let name = self.replicas[replica].id;
                self.note(|| format!("isolate replica {name}"));
            }
            FaultKind::Cut { from, to } if from < n && to < n => {
                self.cut[from][to] = true;
                self.report.partitions += 1;
                let (a, b) = (self.replicas[from].id, self.replicas[to].id);
                self.note(|| format!("cut {a} → {b}"));
            }
            FaultKind::Heal => {
                for row in &mut self.cut {
                    row.iter_mut().for_each(|c| *c = false);
                }
                self.note(|| "heal the network".into());
            }
            FaultKind::StepClock { replica, ms } if replica < n => {
                let off = self.replicas[replica].clock.step_wall(ms);
                self.skew_ms = self.skew_ms.max(off.abs());
                self.report.clock_steps += 1;
                let name = self.replicas[replica].id;
                self.note(|| format!("step replica {name}'s wall clock by {ms} ms"));
            }
            FaultKind::TransferLeader => {
                if let Some(r) = self.leader()
                    && let Some(x) = self.replicas[r].running.as_ref()
                {
                    let (reply, _) = oneshot::channel();
                    let _ = x.requests.try_send(Request::TransferLeader {
                        target: None,
                        reply,
                    });
                    self.report.transfers += 1;
                    let name = self.replicas[r].id;
                    self.note(|| format!("replica {name} asked to transfer leadership"));
                    self.turn(r)?;
                }
            }
            // A fault naming a replica the group does not have (a plan
            // given by hand for another size) does nothing.
            _ => {}
        }
        Ok(())
    }

    /// The faults end: the network heals and every replica is started.
    fn heal_all(&mut self) -> Result<(), String> {
        self.sending_on = false;
        self.faults_on = false;
        for row in &mut self.cut {
            row.iter_mut().for_each(|c| *c = false);
        }
        for r in 0..self.replicas.len() {
            if self.replicas[r].running.is_none() {
                self.start(r)?;
            }
        }
        self.note(|| "faults end: network healed, every replica up".into());
        Ok(())
    }

    fn client_send(&mut self, c: usize) -> Result<(), String> {
        if self.clients[c].current.is_some() || self.clients[c].reading.is_some() {
            return Ok(());
        }
        let k = self.conversations.len();
        self.clients[c].actions += 1;
        if self.clients[c].sent as usize >= k && self.sending_on && self.rng.random_bool(0.2) {
            let conv = self.rng.random_range(0..k);
            return self.read(c, conv);
        }
        let client = &mut self.clients[c];
        let conv = (c + client.sent as usize) % k;
        // A client's first operations create every conversation (a create
        // of one that exists with the same members is a no-op).
        let sending = if (client.sent as usize) < k {
            let conv = client.sent as usize;
            Sending {
                op: Op::CreateConversation {
                    conversation: self.conversations[conv].clone(),
                    members: self.users.clone(),
                },
                conversation: conv,
                id: None,
                attempt: 0,
                replies: Vec::new(),
                acked: None,
            }
        } else {
            if !self.sending_on {
                return Ok(());
            }
            let id = format!("{}-{}", client.user, client.sent);
            Sending {
                op: Op::Append(NewMessage {
                    conversation: self.conversations[conv].clone(),
                    sender: client.user.clone(),
                    client_msg_id: id.clone(),
                    body: bytes::Bytes::from(id.clone().into_bytes()),
                }),
                conversation: conv,
                id: Some(id),
                attempt: 0,
                replies: Vec::new(),
                acked: None,
            }
        };
        client.current = Some(sending);
        self.attempt(c)
    }

    /// Sends the client's current message (again) to its target replica.
    fn attempt(&mut self, c: usize) -> Result<(), String> {
        let target = self.clients[c].target;
        let Some(s) = self.clients[c].current.as_mut() else {
            return Ok(());
        };
        s.attempt += 1;
        let attempt = s.attempt;
        let (tx, rx) = oneshot::channel();
        s.replies.push((attempt, rx));
        let op = s.op.clone();
        let id = s.id.clone();
        if let Some(id) = &id {
            let now = self.now;
            self.sent_between
                .entry((s.conversation, id.clone()))
                .and_modify(|(_, last)| *last = now)
                .or_insert((now, now));
        }
        let name = self.replicas[target].id;
        self.note(|| format!("client {c} sends {id:?} to replica {name} (attempt {attempt})"));
        if let Some(x) = self.replicas[target].running.as_ref() {
            let _ = x.requests.try_send(Request::Propose {
                ops: vec![op],
                reply: tx,
            });
            self.turn(target)?;
            self.at(ATTEMPT_TIMEOUT, Event::ClientTimeout(c, attempt));
        } else {
            // Connection refused: the next replica, soon.
            let d = self.ms(5, 20);
            self.at(d, Event::ClientTimeout(c, attempt));
        }
        Ok(())
    }

    /// Takes every reply that came.
    fn poll_clients(&mut self) -> Result<(), String> {
        for c in 0..self.clients.len() {
            self.poll_late(c)?;
            self.poll_read(c)?;
            let Some(mut s) = self.clients[c].current.take() else {
                continue;
            };
            let mut failed_latest = false;
            let latest = s.attempt;
            let mut i = 0;
            while i < s.replies.len() {
                let outcome = match s.replies[i].1.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => {
                        i += 1;
                        continue;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => Err(StoreError::ShuttingDown),
                    Ok(r) => r,
                };
                let is_latest = s.replies[i].0 == latest;
                s.replies.remove(i);
                match outcome.map(|mut v| v.pop()) {
                    Ok(Some(Ok(OpOutcome::Appended(a)))) => {
                        let id = s.id.clone().unwrap_or_default();
                        self.report.duplicates += u64::from(a.duplicate);
                        if let Some(seq) = s.acked
                            && seq != a.seq
                            && !self.may_store_anew(s.conversation, &id)
                        {
                            return Err(format!(
                                "message {id} acknowledged twice with different seqs: {} and {}",
                                seq.0, a.seq.0
                            ));
                        }
                        s.acked = Some(a.seq);
                    }
                    Ok(Some(Ok(_))) => s.acked = Some(Seq(0)),
                    Ok(Some(Err(e))) => {
                        return Err(format!("client {c}: operation refused: {e}"));
                    }
                    Ok(None) => return Err(format!("client {c}: an empty answer")),
                    Err(e) => {
                        if is_latest {
                            failed_latest = true;
                            let from = self.clients[c].target;
                            self.redirect(c, from, &e);
                        }
                    }
                }
            }
            if let Some(seq) = s.acked {
                if let Some(id) = s.id.clone() {
                    let key = (s.conversation, id.clone());
                    self.acked.insert(key.clone(), seq);
                    self.acked_at.insert(key, self.now);
                    let client = &mut self.clients[c];
                    for (_, rx) in s.replies.drain(..) {
                        client.late.push((s.conversation, id.clone(), seq, rx));
                    }
                    self.note(|| format!("client {c}: {id} acknowledged with seq {}", seq.0));
                }
                self.clients[c].sent += 1;
                let d = self.ms(0, 20);
                self.at(d, Event::Client(c));
                continue;
            }
            self.clients[c].current = Some(s);
            if failed_latest {
                let d = self.ms(10, 50);
                self.at(d, Event::Retry(c, latest));
            }
        }
        Ok(())
    }

    /// Follower `f` reads on from its cursor on a replica picked at random,
    /// if that replica serves stale reads (it has caught up, as the Store
    /// service asks).
    fn follow(&mut self, f: usize) -> Result<(), String> {
        let r = self.rng.random_range(0..self.replicas.len());
        let Some(x) = self.replicas[r].running.as_ref() else {
            return Ok(());
        };
        if !x.status.borrow().caught_up {
            return Ok(());
        }
        let (conv, cursor) = (self.followers[f].conversation, self.followers[f].cursor);
        let page = self.stored(r, conv, cursor, 100)?;
        let follower = &mut self.followers[f];
        for (seq, id) in page {
            if seq != follower.cursor + 1 {
                return Err(format!(
                    "a read of {} after cursor {} on replica {} returned seq {seq} (a gap)",
                    self.conversations[conv], follower.cursor, self.replicas[r].id
                ));
            }
            follower.cursor = seq;
            follower.got.push((seq, id));
        }
        Ok(())
    }

    /// Conversation `conv` as replica `r`'s state holds it after seq
    /// `after`: up to `limit` (seq, client message id) pairs.
    fn stored(
        &self,
        r: usize,
        conv: usize,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, String> {
        let id = &self.conversations[conv];
        Ok(Reader::new(Arc::new(self.replicas[r].state.clone()))
            .messages(id, Seq(after), Seq(0), limit)
            .map_err(|e| format!("replica {}: read {id}: {e}", self.replicas[r].id))?
            .into_iter()
            .map(|m| (m.seq.0, m.client_msg_id))
            .collect())
    }

    /// Where client `c` goes after replica `from` refused it: the leader
    /// it named, or the next replica.
    fn redirect(&mut self, c: usize, from: usize, e: &StoreError) {
        self.clients[c].target = match e {
            StoreError::NotLeader {
                leader: Some((lead, _)),
            } => self.slot(*lead).unwrap_or(from),
            _ => (from + 1) % self.replicas.len(),
        };
    }

    /// Starts a linearizable read of `conv` on the client's target.
    fn read(&mut self, c: usize, conv: usize) -> Result<(), String> {
        let target = self.clients[c].target;
        let action = self.clients[c].actions;
        let (tx, rx) = oneshot::channel();
        self.clients[c].reading = Some(Reading {
            conversation: conv,
            target,
            invoked: self.now,
            action,
            reply: rx,
        });
        let name = self.replicas[target].id;
        self.note(|| format!("client {c} reads c{conv} on replica {name}"));
        if let Some(x) = self.replicas[target].running.as_ref() {
            let _ = x.requests.try_send(Request::Read { reply: tx });
            self.turn(target)?;
        }
        self.at(ATTEMPT_TIMEOUT, Event::ReadTimeout(c, action));
        Ok(())
    }

    /// Takes the answer to a client's read, if it came: on success the
    /// conversation is read from that replica's state at once.
    fn poll_read(&mut self, c: usize) -> Result<(), String> {
        let Some(mut r) = self.clients[c].reading.take() else {
            return Ok(());
        };
        let answer = match r.reply.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => {
                self.clients[c].reading = Some(r);
                return Ok(());
            }
            Err(oneshot::error::TryRecvError::Closed) => Err(StoreError::ShuttingDown),
            Ok(a) => a,
        };
        match answer {
            Ok(()) if self.replicas[r.target].running.is_some() => {
                let head = self.replicas[r.target].state.clone();
                let id = &self.conversations[r.conversation];
                let n = Reader::new(Arc::new(head))
                    .last_seq(id)
                    .map_err(|e| format!("read the head of {id}: {e}"))?
                    .0;
                let last = self
                    .stored(r.target, r.conversation, n.saturating_sub(1), 1)?
                    .pop();
                let n = n as usize;
                self.reads[r.conversation].push(ReadSeen {
                    invoked: r.invoked,
                    answered: self.now,
                    count: n,
                    last,
                });
                let conv = r.conversation;
                self.note(|| format!("client {c} read {n} messages of c{conv}"));
            }
            Ok(()) => {}
            Err(e) => self.redirect(c, r.target, &e),
        }
        let d = self.ms(0, 20);
        self.at(d, Event::Client(c));
        Ok(())
    }

    /// Every completed linearizable read is consistent with one order of
    /// the operations that respects real time: it returned a prefix of
    /// the conversation as finally stored, holding every append
    /// acknowledged before the read was sent, and no shorter than a read
    /// answered before it was sent.
    fn check_reads(&self, stored: &[Vec<(u64, String)>]) -> Result<(), String> {
        for (ci, reads) in self.reads.iter().enumerate() {
            let conv = &self.conversations[ci];
            let finals = &stored[ci];
            // (acknowledged at, seq), by time.
            let mut acks: Vec<(Duration, u64)> = self
                .acked
                .range((ci, String::new())..)
                .take_while(|((c, _), _)| *c == ci)
                .filter_map(|(k, seq)| self.acked_at.get(k).map(|at| (*at, seq.0)))
                .collect();
            acks.sort();
            let mut highest = Vec::with_capacity(acks.len());
            let mut top = 0;
            for (_, seq) in &acks {
                top = top.max(*seq);
                highest.push(top);
            }
            let mut by_answer: Vec<(Duration, usize)> =
                reads.iter().map(|r| (r.answered, r.count)).collect();
            by_answer.sort();
            let mut longest = Vec::with_capacity(by_answer.len());
            let mut top = 0;
            for (_, n) in &by_answer {
                top = top.max(*n);
                longest.push(top);
            }
            for r in reads {
                let prefix = match &r.last {
                    None => r.count == 0,
                    Some(m) => r.count > 0 && finals.get(r.count - 1) == Some(m),
                };
                if !prefix {
                    return Err(format!(
                        "a linearizable read of {conv} at {:.3} s returned {} messages that are not what {conv} finally holds",
                        r.answered.as_secs_f64(),
                        r.count
                    ));
                }
                let before = acks.partition_point(|(at, _)| *at < r.invoked);
                if before > 0 && highest[before - 1] > r.count as u64 {
                    return Err(format!(
                        "a linearizable read of {conv} sent at {:.3} s returned {} messages, but seq {} was acknowledged before it was sent (stale read)",
                        r.invoked.as_secs_f64(),
                        r.count,
                        highest[before - 1]
                    ));
                }
                let earlier = by_answer.partition_point(|(at, _)| *at < r.invoked);
                if earlier > 0 && longest[earlier - 1] > r.count {
                    return Err(format!(
                        "a linearizable read of {conv} sent at {:.3} s returned {} messages, fewer than a read answered before it was sent ({})",
                        r.invoked.as_secs_f64(),
                        r.count,
                        longest[earlier - 1]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Replies to attempts of messages already acknowledged: any that
    /// says "appended" must give the same seq.
    fn poll_late(&mut self, c: usize) -> Result<(), String> {
        let mut answered = Vec::new();
        let late = &mut self.clients[c].late;
        let mut i = 0;
        while i < late.len() {
            match late[i].3.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => i += 1,
                Err(oneshot::error::TryRecvError::Closed) => {
                    late.swap_remove(i);
                }
                Ok(r) => {
                    let (conversation, id, seq, _) = late.swap_remove(i);
                    if let Ok(mut v) = r
                        && let Some(Ok(OpOutcome::Appended(a))) = v.pop()
                        && a.seq != seq
                    {
                        answered.push((conversation, id, seq, a.seq));
                    }
                }
            }
        }
        for (conversation, id, first, then) in answered {
            if !self.may_store_anew(conversation, &id) {
                return Err(format!(
                    "a retry of message {id} was acknowledged with seq {}, the first attempt with {}",
                    then.0, first.0
                ));
            }
        }
        Ok(())
    }

    /// Whether the state machine may have stored message `id` anew, its
    /// dedup record expired: its attempts were sent at least the dedup
    /// window apart, less twice the largest clock step (the first copy's
    /// timestamp from a clock behind, the retry judged by one ahead) and
    /// a second for a proposal's wait in a leader's queue.
    fn may_store_anew(&self, conversation: usize, id: &str) -> bool {
        let Some(&(first, last)) = self.sent_between.get(&(conversation, id.to_owned())) else {
            return false;
        };
        let slack = 2 * self.skew_ms.unsigned_abs() + 1000;
        (last - first).as_millis() as u64 + slack >= self.opts.dedup_window.as_millis() as u64
    }

    /// After the run: every replica holds every acknowledged append once
    /// (more than once only when its retries outlived the dedup window),
    /// with its seq, and the same conversations.
    fn check_final(&mut self) -> Result<(), String> {
        let mut first: Option<Vec<Vec<(u64, String)>>> = None;
        let mut stored_anew = 0;
        for r in 0..self.replicas.len() {
            let name = self.replicas[r].id;
            let mut convs = Vec::new();
            for (ci, conv) in self.conversations.iter().enumerate() {
                let msgs = self.stored(r, ci, 0, usize::MAX)?;
                let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
                for (i, (seq, id)) in msgs.iter().enumerate() {
                    if *seq != i as u64 + 1 {
                        return Err(format!(
                            "replica {name}: conversation {conv} has seq {seq} at position {} (gap)",
                            i + 1
                        ));
                    }
                    let seqs = seen.entry(id.clone()).or_default();
                    if let Some(prev) = seqs.first()
                        && !self.may_store_anew(ci, id)
                    {
                        return Err(format!(
                            "replica {name}: message {id} stored twice in {conv}, seqs {prev} and {seq}"
                        ));
                    }
                    if r == 0 && !seqs.is_empty() {
                        stored_anew += 1;
                    }
                    seqs.push(*seq);
                }
                for ((c, id), seq) in self.acked.range((ci, String::new())..) {
                    if *c != ci {
                        break;
                    }
                    match seen.get(id) {
                        Some(s) if s.contains(&seq.0) => {}
                        Some(s) => {
                            return Err(format!(
                                "replica {name}: acknowledged message {id} is stored at seq {s:?}, acknowledged with {}",
                                seq.0
                            ));
                        }
                        None => {
                            return Err(format!(
                                "replica {name}: acknowledged message {id} (seq {}) is lost from {conv}",
                                seq.0
                            ));
                        }
                    }
                }
                convs.push(msgs);
            }
            match &first {
                None => {
                    self.check_reads(&convs)?;
                    for f in &self.followers {
                        let finals = &convs[f.conversation];
                        if !finals.starts_with(&f.got) {
                            return Err(format!(
                                "a follower of {} read {} messages from its cursor that are not what it finally holds",
                                self.conversations[f.conversation],
                                f.got.len()
                            ));
                        }
                    }
                    first = Some(convs);
                }
                Some(f) if *f != convs => {
                    return Err(format!(
                        "replica {name} holds other messages than replica {}",
                        self.replicas[0].id
                    ));
                }
                Some(_) => {}
            }
        }
        self.report.stored_anew = stored_anew;
        self.check_model(first.as_deref().unwrap_or_default())
    }

    /// What replica 1 holds (and every replica, checked above) is what the
    /// specification makes of the committed log.
    fn check_model(&self, held: &[Vec<(u64, String)>]) -> Result<(), String> {
        let top = self.committed.keys().max().copied().unwrap_or(0);
        if self.model.applied < top {
            return Err(format!(
                "simulator: the model applied the committed log to {} of {top}: entry {} was never seen committed",
                self.model.applied,
                self.model.applied + 1
            ));
        }
        for (ci, conv) in self.conversations.iter().enumerate() {
            let want = self
                .model
                .conversations
                .get(conv)
                .map_or(&[][..], |v| &v[..]);
            let got = &held[ci];
            if let Some(i) = (0..want.len().max(got.len()))
                .find(|&i| want.get(i) != got.get(i).map(|(_, id)| id))
            {
                return Err(format!(
                    "{conv} holds {:?} at seq {}, where the committed log makes it {:?} (dedup window {} ms)",
                    got.get(i).map(|(_, id)| id),
                    i + 1,
                    want.get(i),
                    self.opts.dedup_window.as_millis()
                ));
            }
        }
        Ok(())
    }
}
