//! What the in-process tests of this crate share: a pool file of their own, removed however
//! the test ends.

use std::sync::atomic::{AtomicU32, Ordering};

use embar_dataplane::pool::geometry::PoolConfig;
use embar_dataplane::pool::{CreateOptions, Pool};

/// A pool file, removed when dropped.
pub struct TempPool(std::path::PathBuf);

impl Drop for TempPool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A new pool of `cfg` in `/dev/shm`, its file named after the test (`name`), this process
/// and a counter: tests run in parallel, each gets its own.
pub fn temp_pool(name: &str, cfg: &PoolConfig) -> (TempPool, Pool) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/embar-test-broker-{name}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let p = Pool::create(&path, cfg, &CreateOptions::default()).unwrap();
    (TempPool(path), p)
}
