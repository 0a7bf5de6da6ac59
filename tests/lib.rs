//! Helpers for tests that run the real service binaries as processes.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
pub use chat_store::testkit::process::{StoreProcess, free_port, local_group};

/// Directory holding the workspace's built binaries: `CHAT_BIN_DIR`, or the
/// profile directory this test executable was built into.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("CHAT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no profile directory")?;
    Ok(dir.to_path_buf())
}

pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!(
            "{} is missing; build it first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}
