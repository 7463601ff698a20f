//! The broker's poll-mode loop for DPDK publishers (see [`super`]): one thread per broker
//! process owns every DPDK port of the broker (its shared port, if configured, and one memif
//! port per memif publisher) and every DPDK session.
//!
//! Sessions are claimed and accepted by the TCP frontend like a TCP publisher's and handed
//! over here ([`Handoff`]); this loop attaches the publisher's link, answers it, and then, for
//! each received data frame, checks it (checksum, session, sequence, offsets), copies its
//! payload into the session's granted pool space at its final place ([`super::link`]), and
//! publishes each completed batch's descriptor into the session's submission ring, where the
//! broker checks it like any other. On a virtual device the frame's buffer is not the pool, so
//! this is one copy per byte, counted (`embar_broker_dpdk_bytes_copied_total`); a NIC that can
//! DMA into external memory would receive into the grant itself (docs/dpdk.md).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use embar_sys::clock::monotonic_ns;
use embar_sys::dpdk::{self, MbufPool, Port, RxBurst, TxBurst};

use super::link::{Complete, Landing, Receiver, Verdict};
use super::*;
use crate::batch::BatchDesc;
use crate::idle::{Idle, IdlePolicy};
use crate::log_limit::LogLimit;
use crate::pool::coherence::Coherence;
use crate::pool::doorbell;
use crate::pool::layout::{BrokerDoorbell, Session, BATCH_HEADER_VERSION};
use crate::pool::Pool;
use crate::ring::{RingError, RingProducer};
use crate::session::{self, submission_ring, GrantCursor, SessionError, RELEASED};
use crate::sync::Ordering::Relaxed;
use crate::tcp::frontend::{DpdkFrontendConfig, Handoff};
use crate::tcp::{AckFrame, ERROR_TRANSPORT};
use crate::verbs::field;
use crate::warn_limited;

/// How often a session's state is looked at when nothing happens (lifeline, the broker's
/// release, idle), and how often an ack is repeated while frames are unacknowledged.
const HOUSEKEEPING_NS: u64 = 100_000_000;
const ACK_REPEAT_NS: u64 = 1_000_000;
/// memif publishers served at once (each has a port; DPDK builds have 32 ports, Debian's
/// included, and the shared port and the ports being removed take some).
const MEMIF_SESSIONS_MAX: usize = 28;
/// Longest wait for a memif publisher's link to come up.
const LINK_TIMEOUT_NS: u64 = 5_000_000_000;

/// Counters (the broker's `embar_broker_dpdk_*` metrics).
#[derive(Debug, Default)]
pub struct DpdkStats {
    pub sessions_open: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub sessions_dropped: AtomicU64,
    pub frames_received: AtomicU64,
    /// Frames that failed their checksum or were not whole.
    pub frames_bad: AtomicU64,
    pub frames_unknown_session: AtomicU64,
    /// Frames not taken: duplicates, out of order, or past the window (no room).
    pub frames_not_taken: AtomicU64,
    pub batches_received: AtomicU64,
    /// Payload bytes copied from frame buffers into the pool.
    pub bytes_copied: AtomicU64,
}

impl DpdkStats {
    pub fn snapshot(&self) -> crate::tcp::frontend::DpdkCounters {
        crate::tcp::frontend::DpdkCounters {
            sessions_open: self.sessions_open.load(Relaxed),
            sessions_opened: self.sessions_opened.load(Relaxed),
            sessions_dropped: self.sessions_dropped.load(Relaxed),
            frames_received: self.frames_received.load(Relaxed),
            frames_bad: self.frames_bad.load(Relaxed),
            frames_unknown_session: self.frames_unknown_session.load(Relaxed),
            frames_not_taken: self.frames_not_taken.load(Relaxed),
            batches_received: self.batches_received.load(Relaxed),
            bytes_copied: self.bytes_copied.load(Relaxed),
        }
    }
}

struct Link {
    port: Port,
    mac: [u8; 6],
    /// A memif port of one session (detached with it), or the shared port.
    dedicated: bool,
}

struct Sess<'p, C: Coherence> {
    key: u32,
    /// The TCP connection the session opened on: its lifeline.
    stream: std::net::TcpStream,
    session: &'p Session,
    generation: u64,
    client_id: u64,
    link: usize,
    peer: [u8; 6],
    rx: Receiver,
    grants: GrantCursor,
    submit: RingProducer<'p, C>,
    /// A completed batch whose descriptor waits for room in the submission ring.
    ready: Option<BatchDesc>,
    submit_received: u64,
    sent: AckFrame,
    sent_expected: u32,
    last_ack_ns: u64,
    ack_due: bool,
    last_frame_ns: u64,
    last_check_ns: u64,
    /// The link is not up yet: answered once it is.
    answered: bool,
    since_ns: u64,
    /// The publisher said it is done (its link may be removed at once).
    bye: bool,
    /// The disk faults of an ACK 2 session's topic, which its acks carry.
    disk: crate::replication::DiskWatch,
    /// For the answer: the topic's ACK level and the largest batch.
    ack: u8,
    batch_limit: u64,
    closing: Option<(u64, String)>,
}

/// See the module docs.
pub struct DpdkFrontend<'p, 's, C: Coherence> {
    pool: &'p Pool,
    c: C,
    broker: u32,
    bell: &'p BrokerDoorbell,
    cfg: DpdkFrontendConfig,
    idle_timeout: Duration,
    mbufs: MbufPool,
    links: Vec<Option<Link>>,
    sessions: Vec<Sess<'p, C>>,
    /// Memif ports of ended sessions, removed once safe (see `end`).
    retiring: Vec<(Port, u64)>,
    by_key: HashMap<u32, usize>,
    next_key: u32,
    next_port: u32,
    stats: &'s DpdkStats,
    warn: LogLimit,
    rx: RxBurst,
    /// An ack burst per link, filled by a round and sent at its end.
    tx: Vec<TxBurst>,
}

impl<'p, 's, C: Coherence> DpdkFrontend<'p, 's, C> {
    pub fn new(
        pool: &'p Pool,
        c: C,
        broker: u32,
        cfg: DpdkFrontendConfig,
        stats: &'s DpdkStats,
    ) -> Result<Self, String> {
        let bell = pool.broker_doorbell(broker).map_err(|e| e.to_string())?;
        let (mbufs, shared) = prepared(&cfg)?;
        dpdk::register_thread().map_err(|e| e.to_string())?;
        let mut links = Vec::new();
        if let Some(port) = shared {
            let devargs = port.devargs().to_string();
            let mac = port.mac().map_err(|e| e.to_string())?;
            log::info!(
                "broker {broker}: DPDK port {devargs} up as {}",
                format_mac(mac)
            );
            links.push(Some(Link {
                port,
                mac,
                dedicated: false,
            }));
        }
        Ok(DpdkFrontend {
            pool,
            c,
            broker,
            bell,
            idle_timeout: cfg.idle_timeout,
            cfg,
            mbufs,
            links,
            sessions: Vec::new(),
            retiring: Vec::new(),
            by_key: HashMap::new(),
            // Keys differ from one broker run to the next, so frames of an earlier run's
            // session are not taken for a new one's.
            next_key: (monotonic_ns() as u32) | 1,
            next_port: 0,
            stats,
            warn: LogLimit::new(Duration::from_secs(10)),
            rx: RxBurst::default(),
            tx: Vec::new(),
        })
    }

    /// Attaches a session's link and starts serving it (answered once the link is up).
    pub fn adopt(&mut self, h: Handoff<'p>) {
        let now = monotonic_ns();
        let Handoff {
            mut stream,
            session,
            generation,
            client_id,
            topic,
            batch_limit,
            ack,
            line,
        } = h;
        let (c, bell) = (self.c, self.bell);
        let refuse = |stream: &mut std::net::TcpStream, why: String| {
            let _ = writeln!(stream, "ERR {why}");
            session::close(c, session, generation);
            doorbell::ring(bell);
        };
        let link = match field(&line, "link") {
            Ok(l) => l.to_string(),
            Err(e) => return refuse(&mut stream, e.to_string()),
        };
        let (link, peer) = if let Some(socket) = link.strip_prefix("memif:") {
            if socket.contains(',') || socket.is_empty() {
                return refuse(&mut stream, format!("bad memif socket {socket:?}"));
            }
            let memif = self.links.iter().flatten().filter(|l| l.dedicated).count();
            if memif + self.retiring.len() >= MEMIF_SESSIONS_MAX {
                return refuse(
                    &mut stream,
                    format!(
                        "broker {} serves {MEMIF_SESSIONS_MAX} memif publishers, the most DPDK's \
                         port table allows (RTE_MAX_ETHPORTS 32 in Debian's build); try \
                         another broker, or a shared segment (--dpdk-port)",
                        self.broker
                    ),
                );
            }
            self.next_port += 1;
            let devargs = dpdk::memif_devargs(
                &format!("net_memif_b{}s{}", self.broker, self.next_port),
                "client",
                socket,
                self.cfg.frame_bytes,
            );
            match Port::attach(&devargs, self.mbufs, 1024, 1024).and_then(|p| {
                let mac = p.mac()?;
                Ok((p, mac))
            }) {
                Ok((port, mac)) => {
                    let i = self
                        .links
                        .iter()
                        .position(Option::is_none)
                        .unwrap_or_else(|| {
                            self.links.push(None);
                            self.links.len() - 1
                        });
                    self.links[i] = Some(Link {
                        port,
                        mac,
                        dedicated: true,
                    });
                    (i, [0xff; 6])
                }
                Err(e) => return refuse(&mut stream, format!("memif link: {e}")),
            }
        } else if let Some(mac) = link.strip_prefix("mac:") {
            let Some(peer) = parse_mac(mac) else {
                return refuse(&mut stream, format!("bad MAC {mac:?}"));
            };
            match self
                .links
                .iter()
                .position(|l| l.as_ref().is_some_and(|l| !l.dedicated))
            {
                Some(i) => (i, peer),
                None => {
                    return refuse(
                        &mut stream,
                        format!(
                            "broker {} has no shared DPDK port (start it with --dpdk-port)",
                            self.broker
                        ),
                    )
                }
            }
        } else {
            return refuse(
                &mut stream,
                format!("link={link}: expected memif:SOCKET or mac:MAC"),
            );
        };
        let _ = stream.set_nonblocking(true);
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(2);
        let limit = u32::try_from(batch_limit).unwrap_or(u32::MAX);
        log::info!(
            "broker {}: DPDK session {key:#x} of client {client_id} opened (ack {ack})",
            self.broker
        );
        self.stats.sessions_opened.fetch_add(1, Relaxed);
        self.by_key.insert(key, self.sessions.len());
        self.sessions.push(Sess {
            key,
            stream,
            session,
            generation,
            client_id,
            link,
            peer,
            rx: Receiver::new(0, limit),
            grants: GrantCursor::default(),
            submit: RingProducer::new(submission_ring(session), self.c),
            ready: None,
            submit_received: 0,
            sent: AckFrame::default(),
            sent_expected: 0,
            last_ack_ns: 0,
            ack_due: false,
            last_frame_ns: now,
            last_check_ns: now,
            answered: false,
            since_ns: now,
            bye: false,
            disk: crate::replication::DiskWatch::new(topic, ack),
            ack,
            batch_limit,
            closing: None,
        });
    }

    /// One round: every port's frames, then every session's submissions, acks and state.
    pub fn poll_once(&mut self) -> usize {
        let now = monotonic_ns();
        let mut work = 0;
        let mut k = 0;
        while k < self.retiring.len() {
            let (port, deadline) = &self.retiring[k];
            if *deadline <= now || !port.link_up() {
                let (port, _) = self.retiring.swap_remove(k);
                if let Err(e) = port.detach() {
                    log::warn!("broker {}: detaching a memif port: {e}", self.broker);
                }
            } else {
                k += 1;
            }
        }
        for l in 0..self.links.len() {
            work += self.receive(l, now);
        }
        // The bursts are kept from round to round (no allocation per round).
        let mut tx = std::mem::take(&mut self.tx);
        tx.resize_with(self.links.len(), TxBurst::default);
        for i in 0..self.sessions.len() {
            work += self.serve(i, now, &mut tx);
        }
        for (burst, link) in tx.iter_mut().zip(&self.links) {
            if let Some(link) = link {
                burst.send(&link.port);
            }
        }
        self.tx = tx;
        // Sessions that ended leave (from the back, so indices stay valid while removing).
        let mut i = self.sessions.len();
        while i > 0 {
            i -= 1;
            if let Some((code, why)) = self.sessions[i].closing.take() {
                self.end(i, code, &why);
            }
        }
        self.stats
            .sessions_open
            .store(self.sessions.len() as u64, Relaxed);
        work
    }

    fn receive(&mut self, l: usize, now: u64) -> usize {
        let Some(link) = self.links[l].as_ref() else {
            return 0;
        };
        let n = link.port.rx(&mut self.rx);
        if n == 0 {
            return 0;
        }
        // Counted per burst, not per frame (the counters are shared with the metrics).
        let (mut bad, mut unknown, mut not_taken, mut copied) = (0, 0, 0, 0);
        for i in 0..n {
            let Ok(frame) = self.rx.frame(i) else {
                bad += 1;
                continue;
            };
            let Some((src, frame)) = read_eth(frame) else {
                // Not ours (a shared segment carries other traffic too).
                continue;
            };
            let (h, payload) = match Header::read(frame) {
                Ok(x) => x,
                Err(e) => {
                    bad += 1;
                    warn_limited!(
                        self.warn,
                        now,
                        "broker {}: DPDK frame dropped: {e}",
                        self.broker
                    );
                    continue;
                }
            };
            let s = match self.by_key.get(&h.session) {
                Some(&k) if self.sessions[k].link == l && h.kind == KIND_DATA => {
                    &mut self.sessions[k]
                }
                _ => {
                    unknown += 1;
                    warn_limited!(
                        self.warn,
                        now,
                        "broker {}: DPDK frame of kind {} for unknown session {:#x} from {} dropped",
                        self.broker,
                        h.kind,
                        h.session,
                        format_mac(src)
                    );
                    continue;
                }
            };
            if s.closing.is_some() || !s.answered {
                continue;
            }
            s.last_frame_ns = now;
            let mut land = PoolLanding {
                pool: self.pool,
                c: self.c,
                bell: self.bell,
                session: s.session,
                grants: &mut s.grants,
                ready: s.ready.is_some(),
            };
            match s.rx.on_data(&h.data(), payload, &mut land) {
                Verdict::Took(done) => {
                    copied += payload.len() as u64;
                    if let Some(Complete {
                        batch_seq,
                        num_msg,
                        bytes,
                        at,
                    }) = done
                    {
                        s.ready = Some(BatchDesc {
                            batch_seq,
                            client_id: s.client_id,
                            num_msg,
                            broker_id: self.broker,
                            total_size: u64::from(bytes),
                            log_idx: at,
                            start_logical_offset: 0,
                            version_flags: u64::from(BATCH_HEADER_VERSION),
                        });
                        // Handed on now, so that the next batch's first frame, often in
                        // this same burst, finds the way clear.
                        hand_on(s, self.bell, self.stats);
                    }
                }
                Verdict::Stale => {
                    // A resend of what arrived (its ack was late): the regular acks say so.
                    // An ack for each would read as duplicate acks, the sign of a loss, and
                    // start another resend.
                    not_taken += 1;
                }
                Verdict::Ahead => {
                    not_taken += 1;
                    s.ack_due = true;
                    warn_limited!(
                        self.warn,
                        now,
                        "broker {}: DPDK session {:#x}: frame {} dropped, frame {} expected \
                         (lost or reordered on the way, or out of the window)",
                        self.broker,
                        s.key,
                        h.seq,
                        s.rx.expected()
                    );
                }
                Verdict::NoRoom => {
                    not_taken += 1;
                    s.ack_due = true;
                }
                Verdict::Violation(why) => {
                    self.stats.sessions_dropped.fetch_add(1, Relaxed);
                    s.closing = Some((ERROR_TRANSPORT, why));
                }
            }
        }
        let st = self.stats;
        st.frames_received.fetch_add(n as u64, Relaxed);
        for (counter, v) in [
            (&st.frames_bad, bad),
            (&st.frames_unknown_session, unknown),
            (&st.frames_not_taken, not_taken),
            (&st.bytes_copied, copied),
        ] {
            if v > 0 {
                counter.fetch_add(v, Relaxed);
            }
        }
        n
    }

    fn serve(&mut self, i: usize, now: u64, tx: &mut [TxBurst]) -> usize {
        let (c, bell) = (self.c, self.bell);
        let s = &mut self.sessions[i];
        if s.closing.is_some() {
            return 0;
        }
        let Some(link) = self.links[s.link].as_ref() else {
            s.closing = Some((ERROR_TRANSPORT, "its link is gone".into()));
            return 1;
        };
        if !s.answered {
            if !link.port.link_up() {
                if now.saturating_sub(s.since_ns) > LINK_TIMEOUT_NS {
                    s.closing = Some((ERROR_TRANSPORT, "its link did not come up".into()));
                }
                return 0;
            }
            let (ack, batch_limit) = (s.ack, s.batch_limit);
            let window = self.window(i);
            let s = &mut self.sessions[i];
            let ok = writeln!(
                s.stream,
                "OK broker={} batch_bytes={batch_limit} ack={ack} session={} mac={} frame_bytes={} window={window}",
                self.broker,
                s.key,
                format_mac(link.mac),
                self.cfg.frame_bytes,
            );
            if ok.is_err() {
                s.closing = Some((ERROR_TRANSPORT, "the publisher went away".into()));
            }
            s.answered = true;
            return 1;
        }
        let mut work = usize::from(hand_on(s, bell, self.stats));
        if now.saturating_sub(s.last_check_ns) > HOUSEKEEPING_NS {
            s.last_check_ns = now;
            let mut b = [0u8; 8];
            match s.stream.read(&mut b) {
                Ok(0) => {
                    s.closing = Some((
                        ERROR_TRANSPORT,
                        "the publisher closed its connection".into(),
                    ))
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Ok(n) if b[..n].starts_with(BYE.as_bytes()) => {
                    s.bye = true;
                    s.closing = Some((ERROR_TRANSPORT, "the publisher closed its session".into()))
                }
                Ok(_) => {
                    self.stats.sessions_dropped.fetch_add(1, Relaxed);
                    s.closing = Some((
                        ERROR_TRANSPORT,
                        "it sent bytes on its TCP connection after the handshake".into(),
                    ))
                }
                Err(e) => s.closing = Some((ERROR_TRANSPORT, format!("its connection: {e}"))),
            }
            if c.observe(&s.session.accepted) == s.generation << 8 | RELEASED {
                let code = SessionError::from_code(s.session.error.load(Relaxed)) as u64;
                s.closing = Some((code, "the broker ended the session".into()));
            }
            if s.rx.mid_batch()
                && now.saturating_sub(s.last_frame_ns) > self.idle_timeout.as_nanos() as u64
            {
                self.stats.sessions_dropped.fetch_add(1, Relaxed);
                s.closing = Some((
                    ERROR_TRANSPORT,
                    format!("it stalled mid-batch for {:?}", self.idle_timeout),
                ));
            }
        }
        let disk = s.disk.word(self.pool, c, now);
        let counters = crate::tcp::frontend::counters(c, s.session, s.submit_received, disk);
        let expected = s.rx.expected();
        let changed = counters != s.sent || expected != s.sent_expected;
        let unacked = s.sent.acked_batches + s.sent.rejected_batches < s.submit_received;
        if changed
            || s.ack_due
            || ((unacked || s.rx.mid_batch()) && now.saturating_sub(s.last_ack_ns) > ACK_REPEAT_NS)
        {
            let window = self.window(i);
            let s = &mut self.sessions[i];
            let link = self.links[s.link].as_ref().expect("checked above");
            let burst = &mut tx[s.link];
            if burst.is_full() {
                burst.send(&link.port);
            }
            let h = ack_header(s.key, expected, window);
            let pushed = push_frame(
                burst,
                self.mbufs,
                s.peer,
                link.mac,
                &h,
                &counters.encode(),
                false,
            );
            if matches!(pushed, Ok(true)) {
                s.sent = counters;
                s.sent_expected = expected;
                s.last_ack_ns = now;
                s.ack_due = false;
                work += 1;
            }
        }
        work
    }

    /// Frames session `i` may send past what it has had acked: what its grants have room
    /// for (the broker's credits), at most [`MAX_WINDOW`].
    fn window(&self, i: usize) -> u32 {
        let s = &self.sessions[i];
        let room = s.grants.room(self.c, s.session, s.batch_limit) + u64::from(s.rx.batch_left());
        let payload_per_frame = self.cfg.frame_bytes - (ETH_BYTES + Header::BYTES) as u32;
        let frames = room.div_ceil(u64::from(payload_per_frame));
        // A batch's first frame is taken only with room for the whole batch; a window of at
        // least one frame lets the publisher learn when room comes back.
        (frames as u32).clamp(1, MAX_WINDOW)
    }

    /// Ends session `i`: tells the publisher why (a last ack with `closed`, and the TCP
    /// connection closes), closes the pool session (the broker reclaims its grants; a batch
    /// not finished is never submitted), detaches a memif link.
    fn end(&mut self, i: usize, code: u64, why: &str) {
        let mut s = self.sessions.swap_remove(i);
        self.by_key.remove(&s.key);
        if i < self.sessions.len() {
            let moved = self.sessions[i].key;
            self.by_key.insert(moved, i);
        }
        if let Some(link) = self.links[s.link].as_ref() {
            let last = AckFrame {
                closed: code.max(1),
                ..s.sent
            };
            let h = ack_header(s.key, s.rx.expected(), 0);
            let mut tx = TxBurst::default();
            let _ = push_frame(
                &mut tx,
                self.mbufs,
                s.peer,
                link.mac,
                &h,
                &last.encode(),
                false,
            );
            tx.send(&link.port);
        }
        let _ = writeln!(s.stream, "END {}", describe(code, why));
        let _ = s.stream.shutdown(std::net::Shutdown::Both);
        session::close(self.c, s.session, s.generation);
        doorbell::ring(self.bell);
        if self.links[s.link].as_ref().is_some_and(|l| l.dedicated) {
            if let Some(l) = self.links[s.link].take() {
                // A memif port is removed only when its peer is not removing its own at the
                // same moment (DPDK 22.11's memif can then crash in its interrupt thread): at
                // once after the publisher's goodbye (it waits for this side), else once the
                // link is down (the peer is gone) or a second has passed.
                let deadline = if s.bye {
                    0
                } else {
                    monotonic_ns() + 1_000_000_000
                };
                self.retiring.push((l.port, deadline));
            }
        }
        if code == ERROR_TRANSPORT && !why.contains("closed its connection") {
            log::warn!(
                "broker {}: DPDK session {:#x} of client {} dropped: {why}",
                self.broker,
                s.key,
                s.client_id
            );
        } else {
            log::info!(
                "broker {}: DPDK session {:#x} of client {} ended: {why}",
                self.broker,
                s.key,
                s.client_id
            );
        }
    }

    /// Whether a session waits on the pool or has frames in flight (the loop keeps polling).
    pub fn busy(&self) -> bool {
        self.sessions
            .iter()
            .any(|s| s.ready.is_some() || s.rx.mid_batch() || !s.answered || s.ack_due)
    }

    pub fn has_sessions(&self) -> bool {
        !self.sessions.is_empty()
    }
}

/// The header of an ack: the next frame `seq` session `key` expects, `window` more allowed.
fn ack_header(key: u32, seq: u32, window: u32) -> Header {
    Header {
        kind: KIND_ACK,
        session: key,
        seq,
        window,
        ..Header::default()
    }
}

/// Publishes a session's completed batch into its submission ring, if one waits and the ring
/// has room; whether it did.
fn hand_on<C: Coherence>(s: &mut Sess<'_, C>, bell: &BrokerDoorbell, stats: &DpdkStats) -> bool {
    let Some(desc) = s.ready else {
        return false;
    };
    match s.submit.try_publish(&desc) {
        Ok(_) => {
            s.ready = None;
            s.submit_received += 1;
            s.ack_due = true;
            stats.batches_received.fetch_add(1, Relaxed);
            doorbell::ring(bell);
            true
        }
        Err(RingError::Full { .. }) => false,
        Err(e) => {
            s.closing = Some((ERROR_TRANSPORT, format!("submission ring: {e}")));
            false
        }
    }
}

fn describe(code: u64, why: &str) -> String {
    if code == ERROR_TRANSPORT {
        why.to_string()
    } else {
        format!("{why}: {}", SessionError::from_code(code).describe())
    }
}

/// A session's grants as the receiver's landing.
struct PoolLanding<'a, 'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    bell: &'p BrokerDoorbell,
    session: &'p Session,
    grants: &'a mut GrantCursor,
    /// The previous batch still waits for ring room: no new batch yet.
    ready: bool,
}

impl<C: Coherence> Landing for PoolLanding<'_, '_, C> {
    fn place(&mut self, bytes: u32) -> Result<Option<u64>, String> {
        if self.ready {
            return Ok(None);
        }
        self.grants
            .place(self.pool, self.c, self.session, self.bell, u64::from(bytes))
    }

    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<(), String> {
        let dst = self
            .pool
            .data_ptr(at, bytes.len() as u64)
            .map_err(|e| format!("a grant: {e}"))?;
        // SAFETY: `dst..dst + len` was bounds-checked in the pool's mapping just above and
        // lies in a grant this session took and has not submitted (the receiver writes only
        // inside a place `GrantCursor::place` gave for the batch): nothing else writes it,
        // and the broker reads it only after the batch's descriptor is published. The
        // source is a received frame's buffer, not pool memory, so the ranges do not overlap.
        // Plain stores, not `stream_copy` as the shm publisher: a frame's piece of a batch
        // starts and ends inside cache lines, so each boundary line would be written partly
        // by non-temporal and partly by plain stores, and the bench showed no gain (within
        // the 10-20% it moves between two builds of the same DPDK code).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
        Ok(())
    }
}

/// What [`prepare`] made: the frame buffers, and the shared port if one is configured.
static PREPARED: Mutex<Option<(MbufPool, Option<Port>)>> = Mutex::new(None);

/// Starts DPDK's environment, makes the broker's frame buffers and attaches its shared port,
/// so that a bad option fails the broker's start with its reason (the frontend takes them
/// over when it starts).
pub fn prepare(cfg: &DpdkFrontendConfig) -> Result<(), String> {
    let mut p = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
    if p.is_some() {
        return Ok(());
    }
    dpdk::init(&cfg.eal_args).map_err(|e| e.to_string())?;
    // Room for a whole frame in one buffer, and at least the 2 KiB that af_packet and memif
    // ports receive into by default.
    let mbufs = MbufPool::new(8191, cfg.frame_bytes.max(2048)).map_err(|e| e.to_string())?;
    let port = match &cfg.port {
        Some(devargs) => Some(Port::attach(devargs, mbufs, 1024, 1024).map_err(|e| e.to_string())?),
        None => None,
    };
    *p = Some((mbufs, port));
    Ok(())
}

fn prepared(cfg: &DpdkFrontendConfig) -> Result<(MbufPool, Option<Port>), String> {
    prepare(cfg)?;
    let mut p = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
    let (mbufs, port) = p.as_mut().expect("prepared just now");
    Ok((*mbufs, port.take()))
}

/// Runs the DPDK frontend until `stop`, taking sessions from `handoffs`.
pub fn run<'p, C: Coherence>(
    pool: &'p Pool,
    c: C,
    broker: u32,
    cfg: DpdkFrontendConfig,
    handoffs: mpsc::Receiver<Handoff<'p>>,
    stats: &DpdkStats,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut f = DpdkFrontend::new(pool, c, broker, cfg, stats)?;
    // Poll mode while sessions are open; an idle loop rests (on a host of two CPUs a
    // spinning loop would take a core from the publishers), sleeping on the handoff
    // channel when no session is open at all.
    let mut idle = Idle::new(IdlePolicy {
        spin_rounds: 256,
        yield_for: Duration::from_millis(1),
        rest: Duration::from_micros(50),
    });
    while !stop.load(Relaxed) {
        let mut work = 0;
        loop {
            match handoffs.try_recv() {
                Ok(h) => {
                    f.adopt(h);
                    work += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        work += f.poll_once();
        if let Some(rest) = idle.step(work) {
            if f.has_sessions()
                || f.links
                    .iter()
                    .any(|l| l.as_ref().is_some_and(|l| !l.dedicated))
            {
                if !f.busy() {
                    std::thread::sleep(rest);
                }
            } else if let Ok(h) = handoffs.recv_timeout(Duration::from_millis(100)) {
                f.adopt(h);
            }
        }
    }
    Ok(())
}
