//! Rate-limited warnings: a warning that a polling loop can hit on every round (a rogue
//! publisher's bad descriptors, a sequencer that keeps failing) is logged the first time,
//! then at most once per interval, saying how many were left out since the last line:
//!
//! ```text
//! WARN broker 0: verbs client 7: immediate 9 names no expected staging slot (want 3); rejected
//! WARN broker 0: verbs client 7: immediate 4 names no expected staging slot (want 3); rejected (5120 more since)
//! ```
//!
//! One [`LogLimit`] per warning site, kept by the loop's owner. It takes the time as an
//! argument (`embar_sys::clock::monotonic_ns()` in production, any number in a test) and
//! formats nothing for a warning it leaves out, so it costs a compare on a hot path.
//!
//! ```
//! use embar_dataplane::{log_limit::LogLimit, warn_limited};
//! let mut bad_descriptor = LogLimit::default();
//! # let (now_ns, client) = (0, 7);
//! warn_limited!(bad_descriptor, now_ns, "client {client}: descriptor rejected");
//! ```

use std::fmt;
use std::time::Duration;

/// The interval of [`LogLimit::default`]: at most one line per warning site this often.
pub const WARN_INTERVAL_DEFAULT: Duration = Duration::from_secs(10);

/// The state of one rate-limited warning site. See the module docs.
#[derive(Clone, Debug)]
pub struct LogLimit {
    interval_ns: u64,
    /// When the last line was logged; `None` before the first.
    last_ns: Option<u64>,
    /// Occurrences left out since the last logged line.
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(WARN_INTERVAL_DEFAULT)
    }
}

impl LogLimit {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> LogLimit {
        LogLimit {
            interval_ns: interval.as_nanos() as u64,
            last_ns: None,
            suppressed: 0,
        }
    }

    /// Counts one occurrence at `now_ns`. Returns `Some(n)` when this one is to be logged,
    /// `n` being how many were left out since the last logged line; `None` when it is left
    /// out. A clock that goes backwards (another thread's older reading) counts as no time.
    pub fn admit(&mut self, now_ns: u64) -> Option<u64> {
        let due = match self.last_ns {
            None => true,
            Some(last) => now_ns.saturating_sub(last) >= self.interval_ns,
        };
        if due {
            self.last_ns = Some(now_ns);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Occurrences left out since the last logged line (not yet reported).
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Logs `args` at warn level when [`admit`](Self::admit) says so, with the count of
    /// those left out. [`warn_limited!`](crate::warn_limited) does the same and formats
    /// the message only when it is logged, under the caller's module as the log target.
    pub fn warn(&mut self, now_ns: u64, args: fmt::Arguments<'_>) {
        if let Some(more) = self.admit(now_ns) {
            emit(module_path!(), more, args);
        }
    }
}

/// The " (N more since)" suffix of a logged line; empty when none were left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoreSince(pub u64);

impl fmt::Display for MoreSince {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} more since)"),
        }
    }
}

/// Logs one admitted line under `target`. Used by [`warn_limited!`](crate::warn_limited).
#[doc(hidden)]
pub fn emit(target: &str, more: u64, args: fmt::Arguments<'_>) {
    log::warn!(target: target, "{args}{}", MoreSince(more));
}

/// `warn_limited!(limit, now_ns, "format", args...)`: a `log::warn!` that goes through the
/// [`LogLimit`] `limit` (an lvalue: a field or a local). The arguments are evaluated and
/// formatted only when the line is logged.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $now_ns:expr, $($arg:tt)+) => {
        if let ::core::option::Option::Some(more) = $limit.admit($now_ns) {
            $crate::log_limit::emit(::core::module_path!(), more, ::core::format_args!($($arg)+));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limit() -> LogLimit {
        LogLimit::new(Duration::from_secs(10))
    }

    #[test]
    fn first_occurrence_is_logged_at_once() {
        let mut l = limit();
        assert_eq!(l.admit(123), Some(0));
    }

    #[test]
    fn repeats_inside_the_interval_are_counted_not_logged() {
        let mut l = limit();
        assert_eq!(l.admit(0), Some(0));
        for k in 1..=1000u64 {
            assert_eq!(l.admit(k * 1000), None);
        }
        assert_eq!(l.suppressed(), 1000);
        assert_eq!(l.admit(10 * SEC - 1), None, "one ns short of the interval");
        assert_eq!(l.admit(10 * SEC), Some(1001), "the count of those left out");
        assert_eq!(l.suppressed(), 0);
    }

    #[test]
    fn at_most_one_line_per_interval_under_a_steady_stream() {
        let mut l = limit();
        // One occurrence every 1 ms for 60 s.
        let logged: Vec<(u64, u64)> = (0..60_000u64)
            .map(|ms| ms * 1_000_000)
            .filter_map(|t| l.admit(t).map(|more| (t, more)))
            .collect();
        assert_eq!(logged.len(), 6, "{logged:?}");
        assert_eq!(logged[0], (0, 0));
        for w in logged.windows(2) {
            assert_eq!(w[1].0 - w[0].0, 10 * SEC);
            assert_eq!(w[1].1, 9_999, "every occurrence in between is counted");
        }
    }

    #[test]
    fn a_warning_after_a_quiet_spell_is_logged_at_once_without_a_count() {
        let mut l = limit();
        assert_eq!(l.admit(0), Some(0));
        assert_eq!(l.admit(3600 * SEC), Some(0));
    }

    #[test]
    fn a_clock_reading_older_than_the_last_line_does_not_log() {
        let mut l = limit();
        assert_eq!(l.admit(100 * SEC), Some(0));
        assert_eq!(l.admit(5 * SEC), None);
        assert_eq!(l.admit(110 * SEC), Some(1));
    }

    #[test]
    fn the_suffix_names_the_count_only_when_some_were_left_out() {
        assert_eq!(format!("bad{}", MoreSince(0)), "bad");
        assert_eq!(format!("bad{}", MoreSince(42)), "bad (42 more since)");
    }

    #[test]
    fn the_macro_formats_arguments_only_for_logged_lines() {
        struct Counted<'a>(&'a std::cell::Cell<u32>);
        impl fmt::Display for Counted<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.set(self.0.get() + 1);
                f.write_str("x")
            }
        }
        let formatted = std::cell::Cell::new(0);
        let mut l = limit();
        for t in 0..100 {
            crate::warn_limited!(l, t, "value {}", Counted(&formatted));
        }
        // No logger is installed in unit tests, so `log` may skip formatting entirely; what
        // matters is that the 99 left out never reach it.
        assert!(formatted.get() <= 1, "{}", formatted.get());
        assert_eq!(l.suppressed(), 99);
    }
}
