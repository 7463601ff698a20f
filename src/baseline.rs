//! Baselines measured in the same run as a benchmark, so that figures are ratios on a noisy
//! machine.

use std::time::Instant;

/// Single-thread memcpy bandwidth of this machine, GB/s (best of a few 256 MiB copies).
pub fn memcpy_gbps() -> f64 {
    const BYTES: usize = 256 << 20;
    let src = vec![0x5au8; BYTES];
    let mut dst = vec![0u8; BYTES];
    dst.copy_from_slice(&src); // fault the pages in
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    BYTES as f64 / best / 1e9
}
