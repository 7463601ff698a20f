//! The shm (pool-direct) publisher when one of its brokers dies, with real broker processes
//! and the publisher library in this process: a broker frozen (SIGSTOP) with batches in its
//! submission ring, then killed, and
//!
//! - the publisher sends those batches again to the live broker, and every message is
//!   delivered once, in publish order;
//! - a batch whose space in the pool was overwritten meanwhile is reported lost (never sent
//!   with other bytes);
//! - a resend of a batch the sequencer had ordered already is decided `duplicate` by its
//!   broker without a ring slot, acked, and delivered once.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use embar_dataplane::batch::BatchDesc;
use embar_dataplane::client::publisher::{PublishError, Publisher, PublisherConfig};
use embar_dataplane::client::Publish;
use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::layout::{MessageHeader, BATCH_HEADER_VERSION};
use embar_dataplane::pool::{OpenOptions, Pool};
use embar_dataplane::session::SESSIONS;
use embar_test_support::{alive, freeze, serial, signal, wait_for, wait_until, Cluster};
use serde_json::Value;

fn cluster(name: &str) -> (Cluster, Pool) {
    let c = Cluster::up(name, &["--pool-bytes", "256MiB", "--segment-bytes", "4MiB"]);
    c.topic("t", &["--order", "5"]);
    let path = c.file()["pool"].as_str().unwrap().to_string();
    let pool = Pool::open(path.as_ref(), &OpenOptions::default()).unwrap();
    (c, pool)
}

fn publisher(pool: &Pool) -> Publisher<'_, Coherent> {
    Publisher::open(
        pool,
        Coherent,
        "t",
        &[0, 1],
        0x5eed_0000 + u64::from(std::process::id()),
        // One message a batch, striped over both brokers (small batches would otherwise all
        // go to the broker that runs the sequencers).
        PublisherConfig {
            small_batches_to_sequencer: false,
            ..PublisherConfig::default()
        },
    )
    .unwrap()
}

/// Publishes message `i` as a batch of its own (striped: even batches to broker 0, odd ones
/// to broker 1).
fn one_batch(p: &mut Publisher<'_, Coherent>, i: u64) {
    p.publish(format!("m {i:04}").as_bytes()).unwrap();
    p.flush().unwrap();
}

/// Polls the publisher's acknowledged prefix until it reaches `n` (or it fails).
fn acked_prefix(p: &mut Publisher<'_, Coherent>, n: u64) -> Result<(), PublishError> {
    let (mut got, mut failed) = (0, None);
    let reached = wait_for(Duration::from_secs(30), || match p.acked_prefix() {
        Ok(k) => {
            got = k;
            k >= n
        }
        Err(e) => {
            failed = Some(e);
            true
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    assert!(reached, "only {got} of {n} acknowledged");
    Ok(())
}

/// Freezes broker 1 (every thread of it stopped) and returns its pid.
fn freeze_broker_1(c: &Cluster) -> u32 {
    let pid = c.broker_pid(1);
    freeze(pid);
    pid
}

/// Kills the (frozen) broker and waits until its process is gone.
fn kill(pid: u32) {
    signal(pid, "-KILL");
    wait_until("the broker's process gone", Duration::from_secs(10), || {
        !alive(pid)
    });
}

/// Every message of the topic, in total order (the CLI subscriber, order checked).
fn delivered(c: &Cluster) -> Vec<String> {
    let out = c.run(
        &[
            "subscribe",
            "--topic",
            "t",
            "--from",
            "oldest",
            "--format",
            "jsonl",
            "--check-order",
            "--idle-timeout-s",
            "2",
        ],
        None,
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["payload"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn an_shm_publisher_sends_what_a_dead_broker_had_not_taken_to_the_live_broker() {
    let _g = serial();
    let (c, pool) = cluster("shm-failover");
    let mut p = publisher(&pool);
    for i in 0..4 {
        one_batch(&mut p, i);
    }
    acked_prefix(&mut p, 4).unwrap();
    // Broker 1 takes nothing more: batches 5, 7 and 9 stay in its submission ring, and the
    // sequencer holds 6 and 8 (broker 0's) for 5.
    let pid = freeze_broker_1(&c);
    for i in 4..10 {
        one_batch(&mut p, i);
    }
    kill(pid);
    acked_prefix(&mut p, 10).unwrap();
    assert_eq!(p.resent_batches(), 3, "batches 5, 7 and 9");
    assert_eq!(p.live_brokers(), 1);
    // Publishing goes on, to the live broker only.
    for i in 10..14 {
        one_batch(&mut p, i);
    }
    acked_prefix(&mut p, 14).unwrap();
    let want: Vec<String> = (0..14).map(|i| format!("m {i:04}")).collect();
    assert_eq!(delivered(&c), want, "every message once, in publish order");
}

#[test]
fn a_batch_whose_space_was_overwritten_before_the_resend_is_reported_lost() {
    let _g = serial();
    let (c, pool) = cluster("shm-failover-lost");
    let mut p = publisher(&pool);
    for i in 0..4 {
        one_batch(&mut p, i);
    }
    acked_prefix(&mut p, 4).unwrap();
    let (offset, _, before) = p.grant(1).expect("a grant from broker 1");
    let pid = freeze_broker_1(&c);
    for i in 4..10 {
        one_batch(&mut p, i);
    }
    let (_, _, after) = p.grant(1).expect("the same grant");
    // What a reuse of that space would leave there: other bytes.
    let dst = pool.data_ptr(offset + before, after - before).unwrap();
    // SAFETY: inside the mapping (checked just above); the broker that could read it is
    // frozen, and the bytes are this test's publisher's own batches.
    unsafe { std::ptr::write_bytes(dst, 0xAB, (after - before) as usize) };
    kill(pid);
    match acked_prefix(&mut p, 10) {
        Err(PublishError::Lost {
            broker, batch_seq, ..
        }) => {
            assert_eq!(
                (broker, batch_seq),
                (1, 5),
                "the first batch broker 1 had not taken"
            );
        }
        other => panic!("expected the batch reported lost, got {other:?}"),
    }
}

#[test]
fn a_resend_of_an_ordered_batch_is_acked_as_a_duplicate_without_a_ring_slot() {
    let _g = serial();
    let (c, pool) = cluster("shm-failover-duplicate");
    let mut p = publisher(&pool);
    for i in 0..4 {
        one_batch(&mut p, i);
    }
    acked_prefix(&mut p, 4).unwrap();
    let session = (0..SESSIONS)
        .map(|i| pool.session(0, i).unwrap())
        .find(|s| s.client_id.load(Relaxed) == p.client_id())
        .expect("the publisher's session on broker 0");
    let acked = session.acked_messages.load(Relaxed);
    // Batch 2 again (its one message), as a publisher failing over sends it.
    let (offset, _, used) = p.grant(0).expect("a grant");
    let payload = b"m 0002";
    let h = MessageHeader {
        size: payload.len() as u32,
        client_id: p.client_id(),
        batch_seq: 2,
        ..MessageHeader::default()
    };
    let dst = pool.data_ptr(offset + used, 128).unwrap();
    // SAFETY: 128 bytes of the publisher's own grant past its last batch, 64-byte aligned.
    unsafe {
        dst.cast::<MessageHeader>().write(h);
        std::ptr::copy_nonoverlapping(payload.as_ptr(), dst.add(64), payload.len());
    }
    let desc = BatchDesc {
        batch_seq: 2,
        client_id: p.client_id(),
        num_msg: 1,
        broker_id: 0,
        total_size: 128,
        log_idx: offset + used,
        start_logical_offset: 0,
        version_flags: u64::from(BATCH_HEADER_VERSION),
    };
    p.submit_unchecked(0, &desc).unwrap();
    wait_until("the resend acked", Duration::from_secs(10), || {
        session.acked_messages.load(Relaxed) == acked + 1
    });
    wait_until(
        "the broker's count of resends dropped",
        Duration::from_secs(5),
        || c.metric(0, "embar_broker_resends_dropped_total") == 1,
    );
    let want: Vec<String> = (0..4).map(|i| format!("m {i:04}")).collect();
    assert_eq!(delivered(&c), want, "delivered once");
}
