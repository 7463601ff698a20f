//! Allocation of log space: the segment pool is cut into equal segments, and the segment
//! table holds one 64-byte [`SegmentEntry`] per segment (one line each, so one writer each).
//!
//! Two policies:
//!
//! - [`AllocPolicy::Shared`]: any broker may take any free segment by a compare-and-swap of
//!   the entry's `owner` word from 0. Correct between processes on one host (and on memory
//!   with coherent atomics, such as CXL 3 with back-invalidation).
//! - [`AllocPolicy::Partitioned`]: broker `p` of `n` only ever touches entries `i` with
//!   `i % n == p`, so every entry has exactly one writer and no atomic read-modify-write is
//!   needed. This is what a pool shared by several hosts without coherent atomics (CXL 2.0)
//!   needs; the control process assigns partitions. `docs/pool-layout.md` discusses both.
//!
//! A segment is freed only by its owner, and freeing a segment one does not own is an error
//! (a double free or a stale handle), never a silent release.

use crate::error::{PoolError, PoolResult};
use crate::pool::coherence::Coherence;
use crate::pool::Pool;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed};

const OWNED: u64 = 1 << 63;

/// Who holds a segment: the (topic slot, broker) whose log it extends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentOwner {
    pub topic: u32,
    pub broker: u32,
}

impl SegmentOwner {
    fn word(self) -> u64 {
        OWNED | u64::from(self.topic & 0xffff) << 16 | u64::from(self.broker & 0xffff)
    }

    fn from_word(w: u64) -> Option<SegmentOwner> {
        (w & OWNED != 0).then_some(SegmentOwner {
            topic: ((w >> 16) & 0xffff) as u32,
            broker: (w & 0xffff) as u32,
        })
    }
}

impl std::fmt::Display for SegmentOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "topic slot {} broker {}", self.topic, self.broker)
    }
}

/// Which segments an allocator may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocPolicy {
    Shared,
    Partitioned { part: u32, parts: u32 },
}

/// A segment held by its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub index: u64,
    /// Pool offset of the first byte.
    pub offset: u64,
    pub bytes: u64,
    /// Tenancy number of this allocation.
    pub generation: u64,
}

/// Allocates and frees segments for one owner.
#[derive(Debug)]
pub struct SegmentAllocator<'p, C: Coherence> {
    pool: &'p Pool,
    coherence: C,
    owner: SegmentOwner,
    policy: AllocPolicy,
    /// Next entry to try (next fit), so allocations spread instead of all racing for entry 0.
    cursor: u64,
}

impl<'p, C: Coherence> SegmentAllocator<'p, C> {
    pub fn new(
        pool: &'p Pool,
        coherence: C,
        owner: SegmentOwner,
        policy: AllocPolicy,
    ) -> PoolResult<Self> {
        pool.check_topic_broker(owner.topic, owner.broker)?;
        let cursor = match policy {
            AllocPolicy::Shared => {
                let n = pool.geometry().segment_count;
                (u64::from(owner.broker) * 7919 + u64::from(owner.topic) * 104_729) % n
            }
            AllocPolicy::Partitioned { part, parts } => {
                if parts == 0 || part >= parts {
                    return Err(PoolError::Config(format!(
                        "segment partition {part} of {parts} does not exist"
                    )));
                }
                u64::from(part)
            }
        };
        Ok(SegmentAllocator {
            pool,
            coherence,
            owner,
            policy,
            cursor,
        })
    }

    /// Entries this allocator may take, starting at the cursor (next fit) and wrapping
    /// around inside its scope.
    fn candidates(&self) -> impl Iterator<Item = u64> + '_ {
        let n = self.pool.geometry().segment_count;
        let (first, step) = match self.policy {
            AllocPolicy::Shared => (0, 1),
            AllocPolicy::Partitioned { part, parts } => (u64::from(part), u64::from(parts)),
        };
        // Entries first, first + step, ... below n; the cursor is one of them.
        let count = if first < n {
            (n - first).div_ceil(step)
        } else {
            0
        };
        let start = self.cursor.saturating_sub(first) / step;
        (0..count).map(move |k| first + ((start + k) % count) * step)
    }

    /// Takes a free segment, or says that none is left in this allocator's scope.
    pub fn alloc(&mut self) -> PoolResult<Segment> {
        let table = self.pool.segment_table();
        let word = self.owner.word();
        let found = self.candidates().find(|&i| {
            let e = &table[i as usize];
            if self.coherence.observe(&e.owner) != 0 {
                return false;
            }
            match self.policy {
                AllocPolicy::Shared => e.owner.compare_exchange(0, word, AcqRel, Acquire).is_ok(),
                AllocPolicy::Partitioned { .. } => {
                    self.coherence.publish(&e.owner, word);
                    true
                }
            }
        });
        let Some(index) = found else {
            let g = self.pool.geometry();
            return Err(PoolError::NoFreeSegment {
                segment_bytes: g.segment_bytes,
                segment_count: g.segment_count,
                scope: match self.policy {
                    AllocPolicy::Shared => String::new(),
                    AllocPolicy::Partitioned { part, parts } => {
                        format!(", partition {part} of {parts}")
                    }
                },
            });
        };
        let e = &table[index as usize];
        let generation = e.generation.load(Relaxed) + 1;
        self.coherence.publish(&e.generation, generation);
        let step = match self.policy {
            AllocPolicy::Shared => 1,
            AllocPolicy::Partitioned { parts, .. } => u64::from(parts),
        };
        self.cursor = (index + step) % self.pool.geometry().segment_count;
        Ok(Segment {
            index,
            offset: self.pool.geometry().segment_offset(index),
            bytes: self.pool.geometry().segment_bytes,
            generation,
        })
    }

    /// Returns a segment this owner holds.
    pub fn free(&mut self, segment: &Segment) -> PoolResult<()> {
        let table = self.pool.segment_table();
        let e = table
            .get(segment.index as usize)
            .ok_or(PoolError::OutOfRange {
                what: "segment index",
                value: segment.index,
                limit: table.len() as u64,
            })?;
        let word = self.owner.word();
        let not_owner = |owner| PoolError::NotSegmentOwner {
            segment: segment.index,
            claimed: self.owner.to_string(),
            owner,
        };
        if e.generation.load(Relaxed) != segment.generation {
            return Err(not_owner(e.owner.load(Relaxed)));
        }
        match self.policy {
            AllocPolicy::Shared => e
                .owner
                .compare_exchange(word, 0, AcqRel, Acquire)
                .map(|_| ())
                .map_err(not_owner),
            AllocPolicy::Partitioned { .. } => {
                let cur = self.coherence.observe(&e.owner);
                if cur != word {
                    return Err(not_owner(cur));
                }
                self.coherence.publish(&e.owner, 0);
                Ok(())
            }
        }
    }
}

impl Pool {
    /// The owner of segment `index`, if it is allocated.
    pub fn segment_owner<C: Coherence>(&self, c: C, index: u64) -> Option<SegmentOwner> {
        let e = self.segment_table().get(index as usize)?;
        SegmentOwner::from_word(c.observe(&e.owner))
    }

    /// Segments currently allocated.
    pub fn segments_in_use<C: Coherence>(&self, c: C) -> u64 {
        self.segment_table()
            .iter()
            .filter(|e| c.observe(&e.owner) != 0)
            .count() as u64
    }
}
