use super::*;
use proptest::prelude::*;
use std::collections::HashSet;

fn landed(broker: u32, index: u64, client_id: u64, batch_seq: u64, num_msg: u32) -> Landed {
    Landed {
        broker,
        index,
        client_id,
        batch_seq,
        num_msg,
    }
}

fn run(core: &mut SequencerCore, events: &[Landed]) -> Vec<Action> {
    let mut out = Vec::new();
    for e in events {
        core.on_landed(*e, 0, &mut out);
    }
    out
}

fn orders(actions: &[Action]) -> Vec<(u64, u64, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Order { batch, first } => Some((batch.client_id, batch.batch_seq, *first)),
            _ => None,
        })
        .collect()
}

#[test]
fn order_5_holds_a_batch_until_its_predecessor_arrives() {
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 2, Limits::default());
    let out = run(
        &mut core,
        &[
            landed(1, 0, 7, 1, 3), // early: held
            landed(0, 0, 7, 0, 2), // releases 1
            landed(0, 1, 8, 0, 5),
        ],
    );
    assert_eq!(orders(&out), vec![(7, 0, 0), (7, 1, 2), (8, 0, 5)]);
    assert_eq!(core.next_global(), 10);
    assert_eq!(core.next_expected(7), Some(2));
    assert_eq!(core.stats().held_now, 0);
}

#[test]
fn order_5_drops_resends_of_ordered_and_of_held_batches() {
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 1, Limits::default());
    let out = run(
        &mut core,
        &[
            landed(0, 0, 1, 0, 1),
            landed(0, 1, 1, 0, 1), // resend of an ordered batch
            landed(0, 2, 1, 2, 1), // held
            landed(0, 3, 1, 2, 1), // resend of a held batch
        ],
    );
    let drops: Vec<_> = out
        .iter()
        .filter_map(|a| match a {
            Action::Drop { batch, why } => Some((batch.index, *why)),
            _ => None,
        })
        .collect();
    assert_eq!(
        drops,
        vec![(1, DropReason::Duplicate), (3, DropReason::Duplicate)]
    );
    assert_eq!(core.stats().duplicates, 2);
    assert_eq!(core.stats().held_now, 1);
}

#[test]
fn a_gap_that_never_fills_fences_the_client_at_the_timeout_and_nothing_is_skipped() {
    let limits = Limits {
        hold_timeout_ns: 1_000,
        ..Limits::default()
    };
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 1, limits);
    let mut out = Vec::new();
    core.on_landed(landed(0, 0, 3, 0, 1), 0, &mut out);
    core.on_landed(landed(0, 1, 3, 2, 1), 10, &mut out); // batch 1 never comes
    core.on_landed(landed(0, 2, 4, 0, 1), 20, &mut out); // another client is unaffected
    core.on_tick(500, &mut out);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Fence { .. })),
        "not yet"
    );
    core.on_tick(1_011, &mut out);
    core.on_landed(landed(0, 3, 3, 1, 1), 1_100, &mut out); // too late: fenced
    assert_eq!(orders(&out), vec![(3, 0, 0), (4, 0, 1)]);
    assert!(out.contains(&Action::Fence {
        client_id: 3,
        expected: 1,
        why: FenceReason::HoldTimeout
    }));
    let fenced_drops: Vec<_> = out
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Drop {
                    why: DropReason::Fenced,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(fenced_drops.len(), 2, "the held batch and the late one");
    assert_eq!(core.stats().held_now, 0);
}

#[test]
fn hold_bounds_fence_the_offending_client() {
    let limits = Limits {
        held_per_client_max: 2,
        held_total_max: 3,
        ..Limits::default()
    };
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 1, limits);
    let mut out = Vec::new();
    for s in 1..=3 {
        core.on_landed(landed(0, s, 1, s, 1), s, &mut out);
    }
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Fence {
            client_id: 1,
            why: FenceReason::ClientHoldFull,
            ..
        }
    )));
    out.clear();
    // Two clients hold 2 each: the total bound (3) fences the one waiting longest.
    core.on_landed(landed(0, 10, 2, 1, 1), 100, &mut out);
    core.on_landed(landed(0, 11, 2, 2, 1), 101, &mut out);
    core.on_landed(landed(0, 12, 5, 1, 1), 102, &mut out);
    core.on_landed(landed(0, 13, 5, 2, 1), 103, &mut out);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Fence {
            client_id: 2,
            why: FenceReason::TotalHoldFull,
            ..
        }
    )));
    assert_eq!(core.stats().held_now, 2);
}

#[test]
fn a_full_client_table_fences_new_clients_only() {
    let limits = Limits {
        clients_max: 2,
        ..Limits::default()
    };
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 1, limits);
    let out = run(
        &mut core,
        &[
            landed(0, 0, 1, 0, 1),
            landed(0, 1, 2, 0, 1),
            landed(0, 2, 3, 0, 1),
            landed(0, 3, 1, 1, 1),
        ],
    );
    assert_eq!(orders(&out), vec![(1, 0, 0), (2, 0, 1), (1, 1, 2)]);
    assert!(
        out.contains(&Action::Drop {
            batch: landed(0, 2, 3, 0, 1),
            why: DropReason::ClientTableFull
        }),
        "{out:?}"
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Fence { .. })),
        "an untracked client is not fenced: it would need an entry"
    );
    assert_eq!(core.clients_tracked(), 2);
    assert_eq!(core.stats().table_full_drops, 1);
}

#[test]
fn order_0_1_and_2_follow_their_rules() {
    let events = [
        landed(0, 0, 1, 1, 2),
        landed(1, 0, 1, 0, 3),
        landed(0, 1, 2, 0, 4),
    ];
    let mut c0 = SequencerCore::new(OrderLevel::Unordered, 2, Limits::default());
    let firsts: Vec<_> = orders(&run(&mut c0, &events)).iter().map(|o| o.2).collect();
    assert_eq!(firsts, vec![0, 2, 5], "delivery positions in arrival order");
    let mut c1 = SequencerCore::new(OrderLevel::PerBroker, 2, Limits::default());
    let firsts: Vec<_> = orders(&run(&mut c1, &events)).iter().map(|o| o.2).collect();
    assert_eq!(firsts, vec![0, 0, 2], "dense per broker");
    let mut c2 = SequencerCore::new(OrderLevel::Total, 2, Limits::default());
    let firsts: Vec<_> = orders(&run(&mut c2, &events)).iter().map(|o| o.2).collect();
    assert_eq!(firsts, vec![0, 2, 5], "arrival order, no per-client hold");
}

#[test]
fn order_3_and_unknown_levels_are_refused() {
    assert!(OrderLevel::from_level(3)
        .unwrap_err()
        .to_string()
        .contains("not supported"));
    assert!(OrderLevel::from_level(9)
        .unwrap_err()
        .to_string()
        .contains("unknown"));
    for l in [0, 1, 2, 4, 5] {
        assert_eq!(OrderLevel::from_level(l).unwrap().level(), l);
    }
}

#[test]
fn replay_brings_the_counters_past_committed_batches() {
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 1, Limits::default());
    core.replay_ordered(landed(0, 5, 9, 3, 4), 100);
    core.replay_ordered(landed(0, 4, 9, 2, 4), 96);
    assert_eq!(core.next_global(), 104);
    assert_eq!(core.next_expected(9), Some(4));
    let out = run(&mut core, &[landed(0, 6, 9, 3, 4), landed(0, 7, 9, 4, 1)]);
    assert!(matches!(
        out[0],
        Action::Drop {
            why: DropReason::Duplicate,
            ..
        }
    ));
    assert_eq!(orders(&out), vec![(9, 4, 104)]);
}

/// Clients 1 and 2 order a batch each; 1 is live, 2 has ended.
fn two_clients_one_ended() -> SequencerCore {
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 2, Limits::default());
    run(&mut core, &[landed(0, 0, 1, 0, 1), landed(1, 0, 2, 0, 1)]);
    core
}

#[test]
fn reclaim_forgets_an_ended_client_only_once_the_rings_are_consumed_past_the_proposal() {
    let mut core = two_clients_one_ended();
    let live = |id: u64| id == 1;
    assert_eq!(core.reclaim_propose(live, vec![3, 1]), 1, "client 2 only");
    assert!(core.reclaim_pending());
    let mut gone = Vec::new();
    assert!(
        !core.reclaim_settle(live, &[1, 1], &mut gone),
        "ring 0 not consumed to 3 yet"
    );
    assert!(gone.is_empty());
    assert_eq!(core.clients_tracked(), 2);
    assert!(core.reclaim_settle(live, &[3, 1], &mut gone));
    assert_eq!(gone, vec![2]);
    assert_eq!(core.clients_tracked(), 1);
    assert_eq!(core.next_expected(2), None);
    assert_eq!(
        core.next_expected(1),
        Some(1),
        "the live client keeps its place"
    );
    assert!(!core.reclaim_pending());
    assert_eq!(core.stats().clients_reclaimed, 1);
}

#[test]
fn reclaim_keeps_clients_that_are_live_hold_batches_or_sent_since_the_proposal() {
    let mut core = two_clients_one_ended();
    // Client 3 holds batch 1 (its batch 0 is missing): it must not be forgotten.
    run(&mut core, &[landed(0, 1, 3, 1, 1)]);
    assert_eq!(core.reclaim_propose(|_| false, vec![2, 1]), 2, "1 and 2");
    // Client 1 sends again after the proposal; client 2 comes back live.
    let out = run(&mut core, &[landed(0, 2, 1, 1, 1)]);
    assert_eq!(orders(&out), vec![(1, 1, 2)]);
    let mut gone = Vec::new();
    assert!(core.reclaim_settle(|id| id == 2, &[3, 1], &mut gone));
    assert!(gone.is_empty(), "{gone:?}");
    assert_eq!(core.clients_tracked(), 3);
    // A later proposal, with nobody live, takes 1 and 2 but not the holding client 3.
    assert_eq!(core.reclaim_propose(|_| false, vec![3, 1]), 2);
    assert!(core.reclaim_settle(|_| false, &[3, 1], &mut gone));
    gone.sort_unstable();
    assert_eq!(gone, vec![1, 2]);
    assert_eq!(core.next_expected(3), Some(0));
}

#[test]
fn a_full_table_takes_a_new_client_again_once_an_ended_one_is_reclaimed() {
    let limits = Limits {
        clients_max: 2,
        ..Limits::default()
    };
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 1, limits);
    run(&mut core, &[landed(0, 0, 1, 0, 1), landed(0, 1, 2, 0, 1)]);
    let out = run(&mut core, &[landed(0, 2, 3, 0, 1)]);
    assert!(matches!(
        out[0],
        Action::Drop {
            why: DropReason::ClientTableFull,
            ..
        }
    ));
    core.reclaim_propose(|id| id == 2, vec![3]);
    let mut gone = Vec::new();
    assert!(core.reclaim_settle(|id| id == 2, &[3], &mut gone));
    assert_eq!(gone, vec![1]);
    let out = run(&mut core, &[landed(0, 3, 4, 0, 1)]);
    assert_eq!(orders(&out), vec![(4, 0, 2)]);
}

#[test]
fn a_client_that_comes_back_after_its_entry_was_reclaimed_is_a_new_client() {
    let limits = Limits {
        hold_timeout_ns: 1_000,
        ..Limits::default()
    };
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, 1, limits);
    let mut out = Vec::new();
    core.on_landed(landed(0, 0, 7, 0, 1), 0, &mut out);
    core.on_landed(landed(0, 1, 7, 1, 1), 0, &mut out);
    core.reclaim_propose(|_| false, vec![2]);
    let mut gone = Vec::new();
    assert!(core.reclaim_settle(|_| false, &[2], &mut gone));
    assert_eq!(gone, vec![7]);
    // It continues its old sequence: held, as a new client's batch 2 would be, then fenced
    // at the hold timeout; never ordered out of its FIFO.
    out.clear();
    core.on_landed(landed(0, 2, 7, 2, 1), 10, &mut out);
    assert!(out.is_empty(), "held: {out:?}");
    core.on_tick(2_000, &mut out);
    assert!(out.contains(&Action::Fence {
        client_id: 7,
        expected: 0,
        why: FenceReason::HoldTimeout
    }));
}

/// The reference model: the rule written as plainly as possible (scan everything pending
/// after every arrival), with no bounds hit.
fn reference(events: &[Landed]) -> (Vec<(u64, u64, u64)>, u64) {
    let mut expected: HashMap<u64, u64> = HashMap::new();
    let mut pending: Vec<Landed> = Vec::new();
    let mut global = 0;
    let mut out = Vec::new();
    let mut dups = 0;
    for e in events {
        let exp = expected.entry(e.client_id).or_insert(0);
        if e.batch_seq < *exp
            || pending
                .iter()
                .any(|p| p.client_id == e.client_id && p.batch_seq == e.batch_seq)
        {
            dups += 1;
            continue;
        }
        pending.push(*e);
        while let Some(pos) = pending
            .iter()
            .position(|p| p.client_id == e.client_id && p.batch_seq == expected[&e.client_id])
        {
            let p = pending.remove(pos);
            out.push((p.client_id, p.batch_seq, global));
            global += u64::from(p.num_msg);
            *expected.get_mut(&e.client_id).unwrap() += 1;
        }
    }
    (out, dups)
}

/// Random arrivals: `clients` clients, each with batches 0..n, striped over brokers, shuffled
/// (arrival order across brokers is arbitrary), with duplicates and some batches withheld.
fn arrivals() -> impl Strategy<Value = Vec<Landed>> {
    (
        1u64..6,
        1u64..12,
        1u32..5,
        any::<u64>(),
        0usize..6,
        0usize..3,
    )
        .prop_map(|(clients, per_client, brokers, seed, dups, withheld)| {
            let mut v = Vec::new();
            for c in 0..clients {
                for s in 0..per_client {
                    let b = ((s + c) % u64::from(brokers)) as u32;
                    v.push(landed(b, 0, c + 100, s, ((s * 7 + c) % 5 + 1) as u32));
                }
            }
            let mut rng = seed | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            for _ in 0..withheld {
                if !v.is_empty() {
                    let i = (next() % v.len() as u64) as usize;
                    v.remove(i);
                }
            }
            for _ in 0..dups {
                if !v.is_empty() {
                    let i = (next() % v.len() as u64) as usize;
                    v.push(v[i]);
                }
            }
            for i in (1..v.len()).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
            for (i, e) in v.iter_mut().enumerate() {
                e.index = i as u64;
            }
            v
        })
}

proptest! {
    /// ORDER 5 agrees exactly with the reference model, and its output satisfies the
    /// guarantees directly: ranges dense from 0, each batch once, per-client FIFO.
    #[test]
    fn order_5_matches_the_reference_model(events in arrivals()) {
        let mut core = SequencerCore::new(OrderLevel::TotalFifo, 4, Limits::default());
        let out = run(&mut core, &events);
        let (expect, dups) = reference(&events);
        let got = orders(&out);
        prop_assert_eq!(&got, &expect);
        prop_assert_eq!(core.stats().duplicates, dups);
        // Every event is accounted for: ordered, dropped, or still held.
        let dropped = out.iter().filter(|a| matches!(a, Action::Drop { .. })).count() as u64;
        prop_assert_eq!(got.len() as u64 + dropped + core.stats().held_now, events.len() as u64);
        let mut seen = HashSet::new();
        let mut last: HashMap<u64, u64> = HashMap::new();
        let mut next_first = 0;
        for ((client, seq, first), a) in got.iter().zip(out.iter().filter(|a| matches!(a, Action::Order { .. }))) {
            prop_assert_eq!(*first, next_first);
            if let Action::Order { batch, .. } = a { next_first += u64::from(batch.num_msg); }
            prop_assert!(seen.insert((*client, *seq)));
            if let Some(prev) = last.insert(*client, *seq) { prop_assert_eq!(*seq, prev + 1); } else { prop_assert_eq!(*seq, 0); }
        }
    }

    /// Gaps that never fill end in a fence at the timeout; after it nothing stays held, and
    /// every batch is either ordered once or reported.
    #[test]
    fn unfilled_gaps_are_fenced_never_skipped(events in arrivals()) {
        let limits = Limits { hold_timeout_ns: 10, ..Limits::default() };
        let mut core = SequencerCore::new(OrderLevel::TotalFifo, 4, limits);
        let mut out = Vec::new();
        for e in &events { core.on_landed(*e, 0, &mut out); }
        core.on_tick(11, &mut out);
        prop_assert_eq!(core.stats().held_now, 0);
        let fenced: HashSet<u64> = out.iter().filter_map(|a| match a { Action::Fence { client_id, .. } => Some(*client_id), _ => None }).collect();
        for a in &out {
            if let Action::Drop { batch, why: DropReason::Fenced } = a {
                prop_assert!(fenced.contains(&batch.client_id));
            }
        }
        let ordered = out.iter().filter(|a| matches!(a, Action::Order { .. })).count();
        let dropped = out.iter().filter(|a| matches!(a, Action::Drop { .. })).count();
        prop_assert_eq!(ordered + dropped, events.len());
    }

    /// Replaying a prefix of committed batches (a restart) and feeding the rest gives the
    /// same order as an uninterrupted run.
    #[test]
    fn a_restart_after_any_prefix_changes_nothing(events in arrivals(), cut in 0usize..64) {
        let mut whole = SequencerCore::new(OrderLevel::TotalFifo, 4, Limits::default());
        let all = run(&mut whole, &events);
        let cut = cut.min(all.len());
        // The pool holds the committed prefix of Order actions; the counters were saved at
        // some earlier point (here: never), so replay must rebuild them.
        let mut restarted = SequencerCore::new(OrderLevel::TotalFifo, 4, Limits::default());
        let committed: Vec<_> = all[..cut].iter().filter_map(|a| match a { Action::Order { batch, first } => Some((*batch, *first)), _ => None }).collect();
        for (b, first) in &committed { restarted.replay_ordered(*b, *first); }
        // Every event is redelivered (at-least-once) after the restart.
        let again = run(&mut restarted, &events);
        let mut merged: Vec<_> = committed.iter().map(|(b, f)| (b.client_id, b.batch_seq, *f)).collect();
        merged.extend(orders(&again));
        prop_assert_eq!(merged, orders(&all));
    }
}

/// Arrivals as the sequencer meets them in the pool: each batch is published into its
/// broker's ring (ring index = its place among that broker's batches) and later taken by the
/// core; in between, at random points, the driver's reclaim runs: a client is live while it
/// still has a batch to publish, the proposal's written counts are what is published then,
/// and the consumed counts are each ring's prefix of decided slots.
fn churn(events: &[Landed], seed: u64, limits: Limits) -> (SequencerCore, Vec<Action>, Vec<u64>) {
    let brokers = 4usize;
    let mut events = events.to_vec();
    let mut per_ring = vec![0u64; brokers];
    for e in &mut events {
        e.index = per_ring[e.broker as usize];
        per_ring[e.broker as usize] += 1;
    }
    let last_of: HashMap<u64, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.client_id, i))
        .collect();
    let mut core = SequencerCore::new(OrderLevel::TotalFifo, brokers as u32, limits);
    let mut out = Vec::new();
    let mut reclaimed = Vec::new();
    let (mut published, mut taken) = (0usize, 0usize);
    // Ring slots taken and not yet decided, per ring.
    let mut undecided: Vec<std::collections::BTreeSet<u64>> = vec![Default::default(); brokers];
    let mut taken_per_ring = vec![0u64; brokers];
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let written = |published: usize| {
        let mut w = vec![0u64; brokers];
        for e in &events[..published] {
            w[e.broker as usize] += 1;
        }
        w
    };
    loop {
        let done = taken == events.len();
        let op = if done { 2 + next() % 2 } else { next() % 4 };
        match op {
            0 => published = (published + 1 + (next() % 3) as usize).min(events.len()),
            1 if taken < published => {
                let e = events[taken];
                taken += 1;
                undecided[e.broker as usize].insert(e.index);
                taken_per_ring[e.broker as usize] += 1;
                let from = out.len();
                core.on_landed(e, 0, &mut out);
                for a in &out[from..] {
                    if let Action::Order { batch, .. } | Action::Drop { batch, .. } = a {
                        undecided[batch.broker as usize].remove(&batch.index);
                    }
                }
            }
            1 => published = (published + 1).min(events.len()),
            _ => {
                let last_of = &last_of;
                let live = |p: usize| move |id: u64| last_of.get(&id).is_some_and(|&l| l >= p);
                let consumed: Vec<u64> = (0..brokers)
                    .map(|b| undecided[b].first().copied().unwrap_or(taken_per_ring[b]))
                    .collect();
                let settled = core.reclaim_settle(live(published), &consumed, &mut reclaimed);
                if settled && op == 2 {
                    core.reclaim_propose(live(published), written(published));
                }
                if done && (!core.reclaim_pending() || next() % 8 == 0) {
                    break;
                }
            }
        }
    }
    (core, out, reclaimed)
}

proptest! {
    /// Reclaiming the entries of clients that have ended, at any points between arrivals,
    /// changes nothing in the order (FIFO, dedup and the ranges are exactly the reference
    /// model's), and at the end only clients that still hold batches keep an entry.
    #[test]
    fn reclaiming_ended_clients_never_changes_the_order(events in arrivals(), seed in any::<u64>()) {
        let (mut core, out, reclaimed) = churn(&events, seed, Limits::default());
        let (expect, dups) = reference(&events);
        prop_assert_eq!(orders(&out), expect);
        prop_assert_eq!(core.stats().duplicates, dups);
        let unique: HashSet<u64> = reclaimed.iter().copied().collect();
        prop_assert_eq!(unique.len(), reclaimed.len(), "each client reclaimed once");
        // Nobody is live any more: one last proposal forgets every client that holds nothing.
        let mut gone = Vec::new();
        core.reclaim_propose(|_| false, vec![0; 4]);
        prop_assert!(core.reclaim_settle(|_| false, &[0; 4], &mut gone));
        prop_assert!(core.clients_tracked() as u64 <= core.stats().held_now, "only holders stay");
    }

    /// With a client table of two, clients that end free their places for later ones, the
    /// table never grows past its bound, and whatever is ordered keeps each client's FIFO
    /// from 0 with no duplicate and dense ranges.
    #[test]
    fn a_small_table_with_reclaim_keeps_fifo_for_every_client_it_takes(events in arrivals(), seed in any::<u64>()) {
        let limits = Limits { clients_max: 2, ..Limits::default() };
        let (core, out, _) = churn(&events, seed, limits);
        prop_assert!(core.clients_tracked() <= 2);
        let mut last: HashMap<u64, u64> = HashMap::new();
        let mut next_first = 0;
        for a in &out {
            if let Action::Order { batch, first } = a {
                prop_assert_eq!(*first, next_first);
                next_first += u64::from(batch.num_msg);
                match last.insert(batch.client_id, batch.batch_seq) {
                    Some(prev) => prop_assert_eq!(batch.batch_seq, prev + 1),
                    None => prop_assert_eq!(batch.batch_seq, 0),
                }
            }
        }
    }
}
