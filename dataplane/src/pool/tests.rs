use std::path::PathBuf;

use super::coherence::{Coherent, NonCoherent};
use super::segments::{AllocPolicy, SegmentAllocator, SegmentOwner};
use super::topics::TopicConfig;
use super::*;
use crate::sync::Ordering::Relaxed;

/// A pool file under /dev/shm, removed on drop.
pub(crate) struct TempPool(pub PathBuf);

impl TempPool {
    pub fn path(name: &str) -> TempPool {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = PathBuf::from(format!(
            "/dev/shm/embar-test-{name}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        TempPool(p)
    }
}

impl Drop for TempPool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn small() -> PoolConfig {
    PoolConfig {
        pool_bytes: 64 << 20,
        max_topics: 8,
        max_brokers: 4,
        ring_slots: 64,
        segment_bytes: 1 << 20,
    }
}

fn topic(order: u8, ack: u8, rf: u8) -> TopicConfig {
    TopicConfig {
        order,
        ack,
        replication_factor: rf,
        batch_bytes: 64 << 10,
    }
}

fn file_digest(p: &Path) -> (Vec<u8>, std::time::SystemTime) {
    let bytes = std::fs::read(p).unwrap();
    let mtime = std::fs::metadata(p).unwrap().modified().unwrap();
    (bytes, mtime)
}

#[test]
fn a_created_pool_reopens_with_the_same_geometry_identity_and_mode() {
    let t = TempPool::path("reopen");
    let opts = CreateOptions {
        coherence: CoherenceMode::NonCoherent,
        ..Default::default()
    };
    let a = Pool::create(&t.0, &small(), &opts).unwrap();
    let b = Pool::open(&t.0, &OpenOptions::default()).unwrap();
    assert_eq!(a.geometry(), b.geometry());
    assert_eq!(a.pool_id(), b.pool_id());
    assert_eq!(b.coherence_mode(), CoherenceMode::NonCoherent);
    assert_eq!(b.superblock().magic.load(Relaxed), POOL_MAGIC);
    // Ring offsets recorded for readers of the paper's field names.
    let g = b.geometry();
    assert_eq!(
        b.tinode(3).brokers[2]
            .broker
            .batch_headers_offset
            .load(Relaxed),
        g.ring_offset(3, 2)
    );
}

#[test]
fn create_refuses_an_existing_pool_and_an_invalid_config_leaves_no_file() {
    let t = TempPool::path("exists");
    Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap();
    let err = Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let t2 = TempPool::path("badcfg");
    let bad = PoolConfig {
        ring_slots: 3,
        ..small()
    };
    let err = Pool::create(&t2.0, &bad, &CreateOptions::default()).unwrap_err();
    assert!(err.to_string().contains("ring_slots"), "{err}");
    assert!(!t2.0.exists());
}

#[test]
fn opening_a_foreign_file_is_a_clear_error_and_writes_nothing() {
    let t = TempPool::path("foreign");
    std::fs::write(&t.0, vec![0x5au8; 1 << 20]).unwrap();
    let before = file_digest(&t.0);
    let err = Pool::open(&t.0, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, PoolError::NotAPool { .. }), "{err}");
    assert!(err.to_string().contains("not an Embarcadero pool"), "{err}");
    assert_eq!(file_digest(&t.0), before);
    // Too small to hold a superblock.
    std::fs::write(&t.0, b"tiny").unwrap();
    let err = Pool::open(&t.0, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, PoolError::NotAPool { .. }), "{err}");
}

/// Writes `value` at byte `offset` of the file, outside any mapping.
fn poke(p: &Path, offset: u64, value: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(value, offset).unwrap();
}

#[test]
fn another_version_a_wrong_size_or_a_corrupt_geometry_is_refused_without_a_write() {
    let t = TempPool::path("damaged");
    drop(Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap());

    poke(&t.0, 8, &(LAYOUT_VERSION + 1).to_le_bytes());
    let before = file_digest(&t.0);
    let err = Pool::open(&t.0, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(err, PoolError::VersionMismatch { found, .. } if found == LAYOUT_VERSION + 1),
        "{err}"
    );
    assert_eq!(file_digest(&t.0), before);
    poke(&t.0, 8, &LAYOUT_VERSION.to_le_bytes());

    // Truncated file: the superblock's size no longer matches the backing.
    let f = std::fs::OpenOptions::new().write(true).open(&t.0).unwrap();
    f.set_len(32 << 20).unwrap();
    let err = Pool::open(&t.0, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, PoolError::SizeMismatch { .. }), "{err}");
    f.set_len(64 << 20).unwrap();

    // The configuration expects another size.
    let err = Pool::open(
        &t.0,
        &OpenOptions {
            expect_bytes: Some(128 << 20),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, PoolError::UnexpectedSize { .. }), "{err}");

    // A region offset that disagrees with the parameters (offset of segment_pool_offset).
    let off = 64 + 16 + 8 * 4;
    poke(&t.0, off, &8u64.to_le_bytes());
    let before = file_digest(&t.0);
    let err = Pool::open(&t.0, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, PoolError::CorruptLayout { .. }), "{err}");
    assert_eq!(file_digest(&t.0), before);
}

#[test]
fn a_pool_whose_format_never_finished_does_not_open() {
    let t = TempPool::path("halfmade");
    drop(Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap());
    poke(&t.0, 0, &0u64.to_le_bytes());
    let err = Pool::open(&t.0, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, PoolError::NotAPool { found: 0, .. }), "{err}");
}

#[test]
fn numa_binding_to_node_zero_works_where_the_kernel_has_numa() {
    if !embar_sys::numa::node_exists(0) {
        eprintln!("skipped: this kernel lists no NUMA node 0 (/sys/devices/system/node)");
        return;
    }
    let t = TempPool::path("numa");
    let opts = CreateOptions {
        numa_node: Some(0),
        ..Default::default()
    };
    Pool::create(&t.0, &small(), &opts).unwrap();
    let t2 = TempPool::path("numa-bad");
    let opts = CreateOptions {
        numa_node: Some(999),
        ..Default::default()
    };
    let err = Pool::create(&t2.0, &small(), &opts).unwrap_err();
    assert!(err.to_string().contains("NUMA node 999"), "{err}");
    assert!(!t2.0.exists(), "a failed create leaves no file");
}

#[test]
fn topics_are_found_by_full_name_and_never_collide() {
    let t = TempPool::path("topics");
    let pool = Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap();
    let c = Coherent;
    // Names sharing long prefixes (the original mapped short names to one slot).
    let names = [
        "a",
        "b",
        "orders",
        "orders-v2",
        "orders.v2",
        "o",
        "x_y",
        "Z",
    ];
    let mut slots = Vec::new();
    for (i, n) in names.iter().enumerate() {
        slots.push(
            pool.create_topic(c, n, &topic(5, 1, (i % 3) as u8))
                .unwrap(),
        );
    }
    let mut sorted = slots.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "one slot each");
    for (n, s) in names.iter().zip(&slots) {
        assert_eq!(pool.find_topic(c, n).unwrap(), *s);
        assert_eq!(pool.read_topic(c, *s).unwrap().name, *n);
    }
    let err = pool
        .create_topic(c, "one-too-many", &topic(5, 1, 0))
        .unwrap_err();
    assert!(matches!(err, PoolError::TopicTableFull(8)), "{err}");
    let err = pool.create_topic(c, "orders", &topic(5, 1, 0)).unwrap_err();
    assert!(matches!(err, PoolError::TopicExists(_)), "{err}");
    let err = pool.find_topic(c, "orders-v3").unwrap_err();
    assert!(
        err.to_string().contains("unknown topic \"orders-v3\""),
        "{err}"
    );

    // Delete leaves a tombstone: later names of the chain stay reachable; the slot is reused.
    pool.delete_topic(c, "orders").unwrap();
    assert!(pool.find_topic(c, "orders").is_err());
    for n in names.iter().filter(|n| **n != "orders") {
        pool.find_topic(c, n).unwrap();
    }
    let s = pool.create_topic(c, "payments", &topic(2, 0, 0)).unwrap();
    let info = pool.read_topic(c, s).unwrap();
    assert_eq!(info.config, topic(2, 0, 0));
    assert!(info.generation >= 1);
    assert_eq!(pool.list_topics(c).len(), names.len());

    // Another process (another mapping) sees the same table.
    let other = Pool::open(&t.0, &OpenOptions::default()).unwrap();
    assert_eq!(
        other.find_topic(NonCoherent::detect(), "payments").unwrap(),
        s
    );
}

#[test]
fn bad_topic_names_and_configs_fail_closed() {
    let t = TempPool::path("topicbad");
    let pool = Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap();
    let c = Coherent;
    let long = "x".repeat(TOPIC_NAME_MAX_BYTES + 1);
    for (name, needle) in [
        ("", "empty"),
        (long.as_str(), "longer"),
        ("a b", "allowed"),
        ("é", "allowed"),
    ] {
        let err = pool.create_topic(c, name, &topic(5, 1, 0)).unwrap_err();
        assert!(err.to_string().contains(needle), "{name:?}: {err}");
    }
    pool.create_topic(c, &"x".repeat(TOPIC_NAME_MAX_BYTES), &topic(5, 1, 0))
        .unwrap();
    let cases = [
        (topic(6, 1, 0), "ORDER 6"),
        (topic(3, 1, 0), "ORDER 3"),
        (topic(5, 3, 0), "ACK 3"),
        (topic(5, 2, 0), "ACK 2"),
        (topic(5, 1, 5), "exceeds"),
        (
            TopicConfig {
                batch_bytes: 2 << 20,
                ..topic(5, 1, 0)
            },
            "batch size",
        ),
        (
            TopicConfig {
                batch_bytes: 10,
                ..topic(5, 1, 0)
            },
            "batch size",
        ),
    ];
    for (cfg, needle) in cases {
        let err = pool.create_topic(c, "t", &cfg).unwrap_err();
        assert!(err.to_string().contains(needle), "{cfg:?}: {err}");
    }
    assert_eq!(pool.list_topics(c).len(), 1, "nothing half-created");
}

#[test]
fn segments_are_owned_once_and_freed_only_by_their_owner() {
    let t = TempPool::path("segments");
    let pool = Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap();
    let c = Coherent;
    let n = pool.geometry().segment_count;
    let a_owner = SegmentOwner {
        topic: 1,
        broker: 0,
    };
    let mut a = SegmentAllocator::new(&pool, c, a_owner, AllocPolicy::Shared).unwrap();
    let mut b = SegmentAllocator::new(
        &pool,
        c,
        SegmentOwner {
            topic: 1,
            broker: 1,
        },
        AllocPolicy::Shared,
    )
    .unwrap();
    let mut held = Vec::new();
    for i in 0..n {
        let s = if i % 2 == 0 { a.alloc() } else { b.alloc() }.unwrap();
        pool.data_ptr(s.offset, s.bytes).unwrap();
        held.push(s);
    }
    let mut idx: Vec<_> = held.iter().map(|s| s.index).collect();
    idx.sort();
    idx.dedup();
    assert_eq!(idx.len() as u64, n, "every segment once");
    assert_eq!(pool.segments_in_use(c), n);
    let err = a.alloc().unwrap_err();
    assert!(err.to_string().contains("no free segment"), "{err}");
    // b cannot free a's segment; a can, once.
    let s0 = held[0];
    assert_eq!(pool.segment_owner(c, s0.index), Some(a_owner));
    assert!(matches!(
        b.free(&s0),
        Err(PoolError::NotSegmentOwner { .. })
    ));
    a.free(&s0).unwrap();
    assert!(
        matches!(a.free(&s0), Err(PoolError::NotSegmentOwner { .. })),
        "double free"
    );
    let again = b.alloc().unwrap();
    assert_eq!(again.index, s0.index);
    assert_eq!(again.generation, s0.generation + 1);
    assert!(
        matches!(a.free(&s0), Err(PoolError::NotSegmentOwner { .. })),
        "stale handle"
    );
}

#[test]
fn partitioned_allocation_stays_in_its_partition() {
    let t = TempPool::path("partition");
    let pool = Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap();
    let c = NonCoherent::detect();
    let n = pool.geometry().segment_count;
    let parts = 3;
    let mut total = 0;
    for part in 0..parts {
        let owner = SegmentOwner {
            topic: 0,
            broker: part,
        };
        let mut al =
            SegmentAllocator::new(&pool, c, owner, AllocPolicy::Partitioned { part, parts })
                .unwrap();
        while let Ok(s) = al.alloc() {
            assert_eq!(s.index % u64::from(parts), u64::from(part));
            total += 1;
        }
    }
    assert_eq!(total, n, "the partitions cover the table");
    let err = SegmentAllocator::new(
        &pool,
        c,
        SegmentOwner {
            topic: 0,
            broker: 0,
        },
        AllocPolicy::Partitioned { part: 3, parts: 3 },
    )
    .unwrap_err();
    assert!(err.to_string().contains("partition 3 of 3"), "{err}");
}

#[test]
fn data_ranges_are_bounds_checked() {
    let t = TempPool::path("datarange");
    let pool = Pool::create(&t.0, &small(), &CreateOptions::default()).unwrap();
    let g = *pool.geometry();
    assert!(pool.data_ptr(g.segment_offset(0), 64).is_ok());
    for (off, len) in [
        (0, 64),
        (g.ring_region_offset, 64),
        (g.pool_bytes - 64, 128),
        (u64::MAX, 1),
    ] {
        let err = pool.data_ptr(off, len).unwrap_err();
        assert!(err.to_string().contains("bad log range"), "{err}");
    }
    assert!(pool.ring_slots(8, 0).is_err());
    assert!(pool.ring_slots(0, 4).is_err());
}
