//! Baselines measured in the same run as a benchmark, so that figures are ratios on a noisy
//! machine.

use std::time::Instant;

/// Single-thread memcpy bandwidth of this machine, GB/s (best of a few 256 MiB copies).
pub fn memcpy_gbps() -> f64 {
    const BYTES: usize = 256 << 20;
    let src = vec![0x5au8; BYTES];
    let mut dst = vec![0u8; BYTES];
    dst.copy_from_slice(&src); // fault the pages in
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    BYTES as f64 / best / 1e9
}

/// How often this host stops a running thread: one spinning thread per CPU reads the clock
/// for `probe`; a gap between two reads is time the thread did not run (preemption, an
/// interrupt storm, or a hypervisor descheduling the virtual CPU). No latency figure of this
/// host can be better than its stalls, so the bench reports them beside its percentiles.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stalls {
    pub probe_ms: u64,
    pub cpus: usize,
    /// Gaps longer than 50 us and 200 us, over every CPU.
    pub over_50us: u64,
    pub over_200us: u64,
    pub max_us: u64,
}

pub fn host_stalls(probe: std::time::Duration) -> Stalls {
    let cpus = embar_sys::cpu::available_cpus().max(1);
    let per_cpu: Vec<(u64, u64, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cpus)
            .map(|cpu| {
                s.spawn(move || {
                    let _ = embar_sys::cpu::pin_current_thread(cpu);
                    let (mut o50, mut o200, mut max) = (0u64, 0u64, 0u64);
                    let start = Instant::now();
                    let mut last = start;
                    while last - start < probe {
                        let now = Instant::now();
                        let gap = (now - last).as_micros() as u64;
                        o50 += u64::from(gap > 50);
                        o200 += u64::from(gap > 200);
                        max = max.max(gap);
                        last = now;
                    }
                    (o50, o200, max)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    Stalls {
        probe_ms: probe.as_millis() as u64,
        cpus,
        over_50us: per_cpu.iter().map(|c| c.0).sum(),
        over_200us: per_cpu.iter().map(|c| c.1).sum(),
        max_us: per_cpu.iter().map(|c| c.2).max().unwrap_or(0),
    }
}

/// This host's loopback TCP ceiling, GB/s: one connected socket pair on 127.0.0.1, one
/// thread writing 1 MiB buffers, another reading them, for `bytes` in all (the best of
/// three). What a single TCP stream can carry here, to set the TCP transport's figures
/// against.
pub fn tcp_loopback_gbps(bytes: u64) -> std::io::Result<f64> {
    use std::io::{Read, Write};
    const CHUNK: usize = 1 << 20;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(got);
                }
                got += n as u64;
            }
        });
        let mut w = std::net::TcpStream::connect(addr)?;
        let _ = w.set_nodelay(true);
        let buf = vec![0x5au8; CHUNK];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            w.write_all(&buf)?;
            sent += CHUNK as u64;
        }
        drop(w);
        let got = reader
            .join()
            .map_err(|_| std::io::Error::other("the reader panicked"))??;
        best = best.max(got as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

/// The raw capacity of a `net_memif` link on this host, GB/s of frame bytes: two ports of
/// this process joined by one memif socket, one thread filling `frame_bytes` frames from a
/// buffer and sending them in bursts, another receiving and freeing them, until `bytes` have
/// arrived (the best of three). The same link the DPDK transport's publishers and brokers use,
/// without the system: what the transport's figures are set against. The link is made once
/// per process and kept (removing memif ports is what DPDK 22.11 does worst).
#[cfg(feature = "dpdk")]
pub fn memif_link_gbps(frame_bytes: u32, bytes: u64) -> Result<f64, String> {
    use embar_sys::dpdk::{self, Port, RxBurst, TxBurst};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;
    static LINK: OnceLock<Result<(Port, Port), String>> = OnceLock::new();
    let e = |e: dpdk::DpdkError| e.to_string();
    dpdk::init(&dpdk::vdev_eal_args(256)).map_err(e)?;
    let pool = embar_dataplane::dpdk::publisher::mbufs()?;
    let frame_bytes = frame_bytes.min(embar_dataplane::dpdk::publisher::MAX_FRAME_BYTES);
    let (tx_port, rx_port) = LINK
        .get_or_init(|| {
            let sock = std::env::temp_dir().join(format!("embar-raw-{}.memif", std::process::id()));
            let _ = std::fs::remove_file(&sock);
            let args = |name: &str, role: &str| {
                dpdk::memif_devargs(
                    name,
                    role,
                    &sock.display().to_string(),
                    embar_dataplane::dpdk::publisher::MAX_FRAME_BYTES,
                )
            };
            let tx =
                Port::attach(&args("net_memif_rawtx", "server"), pool, 1024, 1024).map_err(e)?;
            let rx =
                Port::attach(&args("net_memif_rawrx", "client"), pool, 1024, 1024).map_err(e)?;
            Ok((tx, rx))
        })
        .as_ref()
        .map_err(Clone::clone)?;
    let up = Instant::now();
    while !(tx_port.link_up() && rx_port.link_up()) {
        if up.elapsed() > std::time::Duration::from_secs(5) {
            return Err("the memif link did not come up".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Connected: the socket's path is not needed again.
    let _ = std::fs::remove_file(
        std::env::temp_dir().join(format!("embar-raw-{}.memif", std::process::id())),
    );
    let src = vec![0x5au8; frame_bytes as usize];
    let mut best = 0.0f64;
    for _ in 0..3 {
        let done = AtomicBool::new(false);
        let limit = std::time::Duration::from_secs(20);
        let (got, secs) = std::thread::scope(|s| {
            let rx = s.spawn(|| {
                let _ = dpdk::register_thread();
                let mut burst = RxBurst::default();
                let mut got = 0u64;
                let mut first: Option<Instant> = None;
                let began = Instant::now();
                let mut polls = 0u32;
                while got < bytes {
                    let k = rx_port.rx(&mut burst);
                    for i in 0..k {
                        got += burst.frame(i).map_or_else(u64::from, |f| f.len() as u64);
                    }
                    if k > 0 {
                        first.get_or_insert_with(Instant::now);
                    }
                    polls = polls.wrapping_add(1);
                    if polls % 4096 == 0 && began.elapsed() > limit {
                        break;
                    }
                }
                done.store(true, Ordering::Relaxed);
                (got, first.map_or(0.0, |t| t.elapsed().as_secs_f64()))
            });
            let _ = dpdk::register_thread();
            let mut burst = TxBurst::default();
            while !done.load(Ordering::Relaxed) {
                while !burst.is_full() {
                    match burst.push(pool, src.len(), |b| b.copy_from_slice(&src)) {
                        Ok(true) => {}
                        _ => break,
                    }
                }
                burst.send(tx_port);
            }
            rx.join().unwrap_or((0, 0.0))
        });
        // What is still in the link's rings is drained before the next measurement.
        let mut burst = RxBurst::default();
        while rx_port.rx(&mut burst) > 0 {}
        if secs > 0.0 {
            best = best.max(got as f64 / secs / 1e9);
        }
    }
    Ok(best)
}

/// How the disk logs sync (the brokers' `--sync-bytes` and `--sync-interval-ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncPolicy {
    pub bytes: u64,
    pub interval: std::time::Duration,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        use embar_dataplane::replication::log::{SYNC_BYTES_DEFAULT, SYNC_INTERVAL_DEFAULT};
        SyncPolicy {
            bytes: SYNC_BYTES_DEFAULT,
            interval: SYNC_INTERVAL_DEFAULT,
        }
    }
}

/// This disk's ceiling for the disk logs, GB/s: one thread appending `record_bytes` writes to
/// a new file in `dir` (the brokers' log directory, so the same filesystem) for `bytes` in
/// all, with `fdatasync` as the logs do it (once `policy.bytes` are unsynced or the oldest
/// unsynced byte is `policy.interval` old, the synced pages then dropped from the page cache)
/// and a last one at the end, which the time counts: the bytes are on the disk, not in the
/// page cache. The better of two passes; the file is
/// removed after each. What one replica's log could write here at best, with nothing else
/// running.
pub fn disk_gbps(
    dir: &std::path::Path,
    record_bytes: usize,
    bytes: u64,
    policy: SyncPolicy,
) -> std::io::Result<f64> {
    use std::io::Write;
    let record_bytes = record_bytes.max(1);
    // Bytes that are not all one value, like a record's.
    let buf = crate::noise_bytes(0x9e37_79b9_7f4a_7c15, record_bytes);
    let path = dir.join(format!("disk-ceiling-{}.tmp", std::process::id()));
    let mut best = 0.0f64;
    for _ in 0..2 {
        /// Removes the file however the pass ends.
        struct Remove<'a>(&'a std::path::Path);
        impl Drop for Remove<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let _remove = Remove(&path);
        let t = Instant::now();
        let (mut written, mut unsynced) = (0u64, 0u64);
        let mut unsynced_since: Option<Instant> = None;
        while written < bytes {
            f.write_all(&buf)?;
            written += buf.len() as u64;
            unsynced += buf.len() as u64;
            let now = Instant::now();
            let since = *unsynced_since.get_or_insert(now);
            if unsynced >= policy.bytes || now.duration_since(since) >= policy.interval {
                f.sync_data()?;
                // As the disk logs do after a sync (`DiskLog::sync`).
                let _ = embar_sys::file::drop_cached(&f, written - unsynced, unsynced);
                unsynced = 0;
                unsynced_since = None;
            }
        }
        f.sync_data()?;
        best = best.max(written as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}
