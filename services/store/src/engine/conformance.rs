//! One conformance suite for every engine. Each test runs against
//! `MemEngine` and `SledEngine`.

use std::sync::Arc;

use super::{BackgroundFlush, Engine, MemEngine, SledEngine, WriteBatch, prefix_end};

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

#[test]
fn synced_writes_survive_reopening_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = SledEngine::open(dir.path(), BackgroundFlush::Off).unwrap();
        let mut b = WriteBatch::default();
        b.put(b"k".to_vec(), vec![7u8; 200_000]);
        e.write(b).unwrap();
        e.sync().unwrap();
    }
    let e = reopen(dir.path());
    assert_eq!(e.get(b"k").unwrap(), Some(vec![7u8; 200_000]));
}
