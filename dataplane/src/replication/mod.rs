//! Replication to disk (SPEC §5 step 5): every broker copies the ordered batches of its replica
//! sets, in total order, into its own disk log, and publishes how far that log is synced.
//!
//! - [`replica_set`]: the one formula for a batch's replica set, used by the replicator (which
//!   batches to write) and by the broker's ACK 2 decision (whose progress to wait for).
//! - [`log`]: the disk log (segments, CRC32C per batch, index by total order, sync policy,
//!   recovery). Format: `docs/durability.md`.
//! - [`reader`]: a topic read back from every broker's log in total order, with bounded
//!   memory (what a subscriber reads once the pool no longer holds a position).
//! - [`Replicator`]: one (broker, topic): reads the topic's delivery ring through a subscriber
//!   cursor (which holds the sequencer and retention back until it has read), appends the
//!   batches of its replica sets, syncs per the policy, and only then publishes
//!   `durable_delivery` in the pool.

pub mod log;
pub mod reader;

use std::path::Path;
use std::time::Instant;

use crate::client::subscriber::{Disks, StartAt, Subscriber};
use crate::pool::coherence::Coherence;
use crate::pool::layout::TInode;
use crate::pool::Pool;
use crate::PoolError;

use self::log::{Body, DiskLog, LogConfig, LogError, RecordMeta};

/// The replica set of a batch that landed on broker slot `primary` of a topic with
/// replication factor `rf`, over `brokers` slots: `{(primary + i) mod brokers : i < rf}`.
///
/// `brokers` is the pool's broker slot count (`max_brokers`), not the live brokers: every
/// process computes the same set for a batch at any time, whoever is alive. A slot with no
/// broker therefore never reports progress, and an ACK 2 batch it should hold is not acked
/// (fail closed); the control process refuses an ACK 2 topic unless every slot is live.
pub fn replica_set(primary: u32, rf: u8, brokers: u32) -> impl Iterator<Item = u32> {
    let n = brokers.max(1);
    (0..u32::from(rf).min(n)).map(move |i| (primary + i) % n)
}

/// Whether the batch at delivery index `d` is durable on every slot of `replicas`, given each
/// slot's published `durable_delivery` (`progress`).
pub fn durable_on(
    d: u64,
    mut replicas: impl Iterator<Item = u32>,
    mut progress: impl FnMut(u32) -> u64,
) -> bool {
    replicas.all(|r| progress(r) > d)
}

/// Broker `b`'s published progress on a topic.
pub fn progress_of<C: Coherence>(c: C, t: &TInode, b: u32) -> u64 {
    t.brokers
        .get(b as usize)
        .map_or(0, |e| c.observe(&e.replication.durable_delivery))
}

/// Why a replicator stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// The replication of one topic on one broker. See the module docs.
pub struct Replicator<'p, C: Coherence> {
    pool: &'p Pool,
    c: C,
    me: u32,
    rf: u8,
    slot: u32,
    era: u64,
    sub: Subscriber<'p, C>,
    log: DiskLog,
    /// The batch being read, its buffer reused from batch to batch.
    body: Body,
    /// Delivery index after the last batch appended (published once synced).
    appended_through: u64,
    /// The `durable_delivery` this replicator last published.
    published: u64,
    appended_total: u64,
    bytes_by_src: Vec<u64>,
}

impl ReplicationError {
    /// The OS error number if this broker's own disk log failed (a write, sync or open;
    /// `EIO` when there is none): what is reported as its disk failure. `None` for the pool
    /// or a record of another replica's log (read while catching up), which is no fault of
    /// this disk.
    pub fn disk_errno(&self) -> Option<i32> {
        match self {
            ReplicationError::Log(LogError::Io { source, .. }) => {
                Some(source.raw_os_error().unwrap_or(libc::EIO))
            }
            ReplicationError::Log(_) => Some(libc::EIO),
            ReplicationError::Pool(_) => None,
        }
    }
}

/// Records in the pool that broker `me`'s disk log of topic slot `slot` failed with `errno`
/// (a write, sync or open): counted, and kept as the last error until the log syncs again.
pub fn report_disk_failure<C: Coherence>(pool: &Pool, c: C, slot: u32, me: u32, errno: i32) {
    let r = &pool.tinode(slot).brokers[me as usize].replication;
    r.disk_failures.fetch_add(1, crate::sync::Ordering::Relaxed);
    c.publish(&r.disk_error, errno.unsigned_abs().into());
}

/// A broker whose disk log of a topic is failing: what a publisher waiting for ACK 2 is told
/// when it times out (the pool words `disk_error` and `disk_failures`). Remote publishers get
/// it packed in one word of their acks ([`DiskFault::pack`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskFault {
    /// Broker slot.
    pub broker: u32,
    /// The last OS error number.
    pub errno: i32,
    /// Failures so far.
    pub failures: u64,
}

impl DiskFault {
    /// One word, 0 for none: the OS error number in bits 0..16, the broker slot in 16..32,
    /// the failures (saturated) in 32..64.
    pub fn pack(&self) -> u64 {
        let errno = u64::from(self.errno.clamp(1, 0xffff) as u16);
        let broker = u64::from(self.broker.min(0xffff));
        errno | broker << 16 | self.failures.min(u64::from(u32::MAX)) << 32
    }

    /// The fault in a word [`pack`](Self::pack) made; `None` for 0.
    pub fn unpack(word: u64) -> Option<DiskFault> {
        let errno = (word & 0xffff) as i32;
        (errno != 0).then_some(DiskFault {
            broker: ((word >> 16) & 0xffff) as u32,
            errno,
            failures: word >> 32,
        })
    }
}

impl std::fmt::Display for DiskFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "broker slot {} cannot write its disk log of this topic: {} ({} failures)",
            self.broker,
            std::io::Error::from_raw_os_error(self.errno),
            self.failures
        )
    }
}

/// The faults in the packed words of a remote publisher's acks (one per broker link), one per
/// failing broker.
pub fn faults_of(words: impl Iterator<Item = u64>) -> Vec<DiskFault> {
    let mut faults: Vec<DiskFault> = words.filter_map(DiskFault::unpack).collect();
    faults.sort_by_key(|f| (f.broker, u64::MAX - f.failures));
    faults.dedup_by_key(|f| f.broker);
    faults
}

/// What a publisher adds to its ack timeout: "; " and each fault, or nothing.
pub fn describe_faults(faults: &[DiskFault]) -> String {
    faults.iter().map(|f| format!("; {f}")).collect()
}

/// Broker `b`'s disk fault on topic slot `slot`, if its log is failing now.
fn fault_of<C: Coherence>(pool: &Pool, c: C, slot: u32, b: u32) -> Option<DiskFault> {
    let r = &pool.tinode(slot).brokers[b as usize].replication;
    let e = c.observe(&r.disk_error);
    (e != 0).then(|| DiskFault {
        broker: b,
        errno: e as i32,
        failures: r.disk_failures.load(crate::sync::Ordering::Relaxed),
    })
}

/// The brokers whose disk log of topic slot `slot` is failing now. What a publisher waiting
/// for ACK 2 adds to its timeout.
pub fn disk_failures<C: Coherence>(pool: &Pool, c: C, slot: u32) -> Vec<DiskFault> {
    (0..pool.geometry().max_brokers)
        .filter_map(|b| fault_of(pool, c, slot, b))
        .collect()
}

/// The first of [`disk_failures`], packed (0: none; a slot out of range has none): what a
/// broker puts in the acks of a remote publisher of an ACK 2 topic.
pub fn disk_fault_word<C: Coherence>(pool: &Pool, c: C, slot: u32) -> u64 {
    if slot >= pool.geometry().max_topics {
        return 0;
    }
    (0..pool.geometry().max_brokers)
        .find_map(|b| fault_of(pool, c, slot, b))
        .map_or(0, |f| f.pack())
}

/// The disk-fault word ([`disk_fault_word`]) of an ACK 2 session's topic, for its acks,
/// looked up at most every 100 ms: the lookup reads every broker slot's word (on a
/// non-coherent pool, a flush and a fence each), the word changes rarely, and only a
/// publisher already waiting for acks reads it. A session below ACK 2 carries 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskWatch {
    topic: Option<u32>,
    word: u64,
    next_ns: u64,
}

impl DiskWatch {
    /// For a session on topic slot `topic` at ACK level `ack`.
    pub fn new(topic: u32, ack: u8) -> DiskWatch {
        DiskWatch {
            topic: (ack == 2).then_some(topic),
            ..DiskWatch::default()
        }
    }

    /// The word as of at most 100 ms before `now_ns`.
    pub fn word<C: Coherence>(&mut self, pool: &Pool, c: C, now_ns: u64) -> u64 {
        let Some(t) = self.topic else {
            return 0;
        };
        if now_ns >= self.next_ns {
            self.word = disk_fault_word(pool, c, t);
            self.next_ns = now_ns + 100_000_000;
        }
        self.word
    }
}

/// Failures of broker `me`'s disk logs over every topic (its metric).
pub fn disk_failures_of<C: Coherence>(pool: &Pool, c: C, me: u32) -> u64 {
    (0..pool.geometry().max_topics)
        .map(|slot| {
            let r = &pool.tinode(slot).brokers[me as usize].replication;
            c.observe(&r.disk_failures)
        })
        .sum()
}

impl<'p, C: Coherence> Replicator<'p, C> {
    /// Opens (recovering) the log of `topic` under `data_dir` and a subscriber after the
    /// log's last batch of this pool (or at the oldest batch, in the pool or on the other
    /// replicas' disks, when it has none); batches already in the log (same pool, same or
    /// lower total order) are passed over. Positions the pool no longer holds (reclaimed
    /// while this broker was down, or before a slow replicator read them) are read from the
    /// other brokers' logs, each record verified (CRC32C) before it is appended here.
    pub fn open(
        pool: &'p Pool,
        c: C,
        me: u32,
        topic: &str,
        data_dir: &Path,
        cfg: LogConfig,
    ) -> Result<(Self, log::Recovery), ReplicationError> {
        let slot = pool.find_topic(c, topic)?;
        let info = pool
            .read_topic(c, slot)
            .ok_or_else(|| PoolError::UnknownTopic(topic.to_string()))?;
        let (log, rec) = DiskLog::open(&log::topic_dir(data_dir, topic), cfg)?;
        let era = pool
            .superblock()
            .pool_id
            .load(crate::sync::Ordering::Relaxed);
        // A log that holds batches of this pool goes on after its last one: what was
        // ordered since (while this broker was down) and the pool no longer holds is read
        // from the other replicas' logs.
        let start = match log.last().filter(|l| l.era == era) {
            Some(l) => StartAt::TotalOrder(l.total_order + u64::from(l.num_msg)),
            None => StartAt::Oldest,
        };
        let sub = Subscriber::open_with(pool, c, topic, start, Disks::OthersThan(me))?;
        let start = sub.position();
        // Progress never goes back: a reopened replicator publishes only past what is there.
        let published = c.observe(
            &pool.tinode(slot).brokers[me as usize]
                .replication
                .durable_delivery,
        );
        Ok((
            Replicator {
                pool,
                c,
                me,
                rf: info.config.replication_factor,
                slot,
                era,
                sub,
                log,
                body: Body::default(),
                appended_through: start,
                published,
                appended_total: 0,
                bytes_by_src: vec![0; pool.geometry().max_brokers as usize],
            },
            rec,
        ))
    }

    /// Reads what is newly ordered, appends the batches of this broker's replica sets, syncs
    /// when the policy says, and publishes the progress the sync covers. Returns the batches
    /// read.
    pub fn poll(&mut self, now: Instant) -> Result<usize, ReplicationError> {
        let (me, rf, n, era) = (self.me, self.rf, self.pool.geometry().max_brokers, self.era);
        let skip_below = self
            .log
            .last()
            .filter(|l| l.era == era)
            .map(|l| l.total_order + u64::from(l.num_msg));
        let (body, log) = (&mut self.body, &mut self.log);
        let (bytes_by_src, appended_total) = (&mut self.bytes_by_src, &mut self.appended_total);
        let mut batches = 0;
        // Whether the batch being read is appended: decided at its first message.
        let mut keep = false;
        let mut failed = None;
        self.sub.poll_batches(64, |m, origin| {
            if m.index == 0 {
                body.clear();
                keep = replica_set(origin.broker, rf, n).any(|r| r == me)
                    && skip_below.is_none_or(|s| m.total_order >= s);
            }
            if keep {
                body.push(m.payload);
            }
            if m.index + 1 == m.num_msg {
                batches += 1;
                if keep && failed.is_none() && body.count() == m.num_msg {
                    let meta = RecordMeta {
                        total_order: m.total_order - u64::from(m.index),
                        client_id: m.client_id,
                        batch_seq: m.batch_seq,
                        num_msg: m.num_msg,
                        broker: origin.broker,
                        era,
                        delivery_index: origin.delivery_index,
                    };
                    match log.append(&meta, body, now) {
                        Ok(()) => {
                            if let Some(b) = bytes_by_src.get_mut(meta.broker as usize) {
                                *b += body.as_bytes().len() as u64;
                            }
                            *appended_total = meta.total_order + u64::from(meta.num_msg);
                        }
                        Err(e) => failed = Some(e),
                    }
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        self.appended_through = self.sub.position();
        if self.log.unsynced_bytes() > 0 && self.log.sync_due(now) {
            self.log.sync()?;
        }
        if self.log.unsynced_bytes() == 0 {
            self.publish();
        }
        Ok(batches)
    }

    /// Everything appended is synced: say so in the pool.
    fn publish(&mut self) {
        if self.published >= self.appended_through {
            return;
        }
        let r = &self.pool.tinode(self.slot).brokers[self.me as usize].replication;
        for (src, bytes) in self.bytes_by_src.iter().enumerate() {
            r.replication_done[src].store(*bytes, crate::sync::Ordering::Relaxed);
        }
        r.durable_total_order
            .store(self.appended_total, crate::sync::Ordering::Relaxed);
        self.c.publish(&r.durable_delivery, self.appended_through);
        self.published = self.appended_through;
        // It synced: whatever failed before is behind it.
        if self.c.observe(&r.disk_error) != 0 {
            self.c.publish(&r.disk_error, 0);
        }
    }

    /// Syncs what is appended and publishes it (at shutdown).
    pub fn flush(&mut self) -> Result<(), ReplicationError> {
        self.log.sync()?;
        self.publish();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_set_is_the_primary_and_the_next_slots_around_the_ring() {
        let set = |b, rf, n| replica_set(b, rf, n).collect::<Vec<_>>();
        assert_eq!(set(0, 2, 3), vec![0, 1]);
        assert_eq!(set(2, 2, 3), vec![2, 0]);
        assert_eq!(set(1, 3, 3), vec![1, 2, 0]);
        assert_eq!(set(1, 0, 3), Vec::<u32>::new());
        // RF above the slots: each slot once.
        assert_eq!(set(1, 5, 3), vec![1, 2, 0]);
    }

    #[test]
    fn a_disk_fault_survives_its_word_and_names_the_broker_and_the_error() {
        let f = DiskFault {
            broker: 2,
            errno: libc::ENOSPC,
            failures: 7,
        };
        assert_eq!(DiskFault::unpack(f.pack()), Some(f));
        assert_eq!(DiskFault::unpack(0), None);
        let huge = DiskFault {
            failures: u64::MAX,
            ..f
        };
        assert_eq!(
            DiskFault::unpack(huge.pack()).unwrap().failures,
            u64::from(u32::MAX)
        );
        let text = describe_faults(&[f]);
        assert!(
            text.starts_with("; broker slot 2 cannot write its disk log of this topic: ")
                && text.contains("(os error 28) (7 failures)"),
            "{text}"
        );
    }

    #[test]
    fn durable_needs_every_replica_past_the_batch() {
        let progress = [5u64, 3, 9];
        let p = |r: u32| progress[r as usize];
        assert!(durable_on(2, replica_set(0, 2, 3), p));
        assert!(!durable_on(3, replica_set(0, 2, 3), p));
        assert!(durable_on(4, replica_set(2, 2, 3), p));
        assert!(!durable_on(5, replica_set(2, 2, 3), p));
    }
}
