//! The broker's side of the TCP transport: one thread per broker process serves every TCP
//! publisher and hands each TCP subscriber to a thread of its own (see [`super`]).
//!
//! Publishers are served by an event loop on `epoll` (through `mio`): many connections,
//! none blocking another, no thread per publisher. `epoll` rather than `io_uring`: the
//! receive goes straight into the pool with one `read(2)` per readable burst, so a ring of
//! submissions would save a syscall per burst, not a copy, and `io_uring` is often disabled
//! in containers and on hardened kernels where this must also run. Each publisher is a small
//! state machine:
//!
//! ```text
//! header (32 bytes) -> placing (waits for a grant with room) -> payload (read(2) into the
//! grant) -> ready (waits for room in the submission ring) -> header ...
//! ```
//!
//! A connection that waits is not read: TCP's own flow control then back-pressures the
//! publisher. One that stalls mid-frame past the idle timeout, sends a header that is not
//! one, closes mid-frame, or does not read its acks for the idle timeout is dropped with a
//! logged reason; its session is closed and the broker reclaims its grants (a batch it did
//! not finish is never submitted). Every other connection goes on.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use embar_sys::clock::monotonic_ns;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::*;
use crate::batch::BatchDesc;
use crate::idle::{Idle, IdlePolicy};
use crate::log_limit::LogLimit;
use crate::pool::coherence::Coherence;
use crate::pool::doorbell;
use crate::pool::layout::{BrokerDoorbell, Session, BATCH_HEADER_VERSION};
use crate::pool::Pool;
use crate::replication::DiskWatch;
use crate::ring::{RingError, RingProducer};
use crate::session::{
    self, answer, submission_ring, GrantCursor, SessionError, ACCEPTED, RELEASED,
};
use crate::sync::Ordering::Relaxed;
use crate::verbs::field;
use crate::warn_limited;

const LISTENER: Token = Token(usize::MAX);
/// Longest wait for a request line, and for the broker's answer to a session.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Send buffer of a connection (acks and a handshake line only; the kernel doubles it).
const ACK_SEND_BUFFER: usize = 16 << 10;
/// How often an idle loop wakes to check timeouts and sessions the broker ended.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// How the frontend treats its connections.
#[derive(Clone, Copy, Debug)]
pub struct FrontendConfig {
    /// A publisher that stalls mid-frame, or leaves its acks unread, this long is dropped;
    /// a subscriber that reads nothing for this long is dropped.
    pub idle_timeout: Duration,
    /// Connections (publishers, and handshakes under way) at most; more are refused.
    pub max_connections: usize,
    /// Subscriber connections at most (each has a thread).
    pub max_subscribers: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            idle_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_subscribers: 256,
        }
    }
}

/// Accept DPDK publishers (`docs/dpdk.md`; needs the `dpdk` feature): their sessions open
/// on this frontend's TCP port and are served by a poll-mode thread over DPDK ports.
#[derive(Clone, Debug)]
pub struct DpdkFrontendConfig {
    /// DPDK environment (EAL) options.
    pub eal_args: Vec<String>,
    /// A port on a shared Ethernet segment (device arguments, e.g.
    /// `net_af_packet0,iface=veth0`) for publishers that come with `link=mac:`; memif
    /// publishers each get a port of their own.
    pub port: Option<String>,
    /// Largest frame, Ethernet header included.
    pub frame_bytes: u32,
    /// A session half-way through a batch that receives nothing this long is dropped (the
    /// TCP frontend's idle timeout).
    pub idle_timeout: Duration,
}

/// A DPDK publisher's session, accepted by the broker, for the DPDK frontend to answer and
/// serve.
pub struct Handoff<'p> {
    pub stream: std::net::TcpStream,
    pub session: &'p Session,
    pub generation: u64,
    pub client_id: u64,
    /// The topic's slot.
    pub topic: u32,
    pub batch_limit: u64,
    pub ack: u8,
    /// The publisher's request line.
    pub line: String,
}

/// A session's counters as an ack carries them (`batches_received` is the frontend's, `disk`
/// the session's [`DiskWatch`] word).
pub fn counters<C: Coherence>(c: C, s: &Session, batches_received: u64, disk: u64) -> AckFrame {
    let rejected = c.observe(&s.rejected_batches);
    AckFrame {
        batches_received,
        acked_messages: c.observe(&s.acked_messages),
        acked_batches: s.acked_batches.load(Relaxed),
        rejected_batches: rejected,
        error: if rejected > 0 {
            s.error.load(Relaxed)
        } else {
            0
        },
        closed: 0,
        disk,
    }
}

/// Counters (the broker's `embar_broker_tcp_*` metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// Publisher sessions open now.
    pub sessions_open: u64,
    pub sessions_opened: u64,
    pub sessions_refused: u64,
    pub batches_received: u64,
    pub bytes_received: u64,
    /// Sessions dropped for a malformed, truncated or stalled frame or unread acks.
    pub sessions_dropped: u64,
    pub subscribers_opened: u64,
    /// The DPDK frontend's, if one runs.
    pub dpdk: DpdkCounters,
}

/// The DPDK frontend's counters (the broker's `embar_broker_dpdk_*` metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DpdkCounters {
    pub sessions_open: u64,
    pub sessions_opened: u64,
    pub sessions_dropped: u64,
    pub frames_received: u64,
    /// Frames that failed their checksum or were not whole.
    pub frames_bad: u64,
    pub frames_unknown_session: u64,
    /// Frames not taken: duplicates, out of order, or with no room for their batch.
    pub frames_not_taken: u64,
    pub batches_received: u64,
    /// Payload bytes copied from frame buffers into the pool.
    pub bytes_copied: u64,
}

pub use crate::remote_subscriber::SubscriberConn;

struct Hello {
    stream: TcpStream,
    buf: Vec<u8>,
    since_ns: u64,
}

struct Pending<'p> {
    stream: TcpStream,
    session: &'p Session,
    generation: u64,
    client_id: u64,
    topic: u32,
    since_ns: u64,
    /// A DPDK publisher's request line: accepted, it goes to the DPDK frontend.
    dpdk: Option<String>,
}

enum Rx {
    Header {
        buf: [u8; BatchFrame::BYTES],
        have: usize,
    },
    /// A header was read; its batch waits for a grant with room.
    Placing(BatchFrame),
    /// The batch is being read into the pool at `at`.
    Payload {
        frame: BatchFrame,
        at: u64,
        have: u64,
    },
    /// The batch is in the pool; its descriptor waits for room in the submission ring.
    Ready(BatchDesc),
}

struct Remote<'p, C: Coherence> {
    stream: TcpStream,
    session: &'p Session,
    generation: u64,
    client_id: u64,
    submit: RingProducer<'p, C>,
    batch_limit: u64,
    rx: Rx,
    /// The socket may hold bytes: no read has returned `WouldBlock` since its last event.
    readable: bool,
    grants: GrantCursor,
    received: u64,
    /// The disk faults of an ACK 2 session's topic, which its acks carry.
    disk: DiskWatch,
    /// The counters last queued for the publisher.
    sent: AckFrame,
    /// An ack frame being written, and how much of it is written.
    out: Option<([u8; AckFrame::BYTES], usize)>,
    /// Since when `out` could not be written (the publisher does not read).
    blocked_since_ns: Option<u64>,
    /// The last byte received (for the mid-frame stall timeout).
    progress_ns: u64,
    last_check_ns: u64,
    /// Why the session ends (a session error code and a reason), once it does.
    closing: Option<(u64, String)>,
}

enum Conn<'p, C: Coherence> {
    Hello(Hello),
    Pending(Pending<'p>),
    Publisher(Box<Remote<'p, C>>),
}

/// See the module docs.
pub struct Frontend<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    broker: u32,
    bell: &'p BrokerDoorbell,
    cfg: FrontendConfig,
    poll: Poll,
    events: Events,
    listener: TcpListener,
    listen_addr: SocketAddr,
    conns: Vec<Option<Conn<'p, C>>>,
    free_tokens: Vec<usize>,
    subscribers: Vec<SubscriberConn>,
    /// Whether DPDK publishers are taken (a DPDK frontend runs), and those accepted.
    dpdk: bool,
    handoffs: Vec<Handoff<'p>>,
    stats: FrontendStats,
    warn: LogLimit,
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("DPDK: {0}")]
    Dpdk(String),
    #[error("TCP listener: {0}")]
    Listen(std::io::Error),
    #[error("event loop: {0}")]
    Poll(std::io::Error),
    #[error(transparent)]
    Pool(#[from] crate::PoolError),
}

impl<'p, C: Coherence> Frontend<'p, C> {
    /// Serves TCP publishers and subscribers of pool slot `broker` that connect to
    /// `listener`.
    pub fn new(
        pool: &'p Pool,
        c: C,
        broker: u32,
        listener: std::net::TcpListener,
        cfg: FrontendConfig,
    ) -> Result<Self, FrontendError> {
        pool.check_topic_broker(0, broker)?;
        let bell = pool.broker_doorbell(broker)?;
        listener
            .set_nonblocking(true)
            .map_err(FrontendError::Listen)?;
        let listen_addr = listener.local_addr().map_err(FrontendError::Listen)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new().map_err(FrontendError::Poll)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(FrontendError::Poll)?;
        Ok(Frontend {
            pool,
            c,
            broker,
            bell,
            cfg,
            poll,
            events: Events::with_capacity(256),
            listener,
            listen_addr,
            conns: Vec::new(),
            free_tokens: Vec::new(),
            subscribers: Vec::new(),
            dpdk: false,
            handoffs: Vec::new(),
            stats: FrontendStats::default(),
            warn: LogLimit::new(Duration::from_secs(10)),
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn stats(&self) -> FrontendStats {
        FrontendStats {
            sessions_open: self
                .conns
                .iter()
                .filter(|c| matches!(c, Some(Conn::Publisher(_))))
                .count() as u64,
            ..self.stats
        }
    }

    /// Whether a connection waits on the pool (a grant, ring room, the broker's answer, an
    /// ack): then the loop must look again soon rather than sleep until a socket event.
    pub fn busy(&self) -> bool {
        self.conns.iter().flatten().any(|c| match c {
            Conn::Hello(_) => false,
            Conn::Pending(_) => true,
            Conn::Publisher(r) => {
                !matches!(r.rx, Rx::Header { have: 0, .. })
                    || r.out.is_some()
                    || r.sent.acked_batches + r.sent.rejected_batches < r.received
            }
        })
    }

    /// Subscriber connections accepted since the last call (each for a thread of its own).
    pub fn take_subscribers(&mut self) -> Vec<SubscriberConn> {
        std::mem::take(&mut self.subscribers)
    }

    /// One round: socket events (waiting at most `timeout` for one), then every
    /// connection's state. Returns the work done.
    pub fn poll_once(&mut self, timeout: Option<Duration>) -> Result<usize, FrontendError> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(FrontendError::Poll(e)),
        }
        let mut work = 0;
        let mut accept = false;
        for ev in self.events.iter() {
            if ev.token() == LISTENER {
                accept = true;
                continue;
            }
            if let Some(Some(Conn::Publisher(r))) = self.conns.get_mut(ev.token().0) {
                r.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
            }
        }
        if accept {
            work += self.accept();
        }
        let now = monotonic_ns();
        for i in 0..self.conns.len() {
            work += self.serve(i, now);
        }
        Ok(work)
    }

    fn accept(&mut self) -> usize {
        let mut n = 0;
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    n += 1;
                    let open = self.conns.len() - self.free_tokens.len();
                    if open >= self.cfg.max_connections {
                        self.stats.sessions_refused += 1;
                        let _ = stream.write_all(b"ERR too many connections; try again\n");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let token = self.free_tokens.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, Token(token), Interest::READABLE)
                        .is_err()
                    {
                        self.free_tokens.push(token);
                        continue;
                    }
                    self.conns[token] = Some(Conn::Hello(Hello {
                        stream,
                        buf: Vec::new(),
                        since_ns: monotonic_ns(),
                    }));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    warn_limited!(self.warn, monotonic_ns(), "TCP accept: {e}");
                    return n;
                }
            }
        }
    }

    fn release(&mut self, token: usize, mut stream: TcpStream) {
        let _ = self.poll.registry().deregister(&mut stream);
        self.conns[token] = None;
        self.free_tokens.push(token);
    }

    fn serve(&mut self, i: usize, now: u64) -> usize {
        let Some(conn) = self.conns[i].take() else {
            return 0;
        };
        match conn {
            Conn::Hello(h) => self.hello(i, h, now),
            Conn::Pending(p) => self.pending(i, p, now),
            Conn::Publisher(mut r) => {
                let work = self.publisher(&mut r, now);
                match r.closing.take() {
                    Some((code, why)) => self.end(i, *r, code, &why),
                    None => self.conns[i] = Some(Conn::Publisher(r)),
                }
                work
            }
        }
    }

    /// Reads the request line (without blocking), then claims a session or hands a
    /// subscriber over.
    fn hello(&mut self, i: usize, mut h: Hello, now: u64) -> usize {
        let mut b = [0u8; 256];
        let line = loop {
            if let Some(pos) = h.buf.iter().position(|&x| x == b'\n') {
                let line = String::from_utf8_lossy(&h.buf[..pos])
                    .trim_end()
                    .to_string();
                break Some(line);
            }
            if h.buf.len() > MAX_LINE {
                break None;
            }
            match h.stream.read(&mut b) {
                Ok(0) => {
                    self.release(i, h.stream);
                    return 1;
                }
                Ok(n) => h.buf.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if now.saturating_sub(h.since_ns) > HANDSHAKE_TIMEOUT.as_nanos() as u64 {
                        break None;
                    }
                    self.conns[i] = Some(Conn::Hello(h));
                    return 0;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.release(i, h.stream);
                    return 1;
                }
            }
        };
        let Some(line) = line else {
            self.stats.sessions_refused += 1;
            let _ = writeln!(
                h.stream,
                "ERR expected one request line of at most {MAX_LINE} bytes within {HANDSHAKE_TIMEOUT:?}"
            );
            self.release(i, h.stream);
            return 1;
        };
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if first == SUB_HELLO {
            self.hand_over_subscriber(i, h.stream, line);
            return 1;
        }
        if first == DPDK_HELLO && !self.dpdk {
            self.stats.sessions_refused += 1;
            let _ = writeln!(
                h.stream,
                "ERR broker {} takes no DPDK publishers (start it with --dpdk)",
                self.broker
            );
            self.release(i, h.stream);
            return 1;
        }
        match self.claim(&line) {
            Ok((session, generation, client_id, topic)) => {
                doorbell::ring(self.bell);
                self.conns[i] = Some(Conn::Pending(Pending {
                    stream: h.stream,
                    session,
                    generation,
                    client_id,
                    topic,
                    since_ns: now,
                    dpdk: (first == DPDK_HELLO).then(|| line.clone()),
                }));
            }
            Err(why) => {
                self.stats.sessions_refused += 1;
                let _ = writeln!(h.stream, "ERR {why}");
                self.release(i, h.stream);
            }
        }
        1
    }

    fn hand_over_subscriber(&mut self, i: usize, mut stream: TcpStream, line: String) {
        let _ = self.poll.registry().deregister(&mut stream);
        self.conns[i] = None;
        self.free_tokens.push(i);
        // mio's stream is a std stream in non-blocking mode; the subscriber's thread uses
        // blocking writes with a timeout.
        let std_stream: std::net::TcpStream = stream.into();
        if std_stream.set_nonblocking(false).is_err() {
            return;
        }
        self.stats.subscribers_opened += 1;
        self.subscribers.push(SubscriberConn {
            stream: std_stream,
            line,
        });
    }

    fn claim(&self, line: &str) -> Result<(&'p Session, u64, u64, u32), String> {
        if !matches!(
            line.split_ascii_whitespace().next(),
            Some(HELLO | DPDK_HELLO)
        ) {
            return Err(format!(
                "expected {HELLO} (a publisher) or {SUB_HELLO} (a subscriber)"
            ));
        }
        let name = field(line, "topic").map_err(|e| e.to_string())?;
        let topic = self
            .pool
            .find_topic(self.c, name)
            .map_err(|e| e.to_string())?;
        let client = field(line, "client").map_err(|e| e.to_string())?;
        let client_id: u64 = client
            .parse()
            .map_err(|_| format!("bad client= {client:?}"))?;
        match session::try_claim(
            self.pool,
            self.c,
            self.broker,
            topic,
            client_id,
            embar_sys::process::ProcessId::current(),
        ) {
            Ok(Some((s, _, generation))) => Ok((s, generation, client_id, topic)),
            Ok(None) => Err(format!(
                "every session slot of broker {} is in use",
                self.broker
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Waits for the broker's answer to a claimed session; answers the publisher.
    fn pending(&mut self, i: usize, mut p: Pending<'p>, now: u64) -> usize {
        let a = answer(self.c, p.session, p.generation);
        let timed_out = now.saturating_sub(p.since_ns) > HANDSHAKE_TIMEOUT.as_nanos() as u64;
        if a.is_none() && !timed_out {
            self.conns[i] = Some(Conn::Pending(p));
            return 0;
        }
        let refuse = |f: &mut Self, mut p: Pending<'p>, why: String, close: bool| {
            f.stats.sessions_refused += 1;
            let _ = writeln!(p.stream, "ERR {why}");
            if close {
                session::close(f.c, p.session, p.generation);
                doorbell::ring(f.bell);
            }
            f.release(i, p.stream);
        };
        match a {
            Some(ACCEPTED) => {
                let Some(info) = self.pool.read_topic(self.c, p.topic) else {
                    refuse(self, p, "the topic was deleted".into(), true);
                    return 1;
                };
                let batch_limit = info
                    .config
                    .batch_bytes
                    .min(self.pool.geometry().segment_bytes);
                if let Some(line) = p.dpdk.take() {
                    let mut stream = p.stream;
                    let _ = self.poll.registry().deregister(&mut stream);
                    self.conns[i] = None;
                    self.free_tokens.push(i);
                    self.handoffs.push(Handoff {
                        stream: stream.into(),
                        session: p.session,
                        generation: p.generation,
                        client_id: p.client_id,
                        topic: p.topic,
                        batch_limit,
                        ack: info.config.ack,
                        line,
                    });
                    return 1;
                }
                let ok = writeln!(
                    p.stream,
                    "OK broker={} batch_bytes={batch_limit} ack={}",
                    self.broker, info.config.ack
                );
                if ok.is_err() {
                    refuse(self, p, "the publisher went away".into(), true);
                    return 1;
                }
                // To a publisher the broker only writes 64-byte ack frames (coalesced): a
                // small send buffer bounds what one that reads nothing holds here, and lets
                // its unread acks back up soon (then it is not read). Subscribers keep the
                // kernel's self-tuning buffers.
                let _ = socket2::SockRef::from(&p.stream).set_send_buffer_size(ACK_SEND_BUFFER);
                self.stats.sessions_opened += 1;
                log::info!(
                    "broker {}: TCP session of client {} opened",
                    self.broker,
                    p.client_id
                );
                self.conns[i] = Some(Conn::Publisher(Box::new(Remote {
                    stream: p.stream,
                    session: p.session,
                    generation: p.generation,
                    client_id: p.client_id,
                    submit: RingProducer::new(submission_ring(p.session), self.c),
                    batch_limit,
                    rx: Rx::Header {
                        buf: [0; BatchFrame::BYTES],
                        have: 0,
                    },
                    // Bytes may have come with the request line's event.
                    readable: true,
                    grants: GrantCursor::default(),
                    received: 0,
                    disk: DiskWatch::new(p.topic, info.config.ack),
                    sent: AckFrame::default(),
                    out: None,
                    blocked_since_ns: None,
                    progress_ns: now,
                    last_check_ns: now,
                    closing: None,
                })));
            }
            Some(_) => {
                let reason = SessionError::from_code(p.session.error.load(Relaxed)).describe();
                let why = format!("broker {} refused: {reason}", self.broker);
                refuse(self, p, why, false);
            }
            None => {
                let why = format!("broker {} did not answer", self.broker);
                refuse(self, p, why, true);
            }
        }
        1
    }

    /// Receives, places and submits batches; queues and writes acks; checks timeouts.
    fn publisher(&mut self, r: &mut Remote<'p, C>, now: u64) -> usize {
        let (pool, c, bell) = (self.pool, self.c, self.bell);
        let idle_ns = self.cfg.idle_timeout.as_nanos() as u64;
        let mut work = 0;
        if now.saturating_sub(r.last_check_ns) > HOUSEKEEPING.as_nanos() as u64 {
            r.last_check_ns = now;
            if c.observe(&r.session.accepted) == r.generation << 8 | RELEASED {
                // The broker ended the session (its topic was deleted, a bad batch).
                let code = SessionError::from_code(r.session.error.load(Relaxed)) as u64;
                r.closing = Some((code, "the broker ended the session".into()));
                return 1;
            }
        }
        // Acks first: a publisher that does not read them is not read either.
        work += self.acks(r, now);
        if r.closing.is_some() {
            return work;
        }
        if let Some(since) = r.blocked_since_ns {
            if now.saturating_sub(since) > idle_ns {
                self.stats.sessions_dropped += 1;
                r.closing = Some((
                    ERROR_TRANSPORT,
                    format!("it left its acks unread for {:?}", self.cfg.idle_timeout),
                ));
            }
            return work;
        }
        loop {
            match &mut r.rx {
                Rx::Header { buf, have } => {
                    if !r.readable {
                        if *have > 0 && now.saturating_sub(r.progress_ns) > idle_ns {
                            self.stats.sessions_dropped += 1;
                            r.closing = Some((
                                ERROR_TRANSPORT,
                                format!("it stalled mid-header for {:?}", self.cfg.idle_timeout),
                            ));
                        }
                        break;
                    }
                    match r.stream.read(&mut buf[*have..]) {
                        Ok(0) => {
                            let why = if *have == 0 {
                                "the publisher closed the connection".to_string()
                            } else {
                                self.stats.sessions_dropped += 1;
                                format!(
                                    "the connection ended after {have} of a frame header's {} bytes",
                                    BatchFrame::BYTES
                                )
                            };
                            r.closing = Some((ERROR_TRANSPORT, why));
                            break;
                        }
                        Ok(n) => {
                            *have += n;
                            r.progress_ns = now;
                            if *have < BatchFrame::BYTES {
                                continue;
                            }
                            match BatchFrame::decode(buf, r.batch_limit) {
                                Ok(f) => r.rx = Rx::Placing(f),
                                Err(e) => {
                                    self.stats.sessions_dropped += 1;
                                    r.closing = Some((ERROR_TRANSPORT, format!("{e}")));
                                    break;
                                }
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => r.readable = false,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            r.closing = Some((ERROR_TRANSPORT, format!("reading: {e}")));
                            break;
                        }
                    }
                }
                Rx::Placing(f) => {
                    let f = *f;
                    match r.grants.place(pool, c, r.session, bell, f.total_size) {
                        Ok(Some(at)) => {
                            r.rx = Rx::Payload {
                                frame: f,
                                at,
                                have: 0,
                            }
                        }
                        Ok(None) => break,
                        Err(why) => {
                            r.closing = Some((ERROR_TRANSPORT, why));
                            break;
                        }
                    }
                }
                Rx::Payload { frame, at, have } => {
                    if !r.readable {
                        if now.saturating_sub(r.progress_ns) > idle_ns {
                            self.stats.sessions_dropped += 1;
                            r.closing = Some((
                                ERROR_TRANSPORT,
                                format!(
                                    "it stalled after {have} of batch {}'s {} bytes for {:?}",
                                    frame.batch_seq, frame.total_size, self.cfg.idle_timeout
                                ),
                            ));
                        }
                        break;
                    }
                    let (want, dst) = (frame.total_size - *have, *at + *have);
                    let ptr = match pool.data_ptr(dst, want) {
                        Ok(p) => p,
                        Err(e) => {
                            r.closing = Some((ERROR_TRANSPORT, format!("a grant: {e}")));
                            break;
                        }
                    };
                    // SAFETY: `ptr..ptr + want` was bounds-checked in the mapping just above
                    // and lies in a grant this session took and has not submitted: nothing
                    // else in this system writes it, and the broker reads it only after its
                    // descriptor is published below. `read(2)` writes at most `want` bytes
                    // there; no Rust reference to the bytes exists.
                    let n = unsafe { libc::read(r.stream.as_raw_fd(), ptr.cast(), want as usize) };
                    if n > 0 {
                        *have += n as u64;
                        r.progress_ns = now;
                        self.stats.bytes_received += n as u64;
                        if *have == frame.total_size {
                            let desc = BatchDesc {
                                batch_seq: frame.batch_seq,
                                client_id: r.client_id,
                                num_msg: frame.num_msg,
                                broker_id: self.broker,
                                total_size: frame.total_size,
                                log_idx: *at,
                                start_logical_offset: 0,
                                version_flags: u64::from(BATCH_HEADER_VERSION),
                            };
                            r.rx = Rx::Ready(desc);
                        }
                        continue;
                    }
                    if n == 0 {
                        self.stats.sessions_dropped += 1;
                        r.closing = Some((
                            ERROR_TRANSPORT,
                            format!(
                                "the connection ended after {have} of batch {}'s {} bytes",
                                frame.batch_seq, frame.total_size
                            ),
                        ));
                        break;
                    }
                    let e = std::io::Error::last_os_error();
                    match e.kind() {
                        ErrorKind::WouldBlock => r.readable = false,
                        ErrorKind::Interrupted => {}
                        _ => {
                            r.closing = Some((ERROR_TRANSPORT, format!("reading: {e}")));
                            break;
                        }
                    }
                }
                Rx::Ready(desc) => match r.submit.try_publish(desc) {
                    Ok(_) => {
                        r.received += 1;
                        self.stats.batches_received += 1;
                        work += 1;
                        doorbell::ring(bell);
                        r.rx = Rx::Header {
                            buf: [0; BatchFrame::BYTES],
                            have: 0,
                        };
                    }
                    Err(RingError::Full { .. }) => break,
                    Err(e) => {
                        r.closing = Some((ERROR_TRANSPORT, format!("submission ring: {e}")));
                        break;
                    }
                },
            }
        }
        work
    }

    /// Queues the session's counters when they changed and writes what it can.
    fn acks(&mut self, r: &mut Remote<'p, C>, now: u64) -> usize {
        if r.out.is_none() {
            let disk = r.disk.word(self.pool, self.c, now);
            let frame = counters(self.c, r.session, r.received, disk);
            if frame == r.sent {
                return 0;
            }
            r.sent = frame;
            r.out = Some((frame.encode(), 0));
        }
        let Some((buf, off)) = r.out.as_mut() else {
            return 0;
        };
        loop {
            match r.stream.write(&buf[*off..]) {
                Ok(n) => {
                    *off += n;
                    if *off == AckFrame::BYTES {
                        r.out = None;
                        r.blocked_since_ns = None;
                        return 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Tried again every round while it waits (the loop is busy then).
                    r.blocked_since_ns.get_or_insert(now);
                    return 0;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    r.closing = Some((ERROR_TRANSPORT, format!("writing an ack: {e}")));
                    return 1;
                }
            }
        }
    }

    /// Ends a session: tells the publisher why (best effort), closes the pool session (the
    /// broker then reclaims its grants), drops the connection.
    fn end(&mut self, i: usize, mut r: Remote<'p, C>, code: u64, why: &str) {
        let last = AckFrame {
            closed: code.max(1),
            ..r.sent
        };
        let _ = r.stream.write(&last.encode());
        session::close(self.c, r.session, r.generation);
        doorbell::ring(self.bell);
        if code == ERROR_TRANSPORT && why != "the publisher closed the connection" {
            log::warn!(
                "broker {}: TCP session of client {} dropped: {why}",
                self.broker,
                r.client_id
            );
        } else {
            log::info!(
                "broker {}: TCP session of client {} ended: {why}",
                self.broker,
                r.client_id
            );
        }
        let Remote { stream, .. } = r;
        self.release(i, stream);
    }
}

/// Runs the frontend until `stop`: publishers in this thread, each subscriber on a thread of
/// its own (at most `cfg.max_subscribers`), served by [`super::subscriber::serve`].
///
/// `report` gets the counters every [`HOUSEKEEPING`] (for the broker's metrics).
#[allow(clippy::too_many_arguments)] // what one broker's TCP thread serves, each distinct
pub fn run<C: Coherence>(
    pool: &Pool,
    c: C,
    broker: u32,
    listener: std::net::TcpListener,
    cfg: FrontendConfig,
    dpdk: Option<DpdkFrontendConfig>,
    stop: &AtomicBool,
    report: &mut dyn FnMut(FrontendStats),
) -> Result<(), FrontendError> {
    let mut f = Frontend::new(pool, c, broker, listener, cfg)?;
    #[cfg(feature = "dpdk")]
    let dpdk_stats = crate::dpdk::frontend::DpdkStats::default();
    #[cfg(not(feature = "dpdk"))]
    if dpdk.is_some() {
        return Err(FrontendError::Dpdk(
            "this build has no DPDK transport (build with --features dpdk)".into(),
        ));
    }
    let mut reported = std::time::Instant::now();
    let threads = crate::remote_subscriber::SubscriberThreads::new(cfg.max_subscribers);
    // Short rests while a connection waits on the pool; the event loop's own wait (whole
    // milliseconds in epoll) only when nothing does.
    let mut idle = Idle::new(IdlePolicy {
        spin_rounds: 16,
        yield_for: Duration::from_millis(1),
        rest: Duration::from_micros(50),
    });
    std::thread::scope(|scope| {
        #[cfg(feature = "dpdk")]
        let dpdk_handoff = match dpdk {
            Some(dcfg) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let stats = &dpdk_stats;
                std::thread::Builder::new()
                    .name("broker-dpdk".into())
                    .spawn_scoped(scope, move || {
                        let r = crate::dpdk::frontend::run(pool, c, broker, dcfg, rx, stats, stop);
                        if let Err(e) = r {
                            log::error!("broker {broker}: the DPDK frontend stopped: {e}");
                        }
                    })
                    .map_err(|e| FrontendError::Dpdk(format!("its thread: {e}")))?;
                Some(tx)
            }
            None => None,
        };
        #[cfg(feature = "dpdk")]
        {
            f.dpdk = dpdk_handoff.is_some();
        }
        let mut timeout = Some(Duration::ZERO);
        while !stop.load(Relaxed) {
            let work = f.poll_once(timeout)?;
            for h in std::mem::take(&mut f.handoffs) {
                #[cfg(feature = "dpdk")]
                let h = match &dpdk_handoff {
                    Some(tx) => match tx.send(h) {
                        Ok(()) => continue,
                        Err(e) => e.0,
                    },
                    None => h,
                };
                let Handoff {
                    mut stream,
                    session,
                    generation,
                    ..
                } = h;
                let _ = writeln!(stream, "ERR broker {broker}: its DPDK frontend stopped");
                session::close(c, session, generation);
                doorbell::ring(f.bell);
            }
            for s in f.take_subscribers() {
                threads.spawn(scope, broker, "tcp-subscriber", s, move |s| {
                    super::subscriber::serve(pool, c, broker, s, cfg.idle_timeout, stop)
                });
            }
            if reported.elapsed() >= HOUSEKEEPING {
                reported = std::time::Instant::now();
                #[allow(unused_mut)]
                let mut stats = f.stats();
                #[cfg(feature = "dpdk")]
                {
                    stats.dpdk = dpdk_stats.snapshot();
                }
                report(stats);
            }
            timeout = Some(Duration::ZERO);
            if let Some(rest) = idle.step(work) {
                if f.busy() {
                    std::thread::sleep(rest);
                } else {
                    timeout = Some(HOUSEKEEPING);
                }
            }
        }
        Ok(())
    })
}
