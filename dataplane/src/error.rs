use std::path::PathBuf;

use embar_sys::SysError;

/// Every error of the data plane, with the context a user needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{path} is not an Embarcadero pool (magic {found:#018x}, expected {expected:#018x}); nothing was written")]
    NotAPool {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path} has pool layout version {found}, this build reads version {expected}; nothing was written")]
    VersionMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: the superblock says {recorded} bytes but the backing holds {actual}; nothing was written")]
    SizeMismatch {
        path: PathBuf,
        recorded: u64,
        actual: u64,
    },
    #[error(
        "{path}: pool is {actual} bytes, the configuration expects {expected}; nothing was written"
    )]
    UnexpectedSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: corrupt layout: {reason}; nothing was written")]
    CorruptLayout { path: PathBuf, reason: String },
    #[error("invalid pool configuration: {0}")]
    Config(String),
    #[error("topic name {0:?} is invalid: {1}")]
    TopicName(String, &'static str),
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic table is full ({0} topics); delete a topic or format a pool with more")]
    TopicTableFull(u32),
    #[error("invalid topic configuration: {0}")]
    TopicConfig(String),
    #[error(
        "no free segment of {segment_bytes} bytes left in the pool ({segment_count} in all{scope})"
    )]
    NoFreeSegment {
        segment_bytes: u64,
        segment_count: u64,
        scope: String,
    },
    #[error("segment {segment} is not owned by {claimed} (owner word {owner:#x})")]
    NotSegmentOwner {
        segment: u64,
        claimed: String,
        owner: u64,
    },
    #[error("bad log range: {0}")]
    BadRange(String),
    #[error(
        "subscriber fell behind the retention limit: at total order {position}, the oldest \
         retained is total order {oldest} (subscribe again with --from {oldest})"
    )]
    FellBehind {
        /// Total order of the next message the subscriber would have delivered.
        position: u64,
        /// The oldest total order still retained (a start position that works now).
        oldest: u64,
    },
    /// A subscriber reading what the pool no longer holds from the disk logs found the record
    /// it needs damaged (it is never delivered) or could not read a log.
    #[cfg(not(loom))]
    #[error("cannot deliver total order {position} from the disk logs: {source}")]
    DiskLog {
        /// Total order of the next message the subscriber would have delivered.
        position: u64,
        source: crate::replication::log::LogError,
    },
    /// The pool's file is shorter than the pool: it was truncated (or replaced) under the
    /// processes that map it, which stop when they touch the missing part.
    #[error("pool file {path} holds {file_bytes} bytes, less than the pool's {pool_bytes}: it was truncated or replaced under the cluster; its processes stop when they touch the missing part (stop the cluster and start it again)")]
    BackingShrunk {
        path: PathBuf,
        file_bytes: u64,
        pool_bytes: u64,
    },
    // The checked message view is not built in the loom model of the ring.
    #[cfg(not(loom))]
    /// A delivered batch whose messages cannot be read: only its own publisher can have
    /// made it so (it changed the batch after its broker checked it). Positions are total
    /// orders, as `--from` takes them.
    #[error("the batch at total orders {first}..{end} (client {client_id}, batch {batch_seq}) cannot be read: {reason}; to skip it, start again from total order {end}")]
    UnreadableBatch {
        first: u64,
        end: u64,
        client_id: u64,
        batch_seq: u64,
        reason: crate::messages::BadBatch,
    },
    #[error("{what} {value} is out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        value: u64,
        limit: u64,
    },
}

pub type PoolResult<T> = Result<T, PoolError>;

/// What kind of failure an error of the data plane is: what its caller can do about it.
///
/// The one classification of these errors. The client library's error kinds (and through
/// them the C ABI's statuses) and the command line's exit codes are each chosen from it, by
/// an exhaustive match, so they cannot drift apart; a new error variant has to be given a
/// class here, where there is no catch-all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// A value the caller chose is refused: a configuration, a topic name or setting, a
    /// number out of range, a message too large, a NUMA node or CPU this host lacks, a
    /// place a pool cannot live.
    InvalidInput,
    /// What was named does not exist: a topic, the pool's file.
    NotFound,
    /// What is needed cannot be reached or has nothing free: log space, a topic slot, a
    /// broker (none live, one that refused a session, a transport that failed).
    Unavailable,
    /// Waiting ran out (a broker's answer, log space, acknowledgements): retrying later may
    /// succeed.
    TimedOut,
    /// A broker rejected a batch of this publisher.
    Rejected,
    /// A delivered batch cannot be read (its publisher changed it after its broker checked
    /// it).
    Unreadable,
    /// Someone else holds it: the topic exists, the segment is another's, the file is there.
    Conflict,
    /// The pool cannot be used as it is: a file that is no pool, another layout version,
    /// sizes that disagree, a damaged layout, a range outside its bounds.
    BadPool,
    /// The pool's file lost its bytes under the process (truncated or replaced).
    PoolLost,
    /// A subscriber fell behind the retention limit.
    FellBehind,
    /// The operating system refused a call (open, create, size, map, protect, bind, pin)
    /// for a reason not above.
    System,
}

impl ErrorClass {
    pub(crate) const ALL: [ErrorClass; 11] = [
        ErrorClass::InvalidInput,
        ErrorClass::NotFound,
        ErrorClass::Unavailable,
        ErrorClass::TimedOut,
        ErrorClass::Rejected,
        ErrorClass::Unreadable,
        ErrorClass::Conflict,
        ErrorClass::BadPool,
        ErrorClass::PoolLost,
        ErrorClass::FellBehind,
        ErrorClass::System,
    ];

    /// A number for the wire (a remote subscriber learns why its broker refused it or
    /// ended its stream); [`from_code`](Self::from_code) reads it back.
    pub fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|c| *c == self)
            .expect("every class is in ALL") as u8
            + 1
    }

    pub fn from_code(code: u64) -> Option<ErrorClass> {
        let i = usize::try_from(code).ok()?.checked_sub(1)?;
        Self::ALL.get(i).copied()
    }
}

impl PoolError {
    /// This error's [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        match self {
            PoolError::Sys(e) => sys_class(e),
            PoolError::Config(_)
            | PoolError::TopicName(..)
            | PoolError::TopicConfig(_)
            | PoolError::OutOfRange { .. } => ErrorClass::InvalidInput,
            PoolError::UnknownTopic(_) => ErrorClass::NotFound,
            PoolError::NoFreeSegment { .. } | PoolError::TopicTableFull(_) => {
                ErrorClass::Unavailable
            }
            PoolError::TopicExists(_) | PoolError::NotSegmentOwner { .. } => ErrorClass::Conflict,
            PoolError::NotAPool { .. }
            | PoolError::VersionMismatch { .. }
            | PoolError::SizeMismatch { .. }
            | PoolError::UnexpectedSize { .. }
            | PoolError::CorruptLayout { .. }
            | PoolError::BadRange(_) => ErrorClass::BadPool,
            PoolError::BackingShrunk { .. } => ErrorClass::PoolLost,
            PoolError::FellBehind { .. } => ErrorClass::FellBehind,
            #[cfg(not(loom))]
            PoolError::UnreadableBatch { .. } => ErrorClass::Unreadable,
            #[cfg(not(loom))]
            PoolError::DiskLog { source, .. } => match source {
                crate::replication::log::LogError::Corrupt { .. } => ErrorClass::Unreadable,
                _ => ErrorClass::System,
            },
        }
    }
}

fn sys_class(e: &SysError) -> ErrorClass {
    match e {
        SysError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ErrorClass::NotFound
        }
        SysError::Open { .. }
        | SysError::Create { .. }
        | SysError::Resize { .. }
        | SysError::Map { .. }
        | SysError::Protect { .. }
        | SysError::Mbind { .. }
        | SysError::Affinity { .. } => ErrorClass::System,
        SysError::AlreadyExists { .. } => ErrorClass::Conflict,
        SysError::Backing { .. } | SysError::NoNumaNode { .. } | SysError::CpuOutOfRange { .. } => {
            ErrorClass::InvalidInput
        }
    }
}
