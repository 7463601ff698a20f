//! The verbs transport: a remote publisher RDMA-writes its batches straight
//! into log space its broker granted and registered with the NIC; no socket receive and no
//! copy on the broker. The protocol, both sides' shared definitions, the credit accounting
//! ([`credits`], sans-IO), and the two ends (feature `verbs`): `frontend` (in the broker
//! process) and `publisher` (the client library).
//!
//! ## Connection (out of band, on the broker's TCP verbs port; docs/verbs.md)
//!
//! ```text
//! publisher -> EMBAR-VERBS/1 topic=T client=ID ep=QPN:PSN:GID feedback=ADDR:RKEY
//! broker    -> OK ep=QPN:PSN:GID staging=ADDR:RKEY:SLOTS broker=SLOT batch_bytes=N ack=A
//!              (or ERR reason)
//! publisher -> READY            (its QP is connected; the broker may write to it)
//! ```
//!
//! The TCP connection stays open for the session's life: its end (or a QP error) ends the
//! session, and the broker reclaims the session's grants.
//!
//! ## Data path (per batch, one doorbell, no syscall on a hardware NIC)
//!
//! 1. RDMA WRITE of the batch (message headers and payloads) into the publisher's current
//!    grant, at the broker address the grant names, with the grant's rkey. The broker
//!    registered exactly that grant (one segment of its log); a write outside it fails at the
//!    NIC with a remote access error on the publisher's own QP.
//! 2. RDMA WRITE_WITH_IMM of the 64-byte descriptor ([`encode_descriptor`]) into staging slot
//!    `n % slots` of the broker (a small per-session buffer, not the pool), immediate = the
//!    slot. RC delivers in order, so when the broker sees the immediate the batch has landed.
//! 3. The broker's frontend polls its receive CQ, takes the descriptor into the session's
//!    submission ring in the pool, where the broker checks it like any shm submission
//!    (bounds, sizes, counts, inside a grant of this session) and publishes it.
//! 4. Grants, the staging watermark, acks and errors come back one-sided: the broker
//!    RDMA-writes [`Feedback`] words into a small region the publisher registered; the
//!    publisher polls its own memory.

//!
//! ## Remote subscribers (docs/verbs.md, "Remote subscribers")
//!
//! ```text
//! subscriber -> EMBAR-VERBS-SUB/1 topic=T from=oldest|latest|N ep=QPN:PSN:GID ring=ADDR:RKEY:BYTES
//! broker     -> OK ep=QPN:PSN:GID credit=ADDR:RKEY broker=SLOT   (or ERR class=N reason)
//! subscriber -> READY            (its QP is connected and its receives posted)
//! ```
//!
//! The broker reads the log for it as for a TCP subscriber (copy, then validate) and
//! RDMA-writes the same frames (`tcp::WindowFrame` and the window's bytes) as a byte stream
//! into the subscriber's registered ring, each chain of writes ending in a WRITE_WITH_IMM
//! whose immediate is the chain's byte count; the subscriber RDMA-writes its read position
//! (its credit) into a word the broker registered. Accounting: [`credits::RingWriter`],
//! [`credits::RingReader`].

pub mod credits;
#[cfg(feature = "verbs")]
pub mod frontend;
#[cfg(feature = "verbs")]
pub mod publisher;
#[cfg(feature = "verbs")]
pub mod subscriber;

use crate::batch::BatchDesc;
use crate::pool::layout::SESSION_GRANT_SLOTS;
use crate::sync::AtomicU64;

/// First word of the request line.
pub const HELLO: &str = "EMBAR-VERBS/1";
/// Descriptor slots per session (in flight between the publisher and the broker's frontend).
pub const STAGING_SLOTS: u32 = 32;
/// Bytes of one staging slot: one descriptor.
pub const SLOT_BYTES: usize = 64;
/// Longest handshake line.
pub const MAX_LINE: usize = 1024;
/// First word of a remote subscriber's request line.
pub const SUB_HELLO: &str = "EMBAR-VERBS-SUB/1";
/// Receives a verbs subscriber keeps posted: the broker's chains in flight at most.
pub const SUB_RECEIVES: u32 = 64;
/// Bounds of a subscriber's receive ring (the broker keeps a mirror of it as large).
pub const SUB_RING_BYTES_MIN: u64 = 64 << 10;
pub const SUB_RING_BYTES_MAX: u64 = 64 << 20;
/// The broker's credit region: the subscriber's read position, then its complement (a
/// torn read of the two never matches, so it is ignored until the next look).
pub const CREDIT_BYTES: usize = 64;

/// The broker-written words in the publisher's memory. Every field is written only by the
/// broker (RDMA WRITE), read only by the publisher.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Feedback {
    pub counters: Counters,
    pub grants: [WireGrant; SESSION_GRANT_SLOTS],
}

/// Cumulative counters; one 64-byte write carries them all.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Counters {
    /// Grants written into `grants` (grant `k` is in slot `k % SESSION_GRANT_SLOTS`).
    pub grants_issued: AtomicU64,
    /// Staging slots the broker has taken (a slot is reusable once counted here).
    pub staged_consumed: AtomicU64,
    pub acked_messages: AtomicU64,
    pub acked_batches: AtomicU64,
    pub rejected_batches: AtomicU64,
    /// Last error: `code | batch_seq << 8` (codes of [`crate::session::SessionError`]).
    pub error: AtomicU64,
    /// Non-zero once the broker ended the session (a `SessionError` code).
    pub closed: AtomicU64,
    /// A broker whose disk log of an ACK 2 session's topic is failing
    /// ([`crate::replication::DiskFault::pack`]; 0: none).
    pub disk: AtomicU64,
}

/// One grant as the publisher sees it. Written once, before `grants_issued` counts it.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct WireGrant {
    /// Grant number + 1 (0: never written), so a stale slot is recognised.
    pub number: AtomicU64,
    /// Pool offset of the granted space (what the descriptor's `log_idx` names).
    pub offset: AtomicU64,
    pub bytes: AtomicU64,
    /// Broker virtual address of `offset`, the RDMA target.
    pub addr: AtomicU64,
    pub rkey: AtomicU64,
    pub _pad: [AtomicU64; 3],
}

const _: () = assert!(std::mem::size_of::<Counters>() == 64);
const _: () = assert!(std::mem::size_of::<WireGrant>() == 64);
const _: () = assert!(std::mem::size_of::<Feedback>() == 64 * (1 + SESSION_GRANT_SLOTS));

/// Byte offset of grant slot `i` inside [`Feedback`].
pub fn grant_offset(i: usize) -> u64 {
    (64 * (1 + i)) as u64
}

/// The 64-byte wire form of a descriptor: eight little-endian words, the last one
/// `copy_from + 1` of a resend by copy (0: none; see [`Staged`]).
pub fn encode_descriptor(d: &BatchDesc) -> [u8; SLOT_BYTES] {
    encode_staged(&Staged {
        desc: *d,
        copy_from: None,
    })
}

/// What a publisher stages: a descriptor, and for a resend after its broker died, where in
/// the pool the batch already is (`copy_from`: the dead broker's grant, where the publisher
/// RDMA-wrote it). The frontend copies those bytes into the descriptor's place in this
/// session's grant before it submits the descriptor, so a resend moves no payload over the
/// network; the broker checks the copy like any batch (every message header names the
/// session's client and the batch), so bytes that are not this client's batch are rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    pub desc: BatchDesc,
    pub copy_from: Option<u64>,
}

/// The wire form of `s` (see [`encode_descriptor`]).
pub fn encode_staged(s: &Staged) -> [u8; SLOT_BYTES] {
    let d = &s.desc;
    let words = [
        d.batch_seq,
        d.client_id,
        u64::from(d.num_msg) | u64::from(d.broker_id) << 32,
        d.total_size,
        d.log_idx,
        d.start_logical_offset,
        d.version_flags,
        s.copy_from.map_or(0, |f| f.wrapping_add(1)),
    ];
    let mut out = [0u8; SLOT_BYTES];
    for (i, w) in words.iter().enumerate() {
        out[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Inverse of [`encode_staged`]. Any 64 bytes decode; the broker's checks judge them.
pub fn decode_staged(b: &[u8; SLOT_BYTES]) -> Staged {
    let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    Staged {
        desc: BatchDesc {
            batch_seq: w(0),
            client_id: w(1),
            num_msg: w(2) as u32,
            broker_id: (w(2) >> 32) as u32,
            total_size: w(3),
            log_idx: w(4),
            start_logical_offset: w(5),
            version_flags: w(6),
        },
        copy_from: w(7).checked_sub(1),
    }
}

/// `key=value` fields of a handshake line after its first word.
pub fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_ascii_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
}

/// What is wrong with a handshake line (either end's).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("expected {HELLO} (a verbs publisher of this version)")]
    NotHello,
    #[error("handshake line has no {0}=")]
    MissingField(String),
    #[error("bad {key}= {value:?}")]
    BadField { key: &'static str, value: String },
    #[error("bad number list {0:?}")]
    BadNumbers(String),
    #[error("{text:?}: want {want} numbers")]
    NumberCount { text: String, want: usize },
    #[cfg(feature = "verbs")]
    #[error("bad ep=: {0}")]
    BadEndpoint(#[source] embar_sys::verbs::VerbsError),
    #[error(transparent)]
    Topic(#[from] crate::PoolError),
}

/// The value of `key` in a handshake line.
pub fn field<'a>(line: &'a str, key: &str) -> Result<&'a str, HandshakeError> {
    fields(line)
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .ok_or_else(|| HandshakeError::MissingField(key.to_string()))
}

/// `a:b[:c...]` as numbers.
pub fn parse_nums(s: &str, n: usize) -> Result<Vec<u64>, HandshakeError> {
    let v: Vec<u64> = s
        .split(':')
        .map(|x| x.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| HandshakeError::BadNumbers(s.to_string()))?;
    if v.len() != n {
        return Err(HandshakeError::NumberCount {
            text: s.to_string(),
            want: n,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn descriptors_round_trip(seq: u64, client: u64, n: u32, b: u32, size: u64, idx: u64, lo: u64, v: u64) {
            let d = BatchDesc { batch_seq: seq, client_id: client, num_msg: n, broker_id: b, total_size: size, log_idx: idx, start_logical_offset: lo, version_flags: v };
            let plain = Staged { desc: d, copy_from: None };
            prop_assert_eq!(decode_staged(&encode_descriptor(&d)), plain);
            let resend = Staged { desc: d, copy_from: Some(lo >> 1) };
            prop_assert_eq!(decode_staged(&encode_staged(&resend)), resend);
        }
    }

    #[test]
    fn handshake_fields() {
        let l = "OK ep=1:2:00 staging=10:20:32 ack=1";
        assert_eq!(field(l, "ack").unwrap(), "1");
        assert_eq!(
            parse_nums(field(l, "staging").unwrap(), 3).unwrap(),
            vec![10, 20, 32]
        );
        assert!(matches!(
            field(l, "nope"),
            Err(HandshakeError::MissingField(k)) if k == "nope"
        ));
        assert!(matches!(
            parse_nums("1:x", 2),
            Err(HandshakeError::BadNumbers(_))
        ));
        let e = parse_nums("1:2", 3).unwrap_err();
        assert!(matches!(e, HandshakeError::NumberCount { want: 3, .. }));
        assert_eq!(e.to_string(), "\"1:2\": want 3 numbers");
    }
}
