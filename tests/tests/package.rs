//! The Debian package of `cargo xtask package` (target/debian/, built by
//! `cargo xtask test` before these tests): its control data, then a real
//! `dpkg -i` into this machine's root (CI machines are disposable), every
//! installed file checked, `dpkg -r` and `dpkg --purge` leaving nothing
//! behind. Root needed for the install test; it is undone even when an
//! assertion fails.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};
use pcguard_tests::workspace_root;

/// The newest target/debian/pcguard_*.deb, or None (and a loud message).
fn deb() -> Option<PathBuf> {
    let dir = workspace_root().join("target/debian");
    let newest = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("pcguard_") && name.ends_with(".deb")
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    if newest.is_none() {
        eprintln!(
            "\n*** SKIPPED: no pcguard_*.deb in {}: run `cargo xtask package` (`cargo xtask test` does) ***\n",
            dir.display()
        );
    }
    newest
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// Runs `cmd`, fails with its output unless it succeeds; returns stdout and
/// stderr together.
fn ok(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    Ok(text)
}

fn control_member(deb: &Path, member: &str) -> Result<String> {
    ok(Command::new("dpkg-deb").arg("--info").arg(deb).arg(member))
}

#[test]
fn deb_control_data() -> Result<()> {
    let Some(deb) = deb() else { return Ok(()) };
    let conffiles = control_member(&deb, "conffiles")?;
    let conffiles: Vec<&str> = conffiles.lines().map(str::trim).collect();
    assert!(conffiles.contains(&"/etc/pcguard/pcguard.toml"), "conffiles: {conffiles:?}");
    assert!(conffiles.contains(&"/etc/logrotate.d/pcguard"), "conffiles: {conffiles:?}");

    let control = control_member(&deb, "control")?;
    assert!(control.contains("Package: pcguard\n"), "{control}");
    // A static binary: no libc version required of the installing system.
    assert!(!control.contains("libc6"), "the packaged binary should be static:\n{control}");

    // Installed, never enabled or started by the package; an upgrade
    // restarts a running daemon only.
    let postinst = control_member(&deb, "postinst")?;
    assert!(postinst.contains("daemon-reload"), "{postinst}");
    assert!(postinst.contains("deb-systemd-invoke try-restart pcguard.service"), "{postinst}");
    for never in ["deb-systemd-invoke start", "deb-systemd-invoke restart"] {
        assert!(!postinst.contains(never), "postinst must not {never}:\n{postinst}");
    }
    let lines: Vec<&str> = postinst.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        assert!(!line.starts_with("systemctl enable") && !line.starts_with("systemctl start"), "{postinst}");
        if line.starts_with("deb-systemd-helper enable") {
            assert!(
                lines[..i].iter().rev().take(3).any(|l| l.contains("was-enabled")),
                "enables only a unit enabled before:\n{postinst}"
            );
        }
    }
    let prerm = control_member(&deb, "prerm")?;
    assert!(prerm.contains("deb-systemd-invoke stop pcguard.service"), "{prerm}");
    assert!(prerm.contains("/usr/bin/pcguard detach"), "{prerm}");
    let postrm = control_member(&deb, "postrm")?;
    assert!(postrm.contains("rm -rf /var/log/pcguard /run/pcguard /etc/pcguard"), "{postrm}");
    Ok(())
}

/// Purges pcguard when dropped: the machine is left as found, whatever
/// failed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "pcguard"]).output();
    }
}

fn is_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "pcguard"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// `path` is a regular file owned by root with mode `mode`.
fn assert_file(path: &str, mode: u32) {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(meta.is_file(), "{path} is not a regular file");
    assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}: mode {:o}", meta.permissions().mode() & 0o7777);
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path} owned by root");
}

/// The repository files of `dir` (relative to the workspace) ending in `ext`.
fn repo_files(dir: &str, ext: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(workspace_root().join(dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    names.sort();
    names
}

#[test]
fn deb_installs_checks_and_purges_cleanly() -> Result<()> {
    let Some(deb) = deb() else { return Ok(()) };
    // Never clobber a pcguard set up by hand on this machine.
    if !is_installed() {
        for dir in ["/etc/pcguard", "/var/log/pcguard", "/run/pcguard"] {
            if Path::new(dir).exists() {
                bail!("{dir} exists but the pcguard package is not installed: refusing to install over it");
            }
        }
    }
    let guard = Installed;
    let _ = Command::new("dpkg").args(["--purge", "pcguard"]).output(); // an earlier failed run's

    let text = ok(Command::new("dpkg").arg("-i").arg(&deb))?;
    assert!(text.contains("not enabled or started"), "postinst tells the operator what to do:\n{text}");
    let status = ok(Command::new("dpkg").args(["-s", "pcguard"]))?;
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/pcguard.service").exists(), "not enabled");

    let man_pages = ["pcguard", "pcguard-run", "pcguard-check", "pcguard-status", "pcguard-flows", "pcguard-detach"];
    let mut files: Vec<(String, u32)> = vec![
        ("/usr/bin/pcguard".into(), 0o755),
        ("/lib/systemd/system/pcguard.service".into(), 0o644),
        ("/etc/pcguard/pcguard.toml".into(), 0o640),
        ("/etc/logrotate.d/pcguard".into(), 0o644),
        ("/usr/share/bash-completion/completions/pcguard".into(), 0o644),
        ("/usr/share/zsh/vendor-completions/_pcguard".into(), 0o644),
        ("/usr/share/fish/vendor_completions.d/pcguard.fish".into(), 0o644),
        ("/usr/share/pcguard/pcguard.json".into(), 0o644),
        ("/usr/share/doc/pcguard/README.md".into(), 0o644),
        ("/usr/share/doc/pcguard/deploy/README.md".into(), 0o644),
    ];
    files.extend(man_pages.iter().map(|p| (format!("/usr/share/man/man1/{p}.1"), 0o644)));
    files.extend(repo_files("docs", ".md").iter().map(|n| (format!("/usr/share/doc/pcguard/docs/{n}"), 0o644)));
    files.extend(repo_files("deploy/prometheus", ".yml").iter().map(|n| (format!("/usr/share/pcguard/{n}"), 0o644)));
    for (path, mode) in &files {
        assert_file(path, *mode);
    }
    assert!(!Path::new("/usr/share/man/man1/pcguard-generate.1").exists(), "the hidden subcommand has no page");
    // Static: no program interpreter (dynamic loader) named in the binary,
    // so no glibc version is needed (docs/support.md, "Userland").
    let bin = std::fs::read("/usr/bin/pcguard")?;
    assert!(!bin.windows(10).any(|w| w == b"ld-linux-x"), "/usr/bin/pcguard is dynamically linked");
    // The shipped dashboard is the repository's.
    assert_eq!(
        std::fs::read("/usr/share/pcguard/pcguard.json")?,
        std::fs::read(workspace_root().join("deploy/grafana/pcguard.json"))?
    );

    // The installed alerting rules pass their installed promtool tests.
    if Path::new("/usr/share/pcguard/pcguard-rules.test.yml").exists() && Path::new("/usr/bin/promtool").exists() {
        ok(Command::new("promtool").args(["test", "rules", "/usr/share/pcguard/pcguard-rules.test.yml"]))?;
    }

    // The unit runs the packaged binary and points at installed docs.
    let unit = std::fs::read_to_string("/lib/systemd/system/pcguard.service")?;
    assert!(unit.contains("ExecStart=/usr/bin/pcguard run --config /etc/pcguard/pcguard.toml"), "{unit}");
    assert!(!unit.contains("/usr/local"), "{unit}");
    for doc in unit.lines().filter_map(|l| l.strip_prefix("Documentation=")) {
        for url in doc.split_whitespace() {
            let path = url.strip_prefix("file://").with_context(|| format!("Documentation={url}: not a file"))?;
            assert!(Path::new(path).is_file(), "Documentation={url} is not installed");
        }
    }
    let verify = output(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/pcguard.service"]))?;
    let verify_text = String::from_utf8_lossy(&verify.stdout).to_string() + &String::from_utf8_lossy(&verify.stderr);
    let problems: Vec<&str> = verify_text.lines().filter(|l| l.contains("pcguard.service")).collect();
    assert!(verify.status.success() && problems.is_empty(), "systemd-analyze verify:\n{verify_text}");

    // The shipped config is valid and in monitor mode.
    let config = std::fs::read_to_string("/etc/pcguard/pcguard.toml")?;
    assert!(config.lines().any(|l| l.starts_with("mode = \"monitor\"")), "{config}");
    let report = ok(Command::new("/usr/bin/pcguard").args(["check", "/etc/pcguard/pcguard.toml"]))?;
    assert!(!report.contains("warnings:"), "the shipped config draws no check warning:\n{report}");

    let man = ok(Command::new("man").args(["-w", "pcguard"]))?;
    assert_eq!(man.trim(), "/usr/share/man/man1/pcguard.1");
    let man_run = ok(Command::new("man").args(["-w", "pcguard-run"]))?;
    assert_eq!(man_run.trim(), "/usr/share/man/man1/pcguard-run.1");

    ok(Command::new("bash").args(["-n", "/usr/share/bash-completion/completions/pcguard"]))?;
    let bash_completion = std::fs::read_to_string("/usr/share/bash-completion/completions/pcguard")?;
    assert!(bash_completion.contains("complete -F _pcguard"), "registers the completion");
    assert!(!bash_completion.contains("generate"), "the hidden subcommand is not completed");

    // logrotate parses the file; rotation only signals the daemon to
    // reopen its audit log (SIGUSR2), never reloads the policy.
    let logrotate = std::fs::read_to_string("/etc/logrotate.d/pcguard")?;
    assert!(logrotate.contains("systemctl kill --kill-whom=main --signal=SIGUSR2 pcguard.service"), "{logrotate}");
    let directives: Vec<&str> = logrotate.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    assert!(!directives.iter().any(|l| l.contains("reload") || l.contains("HUP")), "{logrotate}");
    if Path::new("/usr/sbin/logrotate").exists() {
        let state = Path::new(env!("CARGO_TARGET_TMPDIR")).join("logrotate.state");
        let text =
            ok(Command::new("/usr/sbin/logrotate").arg("-d").arg("-s").arg(&state).arg("/etc/logrotate.d/pcguard"))?;
        assert!(text.contains("/var/log/pcguard/flows.jsonl"), "{text}");
        assert!(!text.to_lowercase().contains("error"), "{text}");
    } else {
        eprintln!("logrotate is not installed (cargo xtask deps installs it): its parse check is skipped");
    }

    // An upgrade (here a reinstall) keeps the operator's config, without a
    // prompt, and says nothing of a first install.
    std::fs::write("/etc/pcguard/pcguard.toml", config.replace("mode = \"monitor\"", "mode = \"enforce\""))?;
    let text = ok(Command::new("dpkg").args(["-i", "--force-confnew"]).arg(&deb).stdin(std::process::Stdio::null()))?;
    assert!(!text.contains("not enabled or started"), "{text}");
    assert!(std::fs::read_to_string("/etc/pcguard/pcguard.toml")?.contains("mode = \"enforce\""), "config kept");

    // Remove keeps the operator's config; prerm detached (nothing was
    // attached: no daemon ran).
    let removed = ok(Command::new("dpkg").args(["-r", "pcguard"]))?;
    assert!(removed.contains("nothing to detach"), "prerm ran pcguard detach:\n{removed}");
    assert!(!Path::new("/usr/bin/pcguard").exists());
    assert!(std::fs::read_to_string("/etc/pcguard/pcguard.toml")?.contains("mode = \"enforce\""), "config kept");

    // Purge removes the conffiles, the logs, the state and leftovers.
    std::fs::create_dir_all("/var/log/pcguard")?;
    std::fs::write("/var/log/pcguard/flows.jsonl.1", "{}\n")?;
    std::fs::create_dir_all("/run/pcguard")?;
    std::fs::write("/run/pcguard/state.json", "{}\n")?;
    std::fs::write("/etc/pcguard/pcguard.toml.orig", "role = \"primary\"\n")?; // an operator's copy
    ok(Command::new("dpkg").args(["--purge", "pcguard"]))?;
    drop(guard);
    assert!(!is_installed());
    let gone = [
        "/etc/pcguard",
        "/etc/logrotate.d/pcguard",
        "/usr/bin/pcguard",
        "/usr/share/pcguard",
        "/usr/share/doc/pcguard",
        "/lib/systemd/system/pcguard.service",
        "/usr/share/man/man1/pcguard.1",
        "/usr/share/bash-completion/completions/pcguard",
        "/usr/share/zsh/vendor-completions/_pcguard",
        "/usr/share/fish/vendor_completions.d/pcguard.fish",
        "/var/log/pcguard",
        "/run/pcguard",
    ];
    let left: Vec<&str> = gone.into_iter().filter(|p| Path::new(p).exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    Ok(())
}
