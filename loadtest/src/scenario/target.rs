//! What the load test runs against, and how it breaks it: a local cluster
//! it starts itself (faults by signals), a docker compose cluster (faults
//! through the Docker engine), or gateways that are already running (no
//! faults).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use chatctl::local::{LocalCluster, LocalOptions};
use chatctl::restart::{RestartLog, Tier, rolling_restart};

use super::fault::FaultKind;

pub(super) const STORES: [&str; 3] = ["store-1", "store-2", "store-3"];
/// How long a restarted service may take to become healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

pub enum Target {
    Local(Box<LocalCluster>),
    Compose(Compose),
    Gateways { gateways: Vec<String>, key: String },
}

impl Target {
    /// Starts a local cluster in `dir` and waits until it is healthy.
    pub async fn local(dir: &Path, opts: LocalOptions) -> anyhow::Result<Self> {
        let opts = LocalOptions {
            dir: dir.to_owned(),
            base_port: 0,
            store_args: [opts.store_args, vec!["--fault-signals".into()]].concat(),
            ..opts
        };
        let mut c = LocalCluster::start(&opts)?;
        c.wait_healthy(HEALTHY_WITHIN).await?;
        Ok(Target::Local(Box::new(c)))
    }

    pub fn compose(file: PathBuf, project: String, key: Option<String>) -> anyhow::Result<Self> {
        Compose::new(file, project, key).map(Target::Compose)
    }

    /// One line naming the target, for the report.
    pub fn describe(&self) -> String {
        match self {
            Target::Local(_) => "local (3 stores, 2 routers, 2 gateways as local processes)".into(),
            Target::Compose(c) => format!("compose {} (project {})", c.file.display(), c.project),
            Target::Gateways { gateways, .. } => format!("gateways {}", gateways.join(",")),
        }
    }

    pub fn gateways(&self) -> Vec<String> {
        match self {
            Target::Local(c) => c.gateways.clone(),
            Target::Compose(c) => c.gateways.clone(),
            Target::Gateways { gateways, .. } => gateways.clone(),
        }
    }

    /// The CA of the gateways' public certificate, when their public port
    /// is TLS (compose: the CA deploy/up.sh copied out).
    pub fn gateway_ca(&self) -> Option<Vec<u8>> {
        match self {
            Target::Compose(c) => std::fs::read(
                c.file
                    .with_file_name(".certs")
                    .join("operator")
                    .join("ca.crt"),
            )
            .ok(),
            _ => None,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Target::Local(c) => &c.key,
            Target::Compose(c) => &c.key,
            Target::Gateways { key, .. } => key,
        }
    }

    pub fn can_inject(&self) -> bool {
        !matches!(self, Target::Gateways { .. })
    }

    pub(super) async fn store_leader(&self) -> anyhow::Result<String> {
        match self {
            Target::Local(c) => c.store_leader().await,
            Target::Compose(c) => c.store_leader(),
            Target::Gateways { .. } => bail!("no faults against a running cluster"),
        }
    }

    pub(super) async fn store_follower(&mut self) -> anyhow::Result<String> {
        let leader = self.store_leader().await?;
        for s in STORES {
            if s != leader && self.running(s) {
                return Ok(s.to_owned());
            }
        }
        bail!("no running store follower")
    }

    pub(super) fn running(&mut self, name: &str) -> bool {
        match self {
            Target::Local(c) => c.running(name),
            Target::Compose(c) => c.running(name),
            Target::Gateways { .. } => false,
        }
    }

    /// Injects `kind`; returns the service it hit.
    pub async fn inject(&mut self, kind: FaultKind) -> anyhow::Result<String> {
        use FaultKind::*;
        let victim = match kind {
            StoreLeader | PartitionLeader | PauseLeader => self.store_leader().await?,
            StoreFollower | PartitionFollower | PauseFollower => self.store_follower().await?,
            // Every replica, as one victim (restarted together).
            StoreAll => STORES.join(","),
            Gateway => "gateway-1".into(),
            Router => "router-1".into(),
            Heal | Unpause => "every store".into(),
        };
        match self {
            Target::Local(c) => match kind {
                StoreLeader | StoreFollower | Gateway | Router => c.kill(&victim).await?,
                StoreAll => {
                    // SIGKILL to all first, so they die together; then reap.
                    for s in STORES {
                        c.signal(s, "KILL")?;
                    }
                    for s in STORES {
                        c.kill(s).await?;
                    }
                }
                PartitionLeader | PartitionFollower => c.signal(&victim, "USR1")?,
                PauseLeader | PauseFollower => c.signal(&victim, "STOP")?,
                Heal | Unpause => {
                    let sig = if kind == Heal { "USR2" } else { "CONT" };
                    for s in STORES {
                        if c.running(s) {
                            c.signal(s, sig)?;
                        }
                    }
                }
            },
            Target::Compose(c) => {
                let container = c.container(&victim);
                match kind {
                    StoreLeader | StoreFollower | Gateway | Router => {
                        c.docker(&["kill", &container])?;
                    }
                    StoreAll => {
                        let all: Vec<String> = STORES.iter().map(|s| c.container(s)).collect();
                        let mut args = vec!["kill"];
                        args.extend(all.iter().map(String::as_str));
                        c.docker(&args)?;
                    }
                    PartitionLeader | PartitionFollower => {
                        c.docker(&["network", "disconnect", &c.network(), &container])?;
                        c.partitioned.push(container);
                    }
                    PauseLeader | PauseFollower => {
                        c.docker(&["pause", &container])?;
                        c.paused.push(container);
                    }
                    Heal => {
                        for p in std::mem::take(&mut c.partitioned) {
                            c.docker(&["network", "connect", &c.network(), &p])?;
                        }
                    }
                    Unpause => {
                        for p in std::mem::take(&mut c.paused) {
                            c.docker(&["unpause", &p])?;
                        }
                    }
                }
            }
            Target::Gateways { .. } => bail!("no faults against a running cluster"),
        }
        Ok(victim)
    }

    /// Starts a killed service again (it keeps its data); `name` may list
    /// several, comma separated (a whole tier).
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        for name in name.split(',') {
            match self {
                Target::Local(c) => c.restart(name)?,
                Target::Compose(c) => c.docker(&["start", &c.container(name)]).map(drop)?,
                Target::Gateways { .. } => bail!("no faults against a running cluster"),
            }
        }
        Ok(())
    }

    /// Undoes partitions and pauses, so the cluster can converge before the
    /// read-back.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        if self.can_inject() {
            self.inject(FaultKind::Unpause).await?;
            self.inject(FaultKind::Heal).await?;
        }
        Ok(())
    }

    /// Every service, in the order a rolling restart takes them: store
    /// followers, the store leader, routers, gateways.
    /// Restarts every instance of `tier` through `chatctl rollout
    /// restart`'s procedure: the change guard first, leadership moved off
    /// a store leader before it stops, each instance serving (and a store
    /// replica caught up) before the next.
    pub async fn rolling_restart(&mut self, tier: Tier) -> anyhow::Result<RestartLog> {
        match self {
            Target::Local(c) => rolling_restart(&mut **c, tier, 1, true).await,
            Target::Compose(c) => {
                let mut p = chatctl::compose::Compose {
                    project: c.project.clone(),
                    stores: c.store_addrs()?,
                    tls: c.operator_tls()?,
                };
                rolling_restart(&mut p, tier, 1, true).await
            }
            Target::Gateways { .. } => bail!("cannot restart services of a running cluster"),
        }
    }

    /// A client of the store replicas (for rollout plans).
    pub fn store_client(&self) -> anyhow::Result<chat_store::StoreClient> {
        let (addrs, tls) = match self {
            Target::Local(c) => (c.stores.clone(), c.operator_tls()),
            Target::Compose(c) => (c.store_addrs()?, c.operator_tls()?),
            Target::Gateways { .. } => bail!("the store of a running cluster is not known here"),
        };
        Ok(chat_store::StoreClient::new(addrs, Duration::from_secs(10))?.with_tls(tls))
    }

    /// Starts a router with `args` on the local cluster's spare address.
    pub fn start_router(&mut self, name: &str, args: &[String]) -> anyhow::Result<String> {
        match self {
            Target::Local(c) => c.start_router(name, args),
            _ => bail!("a canary router can only be started on the local cluster (--local)"),
        }
    }

    /// Waits up to `within` for every service to be healthy; returns those
    /// that still are not (empty when all are).
    pub async fn wait_healthy(&self, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let waiting = self.unhealthy().await;
            if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                return waiting;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Services that are not healthy now (empty when every one is).
    pub async fn unhealthy(&self) -> Vec<String> {
        match self {
            Target::Local(c) => c.unhealthy().await,
            Target::Compose(c) => c.unhealthy(),
            Target::Gateways { .. } => Vec::new(),
        }
    }

    /// Peak resident memory of each service process, MiB (local only).
    pub fn peak_rss_mib(&self) -> BTreeMap<String, f64> {
        match self {
            Target::Local(c) => c
                .peak_rss_kib()
                .into_iter()
                .map(|(n, kib)| (n, (kib as f64 / 102.4).round() / 10.0))
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    fn local_cluster(&self) -> anyhow::Result<&LocalCluster> {
        match self {
            Target::Local(c) => Ok(c),
            _ => bail!("this drill reaches into the replicas' data directories: it needs --local"),
        }
    }

    /// The local cluster's directory.
    pub fn local_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(self.local_cluster()?.dir.clone())
    }

    /// The data directory of local store `name`.
    pub fn store_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.local_cluster()?.dir.join(name))
    }

    /// The address local store `name` serves on.
    pub fn store_addr(&self, name: &str) -> anyhow::Result<String> {
        self.local_cluster()?
            .addr(name)
            .with_context(|| format!("no service named {name}"))
    }

    /// The log file of local service `name`.
    pub fn log(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.local_cluster()?.log(name))
    }

    /// The process id of service `name` as this host sees it (compose: the
    /// container's main process), while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        match self {
            Target::Local(c) => c.pid(name),
            Target::Compose(c) => {
                let init: u32 = c
                    .docker(&["inspect", "-f", "{{.State.Pid}}", &c.container(name)])
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&pid| pid != 0)?;
                // The container's first process is Docker's init; the
                // service is its child.
                let children =
                    std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
                Some(
                    children
                        .split_whitespace()
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(init),
                )
            }
            Target::Gateways { .. } => None,
        }
    }

    /// The address of compose service `name`'s `port` on the project's own
    /// network, reachable from this host without the port publisher
    /// (None for other targets).
    pub fn network_addr(&self, name: &str, port: u16) -> Option<String> {
        let Target::Compose(c) = self else {
            return None;
        };
        let ips = c
            .docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                &c.container(name),
            ])
            .ok()?;
        ips.split_whitespace()
            .next()
            .map(|ip| format!("{ip}:{port}"))
    }

    /// Stops service `name` gracefully (SIGTERM, SIGKILL after `grace`);
    /// [`Target::restart`] starts it again.
    pub async fn stop(&mut self, name: &str, grace: Duration) -> anyhow::Result<()> {
        match self {
            Target::Local(c) => c.stop(name, grace).await,
            Target::Compose(c) => c
                .docker(&[
                    "stop",
                    "-t",
                    &grace.as_secs().to_string(),
                    &c.container(name),
                ])
                .map(drop),
            Target::Gateways { .. } => bail!("no faults against a running cluster"),
        }
    }

    /// SIGKILLs local service `name` (not to be started again by itself).
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        match self {
            Target::Local(c) => c.kill(name).await,
            _ => bail!("this drill needs --local"),
        }
    }

    /// Stops what the load test started.
    pub async fn shutdown(self) {
        if let Target::Local(c) = self {
            c.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// A compose project started with deploy/up.sh.
pub struct Compose {
    file: PathBuf,
    project: String,
    key: String,
    gateways: Vec<String>,
    partitioned: Vec<String>,
    paused: Vec<String>,
}

impl Compose {
    fn new(file: PathBuf, project: String, key: Option<String>) -> anyhow::Result<Self> {
        anyhow::ensure!(file.exists(), "compose file {} not found", file.display());
        let key = match key {
            Some(k) => k,
            None => {
                let env = file.with_file_name(".env");
                std::fs::read_to_string(&env)
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("CHAT_TOKEN_KEY=").map(str::to_owned))
                    })
                    .with_context(|| {
                        format!(
                            "no token key: set CHAT_TOKEN_KEY or start the cluster with deploy/up.sh (which writes {})",
                            env.display()
                        )
                    })?
            }
        };
        let mut c = Self {
            file,
            project,
            key,
            gateways: Vec::new(),
            partitioned: Vec::new(),
            paused: Vec::new(),
        };
        for g in ["gateway-1", "gateway-2"] {
            let out = c.compose(&["port", g, "7201"])?;
            let addr = out.trim().replace("0.0.0.0", "127.0.0.1");
            anyhow::ensure!(
                !addr.is_empty(),
                "{g} publishes no port; is the compose cluster up (deploy/up.sh)?"
            );
            c.gateways.push(addr);
        }
        Ok(c)
    }

    /// The operator identity deploy/up.sh made next to the compose file.
    fn operator_tls(&self) -> anyhow::Result<Option<std::sync::Arc<chat_security::Tls>>> {
        chatctl::local::operator_tls(&self.file.with_file_name(".certs"))
    }

    /// The store replicas' ports published on this host.
    fn store_addrs(&self) -> anyhow::Result<Vec<String>> {
        STORES
            .iter()
            .map(|s| {
                let out = self.compose(&["port", s, "7001"])?;
                let addr = out.trim().replace("0.0.0.0", "127.0.0.1");
                anyhow::ensure!(!addr.is_empty(), "{s} publishes no port");
                Ok(addr)
            })
            .collect()
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["-p", &self.project, "-f"])
            .arg(&self.file)
            .args(args);
        run(cmd, "docker-compose", args)
    }

    fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("docker");
        cmd.args(args);
        run(cmd, "docker", args)
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    /// The network the store replicas talk on (deploy/docker-compose.yml).
    fn network(&self) -> String {
        format!("{}_backend", self.project)
    }

    fn running(&self, service: &str) -> bool {
        self.docker(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            &self.container(service),
        ])
        .is_ok_and(|s| s.trim() == "true")
    }

    /// The leader as the stores report it, asked from inside the compose
    /// network by the `operator` toolbox (only the operator identity may
    /// ask a store for its status).
    fn store_leader(&self) -> anyhow::Result<String> {
        let out = self.docker(&[
            "exec",
            &self.container("operator"),
            "chatctl",
            "--store",
            "store-1:7001,store-2:7001,store-3:7001",
            "--timeout-secs",
            "2",
            "store",
            "status",
        ])?;
        // Columns: id address role term leader ...; the highest term wins.
        let best = out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let term: u64 = f.get(3)?.parse().ok()?;
                let leader: u64 = f.get(4)?.parse().ok()?;
                (leader != 0).then_some((term, leader))
            })
            .max();
        match best {
            Some((_, id)) => Ok(format!("store-{id}")),
            None => bail!("no store replica knows a leader"),
        }
    }

    fn unhealthy(&self) -> Vec<String> {
        let services =
            STORES
                .iter()
                .copied()
                .chain(["router-1", "router-2", "gateway-1", "gateway-2"]);
        services
            .filter(|s| {
                self.docker(&[
                    "inspect",
                    "-f",
                    "{{.State.Health.Status}}",
                    &self.container(s),
                ])
                .map_or(true, |h| h.trim() != "healthy")
            })
            .map(String::from)
            .collect()
    }
}

fn run(mut cmd: Command, tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {tool}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
