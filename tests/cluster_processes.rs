//! The running system on one machine, as real processes: `embar cluster up` (control process,
//! two brokers, the sequencer), publishers and subscribers as separate processes.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use embar_test_support::{exe, lines, serial, Cluster, Lines};

/// A subscriber of `topic` that registers, pauses `pause_ms`, then reads `n` messages, and a
/// publisher of `n` 1 KiB lines started just after it. Returns the publisher's output and how
/// long it took, and the subscriber's output once it is done.
fn paused_subscriber_and_publisher(
    c: &Cluster,
    topic: &str,
    n: usize,
    pause_ms: u64,
) -> (std::process::Output, Duration, std::process::Output) {
    let (count, pause) = (n.to_string(), pause_ms.to_string());
    let mut sub = c.spawn(
        &[
            "subscribe",
            "--topic",
            topic,
            "--count",
            &count,
            "--pause-ms",
            &pause,
        ],
        None,
    );
    let mut err = Lines::stderr(&mut sub);
    err.wait_for("subscriber registered", Duration::from_secs(20));
    // Drain its output as it comes (a full pipe would stop it reading).
    let sub = std::thread::spawn(move || sub.wait_with_output().unwrap());
    let start = Instant::now();
    let publisher = c.spawn(&["publish", "--topic", topic], Some(lines("m", n, 1000)));
    let published = publisher.wait_with_output().unwrap();
    let took = start.elapsed();
    let sub = std::process::Output {
        stderr: err.all().into_bytes(),
        ..sub.join().unwrap()
    };
    (published, took, sub)
}

#[test]
fn several_publishers_and_two_subscribers_agree_and_keep_each_publishers_order() {
    let _serial = serial();
    let c = Cluster::up(
        "agree",
        &["--pool-bytes", "128MiB", "--segment-bytes", "2MiB"],
    );
    c.topic("orders", &["--order", "5", "--batch-bytes", "64KiB"]);
    let n = 3000;
    let subs: Vec<_> = (0..2)
        .map(|_| {
            c.spawn(
                &[
                    "subscribe",
                    "--topic",
                    "orders",
                    "--count",
                    &(3 * n).to_string(),
                    "--format",
                    "jsonl",
                ],
                None,
            )
        })
        // Drain each subscriber's output as it comes (a full pipe would stop it reading).
        .map(|s| std::thread::spawn(move || s.wait_with_output().unwrap()))
        .collect();
    let pubs: Vec<Child> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|p| c.spawn(&["publish", "--topic", "orders"], Some(lines(p, n, 100))))
        .collect();
    for p in pubs {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{n} acknowledged")));
    }
    let outs: Vec<String> = subs
        .into_iter()
        .map(|s| {
            let out = s.join().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
        .collect();
    assert_eq!(outs[0], outs[1], "both subscribers saw the same sequence");
    let msgs: Vec<Value> = outs[0]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len(), 3 * n);
    let mut next = std::collections::HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["total_order"], i as u64, "total orders 0..N-1");
        let payload = m["payload"].as_str().unwrap();
        let mut parts = payload.split(' ');
        let (who, k): (&str, usize) = (
            parts.next().unwrap(),
            parts.next().unwrap().parse().unwrap(),
        );
        let want = next.entry(who.to_string()).or_insert(0usize);
        assert_eq!(k, *want, "{who}'s lines in order");
        *want += 1;
    }
    assert_eq!(next.len(), 3);
}

#[test]
fn a_rogue_batch_is_rejected_with_its_reason_and_nothing_else_is_touched() {
    let _serial = serial();
    let c = Cluster::up(
        "rogue",
        &["--pool-bytes", "64MiB", "--segment-bytes", "1MiB"],
    );
    c.topic("t", &["--batch-bytes", "64KiB"]);
    let honest = c.spawn(&["publish", "--topic", "t"], Some(lines("honest", 500, 50)));
    for (fault, needle) in [
        ("metadata", "descriptor failed its checks"),
        ("outside-grant", "outside the log space granted"),
        // Past its grant's end: past the segment (the descriptor's checks) or inside it, past
        // the grant (grants are carved from shared segments).
        (
            "past-grant",
            "outside the log space granted|descriptor failed its checks",
        ),
        ("bad-size", "descriptor failed its checks"),
        ("wrong-client", "another client"),
    ] {
        c.rogue_rejected(fault, needle);
    }
    let out = honest.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Everything good is there, in order: the 500 honest lines and each rogue's 10 good ones.
    let (ok, text, err) = c.embar(&[
        "subscribe",
        "--topic",
        "t",
        "--count",
        "550",
        "--idle-timeout-s",
        "5",
    ]);
    assert!(ok, "{err}");
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(
        got.len(),
        550,
        "no rogue batch was published, nothing good was lost"
    );
    assert_eq!(got.iter().filter(|l| l.starts_with("honest")).count(), 500);
    assert_eq!(got.iter().filter(|l| l.starts_with("good")).count(), 50);
}

#[test]
fn a_publisher_blocked_on_credits_resumes_when_the_slow_subscriber_catches_up() {
    let _serial = serial();
    // About 15 segments of 1 MiB; 24 MiB of messages cannot fit while a subscriber holds
    // the oldest.
    let c = Cluster::up(
        "credits",
        &[
            "--pool-bytes",
            "24MiB",
            "--segment-bytes",
            "1MiB",
            "--max-topics",
            "2",
        ],
    );
    c.topic("slow", &["--batch-bytes", "64KiB"]);
    let (n, pause_ms) = (24_000, 3000);
    let (out, took, sub) = paused_subscriber_and_publisher(&c, "slow", n, pause_ms);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took > Duration::from_millis(pause_ms - 300),
        "the publisher finished in {took:?}: it never waited for the subscriber"
    );
    assert!(sub.status.success());
    let text = String::from_utf8(sub.stdout).unwrap();
    assert_eq!(text.lines().count(), n);
    assert!(text
        .lines()
        .enumerate()
        .all(|(i, l)| l.starts_with(&format!("m {i:06} "))));
    let (_, status, _) = c.embar(&["cluster", "status", "--json"]);
    let v: Value = serde_json::from_str(&status).unwrap();
    assert!(v["pool"]["segments"].as_u64().unwrap() < 24, "{v}");
}

#[test]
fn the_benchmark_moves_ten_times_the_pool_and_checks_every_message() {
    let _serial = serial();
    let out = Command::new(exe())
        .args([
            "bench",
            "--json",
            "--publishers",
            "2",
            "--subscribers",
            "2",
            "--pool-bytes",
            "64MiB",
        ])
        .args([
            "--segment-bytes",
            "1MiB",
            "--batch-bytes",
            "256KiB",
            "--total-bytes",
            "700MiB",
        ])
        .args(["--compare-order", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{r:#}");
    assert_eq!(r["order_check"], "passed", "{r:#}");
    assert_eq!(r["comparison"]["run"]["order_check"], "passed", "{r:#}");
    assert_eq!(r["messages"], 700 * 1024);
    for key in ["throughput_gbps", "memcpy_gbps", "ratio_to_memcpy"] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r:#}");
    }
    for key in ["p50", "p99", "p999", "max"] {
        assert!(r["latency_us"][key].as_f64().unwrap() > 0.0, "{key}: {r:#}");
    }
    assert_eq!(r["config"]["transport"], "shm");
    assert_eq!(r["config"]["order"], 5);
}

#[test]
fn unknown_topic_no_cluster_and_missing_pool_are_clear_errors() {
    let _serial = serial();
    let run = |args: &[&str]| {
        let out = Command::new(exe())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&["publish", "--topic", "t", "--control", "127.0.0.1:1"]);
    assert!(
        !ok && err.contains("cannot reach the control process"),
        "{err}"
    );
    let (ok, err) = run(&["subscribe", "--topic", "t", "--control", "127.0.0.1:1"]);
    assert!(
        !ok && err.contains("cannot reach the control process"),
        "{err}"
    );
    let c = Cluster::up(
        "errors",
        &["--pool-bytes", "64MiB", "--segment-bytes", "1MiB"],
    );
    let (ok, _, err) = c.embar(&["publish", "--topic", "nope"]);
    assert!(!ok && err.contains("unknown topic \"nope\""), "{err}");
    let (ok, _, err) = c.embar(&["subscribe", "--topic", "nope"]);
    assert!(!ok && err.contains("unknown topic \"nope\""), "{err}");
    // Metrics of a broker: the endpoint its registration names.
    let (_, status, _) = c.embar(&["cluster", "status", "--json"]);
    let v: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        v["sequencer"]["slot"], 0,
        "the control process says where the sequencer runs: {v}"
    );
    let addr = v["brokers"][0]["addresses"]["metrics"]
        .as_str()
        .unwrap()
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut m = String::new();
    std::io::Read::read_to_string(&mut s, &mut m).unwrap();
    for name in [
        "batches_landed_total",
        "batches_rejected_total",
        "batches_acked_total",
        "ring_occupancy",
        "grant_waits_total",
    ] {
        assert!(m.contains(&format!("embar_broker_{name}")), "{name}: {m}");
    }
    // The pool vanishes under a running cluster: a new client gets a clear error.
    let pool = v["pool"]["path"].as_str().unwrap().to_string();
    std::fs::remove_file(&pool).unwrap();
    c.topic("late", &["--batch-bytes", "64KiB"]);
    let (ok, _, err) = c.embar(&["subscribe", "--topic", "late"]);
    assert!(!ok && err.contains(&format!("cannot open {pool}")), "{err}");
}

#[test]
fn a_subscriber_killed_while_registered_does_not_stall_the_topic() {
    let _serial = serial();
    let c = Cluster::up(
        "deadsub",
        &["--pool-bytes", "64MiB", "--segment-bytes", "1MiB"],
    );
    // One message per batch, so that the run needs more batches than the delivery ring holds.
    c.topic("tiny", &["--batch-bytes", "128"]);
    let mut sub = c.spawn(
        &["subscribe", "--topic", "tiny", "--pause-ms", "600000"],
        None,
    );
    Lines::stderr(&mut sub).wait_for("subscriber registered", Duration::from_secs(20));
    sub.kill().unwrap(); // SIGKILL: its cursor stays registered at position 0
    sub.wait().unwrap();
    let n = 12_000; // more than the 8,192 delivery entries
    let text: String = (0..n).map(|i| format!("{i}\n")).collect();
    let publisher = c.spawn(
        &["publish", "--topic", "tiny", "--wait-timeout-s", "20"],
        Some(text),
    );
    let out = publisher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{n} acknowledged")));
}

#[test]
fn past_the_retention_limit_a_slow_subscriber_errs_and_the_publisher_never_waits_for_it() {
    let _serial = serial();
    let c = Cluster::up(
        "retention",
        &[
            "--pool-bytes",
            "24MiB",
            "--segment-bytes",
            "1MiB",
            "--max-topics",
            "2",
            "--retention-bytes",
            "2MiB",
        ],
    );
    c.topic("capped", &["--batch-bytes", "64KiB"]);
    let (n, pause_ms) = (24_000, 8000);
    let (out, took, sub) = paused_subscriber_and_publisher(&c, "capped", n, pause_ms);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_millis(pause_ms - 1000),
        "the publisher waited for the paused subscriber: {took:?}"
    );
    let err = String::from_utf8_lossy(&sub.stderr);
    assert!(
        !sub.status.success(),
        "the subscriber could not have read reclaimed data"
    );
    assert!(err.contains("fell behind the retention limit"), "{err}");
    // A new subscriber from the oldest retained position starts cleanly and reads only intact,
    // contiguous messages (how many are still kept depends on how short the pool ran).
    let (ok, text, err) = c.embar(&[
        "subscribe",
        "--topic",
        "capped",
        "--from",
        "oldest",
        "--idle-timeout-s",
        "2",
    ]);
    assert!(ok, "{err}");
    let got: Vec<&str> = text.lines().collect();
    assert!(got.len() < n, "everything retained despite the limit");
    if let Some(first) = got.first() {
        let first: usize = first.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, l)| l.starts_with(&format!("m {:06} ", first + i))));
    }
}

#[test]
fn a_lingering_batch_is_sent_while_the_publisher_waits_for_more_input() {
    let _serial = serial();
    let c = Cluster::up(
        "linger",
        &["--pool-bytes", "64MiB", "--segment-bytes", "2MiB"],
    );
    c.topic("live", &[]);
    let mut publisher = Command::new(exe())
        .args(["publish", "--topic", "live", "--control", &c.control])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    writeln!(stdin, "first").unwrap();
    // stdin stays open: the batch must still be sealed and delivered after the linger time.
    let (ok, text, err) = c.embar(&[
        "subscribe",
        "--topic",
        "live",
        "--count",
        "1",
        "--idle-timeout-s",
        "10",
    ]);
    assert!(ok, "{err}");
    assert_eq!(text, "first\n");
    writeln!(stdin, "second").unwrap();
    drop(stdin);
    let out = publisher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 acknowledged"));
}

#[test]
fn when_the_sequencer_broker_dies_the_control_process_moves_it_and_publishing_goes_on() {
    let _serial = serial();
    let c = Cluster::up("failover", &[]);
    c.topic("f", &[]);
    let control = embar_control::ControlClient::new(c.control.parse().unwrap());
    let status = control.status().unwrap();
    let first = status["sequencer"]["broker_id"]
        .as_u64()
        .expect("a sequencer is assigned");
    assert_eq!(status["sequencer"]["mode"], "candidate");
    let before = c.spawn(&["publish", "--topic", "f"], Some(lines("before", 200, 10)));
    let out = before.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGKILL the broker that runs the sequencer.
    let pid = status["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"].as_u64() == Some(first))
        .and_then(|b| b["addresses"]["pid"].as_str())
        .unwrap()
        .to_string();
    assert!(Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    let s = c.wait_for_status("the sequencer to move", Duration::from_secs(20), |s| {
        s["sequencer"]["broker_id"]
            .as_u64()
            .is_some_and(|id| id != first)
    });
    let second = s["sequencer"]["broker_id"].as_u64().unwrap();
    assert_ne!(second, first);
    // The surviving broker orders and acknowledges new messages.
    let after = c.spawn(&["publish", "--topic", "f"], Some(lines("after", 200, 10)));
    let out = after.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, text, err) = c.embar(&[
        "subscribe",
        "--topic",
        "f",
        "--format",
        "jsonl",
        "--idle-timeout-s",
        "3",
    ]);
    assert!(ok, "{err}");
    let payloads: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["payload"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want: Vec<String> = lines("before", 200, 10)
        .lines()
        .chain(lines("after", 200, 10).lines())
        .map(String::from)
        .collect();
    assert_eq!(
        payloads, want,
        "every message once, in order, across the move"
    );
}

/// `(index, generation)` of every segment the table says pool slot `broker` holds.
fn held_segments(pool: &str, broker: u32) -> Vec<(u64, u64)> {
    use embar_dataplane::pool::coherence::Coherent;
    let p = embar_dataplane::pool::Pool::open(
        std::path::Path::new(pool),
        &embar_dataplane::pool::OpenOptions::default(),
    )
    .unwrap();
    (0..p.geometry().segment_count)
        .filter(|i| {
            p.segment_owner(Coherent, *i)
                .is_some_and(|o| o.broker == broker)
        })
        .map(|i| {
            let g = p.segment_table()[i as usize]
                .generation
                .load(std::sync::atomic::Ordering::Relaxed);
            (i, g)
        })
        .collect()
}

#[test]
fn a_broker_restarted_into_its_slot_reclaims_the_log_space_the_killed_process_left() {
    let _serial = serial();
    let c = Cluster::up(
        "restart",
        &[
            "--brokers",
            "1",
            "--pool-bytes",
            "64MiB",
            "--segment-bytes",
            "4MiB",
        ],
    );
    c.topic("t", &["--batch-bytes", "64KiB"]);
    let out = c
        .spawn(&["publish", "--topic", "t"], Some(lines("old", 9000, 1000)))
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let control = embar_control::ControlClient::new(c.control.parse().unwrap());
    let status = control.status().unwrap();
    let pool = status["pool"]["path"].as_str().unwrap().to_string();
    let left = held_segments(&pool, 0);
    assert!(left.len() >= 2, "{left:?}");
    let pid = status["brokers"][0]["addresses"]["pid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success());
    c.wait_for_status(
        "the killed broker to be declared dead",
        Duration::from_secs(20),
        |s| s["live_brokers"] == 0,
    );
    // A new broker process takes slot 0 (the lowest free one) and the sequencer.
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _broker = Kill(
        Command::new(exe())
            .args(["broker", "--control", &c.control])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    c.wait_for_status(
        "a new broker in slot 0 with the sequencer",
        Duration::from_secs(40),
        |s| s["sequencer"]["slot"] == 0,
    );
    // Three times the pool through it: every segment the killed process left must be freed
    // and reused on the way (a leaked one keeps its generation).
    let (ok, text, err) = c.embar(&[
        "bench",
        "--total-bytes",
        "192MiB",
        "--batch-bytes",
        "256KiB",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["order_check"], "passed", "{v}");
    let now: std::collections::HashMap<u64, u64> = held_segments(&pool, 0).into_iter().collect();
    for (i, gen) in &left {
        assert!(
            now.get(i).is_none_or(|g| g != gen),
            "segment {i} (generation {gen}) of the killed process was never reclaimed"
        );
    }
    // The old messages are still readable where they were not reclaimed; the topic works.
    let out = c
        .spawn(&["publish", "--topic", "t"], Some(lines("new", 10, 10)))
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
