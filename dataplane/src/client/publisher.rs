//! A publisher on the pool host (shm transport). `publish` writes each message straight into
//! log space its broker granted (the one copy of the data), so the batch is built in place;
//! a batch is sealed at the topic's batch size, on `flush`, or when it has lingered, and
//! submitted to its broker's session. Batches are striped round-robin over the brokers, with
//! a per-client dense `batch_seq`. Acks come back as per-session cumulative counts.

use std::time::{Duration, Instant};

use embar_sys::clock::monotonic_ns;

use crate::batch::BatchDesc;
use crate::client::filling::{stride_of, AckedPrefix, Filling, Unacked};
use crate::client::Publish;
use crate::pool::coherence::Coherence;
use crate::pool::doorbell;
use crate::pool::layout::{BrokerDoorbell, Session, BATCH_HEADER_VERSION};
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
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            linger: Duration::from_millis(1),
            wait_timeout: Duration::from_secs(10),
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
}

impl PublishError {
    /// This error's [`ErrorClass`](crate::error::ErrorClass).
    pub fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            PublishError::Pool(e) => e.class(),
            PublishError::Refused { .. } | PublishError::Transport(_) | PublishError::NoBrokers => {
                ErrorClass::Unavailable
            }
            PublishError::Timeout { .. } => ErrorClass::TimedOut,
            PublishError::TooLarge { .. } => ErrorClass::InvalidInput,
            PublishError::Rejected { .. } => ErrorClass::Rejected,
        }
    }
}

struct Link<'p, C: Coherence> {
    broker: u32,
    session: &'p Session,
    /// Rung (when the broker is parked) after each submission, grant taken and close.
    bell: &'p BrokerDoorbell,
    submit: RingProducer<'p, C>,
    taken: u64,
    /// Current grant: (offset, bytes, used).
    grant: Option<(u64, u64, u64)>,
    /// Sealed batches not yet acknowledged (latency).
    unacked: Unacked,
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
    batch_seq: u64,
    open: Option<OpenBatch>,
    sealed_messages: u64,
    /// Which messages are acknowledged in publish order.
    prefix: AckedPrefix,
    submit_waits: u64,
    grant_waits: u64,
}

fn wait<T>(
    what: impl Fn() -> String,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, PublishError> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(PublishError::Timeout {
                what: what(),
                waited: start.elapsed(),
            });
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
            let session = Self::claim(pool, c, b, slot, client_id, cfg)?;
            links.push(Link {
                broker: b,
                session,
                bell: pool.broker_doorbell(b)?,
                submit: RingProducer::new(submission_ring(session), c),
                taken: 0,
                grant: None,
                unacked: Unacked::default(),
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
            batch_seq: 0,
            open: None,
            sealed_messages: 0,
            prefix: AckedPrefix::default(),
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
    ) -> Result<&'p Session, PublishError> {
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
            Ok(ACCEPTED) => Ok(s),
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

    fn start_batch(&mut self, stride: u64, now: u64) -> Result<(), PublishError> {
        let i = self.next_link;
        self.next_link = (self.next_link + 1) % self.links.len();
        let timeout = self.cfg.wait_timeout;
        let link = &mut self.links[i];
        if link
            .grant
            .is_none_or(|(_, bytes, used)| used + stride > bytes)
        {
            let s = link.session;
            let k = link.taken;
            let c = self.c;
            let mut waited = false;
            wait(
                || {
                    format!("log space from broker {} (every grant is in use: subscribers or the sequencer are behind)", link.broker)
                },
                timeout,
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
            self.pool.populate_range(g_offset, g_bytes);
        }
        let (offset, bytes, used) = link.grant.expect("a grant");
        let limit = self.batch_bytes.min(bytes - used);
        // One bounds check per batch, not per message.
        let base = self.pool.data_ptr(offset + used, limit)?;
        self.open = Some(OpenBatch {
            link: i,
            start: offset + used,
            // SAFETY: `base..base + limit` was bounds-checked in the mapping just above and
            // lies in a grant this publisher took, which nobody else writes (the broker reads
            // it only after the batch is submitted); grants and offsets in them are 64-byte
            // aligned.
            batch: unsafe { Filling::new(base, limit, now) },
        });
        Ok(())
    }

    /// Seals the open batch and submits it to its broker.
    fn seal(&mut self) -> Result<(), PublishError> {
        let Some(OpenBatch {
            link: i,
            start,
            batch: b,
        }) = self.open.take()
        else {
            return Ok(());
        };
        // SAFETY: the batch's bytes, inside the range checked when it opened.
        unsafe { self.c.writeback_range(b.base(), b.fill() as usize) };
        let link = &mut self.links[i];
        let desc = BatchDesc {
            batch_seq: self.batch_seq,
            client_id: self.client_id,
            num_msg: b.num_msg(),
            broker_id: link.broker,
            total_size: b.fill(),
            log_idx: start,
            start_logical_offset: 0,
            version_flags: u64::from(BATCH_HEADER_VERSION),
        };
        let mut waited = false;
        let broker = link.broker;
        let submit = &mut link.submit;
        wait(
            || format!("broker {broker} to take submitted batches"),
            self.cfg.wait_timeout,
            || match submit.try_publish(&desc) {
                Ok(_) => Some(()),
                Err(RingError::Full { .. }) => {
                    waited = true;
                    None
                }
                Err(_) => None,
            },
        )?;
        doorbell::ring(link.bell);
        if waited {
            self.submit_waits += 1;
        }
        if let Some((_, _, used)) = link.grant.as_mut() {
            *used += b.fill();
        }
        link.unacked.sealed(b.num_msg(), b.first_ns);
        let link_sealed = link.unacked.sealed_messages();
        self.sealed_messages += u64::from(b.num_msg());
        self.batch_seq += 1;
        if self.prefix.is_full() {
            self.advance_prefix();
        }
        self.prefix.sealed(i, link_sealed, self.sealed_messages);
        Ok(())
    }

    fn advance_prefix(&mut self) -> u64 {
        let (c, links) = (self.c, &self.links);
        self.prefix
            .advance(|l| c.observe(&links[l].session.acked_messages))
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

    /// Messages acknowledged so far, over every broker; an error if a broker rejected any.
    pub fn acked(&self) -> Result<u64, PublishError> {
        let mut total = 0;
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
            total += self.c.observe(&l.session.acked_messages);
        }
        Ok(total)
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
        Ok(self.advance_prefix())
    }

    /// The ack time is the broker's stamp (same host's clock), so a publisher that looks late
    /// does not inflate it (it may round a batch up to a later ack of the same session).
    fn take_ack_latencies(&mut self, out: &mut Vec<u64>) {
        for l in &mut self.links {
            let acked = self.c.observe(&l.session.acked_messages);
            let ack_ns = l.session.ack_ns.load(Relaxed);
            l.unacked.take(acked, ack_ns, out);
        }
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
        for l in &self.links {
            let gen = l.session.state.load(Relaxed) >> 8;
            self.c.publish(&l.session.state, gen << 8 | STATE_CLOSED);
            doorbell::ring(l.bell);
        }
    }
}
