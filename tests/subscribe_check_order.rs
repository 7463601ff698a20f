//! `embar subscribe --check-order` on real processes: subscribers over shm and TCP that check
//! every message while publishers write, one that starts part-way through the log, and the
//! topic whose order cannot be checked (ORDER 1) refused up front.

use std::process::Output;

use serde_json::Value;

use embar_test_support::{lines, order_check_passed as summary, serial, Cluster};

/// The summary line a passing check prints on stderr.
fn jsonl(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn checked_subscribers_pass_on_a_topic_written_by_several_publishers() {
    let _serial = serial();
    let c = Cluster::up(
        "check-order",
        &["--pool-bytes", "128MiB", "--segment-bytes", "2MiB"],
    );
    c.topic("t", &["--order", "5", "--batch-bytes", "16KiB"]);
    let n = 3000;
    let total = (3 * n).to_string();
    let checked = |transport: &str, from: &str, count: &str| {
        c.spawn(
            &[
                "subscribe",
                "--topic",
                "t",
                "--transport",
                transport,
                "--from",
                from,
                "--count",
                count,
                "--format",
                "jsonl",
                "--check-order",
            ],
            None,
        )
    };
    // Both read while the publishers write; a full pipe would stop them, so each is drained
    // as it goes.
    let subs: Vec<_> = ["shm", "tcp"]
        .iter()
        .map(|t| checked(t, "oldest", &total))
        .map(|s| std::thread::spawn(move || s.wait_with_output().unwrap()))
        .collect();
    let pubs: Vec<_> = [("alpha", "shm"), ("beta", "shm"), ("gamma", "tcp")]
        .iter()
        .map(|(p, t)| {
            c.spawn(
                &["publish", "--topic", "t", "--transport", t],
                Some(lines(p, n, 100)),
            )
        })
        .collect();
    for p in pubs {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for s in subs {
        let out = s.join().unwrap();
        assert_eq!(
            summary(&out),
            format!("order check passed: {total} messages, 3 publishers")
        );
        assert_eq!(jsonl(&out).len(), 3 * n);
    }
    // From part-way through the log (inside a batch: 16 KiB batches hold about 90 of these
    // lines): checked from its first message on.
    let out = checked("shm", "1001", &(3 * n - 1001).to_string())
        .wait_with_output()
        .unwrap();
    assert_eq!(
        summary(&out),
        format!(
            "order check passed: {} messages, 3 publishers",
            3 * n - 1001
        )
    );
    assert_eq!(jsonl(&out)[0]["total_order"], 1001);
}

#[test]
fn order_1_topics_are_refused_as_having_no_total_order_to_check() {
    let _serial = serial();
    let c = Cluster::up(
        "check-order-1",
        &["--pool-bytes", "64MiB", "--segment-bytes", "2MiB"],
    );
    c.topic("per-broker", &["--order", "1"]);
    let out = c.run(
        &["subscribe", "--topic", "per-broker", "--check-order"],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ORDER 1"), "{err}");
}
