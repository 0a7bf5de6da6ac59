//! The raft log writer: the thread that writes Readies to the WAL, so the
//! driver keeps stepping, ticking and proposing while an fdatasync runs.
//!
//! The driver stages a Ready's entries and hard state in the `LogStore`
//! (raft reads them from memory at once), advances raft with
//! `advance_append_async`, and queues a `WriteTask`. The writer takes every
//! task queued so far, writes each to the WAL and ends the group with one
//! fdatasync if any of them needs it (group commit across Readies), then
//! reports the last Ready number it made durable, with the messages that
//! had to wait for it. The driver sends those messages and calls
//! `on_persist_ready`: only then does raft count the entries as persisted
//! here (for commit on a leader, for acknowledgements on a follower).
//!
//! Architecture Invariant: tasks are written in the order they were queued,
//! and a Ready's persisted messages leave only after an fdatasync that
//! covers it and every Ready before it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};

use raft::eraftpb::{Entry, HardState, Message};
use tokio::sync::Notify;
use tracing::error;

use crate::error::StoreError;
use crate::faults::Faults;
use crate::log_store::LogStore;
use crate::types::NodeId;

/// Ready writes queued at most; the driver waits (backpressure) beyond.
pub const WRITE_QUEUE: usize = 1024;
/// Tasks one WAL group takes at most.
const GROUP_LIMIT: usize = 256;

/// One Ready's share of the WAL.
pub struct WriteTask {
    pub number: u64,
    pub entries: Vec<Entry>,
    pub hs: Option<HardState>,
    /// fdatasync before reporting it.
    pub sync: bool,
    /// Messages to send once it is durable.
    pub messages: Vec<Message>,
}

/// What the writer made durable.
pub struct Persisted {
    /// The last Ready written; every earlier one is written too.
    pub number: u64,
    pub messages: Vec<Message>,
    pub syncs: u64,
    pub sync_micros: u64,
    /// Tasks this report covers.
    pub tasks: usize,
}

/// The driver's end of the writer.
pub struct LogWriter {
    backend: Backend,
    /// Tasks queued and not yet reported.
    in_flight: usize,
}

enum Backend {
    /// The writer thread (production).
    Thread {
        tasks: Option<SyncSender<WriteTask>>,
        done: Receiver<Result<Persisted, StoreError>>,
        wake: Arc<Notify>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    /// The simulator's disk: tasks wait until it says they are written
    /// (`complete`), or are lost in a crash (`discard`).
    Manual {
        log: LogStore,
        queued: VecDeque<WriteTask>,
        done: VecDeque<Result<Persisted, StoreError>>,
        wake: Arc<Notify>,
    },
}

impl LogWriter {
    /// `faults` may stall this replica's (`id`'s) writes, in tests.
    pub fn start(
        log: LogStore,
        name: String,
        faults: Faults,
        id: NodeId,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(WRITE_QUEUE);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let wake = Arc::new(Notify::new());
        let notify = wake.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(log, rx, done_tx, notify, faults, id))
            .map_err(|e| StoreError::Storage(format!("cannot start the log writer: {e}")))?;
        Ok(Self {
            backend: Backend::Thread {
                tasks: Some(tx),
                done: done_rx,
                wake,
                thread: Some(thread),
            },
            in_flight: 0,
        })
    }

    /// A writer without a thread: it writes when `complete` is called.
    pub fn manual(log: LogStore) -> Self {
        Self {
            backend: Backend::Manual {
                log,
                queued: VecDeque::new(),
                done: VecDeque::new(),
                wake: Arc::new(Notify::new()),
            },
            in_flight: 0,
        }
    }

    /// Fires when a report is ready to be taken with `try_done`.
    pub fn wake(&self) -> Arc<Notify> {
        match &self.backend {
            Backend::Thread { wake, .. } | Backend::Manual { wake, .. } => wake.clone(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn submit(&mut self, task: WriteTask) -> Result<(), StoreError> {
        match &mut self.backend {
            Backend::Thread { tasks, .. } => {
                let tasks = tasks
                    .as_ref()
                    .ok_or_else(|| StoreError::Storage("the log writer has stopped".into()))?;
                tasks
                    .send(task)
                    .map_err(|_| StoreError::Storage("the log writer has stopped".into()))?;
            }
            Backend::Manual { queued, .. } => queued.push_back(task),
        }
        self.in_flight += 1;
        Ok(())
    }

    /// A report, if one is ready.
    pub fn try_done(&mut self) -> Option<Result<Persisted, StoreError>> {
        let report = match &mut self.backend {
            Backend::Thread { done, .. } => match done.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    if self.in_flight == 0 {
                        return None;
                    }
                    Err(StoreError::Storage("the log writer has stopped".into()))
                }
            },
            Backend::Manual { done, .. } => done.pop_front()?,
        };
        self.note(&report);
        Some(report)
    }

    /// Waits (blocking this thread) for the next report.
    pub fn wait_done(&mut self) -> Result<Persisted, StoreError> {
        let report = match &mut self.backend {
            Backend::Thread { done, .. } => done
                .recv()
                .map_err(|_| StoreError::Storage("the log writer has stopped".into()))
                .and_then(|r| r),
            Backend::Manual { .. } => {
                self.complete(usize::MAX);
                if let Some(report) = self.try_done() {
                    return report;
                }
                Err(StoreError::Storage("no log write is queued".into()))
            }
        };
        self.note(&report);
        report
    }

    /// Manual writer: writes up to `max` queued tasks as one group (one
    /// fdatasync if any needs it), as the thread does. Returns how many.
    pub fn complete(&mut self, max: usize) -> usize {
        let Backend::Manual {
            log, queued, done, ..
        } = &mut self.backend
        else {
            return 0;
        };
        let n = queued.len().min(max).min(GROUP_LIMIT);
        if n == 0 {
            return 0;
        }
        let group: Vec<WriteTask> = queued.drain(..n).collect();
        done.push_back(write_group(log, group));
        n
    }

    /// Manual writer: tasks queued and not yet written.
    pub fn queued(&self) -> usize {
        match &self.backend {
            Backend::Manual { queued, .. } => queued.len(),
            Backend::Thread { .. } => 0,
        }
    }

    /// Manual writer: forgets what is queued, as a crash does.
    pub fn discard(&mut self) {
        if let Backend::Manual { queued, done, .. } = &mut self.backend {
            queued.clear();
            done.clear();
        }
        self.in_flight = 0;
    }

    fn note(&mut self, report: &Result<Persisted, StoreError>) {
        match report {
            Ok(p) => self.in_flight = self.in_flight.saturating_sub(p.tasks),
            Err(_) => self.in_flight = 0,
        }
    }

    /// Lets the writer finish what is queued, and waits for it.
    pub fn stop(&mut self) {
        match &mut self.backend {
            Backend::Thread { tasks, thread, .. } => {
                tasks.take();
                if let Some(t) = thread.take()
                    && t.join().is_err()
                {
                    error!("log writer thread panicked");
                }
            }
            Backend::Manual { .. } => while self.complete(usize::MAX) > 0 {},
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    log: LogStore,
    tasks: Receiver<WriteTask>,
    done: Sender<Result<Persisted, StoreError>>,
    wake: Arc<Notify>,
    faults: Faults,
    id: NodeId,
) {
    while let Ok(first) = tasks.recv() {
        let stall = faults.disk_stall(id);
        if !stall.is_zero() {
            std::thread::sleep(stall);
        }
        let mut group = vec![first];
        while group.len() < GROUP_LIMIT {
            match tasks.try_recv() {
                Ok(t) => group.push(t),
                Err(_) => break,
            }
        }
        let report = write_group(&log, group);
        let failed = report.is_err();
        if done.send(report).is_err() {
            return;
        }
        wake.notify_one();
        if failed {
            return;
        }
    }
}

fn write_group(log: &LogStore, group: Vec<WriteTask>) -> Result<Persisted, StoreError> {
    let sync = group.iter().any(|t| t.sync);
    let count = group.len();
    let last = group.len() - 1;
    let mut out = Persisted {
        number: 0,
        messages: Vec::new(),
        syncs: 0,
        sync_micros: 0,
        tasks: count,
    };
    let started = std::time::Instant::now();
    for (i, t) in group.into_iter().enumerate() {
        // One fdatasync, with the group's last write, covers the group.
        log.write(&t.entries, t.hs.as_ref(), sync && i == last)?;
        out.number = t.number;
        out.messages.extend(t.messages);
    }
    let took = started.elapsed();
    if sync {
        out.syncs = 1;
        out.sync_micros = took.as_micros() as u64;
    }
    if took >= crate::driver::SLOW {
        tracing::warn!(
            took_ms = took.as_millis() as u64,
            writes = count,
            synced = sync,
            "raft log write was slow (the disk stalled); acknowledgements waited for it"
        );
    }
    Ok(out)
}
