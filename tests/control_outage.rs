//! The data plane outlives the control process: real `embar` processes publish and subscribe
//! while the control process is SIGKILLed and restarted, frozen with SIGSTOP, and answering
//! 503; no broker exits, nothing is lost or reordered, the same brokers are live afterwards,
//! and `embar cluster down` stops processes started into the cluster by hand.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use embar_test_support::{exe, serial, signal, wait_for_status, Cluster};
use serde_json::Value;

/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(10);

fn status(control: &str) -> Option<Value> {
    embar_control::ControlClient::new(control.parse().unwrap())
        .status()
        .ok()
}

/// `(id, pid)` of the live brokers, by id.
fn live_brokers(s: &Value) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = s["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["alive"] == true)
        .map(|b| {
            (
                b["id"].as_u64().unwrap(),
                b["addresses"]["pid"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Waits until the control process answers, shows exactly `want` live, and has heard a
/// heartbeat from each since this call.
fn wait_for_brokers(control: &str, want: &[(u64, String)], phase: &str) {
    let start = Instant::now();
    let what = format!("{phase}: live brokers {want:?}, each heard from since");
    wait_for_status(control, &what, Duration::from_secs(20), |s| {
        let since_ms = start.elapsed().as_millis() as u64;
        let fresh = s["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["alive"] == true)
            .all(|b| b["last_heartbeat_ms_ago"].as_u64().unwrap() < since_ms);
        live_brokers(s) == want && fresh
    });
}

fn assert_running(c: &Cluster, pids: &[(u64, String)], phase: &str) {
    for (id, pid) in pids {
        if !embar_sys::process::alive(pid.parse().unwrap()) {
            let logs: Vec<String> = (0..pids.len())
                .map(|b| {
                    std::fs::read_to_string(format!("{}/broker-{b}.log", c.dir)).unwrap_or_default()
                })
                .collect();
            panic!(
                "{phase}: broker {id} (pid {pid}) exited; broker logs:\n{}",
                logs.join("\n--\n")
            );
        }
    }
}

/// A publisher fed lines `NAME 000000 ...` in chunks every 50 ms until `stop`; returns the
/// child and the feeding thread, which answers how many lines it wrote.
fn paced_publisher(
    c: &Cluster,
    name: &'static str,
    stop: &Arc<AtomicBool>,
) -> (Child, std::thread::JoinHandle<usize>) {
    let mut child = Command::new(exe())
        .args(["publish", "--topic", "t", "--control", &c.control])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stop = stop.clone();
    let feeder = std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let chunk: String = (n..n + 100)
                .map(|i| format!("{name} {i:06} {}\n", "p".repeat(100)))
                .collect();
            // A publisher that exited closes its stdin: stop feeding; the test then shows
            // its exit status and stderr.
            if input.write_all(chunk.as_bytes()).is_err() {
                break;
            }
            n += 100;
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    });
    (child, feeder)
}

#[test]
fn publishing_and_subscribing_go_on_through_control_outages_and_down_stops_everything() {
    let _serial = serial();
    let c = Cluster::up(
        "outage",
        &["--pool-bytes", "256MiB", "--segment-bytes", "2MiB"],
    );
    c.topic("t", &["--order", "5", "--batch-bytes", "64KiB"]);
    let file = c.file();
    let control_args: Vec<String> = file["control_args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let brokers = live_brokers(&status(&c.control).unwrap());
    assert_eq!(brokers.len(), 2);

    let sub = Command::new(exe())
        .args(["subscribe", "--topic", "t", "--format", "jsonl"])
        .args(["--idle-timeout-s", "5", "--control", &c.control])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sub = std::thread::spawn(move || sub.wait_with_output().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let pubs: Vec<_> = ["alpha", "beta"]
        .into_iter()
        .map(|n| paced_publisher(&c, n, &stop))
        .collect();
    // Some traffic is ordered before the first outage.
    c.wait_for_status("some traffic ordered", Duration::from_secs(20), |s| {
        s["topics"][0]["sequencer"]["next_total_order"].as_u64() > Some(0)
    });

    // 1. SIGKILL, down for 10 s, restarted on the same state directory by hand.
    let control_pid = status(&c.control).unwrap()["pid"].as_u64().unwrap() as u32;
    signal(control_pid, "-KILL");
    std::thread::sleep(OUTAGE);
    assert_running(&c, &brokers, "control killed");
    let mut restarted = Command::new(exe())
        .args(&control_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_brokers(&c.control, &brokers, "after the restart");

    // 2. Frozen (SIGSTOP) for 10 s: when it resumes, nobody is declared dead.
    signal(restarted.id(), "-STOP");
    std::thread::sleep(OUTAGE);
    signal(restarted.id(), "-CONT");
    assert_running(&c, &brokers, "control frozen");
    wait_for_brokers(&c.control, &brokers, "after SIGCONT");
    let s = status(&c.control).unwrap();
    assert_eq!(
        live_brokers(&s),
        brokers,
        "no broker was declared dead for the control's pause: {s}"
    );

    // 3. Answering 503 for 10 s: every connection slot is held by a silent client.
    let flood: Vec<TcpStream> = (0..embar_control::server::CONNECTIONS_MAX)
        .map(|_| TcpStream::connect(&c.control).unwrap())
        .collect();
    let start = Instant::now();
    let mut refused = None;
    while start.elapsed() < Duration::from_secs(2) && refused.is_none() {
        // A 503 written before the request is read may reach the client as a reset.
        refused = embar_control::ControlClient::new(c.control.parse().unwrap())
            .status()
            .err();
    }
    let refused = refused.expect("the control process was not refusing connections");
    eprintln!("while flooded, the control process answers: {refused}");
    std::thread::sleep(OUTAGE.saturating_sub(start.elapsed()));
    drop(flood);
    assert_running(&c, &brokers, "control answering 503");
    wait_for_brokers(&c.control, &brokers, "after the 503s");

    // The publishers finish; the subscriber saw every acked line, in order.
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (child, feeder) in pubs {
        let n = feeder.join().unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains(&format!("{n} acknowledged")), "{n}: {err}");
        total += n;
    }
    let out = sub.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut next = std::collections::HashMap::new();
    let mut count = 0;
    for (i, l) in text.lines().enumerate() {
        let m: Value = serde_json::from_str(l).unwrap();
        assert_eq!(m["total_order"], i as u64, "total orders 0..N-1");
        let payload = m["payload"].as_str().unwrap();
        let mut parts = payload.split(' ');
        let who = parts.next().unwrap().to_string();
        let k: usize = parts.next().unwrap().parse().unwrap();
        let want = next.entry(who.clone()).or_insert(0usize);
        assert_eq!(k, *want, "{who}'s lines in order");
        *want += 1;
        count += 1;
    }
    assert_eq!(count, total, "every acked line delivered once");

    // A broker started into the cluster by hand; `cluster down` stops it, the control process
    // restarted by hand, and the brokers `cluster up` started, and says so.
    let mut extra = Command::new(exe())
        .args(["broker", "--control", &c.control])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = c.wait_for_status("a third broker", Duration::from_secs(20), |s| {
        live_brokers(s).len() >= 3
    });
    let want = live_brokers(&s);
    assert!(want.iter().any(|b| b.1 == extra.id().to_string()));
    let out = Command::new(exe())
        .args(["cluster", "down", "--dir", &c.dir])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("control process (pid {})", restarted.id())),
        "{text}"
    );
    for (_, pid) in &want {
        assert!(text.contains(&format!("(pid {pid})")), "{pid}: {text}");
    }
    assert!(
        restarted.try_wait().unwrap().is_some() && extra.try_wait().unwrap().is_some(),
        "cluster down returned before the processes it stopped had exited"
    );
    for (_, pid) in &want {
        assert!(
            !embar_sys::process::alive(pid.parse().unwrap()),
            "broker pid {pid} still runs after cluster down"
        );
    }
}

#[test]
fn a_cluster_up_that_fails_leaves_no_process_running() {
    let _serial = serial();
    let dir = format!("/tmp/embar-test-up-fails-{}", std::process::id());
    // The control process starts; the broker cannot (`--verbs` without an RDMA device, or in
    // a build without verbs): `cluster up` fails.
    let out = Command::new(exe())
        .args(["cluster", "up", "--brokers", "1", "--dir", &dir])
        .args(["--pool-bytes", "64MiB", "--verbs", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let state_dir = format!("{dir}/control");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains(&state_dir) && embar_sys::process::alive(pid as i32))
                .then(|| format!("{pid}: {cmd}"))
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(format!(
        "/dev/shm/embar-embar-test-up-fails-{}.pool",
        std::process::id()
    ));
    assert!(left.is_empty(), "still running: {left:?}");
}
