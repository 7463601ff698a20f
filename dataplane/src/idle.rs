//! What a polling loop does when a round finds no work: spin, then yield the core, then rest
//! (sleep, or park on a futex word), each phase with a named bound. One policy for every
//! polling loop (broker, sequencer), so that a loop that ran recently answers within
//! microseconds and an idle one costs no core.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdlePolicy {
    /// Empty rounds spent spinning (`spin_loop` hint).
    pub spin_rounds: u32,
    /// Idle time spent yielding the core to anything runnable before resting: a publisher
    /// that sends every few milliseconds or faster finds the loop awake.
    pub yield_for: Duration,
    /// Longest rest per empty round after that.
    pub rest: Duration,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy {
            spin_rounds: 64,
            yield_for: Duration::from_millis(5),
            rest: Duration::from_micros(50),
        }
    }
}

/// The state of one loop's idleness.
#[derive(Debug)]
pub struct Idle {
    policy: IdlePolicy,
    rounds: u32,
    since: Option<Instant>,
}

impl Idle {
    pub fn new(policy: IdlePolicy) -> Idle {
        Idle {
            policy,
            rounds: 0,
            since: None,
        }
    }

    /// Call after every round with the work it did; when resting, `rest` is called with the
    /// longest time to rest (sleep, or wait on a futex word that a producer rings).
    pub fn after(&mut self, work: usize, rest: impl FnOnce(Duration)) {
        if let Some(d) = self.step(work) {
            rest(d);
        }
    }

    /// As [`after`](Self::after), but returns the rest instead of taking it: `Some(longest
    /// rest)` once spinning and yielding are over, for a loop that parks in its own way (a
    /// broker on its doorbell, after one more poll).
    pub fn step(&mut self, work: usize) -> Option<Duration> {
        if work > 0 {
            self.rounds = 0;
            self.since = None;
            return None;
        }
        self.rounds = self.rounds.saturating_add(1);
        let since = *self.since.get_or_insert_with(Instant::now);
        if self.rounds < self.policy.spin_rounds {
            std::hint::spin_loop();
        } else if since.elapsed() < self.policy.yield_for {
            std::thread::yield_now();
        } else {
            return Some(self.policy.rest);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_loop_rests_only_after_spinning_and_yielding_and_work_resets_it() {
        let policy = IdlePolicy {
            spin_rounds: 3,
            yield_for: Duration::from_millis(20),
            rest: Duration::from_micros(7),
        };
        let mut idle = Idle::new(policy);
        let mut rested = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(10) {
            idle.after(0, |d| rested.push(d));
        }
        assert!(rested.is_empty(), "still within the yield phase");
        std::thread::sleep(Duration::from_millis(15));
        idle.after(0, |d| rested.push(d));
        assert_eq!(rested, vec![Duration::from_micros(7)]);
        idle.after(1, |_| panic!("work never rests"));
        idle.after(0, |_| panic!("the spin phase starts again after work"));
    }
}
