//! `embar bench`, the main job: a local cluster (control process, brokers, sequencer as
//! separate processes) unless pointed at one, publishers and subscribers in this process on
//! the shm transport, every message checked (total order, per-client order, payload), and
//! throughput, publish-to-ack latency (HDR histogram) and the same run's memcpy bandwidth.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use embar_control::topics::TopicSpec;
use embar_control::ControlClient;
use embar_dataplane::checker::{Delivered, OrderChecker};
use embar_dataplane::client::publisher::{Publisher, PublisherConfig};
use embar_dataplane::client::subscriber::{StartAt, Subscriber};
use embar_dataplane::client::Publish;
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, Pool};
use embar_dataplane::units::format_bytes;
use embar_sys::clock::monotonic_ns;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

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
    pub transport: Transport,
}

/// How the publishers reach their brokers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Stores into the pool (publishers on the pool host).
    Shm,
    /// RDMA writes into broker-registered grants (a build with the `verbs` feature).
    Verbs {
        device: Option<String>,
        gid_index: u8,
        /// The IP the brokers of a started cluster listen on (the RDMA netdev's).
        ip: Option<IpAddr>,
    },
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Verbs { .. } => "verbs",
        }
    }
}

/// Payloads: a random template whose first 8 bytes are replaced by the message's identity
/// (publisher, index). A subscriber checks the identity and a sum over every other byte, a
/// full read of the payload at memory speed.
struct Payloads {
    template: Vec<u8>,
    tail_sum: u64,
}

impl Payloads {
    fn new(bytes: usize) -> Payloads {
        let mut x = 0x5eed_u64;
        let template: Vec<u8> = (0..bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let tail_sum = word_sum(&template[bytes.min(8)..]);
        Payloads { template, tail_sum }
    }

    fn stamp(buf: &mut [u8], p: u64, i: u64) {
        let k = buf.len().min(8);
        buf[..k].copy_from_slice(&(p << 40 | i).to_le_bytes()[..k]);
    }

    /// `(publisher, index)` of a payload whose every byte is as published.
    fn check(&self, buf: &[u8]) -> Option<(u64, u64)> {
        let k = buf.len().min(8);
        if buf.len() != self.template.len() || word_sum(&buf[k..]) != self.tail_sum {
            return None;
        }
        let mut idb = [0u8; 8];
        idb[..k].copy_from_slice(&buf[..k]);
        let id = u64::from_le_bytes(idb);
        Some((id >> 40, id & ((1 << 40) - 1)))
    }
}

struct Run {
    order: u8,
    messages: u64,
    bytes: u64,
    elapsed_s: f64,
    latency: Histogram<u64>,
    errors: Vec<String>,
    grant_waits: u64,
}

/// Runs the bench and prints its report; `Ok(false)`: a check in it failed.
pub fn run(a: &Config) -> BenchResult<bool> {
    if a.message_bytes == 0 || a.total_bytes < a.message_bytes || a.publishers == 0 {
        return Err(BenchError::Usage("--message-bytes, --publishers must be at least 1 and --total-bytes at least one message".into()));
    }
    if a.transport != Transport::Shm && !cfg!(feature = "verbs") {
        return Err(BenchError::Usage(
            "the verbs transport needs embar-bench's `verbs` feature".into(),
        ));
    }
    let memcpy = crate::baseline::memcpy_gbps();
    let stalls = crate::baseline::host_stalls(Duration::from_secs(1));
    let started = match a.control {
        Some(_) => None,
        None => {
            let verbs = match &a.transport {
                Transport::Shm => None,
                Transport::Verbs { device, gid_index, ip } => Some((
                    ip.ok_or_else(|| BenchError::Usage("--transport verbs: give --verbs-ip (the RDMA netdev's address) or set RDMA_IP".into()))?,
                    device.clone(),
                    *gid_index,
                )),
            };
            let local = LocalCluster {
                embar: a.embar.clone(),
                dir: std::env::temp_dir().join(format!("embar-bench-{}", std::process::id())),
                brokers: a.brokers,
                pool_bytes: a.pool_bytes,
                segment_bytes: a.segment_bytes,
                max_brokers: a.brokers.max(2),
                verbs,
            };
            let f = local.start()?;
            if !a.json {
                eprintln!(
                    "bench: started a local cluster: control {}, {} brokers, pool {}",
                    f.control,
                    a.brokers,
                    f.pool.display()
                );
            }
            Some(f)
        }
    };
    let control = match (&started, a.control) {
        (Some(f), _) => f.control,
        (None, Some(c)) => c,
        (None, None) => unreachable!("a cluster is given or started"),
    };
    let (pool_path, brokers) = crate::cluster::discover(control)?;
    let pool = crate::cluster::open_pool(&pool_path)?;
    // With a comparison, the two orders alternate twice and each keeps its best run: a run's
    // position in the sequence moves its figure more than the ORDER does on this machine.
    let orders: Vec<u8> = match a.compare_order {
        Some(other) => vec![a.order, other, other, a.order],
        None => vec![a.order],
    };
    let mut runs = Vec::new();
    for order in orders {
        let name = format!("bench-o{order}-{}-{}", std::process::id(), runs.len());
        let spec = TopicSpec {
            name: name.clone(),
            order,
            ack: a.ack,
            replication_factor: 0,
            batch_bytes: a.batch_bytes,
        };
        ControlClient::new(control).create_topic(&spec)?;
        struct Go<'a>(&'a Pool, &'a Config, &'a str, &'a [u32], u8, SocketAddr);
        impl CoherenceFn<BenchResult<Run>> for Go<'_> {
            fn call<C: Coherence>(self, c: C) -> BenchResult<Run> {
                one_run(self.0, c, self.1, self.2, self.3, self.4, self.5)
            }
        }
        runs.push(Pool::with_coherence(
            pool.coherence_mode(),
            Go(&pool, a, &name, &brokers, order, control),
        )?);
        // Each run starts with the pool's log space free: brokers free a deleted topic's
        // segments within their 100 ms topic check.
        let _ = ControlClient::new(control).delete_topic(&name);
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut kept = Vec::new();
    for order in [Some(a.order), a.compare_order].into_iter().flatten() {
        let mut mine: Vec<Run> = Vec::new();
        let mut rest = Vec::new();
        for r in runs.drain(..) {
            if r.order == order {
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
    report(a, memcpy, stalls, brokers.len(), &kept)
}

fn one_run<C: Coherence>(
    pool: &Pool,
    c: C,
    a: &Config,
    topic: &str,
    brokers: &[u32],
    order: u8,
    control: SocketAddr,
) -> BenchResult<Run> {
    let per_pub = (a.total_bytes / a.message_bytes).div_ceil(u64::from(a.publishers));
    let total = per_pub * u64::from(a.publishers);
    let acked = AtomicU64::new(0);
    let delivered = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let fifo = matches!(order, 4 | 5);
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
    let subs: Vec<_> = (0..a.subscribers)
        .map(|_| Subscriber::open(pool, c, topic, StartAt::Oldest))
        .collect::<Result<_, _>>()?;
    let start_ns = monotonic_ns();
    let result = std::thread::scope(|s| {
        let sub_handles: Vec<_> = subs
            .into_iter()
            .map(|mut sub| {
                let (delivered, failed) = (&delivered, &failed);
                s.spawn(move || -> BenchResult<(u64, u64)> {
                    let mut checker = OrderChecker::new(fifo);
                    let mut next: std::collections::HashMap<u64, u64> =
                        std::collections::HashMap::new();
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
                            let d = Delivered {
                                total_order: m.total_order,
                                client_id: m.client_id,
                                batch_seq: m.batch_seq,
                                index: m.index,
                                num_msg: m.num_msg,
                            };
                            if let Err(v) = checker.push(&d) {
                                err = Some(v.to_string());
                                return;
                            }
                            match payloads.check(m.payload) {
                                Some((p, i)) => {
                                    if fifo {
                                        let want = next.entry(p).or_insert(0);
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
                                std::thread::sleep(Duration::from_micros(50));
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
                    Ok((checker.delivered(), digest))
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
                        payloads,
                        per_pub,
                        p: p.into(),
                        acked,
                        failed,
                    };
                    let r = if a.transport == Transport::Shm {
                        Publisher::open(pool, c, topic, brokers, new_client_id(), cfg)
                            .map_err(BenchError::from)
                            .and_then(|mut publ| load.drive(&mut publ))
                    } else {
                        drive_verbs(&load, control, topic, cfg)
                    };
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let mut last = Instant::now();
        while pub_handles.iter().any(|h| !h.is_finished())
            || sub_handles.iter().any(|h| !h.is_finished())
        {
            std::thread::sleep(Duration::from_millis(50));
            if !a.json && last.elapsed() > Duration::from_secs(1) {
                last = Instant::now();
                let el = (monotonic_ns() - start_ns) as f64 / 1e9;
                let d = delivered.load(Ordering::Relaxed);
                eprintln!(
                    "bench ORDER {order}: {d}/{total} delivered to each subscriber, {:.2} GB/s so far",
                    d as f64 * a.message_bytes as f64 / el / 1e9 / f64::from(a.subscribers.max(1))
                );
            }
        }
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
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
        for h in sub_handles {
            match h
                .join()
                .map_err(|_| BenchError::Run("a subscriber panicked".into()))?
            {
                Ok((_, digest)) => digests.push(digest),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if digests.windows(2).any(|w| w[0] != w[1]) {
            errors.push("subscribers saw different sequences".into());
        }
        Ok::<Run, BenchError>(Run {
            order,
            messages: total,
            bytes: total * a.message_bytes,
            elapsed_s: end_ns.saturating_sub(first_ns).max(1) as f64 / 1e9,
            latency,
            errors,
            grant_waits,
        })
    })?;
    Ok(result)
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
    payloads: &'a Payloads,
    per_pub: u64,
    p: u64,
    acked: &'a AtomicU64,
    failed: &'a AtomicBool,
}

impl Load<'_> {
    /// Publishes this publisher's messages (paced when open loop), waits for every ack.
    fn drive<P: Publish>(&self, publ: &mut P) -> BenchResult<Driven> {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let mut lat = Vec::with_capacity(1024);
        let mut buf = self.payloads.template.clone();
        let interval_ns = self.a.rate.map(|r| 1_000_000_000 / r.max(1));
        let t0 = monotonic_ns();
        for i in 0..self.per_pub {
            if self.failed.load(Ordering::Relaxed) {
                return Err(BenchError::Run("stopped: another thread failed".into()));
            }
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
            Payloads::stamp(&mut buf, self.p, i);
            publ.publish(&buf)?;
            if interval_ns.is_some() {
                publ.flush()?;
            }
            if i % 256 == 0 {
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
        let brokers = crate::cluster::verbs_brokers(control)?;
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

/// A client id for a publisher: random, so two publishers never share one.
pub(crate) fn new_client_id() -> u64 {
    RandomState::new().build_hasher().finish() >> 1
}

impl Run {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed_s / 1e9
    }
}

fn run_json(r: &Run) -> Value {
    let us = |q: f64| r.latency.value_at_quantile(q) as f64 / 1e3;
    json!({
        "order": r.order,
        "throughput_gbps": r.bytes as f64 / r.elapsed_s / 1e9,
        "messages_per_s": r.messages as f64 / r.elapsed_s,
        "messages": r.messages,
        "elapsed_s": r.elapsed_s,
        "order_check": if r.errors.is_empty() { "passed" } else { "failed" },
        "errors": r.errors,
        "latency_us": { "p50": us(0.5), "p99": us(0.99), "p999": us(0.999), "max": r.latency.max() as f64 / 1e3 },
        "grant_waits": r.grant_waits,
    })
}

fn report(
    a: &Config,
    memcpy: f64,
    stalls: Stalls,
    brokers: usize,
    runs: &[Run],
) -> BenchResult<bool> {
    let main = &runs[0];
    let mut out = run_json(main);
    let gbps = out["throughput_gbps"].as_f64().unwrap_or(0.0);
    out["memcpy_gbps"] = json!(memcpy);
    out["ratio_to_memcpy"] = json!(gbps / memcpy);
    out["host_stalls"] = json!(stalls);
    out["config"] = json!({
        "transport": a.transport.name(),
        "brokers": brokers,
        "order": a.order,
        "ack": a.ack,
        "message_size": a.message_bytes,
        "batch_size": a.batch_bytes,
        "publishers": a.publishers,
        "subscribers": a.subscribers,
        "rate_per_publisher": a.rate,
    });
    if let Some(other) = runs.get(1) {
        let o = run_json(other);
        let og = o["throughput_gbps"].as_f64().unwrap_or(0.0);
        out["comparison"] = json!({ "run": o, "ratio": if og > 0.0 { gbps / og } else { 0.0 } });
    }
    let passed = runs.iter().all(|r| r.errors.is_empty());
    if a.json {
        println!("{out}");
        return Ok(passed);
    }
    println!(
        "embar bench: {} brokers, {} transport, ORDER {} ACK {}, {} B messages, {} batches, {} publisher(s), {} subscriber(s){}",
        brokers,
        a.transport.name(),
        a.order,
        a.ack,
        a.message_bytes,
        format_bytes(a.batch_bytes),
        a.publishers,
        a.subscribers,
        a.rate.map_or(String::new(), |r| format!(", open loop {r} msgs/s per publisher"))
    );
    for (i, r) in runs.iter().enumerate() {
        let j = run_json(r);
        let l = &j["latency_us"];
        println!(
            "  ORDER {}: {} in {} messages, {:.2} s: {:.2} GB/s, {:.2} M msgs/s{}",
            r.order,
            format_bytes(r.bytes),
            r.messages,
            r.elapsed_s,
            j["throughput_gbps"].as_f64().unwrap_or(0.0),
            j["messages_per_s"].as_f64().unwrap_or(0.0) / 1e6,
            if i == 0 {
                format!("  ({:.2} x memcpy {memcpy:.2} GB/s)", gbps / memcpy)
            } else {
                String::new()
            }
        );
        println!(
            "    publish-to-ack latency: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us; order check {}",
            l["p50"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["p999"].as_f64().unwrap_or(0.0),
            l["max"].as_f64().unwrap_or(0.0),
            j["order_check"].as_str().unwrap_or("?")
        );
        for e in &r.errors {
            println!("    error: {e}");
        }
    }
    println!(
        "  host stalls (a thread spinning on each of {} CPUs for {} ms): {} over 50 us, {} over 200 us, longest {} us: no tail latency here is below these",
        stalls.cpus, stalls.probe_ms, stalls.over_50us, stalls.over_200us, stalls.max_us
    );
    if let Some(c) = out.get("comparison") {
        println!(
            "  ORDER {} / ORDER {} throughput: {:.2}",
            a.order,
            runs[1].order,
            c["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(passed)
}
