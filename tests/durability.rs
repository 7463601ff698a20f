//! Replication to disk and ACK 2 with real processes and real files: every message a
//! publisher saw acknowledged at ACK 2 is in the disk log of every broker of its batch's
//! replica set (read back by `embar log dump`, which verifies every CRC), also when a broker
//! is SIGKILLed mid-run; and `cluster down` then `cluster up` on the same directory brings
//! the topic back with its logs.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use embar_test_support::{
    cmdline, exe, lines, number_after, numbered_line, serial, signal, wait_until, Cluster,
};
use serde_json::Value;

const BROKERS: u32 = 3;
const RF: u8 = 2;

fn cluster_args() -> Vec<&'static str> {
    vec![
        "--brokers",
        "3",
        "--max-brokers",
        "3",
        "--pool-bytes",
        "256MiB",
        "--sync-interval-ms",
        "20",
    ]
}

/// [`cluster_args`], with a dead broker's slot re-placed after `ms` (0: never).
fn cluster_args_replacing(ms: &'static str) -> Vec<&'static str> {
    let mut a = cluster_args();
    a.extend(["--replace-after-ms", ms]);
    a
}

/// What the disk log of `topic` in broker directory `dir` holds: (payload, primary broker)
/// of every message, checked to be in strictly increasing total order within each era.
fn dump(dir: &str, topic: &str) -> Vec<(String, u32)> {
    let out = Command::new(exe())
        .args(["log", "dump", "--dir", dir, "--topic", topic])
        .output()
        .expect("embar runs");
    let err = String::from_utf8_lossy(&out.stderr);
    // A torn tail (what a full disk or a crash mid-write leaves) is left out: its records
    // were never synced, so never acked; recovery cuts it.
    let torn = out.status.code() == Some(65)
        && err.contains("the log ends at a record that does not verify");
    assert!(out.status.success() || torn, "log dump of {dir}: {err}");
    let mut last: Option<(u64, u64)> = None;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            // Total orders grow within a pool era (a new pool counts from 0 again).
            let (era, t) = (
                v["era"].as_u64().unwrap(),
                v["total_order"].as_u64().unwrap(),
            );
            assert!(
                last.is_none_or(|(e, p)| e != era || t > p),
                "{dir}: total order {t} after {last:?}"
            );
            last = Some((era, t));
            (
                v["payload"].as_str().unwrap().to_string(),
                v["broker"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

/// For every message of the logs of all brokers: the brokers whose log holds it, and the
/// broker its batch landed on.
fn holders(c: &Cluster, topic: &str) -> BTreeMap<String, (u32, BTreeSet<u32>)> {
    let mut m: BTreeMap<String, (u32, BTreeSet<u32>)> = BTreeMap::new();
    for b in 0..BROKERS {
        for (payload, primary) in dump(&format!("{}/broker-{b}", c.dir), topic) {
            let e = m.entry(payload).or_insert((primary, BTreeSet::new()));
            assert_eq!(e.0, primary, "one batch, one primary");
            assert!(e.1.insert(b), "a message twice in the log of broker {b}");
        }
    }
    m
}

/// Every message of `acked` is in the log of each broker of its replica set. Data
/// directories are by start order and slots are by registration; `cluster up` starts the
/// brokers one after the other, so broker-N holds slot N.
#[track_caller]
fn assert_on_every_replica(c: &Cluster, topic: &str, acked: &[String]) {
    let m = holders(c, topic);
    for p in acked {
        let Some((primary, on)) = m.get(p) else {
            panic!("acked message {p:?} is on no disk");
        };
        let want: BTreeSet<u32> =
            embar_dataplane::replication::replica_set(*primary, RF, BROKERS).collect();
        assert!(
            want.is_subset(on),
            "acked message {p:?} (landed on broker {primary}) is on the disks of {on:?}, its replica set is {want:?}"
        );
    }
}

/// The count in "... N acknowledged" (the publisher's acknowledged prefix).
fn acknowledged(stderr: &str) -> u64 {
    let Some(at) = stderr.rfind(" acknowledged") else {
        panic!("no acknowledged count in {stderr:?}");
    };
    let digits: String = stderr[..at]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().unwrap()
}

fn message_lines(prefix: &str, n: usize) -> (String, Vec<String>) {
    let text = lines(prefix, n, 40);
    let v = text.lines().map(str::to_string).collect();
    (text, v)
}

/// The replicated topic of these tests: ORDER 5, ACK 2, RF 2, small batches.
const ACK2_RF2: [&str; 8] = [
    "--order",
    "5",
    "--ack",
    "2",
    "--rf",
    "2",
    "--batch-bytes",
    "16KiB",
];

/// `cluster down` then `cluster up` on the cluster's directory (its data kept); the test's
/// handle follows the new control address.
fn restart(c: &mut Cluster) {
    let down = Command::new(exe())
        .args(["cluster", "down", "--dir", &c.dir])
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let up = Command::new(exe())
        .args(["cluster", "up", "--dir", &c.dir])
        .args(cluster_args())
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    c.control = c.file()["control"].as_str().unwrap().to_string();
}

#[test]
fn acked_messages_are_on_every_replica_disk_even_when_a_broker_is_killed() {
    let _g = serial();
    // Slot 2 is never re-placed: its batches wait for it (the next test re-places it).
    let c = Cluster::up("durable-kill", &cluster_args_replacing("0"));
    c.topic("t", &ACK2_RF2);

    // 1. A whole run, acked at ACK 2: every message on both replicas of its batch.
    let (text, all) = message_lines("calm", 5000);
    let out = c.run(&["publish", "--topic", "t"], Some(text));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(acknowledged(&err), 5000, "{err}");
    assert_on_every_replica(&c, "t", &all);

    // 2. SIGKILL the broker of slot 2 (not the sequencer's) while a publisher (the client
    // library, in this process) runs: every prefix it saw acknowledged is on the disks of
    // the replicas, the surviving ones included.
    let (_, all) = message_lines("kill", 40_000);
    let victim = c.broker_pid(2);
    let log = format!("{}/broker-2/topic-t/00000000000000000000.log", c.dir);
    let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let control = c.control.clone();
    let payloads = all.clone();
    let publisher = std::thread::spawn(move || {
        let client = embar_client::Client::builder()
            .control(control.as_str())
            .unwrap()
            .wait_timeout(Duration::from_secs(3))
            .connect()
            .unwrap();
        let mut p = client.publisher("t").unwrap();
        let mut acked = 0u64;
        for (i, m) in payloads.iter().enumerate() {
            if p.publish(m.as_bytes()).is_err() {
                break;
            }
            if i % 64 == 0 {
                match p.acked() {
                    Ok(n) => acked = acked.max(n),
                    Err(_) => break,
                }
            }
        }
        // What is acknowledged after the kill (until acks stop or fail).
        let _ = p.flush();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            match p.acked() {
                Ok(n) => acked = acked.max(n),
                Err(_) => break,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        acked
    });
    wait_until(
        "broker 2 appends the run's batches",
        Duration::from_secs(20),
        || std::fs::metadata(&log).is_ok_and(|m| m.len() > before + (64 << 10)),
    );
    signal(victim, "-KILL");
    let acked = publisher.join().unwrap() as usize;
    assert!(
        acked > 0,
        "nothing of the run was acknowledged before the kill"
    );
    assert_on_every_replica(&c, "t", &all[..acked]);

    // A subscriber of durable messages only sees every acknowledged one, and nothing that
    // is not on every disk of its replica set (batches that needed the killed broker after
    // it died are not).
    let out = c.run(
        &[
            "subscribe",
            "--topic",
            "t",
            "--durable-only",
            "--idle-timeout-s",
            "2",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let seen_set: BTreeSet<&String> = seen.iter().collect();
    assert!(
        all[..acked].iter().all(|m| seen_set.contains(m)),
        "an acknowledged message is missing from the durable subscriber's {} messages",
        seen.len()
    );
    assert_on_every_replica(&c, "t", &seen);
}

#[test]
fn a_cluster_brought_down_and_up_keeps_its_topic_and_its_logs() {
    let _g = serial();
    let mut c = Cluster::up("durable-restart", &cluster_args());
    c.topic("kept", &ACK2_RF2);
    let (text, before) = message_lines("before", 3000);
    let out = c.run(&["publish", "--topic", "kept"], Some(text));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    restart(&mut c);

    let (ok, list, err) = c.embar(&["topic", "list"]);
    assert!(
        ok && list.contains("kept") && list.contains("ACK 2 RF 2"),
        "{list}{err}"
    );
    assert_on_every_replica(&c, "kept", &before);

    // The cluster serves ACK 2 again, into the same logs.
    let (text, after) = message_lines("after", 1000);
    let out = c.run(&["publish", "--topic", "kept"], Some(text));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(acknowledged(&err), 1000, "{err}");
    assert_on_every_replica(&c, "kept", &before);
    assert_on_every_replica(&c, "kept", &after);

    // A torn tail (the last record cut short): the dump verifies and prints exactly the
    // records before it, says why it stopped, and exits with 65 (data error).
    let whole = dump(&format!("{}/broker-0", c.dir), "kept").len();
    let torn = format!("{}/torn/topic-kept", c.dir);
    std::fs::create_dir_all(&torn).unwrap();
    let seg = "00000000000000000000.log";
    let bytes = std::fs::read(format!("{}/broker-0/topic-kept/{seg}", c.dir)).unwrap();
    std::fs::write(format!("{torn}/{seg}"), &bytes[..bytes.len() - 10]).unwrap();
    let out = Command::new(exe())
        .args([
            "log",
            "dump",
            "--dir",
            &format!("{}/torn", c.dir),
            "--topic",
            "kept",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(
        err.contains("does not verify") && err.contains("short body"),
        "{err}"
    );
    let kept = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(kept < whole && kept > 0, "{kept} of {whole} messages");

    // --purge deletes the state and the logs.
    let down = Command::new(exe())
        .args(["cluster", "down", "--dir", &c.dir, "--purge"])
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for gone in ["control", "broker-0", "broker-1", "broker-2"] {
        let p = format!("{}/{gone}", c.dir);
        assert!(!std::path::Path::new(&p).exists(), "{p} survived --purge");
    }
}

#[test]
fn acked_messages_survive_a_sigkill_of_every_process_and_a_new_cluster_up() {
    let _g = serial();
    let mut c = Cluster::up("durable-killall", &cluster_args());
    c.topic("all", &ACK2_RF2);
    let (text, acked) = message_lines("acked", 3000);
    let out = c.run(&["publish", "--topic", "all"], Some(text));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(acknowledged(&err), 3000, "{err}");

    // Every process at once, no chance to sync or say goodbye.
    let pids: Vec<u32> = c.file()["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    for &pid in &pids {
        signal(pid, "-KILL");
    }
    wait_until("every process gone", Duration::from_secs(10), || {
        pids.iter().all(|p| !embar_test_support::alive(*p))
    });
    // `down` clears what is left (the pool, the cluster file); `up` brings the cluster back.
    restart(&mut c);
    let (ok, list, err) = c.embar(&["topic", "list"]);
    assert!(ok && list.contains("all"), "{list}{err}");
    assert_on_every_replica(&c, "all", &acked);
}

/// Mounts a tmpfs of `size` over `dir` (as root); `None` with the reason when it cannot.
fn mount_small_tmpfs(dir: &str, size: &str) -> Option<()> {
    std::fs::create_dir_all(dir).expect("the data directory");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "skipped: cannot mount a tmpfs over {dir} (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(())
}

#[test]
fn a_replica_on_a_full_disk_acks_nothing_it_could_not_sync_and_says_why() {
    a_full_disk_acks_nothing_unsynced_and_the_publisher_is_told_why("durable-full", "shm");
}

#[test]
fn a_tcp_publisher_is_told_which_replica_disk_is_full() {
    a_full_disk_acks_nothing_unsynced_and_the_publisher_is_told_why("durable-full-tcp", "tcp");
}

/// Broker 1's data directory on a 1 MiB tmpfs (as root; skipped otherwise): an ACK 2
/// publisher over `transport` times out naming broker 1's disk and the OS error, exits 75,
/// and every message it saw acknowledged is on each replica's disk.
fn a_full_disk_acks_nothing_unsynced_and_the_publisher_is_told_why(name: &str, transport: &str) {
    let _g = serial();
    let c = Cluster::up(name, &cluster_args());
    // Broker 1's data directory becomes a 1 MiB tmpfs before the topic exists (the broker
    // opens a topic's log when the topic appears).
    let dir = format!("{}/broker-1", c.dir);
    if mount_small_tmpfs(&dir, "1m").is_none() {
        return;
    }
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").args(["-l", &self.0]).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    c.topic("t", &ACK2_RF2);
    // 4 MiB of messages: batches whose replica set holds broker 1 cannot all be synced.
    let (text, _) = message_lines("full", 40_000);
    let out = c.run(
        &[
            "publish",
            "--topic",
            "t",
            "--ack-timeout-s",
            "5",
            "--transport",
            transport,
        ],
        Some(text),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(75),
        "timed out waiting for acks: {err}"
    );
    assert!(
        err.contains("broker slot 1 cannot write its disk log of this topic")
            && err.contains("No space left on device"),
        "the client is told why: {err}"
    );
    let acked = acknowledged(&err);
    assert!(acked < 40_000, "{acked} acknowledged");
    // What was acknowledged is on every replica's disk: nothing unsynced was acked.
    let (_, all) = message_lines("full", 40_000);
    assert_on_every_replica(&c, "t", &all[..acked as usize]);
    assert!(c.metric(1, "embar_broker_disk_failures_total") > 0);
    let log = std::fs::read_to_string(format!("{}/broker-1.log", c.dir)).unwrap_or_default();
    assert!(log.contains("No space left on device"), "{log}");
    // Topics that need no disk go on being served meanwhile.
    c.topic("plain", &["--order", "5"]);
    let out = c.run(&["publish", "--topic", "plain"], Some("a\nb\nc\n".into()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pool words of topic `name` that say how far the replication and the retention went.
struct PoolProgress {
    pool: embar_dataplane::pool::Pool,
    slot: u32,
}

impl PoolProgress {
    fn of(c: &Cluster, name: &str) -> PoolProgress {
        use embar_dataplane::pool::{coherence::Coherent, OpenOptions, Pool};
        let path = c.file()["pool"].as_str().unwrap().to_string();
        let pool = Pool::open(path.as_ref(), &OpenOptions::default()).unwrap();
        let slot = pool.find_topic(Coherent, name).unwrap();
        PoolProgress { pool, slot }
    }

    /// Active cursors of the topic's subscriber table (a replicator holds one).
    fn cursors(&self) -> usize {
        use embar_dataplane::pool::layout::SUBSCRIBER_ACTIVE;
        let st = self.pool.sequencer_state(self.slot);
        st.subscribers
            .iter()
            .filter(|e| {
                e.state.load(std::sync::atomic::Ordering::Acquire) & 0xff == SUBSCRIBER_ACTIVE
            })
            .count()
    }

    /// Whether every broker slot in `0..brokers` has made everything ordered durable.
    fn replicated(&self, brokers: u32) -> bool {
        use embar_dataplane::pool::coherence::Coherent;
        let st = self.pool.sequencer_state(self.slot);
        let delivered = st.delivered.load(std::sync::atomic::Ordering::Acquire);
        let t = self.pool.tinode(self.slot);
        (0..brokers).all(|b| embar_dataplane::replication::progress_of(Coherent, t, b) >= delivered)
    }

    /// The highest delivery index below which a broker has reclaimed log space.
    fn reclaimed_below(&self) -> u64 {
        let t = self.pool.tinode(self.slot);
        t.brokers
            .iter()
            .map(|b| {
                b.broker
                    .reclaimed_below
                    .load(std::sync::atomic::Ordering::Acquire)
            })
            .max()
            .unwrap_or(0)
    }
}

/// Message `i` of the disk-read tests (every byte checked when read back).
fn numbered(i: usize) -> String {
    numbered_line(i as u64, 900)
}

/// A cluster of `brokers` brokers (as many slots) that keep only 2 MiB of each topic in the
/// pool. A dead broker's slot is never re-placed (these tests bring it back).
fn small_retention_cluster(name: &str, brokers: u32) -> Cluster {
    let n = brokers.to_string();
    Cluster::up(
        name,
        &[
            "--brokers",
            &n,
            "--max-brokers",
            &n,
            "--pool-bytes",
            "64MiB",
            "--segment-bytes",
            "1MiB",
            "--retention-bytes",
            "2MiB",
            "--sync-interval-ms",
            "20",
            "--replace-after-ms",
            "0",
        ],
    )
}

/// Publishes `chunks` x 1,500 numbered messages (about 1.4 MiB each, less than one broker's
/// retention) to `topic`; with `replicated`, waits after each chunk until both brokers made
/// it durable, so that retention never reclaims what a replicator has not read yet. Returns
/// the messages in publish order (one publisher: the total order).
fn publish_chunks(c: &Cluster, topic: &str, chunks: usize, replicated: bool) -> Vec<String> {
    const PER_CHUNK: usize = 1500;
    let progress = PoolProgress::of(c, topic);
    if replicated {
        wait_until(
            "both replicators hold a cursor",
            Duration::from_secs(20),
            || progress.cursors() >= 2,
        );
    }
    let mut all = Vec::new();
    for k in 0..chunks {
        let lines: Vec<String> = (k * PER_CHUNK..(k + 1) * PER_CHUNK).map(numbered).collect();
        let out = c.run(
            &["publish", "--topic", topic],
            Some(lines.join("\n") + "\n"),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        all.extend(lines);
        if replicated {
            wait_until("both replicas synced", Duration::from_secs(20), || {
                progress.replicated(2)
            });
        }
    }
    // Settled: a broker reclaims the last grants after the publisher's session closes.
    wait_until(
        "retention reclaimed old batches",
        Duration::from_secs(20),
        || progress.reclaimed_below() > 0,
    );
    all
}

#[test]
fn a_subscriber_from_the_oldest_reads_what_retention_reclaimed_from_the_disks_then_the_pool() {
    let _serial = serial();
    let c = small_retention_cluster("disk-read", 2);
    c.topic("old", &["--rf", "1", "--batch-bytes", "64KiB"]);
    // About 21 MiB through brokers that keep 2 MiB each in the pool.
    let published = publish_chunks(&c, "old", 15, true);
    let count = published.len().to_string();
    let (ok, out, err) = c.embar(&[
        "subscribe",
        "--topic",
        "old",
        "--from",
        "oldest",
        "--check-order",
        "--count",
        &count,
        "--idle-timeout-s",
        "20",
    ]);
    assert!(ok, "{err}");
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), published.len(), "{err}");
    for (k, (g, p)) in got.iter().zip(&published).enumerate() {
        assert_eq!(g, p, "message {k}");
    }
    // Both sources were read: the disks for what the pool had reclaimed, then the pool.
    let from_disk = number_after(&err, "publishers (");
    assert!(
        from_disk > 0 && from_disk < published.len() as u64,
        "{from_disk} of {} from the disks: {err}",
        published.len()
    );
    // Over TCP: the broker serves the same order through the same subscriber.
    let (ok, out, err) = c.embar(&[
        "subscribe",
        "--transport",
        "tcp",
        "--topic",
        "old",
        "--from",
        "oldest",
        "--count",
        &count,
        "--idle-timeout-s",
        "20",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.lines().eq(published.iter().map(String::as_str)),
        "{err}"
    );
    // A start in the middle of what only the disks hold, inside a batch.
    let (ok, out, err) = c.embar(&[
        "subscribe",
        "--topic",
        "old",
        "--from",
        "1001",
        "--count",
        "5000",
    ]);
    assert!(ok, "{err}");
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(
        got,
        published[1001..6001]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_damaged_disk_record_is_an_error_naming_its_position_never_data_and_without_replication_the_error_names_both_positions(
) {
    let _serial = serial();
    let c = small_retention_cluster("disk-bad", 2);
    c.topic("logged", &["--rf", "1", "--batch-bytes", "64KiB"]);
    c.topic("plain", &["--batch-bytes", "64KiB"]);
    let published = publish_chunks(&c, "logged", 6, true);
    // One byte of the body of the second record of broker 0's first segment.
    let seg = format!("{}/broker-0/topic-logged/{:020}.log", c.dir, 0);
    let mut bytes = std::fs::read(&seg).unwrap();
    let record = embar_dataplane::replication::log::scan(&bytes).records[1];
    bytes[record.body_at as usize + 100] ^= 0x20;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        let at = record.body_at + 100;
        f.write_all_at(&bytes[at as usize..at as usize + 1], at)
            .unwrap();
    }
    let bad = record.meta.total_order;
    let out = c.run(
        &["subscribe", "--topic", "logged", "--from", "oldest"],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(
        err.contains(&format!(
            "cannot deliver total order {bad} from the disk logs"
        )) && err.contains("does not verify: CRC32C mismatch")
            && err.contains(&seg),
        "{err}"
    );
    // Every message before it, intact; nothing of it or after it.
    let text = String::from_utf8_lossy(&out.stdout);
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(
        got,
        published[..bad as usize]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );

    // Without replication, what retention reclaimed is gone: the error says where the
    // subscriber asked and where the oldest retained message is.
    publish_chunks(&c, "plain", 6, false);
    let (ok, _, err) = c.embar(&["subscribe", "--topic", "plain", "--from", "0"]);
    assert!(!ok);
    assert!(err.contains("fell behind the retention limit"), "{err}");
    assert_eq!(number_after(&err, "at total order"), 0, "{err}");
    let mut oldest = number_after(&err, "oldest retained is total order");
    assert!(oldest > 0 && oldest < 9000, "{err}");
    // The brokers may still be reclaiming what the last chunk pushed past the limit: a
    // second "fell behind" names the new oldest, which is then taken.
    let mut tries = 0;
    let out = loop {
        let from = oldest.to_string();
        let (ok, out, err) = c.embar(&[
            "subscribe",
            "--topic",
            "plain",
            "--from",
            &from,
            "--count",
            "1",
        ]);
        if ok {
            break out;
        }
        tries += 1;
        assert!(
            tries < 5 && err.contains("fell behind the retention limit"),
            "{err}"
        );
        let newer = number_after(&err, "oldest retained is total order");
        assert!(newer > oldest && newer < 9000, "{err}");
        oldest = newer;
    };
    assert_eq!(out.lines().next(), Some(numbered(oldest as usize).as_str()));
}

/// Every message on any disk is on every disk of its batch's replica set.
#[track_caller]
fn assert_every_replica_complete(c: &Cluster, topic: &str) {
    for (p, (primary, on)) in holders(c, topic) {
        let want: BTreeSet<u32> =
            embar_dataplane::replication::replica_set(primary, RF, BROKERS).collect();
        assert!(
            want.is_subset(&on),
            "message {p:?} (landed on broker {primary}) is on the disks of {on:?}, its replica set is {want:?}"
        );
    }
}

#[test]
fn a_restarted_broker_catches_up_from_the_other_replicas_what_retention_reclaimed_while_it_was_down(
) {
    let _g = serial();
    let c = small_retention_cluster("durable-rebuild", BROKERS);
    c.topic("t", &[&ACK2_RF2[..6], &["--batch-bytes", "64KiB"]].concat());
    let progress = PoolProgress::of(&c, "t");
    let numbered_from = |from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|i| numbered_line(i as u64, 900))
            .collect()
    };
    // 1. A calm run, acked at ACK 2.
    let calm = numbered_from(0, 1500);
    let out = c.run(&["publish", "--topic", "t"], Some(calm.join("\n") + "\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. SIGKILL broker 1 while a publisher runs (its sessions on broker 1 fail: resending
    // to a live broker is not built).
    let victim = c.broker_pid(1);
    let args = cmdline(victim);
    let log = format!("{}/broker-1/topic-t/00000000000000000000.log", c.dir);
    let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let first = c.spawn(
        &["publish", "--topic", "t", "--ack-timeout-s", "3"],
        Some(numbered_from(100_000, 20_000).join("\n") + "\n"),
    );
    wait_until(
        "broker 1 appends the run's batches",
        Duration::from_secs(20),
        || std::fs::metadata(&log).is_ok_and(|m| m.len() > before + (256 << 10)),
    );
    signal(victim, "-KILL");
    let _ = first.wait_with_output();
    c.wait_for_status("broker 1 declared dead", Duration::from_secs(20), |s| {
        s["live_brokers"] == 2
    });
    let stale = || {
        embar_dataplane::replication::progress_of(
            embar_dataplane::pool::coherence::Coherent,
            progress.pool.tinode(progress.slot),
            1,
        )
    };

    // 3. While it is down, an ACK 2 publisher on brokers 0 and 2: the batches that landed
    // on broker 0 need broker 1 (replica set {0, 1}) and wait, and the pool keeps them
    // (nothing is reclaimed before it is durable on its replicas); those that landed on
    // broker 2 (set {2, 0}) are durable without broker 1, and retention reclaims them: broker
    // 1 reads those from the other brokers' disks when it catches up.
    let down = numbered_from(200_000, 12_000);
    let waiting = c.spawn(
        &["publish", "--topic", "t", "--ack-timeout-s", "120"],
        Some(
            down.join(
                "
",
            ) + "
",
        ),
    );
    let reclaimed = |b: usize| {
        progress.pool.tinode(progress.slot).brokers[b]
            .broker
            .reclaimed_below
            .load(std::sync::atomic::Ordering::Acquire)
    };
    wait_until(
        "retention reclaimed batches broker 1 has not read",
        Duration::from_secs(60),
        || reclaimed(2) > stale() + 64,
    );
    assert!(
        reclaimed(0) <= stale(),
        "broker 0 reclaimed batches of set {{0, 1}} that broker 1 has not made durable"
    );

    // 4. Broker 1 again, as it was started, into its own slot and data directory.
    let restarted = std::fs::File::create(format!("{}/broker-1-restarted.log", c.dir)).unwrap();
    let mut broker = Command::new(&args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(restarted)
        .spawn()
        .unwrap();
    wait_until("broker 1 back in its slot", Duration::from_secs(30), || {
        c.slot_live(1)
    });
    // ACK 2 resumes: the waiting publisher gets every acknowledgement.
    let out = waiting.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = broker.try_wait();
    assert!(out.status.success(), "{err}");
    assert_eq!(acknowledged(&err), down.len() as u64, "{err}");
    wait_until(
        "every broker made everything durable",
        Duration::from_secs(30),
        || progress.replicated(BROKERS),
    );
    // Broker 1's log holds every batch of its replica sets again, in order (`dump` checks
    // the order and every CRC), the ones only the other replicas' disks held included.
    assert_every_replica_complete(&c, "t");
    assert_on_every_replica(&c, "t", &calm);
    assert_on_every_replica(&c, "t", &down);
    let down_set: BTreeSet<&String> = down.iter().collect();
    let on_1 = dump(&format!("{}/broker-1", c.dir), "t");
    let from_0 = on_1
        .iter()
        .filter(|(p, b)| *b == 0 && down_set.contains(p))
        .count();
    assert!(
        from_0 > 0,
        "broker 1 holds none of broker 0's batches of the downtime"
    );
    let _ = broker.kill();
    let _ = broker.wait();
}

/// For every message on any disk of the cluster (every broker's log of `topic` and its
/// backfill logs): the brokers whose disk holds it.
fn copies(c: &Cluster, topic: &str) -> BTreeMap<String, BTreeSet<u32>> {
    copies_but(c, topic, None)
}

/// As [`copies`], not counting broker `dead`'s records from total order `from` on (what a
/// broker killed mid-run may have appended without syncing: the page cache keeps it after
/// a SIGKILL, a crash of the host would not).
fn copies_but(
    c: &Cluster,
    topic: &str,
    dead: Option<(u32, u64)>,
) -> BTreeMap<String, BTreeSet<u32>> {
    let mut m: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for b in 0..BROKERS {
        let out = Command::new(exe())
            .args(["log", "dump", "--backfills", "--topic", topic, "--dir"])
            .arg(format!("{}/broker-{b}", c.dir))
            .output()
            .expect("embar runs");
        let err = String::from_utf8_lossy(&out.stderr);
        let torn = out.status.code() == Some(65)
            && err.contains("the log ends at a record that does not verify");
        assert!(
            out.status.success() || torn,
            "log dump of broker {b}: {err}"
        );
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            let t = v["total_order"].as_u64().unwrap();
            if dead.is_some_and(|(d, from)| d == b && t >= from) {
                continue;
            }
            m.entry(v["payload"].as_str().unwrap().to_string())
                .or_default()
                .insert(b);
        }
    }
    m
}

/// Every message of `acked` is on the disks of at least RF brokers (not counting `dead`'s
/// records from a total order on: see [`copies_but`]).
#[track_caller]
fn assert_on_rf_disks(c: &Cluster, topic: &str, acked: &[String], dead: Option<(u32, u64)>) {
    let m = copies_but(c, topic, dead);
    for p in acked {
        let on = m.get(p).cloned().unwrap_or_default();
        assert!(
            on.len() >= usize::from(RF),
            "acknowledged message {p:?} is on the disks of {on:?} only"
        );
    }
}

#[test]
fn a_broker_that_does_not_come_back_is_passed_over_by_the_replica_sets_and_ack_2_goes_on() {
    let _g = serial();
    let mut args = cluster_args_replacing("1500");
    args.extend(["--tcp-idle-timeout-ms", "1000"]);
    let c = Cluster::up("durable-replace", &args);
    c.topic("t", &ACK2_RF2);
    let numbered_from = |from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|i| numbered_line(i as u64, 300))
            .collect()
    };

    // 1. SIGKILL broker 2 (not the sequencer's) under an ACK 2 publisher over TCP, which
    // resends what broker 2 had not acked to the live brokers. Batches whose replica set
    // names slot 2 wait until the control process re-places it (1.5 s after it was declared
    // dead); then the next slot writes them, reading again those it had passed over, and
    // the publisher gets every ack.
    let victim = c.broker_pid(2);
    let restart_args = cmdline(victim);
    let log = format!("{}/broker-2/topic-t/00000000000000000000.log", c.dir);
    let run = numbered_from(0, 60_000);
    let publisher = c.spawn(
        &[
            "publish",
            "--topic",
            "t",
            "--transport",
            "tcp",
            "--ack-timeout-s",
            "120",
        ],
        Some(run.join("\n") + "\n"),
    );
    wait_until(
        "broker 2 appends the run's batches",
        Duration::from_secs(30),
        || std::fs::metadata(&log).is_ok_and(|m| m.len() > 256 << 10),
    );
    signal(victim, "-KILL");
    let out = publisher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(acknowledged(&err), run.len() as u64, "{err}");
    let control_log = std::fs::read_to_string(format!("{}/control.log", c.dir)).unwrap();
    assert!(
        control_log.contains("broker slot 2 has had no live broker")
            && control_log.contains("re-placed from total order"),
        "{control_log}"
    );

    // Every message once, in publish order (one publisher), and each on two disks.
    let out = c.run(
        &[
            "subscribe",
            "--topic",
            "t",
            "--count",
            &run.len().to_string(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(seen == run, "{} messages, not the run in order", seen.len());
    // Broker 2's disk counts only below the total order it was re-placed from: the backfills
    // on the live brokers must hold the second copy of everything after.
    let from: u64 = control_log
        .split("re-placed from total order ")
        .nth(1)
        .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("the total order slot 2 was re-placed from");
    assert_on_rf_disks(&c, "t", &run, Some((2, from)));
    let backfills = (0..2)
        .flat_map(|b| {
            std::fs::read_dir(format!("{}/broker-{b}/topic-t", c.dir))
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("backfill-"))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    assert!(
        !backfills.is_empty(),
        "no live broker wrote again what the re-placement put in its sets"
    );
    wait_until("the backfills complete", Duration::from_secs(30), || {
        backfills.iter().all(|d| d.join("complete").exists())
    });

    // 2. A broker in slot 2 again: it is in the replica sets from the next total order on,
    // and ACK 2 waits for it again.
    let restarted = std::fs::File::create(format!("{}/broker-2-restarted.log", c.dir)).unwrap();
    let mut broker = Command::new(&restart_args[0])
        .args(&restart_args[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(restarted)
        .spawn()
        .unwrap();
    wait_until("broker 2 back in its slot", Duration::from_secs(30), || {
        c.slot_live(2)
    });
    wait_until("slot 2 readmitted", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("{}/control.log", c.dir))
            .unwrap()
            .contains("broker slot 2 is in the replica sets again")
    });
    let after = numbered_from(100_000, 5_000);
    let out = c.run(
        &["publish", "--topic", "t", "--ack-timeout-s", "60"],
        Some(after.join("\n") + "\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_on_rf_disks(&c, "t", &after, None);
    let on_2 = copies(&c, "t")
        .into_iter()
        .filter(|(p, on)| on.contains(&2) && after.contains(p))
        .count();
    assert!(
        on_2 > 0,
        "the readmitted broker holds none of the new batches"
    );
    let _ = broker.kill();
    let _ = broker.wait();
}

#[test]
fn a_topic_created_again_under_the_same_name_does_not_take_the_old_topics_disk_records() {
    let _g = serial();
    let c = Cluster::up(
        "durable-reuse",
        &[
            "--brokers",
            "2",
            "--max-brokers",
            "2",
            "--pool-bytes",
            "128MiB",
            "--sync-interval-ms",
            "20",
        ],
    );
    let topic = ["--ack", "2", "--rf", "2", "--batch-bytes", "16KiB"];
    c.topic("t", &topic);
    let (text, _) = message_lines("old", 3000);
    let out = c.run(&["publish", "--topic", "t"], Some(text));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, _, err) = c.embar(&["topic", "delete", "t"]);
    assert!(ok, "{err}");
    c.topic("t", &topic);
    // The new topic orders from total order 0 again; its replicators must not take the old
    // topic's records (up to total order 2999, in the same directories) for its own, or they
    // would pass over its first 3,000 messages and ACK 2 would never come.
    let (text, new) = message_lines("new", 200);
    let out = c.run(
        &["publish", "--topic", "t", "--ack-timeout-s", "20"],
        Some(text),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(acknowledged(&err), 200, "{err}");
    let out = c.run(
        &[
            "subscribe",
            "--topic",
            "t",
            "--durable-only",
            "--count",
            "200",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(seen, new);
}
