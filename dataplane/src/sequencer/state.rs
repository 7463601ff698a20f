//! The part of the sequencer that lives in the pool ([`SequencerState`]): its epoch, the next
//! total-order number, and the per-client table. Written by the sequencer only, once per
//! polling round (never per message).
//!
//! Commit protocol (see `driver`), per polling round: (1) for each ordered batch, stamp the
//! ring slot's `total_order` and `ordered` (the commit point) and record the counters here;
//! (2) fence, then [`PoolState::save`] the counters; (3) publish the ring watermarks. A crash
//! before (3) leaves the round's slots unfinished, so a restarted sequencer reads them again:
//! committed ones are replayed (the counters are brought past them), the rest ordered anew.
//! The counters are never saved behind a published watermark, so nothing is lost, and never
//! ahead of a commit, so no range is handed out twice.
//!
//! The client table is open addressing on the client id, but it is always read through a
//! complete in-memory index (`index`, rebuilt by [`PoolState::load`]), never probed for a
//! lookup; so an entry is freed by zeroing its key ([`PoolState::forget`]) with no tombstone.
//! A reclaimed entry is written back at the next save; a sequencer killed before that finds
//! the client again at restart and reclaims it again.

use std::collections::HashMap;

use crate::pool::coherence::Coherence;
use crate::pool::doorbell::Bell;
use crate::pool::layout::{SequencerState, SEQUENCER_CLIENTS_MAX};
use crate::sync::Ordering::Relaxed;

const FENCED: u64 = 1;

/// What can go wrong with the sequencer's state in the pool.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The core bounds its clients to the table, so this is a bug, reported, not ignored.
    #[error("sequencer client table full ({0} entries)")]
    ClientTableFull(usize),
}

/// A sequencer's handle on its topic's state in the pool.
#[derive(Debug)]
pub struct PoolState<'p, C: Coherence> {
    st: &'p SequencerState,
    c: C,
    epoch: u64,
    /// client id -> entry index, so the table is probed once per client, not per batch.
    index: HashMap<u64, usize>,
    /// Entries changed since the last [`save`](Self::save), and the unsaved counters.
    dirty: Vec<usize>,
    next_global: u64,
    duplicates: u64,
    unsaved: bool,
    /// New delivery entries were published: parked subscribers are rung at the start of the
    /// next round (after the broker that runs this sequencer has acked the batches, so the
    /// wake-up's system call does not delay their acks).
    ring_pending: bool,
    /// Per subscriber entry: the state word it had when its process was found gone.
    dead_subscribers: [Option<u64>; crate::pool::layout::SUBSCRIBERS_MAX],
    last_pid_check: Option<std::time::Instant>,
}

/// How often subscriber processes are checked for liveness.
const PID_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

fn home(client_id: u64) -> usize {
    // Fibonacci hashing spreads consecutive client ids.
    (client_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % SEQUENCER_CLIENTS_MAX
}

impl<'p, C: Coherence> PoolState<'p, C> {
    /// Takes over the topic's sequencer state: raises the epoch, so an older instance that is
    /// still running sees it and stops.
    pub fn attach(st: &'p SequencerState, c: C) -> PoolState<'p, C> {
        let epoch = c.observe(&st.epoch) + 1;
        c.publish(&st.epoch, epoch);
        PoolState {
            st,
            c,
            epoch,
            index: HashMap::new(),
            dirty: Vec::new(),
            next_global: st.next_global.load(Relaxed),
            duplicates: st.duplicates.load(Relaxed),
            unsaved: false,
            ring_pending: false,
            dead_subscribers: [None; crate::pool::layout::SUBSCRIBERS_MAX],
            last_pid_check: None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a newer sequencer has taken over.
    pub fn superseded(&self) -> bool {
        self.c.observe(&self.st.epoch) != self.epoch
    }

    pub fn doorbell(&self) -> &'p crate::sync::AtomicU32 {
        &self.st.doorbell
    }

    /// The saved next delivery index.
    pub fn next_delivery(&self) -> u64 {
        self.c.observe(&self.st.next_delivery)
    }

    /// Saved next total-order number and the client table: `(client, next_expected, fenced)`.
    pub fn load(&mut self) -> (u64, Vec<(u64, u64, bool)>) {
        self.c.invalidate(&self.st.epoch);
        let next_global = self.c.observe(&self.st.next_global);
        let mut clients = Vec::new();
        self.c.invalidate(&self.st.clients);
        for (i, e) in self.st.clients.iter().enumerate() {
            let key = e.client_key.load(Relaxed);
            if key != 0 {
                let id = key - 1;
                self.index.insert(id, i);
                clients.push((
                    id,
                    e.next_expected.load(Relaxed),
                    e.flags.load(Relaxed) & FENCED != 0,
                ));
            }
        }
        (next_global, clients)
    }

    fn entry(&mut self, client_id: u64) -> Option<usize> {
        if let Some(&i) = self.index.get(&client_id) {
            return Some(i);
        }
        let start = home(client_id);
        for k in 0..SEQUENCER_CLIENTS_MAX {
            let i = (start + k) % SEQUENCER_CLIENTS_MAX;
            let e = &self.st.clients[i];
            if e.client_key.load(Relaxed) == 0 {
                e.next_expected.store(0, Relaxed);
                e.flags.store(0, Relaxed);
                e.client_key.store(client_id + 1, Relaxed);
                self.index.insert(client_id, i);
                return Some(i);
            }
        }
        None
    }

    /// Records the effect of one ordered batch; [`save`](Self::save) makes it durable. The
    /// core bounds clients to the table's size, so a full table here is a bug; it is reported
    /// rather than ignored.
    pub fn record_order(
        &mut self,
        client_id: u64,
        batch_seq: u64,
        next_global: u64,
    ) -> Result<(), StateError> {
        let i = self
            .entry(client_id)
            .ok_or(StateError::ClientTableFull(SEQUENCER_CLIENTS_MAX))?;
        self.st.clients[i]
            .next_expected
            .store(batch_seq + 1, Relaxed);
        if self.dirty.last() != Some(&i) {
            self.dirty.push(i);
        }
        self.record_global(next_global);
        Ok(())
    }

    /// Records the global counter alone (ORDER 2, no client table).
    pub fn record_global(&mut self, next_global: u64) {
        self.next_global = next_global;
        self.unsaved = true;
    }

    pub fn record_duplicate(&mut self) {
        self.duplicates += 1;
        self.unsaved = true;
    }

    /// Writes back every recorded change and publishes the counters, then lets subscribers
    /// read delivery entries below `next_delivery`: after it returns, a restarted sequencer
    /// finds them. Callers save before publishing ring watermarks.
    pub fn save(&mut self, next_delivery: u64) {
        if !self.unsaved && self.dirty.is_empty() {
            return;
        }
        for &i in &self.dirty {
            self.c.writeback(&self.st.clients[i]);
        }
        self.dirty.clear();
        self.st.duplicates.store(self.duplicates, Relaxed);
        self.st.next_global.store(self.next_global, Relaxed);
        self.c.publish(&self.st.next_delivery, next_delivery);
        self.c.publish(&self.st.delivered, next_delivery);
        self.ring_pending = true;
        self.unsaved = false;
    }

    /// Rings the subscribers parked on the topic's doorbell if delivery entries were
    /// published since the last call.
    pub fn ring_if_pending(&mut self) {
        if std::mem::take(&mut self.ring_pending) {
            subscriber_bell(self.st).ring();
        }
    }

    /// The lowest position of any active subscriber, if one is registered.
    pub fn slowest_subscriber(&mut self) -> Option<u64> {
        // A subscriber whose process is gone holds nothing; liveness is looked up at most
        // every PID_CHECK (a syscall per subscriber), not every round.
        let now = std::time::Instant::now();
        let check = self
            .last_pid_check
            .is_none_or(|t| now.duration_since(t) > PID_CHECK);
        if check {
            self.last_pid_check = Some(now);
        }
        let dead = &mut self.dead_subscribers;
        crate::client::subscriber::slowest_position(self.st, self.c, |i, state, e| {
            if check || dead[i].is_some_and(|s| s != state) {
                let alive = crate::client::subscriber::pid_alive(e.pid.load(Relaxed));
                dead[i] = (!alive).then_some(state);
            }
            dead[i] != Some(state)
        })
    }

    pub fn delivery(&self) -> &'p [crate::pool::layout::DeliveryEntry] {
        &self.st.delivery
    }

    /// Records that a tracked client is fenced (the core fences only clients it tracks, so
    /// the entry exists or there is room for it).
    pub fn save_fence(&mut self, client_id: u64) -> Result<(), StateError> {
        let i = self
            .entry(client_id)
            .ok_or(StateError::ClientTableFull(SEQUENCER_CLIENTS_MAX))?;
        let e = &self.st.clients[i];
        e.flags.store(FENCED, Relaxed);
        self.c.writeback(e);
        self.c
            .publish(&self.st.fences, self.st.fences.load(Relaxed) + 1);
        Ok(())
    }

    /// Frees the entry of a client the core has forgotten (see the module docs); written back
    /// at the next [`save`](Self::save).
    pub fn forget(&mut self, client_id: u64) {
        let Some(i) = self.index.remove(&client_id) else {
            return;
        };
        let e = &self.st.clients[i];
        e.client_key.store(0, Relaxed);
        e.next_expected.store(0, Relaxed);
        e.flags.store(0, Relaxed);
        self.dirty.push(i);
    }

    /// Entries in use (clients the table holds).
    pub fn clients_in_use(&self) -> usize {
        self.index.len()
    }

    pub fn count_duplicate(&self) {
        self.c
            .publish(&self.st.duplicates, self.st.duplicates.load(Relaxed) + 1);
    }
}

impl crate::pool::Pool {
    /// What topic slot `topic`'s sequencer saved of client `client_id` (ORDER 4 and 5):
    /// `(next_expected batch_seq, fenced)`, or `None` when the table has no entry for it.
    /// Every `batch_seq` below `next_expected` was ordered: the saved value never runs ahead
    /// of what was ordered (it is written back per round, after the ordering). The entry is
    /// read between two loads of its key, so an entry freed and taken by another client
    /// meanwhile is not taken for this one's (a freed entry's `next_expected` is cleared
    /// before its key is set again).
    pub fn client_progress<C: Coherence>(
        &self,
        c: C,
        topic: u32,
        client_id: u64,
    ) -> Option<(u64, bool)> {
        use crate::sync::Ordering::Acquire;
        let st = self.sequencer_state(topic);
        let start = home(client_id);
        for k in 0..SEQUENCER_CLIENTS_MAX {
            let e = &st.clients[(start + k) % SEQUENCER_CLIENTS_MAX];
            c.invalidate(e);
            let key = e.client_key.load(Acquire);
            if key == 0 {
                return None;
            }
            if key != client_id + 1 {
                continue;
            }
            let next_expected = e.next_expected.load(Acquire);
            let fenced = e.flags.load(Acquire) & FENCED != 0;
            return (e.client_key.load(Acquire) == key).then_some((next_expected, fenced));
        }
        None
    }

    /// Entries of topic slot `topic`'s sequencer client table in use (ORDER 4 and 5 track
    /// their publishers there), read from the pool: for status and tests. Panics if `topic`
    /// is out of range, as [`sequencer_state`](crate::pool::Pool::sequencer_state) does.
    pub fn sequencer_clients_in_use<C: Coherence>(&self, c: C, topic: u32) -> usize {
        let st = self.sequencer_state(topic);
        c.invalidate(&st.clients);
        st.clients
            .iter()
            .filter(|e| e.client_key.load(Relaxed) != 0)
            .count()
    }
}

/// The doorbell a topic's subscribers park on; the sequencer rings it after publishing new
/// delivery entries.
pub fn subscriber_bell(st: &SequencerState) -> Bell<'_> {
    Bell::new(&st.subscriber_bell, &st.subscribers_parked)
}

/// The doorbell a topic's sequencer running alone parks on; a broker rings it after
/// publishing batches into the topic's rings.
pub fn sequencer_bell(st: &SequencerState) -> Bell<'_> {
    Bell::new(&st.doorbell, &st.sequencer_parked)
}
