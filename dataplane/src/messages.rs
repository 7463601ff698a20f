//! One checked view of a batch's messages: the only code that walks message headers.
//!
//! A batch is `num_msg` messages, each a 64-byte [`MessageHeader`] then its payload, padded to
//! the message stride, filling exactly `total_size` bytes. Every reader goes through
//! [`Messages`], which checks the whole chain once (every header inside the batch, every
//! payload inside it, exactly `num_msg` messages filling `total_size`, each header naming the
//! batch's client and batch sequence) and then hands out each message as a header and a
//! payload slice:
//!
//! - [`Messages::check`] / [`Messages::check_all`] over the pool: the broker runs it on every
//!   batch before publishing it, so a batch whose messages cannot be read is rejected and never
//!   acked; the sequencer's ORDER 4 stamping ([`Messages::stamp_total_orders`]), the load
//!   generators and the order checks of the bench read through it too.
//! - [`Messages::over`] over bytes a reader owns (a copy of a batch), and [`Parts`] for a
//!   reader that copies a batch out a window at a time: the subscriber (`client::subscriber`)
//!   checks and delivers each window of its copy through it, with the same checks and errors.
//!
//! No code outside this module computes a message's offset from a raw pointer to read it; on
//! the writer side, `batch::BatchWriter` is the one place that lays messages out.
//!
//! The log is shared memory its publisher can still write after the check (only a publisher
//! that breaks the protocol does). Iterating therefore re-checks each header's bounds as it
//! reads it (a few comparisons per message, no allocation): a chain changed after the check
//! is reported as an error, never read out of bounds. Headers are read as copies, unaligned,
//! so a view over any byte slice is sound.

use std::marker::PhantomData;

use crate::batch::BatchDesc;
use crate::pool::coherence::{Coherence, CoherenceMode};
use crate::pool::layout::{message_stride, MessageHeader, BATCH_MESSAGES_MAX, MESSAGE_BYTES_MAX};
use crate::pool::Pool;

/// Bytes of a message header.
const HEADER_BYTES: u64 = std::mem::size_of::<MessageHeader>() as u64;

/// Why a batch's messages cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadBatch {
    #[error("batch range: {0}")]
    Range(String),
    #[error("message count {num_msg} (must be 1..={BATCH_MESSAGES_MAX})")]
    Count { num_msg: u32 },
    #[error("message {index} starts at byte {offset}, its header past the batch's {total} bytes")]
    HeaderPastBatch { index: u32, offset: u64, total: u64 },
    #[error(
        "message {index} of {size} bytes at byte {offset} lies past the batch's {total} bytes"
    )]
    PayloadPastBatch {
        index: u32,
        offset: u64,
        size: u64,
        total: u64,
    },
    #[error(
        "message {index} of {size} bytes is larger than the message limit {MESSAGE_BYTES_MAX}"
    )]
    TooLarge { index: u32, size: u64 },
    #[error("the batch's {num_msg} messages end at byte {end}, its descriptor says {total} bytes")]
    SizeMismatch { num_msg: u32, end: u64, total: u64 },
    #[error("message {index} names client {found}, the batch is client {expected}'s")]
    WrongClient {
        index: u32,
        found: u64,
        expected: u64,
    },
    #[error("message {index} names batch sequence {found}, the batch is {expected}")]
    WrongBatchSeq {
        index: u32,
        found: u64,
        expected: u64,
    },
}

/// What a batch's descriptor says of its messages; every header must agree with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub num_msg: u32,
    pub client_id: u64,
    pub batch_seq: u64,
}

impl From<&BatchDesc> for Claims {
    fn from(d: &BatchDesc) -> Claims {
        Claims {
            num_msg: d.num_msg,
            client_id: d.client_id,
            batch_seq: d.batch_seq,
        }
    }
}

impl Claims {
    fn check_count(&self) -> Result<(), BadBatch> {
        if self.num_msg == 0 || self.num_msg > BATCH_MESSAGES_MAX {
            return Err(BadBatch::Count {
                num_msg: self.num_msg,
            });
        }
        Ok(())
    }
}

/// The messages of one batch (or of a part of it, from [`Parts`]), checked. Borrows the bytes
/// it reads: the pool (where the bytes stay the batch's while the protocol gives the holder
/// the batch: published and not reclaimed) or a reader's own copy.
#[derive(Clone, Copy, Debug)]
pub struct Messages<'a> {
    span: Span,
    /// The batch's size.
    total: u64,
    /// The view's first message.
    from: At,
    /// Messages in the view.
    count: u32,
    claims: Claims,
    _bytes: PhantomData<&'a [u8]>,
}

/// One message of a checked batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// Index in its batch.
    pub index: u32,
    pub header: MessageHeader,
    pub payload: &'a [u8],
}

/// The bytes of a batch a view can read: batch bytes `start..end`, at `base`.
#[derive(Clone, Copy, Debug)]
struct Span {
    base: *const u8,
    start: u64,
    end: u64,
}

/// A place in a batch's chain: the index and batch offset of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct At {
    index: u32,
    offset: u64,
}

impl At {
    const START: At = At {
        index: 0,
        offset: 0,
    };

    fn after(self, h: &MessageHeader) -> At {
        At {
            index: self.index + 1,
            offset: self.offset + message_stride(u64::from(h.size)),
        }
    }
}

/// What the chain holds at a place.
enum Step {
    /// A message whose header and payload lie inside the span (and the batch), checked.
    Whole(MessageHeader),
    /// A message inside the batch that the span does not hold whole: a span of at least
    /// `need` bytes from its start would.
    Short { need: u64 },
}

impl Span {
    /// Checks the message at `at` of a batch of `total` bytes that `claims` describes. Every
    /// byte it reads lies inside the span: the only read of the log's message headers.
    fn step(&self, claims: &Claims, total: u64, at: At) -> Result<Step, BadBatch> {
        let At { index, offset } = at;
        debug_assert!(offset >= self.start, "a walk starts inside its span");
        if offset + HEADER_BYTES > total {
            return Err(BadBatch::HeaderPastBatch {
                index,
                offset,
                total,
            });
        }
        if offset + HEADER_BYTES > self.end {
            return Ok(Step::Short { need: HEADER_BYTES });
        }
        // SAFETY: `start <= offset` and `offset + 64 <= end`: the header lies inside the
        // span, which its constructor bounds-checked (a slice, or a range `Pool::data_ptr`
        // checked). Read as an unaligned copy (a copy may sit anywhere); every bit pattern is
        // a valid header; the header is checked and used from the copy only.
        let h = unsafe {
            self.base
                .add((offset - self.start) as usize)
                .cast::<MessageHeader>()
                .read_unaligned()
        };
        let size = u64::from(h.size);
        if size > MESSAGE_BYTES_MAX {
            return Err(BadBatch::TooLarge { index, size });
        }
        if offset + HEADER_BYTES + size > total {
            return Err(BadBatch::PayloadPastBatch {
                index,
                offset,
                size,
                total,
            });
        }
        if h.client_id != claims.client_id {
            return Err(BadBatch::WrongClient {
                index,
                found: h.client_id,
                expected: claims.client_id,
            });
        }
        if h.batch_seq != claims.batch_seq {
            return Err(BadBatch::WrongBatchSeq {
                index,
                found: h.batch_seq,
                expected: claims.batch_seq,
            });
        }
        if offset + HEADER_BYTES + size > self.end {
            return Ok(Step::Short {
                need: message_stride(size),
            });
        }
        Ok(Step::Whole(h))
    }

    /// As [`step`](Self::step), for a span that holds the whole batch.
    fn step_whole(&self, claims: &Claims, total: u64, at: At) -> Result<MessageHeader, BadBatch> {
        debug_assert_eq!((self.start, self.end), (0, total));
        match self.step(claims, total, at)? {
            Step::Whole(h) => Ok(h),
            // Each bound is checked against the batch before the span, with the same value.
            Step::Short { .. } => unreachable!("a span of the whole batch holds every message"),
        }
    }
}

/// How many messages ahead the walk over a batch in the pool asks for header lines: on a
/// coherent pool the line is likely in the shared cache (the publisher just wrote it); on a
/// non-coherent one it was just invalidated, so each is a miss to memory and the walk looks
/// further ahead.
const PREFETCH_AHEAD: u64 = 4;
const PREFETCH_AHEAD_NON_COHERENT: u64 = 16;
/// Header lines invalidated ahead that the walk remembers (a power of two, more than
/// `PREFETCH_AHEAD_NON_COHERENT`: a guess is reached that many steps after it is made).
const FRESH_SLOTS: usize = 32;

impl<'a> Messages<'a> {
    /// Checks the batch `desc` names (its `log_idx`, `total_size`, `num_msg`, `client_id`
    /// and `batch_seq`), making each header visible to this process as it reads it: for the
    /// broker and the sequencer, which read headers only (on a non-coherent pool, one
    /// invalidated line per message instead of the whole batch).
    pub fn check<C: Coherence>(
        pool: &'a Pool,
        c: C,
        desc: &BatchDesc,
    ) -> Result<Messages<'a>, BadBatch> {
        Self::check_in_pool(pool, c, desc, false).map(|(m, _)| m)
    }

    /// As [`check`](Self::check), after making the whole batch (payloads too) visible to
    /// this process: for readers of the payloads ([`iter`](Self::iter)).
    pub fn check_all<C: Coherence>(
        pool: &'a Pool,
        c: C,
        desc: &BatchDesc,
    ) -> Result<Messages<'a>, BadBatch> {
        Self::check_in_pool(pool, c, desc, true).map(|(m, _)| m)
    }

    /// Checks a whole batch held in `bytes` (a reader's own copy: its `total_size` is
    /// `bytes.len()`).
    pub fn over(bytes: &'a [u8], claims: Claims) -> Result<Messages<'a>, BadBatch> {
        let mut parts = Parts::new(claims, bytes.len() as u64)?;
        let m = parts.next(bytes)?;
        debug_assert!(
            parts.is_done(),
            "a span of the whole batch holds every message"
        );
        Ok(m)
    }

    /// The view, and the batch's start for a writer of the headers (the sequencer).
    fn check_in_pool<C: Coherence>(
        pool: &'a Pool,
        c: C,
        desc: &BatchDesc,
        whole: bool,
    ) -> Result<(Messages<'a>, *mut u8), BadBatch> {
        let claims = Claims::from(desc);
        claims.check_count()?;
        let total = desc.total_size;
        let base = pool
            .data_ptr(desc.log_idx, total)
            .map_err(|e| BadBatch::Range(e.to_string()))?;
        if whole {
            // SAFETY: `data_ptr` checked that the range lies inside the mapping.
            unsafe { c.invalidate_range(base, total as usize) };
        }
        let span = Span {
            base,
            start: 0,
            end: total,
        };
        let mut at = At::START;
        // Header lines invalidated ahead of the walk (on a non-coherent pool), by offset: a
        // header found at one of them is not invalidated again (that would evict the line its
        // prefetch brought in, and read it from memory after all).
        // Guesses are made, and reached, in increasing offset order: a queue (`fresh[first..
        // guessed]`, indices mod FRESH_SLOTS) whose stale front is dropped as the walk passes.
        let mut fresh = [0u64; FRESH_SLOTS];
        let (mut first, mut guessed) = (0usize, 0usize);
        // Whether each header line must be invalidated before it is read.
        let per_header = !whole && c.mode() == CoherenceMode::NonCoherent;
        let look_ahead = if per_header {
            PREFETCH_AHEAD_NON_COHERENT
        } else {
            PREFETCH_AHEAD
        };
        while at.index < claims.num_msg {
            while first < guessed && fresh[first % FRESH_SLOTS] < at.offset {
                first += 1;
            }
            let invalidated = first < guessed && fresh[first % FRESH_SLOTS] == at.offset;
            if per_header && at.offset + HEADER_BYTES <= total && !invalidated {
                // SAFETY: the header's line, inside the range `data_ptr` checked.
                unsafe { c.invalidate_range(base.add(at.offset as usize), 64) };
            }
            let next = at.after(&span.step_whole(&claims, total, at)?);
            // Each header's place depends on the one before: the lines of the headers a few
            // messages on (guessing the sizes stay the same, as they mostly do) are asked for
            // now, so that their misses overlap instead of coming one after another. On a
            // non-coherent pool the guessed line is invalidated first (after the descriptor
            // was seen, so what the prefetch loads is what the publisher wrote back).
            let ahead = next
                .offset
                .saturating_add((next.offset - at.offset).saturating_mul(look_ahead));
            if ahead < total {
                let newest = (first < guessed).then(|| fresh[(guessed - 1) % FRESH_SLOTS]);
                if per_header
                    && ahead + HEADER_BYTES <= total
                    && newest.is_none_or(|n| ahead > n)
                    && guessed - first < FRESH_SLOTS
                {
                    // SAFETY: a line inside the range `data_ptr` checked (`ahead + 64 <=
                    // total`); invalidating a line of the batch changes none of its bytes.
                    unsafe { c.invalidate_range(base.add(ahead as usize), 64) };
                    fresh[guessed % FRESH_SLOTS] = ahead;
                    guessed += 1;
                }
                embar_sys::cacheline::prefetch_read(base.wrapping_add(ahead as usize));
            }
            at = next;
        }
        if at.offset != total {
            return Err(BadBatch::SizeMismatch {
                num_msg: claims.num_msg,
                end: at.offset,
                total,
            });
        }
        let m = Messages {
            span,
            total,
            from: At::START,
            count: claims.num_msg,
            claims,
            _bytes: PhantomData,
        };
        Ok((m, base))
    }

    /// Messages of the whole batch.
    pub fn num_msg(&self) -> u32 {
        self.claims.num_msg
    }

    /// Messages in this view (all of the batch's, but for a view of one of its [`Parts`]).
    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the whole batch.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Every message of the view, in order; an item is an error only if the chain changed
    /// since the check (its writer broke the protocol), and iteration stops after it. On a
    /// non-coherent pool the payloads are fresh only after [`check_all`](Self::check_all).
    pub fn iter(&self) -> impl Iterator<Item = Result<Message<'a>, BadBatch>> + 'a {
        let span = self.span;
        self.chain().map(move |r| {
            r.map(|(at, header)| Message {
                index: at.index,
                header,
                // SAFETY: `step` checked `start <= offset` and `offset + 64 + size <= end`:
                // the payload lies inside the span, whose bytes stay the batch's while the
                // view lives (the lifetime `'a`).
                payload: unsafe {
                    std::slice::from_raw_parts(
                        span.base
                            .add((at.offset - span.start + HEADER_BYTES) as usize),
                        header.size as usize,
                    )
                },
            })
        })
    }

    /// Checks the batch `desc` names, then stamps every message header with its own total
    /// order, `first + index` (ORDER 4), and writes the headers back. For the sequencer,
    /// which holds the batch while it decides it.
    pub fn stamp_total_orders<C: Coherence>(
        pool: &Pool,
        c: C,
        desc: &BatchDesc,
        first: u64,
    ) -> Result<(), BadBatch> {
        let (m, base) = Messages::check_in_pool(pool, c, desc, false)?;
        for r in m.chain() {
            let (at, _) = r?;
            // SAFETY: `step` checked `offset + 64 <= total`, inside the range `data_ptr`
            // checked (a pointer it returned for writing); every message starts at a multiple
            // of 64 from the 64-byte aligned batch start; the sequencer holds the batch.
            unsafe {
                let h = base.add(at.offset as usize).cast::<MessageHeader>();
                std::ptr::addr_of_mut!((*h).total_order).write(first + u64::from(at.index));
                // Only the header line changed.
                c.writeback_range(h.cast(), 64);
            }
        }
        Ok(())
    }

    /// Walks the view's headers again, bounds-checked as read.
    fn chain(&self) -> Chain {
        Chain {
            span: self.span,
            claims: self.claims,
            at: self.from,
            left: self.count,
            failed: false,
        }
    }
}

struct Chain {
    span: Span,
    claims: Claims,
    at: At,
    left: u32,
    failed: bool,
}

impl Iterator for Chain {
    type Item = Result<(At, MessageHeader), BadBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.left == 0 {
            return None;
        }
        // The view's own bytes are the bound: each message of it was whole inside them.
        match self.span.step(&self.claims, self.span.end, self.at) {
            Ok(Step::Whole(h)) => {
                let at = self.at;
                self.at = at.after(&h);
                self.left -= 1;
                Some(Ok((at, h)))
            }
            // With the span's end as the batch's, a message short of it is past the batch.
            Ok(Step::Short { .. }) => unreachable!("checked against the span's end first"),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// A batch read a part at a time from bytes a reader copied out: the subscriber copies a
/// window of a batch, checks it, and delivers its messages while the copy is in cache. Each
/// part is checked as [`Messages::check`] checks a batch (the same bounds and errors, with
/// the batch's `total` and `claims`); the last one also checks that the messages fill the
/// batch exactly.
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    claims: Claims,
    total: u64,
    at: At,
    need: u64,
}

impl Parts {
    /// The parts of a batch of `total` bytes that `claims` describes.
    pub fn new(claims: Claims, total: u64) -> Result<Parts, BadBatch> {
        claims.check_count()?;
        Ok(Parts {
            claims,
            total,
            at: At::START,
            need: HEADER_BYTES,
        })
    }

    /// Where the next part starts: a byte offset in the batch.
    pub fn offset(&self) -> u64 {
        self.at.offset
    }

    /// The index of the next message.
    pub fn index(&self) -> u32 {
        self.at.index
    }

    /// Whether every message has been in a part.
    pub fn is_done(&self) -> bool {
        self.at.index >= self.claims.num_msg
    }

    /// Bytes the next part must hold at least to hold its first message: its stride when
    /// the last part ended at a message it did not hold whole, else a header's.
    pub fn need(&self) -> u64 {
        self.need
    }

    /// The whole messages at the start of `bytes` (the batch's bytes from
    /// [`offset`](Self::offset) on, as many as the reader copied), checked; the next part
    /// starts after them. A view of no message means `bytes` held none whole: pass at least
    /// [`need`](Self::need) bytes. After an error the batch is unreadable.
    pub fn next<'b>(&mut self, bytes: &'b [u8]) -> Result<Messages<'b>, BadBatch> {
        let span = Span {
            base: bytes.as_ptr(),
            start: self.at.offset,
            end: (self.at.offset + bytes.len() as u64).min(self.total),
        };
        let from = self.at;
        self.need = HEADER_BYTES;
        while !self.is_done() {
            match span.step(&self.claims, self.total, self.at)? {
                Step::Whole(h) => self.at = self.at.after(&h),
                Step::Short { need } => {
                    self.need = need;
                    break;
                }
            }
        }
        if self.is_done() && self.at.offset != self.total {
            return Err(BadBatch::SizeMismatch {
                num_msg: self.claims.num_msg,
                end: self.at.offset,
                total: self.total,
            });
        }
        Ok(Messages {
            span: Span {
                end: self.at.offset,
                ..span
            },
            total: self.total,
            from,
            count: self.at.index - from.index,
            claims: self.claims,
            _bytes: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchWriter;
    use crate::pool::coherence::Coherent;
    use crate::pool::geometry::PoolConfig;
    use crate::pool::tests::TempPool;
    use crate::pool::CreateOptions;
    use proptest::prelude::*;

    const CLIENT: u64 = 7;
    const SEQ: u64 = 3;

    fn pool() -> (TempPool, Pool) {
        let t = TempPool::path("messages");
        let cfg = PoolConfig {
            pool_bytes: 16 << 20,
            max_topics: 1,
            max_brokers: 1,
            ring_slots: 64,
            segment_bytes: 1 << 20,
        };
        let p = Pool::create(&t.0, &cfg, &CreateOptions::default()).unwrap();
        (t, p)
    }

    /// A header of the test's batch (its size set by the writer).
    fn header() -> MessageHeader {
        MessageHeader {
            client_id: CLIENT,
            batch_seq: SEQ,
            ..MessageHeader::default()
        }
    }

    /// Writes `payloads` as one batch at the start of segment 0; its descriptor.
    fn batch(pool: &Pool, payloads: &[&[u8]]) -> BatchDesc {
        let log_idx = pool.geometry().segment_offset(0);
        let total: u64 = payloads
            .iter()
            .map(|p| message_stride(p.len() as u64))
            .sum();
        // SAFETY: inside the range `data_ptr` checked, 64-byte aligned (a segment's start);
        // nothing else touches this test's pool.
        let mut w = unsafe { BatchWriter::new(pool.data_ptr(log_idx, total).unwrap(), total) };
        for p in payloads {
            w.append(&header(), p).unwrap();
        }
        BatchDesc {
            batch_seq: SEQ,
            client_id: CLIENT,
            num_msg: payloads.len() as u32,
            total_size: total,
            log_idx,
            ..BatchDesc::default()
        }
    }

    /// Overwrites the `size` word of the header at byte `offset` of the batch.
    fn set_size(pool: &Pool, d: &BatchDesc, offset: u64, size: u32) {
        let p = pool.data_ptr(d.log_idx + offset, 64).unwrap();
        // SAFETY: a header inside this test's batch.
        unsafe { p.cast::<u32>().write(size) };
    }

    #[test]
    fn a_well_formed_batch_yields_every_message_in_order() {
        let (_t, pool) = pool();
        let d = batch(&pool, &[b"one", &[9u8; 100], b""]);
        let m = Messages::check(&pool, Coherent, &d).unwrap();
        let got: Vec<(u32, Vec<u8>)> = m
            .iter()
            .map(|r| r.map(|m| (m.index, m.payload.to_vec())).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![(0, b"one".to_vec()), (1, vec![9u8; 100]), (2, vec![])]
        );
    }

    #[test]
    fn a_message_size_of_u32_max_is_rejected_not_read() {
        let (_t, pool) = pool();
        let mut d = batch(&pool, &[b"a", b"b", b"c", b"d"]);
        d.total_size = 4 * 64 * 2;
        set_size(&pool, &d, 0, u32::MAX);
        let e = Messages::check(&pool, Coherent, &d).unwrap_err();
        assert!(
            matches!(e, BadBatch::TooLarge { index: 0, size } if size == u64::from(u32::MAX)),
            "{e}"
        );
    }

    #[test]
    fn a_message_past_the_batch_end_is_rejected() {
        let (_t, pool) = pool();
        let d = batch(&pool, &[b"a", b"b"]);
        set_size(&pool, &d, 64 * 2, 200);
        let e = Messages::check(&pool, Coherent, &d).unwrap_err();
        assert_eq!(
            e,
            BadBatch::PayloadPastBatch {
                index: 1,
                offset: 128,
                size: 200,
                total: 256
            }
        );
        assert!(e.to_string().contains("lies past the batch"), "{e}");
    }

    #[test]
    fn more_messages_than_the_bytes_hold_are_rejected() {
        let (_t, pool) = pool();
        let mut d = batch(&pool, &[b"a", b"b"]);
        d.num_msg = 3;
        let e = Messages::check(&pool, Coherent, &d).unwrap_err();
        assert!(
            matches!(e, BadBatch::HeaderPastBatch { index: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn bytes_left_after_the_last_message_are_rejected() {
        let (_t, pool) = pool();
        let mut d = batch(&pool, &[b"a", b"b"]);
        d.num_msg = 1;
        let e = Messages::check(&pool, Coherent, &d).unwrap_err();
        assert_eq!(
            e,
            BadBatch::SizeMismatch {
                num_msg: 1,
                end: 128,
                total: 256
            }
        );
    }

    #[test]
    fn a_zero_or_huge_message_count_is_rejected() {
        let (_t, pool) = pool();
        let mut d = batch(&pool, &[b"a"]);
        for n in [0, BATCH_MESSAGES_MAX + 1] {
            d.num_msg = n;
            assert_eq!(
                Messages::check(&pool, Coherent, &d).unwrap_err(),
                BadBatch::Count { num_msg: n }
            );
        }
    }

    #[test]
    fn a_header_of_another_client_or_batch_is_rejected() {
        let (_t, pool) = pool();
        let mut d = batch(&pool, &[b"a", b"b"]);
        d.client_id = CLIENT + 1;
        assert!(matches!(
            Messages::check(&pool, Coherent, &d).unwrap_err(),
            BadBatch::WrongClient { index: 0, .. }
        ));
        d.client_id = CLIENT;
        d.batch_seq = SEQ + 1;
        assert!(matches!(
            Messages::check(&pool, Coherent, &d).unwrap_err(),
            BadBatch::WrongBatchSeq { index: 0, .. }
        ));
    }

    #[test]
    fn a_range_outside_the_segment_pool_is_rejected_before_any_read() {
        let (_t, pool) = pool();
        let mut d = batch(&pool, &[b"a"]);
        d.log_idx = 0;
        assert!(matches!(
            Messages::check(&pool, Coherent, &d).unwrap_err(),
            BadBatch::Range(_)
        ));
    }

    #[test]
    fn a_chain_changed_after_the_check_ends_iteration_with_an_error() {
        let (_t, pool) = pool();
        let d = batch(&pool, &[b"a", b"b", b"c"]);
        let m = Messages::check(&pool, Coherent, &d).unwrap();
        set_size(&pool, &d, 128, u32::MAX);
        let items: Vec<_> = m.iter().collect();
        assert_eq!(items.len(), 2, "stops after the error");
        assert!(items[0].is_ok());
        assert!(matches!(items[1], Err(BadBatch::TooLarge { index: 1, .. })));
    }

    #[test]
    fn stamping_writes_each_message_its_own_total_order() {
        let (_t, pool) = pool();
        let d = batch(&pool, &[b"a", &[1u8; 70], b"c"]);
        Messages::stamp_total_orders(&pool, Coherent, &d, 40).unwrap();
        let m = Messages::check(&pool, Coherent, &d).unwrap();
        let orders: Vec<u64> = m.iter().map(|r| r.unwrap().header.total_order).collect();
        assert_eq!(orders, vec![40, 41, 42]);
    }

    /// `payloads` as the bytes of one batch, in a buffer of their own, behind `pad` bytes (a
    /// copy need not be aligned).
    fn batch_bytes(payloads: &[Vec<u8>], pad: usize) -> Vec<u8> {
        let mut out = vec![0xeeu8; pad];
        for p in payloads {
            let h = MessageHeader {
                size: p.len() as u32,
                ..header()
            };
            // SAFETY: `MessageHeader` is plain integers, 64 bytes, no padding.
            let raw: [u8; 64] = unsafe { std::mem::transmute(h) };
            out.extend_from_slice(&raw);
            out.extend_from_slice(p);
            out.resize(
                out.len() + (message_stride(p.len() as u64) as usize - 64 - p.len()),
                0,
            );
        }
        out
    }

    fn claims(num_msg: u32) -> Claims {
        Claims {
            num_msg,
            client_id: CLIENT,
            batch_seq: SEQ,
        }
    }

    /// Each message's `(index, payload)`, or the first error.
    fn read(m: &Messages<'_>) -> Result<Vec<(u32, Vec<u8>)>, BadBatch> {
        m.iter()
            .map(|r| r.map(|m| (m.index, m.payload.to_vec())))
            .collect()
    }

    /// Reads a batch in parts of `window` bytes (grown to what a part needs), as the
    /// subscriber does; every payload must lie inside the part it came from.
    fn read_in_parts(
        bytes: &[u8],
        c: Claims,
        window: usize,
    ) -> Result<Vec<(u32, Vec<u8>)>, BadBatch> {
        let mut parts = Parts::new(c, bytes.len() as u64)?;
        let mut window = window.max(1);
        let mut out = Vec::new();
        while !parts.is_done() {
            let off = parts.offset() as usize;
            let part = &bytes[off..(off + window).min(bytes.len())];
            let before = out.len();
            for m in parts.next(part)?.iter() {
                let m = m?;
                assert_inside(m.payload, part);
                out.push((m.index, m.payload.to_vec()));
            }
            let need = parts.need() as usize;
            assert!(
                out.len() > before || need > window,
                "a part made no progress and asked for no more bytes"
            );
            window = window.max(need);
        }
        Ok(out)
    }

    fn assert_inside(payload: &[u8], buf: &[u8]) {
        let (lo, hi) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
        let p = payload.as_ptr() as usize;
        assert!(
            p >= lo && p + payload.len() <= hi,
            "a payload outside the buffer"
        );
    }

    #[test]
    fn a_copy_yields_the_same_messages_as_the_pool_view() {
        let (_t, pool) = pool();
        let payloads: [&[u8]; 3] = [b"one", &[9u8; 100], b""];
        let d = batch(&pool, &payloads);
        let in_pool = read(&Messages::check_all(&pool, Coherent, &d).unwrap()).unwrap();
        let owned: Vec<Vec<u8>> = payloads.iter().map(|p| p.to_vec()).collect();
        let copy = batch_bytes(&owned, 3);
        let m = Messages::over(&copy[3..], claims(3)).unwrap();
        assert_eq!(read(&m).unwrap(), in_pool);
        assert_eq!((m.len(), m.num_msg(), m.total_bytes()), (3, 3, 64 * 6));
    }

    #[test]
    fn a_copy_is_checked_as_the_pool_is() {
        let copy = batch_bytes(&[b"a".to_vec(), b"b".to_vec()], 0);
        assert_eq!(
            Messages::over(&copy, claims(3)).unwrap_err(),
            BadBatch::HeaderPastBatch {
                index: 2,
                offset: 256,
                total: 256
            }
        );
        assert_eq!(
            Messages::over(&copy, claims(1)).unwrap_err(),
            BadBatch::SizeMismatch {
                num_msg: 1,
                end: 128,
                total: 256
            }
        );
        assert!(matches!(
            Messages::over(&copy[..192], claims(2)).unwrap_err(),
            BadBatch::PayloadPastBatch { index: 1, .. }
        ));
        let other = Claims {
            client_id: CLIENT + 1,
            ..claims(2)
        };
        assert!(matches!(
            Messages::over(&copy, other).unwrap_err(),
            BadBatch::WrongClient { index: 0, .. }
        ));
        assert_eq!(
            Messages::over(&copy, claims(0)).unwrap_err(),
            BadBatch::Count { num_msg: 0 }
        );
    }

    #[test]
    fn parts_smaller_than_a_message_ask_for_its_stride() {
        let copy = batch_bytes(&[vec![1u8; 10], vec![2u8; 300], vec![3u8; 10]], 0);
        let mut parts = Parts::new(claims(3), copy.len() as u64).unwrap();
        let first = parts.next(&copy[..200]).unwrap();
        assert_eq!(
            first.len(),
            1,
            "the first message only: the second is 384 bytes"
        );
        assert_eq!((parts.index(), parts.offset(), parts.need()), (1, 128, 384));
        let none = parts.next(&copy[128..200]).unwrap();
        assert!(none.is_empty());
        assert_eq!(parts.need(), 384);
        let rest = parts.next(&copy[128..]).unwrap();
        assert_eq!(
            read(&rest).unwrap().iter().map(|m| m.0).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(parts.is_done());
    }

    /// A valid batch of messages of these payload sizes.
    fn sizes() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(0usize..300, 1..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Garbage never panics the view nor yields a payload outside the buffer, whole or
        /// in parts of any size.
        #[test]
        fn garbage_bytes_never_panic_nor_yield_outside_the_buffer(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            num_msg in 0u32..20,
            pad in 0usize..64,
            window in 1usize..1024,
            copy_header in any::<bool>(),
            tame in any::<bool>(),
        ) {
            // Claims taken from the first header, so a walk gets past the identity checks.
            let mut c = claims(num_msg);
            let mut bytes = bytes;
            if copy_header && bytes.len() >= 64 {
                c.client_id = u64::from_ne_bytes(bytes[8..16].try_into().unwrap());
                c.batch_seq = u64::from_ne_bytes(bytes[16..24].try_into().unwrap());
            }
            if tame {
                // Every 64-byte line reads as a header of this batch with a small size, so
                // walks go deep: past several messages, to short parts and size mismatches.
                for line in bytes.chunks_exact_mut(64) {
                    line[0] = line[0].min(200);
                    line[1..4].fill(0);
                    line[8..16].copy_from_slice(&c.client_id.to_ne_bytes());
                    line[16..24].copy_from_slice(&c.batch_seq.to_ne_bytes());
                }
            }
            let mut buf = vec![0u8; pad];
            buf.extend_from_slice(&bytes);
            let bytes = &buf[pad..];
            if let Ok(m) = Messages::over(bytes, c) {
                for r in m.iter() {
                    assert_inside(r.unwrap().payload, bytes);
                }
            }
            let _ = read_in_parts(bytes, c, window);
        }

        /// A valid batch with one corrupted word is read whole or rejected, never read out of
        /// bounds.
        #[test]
        fn a_corrupted_batch_is_rejected_or_read_inside_the_buffer(
            sizes in sizes(),
            at in any::<prop::sample::Index>(),
            word in any::<u32>(),
            window in 64usize..2048,
        ) {
            let payloads: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![7u8; n]).collect();
            let mut copy = batch_bytes(&payloads, 0);
            let i = at.index(copy.len() / 4) * 4;
            copy[i..i + 4].copy_from_slice(&word.to_ne_bytes());
            let c = claims(sizes.len() as u32);
            if let Ok(m) = Messages::over(&copy, c) {
                for r in m.iter() {
                    assert_inside(r.unwrap().payload, &copy);
                }
            }
            let _ = read_in_parts(&copy, c, window);
        }

        /// A valid batch read in parts of any size yields every message once, in order, as
        /// the whole view does.
        #[test]
        fn parts_of_any_size_yield_what_the_whole_view_yields(
            sizes in sizes(),
            window in 1usize..4096,
        ) {
            let payloads: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| vec![i as u8; n])
                .collect();
            let copy = batch_bytes(&payloads, 0);
            let c = claims(sizes.len() as u32);
            let whole = read(&Messages::over(&copy, c).unwrap()).unwrap();
            let expected: Vec<(u32, Vec<u8>)> =
                payloads.into_iter().enumerate().map(|(i, p)| (i as u32, p)).collect();
            prop_assert_eq!(&whole, &expected);
            prop_assert_eq!(read_in_parts(&copy, c, window).unwrap(), expected);
        }
    }
}
