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
        assert!(
            slots.len().is_power_of_two(),
            "ring slots must be a power of two"
        );
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
    NotTaken {
        index: u64,
        consumed: u64,
        head: u64,
    },
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

    pub fn capacity(&self) -> u64 {
        self.ring.capacity()
    }

    /// The consumer's watermark, re-read: every index below it is finished, so the log space
    /// of those batches may be reused.
    pub fn consumed(&mut self) -> u64 {
        self.consumed_seen = self.c.observe(self.ring.consumed);
        self.consumed_seen
    }

    /// The sequencer's decision on a published slot below the consumer's watermark, before
    /// the producer reuses the slot: `(outcome, delivery_index)`.
    pub fn decision(&self, index: u64) -> (u64, u64) {
        let (outcome, delivery, _) = self.decision_at(index);
        (outcome, delivery)
    }

    /// As [`decision`](Self::decision), with the batch's first total order (meaningful when
    /// ordered): `(outcome, delivery_index, total_order)`.
    pub fn decision_at(&self, index: u64) -> (u64, u64, u64) {
        debug_assert!(index < self.consumed_seen && index + self.ring.capacity() >= self.next);
        let slot = self.ring.slot(index);
        // SAFETY: line 1 of a live slot (64 bytes from its start).
        unsafe {
            self.c
                .invalidate_range((slot as *const BatchHeader).cast::<u8>().add(64), 64)
        };
        if self.c.observe(&slot.ordered) != index + 1 {
            return (0, u64::MAX, u64::MAX);
        }
        (
            slot.outcome.load(Relaxed),
            slot.delivery_index.load(Relaxed),
            slot.total_order.load(Relaxed),
        )
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
        unsafe {
            self.c
                .writeback_range((slot as *const BatchHeader).cast(), 64)
        };
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
    /// The watermark moved since it was last published.
    watermark_dirty: bool,
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
            watermark_dirty: false,
        }
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    pub fn capacity(&self) -> u64 {
        self.ring.capacity()
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
            Err(e) => Polled::Invalid {
                index,
                desc,
                reason: e.to_string(),
            },
        }))
    }

    /// Records the batch's place in the total order in the slot's sequencer line, fenced.
    pub fn set_order(&self, index: u64, total_order: u64) -> Result<(), RingError> {
        let ordered = crate::pool::layout::OUTCOME_ORDERED;
        self.decide_deferred(index, ordered, total_order, u64::MAX)?;
        self.c.fence();
        Ok(())
    }

    /// Records the sequencer's decision on a taken slot in its sequencer line: the outcome,
    /// the total order and delivery index (when ordered), and the stamp `ordered = index + 1`
    /// that says the line is valid for this lap. Written back without a fence: the line may
    /// not be visible to another host until the caller's next fence or publish, so a
    /// sequencer pays one fence per round instead of one per batch.
    pub fn decide_deferred(
        &self,
        index: u64,
        outcome: u64,
        total_order: u64,
        delivery_index: u64,
    ) -> Result<(), RingError> {
        self.check_taken(index)?;
        let slot = self.ring.slot(index);
        slot.total_order.store(total_order, Relaxed);
        slot.outcome.store(outcome, Relaxed);
        slot.delivery_index.store(delivery_index, Relaxed);
        // Every word shares the sequencer's line, so one write-back carries them together.
        slot.ordered
            .store(index + 1, crate::sync::Ordering::Release);
        // SAFETY: line 1 of a live slot (64 bytes from its start).
        unsafe {
            self.c
                .writeback_range((slot as *const BatchHeader).cast::<u8>().add(64), 64)
        };
        Ok(())
    }

    /// The order recorded in a taken slot by an earlier consumer (the slot's stamp matches
    /// this lap and its outcome is ordered), if any: `(total_order, delivery_index)` of a batch
    /// committed before a restart.
    pub fn committed_order(&self, index: u64) -> Option<(u64, u64)> {
        self.check_taken(index).ok()?;
        let slot = self.ring.slot(index);
        // SAFETY: line 1 of a live slot (64 bytes from its start).
        unsafe {
            self.c
                .invalidate_range((slot as *const BatchHeader).cast::<u8>().add(64), 64)
        };
        (self.c.observe(&slot.ordered) == index + 1
            && slot.outcome.load(Relaxed) == crate::pool::layout::OUTCOME_ORDERED)
            .then(|| {
                (
                    slot.total_order.load(Relaxed),
                    slot.delivery_index.load(Relaxed),
                )
            })
    }

    /// Finishes a taken slot; advances the watermark over the contiguous finished prefix and
    /// publishes it.
    pub fn finish(&mut self, index: u64) -> Result<(), RingError> {
        self.finish_deferred(index)?;
        self.publish_watermark();
        Ok(())
    }

    /// Publishes the watermark if it moved since the last publish.
    pub fn publish_watermark(&mut self) {
        if self.watermark_dirty {
            self.c.publish(self.ring.consumed, self.consumed);
            self.watermark_dirty = false;
        }
    }

    /// As [`finish`](Self::finish), but the watermark is only published by the next
    /// [`publish_watermark`](Self::publish_watermark): the producer sees the space later, and
    /// the caller can save its own state first.
    pub fn finish_deferred(&mut self, index: u64) -> Result<(), RingError> {
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
        self.watermark_dirty |= self.consumed != before;
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::pool::coherence::{Coherent, NonCoherent};
    use crate::pool::geometry::{PoolConfig, PoolGeometry};
    use crate::pool::layout::BATCH_HEADER_VERSION;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    /// Ring memory on the heap (the protocol does not care where its words live).
    pub(crate) struct HeapRing {
        slots: Vec<BatchHeader>,
        written: AtomicU64,
        consumed: AtomicU64,
    }

    impl HeapRing {
        pub fn new(n: usize) -> HeapRing {
            HeapRing {
                slots: (0..n).map(|_| BatchHeader::default()).collect(),
                written: AtomicU64::new(0),
                consumed: AtomicU64::new(0),
            }
        }
        pub fn ring(&self) -> RingRef<'_> {
            RingRef::new(&self.slots, &self.written, &self.consumed)
        }
    }

    fn limits() -> BatchLimits {
        let geo = PoolGeometry::compute(&PoolConfig {
            pool_bytes: 64 << 20,
            ..PoolConfig::default()
        })
        .unwrap();
        BatchLimits::new(geo, 1)
    }

    fn desc(seq: u64) -> BatchDesc {
        let g = limits().geometry;
        BatchDesc {
            batch_seq: seq,
            client_id: 42,
            num_msg: 2,
            broker_id: 1,
            total_size: 256,
            log_idx: g.segment_offset(seq % g.segment_count) + 64 * (seq % 100),
            start_logical_offset: seq * 2,
            version_flags: u64::from(BATCH_HEADER_VERSION),
        }
    }

    fn take<C: Coherence>(c: &mut RingConsumer<'_, C>) -> (u64, BatchDesc) {
        match c.poll().unwrap() {
            Some(Polled::Batch { index, desc }) => (index, desc),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    fn laps_in_order<C: Coherence>(coh: C) {
        let mem = HeapRing::new(4);
        let mut p = RingProducer::new(mem.ring(), coh);
        let mut c = RingConsumer::new(mem.ring(), coh, limits());
        let mut next_seq = 0;
        for lap in 0..10u64 {
            for i in 0..4 {
                assert_eq!(p.try_publish(&desc(lap * 4 + i)).unwrap(), lap * 4 + i);
            }
            assert_eq!(
                p.try_publish(&desc(99)),
                Err(RingError::Full { capacity: 4 })
            );
            for _ in 0..4 {
                let (index, d) = take(&mut c);
                assert_eq!(d, desc(next_seq));
                assert_eq!(index, next_seq);
                c.set_order(index, 1000 + index).unwrap();
                c.finish(index).unwrap();
                next_seq += 1;
            }
            // Every slot now holds this lap's ready value: none is new.
            assert_eq!(c.poll().unwrap(), None);
        }
        assert_eq!(mem.written.load(Relaxed), 40);
        assert_eq!(mem.consumed.load(Relaxed), 40);
        assert_eq!(mem.slots[3].total_order.load(Relaxed), 1039);
        assert_eq!(mem.slots[3].ordered.load(Relaxed), 40);
    }

    #[test]
    fn batches_arrive_once_in_order_over_many_laps_coherent() {
        laps_in_order(Coherent);
    }

    #[test]
    fn batches_arrive_once_in_order_over_many_laps_non_coherent() {
        laps_in_order(NonCoherent::detect());
    }

    #[test]
    fn watermark_covers_only_the_contiguous_finished_prefix() {
        let mem = HeapRing::new(4);
        let mut p = RingProducer::new(mem.ring(), Coherent);
        let mut c = RingConsumer::new(mem.ring(), Coherent, limits());
        for s in 0..4 {
            p.try_publish(&desc(s)).unwrap();
        }
        let taken: Vec<_> = (0..4).map(|_| take(&mut c).0).collect();
        // Finish 1, 2, 3 but hold 0: nothing may be reused.
        for i in &taken[1..] {
            c.finish(*i).unwrap();
        }
        assert_eq!(mem.consumed.load(Relaxed), 0);
        assert_eq!(
            p.try_publish(&desc(4)),
            Err(RingError::Full { capacity: 4 })
        );
        c.finish(0).unwrap();
        assert_eq!(mem.consumed.load(Relaxed), 4);
        assert_eq!(p.free_slots(), 4);
        assert_eq!(
            c.finish(0),
            Err(RingError::NotTaken {
                index: 0,
                consumed: 4,
                head: 4
            })
        );
        p.try_publish(&desc(4)).unwrap();
        let (i, _) = take(&mut c);
        c.finish(i).unwrap();
        assert_eq!(
            c.finish(i),
            Err(RingError::NotTaken {
                index: 4,
                consumed: 5,
                head: 5
            })
        );
        assert!(matches!(c.set_order(9, 0), Err(RingError::NotTaken { .. })));
    }

    #[test]
    fn finishing_twice_inside_the_window_is_an_error() {
        let mem = HeapRing::new(4);
        let mut p = RingProducer::new(mem.ring(), Coherent);
        let mut c = RingConsumer::new(mem.ring(), Coherent, limits());
        p.try_publish(&desc(0)).unwrap();
        p.try_publish(&desc(1)).unwrap();
        take(&mut c);
        take(&mut c);
        c.finish(1).unwrap();
        assert_eq!(c.finish(1), Err(RingError::AlreadyFinished { index: 1 }));
    }

    #[test]
    fn a_bad_slot_is_handed_up_with_its_reason_and_must_still_be_finished() {
        let mem = HeapRing::new(4);
        let mut p = RingProducer::new(mem.ring(), Coherent);
        let mut c = RingConsumer::new(mem.ring(), Coherent, limits());
        let g = limits().geometry;
        let bad = [
            (
                BatchDesc {
                    num_msg: 0,
                    ..desc(0)
                },
                "message count",
            ),
            (
                BatchDesc {
                    total_size: 64,
                    ..desc(0)
                },
                "total size",
            ),
            (
                BatchDesc {
                    log_idx: 0,
                    ..desc(0)
                },
                "outside the segment pool",
            ),
            (
                BatchDesc {
                    log_idx: g.segment_offset(1) - 64,
                    ..desc(0)
                },
                "crosses",
            ),
            (
                BatchDesc {
                    log_idx: u64::MAX - 63,
                    ..desc(0)
                },
                "overflows",
            ),
            (
                BatchDesc {
                    log_idx: desc(0).log_idx + 8,
                    ..desc(0)
                },
                "aligned",
            ),
            (
                BatchDesc {
                    broker_id: 2,
                    ..desc(0)
                },
                "broker id 2",
            ),
            (
                BatchDesc {
                    version_flags: 7,
                    ..desc(0)
                },
                "header version 7",
            ),
            (
                BatchDesc {
                    total_size: g.segment_bytes + 64,
                    ..desc(0)
                },
                "total size",
            ),
        ];
        for (d, needle) in bad {
            p.try_publish(&d).unwrap();
            match c.poll().unwrap() {
                Some(Polled::Invalid { index, reason, .. }) => {
                    assert!(reason.contains(needle), "{reason} lacks {needle}");
                    c.finish(index).unwrap();
                }
                other => panic!("{d:?} passed: {other:?}"),
            }
        }
    }

    #[test]
    fn an_overrun_slot_is_reported_not_taken() {
        let mem = HeapRing::new(4);
        let mut c = RingConsumer::new(mem.ring(), Coherent, limits());
        // A writer that ignores the protocol puts index 5's ready into slot 1... and slot 0.
        mem.slots[0].ready.store(5, Relaxed);
        assert_eq!(c.poll(), Err(RingError::Overrun { index: 0, ready: 5 }));
        assert_eq!(c.head(), 0);
    }

    #[test]
    fn producer_and_consumer_resume_after_a_restart() {
        let mem = HeapRing::new(8);
        {
            let mut p = RingProducer::new(mem.ring(), Coherent);
            for s in 0..5 {
                p.try_publish(&desc(s)).unwrap();
            }
        }
        // A crash after `ready` but before `written` for index 5.
        desc(5).store(&mem.slots[5]);
        mem.slots[5].ready.store(6, Relaxed);
        let p = RingProducer::new(mem.ring(), Coherent);
        assert_eq!(p.next_index(), 6);
        assert_eq!(mem.written.load(Relaxed), 6);
        {
            let mut c = RingConsumer::new(mem.ring(), Coherent, limits());
            let taken: Vec<_> = (0..4).map(|_| take(&mut c).0).collect();
            c.finish(taken[0]).unwrap();
            c.finish(taken[2]).unwrap();
        }
        // The new consumer starts at the watermark: 1, 2, 3, 4, 5 again (2 was finished but
        // not covered by the watermark, so it is seen again: at-least-once).
        let mut c = RingConsumer::new(mem.ring(), Coherent, limits());
        let seqs: Vec<_> = (0..5).map(|_| take(&mut c).1.batch_seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        assert_eq!(c.poll().unwrap(), None);
    }

    fn threads<C: Coherence>(coh: C) {
        const N: u64 = 200_000;
        let mem = HeapRing::new(16);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut p = RingProducer::new(mem.ring(), coh);
                let mut seq = 0;
                while seq < N {
                    match p.try_publish(&desc(seq)) {
                        Ok(_) => seq += 1,
                        Err(RingError::Full { .. }) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            let mut c = RingConsumer::new(mem.ring(), coh, limits());
            let mut held: Vec<u64> = Vec::new();
            let mut expect = 0;
            while expect < N || !held.is_empty() {
                match c.poll().unwrap() {
                    Some(Polled::Batch { index, desc: d }) => {
                        assert_eq!(d, desc(expect));
                        expect += 1;
                        held.push(index);
                        // Finish in a scrambled order, three at a time.
                        if held.len() == 3 {
                            for i in [held[2], held[0], held[1]] {
                                c.finish(i).unwrap();
                            }
                            held.clear();
                        }
                    }
                    Some(other) => panic!("{other:?}"),
                    None if expect == N => {
                        for i in held.drain(..) {
                            c.finish(i).unwrap();
                        }
                    }
                    None => std::thread::yield_now(),
                }
            }
        });
        assert_eq!(mem.consumed.load(Relaxed), N);
    }

    #[test]
    fn two_threads_pass_every_batch_once_in_order_coherent() {
        threads(Coherent);
    }

    #[test]
    fn two_threads_pass_every_batch_once_in_order_non_coherent() {
        threads(NonCoherent::detect());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Publish,
        Poll,
        Finish(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                Just(Op::Publish),
                Just(Op::Poll),
                (0usize..8).prop_map(Op::Finish)
            ],
            1..300,
        )
    }

    proptest! {
        /// Any interleaving of publish, poll and out-of-order finish agrees with a simple
        /// model: the ring is full exactly when `capacity` published batches are unfinished
        /// or not covered by the watermark, batches come out once and in order, and the
        /// watermark is the length of the contiguous finished prefix.
        #[test]
        fn ring_agrees_with_the_model(slots_log in 1u32..4, ops in ops()) {
            let cap = 1usize << slots_log;
            let mem = HeapRing::new(cap);
            let mut p = RingProducer::new(mem.ring(), Coherent);
            let mut c = RingConsumer::new(mem.ring(), Coherent, limits());
            let mut published = 0u64;
            let mut polled = 0u64;
            let mut taken: VecDeque<u64> = VecDeque::new();
            let mut finished = std::collections::BTreeSet::new();
            let mut watermark = 0u64;
            for op in ops {
                match op {
                    Op::Publish => {
                        let r = p.try_publish(&desc(published));
                        if published - watermark >= cap as u64 {
                            prop_assert_eq!(r, Err(RingError::Full { capacity: cap as u64 }));
                        } else {
                            prop_assert_eq!(r, Ok(published));
                            published += 1;
                        }
                    }
                    Op::Poll => match c.poll().unwrap() {
                        Some(Polled::Batch { index, desc: d }) => {
                            prop_assert_eq!(index, polled);
                            prop_assert_eq!(d, desc(polled));
                            taken.push_back(index);
                            polled += 1;
                        }
                        Some(other) => prop_assert!(false, "{:?}", other),
                        None => prop_assert!(polled == published || polled - watermark == cap as u64),
                    },
                    Op::Finish(k) => {
                        if !taken.is_empty() {
                            let i = taken.remove(k % taken.len()).unwrap();
                            c.finish(i).unwrap();
                            finished.insert(i);
                            while finished.remove(&watermark) {
                                watermark += 1;
                            }
                        }
                    }
                }
                prop_assert_eq!(c.consumed(), watermark);
                prop_assert_eq!(mem.consumed.load(Relaxed), watermark);
                prop_assert_eq!(mem.written.load(Relaxed), published);
            }
        }
    }
}
