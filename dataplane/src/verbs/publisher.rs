//! A remote publisher on the verbs transport. Batches are built in registered local buffers
//! (the one copy of the data on this side) and RDMA-written into the broker's grants; see
//! the protocol in [`super`]. Same batching rules as the shm publisher: seal at the batch
//! size, on `flush`, or after the linger time; dense per-client `batch_seq`; batches striped
//! round-robin over the brokers.

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
use crate::client::filling::{stride_of, AckedPrefix, Filling, Unacked};
use crate::client::publisher::{PublishError, PublisherConfig};
use crate::client::Publish;
use crate::pool::layout::BATCH_HEADER_VERSION;
use crate::sync::Ordering::Acquire;

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
    qp: QueuePair,
    _stream: TcpStream,
    feedback: RegisteredBuffer,
    staging_addr: u64,
    staging_rkey: u32,
    /// Which staging slot the next descriptor goes to, once the broker has taken enough.
    credits: StagingCredits,
    taken: u64,
    grant: Option<Grant>,
    /// Sealed batches not yet acknowledged (latency).
    unacked: Unacked,
}

impl Link {
    fn fb(&self) -> &Feedback {
        // SAFETY: the region is page-aligned, at least `size_of::<Feedback>()` bytes, zeroed
        // at creation (a valid Feedback: atomics), and lives as long as `self`. The broker
        // writes it by RDMA; every field is an atomic read here.
        unsafe { &*self.feedback.as_ptr().cast::<Feedback>() }
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
    /// Which messages are acknowledged in publish order.
    prefix: AckedPrefix,
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
            prefix: AckedPrefix::default(),
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
        Ok((
            Link {
                broker,
                qp,
                _stream: stream,
                feedback,
                staging_addr: st[0],
                staging_rkey: st[1] as u32,
                credits: StagingCredits::new(st[2] as u32),
                taken: 0,
                grant: None,
                unacked: Unacked::default(),
            },
            batch_bytes,
            ack,
        ))
    }

    /// Times the publisher waited for a grant (credits) and for a staging slot.
    pub fn waits(&self) -> (u64, u64) {
        (self.grant_waits, self.staging_waits)
    }

    /// Reaps send completions: frees batch buffers; an error fails the publisher.
    fn reap(&mut self) -> Result<(), PublishError> {
        loop {
            self.completions.clear();
            if self.cq.poll(&mut self.completions).map_err(transport)? == 0 {
                break;
            }
            for c in &self.completions {
                if c.ok() {
                    self.free.push(c.wr_id as usize);
                } else if self.failure.is_none() {
                    let broker = self
                        .links
                        .iter()
                        .find(|l| l.qp.qp_num() == c.qp_num)
                        .map_or(u32::MAX, |l| l.broker);
                    self.failure = Some(format!(
                        "RDMA write to broker {broker} failed: {}{}",
                        c.status_str(),
                        if c.remote_access_error() {
                            " (outside the space the broker granted)"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
        match &self.failure {
            Some(f) => Err(PublishError::Transport(f.clone())),
            None => Ok(()),
        }
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
                .find(|l| l.fb().counters.closed.load(Acquire) != 0)
            {
                let code = l.fb().counters.closed.load(Acquire);
                return Err(PublishError::Transport(format!(
                    "broker {} ended the session: {}",
                    l.broker,
                    describe_code(code)
                )));
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

    fn start_batch(&mut self, stride: u64, now: u64) -> Result<(), PublishError> {
        let i = self.next_link;
        self.next_link = (self.next_link + 1) % self.links.len();
        let buffer = self.wait(|_| "a free batch buffer".into(), |p| p.free.pop())?;
        let needs_grant = self.links[i]
            .grant
            .as_ref()
            .is_none_or(|g| g.used + stride > g.bytes);
        if needs_grant {
            let k = self.links[i].taken;
            let mut waited = false;
            let grant = self.wait(
                |p| format!("log space from broker {} (every grant is in use: subscribers or the sequencer are behind)", p.links[i].broker),
                |p| {
                    let fb = p.links[i].fb();
                    if fb.counters.grants_issued.load(Acquire) <= k {
                        waited = true;
                        return None;
                    }
                    let g = &fb.grants[crate::session::grant_slot(k)];
                    (g.number.load(Acquire) == k + 1).then(|| Grant {
                        offset: g.offset.load(Acquire),
                        bytes: g.bytes.load(Acquire),
                        addr: g.addr.load(Acquire),
                        rkey: g.rkey.load(Acquire) as u32,
                        used: 0,
                    })
                },
            );
            let grant = match grant {
                Ok(g) => g,
                Err(e) => {
                    self.free.push(buffer);
                    return Err(e);
                }
            };
            if waited {
                self.grant_waits += 1;
            }
            let l = &mut self.links[i];
            l.grant = Some(grant);
            l.taken = k + 1;
        }
        let g = self.links[i].grant.as_ref().expect("a grant");
        let limit = self.batch_bytes.min(g.bytes - g.used);
        let start = g.offset + g.used;
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

    /// Seals the open batch: payload WRITE into the grant, descriptor WRITE_WITH_IMM.
    fn seal(&mut self) -> Result<(), PublishError> {
        let Some(OpenBatch {
            link: i,
            buffer,
            start,
            batch: b,
        }) = self.open.take()
        else {
            return Ok(());
        };
        let mut waited = false;
        let r = self.wait(
            |p| format!("broker {} to take staged descriptors", p.links[i].broker),
            |p| {
                let l = &p.links[i];
                let slot = l
                    .credits
                    .next_slot(l.fb().counters.staged_consumed.load(Acquire));
                waited |= slot.is_none();
                slot
            },
        );
        let slot = match r {
            Ok(slot) => slot,
            Err(e) => {
                self.free.push(buffer);
                return Err(e);
            }
        };
        if waited {
            self.staging_waits += 1;
        }
        let desc = crate::batch::BatchDesc {
            batch_seq: self.batch_seq,
            client_id: self.client_id,
            num_msg: b.num_msg(),
            broker_id: self.links[i].broker,
            total_size: b.fill(),
            log_idx: start,
            start_logical_offset: 0,
            version_flags: u64::from(BATCH_HEADER_VERSION),
        };
        let base = self.buffer_ptr(buffer);
        let wire = encode_descriptor(&desc);
        // SAFETY: the descriptor slot follows the batch bytes of this buffer, inside the
        // region; the buffer is ours until its completion (it was taken from `free`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                wire.as_ptr(),
                base.add(self.batch_bytes as usize),
                SLOT_BYTES,
            )
        };
        let off = base as u64 - self.buffers.mr().addr();
        let l = &mut self.links[i];
        let g = l.grant.as_mut().expect("an open batch has a grant");
        let writes = [
            Write {
                wr_id: buffer as u64,
                local: self.buffers.mr().sge(off, b.fill() as u32),
                remote_addr: g.addr + (start - g.offset),
                rkey: g.rkey,
                imm: None,
                signaled: false,
            },
            Write {
                wr_id: buffer as u64,
                local: self
                    .buffers
                    .mr()
                    .sge(off + self.batch_bytes, SLOT_BYTES as u32),
                remote_addr: l.staging_addr + u64::from(slot) * SLOT_BYTES as u64,
                rkey: l.staging_rkey,
                imm: Some(slot),
                signaled: true,
            },
        ];
        // SAFETY: the buffer is not written again until the signaled completion of the
        // second write returns it to `free` (RC completes the first before the second).
        unsafe { l.qp.post_writes(&writes) }.map_err(transport)?;
        g.used += b.fill();
        l.credits.staged();
        l.unacked.sealed(b.num_msg(), b.first_ns);
        let link_sealed = l.unacked.sealed_messages();
        self.sealed_messages += u64::from(b.num_msg());
        self.batch_seq += 1;
        if self.prefix.is_full() {
            self.advance_prefix();
        }
        self.prefix.sealed(i, link_sealed, self.sealed_messages);
        Ok(())
    }

    fn advance_prefix(&mut self) -> u64 {
        let links = &self.links;
        self.prefix
            .advance(|l| links[l].fb().counters.acked_messages.load(Acquire))
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
        unsafe { l.qp.post_writes(&[w]) }.map_err(transport)
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
        let mut total = 0;
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
            if closed != 0 {
                return Err(PublishError::Transport(format!(
                    "broker {} ended the session: {}",
                    l.broker,
                    describe_code(closed)
                )));
            }
            total += c.acked_messages.load(Acquire);
        }
        Ok(total)
    }

    fn sealed_messages(&self) -> u64 {
        self.sealed_messages
    }

    fn acked_prefix(&mut self) -> Result<u64, PublishError> {
        self.acked()?;
        if self.ack == 0 {
            return Ok(self.sealed_messages);
        }
        Ok(self.advance_prefix())
    }

    /// The broker's clock is another host's: an ack is timed when it is seen here.
    fn ack_poll_interval(&self) -> Option<Duration> {
        Some(ACK_POLL_INTERVAL)
    }

    fn take_ack_latencies(&mut self, out: &mut Vec<u64>) {
        let now = monotonic_ns();
        for l in &mut self.links {
            let acked = l.fb().counters.acked_messages.load(Acquire);
            l.unacked.take(acked, now, out);
        }
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
        while self.free.len() < BUFFERS && self.failure.is_none() && Instant::now() < deadline {
            if self.reap().is_err() {
                break;
            }
            std::thread::yield_now();
        }
    }
}
