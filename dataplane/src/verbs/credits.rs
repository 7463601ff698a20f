//! The credit accounting of the verbs protocol, without I/O, so that tests drive it step by
//! step: the publisher's staging credits, the broker's check that immediates name slots in
//! order, and the ring of source slots the broker's feedback writes are sent from.

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

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
}
