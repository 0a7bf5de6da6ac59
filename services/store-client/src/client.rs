//! Client of the store used by routers, tools and tests.
//!
//! Holds every replica's address (never a single name), sends each call to
//! the leader it last heard of, follows `NotLeader` hints at once, and
//! retries retryable failures on the next replica with exponential backoff
//! and full jitter until the call's deadline. Every store operation is
//! idempotent (appends through their client message id), so retrying one
//! whose outcome is unknown never duplicates anything.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use chat_proto::store::v1 as api;
use chat_proto::store::v1::store_admin_client::StoreAdminClient;
use chat_proto::store::v1::store_client::StoreClient as RawStoreClient;
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::error::StoreError;

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

struct Route {
    /// Address of the replica believed to lead.
    leader: Option<String>,
    /// Next replica to try when no leader is known.
    next: usize,
}

pub struct StoreClient {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    route: Mutex<Route>,
    /// The leader's address whenever this client learns a new one: a call
    /// waiting on another replica gives up on it and goes there.
    moved: tokio::sync::watch::Sender<Option<String>>,
    deadline: Duration,
    tls: Option<std::sync::Arc<chat_security::Tls>>,
}

/// Resolves once the leader is known to be somewhere other than `addr`.
async fn moved_elsewhere(moved: &mut tokio::sync::watch::Receiver<Option<String>>, addr: &str) {
    loop {
        if moved.changed().await.is_err() {
            return std::future::pending().await;
        }
        if moved
            .borrow_and_update()
            .as_deref()
            .is_some_and(|l| l != addr)
        {
            return;
        }
    }
}

impl StoreClient {
    /// `endpoints` are host:port of the replicas; `deadline` bounds each
    /// call including its retries.
    pub fn new(endpoints: Vec<String>, deadline: Duration) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidArgument(
                "no store endpoints given".into(),
            ));
        }
        Ok(Self {
            endpoints,
            channels: Mutex::new(HashMap::new()),
            route: Mutex::new(Route {
                leader: None,
                next: 0,
            }),
            moved: tokio::sync::watch::Sender::new(None),
            deadline,
            tls: None,
        })
    }

    /// Dials the replicas with mutual TLS, presenting this identity (a
    /// router's or an operator's); without it, plaintext.
    pub fn with_tls(mut self, tls: Option<std::sync::Arc<chat_security::Tls>>) -> Self {
        self.tls = tls;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, addr: &str) -> Result<Channel, StoreError> {
        let mut channels = self.channels.lock().expect("client lock poisoned");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = chat_security::endpoint(self.tls.as_deref(), addr, chat_security::Role::Store)
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            // A leader that stops answering (paused, hung, cut off) is
            // dropped within about 1 s, so calls move on to the new leader.
            .http2_keep_alive_interval(Duration::from_millis(500))
            .keep_alive_timeout(Duration::from_millis(500))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    fn target(&self) -> String {
        let mut r = self.route.lock().expect("client lock poisoned");
        if let Some(l) = &r.leader {
            return l.clone();
        }
        let addr = self.endpoints[r.next % self.endpoints.len()].clone();
        r.next += 1;
        addr
    }

    fn learn(&self, leader: Option<String>) {
        if let Some(l) = &leader {
            self.moved.send_if_modified(|m| {
                let changed = m.as_ref() != Some(l);
                if changed {
                    *m = Some(l.clone());
                }
                changed
            });
        }
        self.route.lock().expect("client lock poisoned").leader = leader;
    }

    /// Someone who asked the replicas (the router's status poller) found
    /// the replica at `addr` leading. Calls waiting on another replica give
    /// up on it and go there: a leader that vanished (a killed container's
    /// address) may leave calls to it waiting until their deadline, since
    /// nothing resets the connection. Every call through this client is
    /// safe to send twice (appends carry their client message id).
    pub fn leader_is(&self, addr: &str) {
        if self.endpoints.iter().any(|e| e == addr) {
            self.learn(Some(addr.to_owned()));
        }
    }

    /// Runs `call` against the leader, following hints and retrying.
    pub async fn with_leader<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut backoff = BACKOFF_MIN;
        let mut hops = 0usize;
        let mut moved = self.moved.subscribe();
        loop {
            let addr = self.target();
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            moved.mark_unchanged();
            let result = tokio::select! {
                r = tokio::time::timeout(remaining, call(self.channel(&addr)?)) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(StoreError::Unavailable(format!(
                            "no answer within {:?}",
                            self.deadline
                        )));
                    }
                },
                () = moved_elsewhere(&mut moved, &addr) => continue,
            };
            let err = match result {
                Ok(resp) => {
                    self.learn(Some(addr));
                    return Ok(resp.into_inner());
                }
                Err(status) => StoreError::from_status(&status),
            };
            let wait = match &err {
                StoreError::NotLeader {
                    leader: Some((_, hint)),
                } if hint != &addr && hops < 2 * self.endpoints.len() => {
                    hops += 1;
                    self.learn(Some(hint.clone()));
                    Duration::ZERO
                }
                StoreError::Overloaded { retry_after } => *retry_after,
                e if e.is_retryable() => {
                    self.learn(None);
                    hops = 0;
                    let w = backoff.mul_f64(rand::random::<f64>());
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
                _ => return Err(err),
            };
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
        }
    }

    pub async fn append(&self, req: api::AppendRequest) -> Result<api::AppendResponse, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .append(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn append_batch(
        &self,
        req: api::AppendBatchRequest,
    ) -> Result<api::AppendBatchResponse, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .max_decoding_message_size(64 << 20)
                    .append_batch(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn read(&self, req: api::ReadRequest) -> Result<api::ReadResponse, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .max_decoding_message_size(256 << 20)
                    .read(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn create_conversation(
        &self,
        req: api::CreateConversationRequest,
    ) -> Result<api::ConversationInfo, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .create_conversation(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn add_member(
        &self,
        req: api::MemberRequest,
    ) -> Result<api::ConversationInfo, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .add_member(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn remove_member(
        &self,
        req: api::MemberRequest,
    ) -> Result<api::ConversationInfo, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .remove_member(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn get_conversation(
        &self,
        req: api::GetConversationRequest,
    ) -> Result<api::ConversationInfo, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .get_conversation(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn list_conversations(
        &self,
        req: api::ListConversationsRequest,
    ) -> Result<api::ListConversationsResponse, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .max_decoding_message_size(64 << 20)
                    .list_conversations(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    pub async fn last_seqs(
        &self,
        req: api::LastSeqsRequest,
    ) -> Result<api::LastSeqsResponse, StoreError> {
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .last_seqs(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    /// A setting, read through the leader (revision 0: never written).
    pub async fn get_setting(&self, key: &str) -> Result<api::Setting, StoreError> {
        let req = api::GetSettingRequest {
            key: key.to_owned(),
            consistency: api::Consistency::Linearizable as i32,
        };
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .get_setting(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    /// Writes a setting; with `expected` Some, only if its revision is still
    /// that (otherwise `Conflict`). A retried put whose first try was
    /// applied also ends in `Conflict`: read again to see which.
    pub async fn put_setting(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<api::Setting, StoreError> {
        let req = api::PutSettingRequest {
            key: key.to_owned(),
            value,
            check_revision: expected.is_some(),
            expected_revision: expected.unwrap_or(0),
        };
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .put_setting(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
    }

    /// Settings under `prefix`, through the leader.
    pub async fn list_settings(&self, prefix: &str) -> Result<Vec<api::Setting>, StoreError> {
        let req = api::ListSettingsRequest {
            prefix: prefix.to_owned(),
            consistency: api::Consistency::Linearizable as i32,
        };
        self.with_leader(|c| {
            let req = req.clone();
            async move {
                RawStoreClient::new(c)
                    .max_decoding_message_size(64 << 20)
                    .list_settings(chat_telemetry::trace::traced(req))
                    .await
            }
        })
        .await
        .map(|r| r.settings)
    }

    /// Reads a conversation from one given replica, without retries (for
    /// stale reads and checks of a particular replica).
    pub async fn read_from(
        &self,
        addr: &str,
        req: api::ReadRequest,
    ) -> Result<api::ReadResponse, StoreError> {
        let mut c = RawStoreClient::new(self.channel(addr)?).max_decoding_message_size(256 << 20);
        c.read(chat_telemetry::trace::traced(req))
            .await
            .map(Response::into_inner)
            .map_err(|s| StoreError::from_status(&s))
    }

    /// Lists a user's conversations as one given replica has them, without
    /// retries (for stale reads).
    pub async fn list_conversations_from(
        &self,
        addr: &str,
        req: api::ListConversationsRequest,
    ) -> Result<api::ListConversationsResponse, StoreError> {
        let mut c = RawStoreClient::new(self.channel(addr)?).max_decoding_message_size(64 << 20);
        c.list_conversations(chat_telemetry::trace::traced(req))
            .await
            .map(Response::into_inner)
            .map_err(|s| StoreError::from_status(&s))
    }

    /// Status of one given replica.
    pub async fn status_of(&self, addr: &str) -> Result<api::StatusResponse, StoreError> {
        let mut c = StoreAdminClient::new(self.channel(addr)?);
        c.status(api::StatusRequest {})
            .await
            .map(Response::into_inner)
            .map_err(|s| StoreError::from_status(&s))
    }

    pub async fn add_learner(
        &self,
        id: u64,
        address: &str,
    ) -> Result<api::MembershipResponse, StoreError> {
        let req = api::AddLearnerRequest {
            id,
            address: address.to_owned(),
        };
        self.with_leader(|c| {
            let req = req.clone();
            async move { StoreAdminClient::new(c).add_learner(req).await }
        })
        .await
    }

    pub async fn promote(&self, id: u64) -> Result<api::MembershipResponse, StoreError> {
        self.with_leader(|c| async move {
            StoreAdminClient::new(c)
                .promote(api::ReplicaRequest { id })
                .await
        })
        .await
    }

    pub async fn remove_replica(&self, id: u64) -> Result<api::MembershipResponse, StoreError> {
        self.with_leader(|c| async move {
            StoreAdminClient::new(c)
                .remove_replica(api::ReplicaRequest { id })
                .await
        })
        .await
    }

    /// Starts a backup on the leader: a stream of the header, then the
    /// snapshot file in chunks (see `StoreAdmin/Backup`).
    pub async fn backup(&self) -> Result<tonic::Streaming<api::BackupChunk>, StoreError> {
        self.with_leader(|c| async move {
            StoreAdminClient::new(c)
                .max_decoding_message_size(4 << 20)
                .backup(api::BackupRequest {})
                .await
        })
        .await
    }

    /// Moves leadership to `id` (0: the most up-to-date other voter).
    pub async fn transfer_leader(&self, id: u64) -> Result<api::StatusResponse, StoreError> {
        self.with_leader(|c| async move {
            StoreAdminClient::new(c)
                .transfer_leader(api::ReplicaRequest { id })
                .await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_call_waiting_on_a_vanished_leader_moves_to_the_one_found_leading() {
        let client = Arc::new(
            StoreClient::new(
                vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
                Duration::from_secs(30),
            )
            .unwrap(),
        );
        let attempts = Arc::new(AtomicUsize::new(0));
        let call = {
            let (client, attempts) = (client.clone(), attempts.clone());
            tokio::spawn(async move {
                client
                    .with_leader(|_| {
                        let n = attempts.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if n == 0 {
                                // The first replica never answers, as a
                                // killed container's address does not.
                                std::future::pending::<()>().await;
                            }
                            Ok(Response::new(n))
                        }
                    })
                    .await
            })
        };
        while attempts.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Telling it of the replica it already waits on changes nothing.
        client.leader_is("127.0.0.1:1");
        client.leader_is("127.0.0.9:9");
        tokio::task::yield_now().await;
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        client.leader_is("127.0.0.1:2");
        let answered = call.await.unwrap().expect("answered by the new leader");
        assert_eq!(answered, 1, "the second attempt answered");
    }
}
