//! Remote subscribers over verbs: the broker's side ([`run`], one thread per subscriber)
//! and the client's ([`VerbsSubscriber`]), the shared ends of
//! [`crate::remote_subscriber`] over an RC queue pair (protocol: [`super`]).
//!
//! The subscriber registers a receive ring; the broker reads the log for it as for a TCP
//! subscriber (copy, then validate, retention checked after the copy), copies each checked
//! window's frame into a local mirror of that ring (registered, never remotely writable) and
//! RDMA-writes it to the same offset of the subscriber's ring, the last write of each chain
//! carrying the chain's byte count as its immediate. The subscriber polls its completion
//! queue, copies the bytes out of its ring into the same buffer a TCP subscriber reads into,
//! and RDMA-writes its read position into the broker's credit word.
//!
//! Why not RDMA READ of the pool: a remote reader could not re-check retention after its
//! read as atomically as the broker does (the read is in flight while a publisher may reuse
//! the space), the pool's log would have to be registered for remote reads (every topic, not
//! one subscriber's share), and the reader would need the pool's metadata to find batches.
//! The broker's copy is checked before a byte leaves it. (docs/verbs.md has the whole case.)

use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use embar_sys::verbs::{
    Completion, CompletionQueue, Context, Endpoint, Opcode, QueuePair, RegisteredBuffer,
    VerbsError, Write,
};

use super::credits::{RingReader, RingWriter};
use super::*;
use crate::client::subscriber::StartAt;
use crate::idle::{Idle, IdlePolicy};
use crate::pool::coherence::Coherence;
use crate::pool::Pool;
use crate::remote_subscriber::{
    Dial, Link, RemoteSubscriber, SubscribeError, SubscriberConn, SubscriberThreads, WindowSink,
};
use crate::sync::Ordering::Relaxed;
use crate::tcp::subscriber::peer_closed;
use crate::tcp::{parse_answer, read_line};
use crate::ErrorClass;

/// How often a waiting side looks at the handshake connection for the other's end.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait for the subscriber's READY, and for a broker's answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an ended stream's last writes may take to complete before the QP goes.
const DRAIN: Duration = Duration::from_millis(500);
/// How a side waiting on the other rests: spin a little, yield briefly, then sleep. Short
/// on yielding: at a light load (a message a millisecond) a millisecond of yields kept a CPU
/// busy all the time, which on a host of two CPUs (the rxe VM) took it from the publisher
/// and the broker and raised publish-to-ack p50 from 0.3 to 14 ms. A sleeping side wakes
/// within `rest`; blocking on the completion channel instead is not built.
const WAITING: IdlePolicy = IdlePolicy {
    spin_rounds: 64,
    yield_for: Duration::from_micros(100),
    rest: Duration::from_micros(200),
};

/// How a broker serves its verbs subscribers.
#[derive(Clone, Copy, Debug)]
pub struct ServeConfig {
    /// A subscriber that returns no credit this long while frames wait is dropped.
    pub idle_timeout: Duration,
    /// Subscribers at most (each has a thread and a mirror of its ring).
    pub max_subscribers: usize,
}

/// Serves the verbs subscribers the verbs frontend hands over on `incoming`, each on a
/// thread of its own, until `stop`.
pub fn run<C: Coherence>(
    pool: &Pool,
    c: C,
    broker: u32,
    ctx: &Arc<Context>,
    incoming: mpsc::Receiver<SubscriberConn>,
    cfg: ServeConfig,
    stop: &AtomicBool,
) {
    let threads = SubscriberThreads::new(cfg.max_subscribers);
    std::thread::scope(|scope| {
        while !stop.load(Relaxed) {
            match incoming.recv_timeout(LIVENESS_INTERVAL) {
                Ok(conn) => threads.spawn(scope, broker, "verbs-subscriber", conn, move |conn| {
                    serve(pool, c, broker, ctx, conn, cfg.idle_timeout, stop)
                }),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
}

/// Serves one verbs subscriber (see the module docs).
fn serve<C: Coherence>(
    pool: &Pool,
    c: C,
    broker: u32,
    ctx: &Arc<Context>,
    conn: SubscriberConn,
    idle_timeout: Duration,
    stop: &AtomicBool,
) {
    crate::remote_subscriber::serve(pool, c, broker, "verbs", conn, stop, |stream, line| {
        let (ep, ring) = parse_request(line).map_err(|e| (ErrorClass::InvalidInput, e))?;
        let sink = RingSink::new(ctx, stream, &ep, ring, idle_timeout, stop)
            .map_err(|e| (ErrorClass::Unavailable, format!("broker {broker}: {e}")))?;
        let ok = format!(
            "ep={} credit={}:{} broker={broker}",
            sink.qp.endpoint(),
            sink.credit.mr().addr(),
            sink.credit.mr().rkey()
        );
        Ok((sink, ok))
    });
}

/// Where the subscriber's ring is: `(addr, rkey, bytes)`.
type RemoteRing = (u64, u32, u64);

/// The endpoint and ring of a subscriber's request line.
fn parse_request(line: &str) -> Result<(Endpoint, RemoteRing), String> {
    let ep: Endpoint = field(line, "ep")
        .map_err(|e| e.to_string())?
        .parse()
        .map_err(|e: VerbsError| format!("bad ep=: {e}"))?;
    let ring = field(line, "ring").map_err(|e| e.to_string())?;
    let r = parse_nums(ring, 3).map_err(|e| e.to_string())?;
    if r[1] > u64::from(u32::MAX) || !(SUB_RING_BYTES_MIN..=SUB_RING_BYTES_MAX).contains(&r[2]) {
        return Err(format!(
            "bad ring= {ring:?} (ADDR:RKEY:BYTES, {SUB_RING_BYTES_MIN} to {SUB_RING_BYTES_MAX} bytes)"
        ));
    }
    Ok((ep, (r[0], r[1] as u32, r[2])))
}

/// The broker's end of one verbs subscriber: its QP, the mirror of its ring, the word it
/// writes its credits into.
struct RingSink<'a> {
    qp: QueuePair,
    cq: Arc<CompletionQueue>,
    mirror: RegisteredBuffer,
    credit: RegisteredBuffer,
    ring_addr: u64,
    ring_rkey: u32,
    ring_bytes: u64,
    writer: RingWriter,
    stream: TcpStream,
    idle_timeout: Duration,
    stop: &'a AtomicBool,
    completions: Vec<Completion>,
}

impl<'a> RingSink<'a> {
    fn new(
        ctx: &Arc<Context>,
        stream: &TcpStream,
        ep: &Endpoint,
        (ring_addr, ring_rkey, ring_bytes): RemoteRing,
        idle_timeout: Duration,
        stop: &'a AtomicBool,
    ) -> Result<RingSink<'a>, String> {
        let verbs = |e: VerbsError| e.to_string();
        let cq = CompletionQueue::new(ctx, 2 * SUB_RECEIVES + 8).map_err(verbs)?;
        let mut qp = QueuePair::new(ctx, &cq, &cq, 2 * SUB_RECEIVES + 4, 1).map_err(verbs)?;
        let mirror = RegisteredBuffer::new(ctx, ring_bytes as usize, false).map_err(verbs)?;
        // The one region the subscriber may write: its credit.
        let credit = RegisteredBuffer::new(ctx, CREDIT_BYTES, true).map_err(verbs)?;
        qp.connect(ep, true).map_err(verbs)?;
        let stream = stream.try_clone().map_err(|e| format!("its socket: {e}"))?;
        Ok(RingSink {
            qp,
            cq,
            mirror,
            credit,
            ring_addr,
            ring_rkey,
            ring_bytes,
            writer: RingWriter::new(ring_bytes, SUB_RECEIVES as usize),
            stream,
            idle_timeout,
            stop,
            completions: Vec::with_capacity(16),
        })
    }

    /// Completions of the writes, and the subscriber's latest credit.
    fn reap(&mut self) -> Result<(), String> {
        loop {
            self.completions.clear();
            let n = self
                .cq
                .poll(&mut self.completions)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            for c in &self.completions {
                if !c.ok() {
                    return Err(format!("an RDMA write to it failed: {}", c.status_str()));
                }
                self.writer.completed(c.wr_id);
            }
        }
        let (read, check) = (self.credit.load_u64(0), self.credit.load_u64(8));
        if check == !read {
            self.writer
                .credit(read)
                .map_err(|e| format!("it returned a bad credit: {e}"))?;
        }
        Ok(())
    }

    /// Posts `n` bytes of the mirror from stream position `at` as one chain, ending in the
    /// immediate that announces them.
    fn post(&mut self, at: u64, n: u64) -> Result<(), String> {
        let off = at % self.ring_bytes;
        let first = n.min(self.ring_bytes - off);
        let end = at + n;
        let write = |off: u64, len: u64, last: bool| Write {
            wr_id: end,
            local: self.mirror.mr().sge(off, len as u32),
            remote_addr: self.ring_addr + off,
            rkey: self.ring_rkey,
            imm: last.then_some(n as u32),
            signaled: last,
        };
        // At most two writes (the ring wraps once): no allocation per window.
        let (one, two) = (
            [write(off, n, true)],
            [write(off, first, false), write(0, n - first, true)],
        );
        let chain: &[_] = if first == n { &one } else { &two };
        // SAFETY: each local range lies in the registered mirror; the writer hands those
        // bytes out again only once this chain completed (`RingWriter::room`), so they are
        // not rewritten while the NIC reads them. The subscriber's registration decides
        // whether the remote range may be written.
        unsafe { self.qp.post_writes(chain) }.map_err(|e| e.to_string())
    }
}

impl WindowSink for RingSink<'_> {
    fn ready(&mut self) -> Result<(), String> {
        let _ = self.stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        match read_line(&mut self.stream) {
            Ok(l) if l == "READY" => Ok(()),
            Ok(l) => Err(format!("expected READY, got {l:?}")),
            Err(e) => Err(format!("no READY: {e}")),
        }
    }

    fn send(&mut self, head: &[u8], body: &[u8]) -> Result<(), String> {
        let total = (head.len() + body.len()) as u64;
        let mut done = 0u64;
        let mut waiting: Option<Instant> = None;
        let mut idle = Idle::new(WAITING);
        let mut last_check = Instant::now();
        while done < total {
            self.reap()?;
            let n = self.writer.room().min(total - done);
            if n == 0 {
                // The subscriber's ring is full (or its receives are used up): wait for a
                // credit, at most the idle timeout.
                let since = *waiting.get_or_insert_with(Instant::now);
                if since.elapsed() > self.idle_timeout {
                    return Err(format!(
                        "it returned no credit for {:?}; dropped",
                        self.idle_timeout
                    ));
                }
                if self.stop.load(Relaxed) {
                    return Err("the broker is stopping".into());
                }
                if last_check.elapsed() > LIVENESS_INTERVAL {
                    last_check = Instant::now();
                    if peer_closed(&self.stream) {
                        return Err("the subscriber closed the connection".into());
                    }
                }
                idle.after(0, std::thread::sleep);
                continue;
            }
            waiting = None;
            idle.after(1, |_| {});
            let at = self.writer.written();
            let mirror_at = (at % self.ring_bytes) as usize;
            // The frame's bytes `done..done + n`: part of the header, then of the body.
            let (d, n_us) = (done as usize, n as usize);
            let from_head = head.len().saturating_sub(d).min(n_us);
            if from_head > 0 {
                self.mirror.copy_in(mirror_at, &head[d..d + from_head]);
            }
            let b = (d + from_head).saturating_sub(head.len());
            let from_body = n_us - from_head;
            if from_body > 0 {
                self.mirror.copy_in(
                    (mirror_at + from_head) % self.ring_bytes as usize,
                    &body[b..b + from_body],
                );
            }
            self.post(at, n)?;
            self.writer.posted(n);
            done += n;
        }
        Ok(())
    }

    fn gone(&mut self) -> bool {
        peer_closed(&self.stream) || self.reap().is_err()
    }

    fn finish(&mut self) {
        let began = Instant::now();
        while !self.writer.all_completed() && began.elapsed() < DRAIN {
            if self.reap().is_err() {
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Where and how a verbs subscriber connects.
#[derive(Clone, Debug)]
pub struct VerbsSubscriberConfig {
    /// RDMA device (the first one when `None`).
    pub device: Option<String>,
    /// GID index (RoCEv2 over IPv4: usually 1 on rxe).
    pub gid_index: u8,
    /// Bytes of the receive ring (the broker keeps a mirror as large).
    pub ring_bytes: u64,
}

impl Default for VerbsSubscriberConfig {
    fn default() -> Self {
        VerbsSubscriberConfig {
            device: None,
            gid_index: 1,
            ring_bytes: 8 << 20,
        }
    }
}

/// Opens verbs links to brokers' verbs ports, on one device.
pub struct VerbsDial {
    ctx: Arc<Context>,
    ring_bytes: u64,
}

impl VerbsDial {
    /// Opens the device (a host without one gets [`SubscribeError::Local`] saying so).
    pub fn new(cfg: &VerbsSubscriberConfig) -> Result<VerbsDial, SubscribeError> {
        if !(SUB_RING_BYTES_MIN..=SUB_RING_BYTES_MAX).contains(&cfg.ring_bytes) {
            return Err(SubscribeError::Local(format!(
                "a ring of {} bytes (from {SUB_RING_BYTES_MIN} to {SUB_RING_BYTES_MAX})",
                cfg.ring_bytes
            )));
        }
        let ctx = Context::open(cfg.device.as_deref(), cfg.gid_index).map_err(local)?;
        Ok(VerbsDial {
            ctx,
            ring_bytes: cfg.ring_bytes,
        })
    }
}

fn local(e: VerbsError) -> SubscribeError {
    SubscribeError::Local(format!("verbs: {e}"))
}

/// One broker's stream of windows into this subscriber's ring.
pub struct VerbsLink {
    qp: QueuePair,
    cq: Arc<CompletionQueue>,
    ring: RegisteredBuffer,
    /// The source of credit writes (one in flight at a time).
    credit_src: RegisteredBuffer,
    credit_addr: u64,
    credit_rkey: u32,
    reader: RingReader,
    stream: TcpStream,
    last_check: Instant,
    completions: Vec<Completion>,
}

impl Dial for VerbsDial {
    type Link = VerbsLink;

    fn dial(
        &mut self,
        addr: SocketAddr,
        topic: &str,
        from: &str,
    ) -> Result<VerbsLink, SubscribeError> {
        let ctx = &self.ctx;
        let cq = CompletionQueue::new(ctx, SUB_RECEIVES + 8).map_err(local)?;
        let mut qp = QueuePair::new(ctx, &cq, &cq, 4, SUB_RECEIVES).map_err(local)?;
        let ring = RegisteredBuffer::new(ctx, self.ring_bytes as usize, true).map_err(local)?;
        let credit_src = RegisteredBuffer::new(ctx, CREDIT_BYTES, false).map_err(local)?;
        let unreachable = |e: std::io::Error| SubscribeError::unreachable(addr, e);
        let mut s = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(|e| {
            SubscribeError::unreachable(addr, format!("cannot connect to its verbs port: {e}"))
        })?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(unreachable)?;
        let _ = s.set_nodelay(true);
        writeln!(
            s,
            "{SUB_HELLO} topic={topic} from={from} ep={} ring={}:{}:{}",
            qp.endpoint(),
            ring.mr().addr(),
            ring.mr().rkey(),
            self.ring_bytes
        )
        .map_err(unreachable)?;
        let line = read_line(&mut s).map_err(unreachable)?;
        parse_answer(&line).map_err(|a| SubscribeError::refused(addr, a))?;
        // `field` reads the words after the first (`OK`).
        let fields = line.as_str();
        let bad = |e: String| SubscribeError::BadFrame {
            addr,
            reason: format!("answer {line:?}: {e}"),
        };
        let ep: Endpoint = field(fields, "ep")
            .map_err(|e| bad(e.to_string()))?
            .parse()
            .map_err(|e: VerbsError| bad(e.to_string()))?;
        let cr = parse_nums(field(fields, "credit").map_err(|e| bad(e.to_string()))?, 2)
            .map_err(|e| bad(e.to_string()))?;
        if cr[1] > u64::from(u32::MAX) {
            return Err(bad("bad credit=".into()));
        }
        qp.connect(&ep, true).map_err(local)?;
        // Every receive before READY: the broker writes only after it.
        for k in 0..SUB_RECEIVES {
            // SAFETY: no buffer; a WRITE_WITH_IMM consumes it.
            unsafe { qp.post_recv(u64::from(k), None) }.map_err(local)?;
        }
        s.write_all(b"READY\n").map_err(unreachable)?;
        Ok(VerbsLink {
            qp,
            cq,
            reader: RingReader::new(self.ring_bytes),
            ring,
            credit_src,
            credit_addr: cr[0],
            credit_rkey: cr[1] as u32,
            stream: s,
            last_check: Instant::now(),
            completions: Vec::with_capacity(16),
        })
    }
}

fn link_failed(why: String) -> std::io::Error {
    std::io::Error::other(why)
}

impl VerbsLink {
    /// Chains that arrived (their receives posted again), and credit writes done.
    fn reap(&mut self) -> std::io::Result<()> {
        loop {
            self.completions.clear();
            let n = self
                .cq
                .poll(&mut self.completions)
                .map_err(|e| link_failed(e.to_string()))?;
            if n == 0 {
                return Ok(());
            }
            for i in 0..n {
                let c = self.completions[i];
                if !c.ok() {
                    return Err(link_failed(format!(
                        "the RDMA link to the broker failed: {}",
                        c.status_str()
                    )));
                }
                match c.opcode {
                    Opcode::RecvRdmaWithImm => {
                        let bytes = u64::from(c.imm.unwrap_or(0));
                        self.reader
                            .arrived(bytes)
                            .map_err(|e| link_failed(e.to_string()))?;
                        // SAFETY: no buffer; a WRITE_WITH_IMM consumes it.
                        unsafe { self.qp.post_recv(c.wr_id, None) }
                            .map_err(|e| link_failed(e.to_string()))?;
                    }
                    Opcode::RdmaWrite => self.reader.credit_completed(),
                    o => return Err(link_failed(format!("an unexpected completion {o:?}"))),
                }
            }
        }
    }

    /// Sends the read position to the broker, if it moved and no credit is in flight.
    fn credit(&mut self) -> std::io::Result<()> {
        let Some(read) = self.reader.credit_due() else {
            return Ok(());
        };
        let mut words = [0u8; 16];
        words[..8].copy_from_slice(&read.to_ne_bytes());
        words[8..].copy_from_slice(&(!read).to_ne_bytes());
        self.credit_src.copy_in(0, &words);
        let write = Write {
            wr_id: read,
            local: self.credit_src.mr().sge(0, 16),
            remote_addr: self.credit_addr,
            rkey: self.credit_rkey,
            imm: None,
            signaled: true,
        };
        // SAFETY: the source is the registered credit buffer, written again only after this
        // write's completion (one credit in flight: `RingReader::credit_due`).
        unsafe { self.qp.post_writes(&[write]) }.map_err(|e| link_failed(e.to_string()))?;
        self.reader.credit_posted(read);
        Ok(())
    }
}

impl Link for VerbsLink {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        let began = (!timeout.is_zero()).then(Instant::now);
        let mut idle = Idle::new(WAITING);
        loop {
            self.reap()?;
            let n = (self.reader.available() as usize).min(buf.len());
            if n > 0 {
                // The completion said the bytes landed; read them after it.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                self.ring
                    .copy_out(self.reader.position() as usize, &mut buf[..n]);
                self.reader.consumed(n as u64);
                self.credit()?;
                return Ok(n);
            }
            self.credit()?;
            if self.last_check.elapsed() > LIVENESS_INTERVAL {
                self.last_check = Instant::now();
                if peer_closed(&self.stream) {
                    // What landed before the broker went is still read first.
                    self.reap()?;
                    if self.reader.available() > 0 {
                        continue;
                    }
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the broker closed the connection",
                    ));
                }
            }
            // The time left, read once (it must not go below zero between a check and a use).
            let left = began.map_or(Duration::ZERO, |t| timeout.saturating_sub(t.elapsed()));
            if left.is_zero() {
                return Ok(0);
            }
            idle.after(0, |rest| std::thread::sleep(rest.min(left)));
        }
    }
}

/// A subscriber of a topic on another host over verbs: reads the total order from one
/// broker through its receive ring and, when the link ends, resumes from the next total
/// order it expects on the next broker that answers (trying each in turn for
/// `reconnect_for`).
pub type VerbsSubscriber = RemoteSubscriber<VerbsDial>;

impl RemoteSubscriber<VerbsDial> {
    /// Subscribes to `topic` from `start` on the first of `brokers` (their verbs ports)
    /// that answers.
    pub fn connect(
        brokers: &[SocketAddr],
        topic: &str,
        start: StartAt,
        reconnect_for: Duration,
        cfg: &VerbsSubscriberConfig,
    ) -> Result<VerbsSubscriber, SubscribeError> {
        let dial = VerbsDial::new(cfg)?;
        RemoteSubscriber::connect_with(dial, brokers, topic, start, reconnect_for)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_its_endpoint_and_a_ring_of_bounded_size() {
        let ep = "5:7:00000000000000000000ffff0a090901";
        let line = |ring: &str| format!("{SUB_HELLO} topic=t from=oldest ep={ep} ring={ring}");
        let (e, r) = parse_request(&line("4096:9:1048576")).unwrap();
        assert_eq!((e.qpn, r), (5, (4096, 9, 1 << 20)));
        for bad in ["1:2", "1:2:3", "1:99999999999:1048576", "1:2:1099511627776"] {
            assert!(parse_request(&line(bad)).is_err(), "{bad}");
        }
        assert!(
            parse_request(&format!("{SUB_HELLO} topic=t ring=1:2:1048576"))
                .unwrap_err()
                .contains("ep=")
        );
    }
}
