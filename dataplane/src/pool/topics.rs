//! The topic table: one [`TInode`] per topic, found by an FNV-1a hash of the **full** name
//! with linear probing, so two topics never share a slot silently (the original hashed short
//! names to slot 0) and a full table is an error, not an overwrite.
//!
//! Writer: the control process (one writer role; the compare-and-swap on `state` only keeps two
//! writers on one host from taking the same slot). Readers copy a topic under a sequence lock:
//! `state` (which carries a generation) is read before and after the fields.
//!
//! A deleted topic leaves a tombstone so that probe chains through it stay intact; creation
//! reuses the first tombstone of the chain.

use crate::error::{PoolError, PoolResult};
use crate::pool::coherence::Coherence;
use crate::pool::layout::*;
use crate::pool::Pool;
use crate::sync::Ordering::{AcqRel, Acquire, Relaxed};

const STATE_EMPTY: u64 = 0;
const STATE_CREATING: u64 = 1;
pub(crate) const STATE_ACTIVE: u64 = 2;
const STATE_DELETED: u64 = 3;

/// Highest ORDER level and ACK level a topic can name.
pub const ORDER_MAX: u8 = 5;
pub const ACK_MAX: u8 = 2;

/// A topic's settings as stored in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    pub order: u8,
    pub ack: u8,
    /// Brokers holding each batch, the primary included; 0 means no replication.
    pub replication_factor: u8,
    pub batch_bytes: u64,
}

impl TopicConfig {
    /// Checks the settings against the pool's limits. Fails closed: ACK 2 without
    /// replication is refused rather than quietly served as ACK 1.
    pub fn check(&self, geo: &super::geometry::PoolGeometry) -> PoolResult<()> {
        let err = |m: String| Err(PoolError::TopicConfig(m));
        if self.order > ORDER_MAX {
            return err(format!("ORDER {} is unknown (0..={ORDER_MAX})", self.order));
        }
        if self.order == 3 {
            return err("ORDER 3 (client-assigned tokens) is not supported yet; use ORDER 5 for per-client order".into());
        }
        if self.ack > ACK_MAX {
            return err(format!("ACK {} is unknown (0..={ACK_MAX})", self.ack));
        }
        if self.ack == 2 && self.replication_factor == 0 {
            return err(
                "ACK 2 (durable on every replica) needs a replication factor of at least 1".into(),
            );
        }
        if u32::from(self.replication_factor) > geo.max_brokers {
            return err(format!(
                "replication factor {} exceeds the pool's {} brokers",
                self.replication_factor, geo.max_brokers
            ));
        }
        let min = message_stride(0);
        if self.batch_bytes < min || self.batch_bytes > geo.segment_bytes {
            return err(format!(
                "batch size {} must be in {min}..={} (one segment)",
                self.batch_bytes, geo.segment_bytes
            ));
        }
        Ok(())
    }

    fn pack(&self) -> u64 {
        u64::from(self.order) | u64::from(self.ack) << 8 | u64::from(self.replication_factor) << 16
    }

    fn unpack(word: u64, batch_bytes: u64) -> TopicConfig {
        TopicConfig {
            order: word as u8,
            ack: (word >> 8) as u8,
            replication_factor: (word >> 16) as u8,
            batch_bytes,
        }
    }
}

/// A consistent copy of one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub slot: u32,
    pub name: String,
    pub config: TopicConfig,
    /// Raised each time the slot is taken; tells a recreated topic from the old one.
    pub generation: u64,
    pub created_epoch: u64,
}

/// FNV-1a, 64 bit, over every byte of the name.
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Checks a topic name: 1 to [`TOPIC_NAME_MAX_BYTES`] bytes of ASCII letters, digits, `.`,
/// `_` and `-` (the characters Kafka allows).
pub fn check_topic_name(name: &str) -> PoolResult<()> {
    let bad = |why| Err(PoolError::TopicName(name.to_string(), why));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > TOPIC_NAME_MAX_BYTES {
        return bad("it is longer than 192 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

enum Probe {
    Found(u32),
    /// Not present; the slot a create would take (first tombstone, else the empty end of
    /// the chain), or `None` when every slot is taken.
    Absent(Option<(u32, u64)>),
}

impl Pool {
    fn probe<C: Coherence>(&self, c: C, name: &str) -> Probe {
        let n = self.geometry().max_topics;
        let hash = name_hash(name.as_bytes());
        let start = (hash % u64::from(n)) as u32;
        let mut free = None;
        for i in 0..n {
            let slot = (start + i) % n;
            let h = &self.tinode(slot).header;
            let state = c.observe(&h.state);
            match state & 0xff {
                STATE_EMPTY => return Probe::Absent(free.or(Some((slot, state)))),
                STATE_DELETED => {
                    free.get_or_insert((slot, state));
                }
                _ => {
                    if h.name_hash.load(Relaxed) == hash
                        && self.read_topic(c, slot).is_some_and(|t| t.name == name)
                    {
                        return Probe::Found(slot);
                    }
                }
            }
        }
        Probe::Absent(free)
    }

    /// Creates a topic and returns its slot.
    pub fn create_topic<C: Coherence>(
        &self,
        c: C,
        name: &str,
        cfg: &TopicConfig,
    ) -> PoolResult<u32> {
        self.create_topic_with(c, name, cfg, |_| {})
    }

    /// As [`create_topic`](Self::create_topic), with the topic's placement table written
    /// before the topic turns active (no process sees it without its exclusions).
    #[cfg(not(loom))]
    pub fn create_topic_placed<C: Coherence>(
        &self,
        c: C,
        name: &str,
        cfg: &TopicConfig,
        placement: &crate::replication::placement::Placement,
    ) -> PoolResult<u32> {
        self.create_topic_with(c, name, cfg, |slot| {
            if !placement.exclusions().is_empty() {
                placement.write(c, &self.tinode(slot).placement);
            }
        })
    }

    /// Creates the topic; `before_active` runs once its regions are reset, before it turns
    /// active.
    fn create_topic_with<C: Coherence>(
        &self,
        c: C,
        name: &str,
        cfg: &TopicConfig,
        before_active: impl FnOnce(u32),
    ) -> PoolResult<u32> {
        check_topic_name(name)?;
        cfg.check(self.geometry())?;
        let (slot, seen) = match self.probe(c, name) {
            Probe::Found(_) => return Err(PoolError::TopicExists(name.to_string())),
            Probe::Absent(None) => {
                return Err(PoolError::TopicTableFull(self.geometry().max_topics))
            }
            Probe::Absent(Some(free)) => free,
        };
        let h = &self.tinode(slot).header;
        let generation = (seen >> 8) + 1;
        if h.state
            .compare_exchange(seen, generation << 8 | STATE_CREATING, AcqRel, Acquire)
            .is_err()
        {
            return Err(PoolError::TopicConfig(format!(
                "topic slot {slot} was taken concurrently; the topic table has one writer, the control process"
            )));
        }
        h.name_hash.store(name_hash(name.as_bytes()), Relaxed);
        h.name_len.store(name.len() as u64, Relaxed);
        h.config.store(cfg.pack(), Relaxed);
        h.batch_bytes.store(cfg.batch_bytes, Relaxed);
        h.created_epoch.store(self.epoch(), Relaxed);
        let mut padded = [0u8; TOPIC_NAME_MAX_BYTES];
        padded[..name.len()].copy_from_slice(name.as_bytes());
        for (word, chunk) in h.name.iter().zip(padded.chunks_exact(8)) {
            word.store(
                u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")),
                Relaxed,
            );
        }
        c.writeback(h);
        self.reset_topic_regions(c, slot);
        before_active(slot);
        c.publish(&h.state, generation << 8 | STATE_ACTIVE);
        Ok(slot)
    }

    /// Zeroes what a topic slot's previous tenant left: per-broker regions, ring slots and the
    /// sequencer state (a reused slot starts like a fresh one). Runs before the slot turns
    /// active; brokers and sequencers of the previous tenant drop it when they see the
    /// generation change.
    fn reset_topic_regions<C: Coherence>(&self, c: C, slot: u32) {
        let t = self.tinode(slot);
        for (b, e) in t.brokers.iter().enumerate() {
            let r = &e.broker;
            for w in [
                &r.log_offset,
                &r.written,
                &r.written_addr,
                &r.reclaimed_below,
            ] {
                w.store(0, Relaxed);
            }
            e.replication.durable_delivery.store(0, Relaxed);
            e.replication.durable_total_order.store(0, Relaxed);
            e.replication.placement_seen.store(0, Relaxed);
            for w in &e.replication.replication_done {
                w.store(0, Relaxed);
            }
            let s = &e.sequencer;
            for w in [&s.ordered, &s.ordered_offset, &s.ring_consumed] {
                w.store(0, Relaxed);
            }
            c.writeback(e);
            if let Ok(ring) = self.ring_slots(slot, b as u32) {
                for h in ring {
                    h.ready.store(0, Relaxed);
                    h.ordered.store(0, Relaxed);
                }
                // SAFETY: the ring lies inside the mapping (`ring_slots` checked it).
                unsafe { c.writeback_range(ring.as_ptr().cast(), std::mem::size_of_val(ring)) };
            }
        }
        let p = &t.placement;
        p.count.store(0, Relaxed);
        for e in &p.exclusions {
            for w in e {
                w.store(0, Relaxed);
            }
        }
        c.writeback(p);
        let st = self.sequencer_state(slot);
        for w in [
            &st.next_global,
            &st.duplicates,
            &st.fences,
            &st.next_delivery,
            &st.delivered,
        ] {
            w.store(0, Relaxed);
        }
        for e in &st.clients {
            e.client_key.store(0, Relaxed);
        }
        for e in &st.subscribers {
            let s = e.state.load(Relaxed);
            e.state.store(s & !0xff, Relaxed);
        }
        for e in &st.delivery {
            e.stamp.store(0, Relaxed);
        }
        c.writeback(st);
    }

    /// Finds a topic by its full name.
    pub fn find_topic<C: Coherence>(&self, c: C, name: &str) -> PoolResult<u32> {
        match self.probe(c, name) {
            Probe::Found(slot) => Ok(slot),
            Probe::Absent(_) => Err(PoolError::UnknownTopic(name.to_string())),
        }
    }

    /// Deletes a topic; its slot becomes a tombstone.
    pub fn delete_topic<C: Coherence>(&self, c: C, name: &str) -> PoolResult<()> {
        let slot = self.find_topic(c, name)?;
        let h = &self.tinode(slot).header;
        let state = c.observe(&h.state);
        c.publish(&h.state, (state & !0xff) | STATE_DELETED);
        Ok(())
    }

    /// A consistent copy of the topic in `slot`, if one is active there. Every field is
    /// checked, since another process wrote it.
    pub fn read_topic<C: Coherence>(&self, c: C, slot: u32) -> Option<TopicInfo> {
        let h = &self.tinode(slot).header;
        loop {
            c.invalidate(h);
            let before = c.observe(&h.state);
            if before & 0xff != STATE_ACTIVE {
                return None;
            }
            let len = (h.name_len.load(Relaxed) as usize).min(TOPIC_NAME_MAX_BYTES);
            let mut bytes = [0u8; TOPIC_NAME_MAX_BYTES];
            for (chunk, word) in bytes.chunks_exact_mut(8).zip(h.name.iter()) {
                chunk.copy_from_slice(&word.load(Relaxed).to_le_bytes());
            }
            let config = TopicConfig::unpack(h.config.load(Relaxed), h.batch_bytes.load(Relaxed));
            let created_epoch = h.created_epoch.load(Relaxed);
            if c.observe(&h.state) != before {
                std::hint::spin_loop();
                continue;
            }
            let name = std::str::from_utf8(&bytes[..len]).ok()?.to_string();
            return Some(TopicInfo {
                slot,
                name,
                config,
                generation: before >> 8,
                created_epoch,
            });
        }
    }

    /// Every active topic, by slot.
    pub fn list_topics<C: Coherence>(&self, c: C) -> Vec<TopicInfo> {
        (0..self.geometry().max_topics)
            .filter_map(|slot| self.read_topic(c, slot))
            .collect()
    }
}
