//! The whole data path in one process, on threads over one pool: two brokers' drivers (the
//! same `Driver` `embar broker` runs; broker 0 runs the sequencers in its loop, as it does on
//! a host with few cores), publishers and a subscriber. (The same pieces as separate
//! processes: tests/ at the root.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use embar_broker::{Driver, DriverOptions};
use embar_dataplane::checker::{Delivered, OrderChecker};
use embar_dataplane::client::publisher::{PublishError, Publisher, PublisherConfig};
use embar_dataplane::client::subscriber::{StartAt, Subscriber};
use embar_dataplane::client::Publish;
use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::topics::TopicConfig;
use embar_dataplane::pool::Pool;

mod common;
use common::{temp_pool, TempPool};

fn pool(name: &str, pool_mib: u64) -> (TempPool, Pool) {
    let cfg = PoolConfig {
        pool_bytes: pool_mib << 20,
        max_topics: 2,
        max_brokers: 2,
        ring_slots: 64,
        segment_bytes: 256 << 10,
    };
    temp_pool(&format!("pipeline-{name}"), &cfg)
}

/// Runs the pipeline; returns the segments the brokers reclaimed and the pool's segment count.
fn run_pipeline(order: u8, publishers: u64, per_publisher: u64, pool_mib: u64) -> (u64, u64) {
    run_pipeline_with(order, publishers, per_publisher, pool_mib, false)
}

fn run_pipeline_with(
    order: u8,
    publishers: u64,
    per_publisher: u64,
    pool_mib: u64,
    flush_each: bool,
) -> (u64, u64) {
    let (_t, pool) = pool(&format!("o{order}"), pool_mib);
    let cfg = TopicConfig {
        order,
        ack: 1,
        replication_factor: 0,
        batch_bytes: 16 << 10,
    };
    pool.create_topic(Coherent, "events", &cfg).unwrap();
    let stop = AtomicBool::new(false);
    let total = publishers * per_publisher;
    /// Stops the polling threads however the test ends, so that a failure is reported
    /// instead of the scope waiting forever.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let brokers: Vec<_> = (0..2)
            .map(|b| {
                let (pool, stop) = (&pool, &stop);
                s.spawn(move || {
                    let mut d = Driver::new(pool, Coherent, b, DriverOptions::default()).unwrap();
                    d.sequence_here(b == 0);
                    while !stop.load(Ordering::Relaxed) {
                        if d.poll_once().unwrap() == 0 {
                            std::thread::yield_now();
                        }
                    }
                    d.broker().stats().segments_reclaimed
                })
            })
            .collect();
        let mut sub = Subscriber::open(&pool, Coherent, "events", StartAt::Oldest).unwrap();
        let pubs: Vec<_> = (0..publishers)
            .map(|k| {
                let pool = &pool;
                s.spawn(move || {
                    let mut p = Publisher::open(
                        pool,
                        Coherent,
                        "events",
                        &[0, 1],
                        1000 + k,
                        PublisherConfig::default(),
                    )?;
                    for i in 0..per_publisher {
                        let msg =
                            format!("client {k} message {i} {}", "x".repeat((i % 300) as usize));
                        p.publish(msg.as_bytes())?;
                        if flush_each {
                            p.flush()?;
                        }
                    }
                    p.wait_acks(Duration::from_secs(30))
                })
            })
            .collect();
        let fifo = order == 5 || order == 4;
        let mut checker = OrderChecker::new(fifo);
        let mut seen = std::collections::HashSet::new();
        let mut next_per_client = std::collections::HashMap::new();
        let mut got = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while got < total {
            assert!(
                std::time::Instant::now() < deadline,
                "subscriber got {got} of {total}"
            );
            let n = sub
                .poll(16, |m| {
                    checker.push(&Delivered::from(m)).unwrap();
                    // The payload names its client and index; both must match, each message
                    // must come once, and (ORDER 4, 5) each client's in order.
                    let k = m.client_id - 1000;
                    let text = std::str::from_utf8(m.payload).unwrap();
                    let i: u64 = text.split(' ').nth(3).unwrap().parse().unwrap();
                    let want = format!("client {k} message {i} {}", "x".repeat((i % 300) as usize));
                    assert_eq!(text, want);
                    assert!(seen.insert((k, i)), "message {i} of client {k} twice");
                    if fifo {
                        let next = next_per_client.entry(k).or_insert(0u64);
                        assert_eq!(i, *next, "client {k} out of order");
                        *next += 1;
                    }
                })
                .unwrap();
            got += n as u64;
            if n == 0 {
                std::thread::yield_now();
            }
        }
        for p in pubs {
            let acked: Result<u64, PublishError> = p.join().unwrap();
            assert_eq!(acked.unwrap(), per_publisher);
        }
        assert_eq!(checker.finish(Some(total)), Ok(total));
        stop.store(true, Ordering::Relaxed);
        let reclaimed = brokers.into_iter().map(|b| b.join().unwrap()).sum();
        (reclaimed, pool.geometry().segment_count)
    })
}

#[test]
fn publishers_brokers_sequencer_and_a_subscriber_agree_order_5() {
    run_pipeline(5, 3, 3000, 64);
}

#[test]
fn one_message_batches_alternate_brokers_and_stay_in_order() {
    for _ in 0..20 {
        run_pipeline_with(5, 1, 2000, 64, true);
    }
}

#[test]
fn order_4_and_0_run_the_same_path() {
    run_pipeline(4, 2, 2000, 64);
    run_pipeline(0, 2, 2000, 64);
}

#[test]
fn log_space_is_reused_when_the_run_moves_many_times_the_pool() {
    // About 100 MiB of batches through a pool with about 20 MiB of segments.
    let (reclaimed, segments) = run_pipeline(2, 2, 200_000, 24);
    assert!(
        reclaimed > 2 * segments,
        "{reclaimed} segments reclaimed of {segments}"
    );
}
