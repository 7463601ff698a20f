//! The DPDK shim over a real `net_memif` link between two ports of this process (a memif
//! server and its client on one socket): frames of every size go through unchanged.

#![cfg(feature = "dpdk")]

use std::time::{Duration, Instant};

use embar_sys::dpdk::{self, MbufPool, Port, RxBurst, TxBurst};

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn frames_cross_a_memif_link_unchanged() {
    dpdk::init(&dpdk::vdev_eal_args(256)).expect("EAL starts without hugepages or PCI");
    dpdk::register_thread().expect("thread registers");
    let pool = MbufPool::new(4096, 2048).expect("mbuf pool");
    let sock = std::env::temp_dir().join(format!("embar-shim-{}.sock", std::process::id()));
    let sock = sock.display();
    let a = Port::attach(
        &format!("net_memif0,role=server,socket={sock},socket-abstract=no,id=7"),
        pool,
        512,
        512,
    )
    .expect("memif server");
    let b = Port::attach(
        &format!("net_memif1,role=client,socket={sock},socket-abstract=no,id=7"),
        pool,
        512,
        512,
    )
    .expect("memif client");
    wait("both ends of the link", || a.link_up() && b.link_up());
    assert_ne!(a.mac().unwrap(), b.mac().unwrap());

    let mut tx = TxBurst::default();
    let mut rx = RxBurst::default();
    let sizes: Vec<usize> = (0..200).map(|i| 60 + (i * 97) % 1400).collect();
    let mut sent = 0;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < sizes.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} frames",
            got.len(),
            sizes.len()
        );
        while sent < sizes.len() && !tx.is_full() {
            let len = sizes[sent];
            let tag = sent as u8;
            if !tx.push(pool, len, |b| b.fill(tag)).unwrap() {
                break;
            }
            sent += 1;
        }
        let n = tx.len();
        let took = tx.send(&a);
        // Frames the port did not take are lost, as on a wire: send them again.
        sent -= n - took;
        b.rx(&mut rx);
        for i in 0..rx.len() {
            got.push(rx.frame(i).expect("one segment").to_vec());
        }
    }
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f.len(), sizes[i], "frame {i}'s length");
        assert!(f.iter().all(|&x| x == i as u8), "frame {i}'s bytes");
    }
    drop(rx);
    b.detach().expect("detach client");
    a.detach().expect("detach server");
}
