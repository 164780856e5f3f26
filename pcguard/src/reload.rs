//! `pcguard reload` and the daemon's answer: a reload that reports its
//! outcome, so `systemctl reload` (`ExecReload=pcguard reload`) fails when
//! the reload fails.
//!
//! The client writes a request file `<run dir>/reload-<id>.request` (mode
//! 0600, written under a temporary name and renamed, so the daemon never
//! reads half of one), then sends SIGHUP. On every SIGHUP the daemon takes
//! all request files present (reads and removes them), reloads once, and
//! answers each with `<run dir>/reload-<id>.result`; the client waits for
//! the result of its own id. The request exists before the signal and the
//! daemon reads it before loading the config, so the reload that answers
//! it read the config after the client was started: an earlier reload's
//! outcome is never taken for this one.
//!
//! A request asks for a confirm window (`--confirm-within`): the reload is
//! then applied in confirm-or-revert mode. The daemon accepts only a
//! regular file owned by its own user (root) with mode 0600; any other file
//! refuses the whole reload (a request that cannot be trusted must not make
//! a reload happen without the confirm window it may have asked for).

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::state::State;

const PREFIX: &str = "reload-";
const REQUEST: &str = ".request";
const RESULT: &str = ".result";
/// Mode of requests and results.
const MODE: u32 = 0o600;
/// Results nobody collected (the client timed out) are removed after this.
const STALE_RESULT: Duration = Duration::from_secs(600);
/// A request larger than this is refused.
const MAX_REQUEST: u64 = 4096;

/// What a client asks of a reload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Apply the new policy in confirm-or-revert mode with this window
    /// (milliseconds).
    #[serde(default)]
    pub confirm_within_ms: Option<u64>,
}

/// The daemon's answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    /// Why the reload failed (the running policy was kept).
    #[serde(default)]
    pub error: Option<String>,
    /// The policy generation running after the reload.
    pub generation: u64,
    /// Unix time until which the new policy waits for `pcguard confirm`.
    #[serde(default)]
    pub pending_confirm_until: Option<u64>,
}

/// The requests one SIGHUP found.
#[derive(Debug, Default)]
pub struct Batch {
    /// Ids of the requests accepted.
    pub ids: Vec<String>,
    /// Ids of refused requests, and why.
    pub refused: Vec<(String, String)>,
    /// The shortest confirm window asked for, if any asked.
    pub confirm_within: Option<Duration>,
}

fn request_path(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(format!("{PREFIX}{id}{REQUEST}"))
}

fn result_path(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(format!("{PREFIX}{id}{RESULT}"))
}

/// Ids are made by [`new_id`]: digits and dashes only.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

fn new_id() -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// Writes `bytes` to `path` atomically (temporary file + rename), mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(MODE)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    crate::sys::fchmod(&f, MODE).with_context(|| format!("fchmod {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Reads a request or result file that must be a regular file (no symlink
/// followed) owned by this process's user with mode 0600.
fn read_private(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = f.metadata().with_context(|| format!("stat {}", path.display()))?;
    let euid = crate::sys::geteuid();
    if !meta.file_type().is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.uid() != euid {
        bail!("{} is owned by uid {}, not uid {euid}", path.display(), meta.uid());
    }
    if meta.mode() & 0o7777 != MODE {
        bail!("{} has mode {:04o}, not {MODE:04o}", path.display(), meta.mode() & 0o7777);
    }
    if meta.len() > MAX_REQUEST {
        bail!("{} is {} bytes long (at most {MAX_REQUEST})", path.display(), meta.len());
    }
    let mut bytes = Vec::new();
    f.take(MAX_REQUEST).read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

/// Daemon side, on SIGHUP: takes (reads and removes) every request in
/// `run_dir`, and removes results nobody collected.
pub fn take_requests(run_dir: &Path) -> Batch {
    let mut batch = Batch::default();
    let Ok(entries) = std::fs::read_dir(run_dir) else { return batch };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        if let Some(id) = rest.strip_suffix(RESULT) {
            let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if valid_id(id) && old.is_some_and(|age| age > STALE_RESULT) {
                let _ = std::fs::remove_file(entry.path());
            }
            continue;
        }
        let Some(id) = rest.strip_suffix(REQUEST) else { continue };
        if !valid_id(id) {
            continue;
        }
        let path = entry.path();
        let read = read_private(&path).and_then(|bytes| {
            serde_json::from_slice::<Request>(&bytes).with_context(|| format!("parsing {}", path.display()))
        });
        let _ = std::fs::remove_file(&path);
        match read {
            Ok(req) => {
                if let Some(ms) = req.confirm_within_ms {
                    let d = Duration::from_millis(ms);
                    batch.confirm_within = Some(batch.confirm_within.map_or(d, |c| c.min(d)));
                }
                batch.ids.push(id.to_string());
            }
            Err(e) => batch.refused.push((id.to_string(), format!("reload request refused: {e:#}"))),
        }
    }
    batch
}

/// Daemon side: answers request `id`.
pub fn write_result(run_dir: &Path, id: &str, outcome: &Outcome) -> Result<()> {
    write_private(&result_path(run_dir, id), &serde_json::to_vec(outcome)?)
}

/// Client side: asks the daemon of `run_dir` to reload and, unless `wait`
/// is `None`, waits up to that long for the outcome. Fails with the
/// daemon's error when the reload failed.
pub fn request(run_dir: &Path, req: &Request, wait: Option<Duration>) -> Result<Option<Outcome>> {
    let state = State::read(run_dir)?;
    if !state.is_live() {
        bail!("pcguard (pid {}) is not running", state.pid);
    }
    let id = new_id();
    let req_path = request_path(run_dir, &id);
    write_private(&req_path, &serde_json::to_vec(req)?)?;
    if let Err(e) = crate::sys::kill(state.pid, crate::sys::SIGHUP) {
        let _ = std::fs::remove_file(&req_path);
        bail!("signalling pid {}: {e}", state.pid);
    }
    let Some(wait) = wait else { return Ok(None) };
    let res_path = result_path(run_dir, &id);
    let deadline = Instant::now() + wait;
    loop {
        match read_private(&res_path) {
            Ok(bytes) => {
                let _ = std::fs::remove_file(&res_path);
                let outcome: Outcome =
                    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", res_path.display()))?;
                return match (outcome.ok, &outcome.error) {
                    (true, _) => Ok(Some(outcome)),
                    (false, Some(e)) => bail!("{e}"),
                    (false, None) => bail!("reload failed (pcguard gave no reason; see its log)"),
                };
            }
            Err(e)
                if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        if !state.is_live() {
            let _ = std::fs::remove_file(&req_path);
            bail!("pcguard (pid {}) exited before answering the reload; see its log", state.pid);
        }
        if Instant::now() >= deadline {
            // The request is not withdrawn: the signal is on its way, and
            // the reload it causes must keep the confirm window asked for.
            let taken = !req_path.exists();
            bail!(
                "no answer from pcguard (pid {}) within {}: {}; its log and `pcguard status` tell how it ends",
                state.pid,
                humantime::format_duration(wait),
                if taken {
                    "the reload is still running"
                } else {
                    "the daemon has not taken the request yet (busy or stopped); it stays queued and is applied as asked when it does"
                }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pcguard-reload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn requests_are_taken_once_and_the_shortest_window_wins() {
        let d = dir("take");
        write_private(&request_path(&d, "1-1"), br#"{"confirm_within_ms":120000}"#).unwrap();
        write_private(&request_path(&d, "2-2"), br#"{"confirm_within_ms":3000}"#).unwrap();
        write_private(&request_path(&d, "3-3"), b"{}").unwrap();
        let mut b = take_requests(&d);
        b.ids.sort();
        assert_eq!(b.ids, ["1-1", "2-2", "3-3"]);
        assert!(b.refused.is_empty());
        assert_eq!(b.confirm_within, Some(Duration::from_secs(3)));
        // Taken: the next SIGHUP finds nothing.
        let again = take_requests(&d);
        assert!(again.ids.is_empty() && again.refused.is_empty() && again.confirm_within.is_none());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn requests_of_another_mode_a_symlink_or_bad_json_are_refused_with_the_reason() {
        let d = dir("refuse");
        let loose = request_path(&d, "1-1");
        write_private(&loose, b"{}").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&d.join("target"), b"{}").unwrap();
        std::os::unix::fs::symlink(d.join("target"), request_path(&d, "2-2")).unwrap();
        write_private(&request_path(&d, "3-3"), br#"{"confirm_within_ms":"soon"}"#).unwrap();
        write_private(&request_path(&d, "4-4"), br#"{"detach":true}"#).unwrap();
        let mut b = take_requests(&d);
        b.refused.sort();
        assert!(b.ids.is_empty(), "{b:?}");
        let why: Vec<&str> = b.refused.iter().map(|(_, e)| e.as_str()).collect();
        assert_eq!(b.refused.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["1-1", "2-2", "3-3", "4-4"]);
        assert!(why[0].contains("mode 0644, not 0600"), "{}", why[0]);
        assert!(why[1].contains("opening"), "{}", why[1]);
        assert!(why[2].contains("parsing") && why[3].contains("parsing"), "{why:?}");
        assert!(b.confirm_within.is_none());
        // The requests are gone; the symlink's target is untouched.
        assert!(!loose.exists() && !request_path(&d, "2-2").exists());
        assert!(d.join("target").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_result_is_written_0600_and_read_back() {
        let d = dir("result");
        let out = Outcome { ok: false, error: Some("bad".into()), generation: 3, pending_confirm_until: None };
        write_result(&d, "7-7", &out).unwrap();
        let path = result_path(&d, "7-7");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(serde_json::from_slice::<Outcome>(&read_private(&path).unwrap()).unwrap(), out);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
