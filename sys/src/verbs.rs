//! RDMA verbs (libibverbs, through `rdma-sys`) behind a small safe API: a device context with
//! its protection domain, completion queues, memory regions, and reliable-connected queue
//! pairs with RDMA WRITE, WRITE_WITH_IMM, SEND and receives. Built with the `verbs` feature.
//!
//! Ownership: every object holds an `Arc` of what it was created from, so the C objects are
//! destroyed children first (QP, then CQ and MR, then PD and context). Posting work requests
//! is `unsafe`: the NIC reads or writes the named memory after the call returns, which the
//! borrow checker cannot see; each such call states its contract.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::ptr;
use std::str::FromStr;
use std::sync::Arc;

use rdma_sys::*;

/// Errors of the verbs layer.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("no RDMA device on this host{0} (for testing, Soft-RoCE: `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <netdev>`)")]
    NoDevice(&'static str),
    #[error("RDMA device {name:?} not found (devices here: {available})")]
    DeviceNotFound { name: String, available: String },
    #[error("{what} failed: {source}")]
    Call {
        what: &'static str,
        source: io::Error,
    },
    #[error("bad GID {0:?} (want 32 hex digits)")]
    BadGid(String),
    #[error("bad endpoint {0:?} (want qpn:psn:gid)")]
    BadEndpoint(String),
    #[error("port {port} of {device} is not active (state {state})")]
    PortNotActive {
        port: u8,
        device: String,
        state: u32,
    },
    #[error("GID index {index} of {device} is empty (does the netdev have an address?)")]
    EmptyGid { index: u8, device: String },
    #[error("post {count} writes at once (1..={max})")]
    WriteChain { count: usize, max: usize },
}

fn call_failed(what: &'static str) -> VerbsError {
    VerbsError::Call {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Why `ibv_get_device_list` gave no list: a kernel without RDMA (ENOSYS) has no device.
fn no_device_list() -> VerbsError {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS) => VerbsError::NoDevice(" (the kernel has no RDMA support)"),
        _ => VerbsError::Call {
            what: "ibv_get_device_list",
            source: e,
        },
    }
}

/// `ret` is 0 on success, else an errno value (the convention of ibv_modify_qp, ibv_post_*).
fn check_ret(what: &'static str, ret: i32) -> Result<(), VerbsError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(VerbsError::Call {
            what,
            source: io::Error::from_raw_os_error(ret.abs()),
        })
    }
}

/// A 128-bit port GID (RoCE: an IPv6 or IPv4-mapped address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gid(pub [u8; 16]);

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for Gid {
    type Err = VerbsError;
    fn from_str(s: &str) -> Result<Gid, VerbsError> {
        let bad = || VerbsError::BadGid(s.to_string());
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut g = [0u8; 16];
        for (i, b) in g.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Gid(g))
    }
}

/// What a peer needs to connect its RC queue pair to ours: `qpn:psn:gid` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub gid: Gid,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.qpn, self.psn, self.gid)
    }
}

impl FromStr for Endpoint {
    type Err = VerbsError;
    fn from_str(s: &str) -> Result<Endpoint, VerbsError> {
        let bad = || VerbsError::BadEndpoint(s.to_string());
        let mut it = s.split(':');
        let (Some(q), Some(p), Some(g), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        let psn: u32 = p.parse().map_err(|_| bad())?;
        if psn >= 1 << 24 {
            return Err(bad());
        }
        Ok(Endpoint {
            qpn: q.parse().map_err(|_| bad())?,
            psn,
            gid: g.parse()?,
        })
    }
}

/// An open device, one of its ports, and a protection domain on it.
pub struct Context {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    name: String,
    port: u8,
    gid_index: u8,
    gid: Gid,
    mtu: ibv_mtu::Type,
}

// SAFETY: libibverbs contexts and PDs may be used from any thread (the library locks
// internally); this type only reads its fields after construction.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// Names of the RDMA devices on this host.
pub fn devices() -> Result<Vec<String>, VerbsError> {
    let mut n = 0i32;
    // SAFETY: ibv_get_device_list writes the count and returns a NULL-terminated array or
    // NULL; freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(no_device_list());
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: `i < n`, the array's length; each entry is a valid device pointer whose name
        // is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: the list came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

impl Context {
    /// Opens `device` (the first device when `None`), port 1, and reads GID `gid_index`
    /// (RoCEv2 over IPv4 is usually index 1 on rxe).
    pub fn open(device: Option<&str>, gid_index: u8) -> Result<Arc<Context>, VerbsError> {
        let mut n = 0i32;
        // SAFETY: as in `devices`.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(no_device_list());
        }
        struct FreeList(*mut *mut ibv_device);
        impl Drop for FreeList {
            fn drop(&mut self) {
                // SAFETY: the list from ibv_get_device_list, freed once; devices opened from
                // it stay valid after (libibverbs keeps them referenced).
                unsafe { ibv_free_device_list(self.0) };
            }
        }
        let _free = FreeList(list);
        let mut names = Vec::new();
        let mut chosen = None;
        for i in 0..n.max(0) as usize {
            // SAFETY: `i < n`; see `devices`.
            let dev = unsafe { *list.add(i) };
            // SAFETY: a valid device; the name is a NUL-terminated string it owns.
            let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if chosen.is_none() && device.is_none_or(|d| d == name) {
                chosen = Some((dev, name.clone()));
            }
            names.push(name);
        }
        let Some((dev, name)) = chosen else {
            return Err(match device {
                None => VerbsError::NoDevice(""),
                Some(d) => VerbsError::DeviceNotFound {
                    name: d.to_string(),
                    available: if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    },
                },
            });
        };
        // SAFETY: `dev` is a valid device from the list.
        let ctx = unsafe { ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(call_failed("ibv_open_device"));
        }
        // SAFETY: `ctx` is an open context.
        let pd = unsafe { ibv_alloc_pd(ctx) };
        if pd.is_null() {
            let e = call_failed("ibv_alloc_pd");
            // SAFETY: opened above, closed once.
            unsafe { ibv_close_device(ctx) };
            return Err(e);
        }
        let mut c = Context {
            ctx,
            pd,
            name,
            port: 1,
            gid_index,
            gid: Gid([0; 16]),
            mtu: ibv_mtu::IBV_MTU_1024,
        };
        // SAFETY: zeroed is a valid ibv_port_attr (plain integers).
        let mut pa: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `pa` is a writable ibv_port_attr.
        check_ret("ibv_query_port", unsafe {
            ___ibv_query_port(ctx, c.port, &mut pa)
        })?;
        if pa.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(VerbsError::PortNotActive {
                port: c.port,
                device: c.name.clone(),
                state: pa.state,
            });
        }
        c.mtu = pa.active_mtu.min(ibv_mtu::IBV_MTU_4096);
        // SAFETY: zeroed is a valid GID.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `gid` is writable.
        if unsafe { ibv_query_gid(ctx, c.port, i32::from(gid_index), &mut gid) } != 0 {
            return Err(call_failed("ibv_query_gid"));
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        c.gid = Gid(unsafe { gid.raw });
        if c.gid.0 == [0; 16] {
            return Err(VerbsError::EmptyGid {
                index: gid_index,
                device: c.name.clone(),
            });
        }
        Ok(Arc::new(c))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// Path MTU used for connections, in bytes.
    pub fn mtu_bytes(&self) -> u32 {
        128 << self.mtu
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc of this context, so none is left; each
        // pointer is destroyed once.
        unsafe {
            ibv_dealloc_pd(self.pd);
            ibv_close_device(self.ctx);
        }
    }
}

/// A completion queue.
pub struct CompletionQueue {
    cq: *mut ibv_cq,
    _ctx: Arc<Context>,
}

// SAFETY: CQs may be polled from any thread (the provider locks); the pointer never changes.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

/// What a work completion was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Send,
    RdmaWrite,
    Recv,
    RecvRdmaWithImm,
    Other(u32),
}

/// One work completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: Opcode,
    /// The immediate of a WRITE_WITH_IMM (host order).
    pub imm: Option<u32>,
    pub byte_len: u32,
    pub qp_num: u32,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_SUCCESS
    }

    /// A remote access error: the peer refused a write (outside its registration).
    pub fn remote_access_error(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_REM_ACCESS_ERR
    }

    /// libibverbs' description of the status.
    pub fn status_str(&self) -> String {
        // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any value.
        unsafe { CStr::from_ptr(ibv_wc_status_str(self.status)) }
            .to_string_lossy()
            .into_owned()
    }
}

impl CompletionQueue {
    pub fn new(ctx: &Arc<Context>, depth: u32) -> Result<Arc<CompletionQueue>, VerbsError> {
        // SAFETY: `ctx` is open; no completion channel, no vector.
        let cq =
            unsafe { ibv_create_cq(ctx.ctx, depth as i32, ptr::null_mut(), ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(call_failed("ibv_create_cq"));
        }
        Ok(Arc::new(CompletionQueue {
            cq,
            _ctx: ctx.clone(),
        }))
    }

    /// Appends up to 16 completions to `out`; returns how many (no syscall on hardware).
    pub fn poll(&self, out: &mut Vec<Completion>) -> Result<usize, VerbsError> {
        const N: usize = 16;
        // SAFETY: zeroed is a valid ibv_wc (integers and a union of integers).
        let mut wc: [ibv_wc; N] = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ is live; `wc` has room for N entries.
        let n = unsafe { ibv_poll_cq(self.cq, N as i32, wc.as_mut_ptr()) };
        if n < 0 {
            return Err(VerbsError::Call {
                what: "ibv_poll_cq",
                source: io::Error::from_raw_os_error(-n),
            });
        }
        for w in &wc[..n as usize] {
            let opcode = match w.opcode {
                ibv_wc_opcode::IBV_WC_SEND => Opcode::Send,
                ibv_wc_opcode::IBV_WC_RDMA_WRITE => Opcode::RdmaWrite,
                ibv_wc_opcode::IBV_WC_RECV => Opcode::Recv,
                ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => Opcode::RecvRdmaWithImm,
                o => Opcode::Other(o),
            };
            let with_imm = w.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            out.push(Completion {
                wr_id: w.wr_id,
                status: w.status,
                opcode,
                // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate (network order).
                imm: with_imm
                    .then(|| u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data })),
                byte_len: w.byte_len,
                qp_num: w.qp_num,
            });
        }
        Ok(n as usize)
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: QPs using this CQ hold an Arc of it, so none is left; destroyed once.
        unsafe { ibv_destroy_cq(self.cq) };
    }
}

/// A registered memory region.
pub struct MemoryRegion {
    mr: *mut ibv_mr,
    addr: u64,
    len: u64,
    _ctx: Arc<Context>,
}

// SAFETY: an MR is an immutable handle once registered; deregistration is in Drop (&mut).
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` for local writes, and for remote writes when
    /// `remote_write` (never remote reads or atomics).
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must stay mapped until this region is dropped. With `remote_write`,
    /// any connected peer holding the rkey may write those bytes at any time while the
    /// region lives: the caller treats them as untrusted input and puts nothing there whose
    /// corruption would harm anything but that peer's own data.
    pub unsafe fn register(
        ctx: &Arc<Context>,
        addr: *mut u8,
        len: usize,
        remote_write: bool,
    ) -> Result<MemoryRegion, VerbsError> {
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: the caller keeps the range mapped for the region's life.
        let mr = unsafe { ibv_reg_mr(ctx.pd, addr.cast(), len, access.0 as i32) };
        if mr.is_null() {
            return Err(call_failed("ibv_reg_mr"));
        }
        Ok(MemoryRegion {
            mr,
            addr: addr as u64,
            len: len as u64,
            _ctx: ctx.clone(),
        })
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.mr).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { (*self.mr).rkey }
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A scatter entry for `len` bytes at `offset` of this region.
    pub fn sge(&self, offset: u64, len: u32) -> Sge {
        debug_assert!(offset + u64::from(len) <= self.len);
        Sge {
            addr: self.addr + offset,
            len,
            lkey: self.lkey(),
        }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, deregistered once. Remote writes to it fail
        // from here on with a remote access error at the writer.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// Zeroed, page-aligned anonymous memory registered as one region: buffers a process
/// sends from, or words a peer writes into.
pub struct RegisteredBuffer {
    // Deregistered in Drop before the memory is unmapped.
    mr: std::mem::ManuallyDrop<MemoryRegion>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value; access goes through raw pointers whose users
// state their own synchronisation.
unsafe impl Send for RegisteredBuffer {}
// SAFETY: as above.
unsafe impl Sync for RegisteredBuffer {}

impl RegisteredBuffer {
    pub fn new(
        ctx: &Arc<Context>,
        len: usize,
        remote_write: bool,
    ) -> Result<RegisteredBuffer, VerbsError> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(call_failed("mmap of a registered buffer"));
        }
        let ptr = ptr.cast::<u8>();
        // SAFETY: the mapping lives until Drop, which deregisters first.
        match unsafe { MemoryRegion::register(ctx, ptr, len.max(1), remote_write) } {
            Ok(mr) => Ok(RegisteredBuffer {
                mr: std::mem::ManuallyDrop::new(mr),
                ptr,
                len,
            }),
            Err(e) => {
                // SAFETY: mapped above, unmapped once.
                unsafe { libc::munmap(ptr.cast(), len.max(1)) };
                Err(e)
            }
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn mr(&self) -> &MemoryRegion {
        &self.mr
    }

    /// Copies `dst.len()` bytes from `offset` out of the buffer, wrapping at its end (a
    /// ring). Bytes a peer may write remotely can change under the copy: the caller checks
    /// the copy, never the buffer.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        assert!(dst.len() <= self.len, "a copy longer than the buffer");
        let at = offset % self.len.max(1);
        let first = dst.len().min(self.len - at);
        // SAFETY: `at + first <= len` and `dst.len() - first <= at <= len`, so both ranges
        // lie in this live mapping; `dst` is a distinct Rust buffer (the mapping is never
        // lent out as a slice).
        unsafe {
            ptr::copy_nonoverlapping(self.ptr.add(at), dst.as_mut_ptr(), first);
            ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }

    /// Copies `src` into the buffer from `offset`, wrapping at its end (a ring). The caller
    /// must not change bytes a posted work request still reads (see
    /// [`QueuePair::post_writes`]); nothing in Rust borrows the mapping, so the copy itself
    /// aliases nothing.
    pub fn copy_in(&self, offset: usize, src: &[u8]) {
        assert!(src.len() <= self.len, "a copy longer than the buffer");
        let at = offset % self.len.max(1);
        let first = src.len().min(self.len - at);
        // SAFETY: as in `copy_out`, both ranges lie in this live mapping, which no Rust
        // reference covers; `src` is a distinct buffer.
        unsafe {
            ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), first);
            ptr::copy_nonoverlapping(src.as_ptr().add(first), self.ptr, src.len() - first);
        }
    }

    /// The 64-bit word at byte `offset` (8-aligned), read once (a peer may write it).
    pub fn load_u64(&self, offset: usize) -> u64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len,
            "a word inside the buffer"
        );
        // SAFETY: in bounds and aligned (the mapping is page-aligned); a volatile read, since
        // the NIC writes the word behind the compiler's back.
        unsafe { ptr::read_volatile(self.ptr.add(offset).cast::<u64>()) }
    }
}

impl Drop for RegisteredBuffer {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here; not used after.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.mr) };
        // SAFETY: mapped in `new` with this length, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len.max(1)) };
    }
}

/// Local memory of a work request: `len` bytes at `addr` of a region with key `lkey`.
#[derive(Clone, Copy, Debug)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// One RDMA WRITE (or WRITE_WITH_IMM when `imm` is set).
#[derive(Clone, Copy, Debug)]
pub struct Write {
    pub wr_id: u64,
    pub local: Sge,
    pub remote_addr: u64,
    pub rkey: u32,
    pub imm: Option<u32>,
    pub signaled: bool,
}

/// A reliable-connected queue pair.
pub struct QueuePair {
    qp: *mut ibv_qp,
    psn: u32,
    ctx: Arc<Context>,
    _cqs: (Arc<CompletionQueue>, Arc<CompletionQueue>),
}

// SAFETY: posting from one thread at a time is guaranteed by `&mut self` on the post calls;
// libibverbs allows a QP to be used from any thread.
unsafe impl Send for QueuePair {}

const MAX_CHAIN: usize = 4;

impl QueuePair {
    /// An RC QP in RESET state; `connect` brings it to RTS.
    pub fn new(
        ctx: &Arc<Context>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        max_send: u32,
        max_recv: u32,
    ) -> Result<QueuePair, VerbsError> {
        // SAFETY: zeroed is a valid init attr (pointers NULL, integers 0).
        let mut ia: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        ia.send_cq = send_cq.cq;
        ia.recv_cq = recv_cq.cq;
        ia.qp_type = ibv_qp_type::IBV_QPT_RC;
        ia.cap.max_send_wr = max_send;
        ia.cap.max_recv_wr = max_recv.max(1);
        ia.cap.max_send_sge = 1;
        ia.cap.max_recv_sge = 1;
        // SAFETY: the PD and CQs are live (held by Arcs below for the QP's life).
        let qp = unsafe { ibv_create_qp(ctx.pd, &mut ia) };
        if qp.is_null() {
            return Err(call_failed("ibv_create_qp"));
        }
        // A random 24-bit starting PSN per connection.
        let psn = (embar_random() & 0xff_ffff) as u32;
        Ok(QueuePair {
            qp,
            psn,
            ctx: ctx.clone(),
            _cqs: (send_cq.clone(), recv_cq.clone()),
        })
    }

    pub fn qp_num(&self) -> u32 {
        // SAFETY: a live QP.
        unsafe { (*self.qp).qp_num }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            qpn: self.qp_num(),
            psn: self.psn,
            gid: self.ctx.gid,
        }
    }

    /// RESET -> INIT -> RTR -> RTS towards `remote`. `remote_write`: the peer may RDMA-write
    /// memory regions of ours that allow it (the regions still decide what).
    pub fn connect(&mut self, remote: &Endpoint, remote_write: bool) -> Result<(), VerbsError> {
        let access = if remote_write {
            ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
        } else {
            ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
        };
        // All three modify calls: the QP is live, `a` is a valid attr with the fields the
        // mask names set.
        // SAFETY: zeroed is a valid ibv_qp_attr (integers and a union of integers).
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.ctx.port;
        a.qp_access_flags = access.0;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        // SAFETY: see above.
        check_ret("ibv_modify_qp(INIT)", unsafe {
            ibv_modify_qp(self.qp, &mut a, m.0 as i32)
        })?;

        // SAFETY: zeroed attr, fields set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = self.ctx.mtu;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.port_num = self.ctx.port;
        a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid.0 };
        a.ah_attr.grh.sgid_index = self.ctx.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        // SAFETY: see above.
        check_ret("ibv_modify_qp(RTR)", unsafe {
            ibv_modify_qp(self.qp, &mut a, m.0 as i32)
        })?;

        // SAFETY: zeroed attr, fields set below.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.sq_psn = self.psn;
        a.max_rd_atomic = 1;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: see above.
        check_ret("ibv_modify_qp(RTS)", unsafe {
            ibv_modify_qp(self.qp, &mut a, m.0 as i32)
        })
    }

    /// Moves the QP to the error state: every request still posted completes at once with a
    /// flush error (the NIC reads no more of their memory), and nothing more is sent. For a
    /// peer known to be gone, whose outstanding requests would otherwise wait out the
    /// transport retries.
    pub fn to_error(&mut self) -> Result<(), VerbsError> {
        // SAFETY: zeroed is a valid ibv_qp_attr; the QP is live and the mask names only the
        // state, which is set.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        // SAFETY: see above.
        check_ret("ibv_modify_qp(ERR)", unsafe {
            ibv_modify_qp(self.qp, &mut a, ibv_qp_attr_mask::IBV_QP_STATE.0 as i32)
        })
    }

    /// Posts up to four writes as one chain (one doorbell), executed in order.
    ///
    /// # Safety
    ///
    /// Each `local` range must lie in a live memory region with that lkey and must not be
    /// written (or freed) until a completion shows the NIC has read it: the completion of this
    /// request, or of a later signaled request on this QP. The remote side decides whether the
    /// remote range is allowed; a refused write completes with a remote access error and moves
    /// this QP to the error state.
    pub unsafe fn post_writes(&mut self, writes: &[Write]) -> Result<(), VerbsError> {
        if writes.is_empty() || writes.len() > MAX_CHAIN {
            return Err(VerbsError::WriteChain {
                count: writes.len(),
                max: MAX_CHAIN,
            });
        }
        // SAFETY: zeroed entries are valid (NULL pointers, zero integers).
        let mut sges: [ibv_sge; MAX_CHAIN] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut wrs: [ibv_send_wr; MAX_CHAIN] = unsafe { std::mem::zeroed() };
        let n = writes.len();
        for (i, w) in writes.iter().enumerate() {
            sges[i] = ibv_sge {
                addr: w.local.addr,
                length: w.local.len,
                lkey: w.local.lkey,
            };
        }
        for (i, w) in writes.iter().enumerate() {
            let wr = &mut wrs[i];
            wr.wr_id = w.wr_id;
            wr.sg_list = &mut sges[i];
            wr.num_sge = 1;
            wr.opcode = if w.imm.is_some() {
                ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
            } else {
                ibv_wr_opcode::IBV_WR_RDMA_WRITE
            };
            wr.send_flags = if w.signaled {
                ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            wr.imm_data_invalidated_rkey_union.imm_data = w.imm.unwrap_or(0).to_be();
            wr.wr.rdma = rdma_t {
                remote_addr: w.remote_addr,
                rkey: w.rkey,
            };
        }
        for i in 0..n - 1 {
            let next: *mut ibv_send_wr = &mut wrs[i + 1];
            wrs[i].next = next;
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the chain and its SGEs live on this stack frame for the call (the provider
        // copies them into the send queue); the caller keeps the local ranges valid.
        check_ret("ibv_post_send", unsafe {
            ibv_post_send(self.qp, wrs.as_mut_ptr(), &mut bad)
        })
    }

    /// Posts a SEND of `local`.
    ///
    /// # Safety
    ///
    /// As for [`QueuePair::post_writes`]: `local` stays valid and unwritten until completed.
    pub unsafe fn post_send(
        &mut self,
        wr_id: u64,
        local: Sge,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let mut sge = ibv_sge {
            addr: local.addr,
            length: local.len,
            lkey: local.lkey,
        };
        // SAFETY: zeroed is a valid send WR.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = if signaled {
            ibv_send_flags::IBV_SEND_SIGNALED.0
        } else {
            0
        };
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the WR and SGE live for the call; the caller keeps `local` valid.
        check_ret("ibv_post_send", unsafe {
            ibv_post_send(self.qp, &mut wr, &mut bad)
        })
    }

    /// Posts a receive: into `local`, or with no buffer (for WRITE_WITH_IMM, which carries no
    /// data to the receive queue).
    ///
    /// # Safety
    ///
    /// `local`, when given, must stay valid, and not be read as complete, until its
    /// completion arrives: the NIC writes it.
    pub unsafe fn post_recv(&mut self, wr_id: u64, local: Option<Sge>) -> Result<(), VerbsError> {
        let mut sge = local.map(|l| ibv_sge {
            addr: l.addr,
            length: l.len,
            lkey: l.lkey,
        });
        // SAFETY: zeroed is a valid receive WR.
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        if let Some(s) = sge.as_mut() {
            wr.sg_list = s;
            wr.num_sge = 1;
        }
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the WR and SGE live for the call; the caller keeps `local` valid.
        check_ret("ibv_post_recv", unsafe {
            ibv_post_recv(self.qp, &mut wr, &mut bad)
        })
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; its CQs and PD outlive it (Arcs).
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

/// A few random bits for PSNs, without a dependency: the clock mixed with the pid.
fn embar_random() -> u64 {
    let t = crate::clock::monotonic_ns() ^ u64::from(std::process::id()).rotate_left(32);
    let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_and_bad_ones_are_refused() {
        let e = Endpoint {
            qpn: 17,
            psn: 0xabcdef,
            gid: Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 9, 9, 1]),
        };
        assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        for bad in [
            "",
            "1:2",
            "1:2:3:4",
            "x:1:00",
            "1:16777216:00000000000000000000ffff0a090901",
            "1:2:zz000000000000000000ffff0a090901",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
