//! How `embar` fails: every command returns a [`CliError`], whose [`ExitKind`] picks the
//! process's exit code and whose message is the one line `embar: <message>` on stderr.
//!
//! The codes follow sysexits.h where one fits; usage errors keep clap's 2. The table is
//! [`EXIT_CODES_HELP`] (shown by `embar --help`) and the README's; a test keeps the three
//! in step.
//!
//! The library crates' typed errors are classified here, never by their text, and by the
//! libraries' own classification: the pool's [`PoolError`] and the publisher's
//! [`PublishError`] by their `ErrorClass`, the client library's errors and the control
//! client's [`ClientError`] by the client's `ErrorKind`, the bench's [`BenchError`] through
//! the errors it wraps. So `embar`'s exit codes and the client library's kinds (and the C
//! ABI's statuses) agree; a test checks it for every error variant. A command that still
//! returns `Result<_, String>` gets the generic failure through `From<String>`.

use std::fmt;

use embar_bench::BenchError;
use embar_client::ErrorKind;
use embar_control::http::ClientError;
use embar_dataplane::client::publisher::PublishError;
use embar_dataplane::{ErrorClass, PoolError};

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

/// The exit kind of each class of data-plane error: the classification
/// (`embar_dataplane::ErrorClass`) that the client library's error kinds follow too.
fn class_exit_kind(class: ErrorClass) -> ExitKind {
    match class {
        ErrorClass::InvalidInput
        | ErrorClass::Rejected
        | ErrorClass::Unreadable
        | ErrorClass::BadPool
        | ErrorClass::FellBehind => ExitKind::DataError,
        ErrorClass::NotFound => ExitKind::NotFound,
        ErrorClass::Unavailable => ExitKind::Unavailable,
        ErrorClass::TimedOut => ExitKind::TimedOut,
        ErrorClass::PoolLost => ExitKind::PoolLost,
        ErrorClass::Conflict | ErrorClass::System => ExitKind::Failure,
    }
}

/// The exit kind of each kind of the client library's errors.
fn client_exit_kind(kind: ErrorKind) -> ExitKind {
    match kind {
        ErrorKind::InvalidInput
        | ErrorKind::Rejected
        | ErrorKind::FellBehind
        | ErrorKind::BadPool => ExitKind::DataError,
        ErrorKind::NotFound => ExitKind::NotFound,
        ErrorKind::Unavailable => ExitKind::Unavailable,
        ErrorKind::TimedOut => ExitKind::TimedOut,
        ErrorKind::PoolLost => ExitKind::PoolLost,
        ErrorKind::Other => ExitKind::Failure,
        // `ErrorKind` is non-exhaustive: a kind added to the library is a generic failure
        // until it is given its own code (the agreement test below checks the known ones).
        _ => ExitKind::Failure,
    }
}

/// The library's errors, by kind. Its own setting and argument errors are usage errors
/// here: they come from flags.
impl From<embar_client::Error> for CliError {
    fn from(e: embar_client::Error) -> CliError {
        let kind = match &e {
            embar_client::Error::InvalidInput { .. } | embar_client::Error::Unsupported(_) => {
                ExitKind::Usage
            }
            e => client_exit_kind(e.kind()),
        };
        CliError::new(kind, e)
    }
}

/// As the client library classifies a failed call of the control process's API.
impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        CliError::new(client_exit_kind(ErrorKind::of_control(&e)), e)
    }
}

impl From<PoolError> for CliError {
    fn from(e: PoolError) -> CliError {
        CliError::new(class_exit_kind(e.class()), e)
    }
}

impl From<PublishError> for CliError {
    fn from(e: PublishError) -> CliError {
        CliError::new(class_exit_kind(e.class()), e)
    }
}

impl From<BenchError> for CliError {
    fn from(e: BenchError) -> CliError {
        match e {
            BenchError::Usage(m) => CliError::usage(m),
            BenchError::Pool(p) => p.into(),
            BenchError::Control(c) => c.into(),
            BenchError::Client(c) => c.into(),
            BenchError::Publish(p) => p.into(),
            e => CliError::new(ExitKind::Failure, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use embar_client::ControlSource;
    use embar_dataplane::messages::BadBatch;
    use embar_sys::SysError;

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

    /// One error of every variant of the pool's error type, the system errors it wraps
    /// included (an open error both as a missing file and otherwise).
    fn every_pool_error() -> Vec<PoolError> {
        let path = || PathBuf::from("/dev/shm/embar-pool");
        let os = |k: io::ErrorKind| io::Error::from(k);
        let sys = [
            SysError::Open {
                path: path(),
                source: os(io::ErrorKind::NotFound),
            },
            SysError::Open {
                path: path(),
                source: os(io::ErrorKind::PermissionDenied),
            },
            SysError::Create {
                path: path(),
                source: os(io::ErrorKind::PermissionDenied),
            },
            SysError::AlreadyExists { path: path() },
            SysError::Resize {
                path: path(),
                bytes: 1,
                source: os(io::ErrorKind::StorageFull),
            },
            SysError::Map {
                path: path(),
                bytes: 1,
                source: os(io::ErrorKind::OutOfMemory),
            },
            SysError::Protect {
                path: path(),
                source: os(io::ErrorKind::PermissionDenied),
            },
            SysError::Backing {
                path: path(),
                reason: "is empty".into(),
            },
            SysError::NoNumaNode { node: 9 },
            SysError::Mbind {
                node: 0,
                source: os(io::ErrorKind::InvalidInput),
            },
            SysError::CpuOutOfRange {
                cpu: 9999,
                limit: 1024,
            },
            SysError::Affinity {
                cpu: 0,
                source: os(io::ErrorKind::InvalidInput),
            },
        ];
        let mut all: Vec<PoolError> = sys.into_iter().map(PoolError::Sys).collect();
        all.extend([
            PoolError::NotAPool {
                path: path(),
                found: 0,
                expected: 1,
            },
            PoolError::VersionMismatch {
                path: path(),
                found: 1,
                expected: 2,
            },
            PoolError::SizeMismatch {
                path: path(),
                recorded: 2,
                actual: 1,
            },
            PoolError::UnexpectedSize {
                path: path(),
                expected: 2,
                actual: 1,
            },
            PoolError::CorruptLayout {
                path: path(),
                reason: "r".into(),
            },
            PoolError::Config("c".into()),
            PoolError::TopicName("t/".into(), "no slash"),
            PoolError::TopicExists("t".into()),
            PoolError::UnknownTopic("t".into()),
            PoolError::TopicTableFull(8),
            PoolError::TopicConfig("c".into()),
            PoolError::NoFreeSegment {
                segment_bytes: 1,
                segment_count: 1,
                scope: String::new(),
            },
            PoolError::NotSegmentOwner {
                segment: 1,
                claimed: "broker 0".into(),
                owner: 2,
            },
            PoolError::BadRange("r".into()),
            PoolError::FellBehind {
                position: 1,
                oldest: 5,
            },
            PoolError::BackingShrunk {
                path: path(),
                file_bytes: 1,
                pool_bytes: 2,
            },
            PoolError::UnreadableBatch {
                first: 0,
                end: 1,
                client_id: 1,
                batch_seq: 0,
                reason: BadBatch::Count { num_msg: 0 },
            },
            PoolError::OutOfRange {
                what: "w",
                value: 2,
                limit: 1,
            },
            PoolError::DiskLog {
                position: 3,
                source: embar_dataplane::replication::log::LogError::Corrupt {
                    path: path(),
                    offset: 64,
                    why: "CRC32C mismatch".into(),
                },
            },
        ]);
        all
    }

    /// Which variant a pool error is. Exhaustive: a new variant does not compile until it
    /// is numbered here, and the test below fails until `every_pool_error` makes one.
    fn pool_variant(e: &PoolError) -> usize {
        match e {
            PoolError::Sys(_) => 0,
            PoolError::NotAPool { .. } => 1,
            PoolError::VersionMismatch { .. } => 2,
            PoolError::SizeMismatch { .. } => 3,
            PoolError::UnexpectedSize { .. } => 4,
            PoolError::CorruptLayout { .. } => 5,
            PoolError::Config(_) => 6,
            PoolError::TopicName(..) => 7,
            PoolError::TopicExists(_) => 8,
            PoolError::UnknownTopic(_) => 9,
            PoolError::TopicTableFull(_) => 10,
            PoolError::TopicConfig(_) => 11,
            PoolError::NoFreeSegment { .. } => 12,
            PoolError::NotSegmentOwner { .. } => 13,
            PoolError::BadRange(_) => 14,
            PoolError::FellBehind { .. } => 15,
            PoolError::BackingShrunk { .. } => 16,
            PoolError::UnreadableBatch { .. } => 17,
            PoolError::OutOfRange { .. } => 18,
            PoolError::DiskLog { .. } => 19,
        }
    }
    const POOL_VARIANTS: usize = 20;

    /// One error of every variant of the publisher's error type, each pool error wrapped.
    fn every_publish_error() -> Vec<PublishError> {
        let mut all: Vec<PublishError> = every_pool_error()
            .into_iter()
            .map(PublishError::Pool)
            .collect();
        all.extend([
            PublishError::Refused {
                broker: 0,
                reason: "r".into(),
            },
            PublishError::Transport("t".into()),
            PublishError::Timeout {
                what: "acks".into(),
                waited: Duration::from_secs(1),
            },
            PublishError::TooLarge { size: 9, max: 8 },
            PublishError::Rejected {
                broker: 0,
                count: 1,
                reason: "r",
                batch_seq: 0,
            },
            PublishError::NoBrokers,
        ]);
        all
    }

    /// A failed call of the control API of every variant, and every status it classifies.
    fn every_control_error() -> Vec<ClientError> {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut all = vec![
            ClientError::Unreachable {
                addr,
                source: io::ErrorKind::ConnectionRefused.into(),
            },
            ClientError::Io {
                addr,
                source: io::ErrorKind::WouldBlock.into(),
            },
            ClientError::Io {
                addr,
                source: io::ErrorKind::TimedOut.into(),
            },
            ClientError::Io {
                addr,
                source: io::ErrorKind::ConnectionReset.into(),
            },
            ClientError::Malformed {
                addr,
                detail: "d".into(),
            },
        ];
        all.extend(
            [400, 404, 409, 410, 413, 422, 500, 503, 507].map(|status| ClientError::Api {
                status,
                message: "m".into(),
            }),
        );
        all
    }

    #[test]
    fn the_client_library_and_the_command_line_classify_every_error_alike() {
        let mut seen = [false; POOL_VARIANTS];
        for e in every_pool_error() {
            seen[pool_variant(&e)] = true;
        }
        assert!(seen.iter().all(|s| *s), "a pool error variant is not made");

        let pool = every_pool_error().into_iter().zip(every_pool_error());
        for (direct, through_client) in pool {
            let text = direct.to_string();
            let cli = CliError::from(direct);
            let client = embar_client::Error::from(through_client);
            assert_eq!(
                cli.kind,
                client_exit_kind(client.kind()),
                "{text}: the command line and the client ({:?}) disagree",
                client.kind()
            );
            assert_eq!(cli, CliError::from(client), "{text}");
        }
        let publish = every_publish_error().into_iter().zip(every_publish_error());
        for (direct, through_client) in publish {
            let text = direct.to_string();
            let cli = CliError::from(direct);
            let client = embar_client::Error::from(through_client);
            assert_eq!(cli, CliError::from(client), "{text}");
        }
        let control = every_control_error().into_iter().zip(every_control_error());
        for (direct, through_client) in control {
            let text = direct.to_string();
            let cli = CliError::from(direct);
            let client = embar_client::Error::Control {
                source: through_client,
                from: ControlSource::Given,
            };
            assert_eq!(cli, CliError::from(client), "{text}");
        }
    }

    #[test]
    fn a_pool_that_lost_its_bytes_is_its_own_kind_in_the_library_and_the_command_line() {
        let shrunk = || PoolError::BackingShrunk {
            path: PathBuf::from("/dev/shm/p"),
            file_bytes: 1,
            pool_bytes: 2,
        };
        assert_eq!(shrunk().class(), ErrorClass::PoolLost);
        assert_eq!(CliError::from(shrunk()).kind, ExitKind::PoolLost);
        let e = embar_client::Error::from(PublishError::Pool(shrunk()));
        assert_eq!(e.kind(), ErrorKind::PoolLost);
        assert_eq!(CliError::from(e).kind, ExitKind::PoolLost);
    }
}
