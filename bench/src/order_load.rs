//! Worker processes for testing the sequencer between real processes:
//!
//! - `feed`: plays broker `b` of `B`. For clients `0..K`, batch `k` of client `c` goes to broker
//!   `(k + c) % B`, so each client's batches are spread over brokers and reach the sequencer
//!   out of order; some batches are published twice (a resend).
//! - `verify-order`: after a run, reads every ring slot of the topic (the ring must hold the
//!   whole run) and checks the result with the ordering checker, including ORDER 4's stamps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use embar_dataplane::batch::{BatchDesc, BatchWriter};
use embar_dataplane::checker::{Delivered, OrderChecker};
use embar_dataplane::messages::Messages;
use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::layout::{message_stride, MessageHeader, BATCH_HEADER_VERSION};
use embar_dataplane::pool::segments::{AllocPolicy, SegmentAllocator, SegmentOwner};
use embar_dataplane::pool::{OpenOptions, Pool};
use embar_dataplane::ring::{RingError, RingProducer};
use serde::{Deserialize, Serialize};

use crate::{BenchError, BenchResult};

#[derive(Clone, Debug, clap::Args)]
pub struct FeedArgs {
    #[arg(long)]
    pub pool: PathBuf,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub broker: u32,
    #[arg(long)]
    pub brokers: u32,
    #[arg(long)]
    pub clients: u64,
    #[arg(long)]
    pub batches_per_client: u64,
    #[arg(long, default_value_t = 4)]
    pub messages_per_batch: u32,
    #[arg(long, default_value_t = 16)]
    pub message_bytes: u32,
    /// Publish every Nth batch twice (0: never).
    #[arg(long, default_value_t = 0)]
    pub duplicate_every: u64,
    /// Pause between batches, microseconds.
    #[arg(long, default_value_t = 0)]
    pub pace_us: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FeedReport {
    pub batches: u64,
    pub duplicates: u64,
}

fn open(path: &Path) -> BenchResult<Pool> {
    Ok(Pool::open(path, &OpenOptions::default())?)
}

pub fn feed(a: &FeedArgs) -> BenchResult<FeedReport> {
    let pool = open(&a.pool)?;
    let c = Coherent;
    let topic_slot = pool.find_topic(c, &a.topic)?;
    let mut producer = RingProducer::new(pool.ring(topic_slot, a.broker)?, c);
    let owner = SegmentOwner {
        topic: topic_slot,
        broker: a.broker,
    };
    let mut alloc = SegmentAllocator::new(&pool, c, owner, AllocPolicy::Shared)?;
    let stride = message_stride(u64::from(a.message_bytes));
    let total = stride * u64::from(a.messages_per_batch);
    let mut seg = alloc.alloc()?;
    let mut fill = 0;
    let payload = vec![0xabu8; a.message_bytes as usize];
    let mut report = FeedReport {
        batches: 0,
        duplicates: 0,
    };
    for k in 0..a.batches_per_client {
        for client in 0..a.clients {
            if (k + client) % u64::from(a.brokers) != u64::from(a.broker) {
                continue;
            }
            if fill + total > seg.bytes {
                seg = alloc.alloc().map_err(|e| {
                    BenchError::Run(format!("{e} (the feed never reuses log space)"))
                })?;
                fill = 0;
            }
            let off = seg.offset + fill;
            fill += total;
            let base = pool.data_ptr(off, total)?;
            // SAFETY: a batch range of a segment this feed owns and never reuses, 64-byte
            // aligned; the sequencer reads it only once it is published.
            let mut batch = unsafe { BatchWriter::new(base, total) };
            for i in 0..u64::from(a.messages_per_batch) {
                let h = MessageHeader {
                    client_id: client,
                    batch_seq: k,
                    logical_offset: i,
                    total_order: u64::MAX,
                    ..MessageHeader::default()
                };
                batch.append(&h, &payload)?;
            }
            let desc = BatchDesc {
                batch_seq: k,
                client_id: client,
                num_msg: a.messages_per_batch,
                broker_id: a.broker,
                total_size: total,
                log_idx: off,
                start_logical_offset: 0,
                version_flags: u64::from(BATCH_HEADER_VERSION),
            };
            report.batches += 1;
            let copies = if a.duplicate_every > 0 && report.batches % a.duplicate_every == 0 {
                report.duplicates += 1;
                2
            } else {
                1
            };
            for _ in 0..copies {
                loop {
                    match producer.try_publish(&desc) {
                        Ok(_) => break,
                        Err(RingError::Full { .. }) => std::thread::yield_now(),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if a.pace_us > 0 {
                std::thread::sleep(Duration::from_micros(a.pace_us));
            }
        }
    }
    Ok(report)
}

#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub pool: PathBuf,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub brokers: u32,
    /// Messages the run must have ordered.
    #[arg(long)]
    pub expect_messages: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    pub ordered_batches: u64,
    pub unordered_slots: u64,
    pub messages: u64,
    pub order: u8,
    pub epoch: u64,
    pub duplicates_dropped: u64,
    pub check: String,
}

pub fn verify(a: &VerifyArgs) -> BenchResult<VerifyReport> {
    let pool = open(&a.pool)?;
    let c = Coherent;
    let topic_slot = pool.find_topic(c, &a.topic)?;
    let info = pool
        .read_topic(c, topic_slot)
        .ok_or_else(|| BenchError::Run(format!("topic {:?} vanished", a.topic)))?;
    let slots_n = u64::from(pool.geometry().ring_slots);
    let mut ordered = Vec::new();
    let mut unordered = 0;
    for b in 0..a.brokers {
        let slots = pool.ring_slots(topic_slot, b)?;
        let written = pool.tinode(topic_slot).brokers[b as usize]
            .broker
            .written
            .load(std::sync::atomic::Ordering::Acquire);
        if written > slots_n {
            return Err(BenchError::Run(format!("broker {b}'s ring wrapped ({written} > {slots_n} slots): verification needs a ring that holds the run")));
        }
        for (idx, slot) in slots.iter().enumerate().take(written as usize) {
            if slot.ordered.load(std::sync::atomic::Ordering::Acquire) == idx as u64 + 1
                && slot.outcome.load(std::sync::atomic::Ordering::Relaxed)
                    == embar_dataplane::pool::layout::OUTCOME_ORDERED
            {
                ordered.push((
                    slot.total_order.load(std::sync::atomic::Ordering::Relaxed),
                    BatchDesc::load(slot),
                ));
            } else {
                unordered += 1;
            }
        }
    }
    ordered.sort_by_key(|(first, _)| *first);
    let fifo = matches!(info.config.order, 4 | 5);
    let mut checker = OrderChecker::new(fifo);
    let mut check = Ok(());
    'outer: for (first, d) in &ordered {
        let m = match Messages::check(&pool, c, d) {
            Ok(m) => m,
            Err(e) => {
                check = Err(format!("batch at {}: {e}", d.log_idx));
                break 'outer;
            }
        };
        for r in m.iter() {
            let (i, h) = match r {
                Ok(m) => (m.index, m.header),
                Err(e) => {
                    check = Err(format!("batch at {}: {e}", d.log_idx));
                    break 'outer;
                }
            };
            if info.config.order == 4 && h.total_order != first + u64::from(i) {
                check = Err(format!(
                    "ORDER 4 stamp {} where {} was assigned",
                    h.total_order,
                    first + u64::from(i)
                ));
                break 'outer;
            }
            let m = Delivered {
                total_order: first + u64::from(i),
                client_id: d.client_id,
                batch_seq: d.batch_seq,
                index: i,
                num_msg: d.num_msg,
            };
            if let Err(v) = checker.push(&m) {
                check = Err(v.to_string());
                break 'outer;
            }
        }
    }
    if check.is_ok() {
        check = checker
            .finish(a.expect_messages)
            .map(|_| ())
            .map_err(|v| v.to_string());
    }
    let st = pool.sequencer_state(topic_slot);
    Ok(VerifyReport {
        ordered_batches: ordered.len() as u64,
        unordered_slots: unordered,
        messages: checker.delivered(),
        order: info.config.order,
        epoch: st.epoch.load(std::sync::atomic::Ordering::Acquire),
        duplicates_dropped: st.duplicates.load(std::sync::atomic::Ordering::Acquire),
        check: match check {
            Ok(()) => "passed".into(),
            Err(e) => e,
        },
    })
}
