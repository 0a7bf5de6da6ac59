//! `chatctl`: operator and client tool. `chatctl store ...` talks to the
//! store replicas directly (admin and debugging).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
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
    /// Store replicas, host:port, comma separated.
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
    /// Direct access to the store replicas.
    #[command(subcommand)]
    Store(StoreCmd),
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = StoreClient::new(cli.store.clone(), Duration::from_secs(cli.timeout_secs))?;
    let Top::Store(cmd) = cli.command;
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
