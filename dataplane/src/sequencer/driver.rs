//! The sequencer's polling loop: reads every broker's ring of one topic, feeds the
//! [`SequencerCore`], and carries out its actions in the pool.
//!
//! One loop does everything (run to completion), so that on a host with few cores the
//! sequencer is one thread; when a round finds nothing it spins, then yields, then parks on
//! the topic's doorbell word with a timeout (a futex works across processes), each with a
//! named bound ([`IdlePolicy`], shared with the broker's loop).
//!
//! Under ORDER 4 and 5 the loop also reclaims client-table entries of publishers whose
//! sessions ended (see `core` and docs/sequencer.md): every [`RECLAIM_SWEEP`] (sooner when the
//! table is nearly full) it reads which clients have a live session in the pool, settles the
//! previous proposal against the rings' consumed counts, and proposes anew with the rings'
//! written counts read after the liveness.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;

use embar_sys::clock::monotonic_ns;

use super::core::{
    Action, DropReason, Landed, Limits, OrderLevel, OrderLevelError, Resume, SequencerCore,
};
use super::state::{PoolState, StateError};
use crate::batch::{BatchDesc, BatchLimits};
use crate::idle::{Idle, IdlePolicy};
use crate::log_limit::LogLimit;
use crate::messages::Messages;
use crate::pool::coherence::Coherence;
use crate::pool::doorbell::Park;
use crate::pool::layout::{
    DELIVERY_SLOTS, OUTCOME_DUPLICATE, OUTCOME_FENCED, OUTCOME_ORDERED, OUTCOME_REJECTED,
    OUTCOME_TABLE_FULL,
};
use crate::pool::Pool;
use crate::ring::{Polled, RingConsumer, RingError};
use crate::sequencer::state::sequencer_bell;
use crate::sync::Ordering::Relaxed;
use crate::PoolError;

/// How often client-table entries of ended sessions are looked for (ORDER 4 and 5): a sweep
/// reads every session word of the pool, so it is not done every round.
pub const RECLAIM_SWEEP_NS: u64 = 100_000_000;
/// The sweep interval when the table is nearly full or refused a client.
pub const RECLAIM_SWEEP_PRESSED_NS: u64 = 2_000_000;
/// The table counts as nearly full from this fraction (1/n) of free entries down.
const TABLE_PRESSED_FREE_BELOW: usize = 8;
/// At most one warning per this interval about batches dropped for a full table.
const TABLE_FULL_LOG: std::time::Duration = std::time::Duration::from_secs(1);

/// The driver's warnings that a publisher can make repeat, each rate-limited.
#[derive(Debug)]
struct Logs {
    table_full: LogLimit,
    rejected: LogLimit,
    fenced: LogLimit,
}

impl Default for Logs {
    fn default() -> Self {
        Logs {
            table_full: LogLimit::new(TABLE_FULL_LOG),
            rejected: LogLimit::default(),
            fenced: LogLimit::default(),
        }
    }
}

/// Longest park of a sequencer that runs alone (`run`) when idle: the brokers ring it when
/// they publish batches; its own timers (holds, client sweeps) wait at most this long.
const PARK_MAX: std::time::Duration = std::time::Duration::from_millis(5);

#[derive(Clone, Copy, Debug)]
pub struct DriverConfig {
    pub limits: Limits,
    pub idle: IdlePolicy,
    /// Pin the polling thread to this CPU.
    pub pin_cpu: Option<usize>,
    /// Reclaim client-table entries of clients with no live session (ORDER 4 and 5; on by
    /// default). Off only for ring writers that bypass sessions (test tools, benches): their
    /// clients never look live, so one that paused and then resent could be taken for new.
    pub client_reclaim: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            limits: Limits::default(),
            idle: IdlePolicy::default(),
            pin_cpu: None,
            client_reclaim: true,
        }
    }
}

/// Why the sequencer stopped.
#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    #[error("fenced: a newer sequencer (epoch above {0}) took over this topic")]
    Superseded(u64),
    #[error("topic slot {0} was deleted (or deleted and created again)")]
    TopicGone(u32),
    #[error("no topic in slot {0}")]
    NoTopic(u32),
    #[error("{brokers} brokers: the pool has room for 1..={max}")]
    Brokers { brokers: u32, max: u32 },
    #[error(transparent)]
    Level(#[from] OrderLevelError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Counters of the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    pub batches: u64,
    pub rejected: u64,
    pub replayed: u64,
    /// Reclaim sweeps run.
    pub sweeps: u64,
}

/// The sequencer of one topic.
#[derive(Debug)]
pub struct Sequencer<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    topic: u32,
    core: SequencerCore,
    rings: Vec<RingConsumer<'p, C>>,
    /// The descriptor of each taken slot, by ring and `index % ring_slots`.
    descs: Vec<Vec<BatchDesc>>,
    state: PoolState<'p, C>,
    actions: Vec<Action>,
    idle: IdlePolicy,
    pin_cpu: Option<usize>,
    client_reclaim: bool,
    hold_tick_ns: u64,
    last_tick_ns: u64,
    /// Messages ordered per broker this round, published at its end.
    ordered_unsaved: Vec<u64>,
    /// Next delivery-ring index to write.
    next_delivery: u64,
    /// Slots taken from one ring per round.
    burst: usize,
    /// Generation of the topic slot when this sequencer started.
    generation: u64,
    stats: DriverStats,
    last_sweep_ns: u64,
    /// The table is nearly full or refused a client: sweep at the pressed interval.
    sweep_pressed: bool,
    /// Clients with a live session, refilled by each sweep.
    live: HashSet<u64>,
    reclaimed: Vec<u64>,
    logs: Logs,
}

impl<'p, C: Coherence> Sequencer<'p, C> {
    /// Takes over ordering of topic slot `topic` over brokers `0..brokers`, recovering from the
    /// pool: committed but unfinished slots are replayed, the rest is ordered anew.
    pub fn start(
        pool: &'p Pool,
        c: C,
        topic: u32,
        brokers: u32,
        cfg: DriverConfig,
    ) -> Result<Self, SequencerError> {
        let info = pool
            .read_topic(c, topic)
            .ok_or(SequencerError::NoTopic(topic))?;
        let order = OrderLevel::from_level(info.config.order)?;
        if brokers == 0 || brokers > pool.geometry().max_brokers {
            return Err(SequencerError::Brokers {
                brokers,
                max: pool.geometry().max_brokers,
            });
        }
        let mut state = PoolState::attach(pool.sequencer_state(topic), c);
        let (next_global, clients) = state.load();
        let next_delivery = state.next_delivery();
        let tinode = pool.tinode(topic);
        let per_broker_next = (0..brokers as usize)
            .map(|b| c.observe(&tinode.brokers[b].sequencer.ordered))
            .collect();
        let mut limits = cfg.limits;
        limits.clients_max = limits
            .clients_max
            .min(crate::pool::layout::SEQUENCER_CLIENTS_MAX);
        let core = SequencerCore::resume(
            order,
            limits,
            Resume {
                next_global,
                per_broker_next,
                clients,
            },
        );
        let slots = pool.geometry().ring_slots as usize;
        let mut rings = Vec::with_capacity(brokers as usize);
        for b in 0..brokers {
            let ring = pool.ring(topic, b)?;
            rings.push(RingConsumer::new(
                ring,
                c,
                BatchLimits::new(*pool.geometry(), b),
            ));
        }
        let mut s = Sequencer {
            pool,
            c,
            topic,
            core,
            rings,
            descs: vec![vec![BatchDesc::default(); slots]; brokers as usize],
            state,
            actions: Vec::with_capacity(64),
            idle: cfg.idle,
            pin_cpu: cfg.pin_cpu,
            client_reclaim: cfg.client_reclaim,
            hold_tick_ns: (cfg.limits.hold_timeout_ns / 10).clamp(100_000, 100_000_000),
            last_tick_ns: 0,
            ordered_unsaved: vec![0; brokers as usize],
            next_delivery: 0,
            // Sized as when a client could hold 256 batches: the hold bound rose for
            // failovers, the per-round burst did not need to.
            burst: (256 / (2 * brokers as usize)).clamp(1, 64),
            generation: info.generation,
            stats: DriverStats::default(),
            last_sweep_ns: 0,
            sweep_pressed: false,
            live: HashSet::new(),
            reclaimed: Vec::new(),
            logs: Logs::default(),
        };
        s.next_delivery = next_delivery;
        s.recover()?;
        Ok(s)
    }

    pub fn epoch(&self) -> u64 {
        self.state.epoch()
    }

    pub fn core(&self) -> &SequencerCore {
        &self.core
    }

    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Takes every published slot; replays the committed ones, then orders the others in
    /// ring order.
    fn recover(&mut self) -> Result<(), SequencerError> {
        let mut fresh = Vec::new();
        let mut committed = Vec::new();
        // Take the rings' backlogs in turn, one slot from each, so that a client whose
        // batches are striped over brokers arrives interleaved (as it would have live), not
        // one broker's whole backlog first (which would fill its hold buffer).
        let mut open: Vec<usize> = (0..self.rings.len()).collect();
        while !open.is_empty() {
            let mut still = Vec::with_capacity(open.len());
            for b in open {
                match self.rings[b].poll()? {
                    Some(Polled::Batch { index, desc }) => {
                        let landed = self.remember(b, index, desc);
                        match self.rings[b].committed_order(index) {
                            Some((first, d)) => committed.push((landed, first, d)),
                            None => fresh.push(landed),
                        }
                        still.push(b);
                    }
                    Some(Polled::Invalid { index, reason, .. }) => {
                        self.reject(b, index, &reason)?;
                        still.push(b);
                    }
                    None => {}
                }
            }
            open = still;
        }
        for (landed, first, d) in committed {
            self.core.replay_ordered(landed, first);
            self.next_delivery = self.next_delivery.max(d + 1);
            self.stats.replayed += 1;
            self.finish(landed)?;
        }
        let now = monotonic_ns();
        for landed in fresh {
            self.core.on_landed(landed, now, &mut self.actions);
            self.apply()?;
        }
        self.end_round();
        Ok(())
    }

    fn remember(&mut self, b: usize, index: u64, desc: BatchDesc) -> Landed {
        let mask = self.descs[b].len() as u64 - 1;
        self.descs[b][(index & mask) as usize] = desc;
        Landed {
            broker: b as u32,
            index,
            client_id: desc.client_id,
            batch_seq: desc.batch_seq,
            num_msg: desc.num_msg,
        }
    }

    fn reject(&mut self, b: usize, index: u64, reason: &str) -> Result<(), SequencerError> {
        crate::warn_limited!(
            self.logs.rejected,
            monotonic_ns(),
            "topic slot {} broker {b}: ring index {index} rejected: {reason}",
            self.topic
        );
        self.stats.rejected += 1;
        self.rings[b].decide_deferred(index, OUTCOME_REJECTED, u64::MAX, u64::MAX)?;
        Ok(self.rings[b].finish_deferred(index)?)
    }

    /// Finishes a slot; its watermark is published at the end of the round.
    fn finish(&mut self, l: Landed) -> Result<(), SequencerError> {
        Ok(self.rings[l.broker as usize].finish_deferred(l.index)?)
    }

    /// Closes a round: the slot commits reach memory, then the counters, then the watermarks
    /// (see `state` for why in that order).
    fn end_round(&mut self) {
        self.c.fence();
        self.state.save(self.next_delivery);
        let tinode = self.pool.tinode(self.topic);
        for (b, n) in self.ordered_unsaved.iter_mut().enumerate() {
            if *n > 0 {
                let region = &tinode.brokers[b].sequencer;
                self.c
                    .publish(&region.ordered, region.ordered.load(Relaxed) + *n);
                *n = 0;
            }
        }
        for r in &mut self.rings {
            r.publish_watermark();
        }
    }

    /// Stamps every message of the batch with its own total order (ORDER 4), through the
    /// checked view of its messages. The broker checked them before publishing the batch; a
    /// chain that no longer checks was changed since by its own publisher, which breaks the
    /// protocol: the batch stays ordered (its subscribers report it by total order), unstamped,
    /// and the sequencer goes on with every other batch.
    fn stamp_messages(&self, desc: &BatchDesc, first: u64) -> Result<(), SequencerError> {
        if let Err(e) = Messages::stamp_total_orders(self.pool, self.c, desc, first) {
            log::warn!(
                "topic slot {}: batch {} of client {} (total orders from {first}) not stamped: {e}",
                self.topic,
                desc.batch_seq,
                desc.client_id
            );
        }
        Ok(())
    }

    /// Carries out the core's actions, in order.
    fn apply(&mut self) -> Result<(), SequencerError> {
        let mut actions = std::mem::take(&mut self.actions);
        for a in actions.drain(..) {
            match a {
                Action::Order { batch, first } => {
                    let b = batch.broker as usize;
                    let mask = self.descs[b].len() as u64 - 1;
                    let desc = self.descs[b][(batch.index & mask) as usize];
                    if self.core.order() == OrderLevel::TotalFifoStamped {
                        self.stamp_messages(&desc, first)?;
                    }
                    let d = self.next_delivery;
                    self.write_delivery(d, &batch, &desc, first);
                    self.next_delivery = d + 1;
                    self.rings[b].decide_deferred(batch.index, OUTCOME_ORDERED, first, d)?;
                    let end = first + u64::from(batch.num_msg);
                    match self.core.order() {
                        OrderLevel::TotalFifo | OrderLevel::TotalFifoStamped => self
                            .state
                            .record_order(batch.client_id, batch.batch_seq, end)?,
                        OrderLevel::Total | OrderLevel::Unordered => self.state.record_global(end),
                        OrderLevel::PerBroker => self.state.record_global(self.core.next_global()),
                    }
                    self.pool.tinode(self.topic).brokers[b]
                        .sequencer
                        .ordered_offset
                        .store(desc.log_idx, Relaxed);
                    self.ordered_unsaved[b] += u64::from(batch.num_msg);
                    self.stats.batches += 1;
                    self.finish(batch)?;
                }
                Action::Drop { batch, why } => {
                    let outcome = match why {
                        DropReason::Duplicate => {
                            self.state.record_duplicate();
                            OUTCOME_DUPLICATE
                        }
                        DropReason::Fenced => OUTCOME_FENCED,
                        DropReason::ClientTableFull => {
                            self.table_full(batch.client_id);
                            OUTCOME_TABLE_FULL
                        }
                    };
                    self.rings[batch.broker as usize].decide_deferred(
                        batch.index,
                        outcome,
                        u64::MAX,
                        u64::MAX,
                    )?;
                    self.finish(batch)?;
                }
                Action::Fence {
                    client_id,
                    expected,
                    why,
                } => {
                    crate::warn_limited!(
                        self.logs.fenced,
                        monotonic_ns(),
                        "topic slot {}: client {client_id} fenced ({why:?}) waiting for batch {expected}",
                        self.topic
                    );
                    self.state.save_fence(client_id)?;
                }
            }
        }
        self.actions = actions;
        Ok(())
    }

    /// A batch of an untracked client was dropped for a full table: warns at most once per
    /// [`TABLE_FULL_LOG`], with the count since, and sweeps at once.
    fn table_full(&mut self, client_id: u64) {
        self.sweep_pressed = true;
        let tracked = self.core.clients_tracked();
        crate::warn_limited!(
            self.logs.table_full,
            monotonic_ns(),
            "topic slot {}: a batch of client {client_id}, which the sequencer does not track, dropped: its client table holds {tracked} live or unfinished publishers",
            self.topic
        );
    }

    /// Runs a reclaim sweep now rather than at its interval (ORDER 4 and 5; a no-op
    /// otherwise).
    pub fn reclaim_sweep(&mut self) -> Result<(), SequencerError> {
        if !self.client_reclaim || !self.core.order().per_client() {
            return Ok(());
        }
        self.sweep(monotonic_ns())
    }

    /// Reclaim sweep (see the module docs): settle the previous proposal, then propose anew.
    fn sweep(&mut self, now: u64) -> Result<(), SequencerError> {
        self.last_sweep_ns = now;
        self.stats.sweeps += 1;
        self.live.clear();
        crate::session::live_clients(self.pool, self.c, self.topic, &mut self.live)?;
        let consumed: Vec<u64> = self.rings.iter().map(|r| r.consumed()).collect();
        let live = &self.live;
        if self
            .core
            .reclaim_settle(|id| live.contains(&id), &consumed, &mut self.reclaimed)
        {
            // Read after the liveness: every batch of a client found not live lies below.
            let tinode = self.pool.tinode(self.topic);
            let written = (0..self.rings.len())
                .map(|b| self.c.observe(&tinode.brokers[b].broker.written))
                .collect();
            self.core.reclaim_propose(|id| live.contains(&id), written);
        }
        if !self.reclaimed.is_empty() {
            log::debug!(
                "topic slot {}: {} ended publisher(s) forgotten, {} tracked",
                self.topic,
                self.reclaimed.len(),
                self.core.clients_tracked()
            );
        }
        for id in self.reclaimed.drain(..) {
            self.state.forget(id);
        }
        let max = self.core.limits().clients_max;
        self.sweep_pressed = self.core.clients_tracked() + max / TABLE_PRESSED_FREE_BELOW >= max;
        Ok(())
    }

    /// Writes delivery entry `d` (its stamp last); subscribers read it once the round's
    /// `delivered` watermark covers it.
    fn write_delivery(&self, d: u64, batch: &Landed, desc: &BatchDesc, first: u64) {
        let e = &self.state.delivery()[(d % DELIVERY_SLOTS as u64) as usize];
        e.total_order.store(first, Relaxed);
        e.client_id.store(batch.client_id, Relaxed);
        e.batch_seq.store(batch.batch_seq, Relaxed);
        e.log_idx.store(desc.log_idx, Relaxed);
        e.total_size.store(desc.total_size, Relaxed);
        e.num_msg.store(batch.num_msg, Relaxed);
        e.broker.store(batch.broker, Relaxed);
        e.stamp.store(d + 1, crate::sync::Ordering::Release);
        self.c.writeback(e);
    }

    /// Delivery entries the sequencer may still write before it would overwrite one the
    /// slowest subscriber has not read.
    fn delivery_room(&mut self) -> u64 {
        match self.state.slowest_subscriber() {
            Some(pos) => (pos + DELIVERY_SLOTS as u64).saturating_sub(self.next_delivery),
            None => DELIVERY_SLOTS as u64,
        }
    }

    /// One round over every ring; returns how many slots it took.
    pub fn poll_once(&mut self) -> Result<usize, SequencerError> {
        // Subscribers parked since the last round's deliveries: woken now, once whoever
        // drives this sequencer has had a turn to ack those batches.
        self.state.ring_if_pending();
        let state = self.c.observe(&self.pool.tinode(self.topic).header.state);
        if state >> 8 != self.generation || state & 0xff != crate::pool::topics::STATE_ACTIVE {
            return Err(SequencerError::TopicGone(self.topic));
        }
        // A newer sequencer of this topic raised the epoch: stop before writing anything.
        if self.state.superseded() {
            return Err(SequencerError::Superseded(self.state.epoch()));
        }
        let mut work = 0;
        let now = monotonic_ns();
        // A round may order up to 64 batches per ring plus every held batch: if the delivery
        // ring cannot take that many, wait for subscribers (backpressure up to publishers).
        let round_max =
            self.burst as u64 * self.rings.len() as u64 + self.core.stats().held_now + 1;
        let rings = if self.delivery_room() >= round_max {
            self.rings.len()
        } else {
            0
        };
        for b in 0..rings {
            // A bounded burst per ring keeps the rounds fair between brokers, and small
            // enough that a client striped over every broker cannot fill its hold buffer
            // from the rings visited before the one with its next batch.
            for _ in 0..self.burst {
                match self.rings[b].poll()? {
                    Some(Polled::Batch { index, desc }) => {
                        let landed = self.remember(b, index, desc);
                        self.core.on_landed(landed, now, &mut self.actions);
                        self.apply()?;
                        work += 1;
                    }
                    Some(Polled::Invalid { index, reason, .. }) => {
                        self.reject(b, index, &reason)?;
                        work += 1;
                    }
                    None => break,
                }
            }
        }
        if now.saturating_sub(self.last_tick_ns) >= self.hold_tick_ns {
            self.last_tick_ns = now;
            self.core.on_tick(now, &mut self.actions);
            self.apply()?;
        }
        self.end_round();
        // After the round's watermarks are published: a client forgotten here has no batch
        // above them, so a restart never replays one of its batches.
        let interval = if self.sweep_pressed {
            RECLAIM_SWEEP_PRESSED_NS
        } else {
            RECLAIM_SWEEP_NS
        };
        if self.client_reclaim
            && self.core.order().per_client()
            && now.saturating_sub(self.last_sweep_ns) >= interval
        {
            self.sweep(now)?;
        }
        Ok(work)
    }

    /// Polls until `stop` is set or a newer sequencer takes over.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), SequencerError> {
        if let Some(cpu) = self.pin_cpu {
            if let Err(e) = embar_sys::cpu::pin_current_thread(cpu) {
                log::warn!("{e}; running unpinned");
            }
        }
        let mut idle = Idle::new(self.idle);
        let st = self.pool.sequencer_state(self.topic);
        while !stop.load(Relaxed) {
            let work = self.poll_once()?;
            let Some(rest) = idle.step(work) else {
                continue;
            };
            // Park on the topic's doorbell: announce it, then look once more (a batch published
            // before the announcement is found here; one after it finds the flag and rings).
            let park = Park::alone(sequencer_bell(st));
            let late = self.poll_once()?;
            if late == 0 {
                // Rung by the brokers when they publish; its own timers (holds, sweeps) wait
                // at most the bound.
                park.wait(rest.max(PARK_MAX));
            }
            drop(park);
            idle.step(late);
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::batch::BatchWriter;
    use crate::pool::coherence::Coherent;
    use crate::pool::geometry::PoolConfig;
    use crate::pool::layout::{MessageHeader, BATCH_HEADER_VERSION};
    use crate::pool::topics::TopicConfig;
    use crate::pool::CreateOptions;
    use crate::ring::RingProducer;

    struct TempPool(std::path::PathBuf);
    impl Drop for TempPool {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn setup(order: u8) -> (TempPool, Pool, u32) {
        // Tests run in parallel: one pool each.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/embar-test-driver-{order}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let cfg = PoolConfig {
            pool_bytes: 64 << 20,
            max_topics: 2,
            max_brokers: 2,
            ring_slots: 64,
            segment_bytes: 1 << 20,
        };
        let pool = Pool::create(&path, &cfg, &CreateOptions::default()).unwrap();
        let topic = TopicConfig {
            order,
            ack: 1,
            replication_factor: 0,
            batch_bytes: 64 << 10,
        };
        let slot = pool.create_topic(Coherent, "t", &topic).unwrap();
        (TempPool(path), pool, slot)
    }

    /// Publishes batch `seq` of `client` into broker `b`'s ring (two 64-byte messages).
    fn publish(pool: &Pool, topic: u32, b: u32, client: u64, seq: u64) {
        let mut p = RingProducer::new(pool.ring(topic, b).unwrap(), Coherent);
        let base = pool.geometry().segment_offset(b as u64);
        let d = BatchDesc {
            batch_seq: seq,
            client_id: client,
            num_msg: 2,
            broker_id: b,
            total_size: 128,
            log_idx: base + 128 * (p.next_index() % 64),
            start_logical_offset: 0,
            version_flags: u64::from(BATCH_HEADER_VERSION),
        };
        p.try_publish(&d).unwrap();
    }

    fn drain(s: &mut Sequencer<'_, Coherent>) {
        while s.poll_once().unwrap() > 0 {}
    }

    /// `(first, broker, index)` of every ordered slot, sorted by first.
    fn ordered_slots(pool: &Pool, topic: u32) -> Vec<(u64, u32, u64)> {
        let mut v = Vec::new();
        for b in 0..2u32 {
            let written = pool.tinode(topic).brokers[b as usize]
                .broker
                .written
                .load(Relaxed);
            for (i, slot) in pool
                .ring_slots(topic, b)
                .unwrap()
                .iter()
                .enumerate()
                .take(written as usize)
            {
                if slot.ordered.load(Relaxed) == i as u64 + 1
                    && slot.outcome.load(Relaxed) == OUTCOME_ORDERED
                {
                    v.push((slot.total_order.load(Relaxed), b, i as u64));
                }
            }
        }
        v.sort();
        v
    }

    #[test]
    fn a_parked_sequencer_is_woken_by_a_broker_that_published() {
        use std::time::{Duration, Instant};
        let (_t, pool, topic) = setup(5);
        let st = pool.sequencer_state(topic);
        // Parks for a minute unless rung: only the ring can wake it within the test's bound.
        let cfg = DriverConfig {
            idle: IdlePolicy {
                spin_rounds: 1,
                yield_for: Duration::ZERO,
                rest: Duration::from_secs(60),
            },
            ..DriverConfig::default()
        };
        let mut seq = Sequencer::start(&pool, Coherent, topic, 2, cfg).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let runner = s.spawn(|| seq.run(&stop));
            let deadline = Instant::now() + Duration::from_secs(10);
            while st.sequencer_parked.load(Relaxed) == 0 {
                assert!(Instant::now() < deadline, "the sequencer never parked");
                std::thread::yield_now();
            }
            publish(&pool, topic, 0, 1, 0);
            sequencer_bell(st).ring();
            while ordered_slots(&pool, topic).is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "the rung sequencer did not order the batch"
                );
                std::thread::yield_now();
            }
            stop.store(true, Relaxed);
            // Parked again by now, or about to: the ring lets it see `stop`.
            while !runner.is_finished() {
                sequencer_bell(st).ring();
                assert!(
                    Instant::now() < deadline + Duration::from_secs(10),
                    "it did not stop"
                );
                std::thread::yield_now();
            }
            runner.join().unwrap().unwrap();
        });
    }

    #[test]
    fn a_parked_subscriber_is_woken_by_the_round_after_a_delivery() {
        use crate::client::subscriber::{StartAt, Subscriber};
        use std::time::Duration;
        let (_t, pool, topic) = setup(5);
        let st = pool.sequencer_state(topic);
        let mut seq = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        drain(&mut seq);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let sub = Subscriber::open(&pool, Coherent, "t", StartAt::Oldest).unwrap();
                let t0 = std::time::Instant::now();
                // Parks: nothing is ordered yet. The timeout is far beyond the test's bound.
                sub.wait_ordered(Duration::from_secs(60));
                let waited = t0.elapsed();
                // (This test's batches carry no messages to read: their delivery entry is
                // what the wait is for.)
                let here = Coherent.observe(&pool.sequencer_state(topic).delivered);
                (waited, here > sub.position())
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while st.subscribers_parked.load(Relaxed) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the subscriber never parked"
                );
                std::thread::yield_now();
            }
            publish(&pool, topic, 0, 1, 0);
            // The round that orders the batch publishes it; the next round rings.
            drain(&mut seq);
            let (waited, more) = waiter.join().unwrap();
            assert!(waited < Duration::from_secs(10), "woken after {waited:?}");
            assert!(more, "woken with the batch there to read");
        });
        // A subscriber with something to read does not park at all.
        let sub = Subscriber::open(&pool, Coherent, "t", StartAt::Oldest).unwrap();
        let t0 = std::time::Instant::now();
        sub.wait_ordered(Duration::from_secs(60));
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(st.subscribers_parked.load(Relaxed), 0);
    }

    #[test]
    fn a_crash_between_commit_and_saving_the_counter_is_replayed_not_reordered() {
        let (_t, pool, topic) = setup(5);
        // Client 1's batches alternate brokers; batch 1 arrives before batch 0.
        publish(&pool, topic, 1, 1, 1);
        publish(&pool, topic, 0, 1, 0);
        publish(&pool, topic, 0, 1, 2);
        let mut a = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        drain(&mut a);
        assert_eq!(a.core().next_global(), 6);
        drop(a);
        // Emulate a crash after the last batch (broker 0, index 1: first 4) was committed and
        // the client table saved, but before the global counter was saved and the slot
        // finished.
        let st = pool.sequencer_state(topic);
        st.next_global.store(4, Relaxed);
        pool.tinode(topic).brokers[0]
            .sequencer
            .ring_consumed
            .store(1, Relaxed);

        let mut b = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        assert_eq!(b.stats().replayed, 1);
        assert_eq!(
            b.core().next_global(),
            6,
            "the counter is rebuilt past the committed batch"
        );
        publish(&pool, topic, 1, 1, 3);
        drain(&mut b);
        let firsts: Vec<u64> = ordered_slots(&pool, topic).iter().map(|s| s.0).collect();
        assert_eq!(firsts, vec![0, 2, 4, 6], "no range handed out twice");
        assert_eq!(b.epoch(), 2);
    }

    #[test]
    fn an_older_sequencer_stops_when_a_newer_one_takes_over() {
        let (_t, pool, topic) = setup(2);
        let mut a = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        let _b = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        let stop = AtomicBool::new(false);
        let err = a.run(&stop).unwrap_err();
        assert!(matches!(err, SequencerError::Superseded(1)), "{err}");
    }

    #[test]
    fn order_4_stamps_each_message_and_order_1_counts_per_broker() {
        let (_t, pool, topic) = setup(4);
        for b in 0..2u32 {
            let base = pool.geometry().segment_offset(u64::from(b));
            // SAFETY: the start of a segment this test owns, bounds-checked by `data_ptr`.
            let mut w = unsafe { BatchWriter::new(pool.data_ptr(base, 128).unwrap(), 128) };
            let h = MessageHeader {
                client_id: 9,
                batch_seq: u64::from(b),
                ..Default::default()
            };
            for _ in 0..2 {
                w.append(&h, &[]).unwrap();
            }
        }
        publish(&pool, topic, 1, 9, 1);
        publish(&pool, topic, 0, 9, 0);
        let mut s = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        drain(&mut s);
        let stamps: Vec<u64> = (0..2u64)
            .flat_map(|b| {
                let desc = BatchDesc {
                    client_id: 9,
                    batch_seq: b,
                    num_msg: 2,
                    total_size: 128,
                    log_idx: pool.geometry().segment_offset(b),
                    ..BatchDesc::default()
                };
                let m = Messages::check(&pool, Coherent, &desc).unwrap();
                m.iter()
                    .map(|r| r.unwrap().header.total_order)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            stamps,
            vec![0, 1, 2, 3],
            "client 9's batch 0 (broker 0) first"
        );

        let (_t1, pool1, topic1) = setup(1);
        publish(&pool1, topic1, 0, 1, 0);
        publish(&pool1, topic1, 1, 2, 0);
        publish(&pool1, topic1, 0, 3, 0);
        let mut s1 =
            Sequencer::start(&pool1, Coherent, topic1, 2, DriverConfig::default()).unwrap();
        drain(&mut s1);
        let t = pool1.tinode(topic1);
        assert_eq!(t.brokers[0].sequencer.ordered.load(Relaxed), 4);
        assert_eq!(t.brokers[1].sequencer.ordered.load(Relaxed), 2);
    }

    /// Claims a session of `broker` for `client` on `topic`, as a publisher would.
    fn open_session(pool: &Pool, topic: u32, broker: u32, client: u64) -> (u32, u64) {
        let (_, i, gen) = crate::session::try_claim(
            pool,
            Coherent,
            broker,
            topic,
            client,
            embar_sys::process::ProcessId::current(),
        )
        .unwrap()
        .unwrap();
        (i, gen)
    }

    /// The broker's release of a session (after it drained the session's submissions).
    fn release_session(pool: &Pool, broker: u32, (i, gen): (u32, u64)) {
        let s = pool.session(broker, i).unwrap();
        s.accepted
            .store(gen << 8 | crate::session::RELEASED, Relaxed);
    }

    #[test]
    fn an_ended_publishers_entry_is_freed_in_the_pool_and_a_restart_keeps_the_live_ones() {
        let (_t, pool, topic) = setup(5);
        let _live = open_session(&pool, topic, 0, 1);
        let ended = open_session(&pool, topic, 1, 2);
        publish(&pool, topic, 0, 1, 0);
        publish(&pool, topic, 1, 2, 0);
        let mut a = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        drain(&mut a);
        assert_eq!(pool.sequencer_clients_in_use(Coherent, topic), 2);
        a.reclaim_sweep().unwrap();
        a.reclaim_sweep().unwrap();
        assert_eq!(
            pool.sequencer_clients_in_use(Coherent, topic),
            2,
            "both sessions are live"
        );
        release_session(&pool, 1, ended);
        a.reclaim_sweep().unwrap(); // settles the old proposal (nothing), proposes client 2
        assert_eq!(pool.sequencer_clients_in_use(Coherent, topic), 2);
        a.reclaim_sweep().unwrap(); // the rings are consumed past the proposal: forgotten
        assert_eq!(pool.sequencer_clients_in_use(Coherent, topic), 1);
        assert_eq!(a.core().next_expected(2), None);
        publish(&pool, topic, 0, 1, 1);
        drain(&mut a);
        drop(a);

        let mut b = Sequencer::start(&pool, Coherent, topic, 2, DriverConfig::default()).unwrap();
        assert_eq!(
            b.core().next_expected(1),
            Some(2),
            "the live client's FIFO survives"
        );
        assert_eq!(
            b.core().next_expected(2),
            None,
            "the reclaimed client stays forgotten"
        );
        // Its id coming back is a new client: batch 0 is ordered, once.
        publish(&pool, topic, 1, 2, 0);
        drain(&mut b);
        let firsts: Vec<u64> = ordered_slots(&pool, topic).iter().map(|s| s.0).collect();
        assert_eq!(firsts, vec![0, 2, 4, 6], "no range handed out twice");
    }

    #[test]
    fn a_publisher_refused_for_a_full_table_gets_its_own_outcome_and_ordering_goes_on() {
        let (_t, pool, topic) = setup(5);
        let cfg = DriverConfig {
            limits: Limits {
                clients_max: 1,
                ..Limits::default()
            },
            ..DriverConfig::default()
        };
        let _one = open_session(&pool, topic, 0, 1);
        let _two = open_session(&pool, topic, 1, 2);
        publish(&pool, topic, 0, 1, 0);
        publish(&pool, topic, 1, 2, 0);
        publish(&pool, topic, 1, 2, 1);
        publish(&pool, topic, 0, 1, 1);
        let mut s = Sequencer::start(&pool, Coherent, topic, 2, cfg).unwrap();
        for _ in 0..3 {
            drain(&mut s);
            s.reclaim_sweep().unwrap();
        }
        let slots = pool.ring_slots(topic, 1).unwrap();
        for slot in &slots[..2] {
            assert_eq!(slot.outcome.load(Relaxed), OUTCOME_TABLE_FULL);
        }
        assert_eq!(
            ordered_slots(&pool, topic).len(),
            2,
            "client 1's two batches"
        );
        assert_eq!(pool.sequencer_clients_in_use(Coherent, topic), 1);
        assert_eq!(
            pool.sequencer_state(topic).fences.load(Relaxed),
            0,
            "nobody fenced"
        );
        assert_eq!(s.core().stats().table_full_drops, 2);
    }
}
