//! The router's admin endpoint: `/metrics` (Prometheus).

use std::sync::Arc;

use chat_resilience::Criticality;
use chat_resilience::limit::Limiter;
use chat_telemetry::admin::{Handler, PROMETHEUS, Reply};
use chat_telemetry::metrics::{Page, RpcMetrics};

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
    /// Whether degraded mode is on (protection on and no quorum).
    pub degraded: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// `<prefix>_concurrency_limit`, in-flight calls and refusals by
/// criticality of an adaptive limiter.
pub fn render_limiter(page: &mut Page, prefix: &str, limiter: &Limiter) {
    page.single(
        &format!("{prefix}_concurrency_limit"),
        "gauge",
        "The adaptive concurrency limit now.",
        limiter.limit() as f64,
    );
    page.single(
        &format!("{prefix}_inflight_calls"),
        "gauge",
        "Calls holding a place under the limit.",
        limiter.inflight() as f64,
    );
    let shed = format!("{prefix}_shed_total");
    page.family(
        &shed,
        "counter",
        "Calls refused by the concurrency limit, by criticality.",
    );
    for c in [
        Criticality::Critical,
        Criticality::Normal,
        Criticality::Sheddable,
    ] {
        page.sample(
            &shed,
            &[("criticality", c.as_str())],
            limiter.rejected(c) as f64,
        );
    }
}

/// The rollout plan's weight, step and state.
pub fn render_rollout(page: &mut Page, plan: Option<&chat_rollout::Plan>) {
    let Some(p) = plan else { return };
    page.family(
        "chat_rollout_canary_weight_percent",
        "gauge",
        "Share of users sent to the canary routers.",
    );
    let state = chat_rollout::state_name(p);
    let labels = [("canary", p.canary.as_str()), ("state", state)];
    page.sample(
        "chat_rollout_canary_weight_percent",
        &labels,
        f64::from(p.weight),
    );
    page.single(
        "chat_rollout_step",
        "gauge",
        "Index of the rollout's current step.",
        f64::from(p.step),
    );
    page.single(
        "chat_rollout_failed_checks",
        "gauge",
        "Failed analysis checks of the rollout.",
        f64::from(p.failed_checks),
    );
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
            render_limiter(&mut page, "chat_router", l);
        }
        page.single(
            "chat_router_online_users",
            "gauge",
            "Users online at some gateway, by the session directory.",
            self.directory.online_users() as f64,
        );
        page.single(
            "chat_router_degraded",
            "gauge",
            "1 while the store has no quorum and degraded mode is on.",
            if (self.degraded)() { 1.0 } else { 0.0 },
        );
        let views = self.store_view.views();
        page.family(
            "chat_router_store_replica_up",
            "gauge",
            "Whether the router reaches each store replica and it serves.",
        );
        for v in &views {
            page.sample(
                "chat_router_store_replica_up",
                &[("address", &v.address)],
                if v.reachable && v.serving { 1.0 } else { 0.0 },
            );
        }
        render_rollout(&mut page, self.rollout.plan().as_ref().map(|(_, p)| p));
        Reply::ok(PROMETHEUS, page.finish())
    }
}
