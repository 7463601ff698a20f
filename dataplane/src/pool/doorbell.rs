//! Parking on a doorbell of the pool, and ringing it: an idle broker loop on its
//! [`BrokerDoorbell`], a topic's sequencer running alone and a topic's subscribers on theirs
//! in the topic's `SequencerState` (each a [`Bell`]: a futex word and a word that says who
//! waits).
//!
//! The broker (the only writer of `sleeping`; subscribers count themselves in theirs): [`Park::prepare`] reads the doorbell, sets
//! `sleeping`, and fences; the caller then polls once more (work that arrived before the flag
//! was visible is found there) and only if that round was empty calls [`Park::wait`], a
//! futex wait on the doorbell value read first, bounded by a timeout. Dropping the `Park`
//! clears `sleeping`.
//!
//! Whoever gives it work: publish the work first, then [`ring`]: a fence and one load of
//! `sleeping`; only when it is set, bump `doorbell` and wake. Either the broker's last poll
//! sees the work, or the ringer sees `sleeping` (both sides store, fence, then load: one of
//! them sees the other's store), and a bump between the broker's read of the doorbell and its
//! wait makes the wait return at once. A futex does not cross hosts: on a pool shared by
//! several hosts a broker parked on another host wakes at its timeout.

use std::time::Duration;

use super::layout::{BrokerDoorbell, SLEEPING, SLEEPING_SEQUENCER};
use super::Pool;
use crate::error::{PoolError, PoolResult};
use crate::sync::Ordering::{Acquire, Relaxed, Release, SeqCst};
use crate::sync::{fence, AtomicU32};

impl Pool {
    /// The doorbell of broker slot `broker`.
    pub fn broker_doorbell(&self, broker: u32) -> PoolResult<&BrokerDoorbell> {
        if broker >= self.geo.max_brokers {
            return Err(PoolError::OutOfRange {
                what: "broker id",
                value: broker.into(),
                limit: self.geo.max_brokers.into(),
            });
        }
        // SAFETY: broker < max_brokers, so the record lies inside the doorbell region.
        Ok(unsafe { self.record(self.geo.doorbell_offset(broker)) })
    }

    /// Rings every parked broker whose loop runs the sequencers: a broker calls it after a
    /// round that published batches into its rings. One load per broker slot.
    pub fn ring_sequencers(&self) {
        fence(SeqCst);
        for b in 0..self.geo.max_brokers {
            if let Ok(bell) = self.broker_doorbell(b) {
                if bell.sleeping.load(Relaxed) == SLEEPING_SEQUENCER {
                    wake(bell);
                }
            }
        }
    }
}

/// Wakes the broker of `bell` if it is parked (its work published before this call).
pub fn ring(bell: &BrokerDoorbell) {
    Bell::of_broker(bell).ring();
}

fn wake(bell: &BrokerDoorbell) {
    Bell::of_broker(bell).wake();
}

fn futex_word(w: &AtomicU32) -> &std::sync::atomic::AtomicU32 {
    w
}

/// A futex word in the pool and the word beside it that says whether anyone waits on it
/// (non-zero: someone does): the protocol of the module docs, for every doorbell of the pool
/// (a broker's, a topic's sequencer's, a topic's subscribers').
#[derive(Clone, Copy, Debug)]
pub struct Bell<'p> {
    word: &'p AtomicU32,
    waiting: &'p AtomicU32,
}

impl<'p> Bell<'p> {
    pub fn new(word: &'p AtomicU32, waiting: &'p AtomicU32) -> Bell<'p> {
        Bell { word, waiting }
    }

    fn of_broker(bell: &'p BrokerDoorbell) -> Bell<'p> {
        Bell::new(&bell.doorbell, &bell.sleeping)
    }

    /// Wakes whoever waits, if anyone does (what they wait for published before this call):
    /// a fence and one load when nobody does.
    pub fn ring(self) {
        fence(SeqCst);
        if self.waiting.load(Relaxed) != 0 {
            self.wake();
        }
    }

    fn wake(self) {
        self.word.fetch_add(1, Release);
        embar_sys::futex::wake_all(futex_word(self.word));
    }
}

/// How a waiter shows itself in the `waiting` word.
#[derive(Clone, Copy, Debug)]
enum Waiter {
    /// The only waiter: it stores this value (a broker: what it runs) and clears it.
    Alone(u32),
    /// One of several: each adds one and takes it back.
    Counted,
}

/// A waiter about to park; see the module docs.
#[derive(Debug)]
pub struct Park<'p> {
    bell: Bell<'p>,
    seen: u32,
    waiter: Waiter,
}

impl<'p> Park<'p> {
    /// Announces that the broker is about to park (`sequencing`: its loop runs the
    /// sequencers). Poll once more before [`wait`](Self::wait).
    pub fn prepare(bell: &'p BrokerDoorbell, sequencing: bool) -> Park<'p> {
        let flag = if sequencing {
            SLEEPING_SEQUENCER
        } else {
            SLEEPING
        };
        Park::announce(Bell::of_broker(bell), Waiter::Alone(flag))
    }

    /// Announces the only waiter on `bell` (a topic's sequencer). Look once more before
    /// [`wait`](Self::wait).
    pub fn alone(bell: Bell<'p>) -> Park<'p> {
        Park::announce(bell, Waiter::Alone(1))
    }

    /// Announces one of the waiters on `bell` (a topic's subscribers). Look once more
    /// before [`wait`](Self::wait).
    pub fn counted(bell: Bell<'p>) -> Park<'p> {
        Park::announce(bell, Waiter::Counted)
    }

    fn announce(bell: Bell<'p>, waiter: Waiter) -> Park<'p> {
        let seen = bell.word.load(Acquire);
        match waiter {
            Waiter::Alone(v) => bell.waiting.store(v, Relaxed),
            Waiter::Counted => {
                bell.waiting.fetch_add(1, Relaxed);
            }
        }
        fence(SeqCst);
        Park { bell, seen, waiter }
    }

    /// Sleeps until rung, for at most `timeout`.
    pub fn wait(&self, timeout: Duration) {
        embar_sys::futex::wait(futex_word(self.bell.word), self.seen, timeout);
    }
}

impl Drop for Park<'_> {
    fn drop(&mut self) {
        match self.waiter {
            Waiter::Alone(_) => self.bell.waiting.store(0, Relaxed),
            Waiter::Counted => {
                self.bell.waiting.fetch_sub(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::geometry::PoolConfig;
    use crate::pool::tests::TempPool;
    use crate::pool::CreateOptions;
    use std::time::Instant;

    fn pool(name: &str) -> (TempPool, Pool) {
        let t = TempPool::path(name);
        let cfg = PoolConfig {
            pool_bytes: 64 << 20,
            max_topics: 4,
            max_brokers: 4,
            ring_slots: 64,
            segment_bytes: 1 << 20,
        };
        let p = Pool::create(&t.0, &cfg, &CreateOptions::default()).unwrap();
        (t, p)
    }

    #[test]
    fn a_parked_broker_is_woken_by_a_ring_long_before_its_timeout() {
        let (_t, p) = pool("doorbell-wake");
        let bell = p.broker_doorbell(1).unwrap();
        std::thread::scope(|s| {
            let parked = s.spawn(|| {
                let park = Park::prepare(bell, false);
                let start = Instant::now();
                park.wait(Duration::from_secs(10));
                start.elapsed()
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            while bell.sleeping.load(Relaxed) == 0 && Instant::now() < deadline {
                std::hint::spin_loop();
            }
            ring(bell);
            assert!(parked.join().unwrap() < Duration::from_secs(5));
        });
        assert_eq!(bell.sleeping.load(Relaxed), 0, "cleared once awake");
    }

    #[test]
    fn a_ring_between_prepare_and_wait_is_not_lost() {
        let (_t, p) = pool("doorbell-race");
        let bell = p.broker_doorbell(0).unwrap();
        let park = Park::prepare(bell, true);
        p.ring_sequencers();
        let start = Instant::now();
        park.wait(Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(5), "returned at once");
    }

    #[test]
    fn ringing_a_running_broker_changes_nothing_and_ring_sequencers_skips_plain_sleepers() {
        let (_t, p) = pool("doorbell-running");
        let bell = p.broker_doorbell(2).unwrap();
        ring(bell);
        assert_eq!(bell.doorbell.load(Relaxed), 0, "no bump while it runs");
        let park = Park::prepare(bell, false);
        p.ring_sequencers();
        assert_eq!(bell.doorbell.load(Relaxed), 0, "not a sequencer");
        ring(bell);
        assert_eq!(bell.doorbell.load(Relaxed), 1);
        drop(park);
        assert!(p.broker_doorbell(4).is_err());
    }
}
