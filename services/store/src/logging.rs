//! Bridges raft-rs's slog logging into `tracing`, and sets up tracing for
//! tests (the binaries use `chat_telemetry::trace::init`).

use std::fmt::Write as _;

use slog::{Drain, KV, OwnedKVList, Record};

use crate::types::NodeId;

struct TracingDrain;

struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let msg = record.msg();
        let kv = fields.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{kv}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{kv}"),
            slog::Level::Info => tracing::debug!(target: "raft", "{msg}{kv}"),
            slog::Level::Debug | slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{kv}"),
        }
        Ok(())
    }
}

pub fn raft_logger(id: NodeId) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("replica" => id.0))
}

/// Installs a subscriber writing to the test harness's capture, filtered by
/// `RUST_LOG` (default: warnings). Safe to call many times.
pub fn init_test_tracing() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
