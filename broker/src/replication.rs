//! The broker's replication thread: one [`Replicator`] per topic with a replication factor,
//! found by scanning the topic table every 100 ms, each polled in turn; an idle round sleeps
//! 1 ms, or until the next scan when no topic is replicated (the thread must not take a core
//! from the data path on a small host). At stop, every log is synced and its progress
//! published.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use embar_dataplane::pool::coherence::Coherence;
use embar_dataplane::pool::{CoherenceFn, OpenOptions, Pool};
use embar_dataplane::replication::{report_disk_failure, Replicator};

use crate::node::ReplicationConfig;

/// How often the topic table is scanned for new, deleted or recreated topics (and a topic
/// whose replicator failed is tried again).
const TOPIC_SCAN_INTERVAL: Duration = Duration::from_millis(100);
/// Sleep of a round that found nothing to do.
const IDLE_SLEEP: Duration = Duration::from_millis(1);
/// A topic whose log cannot be opened or written (a full or failing disk) is tried again
/// after this, doubling up to [`RETRY_MAX`]: reopening reads and checks its whole log.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// When a failed topic (slot, generation) may be tried again, and the wait after that.
#[derive(Default)]
struct Retries(HashMap<u32, (u64, Instant, Duration)>);

impl Retries {
    fn failed(&mut self, slot: u32, generation: u64, now: Instant) {
        let wait = match self.0.get(&slot) {
            Some(&(g, _, w)) if g == generation => (w * 2).min(RETRY_MAX),
            _ => RETRY_FIRST,
        };
        self.0.insert(slot, (generation, now + wait, wait));
    }

    /// Whether topic (slot, generation) may be tried now.
    fn due(&self, slot: u32, generation: u64, now: Instant) -> bool {
        self.0
            .get(&slot)
            .is_none_or(|&(g, at, _)| g != generation || now >= at)
    }
}

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
        let mut retries = Retries::default();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if last_scan.is_none_or(|t| now.duration_since(t) >= TOPIC_SCAN_INTERVAL) {
                last_scan = Some(now);
                scan(pool, c, me, cfg, &mut topics, &mut retries, now);
            }
            let mut work = 0;
            let mut failed = Vec::new();
            for (slot, (gen, r)) in topics.iter_mut() {
                match r.poll(now) {
                    Ok(n) => work += n,
                    Err(e) => {
                        log::error!("broker {me}: replication of topic slot {slot}: {e}");
                        if let Some(errno) = e.disk_errno() {
                            report_disk_failure(pool, c, *slot, me, errno);
                        }
                        failed.push((*slot, *gen));
                    }
                }
            }
            for (slot, gen) in failed {
                topics.remove(&slot);
                retries.failed(slot, gen, now);
            }
            if work == 0 {
                // With no topic to replicate nothing comes before the next scan: a thread
                // that woke every millisecond for nothing took the data path's cores (on a
                // small host each wake-up preempts a polling loop or a client).
                let rest = if topics.is_empty() {
                    let scanned = last_scan.map_or(TOPIC_SCAN_INTERVAL, |t| t.elapsed());
                    TOPIC_SCAN_INTERVAL.saturating_sub(scanned)
                } else {
                    IDLE_SLEEP
                };
                std::thread::sleep(rest.max(IDLE_SLEEP));
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
    retries: &mut Retries,
    now: Instant,
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
        if info.config.replication_factor == 0 || !retries.due(slot, info.generation, now) {
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
            Err(e) => {
                retries.failed(slot, info.generation, now);
                if let Some(errno) = e.disk_errno() {
                    report_disk_failure(pool, c, slot, me, errno);
                }
                log::error!(
                    "broker {me}: cannot replicate topic {:?}: {e}; trying again later",
                    info.name
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_topic_is_retried_after_a_wait_that_doubles_and_a_new_topic_at_once() {
        let mut r = Retries::default();
        let t0 = Instant::now();
        assert!(r.due(3, 1, t0));
        r.failed(3, 1, t0);
        assert!(!r.due(3, 1, t0 + RETRY_FIRST / 2));
        assert!(r.due(3, 1, t0 + RETRY_FIRST));
        let t1 = t0 + RETRY_FIRST;
        r.failed(3, 1, t1);
        assert!(!r.due(3, 1, t1 + RETRY_FIRST));
        assert!(r.due(3, 1, t1 + 2 * RETRY_FIRST));
        // The slot holds another topic now (new generation): no wait.
        assert!(r.due(3, 2, t1));
        for _ in 0..10 {
            r.failed(3, 1, t1);
        }
        assert!(r.due(3, 1, t1 + RETRY_MAX));
    }
}
