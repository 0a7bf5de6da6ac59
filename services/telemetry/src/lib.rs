//! What operators see of a running service: an admin HTTP endpoint
//! ([`admin`]) serving Prometheus metrics and status pages, and the
//! metric types the services fill ([`metrics`]).

pub mod admin;
pub mod config;
pub mod metrics;
pub mod time;
pub mod trace;

/// The async runtime of a service: `worker_threads` workers (`None`: one
/// per core). Several services sharing a few cores each do better with
/// fewer workers than cores: fewer threads to wake and switch between.
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        b.worker_threads(n.max(1));
    }
    b.enable_all().build()
}
