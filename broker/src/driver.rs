//! The data path of one broker slot, driven by its caller: the broker's sessions and rings
//! (`embar_dataplane::broker::Broker`), the sequencers of every topic when this broker runs
//! them in its own loop, and the verbs frontend when it accepts RDMA publishers. One call of
//! [`Driver::poll_once`] is one round of all of them; the caller decides when to call it
//! again (a polling loop with an idle policy in [`crate::node`], a test's own loop).

use embar_control::metrics::{BrokerSnapshot, VerbsSnapshot};
use embar_dataplane::broker::Broker;
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::Pool;
use embar_dataplane::PoolError;

use crate::sequencers::TopicSequencers;

/// How a driver serves its slot.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriverOptions {
    /// Log space per topic kept for lagging subscribers (see `embar broker
    /// --retention-bytes`); `None`: until every subscriber has read it.
    pub retention_bytes: Option<u64>,
}

/// Why a driver stopped.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[cfg(feature = "verbs")]
    #[error(transparent)]
    Verbs(#[from] embar_dataplane::verbs::frontend::FrontendError),
}

/// See the module docs.
pub struct Driver<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    slot: u32,
    broker: Broker<'p, C>,
    sequencers: Option<TopicSequencers<'p, C>>,
    #[cfg(feature = "verbs")]
    frontend: Option<embar_dataplane::verbs::frontend::Frontend<'p, C>>,
}

impl<'p, C: Coherence> Driver<'p, C> {
    /// The driver of broker slot `slot` of `pool` (the slot the control process gave it).
    pub fn new(pool: &'p Pool, c: C, slot: u32, opts: DriverOptions) -> Result<Self, DriverError> {
        Ok(Driver {
            pool,
            c,
            slot,
            broker: Broker::new(pool, c, slot)?.with_retention_limit(opts.retention_bytes),
            sequencers: None,
            #[cfg(feature = "verbs")]
            frontend: None,
        })
    }

    /// Accepts verbs (RDMA) publishers on `listener` with device `ctx`, and hands verbs
    /// subscribers that connect there to `subscribers` (refused without it).
    #[cfg(feature = "verbs")]
    pub fn with_verbs(
        mut self,
        listener: std::net::TcpListener,
        ctx: std::sync::Arc<embar_sys::verbs::Context>,
        subscribers: Option<
            std::sync::mpsc::Sender<embar_dataplane::remote_subscriber::SubscriberConn>,
        >,
    ) -> Result<Self, DriverError> {
        self.frontend = Some(embar_dataplane::verbs::frontend::Frontend::new(
            self.pool,
            self.c,
            self.slot,
            listener,
            ctx,
            subscribers,
        )?);
        Ok(self)
    }

    /// Runs (or stops running) the sequencers of every topic in this driver's rounds.
    pub fn sequence_here(&mut self, on: bool) {
        if on && self.sequencers.is_none() {
            self.sequencers = Some(TopicSequencers::new(self.pool, self.c));
        } else if !on {
            self.sequencers = None;
        }
    }

    /// Whether this driver's rounds run the sequencers.
    pub fn sequencing(&self) -> bool {
        self.sequencers.is_some()
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    pub fn broker(&self) -> &Broker<'p, C> {
        &self.broker
    }

    /// Whether work can come to this driver without a ring of its doorbell: verbs sessions
    /// (a batch announces itself by a completion on the device, not a futex), so the loop
    /// must not park while one is open.
    pub fn has_unrung_sources(&self) -> bool {
        #[cfg(feature = "verbs")]
        if let Some(f) = &self.frontend {
            return f.sessions_open() > 0;
        }
        false
    }

    /// One round: sessions and rings, then the sequencers, then the verbs frontend. Returns
    /// the work done (0: idle). An error is the broker's own (its pool, its device): nothing a
    /// session writes makes it fail (see docs/broker.md).
    pub fn poll_once(&mut self) -> Result<usize, DriverError> {
        let mut work = self.broker.poll_once()?;
        if let Some(s) = self.sequencers.as_mut() {
            work += s.poll_once();
        }
        #[cfg(feature = "verbs")]
        if let Some(f) = self.frontend.as_mut() {
            work += f.poll_once()?;
        }
        Ok(work)
    }

    /// What the metrics endpoint shows.
    pub fn snapshot(&self) -> BrokerSnapshot {
        #[allow(unused_mut)]
        let mut verbs = VerbsSnapshot::default();
        #[cfg(feature = "verbs")]
        if let Some(f) = &self.frontend {
            let v = f.stats();
            verbs = VerbsSnapshot {
                sessions_open: f.sessions_open() as u64,
                sessions_opened: v.sessions_opened,
                sessions_closed: v.sessions_closed,
                sessions_refused: v.sessions_refused,
                batches_forwarded: v.batches_forwarded,
                resends_copied: v.resends_copied,
                bad_immediates: v.bad_immediates,
                grants_registered: v.grants_registered,
            };
        }
        BrokerSnapshot {
            broker: self.broker.stats(),
            sessions_open: self.broker.sessions_open(),
            ring_occupancy: self.broker.ring_occupancy().iter().map(|(_, n)| n).sum(),
            disk_failures: embar_dataplane::replication::disk_failures_of(
                self.pool, self.c, self.slot,
            ),
            verbs,
            tcp: Default::default(),
            dpdk: Default::default(),
        }
    }
}
