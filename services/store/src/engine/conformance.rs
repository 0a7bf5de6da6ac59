//! One conformance suite for every engine, and for the raft log storage
//! built on it. Each test runs against `MemEngine` and `SledEngine`.

use std::sync::Arc;

use protobuf::Message as _;
use raft::Storage as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

use super::{BackgroundFlush, Engine, MemEngine, SledEngine, WriteBatch, prefix_end};
use crate::error::StoreError;
use crate::keys;
use crate::log_store::LogStore;
use crate::types::NodeId;

fn engines() -> Vec<(&'static str, Arc<dyn Engine>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledEngine::open(dir.path(), BackgroundFlush::Off).unwrap();
    vec![
        ("mem", Arc::new(MemEngine::new()), None),
        ("sled", Arc::new(sled), Some(dir)),
    ]
}

/// Opens a sled directory that a just-dropped engine used: sled's background
/// threads release its file lock shortly after the drop, so wait for that
/// (bounded) instead of failing on a busy machine.
fn reopen(dir: &std::path::Path) -> SledEngine {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledEngine::open(dir, BackgroundFlush::Off) {
            Ok(e) => return e,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot reopen {}: {e}", dir.display()),
        }
    }
}

fn kv(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
    (k.as_bytes().to_vec(), v.as_bytes().to_vec())
}

#[test]
fn batches_apply_in_order_and_ranges_scan_both_ways() {
    for (name, e, _dir) in engines() {
        let mut b = WriteBatch::default();
        for k in ["a/1", "a/2", "a/3", "b/1"] {
            b.put(k, k.to_uppercase());
        }
        b.delete("a/2");
        b.put("a/2", "again");
        e.write(b).unwrap();
        assert_eq!(e.get(b"a/2").unwrap(), Some(b"again".to_vec()), "{name}");
        let fwd = e.scan(b"a/", &prefix_end(b"a/"), false, 10).unwrap();
        assert_eq!(
            fwd,
            vec![kv("a/1", "A/1"), kv("a/2", "again"), kv("a/3", "A/3")],
            "{name}"
        );
        let rev = e.scan(b"a/", &prefix_end(b"a/"), true, 2).unwrap();
        assert_eq!(rev, vec![kv("a/3", "A/3"), kv("a/2", "again")], "{name}");
        let mut b = WriteBatch::default();
        b.delete_range("a/", prefix_end(b"a/"));
        e.write(b).unwrap();
        assert!(
            e.scan(b"a/", &prefix_end(b"a/"), false, 10)
                .unwrap()
                .is_empty(),
            "{name}"
        );
        assert_eq!(
            e.get(b"b/1").unwrap(),
            Some(b"B/1".to_vec()),
            "{name}: delete_range went past its end"
        );
        assert!(
            e.scan(b"z", b"a", false, 10).unwrap().is_empty(),
            "{name}: inverted range"
        );
        e.sync().unwrap();
    }
}

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = format!("entry {index}").into_bytes().into();
    e
}

fn voters() -> Vec<(NodeId, String)> {
    (1..=3)
        .map(|i| (NodeId(i), format!("127.0.0.1:700{i}")))
        .collect()
}

#[test]
fn log_appends_truncate_conflicts_and_answer_raft_queries() {
    for (name, e, _dir) in engines() {
        let log = LogStore::open(e, NodeId(1), &[]).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (1, 0),
            "{name}"
        );
        let ents: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        log.persist(&ents, None).unwrap();
        // A new leader overwrites 4..: the old 4 and 5 must go.
        log.persist(&[entry(4, 2)], None).unwrap();
        assert_eq!(log.last_index().unwrap(), 4, "{name}");
        assert_eq!(log.term(4).unwrap(), 2, "{name}");
        assert_eq!(log.term(3).unwrap(), 1, "{name}");
        assert!(log.term(5).is_err(), "{name}");
        let got = log
            .entries(2, 5, None, raft::GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(2, 1), (3, 1), (4, 2)],
            "{name}"
        );
        // Size limit: always at least one entry.
        let one = log
            .entries(2, 5, Some(1), raft::GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(one.len(), 1, "{name}");
        log.compact(2).unwrap();
        assert_eq!(log.first_index().unwrap(), 3, "{name}");
        assert_eq!(
            log.term(2).unwrap(),
            1,
            "{name}: term of the compaction point"
        );
        assert!(
            matches!(
                log.entries(1, 3, None, raft::GetEntriesContext::empty(false)),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            ),
            "{name}"
        );
    }
}

#[test]
fn a_new_group_starts_after_a_bootstrap_point_so_joiners_need_a_snapshot() {
    use crate::log_store::{BOOTSTRAP_INDEX, BOOTSTRAP_TERM};
    for (name, e, _dir) in engines() {
        let log = LogStore::open(e, NodeId(1), &voters()).unwrap();
        let st = log.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3], "{name}");
        assert_eq!(
            (st.hard_state.term, st.hard_state.commit),
            (BOOTSTRAP_TERM, BOOTSTRAP_INDEX),
            "{name}"
        );
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (BOOTSTRAP_INDEX + 1, BOOTSTRAP_INDEX),
            "{name}"
        );
        assert_eq!(log.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM, "{name}");
        let snap = log.snapshot(0, 4).unwrap();
        assert_eq!(
            snap.get_metadata().get_conf_state().voters,
            vec![1, 2, 3],
            "{name}"
        );
        // The voters' addresses travel with it, for replicas that join later.
        let data = crate::codec::decode_snapshot_data(&snap.data).unwrap();
        assert!(
            data.contains(&(keys::replica_addr(2), b"127.0.0.1:7002".to_vec())),
            "{name}"
        );
        assert!(log.is_fresh().unwrap(), "{name}");
        log.clear_fresh().unwrap();
        assert!(!log.is_fresh().unwrap(), "{name}");
    }
}

#[test]
fn hard_state_and_log_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e: Arc<dyn Engine> =
            Arc::new(SledEngine::open(dir.path(), BackgroundFlush::Off).unwrap());
        let log = LogStore::open(e.clone(), NodeId(2), &voters()).unwrap();
        let mut hs = HardState::default();
        hs.term = 7;
        hs.vote = 3;
        hs.commit = 7;
        log.persist(&[entry(6, 7), entry(7, 7), entry(8, 7)], Some(&hs))
            .unwrap();
        e.sync().unwrap();
    }
    let e: Arc<dyn Engine> = Arc::new(reopen(dir.path()));
    let log = LogStore::open(e.clone(), NodeId(2), &[]).unwrap();
    let st = log.initial_state().unwrap();
    assert_eq!(
        (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
        (7, 3, 7)
    );
    assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(log.last_index().unwrap(), 8);
    drop(log);
    // The same directory under another replica id is refused.
    match LogStore::open(e, NodeId(3), &[]) {
        Err(StoreError::FailedPrecondition(msg)) => {
            assert!(msg.contains("belongs to replica 2"), "{msg}")
        }
        other => panic!("expected refusal, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn installing_a_snapshot_replaces_log_and_state_at_once() {
    for (name, e, _dir) in engines() {
        let log = LogStore::open(e.clone(), NodeId(3), &[]).unwrap();
        log.persist(&[entry(1, 1), entry(2, 1)], None).unwrap();
        let mut b = WriteBatch::default();
        b.put(b"s/c/old".to_vec(), b"old".to_vec());
        e.write(b).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 50;
        snap.mut_metadata().term = 4;
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        snap.mut_metadata().set_conf_state(cs);
        log.install_snapshot(&snap, vec![kv("s/c/new", "new")])
            .unwrap();
        assert_eq!(
            e.get(b"s/c/old").unwrap(),
            None,
            "{name}: old state survived"
        );
        assert_eq!(e.get(b"s/c/new").unwrap(), Some(b"new".to_vec()), "{name}");
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (51, 50),
            "{name}"
        );
        assert_eq!(log.term(50).unwrap(), 4, "{name}");
        assert_eq!(log.applied().unwrap(), (50, 4), "{name}");
        assert_eq!(log.initial_state().unwrap().hard_state.commit, 50, "{name}");
        // What this replica would now send to others is that same state.
        let out = log.snapshot(0, 1).unwrap();
        assert_eq!(out.get_metadata().index, 50, "{name}");
        let data = crate::codec::decode_snapshot_data(&out.data).unwrap();
        assert!(data.contains(&kv("s/c/new", "new")), "{name}");
        // Keys outside the state machine are refused.
        let bad = log.install_snapshot(&snap, vec![kv("m/hs", "x")]);
        assert!(matches!(bad, Err(StoreError::Storage(_))), "{name}");
    }
}

#[test]
fn corrupt_records_stop_the_replica_with_a_clear_error() {
    for (name, e, _dir) in engines() {
        let mut b = WriteBatch::default();
        b.put(keys::REPLICA_ID, 1u64.to_be_bytes().to_vec());
        b.put(keys::HARD_STATE, vec![0xff, 0xff, 0xff]);
        e.write(b).unwrap();
        match LogStore::open(e, NodeId(1), &[]) {
            Err(StoreError::Storage(msg)) => {
                assert!(msg.contains("corrupt hard state"), "{name}: {msg}")
            }
            other => panic!(
                "{name}: expected corruption error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

#[test]
fn a_commit_index_beyond_the_log_is_refused() {
    for (name, e, _dir) in engines() {
        let mut hs = HardState::default();
        hs.commit = 10;
        let mut b = WriteBatch::default();
        b.put(keys::REPLICA_ID, 1u64.to_be_bytes().to_vec());
        b.put(keys::HARD_STATE, hs.write_to_bytes().unwrap());
        e.write(b).unwrap();
        assert!(
            matches!(
                LogStore::open(e, NodeId(1), &[]),
                Err(StoreError::Storage(_))
            ),
            "{name}"
        );
    }
}

#[test]
fn a_crash_between_apply_and_hard_state_write_is_recovered() {
    for (name, e, _dir) in engines() {
        {
            let log = LogStore::open(e.clone(), NodeId(1), &[]).unwrap();
            let mut hs = HardState::default();
            hs.term = 1;
            hs.commit = 1;
            log.persist(&[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hs))
                .unwrap();
            // Applied through 3, but the hard state saying commit = 3 was lost.
            let mut b = WriteBatch::default();
            b.put(keys::APPLIED, keys::encode_pair(3, 1));
            e.write(b).unwrap();
        }
        let log = LogStore::open(e, NodeId(1), &[]).unwrap();
        assert_eq!(log.hard_state().commit, 3, "{name}");
    }
}
