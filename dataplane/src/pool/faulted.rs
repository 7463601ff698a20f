//! Which parts of the pool's log space this process has faulted in.
//!
//! A process that writes a range of log space pre-faults it first ([`Pool::populate_range`]:
//! a publisher each grant, a broker its whole log space in the background), so that the
//! copy into it takes no page fault. Faulting a range in again walks its page tables
//! (`MADV_POPULATE_WRITE` visits every page even when all are present): on a 2 MiB grant of
//! 4 KiB pages a few percent of a publisher's time, paid on every grant as the pool wraps.
//! This set remembers the chunks already faulted in, so each is walked once per process.
//!
//! Pages stay in a process's page tables once faulted (nothing in the system punches holes
//! in the pool); if a page were unmapped anyway it would fault in on touch, which costs time,
//! never correctness.
//!
//! [`Pool::populate_range`]: super::Pool::populate_range

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Granularity of the set: small beside a grant, and 64 GiB of pool takes 8 KiB of bits.
pub(crate) const CHUNK: u64 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Faulted {
    /// Pool offset of the first chunk (the start of the segment pool).
    base: u64,
    chunks: u64,
    bits: Box<[AtomicU64]>,
}

impl Faulted {
    /// A set over `bytes` of log space from pool offset `base`; every chunk in it if `all`.
    pub(crate) fn new(base: u64, bytes: u64, all: bool) -> Faulted {
        let chunks = bytes.div_ceil(CHUNK);
        let word = if all { u64::MAX } else { 0 };
        Faulted {
            base,
            chunks,
            bits: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(word))
                .collect(),
        }
    }

    /// The runs of chunks of `offset..offset + len` not yet in the set, as pool ranges
    /// (chunk aligned, clipped to the set), in order. A range outside log space is returned
    /// whole, as one run.
    pub(crate) fn missing(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len);
        let limit = self.base + self.chunks * CHUNK;
        if len == 0 || offset < self.base || end > limit {
            return vec![(offset, len)];
        }
        let (first, last) = (
            (offset - self.base) / CHUNK,
            (end - self.base).div_ceil(CHUNK),
        );
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in first..last {
            if self.contains(c) {
                continue;
            }
            let at = self.base + c * CHUNK;
            match runs.last_mut() {
                Some((s, l)) if *s + *l == at => *l += CHUNK,
                _ => runs.push((at, CHUNK)),
            }
        }
        runs
    }

    /// Adds the chunks wholly inside `offset..offset + len` (a run [`missing`](Self::missing)
    /// returned and the caller faulted in).
    pub(crate) fn insert(&self, offset: u64, len: u64) {
        if offset < self.base {
            return;
        }
        let first = (offset - self.base).div_ceil(CHUNK);
        let last = ((offset.saturating_add(len) - self.base) / CHUNK).min(self.chunks);
        for c in first..last {
            self.bits[(c / 64) as usize].fetch_or(1 << (c % 64), Relaxed);
        }
    }

    fn contains(&self, c: u64) -> bool {
        self.bits[(c / 64) as usize].load(Relaxed) & (1 << (c % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 4 << 20;

    #[test]
    fn a_range_is_missing_until_inserted_then_only_its_neighbours_are() {
        let f = Faulted::new(BASE, 64 * CHUNK, false);
        let grant = (BASE + 3 * CHUNK + 4096, 2 * CHUNK);
        assert_eq!(
            f.missing(grant.0, grant.1),
            vec![(BASE + 3 * CHUNK, 3 * CHUNK)]
        );
        for (at, len) in f.missing(grant.0, grant.1) {
            f.insert(at, len);
        }
        assert!(f.missing(grant.0, grant.1).is_empty());
        assert_eq!(
            f.missing(BASE + 2 * CHUNK, 5 * CHUNK),
            vec![(BASE + 2 * CHUNK, CHUNK), (BASE + 6 * CHUNK, CHUNK)]
        );
    }

    #[test]
    fn a_partial_chunk_is_not_counted_and_ranges_outside_log_space_pass_whole() {
        let f = Faulted::new(BASE, 8 * CHUNK, false);
        f.insert(BASE + 100, CHUNK);
        assert_eq!(f.missing(BASE, CHUNK), vec![(BASE, CHUNK)]);
        assert_eq!(f.missing(0, 4096), vec![(0, 4096)]);
        assert_eq!(
            f.missing(BASE + 7 * CHUNK, 2 * CHUNK),
            vec![(BASE + 7 * CHUNK, 2 * CHUNK)]
        );
        let all = Faulted::new(BASE, 8 * CHUNK, true);
        assert!(all.missing(BASE, 8 * CHUNK).is_empty());
    }
}
