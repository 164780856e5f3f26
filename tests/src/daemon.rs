//! Driving a `pcguard run` daemon in the lab: start, signal, stop, its
//! CLI, state file, pinned conntrack and audit log; the lab's configs.

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, MapData};
use pcguard_common::{CtEntry, FlowKey};

use crate::{
    lab::{Lab, PEERS, SERVER, enter_netns, unique_prefix},
    metrics::http_get,
};

/// Path of the pcguard binary: `$PCGUARD_BIN`, else next to the test
/// executable's target directory (`target/<profile>/pcguard`).
pub fn pcguard_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PCGUARD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join("pcguard");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("pcguard binary not found near {} (build it or set PCGUARD_BIN)", exe.display())
}

/// How a test daemon is started beyond its arguments.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Further environment variables (e.g. a `NOTIFY_SOCKET` the test
    /// listens on).
    pub env: Vec<(String, std::ffi::OsString)>,
    /// A command that runs `nsenter ... pcguard run ...` (appended as its
    /// arguments) and must exec it, keeping its pid, e.g. `sh -c
    /// 'WATCHDOG_PID=$$ exec "$@"' sh`.
    pub wrap: Vec<String>,
}

/// A `pcguard run` daemon in the lab's server namespace.
pub struct Daemon {
    child: Child,
    pub run_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub audit_log: PathBuf,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    server_ns: PathBuf,
}

impl Daemon {
    /// Starts `pcguard run --config <config>` in the server namespace (via
    /// nsenter, which keeps /sys/fs/bpf visible) and waits until it has
    /// attached (its state file exists). `work` holds the run dir, logs and
    /// the audit log; `extra` are further `run` arguments.
    pub fn start(lab: &Lab, config: &Path, work: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_with(lab, config, work, extra, &Launch::default())
    }

    /// [`Daemon::start`] with further environment variables and a command
    /// the daemon is started through (see [`Launch`]).
    pub fn start_with(lab: &Lab, config: &Path, work: &Path, extra: &[&str], launch: &Launch) -> Result<Self> {
        std::fs::create_dir_all(work)?;
        let run_dir = work.join("run");
        let bpffs_dir = lab.bpffs_dir();
        let audit_log = work.join("flows.jsonl");
        let log = work.join("daemon.log");
        // `extra` may set the metrics address, or `--config-audit-log` to
        // leave the audit log to the config (no `--audit-log` override).
        let metrics: SocketAddr = match extra.iter().position(|a| *a == "--metrics-listen") {
            Some(i) => extra.get(i + 1).context("--metrics-listen without a value")?.parse()?,
            None => "127.0.0.1:9750".parse()?,
        };
        let config_audit = extra.contains(&"--config-audit-log");
        let audit_log = match extra.iter().position(|a| *a == "--audit-log") {
            Some(i) => PathBuf::from(extra.get(i + 1).context("--audit-log without a value")?),
            None => audit_log,
        };
        let own_audit = extra.contains(&"--audit-log");
        let extra: Vec<&str> = extra
            .iter()
            .enumerate()
            .filter(|(i, a)| {
                **a != "--config-audit-log"
                    && **a != "--metrics-listen"
                    && (*i == 0 || extra[*i - 1] != "--metrics-listen")
            })
            .map(|(_, a)| *a)
            .collect();
        // The state file stays: a daemon that adopts the pins of an earlier
        // one reads its rule numbering from it, as after a real crash.
        let server_ns = lab.ns_path(SERVER);
        let mut cmd = match launch.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("nsenter");
                c
            }
            None => Command::new("nsenter"),
        };
        cmd.arg(format!("--net={}", server_ns.display()))
            .arg(pcguard_bin()?)
            .args(["run", "--config"])
            .arg(config)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--bpffs-dir")
            .arg(&bpffs_dir)
            .arg("--metrics-listen")
            .arg(metrics.to_string());
        if !config_audit && !own_audit {
            cmd.arg("--audit-log").arg(&audit_log);
        }
        // With `--trace-datapath`, its decision records too.
        let rust_log = if extra.contains(&"--trace-datapath") { "info,pcguard::datapath=debug" } else { "info" };
        let child = cmd
            .args(&extra)
            .env("RUST_LOG", rust_log)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(File::create(&log)?))
            .stderr(Stdio::from(File::options().append(true).open(&log)?))
            .spawn()
            .context("starting pcguard")?;
        let mut d = Daemon { child, run_dir, bpffs_dir, audit_log, metrics, log, server_ns };
        d.wait_started()?;
        Ok(d)
    }

    fn wait_started(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Started: the state file names this process.
        let pid = u64::from(self.child.id());
        let written_by_us = || -> bool {
            std::fs::read_to_string(self.run_dir.join("state.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v["pid"].as_u64() == Some(pid))
        };
        while !written_by_us() {
            if let Some(status) = self.child.try_wait()? {
                bail!("pcguard exited with {status}:\n{}", self.log_text());
            }
            ensure!(Instant::now() < deadline, "pcguard did not start:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: signalling our own child.
        ensure!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } == 0, "kill failed");
        Ok(())
    }

    /// Runs `pcguard <args>` (status, confirm, ...) against this daemon.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(pcguard_bin()?).args(args).arg("--run-dir").arg(&self.run_dir).output()?;
        ensure!(out.status.success(), "pcguard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `pcguard <args> --run-dir <run dir>` and returns its output,
    /// whatever its exit status.
    pub fn cli_output(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(pcguard_bin()?).args(args).arg("--run-dir").arg(&self.run_dir).output()?)
    }

    /// The daemon's state file.
    pub fn state(&self) -> Result<serde_json::Value> {
        let path = self.run_dir.join("state.json");
        Ok(serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?)?)
    }

    /// Fetches /metrics from inside the server namespace.
    pub fn scrape(&self) -> Result<String> {
        let addr = self.metrics;
        let ns = self.server_ns.clone();
        std::thread::spawn(move || -> Result<String> {
            enter_netns(&ns)?;
            http_get(addr, "/metrics")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("scrape thread panicked"))?
    }

    /// Rule ids by rule number (a conntrack entry's `rule`), from the
    /// daemon's state file.
    pub fn rule_ids(&self) -> Result<Vec<String>> {
        let path = self.run_dir.join("state.json");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let rules =
            state["labels"]["rules"].as_array().with_context(|| format!("no labels.rules in {}", path.display()))?;
        Ok(rules.iter().map(|r| r.as_str().unwrap_or_default().to_string()).collect())
    }

    /// The pinned map set the daemon uses (from its state file).
    pub fn maps_dir(&self) -> Result<PathBuf> {
        let path = self.run_dir.join("state.json");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        Ok(PathBuf::from(state["maps_dir"].as_str().with_context(|| format!("no maps_dir in {}", path.display()))?))
    }

    /// The entries of the daemon's established-flow conntrack (its pinned
    /// `CONNTRACK` map).
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, CtEntry)>> {
        let path = self.maps_dir()?.join(pcguard_common::names::CONNTRACK);
        let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map: BpfHashMap<MapData, FlowKey, CtEntry> = BpfHashMap::try_from(aya::maps::Map::from_map_data(data)?)?;
        // An entry deleted between listing and reading its key is skipped.
        Ok(map.iter().filter_map(|e| e.ok()).collect())
    }

    /// The audit records written so far, each validated against the
    /// published JSON Schema of its format (`crate::audit`).
    pub fn audit(&self) -> Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(&self.audit_log) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            r => r.with_context(|| format!("reading {}", self.audit_log.display()))?,
        };
        crate::audit::parse_audit_text(&text)
    }

    /// Waits until `pred` holds for the audit records.
    pub fn wait_audit(
        &self,
        what: &str,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let recs = self.audit()?;
            if pred(&recs) {
                return Ok(recs);
            }
            ensure!(Instant::now() < deadline, "audit log never showed {what}; records: {recs:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            ensure!(Instant::now() < deadline, "pcguard did not stop on SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGKILL (a crash) and wait for it to be gone.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The workspace root (the tests crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `examples/lab.toml` with `mode` set, plus `extra` (TOML) appended.
pub fn lab_config(mode: &str, extra: &str) -> String {
    let text = std::fs::read_to_string(workspace_root().join("examples/lab.toml")).expect("examples/lab.toml");
    assert!(text.contains("mode = \"enforce\""), "examples/lab.toml must set mode = \"enforce\"");
    format!("{}\n{extra}\n", text.replace("mode = \"enforce\"", &format!("mode = \"{mode}\"")))
}

/// `config` with `ingress_hook` set (`"xdp"`, `"tc"`, `"auto"`): a top-level
/// key, so it goes right after `mode`.
pub fn with_hook(config: &str, hook: &str) -> String {
    let at = config.find("\nmode = ").expect("a lab config sets mode");
    let end = config[at + 1..].find('\n').map(|i| at + 1 + i).expect("a line end");
    format!("{}\ningress_hook = \"{hook}\"{}", &config[..end], &config[end..])
}

/// A site rule that opens TCP 9999 to the workstations (for reload tests).
pub const ALLOW_9999: &str = r#"
[[rule]]
name = "legacy-9999"
description = "test service"
direction = "inbound"
protocol = "tcp"
ports = [9999]
peers = ["workstations"]
"#;

/// A lab with every peer reachable, and a work dir holding the config.
pub struct TestLab {
    pub lab: Lab,
    pub work: PathBuf,
    pub config: PathBuf,
}

impl TestLab {
    /// A lab named `name` (made unique to this process) whose files live
    /// under `tmp/<prefix>`, with `config` as the pcguard config.
    pub fn up(name: &str, tmp: &Path, config: &str) -> Result<Self> {
        let prefix = unique_prefix(name);
        let lab = Lab::up(&prefix)?;
        for (host, _) in PEERS {
            lab.wait_reachable(host)?;
        }
        let work = tmp.join(&prefix);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let path = work.join("pcguard.toml");
        std::fs::write(&path, config)?;
        Ok(Self { lab, work, config: path })
    }

    /// Starts `pcguard run` on the lab with this config.
    pub fn start(&self, extra: &[&str]) -> Result<Daemon> {
        Daemon::start(&self.lab, &self.config, &self.work.join("daemon"), extra)
    }

    /// [`TestLab::start`] with further environment variables and a wrapper.
    pub fn start_with(&self, extra: &[&str], launch: &Launch) -> Result<Daemon> {
        Daemon::start_with(&self.lab, &self.config, &self.work.join("daemon"), extra, launch)
    }

    /// Replaces the config file (then signal the daemon to reload).
    pub fn write_config(&self, text: &str) -> Result<()> {
        Ok(std::fs::write(&self.config, text)?)
    }
}

/// A site rule that opens UDP 7000 to the workstations: an allowed UDP
/// service for the adversarial tests (legitimately fragmented datagrams,
/// tagged frames).
pub const ALLOW_UDP_7000: &str = r#"
[[rule]]
name = "test-udp-7000"
description = "test UDP service"
direction = "inbound"
protocol = "udp"
ports = [7000]
peers = ["workstations"]
"#;
