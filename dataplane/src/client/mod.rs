//! Client libraries on the pool host: [`publisher`] writes batches straight into granted log
//! space, [`subscriber`] reads a topic in total order straight
//! from the pool. The verbs publisher (`crate::verbs::publisher`, feature `verbs`) is the
//! remote one; both publishers implement [`Publish`].

pub(crate) mod filling;
pub mod publisher;
pub mod subscriber;

use std::time::{Duration, Instant};

pub use publisher::PublishError;

use crate::replication::{describe_faults, DiskFault};

/// A new client id for a publisher: 63 random bits (from the standard library's per-process,
/// per-call hasher keys), so two publishers never share one. Every publisher, of every
/// transport, takes its id from here.
pub fn new_client_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        >> 1
}

/// What every publisher offers, whatever its transport.
pub trait Publish {
    fn client_id(&self) -> u64;
    /// Appends one message to the current batch (non-blocking unless out of credits).
    fn publish(&mut self, payload: &[u8]) -> Result<(), PublishError>;
    /// Whether a message of `payload_len` bytes can be published (fits a batch of the
    /// topic), without publishing anything: for checking a whole input first.
    fn check_size(&self, payload_len: usize) -> Result<(), PublishError>;
    /// Seals the open batch if it has lingered (call when idle).
    fn poll(&mut self) -> Result<(), PublishError>;
    /// Seals the open batch now.
    fn flush(&mut self) -> Result<(), PublishError>;
    /// Messages acknowledged so far over every broker; an error if a broker rejected any.
    fn acked(&mut self) -> Result<u64, PublishError>;
    /// Messages sealed into submitted batches.
    fn sealed_messages(&self) -> u64;
    /// How many of this publisher's messages, counted in publish order from its first, are
    /// all acknowledged per the topic's ACK level (ACK 0: all sealed ones). Less than or
    /// equal to [`Publish::acked`], which adds up the brokers' counts: a batch acknowledged
    /// by one broker does not count here while an earlier one waits on another. An error if
    /// a broker rejected any batch.
    fn acked_prefix(&mut self) -> Result<u64, PublishError>;
    /// Publish-to-ack latency (ns) of every batch acked since the last call.
    fn take_ack_latencies(&mut self, out: &mut Vec<u64>);
    /// How often `take_ack_latencies` must be called for its figures to hold: `None` when
    /// acks carry the broker's time stamp (same clock), else the publisher times an ack when
    /// it sees it.
    fn ack_poll_interval(&self) -> Option<Duration> {
        None
    }
    /// Times the publisher waited for log space (credits).
    fn grant_waits(&self) -> u64;
    /// The brokers whose disk log of the topic is failing, as this publisher last heard
    /// (from the pool on its host; from the acks of a remote publisher): why ACK 2 acks may
    /// not come. Added to an ack timeout's error.
    fn disk_faults(&self) -> Vec<DiskFault> {
        Vec::new()
    }
    /// The topic's ACK level.
    fn ack_level(&self) -> u8;
    /// When the open batch's linger runs out (`CLOCK_MONOTONIC` ns), if a batch is open:
    /// the latest time to call [`Publish::poll`] for the linger time to hold. Progress is
    /// driven by the caller, as in UCX or libfabric: no thread of the library's own touches
    /// the batch, so `publish` needs no lock.
    fn linger_deadline_ns(&self) -> Option<u64>;

    /// Whether the open batch has lingered past its deadline (then `poll` seals it).
    fn lingered(&self) -> bool {
        self.linger_deadline_ns()
            .is_some_and(|d| embar_sys::clock::monotonic_ns() > d)
    }

    /// Flushes, then waits until every message is acknowledged per the topic's ACK level
    /// (ACK 0: returns at once).
    fn wait_acks(&mut self, timeout: Duration) -> Result<u64, PublishError> {
        self.flush()?;
        let target = self.sealed_messages();
        if self.ack_level() == 0 {
            return Ok(target);
        }
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let n = self.acked()?;
            if n >= target {
                return Ok(n);
            }
            if start.elapsed() > timeout {
                return Err(PublishError::Timeout {
                    what: format!(
                        "acks of {target} messages ({n} acked){}",
                        describe_faults(&self.disk_faults())
                    ),
                    waited: start.elapsed(),
                });
            }
            spins += 1;
            if spins < 1024 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}
