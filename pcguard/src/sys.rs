//! The small set of raw system calls the daemon and CLI make, in one place
//! with their safety arguments: processes and signals, resource limits,
//! clocks, interfaces and their addresses, directories opened without
//! following symlinks, locks, file access, mounts, netlink sockets.
//!
//! Every `unsafe` libc call of the daemon is here (the BPF side goes
//! through aya). Each wrapper is safe to call: it takes Rust types, checks
//! what the call needs, and returns `io::Error::last_os_error()` on
//! failure. Nothing here imports from the rest of the crate.

use std::{
    ffi::{CStr, CString},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use anyhow::{Result, bail};

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
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()) };
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

/// A signal [`kill`] sends.
pub type Signal = libc::c_int;
/// Reload (`pcguard reload`).
pub const SIGHUP: Signal = libc::SIGHUP;
/// Confirm (`pcguard confirm`).
pub const SIGUSR1: Signal = libc::SIGUSR1;

/// Sends `sig` to process `pid`.
pub fn kill(pid: u32, sig: Signal) -> io::Result<()> {
    // A pid beyond pid_t would become a negative pid: a process group.
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall, no pointers.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lifts `RLIMIT_MEMLOCK` (BPF maps and programs count against it on
/// kernels before 5.11; later ones account BPF memory to the cgroup and
/// ignore it).
pub fn raise_memlock_rlimit() -> io::Result<()> {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Now on `clock`, in nanoseconds.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer; both clocks used here exist on every
    // kernel that runs the programs (2.6.32+), so the call cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now on `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns()` (event
/// timestamps).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Now on the clock the programs age conntrack entries with
/// (`bpf_ktime_get_coarse_ns`: `CLOCK_MONOTONIC_COARSE`).
pub fn ktime_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// Interface index by name.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("interface {name} not found: {}", io::Error::last_os_error());
    }
    Ok(idx)
}

/// Interface name by index (for audit records), `None` if it is gone.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Every address of every interface of this network namespace.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; its
        // ifa_addr, when set, points at a sockaddr of the family it names.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// `openat(dir, name, O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)`, read-only;
/// `dir` `None` is the working directory (`AT_FDCWD`). Fails (see
/// [`is_symlink_or_not_dir`]) when `name` is a symlink or not a directory.
pub fn open_dir_at(dir: Option<BorrowedFd<'_>>, name: &CStr) -> io::Result<OwnedFd> {
    let dir = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid directory fd (or AT_FDCWD) and a NUL-terminated name.
    let fd = unsafe {
        libc::openat(dir, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// True when [`open_dir_at`] failed because the name is a symlink
/// (`ELOOP`, with `O_NOFOLLOW`) or not a directory (`ENOTDIR`).
pub fn is_symlink_or_not_dir(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Owner and mode of an open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    /// `st_mode`: the file type and permission bits.
    pub mode: u32,
}

/// `fstat(fd)`: owner and mode.
pub fn owner(fd: BorrowedFd<'_>) -> io::Result<Owner> {
    // SAFETY: all-zero is a valid stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Owner { uid: st.st_uid, mode: st.st_mode })
}

/// The effective user id of this process.
pub fn geteuid() -> u32 {
    // SAFETY: no preconditions; cannot fail.
    unsafe { libc::geteuid() }
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid directory fd and NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `unlinkat(dir, name)`: removes a file (a pin). Never follows a symlink
/// in `name`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid directory fd and NUL-terminated name; unlinkat never
    // follows a symlink in its last component.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `unlinkat(dir, name, AT_REMOVEDIR)`: removes an empty directory.
pub fn rmdir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid directory fd and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes `fd`'s exclusive `flock` without waiting; `WouldBlock` when
/// another open file description holds a lock on it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd; no pointers.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds an exclusive `flock` on
/// `fd`'s file: a shared non-blocking probe, released at once.
pub fn is_locked_by_other(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: valid fd; no pointers.
    unsafe {
        if libc::flock(fd.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 {
            return true;
        }
        libc::flock(fd.as_raw_fd(), libc::LOCK_UN);
    }
    false
}

/// The group id of group `name`, `None` if there is no such group.
pub fn group_id(name: &CStr) -> Option<u32> {
    // SAFETY: a NUL-terminated name; the result points into libc's static
    // storage and is read at once (the daemon does not call getgrnam from
    // two threads).
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return None;
    }
    // SAFETY: non-null result of getgrnam.
    Some(unsafe { (*gr).gr_gid })
}

/// `fchmod(fd, mode)`.
pub fn fchmod(fd: &impl AsFd, mode: u32) -> io::Result<()> {
    // SAFETY: an open fd; plain syscall.
    if unsafe { libc::fchmod(fd.as_fd().as_raw_fd(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fchown(fd, -1, gid)`: sets the group, keeps the owner.
pub fn fchown_group(fd: &impl AsFd, gid: u32) -> io::Result<()> {
    // SAFETY: an open fd; plain syscall (uid -1: unchanged).
    if unsafe { libc::fchown(fd.as_fd().as_raw_fd(), u32::MAX, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A raw netlink socket (`SOCK_CLOEXEC`) of `protocol`
/// (`NETLINK_SOCK_DIAG`, ...).
pub fn netlink_socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SO_RCVTIMEO`: a receive on `fd` fails with `WouldBlock` after
/// `timeout` without data.
pub fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd; tv is a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `msg` on netlink socket `fd` to the kernel (port id 0); returns
/// the bytes sent.
pub fn netlink_send_to_kernel(fd: BorrowedFd<'_>, msg: &[u8]) -> io::Result<usize> {
    // SAFETY: sockaddr_nl is plain data; all zero but the family = the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid fd; msg and kernel are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receives one datagram into `buf`; returns its full length, which is
/// more than `buf.len()` when it was truncated (`MSG_TRUNC`).
pub fn recv_datagram(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid fd; buf is writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
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
    fn loopback_by_name_and_index_and_a_missing_interface() {
        let lo = ifindex("lo").unwrap();
        assert_eq!(ifname(lo).as_deref(), Some("lo"));
        assert!(ifindex("pcguard-none0").unwrap_err().to_string().contains("pcguard-none0"));
        assert!(ifindex("nul\0byte").is_err());
        assert_eq!(ifname(u32::MAX), None);
    }

    #[test]
    fn clocks_run_forward() {
        let (a, b) = (monotonic_ns(), ktime_coarse_ns());
        std::thread::sleep(Duration::from_millis(20));
        assert!(monotonic_ns() > a);
        assert!(ktime_coarse_ns() > b);
    }

    #[test]
    fn a_symlink_is_never_opened_as_a_directory() {
        let dir = std::env::temp_dir().join(format!("pcguard-sys-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/", dir.join("link")).unwrap();
        let d = open_dir_at(None, &CString::new(dir.as_os_str().as_encoded_bytes()).unwrap()).unwrap();
        let e = open_dir_at(Some(d.as_fd()), c"link").unwrap_err();
        assert!(is_symlink_or_not_dir(&e), "{e}");
        mkdir_at(d.as_fd(), c"sub", 0o700).unwrap();
        let sub = open_dir_at(Some(d.as_fd()), c"sub").unwrap();
        assert_eq!((owner(sub.as_fd()).unwrap().uid, owner(sub.as_fd()).unwrap().mode & 0o7777), (geteuid(), 0o700));
        try_lock_exclusive(sub.as_fd()).unwrap();
        let other = open_dir_at(Some(d.as_fd()), c"sub").unwrap();
        assert!(is_locked_by_other(other.as_fd()));
        assert_eq!(try_lock_exclusive(other.as_fd()).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop((sub, other));
        assert_eq!(mkdir_at(d.as_fd(), c"sub", 0o700).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        rmdir_at(d.as_fd(), c"sub").unwrap();
        assert_eq!(rmdir_at(d.as_fd(), c"sub").unwrap_err().kind(), io::ErrorKind::NotFound);
        unlink_at(d.as_fd(), c"link").unwrap();
        assert_eq!(unlink_at(d.as_fd(), c"link").unwrap_err().kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir(&dir).unwrap();
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
