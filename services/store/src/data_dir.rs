//! Guards a replica's data directory against silent loss.
//!
//! Both stores treat an unreadable tail as torn and open what precedes it;
//! with the head of a file damaged (or the directory's contents gone),
//! that is an empty store, which would look exactly like a brand-new
//! replica. So the first time a replica initialises a directory it also
//! writes `REPLICA_ID`, a plain file beside the stores. A directory whose
//! marker names a replica but whose stores hold no replica records was
//! damaged, and the replica refuses to start rather than serve (or vote) as
//! if it had never held data.
//!
//! Layout: `<dir>/REPLICA_ID`, `<dir>/wal/` (the raft log, raft-engine),
//! `<dir>/state/` (the state machine, sled), `<dir>/snap/` (snapshot files
//! built to send, and received in `snap/incoming/`).

use std::io::Write as _;
use std::path::Path;

use crate::engine::Engine;
use crate::error::StoreError;
use crate::keys;
use crate::types::NodeId;
use crate::wal::Wal;

/// Name of the marker file inside a data directory.
pub const MARKER: &str = "REPLICA_ID";
/// Directory of the raft log inside a data directory.
pub const WAL_DIR: &str = "wal";
/// Directory of the state machine inside a data directory.
pub const STATE_DIR: &str = "state";

/// Call before opening the stores: refuses a directory written by the
/// store's first layout (everything in one sled database), which this
/// version cannot read.
pub fn check_layout(dir: &Path) -> Result<(), StoreError> {
    if dir.join("conf").exists() && dir.join("db").exists() && !dir.join(WAL_DIR).exists() {
        return Err(StoreError::FailedPrecondition(format!(
            "data directory {} was written by an older store version (raft log and state in one sled database); \
             this version keeps the raft log in {WAL_DIR}/ and the state in {STATE_DIR}/: delete the directory \
             and let the replica rejoin by snapshot",
            dir.display()
        )));
    }
    Ok(())
}

/// Opens the stores of a data directory, creating it if needed.
/// `cache_bytes` is the state engine's page cache.
pub fn open_storage(dir: &Path, cache_bytes: u64) -> Result<crate::replica::Storage, StoreError> {
    check_layout(dir)?;
    let state_dir = dir.join(STATE_DIR);
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| StoreError::Storage(format!("cannot create {}: {e}", state_dir.display())))?;
    let wal = crate::wal::RaftEngineWal::open(&dir.join(WAL_DIR))?;
    // sled flushes only when the checkpointer syncs it.
    let state = crate::engine::SledEngine::open_with_cache(
        &state_dir,
        crate::engine::BackgroundFlush::Off,
        cache_bytes,
    )?;
    Ok(crate::replica::Storage {
        wal: std::sync::Arc::new(wal),
        state: std::sync::Arc::new(state),
        snapshot_dir: dir.join(crate::snapshot::SNAP_DIR),
    })
}

/// Call before `LogStore::open`: fails if the directory was initialised
/// before but a store has lost the replica's records.
pub fn check(dir: &Path, wal: &dyn Wal, state: &dyn Engine) -> Result<(), StoreError> {
    let marker = dir.join(MARKER);
    let recorded = match std::fs::read_to_string(&marker) {
        Ok(s) => Some(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(StoreError::Storage(format!(
                "cannot read {}: {e}",
                marker.display()
            )));
        }
    };
    let Some(recorded) = recorded else {
        return Ok(());
    };
    if wal.get(keys::wal::REPLICA_ID).is_none() || state.get(keys::REPLICA_ID)?.is_none() {
        return Err(StoreError::Storage(format!(
            "data directory {} is damaged: it was initialised by replica {recorded} but its store holds no records; \
             refusing to start as an empty replica (restore it from a backup, or `chatctl store rebuild-replica` to rejoin by snapshot)",
            dir.display()
        )));
    }
    Ok(())
}

/// Call after `LogStore::open` succeeded: writes the marker if missing.
pub fn mark(dir: &Path, id: NodeId) -> Result<(), StoreError> {
    let marker = dir.join(MARKER);
    if marker.exists() {
        return Ok(());
    }
    let io =
        |e: std::io::Error| StoreError::Storage(format!("cannot write {}: {e}", marker.display()));
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    writeln!(f, "{}", id.0).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &marker).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{MemEngine, WriteBatch};
    use crate::wal::{META_GROUP, RaftEngineWal};

    #[test]
    fn a_marked_directory_whose_stores_lost_their_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wal = RaftEngineWal::open(&dir.path().join(WAL_DIR)).unwrap();
        let state = MemEngine::new();
        check(dir.path(), &wal, &state).unwrap();
        mark(dir.path(), NodeId(1)).unwrap();
        // Both stores come back empty, as they do with damaged files.
        let err = check(dir.path(), &wal, &state).unwrap_err();
        assert!(err.to_string().contains("is damaged"), "{err}");
        let mut b = raft_engine::LogBatch::default();
        b.put(
            META_GROUP,
            keys::wal::REPLICA_ID.to_vec(),
            1u64.to_be_bytes().to_vec(),
        )
        .unwrap();
        wal.write(&mut b, true).unwrap();
        // One store with its records is not enough.
        let err = check(dir.path(), &wal, &state).unwrap_err();
        assert!(err.to_string().contains("is damaged"), "{err}");
        let mut b = WriteBatch::default();
        b.put(keys::REPLICA_ID, 1u64.to_be_bytes().to_vec());
        state.write(b).unwrap();
        check(dir.path(), &wal, &state).unwrap();
    }

    #[test]
    fn a_directory_of_the_single_sled_layout_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        check_layout(dir.path()).unwrap();
        std::fs::write(dir.path().join("conf"), b"").unwrap();
        std::fs::write(dir.path().join("db"), b"").unwrap();
        let err = check_layout(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("older store version"), "{err}");
        assert!(!err.to_string().contains("  "), "{err}");
    }
}
