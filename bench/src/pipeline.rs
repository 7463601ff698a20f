//! `embar bench`, the main job: a local cluster (control process, brokers, sequencer as
//! separate processes) unless pointed at one, publishers and subscribers in this process on
//! the shm transport, every message checked (total order, per-client order, payload), and
//! throughput, publish-to-ack latency (HDR histogram) and the same run's memcpy bandwidth.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use embar_control::topics::TopicSpec;
use embar_control::ControlClient;
use embar_dataplane::checker::{Delivered, OrderChecker};
use embar_dataplane::client::publisher::{Publisher, PublisherConfig};
use embar_dataplane::client::subscriber::{StartAt, Subscriber};
use embar_dataplane::client::{new_client_id, Publish};
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, Pool};
use embar_sys::clock::monotonic_ns;
use hdrhistogram::Histogram;

use crate::baseline::Stalls;
use crate::cluster::LocalCluster;
use crate::ringload::payload_sum as word_sum;
use crate::{BenchError, BenchResult};

/// What to run (`embar bench`'s flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// The `embar` binary, which starts the local cluster.
    pub embar: PathBuf,
    /// Use this running cluster instead of starting one.
    pub control: Option<SocketAddr>,
    /// Brokers of the cluster the bench starts.
    pub brokers: u32,
    pub publishers: u32,
    pub subscribers: u32,
    /// Payload bytes to publish in all.
    pub total_bytes: u64,
    pub message_bytes: u64,
    pub batch_bytes: u64,
    pub order: u8,
    pub ack: u8,
    /// Replication factor of the bench's topics (0: no disk logs written). With ACK 2 (which
    /// needs at least 1) each repetition also runs ACK 1 on the same topic shape.
    pub rf: u8,
    /// The brokers' sync policy (`None`: their defaults), which the disk ceiling uses too.
    pub sync_bytes: Option<u64>,
    pub sync_interval_ms: Option<u64>,
    /// Where a started cluster lives (`DIR/embar-bench-PID`, its brokers' disk logs in it)
    /// and the disk ceiling is measured (`None`: the temporary directory).
    pub data_dir: Option<PathBuf>,
    /// Also run this ORDER in the same run and report the ratio.
    pub compare_order: Option<u8>,
    /// Open loop: messages per second per publisher, paced by a schedule; latency counts
    /// from the scheduled time, so a stall is not hidden (no coordinated omission).
    pub rate: Option<u64>,
    /// Pool of the cluster the bench starts.
    pub pool_bytes: u64,
    pub segment_bytes: u64,
    /// One JSON object on stdout instead of the summary.
    pub json: bool,
    /// Also write the JSON (every run and the summary) to this file.
    pub json_file: Option<PathBuf>,
    /// Repetitions of the whole run (memcpy baseline included); figures are reported as
    /// min, median and max over them.
    pub runs: u32,
    /// Write SVG plots into this directory.
    pub plot_dir: Option<PathBuf>,
    /// Write the latency histograms as an HdrHistogram interval log.
    pub hdr_log: Option<PathBuf>,
    pub transport: Transport,
    /// Publish this many bytes, unmeasured, before the measured runs (`None`: one pass over
    /// the pool's log space; `Some(0)`: none). See [`warm_up`].
    pub warmup_bytes: Option<u64>,
}

/// How the publishers reach their brokers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Stores into the pool (publishers on the pool host).
    Shm,
    /// RDMA writes into broker-registered grants (a build with the `verbs` feature);
    /// subscribers read the total order from a broker over verbs too (remote subscribers).
    Verbs {
        device: Option<String>,
        gid_index: u8,
        /// The IP the brokers of a started cluster listen on (the RDMA netdev's).
        ip: Option<IpAddr>,
    },
    /// Batches over TCP to the brokers; subscribers read the total order from a broker over
    /// TCP too (remote subscribers).
    Tcp,
    /// Batches as Ethernet frames over memif links to the brokers' DPDK poll loops (a build
    /// with the `dpdk` feature); subscribers on the pool host.
    Dpdk { frame_bytes: u32 },
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Verbs { .. } => "verbs",
            Transport::Tcp => "tcp",
            Transport::Dpdk { .. } => "dpdk",
        }
    }
}

/// A transport's ceiling on this host, measured beside its runs: what one loopback TCP stream,
/// or a raw memif link, carries.
#[derive(Clone, Copy, Debug)]
pub struct Ceiling {
    /// Key stem in the JSON (`{key}_gbps`, `ratio_to_{key}`).
    pub key: &'static str,
    /// What it is, in the text report.
    pub what: &'static str,
    pub gbps: f64,
}

/// Payloads: a random template whose first 8 bytes are replaced by the message's identity
/// (publisher, index) and the next 8 by its publish time (CLOCK_MONOTONIC nanoseconds, shared
/// by the processes of one host), when the message has room. A subscriber checks the
/// identity, that the publish time lies within the run, and a sum over every other byte, a
/// full read of the payload at memory speed.
struct Payloads {
    template: Vec<u8>,
    tail_sum: u64,
}

/// Bytes of a payload's identity, then of its publish time.
const ID_BYTES: usize = 8;
const STAMP_BYTES: usize = 8;

/// What a subscriber reads back from a payload whose every byte is as published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    publisher: u64,
    index: u64,
    /// `None` for a message shorter than its identity and publish time.
    published_ns: Option<u64>,
}

impl Payloads {
    fn new(bytes: usize) -> Payloads {
        let template = crate::noise_bytes(0x5eed, bytes);
        let tail_sum = word_sum(&template[Self::header(bytes)..]);
        Payloads { template, tail_sum }
    }

    /// Bytes at the start of a payload of `len` bytes that differ from the template.
    fn header(len: usize) -> usize {
        if len >= ID_BYTES + STAMP_BYTES {
            ID_BYTES + STAMP_BYTES
        } else {
            len.min(ID_BYTES)
        }
    }

    fn stamp(buf: &mut [u8], p: u64, i: u64, published_ns: u64) {
        let k = buf.len().min(ID_BYTES);
        buf[..k].copy_from_slice(&(p << 40 | i).to_le_bytes()[..k]);
        if buf.len() >= ID_BYTES + STAMP_BYTES {
            buf[ID_BYTES..ID_BYTES + STAMP_BYTES].copy_from_slice(&published_ns.to_le_bytes());
        }
    }

    /// The identity and publish time of a payload whose every other byte is as published.
    fn check(&self, buf: &[u8]) -> Option<Stamp> {
        let h = Self::header(buf.len());
        if buf.len() != self.template.len() || word_sum(&buf[h..]) != self.tail_sum {
            return None;
        }
        let k = buf.len().min(ID_BYTES);
        let mut idb = [0u8; 8];
        idb[..k].copy_from_slice(&buf[..k]);
        let id = u64::from_le_bytes(idb);
        let published_ns = buf
            .get(ID_BYTES..ID_BYTES + STAMP_BYTES)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        Some(Stamp {
            publisher: id >> 40,
            index: id & ((1 << 40) - 1),
            published_ns,
        })
    }
}

/// One run of a topic shape (ORDER, ACK): what it moved, its latencies, and its checks.
pub(crate) struct Run {
    pub order: u8,
    pub ack: u8,
    pub messages: u64,
    pub bytes: u64,
    /// From the first publish to the last ack.
    pub elapsed_s: f64,
    /// From the first publish to the last subscriber's last hand-off.
    pub deliver_elapsed_s: f64,
    /// Publish-to-ack, per batch (from its first message's publish call to the ack).
    pub latency: Histogram<u64>,
    /// Publish-to-deliver, per (sampled) message (from the publish call, or the scheduled time in open
    /// loop, to the subscriber's hand-off), over every subscriber.
    pub deliver: Histogram<u64>,
    pub errors: Vec<String>,
    pub grant_waits: u64,
    /// When its first message was published (CLOCK_MONOTONIC ns).
    pub first_ns: u64,
    /// Delivered throughput (per subscriber) over the run.
    pub timeline: Vec<TimelinePoint>,
}

/// How often the throughput over time is sampled.
const TIMELINE_STEP_NS: u64 = 100_000_000;

/// Throughput delivered to each subscriber in the interval that ends `end_s` after the
/// subscribers were opened.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct TimelinePoint {
    pub end_s: f64,
    pub gbps: f64,
}

/// The progress line on stderr of a run longer than [`Progress::QUIET_NS`]: one line
/// rewritten in place on a terminal, a line every few seconds otherwise (stdout, where the
/// JSON goes, is never written).
struct Progress {
    label: String,
    terminal: bool,
    shown_ns: Option<u64>,
}

impl Progress {
    const QUIET_NS: u64 = 2_000_000_000;

    fn new(label: &str) -> Progress {
        use std::io::IsTerminal;
        Progress {
            label: label.to_string(),
            terminal: std::io::stderr().is_terminal(),
            shown_ns: None,
        }
    }

    fn show(&mut self, el_ns: u64, delivered: u64, total: u64, bytes: f64) {
        let every_ns = if self.terminal { 0 } else { Self::QUIET_NS };
        if el_ns < Self::QUIET_NS || self.shown_ns.is_some_and(|t| el_ns - t < every_ns) {
            return;
        }
        self.shown_ns = Some(el_ns);
        let line = format!(
            "bench {}: {delivered}/{total} delivered to each subscriber, {:.1} s, {:.2} GB/s so far",
            self.label,
            el_ns as f64 / 1e9,
            bytes / (el_ns as f64 / 1e9) / 1e9
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.terminal && self.shown_ns.is_some() {
            eprintln!();
        }
    }
}

/// One repetition of `--runs`: the same run's memcpy and host stalls, and each ORDER's kept
/// run (the configured ORDER first).
pub(crate) struct Repetition {
    pub memcpy_gbps: f64,
    /// The transport's ceiling (TCP, DPDK), measured beside the runs.
    pub ceiling: Option<Ceiling>,
    /// This disk's ceiling for the disk logs, GB/s, with replicas (`--rf`).
    pub disk_gbps: Option<f64>,
    pub stalls: Stalls,
    pub runs: Vec<Run>,
}

/// Runs the bench and prints its report; `Ok(false)`: a check in it failed.
pub fn run(a: &Config) -> BenchResult<bool> {
    if a.message_bytes == 0 || a.total_bytes < a.message_bytes || a.publishers == 0 {
        return Err(BenchError::Usage("--message-bytes, --publishers must be at least 1 and --total-bytes at least one message".into()));
    }
    if a.runs == 0 || a.runs > RUNS_MAX {
        return Err(BenchError::Usage(format!("--runs must be 1 to {RUNS_MAX}")));
    }
    check_durability(a)?;
    if matches!(a.transport, Transport::Dpdk { .. }) && !cfg!(feature = "dpdk") {
        return Err(BenchError::Usage(
            "the DPDK transport needs a build with `--features dpdk`".into(),
        ));
    }
    if matches!(a.transport, Transport::Verbs { .. }) && !cfg!(feature = "verbs") {
        return Err(BenchError::Usage(
            "the verbs transport needs embar-bench's `verbs` feature".into(),
        ));
    }
    let began = Began {
        wall: std::time::SystemTime::now(),
        mono_ns: monotonic_ns(),
    };
    let started = match a.control {
        Some(_) => None,
        None => {
            let verbs = match &a.transport {
                Transport::Shm | Transport::Tcp | Transport::Dpdk { .. } => None,
                Transport::Verbs { device, gid_index, ip } => Some((
                    ip.ok_or_else(|| BenchError::Usage("--transport verbs: give --verbs-ip (the RDMA netdev's address) or set RDMA_IP".into()))?,
                    device.clone(),
                    *gid_index,
                )),
            };
            let local = LocalCluster {
                embar: a.embar.clone(),
                dir: a
                    .data_dir
                    .clone()
                    .unwrap_or_else(std::env::temp_dir)
                    .join(format!("embar-bench-{}", std::process::id())),
                brokers: a.brokers,
                pool_bytes: a.pool_bytes,
                segment_bytes: a.segment_bytes,
                // An ACK 2 topic needs a live broker in every slot its replica sets range
                // over (docs/durability.md).
                max_brokers: if a.ack == 2 {
                    a.brokers
                } else {
                    a.brokers.max(2)
                },
                verbs,
                dpdk: match a.transport {
                    Transport::Dpdk { frame_bytes } => Some(frame_bytes),
                    _ => None,
                },
                sync_bytes: a.sync_bytes,
                sync_interval_ms: a.sync_interval_ms,
            };
            Some(local.start()?)
        }
    };
    let control = match (&started, a.control) {
        (Some(f), _) => f.control,
        (None, Some(c)) => c,
        (None, None) => unreachable!("a cluster is given or started"),
    };
    let cluster = crate::cluster::cluster_view(control)?;
    if started.is_some() && !a.json {
        eprintln!(
            "bench: started a local cluster: control {control}, {} brokers, pool {}",
            a.brokers,
            cluster.pool_path.display()
        );
    }
    let brokers = cluster.broker_slots()?;
    let pool = crate::cluster::open_pool(&cluster.pool_path)?;
    // The brokers' data directories (`DIR/broker-N`) of a started cluster: the disk ceiling
    // is measured on their filesystem, and each run's logs are removed after it.
    let logs = started.as_ref().map(|s| s.dir().to_path_buf());
    let disk_dir = logs
        .clone()
        .unwrap_or_else(|| a.data_dir.clone().unwrap_or_else(std::env::temp_dir));
    if a.rf > 0 && !a.json {
        eprintln!(
            "bench: the disk ceiling is measured in {}{}",
            disk_dir.display(),
            if logs.is_some() {
                " (beside the brokers' disk logs)"
            } else {
                " (give --data-dir on the brokers' log filesystem)"
            }
        );
    }
    warm_up(a, &pool, control, &brokers)?;
    let mut reps = Vec::new();
    for rep in 0..a.runs {
        // The baselines of each repetition, measured beside its runs (the cluster idle).
        let memcpy_gbps = crate::baseline::memcpy_gbps();
        let ceiling = match a.transport {
            Transport::Tcp => Some(Ceiling {
                key: "tcp_loopback",
                what: "one loopback TCP stream",
                gbps: crate::baseline::tcp_loopback_gbps(a.total_bytes.clamp(256 << 20, 2 << 30))
                    .map_err(|e| BenchError::Run(format!("the loopback TCP baseline: {e}")))?,
            }),
            #[cfg(feature = "dpdk")]
            Transport::Dpdk { frame_bytes } => Some(Ceiling {
                key: "memif_link",
                what: "the raw memif link",
                gbps: crate::baseline::memif_link_gbps(
                    frame_bytes,
                    a.total_bytes.clamp(256 << 20, 2 << 30),
                )
                .map_err(|e| BenchError::Run(format!("the memif link baseline: {e}")))?,
            }),
            _ => None,
        };
        let disk_gbps = if a.rf > 0 {
            Some(
                crate::baseline::disk_gbps(
                    &disk_dir,
                    a.batch_bytes as usize,
                    a.total_bytes
                        .clamp(DISK_CEILING_BYTES_MIN, DISK_CEILING_BYTES_MAX),
                    sync_policy(a),
                )
                .map_err(|e| {
                    BenchError::Run(format!("the disk ceiling in {}: {e}", disk_dir.display()))
                })?,
            )
        } else {
            None
        };
        let stalls = crate::baseline::host_stalls(Duration::from_secs(1));
        let runs = repetition(a, &pool, control, &brokers, logs.as_deref(), rep)?;
        reps.push(Repetition {
            memcpy_gbps,
            ceiling,
            disk_gbps,
            stalls,
            runs,
        });
    }
    crate::report::report(a, brokers.len(), &reps, &began)
}

/// Bytes the disk ceiling writes in each of its passes: the run's total, within these.
const DISK_CEILING_BYTES_MIN: u64 = 64 << 20;
const DISK_CEILING_BYTES_MAX: u64 = 1 << 30;

/// The brokers' sync policy: the one given to the cluster, else their defaults.
pub(crate) fn sync_policy(a: &Config) -> crate::baseline::SyncPolicy {
    let d = crate::baseline::SyncPolicy::default();
    crate::baseline::SyncPolicy {
        bytes: a.sync_bytes.unwrap_or(d.bytes),
        interval: a.sync_interval_ms.map_or(d.interval, Duration::from_millis),
    }
}

/// The durability flags that cannot make a run.
fn check_durability(a: &Config) -> BenchResult<()> {
    if a.ack == 2 && a.rf == 0 {
        return Err(BenchError::Usage(
            "--ack 2 needs --rf N with N at least 1: an ACK 2 ack waits until every replica's \
             disk log has synced the batch, and a topic without replicas has none (e.g. \
             `embar bench --ack 2 --rf 2 --brokers 3`)"
                .into(),
        ));
    }
    if a.ack > 2 {
        return Err(BenchError::Usage(format!(
            "--ack {}: ACK is 0, 1 or 2",
            a.ack
        )));
    }
    if a.control.is_none() && u32::from(a.rf) > a.brokers {
        return Err(BenchError::Usage(format!(
            "--rf {} needs at least as many brokers (--brokers {})",
            a.rf, a.brokers
        )));
    }
    if a.ack == 2 && a.compare_order.is_some() {
        return Err(BenchError::Usage(
            "--ack 2 compares with ACK 1 in the same run; run --compare-order separately".into(),
        ));
    }
    Ok(())
}

/// Publishes one pass over the pool's log space (at most what a run publishes; or `--warmup`
/// bytes), unmeasured, checked
/// like a run, before the measured runs: what benchmarks of messaging systems call a warm-up
/// (OpenMessaging Benchmark's warm-up phase). The figures are then those of a running
/// system, not of its first pass over the pool, on which every process maps each page it
/// touches for the first time (a minor fault per 4 KiB page on the broker's header walk and
/// the sequencer's stamping; a pool on huge pages has few), and of the sequencer picking up
/// its first topic.
fn warm_up(a: &Config, pool: &Pool, control: SocketAddr, brokers: &[u32]) -> BenchResult<()> {
    // By default one pass over the log space, but never more than the run itself publishes
    // (a light open-loop run of a few messages needs no gigabyte first).
    let bytes = a
        .warmup_bytes
        .unwrap_or_else(|| pool.geometry().segment_pool_bytes().min(a.total_bytes));
    if bytes < a.message_bytes {
        return Ok(());
    }
    let w = Config {
        total_bytes: bytes,
        rate: None,
        compare_order: None,
        ..a.clone()
    };
    let name = format!("bench-warmup-{}", std::process::id());
    let in_use = || pool.segments_in_use(embar_dataplane::pool::coherence::Coherent);
    let free_before = in_use();
    // The pool's pages and the sequencer are what it warms: no disk logs (ACK 2 needs them).
    let ack = a.ack.min(1);
    ControlClient::new(control).create_topic(&TopicSpec {
        name: name.clone(),
        order: a.order,
        ack,
        replication_factor: 0,
        batch_bytes: a.batch_bytes,
    })?;
    let w = Config { rf: 0, ack, ..w };
    let one = OneRun {
        pool,
        a: &w,
        topic: &name,
        brokers,
        order: a.order,
        ack,
        control,
        label: "warm-up",
    };
    let run = Pool::with_coherence(pool.coherence_mode(), one)?;
    let _ = ControlClient::new(control).delete_topic(&name);
    wait_segments_freed(in_use, free_before);
    match run.errors.first() {
        Some(e) => Err(BenchError::Run(format!("warm-up: {e}"))),
        None => Ok(()),
    }
}

/// Waits (up to 10 s) until a deleted topic's segments are free again: brokers free them
/// within their 100 ms topic check.
fn wait_segments_freed(in_use: impl Fn() -> u64, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_use() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// At most this many repetitions (`--runs`).
pub const RUNS_MAX: u32 = 1000;

/// When the bench began, on the wall clock (for the HDR log's base time) and on
/// CLOCK_MONOTONIC (what the runs measure with).
pub(crate) struct Began {
    pub wall: std::time::SystemTime,
    pub mono_ns: u64,
}

/// The runs of one repetition: the configured topic shape (ORDER, ACK), and the compared one
/// (`--compare-order`, or ACK 1 beside ACK 2), the configured first. `logs`: the brokers' data
/// directories of a started cluster, where each run's disk logs are removed after it.
fn repetition(
    a: &Config,
    pool: &Pool,
    control: SocketAddr,
    brokers: &[u32],
    logs: Option<&std::path::Path>,
    rep: u32,
) -> BenchResult<Vec<Run>> {
    // With a comparison, the two shapes alternate twice and each keeps its best run: a run's
    // position in the sequence moves its figure more than the ORDER does on this machine.
    let main = (a.order, a.ack);
    let other = match (a.compare_order, a.ack) {
        (Some(o), _) => Some((o, a.ack)),
        (None, 2) => Some((a.order, 1)),
        (None, _) => None,
    };
    let shapes: Vec<(u8, u8)> = match other {
        Some(other) => vec![main, other, other, main],
        None => vec![main],
    };
    let mut runs = Vec::new();
    for (order, ack) in shapes {
        let name = format!(
            "bench-o{order}-a{ack}-{}-{rep}-{}",
            std::process::id(),
            runs.len()
        );
        let spec = TopicSpec {
            name: name.clone(),
            order,
            ack,
            replication_factor: a.rf,
            batch_bytes: a.batch_bytes,
        };
        let in_use = || pool.segments_in_use(embar_dataplane::pool::coherence::Coherent);
        let free_before = in_use();
        ControlClient::new(control).create_topic(&spec)?;
        let shape = if a.ack == 2 {
            format!("ORDER {order} ACK {ack}")
        } else {
            format!("ORDER {order}")
        };
        let label = if a.runs > 1 {
            format!("run {}/{} {shape}", rep + 1, a.runs)
        } else {
            shape
        };
        let one = OneRun {
            pool,
            a,
            topic: &name,
            brokers,
            order,
            ack,
            control,
            label: &label,
        };
        runs.push(Pool::with_coherence(pool.coherence_mode(), one)?);
        // Each run starts with the pool's log space free and the disks idle. Waited for, not
        // assumed.
        let _ = ControlClient::new(control).delete_topic(&name);
        wait_segments_freed(in_use, free_before);
        if let (Some(dir), true) = (logs, a.rf > 0) {
            remove_topic_logs(dir, &name);
        }
    }
    let mut kept = Vec::new();
    for shape in [Some(main), other].into_iter().flatten() {
        let mut mine: Vec<Run> = Vec::new();
        let mut rest = Vec::new();
        for r in runs.drain(..) {
            if (r.order, r.ack) == shape {
                mine.push(r);
            } else {
                rest.push(r);
            }
        }
        runs = rest;
        let errors: Vec<String> = mine.iter().flat_map(|r| r.errors.clone()).collect();
        if let Some(mut top) = mine
            .into_iter()
            .max_by(|x, y| x.gbps().total_cmp(&y.gbps()))
        {
            top.errors = errors;
            kept.push(top);
        }
    }
    Ok(kept)
}

/// Removes a deleted topic's disk logs from every broker's data directory (`DIR/broker-N`)
/// of a started cluster: the next run writes to a disk that does not hold the last one's.
fn remove_topic_logs(cluster_dir: &std::path::Path, topic: &str) {
    let Ok(entries) = std::fs::read_dir(cluster_dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("broker-") && e.path().is_dir() {
            let dir = embar_dataplane::replication::log::topic_dir(&e.path(), topic);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until every broker's replicator of topic `slot` has read and synced the run's
/// `total` messages (its `durable_total_order`), so that the next run, or the next
/// repetition's disk ceiling, does not share the disk with this run's tail. Gives up when no
/// broker's progress moved for [`DURABLE_STALL`] (a broker without a data directory of a
/// cluster given by `--control` never reports any).
fn wait_replicas_synced<C: Coherence>(pool: &Pool, c: C, slot: u32, brokers: &[u32], total: u64) {
    let progress = || -> Vec<u64> {
        brokers
            .iter()
            .map(|&b| {
                c.observe(
                    &pool.tinode(slot).brokers[b as usize]
                        .replication
                        .durable_total_order,
                )
            })
            .collect()
    };
    let mut last = progress();
    let mut moved = Instant::now();
    while last.iter().any(|&t| t < total) && moved.elapsed() < DURABLE_STALL {
        std::thread::sleep(Duration::from_millis(5));
        let now = progress();
        if now != last {
            last = now;
            moved = Instant::now();
        }
    }
}

/// How long [`wait_replicas_synced`] waits for progress that does not move.
const DURABLE_STALL: Duration = Duration::from_secs(2);

/// One run of a topic shape on a topic made for it.
struct OneRun<'a> {
    pool: &'a Pool,
    a: &'a Config,
    topic: &'a str,
    brokers: &'a [u32],
    order: u8,
    ack: u8,
    control: SocketAddr,
    /// What the progress line calls it.
    label: &'a str,
}

impl CoherenceFn<BenchResult<Run>> for OneRun<'_> {
    fn call<C: Coherence>(self, c: C) -> BenchResult<Run> {
        one_run(c, self)
    }
}

fn one_run<C: Coherence>(c: C, r: OneRun<'_>) -> BenchResult<Run> {
    let OneRun {
        pool,
        a,
        topic,
        brokers,
        order,
        ack,
        control,
        label,
    } = r;
    let per_pub = (a.total_bytes / a.message_bytes).div_ceil(u64::from(a.publishers));
    let total = per_pub * u64::from(a.publishers);
    let acked = AtomicU64::new(0);
    let delivered = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let fifo = matches!(order, 4 | 5);
    let sample = deliver_sample(a);
    let payloads = Payloads::new(a.message_bytes as usize);
    let payloads = &payloads;
    // The sequencer picks a new topic up within its topic scan; measuring before that would
    // count the scan in the first batches' latency.
    let slot = pool.find_topic(c, topic)?;
    let waiting = Instant::now();
    while c.observe(&pool.sequencer_state(slot).epoch) == 0 {
        if waiting.elapsed() > Duration::from_secs(10) {
            return Err(BenchError::Run(format!("no sequencer took topic {topic:?} within 10 s (is a broker live that may run it? see `embar cluster status`)")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let subs: Vec<BenchSub<'_, C>> = (0..a.subscribers)
        .map(|_| BenchSub::open(pool, c, control, topic, &a.transport))
        .collect::<Result<_, _>>()?;
    let start_ns = monotonic_ns();
    let result = std::thread::scope(|s| {
        let sub_handles: Vec<_> = subs
            .into_iter()
            .map(|mut sub| {
                let (delivered, failed) = (&delivered, &failed);
                s.spawn(move || -> BenchResult<Handed> {
                    let mut deliver = latency_histogram()?;
                    let mut checker = OrderChecker::new(fifo);
                    // The next message index expected of each publisher (FIFO check).
                    let mut next = vec![0u64; a.publishers as usize];
                    let mut digest = 0xcbf2_9ce4_8422_2325u64;
                    let mut err = None;
                    let mut last = Instant::now();
                    while checker.delivered() < total
                        && err.is_none()
                        && !failed.load(Ordering::Relaxed)
                    {
                        let n = sub.poll(64, |m| {
                            if err.is_some() {
                                return;
                            }
                            if let Err(v) = checker.push(&Delivered::from(m)) {
                                err = Some(v.to_string());
                                return;
                            }
                            match payloads.check(m.payload) {
                                Some(Stamp {
                                    publisher: p,
                                    index: i,
                                    published_ns,
                                }) => {
                                    if let Some(t) = published_ns {
                                        // The hand-off: this message is the application's now.
                                        let now = if i & (sample - 1) == 0 {
                                            monotonic_ns()
                                        } else {
                                            u64::MAX
                                        };
                                        if t < start_ns || t > now {
                                            err = Some(format!(
                                                "message {}: publish time {t} ns outside the run ({start_ns}..{now} ns)",
                                                m.total_order
                                            ));
                                            return;
                                        }
                                        if now != u64::MAX {
                                            let _ = deliver.record((now - t).max(1));
                                        }
                                    }
                                    if fifo {
                                        let Some(want) = next.get_mut(p as usize) else {
                                            err = Some(format!("a message of publisher {p}, which this run does not have"));
                                            return;
                                        };
                                        if i != *want {
                                            err = Some(format!(
                                                "publisher {p}: message {i} where {want} was next"
                                            ));
                                        }
                                        *want += 1;
                                    }
                                }
                                None => {
                                    err = Some(format!(
                                        "message {}: payload checksum mismatch",
                                        m.total_order
                                    ))
                                }
                            }
                            digest = (digest
                                ^ m.total_order
                                ^ m.client_id.rotate_left(17)
                                ^ u64::from(m.index))
                            .wrapping_mul(0x100_0000_01b3);
                        })?;
                        if n > 0 {
                            delivered.fetch_add(n as u64, Ordering::Relaxed);
                            last = Instant::now();
                        } else {
                            if last.elapsed() > Duration::from_secs(60) {
                                err = Some(format!(
                                    "no message for 60 s after {}",
                                    checker.delivered()
                                ));
                            }
                            if last.elapsed() > Duration::from_micros(200) {
                                sub.wait(Duration::from_millis(5));
                            } else {
                                std::thread::yield_now();
                            }
                        }
                    }
                    if let Some(e) = err {
                        failed.store(true, Ordering::Relaxed);
                        return Err(BenchError::Run(e));
                    }
                    checker
                        .finish(Some(total))
                        .map_err(|v| BenchError::Run(v.to_string()))?;
                    Ok(Handed {
                        digest,
                        deliver,
                        last_ns: monotonic_ns(),
                    })
                })
            })
            .collect();
        let pub_handles: Vec<_> = (0..a.publishers)
            .map(|p| {
                let (acked, failed) = (&acked, &failed);
                s.spawn(move || -> BenchResult<Driven> {
                    let cfg = PublisherConfig {
                        linger: if a.rate.is_some() {
                            Duration::ZERO
                        } else {
                            Duration::from_millis(1)
                        },
                        ..PublisherConfig::default()
                    };
                    let load = Load {
                        a,
                        sample,
                        payloads,
                        per_pub,
                        p: p.into(),
                        acked,
                        failed,
                    };
                    let r = match a.transport {
                        Transport::Shm => {
                            Publisher::open(pool, c, topic, brokers, new_client_id(), cfg)
                                .map_err(BenchError::from)
                                .and_then(|mut publ| load.drive(&mut publ))
                        }
                        Transport::Tcp => drive_tcp(&load, control, topic, cfg),
                        Transport::Dpdk { frame_bytes } => {
                            drive_dpdk(&load, control, topic, cfg, frame_bytes)
                        }
                        Transport::Verbs { .. } => drive_verbs(&load, control, topic, cfg),
                    };
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let mut progress = Progress::new(label);
        let bytes_per_sub = a.message_bytes as f64;
        let subs_n = u64::from(a.subscribers.max(1));
        let mut timeline = Vec::new();
        let mut sample = (start_ns, 0u64);
        loop {
            let done = pub_handles.iter().all(|h| h.is_finished())
                && sub_handles.iter().all(|h| h.is_finished());
            let now = monotonic_ns();
            if done || now - sample.0 >= TIMELINE_STEP_NS {
                let d = delivered.load(Ordering::Relaxed) / subs_n;
                let dt_s = (now - sample.0).max(1) as f64 / 1e9;
                timeline.push(TimelinePoint {
                    end_s: (now - start_ns) as f64 / 1e9,
                    gbps: (d - sample.1) as f64 * bytes_per_sub / dt_s / 1e9,
                });
                sample = (now, d);
                progress.show(now - start_ns, d, total, d as f64 * bytes_per_sub);
            }
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        progress.finish();
        let mut latency = latency_histogram()?;
        let mut deliver = latency_histogram()?;
        let mut errors = Vec::new();
        let mut end_ns = start_ns;
        // From the first message published (not from the sessions' set-up, which
        // ib_write_bw and the like do not count either).
        let mut first_ns = u64::MAX;
        let mut grant_waits = 0;
        for h in pub_handles {
            match h
                .join()
                .map_err(|_| BenchError::Run("a publisher panicked".into()))?
            {
                Ok(d) => {
                    let _ = latency.add(&d.latency);
                    end_ns = end_ns.max(d.end_ns);
                    first_ns = first_ns.min(d.start_ns);
                    grant_waits += d.grant_waits;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let first_ns = if first_ns == u64::MAX {
            start_ns
        } else {
            first_ns
        };
        let mut digests = Vec::new();
        let mut deliver_end_ns = first_ns;
        for h in sub_handles {
            match h
                .join()
                .map_err(|_| BenchError::Run("a subscriber panicked".into()))?
            {
                Ok(h) => {
                    digests.push(h.digest);
                    let _ = deliver.add(&h.deliver);
                    deliver_end_ns = deliver_end_ns.max(h.last_ns);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if digests.windows(2).any(|w| w[0] != w[1]) {
            errors.push("subscribers saw different sequences".into());
        }
        Ok::<Run, BenchError>(Run {
            order,
            ack,
            messages: total,
            bytes: total * a.message_bytes,
            elapsed_s: end_ns.saturating_sub(first_ns).max(1) as f64 / 1e9,
            deliver_elapsed_s: deliver_end_ns.saturating_sub(first_ns).max(1) as f64 / 1e9,
            latency,
            deliver,
            errors,
            grant_waits,
            first_ns,
            timeline,
        })
    })?;
    if a.rf > 0 {
        wait_replicas_synced(pool, c, slot, brokers, total);
    }
    Ok(result)
}

/// What one subscriber's share of a run saw.
struct Handed {
    /// Over the sequence it was handed (every subscriber's must be the same).
    digest: u64,
    /// Publish-to-deliver latencies.
    deliver: Histogram<u64>,
    /// When it had been handed its last message.
    last_ns: u64,
}

/// What one publisher's share of a run measured.
struct Driven {
    latency: Histogram<u64>,
    /// When its first message was published, and when its last ack came.
    start_ns: u64,
    end_ns: u64,
    grant_waits: u64,
}

/// One publisher's share of a run, whatever its transport.
struct Load<'a> {
    a: &'a Config,
    /// Publish-to-deliver is measured on messages whose index is a multiple of this.
    sample: u64,
    payloads: &'a Payloads,
    per_pub: u64,
    p: u64,
    acked: &'a AtomicU64,
    failed: &'a AtomicBool,
}

impl Load<'_> {
    /// Publishes this publisher's messages (paced when open loop), waits for every ack.
    fn drive<P: Publish>(&self, publ: &mut P) -> BenchResult<Driven> {
        let mut hist = latency_histogram()?;
        let mut lat = Vec::with_capacity(1024);
        let mut buf = self.payloads.template.clone();
        let interval_ns = self.a.rate.map(|r| 1_000_000_000 / r.max(1));
        let t0 = monotonic_ns();
        // The publish time the subscribers count from: the scheduled time in open loop (a
        // late publisher does not hide its lateness), else the publish call, read for the
        // sampled messages (the others carry the last time read, earlier than theirs).
        let mut published_ns = t0;
        for i in 0..self.per_pub {
            if let Some(iv) = interval_ns {
                // Sleep through most of the gap (this host may have fewer cores
                // than polling threads), spin the last part; wake as often as the
                // publisher needs to look at acks for their times to hold.
                let due = t0 + i * iv;
                let step = publ
                    .ack_poll_interval()
                    .map_or(u64::MAX, |d| d.as_nanos() as u64);
                loop {
                    publ.take_ack_latencies(&mut lat);
                    let now = monotonic_ns();
                    if now >= due {
                        break;
                    }
                    if due - now > 150_000 {
                        std::thread::sleep(Duration::from_nanos((due - now - 100_000).min(step)));
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            if let Some(iv) = interval_ns {
                published_ns = t0 + i * iv;
            } else if i & (self.sample - 1) == 0 {
                published_ns = monotonic_ns();
            }
            Payloads::stamp(&mut buf, self.p, i, published_ns);
            publ.publish(&buf)?;
            if interval_ns.is_some() {
                publ.flush()?;
            }
            if i % 256 == 0 {
                // Looked at every 256 messages, not each one.
                if self.failed.load(Ordering::Relaxed) {
                    return Err(BenchError::Run("stopped: another thread failed".into()));
                }
                publ.take_ack_latencies(&mut lat);
                for l in lat.drain(..) {
                    let _ = hist.record(l.max(1));
                }
                self.acked.store(publ.acked()?, Ordering::Relaxed);
            }
        }
        publ.flush()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n = publ.acked()?;
            publ.take_ack_latencies(&mut lat);
            if n >= publ.sealed_messages() {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Run(format!(
                    "acks: {n} of {} after 120 s",
                    publ.sealed_messages()
                )));
            }
            std::thread::yield_now();
        }
        let end = monotonic_ns();
        for l in lat.drain(..) {
            let _ = hist.record(l.max(1));
        }
        Ok(Driven {
            latency: hist,
            start_ns: t0,
            end_ns: end,
            grant_waits: publ.grant_waits(),
        })
    }
}

/// A bench subscriber: on the pool host, or (with the TCP or verbs transport) a remote one
/// reading the total order from a broker over that transport.
enum BenchSub<'p, C: Coherence> {
    Pool(Subscriber<'p, C>),
    Tcp(embar_dataplane::tcp::subscriber::TcpSubscriber),
    #[cfg(feature = "verbs")]
    Verbs(Box<embar_dataplane::verbs::subscriber::VerbsSubscriber>),
}

impl<'p, C: Coherence> BenchSub<'p, C> {
    fn open(
        pool: &'p Pool,
        c: C,
        control: SocketAddr,
        topic: &str,
        transport: &Transport,
    ) -> BenchResult<Self> {
        #[cfg(feature = "verbs")]
        if let Transport::Verbs {
            device, gid_index, ..
        } = transport
        {
            use embar_dataplane::verbs::subscriber::{VerbsSubscriber, VerbsSubscriberConfig};
            let brokers: Vec<SocketAddr> = crate::cluster::cluster_view(control)?
                .verbs_brokers()?
                .into_iter()
                .map(|(_, a)| a)
                .collect();
            let cfg = VerbsSubscriberConfig {
                device: device.clone(),
                gid_index: *gid_index,
                ..Default::default()
            };
            let s = VerbsSubscriber::connect(
                &brokers,
                topic,
                StartAt::Oldest,
                Duration::from_secs(10),
                &cfg,
            )
            .map_err(|e| BenchError::Run(format!("verbs subscriber: {e}")))?;
            return Ok(BenchSub::Verbs(Box::new(s)));
        }
        if *transport != Transport::Tcp {
            return Ok(BenchSub::Pool(Subscriber::open(
                pool,
                c,
                topic,
                StartAt::Oldest,
            )?));
        }
        let brokers: Vec<SocketAddr> = crate::cluster::cluster_view(control)?
            .tcp_brokers()?
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        let s = embar_dataplane::tcp::subscriber::TcpSubscriber::connect(
            &brokers,
            topic,
            StartAt::Oldest,
            Duration::from_secs(10),
        )
        .map_err(|e| BenchError::Run(format!("TCP subscriber: {e}")))?;
        Ok(BenchSub::Tcp(s))
    }

    /// Waits up to `timeout` for more: parked on the topic's doorbell on the pool host (the
    /// sequencer rings it), in a read of the socket over TCP.
    fn wait(&mut self, timeout: Duration) {
        match self {
            BenchSub::Pool(s) => s.wait_ordered(timeout),
            BenchSub::Tcp(s) => s.wait(timeout),
            #[cfg(feature = "verbs")]
            BenchSub::Verbs(s) => s.wait(timeout),
        }
    }

    /// Hands every message that is here (up to about `max_batches` batches) to `f`.
    fn poll(
        &mut self,
        max_batches: usize,
        f: impl FnMut(&embar_dataplane::client::subscriber::Message<'_>),
    ) -> BenchResult<usize> {
        match self {
            BenchSub::Pool(s) => Ok(s.poll(max_batches, f)?),
            BenchSub::Tcp(s) => s
                .poll(max_batches * 2048, f)
                .map_err(|e| BenchError::Run(format!("TCP subscriber: {e}"))),
            #[cfg(feature = "verbs")]
            BenchSub::Verbs(s) => s
                .poll(max_batches * 2048, f)
                .map_err(|e| BenchError::Run(format!("verbs subscriber: {e}"))),
        }
    }
}

/// Drives one publisher over the TCP transport.
fn drive_tcp(
    load: &Load<'_>,
    control: SocketAddr,
    topic: &str,
    cfg: PublisherConfig,
) -> BenchResult<Driven> {
    use embar_dataplane::tcp::publisher::{TcpPublisher, TcpPublisherConfig};
    let brokers = crate::cluster::cluster_view(control)?.tcp_brokers()?;
    let tc = TcpPublisherConfig {
        publisher: cfg,
        ..Default::default()
    };
    let mut publ = TcpPublisher::connect(&brokers, topic, new_client_id(), &tc)?;
    load.drive(&mut publ)
}

/// Drives one publisher over the DPDK transport (memif links; a build with the feature).
fn drive_dpdk(
    load: &Load<'_>,
    control: SocketAddr,
    topic: &str,
    cfg: PublisherConfig,
    frame_bytes: u32,
) -> BenchResult<Driven> {
    #[cfg(feature = "dpdk")]
    {
        use embar_dataplane::dpdk::publisher::DpdkLinkConfig;
        use embar_dataplane::tcp::publisher::{TcpPublisher, TcpPublisherConfig};
        let brokers = crate::cluster::cluster_view(control)?.tcp_brokers()?;
        let tc = TcpPublisherConfig {
            publisher: cfg,
            ..Default::default()
        };
        let link = DpdkLinkConfig {
            frame_bytes,
            ..DpdkLinkConfig::memif()
        };
        let mut publ = TcpPublisher::connect_dpdk(&brokers, topic, new_client_id(), &tc, &link)?;
        load.drive(&mut publ)
    }
    #[cfg(not(feature = "dpdk"))]
    {
        let _ = (load, control, topic, cfg, frame_bytes);
        Err(BenchError::Usage(
            "the DPDK transport needs a build with `--features dpdk`".into(),
        ))
    }
}

/// One publisher's share over the verbs transport (a build with the feature).
fn drive_verbs(
    load: &Load<'_>,
    control: SocketAddr,
    topic: &str,
    cfg: PublisherConfig,
) -> BenchResult<Driven> {
    #[cfg(feature = "verbs")]
    {
        use embar_dataplane::verbs::publisher::{VerbsConfig, VerbsPublisher};
        let Transport::Verbs {
            device, gid_index, ..
        } = &load.a.transport
        else {
            return Err(BenchError::Usage("not the verbs transport".into()));
        };
        let brokers = crate::cluster::cluster_view(control)?.verbs_brokers()?;
        let vc = VerbsConfig {
            device: device.clone(),
            gid_index: *gid_index,
            publisher: cfg,
        };
        let mut publ = VerbsPublisher::connect(&brokers, topic, new_client_id(), &vc)?;
        load.drive(&mut publ)
    }
    #[cfg(not(feature = "verbs"))]
    {
        let _ = (load, control, topic, cfg);
        Err(BenchError::Usage(
            "the verbs transport needs embar-bench's `verbs` feature".into(),
        ))
    }
}

impl Run {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed_s / 1e9
    }
}

/// Publish-to-deliver is measured on every message of an open-loop run, and on one message
/// in this many of each publisher at full speed: two clock reads a message (publisher and
/// subscriber, 25-40 ns each here) would take a tenth or more of the subscriber's time at
/// several million 1 KiB messages a second, and move the throughput figure it sits beside.
pub const DELIVER_SAMPLE_CLOSED_LOOP: u64 = 16;

/// A power of two, so that picking the sampled messages is a mask, not a division.
const _: () = assert!(DELIVER_SAMPLE_CLOSED_LOOP.is_power_of_two());

pub(crate) fn deliver_sample(a: &Config) -> u64 {
    if a.rate.is_some() {
        1
    } else {
        DELIVER_SAMPLE_CLOSED_LOOP
    }
}

/// A histogram of latencies in nanoseconds, 1 ns to a minute, 3 significant digits.
pub(crate) fn latency_histogram() -> BenchResult<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_carries_its_identity_and_publish_time_and_any_other_changed_byte_is_caught() {
        for len in [1usize, 7, 8, 15, 16, 17, 64, 1024] {
            let p = Payloads::new(len);
            let mut buf = p.template.clone();
            Payloads::stamp(&mut buf, 3, 41, 123_456_789);
            let s = p.check(&buf).expect("an intact payload passes");
            let id_bytes = len.min(ID_BYTES);
            let id = (3u64 << 40 | 41) & (u64::MAX >> (64 - 8 * id_bytes as u32));
            assert_eq!(s.publisher << 40 | s.index, id, "len {len}");
            let want_stamp = (len >= 16).then_some(123_456_789);
            assert_eq!(s.published_ns, want_stamp, "len {len}");
            if len > Payloads::header(len) {
                let mut bad = buf.clone();
                bad[len - 1] ^= 0x40;
                assert_eq!(p.check(&bad), None, "len {len}");
            }
        }
    }
}
