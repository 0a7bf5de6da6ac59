//! Helpers for tests that run the real service binaries as processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Directory holding the workspace's built binaries: `CHAT_BIN_DIR`, or the
/// profile directory this test executable was built into.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("CHAT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe.parent().and_then(Path::parent).context("test executable has no profile directory")?;
    Ok(dir.to_path_buf())
}

pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!("{} is missing; build it first (cargo build --workspace --bins)", path.display());
    }
    Ok(path)
}

/// A free port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One `chat-store` process; killed when dropped.
pub struct StoreProcess {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl StoreProcess {
    pub fn new(id: u64, addr: String, peers: &str, data_dir: PathBuf, log: PathBuf) -> Self {
        let args = vec![
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--peers".into(),
            peers.to_owned(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        Self { id, addr, data_dir, args, log, child: None }
    }

    /// Extra flags for every later start.
    pub fn with_args(mut self, extra: &[&str]) -> Self {
        self.args.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(binary("chat-store")?)
            .args(&self.args)
            .env("CHAT_STORE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawn chat-store")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL: no chance to flush, hand over or say goodbye.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        let pid = c.id().context("already exited")?;
        let ok = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?.success();
        if !ok {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(within, c.wait()).await.context("no exit after SIGTERM")??)
    }

    /// Waits for the process to exit by itself (bounded).
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let c = self.child.as_mut().context("not running")?;
        let status = tokio::time::timeout(within, c.wait()).await.context("still running")??;
        self.child = None;
        Ok(status)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
