//! The router's admin endpoint: `/metrics` (Prometheus).

use std::sync::Arc;

use chat_resilience::limit::Limiter;
use chat_telemetry::admin::{Handler, METRICS, Reply};
use chat_telemetry::metrics::{Kind, Page, RpcMetrics};

use crate::directory::Directory;
use crate::quorum::Quorum;
use crate::rollout::Rollout;

/// Methods counted by name.
pub const METHODS: [&str; 10] = [
    "AppendBatch",
    "Read",
    "CreateConversation",
    "AddMember",
    "RemoveMember",
    "ListConversations",
    "LastSeqs",
    "Typing",
    "RegisterSessions",
    "Check",
];

pub struct RouterAdmin {
    pub rpc: Arc<RpcMetrics>,
    pub limiter: Option<Arc<Limiter>>,
    pub directory: Arc<Directory>,
    pub store_view: Arc<Quorum>,
    pub rollout: Arc<Rollout>,
    /// The quorum watch degraded mode follows (`None`: degraded mode off).
    pub quorum: Option<Arc<Quorum>>,
}

impl Handler for RouterAdmin {
    async fn handle(&self, path: &str) -> Reply {
        if path != "/metrics" {
            return Reply::not_found(path);
        }
        let mut page = Page::default();
        page.build_info(
            "router",
            env!("CARGO_PKG_VERSION"),
            Some(&self.rollout.release),
        );
        self.rpc.render(&mut page, "chat_router");
        if let Some(l) = &self.limiter {
            l.render_metrics(&mut page, "chat_router");
        }
        page.single(
            "chat_router_online_users",
            Kind::Gauge,
            "Users online at some gateway, by the session directory.",
            self.directory.online_users() as f64,
        );
        page.single(
            "chat_router_degraded",
            Kind::Gauge,
            "1 while the store has no quorum and degraded mode is on.",
            if self.quorum.as_ref().is_some_and(|q| q.lost()) {
                1.0
            } else {
                0.0
            },
        );
        let views = self.store_view.views();
        page.family(
            "chat_router_store_replica_up",
            Kind::Gauge,
            "Whether the router reaches each store replica and it serves.",
        );
        for v in &views {
            page.sample(
                "chat_router_store_replica_up",
                &[("address", &v.address)],
                if v.reachable && v.serving { 1.0 } else { 0.0 },
            );
        }
        chat_rollout::render_metrics(&mut page, self.rollout.plan().as_ref().map(|(_, p)| p));
        Reply::ok(METRICS, page.finish())
    }
}
