//! Remote subscribers over TCP: the broker's side ([`serve`]) and the client's
//! ([`TcpSubscriber`]).
//!
//! Every broker maps the whole pool, so any one broker can serve a topic's whole total order:
//! a remote subscriber reads from one broker, and after a dropped connection resumes from
//! the next total order it expects on the same broker or another. The broker reads the log
//! as a local [`Subscriber`] does (copy, then validate: never bytes that were reused), so
//! what it sends is what a subscriber on the pool host would see, and its cursor holds
//! retention for the remote reader like a local one.
//!
//! The bytes go through a buffer in the broker (the local subscriber's copy, then the socket
//! buffer) rather than `sendfile(2)` from the pool file: with splice, TCP may keep
//! references to the pool's pages after the call returns and read them again when it
//! retransmits, long after a retention limit may have let a publisher reuse the space; a copy
//! that was validated first cannot change under the socket.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::frontend::SubscriberConn;
use super::*;
use crate::client::subscriber::{Message, StartAt, Subscriber};
use crate::idle::{Idle, IdlePolicy};
use crate::messages::{Claims, Messages};
use crate::pool::coherence::Coherence;
use crate::pool::Pool;
use crate::sync::Ordering::Relaxed;
use crate::verbs::field;
use crate::ErrorClass;

/// Batches read from the pool per round.
const BATCHES_PER_ROUND: usize = 16;
/// Longest park of an idle subscriber's thread (it checks its connection in between).
const PARK_MAX: Duration = Duration::from_millis(20);

/// A subscriber request's start position.
fn parse_from(v: &str) -> Result<StartAt, String> {
    match v {
        "oldest" => Ok(StartAt::Oldest),
        "latest" => Ok(StartAt::Latest),
        n => n
            .parse()
            .map(StartAt::TotalOrder)
            .map_err(|_| format!("bad from= {n:?} (oldest, latest or a total order)")),
    }
}

/// Serves one remote subscriber until it goes away, falls behind, reads nothing for
/// `idle_timeout` while frames wait, or `stop`.
pub fn serve<C: Coherence>(
    pool: &Pool,
    c: C,
    broker: u32,
    conn: SubscriberConn,
    idle_timeout: Duration,
    stop: &AtomicBool,
) {
    let SubscriberConn { mut stream, line } = conn;
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let opened = field(&line, "topic")
        .map_err(|e| (ErrorClass::InvalidInput, e.to_string()))
        .and_then(|topic| {
            let from = field(&line, "from").unwrap_or("oldest");
            let start = parse_from(from).map_err(|e| (ErrorClass::InvalidInput, e))?;
            Subscriber::open(pool, c, topic, start).map_err(|e| (e.class(), e.to_string()))
        });
    let mut sub = match opened {
        Ok(s) => s,
        Err((class, why)) => {
            let _ = writeln!(stream, "ERR class={} {why}", class.code());
            log::info!("broker {broker}: TCP subscriber {peer} refused: {why}");
            return;
        }
    };
    if writeln!(stream, "OK broker={broker}").is_err() {
        return;
    }
    let _ = stream.set_write_timeout(Some(idle_timeout));
    let _ = stream.set_nodelay(true);
    log::info!("broker {broker}: TCP subscriber {peer} of {line:?} serving");
    let mut idle = Idle::new(IdlePolicy {
        spin_rounds: 0,
        yield_for: Duration::from_millis(1),
        rest: PARK_MAX,
    });
    let mut last_check = Instant::now();
    let why = loop {
        if stop.load(Relaxed) {
            break "the broker is stopping".to_string();
        }
        let mut failed: Option<std::io::Error> = None;
        // Each window goes out as the subscriber checked it: one vectored write of its
        // header and its bytes, no copy per message.
        let polled = sub.poll_windows(BATCHES_PER_ROUND, |w| {
            let end = w.first_index + w.count;
            if failed.is_some() || end <= w.deliver_from {
                // Nothing of it is delivered (a start inside the batch): not sent.
                return 0;
            }
            let h = WindowFrame::of(w).encode();
            if let Err(e) = write_all_vectored(&mut stream, &h, w.bytes) {
                failed = Some(e);
                return 0;
            }
            (end - w.deliver_from.max(w.first_index)) as usize
        });
        if let Some(e) = failed {
            break if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                format!("it read nothing for {idle_timeout:?}; dropped")
            } else {
                format!("writing: {e}")
            };
        }
        let n = match polled {
            Ok(n) => n,
            Err(e) => {
                // Falling behind retention, an unreadable batch: the stream ends with why.
                let reason = e.to_string();
                let f = WindowFrame {
                    batch_total_order: END_OF_STREAM,
                    client_id: u64::from(e.class().code()),
                    batch_seq: 0,
                    num_msg: 0,
                    first_index: 0,
                    count: 0,
                    deliver_from: 0,
                    bytes: reason.len() as u32,
                };
                let _ = write_all_vectored(&mut stream, &f.encode(), reason.as_bytes());
                break reason;
            }
        };
        if n == 0 {
            if last_check.elapsed() > Duration::from_millis(100) {
                last_check = Instant::now();
                if peer_closed(&stream) {
                    break "the subscriber closed the connection".to_string();
                }
            }
            // Parked on the topic's doorbell (the sequencer rings it when it orders more):
            // an idle remote subscriber costs its broker nothing, and a new batch is sent
            // as soon as it is ordered.
            idle.after(0, |_| sub.wait_ordered(PARK_MAX));
        } else {
            idle.after(n, |_| {});
        }
    };
    log::info!("broker {broker}: TCP subscriber {peer} ended: {why}");
}

/// Writes `head` then `body` with as few system calls as the socket takes.
fn write_all_vectored(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let (mut h, mut b) = (head, body);
    while !h.is_empty() || !b.is_empty() {
        let n = match stream.write_vectored(&[IoSlice::new(h), IoSlice::new(b)]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_h = n.min(h.len());
        h = &h[from_h..];
        b = &b[n - from_h..];
    }
    Ok(())
}

/// Whether the peer closed its end (a subscriber sends nothing after its request line).
fn peer_closed(stream: &TcpStream) -> bool {
    match recv_now(stream, &mut [0u8; 1], true) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

/// Why a remote subscription failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("no broker to subscribe from")]
    NoBrokers,
    /// The broker refused the request (`class`: what kind of refusal, as its error said).
    #[error("broker at {addr} refused: {reason}")]
    Refused {
        addr: SocketAddr,
        class: Option<ErrorClass>,
        reason: String,
    },
    /// The broker ended the stream (the subscriber fell behind retention, ...).
    #[error("the stream ended at total order {next}: {reason}")]
    Ended {
        next: u64,
        class: Option<ErrorClass>,
        reason: String,
    },
    #[error("no broker answered for {waited:?} (last: {last})")]
    Unreachable { waited: Duration, last: String },
    #[error("broker at {addr} sent a bad frame: {reason}")]
    BadFrame { addr: SocketAddr, reason: String },
}

/// A subscriber of a topic on another host: reads the total order from one broker over TCP
/// and, when the connection drops, resumes from the next total order it expects on the next
/// broker that answers (trying each in turn for `reconnect_for`).
pub struct TcpSubscriber {
    brokers: Vec<SocketAddr>,
    topic: String,
    /// Where the next connection starts: the original position until a message arrives,
    /// then the total order after the last one.
    start: StartAt,
    current: usize,
    stream: Option<TcpStream>,
    /// Bytes received and not yet handed out: `buf[head..tail]`.
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    reconnect_for: Duration,
    /// The socket's read timeout as last set (set again only when it changes).
    read_timeout: Option<Duration>,
    reconnects: u64,
    /// The largest window accepted (a larger frame means a broken stream).
    max_payload: u32,
    /// The window being handed out.
    window: Option<RxWindow>,
    /// The offsets list of the last window handed out, for the next one.
    spare_offsets: Vec<(u32, u32, u32)>,
}

impl TcpSubscriber {
    /// Subscribes to `topic` from `start` on the first of `brokers` that answers.
    pub fn connect(
        brokers: &[SocketAddr],
        topic: &str,
        start: StartAt,
        reconnect_for: Duration,
    ) -> Result<TcpSubscriber, SubscribeError> {
        if brokers.is_empty() {
            return Err(SubscribeError::NoBrokers);
        }
        let mut s = TcpSubscriber {
            brokers: brokers.to_vec(),
            topic: topic.to_string(),
            start,
            current: 0,
            stream: None,
            buf: vec![0; 1 << 20],
            head: 0,
            tail: 0,
            reconnect_for,
            read_timeout: None,
            reconnects: 0,
            max_payload: 256 << 20,
            window: None,
            spare_offsets: Vec::new(),
        };
        s.reconnect(true)?;
        Ok(s)
    }

    /// Times the subscriber connected again after a dropped connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The broker it reads from now.
    pub fn broker_addr(&self) -> SocketAddr {
        self.brokers[self.current]
    }

    /// The position the next message has (once a message was received).
    pub fn position(&self) -> StartAt {
        self.start
    }

    fn request(&self) -> String {
        let from = match self.start {
            StartAt::Oldest => "oldest".to_string(),
            StartAt::Latest => "latest".to_string(),
            StartAt::TotalOrder(t) => t.to_string(),
        };
        format!("{SUB_HELLO} topic={} from={from}\n", self.topic)
    }

    fn open(&self, addr: SocketAddr) -> Result<TcpStream, SubscribeError> {
        let unreachable = |e: std::io::Error| SubscribeError::Unreachable {
            waited: Duration::ZERO,
            last: format!("{addr}: {e}"),
        };
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(unreachable)?;
        s.write_all(self.request().as_bytes())
            .map_err(unreachable)?;
        let line = read_line(&mut s).map_err(unreachable)?;
        parse_answer(&line).map_err(|reason| {
            // `class=N reason`: the kind of refusal, then the broker's words.
            let (class, reason) = match reason
                .strip_prefix("class=")
                .and_then(|r| r.split_once(' '))
            {
                Some((code, rest)) => (
                    code.parse().ok().and_then(ErrorClass::from_code),
                    rest.to_string(),
                ),
                None => (None, reason),
            };
            SubscribeError::Refused {
                addr,
                class,
                reason,
            }
        })?;
        Ok(s)
    }

    /// Connects to the current broker, or the next ones in turn, for `reconnect_for`. A
    /// refusal (an unknown topic, a position not retained) is final on the first attempt;
    /// later, another broker may still answer.
    fn reconnect(&mut self, first: bool) -> Result<(), SubscribeError> {
        self.stream = None;
        self.window = None;
        self.head = 0;
        self.tail = 0;
        let began = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut last = String::new();
        loop {
            for k in 0..self.brokers.len() {
                let i = (self.current + k) % self.brokers.len();
                match self.open(self.brokers[i]) {
                    Ok(s) => {
                        self.current = i;
                        self.stream = Some(s);
                        self.read_timeout = None;
                        if !first {
                            self.reconnects += 1;
                        }
                        return Ok(());
                    }
                    Err(e @ SubscribeError::Refused { .. }) if first => return Err(e),
                    Err(e) => last = e.to_string(),
                }
            }
            if began.elapsed() >= self.reconnect_for {
                return Err(SubscribeError::Unreachable {
                    waited: began.elapsed(),
                    last,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Bytes buffered and not handed out.
    fn buffered(&self) -> usize {
        self.tail - self.head
    }

    /// Reads more into the buffer, waiting at most `timeout`. `Ok(false)` on a timeout; an
    /// error when the connection ended.
    fn fill(&mut self, need: usize, timeout: Duration) -> std::io::Result<bool> {
        if self.head > 0 && self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
        if self.buf.len() - self.head < need {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
        }
        let s = self
            .stream
            .as_mut()
            .ok_or_else(|| std::io::Error::new(ErrorKind::NotConnected, "not connected"))?;
        let read = if timeout.is_zero() {
            recv_now(s, &mut self.buf[self.tail..], false)
        } else {
            // Whole milliseconds (the kernel's granularity is a tick anyway), so that a
            // caller polling with the same timeout sets it once.
            let t = Some(Duration::from_millis(timeout.as_millis().max(1) as u64));
            if self.read_timeout != t {
                s.set_read_timeout(t)?;
                self.read_timeout = t;
            }
            s.read(&mut self.buf[self.tail..])
        };
        match read {
            Ok(0) => Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the broker closed the connection",
            )),
            Ok(n) => {
                self.tail += n;
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The next message in total order, waiting at most `timeout` (`None` when none came);
    /// its payload borrows this subscriber's buffer until the next call. A dropped
    /// connection is resumed on a broker that answers, from the next total order.
    pub fn next_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Message<'_>>, SubscribeError> {
        // The clock is read only when no message is here already (a message of a window
        // already received costs no system call).
        let mut deadline = None;
        loop {
            if let Some(w) = &mut self.window {
                if let Some(&(index, off, len)) = w.messages.get(w.next) {
                    w.next += 1;
                    let total_order = w.frame.batch_total_order + u64::from(index);
                    self.start = StartAt::TotalOrder(total_order + 1);
                    let at = w.at + off as usize;
                    return Ok(Some(Message {
                        total_order,
                        client_id: w.frame.client_id,
                        batch_seq: w.frame.batch_seq,
                        index,
                        num_msg: w.frame.num_msg,
                        payload: &self.buf[at..at + len as usize],
                    }));
                }
                // Every message of the window was handed out: its bytes go.
                self.head = w.at + w.frame.bytes as usize;
                if let Some(w) = self.window.take() {
                    self.spare_offsets = w.messages;
                }
            }
            let need = match self.take_window()? {
                Took::Window => continue,
                Took::Need(n) => n,
            };
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fill(need, left) {
                Ok(true) => {}
                Ok(false) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    log::info!(
                        "subscriber of {}: connection to {} lost ({e}); resuming from {:?}",
                        self.topic,
                        self.broker_addr(),
                        self.start
                    );
                    // The next broker first: the one that dropped may be the one that died.
                    self.current = (self.current + 1) % self.brokers.len();
                    self.reconnect(false)?;
                }
            }
        }
    }

    /// Hands every message that has arrived (at most `max`) to `f`, without waiting;
    /// returns how many. A dropped connection is resumed as by
    /// [`next_timeout`](Self::next_timeout).
    pub fn poll(
        &mut self,
        max: usize,
        mut f: impl FnMut(&Message<'_>),
    ) -> Result<usize, SubscribeError> {
        let mut n = 0;
        while n < max {
            match self.next_timeout(Duration::ZERO)? {
                Some(m) => f(&m),
                None => break,
            }
            n += 1;
        }
        Ok(n)
    }

    /// Waits up to `timeout` until bytes arrive, if no whole message is here already (may
    /// return early; a connection that ended is noticed by the next call that reads).
    pub fn wait(&mut self, timeout: Duration) {
        if self
            .window
            .as_ref()
            .is_some_and(|w| w.next < w.messages.len())
        {
            return;
        }
        if let Ok(Took::Need(need)) = self.take_window() {
            let _ = self.fill(need, timeout);
        }
    }

    /// Takes the next window from the buffer if it is whole (checking its messages with the
    /// one checked view of a batch), or says how many bytes the next frame needs.
    fn take_window(&mut self) -> Result<Took, SubscribeError> {
        if self.buffered() < WindowFrame::BYTES {
            return Ok(Took::Need(WindowFrame::BYTES));
        }
        let h: [u8; WindowFrame::BYTES] = self.buf[self.head..self.head + WindowFrame::BYTES]
            .try_into()
            .expect("a frame header");
        let f = WindowFrame::decode(&h);
        if f.bytes > self.max_payload {
            return Err(SubscribeError::BadFrame {
                addr: self.broker_addr(),
                reason: format!(
                    "a window of {} bytes, more than {}",
                    f.bytes, self.max_payload
                ),
            });
        }
        let whole = WindowFrame::BYTES + f.bytes as usize;
        if self.buffered() < whole {
            return Ok(Took::Need(whole));
        }
        let at = self.head + WindowFrame::BYTES;
        let bytes = &self.buf[at..at + f.bytes as usize];
        if f.batch_total_order == END_OF_STREAM {
            let next = match self.start {
                StartAt::TotalOrder(t) => t,
                _ => 0,
            };
            return Err(SubscribeError::Ended {
                next,
                class: ErrorClass::from_code(f.client_id),
                reason: String::from_utf8_lossy(bytes).to_string(),
            });
        }
        let bad = |reason: String| SubscribeError::BadFrame {
            addr: self.brokers[self.current],
            reason,
        };
        let claims = Claims {
            num_msg: f.count,
            client_id: f.client_id,
            batch_seq: f.batch_seq,
        };
        let view = Messages::over(bytes, claims).map_err(|e| bad(format!("a window: {e}")))?;
        // The previous window's list, emptied (no allocation per window).
        let mut messages = std::mem::take(&mut self.spare_offsets);
        messages.clear();
        for m in view.iter() {
            let m = m.map_err(|e| bad(format!("a window: {e}")))?;
            let index = f.first_index + m.index;
            if index < f.deliver_from {
                continue;
            }
            // Where the checked view found the payload, as an offset into the window.
            let off = m.payload.as_ptr() as usize - bytes.as_ptr() as usize;
            messages.push((index, off as u32, m.payload.len() as u32));
        }
        self.window = Some(RxWindow {
            frame: f,
            at,
            messages,
            next: 0,
        });
        Ok(Took::Window)
    }
}

/// What [`TcpSubscriber::take_window`] found.
enum Took {
    Window,
    Need(usize),
}

/// A received window being handed out: its messages as `(index, offset, length)` in the
/// buffer from `at`.
struct RxWindow {
    frame: WindowFrame,
    at: usize,
    messages: Vec<(u32, u32, u32)>,
    next: usize,
}
