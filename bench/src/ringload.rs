//! The two worker processes of `embar ring-bench` on the pool: a **lander** that writes batches of
//! messages into log segments of the pool and publishes them into a broker's batch ring (what
//! a broker does with a landed batch), and a **drainer** that takes them from the ring, checks
//! every message, and finishes the slots, possibly out of order (what the sequencer does).
//! Log space is reused once the drainer's watermark has passed every batch of a segment.
//!
//! Each prints one JSON line with what it did; `embar ring-bench` ([`crate::ring`]) starts them
//! and reads those lines.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use embar_dataplane::batch::{BatchDesc, BatchLimits, BatchWriter};
use embar_dataplane::messages::Messages;
use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::layout::{message_stride, MessageHeader, BATCH_HEADER_VERSION};
use embar_dataplane::pool::segments::{AllocPolicy, Segment, SegmentAllocator, SegmentOwner};
use embar_dataplane::pool::{CoherenceFn, Pool};
use embar_dataplane::ring::{Polled, RingConsumer, RingError, RingProducer};
use embar_dataplane::PoolError;
use embar_sys::clock::monotonic_ns;
use serde::{Deserialize, Serialize};

use crate::cluster::open_pool as open;
use crate::{BenchError, BenchResult};

/// How long a worker waits without progress before it gives up with an error.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Spins before a waiting worker starts yielding its core.
const SPINS_BEFORE_YIELD: u32 = 64;

/// What both workers agree on.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
pub struct Workload {
    #[arg(long)]
    pub pool: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub topic_slot: u32,
    #[arg(long, default_value_t = 0)]
    pub broker: u32,
    #[arg(long, default_value_t = 1)]
    pub client_id: u64,
    #[arg(long)]
    pub messages: u64,
    #[arg(long)]
    pub message_bytes: u64,
    #[arg(long)]
    pub batch_bytes: u64,
    /// Seed of the payload template.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
}

impl Workload {
    pub fn messages_per_batch(&self) -> u64 {
        (self.batch_bytes / message_stride(self.message_bytes)).max(1)
    }

    pub fn batches(&self) -> u64 {
        self.messages.div_ceil(self.messages_per_batch())
    }

    fn template(&self) -> Vec<u8> {
        crate::noise_bytes(self.seed, self.message_bytes as usize)
    }
}

/// A fault the lander injects on purpose, to show that the drainer's checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Fault {
    /// Never publish batch 1 (a gap in the client's sequence).
    SkipBatch,
    /// Publish batch 1 twice.
    DuplicateBatch,
    /// Flip a payload byte of one message after its checksum is fixed.
    CorruptPayload,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LanderReport {
    pub batches: u64,
    pub messages: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub ring_full_waits: u64,
    pub segment_waits: u64,
    pub segments_reused: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DrainerReport {
    pub batches: u64,
    pub messages: u64,
    pub payload_bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub ring_laps: u64,
    pub error_count: u64,
    pub errors: Vec<String>,
    /// Publish-to-take latency of the batches, nanoseconds.
    pub batch_latency_ns: LatencySummary,
}

/// Percentiles of a latency sample, nanoseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl LatencySummary {
    pub fn of(mut samples: Vec<u64>) -> LatencySummary {
        samples.sort_unstable();
        let at = |q: f64| {
            if samples.is_empty() {
                return 0;
            }
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i]
        };
        LatencySummary {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// Spin, then yield; reports a stall past [`STALL_LIMIT`].
struct Waiter {
    spins: u32,
    since: Option<Instant>,
}

impl Waiter {
    fn new() -> Waiter {
        Waiter {
            spins: 0,
            since: None,
        }
    }

    fn progress(&mut self) {
        self.spins = 0;
        self.since = None;
    }

    fn wait(&mut self, what: &'static str) -> BenchResult<()> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > STALL_LIMIT {
            return Err(BenchError::Stalled {
                what,
                limit: STALL_LIMIT,
            });
        }
        if self.spins < SPINS_BEFORE_YIELD {
            self.spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        Ok(())
    }
}

/// Runs the lander with the pool's coherence mode.
pub fn run_lander(w: &Workload, fault: Option<Fault>) -> BenchResult<LanderReport> {
    let pool = open(&w.pool)?;
    struct Go<'a>(&'a Pool, &'a Workload, Option<Fault>);
    impl CoherenceFn<BenchResult<LanderReport>> for Go<'_> {
        fn call<C: Coherence>(self, c: C) -> BenchResult<LanderReport> {
            land(self.0, c, self.1, self.2)
        }
    }
    Pool::with_coherence(pool.coherence_mode(), Go(&pool, w, fault))
}

/// Runs the drainer with the pool's coherence mode.
pub fn run_drainer(w: &Workload, hold: usize) -> BenchResult<DrainerReport> {
    let pool = open(&w.pool)?;
    struct Go<'a>(&'a Pool, &'a Workload, usize);
    impl CoherenceFn<BenchResult<DrainerReport>> for Go<'_> {
        fn call<C: Coherence>(self, c: C) -> BenchResult<DrainerReport> {
            drain(self.0, c, self.1, self.2)
        }
    }
    Pool::with_coherence(pool.coherence_mode(), Go(&pool, w, hold))
}

/// The lander's log: segments in use, each with the last ring index that points into it.
struct Log<'p, C: Coherence> {
    alloc: SegmentAllocator<'p, C>,
    full: VecDeque<(Segment, u64)>,
    current: Option<(Segment, u64)>,
    fill: u64,
    reused: u64,
    waits: u64,
}

impl<C: Coherence> Log<'_, C> {
    /// Frees every closed segment whose batches are all below the consumer's watermark.
    fn retire(&mut self, consumed: u64) -> BenchResult<()> {
        while let Some(&(seg, last)) = self.full.front() {
            if last >= consumed {
                break;
            }
            self.alloc.free(&seg)?;
            self.full.pop_front();
            self.reused += 1;
        }
        Ok(())
    }

    /// Log space for `len` bytes that the batch with ring index `index` will use.
    fn reserve<P: Coherence>(
        &mut self,
        len: u64,
        index: u64,
        ring: &mut RingProducer<'_, P>,
    ) -> BenchResult<u64> {
        let fits = self
            .current
            .is_some_and(|(s, _)| self.fill + len <= s.bytes);
        if !fits {
            if let Some(closed) = self.current.take() {
                self.full.push_back(closed);
            }
            let mut waiter = Waiter::new();
            let seg = loop {
                self.retire(ring.consumed())?;
                match self.alloc.alloc() {
                    Ok(s) => break s,
                    Err(PoolError::NoFreeSegment { .. }) => {
                        self.waits += 1;
                        waiter.wait("a free segment")?
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            self.current = Some((seg, index));
            self.fill = 0;
        }
        let (seg, last) = self.current.as_mut().expect("a current segment");
        *last = index;
        let off = seg.offset + self.fill;
        self.fill += len;
        Ok(off)
    }
}

fn land<C: Coherence>(
    pool: &Pool,
    c: C,
    w: &Workload,
    fault: Option<Fault>,
) -> BenchResult<LanderReport> {
    let ring = pool.ring(w.topic_slot, w.broker)?;
    let mut producer = RingProducer::new(ring, c);
    let owner = SegmentOwner {
        topic: w.topic_slot,
        broker: w.broker,
    };
    let mut log = Log {
        alloc: SegmentAllocator::new(pool, c, owner, AllocPolicy::Shared)?,
        full: VecDeque::new(),
        current: None,
        fill: 0,
        reused: 0,
        waits: 0,
    };
    let per_batch = w.messages_per_batch();
    let stride = message_stride(w.message_bytes);
    let start_ns = monotonic_ns();
    let mut ring_full_waits = 0;
    let mut logical = 0u64;
    let mut sent_batches = 0u64;
    let mut batch_seq = 0u64;
    let mut payload = w.template();
    while logical < w.messages {
        let n = per_batch.min(w.messages - logical);
        let total = n * stride;
        let index = producer.next_index();
        let off = log.reserve(total, index, &mut producer)?;
        let base = pool.data_ptr(off, total)?;
        // SAFETY: `base` points at `total` bytes of a segment this lander owns, reserved for
        // this batch only (64-byte aligned: segments and strides are); the drainer reads it
        // only once it is published.
        let mut batch = unsafe { BatchWriter::new(base, total) };
        let ts = monotonic_ns();
        for i in 0..n {
            let lo = logical + i;
            stamp(&mut payload, lo);
            let header = MessageHeader {
                client_id: w.client_id,
                batch_seq,
                logical_offset: lo,
                publish_ts_ns: ts,
                ..MessageHeader::default()
            };
            // The fault flips the last payload byte of message 0 of batch 1.
            let corrupt = fault == Some(Fault::CorruptPayload) && batch_seq == 1 && i == 0;
            if let Some(b) = payload.last_mut().filter(|_| corrupt) {
                *b ^= 0x40;
            }
            batch.append(&header, &payload)?;
            if let Some(b) = payload.last_mut().filter(|_| corrupt) {
                *b ^= 0x40;
            }
        }
        // SAFETY: the batch's bytes lie inside the mapping (checked by `data_ptr`).
        unsafe { c.writeback_range(base, batch.fill() as usize) };
        let desc = BatchDesc {
            batch_seq,
            client_id: w.client_id,
            num_msg: batch.num_msg(),
            broker_id: w.broker,
            total_size: batch.fill(),
            log_idx: off,
            start_logical_offset: logical,
            version_flags: u64::from(BATCH_HEADER_VERSION),
        };
        let copies = match fault {
            Some(Fault::SkipBatch) if batch_seq == 1 => 0,
            Some(Fault::DuplicateBatch) if batch_seq == 1 => 2,
            _ => 1,
        };
        for _ in 0..copies {
            let mut waiter = Waiter::new();
            loop {
                match producer.try_publish(&desc) {
                    Ok(_) => break,
                    Err(RingError::Full { .. }) => {
                        ring_full_waits += 1;
                        waiter.wait("a free ring slot")?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            sent_batches += 1;
        }
        logical += n;
        batch_seq += 1;
    }
    Ok(LanderReport {
        batches: sent_batches,
        messages: logical,
        start_ns,
        end_ns: monotonic_ns(),
        ring_full_waits,
        segment_waits: log.waits,
        segments_reused: log.reused,
    })
}

/// Puts the message's logical offset in the first (up to 8) payload bytes; the rest is the
/// template.
fn stamp(payload: &mut [u8], logical: u64) {
    let k = payload.len().min(8);
    payload[..k].copy_from_slice(&logical.to_le_bytes()[..k]);
}

/// Wrapping sum of bytes as little-endian words (and a tail): a cheap read of every byte.
pub fn payload_sum(bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    let mut sum = 0u64;
    for ch in &mut chunks {
        sum = sum.wrapping_add(u64::from_le_bytes(ch.try_into().expect("8 bytes")));
    }
    for (i, b) in chunks.remainder().iter().enumerate() {
        sum = sum.wrapping_add(u64::from(*b) << (8 * i));
    }
    sum
}

struct Checker {
    w: Workload,
    /// Sum of the template past the stamped prefix: what every payload's tail must sum to.
    tail_sum: u64,
    next_batch_seq: u64,
    next_logical: u64,
    errors: Vec<String>,
    error_count: u64,
}

impl Checker {
    fn new(w: &Workload) -> Checker {
        let template = w.template();
        Checker {
            w: w.clone(),
            tail_sum: payload_sum(&template[template.len().min(8)..]),
            next_batch_seq: 0,
            next_logical: 0,
            errors: Vec::new(),
            error_count: 0,
        }
    }

    fn fail(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }

    /// Checks one batch: its place in the client's sequence, then every message's header and
    /// payload. Returns the batch's publish stamp, or `None` for a batch out of sequence.
    fn check<C: Coherence>(&mut self, pool: &Pool, c: C, d: &BatchDesc) -> Option<u64> {
        if d.batch_seq < self.next_batch_seq {
            self.fail(format!(
                "batch_seq {} arrived again (duplicate)",
                d.batch_seq
            ));
            return None;
        }
        if d.batch_seq > self.next_batch_seq {
            self.fail(format!(
                "batch_seq {} arrived where {} was next (gap)",
                d.batch_seq, self.next_batch_seq
            ));
            self.next_logical = d.start_logical_offset;
        }
        self.next_batch_seq = d.batch_seq + 1;
        let m = match Messages::check_all(pool, c, d) {
            Ok(m) => m,
            Err(e) => {
                self.fail(format!("batch {}: {e}", d.batch_seq));
                self.next_logical += u64::from(d.num_msg);
                return None;
            }
        };
        let n = self.w.message_bytes as usize;
        let k = n.min(8);
        let mut ts = None;
        for r in m.iter() {
            let h = match r {
                Ok(m) => m,
                Err(e) => {
                    self.fail(format!("batch {}: {e}", d.batch_seq));
                    break;
                }
            };
            let (payload, h) = (h.payload, h.header);
            ts.get_or_insert(h.publish_ts_ns);
            let lo = self.next_logical;
            if payload.len() != n || h.logical_offset != lo {
                self.fail(format!(
                    "message {lo}: header {h:?} does not match its batch"
                ));
            } else if payload[..k] != lo.to_le_bytes()[..k]
                || payload_sum(&payload[k..]) != self.tail_sum
            {
                self.fail(format!(
                    "message {lo}: payload does not match what was published"
                ));
            }
            self.next_logical += 1;
        }
        ts
    }
}

fn drain<C: Coherence>(pool: &Pool, c: C, w: &Workload, hold: usize) -> BenchResult<DrainerReport> {
    let ring = pool.ring(w.topic_slot, w.broker)?;
    let limits = BatchLimits::new(*pool.geometry(), w.broker);
    let mut consumer = RingConsumer::new(ring, c, limits);
    let capacity = u64::from(pool.geometry().ring_slots);
    let hold = hold.min(capacity as usize - 1);
    let mut checker = Checker::new(w);
    let mut held: Vec<u64> = Vec::with_capacity(hold + 1);
    let mut latencies = Vec::with_capacity(w.batches() as usize);
    let mut batches = 0;
    let mut first_ns = 0;
    let mut waiter = Waiter::new();
    while checker.next_batch_seq < w.batches() {
        match consumer.poll()? {
            Some(Polled::Batch { index, desc }) => {
                waiter.progress();
                if first_ns == 0 {
                    first_ns = monotonic_ns();
                }
                batches += 1;
                if let Some(ts) = checker.check(pool, c, &desc) {
                    latencies.push(monotonic_ns().saturating_sub(ts));
                }
                held.push(index);
                if held.len() > hold {
                    // Finish newest first: the watermark must wait for the oldest.
                    while let Some(i) = held.pop() {
                        consumer.finish(i)?;
                    }
                }
            }
            Some(Polled::Invalid { index, reason, .. }) => {
                checker.fail(format!("ring index {index} rejected: {reason}"));
                consumer.finish(index)?;
            }
            None => {
                if let Err(e) = waiter.wait("the next batch") {
                    checker.fail(e.to_string());
                    break;
                }
            }
        }
    }
    while let Some(i) = held.pop() {
        consumer.finish(i)?;
    }
    // Anything published past the expected end is an extra (duplicate) batch.
    std::thread::sleep(Duration::from_millis(20));
    if let Some(p) = consumer.poll()? {
        checker.fail(format!(
            "an extra batch at ring index {} after the last expected one",
            p.index()
        ));
        consumer.finish(p.index())?;
    }
    let last_ns = monotonic_ns();
    Ok(DrainerReport {
        batches,
        messages: checker.next_logical,
        payload_bytes: checker.next_logical * w.message_bytes,
        first_ns,
        last_ns,
        ring_laps: consumer.consumed() / capacity,
        error_count: checker.error_count,
        errors: checker.errors,
        batch_latency_ns: LatencySummary::of(latencies),
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ChurnReport {
    pub allocations: u64,
    pub collisions: u64,
    pub exhausted: u64,
}

/// Allocates and frees segments as fast as it can for `rounds` rounds, holding up to
/// `hold` at a time, stamping each held segment with this process's tag and checking the
/// stamp before freeing it. Two owners of one segment would show as a changed stamp.
pub fn run_segment_churn(
    pool_path: &std::path::Path,
    broker: u32,
    rounds: u64,
    hold: usize,
) -> BenchResult<ChurnReport> {
    let pool = open(pool_path)?;
    let c = embar_dataplane::pool::coherence::Coherent;
    let owner = SegmentOwner { topic: 0, broker };
    let mut alloc = SegmentAllocator::new(&pool, c, owner, AllocPolicy::Shared)?;
    let tag = (u64::from(std::process::id()) << 16) | u64::from(broker);
    let mut held: VecDeque<(Segment, u64)> = VecDeque::new();
    let mut report = ChurnReport {
        allocations: 0,
        collisions: 0,
        exhausted: 0,
    };
    let stamp_at =
        |s: &Segment| -> BenchResult<*mut u64> { Ok(pool.data_ptr(s.offset, 8)?.cast::<u64>()) };
    for round in 0..rounds {
        match alloc.alloc() {
            Ok(s) => {
                let value = tag ^ (round << 32);
                // SAFETY: the first 8 bytes of a segment this process was just given; an
                // aligned u64 inside the checked range.
                unsafe { stamp_at(&s)?.write_volatile(value) };
                held.push_back((s, value));
                report.allocations += 1;
            }
            Err(PoolError::NoFreeSegment { .. }) => report.exhausted += 1,
            Err(e) => return Err(e.into()),
        }
        if held.len() > hold || (round % 3 == 0 && !held.is_empty()) {
            std::thread::yield_now();
            let (s, value) = held.pop_front().expect("held is not empty");
            // SAFETY: as above; the segment is still held by this process.
            if unsafe { stamp_at(&s)?.read_volatile() } != value {
                report.collisions += 1;
            }
            alloc.free(&s)?;
        }
    }
    for (s, _) in held {
        alloc.free(&s)?;
    }
    Ok(report)
}
