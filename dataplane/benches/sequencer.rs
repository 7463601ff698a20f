//! Batches ordered per second on one core, ORDER 5, for 1, 4 and 32 brokers:
//! - `core`: the sans-IO state machine alone (events in, actions out);
//! - `driver`: the polling driver on real rings in a pool in /dev/shm (ring poll, descriptor
//!   checks, order stamp, client-table save, watermark), with the rings refilled between
//!   timed drains; in both coherence modes.
//!
//! Run: `cargo bench -p embar-dataplane --bench sequencer`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use embar_dataplane::batch::BatchDesc;
use embar_dataplane::pool::coherence::{Coherence, Coherent, NonCoherent};
use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::layout::BATCH_HEADER_VERSION;
use embar_dataplane::pool::topics::TopicConfig;
use embar_dataplane::pool::{CreateOptions, Pool};
use embar_dataplane::ring::RingProducer;
use embar_dataplane::sequencer::driver::{DriverConfig, Sequencer};
use embar_dataplane::sequencer::{Action, Landed, Limits, OrderLevel, SequencerCore};

const CLIENTS: u64 = 64;

/// Batch `k` of the run: client `k % CLIENTS`, striped over brokers; every 16th pair of a
/// client's batches arrives swapped, so the hold path is exercised too.
fn event(k: u64, brokers: u32) -> Landed {
    let client = k % CLIENTS;
    let mut seq = k / CLIENTS;
    if (seq / 2) % 8 == 0 {
        seq ^= 1;
    }
    Landed {
        broker: (k % u64::from(brokers)) as u32,
        index: k,
        client_id: client,
        batch_seq: seq,
        num_msg: 2000,
    }
}

fn bench_core(c: &mut Criterion) {
    let mut g = c.benchmark_group("sequencer_core_order5");
    for brokers in [1u32, 4, 32] {
        let n = 1u64 << 16;
        let events: Vec<Landed> = (0..n).map(|k| event(k, brokers)).collect();
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(
            BenchmarkId::from_parameter(brokers),
            &events,
            |b, events| {
                let mut out: Vec<Action> = Vec::with_capacity(64);
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut core =
                            SequencerCore::new(OrderLevel::TotalFifo, brokers, Limits::default());
                        let t = Instant::now();
                        for e in events {
                            core.on_landed(*e, 0, &mut out);
                            out.clear();
                        }
                        total += t.elapsed();
                        assert_eq!(core.stats().held_now, 0);
                    }
                    total
                });
            },
        );
    }
    g.finish();
}

fn bench_driver(c: &mut Criterion) {
    driver_group(c, Coherent);
    driver_group(c, NonCoherent::detect());
}

fn driver_group<C: Coherence>(c: &mut Criterion, coh: C) {
    let mut g = c.benchmark_group(format!("sequencer_driver_order5_{}", coh.mode().name()));
    g.sample_size(20);
    for brokers in [1u32, 4, 32] {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/embar-bench-seq-{}-{brokers}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let cfg = PoolConfig {
            pool_bytes: 64 << 20,
            max_topics: 1,
            max_brokers: 32,
            ring_slots: 1024,
            segment_bytes: 1 << 20,
        };
        let pool = Pool::create(&path, &cfg, &CreateOptions::default()).unwrap();
        let topic_cfg = TopicConfig {
            order: 5,
            ack: 1,
            replication_factor: 0,
            batch_bytes: 1 << 20,
        };
        let topic = pool.create_topic(Coherent, "bench", &topic_cfg).unwrap();
        let mut producers: Vec<_> = (0..brokers)
            .map(|b| RingProducer::new(pool.ring(topic, b).unwrap(), coh))
            .collect();
        // The bench's clients write rings without sessions: never reclaimed.
        let cfg = DriverConfig {
            client_reclaim: false,
            ..DriverConfig::default()
        };
        let mut seq = Sequencer::start(&pool, coh, topic, brokers, cfg).unwrap();
        // Fill every ring nearly full, per timed round.
        // Below the ring size by more than the batches the hold path keeps unfinished.
        let per_round = u64::from(brokers) * 900;
        let mut k = 0u64;
        let base = pool.geometry().segment_offset(0);
        g.throughput(Throughput::Elements(per_round));
        g.bench_function(BenchmarkId::from_parameter(brokers), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for _ in 0..per_round {
                        let e = event(k, brokers);
                        let d = BatchDesc {
                            batch_seq: e.batch_seq,
                            client_id: e.client_id,
                            num_msg: 1,
                            broker_id: e.broker,
                            total_size: 64,
                            log_idx: base + 64 * (k % 1024),
                            start_logical_offset: 0,
                            version_flags: u64::from(BATCH_HEADER_VERSION),
                        };
                        producers[e.broker as usize].try_publish(&d).unwrap();
                        k += 1;
                    }
                    let t = Instant::now();
                    let mut done = 0;
                    while done < per_round {
                        done += seq.poll_once().unwrap() as u64;
                    }
                    total += t.elapsed();
                }
                total
            });
        });
        drop(seq);
        drop(pool);
        let _ = std::fs::remove_file(&path);
    }
    g.finish();
}

criterion_group!(benches, bench_core, bench_driver);
criterion_main!(benches);
