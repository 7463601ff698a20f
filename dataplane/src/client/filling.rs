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

// SAFETY: `base..base + limit` is written only through this value (the contract of `new`),
// and that memory (a grant of the mapped pool, or a registered buffer) does not belong to a
// thread: moving the batch to another thread moves its one writer along with it.
unsafe impl Send for Filling {}

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
#[cfg(feature = "verbs")]
#[derive(Debug, Default)]
pub(crate) struct Unacked {
    sealed_messages: u64,
    /// `(cumulative messages at seal, first publish ns)` per batch, oldest first.
    batches: std::collections::VecDeque<(u64, u64)>,
}

#[cfg(feature = "verbs")]
impl Unacked {
    /// A batch of `num_msg` messages, the first published at `first_ns`, was submitted.
    pub fn sealed(&mut self, num_msg: u32, first_ns: u64) {
        self.sealed_messages += u64::from(num_msg);
        self.batches.push_back((self.sealed_messages, first_ns));
    }

    /// Messages sealed on this link so far.
    pub fn sealed_messages(&self) -> u64 {
        self.sealed_messages
    }

    /// The latency to `ack_ns` of every batch `acked` (cumulative messages) covers.
    pub fn take(&mut self, acked: u64, ack_ns: u64, out: &mut Vec<u64>) {
        while self.batches.front().is_some_and(|(cum, _)| *cum <= acked) {
            let (_, first) = self.batches.pop_front().expect("front exists");
            out.push(ack_ns.saturating_sub(first));
        }
    }
}

/// Which of a publisher's messages are acknowledged, counted in publish order from its
/// first: the prefix that is acknowledged without a gap. Each broker acknowledges its own
/// batches in order (a cumulative count per link) while batches are striped over links, so
/// the sum over links can run ahead of this prefix; a caller waiting for message `m` needs
/// the prefix to pass `m`.
#[cfg(feature = "verbs")]
#[derive(Debug, Default)]
pub(crate) struct AckedPrefix {
    /// `(link, link messages at seal, publisher messages at seal)` per batch not yet seen
    /// acknowledged, oldest first.
    batches: std::collections::VecDeque<(usize, u64, u64)>,
    prefix: u64,
}

#[cfg(feature = "verbs")]
impl AckedPrefix {
    /// Batches kept before a seal looks at the acks itself, so that the memory stays
    /// bounded for a caller that never asks.
    pub const KEPT_MAX: usize = 1024;

    /// A batch was sealed on `link`, which has `link_sealed` messages with it; the publisher
    /// has `sealed` in all.
    pub fn sealed(&mut self, link: usize, link_sealed: u64, sealed: u64) {
        self.batches.push_back((link, link_sealed, sealed));
    }

    /// Whether a seal should call [`AckedPrefix::advance`] first.
    pub fn is_full(&self) -> bool {
        self.batches.len() >= Self::KEPT_MAX
    }

    /// The prefix, given each link's cumulative acknowledged messages.
    pub fn advance(&mut self, mut link_acked: impl FnMut(usize) -> u64) -> u64 {
        // One read per link and call: a link's count is read once even if several of its
        // batches are passed.
        let mut seen: Option<(usize, u64)> = None;
        while let Some(&(link, link_sealed, sealed)) = self.batches.front() {
            let acked = match seen {
                Some((l, a)) if l == link => a,
                _ => {
                    let a = link_acked(link);
                    seen = Some((link, a));
                    a
                }
            };
            if acked < link_sealed {
                break;
            }
            self.prefix = sealed;
            self.batches.pop_front();
        }
        self.prefix
    }
}

/// Acknowledged batches by `batch_seq`, for the acknowledged prefix of a publisher that
/// fails over: a batch sent again after its broker died is acknowledged on another link than
/// the one it was sealed for, so a count per link (`AckedPrefix`) cannot place it.
#[derive(Debug, Default)]
pub(crate) struct SeqPrefix {
    /// `(num_msg, acked)` of batches from `first_seq` on.
    batches: std::collections::VecDeque<(u32, bool)>,
    first_seq: u64,
    /// Messages of every batch before `first_seq` (all acknowledged).
    messages: u64,
}

impl SeqPrefix {
    /// The next batch (`batch_seq` one past the last) was sealed with `num_msg` messages.
    pub fn sealed(&mut self, num_msg: u32) {
        self.batches.push_back((num_msg, false));
    }

    /// Batch `batch_seq` was acknowledged (again: a resend's duplicate, no matter).
    pub fn acked(&mut self, batch_seq: u64) {
        if let Some(b) = batch_seq
            .checked_sub(self.first_seq)
            .and_then(|i| self.batches.get_mut(i as usize))
        {
            b.1 = true;
        }
        while let Some(&(n, true)) = self.batches.front() {
            self.messages += u64::from(n);
            self.first_seq += 1;
            self.batches.pop_front();
        }
    }

    /// Messages acknowledged without a gap from the first.
    pub fn messages(&self) -> u64 {
        self.messages
    }
}

/// On a failover, this many of the dead broker's newest unacknowledged batches are sent again
/// first (well below the batches the sequencer holds for one client): those are the ones it
/// may not have had ordered. Under ACK 2 most of the rest are ordered already and only wait
/// for their acks, so they come back as duplicates; sent first, a thousand of them would
/// queue in the live broker's ring behind the batches the sequencer holds for the missing one
/// (the ring is freed in order), fill it, and keep the missing batch out until the sequencer
/// fences the client.
pub(crate) const RESEND_NEWEST_FIRST: usize = 128;

/// `pending` (oldest first) in the order a failover sends it again: the newest
/// [`RESEND_NEWEST_FIRST`] first, then the rest from the oldest.
pub(crate) fn resend_order<T>(pending: &mut [T]) {
    let newest = pending.len().saturating_sub(RESEND_NEWEST_FIRST);
    pending.rotate_left(newest);
}

#[cfg(test)]
mod tests {
    use super::SeqPrefix;

    #[test]
    fn the_seq_prefix_moves_only_over_batches_acknowledged_without_a_gap() {
        let mut p = SeqPrefix::default();
        for n in [3, 4, 5] {
            p.sealed(n);
        }
        p.acked(1);
        assert_eq!(p.messages(), 0, "batch 0 is not acknowledged yet");
        p.acked(0);
        assert_eq!(p.messages(), 7);
        // Unknown and repeated batches change nothing.
        p.acked(7);
        p.acked(1);
        p.acked(2);
        assert_eq!(p.messages(), 12);
    }

    #[test]
    fn a_resend_starts_with_the_newest_batches() {
        let mut v: Vec<usize> = (0..200).collect();
        super::resend_order(&mut v);
        assert_eq!(v[0], 72);
        assert_eq!(v[127], 199);
        assert_eq!(v[128], 0);
        let mut short = vec![1, 2, 3];
        super::resend_order(&mut short);
        assert_eq!(short, [1, 2, 3]);
    }

    #[cfg(feature = "verbs")]
    #[test]
    fn the_acked_prefix_stops_at_the_first_batch_its_link_has_not_acknowledged() {
        let mut p = super::AckedPrefix::default();
        // Batches of 10, 20, 30 and 40 messages striped over links 0, 1, 0, 1.
        p.sealed(0, 10, 10);
        p.sealed(1, 20, 30);
        p.sealed(0, 40, 60);
        p.sealed(1, 60, 100);
        let acks = |a: [u64; 2]| move |l: usize| a[l];
        // Link 1 acknowledged everything, link 0 nothing: nothing is acknowledged in order.
        assert_eq!(p.advance(acks([0, 60])), 0);
        assert_eq!(p.advance(acks([10, 60])), 30);
        // Counts only grow; a later call goes on from where the last stopped.
        assert_eq!(p.advance(acks([40, 60])), 100);
        assert_eq!(p.advance(acks([40, 60])), 100);
        assert!(!p.is_full());
    }
}
