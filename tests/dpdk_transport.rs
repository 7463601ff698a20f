//! The DPDK transport on real processes over `net_memif` links (a build with
//! `--features dpdk` and DPDK's libraries; `scripts/dpdk-test.sh` runs these and the
//! af_packet test between network namespaces): DPDK publishers ordered with shm ones, a link
//! that loses and corrupts frames, and a peer that sends garbage.

#[cfg(not(feature = "dpdk"))]
#[test]
fn a_build_without_dpdk_says_how_to_get_it() {
    let _serial = embar_test_support::serial();
    let c = embar_test_support::Cluster::up("dpdk-none", &["--pool-bytes", "64MiB"]);
    c.topic("t", &[]);
    let (ok, _, err) = c.embar(&["publish", "--topic", "t", "--transport", "dpdk"]);
    assert!(!ok && err.contains("--features dpdk"), "{err}");
    let (ok, _, err) = embar_test_support::embar(&["broker", "--dpdk"]);
    assert!(!ok && err.contains("--features dpdk"), "{err}");
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    use embar_dataplane::dpdk::{parse_mac, push_frame, Header, KIND_DATA};
    use embar_sys::dpdk::{self, MbufPool, Port, TxBurst};
    use embar_test_support::{
        lines, order_check_passed, serial, signal, succeeded, wait_until, Cluster,
    };

    fn publish_ok(c: &Cluster, tag: &str, n: usize, extra: &[&str]) -> std::process::Child {
        let mut args = vec!["publish", "--topic", "t", "--transport", "dpdk"];
        args.extend_from_slice(extra);
        c.spawn(&args, Some(lines(tag, n, 200)))
    }

    fn check(c: &Cluster, total: usize) -> String {
        let total = total.to_string();
        let out = c.run(
            &[
                "subscribe",
                "--topic",
                "t",
                "--from",
                "oldest",
                "--count",
                &total,
                "--check-order",
                "--format",
                "jsonl",
            ],
            None,
        );
        order_check_passed(&out)
    }

    #[test]
    fn a_broker_with_a_bad_dpdk_port_does_not_start_and_says_why() {
        let _serial = serial();
        let c = Cluster::up("dpdk-badport", &["--pool-bytes", "64MiB", "--brokers", "1"]);
        let (ok, _, err) = c.embar(&["broker", "--dpdk-port", "net_nosuchdriver0,x=1"]);
        assert!(!ok, "started with a bad port");
        assert!(
            err.contains("--dpdk") && err.contains("net_nosuchdriver0"),
            "{err}"
        );
    }

    #[test]
    fn dpdk_publishers_are_ordered_with_shm_publishers() {
        let _serial = serial();
        let c = Cluster::up("dpdk-order", &["--dpdk", "--pool-bytes", "128MiB"]);
        c.topic("t", &["--order", "5", "--batch-bytes", "64KiB"]);
        let n = 5000;
        let pubs = vec![
            publish_ok(&c, "alpha", n, &[]),
            publish_ok(&c, "beta", n, &["--dpdk-frame-bytes", "1000"]),
            c.spawn(
                &["publish", "--topic", "t", "--transport", "shm"],
                Some(lines("gamma", n, 200)),
            ),
        ];
        for p in pubs {
            succeeded(p);
        }
        let summary = check(&c, 3 * n);
        assert!(summary.contains("3 publishers"), "{summary}");
        // The broker reports its frontends' counters every 100 ms.
        wait_until("the DPDK counters", Duration::from_secs(5), || {
            c.metric_sum("embar_broker_dpdk_bytes_copied_total") >= (2 * n * 200) as u64
        });
        assert!(c.metric_sum("embar_broker_dpdk_batches_received_total") > 0);
    }

    #[test]
    fn lost_and_corrupt_frames_are_sent_again_and_every_message_arrives_once_in_order() {
        let _serial = serial();
        let c = Cluster::up("dpdk-loss", &["--dpdk", "--pool-bytes", "128MiB"]);
        c.topic("t", &["--order", "5", "--batch-bytes", "32KiB"]);
        let n = 4000;
        let pubs = vec![
            publish_ok(&c, "lossy", n, &["--dpdk-drop-every", "7"]),
            publish_ok(&c, "noisy", n, &["--dpdk-corrupt-every", "11"]),
        ];
        for p in pubs {
            succeeded(p);
        }
        check(&c, 2 * n);
        wait_until("corrupt frames counted", Duration::from_secs(5), || {
            c.metric_sum("embar_broker_dpdk_frames_bad_total") > 0
        });
        assert!(
            c.metric_sum("embar_broker_dpdk_frames_not_taken_total") > 0,
            "frames after a lost one are not taken"
        );
        assert_eq!(c.metric_sum("embar_broker_dpdk_sessions_dropped_total"), 0);
    }

    #[test]
    fn a_publisher_killed_mid_stream_ends_its_session_alone_and_the_brokers_go_on() {
        let _serial = serial();
        let c = Cluster::up("dpdk-kill", &["--dpdk", "--pool-bytes", "256MiB"]);
        c.topic("t", &["--order", "5", "--batch-bytes", "64KiB"]);
        for round in 0..3 {
            // A publisher with far more to send than it gets to: killed while frames fly.
            let mut doomed = publish_ok(&c, "doomed", 400_000, &[]);
            wait_until(
                "the doomed publisher's frames",
                Duration::from_secs(20),
                || c.metric_sum("embar_broker_dpdk_batches_received_total") > round * 4 + 2,
            );
            signal(doomed.id(), "-KILL");
            let _ = doomed.wait();
            // Both brokers notice (the session's connection closed), end the session, and
            // remove its memif port once the link is down; then serve the next publisher.
            wait_until("no DPDK session open", Duration::from_secs(20), || {
                c.metric_sum("embar_broker_dpdk_sessions_open") == 0
            });
        }
        let good = publish_ok(&c, "good", 3000, &[]);
        succeeded(good);
        // Every message the sequencer ordered (what the killed publishers got in, and the
        // good one's 3000) reads back in order; the brokers are still the two started.
        let st = c.status();
        let alive = st["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["alive"] == true)
            .count();
        assert_eq!(alive, 2, "{st}");
        let out = c.run(
            &[
                "subscribe",
                "--topic",
                "t",
                "--from",
                "oldest",
                "--check-order",
                "--idle-timeout-s",
                "2",
                "--format",
                "jsonl",
            ],
            None,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let good_lines = text.lines().filter(|l| l.contains("good ")).count();
        assert_eq!(good_lines, 3000, "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn tcp_broker(c: &Cluster) -> SocketAddr {
        let st = c.status();
        st["brokers"][0]["addresses"]["tcp"]
            .as_str()
            .expect("a TCP address")
            .parse()
            .unwrap()
    }

    #[test]
    fn garbage_frames_are_dropped_and_counted_and_others_go_on() {
        let _serial = serial();
        let c = Cluster::up(
            "dpdk-garbage",
            &["--dpdk", "--pool-bytes", "128MiB", "--brokers", "1"],
        );
        c.topic("t", &["--order", "5", "--batch-bytes", "32KiB"]);
        // A rogue peer: a memif server of this test process, and a real session.
        dpdk::init(&dpdk::vdev_eal_args(256)).expect("EAL");
        let mbufs = MbufPool::new(1023, 2048).unwrap();
        let sock = std::env::temp_dir().join(format!("embar-rogue-{}.memif", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let port = Port::attach(
            &format!(
                "net_memif_rogue,role=server,socket={},socket-abstract=no,id=0",
                sock.display()
            ),
            mbufs,
            256,
            256,
        )
        .unwrap();
        let mut stream = TcpStream::connect(tcp_broker(&c)).unwrap();
        writeln!(
            stream,
            "EMBAR-DPDK/1 topic=t client=4242 link=memif:{}",
            sock.display()
        )
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        assert!(answer.starts_with("OK "), "{answer}");
        let field = |k: &str| {
            answer
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_string()
        };
        let key: u32 = field("session").parse().unwrap();
        let broker_mac = parse_mac(&field("mac")).unwrap();
        wait_until("the rogue's link", Duration::from_secs(10), || {
            port.link_up()
        });
        let _ = std::fs::remove_file(&sock);
        let mac = port.mac().unwrap();
        let send = |h: Header, payload: &[u8], corrupt: bool| {
            let mut tx = TxBurst::default();
            assert!(push_frame(&mut tx, mbufs, broker_mac, mac, &h, payload, corrupt).unwrap());
            assert_eq!(tx.send(&port), 1);
        };
        let data = Header {
            kind: KIND_DATA,
            len: 64,
            session: key,
            seq: 0,
            window: 0,
            batch_seq: 0,
            batch_bytes: 128,
            num_msg: 1,
            offset: 0,
        };
        let bad_before = c.metric_sum("embar_broker_dpdk_frames_bad_total");
        send(data, &[0; 64], true);
        send(
            Header {
                session: key ^ 0x8000_0000,
                ..data
            },
            &[0; 64],
            false,
        );
        send(Header { seq: 9, ..data }, &[0; 64], false);
        wait_until("the three frames counted", Duration::from_secs(10), || {
            c.metric_sum("embar_broker_dpdk_frames_bad_total") > bad_before
                && c.metric_sum("embar_broker_dpdk_frames_unknown_session_total") > 0
                && c.metric_sum("embar_broker_dpdk_frames_not_taken_total") > 0
        });
        assert_eq!(c.metric_sum("embar_broker_dpdk_sessions_dropped_total"), 0);
        // A well-behaved publisher goes on meanwhile.
        let good = publish_ok(&c, "good", 2000, &[]);
        // Frames that overrun their batch end the rogue's session, and only it.
        send(Header { len: 200, ..data }, &[0; 200], false);
        let mut end = String::new();
        reader.read_line(&mut end).unwrap();
        assert!(end.contains("overruns batch 0"), "{end:?}");
        succeeded(good);
        let summary = check(&c, 2000);
        assert!(summary.contains("1 publishers"), "{summary}");
        wait_until(
            "the dropped session counted",
            Duration::from_secs(5),
            || c.metric_sum("embar_broker_dpdk_sessions_dropped_total") == 1,
        );
        port.detach().unwrap();
    }
}
