//! Identifiers shared by the store and its callers, with the rules that
//! make them valid. None of these derive prost.

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
