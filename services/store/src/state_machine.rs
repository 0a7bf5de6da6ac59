//! The replicated state machine: conversations, members and messages.
//!
//! `Applier` applies committed operations; it is used only by the raft
//! driver and writes one engine batch per group of entries. `Reader` serves
//! reads from any task straight from the engine.
//!
//! Architecture Invariant: applying is deterministic. Everything an op's
//! outcome depends on is in the log entry (including the leader's timestamp)
//! or in state produced by earlier entries; a failed op changes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::codec;
use crate::engine::{Engine, WriteBatch, prefix_end};
use crate::error::StoreError;
use crate::keys;
use crate::service::MAX_MEMBERS;
use crate::types::{
    Appended, Conversation, ConversationId, NewMessage, Op, OpOutcome, Seq, Setting, SettingKey,
    StoredMessage, UserId,
};

/// Heads of recently used conversations: each one's record (members) with
/// its current last seq, kept by the driver across batches so an append
/// reads neither its seq nor its conversation's members from the engine (it
/// reads only its dedup record). Cleared when a snapshot replaces the state.
///
/// An applier changes heads as it applies; a batch that is then not written
/// stops the replica, heads and all.
#[derive(Default)]
pub struct Heads {
    convs: HashMap<ConversationId, Conversation>,
    /// The dedup clock as last written (see `Applier`).
    clock: Option<i64>,
}

/// Conversations kept before the cache starts over.
const HEADS_LIMIT: usize = 100_000;

impl Heads {
    pub fn clear(&mut self) {
        self.convs.clear();
        self.clock = None;
    }
}

/// Expiry lists (one per earlier batch that appended) worked off per batch
/// at most; more than one, so removal catches up after a pause.
const EXPIRE_LISTS_PER_BATCH: usize = 4;

/// Applies operations, accumulating their writes for one atomic batch.
///
/// Dedup window: a retry (same conversation, sender and client message id)
/// applied less than `dedup_window_ms` after the first one, by the dedup
/// clock, returns the first one's seq; a later one is stored as a new
/// message. The dedup clock is the newest entry timestamp applied so far
/// (`s/t`): leaders' clocks differ and can step back, and a clock that
/// never goes back makes every decision a function of the log alone, so
/// every replica answers alike however its batches fall (and a record
/// removed as expired could only ever have been judged expired again).
/// Expired records are removed by later batches (`finish`),
/// through one time-ordered list of new records per batch (`s/x/`), which
/// costs one write per batch rather than one per append.
pub struct Applier<'a> {
    engine: &'a dyn Engine,
    heads: &'a mut Heads,
    dedup_window_ms: i64,
    /// The dedup clock as of the op being applied (loaded at first use).
    clock: Option<i64>,
    /// Whether this batch moved the clock.
    clock_moved: bool,
    /// Dedup records this batch wrote, in order.
    new_records: Vec<Vec<u8>>,
    /// Conversations whose records this batch changed, to be written at
    /// `finish` (from the heads).
    changed: HashSet<ConversationId>,
    /// Dedup entries added by this batch (not yet readable from the engine).
    dedup: HashMap<Vec<u8>, (u64, i64)>,
    /// Settings written by this batch (not yet readable from the engine).
    settings: HashMap<SettingKey, Setting>,
    batch: WriteBatch,
}

impl<'a> Applier<'a> {
    pub fn new(engine: &'a dyn Engine, heads: &'a mut Heads, dedup_window_ms: i64) -> Self {
        if heads.convs.len() > HEADS_LIMIT {
            heads.clear();
        }
        Self {
            engine,
            heads,
            dedup_window_ms,
            clock: None,
            clock_moved: false,
            new_records: Vec::new(),
            changed: HashSet::new(),
            dedup: HashMap::new(),
            settings: HashMap::new(),
            batch: WriteBatch::default(),
        }
    }

    /// Records a conversation's new state, to be written at `finish`.
    fn put_head(&mut self, c: Conversation) {
        self.changed.insert(c.id.clone());
        self.heads.convs.insert(c.id.clone(), c);
    }

    /// Direct access for writes that ride along (applied index, conf state).
    pub fn batch_mut(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    /// Applies one op. An `Err` is the op's outcome (for example the sender
    /// is not a member), not a failure of the replica, except `Storage`.
    pub fn apply(&mut self, op: &Op, ts_ms: i64) -> Result<OpOutcome, StoreError> {
        let now = self.tick(ts_ms)?;
        match op {
            Op::Noop => Ok(OpOutcome::Done),
            Op::CreateConversation {
                conversation,
                members,
            } => {
                let mut members = members.clone();
                members.sort();
                members.dedup();
                if let Some(existing) = self.conversation(conversation)? {
                    if existing.members == members {
                        return Ok(OpOutcome::Conversation(existing));
                    }
                    return Err(StoreError::AlreadyExists(format!(
                        "conversation {conversation} already exists with other members"
                    )));
                }
                let c = Conversation {
                    id: conversation.clone(),
                    members,
                    last_seq: Seq(0),
                    created_at_ms: ts_ms,
                };
                for m in &c.members {
                    self.batch.put(
                        keys::user_conversation(m.as_str(), conversation.as_str()),
                        Vec::new(),
                    );
                }
                self.put_head(c.clone());
                Ok(OpOutcome::Conversation(c))
            }
            Op::AddMember {
                conversation,
                user,
                by,
            } => {
                let mut c = self.require_for(conversation, by.as_ref())?;
                if let Err(pos) = c.members.binary_search(user) {
                    if c.members.len() >= MAX_MEMBERS {
                        return Err(StoreError::FailedPrecondition(format!(
                            "conversation {} has {MAX_MEMBERS} members, the most it may have",
                            c.id
                        )));
                    }
                    c.members.insert(pos, user.clone());
                    self.batch.put(
                        keys::user_conversation(user.as_str(), conversation.as_str()),
                        Vec::new(),
                    );
                    self.put_head(c.clone());
                }
                Ok(OpOutcome::Conversation(c))
            }
            Op::RemoveMember {
                conversation,
                user,
                by,
            } => {
                // The requester first: a non-member learns nothing about the
                // members (not even whether `user` is one, nor whether the
                // conversation exists).
                let mut c = self.require_for(conversation, by.as_ref())?;
                if let Ok(pos) = c.members.binary_search(user) {
                    c.members.remove(pos);
                    self.batch.delete(keys::user_conversation(
                        user.as_str(),
                        conversation.as_str(),
                    ));
                    self.put_head(c.clone());
                }
                Ok(OpOutcome::Conversation(c))
            }
            Op::Append(m) => self.append(m, ts_ms, now).map(OpOutcome::Appended),
            Op::PutSetting {
                key,
                value,
                expected,
            } => {
                let current = match self.settings.get(key) {
                    Some(s) => s.revision,
                    None => Reader::setting_in(self.engine, key)?.map_or(0, |s| s.revision),
                };
                if let Some(expected) = expected
                    && *expected != current
                {
                    return Err(StoreError::Conflict(format!(
                        "setting {key} is at revision {current}, not {expected}"
                    )));
                }
                let s = Setting {
                    key: key.clone(),
                    value: value.clone(),
                    revision: current + 1,
                    updated_ms: ts_ms,
                };
                self.batch
                    .put(keys::setting(key.as_str()), codec::encode_setting(&s));
                self.settings.insert(key.clone(), s.clone());
                Ok(OpOutcome::Setting(s))
            }
        }
    }

    /// Advances the dedup clock to `ts_ms` if that is later; returns it.
    fn tick(&mut self, ts_ms: i64) -> Result<i64, StoreError> {
        let clock = match self.clock.or(self.heads.clock) {
            Some(c) => c,
            None => match self.engine.get(keys::DEDUP_CLOCK)? {
                Some(raw) => i64::from_be_bytes(
                    raw.as_slice()
                        .try_into()
                        .map_err(|_| StoreError::Storage("corrupt dedup clock".into()))?,
                ),
                None => i64::MIN,
            },
        };
        let now = clock.max(ts_ms);
        self.clock_moved |= now != clock;
        self.clock = Some(now);
        Ok(now)
    }

    /// `now` is the dedup clock; `ts_ms` the entry's own timestamp, which
    /// the message (and its dedup record) keeps.
    fn append(&mut self, m: &NewMessage, ts_ms: i64, now: i64) -> Result<Appended, StoreError> {
        let member = match self.head(&m.conversation)? {
            Some(c) => c.members.binary_search(&m.sender).is_ok(),
            None => return Err(StoreError::not_visible(&m.conversation, &m.sender)),
        };
        let dedup_key = keys::dedup(m.conversation.as_str(), m.sender.as_str(), &m.client_msg_id);
        // A record older than the window is expired: the append is new
        // and replaces it.
        if let Some((seq, ts)) = self.dedup_lookup(&dedup_key)?
            && now.saturating_sub(ts) < self.dedup_window_ms
        {
            return Ok(Appended {
                seq: Seq(seq),
                server_ts_ms: ts,
                duplicate: true,
            });
        }
        if !member {
            return Err(StoreError::not_visible(&m.conversation, &m.sender));
        }
        let head = self
            .head(&m.conversation)?
            .ok_or_else(|| StoreError::Storage("conversation head vanished".into()))?;
        let seq = head.last_seq.0 + 1;
        head.last_seq = Seq(seq);
        self.batch.put(
            keys::message(m.conversation.as_str(), seq),
            codec::encode_message(m, ts_ms),
        );
        let mut dv = Vec::with_capacity(16);
        dv.extend_from_slice(&seq.to_be_bytes());
        dv.extend_from_slice(&ts_ms.to_be_bytes());
        // An expired record replaced here is still named by its old expiry
        // list, which finds the newer record and leaves it (see `finish`).
        self.batch.put(dedup_key.clone(), dv);
        self.new_records.push(dedup_key.clone());
        self.dedup.insert(dedup_key, (seq, ts_ms));
        Ok(Appended {
            seq: Seq(seq),
            server_ts_ms: ts_ms,
            duplicate: false,
        })
    }

    fn dedup_lookup(&self, key: &[u8]) -> Result<Option<(u64, i64)>, StoreError> {
        if let Some(&hit) = self.dedup.get(key) {
            return Ok(Some(hit));
        }
        match self.engine.get(key)? {
            Some(raw) if raw.len() == 16 => {
                let seq = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
                let ts = i64::from_be_bytes(raw[8..].try_into().expect("8 bytes"));
                Ok(Some((seq, ts)))
            }
            Some(_) => Err(StoreError::Storage("corrupt dedup record".into())),
            None => Ok(None),
        }
    }

    /// The conversation as of this batch, last seq included: from the
    /// heads, or read from the engine into them.
    fn head(&mut self, id: &ConversationId) -> Result<Option<&mut Conversation>, StoreError> {
        if !self.heads.convs.contains_key(id) {
            let Some(mut c) = Reader::record_in(self.engine, id, Seq(0))? else {
                return Ok(None);
            };
            c.last_seq = Seq(Reader::last_seq_in(self.engine, id)?);
            self.heads.convs.insert(id.clone(), c);
        }
        Ok(self.heads.convs.get_mut(id))
    }

    fn conversation(&mut self, id: &ConversationId) -> Result<Option<Conversation>, StoreError> {
        Ok(self.head(id)?.cloned())
    }

    /// The conversation, if it exists and `by` (a change made on a user's
    /// behalf) is a member; otherwise the same NOT_FOUND either way.
    fn require_for(
        &mut self,
        id: &ConversationId,
        by: Option<&UserId>,
    ) -> Result<Conversation, StoreError> {
        visible_to(self.conversation(id)?, id, by)
    }

    /// The batch holding every write of the applied ops, and the removal
    /// of dedup records that expired before this batch's newest entry.
    pub fn finish(mut self) -> Result<WriteBatch, StoreError> {
        for id in self.changed.drain() {
            let c = &self.heads.convs[&id];
            self.batch.put(
                keys::conversation(id.as_str()),
                codec::encode_conversation(c),
            );
        }
        let Some(now) = self.clock else {
            return Ok(self.batch);
        };
        if self.clock_moved {
            self.batch
                .put(keys::DEDUP_CLOCK, now.to_be_bytes().to_vec());
        }
        self.heads.clock = Some(now);
        if let Some(first) = self.new_records.first() {
            self.batch.put(
                keys::dedup_expiry(now, first),
                keys::encode_expiry_list(self.new_records.iter().map(Vec::as_slice)),
            );
        }
        // Lists whose newest record is older than the window: every record
        // in them has expired, unless a later append replaced it.
        let cutoff = now.saturating_sub(self.dedup_window_ms);
        let end = keys::dedup_expiry(cutoff, keys::DEDUP_PREFIX);
        for (k, v) in self.engine.scan(
            keys::DEDUP_EXPIRY_PREFIX,
            &end,
            false,
            EXPIRE_LISTS_PER_BATCH,
        )? {
            let records = keys::decode_expiry_list(&v)
                .ok_or_else(|| StoreError::Storage("corrupt dedup expiry list".into()))?;
            self.batch.delete(k);
            for record in records {
                if self.dedup.contains_key(&record) {
                    continue;
                }
                if let Some((_, ts)) = self.dedup_lookup(&record)?
                    && ts < cutoff
                {
                    self.batch.delete(record);
                }
            }
        }
        Ok(self.batch)
    }
}

/// `conv` (the conversation `id`, if it exists) as `who` may see it: a
/// non-member is told the same NOT_FOUND as for a conversation that does
/// not exist. `None`: a system request, which sees every conversation.
pub fn visible_to(
    conv: Option<Conversation>,
    id: &ConversationId,
    who: Option<&UserId>,
) -> Result<Conversation, StoreError> {
    match (conv, who) {
        (Some(c), Some(u)) if c.members.binary_search(u).is_err() => {
            Err(StoreError::not_visible(id, u))
        }
        (Some(c), _) => Ok(c),
        (None, Some(u)) => Err(StoreError::not_visible(id, u)),
        (None, None) => Err(StoreError::NotFound(format!(
            "conversation {id} does not exist"
        ))),
    }
}

/// Reads the state machine; cheap to clone, safe from any task.
#[derive(Clone)]
pub struct Reader {
    engine: Arc<dyn Engine>,
}

impl Reader {
    pub fn new(engine: Arc<dyn Engine>) -> Self {
        Self { engine }
    }

    fn record_in(
        engine: &dyn Engine,
        id: &ConversationId,
        last_seq: Seq,
    ) -> Result<Option<Conversation>, StoreError> {
        match engine.get(&keys::conversation(id.as_str()))? {
            Some(raw) => codec::decode_conversation(id, &raw, last_seq).map(Some),
            None => Ok(None),
        }
    }

    /// Seq of the newest message (0 when there is none).
    fn last_seq_in(engine: &dyn Engine, id: &ConversationId) -> Result<u64, StoreError> {
        let prefix = keys::messages_of(id.as_str());
        let newest = engine.scan(&prefix, &prefix_end(&prefix), true, 1)?;
        match newest.first() {
            Some((k, _)) => keys::message_seq(k)
                .ok_or_else(|| StoreError::Storage("corrupt message key".into())),
            None => Ok(0),
        }
    }

    pub fn conversation(&self, id: &ConversationId) -> Result<Option<Conversation>, StoreError> {
        let engine = self.engine.as_ref();
        match Self::record_in(engine, id, Seq(0))? {
            Some(mut c) => {
                c.last_seq = Seq(Self::last_seq_in(engine, id)?);
                Ok(Some(c))
            }
            None => Ok(None),
        }
    }

    /// Members of a conversation, without computing its last seq.
    /// Whether a dedup record of this (conversation, sender, client
    /// message id) is stored, expired or not.
    pub fn has_dedup_record(
        &self,
        conversation: &ConversationId,
        sender: &UserId,
        client_msg_id: &str,
    ) -> Result<bool, StoreError> {
        let key = keys::dedup(conversation.as_str(), sender.as_str(), client_msg_id);
        Ok(self.engine.get(&key)?.is_some())
    }

    pub fn members(&self, id: &ConversationId) -> Result<Option<Vec<UserId>>, StoreError> {
        Ok(Self::record_in(self.engine.as_ref(), id, Seq(0))?.map(|c| c.members))
    }

    /// Seq of the newest message of a conversation (0 if none or unknown).
    pub fn last_seq(&self, id: &ConversationId) -> Result<Seq, StoreError> {
        Self::last_seq_in(self.engine.as_ref(), id).map(Seq)
    }

    /// Conversations `user` belongs to, by id, at most `limit`.
    /// Conversations `user` belongs to whose id sorts after `after` ("":
    /// from the first), ascending by id, at most `limit`.
    pub fn conversations_of(
        &self,
        user: &UserId,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Conversation>, StoreError> {
        let prefix = keys::conversations_of(user.as_str());
        let mut start = prefix.clone();
        if !after.is_empty() {
            // The first key past `after` itself.
            start.extend_from_slice(after.as_bytes());
            start.push(0);
        }
        let pairs = self
            .engine
            .scan(&start, &prefix_end(&prefix), false, limit)?;
        let mut out = Vec::with_capacity(pairs.len());
        for (k, _) in pairs {
            let raw = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|_| StoreError::Storage("corrupt membership index key".into()))?;
            let id = ConversationId::parse(raw)
                .map_err(|e| StoreError::Storage(format!("corrupt membership index: {e}")))?;
            if let Some(c) = self.conversation(&id)? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Messages with `after < seq < before` (before = 0: unbounded),
    /// ascending. With a `before` bound, the newest `limit` of them.
    pub fn messages(
        &self,
        id: &ConversationId,
        after: Seq,
        before: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let start = keys::message(id.as_str(), after.0.saturating_add(1));
        let end = if before.0 == 0 {
            prefix_end(&keys::messages_of(id.as_str()))
        } else {
            keys::message(id.as_str(), before.0)
        };
        let newest_first = before.0 != 0;
        let mut pairs = self.engine.scan(&start, &end, newest_first, limit)?;
        if newest_first {
            pairs.reverse();
        }
        pairs
            .into_iter()
            .map(|(k, v)| {
                let seq = keys::message_seq(&k)
                    .ok_or_else(|| StoreError::Storage("corrupt message key".into()))?;
                codec::decode_message(id, Seq(seq), &v)
            })
            .collect()
    }

    fn setting_in(engine: &dyn Engine, key: &SettingKey) -> Result<Option<Setting>, StoreError> {
        match engine.get(&keys::setting(key.as_str()))? {
            Some(raw) => codec::decode_setting(key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// A setting; revision 0 and an empty value when it was never written.
    pub fn setting(&self, key: &SettingKey) -> Result<Setting, StoreError> {
        Ok(
            Self::setting_in(self.engine.as_ref(), key)?.unwrap_or_else(|| Setting {
                key: key.clone(),
                value: bytes::Bytes::new(),
                revision: 0,
                updated_ms: 0,
            }),
        )
    }

    /// Settings whose key starts with `prefix`, in key order, at most
    /// `limit`.
    pub fn settings(&self, prefix: &str, limit: usize) -> Result<Vec<Setting>, StoreError> {
        let start = keys::setting(prefix);
        let end = prefix_end(&start);
        let pairs = self.engine.scan(&start, &end, false, limit)?;
        pairs
            .into_iter()
            .map(|(k, v)| {
                let raw = std::str::from_utf8(&k[keys::SETTING_PREFIX.len()..])
                    .map_err(|_| StoreError::Storage("corrupt setting key".into()))?;
                let key = SettingKey::parse(raw)
                    .map_err(|e| StoreError::Storage(format!("corrupt setting key: {e}")))?;
                codec::decode_setting(&key, &v)
            })
            .collect()
    }

    /// Raft addresses of replicas added at run time, by id.
    pub fn replica_addresses(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let pairs = self.engine.scan(
            keys::REPLICA_ADDR_PREFIX,
            &prefix_end(keys::REPLICA_ADDR_PREFIX),
            false,
            usize::MAX,
        )?;
        pairs
            .into_iter()
            .map(|(k, v)| {
                let raw: [u8; 8] = k[keys::REPLICA_ADDR_PREFIX.len()..]
                    .try_into()
                    .map_err(|_| StoreError::Storage("corrupt replica address key".into()))?;
                let addr = String::from_utf8(v)
                    .map_err(|_| StoreError::Storage("corrupt replica address".into()))?;
                Ok((u64::from_be_bytes(raw), addr))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;
    use crate::types::UserId;

    fn conv(s: &str) -> ConversationId {
        ConversationId::parse(s).unwrap()
    }
    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }
    fn msg(c: &str, from: &str, id: &str) -> Op {
        Op::Append(NewMessage {
            conversation: conv(c),
            sender: user(from),
            client_msg_id: id.into(),
            body: bytes::Bytes::from_static(b"hello"),
        })
    }

    fn apply_all(engine: &MemEngine, ops: &[Op]) -> Vec<Result<OpOutcome, StoreError>> {
        // A fresh cache each time: later batches must find seqs on disk.
        let mut seqs = Heads::default();
        let mut a = Applier::new(engine, &mut seqs, 60_000);
        let out = ops.iter().map(|op| a.apply(op, 1000)).collect();
        engine.write(a.finish().unwrap()).unwrap();
        out
    }

    #[test]
    fn settings_compare_and_set_within_and_across_batches() {
        let e = MemEngine::new();
        let key = SettingKey::parse("rollout/router").unwrap();
        let put = |v: &'static str, expected: Option<u64>| Op::PutSetting {
            key: key.clone(),
            value: bytes::Bytes::from_static(v.as_bytes()),
            expected,
        };
        let revision = |r: &Result<OpOutcome, StoreError>| match r {
            Ok(OpOutcome::Setting(s)) => s.revision,
            other => panic!("{other:?}"),
        };
        // Within one batch: create, a stale CAS loses, a current one wins.
        let out = apply_all(
            &e,
            &[put("a", Some(0)), put("x", Some(0)), put("b", Some(1))],
        );
        assert_eq!(revision(&out[0]), 1);
        assert!(
            matches!(out[1], Err(StoreError::Conflict(_))),
            "{:?}",
            out[1]
        );
        assert_eq!(revision(&out[2]), 2);
        // Across batches the revision is read from the engine.
        let out = apply_all(&e, &[put("y", Some(1)), put("c", None)]);
        assert!(matches!(out[0], Err(StoreError::Conflict(_))));
        assert_eq!(revision(&out[1]), 3);
        let r = Reader::new(Arc::new(e.clone()));
        let s = r.setting(&key).unwrap();
        assert_eq!((s.value.as_ref(), s.revision), (&b"c"[..], 3));
        let absent = r.setting(&SettingKey::parse("nothing").unwrap()).unwrap();
        assert_eq!(absent.revision, 0);
        let listed = r.settings("rollout/", 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(r.settings("rollout/x", 10).unwrap().is_empty());
    }

    #[test]
    fn seqs_are_gapless_per_conversation_and_retries_are_deduplicated() {
        let e = MemEngine::new();
        let create = |c: &str| Op::CreateConversation {
            conversation: conv(c),
            members: vec![user("a"), user("b")],
        };
        let out = apply_all(
            &e,
            &[
                create("x"),
                create("y"),
                msg("x", "a", "1"),
                msg("x", "b", "1"),
                msg("y", "a", "1"),
                msg("x", "a", "1"),
            ],
        );
        let seqs: Vec<_> = out[2..]
            .iter()
            .map(|r| match r {
                Ok(OpOutcome::Appended(a)) => (a.seq.0, a.duplicate),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![(1, false), (2, false), (1, false), (1, true)]);
        // The same retry in a later batch is found on disk.
        let again = apply_all(&e, &[msg("x", "b", "1"), msg("x", "b", "2")]);
        assert!(matches!(&again[0], Ok(OpOutcome::Appended(a)) if a.seq == Seq(2) && a.duplicate));
        assert!(matches!(&again[1], Ok(OpOutcome::Appended(a)) if a.seq == Seq(3) && !a.duplicate));
        let r = Reader::new(Arc::new(e));
        let all = r.messages(&conv("x"), Seq(0), Seq(0), 100).unwrap();
        assert_eq!(
            all.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            r.conversation(&conv("x")).unwrap().unwrap().last_seq,
            Seq(3)
        );
        let newest = r.messages(&conv("x"), Seq(0), Seq(3), 1).unwrap();
        assert_eq!(newest.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn rejected_ops_change_nothing() {
        let e = MemEngine::new();
        apply_all(
            &e,
            &[Op::CreateConversation {
                conversation: conv("x"),
                members: vec![user("a")],
            }],
        );
        let out = apply_all(
            &e,
            &[
                msg("x", "mallory", "1"),
                msg("nope", "a", "1"),
                Op::CreateConversation {
                    conversation: conv("x"),
                    members: vec![user("b")],
                },
            ],
        );
        assert!(matches!(out[0], Err(StoreError::NotFound(_))));
        assert!(matches!(out[1], Err(StoreError::NotFound(_))));
        assert!(matches!(out[2], Err(StoreError::AlreadyExists(_))));
        let r = Reader::new(Arc::new(e));
        let c = r.conversation(&conv("x")).unwrap().unwrap();
        assert_eq!((c.members, c.last_seq), (vec![user("a")], Seq(0)));
        assert!(
            r.messages(&conv("x"), Seq(0), Seq(0), 10)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn membership_changes_are_idempotent() {
        let e = MemEngine::new();
        let add = Op::AddMember {
            conversation: conv("x"),
            user: user("b"),
            by: None,
        };
        let rm = Op::RemoveMember {
            conversation: conv("x"),
            user: user("a"),
            by: None,
        };
        let out = apply_all(
            &e,
            &[
                Op::CreateConversation {
                    conversation: conv("x"),
                    members: vec![user("a")],
                },
                add.clone(),
                add,
                rm.clone(),
                rm,
            ],
        );
        match &out[4] {
            Ok(OpOutcome::Conversation(c)) => assert_eq!(c.members, vec![user("b")]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn members_act_on_behalf_of_themselves_and_the_user_index_follows() {
        let e = MemEngine::new();
        let by = |u: &str| Some(user(u));
        let out = apply_all(
            &e,
            &[
                Op::CreateConversation {
                    conversation: conv("x"),
                    members: vec![user("a"), user("b")],
                },
                Op::AddMember {
                    conversation: conv("x"),
                    user: user("c"),
                    by: by("mallory"),
                },
                Op::AddMember {
                    conversation: conv("x"),
                    user: user("c"),
                    by: by("a"),
                },
                Op::RemoveMember {
                    conversation: conv("x"),
                    user: user("b"),
                    by: by("b"),
                },
            ],
        );
        assert!(
            matches!(out[1], Err(StoreError::NotFound(_))),
            "{:?}",
            out[1]
        );
        assert!(out[2].is_ok() && out[3].is_ok());
        let r = Reader::new(Arc::new(e));
        let ids = |u: &str| {
            r.conversations_of(&user(u), "", 10)
                .unwrap()
                .into_iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("a"), vec![conv("x")]);
        assert_eq!(ids("c"), vec![conv("x")]);
        assert!(ids("b").is_empty());
        assert!(ids("mallory").is_empty());
    }

    /// Applies each `(ts, op)` group as one batch; returns (seq, duplicate)
    /// of each append.
    fn apply_batches(
        engine: &MemEngine,
        window_ms: i64,
        batches: &[Vec<(i64, Op)>],
    ) -> Vec<(u64, bool)> {
        let mut seqs = Heads::default();
        let mut out = Vec::new();
        for batch in batches {
            let mut a = Applier::new(engine, &mut seqs, window_ms);
            for (ts, op) in batch {
                if let Ok(OpOutcome::Appended(x)) = a.apply(op, *ts) {
                    out.push((x.seq.0, x.duplicate));
                }
            }
            engine.write(a.finish().unwrap()).unwrap();
        }
        out
    }

    /// Timestamped ops applied as one batch.
    type Batch = Vec<(i64, Op)>;

    /// The same entries batched as different replicas may batch them:
    /// every entry alone, split in two at `split`, and all at once.
    fn batchings(ops: &[(i64, Op)], split: usize) -> Vec<(&'static str, Vec<Batch>)> {
        vec![
            ("alone", ops.iter().map(|o| vec![o.clone()]).collect()),
            ("split", vec![ops[..split].to_vec(), ops[split..].to_vec()]),
            ("together", vec![ops.to_vec()]),
        ]
    }

    fn count(engine: &MemEngine, prefix: &[u8]) -> usize {
        engine
            .scan(prefix, &prefix_end(prefix), false, usize::MAX)
            .unwrap()
            .len()
    }

    #[test]
    fn a_retry_inside_the_dedup_window_is_a_duplicate_and_one_after_it_is_stored_alike_on_every_replica()
     {
        let create = Op::CreateConversation {
            conversation: conv("x"),
            members: vec![user("a")],
        };
        // Timeline (ms): first send at 1000, a retry at 1500 (inside a 1 s
        // window), another at 2500 (outside), then unrelated traffic that
        // lets the old records expire.
        let ops: Vec<(i64, Op)> = vec![
            (0, create),
            (1000, msg("x", "a", "1")),
            (1500, msg("x", "a", "1")),
            (2500, msg("x", "a", "1")),
            (2600, msg("x", "a", "1")),
            (4000, msg("x", "a", "2")),
            (6000, msg("x", "a", "3")),
        ];
        let expected = vec![
            (1, false),
            (1, true),
            (2, false),
            (2, true),
            (3, false),
            (4, false),
        ];
        for (name, batches) in batchings(&ops, 3) {
            let e = MemEngine::new();
            assert_eq!(apply_batches(&e, 1000, &batches), expected, "{name}");
        }
        // Expired records are removed: after the last entry only the
        // records of the last second are left (message "3", at 6000).
        let e = MemEngine::new();
        let (_, alone) = batchings(&ops, 3).swap_remove(0);
        apply_batches(&e, 1000, &alone);
        assert_eq!(count(&e, keys::DEDUP_PREFIX), 1);
        assert_eq!(count(&e, keys::DEDUP_EXPIRY_PREFIX), 1);
        // Messages are never removed, only the records that deduplicate them.
        let r = Reader::new(Arc::new(e));
        assert_eq!(r.messages(&conv("x"), Seq(0), Seq(0), 10).unwrap().len(), 4);
    }

    #[test]
    fn conversation_heads_kept_across_batches_follow_membership_changes() {
        let e = MemEngine::new();
        // One cache for every batch, as the driver keeps it.
        let mut heads = Heads::default();
        let mut batch = |ops: Vec<Op>| {
            let mut a = Applier::new(&e, &mut heads, 60_000);
            let out: Vec<_> = ops.iter().map(|op| a.apply(op, 1000)).collect();
            e.write(a.finish().unwrap()).unwrap();
            out
        };
        let member = |add: bool| Op::membership(add, conv("x"), user("b"), None);
        batch(vec![Op::CreateConversation {
            conversation: conv("x"),
            members: vec![user("a")],
        }]);
        assert!(batch(vec![msg("x", "a", "1")])[0].is_ok());
        assert!(matches!(
            batch(vec![msg("x", "b", "1")])[0],
            Err(StoreError::NotFound(_))
        ));
        batch(vec![member(true)]);
        assert!(batch(vec![msg("x", "b", "2")])[0].is_ok());
        // Removed and refused within one batch, and in the next.
        let out = batch(vec![member(false), msg("x", "b", "3")]);
        assert!(matches!(out[1], Err(StoreError::NotFound(_))));
        assert!(matches!(
            batch(vec![msg("x", "b", "4")])[0],
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            batch(vec![msg("nope", "a", "1")])[0],
            Err(StoreError::NotFound(_))
        ));
        let r = Reader::new(Arc::new(e.clone()));
        assert_eq!(
            r.conversation(&conv("x")).unwrap().unwrap().last_seq,
            Seq(2)
        );
    }

    #[test]
    fn a_leader_clock_that_steps_back_cannot_make_replicas_disagree_about_a_retry() {
        let create = Op::CreateConversation {
            conversation: conv("x"),
            members: vec![user("a")],
        };
        // "1" at 1000; another message at 2100 (past the 1 s window); then
        // a retry of "1" stamped 1900 by a leader whose clock is behind.
        let ops: Vec<(i64, Op)> = vec![
            (0, create),
            (1000, msg("x", "a", "1")),
            (2100, msg("x", "a", "2")),
            (1900, msg("x", "a", "1")),
        ];
        let mut outcomes = Vec::new();
        for (_, batches) in batchings(&ops, 3) {
            outcomes.push(apply_batches(&MemEngine::new(), 1000, &batches));
        }
        // The retry comes 1100 ms after "1" by the dedup clock: a new message.
        let expected = vec![(1, false), (2, false), (3, false)];
        assert!(outcomes.iter().all(|o| *o == expected), "{outcomes:?}");
    }
}
