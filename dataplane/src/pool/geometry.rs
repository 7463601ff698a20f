//! Where each region of the pool starts, computed from a handful of parameters.
//!
//! ```text
//! 0                superblock (256 B)
//! 4 KiB            topic table: max_topics x TInode
//! (4 KiB aligned)  batch rings: max_topics x max_brokers x ring_slots x 128 B
//! (4 KiB aligned)  sequencer state: max_topics x SequencerState (clients, subscribers,
//!                  delivery ring: ~557 KiB each)
//! (4 KiB aligned)  sessions: max_brokers x SESSIONS_PER_BROKER x Session (4.3 KiB each)
//! (4 KiB aligned)  doorbells: max_brokers x BrokerDoorbell (128 B each)
//! (4 KiB aligned)  broker info: max_brokers x BrokerInfo (4 KiB each: data directory)
//! (4 KiB aligned)  segment table: segment_count x 64 B
//! (segment align)  segment pool: segment_count x segment_bytes   (the logs)
//! ```
//!
//! The superblock stores the parameters and the derived offsets; on open the offsets are
//! recomputed and must agree, so a corrupt or foreign superblock cannot send a reader outside
//! the mapping.

use std::mem::size_of;

use super::layout::*;
use crate::error::{PoolError, PoolResult};

/// What a pool is formatted with (from `configs/*.toml` or flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub pool_bytes: u64,
    pub max_topics: u32,
    pub max_brokers: u32,
    pub ring_slots: u32,
    pub segment_bytes: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool_bytes: 1 << 30,
            max_topics: 16,
            max_brokers: 4,
            ring_slots: 1024,
            segment_bytes: 16 << 20,
        }
    }
}

/// The computed layout of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    pub pool_bytes: u64,
    pub max_topics: u32,
    pub max_brokers: u32,
    pub ring_slots: u32,
    pub segment_bytes: u64,
    pub topic_table_offset: u64,
    pub ring_region_offset: u64,
    pub sequencer_region_offset: u64,
    pub session_region_offset: u64,
    pub doorbell_region_offset: u64,
    pub broker_info_region_offset: u64,
    pub segment_table_offset: u64,
    pub segment_pool_offset: u64,
    pub segment_count: u64,
}

fn config_err(msg: String) -> PoolError {
    PoolError::Config(msg)
}

impl PoolGeometry {
    /// Lays out a pool for `cfg`, or says which parameter is out of bounds.
    pub fn compute(cfg: &PoolConfig) -> PoolResult<PoolGeometry> {
        if cfg.max_topics == 0 || cfg.max_topics > MAX_TOPICS_LIMIT {
            return Err(config_err(format!(
                "max_topics {} must be in 1..={MAX_TOPICS_LIMIT}",
                cfg.max_topics
            )));
        }
        if cfg.max_brokers == 0 || cfg.max_brokers as usize > MAX_BROKERS {
            return Err(config_err(format!(
                "max_brokers {} must be in 1..={MAX_BROKERS}",
                cfg.max_brokers
            )));
        }
        if !cfg.ring_slots.is_power_of_two()
            || !(RING_SLOTS_MIN..=RING_SLOTS_MAX).contains(&cfg.ring_slots)
        {
            return Err(config_err(format!(
                "ring_slots {} must be a power of two in {RING_SLOTS_MIN}..={RING_SLOTS_MAX}",
                cfg.ring_slots
            )));
        }
        if cfg.segment_bytes < SEGMENT_BYTES_MIN || cfg.segment_bytes % REGION_ALIGN != 0 {
            return Err(config_err(format!(
                "segment_bytes {} must be a multiple of {REGION_ALIGN} and at least {SEGMENT_BYTES_MIN}",
                cfg.segment_bytes
            )));
        }
        let topic_table_offset = align_up(size_of::<Superblock>() as u64, REGION_ALIGN);
        let topic_table_bytes = u64::from(cfg.max_topics) * size_of::<TInode>() as u64;
        let ring_region_offset = align_up(topic_table_offset + topic_table_bytes, REGION_ALIGN);
        let ring_bytes = u64::from(cfg.max_topics)
            * u64::from(cfg.max_brokers)
            * u64::from(cfg.ring_slots)
            * size_of::<BatchHeader>() as u64;
        let sequencer_region_offset = align_up(ring_region_offset + ring_bytes, REGION_ALIGN);
        let sequencer_bytes = u64::from(cfg.max_topics) * size_of::<SequencerState>() as u64;
        let session_region_offset =
            align_up(sequencer_region_offset + sequencer_bytes, REGION_ALIGN);
        let session_bytes =
            u64::from(cfg.max_brokers) * SESSIONS_PER_BROKER as u64 * size_of::<Session>() as u64;
        let doorbell_region_offset = align_up(session_region_offset + session_bytes, REGION_ALIGN);
        let doorbell_bytes = u64::from(cfg.max_brokers) * size_of::<BrokerDoorbell>() as u64;
        let broker_info_region_offset =
            align_up(doorbell_region_offset + doorbell_bytes, REGION_ALIGN);
        let broker_info_bytes = u64::from(cfg.max_brokers) * size_of::<BrokerInfo>() as u64;
        let segment_table_offset =
            align_up(broker_info_region_offset + broker_info_bytes, REGION_ALIGN);
        let seg_align = cfg.segment_bytes.min(2 << 20).next_power_of_two();
        let entry = size_of::<SegmentEntry>() as u64;
        let room = cfg.pool_bytes.saturating_sub(segment_table_offset);
        let mut segment_count = room / (cfg.segment_bytes + entry);
        let mut segment_pool_offset;
        loop {
            segment_pool_offset = align_up(segment_table_offset + segment_count * entry, seg_align);
            if segment_count == 0
                || segment_pool_offset + segment_count * cfg.segment_bytes <= cfg.pool_bytes
            {
                break;
            }
            segment_count -= 1;
        }
        if segment_count == 0 {
            return Err(config_err(format!(
                "pool_bytes {} leaves no room for one segment of {} bytes after {} bytes of metadata",
                cfg.pool_bytes, cfg.segment_bytes, segment_table_offset
            )));
        }
        Ok(PoolGeometry {
            pool_bytes: cfg.pool_bytes,
            max_topics: cfg.max_topics,
            max_brokers: cfg.max_brokers,
            ring_slots: cfg.ring_slots,
            segment_bytes: cfg.segment_bytes,
            topic_table_offset,
            ring_region_offset,
            sequencer_region_offset,
            session_region_offset,
            doorbell_region_offset,
            broker_info_region_offset,
            segment_table_offset,
            segment_pool_offset,
            segment_count,
        })
    }

    pub fn config(&self) -> PoolConfig {
        PoolConfig {
            pool_bytes: self.pool_bytes,
            max_topics: self.max_topics,
            max_brokers: self.max_brokers,
            ring_slots: self.ring_slots,
            segment_bytes: self.segment_bytes,
        }
    }

    /// Bytes of the metadata regions (everything before the segment pool).
    pub fn metadata_bytes(&self) -> u64 {
        self.segment_pool_offset
    }

    pub fn segment_pool_bytes(&self) -> u64 {
        self.segment_count * self.segment_bytes
    }

    /// Pool offset of ring (topic, broker).
    pub fn ring_offset(&self, topic: u32, broker: u32) -> u64 {
        debug_assert!(topic < self.max_topics && broker < self.max_brokers);
        let ring_bytes = u64::from(self.ring_slots) * size_of::<BatchHeader>() as u64;
        self.ring_region_offset
            + (u64::from(topic) * u64::from(self.max_brokers) + u64::from(broker)) * ring_bytes
    }

    /// Pool offset of the sequencer state of topic slot `topic`.
    pub fn sequencer_state_offset(&self, topic: u32) -> u64 {
        debug_assert!(topic < self.max_topics);
        self.sequencer_region_offset + u64::from(topic) * size_of::<SequencerState>() as u64
    }

    /// Pool offset of session `session` of broker `broker`.
    pub fn session_offset(&self, broker: u32, session: u32) -> u64 {
        debug_assert!(broker < self.max_brokers && (session as usize) < SESSIONS_PER_BROKER);
        self.session_region_offset
            + (u64::from(broker) * SESSIONS_PER_BROKER as u64 + u64::from(session))
                * size_of::<Session>() as u64
    }

    /// Pool offset of the doorbell of broker `broker`.
    pub fn doorbell_offset(&self, broker: u32) -> u64 {
        debug_assert!(broker < self.max_brokers);
        self.doorbell_region_offset + u64::from(broker) * size_of::<BrokerDoorbell>() as u64
    }

    /// Pool offset of the [`BrokerInfo`] of broker `broker`.
    pub fn broker_info_offset(&self, broker: u32) -> u64 {
        debug_assert!(broker < self.max_brokers);
        self.broker_info_region_offset + u64::from(broker) * size_of::<BrokerInfo>() as u64
    }

    pub fn segment_offset(&self, segment: u64) -> u64 {
        debug_assert!(segment < self.segment_count);
        self.segment_pool_offset + segment * self.segment_bytes
    }

    /// Whether `[offset, offset + len)` lies inside one segment of the segment pool; the check
    /// every offset written by another process passes before it is used.
    pub fn check_data_range(&self, offset: u64, len: u64) -> Result<u64, RangeError> {
        let end = offset
            .checked_add(len)
            .ok_or(RangeError::Overflow { offset, len })?;
        let pool_end = self.segment_pool_offset + self.segment_pool_bytes();
        if offset < self.segment_pool_offset || end > pool_end {
            return Err(RangeError::OutsideSegmentPool {
                offset,
                end,
                pool_start: self.segment_pool_offset,
                pool_end,
            });
        }
        let segment = (offset - self.segment_pool_offset) / self.segment_bytes;
        if len > 0 && (end - 1 - self.segment_pool_offset) / self.segment_bytes != segment {
            return Err(RangeError::CrossesSegment {
                offset,
                end,
                segment,
            });
        }
        Ok(segment)
    }

    /// Stores the geometry into the superblock's geometry line (formatter only).
    pub(crate) fn store(&self, sb: &Superblock) {
        let g = &sb.geometry;
        sb.sequencer_region_offset
            .store(self.sequencer_region_offset, crate::sync::Ordering::Relaxed);
        sb.session_region_offset
            .store(self.session_region_offset, crate::sync::Ordering::Relaxed);
        sb.doorbell_region_offset
            .store(self.doorbell_region_offset, crate::sync::Ordering::Relaxed);
        sb.broker_info_region_offset.store(
            self.broker_info_region_offset,
            crate::sync::Ordering::Relaxed,
        );
        use crate::sync::Ordering::Relaxed;
        g.max_topics.store(self.max_topics, Relaxed);
        g.max_brokers.store(self.max_brokers, Relaxed);
        g.ring_slots.store(self.ring_slots, Relaxed);
        g.segment_bytes.store(self.segment_bytes, Relaxed);
        g.topic_table_offset.store(self.topic_table_offset, Relaxed);
        g.ring_region_offset.store(self.ring_region_offset, Relaxed);
        g.segment_table_offset
            .store(self.segment_table_offset, Relaxed);
        g.segment_pool_offset
            .store(self.segment_pool_offset, Relaxed);
        g.segment_count.store(self.segment_count, Relaxed);
    }

    /// Reads a geometry back from a superblock and checks that it is exactly what the stored
    /// parameters produce.
    pub(crate) fn load(sb: &Superblock) -> Result<PoolGeometry, GeometryError> {
        use crate::sync::Ordering::Relaxed;
        let g = &sb.geometry;
        let pool_bytes = sb.pool_bytes.load(Relaxed);
        let cfg = PoolConfig {
            pool_bytes,
            max_topics: g.max_topics.load(Relaxed),
            max_brokers: g.max_brokers.load(Relaxed),
            ring_slots: g.ring_slots.load(Relaxed),
            segment_bytes: g.segment_bytes.load(Relaxed),
        };
        let expected =
            PoolGeometry::compute(&cfg).map_err(|e| GeometryError::Parameters(Box::new(e)))?;
        let found = PoolGeometry {
            topic_table_offset: g.topic_table_offset.load(Relaxed),
            ring_region_offset: g.ring_region_offset.load(Relaxed),
            sequencer_region_offset: sb.sequencer_region_offset.load(Relaxed),
            session_region_offset: sb.session_region_offset.load(Relaxed),
            doorbell_region_offset: sb.doorbell_region_offset.load(Relaxed),
            broker_info_region_offset: sb.broker_info_region_offset.load(Relaxed),
            segment_table_offset: g.segment_table_offset.load(Relaxed),
            segment_pool_offset: g.segment_pool_offset.load(Relaxed),
            segment_count: g.segment_count.load(Relaxed),
            ..expected
        };
        if found != expected {
            return Err(GeometryError::OffsetsDisagree {
                found: Box::new(found),
                expected: Box::new(expected),
            });
        }
        Ok(expected)
    }
}

/// Why a range of pool offsets (written by another process) may not be used as log space.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("offset {offset} + length {len} overflows")]
    Overflow { offset: u64, len: u64 },
    #[error("range {offset}..{end} is outside the segment pool {pool_start}..{pool_end}")]
    OutsideSegmentPool {
        offset: u64,
        end: u64,
        pool_start: u64,
        pool_end: u64,
    },
    #[error("range {offset}..{end} crosses the end of segment {segment}")]
    CrossesSegment { offset: u64, end: u64, segment: u64 },
}

/// Why the geometry recorded in a superblock cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum GeometryError {
    #[error("its recorded parameters are invalid: {0}")]
    Parameters(Box<crate::PoolError>),
    #[error("region offsets {found:?} disagree with the ones its parameters give {expected:?}")]
    OffsetsDisagree {
        found: Box<PoolGeometry>,
        expected: Box<PoolGeometry>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_config_lays_out_regions_in_order_and_aligned() {
        let g = PoolGeometry::compute(&PoolConfig::default()).unwrap();
        assert_eq!(g.topic_table_offset, 4096);
        assert!(g.ring_region_offset >= g.topic_table_offset + 16 * size_of::<TInode>() as u64);
        assert!(g.sequencer_region_offset >= g.ring_region_offset + 16 * 4 * 1024 * 128);
        assert!(g.session_region_offset >= g.sequencer_region_offset + 16 * 32 * 1024);
        assert!(g.segment_table_offset >= g.session_region_offset + 4 * 32 * 4352);
        assert!(g.segment_pool_offset >= g.segment_table_offset + g.segment_count * 64);
        assert_eq!(g.segment_pool_offset % (2 << 20), 0);
        assert!(g.segment_pool_offset + g.segment_pool_bytes() <= g.pool_bytes);
        assert_eq!(
            g.segment_count, 62,
            "1 GiB less ~19 MiB metadata in 16 MiB segments"
        );
    }

    #[test]
    fn out_of_bounds_parameters_are_refused_with_the_parameter_named() {
        let base = PoolConfig::default();
        let cases = [
            (
                PoolConfig {
                    max_topics: 0,
                    ..base.clone()
                },
                "max_topics",
            ),
            (
                PoolConfig {
                    max_brokers: 33,
                    ..base.clone()
                },
                "max_brokers",
            ),
            (
                PoolConfig {
                    ring_slots: 1000,
                    ..base.clone()
                },
                "ring_slots",
            ),
            (
                PoolConfig {
                    segment_bytes: 1000,
                    ..base.clone()
                },
                "segment_bytes",
            ),
            (
                PoolConfig {
                    pool_bytes: 1 << 20,
                    ..base.clone()
                },
                "no room",
            ),
        ];
        for (cfg, needle) in cases {
            let err = PoolGeometry::compute(&cfg).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn data_ranges_outside_the_segment_pool_or_across_segments_are_refused() {
        let g = PoolGeometry::compute(&PoolConfig::default()).unwrap();
        let s0 = g.segment_offset(0);
        assert_eq!(g.check_data_range(s0, 64), Ok(0));
        assert_eq!(
            g.check_data_range(g.segment_offset(5), g.segment_bytes),
            Ok(5)
        );
        let outside = |r| matches!(r, Err(RangeError::OutsideSegmentPool { .. }));
        assert!(outside(g.check_data_range(0, 64)), "superblock");
        assert!(
            outside(g.check_data_range(g.ring_region_offset, 128)),
            "rings"
        );
        assert!(outside(g.check_data_range(g.pool_bytes, 1)), "past the end");
        assert_eq!(
            g.check_data_range(s0 + g.segment_bytes - 64, 128),
            Err(RangeError::CrossesSegment {
                offset: s0 + g.segment_bytes - 64,
                end: s0 + g.segment_bytes + 64,
                segment: 0
            })
        );
        assert_eq!(
            g.check_data_range(u64::MAX - 10, 64),
            Err(RangeError::Overflow {
                offset: u64::MAX - 10,
                len: 64
            })
        );
    }

    proptest! {
        #[test]
        fn every_computed_geometry_fits_and_regions_never_overlap(
            pool_mib in 8u64..4096, topics in 1u32..64, brokers in 1u32..=32,
            slots_log in 1u32..12, seg_kib_log in 6u32..16,
        ) {
            let cfg = PoolConfig {
                pool_bytes: pool_mib << 20,
                max_topics: topics,
                max_brokers: brokers,
                ring_slots: 1 << slots_log,
                segment_bytes: 1u64 << (seg_kib_log + 10),
            };
            if let Ok(g) = PoolGeometry::compute(&cfg) {
                prop_assert!(g.segment_count > 0);
                let tt_end = g.topic_table_offset + u64::from(topics) * size_of::<TInode>() as u64;
                prop_assert!(tt_end <= g.ring_region_offset);
                prop_assert!(g.ring_offset(topics - 1, brokers - 1)
                    + u64::from(cfg.ring_slots) * 128 <= g.sequencer_region_offset);
                prop_assert!(g.sequencer_state_offset(topics - 1)
                    + size_of::<SequencerState>() as u64 <= g.session_region_offset);
                prop_assert!(g.session_offset(brokers - 1, SESSIONS_PER_BROKER as u32 - 1)
                    + size_of::<Session>() as u64 <= g.doorbell_region_offset);
                prop_assert!(g.doorbell_offset(brokers - 1)
                    + size_of::<BrokerDoorbell>() as u64 <= g.broker_info_region_offset);
                prop_assert!(g.broker_info_offset(brokers - 1)
                    + size_of::<BrokerInfo>() as u64 <= g.segment_table_offset);
                prop_assert!(g.segment_table_offset + g.segment_count * 64 <= g.segment_pool_offset);
                prop_assert!(g.segment_pool_offset + g.segment_pool_bytes() <= cfg.pool_bytes);
                prop_assert_eq!(g.segment_pool_offset % 64, 0);
            }
        }
    }
}
