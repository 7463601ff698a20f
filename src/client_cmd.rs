//! `embar publish` and `embar subscribe`: flags in, calls of the client library
//! (`embar-client`) out. The control process is found as the library finds it when
//! `--control` is not given: `$EMBAR_CONTROL`, else the directory of `embar cluster up`
//! (`$EMBAR_CLUSTER_DIR`, else /tmp/embar-cluster), else 127.0.0.1:7400.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use embar_client::{Client, ClientBuilder, ErrorKind, StartAt, Transport};
use embar_dataplane::client::publisher::{Publisher, PublisherConfig};
use embar_dataplane::client::Publish;
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, OpenOptions, Pool};

use crate::exit::{CliError, CliResult, ExitKind};

/// The library's errors, by kind; the layers' own errors as `exit` classifies them.
impl From<embar_client::Error> for CliError {
    fn from(e: embar_client::Error) -> CliError {
        use embar_client::Error as E;
        let kind = match &e {
            E::Publish(_) | E::Pool(_) => {
                return match e {
                    E::Publish(p) => p.into(),
                    E::Pool(p) => p.into(),
                    _ => unreachable!("matched above"),
                }
            }
            E::InvalidInput { .. } | E::Unsupported(_) => ExitKind::Usage,
            e => match e.kind() {
                ErrorKind::NotFound => ExitKind::NotFound,
                ErrorKind::Unavailable => ExitKind::Unavailable,
                ErrorKind::TimedOut => ExitKind::TimedOut,
                ErrorKind::InvalidInput | ErrorKind::Rejected | ErrorKind::FellBehind => {
                    ExitKind::DataError
                }
                _ => ExitKind::Failure,
            },
        };
        CliError::new(kind, e)
    }
}

/// A client of the control process at `control`, or of the one discovery finds.
pub fn connect(control: Option<SocketAddr>, b: ClientBuilder) -> CliResult<Client> {
    let b = match control {
        Some(c) => b.control(c)?,
        None => b,
    };
    Ok(b.connect()?)
}

/// The control process's address: `control`, or the one discovery finds.
pub fn control_addr(control: Option<SocketAddr>) -> CliResult<SocketAddr> {
    match control {
        Some(c) => Ok(c),
        None => Ok(embar_client::ControlAddr::discover()?.addr),
    }
}

/// The pool path and the pool slots of the live brokers, from the control process.
pub fn discover(control: SocketAddr) -> CliResult<(PathBuf, Vec<u32>)> {
    let client = connect(Some(control), Client::builder())?;
    let brokers: Vec<u32> = client.live_brokers()?.iter().map(|b| b.slot).collect();
    if brokers.is_empty() {
        return Err(embar_client::Error::NoLiveBroker.into());
    }
    Ok((client.pool_path().to_path_buf(), brokers))
}

/// `(pool slot, verbs address)` of every live broker that accepts verbs publishers.
#[cfg(feature = "verbs")]
pub fn discover_verbs(control: SocketAddr) -> CliResult<Vec<(u32, SocketAddr)>> {
    let client = connect(Some(control), Client::builder())?;
    let brokers: Vec<(u32, SocketAddr)> = client
        .live_brokers()?
        .into_iter()
        .filter_map(|b| Some((b.slot, b.verbs?)))
        .collect();
    if brokers.is_empty() {
        return Err(embar_client::Error::NoVerbsBroker.into());
    }
    Ok(brokers)
}

/// Maps the pool with every page faulted in, so the data path takes no page fault.
pub fn open_pool(path: &std::path::Path) -> CliResult<Pool> {
    Ok(Pool::open(
        path,
        &OpenOptions {
            populate: true,
            ..Default::default()
        },
    )?)
}

/// A client id for this publisher: random, so two publishers never share one.
pub fn new_client_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        >> 1
}

#[derive(Clone, Debug, clap::Args)]
pub struct PublishArgs {
    #[arg(long)]
    pub topic: String,
    /// The control process (default: $EMBAR_CONTROL, else the cluster of `embar cluster
    /// up` in $EMBAR_CLUSTER_DIR or /tmp/embar-cluster, else 127.0.0.1:7400).
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// How long to wait for the acks of everything published.
    #[arg(long, default_value_t = 30)]
    pub ack_timeout_s: u64,
    /// Longest wait for log space or a broker before giving up.
    #[arg(long, default_value_t = 30)]
    pub wait_timeout_s: u64,
    /// Read and check the whole input (UTF-8, every line fits a batch) before publishing
    /// any of it: a bad line then publishes nothing. The input is held in memory.
    #[arg(long)]
    pub validate_first: bool,
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// How a publisher reaches its brokers.
#[derive(Clone, Debug, clap::Args)]
pub struct TransportArgs {
    /// `shm` (on the pool host: store into the pool) or `verbs` (RDMA writes into
    /// broker-registered grants; brokers started with --verbs; a build with --features verbs).
    #[arg(long, default_value = "shm", value_parser = ["shm", "verbs"])]
    pub transport: String,
    /// verbs: RDMA device (default: $RDMA_DEVICE, else the first).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// verbs: GID index (default: $RDMA_GID_INDEX, else 1).
    #[arg(long)]
    pub gid_index: Option<u8>,
}

impl TransportArgs {
    pub fn verbs(&self) -> bool {
        self.transport == "verbs"
    }

    pub fn rdma_device(&self) -> Option<String> {
        self.rdma_device
            .clone()
            .or_else(|| std::env::var("RDMA_DEVICE").ok())
    }

    pub fn gid_index(&self) -> u8 {
        self.gid_index
            .or_else(|| std::env::var("RDMA_GID_INDEX").ok()?.parse().ok())
            .unwrap_or(1)
    }

    /// The library's transport for these flags.
    pub fn client_transport(&self) -> CliResult<Transport> {
        if !self.verbs() {
            return Ok(Transport::Shm);
        }
        if !cfg!(feature = "verbs") {
            return Err(CliError::usage(crate::NO_VERBS));
        }
        Ok(Transport::Verbs {
            device: self.rdma_device(),
            gid_index: Some(self.gid_index()),
        })
    }

    /// A verbs publisher for `topic` on every live verbs broker.
    #[cfg(feature = "verbs")]
    pub fn verbs_publisher(
        &self,
        control: SocketAddr,
        topic: &str,
        cfg: PublisherConfig,
    ) -> CliResult<embar_dataplane::verbs::publisher::VerbsPublisher> {
        use embar_dataplane::verbs::publisher::{VerbsConfig, VerbsPublisher};
        let brokers = discover_verbs(control)?;
        let vc = VerbsConfig {
            device: self.rdma_device(),
            gid_index: self.gid_index(),
            publisher: cfg,
        };
        Ok(VerbsPublisher::connect(
            &brokers,
            topic,
            new_client_id(),
            &vc,
        )?)
    }
}

/// Publishes each line of stdin as one message; succeeds only when all are acked per the
/// topic's ACK level.
pub fn publish(a: &PublishArgs) -> CliResult<()> {
    let b = Client::builder()
        .transport(a.transport.client_transport()?)
        .wait_timeout(Duration::from_secs(a.wait_timeout_s))
        .ack_timeout(Duration::from_secs(a.ack_timeout_s));
    let client = connect(a.control, b)?;
    let mut p = client.publisher(&a.topic)?;
    publish_lines(&mut p, a)
}

/// Publishes each line of stdin; returns once all are acked.
fn publish_lines(p: &mut embar_client::Publisher, a: &PublishArgs) -> CliResult<()> {
    // Lines come from a reader thread, so that a batch still lingers out (is sealed and
    // sent) while stdin is quiet, as an interactive producer expects.
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<String>>(4096);
    if a.validate_first {
        let checked = read_checked(p)?;
        std::thread::spawn(move || {
            for line in checked {
                if tx.send(Ok(line)).is_err() {
                    break;
                }
            }
        });
    } else {
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut n = 0u64;
    let fed: CliResult<()> = loop {
        // Wake when the open batch's linger runs out, to seal and send it.
        let wait = p.linger_remaining().unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(line) => {
                let line = match line {
                    Ok(l) => l,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        break Err(CliError::data(format!(
                            "stdin line {}: not UTF-8 text ({e})",
                            n + 1
                        )))
                    }
                    Err(e) => break Err(CliError::from(format!("cannot read stdin: {e}"))),
                };
                if let Err(e) = p.publish(line.as_bytes()) {
                    break Err(CliError::from(e).context(format_args!("stdin line {}", n + 1)));
                }
                n += 1;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = p.poll() {
                    break Err(e.into());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        }
    };
    if let Err(e) = fed {
        // Say how far it got, so that a retry resends only what was not acknowledged.
        let so_far = match p.wait_acks() {
            Ok(k) => format!("{k} acknowledged"),
            Err(w) => format!("acknowledgements not complete: {w}"),
        };
        return Err(CliError {
            kind: e.kind,
            message: format!(
                "{}; lines 1..={n} before it were published ({so_far}); nothing after it was; to go on, resend from line {}",
                e.message,
                n + 1
            ),
        });
    }
    let acked = p.wait_acks()?;
    eprintln!(
        "published {n} messages to {:?}, {acked} acknowledged",
        a.topic
    );
    Ok(())
}

/// Every line of stdin, once all are checked (UTF-8 text, each fits a batch of the topic);
/// the first bad line is an error and nothing is published.
fn read_checked(p: &embar_client::Publisher) -> CliResult<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let nothing = "nothing was published (--validate-first)";
        let line = match line {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(CliError::data(format!(
                    "stdin line {}: not UTF-8 text ({e}); {nothing}",
                    i + 1
                )))
            }
            Err(e) => return Err(CliError::from(format!("cannot read stdin: {e}"))),
        };
        if let Err(e) = p.check_size(line.len()) {
            let e = CliError::from(e).context(format_args!("stdin line {}", i + 1));
            return Err(CliError {
                message: format!("{}; {nothing}", e.message),
                ..e
            });
        }
        out.push(line);
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Jsonl,
}

#[derive(Clone, Debug, clap::Args)]
pub struct SubscribeArgs {
    #[arg(long)]
    pub topic: String,
    /// The control process (default: as for `embar publish`).
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// `oldest`, `latest`, or a total order.
    #[arg(long, default_value = "oldest")]
    pub from: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Stop when no message arrives for this long (default: wait forever).
    #[arg(long)]
    pub idle_timeout_s: Option<u64>,
    /// Register, then wait this long before reading (holds log space: for tests of
    /// backpressure).
    #[arg(long, hide = true)]
    pub pause_ms: Option<u64>,
    /// Only messages durable on every broker of their batch's replica set (synced to disk,
    /// as ACK 2 waits for); waits at the first that is not yet.
    #[arg(long)]
    pub durable_only: bool,
}

pub fn subscribe(a: &SubscribeArgs) -> CliResult<()> {
    let start = match a.from.as_str() {
        "oldest" => StartAt::Oldest,
        "latest" => StartAt::Latest,
        n => StartAt::TotalOrder(n.parse().map_err(|_| {
            CliError::usage(format!("--from {n:?}: expected oldest, latest or a number"))
        })?),
    };
    let client = connect(a.control, Client::builder())?;
    let mut sub = client.subscriber(&a.topic, start)?;
    sub.set_durable_only(a.durable_only);
    if let Some(ms) = a.pause_ms {
        eprintln!(
            "subscriber registered at delivery index {}; pausing {ms} ms",
            sub.position()
        );
        std::thread::sleep(Duration::from_millis(ms));
    }
    let stop = embar_sys::signal::stop_on_term();
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut printed = 0u64;
    let limit = a.count.unwrap_or(u64::MAX);
    let mut last = Instant::now();
    let mut err = None;
    while printed < limit && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let n = sub.poll(1, |m| {
            if printed >= limit || err.is_some() {
                return;
            }
            let r = match a.format {
                Format::Text => out.write_all(m.payload).and_then(|()| out.write_all(b"\n")),
                Format::Jsonl => writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "total_order": m.total_order,
                        "client_id": m.client_id,
                        "batch_seq": m.batch_seq,
                        "index": m.index,
                        "size": m.payload.len(),
                        "payload": String::from_utf8_lossy(m.payload),
                    })
                ),
            };
            if let Err(e) = r {
                err = Some(e);
            }
            printed += 1;
        })?;
        if let Some(e) = err.take() {
            return Err(format!("cannot write to stdout: {e}").into());
        }
        if n > 0 {
            last = Instant::now();
            continue;
        }
        let _ = out.flush();
        if a.idle_timeout_s
            .is_some_and(|t| last.elapsed() > Duration::from_secs(t))
        {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    out.flush()
        .map_err(|e| format!("cannot write to stdout: {e}").into())
}

#[derive(Clone, Debug, clap::Args)]
pub struct RogueArgs {
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// What the rogue batch does wrong: metadata, outside-grant, past-grant, bad-size,
    /// huge-size, wrong-client (its descriptor); message-size-max, message-past-batch (a
    /// valid descriptor, a bad first message header); ready-word, submitted-ahead,
    /// grants-taken-ahead (a word of its session); with `--transport verbs` also write-past-grant (an RDMA write past the
    /// end of its grant), bad-immediate, unknown-grant (a descriptor naming space outside its
    /// grants), vanish (writes half a batch, then exits).
    #[arg(long)]
    pub fault: String,
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// A publisher that sends good messages, then one batch descriptor that breaks the rules,
/// and reports what its broker answered.
pub fn rogue_publish(a: &RogueArgs) -> Result<(), String> {
    use embar_dataplane::batch::BatchDesc;
    if a.transport.verbs() {
        #[cfg(feature = "verbs")]
        return rogue_verbs(a);
        #[cfg(not(feature = "verbs"))]
        return Err(crate::NO_VERBS.into());
    }
    use embar_dataplane::pool::layout::BATCH_HEADER_VERSION;
    let (path, brokers) = discover(control_addr(a.control)?)?;
    let pool = open_pool(&path)?;
    struct Go<'a>(&'a Pool, &'a RogueArgs, &'a [u32]);
    impl CoherenceFn<Result<(), String>> for Go<'_> {
        fn call<C: Coherence>(self, c: C) -> Result<(), String> {
            let Go(pool, a, brokers) = self;
            let mut p = Publisher::open(
                pool,
                c,
                &a.topic,
                &brokers[..1],
                new_client_id(),
                PublisherConfig::default(),
            )
            .map_err(|e| e.to_string())?;
            publish_good(&mut p)?;
            let (offset, bytes, used) = p.grant(0).ok_or("no grant")?;
            let good = BatchDesc {
                batch_seq: 1,
                client_id: p.client_id(),
                num_msg: 1,
                broker_id: brokers[0],
                total_size: 64,
                log_idx: offset + used,
                start_logical_offset: 0,
                version_flags: u64::from(BATCH_HEADER_VERSION),
            };
            if let Some(word) = session_word_fault(pool, c, brokers[0], p.client_id(), &a.fault)? {
                eprintln!("rogue: wrote {word}");
                report_rogue(&mut p);
                return Ok(());
            }
            let bad = match a.fault.as_str() {
                // Pool metadata: fails the descriptor's bounds check.
                "metadata" => BatchDesc {
                    log_idx: pool.geometry().ring_region_offset,
                    ..good
                },
                // Log space this session was never granted: a free segment.
                "outside-grant" => {
                    let free = (0..pool.geometry().segment_count)
                        .find(|i| pool.segment_owner(c, *i).is_none())
                        .ok_or("no free segment to aim at")?;
                    BatchDesc {
                        log_idx: pool.geometry().segment_offset(free),
                        ..good
                    }
                }
                "past-grant" => BatchDesc {
                    log_idx: offset + bytes - 64,
                    total_size: 128,
                    ..good
                },
                "bad-size" => BatchDesc {
                    num_msg: 4,
                    total_size: 64,
                    ..good
                },
                "huge-size" => BatchDesc {
                    total_size: 1 << 40,
                    ..good
                },
                // A valid descriptor; its first message says 4 GiB.
                "message-size-max" => {
                    write_rogue_header(pool, &good, u32::MAX)?;
                    BatchDesc {
                        num_msg: 4,
                        total_size: 256,
                        ..good
                    }
                }
                // A valid descriptor; its only message runs past the batch's 128 bytes.
                "message-past-batch" => {
                    write_rogue_header(pool, &good, 200)?;
                    BatchDesc {
                        total_size: 128,
                        ..good
                    }
                }
                "wrong-client" => BatchDesc {
                    client_id: p.client_id() ^ 1,
                    ..good
                },
                other => return Err(format!("unknown fault {other:?}")),
            };
            p.submit_unchecked(0, &bad).map_err(|e| e.to_string())?;
            report_rogue(&mut p);
            Ok(())
        }
    }
    Pool::with_coherence(pool.coherence_mode(), Go(&pool, a, &brokers))
}

/// Writes a message header of `size` payload bytes at the start of `good`'s range (the
/// rogue's own grant, past its acknowledged batches).
fn write_rogue_header(
    pool: &Pool,
    good: &embar_dataplane::batch::BatchDesc,
    size: u32,
) -> Result<(), String> {
    use embar_dataplane::pool::layout::MessageHeader;
    let dst = pool.data_ptr(good.log_idx, 64).map_err(|e| e.to_string())?;
    let h = MessageHeader {
        size,
        client_id: good.client_id,
        batch_seq: good.batch_seq,
        ..MessageHeader::default()
    };
    // SAFETY: 64 bytes of this process's own grant, bounds-checked by `data_ptr`, 64-byte
    // aligned (grants and batch ends are); no other process reads them before a submission.
    unsafe { dst.cast::<MessageHeader>().write(h) };
    Ok(())
}

/// The session-word faults: stores garbage into a word of the rogue's own session on broker
/// slot `broker` (`None` for any other fault). Says what it wrote.
fn session_word_fault<C: Coherence>(
    pool: &Pool,
    c: C,
    broker: u32,
    client_id: u64,
    fault: &str,
) -> Result<Option<String>, String> {
    use embar_dataplane::session::SESSIONS;
    use std::sync::atomic::Ordering::Relaxed;
    if !matches!(
        fault,
        "ready-word" | "submitted-ahead" | "grants-taken-ahead"
    ) {
        return Ok(None);
    }
    let pid = embar_sys::process::ProcessId::current().pack();
    let s = (0..SESSIONS)
        .filter_map(|i| pool.session(broker, i).ok())
        .find(|s| s.client_id.load(Relaxed) == client_id && s.pid.load(Relaxed) == pid)
        .ok_or("the rogue's own session is not in the pool")?;
    let next = s.submitted.load(Relaxed);
    Ok(Some(match fault {
        "ready-word" => {
            let slot = (next % s.submissions.len() as u64) as usize;
            c.publish(&s.submissions[slot].ready, 999);
            format!("ready=999 into submission slot {slot}")
        }
        "submitted-ahead" => {
            c.publish(&s.submitted, next + (1 << 40));
            format!("submitted={}", next + (1 << 40))
        }
        _ => {
            let taken = s.grants_taken.load(Relaxed);
            c.publish(&s.grants_taken, taken + (1 << 40));
            format!("grants_taken={}", taken + (1 << 40))
        }
    }))
}

/// A rogue publisher's honest start: ten good messages, acknowledged (its grant is taken).
fn publish_good(p: &mut impl Publish) -> Result<(), String> {
    for i in 0..10 {
        p.publish(format!("good {i}").as_bytes())
            .map_err(|e| e.to_string())?;
    }
    p.wait_acks(Duration::from_secs(10))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Reports how a rogue publisher's session ended: `{"rejected": bool, "error": ...}`.
fn report_rogue(p: &mut impl Publish) {
    let start = Instant::now();
    loop {
        match p.acked() {
            Err(e) => {
                println!(
                    "{}",
                    serde_json::json!({ "rejected": true, "error": e.to_string() })
                );
                return;
            }
            Ok(_) if start.elapsed() > Duration::from_secs(10) => {
                println!("{}", serde_json::json!({ "rejected": false }));
                return;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The verbs transport's rogue publishers (see `RogueArgs::fault`).
#[cfg(feature = "verbs")]
fn rogue_verbs(a: &RogueArgs) -> Result<(), String> {
    use embar_dataplane::batch::BatchDesc;
    use embar_dataplane::pool::layout::BATCH_HEADER_VERSION;
    let mut p = a.transport.verbs_publisher(
        control_addr(a.control)?,
        &a.topic,
        PublisherConfig::default(),
    )?;
    publish_good(&mut p)?;
    let (offset, bytes, used) = p.grant(0).ok_or("no grant")?;
    match a.fault.as_str() {
        // Straddles the end of the grant by 64 bytes: the NIC refuses it.
        "write-past-grant" => p
            .write_unchecked(0, bytes - 256, 320)
            .map_err(|e| e.to_string())?,
        "bad-immediate" | "unknown-grant" => {
            let broker = discover_verbs(control_addr(a.control)?)?[0].0;
            let mut desc = BatchDesc {
                batch_seq: 1,
                client_id: p.client_id(),
                num_msg: 1,
                broker_id: broker,
                total_size: 64,
                log_idx: offset + used,
                start_logical_offset: 0,
                version_flags: u64::from(BATCH_HEADER_VERSION),
            };
            let imm = if a.fault == "bad-immediate" {
                1_000_000
            } else {
                // The right slot, naming log space that is not free space of a grant of
                // this session: the start of its grant, where its good batches are.
                desc.log_idx = offset;
                p.next_slot(0).ok_or("no link")?
            };
            p.signal_unchecked(0, imm, &desc)
                .map_err(|e| e.to_string())?;
        }
        "vanish" => {
            // Half a batch lands in the grant, its descriptor never does.
            p.write_unchecked(0, used, 4096)
                .map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(200));
            println!("{}", serde_json::json!({ "vanished": true }));
            std::process::exit(0);
        }
        other => return Err(format!("unknown verbs fault {other:?}")),
    }
    report_rogue(&mut p);
    Ok(())
}
