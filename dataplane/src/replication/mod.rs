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
pub mod placement;
pub mod reader;

use std::path::Path;
use std::time::Instant;

use crate::client::subscriber::{Disks, StartAt, Subscriber};
use crate::pool::coherence::Coherence;
use crate::pool::layout::TInode;
use crate::pool::Pool;
use crate::PoolError;

use self::log::{Body, DiskLog, LogConfig, LogError, RecordMeta};
use self::placement::Placement;

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

/// The era of a topic's disk records: its total orders count from 0 in each one, and a log's
/// readers serve (and its replicator goes on from) the current era's records only. The
/// pool's `pool_id` (a new pool, as `cluster up` makes, orders from 0 again) mixed with the
/// topic's pool slot and generation (a topic deleted and created again under the same name
/// orders from 0 again too, and must not take the old topic's records, still in the same
/// directory, for its own).
pub fn topic_era(pool_id: u64, slot: u32, generation: u64) -> u64 {
    pool_id ^ (u64::from(slot) << 40 ^ generation).wrapping_mul(0x9E37_79B9_7F4A_7C15)
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

/// Broker `b`'s published progress on a topic, as far as it can be trusted under the
/// topic's placement table `p`: a slot that has not taken the table's version in yet may
/// still publish progress past batches that version newly put in its sets (0 then); a slot
/// excluded now keeps its progress (it was excluded from where it had made everything of
/// its sets durable).
pub fn progress_under<C: Coherence>(c: C, t: &TInode, p: &Placement, b: u32) -> u64 {
    let Some(e) = t.brokers.get(b as usize) else {
        return 0;
    };
    if !p.excluded_now(b) && c.observe(&e.replication.placement_seen) < p.version() {
        return 0;
    }
    c.observe(&e.replication.durable_delivery)
}

/// Broker `b`'s published progress on a topic (as it is; see [`progress_under`]).
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
    topic: String,
    /// The topic's log directory.
    dir: std::path::PathBuf,
    cfg: LogConfig,
    sub: Subscriber<'p, C>,
    log: DiskLog,
    /// The batch being read, its buffer reused from batch to batch.
    body: Body,
    /// Delivery index after the last batch read (published once synced).
    appended_through: u64,
    /// Total order after the last batch read.
    read_end: u64,
    /// The `durable_delivery` this replicator last published.
    published: u64,
    /// The topic's placement table as last read.
    placement: Placement,
    backfills: Vec<Backfill<'p, C>>,
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
    /// other brokers' logs, each record verified (CRC32C) before it is appended here. A
    /// backfill a previous run left unfinished goes on.
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
        let dir = log::topic_dir(data_dir, topic);
        let (log, rec) = DiskLog::open(&dir, cfg)?;
        let era = topic_era(pool.pool_id(), slot, info.generation);
        // A log that holds batches of this pool goes on after its last one: what was
        // ordered since (while this broker was down) and the pool no longer holds is read
        // from the other replicas' logs.
        let resume = log.end_of_era(era);
        let start = resume.map_or(StartAt::Oldest, StartAt::TotalOrder);
        let sub = Subscriber::open_with(pool, c, topic, start, Disks::OthersThan(me))?;
        let start = sub.position();
        // Progress never goes back: a reopened replicator publishes only past what is there.
        let published = c.observe(
            &pool.tinode(slot).brokers[me as usize]
                .replication
                .durable_delivery,
        );
        let backfills = Backfill::unfinished(pool, c, topic, &dir, era, cfg)?;
        Ok((
            Replicator {
                pool,
                c,
                me,
                rf: info.config.replication_factor,
                slot,
                era,
                topic: topic.to_string(),
                dir,
                cfg,
                sub,
                log,
                body: Body::default(),
                appended_through: start,
                read_end: resume.unwrap_or(0),
                published,
                // The table this broker's progress accounts for: the current one if it took
                // it in before (`placement_seen`); otherwise none, so that the first poll
                // treats every exclusion as new and backfills what the log passed over
                // under an older table (a change made while this replicator was down).
                placement: {
                    let t = pool.tinode(slot);
                    let current = Placement::read(c, &t.placement);
                    let seen = c.observe(&t.brokers[me as usize].replication.placement_seen);
                    if seen == current.version() {
                        current
                    } else {
                        Placement::none()
                    }
                },
                backfills,
                bytes_by_src: vec![0; pool.geometry().max_brokers as usize],
            },
            rec,
        ))
    }

    /// Reads what is newly ordered, appends the batches of this broker's replica sets, syncs
    /// when the policy says, and publishes the progress the sync covers. Returns the batches
    /// read.
    pub fn poll(&mut self, now: Instant) -> Result<usize, ReplicationError> {
        self.follow_placement()?;
        let (me, rf, n, era) = (self.me, self.rf, self.pool.geometry().max_brokers, self.era);
        let mut copy = Pass {
            held_by: None,
            me,
            rf,
            slots: n,
            era,
            placement: &self.placement,
            end: u64::MAX,
            body: &mut self.body,
            log: &mut self.log,
            bytes_by_src: &mut self.bytes_by_src,
            read_end: &mut self.read_end,
        };
        let batches = copy.poll(&mut self.sub, now)?;
        self.appended_through = self.sub.position();
        for b in &mut self.backfills {
            let mut copy = Pass {
                held_by: Some(&self.log),
                me,
                rf,
                slots: n,
                era,
                placement: &self.placement,
                end: b.end,
                body: &mut self.body,
                log: &mut b.log,
                bytes_by_src: &mut self.bytes_by_src,
                read_end: &mut b.read_end,
            };
            copy.poll(&mut b.sub, now)?;
        }
        let due = std::iter::once(&self.log)
            .chain(self.backfills.iter().map(|b| &b.log))
            .any(|l| l.unsynced_bytes() > 0 && l.sync_due(now));
        if due {
            self.log.sync()?;
            for b in &mut self.backfills {
                b.log.sync()?;
            }
        }
        self.finish_backfills()?;
        let synced = self.log.unsynced_bytes() == 0
            && self.backfills.iter().all(|b| b.log.unsynced_bytes() == 0);
        if synced {
            self.publish();
        }
        Ok(batches)
    }

    /// Takes a new placement table in: when it changes the replica sets of batches this
    /// replicator has read already, a backfill reads them again and writes those of this
    /// broker's sets into a log of its own.
    ///
    /// Readers trust this broker's progress only under the table version it says it took in
    /// (`placement_seen`), so the progress is lowered to where the backfill starts before
    /// the version is published: the batches the change put in its sets are not counted
    /// durable here until the backfill has synced them.
    fn follow_placement(&mut self) -> Result<(), ReplicationError> {
        let tinode = self.pool.tinode(self.slot);
        let region = &tinode.placement;
        let r = &tinode.brokers[self.me as usize].replication;
        let version = self.c.observe(&region.version);
        if version == self.placement.version() && self.c.observe(&r.placement_seen) == version {
            return Ok(());
        }
        let new = Placement::read(self.c, region);
        let changed = new.changed_from(&self.placement);
        self.placement = new;
        if let Some(from) = changed.filter(|f| *f < self.read_end) {
            let b = Backfill::start(
                self.pool,
                self.c,
                &self.topic,
                &self.dir,
                self.era,
                self.cfg,
                (from, self.read_end),
            )?;
            ::log::info!(
                "broker slot {}: topic {:?}: replica sets from total order {from} changed; \
                 writing total orders {from}..{} of its sets again into {}",
                self.me,
                self.topic,
                self.read_end,
                b.dir.display()
            );
            let lowered = b.sub.position();
            self.backfills.push(b);
            if self.published > lowered {
                self.c.publish(&r.durable_delivery, lowered);
                self.published = lowered;
            }
            let total = self.c.observe(&r.durable_total_order);
            if total > from {
                self.c.publish(&r.durable_total_order, from);
            }
        }
        self.c.publish(&r.placement_seen, self.placement.version());
        Ok(())
    }

    /// Backfills that read their whole range and synced it: marked complete and dropped.
    fn finish_backfills(&mut self) -> Result<(), ReplicationError> {
        let mut i = 0;
        while i < self.backfills.len() {
            let b = &self.backfills[i];
            if b.read_end >= b.end && b.log.unsynced_bytes() == 0 {
                let b = self.backfills.swap_remove(i);
                b.complete()?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Everything appended is synced: say so in the pool. The progress is the lowest of the
    /// main read and every unfinished backfill's.
    fn publish(&mut self) {
        let through = self
            .backfills
            .iter()
            .map(|b| b.sub.position())
            .fold(self.appended_through, u64::min);
        let total = self
            .backfills
            .iter()
            .map(|b| b.read_end)
            .fold(self.read_end, u64::min);
        if self.published >= through {
            return;
        }
        let r = &self.pool.tinode(self.slot).brokers[self.me as usize].replication;
        for (src, bytes) in self.bytes_by_src.iter().enumerate() {
            r.replication_done[src].store(*bytes, crate::sync::Ordering::Relaxed);
        }
        // The delivery index first: a process killed between the two stores leaves the
        // total order behind it, and the control process re-places a dead slot from its
        // total order (an older one is safe, a newer one would claim batches it never
        // synced).
        self.c.publish(&r.durable_delivery, through);
        r.durable_total_order
            .store(total, crate::sync::Ordering::Release);
        self.published = through;
        // It synced: whatever failed before is behind it.
        if self.c.observe(&r.disk_error) != 0 {
            self.c.publish(&r.disk_error, 0);
        }
    }

    /// Syncs what is appended and publishes it (at shutdown).
    pub fn flush(&mut self) -> Result<(), ReplicationError> {
        self.log.sync()?;
        for b in &mut self.backfills {
            b.log.sync()?;
        }
        self.publish();
        Ok(())
    }

    /// Backfills running (for tests and operators).
    pub fn backfills(&self) -> usize {
        self.backfills.len()
    }
}

/// One pass of a replicator's reading: the batches a subscriber hands out, each appended to
/// `log` when this broker's slot is in its replica set (by the placement table), it is not in
/// the log already (its end in this era, as the pass begins) and it lies below `end`.
struct Pass<'a> {
    /// A backfill's: the main log, whose batches are not written again.
    held_by: Option<&'a DiskLog>,
    me: u32,
    rf: u8,
    slots: u32,
    era: u64,
    placement: &'a Placement,
    end: u64,
    body: &'a mut Body,
    log: &'a mut DiskLog,
    bytes_by_src: &'a mut Vec<u64>,
    /// Total order after the last batch read (appended or passed over).
    read_end: &'a mut u64,
}

impl Pass<'_> {
    fn poll<C: Coherence>(
        &mut self,
        sub: &mut Subscriber<'_, C>,
        now: Instant,
    ) -> Result<usize, ReplicationError> {
        let Pass {
            held_by,
            me,
            rf,
            slots,
            era,
            placement,
            end,
            ..
        } = *self;
        if *self.read_end >= end {
            return Ok(0);
        }
        let skip_below = self.log.end_of_era(era);
        let (body, log) = (&mut *self.body, &mut *self.log);
        let (bytes_by_src, read_end) = (&mut *self.bytes_by_src, &mut *self.read_end);
        let mut batches = 0;
        // Whether the batch being read is appended: decided at its first message.
        let mut keep = false;
        let mut failed = None;
        sub.poll_batches(64, |m, origin| {
            let first = m.total_order - u64::from(m.index);
            if first >= end {
                return;
            }
            if m.index == 0 {
                body.clear();
                keep = placement
                    .replica_set(origin.broker, rf, slots, first)
                    .any(|r| r == me)
                    && skip_below.is_none_or(|s| first >= s)
                    && held_by.is_none_or(|l| l.find(era, first).is_none());
            }
            if keep {
                body.push(m.payload);
            }
            if m.index + 1 == m.num_msg {
                batches += 1;
                *read_end = first + u64::from(m.num_msg);
                if keep && failed.is_none() && body.count() == m.num_msg {
                    let meta = RecordMeta {
                        total_order: first,
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
                        }
                        Err(e) => failed = Some(e),
                    }
                }
            }
        })?;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(batches),
        }
    }
}

/// Batches a replicator read before a placement change put them in its replica sets, read
/// again (total orders `[from, end)`) and written into a log of their own: the directory
/// `backfill-FROM-END-ERA` in the topic's log directory, marked `complete` once done. The
/// disk readers read those logs beside the topic's.
struct Backfill<'p, C: Coherence> {
    sub: Subscriber<'p, C>,
    log: DiskLog,
    dir: std::path::PathBuf,
    end: u64,
    read_end: u64,
}

/// The file that marks a backfill directory done.
const BACKFILL_COMPLETE: &str = "complete";

impl<'p, C: Coherence> Backfill<'p, C> {
    #[allow(clippy::too_many_arguments)]
    fn start(
        pool: &'p Pool,
        c: C,
        topic: &str,
        topic_dir: &Path,
        era: u64,
        cfg: LogConfig,
        (from, end): (u64, u64),
    ) -> Result<Self, ReplicationError> {
        let dir = topic_dir.join(format!("backfill-{from:020}-{end:020}-{era:016x}"));
        Self::open_dir(pool, c, topic, dir, era, cfg, (from, end))
    }

    #[allow(clippy::too_many_arguments)]
    fn open_dir(
        pool: &'p Pool,
        c: C,
        topic: &str,
        dir: std::path::PathBuf,
        era: u64,
        cfg: LogConfig,
        (from, end): (u64, u64),
    ) -> Result<Self, ReplicationError> {
        let (log, _) = DiskLog::open(&dir, cfg)?;
        let at = log.end_of_era(era).map_or(from, |e| e.max(from));
        // Every disk, this broker's own included: the range holds batches this broker has
        // in its main log (of its sets before the change), which it reads through, and which
        // may be nowhere else any more (the pool reclaimed them; the dead broker never wrote
        // them).
        let sub = Subscriber::open_with(pool, c, topic, StartAt::TotalOrder(at), Disks::Every)?;
        Ok(Backfill {
            sub,
            log,
            dir,
            end,
            read_end: at,
        })
    }

    /// The backfills of `topic_dir` not marked complete, of this era, reopened where their
    /// logs end (a backfill of another era is moot: the placement table began again).
    fn unfinished(
        pool: &'p Pool,
        c: C,
        topic: &str,
        topic_dir: &Path,
        era: u64,
        cfg: LogConfig,
    ) -> Result<Vec<Self>, ReplicationError> {
        let mut out = Vec::new();
        for (dir, from, end, e) in backfill_dirs(topic_dir) {
            if e != era || dir.join(BACKFILL_COMPLETE).exists() {
                continue;
            }
            out.push(Self::open_dir(pool, c, topic, dir, era, cfg, (from, end))?);
        }
        Ok(out)
    }

    /// Marks the backfill done (its log synced already).
    fn complete(self) -> Result<(), ReplicationError> {
        let path = self.dir.join(BACKFILL_COMPLETE);
        std::fs::write(&path, b"")
            .map_err(|e| ReplicationError::Log(log::io("cannot write", &path)(e)))?;
        ::log::info!("backfill {} complete", self.dir.display());
        Ok(())
    }
}

/// The backfill directories in a topic's log directory: `(path, from, end, era)`, by name.
pub fn backfill_dirs(topic_dir: &Path) -> Vec<(std::path::PathBuf, u64, u64, u64)> {
    let Ok(rd) = std::fs::read_dir(topic_dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = rd
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let mut parts = name.strip_prefix("backfill-")?.split('-');
            let from = parts.next()?.parse().ok()?;
            let end = parts.next()?.parse().ok()?;
            let era = u64::from_str_radix(parts.next()?, 16).ok()?;
            Some((e.path(), from, end, era))
        })
        .collect();
    out.sort();
    out
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
