//! An idle cluster's brokers leave the cores alone: once nothing is published, each broker's
//! polling loop parks on its doorbell in the pool instead of spinning, so its CPU time over a
//! few seconds stays small. A correctness bound, generous against a loaded host: a loop that
//! spins (or sleeps 50 us per round) costs 10% or more of a core; parked it costs about 1%.

use std::time::{Duration, Instant};

use embar_test_support::{serial, Cluster};

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The 1-minute load average, per CPU.
fn load_per_cpu() -> f64 {
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    load / embar_sys::cpu::available_cpus().max(1) as f64
}

#[test]
fn an_idle_clusters_brokers_use_little_cpu() {
    let _g = serial();
    let c = Cluster::up(
        "idle-cpu",
        &["--pool-bytes", "128MiB", "--segment-bytes", "4MiB"],
    );
    c.topic("t", &[]);
    let out = c.run(&["publish", "--topic", "t"], Some("hi\n".into()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let brokers: Vec<u64> = c.file()["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .skip(1) // the control process
        .filter_map(|p| p.as_u64())
        .collect();
    assert_eq!(brokers.len(), 2, "{}", c.file());
    // Past the loops' yield phase after the publish (5 ms), by a wide margin. A measurement
    // window, not a wait for a condition: the test is what the brokers do while nothing
    // happens.
    std::thread::sleep(Duration::from_millis(500));
    let window = Duration::from_secs(3);
    let hz = 100.0; // USER_HZ: /proc reports clock ticks of 1/100 s on Linux
    let before: Vec<u64> = brokers
        .iter()
        .map(|&p| cpu_ticks(p).expect("a broker"))
        .collect();
    let start = Instant::now();
    std::thread::sleep(window);
    let secs = start.elapsed().as_secs_f64();
    for (pid, t0) in brokers.iter().zip(before) {
        let used = (cpu_ticks(*pid).expect("a broker") - t0) as f64 / hz / secs;
        if used >= 0.30 && load_per_cpu() > 2.0 {
            eprintln!(
                "skipped: the host is too loaded to measure (load {:.1} per CPU)",
                load_per_cpu()
            );
            return;
        }
        assert!(
            used < 0.30,
            "idle broker {pid} used {:.0}% of a core over {secs:.1} s",
            used * 100.0
        );
    }
}
