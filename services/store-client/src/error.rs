//! The store's one error type. Variants say what the caller can do; the
//! mapping to gRPC status lives here and nowhere else.

use std::time::Duration;

use tonic::{Code, Status};

use crate::ids::NodeId;

/// Response metadata naming the current leader's replica id.
pub const LEADER_ID_HEADER: &str = "chat-leader-id";
/// Response metadata naming the current leader's address.
pub const LEADER_ADDR_HEADER: &str = "chat-leader-addr";
/// Response metadata with a retry hint in milliseconds.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// This replica is not the leader; `leader` is the one it knows of.
    #[error("not the leader{}", leader_hint(.leader))]
    NotLeader { leader: Option<(NodeId, String)> },
    /// Too many requests are queued; retry after the hint.
    #[error("overloaded, retry after {} ms", .retry_after.as_millis())]
    Overloaded { retry_after: Duration },
    /// No quorum or no progress in time; the outcome of a write is unknown
    /// (retrying an idempotent write is safe).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A compare-and-set found another revision; read again and retry.
    #[error("{0}")]
    Conflict(String),
    /// The storage engine failed; the replica cannot continue safely.
    #[error("storage: {0}")]
    Storage(String),
    /// The replica is shutting down.
    #[error("replica is shutting down")]
    ShuttingDown,
}

fn leader_hint(leader: &Option<(NodeId, String)>) -> String {
    match leader {
        Some((id, addr)) => format!("; the leader is replica {id} at {addr}"),
        None => "; no leader is known".to_owned(),
    }
}

impl StoreError {
    /// What `user` is told about a conversation they may not see: the same
    /// NOT_FOUND whether it does not exist or they are not a member, so a
    /// stranger cannot learn which conversation ids exist.
    pub fn not_visible(conversation: impl std::fmt::Display, user: impl std::fmt::Display) -> Self {
        Self::NotFound(format!(
            "conversation {conversation} does not exist or {user} is not a member"
        ))
    }

    /// Whether retrying the same request (elsewhere or later) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. }
                | Self::Overloaded { .. }
                | Self::Unavailable(_)
                | Self::ShuttingDown
        )
    }

    pub fn code(&self) -> Code {
        match self {
            Self::NotLeader { .. } | Self::Unavailable(_) | Self::ShuttingDown => Code::Unavailable,
            Self::Overloaded { .. } => Code::ResourceExhausted,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Conflict(_) => Code::Aborted,
            Self::Storage(_) => Code::Internal,
        }
    }

    /// Rebuilds an error from a gRPC status (used by the store client).
    pub fn from_status(status: &Status) -> Self {
        let msg = status.message().to_owned();
        // Statuses made by the local transport (connection reset, GOAWAY,
        // refused) carry their cause; the request may or may not have
        // reached a replica, which is what Unavailable means.
        if std::error::Error::source(status).is_some() {
            return Self::Unavailable(msg);
        }
        let md = status.metadata();
        match status.code() {
            Code::Unavailable => {
                let id = md
                    .get(LEADER_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let addr = md.get(LEADER_ADDR_HEADER).and_then(|v| v.to_str().ok());
                match (id, addr) {
                    (Some(id), Some(addr)) => Self::NotLeader {
                        leader: Some((NodeId(id), addr.to_owned())),
                    },
                    _ if msg.starts_with("not the leader") => Self::NotLeader { leader: None },
                    _ => Self::Unavailable(msg),
                }
            }
            Code::ResourceExhausted => {
                let ms = md
                    .get(RETRY_AFTER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100);
                Self::Overloaded {
                    retry_after: Duration::from_millis(ms),
                }
            }
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument(msg),
            Code::NotFound => Self::NotFound(msg),
            Code::AlreadyExists => Self::AlreadyExists(msg),
            Code::PermissionDenied => Self::PermissionDenied(msg),
            Code::FailedPrecondition => Self::FailedPrecondition(msg),
            Code::Aborted => Self::Conflict(msg),
            Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => Self::Unavailable(msg),
            _ => Self::Storage(msg),
        }
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        let mut status = Status::new(err.code(), err.to_string());
        match &err {
            StoreError::NotLeader {
                leader: Some((id, addr)),
            } => {
                let md = status.metadata_mut();
                if let Ok(v) = id.0.to_string().parse() {
                    md.insert(LEADER_ID_HEADER, v);
                }
                if let Ok(v) = addr.parse() {
                    md.insert(LEADER_ADDR_HEADER, v);
                }
            }
            StoreError::Overloaded { retry_after } => {
                if let Ok(v) = retry_after.as_millis().to_string().parse() {
                    status.metadata_mut().insert(RETRY_AFTER_HEADER, v);
                }
            }
            _ => {}
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_hint_survives_the_round_trip_through_grpc_status() {
        let err = StoreError::NotLeader {
            leader: Some((NodeId(2), "127.0.0.1:7002".into())),
        };
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("replica 2 at 127.0.0.1:7002"),
            "{}",
            status.message()
        );
        match StoreError::from_status(&status) {
            StoreError::NotLeader {
                leader: Some((id, addr)),
            } => {
                assert_eq!(id, NodeId(2));
                assert_eq!(addr, "127.0.0.1:7002");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn overload_carries_retry_after() {
        let status = Status::from(StoreError::Overloaded {
            retry_after: Duration::from_millis(250),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        match StoreError::from_status(&status) {
            StoreError::Overloaded { retry_after } => {
                assert_eq!(retry_after, Duration::from_millis(250))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
