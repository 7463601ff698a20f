//! How pending futures and streams are woken, whatever the executor: one small thread per
//! process wakes each registered [`Waker`] when its time comes; the woken future then looks
//! at the pool words itself (it polls).
//!
//! Why a timer and not an event: an acknowledgement or an ordered batch is a word in shared
//! memory that a broker or the sequencer writes; nothing signals this process (the brokers'
//! futex parking is for their own loops). So a pending future asks to be woken after an
//! interval ([`Config::poll_interval`](crate::Config), backing off while nothing comes), and
//! this thread does nothing else: it never touches a publisher or the pool, so it needs no
//! lock that a publishing thread takes. It starts on first use and sleeps on a condition
//! variable while nothing is pending.

use std::sync::{Condvar, Mutex, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

/// Wakers waiting for their time, and the condition the thread sleeps on.
struct Notifier {
    due: Mutex<Vec<(Instant, Waker)>>,
    changed: Condvar,
}

/// Pending wakers at most: past it, a waker is woken at once (its future polls again
/// sooner than asked, which is always correct).
const PENDING_MAX: usize = 1 << 16;

fn notifier() -> &'static Notifier {
    static N: OnceLock<&'static Notifier> = OnceLock::new();
    N.get_or_init(|| {
        let n: &'static Notifier = Box::leak(Box::new(Notifier {
            due: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("embar-notifier".into())
            .spawn(move || n.run())
            .expect("the notifier thread starts");
        n
    })
}

/// Wakes `waker` once `after` has passed.
pub(crate) fn wake_after(waker: &Waker, after: Duration) {
    let n = notifier();
    let mut due = n.due.lock().unwrap_or_else(|p| p.into_inner());
    if due.len() >= PENDING_MAX {
        drop(due);
        waker.wake_by_ref();
        return;
    }
    let at = Instant::now() + after;
    // The thread sleeps until the earliest deadline: a new earliest one must wake it.
    let earliest = due.iter().all(|(t, _)| at < *t);
    due.push((at, waker.clone()));
    drop(due);
    if earliest {
        n.changed.notify_one();
    }
}

impl Notifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Waker)>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        let mut due = self.lock();
        loop {
            let now = Instant::now();
            if due.iter().any(|(t, _)| *t <= now) {
                let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut *due)
                    .into_iter()
                    .partition(|(t, _)| *t <= now);
                *due = later;
                // Woken outside the lock: a waker may run its task right here (a local
                // executor), and that task may register again.
                drop(due);
                for (_, w) in ready {
                    w.wake();
                }
                due = self.lock();
                continue;
            }
            due = match due.iter().map(|(t, _)| *t).min() {
                None => self.changed.wait(due).unwrap_or_else(|p| p.into_inner()),
                Some(t) => {
                    self.changed
                        .wait_timeout(due, t - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_waker_is_woken_once_after_its_interval() {
        let counts: Vec<Arc<Count>> = (0..3)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let start = Instant::now();
        for (i, c) in counts.iter().enumerate() {
            let w = Waker::from(Arc::clone(c));
            wake_after(&w, Duration::from_millis(20 * (3 - i as u64)));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts.iter().any(|c| c.0.load(Ordering::SeqCst) == 0) {
            assert!(Instant::now() < deadline, "a waker was never woken");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The last one was due 60 ms after it registered.
        assert!(start.elapsed() >= Duration::from_millis(60));
        for c in &counts {
            assert_eq!(c.0.load(Ordering::SeqCst), 1);
        }
    }
}
