//! How a writer makes its stores visible to readers in other processes or on other hosts.
//!
//! One trait, two implementations, chosen at start-up (the pool's superblock records which one
//! its creator chose; a flag can override it):
//!
//! - [`Coherent`]: every mapper shares one coherence domain (one host, or CXL with hardware
//!   coherence). Signals are `Release` stores and `Acquire` loads; flushes are no-ops.
//! - [`NonCoherent`]: mappers on different hosts share memory without coherence (CXL 2.0
//!   pooled memory). A writer writes back every line it wrote (`clwb`/`clflushopt`), fences
//!   (`sfence`), then stores the signal word and writes that back too. A reader invalidates
//!   the line it polls (`clflushopt`/`clflush`), fences, then reads. `clflushopt` is ordered
//!   only by `sfence`/`mfence` (not `lfence`), so the read side uses a full fence.
//!
//! Code that uses the pool is generic over `C: Coherence` and monomorphised for both, so the
//! coherent build pays nothing for the other mode.

use std::fmt::Debug;
use std::mem::size_of_val;

use embar_sys::cacheline::{self, FlushInstr, FlushSupport};

use crate::sync::{AtomicU64, Ordering};

/// Which implementation a pool is used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoherenceMode {
    Coherent,
    NonCoherent,
}

impl CoherenceMode {
    pub fn code(self) -> u32 {
        match self {
            CoherenceMode::Coherent => 0,
            CoherenceMode::NonCoherent => 1,
        }
    }

    pub fn from_code(code: u32) -> Option<CoherenceMode> {
        match code {
            0 => Some(CoherenceMode::Coherent),
            1 => Some(CoherenceMode::NonCoherent),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CoherenceMode::Coherent => "coherent",
            CoherenceMode::NonCoherent => "non-coherent",
        }
    }
}

/// A coherence mode name that is neither `coherent` nor `non-coherent`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown coherence mode {0:?} (expected coherent or non-coherent)")]
pub struct UnknownCoherenceMode(pub String);

impl std::str::FromStr for CoherenceMode {
    type Err = UnknownCoherenceMode;
    fn from_str(s: &str) -> Result<Self, UnknownCoherenceMode> {
        match s {
            "coherent" => Ok(CoherenceMode::Coherent),
            "non-coherent" | "noncoherent" => Ok(CoherenceMode::NonCoherent),
            other => Err(UnknownCoherenceMode(other.to_string())),
        }
    }
}

/// Publication and observation of pool memory. See the module docs.
pub trait Coherence: Copy + Debug + Send + Sync + 'static {
    fn mode(&self) -> CoherenceMode;

    /// Writes back `[ptr, ptr + len)` after plain or relaxed stores to it, so that a later
    /// [`publish`](Self::publish) makes them visible to other hosts.
    ///
    /// # Safety
    /// The range must lie inside a live mapping.
    unsafe fn writeback_range(&self, ptr: *const u8, len: usize);

    /// Drops `[ptr, ptr + len)` from this CPU's caches so that the next read fetches what
    /// another host wrote. Never call it on lines this process writes and has not published.
    ///
    /// # Safety
    /// The range must lie inside a live mapping.
    unsafe fn invalidate_range(&self, ptr: *const u8, len: usize);

    /// Writes back the memory of `obj`.
    fn writeback<T>(&self, obj: &T) {
        // SAFETY: a reference points at live memory of `size_of_val(obj)` bytes.
        unsafe { self.writeback_range((obj as *const T).cast(), size_of_val(obj)) }
    }

    /// Invalidates the memory of `obj`.
    fn invalidate<T>(&self, obj: &T) {
        // SAFETY: a reference points at live memory of `size_of_val(obj)` bytes.
        unsafe { self.invalidate_range((obj as *const T).cast(), size_of_val(obj)) }
    }

    /// Orders every earlier store and write-back before every later store (a no-op where
    /// hardware keeps memory coherent: the next `publish` is a Release store).
    fn fence(&self);

    /// Publishes `value` in a signal word: every store and write-back before it is visible to
    /// a reader that [`observe`](Self::observe)s the value.
    fn publish(&self, word: &AtomicU64, value: u64);

    /// Reads a signal word written by another process or host; stores published before the
    /// value are visible (after [`invalidate`](Self::invalidate) of their lines, on
    /// non-coherent memory).
    fn observe(&self, word: &AtomicU64) -> u64;
}

/// Hardware-coherent memory: plain Release/Acquire.
#[derive(Clone, Copy, Debug, Default)]
pub struct Coherent;

impl Coherence for Coherent {
    fn mode(&self) -> CoherenceMode {
        CoherenceMode::Coherent
    }
    unsafe fn writeback_range(&self, _ptr: *const u8, _len: usize) {}
    unsafe fn invalidate_range(&self, _ptr: *const u8, _len: usize) {}

    #[inline(always)]
    fn fence(&self) {}

    #[inline(always)]
    fn publish(&self, word: &AtomicU64, value: u64) {
        word.store(value, Ordering::Release);
    }

    #[inline(always)]
    fn observe(&self, word: &AtomicU64) -> u64 {
        word.load(Ordering::Acquire)
    }
}

/// Memory without hardware coherence between its mappers: explicit flushes and fences.
#[derive(Clone, Copy, Debug)]
pub struct NonCoherent {
    writeback: FlushInstr,
    invalidate: FlushInstr,
}

impl NonCoherent {
    /// Uses the best instructions this CPU has.
    pub fn detect() -> NonCoherent {
        let s = FlushSupport::detect();
        NonCoherent {
            writeback: s.writeback_instr(),
            invalidate: s.invalidate_instr(),
        }
    }

    /// Uses the given instructions (for tests of each one).
    pub fn with(writeback: FlushInstr, invalidate: FlushInstr) -> NonCoherent {
        NonCoherent {
            writeback,
            invalidate,
        }
    }

    pub fn instructions(&self) -> (FlushInstr, FlushInstr) {
        (self.writeback, self.invalidate)
    }
}

impl Coherence for NonCoherent {
    fn mode(&self) -> CoherenceMode {
        CoherenceMode::NonCoherent
    }

    unsafe fn writeback_range(&self, ptr: *const u8, len: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { cacheline::flush_range(self.writeback, ptr, len) }
    }

    unsafe fn invalidate_range(&self, ptr: *const u8, len: usize) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { cacheline::flush_range(self.invalidate, ptr, len) }
    }

    fn fence(&self) {
        cacheline::store_fence();
    }

    fn publish(&self, word: &AtomicU64, value: u64) {
        // Earlier write-backs complete before the signal can be seen.
        cacheline::store_fence();
        word.store(value, Ordering::Release);
        self.writeback(word);
        cacheline::store_fence();
    }

    fn observe(&self, word: &AtomicU64) -> u64 {
        self.invalidate(word);
        // clflushopt is not ordered by lfence; a full fence keeps the load after it.
        cacheline::full_fence();
        let v = word.load(Ordering::Acquire);
        cacheline::load_fence();
        v
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn both_modes_publish_and_observe_the_same_values() {
        fn roundtrip<C: Coherence>(c: C) {
            let w = AtomicU64::new(0);
            for v in [1u64, 2, u64::MAX, 7] {
                c.publish(&w, v);
                assert_eq!(c.observe(&w), v, "{:?}", c.mode());
            }
        }
        roundtrip(Coherent);
        roundtrip(NonCoherent::detect());
    }

    #[test]
    fn mode_names_parse_back() {
        for m in [CoherenceMode::Coherent, CoherenceMode::NonCoherent] {
            assert_eq!(m.name().parse::<CoherenceMode>().unwrap(), m);
            assert_eq!(CoherenceMode::from_code(m.code()), Some(m));
        }
        assert_eq!(
            "sometimes".parse::<CoherenceMode>(),
            Err(UnknownCoherenceMode("sometimes".into()))
        );
        assert_eq!(CoherenceMode::from_code(9), None);
    }
}
