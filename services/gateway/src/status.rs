//! What this gateway knows of the whole cluster, for its admin endpoint:
//! `/metrics` (Prometheus), `/status` (JSON) and `/` (the HTML status
//! page). Everything comes from what the gateway already hears: the
//! routers' registration answers (their releases, the store replicas as
//! they poll them, incident notices, the rollout plan), its own health
//! checks of the routers, and its sessions. So the page keeps working when
//! parts are down and says which: a part that has not answered lately is
//! shown as down or unknown, never left out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chat_proto::router::v1 as rpb;
use chat_proto::status::v1::{Incident, ReplicaView};
use chat_telemetry::admin::{Handler, METRICS, Reply};
use chat_telemetry::metrics::{Kind, Page, RpcMetrics};
use serde_json::{Value, json};

use crate::routers::RouterPool;
use crate::sessions::Sessions;

/// Methods counted by name.
pub const METHODS: [&str; 10] = [
    "Send",
    "SendStream",
    "Subscribe",
    "History",
    "CreateConversation",
    "AddMember",
    "RemoveMember",
    "ListConversations",
    "SendTyping",
    "Check",
];

/// Older than this, what routers said of the store is not trusted.
const STALE: Duration = Duration::from_secs(5);
/// The longest a gateway says "starting": past it, a part that has never
/// answered is shown as the outage it is.
const STARTING_AT_MOST: Duration = Duration::from_secs(30);

#[derive(Clone, Default)]
struct RouterSeen {
    release: String,
    version: String,
    answered: Option<Instant>,
}

/// The cluster as this gateway last heard of it.
pub struct ClusterView {
    routers: Vec<RwLock<RouterSeen>>,
    store: RwLock<(Option<Instant>, Vec<ReplicaView>)>,
    incidents: RwLock<Vec<Incident>>,
    created: Instant,
    /// Every router has answered once and the store was seen with a
    /// leader once: from then on the page judges what it hears.
    settled: AtomicBool,
}

impl ClusterView {
    pub fn new(routers: usize) -> Self {
        Self {
            routers: (0..routers).map(|_| RwLock::default()).collect(),
            store: RwLock::new((None, Vec::new())),
            incidents: RwLock::new(Vec::new()),
            created: Instant::now(),
            settled: AtomicBool::new(false),
        }
    }

    /// Whether the cluster is still starting as far as this gateway knows:
    /// it has not yet heard from every tier once (every router, the store
    /// with a leader), and started less than `STARTING_AT_MOST` ago. A part
    /// not heard from yet is not down, so the page says "starting" rather
    /// than an outage.
    pub fn starting(&self, now: Instant) -> bool {
        !self.settled.load(Ordering::Relaxed)
            && now.saturating_duration_since(self.created) < STARTING_AT_MOST
    }

    fn settle(&self) {
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        let routers = self
            .routers
            .iter()
            .all(|r| r.read().expect("view lock poisoned").answered.is_some());
        let leader = self
            .store
            .read()
            .expect("view lock poisoned")
            .1
            .iter()
            .any(|r| r.reachable && r.role == "leader");
        if routers && leader {
            self.settled.store(true, Ordering::Relaxed);
        }
    }

    /// Takes in one registration round (`None`: that router did not answer).
    pub fn heard(&self, answers: &[Option<rpb::RegisterSessionsResponse>]) {
        let now = Instant::now();
        for (slot, a) in self.routers.iter().zip(answers) {
            if let Some(a) = a {
                *slot.write().expect("view lock poisoned") = RouterSeen {
                    release: a.release.clone(),
                    version: a.version.clone(),
                    answered: Some(now),
                };
            }
        }
        // The replicas as the router that sees most of them reports them.
        if let Some(a) = answers
            .iter()
            .flatten()
            .max_by_key(|a| a.store.iter().filter(|r| r.reachable).count())
        {
            if !a.store.is_empty() {
                *self.store.write().expect("view lock poisoned") = (Some(now), a.store.clone());
            }
            *self.incidents.write().expect("view lock poisoned") = a.incidents.clone();
        }
        self.settle();
    }
}

/// The admin endpoint's state.
pub struct GatewayAdmin {
    pub view: Arc<ClusterView>,
    pub pool: Arc<RouterPool>,
    pub sessions: Arc<Sessions>,
    pub rpc: Arc<RpcMetrics>,
    pub guard: Arc<crate::guard::Guard>,
    pub connections: Arc<chat_resilience::incoming::ConnectionCount>,
    pub release: String,
    /// This gateway's public address, as configured.
    pub address: String,
}

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl GatewayAdmin {
    /// The status document (the JSON of `/status`).
    pub fn status(&self) -> Value {
        let now = Instant::now();
        let mut routers = Vec::new();
        for (i, slot) in self.view.routers.iter().enumerate() {
            let seen = slot.read().expect("view lock poisoned").clone();
            let up = self.pool.available(i);
            let age = seen.answered.map(|t| now.duration_since(t).as_secs_f64());
            routers.push(json!({
                "name": self.pool.name(i),
                "state": if up { "up" } else { "down" },
                "release": seen.release,
                "version": seen.version,
                "last_answer_s_ago": age.map(|a| (a * 10.0).round() / 10.0),
            }));
        }
        let (seen_at, replicas) = self.view.store.read().expect("view lock poisoned").clone();
        let fresh = seen_at.is_some_and(|t| now.duration_since(t) < STALE);
        let leader = replicas
            .iter()
            .filter(|r| r.reachable && r.role == "leader")
            .max_by_key(|r| r.term);
        let store: Vec<Value> = replicas
            .iter()
            .map(|r| {
                let state = if !fresh {
                    "unknown"
                } else if !r.reachable {
                    "down"
                } else if !r.serving {
                    "catching up"
                } else {
                    "up"
                };
                let lag = leader
                    .filter(|_| r.reachable)
                    .map(|l| l.commit_index.saturating_sub(r.applied_index));
                json!({
                    "address": r.address,
                    "id": r.id,
                    "state": state,
                    "role": if r.reachable { r.role.as_str() } else { "" },
                    "term": r.term,
                    "applied_index": r.applied_index,
                    "replication_lag_entries": lag,
                    "version": r.version,
                })
            })
            .collect();
        let degraded = self
            .sessions
            .status()
            .map(|s| s.affected_features)
            .unwrap_or_default();
        let incidents: Vec<Value> = self
            .view
            .incidents
            .read()
            .expect("view lock poisoned")
            .iter()
            .rev()
            .map(|i| {
                json!({
                    "id": i.id,
                    "text": i.text,
                    "posted_ms": i.posted_ms,
                    "resolved_ms": if i.resolved_ms == 0 { None } else { Some(i.resolved_ms) },
                    "open": i.resolved_ms == 0,
                })
            })
            .collect();
        let rollout = self.pool.plan().map(|(_, p)| {
            json!({
                "service": p.service,
                "canary": p.canary,
                "state": chat_rollout::state_name(&p),
                "weight_percent": p.weight,
                "step": p.step + 1,
                "steps": p.steps,
                "last_decision": p.decisions.last().map(|d| format!("{}: {}", d.action, d.reason)),
            })
        });
        let routers_up = self.pool.available_count();
        let store_down = store.iter().filter(|r| r["state"] != "up").count();
        let overall = if self.view.starting(now) {
            "starting"
        } else if routers_up == 0 || (fresh && leader.is_none()) || !degraded.is_empty() {
            "major outage"
        } else if !fresh
            || store_down > 0
            || routers_up < routers.len()
            || incidents.iter().any(|i| i["open"] == true)
        {
            "degraded"
        } else {
            "operational"
        };
        json!({
            "overall": overall,
            "generated_ms": ms_since_epoch(SystemTime::now()),
            "gateway": {
                "address": self.address,
                "state": "up",
                "version": env!("CARGO_PKG_VERSION"),
                "release": self.release,
                "subscriptions": self.sessions.count(),
            },
            "routers": routers,
            "store": {
                "leader_id": leader.map(|l| l.id),
                "term": leader.map(|l| l.term),
                "seen_s_ago": seen_at.map(|t| (now.duration_since(t).as_secs_f64() * 10.0).round() / 10.0),
                "replicas": store,
            },
            "degraded_features": degraded,
            "rollout": rollout,
            "incidents": incidents,
        })
    }

    fn metrics(&self) -> String {
        let mut page = Page::default();
        page.build_info("gateway", env!("CARGO_PKG_VERSION"), Some(&self.release));
        self.rpc.render(&mut page, "chat_gateway");
        if let Some(l) = self.guard.limiter() {
            l.render_metrics(&mut page, "chat_gateway");
        }
        let (by_ip, by_user) = self.guard.rate_limited();
        let limited = "chat_gateway_rate_limited_total";
        page.family(
            limited,
            Kind::Counter,
            "Calls refused by the per-IP and per-user rate limits.",
        );
        page.sample(limited, &[("scope", "ip")], by_ip as f64);
        page.sample(limited, &[("scope", "user")], by_user as f64);
        {
            use std::sync::atomic::Ordering::Relaxed;
            page.single(
                "chat_gateway_open_connections",
                Kind::Gauge,
                "Client connections open now.",
                self.connections.open.load(Relaxed) as f64,
            );
            page.single(
                "chat_gateway_connections_accepted_total",
                Kind::Counter,
                "Client connections accepted.",
                self.connections.accepted.load(Relaxed) as f64,
            );
            page.single(
                "chat_gateway_connections_refused_total",
                Kind::Counter,
                "Client connections closed at once: over the total or per-IP cap.",
                self.connections.refused.load(Relaxed) as f64,
            );
        }
        page.single(
            "chat_gateway_open_streams",
            Kind::Gauge,
            "Subscribe streams open on this gateway.",
            self.sessions.count() as f64,
        );
        page.single(
            "chat_gateway_push_queued_bytes",
            Kind::Gauge,
            "Message bytes queued for subscribers, every session together (bounded past each session's floor).",
            self.sessions.push_budget.used() as f64,
        );
        page.single(
            "chat_gateway_send_streams",
            Kind::Gauge,
            "SendStream streams open on this gateway.",
            self.sessions.send_streams() as f64,
        );
        page.single(
            "chat_gateway_routers_available",
            Kind::Gauge,
            "Routers answering health checks and not ejected.",
            self.pool.available_count() as f64,
        );
        page.single(
            "chat_gateway_degraded_features",
            Kind::Gauge,
            "Features degraded now (the store has no quorum).",
            self.sessions
                .status()
                .map_or(0, |s| s.affected_features.len()) as f64,
        );
        chat_rollout::render_metrics(&mut page, self.pool.plan().as_ref().map(|(_, p)| p));
        page.finish()
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD hh:mm:ss UTC`.
fn utc(ms: i64) -> String {
    let (y, mo, d, h, mi, s) = chat_telemetry::time::utc(ms.div_euclid(1_000));
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

/// The status page: rendered on the server, refreshed every 5 s.
pub fn html(status: &Value) -> String {
    let overall = status["overall"].as_str().unwrap_or("unknown");
    let mut rows = String::new();
    let mut row = |kind: &str, name: &Value, state: &Value, detail: String| {
        let st = state.as_str().unwrap_or("unknown");
        rows.push_str(&format!(
            "<tr class=\"{}\" data-component=\"{}\"><td>{}</td><td>{}</td><td class=\"state\">{}</td><td>{}</td></tr>\n",
            esc(&st.replace(' ', "-")),
            text(name),
            text(name),
            esc(kind),
            esc(st),
            detail
        ));
    };
    let g = &status["gateway"];
    row(
        "gateway (this one)",
        &g["address"],
        &g["state"],
        format!(
            "version {} · release {} · {} subscriptions",
            text(&g["version"]),
            text(&g["release"]),
            text(&g["subscriptions"])
        ),
    );
    for r in status["routers"].as_array().into_iter().flatten() {
        row(
            "router",
            &r["name"],
            &r["state"],
            format!(
                "version {} · release {} · last answer {} s ago",
                text(&r["version"]),
                text(&r["release"]),
                text(&r["last_answer_s_ago"])
            ),
        );
    }
    let s = &status["store"];
    for r in s["replicas"].as_array().into_iter().flatten() {
        let addr = r["address"].as_str().unwrap_or("");
        let name = match r["id"].as_u64() {
            Some(id) if id > 0 => json!(format!("store replica {id} at {addr}")),
            _ => json!(format!("store replica at {addr}")),
        };
        row(
            "store",
            &name,
            &r["state"],
            format!(
                "{} · term {} · applied {} · lag {} entries · version {}",
                text(&r["role"]),
                text(&r["term"]),
                text(&r["applied_index"]),
                text(&r["replication_lag_entries"]),
                text(&r["version"])
            ),
        );
    }
    let degraded: Vec<String> = status["degraded_features"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    let degraded = if degraded.is_empty() {
        "none".to_owned()
    } else {
        degraded.join(", ")
    };
    let rollout = match &status["rollout"] {
        Value::Null => "none".to_owned(),
        r => format!(
            "{} canary {} {} at {} % (step {}); {}",
            text(&r["service"]),
            text(&r["canary"]),
            text(&r["state"]),
            text(&r["weight_percent"]),
            text(&r["step"]),
            text(&r["last_decision"])
        ),
    };
    let mut incidents = String::new();
    for i in status["incidents"].as_array().into_iter().flatten() {
        let open = i["open"] == true;
        incidents.push_str(&format!(
            "<li class=\"{}\">{}<strong>{}</strong> <small>(posted {}{})</small></li>\n",
            if open { "open" } else { "resolved" },
            if open { "OPEN: " } else { "resolved: " },
            text(&i["text"]),
            utc(i["posted_ms"].as_i64().unwrap_or(0)),
            match i["resolved_ms"].as_i64() {
                Some(ms) => format!(", resolved {}", utc(ms)),
                None => String::new(),
            }
        ));
    }
    if incidents.is_empty() {
        incidents.push_str("<li>no incidents</li>\n");
    }
    format!(
        "<!doctype html>
<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">
<title>Chat service status: {overall}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }}
tr.up .state {{ color: #176317; }} tr.down .state, tr.unknown .state {{ color: #a11; font-weight: bold; }}
tr.catching-up .state {{ color: #a60; }} li.open {{ color: #a11; }}
</style></head>
<body>
<h1 id=\"overall\" data-overall=\"{overall}\">Chat service: {overall}</h1>
<h2>Incidents</h2>
<ul id=\"incidents\">
{incidents}</ul>
<h2>Components</h2>
<table id=\"components\"><tr><th>component</th><th>kind</th><th>state</th><th>detail</th></tr>
{rows}</table>
<p id=\"leader\">store leader: replica {leader} (term {term}); as routers saw it {seen} s ago</p>
<p id=\"degraded\">degraded features: {degraded}</p>
<p id=\"rollout\">rollout: {rollout}</p>
<p><small>JSON: <a href=\"/status\">/status</a> · metrics: <a href=\"/metrics\">/metrics</a></small></p>
</body></html>
",
        leader = text(&s["leader_id"]),
        term = text(&s["term"]),
        seen = text(&s["seen_s_ago"]),
    )
}

impl Handler for GatewayAdmin {
    async fn handle(&self, path: &str) -> Reply {
        match path {
            "/metrics" => Reply::ok(METRICS, self.metrics()),
            "/status" | "/status.json" => Reply::ok(
                "application/json",
                serde_json::to_string_pretty(&self.status()).unwrap_or_default(),
            ),
            "/" | "/status.html" => Reply::ok("text/html; charset=utf-8", html(&self.status())),
            p => Reply::not_found(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(leader: bool) -> Option<rpb::RegisterSessionsResponse> {
        Some(rpb::RegisterSessionsResponse {
            store: vec![ReplicaView {
                address: "s1".into(),
                reachable: true,
                id: 1,
                role: if leader { "leader" } else { "follower" }.into(),
                ..ReplicaView::default()
            }],
            ..Default::default()
        })
    }

    #[test]
    fn the_cluster_is_starting_until_every_tier_was_heard_once() {
        let view = ClusterView::new(2);
        let now = Instant::now();
        assert!(view.starting(now), "nothing heard yet");
        view.heard(&[answer(true), None]);
        assert!(view.starting(now), "one router of two has answered");
        view.heard(&[None, answer(false)]);
        assert!(view.starting(now), "both routers, but no store leader yet");
        view.heard(&[answer(true), None]);
        assert!(!view.starting(now), "every tier heard once");
        // Settled for good: what is heard later is judged as it is.
        view.heard(&[None, None]);
        assert!(!view.starting(now));
    }

    #[test]
    fn a_part_never_heard_from_is_an_outage_after_the_start_window() {
        let view = ClusterView::new(1);
        assert!(view.starting(Instant::now()));
        assert!(!view.starting(Instant::now() + STARTING_AT_MOST));
    }

    #[test]
    fn the_page_names_every_part_and_escapes_what_operators_typed() {
        let status = json!({
            "overall": "degraded",
            "gateway": {"address": "127.0.0.1:7201", "state": "up", "version": "0.1.0", "release": "stable", "subscriptions": 3},
            "routers": [{"name": "r1", "state": "down", "release": "stable", "version": "0.1.0", "last_answer_s_ago": 9.5}],
            "store": {"leader_id": 1, "term": 4, "seen_s_ago": 0.4, "replicas": [
                {"address": "s2", "id": 2, "state": "down", "role": "", "term": 0, "applied_index": 0, "replication_lag_entries": null, "version": ""}
            ]},
            "degraded_features": [],
            "rollout": null,
            "incidents": [{"id": "i1", "text": "<script>x</script> slow sends", "posted_ms": 1, "resolved_ms": null, "open": true}],
        });
        let page = html(&status);
        assert!(page.contains("data-overall=\"degraded\""), "{page}");
        assert!(
            page.contains("<tr class=\"down\" data-component=\"r1\">"),
            "{page}"
        );
        assert!(
            page.contains("<tr class=\"down\" data-component=\"store replica 2 at s2\">"),
            "{page}"
        );
        assert!(
            page.contains("&lt;script&gt;x&lt;/script&gt; slow sends"),
            "{page}"
        );
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("<td>r1</td><td>router</td>"), "{page}");
        assert!(page.contains("(posted 1970-01-01 00:00:00 UTC)"), "{page}");
        assert_eq!(utc(1_796_038_682_501), "2026-11-30 11:38:02 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
