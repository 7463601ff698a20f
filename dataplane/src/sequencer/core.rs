//! The sequencer's state machine, with no threads, clocks or pool access: the driver feeds it
//! [`Landed`] events and the time, and carries out the [`Action`]s it returns. Tests drive it
//! step by step (`sequencer::core::tests`, property tests against a reference model).
//!
//! ORDER 5 (and 4, which only adds a per-message stamp done by the driver): each client has
//! `next_expected_batch_seq`, starting at 0.
//! - `batch_seq == expected`: the batch gets `[global, global + num_msg)`; then every held
//!   batch of that client that is now next is released, in sequence.
//! - `batch_seq > expected`: held, in a buffer bounded per client and in total. A client whose
//!   gap stays open past the hold timeout, or whose holds exceed a bound, is **fenced**: its
//!   held batches are dropped and reported, and so is everything it sends later. A gap is never
//!   skipped silently.
//! - `batch_seq < expected` (or equal to a held one): a duplicate (a resend), dropped.
//!
//! ORDER 2 orders batches as they arrive; ORDER 1 gives each broker's batches a dense
//! per-broker message sequence. ORDER 0 promises nothing across brokers; batches still get
//! delivery positions in arrival order (the ORDER 2 path), so that subscribers can read them
//! from the same delivery ring.
//! ORDER 3 (client-assigned tokens) is not built: [`OrderLevel::from_level`] refuses it.
//!
//! The client table is bounded ([`Limits::clients_max`]). A client that arrives when it is
//! full is not tracked: its batch is dropped with [`DropReason::ClientTableFull`] (no fence,
//! no entry). Entries of clients whose sessions ended are reclaimed in two steps, so that a
//! client is forgotten only once none of its batches can still be in a ring:
//! [`SequencerCore::reclaim_propose`] names the clients with no live session that hold
//! nothing, together with each ring's written count read *after* the liveness; once the
//! sequencer has consumed every ring up to those counts, [`SequencerCore::reclaim_settle`]
//! forgets those that are still not live, still hold nothing and sent nothing since the
//! proposal. See docs/sequencer.md ("Client table reclaim").

use std::collections::{BTreeMap, HashMap, HashSet};

/// The ordering level of a topic (ORDER 3 is not built).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderLevel {
    /// ORDER 0: no order beyond per-broker logical offsets.
    Unordered,
    /// ORDER 1: a dense per-broker message sequence.
    PerBroker,
    /// ORDER 2: total order across brokers, no per-client rule.
    Total,
    /// ORDER 4: as ORDER 5, and every message header is stamped with its own total order.
    TotalFifoStamped,
    /// ORDER 5: total order, per-client FIFO, duplicates dropped.
    TotalFifo,
}

/// An ordering level this sequencer does not build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderLevelError {
    #[error("ORDER 3 (client-assigned tokens) is not supported by this sequencer")]
    Unsupported,
    #[error("ORDER {0} is unknown (0..=5)")]
    Unknown(u8),
}

impl OrderLevel {
    pub fn from_level(level: u8) -> Result<OrderLevel, OrderLevelError> {
        match level {
            0 => Ok(OrderLevel::Unordered),
            1 => Ok(OrderLevel::PerBroker),
            2 => Ok(OrderLevel::Total),
            3 => Err(OrderLevelError::Unsupported),
            4 => Ok(OrderLevel::TotalFifoStamped),
            5 => Ok(OrderLevel::TotalFifo),
            other => Err(OrderLevelError::Unknown(other)),
        }
    }

    pub fn level(self) -> u8 {
        match self {
            OrderLevel::Unordered => 0,
            OrderLevel::PerBroker => 1,
            OrderLevel::Total => 2,
            OrderLevel::TotalFifoStamped => 4,
            OrderLevel::TotalFifo => 5,
        }
    }

    /// Whether the level keeps a per-client table (ORDER 4 and 5).
    pub fn per_client(self) -> bool {
        matches!(self, OrderLevel::TotalFifo | OrderLevel::TotalFifoStamped)
    }
}

/// A batch that broker `broker` published at ring index `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Landed {
    pub broker: u32,
    pub index: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    pub num_msg: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Already ordered or already held: a resend.
    Duplicate,
    /// The client is fenced.
    Fenced,
    /// A client the sequencer does not track arrived when its client table was full of
    /// clients it may not forget yet: not tracked, no entry, its batch dropped.
    ClientTableFull,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// A gap in the client's sequence stayed open past the hold timeout.
    HoldTimeout,
    /// The client held more batches than one client may.
    ClientHoldFull,
    /// All clients together held more batches than the sequencer may; the client waiting
    /// longest is fenced.
    TotalHoldFull,
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Give the batch the sequence range `[first, first + num_msg)`: the topic's total order
    /// (ORDER 2, 4, 5), its delivery position (ORDER 0) or the broker's sequence (ORDER 1).
    /// Then finish its ring slot.
    Order { batch: Landed, first: u64 },
    /// Finish the slot without an order, and count/report it.
    Drop { batch: Landed, why: DropReason },
    /// Record that a client is fenced (it must start a new session).
    Fence {
        client_id: u64,
        expected: u64,
        why: FenceReason,
    },
}

/// Named bounds of the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Batches one client may have held past a gap. As many as all clients together by
    /// default: after a broker dies, a publisher's resent batch can reach the rings behind a
    /// whole window of its later batches (a new sequencer finds rings that filled while
    /// none ran), and a tighter bound fenced such a client for what is only a failover.
    /// Past the total bound the client with the oldest gap is fenced.
    pub held_per_client_max: usize,
    pub held_total_max: usize,
    pub hold_timeout_ns: u64,
    pub clients_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            held_per_client_max: 4096,
            held_total_max: 4096,
            hold_timeout_ns: 5_000_000_000,
            clients_max: 4096,
        }
    }
}

#[derive(Debug, Default)]
struct Client {
    next_expected: u64,
    fenced: bool,
    held: BTreeMap<u64, Landed>,
    /// When the current gap opened (the first hold since the client last advanced).
    gap_since_ns: u64,
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub ordered_batches: u64,
    pub ordered_messages: u64,
    pub duplicates: u64,
    pub fenced_drops: u64,
    pub fences: u64,
    pub held_now: u64,
    /// Batches dropped because the client table was full.
    pub table_full_drops: u64,
    /// Client entries reclaimed (clients forgotten).
    pub clients_reclaimed: u64,
}

/// A reclaim in progress (see the module docs).
#[derive(Debug)]
struct Proposal {
    /// Clients that had no live session and held nothing when proposed; one that sends a
    /// batch since is taken out.
    candidates: HashSet<u64>,
    /// Each ring's written count, read after the liveness: every batch of a candidate lies
    /// below it.
    written: Vec<u64>,
}

/// The state machine. See the module docs.
#[derive(Debug)]
pub struct SequencerCore {
    order: OrderLevel,
    limits: Limits,
    next_global: u64,
    per_broker_next: Vec<u64>,
    clients: HashMap<u64, Client>,
    held_total: usize,
    stats: CoreStats,
    proposal: Option<Proposal>,
}

/// What a restarted sequencer resumes from (kept in the pool).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    pub next_global: u64,
    pub per_broker_next: Vec<u64>,
    /// `(client_id, next_expected, fenced)`.
    pub clients: Vec<(u64, u64, bool)>,
}

impl SequencerCore {
    pub fn new(order: OrderLevel, brokers: u32, limits: Limits) -> SequencerCore {
        SequencerCore::resume(
            order,
            limits,
            Resume {
                per_broker_next: vec![0; brokers as usize],
                ..Resume::default()
            },
        )
    }

    pub fn resume(order: OrderLevel, limits: Limits, r: Resume) -> SequencerCore {
        let clients = r
            .clients
            .iter()
            .map(|&(id, next_expected, fenced)| {
                (
                    id,
                    Client {
                        next_expected,
                        fenced,
                        ..Client::default()
                    },
                )
            })
            .collect();
        SequencerCore {
            order,
            limits,
            next_global: r.next_global,
            per_broker_next: r.per_broker_next,
            clients,
            held_total: 0,
            stats: CoreStats::default(),
            proposal: None,
        }
    }

    pub fn order(&self) -> OrderLevel {
        self.order
    }

    /// The next total-order number to hand out.
    pub fn next_global(&self) -> u64 {
        self.next_global
    }

    pub fn next_expected(&self, client_id: u64) -> Option<u64> {
        self.clients.get(&client_id).map(|c| c.next_expected)
    }

    /// Clients in the table now (ORDER 4 and 5).
    pub fn clients_tracked(&self) -> usize {
        self.clients.len()
    }

    /// The client bound (after the driver has clamped it to the pool table).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn stats(&self) -> CoreStats {
        CoreStats {
            held_now: self.held_total as u64,
            ..self.stats
        }
    }

    /// Takes one landed batch; appends what to do to `out`.
    pub fn on_landed(&mut self, b: Landed, now_ns: u64, out: &mut Vec<Action>) {
        match self.order {
            OrderLevel::PerBroker => {
                let next = &mut self.per_broker_next[b.broker as usize];
                out.push(Action::Order {
                    batch: b,
                    first: *next,
                });
                *next += u64::from(b.num_msg);
                self.count_ordered(b);
            }
            OrderLevel::Total | OrderLevel::Unordered => self.assign(b, out),
            OrderLevel::TotalFifo | OrderLevel::TotalFifoStamped => self.fifo(b, now_ns, out),
        }
    }

    fn count_ordered(&mut self, b: Landed) {
        self.stats.ordered_batches += 1;
        self.stats.ordered_messages += u64::from(b.num_msg);
    }

    fn assign(&mut self, b: Landed, out: &mut Vec<Action>) {
        out.push(Action::Order {
            batch: b,
            first: self.next_global,
        });
        self.next_global += u64::from(b.num_msg);
        self.count_ordered(b);
    }

    fn fifo(&mut self, b: Landed, now_ns: u64, out: &mut Vec<Action>) {
        if let Some(p) = self.proposal.as_mut() {
            // It is active: not to be forgotten on the strength of an older proposal.
            p.candidates.remove(&b.client_id);
        }
        if !self.clients.contains_key(&b.client_id) && self.clients.len() >= self.limits.clients_max
        {
            // No entry is made: the table stays bounded, and the batch is reported as it is.
            self.stats.table_full_drops += 1;
            out.push(Action::Drop {
                batch: b,
                why: DropReason::ClientTableFull,
            });
            return;
        }
        let client = self.clients.entry(b.client_id).or_default();
        if client.fenced {
            self.stats.fenced_drops += 1;
            out.push(Action::Drop {
                batch: b,
                why: DropReason::Fenced,
            });
            return;
        }
        if b.batch_seq < client.next_expected || client.held.contains_key(&b.batch_seq) {
            self.stats.duplicates += 1;
            out.push(Action::Drop {
                batch: b,
                why: DropReason::Duplicate,
            });
            return;
        }
        if b.batch_seq > client.next_expected {
            if client.held.is_empty() {
                client.gap_since_ns = now_ns;
            }
            client.held.insert(b.batch_seq, b);
            self.held_total += 1;
            if client.held.len() > self.limits.held_per_client_max {
                self.fence(b.client_id, FenceReason::ClientHoldFull, out);
            } else if self.held_total > self.limits.held_total_max {
                let oldest = self
                    .clients
                    .iter()
                    .filter(|(_, c)| !c.held.is_empty())
                    .min_by_key(|(id, c)| (c.gap_since_ns, **id))
                    .map(|(id, _)| *id)
                    .expect("some client holds a batch");
                self.fence(oldest, FenceReason::TotalHoldFull, out);
            }
            return;
        }
        // The batch is next: order it and release what it unblocks.
        self.assign(b, out);
        let mut expected = b.batch_seq + 1;
        loop {
            let client = self.clients.get_mut(&b.client_id).expect("client exists");
            match client.held.remove(&expected) {
                Some(h) => {
                    self.held_total -= 1;
                    self.assign(h, out);
                    expected += 1;
                }
                None => {
                    client.next_expected = expected;
                    if !client.held.is_empty() {
                        // Progress restarts the clock of the gap that remains.
                        client.gap_since_ns = now_ns;
                    }
                    break;
                }
            }
        }
    }

    fn fence(&mut self, client_id: u64, why: FenceReason, out: &mut Vec<Action>) {
        let Some(client) = self.clients.get_mut(&client_id) else {
            return;
        };
        client.fenced = true;
        self.stats.fences += 1;
        out.push(Action::Fence {
            client_id,
            expected: client.next_expected,
            why,
        });
        let held = std::mem::take(&mut client.held);
        self.held_total -= held.len();
        self.stats.fenced_drops += held.len() as u64;
        out.extend(held.into_values().map(|batch| Action::Drop {
            batch,
            why: DropReason::Fenced,
        }));
    }

    /// Fences every client whose gap has been open longer than the hold timeout.
    pub fn on_tick(&mut self, now_ns: u64, out: &mut Vec<Action>) {
        if self.held_total == 0 {
            return;
        }
        let expired: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                !c.held.is_empty()
                    && now_ns.saturating_sub(c.gap_since_ns) > self.limits.hold_timeout_ns
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.fence(id, FenceReason::HoldTimeout, out);
        }
    }

    /// Reclaim, step 1: proposes every client that `live` says has no live session and that
    /// holds nothing. `written` is each ring's written count, read by the driver *after* it
    /// read the liveness, so every batch a candidate sent lies below it. Replaces an earlier
    /// proposal. Returns how many clients were proposed.
    pub fn reclaim_propose(&mut self, live: impl Fn(u64) -> bool, written: Vec<u64>) -> usize {
        let candidates: HashSet<u64> = self
            .clients
            .iter()
            .filter(|(id, c)| c.held.is_empty() && !live(**id))
            .map(|(id, _)| *id)
            .collect();
        let n = candidates.len();
        self.proposal = (n > 0).then_some(Proposal {
            candidates,
            written,
        });
        n
    }

    /// Whether a proposal waits to be settled.
    pub fn reclaim_pending(&self) -> bool {
        self.proposal.is_some()
    }

    /// Reclaim, step 2: once `consumed` (the sequencer's consumed count of each ring, all of
    /// whose slots it has decided) has reached the proposal's written counts, forgets every
    /// candidate that `live` (read now) says is still not live, that still holds nothing and
    /// that sent nothing since the proposal; appends their ids to `out` (the driver frees
    /// their pool entries). Returns false while the rings are not consumed that far (the
    /// proposal is kept), true once it is settled (or there was none).
    pub fn reclaim_settle(
        &mut self,
        live: impl Fn(u64) -> bool,
        consumed: &[u64],
        out: &mut Vec<u64>,
    ) -> bool {
        let Some(p) = self.proposal.as_ref() else {
            return true;
        };
        let reached = p.written.len() == consumed.len()
            && p.written.iter().zip(consumed).all(|(w, c)| c >= w);
        if !reached {
            return false;
        }
        let p = self.proposal.take().expect("checked above");
        for id in p.candidates {
            if live(id) {
                continue;
            }
            if self.clients.get(&id).is_some_and(|c| c.held.is_empty()) {
                self.clients.remove(&id);
                self.stats.clients_reclaimed += 1;
                out.push(id);
            }
        }
        true
    }

    /// Recovery: a batch found already ordered in the pool (committed before a crash, its
    /// counters possibly not yet saved). Brings the counters past it.
    pub fn replay_ordered(&mut self, b: Landed, first: u64) {
        let end = first + u64::from(b.num_msg);
        match self.order {
            OrderLevel::PerBroker => {
                let next = &mut self.per_broker_next[b.broker as usize];
                *next = (*next).max(end);
            }
            OrderLevel::Unordered
            | OrderLevel::Total
            | OrderLevel::TotalFifo
            | OrderLevel::TotalFifoStamped => {
                self.next_global = self.next_global.max(end);
                if self.order.per_client() {
                    let c = self.clients.entry(b.client_id).or_default();
                    c.next_expected = c.next_expected.max(b.batch_seq + 1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
