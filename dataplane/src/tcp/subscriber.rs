//! Remote subscribers over TCP: the broker's side ([`serve`]) and the client's
//! ([`TcpSubscriber`]), both the shared ends of [`crate::remote_subscriber`] over a socket.
//!
//! Every broker maps the whole pool, so any one broker can serve a topic's whole total order:
//! a remote subscriber reads from one broker, and after a dropped connection resumes from
//! the next total order it expects on the same broker or another.
//!
//! The bytes go through a buffer in the broker (the local subscriber's copy, then the socket
//! buffer) rather than `sendfile(2)` from the pool file: with splice, TCP may keep
//! references to the pool's pages after the call returns and read them again when it
//! retransmits, long after a retention limit may have let a publisher reuse the space; a copy
//! that was validated first cannot change under the socket.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::*;
use crate::client::subscriber::StartAt;
use crate::pool::coherence::Coherence;
use crate::pool::Pool;
use crate::remote_subscriber::{Dial, Link, RemoteSubscriber, WindowSink};
pub use crate::remote_subscriber::{SubscribeError, SubscriberConn};

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
    crate::remote_subscriber::serve(pool, c, broker, "TCP", conn, stop, |stream, _| {
        let stream = stream
            .try_clone()
            .map_err(|e| (crate::ErrorClass::Unavailable, format!("its socket: {e}")))?;
        let _ = stream.set_write_timeout(Some(idle_timeout));
        let _ = stream.set_nodelay(true);
        Ok((
            SocketSink {
                stream,
                idle_timeout,
            },
            format!("broker={broker}"),
        ))
    });
}

/// A subscriber's socket: blocking writes with the idle timeout.
struct SocketSink {
    stream: TcpStream,
    idle_timeout: Duration,
}

impl WindowSink for SocketSink {
    fn send(&mut self, head: &[u8], body: &[u8]) -> Result<(), String> {
        write_all_vectored(&mut self.stream, head, body).map_err(|e| {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                format!("it read nothing for {:?}; dropped", self.idle_timeout)
            } else {
                format!("writing: {e}")
            }
        })
    }

    fn gone(&mut self) -> bool {
        peer_closed(&self.stream)
    }
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

/// Whether the peer closed its end (a subscriber sends nothing after its request line;
/// anything it does send is left unread).
pub fn peer_closed(stream: &TcpStream) -> bool {
    match recv_now(stream, &mut [0u8; 1], true) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

/// Opens TCP links to brokers' TCP ports.
pub struct TcpDial;

/// One broker's stream of windows over TCP.
pub struct TcpLink {
    stream: TcpStream,
    /// The socket's read timeout as last set (set again only when it changes).
    read_timeout: Option<Duration>,
}

impl Dial for TcpDial {
    type Link = TcpLink;

    fn dial(
        &mut self,
        addr: SocketAddr,
        topic: &str,
        from: &str,
    ) -> Result<TcpLink, SubscribeError> {
        let unreachable = |e| SubscribeError::unreachable(addr, e);
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(unreachable)?;
        writeln!(s, "{SUB_HELLO} topic={topic} from={from}").map_err(unreachable)?;
        let line = read_line(&mut s).map_err(unreachable)?;
        parse_answer(&line).map_err(|answer| SubscribeError::refused(addr, answer))?;
        Ok(TcpLink {
            stream: s,
            read_timeout: None,
        })
    }
}

impl Link for TcpLink {
    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        let read = if timeout.is_zero() {
            recv_now(&self.stream, buf, false)
        } else {
            // Whole milliseconds (the kernel's granularity is a tick anyway), so that a
            // caller polling with the same timeout sets it once.
            let t = Some(Duration::from_millis(timeout.as_millis().max(1) as u64));
            if self.read_timeout != t {
                self.stream.set_read_timeout(t)?;
                self.read_timeout = t;
            }
            self.stream.read(buf)
        };
        match read {
            Ok(0) => Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the broker closed the connection",
            )),
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(0),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// A subscriber of a topic on another host over TCP: reads the total order from one broker
/// and, when the connection drops, resumes from the next total order it expects on the next
/// broker that answers (trying each in turn for `reconnect_for`).
pub type TcpSubscriber = RemoteSubscriber<TcpDial>;

impl RemoteSubscriber<TcpDial> {
    /// Subscribes to `topic` from `start` on the first of `brokers` (their TCP ports) that
    /// answers.
    pub fn connect(
        brokers: &[SocketAddr],
        topic: &str,
        start: StartAt,
        reconnect_for: Duration,
    ) -> Result<TcpSubscriber, SubscribeError> {
        RemoteSubscriber::connect_with(TcpDial, brokers, topic, start, reconnect_for)
    }
}
