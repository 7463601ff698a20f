//! `embar bench` and `embar ring-bench`: their flags, and calls into the bench crate
//! (`embar-bench`), which runs them and prints their reports.

use std::net::SocketAddr;
use std::path::PathBuf;

use embar_bench::ringload::Fault;
use embar_bench::{pipeline, ring};
use embar_dataplane::pool::coherence::CoherenceMode;

use crate::exit::CliResult;
use crate::units::parse_bytes;

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Use this running cluster instead of starting one.
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// Brokers of the cluster the bench starts.
    #[arg(long, default_value_t = 2)]
    pub brokers: u32,
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    #[arg(long, default_value_t = 1)]
    pub subscribers: u32,
    /// Payload bytes to publish in all.
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    pub total_bytes: u64,
    #[arg(long, default_value = "1KiB", value_parser = parse_bytes)]
    pub message_bytes: u64,
    #[arg(long, default_value = "2MiB", value_parser = parse_bytes)]
    pub batch_bytes: u64,
    #[arg(long, default_value_t = 5)]
    pub order: u8,
    #[arg(long, default_value_t = 1)]
    pub ack: u8,
    /// Replication factor of the bench's topics: each ordered batch is written to the disk
    /// logs of this many brokers (0: none). `--ack 2` needs at least 1; a run with replicas
    /// also measures this disk's ceiling, and `--ack 2` runs ACK 1 on the same topic shape
    /// beside it.
    #[arg(long, default_value_t = 0)]
    pub rf: u8,
    /// Passed to the brokers of the cluster the bench starts (see `embar broker
    /// --sync-bytes`), and used by the disk ceiling.
    #[arg(long, value_parser = parse_bytes)]
    pub sync_bytes: Option<u64>,
    /// Passed to the brokers of the cluster the bench starts (see `embar broker
    /// --sync-interval-ms`), and used by the disk ceiling.
    #[arg(long)]
    pub sync_interval_ms: Option<u64>,
    /// The cluster the bench starts keeps its state and its brokers' disk logs in
    /// DIR/embar-bench-PID (removed at the end), and the disk ceiling is measured there
    /// (with --control: in DIR); default: the temporary directory ($TMPDIR, else /tmp).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Also run this ORDER in the same run and report the ratio (e.g. 0).
    #[arg(long)]
    pub compare_order: Option<u8>,
    /// Open loop: messages per second per publisher, paced by a schedule; latency counts
    /// from the scheduled time, so a stall is not hidden (no coordinated omission).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Pool of the cluster the bench starts.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub pool_bytes: u64,
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub segment_bytes: u64,
    /// JSON (every run, and each figure's min, median and max over them): one object on
    /// stdout instead of the summary, or with FILE written there beside the summary.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub json: Option<Option<PathBuf>>,
    /// Repeat the whole run (the same run's memcpy baseline included) this many times and
    /// report each figure's min, median and max.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(pipeline::RUNS_MAX)))]
    pub runs: u32,
    /// Write SVG plots into DIR: latency.svg (publish-to-ack and publish-to-deliver by
    /// percentile), throughput.svg (over time), orders.svg (with --compare-order).
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Write the latency histograms to FILE in HdrHistogram's interval log format.
    #[arg(long, value_name = "FILE")]
    pub hdr_log: Option<PathBuf>,
    /// Publish this much, unmeasured, before the measured runs (default: one pass over the
    /// pool's log space, at most --total-bytes, so the figures are those of a running
    /// system; 0: none).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub warmup: Option<u64>,
    #[command(flatten)]
    pub transport: crate::client_cmd::TransportArgs,
    /// verbs: the IP the brokers of the started cluster listen on (the RDMA netdev's;
    /// default: $RDMA_IP).
    #[arg(long)]
    pub verbs_ip: Option<std::net::IpAddr>,
}

impl BenchArgs {
    /// The arguments of a bare `embar bench`.
    pub fn parse_defaults() -> BenchArgs {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            a: BenchArgs,
        }
        <Only as clap::Parser>::parse_from(["embar-bench"]).a
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct RingBenchArgs {
    /// Payload bytes to move through the pool.
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
    pub total_bytes: u64,
    /// Payload bytes of each message.
    #[arg(long, default_value = "1KiB", value_parser = parse_bytes)]
    pub message_bytes: u64,
    /// Batch size (headers and payloads).
    #[arg(long, default_value = "2MiB", value_parser = parse_bytes)]
    pub batch_bytes: u64,
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub pool_bytes: u64,
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub segment_bytes: u64,
    #[arg(long, default_value_t = 1024)]
    pub ring_slots: u32,
    #[arg(long, default_value = "coherent")]
    pub coherence: CoherenceMode,
    /// The drainer holds this many taken batches and finishes them newest first, so the ring
    /// watermark is exercised with out-of-order completion.
    #[arg(long, default_value_t = 0)]
    pub hold: usize,
    /// Directory of the pool file.
    #[arg(long, default_value = "/dev/shm")]
    pub pool_dir: PathBuf,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Inject a fault in the lander (to check that the drainer catches it).
    #[arg(long, hide = true)]
    pub fault: Option<Fault>,
}

/// This binary, which the benches run as their cluster and worker processes.
fn embar() -> CliResult<PathBuf> {
    std::env::current_exe().map_err(|e| format!("cannot find the embar binary: {e}").into())
}

/// `Ok(false)`: the bench ran and printed its report, and a check in it failed.
pub fn bench(a: &BenchArgs) -> CliResult<bool> {
    let t = &a.transport;
    if t.verbs() && !cfg!(feature = "verbs") {
        return Err(crate::NO_VERBS.into());
    }
    let transport = if t.verbs() {
        pipeline::Transport::Verbs {
            device: t.rdma.rdma_device(),
            gid_index: t.rdma.gid_index(),
            ip: a
                .verbs_ip
                .or_else(|| std::env::var("RDMA_IP").ok()?.parse().ok()),
        }
    } else if t.transport == "tcp" {
        pipeline::Transport::Tcp
    } else if t.transport == "dpdk" {
        pipeline::Transport::Dpdk {
            frame_bytes: t.dpdk_frame_bytes.unwrap_or(1514),
        }
    } else {
        pipeline::Transport::Shm
    };
    let cfg = pipeline::Config {
        embar: embar()?,
        control: a.control,
        brokers: a.brokers,
        publishers: a.publishers,
        subscribers: a.subscribers,
        total_bytes: a.total_bytes,
        message_bytes: a.message_bytes,
        batch_bytes: a.batch_bytes,
        order: a.order,
        ack: a.ack,
        rf: a.rf,
        sync_bytes: a.sync_bytes,
        sync_interval_ms: a.sync_interval_ms,
        data_dir: a.data_dir.clone(),
        compare_order: a.compare_order,
        rate: a.rate,
        pool_bytes: a.pool_bytes,
        segment_bytes: a.segment_bytes,
        json: matches!(a.json, Some(None)),
        json_file: a.json.clone().flatten(),
        runs: a.runs,
        plot_dir: a.plot.clone(),
        hdr_log: a.hdr_log.clone(),
        transport,
        warmup_bytes: a.warmup,
    };
    Ok(pipeline::run(&cfg)?)
}

/// `Ok(false)`: the bench ran and printed its report, and a check in it failed.
pub fn ring_bench(a: &RingBenchArgs) -> CliResult<bool> {
    let cfg = ring::Config {
        embar: embar()?,
        total_bytes: a.total_bytes,
        message_bytes: a.message_bytes,
        batch_bytes: a.batch_bytes,
        pool_bytes: a.pool_bytes,
        segment_bytes: a.segment_bytes,
        ring_slots: a.ring_slots,
        coherence: a.coherence,
        hold: a.hold,
        pool_dir: a.pool_dir.clone(),
        json: a.json,
        fault: a.fault,
    };
    Ok(ring::run(&cfg)?)
}
