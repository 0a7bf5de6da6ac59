//! The `Router` gRPC service: forwards to the store (the store client
//! follows the leader) and, after each committed append, pushes the message
//! to the gateways of the conversation's online members.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_proto::router::v1 as rpb;
use chat_proto::router::v1::router_server::Router;
use chat_proto::store::v1 as spb;
use chat_resilience::deadline::{self, Deadline};
use chat_resilience::with_retry_after;
use chat_store_client::{StoreClient, StoreError};
use tonic::{Request, Response, Status};

use crate::directory::Directory;
use crate::fanout::Fanout;
use crate::quorum::{DEGRADED_FEATURES, Quorum};
use crate::rollout::{Faults, Rollout};

/// When clients should try a send again while the store has no quorum.
const RETRY_SEND_AFTER: Duration = Duration::from_secs(1);
/// When clients should try typing again while the store has no quorum.
const RETRY_TYPING_AFTER: Duration = Duration::from_secs(5);

/// Longest lease a gateway may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(60);

pub struct RouterService {
    pub store: Arc<StoreClient>,
    pub directory: Arc<Directory>,
    pub fanout: Arc<Fanout>,
    /// Store replicas, for stale reads while there is no quorum.
    pub replicas: Vec<String>,
    /// Deadline of a store call when the caller has none nearer.
    pub store_timeout: Duration,
    /// `None`: degraded mode switched off (calls wait out their deadline).
    pub quorum: Option<Arc<Quorum>>,
    /// The store replicas as last polled (whether or not degraded mode is
    /// on).
    pub store_view: Arc<Quorum>,
    /// The rollout plan and the gateways' reports on it.
    pub rollout: Arc<Rollout>,
    /// Faults injected into client traffic (drills).
    pub faults: Faults,
}

fn status(e: StoreError) -> Status {
    Status::from(e)
}

impl RouterService {
    fn quorum_lost(&self) -> bool {
        self.quorum.as_ref().is_some_and(|q| q.lost())
    }

    /// Runs a store call within the caller's deadline.
    async fn bounded<T>(
        &self,
        caller: Option<Deadline>,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(deadline::budget(self.store_timeout, caller), call).await {
            Ok(r) => r.map_err(status),
            Err(_) => Err(Status::deadline_exceeded(
                "the store did not answer within the caller's deadline",
            )),
        }
    }

    /// `call` on whichever replica answers first, in order, each within a
    /// second (for stale reads while there is no quorum).
    async fn on_any_replica<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut last = Status::unavailable("no store replica answered");
        for addr in &self.replicas {
            match tokio::time::timeout(Duration::from_secs(1), call(addr.clone())).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if !e.is_retryable() => return Err(status(e)),
                Ok(Err(e)) => last = status(e),
                Err(_) => {}
            }
        }
        Err(last)
    }

    /// A read as of what some replica has applied, flagged stale.
    async fn stale_read(&self, mut req: spb::ReadRequest) -> Result<spb::ReadResponse, Status> {
        req.consistency = spb::Consistency::Stale as i32;
        let mut page = self
            .on_any_replica(|addr| {
                let req = req.clone();
                async move { self.store.read_from(&addr, req).await }
            })
            .await?;
        page.stale = true;
        Ok(page)
    }

    fn deliver(&self, recipients: &[String], kind: rpb::delivery::Kind) {
        for (gateway, user_ids) in self.directory.locate(recipients.iter()) {
            self.fanout.push(
                &gateway,
                rpb::Delivery {
                    user_ids,
                    kind: Some(kind.clone()),
                },
            );
        }
    }
}

#[tonic::async_trait]
impl Router for RouterService {
    async fn append_batch(
        &self,
        request: Request<spb::AppendBatchRequest>,
    ) -> Result<Response<spb::AppendBatchResponse>, Status> {
        self.faults.inject().await?;
        if self.quorum_lost() {
            return Err(with_retry_after(
                Status::unavailable(
                    "the message store has lost its quorum; sends are paused until it returns",
                ),
                RETRY_SEND_AFTER,
            ));
        }
        let caller = deadline::of(&request);
        let req = request.into_inner();
        chat_telemetry::trace::record("messages", &req.items.len());
        let resp = self
            .bounded(caller, self.store.append_batch(req.clone()))
            .await?;
        let members: HashMap<&str, &[String]> = resp
            .members
            .iter()
            .map(|m| (m.conversation_id.as_str(), m.members.as_slice()))
            .collect();
        for (item, outcome) in req.items.into_iter().zip(&resp.items) {
            let Some(spb::append_outcome::Outcome::Ok(ok)) = &outcome.outcome else {
                continue;
            };
            // A duplicate's stored body may differ from this request's;
            // subscribers get the stored one from the store (sweep).
            if ok.duplicate {
                continue;
            }
            let Some(recipients) = members.get(item.conversation_id.as_str()) else {
                continue;
            };
            let message = spb::StoredMessage {
                conversation_id: item.conversation_id,
                seq: ok.seq,
                sender: item.sender,
                client_msg_id: item.client_msg_id,
                body: item.body,
                server_ts_ms: ok.server_ts_ms,
            };
            self.deliver(recipients, rpb::delivery::Kind::Message(message));
        }
        Ok(Response::new(resp))
    }

    async fn read(
        &self,
        request: Request<spb::ReadRequest>,
    ) -> Result<Response<spb::ReadResponse>, Status> {
        self.faults.inject().await?;
        let caller = deadline::of(&request);
        let req = request.into_inner();
        if self.quorum_lost() {
            return self.stale_read(req).await.map(Response::new);
        }
        self.bounded(caller, self.store.read(req))
            .await
            .map(Response::new)
    }

    async fn create_conversation(
        &self,
        request: Request<spb::CreateConversationRequest>,
    ) -> Result<Response<spb::ConversationInfo>, Status> {
        self.faults.inject().await?;
        self.store
            .create_conversation(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn add_member(
        &self,
        request: Request<spb::MemberRequest>,
    ) -> Result<Response<spb::ConversationInfo>, Status> {
        self.faults.inject().await?;
        self.store
            .add_member(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn remove_member(
        &self,
        request: Request<spb::MemberRequest>,
    ) -> Result<Response<spb::ConversationInfo>, Status> {
        self.faults.inject().await?;
        self.store
            .remove_member(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_conversations(
        &self,
        request: Request<spb::ListConversationsRequest>,
    ) -> Result<Response<spb::ListConversationsResponse>, Status> {
        self.faults.inject().await?;
        let caller = deadline::of(&request);
        let mut req = request.into_inner();
        if self.quorum_lost() {
            // What some replica has applied: enough for subscribers to keep
            // catching up on what was committed before the quorum went.
            req.consistency = spb::Consistency::Stale as i32;
            return self
                .on_any_replica(|addr| {
                    let req = req.clone();
                    async move { self.store.list_conversations_from(&addr, req).await }
                })
                .await
                .map(Response::new);
        }
        self.bounded(caller, self.store.list_conversations(req))
            .await
            .map(Response::new)
    }

    async fn last_seqs(
        &self,
        request: Request<spb::LastSeqsRequest>,
    ) -> Result<Response<spb::LastSeqsResponse>, Status> {
        self.faults.inject().await?;
        self.store
            .last_seqs(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn typing(
        &self,
        request: Request<rpb::TypingRequest>,
    ) -> Result<Response<rpb::TypingResponse>, Status> {
        self.faults.inject().await?;
        if self.quorum_lost() {
            return Err(with_retry_after(
                Status::unavailable(
                    "typing indicators are off while the message store has no quorum",
                ),
                RETRY_TYPING_AFTER,
            ));
        }
        let caller = deadline::of(&request);
        let r = request.into_inner();
        let hidden = || Status::from(StoreError::not_visible(&r.conversation_id, &r.user_id));
        let conv = self
            .bounded(
                caller,
                self.store.get_conversation(spb::GetConversationRequest {
                    conversation_id: r.conversation_id.clone(),
                    consistency: spb::Consistency::Stale as i32,
                }),
            )
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::NotFound {
                    hidden()
                } else {
                    s
                }
            })?;
        if !conv.members.contains(&r.user_id) {
            return Err(hidden());
        }
        let others: Vec<String> = conv
            .members
            .into_iter()
            .filter(|m| *m != r.user_id)
            .collect();
        self.deliver(
            &others,
            rpb::delivery::Kind::Typing(rpb::TypingEvent {
                conversation_id: r.conversation_id,
                user_id: r.user_id,
            }),
        );
        Ok(Response::new(rpb::TypingResponse {}))
    }

    async fn register_sessions(
        &self,
        request: Request<rpb::RegisterSessionsRequest>,
    ) -> Result<Response<rpb::RegisterSessionsResponse>, Status> {
        let r = request.into_inner();
        if r.gateway_address.is_empty() {
            return Err(Status::invalid_argument("gateway_address is empty"));
        }
        if !self.rollout.loaded() {
            return Err(Status::unavailable(
                "this router has not read the rollout plan yet; it takes registrations once it has",
            ));
        }
        let lease = Duration::from_millis(u64::from(r.lease_ms));
        if lease.is_zero() || lease > MAX_LEASE {
            return Err(Status::invalid_argument(format!(
                "lease of {} ms is outside 1..={} ms",
                r.lease_ms,
                MAX_LEASE.as_millis()
            )));
        }
        self.directory
            .register(&r.gateway_address, r.user_ids, lease);
        self.rollout.report(&r.gateway_address, r.rollout);
        let (plan_revision, plan) = self
            .rollout
            .plan()
            .map_or((0, None), |(rev, p)| (rev, Some(p)));
        let degraded = if self.quorum_lost() {
            DEGRADED_FEATURES.iter().map(|f| f.to_string()).collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(rpb::RegisterSessionsResponse {
            degraded,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            release: self.rollout.release.clone(),
            plan,
            plan_revision,
            incidents: self.rollout.incidents(),
            store: self.store_view.views(),
        }))
    }
}
