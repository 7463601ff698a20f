//! The verbs transport as real processes on a real RDMA device (rxe in the test VM, run by
//! `scripts/rxe-test.sh`): brokers with `--verbs`, verbs publishers, shm subscribers, and
//! rogue verbs clients.
//!
//! Without a device (or without `RDMA_IP`, the address brokers listen on) these tests print
//! why and pass, unless `EMBAR_REQUIRE_RDMA=1` (set in the VM), where that fails them.
//! `EMBAR_BIN` overrides the `embar` binary (the VM mounts the host's build elsewhere).
#![cfg(feature = "verbs")]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use embar_test_support::{alive, exe, lines, serial, signal, wait_for, wait_until, Cluster};

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
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
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
    let out = honest.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The brokers still serve new sessions.
    let after = c
        .publish_verbs("t", lines("late", 100, 200))
        .wait_with_output()
        .unwrap();
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
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
    let ok = c
        .publish_verbs("t", lines("h", 50, 200))
        .wait_with_output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
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
    let ok = c
        .publish_verbs("t", lines("h", 100, 200))
        .wait_with_output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
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
