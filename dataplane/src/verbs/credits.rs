//! The credit accounting of the verbs protocol, without I/O, so that tests drive it step by
//! step: the publisher's staging credits, the broker's check that immediates name slots in
//! order, the ring of source slots the broker's feedback writes are sent from, and both
//! sides of a remote subscriber's receive ring ([`RingWriter`], [`RingReader`]).

use std::collections::VecDeque;

/// The publisher's side of the staging buffer: descriptor `n` goes to slot `n % slots`, and
/// may be written only once the broker has taken descriptor `n - slots` (its `consumed`
/// count, fed back one-sided), so a slot is never overwritten before it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingCredits {
    slots: u32,
    staged: u64,
}

impl StagingCredits {
    pub fn new(slots: u32) -> StagingCredits {
        assert!(slots > 0, "a staging buffer has at least one slot");
        StagingCredits { slots, staged: 0 }
    }

    /// The slot of the next descriptor, if the broker's `consumed` count allows writing it.
    pub fn next_slot(&self, consumed: u64) -> Option<u32> {
        (self.staged - consumed.min(self.staged) < u64::from(self.slots))
            .then_some(self.slot_of_next())
    }

    /// The next descriptor was written.
    pub fn staged(&mut self) {
        self.staged += 1;
    }

    pub fn count(&self) -> u64 {
        self.staged
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The slot the next descriptor goes to, credit or not.
    pub fn slot_of_next(&self) -> u32 {
        (self.staged % u64::from(self.slots)) as u32
    }
}

/// The broker's side: immediates must name the staging slots in order (RC delivers in
/// order, so anything else is a publisher breaking the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImmediateOrder {
    slots: u32,
    received: u64,
}

/// An immediate that does not name the expected slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadImmediate {
    pub got: u32,
    pub expected: u32,
}

impl ImmediateOrder {
    pub fn new(slots: u32) -> ImmediateOrder {
        assert!(slots > 0, "a staging buffer has at least one slot");
        ImmediateOrder { slots, received: 0 }
    }

    /// Accepts the immediate of the next descriptor: its slot, or why not. A refused
    /// immediate does not advance the order.
    pub fn accept(&mut self, imm: u32) -> Result<u32, BadImmediate> {
        let expected = (self.received % u64::from(self.slots)) as u32;
        if imm != expected {
            return Err(BadImmediate { got: imm, expected });
        }
        self.received += 1;
        Ok(imm)
    }

    /// Descriptors announced so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// The source slots of one-sided writes: write `n` is sent from slot `n % slots`, and only
/// every `signal_every`-th write asks for a completion (which, on one RC QP, also completes
/// every earlier write). A slot is reused only when the write that last used it is known
/// complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRing {
    slots: u64,
    signal_every: u64,
    posted: u64,
    completed: u64,
}

/// Where the next write goes: its number (the work request id), its slot, and whether it
/// asks for a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextWrite {
    pub number: u64,
    pub slot: u64,
    pub signaled: bool,
}

impl SourceRing {
    pub fn new(slots: u64, signal_every: u64) -> SourceRing {
        assert!(
            signal_every > 0 && signal_every < slots,
            "a completion is asked for within every lap of the ring"
        );
        SourceRing {
            slots,
            signal_every,
            posted: 0,
            completed: 0,
        }
    }

    /// The next write, if its slot is free.
    pub fn next(&self) -> Option<NextWrite> {
        (self.posted - self.completed < self.slots).then_some(NextWrite {
            number: self.posted,
            slot: self.posted % self.slots,
            signaled: self.posted % self.signal_every == self.signal_every - 1,
        })
    }

    /// The write `next` returned was posted.
    pub fn posted(&mut self) {
        self.posted += 1;
    }

    /// A signaled write completed: it and every earlier write are done.
    pub fn completed(&mut self, number: u64) {
        self.completed = self.completed.max(number + 1);
    }

    pub fn in_flight(&self) -> u64 {
        self.posted - self.completed
    }
}

/// The broker's side of a verbs subscriber's receive ring. The stream's byte `p` goes to
/// ring offset `p % ring`, from the same offset of a local mirror (the registered source of
/// the writes). Bytes are written in chains, each ending in a WRITE_WITH_IMM that uses one
/// of the subscriber's posted receives. A mirror byte is rewritten only once the write that
/// sent it completed, a ring byte only once the subscriber's credit (its read position) has
/// passed it, and at most `chains_max` chains are neither completed nor credited (the
/// subscriber reposts a receive before it can read, so credited chains freed theirs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingWriter {
    ring: u64,
    chains_max: usize,
    written: u64,
    completed: u64,
    credited: u64,
    /// Where each chain neither completed nor credited ends.
    chains: VecDeque<u64>,
}

/// A credit that is not one: behind the last, or past what was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("read position {got}, but it was {credited} and {written} bytes were written")]
pub struct BadCredit {
    pub got: u64,
    pub credited: u64,
    pub written: u64,
}

impl RingWriter {
    pub fn new(ring: u64, chains_max: usize) -> RingWriter {
        assert!(ring > 0 && chains_max > 0, "a ring of bytes and receives");
        RingWriter {
            ring,
            chains_max,
            written: 0,
            completed: 0,
            credited: 0,
            chains: VecDeque::with_capacity(chains_max),
        }
    }

    /// Bytes that may be written now, as one chain (0: wait for a credit or a completion).
    pub fn room(&self) -> u64 {
        if self.chains.len() >= self.chains_max {
            return 0;
        }
        self.ring - (self.written - self.credited.min(self.completed))
    }

    /// Where the next byte of the stream goes (its ring offset is this mod the ring).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A chain of `n` bytes (at most [`room`](Self::room)) was posted.
    pub fn posted(&mut self, n: u64) {
        assert!(
            n > 0 && n <= self.room(),
            "{n} bytes, room for {}",
            self.room()
        );
        self.written += n;
        self.chains.push_back(self.written);
    }

    /// The chain ending at `end` completed (on one RC QP so did every one before it).
    pub fn completed(&mut self, end: u64) {
        self.completed = self.completed.max(end.min(self.written));
        self.retire();
    }

    /// The subscriber has read the stream up to `read`. Returns whether that moved.
    pub fn credit(&mut self, read: u64) -> Result<bool, BadCredit> {
        if read < self.credited || read > self.written {
            return Err(BadCredit {
                got: read,
                credited: self.credited,
                written: self.written,
            });
        }
        let moved = read > self.credited;
        self.credited = read;
        self.retire();
        Ok(moved)
    }

    /// Whether every chain posted has completed.
    pub fn all_completed(&self) -> bool {
        self.completed == self.written
    }

    fn retire(&mut self) {
        let done = self.credited.min(self.completed);
        while self.chains.front().is_some_and(|&end| end <= done) {
            self.chains.pop_front();
        }
    }
}

/// The subscriber's side of its receive ring: bytes arrive in chains (an immediate says how
/// many), are read in order, and the read position goes back to the broker as a credit, one
/// write in flight at a time (a later credit covers every earlier one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingReader {
    ring: u64,
    arrived: u64,
    read: u64,
    credited: u64,
    credit_in_flight: bool,
}

/// A chain that would overwrite bytes not yet read: the broker broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the broker wrote {bytes} bytes at stream position {arrived}, past the {ring}-byte ring from read position {read}")]
pub struct Overrun {
    pub bytes: u64,
    pub arrived: u64,
    pub read: u64,
    pub ring: u64,
}

impl RingReader {
    pub fn new(ring: u64) -> RingReader {
        RingReader {
            ring,
            arrived: 0,
            read: 0,
            credited: 0,
            credit_in_flight: false,
        }
    }

    /// A chain of `bytes` arrived (its immediate).
    pub fn arrived(&mut self, bytes: u64) -> Result<(), Overrun> {
        if self.arrived + bytes - self.read > self.ring {
            return Err(Overrun {
                bytes,
                arrived: self.arrived,
                read: self.read,
                ring: self.ring,
            });
        }
        self.arrived += bytes;
        Ok(())
    }

    /// Bytes arrived and not read, from stream position [`position`](Self::position).
    pub fn available(&self) -> u64 {
        self.arrived - self.read
    }

    /// The stream position of the next byte to read.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// `n` bytes (at most [`available`](Self::available)) were read.
    pub fn consumed(&mut self, n: u64) {
        assert!(n <= self.available());
        self.read += n;
    }

    /// The read position to send as a credit now, if it moved and none is in flight.
    pub fn credit_due(&self) -> Option<u64> {
        (!self.credit_in_flight && self.read > self.credited).then_some(self.read)
    }

    /// The credit `credit_due` gave was posted.
    pub fn credit_posted(&mut self, read: u64) {
        self.credited = read;
        self.credit_in_flight = true;
    }

    /// The credit write completed.
    pub fn credit_completed(&mut self) {
        self.credit_in_flight = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        /// The publisher writes its next descriptor, if it has a credit.
        Stage,
        /// The network delivers the oldest write in flight (RC: in order).
        Deliver,
        /// The broker takes the oldest announced descriptor into the pool.
        Take,
        /// The broker's latest `consumed` count reaches the publisher.
        Feedback,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Stage),
            3 => Just(Step::Deliver),
            2 => Just(Step::Take),
            1 => Just(Step::Feedback),
        ]
    }

    proptest! {
        /// Publisher and broker through a model of an RC connection, with the broker's
        /// consumed count reaching the publisher late: no staging slot is overwritten before
        /// the broker read it, every descriptor arrives once and in order.
        #[test]
        fn staging_slots_are_never_overwritten_before_they_are_read(
            slots in 1u32..6,
            steps in proptest::collection::vec(step(), 1..400),
        ) {
            let mut credits = StagingCredits::new(slots);
            let mut order = ImmediateOrder::new(slots);
            // The staging buffer: which descriptor each slot holds, and whether it was read.
            let mut buffer: Vec<Option<(u64, bool)>> = vec![None; slots as usize];
            let mut wire: VecDeque<(u32, u64)> = VecDeque::new();
            let mut announced: VecDeque<u32> = VecDeque::new();
            let (mut consumed, mut seen_consumed, mut taken) = (0u64, 0u64, Vec::new());
            for s in steps {
                match s {
                    Step::Stage => {
                        if let Some(slot) = credits.next_slot(seen_consumed) {
                            wire.push_back((slot, credits.count()));
                            credits.staged();
                        }
                    }
                    Step::Deliver => {
                        if let Some((slot, n)) = wire.pop_front() {
                            // The write lands: the slot must hold nothing unread.
                            let held = buffer[slot as usize];
                            prop_assert!(held.is_none_or(|(_, read)| read), "slot {slot} overwritten before it was read");
                            buffer[slot as usize] = Some((n, false));
                            let got = order.accept(slot);
                            prop_assert_eq!(got, Ok(slot));
                            announced.push_back(slot);
                        }
                    }
                    Step::Take => {
                        if let Some(slot) = announced.pop_front() {
                            let e = buffer[slot as usize].as_mut().expect("announced slots hold a descriptor");
                            e.1 = true;
                            taken.push(e.0);
                            consumed += 1;
                        }
                    }
                    Step::Feedback => seen_consumed = consumed,
                }
            }
            let want: Vec<u64> = (0..taken.len() as u64).collect();
            prop_assert_eq!(taken, want, "descriptors taken once each, in order");
        }

        /// Feedback source slots: a slot is handed out again only after the write that used
        /// it is complete, with completions arriving late and only for signaled writes.
        #[test]
        fn a_source_slot_is_reused_only_after_its_write_completed(
            slots in 2u64..10,
            every in 1u64..9,
            steps in proptest::collection::vec(0u8..3, 1..400),
        ) {
            prop_assume!(every < slots);
            let mut ring = SourceRing::new(slots, every);
            let mut in_flight: VecDeque<NextWrite> = VecDeque::new();
            let mut done: Vec<bool> = Vec::new();
            for s in steps {
                match s {
                    0 => {
                        if let Some(w) = ring.next() {
                            // The slot's previous user, if any, is complete.
                            if w.number >= slots {
                                prop_assert!(done[(w.number - slots) as usize], "slot {} reused while write {} may still read it", w.slot, w.number - slots);
                            }
                            ring.posted();
                            done.push(false);
                            in_flight.push_back(w);
                        }
                    }
                    1 => {
                        // The NIC finishes the oldest write; a signaled one reports it.
                        if let Some(w) = in_flight.pop_front() {
                            for d in done.iter_mut().take(w.number as usize + 1) {
                                *d = true;
                            }
                            if w.signaled {
                                ring.completed(w.number);
                            }
                        }
                    }
                    _ => {}
                }
                prop_assert!(ring.in_flight() <= slots);
            }
        }
    }

    #[test]
    fn a_bad_immediate_is_refused_and_the_order_kept() {
        let mut o = ImmediateOrder::new(4);
        assert_eq!(o.accept(0), Ok(0));
        assert_eq!(
            o.accept(3),
            Err(BadImmediate {
                got: 3,
                expected: 1
            })
        );
        assert_eq!(
            o.accept(1_000_000),
            Err(BadImmediate {
                got: 1_000_000,
                expected: 1
            })
        );
        assert_eq!(o.accept(1), Ok(1));
        assert_eq!(o.received(), 2);
    }

    proptest! {
        /// A broker streaming into a subscriber's ring through a model of an RC connection,
        /// completions and credits arriving late: no ring byte is overwritten before the
        /// subscriber read it, no mirror byte before the NIC sent it, no chain finds no
        /// posted receive, and the subscriber reads the stream's bytes once, in order.
        #[test]
        fn ring_bytes_are_never_overwritten_before_they_are_read_or_sent(
            ring in 1u64..64,
            receives in 1usize..5,
            steps in proptest::collection::vec((0u8..5, 1u64..80), 1..400),
        ) {
            let mut w = RingWriter::new(ring, receives);
            let mut r = RingReader::new(ring);
            // Chains in flight (start, bytes), delivered in order; completions in order.
            let mut wire: VecDeque<(u64, u64)> = VecDeque::new();
            let mut acks: VecDeque<u64> = VecDeque::new();
            // The subscriber's posted receives, and the credit on its way back.
            let mut posted_receives = receives;
            let mut credit_wire: Option<u64> = None;
            // Each ring byte: the stream position it holds, and whether it was read.
            let mut cells: Vec<Option<(u64, bool)>> = vec![None; ring as usize];
            let mut sent_from_mirror: Vec<bool> = Vec::new();
            let mut next_read = 0u64;
            for (s, n) in steps {
                match s {
                    0 => {
                        let n = n.min(w.room());
                        if n > 0 {
                            let start = w.written();
                            // The mirror bytes it reuses were sent already.
                            if start + n > ring {
                                for p in start.saturating_sub(ring)..start + n - ring {
                                    prop_assert!(sent_from_mirror[p as usize], "mirror byte of {p} reused before its write completed");
                                }
                            }
                            sent_from_mirror.extend(std::iter::repeat_n(false, n as usize));
                            w.posted(n);
                            wire.push_back((start, n));
                        }
                    }
                    1 => {
                        if let Some((start, n)) = wire.pop_front() {
                            prop_assert!(posted_receives > 0, "a chain found no posted receive");
                            posted_receives -= 1;
                            for p in start..start + n {
                                let cell = &mut cells[(p % ring) as usize];
                                prop_assert!(cell.is_none_or(|(_, read)| read), "ring byte {p} overwritten before it was read");
                                *cell = Some((p, false));
                                sent_from_mirror[p as usize] = true;
                            }
                            prop_assert_eq!(r.arrived(n), Ok(()));
                            // The subscriber reposts the receive when it takes the completion.
                            posted_receives += 1;
                            acks.push_back(start + n);
                        }
                    }
                    2 => {
                        if let Some(end) = acks.pop_front() {
                            w.completed(end);
                        }
                    }
                    3 => {
                        let k = n.min(r.available());
                        for _ in 0..k {
                            let cell = cells[(next_read % ring) as usize].as_mut().expect("arrived");
                            prop_assert_eq!(cell.0, next_read, "bytes read once, in order");
                            cell.1 = true;
                            next_read += 1;
                        }
                        r.consumed(k);
                        if let Some(c) = r.credit_due() {
                            r.credit_posted(c);
                            credit_wire = Some(c);
                        }
                    }
                    _ => {
                        if let Some(c) = credit_wire.take() {
                            prop_assert_eq!(w.credit(c).map(|_| ()), Ok(()));
                            r.credit_completed();
                        }
                    }
                }
            }
            prop_assert!(r.position() == next_read);
        }
    }

    #[test]
    fn a_credit_backwards_or_past_the_written_end_is_refused() {
        let mut w = RingWriter::new(100, 4);
        w.posted(60);
        assert_eq!(w.credit(40), Ok(true));
        assert_eq!(w.credit(40), Ok(false));
        assert!(w.credit(39).is_err());
        assert_eq!(
            w.credit(61),
            Err(BadCredit {
                got: 61,
                credited: 40,
                written: 60
            })
        );
        // Not completed: the mirror holds the room back even though the ring has it.
        assert_eq!(w.room(), 40);
        w.completed(60);
        assert_eq!(w.room(), 80);
        let mut r = RingReader::new(10);
        assert!(r.arrived(11).is_err());
        assert_eq!(r.arrived(10), Ok(()));
        assert!(r.arrived(1).is_err());
    }
}
