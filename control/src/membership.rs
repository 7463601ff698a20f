//! Broker membership as a sans-IO state machine: the server feeds it registrations,
//! heartbeats and the time; it decides ids and liveness.
//!
//! A broker registers (gets a new id, never one handed out before, even across restarts of the
//! control process) and heartbeats every interval; after `miss_limit` missed intervals it is
//! dead. A dead broker's heartbeat is refused: it must register again (and gets a new id).
//! Every change raises `version`, which clients long-poll on.

use std::collections::BTreeMap;

/// One registered broker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BrokerInfo {
    pub id: u32,
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
    #[error("broker ids are exhausted ({0} in the pool)")]
    NoIds(u32),
}

#[derive(Debug)]
struct Member {
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

    pub fn register(
        &mut self,
        addresses: BTreeMap<String, String>,
        now_ns: u64,
    ) -> Result<u32, MembershipError> {
        if self.next_id >= self.max_brokers {
            return Err(MembershipError::NoIds(self.max_brokers));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.members.insert(
            id,
            Member {
                addresses,
                last_heartbeat_ns: now_ns,
                alive: true,
            },
        );
        self.version += 1;
        Ok(id)
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

    pub fn brokers(&self, now_ns: u64) -> Vec<BrokerInfo> {
        self.members
            .iter()
            .map(|(id, m)| BrokerInfo {
                id: *id,
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

    fn addrs() -> BTreeMap<String, String> {
        [("shm".to_string(), "/dev/shm/p".to_string())].into()
    }

    #[test]
    fn a_broker_that_misses_three_heartbeats_is_dead_and_must_register_again() {
        let mut m = Membership::new(0, 8, S, 3);
        let a = m.register(addrs(), 0).unwrap();
        let b = m.register(addrs(), 0).unwrap();
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
        let again = m.register(addrs(), 4 * S).unwrap();
        assert_eq!(again, 2, "a new id, never a used one");
    }

    #[test]
    fn ids_continue_after_a_restart_and_run_out_clearly() {
        let mut m = Membership::new(6, 8, S, 3);
        assert_eq!(m.register(addrs(), 0), Ok(6));
        assert_eq!(m.register(addrs(), 0), Ok(7));
        assert_eq!(m.register(addrs(), 0), Err(MembershipError::NoIds(8)));
        assert_eq!(m.next_id(), 8);
    }
}
