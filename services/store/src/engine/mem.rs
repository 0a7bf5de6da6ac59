//! In-memory engine: the twin of `SledEngine` for tests and simulations.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};

use super::{Engine, Pair, WriteBatch, WriteOp};
use crate::error::StoreError;

type Map = BTreeMap<Vec<u8>, Vec<u8>>;
/// A key written since the last counted sync, with what it held before.
type Undo = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A `BTreeMap` behind a lock. Clones share the same data, so a test can
/// "restart" a replica on the engine it had.
///
/// It models a disk's durability too: `sync` records what is durable, and
/// `power_cut` forgets every write that no `sync` covered. It keeps an undo
/// log rather than a second copy: each write since the last counted sync
/// with what its key held before, undone in reverse by a power cut (a copy
/// made every sync or cut cost a simulation as much as its whole state).
#[derive(Clone, Default)]
pub struct MemEngine {
    map: Arc<RwLock<Map>>,
    /// Keys written since the last counted sync, with their earlier values.
    undo: Arc<Mutex<Undo>>,
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
        let mut map = self.map.write().expect("mem engine lock poisoned");
        let mut undo = self.undo.lock().expect("mem engine lock poisoned");
        for (k, before) in undo.drain(..).rev() {
            match before {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
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
        let mut undo = self.undo.lock().expect("mem engine lock poisoned");
        for op in batch.ops {
            match op {
                WriteOp::Put(k, v) => {
                    let before = map.insert(k.clone(), v);
                    undo.push((k, before));
                }
                WriteOp::Delete(k) => {
                    if let Some(before) = map.remove(&k) {
                        undo.push((k, Some(before)));
                    }
                }
                WriteOp::DeleteRange(start, end) => {
                    if start < end {
                        let doomed: Vec<Vec<u8>> =
                            map.range(start..end).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            let before = map.remove(&k);
                            undo.push((k, before));
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
        self.undo.lock().expect("mem engine lock poisoned").clear();
        Ok(())
    }

    fn size_on_disk(&self) -> Option<u64> {
        None
    }
}
