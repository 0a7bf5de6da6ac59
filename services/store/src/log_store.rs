//! The raft log, hard state and conf state, kept in an `Engine`; implements
//! `raft::Storage` for raft-rs.
//!
//! Snapshots are not stored: `snapshot()` exports the state machine as of
//! the applied index, which is consistent because the driver is the only
//! writer and calls it from its own thread. Compaction only ever removes
//! entries at or below the applied index.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::engine::{Engine, Pair, WriteBatch, prefix_end};
use crate::error::StoreError;
use crate::keys;
use crate::types::NodeId;

/// Index and term a new group's log starts after (see `LogStore::open`).
pub const BOOTSTRAP_INDEX: u64 = 5;
pub const BOOTSTRAP_TERM: u64 = 5;

/// Terms of the most recent entries kept in memory; raft asks for them on
/// every append response.
const TERM_CACHE: usize = 8192;

struct Cache {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last compacted (or snapshotted) entry.
    truncated: (u64, u64),
    last_index: u64,
    /// (index, term) of the newest entries, contiguous, ascending.
    terms: VecDeque<(u64, u64)>,
}

/// Raft log storage over an engine. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<dyn Engine>,
    cache: Arc<RwLock<Cache>>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("corrupt {what} in data directory: {e}"))
}

fn to_raft(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl LogStore {
    /// Opens the log of replica `id`. A data directory written by another
    /// replica is refused. A fresh one is initialised with `initial_voters`
    /// (empty for a replica that will join an existing group).
    pub fn open(
        engine: Arc<dyn Engine>,
        id: NodeId,
        initial_voters: &[(NodeId, String)],
    ) -> Result<Self, StoreError> {
        let owner = engine.get(keys::REPLICA_ID)?;
        let fresh = match owner {
            Some(raw) => {
                let raw: [u8; 8] = raw
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("replica id", "wrong length"))?;
                let owner = u64::from_be_bytes(raw);
                if owner != id.0 {
                    return Err(StoreError::FailedPrecondition(format!(
                        "data directory belongs to replica {owner}, not to replica {id}"
                    )));
                }
                false
            }
            None => true,
        };
        if fresh {
            let mut b = WriteBatch::default();
            b.put(keys::REPLICA_ID, id.0.to_be_bytes().to_vec());
            // Until a leader contacts it, this replica knows nothing the
            // group has committed, and must not help elect anyone who has
            // history (see Driver::step).
            b.put(keys::FRESH, Vec::new());
            if !initial_voters.is_empty() {
                // A new group starts as if a snapshot at BOOTSTRAP_INDEX held
                // its voters. The log then never contains index 1, so any
                // replica joining later must begin with a snapshot, which
                // carries the conf state it could not learn from the log.
                let mut cs = ConfState::default();
                cs.voters = initial_voters.iter().map(|(n, _)| n.0).collect();
                // Every initial voter writes the same addresses, and they
                // travel in snapshots, so replicas that join later can reach
                // every voter.
                for (n, addr) in initial_voters {
                    b.put(keys::replica_addr(n.0), addr.clone().into_bytes());
                }
                b.put(
                    keys::CONF_STATE,
                    cs.write_to_bytes().map_err(|e| corrupt("conf state", e))?,
                );
                let mut hs = HardState::default();
                hs.term = BOOTSTRAP_TERM;
                hs.commit = BOOTSTRAP_INDEX;
                b.put(
                    keys::HARD_STATE,
                    hs.write_to_bytes().map_err(|e| corrupt("hard state", e))?,
                );
                b.put(
                    keys::TRUNCATED,
                    keys::encode_pair(BOOTSTRAP_INDEX, BOOTSTRAP_TERM),
                );
                b.put(
                    keys::APPLIED,
                    keys::encode_pair(BOOTSTRAP_INDEX, BOOTSTRAP_TERM),
                );
            }
            engine.write(b)?;
            engine.sync()?;
        }
        let mut hard_state = match engine.get(keys::HARD_STATE)? {
            Some(raw) => HardState::parse_from_bytes(&raw).map_err(|e| corrupt("hard state", e))?,
            None => HardState::default(),
        };
        let conf_state = match engine.get(keys::CONF_STATE)? {
            Some(raw) => ConfState::parse_from_bytes(&raw).map_err(|e| corrupt("conf state", e))?,
            None => ConfState::default(),
        };
        let truncated = match engine.get(keys::TRUNCATED)? {
            Some(raw) => keys::decode_pair(&raw)
                .ok_or_else(|| corrupt("truncation marker", "wrong length"))?,
            None => (0, 0),
        };
        let tail = engine.scan(
            keys::LOG_PREFIX,
            &prefix_end(keys::LOG_PREFIX),
            true,
            TERM_CACHE,
        )?;
        let mut terms = VecDeque::with_capacity(tail.len());
        for (k, v) in tail.iter().rev() {
            let index = keys::log_index(k).ok_or_else(|| corrupt("log key", "wrong length"))?;
            let e = Entry::parse_from_bytes(v).map_err(|e| corrupt("log entry", e))?;
            if e.index != index {
                return Err(corrupt(
                    "log entry",
                    format!("key says {index}, entry says {}", e.index),
                ));
            }
            if let Some(&(prev, _)) = terms.back()
                && prev + 1 != index
            {
                return Err(corrupt("log", format!("gap between {prev} and {index}")));
            }
            terms.push_back((index, e.term));
        }
        let last_index = terms.back().map_or(truncated.0, |&(i, _)| i);
        if let Some(&(first, _)) = terms.front()
            && first <= truncated.0
            && terms.len() < TERM_CACHE
        {
            return Err(corrupt(
                "log",
                format!(
                    "entry {first} is below the compaction point {}",
                    truncated.0
                ),
            ));
        }
        // Applying writes the applied index before the Ready's hard state
        // is written, so a crash can leave the recorded commit behind it.
        // Applied entries were committed; raise the commit to match.
        let applied = match engine.get(keys::APPLIED)? {
            Some(raw) => {
                keys::decode_pair(&raw)
                    .ok_or_else(|| corrupt("applied index", "wrong length"))?
                    .0
            }
            None => 0,
        };
        if applied > last_index {
            return Err(corrupt(
                "state machine",
                format!("applied index {applied} is beyond the last log index {last_index}"),
            ));
        }
        if applied > hard_state.commit {
            hard_state.commit = applied;
            let mut b = WriteBatch::default();
            b.put(
                keys::HARD_STATE,
                hard_state
                    .write_to_bytes()
                    .map_err(|e| corrupt("hard state", e))?,
            );
            engine.write(b)?;
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
        let cache = Cache {
            hard_state,
            conf_state,
            truncated,
            last_index,
            terms,
        };
        Ok(Self {
            engine,
            cache: Arc::new(RwLock::new(cache)),
        })
    }

    /// Whether this replica has never heard from a leader since its data
    /// directory was created.
    pub fn is_fresh(&self) -> Result<bool, StoreError> {
        Ok(self.engine.get(keys::FRESH)?.is_some())
    }

    /// Records that a leader has contacted this replica (durable with the
    /// next sync; losing it only keeps the replica cautious longer).
    pub fn clear_fresh(&self) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        b.delete(keys::FRESH);
        self.engine.write(b)
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
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

    /// Persists new entries (replacing any conflicting suffix) and, if given,
    /// the hard state, in one atomic write. Durable after `sync`.
    pub fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        if let Some(first) = entries.first() {
            let last_index = self.read().last_index;
            if first.index <= last_index {
                b.delete_range(keys::log_entry(first.index), prefix_end(keys::LOG_PREFIX));
            }
            for e in entries {
                b.put(
                    keys::log_entry(e.index),
                    e.write_to_bytes().map_err(|e| corrupt("entry", e))?,
                );
            }
        }
        if let Some(hs) = hs {
            b.put(
                keys::HARD_STATE,
                hs.write_to_bytes().map_err(|e| corrupt("hard state", e))?,
            );
        }
        if b.is_empty() {
            return Ok(());
        }
        self.engine.write(b)?;
        let mut c = self.write_cache();
        if let Some(first) = entries.first() {
            while c.terms.back().is_some_and(|&(i, _)| i >= first.index) {
                c.terms.pop_back();
            }
            if c.terms.back().is_some_and(|&(i, _)| i + 1 != first.index) {
                c.terms.clear();
            }
            for e in entries {
                c.terms.push_back((e.index, e.term));
            }
            while c.terms.len() > TERM_CACHE {
                c.terms.pop_front();
            }
            c.last_index = entries.last().map_or(c.last_index, |e| e.index);
        }
        if let Some(hs) = hs {
            c.hard_state = hs.clone();
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
        batch.put(
            keys::CONF_STATE,
            cs.write_to_bytes().map_err(|e| corrupt("conf state", e))?,
        );
        Ok(())
    }

    pub fn note_conf_state(&self, cs: ConfState) {
        self.write_cache().conf_state = cs;
    }

    /// Replaces log and state machine with a snapshot received from the
    /// leader, atomically.
    pub fn install_snapshot(&self, snap: &Snapshot, data: Vec<Pair>) -> Result<(), StoreError> {
        let meta = snap.get_metadata();
        let mut hs = self.hard_state();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        let mut b = WriteBatch::default();
        b.delete_range(keys::LOG_PREFIX, prefix_end(keys::LOG_PREFIX));
        b.delete_range(keys::STATE_PREFIX, prefix_end(keys::STATE_PREFIX));
        for (k, v) in data {
            if !k.starts_with(keys::STATE_PREFIX) {
                return Err(StoreError::Storage(format!(
                    "snapshot carries a key outside the state machine: {k:?}"
                )));
            }
            b.put(k, v);
        }
        b.put(keys::APPLIED, keys::encode_pair(meta.index, meta.term));
        b.put(keys::TRUNCATED, keys::encode_pair(meta.index, meta.term));
        b.put(
            keys::CONF_STATE,
            meta.get_conf_state()
                .write_to_bytes()
                .map_err(|e| corrupt("conf state", e))?,
        );
        b.put(
            keys::HARD_STATE,
            hs.write_to_bytes().map_err(|e| corrupt("hard state", e))?,
        );
        self.engine.write(b)?;
        let mut c = self.write_cache();
        c.hard_state = hs;
        c.conf_state = meta.get_conf_state().clone();
        c.truncated = (meta.index, meta.term);
        c.last_index = meta.index;
        c.terms.clear();
        Ok(())
    }

    /// Removes entries up to and including `index`, which must be applied.
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
        let mut b = WriteBatch::default();
        b.delete_range(keys::log_entry(first), keys::log_entry(index + 1));
        b.put(keys::TRUNCATED, keys::encode_pair(index, term));
        self.engine.write(b)?;
        let mut c = self.write_cache();
        c.truncated = (index, term);
        while c.terms.front().is_some_and(|&(i, _)| i <= index) {
            c.terms.pop_front();
        }
        Ok(())
    }

    fn term_of(&self, idx: u64) -> Result<u64, StoreError> {
        {
            let c = self.read();
            if idx == c.truncated.0 {
                return Ok(c.truncated.1);
            }
            if let Some(&(first, _)) = c.terms.front()
                && idx >= first
                && let Some(&(i, t)) = c.terms.get((idx - first) as usize)
            {
                debug_assert_eq!(i, idx);
                return Ok(t);
            }
        }
        let raw = self
            .engine
            .get(&keys::log_entry(idx))?
            .ok_or_else(|| StoreError::Storage(format!("log entry {idx} is missing")))?;
        Ok(Entry::parse_from_bytes(&raw)
            .map_err(|e| corrupt("log entry", e))?
            .term)
    }

    /// The state machine as of the applied index, as snapshot payload pairs.
    pub fn export_state(&self) -> Result<Vec<Pair>, StoreError> {
        self.engine.scan(
            keys::STATE_PREFIX,
            &prefix_end(keys::STATE_PREFIX),
            false,
            usize::MAX,
        )
    }

    /// Applied index and its term, as last written by the state machine.
    pub fn applied(&self) -> Result<(u64, u64), StoreError> {
        match self.engine.get(keys::APPLIED)? {
            Some(raw) => {
                keys::decode_pair(&raw).ok_or_else(|| corrupt("applied index", "wrong length"))
            }
            None => Ok((0, 0)),
        }
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
        let (first, last) = {
            let c = self.read();
            (c.truncated.0 + 1, c.last_index)
        };
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let pairs = self
            .engine
            .scan(
                &keys::log_entry(low),
                &keys::log_entry(high),
                false,
                (high - low) as usize,
            )
            .map_err(to_raft)?;
        let mut out = Vec::with_capacity(pairs.len());
        let mut size = 0u64;
        for (_, v) in pairs {
            let e = Entry::parse_from_bytes(&v).map_err(|e| to_raft(corrupt("log entry", e)))?;
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e);
        }
        if out.first().is_some_and(|e| e.index != low) || (out.is_empty() && low < high) {
            return Err(to_raft(corrupt(
                "log",
                format!("entries from {low} are missing"),
            )));
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

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let (index, term) = self.applied().map_err(to_raft)?;
        if index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let data = self.export_state().map_err(to_raft)?;
        let mut snap = Snapshot::default();
        snap.data = crate::codec::encode_snapshot_data(data).into();
        let mut meta = SnapshotMetadata::default();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state());
        snap.set_metadata(meta);
        Ok(snap)
    }
}
