//! What each broker slot says of itself in the pool ([`BrokerInfo`]): the data directory of
//! its disk logs, so that a subscriber on the pool host finds the logs of every broker
//! without asking the control process (a dead broker's too: the record stays until another
//! broker takes the slot), and the process serving the slot, so that a publisher on the pool
//! host sees its broker die without asking the control process either.
//!
//! The broker of a slot is its only writer, at its start: it stores the length 0, the path's
//! bytes, then the length (published last); a reader loads the length, the bytes, and the
//! length again, and takes the path only when both loads agree (a seqlock with the length as
//! its sequence: a broker rewrites its record at most once per process start).

use std::path::{Path, PathBuf};

use embar_sys::process::ProcessId;

use super::coherence::Coherence;
use super::layout::{BrokerInfo, DATA_DIR_MAX_BYTES};
use super::Pool;
use crate::error::{PoolError, PoolResult};
use crate::sync::Ordering::Relaxed;

impl Pool {
    /// The record of broker slot `broker`.
    pub fn broker_info(&self, broker: u32) -> PoolResult<&BrokerInfo> {
        self.check_topic_broker(0, broker)?;
        // SAFETY: broker < max_brokers, so the record lies inside the broker info region,
        // 64-byte aligned; it is made of atomics.
        Ok(unsafe { self.record(self.geo.broker_info_offset(broker)) })
    }

    /// Records the data directory of broker slot `broker` (`None`: it keeps no disk log). The
    /// path should be absolute: every process on the host reads it.
    pub fn set_broker_data_dir<C: Coherence>(
        &self,
        c: C,
        broker: u32,
        dir: Option<&Path>,
    ) -> PoolResult<()> {
        use std::os::unix::ffi::OsStrExt;
        let info = self.broker_info(broker)?;
        let bytes = dir.map_or(&[][..], |d| d.as_os_str().as_bytes());
        if bytes.len() > DATA_DIR_MAX_BYTES {
            return Err(PoolError::OutOfRange {
                what: "bytes of a broker's data directory path",
                value: bytes.len() as u64,
                limit: DATA_DIR_MAX_BYTES as u64,
            });
        }
        c.publish(&info.data_dir_len, 0);
        let mut padded = [0u8; DATA_DIR_MAX_BYTES];
        padded[..bytes.len()].copy_from_slice(bytes);
        for (word, chunk) in info.data_dir.iter().zip(padded.chunks_exact(8)) {
            word.store(
                u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")),
                Relaxed,
            );
        }
        c.writeback(info);
        c.publish(&info.data_dir_len, bytes.len() as u64);
        Ok(())
    }

    /// The data directory broker slot `broker` recorded, if any.
    pub fn broker_data_dir<C: Coherence>(&self, c: C, broker: u32) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let info = self.broker_info(broker).ok()?;
        for _ in 0..64 {
            c.invalidate(info);
            let len = c.observe(&info.data_dir_len) as usize;
            if len == 0 || len > DATA_DIR_MAX_BYTES {
                return None;
            }
            let mut bytes = vec![0u8; len.next_multiple_of(8)];
            for (chunk, word) in bytes.chunks_exact_mut(8).zip(info.data_dir.iter()) {
                chunk.copy_from_slice(&word.load(Relaxed).to_le_bytes());
            }
            crate::sync::fence(crate::sync::Ordering::Acquire);
            if c.observe(&info.data_dir_len) as usize == len {
                bytes.truncate(len);
                return Some(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)));
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Records `process` as the one serving broker slot `broker` (`None`: nobody, a broker
    /// that stops cleanly). A broker clears only its own record, so a later broker of the
    /// slot is not erased by an earlier one's exit.
    pub fn set_broker_process<C: Coherence>(
        &self,
        c: C,
        broker: u32,
        process: Option<ProcessId>,
    ) -> PoolResult<()> {
        let info = self.broker_info(broker)?;
        match process {
            Some(p) => c.publish(&info.pid, p.pack()),
            None => {
                let me = ProcessId::current().pack();
                if c.observe(&info.pid) == me {
                    c.publish(&info.pid, 0);
                }
            }
        }
        Ok(())
    }

    /// The process serving broker slot `broker`, as it recorded itself (`None`: none
    /// recorded). It may have died since: see [`ProcessId::alive`].
    pub fn broker_process<C: Coherence>(&self, c: C, broker: u32) -> Option<ProcessId> {
        let info = self.broker_info(broker).ok()?;
        c.invalidate(info);
        match c.observe(&info.pid) {
            0 => None,
            w => Some(ProcessId::unpack(w)),
        }
    }

    /// Records whether broker slot `broker`'s process runs the sequencers of every topic
    /// (its own loop, or a thread of its own). Its writer is that broker: set when it starts
    /// them, cleared when it stops them, at its start and at a clean stop.
    pub fn set_broker_sequencing<C: Coherence>(
        &self,
        c: C,
        broker: u32,
        on: bool,
    ) -> PoolResult<()> {
        let info = self.broker_info(broker)?;
        c.publish(&info.sequencing, u64::from(on));
        Ok(())
    }

    /// Whether broker slot `broker` says it runs the sequencers. Its process may have died
    /// since (a dead broker's word is not cleared): ask [`Pool::broker_process`] too, or know
    /// it is alive.
    pub fn broker_sequencing<C: Coherence>(&self, c: C, broker: u32) -> bool {
        self.broker_info(broker)
            .is_ok_and(|info| c.observe(&info.sequencing) == 1)
    }

    /// Every broker slot's recorded data directory: `(slot, directory)`.
    pub fn broker_data_dirs<C: Coherence>(&self, c: C) -> Vec<(u32, PathBuf)> {
        (0..self.geo.max_brokers)
            .filter_map(|b| self.broker_data_dir(c, b).map(|d| (b, d)))
            .collect()
    }
}
