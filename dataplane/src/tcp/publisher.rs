//! A remote publisher on the TCP transport (see [`super`]). Same batching rules as the shm
//! and verbs publishers: seal at the batch size, on `flush`, or after the linger time; dense
//! per-client `batch_seq`; batches striped round-robin over the brokers.
//!
//! Each batch is built in a buffer of its own and written to its broker's connection as one
//! frame. The buffer is kept until the broker acknowledges the batch (at most
//! [`TcpPublisherConfig::window_bytes`] in flight): when a connection drops, the publisher
//! sends every batch that broker had not acknowledged again, unchanged (same `batch_seq`), to
//! a broker that is still up, and the sequencer drops the copies it had already ordered
//! (they are acked again, so the resend completes). Acks are timed when the publisher sees
//! them (the broker's clock may be another host's).

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use embar_sys::clock::monotonic_ns;

use super::*;
use crate::client::filling::{resend_order, stride_of, Filling, SeqPrefix};
use crate::client::publisher::{PublishError, PublisherConfig};
use crate::client::Publish;
use crate::replication::{describe_faults, faults_of, DiskFault};
use crate::verbs::field;

/// Bytes of ack frames read per system call (16 frames).
const ACK_READ_BYTES: usize = 16 * AckFrame::BYTES;
/// How often a caller timing acks looks at them (see `Publish::ack_poll_interval`).
const ACK_POLL_INTERVAL: Duration = Duration::from_micros(50);

/// How to publish over TCP.
#[derive(Clone, Copy, Debug)]
pub struct TcpPublisherConfig {
    pub publisher: PublisherConfig,
    /// Bytes of sealed batches kept for a resend until acknowledged; a publisher with this
    /// much in flight waits for acks.
    pub window_bytes: u64,
    /// Send a dropped connection's unacknowledged batches to another broker (`false`: the
    /// publisher fails with the connection's error).
    pub failover: bool,
}

impl Default for TcpPublisherConfig {
    fn default() -> Self {
        TcpPublisherConfig {
            publisher: PublisherConfig::default(),
            window_bytes: 64 << 20,
            failover: true,
        }
    }
}

/// A sealed batch, kept until its broker acknowledges it.
struct Sent {
    batch_seq: u64,
    num_msg: u32,
    first_ns: u64,
    /// The frame (header, then the batch) is `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Sent {
    fn frame(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn bytes(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

/// How a link's batches travel.
enum Wire {
    /// As frames on the session's TCP connection.
    Tcp(TcpStream),
    /// As DPDK frames; the TCP connection is the session's lifeline.
    #[cfg(feature = "dpdk")]
    Dpdk(Box<crate::dpdk::publisher::DpdkWire>),
}

struct Link {
    broker: u32,
    addr: SocketAddr,
    /// `None` once the connection failed.
    wire: Option<Wire>,
    /// The latest counters the broker sent.
    acks: AckFrame,
    /// Ack frames received, the last one possibly in part: `rx[..rx_have]`.
    rx: [u8; ACK_READ_BYTES],
    rx_have: usize,
    /// Batches sent on this connection and not yet acknowledged, in the order sent (the
    /// broker acknowledges a session's batches in that order).
    inflight: VecDeque<Sent>,
    /// Batches of `inflight`'s front already counted acknowledged (`acks.acked_batches`
    /// when the front was sent ... and since).
    acked_batches_seen: u64,
    batch_limit: u64,
}

/// See the module docs.
pub struct TcpPublisher {
    client_id: u64,
    topic: String,
    batch_bytes: u64,
    ack: u8,
    cfg: TcpPublisherConfig,
    links: Vec<Link>,
    next_link: usize,
    batch_seq: u64,
    /// The batch being filled: its frame buffer (header space, then the batch) and writer.
    open: Option<(Vec<u8>, Filling)>,
    /// Frame buffers of acknowledged batches, for reuse.
    spare: Vec<Vec<u8>>,
    inflight_bytes: u64,
    sealed_messages: u64,
    acked_messages: u64,
    prefix: SeqPrefix,
    latencies: Vec<u64>,
    resent_batches: u64,
    waits: u64,
    failure: Option<PublishError>,
}

/// Bytes before the batch in a frame buffer: the frame header sits in the last 32 of them,
/// so the batch starts 64-byte aligned (the buffer's allocation is, see [`frame_buffer`]).
const LEAD: usize = 64;

/// A frame buffer for batches of `batch_bytes`, whose batch part is 64-byte aligned.
fn frame_buffer(batch_bytes: u64) -> Vec<u8> {
    // A Vec<u8> is only byte-aligned; the batch is placed at the first 64-byte boundary
    // past LEAD - 32 bytes of header room when the frame is written (see `batch_at`).
    vec![0u8; LEAD + 64 + batch_bytes as usize]
}

/// Where the batch starts in `buf`: the first 64-byte aligned offset at or past `LEAD`.
fn batch_at(buf: &[u8]) -> usize {
    let addr = buf.as_ptr() as usize + LEAD;
    LEAD + (addr.next_multiple_of(64) - addr)
}

impl TcpPublisher {
    /// Connects to each broker's TCP port (`(pool slot, address)`) for `topic`.
    pub fn connect(
        brokers: &[(u32, SocketAddr)],
        topic: &str,
        client_id: u64,
        cfg: &TcpPublisherConfig,
    ) -> Result<TcpPublisher, PublishError> {
        let hello = format!("{HELLO} topic={topic} client={client_id}");
        Self::open(brokers, topic, client_id, cfg, |broker, addr| {
            let (stream, batch_limit, ack, _) =
                handshake(broker, addr, &hello, cfg.publisher.wait_timeout)?;
            Ok((Wire::Tcp(stream), batch_limit, ack))
        })
    }

    /// Like [`connect`](Self::connect), with the batches sent as DPDK frames over the links
    /// `dpdk` describes (the sessions open on each broker's TCP port; `docs/dpdk.md`).
    #[cfg(feature = "dpdk")]
    pub fn connect_dpdk(
        brokers: &[(u32, SocketAddr)],
        topic: &str,
        client_id: u64,
        cfg: &TcpPublisherConfig,
        dpdk: &crate::dpdk::publisher::DpdkLinkConfig,
    ) -> Result<TcpPublisher, PublishError> {
        Self::open(brokers, topic, client_id, cfg, |broker, addr| {
            let (w, batch_limit, ack) = crate::dpdk::publisher::DpdkWire::connect(
                broker,
                addr,
                topic,
                client_id,
                dpdk,
                cfg.publisher.wait_timeout,
            )?;
            Ok((Wire::Dpdk(Box::new(w)), batch_limit, ack))
        })
    }

    fn open(
        brokers: &[(u32, SocketAddr)],
        topic: &str,
        client_id: u64,
        cfg: &TcpPublisherConfig,
        mut connect: impl FnMut(u32, SocketAddr) -> Result<(Wire, u64, u8), PublishError>,
    ) -> Result<TcpPublisher, PublishError> {
        if brokers.is_empty() {
            return Err(PublishError::NoBrokers);
        }
        if topic.split_ascii_whitespace().count() != 1 || topic.len() > 256 {
            return Err(PublishError::Transport(format!("bad topic name {topic:?}")));
        }
        let mut links = Vec::new();
        let mut ack = 1;
        for &(broker, addr) in brokers {
            let (wire, batch_limit, a) = connect(broker, addr)?;
            ack = a;
            links.push(Link {
                broker,
                addr,
                wire: Some(wire),
                acks: AckFrame::default(),
                rx: [0; ACK_READ_BYTES],
                rx_have: 0,
                inflight: VecDeque::new(),
                acked_batches_seen: 0,
                batch_limit,
            });
        }
        let batch_bytes = links.iter().map(|l| l.batch_limit).min().expect("a link");
        Ok(TcpPublisher {
            client_id,
            topic: topic.to_string(),
            batch_bytes,
            ack,
            cfg: *cfg,
            links,
            next_link: 0,
            batch_seq: 0,
            open: None,
            spare: Vec::new(),
            inflight_bytes: 0,
            sealed_messages: 0,
            acked_messages: 0,
            prefix: SeqPrefix::default(),
            latencies: Vec::new(),
            resent_batches: 0,
            waits: 0,
            failure: None,
        })
    }

    /// Batches sent again to another broker after a connection dropped.
    pub fn resent_batches(&self) -> u64 {
        self.resent_batches
    }

    /// Brokers whose connection is up.
    pub fn live_brokers(&self) -> usize {
        self.links.iter().filter(|l| l.wire.is_some()).count()
    }

    /// Reads every ack frame the brokers sent (without blocking) and retires what they
    /// acknowledge; a connection that ended is failed over.
    fn read_acks(&mut self) -> Result<(), PublishError> {
        if let Some(f) = &self.failure {
            return Err(clone_error(f));
        }
        let now = monotonic_ns();
        for i in 0..self.links.len() {
            let lost = self.links[i].read_acks().err();
            let l = &mut self.links[i];
            // Acknowledged batches leave the window, oldest first.
            while l.acked_batches_seen < l.acks.acked_batches {
                let Some(s) = l.inflight.pop_front() else {
                    break;
                };
                l.acked_batches_seen += 1;
                self.acked_messages += u64::from(s.num_msg);
                self.inflight_bytes -= s.bytes();
                self.prefix.acked(s.batch_seq);
                self.latencies.push(now.saturating_sub(s.first_ns));
                self.spare.push(s.buf);
            }
            if l.acks.rejected_batches > 0 {
                let e = l.acks.error;
                let err = PublishError::Rejected {
                    broker: l.broker,
                    count: l.acks.rejected_batches,
                    reason: describe_code(e),
                    batch_seq: e >> 8,
                };
                self.failure = Some(clone_error(&err));
                return Err(err);
            }
            if let Some(why) = lost {
                self.fail_over(i, &why)?;
            }
        }
        Ok(())
    }

    /// Link `i`'s connection ended: its unacknowledged batches go to another broker.
    fn fail_over(&mut self, i: usize, why: &str) -> Result<(), PublishError> {
        let l = &mut self.links[i];
        if l.wire.take().is_none() && l.inflight.is_empty() {
            return Ok(());
        }
        let pending: Vec<Sent> = l.inflight.drain(..).collect();
        let (broker, addr) = (l.broker, l.addr);
        let live: Vec<usize> = (0..self.links.len())
            .filter(|&k| self.links[k].wire.is_some())
            .collect();
        if !self.cfg.failover || live.is_empty() {
            let err = PublishError::Transport(format!(
                "broker {broker} at {addr}: {why}{}",
                if live.is_empty() {
                    "; no broker left to send its unacknowledged batches to"
                } else {
                    ""
                }
            ));
            self.failure = Some(clone_error(&err));
            return Err(err);
        }
        log::warn!(
            "publisher {}: broker {broker} at {addr}: {why}; sending its {} unacknowledged batch(es) to broker {}",
            self.client_id,
            pending.len(),
            self.links[live[0]].broker
        );
        // The newest first (see `resend_order`).
        let mut pending = pending;
        resend_order(&mut pending);
        for s in pending {
            // Round-robin over the live brokers, in batch order per broker.
            let k = live[(s.batch_seq as usize) % live.len()];
            self.resent_batches += 1;
            self.send(k, s)?;
        }
        Ok(())
    }

    /// Writes a sealed batch's frame to link `i` (failing over if it cannot).
    fn send(&mut self, i: usize, s: Sent) -> Result<(), PublishError> {
        let l = &mut self.links[i];
        let Some(stream) = l.wire.as_mut() else {
            return Err(PublishError::Transport(format!(
                "broker {} is not connected",
                l.broker
            )));
        };
        let written = match stream {
            Wire::Tcp(stream) => stream.write_all(s.frame()),
            #[cfg(feature = "dpdk")]
            Wire::Dpdk(w) => {
                w.queue(s.batch_seq, (s.bytes() as usize - BatchFrame::BYTES) as u32);
                Ok(())
            }
        };
        // Kept until acknowledged, or sent again with the rest if the connection failed.
        l.inflight.push_back(s);
        #[cfg(feature = "dpdk")]
        if matches!(l.wire, Some(Wire::Dpdk(_))) {
            // Its first frames go now, not at the next poll.
            if let Err(why) = l.read_acks() {
                return self.fail_over(i, &why);
            }
        }
        match written {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                    format!(
                        "it took nothing for {:?} (sending a batch)",
                        self.cfg.publisher.wait_timeout
                    )
                } else {
                    format!("sending a batch: {e}")
                };
                self.fail_over(i, &why)
            }
        }
    }

    /// Waits until the window has room for `bytes` more.
    fn make_room(&mut self, bytes: u64) -> Result<(), PublishError> {
        if self.inflight_bytes + bytes <= self.cfg.window_bytes {
            return Ok(());
        }
        self.waits += 1;
        let began = Instant::now();
        let mut spins = 0u32;
        loop {
            self.read_acks()?;
            if self.inflight_bytes + bytes <= self.cfg.window_bytes || self.inflight_bytes == 0 {
                return Ok(());
            }
            if began.elapsed() > self.cfg.publisher.wait_timeout {
                return Err(PublishError::Timeout {
                    what: format!(
                        "acks for {} bytes in flight (topic {}){}",
                        self.inflight_bytes,
                        self.topic,
                        describe_faults(&self.disk_faults())
                    ),
                    waited: began.elapsed(),
                });
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn start_batch(&mut self, now: u64) {
        let mut buf = self
            .spare
            .pop()
            .unwrap_or_else(|| frame_buffer(self.batch_bytes));
        let at = batch_at(&buf);
        // SAFETY: `buf` holds `LEAD + 64 + batch_bytes` bytes and `at <= LEAD + 63`, so
        // `at..at + batch_bytes` lies inside it; `at` is 64-byte aligned (`batch_at`). The
        // Vec is not touched but through this writer until the batch is sealed (it moves
        // with the writer in `open`; moving a Vec does not move its heap bytes).
        let filling = unsafe { Filling::new(buf.as_mut_ptr().add(at), self.batch_bytes, now) };
        self.open = Some((buf, filling));
    }

    fn seal(&mut self) -> Result<(), PublishError> {
        let Some((mut buf, b)) = self.open.take() else {
            return Ok(());
        };
        let at = batch_at(&buf);
        let header = BatchFrame {
            batch_seq: self.batch_seq,
            num_msg: b.num_msg(),
            total_size: b.fill(),
        };
        buf[at - BatchFrame::BYTES..at].copy_from_slice(&header.encode());
        let s = Sent {
            batch_seq: self.batch_seq,
            num_msg: b.num_msg(),
            first_ns: b.first_ns,
            buf,
            start: at - BatchFrame::BYTES,
            end: at + b.fill() as usize,
        };
        self.make_room(s.bytes())?;
        self.inflight_bytes += s.bytes();
        self.sealed_messages += u64::from(s.num_msg);
        self.prefix.sealed(s.num_msg);
        self.batch_seq += 1;
        let i = self.next_live()?;
        self.send(i, s)
    }

    /// The next broker in the round-robin whose connection is up.
    fn next_live(&mut self) -> Result<usize, PublishError> {
        for _ in 0..self.links.len() {
            let i = self.next_link;
            self.next_link = (self.next_link + 1) % self.links.len();
            if self.links[i].wire.is_some() {
                return Ok(i);
            }
        }
        Err(PublishError::Transport("no broker connection is up".into()))
    }
}

/// A copy of an error kept to be returned again (PublishError is not Clone).
fn clone_error(e: &PublishError) -> PublishError {
    match e {
        PublishError::Rejected {
            broker,
            count,
            reason,
            batch_seq,
        } => PublishError::Rejected {
            broker: *broker,
            count: *count,
            reason,
            batch_seq: *batch_seq,
        },
        other => PublishError::Transport(other.to_string()),
    }
}

/// Opens a session on broker `broker`'s TCP port with the request line `hello`: the
/// connection, the largest batch, the topic's ACK level and the whole answer (after `OK`).
pub(crate) fn handshake(
    broker: u32,
    addr: SocketAddr,
    hello: &str,
    wait: Duration,
) -> Result<(TcpStream, u64, u8, String), PublishError> {
    let refused =
        |reason: String| PublishError::Transport(format!("broker {broker} at {addr}: {reason}"));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| refused(format!("cannot connect to its TCP port: {e}")))?;
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| refused(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    writeln!(stream, "{hello}").map_err(|e| refused(e.to_string()))?;
    // The answer is the only thing the broker sends before the publisher's first frame.
    let line = read_line(&mut stream).map_err(|e| refused(format!("no answer: {e}")))?;
    let line = match parse_answer(&line) {
        Ok(fields) => fields,
        Err(reason) if line.starts_with("ERR ") => {
            return Err(PublishError::Refused { broker, reason })
        }
        Err(unexpected) => return Err(refused(unexpected)),
    };
    let num = |key: &str| -> Result<u64, PublishError> {
        field(line, key)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| refused(format!("bad answer \"OK {line}\": {key}=")))
    };
    let batch_bytes = num("batch_bytes")?;
    let ack = num("ack")?;
    if !(128..=1 << 32).contains(&batch_bytes) || ack > 2 {
        return Err(refused(format!("bad answer \"OK {line}\": out of range")));
    }
    stream
        .set_write_timeout(Some(wait))
        .map_err(|e| refused(e.to_string()))?;
    Ok((stream, batch_bytes, ack as u8, line.to_string()))
}

impl Link {
    /// Reads the ack frames that arrived, without blocking (many per system call); keeps
    /// the latest (they are cumulative). An error when the connection ended, or the broker
    /// ended the session.
    fn read_acks(&mut self) -> Result<(), String> {
        let stream = match self.wire.as_mut() {
            None => return Ok(()),
            Some(Wire::Tcp(stream)) => stream,
            #[cfg(feature = "dpdk")]
            Some(Wire::Dpdk(w)) => {
                let inflight = &self.inflight;
                let r = w.pump(|seq| {
                    let s = inflight.iter().find(|s| s.batch_seq == seq)?;
                    Some((&s.frame()[BatchFrame::BYTES..], s.num_msg))
                });
                self.acks = w.acks();
                return r;
            }
        };
        loop {
            let n = match recv_now(stream, &mut self.rx[self.rx_have..], false) {
                Ok(0) => return Err("the broker closed the connection".into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(format!("reading acks: {e}")),
            };
            self.rx_have += n;
            let whole = self.rx_have / AckFrame::BYTES * AckFrame::BYTES;
            for frame in self.rx[..whole].chunks_exact(AckFrame::BYTES) {
                let frame: &[u8; AckFrame::BYTES] = frame.try_into().expect("a whole frame");
                let Some(f) = AckFrame::decode(frame) else {
                    return Err("the broker sent a frame that is not an ack".into());
                };
                self.acks = f;
                if f.closed != 0 {
                    return Err(format!(
                        "the broker ended the session: {}",
                        describe_code(f.closed)
                    ));
                }
            }
            self.rx.copy_within(whole..self.rx_have, 0);
            self.rx_have -= whole;
        }
    }
}

impl Publish for TcpPublisher {
    fn client_id(&self) -> u64 {
        self.client_id
    }

    fn check_size(&self, payload_len: usize) -> Result<(), PublishError> {
        stride_of(payload_len, self.batch_bytes).map(drop)
    }

    fn publish(&mut self, payload: &[u8]) -> Result<(), PublishError> {
        let stride = stride_of(payload.len(), self.batch_bytes)?;
        let now = monotonic_ns();
        if self
            .open
            .as_ref()
            .is_some_and(|(_, b)| b.must_seal(stride, now, self.cfg.publisher.linger))
        {
            self.seal()?;
        }
        if self.open.is_none() {
            self.start_batch(now);
        }
        let (client, seq) = (self.client_id, self.batch_seq);
        let (_, b) = self.open.as_mut().expect("a batch is open");
        b.append(client, seq, now, payload);
        Ok(())
    }

    fn poll(&mut self) -> Result<(), PublishError> {
        self.read_acks()?;
        if self.lingered() {
            self.seal()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PublishError> {
        self.seal()
    }

    fn acked(&mut self) -> Result<u64, PublishError> {
        self.read_acks()?;
        Ok(self.acked_messages)
    }

    fn sealed_messages(&self) -> u64 {
        self.sealed_messages
    }

    fn acked_prefix(&mut self) -> Result<u64, PublishError> {
        self.read_acks()?;
        if self.ack == 0 {
            return Ok(self.sealed_messages);
        }
        Ok(self.prefix.messages())
    }

    fn ack_poll_interval(&self) -> Option<Duration> {
        Some(ACK_POLL_INTERVAL)
    }

    fn take_ack_latencies(&mut self, out: &mut Vec<u64>) {
        let _ = self.read_acks();
        out.append(&mut self.latencies);
    }

    fn grant_waits(&self) -> u64 {
        self.waits
    }

    fn disk_faults(&self) -> Vec<DiskFault> {
        faults_of(self.links.iter().map(|l| l.acks.disk))
    }

    fn ack_level(&self) -> u8 {
        self.ack
    }

    fn linger_deadline_ns(&self) -> Option<u64> {
        self.open
            .as_ref()
            .map(|(_, b)| b.deadline_ns(self.cfg.publisher.linger))
    }
}

impl Drop for TcpPublisher {
    fn drop(&mut self) {
        let _ = self.seal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_buffer_places_the_batch_on_a_64_byte_boundary_with_room_for_the_header() {
        for bb in [128u64, 4096, 1 << 20] {
            let buf = frame_buffer(bb);
            let at = batch_at(&buf);
            assert_eq!((buf.as_ptr() as usize + at) % 64, 0);
            assert!(at >= BatchFrame::BYTES && at + bb as usize <= buf.len());
        }
    }
}
