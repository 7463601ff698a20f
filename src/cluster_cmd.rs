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

#[derive(Clone, Debug, clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 2)]
    pub brokers: u32,
    /// Directory of the cluster's state, logs and description.
    #[arg(long, default_value = "/tmp/embar-cluster")]
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
    /// Pool options (path defaults to /dev/shm/embar-<dir name>.pool).
    #[command(flatten)]
    pub pool: crate::pool_cmd::CreateArgs,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub control: SocketAddr,
    pub pool: PathBuf,
    pub pids: Vec<u32>,
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
            return Err(format!("{} did not start: {}", log.display(), tail.trim()));
        }
        exited = !embar_sys::process::alive(pid as i32) || zombie(pid);
        if !exited {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
    let (control_pid, control_log) = spawn(&a.dir, "control", &control_args)?;
    let mut pids = vec![control_pid];
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
        let mut args = vec![
            "broker".to_string(),
            "--control".into(),
            control.to_string(),
        ];
        if let Some(r) = a.retention_bytes {
            args.extend(["--retention-bytes".into(), r.to_string()]);
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
        wait_line(pid, &log, "in pool slot", Duration::from_secs(20))?;
    }
    let file = ClusterFile {
        control,
        pool: pool_path,
        pids,
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
    std::fs::write(cluster_file(&a.dir), text).map_err(|e| e.to_string())?;
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

pub fn down(dir: &Path) -> Result<(), String> {
    let path = cluster_file(dir);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("no cluster described in {}: {e}", path.display()))?;
    let file: ClusterFile =
        serde_json::from_str(&text).map_err(|e| format!("{} is damaged: {e}", path.display()))?;
    // Brokers first, then the control process.
    for pid in file.pids.iter().rev() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let start = Instant::now();
    while file
        .pids
        .iter()
        .any(|p| embar_sys::process::alive(*p as i32) && !zombie(*p))
    {
        if start.elapsed() > Duration::from_secs(10) {
            for pid in &file.pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&file.pool);
    std::fs::remove_file(&path).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir.join("control"));
    Ok(())
}

/// A child that exited but was not reaped (its parent, `cluster up`, is gone or busy).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
