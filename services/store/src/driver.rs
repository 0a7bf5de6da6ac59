//! The raft driver: the one task that owns the `RawNode`.
//!
//! It runs on its own OS thread (a current-thread runtime), and the WAL
//! writes and fdatasyncs run on another (the log writer, `writer.rs`), so
//! neither stalls the tokio workers that serve gRPC, and the driver keeps
//! stepping, ticking and proposing while a sync runs. Each loop iteration
//! waits for one input, drains everything else already queued, turns all
//! queued proposals into as few raft entries as possible (group commit:
//! what arrives while an entry is in flight joins the next one), then
//! handles the Ready in raft-rs's order:
//!
//! 1. send the leader's messages (they need not wait for our disk),
//! 2. install a received snapshot (after every queued write has landed),
//! 3. apply committed entries (to the state engine, without a sync): at
//!    once on the leader, whose acknowledgements wait for it; a follower
//!    gathers them for up to `FOLLOWER_APPLY_DELAY` and applies them as one
//!    batch (only its stale reads wait for it),
//! 4. stage the new entries and hard state in the log store (raft reads them
//!    from memory), `advance_append_async`, and queue them for the log
//!    writer, which writes and fdatasyncs them,
//! 5. when the writer reports a Ready durable: send the messages that had to
//!    follow persistence (votes, append acks) and `on_persist_ready`,
//! 6. `advance_apply_to` the applied index, compact the log below the
//!    durable checkpoint (`checkpoint.rs`).
//!
//! Architecture Invariant: the driver never awaits the network. Outgoing
//! messages go into bounded per-peer queues and are dropped when those are
//! full (raft retransmits).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::checkpoint::Durable;
use crate::clock::Clock;
use crate::codec;
use crate::engine::Engine;
use crate::error::StoreError;
use crate::keys;
use crate::log_store::{Freshness, LogStore};
use crate::node::{
    DriverStats, MembershipChange, NodeStatus, OpResults, ReplicaView, Request, SnapshotFile,
    StatusReport,
};
use crate::state_machine::{Applier, Heads};
use crate::transport::{Network, TransportEvent};
use crate::types::{NodeId, Op};
use crate::writer::{LogWriter, Persisted, WriteTask};

/// Most queued inputs taken per loop iteration, so ticks are never starved.
const DRAIN_LIMIT: usize = 4096;
/// Readies handled per loop iteration at most, so inputs are not starved.
const READY_ROUNDS: usize = 4;
/// Largest raft entry the driver builds from queued proposals.
const MAX_ENTRY_BYTES: usize = 1 << 20;
/// Uncommitted entries the leader keeps in flight. While this many are
/// being replicated, new proposals wait and join the next entry, so under
/// load one entry (one log write and sync on every replica) carries many
/// operations; under light load proposals go out at once.
const PIPELINE_DEPTH: u64 = 1;

/// Durability of acknowledged writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// fdatasync the raft log before acknowledging an append to the
    /// leader or applying.
    Always,
    /// No fsync on the write path; the raft log is synced in the background
    /// (`DriverConfig::wal_sync_interval`). A power cut on a majority can
    /// lose acknowledged writes.
    Interval,
}

#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub id: NodeId,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub sync: SyncMode,
    /// Compact the log once it holds this many applied entries.
    pub snapshot_entries: u64,
    /// Applied entries kept after compaction, so slightly lagging followers
    /// catch up from the log rather than by snapshot.
    pub compact_keep: u64,
    /// How often the state machine is made durable (see `checkpoint`).
    pub checkpoint_interval: Duration,
    /// With `SyncMode::Interval`, how often the raft log is synced.
    pub wal_sync_interval: Duration,
    /// How long a client message id deduplicates retries (see
    /// `state_machine::Applier`). Every replica must use the same value.
    pub dedup_window: Duration,
}

type ProposeReply = oneshot::Sender<Result<OpResults, StoreError>>;
/// A log entry's (term, index).
type EntryId = (u64, u64);
type ReadReply = oneshot::Sender<Result<(), StoreError>>;
type MembershipReply = oneshot::Sender<Result<Vec<ReplicaView>, StoreError>>;

pub(crate) struct Driver {
    cfg: DriverConfig,
    raw: RawNode<LogStore>,
    log: LogStore,
    /// The state machine's engine.
    state: Arc<dyn Engine>,
    /// Writes Readies to the WAL off this thread.
    writer: LogWriter,
    clock: Clock,
    /// Applied index the state engine has made durable; the log is never
    /// compacted past it.
    durable: Durable,
    transport: Box<dyn Network>,
    requests: mpsc::Receiver<Request>,
    inbox: mpsc::Receiver<Message>,
    events: mpsc::Receiver<TransportEvent>,
    status: watch::Sender<NodeStatus>,
    /// Proposals queued during this iteration (proposed together).
    queued: Vec<(Vec<Op>, ProposeReply)>,
    /// Proposed entries awaiting apply, by the (term, index) raft gave
    /// them: (op count, reply). An entry is identified by its term and
    /// index alone (log matching), across restarts and clock steps.
    waiters: HashMap<EntryId, Vec<(usize, ProposeReply)>>,
    membership_waiters: HashMap<EntryId, MembershipReply>,
    /// Reads waiting for a ReadIndex to be issued.
    queued_reads: Vec<ReadReply>,
    /// Issued ReadIndex requests, by context.
    read_batches: HashMap<u64, Vec<ReadReply>>,
    /// Confirmed read indexes waiting for apply to reach them.
    confirmed_reads: VecDeque<(u64, Vec<ReadReply>)>,
    next_read: u64,
    applied: u64,
    /// Commit index at start, raised to the one a leader shows when this
    /// replica finds it lost entries: it is caught up (serves stale reads,
    /// and SERVING with a leader) once applied reaches it.
    start_commit: u64,
    was_leader: bool,
    stats: DriverStats,
    heads: Heads,
    /// Whether this replica's data directory was new and it has not yet
    /// caught up with the first leader that reached it: until then it
    /// votes only in a group's first election and serves no reads (its
    /// state may be empty for want of data, not for want of messages).
    freshness: Freshness,
    /// Sent with the rejection that tells a leader this replica lost
    /// entries, so the leader acts on each loss once: a delayed duplicate
    /// of that rejection must not reset the replica's progress again.
    incarnation: u64,
    /// As leader: the incarnation whose lost log was last handled, by
    /// replica.
    lost_logs: HashMap<u64, u64>,
    /// While not caught up since the data directory was created: the end
    /// of each replica's log (last term, last index) as it has shown it this
    /// run of the replica, in its vote requests (a leader shows that it has
    /// entries of its term, how many is not known). See
    /// `may_vote_while_fresh`.
    shown_logs: HashMap<u64, (u64, u64)>,
    /// Likewise, the highest term each replica has shown this run (a
    /// delayed message does not lower it). See `may_vote_while_fresh`.
    shown_terms: HashMap<u64, u64>,
    known_bug: Option<KnownBug>,
    /// Last time a snapshot was being built or sent.
    snapshot_needed: Instant,
    /// Committed entries a follower has not applied yet, and when it will.
    pending_apply: Vec<Entry>,
    apply_due: Option<Instant>,
}

/// Everything outside the replica's logic that the driver talks to: the
/// network, the log writer, the clock, and the randomness it needs. The
/// replica's runtime (`replica.rs`) gives it real ones; the simulator
/// (`sim`) gives it queues it delivers itself, a writer that writes when
/// told, a virtual clock and numbers drawn from its seed.
pub(crate) struct DriverIo {
    pub net: Box<dyn Network>,
    pub writer: LogWriter,
    pub clock: Clock,
    /// Tells this run of the replica from earlier ones (see `incarnation`).
    pub incarnation: u64,
    /// A fixed election timeout in ticks, instead of raft-rs drawing one
    /// (from the thread's RNG) between `election_ticks` and twice that
    /// after every election; the simulator draws it from its seed.
    pub election_timeout: Option<usize>,
    /// A bug this driver once had, put back: only the simulator's tests
    /// set one, to show that the simulator finds it.
    pub known_bug: Option<KnownBug>,
}

/// Bugs the replica logic once had, which the simulator's tests put back
/// (`sim::SimOptions::known_bug`) to show that its checkers find them.
/// Production never sets one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnownBug {
    /// A replica whose data directory was new counted itself caught up
    /// (voted, served) on the first message of any leader, before it had
    /// applied what that leader had committed: its vote could then elect a
    /// candidate missing an acknowledged append.
    EarlyVote,
    /// A replica whose data directory was new voted, until it caught up,
    /// for any candidate with no history (as in a group's creation): with
    /// its lost copy of the group's first entries, such a candidate could
    /// win without them.
    BootstrapVote,
    /// A leader acted on every rejection showing that a replica lost its
    /// log, delayed duplicates included, each time setting the replica's
    /// progress back to what it held then.
    StaleLostLog,
    /// A replica whose data directory was new voted, until it caught up, in
    /// a term the other voters had already reached: it may have voted in
    /// that term before it lost its disk, for another candidate.
    RevoteAfterWipe,
}

/// A follower applies committed entries in batches gathered over this long
/// (or of `FOLLOWER_APPLY_ENTRIES`): only its reads wait for its apply, and
/// every state batch costs sled a fixed amount. The leader applies at once:
/// its acknowledgements wait for it.
const FOLLOWER_APPLY_DELAY: Duration = Duration::from_millis(20);
const FOLLOWER_APPLY_ENTRIES: usize = 1024;

/// A step of the replica (one turn of the driver's loop, a log write, a
/// checkpoint) that takes this long is logged as a warning: heartbeats wait
/// behind it, and a few of them cost an election.
pub(crate) const SLOW: Duration = Duration::from_millis(200);

/// How long a built snapshot is kept after no follower needs it, so that an
/// interrupted transfer resumes rather than starting over with a new build.
const SNAPSHOT_KEPT: Duration = Duration::from_secs(60);

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: DriverConfig,
        log: LogStore,
        durable: Durable,
        io: DriverIo,
        requests: mpsc::Receiver<Request>,
        inbox: mpsc::Receiver<Message>,
        events: mpsc::Receiver<TransportEvent>,
        status: watch::Sender<NodeStatus>,
    ) -> Result<Self, StoreError> {
        let (applied, _) = log.applied()?;
        let raft_cfg = raft::Config {
            id: cfg.id.0,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            min_election_tick: io.election_timeout.unwrap_or(0),
            max_election_tick: io.election_timeout.map_or(0, |t| t + 1),
            ..Default::default()
        };
        raft_cfg
            .validate()
            .map_err(|e| StoreError::InvalidArgument(format!("raft config: {e}")))?;
        let logger = crate::logging::raft_logger(cfg.id);
        let raw = RawNode::new(&raft_cfg, log.clone(), &logger).map_err(crate::error::from_raft)?;
        let start_commit = log.hard_state().commit;
        let freshness = log.freshness()?;
        let state = log.state().clone();
        let snapshot_needed = io.clock.now();
        Ok(Self {
            writer: io.writer,
            clock: io.clock,
            transport: io.net,
            cfg,
            raw,
            log,
            state,
            durable,
            requests,
            inbox,
            events,
            status,
            queued: Vec::new(),
            waiters: HashMap::new(),
            membership_waiters: HashMap::new(),
            queued_reads: Vec::new(),
            read_batches: HashMap::new(),
            confirmed_reads: VecDeque::new(),
            next_read: 1,
            applied,
            start_commit,
            was_leader: false,
            stats: DriverStats::default(),
            heads: Heads::default(),
            freshness,
            incarnation: io.incarnation,
            lost_logs: HashMap::new(),
            shown_logs: HashMap::new(),
            shown_terms: HashMap::new(),
            known_bug: io.known_bug,
            snapshot_needed,
            pending_apply: Vec::new(),
            apply_due: None,
        })
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn leader_hint(&self) -> Option<(NodeId, String)> {
        let lead = self.raw.raft.leader_id;
        if lead == 0 {
            return None;
        }
        let id = NodeId(lead);
        Some((id, self.transport.addresses().get(id)?))
    }

    fn not_leader(&self) -> StoreError {
        StoreError::NotLeader {
            leader: self.leader_hint(),
        }
    }

    /// Runs until `shutdown` fires or storage fails. With `crash` fired
    /// too, stops as a crash would: without syncing anything.
    pub(crate) async fn run(
        mut self,
        shutdown: CancellationToken,
        crash: CancellationToken,
    ) -> Result<(), StoreError> {
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let persisted = self.writer.wake();
        let mut last_tick = Instant::now();
        let result = loop {
            let apply_due = self.apply_due.map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = persisted.notified() => {}
                _ = tick.tick() => {
                    let gap = last_tick.elapsed();
                    last_tick = Instant::now();
                    if gap >= self.cfg.tick + SLOW {
                        warn!(
                            replica = %self.cfg.id,
                            gap_ms = gap.as_millis() as u64,
                            "raft ticks were late (the replica's thread did not run)"
                        );
                    }
                    self.tick();
                }
                _ = sleep_until_some(apply_due), if apply_due.is_some() => {
                    if let Err(e) = self.apply_pending() {
                        error!(replica = %self.cfg.id, error = %e, "storage failed; stopping the replica");
                        break Err(e);
                    }
                }
                Some(m) = self.inbox.recv() => self.step(m),
                Some(r) = self.requests.recv() => self.accept(r),
                Some(e) = self.events.recv() => self.on_transport_event(e),
            }
            let turn = Instant::now();
            if let Err(e) = self.turn() {
                break Err(e);
            }
            let took = turn.elapsed();
            if took >= SLOW {
                warn!(
                    replica = %self.cfg.id,
                    took_ms = took.as_millis() as u64,
                    "a turn of the raft loop was slow (heartbeats waited)"
                );
            }
        };
        self.stop(!crash.is_cancelled(), result.is_ok());
        result
    }

    /// One raft tick.
    pub(crate) fn tick(&mut self) {
        self.raw.tick();
    }

    /// The rest of a turn of the loop, after its first input: takes every
    /// other input already queued and the writer's reports, turns queued
    /// proposals into entries, handles the Readies and publishes the
    /// status. The simulator calls it after each input it delivers.
    pub(crate) fn turn(&mut self) -> Result<(), StoreError> {
        for _ in 0..DRAIN_LIMIT {
            match self.inbox.try_recv() {
                Ok(m) => self.step(m),
                Err(_) => break,
            }
        }
        for _ in 0..DRAIN_LIMIT {
            match self.requests.try_recv() {
                Ok(r) => self.accept(r),
                Err(_) => break,
            }
        }
        while let Ok(e) = self.events.try_recv() {
            self.on_transport_event(e);
        }
        if let Err(e) = self.take_persisted() {
            error!(replica = %self.cfg.id, error = %e, "raft log write failed; stopping the replica");
            return Err(e);
        }
        self.propose_queued();
        self.issue_reads();
        if let Err(e) = self.on_ready() {
            error!(replica = %self.cfg.id, error = %e, "storage failed; stopping the replica");
            return Err(e);
        }
        self.publish_status();
        Ok(())
    }

    /// The raft node, for the simulator's checkers.
    pub(crate) fn raw(&self) -> &RawNode<LogStore> {
        &self.raw
    }

    /// What the simulator prints of a replica that made no progress.
    pub(crate) fn describe(&self) -> String {
        let mut shown: Vec<_> = self.shown_logs.iter().collect();
        shown.sort();
        format!(
            "term {} lead {} {:?} voters {:?} shown {:?}",
            self.raw.raft.term,
            self.raw.raft.leader_id,
            self.freshness,
            self.voters(),
            shown
        )
    }

    /// The voters as this replica knows them, in order.
    pub(crate) fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    /// Stops as a crash does: what the writer had not written is lost,
    /// nothing is synced, nobody is answered.
    pub(crate) fn crash(mut self) {
        self.writer.discard();
        self.transport.shutdown();
    }

    /// Simulator: writes up to `max` queued Readies (see
    /// `LogWriter::complete`); the next turn takes the report.
    pub(crate) fn complete_writes(&mut self, max: usize) -> usize {
        self.writer.complete(max)
    }

    /// Simulator: Readies waiting for the disk.
    pub(crate) fn writes_queued(&self) -> usize {
        self.writer.queued()
    }

    /// When a follower's gathered entries are due to be applied
    /// (`apply_pending`).
    pub(crate) fn apply_due(&self) -> Option<Instant> {
        self.apply_due
    }

    /// Stops: fails what waits, lets the writer finish, and with
    /// `graceful` syncs the log and checkpoints the state (a crash does
    /// neither), having applied what a follower gathered if storage is
    /// `healthy`.
    pub(crate) fn stop(&mut self, graceful: bool, healthy: bool) {
        self.fail_all(StoreError::ShuttingDown);
        self.writer.stop();
        if graceful {
            // A follower stopped gracefully applies what it has gathered,
            // so its state (and an offline backup of its directory) holds
            // every entry it had taken as committed.
            if healthy && let Err(e) = self.apply_pending() {
                warn!(error = %e, "applying gathered entries at stop failed");
            }
            if let Err(e) = self.log.sync() {
                warn!(error = %e, "final raft log sync failed");
            }
            if let Err(e) = crate::checkpoint::checkpoint(&self.log, &self.durable) {
                warn!(error = %e, "final state checkpoint failed");
            }
        }
        self.status.send_modify(|s| {
            s.stopped = true;
            s.serving = false;
            s.caught_up = false;
        });
        self.transport.shutdown();
    }

    /// Why raft-rs must not see `m`, if it must not: a sender that is not
    /// in the group (once this replica knows the group), or an append whose
    /// entries do not follow its index in order and term (raft-rs stops
    /// the process on some of those, for example one that rewrites
    /// committed entries).
    ///
    /// A replica's view of the group can be out of date: a new data
    /// directory knows only the initial voters, and a replica that was cut
    /// off while a replacement joined and took the lead does not know that
    /// leader. Such a replica refusing the leader stays behind for good
    /// (both found by the simulator). So from a sender it does not know it
    /// refuses vote requests always, and anything else only while it
    /// follows a leader of its own: when it is new, has no leader, or the
    /// sender is the leader it follows, the message goes to raft, whose
    /// terms and log matching decide. (A stranger's heartbeat must still
    /// not move the term of a replica that follows a live leader.)
    fn refusal(&self, m: &Message) -> Option<String> {
        let prs = self.raw.raft.prs();
        let vote = matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        let lead = self.raw.raft.leader_id;
        let may_be_stale = self.freshness != Freshness::Settled || lead == 0 || lead == m.from;
        if (vote || !may_be_stale) && prs.iter().next().is_some() && prs.get(m.from).is_none() {
            return Some(format!("replica {} is not a member of the group", m.from));
        }
        if m.get_msg_type() == MessageType::MsgAppend {
            let mut term = m.log_term;
            for (i, e) in m.entries.iter().enumerate() {
                if e.index != m.index + 1 + i as u64 || e.term < term || e.term > m.term {
                    return Some(format!(
                        "append from replica {} has entry {}/{} out of order after {}/{}",
                        m.from, e.index, e.term, m.index, m.log_term
                    ));
                }
                term = e.term;
            }
        }
        None
    }

    fn step(&mut self, mut m: Message) {
        if let Some(why) = self.refusal(&m) {
            self.stats.refused_messages += 1;
            if self.stats.refused_messages.is_power_of_two() {
                warn!(replica = %self.cfg.id, refused = self.stats.refused_messages, "raft message refused: {why}");
            }
            return;
        }
        let kind = m.get_msg_type();
        if self.known_bug == Some(KnownBug::EarlyVote)
            && self.freshness != Freshness::Settled
            && m.term >= self.raw.raft.term
            && matches!(
                kind,
                MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
            )
        {
            self.settle();
        }
        if self.freshness == Freshness::AwaitingLeader && m.term >= self.raw.raft.term {
            // The first leader's log to reach a fresh replica shows how far
            // the group had committed: the replica settles (votes, serves)
            // once it has applied that far. A heartbeat's commit index is
            // capped by what the leader thinks we hold, so it does not count.
            let shown = match kind {
                MessageType::MsgAppend => Some(m.commit),
                MessageType::MsgSnapshot => Some(m.get_snapshot().get_metadata().index),
                _ => None,
            };
            if let Some(commit) = shown {
                debug!(replica = %self.cfg.id, commit, "fresh replica catching up");
                self.freshness = Freshness::CatchingUp(commit);
                self.start_commit = self.start_commit.max(commit);
                if let Err(e) = self.log.set_catch_up_target(commit) {
                    warn!(error = %e, "cannot record the commit index to catch up with");
                }
            }
        }
        if self.freshness != Freshness::Settled {
            // A pre-vote asks for the term after the sender's own.
            let term = match kind {
                MessageType::MsgRequestPreVote => m.term.saturating_sub(1),
                _ => m.term,
            };
            match kind {
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => {
                    self.shown_logs.insert(m.from, (m.log_term, m.index));
                }
                MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot => {
                    self.shown_logs.insert(m.from, (m.term, u64::MAX));
                }
                _ => {}
            }
            if matches!(
                kind,
                MessageType::MsgRequestVote
                    | MessageType::MsgRequestPreVote
                    | MessageType::MsgAppend
                    | MessageType::MsgHeartbeat
                    | MessageType::MsgSnapshot
            ) {
                let shown = self.shown_terms.entry(m.from).or_default();
                *shown = (*shown).max(term);
            }
        }
        match kind {
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                if self.freshness != Freshness::Settled && !self.may_vote_while_fresh(&m) =>
            {
                debug!(replica = %self.cfg.id, candidate = m.from, "fresh replica withholds its vote");
                return;
            }
            // A leader never sends a commit index beyond what this replica
            // acknowledged; one that does means our data directory was
            // wiped. raft-rs would panic on it; ignore it (our suffix may
            // not match the leader's), and the leader repairs us (below)
            // when our reply shows the loss.
            //
            // Nor does it wait for the next write to find out: it stops
            // counting itself caught up (no SERVING, no stale reads) until it
            // has applied that commit index, and answers with a rejection
            // that shows the leader what it really has.
            MessageType::MsgHeartbeat => {
                let last = self.raw.raft.raft_log.last_index();
                if m.commit > last {
                    debug!(replica = %self.cfg.id, commit = m.commit, last, "leader believes we hold entries we lost");
                    if self.applied >= self.start_commit {
                        warn!(replica = %self.cfg.id, commit = m.commit, last, "entries this replica acknowledged are gone; not serving until it has caught up");
                    }
                    self.start_commit = self.start_commit.max(m.commit);
                    let mut reject = Message::default();
                    reject.set_msg_type(MessageType::MsgAppendResponse);
                    reject.to = m.from;
                    reject.from = self.cfg.id.0;
                    reject.term = self.raw.raft.term.max(m.term);
                    reject.index = m.commit;
                    reject.reject = true;
                    reject.reject_hint = last;
                    reject.context = self.incarnation.to_be_bytes().to_vec().into();
                    self.transport.send(vec![reject]);
                    m.commit = self.raw.raft.raft_log.committed;
                }
            }
            // The rejection above, below what the replica once acknowledged,
            // means it lost its log. raft-rs would treat it as stale
            // forever; probe the replica again from what it really has,
            // which ends in a snapshot once the log is compacted. Each loss
            // (incarnation) is handled once: a delayed duplicate would
            // throw away the progress made since.
            MessageType::MsgAppendResponse
                if m.reject
                    && self.is_leader()
                    && m.term == self.raw.raft.term
                    && m.context.len() == 8 =>
            {
                let incarnation = u64::from_be_bytes(m.context[..].try_into().expect("8 bytes"));
                let from = m.from;
                let handled = self.lost_logs.get(&from) == Some(&incarnation)
                    && self.known_bug != Some(KnownBug::StaleLostLog);
                if let Some(pr) = self.raw.raft.mut_prs().get_mut(from)
                    && m.reject_hint < pr.matched
                {
                    if handled {
                        debug!(replica = from, "stale lost-log rejection ignored");
                        return;
                    }
                    warn!(
                        replica = from,
                        had = pr.matched,
                        has = m.reject_hint,
                        "replica lost its log; resending from what it has"
                    );
                    pr.matched = m.reject_hint;
                    pr.become_probe();
                    pr.next_idx = m.reject_hint + 1;
                    self.lost_logs.insert(from, incarnation);
                    self.stats.lost_logs_repaired += 1;
                    self.raw.raft.send_append(from);
                }
                // Not a rejection raft-rs could act on (its index is a
                // commit index, not a probe's).
                return;
            }
            _ => {}
        }
        if let Err(e) = self.raw.step(m) {
            debug!(error = %e, "dropped raft message");
        }
    }

    /// A replica whose data directory is new knows nothing the group has
    /// committed. Were it a voter that lost its disk, its vote could elect a
    /// candidate missing acknowledged entries. So until it has caught up
    /// with a leader it votes only for a candidate whose log is at least as
    /// up to date as that of every other voter, each shown to it this run
    /// (raft's own rule, applied to all the others instead of itself): an
    /// entry committed on a majority that included this replica's lost
    /// copy is on another replica of that majority, which shows it.
    ///
    /// The simulator found the rule this replaces (vote for any candidate
    /// with no history, as in a group's creation) losing a group's first
    /// entry: committed by this replica and one other, then this replica's
    /// disk wiped, and the third, which had been down, elected with its
    /// vote. The price: a new group elects its first leader once every
    /// initial replica has started, and a replica that lost its disk waits
    /// for every other voter to be heard (one that joined an existing group
    /// and lost its disk does not vote until it has caught up).
    ///
    /// Nor does it vote in a term any other voter has shown it: the replica
    /// may have voted in that term before it lost its disk (the simulator
    /// found one that won a term, lost its disk a moment later, and then
    /// elected a second leader of that term with its vote). Whoever it voted
    /// for had reached that term before the vote, and what a replica sends
    /// arrives in order on one stream that dies with the process it was sent
    /// to, so everything it shows this run shows that term or a later one.
    fn may_vote_while_fresh(&self, m: &Message) -> bool {
        if self.known_bug == Some(KnownBug::BootstrapVote) {
            return m.index <= crate::log_store::BOOTSTRAP_INDEX;
        }
        // A replica that joined an existing group starts knowing no voters
        // (it learns them from the leader's snapshot): it cannot know whom
        // to hear from, and does not vote.
        let voters = self.raw.raft.prs().conf().voters();
        if !voters.contains(self.cfg.id.0) {
            return false;
        }
        let candidate = (m.log_term, m.index);
        let reused_terms = self.known_bug == Some(KnownBug::RevoteAfterWipe);
        voters.ids().iter().all(|v| {
            v == self.cfg.id.0
                || v == m.from
                || (self
                    .shown_logs
                    .get(&v)
                    .is_some_and(|&shown| candidate >= shown)
                    && (reused_terms || self.shown_terms.get(&v).is_some_and(|&t| m.term > t)))
        })
    }

    /// The replica holds what the group had committed when a leader first
    /// reached it (or it was elected, which needs no less): it votes and
    /// serves from now on.
    fn settle(&mut self) {
        if self.freshness == Freshness::Settled {
            return;
        }
        info!(replica = %self.cfg.id, applied = self.applied, "caught up with the group since the data directory was created");
        self.freshness = Freshness::Settled;
        if let Err(e) = self.log.clear_fresh() {
            warn!(error = %e, "cannot record that the replica caught up");
        }
    }

    fn on_transport_event(&mut self, e: TransportEvent) {
        match e {
            TransportEvent::Unreachable(id) => self.raw.report_unreachable(id.0),
            TransportEvent::Snapshot(id, true) => {
                self.raw.report_snapshot(id.0, SnapshotStatus::Finish)
            }
            TransportEvent::Snapshot(id, false) => {
                self.raw.report_snapshot(id.0, SnapshotStatus::Failure)
            }
        }
    }

    fn accept(&mut self, r: Request) {
        match r {
            Request::Propose { ops, reply } => self.queued.push((ops, reply)),
            Request::Read { reply } => self.queued_reads.push(reply),
            Request::Membership { change, reply } => self.propose_membership(change, reply),
            Request::TransferLeader { target, reply } => {
                let _ = reply.send(self.transfer_leader(target));
            }
            Request::Status { reply } => {
                let _ = reply.send(self.report());
            }
            Request::Snapshot { min_index, reply } => {
                let _ = reply.send(self.snapshot_file(min_index));
            }
        }
    }

    /// A built snapshot at `min_index` or later, or starts a build at the
    /// applied index (here, between applies, as raft's own requests do).
    fn snapshot_file(&self, min_index: u64) -> Result<Option<SnapshotFile>, StoreError> {
        let Some(snap) = self.log.snapshot_at(min_index, None)? else {
            return Ok(None);
        };
        let descriptor = crate::snapshot::Descriptor::decode(&snap.data)?;
        Ok(Some(SnapshotFile {
            descriptor,
            voters: snap
                .get_metadata()
                .get_conf_state()
                .voters
                .iter()
                .map(|&v| NodeId(v))
                .collect(),
            path: self.log.snapshots().outgoing(&descriptor),
        }))
    }

    /// Term and index of the entry the leader appended last (right after
    /// a successful propose: that proposal's).
    fn last_appended(&self) -> EntryId {
        (self.raw.raft.term, self.raw.raft.raft_log.last_index())
    }

    /// Turns queued proposals into entries of at most `MAX_ENTRY_BYTES`.
    fn propose_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        if self.is_leader() {
            let log = &self.raw.raft.raft_log;
            let inflight = log.last_index().saturating_sub(log.committed);
            let bytes: usize = self
                .queued
                .iter()
                .flat_map(|(ops, _)| ops.iter())
                .map(op_size)
                .sum();
            if inflight >= PIPELINE_DEPTH && bytes < MAX_ENTRY_BYTES {
                return;
            }
        }
        let queued = std::mem::take(&mut self.queued);
        if !self.is_leader() {
            let err = self.not_leader();
            for (_, reply) in queued {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let ts = self.clock.wall_ms();
        let mut ops: Vec<Op> = Vec::new();
        let mut replies: Vec<(usize, ProposeReply)> = Vec::new();
        let mut bytes = 0usize;
        for (batch, reply) in queued {
            let size: usize = batch.iter().map(op_size).sum();
            if !ops.is_empty() && bytes + size > MAX_ENTRY_BYTES {
                self.propose_entry(ts, std::mem::take(&mut ops), std::mem::take(&mut replies));
                bytes = 0;
            }
            bytes += size;
            replies.push((batch.len(), reply));
            ops.extend(batch);
        }
        if !replies.is_empty() {
            self.propose_entry(ts, ops, replies);
        }
    }

    fn propose_entry(&mut self, ts: i64, ops: Vec<Op>, replies: Vec<(usize, ProposeReply)>) {
        let data = codec::encode_proposal(0, ts, &ops);
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => {
                self.stats.proposed_entries += 1;
                self.stats.proposed_ops += ops.len() as u64;
                let at = self.last_appended();
                self.waiters.insert(at, replies);
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped => self.not_leader(),
                    other => crate::error::from_raft(other),
                };
                for (_, reply) in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn issue_reads(&mut self) {
        if self.queued_reads.is_empty() {
            return;
        }
        if !self.is_leader() {
            let err = self.not_leader();
            for reply in self.queued_reads.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        // A new leader can confirm reads only once it has committed an
        // entry of its own term; until then the reads stay queued.
        let log = &self.raw.raft.raft_log;
        if log.term(log.committed).unwrap_or(0) != self.raw.raft.term {
            return;
        }
        let ctx = self.next_read;
        self.next_read += 1;
        self.read_batches
            .insert(ctx, std::mem::take(&mut self.queued_reads));
        self.raw.read_index(ctx.to_be_bytes().to_vec());
    }

    fn propose_membership(&mut self, change: MembershipChange, reply: MembershipReply) {
        let result = self.membership_entry(&change);
        match result {
            Ok(Some(id)) => {
                self.membership_waiters.insert(id, reply);
            }
            Ok(None) => {
                let _ = reply.send(Ok(self.replicas()));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Validates and proposes a membership change; `None` when there is
    /// nothing to do (the change is already in effect).
    fn membership_entry(
        &mut self,
        change: &MembershipChange,
    ) -> Result<Option<EntryId>, StoreError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.raw.raft.has_pending_conf() {
            return Err(StoreError::FailedPrecondition(
                "another membership change is still in progress".into(),
            ));
        }
        let cs = self.log.conf_state();
        let is_voter = |id: NodeId| cs.voters.contains(&id.0);
        let is_learner = |id: NodeId| cs.learners.contains(&id.0);
        let (kind, id, address) = match change {
            MembershipChange::AddLearner { id, address } => {
                if id.0 == 0 {
                    return Err(StoreError::InvalidArgument(
                        "replica id 0 is reserved".into(),
                    ));
                }
                if is_voter(*id) {
                    return Err(StoreError::AlreadyExists(format!(
                        "replica {id} is already a voter"
                    )));
                }
                if is_learner(*id) {
                    return Ok(None);
                }
                (ConfChangeType::AddLearnerNode, *id, address.clone())
            }
            MembershipChange::Promote { id } => {
                if is_voter(*id) {
                    return Ok(None);
                }
                if !is_learner(*id) {
                    return Err(StoreError::NotFound(format!(
                        "replica {id} is not a member of the group"
                    )));
                }
                (ConfChangeType::AddNode, *id, String::new())
            }
            MembershipChange::Remove { id } => {
                if !is_voter(*id) && !is_learner(*id) {
                    return Err(StoreError::NotFound(format!(
                        "replica {id} is not a member of the group"
                    )));
                }
                if is_voter(*id) && cs.voters.len() == 1 {
                    return Err(StoreError::FailedPrecondition(
                        "cannot remove the last voter".into(),
                    ));
                }
                if *id == self.cfg.id {
                    return Err(StoreError::FailedPrecondition(format!(
                        "replica {id} is the leader; transfer leadership first (chatctl store transfer-leader)"
                    )));
                }
                (ConfChangeType::RemoveNode, *id, String::new())
            }
        };
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id.0;
        let ctx = codec::encode_replica_context(id.0, &address);
        self.raw
            .propose_conf_change(ctx, cc)
            .map_err(crate::error::from_raft)?;
        Ok(Some(self.last_appended()))
    }

    fn transfer_leader(&mut self, target: Option<NodeId>) -> Result<NodeId, StoreError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let me = self.cfg.id.0;
        let voters = self.log.conf_state().voters;
        let target = match target {
            Some(t) if t.0 == me => return Ok(t),
            Some(t) if !voters.contains(&t.0) => {
                return Err(StoreError::NotFound(format!("replica {t} is not a voter")));
            }
            Some(t) => t.0,
            None => {
                let prs = self.raw.raft.prs();
                voters
                    .iter()
                    .filter(|&&v| v != me)
                    .max_by_key(|&&v| prs.get(v).map_or(0, |p| p.matched))
                    .copied()
                    .ok_or_else(|| {
                        StoreError::FailedPrecondition("no other voter to transfer to".into())
                    })?
            }
        };
        info!(replica = me, target, "transferring leadership");
        self.raw.transfer_leader(target);
        Ok(NodeId(target))
    }

    /// Handles Readies until raft has none (a Ready handled may make the
    /// next one: persisting lets a leader commit, applying frees reads).
    fn on_ready(&mut self) -> Result<(), StoreError> {
        for _ in 0..READY_ROUNDS {
            if !self.raw.has_ready() {
                break;
            }
            self.handle_ready()?;
        }
        Ok(())
    }

    fn handle_ready(&mut self) -> Result<(), StoreError> {
        let mut ready = self.raw.ready();
        self.stats.readies += 1;
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        let mut must_sync = ready.must_sync() && self.cfg.sync == SyncMode::Always;
        // Term and vote are synced in every mode: granting a vote, losing it
        // in a crash and granting another in the same term could elect two
        // leaders. They change rarely, so this costs nothing.
        if let Some(hs) = ready.hs() {
            let before = self.log.hard_state();
            must_sync |= hs.term != before.term || hs.vote != before.vote;
        }
        let snapshot = !ready.snapshot().is_empty();
        if snapshot {
            // The snapshot replaces the log: every write queued before it
            // must land first, or it would land on the new log.
            self.drain_writer()?;
            // Entries committed before it are applied first: after it they
            // would land on the new state.
            self.apply_pending()?;
            let snap = ready.snapshot().clone();
            self.install_snapshot(&snap)?;
            must_sync = true;
        }
        self.queue_apply(ready.take_committed_entries())?;
        for rs in ready.take_read_states() {
            let ctx = rs
                .request_ctx
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some(waiters) = self.read_batches.remove(&ctx) {
                self.confirmed_reads.push_back((rs.index, waiters));
            }
        }
        let number = ready.number();
        let entries = ready.take_entries();
        let hs = ready.hs().cloned();
        let mut messages = ready.take_persisted_messages();
        // raft-rs holds all of a follower's messages until its Ready is
        // durable. A heartbeat response depends on nothing being written
        // (it says "alive, and still in your term"; etcd's raft sends it at
        // once too): held behind a stalled disk, it would make the leader
        // step down for want of a quorum although every replica is up.
        let alive: Vec<Message> = messages
            .extract_if(.., |m| {
                m.get_msg_type() == MessageType::MsgHeartbeatResponse
            })
            .collect();
        if !alive.is_empty() {
            self.transport.send(alive);
        }
        // raft reads the entries from storage from here on; the WAL write
        // follows on the writer thread (see writer.rs).
        self.log.stage(&entries, hs.as_ref());
        self.raw.advance_append_async(ready);
        let idle = self.writer.in_flight() == 0;
        let mut here = Persisted {
            number,
            messages,
            syncs: 0,
            sync_micros: 0,
            tasks: 0,
        };
        if snapshot {
            // Written here, so raft counts the snapshot persisted before
            // anything is applied past it (the writer is idle: drained).
            let t = std::time::Instant::now();
            self.log.write(&entries, hs.as_ref(), true)?;
            here.syncs = 1;
            here.sync_micros = t.elapsed().as_micros() as u64;
            self.on_persisted(here);
        } else if entries.is_empty() && hs.is_none() && !must_sync && idle {
            // Nothing to write and nothing being written: what waits for
            // persistence may go now.
            self.on_persisted(here);
        } else {
            self.writer.submit(WriteTask {
                number,
                entries,
                hs,
                sync: must_sync,
                messages: here.messages,
            })?;
        }
        self.raw.advance_apply_to(self.applied);
        self.log.note_applied(self.applied);
        self.release_reads();
        self.maybe_compact()?;
        Ok(())
    }

    /// Applies committed entries: at once on the leader, in batches on a
    /// follower (see `FOLLOWER_APPLY_DELAY`).
    fn queue_apply(&mut self, committed: Vec<Entry>) -> Result<(), StoreError> {
        if committed.is_empty() && self.pending_apply.is_empty() {
            return Ok(());
        }
        if self.pending_apply.is_empty() {
            self.apply_due = Some(self.clock.now() + FOLLOWER_APPLY_DELAY);
        }
        self.pending_apply.extend(committed);
        if self.is_leader()
            || self.pending_apply.len() >= FOLLOWER_APPLY_ENTRIES
            || self.apply_due.is_some_and(|due| due <= self.clock.now())
        {
            self.apply_gathered()?;
        }
        Ok(())
    }

    /// Applies every gathered entry.
    fn apply_gathered(&mut self) -> Result<(), StoreError> {
        self.apply_due = None;
        let entries = std::mem::take(&mut self.pending_apply);
        self.apply(entries)
    }

    /// Applies what a follower has gathered, outside a Ready.
    pub(crate) fn apply_pending(&mut self) -> Result<(), StoreError> {
        if self.pending_apply.is_empty() {
            self.apply_due = None;
            return Ok(());
        }
        self.apply_gathered()?;
        self.raw.advance_apply_to(self.applied);
        self.log.note_applied(self.applied);
        self.release_reads();
        Ok(())
    }

    /// Takes the writer's reports: sends what waited for persistence and
    /// tells raft what is durable here.
    fn take_persisted(&mut self) -> Result<(), StoreError> {
        while let Some(report) = self.writer.try_done() {
            self.on_persisted(report?);
        }
        Ok(())
    }

    fn on_persisted(&mut self, p: Persisted) {
        self.stats.syncs += p.syncs;
        self.stats.sync_micros += p.sync_micros;
        self.transport.send(p.messages);
        self.raw.on_persist_ready(p.number);
    }

    /// Waits until every queued write is durable.
    fn drain_writer(&mut self) -> Result<(), StoreError> {
        while self.writer.in_flight() > 0 {
            let p = self.writer.wait_done()?;
            self.on_persisted(p);
        }
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        info!(replica = %self.cfg.id, index = meta.index, term = meta.term, "installing snapshot");
        self.log.install_snapshot(snap)?;
        self.heads.clear();
        self.applied = meta.index;
        let reader = crate::state_machine::Reader::new(self.state.clone());
        for (id, addr) in reader.replica_addresses()? {
            self.transport.set_peer(NodeId(id), addr);
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        self.stats.applied_entries += entries.len() as u64;
        let (last_index, last_term) = (last.index, last.term);
        let state = self.state.clone();
        let window_ms = self.cfg.dedup_window.as_millis() as i64;
        let mut applier = Applier::new(state.as_ref(), &mut self.heads, window_ms);
        let mut replies: Vec<(ProposeReply, OpResults)> = Vec::new();
        let mut membership_replies: Vec<MembershipReply> = Vec::new();
        let mut new_conf: Option<ConfState> = None;
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        continue;
                    }
                    let p = codec::decode_proposal(&e.data)?;
                    let mut outcomes = Vec::with_capacity(p.ops.len());
                    for op in &p.ops {
                        let outcome = applier.apply(op, p.ts_ms);
                        if let Err(StoreError::Storage(msg)) = &outcome {
                            return Err(StoreError::Storage(msg.clone()));
                        }
                        outcomes.push(outcome);
                    }
                    if let Some(waiting) = self.waiters.remove(&(e.term, e.index)) {
                        let mut rest = outcomes.into_iter();
                        for (n, reply) in waiting {
                            replies.push((reply, rest.by_ref().take(n).collect()));
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                        StoreError::Storage(format!("corrupt membership change: {err}"))
                    })?;
                    let cs = self
                        .raw
                        .apply_conf_change(&cc)
                        .map_err(crate::error::from_raft)?;
                    let (id, address) = codec::decode_replica_context(&e.context)?;
                    let id = NodeId(id);
                    match cc.get_change_type() {
                        ConfChangeType::AddLearnerNode | ConfChangeType::AddNode => {
                            if !address.is_empty() {
                                applier
                                    .batch_mut()
                                    .put(keys::replica_addr(id.0), address.clone().into_bytes());
                                self.transport.set_peer(id, address);
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            applier.batch_mut().delete(keys::replica_addr(id.0));
                            self.transport.remove_peer(id);
                        }
                    }
                    info!(replica = %self.cfg.id, change = ?cc.get_change_type(), target = %id, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                    self.log.stage_conf_state(applier.batch_mut(), &cs)?;
                    new_conf = Some(cs);
                    if let Some(reply) = self.membership_waiters.remove(&(e.term, e.index)) {
                        membership_replies.push(reply);
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(StoreError::Storage(
                        "unexpected joint-consensus entry in the log".into(),
                    ));
                }
            }
        }
        let mut batch = applier.finish()?;
        batch.put(keys::APPLIED, keys::encode_pair(last_index, last_term));
        // Not synced: the WAL holds these entries until a checkpoint
        // covers them.
        self.log.write_state(batch)?;
        self.applied = last_index;
        // Published before anyone is answered, so the status never lags an
        // acknowledgement.
        self.status.send_if_modified(|s| {
            let changed = s.applied != last_index;
            s.applied = last_index;
            changed
        });
        if let Some(cs) = new_conf {
            self.log.note_conf_state(cs);
        }
        for (reply, outcomes) in replies {
            let _ = reply.send(Ok(outcomes));
        }
        if !membership_replies.is_empty() {
            let replicas = self.replicas();
            for reply in membership_replies {
                let _ = reply.send(Ok(replicas.clone()));
            }
        }
        Ok(())
    }

    fn release_reads(&mut self) {
        while let Some((index, _)) = self.confirmed_reads.front() {
            if *index > self.applied {
                break;
            }
            let (_, waiters) = self.confirmed_reads.pop_front().expect("front exists");
            for reply in waiters {
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        // A snapshot being built or sent pins the log after it: the
        // follower goes on from the log. One no follower has needed for a
        // while is dropped (it is rebuilt when one does).
        let snapshots = self.log.snapshots().clone();
        let sending = self.is_leader()
            && self
                .raw
                .raft
                .prs()
                .iter()
                .any(|(_, p)| p.state == raft::ProgressState::Snapshot);
        let pinned = if sending || snapshots.building() {
            self.snapshot_needed = self.clock.now();
            snapshots.pinned()
        } else {
            if self
                .clock
                .now()
                .saturating_duration_since(self.snapshot_needed)
                > SNAPSHOT_KEPT
            {
                snapshots.release();
            }
            None
        };
        let truncated = self.log.truncated_index();
        if self.applied.saturating_sub(truncated) < self.cfg.snapshot_entries {
            return Ok(());
        }
        // Only below the durable checkpoint: entries above it may still be
        // needed to rebuild the state after a crash.
        let to = self
            .applied
            .saturating_sub(self.cfg.compact_keep)
            .min(self.durable.get())
            .min(pinned.unwrap_or(u64::MAX));
        if to > truncated {
            debug!(replica = %self.cfg.id, to, "compacting log");
            self.log.compact(to)?;
        }
        Ok(())
    }

    fn replicas(&self) -> Vec<ReplicaView> {
        let cs = self.log.conf_state();
        let prs = self.raw.raft.prs();
        let leader = self.is_leader();
        let view = |id: u64, voter: bool| ReplicaView {
            id: NodeId(id),
            address: self
                .transport
                .addresses()
                .get(NodeId(id))
                .unwrap_or_default(),
            voter,
            matched: if leader {
                prs.get(id).map_or(0, |p| p.matched)
            } else {
                0
            },
        };
        let mut out: Vec<ReplicaView> = cs.voters.iter().map(|&id| view(id, true)).collect();
        out.extend(cs.learners.iter().map(|&id| view(id, false)));
        out.sort_by_key(|r| r.id);
        out
    }

    fn report(&self) -> StatusReport {
        StatusReport {
            status: self.status.borrow().clone(),
            stats: self.stats,
            first_index: self.log.truncated_index() + 1,
            last_index: self.raw.raft.raft_log.last_index(),
            snapshot_index: self.log.truncated_index(),
            replicas: self.replicas(),
        }
    }

    fn publish_status(&mut self) {
        let leader = self.is_leader();
        if self.was_leader && !leader {
            // Entries we proposed may still commit under the new leader, but
            // we can no longer tell; callers retry (appends are idempotent).
            let err = self.not_leader();
            self.fail_pending(err);
        }
        self.was_leader = leader;
        match self.freshness {
            // Elected: it holds every committed entry.
            Freshness::AwaitingLeader | Freshness::CatchingUp(_) if leader => self.settle(),
            Freshness::CatchingUp(commit) if self.applied >= commit => self.settle(),
            _ => {}
        }
        let lead = self.raw.raft.leader_id;
        // Stale reads need no leader (degraded mode serves them), but not
        // from a replica that lost its data: a fresh one not yet caught up
        // with a leader, or one still short of a commit index a leader
        // showed it (see `freshness` and `start_commit`).
        let caught_up = self.freshness == Freshness::Settled && self.applied >= self.start_commit;
        // Learners and removed replicas are not part of the group's quorum
        // and do not report SERVING (a caught-up learner still serves
        // stale reads).
        let voter = self.raw.raft.prs().conf().voters().contains(self.cfg.id.0);
        let next = NodeStatus {
            id: self.cfg.id,
            role: self.raw.raft.state,
            term: self.raw.raft.term,
            leader: (lead != 0).then_some(NodeId(lead)),
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            caught_up,
            serving: caught_up && lead != 0 && voter,
            stopped: false,
        };
        self.status.send_if_modified(|s| {
            if *s == next {
                return false;
            }
            if s.role != next.role || s.leader != next.leader {
                info!(replica = %self.cfg.id, role = ?next.role, term = next.term, leader = ?next.leader.map(|l| l.0), "raft role changed");
            }
            if s.serving != next.serving {
                info!(replica = %self.cfg.id, serving = next.serving, applied = next.applied, "serving changed");
            }
            *s = next;
            true
        });
    }

    fn fail_pending(&mut self, err: StoreError) {
        for (_, waiting) in self.waiters.drain() {
            for (_, reply) in waiting {
                let _ = reply.send(Err(err.clone()));
            }
        }
        for (_, reply) in self.membership_waiters.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, waiting) in self.read_batches.drain() {
            for reply in waiting {
                let _ = reply.send(Err(err.clone()));
            }
        }
        for (_, waiting) in self.confirmed_reads.drain(..) {
            for reply in waiting {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }

    fn fail_all(&mut self, err: StoreError) {
        self.fail_pending(err.clone());
        for (_, reply) in self.queued.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
        for reply in self.queued_reads.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
        while let Ok(r) = self.requests.try_recv() {
            match r {
                Request::Propose { reply, .. } => drop(reply.send(Err(err.clone()))),
                Request::Read { reply } => drop(reply.send(Err(err.clone()))),
                Request::Membership { reply, .. } => drop(reply.send(Err(err.clone()))),
                Request::TransferLeader { reply, .. } => drop(reply.send(Err(err.clone()))),
                Request::Status { .. } => {}
                Request::Snapshot { reply, .. } => drop(reply.send(Err(err.clone()))),
            }
        }
    }
}

/// Messages only a leader (of the message's term) sends.
fn op_size(op: &Op) -> usize {
    match op {
        Op::Append(m) => 64 + m.body.len() + m.client_msg_id.len(),
        Op::CreateConversation { members, .. } => 64 + members.len() * 16,
        Op::PutSetting { key, value, .. } => 64 + key.as_str().len() + value.len(),
        _ => 64,
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}
