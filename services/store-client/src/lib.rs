//! The client side of the chat backend's message store, in a crate of its
//! own so that routers, gateways and tools link neither raft nor the
//! store's storage engines: `StoreClient` (leader-following, retries with
//! backoff), `StoreError` (what a caller can do, and its one mapping to and
//! from gRPC status), and the identifiers both sides validate alike.

pub mod client;
pub mod error;
pub mod ids;

pub use client::StoreClient;
pub use error::StoreError;
pub use ids::NodeId;
