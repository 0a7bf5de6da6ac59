//! Helpers for tests that run the real service binaries as processes.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
pub use chat_store::testkit::process::{StoreProcess, free_port, free_ports, local_group};

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

/// A whole backend in this process: 3 store replicas, 2 routers, 2 gateways
/// on 127.0.0.1 ephemeral ports.
pub mod stack {
    use std::time::Duration;

    use chat_auth::TokenKey;
    use chat_client::ChatClient;
    use chat_gateway::{GatewayOptions, RunningGateway};
    use chat_router::{RouterOptions, RunningRouter};
    use chat_security::Role;
    use chat_security::certs::CertSet;
    use chat_store::testkit::{Cluster, ClusterOptions};
    use tokio::net::TcpListener;

    pub struct Stack {
        pub store: Cluster,
        pub routers: Vec<Option<RunningRouter>>,
        pub router_addrs: Vec<String>,
        pub gateways: Vec<Option<RunningGateway>>,
        pub gateway_addrs: Vec<String>,
        pub key: TokenKey,
        /// The cluster's CA and every role's identity.
        pub certs: std::sync::Arc<CertSet>,
        /// Gateways' internal (delivery) addresses.
        pub gateway_internal_addrs: Vec<String>,
        /// The public port is TLS.
        pub public_tls: bool,
        /// Extra routers not started yet.
        pending: Vec<(TcpListener, RouterOptions)>,
    }

    async fn listener() -> anyhow::Result<(TcpListener, String)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let a = l.local_addr()?.to_string();
        Ok((l, a))
    }

    impl Stack {
        pub async fn start() -> anyhow::Result<Self> {
            Self::start_with(Vec::new()).await
        }

        /// The gateways' public port over TLS too (clients made by
        /// [`Stack::client`] trust the cluster's CA).
        pub async fn start_public_tls() -> anyhow::Result<Self> {
            Self::build(Vec::new(), true, Vec::new()).await
        }

        /// With routers beyond the two stable ones, each with its release
        /// label and injected faults (canaries). The gateways know their
        /// addresses from the start; they are started by [`Stack::start_pending`].
        pub async fn start_with(
            extra_routers: Vec<(String, chat_router::rollout::Faults)>,
        ) -> anyhow::Result<Self> {
            Self::build(extra_routers, false, Vec::new()).await
        }

        /// Gateways that accept tokens signed with `extra_keys` too (a key
        /// rotation in progress) besides [`Stack::key`].
        pub async fn start_with_token_keys(extra_keys: Vec<TokenKey>) -> anyhow::Result<Self> {
            Self::build(Vec::new(), false, extra_keys).await
        }

        async fn build(
            extra_routers: Vec<(String, chat_router::rollout::Faults)>,
            public_tls: bool,
            extra_keys: Vec<TokenKey>,
        ) -> anyhow::Result<Self> {
            // Every internal hop runs mutual TLS, as in production.
            let certs = std::sync::Arc::new(chat_security::certs::generate()?);
            let store = Cluster::start(
                3,
                ClusterOptions {
                    certs: Some(certs.clone()),
                    ..ClusterOptions::default()
                },
            )
            .await?;
            store.wait_leader(Duration::from_secs(15)).await?;
            let store_addrs: Vec<String> =
                store.ids().into_iter().map(|id| store.addr(id)).collect();
            let mut routers = Vec::new();
            let mut router_addrs = Vec::new();
            for _ in 0..2 {
                let (l, a) = listener().await?;
                let opts = RouterOptions {
                    store: store_addrs.clone(),
                    store_timeout: Duration::from_secs(10),
                    drain: Duration::ZERO,
                    tls: Some(certs.tls(Role::Router)),
                    ..RouterOptions::default()
                };
                routers.push(Some(RunningRouter::start(opts, l).await?));
                router_addrs.push(a);
            }
            let mut pending = Vec::new();
            for (release, faults) in extra_routers {
                let (l, a) = listener().await?;
                let opts = RouterOptions {
                    store: store_addrs.clone(),
                    store_timeout: Duration::from_secs(10),
                    drain: Duration::ZERO,
                    release,
                    faults,
                    tls: Some(certs.tls(Role::Router)),
                    ..RouterOptions::default()
                };
                pending.push((l, opts));
                router_addrs.push(a);
            }
            let key = TokenKey::new(b"end-to-end test signing key".to_vec())?;
            let mut gateways = Vec::new();
            let mut gateway_addrs = Vec::new();
            let mut gateway_internal_addrs = Vec::new();
            for _ in 0..2 {
                let (public, a) = listener().await?;
                let (internal, ia) = listener().await?;
                let opts = GatewayOptions {
                    routers: router_addrs.clone(),
                    tokens: chat_auth::Keyring::new(
                        std::iter::once(key.clone())
                            .chain(extra_keys.iter().cloned())
                            .collect(),
                        chat_auth::DEFAULT_AUDIENCE,
                    ),
                    internal_advertise: ia.clone(),
                    max_body_bytes: 64 * 1024,
                    lease: Duration::from_secs(3),
                    sweep: chat_gateway::sessions::Sweep {
                        every: Duration::from_millis(500),
                        rate: 0,
                    },
                    router_timeout: Duration::from_secs(10),
                    admission: Default::default(),
                    limits: Default::default(),
                    release: "stable".into(),
                    tls: Some(certs.tls(Role::Gateway)),
                    public_tls: public_tls.then(|| {
                        let p = certs.public();
                        chat_security::PublicTls::from_pem(
                            p.cert.clone().into_bytes(),
                            p.key.clone().into_bytes(),
                        )
                        .expect("a generated certificate is valid")
                    }),
                };
                gateways.push(Some(RunningGateway::start(opts, public, internal).await?));
                gateway_addrs.push(a);
                gateway_internal_addrs.push(ia);
            }
            Ok(Self {
                store,
                routers,
                router_addrs,
                gateways,
                gateway_addrs,
                key,
                certs,
                public_tls,
                gateway_internal_addrs,
                pending,
            })
        }

        /// Starts the extra routers given to [`Stack::start_with`].
        pub async fn start_pending(&mut self) -> anyhow::Result<()> {
            for (l, opts) in std::mem::take(&mut self.pending) {
                self.routers
                    .push(Some(RunningRouter::start(opts, l).await?));
            }
            Ok(())
        }

        /// A client of both gateways, signed in as `user`.
        pub fn client(&self, user: &str) -> ChatClient {
            self.client_of(user, &self.gateway_addrs)
        }

        pub fn client_of(&self, user: &str, gateways: &[String]) -> ChatClient {
            let token = self.key.sign_for(user, 3600);
            if self.public_tls {
                let ca = self.certs.public().ca.clone();
                ChatClient::new_tls(
                    gateways.to_vec(),
                    &token,
                    Duration::from_secs(20),
                    ca.as_bytes(),
                )
                .expect("valid client")
            } else {
                ChatClient::new(gateways.to_vec(), &token, Duration::from_secs(20))
                    .expect("valid client")
            }
        }

        /// Which gateway holds at least one subscription, if any.
        pub fn gateway_with_sessions(&self) -> Option<usize> {
            self.gateways
                .iter()
                .position(|g| g.as_ref().is_some_and(|g| g.session_count() > 0))
        }

        pub async fn stop(mut self) {
            for g in self.gateways.iter_mut().filter_map(Option::take) {
                g.kill();
            }
            for r in self.routers.iter_mut().filter_map(Option::take) {
                r.kill();
            }
            self.store.stop_all().await;
        }
    }
}
