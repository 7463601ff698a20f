//! The cluster a bench run drives: a local one it starts through the `embar` binary
//! (`embar cluster up`: control process, brokers and sequencer as real processes, the same
//! start-up users run), stopped with `embar cluster down` however the run ends; or a running
//! one named by its control address. The pool and the live brokers are found through the
//! control process as every client finds them (`embar_client::discovery`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use embar_client::discovery::{ClusterView, ControlAddr};

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
    /// Brokers also accept DPDK publishers (memif links) with frames of this size.
    pub dpdk: Option<u32>,
    /// The brokers' disk log sync policy (`--sync-bytes`, `--sync-interval-ms`; `None`:
    /// the brokers' defaults). Their logs are in `dir/broker-N`.
    pub sync_bytes: Option<u64>,
    pub sync_interval_ms: Option<u64>,
}

/// A cluster [`LocalCluster::start`] started: stopped when dropped.
#[derive(Debug)]
pub struct Started {
    embar: PathBuf,
    dir: PathBuf,
    pub control: SocketAddr,
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
        if let Some(frame_bytes) = self.dpdk {
            up.args(["--dpdk", "--dpdk-frame-bytes", &frame_bytes.to_string()]);
        }
        if let Some(n) = self.sync_bytes {
            up.args(["--sync-bytes", &n.to_string()]);
        }
        if let Some(ms) = self.sync_interval_ms {
            up.args(["--sync-interval-ms", &ms.to_string()]);
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
        };
        started.control = ControlAddr::in_cluster_dir(&self.dir)
            .map_err(|e| BenchError::Cluster(format!("after `cluster up`: {e}")))?
            .addr;
        Ok(started)
    }
}

impl Started {
    /// The cluster's directory: its state, and its brokers' data directories `broker-N`.
    pub fn dir(&self) -> &Path {
        &self.dir
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

/// Where the pool is and which brokers are live, per the control process at `control`.
pub fn cluster_view(control: SocketAddr) -> BenchResult<ClusterView> {
    Ok(ClusterView::ask(&ControlAddr::given(control)?)?)
}

/// Maps the pool with every page faulted in, so the data path takes no page fault.
pub fn open_pool(path: &Path) -> BenchResult<embar_dataplane::pool::Pool> {
    let opts = embar_dataplane::pool::OpenOptions {
        populate: true,
        ..Default::default()
    };
    Ok(embar_dataplane::pool::Pool::open(path, &opts)?)
}
