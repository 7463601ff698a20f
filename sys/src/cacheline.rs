//! Cache-line write-back, invalidation and fences for memory that is not kept coherent by
//! hardware (a CXL pool shared by several hosts).
//!
//! The instruction is chosen once at run time from CPUID (x86_64) and can be overridden for
//! tests. On x86_64: `clwb` (write back, keep the line) is preferred for write-back, `clflushopt`
//! (write back and evict) for invalidation, `clflush` is the fallback for both. On aarch64:
//! `dc cvac` (clean to the point of coherence) and `dc civac` (clean and invalidate). Elsewhere
//! the operations are fences only and [`FlushInstr::None`] is reported, so that the build works
//! on every target and the choice is visible.

use std::sync::atomic::{AtomicU8, Ordering};

/// Size of a cache line, the unit of every pool layout decision.
pub const CACHE_LINE: usize = 64;

/// Instruction used to write back or invalidate a cache line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlushInstr {
    /// x86_64 `clwb`: write back, the line may stay cached (write-back only).
    Clwb,
    /// x86_64 `clflushopt`: write back and invalidate, weakly ordered (needs `sfence`).
    Clflushopt,
    /// x86_64 `clflush`: write back and invalidate, strongly ordered.
    Clflush,
    /// aarch64 `dc cvac` (write-back) / `dc civac` (invalidate).
    DcCivac,
    /// No instruction available on this target: fences only.
    None,
}

impl FlushInstr {
    pub fn name(self) -> &'static str {
        match self {
            FlushInstr::Clwb => "clwb",
            FlushInstr::Clflushopt => "clflushopt",
            FlushInstr::Clflush => "clflush",
            FlushInstr::DcCivac => "dc civac",
            FlushInstr::None => "none",
        }
    }
}

/// What this CPU offers, detected once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushSupport {
    pub clflush: bool,
    pub clflushopt: bool,
    pub clwb: bool,
    pub aarch64_dc: bool,
}

impl FlushSupport {
    /// Reads the CPU's features (CPUID leaf 1 and 7 on x86_64).
    pub fn detect() -> FlushSupport {
        static CACHE: AtomicU8 = AtomicU8::new(0);
        let bits = match CACHE.load(Ordering::Relaxed) {
            0 => {
                let b = detect_bits() | 0x80;
                CACHE.store(b, Ordering::Relaxed);
                b
            }
            b => b,
        };
        FlushSupport {
            clflush: bits & 1 != 0,
            clflushopt: bits & 2 != 0,
            clwb: bits & 4 != 0,
            aarch64_dc: bits & 8 != 0,
        }
    }

    /// The instruction to use for writing back a line before publishing a signal.
    pub fn writeback_instr(self) -> FlushInstr {
        if self.clwb {
            FlushInstr::Clwb
        } else {
            self.invalidate_instr()
        }
    }

    /// The instruction to use for dropping a line before polling it.
    pub fn invalidate_instr(self) -> FlushInstr {
        if self.clflushopt {
            FlushInstr::Clflushopt
        } else if self.clflush {
            FlushInstr::Clflush
        } else if self.aarch64_dc {
            FlushInstr::DcCivac
        } else {
            FlushInstr::None
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_bits() -> u8 {
    use std::arch::x86_64::__cpuid_count;
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 0 reports the highest leaf, so leaf 7
    // is only read when the CPU has it.
    let (max_leaf, leaf1, leaf7) = unsafe {
        let max_leaf = __cpuid_count(0, 0).eax;
        let leaf1 = __cpuid_count(1, 0);
        let leaf7 = if max_leaf >= 7 {
            __cpuid_count(7, 0).ebx
        } else {
            0
        };
        (max_leaf, leaf1, leaf7)
    };
    let _ = max_leaf;
    let mut bits = 0;
    if leaf1.edx & (1 << 19) != 0 {
        bits |= 1;
    }
    if leaf7 & (1 << 23) != 0 {
        bits |= 2;
    }
    if leaf7 & (1 << 24) != 0 {
        bits |= 4;
    }
    bits
}

#[cfg(target_arch = "aarch64")]
fn detect_bits() -> u8 {
    8
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect_bits() -> u8 {
    0
}

/// Writes back (and for some instructions evicts) every cache line of `[ptr, ptr + len)`.
/// Weakly ordered: call [`store_fence`] before publishing a signal that depends on it.
///
/// # Safety
/// `[ptr, ptr + len)` must lie inside one live mapping of this process (a flush of an unmapped
/// address faults). The bytes are not read or changed, so concurrent writers are allowed.
pub unsafe fn flush_range(instr: FlushInstr, ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let start = ptr as usize & !(CACHE_LINE - 1);
    let end = ptr as usize + len;
    let mut line = start;
    while line < end {
        // SAFETY: `line` is inside the mapped range the caller vouched for (the first line may
        // start before `ptr`, but a mapping is page aligned, so that line is mapped too).
        unsafe { flush_line(instr, line as *const u8) };
        line += CACHE_LINE;
    }
}

/// # Safety
/// `line` must be an address inside a live mapping.
#[inline(always)]
unsafe fn flush_line(instr: FlushInstr, line: *const u8) {
    match instr {
        #[cfg(target_arch = "x86_64")]
        FlushInstr::Clwb => {
            // SAFETY: the caller guarantees `line` is mapped; clwb neither reads nor writes
            // the bytes as data. The variant is only chosen when CPUID reports clwb.
            unsafe {
                std::arch::asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags))
            }
        }
        #[cfg(target_arch = "x86_64")]
        FlushInstr::Clflushopt => {
            // SAFETY: as above; only chosen when CPUID reports clflushopt.
            unsafe {
                std::arch::asm!("clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags))
            }
        }
        #[cfg(target_arch = "x86_64")]
        FlushInstr::Clflush => {
            // SAFETY: as above; clflush is part of SSE2, present on every x86_64 CPU.
            unsafe { std::arch::x86_64::_mm_clflush(line) }
        }
        #[cfg(target_arch = "aarch64")]
        FlushInstr::DcCivac => {
            // SAFETY: the caller guarantees `line` is mapped; `dc civac` is allowed at EL0 on
            // Linux (SCTLR_EL1.UCI is set) and does not change the data.
            unsafe {
                std::arch::asm!("dc civac, {0}", in(reg) line, options(nostack, preserves_flags))
            }
        }
        _ => {}
    }
}

/// Orders every earlier store and flush before every later store (x86 `sfence`; aarch64
/// `dsb st`). Use between flushing data and storing the signal that publishes it.
#[inline(always)]
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no operands and no memory effects besides ordering.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction with no operands.
    unsafe {
        std::arch::asm!("dsb st", options(nostack, preserves_flags))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Orders earlier loads and flushes before later loads (x86 `lfence`; aarch64 `dsb ld`). Use
/// after invalidating a polled line and before reading it.
#[inline(always)]
pub fn load_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: lfence has no operands and no memory effects besides ordering.
    unsafe {
        std::arch::x86_64::_mm_lfence()
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction with no operands.
    unsafe {
        std::arch::asm!("dsb ld", options(nostack, preserves_flags))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Full fence (x86 `mfence`; aarch64 `dsb sy`): orders a flush (`clflushopt`) before later
/// loads, which `lfence` alone does not.
#[inline(always)]
pub fn full_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: mfence has no operands and no memory effects besides ordering.
    unsafe {
        std::arch::x86_64::_mm_mfence()
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction with no operands.
    unsafe {
        std::arch::asm!("dsb sy", options(nostack, preserves_flags))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Asks the CPU to start loading the cache line at `ptr` (a hint: it never faults, reads
/// nothing into the program, and may be ignored). For a walk whose next address depends on
/// the line it reads (a batch's message headers): loading the lines a few steps ahead
/// overlaps their misses instead of taking them one after another. Any address is allowed,
/// even one outside every mapping.
#[inline]
pub fn prefetch_read(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it does not access memory architecturally and does not
    // fault on any address; SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: PRFM PLDL1KEEP is a hint: it does not fault on any address and has no
    // architectural effect.
    unsafe {
        core::arch::asm!("prfm pldl1keep, [{0}]", in(reg) ptr, options(nostack, preserves_flags, readonly))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = ptr;
}

/// Copies `len` bytes from `src` to `dst` with non-temporal stores where the target has them
/// (x86_64 `movntdq`, 64 bytes a step; the bytes before `dst`'s first 16-byte boundary and the
/// tail under 64 bytes by plain stores): the
/// destination's lines are written to memory without being read into this CPU's cache first
/// (no read-for-ownership) and without evicting what the caller works on. For data another
/// CPU or host reads later (a batch written into the pool), as persistent-memory libraries
/// write large copies. Elsewhere a plain copy.
///
/// The non-temporal stores are weakly ordered: call [`store_fence`] after the last copy and
/// before the store that publishes the data.
///
/// # Safety
///
/// `src..src + len` is readable, `dst..dst + len` writable, and they do not overlap.
#[inline]
pub unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of the x86_64 baseline. The head (up to `dst`'s next 16-byte
    // boundary, at most `len`) is a plain copy inside both ranges; after it every load reads
    // 16 bytes inside `src..src + len` and every store writes 16 bytes inside
    // `dst..dst + len` at a 16-byte aligned address (steps are multiples of 16); the tail is
    // a plain copy inside both ranges. The caller guarantees the ranges and no overlap.
    unsafe {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = dst.align_offset(16).min(len);
        std::ptr::copy_nonoverlapping(src, dst, head);
        let (dst, src, len) = (dst.add(head), src.add(head), len - head);
        let whole = len / 64 * 64;
        let mut i = 0;
        while i < whole {
            let s = src.add(i).cast::<__m128i>();
            let d = dst.add(i).cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
            let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
            i += 64;
        }
        std::ptr::copy_nonoverlapping(src.add(whole), dst.add(whole), len - whole);
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller guarantees both ranges and that they do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, len)
    }
}

/// `membarrier(2)` commands (linux/membarrier.h).
const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes two integers (command, flags) and touches no user memory.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long) }
}

/// Whether [`fence_other_threads`] works in this process: Linux's `membarrier` with its
/// private expedited command (4.14 and later), which this call registers the process for the
/// first time (asked once; a seccomp filter or an old kernel says no).
pub fn other_threads_fence_available() -> bool {
    // 0: not asked yet, 1: available, 2: not.
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Acquire) {
        1 => true,
        2 => false,
        _ => {
            let mask = membarrier(MEMBARRIER_CMD_QUERY);
            let ok = mask >= 0
                && mask & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
                && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
            STATE.store(if ok { 1 } else { 2 }, Ordering::Release);
            ok
        }
    }
}

/// Orders every store that any other thread of this process made so far, non-temporal ones
/// included, before this thread's later stores: `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`
/// interrupts every CPU that runs a thread of this process and runs a full barrier there
/// (`mfence` on x86_64, which drains that CPU's write-combining buffers); a thread not running
/// drained them when it was switched out. [`store_fence`] covers only the calling thread's
/// non-temporal stores, so data streamed by one thread and published by another needs this
/// (a system call and inter-processor interrupts: for a rare path). False, doing nothing,
/// where [`other_threads_fence_available`] is false.
pub fn fence_other_threads() -> bool {
    other_threads_fence_available() && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_threads_fence_works_on_this_kernel() {
        // Every kernel CI and the rxe VM run (6.1 and later) has it; a sandbox without it
        // only means streaming writers fall back to plain copies.
        if !other_threads_fence_available() {
            eprintln!("skipped: membarrier(PRIVATE_EXPEDITED) is not available here");
            return;
        }
        assert!(fence_other_threads());
        assert!(fence_other_threads(), "and again");
    }

    #[test]
    fn a_streamed_copy_equals_the_source_at_every_length_and_alignment() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; 4096 + 256];
        // A 64-byte aligned place in `dst` (a batch's payload), and places off it (the
        // contract allows any destination).
        let aligned = dst.as_ptr().align_offset(64);
        for len in (0..300).chain([1023, 1024, 1025, 4000]) {
            for (skew, off) in [
                (0, 0),
                (1, 0),
                (7, 0),
                (15, 0),
                (33, 0),
                (0, 5),
                (3, 17),
                (0, 63),
            ] {
                let at = aligned + off;
                let d = &mut dst[at..at + len + 64];
                d.fill(0xee);
                let s = &src[skew..skew + len];
                // SAFETY: `d` holds len + 64 bytes from a 64-byte aligned start, `s` holds
                // len bytes, and they are different vectors.
                unsafe { stream_copy(d.as_mut_ptr(), s.as_ptr(), len) };
                store_fence();
                assert_eq!(
                    &d[..len],
                    s,
                    "length {len}, source skew {skew}, offset {off}"
                );
                assert!(d[len..].iter().all(|&b| b == 0xee), "nothing past the end");
            }
        }
    }

    #[test]
    fn detection_reports_a_usable_instruction_on_x86_64() {
        let s = FlushSupport::detect();
        if cfg!(target_arch = "x86_64") {
            assert!(s.clflush, "clflush is part of SSE2");
            assert_ne!(s.invalidate_instr(), FlushInstr::None);
            assert_ne!(s.writeback_instr(), FlushInstr::None);
            if s.clwb {
                assert_eq!(s.writeback_instr(), FlushInstr::Clwb);
            }
        }
        assert_eq!(FlushSupport::detect(), s, "detection is cached and stable");
    }

    #[test]
    fn every_available_instruction_flushes_without_changing_data() {
        let s = FlushSupport::detect();
        let mut buf = vec![0u8; 4096];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut instrs = vec![FlushInstr::None];
        if s.clflush {
            instrs.push(FlushInstr::Clflush);
        }
        if s.clflushopt {
            instrs.push(FlushInstr::Clflushopt);
        }
        if s.clwb {
            instrs.push(FlushInstr::Clwb);
        }
        if s.aarch64_dc {
            instrs.push(FlushInstr::DcCivac);
        }
        for instr in instrs {
            // SAFETY: the range is inside `buf`, which is live.
            unsafe { flush_range(instr, buf.as_ptr().add(3), 1000) };
            store_fence();
            load_fence();
            full_fence();
            assert!(
                buf.iter().enumerate().all(|(i, b)| *b == i as u8),
                "{instr:?}"
            );
        }
    }
}
