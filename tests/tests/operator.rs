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
    // "reverted (...)" is logged once the previous policy is installed;
    // "reverting" comes before it, and a probe there can race the switch.
    wait_until("the revert", Duration::from_secs(8), || Ok(daemon.log_text().contains("reverted (policy generation")))?;
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
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$instance", ".+")
                .replace("$role", ".+");
            out.push((panel["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    ensure!(out.len() >= 20, "dashboard has {} queries", out.len());
    // Variables: servers chosen by role, then by instance.
    let vars = dash["templating"]["list"].as_array().context("templating")?;
    let names: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    ensure!(names.contains(&"role") && names.contains(&"instance"), "dashboard variables: {names:?}");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"].as_str().context("variable query")?;
        let expr = q.trim_start_matches("label_values(").rsplit_once(',').context("label_values")?.0;
        out.push((format!("variable {}", v["name"]), expr.replace("$role", ".+")));
    }
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
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: pcguard\n    static_configs:\n      - targets: ['{}']\n",
            workspace_root().join("deploy/prometheus/pcguard-rules.yml").display(),
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
        // One line per server: every panel keeps the instance label.
        if !title.starts_with("variable") {
            assert!(
                result.iter().all(|r| r["metric"]["instance"].is_string()),
                "panel {title:?} sums servers together: {expr}"
            );
        }
    }
    // The shipped alerting rules load and evaluate on the real series: the
    // server-initiated flows fire PcguardOutboundToWorkstation, and nothing
    // else fires on a healthy daemon.
    let mut firing = Vec::new();
    wait_until("the alert rules to be evaluated", Duration::from_secs(15), || {
        let body = env.lab.run_in(SERVER, || http_get(sa(addr_lo(), 9090), "/api/v1/rules"))??;
        let v: Value = serde_json::from_str(&body)?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        ensure!(rules.len() >= 10, "rules loaded: {body}");
        for r in &rules {
            ensure!(r["health"] == "ok", "rule {} unhealthy: {}", r["name"], r["lastError"]);
        }
        firing = rules
            .iter()
            .filter(|r| r["state"] == "firing")
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect::<Vec<_>>();
        Ok(!firing.is_empty())
    })?;
    assert_eq!(firing, ["PcguardOutboundToWorkstation"], "firing alerts");
    // Label domains: `direction` is the packet's, `flow_direction` the flow's.
    let text = env.lab.run_in(SERVER, {
        let addr = daemon.metrics;
        move || http_get(addr, "/metrics")
    })??;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        for (label, allowed) in
            [("direction=\"", ["ingress", "egress"]), ("flow_direction=\"", ["inbound", "outbound"])]
        {
            for (i, _) in line.match_indices(label) {
                if label == "direction=\"" && line[..i].ends_with("flow_") {
                    continue;
                }
                let value = line[i + label.len()..].split('"').next().unwrap_or("");
                assert!(allowed.contains(&value), "{label}{value} in {line}");
            }
        }
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
        "ExecReload=/usr/local/bin/pcguard reload",
    ] {
        assert!(unit.contains(want), "unit lacks {want}");
    }
    assert!(!unit.contains("CAP_SYS_ADMIN"), "no CAP_SYS_ADMIN");
    let bin = pcguard_bin()?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("pcguard.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/pcguard", &bin.to_string_lossy()))?;
    let out =
        Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().context("systemd-analyze")?;
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let problems: Vec<&str> = text.lines().filter(|l| l.contains("pcguard.service")).collect();
    assert!(out.status.success() && problems.is_empty(), "systemd-analyze verify:\n{text}");
    Ok(())
}

/// `-c FILE` and the positional path are the same for every command that
/// reads a config (docs show both), and `check` names what breaks the
/// server with its fix, in the table and in JSON.
#[test]
fn config_path_is_accepted_both_ways_and_check_warns_with_fixes() -> Result<()> {
    let bin = pcguard_bin()?;
    let cli = |args: &[&str]| -> Result<(bool, String, String)> {
        let out = Command::new(&bin).args(args).output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ))
    };
    let dir = tmp().join("config-path");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("site.toml");
    // Egress enforced, GES by name, no resolvers, metrics off loopback with
    // no rule for the scraper: three warnings.
    std::fs::write(
        &path,
        "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[metrics]\nlisten = \"0.0.0.0:9750\"\n\
         [peers]\nworkstations = [\"10.0.0.0/24\"]\n[features]\nges = true\n",
    )?;
    let p = path.to_str().context("path")?;
    for cmd in [&["check"][..], &["render", "nftables"]] {
        let flag = cli(&[cmd, &["-c", p]].concat())?;
        let long = cli(&[cmd, &["--config", p]].concat())?;
        let positional = cli(&[cmd, &[p]].concat())?;
        assert!(flag.0, "{cmd:?} -c: {}", flag.2);
        assert_eq!(flag.1, positional.1, "{cmd:?}: -c and the argument differ");
        assert_eq!(flag.1, long.1, "{cmd:?}: -c and --config differ");
        let both = cli(&[cmd, &["-c", p, p]].concat())?;
        assert!(!both.0 && both.2.contains("cannot be used with"), "{cmd:?} with both: {}", both.2);
    }
    let (_, table, _) = cli(&["check", p])?;
    let warnings = table.split("\nwarnings:\n").nth(1).context("no warnings section")?;
    for want in ["no rule allows outbound DNS", "rules ges reach", "no inbound rule allows tcp/9750"] {
        assert!(warnings.contains(want), "warnings lack {want:?}:\n{warnings}");
    }
    assert_eq!(warnings.matches("\n  fix: ").count(), 3, "one fix per warning:\n{warnings}");
    let (_, json, _) = cli(&["check", "--format", "json", p])?;
    let json: Value = serde_json::from_str(&json)?;
    let codes: Vec<&str> =
        json["warnings"].as_array().context("warnings")?.iter().filter_map(|w| w["code"].as_str()).collect();
    assert_eq!(codes, ["dns_dropped", "cloud_without_resolver", "metrics_unreachable"]);
    // A missing file is an error naming it, not the default config.
    let missing = cli(&["check", "-c", "/nonexistent/pcguard.toml"])?;
    assert!(!missing.0 && missing.2.contains("/nonexistent/pcguard.toml"), "{}", missing.2);
    Ok(())
}
