//! The whole backend as local processes on 127.0.0.1, no Docker needed:
//! 3 store replicas, 2 routers and 2 gateways from the binaries next to the
//! running one. `chatctl local up` runs it in the foreground; the load tests
//! start the same layout through [`LocalCluster`] and inject faults by
//! signals.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use chat_store::StoreClient;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Directory for data, logs and the token key.
    #[arg(long, default_value = ".local/cluster")]
    dir: PathBuf,
    /// Ports: stores base+1..3, routers base+101..102, gateways base+201..202
    /// (internal base+211..212). 0 picks free ports.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
}

/// What to start, and where.
#[derive(Clone, Debug, Default)]
pub struct LocalOptions {
    /// Data, logs and the token key.
    pub dir: PathBuf,
    /// See [`UpArgs`]; 0 picks free ports.
    pub base_port: u16,
    /// Extra arguments of every store, router and gateway.
    pub store_args: Vec<String>,
    pub router_args: Vec<String>,
    pub gateway_args: Vec<String>,
}

/// One service process.
struct Proc {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Child,
    /// Its exit has been reported.
    reported: bool,
}

impl Proc {
    fn spawn(
        name: &str,
        bin: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let child = Self::start(bin, &args, &env, &logs.join(format!("{name}.log")))?;
        Ok(Self {
            name: name.to_owned(),
            bin: bin.to_owned(),
            args,
            env,
            child,
            reported: false,
        })
    }

    fn start(
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        cmd.spawn()
            .with_context(|| format!("cannot start {}", bin.display()))
    }

    /// The command line that starts it again (secrets elided).
    fn command(&self) -> String {
        let env: String = self.env.iter().map(|(k, _)| format!("{k}=... ")).collect();
        format!("{env}{} {}", self.bin.display(), self.args.join(" "))
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .with_context(|| format!("{} is not running", self.name))?;
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} ({}) failed", self.name);
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    async fn stop(&mut self, grace: Duration) {
        if self.signal("TERM").is_ok()
            && tokio::time::timeout(grace, self.child.wait()).await.is_ok()
        {
            return;
        }
        let _ = self.child.kill().await;
    }
}

/// The port at `offset` from `base`, or with base 0 the next of `free`
/// (distinct ports picked in advance).
fn port(base: u16, offset: u16, free: &mut Vec<u16>) -> anyhow::Result<String> {
    let p = if base == 0 {
        free.pop().context("ran out of free ports")?
    } else {
        base.checked_add(offset).context("--base-port too high")?
    };
    Ok(format!("127.0.0.1:{p}"))
}

/// A binary next to the running one.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("the running binary has no directory")?
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing; build every binary first: cargo build --release",
            path.display()
        );
    }
    Ok(path)
}

/// The deployment's token key, created on first use.
fn token_key(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("token.key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        return Ok(k.trim().to_owned());
    }
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(key.as_bytes())?;
    }
    Ok(key)
}

/// Whether `addr` answers SERVING for `service` on gRPC health.
pub async fn healthy(addr: &str, service: &str) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let Ok(ep) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(ch) = ep.connect_timeout(Duration::from_secs(1)).connect().await else {
        return false;
    };
    let req = HealthCheckRequest {
        service: service.to_owned(),
    };
    let mut client = HealthClient::new(ch);
    matches!(tokio::time::timeout(Duration::from_secs(2), client.check(req)).await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::ServingStatus::Serving as i32)
}

/// A running local cluster. Its processes are named `store-1..3`,
/// `router-1..2` and `gateway-1..2`; dropping it kills them.
pub struct LocalCluster {
    pub dir: PathBuf,
    /// The token key the gateways verify with.
    pub key: String,
    pub stores: Vec<String>,
    pub routers: Vec<String>,
    pub gateways: Vec<String>,
    procs: Vec<Proc>,
    /// Admin client of the stores, for health and the leader.
    admin: StoreClient,
}

impl LocalCluster {
    /// Starts every process; see [`LocalCluster::wait_healthy`].
    pub fn start(opts: &LocalOptions) -> anyhow::Result<Self> {
        let dir = std::path::absolute(&opts.dir)?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let key = token_key(&dir)?;
        let (store_bin, router_bin, gateway_bin) = (
            sibling_binary("chat-store")?,
            sibling_binary("chat-router")?,
            sibling_binary("chat-gateway")?,
        );
        let b = opts.base_port;
        let mut free = if b == 0 {
            chat_store::testkit::process::free_ports(9)?
        } else {
            Vec::new()
        };
        let mut ports = |offset: u16, n: u16| -> anyhow::Result<Vec<String>> {
            (1..=n).map(|i| port(b, offset + i, &mut free)).collect()
        };
        let stores = ports(0, 3)?;
        let routers = ports(100, 2)?;
        let gateways = ports(200, 2)?;
        let internals = ports(210, 2)?;
        let peers = stores
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");

        let mut procs = Vec::new();
        for (i, addr) in stores.iter().enumerate() {
            let id = (i + 1).to_string();
            let mut args: Vec<String> = ["--id", &id, "--listen", addr, "--peers", &peers]
                .map(String::from)
                .to_vec();
            args.push("--data-dir".into());
            args.push(dir.join(format!("store-{id}")).display().to_string());
            args.extend(opts.store_args.iter().cloned());
            let name = format!("store-{id}");
            procs.push(Proc::spawn(&name, &store_bin, args, vec![], &logs)?);
        }
        for (i, addr) in routers.iter().enumerate() {
            let mut args = vec![
                "--listen".into(),
                addr.clone(),
                "--store".into(),
                stores.join(","),
            ];
            args.extend(opts.router_args.iter().cloned());
            let name = format!("router-{}", i + 1);
            procs.push(Proc::spawn(&name, &router_bin, args, vec![], &logs)?);
        }
        for (i, addr) in gateways.iter().enumerate() {
            let mut args = vec![
                "--listen".into(),
                addr.clone(),
                "--internal-listen".into(),
                internals[i].clone(),
                "--routers".into(),
                routers.join(","),
            ];
            args.extend(opts.gateway_args.iter().cloned());
            let env = vec![("CHAT_TOKEN_KEY".to_owned(), key.clone())];
            let name = format!("gateway-{}", i + 1);
            procs.push(Proc::spawn(&name, &gateway_bin, args, env, &logs)?);
        }
        let admin = StoreClient::new(stores.clone(), Duration::from_secs(2))?;
        Ok(Self {
            dir,
            key,
            stores,
            routers,
            gateways,
            procs,
            admin,
        })
    }

    fn proc(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process named {name}"))
    }

    /// The log file of `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Sends `sig` (for example STOP or CONT) to `name`.
    pub fn signal(&mut self, name: &str, sig: &str) -> anyhow::Result<()> {
        self.proc(name)?.signal(sig)
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.proc(name)?;
        p.child.kill().await?;
        p.reported = true;
        Ok(())
    }

    /// SIGTERM (then SIGKILL after `grace`), and waits until it is gone.
    pub async fn stop(&mut self, name: &str, grace: Duration) -> anyhow::Result<()> {
        let p = self.proc(name)?;
        p.stop(grace).await;
        p.reported = true;
        Ok(())
    }

    /// Starts `name` again with its original command line; it must have
    /// exited.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let log = self.log(name);
        let p = self.proc(name)?;
        anyhow::ensure!(
            !matches!(p.child.try_wait(), Ok(None)),
            "{name} is still running"
        );
        p.child = Proc::start(&p.bin, &p.args, &p.env, &log)?;
        p.reported = false;
        Ok(())
    }

    /// The peak resident memory (VmHWM, KiB) of every running process,
    /// since it last started.
    pub fn peak_rss_kib(&self) -> Vec<(String, u64)> {
        self.procs
            .iter()
            .filter_map(|p| {
                let pid = p.child.id()?;
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                Some((p.name.clone(), kib))
            })
            .collect()
    }

    /// Whether `name` is running.
    pub fn running(&mut self, name: &str) -> bool {
        self.proc(name)
            .is_ok_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Processes that exited since the last call, each with its status and
    /// the command that starts it again.
    pub fn exited(&mut self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for p in &mut self.procs {
            if !p.reported
                && let Ok(Some(status)) = p.child.try_wait()
            {
                p.reported = true;
                out.push((p.name.clone(), status.to_string(), p.command()));
            }
        }
        out
    }

    /// Which services are not healthy yet (empty when all are).
    pub async fn unhealthy(&self) -> Vec<String> {
        let mut waiting = Vec::new();
        for (i, s) in self.stores.iter().enumerate() {
            if !self.admin.status_of(s).await.is_ok_and(|st| st.serving) {
                waiting.push(format!("store-{} ({s})", i + 1));
            }
        }
        for (i, r) in self.routers.iter().enumerate() {
            if !healthy(r, "chat.router.v1.Router").await {
                waiting.push(format!("router-{} ({r})", i + 1));
            }
        }
        for (i, g) in self.gateways.iter().enumerate() {
            if !healthy(g, "chat.v1.Chat").await {
                waiting.push(format!("gateway-{} ({g})", i + 1));
            }
        }
        waiting
    }

    /// Waits until every service is healthy; fails early when a process
    /// exits.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiting = self.unhealthy().await;
            if waiting.is_empty() {
                return Ok(());
            }
            if let Some((name, status, _)) = self.exited().into_iter().next() {
                bail!(
                    "{name} exited ({status}); see {}",
                    self.log(&name).display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "not healthy within {} s: {}; logs in {}",
                    timeout.as_secs(),
                    waiting.join(", "),
                    self.dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The name of the store replica that leads in the highest term any
    /// reachable replica knows of (an isolated old leader's claim loses).
    pub async fn store_leader(&self) -> anyhow::Result<String> {
        let mut best: Option<(u64, u64)> = None;
        for s in &self.stores {
            if let Ok(st) = self.admin.status_of(s).await
                && st.leader_id != 0
                && best.is_none_or(|(term, _)| st.term > term)
            {
                best = Some((st.term, st.leader_id));
            }
        }
        let (_, id) = best.context("no store replica knows a leader")?;
        Ok(format!("store-{id}"))
    }

    /// Stops every process (SIGTERM, then SIGKILL after `grace`).
    pub async fn shutdown(mut self, grace: Duration) {
        for p in &mut self.procs {
            p.stop(grace).await;
        }
    }
}

/// `chatctl local up`.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let opts = LocalOptions {
        dir: args.dir,
        base_port: args.base_port,
        ..Default::default()
    };
    let mut cluster = LocalCluster::start(&opts)?;
    let result = serve(&mut cluster).await;
    let dir = cluster.dir.clone();
    cluster.shutdown(Duration::from_secs(5)).await;
    eprintln!("stopped every process; data kept in {}", dir.display());
    result
}

async fn serve(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    let gws = cluster.gateways.join(",");
    println!("ready gateways={gws} dir={}", cluster.dir.display());
    println!("# in another terminal:");
    println!("export CHAT_GATEWAYS={gws} CHAT_TOKEN_KEY={}", cluster.key);
    println!("chatctl --as alice conversation create demo --members bob");
    println!("chatctl --as bob listen &");
    println!("chatctl --as alice send demo 'hello, bob'");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tick.tick() => {
                // A process that dies is a failure the cluster is built to
                // survive: say so and keep the rest running.
                for (name, status, command) in cluster.exited() {
                    eprintln!(
                        "{name} exited ({status}); the rest keeps running. Log: {}. Start it again with: {command}",
                        cluster.log(&name).display()
                    );
                }
            }
        }
    }
}
