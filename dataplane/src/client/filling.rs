//! A batch being filled in place, whatever holds its bytes (a grant of the pool for the shm
//! publisher, a registered buffer for the verbs one): the same rules seal it and the same
//! format fills it.

use std::collections::VecDeque;
use std::time::Duration;

use super::PublishError;
use crate::batch::{BatchDesc, BatchWriter};
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

    /// Writes large payloads with non-temporal stores (`BatchWriter::streaming`): for a batch
    /// in the pool. [`fence`](Self::fence) before it is submitted.
    pub fn streaming(self) -> Filling {
        Filling {
            writer: self.writer.streaming(),
            ..self
        }
    }

    /// Orders the batch's stores before the descriptor that submits it.
    pub fn fence(&mut self) {
        self.writer.fence();
    }

    /// See [`BatchWriter::plain_ranges`].
    pub fn plain_ranges(&self, f: impl FnMut(u64, u64)) {
        self.writer.plain_ranges(f);
    }

    /// Bytes the batch may hold at most (the batch size, or less at the end of a grant).
    pub fn limit(&self) -> u64 {
        self.writer.limit()
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

    /// The descriptor of this batch, sealed as it is: batch `batch_seq` of `client_id`, at pool
    /// offset `log_idx` of broker slot `broker_id`'s space.
    pub fn descriptor(
        &self,
        client_id: u64,
        batch_seq: u64,
        broker_id: u32,
        log_idx: u64,
    ) -> BatchDesc {
        BatchDesc {
            batch_seq,
            client_id,
            num_msg: self.num_msg(),
            broker_id,
            total_size: self.fill(),
            log_idx,
            start_logical_offset: 0,
            version_flags: u64::from(crate::pool::layout::BATCH_HEADER_VERSION),
        }
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

/// Acknowledged batches by `batch_seq`, for a publisher's acknowledged prefix: the messages
/// acknowledged without a gap from its first. Acks come per link, in the order each link
/// took its batches, while batches are striped over links and, after a failover, sent again
/// on another link than the one they were sealed for: so they are placed by `batch_seq`.
#[derive(Debug, Default)]
pub(crate) struct SeqPrefix {
    /// `(num_msg, acked)` of batches from `first_seq` on.
    batches: VecDeque<(u32, bool)>,
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

/// Ack latencies kept for a caller that never takes them (the rest are not recorded).
const LATENCIES_KEPT_MAX: usize = 1 << 20;

/// A publisher's acknowledgements, counted as its links' batches are retired: messages
/// acknowledged (a batch sent again after a failover counted once), the prefix acknowledged
/// without a gap, and each batch's publish-to-ack latency.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    prefix: SeqPrefix,
    messages: u64,
    latencies: Vec<u64>,
}

impl Acks {
    /// The next batch was sealed with `num_msg` messages.
    pub fn sealed(&mut self, num_msg: u32) {
        self.prefix.sealed(num_msg);
    }

    /// Messages acknowledged.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Messages acknowledged without a gap from the first.
    pub fn prefix(&self) -> u64 {
        self.prefix.messages()
    }

    /// Moves the latencies recorded so far to `out`.
    pub fn take_latencies(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.latencies);
    }

    /// Retires the batches at the front of a link's `inflight` (oldest first) that the link's
    /// cumulative acknowledged-message count `acked` covers: `sent` gives each one's
    /// `(descriptor, link count that covers it, first publish ns)`, and `at_ns` (read only
    /// when something is retired) the time the acknowledgement is counted at.
    pub fn retire<T>(
        &mut self,
        inflight: &mut VecDeque<T>,
        sent: impl Fn(&T) -> (&BatchDesc, u64, u64),
        acked: u64,
        at_ns: impl FnOnce() -> u64,
    ) {
        if inflight.front().is_none_or(|f| sent(f).1 > acked) {
            return;
        }
        let at = at_ns();
        while let Some(f) = inflight.front() {
            let (desc, upto, first_ns) = sent(f);
            if upto > acked {
                break;
            }
            self.messages += u64::from(desc.num_msg);
            self.prefix.acked(desc.batch_seq);
            if self.latencies.len() < LATENCIES_KEPT_MAX {
                self.latencies.push(at.saturating_sub(first_ns));
            }
            inflight.pop_front();
        }
    }
}

/// A check made at most once per period (a publisher looking whether its brokers live).
#[derive(Debug)]
pub(crate) struct Every {
    period_ns: u64,
    last_ns: u64,
}

impl Every {
    pub fn new(period: Duration) -> Every {
        Every {
            period_ns: period.as_nanos() as u64,
            last_ns: embar_sys::clock::monotonic_ns(),
        }
    }

    /// Whether a period has passed since the last time this said so.
    pub fn due(&mut self) -> bool {
        let now = embar_sys::clock::monotonic_ns();
        if now.saturating_sub(self.last_ns) < self.period_ns {
            return false;
        }
        self.last_ns = now;
        true
    }
}

/// The next link whose broker is up in a publisher's round-robin over `links` links,
/// advancing `next` past it; an error when none is.
pub(crate) fn next_live(
    next: &mut usize,
    links: usize,
    live: impl Fn(usize) -> bool,
) -> Result<usize, PublishError> {
    for _ in 0..links {
        let i = *next;
        *next = (*next + 1) % links;
        if live(i) {
            return Ok(i);
        }
    }
    Err(PublishError::Transport(
        "every broker this publisher had a session with is gone".into(),
    ))
}

/// The link an orphan (a batch whose broker died before acknowledging it) goes to:
/// round-robin by `batch_seq` over the links `live` says are up (each live broker gets the
/// orphans in batch order); when none is, the error says what was not acknowledged.
pub(crate) fn resend_target(
    live: impl Iterator<Item = bool>,
    batch_seq: u64,
    orphans: usize,
) -> Result<usize, PublishError> {
    let up: Vec<usize> = live
        .enumerate()
        .filter_map(|(k, l)| l.then_some(k))
        .collect();
    if up.is_empty() {
        return Err(PublishError::Transport(format!(
            "every broker this publisher had a session with is gone; {orphans} batch(es) from batch {batch_seq} on were not acknowledged"
        )));
    }
    Ok(up[batch_seq as usize % up.len()])
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
}
