//! The TCP transport as real processes and sockets: publishers and remote subscribers over
//! loopback TCP, 64 publisher connections per broker at once, a subscriber resuming on another
//! broker after its broker is killed, a publisher failing over when its broker is killed, and
//! bad input from a raw socket (truncated, mismatched, stalled, not reading its acks), each
//! dropping only its own session.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use embar_dataplane::client::subscriber::StartAt;
use embar_dataplane::client::Publish;
use embar_dataplane::tcp::publisher::{TcpPublisher, TcpPublisherConfig};
use embar_dataplane::tcp::subscriber::TcpSubscriber;
use embar_dataplane::tcp::{AckFrame, BatchFrame, HELLO, SUB_HELLO};
use embar_test_support::{serial, signal, wait_for, wait_until, Cluster};

/// `(pool slot, TCP address)` of every live broker, in slot order.
fn tcp_brokers(c: &Cluster) -> Vec<(u32, SocketAddr)> {
    let st = c.status();
    let mut out: Vec<(u32, SocketAddr)> = st["brokers"]
        .as_array()
        .expect("brokers")
        .iter()
        .filter(|b| b["alive"] == true)
        .filter_map(|b| {
            Some((
                b["slot"].as_u64()? as u32,
                b["addresses"]["tcp"].as_str()?.parse().ok()?,
            ))
        })
        .collect();
    out.sort_unstable();
    out
}

/// A cluster whose brokers drop a TCP peer idle mid-frame (or not reading) after 500 ms,
/// with an ORDER 5 topic `t`; its brokers' TCP addresses.
fn impatient_cluster(name: &str) -> (Cluster, Vec<(u32, SocketAddr)>) {
    let c = Cluster::up(
        name,
        &[
            "--pool-bytes",
            "256MiB",
            "--segment-bytes",
            "4MiB",
            "--tcp-idle-timeout-ms",
            "500",
        ],
    );
    c.topic("t", &["--order", "5"]);
    let brokers = tcp_brokers(&c);
    (c, brokers)
}

/// A batch as it goes on the wire: 64-byte message headers and payloads padded to 64.
fn batch(client: u64, seq: u64, payloads: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&(p.len() as u32).to_le_bytes());
        h[8..16].copy_from_slice(&client.to_le_bytes());
        h[16..24].copy_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(p);
        out.resize(out.len().next_multiple_of(64), 0);
    }
    out
}

/// Writes a batch frame: its header (sizes from `body`), then `body`.
fn send_frame(s: &mut TcpStream, batch_seq: u64, num_msg: u32, body: &[u8]) -> std::io::Result<()> {
    let h = BatchFrame {
        batch_seq,
        num_msg,
        total_size: body.len() as u64,
    };
    s.write_all(&h.encode())?;
    s.write_all(body)
}

/// A raw publisher connection past its handshake.
fn raw_publisher(addr: SocketAddr, topic: &str, client: u64) -> TcpStream {
    raw_publisher_with(addr, topic, client, None)
}

/// As [`raw_publisher`], with a small receive buffer, so that acks it does not read back up
/// soon.
fn raw_publisher_small_rcvbuf(addr: SocketAddr, topic: &str, client: u64) -> TcpStream {
    raw_publisher_with(addr, topic, client, Some(4096))
}

fn raw_publisher_with(
    addr: SocketAddr,
    topic: &str,
    client: u64,
    rcvbuf: Option<usize>,
) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    sock.connect(&addr.into()).expect("the broker's TCP port");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "{HELLO} topic={topic} client={client}").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line).to_string();
    assert!(line.starts_with("OK "), "{line}");
    s
}

/// Reads ack frames until `done` holds for one, or the connection ends (`None`).
fn read_acks_until(s: &mut TcpStream, mut done: impl FnMut(&AckFrame) -> bool) -> Option<AckFrame> {
    let mut buf = [0u8; AckFrame::BYTES];
    loop {
        if s.read_exact(&mut buf).is_err() {
            return None;
        }
        let f = AckFrame::decode(&buf).expect("an ack frame");
        if done(&f) {
            return Some(f);
        }
    }
}

/// A client id of its own for each tag.
fn client_id(tag: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(tag.as_bytes());
    h.finish() >> 1
}

/// A publisher over TCP of `n` messages `"{tag} {i}"`, waiting for every ack.
fn publish_tcp(brokers: &[(u32, SocketAddr)], topic: &str, tag: &str, n: u64) -> u64 {
    let cfg = TcpPublisherConfig::default();
    let mut p =
        TcpPublisher::connect(brokers, topic, client_id(tag), &cfg).expect("a TCP publisher");
    for i in 0..n {
        p.publish(format!("{tag} {i:06}").as_bytes())
            .expect("publish");
    }
    p.wait_acks(Duration::from_secs(60))
        .expect("every message acked")
}

/// Reads `n` messages from a remote subscriber; checks the total orders are 0.. without a
/// gap and each publisher's messages come in its order. Returns the payloads in order.
fn read_all(sub: &mut TcpSubscriber, n: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut next_of: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (out.len() as u64) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages",
            out.len()
        );
        let Some(m) = sub
            .next_timeout(Duration::from_millis(200))
            .expect("the stream")
        else {
            continue;
        };
        assert_eq!(
            m.total_order,
            out.len() as u64,
            "total orders without a gap"
        );
        let text = String::from_utf8_lossy(m.payload).to_string();
        let (tag, i) = text.rsplit_once(' ').expect("tag and index");
        let i: u64 = i.parse().expect("an index");
        let want = next_of.entry(tag.to_string()).or_insert(0);
        assert_eq!(i, *want, "publisher {tag} in its order (FIFO)");
        *want += 1;
        out.push(text);
    }
    out
}

#[test]
fn publishers_and_a_remote_subscriber_over_tcp_keep_the_total_order() {
    let _g = serial();
    let c = Cluster::up(
        "tcp-basic",
        &["--pool-bytes", "256MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &["--order", "5"]);
    // The command line, over TCP both ways.
    let input: String = (0..3000).map(|i| format!("cli {i:06}\n")).collect();
    let out = c.run(
        &["publish", "--topic", "t", "--transport", "tcp"],
        Some(input),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.run(
        &[
            "subscribe",
            "--topic",
            "t",
            "--transport",
            "tcp",
            "--count",
            "3000",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<String> = (0..3000).map(|i| format!("cli {i:06}")).collect();
    assert_eq!(got, want, "one publisher's lines in its order");
    // A position past the end is refused with the position the log has reached.
    let (ok, _, err) = c.embar(&[
        "subscribe",
        "--topic",
        "t",
        "--transport",
        "tcp",
        "--from",
        "999999",
    ]);
    assert!(!ok);
    assert!(
        err.contains("not reached yet") && err.contains("3000"),
        "{err}"
    );
    // An unknown topic is named.
    let (ok, _, err) = c.embar(&["subscribe", "--topic", "nope", "--transport", "tcp"]);
    assert!(!ok && err.contains("unknown topic"), "{err}");
}

#[test]
fn sixty_four_publisher_connections_per_broker_and_a_stalled_one_block_nobody() {
    let _g = serial();
    let c = Cluster::up(
        "tcp-many",
        &["--pool-bytes", "512MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &["--order", "5"]);
    let brokers = tcp_brokers(&c);
    assert_eq!(brokers.len(), 2);
    // A connection that sends half a frame header and then nothing: it must not hold up
    // the others (it is dropped only after the idle timeout, 10 s by default).
    let mut stalled = raw_publisher(brokers[0].1, "t", 1);
    stalled.write_all(&[0x45, 0x42, 0x54]).unwrap();
    let per = 300u64;
    // The subscriber is registered before the publishers start (its cursor holds every
    // delivery entry from the oldest) and reads while they publish.
    let mut sub = TcpSubscriber::connect(
        &[brokers[1].1, brokers[0].1],
        "t",
        StartAt::Oldest,
        Duration::from_secs(10),
    )
    .expect("a remote subscriber");
    let (acked, got) = std::thread::scope(|s| {
        let reader = s.spawn(|| read_all(&mut sub, 64 * per));
        let hs: Vec<_> = (0..64)
            .map(|k| {
                let brokers = &brokers;
                s.spawn(move || publish_tcp(brokers, "t", &format!("p{k}"), per))
            })
            .collect();
        let acked: Vec<u64> = hs
            .into_iter()
            .map(|h| h.join().expect("a publisher"))
            .collect();
        (acked, reader.join().expect("the subscriber"))
    });
    assert!(acked.iter().all(|&a| a == per), "{acked:?}");
    assert_eq!(got.len() as u64, 64 * per);
    drop(stalled);
}

#[test]
fn bad_frames_drop_their_own_session_and_nothing_else() {
    let _g = serial();
    let (c, brokers) = impatient_cluster("tcp-bad");
    let addr = brokers[0].1;
    let log = || std::fs::read_to_string(format!("{}/broker-0.log", c.dir)).unwrap_or_default();

    // Not a frame: dropped with the reason.
    let mut s = raw_publisher(addr, "t", 11);
    s.write_all(&[0xAB; BatchFrame::BYTES]).unwrap();
    let last = read_acks_until(&mut s, |f| f.closed != 0).expect("a closing ack frame");
    assert_eq!(last.closed, embar_dataplane::tcp::ERROR_TRANSPORT);
    wait_until("the drop is logged", Duration::from_secs(5), || {
        log().contains("client 11 dropped: not a batch frame")
    });

    // A header whose batch would not fit a batch of the topic.
    let mut s = raw_publisher(addr, "t", 12);
    let big = BatchFrame {
        batch_seq: 0,
        num_msg: 1,
        total_size: 64 << 20,
    };
    s.write_all(&big.encode()).unwrap();
    read_acks_until(&mut s, |f| f.closed != 0).expect("a closing ack frame");
    wait_until("the drop is logged", Duration::from_secs(5), || {
        log().contains("client 12 dropped: a batch frame of 67108864 bytes")
    });

    // Truncated: a header for 4 KiB, 100 bytes of it, then the connection ends.
    let mut s = raw_publisher(addr, "t", 13);
    let h = BatchFrame {
        batch_seq: 0,
        num_msg: 1,
        total_size: 4096,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(&[7u8; 100]).unwrap();
    drop(s);
    wait_until("the truncation is logged", Duration::from_secs(5), || {
        log().contains("client 13 dropped: the connection ended after 100 of batch 0's 4096 bytes")
    });

    // Stalled mid-frame past the idle timeout (500 ms here).
    let mut s = raw_publisher(addr, "t", 14);
    s.write_all(&h.encode()).unwrap();
    s.write_all(&[7u8; 1000]).unwrap();
    let last = read_acks_until(&mut s, |f| f.closed != 0).expect("dropped, with a reason");
    assert_eq!(last.closed, embar_dataplane::tcp::ERROR_TRANSPORT);
    wait_until("the stall is logged", Duration::from_secs(5), || {
        log().contains("client 14 dropped: it stalled after 1000 of batch 0's 4096 bytes")
    });

    // A header whose sizes do not match the messages that follow: the frame is read whole,
    // the broker's batch check rejects it, and the publisher is told (not dropped).
    let mut s = raw_publisher(addr, "t", 15);
    let mut body = batch(15, 0, &[b"hello", b"world"]);
    body[0..4].copy_from_slice(&5000u32.to_le_bytes()); // the first message claims 5000 bytes
    send_frame(&mut s, 0, 2, &body).unwrap();
    let f = read_acks_until(&mut s, |f| f.rejected_batches > 0).expect("a rejection");
    assert_eq!(f.acked_batches, 0);
    // A good batch on a good session is acked all the while.
    let mut good = raw_publisher(brokers[1].1, "t", 16);
    send_frame(&mut good, 0, 1, &batch(16, 0, &[b"fine"])).unwrap();
    let f = read_acks_until(&mut good, |f| f.acked_messages == 1).expect("acked");
    assert_eq!(f.rejected_batches, 0);

    // A publisher that never reads its acks: once its acks back up, its frames are not
    // read (back-pressure), and past the idle timeout it is dropped.
    let mut s = raw_publisher_small_rcvbuf(addr, "t", 17);
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let began = Instant::now();
    let mut sent = 0u64;
    let dropped = loop {
        if send_frame(&mut s, sent, 1, &batch(17, sent, &[b"x"])).is_err() {
            break true;
        }
        sent += 1;
        if log().contains("client 17 dropped: it left its acks unread") {
            break true;
        }
        if began.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    assert!(
        dropped,
        "sent {sent} batches without reading an ack and was not dropped"
    );
    if !embar_test_support::wait_for(Duration::from_secs(5), || {
        log().contains("client 17 dropped: it left its acks unread")
    }) {
        let l = log();
        let lines: Vec<&str> = l.lines().filter(|x| x.contains("client 17")).collect();
        panic!("client 17 was not dropped for its unread acks: {lines:?}");
    }

    // The drops are counted in broker 0's metrics (not-a-frame, too large, truncated,
    // stalled, unread acks).
    wait_until(
        "the drops show in the metrics",
        Duration::from_secs(5),
        || c.metric(0, "embar_broker_tcp_sessions_dropped_total") >= 5,
    );

    // Every dropped session's slot and grants were freed: 100 publishers in turn (more
    // than the sessions left if any leaked) all finish.
    for k in 0..100 {
        assert_eq!(publish_tcp(&brokers, "t", &format!("after{k}"), 3), 3);
    }
}

#[test]
fn a_remote_subscriber_that_stops_reading_is_dropped_and_holds_nothing() {
    let _g = serial();
    let (c, brokers) = impatient_cluster("tcp-slow-sub");
    // More than the socket buffers hold, already published.
    assert_eq!(publish_tcp(&brokers, "t", "s", 100_000), 100_000);
    let mut stuck = TcpStream::connect(brokers[0].1).expect("the broker's TCP port");
    writeln!(stuck, "{SUB_HELLO} topic=t from=oldest").unwrap();
    let log = || std::fs::read_to_string(format!("{}/broker-0.log", c.dir)).unwrap_or_default();
    wait_until(
        "the broker drops the subscriber that reads nothing",
        Duration::from_secs(20),
        || log().contains("read nothing for 500ms; dropped"),
    );
    // Its cursor went with it: the topic's subscriber table holds no one, so log space is
    // reclaimed again (a publisher of more than the pool goes through).
    c.wait_no_subscriber_holds("t", Duration::from_secs(5));
    let big = "x".repeat(1000);
    let cfg = TcpPublisherConfig::default();
    let mut p = TcpPublisher::connect(&brokers, "t", client_id("big"), &cfg).unwrap();
    for _ in 0..400_000 {
        p.publish(big.as_bytes()).expect("log space is reclaimed");
    }
    assert_eq!(p.wait_acks(Duration::from_secs(60)).unwrap(), 400_000);
    drop(stuck);
}

#[test]
fn a_remote_subscriber_resumes_on_another_broker_when_its_broker_dies() {
    let _g = serial();
    let c = Cluster::up(
        "tcp-resume",
        &["--pool-bytes", "256MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &["--order", "5"]);
    let brokers = tcp_brokers(&c);
    // More than the socket buffers and the subscriber's buffer hold, so that the stream is
    // cut mid-way by the kill.
    let n = 300_000u64;
    assert_eq!(publish_tcp(&brokers, "t", "a", n), n);
    // It reads from broker slot 0 first.
    let mut sub = TcpSubscriber::connect(
        &[brokers[0].1, brokers[1].1],
        "t",
        StartAt::Oldest,
        Duration::from_secs(20),
    )
    .expect("a remote subscriber");
    let first = read_all(&mut sub, 1000);
    assert_eq!(first.len(), 1000);
    signal(c.broker_pid(brokers[0].0), "-KILL");
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rest.len() < (n - 1000) as usize {
        assert!(Instant::now() < deadline, "only {} more", rest.len());
        if let Some(m) = sub
            .next_timeout(Duration::from_millis(200))
            .expect("the stream")
        {
            assert_eq!(
                m.total_order,
                1000 + rest.len() as u64,
                "no gap, no duplicate"
            );
            rest.push(String::from_utf8_lossy(m.payload).to_string());
        }
    }
    assert_eq!(rest.last().map(String::as_str), Some("a 299999"));
    assert_eq!(sub.reconnects(), 1);
    assert_eq!(sub.broker_addr(), brokers[1].1);
}

#[test]
fn a_tcp_publisher_resends_to_a_live_broker_when_its_broker_dies() {
    let _g = serial();
    let c = Cluster::up(
        "tcp-failover",
        &["--pool-bytes", "512MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &["--order", "5"]);
    let brokers = tcp_brokers(&c);
    // Kill the broker that does not run the sequencer (the sequencer's own failover is the
    // broker-failure suite's).
    let seq_slot = c.status()["sequencer"]["slot"].as_u64().map(|s| s as u32);
    let victim = brokers
        .iter()
        .map(|b| b.0)
        .find(|s| Some(*s) != seq_slot)
        .expect("a broker without the sequencer");
    let cfg = TcpPublisherConfig::default();
    let mut p = TcpPublisher::connect(&brokers, "t", 77, &cfg).expect("a publisher");
    let n = 200_000u64;
    let mut killed = false;
    for i in 0..n {
        p.publish(format!("f {i:06} {}", "x".repeat(100)).as_bytes())
            .expect("publish goes on through the failover");
        if i == n / 4 && !killed {
            signal(c.broker_pid(victim), "-KILL");
            killed = true;
        }
    }
    let acked = p
        .wait_acks(Duration::from_secs(60))
        .expect("every message acked");
    assert_eq!(acked, n);
    assert!(p.resent_batches() > 0 || p.live_brokers() == 1);
    assert!(wait_for(Duration::from_secs(10), || tcp_brokers(&c).len() == 1));
    let live = tcp_brokers(&c);
    let mut sub =
        TcpSubscriber::connect(&[live[0].1], "t", StartAt::Oldest, Duration::from_secs(10))
            .expect("a remote subscriber");
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen < n {
        assert!(Instant::now() < deadline, "{seen} of {n}");
        if let Some(m) = sub
            .next_timeout(Duration::from_millis(200))
            .expect("the stream")
        {
            assert_eq!(m.total_order, seen, "no gap, no duplicate");
            let text = String::from_utf8_lossy(m.payload);
            assert!(
                text.starts_with(&format!("f {seen:06} ")),
                "every message once, in publish order: {seen} is {text:.12}"
            );
            seen += 1;
        }
    }
    assert!(
        sub.next_timeout(Duration::from_millis(500))
            .unwrap()
            .is_none(),
        "no duplicate after the last"
    );
}

#[test]
fn a_tcp_publisher_frozen_and_resumed_loses_nothing() {
    let _g = serial();
    let (c, _) = impatient_cluster("tcp-frozen");
    let n = 300_000usize;
    let input: String = (0..n)
        .map(|i| format!("z {i:07} {}\n", "y".repeat(200)))
        .collect();
    let mut child = c.spawn(
        &["publish", "--topic", "t", "--transport", "tcp"],
        Some(input),
    );
    let pid = child.id();
    // Frozen for three idle timeouts while it publishes: a connection the freeze catches
    // mid-frame is dropped by its broker and its batches go to the other; one caught between
    // frames is kept (or the publish may be over already). Whichever it was, nothing is lost
    // or doubled.
    let began = Instant::now();
    wait_until(
        "the publisher has sessions open",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(format!("{}/broker-0.log", c.dir))
                .unwrap_or_default()
                .contains("TCP session of client")
        },
    );
    signal(pid, "-STOP");
    // Frozen until a broker drops a connection the freeze caught mid-frame, or for three
    // idle timeouts if none was.
    let dropped = wait_for(Duration::from_millis(1500), || {
        (0..2).any(|b| c.metric(b, "embar_broker_tcp_sessions_dropped_total") > 0)
    });
    signal(pid, "-CONT");
    let status = embar_test_support::wait_for_exit(&mut child, Duration::from_secs(120))
        .expect("the publisher finishes");
    let mut err = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    assert!(
        status.success(),
        "exit {status:?} after {:?} (a session dropped while frozen: {dropped}): {err}",
        began.elapsed()
    );
    // Every line once, in publish order.
    let out = c.run(
        &[
            "subscribe",
            "--topic",
            "t",
            "--transport",
            "tcp",
            "--count",
            &n.to_string(),
            "--check-order",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = String::from_utf8_lossy(&out.stdout);
    for (i, line) in got.lines().enumerate() {
        assert!(
            line.starts_with(&format!("z {i:07} ")),
            "line {i}: {line:.12}"
        );
    }
    assert_eq!(got.lines().count(), n);
}
