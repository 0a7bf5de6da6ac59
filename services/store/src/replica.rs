//! Lifecycle of one store replica: open storage, start the raft driver on
//! its own thread, serve gRPC (store, admin, raft transport, health), and
//! stop either gracefully (SIGTERM: leadership handed over first) or
//! abruptly (tests that simulate a crash).

use std::sync::Arc;
use std::time::Duration;

use chat_proto::raft::v1::raft_transport_server::RaftTransportServer;
use chat_proto::store::v1::store_admin_server::StoreAdminServer;
use chat_proto::store::v1::store_server::StoreServer;
use chat_security::{HEALTH, Policy, Role, Rule};
use raft::StateRole;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::checkpoint::{Checkpointer, Durable};
use crate::driver::{Driver, DriverConfig, DriverIo, SyncMode};
use crate::engine::Engine;
use crate::error::StoreError;
use crate::faults::Faults;
use crate::log_store::LogStore;
use crate::node::{Addresses, NodeHandle, NodeStatus, REQUEST_QUEUE};
use crate::service::StoreApi;
use crate::snapshot::Snapshots;
use crate::state_machine::Reader;
use crate::transport::{INBOX, LinkOptions, MAX_MESSAGE_BYTES, RaftService, Transport};
use crate::types::NodeId;
use crate::wal::Wal;

/// The health service name clients check.
pub const HEALTH_SERVICE: &str = "chat.store.v1.Store";

/// Everything needed to run a replica, already validated.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    pub driver: DriverConfig,
    /// The data directory, guarded by `data_dir` (None: in memory).
    pub data_dir: Option<std::path::PathBuf>,
    /// Address other replicas and clients reach this one at.
    pub advertise: String,
    /// Voters of a new group (empty: join an existing group).
    pub initial_voters: Vec<(NodeId, String)>,
    /// Known peer addresses (initial voters, or any hint for joiners).
    pub peers: Vec<(NodeId, String)>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Size of the chunks snapshot files travel in.
    pub snapshot_chunk_bytes: usize,
    /// The replica's identity for mutual TLS (None: plaintext, every
    /// caller trusted).
    pub tls: Option<Arc<chat_security::Tls>>,
}

/// Who may call what on a replica's port.
pub const POLICY: Policy = Policy(&[
    HEALTH,
    Rule::roles("/chat.store.v1.Store/", &[Role::Router, Role::Operator]),
    Rule::roles("/chat.store.v1.StoreAdmin/", &[Role::Operator]),
    // Routers watch which replica leads and whether the group has quorum.
    Rule::roles(
        "/chat.store.v1.StoreAdmin/Status",
        &[Role::Operator, Role::Router],
    ),
    Rule::roles("/chat.raft.v1.RaftTransport/", &[Role::Store]),
]);

/// A running replica.
pub struct Replica {
    handle: NodeHandle,
    shutdown: CancellationToken,
    /// Fired (before `shutdown`) by `kill`: stop without syncing.
    crash: CancellationToken,
    driver: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
    checkpointer: Checkpointer,
    server: tokio::task::JoinHandle<()>,
    health_task: tokio::task::JoinHandle<()>,
    health: tonic_health::server::HealthReporter,
    rpc: Arc<chat_telemetry::metrics::RpcMetrics>,
}

/// A replica's two stores: the raft log's WAL and the state machine's
/// engine.
#[derive(Clone)]
pub struct Storage {
    pub wal: Arc<dyn Wal>,
    pub state: Arc<dyn Engine>,
    /// Where snapshot files are built and received.
    pub snapshot_dir: std::path::PathBuf,
}

impl Replica {
    /// Starts a replica on `storage`, serving on `listener`.
    pub async fn start(
        opts: ReplicaOptions,
        storage: Storage,
        listener: TcpListener,
        faults: Faults,
    ) -> Result<Self, StoreError> {
        let id = opts.driver.id;
        let Storage {
            wal,
            state,
            snapshot_dir,
        } = storage;
        let snapshots = Snapshots::open(&snapshot_dir, state.clone())?;
        if let Some(dir) = &opts.data_dir {
            crate::data_dir::check(dir, wal.as_ref(), state.as_ref())?;
        }
        let log = LogStore::open(
            wal,
            state.clone(),
            snapshots.clone(),
            id,
            &opts.initial_voters,
        )?;
        if let Some(dir) = &opts.data_dir {
            crate::data_dir::mark(dir, id)?;
        }
        // What the state engine holds now may sit in the page cache only
        // (after a process crash); sync it before counting it durable.
        state.sync()?;
        let durable = Durable::new(log.applied()?.0);
        let checkpointer = Checkpointer::start(
            log.clone(),
            durable.clone(),
            opts.driver.checkpoint_interval,
            (opts.driver.sync == SyncMode::Interval).then_some(opts.driver.wal_sync_interval),
            format!("checkpoint-{id}"),
        )?;
        let reader = Reader::new(state.clone());
        let addresses = Addresses::default();
        for (n, addr) in &opts.peers {
            addresses.set(*n, addr.clone());
        }
        for (n, addr) in reader.replica_addresses()? {
            addresses.set(NodeId(n), addr);
        }
        addresses.set(id, opts.advertise.clone());

        let (req_tx, req_rx) = mpsc::channel(REQUEST_QUEUE);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
        let (event_tx, event_rx) = mpsc::channel(1024);
        let (status_tx, status_rx) = watch::channel(NodeStatus::starting(id));
        let transport = Transport::new(
            id,
            addresses.clone(),
            event_tx,
            faults.clone(),
            tokio::runtime::Handle::current(),
            LinkOptions {
                files: snapshots.clone(),
                chunk_bytes: opts.snapshot_chunk_bytes,
                tls: opts.tls.clone(),
            },
        );
        let writer = crate::writer::LogWriter::start(
            log.clone(),
            format!("raft-log-{id}"),
            faults.clone(),
            id,
        )?;
        let io = DriverIo {
            net: Box::new(transport),
            writer,
            clock: crate::clock::Clock::System,
            incarnation: rand::random(),
            election_timeout: None,
            known_bug: None,
        };
        let driver = Driver::new(
            opts.driver.clone(),
            log,
            durable,
            io,
            req_rx,
            inbox_rx,
            event_rx,
            status_tx,
        )?;
        let shutdown = CancellationToken::new();
        let crash = CancellationToken::new();
        let (token, crash_token) = (shutdown.clone(), crash.clone());
        let driver = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| {
                        StoreError::Storage(format!("cannot start the raft thread: {e}"))
                    })?;
                rt.block_on(driver.run(token, crash_token))
            })
            .map_err(|e| StoreError::Storage(format!("cannot start the raft thread: {e}")))?;

        let handle = NodeHandle {
            id,
            requests: req_tx,
            status: status_rx,
            addresses,
            reader,
        };
        let api = StoreApi {
            node: handle.clone(),
            max_body_bytes: opts.max_body_bytes,
            request_timeout: opts.request_timeout,
        };
        let raft_service = RaftService {
            id,
            inbox: inbox_tx,
            addresses: handle.addresses().clone(),
            faults,
            shutdown: shutdown.clone(),
            snapshots,
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let health_task = tokio::spawn(report_health(
            handle.watch_status(),
            health.clone(),
            shutdown.clone(),
        ));

        // Request bodies are bounded by --max-body-bytes times the batch
        // limit; raft batches and snapshot chunks by MAX_MESSAGE_BYTES.
        let api_limit =
            (opts.max_body_bytes + 1024) * crate::service::MAX_BATCH_ITEMS.min(256) + (1 << 20);
        let rpc = Arc::new(chat_telemetry::metrics::RpcMetrics::new(
            &crate::admin::METHODS,
        ));
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &opts.tls {
            server = server
                .tls_config(tls.server_config())
                .map_err(|e| StoreError::InvalidArgument(format!("TLS: {e}")))?;
        }
        let router = server
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(1)))
            .http2_keepalive_timeout(Some(Duration::from_secs(2)))
            .layer(chat_telemetry::metrics::MetricsLayer::new(rpc.clone()))
            .layer(chat_security::authorize(POLICY, opts.tls.is_some()))
            .layer(chat_telemetry::trace::TraceLayer)
            .add_service(health_service)
            .add_service(StoreServer::new(api.clone()).max_decoding_message_size(api_limit))
            .add_service(StoreAdminServer::new(api))
            .add_service(
                RaftTransportServer::new(raft_service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        let stop = shutdown.clone();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await
            {
                warn!(error = %e, "gRPC server stopped with an error");
            }
        });
        info!(replica = %id, address = %opts.advertise, "store replica started");
        Ok(Self {
            handle,
            shutdown,
            crash,
            driver: Some(driver),
            checkpointer,
            server,
            health_task,
            health,
            rpc,
        })
    }

    /// Calls served, by method and code.
    pub fn rpc(&self) -> &Arc<chat_telemetry::metrics::RpcMetrics> {
        &self.rpc
    }

    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// Completes when the raft driver has stopped (for example on a storage
    /// failure).
    pub async fn stopped(&self) {
        let mut rx = self.handle.watch_status();
        let _ = rx.wait_for(|s| s.stopped).await;
    }

    /// Graceful stop: report NOT_SERVING, hand leadership to the most
    /// up-to-date voter, finish in-flight calls, sync storage. Returns
    /// whether this replica led and saw another take over before it stopped.
    pub async fn shutdown(mut self, grace: Duration) -> Result<bool, StoreError> {
        let id = self.handle.id();
        self.health
            .set_service_status(HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let deadline = tokio::time::Instant::now() + grace;
        let mut handed_over = false;
        if self.handle.status().role == StateRole::Leader {
            match self.handle.transfer_leader(None).await {
                Ok(target) => {
                    let moved = self
                        .handle
                        .wait_for(grace / 2, |s| s.leader.is_some_and(|l| l != id))
                        .await
                        .is_some();
                    info!(replica = %id, target = %target, moved, "leadership transfer before shutdown");
                    handed_over = moved;
                }
                Err(e) => {
                    warn!(replica = %id, error = %e, "no leadership transfer before shutdown")
                }
            }
        }
        self.shutdown.cancel();
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(remaining.max(Duration::from_millis(100)), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
        self.join_driver().await?;
        Ok(handed_over)
    }

    /// Abrupt stop, as close to a crash as a process can simulate in
    /// itself: connections are dropped and nothing is handed over.
    pub async fn kill(mut self) {
        self.crash.cancel();
        self.shutdown.cancel();
        self.health_task.abort();
        // Cancelling makes the server close every connection (the raft
        // streams end with the token); connection tasks hold the engine, so
        // wait for them before the directory is reopened.
        if tokio::time::timeout(Duration::from_secs(2), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
        let _ = self.join_driver().await;
    }

    async fn join_driver(&mut self) -> Result<(), StoreError> {
        self.health_task.abort();
        let Some(driver) = self.driver.take() else {
            return Ok(());
        };
        let result = tokio::task::spawn_blocking(move || driver.join())
            .await
            .map_err(|e| StoreError::Storage(format!("raft thread: {e}")))?
            .map_err(|_| StoreError::Storage("raft thread panicked".into()))?;
        // The checkpointer holds the engines; it is gone when this returns,
        // so the data directory can be opened again.
        let mut checkpointer = std::mem::replace(&mut self.checkpointer, Checkpointer::stopped());
        tokio::task::spawn_blocking(move || checkpointer.stop())
            .await
            .map_err(|e| StoreError::Storage(format!("checkpointer thread: {e}")))?;
        result
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.server.abort();
        self.health_task.abort();
    }
}

async fn report_health(
    mut status: watch::Receiver<NodeStatus>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        let serving = status.borrow_and_update().serving;
        if last != Some(serving) {
            let s = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(HEALTH_SERVICE, s).await;
            health.set_service_status("", s).await;
            last = Some(serving);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = status.changed() => if r.is_err() { return },
        }
    }
}
