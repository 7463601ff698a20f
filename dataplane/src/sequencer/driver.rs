//! The sequencer's polling loop: reads every broker's ring of one topic, feeds the
//! [`SequencerCore`], and carries out its actions in the pool.
//!
//! One loop does everything (run to completion), so that on a host with few cores the
//! sequencer is one thread; when a round finds nothing it spins, then yields, then parks on
//! the topic's doorbell word with a timeout (a futex works across processes), each with a
//! named bound ([`IdlePolicy`]).

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use embar_sys::clock::monotonic_ns;

use super::core::{Action, DropReason, Landed, Limits, OrderLevel, Resume, SequencerCore};
use super::state::PoolState;
use crate::batch::{BatchDesc, BatchLimits};
use crate::pool::coherence::Coherence;
use crate::pool::layout::{message_stride, MessageHeader, BATCH_MESSAGES_MAX};
use crate::pool::Pool;
use crate::ring::{Polled, RingConsumer};
use crate::sync::Ordering::Relaxed;

/// What a sequencer does when a round over the rings finds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdlePolicy {
    /// Empty rounds spent spinning.
    pub spin_rounds: u32,
    /// Further empty rounds spent yielding the core.
    pub yield_rounds: u32,
    /// After that, park on the doorbell for at most this long per round.
    pub park_timeout: Duration,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy {
            spin_rounds: 200,
            yield_rounds: 50,
            park_timeout: Duration::from_millis(1),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DriverConfig {
    pub limits: Limits,
    pub idle: IdlePolicy,
    /// Pin the polling thread to this CPU.
    pub pin_cpu: Option<usize>,
}

/// Why the sequencer stopped.
#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    #[error("fenced: a newer sequencer (epoch above {0}) took over this topic")]
    Superseded(u64),
    #[error("{0}")]
    Pool(String),
}

/// Counters of the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    pub batches: u64,
    pub rejected: u64,
    pub replayed: u64,
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
    hold_tick_ns: u64,
    last_tick_ns: u64,
    stats: DriverStats,
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
        let perr = |e: crate::PoolError| SequencerError::Pool(e.to_string());
        let info = pool
            .read_topic(c, topic)
            .ok_or_else(|| SequencerError::Pool(format!("no topic in slot {topic}")))?;
        let order = OrderLevel::from_level(info.config.order).map_err(SequencerError::Pool)?;
        if brokers == 0 || brokers > pool.geometry().max_brokers {
            return Err(SequencerError::Pool(format!(
                "{brokers} brokers: the pool has room for 1..={}",
                pool.geometry().max_brokers
            )));
        }
        let mut state = PoolState::attach(pool.sequencer_state(topic), c);
        let (next_global, clients) = state.load();
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
            let ring = pool.ring(topic, b).map_err(perr)?;
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
            hold_tick_ns: (cfg.limits.hold_timeout_ns / 10).clamp(100_000, 100_000_000),
            last_tick_ns: 0,
            stats: DriverStats::default(),
        };
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
        for b in 0..self.rings.len() {
            while let Some(p) = self.rings[b]
                .poll()
                .map_err(|e| SequencerError::Pool(e.to_string()))?
            {
                match p {
                    Polled::Batch { index, desc } => {
                        let landed = self.remember(b, index, desc);
                        match self.rings[b].committed_order(index) {
                            Some(first) => committed.push((landed, first)),
                            None => fresh.push(landed),
                        }
                    }
                    Polled::Invalid { index, reason, .. } => self.reject(b, index, &reason)?,
                }
            }
        }
        for (landed, first) in committed {
            self.core.replay_ordered(landed, first);
            self.stats.replayed += 1;
            self.finish(landed)?;
        }
        let now = monotonic_ns();
        for landed in fresh {
            self.core.on_landed(landed, now, &mut self.actions);
            self.apply()?;
        }
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
        log::warn!(
            "topic slot {} broker {b}: ring index {index} rejected: {reason}",
            self.topic
        );
        self.stats.rejected += 1;
        self.rings[b]
            .finish(index)
            .map_err(|e| SequencerError::Pool(e.to_string()))
    }

    fn finish(&mut self, l: Landed) -> Result<(), SequencerError> {
        self.rings[l.broker as usize]
            .finish(l.index)
            .map_err(|e| SequencerError::Pool(e.to_string()))
    }

    /// Stamps every message of the batch with its own total order (ORDER 4).
    fn stamp_messages(&self, desc: &BatchDesc, first: u64) -> Result<(), SequencerError> {
        let base = self
            .pool
            .data_ptr(desc.log_idx, desc.total_size)
            .map_err(|e| SequencerError::Pool(e.to_string()))?;
        // SAFETY: the batch range was bounds-checked; it is published and not yet finished, so
        // its writer is done with it and nobody else writes it.
        unsafe { self.c.invalidate_range(base, desc.total_size as usize) };
        let mut off = 0u64;
        for i in 0..u64::from(desc.num_msg.min(BATCH_MESSAGES_MAX)) {
            if off + 64 > desc.total_size {
                return Err(SequencerError::Pool(format!(
                    "batch at {} ends inside message {i}",
                    desc.log_idx
                )));
            }
            // SAFETY: `off + 64 <= total_size`, inside the checked range; 64-byte aligned as
            // every message starts at a multiple of 64.
            let h = unsafe { &mut *(base.add(off as usize) as *mut MessageHeader) };
            h.total_order = first + i;
            off += message_stride(u64::from(h.size));
        }
        // SAFETY: as above.
        unsafe { self.c.writeback_range(base, desc.total_size as usize) };
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
                    self.rings[b]
                        .set_order(batch.index, first)
                        .map_err(|e| SequencerError::Pool(e.to_string()))?;
                    let end = first + u64::from(batch.num_msg);
                    match self.core.order() {
                        OrderLevel::TotalFifo | OrderLevel::TotalFifoStamped => self
                            .state
                            .save_order(batch.client_id, batch.batch_seq, end)
                            .map_err(SequencerError::Pool)?,
                        OrderLevel::Total => self.state.save_global(end),
                        _ => {}
                    }
                    let region = &self.pool.tinode(self.topic).brokers[b].sequencer;
                    let ordered = region.ordered.load(Relaxed) + u64::from(batch.num_msg);
                    region.ordered_offset.store(desc.log_idx, Relaxed);
                    self.c.publish(&region.ordered, ordered);
                    self.stats.batches += 1;
                    self.finish(batch)?;
                }
                Action::Pass { batch } => {
                    self.stats.batches += 1;
                    self.finish(batch)?;
                }
                Action::Drop { batch, why } => {
                    if why == DropReason::Duplicate {
                        self.state.count_duplicate();
                    }
                    self.finish(batch)?;
                }
                Action::Fence {
                    client_id,
                    expected,
                    why,
                } => {
                    log::warn!(
                        "topic slot {}: client {client_id} fenced ({why:?}) waiting for batch {expected}",
                        self.topic
                    );
                    self.state
                        .save_fence(client_id)
                        .map_err(SequencerError::Pool)?;
                }
            }
        }
        self.actions = actions;
        Ok(())
    }

    /// One round over every ring; returns how many slots it took.
    pub fn poll_once(&mut self) -> Result<usize, SequencerError> {
        let mut work = 0;
        let now = monotonic_ns();
        for b in 0..self.rings.len() {
            // A bounded burst per ring keeps the rounds fair between brokers.
            for _ in 0..64 {
                match self.rings[b]
                    .poll()
                    .map_err(|e| SequencerError::Pool(e.to_string()))?
                {
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
        Ok(work)
    }

    /// Polls until `stop` is set or a newer sequencer takes over.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), SequencerError> {
        if let Some(cpu) = self.pin_cpu {
            if let Err(e) = embar_sys::cpu::pin_current_thread(cpu) {
                log::warn!("{e}; running unpinned");
            }
        }
        let mut idle_rounds = 0u32;
        while !stop.load(Relaxed) {
            if self.state.superseded() {
                return Err(SequencerError::Superseded(self.state.epoch()));
            }
            if self.poll_once()? > 0 {
                idle_rounds = 0;
                continue;
            }
            idle_rounds = idle_rounds.saturating_add(1);
            if idle_rounds <= self.idle.spin_rounds {
                std::hint::spin_loop();
            } else if idle_rounds <= self.idle.spin_rounds + self.idle.yield_rounds {
                std::thread::yield_now();
            } else {
                let bell = self.state.doorbell();
                let seen = bell.load(Relaxed);
                embar_sys::futex::wait(bell, seen, self.idle.park_timeout);
            }
        }
        Ok(())
    }
}
