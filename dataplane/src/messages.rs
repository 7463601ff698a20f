//! One checked view of a batch's messages: the only code that walks message headers in the
//! log. [`Messages::check`] checks the whole chain of a batch once (every header inside the
//! batch, every payload inside it, exactly `num_msg` messages filling `total_size`, each
//! header naming the batch's client and batch sequence); the broker runs it on every batch
//! before publishing it, so a batch whose messages cannot be read is rejected and never acked.
//! The ORDER 4 stamping of the sequencer goes through the same view; the subscriber parses
//! its own copy of a batch with the same checks and errors (`client::subscriber`).
//!
//! The log is shared memory its publisher can still write after the check (only a publisher
//! that breaks the protocol does). Iterating therefore re-checks each header's bounds as it
//! reads it (a few comparisons per message, no allocation): a chain changed after the check
//! is reported as an error, never read out of bounds.

use std::marker::PhantomData;

use crate::batch::BatchDesc;
use crate::pool::coherence::Coherence;
use crate::pool::layout::{message_stride, MessageHeader, BATCH_MESSAGES_MAX, MESSAGE_BYTES_MAX};
use crate::pool::Pool;

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

/// The messages of one batch, checked. Borrows the pool; the bytes stay the batch's while
/// the protocol gives the holder the batch (published and not reclaimed).
#[derive(Clone, Copy, Debug)]
pub struct Messages<'a> {
    base: *mut u8,
    total: u64,
    num_msg: u32,
    client_id: u64,
    batch_seq: u64,
    _pool: PhantomData<&'a Pool>,
}

/// One message of a checked batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// Index in its batch.
    pub index: u32,
    pub header: MessageHeader,
    pub payload: &'a [u8],
}

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
        Self::check_with(pool, c, desc, false)
    }

    /// As [`check`](Self::check), after making the whole batch (payloads too) visible to
    /// this process: for readers of the payloads ([`iter`](Self::iter)).
    pub fn check_all<C: Coherence>(
        pool: &'a Pool,
        c: C,
        desc: &BatchDesc,
    ) -> Result<Messages<'a>, BadBatch> {
        Self::check_with(pool, c, desc, true)
    }

    fn check_with<C: Coherence>(
        pool: &'a Pool,
        c: C,
        desc: &BatchDesc,
        whole: bool,
    ) -> Result<Messages<'a>, BadBatch> {
        if desc.num_msg == 0 || desc.num_msg > BATCH_MESSAGES_MAX {
            return Err(BadBatch::Count {
                num_msg: desc.num_msg,
            });
        }
        let base = pool
            .data_ptr(desc.log_idx, desc.total_size)
            .map_err(|e| BadBatch::Range(e.to_string()))?;
        if whole {
            // SAFETY: `data_ptr` checked that the range lies inside the mapping.
            unsafe { c.invalidate_range(base, desc.total_size as usize) };
        }
        let m = Messages {
            base,
            total: desc.total_size,
            num_msg: desc.num_msg,
            client_id: desc.client_id,
            batch_seq: desc.batch_seq,
            _pool: PhantomData,
        };
        let mut end = 0;
        let mut chain = m.chain();
        while chain.index < m.num_msg {
            if !whole && chain.offset + 64 <= m.total {
                // SAFETY: the header's line, inside the range `data_ptr` checked.
                unsafe { c.invalidate_range(base.add(chain.offset as usize), 64) };
            }
            let (_, off, h) = chain.read()?;
            end = off + message_stride(u64::from(h.size));
        }
        if end != m.total {
            return Err(BadBatch::SizeMismatch {
                num_msg: m.num_msg,
                end,
                total: m.total,
            });
        }
        Ok(m)
    }

    pub fn num_msg(&self) -> u32 {
        self.num_msg
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Every message, in order; an item is an error only if the chain changed since the
    /// check (its writer broke the protocol), and iteration stops after it. On a
    /// non-coherent pool the payloads are fresh only after [`check_all`](Self::check_all).
    pub fn iter(&self) -> impl Iterator<Item = Result<Message<'a>, BadBatch>> + 'a {
        let base = self.base;
        self.chain().map(move |r| {
            r.map(|(index, off, header)| Message {
                index,
                header,
                // SAFETY: `chain` checked `off + 64 + size <= total`, inside the range checked
                // by `Messages::check`; the bytes stay the batch's while the view lives.
                payload: unsafe {
                    std::slice::from_raw_parts(base.add(off as usize + 64), header.size as usize)
                },
            })
        })
    }

    /// Stamps every message header with its own total order, `first + index` (ORDER 4), and
    /// writes the batch back. For the sequencer, which holds the batch while it decides it.
    pub fn stamp_total_orders<C: Coherence>(&self, c: C, first: u64) -> Result<(), BadBatch> {
        for r in self.chain() {
            let (index, off, _) = r?;
            // SAFETY: `chain` checked `off + 64 <= total`, inside the checked range; every
            // message starts at a multiple of 64 from the 64-byte aligned batch start.
            unsafe {
                let h = self.base.add(off as usize).cast::<MessageHeader>();
                std::ptr::addr_of_mut!((*h).total_order).write(first + u64::from(index));
                // Only the header line changed.
                c.writeback_range(h.cast(), 64);
            }
        }
        Ok(())
    }

    /// Walks the headers: `(index, offset, header)` for each, bounds-checked as read.
    fn chain(&self) -> Chain<'a> {
        Chain {
            m: *self,
            index: 0,
            offset: 0,
            failed: false,
        }
    }
}

struct Chain<'a> {
    m: Messages<'a>,
    index: u32,
    offset: u64,
    failed: bool,
}

impl Iterator for Chain<'_> {
    type Item = Result<(u32, u64, MessageHeader), BadBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.index >= self.m.num_msg {
            return None;
        }
        let r = self.read();
        self.failed = r.is_err();
        Some(r)
    }
}

impl Chain<'_> {
    fn read(&mut self) -> Result<(u32, u64, MessageHeader), BadBatch> {
        let (index, offset, total) = (self.index, self.offset, self.m.total);
        if offset + 64 > total {
            return Err(BadBatch::HeaderPastBatch {
                index,
                offset,
                total,
            });
        }
        // SAFETY: `offset + 64 <= total`, inside the range `Messages::check` bounds-checked;
        // 64-byte aligned (the batch start is, and strides are multiples of 64). Read as a
        // copy: the header is checked and used from the copy only.
        let h = unsafe { crate::batch::read_message_header(self.m.base.add(offset as usize)) };
        let size = u64::from(h.size);
        if size > MESSAGE_BYTES_MAX {
            return Err(BadBatch::TooLarge { index, size });
        }
        if offset + 64 + size > total {
            return Err(BadBatch::PayloadPastBatch {
                index,
                offset,
                size,
                total,
            });
        }
        if h.client_id != self.m.client_id {
            return Err(BadBatch::WrongClient {
                index,
                found: h.client_id,
                expected: self.m.client_id,
            });
        }
        if h.batch_seq != self.m.batch_seq {
            return Err(BadBatch::WrongBatchSeq {
                index,
                found: h.batch_seq,
                expected: self.m.batch_seq,
            });
        }
        self.index += 1;
        self.offset = offset + message_stride(size);
        Ok((index, offset, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::write_message;
    use crate::pool::coherence::Coherent;
    use crate::pool::geometry::PoolConfig;
    use crate::pool::tests::TempPool;
    use crate::pool::CreateOptions;

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

    /// Writes `payloads` as one batch at the start of segment 0; its descriptor.
    fn batch(pool: &Pool, payloads: &[&[u8]]) -> BatchDesc {
        let log_idx = pool.geometry().segment_offset(0);
        let total: u64 = payloads
            .iter()
            .map(|p| message_stride(p.len() as u64))
            .sum();
        let base = pool.data_ptr(log_idx, total).unwrap();
        let mut off = 0;
        for p in payloads {
            let h = MessageHeader {
                size: p.len() as u32,
                client_id: CLIENT,
                batch_seq: SEQ,
                ..MessageHeader::default()
            };
            // SAFETY: inside the range checked just above, 64-byte aligned; nothing else
            // touches this test's pool.
            off += unsafe { write_message(base.add(off as usize), &h, p) };
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
        let m = Messages::check(&pool, Coherent, &d).unwrap();
        m.stamp_total_orders(Coherent, 40).unwrap();
        let orders: Vec<u64> = m.iter().map(|r| r.unwrap().header.total_order).collect();
        assert_eq!(orders, vec![40, 41, 42]);
    }
}
