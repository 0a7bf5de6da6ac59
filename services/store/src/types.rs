//! Domain types of the store: identifiers and the operations the replicated
//! state machine applies. None of these derive prost; `codec` converts them.

use std::fmt;

use crate::error::StoreError;

/// Longest accepted conversation or user id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest accepted client message id, in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 128;

/// A raft replica's id; never 0 (raft-rs reserves 0 for "none").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Position of a message within its conversation: gapless, starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Seq(pub u64);

macro_rules! string_id {
    ($name:ident, $what:literal) => {
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Accepts 1..=128 bytes of ASCII letters, digits and `-_.:@`.
            pub fn parse(s: &str) -> Result<Self, StoreError> {
                validate_id(s, $what)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(ConversationId, "conversation id");
string_id!(UserId, "user id");

fn validate_id(s: &str, what: &str) -> Result<(), StoreError> {
    if s.is_empty() {
        return Err(StoreError::InvalidArgument(format!("{what} is empty")));
    }
    if s.len() > MAX_ID_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "{what} is {} bytes, the limit is {MAX_ID_BYTES}",
            s.len()
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
    {
        return Err(StoreError::InvalidArgument(format!(
            "{what} {s:?} contains {c:?}; allowed are ASCII letters, digits and -_.:@"
        )));
    }
    Ok(())
}

/// Validates a client message id: 1..=128 bytes, no control characters.
pub fn validate_client_msg_id(s: &str) -> Result<(), StoreError> {
    if s.is_empty() {
        return Err(StoreError::InvalidArgument(
            "client message id is empty".into(),
        ));
    }
    if s.len() > MAX_CLIENT_MSG_ID_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "client message id is {} bytes, the limit is {MAX_CLIENT_MSG_ID_BYTES}",
            s.len()
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(StoreError::InvalidArgument(
            "client message id contains control characters".into(),
        ));
    }
    Ok(())
}

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
