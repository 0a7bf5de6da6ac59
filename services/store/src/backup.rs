//! Backups: one file holding a consistent copy of the state machine, taken
//! online by the leader (`StoreAdmin/Backup`), and the offline restore that
//! makes a new replica's data directory from it.
//!
//! **File.** `MAGIC`, the header's length (u32, big-endian), the header
//! (`BackupHeader`, protobuf: the raft index and term the copy reflects,
//! the voters it came from, when and by whom it was taken, and the size and
//! CRC-32 of what follows), then a snapshot file (`snapshot` module's
//! format) of that size. A backup is written under a temporary name and
//! renamed only once its size and checksum match the header, so a file
//! under the final name is always complete.
//!
//! **Restore.** Every voter of the new group is restored from the same
//! file, into a new directory: the state is installed from the snapshot,
//! the replica addresses are replaced by the new group's, and the raft log
//! starts right after the snapshot's index, committed up to it. The
//! directory is built in a subdirectory and moved into place at the end,
//! its `REPLICA_ID` marker last, so an interrupted restore leaves nothing a
//! replica would start from (and running it again starts over).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use chat_proto::store::v1::BackupHeader;
use prost::Message as _;

use crate::error::StoreError;
use crate::log_store::LogStore;
use crate::snapshot::{Descriptor, FileReader, for_each_chunk};
use crate::types::NodeId;

pub const MAGIC: &[u8; 8] = b"CHATBAK1";
/// Largest header a backup may carry.
const MAX_HEADER: u32 = 16 << 20;
/// Where a restore builds the directory, inside it.
const WORK_DIR: &str = ".restoring";
/// The state engine's page cache while restoring.
const RESTORE_CACHE_BYTES: u64 = 64 << 20;

fn io(what: impl std::fmt::Display, e: std::io::Error) -> StoreError {
    StoreError::Storage(format!("{what}: {e}"))
}

fn bad(path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::InvalidArgument(format!("{} is not a usable backup: {why}", path.display()))
}

/// Writes a backup file as its chunks arrive.
pub struct BackupWriter {
    out: BufWriter<File>,
    header: BackupHeader,
    crc: crc32fast::Hasher,
    size: u64,
    tmp: PathBuf,
    path: PathBuf,
}

impl BackupWriter {
    /// Starts `path` (refused if it exists: a backup is never overwritten).
    pub fn create(path: &Path, header: BackupHeader) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::FailedPrecondition(format!(
                "{} exists; a backup is never written over another file",
                path.display()
            )));
        }
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".part");
        let tmp = path.with_file_name(name);
        let file = File::create(&tmp).map_err(|e| io(tmp.display(), e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let raw = header.encode_to_vec();
        out.write_all(MAGIC)
            .and_then(|()| out.write_all(&(raw.len() as u32).to_be_bytes()))
            .and_then(|()| out.write_all(&raw))
            .map_err(|e| io(tmp.display(), e))?;
        Ok(Self {
            out,
            header,
            crc: crc32fast::Hasher::new(),
            size: 0,
            tmp,
            path: path.to_owned(),
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.size += data.len() as u64;
        if self.size > self.header.size {
            return Err(StoreError::Storage(format!(
                "the backup stream sent more than the {} bytes its header announced",
                self.header.size
            )));
        }
        self.crc.update(data);
        self.out
            .write_all(data)
            .map_err(|e| io(self.tmp.display(), e))
    }

    /// Checks size and checksum, syncs, and gives the file its name.
    pub fn finish(self) -> Result<BackupHeader, StoreError> {
        let crc = self.crc.finalize();
        if self.size != self.header.size || crc != self.header.crc {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(StoreError::Storage(format!(
                "the backup stream ended after {} of {} bytes (CRC {crc:08x}, expected {:08x})",
                self.size, self.header.size, self.header.crc
            )));
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| io(self.tmp.display(), e.into_error()))?;
        file.sync_all().map_err(|e| io(self.tmp.display(), e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| io(self.path.display(), e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir.display(), e))?;
        }
        Ok(self.header)
    }
}

/// A backup made offline from the data directory of a stopped replica (a
/// learner that survived the loss of the voters' site, say): its state
/// machine as of its applied index. Returns the header and the commit
/// index its log knows of: entries between the two were committed but not
/// yet applied there, and are not in the backup.
pub fn from_data_dir(dir: &Path, path: &Path) -> Result<(BackupHeader, u64), StoreError> {
    crate::data_dir::check_layout(dir)?;
    for sub in [crate::data_dir::WAL_DIR, crate::data_dir::STATE_DIR] {
        if !dir.join(sub).is_dir() {
            return Err(StoreError::InvalidArgument(format!(
                "{} holds no replica data ({sub}/ is missing)",
                dir.display()
            )));
        }
    }
    let storage = crate::data_dir::open_storage(dir, RESTORE_CACHE_BYTES)?;
    let (wal, state) = (storage.wal.as_ref(), storage.state.as_ref());
    crate::data_dir::check(dir, wal, state)?;
    if state.get(crate::keys::INSTALLING)?.is_some() {
        return Err(StoreError::FailedPrecondition(format!(
            "a snapshot install in {} was interrupted; start the replica once to finish it, stop it, and try again",
            dir.display()
        )));
    }
    let (index, term) = LogStore::applied_of(state)?;
    let commit = LogStore::hard_state_of(wal)?.commit;
    let voters = LogStore::conf_state_of(state)?.voters;
    let mut replicas = Vec::new();
    for id in voters {
        let address = state
            .get(&crate::keys::replica_addr(id))?
            .map(|a| String::from_utf8_lossy(&a).into_owned())
            .unwrap_or_default();
        replicas.push(chat_proto::store::v1::ReplicaInfo {
            id,
            address,
            role: "voter".into(),
            matched: 0,
        });
    }
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".state");
    let snap = path.with_file_name(name);
    let written = crate::snapshot::write_state(state, &snap);
    let result = written.and_then(|(size, crc)| {
        let owner = state
            .get(crate::keys::REPLICA_ID)?
            .and_then(|raw| raw.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or_default();
        let header = BackupHeader {
            index,
            term,
            size,
            crc,
            replicas,
            taken_at_ms: crate::clock::system_ms(),
            taken_by: owner,
        };
        let mut out = BackupWriter::create(path, header)?;
        let f = File::open(&snap).map_err(|e| io(snap.display(), e))?;
        for_each_chunk(f, snap.display(), |chunk| out.write(chunk))?;
        out.finish()
    });
    let _ = std::fs::remove_file(&snap);
    Ok((result?, commit))
}

/// Reads a backup's header and checks the whole file against it; returns
/// the header and where the snapshot starts.
pub fn verify(path: &Path) -> Result<(BackupHeader, u64), StoreError> {
    let mut f = BufReader::new(File::open(path).map_err(|e| io(path.display(), e))?);
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)
        .map_err(|_| bad(path, "too short"))?;
    if &magic != MAGIC {
        return Err(bad(path, "it does not start as a backup file does"));
    }
    let mut len = [0u8; 4];
    f.read_exact(&mut len).map_err(|_| bad(path, "too short"))?;
    let len = u32::from_be_bytes(len);
    if len > MAX_HEADER {
        return Err(bad(path, format!("header of {len} bytes")));
    }
    let mut raw = vec![0u8; len as usize];
    f.read_exact(&mut raw)
        .map_err(|_| bad(path, "truncated header"))?;
    let header = BackupHeader::decode(raw.as_slice()).map_err(|e| bad(path, e))?;
    let start = 12 + u64::from(len);
    let mut crc = crc32fast::Hasher::new();
    let size = for_each_chunk(f, path.display(), |chunk| {
        crc.update(chunk);
        Ok(())
    })?;
    if size != header.size {
        return Err(bad(
            path,
            format!("{size} bytes of state, the header says {}", header.size),
        ));
    }
    if crc.finalize() != header.crc {
        return Err(bad(
            path,
            "its checksum does not match (the file is damaged)",
        ));
    }
    Ok((header, start))
}

/// Makes `dir` (which must not exist, or be empty) the data directory of
/// replica `id` in a new group of `voters`, holding the backup's state.
/// Returns the backup's header.
pub fn restore(
    backup: &Path,
    dir: &Path,
    id: NodeId,
    voters: &[(NodeId, String)],
) -> Result<BackupHeader, StoreError> {
    if !voters.iter().any(|(n, _)| *n == id) {
        return Err(StoreError::InvalidArgument(format!(
            "replica {id} is not among the new group's voters"
        )));
    }
    // Built in a subdirectory and moved up at the end: `dir` may be a
    // mount point (a container's volume), which cannot be renamed.
    let work = dir.join(WORK_DIR);
    let occupied = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .any(|e| e.file_name() != WORK_DIR),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(dir.display(), e)),
    };
    if occupied {
        return Err(StoreError::FailedPrecondition(format!(
            "{} is not empty; a backup is restored only into a new data directory",
            dir.display()
        )));
    }
    let (header, start) = verify(backup)?;
    let d = Descriptor {
        index: header.index,
        term: header.term,
        size: header.size,
        crc: header.crc,
    };
    if work.exists() {
        // Left by an interrupted restore.
        std::fs::remove_dir_all(&work).map_err(|e| io(work.display(), e))?;
    }
    std::fs::create_dir_all(&work).map_err(|e| io(work.display(), e))?;
    {
        // Installed straight from the backup file, where its snapshot starts.
        let storage = crate::data_dir::open_storage(&work, RESTORE_CACHE_BYTES)?;
        LogStore::restore(
            storage.wal.as_ref(),
            storage.state.as_ref(),
            FileReader::open_at(backup, start)?,
            &d,
            id,
            voters,
        )?;
    }
    crate::data_dir::mark(&work, id)?;
    // Everything but the marker first: a directory without its marker and
    // stores is not mistaken for a replica's.
    let mut entries: Vec<_> = std::fs::read_dir(&work)
        .map_err(|e| io(work.display(), e))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    entries.sort_by_key(|name| name.as_os_str() == std::ffi::OsStr::new(crate::data_dir::MARKER));
    for name in entries {
        std::fs::rename(work.join(&name), dir.join(&name))
            .map_err(|e| io(dir.join(&name).display(), e))?;
    }
    std::fs::remove_dir(&work).map_err(|e| io(work.display(), e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir.display(), e))?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    /// A backup of a state holding one conversation record and replica 1's
    /// old address, at raft index 40, term 3.
    fn backup_file(dir: &Path) -> PathBuf {
        let snap = dir.join("state.snap");
        let pairs = vec![
            (keys::conversation("c"), b"record".to_vec()),
            (keys::replica_addr(1), b"old-host:7001".to_vec()),
        ];
        let (size, crc) = crate::snapshot::write_records(&snap, &pairs).unwrap();
        let header = BackupHeader {
            index: 40,
            term: 3,
            size,
            crc,
            ..Default::default()
        };
        let path = dir.join("b.backup");
        let mut w = BackupWriter::create(&path, header).unwrap();
        let bytes = std::fs::read(&snap).unwrap();
        for chunk in bytes.chunks(7) {
            w.write(chunk).unwrap();
        }
        w.finish().unwrap();
        path
    }

    #[test]
    fn an_offline_backup_needs_a_replicas_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = from_data_dir(dir.path(), &dir.path().join("b")).unwrap_err();
        assert!(err.to_string().contains("holds no replica data"), "{err}");
        assert!(!dir.path().join("b").exists());
    }

    #[test]
    fn a_stream_cut_short_leaves_no_backup_file() {
        let dir = tempfile::tempdir().unwrap();
        let header = BackupHeader {
            size: 100,
            crc: 1,
            ..Default::default()
        };
        let path = dir.path().join("cut.backup");
        let mut w = BackupWriter::create(&path, header).unwrap();
        w.write(&[0; 60]).unwrap();
        let err = w.finish().unwrap_err();
        assert!(
            err.to_string().contains("ended after 60 of 100 bytes"),
            "{err}"
        );
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no part file"
        );
    }

    #[test]
    fn restore_fills_an_empty_mount_point_and_replaces_the_old_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let backup = backup_file(dir.path());
        assert_eq!(verify(&backup).unwrap().0.index, 40);
        // An existing, empty directory, as a container's volume is.
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let voters = [
            (NodeId(1), "new-1:7001".to_owned()),
            (NodeId(2), "new-2:7001".to_owned()),
        ];
        restore(&backup, &data, NodeId(2), &voters).unwrap();
        assert!(!data.join(WORK_DIR).exists());
        assert!(data.join(crate::data_dir::MARKER).exists());
        let storage = crate::data_dir::open_storage(&data, 1 << 20).unwrap();
        let state = storage.state.as_ref();
        assert_eq!(
            state.get(&keys::conversation("c")).unwrap().unwrap(),
            b"record"
        );
        assert_eq!(
            state.get(&keys::replica_addr(1)).unwrap().unwrap(),
            b"new-1:7001"
        );
        assert_eq!(
            state.get(&keys::replica_addr(2)).unwrap().unwrap(),
            b"new-2:7001"
        );
        assert_eq!(
            keys::decode_pair(&state.get(keys::APPLIED).unwrap().unwrap()),
            Some((40, 3))
        );
        assert_eq!(
            keys::decode_pair(&storage.wal.get(keys::wal::TRUNCATED).unwrap()),
            Some((40, 3))
        );
        drop(storage);
        // Not again over what is there now, and not for a stranger.
        let err = restore(&backup, &data, NodeId(2), &voters).unwrap_err();
        assert!(err.to_string().contains("is not empty"), "{err}");
        let err = restore(&backup, &dir.path().join("x"), NodeId(3), &voters).unwrap_err();
        assert!(err.to_string().contains("not among"), "{err}");
    }
}
