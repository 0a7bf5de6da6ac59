//! sled-backed engine. The only module that knows sled.
//!
//! Everything lives in sled's default tree, so a `WriteBatch` maps onto one
//! atomic `sled::Batch`.
//!
//! `sync` is `Db::flush` followed by an fsync of every file and directory
//! sled keeps: sled's own flush ends in `sync_file_range`, which flushes
//! neither the drive's cache nor file metadata, and it writes large values
//! to blob files it never syncs at all.

use std::path::Path;

use super::{Engine, Pair, WriteBatch, WriteOp};
use crate::error::StoreError;

pub struct SledEngine {
    db: sled::Db,
    dir: std::path::PathBuf,
}

/// How sled itself flushes in the background.
#[derive(Clone, Copy, Debug)]
pub enum BackgroundFlush {
    /// Only explicit `sync` calls flush (the driver syncs every batch).
    Off,
    /// sled flushes every this many milliseconds.
    EveryMs(u64),
}

/// sled's page cache unless told otherwise (sled's own default). A smaller
/// one bounds memory lower but costs CPU: sled's accounting overstates
/// what it caches, and with 256 MiB its write path measured 1.4× slower.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

impl SledEngine {
    pub fn open(dir: &Path, flush: BackgroundFlush) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, flush, DEFAULT_CACHE_BYTES)
    }

    /// Opens with a page cache of `cache_bytes`.
    pub fn open_with_cache(
        dir: &Path,
        flush: BackgroundFlush,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        let flush_every_ms = match flush {
            BackgroundFlush::Off => None,
            BackgroundFlush::EveryMs(ms) => Some(ms),
        };
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(flush_every_ms)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| {
                StoreError::Storage(format!("cannot open data directory {}: {e}", dir.display()))
            })?;
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
        })
    }
}

/// fsyncs every file under `dir`, then the directories themselves, so that
/// both the data and the names of new files survive a power cut.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            match std::fs::File::open(entry.path()) {
                Ok(f) => f.sync_data()?,
                // sled removes blobs and old snapshots as it goes.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

fn storage(e: sled::Error) -> StoreError {
    StoreError::Storage(e.to_string())
}

impl Engine for SledEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(storage)?.map(|v| v.to_vec()))
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for op in batch.ops {
            match op {
                WriteOp::Put(k, v) => b.insert(k, v),
                WriteOp::Delete(k) => b.remove(k),
                WriteOp::DeleteRange(start, end) => {
                    if start < end {
                        for item in self.db.range(start..end).keys() {
                            b.remove(item.map_err(storage)?);
                        }
                    }
                }
            }
        }
        self.db.apply_batch(b).map_err(storage)
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Pair>, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let range = self.db.range(start..end);
        let convert = |item: sled::Result<(sled::IVec, sled::IVec)>| {
            item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(storage)
        };
        if reverse {
            range.rev().take(limit).map(convert).collect()
        } else {
            range.take(limit).map(convert).collect()
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(storage)?;
        sync_tree(&self.dir)
            .map_err(|e| StoreError::Storage(format!("cannot sync {}: {e}", self.dir.display())))
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }
}
