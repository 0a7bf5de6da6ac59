//! The raft log (entries, hard state, truncation point) in the WAL and the
//! conf state beside the state machine; implements `raft::Storage`.
//!
//! Two stores, two durability points:
//! - the WAL (raft-engine) holds what raft needs to be durable before it
//!   acknowledges: entries and hard state, written with one `fdatasync` per
//!   Ready (`persist`);
//! - the state engine (sled) holds the state machine, written without sync
//!   as entries apply; the checkpointer (see `checkpoint`) makes it durable
//!   in the background, and after a crash the replica re-applies from the
//!   WAL whatever the state lost.
//!
//! Architecture Invariant: the log is compacted only below the durable
//! checkpoint, so every entry the state engine may have lost is still in
//! the WAL.
//!
//! Snapshots are not stored: `snapshot()` exports the state machine as of
//! the applied index, which is consistent because the driver is the only
//! writer and calls it from its own thread.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, LogBatch};

use crate::engine::{Engine, WriteBatch, prefix_end};
use crate::error::StoreError;
use crate::keys;
use crate::snapshot::{Descriptor, FileReader, Snapshots};
use crate::types::NodeId;
use crate::wal::{EntryExt, LOG_GROUP, META_GROUP, Wal};

/// Index and term a new group's log starts after (see `LogStore::open`).
pub const BOOTSTRAP_INDEX: u64 = 5;
pub const BOOTSTRAP_TERM: u64 = 5;

/// Most recent entries kept in memory: raft asks for their terms on every
/// append response and sends them to followers that lag a little.
const RECENT_ENTRIES: usize = 8192;
/// Bytes of recent entries kept in memory at most.
const RECENT_BYTES: usize = 32 << 20;

struct Cache {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last compacted (or snapshotted) entry.
    truncated: (u64, u64),
    last_index: u64,
    /// The newest entries, contiguous, ascending, ending at `last_index`.
    /// Entries past `applied` are never dropped from it: they may not be in
    /// the WAL yet, or be replaced by a new leader's.
    recent: VecDeque<Entry>,
    recent_bytes: usize,
    applied: u64,
}

impl Cache {
    fn push_recent(&mut self, entries: &[Entry]) {
        if let Some(first) = entries.first() {
            while self.recent.back().is_some_and(|e| e.index >= first.index) {
                let e = self.recent.pop_back().expect("back exists");
                self.recent_bytes -= e.data.len();
            }
            if self
                .recent
                .back()
                .is_some_and(|e| e.index + 1 != first.index)
            {
                self.recent.clear();
                self.recent_bytes = 0;
            }
        }
        for e in entries {
            self.recent_bytes += e.data.len();
            self.recent.push_back(e.clone());
        }
        self.trim();
    }

    fn trim(&mut self) {
        while (self.recent.len() > RECENT_ENTRIES || self.recent_bytes > RECENT_BYTES)
            && self.recent.front().is_some_and(|e| e.index <= self.applied)
        {
            let e = self.recent.pop_front().expect("front exists");
            self.recent_bytes -= e.data.len();
        }
    }

    fn drop_recent_through(&mut self, index: u64) {
        while self.recent.front().is_some_and(|e| e.index <= index) {
            let e = self.recent.pop_front().expect("front exists");
            self.recent_bytes -= e.data.len();
        }
    }

    fn recent_from(&self, index: u64) -> Option<usize> {
        let first = self.recent.front()?.index;
        (index >= first && index <= self.last_index).then(|| (index - first) as usize)
    }
}

/// Where a replica whose data directory was new stands. Such a replica
/// knows nothing the group committed: were it a voter that lost its disk,
/// its vote could elect a candidate missing acknowledged entries. So it
/// withholds its vote from candidates with history (see `Driver::step`),
/// and serves no reads, until it holds what the group had committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Its log and state were written by this group; it votes and serves.
    Settled,
    /// No leader's log (an append or a snapshot) has reached it yet.
    AwaitingLeader,
    /// The first leader to reach it showed this commit index; it settles
    /// once it has applied that far.
    CatchingUp(u64),
}

/// Raft log storage over a WAL and the state engine. Cheap to clone; clones
/// share state.
#[derive(Clone)]
pub struct LogStore {
    wal: Arc<dyn Wal>,
    state: Arc<dyn Engine>,
    cache: Arc<RwLock<Cache>>,
    /// A compaction was written since the last `sync` (see `compact`).
    compacted_unsynced: Arc<std::sync::atomic::AtomicBool>,
    snapshots: Arc<Snapshots>,
}

/// Bytes of records per batch when a snapshot file is installed.
const INSTALL_BATCH_BYTES: usize = 8 << 20;

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("corrupt {what} in data directory: {e}"))
}

fn to_raft(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn encode<M: protobuf::Message>(what: &str, m: &M) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes().map_err(|e| corrupt(what, e))
}

/// Puts a record of the raft log's metadata into `b`.
fn put_meta(b: &mut LogBatch, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
    b.put(META_GROUP, key.to_vec(), value)
        .map_err(|e| corrupt("raft metadata", e))
}

fn owner(raw: Option<Vec<u8>>) -> Result<Option<u64>, StoreError> {
    raw.map(|raw| {
        let raw: [u8; 8] = raw
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("replica id", "wrong length"))?;
        Ok(u64::from_be_bytes(raw))
    })
    .transpose()
}

impl LogStore {
    /// Opens the log of replica `id`. A data directory written by another
    /// replica is refused. A fresh one is initialised with `initial_voters`
    /// (empty for a replica that will join an existing group).
    ///
    /// Reconciles the two stores after a crash: a snapshot install the
    /// crash interrupted is finished from its file, and a snapshot the
    /// state engine installed but the WAL did not record is recorded now.
    pub fn open(
        wal: Arc<dyn Wal>,
        state: Arc<dyn Engine>,
        snapshots: Arc<Snapshots>,
        id: NodeId,
        initial_voters: &[(NodeId, String)],
    ) -> Result<Self, StoreError> {
        let wal_owner = owner(wal.get(keys::wal::REPLICA_ID))?;
        let state_owner = owner(state.get(keys::REPLICA_ID)?)?;
        for owner in [wal_owner, state_owner].into_iter().flatten() {
            if owner != id.0 {
                return Err(StoreError::FailedPrecondition(format!(
                    "data directory belongs to replica {owner}, not to replica {id}"
                )));
            }
        }
        let initialising = wal.get(keys::wal::FRESH).is_some() && state_owner.is_none();
        match (wal_owner, state_owner) {
            (None, None) => Self::init_wal(wal.as_ref(), id, initial_voters)?,
            (Some(_), None) if initialising => {}
            (Some(_), Some(_)) => {}
            (None, Some(_)) => {
                return Err(StoreError::Storage(
                    "data directory is damaged: the state machine is there but the raft log is empty; \
                     restore it from a backup, or `chatctl store rebuild-replica` to rejoin by snapshot"
                        .into(),
                ));
            }
            (Some(_), None) => {
                return Err(StoreError::Storage(
                    "data directory is damaged: the raft log is there but the state machine is empty; \
                     restore it from a backup, or `chatctl store rebuild-replica` to rejoin by snapshot"
                        .into(),
                ));
            }
        }
        if state_owner.is_none() {
            Self::init_state(state.as_ref(), id, initial_voters)?;
        }
        if let Some(marker) = state.get(keys::INSTALLING)? {
            let (d, meta) = decode_install_marker(&marker)?;
            let file = snapshots.received(&d);
            if !file.exists() {
                return Err(StoreError::Storage(format!(
                    "data directory is damaged: a snapshot install was interrupted and its file {} is gone; \
                     run `chatctl store rebuild-replica` to rejoin by snapshot",
                    file.display()
                )));
            }
            tracing::info!(
                index = d.index,
                "finishing a snapshot install a crash interrupted"
            );
            install_state(state.as_ref(), FileReader::open(&file)?, &d, &meta)?;
            snapshots.clear_incoming();
        }

        let mut hard_state = Self::hard_state_of(wal.as_ref())?;
        let conf_state = Self::conf_state_of(state.as_ref())?;
        let mut truncated = match wal.get(keys::wal::TRUNCATED) {
            Some(raw) => keys::decode_pair(&raw)
                .ok_or_else(|| corrupt("truncation marker", "wrong length"))?,
            None => (0, 0),
        };
        let applied = read_applied(state.as_ref())?;
        let mut span = wal.span();
        if let Some((first, _)) = span
            && first > truncated.0 + 1
        {
            return Err(corrupt(
                "raft log",
                format!(
                    "entries {}..{first} are missing after the compaction point",
                    truncated.0 + 1
                ),
            ));
        }
        let term_at = |index: u64| -> Result<Option<u64>, StoreError> {
            if index == truncated.0 {
                return Ok(Some(truncated.1));
            }
            match span {
                Some((first, last)) if index >= first && index <= last => {
                    Ok(wal.entry(index)?.map(|e| e.term))
                }
                _ => Ok(None),
            }
        };
        let mut fix = LogBatch::default();
        if applied.0 > 0 && applied.0 < truncated.0 {
            return Err(corrupt(
                "state machine",
                format!(
                    "applied index {} is below the compacted log ({}); the state lost entries the log no longer has",
                    applied.0, truncated.0
                ),
            ));
        }
        if applied.0 > 0 && term_at(applied.0)? != Some(applied.1) {
            // The state engine installed a snapshot and the crash came
            // before the WAL recorded it: the log before it is obsolete.
            fix.add_command(LOG_GROUP, Command::Clean);
            truncated = applied;
            span = None;
            fix.put(
                META_GROUP,
                keys::wal::TRUNCATED.to_vec(),
                keys::encode_pair(applied.0, applied.1),
            )
            .map_err(|e| corrupt("truncation marker", e))?;
            hard_state.term = hard_state.term.max(applied.1);
        }
        let last_index = span.map_or(truncated.0, |(_, last)| last);
        // Applied entries were committed; a commit index behind them (one
        // written after a Ready's may not have reached the WAL) is raised
        // to match.
        let raised = applied.0 > hard_state.commit;
        if raised {
            hard_state.commit = applied.0;
        }
        if hard_state.commit > last_index {
            return Err(corrupt(
                "hard state",
                format!(
                    "commit index {} is beyond the last log index {last_index}",
                    hard_state.commit
                ),
            ));
        }
        if !fix.is_empty() || raised {
            fix.put(
                META_GROUP,
                keys::wal::HARD_STATE.to_vec(),
                encode("hard state", &hard_state)?,
            )
            .map_err(|e| corrupt("hard state", e))?;
            wal.write(&mut fix, true)?;
        }
        let mut cache = Cache {
            hard_state,
            conf_state,
            truncated,
            last_index,
            recent: VecDeque::new(),
            recent_bytes: 0,
            applied: applied.0,
        };
        if last_index > truncated.0 {
            let low = (truncated.0 + 1).max(last_index.saturating_sub(RECENT_ENTRIES as u64 - 1));
            let mut tail = Vec::new();
            wal.entries(low, last_index + 1, Some(RECENT_BYTES), &mut tail)?;
            // A size-limited read may stop early; keep what is contiguous
            // with the end.
            if tail.last().is_some_and(|e| e.index == last_index) {
                cache.push_recent(&tail);
            }
        }
        Ok(Self {
            wal,
            state,
            cache: Arc::new(RwLock::new(cache)),
            compacted_unsynced: Arc::default(),
            snapshots,
        })
    }

    /// First write of a new WAL: owner, the fresh marker and, for a new
    /// group, the bootstrap point. Synced before the state is initialised.
    fn init_wal(
        wal: &dyn Wal,
        id: NodeId,
        initial_voters: &[(NodeId, String)],
    ) -> Result<(), StoreError> {
        let mut b = LogBatch::default();
        put_meta(&mut b, keys::wal::REPLICA_ID, id.0.to_be_bytes().to_vec())?;
        // Until it has caught up with a leader, this replica knows nothing
        // the group has committed, and must not help elect anyone who has
        // history (see `Freshness`).
        put_meta(&mut b, keys::wal::FRESH, Vec::new())?;
        if !initial_voters.is_empty() {
            // A new group starts as if a snapshot at BOOTSTRAP_INDEX held
            // its voters. The log then never contains index 1, so any
            // replica joining later must begin with a snapshot, which
            // carries the conf state it could not learn from the log.
            let mut hs = HardState::default();
            hs.term = BOOTSTRAP_TERM;
            hs.commit = BOOTSTRAP_INDEX;
            put_meta(&mut b, keys::wal::HARD_STATE, encode("hard state", &hs)?)?;
            put_meta(
                &mut b,
                keys::wal::TRUNCATED,
                keys::encode_pair(BOOTSTRAP_INDEX, BOOTSTRAP_TERM),
            )?;
        }
        wal.write(&mut b, true)
    }

    fn init_state(
        state: &dyn Engine,
        id: NodeId,
        initial_voters: &[(NodeId, String)],
    ) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        b.put(keys::REPLICA_ID, id.0.to_be_bytes().to_vec());
        if !initial_voters.is_empty() {
            let mut cs = ConfState::default();
            cs.voters = initial_voters.iter().map(|(n, _)| n.0).collect();
            // Every initial voter writes the same addresses, and they travel
            // in snapshots, so replicas that join later can reach every
            // voter.
            for (n, addr) in initial_voters {
                b.put(keys::replica_addr(n.0), addr.clone().into_bytes());
            }
            b.put(keys::CONF_STATE, encode("conf state", &cs)?);
            b.put(
                keys::APPLIED,
                keys::encode_pair(BOOTSTRAP_INDEX, BOOTSTRAP_TERM),
            );
        }
        state.write(b)?;
        state.sync()
    }

    /// Makes empty stores those of replica `id` of a new group whose voters
    /// are `voters`, holding the state `snapshot` reads, already checked
    /// against `d` (a restored backup; see `backup`). The log starts after
    /// the snapshot, committed up to it, so every restored voter may vote
    /// and lead at once. The replica addresses in the snapshot are those of
    /// the group it came from; they are replaced by `voters`'.
    pub fn restore(
        wal: &dyn Wal,
        state: &dyn Engine,
        snapshot: FileReader,
        d: &Descriptor,
        id: NodeId,
        voters: &[(NodeId, String)],
    ) -> Result<(), StoreError> {
        if wal.get(keys::wal::REPLICA_ID).is_some() || state.get(keys::REPLICA_ID)?.is_some() {
            return Err(StoreError::FailedPrecondition(
                "cannot restore into a data directory that already belongs to a replica".into(),
            ));
        }
        let mut meta = SnapshotMetadata::default();
        meta.index = d.index;
        meta.term = d.term;
        let mut cs = ConfState::default();
        cs.voters = voters.iter().map(|(n, _)| n.0).collect();
        meta.set_conf_state(cs);
        install_state(state, snapshot, d, &meta)?;
        let mut b = WriteBatch::default();
        b.delete_range(
            keys::REPLICA_ADDR_PREFIX,
            prefix_end(keys::REPLICA_ADDR_PREFIX),
        );
        for (n, addr) in voters {
            b.put(keys::replica_addr(n.0), addr.clone().into_bytes());
        }
        b.put(keys::REPLICA_ID, id.0.to_be_bytes().to_vec());
        state.write(b)?;
        state.sync()?;
        let mut hs = HardState::default();
        hs.term = d.term;
        hs.commit = d.index;
        let mut lb = LogBatch::default();
        put_meta(&mut lb, keys::wal::REPLICA_ID, id.0.to_be_bytes().to_vec())?;
        put_meta(&mut lb, keys::wal::HARD_STATE, encode("hard state", &hs)?)?;
        put_meta(
            &mut lb,
            keys::wal::TRUNCATED,
            keys::encode_pair(d.index, d.term),
        )?;
        wal.write(&mut lb, true)
    }

    /// The applied index and term a state engine holds.
    pub fn applied_of(state: &dyn Engine) -> Result<(u64, u64), StoreError> {
        read_applied(state)
    }

    /// The hard state (term, vote, commit index) a log holds.
    pub fn hard_state_of(wal: &dyn Wal) -> Result<HardState, StoreError> {
        match wal.get(keys::wal::HARD_STATE) {
            Some(raw) => HardState::parse_from_bytes(&raw).map_err(|e| corrupt("hard state", e)),
            None => Ok(HardState::default()),
        }
    }

    /// The group's membership as a state engine holds it.
    pub fn conf_state_of(state: &dyn Engine) -> Result<ConfState, StoreError> {
        match state.get(keys::CONF_STATE)? {
            Some(raw) => ConfState::parse_from_bytes(&raw).map_err(|e| corrupt("conf state", e)),
            None => Ok(ConfState::default()),
        }
    }

    /// Where this replica stands if its data directory was new.
    pub fn freshness(&self) -> Result<Freshness, StoreError> {
        Ok(match self.wal.get(keys::wal::FRESH) {
            None => Freshness::Settled,
            Some(raw) if raw.is_empty() => Freshness::AwaitingLeader,
            Some(raw) => {
                let raw: [u8; 8] = raw
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("fresh marker", "wrong length"))?;
                Freshness::CatchingUp(u64::from_be_bytes(raw))
            }
        })
    }

    /// Records the commit index the first leader to reach this fresh
    /// replica showed (durable with the next synced write; losing it only
    /// keeps the replica cautious until a leader shows one again).
    pub fn set_catch_up_target(&self, commit: u64) -> Result<(), StoreError> {
        let mut b = LogBatch::default();
        b.put(
            META_GROUP,
            keys::wal::FRESH.to_vec(),
            commit.to_be_bytes().to_vec(),
        )
        .map_err(|e| corrupt("fresh marker", e))?;
        self.wal.write(&mut b, false)
    }

    /// Records that this replica holds what the group had committed when a
    /// leader first reached it (durable with the next synced write; losing
    /// it only keeps the replica cautious longer).
    pub fn clear_fresh(&self) -> Result<(), StoreError> {
        let mut b = LogBatch::default();
        b.delete(META_GROUP, keys::wal::FRESH.to_vec());
        self.wal.write(&mut b, false)
    }

    /// The state machine's engine.
    pub fn state(&self) -> &Arc<dyn Engine> {
        &self.state
    }

    pub fn wal(&self) -> &Arc<dyn Wal> {
        &self.wal
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().expect("log cache lock poisoned")
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().expect("log cache lock poisoned")
    }

    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    pub fn truncated_index(&self) -> u64 {
        self.read().truncated.0
    }

    pub fn last_index_cached(&self) -> u64 {
        self.read().last_index
    }

    /// Appends new entries (replacing any conflicting suffix) and, if
    /// given, the hard state, in one atomic WAL write; with `sync`, returns
    /// once an fdatasync covers them. `stage` then `write`, in one call.
    pub fn persist(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StoreError> {
        self.stage(entries, hs);
        self.write(entries, hs, sync)
    }

    /// Makes entries and hard state visible to raft (through
    /// `raft::Storage`) before they are written: raft-rs reads them from
    /// storage as soon as a Ready is advanced, while the WAL write may
    /// still be under way (see `writer`). Staged entries stay in memory
    /// until they are applied, so they are never read back from the WAL
    /// before it holds them.
    pub fn stage(&self, entries: &[Entry], hs: Option<&HardState>) {
        let mut c = self.write_cache();
        if let Some(last) = entries.last() {
            c.push_recent(entries);
            c.last_index = last.index;
        }
        if let Some(hs) = hs {
            c.hard_state = hs.clone();
        }
    }

    /// Writes staged entries and hard state to the WAL in one atomic write;
    /// with `sync`, returns once an fdatasync covers them.
    pub fn write(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StoreError> {
        let mut b = LogBatch::default();
        b.add_entries::<EntryExt>(LOG_GROUP, entries)
            .map_err(|e| corrupt("entry", e))?;
        if let Some(hs) = hs {
            b.put(
                META_GROUP,
                keys::wal::HARD_STATE.to_vec(),
                encode("hard state", hs)?,
            )
            .map_err(|e| corrupt("hard state", e))?;
        }
        if b.is_empty() {
            return if sync { self.wal.sync() } else { Ok(()) };
        }
        self.wal.write(&mut b, sync)
    }

    /// Entries up to `index` are applied: they are in the WAL for good, and
    /// the memory cache may let them go.
    pub fn note_applied(&self, index: u64) {
        let mut c = self.write_cache();
        c.applied = c.applied.max(index);
        c.trim();
    }

    /// Makes every WAL write so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.wal.sync()
    }

    /// Makes a compaction written since the last call durable, if any.
    pub fn sync_compaction(&self) -> Result<(), StoreError> {
        if self
            .compacted_unsynced
            .swap(false, std::sync::atomic::Ordering::AcqRel)
            && let Err(e) = self.wal.sync()
        {
            self.compacted_unsynced
                .store(true, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// Adds the conf state write to an apply batch; call `note_conf_state`
    /// once the batch is written.
    pub fn stage_conf_state(
        &self,
        batch: &mut WriteBatch,
        cs: &ConfState,
    ) -> Result<(), StoreError> {
        batch.put(keys::CONF_STATE, encode("conf state", cs)?);
        Ok(())
    }

    pub fn note_conf_state(&self, cs: ConfState) {
        self.write_cache().conf_state = cs;
    }

    /// Replaces log and state machine with a snapshot received from the
    /// leader, whose file the transport has received and checked: first
    /// the state (in batches, synced), then the log (synced). A crash in
    /// between is repaired by `open`.
    pub fn install_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        let d = Descriptor::decode(&snap.data)?;
        if (d.index, d.term) != (meta.index, meta.term) {
            return Err(StoreError::InvalidArgument(format!(
                "snapshot at {}/{} describes a file of {}/{}",
                meta.index, meta.term, d.index, d.term
            )));
        }
        let mut hs = self.hard_state();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        // Whatever this replica was building to send is obsolete.
        self.snapshots.abandon();
        let file = FileReader::open(&self.snapshots.received(&d))?;
        install_state(self.state.as_ref(), file, &d, meta)?;
        self.snapshots.clear_incoming();
        let mut lb = LogBatch::default();
        lb.add_command(LOG_GROUP, Command::Clean);
        lb.put(
            META_GROUP,
            keys::wal::TRUNCATED.to_vec(),
            keys::encode_pair(meta.index, meta.term),
        )
        .map_err(|e| corrupt("truncation marker", e))?;
        lb.put(
            META_GROUP,
            keys::wal::HARD_STATE.to_vec(),
            encode("hard state", &hs)?,
        )
        .map_err(|e| corrupt("hard state", e))?;
        self.wal.write(&mut lb, true)?;
        let mut c = self.write_cache();
        c.hard_state = hs;
        c.conf_state = meta.get_conf_state().clone();
        c.truncated = (meta.index, meta.term);
        c.last_index = meta.index;
        c.recent.clear();
        c.recent_bytes = 0;
        c.applied = meta.index;
        Ok(())
    }

    /// Removes entries up to and including `index`. The caller guarantees
    /// that the state machine is durable past `index` (see the module doc).
    pub fn compact(&self, index: u64) -> Result<(), StoreError> {
        let (first, last) = {
            let c = self.read();
            (c.truncated.0 + 1, c.last_index)
        };
        if index < first {
            return Ok(());
        }
        if index > last {
            return Err(StoreError::Storage(format!(
                "cannot compact to {index}, beyond last index {last}"
            )));
        }
        let term = self.term_of(index)?;
        let mut b = LogBatch::default();
        b.add_command(LOG_GROUP, Command::Compact { index: index + 1 });
        b.put(
            META_GROUP,
            keys::wal::TRUNCATED.to_vec(),
            keys::encode_pair(index, term),
        )
        .map_err(|e| corrupt("truncation marker", e))?;
        // Not synced: a lost compaction is done again. But the WAL's purge
        // may delete the files that held the previous truncation point, so
        // the checkpointer syncs before it purges (`sync_compaction`).
        self.wal.write(&mut b, false)?;
        self.compacted_unsynced
            .store(true, std::sync::atomic::Ordering::Release);
        let mut c = self.write_cache();
        c.truncated = (index, term);
        c.drop_recent_through(index);
        Ok(())
    }

    fn term_of(&self, idx: u64) -> Result<u64, StoreError> {
        {
            let c = self.read();
            if idx == c.truncated.0 {
                return Ok(c.truncated.1);
            }
            if let Some(at) = c.recent_from(idx) {
                return Ok(c.recent[at].term);
            }
        }
        self.wal
            .entry(idx)?
            .map(|e| e.term)
            .ok_or_else(|| StoreError::Storage(format!("log entry {idx} is missing")))
    }

    /// The state machine as of the applied index, as snapshot payload pairs.
    /// Writes a batch of the state machine (the apply path), first letting
    /// a snapshot being built keep what the batch overwrites.
    pub fn write_state(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.snapshots.capture(&batch)?;
        self.state.write(batch)
    }

    /// A built snapshot at `min` or later, if there is one; otherwise, once
    /// the state has applied `min`, starts a build at the applied index and
    /// returns None (ask again). Call on the raft thread, between applies,
    /// so that the applied index and conf state match the engine.
    /// `for_replica`: the replica it is for, which its membership must
    /// name (see `Snapshots::get_or_build`).
    pub fn snapshot_at(
        &self,
        min: u64,
        for_replica: Option<u64>,
    ) -> Result<Option<Snapshot>, StoreError> {
        let applied = self.applied()?;
        if applied.0 < min {
            return Ok(None);
        }
        self.snapshots
            .get_or_build(min, for_replica, applied, &self.conf_state())
    }

    /// The replica's snapshot files.
    pub fn snapshots(&self) -> &Arc<Snapshots> {
        &self.snapshots
    }

    /// Applied index and its term, as last written by the state machine.
    pub fn applied(&self) -> Result<(u64, u64), StoreError> {
        read_applied(self.state.as_ref())
    }
}

/// Replaces the state machine with the records of a snapshot file, in
/// batches of bounded size. The first batch clears the state and sets a
/// marker, the last sets the applied index and removes the marker; a
/// replica that finds the marker at start runs this again from the same
/// file (see `LogStore::open`).
fn install_state(
    state: &dyn Engine,
    mut reader: FileReader,
    d: &Descriptor,
    meta: &SnapshotMetadata,
) -> Result<(), StoreError> {
    let mut b = WriteBatch::default();
    b.delete_range(keys::STATE_PREFIX, prefix_end(keys::STATE_PREFIX));
    b.put(keys::INSTALLING, encode_install_marker(d, meta)?);
    state.write(b)?;
    let mut b = WriteBatch::default();
    let mut bytes = 0;
    while let Some((k, v)) = reader.next_record()? {
        if !k.starts_with(keys::STATE_PREFIX) {
            return Err(StoreError::Storage(format!(
                "snapshot carries a key outside the state machine: {k:?}"
            )));
        }
        bytes += k.len() + v.len();
        b.put(k, v);
        if bytes >= INSTALL_BATCH_BYTES {
            state.write(std::mem::take(&mut b))?;
            bytes = 0;
        }
    }
    b.put(keys::APPLIED, keys::encode_pair(meta.index, meta.term));
    b.put(
        keys::CONF_STATE,
        encode("conf state", meta.get_conf_state())?,
    );
    b.delete(keys::INSTALLING);
    state.write(b)?;
    state.sync()
}

fn encode_install_marker(d: &Descriptor, meta: &SnapshotMetadata) -> Result<Vec<u8>, StoreError> {
    let mut out = d.encode();
    out.extend_from_slice(&encode("snapshot metadata", meta)?);
    Ok(out)
}

fn decode_install_marker(raw: &[u8]) -> Result<(Descriptor, SnapshotMetadata), StoreError> {
    if raw.len() < 32 {
        return Err(corrupt("snapshot install marker", "too short"));
    }
    let d = Descriptor::decode(&raw[..32]).map_err(|e| corrupt("snapshot install marker", e))?;
    let meta = SnapshotMetadata::parse_from_bytes(&raw[32..])
        .map_err(|e| corrupt("snapshot install marker", e))?;
    Ok((d, meta))
}

fn read_applied(state: &dyn Engine) -> Result<(u64, u64), StoreError> {
    match state.get(keys::APPLIED)? {
        Some(raw) => {
            keys::decode_pair(&raw).ok_or_else(|| corrupt("applied index", "wrong length"))
        }
        None => Ok((0, 0)),
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.read();
        Ok(RaftState {
            hard_state: c.hard_state.clone(),
            conf_state: c.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(u64::MAX);
        {
            let c = self.read();
            if low <= c.truncated.0 {
                return Err(raft::Error::Store(StorageError::Compacted));
            }
            if high > c.last_index + 1 {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
        }
        // Entries from the memory cache's front on come from memory: the
        // newest may be staged but not written yet. Older ones come from the
        // WAL, which holds every entry the cache has let go.
        let mut out: Vec<Entry> = Vec::new();
        let mut size = 0u64;
        let mut next = low;
        while next < high {
            let front = {
                let c = self.read();
                if let Some(at) = c.recent_from(next) {
                    for e in c.recent.range(at..) {
                        if e.index >= high {
                            break;
                        }
                        size += u64::from(e.compute_size());
                        if !out.is_empty() && size > max_size {
                            break;
                        }
                        out.push(e.clone());
                    }
                    return Ok(out);
                }
                c.recent.front().map(|e| e.index)
            };
            let upto = front.map_or(high, |f| f.min(high));
            let mut got = Vec::new();
            let room = usize::try_from(max_size.saturating_sub(size)).unwrap_or(usize::MAX);
            self.wal
                .entries(next, upto, Some(room.max(1)), &mut got)
                .map_err(to_raft)?;
            if got.first().is_none_or(|e| e.index != next) {
                return Err(to_raft(corrupt(
                    "raft log",
                    format!("entries from {next} are missing"),
                )));
            }
            let complete = got.len() as u64 == upto - next;
            for e in got {
                size += u64::from(e.compute_size());
                if !out.is_empty() && size > max_size {
                    return Ok(out);
                }
                out.push(e);
            }
            if !complete {
                return Ok(out);
            }
            next = upto;
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (first, last) = {
            let c = self.read();
            (c.truncated.0, c.last_index)
        };
        if idx < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.term_of(idx).map_err(to_raft)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index)
    }

    /// Called by raft on the raft thread, between applies. A snapshot is
    /// built in the background (see `snapshot`); until it is ready raft
    /// hears "temporarily unavailable" and asks again later. It must reach
    /// the compacted log, so that the follower goes on from the log.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let min = request_index.max(self.truncated_index());
        self.snapshot_at(min, Some(to))
            .map_err(to_raft)?
            .ok_or(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ))
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage as _;

    use super::*;
    use crate::engine::{MemEngine, Pair};
    use crate::wal::RaftEngineWal;

    /// A WAL in a temporary directory and an in-memory state engine.
    struct Disk {
        dir: tempfile::TempDir,
        snaps: tempfile::TempDir,
        state: MemEngine,
    }

    impl Disk {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
                snaps: tempfile::tempdir().unwrap(),
                state: MemEngine::new(),
            }
        }

        fn wal(&self) -> Arc<dyn Wal> {
            Arc::new(RaftEngineWal::open(self.dir.path()).unwrap())
        }

        fn open(&self, id: u64, voters: &[(NodeId, String)]) -> Result<LogStore, StoreError> {
            let state: Arc<dyn Engine> = Arc::new(self.state.clone());
            let snaps = Snapshots::open(self.snaps.path(), state.clone())?;
            LogStore::open(self.wal(), state, snaps, NodeId(id), voters)
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = format!("entry {index}").into_bytes().into();
        e
    }

    fn voters() -> Vec<(NodeId, String)> {
        (1..=3)
            .map(|i| (NodeId(i), format!("127.0.0.1:700{i}")))
            .collect()
    }

    fn kv(k: &str, v: &str) -> Pair {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn entries(log: &LogStore, low: u64, high: u64, max: Option<u64>) -> Vec<(u64, u64)> {
        log.entries(low, high, max, raft::GetEntriesContext::empty(false))
            .unwrap()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    #[test]
    fn appends_truncate_conflicts_and_answer_raft_queries_from_memory_and_disk() {
        let disk = Disk::new();
        let log = disk.open(1, &[]).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (1, 0)
        );
        let ents: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        log.persist(&ents, None, true).unwrap();
        // A new leader overwrites 4..: the old 4 and 5 must go.
        log.persist(&[entry(4, 2)], None, true).unwrap();
        assert_eq!(log.last_index().unwrap(), 4);
        assert_eq!(log.term(4).unwrap(), 2);
        assert_eq!(log.term(3).unwrap(), 1);
        assert!(log.term(5).is_err());
        assert_eq!(entries(&log, 2, 5, None), vec![(2, 1), (3, 1), (4, 2)]);
        // Size limit: always at least one entry.
        assert_eq!(entries(&log, 2, 5, Some(1)).len(), 1);
        log.compact(2).unwrap();
        assert_eq!(log.first_index().unwrap(), 3);
        assert_eq!(log.term(2).unwrap(), 1, "term of the compaction point");
        assert!(matches!(
            log.entries(1, 3, None, raft::GetEntriesContext::empty(false)),
            Err(raft::Error::Store(raft::StorageError::Compacted))
        ));
        // The same answers after a restart, now read from the WAL's files.
        drop(log);
        let log = disk.open(1, &[]).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (3, 4)
        );
        assert_eq!(entries(&log, 3, 5, None), vec![(3, 1), (4, 2)]);
        assert_eq!(log.term(2).unwrap(), 1);
    }

    /// Writes 100 entries more than the memory cache holds (term 1, from
    /// index 1); returns the last index.
    fn fill_past_the_cache(log: &LogStore) -> u64 {
        let n = RECENT_ENTRIES as u64 + 100;
        let ents: Vec<Entry> = (1..=n).map(|i| entry(i, 1)).collect();
        for chunk in ents.chunks(1000) {
            log.persist(chunk, None, false).unwrap();
        }
        n
    }

    #[test]
    fn entries_older_than_the_memory_cache_come_from_the_wal() {
        let disk = Disk::new();
        let log = disk.open(1, &[]).unwrap();
        let n = fill_past_the_cache(&log);
        assert_eq!(entries(&log, 1, 4, None), vec![(1, 1), (2, 1), (3, 1)]);
        assert_eq!(log.term(50).unwrap(), 1);
        assert_eq!(entries(&log, n - 1, n + 1, None), vec![(n - 1, 1), (n, 1)]);
    }

    #[test]
    fn a_new_group_starts_after_a_bootstrap_point_so_joiners_need_a_snapshot() {
        let disk = Disk::new();
        let log = disk.open(1, &voters()).unwrap();
        let st = log.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(
            (st.hard_state.term, st.hard_state.commit),
            (BOOTSTRAP_TERM, BOOTSTRAP_INDEX)
        );
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (BOOTSTRAP_INDEX + 1, BOOTSTRAP_INDEX)
        );
        assert_eq!(log.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM);
        let snap = built_snapshot(&log);
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        // The voters' addresses travel with it, for replicas that join later.
        let data = snapshot_records(&log, &snap);
        assert!(data.contains(&(keys::replica_addr(2), b"127.0.0.1:7002".to_vec())));
    }

    #[test]
    fn a_new_directory_stays_fresh_across_restarts_until_it_has_caught_up() {
        let disk = Disk::new();
        let log = disk.open(1, &voters()).unwrap();
        assert_eq!(log.freshness().unwrap(), Freshness::AwaitingLeader);
        log.set_catch_up_target(42).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = disk.open(1, &[]).unwrap();
        assert_eq!(log.freshness().unwrap(), Freshness::CatchingUp(42));
        log.clear_fresh().unwrap();
        log.sync().unwrap();
        drop(log);
        let log = disk.open(1, &[]).unwrap();
        assert_eq!(log.freshness().unwrap(), Freshness::Settled);
    }

    #[test]
    fn hard_state_and_log_survive_reopen_and_another_replica_is_refused() {
        let disk = Disk::new();
        {
            let log = disk.open(2, &voters()).unwrap();
            let mut hs = HardState::default();
            hs.term = 7;
            hs.vote = 3;
            hs.commit = 7;
            log.persist(&[entry(6, 7), entry(7, 7), entry(8, 7)], Some(&hs), true)
                .unwrap();
        }
        let log = disk.open(2, &[]).unwrap();
        let st = log.initial_state().unwrap();
        assert_eq!(
            (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
            (7, 3, 7)
        );
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(log.last_index().unwrap(), 8);
        drop(log);
        match disk.open(3, &[]) {
            Err(StoreError::FailedPrecondition(msg)) => {
                assert!(msg.contains("belongs to replica 2"), "{msg}")
            }
            other => panic!("expected refusal, got {:?}", other.map(|_| ())),
        }
    }

    /// Asks for a snapshot until the background build has made one.
    fn built_snapshot(log: &LogStore) -> Snapshot {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match log.snapshot(0, 1) {
                Ok(snap) => return snap,
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) => {
                    assert!(std::time::Instant::now() < deadline, "snapshot never built");
                    std::thread::yield_now();
                }
                Err(e) => panic!("snapshot failed: {e}"),
            }
        }
    }

    fn snapshot_records(log: &LogStore, snap: &Snapshot) -> Vec<Pair> {
        let d = Descriptor::decode(&snap.data).unwrap();
        crate::snapshot::read_all(&log.snapshots().outgoing(&d)).unwrap()
    }

    /// A snapshot at `index`/`term` holding `pairs`, as if received from a
    /// leader: its file is in place.
    fn received_snapshot(log: &LogStore, index: u64, term: u64, pairs: &[Pair]) -> Snapshot {
        let tmp = log.snapshots().partial(&Descriptor {
            index,
            term,
            size: 0,
            crc: 0,
        });
        let (size, crc) = crate::snapshot::write_records(&tmp, pairs).unwrap();
        let d = Descriptor {
            index,
            term,
            size,
            crc,
        };
        std::fs::rename(&tmp, log.snapshots().received(&d)).unwrap();
        let mut snap = Snapshot::default();
        snap.data = d.encode().into();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = term;
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        snap.mut_metadata().set_conf_state(cs);
        snap
    }

    #[test]
    fn installing_a_snapshot_replaces_log_and_state() {
        let disk = Disk::new();
        let log = disk.open(3, &[]).unwrap();
        log.persist(&[entry(1, 1), entry(2, 1)], None, true)
            .unwrap();
        let mut b = WriteBatch::default();
        b.put(b"s/c/old".to_vec(), b"old".to_vec());
        disk.state.write(b).unwrap();
        let snap = received_snapshot(&log, 50, 4, &[kv("s/c/new", "new")]);
        log.install_snapshot(&snap).unwrap();
        assert_eq!(
            disk.state.get(b"s/c/old").unwrap(),
            None,
            "old state survived"
        );
        assert_eq!(disk.state.get(b"s/c/new").unwrap(), Some(b"new".to_vec()));
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (51, 50)
        );
        assert_eq!(log.term(50).unwrap(), 4);
        assert_eq!(log.applied().unwrap(), (50, 4));
        assert_eq!(log.initial_state().unwrap().hard_state.commit, 50);
        // What this replica would now send to others is that same state.
        let out = built_snapshot(&log);
        assert_eq!(out.get_metadata().index, 50);
        assert!(snapshot_records(&log, &out).contains(&kv("s/c/new", "new")));
        // The log continues after the snapshot, across a restart.
        log.persist(&[entry(51, 4)], None, true).unwrap();
        drop(log);
        let log = disk.open(3, &[]).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (51, 51)
        );
        assert_eq!(log.term(50).unwrap(), 4);
    }

    #[test]
    fn a_snapshot_with_keys_outside_the_state_machine_is_refused() {
        let disk = Disk::new();
        let log = disk.open(3, &[]).unwrap();
        let snap = received_snapshot(&log, 50, 4, &[kv("m/hs", "x")]);
        let bad = log.install_snapshot(&snap);
        assert!(matches!(bad, Err(StoreError::Storage(_))), "{bad:?}");
        // Nor is a snapshot whose file is not here.
        let mut missing = snap.clone();
        missing.mut_metadata().index = 60;
        assert!(log.install_snapshot(&missing).is_err());
    }

    #[test]
    fn an_install_a_crash_interrupted_is_finished_from_its_file_at_restart() {
        let disk = Disk::new();
        let log = disk.open(3, &[]).unwrap();
        log.persist(&[entry(1, 1), entry(2, 1)], None, true)
            .unwrap();
        let pairs: Vec<Pair> = (0..100)
            .map(|i| kv(&format!("s/m/{i:03}"), &format!("message {i}")))
            .collect();
        let snap = received_snapshot(&log, 70, 5, &pairs);
        // The crash came right after the install's first batch: the old
        // state is gone and the new one not there yet.
        let d = Descriptor::decode(&snap.data).unwrap();
        let mut b = WriteBatch::default();
        b.delete_range(keys::STATE_PREFIX, prefix_end(keys::STATE_PREFIX));
        b.put(
            keys::INSTALLING,
            encode_install_marker(&d, snap.get_metadata()).unwrap(),
        );
        disk.state.write(b).unwrap();
        drop(log);
        let log = disk.open(3, &[]).unwrap();
        assert_eq!(log.applied().unwrap(), (70, 5));
        assert_eq!(disk.state.get(keys::INSTALLING).unwrap(), None);
        let state = disk
            .state
            .scan(b"s/m/", &prefix_end(b"s/m/"), false, usize::MAX)
            .unwrap();
        assert_eq!(state, pairs);
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (71, 70)
        );
        assert!(
            !log.snapshots().received(&d).exists(),
            "the received file is removed once installed"
        );
    }

    #[test]
    fn a_crash_after_the_state_took_a_snapshot_but_before_the_log_did_is_repaired() {
        let disk = Disk::new();
        let log = disk.open(3, &[]).unwrap();
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = 3;
        log.persist(
            &(1..=4).map(|i| entry(i, 1)).collect::<Vec<_>>(),
            Some(&hs),
            true,
        )
        .unwrap();
        drop(log);
        // The state engine installed a snapshot at 50 (term 4); the WAL
        // never heard of it.
        let mut b = WriteBatch::default();
        b.put(keys::APPLIED, keys::encode_pair(50, 4));
        disk.state.write(b).unwrap();
        let log = disk.open(3, &[]).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (51, 50)
        );
        assert_eq!(log.term(50).unwrap(), 4);
        let hs = log.hard_state();
        assert_eq!((hs.term, hs.commit), (4, 50));
    }

    #[test]
    fn a_state_behind_the_compacted_log_is_refused() {
        let disk = Disk::new();
        let log = disk.open(1, &[]).unwrap();
        log.persist(
            &(1..=9).map(|i| entry(i, 1)).collect::<Vec<_>>(),
            None,
            true,
        )
        .unwrap();
        let mut b = WriteBatch::default();
        b.put(keys::APPLIED, keys::encode_pair(3, 1));
        disk.state.write(b).unwrap();
        log.compact(6).unwrap();
        drop(log);
        match disk.open(1, &[]) {
            Err(StoreError::Storage(msg)) => {
                assert!(msg.contains("below the compacted log"), "{msg}")
            }
            other => panic!("expected refusal, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_commit_index_beyond_the_log_is_refused_and_one_behind_apply_is_raised() {
        let disk = Disk::new();
        let log = disk.open(1, &[]).unwrap();
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = 1;
        log.persist(&[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hs), true)
            .unwrap();
        // Applied through 3, but the hard state saying commit = 3 was lost.
        let mut b = WriteBatch::default();
        b.put(keys::APPLIED, keys::encode_pair(3, 1));
        disk.state.write(b).unwrap();
        drop(log);
        let log = disk.open(1, &[]).unwrap();
        assert_eq!(log.hard_state().commit, 3);
        hs.commit = 10;
        log.persist(&[], Some(&hs), true).unwrap();
        drop(log);
        assert!(matches!(disk.open(1, &[]), Err(StoreError::Storage(_))));
    }

    #[test]
    fn corrupt_records_stop_the_replica_with_a_clear_error() {
        let disk = Disk::new();
        drop(disk.open(1, &[]).unwrap());
        let mut b = LogBatch::default();
        b.put(
            META_GROUP,
            keys::wal::HARD_STATE.to_vec(),
            vec![0xff, 0xff, 0xff],
        )
        .unwrap();
        disk.wal().write(&mut b, true).unwrap();
        match disk.open(1, &[]) {
            Err(StoreError::Storage(msg)) => assert!(msg.contains("corrupt hard state"), "{msg}"),
            other => panic!("expected corruption error, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_range_from_before_the_memory_cache_into_unwritten_entries_is_served_from_both() {
        let disk = Disk::new();
        let log = disk.open(1, &[]).unwrap();
        let n = fill_past_the_cache(&log);
        log.note_applied(n);
        // Staged, as the driver does before the log writer has written them.
        let staged: Vec<Entry> = (n + 1..=n + 10).map(|i| entry(i, 2)).collect();
        log.stage(&staged, None);
        let got = entries(&log, 5, n + 11, None);
        assert_eq!(got.len() as u64, n + 6);
        assert_eq!(got.first(), Some(&(5, 1)));
        assert_eq!(got.last(), Some(&(n + 10, 2)));
        assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1), "gapless");
        // A size limit still returns a prefix, at least one entry.
        assert_eq!(entries(&log, 5, n + 11, Some(1)), vec![(5, 1)]);
    }
}
