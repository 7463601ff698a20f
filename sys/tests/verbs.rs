//! The verbs layer against a real device (rxe in the test VM: `scripts/rxe-test.sh`). Two RC
//! queue pairs on one device connected to each other: WRITE, WRITE_WITH_IMM with a receive,
//! SEND, and a write outside the peer's registration (a remote access error on the writer).
//!
//! Without a device these tests print why and pass, unless `EMBAR_REQUIRE_RDMA=1` (set in
//! the VM), where a missing device fails them.
#![cfg(feature = "verbs")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use embar_sys::verbs::*;

fn context() -> Option<Arc<Context>> {
    let dev = std::env::var("RDMA_DEVICE").ok();
    let gid: u8 = std::env::var("RDMA_GID_INDEX")
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(1);
    match Context::open(dev.as_deref(), gid) {
        Ok(c) => Some(c),
        Err(e) if std::env::var("EMBAR_REQUIRE_RDMA").as_deref() != Ok("1") => {
            eprintln!("skipped: no usable RDMA device ({e}); scripts/rxe-test.sh runs this in a VM with rxe");
            None
        }
        Err(e) => panic!("EMBAR_REQUIRE_RDMA=1 but: {e}"),
    }
}

struct Buf {
    ptr: *mut u8,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Buf { ptr, len }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated; tests read only after the completions.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn fill(&mut self, at: usize, data: &[u8]) {
        // SAFETY: the tests keep `at + data.len() <= len`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) };
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

fn wait_one(cq: &CompletionQueue) -> Completion {
    let mut out = Vec::new();
    let t = Instant::now();
    while out.is_empty() {
        cq.poll(&mut out).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no completion in 10 s"
        );
    }
    assert_eq!(out.len(), 1, "{out:?}");
    out[0]
}

struct Pair {
    a: QueuePair,
    b: QueuePair,
    a_cq: Arc<CompletionQueue>,
    b_cq: Arc<CompletionQueue>,
}

fn pair(ctx: &Arc<Context>) -> Pair {
    let a_cq = CompletionQueue::new(ctx, 64).unwrap();
    let b_cq = CompletionQueue::new(ctx, 64).unwrap();
    let mut a = QueuePair::new(ctx, &a_cq, &a_cq, 16, 16).unwrap();
    let mut b = QueuePair::new(ctx, &b_cq, &b_cq, 16, 16).unwrap();
    let (ea, eb) = (a.endpoint(), b.endpoint());
    a.connect(&eb, true).unwrap();
    b.connect(&ea, true).unwrap();
    Pair { a, b, a_cq, b_cq }
}

#[test]
fn write_with_imm_lands_and_signals_the_receiver() {
    let Some(ctx) = context() else { return };
    let mut p = pair(&ctx);
    let mut src = Buf::new(8192);
    let dst = Buf::new(8192);
    // SAFETY: both buffers outlive their regions (dropped after them, below).
    let src_mr = unsafe { MemoryRegion::register(&ctx, src.ptr, src.len, false) }.unwrap();
    // SAFETY: as above.
    let dst_mr = unsafe { MemoryRegion::register(&ctx, dst.ptr, dst.len, true) }.unwrap();
    let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    src.fill(0, &payload);
    src.fill(6000, b"descriptor");
    // SAFETY: no buffer; the receive takes the immediate.
    unsafe { p.b.post_recv(9, None) }.unwrap();
    let writes = [
        Write {
            wr_id: 1,
            local: src_mr.sge(0, payload.len() as u32),
            remote_addr: dst_mr.addr() + 100,
            rkey: dst_mr.rkey(),
            imm: None,
            signaled: false,
        },
        Write {
            wr_id: 2,
            local: src_mr.sge(6000, 10),
            remote_addr: dst_mr.addr() + 7000,
            rkey: dst_mr.rkey(),
            imm: Some(0xdead_beef),
            signaled: true,
        },
    ];
    // SAFETY: the source stays unchanged until the completion below.
    unsafe { p.a.post_writes(&writes) }.unwrap();
    let sent = wait_one(&p.a_cq);
    assert!(sent.ok(), "{}", sent.status_str());
    assert_eq!(sent.wr_id, 2);
    let got = wait_one(&p.b_cq);
    assert!(got.ok(), "{}", got.status_str());
    assert_eq!(got.opcode, Opcode::RecvRdmaWithImm);
    assert_eq!(got.imm, Some(0xdead_beef));
    assert_eq!(got.qp_num, p.b.qp_num());
    assert_eq!(got.wr_id, 9);
    // RC order: the earlier plain write landed before the receiver saw the immediate.
    assert_eq!(&dst.bytes()[100..100 + payload.len()], &payload[..]);
    assert_eq!(&dst.bytes()[7000..7010], b"descriptor");
    assert!(dst.bytes()[..100].iter().all(|b| *b == 0));
}

#[test]
fn send_reaches_a_posted_receive() {
    let Some(ctx) = context() else { return };
    let mut p = pair(&ctx);
    let mut src = Buf::new(4096);
    let dst = Buf::new(4096);
    // SAFETY: buffers outlive regions.
    let src_mr = unsafe { MemoryRegion::register(&ctx, src.ptr, src.len, false) }.unwrap();
    // SAFETY: as above.
    let dst_mr = unsafe { MemoryRegion::register(&ctx, dst.ptr, dst.len, false) }.unwrap();
    src.fill(0, b"hello broker");
    // SAFETY: `dst` stays valid until the completion.
    unsafe { p.b.post_recv(5, Some(dst_mr.sge(0, 64))) }.unwrap();
    // SAFETY: `src` unchanged until completion.
    unsafe { p.a.post_send(6, src_mr.sge(0, 12), true) }.unwrap();
    assert!(wait_one(&p.a_cq).ok());
    let got = wait_one(&p.b_cq);
    assert!(got.ok());
    assert_eq!(got.opcode, Opcode::Recv);
    assert_eq!(got.byte_len, 12);
    assert_eq!(&dst.bytes()[..12], b"hello broker");
}

#[test]
fn a_write_outside_the_registration_is_a_remote_access_error_for_the_writer_only() {
    let Some(ctx) = context() else { return };
    let mut p = pair(&ctx);
    let mut src = Buf::new(8192);
    let dst = Buf::new(16384);
    // SAFETY: buffers outlive regions.
    let src_mr = unsafe { MemoryRegion::register(&ctx, src.ptr, src.len, false) }.unwrap();
    // Only the first 4 KiB of `dst` is registered for remote writes.
    // SAFETY: as above.
    let dst_mr = unsafe { MemoryRegion::register(&ctx, dst.ptr, 4096, true) }.unwrap();
    src.fill(0, &[0xAA; 8192]);
    let (base, rkey) = (dst_mr.addr(), dst_mr.rkey());
    let write = |at: u64, len: u32| Write {
        wr_id: at,
        local: src_mr.sge(0, len),
        remote_addr: base + at,
        rkey,
        imm: None,
        signaled: true,
    };
    // Straddling the end of the region by 64 bytes.
    // SAFETY: `src` unchanged until completion.
    unsafe { p.a.post_writes(&[write(4096 - 256, 320)]) }.unwrap();
    let c = wait_one(&p.a_cq);
    assert!(c.remote_access_error(), "{}", c.status_str());
    assert!(
        dst.bytes()[4096..].iter().all(|b| *b == 0),
        "bytes past the region changed"
    );
    // Another connection to the same region still works.
    let mut q = pair(&ctx);
    // SAFETY: as above.
    unsafe { q.a.post_writes(&[write(0, 4096)]) }.unwrap();
    let c = wait_one(&q.a_cq);
    assert!(c.ok(), "{}", c.status_str());
    assert!(dst.bytes()[..4096].iter().all(|b| *b == 0xAA));
    drop(dst_mr);
    // A deregistered region refuses writes.
    // SAFETY: as above.
    unsafe { q.a.post_writes(&[write(0, 64)]) }.unwrap();
    let c = wait_one(&q.a_cq);
    assert!(!c.ok(), "a write to a deregistered region succeeded");
    let _ = &p.b_cq;
}
