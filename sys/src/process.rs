//! Whether a process exists, for reclaiming what a vanished process held in the pool.

/// True if process `pid` exists and has not exited (it may belong to another user). A zombie
/// (exited, not yet reaped by its parent) is not alive: it holds nothing and will run no more.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 performs the permission and existence checks only.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !zombie(pid)
}

/// This host's name (the kernel's), if it can be read.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// Whether `/proc` shows `pid` as a zombie (state `Z`, or `X` while it is being reaped).
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(super::alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!super::alive(pid));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped: it stays a zombie until `wait`.
        let start = std::time::Instant::now();
        while super::alive(pid) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the exited child still counts as alive"
            );
            std::thread::yield_now();
        }
        assert!(super::alive(std::process::id() as i32));
        drop(child);
    }
}
