//! The `embar` exit codes (README, "Exit status"; `embar --help`): each documented code for a
//! real situation, with real processes: a bad flag, no control process listening, an unknown
//! topic, input that cannot be published, acknowledgements that never come. Every failure
//! prints exactly one `embar: ...` line on stderr.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use embar_test_support::{exe, serial, Cluster};
use serde_json::Value;

const USAGE: i32 = 2;
const DATA_ERROR: i32 = 65;
const NOT_FOUND: i32 = 66;
const UNAVAILABLE: i32 = 69;
const TIMED_OUT: i32 = 75;

/// A small pool: the cluster comes up quickly and nothing here needs log space.
const SMALL_POOL: [&str; 4] = ["--pool-bytes", "64MiB", "--segment-bytes", "1MiB"];

/// Runs `embar ARGS` with `stdin` (raw bytes: not necessarily UTF-8) and waits for it.
fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(exe())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("embar starts");
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    // A writer thread, so that a process that exits without reading all of it cannot block
    // the test on a full pipe.
    std::thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    child.wait_with_output().expect("embar runs")
}

/// Asserts the exit code, and that stderr holds exactly one `embar: ` line, containing
/// `needle`.
#[track_caller]
fn assert_exit(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("embar: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one `embar:` line expected; stderr: {stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "{needle:?} not in {:?}; stderr: {stderr}",
        lines[0]
    );
}

/// An address where nothing listens: a port the system handed out and that was closed.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn a_bad_flag_exits_with_the_usage_code() {
    let out = run(&["publish", "--topic", "t", "--no-such-flag"], b"");
    assert_eq!(out.status.code(), Some(USAGE));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    let out = run(&["subscribe", "--topic", "t", "--from", "yesterday"], b"");
    assert_exit(&out, USAGE, "--from \"yesterday\"");
}

#[test]
fn the_help_documents_every_exit_code() {
    let out = run(&["--help"], b"");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for code in [0, 1, USAGE, DATA_ERROR, NOT_FOUND, UNAVAILABLE, TIMED_OUT] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "exit code {code} is not in `embar --help`: {help}"
        );
    }
}

#[test]
fn no_control_process_listening_exits_unavailable() {
    let control = closed_port();
    let needle = "cannot reach the control process";
    for args in [
        &["topic", "list"][..],
        &["topic", "describe", "t"],
        &["cluster", "status"],
        &["publish", "--topic", "t"],
        &["subscribe", "--topic", "t"],
    ] {
        let out = run(&[args, &["--control", &control]].concat(), b"m\n");
        assert_exit(&out, UNAVAILABLE, needle);
    }
}

#[test]
fn a_missing_pool_exits_not_found_and_a_file_that_is_no_pool_exits_data_error() {
    let missing = format!("/tmp/embar-exit-missing-{}.pool", std::process::id());
    let out = run(&["pool", "inspect", "--path", &missing], b"");
    assert_exit(&out, NOT_FOUND, &format!("cannot open {missing}"));
    let zeros = format!("/tmp/embar-exit-zeros-{}.pool", std::process::id());
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    let out = run(&["pool", "inspect", "--path", &zeros], b"");
    std::fs::remove_file(&zeros).unwrap();
    assert_exit(&out, DATA_ERROR, "is not an Embarcadero pool");
}

#[test]
fn an_unknown_topic_exits_not_found() {
    let _serial = serial();
    let c = Cluster::up("exit-unknown", &SMALL_POOL);
    let control = ["--control", c.control.as_str()];
    for args in [
        &["topic", "describe", "nope"][..],
        &["topic", "delete", "nope"],
        &["publish", "--topic", "nope"],
        &["subscribe", "--topic", "nope"],
    ] {
        let out = run(&[args, &control].concat(), b"m\n");
        assert_exit(&out, NOT_FOUND, "unknown topic \"nope\"");
    }
}

#[test]
fn input_that_cannot_be_published_exits_with_the_data_error_code() {
    let _serial = serial();
    let c = Cluster::up("exit-data", &SMALL_POOL);
    c.topic("t", &["--batch-bytes", "64KiB"]);
    let publish = ["publish", "--topic", "t", "--control", c.control.as_str()];
    // The second line is not UTF-8.
    let out = run(&publish, b"fine\n\xff\xfe\nnever\n");
    assert_exit(&out, DATA_ERROR, "stdin line 2: not UTF-8");
    // It says how far it got, so that a retry resends only the rest.
    assert_exit(
        &out,
        DATA_ERROR,
        "lines 1..=1 before it were published (1 acknowledged); nothing after it was; to go on, resend from line 2",
    );
    // A line larger than a batch of the topic.
    let mut big = vec![b'x'; 128 << 10];
    big.push(b'\n');
    let out = run(&publish, &big);
    assert_exit(&out, DATA_ERROR, "does not fit a batch");
    // With --validate-first a bad line anywhere publishes nothing at all.
    c.topic("v", &["--batch-bytes", "64KiB"]);
    let checked = ["publish", "--topic", "v", "--validate-first"];
    let checked = [&checked[..], &["--control", c.control.as_str()]].concat();
    let out = run(&checked, b"fine\nfine too\n\xff\xfe\n");
    assert_exit(&out, DATA_ERROR, "stdin line 3: not UTF-8");
    assert_exit(&out, DATA_ERROR, "nothing was published (--validate-first)");
    let out = run(&checked, &[&b"fine\n"[..], &big].concat());
    assert_exit(&out, DATA_ERROR, "stdin line 2");
    assert_exit(&out, DATA_ERROR, "does not fit a batch");
    let everything = [
        "subscribe",
        "--topic",
        "v",
        "--from",
        "oldest",
        "--idle-timeout-s",
        "1",
        "--control",
        c.control.as_str(),
    ];
    let out = run(&everything, b"");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And good input goes through whole.
    let out = run(&checked, b"one\ntwo\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&everything, b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
    // A reader that goes away (`embar cluster status | head -0`) ends it quietly, no panic.
    let mut child = Command::new(exe())
        .args(["cluster", "status", "--control", c.control.as_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    {
        use std::os::unix::process::ExitStatusExt;
        const SIGPIPE: i32 = 13;
        assert!(
            out.status.success() || out.status.signal() == Some(SIGPIPE),
            "{:?}: {err}",
            out.status
        );
    }
    // A topic setting the system refuses.
    let out = run(
        &[
            "topic",
            "create",
            "bad name",
            "--control",
            c.control.as_str(),
        ],
        b"",
    );
    assert_exit(&out, DATA_ERROR, "bad name");
}

/// Resumes a stopped process however the test ends, so that the cluster can stop.
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

#[test]
fn acknowledgements_that_never_come_exit_timed_out() {
    let _serial = serial();
    let c = Cluster::up("exit-timeout", &SMALL_POOL);
    c.topic("t", &["--batch-bytes", "64KiB"]);
    // Broker 0 runs the sequencer: stopped, it answers no session and orders nothing.
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/cluster.json", c.dir)).unwrap())
            .unwrap();
    let broker0 = file["pids"][1].as_u64().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &broker0])
        .status()
        .unwrap()
        .success());
    let _resume = Resume(broker0);
    let start = std::time::Instant::now();
    let out = run(
        &[
            "publish",
            "--topic",
            "t",
            "--control",
            c.control.as_str(),
            "--ack-timeout-s",
            "1",
            "--wait-timeout-s",
            "1",
        ],
        b"m1\nm2\n",
    );
    assert_exit(&out, TIMED_OUT, "timed out");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}
