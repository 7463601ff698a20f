//! The shared pool ("CXL memory"): one mapping that every broker, the sequencer and local
//! clients map, at any address. Only offsets are ever stored in it.
//!
//! [`Pool::create`] formats a new pool (superblock, empty topic table, rings and segment
//! table; the magic is stored last, so a crash half-way never leaves a pool that opens).
//! [`Pool::open`] validates an existing one through a read-only mapping, so a wrong, foreign
//! or damaged file gets a clear error and not a single written byte.

#[cfg(not(loom))]
mod broker_info;
pub mod coherence;
#[cfg(not(loom))]
pub mod doorbell;
mod faulted;
pub mod geometry;
pub mod layout;
pub mod segments;
pub mod topics;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::mem::size_of;
use std::path::Path;

use embar_sys::mapping::{Backing, CreateOptions as MapCreate, SharedMapping};

use crate::error::{PoolError, PoolResult};
use crate::sync::Ordering::{Acquire, Relaxed};
use coherence::{Coherence, CoherenceMode, Coherent, NonCoherent};
use geometry::{PoolConfig, PoolGeometry};
use layout::*;

/// How to create a pool.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Fault all pages in at creation (`MAP_POPULATE`).
    pub populate: bool,
    /// Bind the pool's pages to this NUMA node (the CXL node on a CXL host).
    pub numa_node: Option<u32>,
    /// The coherence mode every user of this pool should run with.
    pub coherence: CoherenceMode,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            populate: false,
            numa_node: None,
            coherence: CoherenceMode::Coherent,
        }
    }
}

/// How to open a pool. By default nothing is faulted in up front: a process pays (time and
/// resident memory) for the pages it touches, whatever the pool's size. What it writes in
/// bulk it pre-faults as it takes it ([`Pool::populate_range`]: a publisher each grant).
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Refuse a pool of another size (the configured size).
    pub expect_bytes: Option<u64>,
    /// Fault every page in once validated, so the data path takes no page fault. Costs time
    /// and memory in proportion to the pool (seconds and gigabytes on a large one).
    pub populate: bool,
    /// Fault the metadata regions in once validated (superblock, topic table, rings,
    /// sequencer state and sessions, segment table; a few MiB whatever the pool size): what a
    /// broker polls. Log space is left to whoever writes it.
    pub populate_metadata: bool,
}

/// A mapped, validated pool.
#[derive(Debug)]
pub struct Pool {
    map: SharedMapping,
    geo: PoolGeometry,
    mode: CoherenceMode,
    pool_id: u64,
    /// Chunks of log space this process faulted in (see [`populate_range`](Self::populate_range)).
    faulted: faulted::Faulted,
}

impl Pool {
    /// Creates and formats a new pool at `path` (a file in `/dev/shm`, on hugetlbfs, or a DAX
    /// device). Fails without touching anything if the path exists or `cfg` is invalid.
    pub fn create(path: &Path, cfg: &PoolConfig, opts: &CreateOptions) -> PoolResult<Pool> {
        let geo = PoolGeometry::compute(cfg)?;
        let len = usize::try_from(cfg.pool_bytes)
            .map_err(|_| PoolError::Config(format!("pool_bytes {} too large", cfg.pool_bytes)))?;
        let map = SharedMapping::create(
            path,
            len,
            MapCreate {
                populate: opts.populate && opts.numa_node.is_none(),
            },
        )?;
        let dax = matches!(map.backing(), Backing::DaxDevice { .. });
        let pool_id = RandomState::new().build_hasher().finish() | 1;
        let faulted = faulted::Faulted::new(
            geo.metadata_bytes(),
            geo.segment_pool_bytes(),
            opts.populate,
        );
        let pool = Pool {
            map,
            geo,
            mode: opts.coherence,
            pool_id,
            faulted,
        };
        let result = pool.format(opts, dax);
        if let Err(e) = result {
            if !dax {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        Ok(pool)
    }

    fn format(&self, opts: &CreateOptions, dax: bool) -> PoolResult<()> {
        if let Some(node) = opts.numa_node {
            // SAFETY: the whole mapping is owned by this pool and page aligned.
            unsafe { embar_sys::numa::bind(self.map.as_ptr(), self.map.len(), node)? };
        }
        let meta = self.geo.metadata_bytes() as usize;
        if dax {
            // A device keeps old contents; a new file is already zero.
            // SAFETY: `meta` <= pool length; no other process uses a pool before its magic.
            unsafe { std::ptr::write_bytes(self.map.as_ptr(), 0, meta) };
        }
        let sb = self.superblock();
        sb.layout_version.store(LAYOUT_VERSION, Relaxed);
        sb.superblock_bytes
            .store(size_of::<Superblock>() as u32, Relaxed);
        sb.pool_bytes.store(self.geo.pool_bytes, Relaxed);
        sb.pool_id.store(self.pool_id, Relaxed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        sb.created_unix_ms.store(now_ms, Relaxed);
        sb.coherence_mode.store(opts.coherence.code(), Relaxed);
        self.geo.store(sb);
        for topic in 0..self.geo.max_topics {
            let t = self.tinode(topic);
            for broker in 0..self.geo.max_brokers {
                t.brokers[broker as usize]
                    .broker
                    .batch_headers_offset
                    .store(self.geo.ring_offset(topic, broker), Relaxed);
            }
        }
        // Every metadata line reaches memory before the magic says the pool is ready.
        let nc = NonCoherent::detect();
        // SAFETY: `meta` bytes from the start of the mapping are inside it.
        unsafe { nc.writeback_range(self.map.as_ptr(), meta) };
        nc.publish(&sb.magic, POOL_MAGIC);
        Ok(())
    }

    /// Opens and validates an existing pool; see the module docs.
    pub fn open(path: &Path, opts: &OpenOptions) -> PoolResult<Pool> {
        let mut map = SharedMapping::open(path)?;
        let actual = map.len() as u64;
        let corrupt = |reason: String| PoolError::CorruptLayout {
            path: path.to_path_buf(),
            reason,
        };
        if actual < REGION_ALIGN {
            return Err(PoolError::NotAPool {
                path: path.to_path_buf(),
                found: 0,
                expected: POOL_MAGIC,
            });
        }
        // SAFETY: the mapping is at least 4 KiB, page aligned, and Superblock is made of atomics,
        // so a shared reference to it is valid while this mapping lives (`make_writable`
        // below changes its protection in place).
        let sb = unsafe { &*(map.as_ptr() as *const Superblock) };
        NonCoherent::detect().invalidate(sb);
        let magic = sb.magic.load(Acquire);
        if magic != POOL_MAGIC {
            return Err(PoolError::NotAPool {
                path: path.to_path_buf(),
                found: magic,
                expected: POOL_MAGIC,
            });
        }
        let version = sb.layout_version.load(Relaxed);
        if version != LAYOUT_VERSION {
            return Err(PoolError::VersionMismatch {
                path: path.to_path_buf(),
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        let sb_bytes = sb.superblock_bytes.load(Relaxed);
        if sb_bytes as usize != size_of::<Superblock>() {
            return Err(corrupt(format!("superblock size {sb_bytes}")));
        }
        let recorded = sb.pool_bytes.load(Relaxed);
        let size_ok = match map.backing() {
            Backing::DaxDevice { .. } => recorded <= actual,
            _ => recorded == actual,
        };
        if !size_ok {
            return Err(PoolError::SizeMismatch {
                path: path.to_path_buf(),
                recorded,
                actual,
            });
        }
        if let Some(expected) = opts.expect_bytes {
            if expected != recorded {
                return Err(PoolError::UnexpectedSize {
                    path: path.to_path_buf(),
                    expected,
                    actual: recorded,
                });
            }
        }
        let geo = PoolGeometry::load(sb).map_err(|e| corrupt(e.to_string()))?;
        let code = sb.coherence_mode.load(Relaxed);
        let mode = CoherenceMode::from_code(code)
            .ok_or_else(|| corrupt(format!("unknown coherence mode code {code}")))?;
        let pool_id = sb.pool_id.load(Relaxed);
        map.make_writable()?;
        let faulted = if opts.populate {
            map.populate()
        } else if opts.populate_metadata {
            map.populate_range(0, geo.metadata_bytes() as usize)
        } else {
            true
        };
        if !faulted {
            log::debug!(
                "{}: the kernel cannot pre-fault the mapping",
                path.display()
            );
        }
        let faulted = faulted::Faulted::new(
            geo.metadata_bytes(),
            geo.segment_pool_bytes(),
            opts.populate && faulted,
        );
        Ok(Pool {
            map,
            geo,
            mode,
            pool_id,
            faulted,
        })
    }

    pub fn geometry(&self) -> &PoolGeometry {
        &self.geo
    }

    /// The coherence mode the pool was created for.
    pub fn coherence_mode(&self) -> CoherenceMode {
        self.mode
    }

    pub fn pool_id(&self) -> u64 {
        self.pool_id
    }

    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// Whether the mapped file still covers the whole pool. A file in `/dev/shm` can be
    /// truncated by anyone with write access; a process touching the part it lost gets a bus
    /// error (named by `embar_sys::bus`). Long-running processes check this periodically to
    /// stop with a clear error first, and the control process before it answers. A device
    /// cannot shrink: always intact.
    pub fn check_backing(&self) -> PoolResult<()> {
        if matches!(self.backing(), Backing::DaxDevice { .. }) {
            return Ok(());
        }
        // The inode this process mapped, not the path: a pool file removed (or replaced) by
        // path stays whole for the processes that map it.
        let Ok(file_bytes) = self.map.file_len() else {
            return Ok(());
        };
        if file_bytes < self.geo.pool_bytes {
            return Err(PoolError::BackingShrunk {
                path: self.path().to_path_buf(),
                file_bytes,
                pool_bytes: self.geo.pool_bytes,
            });
        }
        Ok(())
    }

    pub fn backing(&self) -> Backing {
        self.map.backing()
    }

    /// A reference to a record at a pool offset.
    ///
    /// # Safety
    /// `offset` must be a region offset from the geometry, aligned for `T`, with
    /// `size_of::<T>()` bytes inside the mapping, and `T` must consist of atomics only.
    unsafe fn record<T>(&self, offset: u64) -> &T {
        debug_assert!(offset as usize + size_of::<T>() <= self.map.len());
        debug_assert_eq!(offset as usize % std::mem::align_of::<T>(), 0);
        // SAFETY: per the contract the record lies inside the mapping, which lives as long as
        // `self`, and is made of atomics (shared mutation through `&T` is allowed).
        unsafe { &*(self.map.as_ptr().add(offset as usize) as *const T) }
    }

    /// A slice of records at a pool offset.
    ///
    /// # Safety
    /// As [`record`](Self::record), for `n` consecutive records.
    unsafe fn records<T>(&self, offset: u64, n: usize) -> &[T] {
        debug_assert!(offset as usize + n * size_of::<T>() <= self.map.len());
        // SAFETY: as in `record`, for `n` records.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize) as *const T, n) }
    }

    pub fn superblock(&self) -> &Superblock {
        // SAFETY: the superblock is at offset 0 of every pool.
        unsafe { self.record(0) }
    }

    /// The cluster epoch (written by the control process).
    pub fn epoch(&self) -> u64 {
        self.superblock().epoch.load(Acquire)
    }

    /// The topic table entry in slot `topic`. Panics if `topic >= max_topics`: slots come from
    /// [`topics`] lookups, never from remote input.
    pub fn tinode(&self, topic: u32) -> &TInode {
        assert!(
            topic < self.geo.max_topics,
            "topic slot {topic} out of range"
        );
        let off = self.geo.topic_table_offset + u64::from(topic) * size_of::<TInode>() as u64;
        // SAFETY: slot < max_topics, so the TInode lies inside the topic table region.
        unsafe { self.record(off) }
    }

    /// The sequencer state of topic slot `topic`.
    pub fn sequencer_state(&self, topic: u32) -> &SequencerState {
        assert!(
            topic < self.geo.max_topics,
            "topic slot {topic} out of range"
        );
        // SAFETY: slot < max_topics, so the state lies inside the sequencer region.
        unsafe { self.record(self.geo.sequencer_state_offset(topic)) }
    }

    /// Session `session` of broker `broker`.
    pub fn session(&self, broker: u32, session: u32) -> PoolResult<&Session> {
        self.check_topic_broker(0, broker)?;
        if session as usize >= SESSIONS_PER_BROKER {
            return Err(PoolError::OutOfRange {
                what: "session",
                value: session.into(),
                limit: SESSIONS_PER_BROKER as u64,
            });
        }
        // SAFETY: both indices were checked, so the session lies inside the session region.
        Ok(unsafe { self.record(self.geo.session_offset(broker, session)) })
    }

    /// The batch ring slots of (topic, broker).
    pub fn ring_slots(&self, topic: u32, broker: u32) -> PoolResult<&[BatchHeader]> {
        self.check_topic_broker(topic, broker)?;
        let off = self.geo.ring_offset(topic, broker);
        // SAFETY: both indices were checked, so the ring lies inside the ring region.
        Ok(unsafe { self.records(off, self.geo.ring_slots as usize) })
    }

    /// The whole segment table.
    pub fn segment_table(&self) -> &[SegmentEntry] {
        // SAFETY: the table region holds `segment_count` entries by construction.
        unsafe {
            self.records(
                self.geo.segment_table_offset,
                self.geo.segment_count as usize,
            )
        }
    }

    /// A pointer to `len` bytes of log space at pool offset `offset`, after checking that the
    /// range lies inside one segment of the segment pool (never metadata). The bytes are plain
    /// memory: a caller may only touch them while the protocol gives it the range.
    pub fn data_ptr(&self, offset: u64, len: u64) -> PoolResult<*mut u8> {
        self.geo
            .check_data_range(offset, len)
            .map_err(|e| PoolError::BadRange(e.to_string()))?;
        // SAFETY: the range was checked to lie inside the mapping.
        Ok(unsafe { self.map.as_ptr().add(offset as usize) })
    }

    /// Faults the pages of `len` bytes at pool offset `offset` in now, for writing (whole
    /// pages, or huge pages where the pool has them): a client calls it on each grant it
    /// takes, so that filling the grant takes no page fault, without having faulted in the
    /// rest of the pool. Log space this process already faulted in (1 MiB chunks) is not
    /// walked again. Advisory: false where the kernel cannot (the pages then fault in on
    /// first touch); the range is clipped to the pool.
    pub fn populate_range(&self, offset: u64, len: u64) -> bool {
        let mut ok = true;
        for (at, n) in self.faulted.missing(offset, len) {
            let done = match (usize::try_from(at), usize::try_from(n)) {
                (Ok(at), Ok(n)) => self.map.populate_range(at, n),
                _ => false,
            };
            if done {
                self.faulted.insert(at, n);
            }
            ok &= done;
        }
        ok
    }

    pub(crate) fn check_topic_broker(&self, topic: u32, broker: u32) -> PoolResult<()> {
        if topic >= self.geo.max_topics {
            return Err(PoolError::OutOfRange {
                what: "topic slot",
                value: topic.into(),
                limit: self.geo.max_topics.into(),
            });
        }
        if broker >= self.geo.max_brokers {
            return Err(PoolError::OutOfRange {
                what: "broker id",
                value: broker.into(),
                limit: self.geo.max_brokers.into(),
            });
        }
        Ok(())
    }

    /// Runs `f` with the coherence implementation of `mode`: the one place where the run-time
    /// choice turns into a monomorphised code path.
    pub fn with_coherence<R>(mode: CoherenceMode, f: impl CoherenceFn<R>) -> R {
        match mode {
            CoherenceMode::Coherent => f.call(Coherent),
            CoherenceMode::NonCoherent => f.call(NonCoherent::detect()),
        }
    }
}

/// A computation generic over the coherence implementation (see [`Pool::with_coherence`]).
pub trait CoherenceFn<R> {
    fn call<C: Coherence>(self, c: C) -> R;
}

#[cfg(all(test, not(loom)))]
pub(crate) mod tests;
