//! The shared mapping that holds the pool: a file in `/dev/shm` (tmpfs, the default), a file
//! on hugetlbfs, or a device-DAX character device (`/dev/daxX.Y`, real CXL memory).
//!
//! A mapping is always `MAP_SHARED` so that every process (and, for DAX, every host) that maps
//! the same backing sees the same bytes. [`SharedMapping::open`] maps read-only first, so a
//! caller can validate a pool's superblock without being able to write a byte of a foreign
//! file, and then calls [`SharedMapping::make_writable`].
//!
//! The mapping itself is `memmap2`'s [`MmapRaw`]: raw pointers only, never a slice over
//! memory that other processes write. What stays here is what memmap2 does not know: which
//! backing a path is (tmpfs, hugetlbfs and its page size, a device-DAX instance and its size
//! and alignment from sysfs), the granule sizes must respect, creating a pool file without
//! replacing one, and pre-faulting (`MAP_POPULATE`, `MADV_POPULATE_WRITE`) of the whole
//! mapping or of the ranges a process is about to touch. NUMA binding is
//! [`crate::numa`], on the mapping's pointer.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Advice, MmapOptions, MmapRaw};

use crate::{SysError, SysResult};

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
const DAX_DEFAULT_ALIGN: usize = 2 << 20;

/// What backs a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A regular file (tmpfs such as `/dev/shm`, or any file system).
    File,
    /// A file on hugetlbfs; sizes are multiples of `page_bytes`.
    HugeTlbFs { page_bytes: usize },
    /// A device-DAX character device; sizes and offsets are multiples of `align_bytes`.
    DaxDevice { align_bytes: usize },
}

impl Backing {
    /// Sizes of a mapping must be a multiple of this.
    pub fn granule(self) -> usize {
        match self {
            Backing::File => page_size(),
            Backing::HugeTlbFs { page_bytes } => page_bytes,
            Backing::DaxDevice { align_bytes } => align_bytes,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Backing::File => "file".to_string(),
            Backing::HugeTlbFs { page_bytes } => {
                format!("hugetlbfs ({} KiB pages)", page_bytes >> 10)
            }
            Backing::DaxDevice { align_bytes } => {
                format!("device-dax (align {} KiB)", align_bytes >> 10)
            }
        }
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// A `MAP_SHARED` mapping of a pool backing. The bytes are only reachable through raw
/// pointers: other processes change them concurrently, so no `&[u8]` over them is handed out.
#[derive(Debug)]
pub struct SharedMapping {
    map: MmapRaw,
    writable: bool,
    backing: Backing,
    path: PathBuf,
    file: File,
}

/// Options for [`SharedMapping::create`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CreateOptions {
    /// Fault every page in at map time (`MAP_POPULATE`), so the data path takes no page fault.
    pub populate: bool,
}

impl SharedMapping {
    /// Creates a new backing file of `len` bytes and maps it read-write. Fails if the path
    /// exists (a pool is never silently replaced). For a DAX device (which cannot be created),
    /// opens it, checks it holds at least `len` bytes, and maps `len` bytes.
    pub fn create(path: &Path, len: usize, opts: CreateOptions) -> SysResult<SharedMapping> {
        if len == 0 {
            return Err(backing_err(path, "a pool cannot be empty".into()));
        }
        if is_char_device(path) {
            let (file, backing, dev_len) = open_existing(path)?;
            check_granule(path, backing, len)?;
            if len > dev_len {
                return Err(backing_err(
                    path,
                    format!("device holds {dev_len} bytes, {len} were asked for"),
                ));
            }
            return map(file, path, len, backing, true, opts.populate);
        }
        let backing = backing_of_dir(path)?;
        check_granule(path, backing, len)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    SysError::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    SysError::Create {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
        let result = file
            .set_len(len as u64)
            .map_err(|source| SysError::Resize {
                path: path.to_path_buf(),
                bytes: len as u64,
                source,
            })
            .and_then(|()| map(file, path, len, backing, true, opts.populate));
        if result.is_err() {
            // Leave nothing half-made behind: the file was created by this call.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// Opens an existing backing and maps all of it **read-only**. Call
    /// [`make_writable`](Self::make_writable) once its contents are validated.
    pub fn open(path: &Path) -> SysResult<SharedMapping> {
        let (file, backing, len) = open_existing(path)?;
        if len == 0 {
            return Err(backing_err(path, "is empty (0 bytes): not a pool".into()));
        }
        map(file, path, len, backing, false, false)
    }

    /// Makes a read-only mapping writable, in place (`mprotect`): the address stays.
    pub fn make_writable(&mut self) -> SysResult<()> {
        if self.writable {
            return Ok(());
        }
        // SAFETY: `as_mut_ptr()..+len()` is exactly the mapping this handle owns (memmap2's
        // raw mapping hands out no references into it); the file was opened read-write, so
        // PROT_WRITE on this MAP_SHARED mapping is permitted.
        let rc = unsafe {
            libc::mprotect(
                self.map.as_mut_ptr().cast(),
                self.map.len(),
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            return Err(SysError::Protect {
                path: self.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        self.writable = true;
        Ok(())
    }

    /// Faults every page of a writable mapping in now (`MADV_POPULATE_WRITE`, Linux 5.14+),
    /// so that the data path takes no page fault later. Returns false where the kernel cannot.
    pub fn populate(&self) -> bool {
        self.writable && self.map.advise(Advice::PopulateWrite).is_ok()
    }

    /// Faults the pages of `offset..offset + len` in now (`MADV_POPULATE_WRITE`), widened to
    /// whole granules of the backing (a huge page on hugetlbfs, the alignment of a DAX device)
    /// and clipped to the mapping: what a process that touches only part of a large pool does
    /// for the part it is about to write (a client its grants, a broker its metadata), instead
    /// of faulting the whole pool in. Returns false where the kernel cannot (the pages then
    /// fault in on first touch), or when the mapping is read-only or the range empty.
    pub fn populate_range(&self, offset: usize, len: usize) -> bool {
        let map_len = self.map.len();
        if !self.writable || len == 0 || offset >= map_len {
            return false;
        }
        let g = self.backing.granule().max(page_size());
        let start = offset / g * g;
        let end = offset
            .saturating_add(len)
            .div_ceil(g)
            .saturating_mul(g)
            .min(map_len);
        self.map
            .advise_range(Advice::PopulateWrite, start, end - start)
            .is_ok()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current length of the mapped file (the inode this mapping holds, whatever the
    /// path names now): less than [`len`](Self::len) when it was truncated under us.
    pub fn file_len(&self) -> io::Result<u64> {
        self.file.metadata().map(|m| m.len())
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // The range stays mapped until `map` drops, right after: unguarded first.
        crate::bus::unguard(self.map.as_ptr());
    }
}

fn backing_err(path: &Path, reason: String) -> SysError {
    SysError::Backing {
        path: path.to_path_buf(),
        reason,
    }
}

fn check_granule(path: &Path, backing: Backing, len: usize) -> SysResult<()> {
    let g = backing.granule();
    if len % g != 0 {
        return Err(backing_err(
            path,
            format!(
                "size {len} is not a multiple of {g} bytes, required by its {}",
                backing.describe()
            ),
        ));
    }
    Ok(())
}

fn is_char_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

fn open_existing(path: &Path) -> SysResult<(File, Backing, usize)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| SysError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| SysError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_char_device() {
        let (len, align) = dax_geometry(path, meta.rdev())?;
        return Ok((file, Backing::DaxDevice { align_bytes: align }, len));
    }
    if !meta.is_file() {
        return Err(backing_err(
            path,
            "is neither a regular file nor a DAX device".into(),
        ));
    }
    let backing = backing_of_fd(path, &file)?;
    Ok((file, backing, meta.len() as usize))
}

/// Size and alignment of a device-DAX instance, from sysfs.
fn dax_geometry(path: &Path, rdev: u64) -> SysResult<(usize, usize)> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/char/{major}:{minor}"));
    let read = |name: &str| -> Option<usize> {
        std::fs::read_to_string(sys.join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    let len = read("size").ok_or_else(|| {
        backing_err(
            path,
            format!(
                "is a character device but {}/size is missing: not a device-DAX instance",
                sys.display()
            ),
        )
    })?;
    let align = read("align").unwrap_or(DAX_DEFAULT_ALIGN);
    Ok((len, align))
}

fn statfs_of(path: &Path) -> io::Result<libc::statfs> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: all-zero is a valid statfs to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer for the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

// `f_type` is `i64` on some targets and `u32`/`i32` on others.
#[allow(clippy::unnecessary_cast)]
fn backing_from_statfs(st: &libc::statfs) -> Backing {
    if st.f_type as i64 == HUGETLBFS_MAGIC {
        Backing::HugeTlbFs {
            page_bytes: st.f_bsize as usize,
        }
    } else {
        Backing::File
    }
}

fn backing_of_dir(path: &Path) -> SysResult<Backing> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let st = statfs_of(dir).map_err(|source| SysError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(backing_from_statfs(&st))
}

fn backing_of_fd(path: &Path, file: &File) -> SysResult<Backing> {
    // SAFETY: all-zero is a valid statfs to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call; `st` is a valid out-pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if rc != 0 {
        return Err(SysError::Open {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(backing_from_statfs(&st))
}

fn map(
    file: File,
    path: &Path,
    len: usize,
    backing: Backing,
    writable: bool,
    populate: bool,
) -> SysResult<SharedMapping> {
    let mut opts = MmapOptions::new();
    opts.len(len);
    if populate {
        opts.populate();
    }
    // `file` is open and at least `len` bytes long (checked or sized by the callers).
    let map = if writable {
        opts.map_raw(&file)
    } else {
        opts.map_raw_read_only(&file)
    }
    .map_err(|source| SysError::Map {
        path: path.to_path_buf(),
        bytes: len,
        source,
    })?;
    crate::bus::guard(map.as_ptr(), len, path);
    Ok(SharedMapping {
        map,
        writable,
        backing,
        path: path.to_path_buf(),
        file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_path(name: &str) -> PathBuf {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("embar-sys-{}-{}", name, std::process::id()))
    }

    #[test]
    fn create_maps_shared_memory_that_a_second_mapping_sees() {
        let path = tmp_path("shared");
        let _ = std::fs::remove_file(&path);
        let a = SharedMapping::create(&path, 1 << 20, CreateOptions { populate: true }).unwrap();
        assert_eq!(a.backing(), Backing::File);
        let mut b = SharedMapping::open(&path).unwrap();
        assert!(!b.is_writable());
        b.make_writable().unwrap();
        // SAFETY: offset 4096 is inside both 1 MiB mappings; no other thread touches them.
        unsafe {
            a.as_ptr().add(4096).write_volatile(0xAB);
            assert_eq!(b.as_ptr().add(4096).read_volatile(), 0xAB);
        }
        assert_ne!(a.as_ptr(), b.as_ptr(), "two mappings, two addresses");
        drop((a, b));
        std::fs::remove_file(&path).unwrap();
    }

    /// Resident pages of the calling process's mapping at `ptr`, from /proc/self/smaps.
    fn resident_kib(ptr: *mut u8) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", ptr as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines.next().expect("mapping listed");
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("an Rss line")
    }

    #[test]
    fn populate_range_faults_in_only_the_granules_of_the_range() {
        let path = tmp_path("populate-range");
        let _ = std::fs::remove_file(&path);
        let m = SharedMapping::create(&path, 64 << 20, CreateOptions::default()).unwrap();
        assert_eq!(resident_kib(m.as_ptr()), 0, "nothing touched yet");
        // 1 MiB starting in the middle of a page: 257 pages.
        assert!(m.populate_range((8 << 20) + 100, 1 << 20));
        let kib = resident_kib(m.as_ptr());
        assert!((1024..=1032).contains(&kib), "{kib} KiB resident");
        // A range past the end is clipped, an empty one is refused.
        assert!(m.populate_range((64 << 20) - 4096, 1 << 20));
        assert!(!m.populate_range(0, 0));
        assert!(!m.populate_range(64 << 20, 4096));
        assert!(resident_kib(m.as_ptr()) < 1040);
        drop(m);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn create_refuses_an_existing_path_and_an_empty_size() {
        let path = tmp_path("exists");
        std::fs::write(&path, b"keep me").unwrap();
        let err = SharedMapping::create(&path, 1 << 20, CreateOptions::default()).unwrap_err();
        assert!(matches!(err, SysError::AlreadyExists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
        std::fs::remove_file(&path).unwrap();
        let err = SharedMapping::create(&path, 0, CreateOptions::default()).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn create_refuses_a_size_off_the_page_granule_and_leaves_no_file() {
        let path = tmp_path("granule");
        let err = SharedMapping::create(&path, 1000, CreateOptions::default()).unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn open_of_missing_empty_or_non_file_paths_is_a_clear_error() {
        let err = SharedMapping::open(Path::new("/nonexistent/embar.pool")).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot open /nonexistent/embar.pool"),
            "{err}"
        );
        let path = tmp_path("empty");
        std::fs::write(&path, b"").unwrap();
        let err = SharedMapping::open(&path).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = SharedMapping::open(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("DAX"), "{err}");
    }

    #[test]
    fn a_read_only_mapping_cannot_be_written() {
        let path = tmp_path("ro");
        let _ = std::fs::remove_file(&path);
        drop(SharedMapping::create(&path, 1 << 16, CreateOptions::default()).unwrap());
        let m = SharedMapping::open(&path).unwrap();
        // A write through a read-only mapping would fault; check the protection the kernel
        // reports for the range instead of faulting the test process.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", m.as_ptr() as usize);
        let line = maps
            .lines()
            .find(|l| l.starts_with(&start))
            .expect("mapping listed");
        assert!(line.contains(" r--s "), "{line}");
        drop(m);
        std::fs::remove_file(&path).unwrap();
    }
}
