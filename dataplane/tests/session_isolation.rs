//! One broker on a thread, an honest publisher and a rogue one over one pool: whatever the
//! rogue writes into the words its session owns, the broker keeps running (`poll_once` never
//! fails), ends or rejects the rogue alone with its reason, and the honest publisher gets
//! every ack. (The same as separate processes: tests/rogue_publishers.rs at the root.)

#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use embar_dataplane::batch::BatchDesc;
use embar_dataplane::broker::Broker;
use embar_dataplane::client::publisher::{PublishError, Publisher, PublisherConfig};
use embar_dataplane::client::Publish;
use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::layout::{MessageHeader, Session, BATCH_HEADER_VERSION};
use embar_dataplane::pool::topics::TopicConfig;
use embar_dataplane::pool::{CreateOptions, Pool};
use embar_dataplane::session::{SessionError, SESSIONS};

struct TempPool(std::path::PathBuf);
impl Drop for TempPool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pool(name: &str) -> (TempPool, Pool) {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/embar-test-isolation-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let cfg = PoolConfig {
        pool_bytes: 32 << 20,
        max_topics: 1,
        max_brokers: 1,
        ring_slots: 64,
        segment_bytes: 1 << 20,
    };
    let p = Pool::create(&path, &cfg, &CreateOptions::default()).unwrap();
    // ORDER 0, ACK 1: acked once in the pool, so no sequencer is needed.
    let topic = TopicConfig {
        order: 0,
        ack: 1,
        replication_factor: 0,
        batch_bytes: 16 << 10,
    };
    p.create_topic(Coherent, "t", &topic).unwrap();
    (TempPool(path), p)
}

/// The session of `client` on broker 0.
fn session_of(pool: &Pool, client: u64) -> &Session {
    (0..SESSIONS)
        .map(|i| pool.session(0, i).unwrap())
        .find(|s| s.client_id.load(Ordering::Relaxed) == client)
        .expect("the client's session")
}

/// A valid descriptor of one empty message at the rogue's grant, its header written.
fn one_message(pool: &Pool, p: &Publisher<'_, Coherent>, size: u32) -> BatchDesc {
    let (offset, _, used) = p.grant(0).expect("a grant");
    let h = MessageHeader {
        size,
        client_id: p.client_id(),
        batch_seq: 1,
        ..MessageHeader::default()
    };
    let dst = pool.data_ptr(offset + used, 64).unwrap();
    // SAFETY: 64 bytes of this publisher's own grant, past its acked batch, 64-byte aligned.
    unsafe { dst.cast::<MessageHeader>().write(h) };
    BatchDesc {
        batch_seq: 1,
        client_id: p.client_id(),
        num_msg: 1,
        broker_id: 0,
        total_size: 64,
        log_idx: offset + used,
        start_logical_offset: 0,
        version_flags: u64::from(BATCH_HEADER_VERSION),
    }
}

/// The rogue's error, waited for with a deadline.
fn rejection(p: &mut Publisher<'_, Coherent>) -> &'static str {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match p.acked() {
            Err(PublishError::Rejected { reason, .. }) => return reason,
            Err(e) => panic!("{e}"),
            Ok(_) => assert!(Instant::now() < deadline, "the rogue was never stopped"),
        }
        std::thread::yield_now();
    }
}

fn run(fault: &str, want: SessionError) {
    let (_t, pool) = pool(fault);
    let stop = AtomicBool::new(false);
    /// Stops the broker however the test ends, so a failure is reported, not a hang.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let broker = scope.spawn(|| {
            let mut b = Broker::new(&pool, Coherent, 0).unwrap();
            while !stop.load(Ordering::Relaxed) {
                b.poll_once()
                    .expect("nothing a session writes stops the broker");
            }
            b.stats()
        });
        let cfg = PublisherConfig::default();
        let mut honest = Publisher::open(&pool, Coherent, "t", &[0], 1, cfg).unwrap();
        let mut rogue = Publisher::open(&pool, Coherent, "t", &[0], 2, cfg).unwrap();
        rogue.publish(b"good").unwrap();
        rogue.wait_acks(Duration::from_secs(10)).unwrap();
        let s = session_of(&pool, 2);
        match fault {
            "ready" => {
                let next = s.submitted.load(Ordering::Relaxed) as usize;
                s.submissions[next % s.submissions.len()]
                    .ready
                    .store(999, Ordering::Release);
            }
            "submitted" => s.submitted.store(1 << 40, Ordering::Release),
            "grants-taken" => s.grants_taken.store(1 << 40, Ordering::Release),
            "message-size" => {
                let d = one_message(&pool, &rogue, u32::MAX);
                rogue.submit_unchecked(0, &d).unwrap();
            }
            other => panic!("{other}"),
        }
        assert_eq!(rejection(&mut rogue), want.describe(), "{fault}");
        for i in 0..2000 {
            honest.publish(format!("honest {i}").as_bytes()).unwrap();
        }
        assert_eq!(honest.wait_acks(Duration::from_secs(10)).unwrap(), 2000);
        stop.store(true, Ordering::Relaxed);
        let stats = broker.join().unwrap();
        let ended = u64::from(want == SessionError::ProtocolViolation);
        assert_eq!(stats.sessions_ended, ended, "{fault}: {stats:?}");
    });
}

#[test]
fn a_bogus_readiness_word_ends_its_session_alone() {
    run("ready", SessionError::ProtocolViolation);
}

#[test]
fn a_submitted_counter_past_the_ring_ends_its_session_alone() {
    run("submitted", SessionError::ProtocolViolation);
}

#[test]
fn grants_taken_past_the_grants_issued_ends_its_session_alone() {
    run("grants-taken", SessionError::ProtocolViolation);
}

#[test]
fn a_message_size_of_u32_max_is_rejected_and_never_acked() {
    run("message-size", SessionError::BadMessage);
}
