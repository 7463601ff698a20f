//! A subscriber on the pool host: registers a cursor in the topic's subscriber table, reads the
//! sequencer's delivery ring in order, and hands out each message of each ordered batch with
//! its total order, client id, batch sequence, index and payload, reading the payload where it
//! was landed (no copy).
//!
//! Retention: the sequencer never overwrites a delivery entry an active subscriber has not
//! passed, and a broker never frees log space below the slowest position. A subscriber that
//! starts at an old position checks, after publishing its cursor, that no broker has already
//! reclaimed below it (each side stores, fences, then reads the other: one of them sees the
//! other).

use crate::batch::BatchDesc;
use crate::messages::Messages;
use crate::pool::coherence::Coherence;
use crate::pool::layout::{
    DeliveryEntry, SequencerState, SubscriberEntry, DELIVERY_SLOTS, SUBSCRIBERS_MAX,
    SUBSCRIBER_ACTIVE,
};
use crate::pool::Pool;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use crate::{PoolError, PoolResult};

const RECLAIMED: &str = "start position (log space already reclaimed below delivery index)";

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

/// One delivered message; `payload` borrows the pool until the next call.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub total_order: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    pub index: u32,
    pub num_msg: u32,
    pub payload: &'a [u8],
}

/// A registered subscriber of one topic.
#[derive(Debug)]
pub struct Subscriber<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    topic: u32,
    st: &'p SequencerState,
    cursor: &'p SubscriberEntry,
    /// Next delivery index to read.
    next: u64,
    /// Messages of the first batch to skip (a start inside a batch).
    skip: u32,
    /// Total order after the last batch read (for errors: positions are total orders).
    next_total: Option<u64>,
}

fn entry(st: &SequencerState, d: u64) -> &DeliveryEntry {
    &st.delivery[(d % DELIVERY_SLOTS as u64) as usize]
}

impl<'p, C: Coherence> Subscriber<'p, C> {
    /// Registers a subscriber of `topic` starting at `start`.
    pub fn open(pool: &'p Pool, c: C, topic: &str, start: StartAt) -> PoolResult<Self> {
        let slot = pool.find_topic(c, topic)?;
        let st = pool.sequencer_state(slot);
        let delivered = c.observe(&st.delivered);
        let oldest = delivered.saturating_sub(DELIVERY_SLOTS as u64);
        let (next, skip) = match start {
            StartAt::Latest => (delivered, 0),
            StartAt::Oldest => {
                let floor = Self::reclaimed_below(pool, c, slot);
                (oldest.max(floor).min(delivered), 0)
            }
            StartAt::TotalOrder(t) => Self::find(c, st, oldest, delivered, t)?,
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
                r => break r?,
            }
        };
        Ok(Subscriber {
            pool,
            c,
            topic: slot,
            st,
            cursor,
            next,
            skip,
            next_total: None,
        })
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
                what: "start position (no longer retained; oldest total order)",
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
            e.pid.store(u64::from(std::process::id()), Relaxed);
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

    /// The total order at which delivery index `d` starts, while the delivery ring still
    /// says (its entry, or the one before it, is of this lap).
    fn total_order_at(&self, d: u64) -> Option<u64> {
        let e = entry(self.st, d);
        self.c.invalidate(e);
        if self.c.observe(&e.stamp) == d + 1 {
            return Some(e.total_order.load(Relaxed));
        }
        let p = entry(self.st, d.checked_sub(1)?);
        self.c.invalidate(p);
        (self.c.observe(&p.stamp) == d)
            .then(|| p.total_order.load(Relaxed) + u64::from(p.num_msg.load(Relaxed)))
    }

    /// Errors if broker `broker` may have reclaimed the batch at delivery index `d`, which
    /// starts at total order `first`. Positions in the error are total orders.
    fn check_retained(&self, broker: u32, d: u64, first: u64) -> PoolResult<()> {
        let t = self.pool.tinode(self.topic);
        let Some(e) = t.brokers.get(broker as usize) else {
            return Err(PoolError::BadRange(format!(
                "the batch at total order {first} names broker {broker}"
            )));
        };
        let floor = self.c.observe(&e.broker.reclaimed_below);
        if floor > d {
            return Err(PoolError::OutOfRange {
                what: "subscriber total order (fell behind the retention limit; the oldest \
                       retained total order is the limit)",
                value: first,
                limit: self.total_order_at(floor).unwrap_or(first),
            });
        }
        Ok(())
    }

    pub fn topic_slot(&self) -> u32 {
        self.topic
    }

    /// Next delivery index (batch) this subscriber will read.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Delivers every message of up to `max_batches` ordered batches to `f`, in total order.
    /// Returns the number of messages delivered (0 when nothing new is ordered yet).
    pub fn poll(
        &mut self,
        max_batches: usize,
        mut f: impl FnMut(&Message<'_>),
    ) -> PoolResult<usize> {
        let delivered = self.c.observe(&self.st.delivered);
        let mut n = 0;
        for _ in 0..max_batches {
            if self.next >= delivered {
                break;
            }
            let d = self.next;
            let e = entry(self.st, d);
            self.c.invalidate(e);
            let stamp = self.c.observe(&e.stamp);
            if stamp != d + 1 {
                return Err(PoolError::OutOfRange {
                    what: "subscriber total order (its delivery entry was overwritten: this \
                           subscriber fell a ring behind; a later batch starts at the limit)",
                    value: self.next_total.unwrap_or(0),
                    limit: e.total_order.load(Relaxed),
                });
            }
            let (first, num_msg) = (e.total_order.load(Relaxed), e.num_msg.load(Relaxed));
            let (client_id, batch_seq) = (e.client_id.load(Relaxed), e.batch_seq.load(Relaxed));
            let (log_idx, total) = (e.log_idx.load(Relaxed), e.total_size.load(Relaxed));
            let broker = e.broker.load(Relaxed);
            // Past a broker's retention limit, its log space may be reclaimed before this
            // subscriber read it: then this is an error, never reused bytes.
            self.check_retained(broker, d, first)?;
            let batch = BatchDesc {
                batch_seq,
                client_id,
                num_msg,
                total_size: total,
                log_idx,
                ..BatchDesc::default()
            };
            let unreadable = |reason| PoolError::UnreadableBatch {
                first,
                end: first + u64::from(num_msg),
                client_id,
                batch_seq,
                reason,
            };
            let messages = Messages::check_all(self.pool, self.c, &batch).map_err(unreadable)?;
            for m in messages.iter().skip(self.skip as usize) {
                let m = m.map_err(unreadable)?;
                f(&Message {
                    total_order: first + u64::from(m.index),
                    client_id,
                    batch_seq,
                    index: m.index,
                    num_msg,
                    payload: m.payload,
                });
                n += 1;
            }
            // The broker announces a reclaim a grace period before it frees the space; a
            // reader that took longer than that may have read reused bytes, and says so.
            self.check_retained(broker, d, first)?;
            self.skip = 0;
            self.next = d + 1;
            self.next_total = Some(first + u64::from(num_msg));
            self.c.publish(&self.cursor.position, self.next);
        }
        Ok(n)
    }
}

impl<C: Coherence> Drop for Subscriber<'_, C> {
    fn drop(&mut self) {
        let s = self.cursor.state.load(Relaxed);
        self.c.publish(&self.cursor.state, s & !0xff);
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

/// Whether process `pid` exists (a registered subscriber whose process died holds nothing).
pub fn pid_alive(pid: u64) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    pid > 0 && embar_sys::process::alive(pid)
}
