//! A clear message instead of a silent death when a mapped pool file shrinks under a running
//! process.
//!
//! Touching a page of a `MAP_SHARED` mapping past the end of its file raises `SIGBUS`; by
//! default the process dies with no word of why, while the rest of the cluster looks well.
//! A file in `/dev/shm` cannot be sealed against shrinking (seals are for memfds), so the
//! truncation cannot be prevented; it can be named. Every [`SharedMapping`] registers its
//! range here; the `SIGBUS` handler checks whether the faulting address lies in one, and if
//! so writes `embar: pool file <path> no longer covers offset <n> of its <len>-byte mapping
//! (the file was truncated or replaced under this process); stopping` to stderr and exits
//! with [`EXIT_CODE`] (74, `EX_IOERR`). A fault anywhere else restores the default action
//! and lets the signal take its course.
//!
//! The handler only reads atomics, formats into a stack buffer and calls `write` and
//! `_exit`, all async-signal-safe.
//!
//! [`SharedMapping`]: crate::mapping::SharedMapping

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The exit code of a process stopped by a truncated pool (`EX_IOERR`).
pub const EXIT_CODE: i32 = 74;

/// Mappings guarded at once (a process maps one pool, a test a few).
const SLOTS: usize = 16;
/// Bytes of a mapping's path kept for the message.
const PATH_BYTES: usize = 200;

struct Slot {
    /// Start address; 0 when free. Stored last (Release) when a slot is filled.
    base: AtomicUsize,
    len: AtomicUsize,
    path_len: AtomicUsize,
    path: [std::sync::atomic::AtomicU8; PATH_BYTES],
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    path_len: AtomicUsize::new(0),
    path: [const { std::sync::atomic::AtomicU8::new(0) }; PATH_BYTES],
};

static SLOTS_TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// A slot being filled (claimed by CAS on `base` from 0 to this) is not read by the handler.
const CLAIMED: usize = 1;
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Names `base..base + len` (a mapping of `path`) in the message of a bus error. A mapping
/// that finds no free slot is simply not named (the default action stays for it).
pub fn guard(base: *const u8, len: usize, path: &std::path::Path) {
    install();
    let bytes = path.as_os_str().as_encoded_bytes();
    for s in &SLOTS_TABLE {
        if s.base
            .compare_exchange(0, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            let n = bytes.len().min(PATH_BYTES);
            for (dst, &b) in s.path.iter().zip(&bytes[..n]) {
                dst.store(b, Ordering::Relaxed);
            }
            s.path_len.store(n, Ordering::Relaxed);
            s.len.store(len, Ordering::Relaxed);
            s.base.store(base as usize, Ordering::Release);
            return;
        }
    }
}

/// Forgets the mapping at `base` (it is being unmapped).
pub fn unguard(base: *const u8) {
    for s in &SLOTS_TABLE {
        if s.base
            .compare_exchange(base as usize, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

fn install() {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: a zeroed `sigaction` is a valid value to fill in; `on_bus_error` has the
    // three-argument signature SA_SIGINFO requires and only does async-signal-safe work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_bus_error as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_bus_error(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler of SIGBUS, whose
    // `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &SLOTS_TABLE {
        let base = s.base.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Relaxed);
        if base > CLAIMED && addr >= base && addr - base < len {
            let mut msg = Message::default();
            msg.push(b"embar: pool file ");
            let n = s.path_len.load(Ordering::Relaxed);
            for b in &s.path[..n] {
                msg.push(&[b.load(Ordering::Relaxed)]);
            }
            msg.push(b" no longer covers offset ");
            msg.number(addr - base);
            msg.push(b" of its ");
            msg.number(len);
            msg.push(
                b"-byte mapping (the file was truncated or replaced under this process); stopping\n",
            );
            // SAFETY: writing a stack buffer to stderr and exiting without unwinding are
            // async-signal-safe.
            unsafe {
                libc::write(2, msg.buf.as_ptr().cast(), msg.len);
                libc::_exit(EXIT_CODE);
            }
        }
    }
    // Not a pool mapping: the default action, taken when the faulting access runs again.
    // SAFETY: restoring the default disposition has no precondition.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// A message formatted without allocating (in a signal handler).
struct Message {
    buf: [u8; 512],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            buf: [0; 512],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_are_written_in_decimal() {
        let mut m = super::Message::default();
        m.number(0);
        m.push(b" ");
        m.number(268_435_456);
        assert_eq!(&m.buf[..m.len], b"0 268435456");
    }
}
