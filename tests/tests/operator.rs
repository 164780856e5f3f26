//! Operator-facing end-to-end tests: confirm-or-revert rollout, a real
//! Prometheus scraping the daemon for every query of the shipped Grafana
//! dashboard, the nftables rendering as an oracle of the kernel verdicts,
//! and the systemd unit. Root needed (except the unit check).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use pcguard_tests::*;
use serde_json::Value;

fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

#[test]
fn unconfirmed_reload_is_reverted_and_confirmed_one_kept() -> Result<()> {
    let env = TestLab::up("po1", tmp(), &lab_config("enforce", ""))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9999))?;
    let mut daemon = env.start(&["--confirm-within", "3s"])?;
    assert!(daemon.cli(&["status"])?.contains("PENDING CONFIRMATION"));
    assert!(daemon.cli(&["confirm"])?.contains("confirm sent"));
    std::thread::sleep(Duration::from_secs(4));
    assert!(daemon.try_wait()?.is_none(), "a confirmed policy stays:\n{}", daemon.log_text());
    assert!(!daemon.cli(&["status"])?.contains("PENDING"));
    assert!(!ws_reaches(&env.lab, 9999)?);

    // A reload that is never confirmed goes back to the previous policy.
    env.write_config(&lab_config("enforce", ALLOW_9999))?;
    daemon.signal(libc::SIGHUP)?;
    wait_until("the reload", Duration::from_secs(5), || Ok(daemon.log_text().contains("reload applied")))?;
    assert!(ws_reaches(&env.lab, 9999)?, "allowed while pending");
    wait_until("the revert", Duration::from_secs(8), || Ok(daemon.log_text().contains("reverting")))?;
    assert!(!ws_reaches(&env.lab, 9999)?, "reverted to the confirmed policy");
    assert!(daemon.try_wait()?.is_none());

    // Confirmed in time: kept.
    daemon.signal(libc::SIGHUP)?;
    wait_until("the second reload", Duration::from_secs(5), || {
        Ok(daemon.log_text().matches("reload applied").count() >= 2)
    })?;
    daemon.cli(&["confirm"])?;
    std::thread::sleep(Duration::from_secs(4));
    assert!(ws_reaches(&env.lab, 9999)?, "confirmed policy kept");
    assert!(daemon.stop()?.success());
    Ok(())
}

#[test]
fn unconfirmed_start_detaches_and_exits() -> Result<()> {
    let env = TestLab::up("po2", tmp(), &lab_config("enforce", ""))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9999))?;
    let mut daemon = env.start(&["--confirm-within", "2s"])?;
    assert!(!ws_reaches(&env.lab, 9999)?);
    let mut status = None;
    wait_until("the daemon to exit", Duration::from_secs(8), || {
        status = daemon.try_wait()?;
        Ok(status.is_some())
    })?;
    assert!(status.unwrap().success(), "{}", daemon.log_text());
    let link = sh("ip", &["-n", &env.lab.ns(SERVER), "-d", "link", "show", SERVER_IF])?;
    assert!(!link.contains("xdp"), "detached: {link}");
    assert!(ws_reaches(&env.lab, 9999)?);
    Ok(())
}

#[test]
fn always_allowed_admin_ssh_passes_in_enforce_mode() -> Result<()> {
    // The admin class reaches SSH even though no PaperCut feature needs it;
    // other classes do not.
    let env = TestLab::up("po3", tmp(), &lab_config("enforce", ""))?;
    let _daemon = env.start(&[])?;
    let probes: Vec<Probe> = sample_probes().into_iter().filter(|p| p.port == 22).collect();
    let _servers = start_probe_servers(&env.lab, &probes)?;
    for p in &probes {
        assert_eq!(run_probe(&env.lab, p, false, BLOCKED_TIMEOUT)?, p.allowed, "{}", p.what);
        assert_eq!(run_probe(&env.lab, p, true, BLOCKED_TIMEOUT)?, p.allowed, "{}", p.what);
    }
    Ok(())
}

/// Same traffic through `pcguard render nftables` (no pcguard) and through
/// pcguard (no nftables): identical verdicts.
#[test]
fn nftables_rendering_gives_the_same_verdicts_as_the_kernel_programs() -> Result<()> {
    let env = TestLab::up("po4", tmp(), &lab_config("enforce", ""))?;
    let out = Command::new(pcguard_bin()?).args(["render", "nftables"]).arg(&env.config).output()?;
    ensure!(out.status.success(), "render: {}", String::from_utf8_lossy(&out.stderr));
    let ruleset = env.work.join("pcguard.nft");
    std::fs::write(&ruleset, &out.stdout)?;
    let probes = sample_probes();
    let _servers = start_probe_servers(&env.lab, &probes)?;
    let run_all = |lab: &Lab| -> Result<Vec<(bool, bool)>> {
        probes
            .iter()
            .map(|p| Ok((run_probe(lab, p, false, BLOCKED_TIMEOUT)?, run_probe(lab, p, true, BLOCKED_TIMEOUT)?)))
            .collect()
    };
    let ns = env.lab.ns(SERVER);
    sh("ip", &["netns", "exec", &ns, "nft", "-f", &ruleset.to_string_lossy()])?;
    let nft = run_all(&env.lab)?;
    sh("ip", &["netns", "exec", &ns, "nft", "flush", "ruleset"])?;

    let daemon = env.start(&[])?;
    let kernel = run_all(&env.lab)?;
    drop(daemon);
    for ((p, n), k) in probes.iter().zip(&nft).zip(&kernel) {
        assert_eq!(n, k, "{}: nftables (v4, v6) vs pcguard (v4, v6)", p.what);
        assert_eq!(*k, (p.allowed, p.allowed), "{}", p.what);
    }
    Ok(())
}

struct Prometheus {
    child: Child,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn prom_query(lab: &Lab, expr: &str) -> Result<Vec<Value>> {
    let path = format!("/api/v1/query?query={}", urlencode(expr));
    let body = lab.run_in(SERVER, move || http_get(sa(addr_lo(), 9090), &path))??;
    let v: Value = serde_json::from_str(&body)?;
    ensure!(v["status"] == "success", "query {expr}: {body}");
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn addr_lo() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::LOCALHOST
}

/// Every expression of the shipped dashboard, with Grafana's variables
/// replaced the way Grafana would for a 5-minute view of all servers.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace_root().join("deploy/grafana/pcguard.json"))?)?;
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().context("panels")? {
        for t in panel["targets"].as_array().context("targets")? {
            let expr = t["expr"].as_str().context("expr")?;
            let expr = expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$instance", ".+");
            out.push((panel["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    ensure!(out.len() >= 10, "dashboard has {} queries", out.len());
    Ok(out)
}

#[test]
fn prometheus_scrapes_the_daemon_and_every_dashboard_query_has_data() -> Result<()> {
    let env = TestLab::up("po5", tmp(), &lab_config("enforce", ""))?;
    let daemon = env.start(&[])?;
    let prom_dir = env.work.join("prometheus");
    std::fs::create_dir_all(&prom_dir)?;
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pcguard\n    static_configs:\n      - targets: ['{}']\n",
            daemon.metrics
        ),
    )?;
    let log = std::fs::File::create(prom_dir.join("prometheus.log"))?;
    let _prom = Prometheus {
        child: Command::new("nsenter")
            .arg(format!("--net={}", env.lab.ns_path(SERVER).display()))
            .arg("prometheus")
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting prometheus (cargo xtask deps installs it)")?,
    };
    wait_until("Prometheus to scrape pcguard", Duration::from_secs(30), || {
        Ok(prom_query(&env.lab, "up{job=\"pcguard\"} == 1").map(|r| !r.is_empty()).unwrap_or(false))
    })?;
    // Enforce, then monitor (a reload): every panel's queries, the
    // dropped and the would-drop ones alike, then have data.
    run_sample_probes(&env.lab)?;
    let monitor = std::fs::read_to_string(&env.config)?.replace("mode = \"enforce\"", "mode = \"monitor\"");
    env.write_config(&monitor)?;
    daemon.signal(libc::SIGHUP)?;
    wait_until("the reload to monitor mode", Duration::from_secs(10), || {
        Ok(daemon.log_text().contains("reload applied"))
    })?;
    run_sample_probes(&env.lab)?;
    // Enough scrapes after the traffic for rate() and increase() to have two samples.
    std::thread::sleep(Duration::from_secs(4));
    for (title, expr) in dashboard_queries()? {
        let result = prom_query(&env.lab, &expr)?;
        assert!(!result.is_empty(), "panel {title:?}: no series for {expr}");
    }
    let alert = prom_query(&env.lab, "sum(pcguard_unexpected_flows_total{reason=\"outbound_to_workstation\"})")?;
    // Server -> workstation over IPv4 and IPv6, in each mode.
    assert_eq!(alert[0]["value"][1], "4", "{alert:?}");
    Ok(())
}

#[test]
fn systemd_unit_is_valid_and_least_privileged() -> Result<()> {
    let unit = std::fs::read_to_string(workspace_root().join("deploy/systemd/pcguard.service"))?;
    for want in [
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/usr/bin/pcguard reload",
    ] {
        assert!(unit.contains(want), "unit lacks {want}");
    }
    assert!(!unit.contains("CAP_SYS_ADMIN"), "no CAP_SYS_ADMIN");
    let bin = pcguard_bin()?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("pcguard.service");
    std::fs::write(&path, unit.replace("/usr/bin/pcguard", &bin.to_string_lossy()))?;
    let out =
        Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().context("systemd-analyze")?;
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let problems: Vec<&str> = text.lines().filter(|l| l.contains("pcguard.service")).collect();
    assert!(out.status.success() && problems.is_empty(), "systemd-analyze verify:\n{text}");
    Ok(())
}
