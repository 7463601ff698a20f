//! How `embar` fails: every command returns a [`CliError`], whose [`ExitKind`] picks the
//! process's exit code and whose message is the one line `embar: <message>` on stderr.
//!
//! The codes follow sysexits.h where one fits; usage errors keep clap's 2. The table is
//! [`EXIT_CODES_HELP`] (shown by `embar --help`) and the README's; a test keeps the three
//! in step.
//!
//! The library crates' typed errors are classified here, by variant, never by their text:
//! the control client's [`ClientError`], the pool's [`PoolError`], the publisher's
//! [`PublishError`] and the bench's [`BenchError`]. A command that still returns
//! `Result<_, String>` gets the generic failure through `From<String>`.

use std::fmt;
use std::io;

use embar_bench::BenchError;
use embar_control::http::ClientError;
use embar_dataplane::client::publisher::PublishError;
use embar_dataplane::PoolError;
use embar_sys::SysError;

/// What kind of failure ended the command; each has its own exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Anything not classified below.
    Failure,
    /// A bad flag, argument or combination of them (clap's own usage errors exit 2 too).
    Usage,
    /// Bad input data: an input line that cannot be a message, a value the system refuses,
    /// a batch a broker rejected, a pool whose layout is corrupt, a check that failed.
    DataError,
    /// What the command names does not exist: an unknown topic, a missing pool file.
    NotFound,
    /// A process the command needs cannot be reached or has nothing free: the control
    /// process, a live broker, a session slot.
    Unavailable,
    /// The pool's file lost its bytes under the process (truncated or replaced): the
    /// process stopped before touching the missing part, or on its bus error
    /// (`embar_sys::bus`).
    PoolLost,
    /// Waiting ran out: for acknowledgements, log space, or a broker's answer. Retrying
    /// later may succeed.
    TimedOut,
}

impl ExitKind {
    pub const ALL: [ExitKind; 7] = [
        ExitKind::Failure,
        ExitKind::Usage,
        ExitKind::DataError,
        ExitKind::NotFound,
        ExitKind::Unavailable,
        ExitKind::PoolLost,
        ExitKind::TimedOut,
    ];

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            ExitKind::Failure => 1,
            ExitKind::Usage => 2,
            ExitKind::DataError => 65,   // EX_DATAERR
            ExitKind::NotFound => 66,    // EX_NOINPUT
            ExitKind::Unavailable => 69, // EX_UNAVAILABLE
            ExitKind::PoolLost => embar_sys::bus::EXIT_CODE as u8, // 74, EX_IOERR
            ExitKind::TimedOut => 75,    // EX_TEMPFAIL
        }
    }
}

/// The exit codes, as `embar --help` shows them (after the options).
pub const EXIT_CODES_HELP: &str = "\
Exit status:
   0  success
   1  failure (not one of those below)
   2  usage: a bad flag, argument, or combination of them
  65  data error: a bad input line, a value refused, a batch rejected, a check failed
  66  not found: an unknown topic, a missing pool
  69  unavailable: the control process or a broker unreachable, no live broker, no free session
  74  pool lost: the pool file was truncated or replaced under the running process
  75  timed out: waiting for acknowledgements, log space or a broker ran out (retry later)";

/// A failed command: its kind and the one line that says what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub kind: ExitKind,
    pub message: String,
}

pub type CliResult<T> = Result<T, CliError>;

impl CliError {
    pub fn new(kind: ExitKind, message: impl fmt::Display) -> CliError {
        CliError {
            kind,
            message: message.to_string(),
        }
    }

    pub fn usage(message: impl fmt::Display) -> CliError {
        CliError::new(ExitKind::Usage, message)
    }

    pub fn data(message: impl fmt::Display) -> CliError {
        CliError::new(ExitKind::DataError, message)
    }

    pub fn not_found(message: impl fmt::Display) -> CliError {
        CliError::new(ExitKind::NotFound, message)
    }

    pub fn unavailable(message: impl fmt::Display) -> CliError {
        CliError::new(ExitKind::Unavailable, message)
    }

    pub fn timed_out(message: impl fmt::Display) -> CliError {
        CliError::new(ExitKind::TimedOut, message)
    }

    /// The same kind, with `context: ` before the message.
    pub fn context(self, context: impl fmt::Display) -> CliError {
        CliError {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }

    /// The line main prints: `embar: <message>`, on one line whatever the message holds.
    pub fn line(&self) -> String {
        let one: Vec<&str> = self
            .message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        format!("embar: {}", one.join("; "))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Commands not yet classified (and helpers shared with them) fail generically.
impl From<String> for CliError {
    fn from(message: String) -> CliError {
        CliError::new(ExitKind::Failure, message)
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> CliError {
        CliError::new(ExitKind::Failure, message)
    }
}

/// For the commands that still return `Result<_, String>` and call a classified helper.
impl From<CliError> for String {
    fn from(e: CliError) -> String {
        e.message
    }
}

fn io_kind(e: &io::Error) -> ExitKind {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ExitKind::TimedOut,
        io::ErrorKind::NotFound => ExitKind::NotFound,
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::NotConnected
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => ExitKind::Unavailable,
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => ExitKind::DataError,
        _ => ExitKind::Failure,
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        let kind = match &e {
            ClientError::Unreachable { .. } => ExitKind::Unavailable,
            ClientError::Io { source, .. } => match io_kind(source) {
                ExitKind::TimedOut => ExitKind::TimedOut,
                _ => ExitKind::Unavailable,
            },
            ClientError::Malformed { .. } => ExitKind::Failure,
            ClientError::Api { status, .. } => match status {
                404 | 410 => ExitKind::NotFound,
                400 | 413 | 422 => ExitKind::DataError,
                503 => ExitKind::Unavailable,
                _ => ExitKind::Failure,
            },
        };
        CliError::new(kind, e)
    }
}

impl From<PoolError> for CliError {
    fn from(e: PoolError) -> CliError {
        let kind = match &e {
            PoolError::UnknownTopic(_) => ExitKind::NotFound,
            PoolError::Sys(SysError::Open { source, .. }) => match io_kind(source) {
                ExitKind::NotFound => ExitKind::NotFound,
                _ => ExitKind::Failure,
            },
            PoolError::NotAPool { .. }
            | PoolError::VersionMismatch { .. }
            | PoolError::SizeMismatch { .. }
            | PoolError::UnexpectedSize { .. }
            | PoolError::CorruptLayout { .. }
            | PoolError::Config(_)
            | PoolError::TopicName(..)
            | PoolError::TopicConfig(_)
            | PoolError::OutOfRange { .. } => ExitKind::DataError,
            PoolError::NoFreeSegment { .. } => ExitKind::Unavailable,
            PoolError::BackingShrunk { .. } => ExitKind::PoolLost,
            _ => ExitKind::Failure,
        };
        CliError::new(kind, e)
    }
}

impl From<PublishError> for CliError {
    fn from(e: PublishError) -> CliError {
        match e {
            PublishError::Pool(p) => p.into(),
            PublishError::Timeout { .. } => CliError::timed_out(e),
            PublishError::TooLarge { .. } | PublishError::Rejected { .. } => CliError::data(e),
            PublishError::Refused { .. } | PublishError::Transport(_) | PublishError::NoBrokers => {
                CliError::unavailable(e)
            }
        }
    }
}

impl From<BenchError> for CliError {
    fn from(e: BenchError) -> CliError {
        match e {
            BenchError::Usage(m) => CliError::usage(m),
            BenchError::Pool(p) => p.into(),
            BenchError::Control(c) => c.into(),
            BenchError::Publish(p) => p.into(),
            e => CliError::new(ExitKind::Failure, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;

    #[test]
    fn every_kind_has_its_own_code_and_a_line_in_the_help() {
        let mut codes: Vec<u8> = ExitKind::ALL.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ExitKind::ALL.len(), "{codes:?}");
        for k in ExitKind::ALL {
            let row = format!("\n{:>4}  ", k.code());
            assert!(
                EXIT_CODES_HELP.contains(&row),
                "{k:?} ({row:?}) not in the help"
            );
        }
    }

    #[test]
    fn the_readme_table_lists_every_code() {
        let readme = include_str!("../README.md");
        for k in ExitKind::ALL {
            let row = format!("| {} |", k.code());
            assert!(readme.contains(&row), "{k:?}: no README row {row:?}");
        }
    }

    #[test]
    fn the_printed_message_is_one_line() {
        let e = CliError::from("first\n\n  second  \nthird\n".to_string());
        assert_eq!(e.line(), "embar: first; second; third");
        assert_eq!(e.kind, ExitKind::Failure);
    }

    #[test]
    fn control_client_errors_are_classified_by_variant() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let refused = ClientError::Unreachable {
            addr,
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        assert_eq!(CliError::from(refused).kind, ExitKind::Unavailable);
        let slow = ClientError::Io {
            addr,
            source: io::ErrorKind::WouldBlock.into(),
        };
        assert_eq!(CliError::from(slow).kind, ExitKind::TimedOut);
        let api = |status| ClientError::Api {
            status,
            message: "m".into(),
        };
        assert_eq!(CliError::from(api(404)).kind, ExitKind::NotFound);
        assert_eq!(CliError::from(api(422)).kind, ExitKind::DataError);
        assert_eq!(CliError::from(api(503)).kind, ExitKind::Unavailable);
        assert_eq!(CliError::from(api(500)).kind, ExitKind::Failure);
    }

    #[test]
    fn publish_errors_are_classified_by_variant() {
        let timeout = PublishError::Timeout {
            what: "acks".into(),
            waited: Duration::from_secs(1),
        };
        assert_eq!(CliError::from(timeout).kind, ExitKind::TimedOut);
        let unknown = PublishError::Pool(PoolError::UnknownTopic("t".into()));
        let e = CliError::from(unknown);
        assert_eq!(e.kind, ExitKind::NotFound);
        assert!(e.message.contains("unknown topic"), "{e}");
        let big = PublishError::TooLarge { size: 9, max: 8 };
        assert_eq!(CliError::from(big).kind, ExitKind::DataError);
        assert_eq!(
            CliError::from(PublishError::NoBrokers).kind,
            ExitKind::Unavailable
        );
    }
}
