//! The TCP transport: publishers and subscribers on hosts without the pool or an RDMA NIC.
//!
//! The broker's TCP frontend ([`frontend`]) stands in for each remote publisher as the
//! publisher of a shm session in the pool (see [`crate::session`]), exactly as the verbs
//! frontend does: it claims the session, takes its grants, reads each batch from the socket
//! straight into granted log space (no intermediate buffer: `read(2)` into the pool), and
//! publishes the batch's descriptor into the session's submission ring, where the broker
//! checks it like any other. Acks come back as the session's cumulative counters. Remote
//! subscribers ([`subscriber`]) get the topic's ordered messages from a broker, which reads
//! them from the pool like a local subscriber (both ends shared with the verbs subscriber:
//! [`crate::remote_subscriber`]).
//!
//! ## Connection (one line each way, as for verbs; `docs/tcp.md`)
//!
//! ```text
//! publisher  -> EMBAR-TCP/1 topic=T client=ID
//! broker     -> OK broker=SLOT batch_bytes=N ack=A          (or ERR reason)
//! subscriber -> EMBAR-TCP-SUB/1 topic=T from=oldest|latest|TOTAL_ORDER
//! broker     -> OK broker=SLOT                  (or ERR class=N reason: N an ErrorClass code)
//! ```
//!
//! ## Frames (little-endian, fixed size headers)
//!
//! Publisher to broker, per batch: a [`BatchFrame`] header (32 bytes) and then exactly
//! `total_size` bytes: the batch as it lies in the pool (64-byte message headers and
//! payloads, the format of `docs/pool-layout.md`). Broker to publisher: [`AckFrame`]s of 64
//! bytes carrying the latest cumulative counters (coalesced: a publisher that reads late
//! reads only the newest). Broker to subscriber: per message a [`MessageFrame`] header (32
//! bytes) and its payload; an error ends the stream with a frame whose `total_order` is
//! [`END_OF_STREAM`] and whose payload is the reason.
//!
//! The framing is hand-written: three fixed little-endian headers read in place, with no
//! schema to evolve beyond the version in the hello line; a serialisation crate would add a
//! copy or an allocation per frame for nothing it checks better (every field is checked
//! here, and the batch itself by the broker's one batch check).

pub mod frontend;
pub mod publisher;
pub mod subscriber;

/// First word of a publisher's request line.
pub const HELLO: &str = "EMBAR-TCP/1";
/// First word of a subscriber's request line.
pub const SUB_HELLO: &str = "EMBAR-TCP-SUB/1";
/// First word of a DPDK publisher's request line (its session opens here, `crate::dpdk`).
pub const DPDK_HELLO: &str = "EMBAR-DPDK/1";
/// Longest handshake line.
pub const MAX_LINE: usize = 1024;

/// `"EBT1"`: the first word of a batch frame.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"EBT1");
/// `"EBA1"`: the first word of an ack frame.
pub const ACK_MAGIC: u32 = u32::from_le_bytes(*b"EBA1");
/// A subscriber frame with this total order carries the reason the stream ends.
pub const END_OF_STREAM: u64 = u64::MAX;

/// A session error code (beyond those of [`crate::session::SessionError`]): the connection
/// failed, stalled mid-frame, or sent a frame that is not one.
pub const ERROR_TRANSPORT: u64 = 9;

/// The header of one batch on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchFrame {
    pub batch_seq: u64,
    pub num_msg: u32,
    /// Bytes of the batch that follow.
    pub total_size: u64,
}

impl BatchFrame {
    pub const BYTES: usize = 32;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.num_msg.to_le_bytes());
        b[8..16].copy_from_slice(&self.batch_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.total_size.to_le_bytes());
        b
    }

    /// The header, if `b` is one whose batch may be at most `limit` bytes.
    pub fn decode(b: &[u8; Self::BYTES], limit: u64) -> Result<BatchFrame, FrameError> {
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != BATCH_MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let f = BatchFrame {
            num_msg: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            batch_seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            total_size: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        };
        if f.num_msg == 0 || f.total_size == 0 {
            return Err(FrameError::Empty);
        }
        if f.total_size > limit {
            return Err(FrameError::TooLarge {
                size: f.total_size,
                limit,
            });
        }
        if f.total_size % 64 != 0 {
            return Err(FrameError::Unaligned(f.total_size));
        }
        Ok(f)
    }
}

/// What makes bytes not a batch frame header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a batch frame (first word {0:#x})")]
    Magic(u32),
    #[error("a batch frame of no messages or no bytes")]
    Empty,
    #[error("a batch frame of {size} bytes, more than the {limit} of a batch")]
    TooLarge { size: u64, limit: u64 },
    #[error("a batch frame of {0} bytes, not a whole number of 64-byte lines")]
    Unaligned(u64),
}

/// The broker's counters for one session, as an ack frame carries them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckFrame {
    /// Batches the broker has taken from the connection into the pool.
    pub batches_received: u64,
    pub acked_messages: u64,
    pub acked_batches: u64,
    pub rejected_batches: u64,
    /// Last error: `code | batch_seq << 8`.
    pub error: u64,
    /// Non-zero once the broker ended the session (a session error code).
    pub closed: u64,
    /// A broker whose disk log of the session's topic is failing
    /// ([`crate::replication::DiskFault::pack`]; 0: none, and always 0 below ACK 2): what
    /// the publisher's ack timeout names. Bytes 56..64, zero from a broker that predates it.
    pub disk: u64,
}

impl AckFrame {
    pub const BYTES: usize = 64;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[0..4].copy_from_slice(&ACK_MAGIC.to_le_bytes());
        let words = [
            self.batches_received,
            self.acked_messages,
            self.acked_batches,
            self.rejected_batches,
            self.error,
            self.closed,
            self.disk,
        ];
        for (i, w) in words.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8; Self::BYTES]) -> Option<AckFrame> {
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != ACK_MAGIC {
            return None;
        }
        let w = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
        Some(AckFrame {
            batches_received: w(0),
            acked_messages: w(1),
            acked_batches: w(2),
            rejected_batches: w(3),
            error: w(4),
            closed: w(5),
            disk: w(6),
        })
    }
}

/// The header of a window of one ordered batch on a subscriber's stream: `bytes` bytes
/// follow, whole messages of the batch in the pool's format (64-byte message headers and
/// payloads), messages `first_index..first_index + count`, checked by the receiver with the
/// one checked view of a batch (`messages::Messages::over`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowFrame {
    /// The total order of the batch's message 0 ([`END_OF_STREAM`]: the stream ends, the
    /// `bytes` that follow are the reason, and `client_id` is its `ErrorClass` code).
    pub batch_total_order: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    pub num_msg: u32,
    pub first_index: u32,
    pub count: u32,
    /// Messages before this index are not delivered (a start inside the batch).
    pub deliver_from: u32,
    pub bytes: u32,
}

impl WindowFrame {
    pub const BYTES: usize = 48;

    /// The header of a window a broker's subscriber copied and checked.
    pub fn of(w: &crate::client::subscriber::Window<'_>) -> WindowFrame {
        WindowFrame {
            batch_total_order: w.batch_total_order,
            client_id: w.client_id,
            batch_seq: w.batch_seq,
            num_msg: w.num_msg,
            first_index: w.first_index,
            count: w.count,
            deliver_from: w.deliver_from,
            bytes: w.bytes.len() as u32,
        }
    }

    /// The header of the frame that ends a stream: `reason_bytes` of the reason follow.
    pub fn end_of_stream(class: crate::ErrorClass, reason_bytes: usize) -> WindowFrame {
        WindowFrame {
            batch_total_order: END_OF_STREAM,
            client_id: u64::from(class.code()),
            batch_seq: 0,
            num_msg: 0,
            first_index: 0,
            count: 0,
            deliver_from: 0,
            bytes: reason_bytes as u32,
        }
    }

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[0..8].copy_from_slice(&self.batch_total_order.to_le_bytes());
        b[8..16].copy_from_slice(&self.client_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.batch_seq.to_le_bytes());
        for (i, w) in [
            self.num_msg,
            self.first_index,
            self.count,
            self.deliver_from,
            self.bytes,
        ]
        .iter()
        .enumerate()
        {
            b[24 + 4 * i..28 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8; Self::BYTES]) -> WindowFrame {
        let w = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8"));
        let h = |i: usize| u32::from_le_bytes(b[24 + 4 * i..28 + 4 * i].try_into().expect("4"));
        WindowFrame {
            batch_total_order: w(0..8),
            client_id: w(8..16),
            batch_seq: w(16..24),
            num_msg: h(0),
            first_index: h(1),
            count: h(2),
            deliver_from: h(3),
            bytes: h(4),
        }
    }
}

/// Reads one line of a handshake (at most [`MAX_LINE`] bytes) a byte at a time, so that
/// nothing after it (the frames that follow) is taken from the socket.
pub fn read_line(stream: &mut std::net::TcpStream) -> std::io::Result<String> {
    use std::io::Read;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() <= MAX_LINE {
        match stream.read(&mut b) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before answering",
                ))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

/// A broker's answer to a request line: the fields after `OK`, or the reason after `ERR`
/// (anything else is named as unexpected).
pub fn parse_answer(line: &str) -> Result<&str, String> {
    if let Some(reason) = line.strip_prefix("ERR ") {
        return Err(reason.to_string());
    }
    match line.strip_prefix("OK") {
        Some(rest) => Ok(rest.trim_start()),
        None => Err(format!("unexpected answer {line:?}")),
    }
}

/// Reads what has arrived into `buf` without waiting (`MSG_DONTWAIT`), leaving the socket's
/// own mode (its blocking writes with a timeout) alone; `peek` leaves the bytes there.
/// `Ok(0)`: the peer closed. `WouldBlock`: nothing has arrived.
pub fn recv_now(
    stream: &impl std::os::fd::AsRawFd,
    buf: &mut [u8],
    peek: bool,
) -> std::io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
    loop {
        // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the call.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A session error code, including the transport's own.
pub fn describe_code(code: u64) -> &'static str {
    match code & 0xff {
        ERROR_TRANSPORT => "the connection failed, stalled or sent a malformed frame",
        other => crate::session::SessionError::from_code(other).describe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ack_and_window_frames_round_trip(a: [u64; 7], t: u64, c: u64, s: u64, h: [u32; 5]) {
            let f = AckFrame { batches_received: a[0], acked_messages: a[1], acked_batches: a[2], rejected_batches: a[3], error: a[4], closed: a[5], disk: a[6] };
            prop_assert_eq!(AckFrame::decode(&f.encode()), Some(f));
            let w = WindowFrame { batch_total_order: t, client_id: c, batch_seq: s, num_msg: h[0], first_index: h[1], count: h[2], deliver_from: h[3], bytes: h[4] };
            prop_assert_eq!(WindowFrame::decode(&w.encode()), w);
        }

        #[test]
        fn any_bytes_decode_to_a_checked_frame_or_an_error(b: [u8; 32], limit in 64u64..1 << 30) {
            if let Ok(f) = BatchFrame::decode(&b, limit) {
                prop_assert!(f.num_msg > 0 && f.total_size > 0 && f.total_size <= limit);
                prop_assert_eq!(f.total_size % 64, 0);
                prop_assert_eq!(BatchFrame::decode(&f.encode(), limit), Ok(f));
            }
        }
    }

    #[test]
    fn an_error_class_crosses_the_wire_as_its_code() {
        for class in crate::ErrorClass::ALL {
            assert_eq!(
                crate::ErrorClass::from_code(class.code().into()),
                Some(class)
            );
        }
        assert_eq!(
            crate::ErrorClass::from_code(0),
            None,
            "0: no class (an old broker)"
        );
        assert_eq!(crate::ErrorClass::from_code(99), None);
    }

    #[test]
    fn a_bad_batch_header_says_what_is_wrong() {
        let good = BatchFrame {
            batch_seq: 3,
            num_msg: 2,
            total_size: 256,
        };
        assert_eq!(BatchFrame::decode(&good.encode(), 1024), Ok(good));
        let mut b = good.encode();
        b[0] ^= 1;
        assert!(matches!(
            BatchFrame::decode(&b, 1024),
            Err(FrameError::Magic(_))
        ));
        let big = BatchFrame {
            total_size: 4096,
            ..good
        };
        assert_eq!(
            BatchFrame::decode(&big.encode(), 1024),
            Err(FrameError::TooLarge {
                size: 4096,
                limit: 1024
            })
        );
        let odd = BatchFrame {
            total_size: 100,
            ..good
        };
        assert_eq!(
            BatchFrame::decode(&odd.encode(), 1024),
            Err(FrameError::Unaligned(100))
        );
        assert_eq!(AckFrame::decode(&[0; 64]), None);
    }
}
