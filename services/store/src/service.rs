//! gRPC handlers of the `Store` and `StoreAdmin` services: validate the
//! request, hand it to the node, map the outcome. Errors become statuses
//! only through `From<StoreError> for Status`.

use std::future::Future;
use std::time::Duration;

use chat_proto::store::v1 as api;
use chat_proto::store::v1::store_admin_server::StoreAdmin;
use chat_proto::store::v1::store_server::Store;
use tonic::{Request, Response, Status};

use crate::error::StoreError;
use crate::node::{MembershipChange, NodeHandle, ReplicaView, StatusReport};
use crate::types::{
    ConversationId, MAX_SETTING_VALUE, NewMessage, NodeId, Op, OpOutcome, Seq, SettingKey, UserId,
    validate_client_msg_id,
};

/// The settings a router may write: rollout plans.
pub const ROUTER_SETTINGS: &str = "rollout/";
/// Most members a conversation may have (at creation, and when adding).
pub const MAX_MEMBERS: usize = 10_000;
/// Most items in one AppendBatch call.
pub const MAX_BATCH_ITEMS: usize = 4_096;
/// Default and largest page of a Read.
pub const DEFAULT_READ_LIMIT: u32 = 100;
pub const MAX_READ_LIMIT: u32 = 1_000;
/// Most message body bytes in one read: a page that would hold more is cut
/// short (the caller pages on from where it ends), so a response stays a
/// few MiB whatever the limit and the message sizes.
pub const MAX_READ_BYTES: usize = 4 << 20;
/// Most conversations listed or looked up in one call.
pub const MAX_LIST: usize = 10_000;
/// Most member names in one list of conversations (it is cut short past
/// them, keeping at least one conversation).
pub const MAX_LIST_MEMBERS: usize = 100_000;

#[derive(Clone)]
pub struct StoreApi {
    pub node: NodeHandle,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

impl StoreApi {
    async fn within<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.request_timeout, fut).await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer from the raft group within {} ms (is a majority of replicas reachable?)",
                self.request_timeout.as_millis()
            )))
        })
    }

    async fn one(&self, op: Op) -> Result<OpOutcome, StoreError> {
        let mut results = self.within(self.node.propose(vec![op])).await?;
        results
            .pop()
            .unwrap_or_else(|| Err(StoreError::Storage("proposal produced no outcome".into())))
    }

    async fn conversation_op(&self, op: Op) -> Result<Response<api::ConversationInfo>, Status> {
        match self.one(op).await? {
            OpOutcome::Conversation(c) => Ok(Response::new(c.into())),
            other => Err(StoreError::Storage(format!("unexpected outcome {other:?}")).into()),
        }
    }

    fn new_message(&self, r: api::AppendRequest) -> Result<NewMessage, StoreError> {
        let conversation = ConversationId::parse(&r.conversation_id)?;
        let sender = UserId::parse(&r.sender)?;
        validate_client_msg_id(&r.client_msg_id)?;
        if r.body.len() > self.max_body_bytes {
            return Err(StoreError::InvalidArgument(format!(
                "message body is {} bytes, the limit is {}",
                r.body.len(),
                self.max_body_bytes
            )));
        }
        Ok(NewMessage {
            conversation,
            sender,
            client_msg_id: r.client_msg_id,
            body: r.body.into(),
        })
    }

    async fn barrier(&self, consistency: i32) -> Result<bool, StoreError> {
        match api::Consistency::try_from(consistency) {
            Ok(api::Consistency::Linearizable) => {
                self.within(self.node.read_barrier()).await?;
                Ok(false)
            }
            Ok(api::Consistency::Stale) => {
                let s = self.node.status();
                if !s.caught_up {
                    return Err(StoreError::Unavailable(format!(
                        "replica {} is catching up (applied {}); read from another replica",
                        s.id, s.applied
                    )));
                }
                Ok(true)
            }
            Err(_) => Err(StoreError::InvalidArgument(format!(
                "unknown consistency {consistency}"
            ))),
        }
    }
}

fn member_op(r: api::MemberRequest, add: bool) -> Result<Op, StoreError> {
    let conversation = ConversationId::parse(&r.conversation_id)?;
    let user = UserId::parse(&r.user_id)?;
    let by = requester(&r.requester)?;
    Ok(Op::membership(add, conversation, user, by))
}

fn requester(raw: &str) -> Result<Option<UserId>, StoreError> {
    if raw.is_empty() {
        Ok(None)
    } else {
        UserId::parse(raw).map(Some)
    }
}

/// Refuses, before anything is proposed, appends by senders who are not
/// members of their conversation as this replica's applied state says,
/// so they cost no replication and no fdatasync. It decides only when the
/// replica has applied everything it knows to be committed (a new leader
/// may not have yet), and lets a retry of an append already stored go on
/// (its sender may have left since; the retry gets the original seq):
/// otherwise the state machine's own check, which every replica applies,
/// decides.
struct Screen {
    reader: Option<crate::state_machine::Reader>,
    seen: std::collections::HashMap<ConversationId, Option<Vec<UserId>>>,
}

impl Screen {
    fn new(api: &StoreApi) -> Self {
        let st = api.node.status();
        Self {
            reader: (st.role == raft::StateRole::Leader && st.applied >= st.commit)
                .then(|| api.node.reader().clone()),
            seen: std::collections::HashMap::new(),
        }
    }

    fn refuse(&mut self, m: &NewMessage) -> Result<Option<StoreError>, StoreError> {
        let Some(reader) = &self.reader else {
            return Ok(None);
        };
        if !self.seen.contains_key(&m.conversation) {
            let members = reader.members(&m.conversation)?;
            self.seen.insert(m.conversation.clone(), members);
        }
        let member = self.seen[&m.conversation]
            .as_ref()
            .is_some_and(|ms| ms.binary_search(&m.sender).is_ok());
        if member || reader.has_dedup_record(&m.conversation, &m.sender, &m.client_msg_id)? {
            return Ok(None);
        }
        Ok(Some(StoreError::not_visible(&m.conversation, &m.sender)))
    }
}

/// How many of `items`, taken in order, fit in `max` by `size` (at least
/// one, so a page always makes progress).
fn fitting<'a, T: 'a>(
    items: impl Iterator<Item = &'a T>,
    max: usize,
    size: impl Fn(&T) -> usize,
) -> usize {
    let mut total = 0;
    items
        .take_while(|t| {
            total += size(t);
            total <= max
        })
        .count()
        .max(1)
}

/// Cuts `page` (ascending) to at most `max` body bytes, keeping at least one
/// message: the oldest ones when reading forward, the newest when reading
/// backward (`backward`), so paging on from the page's edge loses nothing.
fn cap_bytes(page: &mut Vec<crate::types::StoredMessage>, max: usize, backward: bool) {
    let body = |m: &crate::types::StoredMessage| m.body.len();
    if backward {
        let keep = fitting(page.iter().rev(), max, body);
        page.drain(..page.len().saturating_sub(keep));
    } else {
        page.truncate(fitting(page.iter(), max, body));
    }
}

fn item_error(e: &StoreError) -> api::AppendOutcome {
    api::AppendOutcome {
        outcome: Some(api::append_outcome::Outcome::Error(api::ItemError {
            code: e.code() as i32,
            message: e.to_string(),
        })),
    }
}

#[tonic::async_trait]
impl Store for StoreApi {
    async fn create_conversation(
        &self,
        request: Request<api::CreateConversationRequest>,
    ) -> Result<Response<api::ConversationInfo>, Status> {
        let r = request.into_inner();
        let conversation = ConversationId::parse(&r.conversation_id)?;
        if r.members.is_empty() {
            return Err(StoreError::InvalidArgument(
                "a conversation needs at least one member".into(),
            )
            .into());
        }
        if r.members.len() > MAX_MEMBERS {
            return Err(StoreError::InvalidArgument(format!(
                "{} members requested, the limit is {MAX_MEMBERS}",
                r.members.len()
            ))
            .into());
        }
        let members = r
            .members
            .iter()
            .map(|m| UserId::parse(m))
            .collect::<Result<Vec<_>, _>>()?;
        self.conversation_op(Op::CreateConversation {
            conversation,
            members,
        })
        .await
    }

    async fn add_member(
        &self,
        request: Request<api::MemberRequest>,
    ) -> Result<Response<api::ConversationInfo>, Status> {
        self.conversation_op(member_op(request.into_inner(), true)?)
            .await
    }

    async fn remove_member(
        &self,
        request: Request<api::MemberRequest>,
    ) -> Result<Response<api::ConversationInfo>, Status> {
        self.conversation_op(member_op(request.into_inner(), false)?)
            .await
    }

    async fn append(
        &self,
        request: Request<api::AppendRequest>,
    ) -> Result<Response<api::AppendResponse>, Status> {
        let m = self.new_message(request.into_inner())?;
        if let Some(e) = Screen::new(self).refuse(&m)? {
            return Err(e.into());
        }
        match self.one(Op::Append(m)).await? {
            OpOutcome::Appended(a) => Ok(Response::new(a.into())),
            other => Err(StoreError::Storage(format!("unexpected outcome {other:?}")).into()),
        }
    }

    async fn append_batch(
        &self,
        request: Request<api::AppendBatchRequest>,
    ) -> Result<Response<api::AppendBatchResponse>, Status> {
        let items = request.into_inner().items;
        chat_telemetry::trace::record("messages", &items.len());
        if items.len() > MAX_BATCH_ITEMS {
            return Err(StoreError::InvalidArgument(format!(
                "{} items in one batch, the limit is {MAX_BATCH_ITEMS}",
                items.len()
            ))
            .into());
        }
        let mut out: Vec<Option<api::AppendOutcome>> = Vec::with_capacity(items.len());
        let mut ops = Vec::with_capacity(items.len());
        let mut op_convs = Vec::with_capacity(items.len());
        let mut screen = Screen::new(self);
        for item in items {
            match self.new_message(item) {
                Ok(m) => {
                    if let Some(e) = screen.refuse(&m)? {
                        out.push(Some(item_error(&e)));
                        continue;
                    }
                    op_convs.push(m.conversation.clone());
                    ops.push(Op::Append(m));
                    out.push(None);
                }
                Err(e) => out.push(Some(item_error(&e))),
            }
        }
        let mut results = if ops.is_empty() {
            Vec::new()
        } else {
            self.within(self.node.propose(ops)).await?
        }
        .into_iter();
        let mut op_convs = op_convs.into_iter();
        let mut appended_to = std::collections::BTreeSet::new();
        let items = out
            .into_iter()
            .map(|slot| {
                slot.unwrap_or_else(|| {
                    let conv = op_convs.next();
                    match results.next() {
                        Some(Ok(OpOutcome::Appended(a))) => {
                            appended_to.extend(conv);
                            api::AppendOutcome {
                                outcome: Some(api::append_outcome::Outcome::Ok(a.into())),
                            }
                        }
                        Some(Err(e)) => item_error(&e),
                        _ => item_error(&StoreError::Storage("missing outcome".into())),
                    }
                })
            })
            .collect();
        let mut members = Vec::with_capacity(appended_to.len());
        for conv in appended_to {
            if let Some(m) = self.node.reader().members(&conv)? {
                members.push(api::ConversationMembers {
                    conversation_id: conv.as_str().to_owned(),
                    members: m.into_iter().map(|u| u.as_str().to_owned()).collect(),
                });
            }
        }
        Ok(Response::new(api::AppendBatchResponse { items, members }))
    }

    async fn read(
        &self,
        request: Request<api::ReadRequest>,
    ) -> Result<Response<api::ReadResponse>, Status> {
        let r = request.into_inner();
        let id = ConversationId::parse(&r.conversation_id)?;
        if r.before_seq != 0 && r.before_seq <= r.after_seq {
            return Err(StoreError::InvalidArgument(format!(
                "empty range: after_seq {} and before_seq {}",
                r.after_seq, r.before_seq
            ))
            .into());
        }
        let limit = match r.limit {
            0 => DEFAULT_READ_LIMIT,
            n if n > MAX_READ_LIMIT => {
                return Err(StoreError::InvalidArgument(format!(
                    "limit {n} exceeds {MAX_READ_LIMIT}"
                ))
                .into());
            }
            n => n,
        };
        let who = requester(&r.requester)?;
        let stale = self.barrier(r.consistency).await?;
        let reader = self.node.reader();
        let conv = crate::state_machine::visible_to(reader.conversation(&id)?, &id, who.as_ref())?;
        let mut messages =
            reader.messages(&id, Seq(r.after_seq), Seq(r.before_seq), limit as usize)?;
        cap_bytes(&mut messages, MAX_READ_BYTES, r.before_seq != 0);
        Ok(Response::new(api::ReadResponse {
            messages: messages.into_iter().map(Into::into).collect(),
            last_seq: conv.last_seq.0,
            stale,
            replica_id: self.node.id().0,
        }))
    }

    async fn list_conversations(
        &self,
        request: Request<api::ListConversationsRequest>,
    ) -> Result<Response<api::ListConversationsResponse>, Status> {
        let r = request.into_inner();
        let user = UserId::parse(&r.user_id)?;
        let limit = if r.limit == 0 {
            MAX_LIST
        } else {
            (r.limit as usize).min(MAX_LIST)
        };
        self.barrier(r.consistency).await?;
        if !r.after.is_empty() {
            ConversationId::parse(&r.after)?;
        }
        let mut convs = self
            .node
            .reader()
            .conversations_of(&user, &r.after, limit)?;
        let full = convs.len() == limit;
        // Member lists make a list's size: cut it short past a total.
        let keep = fitting(convs.iter(), MAX_LIST_MEMBERS, |c| c.members.len());
        let cut = keep < convs.len();
        convs.truncate(keep);
        // More may follow a page that is full or was cut short.
        let next = if full || cut {
            convs
                .last()
                .map(|c| c.id.as_str().to_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(api::ListConversationsResponse {
            conversations: convs.into_iter().map(Into::into).collect(),
            next,
        }))
    }

    async fn last_seqs(
        &self,
        request: Request<api::LastSeqsRequest>,
    ) -> Result<Response<api::LastSeqsResponse>, Status> {
        let r = request.into_inner();
        if r.conversation_ids.len() > MAX_LIST {
            return Err(StoreError::InvalidArgument(format!(
                "{} conversations asked, the limit is {MAX_LIST}",
                r.conversation_ids.len()
            ))
            .into());
        }
        let ids = r
            .conversation_ids
            .iter()
            .map(|c| ConversationId::parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        self.barrier(r.consistency).await?;
        let reader = self.node.reader();
        let last_seqs = ids
            .iter()
            .map(|id| reader.last_seq(id).map(|s| s.0))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(api::LastSeqsResponse { last_seqs }))
    }

    async fn get_setting(
        &self,
        request: Request<api::GetSettingRequest>,
    ) -> Result<Response<api::Setting>, Status> {
        let r = request.into_inner();
        let key = SettingKey::parse(&r.key)?;
        self.barrier(r.consistency).await?;
        Ok(Response::new(self.node.reader().setting(&key)?.into()))
    }

    async fn put_setting(
        &self,
        request: Request<api::PutSettingRequest>,
    ) -> Result<Response<api::Setting>, Status> {
        // Routers write rollout plans (their canary verdicts); everything
        // else (incidents, plans' other keys) is the operators'.
        let caller = chat_security::Caller::of(request.extensions());
        let r = request.into_inner();
        let key = SettingKey::parse(&r.key)?;
        if caller == chat_security::Caller::Service(chat_security::Role::Router)
            && !r.key.starts_with(ROUTER_SETTINGS)
        {
            return Err(Status::permission_denied(format!(
                "a router may write only {ROUTER_SETTINGS}* settings, not {:?}",
                r.key
            )));
        }
        if r.value.len() > MAX_SETTING_VALUE {
            return Err(StoreError::InvalidArgument(format!(
                "setting value is {} bytes, the limit is {MAX_SETTING_VALUE}",
                r.value.len()
            ))
            .into());
        }
        let op = Op::PutSetting {
            key,
            value: r.value.into(),
            expected: r.check_revision.then_some(r.expected_revision),
        };
        match self.one(op).await? {
            OpOutcome::Setting(s) => Ok(Response::new(s.into())),
            other => Err(StoreError::Storage(format!("unexpected outcome {other:?}")).into()),
        }
    }

    async fn list_settings(
        &self,
        request: Request<api::ListSettingsRequest>,
    ) -> Result<Response<api::ListSettingsResponse>, Status> {
        let r = request.into_inner();
        if !r.prefix.is_empty() {
            SettingKey::parse(&r.prefix)?;
        }
        self.barrier(r.consistency).await?;
        let settings = self.node.reader().settings(&r.prefix, MAX_LIST)?;
        Ok(Response::new(api::ListSettingsResponse {
            settings: settings.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_conversation(
        &self,
        request: Request<api::GetConversationRequest>,
    ) -> Result<Response<api::ConversationInfo>, Status> {
        let r = request.into_inner();
        let id = ConversationId::parse(&r.conversation_id)?;
        self.barrier(r.consistency).await?;
        let conv = self
            .node
            .reader()
            .conversation(&id)?
            .ok_or_else(|| StoreError::NotFound(format!("conversation {id} does not exist")))?;
        Ok(Response::new(conv.into()))
    }
}

fn replica_info(r: ReplicaView) -> api::ReplicaInfo {
    api::ReplicaInfo {
        id: r.id.0,
        address: r.address,
        role: if r.voter { "voter" } else { "learner" }.into(),
        matched: r.matched,
    }
}

pub fn status_response(report: StatusReport, leader_address: String) -> api::StatusResponse {
    let s = &report.status;
    api::StatusResponse {
        id: s.id.0,
        role: match s.role {
            raft::StateRole::Leader => "leader",
            raft::StateRole::Follower => "follower",
            raft::StateRole::Candidate => "candidate",
            raft::StateRole::PreCandidate => "pre-candidate",
        }
        .into(),
        term: s.term,
        leader_id: s.leader.map_or(0, |l| l.0),
        leader_address,
        commit_index: s.commit,
        applied_index: s.applied,
        first_index: report.first_index,
        last_index: report.last_index,
        snapshot_index: report.snapshot_index,
        serving: s.serving,
        replicas: report.replicas.into_iter().map(replica_info).collect(),
        stats: Some(api::DriverStats {
            proposed_entries: report.stats.proposed_entries,
            proposed_ops: report.stats.proposed_ops,
            readies: report.stats.readies,
            syncs: report.stats.syncs,
            sync_micros: report.stats.sync_micros,
            applied_entries: report.stats.applied_entries,
        }),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

fn replica_id(id: u64) -> Result<NodeId, StoreError> {
    if id == 0 {
        return Err(StoreError::InvalidArgument(
            "replica id 0 is reserved".into(),
        ));
    }
    Ok(NodeId(id))
}

impl StoreApi {
    async fn status_now(&self) -> Result<api::StatusResponse, StoreError> {
        let report = self.within(self.node.report()).await?;
        let leader_address = self.node.leader_hint().map(|(_, a)| a).unwrap_or_default();
        Ok(status_response(report, leader_address))
    }

    async fn membership(
        &self,
        change: MembershipChange,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        let replicas = self.within(self.node.change_membership(change)).await?;
        Ok(Response::new(api::MembershipResponse {
            replicas: replicas.into_iter().map(replica_info).collect(),
        }))
    }
}

/// How long a backup waits for its snapshot to be built.
const BACKUP_BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes of the snapshot file per backup chunk.
const BACKUP_CHUNK: usize = 1 << 20;

/// Streams a snapshot at `min_index` or later: the header, then the file.
/// Memory is a chunk or two, whatever the size of the state.
async fn stream_backup(
    node: &NodeHandle,
    min_index: u64,
    tx: tokio::sync::mpsc::Sender<Result<api::BackupChunk, Status>>,
) -> Result<(), StoreError> {
    let give_up = tokio::time::Instant::now() + BACKUP_BUILD_TIMEOUT;
    let (snap, file) = loop {
        if tx.is_closed() {
            return Ok(());
        }
        if let Some(snap) = node.snapshot(min_index).await? {
            // Opened at once: a file no follower needs may be deleted,
            // and an open one stays readable.
            match std::fs::File::open(&snap.path) {
                Ok(f) => break (snap, f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::Storage(format!(
                        "cannot open snapshot file {}: {e}",
                        snap.path.display()
                    )));
                }
            }
        }
        if tokio::time::Instant::now() >= give_up {
            return Err(StoreError::Unavailable(format!(
                "the snapshot for the backup was not built within {} s",
                BACKUP_BUILD_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let d = snap.descriptor;
    let addresses = node.addresses();
    let header = api::BackupHeader {
        index: d.index,
        term: d.term,
        size: d.size,
        crc: d.crc,
        replicas: snap
            .voters
            .iter()
            .map(|id| api::ReplicaInfo {
                id: id.0,
                address: addresses.get(*id).unwrap_or_default(),
                role: "voter".into(),
                matched: 0,
            })
            .collect(),
        taken_at_ms: crate::clock::system_ms(),
        taken_by: node.id().0,
    };
    let part = |p| Ok(api::BackupChunk { part: Some(p) });
    if tx
        .send(part(api::backup_chunk::Part::Header(header)))
        .await
        .is_err()
    {
        return Ok(());
    }
    let path = snap.path.clone();
    // The file is read on a blocking thread; `None`: the caller went away.
    let read = tokio::task::spawn_blocking(move || -> Result<Option<u64>, StoreError> {
        use std::io::Read as _;
        let mut file = file;
        let mut sent = 0u64;
        loop {
            let mut buf = Vec::with_capacity(BACKUP_CHUNK);
            let n = (&mut file)
                .take(BACKUP_CHUNK as u64)
                .read_to_end(&mut buf)
                .map_err(|e| StoreError::Storage(format!("reading {}: {e}", path.display())))?;
            if n == 0 {
                return Ok(Some(sent));
            }
            if tx
                .blocking_send(part(api::backup_chunk::Part::Data(buf)))
                .is_err()
            {
                return Ok(None);
            }
            sent += n as u64;
        }
    });
    let Some(sent) = read
        .await
        .map_err(|e| StoreError::Storage(format!("backup reader: {e}")))??
    else {
        return Ok(());
    };
    if sent != d.size {
        return Err(StoreError::Storage(format!(
            "snapshot file {} gave {sent} bytes, its descriptor says {}",
            snap.path.display(),
            d.size
        )));
    }
    tracing::info!(index = d.index, bytes = d.size, "backup sent");
    Ok(())
}

#[tonic::async_trait]
impl StoreAdmin for StoreApi {
    type BackupStream = tokio_stream::wrappers::ReceiverStream<Result<api::BackupChunk, Status>>;

    async fn backup(
        &self,
        _: Request<api::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        // Everything acknowledged before this call is applied here after
        // the barrier (which also makes sure this replica leads).
        self.within(self.node.read_barrier()).await?;
        let min_index = self.node.status().applied;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let node = self.node.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_backup(&node, min_index, tx.clone()).await {
                tracing::warn!(error = %e, "backup failed");
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn status(
        &self,
        _: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        Ok(Response::new(self.status_now().await?))
    }

    async fn add_learner(
        &self,
        request: Request<api::AddLearnerRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        let r = request.into_inner();
        let id = replica_id(r.id)?;
        let peers = crate::config::parse_peers(&[format!("{}={}", r.id, r.address)])?;
        let address = peers.into_iter().next().map(|(_, a)| a).unwrap_or_default();
        self.membership(MembershipChange::AddLearner { id, address })
            .await
    }

    async fn promote(
        &self,
        request: Request<api::ReplicaRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        let id = replica_id(request.into_inner().id)?;
        self.membership(MembershipChange::Promote { id }).await
    }

    async fn remove_replica(
        &self,
        request: Request<api::ReplicaRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        let id = replica_id(request.into_inner().id)?;
        self.membership(MembershipChange::Remove { id }).await
    }

    async fn transfer_leader(
        &self,
        request: Request<api::ReplicaRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        let id = request.into_inner().id;
        let target = if id == 0 { None } else { Some(NodeId(id)) };
        let target = self.within(self.node.transfer_leader(target)).await?;
        if self
            .node
            .wait_for(self.request_timeout, |s| s.leader == Some(target))
            .await
            .is_none()
        {
            return Err(StoreError::Unavailable(format!(
                "replica {target} did not take over leadership in time"
            ))
            .into());
        }
        Ok(Response::new(self.status_now().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::StoredMessage;

    fn page(sizes: &[usize]) -> Vec<StoredMessage> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| StoredMessage {
                conversation: ConversationId::parse("c").unwrap(),
                seq: Seq(i as u64 + 1),
                sender: UserId::parse("u").unwrap(),
                client_msg_id: format!("m{i}"),
                body: vec![0; n].into(),
                server_ts_ms: 0,
            })
            .collect()
    }

    fn seqs(p: &[StoredMessage]) -> Vec<u64> {
        p.iter().map(|m| m.seq.0).collect()
    }

    #[test]
    fn a_page_over_the_byte_cap_is_cut_at_the_end_it_pages_from() {
        let mut forward = page(&[40, 40, 40, 40]);
        cap_bytes(&mut forward, 100, false);
        assert_eq!(seqs(&forward), [1, 2], "forward keeps the oldest");
        let mut backward = page(&[40, 40, 40, 40]);
        cap_bytes(&mut backward, 100, true);
        assert_eq!(seqs(&backward), [3, 4], "backward keeps the newest");
        let mut huge = page(&[500, 10]);
        cap_bytes(&mut huge, 100, false);
        assert_eq!(seqs(&huge), [1], "one message always goes");
        let mut small = page(&[10, 10]);
        cap_bytes(&mut small, 100, false);
        assert_eq!(seqs(&small), [1, 2]);
    }
}
