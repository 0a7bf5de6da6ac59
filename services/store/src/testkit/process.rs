//! Running the real `chat-store` binary as a child process, for process
//! tests and benchmarks. Children are killed when their handle is dropped;
//! only processes started here are ever signalled.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A free port on 127.0.0.1 for a child process to bind next. Chosen below
/// the kernel's ephemeral range (32768 and up), which `127.0.0.1:0` binds and
/// outgoing connections draw from, so a port checked free here is not taken
/// by one of those before the child binds it.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let p = 20_000 + (rand::random::<u16>() % 12_000);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port found in 20000..32000")
}

/// `n` distinct free ports (see `free_port`).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut out: Vec<u16> = Vec::with_capacity(n);
    while out.len() < n {
        let p = free_port()?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// The flag that runs a replica without TLS (the default here).
const PLAINTEXT: &str = "--insecure-plaintext";

/// One `chat-store` process; killed when dropped.
pub struct StoreProcess {
    binary: PathBuf,
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl StoreProcess {
    pub fn new(
        binary: PathBuf,
        id: u64,
        addr: String,
        peers: &str,
        data_dir: PathBuf,
        log: PathBuf,
    ) -> Self {
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--peers".into(),
            peers.to_owned(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.push(PLAINTEXT.into());
        Self {
            binary,
            id,
            addr,
            data_dir,
            args,
            log,
            child: None,
        }
    }

    /// Serve and dial peers with mutual TLS, the identity in `dir`
    /// (ca.crt, tls.crt, tls.key), instead of plaintext.
    pub fn with_tls(mut self, dir: &std::path::Path) -> Self {
        self.args.retain(|a| a != PLAINTEXT);
        self.add_args(&["--tls-dir", &dir.display().to_string()]);
        self
    }

    /// Extra flags for every later start.
    pub fn with_args(mut self, extra: &[&str]) -> Self {
        self.add_args(extra);
        self
    }

    /// Extra flags for every later start.
    pub fn add_args(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|s| s.to_string()));
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        if !self.binary.exists() {
            bail!(
                "{} is missing; build it first (cargo build --workspace --bins)",
                self.binary.display()
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
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
    pub async fn terminate(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        let pid = c.id().context("already exited")?;
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(within, c.wait())
            .await
            .context("no exit after SIGTERM")??)
    }

    /// Waits for the process to exit by itself (bounded).
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let c = self.child.as_mut().context("not running")?;
        let status = tokio::time::timeout(within, c.wait())
            .await
            .context("still running")??;
        self.child = None;
        Ok(status)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `n` replica processes of one new group on free 127.0.0.1 ports, with
/// data and logs under `dir`; none started yet. `extra` flags go to each.
pub fn local_group(
    binary: &std::path::Path,
    n: u64,
    dir: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<Vec<StoreProcess>> {
    let addrs: Vec<String> = free_ports(n as usize)?
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    Ok(addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let id = i as u64 + 1;
            StoreProcess::new(
                binary.to_path_buf(),
                id,
                a.clone(),
                &peers,
                dir.join(format!("data-{id}")),
                dir.join(format!("store-{id}.log")),
            )
            .with_args(extra)
        })
        .collect())
}
