//! The broker's side of the verbs transport: accepts remote publishers on a TCP port, gives
//! each an RC queue pair, and stands in for it as the publisher of a shm session in the pool
//! (see [`crate::session`]): the broker's own checks, grants and acks then apply unchanged.
//!
//! Per session it registers, for remote writes, only (a) each grant of log space while the
//! publisher may fill it and (b) a small staging buffer of descriptors outside the pool. Pool
//! metadata is never registered. It runs as polling rounds ([`Frontend::poll_once`]), inline
//! in the broker's loop or on a thread of its own.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use embar_sys::clock::monotonic_ns;
use embar_sys::verbs::{
    Completion, CompletionQueue, Context, Endpoint, MemoryRegion, Opcode, QueuePair,
    RegisteredBuffer, VerbsError, Write,
};

use super::credits::{BadImmediate, ImmediateOrder, SourceRing};
use super::*;
use crate::log_limit::LogLimit;
use crate::pool::coherence::Coherence;
use crate::pool::layout::Session;
use crate::pool::Pool;
use crate::remote_subscriber::SubscriberConn;
use crate::ring::{RingError, RingProducer};
use crate::session::{self, answer, grant_slot, submission_ring, SessionError, ACCEPTED, RELEASED};
use crate::sync::Ordering::Relaxed;
use crate::warn_limited;

/// Feedback writes in flight per session (a ring of 64-byte source slots).
const FEEDBACK_SOURCES: u64 = 64;
/// Every this many feedback writes one is signaled, which frees the slots before it.
const SIGNAL_EVERY: u64 = 16;
/// How often a session's TCP connection is checked for its end.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait for the broker's answer to a session, and for the publisher's READY.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an ended session's QP lives on, so that its last feedback write (the reason it
/// ended) reaches the publisher. Its grants are unregistered at once.
const DRAIN: Duration = Duration::from_millis(200);
/// A session error code for a bad immediate (beyond the codes of [`SessionError`]).
pub const ERROR_BAD_IMMEDIATE: u64 = 8;
/// A session error code for a failed RDMA operation on the session's QP.
pub const ERROR_TRANSPORT: u64 = 9;

/// Counters (exported as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStats {
    pub sessions_opened: u64,
    pub sessions_closed: u64,
    pub sessions_refused: u64,
    pub batches_forwarded: u64,
    /// Resends by copy (a publisher's failover from a dead broker): batches copied inside the
    /// pool instead of written again over the network.
    pub resends_copied: u64,
    pub bad_immediates: u64,
    pub grants_registered: u64,
    pub feedback_writes: u64,
}

struct Incoming {
    stream: TcpStream,
    line: String,
}

struct Request {
    topic: u32,
    client_id: u64,
    ep: Endpoint,
    feedback_addr: u64,
    feedback_rkey: u32,
}

struct Pending<'p> {
    stream: TcpStream,
    req: Request,
    session: &'p Session,
    generation: u64,
    since_ns: u64,
}

struct Grant {
    number: u64,
    offset: u64,
    bytes: u64,
    _mr: MemoryRegion,
}

struct Remote<'p, C: Coherence> {
    session: &'p Session,
    generation: u64,
    client_id: u64,
    stream: TcpStream,
    /// Bytes of the READY line read so far.
    ready_buf: Vec<u8>,
    ready: bool,
    since_ns: u64,
    qp: QueuePair,
    staging: RegisteredBuffer,
    source_buf: RegisteredBuffer,
    /// Which source slot each feedback write uses, and which are free again.
    sources: SourceRing,
    feedback_addr: u64,
    feedback_rkey: u32,
    submit: RingProducer<'p, C>,
    /// Immediates must name the staging slots in order.
    order: ImmediateOrder,
    /// Staging slots announced and not yet taken into the submission ring.
    queue: VecDeque<u32>,
    /// Descriptors taken into the submission ring (the publisher's staging credits).
    consumed: u64,
    grants: VecDeque<Grant>,
    issued_seen: u64,
    taken: u64,
    /// Counters last written to the publisher.
    sent: [u64; 8],
    /// The disk faults of an ACK 2 session's topic, which its counters carry.
    disk: crate::replication::DiskWatch,
    local_rejected: u64,
    local_error: u64,
    /// Why the session ends (a session error code), once it does.
    closing: Option<u64>,
    last_alive_ns: u64,
}

/// See the module docs.
pub struct Frontend<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    broker: u32,
    ctx: Arc<Context>,
    send_cq: Arc<CompletionQueue>,
    recv_cq: Arc<CompletionQueue>,
    incoming: mpsc::Receiver<Incoming>,
    pending: Vec<Pending<'p>>,
    remotes: Vec<Remote<'p, C>>,
    /// Ended sessions whose last feedback write may be in flight, until the deadline (ns).
    draining: Vec<(Remote<'p, C>, u64)>,
    stats: FrontendStats,
    completions: Vec<Completion>,
    listen_addr: SocketAddr,
    batch_limit: u64,
    warnings: Warnings,
}

/// The frontend's warnings that a misbehaving publisher or a failing device can repeat on
/// every polling round; each is logged at most once per interval, with a count.
#[derive(Default)]
struct Warnings {
    session_failed: LogLimit,
    bad_immediate: LogLimit,
    repost_receive: LogLimit,
    register_grant: LogLimit,
    submission: LogLimit,
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error(transparent)]
    Verbs(#[from] VerbsError),
    #[error("verbs listener: {0}")]
    Listen(std::io::Error),
    #[error(transparent)]
    Pool(#[from] crate::PoolError),
}

/// Why one remote session could not be set up or served; it ends that session only.
#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error(transparent)]
    Verbs(#[from] VerbsError),
    #[error("the topic was deleted")]
    TopicDeleted,
    #[error("answering the publisher: {0}")]
    Answer(std::io::Error),
    /// A grant the broker issued that does not lie in the log (a broker bug).
    #[error(transparent)]
    GrantRange(crate::PoolError),
    #[error("no free feedback source slot")]
    NoFeedbackSource,
}

impl<'p, C: Coherence> Frontend<'p, C> {
    /// Serves publishers of pool slot `broker` that connect to `listener`, on device `ctx`
    /// (`Context::open`); hands subscribers that connect there to `subscribers` (served by
    /// `super::subscriber::run`), or refuses them without it.
    pub fn new(
        pool: &'p Pool,
        c: C,
        broker: u32,
        listener: TcpListener,
        ctx: Arc<Context>,
        subscribers: Option<mpsc::Sender<SubscriberConn>>,
    ) -> Result<Self, FrontendError> {
        pool.check_topic_broker(0, broker)?;
        let send_cq = CompletionQueue::new(&ctx, 4096)?;
        let recv_cq = CompletionQueue::new(&ctx, 4096)?;
        let listen_addr = listener.local_addr().map_err(FrontendError::Listen)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("verbs-accept".into())
            .spawn(move || accept_loop(listener, tx, subscribers))
            .map_err(FrontendError::Listen)?;
        Ok(Frontend {
            pool,
            c,
            broker,
            ctx,
            send_cq,
            recv_cq,
            incoming: rx,
            pending: Vec::new(),
            remotes: Vec::new(),
            draining: Vec::new(),
            stats: FrontendStats::default(),
            completions: Vec::with_capacity(64),
            listen_addr,
            batch_limit: pool.geometry().segment_bytes,
            warnings: Warnings::default(),
        })
    }

    /// Where publishers connect (with the port the system chose for `:0`).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn device(&self) -> &str {
        self.ctx.name()
    }

    pub fn stats(&self) -> FrontendStats {
        self.stats
    }

    pub fn sessions_open(&self) -> usize {
        self.remotes.len()
    }

    /// One round: new connections, completions, forwarding, grants, feedback. Returns the
    /// work done. Errors here are the device's; a session's errors end only that session.
    pub fn poll_once(&mut self) -> Result<usize, FrontendError> {
        let mut work = 0;
        while let Ok(inc) = self.incoming.try_recv() {
            work += 1;
            self.start(inc);
        }
        if !self.pending.is_empty() {
            work += self.answers();
        }
        work += self.poll_receives()?;
        self.poll_sends()?;
        let now = monotonic_ns();
        for i in 0..self.remotes.len() {
            work += self.serve(i, now);
        }
        let mut i = 0;
        while i < self.remotes.len() {
            if let Some(code) = self.remotes[i].closing {
                let r = self.remotes.swap_remove(i);
                self.end(r, code);
            } else {
                i += 1;
            }
        }
        self.draining.retain(|(_, deadline)| *deadline > now);
        Ok(work)
    }

    /// Parses a request, claims a session slot for it, or answers ERR.
    fn start(&mut self, inc: Incoming) {
        let Incoming { mut stream, line } = inc;
        let req = match self.parse(&line) {
            Ok(r) => r,
            Err(e) => {
                self.stats.sessions_refused += 1;
                let _ = writeln!(stream, "ERR {e}");
                return;
            }
        };
        match session::try_claim(
            self.pool,
            self.c,
            self.broker,
            req.topic,
            req.client_id,
            embar_sys::process::ProcessId::current(),
        ) {
            Ok(Some((s, _, generation))) => self.pending.push(Pending {
                stream,
                req,
                session: s,
                generation,
                since_ns: monotonic_ns(),
            }),
            Ok(None) => {
                self.stats.sessions_refused += 1;
                let _ = writeln!(
                    stream,
                    "ERR every session slot of broker {} is in use",
                    self.broker
                );
            }
            Err(e) => {
                self.stats.sessions_refused += 1;
                let _ = writeln!(stream, "ERR {e}");
            }
        }
    }

    fn parse(&self, line: &str) -> Result<Request, HandshakeError> {
        if line.split_ascii_whitespace().next() != Some(HELLO) {
            return Err(HandshakeError::NotHello);
        }
        let name = field(line, "topic")?;
        let topic = self.pool.find_topic(self.c, name)?;
        let client = field(line, "client")?;
        let client_id: u64 = client.parse().map_err(|_| HandshakeError::BadField {
            key: "client",
            value: client.to_string(),
        })?;
        let ep: Endpoint = field(line, "ep")?
            .parse()
            .map_err(HandshakeError::BadEndpoint)?;
        let feedback = field(line, "feedback")?;
        let fb = parse_nums(feedback, 2)?;
        if fb[1] > u64::from(u32::MAX) {
            return Err(HandshakeError::BadField {
                key: "feedback",
                value: feedback.to_string(),
            });
        }
        Ok(Request {
            topic,
            client_id,
            ep,
            feedback_addr: fb[0],
            feedback_rkey: fb[1] as u32,
        })
    }

    /// Sessions the broker has answered: set up the accepted ones.
    fn answers(&mut self) -> usize {
        let mut work = 0;
        let now = monotonic_ns();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let a = answer(self.c, p.session, p.generation);
            let timed_out = now.saturating_sub(p.since_ns) > HANDSHAKE_TIMEOUT.as_nanos() as u64;
            if a.is_none() && !timed_out {
                i += 1;
                continue;
            }
            work += 1;
            let mut p = self.pending.swap_remove(i);
            match a {
                Some(ACCEPTED) => match self.activate(&mut p) {
                    Ok(r) => {
                        self.stats.sessions_opened += 1;
                        self.remotes.push(r);
                    }
                    Err(e) => {
                        self.stats.sessions_refused += 1;
                        let _ = writeln!(p.stream, "ERR {e}");
                        session::close(self.c, p.session, p.generation);
                    }
                },
                Some(_) => {
                    self.stats.sessions_refused += 1;
                    let reason = SessionError::from_code(p.session.error.load(Relaxed)).describe();
                    let _ = writeln!(p.stream, "ERR broker {} refused: {reason}", self.broker);
                }
                None => {
                    self.stats.sessions_refused += 1;
                    let _ = writeln!(p.stream, "ERR broker {} did not answer", self.broker);
                    session::close(self.c, p.session, p.generation);
                }
            }
        }
        work
    }

    /// The QP, staging buffer and feedback sources of an accepted session; answers OK.
    fn activate(&mut self, p: &mut Pending<'p>) -> Result<Remote<'p, C>, RemoteError> {
        let mut qp = QueuePair::new(
            &self.ctx,
            &self.send_cq,
            &self.recv_cq,
            (FEEDBACK_SOURCES + 8) as u32,
            STAGING_SLOTS + 1,
        )?;
        let staging = RegisteredBuffer::new(&self.ctx, STAGING_SLOTS as usize * SLOT_BYTES, true)?;
        let source_buf = RegisteredBuffer::new(&self.ctx, FEEDBACK_SOURCES as usize * 64, false)?;
        qp.connect(&p.req.ep, true)?;
        // One receive per staging slot: a publisher never has more immediates in flight. Its
        // first write can come only after the OK below.
        for k in 0..STAGING_SLOTS {
            // SAFETY: no buffer; a WRITE_WITH_IMM consumes it.
            unsafe { qp.post_recv(u64::from(k), None) }?;
        }
        let ep = qp.endpoint();
        let info = self
            .pool
            .read_topic(self.c, p.req.topic)
            .ok_or(RemoteError::TopicDeleted)?;
        writeln!(
            p.stream,
            "OK ep={ep} staging={}:{}:{STAGING_SLOTS} broker={} batch_bytes={} ack={}",
            staging.mr().addr(),
            staging.mr().rkey(),
            self.broker,
            info.config.batch_bytes.min(self.batch_limit),
            info.config.ack,
        )
        .map_err(RemoteError::Answer)?;
        p.stream
            .set_nonblocking(true)
            .map_err(RemoteError::Answer)?;
        let stream = p.stream.try_clone().map_err(RemoteError::Answer)?;
        Ok(Remote {
            session: p.session,
            generation: p.generation,
            client_id: p.req.client_id,
            stream,
            ready_buf: Vec::new(),
            ready: false,
            since_ns: monotonic_ns(),
            qp,
            staging,
            source_buf,
            sources: SourceRing::new(FEEDBACK_SOURCES, SIGNAL_EVERY),
            feedback_addr: p.req.feedback_addr,
            feedback_rkey: p.req.feedback_rkey,
            submit: RingProducer::new(submission_ring(p.session), self.c),
            order: ImmediateOrder::new(STAGING_SLOTS),
            queue: VecDeque::new(),
            consumed: 0,
            grants: VecDeque::new(),
            issued_seen: 0,
            taken: 0,
            sent: [u64::MAX; 8],
            disk: crate::replication::DiskWatch::new(p.req.topic, info.config.ack),
            local_rejected: 0,
            local_error: 0,
            closing: None,
            last_alive_ns: monotonic_ns(),
        })
    }

    /// Immediates announce descriptors; errors end their session.
    fn poll_receives(&mut self) -> Result<usize, FrontendError> {
        let mut work = 0;
        loop {
            self.completions.clear();
            if self.recv_cq.poll(&mut self.completions)? == 0 {
                return Ok(work);
            }
            let completions = std::mem::take(&mut self.completions);
            let now = monotonic_ns();
            let warn = &mut self.warnings;
            for c in &completions {
                work += 1;
                let broker = self.broker;
                let mut bad = false;
                let Some(r) = remote_by_qp(&mut self.remotes, c.qp_num) else {
                    continue;
                };
                if !c.ok() {
                    if r.closing.is_none() {
                        warn_limited!(
                            warn.session_failed,
                            now,
                            "broker {broker}: verbs session of client {} failed: {}",
                            r.client_id,
                            c.status_str()
                        );
                    }
                    r.closing.get_or_insert(ERROR_TRANSPORT);
                    continue;
                }
                if c.opcode != Opcode::RecvRdmaWithImm {
                    r.closing.get_or_insert(ERROR_BAD_IMMEDIATE);
                    continue;
                }
                // A WRITE_WITH_IMM always carries an immediate.
                match r.order.accept(c.imm.unwrap_or(u32::MAX)) {
                    Ok(slot) => r.queue.push_back(slot),
                    Err(BadImmediate { got, expected }) => {
                        // Not the next slot: the descriptor cannot be trusted to be the one
                        // the publisher meant; reject it, keep the session's order.
                        bad = true;
                        r.local_rejected += 1;
                        r.local_error = ERROR_BAD_IMMEDIATE | r.order.received() << 8;
                        warn_limited!(
                            warn.bad_immediate,
                            now,
                            "broker {broker}: verbs client {}: immediate {got} names no expected staging slot (want {expected}); rejected",
                            r.client_id
                        );
                    }
                }
                // The receive is used up either way: post it again.
                // SAFETY: no buffer.
                if let Err(e) = unsafe { r.qp.post_recv(c.wr_id, None) } {
                    warn_limited!(
                        warn.repost_receive,
                        now,
                        "broker {broker}: verbs client {}: re-posting a receive: {e}",
                        r.client_id
                    );
                    r.closing.get_or_insert(ERROR_TRANSPORT);
                }
                if bad {
                    self.stats.bad_immediates += 1;
                }
            }
            self.completions = completions;
        }
    }

    /// Completions of feedback writes: free source slots; an error ends the session.
    fn poll_sends(&mut self) -> Result<(), FrontendError> {
        loop {
            self.completions.clear();
            if self.send_cq.poll(&mut self.completions)? == 0 {
                return Ok(());
            }
            let completions = std::mem::take(&mut self.completions);
            for c in &completions {
                if let Some(r) = remote_by_qp(&mut self.remotes, c.qp_num) {
                    if c.ok() {
                        r.sources.completed(c.wr_id);
                    } else {
                        r.closing.get_or_insert(ERROR_TRANSPORT);
                    }
                }
            }
            self.completions = completions;
        }
    }

    /// Forwarding, grants, feedback and liveness of remote `i`.
    fn serve(&mut self, i: usize, now: u64) -> usize {
        let (pool, c, stats) = (self.pool, self.c, &mut self.stats);
        let (ctx, broker, warn) = (&self.ctx, self.broker, &mut self.warnings);
        let r = &mut self.remotes[i];
        if r.closing.is_some() {
            return 0;
        }
        if now.saturating_sub(r.last_alive_ns) > LIVENESS_INTERVAL.as_nanos() as u64 {
            r.last_alive_ns = now;
            if !r.alive() {
                r.closing = Some(ERROR_TRANSPORT);
                return 1;
            }
            if c.observe(&r.session.accepted) == r.generation << 8 | RELEASED {
                // The broker ended the session (its topic was deleted).
                r.closing = Some(SessionError::from_code(r.session.error.load(Relaxed)) as u64);
                return 1;
            }
        }
        if !r.ready {
            if now.saturating_sub(r.since_ns) > HANDSHAKE_TIMEOUT.as_nanos() as u64 {
                r.closing = Some(ERROR_TRANSPORT);
            }
            return usize::from(r.read_ready());
        }
        let mut work = 0;
        work += r.forward(
            pool,
            c,
            &mut warn.submission,
            broker,
            now,
            &mut stats.resends_copied,
        );
        stats.batches_forwarded += work as u64;
        match r.new_grants(pool, c, ctx) {
            Ok(n) => {
                stats.grants_registered += n;
                work += n as usize;
            }
            Err(e) => {
                warn_limited!(
                    warn.register_grant,
                    now,
                    "broker {broker}: verbs client {}: registering a grant: {e}",
                    r.client_id
                );
                r.closing = Some(ERROR_TRANSPORT);
                return 1;
            }
        }
        if r.write_counters(pool, c, None, now) {
            stats.feedback_writes += 1;
        }
        work
    }

    /// Ends a session: tells the publisher (best effort), closes the pool session; the
    /// broker then reclaims its grants. Dropping `r` deregisters everything it registered.
    fn end(&mut self, mut r: Remote<'p, C>, code: u64) {
        // No more writes into the log: the broker reclaims these grants once it sees the
        // session closed.
        r.grants.clear();
        if r.ready {
            r.write_counters(self.pool, self.c, Some(code.max(1)), monotonic_ns());
        }
        session::close(self.c, r.session, r.generation);
        self.stats.sessions_closed += 1;
        log::info!(
            "broker {}: verbs session of client {} ended ({})",
            self.broker,
            r.client_id,
            describe_code(code)
        );
        let deadline = monotonic_ns() + DRAIN.as_nanos() as u64;
        self.draining.push((r, deadline));
    }
}

fn remote_by_qp<'a, 'p, C: Coherence>(
    remotes: &'a mut [Remote<'p, C>],
    qpn: u32,
) -> Option<&'a mut Remote<'p, C>> {
    remotes.iter_mut().find(|r| r.qp.qp_num() == qpn)
}

/// A session error code, including the transport's own.
pub fn describe_code(code: u64) -> &'static str {
    match code & 0xff {
        ERROR_BAD_IMMEDIATE => "an immediate named no expected staging slot",
        ERROR_TRANSPORT => "the connection or its queue pair failed",
        other => SessionError::from_code(other).describe(),
    }
}

impl<C: Coherence> Remote<'_, C> {
    /// Whether the publisher's TCP connection is still open.
    fn alive(&mut self) -> bool {
        let mut b = [0u8; 64];
        match self.stream.read(&mut b) {
            Ok(0) => false,
            Ok(n) => {
                // Only READY is expected; anything else after it is ignored.
                if !self.ready {
                    self.ready_buf.extend_from_slice(&b[..n]);
                }
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }

    fn read_ready(&mut self) -> bool {
        if !self.alive() {
            self.closing = Some(ERROR_TRANSPORT);
            return true;
        }
        if self.ready_buf.len() > MAX_LINE {
            self.closing = Some(ERROR_TRANSPORT);
            return true;
        }
        if let Some(pos) = self.ready_buf.iter().position(|b| *b == b'\n') {
            if &self.ready_buf[..pos] == b"READY" {
                self.ready = true;
            } else {
                self.closing = Some(ERROR_TRANSPORT);
            }
            return true;
        }
        false
    }

    /// A resend by copy ([`Staged`]): the batch's bytes at pool offset `from` (a dead
    /// broker's grant, where this publisher wrote them) into the descriptor's place, which must
    /// lie in one of this session's grants. Out of range on either side, nothing is copied;
    /// either way the broker checks what the place holds like any batch (so bytes that are not
    /// this client's batch are rejected with the reason). Returns whether it copied.
    fn copy_resend(&self, pool: &Pool, c: C, d: &BatchDesc, from: u64) -> bool {
        let size = d.total_size;
        let inside = self.grants.iter().any(|g| {
            d.log_idx >= g.offset
                && d.log_idx
                    .checked_add(size)
                    .is_some_and(|end| end <= g.offset + g.bytes)
        });
        if !inside || size == 0 {
            return false;
        }
        let (Ok(src), Ok(dst)) = (pool.data_ptr(from, size), pool.data_ptr(d.log_idx, size)) else {
            return false;
        };
        // SAFETY: both ranges were bounds-checked in the pool mapping just above; `dst` lies
        // in a grant of this session, which only its publisher writes (by RDMA, and it wrote
        // nothing there for a resend: the broker has not taken the descriptor yet, so it does
        // not read it either). `copy` allows the ranges to overlap.
        unsafe {
            c.invalidate_range(src, size as usize);
            std::ptr::copy(src, dst, size as usize);
            c.writeback_range(dst, size as usize);
        }
        true
    }

    /// Takes announced descriptors into the submission ring, in order, while it has room.
    /// A resend by copy gets its bytes first (counted in `resends`).
    fn forward(
        &mut self,
        pool: &Pool,
        c: C,
        warn: &mut LogLimit,
        broker: u32,
        now: u64,
        resends: &mut u64,
    ) -> usize {
        let mut n = 0;
        while let Some(&slot) = self.queue.front() {
            let mut raw = [0u8; SLOT_BYTES];
            // SAFETY: `slot < STAGING_SLOTS` (checked on arrival), so the 64 bytes lie in the
            // staging buffer. The publisher may overwrite them remotely at any time; they are
            // copied once here and only the copy is used (and checked by the broker).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.staging.as_ptr().add(slot as usize * SLOT_BYTES),
                    raw.as_mut_ptr(),
                    SLOT_BYTES,
                )
            };
            let staged = decode_staged(&raw);
            let desc = staged.desc;
            if let Some(from) = staged.copy_from {
                if self.copy_resend(pool, c, &desc, from) {
                    *resends += 1;
                }
            }
            match self.submit.try_publish(&desc) {
                Ok(_) => {}
                Err(RingError::Full { .. }) => break,
                Err(e) => {
                    warn_limited!(
                        warn,
                        now,
                        "broker {broker}: verbs client {}: submission: {e}",
                        self.client_id
                    );
                    self.closing = Some(ERROR_TRANSPORT);
                    break;
                }
            }
            self.queue.pop_front();
            self.consumed += 1;
            n += 1;
            self.note_grant_use(pool, desc.log_idx);
        }
        n
    }

    /// The publisher has moved into the grant holding `log_idx`: earlier grants are done, so
    /// their registrations go (a later write into them fails at the NIC).
    fn note_grant_use(&mut self, _pool: &Pool, log_idx: u64) {
        let Some(g) = self
            .grants
            .iter()
            .find(|g| log_idx >= g.offset && log_idx < g.offset + g.bytes)
        else {
            return;
        };
        let k = g.number;
        while self.grants.front().is_some_and(|g| g.number < k) {
            self.grants.pop_front();
        }
        if k + 1 > self.taken {
            self.taken = k + 1;
            self.session.grants_taken.store(self.taken, Relaxed);
        }
    }

    /// Registers grants the broker issued since and writes them to the publisher.
    fn new_grants(&mut self, pool: &Pool, c: C, ctx: &Arc<Context>) -> Result<u64, RemoteError> {
        let issued = c.observe(&self.session.grants_issued);
        let mut n = 0;
        while self.issued_seen < issued && self.can_post() {
            let k = self.issued_seen;
            let e = &self.session.grants[grant_slot(k)];
            c.invalidate(e);
            let (offset, bytes) = (e.offset.load(Relaxed), e.bytes.load(Relaxed));
            let ptr = pool
                .data_ptr(offset, bytes)
                .map_err(RemoteError::GrantRange)?;
            // SAFETY: the pool mapping outlives the frontend (`'p`); the grant is log space
            // this session alone may fill, whose contents the broker checks before use.
            let mr = unsafe { MemoryRegion::register(ctx, ptr, bytes as usize, true) }?;
            let mut w = [0u64; 8];
            w[0] = k + 1;
            w[1] = offset;
            w[2] = bytes;
            w[3] = mr.addr();
            w[4] = u64::from(mr.rkey());
            self.post_feedback(&w, grant_offset(grant_slot(k)))?;
            self.grants.push_back(Grant {
                number: k,
                offset,
                bytes,
                _mr: mr,
            });
            self.issued_seen += 1;
            n += 1;
        }
        Ok(n)
    }

    /// Writes the counters when they changed (or the session ends: `closed`).
    /// Returns whether it wrote.
    fn write_counters(&mut self, pool: &Pool, c: C, closed: Option<u64>, now_ns: u64) -> bool {
        let s = self.session;
        let rejected = c.observe(&s.rejected_batches);
        let error = if rejected > 0 {
            s.error.load(Relaxed)
        } else {
            self.local_error
        };
        let now = [
            self.issued_seen,
            self.consumed,
            c.observe(&s.acked_messages),
            s.acked_batches.load(Relaxed),
            rejected + self.local_rejected,
            error,
            closed.unwrap_or(0),
            self.disk.word(pool, c, now_ns),
        ];
        if now == self.sent || !self.can_post() {
            return false;
        }
        if self.post_feedback(&now, 0).is_ok() {
            self.sent = now;
            true
        } else {
            self.closing.get_or_insert(ERROR_TRANSPORT);
            false
        }
    }

    fn can_post(&self) -> bool {
        self.sources.next().is_some()
    }

    /// One 64-byte RDMA WRITE of `words` to `offset` of the publisher's feedback region.
    fn post_feedback(&mut self, words: &[u64; 8], offset: u64) -> Result<(), RemoteError> {
        let next = self.sources.next().ok_or(RemoteError::NoFeedbackSource)?;
        let at = next.slot * 64;
        let dst = (self.source_buf.as_ptr() as u64 + at) as *mut u64;
        // SAFETY: slot `next.slot < FEEDBACK_SOURCES` is inside `source_buf`; the ring handed
        // it out, so the write that last used it has completed (the NIC no longer reads it).
        unsafe { std::ptr::copy_nonoverlapping(words.as_ptr(), dst, 8) };
        let write = Write {
            wr_id: next.number,
            local: self.source_buf.mr().sge(at, 64),
            remote_addr: self.feedback_addr + offset,
            rkey: self.feedback_rkey,
            imm: None,
            signaled: next.signaled,
        };
        // SAFETY: the source slot is not written again until the ring frees it (a later
        // signaled completion); the publisher's region decides whether the write is allowed.
        unsafe { self.qp.post_writes(&[write]) }?;
        self.sources.posted();
        Ok(())
    }
}

/// Connections whose request line is being read at once; more are refused at once (a
/// flood of idle connections costs a bounded number of threads).
const HELLOS_MAX: usize = 64;

/// Reads each connection's request line (off the polling loop) and hands it over.
fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<Incoming>,
    subscribers: Option<mpsc::Sender<SubscriberConn>>,
) {
    let reading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if reading.load(std::sync::atomic::Ordering::Relaxed) >= HELLOS_MAX {
            let _ = writeln!(stream, "ERR too many connections being set up; try again");
            continue;
        }
        reading.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, subs, done) = (tx.clone(), subscribers.clone(), reading.clone());
        let spawned = std::thread::Builder::new()
            .name("verbs-hello".into())
            .spawn(move || {
                read_hello(stream, &tx, subs.as_ref());
                done.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
        if spawned.is_err() {
            reading.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn read_hello(
    stream: TcpStream,
    tx: &mpsc::Sender<Incoming>,
    subscribers: Option<&mpsc::Sender<SubscriberConn>>,
) {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let Ok(read) = stream.try_clone() else { return };
    let mut line = String::new();
    let mut r = BufReader::new(read.take(MAX_LINE as u64));
    match r.read_line(&mut line) {
        Ok(n) if n > 0 && line.ends_with('\n') => {
            let line = line.trim_end().to_string();
            if line.split_ascii_whitespace().next() != Some(SUB_HELLO) {
                let _ = tx.send(Incoming { stream, line });
                return;
            }
            let refused = match subscribers {
                Some(subs) => subs
                    .send(SubscriberConn { stream, line })
                    .err()
                    .map(|e| e.0.stream),
                None => Some(stream),
            };
            if let Some(mut s) = refused {
                let _ = writeln!(
                    s,
                    "ERR class={} this broker serves no verbs subscribers",
                    crate::ErrorClass::Unavailable.code()
                );
            }
        }
        _ => {
            let mut s = stream;
            let _ = writeln!(
                s,
                "ERR expected one request line of at most {MAX_LINE} bytes"
            );
        }
    }
}
