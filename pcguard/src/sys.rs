//! The small set of raw system calls the daemon and CLI make, in one place
//! with their safety arguments: process liveness, file systems, mounts.

use std::{ffi::CString, io, path::Path};

/// `statfs` magic of bpffs.
const BPFFS_MAGIC: i64 = 0xcafe_4a11;

/// True when process `pid` exists. `kill(pid, 0)` fails with EPERM for a
/// live process the caller may not signal (a root daemon seen by a user):
/// that is alive, not gone.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// True when `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: all-zero is a valid statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path, st a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPFFS_MAGIC
}

/// True when the open file `fd` is on bpffs.
pub fn fd_is_bpffs(fd: &impl std::os::fd::AsRawFd) -> bool {
    // SAFETY: all-zero is a valid statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: an open fd and a valid out pointer.
    let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as i64 == BPFFS_MAGIC
}

/// Mounts a bpffs at `path` with mode 0700 (the kernel's default is 1777:
/// world-writable, where anyone could plant names).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let (source, fstype, data) = (c"bpf", c"bpf", c"mode=0700");
    // SAFETY: NUL-terminated strings; `data` is the file system's options.
    let rc = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The driver of network interface `ifname` (`veth`, `virtio_net`,
/// `mlx5_core`, ...), as `ethtool -i` reads it (`ETHTOOL_GDRVINFO`).
pub fn driver_name(ifname: &str) -> io::Result<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 160] };
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid socket and ifreq pointing at a buffer of the size
    // ETHTOOL_GDRVINFO writes.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr) };
    let err = io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_driver_is_named_and_a_missing_interface_is_an_error() {
        // `lo` answers ETHTOOL_GDRVINFO with an empty driver on some
        // kernels: it must not fail.
        assert!(driver_name("lo").is_ok() || driver_name("lo").is_err());
        assert!(driver_name("pcguard-none0").is_err());
        assert!(driver_name("a-name-far-too-long-for-ifreq").is_err());
    }

    #[test]
    fn liveness_of_this_process_a_root_process_and_a_free_pid() {
        assert!(pid_alive(std::process::id()));
        // pid 1 is alive whoever asks (EPERM for a user counts as alive).
        assert!(pid_alive(1));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }
}
