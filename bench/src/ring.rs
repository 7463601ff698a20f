//! `embar ring-bench`: the pool data path alone (segments and one batch ring), between two
//! real processes, without brokers, sequencer or control process.
//!
//! A lander process writes batches of messages into log segments of a fresh pool and
//! publishes them into a broker's batch ring; a drainer process takes them, checks every
//! message (order, headers, payload), and finishes the slots, so segments are reused. The
//! figure is payload bytes over the time from the lander's start to the drainer's last batch,
//! set against single-thread memcpy bandwidth measured in the same run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use embar_dataplane::pool::coherence::{CoherenceMode, Coherent};
use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::topics::TopicConfig;
use embar_dataplane::pool::{CreateOptions, Pool};
use embar_dataplane::units::format_bytes;
use serde::Serialize;

use crate::ringload::{DrainerReport, Fault, LanderReport, Workload};
use crate::{BenchError, BenchResult};

/// What to run (`embar ring-bench`'s flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// The `embar` binary, which runs the two workers.
    pub embar: PathBuf,
    /// Payload bytes to move through the pool.
    pub total_bytes: u64,
    /// Payload bytes of each message.
    pub message_bytes: u64,
    /// Batch size (headers and payloads).
    pub batch_bytes: u64,
    pub pool_bytes: u64,
    pub segment_bytes: u64,
    pub ring_slots: u32,
    pub coherence: CoherenceMode,
    /// The drainer holds this many taken batches and finishes them newest first, so the ring
    /// watermark is exercised with out-of-order completion.
    pub hold: usize,
    /// Directory of the pool file.
    pub pool_dir: PathBuf,
    /// Print one JSON object instead of the human summary.
    pub json: bool,
    /// Inject a fault in the lander (to check that the drainer catches it).
    pub fault: Option<Fault>,
}

#[derive(Debug, Serialize)]
struct LatencyUs {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct RingReportConfig {
    transport: &'static str,
    brokers: u32,
    order: u8,
    ack: u8,
    message_size: u64,
    batch_size: u64,
    messages_per_batch: u64,
    pool_bytes: u64,
    segment_bytes: u64,
    ring_slots: u32,
    coherence: &'static str,
    hold: usize,
}

#[derive(Debug, Serialize)]
struct RingReport {
    throughput_gbps: f64,
    messages_per_s: f64,
    memcpy_gbps: f64,
    ratio_to_memcpy: f64,
    messages: u64,
    batches: u64,
    payload_bytes: u64,
    elapsed_s: f64,
    /// Publish-to-take latency per batch (lander stamp to drainer take).
    latency_us: LatencyUs,
    ring_laps: u64,
    pool_multiples_moved: f64,
    segments_reused: u64,
    ring_full_waits: u64,
    segment_waits: u64,
    order_check: &'static str,
    errors: Vec<String>,
    config: RingReportConfig,
}

/// Removes the bench pool however the run ends.
struct PoolFile(PathBuf);

impl Drop for PoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn spawn_worker(embar: &Path, args: &[String]) -> BenchResult<Child> {
    Command::new(embar)
        .arg(crate::workers::COMMAND)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: format!("a worker process ({})", embar.display()),
            source,
        })
}

fn workload_args(w: &Workload) -> Vec<String> {
    vec![
        "--pool".into(),
        w.pool.display().to_string(),
        "--topic-slot".into(),
        w.topic_slot.to_string(),
        "--broker".into(),
        w.broker.to_string(),
        "--client-id".into(),
        w.client_id.to_string(),
        "--messages".into(),
        w.messages.to_string(),
        "--message-bytes".into(),
        w.message_bytes.to_string(),
        "--batch-bytes".into(),
        w.batch_bytes.to_string(),
        "--seed".into(),
        w.seed.to_string(),
    ]
}

fn report_of<T: serde::de::DeserializeOwned>(child: Child, what: &str) -> BenchResult<T> {
    let out = child
        .wait_with_output()
        .map_err(|source| BenchError::Spawn {
            what: what.into(),
            source,
        })?;
    let line = BufReader::new(&out.stdout[..])
        .lines()
        .map_while(Result::ok)
        .last()
        .unwrap_or_default();
    if !out.status.success() {
        return Err(BenchError::Worker {
            what: what.into(),
            status: out.status,
            line,
        });
    }
    serde_json::from_str(&line).map_err(|source| BenchError::Report {
        what: what.into(),
        line,
        source,
    })
}

/// Runs the bench and prints its report; `Ok(false)`: a check in it failed.
pub fn run(a: &Config) -> BenchResult<bool> {
    if a.message_bytes == 0 || a.total_bytes < a.message_bytes {
        return Err(BenchError::Usage(
            "--message-bytes must be at least 1 and at most --total-bytes".into(),
        ));
    }
    let memcpy = crate::baseline::memcpy_gbps();
    let path = a
        .pool_dir
        .join(format!("embar-bench-{}.pool", std::process::id()));
    let cfg = PoolConfig {
        pool_bytes: a.pool_bytes,
        max_topics: 4,
        max_brokers: 1,
        ring_slots: a.ring_slots,
        segment_bytes: a.segment_bytes,
    };
    let pool = Pool::create(
        &path,
        &cfg,
        &CreateOptions {
            populate: true,
            coherence: a.coherence,
            ..Default::default()
        },
    )?;
    let _cleanup = PoolFile(path.clone());
    let topic = TopicConfig {
        order: 0,
        ack: 0,
        replication_factor: 0,
        batch_bytes: a.batch_bytes,
    };
    let slot = pool.create_topic(Coherent, "bench", &topic)?;
    let w = Workload {
        pool: path.clone(),
        topic_slot: slot,
        broker: 0,
        client_id: 1,
        messages: a.total_bytes / a.message_bytes,
        message_bytes: a.message_bytes,
        batch_bytes: a.batch_bytes,
        seed: 0x5eed,
    };
    let mut drain_args = vec!["drain".to_string()];
    drain_args.extend(workload_args(&w));
    drain_args.extend(["--hold".into(), a.hold.to_string()]);
    let mut land_args = vec!["land".to_string()];
    land_args.extend(workload_args(&w));
    if let Some(f) = a.fault {
        let name = clap::ValueEnum::to_possible_value(&f).map(|v| v.get_name().to_string());
        land_args.extend(["--fault".into(), name.unwrap_or_default()]);
    }
    let mut drainer = spawn_worker(&a.embar, &drain_args)?;
    let lander = spawn_worker(&a.embar, &land_args)?;
    progress(&pool, slot, &w, a.json, &mut drainer);
    let land: LanderReport = report_of(lander, "lander")?;
    let drain: DrainerReport = report_of(drainer, "drainer")?;

    let elapsed_ns = drain.last_ns.saturating_sub(land.start_ns).max(1);
    let elapsed_s = elapsed_ns as f64 / 1e9;
    let gbps = drain.payload_bytes as f64 / elapsed_s / 1e9;
    let passed =
        drain.error_count == 0 && drain.messages == w.messages && land.batches == w.batches();
    let lat = &drain.batch_latency_ns;
    let result = RingReport {
        throughput_gbps: gbps,
        messages_per_s: drain.messages as f64 / elapsed_s,
        memcpy_gbps: memcpy,
        ratio_to_memcpy: gbps / memcpy,
        messages: drain.messages,
        batches: drain.batches,
        payload_bytes: drain.payload_bytes,
        elapsed_s,
        latency_us: LatencyUs {
            p50: lat.p50 as f64 / 1e3,
            p99: lat.p99 as f64 / 1e3,
            p999: lat.p999 as f64 / 1e3,
            max: lat.max as f64 / 1e3,
        },
        ring_laps: drain.ring_laps,
        pool_multiples_moved: drain.payload_bytes as f64 / a.pool_bytes as f64,
        segments_reused: land.segments_reused,
        ring_full_waits: land.ring_full_waits,
        segment_waits: land.segment_waits,
        order_check: if passed { "passed" } else { "failed" },
        errors: drain.errors,
        config: RingReportConfig {
            transport: "shm",
            brokers: 1,
            order: 0,
            ack: 0,
            message_size: a.message_bytes,
            batch_size: a.batch_bytes,
            messages_per_batch: w.messages_per_batch(),
            pool_bytes: a.pool_bytes,
            segment_bytes: a.segment_bytes,
            ring_slots: a.ring_slots,
            coherence: a.coherence.name(),
            hold: a.hold,
        },
    };
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_human(&result);
    }
    Ok(passed)
}

/// Prints progress on stderr until the drainer exits.
fn progress(pool: &Pool, slot: u32, w: &Workload, quiet: bool, drainer: &mut Child) {
    let entry = &pool.tinode(slot).brokers[0];
    let total = w.batches();
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let consumed = entry
            .sequencer
            .ring_consumed
            .load(std::sync::atomic::Ordering::Acquire);
        if !matches!(drainer.try_wait(), Ok(None)) {
            break;
        }
        if !quiet && last_print.elapsed() >= Duration::from_secs(1) {
            let bytes = consumed * w.messages_per_batch() * w.message_bytes;
            eprintln!(
                "bench: {consumed}/{total} batches ({}), {:.2} GB/s so far",
                format_bytes(bytes),
                bytes as f64 / start.elapsed().as_secs_f64() / 1e9
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_human(r: &RingReport) {
    let c = &r.config;
    println!(
        "embar ring-bench: pool data path, {} transport, {} coherence, {} B messages, {} batches ({} msgs each), ring {} slots",
        c.transport,
        c.coherence,
        c.message_size,
        format_bytes(c.batch_size),
        c.messages_per_batch,
        c.ring_slots
    );
    println!(
        "  moved      {} in {} messages, {} batches, {:.2} s ({:.1}x the pool, {} ring laps)",
        format_bytes(r.payload_bytes),
        r.messages,
        r.batches,
        r.elapsed_s,
        r.pool_multiples_moved,
        r.ring_laps
    );
    println!(
        "  throughput {:.2} GB/s, {:.2} M msgs/s",
        r.throughput_gbps,
        r.messages_per_s / 1e6
    );
    println!(
        "  memcpy     {:.2} GB/s single thread, this run  ->  ratio {:.2}",
        r.memcpy_gbps, r.ratio_to_memcpy
    );
    println!(
        "  batch publish-to-take latency: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
        r.latency_us.p50, r.latency_us.p99, r.latency_us.p999, r.latency_us.max
    );
    println!("  order check {}", r.order_check);
    for e in &r.errors {
        println!("    {e}");
    }
}
