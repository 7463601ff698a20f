//! A subscriber on the pool host: registers a cursor in the topic's subscriber table, reads the
//! sequencer's delivery ring in order, and hands out each message of each ordered batch with
//! its total order, client id, batch sequence, index and payload.
//!
//! Retention: the sequencer never overwrites a delivery entry an active subscriber has not
//! passed, and a broker never frees log space below the slowest position, except past a
//! retention limit (`embar broker --retention-bytes`). A subscriber that starts at an old
//! position checks, after publishing its cursor, that no broker has already reclaimed below
//! it (each side stores, fences, then reads the other: one of them sees the other).
//!
//! Copy, then validate: log space past a retention limit may be freed and reused by another
//! process while a slow subscriber reads it, so user code is never handed a slice of the
//! pool. A batch is copied into a buffer the subscriber owns, a window of whole messages
//! (64 KiB, or one larger message) at a time, then the broker's `reclaimed_below` watermark
//! is read again (after an acquire fence): a broker announces that watermark before it frees
//! the space, so if the watermark still lies at or below the batch after the copy, nothing of
//! the window was freed (let alone rewritten) while it was copied, and its messages are
//! delivered from the copy while it is still in cache. Otherwise the copy is dropped and the
//! subscriber gets [`PoolError::FellBehind`], naming its position and the oldest retained one
//! as total orders. The messages are checked and read from the copy through the one checked
//! view of a batch (`messages::Parts`: the same bounds and errors as the broker's check), so a
//! header cannot change between its check and its use either.
//!
//! Older than the pool: on a topic with replication (RF >= 1), a position the pool no longer
//! holds is read from the brokers' disk logs instead (`replication::reader`: every record
//! verified, in total order), transparently: the subscriber releases its cursor (a reader of
//! the disks holds nothing in the pool), delivers each batch from the disk, and after each one
//! looks whether the pool holds the next delivery index again; once it does, it registers
//! there and goes on from the pool, with no gap and no duplicate (disk records carry their
//! delivery index and total order). A batch on no disk and no longer in the pool is the
//! "fell behind" error; a record that does not verify is never delivered
//! ([`PoolError::DiskLog`] names the position).
use std::path::PathBuf;
use std::time::Duration;

use crate::messages::{BadBatch, Claims, Parts};
use crate::pool::coherence::Coherence;
use crate::pool::layout::{
    DeliveryEntry, SequencerState, SubscriberEntry, DELIVERY_SLOTS, SUBSCRIBERS_MAX,
    SUBSCRIBER_ACTIVE,
};
use crate::pool::Pool;
use crate::replication::reader::DiskLogs;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use crate::{PoolError, PoolResult};

/// Bytes of a batch copied out of the pool at a time before they are checked and delivered
/// (grown for a larger message): small enough to stay in cache until delivered.
const COPY_WINDOW_BYTES: usize = 64 * 1024;

const RECLAIMED: &str = "start position (log space already reclaimed below delivery index)";
const NOT_RETAINED: &str = "start position (no longer retained; oldest total order)";

/// Which brokers' disk logs a subscriber reads for the positions the pool no longer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disks {
    /// None: the pool only ("fell behind" past the retention limit).
    Never,
    /// Every broker's that recorded a data directory (what subscribers read).
    Every,
    /// Every broker's but this slot's: a replicator that catches up on its own log takes
    /// what it missed from the other replicas, and a gap is final once those have made it
    /// durable (its own progress is what it is rebuilding).
    OthersThan(u32),
}

/// Where to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest message still retained.
    Oldest,
    /// The next message to be ordered.
    Latest,
    /// The message with this total order (it must still be retained).
    TotalOrder(u64),
}

/// One delivered message; `payload` borrows the subscriber's own copy of the batch (never
/// the pool) until the next call.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub total_order: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    pub index: u32,
    pub num_msg: u32,
    pub payload: &'a [u8],
}

impl From<&Message<'_>> for crate::checker::Delivered {
    /// What the ordering checker looks at of a delivered message.
    fn from(m: &Message<'_>) -> Self {
        crate::checker::Delivered {
            total_order: m.total_order,
            client_id: m.client_id,
            batch_seq: m.batch_seq,
            index: m.index,
            num_msg: m.num_msg,
        }
    }
}

/// Where a delivered batch came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOrigin {
    /// The broker slot it landed on.
    pub broker: u32,
    /// Its index in the topic's delivery ring.
    pub delivery_index: u64,
}

/// Whole messages of one ordered batch, as the subscriber copied and checked them: the
/// batch's bytes (64-byte message headers and payloads, the pool's format) of messages
/// `first_index..first_index + count`. What a subscriber that forwards the log (a broker
/// serving a remote subscriber) passes on without looking at each message.
#[derive(Debug)]
pub struct Window<'a> {
    /// The total order of the batch's message 0.
    pub batch_total_order: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    /// Messages in the batch.
    pub num_msg: u32,
    /// The index in the batch of the window's first message.
    pub first_index: u32,
    /// Messages in the window.
    pub count: u32,
    /// Messages before this index are not delivered (a start inside the batch).
    pub deliver_from: u32,
    pub bytes: &'a [u8],
}

/// A registered subscriber of one topic.
#[derive(Debug)]
pub struct Subscriber<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    topic: u32,
    name: String,
    st: &'p SequencerState,
    /// Its entry in the topic's subscriber table, while it reads the pool (none while it
    /// reads the disks).
    cursor: Option<&'p SubscriberEntry>,
    /// Next delivery index to read.
    next: u64,
    /// Messages of the first batch to skip (a start inside a batch).
    skip: u32,
    /// The copy of the part of the batch being delivered ([`COPY_WINDOW_BYTES`], grown to
    /// the largest message seen, at most a segment).
    buf: Vec<u8>,
    /// Total order after the last batch read (for errors: positions are total orders).
    next_total: Option<u64>,
    /// Deliver a batch only once it is durable on its replica set (ACK 2's condition).
    durable_only: bool,
    replication_factor: u8,
    /// The topic slot's generation (with the pool's id, the era of its disk records).
    generation: u64,
    /// The topic's placement table as last read (which slots hold a batch's replicas).
    placement: crate::replication::placement::Placement,
    /// Whose disk logs to read for what the pool no longer holds (RF >= 1).
    disk_source: Disks,
    /// The disk logs, opened the first time they are needed.
    disk: Option<DiskLogs>,
    /// While reading from the disks: the total order of the next message.
    on_disk: Option<u64>,
    /// A disk record's body, then the batch rebuilt from it in the pool's format.
    disk_body: Vec<u8>,
    disk_batch: Vec<u8>,
    /// Messages delivered from the disk logs so far.
    disk_messages: u64,
}

/// Where the bytes of a batch being delivered are.
#[derive(Clone, Copy)]
enum Source {
    /// In the pool, at this address (copied out a window at a time, checked as retained).
    Pool(*const u8),
    /// In `disk_batch`, verified.
    Disk,
}

/// One ordered batch to deliver.
#[derive(Clone, Copy)]
struct Batch {
    first: u64,
    num_msg: u32,
    client_id: u64,
    batch_seq: u64,
    total: u64,
    origin: BatchOrigin,
    source: Source,
}

/// What the disks gave for the next position.
enum DiskStep {
    /// A batch, rebuilt in `disk_batch`.
    Batch(Batch),
    /// The pool holds the next position again: the subscriber is registered there.
    Rejoined,
    /// Nothing yet.
    Nothing,
}

fn entry(st: &SequencerState, d: u64) -> &DeliveryEntry {
    &st.delivery[(d % DELIVERY_SLOTS as u64) as usize]
}

impl<'p, C: Coherence> Subscriber<'p, C> {
    /// Registers a subscriber of `topic` starting at `start`. On a topic with replication, a
    /// start older than the pool reads the disk logs first (see the module docs).
    pub fn open(pool: &'p Pool, c: C, topic: &str, start: StartAt) -> PoolResult<Self> {
        Self::open_with(pool, c, topic, start, Disks::Every)
    }

    /// As [`open`](Self::open), reading the disk logs of `disks` only (the replicator reads
    /// the other replicas').
    pub fn open_with(
        pool: &'p Pool,
        c: C,
        topic: &str,
        start: StartAt,
        disks: Disks,
    ) -> PoolResult<Self> {
        let slot = pool.find_topic(c, topic)?;
        let st = pool.sequencer_state(slot);
        let info = pool.read_topic(c, slot);
        let mut sub = Subscriber {
            pool,
            c,
            topic: slot,
            name: topic.to_string(),
            st,
            cursor: None,
            next: 0,
            skip: 0,
            buf: vec![0; COPY_WINDOW_BYTES],
            next_total: None,
            durable_only: false,
            replication_factor: info.as_ref().map_or(0, |t| t.config.replication_factor),
            generation: info.as_ref().map_or(0, |t| t.generation),
            placement: crate::replication::placement::Placement::none(),
            disk_source: disks,
            disk: None,
            on_disk: None,
            disk_body: Vec::new(),
            disk_batch: Vec::new(),
            disk_messages: 0,
        };
        let delivered = c.observe(&st.delivered);
        let oldest = delivered.saturating_sub(DELIVERY_SLOTS as u64);
        let (next, skip) = match start {
            StartAt::Latest => (delivered, 0),
            StartAt::Oldest => {
                // The disks may hold older batches than the pool.
                if let Some(t) = sub.disk_oldest()? {
                    if t < sub.oldest_total_order() {
                        sub.on_disk = Some(t);
                        return Ok(sub);
                    }
                }
                let floor = Self::reclaimed_below(pool, c, slot);
                (oldest.max(floor).min(delivered), 0)
            }
            StartAt::TotalOrder(t) => match Self::find(c, st, oldest, delivered, t) {
                Err(PoolError::OutOfRange { what, limit, .. }) if what == NOT_RETAINED => {
                    if sub.on_disks(t)? {
                        sub.on_disk = Some(t);
                        return Ok(sub);
                    }
                    return Err(PoolError::FellBehind {
                        position: t,
                        oldest: limit,
                    });
                }
                r => r?,
            },
        };
        let mut next = next;
        let mut attempts = 0;
        let cursor = loop {
            match Self::register(pool, c, slot, st, next) {
                // A broker reclaimed the oldest space meanwhile: "oldest" moves up with it.
                Err(PoolError::OutOfRange { what, limit, .. })
                    if what == RECLAIMED && start == StartAt::Oldest && attempts < 8 =>
                {
                    attempts += 1;
                    next = limit.max(next).min(c.observe(&st.delivered).max(limit));
                }
                Err(e @ PoolError::OutOfRange { what, .. }) if what == RECLAIMED => {
                    let StartAt::TotalOrder(t) = start else {
                        return Err(e);
                    };
                    if sub.on_disks(t)? {
                        sub.on_disk = Some(t);
                        return Ok(sub);
                    }
                    return Err(PoolError::FellBehind {
                        position: t,
                        oldest: sub.oldest_total_order(),
                    });
                }
                r => break r?,
            }
        };
        sub.cursor = Some(cursor);
        sub.next = next;
        sub.skip = skip;
        Ok(sub)
    }

    /// Whether the disks can be read for this topic (RF >= 1, allowed), opening them the
    /// first time.
    fn disks(&mut self) -> Option<&mut DiskLogs> {
        if self.disk_source == Disks::Never || self.replication_factor == 0 {
            return None;
        }
        if self.disk.is_none() {
            let dirs: Vec<PathBuf> = self.disk_dirs().into_iter().map(|(_, d)| d).collect();
            if dirs.is_empty() {
                return None;
            }
            let era =
                crate::replication::topic_era(self.pool.pool_id(), self.topic, self.generation);
            self.disk = Some(DiskLogs::new(&dirs, &self.name, era));
        }
        self.disk.as_mut()
    }

    /// The brokers (slot, data directory) whose disk logs this subscriber reads.
    fn disk_dirs(&self) -> Vec<(u32, PathBuf)> {
        let mut dirs = self.pool.broker_data_dirs(self.c);
        match self.disk_source {
            Disks::Never => dirs.clear(),
            Disks::Every => {}
            Disks::OthersThan(me) => dirs.retain(|(b, _)| *b != me),
        }
        dirs
    }

    /// The oldest total order of this pool that a disk log holds.
    fn disk_oldest(&mut self) -> PoolResult<Option<u64>> {
        let Some(d) = self.disks() else {
            return Ok(None);
        };
        d.oldest().map_err(|source| PoolError::DiskLog {
            position: 0,
            source,
        })
    }

    /// Whether a disk log holds total order `t` now.
    fn on_disks(&mut self, t: u64) -> PoolResult<bool> {
        let mut body = std::mem::take(&mut self.disk_body);
        let r = match self.disks() {
            Some(d) => d.read(t, &mut body).map(|m| m.is_some()),
            None => Ok(false),
        };
        self.disk_body = body;
        r.map_err(|source| PoolError::DiskLog {
            position: t,
            source,
        })
    }

    /// Reads the disks from total order `position` on (the pool no longer holds it), if this
    /// subscriber may; otherwise `behind` is its error.
    fn fall_back(&mut self, position: u64, behind: PoolError) -> PoolResult<()> {
        if self.disks().is_none() {
            return Err(behind);
        }
        self.release_cursor();
        self.skip = 0;
        self.on_disk = Some(position);
        Ok(())
    }

    /// Stops holding a place in the subscriber table.
    fn release_cursor(&mut self) {
        if let Some(cur) = self.cursor.take() {
            let s = cur.state.load(Relaxed);
            self.c.publish(&cur.state, s & !0xff);
        }
    }

    /// The highest delivery index below which some broker may have freed log space.
    fn reclaimed_below(pool: &Pool, c: C, topic: u32) -> u64 {
        let t = pool.tinode(topic);
        (0..pool.geometry().max_brokers as usize)
            .map(|b| c.observe(&t.brokers[b].broker.reclaimed_below))
            .max()
            .unwrap_or(0)
    }

    /// The delivery index and in-batch skip of total order `t`, by binary search over the
    /// retained entries (total orders grow with the delivery index).
    fn find(c: C, st: &SequencerState, lo: u64, hi: u64, t: u64) -> PoolResult<(u64, u32)> {
        let first_of = |d: u64| {
            let e = entry(st, d);
            c.invalidate(e);
            (c.observe(&e.stamp) == d + 1)
                .then(|| (e.total_order.load(Relaxed), e.num_msg.load(Relaxed)))
        };
        if hi == lo || t >= first_of(hi - 1).map_or(0, |(f, n)| f + u64::from(n)) {
            // Not ordered yet: start at the end and skip up to it as it arrives.
            return match first_of(hi.saturating_sub(1)) {
                Some((f, n)) if t == f + u64::from(n) => Ok((hi, 0)),
                _ if hi == lo && t == 0 => Ok((hi, 0)),
                _ => Err(PoolError::OutOfRange {
                    what: "start position (total order not reached yet)",
                    value: t,
                    limit: first_of(hi.saturating_sub(1)).map_or(0, |(f, n)| f + u64::from(n)),
                }),
            };
        }
        let oldest = first_of(lo).map_or(u64::MAX, |(f, _)| f);
        if t < oldest {
            return Err(PoolError::OutOfRange {
                what: NOT_RETAINED,
                value: t,
                limit: oldest,
            });
        }
        let (mut a, mut b) = (lo, hi - 1);
        while a < b {
            let mid = a + (b - a).div_ceil(2);
            match first_of(mid) {
                Some((f, _)) if f <= t => a = mid,
                _ => b = mid - 1,
            }
        }
        let (f, _) = first_of(a).ok_or(PoolError::OutOfRange {
            what: "start position (overwritten while searching)",
            value: t,
            limit: 0,
        })?;
        Ok((a, (t - f) as u32))
    }

    fn register(
        pool: &'p Pool,
        c: C,
        topic: u32,
        st: &'p SequencerState,
        next: u64,
    ) -> PoolResult<&'p SubscriberEntry> {
        for e in &st.subscribers {
            let s = c.observe(&e.state);
            if s & 0xff == SUBSCRIBER_ACTIVE && pid_alive(e.pid.load(Relaxed)) {
                continue;
            }
            let mine = ((s >> 8) + 1) << 8 | SUBSCRIBER_ACTIVE;
            if e.state.compare_exchange(s, mine, AcqRel, Acquire).is_err() {
                continue;
            }
            e.pid
                .store(embar_sys::process::ProcessId::current().pack(), Relaxed);
            c.publish(&e.position, next);
            crate::sync::fence(SeqCst);
            let floor = Self::reclaimed_below(pool, c, topic);
            if floor > next {
                c.publish(&e.state, mine & !0xff);
                return Err(PoolError::OutOfRange {
                    what: RECLAIMED,
                    value: next,
                    limit: floor,
                });
            }
            return Ok(e);
        }
        Err(PoolError::OutOfRange {
            what: "subscribers of this topic",
            value: SUBSCRIBERS_MAX as u64,
            limit: SUBSCRIBERS_MAX as u64,
        })
    }

    /// Whether the batch at delivery index `d` (first total order `t`), landed on `broker`,
    /// is durable on its replica set.
    fn durable(&mut self, broker: u32, d: u64, t: u64) -> bool {
        use crate::replication::{durable_on, progress_under};
        let tinode = self.pool.tinode(self.topic);
        let slots = self.pool.geometry().max_brokers;
        self.placement.refresh(self.c, &tinode.placement);
        self.replication_factor > 0
            && durable_on(
                d,
                self.placement
                    .replica_set(broker, self.replication_factor, slots, t),
                |r| progress_under(self.c, tinode, &self.placement, r),
            )
    }

    /// Whether broker `broker` may have freed the log space of delivery index `d`: then an
    /// error naming `position` (the total order the subscriber would deliver next) and the
    /// oldest retained total order.
    fn check_retained(&self, broker: u32, d: u64, position: u64) -> PoolResult<()> {
        let t = self.pool.tinode(self.topic);
        let Some(e) = t.brokers.get(broker as usize) else {
            return Err(PoolError::BadRange(format!(
                "the batch at total order {position} names broker {broker}"
            )));
        };
        if self.c.observe(&e.broker.reclaimed_below) > d {
            return Err(PoolError::FellBehind {
                position,
                oldest: self.oldest_total_order(),
            });
        }
        Ok(())
    }

    /// The total order of the oldest message still retained (what `StartAt::Oldest` starts
    /// at now), or of the next to be ordered when none is.
    fn oldest_total_order(&self) -> u64 {
        let delivered = self.c.observe(&self.st.delivered);
        let floor = Self::reclaimed_below(self.pool, self.c, self.topic);
        let lo = delivered
            .saturating_sub(DELIVERY_SLOTS as u64)
            .max(floor)
            .min(delivered);
        let first_of = |d: u64| {
            let e = entry(self.st, d);
            self.c.invalidate(e);
            (self.c.observe(&e.stamp) == d + 1)
                .then(|| (e.total_order.load(Relaxed), e.num_msg.load(Relaxed)))
        };
        if lo < delivered {
            if let Some((f, _)) = first_of(lo) {
                return f;
            }
        }
        delivered
            .checked_sub(1)
            .and_then(first_of)
            .map_or(0, |(f, n)| f + u64::from(n))
    }

    pub fn topic_slot(&self) -> u32 {
        self.topic
    }

    /// Deliver only batches durable on every broker of their replica set (synced to disk:
    /// `docs/durability.md`); the subscriber waits at the first that is not yet. A topic
    /// without replication has nothing durable, so such a subscriber delivers nothing.
    pub fn set_durable_only(&mut self, yes: bool) {
        self.durable_only = yes;
    }

    /// Messages this subscriber delivered from the disk logs (positions the pool no longer
    /// held).
    pub fn messages_from_disk(&self) -> u64 {
        self.disk_messages
    }

    /// Next delivery index (batch) this subscriber will read (while it reads the disk
    /// logs: the one after the last batch it read there).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Waits until the sequencer has ordered a batch this subscriber has not read, for at
    /// most `timeout`: parks on the topic's doorbell (a futex the sequencer rings after it
    /// publishes new delivery entries, only when a subscriber is parked), instead of waking
    /// on a timer. Returns at once if one is there already; may return early (callers poll
    /// again). Across hosts (a pool without one kernel) the futex is not shared: the wait
    /// is then the timeout, so keep it short there.
    pub fn wait_ordered(&self, timeout: Duration) {
        if self.on_disk.is_some() {
            // A disk log is appended at its sync pace, without a ring to ring, and each look
            // lists and reads files: a millisecond between looks.
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            return;
        }
        if self.durable_only {
            // Durability comes without a ring: look again soon.
            std::thread::sleep(timeout.min(Duration::from_micros(50)));
            return;
        }
        let park =
            crate::pool::doorbell::Park::counted(crate::sequencer::state::subscriber_bell(self.st));
        // Announced, then looked: a batch published before the announcement is seen here;
        // one after it finds the announcement and rings.
        if self.c.observe(&self.st.delivered) <= self.next {
            park.wait(timeout);
        }
    }

    /// Delivers every message of up to `max_batches` ordered batches to `f`, in total order.
    /// Returns the number of messages delivered (0 when nothing new is ordered yet).
    pub fn poll(
        &mut self,
        max_batches: usize,
        mut f: impl FnMut(&Message<'_>),
    ) -> PoolResult<usize> {
        self.poll_batches(max_batches, |m, _| f(m))
    }

    /// As [`poll`](Self::poll), with where each message's batch came from (for the
    /// replication, which places batches by the broker they landed on).
    pub fn poll_batches(
        &mut self,
        max_batches: usize,
        mut f: impl FnMut(&Message<'_>, BatchOrigin),
    ) -> PoolResult<usize> {
        self.poll_parts(max_batches, |w, messages, origin| {
            let mut n = 0;
            for m in messages.iter() {
                let m = m?;
                if m.index >= w.deliver_from {
                    f(
                        &Message {
                            total_order: w.batch_total_order + u64::from(m.index),
                            client_id: w.client_id,
                            batch_seq: w.batch_seq,
                            index: m.index,
                            num_msg: w.num_msg,
                            payload: m.payload,
                        },
                        origin,
                    );
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// Hands every window of whole messages of up to `max_batches` ordered batches to `f`,
    /// in total order, each copied and checked (as for [`poll`](Self::poll)); `f` returns
    /// how many messages it delivered. For a subscriber that forwards the log as it is.
    pub fn poll_windows(
        &mut self,
        max_batches: usize,
        mut f: impl FnMut(&Window<'_>) -> usize,
    ) -> PoolResult<usize> {
        self.poll_parts(max_batches, |w, _, _| Ok(f(w)))
    }

    fn poll_parts(
        &mut self,
        max_batches: usize,
        mut f: impl FnMut(
            &Window<'_>,
            &crate::messages::Messages<'_>,
            BatchOrigin,
        ) -> Result<usize, BadBatch>,
    ) -> PoolResult<usize> {
        let mut n = 0;
        let mut batches = 0;
        // Read once a poll (on a non-coherent pool each read is a flush and a fence on the
        // sequencer's busiest line), and again on coming back from the disks.
        let mut delivered = self.c.observe(&self.st.delivered);
        while batches < max_batches {
            if let Some(t) = self.on_disk {
                match self.disk_step(t)? {
                    DiskStep::Batch(b) => {
                        batches += 1;
                        self.deliver(&b, &mut n, &mut f)?;
                        self.on_disk = Some(b.first + u64::from(b.num_msg));
                        continue;
                    }
                    DiskStep::Rejoined => delivered = self.c.observe(&self.st.delivered),
                    DiskStep::Nothing => break,
                }
            }
            if self.next >= delivered {
                break;
            }
            let d = self.next;
            let e = entry(self.st, d);
            self.c.invalidate(e);
            let stamp = self.c.observe(&e.stamp);
            let (first, num_msg) = (e.total_order.load(Relaxed), e.num_msg.load(Relaxed));
            let (client_id, batch_seq) = (e.client_id.load(Relaxed), e.batch_seq.load(Relaxed));
            let (log_idx, total) = (e.log_idx.load(Relaxed), e.total_size.load(Relaxed));
            let broker = e.broker.load(Relaxed);
            // Read the entry's words, then its stamp again: an entry overwritten meanwhile is
            // not taken for this one.
            crate::sync::fence(Acquire);
            if stamp != d + 1 || self.c.observe(&e.stamp) != stamp {
                let behind = PoolError::OutOfRange {
                    what: "subscriber total order (its delivery entry was overwritten: this \
                           subscriber fell a ring behind; a later batch starts at the limit)",
                    value: self.next_total.unwrap_or(0),
                    limit: e.total_order.load(Relaxed),
                };
                match self.next_total {
                    Some(t) => {
                        self.fall_back(t, behind)?;
                        continue;
                    }
                    None => return Err(behind),
                }
            }
            if self.durable_only && !self.durable(broker, d, first) {
                break;
            }
            // Past a broker's retention limit, its log space may be reclaimed before this
            // subscriber read it: then the disks, or an error, never reused bytes.
            let r = self
                .check_retained(broker, d, first + u64::from(self.skip))
                .and_then(|()| self.pool.data_ptr(log_idx, total))
                .and_then(|base| {
                    let b = Batch {
                        first,
                        num_msg,
                        client_id,
                        batch_seq,
                        total,
                        origin: BatchOrigin {
                            broker,
                            delivery_index: d,
                        },
                        source: Source::Pool(base),
                    };
                    self.deliver(&b, &mut n, &mut f)
                });
            match r {
                Ok(()) => {}
                Err(PoolError::FellBehind { position, oldest }) => {
                    self.fall_back(position, PoolError::FellBehind { position, oldest })?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            batches += 1;
            if let Some(cur) = self.cursor {
                self.c.publish(&cur.position, self.next);
            }
        }
        Ok(n)
    }

    /// One step of a subscriber reading the disks at total order `t`: back to the pool if it
    /// holds the next batch again, else the batch from the disks.
    fn disk_step(&mut self, t: u64) -> PoolResult<DiskStep> {
        if self.try_rejoin(t) {
            return Ok(DiskStep::Rejoined);
        }
        let mut body = std::mem::take(&mut self.disk_body);
        let read = match self.disks() {
            Some(d) => d.read(t, &mut body),
            None => Ok(None),
        };
        self.disk_body = body;
        let meta = match read {
            Ok(Some(m)) => m,
            Ok(None) => {
                if !self.gap_is_final() {
                    return Ok(DiskStep::Nothing);
                }
                // A backfill log may have begun since the disks were last looked at.
                if self.disks().is_some_and(|d| d.relist()) {
                    return Ok(DiskStep::Nothing);
                }
                return Err(PoolError::FellBehind {
                    position: t,
                    oldest: self.oldest_total_order(),
                });
            }
            Err(source) => {
                return Err(PoolError::DiskLog {
                    position: t,
                    source,
                })
            }
        };
        if self.durable_only && !self.durable(meta.broker, meta.delivery_index, meta.total_order) {
            return Ok(DiskStep::Nothing);
        }
        // The record in the pool's batch format, read through the same checked view.
        self.disk_batch.clear();
        for (i, payload) in crate::replication::log::messages(&self.disk_body).enumerate() {
            let header = crate::pool::layout::MessageHeader {
                client_id: meta.client_id,
                batch_seq: meta.batch_seq,
                total_order: meta.total_order + i as u64,
                ..Default::default()
            };
            crate::batch::encode_message(&mut self.disk_batch, &header, payload);
        }
        self.skip = (t - meta.total_order) as u32;
        Ok(DiskStep::Batch(Batch {
            first: meta.total_order,
            num_msg: meta.num_msg,
            client_id: meta.client_id,
            batch_seq: meta.batch_seq,
            total: self.disk_batch.len() as u64,
            origin: BatchOrigin {
                broker: meta.broker,
                delivery_index: meta.delivery_index,
            },
            source: Source::Disk,
        }))
    }

    /// Whether the pool holds the batch at total order `t` (the next after the last read
    /// from the disks, at delivery index `next`) with room before the sequencer reaches it
    /// again: then this subscriber registers there, and reads the pool from it.
    fn try_rejoin(&mut self, t: u64) -> bool {
        if self.next_total != Some(t) {
            return false;
        }
        let d = self.next;
        let delivered = self.c.observe(&self.st.delivered);
        // Half the delivery ring of room: the sequencer, which may have read the slowest
        // position before this one is published, cannot overwrite the entry meanwhile.
        if d > delivered || d + (DELIVERY_SLOTS as u64) / 2 < delivered {
            return false;
        }
        if d < delivered {
            let e = entry(self.st, d);
            self.c.invalidate(e);
            let broker = e.broker.load(Relaxed);
            let held = self.c.observe(&e.stamp) == d + 1
                && e.total_order.load(Relaxed) == t
                && self.check_retained(broker, d, t).is_ok();
            if !held {
                return false;
            }
        }
        match Self::register(self.pool, self.c, self.topic, self.st, d) {
            Ok(cur) => {
                self.cursor = Some(cur);
                self.on_disk = None;
                self.skip = 0;
                true
            }
            Err(_) => false,
        }
    }

    /// Whether a batch the disks do not hold (and the pool no longer does) will never be
    /// there: every broker that keeps disk logs has made durable past it (the delivery index
    /// after the last batch read), so it is on none of them.
    fn gap_is_final(&mut self) -> bool {
        if self.next_total.is_none() {
            return true;
        }
        let t = self.pool.tinode(self.topic);
        // A slot excluded from the replica sets (its broker died and stayed away) never
        // makes progress again: it holds what it made durable, and no more.
        self.placement.refresh(self.c, &t.placement);
        self.disk_dirs()
            .iter()
            .filter(|(b, _)| !self.placement.excluded_now(*b))
            .all(|(b, _)| {
                crate::replication::progress_under(self.c, t, &self.placement, *b) > self.next
            })
    }

    /// Delivers batch `b` a window of whole messages at a time: each window copied out of the
    /// pool (then checked as still retained) or taken from the disk copy, checked through the
    /// one view of a batch's messages, and handed to `f` while in cache.
    fn deliver(
        &mut self,
        b: &Batch,
        n: &mut usize,
        f: &mut impl FnMut(
            &Window<'_>,
            &crate::messages::Messages<'_>,
            BatchOrigin,
        ) -> Result<usize, BadBatch>,
    ) -> PoolResult<()> {
        let (first, num_msg) = (b.first, b.num_msg);
        let (broker, d) = (b.origin.broker, b.origin.delivery_index);
        let unreadable = |reason| PoolError::UnreadableBatch {
            first,
            end: first + u64::from(num_msg),
            client_id: b.client_id,
            batch_seq: b.batch_seq,
            reason,
        };
        let claims = Claims {
            num_msg,
            client_id: b.client_id,
            batch_seq: b.batch_seq,
        };
        let mut parts = Parts::new(claims, b.total).map_err(unreadable)?;
        let len = b.total as usize;
        // The copy costs one pass over cached bytes.
        let mut window = COPY_WINDOW_BYTES;
        while !parts.is_done() {
            let off = parts.offset() as usize;
            let w = window.min(len - off);
            let i = parts.index();
            let bytes: &[u8] = match b.source {
                Source::Pool(base) => {
                    if self.buf.len() < w {
                        // Only for a message larger than the window (bounded by a segment).
                        self.buf.resize(w, 0);
                    }
                    // SAFETY: `base + off .. base + off + w` lies inside `base..base + len`,
                    // which `data_ptr` bounds-checked in the mapping (`Parts` keeps
                    // `off <= len`); `buf` holds at least `w` bytes and is not the pool.
                    // Another process may be writing that range if a broker reclaimed it
                    // meanwhile: the copy is then discarded by the check below, before
                    // anything reads it.
                    unsafe {
                        let src = base.add(off);
                        self.c.invalidate_range(src, w);
                        std::ptr::copy_nonoverlapping(src, self.buf.as_mut_ptr(), w);
                    }
                    // The copy is complete before the watermark is read again
                    // (announce-then-free on the broker's side; see the module docs).
                    crate::sync::fence(Acquire);
                    let position = first + u64::from(i.max(self.skip));
                    if let Err(e) = self.check_retained(broker, d, position) {
                        self.skip = i.max(self.skip);
                        return Err(e);
                    }
                    &self.buf[..w]
                }
                Source::Disk => &self.disk_batch[off..off + w],
            };
            let messages = parts.next(bytes).map_err(unreadable)?;
            let count = parts.index() - i;
            if count > 0 {
                let used = parts.offset() as usize - off;
                let window = Window {
                    batch_total_order: first,
                    client_id: b.client_id,
                    batch_seq: b.batch_seq,
                    num_msg,
                    first_index: i,
                    count,
                    deliver_from: self.skip,
                    bytes: &bytes[..used],
                };
                let delivered = f(&window, &messages, b.origin).map_err(unreadable)?;
                *n += delivered;
                if let Source::Disk = b.source {
                    self.disk_messages += delivered as u64;
                }
            }
            // A message the window did not hold whole: the next window holds it.
            window = window.max(parts.need() as usize);
        }
        self.skip = 0;
        self.next = d + 1;
        self.next_total = Some(first + u64::from(num_msg));
        Ok(())
    }
}

impl<C: Coherence> Drop for Subscriber<'_, C> {
    fn drop(&mut self) {
        self.release_cursor();
    }
}

/// The lowest position of the active subscribers of a topic that `alive` keeps (callers pass
/// a process check, cached or not): what every reclaim and the sequencer's delivery ring wait
/// for. `None` when no subscriber holds anything.
pub fn slowest_position<C: Coherence>(
    st: &SequencerState,
    c: C,
    mut alive: impl FnMut(usize, u64, &SubscriberEntry) -> bool,
) -> Option<u64> {
    st.subscribers
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let state = c.observe(&e.state);
            (state & 0xff == SUBSCRIBER_ACTIVE && alive(i, state, e))
                .then(|| c.observe(&e.position))
        })
        .min()
}

/// Whether the process a pool word names (a packed [`ProcessId`]) still runs: a registered
/// subscriber or session whose process died, is a zombie, or whose pid now names a later
/// process holds nothing.
///
/// [`ProcessId`]: embar_sys::process::ProcessId
pub fn pid_alive(word: u64) -> bool {
    embar_sys::process::ProcessId::unpack(word).alive()
}
