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
//!
//! **The control process's own absence does not count against brokers.** Silence is measured
//! on an *awake clock* that advances with real time while this process runs, but by at most
//! one heartbeat interval per step: a control process frozen (SIGSTOP), descheduled or
//! starved for 10 s finds, when it resumes, that its brokers have been silent for about one
//! interval, not ten, and declares nobody dead for its own pause. A restarted control process
//! Time while it turns requests away because it is overloaded does not count either
//! ([`stall`](Membership::stall)): the heartbeats it refused are its own failure. A restarted
//! control process
//! [`restore`](Membership::restore)s the brokers that were live (from its durable state) with
//! a fresh window: those that heartbeat within `miss_limit` intervals keep their ids and
//! slots. A live broker the control process does not know (its state was lost or older) may
//! [`rejoin`](Membership::rejoin) with its id and slot, unless the slot went to another broker.

use std::collections::BTreeMap;

/// The registration address that says whether a broker runs the sequencer.
pub const SEQUENCER: &str = "sequencer";
/// It always runs it (`embar broker --sequencer`).
pub const SEQUENCER_PINNED: &str = "pinned";
/// It runs it when the control process assigns it (the default).
pub const SEQUENCER_CANDIDATE: &str = "candidate";
/// The registration address that says how long the broker serves on without reaching the
/// control process (milliseconds): its slot is not given to another broker before that has
/// passed since its last heartbeat, unless its process is known to be gone.
pub const GRACE_MS: &str = "grace_ms";

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
    #[error("broker {id} cannot rejoin slot {slot}: {why}")]
    Rejoin {
        id: u32,
        slot: u32,
        why: &'static str,
    },
}

/// A live broker as kept in the control process's durable state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DurableMember {
    pub id: u32,
    pub slot: u32,
    pub addresses: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Member {
    slot: u32,
    addresses: BTreeMap<String, String>,
    last_heartbeat_ns: u64,
    alive: bool,
}

impl Member {
    /// Whether the broker may still be serving without hearing from the control process.
    fn within_grace(&self, now_ns: u64) -> bool {
        let grace_ns = self
            .addresses
            .get(GRACE_MS)
            .and_then(|g| g.parse::<u64>().ok())
            .map_or(0, |ms| ms.saturating_mul(1_000_000));
        now_ns.saturating_sub(self.last_heartbeat_ns) <= grace_ns
    }
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
    /// The awake clock (see the module docs) and the real time it last advanced at.
    awake_ns: u64,
    last_real_ns: Option<u64>,
    /// Real time up to which the control process counts as stalled (see [`Membership::stall`]).
    stalled_until_ns: u64,
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
            awake_ns: 0,
            last_real_ns: None,
            stalled_until_ns: 0,
        }
    }

    /// Takes back the brokers that were live when the state was saved (a restarted control
    /// process): each is live with a fresh window of `miss_limit` intervals from `now_ns`.
    pub fn restore(&mut self, members: &[DurableMember], now_ns: u64) {
        let now = self.advance(now_ns);
        for m in members {
            if m.slot >= self.max_brokers || m.id >= self.next_id {
                log::warn!(
                    "ignoring saved broker {} in slot {}: outside this pool or never handed out",
                    m.id,
                    m.slot
                );
                continue;
            }
            self.members.insert(
                m.id,
                Member {
                    slot: m.slot,
                    addresses: m.addresses.clone(),
                    last_heartbeat_ns: now,
                    alive: true,
                },
            );
        }
        self.version += 1;
    }

    /// The live brokers, to be saved durably.
    pub fn durable(&self) -> Vec<DurableMember> {
        self.members
            .iter()
            .filter(|(_, m)| m.alive)
            .map(|(id, m)| DurableMember {
                id: *id,
                slot: m.slot,
                addresses: m.addresses.clone(),
            })
            .collect()
    }

    /// The control process turned a request away (overloaded): time up to `now_ns` does not
    /// count as silence of the brokers, whose heartbeats it may have refused.
    /// A broker retries a refused heartbeat within one interval, so the interval after a
    /// refusal does not count either.
    pub fn stall(&mut self, now_ns: u64) {
        self.advance(now_ns);
        self.stalled_until_ns = self.stalled_until_ns.max(now_ns + self.interval_ns);
    }

    /// Moves the awake clock to real time `now_ns`, by at most one heartbeat interval, not
    /// counting time the control process was stalled.
    fn advance(&mut self, now_ns: u64) -> u64 {
        let step = self.last_real_ns.map_or(0, |last| {
            now_ns
                .saturating_sub(last.max(self.stalled_until_ns))
                .min(self.interval_ns)
        });
        self.last_real_ns = Some(now_ns.max(self.last_real_ns.unwrap_or(0)));
        self.awake_ns += step;
        self.awake_ns
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The first id never handed out (to be stored durably).
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Registers a broker; returns `(id, slot)`. `gone` says whether a dead broker's process
    /// is known to have exited (the server checks a process on its own host): until then, or
    /// until the grace the broker registered has passed since its last heartbeat, its slot is
    /// not given to another broker, which would write into the same pool regions.
    pub fn register(
        &mut self,
        addresses: BTreeMap<String, String>,
        now_ns: u64,
        gone: &dyn Fn(&BTreeMap<String, String>) -> bool,
    ) -> Result<(u32, u32), MembershipError> {
        let now_ns = self.advance(now_ns);
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
            .filter(|m| m.alive || (!gone(&m.addresses) && m.within_grace(now_ns)))
            .map(|m| m.slot)
            .collect();
        let slot = preferred
            .filter(|s| !held.contains(s))
            .or_else(|| (0..self.max_brokers).find(|s| !held.contains(s)))
            .ok_or(MembershipError::NoSlots(self.max_brokers))?;
        self.next_id = next_id;
        self.admit(id, slot, addresses, now_ns);
        Ok((id, slot))
    }

    /// A live broker this process does not know (its state was lost, or is older than the
    /// broker's registration) takes back its id and slot. Refused when the id was never
    /// handed out, the broker is known dead, or the slot is held by another live broker.
    pub fn rejoin(
        &mut self,
        id: u32,
        slot: u32,
        addresses: BTreeMap<String, String>,
        now_ns: u64,
    ) -> Result<(), MembershipError> {
        let now_ns = self.advance(now_ns);
        let refuse = |why| Err(MembershipError::Rejoin { id, slot, why });
        if id >= self.next_id {
            return refuse("that id was never handed out");
        }
        if slot >= self.max_brokers {
            return refuse("the pool has no such slot");
        }
        match self.members.get(&id) {
            Some(m) if !m.alive => return Err(MembershipError::Dead(id)),
            Some(m) if m.slot != slot => return refuse("the id holds another slot"),
            Some(_) => {}
            None => {
                if self.members.values().any(|m| m.alive && m.slot == slot) {
                    return refuse("another live broker holds the slot");
                }
            }
        }
        self.admit(id, slot, addresses, now_ns);
        Ok(())
    }

    /// Makes broker `id` a live member in `slot`, heard from at `now_ns` (awake clock).
    fn admit(&mut self, id: u32, slot: u32, addresses: BTreeMap<String, String>, now_ns: u64) {
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
    }

    /// Forgets a registration that could not be made durable (nobody heard of its id).
    pub fn forget(&mut self, id: u32) {
        if self.members.remove(&id).is_some() {
            self.version += 1;
        }
    }

    pub fn heartbeat(&mut self, id: u32, now_ns: u64) -> Result<(), MembershipError> {
        let now_ns = self.advance(now_ns);
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
        let now_ns = self.advance(now_ns);
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

    /// The slots held by live brokers.
    pub fn live_slots(&self) -> std::collections::BTreeSet<u32> {
        self.members
            .values()
            .filter(|m| m.alive)
            .map(|m| m.slot)
            .collect()
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

    /// The brokers; silence is reported on the awake clock (see the module docs).
    pub fn brokers(&self, now_ns: u64) -> Vec<BrokerInfo> {
        let pause = self
            .last_real_ns
            .map_or(0, |last| now_ns.saturating_sub(last).min(self.interval_ns));
        let now_ns = self.awake_ns + pause;
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
        let (a, _) = m.register(addr(1), 0, &|_| true).unwrap();
        let (b, b_slot) = m.register(addr(2), 0, &|_| true).unwrap();
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
        let (again, slot) = m.register(addr(2), 4 * S, &|_| true).unwrap();
        assert_eq!(again, 2, "a new id, never a used one");
        assert_eq!(
            slot, b_slot,
            "the same broker takes its slot (its log) back"
        );
    }

    #[test]
    fn registering_again_with_the_same_addresses_supersedes_the_old_session() {
        let mut m = Membership::new(0, 8, S, 3);
        let (old, old_slot) = m.register(addr(0), 0, &|_| true).unwrap();
        let (other, _) = m.register(addr(9), 0, &|_| true).unwrap();
        let (new, new_slot) = m.register(addr(0), S, &|_| true).unwrap();
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
        let (none, _) = m.register(addr(0), 0, &|_| true).unwrap();
        assert_eq!(
            m.sequencer(),
            None,
            "a broker that is no candidate never gets it"
        );
        let (a, _) = m
            .register(seq(SEQUENCER_CANDIDATE, 1), 0, &|_| true)
            .unwrap();
        let (b, _) = m
            .register(seq(SEQUENCER_CANDIDATE, 2), 0, &|_| true)
            .unwrap();
        assert_eq!(m.sequencer(), Some(a));
        // `a` stops heartbeating: dead after 3 intervals, and `b` takes over.
        for t in 1..=3 {
            m.heartbeat(b, t * S).unwrap();
            m.heartbeat(none, t * S).unwrap();
        }
        m.tick(3 * S + 1);
        assert_eq!(m.sequencer(), Some(b));
        // A newcomer does not take it from `b`; a restarted `a` comes back with a new id.
        let (c, _) = m
            .register(seq(SEQUENCER_CANDIDATE, 1), 4 * S, &|_| true)
            .unwrap();
        assert!(c > b);
        assert_eq!(m.sequencer(), Some(b));
        // A pinned broker wins over every candidate.
        let (p, _) = m
            .register(seq(SEQUENCER_PINNED, 9), 4 * S, &|_| true)
            .unwrap();
        assert_eq!(m.sequencer(), Some(p));
    }

    #[test]
    fn ids_never_repeat_and_slots_are_reused_only_from_dead_brokers() {
        let mut m = Membership::new(6, 2, S, 3);
        assert_eq!(m.register(addr(1), 0, &|_| true), Ok((6, 0)));
        assert_eq!(m.register(addr(2), 0, &|_| true), Ok((7, 1)));
        assert_eq!(
            m.register(addr(3), 0, &|_| true),
            Err(MembershipError::NoSlots(2))
        );
        assert_eq!(m.next_id(), 8, "a refused registration uses no id");
        for t in 1..=4 {
            m.heartbeat(7, t * S).unwrap();
        }
        m.tick(4 * S);
        assert_eq!(
            m.register(addr(3), 4 * S, &|_| true),
            Ok((8, 0)),
            "broker 6 died; its slot is free"
        );
    }

    #[test]
    fn a_pause_of_the_control_process_counts_as_one_interval_not_its_length() {
        let mut m = Membership::new(0, 8, S, 3);
        let (a, _) = m.register(addr(1), 0, &|_| true).unwrap();
        m.tick(S / 2);
        // Frozen for 10 s: the first thing it does when resumed is tick.
        assert!(
            m.tick(10 * S).is_empty(),
            "nobody dies for the control's pause"
        );
        assert!(m.brokers(10 * S)[0].last_heartbeat_ms_ago <= 1_500);
        m.heartbeat(a, 10 * S + S / 2).unwrap();
        // A broker that really stops is still found dead, 3 intervals of running later.
        for t in 11..=13 {
            assert!(m.tick(t * S).is_empty(), "silent {} s", t as f64 - 10.5);
        }
        assert_eq!(m.tick(13 * S + S / 2 + 1), vec![a]);
    }

    #[test]
    fn a_restarted_control_keeps_the_brokers_that_heartbeat_within_the_window() {
        let mut before = Membership::new(0, 8, S, 3);
        let (a, a_slot) = before.register(addr(1), 0, &|_| true).unwrap();
        let (b, _) = before.register(addr(2), 0, &|_| true).unwrap();
        let saved = before.durable();
        let mut m = Membership::new(before.next_id(), 8, S, 3);
        m.restore(&saved, 100 * S);
        assert_eq!(m.live_count(), 2);
        for t in 101..=103 {
            m.heartbeat(a, t * S).unwrap();
            m.tick(t * S);
        }
        assert_eq!(m.tick(103 * S + 1), vec![b], "b never came back");
        assert_eq!(m.brokers(103 * S)[0].slot, a_slot);
        let (c, c_slot) = m.register(addr(3), 104 * S, &|_| true).unwrap();
        assert!(c > b, "ids are not handed out twice");
        assert_ne!(c_slot, a_slot);
    }

    #[test]
    fn a_broker_unknown_to_the_control_rejoins_its_slot_unless_it_was_taken() {
        let mut m = Membership::new(5, 4, S, 3);
        m.rejoin(2, 1, addr(1), 0).unwrap();
        assert_eq!(m.heartbeat(2, S), Ok(()));
        assert_eq!(m.live_count(), 1);
        assert!(matches!(
            m.rejoin(3, 1, addr(2), S),
            Err(MembershipError::Rejoin { .. })
        ));
        assert!(
            matches!(
                m.rejoin(7, 2, addr(2), S),
                Err(MembershipError::Rejoin { .. })
            ),
            "id 7 was never handed out"
        );
        let (n, slot) = m.register(addr(3), S, &|_| true).unwrap();
        assert_eq!(
            (n, slot),
            (5, 0),
            "a new broker takes a free slot, not the rejoined one"
        );
        // A broker declared dead stays dead.
        for t in 2..=5 {
            m.heartbeat(n, t * S).unwrap();
            m.tick(t * S);
        }
        assert_eq!(
            m.rejoin(2, 1, addr(1), 5 * S),
            Err(MembershipError::Dead(2))
        );
    }

    #[test]
    fn a_dead_brokers_slot_waits_for_its_grace_unless_its_process_is_gone() {
        let mut m = Membership::new(0, 2, S, 3);
        let mut with_grace = addr(1);
        with_grace.insert(GRACE_MS.into(), "10000".into());
        let (a, a_slot) = m.register(with_grace, 0, &|_| true).unwrap();
        let (b, _) = m.register(addr(2), 0, &|_| true).unwrap();
        for t in 1..=4 {
            m.heartbeat(b, t * S).unwrap();
            m.tick(t * S);
        }
        assert_eq!(m.heartbeat(a, 4 * S), Err(MembershipError::Dead(a)));
        let running = |_: &BTreeMap<String, String>| false;
        assert_eq!(
            m.register(addr(3), 4 * S, &running),
            Err(MembershipError::NoSlots(2)),
            "a may still be serving in its slot"
        );
        assert_eq!(m.register(addr(3), 4 * S, &|_| true), Ok((2, a_slot)));
        let mut m2 = Membership::new(0, 1, S, 3);
        let mut g = addr(1);
        g.insert(GRACE_MS.into(), "5000".into());
        m2.register(g, 0, &running).unwrap();
        for t in 1..=6 {
            m2.tick(t * S);
        }
        assert_eq!(
            m2.register(addr(2), 6 * S, &running).map(|r| r.1),
            Ok(0),
            "past the grace"
        );
    }

    #[test]
    fn time_the_control_spends_refusing_requests_is_not_silence() {
        let mut m = Membership::new(0, 8, S, 3);
        let (a, _) = m.register(addr(1), 0, &|_| true).unwrap();
        // Overloaded from 1 s to 11 s: it refuses a heartbeat every second, ticks every 250 ms.
        for t in 4..=44 {
            if t % 4 == 0 {
                m.stall(t * S / 4);
            }
            assert!(m.tick(t * S / 4).is_empty(), "at {} ms", t * 250);
        }
        m.heartbeat(a, 11 * S + 1).unwrap();
        assert_eq!(m.live_count(), 1);
        // Once it serves again, silence counts as before.
        for t in 12..=14 {
            assert!(m.tick(t * S).is_empty());
        }
        assert!(
            m.tick(15 * S).is_empty(),
            "the last refusal stalled it up to 12 s"
        );
        assert_eq!(m.tick(15 * S + 1), vec![a]);
    }
}
