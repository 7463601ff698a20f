//! Ordering invariants, checked on what a reader delivers; shared by tests, the benchmark and
//! the subscriber command line. For ORDER 2, 4 and 5:
//!
//! - total orders are exactly `0, 1, 2, ...` in delivery order (no hole, no duplicate);
//! - a batch's messages are contiguous: indices `0..num_msg` with consecutive total orders;
//! - (ORDER 4, 5) each client's messages come in `(batch_seq, index)` order, and batch
//!   sequence numbers advance by one;
//! - every subscriber sees the same sequence ([`same_sequence`]).
//!
//! A reading that starts later in the log ([`OrderChecker::from_first`]: `embar subscribe
//! --from N`, or from the oldest message once retention dropped the head) is held to the same
//! rules from its first message on, except what came before it: its total orders run on from
//! the first one delivered, the first message may be part-way through its batch, and each
//! client's first batch seen may have any sequence number.

use std::collections::HashMap;

/// One delivered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivered {
    pub total_order: u64,
    pub client_id: u64,
    pub batch_seq: u64,
    /// Position inside its batch.
    pub index: u32,
    pub num_msg: u32,
}

/// The first broken rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("message {position}: total order {found}, expected {expected} (hole or duplicate)")]
    TotalOrder {
        position: u64,
        found: u64,
        expected: u64,
    },
    #[error("message {position}: batch (client {client_id}, seq {batch_seq}) not contiguous: index {found}, expected {expected}")]
    BatchSplit {
        position: u64,
        client_id: u64,
        batch_seq: u64,
        found: u32,
        expected: u32,
    },
    #[error("message {position}: client {client_id} batch {found} follows batch {previous} (per-client FIFO broken)")]
    ClientFifo {
        position: u64,
        client_id: u64,
        previous: u64,
        found: u64,
    },
    #[error("{found} messages delivered, {expected} expected")]
    Count { found: u64, expected: u64 },
    #[error("subscribers differ at message {position}: {a:?} vs {b:?}")]
    Diverged {
        position: u64,
        a: Option<Delivered>,
        b: Option<Delivered>,
    },
}

/// A streaming checker: feed messages in delivery order.
#[derive(Debug)]
pub struct OrderChecker {
    per_client_fifo: bool,
    /// Messages delivered so far.
    position: u64,
    /// The total order of the first message (`None`: taken from the first one delivered).
    first: Option<u64>,
    /// The reading started after total order 0, so what came before it is not seen: the first
    /// message may be inside its batch, and a client's first batch may have any sequence.
    mid_log: bool,
    /// The batch being delivered: (client, seq, next index, num_msg).
    open: Option<(u64, u64, u32, u32)>,
    /// Per client: last batch_seq delivered.
    last_batch: HashMap<u64, u64>,
}

impl OrderChecker {
    /// A reading of the whole log: total orders from 0, every client's batches from 0.
    /// `per_client_fifo`: check ORDER 4/5's per-client rule too.
    pub fn new(per_client_fifo: bool) -> OrderChecker {
        OrderChecker {
            per_client_fifo,
            position: 0,
            first: Some(0),
            mid_log: false,
            open: None,
            last_batch: HashMap::new(),
        }
    }

    /// A reading that starts wherever its first message is: total orders contiguous from
    /// that one. Starting at total order 0 it is held to every rule of [`OrderChecker::new`].
    pub fn from_first(per_client_fifo: bool) -> OrderChecker {
        OrderChecker {
            first: None,
            ..OrderChecker::new(per_client_fifo)
        }
    }

    pub fn delivered(&self) -> u64 {
        self.position
    }

    /// The total order of the first message (`None` before one was delivered to a
    /// [`OrderChecker::from_first`] checker).
    pub fn first_total_order(&self) -> Option<u64> {
        self.first
    }

    /// How many publishers (client ids) the delivered messages came from.
    pub fn publishers(&self) -> usize {
        self.last_batch.len()
    }

    pub fn push(&mut self, m: &Delivered) -> Result<(), Violation> {
        let position = self.position;
        let first = match self.first {
            Some(f) => f,
            None => {
                self.mid_log = m.total_order != 0;
                self.first = Some(m.total_order);
                m.total_order
            }
        };
        let expected = first.wrapping_add(position);
        if m.total_order != expected {
            return Err(Violation::TotalOrder {
                position,
                found: m.total_order,
                expected,
            });
        }
        let expected_index = match self.open {
            Some((c, s, next, _)) if c == m.client_id && s == m.batch_seq => next,
            // The reading starts inside this batch.
            None if self.mid_log => m.index,
            Some((c, s, next, n)) if next < n => {
                return Err(Violation::BatchSplit {
                    position,
                    client_id: c,
                    batch_seq: s,
                    found: m.index,
                    expected: next,
                })
            }
            _ => 0,
        };
        if m.index != expected_index || m.index >= m.num_msg {
            return Err(Violation::BatchSplit {
                position,
                client_id: m.client_id,
                batch_seq: m.batch_seq,
                found: m.index,
                expected: expected_index,
            });
        }
        // A batch opens (or the reading starts inside one).
        if expected_index == 0 || self.open.is_none() {
            let want = match self.last_batch.get(&m.client_id) {
                Some(p) => Some(p.wrapping_add(1)),
                None if self.mid_log => None,
                None => Some(0),
            };
            if let Some(want) = want.filter(|&w| self.per_client_fifo && m.batch_seq != w) {
                return Err(Violation::ClientFifo {
                    position,
                    client_id: m.client_id,
                    previous: want.wrapping_sub(1),
                    found: m.batch_seq,
                });
            }
            self.last_batch.insert(m.client_id, m.batch_seq);
        }
        self.open = Some((m.client_id, m.batch_seq, m.index + 1, m.num_msg));
        self.position += 1;
        Ok(())
    }

    /// Ends the check: the last batch is complete and `expected` messages were delivered.
    pub fn finish(&self, expected: Option<u64>) -> Result<u64, Violation> {
        if let Some((c, s, next, n)) = self.open {
            if next < n {
                return Err(Violation::BatchSplit {
                    position: self.position,
                    client_id: c,
                    batch_seq: s,
                    found: next,
                    expected: n,
                });
            }
        }
        match expected {
            Some(e) if e != self.position => Err(Violation::Count {
                found: self.position,
                expected: e,
            }),
            _ => Ok(self.position),
        }
    }
}

/// Checks a whole delivered sequence.
pub fn check_sequence(
    msgs: &[Delivered],
    per_client_fifo: bool,
    expected: Option<u64>,
) -> Result<u64, Violation> {
    let mut c = OrderChecker::new(per_client_fifo);
    for m in msgs {
        c.push(m)?;
    }
    c.finish(expected)
}

/// Checks that two subscribers delivered the same sequence.
pub fn same_sequence(a: &[Delivered], b: &[Delivered]) -> Result<(), Violation> {
    for position in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(position), b.get(position));
        if x != y {
            return Err(Violation::Diverged {
                position: position as u64,
                a: x.copied(),
                b: y.copied(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages of batches `(client, seq, n)` in the given order, with total orders from 0.
    fn deliver(batches: &[(u64, u64, u32)]) -> Vec<Delivered> {
        let mut v = Vec::new();
        for &(client_id, batch_seq, n) in batches {
            for index in 0..n {
                v.push(Delivered {
                    total_order: v.len() as u64,
                    client_id,
                    batch_seq,
                    index,
                    num_msg: n,
                });
            }
        }
        v
    }

    #[test]
    fn a_correct_sequence_passes() {
        let v = deliver(&[(1, 0, 3), (2, 0, 1), (1, 1, 2), (2, 1, 4)]);
        assert_eq!(check_sequence(&v, true, Some(10)), Ok(10));
        assert_eq!(same_sequence(&v, &v.clone()), Ok(()));
    }

    #[test]
    fn a_hole_or_a_duplicate_total_order_fails() {
        let mut v = deliver(&[(1, 0, 3), (1, 1, 2)]);
        v.remove(2);
        assert!(matches!(
            check_sequence(&v, false, None),
            Err(Violation::TotalOrder { position: 2, .. })
        ));
        let mut v = deliver(&[(1, 0, 3)]);
        v[2].total_order = 1;
        assert!(matches!(
            check_sequence(&v, false, None),
            Err(Violation::TotalOrder { .. })
        ));
    }

    #[test]
    fn an_interleaved_batch_fails() {
        let mut v = deliver(&[(1, 0, 3), (2, 0, 2)]);
        v.swap(1, 3);
        for (i, m) in v.iter_mut().enumerate() {
            m.total_order = i as u64;
        }
        assert!(matches!(
            check_sequence(&v, false, None),
            Err(Violation::BatchSplit { .. })
        ));
        let v = deliver(&[(1, 0, 3)]);
        assert!(matches!(
            check_sequence(&v[..2], false, None),
            Err(Violation::BatchSplit { .. })
        ));
    }

    #[test]
    fn per_client_fifo_breaks_fail_only_when_asked() {
        let v = deliver(&[(1, 1, 2), (1, 0, 2)]);
        assert!(matches!(
            check_sequence(&v, true, None),
            Err(Violation::ClientFifo { .. })
        ));
        assert_eq!(
            check_sequence(&v, false, None),
            Ok(4),
            "ORDER 2 has no per-client rule"
        );
        let v = deliver(&[(1, 0, 1), (1, 2, 1)]);
        assert!(matches!(
            check_sequence(&v, true, None),
            Err(Violation::ClientFifo { found: 2, .. })
        ));
        let v = deliver(&[(1, 0, 1), (1, 0, 1)]);
        assert!(check_sequence(&v, true, None).is_err(), "a repeated batch");
    }

    #[test]
    fn a_wrong_count_or_diverging_subscribers_fail() {
        let v = deliver(&[(1, 0, 3)]);
        assert!(matches!(
            check_sequence(&v, true, Some(4)),
            Err(Violation::Count {
                found: 3,
                expected: 4
            })
        ));
        let w = deliver(&[(2, 0, 3)]);
        assert!(matches!(
            same_sequence(&v, &w),
            Err(Violation::Diverged { position: 0, .. })
        ));
        assert!(matches!(
            same_sequence(&v, &v[..2]),
            Err(Violation::Diverged { position: 2, .. })
        ));
    }

    /// Feeds `msgs` to a [`OrderChecker::from_first`] checker; its count and publishers.
    fn check_from_first(msgs: &[Delivered], fifo: bool) -> Result<(u64, usize), Violation> {
        let mut c = OrderChecker::from_first(fifo);
        for m in msgs {
            c.push(m)?;
        }
        Ok((c.finish(None)?, c.publishers()))
    }

    #[test]
    fn a_reading_that_starts_later_is_checked_from_its_first_message() {
        // Client 1's batches 0 and 1 and the first message of client 2's batch 0 came
        // before the start: the reading opens inside client 2's batch, and client 1's first
        // batch seen is its third.
        let v = deliver(&[
            (1, 0, 2),
            (1, 1, 1),
            (2, 0, 3),
            (1, 2, 2),
            (2, 1, 1),
            (3, 0, 1),
        ]);
        let later = &v[4..];
        assert_eq!(check_from_first(later, true), Ok((6, 3)));
        let mut c = OrderChecker::from_first(true);
        assert_eq!(c.first_total_order(), None);
        c.push(&later[0]).unwrap();
        assert_eq!(c.first_total_order(), Some(4));
        // From there on every rule holds: a hole, a skipped batch, a split batch.
        let mut hole = later.to_vec();
        hole.remove(3);
        assert!(matches!(
            check_from_first(&hole, true),
            Err(Violation::TotalOrder {
                position: 3,
                found: 8,
                expected: 7
            })
        ));
        let mut skipped = later.to_vec();
        skipped[4].batch_seq = 3;
        assert!(matches!(
            check_from_first(&skipped, true),
            Err(Violation::ClientFifo {
                client_id: 2,
                previous: 0,
                found: 3,
                ..
            })
        ));
        let mut split = later.to_vec();
        split[2].index = 1;
        assert!(matches!(
            check_from_first(&split, true),
            Err(Violation::BatchSplit { .. })
        ));
    }

    #[test]
    fn a_reading_from_total_order_zero_keeps_every_rule() {
        let v = deliver(&[(1, 0, 2), (2, 0, 1), (1, 1, 3)]);
        assert_eq!(check_from_first(&v, true), Ok((6, 2)));
        assert_eq!(check_from_first(&v, false), Ok((6, 2)));
        // At the log's start each client's first batch is its batch 0 ...
        let late = deliver(&[(1, 1, 2)]);
        assert!(matches!(
            check_from_first(&late, true),
            Err(Violation::ClientFifo { found: 1, .. })
        ));
        assert_eq!(check_from_first(&late, false), Ok((2, 1)), "ORDER 2");
        // ... and the first message opens its batch.
        let mut inside = deliver(&[(1, 0, 3)]);
        inside.remove(0);
        for (i, m) in inside.iter_mut().enumerate() {
            m.total_order = i as u64;
        }
        assert!(matches!(
            check_from_first(&inside, false),
            Err(Violation::BatchSplit {
                found: 1,
                expected: 0,
                ..
            })
        ));
    }
}
