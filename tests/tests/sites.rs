//! PaperCut sites as they really are (issue 7), end to end in the lab:
//! Application Server ports moved with `[papercut]` (the kernel programs
//! and `pcguard render nftables` agree on every verdict), and a primary and
//! a Site Server connecting to each other both ways. Root needed.

use std::{path::Path, process::Command};

use anyhow::{Result, ensure};
use pcguard_tests::*;
use serde_json::Value;

fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn probe(what: &'static str, from: &'static str, to: &'static str, port: u16, allowed: bool) -> Probe {
    Probe { what, from, to, proto: Proto::Tcp, port, allowed }
}

/// Per probe: answered over (IPv4, IPv6).
type Verdicts = Vec<(bool, bool)>;

/// (v4, v6) answered, for every probe.
fn run_all(lab: &Lab, probes: &[Probe]) -> Result<Verdicts> {
    probes
        .iter()
        .map(|p| Ok((run_probe(lab, p, false, BLOCKED_TIMEOUT)?, run_probe(lab, p, true, BLOCKED_TIMEOUT)?)))
        .collect()
}

fn pcguard(args: &[&str], config: &Path) -> Result<String> {
    let out = Command::new(pcguard_bin()?).args(args).arg(config).output()?;
    ensure!(out.status.success(), "pcguard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// The lab's primary with its web ports moved to 80/443: the moved ports
/// pass, 9191/9192 are dropped, for the workstations, the secondary and the
/// HP device (whose 9193 stays); the same traffic gets the same verdicts
/// from the rendered nftables ruleset and from the XDP program.
#[test]
fn moved_web_ports_pass_and_the_old_ones_are_dropped_in_xdp_and_nftables() -> Result<()> {
    let moved = "[papercut]\nhttp_port = 80\nhttps_port = 443\n";
    let env = TestLab::up("ps1", tmp(), &with_hook(&lab_config("enforce", moved), "xdp"))?;

    // `check` shows the moved ports and where the rule comes from.
    let json: Value = serde_json::from_str(&pcguard(&["check", "--format", "json"], &env.config)?)?;
    let rule = |id: &str| json["rules"].as_array().unwrap().iter().find(|r| r["id"] == id).cloned().unwrap();
    assert_eq!(rule("web-http")["ports"], serde_json::json!(["80"]));
    assert_eq!(rule("web-https")["ports"], serde_json::json!(["443"]));
    assert_eq!(rule("hp-inbound")["ports"], serde_json::json!(["80", "443", "9193"]));
    assert_eq!(rule("device-rpc")["ports"], serde_json::json!(["9193"]));
    let table = pcguard(&["check"], &env.config)?;
    assert!(table.contains("9191 -> 80 (papercut.http_port), 9192 -> 443 (papercut.https_port)"), "{table}");
    assert!(table.contains("such as 80/ 443") && table.contains("sys-security-options-change-ports.html"), "{table}");

    let probes = vec![
        probe("workstation -> moved web (80)", "ws", SERVER, 80, true),
        probe("workstation -> moved web SSL (443)", "ws", SERVER, 443, true),
        probe("workstation -> old web (9191)", "ws", SERVER, 9191, false),
        probe("workstation -> old web SSL (9192)", "ws", SERVER, 9192, false),
        probe("secondary -> moved web SSL (443)", "sec", SERVER, 443, true),
        probe("secondary -> old web SSL (9192)", "sec", SERVER, 9192, false),
        probe("HP device -> moved web (80)", "mfd", SERVER, 80, true),
        probe("HP device -> old web (9191)", "mfd", SERVER, 9191, false),
        probe("HP device -> device RPC (9193, not moved)", "mfd", SERVER, 9193, true),
        probe("unclassified host -> moved web (80)", "out", SERVER, 80, false),
    ];
    let _servers = start_probe_servers(&env.lab, &probes)?;

    let ruleset = env.work.join("pcguard.nft");
    std::fs::write(&ruleset, pcguard(&["render", "nftables"], &env.config)?)?;
    let ns = env.lab.ns(SERVER);
    sh("ip", &["netns", "exec", &ns, "nft", "-f", &ruleset.to_string_lossy()])?;
    let nft = run_all(&env.lab, &probes);
    sh("ip", &["netns", "exec", &ns, "nft", "flush", "ruleset"])?;
    let nft = nft?;

    let daemon = env.start(&[])?;
    let kernel = run_all(&env.lab, &probes)?;
    let text = daemon.scrape()?;
    let hook = [("interface", SERVER_IF), ("ingress_hook", "xdp")];
    assert_eq!(metric(&text, "pcguard_interface_info", &hook), Some(1.0), "{text}");
    let recs = daemon.wait_audit("the old web port reported", |r| {
        r.iter().any(|x| x["local"]["port"] == 9191 && x["reason"] == "no_rule")
    })?;
    assert!(
        !recs.iter().any(|x| x["local"]["port"] == 80 && x["remote"]["addr"] == addr("ws").to_string()),
        "{recs:#?}"
    );
    drop(daemon);
    for ((p, n), k) in probes.iter().zip(&nft).zip(&kernel) {
        assert_eq!(n, k, "{}: nftables (v4, v6) vs pcguard (v4, v6)", p.what);
        assert_eq!(*k, (p.allowed, p.allowed), "{}", p.what);
    }
    Ok(())
}

fn audit_of(recs: &[Value], reason: &str) -> Vec<Value> {
    recs.iter().filter(|r| r["reason"] == reason).cloned().collect()
}

/// Probes, then the audit records once the control probe's is written.
fn probe_and_audit(env: &TestLab, probes: &[Probe], control: &str) -> Result<(Verdicts, Vec<Value>)> {
    let _servers = start_probe_servers(&env.lab, probes)?;
    let daemon = env.start(&[])?;
    let verdicts = run_all(&env.lab, probes)?;
    let control_addr = addr(control).to_string();
    let recs = daemon.wait_audit("the control flow's record", |r| {
        r.iter().any(|x| x["reason"] == "outbound_to_workstation" && x["remote"]["addr"] == control_addr)
    })?;
    assert!(daemon.stop()?.success());
    Ok((verdicts, recs))
}

/// The lab's server as a primary with the `out` host as its Site Server:
/// the Site Server connects in, and the primary connects out to it, with
/// egress enforced and no `outbound_to_workstation` alert; the same
/// connection to a workstation stays forbidden.
#[test]
fn primary_and_its_site_server_connect_both_ways() -> Result<()> {
    let base = lab_config("enforce", "");
    let config = base.replacen("admin = [", "site_servers = [\"10.77.0.99\", \"fd77::99\"]\nadmin = [", 1);
    ensure!(config != base, "the lab config has an admin class");
    let env = TestLab::up("ps2", tmp(), &config)?;
    let probes = vec![
        probe("site server -> primary (9192)", "out", SERVER, 9192, true),
        probe("site server -> primary (9191)", "out", SERVER, 9191, true),
        probe("primary -> site server (9192)", SERVER, "out", 9192, true),
        probe("primary -> site server (9191)", SERVER, "out", 9191, true),
        probe("site server -> primary, unlisted port (9999)", "out", SERVER, 9999, false),
        probe("primary -> site server, unlisted port (9999)", SERVER, "out", 9999, false),
        probe("primary -> workstation (9192): never", SERVER, "ws", 9192, false),
    ];
    let (verdicts, recs) = probe_and_audit(&env, &probes, "ws")?;
    for (p, v) in probes.iter().zip(&verdicts) {
        assert_eq!(*v, (p.allowed, p.allowed), "{}", p.what);
    }
    let alerts = audit_of(&recs, "outbound_to_workstation");
    let site = [addr("out").to_string(), addr6("out").to_string()];
    assert!(
        !alerts.iter().any(|a| site.contains(&a["remote"]["addr"].as_str().unwrap_or("").to_string())),
        "{alerts:#?}"
    );
    assert!(alerts.iter().any(|a| a["remote"]["port"] == 9192), "{recs:#?}");
    assert!(recs.iter().any(|r| r["remote"]["port"] == 9999 && r["direction"] == "outbound"), "{recs:#?}");
    Ok(())
}

/// The lab's server as a Site Server whose primary is the `sec` host: the
/// primary connects in (`primary-connects`) and the Site Server connects
/// out to it (`upstream`), with the web ports moved on both sides.
#[test]
fn site_server_and_its_primary_connect_both_ways() -> Result<()> {
    let config = r#"
role = "site-server"
interfaces = ["pcg0"]
mode = "enforce"

[peers]
primary_server = ["10.77.0.4", "fd77::4"]
workstations = ["10.77.0.2", "fd77::2"]
devices = ["10.77.0.3", "fd77::3"]
admin = ["10.77.0.7", "fd77::7"]

[papercut]
https_port = 8443
"#;
    let env = TestLab::up("ps3", tmp(), config)?;
    let probes = vec![
        probe("primary -> site server (9191)", "sec", SERVER, 9191, true),
        probe("primary -> site server (moved HTTPS 8443)", "sec", SERVER, 8443, true),
        probe("primary -> site server (old HTTPS 9192)", "sec", SERVER, 9192, false),
        probe("site server -> primary (9191)", SERVER, "sec", 9191, true),
        probe("site server -> primary (moved HTTPS 8443)", SERVER, "sec", 8443, true),
        probe("site server -> primary (old HTTPS 9192)", SERVER, "sec", 9192, false),
        probe("workstation -> site server web (9191)", "ws", SERVER, 9191, true),
        probe("MFD -> site server device RPC (9193)", "mfd", SERVER, 9193, true),
        probe("site server -> workstation (9191): never", SERVER, "ws", 9191, false),
    ];
    let (verdicts, recs) = probe_and_audit(&env, &probes, "ws")?;
    for (p, v) in probes.iter().zip(&verdicts) {
        assert_eq!(*v, (p.allowed, p.allowed), "{}", p.what);
    }
    let primary = [addr("sec").to_string(), addr6("sec").to_string()];
    let about_primary = |r: &&Value| primary.contains(&r["remote"]["addr"].as_str().unwrap_or("").to_string());
    assert!(!audit_of(&recs, "outbound_to_workstation").iter().any(|r| about_primary(&r)), "{recs:#?}");
    assert!(
        recs.iter().filter(about_primary).all(|r| r["local"]["port"] == 9192 || r["remote"]["port"] == 9192),
        "{recs:#?}"
    );
    Ok(())
}
