//! `embar cluster up|down`: a local cluster (control process, brokers, sequencer) as
//! background processes, described in `DIR/cluster.json`.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use embar_control::ControlClient;
use serde::{Deserialize, Serialize};

/// How long a broker may take to say it serves: it faults in the whole pool first, which on a
/// slow or loaded host (a TCG VM, several builds at once) takes tens of seconds for a few
/// hundred MiB. A broker that exits is reported at once, whatever this says.
const BROKER_START_LIMIT: Duration = Duration::from_secs(90);

#[derive(Clone, Debug, clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 2)]
    pub brokers: u32,
    /// Directory of the cluster's state, logs and description (`cluster.json`, where
    /// `embar` commands find the control process when not given `--control`).
    #[arg(long, env = "EMBAR_CLUSTER_DIR", default_value = embar_client::discovery::DEFAULT_CLUSTER_DIR)]
    pub dir: PathBuf,
    /// Address of the control process (`:0`: a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Passed to every broker (see `embar broker --retention-bytes`).
    #[arg(long, value_parser = crate::units::parse_bytes)]
    pub retention_bytes: Option<u64>,
    /// Brokers also accept verbs (RDMA) publishers on this IP (the RDMA netdev's address),
    /// each on a free port (see `embar broker --verbs`).
    #[arg(long)]
    pub verbs: Option<std::net::IpAddr>,
    /// RDMA device for `--verbs`.
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// GID index for `--verbs`.
    #[arg(long, default_value_t = 1)]
    pub gid_index: u8,
    /// Brokers accept TCP publishers and subscribers on this IP, each on a free port (see
    /// `embar broker --tcp`; default: the control process's IP, or 127.0.0.1 for a
    /// wildcard).
    #[arg(long)]
    pub tcp: Option<std::net::IpAddr>,
    /// Brokers also accept DPDK publishers over memif links (see `embar broker --dpdk`).
    #[arg(long)]
    pub dpdk: bool,
    /// Passed to every broker (see `embar broker --dpdk-port`; implies `--dpdk`).
    #[arg(long)]
    pub dpdk_port: Option<String>,
    /// Passed to every broker (see `embar broker --dpdk-frame-bytes`).
    #[arg(long)]
    pub dpdk_frame_bytes: Option<u32>,
    /// Passed to every broker (see `embar broker --tcp-idle-timeout-ms`).
    #[arg(long)]
    pub tcp_idle_timeout_ms: Option<u64>,
    /// Passed to every broker (see `embar broker --sync-interval-ms`).
    #[arg(long)]
    pub sync_interval_ms: Option<u64>,
    /// Passed to every broker (see `embar broker --sync-bytes`).
    #[arg(long, value_parser = crate::units::parse_bytes)]
    pub sync_bytes: Option<u64>,
    /// Passed to the control process (see `embar control --replace-after-ms`).
    #[arg(long)]
    pub replace_after_ms: Option<u64>,
    /// Pool options (path defaults to /dev/shm/embar-<dir name>.pool).
    #[command(flatten)]
    pub pool: crate::pool_cmd::CreateArgs,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub control: SocketAddr,
    pub pool: PathBuf,
    pub pids: Vec<u32>,
    /// The control process's command line (after `embar`): run it again to restart the
    /// control process on the same state and address.
    #[serde(default)]
    pub control_args: Vec<String>,
}

fn cluster_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> Result<(u32, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let log = dir.join(format!("{name}.log"));
    let out = File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C at this terminal does not stop the cluster.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    Ok((child.id(), log))
}

/// Waits until `log` has a line containing `needle`; returns that line. Fails at once when
/// process `pid` has exited.
fn wait_line(pid: u32, log: &Path, needle: &str, limit: Duration) -> Result<String, String> {
    let start = Instant::now();
    let mut exited = false;
    loop {
        if let Ok(f) = File::open(log) {
            if let Some(l) = BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .find(|l| l.contains(needle))
            {
                return Ok(l);
            }
        }
        // Once it has exited, the log is read once more (it may have written the line
        // just before).
        if exited || start.elapsed() > limit {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let why = if exited {
                format!("it exited (pid {pid})")
            } else {
                format!("no {needle:?} line after {} s", limit.as_secs())
            };
            return Err(format!(
                "{} did not start ({why}): {}",
                log.display(),
                tail.trim()
            ));
        }
        exited = !embar_sys::process::alive(pid as i32);
        if !exited {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The processes `up` started, stopped when dropped unless `up` succeeded.
struct Started(Vec<u32>, Option<PathBuf>);

impl Drop for Started {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.0.iter().rev().copied().collect();
        if pids.is_empty() {
            return;
        }
        stop(&pids, Duration::from_secs(5));
        // A pool this start created (a `/dev/shm` file holds its memory) goes with it.
        if let Some(pool) = &self.1 {
            let _ = std::fs::remove_file(pool);
        }
    }
}

/// Sends SIGTERM to `pids` in order, waits up to `patience` for them to exit, then SIGKILLs
/// the rest; returns those it had to kill.
fn stop(pids: &[u32], patience: Duration) -> Vec<u32> {
    let signal = |pid: u32, sig: &str| {
        let _ = Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    };
    let alive = |pid: &&u32| embar_sys::process::alive(**pid as i32);
    for &pid in pids {
        signal(pid, "-TERM");
    }
    let start = Instant::now();
    while pids.iter().any(|p| alive(&p)) {
        if start.elapsed() > patience {
            let killed: Vec<u32> = pids.iter().filter(alive).copied().collect();
            for &pid in &killed {
                signal(pid, "-KILL");
            }
            return killed;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Vec::new()
}

pub fn up(a: &UpArgs) -> Result<ClusterFile, String> {
    if a.brokers == 0 {
        return Err("--brokers must be at least 1".into());
    }
    if cluster_file(&a.dir).exists() {
        return Err(format!(
            "a cluster is already described in {} (stop it with `embar cluster down --dir {}`)",
            cluster_file(&a.dir).display(),
            a.dir.display()
        ));
    }
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| format!("cannot create {}: {e}", a.dir.display()))?;
    let (mut pool_path, cfg, opts) = crate::pool_cmd::resolve(&a.pool)?;
    if a.pool.path.is_none() && a.pool.config.is_none() {
        let name = a
            .dir
            .file_name()
            .map_or("cluster".into(), |n| n.to_string_lossy().to_string());
        pool_path = PathBuf::from(format!("/dev/shm/embar-{name}.pool"));
    }
    if cfg.max_brokers < a.brokers {
        return Err(format!(
            "the pool has room for {} brokers, {} were asked for",
            cfg.max_brokers, a.brokers
        ));
    }
    let mut control_args = vec![
        "control".to_string(),
        "--listen".into(),
        a.listen.to_string(),
        "--state-dir".into(),
        a.dir.join("control").display().to_string(),
        "--path".into(),
        pool_path.display().to_string(),
        "--pool-bytes".into(),
        cfg.pool_bytes.to_string(),
        "--max-topics".into(),
        cfg.max_topics.to_string(),
        "--max-brokers".into(),
        cfg.max_brokers.to_string(),
        "--ring-slots".into(),
        cfg.ring_slots.to_string(),
        "--segment-bytes".into(),
        cfg.segment_bytes.to_string(),
        "--coherence".into(),
        opts.coherence.name().to_string(),
    ];
    if opts.populate {
        control_args.push("--populate".into());
    }
    if let Some(ms) = a.replace_after_ms {
        control_args.extend(["--replace-after-ms".into(), ms.to_string()]);
    }
    let created_pool = (!pool_path.exists()).then(|| pool_path.clone());
    let (control_pid, control_log) = spawn(&a.dir, "control", &control_args)?;
    // Until the cluster is described in its file, a failure stops what was started (nothing
    // else could find those processes to stop them), and removes the pool it created.
    let mut started = Started(vec![control_pid], created_pool);
    let pids = &mut started.0;
    let line = wait_line(
        control_pid,
        &control_log,
        "listening on",
        Duration::from_secs(20),
    )?;
    let control: SocketAddr = line
        .split_whitespace()
        .nth(4)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("cannot read the control address from {line:?}"))?;
    // The control process assigns the sequencer to the oldest live broker (broker 0 here),
    // and to the next one if that dies.
    for b in 0..a.brokers {
        // Each broker keeps its disk logs in its own directory, kept across down and up.
        let mut args = vec![
            "broker".to_string(),
            "--control".into(),
            control.to_string(),
            "--data-dir".into(),
            a.dir.join(format!("broker-{b}")).display().to_string(),
        ];
        if let Some(ms) = a.sync_interval_ms {
            args.extend(["--sync-interval-ms".into(), ms.to_string()]);
        }
        if let Some(n) = a.sync_bytes {
            args.extend(["--sync-bytes".into(), n.to_string()]);
        }
        if let Some(r) = a.retention_bytes {
            args.extend(["--retention-bytes".into(), r.to_string()]);
        }
        let tcp_ip = a.tcp.unwrap_or(if a.listen.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            a.listen.ip()
        });
        args.extend(["--tcp".into(), SocketAddr::new(tcp_ip, 0).to_string()]);
        if let Some(ms) = a.tcp_idle_timeout_ms {
            args.extend(["--tcp-idle-timeout-ms".into(), ms.to_string()]);
        }
        if a.dpdk {
            args.push("--dpdk".into());
        }
        if let Some(p) = &a.dpdk_port {
            args.extend(["--dpdk-port".into(), p.clone()]);
        }
        if let Some(n) = a.dpdk_frame_bytes {
            args.extend(["--dpdk-frame-bytes".into(), n.to_string()]);
        }
        if let Some(ip) = a.verbs {
            args.extend([
                "--verbs".into(),
                SocketAddr::new(ip, 0).to_string(),
                "--gid-index".into(),
                a.gid_index.to_string(),
            ]);
            if let Some(d) = &a.rdma_device {
                args.extend(["--rdma-device".into(), d.clone()]);
            }
        }
        let (pid, log) = spawn(&a.dir, &format!("broker-{b}"), &args)?;
        pids.push(pid);
        wait_line(pid, &log, "in pool slot", BROKER_START_LIMIT)?;
    }
    // A restart of the control process listens on the same address (its state remembers
    // it); the recorded command line says so explicitly.
    if let Some(at) = control_args.iter().position(|a| a == "--listen") {
        control_args[at + 1] = control.to_string();
    }
    let file = ClusterFile {
        control,
        pool: pool_path,
        pids: pids.clone(),
        control_args,
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
    std::fs::write(cluster_file(&a.dir), text).map_err(|e| e.to_string())?;
    // Described: from here `embar cluster down` finds and stops them.
    started.0.clear();
    // Wait until every broker is live in the control process's view.
    let client = ControlClient::new(control);
    let start = Instant::now();
    while client.status().map_err(|e| e.to_string())?["live_brokers"].as_u64()
        < Some(u64::from(a.brokers))
    {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("brokers did not become live".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(file)
}

/// A process of the cluster that `down` stops.
struct Member {
    pid: u32,
    what: String,
}

/// Every process of the cluster in `dir`: those `up` started, and any control process or
/// broker started into it by hand since (found from the control process's pid file and
/// durable state, and from the control process's status if it answers). A pid counts only if
/// its command line is `embar` naming this cluster (its state directory or control address),
/// so a reused pid is never signalled.
fn members(dir: &Path, file: &ClusterFile) -> Vec<Member> {
    let state_dir = dir.join("control");
    let mut pids: Vec<(u32, String)> = Vec::new();
    if let Some(p) = std::fs::read_to_string(state_dir.join("control.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        pids.push((p, "control process".into()));
    }
    let mut brokers: Vec<serde_json::Value> = Vec::new();
    if let Ok(state) = embar_control::store::load(&state_dir) {
        for m in state.into_iter().flat_map(|d| d.members) {
            brokers.push(serde_json::json!({ "slot": m.slot, "addresses": m.addresses }));
        }
    }
    if let Ok(status) = ControlClient::new(file.control).status() {
        if let Some(p) = status["pid"].as_u64() {
            pids.push((p as u32, "control process".into()));
        }
        brokers.extend(status["brokers"].as_array().into_iter().flatten().cloned());
    }
    for b in brokers {
        if let Some(p) = b["addresses"]["pid"].as_str().and_then(|p| p.parse().ok()) {
            pids.push((p, format!("broker in slot {}", b["slot"])));
        }
    }
    for (i, p) in file.pids.iter().enumerate() {
        let what = if i == 0 {
            "control process".into()
        } else {
            "broker".into()
        };
        pids.push((*p, what));
    }
    let names = [state_dir.display().to_string(), file.control.to_string()];
    let mut out: Vec<Member> = Vec::new();
    for (pid, what) in pids {
        if out.iter().any(|m| m.pid == pid) || !is_ours(pid, &names) {
            continue;
        }
        out.push(Member { pid, what });
    }
    out
}

/// Whether `pid` runs an `embar` control process or broker (whatever its executable is
/// called) with one of `names` as an argument (and has not exited).
fn is_ours(pid: u32, names: &[String]) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let role = args
        .get(1)
        .is_some_and(|a| ["control", "broker", "sequencer"].contains(&a.as_str()));
    role && args.iter().any(|a| names.iter().any(|n| a == n))
        && embar_sys::process::alive(pid as i32)
}

/// Stops every process of the cluster (see [`members`]), brokers first, and deletes its pool
/// (memory: a later `up` makes a new one, as after a reboot). The control state (topics) and
/// the brokers' disk logs stay, with the brokers taken out of the state (they are stopped; a
/// later `up` starts new ones into the slots); `purge` deletes those too. Returns what it
/// stopped.
pub fn down(dir: &Path, purge: bool) -> Result<Vec<String>, crate::exit::CliError> {
    let path = cluster_file(dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        crate::exit::CliError::not_found(format!("no cluster described in {}: {e}", path.display()))
    })?;
    let file: ClusterFile =
        serde_json::from_str(&text).map_err(|e| format!("{} is damaged: {e}", path.display()))?;
    let mut procs = members(dir, &file);
    // Brokers first, then the control process (so brokers are not left without it).
    procs.sort_by_key(|m| m.what.starts_with("control"));
    let pids: Vec<u32> = procs.iter().map(|m| m.pid).collect();
    let killed = stop(&pids, Duration::from_secs(10));
    let stopped = procs
        .iter()
        .map(|m| match killed.contains(&m.pid) {
            true => format!(
                "{} (pid {}; SIGKILL: it ignored SIGTERM for 10 s)",
                m.what, m.pid
            ),
            false => format!("{} (pid {})", m.what, m.pid),
        })
        .collect();
    let _ = std::fs::remove_file(&file.pool);
    std::fs::remove_file(&path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    let state_dir = dir.join("control");
    if purge {
        let _ = std::fs::remove_dir_all(&state_dir);
        purge_broker_dirs(dir);
    } else if let Ok(Some(mut state)) = embar_control::store::load(&state_dir) {
        state.members.clear();
        embar_control::store::save(&state_dir, &state)
            .map_err(|e| format!("cannot save {}: {e}", state_dir.display()))?;
    }
    Ok(stopped)
}

/// Deletes the brokers' data directories (`broker-N`) of a cluster directory.
fn purge_broker_dirs(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let numbered = name
            .strip_prefix("broker-")
            .is_some_and(|n| n.parse::<u32>().is_ok());
        if numbered && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
