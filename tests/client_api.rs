//! The client library (`embar-client`) against a real cluster (`embar cluster up`): its
//! publishers and subscribers in this process, its futures on a plain executor, the
//! examples in `examples/` as processes, and the command line finding the cluster without
//! `--control`.

use std::process::Command;
use std::time::{Duration, Instant};

use embar_client::{Client, ErrorKind, StartAt};
use embar_test_support::{cargo_build, exe, output_within, serial, Cluster};
use futures_util::StreamExt;

/// A small pool: the cluster comes up quickly.
const SMALL_POOL: [&str; 4] = ["--pool-bytes", "64MiB", "--segment-bytes", "1MiB"];

#[test]
fn library_publishers_are_acked_in_publish_order_and_subscribers_see_one_total_order() {
    let _serial = serial();
    let c = Cluster::up("lib-order", &SMALL_POOL);
    c.topic("t", &["--order", "5", "--batch-bytes", "16KiB"]);
    let client = Client::connect(c.control.as_str()).unwrap();
    let topic = client.topic("t").unwrap();
    assert_eq!((topic.spec.order, topic.spec.ack), (5, 1));
    let e = client.publisher("nope").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = client.subscriber("nope", StartAt::Oldest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    let mut subscriber = client.subscriber("t", StartAt::Oldest).unwrap();
    let mut pubs = [
        client.publisher("t").unwrap(),
        client.publisher("t").unwrap(),
    ];
    let n = 3000u64;
    let mut last_acked = [0u64; 2];
    for i in 0..n {
        for (k, p) in pubs.iter_mut().enumerate() {
            assert_eq!(p.publish(format!("{k} {i}").as_bytes()).unwrap(), i);
            let acked = p.acked().unwrap();
            assert!(
                acked >= last_acked[k] && acked <= p.sealed(),
                "the acknowledged prefix only grows and covers only sent messages"
            );
            last_acked[k] = acked;
        }
    }
    for p in &mut pubs {
        assert_eq!(p.wait_acks().unwrap(), n);
        assert_eq!(p.acked().unwrap(), n);
    }
    let ids: Vec<u64> = pubs.iter().map(|p| p.client_id()).collect();
    drop(pubs);

    let mut next = [0u64; 2];
    for t in 0..2 * n {
        let m = subscriber
            .next_timeout(Duration::from_secs(30))
            .unwrap()
            .expect("every acknowledged message is delivered");
        assert_eq!(m.total_order, t, "total orders 0..N-1");
        let text = String::from_utf8(m.payload).unwrap();
        let (k, i) = text.split_once(' ').unwrap();
        let (k, i): (usize, u64) = (k.parse().unwrap(), i.parse().unwrap());
        assert_eq!(m.client_id, ids[k]);
        assert_eq!(i, next[k], "each publisher's messages in its order");
        next[k] += 1;
    }
    assert_eq!(subscriber.try_next().unwrap(), None);
    // A second subscriber from the start sees the same sequence, lent without a copy.
    let mut again = client.subscriber("t", StartAt::TotalOrder(0)).unwrap();
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen < 2 * n {
        assert!(Instant::now() < deadline, "{seen} of {} lent", 2 * n);
        again
            .poll(16, |m| {
                assert_eq!(m.total_order, seen);
                seen += 1;
            })
            .unwrap();
    }
}

#[test]
fn ack_futures_and_the_message_stream_work_on_a_plain_executor() {
    let _serial = serial();
    let c = Cluster::up("lib-async", &SMALL_POOL);
    c.topic("t", &["--batch-bytes", "16KiB"]);
    let client = Client::builder()
        .control(c.control.as_str())
        .unwrap()
        .linger(Duration::from_millis(2))
        .connect()
        .unwrap();
    let stream = client
        .subscriber("t", StartAt::Latest)
        .unwrap()
        .into_stream();
    let publisher = client.publisher("t").unwrap().into_async();

    // One message in an open batch: its future sends the batch once it has lingered.
    let one = publisher.publish(b"alone").unwrap();
    assert_eq!(futures_executor::block_on(one).unwrap(), 1);

    // Many, from another thread sharing the publisher; the last future implies the rest.
    let n = 2000u64;
    let shared = publisher.clone();
    let futures = std::thread::spawn(move || {
        (0..n)
            .map(|i| shared.publish(format!("m {i}").as_bytes()).unwrap())
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let last = futures.last().unwrap().count();
    assert_eq!(last, n + 1);
    let all = publisher.flush().unwrap();
    assert_eq!(futures_executor::block_on(all).unwrap(), n + 1);
    for f in futures {
        assert_eq!(futures_executor::block_on(f).unwrap(), n + 1);
    }
    assert_eq!(publisher.acked().unwrap(), n + 1);

    // Many more through the publisher itself (no lock and no future per message), with one
    // future asked for afterwards; it sends the lingering batch itself.
    let last = {
        let mut p = publisher.lock_publisher().unwrap();
        (0..n)
            .map(|i| p.publish(format!("bulk {i}").as_bytes()).unwrap())
            .last()
            .unwrap()
    };
    assert_eq!(last, 2 * n);
    let bulk = publisher.until_acked(last + 1);
    assert_eq!(bulk.count(), 2 * n + 1);
    assert_eq!(futures_executor::block_on(bulk).unwrap(), 2 * n + 1);

    let messages: Vec<_> = futures_executor::block_on(stream.take(n as usize + 1).collect());
    let first = messages[0].as_ref().unwrap();
    assert_eq!(first.payload, b"alone");
    for (i, m) in messages[1..].iter().enumerate() {
        let m = m.as_ref().unwrap();
        assert_eq!(m.total_order, first.total_order + 1 + i as u64);
        assert_eq!(m.payload, format!("m {i}").as_bytes());
    }
}

#[test]
fn a_pool_truncated_under_a_client_is_pool_lost_for_what_it_opens_next() {
    let _serial = serial();
    let c = Cluster::up("lib-lost", &SMALL_POOL);
    c.topic("t", &["--batch-bytes", "16KiB"]);
    let client = Client::connect(c.control.as_str()).unwrap();
    // The client maps the pool for its first subscriber, and keeps the mapping.
    drop(client.subscriber("t", StartAt::Oldest).unwrap());

    // Someone with write access truncates the pool file to its first page.
    std::fs::OpenOptions::new()
        .write(true)
        .open(client.pool_path())
        .unwrap()
        .set_len(4096)
        .unwrap();

    // The next subscriber would read the missing part: it is refused with the reason, and
    // a kind of its own (the C ABI's EMBAR_STATUS_POOL_LOST, the command line's exit 74).
    let e = client.subscriber("t", StartAt::Oldest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PoolLost, "{e}");
    assert!(e.to_string().contains("truncated or replaced"), "{e}");
}

#[test]
fn the_example_producer_and_consumer_run_against_a_cluster_found_through_the_environment() {
    let _serial = serial();
    let c = Cluster::up("examples", &SMALL_POOL);
    c.topic("orders", &["--batch-bytes", "64KiB"]);
    let out_dir = cargo_build(&["--example", "producer", "--example", "consumer"]);
    let n = 5000;
    let mut producer = Command::new(out_dir.join("examples/producer"));
    producer
        .args(["orders", &n.to_string()])
        .env("EMBAR_CONTROL", &c.control);
    let out = output_within(producer, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("{n} acknowledged")), "{text}");

    let mut consumer = Command::new(out_dir.join("examples/consumer"));
    consumer
        .args(["orders", &n.to_string()])
        .env_remove("EMBAR_CONTROL")
        .env("EMBAR_CLUSTER_DIR", &c.dir);
    let out = output_within(consumer, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("{i} message {i}")).collect();
    assert_eq!(lines, want);
}

/// Runs `embar ARGS` with no `--control`, `env` set and `EMBAR_CONTROL` and
/// `EMBAR_CLUSTER_DIR` otherwise unset: (exit code, stdout, stderr).
fn embar_found(args: &[&str], env: &[(&str, &str)], stdin: &str) -> (i32, String, String) {
    let mut cmd = Command::new(exe());
    cmd.args(args)
        .env_remove("EMBAR_CONTROL")
        .env_remove("EMBAR_CLUSTER_DIR")
        .envs(env.iter().copied());
    let child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let mut input = child.stdin.take().unwrap();
    let text = stdin.to_string();
    std::thread::spawn(move || {
        use std::io::Write;
        let _ = input.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_finds_the_cluster_without_control_through_its_directory_or_the_variable() {
    let _serial = serial();
    let c = Cluster::up("found", &SMALL_POOL);
    let by_dir = [("EMBAR_CLUSTER_DIR", c.dir.as_str())];
    let by_var = [("EMBAR_CONTROL", c.control.as_str())];
    let (code, _, err) = embar_found(
        &["topic", "create", "t", "--batch-bytes", "64KiB"],
        &by_dir,
        "",
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = embar_found(&["cluster", "status", "--json"], &by_var, "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"live_brokers\": 2"), "{out}");
    let (code, _, err) = embar_found(&["publish", "--topic", "t"], &by_dir, "a\nb\nc\n");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("3 acknowledged"), "{err}");
    let (code, _, err) = embar_found(&["publish", "--topic", "t"], &by_var, "d\n");
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = embar_found(&["subscribe", "--topic", "t", "--count", "4"], &by_dir, "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "a\nb\nc\nd\n");
    // The variable wins over the directory.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (code, _, err) = embar_found(
        &["topic", "list"],
        &[("EMBAR_CONTROL", &nowhere), by_dir[0]],
        "",
    );
    assert_eq!(code, 69, "{err}");
    assert!(err.contains(&nowhere), "{err}");
    // A directory named that describes no cluster: not found, naming it.
    let empty = format!("{}-empty", c.dir);
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = embar_found(
        &["subscribe", "--topic", "t"],
        &[("EMBAR_CLUSTER_DIR", &empty)],
        "",
    );
    std::fs::remove_dir_all(&empty).unwrap();
    assert_eq!(code, 66, "{err}");
    assert!(
        err.contains(&empty) && err.contains("embar cluster up"),
        "{err}"
    );
}
