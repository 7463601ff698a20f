//! The broker's decisions about one publisher session, without I/O: what the caller read from
//! the pool goes in, what to do comes out. [`super::Broker`] reads the session's words,
//! asks these functions, and writes the answer back; unit tests drive them directly.
//!
//! - [`lifecycle`]: open (accept or refuse), leave alone, or close a session slot.
//! - [`admit`]: whether a topic takes a new session.
//! - [`SessionCore::take_grants`]: the credit check on `grants_taken` and how many grants to
//!   issue, [`grant_bytes`] how large.
//! - [`SessionCore::decide`]: what the sequencer's decision on one batch means for the
//!   session: an ack (per the topic's ACK level), a rejection with its reason, nothing, or
//!   (ACK 2) a wait for durability: [`durable_wait`] says what to wait for, [`is_durable`]
//!   whether the replicas' progress words cover it, and [`SessionCore::durable`] acks it.

use crate::pool::layout::{OUTCOME_DUPLICATE, OUTCOME_FENCED, OUTCOME_ORDERED, OUTCOME_TABLE_FULL};
use crate::pool::topics::TopicInfo;
use crate::replication::placement::Placement;
use crate::session::{SessionError, STATE_CLOSED, STATE_OPEN};

/// Grants issued to a session and not yet taken (its credits beyond the grant it fills):
/// enough to never wait on a fast path, few enough that idle sessions do not hoard the pool.
pub const GRANTS_AHEAD: u64 = 2;
/// Doublings of a session's grant size (the smallest grant `<< 10`).
pub const GRANT_DOUBLINGS_MAX: u64 = 10;

/// What the broker read of a session slot this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotView {
    /// `state >> 8`: the publisher's generation of the slot.
    pub generation: u64,
    /// `state & 0xff`.
    pub state: u64,
    /// `accepted >> 8`: the generation the broker last answered.
    pub answered: u64,
    /// Whether the publisher's process runs, if it was looked up this round.
    pub holder_alive: Option<bool>,
}

/// What to do with a session slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Nothing,
    /// A new generation asks to be opened: admit or refuse it.
    Open {
        generation: u64,
    },
    /// The open session ended (closed by its publisher, its slot claimed again, or its
    /// process gone): drain it and release the slot.
    Close,
}

/// See [`Lifecycle`]. `open` is the generation the broker serves in this slot, if any.
pub fn lifecycle(open: Option<u64>, v: SlotView) -> Lifecycle {
    match open {
        Some(gen)
            if v.generation != gen || v.state == STATE_CLOSED || v.holder_alive == Some(false) =>
        {
            Lifecycle::Close
        }
        None if v.state == STATE_OPEN && v.answered != v.generation => Lifecycle::Open {
            generation: v.generation,
        },
        _ => Lifecycle::Nothing,
    }
}

/// Whether a session may open on a topic (`None`: no topic in the slot it names).
pub fn admit(topic: Option<&TopicInfo>) -> Result<(), SessionError> {
    match topic {
        None => Err(SessionError::UnknownTopic),
        Some(_) => Ok(()),
    }
}

/// Bytes of grant number `issued` of a session: the smallest grant doubled per grant issued,
/// at most `GRANT_DOUBLINGS_MAX` times and at most a segment, so the space a session holds
/// scales with what it writes.
pub fn grant_bytes(min: u64, issued: u64, segment_bytes: u64) -> u64 {
    (min << issued.min(GRANT_DOUBLINGS_MAX)).min(segment_bytes)
}

/// How a topic acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckPolicy {
    pub order: u8,
    pub ack: u8,
}

impl AckPolicy {
    /// Whether an ordered batch is acked through the pool: ACK 0 never is, and ORDER 0 ACK 1
    /// is acked when it lands (by the broker at once, not on the sequencer's decision).
    pub fn acks_on_decision(self) -> bool {
        self.ack > 0 && !(self.order == 0 && self.ack == 1)
    }
}

/// What a decision means for the session that sent the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Nothing,
    /// Publish the session's new cumulative counts.
    Ack {
        messages: u64,
        batches: u64,
    },
    /// Publish the rejected count and this error.
    Reject {
        rejected: u64,
        error: SessionError,
    },
    /// ACK 2: ordered; ack once durable on its replica set ([`durable_wait`], then
    /// [`SessionCore::durable`]).
    AwaitDurable,
}

/// What an ACK 2 batch waits for: `durable_delivery > below` on every broker of its replica
/// set (the set of its total order `total_order`, by the topic's placement table), or, for a
/// duplicate (whose first copy may have landed on another broker, so in another replica set),
/// on every broker slot not excluded from the sets now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurableWait {
    pub below: u64,
    /// The batch's first total order; `None` for a duplicate.
    pub total_order: Option<u64>,
}

/// The wait for a batch decided `outcome` with delivery index `delivery` and first total
/// order `total_order`; `next_delivery` is the topic's next delivery index as read after the
/// decision (a duplicate's first copy lies below it).
pub fn durable_wait(
    outcome: u64,
    delivery: u64,
    total_order: u64,
    next_delivery: u64,
) -> DurableWait {
    if outcome == OUTCOME_DUPLICATE {
        DurableWait {
            below: next_delivery.saturating_sub(1),
            total_order: None,
        }
    } else {
        DurableWait {
            below: delivery,
            total_order: Some(total_order),
        }
    }
}

/// Whether `w` is met for a batch that landed on `primary` of a topic with replication
/// factor `rf` over `slots` broker slots, given the topic's placement table and each slot's
/// `durable_delivery`.
///
/// Waiting on every slot not excluded now is enough for any batch below `w.below`: a slot
/// excluded now was excluded from its `durable_total_order`, below which it made every batch
/// of its sets durable already.
pub fn is_durable(
    w: DurableWait,
    primary: u32,
    rf: u8,
    slots: u32,
    placement: &Placement,
    progress: impl FnMut(u32) -> u64,
) -> bool {
    use crate::replication::durable_on;
    match w.total_order {
        None => durable_on(
            w.below,
            (0..slots).filter(|s| !placement.excluded_now(*s)),
            progress,
        ),
        Some(t) => durable_on(
            w.below,
            placement.replica_set(primary, rf, slots, t),
            progress,
        ),
    }
}

/// The broker's counts for one open session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCore {
    /// Grants issued.
    pub issued: u64,
    /// The publisher's `grants_taken` as last read: never past `issued`, never going back.
    pub taken: u64,
    pub acked_messages: u64,
    pub acked_batches: u64,
    pub rejected: u64,
}

impl SessionCore {
    /// The publisher says it has taken `taken` grants: `Ok(n)`, the grants to issue now to
    /// keep `GRANTS_AHEAD` ahead of it, or `Err` with why that count breaks the protocol (it
    /// can only grow, and never past what was issued).
    pub fn take_grants(&mut self, taken: u64) -> Result<u64, String> {
        if taken > self.issued || taken < self.taken {
            return Err(format!(
                "grants_taken {taken} (the broker issued {} grants; the publisher had taken {})",
                self.issued, self.taken
            ));
        }
        self.taken = taken;
        Ok(GRANTS_AHEAD - (self.issued - taken).min(GRANTS_AHEAD))
    }

    /// A grant was issued.
    pub fn issued_one(&mut self) {
        self.issued += 1;
    }

    /// A batch of `num_msg` messages of this session landed in its topic's ring: ORDER 0
    /// ACK 1 acknowledges it now (the sequencer's decision adds nothing to it).
    pub fn landed(&mut self, num_msg: u32, policy: AckPolicy) -> Effect {
        if policy.ack == 1 && policy.order == 0 {
            self.ack(num_msg)
        } else {
            Effect::Nothing
        }
    }

    /// The broker rejected a batch of this session (it failed a check).
    pub fn reject(&mut self, error: SessionError) -> Effect {
        self.rejected += 1;
        Effect::Reject {
            rejected: self.rejected,
            error,
        }
    }

    /// The sequencer decided `outcome` on a batch of `num_msg` messages of this session.
    pub fn decide(&mut self, outcome: u64, num_msg: u32, policy: AckPolicy) -> Effect {
        match outcome {
            OUTCOME_ORDERED | OUTCOME_DUPLICATE if policy.ack == 2 => Effect::AwaitDurable,
            OUTCOME_ORDERED | OUTCOME_DUPLICATE if policy.acks_on_decision() => self.ack(num_msg),
            OUTCOME_ORDERED | OUTCOME_DUPLICATE => Effect::Nothing,
            OUTCOME_FENCED => self.reject(SessionError::Fenced),
            OUTCOME_TABLE_FULL => self.reject(SessionError::ClientTableFull),
            _ => self.reject(SessionError::RejectedBySequencer),
        }
    }

    /// An ACK 2 batch of `num_msg` messages is durable on its replica set: ack it.
    pub fn durable(&mut self, num_msg: u32) -> Effect {
        self.ack(num_msg)
    }

    fn ack(&mut self, num_msg: u32) -> Effect {
        self.acked_messages += u64::from(num_msg);
        self.acked_batches += 1;
        Effect::Ack {
            messages: self.acked_messages,
            batches: self.acked_batches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::layout::OUTCOME_REJECTED;
    use crate::session::STATE_FREE;

    fn view(generation: u64, state: u64, answered: u64) -> SlotView {
        SlotView {
            generation,
            state,
            answered,
            holder_alive: None,
        }
    }

    #[test]
    fn a_slot_opens_once_per_generation_and_closes_when_its_publisher_leaves() {
        assert_eq!(
            lifecycle(None, view(3, STATE_OPEN, 2)),
            Lifecycle::Open { generation: 3 }
        );
        // Already answered (accepted or refused): nothing until a new generation.
        assert_eq!(lifecycle(None, view(3, STATE_OPEN, 3)), Lifecycle::Nothing);
        assert_eq!(lifecycle(None, view(3, STATE_FREE, 2)), Lifecycle::Nothing);
        assert_eq!(
            lifecycle(Some(3), view(3, STATE_OPEN, 3)),
            Lifecycle::Nothing
        );
        assert_eq!(
            lifecycle(Some(3), view(3, STATE_CLOSED, 3)),
            Lifecycle::Close
        );
        // Claimed again by another publisher before the broker saw the close.
        assert_eq!(lifecycle(Some(3), view(4, STATE_OPEN, 3)), Lifecycle::Close);
        let gone = SlotView {
            holder_alive: Some(false),
            ..view(3, STATE_OPEN, 3)
        };
        assert_eq!(lifecycle(Some(3), gone), Lifecycle::Close);
    }

    #[test]
    fn credits_keep_two_grants_ahead_and_a_count_that_goes_back_or_ahead_is_a_violation() {
        let mut s = SessionCore::default();
        assert_eq!(s.take_grants(0), Ok(2));
        s.issued_one();
        s.issued_one();
        assert_eq!(s.take_grants(0), Ok(0));
        assert_eq!(s.take_grants(1), Ok(1));
        s.issued_one();
        assert!(s.take_grants(4).unwrap_err().contains("issued 3"));
        assert!(s.take_grants(0).unwrap_err().contains("had taken 1"));
        assert_eq!(s.take_grants(3), Ok(2));
    }

    #[test]
    fn grants_double_from_the_smallest_up_to_a_segment() {
        assert_eq!(grant_bytes(64 << 10, 0, 16 << 20), 64 << 10);
        assert_eq!(grant_bytes(64 << 10, 3, 16 << 20), 512 << 10);
        assert_eq!(grant_bytes(64 << 10, 9, 16 << 20), 16 << 20);
        assert_eq!(grant_bytes(64 << 10, 60, u64::MAX), 64 << 20);
    }

    #[test]
    fn decisions_ack_per_the_ack_level_and_rejections_carry_their_reason() {
        let acks = AckPolicy { order: 5, ack: 1 };
        let mut s = SessionCore::default();
        assert_eq!(
            s.decide(OUTCOME_ORDERED, 10, acks),
            Effect::Ack {
                messages: 10,
                batches: 1
            }
        );
        // A duplicate was ordered before: acked again, so a resend completes.
        assert_eq!(
            s.decide(OUTCOME_DUPLICATE, 5, acks),
            Effect::Ack {
                messages: 15,
                batches: 2
            }
        );
        assert_eq!(
            s.decide(OUTCOME_FENCED, 5, acks),
            Effect::Reject {
                rejected: 1,
                error: SessionError::Fenced
            }
        );
        assert_eq!(
            s.decide(OUTCOME_TABLE_FULL, 5, acks),
            Effect::Reject {
                rejected: 2,
                error: SessionError::ClientTableFull
            }
        );
        assert_eq!(
            s.decide(OUTCOME_REJECTED, 5, acks),
            Effect::Reject {
                rejected: 3,
                error: SessionError::RejectedBySequencer
            }
        );
        for quiet in [
            AckPolicy { order: 5, ack: 0 },
            AckPolicy { order: 0, ack: 1 },
        ] {
            assert_eq!(s.decide(OUTCOME_ORDERED, 1, quiet), Effect::Nothing);
        }
        assert_eq!((s.acked_messages, s.acked_batches), (15, 2));
        // ORDER 0 ACK 1 acks on landing instead; nothing else does.
        assert_eq!(s.landed(4, acks), Effect::Nothing);
        assert_eq!(
            s.landed(4, AckPolicy { order: 0, ack: 1 }),
            Effect::Ack {
                messages: 19,
                batches: 3
            }
        );
        assert_eq!(
            s.reject(SessionError::BadDescriptor),
            Effect::Reject {
                rejected: 4,
                error: SessionError::BadDescriptor
            }
        );
    }

    #[test]
    fn ack_2_waits_until_every_replica_of_the_batch_has_synced_past_it() {
        let policy = AckPolicy { order: 5, ack: 2 };
        let mut s = SessionCore::default();
        assert_eq!(s.decide(OUTCOME_ORDERED, 4, policy), Effect::AwaitDurable);
        // Fenced and rejected batches are reported at once, as at ACK 1.
        assert_eq!(
            s.decide(OUTCOME_FENCED, 4, policy),
            Effect::Reject {
                rejected: 1,
                error: SessionError::Fenced
            }
        );
        // Batch at delivery index 7 (total order 500) on broker 2 of 3 slots, RF 2: replicas 2
        // and 0.
        let none = Placement::none();
        let w = durable_wait(OUTCOME_ORDERED, 7, 500, 9);
        assert_eq!(
            w,
            DurableWait {
                below: 7,
                total_order: Some(500)
            }
        );
        let mut progress = [7u64, 0, 8];
        assert!(!is_durable(w, 2, 2, 3, &none, |r| progress[r as usize]));
        progress[0] = 8;
        // Broker 1 is not in the set: its progress does not matter.
        assert!(is_durable(w, 2, 2, 3, &none, |r| progress[r as usize]));
        assert_eq!(
            s.durable(4),
            Effect::Ack {
                messages: 4,
                batches: 1
            }
        );
        // A duplicate waits for every slot past the delivery index before its decision.
        let d = durable_wait(OUTCOME_DUPLICATE, 0, 0, 9);
        assert_eq!(
            d,
            DurableWait {
                below: 8,
                total_order: None
            }
        );
        assert!(!is_durable(d, 2, 2, 3, &none, |r| progress[r as usize]));
        let all = [9u64, 9, 9];
        assert!(is_durable(d, 2, 2, 3, &none, |r| all[r as usize]));
        // Slot 0 excluded from total order 400 on: the set of total order 500 is 2 and 1, and
        // a duplicate no longer waits for slot 0.
        let p = none.with_excluded(0, 400).unwrap();
        let stuck = [0u64, 8, 8];
        assert!(is_durable(w, 2, 2, 3, &p, |r| stuck[r as usize]));
        assert!(!is_durable(w, 2, 2, 3, &none, |r| stuck[r as usize]));
        let stuck = [0u64, 9, 9];
        assert!(is_durable(d, 2, 2, 3, &p, |r| stuck[r as usize]));
        assert_eq!(s.decide(OUTCOME_DUPLICATE, 1, policy), Effect::AwaitDurable);
    }

    #[test]
    fn ack_2_topics_admit_sessions() {
        use crate::pool::topics::TopicConfig;
        let t = TopicInfo {
            slot: 0,
            name: "t".into(),
            config: TopicConfig {
                order: 5,
                ack: 2,
                replication_factor: 2,
                batch_bytes: 1 << 20,
            },
            generation: 1,
            created_epoch: 0,
        };
        assert_eq!(admit(Some(&t)), Ok(()));
        assert_eq!(admit(None), Err(SessionError::UnknownTopic));
    }
}
