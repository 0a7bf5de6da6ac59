//! Resilience shared by the chat services: the pieces that keep a tier
//! serving its most important traffic when it is offered more than it can
//! take, and that keep callers from turning a slowdown into an outage.
//!
//! Server side, in the order a request meets them (see [`layer`]):
//! a paced accept loop ([`incoming`]), per-IP and per-user token buckets
//! ([`bucket`]), and an adaptive concurrency limit that sheds the lowest
//! [`Criticality`] first ([`limit`]). Client side: deadlines carried across
//! hops ([`deadline`]), power-of-two-choices balancing with outlier ejection
//! ([`balance`]), and retries bounded by a budget and by client-side
//! throttling ([`retry`]).
//!
//! Every piece is plain data plus atomics or a short lock, with no IO, so it
//! is tested with a hand-driven clock.

pub mod balance;
pub mod bucket;
pub mod criticality;
pub mod deadline;
pub mod health;
pub mod incoming;
pub mod layer;
pub mod limit;
pub mod retry;
mod window;

pub use criticality::Criticality;

use std::time::Duration;

/// Metadata key of the server's hint of when to try again.
pub const RETRY_AFTER: &str = "retry-after-ms";

/// The server's `retry-after-ms` hint, if it gave one.
pub fn retry_after(s: &tonic::Status) -> Option<Duration> {
    let ms: u64 = s.metadata().get(RETRY_AFTER)?.to_str().ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// `status` with a `retry-after-ms` hint attached.
pub fn with_retry_after(mut status: tonic::Status, after: Duration) -> tonic::Status {
    if let Ok(v) = after.as_millis().to_string().parse() {
        status.metadata_mut().insert(RETRY_AFTER, v);
    }
    status
}

/// RESOURCE_EXHAUSTED with a retry-after hint: the server is shedding load.
pub fn overloaded(msg: impl Into<String>, after: Duration) -> tonic::Status {
    with_retry_after(tonic::Status::resource_exhausted(msg), after)
}

/// Metadata key marking a refusal as the caller's own limit (a rate or
/// byte quota), not the server's overload: [`layer::LoadSignal`] ignores
/// such refusals.
pub const LIMIT_HEADER: &str = "chat-limit";

/// RESOURCE_EXHAUSTED with a retry-after hint because this caller is over
/// its own limit; the server itself may be idle.
pub fn over_limit(msg: impl Into<String>, after: Duration) -> tonic::Status {
    let mut s = overloaded(msg, after);
    s.metadata_mut().insert(
        LIMIT_HEADER,
        tonic::metadata::MetadataValue::from_static("caller"),
    );
    s
}
