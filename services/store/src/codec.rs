//! Conversions between domain types and their protobuf forms: the replicated
//! log's records (`chat.store.log.v1`) and the store API (`chat.store.v1`).
//! The only place where the two meet.

use bytes::Bytes;
use chat_proto::store::log::v1 as log;
use chat_proto::store::v1 as api;
use prost::Message as _;

use crate::error::StoreError;
use crate::types::{
    Appended, Conversation, ConversationId, NewMessage, Op, Seq, Setting, SettingKey,
    StoredMessage, UserId,
};

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(format!("corrupt {what}: {e}"))
}

/// A decoded raft entry payload.
pub struct Proposal {
    /// Written as 0 since waiters are matched by (term, index); older
    /// entries carry a clock-seeded id. Not used.
    pub id: u64,
    pub ts_ms: i64,
    pub ops: Vec<Op>,
}

pub fn encode_proposal(id: u64, ts_ms: i64, ops: &[Op]) -> Vec<u8> {
    let ops = ops
        .iter()
        .map(|op| log::Op {
            kind: Some(match op {
                Op::CreateConversation {
                    conversation,
                    members,
                } => log::op::Kind::Create(log::CreateConversation {
                    conversation_id: conversation.as_str().to_owned(),
                    members: members.iter().map(|m| m.as_str().to_owned()).collect(),
                }),
                Op::AddMember {
                    conversation,
                    user,
                    by,
                } => log::op::Kind::AddMember(member_record(conversation, user, by)),
                Op::RemoveMember {
                    conversation,
                    user,
                    by,
                } => log::op::Kind::RemoveMember(member_record(conversation, user, by)),
                Op::Append(m) => log::op::Kind::Append(log::Append {
                    conversation_id: m.conversation.as_str().to_owned(),
                    sender: m.sender.as_str().to_owned(),
                    client_msg_id: m.client_msg_id.clone(),
                    body: m.body.clone(),
                }),
                Op::PutSetting {
                    key,
                    value,
                    expected,
                } => log::op::Kind::PutSetting(log::PutSetting {
                    key: key.as_str().to_owned(),
                    value: value.to_vec(),
                    check_revision: expected.is_some(),
                    expected_revision: expected.unwrap_or(0),
                }),
                Op::Noop => log::op::Kind::Noop(log::Noop {}),
            }),
        })
        .collect();
    log::Proposal { id, ts_ms, ops }.encode_to_vec()
}

fn member_record(conversation: &ConversationId, user: &UserId, by: &Option<UserId>) -> log::Member {
    log::Member {
        conversation_id: conversation.as_str().to_owned(),
        user_id: user.as_str().to_owned(),
        by: by
            .as_ref()
            .map(|b| b.as_str().to_owned())
            .unwrap_or_default(),
    }
}

pub fn decode_proposal(data: &[u8]) -> Result<Proposal, StoreError> {
    let p = log::Proposal::decode(data).map_err(|e| corrupt("log entry", e))?;
    let mut ops = Vec::with_capacity(p.ops.len());
    for op in p.ops {
        let id = |s: &str| ConversationId::parse(s).map_err(|e| corrupt("log entry", e));
        let user = |s: &str| UserId::parse(s).map_err(|e| corrupt("log entry", e));
        ops.push(match op.kind {
            Some(log::op::Kind::Create(c)) => Op::CreateConversation {
                conversation: id(&c.conversation_id)?,
                members: c
                    .members
                    .iter()
                    .map(|m| user(m))
                    .collect::<Result<_, _>>()?,
            },
            Some(log::op::Kind::AddMember(m)) => Op::AddMember {
                conversation: id(&m.conversation_id)?,
                user: user(&m.user_id)?,
                by: if m.by.is_empty() {
                    None
                } else {
                    Some(user(&m.by)?)
                },
            },
            Some(log::op::Kind::RemoveMember(m)) => Op::RemoveMember {
                conversation: id(&m.conversation_id)?,
                user: user(&m.user_id)?,
                by: if m.by.is_empty() {
                    None
                } else {
                    Some(user(&m.by)?)
                },
            },
            Some(log::op::Kind::Append(a)) => Op::Append(NewMessage {
                conversation: id(&a.conversation_id)?,
                sender: user(&a.sender)?,
                client_msg_id: a.client_msg_id,
                body: a.body,
            }),
            Some(log::op::Kind::PutSetting(p)) => Op::PutSetting {
                key: SettingKey::parse(&p.key).map_err(|e| corrupt("log entry", e))?,
                value: Bytes::from(p.value),
                expected: p.check_revision.then_some(p.expected_revision),
            },
            Some(log::op::Kind::Noop(_)) => Op::Noop,
            // Every op this version writes has a kind: none means a kind
            // it does not know, written by a newer release. Applying it as
            // nothing would make this replica's state diverge.
            None => {
                return Err(StoreError::Storage(
                    "a log entry holds an operation this version does not know \
                     (written by a newer release?): stopping rather than diverging; \
                     upgrade this replica"
                        .into(),
                ));
            }
        });
    }
    Ok(Proposal {
        id: p.id,
        ts_ms: p.ts_ms,
        ops,
    })
}

pub fn encode_conversation(c: &Conversation) -> Vec<u8> {
    log::Conversation {
        members: c.members.iter().map(|m| m.as_str().to_owned()).collect(),
        created_at_ms: c.created_at_ms,
    }
    .encode_to_vec()
}

/// `last_seq` is not part of the record; the caller supplies it.
pub fn decode_conversation(
    id: &ConversationId,
    raw: &[u8],
    last_seq: Seq,
) -> Result<Conversation, StoreError> {
    let c = log::Conversation::decode(raw).map_err(|e| corrupt("conversation record", e))?;
    Ok(Conversation {
        id: id.clone(),
        members: c
            .members
            .iter()
            .map(|m| UserId::parse(m).map_err(|e| corrupt("conversation record", e)))
            .collect::<Result<_, _>>()?,
        last_seq,
        created_at_ms: c.created_at_ms,
    })
}

pub fn encode_message(m: &NewMessage, ts_ms: i64) -> Vec<u8> {
    log::Message {
        sender: m.sender.as_str().to_owned(),
        client_msg_id: m.client_msg_id.clone(),
        body: m.body.to_vec(),
        server_ts_ms: ts_ms,
    }
    .encode_to_vec()
}

pub fn decode_message(
    conv: &ConversationId,
    seq: Seq,
    raw: &[u8],
) -> Result<StoredMessage, StoreError> {
    let m = log::Message::decode(raw).map_err(|e| corrupt("message record", e))?;
    Ok(StoredMessage {
        conversation: conv.clone(),
        seq,
        sender: UserId::parse(&m.sender).map_err(|e| corrupt("message record", e))?,
        client_msg_id: m.client_msg_id,
        body: Bytes::from(m.body),
        server_ts_ms: m.server_ts_ms,
    })
}

pub fn encode_setting(s: &Setting) -> Vec<u8> {
    log::SettingRecord {
        value: s.value.to_vec(),
        revision: s.revision,
        updated_ms: s.updated_ms,
    }
    .encode_to_vec()
}

pub fn decode_setting(key: &SettingKey, raw: &[u8]) -> Result<Setting, StoreError> {
    let r = log::SettingRecord::decode(raw).map_err(|e| corrupt("setting record", e))?;
    Ok(Setting {
        key: key.clone(),
        value: Bytes::from(r.value),
        revision: r.revision,
        updated_ms: r.updated_ms,
    })
}

/// Context carried by a membership-change entry: the replica and its
/// address. (Waiters are matched by the entry's term and index.)
pub fn encode_replica_context(id: u64, address: &str) -> Vec<u8> {
    log::ReplicaAddress {
        id,
        address: address.to_owned(),
        proposal_id: 0,
    }
    .encode_to_vec()
}

pub fn decode_replica_context(data: &[u8]) -> Result<(u64, String), StoreError> {
    let r = log::ReplicaAddress::decode(data).map_err(|e| corrupt("membership change", e))?;
    Ok((r.id, r.address))
}

impl From<Conversation> for api::ConversationInfo {
    fn from(c: Conversation) -> Self {
        Self {
            conversation_id: c.id.as_str().to_owned(),
            members: c
                .members
                .into_iter()
                .map(|m| m.as_str().to_owned())
                .collect(),
            last_seq: c.last_seq.0,
            created_at_ms: c.created_at_ms,
        }
    }
}

impl From<StoredMessage> for api::StoredMessage {
    fn from(m: StoredMessage) -> Self {
        Self {
            conversation_id: m.conversation.as_str().to_owned(),
            seq: m.seq.0,
            sender: m.sender.as_str().to_owned(),
            client_msg_id: m.client_msg_id,
            body: m.body.to_vec(),
            server_ts_ms: m.server_ts_ms,
        }
    }
}

impl From<Setting> for api::Setting {
    fn from(s: Setting) -> Self {
        Self {
            key: s.key.as_str().to_owned(),
            value: s.value.to_vec(),
            revision: s.revision,
            updated_ms: s.updated_ms,
        }
    }
}

impl From<Appended> for api::AppendResponse {
    fn from(a: Appended) -> Self {
        Self {
            seq: a.seq.0,
            server_ts_ms: a.server_ts_ms,
            duplicate: a.duplicate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposals_round_trip() {
        let ops = vec![
            Op::CreateConversation {
                conversation: ConversationId::parse("c1").unwrap(),
                members: vec![UserId::parse("alice").unwrap()],
            },
            Op::Append(NewMessage {
                conversation: ConversationId::parse("c1").unwrap(),
                sender: UserId::parse("alice").unwrap(),
                client_msg_id: "m1".into(),
                body: Bytes::from_static(b"hi"),
            }),
            Op::PutSetting {
                key: SettingKey::parse("rollout/router").unwrap(),
                value: Bytes::from_static(b"plan"),
                expected: Some(0),
            },
            Op::PutSetting {
                key: SettingKey::parse("incident").unwrap(),
                value: Bytes::new(),
                expected: None,
            },
            Op::Noop,
        ];
        let p = decode_proposal(&encode_proposal(7, 99, &ops)).unwrap();
        assert_eq!((p.id, p.ts_ms), (7, 99));
        assert_eq!(p.ops, ops);
    }

    #[test]
    fn garbage_is_a_storage_error_not_a_panic() {
        assert!(matches!(
            decode_proposal(&[0xff, 0xff, 0xff]),
            Err(StoreError::Storage(_))
        ));
    }

    #[test]
    fn an_operation_of_an_unknown_kind_stops_the_replica_instead_of_applying_as_nothing() {
        // What a newer release's new op looks like to this one: a kind
        // outside the oneof this version knows decodes as none.
        let p = log::Proposal {
            id: 0,
            ts_ms: 1,
            ops: vec![log::Op { kind: None }],
        }
        .encode_to_vec();
        match decode_proposal(&p) {
            Err(StoreError::Storage(msg)) => assert!(msg.contains("does not know"), "{msg}"),
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("an unknown operation was accepted"),
        }
    }
}
