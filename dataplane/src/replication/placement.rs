//! Re-placing the replicas of a broker that does not come back.
//!
//! A batch's replica set is the first RF broker slots from the slot it landed on, around the
//! ring of the pool's slots ([`super::replica_set`]). A slot whose broker died and stayed away
//! for the control process's `--replace-after` is **excluded** from the sets of the batches
//! it had not made durable: each topic's placement table (in the pool, written by the control
//! process only) says that slot `s` holds no replica of the batches whose first total order
//! lies in `[from, until)`, and a set passes over excluded slots:
//!
//! ```text
//! set(b, RF, t) = the first RF slots of b, b+1, ... (mod N) not excluded at total order t
//! ```
//!
//! - `from` is the dead broker's `durable_total_order` when it is excluded: every batch of
//!   its sets below it is already synced on its disk, and every one from it on moves to the
//!   next slot, whose replicator writes it (reading it again from the pool or the other
//!   replicas' logs if it had passed it: a *backfill*).
//! - `until` is `u64::MAX` while the slot stays excluded; a broker that registers into the
//!   slot again closes the exclusion at the topic's next total order, and from there the slot
//!   is in the sets again (its replicator reads on from its own log's end, so it writes them).
//! - An exclusion changes the sets of total orders from `from` on only (a closing, from
//!   `until` on only); a set that did not name the excluded slot does not change at all. So a
//!   batch acked at ACK 2 stays on every disk that made it durable.
//!
//! Every process computes the same set for a batch from the same table: the replicators
//! (what to write), the brokers' ACK 2 decisions (whose progress to wait for), durable-only
//! subscribers and the disk readers' end of a gap.

use crate::pool::coherence::Coherence;
use crate::pool::layout::{PlacementRegion, PLACEMENT_MAX};

/// Slot `slot` holds no replica of the batches whose first total order is in `[from, until)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exclusion {
    pub slot: u32,
    pub from: u64,
    /// `u64::MAX`: still excluded.
    pub until: u64,
}

impl Exclusion {
    pub fn covers(&self, t: u64) -> bool {
        self.from <= t && t < self.until
    }

    pub fn is_open(&self) -> bool {
        self.until == u64::MAX
    }
}

/// A copy of a topic's placement table. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The table's sequence word when copied.
    version: u64,
    exclusions: Vec<Exclusion>,
}

/// Why the control process cannot change a placement table.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("the placement table holds {PLACEMENT_MAX} exclusions already")]
    Full,
}

impl Placement {
    /// No slot excluded.
    pub fn none() -> Placement {
        Placement::default()
    }

    pub fn exclusions(&self) -> &[Exclusion] {
        &self.exclusions
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether slot `slot` holds no replica of the batch at total order `t`.
    pub fn excluded_at(&self, slot: u32, t: u64) -> bool {
        self.exclusions
            .iter()
            .any(|e| e.slot == slot && e.covers(t))
    }

    /// Whether slot `slot` is excluded from every batch ordered from now on.
    pub fn excluded_now(&self, slot: u32) -> bool {
        self.exclusions
            .iter()
            .any(|e| e.slot == slot && e.is_open())
    }

    /// The replica set of the batch at total order `t` that landed on `primary`, for
    /// replication factor `rf` over `slots` broker slots: the first `rf` slots from `primary`
    /// around the ring not excluded at `t` (fewer if fewer are left).
    pub fn replica_set(
        &self,
        primary: u32,
        rf: u8,
        slots: u32,
        t: u64,
    ) -> impl Iterator<Item = u32> + '_ {
        let n = slots.max(1);
        (0..n)
            .map(move |i| (primary + i) % n)
            .filter(move |s| !self.excluded_at(*s, t))
            .take(usize::from(rf))
    }

    /// The fewest slots (of `slots`) not excluded at any total order from `from` on: what a
    /// replica set from there can hold at most.
    pub fn fewest_slots_from(&self, from: u64, slots: u32) -> usize {
        let points = std::iter::once(from).chain(
            self.exclusions
                .iter()
                .flat_map(|e| [e.from, e.until])
                .filter(|t| *t >= from && *t != u64::MAX),
        );
        points
            .map(|t| (0..slots).filter(|s| !self.excluded_at(*s, t)).count())
            .min()
            .unwrap_or(slots as usize)
    }

    /// The lowest total order whose set any exclusion of the table touches (`None` for an
    /// empty table).
    pub fn first_touched(&self) -> Option<u64> {
        self.exclusions.iter().map(|e| e.from).min()
    }

    /// The lowest total order whose replica set may differ between `old` and this table, if
    /// any may: an exclusion added changes the sets from its `from` on, one closed from its
    /// `until` on.
    pub fn changed_from(&self, old: &Placement) -> Option<u64> {
        let mut lowest: Option<u64> = None;
        let mut note = |t: u64| lowest = Some(lowest.map_or(t, |l| l.min(t)));
        for e in &self.exclusions {
            match old
                .exclusions
                .iter()
                .find(|o| o.slot == e.slot && o.from == e.from)
            {
                None => note(e.from),
                Some(o) if o.until != e.until => note(o.until.min(e.until)),
                Some(_) => {}
            }
        }
        for o in &old.exclusions {
            if !self
                .exclusions
                .iter()
                .any(|e| e.slot == o.slot && e.from == o.from)
            {
                note(o.from);
            }
        }
        lowest
    }

    /// The table with slot `slot` excluded from total order `from` on (nothing changes if it
    /// is excluded now already).
    pub fn with_excluded(&self, slot: u32, from: u64) -> Result<Placement, PlacementError> {
        if self.excluded_now(slot) {
            return Ok(self.clone());
        }
        if self.exclusions.len() >= PLACEMENT_MAX {
            return Err(PlacementError::Full);
        }
        let mut p = self.clone();
        p.exclusions.push(Exclusion {
            slot,
            from,
            until: u64::MAX,
        });
        Ok(p)
    }

    /// The table with slot `slot`'s open exclusion closed at total order `until` (not before
    /// its `from`): the slot is in the sets again from there. An exclusion closed where it
    /// began covers nothing and is dropped.
    pub fn with_readmitted(&self, slot: u32, until: u64) -> Placement {
        let mut p = self.clone();
        for e in &mut p.exclusions {
            if e.slot == slot && e.is_open() {
                e.until = until.max(e.from);
            }
        }
        p.exclusions.retain(|e| e.from < e.until);
        p
    }

    /// The table of `region` as it is now. A reader takes a copy between two equal even
    /// reads of the sequence word (the control process rewrites the table rarely).
    pub fn read<C: Coherence>(c: C, region: &PlacementRegion) -> Placement {
        loop {
            // Drop the lines first, then observe the word (its fence orders the drop before
            // the loads), as `read_topic` does: a drop after the observe may not be ordered
            // before the loads on a non-coherent pool.
            c.invalidate(region);
            let v = c.observe(&region.version);
            if v % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let n = (region.count.load(crate::sync::Ordering::Relaxed) as usize).min(PLACEMENT_MAX);
            let exclusions = region.exclusions[..n]
                .iter()
                .map(|[s, f, u]| Exclusion {
                    slot: s.load(crate::sync::Ordering::Relaxed) as u32,
                    from: f.load(crate::sync::Ordering::Relaxed),
                    until: u.load(crate::sync::Ordering::Relaxed),
                })
                .collect();
            c.fence();
            crate::sync::fence(crate::sync::Ordering::Acquire);
            if c.observe(&region.version) == v {
                return Placement {
                    version: v,
                    exclusions,
                };
            }
        }
    }

    /// Copies the table of `region` again if its sequence word moved (one read of that word
    /// otherwise); whether it did.
    pub fn refresh<C: Coherence>(&mut self, c: C, region: &PlacementRegion) -> bool {
        if c.observe(&region.version) == self.version {
            return false;
        }
        *self = Placement::read(c, region);
        true
    }

    /// Completes a write the control process did not finish (it was killed with the sequence
    /// word odd, and every reader would wait for ever): the word is made even again over
    /// the entries as they are. Whatever a write left is a valid table: entries are stored
    /// before the count that takes them in, and an exclusion's `until` is one word. Returns
    /// whether there was one to complete.
    pub fn repair<C: Coherence>(c: C, region: &PlacementRegion) -> bool {
        let v = c.observe(&region.version);
        if v % 2 == 0 {
            return false;
        }
        c.writeback(region);
        c.fence();
        c.publish(&region.version, v + 1);
        true
    }

    /// Writes this table into `region`. The control process is its only writer.
    pub fn write<C: Coherence>(&self, c: C, region: &PlacementRegion) {
        use crate::sync::Ordering::Relaxed;
        let v = region.version.load(Relaxed);
        let odd = v | 1;
        c.publish(&region.version, if odd == v { v + 2 } else { odd });
        crate::sync::fence(crate::sync::Ordering::SeqCst);
        let n = self.exclusions.len().min(PLACEMENT_MAX);
        for (e, [s, f, u]) in self.exclusions[..n].iter().zip(&region.exclusions) {
            s.store(u64::from(e.slot), Relaxed);
            f.store(e.from, Relaxed);
            u.store(e.until, Relaxed);
        }
        region.count.store(n as u64, Relaxed);
        c.writeback(region);
        c.fence();
        let odd = region.version.load(Relaxed);
        c.publish(&region.version, odd + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(p: &Placement, b: u32, rf: u8, n: u32, t: u64) -> Vec<u32> {
        p.replica_set(b, rf, n, t).collect()
    }

    #[test]
    fn without_exclusions_the_set_is_the_plain_formula() {
        let p = Placement::none();
        for n in 1..6 {
            for b in 0..n {
                for rf in 0..=n as u8 {
                    assert_eq!(
                        set(&p, b, rf, n, 7),
                        super::super::replica_set(b, rf, n).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    #[test]
    fn an_excluded_slot_is_passed_over_from_its_from_until_its_until() {
        let p = Placement::none().with_excluded(1, 100).unwrap();
        assert_eq!(set(&p, 0, 2, 3, 99), vec![0, 1]);
        assert_eq!(set(&p, 0, 2, 3, 100), vec![0, 2]);
        assert_eq!(set(&p, 1, 2, 3, 100), vec![2, 0], "its own batches too");
        assert_eq!(
            set(&p, 2, 2, 3, 100),
            vec![2, 0],
            "unchanged: it did not name 1"
        );
        let q = p.with_readmitted(1, 500);
        assert_eq!(set(&q, 0, 2, 3, 499), vec![0, 2]);
        assert_eq!(set(&q, 0, 2, 3, 500), vec![0, 1]);
        assert_eq!(q.changed_from(&p), Some(500));
        assert_eq!(p.changed_from(&Placement::none()), Some(100));
        assert_eq!(p.changed_from(&p), None);
        // Closed where it began: it covered nothing.
        assert!(p.with_readmitted(1, 100).exclusions().is_empty());
        // Excluding an excluded slot changes nothing.
        assert_eq!(p.with_excluded(1, 200).unwrap(), p);
    }

    #[test]
    fn the_fewest_slots_count_every_exclusion_that_overlaps_from_on() {
        // Slot 1 excluded over 100..200; slot 2 excluded from 150 on: at 150..200 only
        // slot 0 is left.
        let p = Placement::none()
            .with_excluded(1, 100)
            .unwrap()
            .with_readmitted(1, 200)
            .with_excluded(2, 150)
            .unwrap();
        assert_eq!(p.fewest_slots_from(150, 3), 1);
        assert_eq!(p.fewest_slots_from(200, 3), 2);
        assert_eq!(p.fewest_slots_from(0, 3), 1);
        assert_eq!(Placement::none().fewest_slots_from(0, 3), 3);
        assert_eq!(p.first_touched(), Some(100));
    }

    #[test]
    fn a_full_table_refuses_another_exclusion() {
        let mut p = Placement::none();
        for i in 0..PLACEMENT_MAX as u64 {
            p = p.with_excluded(1, i).unwrap().with_readmitted(1, i + 1);
        }
        assert_eq!(p.with_excluded(2, 99), Err(PlacementError::Full));
    }

    #[test]
    fn a_table_written_into_the_pool_reads_back() {
        let region = PlacementRegion::default();
        let c = crate::pool::coherence::Coherent;
        let p = Placement::none()
            .with_excluded(3, 40)
            .unwrap()
            .with_excluded(1, 70)
            .unwrap()
            .with_readmitted(3, 90);
        p.write(c, &region);
        let mut q = Placement::read(c, &region);
        assert_eq!(q.exclusions(), p.exclusions());
        assert_eq!(q.version() % 2, 0);
        assert!(!q.refresh(c, &region));
        Placement::none().write(c, &region);
        assert!(q.refresh(c, &region));
        assert!(q.exclusions().is_empty());
    }

    #[test]
    fn a_write_left_half_done_is_completed_with_the_entries_it_stored() {
        let region = PlacementRegion::default();
        let c = crate::pool::coherence::Coherent;
        let p = Placement::none().with_excluded(2, 40).unwrap();
        p.write(c, &region);
        // A writer killed after it made the word odd and stored a new count's entry but not
        // the count: the table stays the old one.
        region.version.fetch_add(1, crate::sync::Ordering::SeqCst);
        region.exclusions[1][0].store(3, crate::sync::Ordering::Relaxed);
        assert!(Placement::repair(c, &region));
        assert!(!Placement::repair(c, &region));
        let q = Placement::read(c, &region);
        assert_eq!(q.exclusions(), p.exclusions());
        assert_eq!(q.version() % 2, 0);
    }

    fn exclusions() -> impl Strategy<Value = Vec<(u32, u64, Option<u64>)>> {
        prop::collection::vec((0u32..5, 0u64..1000, prop::option::of(0u64..1000)), 0..6)
    }

    fn table(ops: &[(u32, u64, Option<u64>)]) -> Placement {
        let mut p = Placement::none();
        for &(slot, from, until) in ops {
            if let Ok(q) = p.with_excluded(slot, from) {
                p = q;
            }
            if let Some(u) = until {
                p = p.with_readmitted(slot, u);
            }
        }
        p
    }

    proptest! {
        /// The properties the replicators and the ACK 2 decisions rely on: a set never names
        /// a slot excluded at its total order, holds `rf` distinct slots while enough are
        /// left, and a change of the table leaves every set below `changed_from` as it was,
        /// and every set that named no newly excluded slot too.
        #[test]
        fn sets_change_only_where_the_table_says(
            before in exclusions(),
            after in exclusions(),
            b in 0u32..5,
            rf in 0u8..5,
            t in 0u64..1200,
        ) {
            let n = 5;
            let old = table(&before);
            let mut all = before.clone();
            all.extend(after);
            let new = table(&all);
            for p in [&old, &new] {
                let s = set(p, b, rf, n, t);
                let left = (0..n).filter(|x| !p.excluded_at(*x, t)).count();
                prop_assert_eq!(s.len(), usize::from(rf).min(left));
                let mut d = s.clone();
                d.sort();
                d.dedup();
                prop_assert_eq!(d.len(), s.len());
                prop_assert!(s.iter().all(|x| !p.excluded_at(*x, t)));
            }
            match new.changed_from(&old) {
                Some(from) if t >= from => {}
                _ => prop_assert_eq!(set(&old, b, rf, n, t), set(&new, b, rf, n, t)),
            }
        }
    }
}
