//! Processes that died but were never reaped (zombies) hold nothing: not publisher sessions
//! (more zombie publishers than a broker has session slots, then a fresh publish works) and
//! not a subscriber's position (a zombie subscriber registered at the start of the log, then
//! a publish of more than the whole pool completes).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use embar_dataplane::pool::{OpenOptions, Pool};
use embar_sys::process::ProcessId;
use embar_test_support::{exe, serial, wait_for_exit, wait_until, Cluster};
use serde_json::Value;

/// The longest wait for any one condition below.
const LIMIT: Duration = Duration::from_secs(60);

/// The process state letter `/proc` shows for `pid` (`Z` for a zombie).
fn state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Kills `child` and leaves it unreaped; returns once the kernel shows it as a zombie.
fn make_zombie(child: &mut Child) {
    let pid = child.id();
    // SAFETY: `pid` is our unreaped child, so the number cannot name another process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_until(&format!("process {pid} to be a zombie"), LIMIT, || {
        state(pid) == Some('Z')
    });
}

/// Pids of the processes that hold a live session on any broker of `pool`.
fn session_holders(pool: &Pool) -> Vec<u32> {
    use std::sync::atomic::Ordering::Acquire;
    let mut out = Vec::new();
    for b in 0..pool.geometry().max_brokers {
        for i in 0..embar_dataplane::session::SESSIONS {
            let s = pool.session(b, i).unwrap();
            let (state, accepted) = (s.state.load(Acquire), s.accepted.load(Acquire));
            if embar_dataplane::session::is_live(state, accepted) {
                out.push(ProcessId::unpack(s.pid.load(Acquire)).pid);
            }
        }
    }
    out
}

#[test]
fn zombie_publishers_and_a_zombie_subscriber_hold_nothing() {
    let _serial = serial();
    let c = Cluster::up(
        "zombies",
        &["--pool-bytes", "256MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("z", &[]);
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/cluster.json", c.dir)).unwrap())
            .unwrap();
    let pool = Pool::open(
        file["pool"].as_str().unwrap().as_ref(),
        &OpenOptions::default(),
    )
    .unwrap();

    // A subscriber registered at the start of the log, then killed and never reaped.
    let mut sub = c.spawn(
        &[
            "subscribe",
            "--topic",
            "z",
            "--from",
            "oldest",
            "--pause-ms",
            "1",
        ],
        None,
    );
    let mut first = String::new();
    BufReader::new(sub.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("registered at delivery index 0"), "{first}");
    make_zombie(&mut sub);

    // More zombie publishers than a broker has session slots: each holds its sessions (its
    // stdin is open and empty) until it is killed, and is never reaped.
    let slots = embar_dataplane::session::SESSIONS as usize;
    let mut zombies = Vec::new();
    for _ in 0..slots + 4 {
        let mut p = Command::new(exe())
            .args(["publish", "--topic", "z", "--control", &c.control])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = p.id();
        wait_until(
            &format!("publisher {pid} to open its sessions"),
            LIMIT,
            || session_holders(&pool).contains(&pid),
        );
        make_zombie(&mut p);
        zombies.push(p);
    }
    wait_until(
        "the brokers to reclaim the zombies' sessions",
        LIMIT,
        || {
            let holders = session_holders(&pool);
            !zombies.iter().any(|z| holders.contains(&z.id()))
        },
    );

    // More than the whole pool (256 MiB): it completes only if the zombie subscriber's
    // position holds nothing back.
    let line = format!("{}\n", "z".repeat(999));
    let lines = 300 * 1024;
    let mut publisher = Command::new(exe())
        .args(["publish", "--topic", "z", "--control", &c.control])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = publisher.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..lines {
            if input.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
    });
    let status = wait_for_exit(&mut publisher, Duration::from_secs(120))
        .expect("a 300 MiB publish did not finish in 120 s: something holds the pool");
    writer.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut publisher.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");

    // The zombies are still zombies: nothing above reaped them.
    assert_eq!(state(sub.id()), Some('Z'));
    assert!(zombies.iter().all(|z| state(z.id()) == Some('Z')));
    for mut z in zombies.into_iter().chain([sub]) {
        z.wait().unwrap();
    }
}

/// Exit code of a process whose pool file was truncated under it (`EX_IOERR`).
const POOL_LOST: i32 = 74;

#[test]
fn a_pool_file_truncated_under_the_cluster_is_named_by_every_process_and_by_status() {
    let _serial = serial();
    let c = Cluster::up(
        "truncated",
        &["--pool-bytes", "64MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &[]);
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/cluster.json", c.dir)).unwrap())
            .unwrap();
    let pool = file["pool"].as_str().unwrap().to_string();
    let mut sub = c.spawn(&["subscribe", "--topic", "t", "--pause-ms", "1"], None);
    let mut err = BufReader::new(sub.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.contains("registered at delivery index 0"), "{first}");

    // Someone with write access truncates the pool file to its first page.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pool)
        .unwrap()
        .set_len(4096)
        .unwrap();

    // The subscriber stops with the reason, not a silent bus error.
    let status = wait_for_exit(&mut sub, Duration::from_secs(30)).expect("the subscriber runs on");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(status.code(), Some(POOL_LOST), "{status:?}: {rest}");
    assert!(rest.contains(&format!("pool file {pool}")), "{rest}");
    assert!(rest.contains("truncated or replaced"), "{rest}");

    // The brokers stop the same way, each saying why in its log.
    for b in 0..2 {
        let log = format!("{}/broker-{b}.log", c.dir);
        wait_until(
            &format!("broker {b} to name the truncated pool"),
            LIMIT,
            || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("truncated or replaced")),
        );
    }
    // `cluster status` says what is wrong instead of all being well.
    let (ok, out, err) = c.embar(&["cluster", "status"]);
    assert!(!ok, "{out}");
    assert!(err.contains("truncated or replaced"), "{err}");
}
