//! The verbs transport as real processes on a real RDMA device (rxe in the test VM, run by
//! `scripts/rxe-test.sh`): brokers with `--verbs`, verbs publishers, shm and verbs
//! subscribers, and rogue verbs clients.
//!
//! Without a device (or without `RDMA_IP`, the address brokers listen on) these tests print
//! why and pass, unless `EMBAR_REQUIRE_RDMA=1` (set in the VM), where that fails them.
//! `EMBAR_BIN` overrides the `embar` binary (the VM mounts the host's build elsewhere).
#![cfg(feature = "verbs")]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use embar_dataplane::client::subscriber::StartAt;
use embar_dataplane::verbs::subscriber::{VerbsSubscriber, VerbsSubscriberConfig};

use serde_json::Value;

use embar_test_support::{
    alive, exe, freeze, lines, serial, signal, succeeded, wait_for, wait_until, Cluster,
    FedPublisher,
};

/// The IP brokers listen on for verbs, when a device is usable.
fn rdma_ip() -> Option<String> {
    let required = std::env::var("EMBAR_REQUIRE_RDMA").as_deref() == Ok("1");
    let ip = std::env::var("RDMA_IP").ok();
    let device = embar_sys::verbs::Context::open(
        std::env::var("RDMA_DEVICE").ok().as_deref(),
        std::env::var("RDMA_GID_INDEX")
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(1),
    );
    match (ip, device) {
        (Some(ip), Ok(_)) => Some(ip),
        (ip, dev) => {
            let why = match dev {
                Err(e) => e.to_string(),
                Ok(_) => format!("RDMA_IP is not set ({ip:?})"),
            };
            assert!(!required, "EMBAR_REQUIRE_RDMA=1 but: {why}");
            eprintln!("skipped: {why}; scripts/rxe-test.sh runs this in a VM with rxe");
            None
        }
    }
}

/// A cluster whose brokers also take verbs publishers on `ip`.
fn up_verbs(name: &str, ip: &str) -> Cluster {
    Cluster::up(
        &format!("verbs-{name}"),
        &[
            "--verbs",
            ip,
            "--pool-bytes",
            "256MiB",
            "--segment-bytes",
            "4MiB",
        ],
    )
}

/// What the verbs tests do with a cluster beyond the common harness.
trait VerbsCluster {
    fn publish_verbs(&self, topic: &str, lines: String) -> Child;
    fn read_all(&self, topic: &str) -> Vec<Value>;
    fn wait_metric(&self, name: &str, want: u64);
    fn broker_logs(&self) -> String;
    fn rogue(&self, topic: &str, fault: &str) -> Value;
}

impl VerbsCluster for Cluster {
    fn publish_verbs(&self, topic: &str, lines: String) -> Child {
        self.spawn(
            &["publish", "--topic", topic, "--transport", "verbs"],
            Some(lines),
        )
    }

    /// Every message of `topic` (shm subscriber), stopping after 3 s without one.
    fn read_all(&self, topic: &str) -> Vec<Value> {
        let out = self.run(
            &[
                "subscribe",
                "--topic",
                topic,
                "--format",
                "jsonl",
                "--idle-timeout-s",
                "3",
            ],
            None,
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits (10 s at most) until metric `name` reaches `want`: brokers refresh their
    /// metrics every 100 ms.
    fn wait_metric(&self, name: &str, want: u64) {
        if !wait_for(Duration::from_secs(10), || self.metric_sum(name) >= want) {
            panic!("{name} stayed below {want}: {}", self.broker_logs());
        }
    }

    fn broker_logs(&self) -> String {
        (0..2)
            .map(|b| {
                std::fs::read_to_string(format!("{}/broker-{b}.log", self.dir)).unwrap_or_default()
            })
            .collect()
    }

    /// Runs a rogue verbs publisher with `fault`; its JSON report.
    fn rogue(&self, topic: &str, fault: &str) -> Value {
        let out = self.run(
            &[
                "ring-worker",
                "rogue-publish",
                "--topic",
                topic,
                "--transport",
                "verbs",
                "--fault",
                fault,
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// The sum of metric `name` at one broker's Prometheus endpoint.
fn payloads(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn verbs_publishers_and_subscribers_agree_nothing_lost_or_duplicated() {
    let Some(ip) = rdma_ip() else { return };
    let _s = serial();
    let c = up_verbs("agree", &ip);
    c.topic("t", &[]);
    let pubs: Vec<Child> = ["a", "b"]
        .iter()
        .map(|p| c.publish_verbs("t", lines(p, 400, 200)))
        .collect();
    let shm = c.spawn(&["publish", "--topic", "t"], Some(lines("s", 200, 200)));
    for p in pubs.into_iter().chain([shm]) {
        succeeded(p);
    }
    let first = c.read_all("t");
    let second = c.read_all("t");
    assert_eq!(first.len(), 1000, "every message once");
    assert_eq!(first, second, "two subscribers see the same sequence");
    for p in ["a", "b", "s"] {
        let mine: Vec<String> = payloads(&first)
            .into_iter()
            .filter(|l| l.starts_with(&format!("{p} ")))
            .collect();
        let want: Vec<String> = lines(p, if p == "s" { 200 } else { 400 }, 200)
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(mine, want, "publisher {p}: all, once, in its order");
    }
    let orders: Vec<u64> = first
        .iter()
        .map(|m| m["total_order"].as_u64().unwrap())
        .collect();
    assert!(
        orders.windows(2).all(|w| w[1] == w[0] + 1),
        "dense total order"
    );
    c.wait_metric("embar_broker_verbs_batches_forwarded_total", 2);
    c.wait_metric("embar_broker_verbs_sessions_opened_total", 4);
    assert_eq!(c.metric_sum("embar_broker_verbs_sessions_opened_total"), 4);
}

#[test]
fn a_write_past_the_grant_fails_at_the_nic_and_nothing_else_is_touched() {
    let Some(ip) = rdma_ip() else { return };
    let _s = serial();
    let c = up_verbs("rogue", &ip);
    c.topic("t", &[]);
    let honest = c.publish_verbs("t", lines("h", 300, 200));
    let v = c.rogue("t", "write-past-grant");
    assert_eq!(v["rejected"], true, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("outside the space the broker granted"),
        "{err}"
    );
    succeeded(honest);
    // The brokers still serve new sessions.
    succeeded(c.publish_verbs("t", lines("late", 100, 200)));
    let got = payloads(&c.read_all("t"));
    assert_eq!(
        got.len(),
        300 + 10 + 100,
        "{:?}",
        &got[got.len().saturating_sub(3)..]
    );
    assert_eq!(got.iter().filter(|l| l.starts_with("good ")).count(), 10);
    assert!(got
        .iter()
        .all(|l| l.starts_with("h ") || l.starts_with("good ") || l.starts_with("late ")));
}

#[test]
fn an_immediate_naming_no_staging_slot_or_a_descriptor_outside_the_grants_is_rejected() {
    let Some(ip) = rdma_ip() else { return };
    let _s = serial();
    let c = up_verbs("imm", &ip);
    c.topic("t", &[]);
    for (fault, reason) in [
        ("bad-immediate", "immediate"),
        ("unknown-grant", "outside the log space granted"),
    ] {
        let v = c.rogue("t", fault);
        assert_eq!(v["rejected"], true, "{fault}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains(reason),
            "{fault}: {v}"
        );
    }
    c.wait_metric("embar_broker_verbs_bad_immediates_total", 1);
    succeeded(c.publish_verbs("t", lines("h", 50, 200)));
    assert_eq!(
        c.read_all("t").len(),
        2 * 10 + 50,
        "the good messages, and no rogue one"
    );
}

#[test]
fn a_session_that_vanishes_mid_batch_publishes_nothing_half_written() {
    let Some(ip) = rdma_ip() else { return };
    let _s = serial();
    let c = up_verbs("vanish", &ip);
    c.topic("t", &[]);
    let v = c.rogue("t", "vanish");
    assert_eq!(v["vanished"], true, "{v}");
    // Each broker (the rogue had a session with both) notices the connection's end and
    // closes the pool session.
    c.wait_metric("embar_broker_verbs_sessions_closed_total", 2);
    assert_eq!(c.metric_sum("embar_broker_verbs_sessions_open"), 0);
    succeeded(c.publish_verbs("t", lines("h", 100, 200)));
    let got = payloads(&c.read_all("t"));
    assert_eq!(
        got.len(),
        10 + 100,
        "only whole, announced batches are published"
    );
    assert!(got
        .iter()
        .all(|l| l.starts_with("good ") || l.starts_with("h ")));
}

#[test]
fn unknown_topic_and_unreachable_broker_are_clear_errors() {
    let Some(ip) = rdma_ip() else { return };
    let _s = serial();
    let c = up_verbs("errors", &ip);
    let out = c
        .publish_verbs("nope", "x\n".into())
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "{err}");
    // A broker killed a moment ago is still listed (not yet declared dead): its verbs port
    // refuses the connection.
    c.topic("t", &[]);
    let status = embar_control::ControlClient::new(c.control.parse().unwrap())
        .status()
        .unwrap();
    let pid: u32 = status["brokers"][1]["addresses"]["pid"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    signal(pid, "-KILL");
    wait_until("the killed broker's exit", Duration::from_secs(10), || {
        !alive(pid)
    });
    let out = c
        .publish_verbs("t", "x\n".into())
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to its verbs port"), "{err}");
}

/// Where no device is usable: a broker asked for `--verbs` and a verbs publisher fail at
/// once, saying so. (Runs on hosts without RDMA; in the VM it says why it skips.)
#[test]
fn without_a_device_broker_and_publisher_say_so() {
    if embar_sys::verbs::Context::open(None, 1).is_ok() {
        eprintln!("skipped: this host has a usable RDMA device");
        return;
    }
    let out = Command::new(exe())
        .args([
            "broker",
            "--control",
            "127.0.0.1:1",
            "--verbs",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The control process is not running either; whichever is found first is named.
    assert!(
        err.contains("RDMA device") || err.contains("control"),
        "{err}"
    );
    let dir = format!("/tmp/embar-verbs-nodev-{}", std::process::id());
    let up = Command::new(exe())
        .args([
            "cluster",
            "up",
            "--brokers",
            "1",
            "--dir",
            &dir,
            "--pool-bytes",
            "64MiB",
            "--segment-bytes",
            "4MiB",
            "--verbs",
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    let _ = Command::new(exe())
        .args(["cluster", "down", "--dir", &dir])
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !up.status.success(),
        "a broker started with --verbs and no device"
    );
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(err.contains("no RDMA device"), "{err}");
}

#[test]
fn a_deleted_topic_ends_its_verbs_sessions_and_the_publisher_hears_why() {
    let Some(ip) = rdma_ip() else { return };
    let _s = serial();
    let c = up_verbs("deleted", &ip);
    c.topic("t", &[]);
    let mut p = Command::new(exe())
        .args([
            "publish",
            "--topic",
            "t",
            "--transport",
            "verbs",
            "--control",
            &c.control,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = p.stdin.take().unwrap();
    input
        .write_all(lines("before", 20, 200).as_bytes())
        .unwrap();
    c.wait_metric("embar_broker_verbs_batches_forwarded_total", 1);
    let out = c.run(&["topic", "delete", "t"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Brokers notice a deleted topic within their 100 ms topic check.
    c.wait_metric("embar_broker_verbs_sessions_closed_total", 2);
    let _ = input.write_all(lines("after", 20, 200).as_bytes());
    drop(input);
    let out = p.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "publishing to a deleted topic succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ended the session") || err.contains("RDMA write"),
        "{err}"
    );
}

/// The live brokers' verbs ports and pids, in slot order.
fn verbs_brokers(c: &Cluster) -> Vec<(SocketAddr, u32)> {
    let status = c.status();
    let mut v: Vec<(u64, SocketAddr, u32)> = status["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["alive"] == true)
        .map(|b| {
            let a = &b["addresses"];
            (
                b["slot"].as_u64().unwrap(),
                a["verbs"].as_str().unwrap().parse().unwrap(),
                a["pid"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, a, p)| (a, p)).collect()
}

/// A verbs subscriber through the library, on the device the tests use, with a small ring
/// (so that a stream of a few megabytes wraps it many times).
fn verbs_subscriber(brokers: &[SocketAddr], ring_bytes: u64) -> VerbsSubscriber {
    let cfg = VerbsSubscriberConfig {
        device: std::env::var("RDMA_DEVICE").ok(),
        gid_index: std::env::var("RDMA_GID_INDEX")
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(1),
        ring_bytes,
    };
    VerbsSubscriber::connect(brokers, "t", StartAt::Oldest, Duration::from_secs(20), &cfg)
        .expect("a verbs subscriber")
}

/// With a device: the test's turn, and a cluster taking verbs clients (brokers started with
/// `extra` too) with an ORDER 5 topic `t`.
fn ordered_verbs_cluster(
    name: &str,
    extra: &[&str],
) -> Option<(std::sync::MutexGuard<'static, ()>, Cluster)> {
    let ip = rdma_ip()?;
    let turn = serial();
    let mut args = vec![
        "--verbs",
        &ip,
        "--pool-bytes",
        "256MiB",
        "--segment-bytes",
        "4MiB",
    ];
    args.extend(extra);
    let c = Cluster::up(&format!("verbs-{name}"), &args);
    c.topic("t", &["--order", "5"]);
    Some((turn, c))
}

/// Publishes `lines(tag, n, width)` over verbs and waits for every ack.
fn publish_verbs_all(c: &Cluster, tag: &str, n: usize, width: usize) {
    succeeded(c.publish_verbs("t", lines(tag, n, width)));
}

#[test]
fn a_verbs_subscriber_gets_every_message_once_in_total_order() {
    let Some((_turn, c)) = ordered_verbs_cluster("sub", &[]) else {
        return;
    };
    // The subscriber first, from total order 0, and its cursor registered before anything
    // is published: a subscriber that comes later starts at the oldest batch the delivery
    // ring still holds, and under TCG the publishers' batches linger out small (more than
    // the ring's 8,192 entries for these 45,000 messages), so a late one waited for ever.
    let sub = c.spawn(
        &[
            "subscribe",
            "--topic",
            "t",
            "--transport",
            "verbs",
            "--from",
            "0",
            "--check-order",
            "--count",
            "45000",
            "--format",
            "jsonl",
        ],
        None,
    );
    // Drained as it comes: a full pipe would stop the subscriber, hold the delivery ring and
    // so the publishers.
    let sub = std::thread::spawn(move || sub.wait_with_output().unwrap());
    let pool = {
        use embar_dataplane::pool::{OpenOptions, Pool};
        let path = c.file()["pool"].as_str().unwrap().to_string();
        Pool::open(path.as_ref(), &OpenOptions::default()).unwrap()
    };
    let topic = pool
        .find_topic(embar_dataplane::pool::coherence::Coherent, "t")
        .unwrap();
    wait_until(
        "the verbs subscriber's cursor in the topic's subscriber table",
        Duration::from_secs(60),
        || {
            pool.sequencer_state(topic).subscribers.iter().any(|e| {
                e.state.load(std::sync::atomic::Ordering::Acquire) & 0xff
                    == embar_dataplane::pool::layout::SUBSCRIBER_ACTIVE
            })
        },
    );
    // Two verbs publishers and a shm one, 10 MB in all: more than the subscriber's ring of
    // 8 MiB, so its ring wraps.
    let pubs: Vec<Child> = ["a", "b"]
        .iter()
        .map(|p| c.publish_verbs("t", lines(p, 20_000, 200)))
        .chain([c.spawn(&["publish", "--topic", "t"], Some(lines("s", 5_000, 200)))])
        .collect();
    for p in pubs {
        succeeded(p);
    }
    let out = sub.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("order check passed: 45000 messages, 3 publishers"),
        "{err}"
    );
    let got: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 45_000);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, m)| m["total_order"].as_u64() == Some(i as u64)),
        "total orders 0.. without a gap or a duplicate"
    );
    for (p, n) in [("a", 20_000), ("b", 20_000), ("s", 5_000)] {
        let mine: Vec<String> = payloads(&got)
            .into_iter()
            .filter(|l| l.starts_with(&format!("{p} ")))
            .collect();
        let want: Vec<String> = lines(p, n, 200).lines().map(String::from).collect();
        assert_eq!(mine, want, "publisher {p}: all, once, in its order");
    }
    // The same as a subscriber on the pool host sees. That one comes last, so it starts at
    // the oldest batch the delivery ring still holds (total order 0 only when the 45,000
    // messages took fewer than its 8,192 entries: not under TCG, where batches linger out
    // small); from there on the two agree message for message.
    let shm = c.read_all("t");
    let first = shm.first().expect("the shm subscriber read something")["total_order"]
        .as_u64()
        .expect("a total order") as usize;
    assert_eq!(
        shm.len(),
        got.len() - first,
        "the shm subscriber read to the end"
    );
    if let Some(i) = shm.iter().zip(&got[first..]).position(|(a, b)| a != b) {
        panic!(
            "verbs and shm subscribers disagree at total order {}: {} against {}",
            first + i,
            got[first + i],
            shm[i]
        );
    }
}

#[test]
fn a_verbs_subscriber_resumes_on_the_other_broker_when_its_broker_dies() {
    let Some((_turn, c)) = ordered_verbs_cluster("sub-resume", &[]) else {
        return;
    };
    let n = 30_000u64;
    publish_verbs_all(&c, "r", n as usize, 100);
    let brokers = verbs_brokers(&c);
    assert_eq!(brokers.len(), 2);
    // A ring of 64 KiB: the stream is cut mid-way by the kill, whatever was in flight.
    let mut sub = verbs_subscriber(&[brokers[0].0, brokers[1].0], 64 << 10);
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < n {
        assert!(Instant::now() < deadline, "only {next} of {n}");
        let Some(m) = sub
            .next_timeout(Duration::from_millis(200))
            .expect("the stream")
        else {
            continue;
        };
        assert_eq!(m.total_order, next, "no gap, no duplicate");
        let text = String::from_utf8_lossy(m.payload);
        assert!(
            text.starts_with(&format!("r {next:06} ")),
            "in publish order: {next} is {text:.12}"
        );
        next += 1;
        if next == 1000 {
            signal(brokers[0].1, "-KILL");
        }
    }
    assert!(
        sub.next_timeout(Duration::from_millis(500))
            .unwrap()
            .is_none(),
        "no duplicate after the last"
    );
    assert_eq!(sub.reconnects(), 1);
    assert_eq!(sub.broker_addr(), brokers[1].0);
}

#[test]
fn a_verbs_subscriber_is_refused_a_position_not_reached_or_an_unknown_topic() {
    let Some((_turn, c)) = ordered_verbs_cluster("sub-refused", &[]) else {
        return;
    };
    publish_verbs_all(&c, "x", 300, 50);
    let verbs_from = |from: &str, more: &[&str]| {
        let mut args = vec![
            "subscribe",
            "--topic",
            "t",
            "--transport",
            "verbs",
            "--from",
        ];
        args.push(from);
        args.extend(more);
        c.embar(&args)
    };
    let (ok, _, err) = verbs_from("999999", &[]);
    assert!(!ok);
    assert!(
        err.contains("not reached yet") && err.contains("999999") && err.contains("300"),
        "both positions: {err}"
    );
    let (ok, _, err) = c.embar(&["subscribe", "--topic", "nope", "--transport", "verbs"]);
    assert!(!ok && err.contains("unknown topic"), "{err}");
    // Refusals hold nothing: a subscriber from a retained position reads on.
    let (ok, out, err) = verbs_from("295", &["--count", "5"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(out.starts_with("x 000295 "), "{out}");
}

#[test]
fn a_verbs_subscriber_that_returns_no_credit_is_dropped_and_holds_nothing() {
    let Some((_turn, c)) = ordered_verbs_cluster("sub-stuck", &["--tcp-idle-timeout-ms", "500"])
    else {
        return;
    };
    publish_verbs_all(&c, "k", 3000, 200);
    let brokers = verbs_brokers(&c);
    // Connected, and never read: its 64 KiB ring fills and it returns no credit. (The
    // broker's log line says so, "returned no credit for 500ms; dropped", at info level.)
    let stuck = verbs_subscriber(&[brokers[0].0], 64 << 10);
    assert!(c.subscriber_holds("t"), "its cursor, while it is served");
    // Dropped after the idle timeout, its cursor with it: the topic's subscriber table
    // holds no one.
    c.wait_no_subscriber_holds("t", Duration::from_secs(20));
    drop(stuck);
    // The broker serves the next one as before.
    let mut sub = verbs_subscriber(&[brokers[0].0], 64 << 10);
    let mut seen: HashMap<u64, ()> = HashMap::new();
    while seen.len() < 3000 {
        let m = sub
            .next_timeout(Duration::from_secs(10))
            .expect("the stream")
            .expect("a message within 10 s");
        assert!(seen.insert(m.total_order, ()).is_none(), "once each");
    }
}

/// Where no device is usable, a verbs subscriber fails at once and says so. (Runs on hosts
/// without RDMA; in the VM it says why it skips.)
#[test]
fn without_a_device_a_verbs_subscriber_says_so() {
    if embar_sys::verbs::Context::open(None, 1).is_ok() {
        eprintln!("skipped: this host has a usable RDMA device");
        return;
    }
    let _s = serial();
    let c = Cluster::up(
        "verbs-sub-nodev",
        &[
            "--brokers",
            "1",
            "--pool-bytes",
            "64MiB",
            "--segment-bytes",
            "4MiB",
        ],
    );
    c.topic("t", &[]);
    let (ok, _, err) = c.embar(&["subscribe", "--topic", "t", "--transport", "verbs"]);
    assert!(!ok, "a verbs subscriber without a device");
    assert!(err.contains("no RDMA device"), "{err}");
}

#[test]
fn a_verbs_publisher_sends_what_a_dead_broker_had_not_acknowledged_to_the_live_one() {
    let Some((_turn, c)) = ordered_verbs_cluster("failover", &[]) else {
        return;
    };
    // The broker that does not run the sequencer dies (the sequencer's own failover is
    // another test's).
    let seq = c.status()["sequencer"]["slot"].as_u64().unwrap_or(0) as u32;
    let victim = 1 - seq;
    // A subscriber from total order 0 before anything is published, reading as it comes.
    let sub = c.spawn(
        &[
            "subscribe",
            "--topic",
            "t",
            "--from",
            "0",
            "--format",
            "jsonl",
            "--check-order",
            "--idle-timeout-s",
            "10",
        ],
        None,
    );
    let sub = std::thread::spawn(move || sub.wait_with_output().unwrap());
    // About 10,000 lines a second: under TCG small batches that linger out, so the grant
    // the frozen broker gave lasts while it is frozen (it can give no other).
    let mut publisher = FedPublisher::start(&c, "t", "v", "verbs", &[], 100);
    wait_until(
        "the run under way on the broker to be killed",
        Duration::from_secs(60),
        || {
            c.metric(
                u64::from(victim),
                "embar_broker_verbs_batches_forwarded_total",
            ) >= 20
        },
    );
    // Frozen first: its NIC still takes the publisher's writes (RDMA needs no process), but
    // nothing is forwarded or acked, so the batches written meanwhile are in the pool and
    // unacknowledged when it dies, and go again by copy.
    let pid = c.broker_pid(victim);
    freeze(pid);
    let live = u64::from(seq);
    let before = c.metric(live, "embar_broker_verbs_batches_forwarded_total");
    wait_until(
        "the publisher going on with the live broker",
        Duration::from_secs(60),
        || c.metric(live, "embar_broker_verbs_batches_forwarded_total") >= before + 5,
    );
    signal(pid, "-KILL");
    let before = c.metric(live, "embar_broker_verbs_batches_forwarded_total");
    let going_on = wait_for(Duration::from_secs(60), || {
        c.metric(live, "embar_broker_verbs_batches_forwarded_total") >= before + 50
    });
    if !going_on {
        let out = publisher.kill();
        panic!(
            "the run stopped after the kill; the publisher said: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (n, out) = publisher.finish();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("{n} acknowledged")), "{n} fed: {err}");
    assert!(err.contains("is gone"), "the publisher failed over: {err}");
    assert!(
        c.metric(live, "embar_broker_verbs_resends_copied_total") >= 1,
        "batches already in the pool went again by copy: {err}"
    );
    let out = sub.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), n, "every line once");
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["total_order"].as_u64(), Some(i as u64), "no gap");
        let p = m["payload"].as_str().unwrap();
        assert!(
            p.starts_with(&format!("v {i:07} ")),
            "in publish order: {i} is {p:.10}"
        );
    }
}
