//! The broker's data path on the pool host (shm transport): sessions with publishers,
//! grants of log space (credits), checks of every submitted batch, publication into the
//! topic's batch ring, acks, and reclaiming log space once the sequencer and every subscriber
//! have passed it. One polling loop does all of it (run to completion).
//!
//! The session protocol is described in [`crate::session`].

pub mod core;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use embar_sys::clock::monotonic_ns;

use self::core::{AckPolicy, DurableWait, Effect, Lifecycle, SessionCore, SlotView, GRANTS_AHEAD};
use crate::batch::{BatchDesc, BatchLimits};
use crate::client::subscriber::{pid_alive, slowest_position};
use crate::messages::Messages;
use crate::pool::coherence::Coherence;
use crate::pool::layout::{Session, OUTCOME_DUPLICATE, OUTCOME_ORDERED, SESSION_GRANT_SLOTS};
use crate::pool::segments::{AllocPolicy, Segment, SegmentAllocator, SegmentOwner};
use crate::pool::Pool;
use crate::ring::{Polled, RingConsumer, RingProducer};
use crate::session::*;
use crate::sync::Ordering::{Relaxed, SeqCst};
use crate::PoolError;

/// How often sessions are checked for a vanished publisher process.
const PID_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// How often the slots of sessions that are not open are looked at for a new claim. Open
/// sessions are looked at every round; a claim waits at most this long for its answer (a
/// publisher claims once per session), and a round costs two pool words per open session
/// instead of per slot (128 slots: on a non-coherent pool each look is a line flush).
const CLAIM_SCAN_INTERVAL: Duration = Duration::from_micros(200);
/// How often the broker checks whether the pool is running short of free segments.
const SPACE_CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// Log space is reclaimed only when fewer than this fraction (1/n) of the pool's segments
/// are free, or a grant found none: recent batches stay readable by late subscribers.
const RECLAIM_WHEN_FREE_BELOW: u64 = 4;
/// Smallest grant: a session's first grants are this (or one batch of the topic, if larger),
/// and each further grant doubles, up to a segment: space scales with what a session
/// writes.
const GRANT_BYTES_MIN: u64 = 64 * 1024;
const _: () = assert!(GRANTS_AHEAD as usize <= SESSION_GRANT_SLOTS);
/// Between announcing that log space past the retention limit is reclaimed and freeing it: a
/// subscriber that checked just before the announcement finishes reading in this time.
const RETENTION_GRACE: Duration = Duration::from_millis(100);
/// Submissions taken from one session per round (fairness between sessions).
const SUBMISSIONS_PER_ROUND: usize = 16;

/// Counters (exported as metrics by the broker process).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokerStats {
    pub batches_landed: u64,
    pub batches_rejected: u64,
    pub batches_acked: u64,
    pub messages_acked: u64,
    pub grants_issued: u64,
    pub grant_waits: u64,
    pub ring_full_waits: u64,
    pub segments_reclaimed: u64,
    pub sessions_opened: u64,
    pub sessions_closed: u64,
    /// Sessions the broker ended because their publisher broke the protocol.
    pub sessions_ended: u64,
    /// Resends of batches the sequencer had ordered already, decided `duplicate` without a
    /// ring slot.
    pub resends_dropped: u64,
}

/// A range of log space granted to one session, carved from a segment that several grants
/// (of several sessions) may share.
#[derive(Debug)]
struct Grant {
    /// The segment it lies in.
    seg: Segment,
    /// Pool offsets of its first byte and past its last.
    start: u64,
    end: u64,
    /// Offset after the last accepted batch: the next batch must start here or later.
    fill: u64,
    /// Batches published into the ring and not yet decided by the sequencer.
    inflight: u64,
    /// Highest delivery index of its batches.
    max_delivery: Option<u64>,
    /// No further batch can land in it.
    closed: bool,
}

#[derive(Debug)]
struct Pending {
    /// Its ring slot; for an `early` duplicate, the ring's next index when it came (it is
    /// decided once every slot before that is).
    ring_index: u64,
    session: usize,
    generation: u64,
    num_msg: u32,
    grant: u64,
    /// A resend of a batch the sequencer had ordered already, known from the topic's client
    /// table before it took a ring slot: decided `duplicate` without one, in its turn (acks
    /// stay in submission order per session).
    early: bool,
}

impl Pending {
    /// Whether its decision can be read, given the ring's consumed count.
    fn decided(&self, consumed: u64) -> bool {
        if self.early {
            self.ring_index <= consumed
        } else {
            self.ring_index < consumed
        }
    }
}

/// Whether the sequencer of topic `topic` has ordered batch `batch_seq` of `client_id`
/// already: a resend after a failover, which would only come back `duplicate` (see
/// [`Pool::client_progress`]; a stale read only says "not yet", and the ring decides then).
fn ordered_before<C: Coherence>(
    pool: &Pool,
    c: C,
    topic: u32,
    client_id: u64,
    batch_seq: u64,
) -> bool {
    pool.client_progress(c, topic, client_id)
        .is_some_and(|(next_expected, fenced)| !fenced && batch_seq < next_expected)
}

/// An ACK 2 batch ordered and not yet durable on its replica set.
#[derive(Debug)]
struct Undurable {
    session: usize,
    generation: u64,
    num_msg: u32,
    wait: DurableWait,
}

struct TopicState<'p, C: Coherence> {
    /// Generation of the topic slot this state belongs to.
    generation: u64,
    order: u8,
    ack: u8,
    replication_factor: u8,
    /// The topic's placement table as last read (ACK 2: whose progress a batch waits for).
    placement: crate::replication::placement::Placement,
    /// ACK 2: ordered batches awaiting their replicas' progress, in decision order.
    undurable: VecDeque<Undurable>,
    producer: RingProducer<'p, C>,
    alloc: SegmentAllocator<'p, C>,
    /// Published batches awaiting the sequencer's decision, in ring order.
    pending: VecDeque<Pending>,
    /// Batches were published into the ring this round: the topic's sequencer is rung (if
    /// it is parked) at the end of the round.
    ring_sequencer: bool,
    grants: HashMap<u64, Grant>,
    next_grant_id: u64,
    /// Segments this (topic, broker) holds, by index (see `reclaim`).
    segments: HashMap<u64, Held>,
    /// The segment grants are carved from while it has room for a batch.
    tail: Option<u64>,
    /// A session's first grants (one batch of the topic fits in every grant).
    grant_bytes_min: u64,
    logical: u64,
    /// Segments of this (topic, slot) left by an earlier process of this broker slot, and the
    /// ring index below which its batches lie: adopted as closed grants once the sequencer
    /// has decided all of those.
    orphans: Vec<Segment>,
    orphans_below: u64,
}

struct SessionState<'p, C: Coherence> {
    /// The generation accepted (0: none).
    generation: u64,
    open: bool,
    topic: u32,
    client_id: u64,
    pid: u64,
    /// Its credits, acks and rejections: the decisions are [`core`]'s.
    core: SessionCore,
    /// Grant ids by grant number, for this session.
    grants: VecDeque<(u64, u64)>,
    consumer: Option<RingConsumer<'p, C>>,
    /// The highest `batch_seq` it submitted. A publisher's batches come to each session in
    /// `batch_seq` order, so one at or below it is a resend (a failover) and the only kind
    /// worth looking up in the client table (`ordered_before`), which the sequencer writes:
    /// not one shared cache line per batch.
    max_batch_seq: Option<u64>,
    /// Its rejected batches are said at most every 10 s, with the count since: a publisher
    /// that keeps sending bad batches must not flood the log.
    reject_log: crate::log_limit::LogLimit,
}

/// A segment held by a (topic, broker): grants are carved from it in order.
#[derive(Debug)]
struct Held {
    seg: Segment,
    /// Offset of its first byte not granted.
    frontier: u64,
    /// Announced as reclaimed past the retention limit: nothing more is carved from it.
    retired: bool,
}

impl Held {
    fn room(&self) -> u64 {
        if self.retired {
            0
        } else {
            self.seg.offset + self.seg.bytes - self.frontier
        }
    }
}

/// How much log space `reclaim` may free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reclaim {
    /// Only segments that hold no readable batch (grants closed unused, or whose batches
    /// were all refused): always, so that short sessions do not pin space.
    Unreadable,
    /// The pool runs short: what every reader has passed, except the newest
    /// `--retention-bytes` of decided batches (kept for late subscribers).
    Short,
    /// A grant found no free segment: everything every reader has passed.
    Starved,
}

impl<C: Coherence> TopicState<'_, C> {
    /// Tracks `g` under a new grant id.
    fn add_grant(&mut self, g: Grant) -> u64 {
        let id = self.next_grant_id;
        self.next_grant_id += 1;
        self.grants.insert(id, g);
        id
    }

    /// Carves a grant of up to `want` bytes (at least `grant_bytes_min`, which the caller
    /// asks at least) from the tail segment, else from the held segment with the most room
    /// for a batch, else from a new segment (a rest smaller than one batch stays unused
    /// until its segment is freed).
    fn carve(&mut self, want: u64) -> Result<(Segment, u64, u64), PoolError> {
        let min = self.grant_bytes_min;
        let pick = self
            .tail
            .filter(|i| self.segments.get(i).is_some_and(|h| h.room() >= min))
            .or_else(|| {
                self.segments
                    .values()
                    .filter(|h| h.room() >= min)
                    .max_by_key(|h| (h.room(), std::cmp::Reverse(h.seg.index)))
                    .map(|h| h.seg.index)
            });
        let index = match pick {
            Some(i) => i,
            None => {
                let seg = self.alloc.alloc()?;
                self.segments.insert(
                    seg.index,
                    Held {
                        seg,
                        frontier: seg.offset,
                        retired: false,
                    },
                );
                seg.index
            }
        };
        self.tail = Some(index);
        let h = self
            .segments
            .get_mut(&index)
            .expect("picked a held segment");
        let start = h.frontier;
        h.frontier += want.min(h.room());
        Ok((h.seg, start, h.frontier))
    }

    /// Gives back to their segments what closed grants at the segments' frontiers did not
    /// use: a grant closed unused is dropped, a closed grant's unused end is cut off. Only
    /// closed grants (whose session is over, or moved past them) are touched, so nobody
    /// writes there any more; no batch was accepted there, so no reader looks there.
    /// Sessions that publish a little one after the other share one segment instead of
    /// pinning grants each.
    fn retract_closed(&mut self) {
        let mut at_frontier: HashMap<(u64, u64), u64> = self
            .grants
            .iter()
            .filter(|(_, g)| g.closed)
            .map(|(id, g)| ((g.seg.index, g.end), *id))
            .collect();
        for h in self.segments.values_mut().filter(|h| !h.retired) {
            while let Some(id) = at_frontier.remove(&(h.seg.index, h.frontier)) {
                let g = self.grants.get_mut(&id).expect("listed");
                if g.fill == g.start {
                    h.frontier = g.start;
                    self.grants.remove(&id);
                    continue;
                }
                g.end = g.fill;
                h.frontier = g.fill;
                break;
            }
        }
    }
}

impl<C: Coherence> Default for SessionState<'_, C> {
    fn default() -> Self {
        SessionState {
            generation: 0,
            open: false,
            topic: 0,
            client_id: 0,
            pid: 0,
            core: SessionCore::default(),
            grants: VecDeque::new(),
            consumer: None,
            max_batch_seq: None,
            reject_log: Default::default(),
        }
    }
}

/// The data path of one broker.
pub struct Broker<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    broker: u32,
    sessions: Vec<SessionState<'p, C>>,
    topics: HashMap<u32, TopicState<'p, C>>,
    stats: BrokerStats,
    last_pid_check_ns: u64,
    last_claim_scan_ns: u64,
    last_space_check_ns: u64,
    /// Segments are short: reclaim what readers have passed.
    need_space: bool,
    /// Log space per topic this broker keeps for lagging subscribers (None: unlimited).
    retention_bytes: Option<u64>,
    /// Segments to be freed past the retention limit once their grace has run out:
    /// `(topic, segment index, deadline ns)`.
    forced: Vec<(u32, u64, u64)>,
    /// A grant found no free segment since the last reclaim.
    starved: bool,
}

impl<'p, C: Coherence> Broker<'p, C> {
    /// Serves pool slot `broker`.
    pub fn new(pool: &'p Pool, c: C, broker: u32) -> Result<Self, PoolError> {
        pool.check_topic_broker(0, broker)?;
        let sessions = (0..SESSIONS).map(|_| SessionState::default()).collect();
        let mut b = Broker {
            pool,
            c,
            broker,
            sessions,
            topics: HashMap::new(),
            stats: BrokerStats::default(),
            last_pid_check_ns: 0,
            last_claim_scan_ns: 0,
            last_space_check_ns: 0,
            need_space: false,
            retention_bytes: None,
            forced: Vec::new(),
            starved: false,
        };
        b.adopt_at_start()?;
        Ok(b)
    }

    /// Keeps at most `bytes` of decided batches per topic for subscribers that lag: past
    /// that, the oldest log space is reclaimed even if a subscriber has not read it, and that
    /// subscriber gets an error instead of the data (it is never shown reused space).
    pub fn with_retention_limit(mut self, bytes: Option<u64>) -> Self {
        self.retention_bytes = bytes;
        self
    }

    pub fn stats(&self) -> BrokerStats {
        self.stats
    }

    /// Open sessions now.
    pub fn sessions_open(&self) -> usize {
        self.sessions.iter().filter(|s| s.open).count()
    }

    /// Ring slots published and not yet decided, per topic slot.
    pub fn ring_occupancy(&self) -> Vec<(u32, u64)> {
        self.topics
            .iter()
            .map(|(t, s)| (*t, s.pending.iter().filter(|p| !p.early).count() as u64))
            .collect()
    }

    /// Whether batches it published await the sequencer's decision: their acks follow
    /// without a ring, so its loop must not park for long meanwhile.
    pub fn awaiting_decisions(&self) -> bool {
        self.topics.values().any(|t| !t.pending.is_empty())
    }

    fn session(&self, i: usize) -> &'p Session {
        self.pool
            .session(self.broker, i as u32)
            .expect("session index below SESSIONS")
    }

    /// One round over sessions and topics; returns how much work it did.
    pub fn poll_once(&mut self) -> Result<usize, PoolError> {
        let mut work = 0;
        let now = monotonic_ns();
        let check_pids =
            now.saturating_sub(self.last_pid_check_ns) >= PID_CHECK_INTERVAL.as_nanos() as u64;
        if check_pids {
            self.last_pid_check_ns = now;
            // Topics deleted (or deleted and created again) since: drop their state.
            let gone: Vec<u32> = self
                .topics
                .iter()
                .filter(|(slot, t)| {
                    self.pool
                        .read_topic(self.c, **slot)
                        .is_none_or(|i| i.generation != t.generation)
                })
                .map(|(slot, _)| *slot)
                .collect();
            for slot in gone {
                self.drop_topic(slot)?;
            }
        }
        let scan_claims =
            now.saturating_sub(self.last_claim_scan_ns) >= CLAIM_SCAN_INTERVAL.as_nanos() as u64;
        if scan_claims {
            self.last_claim_scan_ns = now;
        }
        for i in 0..self.sessions.len() {
            if !self.sessions[i].open && !scan_claims {
                continue;
            }
            work += self.lifecycle(i, check_pids)?;
            if self.sessions[i].open {
                work += self.receive(i)?;
                self.grant(i)?;
            }
        }
        if now.saturating_sub(self.last_space_check_ns) >= SPACE_CHECK_INTERVAL.as_nanos() as u64 {
            self.last_space_check_ns = now;
            let g = self.pool.geometry();
            let free = g.segment_count - self.pool.segments_in_use(self.c);
            self.need_space |= free < g.segment_count / RECLAIM_WHEN_FREE_BELOW;
        }
        for (slot, t) in self.topics.iter_mut() {
            if std::mem::take(&mut t.ring_sequencer) {
                crate::sequencer::state::sequencer_bell(self.pool.sequencer_state(*slot)).ring();
            }
        }
        let topics: Vec<u32> = self.topics.keys().copied().collect();
        for t in &topics {
            work += self.decisions(*t)?;
            self.adopt_orphans(*t);
        }
        let space_check = self.last_space_check_ns == now;
        if self.need_space || space_check {
            let mode = if std::mem::take(&mut self.starved) {
                Reclaim::Starved
            } else if std::mem::take(&mut self.need_space) {
                Reclaim::Short
            } else {
                Reclaim::Unreadable
            };
            for t in &topics {
                self.reclaim(*t, mode)?;
                if let (true, Some(limit)) = (space_check, self.retention_bytes) {
                    self.enforce_retention(*t, limit, now)?;
                }
            }
        }
        self.free_forced(now)?;
        Ok(work)
    }

    /// Opens, refuses or closes session `i` as its publisher asks.
    fn lifecycle(&mut self, i: usize, check_pids: bool) -> Result<usize, PoolError> {
        let s = self.session(i);
        let state = self.c.observe(&s.state);
        let known = &self.sessions[i];
        let view = SlotView {
            generation: state >> 8,
            state: state & 0xff,
            answered: self.c.observe(&s.accepted) >> 8,
            holder_alive: (known.open && check_pids).then(|| pid_alive(known.pid)),
        };
        match self::core::lifecycle(known.open.then_some(known.generation), view) {
            Lifecycle::Close => self.close(i)?,
            Lifecycle::Open { generation } => self.accept(i, generation)?,
            Lifecycle::Nothing => return Ok(0),
        }
        Ok(1)
    }

    fn accept(&mut self, i: usize, gen: u64) -> Result<(), PoolError> {
        let s = self.session(i);
        self.c.invalidate(s);
        let topic = s.topic.load(Relaxed) as u32;
        let refuse = |err: SessionError| {
            s.error.store(err as u64, Relaxed);
            self.c.publish(&s.accepted, gen << 8 | REFUSED);
        };
        let info = (topic < self.pool.geometry().max_topics)
            .then(|| self.pool.read_topic(self.c, topic))
            .flatten();
        let info = match (self::core::admit(info.as_ref()), info) {
            (Ok(()), Some(info)) => info,
            (Err(e), _) => {
                refuse(e);
                return Ok(());
            }
            (Ok(()), None) => unreachable!("admit refuses a missing topic"),
        };
        if self
            .topics
            .get(&topic)
            .is_some_and(|t| t.generation != info.generation)
        {
            self.drop_topic(topic)?;
        }
        self.ensure_topic(topic, &info)?;
        // Reset the broker's side; the publisher waits for `accepted`, so it writes nothing.
        for slot in s.submissions.iter() {
            slot.ready.store(0, Relaxed);
        }
        for w in [
            &s.grants_issued,
            &s.submit_consumed,
            &s.acked_messages,
            &s.acked_batches,
            &s.rejected_batches,
            &s.error,
        ] {
            w.store(0, Relaxed);
        }
        s.submitted.store(0, Relaxed);
        self.c.writeback(s);
        let limits = BatchLimits::new(*self.pool.geometry(), self.broker);
        self.sessions[i] = SessionState {
            generation: gen,
            open: true,
            topic,
            client_id: s.client_id.load(Relaxed),
            pid: s.pid.load(Relaxed),
            consumer: Some(RingConsumer::new(submission_ring(s), self.c, limits)),
            ..SessionState::default()
        };
        self.c.publish(&s.accepted, gen << 8 | ACCEPTED);
        self.stats.sessions_opened += 1;
        Ok(())
    }

    /// The state of `topic` on this broker, made on first use. Segments the segment table
    /// says this (topic, slot) holds but no grant of this process knows are an earlier
    /// process's (a broker restarted into this slot): they become orphans to adopt.
    fn ensure_topic(
        &mut self,
        topic: u32,
        info: &crate::pool::topics::TopicInfo,
    ) -> Result<(), PoolError> {
        if self.topics.contains_key(&topic) {
            return Ok(());
        }
        let ring = self.pool.ring(topic, self.broker)?;
        let owner = SegmentOwner {
            topic,
            broker: self.broker,
        };
        let producer = RingProducer::new(ring, self.c);
        let orphans = self.owned_segments(owner);
        if !orphans.is_empty() {
            log::info!(
                "broker {}: topic slot {topic}: {} segment(s) of an earlier process of this slot; reclaimed once read",
                self.broker,
                orphans.len()
            );
        }
        self.topics.insert(
            topic,
            TopicState {
                generation: info.generation,
                order: info.config.order,
                ack: info.config.ack,
                replication_factor: info.config.replication_factor,
                placement: crate::replication::placement::Placement::none(),
                undurable: VecDeque::new(),
                orphans_below: producer.next_index(),
                producer,
                alloc: SegmentAllocator::new(self.pool, self.c, owner, AllocPolicy::Shared)?,
                pending: VecDeque::new(),
                ring_sequencer: false,
                grants: HashMap::new(),
                next_grant_id: 0,
                segments: HashMap::new(),
                tail: None,
                grant_bytes_min: crate::pool::layout::align_up(info.config.batch_bytes, 64)
                    .max(GRANT_BYTES_MIN)
                    .min(self.pool.geometry().segment_bytes),
                logical: 0,
                orphans,
            },
        );
        self.need_space |= !self.topics[&topic].orphans.is_empty();
        Ok(())
    }

    /// Every segment the table says `owner` holds.
    fn owned_segments(&self, owner: SegmentOwner) -> Vec<Segment> {
        let g = self.pool.geometry();
        (0..g.segment_count)
            .filter(|i| self.pool.segment_owner(self.c, *i) == Some(owner))
            .map(|i| Segment {
                index: i,
                offset: g.segment_offset(i),
                bytes: g.segment_bytes,
                generation: self.pool.segment_table()[i as usize]
                    .generation
                    .load(Relaxed),
            })
            .collect()
    }

    /// At start: topics whose segments an earlier process of this slot left get their state
    /// (so the segments are adopted and reclaimed even if no publisher comes); segments of a
    /// topic that no longer exists are freed at once (nobody can read them).
    fn adopt_at_start(&mut self) -> Result<(), PoolError> {
        let mut topics: Vec<u32> = (0..self.pool.geometry().segment_count)
            .filter_map(|i| self.pool.segment_owner(self.c, i))
            .filter(|o| o.broker == self.broker)
            .map(|o| o.topic)
            .collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            match self.pool.read_topic(self.c, topic) {
                Some(info) => self.ensure_topic(topic, &info)?,
                None => {
                    let owner = SegmentOwner {
                        topic,
                        broker: self.broker,
                    };
                    let mut alloc =
                        SegmentAllocator::new(self.pool, self.c, owner, AllocPolicy::Shared)?;
                    for seg in self.owned_segments(owner) {
                        alloc.free(&seg)?;
                        self.stats.segments_reclaimed += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Orphans become closed grants once the sequencer has decided every batch the earlier
    /// process published: none of those is delivered past the highest delivery index among
    /// the decided slots of the ring's current lap (which are those batches, or later ones;
    /// holds are bounded far below a lap). No ordered slot at all: nothing to read, freed.
    fn adopt_orphans(&mut self, topic: u32) {
        let Some(t) = self.topics.get_mut(&topic) else {
            return;
        };
        if t.orphans.is_empty() {
            return;
        }
        let consumed = t.producer.consumed();
        if consumed < t.orphans_below {
            return;
        }
        let next = t.producer.next_index();
        let first = next.saturating_sub(t.producer.capacity());
        let max_delivery = (first..consumed.min(next))
            .map(|i| t.producer.decision(i))
            .filter(|(outcome, _)| *outcome == OUTCOME_ORDERED)
            .map(|(_, d)| d)
            .max();
        for seg in std::mem::take(&mut t.orphans) {
            t.segments.insert(
                seg.index,
                Held {
                    seg,
                    frontier: seg.offset + seg.bytes,
                    retired: false,
                },
            );
            t.add_grant(Grant {
                seg,
                start: seg.offset,
                end: seg.offset + seg.bytes,
                fill: seg.offset + seg.bytes,
                inflight: 0,
                max_delivery,
                closed: true,
            });
        }
        self.need_space = true;
    }

    /// Takes what is left in the submission ring, closes every grant, releases the slot.
    fn close(&mut self, i: usize) -> Result<(), PoolError> {
        while self.receive(i)? > 0 {}
        if !self.sessions[i].open {
            // Draining found a protocol violation: the session is already ended.
            return Ok(());
        }
        let st = std::mem::take(&mut self.sessions[i]);
        if let Some(t) = self.topics.get_mut(&st.topic) {
            for (_, id) in &st.grants {
                if let Some(g) = t.grants.get_mut(id) {
                    g.closed = true;
                }
            }
        }
        let s = self.session(i);
        self.c.publish(&s.accepted, st.generation << 8 | RELEASED);
        self.stats.sessions_closed += 1;
        Ok(())
    }

    /// Ends session `i` because its publisher broke the protocol (`reason` says how): its
    /// grants are closed (reclaimed once read), nothing more of it is taken, its publisher
    /// sees `ProtocolViolation`; every other session goes on. Batches it had submitted
    /// before stay published (they passed every check) and are decided as usual.
    fn end_session(&mut self, i: usize, reason: &str) {
        let st = std::mem::take(&mut self.sessions[i]);
        if let Some(t) = self.topics.get_mut(&st.topic) {
            for (_, id) in &st.grants {
                if let Some(g) = t.grants.get_mut(id) {
                    g.closed = true;
                }
            }
        }
        log::error!(
            "broker {} session {i} (client {}, pid {}, topic slot {}): session ended: {}: {reason}",
            self.broker,
            st.client_id,
            embar_sys::process::ProcessId::unpack(st.pid).pid,
            st.topic,
            SessionError::ProtocolViolation.describe()
        );
        let s = self.session(i);
        s.error
            .store(SessionError::ProtocolViolation as u64, Relaxed);
        self.c.publish(&s.rejected_batches, st.core.rejected + 1);
        self.c.publish(&s.accepted, st.generation << 8 | RELEASED);
        self.stats.sessions_closed += 1;
        self.stats.sessions_ended += 1;
    }

    /// Forgets a deleted topic: closes its sessions and frees every segment it held.
    fn drop_topic(&mut self, slot: u32) -> Result<(), PoolError> {
        for i in 0..self.sessions.len() {
            if self.sessions[i].open && self.sessions[i].topic == slot {
                let st = std::mem::take(&mut self.sessions[i]);
                let s = self.session(i);
                s.error.store(SessionError::UnknownTopic as u64, Relaxed);
                self.c.publish(&s.accepted, st.generation << 8 | RELEASED);
                self.stats.sessions_closed += 1;
            }
        }
        if let Some(mut t) = self.topics.remove(&slot) {
            let held = t.segments.drain().map(|(_, h)| h.seg);
            for seg in held
                .chain(std::mem::take(&mut t.orphans))
                .collect::<Vec<_>>()
            {
                t.alloc.free(&seg)?;
                self.stats.segments_reclaimed += 1;
            }
            self.forced.retain(|f| f.0 != slot);
            log::info!(
                "broker {}: topic slot {slot} is gone; its log space is freed",
                self.broker
            );
        }
        Ok(())
    }

    /// Keeps the session's grant ring full: its credits.
    fn grant(&mut self, i: usize) -> Result<(), PoolError> {
        let s = self.session(i);
        if !self.sessions[i].open {
            return Ok(());
        }
        let taken = self.c.observe(&s.grants_taken);
        let wanted = match self.sessions[i].core.take_grants(taken) {
            Ok(n) => n,
            Err(why) => {
                self.end_session(i, &why);
                return Ok(());
            }
        };
        let st = &mut self.sessions[i];
        let Some(t) = self.topics.get_mut(&st.topic) else {
            return Ok(());
        };
        for _ in 0..wanted {
            t.retract_closed();
            let want = self::core::grant_bytes(
                t.grant_bytes_min,
                st.core.issued,
                self.pool.geometry().segment_bytes,
            );
            let (seg, start, end) = match t.carve(want) {
                Ok(carved) => carved,
                Err(PoolError::NoFreeSegment { .. }) => {
                    self.stats.grant_waits += 1;
                    self.need_space = true;
                    self.starved = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            let id = t.add_grant(Grant {
                seg,
                start,
                end,
                fill: start,
                inflight: 0,
                max_delivery: None,
                closed: false,
            });
            st.grants.push_back((st.core.issued, id));
            let e = &s.grants[grant_slot(st.core.issued)];
            e.offset.store(start, Relaxed);
            e.bytes.store(end - start, Relaxed);
            self.c.writeback(e);
            st.core.issued_one();
            self.c.publish(&s.grants_issued, st.core.issued);
            self.stats.grants_issued += 1;
        }
        Ok(())
    }

    /// Takes submitted batches, checks them, publishes them into the topic ring.
    fn receive(&mut self, i: usize) -> Result<usize, PoolError> {
        let s = self.session(i);
        let mut work = 0;
        for _ in 0..SUBMISSIONS_PER_ROUND {
            let st = &mut self.sessions[i];
            if !st.open {
                break;
            }
            let Some(t) = self.topics.get_mut(&st.topic) else {
                break;
            };
            // A slot is reused only after its sequencer decision was read (`decisions`).
            let cap = t.producer.capacity();
            let undecided_limit = t
                .pending
                .front()
                .is_some_and(|p| t.producer.next_index() >= p.ring_index + cap);
            if undecided_limit || t.producer.free_slots() == 0 {
                self.stats.ring_full_waits += 1;
                break;
            }
            let Some(consumer) = st.consumer.as_mut() else {
                break;
            };
            // The publisher's count of submissions: never past what the ring can hold
            // beyond what this broker consumed (the ring's own protocol bounds it so).
            let submitted = self.c.observe(&s.submitted);
            let most = consumer.consumed() + consumer.capacity();
            if submitted > most {
                let reason = format!(
                    "submitted counter {submitted} is past the {most} the submission ring can hold"
                );
                self.end_session(i, &reason);
                return Ok(work + 1);
            }
            let p = match consumer.poll() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    self.end_session(i, &format!("submission ring: {e}"));
                    return Ok(work + 1);
                }
            };
            work += 1;
            let verdict = match &p {
                Polled::Invalid { reason, .. } => {
                    Err((SessionError::BadDescriptor, reason.clone()))
                }
                Polled::Batch { desc, .. } => check_submission(st, t, desc).and_then(|id| {
                    // Nothing unreadable is published (so nothing unreadable is acked).
                    Messages::check(self.pool, self.c, desc)
                        .map(|_| id)
                        .map_err(|e| (SessionError::BadMessage, e.to_string()))
                }),
            };
            // A publisher's batches come to a session in `batch_seq` order: one at or below
            // the highest so far is a resend, the only kind looked up in the client table.
            let early_duplicate = match (&verdict, &p) {
                (Ok(_), Polled::Batch { desc, .. }) if matches!(t.order, 4 | 5) => {
                    let resend = st.max_batch_seq.is_none_or(|m| desc.batch_seq <= m);
                    st.max_batch_seq = Some(
                        st.max_batch_seq
                            .map_or(desc.batch_seq, |m| m.max(desc.batch_seq)),
                    );
                    resend
                        && ordered_before(
                            self.pool,
                            self.c,
                            st.topic,
                            desc.client_id,
                            desc.batch_seq,
                        )
                }
                _ => false,
            };
            match (verdict, p) {
                (Ok(grant_id), Polled::Batch { index, desc }) if early_duplicate => {
                    // A resend of a batch ordered before (its publisher failed over from a
                    // dead broker): decided here, so resends never fill the ring while a
                    // batch held for a gap keeps its slots from being reused.
                    let g = t.grants.get_mut(&grant_id).expect("checked grant");
                    g.fill = desc.log_idx + desc.total_size;
                    t.pending.push_back(Pending {
                        ring_index: t.producer.next_index(),
                        session: i,
                        generation: st.generation,
                        num_msg: desc.num_msg,
                        grant: grant_id,
                        early: true,
                    });
                    self.stats.resends_dropped += 1;
                    st.consumer
                        .as_mut()
                        .expect("open")
                        .finish(index)
                        .map_err(|e| PoolError::BadRange(e.to_string()))?;
                }
                (Ok(grant_id), Polled::Batch { index, desc }) => {
                    let published = BatchDesc {
                        start_logical_offset: t.logical,
                        ..desc
                    };
                    let ring_index = t
                        .producer
                        .try_publish(&published)
                        .map_err(|e| PoolError::BadRange(e.to_string()))?;
                    t.logical += u64::from(desc.num_msg);
                    t.ring_sequencer = true;
                    let g = t.grants.get_mut(&grant_id).expect("checked grant");
                    g.fill = desc.log_idx + desc.total_size;
                    g.inflight += 1;
                    t.pending.push_back(Pending {
                        ring_index,
                        session: i,
                        generation: st.generation,
                        num_msg: desc.num_msg,
                        grant: grant_id,
                        early: false,
                    });
                    self.stats.batches_landed += 1;
                    let policy = AckPolicy {
                        order: t.order,
                        ack: t.ack,
                    };
                    let effect = st.core.landed(desc.num_msg, policy);
                    apply(self.c, s, effect, desc.num_msg, 0, &mut self.stats);
                    st.consumer
                        .as_mut()
                        .expect("open")
                        .finish(index)
                        .map_err(|e| PoolError::BadRange(e.to_string()))?;
                }
                (verdict, p) => {
                    let (err, reason) = verdict
                        .err()
                        .unwrap_or((SessionError::BadDescriptor, String::new()));
                    let (index, seq) = match &p {
                        Polled::Batch { index, desc } | Polled::Invalid { index, desc, .. } => {
                            (*index, desc.batch_seq)
                        }
                    };
                    crate::warn_limited!(
                        st.reject_log,
                        monotonic_ns(),
                        "broker {} session {i} (client {}): batch {seq} rejected: {}: {reason}",
                        self.broker,
                        st.client_id,
                        err.describe()
                    );
                    let effect = st.core.reject(err);
                    apply(self.c, s, effect, 0, seq, &mut self.stats);
                    st.consumer
                        .as_mut()
                        .expect("open")
                        .finish(index)
                        .map_err(|e| PoolError::BadRange(e.to_string()))?;
                }
            }
        }
        Ok(work)
    }

    /// Reads the sequencer's decisions on published batches: acks, errors, grant bookkeeping.
    fn decisions(&mut self, topic: u32) -> Result<usize, PoolError> {
        let Some(t) = self.topics.get_mut(&topic) else {
            return Ok(0);
        };
        let consumed = t.producer.consumed();
        let mut work = 0;
        while t.pending.front().is_some_and(|p| p.decided(consumed)) {
            let p = t.pending.pop_front().expect("front exists");
            work += 1;
            let (outcome, delivery, total_order) = if p.early {
                (OUTCOME_DUPLICATE, 0, 0)
            } else {
                t.producer.decision_at(p.ring_index)
            };
            if p.early {
                // No ring slot, so nothing of the grant's in flight.
            } else if let Some(g) = t.grants.get_mut(&p.grant) {
                g.inflight -= 1;
                if outcome == OUTCOME_ORDERED {
                    g.max_delivery = Some(g.max_delivery.map_or(delivery, |m| m.max(delivery)));
                }
            }
            let st = &mut self.sessions[p.session];
            if !st.open || st.generation != p.generation {
                continue;
            }
            let s = self.pool.session(self.broker, p.session as u32)?;
            let policy = AckPolicy {
                order: t.order,
                ack: t.ack,
            };
            let effect = st.core.decide(outcome, p.num_msg, policy);
            if effect == Effect::AwaitDurable {
                let next = self
                    .c
                    .observe(&self.pool.sequencer_state(topic).next_delivery);
                t.undurable.push_back(Undurable {
                    session: p.session,
                    generation: p.generation,
                    num_msg: p.num_msg,
                    wait: self::core::durable_wait(outcome, delivery, total_order, next),
                });
            }
            apply(self.c, s, effect, p.num_msg, 0, &mut self.stats);
        }
        if !t.undurable.is_empty() {
            work += self.durable_acks(topic)?;
        }
        Ok(work)
    }

    /// ACK 2: acks the waiting batches whose replica set has synced past them, each
    /// session's in its order (acks are cumulative counts of a prefix).
    fn durable_acks(&mut self, topic: u32) -> Result<usize, PoolError> {
        let Some(t) = self.topics.get_mut(&topic) else {
            return Ok(0);
        };
        let tinode = self.pool.tinode(topic);
        let slots = self.pool.geometry().max_brokers;
        let (c, me, rf) = (self.c, self.broker, t.replication_factor);
        t.placement.refresh(c, &tinode.placement);
        let placement = &t.placement;
        let (pool, sessions, stats) = (self.pool, &mut self.sessions, &mut self.stats);
        // Sessions with an earlier batch still waiting: their later ones wait too (acks are
        // cumulative). At most one entry per session.
        let mut blocked: Vec<usize> = Vec::new();
        let mut acked = 0;
        // Each slot's progress read once a round, when a batch first needs it (two words,
        // each a flush and a fence on a non-coherent pool), not once per waiting batch.
        let mut progress = [None::<u64>; crate::pool::layout::MAX_BROKERS];
        // One pass in decision order, each batch kept or removed in place.
        t.undurable.retain(|u| {
            let st = &mut sessions[u.session];
            if !st.open || st.generation != u.generation {
                return false;
            }
            if blocked.contains(&u.session)
                || !self::core::is_durable(u.wait, me, rf, slots, placement, |r| {
                    *progress[r as usize].get_or_insert_with(|| {
                        crate::replication::progress_under(c, tinode, placement, r)
                    })
                })
            {
                if !blocked.contains(&u.session) {
                    blocked.push(u.session);
                }
                return true;
            }
            let effect = st.core.durable(u.num_msg);
            let s = pool
                .session(me, u.session as u32)
                .expect("session index below SESSIONS");
            apply(c, s, effect, u.num_msg, 0, stats);
            acked += 1;
            false
        });
        Ok(acked)
    }

    /// Segments of `topic` whose every grant is closed with every batch decided (nothing more
    /// can land in them), not already announced for freeing: `(segment index, highest
    /// delivery index of its batches, bytes of its batches)`.
    fn settled_segments(&self, topic: u32) -> Vec<(u64, Option<u64>, u64)> {
        let Some(t) = self.topics.get(&topic) else {
            return Vec::new();
        };
        let mut by_seg: HashMap<u64, (bool, Option<u64>, u64)> =
            t.segments.keys().map(|i| (*i, (true, None, 0))).collect();
        for g in t.grants.values() {
            let e = by_seg.entry(g.seg.index).or_insert((true, None, 0));
            e.0 &= g.closed && g.inflight == 0;
            e.1 = e.1.max(g.max_delivery);
            e.2 += g.fill - g.start;
        }
        by_seg
            .into_iter()
            .filter(|(i, (settled, _, _))| {
                *settled && !self.forced.iter().any(|f| f.0 == topic && f.1 == *i)
            })
            .map(|(i, (_, newest, bytes))| (i, newest, bytes))
            .collect()
    }

    /// With replication, the delivery index below which every batch of `topic` that landed
    /// here is durable on its replica set. Log space above it is never reclaimed, past the
    /// retention limit or not: a replica that is down or behind reads those batches from the
    /// pool when it catches up, and they may be nowhere else. `u64::MAX` without replication.
    ///
    /// The sets of this broker's batches lie within the first `RF + e` slots from it around
    /// the ring (`e`: the slots the placement table names), less the slots excluded now
    /// (such a slot made every batch of its sets durable below where it was excluded) and
    /// those that keep no disk log.
    fn durable_floor(&mut self, topic: u32) -> u64 {
        let Some(t) = self.topics.get_mut(&topic) else {
            return u64::MAX;
        };
        if t.replication_factor == 0 {
            return u64::MAX;
        }
        let tinode = self.pool.tinode(topic);
        t.placement.refresh(self.c, &tinode.placement);
        let n = self.pool.geometry().max_brokers;
        let mut named: Vec<u32> = t.placement.exclusions().iter().map(|e| e.slot).collect();
        named.sort_unstable();
        named.dedup();
        let width = (usize::from(t.replication_factor) + named.len()).min(n as usize) as u32;
        let (pool, c) = (self.pool, self.c);
        // A slot that keeps no disk log (no broker yet, or one without `--data-dir`) never
        // makes anything durable: waiting for it would hold the pool for good.
        let keeps_logs = |r: u32| {
            pool.broker_info(r)
                .is_ok_and(|i| c.observe(&i.data_dir_len) > 0)
        };
        (0..width)
            .map(|i| (self.broker + i) % n)
            .filter(|r| !t.placement.excluded_now(*r) && keeps_logs(*r))
            .map(|r| crate::replication::progress_under(self.c, tinode, &t.placement, r))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Past the retention limit, announces that the oldest settled segments of `topic` are
    /// reclaimed (keeping at least the newest `limit` bytes of decided batches in settled
    /// segments); they are freed after [`RETENTION_GRACE`]. Space of open grants is never
    /// taken.
    fn enforce_retention(&mut self, topic: u32, limit: u64, now: u64) -> Result<(), PoolError> {
        let durable = self.durable_floor(topic);
        let mut held: Vec<(Option<u64>, u64, u64)> = self
            .settled_segments(topic)
            .into_iter()
            .filter(|s| s.1.is_some_and(|d| d < durable))
            .map(|(i, newest, bytes)| (newest, i, bytes))
            .collect();
        let mut bytes: u64 = held.iter().map(|h| h.2).sum();
        if bytes <= limit {
            return Ok(());
        }
        held.sort_unstable();
        let Some(t) = self.topics.get_mut(&topic) else {
            return Ok(());
        };
        let region = &self.pool.tinode(topic).brokers[self.broker as usize].broker;
        let mut floor = self.c.observe(&region.reclaimed_below);
        for (newest, index, seg_bytes) in held {
            if bytes - seg_bytes < limit {
                break;
            }
            bytes -= seg_bytes;
            floor = floor.max(newest.map_or(0, |d| d + 1));
            if let Some(h) = t.segments.get_mut(&index) {
                h.retired = true;
            }
            self.forced
                .push((topic, index, now + RETENTION_GRACE.as_nanos() as u64));
        }
        self.c.publish(&region.reclaimed_below, floor);
        Ok(())
    }

    /// Frees announced segments whose grace has run out.
    fn free_forced(&mut self, now: u64) -> Result<(), PoolError> {
        if self.forced.is_empty() {
            return Ok(());
        }
        let (due, wait): (Vec<_>, Vec<_>) = self.forced.drain(..).partition(|f| f.2 <= now);
        self.forced = wait;
        for (topic, index, _) in due {
            self.free_segment(topic, index)?;
        }
        Ok(())
    }

    /// Frees segment `index` of `topic` with every grant in it.
    fn free_segment(&mut self, topic: u32, index: u64) -> Result<(), PoolError> {
        let Some(t) = self.topics.get_mut(&topic) else {
            return Ok(());
        };
        t.grants.retain(|_, g| g.seg.index != index);
        if t.tail == Some(index) {
            t.tail = None;
        }
        if let Some(h) = t.segments.remove(&index) {
            t.alloc.free(&h.seg)?;
            self.stats.segments_reclaimed += 1;
        }
        Ok(())
    }

    /// Frees settled segments of `topic` whose batches every reader has passed, as far as
    /// `mode` allows (see [`Reclaim`]).
    fn reclaim(&mut self, topic: u32, mode: Reclaim) -> Result<(), PoolError> {
        let mut settled = self.settled_segments(topic);
        if settled.is_empty() {
            return Ok(());
        }
        let st = self.pool.sequencer_state(topic);
        let slowest = |c: C| slowest_position(st, c, |_, _, e| pid_alive(e.pid.load(Relaxed)));
        let floor = match mode {
            Reclaim::Unreadable => 0,
            _ => slowest(self.c)
                .unwrap_or_else(|| self.c.observe(&st.delivered))
                .min(self.durable_floor(topic)),
        };
        settled.retain(|s| s.1.is_none_or(|d| d < floor));
        if let (Reclaim::Short, Some(limit)) = (mode, self.retention_bytes) {
            // Keep the newest `limit` bytes of decided batches for late subscribers.
            settled.sort_unstable_by_key(|s| std::cmp::Reverse(s.1));
            let mut kept = 0;
            settled.retain(|s| {
                let keep = s.1.is_some() && kept < limit;
                if keep {
                    kept += s.2;
                }
                !keep
            });
        }
        if settled.is_empty() {
            return Ok(());
        }
        // Announce only what is really freed, so subscribers can still start at everything
        // below `floor` that is kept.
        let announce = settled
            .iter()
            .filter_map(|s| s.1.map(|d| d + 1))
            .max()
            .unwrap_or(0);
        let region = &self.pool.tinode(topic).brokers[self.broker as usize].broker;
        if announce > self.c.observe(&region.reclaimed_below) {
            self.c.publish(&region.reclaimed_below, announce);
        }
        // A subscriber registering now stores its position, fences, then reads
        // `reclaimed_below`; this side stored that, fences, and reads positions again.
        crate::sync::fence(SeqCst);
        if announce > 0 && slowest(self.c).is_some_and(|p| p < announce) {
            return Ok(());
        }
        for (index, _, _) in settled {
            self.free_segment(topic, index)?;
        }
        Ok(())
    }
}

/// Writes what [`core`] decided for session `s` into its words: the cumulative ack counts
/// (of a batch of `num_msg` messages), or the rejected count and the error
/// (`code | batch_seq << 8`).
fn apply<C: Coherence>(
    c: C,
    s: &Session,
    effect: Effect,
    num_msg: u32,
    batch_seq: u64,
    stats: &mut BrokerStats,
) {
    match effect {
        Effect::Nothing | Effect::AwaitDurable => {}
        Effect::Ack { messages, batches } => {
            s.acked_batches.store(batches, Relaxed);
            s.ack_ns.store(monotonic_ns(), Relaxed);
            c.publish(&s.acked_messages, messages);
            stats.batches_acked += 1;
            stats.messages_acked += u64::from(num_msg);
        }
        Effect::Reject { rejected, error } => {
            s.error.store(error as u64 | batch_seq << 8, Relaxed);
            c.publish(&s.rejected_batches, rejected);
            stats.batches_rejected += 1;
        }
    }
}

/// Checks a submitted batch against its session: client, grant, order inside the grant.
/// Closes the grants the publisher has moved past. Returns the grant id.
fn check_submission<C: Coherence>(
    st: &mut SessionState<'_, C>,
    t: &mut TopicState<'_, C>,
    d: &BatchDesc,
) -> Result<u64, (SessionError, String)> {
    if d.client_id != st.client_id {
        return Err((
            SessionError::WrongClient,
            format!(
                "client {} in a session of client {}",
                d.client_id, st.client_id
            ),
        ));
    }
    let end = d.log_idx + d.total_size;
    let found = st.grants.iter().find(|(_, id)| {
        t.grants
            .get(id)
            .is_some_and(|g| !g.closed && d.log_idx >= g.fill && end <= g.end)
    });
    let Some(&(k, id)) = found else {
        return Err((
            SessionError::OutsideGrant,
            format!(
                "{}..{end} is not free space of an open grant of this session",
                d.log_idx
            ),
        ));
    };
    // The publisher fills grants in order: every earlier grant is done.
    for (_, earlier) in st.grants.iter().filter(|(n, _)| *n < k) {
        if let Some(g) = t.grants.get_mut(earlier) {
            g.closed = true;
        }
    }
    st.grants.retain(|(n, _)| *n >= k);
    Ok(id)
}
