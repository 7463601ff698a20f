//! A publisher on the pool host (shm transport). `publish` writes each message straight into
//! log space its broker granted (the one copy of the data), so the batch is built in place;
//! payloads of 256 bytes or more go in by non-temporal stores (`BatchWriter::streaming`):
//! the publisher never reads them again and other processes read them later, so reading each
//! destination line into its cache before writing it (what a plain copy does) was wasted
//! memory traffic;
//! a batch is sealed at the topic's batch size, on `flush`, or when it has lingered, and
//! submitted to its broker's session, with a per-client dense `batch_seq`. Acks come back as
//! per-session cumulative counts.
//!
//! **Where a batch goes.** Full batches are striped round-robin over the brokers: each
//! broker's loop checks the message headers of its share, so the brokers share that work
//! under load. A batch that follows one sealed at less than half the batch size (by `flush`
//! or linger: the publisher is not sending at full speed) goes to the broker whose process
//! runs the sequencers, when one of the publisher's brokers says so in the pool
//! ([`Pool::broker_sequencing`]): there the batch is checked, ordered and acknowledged in one
//! loop, where on another broker it crosses two processes (that broker's loop, the
//! sequencer's, and that broker's again for the ack), and the other brokers' loops stay idle
//! (they park) instead of taking the cores of a small host. As soon as batches fill up again
//! they are striped again. `PublisherConfig::small_batches_to_sequencer` turns it off.
//!
//! **Failover.** Each broker records in the pool the process serving its slot
//! ([`Pool::broker_process`]). A publisher waiting on a broker (for acks, a grant or a ring
//! slot) looks at that process every [`LIVENESS_CHECK`]; once it is gone (exited, a zombie,
//! or the slot now served by another process), the publisher closes its session there and
//! sends every batch that broker had not acknowledged again to the live brokers, unchanged
//! (same `batch_seq`): the batch's bytes are still in the pool, in the dead broker's grant,
//! and are copied into a grant of the live broker, then checked (every message header names
//! this client and the batch) before they are submitted, so a batch whose space was reused
//! meanwhile is reported lost, never sent wrong. The sequencer drops the copies it had
//! ordered already and they are acked again, so the resend completes, as for the TCP
//! publisher (`docs/tcp.md`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use embar_sys::clock::monotonic_ns;
use embar_sys::process::ProcessId;

use crate::batch::BatchDesc;
use crate::client::filling::{next_live, resend_target, stride_of, Acks, Every, Filling};
use crate::client::Publish;
use crate::messages::{Claims, Messages};
use crate::pool::coherence::{Coherence, CoherenceMode};
use crate::pool::doorbell;
use crate::pool::layout::{BrokerDoorbell, Session};
use crate::pool::Pool;
use crate::ring::{RingError, RingProducer};
use crate::session::*;
use crate::sync::Ordering::Relaxed;
use crate::PoolError;

#[derive(Clone, Copy, Debug)]
pub struct PublisherConfig {
    /// A batch older than this is sealed by the next `publish` or `poll`.
    pub linger: Duration,
    /// Longest wait for a broker (session answer, a grant, a ring slot) before an error.
    pub wait_timeout: Duration,
    /// After a batch sealed at less than half the batch size, send the next one to the
    /// broker that runs the sequencers (see the module docs, "Where a batch goes").
    pub small_batches_to_sequencer: bool,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            linger: Duration::from_millis(1),
            wait_timeout: Duration::from_secs(10),
            small_batches_to_sequencer: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("broker {broker} refused the session: {reason}")]
    Refused { broker: u32, reason: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
    #[error("message of {size} bytes does not fit a batch of {max} bytes")]
    TooLarge { size: usize, max: u64 },
    #[error("broker {broker} rejected {count} batch(es) of this publisher: {reason} (last batch {batch_seq})")]
    Rejected {
        broker: u32,
        count: u64,
        reason: &'static str,
        batch_seq: u64,
    },
    #[error("no broker to publish to")]
    NoBrokers,
    #[error("batch {batch_seq} of this publisher was not acknowledged by broker {broker}, which is gone, and cannot be sent again: {why}")]
    Lost {
        broker: u32,
        batch_seq: u64,
        why: String,
    },
}

impl PublishError {
    /// This error's [`ErrorClass`](crate::error::ErrorClass).
    pub fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            PublishError::Pool(e) => e.class(),
            PublishError::Refused { .. }
            | PublishError::Transport(_)
            | PublishError::NoBrokers
            | PublishError::Lost { .. } => ErrorClass::Unavailable,
            PublishError::Timeout { .. } => ErrorClass::TimedOut,
            PublishError::TooLarge { .. } => ErrorClass::InvalidInput,
            PublishError::Rejected { .. } => ErrorClass::Rejected,
        }
    }
}

/// How often a publisher waiting on a broker looks whether the broker's process still runs.
pub const LIVENESS_CHECK: Duration = Duration::from_millis(10);

struct Link<'p, C: Coherence> {
    broker: u32,
    session: &'p Session,
    /// The session's generation this publisher claimed.
    generation: u64,
    /// Rung (when the broker is parked) after each submission, grant taken and close.
    bell: &'p BrokerDoorbell,
    submit: RingProducer<'p, C>,
    taken: u64,
    /// Current grant: (offset, bytes, used).
    grant: Option<(u64, u64, u64)>,
    /// The process serving the broker slot when the session opened (`None`: not recorded,
    /// so never taken for dead).
    process: Option<ProcessId>,
    /// Cleared once its broker is gone: nothing more goes to it.
    live: bool,
    /// Messages submitted on this session (its acknowledgements count up to it).
    submitted: u64,
    /// Submitted batches not yet acknowledged, oldest first (not kept at ACK 0).
    inflight: VecDeque<InFlight>,
}

/// A sealed batch: where its bytes are, and what is needed to send it again.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    desc: BatchDesc,
    /// Its link's `submitted` once it was submitted.
    upto: u64,
    first_ns: u64,
}

struct OpenBatch {
    link: usize,
    /// Pool offset of the batch; its bytes in this mapping were bounds-checked once, for
    /// its limit, when it opened.
    start: u64,
    batch: Filling,
}

/// See the module docs.
pub struct Publisher<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    /// Topic slot.
    topic: u32,
    client_id: u64,
    batch_bytes: u64,
    ack: u8,
    cfg: PublisherConfig,
    links: Vec<Link<'p, C>>,
    next_link: usize,
    /// The last batch sealed held less than half the batch size.
    last_small: bool,
    batch_seq: u64,
    open: Option<OpenBatch>,
    sealed_messages: u64,
    acks: Acks,
    /// Sealed batches whose broker died before it acknowledged them, to send again.
    orphans: VecDeque<InFlight>,
    /// When the brokers' processes are looked at next.
    liveness: Every,
    resent_batches: u64,
    submit_waits: u64,
    grant_waits: u64,
}

/// How a wait on one broker ended, other than with what it waited for.
enum Stop {
    /// The broker's process is gone.
    Down,
    Failed(PublishError),
}

/// A batch that did not go, and why.
struct Unsent(InFlight, Stop);

impl Unsent {
    /// The error of a batch that did not go for another reason than its broker's death.
    fn failure(self) -> PublishError {
        match self.1 {
            Stop::Failed(e) => e,
            Stop::Down => {
                PublishError::Transport(format!("broker {} is gone", self.0.desc.broker_id))
            }
        }
    }
}

impl From<PublishError> for Stop {
    fn from(e: PublishError) -> Stop {
        Stop::Failed(e)
    }
}

fn wait<T>(
    what: impl Fn() -> String,
    timeout: Duration,
    f: impl FnMut() -> Option<T>,
) -> Result<T, PublishError> {
    match wait_on(what, timeout, || false, f) {
        Ok(v) => Ok(v),
        Err(Stop::Failed(e)) => Err(e),
        Err(Stop::Down) => unreachable!("never down"),
    }
}

/// Waits for `f`, asking `down` every [`LIVENESS_CHECK`] once the wait is longer than that.
fn wait_on<T>(
    what: impl Fn() -> String,
    timeout: Duration,
    mut down: impl FnMut() -> bool,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, Stop> {
    let start = Instant::now();
    let mut next_check = LIVENESS_CHECK;
    let mut spins = 0u32;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        let waited = start.elapsed();
        if waited >= next_check {
            if down() {
                return Err(Stop::Down);
            }
            next_check = waited + LIVENESS_CHECK;
        }
        if waited > timeout {
            return Err(Stop::Failed(PublishError::Timeout {
                what: what(),
                waited,
            }));
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else if spins < 1024 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Whether the broker a link was opened with is gone: its process exited (or is a zombie),
/// or the slot is now served by another process.
fn broker_down<C: Coherence>(pool: &Pool, c: C, broker: u32, process: Option<ProcessId>) -> bool {
    match process {
        None => false,
        Some(p) => pool.broker_process(c, broker) != Some(p) || !p.alive(),
    }
}

impl<'p, C: Coherence> Publisher<'p, C> {
    /// Opens a session with each of `brokers` (pool slots) for `topic`.
    pub fn open(
        pool: &'p Pool,
        c: C,
        topic: &str,
        brokers: &[u32],
        client_id: u64,
        cfg: PublisherConfig,
    ) -> Result<Self, PublishError> {
        if brokers.is_empty() {
            return Err(PublishError::NoBrokers);
        }
        let slot = pool.find_topic(c, topic)?;
        let info = pool
            .read_topic(c, slot)
            .ok_or_else(|| PoolError::UnknownTopic(topic.to_string()))?;
        let mut links = Vec::with_capacity(brokers.len());
        for &b in brokers {
            let (session, generation) = Self::claim(pool, c, b, slot, client_id, cfg)?;
            links.push(Link {
                broker: b,
                session,
                generation,
                bell: pool.broker_doorbell(b)?,
                submit: RingProducer::new(submission_ring(session), c),
                taken: 0,
                grant: None,
                process: pool.broker_process(c, b),
                live: true,
                submitted: 0,
                inflight: VecDeque::new(),
            });
        }
        Ok(Publisher {
            pool,
            c,
            topic: slot,
            client_id,
            batch_bytes: info.config.batch_bytes,
            ack: info.config.ack,
            cfg,
            links,
            next_link: 0,
            last_small: false,
            batch_seq: 0,
            open: None,
            sealed_messages: 0,
            acks: Acks::default(),
            orphans: VecDeque::new(),
            liveness: Every::new(LIVENESS_CHECK),
            resent_batches: 0,
            submit_waits: 0,
            grant_waits: 0,
        })
    }

    fn claim(
        pool: &'p Pool,
        c: C,
        broker: u32,
        topic: u32,
        client_id: u64,
        cfg: PublisherConfig,
    ) -> Result<(&'p Session, u64), PublishError> {
        let Some((s, _, mine)) = try_claim(
            pool,
            c,
            broker,
            topic,
            client_id,
            embar_sys::process::ProcessId::current(),
        )?
        else {
            return Err(PublishError::Pool(PoolError::OutOfRange {
                what: "sessions of broker",
                value: u64::from(SESSIONS),
                limit: u64::from(SESSIONS),
            }));
        };
        if let Ok(bell) = pool.broker_doorbell(broker) {
            doorbell::ring(bell);
        }
        let answer = wait(
            || {
                format!("broker {broker} to accept a session (is `embar broker` running for slot {broker}?)")
            },
            cfg.wait_timeout,
            || answer(c, s, mine),
        );
        match answer {
            Ok(ACCEPTED) => Ok((s, mine)),
            Ok(_) => {
                let reason = SessionError::from_code(s.error.load(Relaxed))
                    .describe()
                    .to_string();
                Err(PublishError::Refused { broker, reason })
            }
            Err(e) => {
                close(c, s, mine);
                Err(e)
            }
        }
    }

    /// Times the publisher waited for a grant (credits) or a submission slot.
    pub fn waits(&self) -> (u64, u64) {
        (self.grant_waits, self.submit_waits)
    }

    /// Batches sealed so far (the next batch's `batch_seq`).
    pub fn batches_sealed(&self) -> u64 {
        self.batch_seq
    }

    /// Batches sent again to a live broker after theirs died.
    pub fn resent_batches(&self) -> u64 {
        self.resent_batches
    }

    /// Brokers this publisher still sends to.
    pub fn live_brokers(&self) -> usize {
        self.links.iter().filter(|l| l.live).count()
    }

    /// Appends one message to the current batch, sealing batches as they fill or linger.
    pub fn publish(&mut self, payload: &[u8]) -> Result<(), PublishError> {
        let stride = stride_of(payload.len(), self.batch_bytes)?;
        let now = monotonic_ns();
        if self
            .open
            .as_ref()
            .is_some_and(|b| b.batch.must_seal(stride, now, self.cfg.linger))
        {
            self.seal()?;
        }
        if self.open.is_none() {
            self.start_batch(stride, now)?;
        }
        let (client, seq) = (self.client_id, self.batch_seq);
        let b = self.open.as_mut().expect("a batch is open");
        b.batch.append(client, seq, now, payload);
        Ok(())
    }

    /// The next live link in the round-robin.
    fn next_live(&mut self) -> Result<usize, PublishError> {
        let links = &self.links;
        next_live(&mut self.next_link, links.len(), |i| links[i].live)
    }

    /// The link the next batch goes to: after a small batch, the live link whose broker runs
    /// the sequencers, if there is one; else the next in the round-robin.
    fn next_link(&mut self) -> Result<usize, PublishError> {
        if self.last_small && self.cfg.small_batches_to_sequencer {
            let (pool, c) = (self.pool, self.c);
            if let Some(i) =
                (self.links.iter()).position(|l| l.live && pool.broker_sequencing(c, l.broker))
            {
                return Ok(i);
            }
        }
        self.next_live()
    }

    fn start_batch(&mut self, stride: u64, now: u64) -> Result<(), PublishError> {
        let (i, offset, limit) = loop {
            let i = self.next_link()?;
            match self.room(i, stride) {
                Ok((offset, free)) => break (i, offset, self.batch_bytes.min(free)),
                Err(Stop::Down) => {
                    self.link_down(i, "waiting for log space");
                    self.drain_orphans()?;
                }
                Err(Stop::Failed(e)) => return Err(e),
            }
        };
        // One bounds check per batch, not per message.
        let base = self.pool.data_ptr(offset, limit)?;
        self.open = Some(OpenBatch {
            link: i,
            start: offset,
            // SAFETY: `base..base + limit` was bounds-checked in the mapping just above and
            // lies in a grant this publisher took, which nobody else writes (the broker reads
            // it only after the batch is submitted); grants and offsets in them are 64-byte
            // aligned.
            batch: unsafe { Filling::new(base, limit, now) }.streaming(),
        });
        Ok(())
    }

    /// Where link `i`'s current grant has at least `need` bytes free (taking the next grant
    /// when it has not): `(offset, free bytes)`. Nothing is marked used.
    fn room(&mut self, i: usize, need: u64) -> Result<(u64, u64), Stop> {
        let (pool, c, timeout) = (self.pool, self.c, self.cfg.wait_timeout);
        let link = &mut self.links[i];
        if link
            .grant
            .is_none_or(|(_, bytes, used)| used + need > bytes)
        {
            let s = link.session;
            let k = link.taken;
            let (broker, process) = (link.broker, link.process);
            let mut waited = false;
            wait_on(
                || {
                    format!("log space from broker {broker} (every grant is in use: subscribers or the sequencer are behind)")
                },
                timeout,
                || broker_down(pool, c, broker, process),
                || {
                    let ok = c.observe(&s.grants_issued) > k;
                    waited |= !ok;
                    ok.then_some(())
                },
            )?;
            if waited {
                self.grant_waits += 1;
            }
            let e = &s.grants[grant_slot(k)];
            c.invalidate(e);
            let (g_offset, g_bytes) = (e.offset.load(Relaxed), e.bytes.load(Relaxed));
            link.grant = Some((g_offset, g_bytes, 0));
            link.taken = k + 1;
            c.publish(&s.grants_taken, link.taken);
            // Taking a grant lets the broker issue the next one ahead.
            doorbell::ring(link.bell);
            // The pool is not faulted in as a whole (a client pays only for what it
            // touches): the grant is, in one call, before the batches fill it.
            pool.populate_range(g_offset, g_bytes);
        }
        let (offset, bytes, used) = link.grant.expect("a grant");
        Ok((offset + used, bytes - used))
    }

    /// Seals the open batch and submits it to its broker.
    fn seal(&mut self) -> Result<(), PublishError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let (i, f) = self.finish(open);
        self.submit_or_orphan(i, f)?;
        self.drain_orphans()
    }

    /// Closes the open batch: its descriptor, its space marked used, its `batch_seq` taken.
    fn finish(&mut self, open: OpenBatch) -> (usize, InFlight) {
        let OpenBatch {
            link: i,
            start,
            batch: mut b,
        } = open;
        // Its payloads went in by non-temporal stores: ordered before what follows.
        b.fence();
        // On a non-coherent pool: what plain stores wrote goes back to memory (the streamed
        // payloads are there already).
        if self.c.mode() == CoherenceMode::NonCoherent {
            let (c, base) = (self.c, b.base());
            // SAFETY: every range lies inside the batch's bytes, inside the range checked when
            // it opened.
            b.plain_ranges(|at, n| unsafe { c.writeback_range(base.add(at as usize), n as usize) });
        }
        let link = &mut self.links[i];
        let desc = b.descriptor(self.client_id, self.batch_seq, link.broker, start);
        if let Some((_, _, used)) = link.grant.as_mut() {
            *used += b.fill();
        }
        self.sealed_messages += u64::from(b.num_msg());
        // Against its own limit: a batch cut short by the end of a grant is not small.
        self.last_small = b.fill() * 2 < b.limit();
        self.batch_seq += 1;
        if self.ack > 0 {
            self.acks.sealed(b.num_msg());
        }
        let f = InFlight {
            desc,
            upto: 0,
            first_ns: b.first_ns,
        };
        (i, f)
    }

    /// Submits `f` to link `i`; if its broker is gone, `f` joins the orphans and the link is
    /// closed (the caller drains the orphans).
    fn submit_or_orphan(&mut self, i: usize, f: InFlight) -> Result<(), PublishError> {
        match self.submit(i, f) {
            Ok(()) => Ok(()),
            Err(unsent) if matches!(unsent.1, Stop::Down) => {
                self.orphans.push_back(unsent.0);
                self.link_down(i, "waiting to submit a batch");
                Ok(())
            }
            Err(unsent) => Err(unsent.failure()),
        }
    }

    /// Puts `f` (whose descriptor names link `i`'s broker and space) in link `i`'s
    /// submission ring.
    fn submit(&mut self, i: usize, mut f: InFlight) -> Result<(), Box<Unsent>> {
        let (pool, c) = (self.pool, self.c);
        let link = &mut self.links[i];
        let (broker, process) = (link.broker, link.process);
        let mut waited = false;
        let submit = &mut link.submit;
        let desc = f.desc;
        if let Err(stop) = wait_on(
            || format!("broker {broker} to take submitted batches"),
            self.cfg.wait_timeout,
            || broker_down(pool, c, broker, process),
            || match submit.try_publish(&desc) {
                Ok(_) => Some(()),
                Err(RingError::Full { .. }) => {
                    waited = true;
                    None
                }
                Err(_) => None,
            },
        ) {
            return Err(Box::new(Unsent(f, stop)));
        }
        doorbell::ring(link.bell);
        if waited {
            self.submit_waits += 1;
        }
        if self.ack > 0 {
            link.submitted += u64::from(desc.num_msg);
            f.upto = link.submitted;
            link.inflight.push_back(f);
            self.retire(i);
        }
        Ok(())
    }

    /// Retires what link `i`'s broker acknowledged. The ack time is the broker's stamp (same
    /// host's clock), so a publisher that looks late does not inflate it (it may round a
    /// batch up to a later ack of the same session).
    fn retire(&mut self, i: usize) {
        let l = &mut self.links[i];
        let acked = self.c.observe(&l.session.acked_messages);
        let ack_ns = &l.session.ack_ns;
        self.acks.retire(
            &mut l.inflight,
            |f| (&f.desc, f.upto, f.first_ns),
            acked,
            || ack_ns.load(Relaxed),
        );
    }

    /// Looks (at most every [`LIVENESS_CHECK`]) whether the brokers with batches not yet
    /// acknowledged still run, and sends a dead one's again.
    fn check_brokers(&mut self) -> Result<(), PublishError> {
        if !self.liveness.due() {
            return Ok(());
        }
        for i in 0..self.links.len() {
            let l = &self.links[i];
            if l.live
                && !l.inflight.is_empty()
                && broker_down(self.pool, self.c, l.broker, l.process)
            {
                self.link_down(i, "waiting for acknowledgements");
            }
        }
        self.drain_orphans()
    }

    /// Link `i`'s broker is gone: the session is closed, and what it had not acknowledged
    /// (and the open batch, if it is in its space) joins the orphans.
    fn link_down(&mut self, i: usize, doing: &str) {
        if !self.links[i].live {
            return;
        }
        // What it acknowledged before it died counts.
        self.retire(i);
        let mut pending: Vec<InFlight> = self.links[i].inflight.drain(..).collect();
        if self.open.as_ref().is_some_and(|o| o.link == i) {
            let open = self.open.take().expect("open");
            pending.push(self.finish(open).1);
        }
        let l = &mut self.links[i];
        l.live = false;
        l.grant = None;
        close(self.c, l.session, l.generation);
        doorbell::ring(l.bell);
        log::warn!(
            "publisher {}: broker {} is gone ({doing}); sending its {} unacknowledged batch(es) to the live brokers",
            self.client_id,
            l.broker,
            pending.len(),
        );
        // What the sequencer has not ordered goes first, oldest first: the gap it holds this
        // client's later batches for is there. The rest come back `duplicate` (their broker
        // decides so without a ring slot) and only need that ack.
        let next = self
            .pool
            .client_progress(self.c, self.topic, self.client_id)
            .map_or(0, |(next_expected, _)| next_expected);
        pending.sort_by_key(|f| (f.desc.batch_seq < next, f.desc.batch_seq));
        self.orphans.extend(pending);
    }

    /// Sends every orphan again, each to a live broker (round-robin by `batch_seq`).
    fn drain_orphans(&mut self) -> Result<(), PublishError> {
        if self.orphans.is_empty() {
            return Ok(());
        }
        if self.ack == 0 {
            // Nothing was promised: whatever the dead broker had not ordered is lost.
            let n = self.orphans.len();
            self.orphans.clear();
            log::warn!(
                "publisher {}: up to {n} batch(es) of ACK 0 may be lost with their broker",
                self.client_id
            );
            return Ok(());
        }
        // The open batch sits in a live link's grant, where the copies go: it is submitted
        // first.
        if let Some(open) = self.open.take() {
            let (i, f) = self.finish(open);
            self.submit_or_orphan(i, f)?;
        }
        let (began, before) = (Instant::now(), self.resent_batches);
        while let Some(f) = self.orphans.pop_front() {
            let k = resend_target(
                self.links.iter().map(|l| l.live),
                f.desc.batch_seq,
                self.orphans.len() + 1,
            )?;
            match self.resend(k, f) {
                Ok(()) => self.resent_batches += 1,
                Err(unsent) if matches!(unsent.1, Stop::Down) => {
                    self.orphans.push_front(unsent.0);
                    self.link_down(k, "sending a batch again");
                }
                Err(unsent) => return Err(unsent.failure()),
            }
        }
        log::info!(
            "publisher {}: {} batch(es) sent again in {:?}",
            self.client_id,
            self.resent_batches - before,
            began.elapsed()
        );
        Ok(())
    }

    /// Copies orphan `f` into link `k`'s space, checks the copy, and submits it there.
    fn resend(&mut self, k: usize, f: InFlight) -> Result<(), Box<Unsent>> {
        let size = f.desc.total_size;
        let (offset, _) = self.room(k, size).map_err(|s| Box::new(Unsent(f, s)))?;
        let lost = |why: String| {
            Box::new(Unsent(
                f,
                Stop::Failed(PublishError::Lost {
                    broker: f.desc.broker_id,
                    batch_seq: f.desc.batch_seq,
                    why,
                }),
            ))
        };
        let from = self
            .pool
            .data_ptr(f.desc.log_idx, size)
            .map_err(|e| lost(e.to_string()))?;
        let to = self
            .pool
            .data_ptr(offset, size)
            .map_err(|e| Box::new(Unsent(f, Stop::Failed(e.into()))))?;
        // SAFETY: both ranges were bounds-checked in the mapping just above. `to` lies in a
        // grant of this publisher's that nobody else writes; `from` in a dead broker's grant
        // this publisher filled, which may have been reused since (then the check below
        // fails). `copy` allows the two to overlap (a reused segment granted here again).
        let copy = unsafe {
            self.c.invalidate_range(from, size as usize);
            std::ptr::copy(from, to, size as usize);
            std::slice::from_raw_parts(to, size as usize)
        };
        if let Err(e) = Messages::over(copy, Claims::from(&f.desc)) {
            return Err(lost(format!(
                "its space was reused before it could be sent again ({e})"
            )));
        }
        // SAFETY: the range checked above.
        unsafe { self.c.writeback_range(to, size as usize) };
        if let Some((_, _, used)) = self.links[k].grant.as_mut() {
            *used += size;
        }
        let moved = InFlight {
            desc: BatchDesc {
                broker_id: self.links[k].broker,
                log_idx: offset,
                ..f.desc
            },
            ..f
        };
        self.submit(k, moved)
    }

    /// Submits `desc` as it is to broker link `link`, bypassing every check this library
    /// makes: what a misbehaving or malicious publisher can do to its broker. For testing the
    /// broker's checks (`embar ring-worker rogue-publish`).
    pub fn submit_unchecked(&mut self, link: usize, desc: &BatchDesc) -> Result<(), PublishError> {
        let l = self.links.get_mut(link).ok_or(PublishError::NoBrokers)?;
        l.submit
            .try_publish(desc)
            .map(|_| ())
            .map_err(|e| PublishError::Pool(PoolError::BadRange(e.to_string())))
    }

    /// The current grant of link `link`: `(offset, bytes, used)`.
    pub fn grant(&self, link: usize) -> Option<(u64, u64, u64)> {
        self.links.get(link).and_then(|l| l.grant)
    }

    /// Messages acknowledged so far, over every broker (a batch sent again counted once); an
    /// error if a broker rejected any.
    pub fn acked(&mut self) -> Result<u64, PublishError> {
        for l in &self.links {
            let rejected = self.c.observe(&l.session.rejected_batches);
            if rejected > 0 {
                let e = l.session.error.load(Relaxed);
                return Err(PublishError::Rejected {
                    broker: l.broker,
                    count: rejected,
                    reason: SessionError::from_code(e).describe(),
                    batch_seq: e >> 8,
                });
            }
        }
        for i in 0..self.links.len() {
            self.retire(i);
        }
        self.check_brokers()?;
        Ok(self.acks.messages())
    }
}

impl<C: Coherence> Publish for Publisher<'_, C> {
    fn client_id(&self) -> u64 {
        self.client_id
    }

    fn publish(&mut self, payload: &[u8]) -> Result<(), PublishError> {
        Publisher::publish(self, payload)
    }

    fn check_size(&self, payload_len: usize) -> Result<(), PublishError> {
        stride_of(payload_len, self.batch_bytes).map(drop)
    }

    fn poll(&mut self) -> Result<(), PublishError> {
        if self.lingered() {
            self.seal()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PublishError> {
        self.seal()
    }

    fn acked(&mut self) -> Result<u64, PublishError> {
        Publisher::acked(self)
    }

    fn sealed_messages(&self) -> u64 {
        self.sealed_messages
    }

    fn acked_prefix(&mut self) -> Result<u64, PublishError> {
        Publisher::acked(self)?;
        if self.ack == 0 {
            return Ok(self.sealed_messages);
        }
        Ok(self.acks.prefix())
    }

    fn take_ack_latencies(&mut self, out: &mut Vec<u64>) {
        for i in 0..self.links.len() {
            self.retire(i);
        }
        self.acks.take_latencies(out);
    }

    fn grant_waits(&self) -> u64 {
        self.grant_waits
    }

    fn disk_faults(&self) -> Vec<crate::replication::DiskFault> {
        crate::replication::disk_failures(self.pool, self.c, self.topic)
    }

    fn ack_level(&self) -> u8 {
        self.ack
    }

    fn linger_deadline_ns(&self) -> Option<u64> {
        self.open
            .as_ref()
            .map(|b| b.batch.deadline_ns(self.cfg.linger))
    }
}

impl<C: Coherence> Drop for Publisher<'_, C> {
    fn drop(&mut self) {
        let _ = self.seal();
        for l in self.links.iter().filter(|l| l.live) {
            close(self.c, l.session, l.generation);
            doorbell::ring(l.bell);
        }
    }
}
