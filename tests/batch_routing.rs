//! Where the shm publisher sends its batches, with real broker processes and the publisher
//! library in this process: after a small batch (sealed by `flush` or linger at less than
//! half the batch size) to the broker whose process runs the sequencers, which says so in the
//! pool; full batches striped over every broker; and striped always with the option off.

use std::time::Duration;

use embar_dataplane::client::publisher::{Publisher, PublisherConfig};
use embar_dataplane::client::Publish;
use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::{OpenOptions, Pool};
use embar_test_support::{serial, wait_until, Cluster};

const BATCH_BYTES: usize = 256 << 10;

/// A publisher to both brokers, the one that runs the sequencers second (so that sending
/// every batch to the first link, or to the previous batch's, is not taken for the feature).
fn publisher(pool: &Pool, seq: u32, id: u64, to_sequencer: bool) -> Publisher<'_, Coherent> {
    let cfg = PublisherConfig {
        small_batches_to_sequencer: to_sequencer,
        ..PublisherConfig::default()
    };
    Publisher::open(pool, Coherent, "t", &[1 - seq, seq], id, cfg).unwrap()
}

/// Batches that landed on each broker so far (the brokers' metrics), once they add up to
/// `total`.
fn landed(c: &Cluster, total: u64) -> [u64; 2] {
    let mut per = [0; 2];
    wait_until(
        &format!("{total} batches counted by the brokers"),
        Duration::from_secs(10),
        || {
            per = [0, 1].map(|b| c.metric(b, "embar_broker_batches_landed_total"));
            per[0] + per[1] == total
        },
    );
    per
}

/// `n` batches of one message each (a flush after each), all acknowledged.
fn one_message_batches(p: &mut Publisher<'_, Coherent>, n: u64) {
    for i in 0..n {
        p.publish(format!("message {i}").as_bytes()).unwrap();
        p.flush().unwrap();
    }
    all_acked(p);
}

fn all_acked(p: &mut Publisher<'_, Coherent>) {
    let n = p.sealed_messages();
    wait_until(
        "every message acknowledged",
        Duration::from_secs(30),
        || p.acked_prefix().unwrap() >= n,
    );
}

#[test]
fn small_batches_go_to_the_broker_that_runs_the_sequencers_and_full_ones_are_striped() {
    let _g = serial();
    let c = Cluster::up(
        "batch-routing",
        &["--pool-bytes", "256MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &["--order", "5", "--batch-bytes", "256KiB"]);
    let path = c.file()["pool"].as_str().unwrap().to_string();
    let pool = Pool::open(path.as_ref(), &OpenOptions::default()).unwrap();
    let mut seq = None;
    wait_until(
        "a broker says in the pool that it runs the sequencers",
        Duration::from_secs(10),
        || {
            seq = (0..2u32).find(|&b| pool.broker_sequencing(Coherent, b));
            seq.is_some()
        },
    );
    let seq = seq.unwrap() as usize;
    assert!(
        !pool.broker_sequencing(Coherent, 1 - seq as u32),
        "only one broker runs the sequencers"
    );

    // Forty one-message batches: the first goes to the first link (nothing was sealed
    // before it), every later one follows a small batch.
    let mut p = publisher(&pool, seq as u32, 0x7007_0001, true);
    one_message_batches(&mut p, 40);
    let small = landed(&c, 40);
    assert_eq!(
        (small[seq], small[1 - seq]),
        (39, 1),
        "small batches on the sequencer's broker {seq} after the first: {small:?}"
    );

    // Sixteen batches' worth of 16 KiB messages: full batches, striped.
    let message = vec![b'x'; 16 << 10];
    for _ in 0..16 * BATCH_BYTES / message.len() {
        p.publish(&message).unwrap();
    }
    p.flush().unwrap();
    all_acked(&mut p);
    let full = landed(&c, p.batches_sealed());
    let more = [full[0] - small[0], full[1] - small[1]];
    assert!(
        more[0] >= 6 && more[1] >= 6,
        "full batches striped over both brokers: {more:?}"
    );

    // With the option off, small batches are striped too.
    let mut q = publisher(&pool, seq as u32, 0x7007_0002, false);
    one_message_batches(&mut q, 40);
    let striped = landed(&c, p.batches_sealed() + 40);
    assert_eq!(
        [striped[0] - full[0], striped[1] - full[1]],
        [20, 20],
        "striped one by one"
    );
}
