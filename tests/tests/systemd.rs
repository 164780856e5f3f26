//! The daemon under a service manager: the `sd_notify` messages a
//! `Type=notify` unit relies on (a test socket stands in for systemd's),
//! `pcguard reload` (the unit's `ExecReload=`) failing when the reload
//! fails, `pcguard reload --confirm-within`, and SIGUSR2 reopening the
//! audit log for logrotate. Root needed.

use std::{
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use pcguard_tests::*;

fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// One notification datagram, and whether the programs were attached and
/// the state file written when it arrived.
#[derive(Debug)]
struct Note {
    text: String,
    attached: bool,
}

/// A stand-in for systemd's notification socket.
struct NotifySocket {
    path: PathBuf,
    rx: mpsc::Receiver<Note>,
    /// `WATCHDOG=1` messages (counted, not queued).
    pings: Arc<AtomicUsize>,
}

impl NotifySocket {
    /// Binds a datagram socket; every message is checked, as it arrives,
    /// against the pinned links of the lab's server interface and the run
    /// directory (a state file).
    fn bind(lab: &Lab, name: &str, run_dir: PathBuf) -> Result<Self> {
        // sun_path is short: not under the (long) target directory.
        let path = std::env::temp_dir().join(format!("pcguard-notify-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (tx, rx) = mpsc::channel();
        let pings = Arc::new(AtomicUsize::new(0));
        let counted = pings.clone();
        let links = lab.bpffs_dir().join("links");
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(_) => {
                        // Timeout: stop once the test dropped the receiver.
                        if tx.send(Note { text: String::new(), attached: false }).is_err() {
                            return;
                        }
                        continue;
                    }
                };
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text == "WATCHDOG=1\n" {
                    counted.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // The links pinned as the programs are attached: TC egress,
                // and XDP or TC ingress.
                let pinned = |name: String| links.join(name).exists();
                let attached = pinned(format!("tc-{SERVER_IF}"))
                    && (pinned(format!("xdp-{SERVER_IF}")) || pinned(format!("tci-{SERVER_IF}")))
                    && run_dir.join("state.json").is_file();
                if tx.send(Note { text, attached }).is_err() {
                    return;
                }
            }
        });
        Ok(Self { path, rx, pings })
    }

    /// The next message (skipping the receiver's idle ticks).
    fn next(&self, timeout: Duration) -> Result<Note> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "no sd_notify message within {timeout:?}");
            match self.rx.recv_timeout(left) {
                Ok(n) if n.text.is_empty() => continue,
                Ok(n) => return Ok(n),
                Err(_) => anyhow::bail!("no sd_notify message within {timeout:?}"),
            }
        }
    }

    /// Messages received so far that nobody read.
    fn drain(&self) -> Vec<Note> {
        self.rx.try_iter().filter(|n| !n.text.is_empty()).collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn field<'a>(note: &'a Note, key: &str) -> Option<&'a str> {
    note.text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn notify_ready_after_attach_reloading_around_reloads_and_a_failed_reload_fails_pcguard_reload() -> Result<()> {
    let env = TestLab::up("sy1", tmp(), &lab_config("enforce", ""))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9999))?;
    let _other = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9998))?;
    let notify = NotifySocket::bind(&env.lab, "sy1", env.work.join("daemon/run"))?;
    // WatchdogSec=1s: systemd sets WATCHDOG_USEC, and WATCHDOG_PID to the
    // daemon's pid (the shell's, which nsenter and pcguard keep).
    let launch = Launch {
        env: vec![("NOTIFY_SOCKET".into(), notify.path.clone().into()), ("WATCHDOG_USEC".into(), "1000000".into())],
        wrap: ["sh", "-c", "WATCHDOG_PID=$$ exec \"$@\"", "sh"].map(String::from).to_vec(),
    };
    let daemon = env.start_with(&[], &launch)?;
    let started = Instant::now();

    // The first message is READY=1, sent once the program is on the link
    // and the state file written.
    let ready = notify.next(Duration::from_secs(10))?;
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert!(ready.attached, "READY=1 before the programs were attached: {ready:?}");
    let status = field(&ready, "STATUS").unwrap_or_default();
    assert!(status.starts_with("policy generation 1:"), "{status}");
    assert!(!ws_reaches(&env.lab, 9999)?);

    // A good reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 with the
    // new generation; `pcguard reload` succeeds after it applied.
    env.write_config(&lab_config("enforce", ALLOW_9999))?;
    let out = daemon.cli_output(&["reload"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("reload applied: policy generation 2"), "{stdout}");
    assert!(ws_reaches(&env.lab, 9999)?, "allowed once `pcguard reload` returned");
    let reloading = notify.next(Duration::from_secs(5))?;
    assert_eq!(field(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let usec = field(&reloading, "MONOTONIC_USEC").context("RELOADING=1 without MONOTONIC_USEC")?;
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{usec}");
    let ready = notify.next(Duration::from_secs(5))?;
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    let status = field(&ready, "STATUS").unwrap_or_default();
    assert!(status.starts_with("policy generation 2:") && status.contains("last reload applied"), "{status}");

    // A bad config: `pcguard reload` fails with the daemon's error, the
    // running policy (generation 2: 9999 open) keeps enforcing.
    env.write_config(&format!("{}\n[[rule]]\nname = \"broken\"\nports = [\n", lab_config("enforce", ALLOW_9999)))?;
    let out = daemon.cli_output(&["reload"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed reload exited 0: {stderr}");
    assert!(stderr.contains("reload failed") && stderr.contains("pcguard.toml"), "{stderr}");
    assert!(stderr.contains("keeping the running policy (generation 2)"), "{stderr}");
    assert!(ws_reaches(&env.lab, 9999)?, "the running policy was kept");
    assert!(!ws_reaches(&env.lab, 9998)?, "the running policy still drops what it does not allow");
    let reloading = notify.next(Duration::from_secs(5))?;
    assert_eq!(field(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let ready = notify.next(Duration::from_secs(5))?;
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    let status = field(&ready, "STATUS").unwrap_or_default();
    assert!(status.starts_with("policy generation 2:") && status.contains("reload failed: "), "{status}");
    let state = daemon.state()?;
    assert_eq!(state["policy_generation"], 2, "{state}");
    assert_eq!(state["last_reload"]["ok"], false, "{state}");

    // Watchdog pings every half second from the main loop.
    let pings = notify.pings.load(Ordering::Relaxed) as f64;
    let expected = started.elapsed().as_secs_f64() * 2.0;
    assert!(pings >= expected - 2.0 && pings <= expected + 2.0, "{pings} pings in {:?}", started.elapsed());
    assert!(daemon.log_text().contains("systemd watchdog: pinging every 500ms"), "{}", daemon.log_text());

    // SIGTERM: STOPPING=1.
    assert!(daemon.stop()?.success());
    let stopping = notify.next(Duration::from_secs(5))?;
    assert_eq!(field(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    assert!(notify.drain().is_empty());
    Ok(())
}

#[test]
fn pcguard_reload_confirm_within_reverts_unless_confirmed() -> Result<()> {
    let env = TestLab::up("sy2", tmp(), &lab_config("enforce", ""))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9999))?;
    let mut daemon = env.start(&[])?;
    assert!(!ws_reaches(&env.lab, 9999)?);

    // Not confirmed: the policy before the reload comes back.
    env.write_config(&lab_config("enforce", ALLOW_9999))?;
    let out = daemon.cli(&["reload", "--confirm-within", "3s"])?;
    assert!(out.contains("policy generation 2") && out.contains("pcguard confirm"), "{out}");
    assert!(ws_reaches(&env.lab, 9999)?, "allowed while pending");
    assert!(daemon.cli(&["status"])?.contains("PENDING CONFIRMATION"));
    wait_until("the revert", Duration::from_secs(8), || Ok(daemon.state()?["policy_generation"] == 3))?;
    assert!(!ws_reaches(&env.lab, 9999)?, "reverted to the policy before the reload");
    assert!(daemon.try_wait()?.is_none(), "a reverted reload keeps the daemon running");
    assert!(!daemon.cli(&["status"])?.contains("PENDING"));

    // Confirmed in time: kept past the window.
    let out = daemon.cli(&["reload", "--confirm-within", "3s"])?;
    assert!(out.contains("policy generation 4"), "{out}");
    assert!(daemon.cli(&["confirm"])?.contains("confirm sent"));
    std::thread::sleep(Duration::from_secs(4));
    assert!(ws_reaches(&env.lab, 9999)?, "the confirmed policy stays");
    assert_eq!(daemon.state()?["policy_generation"], 4);

    // A request file that is not 0600 (not written by `pcguard reload`)
    // refuses the reload it would join: nothing changes.
    let planted = daemon.run_dir.join("reload-1-1.request");
    std::fs::write(&planted, r#"{"confirm_within_ms":1000}"#)?;
    std::fs::set_permissions(&planted, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    env.write_config(&lab_config("enforce", ""))?;
    let out = daemon.cli_output(&["reload"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("mode 0644, not 0600"), "{stderr}");
    assert!(!planted.exists());
    assert!(ws_reaches(&env.lab, 9999)?, "a refused reload changed the policy");
    assert_eq!(daemon.state()?["policy_generation"], 4);

    // A plain reload applies, and asks for no confirmation.
    let out = daemon.cli(&["reload"])?;
    assert!(out.contains("policy generation 5") && !out.contains("pcguard confirm"), "{out}");
    assert!(!daemon.cli(&["status"])?.contains("PENDING"));
    assert!(!ws_reaches(&env.lab, 9999)?);
    Ok(())
}

/// `pcguard reload` gives up waiting on a daemon that does not answer in
/// time, and says so; its request stays queued, so the reload the signal
/// causes later still has the confirm window asked for.
#[test]
fn a_reload_that_times_out_stays_queued_with_its_confirm_window() -> Result<()> {
    let env = TestLab::up("sy5", tmp(), &lab_config("enforce", ""))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9999))?;
    let daemon = env.start(&[])?;
    env.write_config(&lab_config("enforce", ALLOW_9999))?;
    daemon.signal(libc::SIGSTOP)?;
    let out = daemon.cli_output(&["reload", "--confirm-within", "3s", "--timeout", "1s"]);
    daemon.signal(libc::SIGCONT)?;
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no answer from pcguard"), "{stderr}");
    assert!(stderr.contains("stays queued"), "{stderr}");
    // Taken once the daemon runs again: applied pending confirmation...
    wait_until("the queued reload", Duration::from_secs(5), || Ok(daemon.state()?["policy_generation"] == 2))?;
    assert!(!daemon.state()?["pending_confirm_until"].is_null(), "applied without its confirm window");
    assert!(ws_reaches(&env.lab, 9999)?);
    // ...and reverted without a confirmation.
    wait_until("the revert", Duration::from_secs(8), || Ok(daemon.state()?["policy_generation"] == 3))?;
    assert!(!ws_reaches(&env.lab, 9999)?);
    Ok(())
}

#[test]
fn sigusr2_reopens_the_audit_log_and_leaves_the_policy_alone() -> Result<()> {
    let env = TestLab::up("sy3", tmp(), &lab_config("enforce", ""))?;
    let daemon = env.start(&[])?;
    // An unexpected flow, recorded in the log.
    assert!(!ws_reaches(&env.lab, 9999)?);
    daemon.wait_audit("the 9999 probe", |r| r.iter().any(|x| x.to_string().contains("9999")))?;
    let before = daemon.state()?;

    // logrotate renames the file, then signals.
    let rotated = daemon.audit_log.with_extension("jsonl.1");
    std::fs::rename(&daemon.audit_log, &rotated)?;
    daemon.signal(libc::SIGUSR2)?;
    wait_until("the reopen", Duration::from_secs(5), || Ok(daemon.log_text().contains("SIGUSR2: audit log reopened")))?;
    assert!(daemon.audit_log.is_file(), "a new log at the old path");

    // New records go to the new file, none to the rotated one.
    assert!(!ws_reaches(&env.lab, 9998)?);
    daemon.wait_audit("the 9998 probe in the new file", |r| r.iter().any(|x| x.to_string().contains("9998")))?;
    let old = std::fs::read_to_string(&rotated)?;
    assert!(old.contains("9999") && !old.contains("9998"), "{old}");
    assert!(!std::fs::read_to_string(&daemon.audit_log)?.contains("9999"));

    // Not a reload: same policy generation, no reload counted or logged.
    let after = daemon.state()?;
    assert_eq!(after["policy_generation"], 1);
    assert_eq!(after["policy_generation"], before["policy_generation"]);
    assert_eq!(after["reloads"], before["reloads"]);
    assert_eq!(after["policy_loaded_at"], before["policy_loaded_at"]);
    assert!(!daemon.log_text().contains("SIGHUP"), "{}", daemon.log_text());
    Ok(())
}

/// The fields of one journald native-protocol datagram (`KEY=value` lines;
/// a value with a newline is `KEY\n<u64 le length><bytes>\n`).
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let Some(nl) = d.iter().position(|&b| b == b'\n') else { break };
        let line = &d[..nl];
        match line.iter().position(|&b| b == b'=') {
            Some(eq) => {
                out.push((
                    String::from_utf8_lossy(&line[..eq]).into(),
                    String::from_utf8_lossy(&line[eq + 1..]).into(),
                ));
                d = &d[nl + 1..];
            }
            None => {
                let rest = &d[nl + 1..];
                let Some(len) = rest.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize) else {
                    break;
                };
                let Some(value) = rest.get(8..8 + len) else { break };
                out.push((String::from_utf8_lossy(line).into(), String::from_utf8_lossy(value).into()));
                d = rest.get(8 + len + 1..).unwrap_or_default();
            }
        }
    }
    out
}

/// Started with stderr connected to "the journal" (`JOURNAL_STREAM` names
/// the log file's device and inode) and a fake journald socket at
/// `/run/systemd/journal/socket` (a private mount namespace), the daemon
/// sends its log there with priorities, the alerts at err.
#[test]
fn under_the_journal_the_log_goes_to_journald_with_priorities() -> Result<()> {
    let env = TestLab::up("sy4", tmp(), &lab_config("enforce", ""))?;
    let jdir = env.work.join("journal");
    std::fs::create_dir_all(&jdir)?;
    let sock = UnixDatagram::bind(jdir.join("socket"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    // Read all the time, as journald does: a datagram socket's queue is
    // short, and a full one blocks the sender's log calls.
    let (tx, rx) = mpsc::channel::<Vec<(String, String)>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if n > 0 => {
                    if tx.send(journal_fields(&buf[..n])).is_err() {
                        return;
                    }
                }
                // Empty (the client's probe) or a timeout: is the test still there?
                _ => {
                    if tx.send(Vec::new()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    // The harness appends to this file as the daemon's stderr: same inode.
    let log = env.work.join("daemon/daemon.log");
    std::fs::create_dir_all(log.parent().unwrap())?;
    let meta = std::fs::File::create(&log)?.metadata()?;
    // `$1 $2` are `nsenter --net=/run/netns/...`: the namespace is opened
    // before a tmpfs hides /run, and entered through the open fd.
    let mount = format!(
        "exec 3<\"${{2#--net=}}\" && mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
         mount --bind '{}' /run/systemd/journal && shift 2 && exec nsenter --net=/proc/self/fd/3 \"$@\"",
        jdir.display()
    );
    let launch = Launch {
        env: vec![("JOURNAL_STREAM".into(), format!("{}:{}", meta.dev(), meta.ino()).into())],
        wrap: ["unshare", "--mount", "--propagation", "private", "sh", "-c", &mount, "sh"].map(String::from).to_vec(),
    };
    let daemon = env.start_with(&[], &launch)?;

    // A warning (a reload waiting for confirmation) and an alert (the
    // server opening SMB on a workstation).
    daemon.cli(&["reload", "--confirm-within", "60s"])?;
    let probe = sample_probes().into_iter().find(|p| p.from == SERVER && p.port == 445).context("the SMB probe")?;
    let _servers = start_probe_servers(&env.lab, std::slice::from_ref(&probe))?;
    assert!(!run_probe(&env.lab, &probe, false, BLOCKED_TIMEOUT)?);

    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let want = |e: &[Vec<(String, String)>]| {
        let has = |msg: &str, prio: &str| {
            e.iter().any(|f| {
                f.iter().any(|(k, v)| k == "MESSAGE" && v.contains(msg))
                    && f.iter().any(|(k, v)| k == "PRIORITY" && v == prio)
            })
        };
        has("pcguard running", "5") && has("run `pcguard confirm` within", "4") && has("ALERT", "3")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !want(&entries) && Instant::now() < deadline {
        if let Ok(fields) = rx.recv_timeout(Duration::from_millis(200))
            && !fields.is_empty()
        {
            entries.push(fields);
        }
    }
    let alert = entries.iter().find(|f| f.iter().any(|(k, v)| k == "MESSAGE" && v.starts_with("ALERT")));
    assert!(want(&entries), "journal entries: {entries:#?}");
    let alert = alert.context("an alert")?;
    assert!(alert.iter().any(|(k, v)| k == "SYSLOG_IDENTIFIER" && v == "pcguard"), "{alert:?}");
    assert!(alert.iter().any(|(k, v)| k == "MESSAGE" && v.contains("outbound_to_workstation")), "{alert:?}");
    // Nothing of it went to stderr.
    let stderr = daemon.log_text();
    assert!(!stderr.contains("pcguard running") && !stderr.contains("ALERT"), "{stderr}");
    Ok(())
}
