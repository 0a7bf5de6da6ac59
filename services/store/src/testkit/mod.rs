//! In-process cluster harness: replicas on 127.0.0.1 ephemeral ports, each
//! on its own sled directory, sharing one fault injector (drop, delay,
//! partition, heal) and able to stop, restart, wipe and join replicas.
//!
//! Used by the store's tests and by benchmarks; everything waits on
//! conditions with deadlines, never on fixed sleeps.

pub mod mem_fs;
pub mod power;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::client::StoreClient;
use crate::driver::{DriverConfig, SyncMode};
use crate::error::StoreError;
use crate::faults::Faults;
use crate::node::NodeHandle;
use crate::replica::{Replica, ReplicaOptions};
use crate::testkit::power::PowerCutDisk;
use crate::types::NodeId;

/// Timing and storage knobs of a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_entries: u64,
    pub compact_keep: u64,
    pub sync: SyncMode,
    pub request_timeout: Duration,
    /// State checkpoints, and raft log syncs with `SyncMode::Interval`.
    pub checkpoint_interval: Duration,
    /// Replicas' disks can lose power (`Cluster::power_cut`): the WAL sits
    /// on a file system that tracks syncs, the state in memory.
    pub power_cuts: bool,
    /// Size of the chunks snapshot files travel in.
    pub snapshot_chunk_bytes: usize,
    /// The cluster's certificates: replicas use the store identity, the
    /// cluster's clients the operator's. None: plaintext.
    pub certs: Option<std::sync::Arc<chat_security::certs::CertSet>>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(20),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_entries: 10_000,
            compact_keep: 100,
            sync: SyncMode::Always,
            request_timeout: Duration::from_secs(3),
            checkpoint_interval: Duration::from_millis(200),
            power_cuts: false,
            snapshot_chunk_bytes: crate::transport::SNAPSHOT_CHUNK_BYTES,
            certs: None,
        }
    }
}

struct Slot {
    addr: String,
    dir: PathBuf,
    replica: Option<Replica>,
    /// The replica's disk, with `ClusterOptions::power_cuts`.
    disk: Option<PowerCutDisk>,
    /// Started with an empty group, to be added at run time, knowing only
    /// this replica's address.
    joiner: Option<NodeId>,
}

pub struct Cluster {
    opts: ClusterOptions,
    faults: Faults,
    root: tempfile::TempDir,
    voters: Vec<(NodeId, String)>,
    slots: BTreeMap<NodeId, Slot>,
}

async fn bind(addr: &str) -> Result<TcpListener, StoreError> {
    // A restarted replica reuses its port; the old socket may linger briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(addr, error = %e, "port busy; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(StoreError::Unavailable(format!("cannot bind {addr}: {e}"))),
        }
    }
}

/// A listener on a free 127.0.0.1 port, and its address.
async fn ephemeral() -> Result<(TcpListener, String), StoreError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let addr = l
        .local_addr()
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
        .to_string();
    Ok((l, addr))
}

impl Cluster {
    /// Starts `n` voters.
    pub async fn start(n: u64, opts: ClusterOptions) -> Result<Self, StoreError> {
        crate::logging::init_test_tracing();
        let root = tempfile::tempdir().map_err(|e| StoreError::Storage(e.to_string()))?;
        let mut listeners = Vec::new();
        let mut voters = Vec::new();
        for i in 1..=n {
            let (l, addr) = ephemeral().await?;
            voters.push((NodeId(i), addr));
            listeners.push(l);
        }
        let mut cluster = Self {
            opts,
            faults: Faults::default(),
            root,
            voters: voters.clone(),
            slots: BTreeMap::new(),
        };
        for ((id, addr), l) in voters.into_iter().zip(listeners) {
            let dir = cluster.root.path().join(format!("replica-{id}"));
            cluster.slots.insert(
                id,
                Slot {
                    addr,
                    dir,
                    replica: None,
                    disk: cluster.opts.power_cuts.then(PowerCutDisk::new),
                    joiner: None,
                },
            );
            cluster.launch(id, Some(l)).await?;
        }
        Ok(cluster)
    }

    fn options(&self, id: NodeId, joiner: Option<NodeId>) -> ReplicaOptions {
        let o = &self.opts;
        let addr = self.slots[&id].addr.clone();
        ReplicaOptions {
            driver: DriverConfig {
                id,
                tick: o.tick,
                election_ticks: o.election_ticks,
                heartbeat_ticks: o.heartbeat_ticks,
                sync: o.sync,
                snapshot_entries: o.snapshot_entries,
                compact_keep: o.compact_keep,
                checkpoint_interval: o.checkpoint_interval,
                wal_sync_interval: o.checkpoint_interval,
                dedup_window: crate::config::DEFAULT_DEDUP_WINDOW,
            },
            advertise: addr,
            data_dir: Some(self.slots[&id].dir.clone()),
            initial_voters: if joiner.is_some() {
                Vec::new()
            } else {
                self.voters.clone()
            },
            // A joiner is told of one replica only; it learns the rest from
            // the snapshot it starts from.
            peers: match joiner {
                Some(hint) => self
                    .voters
                    .iter()
                    .filter(|(n, _)| *n == hint)
                    .cloned()
                    .collect(),
                None => self.voters.clone(),
            },
            max_body_bytes: 64 * 1024,
            request_timeout: o.request_timeout,
            snapshot_chunk_bytes: o.snapshot_chunk_bytes,
            tls: o.certs.as_ref().map(|c| c.tls(chat_security::Role::Store)),
        }
    }

    async fn launch(
        &mut self,
        id: NodeId,
        listener: Option<TcpListener>,
    ) -> Result<(), StoreError> {
        let slot = self
            .slots
            .get(&id)
            .ok_or_else(|| StoreError::NotFound(format!("no replica {id}")))?;
        let listener = match listener {
            Some(l) => l,
            None => bind(&slot.addr).await?,
        };
        std::fs::create_dir_all(&slot.dir).map_err(|e| StoreError::Storage(e.to_string()))?;
        // The previous incarnation releases its locks once every handle is
        // dropped; wait for that rather than guessing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let storage = loop {
            let opened = match &slot.disk {
                Some(disk) => disk.open(&slot.dir.join(crate::data_dir::WAL_DIR)),
                None => {
                    crate::data_dir::open_storage(&slot.dir, crate::engine::DEFAULT_CACHE_BYTES)
                }
            };
            match opened {
                Ok(e) => break e,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "data directory still locked; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let opts = self.options(id, slot.joiner);
        let replica = Replica::start(opts, storage, listener, self.faults.clone()).await?;
        self.slots.get_mut(&id).expect("slot exists").replica = Some(replica);
        Ok(())
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.slots.keys().copied().collect()
    }

    pub fn running(&self) -> Vec<NodeId> {
        self.slots
            .iter()
            .filter(|(_, s)| s.replica.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn addr(&self, id: NodeId) -> String {
        self.slots[&id].addr.clone()
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeHandle> {
        self.slots.get(&id)?.replica.as_ref().map(Replica::handle)
    }

    /// A client that knows every replica's address.
    pub fn client(&self) -> StoreClient {
        let addrs = self.slots.values().map(|s| s.addr.clone()).collect();
        StoreClient::new(addrs, self.opts.request_timeout * 3)
            .expect("at least one replica")
            .with_tls(
                self.opts
                    .certs
                    .as_ref()
                    .map(|c| c.tls(chat_security::Role::Operator)),
            )
    }

    /// Waits until every running replica among `among` agrees on one leader
    /// that is itself running and serving.
    pub async fn wait_leader_among(
        &self,
        among: &[NodeId],
        timeout: Duration,
    ) -> Result<NodeId, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut watches: Vec<_> = among
            .iter()
            .filter_map(|id| self.node(*id))
            .map(|n| n.watch_status())
            .collect();
        if watches.is_empty() {
            return Err(StoreError::Unavailable("no running replica".into()));
        }
        loop {
            let statuses: Vec<_> = watches
                .iter_mut()
                .map(|w| w.borrow_and_update().clone())
                .collect();
            if let Some(l) = statuses[0].leader {
                let agreed = statuses.iter().all(|s| s.leader == Some(l));
                let leader_serving = statuses.iter().any(|s| s.id == l && s.serving);
                if agreed && leader_serving {
                    return Ok(l);
                }
            }
            let changed =
                futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(StoreError::Unavailable(format!(
                    "no agreed leader among {among:?} within {timeout:?}"
                )));
            }
        }
    }

    pub async fn wait_leader(&self, timeout: Duration) -> Result<NodeId, StoreError> {
        self.wait_leader_among(&self.running(), timeout).await
    }

    /// Stops a replica abruptly (no leadership transfer, connections cut).
    pub async fn kill(&mut self, id: NodeId) {
        if let Some(r) = self.slots.get_mut(&id).and_then(|s| s.replica.take()) {
            r.kill().await;
        }
    }

    /// Stops a replica gracefully, as on SIGTERM.
    /// Returns whether the replica led and handed leadership over first.
    pub async fn shutdown(&mut self, id: NodeId) -> Result<bool, StoreError> {
        match self.slots.get_mut(&id).and_then(|s| s.replica.take()) {
            Some(r) => r.shutdown(Duration::from_secs(3)).await,
            None => Ok(false),
        }
    }

    /// Starts a stopped replica again on its data directory.
    pub async fn restart(&mut self, id: NodeId) -> Result<(), StoreError> {
        self.kill(id).await;
        self.launch(id, None).await
    }

    /// Stops a replica abruptly and cuts its disk's power: whatever no
    /// sync covered is lost. Needs `ClusterOptions::power_cuts`.
    pub async fn power_cut(&mut self, id: NodeId) -> Result<(), StoreError> {
        let disk = self.slots[&id].disk.clone().ok_or_else(|| {
            StoreError::FailedPrecondition("the cluster was started without power_cuts".into())
        })?;
        disk.freeze();
        self.kill(id).await;
        disk.power_cut()
    }

    /// fdatasyncs of replica `id`'s WAL so far (with `power_cuts`).
    pub fn wal_syncs(&self, id: NodeId) -> Option<u64> {
        Some(self.slots.get(&id)?.disk.as_ref()?.wal_syncs())
    }

    /// The applied index replica `id`'s state engine holds now (with
    /// `power_cuts`; after a cut, what survived it).
    pub fn disk_applied(&self, id: NodeId) -> Option<u64> {
        self.slots.get(&id)?.disk.as_ref()?.state_applied()
    }

    /// Stops a replica and deletes its data directory.
    pub async fn wipe(&mut self, id: NodeId) -> Result<(), StoreError> {
        self.kill(id).await;
        if self.slots[&id].disk.is_some() {
            self.slots.get_mut(&id).expect("slot exists").disk = Some(PowerCutDisk::new());
        }
        let dir = self.slots[&id].dir.clone();
        std::fs::remove_dir_all(&dir)
            .map_err(|e| StoreError::Storage(format!("wipe {}: {e}", dir.display())))
    }

    /// Starts a new, empty replica that waits to be added by the leader and
    /// knows only `hint`'s address.
    pub async fn start_joiner(&mut self, id: NodeId, hint: NodeId) -> Result<String, StoreError> {
        let (l, addr) = ephemeral().await?;
        let dir = self.root.path().join(format!("replica-{id}"));
        self.slots.insert(
            id,
            Slot {
                addr: addr.clone(),
                dir,
                replica: None,
                disk: self.opts.power_cuts.then(PowerCutDisk::new),
                joiner: Some(hint),
            },
        );
        self.launch(id, Some(l)).await?;
        Ok(addr)
    }

    /// Waits until replica `id` has applied at least `index`.
    pub async fn wait_applied(
        &self,
        id: NodeId,
        index: u64,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let node = self
            .node(id)
            .ok_or_else(|| StoreError::NotFound(format!("replica {id} is not running")))?;
        node.wait_for(timeout, |s| s.applied >= index)
            .await
            .map(|_| ())
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "replica {id} did not apply {index} within {timeout:?}"
                ))
            })
    }

    /// Stops every replica.
    pub async fn stop_all(&mut self) {
        for id in self.ids() {
            self.kill(id).await;
        }
    }
}
