//! The audit log file: JSON lines, appended whole or not at all, readable
//! only by root and the configured group (who connected where is security
//! data).

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// Mode of the audit log (and the state file): owner read/write, group read.
pub const FILE_MODE: u32 = 0o640;
/// Mode of the directories pcguard creates for them.
pub const DIR_MODE: u32 = 0o750;

/// The group id of `name`, or an error naming it.
pub fn group_id(name: &str) -> Result<u32> {
    let c = CString::new(name).context("group name contains a NUL byte")?;
    match crate::sys::group_id(&c) {
        Some(gid) => Ok(gid),
        None => bail!("no group named \"{name}\" on this system"),
    }
}

/// Sets `file`'s mode and (when given) group, whatever they were: a file
/// made by an earlier version, or by hand, gets the same access.
pub fn restrict(file: &File, mode: u32, gid: Option<u32>) -> Result<()> {
    crate::sys::fchmod(file, mode).context("fchmod")?;
    if let Some(gid) = gid {
        crate::sys::fchown_group(file, gid).context("fchown")?;
    }
    Ok(())
}

/// Creates `dir` (and its parents) if missing; a directory it creates gets
/// `DIR_MODE` and the group.
pub fn create_dir(dir: &Path, gid: Option<u32>) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    restrict(&d, DIR_MODE, gid).with_context(|| format!("setting the access of {}", dir.display()))
}

/// Appends JSON lines to the audit log. [`AuditLog::reopen`] after the file
/// was rotated away.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    gid: Option<u32>,
}

impl AuditLog {
    /// Opens (creating) the log at `path`, mode 0640, group `gid`.
    pub fn open(path: &Path, gid: Option<u32>) -> Result<Self> {
        if let Some(dir) = path.parent() {
            create_dir(dir, gid)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(FILE_MODE)
            .open(path)
            .with_context(|| format!("opening audit log {}", path.display()))?;
        restrict(&file, FILE_MODE, gid).with_context(|| format!("setting the access of {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file, gid })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn reopen(&mut self) -> Result<()> {
        *self = Self::open(&self.path.clone(), self.gid)?;
        Ok(())
    }

    /// Appends `line` (one whole record, ending in a newline) with one
    /// write, or not at all: a write the file system cut short (it is
    /// full) is taken back by truncating to the length before it, so a
    /// reader never sees half a record, and the next record starts on a
    /// line of its own once space returns.
    pub fn write_line(&mut self, line: &[u8]) -> Result<()> {
        debug_assert!(line.ends_with(b"\n"));
        let before = self.file.metadata().with_context(|| format!("stat {}", self.path.display()))?.len();
        let result = self.file.write(line);
        match result {
            Ok(n) if n == line.len() => Ok(()),
            Ok(n) => {
                self.take_back(before);
                bail!(
                    "writing {}: only {n} of {} bytes fit (file system full?); the record was taken back",
                    self.path.display(),
                    line.len()
                )
            }
            Err(e) => {
                self.take_back(before);
                Err(e).with_context(|| format!("writing {}", self.path.display()))
            }
        }
    }

    fn take_back(&mut self, len: u64) {
        if self.file.metadata().map(|m| m.len() > len).unwrap_or(false)
            && let Err(e) = self.file.set_len(len)
        {
            log::error!("truncating {} back to {len} bytes after a short write: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_log_is_created_0640_and_an_existing_one_is_tightened() {
        let dir = std::env::temp_dir().join(format!("pcguard-auditlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/flows.jsonl");
        let mut log = AuditLog::open(&path, None).unwrap();
        log.write_line(b"{\"a\":1}\n").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::metadata(dir.join("sub")).unwrap().permissions().mode() & 0o777, 0o750);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        log.reopen().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_groups_are_named() {
        assert!(group_id("root").is_ok());
        let e = group_id("pcguard-no-such-group").unwrap_err().to_string();
        assert!(e.contains("pcguard-no-such-group"), "{e}");
    }
}
