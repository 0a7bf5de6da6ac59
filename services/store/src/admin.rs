//! The store replica's admin endpoint: `/metrics` (Prometheus), from the
//! driver's status report.

use chat_telemetry::admin::{Handler, METRICS, Reply};
use chat_telemetry::metrics::{Kind, Page};

use crate::node::NodeHandle;

/// Methods counted by name.
pub const METHODS: [&str; 14] = [
    "AppendBatch",
    "Append",
    "Read",
    "CreateConversation",
    "AddMember",
    "RemoveMember",
    "GetConversation",
    "ListConversations",
    "LastSeqs",
    "GetSetting",
    "PutSetting",
    "ListSettings",
    "Status",
    "Check",
];

pub struct StoreAdminHttp {
    pub handle: NodeHandle,
    pub rpc: std::sync::Arc<chat_telemetry::metrics::RpcMetrics>,
    pub release: String,
}

impl Handler for StoreAdminHttp {
    async fn handle(&self, path: &str) -> Reply {
        if path != "/metrics" {
            return Reply::not_found(path);
        }
        let mut page = Page::default();
        page.build_info("store", env!("CARGO_PKG_VERSION"), Some(&self.release));
        self.rpc.render(&mut page, "chat_store");
        let report =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.handle.report()).await;
        let Ok(Ok(r)) = report else {
            page.single(
                "chat_store_up",
                Kind::Gauge,
                "Whether the raft driver answered this scrape.",
                0.0,
            );
            return Reply::ok(METRICS, page.finish());
        };
        let s = &r.status;
        let g = |page: &mut Page, name: &str, help: &str, v: f64| {
            page.single(name, Kind::Gauge, help, v);
        };
        let c = |page: &mut Page, name: &str, help: &str, v: u64| {
            page.single(name, Kind::Counter, help, v as f64);
        };
        g(
            &mut page,
            "chat_store_up",
            "Whether the raft driver answered this scrape.",
            1.0,
        );
        g(
            &mut page,
            "chat_store_raft_term",
            "Current raft term.",
            s.term as f64,
        );
        g(
            &mut page,
            "chat_store_raft_is_leader",
            "1 on the leader.",
            if s.role == raft::StateRole::Leader {
                1.0
            } else {
                0.0
            },
        );
        g(
            &mut page,
            "chat_store_raft_leader_id",
            "Replica id of the leader this replica knows (0: none).",
            s.leader.map_or(0, |l| l.0) as f64,
        );
        g(
            &mut page,
            "chat_store_raft_commit_index",
            "Highest committed log index.",
            s.commit as f64,
        );
        g(
            &mut page,
            "chat_store_raft_applied_index",
            "Highest applied log index.",
            s.applied as f64,
        );
        g(
            &mut page,
            "chat_store_raft_apply_lag_entries",
            "Committed but not yet applied entries.",
            s.commit.saturating_sub(s.applied) as f64,
        );
        g(
            &mut page,
            "chat_store_raft_first_index",
            "First index in the log.",
            r.first_index as f64,
        );
        g(
            &mut page,
            "chat_store_raft_last_index",
            "Last index in the log.",
            r.last_index as f64,
        );
        g(
            &mut page,
            "chat_store_raft_snapshot_index",
            "Index of the latest snapshot.",
            r.snapshot_index as f64,
        );
        g(
            &mut page,
            "chat_store_serving",
            "1 once the replica knows a leader and has caught up.",
            if s.serving { 1.0 } else { 0.0 },
        );
        let st = &r.stats;
        c(
            &mut page,
            "chat_store_proposed_entries_total",
            "Raft entries proposed (group commits).",
            st.proposed_entries,
        );
        c(
            &mut page,
            "chat_store_proposed_ops_total",
            "Operations in proposed entries (ops / entries is the batch size).",
            st.proposed_ops,
        );
        c(
            &mut page,
            "chat_store_readies_total",
            "Raft Ready batches handled.",
            st.readies,
        );
        c(
            &mut page,
            "chat_store_syncs_total",
            "Engine flushes to disk.",
            st.syncs,
        );
        page.single(
            "chat_store_sync_seconds_total",
            Kind::Counter,
            "Time spent flushing to disk (÷ syncs: mean flush latency).",
            st.sync_micros as f64 / 1e6,
        );
        c(
            &mut page,
            "chat_store_applied_entries_total",
            "Entries applied to the state machine.",
            st.applied_entries,
        );
        if s.role == raft::StateRole::Leader {
            page.family(
                "chat_store_replica_lag_entries",
                Kind::Gauge,
                "On the leader: how far each replica's matched index trails the last index.",
            );
            for v in &r.replicas {
                let id = v.id.0.to_string();
                page.sample(
                    "chat_store_replica_lag_entries",
                    &[("replica", &id)],
                    r.last_index.saturating_sub(v.matched) as f64,
                );
            }
        }
        Reply::ok(METRICS, page.finish())
    }
}
