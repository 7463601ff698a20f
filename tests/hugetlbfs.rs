//! A pool on hugetlbfs: created, checked for the huge-page granule, and used by the bench
//! processes. Needs a mounted hugetlbfs with free 2 MiB pages, named by EMBAR_HUGETLBFS_DIR
//! (`scripts/test.sh` mounts one when it runs as root).

use std::process::Command;

use embar_test_support::exe;

fn dir() -> Option<String> {
    let d = std::env::var("EMBAR_HUGETLBFS_DIR").ok()?;
    std::path::Path::new(&d).is_dir().then_some(d)
}

#[test]
fn a_pool_on_hugetlbfs_is_created_checked_and_used() {
    let Some(dir) = dir() else {
        eprintln!("skipped: EMBAR_HUGETLBFS_DIR does not name a mounted hugetlbfs (scripts/test.sh mounts one as root)");
        return;
    };
    let exe = exe();
    let path = format!("{dir}/embar-test-{}", std::process::id());
    let _ = std::fs::remove_file(&path);
    let out = Command::new(&exe)
        .args([
            "pool",
            "create",
            "--path",
            &path,
            "--pool-bytes",
            "33MiB",
            "--max-topics",
            "2",
            "--segment-bytes",
            "2MiB",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a multiple of 2097152"),
        "{err}"
    );
    assert!(!std::path::Path::new(&path).exists());

    let out = Command::new(&exe)
        .args([
            "pool",
            "create",
            "--path",
            &path,
            "--pool-bytes",
            "32MiB",
            "--segment-bytes",
            "2MiB",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe)
        .args(["pool", "inspect", "--path", &path, "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["backing"].as_str().unwrap().starts_with("hugetlbfs"),
        "{v}"
    );
    std::fs::remove_file(&path).unwrap();

    let out = Command::new(&exe)
        .args([
            "ring-bench",
            "--json",
            "--pool-dir",
            &dir,
            "--pool-bytes",
            "32MiB",
            "--segment-bytes",
            "2MiB",
        ])
        .args([
            "--batch-bytes",
            "256KiB",
            "--total-bytes",
            "256MiB",
            "--ring-slots",
            "64",
        ])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(r["order_check"], "passed", "{r:#}");
    assert!(r["pool_multiples_moved"].as_f64().unwrap() >= 8.0);
}
