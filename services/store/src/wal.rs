//! The write-ahead log under the raft log: TiKV's `raft-engine`, the only
//! module that knows it.
//!
//! raft-engine is a log made for raft logs: one append-only file sequence,
//! group commit (concurrent writers share one `fdatasync`), entries indexed
//! in memory by raft index, and compaction by index. The replica keeps two
//! raft-engine groups in it:
//!
//! - `LOG_GROUP`: the raft entries, nothing else, so installing a snapshot
//!   can drop them all with one `Clean` command;
//! - `META_GROUP`: hard state, truncation point, replica id and the
//!   "fresh" marker (see `keys::wal`).
//!
//! A `LogBatch` may touch both groups and is written atomically: after a
//! crash either all of it is there or none of it.
//!
//! Architecture Invariant: a write with `sync = true` returns only after an
//! `fdatasync` of the log file covering it. The raft driver acknowledges
//! nothing (to a leader or a client) that a synced write does not cover.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use raft::eraftpb::Entry;
use raft_engine::env::{DefaultFileSystem, FileSystem};
use raft_engine::{Config, LogBatch, MessageExt, ReadableSize, RecoveryMode};

use crate::error::StoreError;

/// raft-engine group holding the raft log's entries.
pub const LOG_GROUP: u64 = 1;
/// raft-engine group holding the raft metadata (hard state and the rest).
pub const META_GROUP: u64 = 2;

/// Meta key rewritten by `Wal::sync` (its value is empty).
const SYNC_MARK: &[u8] = b"sync";

/// Size at which the WAL starts a new file.
const TARGET_FILE_BYTES: u64 = 32 << 20;
/// Size of the live WAL above which raft-engine rewrites and purges old
/// files when asked to (`Wal::purge`). The driver compacts the log to a
/// bounded number of entries, so the WAL stays near this size.
const PURGE_THRESHOLD_BYTES: u64 = 256 << 20;

/// raft-engine's view of a raft-rs entry.
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// What the log store needs of a WAL; object safe so tests can put a file
/// system shim under raft-engine without making every type generic.
pub trait Wal: Send + Sync + 'static {
    /// Writes the batch atomically; with `sync`, returns after fdatasync.
    fn write(&self, batch: &mut LogBatch, sync: bool) -> Result<(), StoreError>;

    /// Makes every write so far durable.
    fn sync(&self) -> Result<(), StoreError>;

    /// A value of the meta group.
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;

    /// Entries `[low, high)` appended to `out`, stopping (after at least
    /// one) once `max_size` bytes are exceeded.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<usize>,
        out: &mut Vec<Entry>,
    ) -> Result<(), StoreError>;

    fn entry(&self, index: u64) -> Result<Option<Entry>, StoreError>;

    /// Index span of the stored entries, if there are any.
    fn span(&self) -> Option<(u64, u64)>;

    /// Removes files that hold only compacted entries.
    fn purge(&self) -> Result<(), StoreError>;

    /// Bytes of log files in use.
    fn size_on_disk(&self) -> u64;
}

fn wal_error(e: raft_engine::Error) -> StoreError {
    StoreError::Storage(format!("raft log: {e}"))
}

/// The WAL on raft-engine, over any file system raft-engine can use.
pub struct RaftEngineWal<F: FileSystem = DefaultFileSystem> {
    engine: raft_engine::Engine<F>,
    /// Tells this opening of a log from every other in the process.
    instance: u64,
}

/// raft-engine keeps the last block of entries it read in a cache per
/// thread, keyed by the block's place in its files (file number, offset,
/// length) and not by engine. When two logs are read on one thread (the
/// simulator's replicas; a log opened again after a crash cut its files
/// back and new writes took the same places) one could be served the
/// other's bytes: raft-engine then panics on an entry with the wrong
/// index, or returns a wrong entry. So a log that was not the last to read
/// on this thread first evicts that block by reading from a sentinel log
/// whose one file has a number no real log reaches. A process with one log
/// never builds the sentinel.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static LAST_READER: Cell<u64> = const { Cell::new(0) };
    static SENTINEL: RefCell<Option<Sentinel>> = const { RefCell::new(None) };
}

/// The sentinel's file number: raft-engine numbers files from 1 and a log
/// starts a new file every `TARGET_FILE_BYTES`.
const SENTINEL_FILE: u64 = 1 << 48;

struct Sentinel {
    engine: raft_engine::Engine<DefaultFileSystem>,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn build() -> Result<Self, StoreError> {
        let fail = |e: &dyn std::fmt::Display| {
            StoreError::Storage(format!(
                "raft log: cannot build the block cache sentinel: {e}"
            ))
        };
        let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
        // raft-engine creates file 1 with its header; renamed, the same
        // file is the sentinel's only one.
        drop(raft_engine::Engine::open(config(dir.path())).map_err(|e| fail(&e))?);
        std::fs::rename(
            dir.path().join(format!("{:016}.raftlog", 1)),
            dir.path().join(format!("{SENTINEL_FILE:016}.raftlog")),
        )
        .map_err(|e| fail(&e))?;
        let engine = raft_engine::Engine::open(config(dir.path())).map_err(|e| fail(&e))?;
        let mut batch = LogBatch::default();
        let entry = Entry {
            index: 1,
            ..Entry::default()
        };
        batch
            .add_entries::<EntryExt>(LOG_GROUP, &[entry])
            .map_err(|e| fail(&e))?;
        engine.write(&mut batch, false).map_err(|e| fail(&e))?;
        Ok(Self { engine, _dir: dir })
    }
}

/// Leaves the sentinel's block in this thread's raft-engine block cache.
fn evict_block_cache() -> Result<(), StoreError> {
    SENTINEL.with(|cell| {
        let mut sentinel = cell.borrow_mut();
        if sentinel.is_none() {
            *sentinel = Some(Sentinel::build()?);
        }
        let s = sentinel.as_ref().expect("built above");
        match s.engine.get_entry::<EntryExt>(LOG_GROUP, 1) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(StoreError::Storage(
                "raft log: the block cache sentinel lost its entry".into(),
            )),
            Err(e) => Err(wal_error(e)),
        }
    })
}

fn config(dir: &Path) -> Config {
    Config {
        dir: dir.to_string_lossy().into_owned(),
        // Entries are small and compressing them costs CPU on every
        // replica for little gain on a local disk.
        batch_compression_threshold: ReadableSize(0),
        target_file_size: ReadableSize(TARGET_FILE_BYTES),
        purge_threshold: ReadableSize(PURGE_THRESHOLD_BYTES),
        // A torn tail is what a crash leaves; anything else is damage the
        // replica must not paper over.
        recovery_mode: RecoveryMode::TolerateTailCorruption,
        recovery_threads: 2,
        enable_log_recycle: false,
        ..Config::default()
    }
}

impl RaftEngineWal<DefaultFileSystem> {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, Arc::new(DefaultFileSystem))
    }
}

impl<F: FileSystem + 'static> RaftEngineWal<F> {
    pub fn open_with(dir: &Path, fs: Arc<F>) -> Result<Self, StoreError> {
        let engine = raft_engine::Engine::open_with_file_system(config(dir), fs).map_err(|e| {
            StoreError::Storage(format!(
                "cannot open the raft log in {}: {e}",
                dir.display()
            ))
        })?;
        Ok(Self {
            engine,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Before raft-engine reads entries on this thread: see `SENTINEL`.
    fn claim_block_cache(&self) -> Result<(), StoreError> {
        let last = LAST_READER.with(|l| l.replace(self.instance));
        if last != 0 && last != self.instance {
            evict_block_cache()?;
        }
        Ok(())
    }
}

impl<F: FileSystem + 'static> Wal for RaftEngineWal<F> {
    fn write(&self, batch: &mut LogBatch, sync: bool) -> Result<(), StoreError> {
        self.engine
            .write(batch, sync)
            .map(|_| ())
            .map_err(wal_error)
    }

    fn sync(&self) -> Result<(), StoreError> {
        // raft-engine returns at once on an empty batch, sync or not (its
        // own `Engine::sync` included), so a sync writes a one-key batch.
        let mut b = LogBatch::default();
        b.put(META_GROUP, SYNC_MARK.to_vec(), Vec::new())
            .map_err(wal_error)?;
        self.write(&mut b, true)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.engine.get(META_GROUP, key)
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<usize>,
        out: &mut Vec<Entry>,
    ) -> Result<(), StoreError> {
        self.claim_block_cache()?;
        self.engine
            .fetch_entries_to::<EntryExt>(LOG_GROUP, low, high, max_size, out)
            .map(|_| ())
            .map_err(wal_error)
    }

    fn entry(&self, index: u64) -> Result<Option<Entry>, StoreError> {
        self.claim_block_cache()?;
        self.engine
            .get_entry::<EntryExt>(LOG_GROUP, index)
            .map_err(wal_error)
    }

    fn span(&self) -> Option<(u64, u64)> {
        Some((
            self.engine.first_index(LOG_GROUP)?,
            self.engine.last_index(LOG_GROUP)?,
        ))
    }

    fn purge(&self) -> Result<(), StoreError> {
        // Rewriting old files reads their entries.
        self.claim_block_cache()?;
        self.engine
            .purge_expired_files()
            .map(|_| ())
            .map_err(wal_error)
    }

    fn size_on_disk(&self) -> u64 {
        self.engine.get_used_size() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(dir: &Path, body: &[u8]) -> RaftEngineWal {
        let wal = RaftEngineWal::open(dir).expect("open");
        let entries: Vec<Entry> = (1..=3)
            .map(|index| Entry {
                index,
                term: 1,
                data: body.to_vec().into(),
                ..Entry::default()
            })
            .collect();
        let mut batch = LogBatch::default();
        batch
            .add_entries::<EntryExt>(LOG_GROUP, &entries)
            .expect("batch");
        wal.write(&mut batch, true).expect("write");
        wal
    }

    #[test]
    fn two_logs_read_on_one_thread_each_get_their_own_entries() {
        // Same sizes, so the entries sit at the same places in both logs'
        // files: raft-engine's block cache would serve one log's bytes to
        // the other.
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = log_with(a.path(), b"first log");
        let second = log_with(b.path(), b"other log");
        for _ in 0..2 {
            let e = first.entry(2).unwrap().expect("entry 2");
            assert_eq!(&e.data[..], b"first log");
            let e = second.entry(2).unwrap().expect("entry 2");
            assert_eq!(&e.data[..], b"other log");
            let mut out = Vec::new();
            first.entries(1, 4, None, &mut out).unwrap();
            assert!(out.iter().all(|e| &e.data[..] == b"first log"));
        }
    }
}
