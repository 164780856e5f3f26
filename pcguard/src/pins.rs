//! The daemon's bpffs directory: pinned maps and links that outlive the
//! daemon process, so that enforcement goes on through a crash, a stop, a
//! restart or an upgrade (docs/datapath.md, "Pins").
//!
//! ```text
//! <dir>/                       root-owned, mode 0700, locked by the daemon
//!       maps-v<ABI>-ct<N>-new<M>/<MAP>    the contract's maps (names::PINNED)
//!       links/xdp-<ifname>, tc-<ifname>  the attachments (bpf links)
//! ```
//!
//! The map set's directory name carries the kernel/user contract version
//! and the conntrack sizes: a daemon whose layout differs creates a new set
//! beside the running one, swaps the programs atomically on the links, and
//! only then removes the old set.
//!
//! Every path is opened component by component without following
//! symlinks (`O_NOFOLLOW`), and the directory must be owned by this user
//! and on bpffs: /sys/fs/bpf is world-writable, so a symlink planted there
//! must never lead the root daemon to pin into, or delete from, another
//! directory. Pins are made and opened through `/proc/self/fd/<dir fd>/`,
//! so the directory checked is the directory used.

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::sys;

/// Name of the directory of one map set: contract version and the sizes
/// chosen at load time.
pub fn maps_dir_name(abi: u32, conntrack: u32, ct_new: u32) -> String {
    format!("maps-v{abi}-ct{conntrack}-new{ct_new}")
}

/// Subdirectory of the pinned links.
pub const LINKS_DIR: &str = "links";

/// A directory opened without following symlinks, checked, and held open.
#[derive(Debug)]
pub struct PinDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn cstring(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).with_context(|| format!("{name:?} contains a NUL byte"))
}

fn explain_open_error(e: io::Error, path: &Path) -> anyhow::Error {
    if sys::is_symlink_or_not_dir(&e) {
        anyhow::anyhow!(
            "{} is a symlink or not a directory: refusing to use it for pins (remove it, or choose another --bpffs-dir)",
            path.display()
        )
    } else {
        anyhow::Error::new(e).context(format!("opening {}", path.display()))
    }
}

impl PinDir {
    /// Opens `path` (absolute), creating its last component (mode 0700) if
    /// it is missing. Refuses any symlink on the way, and a directory that
    /// is not on bpffs, not owned by this user, or writable by others.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_absolute() {
            bail!("the bpffs directory must be an absolute path, not {}", path.display());
        }
        let root = cstring(OsStr::new("/"))?;
        let mut fd = sys::open_dir_at(None, &root).context("opening /")?;
        let mut so_far = PathBuf::from("/");
        let comps: Vec<Component> = path.components().collect();
        for (i, c) in comps.iter().enumerate() {
            let Component::Normal(name) = c else {
                if matches!(c, Component::RootDir) {
                    continue;
                }
                bail!("{}: use a path without '.' or '..'", path.display());
            };
            so_far.push(name);
            let cname = cstring(name)?;
            let last = i + 1 == comps.len();
            fd = match sys::open_dir_at(Some(fd.as_fd()), &cname) {
                Ok(next) => next,
                Err(e) if last && e.kind() == io::ErrorKind::NotFound => {
                    if let Err(e) = sys::mkdir_at(fd.as_fd(), &cname, 0o700)
                        && e.kind() != io::ErrorKind::AlreadyExists
                    {
                        return Err(e).with_context(|| format!("creating {}", so_far.display()));
                    }
                    sys::open_dir_at(Some(fd.as_fd()), &cname).map_err(|e| explain_open_error(e, &so_far))?
                }
                Err(e) => return Err(explain_open_error(e, &so_far)),
            };
        }
        let dir = Self { fd, path: path.to_path_buf() };
        dir.check()?;
        Ok(dir)
    }

    /// On bpffs, owned by this user, no group or other write.
    fn check(&self) -> Result<()> {
        let st = sys::owner(self.fd.as_fd())?;
        if !sys::fd_is_bpffs(&self.fd) {
            bail!("{} is not on a bpffs mount", self.path.display());
        }
        let euid = sys::geteuid();
        if st.uid != euid {
            bail!(
                "{} is owned by uid {}, not by this user (uid {euid}): refusing to use it for pins",
                self.path.display(),
                st.uid
            );
        }
        if st.mode & 0o022 != 0 {
            bail!(
                "{} is writable by group or others (mode {:o}): refusing to use it for pins",
                self.path.display(),
                st.mode & 0o7777
            );
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the directory's exclusive lock (held as long as this value):
    /// one daemon per pin directory. Fails at once if another holds it.
    pub fn lock(&self) -> Result<()> {
        if let Err(e) = sys::try_lock_exclusive(self.fd.as_fd()) {
            if e.kind() == io::ErrorKind::WouldBlock {
                bail!(
                    "another pcguard daemon is running on {} (it holds the directory's lock): stop it first, or use another --bpffs-dir",
                    self.path.display()
                );
            }
            return Err(e).with_context(|| format!("locking {}", self.path.display()));
        }
        Ok(())
    }

    /// Whether another process holds the lock (a live daemon).
    pub fn is_locked_by_other(&self) -> bool {
        sys::is_locked_by_other(self.fd.as_fd())
    }

    /// The path through which `name` in this directory is pinned or opened:
    /// `/proc/self/fd/<fd>/<name>`, i.e. this very directory.
    pub fn pin_path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    /// The subdirectory `name`, created (0700) if missing.
    pub fn subdir(&self, name: &str) -> Result<PinDir> {
        let cname = cstring(OsStr::new(name))?;
        let path = self.path.join(name);
        let fd = match sys::open_dir_at(Some(self.fd.as_fd()), &cname) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                sys::mkdir_at(self.fd.as_fd(), &cname, 0o700)
                    .with_context(|| format!("creating {}", path.display()))?;
                sys::open_dir_at(Some(self.fd.as_fd()), &cname).map_err(|e| explain_open_error(e, &path))?
            }
            Err(e) => return Err(explain_open_error(e, &path)),
        };
        let dir = PinDir { fd, path };
        dir.check()?;
        Ok(dir)
    }

    /// The subdirectory `name` if it exists.
    pub fn existing_subdir(&self, name: &str) -> Result<Option<PinDir>> {
        let cname = cstring(OsStr::new(name))?;
        match sys::open_dir_at(Some(self.fd.as_fd()), &cname) {
            Ok(fd) => {
                let dir = PinDir { fd, path: self.path.join(name) };
                dir.check()?;
                Ok(Some(dir))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(explain_open_error(e, &self.path.join(name))),
        }
    }

    /// Names in this directory.
    pub fn entries(&self) -> Result<Vec<String>> {
        // Read through /proc/self/fd: the directory this fd is, not a path.
        let list = std::fs::read_dir(self.pin_path("")).with_context(|| format!("listing {}", self.path.display()))?;
        let mut names = Vec::new();
        for e in list {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries().map(|e| e.iter().any(|n| n == name)).unwrap_or(false)
    }

    /// Removes the pin `name` (a file on bpffs); absent is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        let cname = cstring(OsStr::new(name))?;
        // unlinkat never follows a symlink in its last component.
        if let Err(e) = sys::unlink_at(self.fd.as_fd(), &cname)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(e).with_context(|| format!("removing {}", self.path.join(name).display()));
        }
        Ok(())
    }

    /// Removes the subdirectory `name` and the pins in it (one level: pin
    /// directories hold no deeper directories); absent is fine.
    pub fn remove_subdir(&self, name: &str) -> Result<()> {
        let Some(sub) = self.existing_subdir(name)? else { return Ok(()) };
        for entry in sub.entries()? {
            sub.remove(&entry)?;
        }
        drop(sub);
        let cname = cstring(OsStr::new(name))?;
        if let Err(e) = sys::rmdir_at(self.fd.as_fd(), &cname)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(e).with_context(|| format!("removing {}", self.path.join(name).display()));
        }
        Ok(())
    }
}

/// Makes sure a bpffs is mounted at /sys/fs/bpf when `dir` is under it,
/// mounting one (mode 0700, not the kernel's default 1777) if nothing is.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) || sys::is_bpffs(root) {
        return Ok(());
    }
    log::warn!("no bpffs at /sys/fs/bpf; mounting one (mode 0700)");
    sys::mount_bpffs(root).context("mounting bpffs at /sys/fs/bpf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_set_names_carry_the_contract_version_and_sizes() {
        assert_eq!(maps_dir_name(3, 262_144, 65_536), "maps-v3-ct262144-new65536");
        assert_ne!(maps_dir_name(3, 1024, 1024), maps_dir_name(4, 1024, 1024));
    }

    #[test]
    fn relative_and_dotted_paths_are_refused() {
        assert!(PinDir::open(Path::new("relative/dir")).is_err());
        let e = PinDir::open(Path::new("/sys/fs/bpf/../bpf/x")).unwrap_err().to_string();
        assert!(e.contains("'..'"), "{e}");
    }
}
