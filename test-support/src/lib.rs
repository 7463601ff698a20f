//! The harness of the tests that start real processes (`tests/*.rs` of the `embar` package).
//!
//! - [`exe`]: the `embar` binary under test; [`embar`] runs it.
//! - [`Cluster`]: a local cluster started with `embar cluster up`, stopped however the test
//!   ends; [`serial`] runs such tests one at a time.
//! - Readiness, never a fixed sleep: [`wait_until`] a condition holds (with a deadline and
//!   the condition named in the failure), and its common cases: [`wait_for_port`] (a port
//!   answering), [`wait_for_status`] (a field of the control process's status),
//!   [`wait_for_file`] (a file appearing), [`wait_for_exit`] (a process ending),
//!   [`Lines::wait_for`] (a line of a process's output). [`assert_holds`] checks that a
//!   condition stays true for a while (what a test of "nothing happens" needs).
//! - [`FedPublisher`]: an `embar publish` process fed lines for as long as a test runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often a wait looks at its condition.
const POLL: Duration = Duration::from_millis(10);

/// The `embar` binary under test: `EMBAR_BIN` if set (the rxe VM mounts the host's build
/// elsewhere), else the one cargo built beside the running test binary
/// (`target/<profile>/embar`; cargo builds it before the package's tests).
pub fn exe() -> String {
    if let Ok(bin) = std::env::var("EMBAR_BIN") {
        return bin;
    }
    let test = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test>-<hash>
    let bin = test
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(format!("embar{}", std::env::consts::EXE_SUFFIX)))
        .expect("a test binary inside target/<profile>/deps");
    assert!(
        bin.is_file(),
        "no embar binary at {} (run the tests with cargo, or set EMBAR_BIN)",
        bin.display()
    );
    bin.display().to_string()
}

/// Runs `embar ARGS` to the end: (success, stdout, stderr).
pub fn embar(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(exe())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("embar runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The cluster tests run one at a time: each starts several polling processes, and a 2-core
/// machine running two such clusters at once measures the scheduler, not the system.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `cond` became true within `limit` (looked at every few milliseconds).
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `cond` is true; fails the test, naming `what`, if it is not within `limit`.
#[track_caller]
pub fn wait_until(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    assert!(
        wait_for(limit, cond),
        "timed out after {limit:?} waiting for {what}"
    );
}

/// Checks that `cond` stays true for `period` (looked at every few milliseconds); fails the
/// test, naming `what`, the first time it is false.
#[track_caller]
pub fn assert_holds(what: &str, period: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < period {
        assert!(cond(), "{what} stopped holding after {:?}", start.elapsed());
        std::thread::sleep(POLL);
    }
    assert!(cond(), "{what} stopped holding at {period:?}");
}

/// Waits until something accepts connections at `addr`.
#[track_caller]
pub fn wait_for_port(addr: SocketAddr, limit: Duration) {
    wait_until(&format!("a listener at {addr}"), limit, || {
        TcpStream::connect_timeout(&addr, POLL).is_ok()
    });
}

/// Waits until `path` exists.
#[track_caller]
pub fn wait_for_file(path: &Path, limit: Duration) {
    wait_until(&format!("{}", path.display()), limit, || path.exists());
}

/// Waits until the status of the control process at `control` satisfies `cond`; returns
/// that status. A status that cannot be had (the control process restarting) is waited out.
#[track_caller]
pub fn wait_for_status(
    control: &str,
    what: &str,
    limit: Duration,
    mut cond: impl FnMut(&Value) -> bool,
) -> Value {
    let client = embar_control::ControlClient::new(control.parse().expect("an address"));
    let mut last = Value::Null;
    let ok = wait_for(limit, || match client.status() {
        Ok(s) => {
            let done = cond(&s);
            last = s;
            done
        }
        Err(_) => false,
    });
    assert!(
        ok,
        "timed out after {limit:?} waiting for {what}; last status: {last}"
    );
    last
}

/// Waits up to `limit` for `child` to exit; `None` if it did not (it is left running).
pub fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_for(limit, || {
        status = child.try_wait().expect("the child can be waited for");
        status.is_some()
    });
    status
}

/// Whether process `pid` is running (not exited, not a zombie).
pub fn alive(pid: u32) -> bool {
    embar_sys::process::alive(pid as i32)
}

/// The lines a process writes on one of its pipes, read as they come by a thread of their
/// own (so the process never blocks on a full pipe): a test waits for a line that says the
/// process is ready, and gets everything at the end.
pub struct Lines {
    rx: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    /// The child's stderr (taken from it; it must be piped).
    pub fn stderr(child: &mut Child) -> Lines {
        Lines::of(child.stderr.take().expect("stderr is piped"))
    }

    pub fn of(pipe: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; returns it. Fails the test, showing what the
    /// process wrote, if none comes within `limit` or the pipe closes first.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => {
                    let why = match e {
                        RecvTimeoutError::Timeout => format!("none within {limit:?}"),
                        RecvTimeoutError::Disconnected => "the pipe closed first".into(),
                    };
                    panic!(
                        "waiting for a line with {needle:?}: {why}; the process wrote:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Every line, once the pipe closes (the process exited).
    pub fn all(mut self) -> String {
        self.seen.extend(self.rx.iter());
        let mut text = self.seen.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        text
    }
}

/// An `embar publish` process fed lines `WHO NNNNNNN qqq...` (200 bytes each, numbered from
/// 0) in chunks for as long as the test runs, and at least 5,000 of them: a steady load that
/// outlasts the kills of a failure test. The 10 ms between chunks of `chunk` lines paces the
/// load (500: about 50,000 lines a second, without filling disks); it waits for nothing.
pub struct FedPublisher {
    child: Child,
    feeder: std::thread::JoinHandle<usize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FedPublisher {
    /// Starts `embar publish --topic TOPIC --transport TRANSPORT EXTRA --control ...`.
    pub fn start(
        c: &Cluster,
        topic: &str,
        who: &'static str,
        transport: &str,
        extra: &[&str],
        chunk: usize,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut child = Command::new(exe())
            .args(["publish", "--topic", topic, "--transport", transport])
            .args(extra)
            .args(["--control", &c.control])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("embar runs");
        let mut stdin = child.stdin.take().expect("piped");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let feeding = stop.clone();
        let feeder = std::thread::spawn(move || {
            let mut n = 0usize;
            while !feeding.load(Ordering::Relaxed) || n < 5_000 {
                let lines: String = (n..n + chunk)
                    .map(|i| format!("{who} {i:07} {}\n", "q".repeat(186 - who.len())))
                    .collect();
                if stdin.write_all(lines.as_bytes()).is_err() {
                    break;
                }
                n += chunk;
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        });
        FedPublisher {
            child,
            feeder,
            stop,
        }
    }

    /// Stops feeding it (it publishes what it was given, then exits).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops feeding it and waits for it: the lines it was fed, and its output.
    pub fn finish(self) -> (usize, Output) {
        self.stop();
        let n = self.feeder.join().expect("the feeder");
        (n, self.child.wait_with_output().expect("it was started"))
    }

    /// Kills it (a test that failed).
    pub fn kill(&mut self) -> Output {
        let _ = self.child.kill();
        self.stop();
        Output {
            status: self.child.wait().expect("it was started"),
            stdout: Vec::new(),
            stderr: {
                let mut e = Vec::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_end(&mut e);
                }
                e
            },
        }
    }
}

/// A cluster started with `embar cluster up`, stopped however the test ends.
pub struct Cluster {
    pub dir: String,
    pub control: String,
}

impl Cluster {
    /// Two brokers unless `extra` says `--brokers`. `cluster up` returns once every broker
    /// is live.
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
            .expect("embar runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = read_json(&PathBuf::from(format!("{dir}/cluster.json")));
        Cluster {
            control: file["control"]
                .as_str()
                .expect("a control address")
                .to_string(),
            dir,
        }
    }

    /// What `cluster up` wrote in `DIR/cluster.json` (control address, pool, pids).
    pub fn file(&self) -> Value {
        read_json(&PathBuf::from(format!("{}/cluster.json", self.dir)))
    }

    /// The control process's status.
    /// The pid of the live broker in pool slot `slot`.
    #[track_caller]
    pub fn broker_pid(&self, slot: u32) -> u32 {
        self.status()["brokers"]
            .as_array()
            .expect("brokers")
            .iter()
            .find(|b| b["slot"].as_u64() == Some(u64::from(slot)) && b["alive"] == true)
            .and_then(|b| b["addresses"]["pid"].as_str()?.parse().ok())
            .expect("a live broker in that slot")
    }

    /// Whether a live broker holds pool slot `slot`.
    pub fn slot_live(&self, slot: u32) -> bool {
        self.status()["brokers"].as_array().is_some_and(|a| {
            a.iter()
                .any(|b| b["slot"].as_u64() == Some(u64::from(slot)) && b["alive"] == true)
        })
    }

    pub fn status(&self) -> Value {
        embar_control::ControlClient::new(self.control.parse().expect("an address"))
            .status()
            .expect("the control process answers")
    }

    /// Waits until the status satisfies `cond`; returns it.
    #[track_caller]
    pub fn wait_for_status(
        &self,
        what: &str,
        limit: Duration,
        cond: impl FnMut(&Value) -> bool,
    ) -> Value {
        wait_for_status(&self.control, what, limit, cond)
    }

    /// The value of metric `name` (a counter's full name, `..._total`) on the Prometheus
    /// endpoint of the live broker in pool slot `slot`; 0 when it is not shown.
    pub fn metric(&self, slot: u64, name: &str) -> u64 {
        let st = self.status();
        let addr = st["brokers"]
            .as_array()
            .expect("brokers")
            .iter()
            .find(|b| b["slot"] == slot && b["alive"] == true)
            .and_then(|b| b["addresses"]["metrics"].as_str())
            .expect("a metrics address")
            .to_string();
        scrape(&addr, name)
    }

    /// Metric `name` summed over every live broker's endpoint.
    pub fn metric_sum(&self, name: &str) -> u64 {
        let st = self.status();
        st["brokers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["alive"] == true)
            .filter_map(|b| b["addresses"]["metrics"].as_str())
            .map(|addr| scrape(addr, name))
            .sum()
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
        self.spawn(args, stdin)
            .wait_with_output()
            .expect("embar runs")
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
            .expect("embar starts");
        let mut input = c.stdin.take().expect("stdin is piped");
        let text = stdin.unwrap_or_default();
        // A writer thread, so that a process that exits without reading all of it cannot
        // block the test on a full pipe.
        std::thread::spawn(move || {
            let _ = input.write_all(text.as_bytes());
        });
        c
    }

    /// Whether a subscriber's cursor holds `topic`'s log (a registered subscriber).
    pub fn subscriber_holds(&self, topic: &str) -> bool {
        use embar_dataplane::pool::coherence::Coherent;
        let pool = embar_dataplane::pool::Pool::open(
            self.file()["pool"].as_str().expect("a pool path").as_ref(),
            &Default::default(),
        )
        .expect("the cluster's pool opens");
        let slot = pool.find_topic(Coherent, topic).expect("the topic");
        let st = pool.sequencer_state(slot);
        embar_dataplane::client::subscriber::slowest_position(st, Coherent, |_, _, _| true)
            .is_some()
    }

    /// Waits (`limit` at most) until no subscriber's cursor holds `topic`'s log: what a
    /// dropped or departed subscriber must leave behind.
    #[track_caller]
    pub fn wait_no_subscriber_holds(&self, topic: &str, limit: Duration) {
        wait_until("no subscriber holds the topic", limit, || {
            !self.subscriber_holds(topic)
        });
    }

    /// Runs a rogue publisher with `fault` on topic `t` and checks that its batch was rejected
    /// with a reason containing one of `needles` (`|`-separated).
    #[track_caller]
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
        let r: Value = serde_json::from_str(out.trim()).expect("a JSON report");
        assert_eq!(r["rejected"], true, "{fault}: {r}");
        let error = r["error"].as_str().expect("an error");
        assert!(
            needles.split('|').any(|n| error.contains(n)),
            "{fault}: {r}"
        );
    }

    #[track_caller]
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
        // EMBAR_TEST_KEEP=1 keeps the logs of the cluster for a look after the test.
        if std::env::var_os("EMBAR_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The value of metric `name` on the Prometheus endpoint at `addr` (0 when not shown).
fn scrape(addr: &str, name: &str) -> u64 {
    let body = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .expect("the metrics endpoint")
        .body_mut()
        .read_to_string()
        .expect("a text body");
    body.lines()
        // `name{labels} value`, or `name value`.
        .find(|l| !l.starts_with('#') && l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `n` lines `PREFIX 000000 ppp...` (`width` filler bytes), one message each.
pub fn lines(prefix: &str, n: usize, width: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix} {i:06} {}\n", "p".repeat(width)))
        .collect()
}

/// Line `i` of a test that checks every byte it reads back: its index (8 digits), a space,
/// then `filler` letters derived from the index (a xorshift stream), so that any byte of
/// another message, or of nothing, is caught.
pub fn numbered_line(i: u64, filler: usize) -> String {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let filler: String = (0..filler)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    format!("{i:08} {filler}")
}

/// The number in `text` right after `key` (an error message's total order, a summary's
/// count); panics naming both when there is none.
#[track_caller]
pub fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} in {text}"))
        + key.len();
    text[at..]
        .trim_start()
        .split(|ch: char| !ch.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("a number after {key:?} in {text}"))
}

/// The summary line of a passing `embar subscribe --check-order` (its stderr), after checking
/// that it exited 0.
#[track_caller]
pub fn order_check_passed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {err}", out.status);
    err.lines()
        .find(|l| l.starts_with("order check passed:"))
        .unwrap_or_else(|| panic!("no order check summary in {err:?}"))
        .to_string()
}

/// Waits for `child` to exit and checks that it succeeded (its stderr says why not).
#[track_caller]
pub fn succeeded(child: Child) -> Output {
    let out = child.wait_with_output().expect("the child's output");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Freezes process `pid` (SIGSTOP) and returns once every thread of it is stopped: a signal
/// reaches a process's threads one by one, and a polling thread runs on until its own turn.
pub fn freeze(pid: u32) {
    signal(pid, "-STOP");
    wait_until(
        "every thread of the process stopped",
        Duration::from_secs(10),
        || embar_sys::process::all_threads_stopped(pid),
    );
}

/// Sends `signal` (`-KILL`, `-TERM`, `-STOP`, ...) to process `pid` through the `kill`
/// command (no unsafe code in tests).
#[track_caller]
pub fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {signal} {pid}");
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
        // The workspace root (this crate is one of its members).
        .current_dir(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("a workspace"),
        )
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

/// The command line of process `pid` (to start a process again exactly as it was).
pub fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the process's command line");
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect()
}
