//! Domain types of the store: the operations the replicated state machine
//! applies, and (from `chat-store-client`) the identifiers. None of these
//! derive prost; `codec` converts them.

pub use chat_store_client::ids::*;

use crate::error::StoreError;

/// One state-machine operation. Validated at the edge; applying it checks
/// only what depends on state (existence, membership).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    CreateConversation {
        conversation: ConversationId,
        members: Vec<UserId>,
    },
    /// `by`: the member on whose behalf (None: an operator).
    AddMember {
        conversation: ConversationId,
        user: UserId,
        by: Option<UserId>,
    },
    RemoveMember {
        conversation: ConversationId,
        user: UserId,
        by: Option<UserId>,
    },
    Append(NewMessage),
    /// Writes a setting; with `expected` Some, only if its revision is
    /// still that (0: absent).
    PutSetting {
        key: SettingKey,
        value: bytes::Bytes,
        expected: Option<u64>,
    },
    /// Proposed by a new leader to commit an entry of its own term.
    Noop,
}

impl Op {
    /// `AddMember` (`add`) or `RemoveMember`.
    pub fn membership(
        add: bool,
        conversation: ConversationId,
        user: UserId,
        by: Option<UserId>,
    ) -> Self {
        if add {
            Op::AddMember {
                conversation,
                user,
                by,
            }
        } else {
            Op::RemoveMember {
                conversation,
                user,
                by,
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewMessage {
    pub conversation: ConversationId,
    pub sender: UserId,
    pub client_msg_id: String,
    pub body: bytes::Bytes,
}

/// A conversation as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    /// Sorted, without duplicates.
    pub members: Vec<UserId>,
    pub last_seq: Seq,
    pub created_at_ms: i64,
}

/// A message as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub conversation: ConversationId,
    pub seq: Seq,
    pub sender: UserId,
    pub client_msg_id: String,
    pub body: bytes::Bytes,
    pub server_ts_ms: i64,
}

/// Result of an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: Seq,
    pub server_ts_ms: i64,
    /// The (sender, client message id) was already stored; nothing new was.
    pub duplicate: bool,
}

/// A setting as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub key: SettingKey,
    pub value: bytes::Bytes,
    /// 0: never written.
    pub revision: u64,
    pub updated_ms: i64,
}

/// Longest setting key and largest setting value.
pub const MAX_SETTING_KEY: usize = 256;
pub const MAX_SETTING_VALUE: usize = 64 * 1024;

/// A setting's key: 1 to 256 printable ASCII characters, `/` separating
/// parts (for example `rollout/router`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SettingKey(String);

impl SettingKey {
    pub fn parse(raw: &str) -> Result<Self, StoreError> {
        if raw.is_empty() || raw.len() > MAX_SETTING_KEY {
            return Err(StoreError::InvalidArgument(format!(
                "a setting key has 1 to {MAX_SETTING_KEY} characters, not {}",
                raw.len()
            )));
        }
        if let Some(c) = raw.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(StoreError::InvalidArgument(format!(
                "setting key {raw:?} contains {c:?}; only printable ASCII is allowed"
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SettingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What applying one op produced.
#[derive(Clone, Debug, PartialEq)]
pub enum OpOutcome {
    Conversation(Conversation),
    Appended(Appended),
    Setting(Setting),
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_long_and_odd_characters() {
        assert!(ConversationId::parse("room-1").is_ok());
        assert!(ConversationId::parse("").is_err());
        assert!(UserId::parse(&"a".repeat(129)).is_err());
        let err = UserId::parse("al ice").unwrap_err();
        assert!(err.to_string().contains("' '"), "{err}");
        assert!(validate_client_msg_id("m\n1").is_err());
    }
}
