//! The bodies of the fuzz targets (`fuzz/`, cargo-fuzz) and of their property-test versions
//! in this crate's tests: one function per target, which takes arbitrary bytes and asserts
//! what must hold for any of them (no panic, no read outside the input, and the target's
//! own invariants). `docs/durability.md` ("Fuzzing") says how to run them.
//!
//! - [`batch_check`]: the checks a broker runs on the bytes a publisher wrote (the batch
//!   descriptor's [`BatchLimits::check`], then the message chain through
//!   [`Messages::check`] in a real pool), against the same chain read from a copy
//!   ([`Messages::over`]) and a window at a time ([`Parts`], as subscribers read).
//! - [`disk_log_recovery`]: a disk log directory holding arbitrary bytes, read by the
//!   subscribers' reader ([`DiskLogs`]) and recovered by [`DiskLog::open`].

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::batch::{BatchDesc, BatchLimits};
use crate::messages::{Claims, Messages, Parts};
use crate::pool::coherence::Coherent;
use crate::pool::geometry::PoolConfig;
use crate::pool::layout::BATCH_HEADER_VERSION;
use crate::pool::{CreateOptions, Pool};
use crate::replication::log::{self, DiskLog, LogConfig, INDEX_ENTRY_BYTES};
use crate::replication::reader::DiskLogs;

/// Reads `N` bytes at `at` of `input` (zeros past its end).
fn take<const N: usize>(input: &[u8], at: usize) -> [u8; N] {
    let mut b = [0u8; N];
    for (i, v) in b.iter_mut().enumerate() {
        *v = input.get(at + i).copied().unwrap_or(0);
    }
    b
}

/// The pool of [`batch_check`], made once per process (its file is removed at once; the
/// mapping stays).
fn batch_pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let path = PathBuf::from(format!("/dev/shm/embar-fuzz-batch-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let cfg = PoolConfig {
            pool_bytes: 4 << 20,
            max_topics: 1,
            max_brokers: 1,
            ring_slots: 2,
            segment_bytes: 256 << 10,
        };
        let pool = Pool::create(&path, &cfg, &CreateOptions::default()).expect("a fuzz pool");
        let _ = std::fs::remove_file(&path);
        pool
    })
}

/// Bytes of [`batch_check`]'s input that make the descriptor; the rest is the batch.
pub const BATCH_DESC_BYTES: usize = 24;

/// A descriptor from the first [`BATCH_DESC_BYTES`] of `input` and the batch's bytes from
/// the rest, checked as a broker checks a submitted batch; see the module docs. Panics if a
/// check lets through what it must not, or two views of the same bytes disagree.
pub fn batch_check(input: &[u8]) {
    let pool = batch_pool();
    let geo = *pool.geometry();
    let num_msg = u32::from_le_bytes(take(input, 0));
    let total_size = u64::from(u32::from_le_bytes(take(input, 4)));
    let offset = u64::from(u32::from_le_bytes(take(input, 8)));
    let [client, seq, broker, version, window_lo, window_hi, tame, _] = take(input, 16);
    let claims = Claims {
        num_msg,
        client_id: u64::from(client),
        batch_seq: u64::from(seq),
    };
    let desc = BatchDesc {
        batch_seq: claims.batch_seq,
        client_id: claims.client_id,
        num_msg,
        // Mostly the ring's broker and version, sometimes not.
        broker_id: u32::from(broker % 4 == 3),
        total_size,
        // Anywhere from just before the segment pool to just past it.
        log_idx: (geo.segment_pool_offset - 4096) + offset % (geo.segment_pool_bytes() + 8192),
        start_logical_offset: 0,
        version_flags: u64::from(BATCH_HEADER_VERSION + u32::from(version % 8 == 7)),
    };
    let Ok(()) = BatchLimits::new(geo, 0).check(&desc) else {
        return;
    };
    // What the check let through lies inside one segment of the pool.
    let base = pool
        .data_ptr(desc.log_idx, desc.total_size)
        .expect("a checked descriptor's range is log space");
    let mut bytes = input.get(BATCH_DESC_BYTES..).unwrap_or(&[]).to_vec();
    bytes.resize(desc.total_size as usize, 0);
    if tame % 2 == 1 {
        // Every 64-byte line reads as a header of this batch with a small size, so the walk
        // goes past several messages.
        for line in bytes.chunks_exact_mut(64) {
            line[1..4].fill(0);
            line[8..16].copy_from_slice(&claims.client_id.to_ne_bytes());
            line[16..24].copy_from_slice(&claims.batch_seq.to_ne_bytes());
        }
    }
    // SAFETY: `data_ptr` checked that `base..base + total_size` lies inside the mapping; the
    // fuzz pool is this process's alone (its file was removed) and nothing else runs on it.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base, bytes.len()) };
    let in_pool = Messages::check(pool, Coherent, &desc).map(|m| collect(&m, base, bytes.len()));
    let in_copy = Messages::over(&bytes, claims).map(|m| collect(&m, bytes.as_ptr(), bytes.len()));
    assert_eq!(in_pool, in_copy, "the pool's check and a copy's disagree");
    let window = usize::from(u16::from_le_bytes([window_lo, window_hi])).max(1);
    let in_parts = read_in_parts(&bytes, claims, window);
    assert_eq!(
        in_parts, in_copy,
        "a read in windows of {window} bytes disagrees"
    );
    if let Ok(m) = in_pool {
        assert_eq!(
            m.len(),
            num_msg as usize,
            "a checked batch has its messages"
        );
    }
}

/// Every message of a checked view as (index, payload offset from `base`, payload), each
/// payload asserted inside `base..base + len`.
fn collect(m: &Messages<'_>, base: *const u8, len: usize) -> Vec<(u32, usize, Vec<u8>)> {
    m.iter()
        .map(|r| {
            let msg = r.expect("a checked chain reads back");
            let at = (msg.payload.as_ptr() as usize).wrapping_sub(base as usize);
            assert!(
                at <= len && msg.payload.len() <= len - at,
                "a payload outside its batch"
            );
            (msg.index, at, msg.payload.to_vec())
        })
        .collect()
}

/// The batch read as a subscriber reads it: windows of `window` bytes (grown to a message
/// that does not fit), each checked through [`Parts`].
fn read_in_parts(
    bytes: &[u8],
    claims: Claims,
    window: usize,
) -> Result<Vec<(u32, usize, Vec<u8>)>, crate::messages::BadBatch> {
    let mut parts = Parts::new(claims, bytes.len() as u64)?;
    let mut out = Vec::new();
    let mut w = window;
    while !parts.is_done() {
        let off = parts.offset() as usize;
        let part = &bytes[off..(off + w).min(bytes.len())];
        let m = parts.next(part)?;
        let got = collect(&m, part.as_ptr(), part.len());
        out.extend(got.into_iter().map(|(i, at, p)| (i, at + off, p)));
        let need = parts.need() as usize;
        if m.is_empty() && part.len() >= need.max(w) {
            panic!(
                "a part of {} bytes held no message, {need} needed",
                part.len()
            );
        }
        w = w.max(need);
    }
    Ok(out)
}

/// A scratch directory for [`disk_log_recovery`], one per process and thread (in memory
/// where the host has `/dev/shm`: the recovery syncs its files).
fn scratch() -> PathBuf {
    let base = match std::path::Path::new("/dev/shm").is_dir() {
        true => PathBuf::from("/dev/shm"),
        false => std::env::temp_dir(),
    };
    base.join(format!(
        "embar-fuzz-log-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ))
}

/// Makes the records of `seg` verify as far as their headers go: from the start, each
/// 64-byte header gets the magic, a body length clipped to the bytes left, and the CRC32C of
/// what it then covers (a fuzzer cannot forge checksums; with this it reaches the records'
/// framing, the index and the merge). The body framing is left as it is.
fn seal_records(seg: &mut [u8]) {
    let mut at = 0usize;
    while seg.len() - at >= log::RECORD_HEADER_BYTES {
        let body_at = at + log::RECORD_HEADER_BYTES;
        let h: [u8; log::RECORD_HEADER_BYTES] =
            seg[at..body_at].try_into().expect("a header's bytes");
        let left = (seg.len() - body_at) as u64;
        let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")) % (left + 1);
        let body_end = body_at + len as usize;
        let sealed = log::encode_header(&log::header_meta(&h), &seg[body_at..body_end]);
        seg[at..body_at].copy_from_slice(&sealed);
        at = body_end;
    }
}

/// A log directory made of `input`: its first 7 bytes say how the rest splits into a first
/// segment (2 bytes: its length), its index (1 byte: entries), and (if any bytes are left) a
/// second segment, which era and total orders to read, and whether to seal the first
/// segment's records ([`seal_records`]); see the module docs. Panics if the reader or the recovery break a rule.
pub fn disk_log_recovery(input: &[u8]) {
    let data = scratch();
    let dir = log::topic_dir(&data, "t");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let [seg_lo, seg_hi, idx_len, era, t0, t1, second] = take(input, 0);
    let rest = input.get(7..).unwrap_or(&[]);
    let seg_len = usize::from(u16::from_le_bytes([seg_lo, seg_hi])).min(rest.len());
    let (seg, rest) = rest.split_at(seg_len);
    let mut seg = seg.to_vec();
    if second & 2 == 2 {
        seal_records(&mut seg);
    }
    let seg = &seg[..];
    let (idx, rest) = rest.split_at((usize::from(idx_len) * INDEX_ENTRY_BYTES).min(rest.len()));
    let seg0 = dir.join(format!("{:020}.log", 0));
    std::fs::write(&seg0, seg).expect("a segment");
    std::fs::write(log::index_path(&seg0), idx).expect("an index");
    let scanned = log::scan(seg);
    assert!(scanned.valid as usize <= seg.len());
    let mut end = 0;
    for r in &scanned.records {
        assert_eq!(r.offset, end, "records follow each other");
        end = r.body_at + r.body_len;
    }
    assert_eq!(end, scanned.valid);
    if !rest.is_empty() {
        // A second segment, numbered after the first one's records (or not).
        let n = scanned.records.len() as u64 + u64::from(second % 2);
        std::fs::write(dir.join(format!("{n:020}.log")), rest).expect("a segment");
    }
    // The reader: any record it serves verified; it never panics.
    let era = scanned
        .records
        .get(usize::from(era) % scanned.records.len().max(1))
        .map_or(u64::from(era), |r| r.meta.era);
    let mut logs = DiskLogs::new(std::slice::from_ref(&data), "t", era);
    let _ = logs.oldest();
    let mut body = Vec::new();
    for t in [u64::from(t0), u64::from(t1), u64::from(t0) << 8, 0] {
        if let Ok(Some(m)) = logs.read(t, &mut body) {
            assert!(m.era == era && m.total_order <= t, "served {m:?} for {t}");
            assert!(
                t < m.total_order + u64::from(m.num_msg),
                "served {m:?} for {t}"
            );
            assert_eq!(log::messages(&body).count(), m.num_msg as usize);
        }
    }
    // Recovery keeps exactly the records of the first segment that verify, when the
    // segments follow each other; appending after it works.
    let (mut dl, rec) = DiskLog::open(&dir, LogConfig::default()).expect("recovery");
    assert!(rec.records >= scanned.records.len() as u64);
    if rest.is_empty() {
        assert_eq!(rec.records, scanned.records.len() as u64);
        assert_eq!(
            std::fs::metadata(&seg0).map(|m| m.len()).ok(),
            Some(scanned.valid)
        );
    }
    let idx_bytes = std::fs::read(log::index_path(&seg0)).unwrap_or_default();
    if rest.is_empty() {
        assert_eq!(idx_bytes.len(), scanned.records.len() * INDEX_ENTRY_BYTES);
    }
    let mut b = log::Body::default();
    b.push(b"after");
    let meta = log::RecordMeta {
        total_order: dl
            .last()
            .map_or(0, |l| l.total_order + u64::from(l.num_msg)),
        num_msg: 1,
        era,
        ..Default::default()
    };
    dl.append(&meta, &b, std::time::Instant::now())
        .expect("an append");
    dl.sync().expect("a sync");
    let records = dl.records();
    drop(dl);
    let (again, rec) = DiskLog::open(&dir, LogConfig::default()).expect("recovery");
    assert_eq!((again.records(), rec.truncated_bytes), (records, 0));
    let _ = std::fs::remove_dir_all(&data);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The fuzz target `batch_check` on inputs proptest makes.
        #[test]
        fn a_broker_check_of_any_descriptor_and_bytes_holds_its_rules(
            input in proptest::collection::vec(any::<u8>(), 0..3000),
            num_msg in 0u32..12,
            total_lines in 1u32..40,
            line in 0u32..64,
        ) {
            // Half the cases with a descriptor that passes its own checks, so the chain is
            // walked.
            let mut input = input;
            if input.len() >= super::BATCH_DESC_BYTES && line % 2 == 0 {
                input[0..4].copy_from_slice(&num_msg.to_le_bytes());
                input[4..8].copy_from_slice(&(total_lines * 64).to_le_bytes());
                input[8..12].copy_from_slice(&(4096 + line * 64).to_le_bytes());
                input[18] = 0;
                input[19] = 0;
            }
            super::batch_check(&input);
        }

        /// The fuzz target `disk_log_recovery` on inputs proptest makes: damaged real logs
        /// (whose records verify up to the damage) as well as noise.
        #[test]
        fn a_disk_log_of_any_bytes_is_read_and_recovered_by_the_rules(
            noise in proptest::collection::vec(any::<u8>(), 0..600),
            records in 0usize..6,
            cut in 0usize..2000,
            flip in any::<Option<(usize, u8)>>(),
            head in any::<[u8; 7]>(),
        ) {
            let mut seg = Vec::new();
            let mut idx = Vec::new();
            for r in 0..records {
                let mut b = crate::replication::log::Body::default();
                b.push(&vec![r as u8; r * 10]);
                b.push(b"x");
                let meta = crate::replication::log::RecordMeta {
                    total_order: r as u64 * 2,
                    num_msg: 2,
                    era: 7,
                    ..Default::default()
                };
                idx.extend_from_slice(&meta.total_order.to_le_bytes());
                idx.extend_from_slice(&(seg.len() as u64).to_le_bytes());
                crate::replication::log::encode_record(&mut seg, &meta, &b);
            }
            if let Some((at, x)) = flip {
                if !seg.is_empty() {
                    let i = at % seg.len();
                    seg[i] ^= x;
                }
            }
            seg.truncate(cut.max(seg.len() / 2));
            // The layout `disk_log_recovery` reads: segment length, index entries, era
            // choice, two total orders, second segment numbering; then segment, index, the
            // rest.
            let mut input = head.to_vec();
            input[0..2].copy_from_slice(&(seg.len() as u16).to_le_bytes());
            input[2] = records as u8;
            input.extend_from_slice(&seg);
            input.extend_from_slice(&idx);
            if head[6] % 3 == 0 {
                input.extend_from_slice(&noise);
            }
            super::disk_log_recovery(&input);
        }
    }
}
