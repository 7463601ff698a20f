//! The FFI boundary of Embarcadero: everything that talks to the kernel or uses a CPU
//! instruction directly lives here, behind small safe (or clearly `unsafe`) wrappers.
//!
//! - [`mapping`]: create or open the shared pool (a file in `/dev/shm`, on hugetlbfs, or a
//!   DAX device) and map it shared.
//! - [`bus`]: a clear message, not a silent death, when a mapped pool file shrinks.
//! - [`cacheline`]: cache-line write-back and invalidation (`clwb`, `clflushopt`, `clflush`;
//!   `dc cvac`/`dc civac` on aarch64) and the fences around them, with run-time detection.
//! - [`numa`]: bind a mapping to a NUMA node (`mbind`).
//! - [`cpu`]: pin the calling thread to a CPU.
//! - [`file`]: page-cache advice for the disk logs (`posix_fadvise`).
//! - [`futex`]: park on, and wake, a 32-bit word of shared memory across processes.
//! - `dpdk` (feature `dpdk`): DPDK poll-mode ports (EAL, mbuf pools, bursts) over a C shim.
//! - `verbs` (feature `verbs`): RDMA verbs: device, CQ, MR, RC QP, posting and polling.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod bus;
pub mod cacheline;
pub mod clock;
pub mod cpu;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod file;
pub mod futex;
pub mod mapping;
pub mod numa;
pub mod process;
pub mod signal;
#[cfg(feature = "verbs")]
pub mod verbs;

mod error;

pub use error::{SysError, SysResult};
