//! Whether the store can commit: a router asks every replica for its
//! status a few times a second, and the store has a quorum while some
//! replica it can reach is a leader or follows one. (Replicas run raft with
//! check-quorum, so a leader cut off from the majority steps down within an
//! election timeout, and its followers forget it the same way.)
//!
//! The store counts as degraded only after no leader has been seen for
//! `DEGRADED_AFTER`, longer than a normal election, so a leader change is
//! ridden out by retries and only a real loss of quorum switches the
//! router to degraded mode: sends and typing refused at once with a
//! retry-after hint, history served from any replica's applied state and
//! flagged stale. The first leader seen again ends it.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use chat_proto::status::v1::ReplicaView;
use std::time::Duration;

use chat_store_client::StoreClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the replicas are asked.
pub const POLL: Duration = Duration::from_millis(250);
/// No leader for this long: the store has lost its quorum.
pub const DEGRADED_AFTER: Duration = Duration::from_millis(2_000);
/// Longest wait for one replica's status.
const STATUS_TIMEOUT: Duration = Duration::from_millis(400);

/// Features a router cannot serve normally while the store has no quorum.
pub const DEGRADED_FEATURES: [&str; 3] = ["send", "typing", "history-stale"];

#[derive(Default)]
pub struct Quorum {
    lost: AtomicBool,
    /// Every replica as last polled (for the status page).
    views: RwLock<Vec<ReplicaView>>,
}

impl Quorum {
    /// Whether the store has lost its quorum (as far as this router sees).
    pub fn lost(&self) -> bool {
        self.lost.load(Relaxed)
    }

    /// Every replica as last polled.
    pub fn views(&self) -> Vec<ReplicaView> {
        self.views.read().expect("quorum lock poisoned").clone()
    }

    /// Polls `replicas` until `stop`.
    pub async fn watch(
        self: Arc<Self>,
        store: Arc<StoreClient>,
        replicas: Vec<String>,
        stop: CancellationToken,
    ) {
        let mut last_seen = Instant::now();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let polls = replicas.iter().map(|addr| {
                let store = store.clone();
                async move { tokio::time::timeout(STATUS_TIMEOUT, store.status_of(addr)).await }
            });
            let answers = futures::future::join_all(polls).await;
            let has_leader = answers
                .iter()
                .any(|r| matches!(r, Ok(Ok(s)) if s.role == "leader" || s.leader_id != 0));
            // Calls waiting on a vanished leader move to the new one as soon
            // as it says it leads (the latest term's, should a cut-off old
            // leader still say so too).
            let leading = replicas
                .iter()
                .zip(&answers)
                .filter_map(|(addr, r)| match r {
                    Ok(Ok(s)) if s.role == "leader" => Some((s.term, addr)),
                    _ => None,
                })
                .max_by_key(|(term, _)| *term);
            if let Some((_, addr)) = leading {
                store.leader_is(addr);
            }
            let views = replicas
                .iter()
                .zip(&answers)
                .map(|(addr, r)| match r {
                    Ok(Ok(s)) => ReplicaView {
                        address: addr.clone(),
                        reachable: true,
                        id: s.id,
                        role: s.role.clone(),
                        term: s.term,
                        leader_id: s.leader_id,
                        commit_index: s.commit_index,
                        applied_index: s.applied_index,
                        serving: s.serving,
                        version: s.version.clone(),
                    },
                    _ => ReplicaView {
                        address: addr.clone(),
                        ..Default::default()
                    },
                })
                .collect();
            *self.views.write().expect("quorum lock poisoned") = views;
            let now = Instant::now();
            if has_leader {
                last_seen = now;
                if self.lost.swap(false, Relaxed) {
                    tracing::info!("store quorum is back: leaving degraded mode");
                }
            } else if now.duration_since(last_seen) >= DEGRADED_AFTER
                && !self.lost.swap(true, Relaxed)
            {
                tracing::warn!(
                    no_leader_for_ms = now.duration_since(last_seen).as_millis() as u64,
                    "store has no quorum: degraded mode (sends and typing refused, history stale)"
                );
            }
        }
    }
}
