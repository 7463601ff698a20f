//! Retention as real processes: a subscriber that falls behind `--retention-bytes` is never
//! handed reused bytes (every payload byte is checked) and gets an error naming total orders it
//! can restart from; the limit keeps at least what it says; short publish sessions do not pin
//! whole segments.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use embar_test_support::{
    number_after, numbered_line, serial, wait_for, wait_for_exit, Cluster, Lines,
};
use serde_json::Value;

/// Payload bytes after each line's index.
const FILLER_BYTES: usize = 1000;

/// Line `i`: its index, then filler bytes derived from it.
fn line(i: u64) -> String {
    numbered_line(i, FILLER_BYTES)
}

/// Waits for `child` to exit, up to `limit`; kills it past that. Whether it succeeded, and
/// its stderr (if still piped).
fn wait_with_deadline(mut child: Child, limit: Duration) -> (bool, String) {
    let err = child.stderr.take().map(Lines::of);
    let Some(status) = wait_for_exit(&mut child, limit) else {
        let _ = child.kill();
        panic!("process still running after {limit:?}");
    };
    (status.success(), err.map(Lines::all).unwrap_or_default())
}

/// Waits (up to 20 s) until the retention floor of topic `name` (the delivery index below
/// which its log space is reclaimed, highest over brokers) has not moved for 300 ms: once a
/// publisher exits, its broker closes its session and may then reclaim the grants it held,
/// so the floor moves once more after the publish is over.
fn wait_for_settled_floor(c: &Cluster, name: &str) {
    use embar_dataplane::pool::coherence::{Coherence, Coherent};
    use embar_dataplane::pool::{OpenOptions, Pool};
    let pool = Pool::open(
        c.file()["pool"].as_str().unwrap().as_ref(),
        &OpenOptions::default(),
    )
    .unwrap();
    let slot = pool.find_topic(Coherent, name).unwrap();
    let floor = || {
        let t = pool.tinode(slot);
        (0..pool.geometry().max_brokers as usize)
            .map(|b| Coherent.observe(&t.brokers[b].broker.reclaimed_below))
            .max()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut seen, mut since) = (floor(), Instant::now());
    while since.elapsed() < Duration::from_millis(300) {
        assert!(Instant::now() < deadline, "the retention floor kept moving");
        std::thread::sleep(Duration::from_millis(10));
        let now = floor();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
}

/// `pool.segments_in_use` from `embar cluster status --json`.
fn segments_in_use(c: &Cluster) -> u64 {
    let (ok, out, err) = c.embar(&["cluster", "status", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["pool"]["segments_in_use"].as_u64().unwrap()
}

#[test]
fn a_slow_subscriber_past_the_retention_limit_gets_only_intact_messages_then_an_error_naming_total_orders(
) {
    let _serial = serial();
    let c = Cluster::up(
        "ret-slow",
        &[
            "--pool-bytes",
            "256MiB",
            "--segment-bytes",
            "4MiB",
            "--retention-bytes",
            "16MiB",
        ],
    );
    c.topic("slow", &[]);
    // More than twice the pool (256 MiB): the log space of the first batches is reused while the
    // subscriber sits in the middle of one of them.
    let n: u64 = 600_000;
    // From a file, so that every batch is full (the subscriber, stopped, holds the delivery
    // ring: a few hundred batches, not the ring's 8,192 entries, are ordered past it).
    let input = format!("{}/input.txt", c.dir);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    for i in 0..n {
        writeln!(file, "{}", line(i)).unwrap();
    }
    drop(file);
    // Registered before anything is published (it says so on stderr), then its stdout is not
    // read: it stops in the middle of the first batch, on a full pipe.
    let mut sub = c.spawn(
        &[
            "subscribe",
            "--topic",
            "slow",
            "--pause-ms",
            "1",
            "--idle-timeout-s",
            "10",
        ],
        None,
    );
    let mut stderr = BufReader::new(sub.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(first.contains("registered at delivery index 0"), "{first}");
    let started = Instant::now();
    let publisher = Command::new(embar_test_support::exe())
        .args(["publish", "--topic", "slow", "--control", &c.control])
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, err) = wait_with_deadline(publisher, Duration::from_secs(120));
    assert!(ok, "the publisher waited for the slow subscriber: {err}");
    eprintln!("published {n} messages in {:?}", started.elapsed());
    // The oldest position the subscriber's error will name must still be there for the
    // restart below: let the reclaim that follows the publisher's exit finish first.
    wait_for_settled_floor(&c, "slow");
    // Now read everything the subscriber prints; it ends with the error.
    let mut out = sub.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        out.read_to_end(&mut s).unwrap();
        String::from_utf8_lossy(&s).into_owned()
    });
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (ok, _) = wait_with_deadline(sub, Duration::from_secs(20));
    let text = reader.join().unwrap();
    let err = rest.join().unwrap();
    let got: Vec<&str> = text.lines().collect();
    assert!(!got.is_empty(), "the subscriber printed nothing: {err}");
    for (k, l) in got.iter().enumerate() {
        assert_eq!(
            *l,
            line(k as u64),
            "line {k} of {} is not message {k}: reused or torn bytes",
            got.len()
        );
    }
    assert!(
        !ok,
        "{} of {n} lines and no error: the subscriber was not behind",
        got.len()
    );
    assert!(err.contains("fell behind the retention limit"), "{err}");
    // The error names where the subscriber was (the next total order it would have printed)
    // and the oldest total order still retained, both usable with `--from`.
    let position = number_after(&err, "at total order");
    let oldest = number_after(&err, "oldest retained is total order");
    assert_eq!(position, got.len() as u64, "{err}");
    assert!(oldest > position && oldest < n, "{err}");
    let from = oldest.to_string();
    let (ok, text, err) = c.embar(&[
        "subscribe",
        "--topic",
        "slow",
        "--from",
        &from,
        "--count",
        "3",
        "--idle-timeout-s",
        "5",
    ]);
    assert!(ok, "{err}");
    let again: Vec<&str> = text.lines().collect();
    assert_eq!(again.len(), 3, "{err}");
    for (k, l) in again.iter().enumerate() {
        assert_eq!(*l, line(oldest + k as u64));
    }
}

/// Eight publishes of one line each (eight publish sessions), then a subscriber from the
/// oldest position must see all eight, and the sessions, closed, must not pin whole segments.
fn short_publishes_stay_readable_and_small(name: &str, extra: &[&str]) {
    let _serial = serial();
    let mut args = vec!["--pool-bytes", "256MiB", "--segment-bytes", "4MiB"];
    args.extend(extra);
    let c = Cluster::up(name, &args);
    c.topic("few", &[]);
    for i in 0..8 {
        let out = c.run(
            &["publish", "--topic", "few"],
            Some(format!("{}\n", line(i))),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // One segment per broker holds all eight (sessions after the first continue in the
    // space the previous one left); at most one more each where a grant spilled over. A
    // closed session's unused grants are given back within a few polls of the broker.
    let mut used = 0;
    wait_for(Duration::from_secs(5), || {
        used = segments_in_use(&c);
        used <= 4
    });
    assert!(
        used <= 4,
        "{used} segments in use after 8 one-line publish sessions"
    );
    let (ok, text, err) = c.embar(&[
        "subscribe",
        "--topic",
        "few",
        "--from",
        "oldest",
        "--count",
        "8",
        "--idle-timeout-s",
        "3",
    ]);
    assert!(ok, "{err}");
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 8, "from the oldest: {} of 8 messages", got.len());
    for (i, l) in got.iter().enumerate() {
        assert!(*l == line(i as u64), "message {i} is not line {i}");
    }
}

#[test]
fn without_a_retention_limit_the_oldest_subscriber_sees_every_short_publish_and_sessions_pin_little(
) {
    short_publishes_stay_readable_and_small("ret-none", &[]);
}

#[test]
fn a_retention_limit_keeps_at_least_its_bytes_and_short_sessions_pin_little() {
    short_publishes_stay_readable_and_small("ret-16m", &["--retention-bytes", "16MiB"]);
}
