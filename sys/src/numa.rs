//! NUMA binding of a pool mapping (`mbind(MPOL_BIND)`): on a host where CXL memory shows up
//! as a CPU-less NUMA node, binding the pool to that node puts the log in CXL memory.

use std::path::Path;

use crate::{SysError, SysResult};

const MPOL_BIND: libc::c_int = 2;
const MPOL_MF_STRICT: libc::c_uint = 1;
const MPOL_MF_MOVE: libc::c_uint = 2;
const MAX_NODES: usize = 1024;

/// Whether the running kernel lists NUMA node `node`.
pub fn node_exists(node: u32) -> bool {
    Path::new(&format!("/sys/devices/system/node/node{node}")).is_dir()
}

/// Binds the pages of `[ptr, ptr + len)` to `node`, moving pages already faulted in.
///
/// # Safety
/// `[ptr, ptr + len)` must be a page-aligned range of a live mapping owned by the caller.
pub unsafe fn bind(ptr: *mut u8, len: usize, node: u32) -> SysResult<()> {
    if node as usize >= MAX_NODES || !node_exists(node) {
        return Err(SysError::NoNumaNode { node });
    }
    let mut mask = [0u64; MAX_NODES / 64];
    mask[node as usize / 64] |= 1 << (node % 64);
    // SAFETY: the caller guarantees the range is a live mapping; `mask` holds MAX_NODES bits
    // and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            MAX_NODES as libc::c_ulong,
            MPOL_MF_STRICT | MPOL_MF_MOVE,
        )
    };
    if rc != 0 {
        return Err(SysError::Mbind {
            node,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_to_an_absent_node_is_a_clear_error() {
        let mut buf = vec![0u8; 8192];
        // SAFETY: node 999 does not exist, so the call fails before mbind touches the range.
        let err = unsafe { bind(buf.as_mut_ptr(), 4096, 999) }.unwrap_err();
        assert!(matches!(err, SysError::NoNumaNode { node: 999 }), "{err}");
        assert!(err.to_string().contains("no such node"), "{err}");
    }
}
