//! The whole backend as local processes on 127.0.0.1, no Docker needed:
//! 3 store replicas, 2 routers and 2 gateways from the binaries next to the
//! running one. `chatctl local up` runs it in the foreground; the load tests
//! start the same layout through [`LocalCluster`] and inject faults by
//! signals.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use chat_security::{Role, Tls};
use chat_store::StoreClient;
use std::sync::Arc;

use crate::restart::{Platform, Tier};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Directory for data, logs and the token key.
    #[arg(long, default_value = ".local/cluster")]
    dir: PathBuf,
    /// Ports: stores base+1..3, routers base+101..102, gateways base+201..202
    /// (internal base+211..212); admin HTTP (metrics, status page): stores
    /// base+11..13, routers base+111..112, gateways base+221..222. 0 picks
    /// free ports.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// Internal traffic in plaintext, every internal caller trusted (for
    /// comparison runs); by default every internal hop is mutual TLS with
    /// certificates made in DIR/tls.
    #[arg(long)]
    insecure_plaintext: bool,
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
    /// Router addresses the gateways are given beyond the two started, for
    /// routers started later with [`LocalCluster::start_router`] (a canary).
    pub spare_routers: usize,
    /// Where the service binaries are (default: next to the running one).
    pub bin_dir: Option<PathBuf>,
    /// Environment of every process (for example OTEL_EXPORTER_OTLP_ENDPOINT).
    pub env: Vec<(String, String)>,
    /// Internal traffic in plaintext instead of mutual TLS.
    pub plaintext: bool,
}

/// Makes the cluster's CA and identities in `dir` unless they are there.
pub fn ensure_certs(dir: &Path) -> anyhow::Result<()> {
    if !chat_security::certs::complete(dir) {
        chat_security::certs::generate()?.write(dir)?;
    }
    Ok(())
}

/// The operator identity of the cluster whose certificates are in `dir`
/// (DIR/tls of `local up`), if it has any.
pub fn operator_tls(tls_dir: &Path) -> anyhow::Result<Option<Arc<Tls>>> {
    let d = tls_dir.join(Role::Operator.name());
    if !d.is_dir() {
        return Ok(None);
    }
    Ok(Some(Tls::load(&d, Role::Operator)?))
}

/// The flags that give a service of `role` its identity under `tls_dir`,
/// or run it in plaintext.
fn tls_args(tls_dir: Option<&Path>, role: Role) -> Vec<String> {
    match tls_dir {
        Some(d) => vec![
            "--tls-dir".into(),
            d.join(role.name()).display().to_string(),
        ],
        None => vec!["--insecure-plaintext".into()],
    }
}

/// One service process.
struct Proc {
    name: String,
    /// The address it serves on.
    addr: String,
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
        addr: &str,
        bin: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let child = Self::start(
            bin,
            &args,
            &env,
            &dir.join("logs").join(format!("{name}.log")),
        )?;
        write_run_file(dir, name, child.id(), addr)?;
        Ok(Self {
            name: name.to_owned(),
            addr: addr.to_owned(),
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

/// Records that `name` runs as `pid` on `addr`, in `dir/run/<name>`, for
/// `chatctl rollout restart --local-dir`.
fn write_run_file(dir: &Path, name: &str, pid: Option<u32>, addr: &str) -> anyhow::Result<()> {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).with_context(|| format!("cannot create {}", run.display()))?;
    let tmp = run.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("{} {addr}\n", pid.unwrap_or(0)))?;
    std::fs::rename(&tmp, run.join(name))?;
    Ok(())
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

/// The kind of server that serves `service` on its port: store replicas
/// and routers are internal (TLS when the cluster has it); gateways' public
/// port is not.
fn server_role(service: &str) -> Option<Role> {
    if service.starts_with("chat.store.") || service.starts_with("chat.raft.") {
        Some(Role::Store)
    } else if service.starts_with("chat.router.") {
        Some(Role::Router)
    } else {
        None
    }
}

/// Whether `addr` answers SERVING for `service` on gRPC health. `tls`:
/// the identity to dial internal servers with (health needs none, but the
/// server must be the cluster's); `public_ca`: the CA a gateway's public
/// port is verified with when it is TLS (None: plaintext).
pub async fn healthy(
    addr: &str,
    service: &str,
    tls: Option<&Tls>,
    public_ca: Option<&[u8]>,
) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    // The server's kind follows from the service; for the server as a
    // whole ("") it is taken to be the identity's own kind (a service's
    // container checking itself).
    let role = match (server_role(service), tls) {
        (Some(r), _) => Some(r),
        (None, Some(t)) if service.is_empty() && t.role() != Role::Operator => Some(t.role()),
        (None, _) => None,
    };
    let ep = match (role, public_ca) {
        (Some(role), _) => chat_security::endpoint(tls, addr, role).ok(),
        (None, Some(ca)) => tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| {
                e.tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                )
            })
            .ok(),
        (None, None) => chat_security::endpoint(None, addr, Role::Gateway).ok(),
    };
    let Some(ep) = ep else {
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

/// The tier of an instance named `<tier>-<n>`.
pub fn tier_of(name: &str) -> Option<Tier> {
    [Tier::Store, Tier::Router, Tier::Gateway]
        .into_iter()
        .find(|t| name.starts_with(&format!("{}-", t.name())))
}

/// Whether the instance of `tier` at `addr` serves: a store replica that
/// says so in its status, a router or gateway that answers SERVING on gRPC
/// health.
pub async fn instance_healthy(
    admin: &StoreClient,
    tls: Option<&Tls>,
    tier: Tier,
    addr: &str,
) -> bool {
    match tier {
        Tier::Store => admin.status_of(addr).await.is_ok_and(|st| st.serving),
        Tier::Router => healthy(addr, "chat.router.v1.Router", tls, None).await,
        Tier::Gateway => healthy(addr, "chat.v1.Chat", None, None).await,
    }
}

impl Platform for LocalCluster {
    fn instances(&self, tier: Tier) -> Vec<String> {
        self.names(tier)
    }

    fn store_addrs(&self) -> Vec<String> {
        self.stores.clone()
    }

    fn operator_tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    async fn healthy(&self, tier: Tier, name: &str) -> bool {
        match self.addr(name) {
            Some(addr) => instance_healthy(&self.admin, self.tls.as_deref(), tier, &addr).await,
            None => false,
        }
    }

    async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        self.stop(name, STOP_GRACE).await?;
        LocalCluster::restart(self, name)
    }
}

/// How long a graceful stop may take before SIGKILL (the routers' drain
/// and in-flight calls fit well within it).
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// The cluster `chatctl local up` runs, seen from another process through
/// its run files (`<dir>/run/<name>`: pid and address); `local up` starts
/// again any process that exits.
pub struct RunDir {
    dir: PathBuf,
    admin: StoreClient,
    tls: Option<Arc<Tls>>,
}

impl RunDir {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let tls = operator_tls(&dir.join("tls"))?;
        let me = Self {
            dir: dir.join("run"),
            admin: StoreClient::new(vec!["127.0.0.1:1".into()], Duration::from_secs(2))?,
            tls,
        };
        let stores = me.store_addrs();
        anyhow::ensure!(
            !stores.is_empty(),
            "no local cluster found in {} (is `chatctl local up --dir {}` running?)",
            me.dir.display(),
            dir.display()
        );
        Ok(Self {
            admin: StoreClient::new(stores, Duration::from_secs(2))?.with_tls(me.tls.clone()),
            ..me
        })
    }

    /// Every (name, pid, address) recorded, by name.
    fn entries(&self) -> Vec<(String, u32, String)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<_> = rd
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_str()?.to_owned();
                if name.starts_with('.') {
                    return None;
                }
                let text = std::fs::read_to_string(e.path()).ok()?;
                let (pid, addr) = text.trim().split_once(' ')?;
                Some((name, pid.parse().ok()?, addr.to_owned()))
            })
            .collect();
        out.sort();
        out
    }

    fn entry(&self, name: &str) -> Option<(u32, String)> {
        self.entries()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, pid, addr)| (pid, addr))
    }
}

fn alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

impl Platform for RunDir {
    fn instances(&self, tier: Tier) -> Vec<String> {
        self.entries()
            .into_iter()
            .filter(|(n, _, _)| tier_of(n) == Some(tier))
            .map(|(n, _, _)| n)
            .collect()
    }

    fn store_addrs(&self) -> Vec<String> {
        self.entries()
            .into_iter()
            .filter(|(n, _, _)| tier_of(n) == Some(Tier::Store))
            .map(|(_, _, a)| a)
            .collect()
    }

    fn operator_tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    async fn healthy(&self, tier: Tier, name: &str) -> bool {
        match self.entry(name) {
            Some((pid, addr)) => {
                alive(pid) && instance_healthy(&self.admin, self.tls.as_deref(), tier, &addr).await
            }
            None => false,
        }
    }

    async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let (pid, _) = self
            .entry(name)
            .with_context(|| format!("no process named {name} in {}", self.dir.display()))?;
        anyhow::ensure!(alive(pid), "{name} (pid {pid}) is not running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} ({name}) failed");
        // `local up` starts it again once it has exited.
        let deadline = std::time::Instant::now() + STOP_GRACE + Duration::from_secs(10);
        loop {
            if let Some((now, _)) = self.entry(name)
                && now != pid
                && alive(now)
            {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{name} was not started again; is `chatctl local up` still running?"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
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
    /// Router addresses the gateways know of with no router yet, and
    /// admin addresses for them.
    spare: Vec<String>,
    spare_admin: Vec<String>,
    /// Every process's admin address, by name.
    admins: std::collections::HashMap<String, String>,
    procs: Vec<Proc>,
    /// Admin client of the stores, for health and the leader.
    admin: StoreClient,
    router_bin: PathBuf,
    router_args: Vec<String>,
    /// Where the identities are (None: plaintext), and the operator's.
    tls_dir: Option<PathBuf>,
    tls: Option<Arc<Tls>>,
}

impl LocalCluster {
    /// Starts every process; see [`LocalCluster::wait_healthy`].
    pub fn start(opts: &LocalOptions) -> anyhow::Result<Self> {
        let dir = std::path::absolute(&opts.dir)?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let key = token_key(&dir)?;
        let tls_dir = (!opts.plaintext).then(|| dir.join("tls"));
        if let Some(d) = &tls_dir {
            ensure_certs(d)?;
        }
        let tls = match &tls_dir {
            Some(d) => operator_tls(d)?,
            None => None,
        };
        let bin = |name: &str| match &opts.bin_dir {
            Some(dir) => {
                let p = dir.join(name);
                anyhow::ensure!(
                    p.exists(),
                    "{} is missing; build the binaries first",
                    p.display()
                );
                Ok(p)
            }
            None => sibling_binary(name),
        };
        let (store_bin, router_bin, gateway_bin) = (
            bin("chat-store")?,
            bin("chat-router")?,
            bin("chat-gateway")?,
        );
        let b = opts.base_port;
        let mut free = if b == 0 {
            chat_store::testkit::process::free_ports(16 + 2 * opts.spare_routers)?
        } else {
            Vec::new()
        };
        let mut ports = |offset: u16, n: u16| -> anyhow::Result<Vec<String>> {
            (1..=n).map(|i| port(b, offset + i, &mut free)).collect()
        };
        let stores = ports(0, 3)?;
        let mut routers = ports(100, 2 + opts.spare_routers as u16)?;
        let spare: Vec<String> = routers.split_off(2);
        let gateways = ports(200, 2)?;
        let internals = ports(210, 2)?;
        let store_admin = ports(10, 3)?;
        let mut router_admin = ports(110, 2 + opts.spare_routers as u16)?;
        let spare_admin: Vec<String> = router_admin.split_off(2);
        let gateway_admin = ports(220, 2)?;
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
            args.push("--admin-listen".into());
            args.push(store_admin[i].clone());
            args.extend(tls_args(tls_dir.as_deref(), Role::Store));
            args.extend(opts.store_args.iter().cloned());
            let name = format!("store-{id}");
            procs.push(Proc::spawn(
                &name,
                addr,
                &store_bin,
                args,
                opts.env.clone(),
                &dir,
            )?);
        }
        for (i, addr) in routers.iter().enumerate() {
            let mut args = vec![
                "--listen".into(),
                addr.clone(),
                "--store".into(),
                stores.join(","),
                "--admin-listen".into(),
                router_admin[i].clone(),
            ];
            args.extend(tls_args(tls_dir.as_deref(), Role::Router));
            args.extend(opts.router_args.iter().cloned());
            let name = format!("router-{}", i + 1);
            procs.push(Proc::spawn(
                &name,
                addr,
                &router_bin,
                args,
                opts.env.clone(),
                &dir,
            )?);
        }
        for (i, addr) in gateways.iter().enumerate() {
            let mut args = vec![
                "--listen".into(),
                addr.clone(),
                "--internal-listen".into(),
                internals[i].clone(),
                "--routers".into(),
                routers
                    .iter()
                    .chain(&spare)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
                "--admin-listen".into(),
                gateway_admin[i].clone(),
            ];
            args.extend(tls_args(tls_dir.as_deref(), Role::Gateway));
            args.extend(opts.gateway_args.iter().cloned());
            let mut env = opts.env.clone();
            env.push(("CHAT_TOKEN_KEY".to_owned(), key.clone()));
            let name = format!("gateway-{}", i + 1);
            procs.push(Proc::spawn(&name, addr, &gateway_bin, args, env, &dir)?);
        }
        let admin = StoreClient::new(stores.clone(), Duration::from_secs(2))?.with_tls(tls.clone());
        let admins = (1..=3)
            .map(|i| format!("store-{i}"))
            .zip(store_admin)
            .chain((1..=2).map(|i| format!("router-{i}")).zip(router_admin))
            .chain((1..=2).map(|i| format!("gateway-{i}")).zip(gateway_admin))
            .collect();
        Ok(Self {
            admins,
            dir,
            key,
            stores,
            routers,
            gateways,
            spare,
            spare_admin,
            procs,
            admin,
            router_bin,
            router_args: opts.router_args.clone(),
            tls_dir,
            tls,
        })
    }

    /// Starts a router named `name` on the next spare address (the
    /// gateways already know it) with `args` added; returns its address.
    pub fn start_router(&mut self, name: &str, args: &[String]) -> anyhow::Result<String> {
        anyhow::ensure!(
            self.proc(name).is_err(),
            "a process named {name} already exists"
        );
        let addr = self
            .spare
            .first()
            .cloned()
            .context("no spare router address left (LocalOptions::spare_routers)")?;
        let mut all = vec![
            "--listen".to_owned(),
            addr.clone(),
            "--store".into(),
            self.stores.join(","),
        ];
        if let Some(a) = self.spare_admin.first() {
            all.extend(["--admin-listen".to_owned(), a.clone()]);
            self.admins.insert(name.to_owned(), a.clone());
        }
        all.extend(tls_args(self.tls_dir.as_deref(), Role::Router));
        all.extend(self.router_args.iter().cloned());
        all.extend(args.iter().cloned());
        let p = Proc::spawn(name, &addr, &self.router_bin, all, vec![], &self.dir)?;
        self.procs.push(p);
        self.spare.remove(0);
        if !self.spare_admin.is_empty() {
            self.spare_admin.remove(0);
        }
        self.routers.push(addr.clone());
        Ok(addr)
    }

    /// Names of the processes of a tier, in start order.
    pub fn names(&self, tier: crate::restart::Tier) -> Vec<String> {
        let prefix = format!("{}-", tier.name());
        self.procs
            .iter()
            .filter(|p| p.name.starts_with(&prefix))
            .map(|p| p.name.clone())
            .collect()
    }

    /// The gateways' admin addresses (status page, metrics), in order.
    /// The operator identity (None: the cluster runs in plaintext).
    pub fn operator_tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    pub fn gateway_admins(&self) -> Vec<String> {
        self.names(Tier::Gateway)
            .iter()
            .filter_map(|n| self.admin_addr(n))
            .collect()
    }

    /// The admin HTTP address of `name` (metrics; the status page on
    /// gateways).
    pub fn admin_addr(&self, name: &str) -> Option<String> {
        self.admins.get(name).cloned()
    }

    /// The address `name` serves on.
    pub fn addr(&self, name: &str) -> Option<String> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.addr.clone())
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
        let (pid, addr) = (p.child.id(), p.addr.clone());
        write_run_file(&self.dir, name, pid, &addr)
    }

    /// The process id of `name`, while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.iter().find(|p| p.name == name)?.child.id()
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
        for p in &self.procs {
            let Some(tier) = tier_of(&p.name) else {
                continue;
            };
            if !instance_healthy(&self.admin, self.tls.as_deref(), tier, &p.addr).await {
                waiting.push(format!("{} ({})", p.name, p.addr));
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
        plaintext: args.insecure_plaintext,
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
    println!(
        "status page: http://{}/ (JSON at /status, Prometheus metrics at /metrics on every service's admin port)",
        cluster.gateway_admins()[0]
    );
    println!("# in another terminal:");
    match &cluster.tls_dir {
        // chatctl's store, rollout and incident commands need the operator
        // identity.
        Some(d) => println!(
            "export CHAT_GATEWAYS={gws} CHAT_TOKEN_KEY={} CHAT_TLS_DIR={}",
            cluster.key,
            d.join(Role::Operator.name()).display()
        ),
        None => println!("export CHAT_GATEWAYS={gws} CHAT_TOKEN_KEY={}", cluster.key),
    }
    match &cluster.tls_dir {
        Some(d) => println!(
            "# internal hops are mutual TLS (certificates in {}); the gateways' public port is plaintext on 127.0.0.1",
            d.display()
        ),
        None => println!("# every hop is plaintext (--insecure-plaintext)"),
    }
    println!("chatctl --as alice conversation create demo --members bob");
    println!("chatctl --as bob listen &");
    println!("chatctl --as alice send demo 'hello, bob'");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut pending: Vec<String> = Vec::new();
    let mut last_start = std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tick.tick() => {
                // A process that exits is started again, like a restart
                // policy would (`chatctl rollout restart` relies on it);
                // one that keeps failing is started at most once a second.
                for (name, status, _) in cluster.exited() {
                    eprintln!(
                        "{name} exited ({status}); starting it again. Log: {}",
                        cluster.log(&name).display()
                    );
                    pending.push(name);
                }
                let now = tokio::time::Instant::now();
                pending.retain(|name| {
                    let due = last_start
                        .get(name)
                        .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(1));
                    if !due {
                        return true;
                    }
                    last_start.insert(name.clone(), now);
                    match cluster.restart(name) {
                        Ok(()) => false,
                        Err(e) => {
                            eprintln!("cannot start {name} again: {e:#}");
                            true
                        }
                    }
                });
            }
        }
    }
}
