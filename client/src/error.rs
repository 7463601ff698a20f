//! The client's one error type, and the coarse kind of each failure that a program (or the
//! C ABI, or the command line's exit status) acts on.

use std::net::SocketAddr;
use std::path::PathBuf;

use embar_control::http::ClientError;
use embar_dataplane::client::PublishError;
use embar_dataplane::tcp::subscriber::SubscribeError;
use embar_dataplane::{ErrorClass, PoolError};

use crate::discovery::ControlSource;

/// Everything the client can fail with; each variant carries what a user needs to act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The control process could not be reached, or refused a request.
    #[error("{source}{}", .from.note())]
    Control {
        source: ClientError,
        /// Where its address came from (a stale `cluster.json` is a common cause).
        from: ControlSource,
    },
    /// No topic of this name (per the control process, or the pool's topic table).
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// The control process knows no live broker to publish to.
    #[error("no live broker (start one with `embar broker` or `embar cluster up`)")]
    NoLiveBroker,
    /// No live broker accepts verbs publishers.
    #[error("no live broker accepts verbs publishers (start brokers with --verbs, or `embar cluster up --verbs IP`)")]
    NoVerbsBroker,
    /// The control process answered without something discovery needs.
    #[error("the control process at {addr} answered without {what}")]
    Discovery {
        addr: SocketAddr,
        what: &'static str,
    },
    /// `$EMBAR_CLUSTER_DIR` names a directory that describes no cluster.
    #[error("${var} names {dir}, which describes no cluster: {reason} (start one with `embar cluster up`)")]
    NoCluster {
        var: &'static str,
        dir: PathBuf,
        reason: String,
    },
    /// A setting, an environment variable or an argument that cannot be used.
    #[error("{what}: {reason}")]
    InvalidInput { what: String, reason: String },
    /// What this build or this host cannot do (the verbs transport without the `verbs`
    /// feature; a subscriber away from the pool host).
    #[error("{0}")]
    Unsupported(&'static str),
    /// A thread panicked while it held this publisher (asynchronous publishers share one).
    #[error("a thread panicked while it held this publisher; open a new one")]
    Poisoned,
    #[error(transparent)]
    Publish(PublishError),
    #[error(transparent)]
    Pool(PoolError),
    /// A remote (TCP) subscription failed: refused, ended by the broker, or no broker
    /// answered.
    #[error(transparent)]
    Subscribe(SubscribeError),
    /// No live broker accepts TCP clients.
    #[error("no live broker accepts TCP clients (brokers started with --tcp none?)")]
    NoTcpBroker,
}

/// The result of every fallible call of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is: what a caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A bad argument, setting or message (too large for a batch, say).
    InvalidInput,
    /// What was named does not exist: a topic, the pool file, a cluster description.
    NotFound,
    /// A process that is needed cannot be reached or has nothing free: the control
    /// process, a live broker, a session or subscriber slot, log space.
    Unavailable,
    /// Waiting ran out (acknowledgements, log space, a broker's answer): retrying later may
    /// succeed.
    TimedOut,
    /// A broker rejected a batch of this publisher, or a delivered batch cannot be read.
    Rejected,
    /// The subscriber fell behind the retention limit (subscribe again from the oldest
    /// retained position).
    FellBehind,
    /// The pool's file lost its bytes under this process (truncated or replaced): the
    /// cluster has to be stopped and started again, and everything opened on it anew.
    PoolLost,
    /// The pool cannot be used as it is: a file that is no pool, another layout version,
    /// sizes that disagree, a damaged layout.
    BadPool,
    /// Anything else.
    Other,
}

impl Error {
    /// The kind of this failure. The command line's exit codes and the C ABI's status codes
    /// are chosen by it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Control { source, .. } => ErrorKind::of_control(source),
            Error::UnknownTopic(_) | Error::NoCluster { .. } => ErrorKind::NotFound,
            Error::NoLiveBroker | Error::NoVerbsBroker | Error::NoTcpBroker => {
                ErrorKind::Unavailable
            }
            Error::Subscribe(e) => subscribe_kind(e),
            Error::Discovery { .. } | Error::Poisoned => ErrorKind::Other,
            Error::InvalidInput { .. } | Error::Unsupported(_) => ErrorKind::InvalidInput,
            Error::Publish(e) => class_kind(e.class()),
            Error::Pool(e) => class_kind(e.class()),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl ToString) -> Error {
        Error::InvalidInput {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<PublishError> for Error {
    /// An unknown topic is [`Error::UnknownTopic`] whichever layer found it.
    fn from(e: PublishError) -> Error {
        match e {
            PublishError::Pool(p) => p.into(),
            e => Error::Publish(e),
        }
    }
}

impl From<SubscribeError> for Error {
    fn from(e: SubscribeError) -> Error {
        Error::Subscribe(e)
    }
}

fn subscribe_kind(e: &SubscribeError) -> ErrorKind {
    match e {
        SubscribeError::NoBrokers
        | SubscribeError::Unreachable { .. }
        | SubscribeError::Local(_) => ErrorKind::Unavailable,
        // The broker's own error, classified where it happened.
        SubscribeError::Refused {
            class: Some(class), ..
        }
        | SubscribeError::Ended {
            class: Some(class), ..
        } => class_kind(*class),
        SubscribeError::Refused { class: None, .. } => ErrorKind::InvalidInput,
        SubscribeError::Ended { class: None, .. } | SubscribeError::BadFrame { .. } => {
            ErrorKind::Other
        }
    }
}

impl From<PoolError> for Error {
    fn from(e: PoolError) -> Error {
        match e {
            PoolError::UnknownTopic(t) => Error::UnknownTopic(t),
            e => Error::Pool(e),
        }
    }
}

impl ErrorKind {
    /// The kind of a failed call of the control process's API: how [`Error::Control`] is
    /// classified, for programs (the command line) that call the API directly.
    pub fn of_control(e: &ClientError) -> ErrorKind {
        match e {
            ClientError::Unreachable { .. } => ErrorKind::Unavailable,
            ClientError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    ErrorKind::TimedOut
                }
                _ => ErrorKind::Unavailable,
            },
            ClientError::Malformed { .. } => ErrorKind::Other,
            ClientError::Api { status, .. } => match status {
                404 | 410 => ErrorKind::NotFound,
                400 | 413 | 422 => ErrorKind::InvalidInput,
                // 507: the pool's topic table is full (nothing free, as a full pool is).
                503 | 507 => ErrorKind::Unavailable,
                _ => ErrorKind::Other,
            },
        }
    }
}

/// The client's kind of each class of data-plane error (the one classification, which the
/// command line's exit codes follow too).
fn class_kind(class: ErrorClass) -> ErrorKind {
    match class {
        ErrorClass::InvalidInput => ErrorKind::InvalidInput,
        ErrorClass::NotFound => ErrorKind::NotFound,
        ErrorClass::Unavailable => ErrorKind::Unavailable,
        ErrorClass::TimedOut => ErrorKind::TimedOut,
        ErrorClass::Rejected | ErrorClass::Unreadable => ErrorKind::Rejected,
        ErrorClass::BadPool => ErrorKind::BadPool,
        ErrorClass::PoolLost => ErrorKind::PoolLost,
        ErrorClass::FellBehind => ErrorKind::FellBehind,
        ErrorClass::Conflict | ErrorClass::System => ErrorKind::Other,
    }
}

/// Where a file the client reads lives, for errors that name it.
pub(crate) fn cluster_file_error(path: PathBuf, reason: impl ToString) -> Error {
    Error::InvalidInput {
        what: format!("the cluster description {}", path.display()),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn errors_are_classified_by_variant_whichever_layer_raised_them() {
        let unknown = Error::from(PublishError::Pool(PoolError::UnknownTopic("t".into())));
        assert!(matches!(unknown, Error::UnknownTopic(_)), "{unknown:?}");
        assert_eq!(unknown.kind(), ErrorKind::NotFound);
        assert_eq!(unknown.to_string(), "unknown topic \"t\"");
        let timeout = Error::from(PublishError::Timeout {
            what: "acks".into(),
            waited: Duration::from_secs(1),
        });
        assert_eq!(timeout.kind(), ErrorKind::TimedOut);
        let big = Error::from(PublishError::TooLarge { size: 9, max: 8 });
        assert_eq!(big.kind(), ErrorKind::InvalidInput);
        let behind = Error::from(PoolError::FellBehind {
            position: 1,
            oldest: 5,
        });
        assert_eq!(behind.kind(), ErrorKind::FellBehind);
        let refused = Error::Control {
            source: ClientError::Unreachable {
                addr: "127.0.0.1:1".parse().unwrap(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            },
            from: ControlSource::Env,
        };
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        let text = refused.to_string();
        assert!(
            text.starts_with("cannot reach the control process"),
            "{text}"
        );
        assert!(text.ends_with("(address from $EMBAR_CONTROL)"), "{text}");
    }

    #[test]
    fn a_pool_that_lost_its_bytes_is_its_own_kind_and_a_damaged_one_another() {
        let path = || PathBuf::from("/dev/shm/embar-pool");
        let lost = Error::from(PublishError::Pool(PoolError::BackingShrunk {
            path: path(),
            file_bytes: 4096,
            pool_bytes: 1 << 26,
        }));
        assert_eq!(lost.kind(), ErrorKind::PoolLost);
        assert!(lost.to_string().contains("truncated or replaced"), "{lost}");
        let damaged = Error::from(PoolError::CorruptLayout {
            path: path(),
            reason: "r".into(),
        });
        assert_eq!(damaged.kind(), ErrorKind::BadPool);
        let full = Error::Control {
            source: ClientError::Api {
                status: 507,
                message: "topic table is full".into(),
            },
            from: ControlSource::Given,
        };
        assert_eq!(full.kind(), ErrorKind::Unavailable);
        assert_eq!(
            Error::from(PoolError::TopicTableFull(8)).kind(),
            ErrorKind::Unavailable
        );
    }
}
