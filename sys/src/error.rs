use std::io;
use std::path::PathBuf;

/// Every failure of a system call or a platform facility, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path} already exists (remove it or open it instead of creating it)")]
    AlreadyExists { path: PathBuf },
    #[error("cannot size {path} to {bytes} bytes: {source}")]
    Resize {
        path: PathBuf,
        bytes: u64,
        source: io::Error,
    },
    #[error("cannot map {path} ({bytes} bytes): {source}")]
    Map {
        path: PathBuf,
        bytes: usize,
        source: io::Error,
    },
    #[error("cannot change protection of the mapping of {path}: {source}")]
    Protect { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Backing { path: PathBuf, reason: String },
    #[error("NUMA node {node}: no such node on this host (see /sys/devices/system/node)")]
    NoNumaNode { node: u32 },
    #[error("NUMA node {node}: mbind: {source}")]
    Mbind { node: u32, source: io::Error },
    #[error("cannot pin thread to CPU {cpu}: CPU index is above the limit {limit}")]
    CpuOutOfRange { cpu: usize, limit: usize },
    #[error("cannot pin thread to CPU {cpu}: {source}")]
    Affinity { cpu: usize, source: io::Error },
}

pub type SysResult<T> = Result<T, SysError>;
