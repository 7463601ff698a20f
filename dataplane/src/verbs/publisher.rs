//! A remote publisher on the verbs transport. Batches are built in registered local buffers
//! (the one copy of the data on this side) and RDMA-written into the broker's grants; see
//! the protocol in [`super`]. Same batching rules as the shm publisher: seal at the batch
//! size, on `flush`, or after the linger time; dense per-client `batch_seq`; batches striped
//! round-robin over the brokers.
//!
//! **Failover.** A broker is gone when its session's TCP connection ends or a write to it
//! fails (its QP is then moved to the error state, which completes everything still posted).
//! What it had not acknowledged goes to the live brokers, unchanged (same `batch_seq`): a
//! batch whose writes completed is already in the pool, in the dead broker's grant, so only
//! its descriptor goes, asking the live broker to copy it from there into its grant
//! ([`Staged::copy_from`]; the broker checks the copy like any batch); a batch whose writes
//! did not complete is still in its local buffer and is written again. The sequencer drops
//! the copies it had ordered already and they are acked again, as for the TCP publisher.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use embar_sys::clock::monotonic_ns;
use embar_sys::verbs::{
    Completion, CompletionQueue, Context, Endpoint, QueuePair, RegisteredBuffer, VerbsError, Write,
};

use super::credits::StagingCredits;
use super::frontend::describe_code;
use super::*;
use crate::client::filling::{
    next_live, resend_order, resend_target, stride_of, Acks, Every, Filling,
};
use crate::client::publisher::{PublishError, PublisherConfig};
use crate::client::Publish;
use crate::sync::Ordering::Acquire;

/// How often a publisher waiting on its brokers looks whether their connections still stand.
const LIVENESS_CHECK: Duration = Duration::from_millis(10);
/// How often a caller timing acks looks at them (see `Publish::ack_poll_interval`).
const ACK_POLL_INTERVAL: Duration = Duration::from_micros(50);
/// Local batch buffers (batches in flight per publisher).
const BUFFERS: usize = 8;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct VerbsConfig {
    /// RDMA device (the first one when `None`).
    pub device: Option<String>,
    /// GID index (RoCEv2 over IPv4: usually 1 on rxe; `show_gids` on a NIC).
    pub gid_index: u8,
    pub publisher: PublisherConfig,
}

struct Grant {
    offset: u64,
    bytes: u64,
    addr: u64,
    rkey: u32,
    used: u64,
}

struct Link {
    broker: u32,
    /// The broker's verbs port.
    addr: SocketAddr,
    qp: QueuePair,
    /// The session's lifeline (non-blocking once the session is up): its end is the
    /// broker's.
    stream: TcpStream,
    feedback: RegisteredBuffer,
    staging_addr: u64,
    staging_rkey: u32,
    /// Which staging slot the next descriptor goes to, once the broker has taken enough.
    credits: StagingCredits,
    taken: u64,
    grant: Option<Grant>,
    /// Cleared once its broker is gone: nothing more goes to it.
    live: bool,
    /// Buffers with writes posted on this QP and no completion seen yet.
    posted: Vec<usize>,
    /// Messages staged on this session (its acknowledgements count up to it).
    staged: u64,
    /// Staged batches not yet acknowledged, oldest first (not kept at ACK 0).
    inflight: VecDeque<InFlight>,
}

/// Where a sealed batch's bytes are, for a resend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bytes {
    /// In this local buffer, written (or to be written) and not yet known to have landed.
    Local(usize),
    /// In the pool at this offset: landed (the writes completed), or the source of a resend
    /// by copy.
    Pool(u64),
}

/// A sealed batch, kept until its broker acknowledges it.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    /// As staged on its link (its place in that link's grant).
    desc: crate::batch::BatchDesc,
    bytes: Bytes,
    /// Its link's `staged` once it was staged.
    upto: u64,
    first_ns: u64,
}

impl Link {
    fn fb(&self) -> &Feedback {
        // SAFETY: the region is page-aligned, at least `size_of::<Feedback>()` bytes, zeroed
        // at creation (a valid Feedback: atomics), and lives as long as `self`. The broker
        // writes it by RDMA; every field is an atomic read here.
        unsafe { &*self.feedback.as_ptr().cast::<Feedback>() }
    }

    /// Whether a write the broker refused (remote access error) is its process dying rather
    /// than a write outside the grant: a broker process that exits deregisters its memory
    /// before its QPs are gone, so writes in flight are refused on the way. Told apart by the
    /// broker's verbs port: a dying broker's session ends (within a second) and its port no
    /// longer takes connections; a live broker that refused the write (and ended the session
    /// for it) still does.
    fn dying(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.lifeline_ended() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (0..3).any(|k| {
            if k > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err()
        })
    }

    /// Whether the session's TCP connection has ended (the broker process is gone, or it
    /// dropped the session). Nothing is expected on it after the handshake.
    fn lifeline_ended(&mut self) -> bool {
        use std::io::{ErrorKind, Read};
        let mut b = [0u8; 64];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
        }
    }
}

struct OpenBatch {
    link: usize,
    /// The local batch buffer it is built in.
    buffer: usize,
    /// Pool offset of the batch at the broker (where it will be written).
    start: u64,
    batch: Filling,
}

/// See the module docs.
pub struct VerbsPublisher {
    _ctx: Arc<Context>,
    cq: Arc<CompletionQueue>,
    client_id: u64,
    batch_bytes: u64,
    ack: u8,
    cfg: PublisherConfig,
    links: Vec<Link>,
    next_link: usize,
    /// Batch buffers, each `batch_bytes` followed by its 64-byte descriptor.
    buffers: RegisteredBuffer,
    free: Vec<usize>,
    batch_seq: u64,
    open: Option<OpenBatch>,
    sealed_messages: u64,
    acks: Acks,
    /// Sealed batches whose broker died before it acknowledged them, to send again.
    orphans: VecDeque<InFlight>,
    /// When the links' connections are looked at next.
    liveness: Every,
    resent_batches: u64,
    grant_waits: u64,
    staging_waits: u64,
    completions: Vec<Completion>,
    failure: Option<String>,
}

fn transport(e: impl std::fmt::Display) -> PublishError {
    PublishError::Transport(e.to_string())
}

impl VerbsPublisher {
    /// Connects to each broker's verbs port (`(pool slot, address)`) for `topic`.
    pub fn connect(
        brokers: &[(u32, SocketAddr)],
        topic: &str,
        client_id: u64,
        cfg: &VerbsConfig,
    ) -> Result<VerbsPublisher, PublishError> {
        if brokers.is_empty() {
            return Err(PublishError::NoBrokers);
        }
        let ctx = Context::open(cfg.device.as_deref(), cfg.gid_index).map_err(transport)?;
        let cq = CompletionQueue::new(&ctx, (BUFFERS * 4 * brokers.len()) as u32 + 16)
            .map_err(transport)?;
        let mut links = Vec::new();
        let mut batch_bytes = u64::MAX;
        let mut ack = 1;
        for &(slot, addr) in brokers {
            let (link, bb, a) = Self::handshake(&ctx, &cq, slot, addr, topic, client_id, cfg)?;
            batch_bytes = batch_bytes.min(bb);
            ack = a;
            links.push(link);
        }
        let stride = batch_bytes as usize + SLOT_BYTES;
        let buffers = RegisteredBuffer::new(&ctx, stride * BUFFERS, false).map_err(transport)?;
        Ok(VerbsPublisher {
            _ctx: ctx,
            cq,
            client_id,
            batch_bytes,
            ack,
            cfg: cfg.publisher,
            links,
            next_link: 0,
            buffers,
            free: (0..BUFFERS).rev().collect(),
            batch_seq: 0,
            open: None,
            sealed_messages: 0,
            acks: Acks::default(),
            orphans: VecDeque::new(),
            liveness: Every::new(LIVENESS_CHECK),
            resent_batches: 0,
            grant_waits: 0,
            staging_waits: 0,
            completions: Vec::with_capacity(16),
            failure: None,
        })
    }

    fn handshake(
        ctx: &Arc<Context>,
        cq: &Arc<CompletionQueue>,
        broker: u32,
        addr: SocketAddr,
        topic: &str,
        client_id: u64,
        cfg: &VerbsConfig,
    ) -> Result<(Link, u64, u8), PublishError> {
        let refused = |reason: String| {
            PublishError::Transport(format!("broker {broker} at {addr}: {reason}"))
        };
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
                refused(format!(
                    "cannot connect to its verbs port: {e} (is the broker running with --verbs?)"
                ))
            })?;
        stream
            .set_read_timeout(Some(cfg.publisher.wait_timeout))
            .map_err(|e| refused(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut qp = QueuePair::new(ctx, cq, cq, (BUFFERS * 2 + 4) as u32, 1).map_err(transport)?;
        let feedback =
            RegisteredBuffer::new(ctx, std::mem::size_of::<Feedback>(), true).map_err(transport)?;
        if topic.split_ascii_whitespace().count() != 1 || topic.len() > 256 {
            return Err(PublishError::Transport(format!("bad topic name {topic:?}")));
        }
        writeln!(
            stream,
            "{HELLO} topic={topic} client={client_id} ep={} feedback={}:{}",
            qp.endpoint(),
            feedback.mr().addr(),
            feedback.mr().rkey()
        )
        .map_err(|e| refused(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(stream.try_clone().map_err(|e| refused(e.to_string()))?)
            .read_line(&mut line)
            .map_err(|e| refused(format!("no answer: {e}")))?;
        let line = line.trim_end();
        if let Some(reason) = line.strip_prefix("ERR ") {
            return Err(PublishError::Refused {
                broker,
                reason: reason.to_string(),
            });
        }
        if !line.starts_with("OK ") {
            return Err(refused(format!("unexpected answer {line:?}")));
        }
        let bad = |e: &dyn std::fmt::Display| refused(format!("bad answer {line:?}: {e}"));
        let ep: Endpoint = field(line, "ep")
            .map_err(|e| bad(&e))?
            .parse()
            .map_err(|e: VerbsError| bad(&e))?;
        let st =
            parse_nums(field(line, "staging").map_err(|e| bad(&e))?, 3).map_err(|e| bad(&e))?;
        let batch_bytes: u64 = field(line, "batch_bytes")
            .map_err(|e| bad(&e))?
            .parse()
            .map_err(|_| bad(&"batch_bytes"))?;
        let ack: u8 = field(line, "ack")
            .map_err(|e| bad(&e))?
            .parse()
            .map_err(|_| bad(&"ack"))?;
        if st[1] > u64::from(u32::MAX) || st[2] == 0 || st[2] > 1 << 16 || batch_bytes < 128 {
            return Err(bad(&"out of range"));
        }
        qp.connect(&ep, true).map_err(transport)?;
        stream
            .write_all(b"READY\n")
            .map_err(|e| refused(e.to_string()))?;
        // From here on it is only watched for its end (`Link::lifeline_ended`).
        stream
            .set_nonblocking(true)
            .map_err(|e| refused(e.to_string()))?;
        Ok((
            Link {
                broker,
                addr,
                qp,
                stream,
                feedback,
                staging_addr: st[0],
                staging_rkey: st[1] as u32,
                credits: StagingCredits::new(st[2] as u32),
                taken: 0,
                grant: None,
                live: true,
                posted: Vec::new(),
                staged: 0,
                inflight: VecDeque::new(),
            },
            batch_bytes,
            ack,
        ))
    }

    /// Times the publisher waited for a grant (credits) and for a staging slot.
    pub fn waits(&self) -> (u64, u64) {
        (self.grant_waits, self.staging_waits)
    }

    /// Batches sent again to a live broker after theirs died.
    pub fn resent_batches(&self) -> u64 {
        self.resent_batches
    }

    /// Brokers this publisher still sends to.
    pub fn live_brokers(&self) -> usize {
        self.links.iter().filter(|l| l.live).count()
    }

    /// Reaps send completions: a buffer whose writes completed is free again (its batch is
    /// in the pool now); a failed write takes its link down (its broker is gone), unless the
    /// broker refused the range (a bug or a rogue: the publisher fails).
    fn reap(&mut self) -> Result<(), PublishError> {
        let mut down: Vec<(usize, String)> = Vec::new();
        loop {
            self.completions.clear();
            if self.cq.poll(&mut self.completions).map_err(transport)? == 0 {
                break;
            }
            for k in 0..self.completions.len() {
                let c = self.completions[k];
                let buffer = c.wr_id as usize;
                let Some(i) = self.links.iter().position(|l| l.qp.qp_num() == c.qp_num) else {
                    continue;
                };
                let l = &mut self.links[i];
                let Some(at) = l.posted.iter().position(|&b| b == buffer) else {
                    // The second completion of a chain that failed (both carry the buffer).
                    continue;
                };
                l.posted.swap_remove(at);
                // At most one batch per buffer is still in it, among the newest: searched
                // from the back.
                let holder = l
                    .inflight
                    .iter_mut()
                    .rev()
                    .chain(self.orphans.iter_mut())
                    .find(|f| f.bytes == Bytes::Local(buffer));
                if c.ok() {
                    if let Some(f) = holder {
                        f.bytes = Bytes::Pool(f.desc.log_idx);
                    }
                    self.free.push(buffer);
                    continue;
                }
                // Its batch (if it still waits for an ack) is sent again from the buffer.
                if holder.is_none() {
                    self.free.push(buffer);
                }
                let l = &mut self.links[i];
                if c.remote_access_error() && self.failure.is_none() && l.live && !l.dying() {
                    self.failure = Some(format!(
                        "RDMA write to broker {} failed: {} (outside the space the broker granted)",
                        l.broker,
                        c.status_str()
                    ));
                }
                if l.live && !down.iter().any(|(d, _)| *d == i) {
                    down.push((i, c.status_str()));
                }
            }
        }
        if let Some(f) = &self.failure {
            return Err(PublishError::Transport(f.clone()));
        }
        for (i, why) in down {
            self.link_down(i, &format!("a write to it failed: {why}"))?;
        }
        Ok(())
    }

    /// Retires what link `i`'s broker acknowledged. The broker's clock is another host's: an
    /// ack is timed when it is seen here.
    fn retire(&mut self, i: usize) {
        let l = &mut self.links[i];
        let acked = l.fb().counters.acked_messages.load(Acquire);
        self.acks.retire(
            &mut l.inflight,
            |f| (&f.desc, f.upto, f.first_ns),
            acked,
            monotonic_ns,
        );
    }

    /// Looks (at most every [`LIVENESS_CHECK`]) whether the live links' connections still
    /// stand, and sends a dead one's batches again.
    fn check_links(&mut self) -> Result<(), PublishError> {
        if !self.liveness.due() {
            return Ok(());
        }
        for i in 0..self.links.len() {
            if self.links[i].live && self.links[i].lifeline_ended() {
                self.link_down(i, "its connection ended")?;
            }
        }
        Ok(())
    }

    /// Link `i`'s broker is gone: its QP goes to the error state (what is still posted
    /// completes, flushed), and what it had not acknowledged (and the open batch, if it is for
    /// it) joins the orphans, sent again to the live brokers.
    fn link_down(&mut self, i: usize, why: &str) -> Result<(), PublishError> {
        if !self.links[i].live {
            return Ok(());
        }
        self.retire(i);
        let l = &mut self.links[i];
        l.live = false;
        l.grant = None;
        if let Err(e) = l.qp.to_error() {
            log::warn!("broker {}: {e}", l.broker);
        }
        let mut pending: Vec<InFlight> = l.inflight.drain(..).collect();
        if self.open.as_ref().is_some_and(|o| o.link == i) {
            let open = self.open.take().expect("open");
            let (_, f) = self.finish(open);
            pending.push(f);
        }
        log::warn!(
            "publisher {}: broker {} is gone ({why}); sending its {} unacknowledged batch(es) to the live brokers",
            self.client_id,
            self.links[i].broker,
            pending.len()
        );
        if self.ack == 0 {
            // Nothing was promised: whatever it had not ordered is lost. (Buffers still
            // posted come back with their flushed completions.)
            for f in pending {
                if let Bytes::Local(b) = f.bytes {
                    if !self.links[i].posted.contains(&b) {
                        self.free.push(b);
                    }
                }
            }
            log::warn!(
                "publisher {}: batches of ACK 0 broker {} had not ordered are lost",
                self.client_id,
                self.links[i].broker
            );
            return Ok(());
        }
        // Queued before its flushed writes are reaped, which mark what landed (`reap` finds
        // them among the orphans).
        resend_order(&mut pending);
        self.orphans.extend(pending);
        // Its flushed writes free their buffers first (the NIC reads them no more).
        let deadline = Instant::now() + self.cfg.wait_timeout;
        while !self.links[i].posted.is_empty() {
            self.reap()?;
            if Instant::now() > deadline {
                return Err(PublishError::Timeout {
                    what: format!(
                        "the flushed writes of broker {} to complete",
                        self.links[i].broker
                    ),
                    waited: self.cfg.wait_timeout,
                });
            }
            std::thread::yield_now();
        }
        // Those still in a local buffer first: they hold the buffers a resend by copy needs
        // for its descriptor, and they are the newest, which the broker may not have ordered.
        self.orphans
            .make_contiguous()
            .sort_by_key(|f| !matches!(f.bytes, Bytes::Local(_)));
        self.drain_orphans()
    }

    /// Sends every orphan again, each to a live broker (round-robin by `batch_seq`).
    fn drain_orphans(&mut self) -> Result<(), PublishError> {
        if self.orphans.is_empty() {
            return Ok(());
        }
        // The open batch is for a live link's grant, where the resends go: it goes first.
        if self.open.is_some() {
            self.seal()?;
        }
        while let Some(f) = self.orphans.pop_front() {
            let k = resend_target(
                self.links.iter().map(|l| l.live),
                f.desc.batch_seq,
                self.orphans.len() + 1,
            )?;
            if let Err(e) = self.stage(k, f) {
                // `stage` put it back with the orphans if its link went down meanwhile.
                if self.links[k].live {
                    return Err(e);
                }
                continue;
            }
            self.resent_batches += 1;
        }
        Ok(())
    }

    /// Stages orphan `f` on live link `k`: room in `k`'s grant, then the writes (the bytes
    /// from its buffer, or only the descriptor asking for a copy from the pool).
    fn stage(&mut self, k: usize, f: InFlight) -> Result<(), PublishError> {
        let size = f.desc.total_size;
        let (offset, _) = match self.room(k, size) {
            Ok(r) => r,
            Err(e) => {
                self.orphans.push_front(f);
                return Err(e);
            }
        };
        let desc = crate::batch::BatchDesc {
            broker_id: self.links[k].broker,
            log_idx: offset,
            ..f.desc
        };
        let (buffer, copy_from) = match f.bytes {
            Bytes::Local(b) => (b, None),
            Bytes::Pool(at) => match self.take_buffer() {
                Ok(b) => (b, Some(at)),
                Err(e) => {
                    self.orphans.push_front(f);
                    return Err(e);
                }
            },
        };
        let staged = Staged { desc, copy_from };
        if let Err(e) = self.post(k, buffer, &staged) {
            if copy_from.is_some() {
                self.free.push(buffer);
            }
            self.orphans.push_front(f);
            return Err(e);
        }
        self.note_staged(k, InFlight { desc, ..f });
        Ok(())
    }

    fn take_buffer(&mut self) -> Result<usize, PublishError> {
        self.wait(|_| "a free batch buffer".into(), |p| p.free.pop())
    }

    fn wait<T>(
        &mut self,
        what: impl Fn(&Self) -> String,
        mut f: impl FnMut(&mut Self) -> Option<T>,
    ) -> Result<T, PublishError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            self.reap()?;
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if let Some(l) = self
                .links
                .iter()
                .find(|l| l.live && l.fb().counters.closed.load(Acquire) != 0)
            {
                let code = l.fb().counters.closed.load(Acquire);
                return Err(PublishError::Transport(format!(
                    "broker {} ended the session: {}",
                    l.broker,
                    describe_code(code)
                )));
            }
            if start.elapsed() > LIVENESS_CHECK {
                self.check_links()?;
            }
            if start.elapsed() > self.cfg.wait_timeout {
                return Err(PublishError::Timeout {
                    what: format!(
                        "{}{}",
                        what(self),
                        crate::replication::describe_faults(&self.disk_faults())
                    ),
                    waited: start.elapsed(),
                });
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The next live link in the round-robin.
    fn next_live(&mut self) -> Result<usize, PublishError> {
        let links = &self.links;
        next_live(&mut self.next_link, links.len(), |i| links[i].live)
    }

    /// Where link `i`'s current grant has at least `need` bytes free (taking the next grant
    /// when it has not): `(pool offset, free bytes)`. Nothing is marked used.
    fn room(&mut self, i: usize, need: u64) -> Result<(u64, u64), PublishError> {
        let needs_grant = self.links[i]
            .grant
            .as_ref()
            .is_none_or(|g| g.used + need > g.bytes);
        if needs_grant {
            let k = self.links[i].taken;
            let mut waited = false;
            let grant = self.wait(
                |p| format!("log space from broker {} (every grant is in use: subscribers or the sequencer are behind)", p.links[i].broker),
                |p| {
                    let l = &p.links[i];
                    if !l.live {
                        // Gone while waiting: the caller finds it down.
                        return Some(None);
                    }
                    let fb = l.fb();
                    if fb.counters.grants_issued.load(Acquire) <= k {
                        waited = true;
                        return None;
                    }
                    let g = &fb.grants[crate::session::grant_slot(k)];
                    (g.number.load(Acquire) == k + 1).then(|| Some(Grant {
                        offset: g.offset.load(Acquire),
                        bytes: g.bytes.load(Acquire),
                        addr: g.addr.load(Acquire),
                        rkey: g.rkey.load(Acquire) as u32,
                        used: 0,
                    }))
                },
            )?;
            let Some(grant) = grant else {
                return Err(PublishError::Transport(format!(
                    "broker {} is gone",
                    self.links[i].broker
                )));
            };
            if waited {
                self.grant_waits += 1;
            }
            let l = &mut self.links[i];
            l.grant = Some(grant);
            l.taken = k + 1;
        }
        let g = self.links[i].grant.as_ref().expect("a grant");
        Ok((g.offset + g.used, g.bytes - g.used))
    }

    fn start_batch(&mut self, stride: u64, now: u64) -> Result<(), PublishError> {
        let buffer = self.take_buffer()?;
        let (i, start, limit) = loop {
            let i = match self.next_live() {
                Ok(i) => i,
                Err(e) => {
                    self.free.push(buffer);
                    return Err(e);
                }
            };
            match self.room(i, stride) {
                Ok((start, free)) => break (i, start, self.batch_bytes.min(free)),
                Err(_) if !self.links[i].live => continue,
                Err(e) => {
                    self.free.push(buffer);
                    return Err(e);
                }
            }
        };
        self.open = Some(OpenBatch {
            link: i,
            buffer,
            start,
            // SAFETY: buffer `buffer` was taken from `free` (not posted, so the NIC does not
            // read it) and holds `batch_bytes >= limit` bytes before its descriptor slot;
            // buffers start page-aligned and `batch_bytes + 64` is a multiple of 64.
            batch: unsafe { Filling::new(self.buffer_ptr(buffer), limit, now) },
        });
        Ok(())
    }

    fn buffer_ptr(&self, buffer: usize) -> *mut u8 {
        let stride = self.batch_bytes as usize + SLOT_BYTES;
        debug_assert!(buffer < BUFFERS);
        // SAFETY: `buffer < BUFFERS`, so the offset is inside the region.
        unsafe { self.buffers.as_ptr().add(buffer * stride) }
    }

    /// Closes the open batch: its descriptor for its link, its `batch_seq` taken.
    fn finish(&mut self, open: OpenBatch) -> (usize, InFlight) {
        let OpenBatch {
            link: i,
            buffer,
            start,
            batch: b,
        } = open;
        let desc = b.descriptor(self.client_id, self.batch_seq, self.links[i].broker, start);
        self.sealed_messages += u64::from(b.num_msg());
        self.batch_seq += 1;
        if self.ack > 0 {
            self.acks.sealed(b.num_msg());
        }
        let f = InFlight {
            desc,
            bytes: Bytes::Local(buffer),
            upto: 0,
            first_ns: b.first_ns,
        };
        (i, f)
    }

    /// Seals the open batch: payload WRITE into the grant, descriptor WRITE_WITH_IMM.
    fn seal(&mut self) -> Result<(), PublishError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let (i, f) = self.finish(open);
        let Bytes::Local(buffer) = f.bytes else {
            unreachable!("a new batch is in its buffer")
        };
        let staged = Staged {
            desc: f.desc,
            copy_from: None,
        };
        match self.post(i, buffer, &staged) {
            Ok(()) => {
                self.note_staged(i, f);
                self.drain_orphans()
            }
            Err(_) if !self.links[i].live => {
                // Its link went down while it waited for a staging slot: it goes with that
                // link's batches (its bytes are still in its buffer).
                self.orphans.push_back(f);
                self.drain_orphans()
            }
            Err(e) => {
                self.free.push(buffer);
                Err(e)
            }
        }
    }

    /// Posts `staged` on link `i` from `buffer`: the batch's bytes (unless it is a resend by
    /// copy) into its place in the grant, then the descriptor into the next staging slot.
    fn post(&mut self, i: usize, buffer: usize, staged: &Staged) -> Result<(), PublishError> {
        let mut waited = false;
        let slot = self.wait(
            |p| format!("broker {} to take staged descriptors", p.links[i].broker),
            |p| {
                let l = &p.links[i];
                if !l.live {
                    return Some(None);
                }
                let slot = l
                    .credits
                    .next_slot(l.fb().counters.staged_consumed.load(Acquire));
                waited |= slot.is_none();
                slot.map(Some)
            },
        )?;
        let Some(slot) = slot else {
            return Err(PublishError::Transport(format!(
                "broker {} is gone",
                self.links[i].broker
            )));
        };
        if waited {
            self.staging_waits += 1;
        }
        let desc = &staged.desc;
        let base = self.buffer_ptr(buffer);
        let wire = encode_staged(staged);
        // SAFETY: the descriptor slot follows the batch bytes of this buffer, inside the
        // region; the buffer is ours until its completion (taken from `free`, or given back
        // by its completion when its earlier link failed).
        unsafe {
            std::ptr::copy_nonoverlapping(
                wire.as_ptr(),
                base.add(self.batch_bytes as usize),
                SLOT_BYTES,
            )
        };
        let off = base as u64 - self.buffers.mr().addr();
        let l = &mut self.links[i];
        let g = l.grant.as_mut().expect("a batch is placed in a grant");
        let data = Write {
            wr_id: buffer as u64,
            local: self.buffers.mr().sge(off, desc.total_size as u32),
            remote_addr: g.addr + (desc.log_idx - g.offset),
            rkey: g.rkey,
            imm: None,
            signaled: false,
        };
        let descriptor = Write {
            wr_id: buffer as u64,
            local: self
                .buffers
                .mr()
                .sge(off + self.batch_bytes, SLOT_BYTES as u32),
            remote_addr: l.staging_addr + u64::from(slot) * SLOT_BYTES as u64,
            rkey: l.staging_rkey,
            imm: Some(slot),
            signaled: true,
        };
        let posted = if staged.copy_from.is_some() {
            // SAFETY: as below, for the descriptor alone.
            unsafe { l.qp.post_writes(&[descriptor]) }
        } else {
            // SAFETY: the buffer is not written again until the signaled completion of the
            // second write returns it to `free` (RC completes the first before the second).
            unsafe { l.qp.post_writes(&[data, descriptor]) }
        };
        posted.map_err(transport)?;
        l.posted.push(buffer);
        g.used += desc.total_size;
        l.credits.staged();
        Ok(())
    }

    /// `f` was staged on link `i`: kept until acknowledged.
    fn note_staged(&mut self, i: usize, mut f: InFlight) {
        if self.ack == 0 {
            return;
        }
        let l = &mut self.links[i];
        l.staged += u64::from(f.desc.num_msg);
        f.upto = l.staged;
        l.inflight.push_back(f);
        self.retire(i);
    }

    /// Writes a batch of `bytes` bytes at `remote_offset` past the start of link `link`'s
    /// current grant, ignoring every check this library makes: what a misbehaving publisher
    /// can do. For the isolation test (`embar rogue-publish --transport verbs`).
    pub fn write_unchecked(
        &mut self,
        link: usize,
        remote_offset: u64,
        bytes: u32,
    ) -> Result<(), PublishError> {
        if self.links[link].grant.is_none() {
            self.start_batch(64, monotonic_ns())?;
            if let Some(b) = self.open.take() {
                self.free.push(b.buffer);
            }
        }
        let buffer = self.wait(|_| "a free batch buffer".into(), |p| p.free.pop())?;
        let off = self.buffer_ptr(buffer) as u64 - self.buffers.mr().addr();
        let l = &mut self.links[link];
        let g = l.grant.as_ref().expect("taken above");
        let w = Write {
            wr_id: buffer as u64,
            local: self
                .buffers
                .mr()
                .sge(off, bytes.min(self.batch_bytes as u32)),
            remote_addr: g.addr + remote_offset,
            rkey: g.rkey,
            imm: None,
            signaled: true,
        };
        // SAFETY: the buffer is ours until its completion.
        unsafe { l.qp.post_writes(&[w]) }.map_err(transport)?;
        l.posted.push(buffer);
        Ok(())
    }

    /// Posts a WRITE_WITH_IMM with immediate `imm` and a descriptor `desc` into staging slot
    /// `imm % slots`, bypassing every check (the isolation test's bad immediates).
    pub fn signal_unchecked(
        &mut self,
        link: usize,
        imm: u32,
        desc: &crate::batch::BatchDesc,
    ) -> Result<(), PublishError> {
        let buffer = self.wait(|_| "a free batch buffer".into(), |p| p.free.pop())?;
        let base = self.buffer_ptr(buffer);
        let wire = encode_descriptor(desc);
        // SAFETY: inside this buffer's descriptor slot; ours until completion.
        unsafe {
            std::ptr::copy_nonoverlapping(
                wire.as_ptr(),
                base.add(self.batch_bytes as usize),
                SLOT_BYTES,
            )
        };
        let off = base as u64 - self.buffers.mr().addr() + self.batch_bytes;
        let l = &mut self.links[link];
        let slot = u64::from(imm % l.credits.slots());
        let w = Write {
            wr_id: buffer as u64,
            local: self.buffers.mr().sge(off, SLOT_BYTES as u32),
            remote_addr: l.staging_addr + slot * SLOT_BYTES as u64,
            rkey: l.staging_rkey,
            imm: Some(imm),
            signaled: true,
        };
        // SAFETY: as above.
        unsafe { l.qp.post_writes(&[w]) }.map_err(transport)?;
        l.posted.push(buffer);
        l.credits.staged();
        Ok(())
    }

    /// The staging slot the next descriptor of link `link` goes to (its expected immediate).
    pub fn next_slot(&self, link: usize) -> Option<u32> {
        let l = self.links.get(link)?;
        Some(l.credits.slot_of_next())
    }

    /// The current grant of link `link`: `(pool offset, bytes, used)`.
    pub fn grant(&self, link: usize) -> Option<(u64, u64, u64)> {
        self.links
            .get(link)
            .and_then(|l| l.grant.as_ref().map(|g| (g.offset, g.bytes, g.used)))
    }
}

impl Publish for VerbsPublisher {
    fn client_id(&self) -> u64 {
        self.client_id
    }

    fn check_size(&self, payload_len: usize) -> Result<(), PublishError> {
        stride_of(payload_len, self.batch_bytes).map(drop)
    }

    fn publish(&mut self, payload: &[u8]) -> Result<(), PublishError> {
        let stride = stride_of(payload.len(), self.batch_bytes)?;
        let now = monotonic_ns();
        if self
            .open
            .as_ref()
            .is_some_and(|b| b.batch.must_seal(stride, now, self.cfg.linger))
        {
            self.seal()?;
        }
        if self.open.is_none() {
            self.start_batch(stride, now)?;
        }
        let (client, seq) = (self.client_id, self.batch_seq);
        let b = self.open.as_mut().expect("a batch is open");
        b.batch.append(client, seq, now, payload);
        Ok(())
    }

    fn poll(&mut self) -> Result<(), PublishError> {
        self.reap()?;
        if self.lingered() {
            self.seal()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), PublishError> {
        self.seal()
    }

    fn acked(&mut self) -> Result<u64, PublishError> {
        self.reap()?;
        for l in &self.links {
            let c = &l.fb().counters;
            let rejected = c.rejected_batches.load(Acquire);
            if rejected > 0 {
                let e = c.error.load(Acquire);
                return Err(PublishError::Rejected {
                    broker: l.broker,
                    count: rejected,
                    reason: describe_code(e),
                    batch_seq: e >> 8,
                });
            }
            let closed = c.closed.load(Acquire);
            if l.live && closed != 0 {
                return Err(PublishError::Transport(format!(
                    "broker {} ended the session: {}",
                    l.broker,
                    describe_code(closed)
                )));
            }
        }
        for i in 0..self.links.len() {
            self.retire(i);
        }
        if self.links.iter().any(|l| l.live && !l.inflight.is_empty()) {
            self.check_links()?;
        }
        Ok(self.acks.messages())
    }

    fn sealed_messages(&self) -> u64 {
        self.sealed_messages
    }

    fn acked_prefix(&mut self) -> Result<u64, PublishError> {
        self.acked()?;
        if self.ack == 0 {
            return Ok(self.sealed_messages);
        }
        Ok(self.acks.prefix())
    }

    /// The broker's clock is another host's: an ack is timed when it is seen here.
    fn ack_poll_interval(&self) -> Option<Duration> {
        Some(ACK_POLL_INTERVAL)
    }

    fn take_ack_latencies(&mut self, out: &mut Vec<u64>) {
        for i in 0..self.links.len() {
            self.retire(i);
        }
        self.acks.take_latencies(out);
    }

    fn grant_waits(&self) -> u64 {
        self.grant_waits
    }

    fn disk_faults(&self) -> Vec<crate::replication::DiskFault> {
        crate::replication::faults_of(
            self.links
                .iter()
                .map(|l| l.fb().counters.disk.load(Acquire)),
        )
    }

    fn ack_level(&self) -> u8 {
        self.ack
    }

    fn linger_deadline_ns(&self) -> Option<u64> {
        self.open
            .as_ref()
            .map(|b| b.batch.deadline_ns(self.cfg.linger))
    }
}

impl Drop for VerbsPublisher {
    fn drop(&mut self) {
        let _ = self.seal();
        // Wait (briefly) for posted writes to complete before the buffers are unmapped.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.links.iter().any(|l| !l.posted.is_empty())
            && self.failure.is_none()
            && Instant::now() < deadline
        {
            if self.reap().is_err() {
                break;
            }
            std::thread::yield_now();
        }
    }
}
