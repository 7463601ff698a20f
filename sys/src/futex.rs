//! Parking on a word of shared memory: a futex without `FUTEX_PRIVATE_FLAG`, so a waiter in
//! one process is woken by a store and wake in another process that maps the same page.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout`. Returns early on a wake, on a
/// signal, or at once if the word no longer holds `expected`. Spurious returns are allowed:
/// callers re-check their condition.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned 32-bit word (the reference guarantees it); FUTEX_WAIT
    // only reads it, and `ts` outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter parked on `word`, in any process. Returns how many were woken.
pub fn wake_all(word: &AtomicU32) -> usize {
    // SAFETY: `word` is a live, aligned 32-bit word; FUTEX_WAKE does not access it.
    let n = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
    n.max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_parked_thread_is_woken_by_a_store_and_wake() {
        let word = Arc::new(AtomicU32::new(0));
        let w = word.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            while w.load(Ordering::Acquire) == 0 {
                wait(&w, 0, Duration::from_secs(10));
            }
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        word.store(1, Ordering::Release);
        wake_all(&word);
        let waited = t.join().unwrap();
        assert!(
            waited < Duration::from_secs(10),
            "woken by the wake, not the timeout"
        );
    }

    #[test]
    fn wait_returns_at_once_when_the_word_changed() {
        let word = AtomicU32::new(7);
        let start = Instant::now();
        wait(&word, 0, Duration::from_secs(5));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
