//! The cluster a bench run drives: a local one it starts through the `embar` binary
//! (`embar cluster up`: control process, brokers and sequencer as real processes, the same
//! start-up users run), stopped with `embar cluster down` however the run ends; or a running
//! one named by its control address. A publisher finds the pool and the live brokers through
//! the control process.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use embar_control::ControlClient;
use serde_json::Value;

use crate::{BenchError, BenchResult};

/// A local cluster to start.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    /// The `embar` binary.
    pub embar: PathBuf,
    /// Its state, logs and description (`cluster.json`); removed when it stops.
    pub dir: PathBuf,
    pub brokers: u32,
    pub pool_bytes: u64,
    pub segment_bytes: u64,
    /// Broker slots of the pool (at least `brokers`).
    pub max_brokers: u32,
    /// Brokers also accept verbs publishers on this IP, with this device and GID index.
    pub verbs: Option<(IpAddr, Option<String>, u8)>,
}

/// A cluster [`LocalCluster::start`] started: stopped when dropped.
#[derive(Debug)]
pub struct Started {
    embar: PathBuf,
    dir: PathBuf,
    pub control: SocketAddr,
    pub pool: PathBuf,
}

impl LocalCluster {
    /// Runs `embar cluster up`, which returns once every broker is live.
    pub fn start(&self) -> BenchResult<Started> {
        let mut up = Command::new(&self.embar);
        up.args(["cluster", "up", "--listen", "127.0.0.1:0", "--dir"])
            .arg(&self.dir)
            .args(["--brokers", &self.brokers.to_string()])
            .args(["--pool-bytes", &self.pool_bytes.to_string()])
            .args(["--segment-bytes", &self.segment_bytes.to_string()])
            .args(["--max-brokers", &self.max_brokers.to_string()]);
        if let Some((ip, device, gid_index)) = &self.verbs {
            up.args([
                "--verbs",
                &ip.to_string(),
                "--gid-index",
                &gid_index.to_string(),
            ]);
            if let Some(d) = device {
                up.args(["--rdma-device", d]);
            }
        }
        let out = up.output().map_err(|source| BenchError::Spawn {
            what: format!("{} cluster up", self.embar.display()),
            source,
        })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim();
            return Err(BenchError::Cluster(
                err.strip_prefix("embar: ").unwrap_or(err).to_string(),
            ));
        }
        // From here the cluster is stopped however this ends.
        let mut started = Started {
            embar: self.embar.clone(),
            dir: self.dir.clone(),
            control: SocketAddr::from(([127, 0, 0, 1], 0)),
            pool: PathBuf::new(),
        };
        let path = self.dir.join("cluster.json");
        let file: Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(|| {
                BenchError::Cluster(format!("`cluster up` wrote no {}", path.display()))
            })?;
        started.control = file["control"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BenchError::Cluster(format!("{} names no control", path.display())))?;
        started.pool = PathBuf::from(file["pool"].as_str().unwrap_or_default());
        Ok(started)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = Command::new(&self.embar)
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// For every live broker of the cluster at `control` (in pool slot order), its slot and
/// what `pick` takes from its status; brokers `pick` rejects are left out. And the status.
fn live_brokers<T>(
    control: SocketAddr,
    pick: impl Fn(&Value) -> Option<T>,
) -> BenchResult<(Value, Vec<(u32, T)>)> {
    let status = ControlClient::new(control).status()?;
    let mut live: Vec<(u32, T)> = Vec::new();
    for b in status["brokers"].as_array().into_iter().flatten() {
        if b["alive"] != true {
            continue;
        }
        if let (Some(slot), Some(t)) = (b["slot"].as_u64(), pick(b)) {
            if !live.iter().any(|(s, _)| u64::from(*s) == slot) {
                live.push((slot as u32, t));
            }
        }
    }
    live.sort_unstable_by_key(|b| b.0);
    Ok((status, live))
}

/// The pool path and the slots of the live brokers of the cluster at `control`.
pub fn discover(control: SocketAddr) -> BenchResult<(PathBuf, Vec<u32>)> {
    let (status, live) = live_brokers(control, |_| Some(()))?;
    let pool = status["pool"]["path"]
        .as_str()
        .ok_or_else(|| BenchError::Cluster("the control process names no pool".into()))?;
    if live.is_empty() {
        return Err(BenchError::Cluster(
            "no live broker (start one with `embar broker` or `embar cluster up`)".into(),
        ));
    }
    Ok((PathBuf::from(pool), live.into_iter().map(|b| b.0).collect()))
}

/// `(pool slot, verbs address)` of every live broker that accepts verbs publishers.
pub fn verbs_brokers(control: SocketAddr) -> BenchResult<Vec<(u32, SocketAddr)>> {
    let (_, live) = live_brokers(control, |b| b["addresses"]["verbs"].as_str()?.parse().ok())?;
    if live.is_empty() {
        return Err(BenchError::Cluster("no live broker accepts verbs publishers (start brokers with --verbs, or `embar cluster up --verbs IP`)".into()));
    }
    Ok(live)
}

/// The live brokers that take TCP clients: `(pool slot, address)`.
pub fn tcp_brokers(control: SocketAddr) -> BenchResult<Vec<(u32, SocketAddr)>> {
    let (_, live) = live_brokers(control, |b| b["addresses"]["tcp"].as_str()?.parse().ok())?;
    if live.is_empty() {
        return Err(BenchError::Cluster(
            "no live broker accepts TCP clients (brokers started with --tcp none?)".into(),
        ));
    }
    Ok(live)
}

/// Maps the pool with every page faulted in, so the data path takes no page fault.
pub fn open_pool(path: &Path) -> BenchResult<embar_dataplane::pool::Pool> {
    let opts = embar_dataplane::pool::OpenOptions {
        populate: true,
        ..Default::default()
    };
    Ok(embar_dataplane::pool::Pool::open(path, &opts)?)
}
