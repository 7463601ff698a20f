//! The batch ring of one (topic, broker): single producer (the broker that publishes landed
//! batches), single consumer (the sequencer).
//!
//! Protocol, with absolute indices `i = 0, 1, 2, ...` and slot `i % N`:
//!
//! - **Producer** may write index `i` only when `i < consumed + N`, where `consumed` is the
//!   consumer's watermark; otherwise the ring is full and it waits (never overwrites). It
//!   stores the producer line, writes it back, then publishes `ready = i + 1` last, then
//!   `written = i + 1`.
//! - **Consumer** takes index `head` when the slot's `ready == head + 1`. A slot still holding
//!   an earlier lap's `ready` (`head + 1 - N`) is not new; any other value is a protocol
//!   violation and is reported. Every field is checked ([`BatchLimits`]) before use; a bad
//!   slot is handed up as [`Polled::Invalid`], never skipped silently.
//! - The consumer may finish taken slots in any order (the sequencer holds out-of-order
//!   batches), but the watermark `consumed` advances only over the **contiguous** finished
//!   prefix. A slot is therefore never reused while a batch in it is unfinished (the
//!   original's "last-percent ack stall" came from skipping such a slot).
//! - Restart: a producer resumes after the last slot that is `ready` (so a crash between
//!   `ready` and `written` is harmless); a consumer resumes at `consumed` and sees again the
//!   slots it had taken but not finished (at-least-once; the sequencer drops duplicates).

use crate::batch::{BatchDesc, BatchLimits};
use crate::pool::coherence::Coherence;
use crate::pool::layout::BatchHeader;
use crate::sync::AtomicU64;
use crate::sync::Ordering::Relaxed;

/// The memory of one ring: its slots and the two watermarks (in the TInode).
#[derive(Clone, Copy, Debug)]
pub struct RingRef<'a> {
    slots: &'a [BatchHeader],
    /// Producer count (`BrokerRegion::written`).
    written: &'a AtomicU64,
    /// Consumer watermark (`SequencerRegion::ring_consumed`).
    consumed: &'a AtomicU64,
}

impl<'a> RingRef<'a> {
    /// A ring over `slots` (a power of two of them) and its two watermark words.
    pub fn new(slots: &'a [BatchHeader], written: &'a AtomicU64, consumed: &'a AtomicU64) -> Self {
        assert!(slots.len().is_power_of_two(), "ring slots must be a power of two");
        RingRef {
            slots,
            written,
            consumed,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    fn slot(&self, index: u64) -> &'a BatchHeader {
        &self.slots[(index & (self.capacity() - 1)) as usize]
    }
}

/// Why a ring operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring is full ({capacity} slots not yet consumed)")]
    Full { capacity: u64 },
    #[error("slot for index {index} holds ready={ready}: the producer overran the consumer")]
    Overrun { index: u64, ready: u64 },
    #[error("index {index} was not taken from the ring (taken range {consumed}..{head})")]
    NotTaken { index: u64, consumed: u64, head: u64 },
    #[error("index {index} was already finished")]
    AlreadyFinished { index: u64 },
}

/// The producer end.
#[derive(Debug)]
pub struct RingProducer<'a, C: Coherence> {
    ring: RingRef<'a>,
    c: C,
    next: u64,
    consumed_seen: u64,
}

impl<'a, C: Coherence> RingProducer<'a, C> {
    /// Attaches as the ring's producer, resuming after the last published slot.
    pub fn new(ring: RingRef<'a>, c: C) -> Self {
        let mut next = c.observe(ring.written);
        while c.observe(&ring.slot(next).ready) == next + 1 {
            next += 1;
        }
        if next != ring.written.load(Relaxed) {
            c.publish(ring.written, next);
        }
        let consumed_seen = c.observe(ring.consumed);
        RingProducer {
            ring,
            c,
            next,
            consumed_seen,
        }
    }

    /// Absolute index the next publish gets.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// Slots free for publishing, re-reading the consumer's watermark.
    pub fn free_slots(&mut self) -> u64 {
        self.consumed_seen = self.c.observe(self.ring.consumed);
        self.ring.capacity() - (self.next - self.consumed_seen)
    }

    /// Publishes one batch, or reports that the ring is full (the caller waits and retries).
    pub fn try_publish(&mut self, desc: &BatchDesc) -> Result<u64, RingError> {
        let cap = self.ring.capacity();
        if self.next - self.consumed_seen >= cap {
            self.consumed_seen = self.c.observe(self.ring.consumed);
            if self.next - self.consumed_seen >= cap {
                return Err(RingError::Full { capacity: cap });
            }
        }
        let index = self.next;
        let slot = self.ring.slot(index);
        desc.store(slot);
        // Write back the producer line only: line 1 belongs to the sequencer.
        // SAFETY: a slot is 128 bytes of live pool memory; its first 64 are the producer line.
        unsafe { self.c.writeback_range((slot as *const BatchHeader).cast(), 64) };
        self.c.publish(&slot.ready, index + 1);
        self.c.publish(self.ring.written, index + 1);
        self.next = index + 1;
        Ok(index)
    }
}

/// What the consumer found at the head of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Polled {
    /// A batch that passed every check.
    Batch { index: u64, desc: BatchDesc },
    /// A slot whose fields failed a check: it must still be finished, and reported.
    Invalid {
        index: u64,
        desc: BatchDesc,
        reason: String,
    },
}

impl Polled {
    pub fn index(&self) -> u64 {
        match self {
            Polled::Batch { index, .. } | Polled::Invalid { index, .. } => *index,
        }
    }
}

/// The consumer end.
#[derive(Debug)]
pub struct RingConsumer<'a, C: Coherence> {
    ring: RingRef<'a>,
    c: C,
    limits: BatchLimits,
    /// Next index to take.
    head: u64,
    /// Watermark: every index below it is finished.
    consumed: u64,
    /// `finished[i % N]` for taken indices in `consumed..head`.
    finished: Box<[bool]>,
}

impl<'a, C: Coherence> RingConsumer<'a, C> {
    /// Attaches as the ring's consumer, resuming at the published watermark.
    pub fn new(ring: RingRef<'a>, c: C, limits: BatchLimits) -> Self {
        let consumed = c.observe(ring.consumed);
        RingConsumer {
            ring,
            c,
            limits,
            head: consumed,
            consumed,
            finished: vec![false; ring.capacity() as usize].into_boxed_slice(),
        }
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Taken and not yet covered by the watermark.
    pub fn in_flight(&self) -> u64 {
        self.head - self.consumed
    }

    /// Takes the next slot if the producer has published it.
    pub fn poll(&mut self) -> Result<Option<Polled>, RingError> {
        if self.head - self.consumed >= self.ring.capacity() {
            // Every slot is taken and unfinished: nothing new can be there.
            return Ok(None);
        }
        let index = self.head;
        let slot = self.ring.slot(index);
        let ready = self.c.observe(&slot.ready);
        if ready != index + 1 {
            // Not yet written: never (0) or last written one lap ago.
            let not_yet = ready == 0 || ready + self.ring.capacity() == index + 1;
            return if not_yet {
                Ok(None)
            } else {
                Err(RingError::Overrun { index, ready })
            };
        }
        let desc = BatchDesc::load(slot);
        self.head = index + 1;
        Ok(Some(match self.limits.check(&desc) {
            Ok(()) => Polled::Batch { index, desc },
            Err(reason) => Polled::Invalid {
                index,
                desc,
                reason,
            },
        }))
    }

    /// Records the batch's place in the total order in the slot's sequencer line.
    pub fn set_order(&self, index: u64, total_order: u64) -> Result<(), RingError> {
        self.check_taken(index)?;
        let slot = self.ring.slot(index);
        slot.total_order.store(total_order, Relaxed);
        self.c.publish(&slot.ordered, index + 1);
        Ok(())
    }

    /// Finishes a taken slot; advances the watermark over the contiguous finished prefix.
    pub fn finish(&mut self, index: u64) -> Result<(), RingError> {
        self.check_taken(index)?;
        let mask = self.ring.capacity() - 1;
        let f = &mut self.finished[(index & mask) as usize];
        if *f {
            return Err(RingError::AlreadyFinished { index });
        }
        *f = true;
        let before = self.consumed;
        while self.consumed < self.head && self.finished[(self.consumed & mask) as usize] {
            self.finished[(self.consumed & mask) as usize] = false;
            self.consumed += 1;
        }
        if self.consumed != before {
            self.c.publish(self.ring.consumed, self.consumed);
        }
        Ok(())
    }

    fn check_taken(&self, index: u64) -> Result<(), RingError> {
        if index < self.consumed || index >= self.head {
            return Err(RingError::NotTaken {
                index,
                consumed: self.consumed,
                head: self.head,
            });
        }
        Ok(())
    }
}

#[cfg(not(loom))]
impl crate::pool::Pool {
    /// The ring of (topic slot, broker).
    pub fn ring(&self, topic: u32, broker: u32) -> crate::error::PoolResult<RingRef<'_>> {
        let slots = self.ring_slots(topic, broker)?;
        let entry = &self.tinode(topic).brokers[broker as usize];
        Ok(RingRef::new(
            slots,
            &entry.broker.written,
            &entry.sequencer.ring_consumed,
        ))
    }
}
