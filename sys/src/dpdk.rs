//! DPDK poll-mode ports (feature `dpdk`): the environment (EAL), packet buffer pools, ports
//! probed from device arguments (`net_memif`, `net_af_packet`, or a NIC's driver), and
//! bursts of frames in and out.
//!
//! The binding is a C shim (`sys/dpdk/shim.c`, compiled against `pkg-config libdpdk`) of a
//! dozen functions over integers, byte pointers and opaque handles, declared here by hand:
//! DPDK's receive, transmit and mbuf functions are `static inline`, so compiled C is needed
//! anyway, and keeping every DPDK struct on the C side means no struct layout of a
//! particular DPDK release crosses into Rust (docs/dpdk.md).
//!
//! The control path ([`init`], [`MbufPool::new`], [`Port::attach`], [`Port::detach`]) is
//! slow and may be called from any thread; the data path ([`Port::rx`], [`TxBurst`]) is
//! called by one thread per port.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Frames per receive or transmit burst.
pub const BURST: usize = 32;

/// A DPDK call that failed, with DPDK's reason.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DpdkError {
    #[error("DPDK environment (rte_eal_init {args}): {reason}")]
    Init { args: String, reason: String },
    #[error("DPDK mbuf pool {name} ({buffers} buffers of {data_room} bytes): {reason}")]
    Pool {
        name: String,
        buffers: u32,
        data_room: u32,
        reason: String,
    },
    #[error("DPDK port {devargs:?}: {step}: {reason}")]
    Port {
        devargs: String,
        step: &'static str,
        reason: String,
    },
    #[error("DPDK: {0}")]
    Other(String),
}

mod ffi {
    use super::*;
    extern "C" {
        pub fn embar_dpdk_init(argc: c_int, argv: *mut *mut c_char) -> c_int;
        pub fn embar_dpdk_strerror(err: c_int) -> *const c_char;
        pub fn embar_dpdk_thread_register() -> c_int;
        pub fn embar_dpdk_pool(name: *const c_char, n: u32, data_room: u32) -> *mut c_void;
        pub fn embar_dpdk_attach(devargs: *const c_char, port: *mut u16) -> c_int;
        pub fn embar_dpdk_start(port: u16, pool: *mut c_void, rx_desc: u16, tx_desc: u16) -> c_int;
        pub fn embar_dpdk_mac(port: u16, mac: *mut u8) -> c_int;
        pub fn embar_dpdk_link_up(port: u16) -> c_int;
        pub fn embar_dpdk_detach(port: u16) -> c_int;
        pub fn embar_dpdk_rx(
            port: u16,
            mbufs: *mut *mut c_void,
            data: *mut *const u8,
            lens: *mut u32,
            n: u16,
        ) -> u16;
        pub fn embar_dpdk_free(mbufs: *mut *mut c_void, n: u16);
        pub fn embar_dpdk_alloc(
            pool: *mut c_void,
            mbufs: *mut *mut c_void,
            data: *mut *mut u8,
            lens: *const u32,
            n: u16,
        ) -> c_int;
        pub fn embar_dpdk_tx(port: u16, mbufs: *mut *mut c_void, n: u16) -> u16;
    }
}

fn reason(rc: c_int) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated
    // string for any error number.
    let s = unsafe { CStr::from_ptr(ffi::embar_dpdk_strerror(rc.abs())) };
    s.to_string_lossy().into_owned()
}

static EAL: OnceLock<Result<(), DpdkError>> = OnceLock::new();

/// Starts DPDK's environment once per process with `args` (EAL options, without the program
/// name); later calls return the first call's result whatever their arguments. The calling
/// thread keeps its CPU affinity.
///
/// For virtual devices on any Linux host: [`vdev_eal_args`].
pub fn init(args: &[String]) -> Result<(), DpdkError> {
    EAL.get_or_init(|| {
        let mut owned: Vec<CString> = Vec::with_capacity(args.len() + 1);
        owned.push(CString::new("embar").expect("no NUL"));
        for a in args {
            owned.push(CString::new(a.as_str()).map_err(|_| DpdkError::Init {
                args: args.join(" "),
                reason: "an argument holds a NUL byte".into(),
            })?);
        }
        let mut argv: Vec<*mut c_char> = owned.iter().map(|s| s.as_ptr().cast_mut()).collect();
        argv.push(std::ptr::null_mut());
        // SAFETY: argv holds argc pointers to NUL-terminated strings that live in `owned`
        // for the whole call, and a final NULL; EAL may permute the pointer array (ours) and
        // keeps no pointer into it after returning except to the strings, which this
        // process leaks below.
        let rc = unsafe { ffi::embar_dpdk_init(owned.len() as c_int, argv.as_mut_ptr()) };
        // EAL may keep pointers to its arguments for the life of the process.
        std::mem::forget(owned);
        if rc < 0 {
            return Err(DpdkError::Init {
                args: args.join(" "),
                reason: reason(rc),
            });
        }
        Ok(())
    })
    .clone()
}

fn check_init() -> Result<(), DpdkError> {
    match EAL.get() {
        Some(r) => r.clone(),
        None => Err(DpdkError::Other(
            "the DPDK environment is not started (embar_sys::dpdk::init)".into(),
        )),
    }
}

/// Gives the calling thread an lcore id, so that buffer pool caches serve it (a thread that
/// runs a port's data path calls this first; without it the pool is still correct, only
/// slower).
pub fn register_thread() -> Result<(), DpdkError> {
    check_init()?;
    // SAFETY: no arguments; EAL is started (checked above).
    let rc = unsafe { ffi::embar_dpdk_thread_register() };
    if rc < 0 {
        return Err(DpdkError::Other(format!(
            "registering a thread with EAL: {}",
            reason(rc)
        )));
    }
    Ok(())
}

/// A pool of packet buffers (`rte_mempool` of mbufs). Lives for the process: DPDK frees a
/// pool only when no port or frame uses it, which this code does not track.
#[derive(Clone, Copy, Debug)]
pub struct MbufPool(NonNull<c_void>);

// SAFETY: an rte_mempool is designed for use from many threads (its ring is multi-producer
// and multi-consumer; per-lcore caches are per thread).
unsafe impl Send for MbufPool {}
// SAFETY: as above.
unsafe impl Sync for MbufPool {}

static POOL_NAMES: AtomicU32 = AtomicU32::new(0);

impl MbufPool {
    /// `buffers` buffers with room for a frame of `frame_bytes` each.
    pub fn new(buffers: u32, frame_bytes: u32) -> Result<MbufPool, DpdkError> {
        check_init()?;
        let name = format!("embar{}", POOL_NAMES.fetch_add(1, Ordering::Relaxed) + 1);
        // RTE_PKTMBUF_HEADROOM (128) before the frame.
        let data_room = frame_bytes + 128;
        let c = CString::new(name.as_str()).expect("no NUL");
        // SAFETY: `c` is a NUL-terminated name that lives for the call; EAL is started.
        let p = unsafe { ffi::embar_dpdk_pool(c.as_ptr(), buffers, data_room) };
        NonNull::new(p)
            .map(MbufPool)
            .ok_or_else(|| DpdkError::Pool {
                name,
                buffers,
                data_room,
                reason: reason(0).replace("Success", "out of memory (raise -m)"),
            })
    }
}

/// One started port with one receive and one transmit queue.
#[derive(Debug)]
pub struct Port {
    id: u16,
    devargs: String,
}

impl Port {
    /// Probes the device of `devargs` (`name,key=value,...`, the name before the first
    /// comma, unique in this process), configures one queue each way with `rx_desc` and
    /// `tx_desc` descriptors receiving into `pool`, and starts it.
    pub fn attach(
        devargs: &str,
        pool: MbufPool,
        rx_desc: u16,
        tx_desc: u16,
    ) -> Result<Port, DpdkError> {
        check_init()?;
        let err = |step, rc| DpdkError::Port {
            devargs: devargs.to_string(),
            step,
            reason: reason(rc),
        };
        let c = CString::new(devargs).map_err(|_| DpdkError::Port {
            devargs: devargs.to_string(),
            step: "arguments",
            reason: "a NUL byte".into(),
        })?;
        let mut id = 0u16;
        // SAFETY: `c` is NUL-terminated and lives for the call; `id` is a valid out pointer.
        let rc = unsafe { ffi::embar_dpdk_attach(c.as_ptr(), &mut id) };
        if rc < 0 {
            return Err(err("probe", rc));
        }
        let port = Port {
            id,
            devargs: devargs.to_string(),
        };
        // SAFETY: `id` is a probed port; the pool pointer is a live mbuf pool.
        let rc = unsafe { ffi::embar_dpdk_start(id, pool.0.as_ptr(), rx_desc, tx_desc) };
        if rc < 0 {
            let e = err("configure and start", rc);
            let _ = port.detach();
            return Err(e);
        }
        Ok(port)
    }

    pub fn devargs(&self) -> &str {
        &self.devargs
    }

    pub fn mac(&self) -> Result<[u8; 6], DpdkError> {
        let mut mac = [0u8; 6];
        // SAFETY: `mac` has the 6 bytes the shim writes; the port is probed.
        let rc = unsafe { ffi::embar_dpdk_mac(self.id, mac.as_mut_ptr()) };
        if rc < 0 {
            return Err(DpdkError::Port {
                devargs: self.devargs.clone(),
                step: "MAC address",
                reason: reason(rc),
            });
        }
        Ok(mac)
    }

    /// Whether the link is up (a memif peer connected, an af_packet interface up).
    pub fn link_up(&self) -> bool {
        // SAFETY: the port is probed.
        unsafe { ffi::embar_dpdk_link_up(self.id) == 1 }
    }

    /// Receives at most [`BURST`] frames into `burst` (which gives back what it held first).
    /// Only the thread that owns the port's data path calls this.
    pub fn rx(&self, burst: &mut RxBurst) -> usize {
        burst.release();
        // SAFETY: the arrays hold BURST entries each and `n` is BURST; the shim writes at
        // most that many. The mbufs are owned by `burst` until released.
        let n = unsafe {
            ffi::embar_dpdk_rx(
                self.id,
                burst.mbufs.as_mut_ptr(),
                burst.data.as_mut_ptr(),
                burst.lens.as_mut_ptr(),
                BURST as u16,
            )
        };
        burst.n = n as usize;
        burst.n
    }

    /// Stops, closes and removes the port.
    pub fn detach(self) -> Result<(), DpdkError> {
        // SAFETY: the port is probed and this consumes its only handle.
        let rc = unsafe { ffi::embar_dpdk_detach(self.id) };
        if rc < 0 {
            return Err(DpdkError::Port {
                devargs: self.devargs,
                step: "detach",
                reason: reason(rc),
            });
        }
        Ok(())
    }
}

/// Frames received by one [`Port::rx`], held until the next call or drop.
pub struct RxBurst {
    mbufs: [*mut c_void; BURST],
    data: [*const u8; BURST],
    lens: [u32; BURST],
    n: usize,
}

// SAFETY: the burst owns its mbufs outright (no other handle to them exists); an mbuf may
// be read and freed by any thread (freeing from a thread without an lcore id bypasses the
// pool's cache but is correct).
unsafe impl Send for RxBurst {}

impl Default for RxBurst {
    fn default() -> Self {
        RxBurst {
            mbufs: [std::ptr::null_mut(); BURST],
            data: [std::ptr::null(); BURST],
            lens: [0; BURST],
            n: 0,
        }
    }
}

impl RxBurst {
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Frame `i`'s bytes, or `Err(length)` for a frame in several segments (not read).
    pub fn frame(&self, i: usize) -> Result<&[u8], u32> {
        assert!(i < self.n, "frame {i} of a burst of {}", self.n);
        if self.data[i].is_null() {
            return Err(self.lens[i]);
        }
        // SAFETY: for a one-segment frame the shim gave its data pointer and length; the
        // mbuf is held by this burst until `release`, which needs `&mut self`, so the bytes
        // outlive the returned borrow.
        Ok(unsafe { std::slice::from_raw_parts(self.data[i], self.lens[i] as usize) })
    }

    fn release(&mut self) {
        if self.n > 0 {
            // SAFETY: the first `n` entries are mbufs this burst received and still holds.
            unsafe { ffi::embar_dpdk_free(self.mbufs.as_mut_ptr(), self.n as u16) };
            self.n = 0;
        }
    }
}

impl Drop for RxBurst {
    fn drop(&mut self) {
        self.release();
    }
}

/// Frames being built for one transmit burst.
pub struct TxBurst {
    mbufs: [*mut c_void; BURST],
    n: usize,
}

// SAFETY: as for RxBurst: the burst owns the mbufs it holds, and any thread may fill, send
// or free them.
unsafe impl Send for TxBurst {}

impl Default for TxBurst {
    fn default() -> Self {
        TxBurst {
            mbufs: [std::ptr::null_mut(); BURST],
            n: 0,
        }
    }
}

impl TxBurst {
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn is_full(&self) -> bool {
        self.n == BURST
    }

    /// Adds a frame of `len` bytes from `pool`, written by `fill`. `Ok(false)` when the
    /// burst is full or the pool has no buffer free (send and try again).
    pub fn push(
        &mut self,
        pool: MbufPool,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<bool, DpdkError> {
        if self.n == BURST {
            return Ok(false);
        }
        let lens = [u32::try_from(len).unwrap_or(u32::MAX)];
        let mut data = [std::ptr::null_mut::<u8>()];
        // SAFETY: one mbuf slot at `n` (< BURST), one data pointer and one length.
        let rc = unsafe {
            ffi::embar_dpdk_alloc(
                pool.0.as_ptr(),
                self.mbufs.as_mut_ptr().add(self.n),
                data.as_mut_ptr(),
                lens.as_ptr(),
                1,
            )
        };
        if rc == -libc::ENOBUFS {
            return Ok(false);
        }
        if rc < 0 {
            return Err(DpdkError::Other(format!(
                "a frame of {len} bytes: {}",
                reason(rc)
            )));
        }
        // SAFETY: the shim appended `len` bytes to the new mbuf's only segment and gave
        // their address; this burst owns the mbuf until it is sent or freed.
        let bytes = unsafe { std::slice::from_raw_parts_mut(data[0], len) };
        fill(bytes);
        self.n += 1;
        Ok(true)
    }

    /// Sends the frames on `port`; those it did not take are freed (lost, as on a wire).
    /// Returns how many it took.
    pub fn send(&mut self, port: &Port) -> usize {
        if self.n == 0 {
            return 0;
        }
        // SAFETY: the first `n` entries are mbufs this burst owns; the shim sends or frees
        // every one of them, so ownership ends here.
        let sent = unsafe { ffi::embar_dpdk_tx(port.id, self.mbufs.as_mut_ptr(), self.n as u16) };
        self.n = 0;
        sent as usize
    }
}

impl Drop for TxBurst {
    fn drop(&mut self) {
        if self.n > 0 {
            // SAFETY: the first `n` entries are mbufs this burst owns and did not send.
            unsafe { ffi::embar_dpdk_free(self.mbufs.as_mut_ptr(), self.n as u16) };
        }
    }
}

/// Device arguments of a `net_memif` port named `name` (unique in the process) with `role`
/// `server` or `client` on the file socket `socket` (no commas or spaces), whose ring buffers
/// hold frames of `frame_bytes` (at least 2 KiB) in one piece, 2048 of them per ring.
pub fn memif_devargs(name: &str, role: &str, socket: &str, frame_bytes: u32) -> String {
    format!(
        "{name},role={role},socket={socket},socket-abstract=no,id=0,bsize={},rsize=11",
        frame_bytes.max(2048)
    )
}

/// EAL options for virtual devices on any Linux host: no hugepages, no PCI scan, no shared
/// runtime configuration (several DPDK processes on one host share nothing), `mem_mb` of
/// memory, one lcore, quiet logs.
pub fn vdev_eal_args(mem_mb: u32) -> Vec<String> {
    [
        "--no-huge",
        "--no-shconf",
        "--no-pci",
        "--no-telemetry",
        "-l0",
        "--log-level=*:warning",
        // memif logs an error per port for multi-process support, which --no-shconf turns off.
        "--log-level=pmd.net.memif:critical",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("-m{mem_mb}")])
    .collect()
}
