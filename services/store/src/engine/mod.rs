//! The ordered key-value engine under everything the store persists.
//!
//! The raft log, hard state, conf state and the state machine all live in one
//! engine under distinct key prefixes (see `keys`), so that installing a
//! snapshot or applying a batch of entries is one atomic write. Only
//! `engine/sled_engine.rs` knows sled; `MemEngine` is its in-memory twin, and the
//! conformance suite in `engine/conformance.rs` runs against both.
//!
//! Architecture Invariant: a single writer (the raft driver) mutates an
//! engine; readers may run concurrently and see whole batches or nothing.

mod mem;
mod sled_engine;

#[cfg(test)]
mod conformance;

pub use self::mem::MemEngine;
pub use self::sled_engine::{BackgroundFlush, DEFAULT_CACHE_BYTES, SledEngine};

use crate::error::StoreError;

/// One key-value pair as returned by a scan.
pub type Pair = (Vec<u8>, Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Deletes every key in `[start, end)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// An atomic group of writes, applied in order.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put(key.into(), value.into()));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete(key.into()));
    }

    pub fn delete_range(&mut self, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops
            .push(WriteOp::DeleteRange(start.into(), end.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// An ordered, durable key-value store.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Applies the batch atomically: after a crash either all of it or none
    /// of it is visible, and batches are never reordered.
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// Keys in `[start, end)`, ascending (or descending when `reverse`), at
    /// most `limit` of them.
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<Pair>, StoreError>;

    /// Makes every completed write durable (fsync).
    fn sync(&self) -> Result<(), StoreError>;

    /// Bytes the engine occupies on disk, if it has a disk.
    fn size_on_disk(&self) -> Option<u64>;
}

/// Smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}
