//! A subscriber on another host, whatever carries its bytes: TCP ([`crate::tcp::subscriber`])
//! or verbs (`crate::verbs::subscriber`, feature `verbs`). Both ends are written once, here;
//! a transport supplies only how bytes move.
//!
//! The broker's side ([`serve`]): a request line names the topic and the start position
//! ([`open`] refuses a position not retained or not reached yet with both positions, as an
//! [`ErrorClass`] code); a thread then reads the log as a local [`Subscriber`] does (copy,
//! then validate: never bytes that were reused) and sends each checked window as it is, a
//! [`WindowFrame`] header and the window's bytes, through the transport's [`WindowSink`]
//! ([`forward`]). Falling behind retention ends the stream with a frame that says why. The
//! subscriber's cursor holds retention for it like a local one's, and goes with the thread.
//!
//! The client's side ([`RemoteSubscriber`]): reads that byte stream from a [`Link`] into a
//! buffer, checks each window with the one checked view of a batch, hands out messages, and
//! when the link ends resumes from the total order after the last message it delivered, on
//! the next broker that answers ([`Dial`]): no gap, no duplicate.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use crate::client::subscriber::{Message, StartAt, Subscriber};
use crate::idle::{Idle, IdlePolicy};
use crate::messages::{Claims, Messages};
use crate::pool::coherence::Coherence;
use crate::pool::Pool;
use crate::sync::Ordering::Relaxed;
use crate::tcp::{WindowFrame, END_OF_STREAM};
use crate::verbs::field;
use crate::ErrorClass;

/// Batches read from the pool per round.
const BATCHES_PER_ROUND: usize = 16;
/// Longest park of an idle subscriber's thread (it checks its connection in between).
const PARK_MAX: Duration = Duration::from_millis(20);
/// How often an idle subscriber's thread checks whether its subscriber went away.
const GONE_CHECK: Duration = Duration::from_millis(100);

/// A subscriber connection, after its request line, for a thread of its own.
pub struct SubscriberConn {
    pub stream: TcpStream,
    pub line: String,
}

/// A subscriber request's start position (`from=`).
pub fn parse_from(v: &str) -> Result<StartAt, String> {
    match v {
        "oldest" => Ok(StartAt::Oldest),
        "latest" => Ok(StartAt::Latest),
        n => n
            .parse()
            .map(StartAt::TotalOrder)
            .map_err(|_| format!("bad from= {n:?} (oldest, latest or a total order)")),
    }
}

/// The `from=` value of a start position.
pub fn from_value(start: StartAt) -> String {
    match start {
        StartAt::Oldest => "oldest".to_string(),
        StartAt::Latest => "latest".to_string(),
        StartAt::TotalOrder(t) => t.to_string(),
    }
}

/// The subscriber a request line asks for (`topic=T from=...`), or why not and what kind of
/// refusal that is.
pub fn open<'p, C: Coherence>(
    pool: &'p Pool,
    c: C,
    line: &str,
) -> Result<Subscriber<'p, C>, (ErrorClass, String)> {
    let topic = field(line, "topic").map_err(|e| (ErrorClass::InvalidInput, e.to_string()))?;
    let start = parse_from(field(line, "from").unwrap_or("oldest"))
        .map_err(|e| (ErrorClass::InvalidInput, e))?;
    Subscriber::open(pool, c, topic, start).map_err(|e| (e.class(), e.to_string()))
}

/// Where a broker sends a remote subscriber's frames.
pub trait WindowSink {
    /// After the broker's `OK`: waits for the subscriber's side to be ready, if it has to.
    fn ready(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Sends one frame, `head` then `body`, whole (waiting while the subscriber has no
    /// room, at most the idle timeout). `Err`: why the subscriber is dropped.
    fn send(&mut self, head: &[u8], body: &[u8]) -> Result<(), String>;
    /// Whether the subscriber went away (asked while there is nothing to send).
    fn gone(&mut self) -> bool;
    /// The stream ended: lets what was sent reach the subscriber before the link closes.
    fn finish(&mut self) {}
}

/// Serves one remote subscriber's request until it goes away, falls behind, takes nothing
/// for the idle timeout while frames wait, or `stop`. `attach` makes the transport's sink
/// for the request (or refuses it) and says what the `OK` line carries after `OK`.
pub fn serve<C: Coherence, S: WindowSink>(
    pool: &Pool,
    c: C,
    broker: u32,
    kind: &str,
    conn: SubscriberConn,
    stop: &AtomicBool,
    attach: impl FnOnce(&TcpStream, &str) -> Result<(S, String), (ErrorClass, String)>,
) {
    let SubscriberConn { mut stream, line } = conn;
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let opened = open(pool, c, &line).and_then(|sub| Ok((sub, attach(&stream, &line)?)));
    let (mut sub, (mut sink, ok)) = match opened {
        Ok(s) => s,
        Err((class, why)) => {
            let _ = writeln!(stream, "ERR class={} {why}", class.code());
            log::info!("broker {broker}: {kind} subscriber {peer} refused: {why}");
            return;
        }
    };
    if writeln!(stream, "OK {ok}").is_err() {
        return;
    }
    let why = match sink.ready() {
        Ok(()) => {
            log::info!("broker {broker}: {kind} subscriber {peer} of {line:?} serving");
            forward(&mut sub, &mut sink, stop)
        }
        Err(why) => why,
    };
    sink.finish();
    log::info!("broker {broker}: {kind} subscriber {peer} ended: {why}");
}

/// Sends `sub`'s windows through `sink` until the subscriber goes away, the sink drops it,
/// the log cannot be read for it (the stream then ends with a frame saying why), or `stop`.
/// Returns why it ended.
pub fn forward<C: Coherence>(
    sub: &mut Subscriber<'_, C>,
    sink: &mut impl WindowSink,
    stop: &AtomicBool,
) -> String {
    let mut idle = Idle::new(IdlePolicy {
        spin_rounds: 0,
        yield_for: Duration::from_millis(1),
        rest: PARK_MAX,
    });
    let mut last_check = Instant::now();
    loop {
        if stop.load(Relaxed) {
            return "the broker is stopping".to_string();
        }
        let mut failed: Option<String> = None;
        // Each window goes out as the subscriber checked it: its header and its bytes, no
        // copy per message.
        let polled = sub.poll_windows(BATCHES_PER_ROUND, |w| {
            let end = w.first_index + w.count;
            if failed.is_some() || end <= w.deliver_from {
                // Nothing of it is delivered (a start inside the batch): not sent.
                return 0;
            }
            if let Err(e) = sink.send(&WindowFrame::of(w).encode(), w.bytes) {
                failed = Some(e);
                return 0;
            }
            (end - w.deliver_from.max(w.first_index)) as usize
        });
        if let Some(why) = failed {
            return why;
        }
        let n = match polled {
            Ok(n) => n,
            Err(e) => {
                // Falling behind retention, an unreadable batch: the stream ends with why.
                let reason = e.to_string();
                let end = WindowFrame::end_of_stream(e.class(), reason.len());
                let _ = sink.send(&end.encode(), reason.as_bytes());
                return reason;
            }
        };
        if n == 0 {
            if last_check.elapsed() > GONE_CHECK {
                last_check = Instant::now();
                if sink.gone() {
                    return "the subscriber closed the connection".to_string();
                }
            }
            // Parked on the topic's doorbell (the sequencer rings it when it orders more):
            // an idle remote subscriber costs its broker nothing, and a new batch is sent
            // as soon as it is ordered.
            idle.after(0, |_| sub.wait_ordered(PARK_MAX));
        } else {
            idle.after(n, |_| {});
        }
    }
}

/// The subscriber threads of one broker's frontend: at most `max` at once.
pub struct SubscriberThreads {
    live: AtomicUsize,
    max: usize,
}

/// One subscriber thread in the count of live ones, until dropped.
struct Live<'a>(&'a AtomicUsize);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl SubscriberThreads {
    pub fn new(max: usize) -> SubscriberThreads {
        SubscriberThreads {
            live: AtomicUsize::new(0),
            max,
        }
    }

    /// Runs `serve(conn)` on a thread of its own in `scope`, or refuses the subscriber
    /// (`ERR`) when `max` are running already.
    pub fn spawn<'scope>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        broker: u32,
        name: &str,
        conn: SubscriberConn,
        serve: impl FnOnce(SubscriberConn) + Send + 'scope,
    ) {
        if self.live.load(Relaxed) >= self.max {
            let mut st = conn.stream;
            let _ = writeln!(
                st,
                "ERR class={} too many subscribers on broker {broker}; try another",
                crate::error::ErrorClass::Unavailable.code()
            );
            return;
        }
        self.live.fetch_add(1, Relaxed);
        let live = &self.live;
        let spawned =
            std::thread::Builder::new()
                .name(name.into())
                .spawn_scoped(scope, move || {
                    // Counted out however the thread ends (a panic included).
                    let _live = Live(live);
                    serve(conn);
                });
        if spawned.is_err() {
            self.live.fetch_sub(1, Relaxed);
        }
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
    /// This host's side of the transport failed (no RDMA device, a registration refused).
    #[error("{0}")]
    Local(String),
}

impl SubscribeError {
    /// A broker's `ERR` answer: `class=N reason` (the kind of refusal, then its words).
    pub fn refused(addr: SocketAddr, answer: String) -> SubscribeError {
        let (class, reason) = match answer
            .strip_prefix("class=")
            .and_then(|r| r.split_once(' '))
        {
            Some((code, rest)) => (
                code.parse().ok().and_then(ErrorClass::from_code),
                rest.to_string(),
            ),
            None => (None, answer),
        };
        SubscribeError::Refused {
            addr,
            class,
            reason,
        }
    }

    /// The broker at `addr` could not be reached (or set up) because of `e`.
    pub fn unreachable(addr: SocketAddr, e: impl std::fmt::Display) -> SubscribeError {
        SubscribeError::Unreachable {
            waited: Duration::ZERO,
            last: format!("{addr}: {e}"),
        }
    }
}

/// What carries a remote subscriber's byte stream from one broker.
pub trait Link {
    /// Reads what has arrived into `buf`, waiting at most `timeout` for something (zero:
    /// not at all). `Ok(0)`: nothing arrived in time. `Err`: the link ended.
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize>;
}

/// How a remote subscriber opens a [`Link`] to a broker.
pub trait Dial {
    type Link: Link;
    /// A link from the broker at `addr` streaming `topic` from `from` (a `from=` value), or
    /// why not ([`SubscribeError::refused`] for the broker's `ERR`).
    fn dial(
        &mut self,
        addr: SocketAddr,
        topic: &str,
        from: &str,
    ) -> Result<Self::Link, SubscribeError>;
}

/// A subscriber of a topic on another host: reads the total order from one broker over a
/// [`Link`] and, when it ends, resumes from the next total order it expects on the next
/// broker that answers (trying each in turn for `reconnect_for`).
pub struct RemoteSubscriber<D: Dial> {
    dial: D,
    brokers: Vec<SocketAddr>,
    topic: String,
    /// Where the next connection starts: the original position until a message arrives,
    /// then the total order after the last one.
    start: StartAt,
    current: usize,
    link: Option<D::Link>,
    /// Bytes received and not yet handed out: `buf[head..tail]`.
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    reconnect_for: Duration,
    reconnects: u64,
    /// The largest window accepted (a larger frame means a broken stream).
    max_payload: u32,
    /// The window being handed out.
    window: Option<RxWindow>,
    /// The offsets list of the last window handed out, for the next one.
    spare_offsets: Vec<(u32, u32, u32)>,
}

impl<D: Dial> RemoteSubscriber<D> {
    /// Subscribes to `topic` from `start` on the first of `brokers` that answers, through
    /// links `dial` opens.
    pub fn connect_with(
        dial: D,
        brokers: &[SocketAddr],
        topic: &str,
        start: StartAt,
        reconnect_for: Duration,
    ) -> Result<Self, SubscribeError> {
        if brokers.is_empty() {
            return Err(SubscribeError::NoBrokers);
        }
        let mut s = RemoteSubscriber {
            dial,
            brokers: brokers.to_vec(),
            topic: topic.to_string(),
            start,
            current: 0,
            link: None,
            buf: vec![0; 1 << 20],
            head: 0,
            tail: 0,
            reconnect_for,
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

    /// Connects to the current broker, or the next ones in turn, for `reconnect_for`. A
    /// refusal (an unknown topic, a position not retained) is final on the first attempt;
    /// later, another broker may still answer.
    fn reconnect(&mut self, first: bool) -> Result<(), SubscribeError> {
        // The old link goes first: nothing of it can land after this.
        self.link = None;
        self.window = None;
        self.head = 0;
        self.tail = 0;
        let began = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut last = String::new();
        let from = from_value(self.start);
        loop {
            for k in 0..self.brokers.len() {
                let i = (self.current + k) % self.brokers.len();
                match self.dial.dial(self.brokers[i], &self.topic, &from) {
                    Ok(l) => {
                        self.current = i;
                        self.link = Some(l);
                        if !first {
                            self.reconnects += 1;
                        }
                        return Ok(());
                    }
                    // A broker with no room for another subscriber: the next may have it.
                    Err(
                        e @ SubscribeError::Refused {
                            class: Some(ErrorClass::Unavailable),
                            ..
                        },
                    ) => last = e.to_string(),
                    Err(e @ (SubscribeError::Refused { .. } | SubscribeError::Local(_)))
                        if first =>
                    {
                        return Err(e)
                    }
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

    /// Receives more into the buffer (room for `need` bytes from `head`), waiting at most
    /// `timeout`. `Ok(false)` when nothing came; an error when the link ended.
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
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| std::io::Error::new(ErrorKind::NotConnected, "not connected"))?;
        let n = link.recv(&mut self.buf[self.tail..], timeout)?;
        self.tail += n;
        Ok(n > 0)
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

/// What [`RemoteSubscriber::take_window`] found.
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
