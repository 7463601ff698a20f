//! A stop flag raised by SIGINT or SIGTERM, for long-running polling processes.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handlers (idempotent) and returns the flag they raise.
pub fn stop_on_term() -> &'static AtomicBool {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is an `extern "C"` function that only stores to an atomic, which
        // is async-signal-safe; replacing the default disposition has no other effect.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    &STOP
}

/// Restores SIGPIPE's default action (the Rust runtime ignores it), so that a command line
/// tool whose reader goes away (`embar cluster status | head -1`) ends quietly, as Unix tools
/// do, instead of failing on the next write.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to the default has no precondition; no handler
    // of this program is replaced (none is installed for SIGPIPE).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
