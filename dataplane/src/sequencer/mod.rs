//! The sequencer: turns every broker's ring of landed batches into one order per topic.
//!
//! - [`core`]: the sans-IO state machine (ORDER 0, 1, 2, 4, 5; the per-client table, the
//!   bounded hold buffer, fencing), driven by events and the current time, returning actions.
//! - [`state`]: what survives a restart, in the pool: epoch, global counter, client table.
//! - [`driver`]: the polling loop that reads the rings, feeds the core, and carries out its
//!   actions in the pool.

pub mod core;
pub mod driver;
pub mod state;

pub use self::core::{Action, DropReason, FenceReason, Landed, Limits, OrderLevel, SequencerCore};
