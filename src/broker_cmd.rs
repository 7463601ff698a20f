//! `embar broker`: registers with the control process, attaches to the pool, runs the data
//! path (and, with `--sequencer`, the sequencer of every topic), heartbeats, and serves
//! Prometheus metrics.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embar_control::metrics::{BrokerSnapshot as Snapshot, VerbsSnapshot};
use embar_control::ControlClient;
use embar_dataplane::broker::Broker;
use embar_dataplane::idle::{Idle, IdlePolicy};
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, OpenOptions, Pool};
use embar_dataplane::sequencer::driver::{DriverConfig, Sequencer, SequencerError};

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
    /// How long the control process may be unreachable before this broker stops serving
    /// (it goes on serving publishers and subscribers meanwhile, and retries heartbeats).
    #[arg(long, default_value_t = embar_control::keepalive::GRACE_DEFAULT.as_millis() as u64)]
    pub control_grace_ms: u64,
}

/// The verbs port of a broker: its listener and device, opened before registering so that
/// a missing device is an error at start.
#[cfg(feature = "verbs")]
pub struct VerbsPort {
    listener: TcpListener,
    ctx: std::sync::Arc<embar_sys::verbs::Context>,
}
#[cfg(not(feature = "verbs"))]
pub type VerbsPort = std::convert::Infallible;

#[cfg(feature = "verbs")]
fn open_verbs(a: &BrokerArgs) -> Result<Option<VerbsPort>, String> {
    let Some(addr) = a.verbs else { return Ok(None) };
    if addr.ip().is_unspecified() {
        return Err(format!(
            "--verbs {addr}: give the address publishers reach (the RDMA netdev's IP), not a wildcard"
        ));
    }
    let ctx = embar_sys::verbs::Context::open(a.rdma_device.as_deref(), a.gid_index)
        .map_err(|e| format!("--verbs: {e}"))?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok(Some(VerbsPort { listener, ctx }))
}

#[cfg(not(feature = "verbs"))]
fn open_verbs(a: &BrokerArgs) -> Result<Option<VerbsPort>, String> {
    match a.verbs {
        None => Ok(None),
        Some(_) => Err(crate::NO_VERBS.into()),
    }
}

/// How often the sequencer looks for new topics.
const TOPIC_SCAN: Duration = Duration::from_millis(100);

pub fn run(a: &BrokerArgs) -> Result<(), String> {
    let client = ControlClient::new(a.control);
    let status = client.status().map_err(|e| e.to_string())?;
    let pool_path = PathBuf::from(
        status["pool"]["path"]
            .as_str()
            .ok_or("the control process names no pool")?,
    );
    let pool = Pool::open(
        &pool_path,
        &OpenOptions {
            populate: true,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let metrics =
        TcpListener::bind(a.metrics).map_err(|e| format!("cannot listen on {}: {e}", a.metrics))?;
    let metrics_addr = metrics.local_addr().map_err(|e| e.to_string())?;
    let verbs = open_verbs(a)?;
    let mut addrs: BTreeMap<String, String> = BTreeMap::new();
    addrs.insert("shm".into(), pool_path.display().to_string());
    #[cfg(feature = "verbs")]
    if let Some(v) = &verbs {
        let at = v.listener.local_addr().map_err(|e| e.to_string())?;
        addrs.insert("verbs".into(), at.to_string());
        println!(
            "embar broker: verbs publishers connect to {at} (device {})",
            v.ctx.name()
        );
    }
    addrs.insert("metrics".into(), metrics_addr.to_string());
    let me = embar_sys::process::ProcessId::current();
    addrs.insert("pid".into(), me.pid.to_string());
    addrs.insert("pid_start".into(), me.start.to_string());
    if let Some(host) = embar_sys::process::host_name() {
        addrs.insert("host".into(), host);
    }
    addrs.insert(
        embar_control::membership::GRACE_MS.into(),
        a.control_grace_ms.to_string(),
    );
    use embar_control::membership::{SEQUENCER, SEQUENCER_CANDIDATE, SEQUENCER_PINNED};
    if a.sequencer {
        addrs.insert(SEQUENCER.into(), SEQUENCER_PINNED.into());
    } else if !a.no_sequencer {
        addrs.insert(SEQUENCER.into(), SEQUENCER_CANDIDATE.into());
    }
    let reg = client.register(&addrs).map_err(|e| e.to_string())?;
    println!(
        "embar broker {} in pool slot {} (pool {}, metrics {metrics_addr}{})",
        reg.broker_id,
        reg.slot,
        pool_path.display(),
        if a.sequencer { ", sequencer" } else { "" }
    );
    // Whether this broker runs the sequencer: pinned, or as the control process says in its
    // answer to every heartbeat.
    let run_sequencer = Arc::new(AtomicBool::new(a.sequencer));
    let assigned = run_sequencer.clone();
    let pinned = a.sequencer;
    let stop = embar_sys::signal::stop_on_term();
    let stats = Arc::new(Mutex::new(Snapshot::default()));
    let st = stats.clone();
    let slot = reg.slot;
    embar_control::metrics::serve_broker(metrics, slot, st).map_err(|e| e.to_string())?;
    let hb_stop = Arc::new(AtomicBool::new(false));
    let hb = hb_stop.clone();
    let grace = Duration::from_millis(a.control_grace_ms);
    let heartbeat = std::thread::Builder::new()
        .name("broker-heartbeat".into())
        .spawn(move || keep_alive(&client, &reg, &addrs, grace, &hb, &assigned, pinned))
        .map_err(|e| e.to_string())?;
    struct Go<'a> {
        pool: &'a Pool,
        slot: u32,
        args: &'a BrokerArgs,
        stop: &'a AtomicBool,
        stats: &'a Mutex<Snapshot>,
        heartbeat: &'a std::thread::JoinHandle<Result<(), String>>,
        verbs: Option<VerbsPort>,
        run_sequencer: &'a AtomicBool,
    }
    impl CoherenceFn<Result<(), String>> for Go<'_> {
        fn call<C: Coherence>(self, c: C) -> Result<(), String> {
            let seq_stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                // On a host with few cores every polling thread beyond the cores costs a
                // scheduler time slice of latency: run the sequencer in this loop instead.
                let inline = embar_sys::cpu::available_cpus() <= 2;
                let mut seq_thread = None;
                let mut seqs: Option<TopicSequencers<'_, C>> = None;
                if let Some(cpu) = self.args.pin_cpu {
                    if let Err(e) = embar_sys::cpu::pin_current_thread(cpu) {
                        log::warn!("{e}; running unpinned");
                    }
                }
                let mut broker = Broker::new(self.pool, c, self.slot)
                    .map_err(|e| e.to_string())?
                    .with_retention_limit(self.args.retention_bytes);
                #[cfg(feature = "verbs")]
                let mut frontend = match self.verbs {
                    Some(v) => Some(
                        embar_dataplane::verbs::frontend::Frontend::new(
                            self.pool, c, self.slot, v.listener, v.ctx,
                        )
                        .map_err(|e| e.to_string())?,
                    ),
                    None => None,
                };
                #[cfg(not(feature = "verbs"))]
                let _ = self.verbs;
                let mut idle = Idle::new(IdlePolicy::default());
                let mut last = Instant::now();
                while !self.stop.load(Ordering::Relaxed) {
                    if self.heartbeat.is_finished() {
                        // Declared dead, or the control process stayed away past the grace.
                        self.stop.store(true, Ordering::Relaxed);
                        return Err("no longer a member of the cluster; stopping".into());
                    }
                    let mut work = broker.poll_once().map_err(|e| e.to_string())?;
                    // Start or stop the sequencer as assigned.
                    let want = self.run_sequencer.load(Ordering::Relaxed);
                    let running = seqs.is_some() || seq_thread.is_some();
                    if want && !running {
                        log::info!("running the sequencer of every topic");
                        if inline {
                            seqs = Some(TopicSequencers::new(self.pool, c));
                        } else {
                            seq_stop.store(false, Ordering::Relaxed);
                            let (pool, stops, pin) = (
                                self.pool,
                                [self.stop, &seq_stop],
                                self.args.pin_cpu.map(|p| p + 1),
                            );
                            seq_thread = Some(s.spawn(move || sequence_all(pool, c, stops, pin)));
                        }
                    } else if !want && running {
                        log::info!("stopping the sequencer");
                        seqs = None;
                        seq_stop.store(true, Ordering::Relaxed);
                        if let Some(t) = seq_thread.take() {
                            let _ = t.join();
                        }
                    }
                    if let Some(seqs) = seqs.as_mut() {
                        work += seqs.poll_once();
                    }
                    #[cfg(feature = "verbs")]
                    if let Some(f) = frontend.as_mut() {
                        work += f.poll_once().map_err(|e| e.to_string())?;
                    }
                    idle.after(work, std::thread::sleep);
                    if last.elapsed() > Duration::from_millis(100) {
                        last = Instant::now();
                        // A pool file truncated under the cluster: say so and stop before the
                        // loop touches the missing part (which the bus error handler names).
                        if let Err(e) = self.pool.check_backing() {
                            eprintln!("embar: {e}");
                            std::process::exit(embar_sys::bus::EXIT_CODE);
                        }
                        if let Ok(mut g) = self.stats.lock() {
                            let occupancy = broker.ring_occupancy().iter().map(|(_, n)| n).sum();
                            *g = Snapshot {
                                broker: broker.stats(),
                                sessions_open: broker.sessions_open(),
                                ring_occupancy: occupancy,
                                verbs: VerbsSnapshot::default(),
                            };
                            #[cfg(feature = "verbs")]
                            if let Some(f) = &frontend {
                                let v = f.stats();
                                g.verbs = VerbsSnapshot {
                                    sessions_open: f.sessions_open() as u64,
                                    sessions_opened: v.sessions_opened,
                                    sessions_closed: v.sessions_closed,
                                    sessions_refused: v.sessions_refused,
                                    batches_forwarded: v.batches_forwarded,
                                    bad_immediates: v.bad_immediates,
                                    grants_registered: v.grants_registered,
                                };
                            }
                        }
                    }
                }
                Ok(())
            })
        }
    }
    let result = Pool::with_coherence(
        pool.coherence_mode(),
        Go {
            pool: &pool,
            slot,
            args: a,
            stop,
            stats: &stats,
            heartbeat: &heartbeat,
            verbs,
            run_sequencer: &run_sequencer,
        },
    );
    hb_stop.store(true, Ordering::Relaxed);
    if let Err(e) = &result {
        if heartbeat.is_finished() {
            if let Ok(Err(hb_err)) = heartbeat.join() {
                return Err(format!("{e}: {hb_err}"));
            }
        }
    }
    result
}

/// Heartbeats until `stop`, through outages of the control process (see
/// [`Keepalive`](embar_control::keepalive)): returns why this broker must stop serving.
fn keep_alive(
    client: &ControlClient,
    reg: &embar_control::client::Registration,
    addrs: &BTreeMap<String, String>,
    grace: Duration,
    stop: &AtomicBool,
    assigned: &AtomicBool,
    pinned: bool,
) -> Result<(), String> {
    use embar_control::keepalive::{Beat, Keepalive, Next};
    use embar_sys::clock::monotonic_ns;
    /// How often a continuing outage is logged again.
    const OUTAGE_LOG: Duration = Duration::from_secs(5);
    let mut k = Keepalive::new(reg.heartbeat, grace, monotonic_ns());
    let mut beat = client.beat(reg.broker_id);
    let mut last_log: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let outage = k.outage();
        if let Beat::Alive { sequencer: mine } = beat {
            if let Some((since, attempts)) = outage {
                log::info!(
                    "the control process answers again after {:.1} s ({attempts} attempts failed)",
                    Duration::from_nanos(monotonic_ns().saturating_sub(since)).as_secs_f64()
                );
                last_log = None;
            }
            if !pinned && assigned.swap(mine, Ordering::Relaxed) != mine {
                log::info!(
                    "the control process {} the sequencer {} this broker",
                    if mine { "assigned" } else { "took" },
                    if mine { "to" } else { "from" }
                );
            }
        }
        if let Beat::Unreachable(why) = &beat {
            if last_log.is_none_or(|t| t.elapsed() >= OUTAGE_LOG) {
                let attempts = outage.map_or(0, |o| o.1) + 1;
                log::warn!(
                    "cannot reach the control process ({why}); serving on, {attempts} attempts so far, giving up after {:.0} s",
                    grace.as_secs_f64()
                );
                last_log = Some(Instant::now());
            }
        }
        match k.on_beat(beat, monotonic_ns()) {
            Next::Heartbeat(wait) => {
                sleep_unless(stop, wait);
                beat = client.beat(reg.broker_id);
            }
            Next::Rejoin => {
                log::warn!(
                    "the control process does not know broker {}; rejoining slot {}",
                    reg.broker_id,
                    reg.slot
                );
                beat = match client.rejoin(reg, addrs) {
                    // Rejoined: the heartbeat says whether it runs the sequencer.
                    Beat::Alive { .. } => client.beat(reg.broker_id),
                    other => other,
                };
            }
            Next::Stop(why) => return Err(why),
        }
    }
    Ok(())
}

/// Sleeps `d`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// The sequencers of every topic in the pool, topics added as they appear and dropped when
/// deleted. Polled from the broker's own loop (run to completion, on hosts with few cores)
/// or from a thread of its own.
struct TopicSequencers<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    seqs: HashMap<u32, (u64, Sequencer<'p, C>)>,
    /// Topics (slot, generation) a newer sequencer took over: not taken back, or two
    /// sequencers would take turns raising the epoch.
    superseded: Vec<(u32, u64)>,
    last_scan: Option<Instant>,
    /// A topic that cannot be sequenced is retried every scan; said at most every 10 s.
    start_failed: embar_dataplane::log_limit::LogLimit,
}

impl<'p, C: Coherence> TopicSequencers<'p, C> {
    fn new(pool: &'p Pool, c: C) -> Self {
        TopicSequencers {
            pool,
            c,
            seqs: HashMap::new(),
            superseded: Vec::new(),
            last_scan: None,
            start_failed: Default::default(),
        }
    }

    fn poll_once(&mut self) -> usize {
        if self.last_scan.is_none_or(|t| t.elapsed() > TOPIC_SCAN) {
            self.last_scan = Some(Instant::now());
            let topics = self.pool.list_topics(self.c);
            self.seqs.retain(|slot, (gen, _)| {
                topics
                    .iter()
                    .any(|t| t.slot == *slot && t.generation == *gen)
            });
            for t in topics {
                if self.seqs.contains_key(&t.slot)
                    || self.superseded.contains(&(t.slot, t.generation))
                {
                    continue;
                }
                let brokers = self.pool.geometry().max_brokers;
                match Sequencer::start(self.pool, self.c, t.slot, brokers, DriverConfig::default())
                {
                    Ok(s) => {
                        log::info!("sequencing topic {:?} (epoch {})", t.name, s.epoch());
                        self.seqs.insert(t.slot, (t.generation, s));
                    }
                    Err(e) => embar_dataplane::warn_limited!(
                        self.start_failed,
                        embar_sys::clock::monotonic_ns(),
                        "cannot sequence topic {:?}: {e}",
                        t.name
                    ),
                }
            }
        }
        let mut work = 0;
        let mut failed = Vec::new();
        for (slot, (gen, s)) in self.seqs.iter_mut() {
            match s.poll_once() {
                Ok(n) => work += n,
                Err(e @ SequencerError::TopicGone(_)) => {
                    log::info!("{e}; its sequencer stops");
                    failed.push(*slot);
                }
                Err(e @ SequencerError::Superseded(_)) => {
                    log::warn!("topic slot {slot}: {e}; this one stops");
                    self.superseded.push((*slot, *gen));
                    failed.push(*slot);
                }
                Err(e) => {
                    log::error!("sequencer of topic slot {slot}: {e}");
                    failed.push(*slot);
                }
            }
        }
        for slot in failed {
            self.seqs.remove(&slot);
        }
        work
    }
}

/// The sequencers on a thread of their own, until either flag is set (the broker stops, or
/// the sequencer moves elsewhere).
fn sequence_all<C: Coherence>(pool: &Pool, c: C, stops: [&AtomicBool; 2], pin: Option<usize>) {
    if let Some(cpu) = pin {
        if let Err(e) = embar_sys::cpu::pin_current_thread(cpu) {
            log::warn!("{e}; sequencer running unpinned");
        }
    }
    let mut seqs = TopicSequencers::new(pool, c);
    let mut idle = Idle::new(IdlePolicy::default());
    while !stops.iter().any(|s| s.load(Ordering::Relaxed)) {
        idle.after(seqs.poll_once(), std::thread::sleep);
    }
}
