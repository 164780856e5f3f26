//! End-to-end tests: a lab of network namespaces, real TCP/UDP servers and
//! clients, `pcguard run` attached to the server's interface. They need root;
//! run them with `cargo xtask test` (one at a time).

use std::time::Duration;

use anyhow::Result;
use pcguard_tests::*;
use serde_json::Value;

fn tmp() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

fn port(v: &Value, side: &str) -> u64 {
    v[side]["port"].as_u64().unwrap_or(0)
}

fn m(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

#[test]
fn enforce_mode_verdicts_counters_and_audit() -> Result<()> {
    let env = TestLab::up("pe1", tmp(), &lab_config("enforce", ""))?;
    let daemon = env.start(&[])?;
    for (p, v4, v6) in run_sample_probes(&env.lab)? {
        assert_eq!((v4, v6), (p.allowed, p.allowed), "{} (v4, v6), daemon log:\n{}", p.what, daemon.log_text());
    }

    // One audit record per unexpected flow and address family, not per packet
    // (the blocked TCP probes retransmit their SYN within the timeout).
    let recs = daemon.wait_audit("the server->workstation alert", |r| {
        r.iter().filter(|x| s(x, "reason") == "outbound_to_workstation").count() >= 2
    })?;
    let count = |f: &dyn Fn(&Value) -> bool| recs.iter().filter(|r| f(r)).count();
    assert_eq!(
        count(&|r| s(r, "reason") == "no_rule" && port(r, "local") == 9999 && s(r, "protocol") == "tcp"),
        2,
        "{recs:#?}"
    );
    assert_eq!(
        count(&|r| s(r, "reason") == "no_rule" && port(r, "local") == 9191 && s(r, "protocol") == "udp"),
        2,
        "{recs:#?}"
    );
    let alerts: Vec<&Value> = recs.iter().filter(|r| s(r, "reason") == "outbound_to_workstation").collect();
    assert_eq!(alerts.len(), 2, "{recs:#?}");
    for a in &alerts {
        assert_eq!(s(a, "severity"), "alert");
        assert_eq!(s(a, "direction"), "outbound");
        assert_eq!(s(a, "verdict"), "dropped");
        assert_eq!(port(a, "remote"), 445);
        assert!(a["peer_classes"].as_array().unwrap().iter().any(|c| c == "workstations"), "{a}");
        assert_eq!(s(a, "interface"), SERVER_IF);
    }
    let ssh = recs.iter().find(|r| port(r, "local") == 22).expect("ws -> ssh reported");
    assert_eq!(s(ssh, "reason"), "peer_not_allowed");
    assert!(!ssh["port_rules"].as_array().unwrap().is_empty(), "{ssh}");
    let out = recs.iter().find(|r| r["remote"]["addr"] == addr("out").to_string()).expect("unclassified host reported");
    assert_eq!(s(out, "reason"), "peer_not_allowed");
    // Allowed flows are never reported.
    assert_eq!(count(&|r| port(r, "local") == 9192 || port(r, "remote") == 389), 0, "{recs:#?}");

    let text = daemon.scrape()?;
    let allowed_9191 = m(
        &text,
        "pcguard_packets_total",
        &[("direction", "ingress"), ("protocol", "tcp"), ("port", "9191"), ("verdict", "allowed")],
    );
    assert!(allowed_9191 >= 12.0, "ingress 9191 allowed packets: {allowed_9191}\n{text}");
    assert!(
        m(
            &text,
            "pcguard_packets_total",
            &[("direction", "egress"), ("protocol", "tcp"), ("port", "9191"), ("verdict", "allowed")]
        ) >= 8.0
    );
    assert!(
        m(
            &text,
            "pcguard_packets_total",
            &[("direction", "egress"), ("protocol", "tcp"), ("port", "389"), ("verdict", "allowed")]
        ) >= 4.0
    );
    assert!(
        m(
            &text,
            "pcguard_packets_total",
            &[("direction", "ingress"), ("protocol", "tcp"), ("port", "389"), ("verdict", "allowed")]
        ) >= 4.0,
        "LDAP replies counted under the flow's port"
    );
    assert!(
        m(
            &text,
            "pcguard_packets_total",
            &[("direction", "ingress"), ("protocol", "tcp"), ("port", "other"), ("verdict", "dropped")]
        ) >= 2.0
    );
    assert!(
        m(
            &text,
            "pcguard_packets_total",
            &[("direction", "egress"), ("protocol", "tcp"), ("port", "other"), ("verdict", "dropped")]
        ) >= 2.0
    );
    assert!(
        m(
            &text,
            "pcguard_rule_packets_total",
            &[("rule", "web-http"), ("direction", "ingress"), ("verdict", "allowed")]
        ) >= 12.0,
        "{text}"
    );
    // The unexpected-flow counter agrees with the audit log, reason by reason.
    for reason in ["no_rule", "peer_not_allowed", "outbound_to_workstation"] {
        let n = count(&|r| s(r, "reason") == reason) as f64;
        assert_eq!(m(&text, "pcguard_unexpected_flows_total", &[("reason", reason)]), n, "{reason}\n{text}");
    }
    assert_eq!(m(&text, "pcguard_events_dropped_total", &[]), 0.0);
    assert_eq!(m(&text, "pcguard_policy_info", &[("mode", "enforce")]), 1.0, "{text}");
    // The lab's interface is a veth: auto puts the ingress pipeline on TC,
    // and says why.
    let hook = [("interface", SERVER_IF), ("ingress_hook", "tc")];
    assert_eq!(m(&text, "pcguard_interface_info", &hook), 1.0, "{text}");
    assert!(text.lines().any(|l| l.starts_with("pcguard_interface_info") && l.contains("reason=\"veth: ")), "{text}");
    // Sampled every 10 s in the background, labelled by table, never above
    // the capacity.
    wait_until("a conntrack sample with entries", Duration::from_secs(15), || {
        Ok(m(&daemon.scrape()?, "pcguard_conntrack_entries", &[]) >= 1.0)
    })?;
    let text = daemon.scrape()?;
    for table in ["established", "new"] {
        let (n, cap) = (
            m(&text, "pcguard_conntrack_entries", &[("table", table)]),
            m(&text, "pcguard_conntrack_capacity", &[("table", table)]),
        );
        assert!(cap > 0.0 && n <= cap, "{table}: {n} of {cap}\n{text}");
    }
    assert!(daemon.stop()?.success());
    Ok(())
}

#[test]
fn monitor_mode_passes_everything_and_reports_what_enforce_would_drop() -> Result<()> {
    let env = TestLab::up("pe2", tmp(), &lab_config("monitor", ""))?;
    let daemon = env.start(&[])?;
    for (p, v4, v6) in run_sample_probes(&env.lab)? {
        assert!(v4 && v6, "{} must pass in monitor mode", p.what);
    }
    let recs = daemon.wait_audit("the alert", |r| r.iter().any(|x| s(x, "reason") == "outbound_to_workstation"))?;
    assert!(recs.iter().all(|r| s(r, "verdict") == "would_drop"), "{recs:#?}");
    assert!(recs.iter().any(|r| port(r, "local") == 9999));
    let text = daemon.scrape()?;
    assert!(
        m(&text, "pcguard_packets_total", &[("direction", "ingress"), ("port", "other"), ("verdict", "would_drop")])
            >= 2.0,
        "{text}"
    );
    assert_eq!(m(&text, "pcguard_packets_total", &[("verdict", "dropped")]), 0.0, "nothing dropped in monitor mode");
    assert!(
        m(&text, "pcguard_packets_total", &[("direction", "egress"), ("verdict", "would_drop")]) >= 2.0,
        "replies of monitored flows and the server->ws flow"
    );
    assert_eq!(m(&text, "pcguard_policy_info", &[("mode", "monitor")]), 1.0);
    assert!(daemon.stop()?.success());
    Ok(())
}

#[test]
fn counters_match_the_udp_traffic_sent_exactly() -> Result<()> {
    let env = TestLab::up("pe3", tmp(), &lab_config("enforce", ""))?;
    let daemon = env.start(&[])?;
    let before = daemon.scrape()?;
    let labels = [("direction", "ingress"), ("protocol", "udp"), ("port", "other"), ("verdict", "dropped")];
    const N: usize = 40;
    const PAYLOAD: usize = 100;
    let dst4 = sa(addr(SERVER), 9999);
    let dst6 = sa(addr6(SERVER), 9999);
    env.lab.run_in("ws", move || -> Result<()> {
        let s4 = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let s6 = std::net::UdpSocket::bind("[::]:0")?;
        for _ in 0..N {
            s4.send_to(&[7u8; PAYLOAD], dst4)?;
            s6.send_to(&[7u8; PAYLOAD], dst6)?;
        }
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(300));
    let after = daemon.scrape()?;
    let delta = |name| m(&after, name, &labels) - m(&before, name, &labels);
    assert_eq!(delta("pcguard_packets_total"), (2 * N) as f64, "{after}");
    // Ethernet 14 + IPv4 20 / IPv6 40 + UDP 8 + payload.
    let bytes = N * (14 + 20 + 8 + PAYLOAD) + N * (14 + 40 + 8 + PAYLOAD);
    assert_eq!(delta("pcguard_bytes_total"), bytes as f64);
    // Two flows (one per source socket and family), each reported once.
    let recs =
        daemon.wait_audit("the two UDP flows", |r| r.iter().filter(|x| port(x, "local") == 9999).count() >= 2)?;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(daemon.audit()?.iter().filter(|x| port(x, "local") == 9999).count(), 2, "{recs:#?}");
    let suppressed =
        m(&after, "pcguard_events_suppressed_total", &[]) - m(&before, "pcguard_events_suppressed_total", &[]);
    assert_eq!(suppressed, (2 * N - 2) as f64);
    assert!(daemon.stop()?.success());
    Ok(())
}

#[test]
fn sighup_reloads_and_a_bad_config_keeps_the_running_policy() -> Result<()> {
    let env = TestLab::up("pe4", tmp(), &lab_config("enforce", ""))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9999))?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9191))?;
    let daemon = env.start(&[])?;
    assert!(!ws_reaches(&env.lab, 9999)?);
    // A connection established before the reload...
    let to = sa(addr(SERVER), 9191);
    let mut web = env.lab.run_in("ws", move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)))??;

    // The site rule comes before the catalog rules: every rule id shifts.
    // The new ingress hook waits for a restart, and the log says so.
    env.write_config(&with_hook(&lab_config("enforce", ALLOW_9999), "xdp"))?;
    daemon.signal(libc::SIGHUP)?;
    wait_metric(&daemon, "pcguard_reloads_total", &[("result", "success")], 1.0)?;
    assert!(daemon.log_text().contains("ingress_hook changed (auto -> xdp)"), "{}", daemon.log_text());
    assert_eq!(
        m(&daemon.scrape()?, "pcguard_interface_info", &[("interface", SERVER_IF), ("ingress_hook", "tc")]),
        1.0
    );
    let rule = |text: &str, id| m(text, "pcguard_rule_packets_total", &[("rule", id), ("direction", "ingress")]);
    let before = daemon.scrape()?;
    // ...keeps passing and is still counted under its own rule.
    std::io::Write::write_all(&mut web, b"after reload")?;
    web.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut web, &mut answer)?;
    assert_eq!(answer, "ok after reload");
    std::thread::sleep(Duration::from_millis(200));
    let after = daemon.scrape()?;
    assert!(rule(&after, "web-http") - rule(&before, "web-http") >= 2.0, "{after}");
    assert_eq!(rule(&after, "legacy-9999"), 0.0, "no other rule credited: {after}");
    assert!(ws_reaches(&env.lab, 9999)?, "allowed after reload");
    let text = daemon.scrape()?;
    assert!(
        m(&text, "pcguard_rule_packets_total", &[("rule", "legacy-9999"), ("verdict", "allowed")]) >= 1.0,
        "{text}"
    );

    env.write_config("role = \"primary\"\nthis is not toml\n")?;
    daemon.signal(libc::SIGHUP)?;
    wait_metric(&daemon, "pcguard_reloads_total", &[("result", "failure")], 1.0)?;
    assert!(ws_reaches(&env.lab, 9999)?, "the running policy is kept");
    assert!(daemon.log_text().contains("reload failed"), "{}", daemon.log_text());
    assert!(daemon.stop()?.success());
    Ok(())
}

fn wait_metric(d: &Daemon, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    wait_until(&format!("{name}{labels:?} = {want}"), Duration::from_secs(10), || {
        Ok(m(&d.scrape()?, name, labels) == want)
    })
}

#[test]
fn sigterm_leaves_enforcement_in_place_and_detach_removes_it() -> Result<()> {
    let env = TestLab::up("pe5", tmp(), &with_hook(&lab_config("enforce", ""), "xdp"))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9999))?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(std::net::Ipv6Addr::UNSPECIFIED, 9191))?;
    let daemon = env.start(&[])?;
    let link = sh("ip", &["-n", &env.lab.ns(SERVER), "-d", "link", "show", SERVER_IF])?;
    assert!(link.contains("xdp"), "XDP attached: {link}");
    assert!(daemon.maps_dir()?.join("PORT_COUNTERS").exists());
    assert!(!ws_reaches(&env.lab, 9999)?);
    let (bpffs, run_dir) = (daemon.bpffs_dir.clone(), daemon.run_dir.clone());
    assert!(daemon.stop()?.success());
    // The daemon is gone; its last policy is not.
    let link = sh("ip", &["-n", &env.lab.ns(SERVER), "-d", "link", "show", SERVER_IF])?;
    assert!(link.contains("xdp"), "XDP still attached after SIGTERM: {link}");
    assert!(!ws_reaches(&env.lab, 9999)?, "enforcement went away with the daemon");
    assert!(ws_reaches(&env.lab, 9191)?, "allowed traffic stopped with the daemon");
    // The explicit off switch.
    let bin = pcguard_bin()?;
    let out = std::process::Command::new(&bin)
        .arg("detach")
        .arg("--bpffs-dir")
        .arg(&bpffs)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let link = sh("ip", &["-n", &env.lab.ns(SERVER), "-d", "link", "show", SERVER_IF])?;
    assert!(!link.contains("xdp"), "XDP detached: {link}");
    assert!(!bpffs.exists(), "pins removed");
    assert!(!run_dir.join("state.json").exists(), "state removed");
    assert!(ws_reaches(&env.lab, 9999)?, "nothing filters after detach");
    Ok(())
}

#[test]
fn status_and_flows_commands_show_the_running_daemon() -> Result<()> {
    let env = TestLab::up("pe6", tmp(), &lab_config("enforce", ""))?;
    let daemon = env.start(&[])?;
    run_sample_probes(&env.lab)?;
    daemon.wait_audit("alerts", |r| r.iter().any(|x| s(x, "reason") == "outbound_to_workstation"))?;
    let status = daemon.cli(&["status"])?;
    let abi = format!("kernel ABI: v{}\n", pcguard_common::ABI_VERSION);
    for want in [SERVER_IF, "web-http", "9191", "conntrack entries", "enforce", &abi] {
        assert!(status.contains(want), "status lacks {want}:\n{status}");
    }
    let json: Value = serde_json::from_str(&daemon.cli(&["status", "--format", "json"])?)?;
    assert_eq!(json["state"]["interfaces"][0]["name"], SERVER_IF);
    assert_eq!(json["state"]["abi"], pcguard_common::ABI_VERSION);
    assert!(json["counters"]["ports"].as_array().unwrap().iter().any(|p| p["port"] == "9191"));

    let out = std::process::Command::new(pcguard_bin()?)
        .args(["flows", "--no-follow", "--json", "--severity", "alert", "--log"])
        .arg(&daemon.audit_log)
        .output()?;
    assert!(out.status.success());
    let lines: Vec<Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    lines.iter().try_for_each(validate_record)?;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines.iter().all(|l| s(l, "reason") == "outbound_to_workstation"));
    let human = std::process::Command::new(pcguard_bin()?)
        .args(["flows", "--no-follow", "--port", "9999", "--log"])
        .arg(&daemon.audit_log)
        .output()?;
    let human = String::from_utf8(human.stdout)?;
    assert_eq!(human.lines().count(), 2, "{human}");
    assert!(human.contains(":9999") && human.contains("no_rule"), "{human}");

    // Following: only new records that match, as they are written.
    let mut follow = std::process::Command::new(pcguard_bin()?)
        .args(["flows", "--json", "-n", "0", "--port", "9998", "--log"])
        .arg(&daemon.audit_log)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!ws_reaches(&env.lab, 9998)?);
    let line = rx.recv_timeout(Duration::from_secs(5)).map_err(|_| anyhow::anyhow!("pcguard flows printed nothing"))?;
    let rec: Value = serde_json::from_str(&line)?;
    validate_record(&rec)?;
    assert_eq!(port(&rec, "local"), 9998, "{rec}");
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "one flow, one line");
    follow.kill()?;
    follow.wait()?;
    assert!(daemon.stop()?.success());
    Ok(())
}

/// DNS-aware egress: the Global Entitlements Service is a name. Its
/// address becomes reachable on 443 only once the configured resolver
/// (here the LDAP host, as an AD domain controller would be) answered this
/// server's query for `mf.cloud.papercut.com`; an answer for another name
/// with the same address opens nothing.
#[test]
fn dns_answers_for_documented_names_open_the_cloud_rules() -> Result<()> {
    let config = lab_config("enforce", "")
        .replace("[peers]\n", "[peers]\ndns = [\"10.77.0.5\", \"fd77::5\"]\n")
        .replace("[features]\n", "[features]\nges = true\n");
    let env = TestLab::up("pe7", tmp(), &config)?;
    let cloud4 = std::net::IpAddr::V4(addr("out"));
    let cloud6 = std::net::IpAddr::V6(addr6("out"));
    let records = vec![
        ("mf.cloud.papercut.com".to_string(), cloud4, 300),
        ("mf.cloud.papercut.com".to_string(), cloud6, 300),
        ("evil.example.com".to_string(), cloud4, 300),
    ];
    let _dns = DnsServer::start(&env.lab, "ldap", records)?;
    let _https = TcpServer::start(&env.lab, "out", sa(std::net::Ipv6Addr::UNSPECIFIED, 443))?;
    let daemon = env.start(&[])?;
    let https = |ip: std::net::IpAddr| -> Result<bool> {
        Ok(tcp_request(&env.lab, SERVER, sa(ip, 443), "GET /", BLOCKED_TIMEOUT)? == Outcome::Answered)
    };
    assert!(!https(cloud4)?, "blocked before any DNS answer");

    let resolver = std::net::IpAddr::V4(addr("ldap"));
    assert_eq!(resolve(&env.lab, SERVER, resolver, "evil.example.com", false)?, vec![cloud4]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!https(cloud4)?, "a name outside the policy opens nothing");
    assert_eq!(m(&daemon.scrape()?, "pcguard_dns_learned_addresses", &[]), 0.0);

    assert_eq!(resolve(&env.lab, SERVER, resolver, "mf.cloud.papercut.com", false)?, vec![cloud4]);
    wait_metric(&daemon, "pcguard_dns_learned_addresses", &[], 1.0)?;
    assert!(https(cloud4)?, "GES reachable once resolved:\n{}", daemon.log_text());
    assert_eq!(
        resolve(&env.lab, SERVER, std::net::IpAddr::V6(addr6("ldap")), "mf.cloud.papercut.com", true)?,
        vec![cloud6]
    );
    wait_metric(&daemon, "pcguard_dns_learned_addresses", &[], 2.0)?;
    assert!(https(cloud6)?, "over IPv6 too");

    let text = daemon.scrape()?;
    assert!(m(&text, "pcguard_dns_answers_total", &[]) >= 3.0, "{text}");
    assert!(
        m(&text, "pcguard_rule_packets_total", &[("rule", "ges"), ("direction", "egress"), ("verdict", "allowed")])
            >= 2.0,
        "{text}"
    );
    assert!(daemon.log_text().contains("is mf.cloud.papercut.com"), "{}", daemon.log_text());
    // The attempts before the answer were blocked and reported.
    let recs = daemon.audit()?;
    assert!(recs.iter().any(|r| port(r, "remote") == 443 && s(r, "reason") == "peer_not_allowed"), "{recs:#?}");
    assert!(daemon.stop()?.success());
    Ok(())
}
