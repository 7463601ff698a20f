//! The harness of the tests that run a local cluster (`embar cluster up`) as real processes:
//! `tests/cluster_processes.rs` and `tests/verbs_processes.rs`. Each uses part of it.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// The `embar` binary; `EMBAR_BIN` overrides it (the rxe VM mounts the host's build
/// elsewhere).
pub fn exe() -> String {
    std::env::var("EMBAR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_embar").to_string())
}

/// The cluster tests run one at a time: each starts several polling processes, and a 2-core
/// machine running two such clusters at once measures the scheduler, not the system.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cluster started with `embar cluster up`, stopped however the test ends.
pub struct Cluster {
    pub dir: String,
    pub control: String,
}

impl Cluster {
    /// Two brokers unless `extra` says `--brokers`.
    pub fn up(name: &str, extra: &[&str]) -> Cluster {
        let dir = format!("/tmp/embar-test-cluster-{name}-{}", std::process::id());
        let _ = Command::new(exe())
            .args(["cluster", "down", "--dir", &dir])
            .output();
        let brokers: &[&str] = if extra.contains(&"--brokers") {
            &[]
        } else {
            &["--brokers", "2"]
        };
        let out = Command::new(exe())
            .args(["cluster", "up", "--dir", &dir])
            .args(brokers)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/cluster.json")).unwrap())
                .unwrap();
        Cluster {
            control: file["control"].as_str().unwrap().to_string(),
            dir,
        }
    }

    /// Runs `embar ARGS --control ADDR`: (success, stdout, stderr).
    pub fn embar(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.run(args, None);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    pub fn run(&self, args: &[&str], stdin: Option<String>) -> Output {
        self.spawn(args, stdin).wait_with_output().unwrap()
    }

    /// Starts `embar ARGS --control ADDR` with `stdin` written to it (then closed).
    pub fn spawn(&self, args: &[&str], stdin: Option<String>) -> Child {
        let mut c = Command::new(exe())
            .args(args)
            .args(["--control", &self.control])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = c.stdin.take().unwrap();
        let text = stdin.unwrap_or_default();
        std::thread::spawn(move || {
            let _ = input.write_all(text.as_bytes());
        });
        c
    }

    /// Runs a rogue publisher with `fault` on topic `t` and checks that its batch was rejected
    /// with a reason containing one of `needles` (`|`-separated).
    pub fn rogue_rejected(&self, fault: &str, needles: &str) {
        let (ok, out, err) = self.embar(&[
            "ring-worker",
            "rogue-publish",
            "--topic",
            "t",
            "--fault",
            fault,
        ]);
        assert!(ok, "{fault}: {err}");
        let r: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["rejected"], true, "{fault}: {r}");
        let error = r["error"].as_str().unwrap();
        assert!(
            needles.split('|').any(|n| error.contains(n)),
            "{fault}: {r}"
        );
    }

    pub fn topic(&self, name: &str, extra: &[&str]) {
        let mut args = vec!["topic", "create", name];
        args.extend(extra);
        let (ok, _, err) = self.embar(&args);
        assert!(ok, "{err}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(exe())
            .args(["cluster", "down", "--dir", &self.dir])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` lines `PREFIX 000000 ppp...` (`width` filler bytes), one message each.
pub fn lines(prefix: &str, n: usize, width: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix} {i:06} {}\n", "p".repeat(width)))
        .collect()
}

/// Builds `targets` (cargo arguments such as `--example producer` or `-p embar-capi`) with
/// the profile and target directory of this test binary, and returns that profile's output
/// directory (where `examples/` and `libembar.so` land). A plain `cargo test` has built
/// them already and this is a no-op; `cargo test --test NAME` builds only NAME.
pub fn cargo_build(targets: &[&str]) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile dir>/deps/<this test>
    let out = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target_dir = out.parent().unwrap();
    let profile = if out.ends_with("release") {
        "release"
    } else {
        "test"
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--profile", profile, "--target-dir"])
        .arg(target_dir)
        .args(targets)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build {targets:?} failed");
    out
}

/// Runs `cmd` and returns its output, failing the test if it does not end within `limit`.
pub fn output_within(mut cmd: Command, limit: std::time::Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("the command runs"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not end within {limit:?}");
        }
    }
}
