//! Which process holds what: liveness that a zombie or a reused process id cannot fool.
//!
//! A process id alone names a process only while it runs: once it exits (and is reaped), the
//! kernel gives the number to a later process, and `kill(pid, 0)` then answers for that one.
//! So what a process holds in the pool is stamped with a [`ProcessId`]: its pid and its start
//! time (clock ticks after boot, field 22 of `/proc/<pid>/stat`), which the kernel never gives
//! two processes with the same pid on one boot. A holder is alive while a process with that
//! pid exists, is not a zombie, and started at that time.
//!
//! Why not a pidfd: a pidfd names one process for good, but it is a file descriptor of the
//! process that opened it; the pool's words are read by every process (a restarted broker, the
//! sequencer, other clients), each of which would have to open its own pidfd from a pid, which
//! is exactly the race a pidfd avoids. The start time travels in the pool word itself. On a
//! host without `/proc` the start time is 0 and only the pid is checked.

/// Bits of a packed [`ProcessId`] that hold the pid: Linux pids are below `PID_MAX_LIMIT`
/// (2^22).
const PID_BITS: u32 = 22;
const PID_MASK: u64 = (1 << PID_BITS) - 1;
/// Bits that hold the start time: 2^42 ticks is 1,390 years at 100 Hz.
const START_MASK: u64 = (1 << (64 - PID_BITS)) - 1;

/// One process for its whole life: its pid and when it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: u32,
    /// Clock ticks after boot at which it started (0: unknown, only the pid is checked).
    pub start: u64,
}

impl ProcessId {
    /// This process.
    pub fn current() -> ProcessId {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        // Read once per process (a pid change means a fork: read again).
        static PACKED: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let cached = ProcessId::unpack(PACKED.load(Relaxed));
        if cached.pid == pid {
            return cached;
        }
        let me = ProcessId {
            pid,
            start: start_time(pid).unwrap_or(0),
        };
        PACKED.store(me.pack(), Relaxed);
        me
    }

    /// The process running as `pid` now, if there is one.
    pub fn of(pid: u32) -> Option<ProcessId> {
        start_time(pid).map(|start| ProcessId { pid, start })
    }

    /// Packs it into one word (for the pool): `start << 22 | pid`, the start time truncated
    /// to 42 bits.
    pub fn pack(self) -> u64 {
        (self.start & START_MASK) << PID_BITS | (u64::from(self.pid) & PID_MASK)
    }

    /// Undoes [`pack`](Self::pack). A word written as a bare pid (start 0) unpacks to it.
    pub fn unpack(word: u64) -> ProcessId {
        ProcessId {
            pid: (word & PID_MASK) as u32,
            start: word >> PID_BITS,
        }
    }

    /// Whether this process still runs: its pid exists, is not a zombie, and (if the start
    /// time is known) started when this one did, so a later process given the same pid is
    /// not taken for it.
    pub fn alive(self) -> bool {
        if self.pid == 0 || self.pid > i32::MAX as u32 || !exists(self.pid as i32) {
            return false;
        }
        // One read of `/proc/<pid>/stat` gives both the state and the start time. Unreadable
        // (it exited this instant, or no procfs): the signal check above is all there is.
        let Some(stat) = Stat::read(self.pid) else {
            return true;
        };
        !stat.zombie && (self.start == 0 || stat.start & START_MASK == self.start & START_MASK)
    }
}

/// True if process `pid` exists and has not exited (it may belong to another user). A zombie
/// (exited, not yet reaped by its parent) is not alive: it holds nothing and will run no more.
/// A pid alone may name a later process: use [`ProcessId::alive`] for anything recorded.
pub fn alive(pid: i32) -> bool {
    exists(pid) && !Stat::read(pid as u32).is_some_and(|s| s.zombie)
}

/// Whether a process `pid` exists (a zombie does), by signal 0.
fn exists(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 performs the permission and existence checks only.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// This host's name (the kernel's), if it can be read.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// Whether every thread of process `pid` is stopped (state `T`, by a stop signal, or `t`, by a
/// tracer): a stop signal reaches a process's threads one by one, and a thread runs on until
/// its own turn. False when the process is gone.
pub fn all_threads_stopped(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.filter_map(|t| t.ok()).all(|t| {
            Stat::read_path(&t.path().join("stat"))
                .is_some_and(|s| s.state == 'T' || s.state == 't')
        })
    })
}

/// What liveness needs of `/proc/<pid>/stat` (or of a thread's `/proc/<pid>/task/<tid>/stat`).
struct Stat {
    /// The state letter (field 3).
    state: char,
    /// State `Z` (zombie) or `X` (being reaped).
    zombie: bool,
    /// Start time in clock ticks after boot (field 22).
    start: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Stat> {
        Stat::read_path(std::path::Path::new(&format!("/proc/{pid}/stat")))
    }

    fn read_path(path: &std::path::Path) -> Option<Stat> {
        let s = std::fs::read_to_string(path).ok()?;
        // The command name is in parentheses and may hold spaces and parentheses itself;
        // the fields after it start with the state (field 3).
        let mut fields = s.rsplit_once(')')?.1.split_whitespace();
        let state = fields.next()?;
        let start = fields.nth(18)?.parse().ok()?;
        Some(Stat {
            state: state.chars().next()?,
            zombie: state == "Z" || state == "X",
            start,
        })
    }
}

/// Start time of `pid` in clock ticks after boot.
fn start_time(pid: u32) -> Option<u64> {
    Stat::read(pid).map(|s| s.start)
}

#[cfg(test)]
mod tests {
    use super::ProcessId;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(super::alive(std::process::id() as i32));
        assert!(ProcessId::current().alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId::of(child.id()).expect("a running child has a start time");
        child.wait().unwrap();
        assert!(!super::alive(id.pid as i32));
        assert!(!id.alive());
    }

    #[test]
    fn a_process_stopped_by_a_signal_has_every_thread_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(
            !super::all_threads_stopped(pid),
            "a sleeping process is not stopped"
        );
        let kill = |sig: &str| {
            let ok = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill {sig} {pid}");
        };
        kill("-STOP");
        let start = std::time::Instant::now();
        while !super::all_threads_stopped(pid) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "SIGSTOP never showed"
            );
            std::thread::yield_now();
        }
        kill("-KILL");
        child.wait().unwrap();
        assert!(
            !super::all_threads_stopped(pid),
            "a reaped process is not stopped"
        );
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let child = std::process::Command::new("sleep")
            .arg("0.05")
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id()).expect("a running child has a start time");
        assert!(id.alive());
        // Not reaped: it stays a zombie until `wait`.
        let start = std::time::Instant::now();
        while id.alive() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the exited child still counts as alive"
            );
            std::thread::yield_now();
        }
        assert!(!super::alive(id.pid as i32));
        drop(child);
    }

    #[test]
    fn a_later_process_with_the_same_pid_is_not_taken_for_the_recorded_one() {
        // The recorded holder is this process's pid with another start time: what a pool
        // word says after the pid was reused.
        let me = ProcessId::current();
        assert_ne!(me.start, 0, "this host has /proc");
        let earlier = ProcessId {
            pid: me.pid,
            start: me.start - 1,
        };
        assert!(!earlier.alive());
        assert!(ProcessId::unpack(me.pack()).alive());
    }

    #[test]
    fn packing_keeps_the_pid_and_the_low_start_bits_and_a_bare_pid_unpacks_to_itself() {
        let id = ProcessId {
            pid: (1 << 22) - 1,
            start: (1 << 42) - 1,
        };
        assert_eq!(ProcessId::unpack(id.pack()), id);
        assert_eq!(
            ProcessId::unpack(4321),
            ProcessId {
                pid: 4321,
                start: 0
            }
        );
        assert!(ProcessId::unpack(u64::from(std::process::id())).alive());
        assert!(!ProcessId::unpack(0).alive());
    }
}
