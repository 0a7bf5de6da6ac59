//! Configuration of a store replica: flags, each with a `CHAT_STORE_*`
//! environment variable, defaults in code, validated before any port is
//! bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::driver::{DriverConfig, SyncMode};
use crate::error::StoreError;
use crate::replica::ReplicaOptions;
use crate::types::NodeId;

/// Default dedup window: retries of a send within 10 minutes return the
/// first attempt's seq.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SyncArg {
    /// fdatasync the raft log before acknowledging (durable against power
    /// loss).
    Always,
    /// Sync the raft log in the background every --sync-interval-ms
    /// (faster; a power cut on a majority can lose acknowledged messages).
    Interval,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "chat-store",
    version,
    about = "Raft-replicated message store of the chat backend"
)]
pub struct StoreConfig {
    /// Async runtime worker threads (default: one per core).
    #[arg(long, env = "CHAT_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// This replica's id, 1..=65535, unique within the group.
    #[arg(long, env = "CHAT_STORE_ID")]
    pub id: u64,
    /// Address to listen on, for clients and peer replicas.
    #[arg(long, env = "CHAT_STORE_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// Address others reach this replica at (default: --listen).
    #[arg(long, env = "CHAT_STORE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Initial voters as id=host:port, comma separated, this replica
    /// included. Read only when the data directory is new; later changes go
    /// through the membership admin calls.
    #[arg(long, env = "CHAT_STORE_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Start with an empty group and wait to be added as a learner by the
    /// leader (for replicas added at run time).
    #[arg(long, env = "CHAT_STORE_JOIN")]
    pub join: bool,
    /// Directory holding this replica's data.
    #[arg(long, env = "CHAT_STORE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Durability of acknowledged writes.
    #[arg(long, env = "CHAT_STORE_SYNC", value_enum, default_value = "always")]
    pub sync: SyncArg,
    /// Background raft log sync interval with --sync interval.
    #[arg(long, env = "CHAT_STORE_SYNC_INTERVAL_MS", default_value_t = 100)]
    pub sync_interval_ms: u64,
    /// How long, in seconds, a client message id deduplicates retries: a
    /// retry later than this after the first attempt is stored as a new
    /// message. Bounds the dedup records kept (rate × window). Must be the
    /// same on every replica.
    #[arg(long, env = "CHAT_STORE_DEDUP_WINDOW_SECS", default_value_t = DEFAULT_DEDUP_WINDOW.as_secs())]
    pub dedup_window_secs: u64,
    /// How often the state machine is made durable (fsync) in the
    /// background; the raft log is kept back to the last such checkpoint.
    #[arg(long, env = "CHAT_STORE_CHECKPOINT_MS", default_value_t = 1000)]
    pub checkpoint_ms: u64,
    /// Raft tick.
    #[arg(long, env = "CHAT_STORE_TICK_MS", default_value_t = 50)]
    pub tick_ms: u64,
    /// Election timeout in ticks; randomized in [n, 2n).
    #[arg(long, env = "CHAT_STORE_ELECTION_TICKS", default_value_t = 8)]
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    #[arg(long, env = "CHAT_STORE_HEARTBEAT_TICKS", default_value_t = 2)]
    pub heartbeat_ticks: usize,
    /// Compact the log once it holds this many applied entries.
    #[arg(long, env = "CHAT_STORE_SNAPSHOT_ENTRIES", default_value_t = 10_000)]
    pub snapshot_entries: u64,
    /// Applied entries kept after compaction.
    #[arg(long, env = "CHAT_STORE_COMPACT_KEEP", default_value_t = 2_000)]
    pub compact_keep: u64,
    /// The state machine's page cache (sled), in MiB: with the raft log's
    /// recent-entry cache (32 MiB), what bounds a replica's memory as its
    /// data grows.
    #[arg(long, env = "CHAT_STORE_STATE_CACHE_MIB", default_value_t = 1024)]
    pub state_cache_mib: u64,
    /// Snapshot files go to a rejoining replica in chunks of this size.
    #[arg(long, env = "CHAT_STORE_SNAPSHOT_CHUNK_BYTES", default_value_t = crate::transport::SNAPSHOT_CHUNK_BYTES)]
    pub snapshot_chunk_bytes: usize,
    /// Largest accepted message body.
    #[arg(long, env = "CHAT_STORE_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// How long a request may wait for the raft group before UNAVAILABLE.
    #[arg(long, env = "CHAT_STORE_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// How long SIGTERM waits for leadership transfer and in-flight calls.
    #[arg(long, env = "CHAT_STORE_SHUTDOWN_GRACE_MS", default_value_t = 3_000)]
    pub shutdown_grace_ms: u64,
    /// Drills only: SIGUSR1 cuts this replica off from its peers (raft
    /// traffic both ways; clients still reach it), SIGUSR2 reconnects it.
    #[arg(long, env = "CHAT_STORE_FAULT_SIGNALS")]
    pub fault_signals: bool,
    /// Drills only: drop the log entries and snapshots replica ID sends to
    /// this one (its heartbeats and votes still arrive): this replica hears
    /// that leader but cannot catch up from it. SIGUSR2 lifts it.
    #[arg(long, env = "CHAT_STORE_FAULT_HOLD_LOG_FROM", value_name = "ID")]
    pub fault_hold_log_from: Option<u64>,
    /// Release label of this replica (reported in metrics).
    #[arg(long, env = "CHAT_RELEASE", default_value = "stable")]
    pub release: String,
    /// Admin HTTP address serving /metrics (Prometheus); off when unset.
    #[arg(long, env = "CHAT_STORE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Log filter (for example `info` or `chat_store=debug,raft=debug`).
    #[arg(long, env = "CHAT_STORE_LOG", default_value = "info")]
    pub log: String,
    /// Log lines as `text` or `json`. Traces go over OTLP/gRPC when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "CHAT_LOG_FORMAT", default_value = "text")]
    pub log_format: chat_telemetry::trace::LogFormat,
    #[command(flatten)]
    pub tls: chat_security::TlsArgs,
}

/// Parses `id=host:port` pairs.
pub fn parse_peers(peers: &[String]) -> Result<Vec<(NodeId, String)>, StoreError> {
    let mut out = Vec::new();
    for p in peers.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let (id, addr) = p.split_once('=').ok_or_else(|| {
            StoreError::InvalidArgument(format!("peer {p:?} is not id=host:port"))
        })?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| StoreError::InvalidArgument(format!("peer {p:?} has a non-numeric id")))?;
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(StoreError::InvalidArgument(format!(
                "peer {p:?} has no valid host:port"
            )));
        }
        if out.iter().any(|(n, _)| *n == NodeId(id)) {
            return Err(StoreError::InvalidArgument(format!(
                "peer id {id} is listed twice"
            )));
        }
        validate_id(id)?;
        out.push((NodeId(id), addr.to_owned()));
    }
    Ok(out)
}

fn validate_id(id: u64) -> Result<(), StoreError> {
    if id == 0 || id > u64::from(u16::MAX) {
        return Err(StoreError::InvalidArgument(format!(
            "replica id {id} is outside 1..=65535"
        )));
    }
    Ok(())
}

impl StoreConfig {
    /// Checks the configuration and turns it into replica options.
    pub fn validate(&self) -> Result<ReplicaOptions, StoreError> {
        validate_id(self.id)?;
        let id = NodeId(self.id);
        let peers = parse_peers(&self.peers)?;
        if !self.join && !peers.iter().any(|(n, _)| *n == id) {
            return Err(StoreError::InvalidArgument(format!(
                "--peers must list this replica ({id}) unless --join is given"
            )));
        }
        if self.tick_ms == 0 {
            return Err(StoreError::InvalidArgument(
                "--tick-ms must be positive".into(),
            ));
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(StoreError::InvalidArgument(
                "--election-ticks must be greater than --heartbeat-ticks, which must be positive"
                    .into(),
            ));
        }
        if self.snapshot_entries == 0 || self.compact_keep >= self.snapshot_entries {
            return Err(StoreError::InvalidArgument(
                "--compact-keep must be smaller than --snapshot-entries, which must be positive"
                    .into(),
            ));
        }
        if self.dedup_window_secs == 0 {
            return Err(StoreError::InvalidArgument(
                "--dedup-window-secs must be positive".into(),
            ));
        }
        if self.checkpoint_ms == 0 || self.sync_interval_ms == 0 {
            return Err(StoreError::InvalidArgument(
                "--checkpoint-ms and --sync-interval-ms must be positive".into(),
            ));
        }
        if !(8..=1 << 20).contains(&self.state_cache_mib) {
            return Err(StoreError::InvalidArgument(
                "--state-cache-mib must be in 8..=1048576".into(),
            ));
        }
        if self.snapshot_chunk_bytes < 1024
            || self.snapshot_chunk_bytes > crate::transport::MAX_MESSAGE_BYTES / 2
        {
            return Err(StoreError::InvalidArgument(format!(
                "--snapshot-chunk-bytes must be in 1 KiB..={} MiB",
                crate::transport::MAX_MESSAGE_BYTES / 2 / (1 << 20)
            )));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > 16 << 20 {
            return Err(StoreError::InvalidArgument(
                "--max-body-bytes must be in 1..=16 MiB".into(),
            ));
        }
        let advertise = self
            .advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string());
        Ok(ReplicaOptions {
            driver: DriverConfig {
                id,
                tick: Duration::from_millis(self.tick_ms),
                election_ticks: self.election_ticks,
                heartbeat_ticks: self.heartbeat_ticks,
                sync: match self.sync {
                    SyncArg::Always => SyncMode::Always,
                    SyncArg::Interval => SyncMode::Interval,
                },
                snapshot_entries: self.snapshot_entries,
                compact_keep: self.compact_keep,
                checkpoint_interval: Duration::from_millis(self.checkpoint_ms),
                wal_sync_interval: Duration::from_millis(self.sync_interval_ms),
                dedup_window: Duration::from_secs(self.dedup_window_secs),
            },
            advertise,
            data_dir: Some(self.data_dir.clone()),
            initial_voters: if self.join { Vec::new() } else { peers.clone() },
            peers,
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            snapshot_chunk_bytes: self.snapshot_chunk_bytes,
            tls: self
                .tls
                .load(chat_security::Role::Store)
                .map_err(|e| StoreError::InvalidArgument(e.to_string()))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> StoreConfig {
        let mut all = vec!["chat-store", "--data-dir", "/tmp/x", "--insecure-plaintext"];
        all.extend_from_slice(args);
        StoreConfig::try_parse_from(all).unwrap()
    }

    #[test]
    fn a_replica_missing_from_its_own_peer_list_is_refused() {
        let err = cfg(&["--id", "4", "--peers", "1=a:1,2=b:2,3=c:3"])
            .validate()
            .unwrap_err();
        assert!(
            err.to_string().contains("must list this replica (4)"),
            "{err}"
        );
        assert!(
            cfg(&["--id", "4", "--join", "--peers", "1=a:1"])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn malformed_peers_are_refused_with_the_offending_entry() {
        for bad in ["1=nohost", "x=a:1", "1=a:1,1=b:2", "0=a:1", "1=a:99999"] {
            let err =
                parse_peers(&bad.split(',').map(String::from).collect::<Vec<_>>()).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidArgument(_)),
                "{bad}: {err}"
            );
        }
        let ok = parse_peers(&["1=127.0.0.1:7001".into(), " 2=store-2:7001 ".into()]).unwrap();
        assert_eq!(ok[1], (NodeId(2), "store-2:7001".to_owned()));
    }

    #[test]
    fn timing_knobs_are_checked() {
        assert!(
            cfg(&[
                "--id",
                "1",
                "--peers",
                "1=a:1",
                "--election-ticks",
                "2",
                "--heartbeat-ticks",
                "2"
            ])
            .validate()
            .is_err()
        );
        assert!(
            cfg(&["--id", "1", "--peers", "1=a:1", "--compact-keep", "20000"])
                .validate()
                .is_err()
        );
    }
}
