//! Segment allocation between real processes on one host: several processes allocate and free
//! segments of one small pool at once; none may ever hold a segment another one holds.

use std::process::{Command, Stdio};

use embar_test_support::exe;

/// Removes a test file however the test ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn concurrent_processes_never_share_a_segment() {
    let exe = exe();
    let path = format!("/dev/shm/embar-test-churn-{}", std::process::id());
    let _ = std::fs::remove_file(&path);
    let _cleanup = Cleanup(path.clone());
    let created = Command::new(&exe)
        .args([
            "pool",
            "create",
            "--path",
            &path,
            "--pool-bytes",
            "8MiB",
            "--segment-bytes",
            "64KiB",
        ])
        .args([
            "--max-topics",
            "1",
            "--max-brokers",
            "4",
            "--ring-slots",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let children: Vec<_> = (0..4)
        .map(|b| {
            Command::new(&exe)
                .args([
                    "ring-worker",
                    "segment-churn",
                    "--pool",
                    &path,
                    "--broker",
                    &b.to_string(),
                ])
                .args(["--rounds", "30000", "--hold", "40"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut allocations = 0;
    let mut exhausted = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["collisions"], 0, "{r}");
        allocations += r["allocations"].as_u64().unwrap();
        exhausted += r["exhausted"].as_u64().unwrap();
    }
    // 4 x 40 held against ~110 segments: the pool runs dry and segments change hands.
    assert!(allocations > 20_000, "{allocations}");
    assert!(
        exhausted > 0,
        "the pool never ran out, so owners never competed"
    );
    let inspect = Command::new(&exe)
        .args(["pool", "inspect", "--path", &path, "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["segments_in_use"], 0, "every segment was returned");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn pool_create_and_inspect_give_clear_errors_for_bad_input() {
    let exe = exe();
    let path = format!("/dev/shm/embar-test-cli-{}", std::process::id());
    let _ = std::fs::remove_file(&path);
    let _cleanup = Cleanup(path.clone());
    let run = |args: &[&str]| {
        let out = Command::new(&exe).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&["pool", "create", "--path", &path, "--ring-slots", "1000"]);
    assert!(
        !ok && err.contains("ring_slots 1000 must be a power of two"),
        "{err}"
    );
    let (ok, err) = run(&["pool", "inspect", "--path", "/dev/shm/no-such-pool"]);
    assert!(
        !ok && err.contains("cannot open /dev/shm/no-such-pool"),
        "{err}"
    );
    std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
    let (ok, err) = run(&["pool", "inspect", "--path", &path]);
    assert!(!ok && err.contains("is not an Embarcadero pool"), "{err}");
    let (ok, err) = run(&["pool", "create", "--path", &path, "--pool-bytes", "64MiB"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        vec![7u8; 1 << 16],
        "the foreign file is untouched"
    );
    std::fs::remove_file(&path).unwrap();
    let cfg = format!("/tmp/embar-test-cfg-{}.toml", std::process::id());
    std::fs::write(&cfg, "[pool]\npool_bytes = \"64MiB\"\nbogus = 1\n").unwrap();
    let (ok, err) = run(&["pool", "create", "--config", &cfg, "--path", &path]);
    assert!(!ok && err.contains("unknown field `bogus`"), "{err}");
    std::fs::write(&cfg, "[pool]\npool_bytes = \"64MiB\"\nring_slots = 16\n").unwrap();
    let (ok, err) = run(&[
        "pool",
        "create",
        "--config",
        &cfg,
        "--path",
        &path,
        "--ring-slots",
        "32",
    ]);
    assert!(ok, "{err}");
    let out = Command::new(&exe)
        .args(["pool", "inspect", "--path", &path, "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ring_slots"], 32, "the flag overrides the file");
    assert_eq!(v["pool_bytes"], 64u64 << 20);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&cfg).unwrap();
}
