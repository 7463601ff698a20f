//! The broker's replication thread: one [`Replicator`] per topic with a replication factor,
//! found by scanning the topic table every 100 ms, each polled in turn; an idle round sleeps
//! 1 ms (the thread must not take a core from the data path on a small host). At stop, every
//! log is synced and its progress published.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, OpenOptions, Pool};
use embar_dataplane::replication::Replicator;

use crate::node::ReplicationConfig;

/// How often the topic table is scanned for new, deleted or recreated topics (and a topic
/// whose replicator failed is tried again).
const TOPIC_SCAN_INTERVAL: Duration = Duration::from_millis(100);
/// Sleep of a round that found nothing to do.
const IDLE_SLEEP: Duration = Duration::from_millis(1);

/// Runs until `stop`; errors are logged (a topic whose log fails is retried at the next
/// scan, and its progress stays where it was, so nothing it did not sync is acked).
pub fn run(pool_path: &Path, me: u32, cfg: &ReplicationConfig, stop: &AtomicBool) {
    let pool = match Pool::open(pool_path, &OpenOptions::default()) {
        Ok(p) => p,
        Err(e) => {
            log::error!("broker {me}: replication cannot open the pool: {e}; no replica here");
            return;
        }
    };
    Pool::with_coherence(
        pool.coherence_mode(),
        Go {
            pool: &pool,
            me,
            cfg,
            stop,
        },
    )
}

struct Go<'a> {
    pool: &'a Pool,
    me: u32,
    cfg: &'a ReplicationConfig,
    stop: &'a AtomicBool,
}

impl CoherenceFn<()> for Go<'_> {
    fn call<C: Coherence>(self, c: C) {
        let Go {
            pool,
            me,
            cfg,
            stop,
        } = self;
        // By topic slot: (generation, its replicator).
        let mut topics: HashMap<u32, (u64, Replicator<'_, C>)> = HashMap::new();
        let mut last_scan: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if last_scan.is_none_or(|t| now.duration_since(t) >= TOPIC_SCAN_INTERVAL) {
                last_scan = Some(now);
                scan(pool, c, me, cfg, &mut topics);
            }
            let mut work = 0;
            let mut failed = Vec::new();
            for (slot, (_, r)) in topics.iter_mut() {
                match r.poll(now) {
                    Ok(n) => work += n,
                    Err(e) => {
                        log::error!("broker {me}: replication of topic slot {slot}: {e}");
                        failed.push(*slot);
                    }
                }
            }
            for slot in failed {
                topics.remove(&slot);
            }
            if work == 0 {
                std::thread::sleep(IDLE_SLEEP);
            }
        }
        for (slot, (_, r)) in topics.iter_mut() {
            if let Err(e) = r.flush() {
                log::error!("broker {me}: replication of topic slot {slot} at stop: {e}");
            }
        }
    }
}

/// Starts a replicator for each topic with a replication factor that has none, and drops
/// those of topics deleted or recreated.
fn scan<'p, C: Coherence>(
    pool: &'p Pool,
    c: C,
    me: u32,
    cfg: &ReplicationConfig,
    topics: &mut HashMap<u32, (u64, Replicator<'p, C>)>,
) {
    for slot in 0..pool.geometry().max_topics {
        let info = pool.read_topic(c, slot);
        match (&info, topics.get(&slot)) {
            (Some(i), Some((gen, _))) if *gen == i.generation => continue,
            (_, Some(_)) => {
                if let Some((_, mut r)) = topics.remove(&slot) {
                    let _ = r.flush();
                }
            }
            _ => {}
        }
        let Some(info) = info else { continue };
        if info.config.replication_factor == 0 {
            continue;
        }
        match Replicator::open(pool, c, me, &info.name, &cfg.data_dir, cfg.log) {
            Ok((r, rec)) => {
                if rec.truncated_bytes > 0 {
                    log::warn!(
                        "broker {me}: log of topic {:?}: kept {} records, cut {} bytes ({})",
                        info.name,
                        rec.records,
                        rec.truncated_bytes,
                        rec.reason.as_deref().unwrap_or("")
                    );
                }
                log::info!(
                    "broker {me}: replicating topic {:?} (RF {}) into {} ({} records recovered)",
                    info.name,
                    info.config.replication_factor,
                    cfg.data_dir.display(),
                    rec.records
                );
                topics.insert(slot, (info.generation, r));
            }
            Err(e) => log::error!(
                "broker {me}: cannot replicate topic {:?}: {e}; trying again",
                info.name
            ),
        }
    }
}
