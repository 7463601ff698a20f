//! A broker's side of membership as a sans-IO state machine: the broker's heartbeat thread
//! tells it what each heartbeat (or rejoin) got and the time; it answers what to do next.
//!
//! The data plane outlives the control plane: while the control process cannot be reached
//! (killed, restarting, frozen, answering errors) the broker goes on serving and retries
//! with a backoff that starts at [`BACKOFF_MIN`] and doubles up to the heartbeat interval,
//! so that a control process that comes back hears from every broker within one interval,
//! well inside its failure window. Only two things stop a broker:
//! - the control process says it was declared dead (it missed heartbeats while the control
//!   process was running; its slot may already serve another broker), or refuses to let it
//!   rejoin its slot;
//! - the control process stays unreachable for longer than the grace period: past it the
//!   broker cannot know whether it is still a member, and stops rather than risk writing
//!   into a slot the control process gave away.
//!
//! A control process that answers "unknown broker" (it restarted without the state that
//! named this broker) is asked to let the broker rejoin its own id and slot.

use std::time::Duration;

/// First retry after a failed heartbeat.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Default grace period: how long the control process may be unreachable.
pub const GRACE_DEFAULT: Duration = Duration::from_secs(30);

/// What a heartbeat (or a rejoin) got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Beat {
    /// Answered; whether this broker is to run the sequencer.
    Alive { sequencer: bool },
    /// The control process does not know this broker.
    Unknown,
    /// The control process declared this broker dead.
    Dead(String),
    /// A rejoin was refused (its slot went to another broker).
    Refused(String),
    /// No answer, or an error that says nothing about this broker (refused connection,
    /// timeout, 5xx, a malformed answer).
    Unreachable(String),
}

/// What the broker does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Heartbeat again after this long.
    Heartbeat(Duration),
    /// Ask to rejoin its id and slot, now.
    Rejoin,
    /// Stop serving, for this reason.
    Stop(String),
}

/// See the module docs.
#[derive(Debug)]
pub struct Keepalive {
    interval: Duration,
    grace: Duration,
    backoff: Duration,
    last_ok_ns: u64,
    /// When the current outage began, and how many attempts failed since.
    outage: Option<(u64, u64)>,
}

impl Keepalive {
    /// A broker registered at `now_ns`.
    pub fn new(interval: Duration, grace: Duration, now_ns: u64) -> Keepalive {
        Keepalive {
            interval,
            grace,
            backoff: BACKOFF_MIN.min(interval),
            last_ok_ns: now_ns,
            outage: None,
        }
    }

    /// Since when, and over how many failed attempts, the control process has been
    /// unreachable.
    pub fn outage(&self) -> Option<(u64, u64)> {
        self.outage
    }

    pub fn on_beat(&mut self, beat: Beat, now_ns: u64) -> Next {
        match beat {
            Beat::Alive { .. } => {
                self.last_ok_ns = now_ns;
                self.outage = None;
                self.backoff = BACKOFF_MIN.min(self.interval);
                Next::Heartbeat(self.interval)
            }
            Beat::Unknown => Next::Rejoin,
            Beat::Dead(why) => Next::Stop(format!("declared dead by the control process: {why}")),
            Beat::Refused(why) => Next::Stop(format!(
                "the control process refused to let this broker rejoin: {why}"
            )),
            Beat::Unreachable(why) => {
                self.outage.get_or_insert((now_ns, 0)).1 += 1;
                let silent = Duration::from_nanos(now_ns.saturating_sub(self.last_ok_ns));
                if silent > self.grace {
                    return Next::Stop(format!(
                        "the control process was unreachable for {:.1} s, past the grace of {:.1} s ({why})",
                        silent.as_secs_f64(),
                        self.grace.as_secs_f64()
                    ));
                }
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(self.interval);
                Next::Heartbeat(wait)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn down(k: &mut Keepalive, t: u64) -> Next {
        k.on_beat(Beat::Unreachable("connection refused".into()), t)
    }

    #[test]
    fn an_unreachable_control_is_retried_with_backoff_up_to_the_interval_until_the_grace() {
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(s, Duration::from_secs(30), 0);
        assert_eq!(
            k.on_beat(Beat::Alive { sequencer: false }, 1000 * MS),
            Next::Heartbeat(s)
        );
        let mut t = 2000 * MS;
        let mut waits = Vec::new();
        while let Next::Heartbeat(d) = down(&mut k, t) {
            waits.push(d);
            t += d.as_nanos() as u64 + 5000 * MS; // each attempt also times out after 5 s
        }
        assert_eq!(
            &waits[..5],
            &[50, 100, 200, 400, 800].map(Duration::from_millis)
        );
        assert!(waits[5..].iter().all(|w| *w == s), "capped at the interval");
        assert!(t > 31_000 * MS, "gave up only past the grace, at {t}");
        assert!(k.outage().is_some());
    }

    #[test]
    fn the_control_coming_back_resets_the_outage_and_the_backoff() {
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(s, Duration::from_secs(30), 0);
        for i in 0..10 {
            assert!(matches!(down(&mut k, i * 2000 * MS), Next::Heartbeat(_)));
        }
        assert_eq!(k.outage().map(|o| o.1), Some(10));
        assert_eq!(k.on_beat(Beat::Unknown, 20_000 * MS), Next::Rejoin);
        assert_eq!(
            k.on_beat(Beat::Alive { sequencer: true }, 20_001 * MS),
            Next::Heartbeat(s)
        );
        assert_eq!(k.outage(), None);
        assert_eq!(
            down(&mut k, 45_000 * MS),
            Next::Heartbeat(Duration::from_millis(50)),
            "a new outage starts from the smallest backoff, and 25 s is inside the grace"
        );
    }

    #[test]
    fn only_death_refusal_or_the_grace_stop_a_broker() {
        let mut k = Keepalive::new(Duration::from_secs(1), Duration::from_secs(30), 0);
        assert!(matches!(
            k.on_beat(Beat::Dead("gone".into()), MS),
            Next::Stop(_)
        ));
        let mut k = Keepalive::new(Duration::from_secs(1), Duration::from_secs(30), 0);
        assert!(matches!(
            k.on_beat(Beat::Refused("slot taken".into()), MS),
            Next::Stop(_)
        ));
        let mut k = Keepalive::new(Duration::from_secs(1), Duration::from_secs(2), 0);
        assert!(matches!(down(&mut k, 1000 * MS), Next::Heartbeat(_)));
        match down(&mut k, 2001 * MS) {
            Next::Stop(why) => assert!(why.contains("grace"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
