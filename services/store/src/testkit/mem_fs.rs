//! An in-memory file system under raft-engine, for the simulator: file
//! contents live in memory, so a write costs no disk time and the same
//! operations give the same bytes on every run; each file remembers how
//! much of it the last `sync` covered, and `crash_torn` cuts every file back
//! to that (or a little past it), as losing power does (the model of `power::TrackingFs`, without
//! the disk).
//!
//! raft-engine finds its files by listing and locking the real directory
//! (`std::fs`), so every file also has an empty placeholder there; only the
//! names and the lock are on disk.

use std::collections::HashMap;
use std::io::{Error, ErrorKind, Read, Result as IoResult, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use raft_engine::env::{FileSystem, Handle, Permission, WriteExt};

#[derive(Default)]
struct Contents {
    bytes: Vec<u8>,
    /// Length the last sync covered.
    synced: usize,
}

impl Contents {
    fn truncate(&mut self, offset: usize) {
        self.bytes.truncate(offset);
        self.synced = self.synced.min(offset);
    }
}

/// One file's bytes, shared by its handle, readers and writers.
#[derive(Default)]
pub struct MemFile(Mutex<Contents>);

impl MemFile {
    fn lock(&self) -> MutexGuard<'_, Contents> {
        self.0.lock().expect("mem file lock poisoned")
    }
}

/// The files of one simulated disk.
#[derive(Clone, Default)]
pub struct MemFs {
    files: Arc<Mutex<HashMap<PathBuf, Arc<MemFile>>>>,
    /// A disk that lies: only every this-many-th sync makes anything
    /// durable, the others return at once (0: an honest disk). It shows
    /// the checkers catch what that loses.
    lies: Arc<Lies>,
}

impl MemFs {
    fn files(&self) -> MutexGuard<'_, HashMap<PathBuf, Arc<MemFile>>> {
        self.files.lock().expect("mem fs lock poisoned")
    }

    /// A crash: each file keeps what its last sync covered and
    /// `survives(unsynced bytes)` bytes of the rest (at most all of it;
    /// 0 is a clean power cut, more means part of what was written after
    /// the sync reached the platter anyway, its last write possibly torn).
    /// Call only while nothing has the files open (the engine on them was
    /// dropped). Files are taken
    /// in name order, so a seeded `survives` gives the same disk each time.
    pub fn crash_torn(&self, mut survives: impl FnMut(usize) -> usize) {
        let files = self.files();
        let mut names: Vec<&PathBuf> = files.keys().collect();
        names.sort();
        for name in names {
            let mut c = files[name].lock();
            let unsynced = c.bytes.len() - c.synced;
            let keep = c.synced + survives(unsynced).min(unsynced);
            c.bytes.truncate(keep);
        }
    }

    /// Forgets every file (the disk was replaced); the placeholders in
    /// the directory are the caller's to remove.
    pub fn wipe(&self) {
        self.files().clear();
    }

    /// From now on only one sync in `every` counts; the others return
    /// at once and cover nothing.
    pub fn lie_about_syncs(&self, every: u64) {
        self.lies.every.store(every, Ordering::Release);
    }
}

#[derive(Default)]
struct Lies {
    every: AtomicU64,
    syncs: AtomicU64,
}

impl Lies {
    /// Whether this sync is one the disk skips.
    fn skip(&self) -> bool {
        let every = self.every.load(Ordering::Acquire);
        every > 0
            && !self
                .syncs
                .fetch_add(1, Ordering::AcqRel)
                .is_multiple_of(every)
    }
}

pub struct MemHandle(Arc<MemFile>, Arc<Lies>);

impl Handle for MemHandle {
    fn truncate(&self, offset: usize) -> IoResult<()> {
        self.0.lock().truncate(offset);
        Ok(())
    }

    fn file_size(&self) -> IoResult<usize> {
        Ok(self.0.lock().bytes.len())
    }

    fn sync(&self) -> IoResult<()> {
        if self.1.skip() {
            return Ok(());
        }
        let mut c = self.0.lock();
        c.synced = c.bytes.len();
        Ok(())
    }
}

/// A reader or writer: the file and a position in it.
pub struct Cursor {
    file: Arc<MemFile>,
    pos: u64,
}

impl Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let c = self.file.lock();
        let start = (self.pos as usize).min(c.bytes.len());
        let n = buf.len().min(c.bytes.len() - start);
        buf[..n].copy_from_slice(&c.bytes[start..start + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Cursor {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        let mut c = self.file.lock();
        let start = self.pos as usize;
        let end = start + buf.len();
        if c.bytes.len() < end {
            c.bytes.resize(end, 0);
        }
        c.bytes[start..end].copy_from_slice(buf);
        self.pos = end as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> IoResult<()> {
        Ok(())
    }
}

impl Seek for Cursor {
    fn seek(&mut self, pos: SeekFrom) -> IoResult<u64> {
        let len = self.file.lock().bytes.len() as i64;
        let to = match pos {
            SeekFrom::Start(p) => p as i64,
            SeekFrom::End(d) => len + d,
            SeekFrom::Current(d) => self.pos as i64 + d,
        };
        if to < 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "seek before the start"));
        }
        self.pos = to as u64;
        Ok(self.pos)
    }
}

impl WriteExt for Cursor {
    fn truncate(&mut self, offset: usize) -> IoResult<()> {
        self.file.lock().truncate(offset);
        Ok(())
    }

    fn allocate(&mut self, _offset: usize, _size: usize) -> IoResult<()> {
        Ok(())
    }
}

impl FileSystem for MemFs {
    type Handle = MemHandle;
    type Reader = Cursor;
    type Writer = Cursor;

    fn create<P: AsRef<Path>>(&self, path: P) -> IoResult<Self::Handle> {
        std::fs::File::create(path.as_ref())?;
        let file = Arc::new(MemFile::default());
        self.files()
            .insert(path.as_ref().to_path_buf(), file.clone());
        Ok(MemHandle(file, self.lies.clone()))
    }

    fn open<P: AsRef<Path>>(&self, path: P, _perm: Permission) -> IoResult<Self::Handle> {
        let file = self.files().get(path.as_ref()).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("{} is not on the simulated disk", path.as_ref().display()),
            )
        })?;
        Ok(MemHandle(file, self.lies.clone()))
    }

    fn delete<P: AsRef<Path>>(&self, path: P) -> IoResult<()> {
        self.files().remove(path.as_ref());
        match std::fs::remove_file(path.as_ref()) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn rename<P: AsRef<Path>>(&self, src_path: P, dst_path: P) -> IoResult<()> {
        std::fs::rename(src_path.as_ref(), dst_path.as_ref())?;
        let mut files = self.files();
        if let Some(f) = files.remove(src_path.as_ref()) {
            files.insert(dst_path.as_ref().to_path_buf(), f);
        }
        Ok(())
    }

    fn new_reader(&self, handle: Arc<Self::Handle>) -> IoResult<Self::Reader> {
        Ok(Cursor {
            file: handle.0.clone(),
            pos: 0,
        })
    }

    fn new_writer(&self, handle: Arc<Self::Handle>) -> IoResult<Self::Writer> {
        Ok(Cursor {
            file: handle.0.clone(),
            pos: 0,
        })
    }
}
