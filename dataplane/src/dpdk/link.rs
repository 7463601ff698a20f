//! The reliability layer of the DPDK transport, without I/O: a [`Sender`] (publisher side)
//! and a [`Receiver`] (broker side) for one session's frames over a link that may lose,
//! duplicate, reorder or corrupt them (corrupt frames are dropped by their checksum before
//! they get here).
//!
//! Go-back-N with a cumulative ack: the receiver takes only the frame it expects next and
//! acks with the next sequence number it expects and a window (how many frames past that the
//! sender may have in flight; the broker ties it to the room its grants have left). The
//! sender resends from its oldest unacknowledged frame after three duplicate acks or a
//! retransmission timeout (doubling to a bound), that frame alone until the ack moves, then
//! the rest; with a closed window it probes with one frame per timeout. Batches are reassembled in order: frames carry the batch's sequence
//! number, size and the frame's offset in it, and an offset other than the bytes already
//! taken, or a batch that overruns its size or its grant, is a protocol violation that ends
//! the session. Go-back-N rather than selective repeat: a receiver that takes frames in
//! order writes them straight into the pool at their final place with no reorder buffer, and
//! loss on the links this runs over (memif, a LAN) is rare.

use std::collections::VecDeque;

/// Sequence numbers wrap; `a` is before `b` when `b - a` (wrapping) is below 2^31.
fn before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// Where one frame's bytes come from: `len` bytes at `offset` of batch `batch_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRef {
    pub batch_seq: u64,
    pub offset: u32,
    pub len: u32,
}

/// Retransmission timing.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub rto_min_ns: u64,
    pub rto_max_ns: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            rto_min_ns: 2_000_000,
            rto_max_ns: 200_000_000,
        }
    }
}

/// The publisher's side of a session's frames.
#[derive(Debug)]
pub struct Sender {
    /// Every frame before this one is acknowledged.
    acked: u32,
    /// Frames `acked..` not acknowledged yet, with when each was last sent (0: never) and
    /// whether it was sent more than once.
    queue: VecDeque<(FrameRef, u64, bool)>,
    /// Index in `queue` of the next frame to send.
    cursor: usize,
    /// Frames before this one may be in flight.
    window_end: u32,
    dup_acks: u32,
    /// A go-back is under way: duplicate acks do not start another until the ack moves.
    recovering: bool,
    rto_ns: u64,
    /// Smoothed round trip and its variation (RFC 6298), from frames sent once (Karn):
    /// the timeout follows the link and the peer's scheduling instead of a fixed guess.
    srtt_ns: u64,
    rttvar_ns: u64,
    timing: Timing,
    last_ack_ns: u64,
}

impl Sender {
    /// A sender whose first frame is `first_seq`, allowed `window` frames until the
    /// receiver says otherwise.
    pub fn new(first_seq: u32, window: u32, timing: Timing) -> Sender {
        Sender {
            acked: first_seq,
            queue: VecDeque::new(),
            cursor: 0,
            window_end: first_seq.wrapping_add(window),
            dup_acks: 0,
            recovering: false,
            rto_ns: timing.rto_min_ns,
            srtt_ns: 0,
            rttvar_ns: 0,
            timing,
            last_ack_ns: 0,
        }
    }

    /// Queues a frame; it is sent when the window allows.
    pub fn push(&mut self, f: FrameRef) {
        self.queue.push_back((f, 0, false));
    }

    /// The next frame to put on the wire now: its sequence number, and whether it was sent
    /// before.
    pub fn next(&mut self, now_ns: u64) -> Option<(u32, FrameRef, bool)> {
        if self.recovering && self.cursor > 0 {
            // After a go-back, the oldest unacknowledged frame goes alone until the ack
            // moves (TCP's window of one after a loss): resending the whole window at once
            // let a loss that recurs with the window's period hit the same frame every time
            // (found by the property test below).
            return None;
        }
        let (f, sent, resent) = self.queue.get_mut(self.cursor)?;
        let seq = self.acked.wrapping_add(self.cursor as u32);
        if !before(seq, self.window_end) {
            return None;
        }
        let again = *sent != 0;
        if again {
            *resent = true;
        }
        *sent = now_ns.max(1);
        self.cursor += 1;
        Some((seq, *f, again))
    }

    /// An ack: every frame before `next_expected` arrived; `window` more may be in flight.
    /// Returns the frames it acknowledged, oldest first.
    pub fn on_ack(
        &mut self,
        next_expected: u32,
        window: u32,
        now_ns: u64,
    ) -> impl Iterator<Item = FrameRef> + '_ {
        let mut done = 0;
        if before(self.acked, next_expected) {
            done = (next_expected.wrapping_sub(self.acked) as usize).min(self.queue.len());
            if let Some(&(_, sent, false)) = done.checked_sub(1).and_then(|k| self.queue.get(k)) {
                if sent != 0 {
                    self.sample_rtt(now_ns.saturating_sub(sent));
                }
            }
            self.acked = self.acked.wrapping_add(done as u32);
            self.cursor = self.cursor.saturating_sub(done);
            self.dup_acks = 0;
            self.recovering = false;
            self.rto_ns = self.base_rto();
            self.last_ack_ns = now_ns;
        } else if next_expected == self.acked && self.cursor > 0 && !self.recovering {
            self.dup_acks += 1;
            if self.dup_acks >= 3 {
                self.go_back();
            }
        }
        let end = next_expected.wrapping_add(window);
        if before(self.window_end, end) || next_expected == self.acked {
            self.window_end = end;
        }
        if window > 0 {
            self.last_ack_ns = self.last_ack_ns.max(now_ns);
        }
        self.queue.drain(..done).map(|(f, _, _)| f)
    }

    /// Time passes: resends from the oldest unacknowledged frame when it has waited a
    /// retransmission timeout, and probes a closed window.
    pub fn on_tick(&mut self, now_ns: u64) {
        let Some(&(_, first_sent, _)) = self.queue.front() else {
            return;
        };
        if self.cursor > 0 && now_ns.saturating_sub(first_sent) > self.rto_ns {
            self.go_back();
            self.rto_ns = (self.rto_ns * 2).min(self.timing.rto_max_ns);
        } else if self.cursor == 0
            && !before(self.acked, self.window_end)
            && now_ns.saturating_sub(self.last_ack_ns) > self.rto_ns
        {
            // A closed window: one frame as a probe (the receiver drops it or takes it, and
            // acks either way with its window).
            self.window_end = self.acked.wrapping_add(1);
            self.last_ack_ns = now_ns;
            self.rto_ns = (self.rto_ns * 2).min(self.timing.rto_max_ns);
        }
    }

    fn sample_rtt(&mut self, r: u64) {
        if self.srtt_ns == 0 {
            self.srtt_ns = r;
            self.rttvar_ns = r / 2;
        } else {
            let d = self.srtt_ns.abs_diff(r);
            self.rttvar_ns = (3 * self.rttvar_ns + d) / 4;
            self.srtt_ns = (7 * self.srtt_ns + r) / 8;
        }
    }

    /// The retransmission timeout before any backoff.
    fn base_rto(&self) -> u64 {
        (self.srtt_ns + 4 * self.rttvar_ns).clamp(self.timing.rto_min_ns, self.timing.rto_max_ns)
    }

    /// Takes back the frames handed out by [`next`](Self::next) from `seq` on (the port did
    /// not take them: a full transmit ring is no loss), to be handed out again next.
    pub fn rewind_to(&mut self, seq: u32) {
        let at = seq.wrapping_sub(self.acked) as usize;
        if at < self.cursor {
            self.cursor = at;
        }
    }

    fn go_back(&mut self) {
        self.cursor = 0;
        self.dup_acks = 0;
        self.recovering = true;
    }
}

/// A data frame's header fields, as the receiver checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataFrame {
    pub seq: u32,
    pub batch_seq: u64,
    pub batch_bytes: u32,
    pub num_msg: u32,
    pub offset: u32,
}

/// Where the receiver puts batches (the broker: a session's grants in the pool).
pub trait Landing {
    /// Room for a batch of `bytes`: where it goes, or `None` while there is none (no grant
    /// with room, or the previous batch is not handed on yet).
    fn place(&mut self, bytes: u32) -> Result<Option<u64>, String>;
    /// Writes `bytes` at `at` (inside a place given by [`Landing::place`]).
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<(), String>;
}

/// A batch the receiver has whole, at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Complete {
    pub batch_seq: u64,
    pub num_msg: u32,
    pub bytes: u32,
    pub at: u64,
}

/// What the receiver made of a data frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Taken (and a batch completed with it, if one did).
    Took(Option<Complete>),
    /// Already taken: a duplicate or a resend (ack again).
    Stale,
    /// Past a frame that has not arrived (ack again: a duplicate ack).
    Ahead,
    /// No room for its batch yet (not taken; ack with a closed window).
    NoRoom,
    /// A protocol violation: the session ends with this reason.
    Violation(String),
}

#[derive(Clone, Copy, Debug)]
struct Partial {
    batch_seq: u64,
    bytes: u32,
    num_msg: u32,
    have: u32,
    at: u64,
}

/// The broker's side of a session's frames.
#[derive(Debug)]
pub struct Receiver {
    expected: u32,
    batch_limit: u32,
    batch: Option<Partial>,
}

impl Receiver {
    pub fn new(first_seq: u32, batch_limit: u32) -> Receiver {
        Receiver {
            expected: first_seq,
            batch_limit,
            batch: None,
        }
    }

    /// The next sequence number it takes (what an ack carries).
    pub fn expected(&self) -> u32 {
        self.expected
    }

    /// Whether a batch is half received.
    pub fn mid_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// Bytes of the batch being received that have not arrived (0 between batches).
    pub fn batch_left(&self) -> u32 {
        self.batch.map_or(0, |b| b.bytes - b.have)
    }

    pub fn on_data(&mut self, f: &DataFrame, payload: &[u8], land: &mut impl Landing) -> Verdict {
        if f.seq != self.expected {
            return if before(f.seq, self.expected) {
                Verdict::Stale
            } else {
                Verdict::Ahead
            };
        }
        if payload.is_empty() {
            return Verdict::Violation(format!("frame {} carries no bytes", f.seq));
        }
        let b = match self.batch {
            None => {
                if f.offset != 0 {
                    return Verdict::Violation(format!(
                        "frame {} starts batch {} at offset {}",
                        f.seq, f.batch_seq, f.offset
                    ));
                }
                if f.num_msg == 0 || f.batch_bytes == 0 || f.batch_bytes % 64 != 0 {
                    return Verdict::Violation(format!(
                        "batch {} of {} messages in {} bytes",
                        f.batch_seq, f.num_msg, f.batch_bytes
                    ));
                }
                if f.batch_bytes > self.batch_limit {
                    return Verdict::Violation(format!(
                        "batch {} of {} bytes, more than the {} of a batch",
                        f.batch_seq, f.batch_bytes, self.batch_limit
                    ));
                }
                match land.place(f.batch_bytes) {
                    Ok(Some(at)) => Partial {
                        batch_seq: f.batch_seq,
                        bytes: f.batch_bytes,
                        num_msg: f.num_msg,
                        have: 0,
                        at,
                    },
                    Ok(None) => return Verdict::NoRoom,
                    Err(why) => return Verdict::Violation(why),
                }
            }
            Some(b) => {
                if (f.batch_seq, f.batch_bytes, f.num_msg, f.offset)
                    != (b.batch_seq, b.bytes, b.num_msg, b.have)
                {
                    return Verdict::Violation(format!(
                        "frame {} (batch {} offset {}) inside batch {} at offset {}",
                        f.seq, f.batch_seq, f.offset, b.batch_seq, b.have
                    ));
                }
                b
            }
        };
        let len = payload.len() as u64;
        if u64::from(b.have) + len > u64::from(b.bytes) {
            self.batch = Some(b);
            return Verdict::Violation(format!(
                "frame {} overruns batch {}: {} bytes at offset {} of {}",
                f.seq, b.batch_seq, len, b.have, b.bytes
            ));
        }
        if let Err(why) = land.write(b.at + u64::from(b.have), payload) {
            return Verdict::Violation(why);
        }
        self.expected = self.expected.wrapping_add(1);
        let have = b.have + len as u32;
        if have == b.bytes {
            self.batch = None;
            return Verdict::Took(Some(Complete {
                batch_seq: b.batch_seq,
                num_msg: b.num_msg,
                bytes: b.bytes,
                at: b.at,
            }));
        }
        self.batch = Some(Partial { have, ..b });
        Verdict::Took(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A landing in a Vec, with room for `room` batches at a time.
    struct VecLanding {
        bytes: Vec<u8>,
        room: usize,
        open: usize,
    }

    impl Landing for VecLanding {
        fn place(&mut self, bytes: u32) -> Result<Option<u64>, String> {
            if self.open >= self.room {
                return Ok(None);
            }
            self.open += 1;
            let at = self.bytes.len() as u64;
            self.bytes.resize(self.bytes.len() + bytes as usize, 0);
            Ok(Some(at))
        }
        fn write(&mut self, at: u64, b: &[u8]) -> Result<(), String> {
            self.bytes[at as usize..at as usize + b.len()].copy_from_slice(b);
            Ok(())
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Fate {
        Deliver,
        Drop,
        Duplicate,
        Delay,
    }

    fn fate() -> impl Strategy<Value = Fate> {
        prop_oneof![
            8 => Just(Fate::Deliver),
            1 => Just(Fate::Drop),
            1 => Just(Fate::Duplicate),
            1 => Just(Fate::Delay),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the link does to frames and acks (loss, duplication, reordering), the
        /// receiver puts together exactly the batches sent, in order, each byte right.
        #[test]
        fn batches_arrive_whole_and_in_order_over_a_lossy_link(
            sizes in prop::collection::vec(1u32..40, 1..12),
            fates in prop::collection::vec(fate(), 64),
            ack_fates in prop::collection::vec(fate(), 64),
            first_seq in any::<u32>(),
            frame_bytes in 64u32..300,
            room in 1usize..3,
        ) {
            // Batches of `size` 64-byte lines, each byte naming its batch and position.
            let batches: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &s)| {
                (0..s * 64).map(|k| (i as u32 * 31 + k) as u8).collect()
            }).collect();
            let mut tx = Sender::new(first_seq, 16, Timing { rto_min_ns: 10, rto_max_ns: 80 });
            for (i, b) in batches.iter().enumerate() {
                let mut off = 0;
                while off < b.len() as u32 {
                    let len = frame_bytes.min(b.len() as u32 - off);
                    tx.push(FrameRef { batch_seq: i as u64, offset: off, len });
                    off += len;
                }
            }
            let mut rx = Receiver::new(first_seq, 1 << 20);
            let mut land = VecLanding { bytes: Vec::new(), room, open: 0 };
            let mut done: Vec<Complete> = Vec::new();
            let mut wire: VecDeque<(u32, FrameRef)> = VecDeque::new();
            let mut acks: VecDeque<(u32, u32)> = VecDeque::new();
            let (mut k, mut ka) = (0usize, 0usize);
            let mut now = 0u64;
            while done.len() < batches.len() {
                now += 1;
                prop_assert!(now < 1_000_000, "stuck: {} of {} batches", done.len(), batches.len());
                while let Some((seq, f, _)) = tx.next(now) {
                    let f = (seq, f);
                    match fates[k % fates.len()] {
                        Fate::Deliver => wire.push_back(f),
                        Fate::Drop => {}
                        Fate::Duplicate => { wire.push_back(f); wire.push_back(f); }
                        Fate::Delay => wire.push_front(f),
                    }
                    k += 1;
                }
                // The landing hands on completed batches (frees room) a step later.
                land.open = land.open.saturating_sub(1);
                if let Some((seq, f)) = wire.pop_front() {
                    let b = &batches[f.batch_seq as usize];
                    let df = DataFrame {
                        seq, batch_seq: f.batch_seq, batch_bytes: b.len() as u32,
                        num_msg: 1, offset: f.offset,
                    };
                    let payload = &b[f.offset as usize..(f.offset + f.len) as usize];
                    match rx.on_data(&df, payload, &mut land) {
                        Verdict::Took(Some(c)) => done.push(c),
                        Verdict::Violation(why) => prop_assert!(false, "violation: {why}"),
                        _ => {}
                    }
                    let window = if land.open >= land.room { 0 } else { 16 };
                    let a = (rx.expected(), window);
                    match ack_fates[ka % ack_fates.len()] {
                        Fate::Drop => {}
                        Fate::Duplicate => { acks.push_back(a); acks.push_back(a); }
                        Fate::Delay => acks.push_front(a),
                        Fate::Deliver => acks.push_back(a),
                    }
                    ka += 1;
                }
                while let Some((e, w)) = acks.pop_front() {
                    let _ = tx.on_ack(e, w, now).count();
                }
                tx.on_tick(now);
            }
            for (i, c) in done.iter().enumerate() {
                prop_assert_eq!(c.batch_seq, i as u64);
                let got = &land.bytes[c.at as usize..(c.at + u64::from(c.bytes)) as usize];
                prop_assert_eq!(got, &batches[i][..]);
            }
        }
    }

    #[test]
    fn a_frame_that_overruns_its_batch_ends_the_session() {
        let mut rx = Receiver::new(0, 4096);
        let mut land = VecLanding {
            bytes: Vec::new(),
            room: 1,
            open: 0,
        };
        let f = DataFrame {
            seq: 0,
            batch_seq: 0,
            batch_bytes: 128,
            num_msg: 1,
            offset: 0,
        };
        assert_eq!(rx.on_data(&f, &[1; 100], &mut land), Verdict::Took(None));
        let f2 = DataFrame {
            seq: 1,
            offset: 100,
            ..f
        };
        assert!(matches!(
            rx.on_data(&f2, &[1; 64], &mut land),
            Verdict::Violation(w) if w.contains("overruns")
        ));
    }

    #[test]
    fn frames_out_of_order_or_again_are_not_taken() {
        let mut rx = Receiver::new(u32::MAX, 4096);
        let mut land = VecLanding {
            bytes: Vec::new(),
            room: 4,
            open: 0,
        };
        let f = DataFrame {
            seq: u32::MAX,
            batch_seq: 0,
            batch_bytes: 64,
            num_msg: 1,
            offset: 0,
        };
        let ahead = DataFrame { seq: 0, ..f };
        assert_eq!(rx.on_data(&ahead, &[0; 64], &mut land), Verdict::Ahead);
        assert!(matches!(
            rx.on_data(&f, &[0; 64], &mut land),
            Verdict::Took(Some(_))
        ));
        assert_eq!(rx.expected(), 0, "wraps");
        assert_eq!(rx.on_data(&f, &[0; 64], &mut land), Verdict::Stale);
    }

    #[test]
    fn a_closed_window_is_probed_after_a_timeout() {
        let t = Timing {
            rto_min_ns: 100,
            rto_max_ns: 1000,
        };
        let mut tx = Sender::new(0, 0, t);
        tx.push(FrameRef {
            batch_seq: 0,
            offset: 0,
            len: 64,
        });
        assert_eq!(tx.next(1), None, "window closed");
        tx.on_tick(50);
        assert_eq!(tx.next(51), None);
        tx.on_tick(200);
        assert_eq!(tx.next(201).map(|(s, _, _)| s), Some(0), "one probe");
    }
}
