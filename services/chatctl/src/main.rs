//! `chatctl`: client and operator tool of the chat backend.
//!
//! - `chatctl local up`: the whole backend as local processes.
//! - `token`, `send`, `listen`, `history`, `conversation ...`: a chat
//!   client, through the gateways.
//! - `store ...`: direct access to the store replicas (operators).
//!
//! Errors are one line on stderr and a non-zero exit status.

use chatctl::local;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chat_client::{ChatClient, SubscriptionEvent, event};
use chat_proto::chat::v1 as cpb;
use chat_proto::store::v1 as api;
use chat_store::StoreClient;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chatctl",
    version,
    about = "Client and operator tool of the chat backend"
)]
struct Cli {
    /// Gateways, host:port, comma separated.
    #[arg(
        long,
        env = "CHAT_GATEWAYS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7201,127.0.0.1:7202",
        global = true
    )]
    gateways: Vec<String>,
    /// Bearer token to call the gateways with.
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Act as this user, with a token signed on the spot by --token-key.
    #[arg(long = "as", global = true)]
    as_user: Option<String>,
    /// The deployment's token signing key (for `token` and `--as`).
    #[arg(long, env = "CHAT_TOKEN_KEY", hide_env_values = true, global = true)]
    token_key: Option<String>,
    /// The CA that the gateways' public certificate is verified with, when
    /// their public port is TLS (compose: deploy/.certs/operator/ca.crt).
    #[arg(long, env = "CHAT_GATEWAY_CA", global = true, value_name = "FILE")]
    gateway_ca: Option<std::path::PathBuf>,
    /// The deployment's name that tokens are signed for (the gateways'
    /// --token-audience).
    #[arg(long, env = "CHAT_TOKEN_AUDIENCE", default_value = chat_auth::DEFAULT_AUDIENCE, global = true)]
    token_audience: String,
    /// Store replicas, host:port, comma separated (for `store ...`).
    #[arg(
        long,
        env = "CHAT_STORE_ADDRS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        global = true
    )]
    store: Vec<String>,
    /// Deadline of each call, retries included.
    #[arg(long, default_value_t = 10, global = true)]
    timeout_secs: u64,
    /// The identity for the cluster's internal ports (an operator's, made
    /// by `chatctl certs`; `local up` prints it). Without it, plaintext.
    #[command(flatten)]
    tls: chat_security::TlsArgs,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run the backend on this machine.
    #[command(subcommand)]
    Local(LocalCmd),
    /// Prints a token for USER signed with --token-key.
    Token {
        user: String,
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Sends a message; retries never duplicate it.
    Send {
        conversation: String,
        text: String,
        /// Client message id (default: derived from the clock).
        #[arg(long)]
        id: Option<String>,
    },
    /// Prints messages as they arrive, reconnecting by itself.
    Listen {
        /// Resume a conversation after a seq: CONVERSATION=SEQ (repeatable).
        #[arg(long = "from")]
        from: Vec<String>,
    },
    /// Prints a conversation's messages.
    History {
        conversation: String,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 0)]
        before: u64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Conversations and their members.
    #[command(subcommand)]
    Conversation(ConversationCmd),
    /// Direct access to the store replicas.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Incident notices on the status page and to every subscriber.
    #[command(subcommand)]
    Incident(IncidentCmd),
    /// Staged rollouts of a canary release, and rolling restarts.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Makes a cluster CA and one identity (certificate and key) per role
    /// under DIR: ca.crt, ca.key, and store/, router/, gateway/,
    /// operator/, each with ca.crt, tls.crt and tls.key.
    Certs {
        #[arg(long)]
        out: std::path::PathBuf,
        /// Replace a CA already there (every service needs the new
        /// identities then).
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Do nothing if DIR already holds a CA and every identity.
        #[arg(long)]
        if_missing: bool,
        /// A name clients reach the gateways by, for the public
        /// certificate (DIR/public) beside localhost and 127.0.0.1;
        /// repeatable.
        #[arg(long = "public-name")]
        public_names: Vec<String>,
    },
    /// Exits 0 if ADDR reports SERVING on gRPC health (for healthchecks).
    /// Store and router ports are dialled with TLS when --tls-dir is given;
    /// with no --service, the server is taken to be of the identity's kind.
    Health {
        addr: String,
        /// Service name to check ("" for the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
    },
}

/// `30s`, `500ms`, `2m` or a number of seconds.
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (num, unit) = match raw.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => raw.split_at(i),
        None => (raw, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {raw:?}; use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(clap::Args)]
struct ServiceArg {
    /// The service rolled out. Only routers run canaries side by side:
    /// clients choose their gateway, so a gateway canary would need a load
    /// balancer in front.
    #[arg(long, default_value = "router", value_parser = ["router"])]
    service: String,
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Starts sending a share of users to the routers labelled --canary,
    /// raising it step by step while the analysis passes.
    Start {
        #[command(flatten)]
        service: ServiceArg,
        /// Release label of the canary routers (their --release).
        #[arg(long)]
        canary: String,
        /// Canary weights in percent, ending at 100.
        #[arg(long, value_delimiter = ',', default_value = "1,5,25,50,100")]
        steps: Vec<u32>,
        /// Length of each analysis window.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        interval: Duration,
        /// Least canary success rate, percent.
        #[arg(long, default_value_t = 99.0)]
        min_success: f64,
        /// Most canary p99 latency relative to the stable p99.
        #[arg(long, default_value_t = 1.5)]
        max_latency_ratio: f64,
        /// Latencies under this always pass, ms.
        #[arg(long, default_value_t = 10)]
        latency_floor_ms: u64,
        /// Least canary calls in a window before it is judged.
        #[arg(long, default_value_t = 50)]
        min_requests: u64,
        /// Failed checks before the rollout aborts by itself.
        #[arg(long, default_value_t = 2)]
        max_failed_checks: u32,
    },
    /// The plan, its weight and every decision so far.
    Status {
        #[command(flatten)]
        service: ServiceArg,
    },
    /// Holds the weight; no analysis until resumed.
    Pause {
        #[command(flatten)]
        service: ServiceArg,
    },
    Resume {
        #[command(flatten)]
        service: ServiceArg,
    },
    /// Sends every user back to the stable routers now.
    Abort {
        #[command(flatten)]
        service: ServiceArg,
    },
    /// Sends every user to the canary now.
    Promote {
        #[command(flatten)]
        service: ServiceArg,
    },
    /// Restarts every instance of a tier, one at a time, keeping it serving.
    Restart {
        tier: chatctl::restart::Tier,
        /// Instances restarted at once (stores: always 1).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// The cluster of `chatctl local up --dir DIR`.
        #[arg(long, conflicts_with = "compose_project")]
        local_dir: Option<std::path::PathBuf>,
        /// The compose cluster of this project (deploy/up.sh: chat).
        #[arg(long)]
        compose_project: Option<String>,
    },
}

#[derive(Subcommand)]
enum IncidentCmd {
    /// Posts an open incident notice.
    Post { text: String },
    /// Resolves incident ID (default: the newest open one).
    Resolve { id: Option<String> },
    /// Every incident kept, oldest first.
    List,
}

#[derive(Subcommand)]
enum LocalCmd {
    /// Starts 3 store replicas, 2 routers and 2 gateways on 127.0.0.1.
    Up(local::UpArgs),
}

#[derive(Subcommand)]
enum ConversationCmd {
    /// Creates a conversation with you and --members.
    Create {
        id: String,
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
    },
    Add {
        conversation: String,
        user: String,
    },
    Remove {
        conversation: String,
        user: String,
    },
    List,
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Role, term, indexes and replicas of every replica.
    Status,
    /// Creates a conversation.
    CreateConversation {
        id: String,
        /// Members, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
    },
    /// Appends a message; retrying with the same --id never duplicates it.
    Append {
        conversation: String,
        body: String,
        #[arg(long)]
        sender: String,
        /// Client message id (default: derived from the clock).
        #[arg(long)]
        id: Option<String>,
    },
    /// Reads messages of a conversation.
    Read {
        conversation: String,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 0)]
        before: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Read what one replica has applied, without asking the leader.
        #[arg(long)]
        stale_from: Option<String>,
    },
    /// Adds a replica as a learner.
    AddLearner { id: u64, address: String },
    /// Promotes a learner to voter.
    Promote { id: u64 },
    /// Removes a replica from the group.
    RemoveReplica { id: u64 },
    /// Moves leadership (to ID, or to the most up-to-date voter).
    TransferLeader { id: Option<u64> },
    /// Takes a consistent backup through the leader while the store
    /// serves: everything acknowledged before the command started is in
    /// it. FILE must not exist.
    Backup {
        file: std::path::PathBuf,
        /// Instead, offline from this stopped replica's data directory (a
        /// learner that outlived the voters' site): its state as of the
        /// last index it applied.
        #[arg(long)]
        from_data_dir: Option<std::path::PathBuf>,
    },
    /// Rebuilds a stopped replica whose data directory is damaged: its
    /// files are moved aside (into DIR/damaged-<time>) and, started again,
    /// it rejoins by snapshot from the leader. Refused while it runs, and
    /// unless every other replica is serving.
    RebuildReplica {
        id: u64,
        /// The replica's data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
    /// Checks a backup file against its checksum and says what it holds.
    BackupInfo { file: std::path::PathBuf },
    /// Makes the data directory of one replica of a new group from a
    /// backup (offline; run it for every voter, with the same FILE and
    /// --peers), then start the replicas as usual.
    Restore {
        file: std::path::PathBuf,
        /// The replica this directory is for.
        #[arg(long)]
        id: u64,
        /// Its data directory; must not exist or be empty.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The new group's voters, as for chat-store: ID=HOST:PORT,...
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chatctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls_given = (cli.tls.tls_dir.is_some(), cli.gateway_ca.is_some());
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            eprintln!("chatctl: {text}");
            if let Some(hint) = tls_hint(&text, tls_given) {
                eprintln!("chatctl: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What to try when a plaintext call met a TLS port (the server answers
/// the HTTP/2 preface with a TLS alert, which surfaces as a protocol
/// error), given whether an identity and a gateway CA were given.
fn tls_hint(error: &str, (identity, gateway_ca): (bool, bool)) -> Option<&'static str> {
    if !(error.contains("h2 protocol error") || error.contains("http2 error")) {
        return None;
    }
    match (identity, gateway_ca) {
        (false, _) => Some(
            "the port may take only TLS: set CHAT_TLS_DIR (--tls-dir) to an operator identity \
             for store ports, CHAT_GATEWAY_CA (--gateway-ca) for gateways' public ports",
        ),
        (true, false) => Some(
            "the port may take only TLS: set CHAT_GATEWAY_CA (--gateway-ca) for gateways' public ports",
        ),
        (true, true) => None,
    }
}

/// One line for a gRPC error: the code and the server's message.
fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn key(cli: &Cli) -> anyhow::Result<chat_auth::TokenKey> {
    let k = cli
        .token_key
        .as_deref()
        .context("no signing key: give --token-key or set CHAT_TOKEN_KEY")?;
    Ok(chat_auth::TokenKey::new(k.as_bytes().to_vec())
        .map_err(|e| anyhow::anyhow!("--token-key: {e}"))?
        .for_audience(&cli.token_audience))
}

/// The CA in --gateway-ca / CHAT_GATEWAY_CA, if given.
fn gateway_ca(cli: &Cli) -> anyhow::Result<Option<Vec<u8>>> {
    cli.gateway_ca
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()
}

fn chat(cli: &Cli) -> anyhow::Result<ChatClient> {
    let token = match (&cli.token, &cli.as_user) {
        (Some(t), _) => t.clone(),
        (None, Some(user)) => key(cli)?.sign_for(user, 3_600),
        (None, None) => anyhow::bail!(
            "no identity: give --token (or CHAT_TOKEN), or --as USER with --token-key"
        ),
    };
    let deadline = Duration::from_secs(cli.timeout_secs);
    match gateway_ca(cli)? {
        Some(ca) => ChatClient::new_tls(cli.gateways.clone(), &token, deadline, &ca),
        None => ChatClient::new(cli.gateways.clone(), &token, deadline),
    }
    .map_err(status)
}

fn print_message(m: &cpb::Message) {
    println!(
        "{} #{} {}: {}",
        m.conversation_id,
        m.seq,
        m.sender,
        String::from_utf8_lossy(&m.body)
    );
}

/// The identity in --tls-dir / CHAT_TLS_DIR, of whatever role it is.
fn identity(
    args: &chat_security::TlsArgs,
) -> anyhow::Result<Option<std::sync::Arc<chat_security::Tls>>> {
    Ok(match &args.tls_dir {
        Some(d) => Some(chat_security::Tls::load_any(d)?),
        None => None,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Top::Local(LocalCmd::Up(_)) => {
            let Top::Local(LocalCmd::Up(args)) = cli.command else {
                unreachable!()
            };
            return local::up(args).await;
        }
        Top::Token { user, ttl_secs } => {
            chat_store::types::UserId::parse(user).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", key(&cli)?.sign_for(user, *ttl_secs));
        }
        Top::Send {
            conversation,
            text,
            id,
        } => {
            let id = id
                .clone()
                .unwrap_or_else(|| format!("chatctl-{}", now_nanos()));
            let r = chat(&cli)?
                .send(conversation, &id, text.clone().into_bytes())
                .await
                .map_err(status)?;
            println!("sent {conversation} #{} id={id}", r.seq);
        }
        Top::Listen { from } => {
            let mut cursors = HashMap::new();
            for f in from {
                let (c, s) = f.split_once('=').context("--from takes CONVERSATION=SEQ")?;
                cursors.insert(
                    c.to_owned(),
                    s.parse().context("--from: the seq must be a number")?,
                );
            }
            let mut sub = chat(&cli)?.subscribe(cursors);
            while let Some(ev) = sub.next().await {
                match ev {
                    SubscriptionEvent::Event(e) => match e.kind {
                        Some(event::Kind::Message(m)) => print_message(&m),
                        Some(event::Kind::Typing(t)) => {
                            println!("{} {} is typing", t.conversation_id, t.user_id)
                        }
                        Some(event::Kind::Status(s)) => {
                            println!("status: {} {}", s.state, s.notice)
                        }
                        None => {}
                    },
                    SubscriptionEvent::Reconnecting(s) => {
                        eprintln!("reconnecting ({:?}: {})", s.code(), s.message())
                    }
                    SubscriptionEvent::Failed(s) => return Err(status(s)),
                }
            }
        }
        Top::History {
            conversation,
            after,
            before,
            limit,
        } => {
            let req = cpb::HistoryRequest {
                conversation_id: conversation.clone(),
                after_seq: *after,
                before_seq: *before,
                limit: *limit,
            };
            let h = chat(&cli)?.history(req).await.map_err(status)?;
            for m in &h.messages {
                print_message(m);
            }
        }
        Top::Conversation(cmd) => {
            let c = chat(&cli)?;
            let show = |c: cpb::Conversation| {
                println!(
                    "{} members={} last_seq={}",
                    c.conversation_id,
                    c.members.join(","),
                    c.last_seq
                )
            };
            match cmd {
                ConversationCmd::Create { id, members } => {
                    show(c.create_conversation(id, members).await.map_err(status)?)
                }
                ConversationCmd::Add { conversation, user } => {
                    show(c.add_member(conversation, user).await.map_err(status)?)
                }
                ConversationCmd::Remove { conversation, user } => {
                    show(c.remove_member(conversation, user).await.map_err(status)?)
                }
                ConversationCmd::List => {
                    for conv in c.list_conversations().await.map_err(status)? {
                        show(conv);
                    }
                }
            }
        }
        Top::Store(_) => return store(cli).await,
        Top::Rollout(_) => return rollout(cli).await,
        Top::Incident(cmd) => {
            use chatctl::incident;
            let client =
                StoreClient::new(cli.store.clone(), Duration::from_secs(cli.timeout_secs))?
                    .with_tls(identity(&cli.tls)?);
            let by = std::env::var("USER").unwrap_or_else(|_| "an operator".into());
            let show = |i: &chat_proto::status::v1::Incident| {
                let state = if i.resolved_ms == 0 {
                    "open"
                } else {
                    "resolved"
                };
                println!("{} {state} {}", i.id, i.text);
            };
            match cmd {
                IncidentCmd::Post { text } => show(&incident::post(&client, text, &by).await?),
                IncidentCmd::Resolve { id } => {
                    show(&incident::resolve(&client, id.as_deref()).await?)
                }
                IncidentCmd::List => {
                    for i in incident::list(&client).await? {
                        show(&i);
                    }
                }
            }
        }
        Top::Certs {
            out,
            force,
            if_missing,
            public_names,
        } => {
            if *if_missing && chat_security::certs::complete(out) {
                println!("{} already holds a CA and every identity", out.display());
                return Ok(());
            }
            anyhow::ensure!(
                *force || !out.join(chat_security::CA_FILE).exists(),
                "{} already holds a CA; --force replaces it",
                out.display()
            );
            chat_security::certs::generate_with(public_names)?.write(out)?;
            println!(
                "wrote a CA, identities for store, router, gateway and operator, and the public certificate under {}",
                out.display()
            );
        }
        Top::Health { addr, service } => {
            let tls = identity(&cli.tls)?;
            let ca = gateway_ca(&cli)?;
            anyhow::ensure!(
                local::healthy(addr, service, tls.as_deref(), ca.as_deref()).await,
                "{addr} is not serving {service:?}"
            );
            println!("serving");
        }
    }
    Ok(())
}

/// Every replica's status as it answers now (`None`: unreachable).
async fn replica_states(
    client: &StoreClient,
    addrs: &[String],
) -> Vec<chatctl::restart::ReplicaState> {
    let mut replicas = Vec::new();
    for addr in addrs {
        replicas.push(chatctl::restart::ReplicaState {
            name: addr.clone(),
            status: client.status_of(addr).await.ok(),
        });
    }
    replicas
}

async fn store(cli: Cli) -> anyhow::Result<()> {
    let tls_given = cli.tls.tls_dir.is_some();
    let client = StoreClient::new(cli.store.clone(), Duration::from_secs(cli.timeout_secs))?
        .with_tls(identity(&cli.tls)?);
    let Top::Store(cmd) = cli.command else {
        unreachable!()
    };
    match cmd {
        StoreCmd::Status => {
            println!(
                "{:<4} {:<22} {:<14} {:>6} {:>7} {:>9} {:>9} {:>8} {:>8}",
                "id",
                "address",
                "role",
                "term",
                "leader",
                "commit",
                "applied",
                "serving",
                "version"
            );
            for addr in &cli.store {
                match client.status_of(addr).await {
                    Ok(s) => println!(
                        "{:<4} {:<22} {:<14} {:>6} {:>7} {:>9} {:>9} {:>8} {:>8}",
                        s.id,
                        addr,
                        s.role,
                        s.term,
                        s.leader_id,
                        s.commit_index,
                        s.applied_index,
                        s.serving,
                        s.version
                    ),
                    Err(e) => {
                        println!("{:<4} {:<22} unreachable: {e}", "?", addr);
                        if let Some(hint) = tls_hint(&e.to_string(), (tls_given, true)) {
                            eprintln!("chatctl: {hint}");
                        }
                    }
                }
            }
        }
        StoreCmd::CreateConversation { id, members } => {
            let c = client
                .create_conversation(api::CreateConversationRequest {
                    conversation_id: id,
                    members,
                })
                .await?;
            println!(
                "{} members={} last_seq={}",
                c.conversation_id,
                c.members.join(","),
                c.last_seq
            );
        }
        StoreCmd::Append {
            conversation,
            body,
            sender,
            id,
        } => {
            let id = id.unwrap_or_else(|| {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                format!("chatctl-{nanos}")
            });
            let r = client
                .append(api::AppendRequest {
                    conversation_id: conversation,
                    sender,
                    client_msg_id: id.clone(),
                    body: body.into_bytes(),
                })
                .await?;
            println!(
                "seq={} ts_ms={} id={id}{}",
                r.seq,
                r.server_ts_ms,
                if r.duplicate { " (duplicate)" } else { "" }
            );
        }
        StoreCmd::Read {
            conversation,
            after,
            before,
            limit,
            stale_from,
        } => {
            let mut req = api::ReadRequest {
                conversation_id: conversation,
                after_seq: after,
                before_seq: before,
                limit,
                ..Default::default()
            };
            let r = match stale_from {
                Some(addr) => {
                    req.consistency = api::Consistency::Stale as i32;
                    client.read_from(&addr, req).await?
                }
                None => client.read(req).await?,
            };
            for m in &r.messages {
                println!(
                    "{:>6} {} {}: {}",
                    m.seq,
                    m.server_ts_ms,
                    m.sender,
                    String::from_utf8_lossy(&m.body)
                );
            }
            println!(
                "-- {} message(s), last_seq={}{}",
                r.messages.len(),
                r.last_seq,
                if r.stale { ", stale" } else { "" }
            );
        }
        StoreCmd::AddLearner { id, address } => {
            print_replicas(client.add_learner(id, &address).await?)
        }
        StoreCmd::Promote { id } => print_replicas(client.promote(id).await?),
        StoreCmd::RemoveReplica { id } => {
            // The change guard: removing a replica while another is down or
            // behind leaves the store one failure from losing its majority.
            let replicas = replica_states(&client, &cli.store).await;
            chatctl::restart::check_removal(&replicas, id).map_err(anyhow::Error::msg)?;
            print_replicas(client.remove_replica(id).await?)
        }
        StoreCmd::TransferLeader { id } => {
            let s = client
                .transfer_leader(id.unwrap_or(0))
                .await
                .context("transfer leadership")?;
            println!(
                "leader is now replica {} at {}",
                s.leader_id, s.leader_address
            );
        }
        StoreCmd::Backup {
            file,
            from_data_dir: None,
        } => {
            let h = chatctl::backup::take(&client, &file).await?;
            println!("{}: {}", file.display(), chatctl::backup::describe(&h));
        }
        StoreCmd::Backup {
            file,
            from_data_dir: Some(dir),
        } => {
            let (h, commit) = chat_store::backup::from_data_dir(&dir, &file)
                .with_context(|| format!("backing up {}", dir.display()))?;
            println!("{}: {}", file.display(), chatctl::backup::describe(&h));
            if commit > h.index {
                println!(
                    "note: its log knew entries up to {commit} were committed but it had applied only up to {}: \
                     those entries are not in this backup",
                    h.index
                );
            }
        }
        StoreCmd::RebuildReplica { id, data_dir } => {
            let replicas = replica_states(&client, &cli.store).await;
            chatctl::restart::check_rebuild(&replicas, id).map_err(anyhow::Error::msg)?;
            let aside = chatctl::rebuild::set_aside(&data_dir, id)?;
            println!(
                "replica {id}'s files moved to {} (remove them once they are no longer needed); \
                 start replica {id} again: it rejoins from the leader's snapshot and serves once caught up",
                aside.display()
            );
        }
        StoreCmd::BackupInfo { file } => {
            let (h, _) = chat_store::backup::verify(&file)?;
            println!("{}: {}", file.display(), chatctl::backup::describe(&h));
        }
        StoreCmd::Restore {
            file,
            id,
            data_dir,
            peers,
        } => {
            let voters = chat_store::config::parse_peers(&peers)?;
            let id = chat_store::types::NodeId(id);
            let h = chatctl::backup::restore(&file, &data_dir, id, &voters)?;
            println!(
                "restored replica {id} into {} at raft index {}; start it with --id {id} --peers {}",
                data_dir.display(),
                h.index,
                peers.join(",")
            );
        }
    }
    Ok(())
}

async fn rollout(cli: Cli) -> anyhow::Result<()> {
    use chatctl::plan;
    let client = StoreClient::new(cli.store.clone(), Duration::from_secs(cli.timeout_secs))?
        .with_tls(identity(&cli.tls)?);
    let Top::Rollout(cmd) = cli.command else {
        unreachable!()
    };
    let by = std::env::var("USER").unwrap_or_else(|_| "an operator".into());
    let (service, cmd) = match cmd {
        RolloutCmd::Start {
            service,
            canary,
            steps,
            interval,
            min_success,
            max_latency_ratio,
            latency_floor_ms,
            min_requests,
            max_failed_checks,
        } => {
            anyhow::ensure!(
                (0.0..=100.0).contains(&min_success),
                "--min-success is a percentage"
            );
            let args = chat_rollout::StartArgs {
                id: format!("{}-{}", service.service, plan::now_ms()),
                service: service.service.clone(),
                canary,
                steps,
                interval_ms: interval.as_millis() as u64,
                thresholds: chat_rollout::Thresholds {
                    min_success_permille: (min_success * 10.0).round() as u32,
                    max_latency_ratio,
                    latency_floor_us: latency_floor_ms * 1_000,
                    min_requests,
                    max_failed_checks,
                },
            };
            let p = plan::update(&client, &service.service, |current| {
                chat_rollout::start(args.clone(), current, plan::now_ms())
            })
            .await?;
            print!("{}", plan::describe(&p));
            return Ok(());
        }
        RolloutCmd::Status { service } => {
            match plan::read(&client, &service.service).await? {
                Some((_, p)) => print!("{}", plan::describe(&p)),
                None => println!("no rollout of {} has been started", service.service),
            }
            return Ok(());
        }
        RolloutCmd::Restart {
            tier,
            batch,
            local_dir,
            compose_project,
        } => {
            let log = match (local_dir, compose_project) {
                (_, Some(project)) => {
                    let mut p = chatctl::compose::Compose {
                        project,
                        stores: cli.store.clone(),
                        tls: identity(&cli.tls)?,
                    };
                    chatctl::restart::rolling_restart(&mut p, tier, batch, false).await?
                }
                (dir, None) => {
                    let dir = dir.unwrap_or_else(|| ".local/cluster".into());
                    let mut p = local::RunDir::open(&dir)?;
                    chatctl::restart::rolling_restart(&mut p, tier, batch, false).await?
                }
            };
            println!(
                "restarted every {} ({} steps)",
                tier.name(),
                log.steps.len()
            );
            return Ok(());
        }
        RolloutCmd::Pause { service } => (service, chat_rollout::Command::Pause),
        RolloutCmd::Resume { service } => (service, chat_rollout::Command::Resume),
        RolloutCmd::Abort { service } => (service, chat_rollout::Command::Abort),
        RolloutCmd::Promote { service } => (service, chat_rollout::Command::Promote),
    };
    let p = plan::update(&client, &service.service, |current| {
        let current =
            current.ok_or_else(|| format!("no rollout of {} has been started", service.service))?;
        chat_rollout::command(current, cmd, plan::now_ms(), &by)
    })
    .await?;
    print!("{}", plan::describe(&p));
    Ok(())
}

fn print_replicas(r: api::MembershipResponse) {
    for x in r.replicas {
        println!("{:<4} {:<22} {}", x.id, x.address, x.role);
    }
}

#[cfg(test)]
mod tests {
    use super::tls_hint;

    #[test]
    fn a_plaintext_call_to_a_tls_port_says_what_to_set() {
        let e = "Unavailable: h2 protocol error: http2 error";
        assert!(
            tls_hint(e, (false, false))
                .unwrap()
                .contains("CHAT_TLS_DIR")
        );
        assert!(
            tls_hint(e, (true, false))
                .unwrap()
                .contains("CHAT_GATEWAY_CA")
        );
        assert_eq!(tls_hint(e, (true, true)), None);
        assert_eq!(
            tls_hint("Unavailable: tcp connect error", (false, false)),
            None
        );
    }
}
