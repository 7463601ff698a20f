//! The shm transport's session between a publisher and a broker, in the pool (see
//! [`Session`]): no socket on the data path.
//!
//! Life of a session (`state` is the publisher's word, `accepted` the broker's):
//!
//! 1. The publisher claims a free slot (compare-and-swap of `state` to `gen | OPENING`),
//!    fills in its client id, topic and process (pid and start time), and publishes `gen | OPEN`.
//! 2. The broker resets its side (counters, grant ring, the submission ring's readiness
//!    words) and publishes `accepted = gen | ACCEPTED`, or `gen | REFUSED` with an error code.
//! 3. The broker grants log space (whole segments) into the grant ring, up to
//!    `SESSION_GRANT_SLOTS` ahead of what the publisher has taken: the publisher's credits.
//!    The publisher writes batches only inside grants it took, in order, and submits each
//!    batch's descriptor into the submission ring (the batch ring protocol).
//! 4. The broker checks each submission (the ring's descriptor checks, plus: inside a grant of
//!    this session, after the previous batch of that grant, the session's client id, then
//!    every message header through [`crate::messages::Messages`]) and publishes it into the
//!    topic's batch ring; a bad one is counted in `rejected_batches` with its reason in
//!    `error`, and nothing else is touched. A word the publisher owns that breaks the protocol
//!    (a readiness word that is neither empty nor the next index, `submitted` past what the
//!    ring holds, `grants_taken` past what was issued or going back) ends that session alone
//!    ([`SessionError::ProtocolViolation`], logged with the broker slot, session and client).
//! 5. Acks: once the sequencer has decided a batch, the broker adds its messages to
//!    `acked_messages` (ordered, or a resend of an ordered batch) or reports the error.
//! 6. The publisher publishes `gen | CLOSED`; the broker reclaims what was never used and
//!    publishes `gen | RELEASED`. A publisher process that vanishes is treated as closed.

use crate::pool::layout::{BatchHeader, Session, SESSIONS_PER_BROKER, SESSION_GRANT_SLOTS};
use crate::ring::RingRef;

pub const STATE_FREE: u64 = 0;
pub const STATE_OPEN: u64 = 1;
pub const STATE_CLOSED: u64 = 2;
pub const STATE_OPENING: u64 = 3;

pub const ACCEPTED: u64 = 1;
pub const RELEASED: u64 = 2;
pub const REFUSED: u64 = 3;

/// Why the broker refused a session or rejected a batch (`error & 0xff`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionError {
    None = 0,
    UnknownTopic = 1,
    /// The topic asks for ACK 2, which needs replication.
    Ack2Unsupported = 2,
    /// A descriptor failed the ring's checks (sizes, counts, alignment, bounds).
    BadDescriptor = 3,
    /// The batch lies outside the session's grants, or overlaps an earlier batch.
    OutsideGrant = 4,
    /// The batch names another client than the session's.
    WrongClient = 5,
    /// The sequencer fenced this client (a gap that never filled).
    Fenced = 6,
    /// The sequencer rejected the batch.
    RejectedBySequencer = 7,
    // 8 and 9 are the verbs transport's own codes (`verbs::frontend::ERROR_*`).
    /// The topic's sequencer client table is full of publishers it may not forget yet.
    ClientTableFull = 10,
    /// A batch's message headers failed their checks (`messages::BadBatch`).
    BadMessage = 11,
    /// A word the publisher owns broke the session protocol (a submission ring readiness
    /// word, the submitted or grants-taken counter): the broker ended the session.
    ProtocolViolation = 12,
}

impl SessionError {
    pub fn from_code(code: u64) -> SessionError {
        match code & 0xff {
            1 => SessionError::UnknownTopic,
            2 => SessionError::Ack2Unsupported,
            3 => SessionError::BadDescriptor,
            4 => SessionError::OutsideGrant,
            5 => SessionError::WrongClient,
            6 => SessionError::Fenced,
            7 => SessionError::RejectedBySequencer,
            10 => SessionError::ClientTableFull,
            11 => SessionError::BadMessage,
            12 => SessionError::ProtocolViolation,
            _ => SessionError::None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            SessionError::None => "no error",
            SessionError::UnknownTopic => "the broker does not know the session's topic",
            SessionError::Ack2Unsupported => {
                "ACK 2 needs replication, which this build does not have"
            }
            SessionError::BadDescriptor => "a batch descriptor failed its checks",
            SessionError::OutsideGrant => {
                "a batch lies outside the log space granted to the session"
            }
            SessionError::WrongClient => "a batch names another client than the session's",
            SessionError::Fenced => {
                "the sequencer fenced this client (a gap in its batch sequence never filled)"
            }
            SessionError::RejectedBySequencer => "the sequencer rejected a batch",
            SessionError::BadMessage => {
                "a batch's messages failed their checks (a header's size or identity does not \
                 fit the batch)"
            }
            SessionError::ProtocolViolation => {
                "the broker ended the session: the publisher broke the session protocol (a \
                 submission readiness word or a submitted or grants-taken counter it wrote)"
            }
            SessionError::ClientTableFull => {
                const _: () = assert!(crate::pool::layout::SEQUENCER_CLIENTS_MAX == 1024);
                "the topic's sequencer already tracks 1024 live publishers (its client table \
                 is full); retry when some have closed"
            }
        }
    }
}

/// The submission ring of a session.
pub fn submission_ring(s: &Session) -> RingRef<'_> {
    let slots: &[BatchHeader] = &s.submissions;
    RingRef::new(slots, &s.submitted, &s.submit_consumed)
}

/// Grant ring entry of grant number `k`.
pub fn grant_slot(k: u64) -> usize {
    (k % SESSION_GRANT_SLOTS as u64) as usize
}

/// Sessions of one broker.
pub const SESSIONS: u32 = SESSIONS_PER_BROKER as u32;

/// Claims a free session slot of `broker` for `client_id` on topic slot `topic` and asks the
/// broker to open it, without waiting: `Some((session, index, generation))`, or `None` when
/// every slot is in use. The answer comes in `accepted` (see [`answer`]).
pub fn try_claim<C: crate::pool::coherence::Coherence>(
    pool: &crate::pool::Pool,
    c: C,
    broker: u32,
    topic: u32,
    client_id: u64,
    owner: embar_sys::process::ProcessId,
) -> Result<Option<(&Session, u32, u64)>, crate::PoolError> {
    use crate::sync::Ordering::{AcqRel, Acquire, Relaxed};
    for i in 0..SESSIONS {
        let s = pool.session(broker, i)?;
        let state = c.observe(&s.state);
        let gen = state >> 8;
        let accepted = c.observe(&s.accepted);
        if is_live(state, accepted) {
            continue;
        }
        let mine = gen + 1;
        if s.state
            .compare_exchange(state, mine << 8 | STATE_OPENING, AcqRel, Acquire)
            .is_err()
        {
            continue;
        }
        s.client_id.store(client_id, Relaxed);
        s.topic.store(u64::from(topic), Relaxed);
        s.pid.store(owner.pack(), Relaxed);
        s.grants_taken.store(0, Relaxed);
        s.submitted.store(0, Relaxed);
        c.writeback(s);
        c.publish(&s.state, mine << 8 | STATE_OPEN);
        return Ok(Some((s, i, mine)));
    }
    Ok(None)
}

/// The broker's answer to generation `gen` of session `s`: `Some(ACCEPTED)`, `Some(REFUSED)`
/// (the reason is in `error`), or `None` while it has not answered.
pub fn answer<C: crate::pool::coherence::Coherence>(c: C, s: &Session, gen: u64) -> Option<u64> {
    let a = c.observe(&s.accepted);
    (a >> 8 == gen && matches!(a & 0xff, ACCEPTED | REFUSED)).then_some(a & 0xff)
}

/// Whether a session whose words read `state` and `accepted` may still bring batches into a
/// topic ring: from the claim until the broker has released (or refused) it. A closed
/// session stays live until the broker has drained its submissions and published RELEASED.
pub fn is_live(state: u64, accepted: u64) -> bool {
    let gen = state >> 8;
    !(state & 0xff == STATE_FREE
        || (accepted >> 8 == gen && matches!(accepted & 0xff, RELEASED | REFUSED)))
}

/// Adds to `out` the client id of every live session (see [`is_live`]) of topic slot
/// `topic`, on every broker slot of the pool (shm and verbs sessions alike). A session being
/// claimed this instant may show the previous tenant's client or topic: it counts whatever
/// it shows, so a client whose own session is live is never missed.
pub fn live_clients<C: crate::pool::coherence::Coherence>(
    pool: &crate::pool::Pool,
    c: C,
    topic: u32,
    out: &mut std::collections::HashSet<u64>,
) -> Result<(), crate::PoolError> {
    for b in 0..pool.geometry().max_brokers {
        for i in 0..SESSIONS {
            let s = pool.session(b, i)?;
            let state = c.observe(&s.state);
            let accepted = c.observe(&s.accepted);
            if !is_live(state, accepted) {
                continue;
            }
            c.invalidate(s);
            if s.topic.load(crate::sync::Ordering::Relaxed) == u64::from(topic) {
                out.insert(s.client_id.load(crate::sync::Ordering::Relaxed));
            }
        }
    }
    Ok(())
}

/// A network frontend's place in the grants of a session it stands in for as publisher
/// (TCP, DPDK): the grant being filled, and how many it has taken.
#[derive(Debug, Default)]
pub struct GrantCursor {
    /// `(offset, bytes, used)` of the grant being filled.
    grant: Option<(u64, u64, u64)>,
    taken: u64,
}

impl GrantCursor {
    /// Where a batch of `bytes` goes: the current grant if it has room, else the next one
    /// the broker issued (`None` while it has not). A grant the broker wrote out of the
    /// pool's bounds, or too small for a batch, is an error.
    pub fn place<C: crate::pool::coherence::Coherence>(
        &mut self,
        pool: &crate::pool::Pool,
        c: C,
        s: &Session,
        bell: &crate::pool::layout::BrokerDoorbell,
        bytes: u64,
    ) -> Result<Option<u64>, String> {
        loop {
            if let Some((offset, len, used)) = self.grant.as_mut() {
                if *used + bytes <= *len {
                    let at = *offset + *used;
                    *used += bytes;
                    return Ok(Some(at));
                }
            }
            let issued = c.observe(&s.grants_issued);
            if issued <= self.taken {
                return Ok(None);
            }
            let e = &s.grants[grant_slot(self.taken)];
            c.invalidate(e);
            let (offset, len) = (
                e.offset.load(crate::sync::Ordering::Relaxed),
                e.bytes.load(crate::sync::Ordering::Relaxed),
            );
            pool.data_ptr(offset, len)
                .map_err(|e| format!("grant {} of the broker: {e}", self.taken))?;
            if len < bytes {
                return Err(format!(
                    "a batch of {bytes} bytes does not fit grant {} of {len} bytes",
                    self.taken
                ));
            }
            // Frontends copy into it from the network: its pages are faulted in once here
            // (once per chunk per process), not one by one inside the copies.
            pool.populate_range(offset, len);
            self.grant = Some((offset, len, 0));
            self.taken += 1;
            c.publish(&s.grants_taken, self.taken);
            // Taking a grant lets the broker issue the next one ahead.
            crate::pool::doorbell::ring(bell);
        }
    }

    /// Bytes of batches of up to `batch_limit` bytes the session may still place without
    /// waiting: the grants issued and not taken, and what is left of the grant being filled
    /// when any such batch fits it (a batch does not span grants).
    pub fn room<C: crate::pool::coherence::Coherence>(
        &self,
        c: C,
        s: &Session,
        batch_limit: u64,
    ) -> u64 {
        let left = self.grant.map_or(0, |(_, len, used)| len - used);
        let mut room = if left >= batch_limit { left } else { 0 };
        let issued = c.observe(&s.grants_issued);
        for k in self.taken..issued.min(self.taken + SESSION_GRANT_SLOTS as u64) {
            let e = &s.grants[grant_slot(k)];
            c.invalidate(e);
            room += e.bytes.load(crate::sync::Ordering::Relaxed);
        }
        room
    }
}

/// Ends generation `gen` of session `s` from the publisher's side.
pub fn close<C: crate::pool::coherence::Coherence>(c: C, s: &Session, gen: u64) {
    c.publish(&s.state, gen << 8 | STATE_CLOSED);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_full_client_table_has_its_own_code_and_a_message_that_says_to_retry() {
        let code = SessionError::ClientTableFull as u64;
        assert_eq!(SessionError::from_code(code), SessionError::ClientTableFull);
        assert_eq!(
            SessionError::from_code(code | 7 << 8),
            SessionError::ClientTableFull,
            "with a batch sequence above the code"
        );
        let text = SessionError::ClientTableFull.describe();
        assert!(
            text.contains("1024 live publishers") && text.contains("retry"),
            "{text}"
        );
        // The verbs transport's own codes (8 and 9) stay distinct.
        #[cfg(feature = "verbs")]
        for own in [
            crate::verbs::frontend::ERROR_BAD_IMMEDIATE,
            crate::verbs::frontend::ERROR_TRANSPORT,
        ] {
            assert_ne!(own, code);
        }
        assert!(!(8..=9).contains(&code));
    }

    #[test]
    fn a_session_is_live_from_its_claim_until_the_broker_releases_or_refuses_it() {
        let gen = 5u64;
        assert!(!is_live(STATE_FREE, 0));
        assert!(is_live(gen << 8 | STATE_OPENING, 0));
        assert!(is_live(gen << 8 | STATE_OPEN, gen << 8 | ACCEPTED));
        assert!(
            is_live(gen << 8 | STATE_CLOSED, gen << 8 | ACCEPTED),
            "closed but not yet drained"
        );
        assert!(!is_live(gen << 8 | STATE_CLOSED, gen << 8 | RELEASED));
        assert!(!is_live(gen << 8 | STATE_OPEN, gen << 8 | REFUSED));
        assert!(
            is_live(gen << 8 | STATE_OPEN, (gen - 1) << 8 | RELEASED),
            "an older generation's release"
        );
    }
}
