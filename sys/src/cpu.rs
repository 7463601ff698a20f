//! CPU pinning for polling cores.

use crate::{SysError, SysResult};

/// Number of CPUs this process may run on.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> SysResult<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(SysError::CpuOutOfRange {
            cpu,
            limit: libc::CPU_SETSIZE as usize,
        });
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE was checked above, so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and the size passed is its size; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(SysError::Affinity {
            cpu,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_to_cpu_zero_works_and_to_a_missing_cpu_fails() {
        pin_current_thread(0).expect("CPU 0 exists");
        let err = pin_current_thread(libc::CPU_SETSIZE as usize - 1).unwrap_err();
        assert!(matches!(err, SysError::Affinity { .. }), "{err}");
        assert!(err.to_string().contains("cannot pin"), "{err}");
        let err = pin_current_thread(1 << 20).unwrap_err();
        assert!(matches!(err, SysError::CpuOutOfRange { .. }), "{err}");
        assert!(err.to_string().contains("above the limit"), "{err}");
    }
}
