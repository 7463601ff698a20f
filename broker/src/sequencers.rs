//! The sequencers of every topic of the pool, for the broker that runs them: topics are
//! added as they appear and dropped when deleted. Polled from the broker's own loop (run to
//! completion, on hosts with few cores) or from a thread of their own ([`sequence_all`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use embar_dataplane::idle::{Idle, IdlePolicy};
use embar_dataplane::log_limit::LogLimit;
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::Pool;
use embar_dataplane::sequencer::driver::{DriverConfig, Sequencer, SequencerError};

/// How often the sequencers look for new topics.
const TOPIC_SCAN: Duration = Duration::from_millis(100);

/// See the module docs.
pub struct TopicSequencers<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    seqs: HashMap<u32, (u64, Sequencer<'p, C>)>,
    /// Topics (slot, generation) a newer sequencer took over: not taken back, or two
    /// sequencers would take turns raising the epoch.
    superseded: Vec<(u32, u64)>,
    last_scan: Option<Instant>,
    /// A topic that cannot be sequenced is retried every scan; said at most every 10 s.
    start_failed: LogLimit,
}

impl<'p, C: Coherence> TopicSequencers<'p, C> {
    pub fn new(pool: &'p Pool, c: C) -> Self {
        TopicSequencers {
            pool,
            c,
            seqs: HashMap::new(),
            superseded: Vec::new(),
            last_scan: None,
            start_failed: LogLimit::default(),
        }
    }

    /// Topics being sequenced.
    pub fn topics(&self) -> usize {
        self.seqs.len()
    }

    /// One round: looks for new or deleted topics (every 100 ms), then polls each sequencer.
    /// Returns the work done (0 when idle).
    pub fn poll_once(&mut self) -> usize {
        if self.last_scan.is_none_or(|t| t.elapsed() > TOPIC_SCAN) {
            self.last_scan = Some(Instant::now());
            self.scan();
        }
        let mut work = 0;
        let mut failed = Vec::new();
        for (slot, (gen, s)) in self.seqs.iter_mut() {
            match s.poll_once() {
                Ok(n) => work += n,
                Err(e @ SequencerError::TopicGone(_)) => {
                    log::info!("{e}; its sequencer stops");
                    failed.push(*slot);
                }
                Err(e @ SequencerError::Superseded(_)) => {
                    log::warn!("topic slot {slot}: {e}; this one stops");
                    self.superseded.push((*slot, *gen));
                    failed.push(*slot);
                }
                Err(e) => {
                    log::error!("sequencer of topic slot {slot}: {e}");
                    failed.push(*slot);
                }
            }
        }
        for slot in failed {
            self.seqs.remove(&slot);
        }
        work
    }

    fn scan(&mut self) {
        let topics = self.pool.list_topics(self.c);
        self.seqs.retain(|slot, (gen, _)| {
            topics
                .iter()
                .any(|t| t.slot == *slot && t.generation == *gen)
        });
        for t in topics {
            if self.seqs.contains_key(&t.slot) || self.superseded.contains(&(t.slot, t.generation))
            {
                continue;
            }
            let brokers = self.pool.geometry().max_brokers;
            match Sequencer::start(self.pool, self.c, t.slot, brokers, DriverConfig::default()) {
                Ok(s) => {
                    log::info!("sequencing topic {:?} (epoch {})", t.name, s.epoch());
                    self.seqs.insert(t.slot, (t.generation, s));
                }
                Err(e) => embar_dataplane::warn_limited!(
                    self.start_failed,
                    embar_sys::clock::monotonic_ns(),
                    "cannot sequence topic {:?}: {e}",
                    t.name
                ),
            }
        }
    }
}

/// The sequencers on a thread of their own, until either flag is set (the broker stops, or
/// the sequencer moves elsewhere).
pub fn sequence_all<C: Coherence>(pool: &Pool, c: C, stops: [&AtomicBool; 2], pin: Option<usize>) {
    if let Some(cpu) = pin {
        if let Err(e) = embar_sys::cpu::pin_current_thread(cpu) {
            log::warn!("{e}; sequencer running unpinned");
        }
    }
    let mut seqs = TopicSequencers::new(pool, c);
    let mut idle = Idle::new(IdlePolicy::default());
    while !stops.iter().any(|s| s.load(Ordering::Relaxed)) {
        idle.after(seqs.poll_once(), std::thread::sleep);
    }
}
