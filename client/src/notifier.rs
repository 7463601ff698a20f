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

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

/// Wakers waiting for their time, ordered by it: registering one, finding the earliest
/// deadline and taking the due ones each cost O(log n) per waker, whatever else is pending
/// (a scan of every pending waker per registration or per wake-up made a burst of n
/// futures cost O(n^2)). Sans-IO: the time is an argument, and the thread below is its
/// driver.
#[derive(Default)]
struct Timers {
    /// Keyed by deadline, then by registration order (deadlines can be equal).
    due: BTreeMap<(Instant, u64), Waker>,
    registered: u64,
}

impl Timers {
    /// Adds `waker`, due at `at`; whether it is now the earliest (the thread sleeps until
    /// the earliest deadline, so a new earliest one must wake it).
    fn add(&mut self, at: Instant, waker: Waker) -> bool {
        let earliest = self.next_due().is_none_or(|t| at < t);
        self.due.insert((at, self.registered), waker);
        self.registered += 1;
        earliest
    }

    /// The earliest deadline, if any waker waits.
    fn next_due(&self) -> Option<Instant> {
        self.due.first_key_value().map(|((t, _), _)| *t)
    }

    /// Moves every waker due at `now` to `ready`, earliest first; the rest stay.
    fn take_due(&mut self, now: Instant, ready: &mut Vec<Waker>) {
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            ready.push(entry.remove());
        }
    }

    fn len(&self) -> usize {
        self.due.len()
    }
}

/// The timers, and the condition the thread sleeps on.
struct Notifier {
    timers: Mutex<Timers>,
    changed: Condvar,
}

/// Pending wakers at most: past it, a waker is woken at once (its future polls again
/// sooner than asked, which is always correct).
const PENDING_MAX: usize = 1 << 16;

fn notifier() -> &'static Notifier {
    static N: OnceLock<&'static Notifier> = OnceLock::new();
    N.get_or_init(|| {
        let n: &'static Notifier = Box::leak(Box::new(Notifier {
            timers: Mutex::new(Timers::default()),
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
    let mut timers = n.lock();
    if timers.len() >= PENDING_MAX {
        drop(timers);
        waker.wake_by_ref();
        return;
    }
    let earliest = timers.add(Instant::now() + after, waker.clone());
    drop(timers);
    if earliest {
        n.changed.notify_one();
    }
}

impl Notifier {
    fn lock(&self) -> MutexGuard<'_, Timers> {
        self.timers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        let mut ready: Vec<Waker> = Vec::new();
        let mut timers = self.lock();
        loop {
            let now = Instant::now();
            timers.take_due(now, &mut ready);
            if !ready.is_empty() {
                // Woken outside the lock: a waker may run its task right here (a local
                // executor), and that task may register again.
                drop(timers);
                for w in ready.drain(..) {
                    w.wake();
                }
                timers = self.lock();
                continue;
            }
            timers = match timers.next_due() {
                None => self.changed.wait(timers).unwrap_or_else(|p| p.into_inner()),
                Some(t) => {
                    self.changed
                        .wait_timeout(timers, t - now)
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
    use std::sync::Arc;
    use std::task::Wake;

    /// Which wakers were woken, in order, for a test to wait on.
    #[derive(Default)]
    struct Tally {
        woken: Mutex<Vec<usize>>,
        changed: Condvar,
    }

    impl Tally {
        /// Waits until `n` wakes happened, or panics after `limit`: the wakes, in order.
        fn wait_for(&self, n: usize, limit: Duration) -> Vec<usize> {
            let deadline = Instant::now() + limit;
            let mut woken = self.woken.lock().unwrap();
            while woken.len() < n {
                let left = deadline
                    .checked_duration_since(Instant::now())
                    .unwrap_or_else(|| panic!("{} of {n} wakers woken", woken.len()));
                woken = self.changed.wait_timeout(woken, left).unwrap().0;
            }
            woken.clone()
        }
    }

    /// Waker number `id`, which records its wakes in a tally.
    struct Mark {
        id: usize,
        tally: Arc<Tally>,
    }

    impl Wake for Mark {
        fn wake(self: Arc<Self>) {
            self.tally.woken.lock().unwrap().push(self.id);
            self.tally.changed.notify_all();
        }
    }

    fn wakers(n: usize, tally: &Arc<Tally>) -> Vec<Waker> {
        (0..n)
            .map(|id| {
                Waker::from(Arc::new(Mark {
                    id,
                    tally: Arc::clone(tally),
                }))
            })
            .collect()
    }

    #[test]
    fn many_timers_give_exactly_the_due_wakers_earliest_first() {
        let n = 100_000;
        let tally = Arc::new(Tally::default());
        let base = Instant::now();
        // Deadlines scattered over 0..1000 us, many of them equal.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let offset_us: Vec<u64> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) % 1000
            })
            .collect();
        let mut timers = Timers::default();
        let mut earliest_us = u64::MAX;
        for (id, w) in wakers(n, &tally).into_iter().enumerate() {
            let at = base + Duration::from_micros(offset_us[id]);
            assert_eq!(timers.add(at, w), offset_us[id] < earliest_us);
            earliest_us = earliest_us.min(offset_us[id]);
        }
        assert_eq!(timers.len(), n);
        assert_eq!(
            timers.next_due(),
            Some(base + Duration::from_micros(earliest_us))
        );

        let mut ready = Vec::new();
        let mut woken_before = 0;
        for now_us in [0, 1, 250, 250, 600, 999] {
            timers.take_due(base + Duration::from_micros(now_us), &mut ready);
            for w in ready.drain(..) {
                w.wake();
            }
            let woken = tally.woken.lock().unwrap().clone();
            let due = offset_us.iter().filter(|o| **o <= now_us).count();
            assert_eq!(woken.len(), due, "at {now_us} us");
            assert_eq!(timers.len(), n - due);
            // Earliest first; equal deadlines in registration order.
            let round = &woken[woken_before..];
            assert!(round
                .windows(2)
                .all(|p| (offset_us[p[0]], p[0]) < (offset_us[p[1]], p[1])));
            woken_before = woken.len();
        }
        let mut woken = tally.woken.lock().unwrap().clone();
        woken.sort_unstable();
        assert_eq!(woken, (0..n).collect::<Vec<_>>(), "each woken once");
        assert_eq!(timers.next_due(), None);
    }

    #[test]
    fn every_waker_is_woken_once_after_its_interval() {
        let tally = Arc::new(Tally::default());
        let start = Instant::now();
        for (i, w) in wakers(3, &tally).iter().enumerate() {
            wake_after(w, Duration::from_millis(20 * (3 - i as u64)));
        }
        let order = tally.wait_for(3, Duration::from_secs(10));
        // The first was due 60 ms after it registered, and is woken last.
        assert!(start.elapsed() >= Duration::from_millis(60));
        assert_eq!(order, vec![2, 1, 0]);
    }

    #[test]
    fn thousands_of_pending_wakers_are_each_woken_once() {
        let n = 20_000;
        let tally = Arc::new(Tally::default());
        for (i, w) in wakers(n, &tally).iter().enumerate() {
            wake_after(w, Duration::from_micros((i as u64 * 7919) % 20_000));
        }
        let mut woken = tally.wait_for(n, Duration::from_secs(30));
        woken.sort_unstable();
        assert_eq!(woken, (0..n).collect::<Vec<_>>());
    }
}
