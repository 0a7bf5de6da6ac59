//! In-memory engine: the twin of `SledEngine` for tests and simulations.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use super::{Engine, Pair, WriteBatch, WriteOp};
use crate::error::StoreError;

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// A `BTreeMap` behind a lock. Clones share the same data, so a test can
/// "restart" a replica on the engine it had.
///
/// It models a disk's durability too: `sync` records what is durable, and
/// `power_cut` forgets every write that no `sync` covered.
#[derive(Clone, Default)]
pub struct MemEngine {
    map: Arc<RwLock<Map>>,
    durable: Arc<RwLock<Map>>,
    /// Power is going: syncs do not count until `power_cut`.
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now until `power_cut`, syncs do not count.
    pub fn freeze(&self) {
        self.frozen
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Loses every write no counted `sync` covered, as a power cut would.
    pub fn power_cut(&self) {
        self.frozen
            .store(false, std::sync::atomic::Ordering::Release);
        let durable = self
            .durable
            .read()
            .expect("mem engine lock poisoned")
            .clone();
        *self.map.write().expect("mem engine lock poisoned") = durable;
    }
}

impl Engine for MemEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .map
            .read()
            .expect("mem engine lock poisoned")
            .get(key)
            .cloned())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut map = self.map.write().expect("mem engine lock poisoned");
        for op in batch.ops {
            match op {
                WriteOp::Put(k, v) => {
                    map.insert(k, v);
                }
                WriteOp::Delete(k) => {
                    map.remove(&k);
                }
                WriteOp::DeleteRange(start, end) => {
                    if start < end {
                        let doomed: Vec<Vec<u8>> =
                            map.range(start..end).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            map.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
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
        let map = self.map.read().expect("mem engine lock poisoned");
        let range = map.range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)));
        let pairs = if reverse {
            range
                .rev()
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            range
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        Ok(pairs)
    }

    fn sync(&self) -> Result<(), StoreError> {
        if self.frozen.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let now = self.map.read().expect("mem engine lock poisoned").clone();
        *self.durable.write().expect("mem engine lock poisoned") = now;
        Ok(())
    }

    fn size_on_disk(&self) -> Option<u64> {
        None
    }
}
