//! The public `chat.v1.Chat` service and the internal `GatewayDelivery`
//! service routers push to.

use std::collections::HashMap;
use std::sync::Arc;

use chat_proto::chat::v1 as cpb;
use chat_proto::chat::v1::chat_server::Chat;
use chat_proto::router::v1 as rpb;
use chat_proto::router::v1::gateway_delivery_server::GatewayDelivery;
use chat_proto::store::v1 as spb;
use chat_store_client::ids::{ConversationId, validate_client_msg_id};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use chat_resilience::Criticality;
use chat_resilience::deadline;

use crate::batcher::SendBatcher;
use crate::routers::{RouterPool, via_router};
use crate::sessions::{OUT_QUEUE, Outgoing, Push, Session, Sessions};

/// The authenticated user of a request, set by the [`crate::guard::Guard`],
/// and when their token expires (unix seconds).
#[derive(Clone, Debug)]
pub struct User(pub String, pub u64);

/// Open subscriptions one user may hold on one gateway.
pub const MAX_SESSIONS_PER_USER: usize = 16;
/// Most conversation cursors one Subscribe may carry.
pub const MAX_CURSORS: usize = 10_000;
/// Most conversations ListConversations returns.
pub const MAX_LISTED: u32 = 1_000;

/// The authenticated caller of a request, with their token's expiry.
fn caller<T>(req: &Request<T>) -> Result<User, Status> {
    req.extensions()
        .get::<User>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))
}

fn user_of<T>(req: &Request<T>) -> Result<String, Status> {
    caller(req).map(|u| u.0)
}

fn conversation(c: spb::ConversationInfo) -> cpb::Conversation {
    cpb::Conversation {
        conversation_id: c.conversation_id,
        members: c.members,
        last_seq: c.last_seq,
    }
}

/// A membership change made on behalf of the caller.
fn member_request(request: Request<cpb::MemberRequest>) -> Result<spb::MemberRequest, Status> {
    let user = user_of(&request)?;
    let r = request.into_inner();
    Ok(spb::MemberRequest {
        conversation_id: r.conversation_id,
        user_id: r.user_id,
        requester: user,
    })
}

fn valid_conversation(id: &str) -> Result<(), Status> {
    ConversationId::parse(id).map(|_| ()).map_err(Status::from)
}

/// What every send meets after the guard, unary or streamed: a valid
/// conversation id, client message id and body size, and the sender's byte
/// quota.
pub struct SendChecks {
    pub max_body_bytes: usize,
    /// Message body bytes per user and second (None: no quota).
    pub byte_quota: Option<chat_resilience::bucket::KeyedBuckets<String>>,
}

impl SendChecks {
    /// The store's append for `r` sent by `user`, or why it is refused.
    pub fn check(&self, user: &str, r: cpb::SendRequest) -> Result<spb::AppendRequest, Status> {
        valid_conversation(&r.conversation_id)?;
        validate_client_msg_id(&r.client_msg_id).map_err(Status::from)?;
        if r.body.len() > self.max_body_bytes {
            return Err(Status::invalid_argument(format!(
                "message body is {} bytes, the limit is {}",
                r.body.len(),
                self.max_body_bytes
            )));
        }
        if let Some(q) = &self.byte_quota {
            let n = u32::try_from(r.body.len()).unwrap_or(u32::MAX);
            q.check_n(user, n).map_err(|wait| {
                chat_resilience::over_limit(
                    format!(
                        "{user} sent more than {} message bytes a second; retry later",
                        q.rate().per_second
                    ),
                    wait.min(crate::guard::MAX_RETRY_AFTER),
                )
            })?;
        }
        Ok(spb::AppendRequest {
            conversation_id: r.conversation_id,
            sender: user.to_owned(),
            client_msg_id: r.client_msg_id,
            body: r.body,
        })
    }
}

pub struct ChatApi {
    pub pool: Arc<RouterPool>,
    pub batcher: SendBatcher,
    pub sessions: Arc<Sessions>,
    pub sends: Arc<SendChecks>,
    /// For sends on streams: the per-user rate and the concurrency limit,
    /// which unary calls meet in the admission layer.
    pub guard: Arc<crate::guard::Guard>,
    pub load: Arc<chat_resilience::layer::LoadSignal>,
    /// Call counts and latencies (streamed sends are counted as `Send`).
    pub rpc: Arc<chat_telemetry::metrics::RpcMetrics>,
    pub sweep: crate::sessions::Sweep,
    pub stop: tokio_util::sync::CancellationToken,
}

#[tonic::async_trait]
impl Chat for ChatApi {
    async fn send(
        &self,
        request: Request<cpb::SendRequest>,
    ) -> Result<Response<cpb::SendResponse>, Status> {
        let user = user_of(&request)?;
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        chat_telemetry::trace::record("user", &user.as_str());
        chat_telemetry::trace::record("conversation", &r.conversation_id.as_str());
        let append = self.sends.check(&user, r)?;
        let ok = self.batcher.send(append, deadline).await?;
        chat_telemetry::trace::record("seq", &ok.seq);
        Ok(Response::new(cpb::SendResponse {
            seq: ok.seq,
            server_ts_ms: ok.server_ts_ms,
        }))
    }

    type SendStreamStream = ReceiverStream<Result<cpb::AckFrame, Status>>;

    async fn send_stream(
        &self,
        request: Request<tonic::Streaming<cpb::SendFrame>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let user = caller(&request)?;
        let (out, rx) = mpsc::channel(crate::stream::OUT_FRAMES);
        let stream = crate::stream::SendStream {
            user,
            batcher: self.batcher.clone(),
            sends: self.sends.clone(),
            guard: self.guard.clone(),
            load: self.load.clone(),
            stop: self.stop.clone(),
            open: self.sessions.send_stream_opened(),
            span: tracing::Span::current(),
            rpc: self.rpc.clone(),
        };
        tokio::spawn(stream.run(request.into_inner(), out));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type SubscribeStream =
        futures::stream::Map<ReceiverStream<Outgoing>, fn(Outgoing) -> Result<cpb::Event, Status>>;

    async fn subscribe(
        &self,
        request: Request<cpb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let User(user, expires) = caller(&request)?;
        let r = request.into_inner();
        if r.cursors.len() > MAX_CURSORS {
            return Err(Status::invalid_argument(format!(
                "{} cursors given, the most is {MAX_CURSORS}",
                r.cursors.len()
            )));
        }
        let mut cursors = HashMap::new();
        for c in r.cursors {
            valid_conversation(&c.conversation_id)?;
            cursors.insert(c.conversation_id, c.last_seq);
        }
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let Some((id, pushes)) = self.sessions.open(&user, MAX_SESSIONS_PER_USER) else {
            return Err(Status::resource_exhausted(format!(
                "{user} already has {MAX_SESSIONS_PER_USER} open subscriptions on this gateway"
            )));
        };
        let session = Session {
            user: user.clone(),
            cursors,
            pool: self.pool.clone(),
            out,
            sweep: self.sweep,
            sessions: self.sessions.clone(),
            stop: self.stop.clone(),
            held: HashMap::new(),
            token_expires: expires,
        };
        let sessions = self.sessions.clone();
        tokio::spawn(async move {
            session.run(pushes).await;
            sessions.close(&user, id);
        });
        let unbox: fn(Outgoing) -> Result<cpb::Event, Status> = crate::sessions::unbox;
        Ok(Response::new(futures::StreamExt::map(
            ReceiverStream::new(rx),
            unbox,
        )))
    }

    async fn history(
        &self,
        request: Request<cpb::HistoryRequest>,
    ) -> Result<Response<cpb::HistoryResponse>, Status> {
        let user = user_of(&request)?;
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        valid_conversation(&r.conversation_id)?;
        let req = spb::ReadRequest {
            conversation_id: r.conversation_id,
            after_seq: r.after_seq,
            before_seq: r.before_seq,
            limit: r.limit,
            requester: user.clone(),
            ..Default::default()
        };
        let page = via_router!(self.pool, &user, read, req, Criticality::Normal, deadline)?;
        let messages = page
            .messages
            .into_iter()
            .map(|m| cpb::Message {
                conversation_id: m.conversation_id,
                seq: m.seq,
                sender: m.sender,
                client_msg_id: m.client_msg_id,
                body: m.body,
                server_ts_ms: m.server_ts_ms,
            })
            .collect();
        Ok(Response::new(cpb::HistoryResponse {
            messages,
            stale: page.stale,
        }))
    }

    async fn create_conversation(
        &self,
        request: Request<cpb::CreateConversationRequest>,
    ) -> Result<Response<cpb::Conversation>, Status> {
        let user = user_of(&request)?;
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        let mut members = r.members;
        let creator = user.clone();
        if !members.contains(&user) {
            members.push(user);
        }
        let req = spb::CreateConversationRequest {
            conversation_id: r.conversation_id,
            members,
        };
        let c = via_router!(
            self.pool,
            &creator,
            create_conversation,
            req,
            Criticality::Normal,
            deadline
        )?;
        Ok(Response::new(conversation(c)))
    }

    async fn add_member(
        &self,
        request: Request<cpb::MemberRequest>,
    ) -> Result<Response<cpb::Conversation>, Status> {
        let user = user_of(&request)?;
        let deadline = deadline::of(&request);
        let c = via_router!(
            self.pool,
            &user,
            add_member,
            member_request(request)?,
            Criticality::Normal,
            deadline
        )?;
        Ok(Response::new(conversation(c)))
    }

    async fn remove_member(
        &self,
        request: Request<cpb::MemberRequest>,
    ) -> Result<Response<cpb::Conversation>, Status> {
        let user = user_of(&request)?;
        let deadline = deadline::of(&request);
        let c = via_router!(
            self.pool,
            &user,
            remove_member,
            member_request(request)?,
            Criticality::Normal,
            deadline
        )?;
        Ok(Response::new(conversation(c)))
    }

    async fn list_conversations(
        &self,
        request: Request<cpb::ListConversationsRequest>,
    ) -> Result<Response<cpb::ListConversationsResponse>, Status> {
        let user = user_of(&request)?;
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        if r.limit > MAX_LISTED {
            return Err(Status::invalid_argument(format!(
                "limit {} exceeds {MAX_LISTED}",
                r.limit
            )));
        }
        if !r.after.is_empty() {
            valid_conversation(&r.after)?;
        }
        let req = spb::ListConversationsRequest {
            user_id: user.clone(),
            limit: if r.limit == 0 { MAX_LISTED } else { r.limit },
            after: r.after,
            ..Default::default()
        };
        let l = via_router!(
            self.pool,
            &user,
            list_conversations,
            req,
            Criticality::Normal,
            deadline
        )?;
        Ok(Response::new(cpb::ListConversationsResponse {
            conversations: l.conversations.into_iter().map(conversation).collect(),
            next: l.next,
        }))
    }

    async fn send_typing(
        &self,
        request: Request<cpb::TypingRequest>,
    ) -> Result<Response<cpb::TypingResponse>, Status> {
        let user = user_of(&request)?;
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        valid_conversation(&r.conversation_id)?;
        let req = rpb::TypingRequest {
            conversation_id: r.conversation_id,
            user_id: user.clone(),
        };
        via_router!(
            self.pool,
            &user,
            typing,
            req,
            Criticality::Sheddable,
            deadline
        )?;
        Ok(Response::new(cpb::TypingResponse {}))
    }
}

/// Pushes from routers, handed to the recipients' sessions.
pub struct DeliveryApi {
    pub sessions: Arc<Sessions>,
}

#[tonic::async_trait]
impl GatewayDelivery for DeliveryApi {
    async fn deliver(
        &self,
        request: Request<rpb::DeliverRequest>,
    ) -> Result<Response<rpb::DeliverResponse>, Status> {
        for item in request.into_inner().items {
            // One copy, shared by every session it goes to.
            let make: Box<dyn Fn() -> Push> = match item.kind {
                Some(rpb::delivery::Kind::Message(m)) => {
                    let m = Arc::new(m);
                    Box::new(move || Push::Message(m.clone()))
                }
                Some(rpb::delivery::Kind::Typing(t)) => {
                    let t = Arc::new(t);
                    Box::new(move || Push::Typing(t.clone()))
                }
                None => continue,
            };
            for user in &item.user_ids {
                self.sessions.push(user, &make);
            }
        }
        Ok(Response::new(rpb::DeliverResponse {}))
    }
}
