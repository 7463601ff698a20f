//! The publisher, the subscriber and the session protocol, each property on its own, in one
//! process over a real pool file: the brokers are the same `Driver`s `embar broker` runs (on
//! threads, broker 0 running the sequencers in its loop), the clients are the data-plane
//! libraries the client crate and the CLI use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use embar_broker::{Driver, DriverOptions};
use embar_dataplane::client::publisher::{PublishError, Publisher, PublisherConfig};
use embar_dataplane::client::subscriber::{StartAt, Subscriber};
use embar_dataplane::client::Publish;
use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::topics::TopicConfig;
use embar_dataplane::pool::Pool;
use embar_dataplane::session::{self, SESSIONS};
use embar_dataplane::PoolError;

mod common;
use common::{temp_pool, TempPool};

fn pool(name: &str) -> (TempPool, Pool) {
    let cfg = PoolConfig {
        pool_bytes: 32 << 20,
        max_topics: 2,
        max_brokers: 2,
        ring_slots: 64,
        segment_bytes: 1 << 20,
    };
    temp_pool(&format!("clients-{name}"), &cfg)
}

fn topic(pool: &Pool, name: &str, order: u8, ack: u8) {
    let cfg = TopicConfig {
        order,
        ack,
        replication_factor: 0,
        batch_bytes: 4 << 10,
    };
    pool.create_topic(Coherent, name, &cfg).unwrap();
}

/// Runs `f` while two brokers' drivers serve `pool` on threads (broker 0 sequencing).
fn with_brokers<R>(pool: &Pool, f: impl FnOnce() -> R) -> R {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for b in 0..2 {
            let stop = &stop;
            s.spawn(move || {
                let mut d = Driver::new(pool, Coherent, b, DriverOptions::default()).unwrap();
                d.sequence_here(b == 0);
                while !stop.load(Ordering::Relaxed) {
                    if d.poll_once().unwrap() == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
        /// Stops the drivers however `f` ends.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        f()
    })
}

fn publisher<'p>(pool: &'p Pool, topic: &str, client: u64) -> Publisher<'p, Coherent> {
    Publisher::open(
        pool,
        Coherent,
        topic,
        &[0, 1],
        client,
        PublisherConfig::default(),
    )
    .unwrap()
}

/// Every payload `sub` delivers until it has `n`, with their total orders.
fn read(sub: &mut Subscriber<'_, Coherent>, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(Instant::now() < deadline, "got {} of {n}", out.len());
        sub.poll(16, |m| {
            out.push((m.total_order, String::from_utf8_lossy(m.payload).into()))
        })
        .unwrap();
    }
    out
}

#[test]
fn a_publisher_over_two_brokers_is_acked_for_every_message_once_in_publish_order() {
    let (_t, pool) = pool("acks");
    topic(&pool, "t", 5, 1);
    with_brokers(&pool, || {
        let mut p = publisher(&pool, "t", 7);
        // Small batches (4 KiB), so that the messages spread over both brokers.
        for i in 0..2_000 {
            p.publish(format!("{i:0100}").as_bytes()).unwrap();
        }
        assert_eq!(p.wait_acks(Duration::from_secs(20)).unwrap(), 2_000);
        // Acked in publish order: the acknowledged prefix is everything.
        assert_eq!(p.acked_prefix().unwrap(), 2_000);
        let mut sub = Subscriber::open(&pool, Coherent, "t", StartAt::Oldest).unwrap();
        let got = read(&mut sub, 2_000);
        for (i, (order, payload)) in got.iter().enumerate() {
            assert_eq!(*order, i as u64);
            assert_eq!(payload, &format!("{i:0100}"));
        }
    });
}

#[test]
fn a_message_that_cannot_fit_a_batch_is_refused_and_nothing_is_sent() {
    let (_t, pool) = pool("too-large");
    topic(&pool, "t", 5, 1);
    with_brokers(&pool, || {
        let mut p = publisher(&pool, "t", 8);
        let big = vec![b'x'; 8 << 10];
        assert!(matches!(
            p.check_size(big.len()),
            Err(PublishError::TooLarge { .. })
        ));
        assert!(matches!(
            p.publish(&big),
            Err(PublishError::TooLarge { .. })
        ));
        assert_eq!(p.wait_acks(Duration::from_secs(10)).unwrap(), 0);
        p.publish(b"fits").unwrap();
        assert_eq!(p.wait_acks(Duration::from_secs(10)).unwrap(), 1);
    });
}

#[test]
fn an_unknown_topic_is_an_error_for_publishers_and_subscribers() {
    let (_t, pool) = pool("unknown");
    let p = Publisher::open(&pool, Coherent, "nope", &[0], 1, PublisherConfig::default());
    assert!(matches!(
        p,
        Err(PublishError::Pool(PoolError::UnknownTopic(_)))
    ));
    assert!(matches!(
        Subscriber::open(&pool, Coherent, "nope", StartAt::Oldest),
        Err(PoolError::UnknownTopic(_))
    ));
}

#[test]
fn subscribers_start_at_the_oldest_the_latest_or_a_total_order() {
    let (_t, pool) = pool("start-at");
    topic(&pool, "t", 5, 1);
    with_brokers(&pool, || {
        let mut p = publisher(&pool, "t", 9);
        for i in 0..100 {
            p.publish(format!("early {i}").as_bytes()).unwrap();
        }
        p.wait_acks(Duration::from_secs(10)).unwrap();
        // Everything published is ordered once acked (ORDER 5, ACK 1).
        let mut latest = Subscriber::open(&pool, Coherent, "t", StartAt::Latest).unwrap();
        let mut middle = Subscriber::open(&pool, Coherent, "t", StartAt::TotalOrder(40)).unwrap();
        let mut oldest = Subscriber::open(&pool, Coherent, "t", StartAt::Oldest).unwrap();
        for i in 0..10 {
            p.publish(format!("late {i}").as_bytes()).unwrap();
        }
        p.wait_acks(Duration::from_secs(10)).unwrap();
        let got = read(&mut latest, 10);
        assert_eq!(got[0], (100, "late 0".to_string()));
        let got = read(&mut middle, 70);
        assert_eq!(got[0], (40, "early 40".to_string()));
        assert_eq!(got[69], (109, "late 9".to_string()));
        assert_eq!(read(&mut oldest, 110)[0], (0, "early 0".to_string()));
    });
}

#[test]
fn a_closed_session_is_released_by_its_broker_and_its_slot_serves_the_next_publisher() {
    let (_t, pool) = pool("sessions");
    topic(&pool, "t", 5, 1);
    with_brokers(&pool, || {
        // More publishers, one after another, than a broker has session slots.
        for k in 0..(SESSIONS as u64 + 8) {
            let mut p = publisher(&pool, "t", 100 + k);
            p.publish(format!("from {k}").as_bytes()).unwrap();
            assert_eq!(p.wait_acks(Duration::from_secs(10)).unwrap(), 1);
        }
        // Every slot ends released (or free): nothing a closed session held stays live.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let live = (0..2)
                .flat_map(|b| (0..SESSIONS).map(move |i| (b, i)))
                .filter(|&(b, i)| {
                    let s = pool.session(b, i).unwrap();
                    session::is_live(
                        s.state.load(Ordering::Acquire),
                        s.accepted.load(Ordering::Acquire),
                    )
                })
                .count();
            if live == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{live} sessions still live");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}
