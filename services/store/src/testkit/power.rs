//! Power cuts for tests: a file system under the WAL that remembers how much
//! of each file an fdatasync covered, and a state engine (`MemEngine`) that
//! remembers what its last sync covered. `PowerCutDisk::power_cut` drops
//! every byte and every write that no sync covered, as losing power does.
//!
//! The model: a file keeps the bytes up to the furthest offset written
//! before its last `sync`; anything written after that is gone. (It does
//! not model reordered or torn sector writes below that point, which a real
//! drive with a volatile cache can also produce.)

use std::collections::HashMap;
use std::io::{Result as IoResult, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use raft_engine::env::{DefaultFileSystem, FileSystem, Handle, Permission, WriteExt};

use crate::engine::MemEngine;
use crate::error::StoreError;
use crate::replica::Storage;
use crate::wal::RaftEngineWal;

#[derive(Default)]
struct FileState {
    /// Furthest offset written.
    written: AtomicU64,
    /// `written` as of the last sync.
    synced: AtomicU64,
}

/// A file system that tracks, per file, how much a sync covered.
pub struct TrackingFs {
    inner: DefaultFileSystem,
    files: Mutex<HashMap<PathBuf, Arc<FileState>>>,
    /// Power is going: syncs from now on do not count.
    frozen: AtomicBool,
    /// fdatasyncs so far.
    syncs: AtomicU64,
}

impl Default for TrackingFs {
    fn default() -> Self {
        Self {
            inner: DefaultFileSystem,
            files: Mutex::default(),
            frozen: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
        }
    }
}

impl TrackingFs {
    fn state(&self, path: &Path) -> Arc<FileState> {
        self.files
            .lock()
            .expect("tracking fs lock poisoned")
            .entry(path.to_path_buf())
            .or_default()
            .clone()
    }

    /// Cuts every tracked file back to what its last sync covered. Call
    /// only while nothing has the files open.
    pub fn power_cut(&self) -> IoResult<()> {
        let files = self.files.lock().expect("tracking fs lock poisoned");
        for (path, st) in files.iter() {
            let keep = st.synced.load(Ordering::Acquire);
            match std::fs::OpenOptions::new().write(true).open(path) {
                Ok(f) => {
                    let len = f.metadata()?.len();
                    if len > keep {
                        f.set_len(keep)?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            st.written.store(keep, Ordering::Release);
        }
        self.frozen.store(false, Ordering::Release);
        Ok(())
    }
}

pub struct TrackedHandle {
    inner: Arc<<DefaultFileSystem as FileSystem>::Handle>,
    state: Arc<FileState>,
    fs: Arc<TrackingFs>,
}

impl Handle for TrackedHandle {
    fn truncate(&self, offset: usize) -> IoResult<()> {
        self.inner.truncate(offset)?;
        let offset = offset as u64;
        self.state.written.fetch_min(offset, Ordering::AcqRel);
        self.state.synced.fetch_min(offset, Ordering::AcqRel);
        Ok(())
    }

    fn file_size(&self) -> IoResult<usize> {
        self.inner.file_size()
    }

    fn sync(&self) -> IoResult<()> {
        let written = self.state.written.load(Ordering::Acquire);
        self.inner.sync()?;
        if self.fs.frozen.load(Ordering::Acquire) {
            return Ok(());
        }
        self.state.synced.fetch_max(written, Ordering::AcqRel);
        self.fs.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

pub struct TrackedWriter {
    inner: <DefaultFileSystem as FileSystem>::Writer,
    pos: u64,
    state: Arc<FileState>,
}

impl Write for TrackedWriter {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        self.state.written.fetch_max(self.pos, Ordering::AcqRel);
        Ok(n)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.inner.flush()
    }
}

impl Seek for TrackedWriter {
    fn seek(&mut self, pos: SeekFrom) -> IoResult<u64> {
        self.pos = self.inner.seek(pos)?;
        Ok(self.pos)
    }
}

impl WriteExt for TrackedWriter {
    fn truncate(&mut self, offset: usize) -> IoResult<()> {
        self.inner.truncate(offset)?;
        let offset = offset as u64;
        self.state.written.fetch_min(offset, Ordering::AcqRel);
        self.state.synced.fetch_min(offset, Ordering::AcqRel);
        Ok(())
    }

    fn allocate(&mut self, offset: usize, size: usize) -> IoResult<()> {
        self.inner.allocate(offset, size)
    }
}

/// raft-engine's view of a `TrackingFs`.
pub struct TrackingFileSystem {
    fs: Arc<TrackingFs>,
}

impl FileSystem for TrackingFileSystem {
    type Handle = TrackedHandle;
    type Reader = <DefaultFileSystem as FileSystem>::Reader;
    type Writer = TrackedWriter;

    fn create<P: AsRef<Path>>(&self, path: P) -> IoResult<Self::Handle> {
        let inner = Arc::new(self.fs.inner.create(path.as_ref())?);
        let state = self.fs.state(path.as_ref());
        state.written.store(0, Ordering::Release);
        state.synced.store(0, Ordering::Release);
        Ok(TrackedHandle {
            inner,
            state,
            fs: self.fs.clone(),
        })
    }

    fn open<P: AsRef<Path>>(&self, path: P, perm: Permission) -> IoResult<Self::Handle> {
        let inner = self.fs.inner.open(path.as_ref(), perm)?;
        let state = self.fs.state(path.as_ref());
        // A file found on disk at open is durable as it is.
        let len = inner.file_size()? as u64;
        state.written.fetch_max(len, Ordering::AcqRel);
        state.synced.fetch_max(len, Ordering::AcqRel);
        Ok(TrackedHandle {
            inner: Arc::new(inner),
            state,
            fs: self.fs.clone(),
        })
    }

    fn delete<P: AsRef<Path>>(&self, path: P) -> IoResult<()> {
        self.fs
            .files
            .lock()
            .expect("tracking fs lock poisoned")
            .remove(path.as_ref());
        self.fs.inner.delete(path)
    }

    fn rename<P: AsRef<Path>>(&self, src_path: P, dst_path: P) -> IoResult<()> {
        self.fs.inner.rename(src_path.as_ref(), dst_path.as_ref())?;
        let mut files = self.fs.files.lock().expect("tracking fs lock poisoned");
        if let Some(st) = files.remove(src_path.as_ref()) {
            files.insert(dst_path.as_ref().to_path_buf(), st);
        }
        Ok(())
    }

    fn new_reader(&self, handle: Arc<Self::Handle>) -> IoResult<Self::Reader> {
        self.fs.inner.new_reader(handle.inner.clone())
    }

    fn new_writer(&self, handle: Arc<Self::Handle>) -> IoResult<Self::Writer> {
        Ok(TrackedWriter {
            inner: self.fs.inner.new_writer(handle.inner.clone())?,
            pos: 0,
            state: handle.state.clone(),
        })
    }
}

/// One replica's disk under power-cut control: a WAL directory on the
/// tracking file system and an in-memory state engine.
#[derive(Clone)]
pub struct PowerCutDisk {
    fs: Arc<TrackingFs>,
    state: MemEngine,
}

impl Default for PowerCutDisk {
    fn default() -> Self {
        Self::new()
    }
}

impl PowerCutDisk {
    pub fn new() -> Self {
        Self {
            fs: Arc::new(TrackingFs::default()),
            state: MemEngine::new(),
        }
    }

    /// Opens the stores with the WAL in `wal_dir`.
    pub fn open(&self, wal_dir: &Path) -> Result<Storage, StoreError> {
        let fs = TrackingFileSystem {
            fs: self.fs.clone(),
        };
        let wal = RaftEngineWal::open_with(wal_dir, Arc::new(fs))?;
        Ok(Storage {
            wal: Arc::new(wal),
            state: Arc::new(self.state.clone()),
            snapshot_dir: wal_dir.with_file_name(crate::snapshot::SNAP_DIR),
        })
    }

    /// The applied index the state engine holds.
    pub fn state_applied(&self) -> Option<u64> {
        use crate::engine::Engine as _;
        let raw = self.state.get(crate::keys::APPLIED).ok()??;
        Some(crate::keys::decode_pair(&raw)?.0)
    }

    /// fdatasyncs of WAL files so far.
    pub fn wal_syncs(&self) -> u64 {
        self.fs.syncs.load(Ordering::Relaxed)
    }

    /// The moment power goes: syncs after this (by a replica being torn
    /// down, which a real power cut would not let run) do not count.
    pub fn freeze(&self) {
        self.fs.frozen.store(true, Ordering::Release);
        self.state.freeze();
    }

    /// Loses every byte of the WAL and every write of the state that no
    /// sync before `freeze` covered. The replica using this disk must be
    /// stopped first.
    pub fn power_cut(&self) -> Result<(), StoreError> {
        self.fs
            .power_cut()
            .map_err(|e| StoreError::Storage(format!("power cut: {e}")))?;
        self.state.power_cut();
        Ok(())
    }
}
