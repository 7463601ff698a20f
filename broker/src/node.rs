//! A whole broker: registers with the control process, maps the pool, runs its slot's
//! [`Driver`] on a polling thread (and the sequencers, in that loop or on a thread of their
//! own, when it is assigned them), heartbeats, and serves its Prometheus endpoint. What
//! `embar broker` runs; an embedding process starts one with [`BrokerNode::start`].

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use embar_control::http::ClientError;
use embar_control::metrics::{BrokerSnapshot, TcpSnapshot};
use embar_control::ControlClient;
use embar_dataplane::idle::{Idle, IdlePolicy};
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::doorbell::Park;
use embar_dataplane::pool::{CoherenceFn, OpenOptions, Pool};
use embar_dataplane::PoolError;
use embar_sys::process::ProcessId;

use crate::driver::{Driver, DriverError, DriverOptions};
use crate::sequencers::sequence_all;

/// Longest park of an idle broker loop on its doorbell: what it does unrung (timers, reclaim,
/// a lost wake-up) waits at most this long; an idle broker wakes this often.
const PARK_MAX: Duration = Duration::from_millis(5);

/// Whether this broker runs the sequencers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SequencerRole {
    /// When the control process assigns them (the oldest live broker runs them; another
    /// takes over when it dies).
    #[default]
    Candidate,
    /// Always, here.
    Pinned,
    /// Never (they run elsewhere, e.g. `embar sequencer`).
    Never,
}

/// Where verbs (RDMA) publishers connect.
#[derive(Clone, Debug)]
pub struct VerbsConfig {
    /// The TCP address of the handshake, which publishers must reach (the RDMA netdev's IP).
    pub addr: SocketAddr,
    /// RDMA device (default: the first).
    pub device: Option<String>,
    /// GID index (RoCEv2 over IPv4 is usually 1 on rxe).
    pub gid_index: u8,
}

/// How to run a broker.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// The control process.
    pub control: SocketAddr,
    pub sequencer: SequencerRole,
    /// The Prometheus endpoint (port 0: a free one, given to the control process).
    pub metrics: SocketAddr,
    /// Pin the data-path thread to this CPU (the sequencer thread, if any, to the next one).
    pub pin_cpu: Option<usize>,
    pub retention_bytes: Option<u64>,
    /// Accept verbs publishers (needs the `verbs` feature and an RDMA device).
    pub verbs: Option<VerbsConfig>,
    /// Accept TCP publishers and subscribers on this address, which they must reach (not a
    /// wildcard: it is given to the control process as is; port 0 takes a free one).
    pub tcp: Option<SocketAddr>,
    /// How the TCP frontend treats its connections (timeouts, limits).
    pub tcp_frontend: embar_dataplane::tcp::frontend::FrontendConfig,
    /// Accept DPDK publishers (needs the `dpdk` feature; their sessions open on the TCP
    /// port, which must then be on).
    pub dpdk: Option<embar_dataplane::tcp::frontend::DpdkFrontendConfig>,
    /// How long the control process may be unreachable before this broker stops serving.
    pub control_grace: Duration,
    /// Replicate ordered batches to disk (topics with a replication factor): where, and the
    /// sync policy. Without it this broker holds no replica and reports no progress.
    pub replication: Option<ReplicationConfig>,
}

/// Where a broker keeps its disk logs and how it syncs them (`docs/durability.md`).
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    pub data_dir: PathBuf,
    pub log: embar_dataplane::replication::log::LogConfig,
}

impl BrokerConfig {
    /// A candidate sequencer, metrics on a free local port, no verbs, the default grace.
    pub fn new(control: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            control,
            sequencer: SequencerRole::Candidate,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            pin_cpu: None,
            retention_bytes: None,
            verbs: None,
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            tcp_frontend: Default::default(),
            dpdk: None,
            control_grace: embar_control::keepalive::GRACE_DEFAULT,
            replication: None,
        }
    }
}

/// Why a broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Control(#[from] ClientError),
    #[error("the control process names no pool")]
    NoPool,
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "--verbs {0}: give the address publishers reach (the RDMA netdev's IP), not a wildcard"
    )]
    VerbsWildcard(SocketAddr),
    #[error("--tcp {0}: give the address clients reach, not a wildcard")]
    TcpWildcard(SocketAddr),
    #[cfg(feature = "verbs")]
    #[error("--verbs: {0}")]
    Verbs(#[from] embar_sys::verbs::VerbsError),
    #[error("this build has no verbs transport (the `verbs` feature)")]
    NoVerbs,
    #[error("this build has no DPDK transport (the `dpdk` feature)")]
    NoDpdk,
    #[error("--dpdk: {0}")]
    Dpdk(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// Why a running broker stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Declared dead, refused a rejoin, or the control process stayed away past the grace.
    #[error("no longer a member of the cluster: {0}; stopping")]
    Membership(String),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("the data-path thread panicked")]
    Panicked,
}

/// A running broker; see the module docs. Dropping it stops it.
pub struct BrokerNode {
    broker_id: u32,
    slot: u32,
    metrics: SocketAddr,
    verbs: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    hb_stop: Arc<AtomicBool>,
    data: Option<JoinHandle<Result<(), RunError>>>,
    heartbeat: Option<JoinHandle<Result<(), String>>>,
    replication: Option<JoinHandle<()>>,
    tcp_thread: Option<JoinHandle<()>>,
    verbs_subscribers: Option<JoinHandle<()>>,
    pool: Arc<Pool>,
    /// This process is recorded in the pool as the slot's (cleared once stopped).
    recorded: bool,
}

/// Records in the pool where this slot's disk logs are (or that it keeps none), so that
/// subscribers on the pool host read what the pool no longer holds from them
/// (`docs/durability.md`), and which process serves the slot (`None`: none, at a clean stop),
/// so that publishers on the pool host see it die. A failure only costs those readers: it is
/// logged.
fn record_slot(
    pool: &Pool,
    slot: u32,
    replication: Option<&ReplicationConfig>,
    process: Option<ProcessId>,
) {
    struct Record<'a>(&'a Pool, u32, Option<PathBuf>, Option<ProcessId>, bool);
    impl CoherenceFn<Result<(), PoolError>> for Record<'_> {
        fn call<C: Coherence>(self, c: C) -> Result<(), PoolError> {
            if self.4 {
                self.0.set_broker_data_dir(c, self.1, self.2.as_deref())?;
            }
            self.0.set_broker_process(c, self.1, self.3)
        }
    }
    // Absolute: every process on the host reads it, from its own working directory.
    let dir = replication.map(|r| {
        let _ = std::fs::create_dir_all(&r.data_dir);
        std::fs::canonicalize(&r.data_dir).unwrap_or_else(|_| r.data_dir.clone())
    });
    let starting = process.is_some();
    if let Err(e) = Pool::with_coherence(
        pool.coherence_mode(),
        Record(pool, slot, dir, process, starting),
    ) {
        log::warn!("broker {slot}: cannot record itself in the pool: {e}");
    }
}

impl BrokerNode {
    /// Registers with the control process and starts serving; returns once the data path
    /// runs.
    pub fn start(cfg: BrokerConfig) -> Result<BrokerNode, StartError> {
        let client = ControlClient::new(cfg.control);
        let status = client.status()?;
        let pool_path = PathBuf::from(status["pool"]["path"].as_str().ok_or(StartError::NoPool)?);
        let pool = Arc::new(Pool::open(
            &pool_path,
            // The metadata it polls, not the whole pool: log space is faulted in by the
            // publishers that take it (a 16 GiB pool would cost seconds and 16 GB here).
            &OpenOptions {
                populate_metadata: true,
                ..Default::default()
            },
        )?);
        let listen = |addr: SocketAddr| {
            TcpListener::bind(addr).map_err(|source| StartError::Listen { addr, source })
        };
        let metrics = listen(cfg.metrics)?;
        let metrics_addr = metrics.local_addr().map_err(|source| StartError::Listen {
            addr: cfg.metrics,
            source,
        })?;
        #[allow(unused_mut)]
        let mut verbs = open_verbs(cfg.verbs.as_ref())?;
        if let Some(d) = &cfg.dpdk {
            if cfg.tcp.is_none() {
                return Err(StartError::Dpdk(
                    "DPDK sessions open on the TCP port, which is off (--tcp none)".into(),
                ));
            }
            #[cfg(feature = "dpdk")]
            embar_dataplane::dpdk::frontend::prepare(d).map_err(StartError::Dpdk)?;
            #[cfg(not(feature = "dpdk"))]
            {
                let _ = d;
                return Err(StartError::NoDpdk);
            }
        }
        let tcp = match cfg.tcp {
            Some(addr) if addr.ip().is_unspecified() => return Err(StartError::TcpWildcard(addr)),
            Some(addr) => Some(listen(addr)?),
            None => None,
        };
        let tcp_addr = match &tcp {
            Some(l) => Some(l.local_addr().map_err(|source| StartError::Listen {
                addr: cfg.tcp.expect("listening"),
                source,
            })?),
            None => None,
        };
        let mut addrs: BTreeMap<String, String> = BTreeMap::new();
        addrs.insert("shm".into(), pool_path.display().to_string());
        let verbs_addr = verbs_addr(&verbs);
        if let Some(at) = verbs_addr {
            addrs.insert("verbs".into(), at.to_string());
        }
        addrs.insert("metrics".into(), metrics_addr.to_string());
        if let Some(at) = tcp_addr {
            addrs.insert("tcp".into(), at.to_string());
        }
        let me = embar_sys::process::ProcessId::current();
        addrs.insert("pid".into(), me.pid.to_string());
        addrs.insert("pid_start".into(), me.start.to_string());
        if let Some(host) = embar_sys::process::host_name() {
            addrs.insert("host".into(), host);
        }
        addrs.insert(
            embar_control::membership::GRACE_MS.into(),
            cfg.control_grace.as_millis().to_string(),
        );
        use embar_control::membership::{SEQUENCER, SEQUENCER_CANDIDATE, SEQUENCER_PINNED};
        match cfg.sequencer {
            SequencerRole::Pinned => {
                addrs.insert(SEQUENCER.into(), SEQUENCER_PINNED.into());
            }
            SequencerRole::Candidate => {
                addrs.insert(SEQUENCER.into(), SEQUENCER_CANDIDATE.into());
            }
            SequencerRole::Never => {}
        }
        let reg = client.register(&addrs)?;
        let (broker_id, slot) = (reg.broker_id, reg.slot);
        record_slot(
            &pool,
            slot,
            cfg.replication.as_ref(),
            Some(ProcessId::current()),
        );
        // Whether this broker runs the sequencers: pinned, or as the control process says in
        // its answer to every heartbeat.
        let pinned = cfg.sequencer == SequencerRole::Pinned;
        let run_sequencer = Arc::new(AtomicBool::new(pinned));
        let stats = Arc::new(Mutex::new(BrokerSnapshot::default()));
        embar_control::metrics::serve_broker(metrics, slot, stats.clone()).map_err(|source| {
            StartError::Listen {
                addr: metrics_addr,
                source,
            }
        })?;
        let hb_stop = Arc::new(AtomicBool::new(false));
        let (hb, assigned, grace) = (hb_stop.clone(), run_sequencer.clone(), cfg.control_grace);
        let heartbeat = std::thread::Builder::new()
            .name("broker-heartbeat".into())
            .spawn(move || {
                crate::membership::keep_alive(&client, &reg, &addrs, grace, &hb, &assigned, pinned)
            })
            .map_err(StartError::Thread)?;
        let stop = Arc::new(AtomicBool::new(false));
        let replication = match cfg.replication.clone() {
            Some(rc) => {
                let (stop, path) = (stop.clone(), pool_path.clone());
                Some(
                    std::thread::Builder::new()
                        .name("broker-replication".into())
                        .spawn(move || crate::replication::run(&path, slot, &rc, &stop))
                        .map_err(StartError::Thread)?,
                )
            }
            None => None,
        };
        let tcp_thread = match tcp {
            Some(listener) => {
                let (pool, stop, fcfg) = (pool.clone(), stop.clone(), cfg.tcp_frontend);
                let dpdk = cfg.dpdk.clone();
                let stats = stats.clone();
                Some(
                    std::thread::Builder::new()
                        .name("broker-tcp".into())
                        .spawn(move || {
                            let go = TcpGo {
                                pool: &pool,
                                slot,
                                listener,
                                cfg: fcfg,
                                dpdk,
                                stop: &stop,
                                stats: &stats,
                            };
                            if let Err(e) = Pool::with_coherence(pool.coherence_mode(), go) {
                                log::error!("broker {slot}: the TCP frontend stopped: {e}");
                            }
                        })
                        .map_err(StartError::Thread)?,
                )
            }
            None => None,
        };
        let verbs_subscribers =
            serve_verbs_subscribers(&mut verbs, &pool, slot, cfg.tcp_frontend, &stop)?;
        let serve = Serve {
            slot,
            cfg,
            stop: stop.clone(),
            stats,
            run_sequencer,
            verbs,
        };
        let own_pool = pool.clone();
        let data = std::thread::Builder::new()
            .name("broker-data".into())
            .spawn(move || Pool::with_coherence(pool.coherence_mode(), Go(&pool, serve)))
            .map_err(StartError::Thread)?;
        Ok(BrokerNode {
            broker_id,
            slot,
            metrics: metrics_addr,
            verbs: verbs_addr,
            tcp: tcp_addr,
            stop,
            hb_stop,
            data: Some(data),
            heartbeat: Some(heartbeat),
            replication,
            tcp_thread,
            verbs_subscribers,
            pool: own_pool,
            recorded: true,
        })
    }

    /// The id the control process gave it.
    pub fn broker_id(&self) -> u32 {
        self.broker_id
    }

    /// Its slot in the pool (its rings and sessions).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// Where verbs publishers connect, if it accepts them.
    pub fn verbs_addr(&self) -> Option<SocketAddr> {
        self.verbs
    }

    /// Where TCP publishers and subscribers connect, if it accepts them.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Whether it stopped by itself (see [`wait`](Self::wait) for why).
    pub fn is_finished(&self) -> bool {
        self.data.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops it and waits until it has stopped: why it stopped by itself, if it did.
    pub fn stop(mut self) -> Result<(), RunError> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits until it stops by itself.
    pub fn wait(mut self) -> Result<(), RunError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), RunError> {
        let result = match self.data.take() {
            Some(d) => d.join().unwrap_or(Err(RunError::Panicked)),
            None => Ok(()),
        };
        // The data path has stopped (by request or by itself): the replication goes too,
        // syncing what it appended.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.replication.take() {
            let _ = r.join();
        }
        if let Some(t) = self.tcp_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.verbs_subscribers.take() {
            let _ = t.join();
        }
        if std::mem::take(&mut self.recorded) {
            record_slot(&self.pool, self.slot, None, None);
        }
        self.hb_stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            if let (Err(_), Ok(Err(why))) = (&result, h.join()) {
                return Err(RunError::Membership(why));
            }
        }
        result
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.join();
    }
}

/// What the TCP frontend's thread runs.
struct TcpGo<'a> {
    pool: &'a Pool,
    slot: u32,
    listener: TcpListener,
    cfg: embar_dataplane::tcp::frontend::FrontendConfig,
    dpdk: Option<embar_dataplane::tcp::frontend::DpdkFrontendConfig>,
    stop: &'a AtomicBool,
    /// Its counters go into the broker's metrics (the data path's thread keeps them).
    stats: &'a Mutex<BrokerSnapshot>,
}

impl CoherenceFn<Result<(), embar_dataplane::tcp::frontend::FrontendError>> for TcpGo<'_> {
    fn call<C: Coherence>(self, c: C) -> Result<(), embar_dataplane::tcp::frontend::FrontendError> {
        embar_dataplane::tcp::frontend::run(
            self.pool,
            c,
            self.slot,
            self.listener,
            self.cfg,
            self.dpdk,
            self.stop,
            &mut |f| {
                if let Ok(mut g) = self.stats.lock() {
                    g.tcp = TcpSnapshot {
                        sessions_open: f.sessions_open,
                        sessions_opened: f.sessions_opened,
                        sessions_refused: f.sessions_refused,
                        sessions_dropped: f.sessions_dropped,
                        batches_received: f.batches_received,
                        bytes_received: f.bytes_received,
                        subscribers_opened: f.subscribers_opened,
                    };
                    g.dpdk = f.dpdk;
                }
            },
        )
    }
}

/// What the data-path thread needs.
struct Serve {
    slot: u32,
    cfg: BrokerConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<BrokerSnapshot>>,
    run_sequencer: Arc<AtomicBool>,
    verbs: Option<VerbsPort>,
}

struct Go<'a>(&'a Pool, Serve);

impl CoherenceFn<Result<(), RunError>> for Go<'_> {
    fn call<C: Coherence>(self, c: C) -> Result<(), RunError> {
        let Go(pool, s) = self;
        if let Some(cpu) = s.cfg.pin_cpu {
            if let Err(e) = embar_sys::cpu::pin_current_thread(cpu) {
                log::warn!("{e}; running unpinned");
            }
        }
        let opts = DriverOptions {
            retention_bytes: s.cfg.retention_bytes,
        };
        #[allow(unused_mut)]
        let mut driver = Driver::new(pool, c, s.slot, opts)?;
        #[cfg(feature = "verbs")]
        if let Some(v) = s.verbs {
            driver = driver.with_verbs(v.listener, v.ctx, v.subscribers)?;
        }
        #[cfg(not(feature = "verbs"))]
        let _ = s.verbs;
        // On a host with few cores every polling thread beyond the cores costs a scheduler
        // time slice of latency: the sequencers run in the driver's loop instead.
        let inline = embar_sys::cpu::available_cpus() <= 2;
        let bell = pool.broker_doorbell(s.slot).map_err(DriverError::from)?;
        let seq_stop = AtomicBool::new(false);
        // A word an earlier process of this slot left set (it died sequencing) is cleared.
        pool.set_broker_sequencing(c, s.slot, false)
            .map_err(DriverError::from)?;
        let ran = std::thread::scope(|scope| {
            let mut seq_thread = None;
            let mut idle = Idle::new(IdlePolicy::default());
            let mut last = Instant::now();
            while !s.stop.load(Ordering::Relaxed) {
                let want = s.run_sequencer.load(Ordering::Relaxed);
                let running = driver.sequencing() || seq_thread.is_some();
                if want && !running {
                    log::info!("running the sequencer of every topic");
                    if inline {
                        driver.sequence_here(true);
                    } else {
                        seq_stop.store(false, Ordering::Relaxed);
                        let (stops, pin) = ([&*s.stop, &seq_stop], s.cfg.pin_cpu.map(|p| p + 1));
                        seq_thread = Some(scope.spawn(move || sequence_all(pool, c, stops, pin)));
                    }
                    // Publishers send small batches here (`Publisher`, "Where a batch goes").
                    pool.set_broker_sequencing(c, s.slot, true)
                        .map_err(DriverError::from)?;
                } else if !want && running {
                    log::info!("stopping the sequencer");
                    pool.set_broker_sequencing(c, s.slot, false)
                        .map_err(DriverError::from)?;
                    driver.sequence_here(false);
                    seq_stop.store(true, Ordering::Relaxed);
                    if let Some(t) = seq_thread.take() {
                        let _ = t.join();
                    }
                }
                let work = driver.poll_once()?;
                if work > 0 {
                    // Batches this round published are work for a parked sequencer.
                    pool.ring_sequencers();
                }
                if let Some(rest) = idle.step(work) {
                    if driver.broker().awaiting_decisions() || driver.has_unrung_sources() {
                        // Decisions, and verbs publishers' batches, come without a ring: look
                        // again soon.
                        std::thread::sleep(rest);
                    } else {
                        let park = Park::prepare(bell, driver.sequencing());
                        // Work that came before the flag was visible is found here; any later
                        // is rung.
                        let late = driver.poll_once()?;
                        if late == 0 {
                            park.wait(PARK_MAX);
                        } else {
                            drop(park);
                            pool.ring_sequencers();
                            idle.step(late);
                        }
                    }
                }
                if last.elapsed() > Duration::from_millis(100) {
                    last = Instant::now();
                    // A pool file truncated under the cluster: stop with that error before the
                    // loop touches the missing part (which the bus error handler names).
                    pool.check_backing().map_err(DriverError::from)?;
                    if let Ok(mut g) = s.stats.lock() {
                        // The TCP (and DPDK) frontend's counters are its thread's to write.
                        *g = BrokerSnapshot {
                            tcp: g.tcp,
                            dpdk: g.dpdk,
                            ..driver.snapshot()
                        };
                    }
                }
            }
            s.stop.store(true, Ordering::Relaxed);
            Ok(())
        })
        .inspect_err(|_| s.stop.store(true, Ordering::Relaxed));
        // However the loop ended (a stop, or an error of its own), it runs no sequencer now.
        let _ = pool.set_broker_sequencing(c, s.slot, false);
        ran
    }
}

/// The verbs port of a broker: its listener and device, opened before registering so that a
/// missing device is an error at start.
#[cfg(feature = "verbs")]
struct VerbsPort {
    listener: TcpListener,
    ctx: Arc<embar_sys::verbs::Context>,
    /// Where the verbs frontend hands the subscribers that connect to its port.
    subscribers:
        Option<std::sync::mpsc::Sender<embar_dataplane::remote_subscriber::SubscriberConn>>,
}
#[cfg(not(feature = "verbs"))]
type VerbsPort = std::convert::Infallible;

#[cfg(feature = "verbs")]
fn open_verbs(v: Option<&VerbsConfig>) -> Result<Option<VerbsPort>, StartError> {
    let Some(v) = v else { return Ok(None) };
    if v.addr.ip().is_unspecified() {
        return Err(StartError::VerbsWildcard(v.addr));
    }
    let ctx = embar_sys::verbs::Context::open(v.device.as_deref(), v.gid_index)?;
    let listener = TcpListener::bind(v.addr).map_err(|source| StartError::Listen {
        addr: v.addr,
        source,
    })?;
    log::info!(
        "verbs publishers connect to {} (device {})",
        listener.local_addr().map_or(v.addr, |a| a),
        ctx.name()
    );
    Ok(Some(VerbsPort {
        listener,
        ctx,
        subscribers: None,
    }))
}

/// Starts the thread that serves the verbs subscribers of the verbs port (each on a
/// thread of its own, with the TCP frontend's idle timeout and subscriber limit).
#[cfg(feature = "verbs")]
fn serve_verbs_subscribers(
    verbs: &mut Option<VerbsPort>,
    pool: &Arc<Pool>,
    slot: u32,
    limits: embar_dataplane::tcp::frontend::FrontendConfig,
    stop: &Arc<AtomicBool>,
) -> Result<Option<JoinHandle<()>>, StartError> {
    let Some(v) = verbs.as_mut() else {
        return Ok(None);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    v.subscribers = Some(tx);
    let (pool, stop, ctx) = (pool.clone(), stop.clone(), v.ctx.clone());
    let cfg = embar_dataplane::verbs::subscriber::ServeConfig {
        idle_timeout: limits.idle_timeout,
        max_subscribers: limits.max_subscribers,
    };
    std::thread::Builder::new()
        .name("broker-verbs-sub".into())
        .spawn(move || {
            let go = VerbsSubGo {
                pool: &pool,
                slot,
                ctx: &ctx,
                incoming: rx,
                cfg,
                stop: &stop,
            };
            Pool::with_coherence(pool.coherence_mode(), go);
        })
        .map(Some)
        .map_err(StartError::Thread)
}

#[cfg(not(feature = "verbs"))]
fn serve_verbs_subscribers(
    _: &mut Option<VerbsPort>,
    _: &Arc<Pool>,
    _: u32,
    _: embar_dataplane::tcp::frontend::FrontendConfig,
    _: &Arc<AtomicBool>,
) -> Result<Option<JoinHandle<()>>, StartError> {
    Ok(None)
}

/// What the verbs subscribers' thread runs.
#[cfg(feature = "verbs")]
struct VerbsSubGo<'a> {
    pool: &'a Pool,
    slot: u32,
    ctx: &'a Arc<embar_sys::verbs::Context>,
    incoming: std::sync::mpsc::Receiver<embar_dataplane::remote_subscriber::SubscriberConn>,
    cfg: embar_dataplane::verbs::subscriber::ServeConfig,
    stop: &'a AtomicBool,
}

#[cfg(feature = "verbs")]
impl CoherenceFn<()> for VerbsSubGo<'_> {
    fn call<C: Coherence>(self, c: C) {
        embar_dataplane::verbs::subscriber::run(
            self.pool,
            c,
            self.slot,
            self.ctx,
            self.incoming,
            self.cfg,
            self.stop,
        )
    }
}

#[cfg(not(feature = "verbs"))]
fn open_verbs(v: Option<&VerbsConfig>) -> Result<Option<VerbsPort>, StartError> {
    match v {
        None => Ok(None),
        Some(_) => Err(StartError::NoVerbs),
    }
}

#[cfg(feature = "verbs")]
fn verbs_addr(v: &Option<VerbsPort>) -> Option<SocketAddr> {
    v.as_ref().and_then(|v| v.listener.local_addr().ok())
}

#[cfg(not(feature = "verbs"))]
fn verbs_addr(_: &Option<VerbsPort>) -> Option<SocketAddr> {
    None
}
