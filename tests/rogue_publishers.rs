//! Rogue publishers as real processes (`embar ring-worker rogue-publish`), one after another,
//! each writing garbage into a field its session owns, while an honest publisher and a
//! subscriber run: the honest publisher gets every ack, the subscriber every message in
//! order, the brokers keep running (same processes), and each rogue alone is stopped with
//! its reason, which its broker logs naming the session.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use embar_test_support::{exe, serial, Cluster};

/// Every fault and what the rogue is told. The first group is batches (a bad descriptor or a
/// bad message header: that batch rejected), the second words of the session (the session
/// ended).
const FAULTS: &[(&str, &str)] = &[
    ("metadata", "descriptor failed its checks"),
    ("outside-grant", "outside the log space granted"),
    // Past the end of its grant: the end of the segment too (descriptor check), or not
    // (grants are carved from shared segments: the grant check).
    (
        "past-grant",
        "descriptor failed its checks|outside the log space granted",
    ),
    ("bad-size", "descriptor failed its checks"),
    ("huge-size", "descriptor failed its checks"),
    ("wrong-client", "another client"),
    ("message-size-max", "messages failed their checks"),
    ("message-past-batch", "messages failed their checks"),
    ("ready-word", "the broker ended the session"),
    ("submitted-ahead", "the broker ended the session"),
    ("grants-taken-ahead", "the broker ended the session"),
];

#[test]
fn rogue_publishers_are_stopped_alone_while_an_honest_publisher_and_a_subscriber_go_on() {
    let _serial = serial();
    let start = Instant::now();
    let c = Cluster::up(
        "rogues",
        &["--pool-bytes", "256MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &["--batch-bytes", "64KiB"]);
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/cluster.json", c.dir)).unwrap())
            .unwrap();
    // The control process first, then the brokers.
    let brokers: Vec<u64> = file["pids"].as_array().unwrap()[1..]
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(brokers.len(), 2);

    let per_round = 200;
    let honest_total = per_round * (FAULTS.len() + 1);
    let total = honest_total + 10 * FAULTS.len();
    let sub = c.spawn(
        &[
            "subscribe",
            "--topic",
            "t",
            "--from",
            "oldest",
            "--count",
            &total.to_string(),
            "--format",
            "jsonl",
            "--idle-timeout-s",
            "20",
        ],
        None,
    );
    // Drain its output as it comes (a full pipe would stop it reading).
    let sub = std::thread::spawn(move || sub.wait_with_output().unwrap());
    // The honest publisher's input stays open while the rogues run.
    let mut honest = Command::new(exe())
        .args(["publish", "--topic", "t", "--control", &c.control])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = honest.stdin.take().unwrap();
    let mut sent = 0;
    let mut send = |n: usize| {
        for _ in 0..n {
            writeln!(input, "honest {sent:06}").unwrap();
            sent += 1;
        }
        input.flush().unwrap();
    };
    send(per_round);
    for (fault, needle) in FAULTS {
        c.rogue_rejected(fault, needle);
        send(per_round);
    }
    drop(input);
    let out = honest.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{honest_total} acknowledged")),
        "{err}"
    );

    let sub = sub.join().unwrap();
    assert!(
        sub.status.success(),
        "{}",
        String::from_utf8_lossy(&sub.stderr)
    );
    let msgs: Vec<Value> = String::from_utf8(sub.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len(), total, "every good message, no rogue one");
    let mut next_honest = 0;
    let mut good = 0;
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["total_order"], i as u64, "total orders 0..N-1");
        let payload = m["payload"].as_str().unwrap();
        if let Some(k) = payload.strip_prefix("honest ") {
            assert_eq!(k, format!("{next_honest:06}"), "the honest lines in order");
            next_honest += 1;
        } else {
            assert!(payload.starts_with("good "), "{payload}");
            good += 1;
        }
    }
    assert_eq!((next_honest, good), (honest_total, 10 * FAULTS.len()));

    for pid in &brokers {
        assert!(
            embar_sys::process::alive(*pid as i32),
            "broker {pid} still runs"
        );
    }
    let logs: String = (0..2)
        .map(|b| std::fs::read_to_string(format!("{}/broker-{b}.log", c.dir)).unwrap_or_default())
        .collect();
    let ended: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("session ended"))
        .collect();
    assert_eq!(ended.len(), 3, "{ended:#?}");
    for (line, word) in ended
        .iter()
        .zip(["ready=999", "submitted counter", "grants_taken"])
    {
        assert!(
            line.contains(word) && line.contains("session") && line.contains("client"),
            "{line}"
        );
    }
    for reason in ["lies past the batch", "larger than the message limit"] {
        assert!(logs.contains(reason), "{reason} logged");
    }
    assert!(!logs.contains("bad log range"), "{logs}");
    eprintln!("took {:?}", start.elapsed());
}
