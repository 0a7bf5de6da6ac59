//! Snapshots as files: built off the raft thread from a consistent point,
//! sent in chunks, installed in batches. Memory on both sides is bounded by
//! a page of keys and a chunk, not by the size of the state.
//!
//! **Consistent point without an engine snapshot.** sled has no
//! point-in-time iterator, and applying goes on while a snapshot is built.
//! A build starts on the raft thread between two applies, at applied index
//! I, by opening an *overlay*; from then on every state write first records
//! the before-image of each key it touches that the overlay does not hold
//! yet (`capture`). The builder thread scans the live engine page by page
//! and writes, for each key, its before-image if the overlay has one (none:
//! the key did not exist at I), else the value it read: a value read before
//! a later overwrite is the value at I, and one read after it is replaced
//! by the before-image recorded before that overwrite. Keys deleted before
//! the scan reached them are written from the overlay at the end (a key may
//! then appear twice, always with the same value). The overlay holds only
//! the keys written during the build.
//!
//! **File.** `MAGIC`, then records `[key len u32][value len u32][key][value]`
//! (big-endian). A [`Descriptor`] (index, term, size, CRC-32 of the file) is
//! what travels in raft's snapshot message; the file goes beside it, in
//! chunks, resumable from what the receiver already holds (see
//! `transport`). The receiver checks size and checksum before the raft
//! message is stepped, so raft only ever sees snapshots whose data is here.
//!
//! **Install** (`LogStore::install_snapshot`) replaces the state in batches
//! under a marker; a crash in between is finished from the same file when
//! the replica restarts.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use raft::eraftpb::{ConfState, Snapshot, SnapshotMetadata};
use tracing::{debug, info, warn};

use crate::engine::{Engine, Pair, WriteBatch, WriteOp, prefix_end};
use crate::error::StoreError;
use crate::keys;

/// The directory under a data directory that holds snapshot files.
pub const SNAP_DIR: &str = "snap";
const INCOMING: &str = "incoming";
const MAGIC: &[u8; 8] = b"CHATSNP1";
const DESCRIPTOR_TAG: &[u8; 4] = b"SNF1";
/// Keys read from the engine per step of a build.
const PAGE: usize = 256;
/// Largest key or value a snapshot record may carry.
const MAX_RECORD: u32 = 256 << 20;

fn io(what: impl std::fmt::Display, e: std::io::Error) -> StoreError {
    StoreError::Storage(format!("{what}: {e}"))
}

/// What a raft snapshot message carries: which file, and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub index: u64,
    pub term: u64,
    pub size: u64,
    pub crc: u32,
}

impl Descriptor {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        out.extend_from_slice(DESCRIPTOR_TAG);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.term.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crc.to_be_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Self, StoreError> {
        if raw.len() != 32 || &raw[..4] != DESCRIPTOR_TAG {
            return Err(StoreError::InvalidArgument(
                "snapshot message does not describe a snapshot file".into(),
            ));
        }
        let u64_at = |i: usize| u64::from_be_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            index: u64_at(4),
            term: u64_at(12),
            size: u64_at(20),
            crc: u32::from_be_bytes(raw[28..32].try_into().expect("4 bytes")),
        })
    }

    fn stem(&self) -> String {
        format!("{:020}-{:020}-{:08x}", self.index, self.term, self.crc)
    }
}

/// Writes a snapshot file.
struct FileWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    size: u64,
    path: PathBuf,
}

impl FileWriter {
    fn create(path: &Path) -> Result<Self, StoreError> {
        let file = File::create(path).map_err(|e| io(path.display(), e))?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            size: 0,
            path: path.to_owned(),
        };
        w.put(MAGIC)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.out
            .write_all(bytes)
            .map_err(|e| io(self.path.display(), e))?;
        self.crc.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn record(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put(&(key.len() as u32).to_be_bytes())?;
        self.put(&(value.len() as u32).to_be_bytes())?;
        self.put(key)?;
        self.put(value)
    }

    /// Flushes and fsyncs; returns size and checksum.
    fn finish(self) -> Result<(u64, u32), StoreError> {
        let path = self.path;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io(path.display(), e.into_error()))?;
        file.sync_all().map_err(|e| io(path.display(), e))?;
        Ok((self.size, self.crc.finalize()))
    }
}

/// Reads the records of a snapshot file.
pub struct FileReader {
    inp: BufReader<File>,
    path: PathBuf,
}

impl FileReader {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_at(path, 0)
    }

    /// A snapshot that starts `offset` bytes into the file (a backup's).
    pub fn open_at(path: &Path, offset: u64) -> Result<Self, StoreError> {
        let mut file = File::open(path).map_err(|e| io(path.display(), e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| io(path.display(), e))?;
        let mut r = Self {
            inp: BufReader::with_capacity(1 << 20, file),
            path: path.to_owned(),
        };
        let mut magic = [0u8; 8];
        r.inp
            .read_exact(&mut magic)
            .map_err(|e| io(r.path.display(), e))?;
        if &magic != MAGIC {
            return Err(StoreError::Storage(format!(
                "{} is not a snapshot file",
                r.path.display()
            )));
        }
        Ok(r)
    }

    /// The next record, or None at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<Pair>, StoreError> {
        let mut lens = [0u8; 8];
        match self.inp.read_exact(&mut lens[..1]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io(self.path.display(), e)),
        }
        self.inp
            .read_exact(&mut lens[1..])
            .map_err(|e| io(self.path.display(), e))?;
        let klen = u32::from_be_bytes(lens[..4].try_into().expect("4 bytes"));
        let vlen = u32::from_be_bytes(lens[4..].try_into().expect("4 bytes"));
        if klen > MAX_RECORD || vlen > MAX_RECORD {
            return Err(StoreError::Storage(format!(
                "{}: record of {klen} + {vlen} bytes is corrupt",
                self.path.display()
            )));
        }
        let mut key = vec![0u8; klen as usize];
        let mut value = vec![0u8; vlen as usize];
        self.inp
            .read_exact(&mut key)
            .and_then(|()| self.inp.read_exact(&mut value))
            .map_err(|e| io(self.path.display(), e))?;
        Ok(Some((key, value)))
    }
}

/// Size and CRC-32 of a file's contents.
pub fn checksum(path: &Path) -> Result<(u64, u32), StoreError> {
    let file = File::open(path).map_err(|e| io(path.display(), e))?;
    let mut crc = crc32fast::Hasher::new();
    let size = for_each_chunk(file, path.display(), |chunk| {
        crc.update(chunk);
        Ok(())
    })?;
    Ok((size, crc.finalize()))
}

/// Reads `from` to its end in chunks of up to 1 MiB, handing each to
/// `each`; returns the bytes read. `what` names the source in errors.
pub(crate) fn for_each_chunk(
    mut from: impl Read,
    what: impl std::fmt::Display,
    mut each: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf).map_err(|e| io(&what, e))?;
        if n == 0 {
            return Ok(size);
        }
        each(&buf[..n])?;
        size += n as u64;
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir.display(), e))
}

/// Before-images of the keys written since a build started (None: the key
/// did not exist).
type Overlay = HashMap<Vec<u8>, Option<Vec<u8>>>;

#[derive(Default)]
struct Inner {
    /// Bumped when a build starts or is abandoned; a builder whose
    /// generation is gone throws its file away.
    generation: u64,
    /// Open while a build runs.
    overlay: Option<Overlay>,
    building: Option<u64>,
    /// The newest complete snapshot, ready to send.
    ready: Option<(Descriptor, SnapshotMetadata)>,
    /// A build started and not yet run, when builds are deferred.
    deferred: Option<(u64, SnapshotMetadata)>,
}

impl Inner {
    /// Starts a build at `index`: from now on writes keep before-images.
    /// Returns the build's generation.
    fn open_overlay(&mut self, index: u64) -> u64 {
        self.generation += 1;
        self.overlay = Some(Overlay::new());
        self.building = Some(index);
        self.generation
    }
}

/// A replica's snapshot files: the one it sends, those it receives.
pub struct Snapshots {
    dir: PathBuf,
    state: Arc<dyn Engine>,
    inner: Mutex<Inner>,
    /// Builds run when `run_deferred_build` is called (the simulator's
    /// choice of when) instead of on a thread of their own.
    defer_builds: bool,
}

impl Snapshots {
    /// Opens `dir`, removing what a previous run left half-written and any
    /// snapshot built to send (rebuilt on demand); received files stay, as
    /// an interrupted install is finished from its file.
    pub fn open(dir: &Path, state: Arc<dyn Engine>) -> Result<Arc<Self>, StoreError> {
        Self::open_with(dir, state, false)
    }

    /// `open`, with builds that run only when `run_deferred_build` is
    /// called, on the caller's thread.
    pub fn open_deferred(dir: &Path, state: Arc<dyn Engine>) -> Result<Arc<Self>, StoreError> {
        Self::open_with(dir, state, true)
    }

    fn open_with(
        dir: &Path,
        state: Arc<dyn Engine>,
        defer_builds: bool,
    ) -> Result<Arc<Self>, StoreError> {
        let incoming = dir.join(INCOMING);
        std::fs::create_dir_all(&incoming).map_err(|e| io(incoming.display(), e))?;
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir.display(), e))? {
            let path = entry.map_err(|e| io(dir.display(), e))?.path();
            if path.is_file() {
                std::fs::remove_file(&path).map_err(|e| io(path.display(), e))?;
            }
        }
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            state,
            inner: Mutex::default(),
            defer_builds,
        }))
    }

    /// Whether a deferred build waits to be run.
    pub fn has_deferred_build(&self) -> bool {
        self.lock().deferred.is_some()
    }

    /// Runs the deferred build, if there is one (from the state as of its
    /// start, whatever was applied since).
    pub fn run_deferred_build(self: &Arc<Self>) {
        let pending = self.lock().deferred.take();
        if let Some((generation, meta)) = pending {
            self.clone().build(generation, meta);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("snapshot lock poisoned")
    }

    /// The file of a snapshot this replica built.
    pub fn outgoing(&self, d: &Descriptor) -> PathBuf {
        self.dir.join(format!("{}.snap", d.stem()))
    }

    /// Where a snapshot being received is written.
    pub fn partial(&self, d: &Descriptor) -> PathBuf {
        self.dir.join(INCOMING).join(format!("{}.part", d.stem()))
    }

    /// The complete, checked file of a received snapshot.
    pub fn received(&self, d: &Descriptor) -> PathBuf {
        self.dir.join(INCOMING).join(format!("{}.snap", d.stem()))
    }

    /// A snapshot at or after `min_index`, if one is built; otherwise
    /// starts a build at `applied` (call on the raft thread, between
    /// applies, so that `applied` and `conf_state` match the engine) and
    /// returns None: raft asks again.
    ///
    /// A snapshot for `for_replica` must name it among its voters or
    /// learners: raft-rs refuses one that does not, so a replica added
    /// after the built snapshot was taken would be sent it forever. Such a
    /// snapshot is rebuilt (unless the state has not moved since).
    pub fn get_or_build(
        self: &Arc<Self>,
        min_index: u64,
        for_replica: Option<u64>,
        applied: (u64, u64),
        conf_state: &ConfState,
    ) -> Result<Option<Snapshot>, StoreError> {
        let mut inner = self.lock();
        if let Some((d, meta)) = &inner.ready
            && d.index >= min_index
            && (d.index >= applied.0
                || for_replica.is_none_or(|id| {
                    let cs = meta.get_conf_state();
                    cs.voters.contains(&id) || cs.learners.contains(&id)
                }))
        {
            let mut snap = Snapshot::default();
            snap.data = d.encode().into();
            snap.set_metadata(meta.clone());
            return Ok(Some(snap));
        }
        if inner.building.is_some() {
            return Ok(None);
        }
        let generation = inner.open_overlay(applied.0);
        drop(inner);
        let mut meta = SnapshotMetadata::default();
        meta.index = applied.0;
        meta.term = applied.1;
        meta.set_conf_state(conf_state.clone());
        if self.defer_builds {
            self.lock().deferred = Some((generation, meta));
            return Ok(None);
        }
        let this = self.clone();
        std::thread::Builder::new()
            .name("snapshot-build".into())
            .spawn(move || this.build(generation, meta))
            .map_err(|e| io("cannot start the snapshot builder", e))?;
        info!(index = applied.0, "building a snapshot");
        Ok(None)
    }

    /// Records the before-images of the keys `batch` is about to change,
    /// while a build runs. Call before writing `batch` to the engine.
    pub fn capture(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(overlay) = inner.overlay.as_mut() else {
            return Ok(());
        };
        for op in &batch.ops {
            let key = match op {
                WriteOp::Put(k, _) | WriteOp::Delete(k) => k,
                WriteOp::DeleteRange(..) => {
                    // Only a snapshot install deletes ranges, and it
                    // abandons the build first.
                    return Err(StoreError::Storage(
                        "range deletion while a snapshot is being built".into(),
                    ));
                }
            };
            if !overlay.contains_key(key) {
                overlay.insert(key.clone(), self.state.get(key)?);
            }
        }
        Ok(())
    }

    /// Stops a build and drops the snapshot ready to send: the state is
    /// about to be replaced.
    pub fn abandon(&self) {
        {
            let mut inner = self.lock();
            if inner.building.is_some() {
                warn!("state replaced while a snapshot was being built; build abandoned");
            }
            inner.overlay = None;
            inner.building = None;
            inner.deferred = None;
            inner.generation += 1;
        }
        self.release();
    }

    /// Whether a build is running.
    pub fn building(&self) -> bool {
        self.lock().building.is_some()
    }

    /// The index of the snapshot being built or ready to send: the log must
    /// keep the entries after it while a follower catches up from it.
    pub fn pinned(&self) -> Option<u64> {
        let inner = self.lock();
        inner
            .building
            .or(inner.ready.as_ref().map(|(d, _)| d.index))
    }

    /// Drops the snapshot built to send (no follower needs it any more).
    pub fn release(&self) {
        let mut inner = self.lock();
        if let Some((d, _)) = inner.ready.take() {
            let _ = std::fs::remove_file(self.outgoing(&d));
        }
    }

    fn build(self: Arc<Self>, generation: u64, meta: SnapshotMetadata) {
        let started = std::time::Instant::now();
        let tmp = self.dir.join(format!("{generation}.tmp"));
        match self.write_file(generation, &tmp, &meta) {
            Ok(Some(d)) => {
                let path = self.outgoing(&d);
                let done = std::fs::rename(&tmp, &path)
                    .map_err(|e| io(path.display(), e))
                    .and_then(|()| sync_dir(&self.dir));
                let mut inner = self.lock();
                if inner.generation != generation {
                    let _ = std::fs::remove_file(&path);
                    return;
                }
                inner.overlay = None;
                inner.building = None;
                match done {
                    Ok(()) => {
                        info!(
                            index = d.index,
                            bytes = d.size,
                            millis = started.elapsed().as_millis() as u64,
                            "snapshot built"
                        );
                        if let Some((old, _)) = inner.ready.replace((d, meta)) {
                            let _ = std::fs::remove_file(self.outgoing(&old));
                        }
                    }
                    Err(e) => warn!(error = %e, "snapshot build failed"),
                }
            }
            Ok(None) => {
                debug!("snapshot build abandoned");
                let _ = std::fs::remove_file(&tmp);
            }
            Err(e) => {
                warn!(error = %e, "snapshot build failed");
                let _ = std::fs::remove_file(&tmp);
                let mut inner = self.lock();
                if inner.generation == generation {
                    inner.overlay = None;
                    inner.building = None;
                }
            }
        }
    }

    /// Writes the state as of the build's start; None if the build was
    /// abandoned meanwhile.
    fn write_file(
        &self,
        generation: u64,
        path: &Path,
        meta: &SnapshotMetadata,
    ) -> Result<Option<Descriptor>, StoreError> {
        let mut out = FileWriter::create(path)?;
        let complete = scan_state(self.state.as_ref(), |page| {
            let resolved: Vec<Pair> = {
                let inner = self.lock();
                if inner.generation != generation {
                    return Ok(false);
                }
                let overlay = inner.overlay.as_ref().expect("overlay open while building");
                page.into_iter()
                    .filter_map(|(k, v)| match overlay.get(&k) {
                        Some(Some(before)) => Some((k, before.clone())),
                        Some(None) => None,
                        None => Some((k, v)),
                    })
                    .collect()
            };
            for (k, v) in &resolved {
                out.record(k, v)?;
            }
            Ok(true)
        })?;
        if !complete {
            return Ok(None);
        }
        let deleted: Vec<Pair> = {
            let inner = self.lock();
            if inner.generation != generation {
                return Ok(None);
            }
            let overlay = inner.overlay.as_ref().expect("overlay open while building");
            overlay
                .iter()
                .filter_map(|(k, before)| Some((k.clone(), before.clone()?)))
                .filter(|(k, _)| k.starts_with(keys::STATE_PREFIX))
                .collect()
        };
        for (k, v) in &deleted {
            out.record(k, v)?;
        }
        let (size, crc) = out.finish()?;
        Ok(Some(Descriptor {
            index: meta.index,
            term: meta.term,
            size,
            crc,
        }))
    }

    /// Bytes of `d` already received (0 if none), and whether the file is
    /// complete and checked.
    pub fn progress(&self, d: &Descriptor) -> Result<(u64, bool), StoreError> {
        if self.received(d).exists() {
            return Ok((d.size, true));
        }
        match std::fs::metadata(self.partial(d)) {
            Ok(m) => Ok((m.len().min(d.size), false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, false)),
            Err(e) => Err(io(self.partial(d).display(), e)),
        }
    }

    /// Writes a chunk of `d` received at `offset`, which must be where the
    /// partial file ends. When the file is complete its size and checksum
    /// are checked and it becomes `received(d)`. Other partial files are
    /// removed when a new transfer starts. Returns the bytes now held and
    /// whether the file is complete.
    pub fn receive_chunk(
        &self,
        d: &Descriptor,
        offset: u64,
        data: &[u8],
    ) -> Result<(u64, bool), StoreError> {
        let partial = self.partial(d);
        if offset == 0 {
            let incoming = self.dir.join(INCOMING);
            for entry in std::fs::read_dir(&incoming).map_err(|e| io(incoming.display(), e))? {
                let path = entry.map_err(|e| io(incoming.display(), e))?.path();
                if path.extension().is_some_and(|x| x == "part") && path != partial {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let (held, complete) = self.progress(d)?;
        if complete {
            return Ok((held, true));
        }
        if offset != held {
            return Err(StoreError::FailedPrecondition(format!(
                "snapshot chunk at {offset}, but {held} bytes are held: resume from {held}"
            )));
        }
        if held + data.len() as u64 > d.size {
            return Err(StoreError::InvalidArgument(format!(
                "snapshot chunk runs past the file's {} bytes",
                d.size
            )));
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .map_err(|e| io(partial.display(), e))?;
        file.seek(SeekFrom::End(0))
            .and_then(|_| file.write_all(data))
            .map_err(|e| io(partial.display(), e))?;
        let held = held + data.len() as u64;
        if held < d.size {
            return Ok((held, false));
        }
        file.sync_all().map_err(|e| io(partial.display(), e))?;
        let (size, crc) = checksum(&partial)?;
        if (size, crc) != (d.size, d.crc) {
            let _ = std::fs::remove_file(&partial);
            return Err(StoreError::Storage(format!(
                "snapshot file arrived damaged (size {size}, crc {crc:08x}; expected {}, {:08x}); it will be sent again",
                d.size, d.crc
            )));
        }
        let done = self.received(d);
        std::fs::rename(&partial, &done).map_err(|e| io(done.display(), e))?;
        sync_dir(&self.dir.join(INCOMING))?;
        Ok((held, true))
    }

    /// Removes every received file (after an install).
    pub fn clear_incoming(&self) {
        let incoming = self.dir.join(INCOMING);
        if let Ok(entries) = std::fs::read_dir(&incoming) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Writes the whole state machine of a stopped replica's engine as a
/// snapshot file (nothing writes to it meanwhile, so no overlay is needed);
/// returns size and checksum.
pub fn write_state(state: &dyn Engine, path: &Path) -> Result<(u64, u32), StoreError> {
    let mut out = FileWriter::create(path)?;
    scan_state(state, |page| {
        for (k, v) in &page {
            out.record(k, v)?;
        }
        Ok(true)
    })?;
    out.finish()
}

/// Hands the state machine's records to `each` a page at a time, in key
/// order, until it returns false; returns whether every page was handed.
fn scan_state(
    state: &dyn Engine,
    mut each: impl FnMut(Vec<Pair>) -> Result<bool, StoreError>,
) -> Result<bool, StoreError> {
    let end = prefix_end(keys::STATE_PREFIX);
    let mut start = keys::STATE_PREFIX.to_vec();
    loop {
        let page = state.scan(&start, &end, false, PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(true);
        };
        start = last.clone();
        start.push(0);
        if !each(page)? {
            return Ok(false);
        }
    }
}

/// Writes `pairs` as a snapshot file (tests); returns size and checksum.
#[cfg(test)]
pub fn write_records(path: &Path, pairs: &[Pair]) -> Result<(u64, u32), StoreError> {
    let mut out = FileWriter::create(path)?;
    for (k, v) in pairs {
        out.record(k, v)?;
    }
    out.finish()
}

/// Reads every record of a snapshot file (tests).
#[cfg(test)]
pub fn read_all(path: &Path) -> Result<Vec<Pair>, StoreError> {
    let mut r = FileReader::open(path)?;
    let mut out = Vec::new();
    while let Some(p) = r.next_record()? {
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;

    fn state_with(pairs: &[(&str, &str)]) -> Arc<dyn Engine> {
        let e: Arc<dyn Engine> = Arc::new(MemEngine::default());
        let mut b = WriteBatch::default();
        for (k, v) in pairs {
            b.put(k.as_bytes(), v.as_bytes());
        }
        e.write(b).unwrap();
        e
    }

    fn wait_built(s: &Arc<Snapshots>, min_index: u64, applied: (u64, u64)) -> Snapshot {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(snap) = s
                .get_or_build(min_index, None, applied, &ConfState::default())
                .unwrap()
            {
                return snap;
            }
            assert!(std::time::Instant::now() < deadline, "snapshot never built");
            std::thread::yield_now();
        }
    }

    fn sorted_unique(mut pairs: Vec<Pair>) -> Vec<Pair> {
        pairs.sort();
        pairs.dedup();
        pairs
    }

    #[test]
    fn a_descriptor_round_trips_and_garbage_is_refused() {
        let d = Descriptor {
            index: 7,
            term: 3,
            size: 1 << 33,
            crc: 0xdead_beef,
        };
        assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
        assert!(Descriptor::decode(b"whole state in here").is_err());
    }

    #[test]
    fn a_build_holds_the_state_as_of_its_start_whatever_is_written_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(&[("s/a", "1"), ("s/b", "2"), ("s/c", "3"), ("m/x", "meta")]);
        let snaps = Snapshots::open(dir.path(), state.clone()).unwrap();
        // Open the overlay as `get_or_build` does, write through `capture`
        // as the apply path does, then run the build.
        let generation = snaps.lock().open_overlay(5);
        let mut b = WriteBatch::default();
        b.put(b"s/a".to_vec(), b"changed".to_vec());
        b.delete(b"s/b".to_vec());
        b.put(b"s/new".to_vec(), b"later".to_vec());
        snaps.capture(&b).unwrap();
        state.write(b).unwrap();
        let mut meta = SnapshotMetadata::default();
        meta.index = 5;
        meta.term = 2;
        let path = dir.path().join("t.tmp");
        let d = snaps
            .write_file(generation, &path, &meta)
            .unwrap()
            .expect("not abandoned");
        assert_eq!((d.index, d.term), (5, 2));
        assert_eq!(checksum(&path).unwrap(), (d.size, d.crc));
        let pairs = sorted_unique(read_all(&path).unwrap());
        let expect: Vec<Pair> = [("s/a", "1"), ("s/b", "2"), ("s/c", "3")]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(pairs, expect);
    }

    #[test]
    fn a_snapshot_is_built_off_the_caller_thread_and_offered_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(&[("s/k1", "v1"), ("s/k2", "v2")]);
        let snaps = Snapshots::open(dir.path(), state).unwrap();
        assert!(
            snaps
                .get_or_build(0, None, (9, 4), &ConfState::default())
                .unwrap()
                .is_none(),
            "the first request only starts a build"
        );
        let snap = wait_built(&snaps, 0, (9, 4));
        assert_eq!(snap.get_metadata().index, 9);
        let d = Descriptor::decode(&snap.data).unwrap();
        assert_eq!(snaps.pinned(), Some(9));
        let pairs = read_all(&snaps.outgoing(&d)).unwrap();
        assert_eq!(pairs.len(), 2);
        // A follower needing more than it holds gets a new build.
        assert!(
            snaps
                .get_or_build(10, None, (12, 4), &ConfState::default())
                .unwrap()
                .is_none()
        );
        let newer = wait_built(&snaps, 10, (12, 4));
        assert_eq!(newer.get_metadata().index, 12);
        assert!(!snaps.outgoing(&d).exists(), "the older file is removed");
        snaps.release();
        assert_eq!(snaps.pinned(), None);
    }

    #[test]
    fn a_replica_added_after_a_snapshot_was_built_gets_one_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(&[("s/k1", "v1")]);
        let snaps = Snapshots::open_deferred(dir.path(), state).unwrap();
        let conf = |voters: &[u64], learners: &[u64]| {
            let mut cs = ConfState::default();
            cs.voters = voters.to_vec();
            cs.learners = learners.to_vec();
            cs
        };
        let old = conf(&[1, 2, 3], &[]);
        assert!(
            snaps
                .get_or_build(0, Some(2), (9, 4), &old)
                .unwrap()
                .is_none()
        );
        snaps.run_deferred_build();
        let built = snaps.get_or_build(0, Some(2), (9, 4), &old).unwrap();
        assert_eq!(built.expect("built").get_metadata().index, 9);
        // Replica 4 joined as a learner at 11: the snapshot at 9 does not
        // name it (raft-rs would refuse it), so a new one is built for it,
        // while replica 2 may still have the one at 9.
        let new = conf(&[1, 2, 3], &[4]);
        assert!(
            snaps
                .get_or_build(0, Some(4), (12, 4), &new)
                .unwrap()
                .is_none()
        );
        snaps.run_deferred_build();
        let rebuilt = snaps
            .get_or_build(0, Some(4), (12, 4), &new)
            .unwrap()
            .expect("rebuilt");
        assert_eq!(rebuilt.get_metadata().index, 12);
        assert!(
            rebuilt
                .get_metadata()
                .get_conf_state()
                .learners
                .contains(&4)
        );
    }

    #[test]
    fn a_transfer_resumes_where_it_stopped_and_a_damaged_file_is_refused() {
        let src = tempfile::tempdir().unwrap();
        let state = state_with(&[("s/k", "value"), ("s/l", "another value")]);
        let sender = Snapshots::open(src.path(), state).unwrap();
        sender
            .get_or_build(0, None, (3, 1), &ConfState::default())
            .unwrap();
        let snap = wait_built(&sender, 0, (3, 1));
        let d = Descriptor::decode(&snap.data).unwrap();
        let bytes = std::fs::read(sender.outgoing(&d)).unwrap();

        let dst = tempfile::tempdir().unwrap();
        let receiver = Snapshots::open(dst.path(), state_with(&[])).unwrap();
        assert_eq!(receiver.progress(&d).unwrap(), (0, false));
        let half = bytes.len() / 2;
        assert_eq!(
            receiver.receive_chunk(&d, 0, &bytes[..half]).unwrap(),
            (half as u64, false)
        );
        // A sender that lost track resends from the start: refused, with
        // where to resume.
        match receiver.receive_chunk(&d, 0, &bytes[..half]) {
            Err(StoreError::FailedPrecondition(msg)) => {
                assert!(msg.contains(&format!("resume from {half}")), "{msg}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(receiver.progress(&d).unwrap(), (half as u64, false));
        assert_eq!(
            receiver
                .receive_chunk(&d, half as u64, &bytes[half..])
                .unwrap(),
            (d.size, true)
        );
        assert_eq!(read_all(&receiver.received(&d)).unwrap().len(), 2);

        // Damaged in transit: refused, and the partial file is dropped so
        // that the next attempt starts clean.
        let mut other = d;
        other.crc ^= 1;
        let err = receiver.receive_chunk(&other, 0, &bytes).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        assert_eq!(receiver.progress(&other).unwrap(), (0, false));
    }
}
