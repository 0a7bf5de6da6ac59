//! The read-back after the load: every acknowledged message stored once,
//! in an order consistent with real time, and delivered to every member.

use std::collections::HashMap;
use std::sync::Arc;

use chat_client::Message;
use chat_proto::chat::v1 as pb;
use hdrhistogram::Histogram;

use super::{Ctx, Delivery, SendRecord};

/// Page size of the read-back.
const PAGE: u32 = 1_000;

pub struct Input<'a> {
    pub ctx: &'a Arc<Ctx>,
    pub sends: &'a [SendRecord],
    /// Every stored message per conversation index, or why it could not be
    /// read.
    pub stored: Result<Vec<Vec<Message>>, String>,
    pub deliveries: &'a [Vec<Delivery>],
    pub load_start_us: u64,
    pub load_end_us: u64,
    /// dr: when the backup the store was restored from began; a send
    /// acknowledged after it may be gone without counting as lost.
    pub recovery_point_us: Option<u64>,
}

#[derive(Debug)]
pub struct Verification {
    /// Why the read-back is incomplete, if it is.
    pub read_error: Option<String>,
    pub stored: u64,
    /// Stored although the sender saw its send fail (allowed: the ack was
    /// lost, not the message).
    pub stored_unacked: u64,
    pub lost: u64,
    /// dr: acknowledged after the backup began, and not restored.
    pub beyond_recovery_point: u64,
    /// Acked with a seq other than the one it is stored under.
    pub seq_mismatch: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub delivery_missed: u64,
    pub delivery_duplicated: u64,
    /// Send (scheduled time) → receipt, microseconds, acked sends only.
    pub delivery_latency: Histogram<u64>,
    /// A few of the findings, for the notes.
    pub examples: Vec<String>,
}

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Reads every conversation of the run from seq 1 through History, as one
/// of its members.
pub async fn read_back(ctx: &Arc<Ctx>) -> Result<Vec<Vec<Message>>, String> {
    let mut set = tokio::task::JoinSet::new();
    let mut out: Vec<Vec<Message>> = vec![Vec::new(); ctx.convs.len()];
    for (j, c) in ctx.convs.iter().enumerate() {
        let client = ctx.client(c.members[0]);
        let id = c.id.clone();
        set.spawn(async move {
            let mut all = Vec::new();
            loop {
                let req = pb::HistoryRequest {
                    conversation_id: id.clone(),
                    after_seq: all.last().map_or(0, |m: &Message| m.seq),
                    before_seq: 0,
                    limit: PAGE,
                };
                let page = super::patiently(|| client.history(req.clone()))
                    .await
                    .map_err(|s| format!("reading {id} back: {:?}: {}", s.code(), s.message()))?;
                if page.messages.is_empty() {
                    return Ok::<_, String>((j, all));
                }
                all.extend(page.messages);
            }
        });
        if set.len() >= 8
            && let Some(r) = set.join_next().await
        {
            let (j, msgs) = r.map_err(|e| e.to_string())??;
            out[j] = msgs;
        }
    }
    while let Some(r) = set.join_next().await {
        let (j, msgs) = r.map_err(|e| e.to_string())??;
        out[j] = msgs;
    }
    Ok(out)
}

pub fn verify(input: &Input<'_>) -> Verification {
    let mut v = Verification {
        read_error: None,
        stored: 0,
        stored_unacked: 0,
        lost: 0,
        beyond_recovery_point: 0,
        seq_mismatch: 0,
        duplicated: 0,
        out_of_order: 0,
        delivery_missed: 0,
        delivery_duplicated: 0,
        delivery_latency: hist(),
        examples: Vec::new(),
    };
    let stored = match &input.stored {
        Ok(s) => s,
        Err(e) => {
            v.read_error = Some(e.clone());
            return v;
        }
    };
    let ctx = input.ctx;
    // Send number → where it is stored (possibly more than once).
    let mut places: HashMap<u64, Vec<(u32, u64)>> = HashMap::new();
    for (j, msgs) in stored.iter().enumerate() {
        for m in msgs {
            if let Some(k) = ctx.k_of(&m.client_msg_id) {
                places.entry(k).or_default().push((j as u32, m.seq));
            }
        }
    }
    v.stored = places.values().map(|p| p.len() as u64).sum();
    v.duplicated = places.values().map(|p| p.len() as u64 - 1).sum();
    let by_k: HashMap<u64, &SendRecord> = input.sends.iter().map(|r| (r.k, r)).collect();
    for r in input.sends {
        match (r.outcome, places.get(&r.k)) {
            (Ok(_), None) if input.recovery_point_us.is_some_and(|rp| r.done_us >= rp) => {
                v.beyond_recovery_point += 1;
            }
            (Ok(_), None) => {
                v.lost += 1;
                if v.examples.len() < 5 {
                    v.examples
                        .push(format!("{} acked but not stored", ctx.cmid(r.k)));
                }
            }
            (Ok(seq), Some(p)) if !p.contains(&(r.conv, seq)) => v.seq_mismatch += 1,
            (Err(_), Some(_)) => v.stored_unacked += 1,
            _ => {}
        }
    }

    // Out of order: B stored below A although A was acked before B was sent.
    for msgs in stored {
        let mut acked: Vec<(u64, &SendRecord)> = msgs
            .iter()
            .filter_map(|m| {
                let r = by_k.get(&ctx.k_of(&m.client_msg_id)?)?;
                r.outcome.is_ok().then_some((m.seq, *r))
            })
            .collect();
        acked.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        let mut earliest_ack_above = u64::MAX;
        for (_, r) in acked {
            if earliest_ack_above < r.started_us {
                v.out_of_order += 1;
            }
            earliest_ack_above = earliest_ack_above.min(r.done_us);
        }
    }

    // Deliveries: every member of each conversation, every stored message of
    // the load, exactly once.
    for (j, msgs) in stored.iter().enumerate() {
        let expected: Vec<u64> = msgs
            .iter()
            .filter(|m| ctx.k_of(&m.client_msg_id).is_some())
            .map(|m| m.seq)
            .collect();
        for &member in &ctx.convs[j].members {
            let mut got: HashMap<u64, u32> = HashMap::new();
            for d in input.deliveries[member as usize]
                .iter()
                .filter(|d| d.conv == j as u32 && d.k.is_some())
            {
                *got.entry(d.seq).or_default() += 1;
                if let Some(r) = d.k.and_then(|k| by_k.get(&k))
                    && r.outcome.is_ok()
                    && (input.load_start_us..=input.load_end_us).contains(&r.intended_us)
                {
                    let _ = v
                        .delivery_latency
                        .record(d.at_us.saturating_sub(r.intended_us).max(1));
                }
            }
            for seq in &expected {
                match got.get(seq) {
                    None => {
                        v.delivery_missed += 1;
                        if v.examples.len() < 5 {
                            v.examples.push(format!(
                                "{} was not delivered seq {seq} of {}",
                                ctx.users[member as usize], ctx.convs[j].id
                            ));
                        }
                    }
                    Some(&n) => v.delivery_duplicated += u64::from(n - 1),
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::{Mutex, RwLock};
    use std::time::{Duration, Instant};

    fn ctx() -> Arc<Ctx> {
        let key = chat_auth::TokenKey::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
        let gateways = vec!["127.0.0.1:1".to_string()];
        let client = chat_client::ChatClient::new(
            gateways.clone(),
            &key.sign_for("a", 60),
            Duration::from_secs(1),
        )
        .unwrap();
        Arc::new(Ctx {
            run: "r1".into(),
            epoch: Instant::now(),
            users: vec!["a".into(), "b".into()],
            convs: vec![super::super::Conv {
                id: "r1-c0".into(),
                members: vec![0, 1],
            }],
            conv_index: HashMap::from([("r1-c0".to_string(), 0)]),
            clients: vec![RwLock::new(client.clone()), RwLock::new(client)],
            body_bytes: 16,
            sends: Mutex::new(Vec::new()),
            next_k: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            deliveries: vec![Mutex::new(Vec::new()), Mutex::new(Vec::new())],
            delivered_upto: vec![Mutex::new(HashMap::new()), Mutex::new(HashMap::new())],
            gateways,
            gateway_ca: None,
            key,
            send_timeout: Duration::from_secs(1),
            typing_per_send: 0.0,
            throttling: true,
            streaming: true,
            typing: Default::default(),
        })
    }

    fn send(k: u64, started: u64, done: u64, outcome: Result<u64, tonic::Code>) -> SendRecord {
        SendRecord {
            conv: 0,
            sender: 0,
            k,
            intended_us: started,
            started_us: started,
            done_us: done,
            outcome,
        }
    }

    fn stored(k: u64, seq: u64) -> Message {
        Message {
            conversation_id: "r1-c0".into(),
            seq,
            sender: "a".into(),
            client_msg_id: format!("r1-{k}"),
            body: vec![],
            server_ts_ms: 0,
        }
    }

    fn delivered(k: u64, seq: u64) -> Delivery {
        Delivery {
            conv: 0,
            seq,
            k: Some(k),
            at_us: 100,
        }
    }

    #[tokio::test]
    async fn a_faithful_run_has_no_findings() {
        let ctx = ctx();
        let sends = [send(0, 1, 5, Ok(1)), send(1, 6, 9, Ok(2))];
        let deliveries = vec![
            vec![delivered(0, 1), delivered(1, 2)],
            vec![delivered(0, 1), delivered(1, 2)],
        ];
        let v = verify(&Input {
            ctx: &ctx,
            sends: &sends,
            stored: Ok(vec![vec![stored(0, 1), stored(1, 2)]]),
            deliveries: &deliveries,
            load_start_us: 0,
            load_end_us: 1_000,
            recovery_point_us: None,
        });
        assert_eq!(
            (
                v.lost,
                v.duplicated,
                v.out_of_order,
                v.delivery_missed,
                v.delivery_duplicated
            ),
            (0, 0, 0, 0, 0)
        );
        assert_eq!(v.delivery_latency.len(), 4);
    }

    #[tokio::test]
    async fn finds_lost_duplicated_reordered_and_missed() {
        let ctx = ctx();
        // k0 acked at t=5 with seq 2; k1 sent at t=6 (after k0's ack) but
        // stored at seq 1: out of order. k2 acked but absent: lost. k3 failed
        // yet stored twice: duplicated, and not lost.
        let sends = [
            send(0, 1, 5, Ok(2)),
            send(1, 6, 9, Ok(1)),
            send(2, 10, 11, Ok(9)),
            send(3, 12, 13, Err(tonic::Code::Unavailable)),
        ];
        let deliveries = vec![
            vec![
                delivered(1, 1),
                delivered(0, 2),
                delivered(0, 2),
                delivered(3, 3),
                delivered(3, 4),
            ],
            vec![delivered(1, 1)],
        ];
        let v = verify(&Input {
            ctx: &ctx,
            sends: &sends,
            stored: Ok(vec![vec![
                stored(1, 1),
                stored(0, 2),
                stored(3, 3),
                stored(3, 4),
            ]]),
            deliveries: &deliveries,
            load_start_us: 0,
            load_end_us: 1_000,
            recovery_point_us: None,
        });
        assert_eq!(v.lost, 1);
        assert_eq!(v.duplicated, 1);
        assert_eq!(v.out_of_order, 1);
        assert_eq!(v.stored_unacked, 1);
        assert_eq!(v.delivery_missed, 3, "user b missed seqs 2, 3 and 4");
        assert_eq!(v.delivery_duplicated, 1);
    }

    #[tokio::test]
    async fn an_unreadable_store_is_reported_not_counted_as_fine() {
        let ctx = ctx();
        let v = verify(&Input {
            ctx: &ctx,
            sends: &[send(0, 1, 2, Ok(1))],
            stored: Err("reading r1-c0 back: Unavailable".into()),
            deliveries: &[vec![], vec![]],
            load_start_us: 0,
            load_end_us: 10,
            recovery_point_us: None,
        });
        assert!(v.read_error.is_some());
    }

    #[tokio::test]
    async fn after_a_restore_only_what_was_acked_before_the_backup_must_be_there() {
        let ctx = ctx();
        // The backup began at t=20: k0 (acked at 5) must be restored; k1
        // (acked at 25) may be gone; k2 (acked at 30) happened to be in it.
        let sends = [
            send(0, 1, 5, Ok(1)),
            send(1, 21, 25, Ok(2)),
            send(2, 22, 30, Ok(3)),
        ];
        let deliveries = vec![vec![], vec![]];
        let input = |stored: Vec<Message>, rp| Input {
            ctx: &ctx,
            sends: &sends,
            stored: Ok(vec![stored]),
            deliveries: &deliveries,
            load_start_us: 0,
            load_end_us: 1_000,
            recovery_point_us: rp,
        };
        let v = verify(&input(vec![stored(0, 1), stored(2, 3)], Some(20)));
        assert_eq!((v.lost, v.beyond_recovery_point), (0, 1));
        let v = verify(&input(vec![stored(2, 3)], Some(20)));
        assert_eq!(
            (v.lost, v.beyond_recovery_point),
            (1, 1),
            "k0 was acked before the backup"
        );
        let v = verify(&input(vec![stored(0, 1), stored(2, 3)], None));
        assert_eq!(v.lost, 1, "without a restore nothing acked may go");
    }
}
