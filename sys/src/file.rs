//! Page-cache advice for files written once and read back rarely (the disk logs).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Asks the kernel to drop the cached pages of bytes `offset..offset + len` of `file`
/// (`posix_fadvise(POSIX_FADV_DONTNEED)`). Pages already written back (after an
/// `fdatasync`) are freed at once; dirty ones are left alone. Only advice: the file's
/// contents do not change, and a later read fetches them from the disk.
pub fn drop_cached(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: posix_fadvise reads no memory of this process; the descriptor is valid while
    // `file` is borrowed, and the call only advises the page cache about it.
    let rc =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}
