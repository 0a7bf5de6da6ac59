//! Guards a replica's data directory against silent loss.
//!
//! sled treats an unreadable log as a torn tail and opens what precedes it;
//! with the head of its file damaged, that is an empty database, which would
//! look exactly like a brand-new replica. So the first time a replica
//! initialises a directory it also writes `REPLICA_ID`, a plain file beside
//! the engine's. A directory whose marker names a replica but whose engine
//! holds no replica records was damaged, and the replica refuses to start
//! rather than serve (or vote) as if it had never held data.

use std::io::Write as _;
use std::path::Path;

use crate::engine::Engine;
use crate::error::StoreError;
use crate::keys;
use crate::types::NodeId;

/// Name of the marker file inside a data directory.
pub const MARKER: &str = "REPLICA_ID";

/// Call before `LogStore::open`: fails if the directory was initialised
/// before but its engine has lost the replica's records.
pub fn check(dir: &Path, id: NodeId, engine: &dyn Engine) -> Result<(), StoreError> {
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
    if engine.get(keys::REPLICA_ID)?.is_none() {
        return Err(StoreError::Storage(format!(
            "data directory {} is damaged: it was initialised by replica {recorded} but its store holds no records; \
             refusing to start as an empty replica (restore it from a backup, or delete the directory to rejoin by snapshot)",
            dir.display()
        )));
    }
    if recorded != id.0.to_string() {
        return Err(StoreError::FailedPrecondition(format!(
            "data directory belongs to replica {recorded}, not to replica {id}"
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

    #[test]
    fn a_marked_directory_whose_engine_lost_its_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let engine = MemEngine::new();
        check(dir.path(), NodeId(1), &engine).unwrap();
        mark(dir.path(), NodeId(1)).unwrap();
        // The engine comes back empty, as sled does with a damaged file.
        let err = check(dir.path(), NodeId(1), &engine).unwrap_err();
        assert!(err.to_string().contains("is damaged"), "{err}");
        let mut b = WriteBatch::default();
        b.put(keys::REPLICA_ID, 1u64.to_be_bytes().to_vec());
        engine.write(b).unwrap();
        check(dir.path(), NodeId(1), &engine).unwrap();
        assert!(matches!(
            check(dir.path(), NodeId(2), &engine),
            Err(StoreError::FailedPrecondition(_))
        ));
    }
}
