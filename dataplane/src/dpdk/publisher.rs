//! The publisher's side of the DPDK transport: one session's link to one broker
//! ([`DpdkWire`]). The TCP publisher ([`crate::tcp::publisher::TcpPublisher::connect_dpdk`])
//! uses it in place of a socket for its batches; batching, the window of unacknowledged
//! batches and failover to another broker are the TCP publisher's.
//!
//! A memif wire has a port of its own, a memif server that the broker's poll loop attaches
//! to (`link=memif:`). Wires on a shared Ethernet segment (`link=mac:`) share one port per
//! process and device: two af_packet sockets of one process on one interface would join one
//! packet fan-out group and split the acks between them, and a NIC port is one per host
//! anyway; acks read by one wire for another wait in the port's mailbox. Batches are cut
//! into frames of the size the broker announced and sent as the window ([`super::link`])
//! allows; acks bring the frame window and the session's counters.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use embar_sys::clock::monotonic_ns;
use embar_sys::dpdk::{self, MbufPool, Port, RxBurst, TxBurst};

use super::link::{FrameRef, Sender, Timing};
use super::*;
use crate::client::publisher::PublishError;
use crate::tcp::AckFrame;
use crate::verbs::field;

/// Largest frame a publisher sends or takes (a jumbo frame).
pub const MAX_FRAME_BYTES: u32 = 9216;

/// How a publisher reaches its brokers over DPDK.
#[derive(Clone, Debug)]
pub struct DpdkLinkConfig {
    /// DPDK environment (EAL) options (the first publisher of the process starts it).
    pub eal_args: Vec<String>,
    pub link: LinkKind,
    /// Largest frame it sends (the broker's limit applies too).
    pub frame_bytes: u32,
    /// Test aid: drop every Nth data frame sent for the first time (0: none), as a lossy
    /// link would.
    pub drop_every: u32,
    /// Test aid: flip a byte of every Nth data frame sent for the first time (0: none).
    pub corrupt_every: u32,
}

/// The kind of link to the broker.
#[derive(Clone, Debug)]
pub enum LinkKind {
    /// A memif link per broker session: this process listens on a socket in `dir`.
    Memif { dir: PathBuf },
    /// A port on a shared segment (`net_af_packet0,iface=veth1`, a NIC); the name before
    /// the first comma gets a suffix per session.
    Port { devargs: String },
}

impl DpdkLinkConfig {
    /// memif links, sockets in the system's temporary directory, standard frames.
    pub fn memif() -> DpdkLinkConfig {
        DpdkLinkConfig {
            eal_args: dpdk::vdev_eal_args(256),
            link: LinkKind::Memif {
                dir: std::env::temp_dir(),
            },
            frame_bytes: DEFAULT_FRAME_BYTES,
            drop_every: 0,
            corrupt_every: 0,
        }
    }
}

static MBUFS: OnceLock<Result<MbufPool, String>> = OnceLock::new();

/// The process's pool of frame buffers for publishers (and the bench's link baseline):
/// 8191 buffers of [`MAX_FRAME_BYTES`], made on first use (DPDK started).
pub fn mbufs() -> Result<MbufPool, String> {
    MBUFS
        .get_or_init(|| MbufPool::new(8191, MAX_FRAME_BYTES).map_err(|e| e.to_string()))
        .clone()
}
/// Ports on shared segments, by device arguments.
static SHARED: Mutex<Vec<(String, Arc<SharedPort>)>> = Mutex::new(Vec::new());

/// Acks for a session: (next expected frame, window, counters).
type Mail = Vec<(u32, u32, AckFrame)>;

/// A port several wires of this process use; the lock is held for each receive or send.
struct SharedPort {
    port: Port,
    mail: Mutex<HashMap<u32, Mail>>,
}

enum WirePort {
    Own(Port),
    Shared(Arc<SharedPort>),
}

impl WirePort {
    fn port(&self) -> &Port {
        match self {
            WirePort::Own(p) => p,
            WirePort::Shared(s) => &s.port,
        }
    }
}

/// The shared port for `devargs`, attached on first use.
fn shared_port(devargs: &str, mbufs: MbufPool) -> Result<Arc<SharedPort>, dpdk::DpdkError> {
    let mut all = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = all.iter().find(|(d, _)| d == devargs) {
        return Ok(p.clone());
    }
    let port = Port::attach(devargs, mbufs, 256, 1024)?;
    let p = Arc::new(SharedPort {
        port,
        mail: Mutex::new(HashMap::new()),
    });
    all.push((devargs.to_string(), p.clone()));
    Ok(p)
}
static WIRES: AtomicU32 = AtomicU32::new(0);

/// One session's DPDK link to a broker.
pub struct DpdkWire {
    /// The TCP connection the session opened on: closing it ends the session.
    stream: TcpStream,
    port: Option<WirePort>,
    mbufs: MbufPool,
    mac: [u8; 6],
    broker_mac: [u8; 6],
    key: u32,
    payload_per_frame: u32,
    tx: Sender,
    acks: AckFrame,
    rx: RxBurst,
    drop_every: u32,
    corrupt_every: u32,
    data_frames: u64,
    last_check_ns: u64,
}

/// How often the session's TCP connection is looked at (the broker closes it when it ends
/// the session).
const LIFELINE_CHECK_NS: u64 = 10_000_000;

impl DpdkWire {
    /// Opens a session of `client_id` on `topic` with broker `broker` at `addr`: the port,
    /// then the handshake over TCP. Returns the wire, the largest batch and the ACK level.
    pub fn connect(
        broker: u32,
        addr: SocketAddr,
        topic: &str,
        client_id: u64,
        cfg: &DpdkLinkConfig,
        wait: Duration,
    ) -> Result<(DpdkWire, u64, u8), PublishError> {
        let failed = |why: String| PublishError::Transport(format!("broker {broker}: {why}"));
        dpdk::init(&cfg.eal_args).map_err(|e| failed(e.to_string()))?;
        let mbufs = mbufs().map_err(failed)?;
        let n = WIRES.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let (port, devargs, link) = match &cfg.link {
            LinkKind::Memif { dir } => {
                let socket = dir.join(format!("embar-{pid}-{n}.memif"));
                let _ = std::fs::remove_file(&socket);
                let s = socket.display().to_string();
                if s.contains(',') || s.contains(' ') {
                    return Err(failed(format!(
                        "a memif socket path without commas or spaces: {s:?}"
                    )));
                }
                let devargs =
                    dpdk::memif_devargs(&format!("net_memif_p{n}"), "server", &s, cfg.frame_bytes);
                let port =
                    Port::attach(&devargs, mbufs, 1024, 1024).map_err(|e| failed(e.to_string()))?;
                (WirePort::Own(port), devargs, format!("memif:{s}"))
            }
            LinkKind::Port { devargs } => {
                let p = shared_port(devargs, mbufs).map_err(|e| failed(e.to_string()))?;
                (WirePort::Shared(p), devargs.clone(), String::new())
            }
        };
        let mac = port.port().mac().map_err(|e| failed(e.to_string()))?;
        let link = if link.is_empty() {
            format!("mac:{}", format_mac(mac))
        } else {
            link
        };
        let hello = format!("{HELLO} topic={topic} client={client_id} link={link}");
        let (stream, batch_limit, ack, answer) =
            match crate::tcp::publisher::handshake(broker, addr, &hello, wait) {
                Ok(x) => x,
                Err(e) => {
                    if let WirePort::Own(p) = port {
                        let _ = p.detach();
                    }
                    return Err(e);
                }
            };
        let bad = |key: &str| failed(format!("bad answer \"OK {answer}\": {key}="));
        let num = |key: &str| -> Result<u64, PublishError> {
            field(&answer, key)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(key))
        };
        let key = u32::try_from(num("session")?).map_err(|_| bad("session"))?;
        let window = u32::try_from(num("window")?).map_err(|_| bad("window"))?;
        let frame_bytes = num("frame_bytes")?.min(u64::from(cfg.frame_bytes));
        let broker_mac = field(&answer, "mac")
            .ok()
            .and_then(parse_mac)
            .ok_or_else(|| bad("mac"))?;
        let overhead = (ETH_BYTES + Header::BYTES) as u64;
        if !(overhead + 64..=u64::from(MAX_FRAME_BYTES)).contains(&frame_bytes) {
            return Err(bad("frame_bytes"));
        }
        let began = Instant::now();
        while !port.port().link_up() {
            if began.elapsed() > wait {
                if let WirePort::Own(p) = port {
                    let _ = p.detach();
                }
                return Err(failed(format!("the DPDK link ({devargs}) did not come up")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let LinkKind::Memif { .. } = cfg.link {
            // Connected: the socket's path is not needed again (the listening socket stays
            // open), and a process that dies leaves no file behind.
            if let Some(path) = link.strip_prefix("memif:") {
                let _ = std::fs::remove_file(path);
            }
        }
        let _ = stream.set_nonblocking(true);
        // The poll loop of this wire runs on the publisher's thread.
        let _ = dpdk::register_thread();
        Ok((
            DpdkWire {
                stream,
                port: Some(port),
                mbufs,
                mac,
                broker_mac,
                key,
                payload_per_frame: (frame_bytes - overhead) as u32,
                tx: Sender::new(0, window.min(MAX_WINDOW), Timing::default()),
                acks: AckFrame::default(),
                rx: RxBurst::default(),
                drop_every: cfg.drop_every,
                corrupt_every: cfg.corrupt_every,
                data_frames: 0,
                last_check_ns: 0,
            },
            batch_limit,
            ack,
        ))
    }

    /// Queues a batch of `bytes` for sending (its bytes are read when its frames go out).
    pub fn queue(&mut self, batch_seq: u64, bytes: u32) {
        let mut offset = 0;
        while offset < bytes {
            let len = self.payload_per_frame.min(bytes - offset);
            self.tx.push(FrameRef {
                batch_seq,
                offset,
                len,
            });
            offset += len;
        }
    }

    /// The latest counters the broker sent.
    pub fn acks(&self) -> AckFrame {
        self.acks
    }

    /// Takes acks in, sends what the window allows (each frame's bytes from `batch`, by batch
    /// sequence number and the batch's header fields), resends on timeouts. An error when the
    /// session ended.
    pub fn pump<'a>(
        &mut self,
        batch: impl Fn(u64) -> Option<(&'a [u8], u32)>,
    ) -> Result<(), String> {
        let Some(wp) = self.port.as_ref() else {
            return Err("the DPDK link is down".into());
        };
        let port = wp.port();
        let mut mail = match wp {
            WirePort::Own(_) => None,
            WirePort::Shared(s) => Some(s.mail.lock().unwrap_or_else(|e| e.into_inner())),
        };
        let now = monotonic_ns();
        // Acks another wire of the process read for this one.
        if let Some(mine) = mail.as_mut().and_then(|m| m.remove(&self.key)) {
            for (seq, window, a) in mine {
                take_ack(&mut self.tx, &mut self.acks, seq, window, a, now);
            }
        }
        loop {
            let n = port.rx(&mut self.rx);
            for i in 0..n {
                let Ok(f) = self.rx.frame(i) else { continue };
                let Some((_, f)) = read_eth(f) else { continue };
                let Ok((h, payload)) = Header::read(f) else {
                    continue;
                };
                if h.kind != KIND_ACK || payload.len() < AckFrame::BYTES {
                    continue;
                }
                let Some(a) = AckFrame::decode(payload[..AckFrame::BYTES].try_into().expect("64"))
                else {
                    continue;
                };
                if h.session == self.key {
                    take_ack(&mut self.tx, &mut self.acks, h.seq, h.window, a, now);
                } else if let Some(m) = mail.as_mut() {
                    // Another wire's (at most a window's worth kept per session).
                    let q = m.entry(h.session).or_default();
                    if q.len() < MAX_WINDOW as usize {
                        q.push((h.seq, h.window, a));
                    }
                }
            }
            if n < dpdk::BURST {
                break;
            }
        }
        if self.acks.closed != 0 {
            return Err(format!(
                "the broker ended the session: {}",
                crate::tcp::describe_code(self.acks.closed)
            ));
        }
        self.tx.on_tick(now);
        let mut burst = TxBurst::default();
        // Sequence numbers of the frames in `burst`.
        let mut seqs = [0u32; dpdk::BURST];
        // Sends the burst; what the port did not take goes again next time (a full transmit
        // ring is back-pressure, not loss). Whether it took everything.
        let flush = |burst: &mut TxBurst, seqs: &[u32], tx: &mut Sender| {
            let n = burst.len();
            let took = burst.send(port);
            if took < n {
                tx.rewind_to(seqs[took]);
            }
            took == n
        };
        // A batch's frames go out one after another: its bytes are looked up once.
        let mut current: Option<(u64, &[u8], u32)> = None;
        while let Some((seq, f, again)) = self.tx.next(now) {
            if current.is_none_or(|(b, _, _)| b != f.batch_seq) {
                current = batch(f.batch_seq).map(|(bytes, n)| (f.batch_seq, bytes, n));
            }
            let Some((_, bytes, num_msg)) = current else {
                continue;
            };
            let h = Header {
                kind: KIND_DATA,
                len: 0, // set by push_frame
                session: self.key,
                seq,
                window: 0,
                batch_seq: f.batch_seq,
                batch_bytes: bytes.len() as u32,
                num_msg,
                offset: f.offset,
            };
            let payload = &bytes[f.offset as usize..(f.offset + f.len) as usize];
            // Injected faults hit first transmissions only: a resend that met the same fault
            // every time (a go-back resends a fixed run of frames) would never get through.
            if !again {
                self.data_frames += 1;
            }
            let k = self.data_frames;
            if !again && self.drop_every > 0 && k % u64::from(self.drop_every) == 0 {
                continue;
            }
            let corrupt =
                !again && self.corrupt_every > 0 && k % u64::from(self.corrupt_every) == 0;
            if burst.is_full() && !flush(&mut burst, &seqs, &mut self.tx) {
                self.tx.rewind_to(seq);
                break;
            }
            seqs[burst.len()] = seq;
            let pushed = push_frame(
                &mut burst,
                self.mbufs,
                self.broker_mac,
                self.mac,
                &h,
                payload,
                corrupt,
            )
            .map_err(|e| e.to_string())?;
            if !pushed {
                // No buffer free: it goes again next time.
                self.tx.rewind_to(seq);
                break;
            }
        }
        flush(&mut burst, &seqs, &mut self.tx);
        drop(mail);
        if now.saturating_sub(self.last_check_ns) < LIFELINE_CHECK_NS {
            return Ok(());
        }
        self.last_check_ns = now;
        let mut b = [0u8; 256];
        match std::io::Read::read(&mut &self.stream, &mut b) {
            Ok(0) => Err("the broker closed the session's connection".into()),
            Ok(n) => Err(String::from_utf8_lossy(&b[..n]).trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("the session's connection: {e}")),
        }
    }
}

/// Takes an ack for a wire: the frame window moves, and the counters, which may come
/// reordered or twice, only move forward.
fn take_ack(tx: &mut Sender, cur: &mut AckFrame, seq: u32, window: u32, a: AckFrame, now: u64) {
    let _ = tx.on_ack(seq, window.min(MAX_WINDOW), now).count();
    cur.batches_received = cur.batches_received.max(a.batches_received);
    cur.acked_messages = cur.acked_messages.max(a.acked_messages);
    cur.acked_batches = cur.acked_batches.max(a.acked_batches);
    if a.rejected_batches > cur.rejected_batches {
        cur.rejected_batches = a.rejected_batches;
        cur.error = a.error;
    }
    if a.closed != 0 {
        cur.closed = a.closed;
    }
    // The disk fault is a state, not a count: the latest word says it.
    cur.disk = a.disk;
}

impl Drop for DpdkWire {
    fn drop(&mut self) {
        // Goodbye, then the broker removes its side of a memif link first, and this side
        // waits for that before removing its own (both at once can crash DPDK 22.11's memif).
        let _ = self.stream.set_nonblocking(false);
        let _ = std::io::Write::write_all(&mut &self.stream, BYE.as_bytes());
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        match self.port.take() {
            Some(WirePort::Own(p)) => {
                let began = Instant::now();
                while p.link_up() && began.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = p.detach();
            }
            Some(WirePort::Shared(p)) => {
                p.mail
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&self.key);
            }
            None => {}
        }
    }
}
