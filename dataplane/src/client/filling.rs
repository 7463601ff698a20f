//! A batch being filled in place, whatever holds its bytes (a grant of the pool for the shm
//! publisher, a registered buffer for the verbs one): the same rules seal it and the same
//! format fills it.

use std::time::Duration;

use super::PublishError;
use crate::batch::BatchWriter;
use crate::pool::layout::{message_stride, MessageHeader, BATCH_MESSAGES_MAX};

/// The bytes a message of `payload_len` takes in a batch, or why it cannot go in one.
pub(crate) fn stride_of(payload_len: usize, batch_bytes: u64) -> Result<u64, PublishError> {
    let stride = message_stride(payload_len as u64);
    if stride > batch_bytes {
        return Err(PublishError::TooLarge {
            size: payload_len,
            max: batch_bytes,
        });
    }
    Ok(stride)
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Filling {
    writer: BatchWriter,
    /// When its first message was published (its linger counts from there).
    pub first_ns: u64,
}

impl Filling {
    /// A batch of at most `limit` bytes at `base`, opened at `now`.
    ///
    /// # Safety
    ///
    /// `base..base + limit` is writable, 64-byte aligned, and written by nobody else until
    /// the batch is sealed (its reader waits for the submission).
    pub unsafe fn new(base: *mut u8, limit: u64, now: u64) -> Filling {
        Filling {
            // SAFETY: the contract of this function is `BatchWriter::new`'s.
            writer: unsafe { BatchWriter::new(base, limit) },
            first_ns: now,
        }
    }

    pub fn base(&self) -> *mut u8 {
        self.writer.base()
    }

    /// Bytes written so far.
    pub fn fill(&self) -> u64 {
        self.writer.fill()
    }

    pub fn num_msg(&self) -> u32 {
        self.writer.num_msg()
    }

    /// When the linger of this batch runs out.
    pub fn deadline_ns(&self, linger: Duration) -> u64 {
        self.first_ns + linger.as_nanos() as u64
    }

    /// Whether a message of `stride` bytes published at `now` must go into a new batch: this
    /// one is full, at the message limit, or has lingered.
    pub fn must_seal(&self, stride: u64, now: u64, linger: Duration) -> bool {
        self.writer.fill() + stride > self.writer.limit()
            || self.writer.num_msg() >= BATCH_MESSAGES_MAX
            || now > self.deadline_ns(linger)
    }

    /// Appends one message (its 64-byte header, then the payload). A caller that checked
    /// `must_seal` first never trips the bound check.
    pub fn append(&mut self, client_id: u64, batch_seq: u64, now: u64, payload: &[u8]) {
        let header = MessageHeader {
            client_id,
            batch_seq,
            publish_ts_ns: now,
            ..MessageHeader::default()
        };
        if let Err(e) = self.writer.append(&header, payload) {
            panic!("{e}: `must_seal` was not asked first");
        }
    }
}

/// Sealed batches of one broker link not yet acknowledged, for publish-to-ack latency: acks
/// come as a cumulative message count, so each batch is known by the count at its seal.
#[derive(Debug, Default)]
pub(crate) struct Unacked {
    sealed_messages: u64,
    /// `(cumulative messages at seal, first publish ns)` per batch, oldest first.
    batches: std::collections::VecDeque<(u64, u64)>,
}

impl Unacked {
    /// A batch of `num_msg` messages, the first published at `first_ns`, was submitted.
    pub fn sealed(&mut self, num_msg: u32, first_ns: u64) {
        self.sealed_messages += u64::from(num_msg);
        self.batches.push_back((self.sealed_messages, first_ns));
    }

    /// The latency to `ack_ns` of every batch `acked` (cumulative messages) covers.
    pub fn take(&mut self, acked: u64, ack_ns: u64, out: &mut Vec<u64>) {
        while self.batches.front().is_some_and(|(cum, _)| *cum <= acked) {
            let (_, first) = self.batches.pop_front().expect("front exists");
            out.push(ack_ns.saturating_sub(first));
        }
    }
}
