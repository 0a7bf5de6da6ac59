//! The chat backend's message store: a raft group (raft-rs) whose replicas
//! keep the raft log in a write-ahead log made for raft logs (raft-engine)
//! and the state machine in an ordered key-value engine (sled in
//! production, an in-memory twin in tests).
//!
//! An append is acknowledged only after its entry is committed on a
//! majority, each of which made it durable with an fdatasync of its raft
//! log, and applied on the leader.
//! See ARCHITECTURE.md for the data flow and the invariants.

pub mod admin;
pub mod backup;
pub mod checkpoint;
pub mod clock;
/// The store's client, from `chat-store-client`.
pub mod client {
    pub use chat_store_client::client::*;
}
pub mod codec;
pub mod config;
pub mod data_dir;
pub mod driver;
pub mod engine;
pub mod error;
pub mod faults;
pub mod keys;
pub mod log_store;
pub mod logging;
pub mod node;
pub mod replica;
pub mod service;
pub mod sim;
pub mod snapshot;
pub mod state_machine;
pub mod testkit;
pub mod transport;
pub mod types;
pub mod wal;
pub mod writer;

pub use chat_store_client::{StoreClient, StoreError};
pub use replica::{Replica, ReplicaOptions, Storage};
pub use types::NodeId;
