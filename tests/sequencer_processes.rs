//! The sequencer between real processes: three broker processes feed one topic's rings with
//! the batches of five clients striped over brokers (so they arrive out of order) and with
//! resends; a sequencer process orders them, is killed with SIGKILL twice mid-run and started
//! again; at the end the ordering checker runs on everything in the rings.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use embar_test_support::{exe, signal, wait_for, wait_until};

struct Cleanup(String, Vec<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(format!("{}.log", self.0));
    }
}

fn embar(args: &[&str]) -> std::process::Output {
    Command::new(exe()).args(args).output().expect("embar runs")
}

fn sequencer(pool: &str, topic: &str) -> Child {
    Command::new(exe())
        .args([
            "sequencer",
            "--pool",
            pool,
            "--topic",
            topic,
            "--brokers",
            "3",
            // The feeders write rings without publisher sessions.
            "--no-client-reclaim",
        ])
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(format!("{pool}.log"))
                .expect("a sequencer log beside the pool"),
        )
        .spawn()
        .unwrap()
}

/// Messages ordered so far (the per-broker `ordered` counts).
fn ordered(pool: &str) -> u64 {
    let out = embar(&["pool", "inspect", "--path", pool, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["topics"][0]["ordered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum()
}

/// Whether every ring of the topic has had every published slot consumed.
fn all_consumed(pool: &str) -> bool {
    let out = embar(&["pool", "inspect", "--path", pool, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["topics"][0]["rings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r[0] == r[1])
}

fn run(order: &str) {
    let pool = format!("/dev/shm/embar-test-seq-{order}-{}", std::process::id());
    let _ = std::fs::remove_file(&pool);
    let mut guard = Cleanup(pool.clone(), Vec::new());
    let out = embar(&[
        "pool",
        "create",
        "--path",
        &pool,
        "--pool-bytes",
        "256MiB",
        "--segment-bytes",
        "1MiB",
        "--ring-slots",
        "4096",
    ]);
    assert!(out.status.success());
    let out = embar(&[
        "pool",
        "create-topic",
        "--path",
        &pool,
        "--name",
        "orders",
        "--order",
        order,
        "--batch-bytes",
        "64KiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (clients, per_client, per_batch) = (5u64, 700u64, 4u64);
    let total = clients * per_client * per_batch;
    guard.1.push(sequencer(&pool, "orders"));
    let feeders: Vec<Child> = (0..3)
        .map(|b| {
            Command::new(exe())
                .args([
                    "ring-worker",
                    "feed",
                    "--pool",
                    &pool,
                    "--topic",
                    "orders",
                    "--brokers",
                    "3",
                ])
                .args([
                    "--broker",
                    &b.to_string(),
                    "--clients",
                    &clients.to_string(),
                ])
                .args([
                    "--batches-per-client",
                    &per_client.to_string(),
                    "--messages-per-batch",
                    &per_batch.to_string(),
                ])
                .args(["--duplicate-every", "7", "--pace-us", "300"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Kill the sequencer twice while it is part-way through, and start it again each time.
    for fraction in [4, 2] {
        wait_until("progress", Duration::from_secs(60), || {
            ordered(&pool) >= total / fraction
        });
        let mut s = guard.1.pop().unwrap();
        s.kill().unwrap(); // SIGKILL
        s.wait().unwrap();
        assert!(
            ordered(&pool) < total,
            "the kill came before the end of the run"
        );
        guard.1.push(sequencer(&pool, "orders"));
    }
    let mut duplicates = 0;
    for f in feeders {
        let out = f.wait_with_output().unwrap();
        assert!(out.status.success());
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        duplicates += r["duplicates"].as_u64().unwrap();
    }
    // Every published slot decided and finished. (Not the per-broker `ordered` counters: a
    // batch committed just before a kill and replayed after it is not added to them, a
    // known undercount of that metric.)
    if !wait_for(Duration::from_secs(60), || all_consumed(&pool)) {
        let log = std::fs::read_to_string(format!("{pool}.log")).unwrap_or_default();
        panic!(
            "timed out waiting for the last batch: {} of {total} ordered; sequencer logs:\n{log}",
            ordered(&pool)
        );
    }
    let mut s = guard.1.pop().unwrap();
    signal(s.id(), "-TERM");
    assert!(
        s.wait().unwrap().success(),
        "SIGTERM stops the sequencer cleanly"
    );

    let out = embar(&[
        "ring-worker",
        "verify-order",
        "--pool",
        &pool,
        "--topic",
        "orders",
        "--brokers",
        "3",
        "--expect-messages",
        &total.to_string(),
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["check"], "passed", "{r:#}");
    assert!(out.status.success());
    assert_eq!(r["messages"], total);
    assert_eq!(r["ordered_batches"], clients * per_client);
    assert_eq!(r["epoch"], 3, "three sequencer instances");
    // Every resend was dropped: by the sequencer, or (for a resend of a batch that a kill
    // caught between taking and finishing) as a second copy after the restart.
    assert_eq!(r["unordered_slots"], duplicates);
    assert!(
        r["duplicates_dropped"].as_u64().unwrap() >= duplicates,
        "{r:#}"
    );
}

#[test]
fn order_5_survives_sequencer_kills_without_a_gap_or_a_duplicate() {
    run("5");
}

#[test]
fn order_4_stamps_every_message_across_sequencer_kills() {
    run("4");
}
