//! The daemon's runtime state file (`<run dir>/state.json`): what is attached
//! where, which policy is loaded and where the maps are pinned. Written
//! atomically by `pcguard run`, read by `pcguard status`.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{counters::Labels, datapath::AttachedInterface};

pub const DEFAULT_RUN_DIR: &str = "/run/pcguard";
pub const STATE_FILE: &str = "state.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    pub version: String,
    pub config: PathBuf,
    /// The pin directory (`--bpffs-dir`).
    pub bpffs_dir: Option<PathBuf>,
    /// The pinned map set in use (under `bpffs_dir`).
    #[serde(default)]
    pub maps_dir: Option<PathBuf>,
    /// `pcguard_common::ABI_VERSION` of the daemon that wrote this.
    #[serde(default)]
    pub abi: u32,
    /// The daemon adopted the maps and links of an earlier one.
    #[serde(default)]
    pub adopted: bool,
    pub interfaces: Vec<AttachedInterface>,
    pub mode: String,
    pub egress_mode: String,
    pub rules: usize,
    /// Unix time the running policy was applied.
    pub policy_loaded_at: u64,
    /// Number of successful reloads since start.
    pub reloads: u64,
    pub metrics_listen: Option<String>,
    pub audit_log: Option<PathBuf>,
    /// Set while a policy waits for `pcguard confirm`: the Unix time at which
    /// it is reverted.
    pub pending_confirm_until: Option<u64>,
    pub labels: Labels,
    /// 1 for the policy applied at start, one more for every policy applied
    /// since (a reload, a revert). Not changed by a failed reload or by
    /// reopening the audit log.
    #[serde(default)]
    pub policy_generation: u64,
    /// The outcome of the last reload (SIGHUP), if any.
    #[serde(default)]
    pub last_reload: Option<LastReload>,
}

/// How the last reload ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    /// Unix time.
    pub at: u64,
    pub ok: bool,
    /// Why it failed (the running policy was kept).
    #[serde(default)]
    pub error: Option<String>,
}

impl State {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(STATE_FILE)
    }

    /// Writes the state atomically (temp file + rename), mode 0640, group
    /// `gid` (the run directory, if it creates it: 0750).
    pub fn write(&self, run_dir: &Path, gid: Option<u32>) -> Result<()> {
        crate::auditlog::create_dir(run_dir, gid)?;
        let tmp = run_dir.join(format!(".{STATE_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::auditlog::FILE_MODE)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        crate::auditlog::restrict(&f, crate::auditlog::FILE_MODE, gid)?;
        f.write_all(&serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, Self::path(run_dir)).context("replacing the state file")?;
        Ok(())
    }

    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = Self::path(run_dir);
        let text =
            std::fs::read(&path).with_context(|| format!("reading {} (is `pcguard run` running?)", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn remove(run_dir: &Path) {
        let _ = std::fs::remove_file(Self::path(run_dir));
    }

    /// True when the process that wrote the state is still alive.
    pub fn is_live(&self) -> bool {
        crate::sys::pid_alive(self.pid)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_carries_the_abi_version() {
        let dir = std::env::temp_dir().join(format!("pcguard-state-abi-{}", std::process::id()));
        let state = State {
            pid: 1,
            version: "0.1.0".into(),
            config: "/etc/pcguard/site.toml".into(),
            bpffs_dir: None,
            maps_dir: None,
            abi: pcguard_common::ABI_VERSION,
            adopted: false,
            interfaces: Vec::new(),
            mode: "enforce".into(),
            egress_mode: "enforce".into(),
            rules: 0,
            policy_loaded_at: 0,
            reloads: 0,
            metrics_listen: None,
            audit_log: None,
            pending_confirm_until: None,
            labels: Labels::default(),
            policy_generation: 1,
            last_reload: None,
        };
        state.write(&dir, None).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(State::path(&dir)).unwrap()).unwrap();
        assert_eq!(json["abi"], pcguard_common::ABI_VERSION);
        assert_eq!(State::read(&dir).unwrap(), state);
        // A state file written before the version was recorded reads as 0:
        // no version this build speaks.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("abi");
        std::fs::write(State::path(&dir), serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(State::read(&dir).unwrap().abi, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
