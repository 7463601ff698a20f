//! The atomics every pool word is made of. Under `--cfg loom` they are loom's, so that the
//! ring protocol is model-checked with the very code that runs on the pool.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64};
pub use std::sync::atomic::Ordering;
#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicU32, AtomicU64};
