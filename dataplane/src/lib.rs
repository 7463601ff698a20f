//! The data plane of Embarcadero: the shared pool and everything that lives in it.
//!
//! Follow a batch: a publisher's batch lands in a [segment](pool::segments) of the
//! [pool](pool::Pool); the broker checks its [descriptor](batch) and publishes it into its
//! [batch ring](ring) once its [messages](messages) are checked; the sequencer takes it from the ring and gives it a place in the total
//! order. Pool layout and the single-writer table: `docs/pool-layout.md`.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod batch;
#[cfg(not(loom))]
pub mod broker;
pub mod checker;
#[cfg(not(loom))]
pub mod client;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod error;
#[cfg(not(loom))]
#[doc(hidden)]
pub mod fuzzing;
pub mod idle;
pub mod log_limit;
#[cfg(not(loom))]
pub mod messages;
pub mod pool;
#[cfg(not(loom))]
pub mod remote_subscriber;
#[cfg(not(loom))]
pub mod replication;
pub mod ring;
// The sequencer parks on a futex over a real pool word; loom models only the ring.
#[cfg(not(loom))]
pub mod sequencer;
#[cfg(not(loom))]
pub mod session;
pub mod sync;
#[cfg(not(loom))]
pub mod tcp;
pub mod units;
// The protocol and its credit accounting build everywhere (and are tested in every build);
// the two ends need the `verbs` feature.
#[cfg(not(loom))]
pub mod verbs;

pub use error::{ErrorClass, PoolError, PoolResult};
