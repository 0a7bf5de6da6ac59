//! Background durability of the state machine.
//!
//! Entries are applied to the state engine without a sync: the WAL already
//! made them durable, and syncing the state on the ack path would cost a
//! second fsync per batch. Instead this thread, every `interval`, reads the
//! applied index, syncs the state engine (which then covers everything
//! applied up to that index) and publishes the index as the durable
//! checkpoint. The driver compacts the log only below it, so after a crash
//! the replica can always re-apply from the WAL what the state lost.
//!
//! With `SyncMode::Interval` the WAL is not synced on the write path and
//! this thread syncs it too, every `wal_interval`.
//!
//! Architecture Invariant: the checkpoint index never passes an index
//! whose state writes an fsync of the state engine has not covered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use tracing::{error, warn};

use crate::error::StoreError;
use crate::log_store::LogStore;

/// The durable checkpoint, shared between the checkpointer and the driver.
#[derive(Clone, Default)]
pub struct Durable(Arc<AtomicU64>);

impl Durable {
    pub fn new(index: u64) -> Self {
        Self(Arc::new(AtomicU64::new(index)))
    }

    /// Highest applied index the state engine has made durable.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn raise(&self, index: u64) {
        self.0.fetch_max(index, Ordering::AcqRel);
    }
}

/// Syncs the state engine now and records the checkpoint it covers.
pub fn checkpoint(log: &LogStore, durable: &Durable) -> Result<(), StoreError> {
    let (applied, _) = log.applied()?;
    if applied > durable.get() {
        let started = std::time::Instant::now();
        log.state().sync()?;
        let took = started.elapsed();
        if took >= crate::driver::SLOW {
            warn!(
                took_ms = took.as_millis() as u64,
                applied, "state checkpoint was slow (the disk stalled)"
            );
        }
        durable.raise(applied);
    }
    Ok(())
}

/// One round of the checkpointer: checkpoint the state, then drop the log
/// files the compactions since the last round freed.
pub fn checkpoint_and_purge(log: &LogStore, durable: &Durable) {
    // A failed sync leaves the checkpoint where it was: the log is then
    // kept (not compacted) until a sync succeeds.
    if let Err(e) = checkpoint(log, durable) {
        error!(error = %e, "state checkpoint failed; the raft log is kept until one succeeds");
    }
    // Compactions are written without a sync; purging may drop the files
    // that held the truncation point before them, so make them durable
    // first.
    if let Err(e) = log.sync_compaction().and_then(|()| log.wal().purge()) {
        warn!(error = %e, "raft log purge failed");
    }
}

/// A running checkpointer thread; stops when dropped or `stop`ped.
pub struct Checkpointer {
    stop: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(
        log: LogStore,
        durable: Durable,
        interval: Duration,
        wal_interval: Option<Duration>,
        name: String,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(log, durable, interval, wal_interval, rx))
            .map_err(|e| StoreError::Storage(format!("cannot start the checkpointer: {e}")))?;
        Ok(Self {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// A checkpointer that runs nothing.
    pub fn stopped() -> Self {
        Self {
            stop: None,
            thread: None,
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("checkpointer thread panicked");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    log: LogStore,
    durable: Durable,
    interval: Duration,
    wal_interval: Option<Duration>,
    stop: Receiver<()>,
) {
    let now = Instant::now();
    let mut next_checkpoint = now + interval;
    let mut next_wal_sync = wal_interval.map(|i| now + i);
    loop {
        let next = next_wal_sync.map_or(next_checkpoint, |w| w.min(next_checkpoint));
        match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if let (Some(at), Some(every)) = (next_wal_sync, wal_interval)
            && now >= at
        {
            if let Err(e) = log.sync() {
                error!(error = %e, "raft log sync failed");
            }
            next_wal_sync = Some(now + every);
        }
        if now >= next_checkpoint {
            checkpoint_and_purge(&log, &durable);
            next_checkpoint = now + interval;
        }
    }
}
