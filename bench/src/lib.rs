//! The benchmarks of Embarcadero, and the worker processes that they and the process tests
//! start. Load generators and test fixtures live here, out of the product's crates; the
//! `embar` binary parses the flags of `embar bench`, `embar ring-bench` and the hidden
//! `embar ring-worker ...` and calls in here.
//!
//! - [`pipeline`]: the main job (`embar bench`): a local cluster of real processes (or a
//!   running one), publishers and subscribers in this process, every message checked;
//!   throughput, publish-to-ack and publish-to-deliver latency beside the same run's memcpy
//!   bandwidth, repeated `--runs` times; [`report`] prints each figure's min, median and max
//!   and writes the JSON, the SVG plots ([`plot`]) and the HDR interval log ([`hdr_log`]).
//! - [`ring`]: `embar ring-bench`, the pool data path alone, between a lander and a drainer
//!   process ([`ringload`]).
//! - [`workers`]: the worker processes: the lander and drainer, a segment churner, a
//!   sequencer feed and its order check ([`order_load`]), a broker that only heartbeats.
//! - [`rogue`]: a publisher that breaks one rule of the session protocol (a test fixture).
//! - [`cluster`]: the cluster a bench run drives, started with `embar cluster up` or given.
//! - [`baseline`]: memcpy bandwidth and host stalls, measured in the same run.

#![deny(unsafe_op_in_unsafe_fn)]

use std::time::Duration;

pub mod baseline;
pub mod cluster;
pub mod hdr_log;
pub mod order_load;
pub mod pipeline;
pub mod plot;
pub mod report;
pub mod ring;
pub mod ringload;
pub mod rogue;
pub mod workers;

/// Why a benchmark or a worker could not run (a check that fails is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Arguments that cannot make a run.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Pool(#[from] embar_dataplane::PoolError),
    #[error(transparent)]
    Ring(#[from] embar_dataplane::ring::RingError),
    #[error(transparent)]
    Control(#[from] embar_control::http::ClientError),
    /// Finding the cluster (through the client library's discovery).
    #[error(transparent)]
    Client(#[from] embar_client::Error),
    #[error(transparent)]
    Publish(#[from] embar_dataplane::client::publisher::PublishError),
    #[error(transparent)]
    BatchFull(#[from] embar_dataplane::batch::BatchFull),
    /// Starting, finding or stopping the cluster.
    #[error("{0}")]
    Cluster(String),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {line}")]
    Worker {
        what: String,
        status: std::process::ExitStatus,
        line: String,
    },
    #[error("{what} printed no report ({source}): {line:?}")]
    Report {
        what: String,
        line: String,
        source: serde_json::Error,
    },
    #[error("no progress for {limit:?} while waiting for {what}")]
    Stalled { what: &'static str, limit: Duration },
    /// A run that could not go on (its threads' own errors are in its report).
    #[error("{0}")]
    Run(String),
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("cannot write a report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw {path}: {reason}")]
    Plot {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot write the HDR log {path}: {reason}")]
    HdrLog {
        path: std::path::PathBuf,
        reason: String,
    },
}

pub type BenchResult<T> = Result<T, BenchError>;

/// `n` bytes of xorshift64 from `seed` (made odd): payloads and records that are not all one
/// value, the same for the same seed.
pub(crate) fn noise_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
