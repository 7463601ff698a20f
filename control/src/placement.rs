//! Re-placing the replicas of a broker slot whose broker died and stayed away
//! (`embar_dataplane::replication::placement` has the rule every process applies).
//!
//! The control process is the only writer of the topics' placement tables. A slot with no
//! live broker for `--replace-after` is **replaced**: in every topic with replication, it is
//! excluded from the replica sets from its own `durable_total_order` on (everything below is
//! on its disk already), unless that would leave fewer slots than the topic's replication
//! factor (then the topic's ACK 2 acks keep waiting for it: fail closed). A broker that
//! registers into a replaced slot readmits it from each topic's next total order. A topic
//! created while slots are replaced excludes them from its start.
//!
//! Which slots are replaced is read back from the pool's tables (a slot is replaced if a
//! topic excludes it now), so a restarted control process goes on where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use embar_dataplane::pool::coherence::Coherent;
use embar_dataplane::pool::Pool;
use embar_dataplane::replication::placement::Placement;

/// What the ticker knows of the slots between two ticks.
#[derive(Debug, Default)]
pub struct Vacancies {
    /// Since when each slot without a live broker has been so.
    since: BTreeMap<u32, Instant>,
    /// Topics a vacant slot could not be re-placed in, already logged (once per vacancy).
    reported: BTreeSet<(u32, String)>,
}

impl Vacancies {
    /// Slots vacant for at least `after` now, given the slots with a live broker; the
    /// vacancy clock of a slot starts the first time it is seen vacant.
    pub fn overdue(
        &mut self,
        slots: u32,
        live: &BTreeSet<u32>,
        now: Instant,
        after: Duration,
    ) -> Vec<u32> {
        self.since.retain(|s, _| !live.contains(s));
        self.reported.retain(|(s, _)| !live.contains(s));
        (0..slots)
            .filter(|s| !live.contains(s))
            .filter(|s| now.duration_since(*self.since.entry(*s).or_insert(now)) >= after)
            .collect()
    }

    /// The slots vacant for at least `after` as of the last [`overdue`](Self::overdue).
    pub fn overdue_as_of(&self, now: Instant, after: Duration) -> BTreeSet<u32> {
        self.since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= after)
            .map(|(s, _)| *s)
            .collect()
    }

    /// Whether this refusal to re-place `slot` in `topic` is news (to be logged).
    pub fn first_report(&mut self, slot: u32, topic: &str) -> bool {
        self.reported.insert((slot, topic.to_string()))
    }
}

/// The topics of the pool with replication: `(name, slot, replication factor)`.
fn replicated(pool: &Pool, names: &[String]) -> Vec<(String, u32, u8)> {
    names
        .iter()
        .filter_map(|n| {
            let slot = pool.find_topic(Coherent, n).ok()?;
            let info = pool.read_topic(Coherent, slot)?;
            let rf = info.config.replication_factor;
            (rf > 0).then(|| (n.clone(), slot, rf))
        })
        .collect()
}

/// The slots some topic excludes now.
pub fn replaced(pool: &Pool, names: &[String]) -> BTreeSet<u32> {
    let slots = pool.geometry().max_brokers;
    replicated(pool, names)
        .into_iter()
        .flat_map(|(_, t, _)| {
            let p = Placement::read(Coherent, &pool.tinode(t).placement);
            (0..slots).filter(move |s| p.excluded_now(*s))
        })
        .collect()
}

/// Whether some replicated topic's replica sets do not pass over `slot` yet (what
/// [`replace`] would try), read without the control process's admin lock.
pub fn pending(pool: &Pool, names: &[String], slot: u32) -> bool {
    replicated(pool, names)
        .into_iter()
        .any(|(_, t, _)| !Placement::read(Coherent, &pool.tinode(t).placement).excluded_now(slot))
}

/// Excludes `slot` from the replica sets of every replicated topic that does not exclude it
/// yet, from its durable total order on: per topic, the total order it was re-placed from,
/// or why it was not.
pub fn replace(pool: &Pool, names: &[String], slot: u32) -> Vec<(String, Result<u64, String>)> {
    let slots = pool.geometry().max_brokers;
    let mut done = Vec::new();
    for (name, t, rf) in replicated(pool, names) {
        let tinode = pool.tinode(t);
        let p = Placement::read(Coherent, &tinode.placement);
        if p.excluded_now(slot) {
            continue;
        }
        // Where to exclude it from: its durable total order, below which its disk holds
        // everything of its sets; but not past a table change it had not taken in (its
        // progress did not account for it yet); and for a slot that never kept a disk log,
        // from the next total order (nothing before was ever on its disk to count on).
        let r = &tinode.brokers[slot as usize].replication;
        let keeps_logs = pool
            .broker_info(slot)
            .is_ok_and(|i| i.data_dir_len.load(std::sync::atomic::Ordering::Acquire) > 0);
        let from = if !keeps_logs {
            pool.sequencer_state(t)
                .next_global
                .load(std::sync::atomic::Ordering::Acquire)
        } else {
            let durable = r
                .durable_total_order
                .load(std::sync::atomic::Ordering::Acquire);
            let seen = r.placement_seen.load(std::sync::atomic::Ordering::Acquire);
            if seen < p.version() {
                durable.min(p.first_touched().unwrap_or(durable))
            } else {
                durable
            }
        };
        let q = match p.with_excluded(slot, from) {
            Ok(q) => q,
            Err(e) => {
                done.push((name, Err(e.to_string())));
                continue;
            }
        };
        // Every total order from there on must keep RF slots, closed exclusions included.
        let left = q.fewest_slots_from(from, slots);
        if left < usize::from(rf) {
            let why = format!("{left} slots would be left for replication factor {rf}");
            done.push((name, Err(why)));
            continue;
        }
        q.write(Coherent, &tinode.placement);
        done.push((name, Ok(from)));
    }
    done
}

/// A broker registered into `slot`: it is in the replica sets again, in every topic, from
/// the topic's next total order.
pub fn readmit(pool: &Pool, names: &[String], slot: u32) -> Vec<String> {
    let mut done = Vec::new();
    for (name, t, _) in replicated(pool, names) {
        let tinode = pool.tinode(t);
        let p = Placement::read(Coherent, &tinode.placement);
        if !p.excluded_now(slot) {
            continue;
        }
        let until = pool
            .sequencer_state(t)
            .next_global
            .load(std::sync::atomic::Ordering::Acquire);
        p.with_readmitted(slot, until)
            .write(Coherent, &tinode.placement);
        done.push(format!("topic {name:?}: from total order {until}"));
    }
    done
}

/// The placement table of a topic about to be created: the replaced slots excluded from
/// its start.
pub fn start_table(replaced: &BTreeSet<u32>) -> Placement {
    let mut p = Placement::none();
    for s in replaced {
        if let Ok(q) = p.with_excluded(*s, 0) {
            p = q;
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_overdue_once_vacant_for_the_whole_delay_and_a_live_broker_resets_it() {
        let mut v = Vacancies::default();
        let t0 = Instant::now();
        let d = Duration::from_secs(10);
        let live: BTreeSet<u32> = [0, 2].into();
        assert!(v.overdue(3, &live, t0, d).is_empty());
        assert!(v
            .overdue(3, &live, t0 + Duration::from_secs(9), d)
            .is_empty());
        assert_eq!(v.overdue(3, &live, t0 + d, d), vec![1]);
        // Back for a moment: the clock starts again.
        let all: BTreeSet<u32> = [0, 1, 2].into();
        assert!(v
            .overdue(3, &all, t0 + Duration::from_secs(11), d)
            .is_empty());
        assert!(v
            .overdue(3, &live, t0 + Duration::from_secs(12), d)
            .is_empty());
        assert_eq!(
            v.overdue(3, &live, t0 + Duration::from_secs(22), d),
            vec![1]
        );
    }
}
