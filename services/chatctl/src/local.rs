//! `chatctl local up`: the whole backend as local processes on 127.0.0.1,
//! no Docker needed. Starts 3 store replicas, 2 routers and 2 gateways from
//! the binaries next to chatctl, waits until each is healthy, prints a line
//! beginning `ready`, and stops every process it started on Ctrl-C/SIGTERM.
//! A process that dies meanwhile is reported; the rest keeps running.

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

struct Proc {
    name: String,
    child: Child,
    /// Its exit has been reported.
    reported: bool,
    /// The command line that starts it again.
    command: String,
}

impl Proc {
    fn spawn(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let env_prefix: String = env.iter().map(|(k, _)| format!("{k}=... ")).collect();
        let command = format!("{env_prefix}{} {}", bin.display(), args.join(" "));
        Ok(Self {
            name: name.to_owned(),
            child,
            reported: false,
            command,
        })
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The port at `offset` from `base`, or with base 0 the next of `free`
/// (distinct ports picked in advance).
fn port(base: u16, offset: u16, free: &mut Vec<u16>) -> anyhow::Result<u16> {
    if base == 0 {
        return free.pop().context("ran out of free ports");
    }
    base.checked_add(offset).context("--base-port too high")
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("chatctl has no directory")?
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
    let Ok(ch) = ep.connect().await else {
        return false;
    };
    let req = HealthCheckRequest {
        service: service.to_owned(),
    };
    matches!(HealthClient::new(ch).check(req).await, Ok(r) if r.get_ref().status == tonic_health::ServingStatus::Serving as i32)
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let key = token_key(&dir)?;
    let (store_bin, router_bin, gateway_bin) = (
        binary("chat-store")?,
        binary("chat-router")?,
        binary("chat-gateway")?,
    );
    let b = args.base_port;
    let mut free = if b == 0 {
        chat_store::testkit::process::free_ports(9)?
    } else {
        Vec::new()
    };
    let stores: Vec<String> = (1..=3)
        .map(|i| port(b, i, &mut free).map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    let routers: Vec<String> = (1..=2)
        .map(|i| port(b, 100 + i, &mut free).map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    let gateways: Vec<String> = (1..=2)
        .map(|i| port(b, 200 + i, &mut free).map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    let internals: Vec<String> = (1..=2)
        .map(|i| port(b, 210 + i, &mut free).map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    let peers = stores
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");

    let mut procs = Vec::new();
    for (i, addr) in stores.iter().enumerate() {
        let id = (i + 1).to_string();
        let args = [
            "--id",
            &id,
            "--listen",
            addr,
            "--peers",
            &peers,
            "--data-dir",
        ]
        .map(String::from)
        .to_vec();
        let mut args = args;
        args.push(dir.join(format!("store-{id}")).display().to_string());
        procs.push(Proc::spawn(
            &store_bin,
            &format!("store-{id}"),
            &args,
            &[],
            &logs,
        )?);
    }
    for (i, addr) in routers.iter().enumerate() {
        let args = vec![
            "--listen".into(),
            addr.clone(),
            "--store".into(),
            stores.join(","),
        ];
        procs.push(Proc::spawn(
            &router_bin,
            &format!("router-{}", i + 1),
            &args,
            &[],
            &logs,
        )?);
    }
    for (i, addr) in gateways.iter().enumerate() {
        let args = vec![
            "--listen".into(),
            addr.clone(),
            "--internal-listen".into(),
            internals[i].clone(),
            "--routers".into(),
            routers.join(","),
        ];
        procs.push(Proc::spawn(
            &gateway_bin,
            &format!("gateway-{}", i + 1),
            &args,
            &[("CHAT_TOKEN_KEY", &key)],
            &logs,
        )?);
    }

    let result = run(&dir, &key, &stores, &routers, &gateways, &mut procs).await;
    for p in procs {
        p.stop(Duration::from_secs(5)).await;
    }
    eprintln!("stopped every process; data kept in {}", dir.display());
    result
}

async fn run(
    dir: &Path,
    key: &str,
    stores: &[String],
    routers: &[String],
    gateways: &[String],
    procs: &mut [Proc],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let admin = StoreClient::new(stores.to_vec(), Duration::from_secs(2))?;
    let mut waiting: Vec<String> = Vec::new();
    loop {
        waiting.clear();
        for s in stores {
            if !admin.status_of(s).await.is_ok_and(|st| st.serving) {
                waiting.push(format!("store {s}"));
            }
        }
        for r in routers {
            if !healthy(r, "chat.router.v1.Router").await {
                waiting.push(format!("router {r}"));
            }
        }
        for g in gateways {
            if !healthy(g, "chat.v1.Chat").await {
                waiting.push(format!("gateway {g}"));
            }
        }
        if waiting.is_empty() {
            break;
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited ({status}); see {}",
                    p.name,
                    dir.join("logs").join(format!("{}.log", p.name)).display()
                );
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "not healthy within 60 s: {}; logs in {}",
                waiting.join(", "),
                dir.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gws = gateways.join(",");
    println!("ready gateways={gws} dir={}", dir.display());
    println!("# in another terminal:");
    println!("export CHAT_GATEWAYS={gws} CHAT_TOKEN_KEY={key}");
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
                for p in procs.iter_mut() {
                    if !p.reported
                        && let Ok(Some(status)) = p.child.try_wait()
                    {
                        p.reported = true;
                        eprintln!(
                            "{} exited ({status}); the rest keeps running. Log: {}. Start it again with: {}",
                            p.name,
                            dir.join("logs").join(format!("{}.log", p.name)).display(),
                            p.command
                        );
                    }
                }
            }
        }
    }
}
