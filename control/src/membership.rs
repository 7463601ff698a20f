//! Broker membership as a sans-IO state machine: the server feeds it registrations,
//! heartbeats and the time; it decides ids and liveness.
//!
//! A broker registers and heartbeats every interval. It gets a new **id**, never one handed
//! out before (even across restarts of the control process), and a pool **slot**: the index
//! of its per-broker regions in the pool (rings, offsets), below the pool's `max_brokers`. A
//! slot is held by one live broker at a time; a dead broker's slot goes to a later registrant
//! (the one with the same addresses first), which takes over that broker's log; after `miss_limit` missed intervals it is
//! dead. A dead broker's heartbeat is refused: it must register again (and gets a new id).
//! A registration that names the same addresses as a live broker (a broker process restarted
//! before its old session timed out) supersedes it: the old id is dead at once.
//! Every change raises `version`, which clients long-poll on.

use std::collections::BTreeMap;

/// The registration address that says whether a broker runs the sequencer.
pub const SEQUENCER: &str = "sequencer";
/// It always runs it (`embar broker --sequencer`).
pub const SEQUENCER_PINNED: &str = "pinned";
/// It runs it when the control process assigns it (the default).
pub const SEQUENCER_CANDIDATE: &str = "candidate";

/// One registered broker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BrokerInfo {
    pub id: u32,
    /// Index of its regions in the pool.
    pub slot: u32,
    /// Data-plane addresses per transport (`shm`: pool path, `tcp`: host:port, ...).
    pub addresses: BTreeMap<String, String>,
    pub alive: bool,
    /// Milliseconds since its last heartbeat, at the time of the query.
    pub last_heartbeat_ms_ago: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("broker {0} is not registered")]
    Unknown(u32),
    #[error("broker {0} was declared dead; it must register again")]
    Dead(u32),
    #[error("all {0} broker slots of the pool are held by live brokers")]
    NoSlots(u32),
    #[error("broker ids are exhausted")]
    NoIds,
}

#[derive(Debug)]
struct Member {
    slot: u32,
    addresses: BTreeMap<String, String>,
    last_heartbeat_ns: u64,
    alive: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct Membership {
    members: BTreeMap<u32, Member>,
    next_id: u32,
    max_brokers: u32,
    interval_ns: u64,
    miss_limit: u32,
    version: u64,
}

impl Membership {
    /// `next_id`: the first id never handed out (from durable state). Ids index the pool's
    /// per-broker regions, so they stay below `max_brokers`.
    pub fn new(next_id: u32, max_brokers: u32, interval_ns: u64, miss_limit: u32) -> Membership {
        Membership {
            members: BTreeMap::new(),
            next_id,
            max_brokers,
            interval_ns,
            miss_limit,
            version: 1,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The first id never handed out (to be stored durably).
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Registers a broker; returns `(id, slot)`.
    pub fn register(
        &mut self,
        addresses: BTreeMap<String, String>,
        now_ns: u64,
    ) -> Result<(u32, u32), MembershipError> {
        let id = self.next_id;
        let next_id = id.checked_add(1).ok_or(MembershipError::NoIds)?;
        // The newest session with the same addresses (a restarted broker) gives up its slot.
        let previous = self
            .members
            .values_mut()
            .rev()
            .find(|m| !addresses.is_empty() && m.addresses == addresses);
        let preferred = previous.map(|m| {
            m.alive = false;
            m.slot
        });
        let held: Vec<u32> = self
            .members
            .values()
            .filter(|m| m.alive)
            .map(|m| m.slot)
            .collect();
        let slot = preferred
            .filter(|s| !held.contains(s))
            .or_else(|| (0..self.max_brokers).find(|s| !held.contains(s)))
            .ok_or(MembershipError::NoSlots(self.max_brokers))?;
        self.next_id = next_id;
        self.members.insert(
            id,
            Member {
                slot,
                addresses,
                last_heartbeat_ns: now_ns,
                alive: true,
            },
        );
        self.version += 1;
        Ok((id, slot))
    }

    pub fn heartbeat(&mut self, id: u32, now_ns: u64) -> Result<(), MembershipError> {
        let m = self
            .members
            .get_mut(&id)
            .ok_or(MembershipError::Unknown(id))?;
        if !m.alive {
            return Err(MembershipError::Dead(id));
        }
        m.last_heartbeat_ns = now_ns;
        Ok(())
    }

    /// Marks brokers dead whose last heartbeat is more than `miss_limit` intervals old;
    /// returns them.
    pub fn tick(&mut self, now_ns: u64) -> Vec<u32> {
        let limit = self.interval_ns * u64::from(self.miss_limit);
        let mut died = Vec::new();
        for (id, m) in &mut self.members {
            if m.alive && now_ns.saturating_sub(m.last_heartbeat_ns) > limit {
                m.alive = false;
                died.push(*id);
            }
        }
        if !died.is_empty() {
            self.version += 1;
        }
        died
    }

    pub fn live_count(&self) -> u32 {
        self.members.values().filter(|m| m.alive).count() as u32
    }

    /// The broker that runs the sequencer of every topic: the live broker that pinned it
    /// (address `sequencer = pinned`, `embar broker --sequencer`; the lowest id if several
    /// did), else the live candidate (`sequencer = candidate`) with the lowest id. Ids only
    /// grow, so the lowest live id is the longest-serving broker: the choice moves only when
    /// that broker dies, never to a newcomer.
    pub fn sequencer(&self) -> Option<u32> {
        let with = |mode: &str| {
            self.members
                .iter()
                .find(|(_, m)| {
                    m.alive && m.addresses.get(SEQUENCER).map(String::as_str) == Some(mode)
                })
                .map(|(id, _)| *id)
        };
        with(SEQUENCER_PINNED).or_else(|| with(SEQUENCER_CANDIDATE))
    }

    pub fn brokers(&self, now_ns: u64) -> Vec<BrokerInfo> {
        self.members
            .iter()
            .map(|(id, m)| BrokerInfo {
                id: *id,
                slot: m.slot,
                addresses: m.addresses.clone(),
                alive: m.alive,
                last_heartbeat_ms_ago: now_ns.saturating_sub(m.last_heartbeat_ns) / 1_000_000,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn addr(n: u32) -> BTreeMap<String, String> {
        [("tcp".to_string(), format!("10.0.0.{n}:9000"))].into()
    }

    #[test]
    fn a_broker_that_misses_three_heartbeats_is_dead_and_must_register_again() {
        let mut m = Membership::new(0, 8, S, 3);
        let (a, _) = m.register(addr(1), 0).unwrap();
        let (b, b_slot) = m.register(addr(2), 0).unwrap();
        assert_eq!((a, b), (0, 1));
        let v = m.version();
        for t in 1..=3 {
            m.heartbeat(a, t * S).unwrap();
            assert!(m.tick(t * S).is_empty(), "b is within 3 intervals at {t} s");
        }
        assert_eq!(m.tick(3 * S + 1), vec![b]);
        assert!(m.version() > v);
        assert_eq!(m.live_count(), 1);
        assert_eq!(m.heartbeat(b, 4 * S), Err(MembershipError::Dead(b)));
        assert_eq!(m.heartbeat(9, 4 * S), Err(MembershipError::Unknown(9)));
        let (again, slot) = m.register(addr(2), 4 * S).unwrap();
        assert_eq!(again, 2, "a new id, never a used one");
        assert_eq!(
            slot, b_slot,
            "the same broker takes its slot (its log) back"
        );
    }

    #[test]
    fn registering_again_with_the_same_addresses_supersedes_the_old_session() {
        let mut m = Membership::new(0, 8, S, 3);
        let (old, old_slot) = m.register(addr(0), 0).unwrap();
        let (other, _) = m.register(addr(9), 0).unwrap();
        let (new, new_slot) = m.register(addr(0), S).unwrap();
        assert_eq!(m.heartbeat(old, S), Err(MembershipError::Dead(old)));
        assert_eq!(m.heartbeat(other, S), Ok(()));
        assert_eq!(m.heartbeat(new, S), Ok(()));
        assert_eq!(new_slot, old_slot);
        assert_eq!(m.live_count(), 2);
    }

    fn seq(mode: &str, n: u32) -> BTreeMap<String, String> {
        let mut a = addr(n);
        a.insert(SEQUENCER.into(), mode.into());
        a
    }

    #[test]
    fn the_sequencer_goes_to_the_oldest_live_candidate_and_moves_only_when_it_dies() {
        let mut m = Membership::new(0, 8, S, 3);
        assert_eq!(m.sequencer(), None);
        let (none, _) = m.register(addr(0), 0).unwrap();
        assert_eq!(
            m.sequencer(),
            None,
            "a broker that is no candidate never gets it"
        );
        let (a, _) = m.register(seq(SEQUENCER_CANDIDATE, 1), 0).unwrap();
        let (b, _) = m.register(seq(SEQUENCER_CANDIDATE, 2), 0).unwrap();
        assert_eq!(m.sequencer(), Some(a));
        // `a` stops heartbeating: dead after 3 intervals, and `b` takes over.
        for t in 1..=3 {
            m.heartbeat(b, t * S).unwrap();
            m.heartbeat(none, t * S).unwrap();
        }
        m.tick(3 * S + 1);
        assert_eq!(m.sequencer(), Some(b));
        // A newcomer does not take it from `b`; a restarted `a` comes back with a new id.
        let (c, _) = m.register(seq(SEQUENCER_CANDIDATE, 1), 4 * S).unwrap();
        assert!(c > b);
        assert_eq!(m.sequencer(), Some(b));
        // A pinned broker wins over every candidate.
        let (p, _) = m.register(seq(SEQUENCER_PINNED, 9), 4 * S).unwrap();
        assert_eq!(m.sequencer(), Some(p));
    }

    #[test]
    fn ids_never_repeat_and_slots_are_reused_only_from_dead_brokers() {
        let mut m = Membership::new(6, 2, S, 3);
        assert_eq!(m.register(addr(1), 0), Ok((6, 0)));
        assert_eq!(m.register(addr(2), 0), Ok((7, 1)));
        assert_eq!(m.register(addr(3), 0), Err(MembershipError::NoSlots(2)));
        assert_eq!(m.next_id(), 8, "a refused registration uses no id");
        m.heartbeat(7, 4 * S).unwrap();
        m.tick(4 * S);
        assert_eq!(
            m.register(addr(3), 4 * S),
            Ok((8, 0)),
            "broker 6 died; its slot is free"
        );
    }
}
