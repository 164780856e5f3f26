//! The audit records as a SIEM receives them (docs/audit.md): schema 1 in
//! the `json` format sent to a syslog socket as RFC 5424 messages, and the
//! `ecs` format in the file, read back by `pcguard flows`. Every record the
//! tests read is validated against the published JSON Schemas (the
//! harness's `Daemon::audit` and `validate_record`). Root, like every
//! lab test.

use std::{os::unix::net::UnixDatagram, time::Duration};

use anyhow::{Context as _, Result, ensure};
use pcguard_tests::*;
use serde_json::Value;

fn tmp() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// The lab config with `audit` added to its `[audit]` table.
fn config(audit: &str) -> String {
    let base = lab_config("enforce", "");
    assert!(base.contains("report_interval = \"60s\""), "the lab config changed");
    base.replace("report_interval = \"60s\"", &format!("report_interval = \"60s\"\n{audit}"))
}

/// An RFC 5424 message, split at its header fields.
struct Rfc5424 {
    pri: u32,
    version: String,
    timestamp: String,
    hostname: String,
    app_name: String,
    procid: String,
    msgid: String,
    structured_data: String,
    msg: String,
}

fn parse_rfc5424(datagram: &[u8]) -> Result<Rfc5424> {
    let text = std::str::from_utf8(datagram).context("the message is not UTF-8")?;
    let rest = text.strip_prefix('<').context("no PRI")?;
    let (pri, rest) = rest.split_once('>').context("PRI not closed")?;
    let mut f = rest.splitn(7, ' ');
    let mut next = |what: &str| f.next().map(str::to_string).with_context(|| format!("no {what} in {text:?}"));
    let m = Rfc5424 {
        pri: pri.parse().context("PRI is not a number")?,
        version: next("VERSION")?,
        timestamp: next("TIMESTAMP")?,
        hostname: next("HOSTNAME")?,
        app_name: next("APP-NAME")?,
        procid: next("PROCID")?,
        msgid: next("MSGID")?,
        structured_data: "-".into(),
        msg: String::new(),
    };
    // STRUCTURED-DATA is `-` here (no SD element), then one space and MSG.
    let sd_and_msg = next("STRUCTURED-DATA")?;
    let (sd, msg) = sd_and_msg.split_once(' ').context("no MSG")?;
    Ok(Rfc5424 { structured_data: sd.into(), msg: msg.into(), ..m })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

/// `syslog = true`: an unexpected flow in the lab reaches a real receiver
/// (a unix datagram socket bound where the config points) as an RFC 5424
/// message whose MSG is the same schema-1 record as the file's line.
#[test]
fn unexpected_flows_reach_syslog_as_rfc5424_messages() -> Result<()> {
    let work = tmp().join("audit-syslog");
    std::fs::create_dir_all(&work)?;
    let socket = work.join("log.sock");
    let _ = std::fs::remove_file(&socket);
    let rx = UnixDatagram::bind(&socket)?;
    rx.set_read_timeout(Some(Duration::from_secs(10)))?;
    let cfg =
        config(&format!("syslog = true\nsyslog_socket = \"{}\"\nsyslog_facility = \"local3\"\n", socket.display()));
    let env = TestLab::up("pa1", tmp(), &cfg)?;
    let daemon = env.start(&[])?;
    ensure!(!ws_reaches(&env.lab, 9999)?, "port 9999 has no rule");
    let recs = daemon.wait_audit("the flow to 9999", |r| r.iter().any(|x| x["local"]["port"] == 9999))?;
    let rec = recs.iter().find(|x| x["local"]["port"] == 9999).unwrap();

    // The datagrams: the one for this flow (others, e.g. IPv6 neighbour
    // traffic, may come first).
    let mut buf = vec![0u8; 65536];
    let msg = loop {
        let n = rx.recv(&mut buf).context("no syslog message within 10 s")?;
        let m = parse_rfc5424(&buf[..n])?;
        let record: Value = serde_json::from_str(&m.msg).with_context(|| format!("MSG is not JSON: {:?}", m.msg))?;
        validate_record(&record)?;
        if record["event_id"] == rec["event_id"] {
            break (m, record);
        }
    };
    let (m, record) = msg;
    // local3 (19) * 8 + warning (4).
    assert_eq!(m.pri, 19 * 8 + 4);
    assert_eq!(rec["severity_code"], 4);
    assert_eq!(m.version, "1");
    assert_eq!(m.timestamp, rec["ts"].as_str().unwrap());
    assert_eq!(m.hostname, hostname());
    assert_eq!(rec["host"].as_str(), Some(hostname().as_str()));
    assert_eq!(m.app_name, "pcguard");
    assert_eq!(m.procid, daemon.pid().to_string());
    assert_eq!(m.msgid, "no_rule");
    assert_eq!(m.structured_data, "-");
    assert_eq!(&record, rec, "MSG is the file's record");
    assert_eq!(record["schema"], 1);
    assert_eq!(record["event_type"], "unexpected_flow");
    let scrape = daemon.scrape()?;
    assert_eq!(metric(&scrape, "pcguard_audit_syslog_dropped_total", &[]), Some(0.0), "nothing dropped");
    assert!(daemon.stop()?.success());
    Ok(())
}

/// With no receiver at the socket the daemon still writes the file, and
/// counts what syslog did not take.
#[test]
fn a_missing_syslog_receiver_drops_and_counts() -> Result<()> {
    let socket = tmp().join("audit-syslog-none.sock");
    let _ = std::fs::remove_file(&socket);
    let env =
        TestLab::up("pa2", tmp(), &config(&format!("syslog = true\nsyslog_socket = \"{}\"\n", socket.display())))?;
    let daemon = env.start(&[])?;
    ensure!(!ws_reaches(&env.lab, 9999)?, "port 9999 has no rule");
    daemon.wait_audit("the flow to 9999", |r| r.iter().any(|x| x["local"]["port"] == 9999))?;
    let before = daemon.audit()?.len() as f64;
    let dropped = metric(&daemon.scrape()?, "pcguard_audit_syslog_dropped_total", &[]).unwrap_or(0.0);
    let after = daemon.audit()?.len() as f64;
    assert!(
        before >= 1.0 && (before..=after).contains(&dropped),
        "every record written to the file was dropped for syslog: {dropped} dropped, {before}..{after} written"
    );
    assert!(daemon.log_text().contains("does not take audit records"), "{}", daemon.log_text());
    assert!(daemon.stop()?.success());
    Ok(())
}

/// `format = "ecs"`: the file holds ECS documents (validated against
/// docs/audit-ecs.schema.json by the harness) and `pcguard flows` reads
/// them like the json format.
#[test]
fn the_ecs_format_maps_flows_to_ecs_fields() -> Result<()> {
    let env = TestLab::up("pa3", tmp(), &config("format = \"ecs\"\n"))?;
    let daemon = env.start(&[])?;
    ensure!(!ws_reaches(&env.lab, 9999)?, "port 9999 has no rule");
    let recs = daemon.wait_audit("the flow to 9999", |r| r.iter().any(|x| x["destination"]["port"] == 9999))?;
    let r = recs.iter().find(|x| x["destination"]["port"] == 9999).unwrap();
    assert_eq!(r["ecs"]["version"].as_str().map(|v| v.starts_with("8.")), Some(true), "{r}");
    assert_eq!(r["event"]["kind"], "alert");
    assert_eq!(r["event"]["action"], "no_rule");
    assert_eq!(r["event"]["type"], serde_json::json!(["connection", "denied"]));
    assert_eq!(r["event"]["severity"], 4);
    assert_eq!(r["network"]["direction"], "ingress");
    assert_eq!(r["network"]["transport"], "tcp");
    assert_eq!(r["destination"]["ip"], addr(SERVER).to_string());
    assert_eq!(r["observer"]["ingress"]["interface"]["name"], SERVER_IF);
    assert_eq!(r["host"]["name"].as_str(), Some(hostname().as_str()));
    assert_eq!(r["rule"]["name"], "no_rule");

    let out = std::process::Command::new(pcguard_bin()?)
        .args(["flows", "--no-follow", "--port", "9999", "-n", "1", "--log"])
        .arg(&daemon.audit_log)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    assert_eq!(text.lines().count(), 1, "{text}");
    let line = text.lines().next().unwrap();
    assert!(line.starts_with(r["@timestamp"].as_str().unwrap()), "{line}");
    assert!(line.contains(&format!(" -> {}:9999", addr(SERVER))) && line.contains("[dropped]"), "{line}");
    assert!(daemon.stop()?.success());
    Ok(())
}
