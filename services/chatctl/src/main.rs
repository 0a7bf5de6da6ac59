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
    /// Exits 0 if ADDR reports SERVING on gRPC health (for healthchecks).
    Health {
        addr: String,
        /// Service name to check ("" for the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
    },
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatctl: {e:#}");
            ExitCode::FAILURE
        }
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
    chat_auth::TokenKey::new(k.as_bytes().to_vec()).map_err(|e| anyhow::anyhow!("--token-key: {e}"))
}

fn chat(cli: &Cli) -> anyhow::Result<ChatClient> {
    let token = match (&cli.token, &cli.as_user) {
        (Some(t), _) => t.clone(),
        (None, Some(user)) => key(cli)?.sign_for(user, 3_600),
        (None, None) => anyhow::bail!(
            "no identity: give --token (or CHAT_TOKEN), or --as USER with --token-key"
        ),
    };
    ChatClient::new(
        cli.gateways.clone(),
        &token,
        Duration::from_secs(cli.timeout_secs),
    )
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
        Top::Health { addr, service } => {
            anyhow::ensure!(
                local::healthy(addr, service).await,
                "{addr} is not serving {service:?}"
            );
            println!("serving");
        }
    }
    Ok(())
}

async fn store(cli: Cli) -> anyhow::Result<()> {
    let client = StoreClient::new(cli.store.clone(), Duration::from_secs(cli.timeout_secs))?;
    let Top::Store(cmd) = cli.command else {
        unreachable!()
    };
    match cmd {
        StoreCmd::Status => {
            println!(
                "{:<4} {:<22} {:<14} {:>6} {:>7} {:>9} {:>9} {:>8}",
                "id", "address", "role", "term", "leader", "commit", "applied", "serving"
            );
            for addr in &cli.store {
                match client.status_of(addr).await {
                    Ok(s) => println!(
                        "{:<4} {:<22} {:<14} {:>6} {:>7} {:>9} {:>9} {:>8}",
                        s.id,
                        addr,
                        s.role,
                        s.term,
                        s.leader_id,
                        s.commit_index,
                        s.applied_index,
                        s.serving
                    ),
                    Err(e) => println!("{:<4} {:<22} unreachable: {e}", "?", addr),
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
        StoreCmd::RemoveReplica { id } => print_replicas(client.remove_replica(id).await?),
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
    }
    Ok(())
}

fn print_replicas(r: api::MembershipResponse) {
    for x in r.replicas {
        println!("{:<4} {:<22} {}", x.id, x.address, x.role);
    }
}
