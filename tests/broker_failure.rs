//! Brokers killed under ACK 2 load (ORDER 5, RF 2, three brokers), with real processes: a TCP
//! publisher and an shm (pool-direct) one, fed for as long as the test runs, resend what a
//! dead broker had not acked to the live ones, and finish with exit 0 and every message
//! acknowledged; a subscriber then reads
//! every message exactly once, in total order, each publisher's in its order
//! (`--check-order`, and checked again here).
//!
//! - A broker killed, restarted once declared dead, then another killed and restarted.
//! - The broker that runs the sequencer killed and never restarted: the sequencer moves, and
//!   the dead slot is re-placed in the replica sets so ACK 2 goes on.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use embar_test_support::{cmdline, serial, signal, wait_until, Cluster, FedPublisher};
use serde_json::Value;

fn cluster(name: &str, replace_after_ms: &str) -> Cluster {
    let c = Cluster::up(
        name,
        &[
            "--brokers",
            "3",
            "--max-brokers",
            "3",
            "--pool-bytes",
            "256MiB",
            "--sync-interval-ms",
            "20",
            "--tcp-idle-timeout-ms",
            "1000",
            "--replace-after-ms",
            replace_after_ms,
        ],
    );
    c.topic(
        "t",
        &[
            "--order",
            "5",
            "--ack",
            "2",
            "--rf",
            "2",
            "--batch-bytes",
            "16KiB",
        ],
    );
    c
}

fn publisher(c: &Cluster, who: &'static str, transport: &str) -> FedPublisher {
    FedPublisher::start(c, "t", who, transport, &["--ack-timeout-s", "120"], 500)
}

/// Waits for the publisher: exit 0 and every line it was fed acknowledged.
fn finished(f: FedPublisher) -> usize {
    let (n, out) = f.finish();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{n} acknowledged")),
        "{n} lines fed: {err}"
    );
    n
}

/// Bytes broker `slot`'s disk log of the topic holds (every segment).
fn log_bytes(c: &Cluster, slot: u64) -> u64 {
    std::fs::read_dir(format!("{}/broker-{slot}/topic-t", c.dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// SIGKILLs the broker of `slot` once its disk log has grown by 256 KiB (the run is under
/// way), and waits until the control process declares it dead; returns its command line.
fn kill(c: &Cluster, slot: u64) -> Vec<String> {
    let before = log_bytes(c, slot);
    wait_until(
        "the broker appends the run's batches",
        Duration::from_secs(60),
        || log_bytes(c, slot) > before + (256 << 10),
    );
    let pid = c.broker_pid(slot as u32);
    let args = cmdline(pid);
    signal(pid, "-KILL");
    wait_until("the broker declared dead", Duration::from_secs(20), || {
        !c.slot_live(slot as u32)
    });
    args
}

/// Starts a broker again as it was, into its slot and data directory.
fn restart(c: &Cluster, slot: u64, args: &[String], n: usize) -> Child {
    let log = std::fs::File::create(format!("{}/broker-{slot}-restart-{n}.log", c.dir)).unwrap();
    let child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until(
        "the broker back in its slot",
        Duration::from_secs(30),
        || c.slot_live(slot as u32),
    );
    child
}

/// Reads the whole topic (`--check-order` on) and checks it: total orders 0..N-1, every fed
/// line once, each publisher's in its order.
fn check_delivery(c: &Cluster, fed: &[(&str, usize)]) {
    let total: usize = fed.iter().map(|(_, n)| n).sum();
    let out = c.run(
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
            "--check-order",
            "--idle-timeout-s",
            "60",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut count = 0usize;
    for (i, l) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
        let m: Value = serde_json::from_str(l).unwrap();
        assert_eq!(m["total_order"], i as u64, "no gap, no duplicate");
        let payload = m["payload"].as_str().unwrap();
        let mut parts = payload.split(' ');
        let who = parts.next().unwrap().to_string();
        let k: usize = parts.next().unwrap().parse().unwrap();
        let want = next.entry(who.clone()).or_insert(0);
        assert_eq!(k, *want, "{who}'s lines once each, in its order");
        *want += 1;
        count += 1;
    }
    assert_eq!(count, total);
    for (who, n) in fed {
        assert_eq!(next.get(*who).copied(), Some(*n), "{who}");
    }
}

#[test]
fn ack_2_publishers_lose_nothing_when_a_broker_is_killed_and_then_another_after_it_is_back() {
    let _g = serial();
    // Never re-placed: the ACK 2 batches that need a dead broker wait for it to come back.
    let c = cluster("failure-kills", "0");
    let pubs = [
        ("a", publisher(&c, "a", "tcp")),
        ("b", publisher(&c, "b", "shm")),
    ];
    let args = kill(&c, 2);
    let mut first = restart(&c, 2, &args, 1);
    let args = kill(&c, 1);
    let mut second = restart(&c, 1, &args, 2);
    for (_, p) in &pubs {
        p.stop();
    }
    let fed: Vec<(&str, usize)> = pubs.into_iter().map(|(w, f)| (w, finished(f))).collect();
    check_delivery(&c, &fed);
    for b in [&mut first, &mut second] {
        let _ = b.kill();
        let _ = b.wait();
    }
}

#[test]
fn ack_2_publishers_lose_nothing_when_the_sequencers_broker_is_killed_for_good() {
    let _g = serial();
    let c = cluster("failure-sequencer", "1500");
    let seq = c.status()["sequencer"]["slot"]
        .as_u64()
        .expect("a sequencer assigned");
    let pubs = [
        ("a", publisher(&c, "a", "tcp")),
        ("b", publisher(&c, "b", "shm")),
    ];
    kill(&c, seq);
    c.wait_for_status("the sequencer moved", Duration::from_secs(20), |s| {
        s["sequencer"]["slot"].as_u64().is_some_and(|x| x != seq)
    });
    // The dead slot is re-placed (its batches had no other way to become durable on two
    // disks), and publishing goes on for a while after.
    wait_until("the dead slot re-placed", Duration::from_secs(20), || {
        std::fs::read_to_string(format!("{}/control.log", c.dir))
            .unwrap_or_default()
            .contains(&format!("broker slot {seq} has had no live broker"))
    });
    let grown = log_bytes(&c, (seq + 1) % 3);
    wait_until("the run goes on", Duration::from_secs(60), || {
        log_bytes(&c, (seq + 1) % 3) > grown + (256 << 10)
    });
    for (_, p) in &pubs {
        p.stop();
    }
    let fed: Vec<(&str, usize)> = pubs.into_iter().map(|(w, f)| (w, finished(f))).collect();
    check_delivery(&c, &fed);
}
