//! Allowed-flow records (`[audit] allowed`, docs/audit.md "flow_start and
//! flow_end"): real TCP and UDP flows in the lab, audited by rule-id globs,
//! produce a `flow_start` when the kernel creates their conntrack entry and
//! a `flow_end` with the entry's counters when they close (FIN) or go idle
//! (the daemon's expiry walk). Every record read is validated against the
//! published JSON Schema (the harness's `Daemon::audit`). Root, like every
//! lab test.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, Shutdown},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use pcguard_tests::*;
use serde_json::Value;

fn tmp() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// Payload of the TCP transfer.
const PAYLOAD: usize = 1 << 20;
/// Most bytes of headers a frame of the lab carries besides its payload:
/// Ethernet 14, IPv4 20 (IPv6 40), TCP 20 + options 40.
const MAX_HEADERS: u64 = 14 + 40 + 60;

/// The lab config, the web rules and the test UDP service audited, UDP
/// flows idle after 2 s.
fn config() -> String {
    let base = lab_config("enforce", ALLOW_UDP_7000);
    assert!(base.contains("report_interval = \"60s\"") && base.contains("udp_timeout = 30"), "the lab config changed");
    base.replace(
        "report_interval = \"60s\"",
        "report_interval = \"60s\"\nallowed = [\"web-*\", \"test-udp-?000\"]\nmax_flow_records_per_second = 50",
    )
    .replace("udp_timeout = 30", "udp_timeout = 2")
}

/// The records of `event_type` whose remote end is `remote`.
fn of<'a>(recs: &'a [Value], event_type: &str, remote: (IpAddr, u16)) -> Vec<&'a Value> {
    recs.iter()
        .filter(|r| r["event_type"] == event_type)
        .filter(|r| {
            r["remote"]["addr"].as_str().and_then(|a| a.parse::<IpAddr>().ok()) == Some(remote.0)
                && r["remote"]["port"].as_u64() == Some(u64::from(remote.1))
        })
        .collect()
}

fn wait_for(daemon: &Daemon, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let recs = daemon.audit()?;
        if pred(&recs) {
            return Ok(recs);
        }
        ensure!(Instant::now() < deadline, "audit log never showed {what}; records: {recs:#?}\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} is not a count in {v}"))
}

#[test]
fn allowed_flows_produce_start_and_end_records_with_their_volumes() -> Result<()> {
    let env = TestLab::up("fa", tmp(), &config())?;
    let daemon = env.start(&[])?;
    let server = addr(SERVER);

    // TCP: 1 MB from the workstation to the web port (rule web-http),
    // then the workstation closes.
    let listener = tcp_listen(&env.lab, SERVER, 9191)?;
    let (mut client, mut accepted) = tcp_connection(&env.lab, "ws", &listener, sa(server, 9191))?;
    let client_port = client.local_addr()?.port();
    let remote = (IpAddr::V4(addr("ws")), client_port);
    let data: Vec<u8> = (0..PAYLOAD).map(|i| (i % 251) as u8).collect();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        client.write_all(&data)?;
        client.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest)?;
        Ok(())
    });
    accepted.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = Vec::new();
    accepted.read_to_end(&mut got)?;
    ensure!(got.len() == PAYLOAD, "the server read {} bytes of {PAYLOAD}", got.len());
    drop(accepted);
    sender.join().expect("sender thread")?;

    let recs = wait_for(&daemon, "the TCP flow's start and end", Duration::from_secs(10), |r| {
        of(r, "flow_start", remote).len() == 1 && of(r, "flow_end", remote).len() == 1
    })?;
    let start = of(&recs, "flow_start", remote)[0];
    let end = of(&recs, "flow_end", remote)[0];
    for r in [start, end] {
        ensure!(
            r["rule"] == "web-http"
                && r["direction"] == "inbound"
                && r["protocol"] == "tcp"
                && r["local"]["port"] == 9191
                && r["severity"] == "info"
                && r["peer_classes"].as_array().is_some_and(|c| c.contains(&Value::from("workstations"))),
            "record {r}"
        );
    }
    ensure!(end["end_reason"] == "fin", "end reason {}", end["end_reason"]);
    let (packets_in, bytes_in) = (u(end, "packets_in"), u(end, "bytes_in"));
    let payload = PAYLOAD as u64;
    ensure!(
        bytes_in >= payload && bytes_in <= payload + packets_in * MAX_HEADERS,
        "bytes_in {bytes_in} ({packets_in} packets) for a payload of {payload}"
    );
    // The server sent no data: its packets are ACKs (and its SYN+ACK).
    let (packets_out, bytes_out) = (u(end, "packets_out"), u(end, "bytes_out"));
    ensure!(packets_out > 0 && bytes_out <= packets_out * MAX_HEADERS, "out: {packets_out} packets, {bytes_out} bytes");
    ensure!(end["started"].as_str() <= end["ts"].as_str(), "started after the end: {end}");
    let started = humantime::parse_rfc3339(end["started"].as_str().context("started")?)?;
    let at_start = humantime::parse_rfc3339(start["ts"].as_str().context("ts")?)?;
    let skew = started.duration_since(at_start).unwrap_or_else(|e| e.duration());
    ensure!(skew < Duration::from_millis(50), "started {started:?} vs the start record's ts {at_start:?}");

    // UDP: one request and its answer to the audited test service, then
    // silence: the daemon's walk finds the flow idle past 2 s.
    let _udp = UdpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 7000))?;
    let msg = "flow-audit";
    let ws = env.lab.run_in("ws", || std::net::UdpSocket::bind("0.0.0.0:0"))??;
    let udp_remote = (IpAddr::V4(addr("ws")), ws.local_addr()?.port());
    ws.set_read_timeout(Some(Duration::from_secs(3)))?;
    ws.send_to(msg.as_bytes(), sa(server, 7000))?;
    let mut buf = [0u8; 64];
    let n = ws.recv(&mut buf)?;
    ensure!(&buf[..n] == format!("ok {msg}").as_bytes(), "no answer from the UDP service");
    let sent_at = Instant::now();
    let recs = wait_for(&daemon, "the UDP flow's idle end", Duration::from_secs(20), |r| {
        of(r, "flow_end", udp_remote).len() == 1
    })?;
    let end = of(&recs, "flow_end", udp_remote)[0];
    ensure!(sent_at.elapsed() >= Duration::from_secs(2), "ended before its idle timeout");
    ensure!(of(&recs, "flow_start", udp_remote).len() == 1, "no start of the UDP flow");
    ensure!(end["end_reason"] == "idle" && end["rule"] == "test-udp-7000" && end["protocol"] == "udp", "{end}");
    // One datagram each way: Ethernet + IPv4 + UDP headers and the payload.
    let frame = |payload: usize| 14 + 20 + 8 + payload as u64;
    ensure!(
        (u(end, "packets_in"), u(end, "bytes_in"), u(end, "packets_out"), u(end, "bytes_out"))
            == (1, frame(msg.len()), 1, frame(msg.len() + 3)),
        "UDP counters {end}"
    );
    ensure!(u(end, "duration_ms") < 20_000, "duration {}", end["duration_ms"]);

    // A rule not audited leaves nothing: the LDAP connection of the
    // sample probes is not a flow record.
    ensure!(
        recs.iter().filter(|r| r["event_type"] == "flow_start").all(|r| r["rule"] != "directory-ldap"),
        "a record of a rule that is not audited"
    );

    // The README's walk-through on this log: allowed flows of the day, and
    // the summary by remote and rule, whose volumes are the records' own.
    let log = daemon.audit_log.to_str().context("audit log path")?;
    let listed = daemon.cli(&[
        "flows",
        "--log",
        log,
        "--type",
        "allowed",
        "--since",
        "24h",
        "--no-follow",
        "--json",
        "-n",
        "100",
    ])?;
    let listed: Vec<Value> = listed.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let ends = recs.iter().filter(|r| r["event_type"] == "flow_end").count();
    let starts = recs.iter().filter(|r| r["event_type"] == "flow_start").count();
    ensure!(listed.len() == starts + ends, "flows --type allowed listed {} of {} records", listed.len(), starts + ends);
    ensure!(listed.iter().all(|r| r["event_type"] == "flow_start" || r["event_type"] == "flow_end"), "{listed:?}");
    let summary = daemon.cli(&[
        "flows",
        "--log",
        log,
        "--type",
        "allowed",
        "--since",
        "24h",
        "--summary",
        "by=remote,rule",
        "--json",
    ])?;
    let summary: Value = serde_json::from_str(&summary)?;
    let row = |rule: &str| -> Result<&Value> {
        summary["rows"]
            .as_array()
            .context("rows")?
            .iter()
            .find(|r| r["rule"] == rule && r["remote"] == addr("ws").to_string())
            .with_context(|| format!("no summary row for {rule}: {summary}"))
    };
    let web = row("web-http")?;
    ensure!(web["flows"] == 1 && web["bytes_in"] == bytes_in && web["packets_in"] == packets_in, "web row {web}");
    let udp = row("test-udp-7000")?;
    ensure!(udp["flows"] == 1 && udp["bytes_in"] == frame(msg.len()), "udp row {udp}");

    // `pcguard suggest` reads the same records: of the audited rules, the
    // ones that carried these flows had traffic, web-https none.
    let out = std::process::Command::new(pcguard_bin()?)
        .args(["suggest", "--from", log, "--config"])
        .arg(&env.config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "suggest failed: {}", String::from_utf8_lossy(&out.stderr));
    let unused: Vec<&str> = text
        .lines()
        .find_map(|l| l.trim().trim_start_matches("- ").strip_prefix("rules without traffic in the period: "))
        .with_context(|| format!("no rule-usage line in:\n{text}"))?
        .split(", ")
        .collect();
    ensure!(
        unused.contains(&"web-https") && !unused.contains(&"web-http") && !unused.contains(&"test-udp-7000"),
        "rules without traffic: {unused:?}\n{text}"
    );
    daemon.stop()?;
    Ok(())
}
