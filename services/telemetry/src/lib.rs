//! What operators see of a running service: an admin HTTP endpoint
//! ([`admin`]) serving Prometheus metrics and status pages, and the
//! metric types the services fill ([`metrics`]).

pub mod admin;
pub mod metrics;
pub mod time;
pub mod trace;
