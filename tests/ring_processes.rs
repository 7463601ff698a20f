//! The batch ring and segment reuse between two real processes: `embar bench` starts a lander
//! process (writes batches into the pool, publishes them into a ring) and a drainer process
//! (takes them, checks every message, finishes slots out of order). Small rings and a small
//! pool force many ring laps and many reuses of every segment.

use std::process::Command;

use embar_test_support::exe;

fn bench(total: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(exe())
        .args([
            "ring-bench",
            "--json",
            "--total-bytes",
            total,
            "--message-bytes",
            "100",
            "--batch-bytes",
            "4KiB",
            "--pool-bytes",
            "4MiB",
            "--segment-bytes",
            "64KiB",
            "--ring-slots",
            "8",
            "--hold",
            "5",
        ])
        .args(extra)
        .output()
        .expect("embar runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

fn every_batch_exactly_once_in_order(coherence: &str) {
    let (code, r) = bench("24MiB", &["--coherence", coherence]);
    assert_eq!(r["order_check"], "passed", "{r:#}");
    assert_eq!(code, 0);
    let messages = (24u64 << 20) / 100;
    assert_eq!(r["messages"], messages);
    let per_batch = r["config"]["messages_per_batch"].as_u64().unwrap();
    assert_eq!(r["batches"], messages.div_ceil(per_batch));
    assert!(r["ring_laps"].as_u64().unwrap() > 500, "{r:#}");
    assert!(r["pool_multiples_moved"].as_f64().unwrap() > 5.0, "{r:#}");
    assert!(r["segments_reused"].as_u64().unwrap() > 300, "{r:#}");
    assert_eq!(r["config"]["coherence"], coherence);
}

#[test]
fn ring_laps_between_two_processes_coherent() {
    every_batch_exactly_once_in_order("coherent");
}

#[test]
fn ring_laps_between_two_processes_non_coherent() {
    every_batch_exactly_once_in_order("non-coherent");
}

#[test]
fn a_gap_a_duplicate_and_a_corrupt_payload_are_each_caught() {
    for (fault, needle) in [
        ("skip-batch", "batch_seq 2 arrived where 1 was next (gap)"),
        ("duplicate-batch", "batch_seq 1 arrived again (duplicate)"),
        ("corrupt-payload", "payload does not match"),
    ] {
        let (code, r) = bench("1MiB", &["--fault", fault]);
        assert_eq!(r["order_check"], "failed", "{fault}: {r:#}");
        assert_eq!(
            code, 65,
            "{fault}: a failed check exits with the data-error code"
        );
        let errors = r["errors"].to_string();
        assert!(errors.contains(needle), "{fault}: {errors}");
    }
}

#[test]
fn a_bad_size_argument_is_a_clear_error() {
    let out = Command::new(exe())
        .args(["ring-bench", "--total-bytes", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a size"), "{err}");
}
