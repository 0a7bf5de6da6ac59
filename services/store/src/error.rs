//! The store's error type lives in `chat-store-client` (callers share it);
//! this module adds what only the replica needs.

pub use chat_store_client::error::*;

/// A raft-rs error as the store reports it.
pub fn from_raft(err: raft::Error) -> StoreError {
    match err {
        raft::Error::ProposalDropped => {
            StoreError::Unavailable("proposal dropped (leadership is changing)".into())
        }
        raft::Error::Store(e) => StoreError::Storage(e.to_string()),
        other => StoreError::Storage(other.to_string()),
    }
}
