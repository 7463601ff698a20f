//! Model checking of the batch ring with loom: every interleaving (no preemption bound)
//! of a producer and a consumer thread running the real `ring` code over loom's atomics.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p embar-dataplane --test loom_ring --release`
//! (`scripts/loom.sh`). Without `--cfg loom` this file compiles to nothing.
#![cfg(loom)]

use embar_dataplane::batch::{BatchDesc, BatchLimits};
use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::geometry::{PoolConfig, PoolGeometry};
use embar_dataplane::pool::layout::{BatchHeader, BATCH_HEADER_VERSION};
use embar_dataplane::ring::{Polled, RingConsumer, RingError, RingProducer, RingRef};
use embar_dataplane::sync::AtomicU64;
use loom::sync::Arc;

struct Mem {
    slots: Vec<BatchHeader>,
    written: AtomicU64,
    consumed: AtomicU64,
}

impl Mem {
    fn new(n: usize) -> Arc<Mem> {
        Arc::new(Mem {
            slots: (0..n).map(|_| BatchHeader::default()).collect(),
            written: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
        })
    }
    fn ring(&self) -> RingRef<'_> {
        RingRef::new(&self.slots, &self.written, &self.consumed)
    }
}

fn geometry() -> PoolGeometry {
    PoolGeometry::compute(&PoolConfig {
        pool_bytes: 64 << 20,
        ..PoolConfig::default()
    })
    .unwrap()
}

fn desc(seq: u64) -> BatchDesc {
    let g = geometry();
    BatchDesc {
        batch_seq: seq,
        client_id: 7,
        num_msg: 1,
        broker_id: 0,
        total_size: 64,
        log_idx: g.segment_offset(0) + 64 * seq,
        start_logical_offset: seq,
        version_flags: u64::from(BATCH_HEADER_VERSION),
    }
}

/// A producer thread that publishes batches 0..items, waiting while the ring is full.
fn spawn_producer(mem: Arc<Mem>, items: u64) -> loom::thread::JoinHandle<()> {
    loom::thread::spawn(move || {
        let mut p = RingProducer::new(mem.ring(), Coherent);
        let mut seq = 0;
        while seq < items {
            match p.try_publish(&desc(seq)) {
                Ok(i) => {
                    assert_eq!(i, seq);
                    seq += 1;
                }
                Err(RingError::Full { .. }) => loom::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
    })
}

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    // No preemption bound: loom explores every interleaving (exhaustive).
    b.preemption_bound = None;
    b
}

/// Producer publishes ITEMS batches through a 2-slot ring (each slot used twice); the
/// consumer must see each exactly once, in order, with every field intact.
#[test]
fn every_batch_arrives_once_in_order_across_laps() {
    const ITEMS: u64 = 4;
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    builder().check(|| {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mem = Mem::new(2);
        let producer = spawn_producer(mem.clone(), ITEMS);
        let mut c = RingConsumer::new(mem.ring(), Coherent, BatchLimits::new(geometry(), 0));
        let mut expect = 0;
        while expect < ITEMS {
            match c.poll().expect("no overrun") {
                Some(Polled::Batch { index, desc: d }) => {
                    assert_eq!(index, expect);
                    assert_eq!(d, desc(expect), "a field was torn or stale");
                    c.finish(index).unwrap();
                    expect += 1;
                }
                Some(other) => panic!("{other:?}"),
                None => loom::thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
    eprintln!(
        "explored {} executions",
        RUNS.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// The consumer holds slot 0 and finishes slot 1 first: the producer must not overwrite slot
/// 0 (its third publish waits until 0 is finished), and nothing is lost.
#[test]
fn a_held_slot_is_never_overwritten() {
    const ITEMS: u64 = 3;
    builder().check(|| {
        let mem = Mem::new(2);
        let producer = spawn_producer(mem.clone(), ITEMS);
        let mut c = RingConsumer::new(mem.ring(), Coherent, BatchLimits::new(geometry(), 0));
        let mut got = Vec::new();
        while got.len() < 2 {
            match c.poll().expect("no overrun") {
                Some(Polled::Batch { index, desc: d }) => got.push((index, d)),
                Some(other) => panic!("{other:?}"),
                None => loom::thread::yield_now(),
            }
        }
        c.finish(got[1].0).unwrap();
        // Slot 0 still holds batch 0, whatever the producer is doing.
        assert_eq!(BatchDesc::load(&mem.slots[0]), desc(0));
        assert_eq!(c.consumed(), 0);
        c.finish(got[0].0).unwrap();
        loop {
            match c.poll().expect("no overrun") {
                Some(Polled::Batch { index, desc: d }) => {
                    assert_eq!((index, d), (2, desc(2)));
                    break;
                }
                Some(other) => panic!("{other:?}"),
                None => loom::thread::yield_now(),
            }
        }
        assert_eq!(got[0].1, desc(0));
        assert_eq!(got[1].1, desc(1));
        producer.join().unwrap();
    });
}
