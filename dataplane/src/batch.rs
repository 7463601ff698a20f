//! A batch descriptor: the plain values of a [`BatchHeader`]'s producer line, and the checks
//! every descriptor written by another process passes before anything uses it.

use crate::pool::geometry::{PoolGeometry, RangeError};
use crate::pool::layout::*;
use crate::sync::Ordering::Relaxed;

/// The producer line of a batch header, as plain values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BatchDesc {
    pub batch_seq: u64,
    pub client_id: u64,
    pub num_msg: u32,
    pub broker_id: u32,
    pub total_size: u64,
    pub log_idx: u64,
    pub start_logical_offset: u64,
    pub version_flags: u64,
}

impl BatchDesc {
    /// Stores every producer field except `ready` (the ring publishes that).
    pub fn store(&self, h: &BatchHeader) {
        h.batch_seq.store(self.batch_seq, Relaxed);
        h.client_id.store(self.client_id, Relaxed);
        h.num_msg.store(self.num_msg, Relaxed);
        h.broker_id.store(self.broker_id, Relaxed);
        h.total_size.store(self.total_size, Relaxed);
        h.log_idx.store(self.log_idx, Relaxed);
        h.start_logical_offset
            .store(self.start_logical_offset, Relaxed);
        h.version_flags.store(self.version_flags, Relaxed);
    }

    /// Copies the producer fields out of a header.
    pub fn load(h: &BatchHeader) -> BatchDesc {
        BatchDesc {
            batch_seq: h.batch_seq.load(Relaxed),
            client_id: h.client_id.load(Relaxed),
            num_msg: h.num_msg.load(Relaxed),
            broker_id: h.broker_id.load(Relaxed),
            total_size: h.total_size.load(Relaxed),
            log_idx: h.log_idx.load(Relaxed),
            start_logical_offset: h.start_logical_offset.load(Relaxed),
            version_flags: h.version_flags.load(Relaxed),
        }
    }

    pub fn version(&self) -> u32 {
        self.version_flags as u32
    }
}

/// What a batch published into one broker's ring may claim.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub geometry: PoolGeometry,
    pub broker_id: u32,
}

impl BatchLimits {
    pub fn new(geometry: PoolGeometry, broker_id: u32) -> BatchLimits {
        BatchLimits {
            geometry,
            broker_id,
        }
    }

    /// Checks every field of `d`; on failure says which one and why.
    pub fn check(&self, d: &BatchDesc) -> Result<(), BatchError> {
        if d.version() != BATCH_HEADER_VERSION {
            return Err(BatchError::Version { found: d.version() });
        }
        if d.broker_id != self.broker_id {
            return Err(BatchError::Broker {
                found: d.broker_id,
                ring: self.broker_id,
            });
        }
        if d.num_msg == 0 || d.num_msg > BATCH_MESSAGES_MAX {
            return Err(BatchError::MessageCount { count: d.num_msg });
        }
        let min = u64::from(d.num_msg) * message_stride(0);
        if d.total_size < min || d.total_size > self.geometry.segment_bytes {
            return Err(BatchError::TotalSize {
                size: d.total_size,
                num_msg: d.num_msg,
                min,
                max: self.geometry.segment_bytes,
            });
        }
        if d.total_size % CACHE_LINE as u64 != 0 || d.log_idx % CACHE_LINE as u64 != 0 {
            return Err(BatchError::Unaligned {
                offset: d.log_idx,
                size: d.total_size,
            });
        }
        self.geometry.check_data_range(d.log_idx, d.total_size)?;
        Ok(())
    }
}

/// Which field of a batch descriptor broke the rules, and how.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("header version {found} (expected {BATCH_HEADER_VERSION})")]
    Version { found: u32 },
    #[error("broker id {found} in the ring of broker {ring}")]
    Broker { found: u32, ring: u32 },
    #[error("message count {count} (must be 1..={BATCH_MESSAGES_MAX})")]
    MessageCount { count: u32 },
    #[error("total size {size} for {num_msg} messages (must be {min}..={max})")]
    TotalSize {
        size: u64,
        num_msg: u32,
        min: u64,
        max: u64,
    },
    #[error("payload offset {offset} or size {size} is not 64-byte aligned")]
    Unaligned { offset: u64, size: u64 },
    #[error(transparent)]
    Range(#[from] RangeError),
}

/// A batch being written in place, from a 64-byte aligned start: each message appended is
/// its 64-byte header, then its payload, padded to the message stride. With
/// `messages::Messages` on the reading side, the one place that lays messages out at offsets
/// from a raw pointer (every writer goes through it: the publishers' batches, the load
/// generators, tests).
#[derive(Debug)]
pub struct BatchWriter {
    base: *mut u8,
    /// Bytes written so far, and at most.
    fill: u64,
    limit: u64,
    num_msg: u32,
    /// Payloads of [`STREAM_MIN_BYTES`] or more are written with non-temporal stores.
    streaming: bool,
    /// The thread that made the last non-temporal stores (its [`thread_tag`]; 0: none yet),
    /// and whether an earlier one was another thread.
    streamed_by: usize,
    streamed_by_several: bool,
}

/// A number that tells the calling thread from every other live thread (the address of a
/// thread-local), for a few nanoseconds.
fn thread_tag() -> usize {
    thread_local!(static TAG: u8 = const { 0 });
    TAG.with(|t| t as *const u8 as usize)
}

/// The smallest payload a [`BatchWriter::streaming`] writer copies with non-temporal stores:
/// below it a plain copy costs less than the fence and the lost cache line (the threshold
/// persistent-memory libraries use for the same choice).
pub const STREAM_MIN_BYTES: usize = 256;

/// A message that does not fit in the rest of its batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a message of {stride} bytes (header and padding included) does not fit in the {room} bytes left of its batch")]
pub struct BatchFull {
    pub stride: u64,
    pub room: u64,
}

impl BatchWriter {
    /// A batch of at most `limit` bytes at `base`.
    ///
    /// # Safety
    ///
    /// `base..base + limit` is writable, 64-byte aligned, and neither read nor written by
    /// anyone else until the batch is submitted (its reader waits for the submission), for as
    /// long as the writer is used.
    pub unsafe fn new(base: *mut u8, limit: u64) -> BatchWriter {
        debug_assert_eq!(base as usize % CACHE_LINE, 0);
        BatchWriter {
            base,
            fill: 0,
            limit,
            num_msg: 0,
            streaming: false,
            streamed_by: 0,
            streamed_by_several: false,
        }
    }

    /// Writes payloads of [`STREAM_MIN_BYTES`] or more with non-temporal stores
    /// (`embar_sys::cacheline::stream_copy`): for a batch in the pool, which the writer does
    /// not read again and other processes read later, so its lines are not first read into
    /// the writer's cache (a copy into the pool read every destination line from memory
    /// before it wrote it). Headers stay plain stores: the broker reads them soon after.
    /// [`fence`](Self::fence) before the batch is published. Only where other threads'
    /// non-temporal stores can be fenced too
    /// (`embar_sys::cacheline::other_threads_fence_available`), since a batch may be sealed by
    /// another thread than the one that filled it; elsewhere the writer stays plain.
    pub fn streaming(mut self) -> BatchWriter {
        self.streaming = embar_sys::cacheline::other_threads_fence_available();
        self
    }

    /// Orders every store of the batch before the stores that follow (the descriptor that
    /// publishes it): the non-temporal stores of a streaming writer are weakly ordered, and
    /// `sfence` orders only the calling thread's. If another thread streamed into this batch
    /// (a publisher moved between threads, or an async ack future sealing a lingered batch on
    /// an executor thread), every thread's are fenced (`fence_other_threads`, a system call:
    /// rare).
    pub fn fence(&mut self) {
        if self.streamed_by == 0 {
            return;
        }
        embar_sys::cacheline::store_fence();
        if self.streamed_by_several || self.streamed_by != thread_tag() {
            // Available: `streaming` turned on only where it is.
            embar_sys::cacheline::fence_other_threads();
        }
        self.streamed_by = 0;
        self.streamed_by_several = false;
    }

    /// Appends one message: `header` with its `size` set to the payload's, then `payload`.
    pub fn append(&mut self, header: &MessageHeader, payload: &[u8]) -> Result<(), BatchFull> {
        let stride = message_stride(payload.len() as u64);
        if self.fill + stride > self.limit {
            return Err(BatchFull {
                stride,
                room: self.limit - self.fill,
            });
        }
        let header = MessageHeader {
            size: payload.len() as u32,
            ..*header
        };
        let dst = self.base.wrapping_add(self.fill as usize);
        if self.streaming && payload.len() >= STREAM_MIN_BYTES {
            let me = thread_tag();
            if self.streamed_by != me {
                self.streamed_by_several |= self.streamed_by != 0;
                self.streamed_by = me;
            }
            // SAFETY: as below; the payload goes at `dst + 64`, inside the stride, and
            // `payload` (the caller's) is not the pool space this batch owns.
            unsafe {
                dst.cast::<MessageHeader>().write(header);
                embar_sys::cacheline::stream_copy(dst.add(64), payload.as_ptr(), payload.len());
            }
        } else {
            // SAFETY: `fill + stride <= limit`, and `base..base + limit` is this batch's,
            // writable and 64-byte aligned (the contract of `new`); strides are multiples of
            // 64, so the message starts aligned.
            unsafe { write_message(dst, &header, payload) };
        }
        self.fill += stride;
        self.num_msg += 1;
        Ok(())
    }

    /// Calls `f(offset, bytes)` for each range of the batch that plain stores wrote, adjacent
    /// ones merged: for a writer on a non-coherent pool, what it must write back from its
    /// cache (non-temporal stores went to memory). Every byte written, for a plain writer;
    /// for a streaming one, the message headers, the tails (under 64 bytes) of streamed
    /// payloads, and whole messages whose payload was not streamed.
    pub fn plain_ranges(&self, mut f: impl FnMut(u64, u64)) {
        if !self.streaming {
            if self.fill > 0 {
                f(0, self.fill);
            }
            return;
        }
        let mut pending: Option<(u64, u64)> = None;
        let mut emit = |start: u64, end: u64| match pending {
            Some((s, e)) if e == start => pending = Some((s, end)),
            _ => {
                if let Some((s, e)) = pending {
                    f(s, e - s);
                }
                pending = Some((start, end));
            }
        };
        let mut at = 0u64;
        for _ in 0..self.num_msg {
            // SAFETY: `at` is the start of a message this writer appended (each appended
            // message advanced `fill` by its stride, and we step by the same strides), so a
            // whole header lies at `base + at`, written by this writer and read by nobody else
            // yet (the contract of `new`).
            let size = unsafe { self.base.add(at as usize).cast::<MessageHeader>().read() }.size;
            let stride = message_stride(u64::from(size));
            if size as usize >= STREAM_MIN_BYTES {
                // The payload starts at `at + 64`, 64-byte aligned: `stream_copy` wrote no
                // head by plain stores, and the tail under 64 bytes is one line.
                emit(at, at + 64);
                let whole = u64::from(size) / 64 * 64;
                if u64::from(size) > whole {
                    emit(at + 64 + whole, at + 128 + whole);
                }
            } else {
                emit(at, at + stride);
            }
            at += stride;
        }
        if let Some((s, e)) = pending {
            f(s, e - s);
        }
    }

    /// The batch's first byte.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Bytes written: the batch's `total_size`.
    pub fn fill(&self) -> u64 {
        self.fill
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn num_msg(&self) -> u32 {
        self.num_msg
    }
}

/// Writes one message (header, then payload, padded to the 64-byte stride) at `dst` and
/// returns the stride.
///
/// # Safety
/// `dst` must be 64-byte aligned and point at `message_stride(payload.len())` writable bytes
/// of log space that no other process reads until the batch is published.
pub unsafe fn write_message(dst: *mut u8, header: &MessageHeader, payload: &[u8]) -> u64 {
    debug_assert_eq!(header.size as usize, payload.len());
    debug_assert_eq!(dst as usize % CACHE_LINE, 0);
    // SAFETY: the caller gives us the stride's bytes, aligned; the header is 64 bytes.
    unsafe {
        dst.cast::<MessageHeader>().write(*header);
        std::ptr::copy_nonoverlapping(payload.as_ptr(), dst.add(64), payload.len());
    }
    message_stride(payload.len() as u64)
}

/// Appends one message to a batch built in a byte buffer (a reader's own copy, never the
/// pool): `header` with its `size` set to the payload's, the payload, and the padding to the
/// message stride, in the layout [`write_message`] gives the pool. For a reader that rebuilds
/// a batch from another form (a disk log record) to read it through `messages::Messages`.
pub fn encode_message(out: &mut Vec<u8>, header: &MessageHeader, payload: &[u8]) {
    use std::mem::offset_of;
    let start = out.len();
    out.resize(start + message_stride(payload.len() as u64) as usize, 0);
    let h = &mut out[start..];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(MessageHeader, size),
        &(payload.len() as u32).to_ne_bytes(),
    );
    put(
        offset_of!(MessageHeader, flags),
        &header.flags.to_ne_bytes(),
    );
    put(
        offset_of!(MessageHeader, client_id),
        &header.client_id.to_ne_bytes(),
    );
    put(
        offset_of!(MessageHeader, batch_seq),
        &header.batch_seq.to_ne_bytes(),
    );
    put(
        offset_of!(MessageHeader, logical_offset),
        &header.logical_offset.to_ne_bytes(),
    );
    put(
        offset_of!(MessageHeader, total_order),
        &header.total_order.to_ne_bytes(),
    );
    put(
        offset_of!(MessageHeader, publish_ts_ns),
        &header.publish_ts_ns.to_ne_bytes(),
    );
    out[start + 64..start + 64 + payload.len()].copy_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Claims, Messages};

    /// One cache line: a vector of them is a 64-byte aligned buffer.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    fn aligned(n: usize) -> Vec<Line> {
        vec![Line([0; 64]); n / 64]
    }

    fn bytes(lines: &[Line]) -> Vec<u8> {
        lines.iter().flat_map(|l| l.0).collect()
    }

    fn fill(w: &mut BatchWriter, payloads: &[Vec<u8>]) {
        for (i, p) in payloads.iter().enumerate() {
            let h = MessageHeader {
                client_id: 7,
                batch_seq: 3,
                publish_ts_ns: i as u64,
                ..MessageHeader::default()
            };
            w.append(&h, p).unwrap();
        }
    }

    /// Payloads on both sides of the streaming threshold, and lengths that end mid-line.
    fn payloads() -> Vec<Vec<u8>> {
        [0usize, 1, 63, 255, 256, 257, 1000, 1024, 4095, 20_000]
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 31 + k) as u8).collect())
            .collect()
    }

    /// A batch writer handed to another thread (the test's own `Send`, as `Filling` has).
    struct Moved(BatchWriter);
    // SAFETY: the buffer the writer points into outlives both threads (scoped), and only one
    // thread uses the writer at a time.
    unsafe impl Send for Moved {}

    #[test]
    fn a_streaming_writer_lays_out_the_same_bytes_as_a_plain_one_even_fenced_on_another_thread() {
        const BYTES: usize = 64 << 10;
        let (mut plain, mut streamed) = (aligned(BYTES), aligned(BYTES));
        // SAFETY: each buffer is BYTES long, 64-byte aligned by its type, and written only
        // through its writer until the writers are done.
        let (pw, sw) = unsafe {
            (
                BatchWriter::new(plain.as_mut_ptr().cast(), BYTES as u64),
                BatchWriter::new(streamed.as_mut_ptr().cast(), BYTES as u64),
            )
        };
        let mut pw = pw;
        fill(&mut pw, &payloads());
        let mut moved = Moved(sw.streaming());
        assert_eq!(
            moved.0.streaming,
            embar_sys::cacheline::other_threads_fence_available(),
            "streams wherever other threads can be fenced"
        );
        // Filled on one thread, fenced and read on this one.
        moved = std::thread::scope(|s| {
            s.spawn(move || {
                fill(&mut moved.0, &payloads());
                moved
            })
            .join()
            .unwrap()
        });
        moved.0.fence();
        assert_eq!(moved.0.fill(), pw.fill());
        // What plain stores wrote: everything but the 64-byte lines of streamed payloads.
        let mut plain_bytes = 0;
        let mut last_end = 0;
        moved.0.plain_ranges(|o, n| {
            assert!(
                o >= last_end,
                "ranges in order, merged: {o} after {last_end}"
            );
            assert!(o % 64 == 0 && n % 64 == 0, "whole lines: {o}+{n}");
            last_end = o + n;
            plain_bytes += n;
        });
        let streamed_lines: u64 = payloads()
            .iter()
            .filter(|p| p.len() >= STREAM_MIN_BYTES)
            .map(|p| p.len() as u64 / 64 * 64)
            .sum();
        if moved.0.streaming {
            assert_eq!(plain_bytes, moved.0.fill() - streamed_lines);
        }
        let mut all = 0;
        pw.plain_ranges(|o, n| {
            assert_eq!(o, 0);
            all += n
        });
        assert_eq!(all, pw.fill(), "a plain writer: one range, the whole batch");
        let n = pw.fill() as usize;
        let (plain, bytes) = (bytes(&plain), bytes(&streamed));
        assert_eq!(plain[..n], bytes[..n], "same bytes");
        let bytes = &bytes[..n];
        let claims = Claims {
            num_msg: pw.num_msg(),
            client_id: 7,
            batch_seq: 3,
        };
        let m = Messages::over(bytes, claims).unwrap();
        let got: Vec<Vec<u8>> = m.iter().map(|r| r.unwrap().payload.to_vec()).collect();
        assert_eq!(got, payloads());
    }
}
