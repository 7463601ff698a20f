//! The control process on loopback, with real processes: registration and heartbeats, failure
//! detection of a broker killed with SIGKILL, durable topics and broker ids across a restart
//! of the control process, long-polled membership changes, and a clear error for every bad
//! request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use embar_test_support::{assert_holds, embar, exe, wait_until};
use serde_json::Value;

const HEARTBEAT_MS: u64 = 200;

struct Cluster {
    dir: String,
    pool: String,
    children: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.pool);
    }
}

/// Starts `embar control` on a free port; returns the child and its address.
fn start_control(c: &Cluster) -> (Child, String) {
    let mut child = Command::new(exe())
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            &c.dir,
            "--path",
            &c.pool,
        ])
        .args([
            "--pool-bytes",
            "128MiB",
            "--segment-bytes",
            "4MiB",
            "--heartbeat-ms",
            &HEARTBEAT_MS.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "embar control listening on ADDR (epoch N)"
    let addr = line
        .split_whitespace()
        .nth(4)
        .expect("an address")
        .to_string();
    (child, addr)
}

fn heartbeater(addr: &str) -> (Child, u64) {
    let mut child = Command::new(exe())
        .args(["ring-worker", "heartbeat", "--control", addr])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().expect("a broker id"))
}

/// One raw HTTP request; returns (status, JSON body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
    )
}

fn status(addr: &str) -> Value {
    let (ok, out, err) = embar(&["cluster", "status", "--control", addr, "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn alive(addr: &str, id: u64) -> bool {
    status(addr)["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["id"] == id && b["alive"] == true)
}

#[test]
fn membership_topics_and_restart_of_the_control_process() {
    let mut c = Cluster {
        dir: format!("/tmp/embar-test-control-{}", std::process::id()),
        pool: format!("/dev/shm/embar-test-control-{}", std::process::id()),
        children: Vec::new(),
    };
    let (control, addr) = start_control(&c);
    c.children.push(control);

    // Register and heartbeat.
    let (b0, id0) = heartbeater(&addr);
    let (b1, id1) = heartbeater(&addr);
    c.children.push(b0);
    assert_eq!((id0, id1), (0, 1));
    assert_holds(
        "heartbeats keep both alive",
        Duration::from_millis(3 * HEARTBEAT_MS),
        || alive(&addr, id0) && alive(&addr, id1),
    );

    // A long poll returns when membership changes.
    let version = status(&addr)["membership_version"].as_u64().unwrap();
    let poll_addr = addr.clone();
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let (code, v) = http(
            &poll_addr,
            "GET",
            &format!("/v1/brokers?since={version}&wait_ms=20000"),
            "",
        );
        (code, v, t.elapsed())
    });

    // SIGKILL one broker: dead within three heartbeat intervals (plus the ticker's period).
    let mut b1 = b1;
    b1.kill().unwrap();
    b1.wait().unwrap();
    let killed = Instant::now();
    wait_until(
        "the killed broker declared dead",
        Duration::from_secs(5),
        || !alive(&addr, id1),
    );
    let detected = killed.elapsed();
    assert!(
        detected <= Duration::from_millis(4 * HEARTBEAT_MS + 200),
        "{detected:?}"
    );
    assert!(alive(&addr, id0), "the other broker is unaffected");
    let (code, v, waited) = poll.join().unwrap();
    assert_eq!(code, 200);
    assert!(v["version"].as_u64().unwrap() > version);
    assert!(
        waited < Duration::from_secs(10),
        "the long poll answered on the change"
    );

    // A dead broker's heartbeat is refused: it must register again.
    let (code, v) = http(&addr, "POST", &format!("/v1/brokers/{id1}/heartbeat"), "");
    assert_eq!(code, 410, "{v}");
    assert!(v["error"].as_str().unwrap().contains("must register again"));
    let (code, _) = http(&addr, "POST", "/v1/brokers/77/heartbeat", "");
    assert_eq!(code, 404);

    // Topics, and every bad request with its error.
    let (ok, out, err) = embar(&[
        "topic",
        "create",
        "orders",
        "--control",
        &addr,
        "--replication-factor",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("created orders"), "{out}");
    for (args, needle) in [
        (vec!["orders"], "already exists"),
        (vec!["acked", "--ack", "2"], "ACK 2"),
        (
            vec!["wide", "--replication-factor", "2"],
            "larger than the 1 live brokers",
        ),
        (vec!["o9", "--order", "9"], "ORDER 9 is unknown"),
        (vec!["o3", "--order", "3"], "ORDER 3"),
        (vec!["bad name"], "allowed"),
        (vec!["huge", "--batch-bytes", "1GiB"], "batch size"),
    ] {
        let mut a = vec!["topic", "create"];
        a.extend(args.iter());
        a.extend(["--control", &addr]);
        let (ok, _, err) = embar(&a);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }
    let long = "n".repeat(300);
    let (ok, _, err) = embar(&["topic", "create", &long, "--control", &addr]);
    assert!(!ok && err.contains("longer than 192"), "{err}");
    let (ok, _, err) = embar(&["topic", "describe", "nope", "--control", &addr]);
    assert!(!ok && err.contains("unknown topic \"nope\""), "{err}");
    assert_eq!(http(&addr, "POST", "/v1/topics", "{not json").0, 400);
    assert_eq!(
        http(&addr, "POST", "/v1/topics", r#"{"name":"x","order":5}"#).0,
        400,
        "missing fields"
    );
    assert_eq!(
        http(
            &addr,
            "POST",
            "/v1/topics",
            r#"{"name":"x","order":5,"ack":1,"replication_factor":0,"batch_bytes":65536,"extra":1}"#
        )
        .0,
        400,
        "unknown field"
    );
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(70_000));
    assert_eq!(http(&addr, "POST", "/v1/topics", &big).0, 413);
    assert_eq!(http(&addr, "PUT", "/v1/topics", "").0, 405);
    assert_eq!(http(&addr, "GET", "/v2/anything", "").0, 404);
    assert_eq!(http(&addr, "GET", "/v1/brokers?since=abc", "").0, 400);
    let (ok, _, err) = embar(&["topic", "list", "--control", "127.0.0.1:1"]);
    assert!(
        !ok && err.contains("cannot reach the control process"),
        "{err}"
    );
    // The state stayed consistent through the bad requests.
    let topics = status(&addr)["topics"].as_array().unwrap().clone();
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0]["topic"]["name"], "orders");

    // Metrics.
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut m = String::new();
    s.read_to_string(&mut m).unwrap();
    assert!(m.contains("embar_control_brokers_live 1"), "{m}");
    assert!(m.contains("embar_control_topics 1"), "{m}");
    assert!(m.contains("embar_control_request_errors_total"), "{m}");

    // Restart the control process: same topics, same pool, no broker id handed out again.
    let epoch = status(&addr)["epoch"].as_u64().unwrap();
    let mut control = c.children.remove(0);
    control.kill().unwrap(); // SIGKILL: state must already be durable
    control.wait().unwrap();
    let (control, addr) = start_control(&c);
    c.children.push(control);
    let s = status(&addr);
    assert_eq!(s["epoch"].as_u64().unwrap(), epoch + 1);
    assert_eq!(s["topics"][0]["topic"]["name"], "orders");
    assert_eq!(s["topics"][0]["topic"]["replication_factor"], 1);
    let (b2, id2) = heartbeater(&addr);
    c.children.push(b2);
    assert_eq!(id2, 2, "ids 0 and 1 were handed out before the restart");
    let (ok, _, err) = embar(&["topic", "delete", "orders", "--control", &addr]);
    assert!(ok, "{err}");
    let (ok, out, _) = embar(&["topic", "list", "--control", &addr, "--json"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["topics"],
        serde_json::json!([])
    );
}

#[test]
fn a_damaged_state_file_or_a_foreign_pool_stops_the_control_process_with_a_clear_error() {
    let c = Cluster {
        dir: format!("/tmp/embar-test-control-bad-{}", std::process::id()),
        pool: format!("/dev/shm/embar-test-control-bad-{}", std::process::id()),
        children: Vec::new(),
    };
    std::fs::create_dir_all(&c.dir).unwrap();
    std::fs::write(format!("{}/control-state.json", c.dir), "{\"format\":1,").unwrap();
    let (ok, _, err) = embar(&[
        "control",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &c.dir,
        "--path",
        &c.pool,
    ]);
    assert!(!ok && err.contains("damaged"), "{err}");
    std::fs::remove_file(format!("{}/control-state.json", c.dir)).unwrap();
    std::fs::write(&c.pool, vec![1u8; 1 << 20]).unwrap();
    let (ok, _, err) = embar(&[
        "control",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &c.dir,
        "--path",
        &c.pool,
        "--pool-bytes",
        "1MiB",
    ]);
    assert!(!ok && err.contains("not an Embarcadero pool"), "{err}");
}

#[test]
fn a_topic_slot_freed_by_a_deletion_is_not_reused_before_brokers_can_notice() {
    let mut c = Cluster {
        dir: format!("/tmp/embar-test-control-grace-{}", std::process::id()),
        pool: format!("/dev/shm/embar-test-control-grace-{}", std::process::id()),
        children: Vec::new(),
    };
    let (control, addr) = start_control(&c);
    c.children.push(control);
    let spec =
        r#"{"name": "g", "order": 5, "ack": 1, "replication_factor": 0, "batch_bytes": 65536}"#;
    let (code, _) = http(&addr, "POST", "/v1/topics", spec);
    assert_eq!(code, 201);
    let (code, _) = http(&addr, "DELETE", "/v1/topics/g", "");
    assert_eq!(code, 200);
    // Created again at once: the answer waits out the grace (brokers check every 100 ms).
    let t = Instant::now();
    let (code, v) = http(&addr, "POST", "/v1/topics", spec);
    assert_eq!(code, 201, "{v}");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "a deleted topic's slot was reused after {:?}",
        t.elapsed()
    );
    // Heartbeats and status answer meanwhile (the wait holds no lock): a status right after
    // a deletion returns at once.
    let (code, _) = http(&addr, "DELETE", "/v1/topics/g", "");
    assert_eq!(code, 200);
    let create = {
        let addr = addr.clone();
        std::thread::spawn(move || http(&addr, "POST", "/v1/topics", spec).0)
    };
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let _ = status(&addr);
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "status waited for the create"
    );
    assert_eq!(create.join().unwrap(), 201);
}
