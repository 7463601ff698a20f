//! The disk log of one (broker, topic): segment files of CRC32C-checked batch records, an index
//! by total order, and `fdatasync` every `sync_bytes` or `sync_interval`. The format is
//! `docs/durability.md`; this module is its only writer and reader.
//!
//! Recovery ([`DiskLog::open`]) keeps exactly the records that verify, in order: the first
//! record that is short, has a bad magic or length, or fails its CRC ends the log there (the
//! file is truncated, later segments are removed), so nothing unverified is ever served.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `"EMBR"` little-endian: the first word of every record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"EMBR");
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 64;
/// Largest record body accepted on recovery (a batch is at most a pool segment).
pub const RECORD_BODY_MAX: u64 = 1 << 30;
/// Bytes of one index entry (`total_order`, `offset`).
pub const INDEX_ENTRY_BYTES: usize = 16;
/// Default: a new segment file past this size.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default: `fdatasync` once this many bytes are unsynced.
pub const SYNC_BYTES_DEFAULT: u64 = 64 << 20;
/// Default: `fdatasync` once the oldest unsynced byte is this old.
pub const SYNC_INTERVAL_DEFAULT: Duration = Duration::from_millis(250);

/// Why the log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a batch of {0} bytes is larger than a record can hold")]
    TooLarge(u64),
    /// A record that does not verify where one should be: it is never served.
    #[error("the record at byte {offset} of {path} does not verify: {why}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What a record says about its batch (the header without magic, CRC and length).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordMeta {
    /// Total order of the batch's first message.
    pub total_order: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    pub num_msg: u32,
    /// The broker slot the batch landed on.
    pub broker: u32,
    /// The pool the order was assigned in (its `pool_id`): total orders count from 0 again
    /// in a new pool, so a log spans eras.
    pub era: u64,
    /// The batch's index in its topic's delivery ring.
    pub delivery_index: u64,
}

/// How the log syncs and rolls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub segment_bytes: u64,
    pub sync_bytes: u64,
    pub sync_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            sync_bytes: SYNC_BYTES_DEFAULT,
            sync_interval: SYNC_INTERVAL_DEFAULT,
        }
    }
}

/// A record body: for each message, its length (u32 little-endian) then its bytes.
#[derive(Debug, Default)]
pub struct Body {
    bytes: Vec<u8>,
    count: u32,
}

impl Body {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.count = 0;
    }
    pub fn push(&mut self, payload: &[u8]) {
        self.bytes
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(payload);
        self.count += 1;
    }
    pub fn count(&self) -> u32 {
        self.count
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The messages of a verified body, in order.
pub fn messages(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
        let m = body.get(at + 4..at + 4 + len)?;
        at += 4 + len;
        Some(m)
    })
}

/// Whether `body` holds exactly `num_msg` well-formed messages.
fn body_ok(body: &[u8], num_msg: u32) -> bool {
    let mut at = 0usize;
    let mut n = 0u32;
    while at < body.len() {
        let Some(len) = body.get(at..at + 4) else {
            return false;
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        match (at + 4).checked_add(len) {
            Some(end) if end <= body.len() => at = end,
            _ => return false,
        }
        n += 1;
    }
    n == num_msg
}

pub(crate) fn encode_header(meta: &RecordMeta, body: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
    let mut h = [0u8; RECORD_HEADER_BYTES];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
    h[16..24].copy_from_slice(&meta.total_order.to_le_bytes());
    h[24..32].copy_from_slice(&meta.client_id.to_le_bytes());
    h[32..40].copy_from_slice(&meta.batch_seq.to_le_bytes());
    h[40..44].copy_from_slice(&meta.num_msg.to_le_bytes());
    h[44..48].copy_from_slice(&meta.broker.to_le_bytes());
    h[48..56].copy_from_slice(&meta.era.to_le_bytes());
    h[56..64].copy_from_slice(&meta.delivery_index.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), body);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Appends one whole record (header, then body) to `out`: the bytes [`DiskLog::append`]
/// writes.
pub fn encode_record(out: &mut Vec<u8>, meta: &RecordMeta, body: &Body) {
    out.extend_from_slice(&encode_header(meta, body.as_bytes()));
    out.extend_from_slice(body.as_bytes());
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// One verified record of a segment: its header and where its body lies in the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub meta: RecordMeta,
    /// Offset of the record (its header) in the segment.
    pub offset: u64,
    /// Offset and length of its body.
    pub body_at: u64,
    pub body_len: u64,
}

/// The verified prefix of a segment's bytes: its records, and where it ends (`valid`), with
/// why the rest (if any) was refused.
#[derive(Debug, Default)]
pub struct Scan {
    pub records: Vec<Scanned>,
    pub valid: u64,
    pub refused: Option<String>,
}

/// The body length a record header claims, once its magic and length check.
pub(crate) fn check_header(h: &[u8; RECORD_HEADER_BYTES]) -> Result<u64, String> {
    if u32_at(h, 0) != RECORD_MAGIC {
        return Err("no record magic".into());
    }
    let body_len = u64_at(h, 8);
    if body_len > RECORD_BODY_MAX {
        return Err(format!("a body length of {body_len}"));
    }
    Ok(body_len)
}

/// What a record whose header and body are `h` and `body` says, once its CRC and body framing
/// verify (its header passed [`check_header`]).
pub(crate) fn verify(h: &[u8; RECORD_HEADER_BYTES], body: &[u8]) -> Result<RecordMeta, String> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), body);
    if crc != u32_at(h, 4) {
        return Err("CRC32C mismatch".into());
    }
    let meta = header_meta(h);
    if !body_ok(body, meta.num_msg) {
        return Err("a body that does not hold its messages".into());
    }
    Ok(meta)
}

/// The fields of a record header (not verified).
pub(crate) fn header_meta(h: &[u8; RECORD_HEADER_BYTES]) -> RecordMeta {
    RecordMeta {
        total_order: u64_at(h, 16),
        client_id: u64_at(h, 24),
        batch_seq: u64_at(h, 32),
        num_msg: u32_at(h, 40),
        broker: u32_at(h, 44),
        era: u64_at(h, 48),
        delivery_index: u64_at(h, 56),
    }
}

/// Verifies records from the start of `bytes` until the end or the first that does not
/// verify. Any input is safe: every length is checked before use.
pub fn scan(bytes: &[u8]) -> Scan {
    let mut s = Scan::default();
    let mut at = 0usize;
    while at < bytes.len() {
        let refuse = |why: String| Some(format!("at byte {at}: {why}"));
        let Some(h) = bytes.get(at..at + RECORD_HEADER_BYTES) else {
            s.refused = refuse(format!("a short header ({} bytes)", bytes.len() - at));
            break;
        };
        let h: &[u8; RECORD_HEADER_BYTES] = h.try_into().expect("a header's bytes");
        let body_len = match check_header(h) {
            Ok(n) => n,
            Err(why) => {
                s.refused = refuse(why);
                break;
            }
        };
        let body_at = at + RECORD_HEADER_BYTES;
        let Some(body) = bytes.get(body_at..body_at + body_len as usize) else {
            s.refused = refuse(format!(
                "a short body ({} of {body_len} bytes)",
                bytes.len() - body_at
            ));
            break;
        };
        let meta = match verify(h, body) {
            Ok(m) => m,
            Err(why) => {
                s.refused = refuse(why);
                break;
            }
        };
        s.records.push(Scanned {
            meta,
            offset: at as u64,
            body_at: body_at as u64,
            body_len,
        });
        at = body_at + body_len as usize;
        s.valid = at as u64;
    }
    s
}

/// Segment files of a log directory, by their first record number, in order.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(io("cannot read", dir))?;
    for e in rd {
        let e = e.map_err(io("cannot read", dir))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_suffix(".log")
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn segment_path(dir: &Path, first_record: u64) -> PathBuf {
    dir.join(format!("{first_record:020}.log"))
}

pub(crate) fn index_path(log: &Path) -> PathBuf {
    log.with_extension("idx")
}

fn read_all(path: &Path) -> Result<Vec<u8>, LogError> {
    let mut b = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut b))
        .map_err(io("cannot read", path))?;
    Ok(b)
}

/// One entry of the in-memory index by total order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub era: u64,
    pub total_order: u64,
    pub num_msg: u32,
    /// Which segment (its first record number) and where in it.
    pub segment: u64,
    pub offset: u64,
}

/// What recovery found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub records: u64,
    /// Bytes cut off the end (a torn or damaged tail), and why.
    pub truncated_bytes: u64,
    pub reason: Option<String>,
}

/// The append side of a log directory.
#[derive(Debug)]
pub struct DiskLog {
    dir: PathBuf,
    cfg: LogConfig,
    /// The current segment: its first record number, file, index file and length.
    first: u64,
    file: File,
    idx: File,
    len: u64,
    records: u64,
    index: Vec<IndexEntry>,
    unsynced_bytes: u64,
    unsynced_since: Option<Instant>,
    last: Option<RecordMeta>,
}

impl DiskLog {
    /// Opens (creating) the log in `dir`, recovering it: every segment is verified, the log
    /// ends at the first record that does not verify (its file truncated there, later
    /// segments removed), and the index files are rewritten from what verified.
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<(DiskLog, Recovery), LogError> {
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let segs = segments(dir)?;
        let mut rec = Recovery::default();
        let mut index = Vec::new();
        let mut last = None;
        let mut current: Option<(u64, PathBuf, u64)> = None;
        let mut ended = false;
        for (first, path) in segs {
            if ended {
                let n = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                rec.truncated_bytes += n;
                std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
                let _ = std::fs::remove_file(index_path(&path));
                continue;
            }
            let bytes = read_all(&path)?;
            let s = scan(&bytes);
            if first != rec.records {
                // A gap in record numbers: the segment is not the one that follows.
                rec.truncated_bytes += bytes.len() as u64;
                rec.reason = Some(format!(
                    "{} starts at record {first}, expected {}",
                    path.display(),
                    rec.records
                ));
                std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
                let _ = std::fs::remove_file(index_path(&path));
                ended = true;
                continue;
            }
            let mut idx_bytes = Vec::with_capacity(s.records.len() * INDEX_ENTRY_BYTES);
            for r in &s.records {
                index.push(IndexEntry {
                    era: r.meta.era,
                    total_order: r.meta.total_order,
                    num_msg: r.meta.num_msg,
                    segment: first,
                    offset: r.offset,
                });
                idx_bytes.extend_from_slice(&r.meta.total_order.to_le_bytes());
                idx_bytes.extend_from_slice(&r.offset.to_le_bytes());
                last = Some(r.meta);
            }
            rec.records += s.records.len() as u64;
            if s.valid < bytes.len() as u64 {
                rec.truncated_bytes += bytes.len() as u64 - s.valid;
                rec.reason = s.refused.map(|r| format!("{}: {r}", path.display()));
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io("cannot open", &path))?;
                f.set_len(s.valid).map_err(io("cannot truncate", &path))?;
                f.sync_data().map_err(io("cannot sync", &path))?;
                ended = true;
            }
            let ip = index_path(&path);
            std::fs::write(&ip, &idx_bytes).map_err(io("cannot write", &ip))?;
            current = Some((first, path, s.valid));
        }
        let (first, path, len) = current.unwrap_or_else(|| (0, segment_path(dir, 0), 0));
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io("cannot open", p))
        };
        let file = open(&path)?;
        let idx = open(&index_path(&path))?;
        sync_dir(dir)?;
        let log = DiskLog {
            dir: dir.to_path_buf(),
            cfg,
            first,
            file,
            idx,
            len,
            records: rec.records,
            index,
            unsynced_bytes: 0,
            unsynced_since: None,
            last,
        };
        Ok((log, rec))
    }

    /// The last record appended (or recovered).
    pub fn last(&self) -> Option<&RecordMeta> {
        self.last.as_ref()
    }

    /// The total order after the log's last record of era `era` (`None` when its last
    /// record is of another era, or it has none): where appending that era goes on.
    pub fn end_of_era(&self, era: u64) -> Option<u64> {
        self.last
            .as_ref()
            .filter(|l| l.era == era)
            .map(|l| l.total_order + u64::from(l.num_msg))
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// The index by total order: every record, in log order.
    pub fn index(&self) -> &[IndexEntry] {
        &self.index
    }

    /// The record holding total order `t` of era `era`, by binary search of the index.
    pub fn find(&self, era: u64, t: u64) -> Option<&IndexEntry> {
        let lo = self.index.partition_point(|e| e.era != era);
        let hi = lo + self.index[lo..].partition_point(|e| e.era == era);
        let run = &self.index[lo..hi];
        let i = run.partition_point(|e| e.total_order + u64::from(e.num_msg) <= t);
        run.get(i).filter(|e| e.total_order <= t)
    }

    /// Appends one batch record (not yet synced: see [`DiskLog::sync_due`]).
    pub fn append(&mut self, meta: &RecordMeta, body: &Body, now: Instant) -> Result<(), LogError> {
        let b = body.as_bytes();
        if b.len() as u64 > RECORD_BODY_MAX {
            return Err(LogError::TooLarge(b.len() as u64));
        }
        if self.len > 0
            && self.len + (RECORD_HEADER_BYTES + b.len()) as u64 > self.cfg.segment_bytes
        {
            self.roll()?;
        }
        let h = encode_header(meta, b);
        // Paths are built for an error only, not per record.
        let (dir, first) = (&self.dir, self.first);
        self.file
            .write_all(&h)
            .and_then(|_| self.file.write_all(b))
            .map_err(|e| io("cannot write", &segment_path(dir, first))(e))?;
        let mut ie = [0u8; INDEX_ENTRY_BYTES];
        ie[..8].copy_from_slice(&meta.total_order.to_le_bytes());
        ie[8..].copy_from_slice(&self.len.to_le_bytes());
        self.idx
            .write_all(&ie)
            .map_err(|e| io("cannot write", &index_path(&segment_path(dir, first)))(e))?;
        self.index.push(IndexEntry {
            era: meta.era,
            total_order: meta.total_order,
            num_msg: meta.num_msg,
            segment: self.first,
            offset: self.len,
        });
        let n = (RECORD_HEADER_BYTES + b.len()) as u64;
        self.len += n;
        self.records += 1;
        self.unsynced_bytes += n;
        self.unsynced_since.get_or_insert(now);
        self.last = Some(*meta);
        Ok(())
    }

    /// Syncs the full segment and starts the next one.
    fn roll(&mut self) -> Result<(), LogError> {
        self.sync()?;
        self.first = self.records;
        let path = segment_path(&self.dir, self.first);
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io("cannot open", p))
        };
        self.file = open(&path)?;
        self.idx = open(&index_path(&path))?;
        self.len = 0;
        sync_dir(&self.dir)
    }

    /// Bytes appended and not yet synced.
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced_bytes
    }

    /// Whether the policy asks for a sync now: `sync_bytes` unsynced, or the oldest unsynced
    /// byte older than `sync_interval`.
    pub fn sync_due(&self, now: Instant) -> bool {
        self.unsynced_bytes >= self.cfg.sync_bytes
            || self
                .unsynced_since
                .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.sync_interval)
    }

    /// `fdatasync` of the segment and its index: everything appended so far is durable.
    ///
    /// The synced bytes' pages then leave the page cache: the log is read back only by a
    /// subscriber behind the pool's retention or a broker catching up (the pool holds
    /// everything recent), and letting it fill the page cache made every write copy into
    /// pages the kernel had to find anew (measured on the 2-vCPU development VM: a
    /// writer's `write` calls ran at 0.3 GB/s while the cache grew, 1.7-3.5 GB/s when the
    /// synced pages were dropped and reused; docs/durability.md, "The ACK 2 bench").
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.unsynced_bytes == 0 {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.first);
        self.file.sync_data().map_err(io("cannot sync", &path))?;
        self.idx
            .sync_data()
            .map_err(io("cannot sync", &index_path(&path)))?;
        // Every unsynced byte is in this segment: a roll syncs the one before.
        let from = self.len.saturating_sub(self.unsynced_bytes);
        // Advice only: a failure changes nothing on the disk.
        let _ = embar_sys::file::drop_cached(&self.file, from, self.len - from);
        self.unsynced_bytes = 0;
        self.unsynced_since = None;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync", dir))
}

/// One verified record read back.
#[derive(Debug)]
pub struct Record {
    pub meta: RecordMeta,
    pub body: Vec<u8>,
}

/// Reads every record of the log in `dir`, verifying each, without changing any file.
/// A record that does not verify ends the log: the records before it are returned, with
/// [`Recovery`] saying what was left out and why.
pub fn read_log(dir: &Path) -> Result<(Vec<Record>, Recovery), LogError> {
    let mut out = Vec::new();
    let mut rec = Recovery::default();
    let mut ended = false;
    for (first, path) in segments(dir)? {
        let bytes = read_all(&path)?;
        if ended || first != rec.records {
            rec.truncated_bytes += bytes.len() as u64;
            if !ended {
                rec.reason = Some(format!(
                    "{} starts at record {first}, expected {}",
                    path.display(),
                    rec.records
                ));
            }
            ended = true;
            continue;
        }
        let s = scan(&bytes);
        for r in &s.records {
            let body = bytes[r.body_at as usize..(r.body_at + r.body_len) as usize].to_vec();
            out.push(Record { meta: r.meta, body });
        }
        rec.records += s.records.len() as u64;
        if s.valid < bytes.len() as u64 {
            rec.truncated_bytes += bytes.len() as u64 - s.valid;
            rec.reason = s.refused.map(|r| format!("{}: {r}", path.display()));
            ended = true;
        }
    }
    Ok((out, rec))
}

/// The directory of `topic`'s log under a broker's data directory: `topic-` and the name,
/// every byte outside `[A-Za-z0-9._-]` written as `%XX`.
pub fn topic_dir(data_dir: &Path, topic: &str) -> PathBuf {
    let mut s = String::from("topic-");
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    data_dir.join(s)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn meta(t: u64, n: u32) -> RecordMeta {
        RecordMeta {
            total_order: t,
            client_id: 7,
            batch_seq: t,
            num_msg: n,
            broker: 1,
            era: 99,
            delivery_index: t,
        }
    }

    fn body(n: u32, tag: u64) -> Body {
        let mut b = Body::default();
        for i in 0..n {
            b.push(format!("message {tag}-{i}").as_bytes());
        }
        b
    }

    /// A fresh scratch directory for test `name` (this process and thread).
    pub(crate) fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "embar-log-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write(dir: &Path, records: u64, cfg: LogConfig) {
        let (mut log, _) = DiskLog::open(dir, cfg).unwrap();
        let now = Instant::now();
        for r in 0..records {
            log.append(&meta(r * 3, 3), &body(3, r), now).unwrap();
        }
        log.sync().unwrap();
    }

    #[test]
    fn appended_records_read_back_after_reopen_with_their_messages_and_index() {
        let d = tmp("reopen");
        write(&d, 10, LogConfig::default());
        let (log, rec) = DiskLog::open(&d, LogConfig::default()).unwrap();
        assert_eq!(
            rec,
            Recovery {
                records: 10,
                ..Default::default()
            }
        );
        assert_eq!(log.last(), Some(&meta(27, 3)));
        assert_eq!(log.find(99, 13).unwrap().total_order, 12);
        assert!(log.find(99, 30).is_none());
        assert!(log.find(98, 3).is_none());
        let (records, _) = read_log(&d).unwrap();
        assert_eq!(records.len(), 10);
        let got: Vec<&[u8]> = messages(&records[4].body).collect();
        assert_eq!(
            got,
            vec![&b"message 4-0"[..], b"message 4-1", b"message 4-2"]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn segments_roll_and_the_log_continues_across_them() {
        let d = tmp("roll");
        let cfg = LogConfig {
            segment_bytes: 300,
            ..Default::default()
        };
        write(&d, 12, cfg);
        assert!(segments(&d).unwrap().len() > 3);
        let (mut log, rec) = DiskLog::open(&d, cfg).unwrap();
        assert_eq!(rec.records, 12);
        log.append(&meta(36, 3), &body(3, 12), Instant::now())
            .unwrap();
        log.sync().unwrap();
        let (records, rec) = read_log(&d).unwrap();
        assert_eq!((records.len(), rec.truncated_bytes), (13, 0));
        let orders: Vec<u64> = records.iter().map(|r| r.meta.total_order).collect();
        assert_eq!(orders, (0..13).map(|r| r * 3).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_tail_at_every_byte_keeps_exactly_the_complete_records() {
        let d = tmp("torn");
        write(&d, 4, LogConfig::default());
        let seg = segment_path(&d, 0);
        let whole = std::fs::read(&seg).unwrap();
        let last_at = scan(&whole).records[3].offset as usize;
        for cut in last_at..whole.len() {
            std::fs::write(&seg, &whole[..cut]).unwrap();
            let (mut log, rec) = DiskLog::open(&d, LogConfig::default()).unwrap();
            assert_eq!(rec.records, 3, "cut at {cut}");
            assert_eq!(rec.truncated_bytes, (cut - last_at) as u64, "cut at {cut}");
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), last_at as u64);
            // The log goes on after the cut.
            log.append(&meta(9, 3), &body(3, 3), Instant::now())
                .unwrap();
            log.sync().unwrap();
            drop(log);
            assert_eq!(std::fs::read(&seg).unwrap(), whole, "cut at {cut}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_is_caught_by_its_crc() {
        let d = tmp("flip");
        write(&d, 3, LogConfig::default());
        let seg = segment_path(&d, 0);
        let whole = std::fs::read(&seg).unwrap();
        let second = scan(&whole).records[1];
        let end = (second.body_at + second.body_len) as usize;
        for byte in second.offset as usize..end {
            for bit in [0u8, 3, 7] {
                let mut b = whole.clone();
                b[byte] ^= 1 << bit;
                let s = scan(&b);
                assert_eq!(s.records.len(), 1, "byte {byte} bit {bit}");
                assert!(s.refused.is_some());
            }
        }
        // Recovery of a damaged middle record drops it and everything after it.
        let mut b = whole.clone();
        b[second.body_at as usize + 5] ^= 0x10;
        std::fs::write(&seg, &b).unwrap();
        let (records, rec) = read_log(&d).unwrap();
        assert_eq!(records.len(), 1);
        assert!(rec.reason.unwrap().contains("CRC32C"));
        let (log, rec) = DiskLog::open(&d, LogConfig::default()).unwrap();
        assert_eq!((log.records(), rec.records), (1, 1));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn sync_is_due_by_bytes_or_by_age() {
        let d = tmp("due");
        let cfg = LogConfig {
            sync_bytes: 1000,
            sync_interval: Duration::from_millis(50),
            ..Default::default()
        };
        let (mut log, _) = DiskLog::open(&d, cfg).unwrap();
        let t0 = Instant::now();
        assert!(!log.sync_due(t0));
        log.append(&meta(0, 1), &body(1, 0), t0).unwrap();
        assert!(!log.sync_due(t0));
        assert!(log.sync_due(t0 + Duration::from_millis(50)));
        log.sync().unwrap();
        assert!(!log.sync_due(t0 + Duration::from_secs(9)));
        let mut big = Body::default();
        big.push(&[7u8; 1000]);
        log.append(&meta(1, 1), &big, t0).unwrap();
        assert!(log.sync_due(t0));
        let _ = std::fs::remove_dir_all(&d);
    }

    proptest::proptest! {
        /// Whatever is done to a log's bytes (cut anywhere, one byte changed anywhere), the
        /// scan keeps exactly a prefix of the records written, each unchanged.
        #[test]
        fn a_damaged_log_scans_to_a_prefix_of_its_records(
            sizes in proptest::collection::vec(proptest::collection::vec(0usize..40, 1..5), 1..8),
            cut in 0.0f64..1.0,
            flip in proptest::option::of((0.0f64..1.0, 1u8..=255)),
        ) {
            let mut bytes = Vec::new();
            let mut written = Vec::new();
            for (r, msgs) in sizes.iter().enumerate() {
                let mut b = Body::default();
                for (i, n) in msgs.iter().enumerate() {
                    b.push(&vec![(r * 7 + i) as u8; *n]);
                }
                let m = meta(r as u64 * 10, msgs.len() as u32);
                encode_record(&mut bytes, &m, &b);
                written.push((m, b.as_bytes().to_vec()));
            }
            let whole = scan(&bytes);
            proptest::prop_assert_eq!(whole.records.len(), written.len());
            if let Some((at, x)) = flip {
                let i = (at * bytes.len() as f64) as usize % bytes.len();
                bytes[i] ^= x;
            }
            bytes.truncate((cut * bytes.len() as f64) as usize);
            let s = scan(&bytes);
            proptest::prop_assert!(s.records.len() <= written.len());
            for (r, (m, body)) in s.records.iter().zip(&written) {
                proptest::prop_assert_eq!(&r.meta, m);
                let got = &bytes[r.body_at as usize..(r.body_at + r.body_len) as usize];
                proptest::prop_assert_eq!(got, &body[..]);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_scan() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..400usize {
            let mut b = vec![0u8; len];
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = x as u8;
            }
            if len >= 4 {
                b[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            }
            let s = scan(&b);
            assert!(s.valid as usize <= len);
        }
    }
}
