//! `embar broker`: parses its flags and runs an `embar_broker::BrokerNode` (registration,
//! the data path, the sequencers when assigned, heartbeats, Prometheus metrics) until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use embar_broker::{
    BrokerConfig, BrokerNode, ReplicationConfig, RunError, SequencerRole, StartError, VerbsConfig,
};
use embar_dataplane::replication::log::LogConfig;

use crate::exit::{CliError, CliResult};

#[derive(Clone, Debug, clap::Args)]
pub struct BrokerArgs {
    /// Address of the control process.
    #[arg(long, default_value = crate::control_cmd::DEFAULT_CONTROL)]
    pub control: SocketAddr,
    /// Always run the sequencer of every topic in this process (pinned here). By default a
    /// broker runs it when the control process assigns it (the oldest live broker does;
    /// another takes over when it dies).
    #[arg(long, conflicts_with = "no_sequencer")]
    pub sequencer: bool,
    /// Never run the sequencer here (it runs elsewhere, e.g. `embar sequencer`).
    #[arg(long)]
    pub no_sequencer: bool,
    /// Address of the Prometheus endpoint (`:0`: a free port, given to the control process).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics: SocketAddr,
    /// Pin the data-path thread to this CPU (the sequencer to the next one).
    #[arg(long)]
    pub pin_cpu: Option<usize>,
    /// Log space per topic kept for lagging subscribers; past it the oldest is reclaimed and
    /// a subscriber that had not read it gets an error (default: keep it until every
    /// subscriber has read it).
    #[arg(long, value_parser = crate::units::parse_bytes)]
    pub retention_bytes: Option<u64>,
    /// Accept verbs (RDMA) publishers on this TCP address, which publishers must reach (the
    /// RDMA netdev's IP, e.g. 10.9.9.1:0 for a free port). Needs a build with `--features
    /// verbs` and an RDMA device.
    #[arg(long)]
    pub verbs: Option<SocketAddr>,
    /// RDMA device for `--verbs` (default: the first).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// GID index for `--verbs` (RoCEv2 over IPv4 is usually 1 on rxe).
    #[arg(long, default_value_t = 1)]
    pub gid_index: u8,
    /// Accept TCP publishers and subscribers (other hosts) on this address, which they
    /// must reach (not a wildcard; port 0 takes a free one). `none` turns TCP off.
    #[arg(long, default_value = "127.0.0.1:0", value_parser = parse_tcp)]
    pub tcp: TcpListen,
    /// A TCP publisher that stalls mid-frame or leaves its acks unread this long, or a TCP
    /// subscriber that reads nothing (a verbs subscriber that returns no credit) this long,
    /// is dropped (ms).
    #[arg(long, default_value_t = 10_000)]
    pub tcp_idle_timeout_ms: u64,
    /// Accept DPDK publishers (docs/dpdk.md; a build with `--features dpdk`): each memif
    /// publisher gets a port of its own, attached when its session opens on the TCP port.
    #[arg(long)]
    pub dpdk: bool,
    /// DPDK: also serve publishers on this Ethernet segment, through this port (device
    /// arguments, e.g. `net_af_packet0,iface=veth0`). Implies `--dpdk`.
    #[arg(long)]
    pub dpdk_port: Option<String>,
    /// DPDK: largest frame in bytes, Ethernet header included (1514: a 1500-byte MTU; up to
    /// 9216 where the link takes jumbo frames).
    #[arg(long, default_value_t = 1514, value_parser = clap::value_parser!(u32).range(256..=9216))]
    pub dpdk_frame_bytes: u32,
    /// DPDK: environment (EAL) options, space-separated (default: virtual devices without
    /// hugepages or PCI, 256 MiB).
    #[arg(long, allow_hyphen_values = true)]
    pub dpdk_eal: Option<String>,
    /// How long the control process may be unreachable before this broker stops serving
    /// (it goes on serving publishers and subscribers meanwhile, and retries heartbeats).
    #[arg(long, default_value_t = embar_control::keepalive::GRACE_DEFAULT.as_millis() as u64)]
    pub control_grace_ms: u64,
    /// Keep replicas of ordered batches (topics with a replication factor) in disk logs
    /// under this directory (docs/durability.md). Without it this broker holds no replica,
    /// and ACK 2 batches whose replica set names it are not acked.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// `fdatasync` a disk log once this many bytes are unsynced.
    #[arg(long, default_value = "64MiB", value_parser = crate::units::parse_bytes)]
    pub sync_bytes: u64,
    /// `fdatasync` a disk log once its oldest unsynced byte is this old.
    #[arg(long, default_value_t = 250)]
    pub sync_interval_ms: u64,
    /// A disk log starts a new segment file past this size.
    #[arg(long, default_value = "64MiB", value_parser = crate::units::parse_bytes)]
    pub log_segment_bytes: u64,
}

/// `--tcp`: an address, or `none`.
#[derive(Clone, Copy, Debug)]
pub struct TcpListen(pub Option<SocketAddr>);

fn parse_tcp(s: &str) -> Result<TcpListen, String> {
    if s == "none" {
        return Ok(TcpListen(None));
    }
    s.parse()
        .map(|a| TcpListen(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (an IP:port, or none)"))
}

impl BrokerArgs {
    fn config(&self) -> BrokerConfig {
        BrokerConfig {
            control: self.control,
            sequencer: if self.sequencer {
                SequencerRole::Pinned
            } else if self.no_sequencer {
                SequencerRole::Never
            } else {
                SequencerRole::Candidate
            },
            metrics: self.metrics,
            pin_cpu: self.pin_cpu,
            retention_bytes: self.retention_bytes,
            verbs: self.verbs.map(|addr| VerbsConfig {
                addr,
                device: self.rdma_device.clone(),
                gid_index: self.gid_index,
            }),
            tcp: self.tcp.0,
            tcp_frontend: embar_dataplane::tcp::frontend::FrontendConfig {
                idle_timeout: Duration::from_millis(self.tcp_idle_timeout_ms.max(1)),
                ..Default::default()
            },
            dpdk: (self.dpdk || self.dpdk_port.is_some()).then(|| {
                embar_dataplane::tcp::frontend::DpdkFrontendConfig {
                    eal_args: crate::dpdk_eal_args(self.dpdk_eal.as_deref()),
                    port: self.dpdk_port.clone(),
                    frame_bytes: self.dpdk_frame_bytes,
                    idle_timeout: Duration::from_millis(self.tcp_idle_timeout_ms.max(1)),
                }
            }),
            control_grace: Duration::from_millis(self.control_grace_ms),
            replication: self.data_dir.clone().map(|data_dir| ReplicationConfig {
                data_dir,
                log: LogConfig {
                    segment_bytes: self.log_segment_bytes,
                    sync_bytes: self.sync_bytes,
                    sync_interval: Duration::from_millis(self.sync_interval_ms),
                },
            }),
        }
    }
}

pub fn run(a: &BrokerArgs) -> CliResult<()> {
    if (a.dpdk || a.dpdk_port.is_some()) && !cfg!(feature = "dpdk") {
        return Err(CliError::usage(crate::NO_DPDK));
    }
    let stop = embar_sys::signal::stop_on_term();
    let node = BrokerNode::start(a.config()).map_err(|e| match e {
        StartError::NoVerbs => CliError::usage(crate::NO_VERBS),
        StartError::NoDpdk => CliError::usage(crate::NO_DPDK),
        StartError::Control(c) => CliError::from(c),
        StartError::Pool(p) => CliError::from(p),
        e => CliError::from(e.to_string()),
    })?;
    if let Some(at) = node.verbs_addr() {
        println!("embar broker: verbs publishers connect to {at}");
    }
    if let Some(at) = node.tcp_addr() {
        println!("embar broker: TCP publishers and subscribers connect to {at}");
    }
    // `cluster up` waits for this line.
    println!(
        "embar broker {} in pool slot {} (metrics {}{})",
        node.broker_id(),
        node.slot(),
        node.metrics_addr(),
        if a.sequencer { ", sequencer" } else { "" }
    );
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && !node.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    node.stop().map_err(|e| match e {
        RunError::Driver(embar_broker::DriverError::Pool(p)) => CliError::from(p),
        e => CliError::from(e.to_string()),
    })
}
