//! Monitor -> suggest -> enforce, in the lab: a monitor-mode daemon with a
//! config that leaves out the workstations and devices classes and the HP
//! feature records the lab's workstation and MFD traffic; `pcguard
//! suggest` on that audit log proposes exactly what is missing; the
//! suggested config, in enforce mode, passes the same traffic and still
//! drops what was not suggested. Root needed.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use pcguard_tests::*;

fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// `examples/lab.toml` without `peers.workstations`, `peers.devices`,
/// `device_rpc` and `mfd`: what a first monitor-mode config looks like.
const CONFIG: &str = r#"# first rollout: monitor, classes still to fill in
role = "primary"
interfaces = ["pcg0"]
mode = "monitor"

[peers]
secondary_servers = ["10.77.0.4", "fd77::4"]
ldap = ["10.77.0.5", "fd77::5"]
database = ["10.77.0.6", "fd77::6"]
admin = ["10.77.0.7", "fd77::7"]     # the admins' hosts

[features]
web = true               # 9191, 9192
directory = ["ldap"]
database = "postgresql"

[metrics]
listen = "127.0.0.1:9750"
"#;

/// The workstation and MFD traffic the suggestion must allow.
fn traffic() -> Vec<Probe> {
    use Proto::*;
    let p = |what, from, to, proto, port| Probe { what, from, to, proto, port, allowed: true };
    vec![
        p("workstation -> web (9191)", "ws", SERVER, Tcp, 9191),
        p("workstation -> web SSL (9192)", "ws", SERVER, Tcp, 9192),
        p("MFD -> device RPC (9193)", "mfd", SERVER, Tcp, 9193),
        p("MFD -> web (9191)", "mfd", SERVER, Tcp, 9191),
        p("server -> HP device (7627)", SERVER, "mfd", Tcp, 7627),
    ]
}

/// Traffic not seen in monitor mode: still dropped after the suggestion.
fn not_suggested() -> Vec<Probe> {
    use Proto::*;
    let p = |what, from, to, proto, port| Probe { what, from, to, proto, port, allowed: false };
    vec![
        p("workstation -> unlisted port 9999", "ws", SERVER, Tcp, 9999),
        p("unclassified host -> web (9191)", "out", SERVER, Tcp, 9191),
        p("workstation -> SSH (22, admins only)", "ws", SERVER, Tcp, 22),
        p("server -> workstation SMB (445): never allowed", SERVER, "ws", Tcp, 445),
    ]
}

fn run_all(lab: &Lab, probes: &[Probe]) -> Result<Vec<(String, bool, bool)>> {
    probes
        .iter()
        .map(|p| {
            Ok((
                p.what.to_string(),
                run_probe(lab, p, false, BLOCKED_TIMEOUT)?,
                run_probe(lab, p, true, BLOCKED_TIMEOUT)?,
            ))
        })
        .collect()
}

#[test]
fn monitor_then_suggest_then_enforce_passes_the_observed_traffic() -> Result<()> {
    let env = TestLab::up("sg1", tmp(), CONFIG)?;
    let probes = traffic();
    let mut servers_for = probes.clone();
    servers_for.extend(not_suggested());
    let _servers = start_probe_servers(&env.lab, &servers_for)?;

    // Monitor mode: everything passes, the unexpected flows are recorded.
    let daemon = env.start(&[])?;
    for (what, v4, v6) in run_all(&env.lab, &probes)? {
        ensure!(v4 && v6, "{what} passes in monitor mode (v4 {v4}, v6 {v6})");
    }
    let want: Vec<(String, u16)> = probes
        .iter()
        .flat_map(|p| {
            let remote = if p.from == SERVER { p.to } else { p.from };
            [(addr(remote).to_string(), p.port), (addr6(remote).to_string(), p.port)]
        })
        .collect();
    let recs = daemon.wait_audit("every probe's unexpected flow", |recs| {
        want.iter().all(|(a, port)| {
            recs.iter().any(|r| {
                r["event_type"] == "unexpected_flow"
                    && r["remote"]["addr"] == a.as_str()
                    && (r["local"]["port"] == *port || r["remote"]["port"] == *port)
            })
        })
    })?;
    ensure!(recs.iter().all(|r| r["verdict"] != "dropped"), "monitor mode drops nothing: {recs:#?}");
    let log = daemon.audit_log.clone();
    ensure!(daemon.stop()?.success());

    // Suggest, with the suggested config written next to the current one.
    let suggested = env.work.join("suggested.toml");
    let out = Command::new(pcguard_bin()?)
        .args(["suggest", "--from"])
        .arg(&log)
        .arg("--config")
        .arg(&env.config)
        .arg("--output")
        .arg(&suggested)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(out.status.success(), "suggest: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    // The diff adds exactly the missing classes and feature, removes nothing.
    let diff = stdout.split("\nDiff:\n").nth(1).context("a diff")?;
    let mut added: Vec<&str> = diff.lines().filter(|l| l.starts_with('+') && !l.starts_with("+++")).collect();
    added.sort();
    assert_eq!(
        added,
        ["+devices = [\"10.77.0.3\", \"fd77::3\"]", "+mfd = [\"hp\"]", "+workstations = [\"10.77.0.2\", \"fd77::2\"]"],
        "{stdout}"
    );
    ensure!(!diff.lines().any(|l| l.starts_with('-') && !l.starts_with("---")), "{stdout}");
    ensure!(stdout.contains("add 10.77.0.2 to peers.workstations"), "{stdout}");
    ensure!(stdout.contains("add 10.77.0.3 to peers.devices"), "{stdout}");
    ensure!(stdout.contains("turn on features.mfd = [..., \"hp\"]"), "{stdout}");
    ensure!(stdout.contains("rules without traffic: cannot tell"), "{stdout}");
    ensure!(!stdout.contains("still not allowed"), "{stdout}");
    let text = std::fs::read_to_string(&suggested)?;
    ensure!(text.contains("admin = [\"10.77.0.7\", \"fd77::7\"]     # the admins' hosts"), "comments kept:\n{text}");
    let cfg = pcguard::config::parse(&text, "suggested.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let before = pcguard::config::parse(CONFIG, "pcguard.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let new_classes: Vec<&String> = cfg.peers.keys().filter(|k| !before.peers.contains_key(*k)).collect();
    assert_eq!(new_classes, ["devices", "workstations"]);
    ensure!(cfg.features.contains("mfd:hp") && cfg.features.contains("device_rpc"), "{:?}", cfg.features);

    // `--output` never replaces a file.
    let again = Command::new(pcguard_bin()?)
        .args(["suggest", "--from"])
        .arg(&log)
        .arg("--config")
        .arg(&env.config)
        .arg("--output")
        .arg(&suggested)
        .output()?;
    ensure!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("never replaced"));

    // Applied and enforced: the same traffic passes, the rest is dropped.
    env.write_config(&text.replace("mode = \"monitor\"", "mode = \"enforce\""))?;
    let daemon = env.start(&[])?;
    // The audit log goes on: only the records from here on count.
    let seen_before = daemon.audit()?.len();
    for (what, v4, v6) in run_all(&env.lab, &probes)? {
        ensure!(v4 && v6, "{what} passes with the suggested config in enforce mode (v4 {v4}, v6 {v6})");
    }
    for (what, v4, v6) in run_all(&env.lab, &not_suggested())? {
        ensure!(!v4 && !v6, "{what} is still dropped (v4 {v4}, v6 {v6})");
    }
    let recs =
        daemon.wait_audit("a dropped flow", |recs| recs[seen_before..].iter().any(|r| r["verdict"] == "dropped"))?;
    ensure!(
        recs[seen_before..].iter().all(|r| r["remote"]["addr"] != "10.77.0.3" || r["event_type"] != "unexpected_flow"),
        "no MFD flow is unexpected any more: {recs:#?}"
    );
    drop(daemon);
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}
