//! Reading a topic back from its brokers' disk logs, in total order: what a subscriber reads
//! when the pool no longer holds a position (retention reclaimed it).
//!
//! Each broker's log holds the batches of its replica sets, in total order within a pool era
//! (the current era's records are the log's suffix: a log is appended in order, and a new
//! pool starts a new era). [`DiskLogs`] reads the logs of every broker of the pool side by
//! side and hands out, for a total order `t`, the verified record that holds it, from
//! whichever log has it (RF > 1: any replica; a record that does not verify in one log is
//! taken from another, and is an error only when no log has it whole).
//!
//! Memory is bounded whatever the log's size: a reader holds one open segment file and the
//! header of its next record; it finds a total order by binary search over the segment files
//! (the header of each one's first record) and then over the segment's `.idx` file (16 bytes
//! a record: total order and offset), reading each probed entry and its record header with
//! `pread`. The index is never trusted over the log: an entry whose record header does not
//! name the same total order sends the reader to the start of that segment, from where it
//! walks record headers. Every record served is verified whole (magic, length, CRC32C, body
//! framing) after it is read; a record that does not verify is never served.
//!
//! A log is written while it is read: a record cut short at the end of the newest segment is
//! one still being appended (not yet there), not damage; the same in a segment that has a
//! successor is damage.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::log::{
    check_header, header_meta, index_path, io, segments, topic_dir, verify, LogError, RecordMeta,
    INDEX_ENTRY_BYTES, RECORD_HEADER_BYTES,
};

type Header = [u8; RECORD_HEADER_BYTES];

/// Reads `buf.len()` bytes at `offset`, or fewer at the end of the file: how many it read.
fn read_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<usize, LogError> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("cannot read", path)(e)),
        }
    }
    Ok(got)
}

/// The header of the record at `offset`, if the file holds all of it.
fn header_at(file: &File, path: &Path, offset: u64) -> Result<Option<Header>, LogError> {
    let mut h = [0u8; RECORD_HEADER_BYTES];
    Ok((read_at(file, path, offset, &mut h)? == h.len()).then_some(h))
}

/// One open segment file.
#[derive(Debug)]
struct Segment {
    /// Its index in [`LogReader::segments`].
    i: usize,
    file: File,
    /// Offset of the next record.
    offset: u64,
}

/// The next record of a log: its header, checked (magic, length), not yet its body.
#[derive(Clone, Copy, Debug)]
struct Peeked {
    header: Header,
    meta: RecordMeta,
    body_len: u64,
}

/// Reads one log directory forward from a total order. See the module docs.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    era: u64,
    /// Segment files by first record number, as last listed.
    segments: Vec<(u64, PathBuf)>,
    at: Option<Segment>,
    peeked: Option<Peeked>,
}

impl LogReader {
    /// A reader of the log in `dir` (which may not exist yet) that serves era `era`.
    pub fn new(dir: PathBuf, era: u64) -> LogReader {
        LogReader {
            dir,
            era,
            segments: Vec::new(),
            at: None,
            peeked: None,
        }
    }

    fn list(&mut self) -> Result<(), LogError> {
        self.segments = match segments(&self.dir) {
            Ok(s) => s,
            Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        Ok(())
    }

    fn open_segment(&self, i: usize, offset: u64) -> Result<Segment, LogError> {
        let path = &self.segments[i].1;
        let file = File::open(path).map_err(io("cannot open", path))?;
        Ok(Segment { i, file, offset })
    }

    /// Whether the segment being read is the log's newest (listed again first): then a record
    /// cut short at its end is one being appended, else damage.
    fn in_newest_segment(&mut self) -> Result<bool, LogError> {
        let i = self.at.as_ref().map_or(0, |s| s.i);
        if i + 1 >= self.segments.len() {
            self.list()?;
        }
        Ok(i + 1 >= self.segments.len())
    }

    fn corrupt(&self, offset: u64, why: String) -> LogError {
        let path = self
            .at
            .as_ref()
            .map_or_else(|| self.dir.clone(), |s| self.segments[s.i].1.clone());
        LogError::Corrupt { path, offset, why }
    }

    /// Whether a record is at or before total order `t` in the order of this reader's era
    /// (records of earlier eras all come first): true on a prefix of the log.
    fn at_or_before(&self, m: &RecordMeta, t: u64) -> bool {
        m.era != self.era || m.total_order <= t
    }

    /// Places the reader at the last record at or before total order `t` (or at the log's
    /// start): by binary search over the segments, then over the segment's index.
    pub fn seek(&mut self, t: u64) -> Result<(), LogError> {
        self.peeked = None;
        self.at = None;
        self.list()?;
        if self.segments.is_empty() {
            return Ok(());
        }
        // The last segment whose first record is at or before `t`.
        let (mut lo, mut hi) = (0usize, self.segments.len());
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let seg = self.open_segment(mid, 0)?;
            let path = &self.segments[mid].1;
            let before = header_at(&seg.file, path, 0)?
                .is_some_and(|h| self.at_or_before(&header_meta(&h), t));
            if before {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let seg = self.open_segment(lo, 0)?;
        let offset = self.index_search(&seg.file, lo, t)?;
        self.at = Some(Segment { offset, ..seg });
        Ok(())
    }

    /// The offset in segment `i` of its last record at or before `t` found through its
    /// index (0 when there is none, or the index disagrees with the log).
    fn index_search(&self, file: &File, i: usize, t: u64) -> Result<u64, LogError> {
        let path = &self.segments[i].1;
        let ipath = index_path(path);
        let Ok(idx) = File::open(&ipath) else {
            return Ok(0);
        };
        let entries = idx.metadata().map_or(0, |m| m.len()) / INDEX_ENTRY_BYTES as u64;
        // Entry `k`'s record header and offset, if the index and the log agree on it.
        let probe = |k: u64| -> Result<Option<(RecordMeta, u64)>, LogError> {
            let mut e = [0u8; INDEX_ENTRY_BYTES];
            if read_at(&idx, &ipath, k * INDEX_ENTRY_BYTES as u64, &mut e)? < e.len() {
                return Ok(None);
            }
            let total_order = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let offset = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
            Ok(header_at(file, path, offset)?
                .filter(|h| check_header(h).is_ok())
                .map(|h| header_meta(&h))
                .filter(|m| m.total_order == total_order)
                .map(|m| (m, offset)))
        };
        // The last entry at or before `t`: entries [0, lo) are, [hi, n) are not.
        let (mut lo, mut hi) = (0u64, entries);
        let mut found = 0;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some((m, offset)) = probe(mid)? else {
                // The index disagrees with the log: walk the segment from its start.
                return Ok(0);
            };
            if self.at_or_before(&m, t) {
                found = offset;
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(found)
    }

    /// The header of the next record, read once; `None` when the log has no more yet.
    fn peek(&mut self) -> Result<Option<Peeked>, LogError> {
        if let Some(p) = self.peeked {
            return Ok(Some(p));
        }
        loop {
            let Some(seg) = &self.at else {
                // Nothing was there at the last seek: look again from the start.
                self.list()?;
                if self.segments.is_empty() {
                    return Ok(None);
                }
                self.at = Some(self.open_segment(0, 0)?);
                continue;
            };
            let path = &self.segments[seg.i].1;
            let mut h = [0u8; RECORD_HEADER_BYTES];
            let got = read_at(&seg.file, path, seg.offset, &mut h)?;
            if got < h.len() {
                // The end of this segment: the next one, if the log has rolled past it.
                if self.in_newest_segment()? {
                    return Ok(None);
                }
                let seg = self.at.as_ref().expect("a segment");
                if got > 0 {
                    return Err(self.corrupt(seg.offset, format!("a short header ({got} bytes)")));
                }
                let next = self.open_segment(seg.i + 1, 0)?;
                self.at = Some(next);
                continue;
            }
            let offset = seg.offset;
            let body_len = check_header(&h).map_err(|why| self.corrupt(offset, why))?;
            let p = Peeked {
                header: h,
                meta: header_meta(&h),
                body_len,
            };
            self.peeked = Some(p);
            return Ok(Some(p));
        }
    }

    /// Moves past the peeked record.
    fn skip(&mut self) {
        if let (Some(p), Some(seg)) = (self.peeked.take(), self.at.as_mut()) {
            seg.offset += RECORD_HEADER_BYTES as u64 + p.body_len;
        }
    }

    /// Passes over every record that ends at or before total order `t` (and those of other
    /// eras); then the next record's header, if the log has one yet.
    fn advance_to(&mut self, t: u64) -> Result<Option<RecordMeta>, LogError> {
        while let Some(p) = self.peek()? {
            if p.meta.era == self.era && p.meta.total_order + u64::from(p.meta.num_msg) > t {
                return Ok(Some(p.meta));
            }
            self.skip();
        }
        Ok(None)
    }

    /// Reads the peeked record's body into `body` and verifies the record; `None` if the log
    /// does not hold all of it yet.
    fn read_body(&mut self, body: &mut Vec<u8>) -> Result<Option<RecordMeta>, LogError> {
        let (Some(p), Some(seg)) = (self.peeked, self.at.as_ref()) else {
            return Ok(None);
        };
        let path = &self.segments[seg.i].1;
        let at = seg.offset + RECORD_HEADER_BYTES as u64;
        // What the file holds of the body, before anything is allocated for it: a header
        // may claim up to `RECORD_BODY_MAX` bytes.
        let file_len = seg.file.metadata().map_err(io("cannot read", path))?.len();
        let got = if file_len.saturating_sub(at) < p.body_len {
            file_len.saturating_sub(at)
        } else {
            body.resize(p.body_len as usize, 0);
            read_at(&seg.file, path, at, body)? as u64
        };
        if got < p.body_len {
            if self.in_newest_segment()? {
                return Ok(None);
            }
            let seg = self.at.as_ref().expect("a segment");
            let why = format!("a short body ({got} of {} bytes)", p.body_len);
            return Err(self.corrupt(seg.offset, why));
        }
        let offset = seg.offset;
        let meta = verify(&p.header, body).map_err(|why| self.corrupt(offset, why))?;
        self.skip();
        Ok(Some(meta))
    }
}

/// The disk logs of one topic on every broker that recorded a data directory, read together
/// in total order: each broker's log of the topic and its backfills (batches a placement
/// change put in its replica sets after it had read them: `super::placement`). See the
/// module docs.
#[derive(Debug)]
pub struct DiskLogs {
    logs: Vec<LogReader>,
    /// The total order every reader was last placed for (reads that follow on from it need
    /// no seek).
    at: Option<u64>,
    /// Each broker's log directory of the topic, looked into again for new backfills when
    /// no log holds a total order (at most every [`RELIST_EVERY`]).
    topic_dirs: Vec<PathBuf>,
    era: u64,
    listed: Vec<PathBuf>,
    last_list: Option<std::time::Instant>,
}

/// How often a reader that finds no log holding a total order looks for new backfills.
const RELIST_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl DiskLogs {
    /// The logs of `topic` under each broker data directory of `dirs`, serving era `era`
    /// (the pool's `pool_id`).
    pub fn new(dirs: &[PathBuf], topic: &str, era: u64) -> DiskLogs {
        let topic_dirs: Vec<PathBuf> = dirs.iter().map(|d| topic_dir(d, topic)).collect();
        let mut logs = DiskLogs {
            logs: topic_dirs
                .iter()
                .map(|d| LogReader::new(d.clone(), era))
                .collect(),
            at: None,
            topic_dirs,
            era,
            listed: Vec::new(),
            last_list: None,
        };
        logs.relist();
        logs
    }

    /// Adds a reader for each backfill log not read yet (begun since the last look):
    /// whether there was one. A reader about to call a position lost looks once more first.
    pub fn relist(&mut self) -> bool {
        self.last_list = Some(std::time::Instant::now());
        let mut added = false;
        for d in &self.topic_dirs {
            for (dir, _, _, era) in super::backfill_dirs(d) {
                if era == self.era && !self.listed.contains(&dir) {
                    self.listed.push(dir.clone());
                    self.logs.push(LogReader::new(dir, self.era));
                    added = true;
                }
            }
        }
        if added {
            self.at = None;
        }
        added
    }

    fn place(&mut self, t: u64) -> Result<(), LogError> {
        if self.at != Some(t) {
            for l in &mut self.logs {
                l.seek(t)?;
            }
            self.at = Some(t);
        }
        Ok(())
    }

    /// The first total order of the era that any log holds.
    pub fn oldest(&mut self) -> Result<Option<u64>, LogError> {
        self.place(0)?;
        let mut oldest: Option<u64> = None;
        for l in &mut self.logs {
            if let Ok(Some(m)) = l.advance_to(0) {
                oldest = Some(oldest.map_or(m.total_order, |o| o.min(m.total_order)));
            }
        }
        Ok(oldest)
    }

    /// The verified record that holds total order `t`, its body in `body` (for each message,
    /// a 4-byte length then its bytes); `None` when no log holds it (yet). A record that does
    /// not verify is an error only when no other log holds `t`.
    pub fn read(&mut self, t: u64, body: &mut Vec<u8>) -> Result<Option<RecordMeta>, LogError> {
        match self.read_placed(t, body)? {
            None if self.last_list.is_none_or(|l| l.elapsed() >= RELIST_EVERY) && self.relist() => {
                self.read_placed(t, body)
            }
            r => Ok(r),
        }
    }

    fn read_placed(&mut self, t: u64, body: &mut Vec<u8>) -> Result<Option<RecordMeta>, LogError> {
        self.place(t)?;
        let mut failed = None;
        for i in 0..self.logs.len() {
            let l = &mut self.logs[i];
            let r = match l.advance_to(t) {
                Ok(Some(m)) if m.total_order <= t => l.read_body(body),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            match r {
                Ok(Some(m)) => {
                    self.at = Some(m.total_order + u64::from(m.num_msg));
                    return Ok(Some(m));
                }
                Ok(None) => {}
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        failed.map_or(Ok(None), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::super::log::{messages, Body, DiskLog, LogConfig};
    use super::*;
    use std::time::Instant;

    fn tmp(name: &str) -> PathBuf {
        super::super::log::tests::tmp(&format!("reader-{name}"))
    }

    /// Writes batches of `n` messages each into the log of `topic` under `data_dir`, at the
    /// given total orders, era `era`.
    fn write(data_dir: &Path, era: u64, firsts: &[u64], n: u32, segment_bytes: u64) {
        let cfg = LogConfig {
            segment_bytes,
            ..Default::default()
        };
        let (mut log, _) = DiskLog::open(&topic_dir(data_dir, "t"), cfg).unwrap();
        for &f in firsts {
            let mut b = Body::default();
            for i in 0..n {
                b.push(format!("m{}", f + u64::from(i)).as_bytes());
            }
            let meta = RecordMeta {
                total_order: f,
                client_id: 1,
                batch_seq: f,
                num_msg: n,
                broker: 0,
                era,
                delivery_index: f / u64::from(n),
            };
            log.append(&meta, &b, Instant::now()).unwrap();
        }
        log.sync().unwrap();
    }

    /// Every message from total order `from` as the logs give them, until none has more.
    fn read_all(logs: &mut DiskLogs, from: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut body = Vec::new();
        let mut t = from;
        while let Some(m) = logs.read(t, &mut body).unwrap() {
            for (i, p) in messages(&body).enumerate() {
                if m.total_order + i as u64 >= t {
                    out.push(String::from_utf8(p.to_vec()).unwrap());
                }
            }
            t = m.total_order + u64::from(m.num_msg);
        }
        out
    }

    #[test]
    fn two_logs_merge_into_the_total_order_from_any_position_across_eras_and_segments() {
        let (a, b) = (tmp("merge-a"), tmp("merge-b"));
        // An earlier era first, then this era's batches of 4 split over two brokers.
        write(&a, 1, &[0, 4, 8], 4, 300);
        write(&b, 1, &[12], 4, 300);
        let evens: Vec<u64> = (0..50).filter(|k| k % 2 == 0).map(|k| k * 4).collect();
        let odds: Vec<u64> = (0..50).filter(|k| k % 2 == 1).map(|k| k * 4).collect();
        write(&a, 2, &evens, 4, 300);
        write(&b, 2, &odds, 4, 300);
        assert!(segments(&topic_dir(&a, "t")).unwrap().len() > 5);
        let mut logs = DiskLogs::new(&[a.clone(), b.clone()], "t", 2);
        assert_eq!(logs.oldest().unwrap(), Some(0));
        for from in [0u64, 1, 7, 8, 101, 198, 199] {
            let got = read_all(&mut logs, from);
            let want: Vec<String> = (from..200).map(|t| format!("m{t}")).collect();
            assert_eq!(got, want, "from {from}");
        }
        assert!(logs.read(200, &mut Vec::new()).unwrap().is_none());
        // An era no log holds.
        assert_eq!(
            DiskLogs::new(std::slice::from_ref(&a), "t", 3)
                .oldest()
                .unwrap(),
            None
        );
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    #[test]
    fn a_wrong_index_is_not_trusted_and_a_damaged_record_is_an_error_naming_it() {
        let a = tmp("damaged");
        write(
            &a,
            5,
            &(0..40).map(|k| k * 2).collect::<Vec<_>>(),
            2,
            1 << 20,
        );
        let dir = topic_dir(&a, "t");
        let seg = segments(&dir).unwrap()[0].1.clone();
        // An index whose entries name the wrong offsets.
        let idx = index_path(&seg);
        let mut bytes = std::fs::read(&idx).unwrap();
        for e in bytes.chunks_exact_mut(INDEX_ENTRY_BYTES) {
            e[8] ^= 0x40;
        }
        std::fs::write(&idx, &bytes).unwrap();
        let mut logs = DiskLogs::new(std::slice::from_ref(&a), "t", 5);
        let want: Vec<String> = (33..80).map(|t| format!("m{t}")).collect();
        assert_eq!(read_all(&mut logs, 33), want);
        // One byte of record 20's body flipped: served up to it, then an error naming it.
        let mut log = std::fs::read(&seg).unwrap();
        let at = super::super::log::scan(&log).records[20].body_at as usize;
        log[at + 3] ^= 1;
        std::fs::write(&seg, &log).unwrap();
        let mut logs = DiskLogs::new(std::slice::from_ref(&a), "t", 5);
        let mut body = Vec::new();
        assert!(logs.read(39, &mut body).unwrap().is_some());
        let e = logs.read(40, &mut body).unwrap_err();
        assert!(
            matches!(&e, LogError::Corrupt { why, .. } if why.contains("CRC32C")),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&a);
    }

    #[test]
    fn a_record_still_being_appended_is_not_there_yet_and_then_is() {
        let a = tmp("appending");
        write(&a, 5, &[0, 3], 3, 1 << 20);
        let seg = segments(&topic_dir(&a, "t")).unwrap()[0].1.clone();
        let whole = std::fs::read(&seg).unwrap();
        let second = super::super::log::scan(&whole).records[1].offset as usize;
        let mut logs = DiskLogs::new(std::slice::from_ref(&a), "t", 5);
        for cut in [second + 10, second + RECORD_HEADER_BYTES + 2] {
            std::fs::write(&seg, &whole[..cut]).unwrap();
            assert!(
                logs.read(3, &mut Vec::new()).unwrap().is_none(),
                "cut {cut}"
            );
        }
        std::fs::write(&seg, &whole).unwrap();
        assert_eq!(
            logs.read(4, &mut Vec::new()).unwrap().unwrap().total_order,
            3
        );
        let _ = std::fs::remove_dir_all(&a);
    }
}
