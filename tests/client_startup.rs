//! What a client costs to start, whatever the pool's size: a one-message publish and a
//! one-message subscribe on a 4 GiB pool fault in only what they touch (a few pages of
//! metadata and one grant), not the pool. Peak resident memory is a correctness bound here,
//! not a timing: a client that pre-faults the pool peaks at its size.

use std::io::Read;
use std::process::Child;
use std::time::{Duration, Instant};

use embar_test_support::{serial, Cluster};

/// A client that touches only what it uses: the binary, its libraries, a few pages of pool
/// metadata and one grant (one batch, 2 MiB by default). 13-14 MiB measured.
const CLIENT_RSS_MAX_KIB: i64 = 64 << 10;

/// Waits (with a deadline) for `child` to exit and reaps it with `wait4`: its exit status
/// and its peak resident set in KiB (`ru_maxrss`), plus what it wrote on stderr.
fn reap_with_rusage(mut child: Child, limit: Duration) -> (i32, i64, String) {
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage to be overwritten.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own unreaped child; `status` and `ru` are valid out-pointers.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        assert!(rc >= 0, "wait4: {}", std::io::Error::last_os_error());
        if rc == pid {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            };
            return (code, ru.ru_maxrss, err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the client did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_one_message_publish_and_subscribe_on_a_4gib_pool_stay_under_64_mib_resident() {
    let _g = serial();
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("skipped: no /dev/shm for a 4 GiB pool file");
        return;
    }
    let c = Cluster::up("client-rss", &["--pool-bytes", "4GiB"]);
    c.topic("t", &[]);

    let publish = c.spawn(&["publish", "--topic", "t"], Some("hi\n".into()));
    let (code, rss_kib, err) = reap_with_rusage(publish, Duration::from_secs(60));
    assert_eq!(code, 0, "publish failed: {err}");
    assert!(
        rss_kib < CLIENT_RSS_MAX_KIB,
        "a one-message publish peaked at {rss_kib} KiB resident on a 4 GiB pool"
    );

    let subscribe = c.spawn(
        &[
            "subscribe",
            "--topic",
            "t",
            "--from",
            "oldest",
            "--count",
            "1",
        ],
        None,
    );
    let (code, rss_kib, err) = reap_with_rusage(subscribe, Duration::from_secs(60));
    assert_eq!(code, 0, "subscribe failed: {err}");
    assert!(
        rss_kib < CLIENT_RSS_MAX_KIB,
        "a one-message subscribe peaked at {rss_kib} KiB resident on a 4 GiB pool"
    );
}
