//! Every record kind, in both formats, against the published JSON Schemas
//! (docs/audit.schema.json, docs/audit-ecs.schema.json); broken records
//! are rejected, so the e2e tests' validation can fail.

use std::{collections::HashSet, time::SystemTime};

use serde_json::Value;

use super::*;
use crate::{
    flows::{DnsRefusal, Endpoint},
    gate::Count,
};

fn validator(name: &str) -> jsonschema::Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs").join(name);
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::options().should_validate_formats(true).build(&schema).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn errors(v: &jsonschema::Validator, rec: &Value) -> Vec<String> {
    v.iter_errors(rec).map(|e| format!("{} at {}", e, e.instance_path)).collect()
}

fn flow(reason: &str, verdict: &str, severity: &str) -> AuditRecord {
    AuditRecord {
        ts: "2026-11-27T10:00:00.123Z".into(),
        severity: severity.into(),
        reason: reason.into(),
        direction: "inbound".into(),
        verdict: verdict.into(),
        protocol: "tcp".into(),
        local: Endpoint { addr: "10.77.0.1".parse().unwrap(), port: 9999 },
        remote: Endpoint { addr: "10.77.0.2".parse().unwrap(), port: 40000 },
        peer_classes: vec!["workstations".into()],
        port_rules: vec![],
        interface: "pcg0".into(),
        tcp_flags: "SYN".into(),
        packet_bytes: 74,
        dns_name: None,
        dns_address: None,
        dns_refusal: None,
        suppressed: None,
        repeats: 0,
        malformed: None,
    }
}

/// One record of every kind and shape the daemon writes.
fn records() -> (Vec<AuditRecord>, SummaryRecord) {
    let mut outbound = flow("outbound_to_workstation", "would_drop", "alert");
    outbound.direction = "outbound".into();
    outbound.local.port = 41234;
    outbound.remote = Endpoint { addr: "fd00::2".parse().unwrap(), port: 445 };
    outbound.local.addr = "fd00::1".parse().unwrap();
    outbound.repeats = 3;
    outbound.suppressed = Some(2);
    outbound.port_rules = vec!["smb".into()];
    let mut malformed = flow("malformed", "dropped", "warning");
    malformed.malformed = Some("l4_truncated".into());
    malformed.tcp_flags = String::new();
    malformed.protocol = "ip-47".into();
    let mut icmp = flow("no_rule", "dropped", "warning");
    icmp.protocol = "icmpv6".into();
    icmp.tcp_flags = String::new();
    let policy = {
        let text = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\n\
                    dns = [\"10.0.0.53\"]\n[features]\nges = true\n";
        crate::policy::compile(&crate::config::parse(text, "t.toml").unwrap()).unwrap()
    };
    let dns = AuditRecord::from_dns_refusal(
        &DnsRefusal {
            resolver: "10.0.0.53".parse().unwrap(),
            server_port: 40000,
            name: "mf.cloud.papercut.com".into(),
            addr: "10.1.2.3".parse().unwrap(),
            refusal: "local_class",
            msg_len: 80,
            suppressed: 0,
        },
        &policy,
        SystemTime::now(),
    );
    let summary = SummaryRecord {
        ts: "2026-11-27T10:00:10.000Z".into(),
        event: "audit_summary",
        severity: "warning",
        period_seconds: 10,
        deduplicated: 5,
        over_ceiling: 7,
        by_reason: vec![Count { key: "no_rule/inbound".into(), records: 12 }],
        top_sources: vec![Count { key: "192.0.2.1".into(), records: 12 }],
        top_ports: vec![Count { key: "tcp/22".into(), records: 12 }],
        distinct_sources: 1,
        more_sources: 0,
        kernel_rate_limited: 3,
        kernel_ring_dropped: 0,
        flow_records_over_ceiling: 0,
    };
    (vec![flow("no_rule", "dropped", "warning"), outbound, malformed, icmp, dns], summary)
}

fn encoded(format: AuditFormat) -> Vec<Value> {
    let enc = Encoder::new(format, "print-1".into());
    let (flows, summary) = records();
    let now = SystemTime::now();
    let mut lines: Vec<Vec<u8>> = flows.iter().map(|r| enc.flow(r, now).line).collect();
    lines.push(enc.summary(&summary, now).line);
    lines.iter().map(|l| serde_json::from_slice(l).unwrap()).collect()
}

#[test]
fn every_record_kind_validates_against_the_json_schema() {
    let v = validator("audit.schema.json");
    let recs = encoded(AuditFormat::Json);
    for rec in &recs {
        assert_eq!(errors(&v, rec), Vec::<String>::new(), "{rec}");
        assert_eq!(rec["schema"], 1);
        assert_eq!(rec["host"], "print-1");
    }
    let types: Vec<&str> = recs.iter().map(|r| r["event_type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["unexpected_flow", "unexpected_flow", "unexpected_flow", "unexpected_flow", "dns_poisoning", "audit_summary"]
    );
    let codes: Vec<u64> = recs.iter().map(|r| r["severity_code"].as_u64().unwrap()).collect();
    assert_eq!(codes, [4, 1, 4, 4, 1, 4]);
    // The envelope comes first; the record's own fields keep their names.
    let first = serde_json::to_string(&recs[0]).unwrap();
    assert!(first.contains("\"reason\":\"no_rule\"") && first.contains("\"local\":{\"addr\":\"10.77.0.1\""), "{first}");
}

#[test]
fn every_record_kind_validates_against_the_ecs_schema() {
    let v = validator("audit-ecs.schema.json");
    let recs = encoded(AuditFormat::Ecs);
    for rec in &recs {
        assert_eq!(errors(&v, rec), Vec::<String>::new(), "{rec}");
        assert_eq!(rec["ecs"]["version"], ECS_VERSION);
        assert_eq!(rec["host"]["name"], "print-1");
    }
    // An inbound flow: the peer is the source, this server the destination.
    let r = &recs[0];
    assert_eq!(
        (&r["source"]["ip"], &r["source"]["port"], &r["destination"]["ip"], &r["destination"]["port"]),
        (&Value::from("10.77.0.2"), &Value::from(40000), &Value::from("10.77.0.1"), &Value::from(9999))
    );
    assert_eq!(r["network"]["direction"], "ingress");
    assert_eq!(r["observer"]["ingress"]["interface"]["name"], "pcg0");
    assert_eq!(r["event"]["type"], serde_json::json!(["connection", "denied"]));
    assert_eq!((r["event"]["severity"].as_u64(), r["event"]["action"].as_str()), (Some(4), Some("no_rule")));
    // An outbound one: the other way round, egress.
    let r = &recs[1];
    assert_eq!((r["source"]["ip"].as_str(), r["destination"]["port"].as_u64()), (Some("fd00::1"), Some(445)));
    assert_eq!((r["network"]["direction"].as_str(), r["network"]["type"].as_str()), (Some("egress"), Some("ipv6")));
    assert_eq!(r["observer"]["egress"]["interface"]["name"], "pcg0");
    assert_eq!(r["event"]["type"], serde_json::json!(["connection", "allowed"]));
    assert_eq!(recs[3]["network"]["transport"], "ipv6-icmp");
    assert_eq!(recs[4]["dns"]["question"]["name"], "mf.cloud.papercut.com");
    assert_eq!(recs[4]["dns"]["resolved_ip"], serde_json::json!(["10.1.2.3"]));
    assert_eq!(
        (recs[5]["event"]["kind"].as_str(), recs[5]["pcguard"]["summary"]["over_ceiling"].as_u64()),
        (Some("metric"), Some(7))
    );
}

#[test]
fn broken_records_are_rejected() {
    let v = validator("audit.schema.json");
    let recs = encoded(AuditFormat::Json);
    let broken = |rec: &Value, f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut r = rec.clone();
        f(r.as_object_mut().unwrap());
        errors(&v, &r)
    };
    let missing = broken(&recs[0], &|r| {
        r.remove("event_id");
    });
    assert!(missing.iter().any(|e| e.contains("event_id")), "{missing:?}");
    let wrong_type = broken(&recs[0], &|r| {
        r.insert("packet_bytes".into(), "74".into());
    });
    assert!(!wrong_type.is_empty());
    assert!(
        !broken(&recs[0], &|r| {
            r.insert("local".into(), serde_json::json!({"addr": "not-an-ip", "port": 1}));
        })
        .is_empty()
    );
    assert!(
        !broken(&recs[0], &|r| {
            r.insert("undocumented".into(), 1.into());
        })
        .is_empty()
    );
    assert!(
        !broken(&recs[0], &|r| {
            r.insert("severity_code".into(), 6.into());
        })
        .is_empty(),
        "a code that is not the severity's"
    );
    assert!(
        !broken(&recs[4], &|r| {
            r.remove("dns_name");
        })
        .is_empty(),
        "dns_poisoning without its name"
    );
    assert!(
        !broken(&recs[5], &|r| {
            r.remove("over_ceiling");
        })
        .is_empty(),
        "a summary without a count"
    );
    assert!(
        !broken(&recs[5], &|r| {
            r.insert("event_type".into(), "flow_end".into());
        })
        .is_empty(),
        "an event type the schema does not know"
    );
    // Records from before schema 1 have no envelope.
    assert!(
        !broken(&recs[0], &|r| {
            r.remove("schema");
        })
        .is_empty()
    );

    let ecs = validator("audit-ecs.schema.json");
    let mut r = encoded(AuditFormat::Ecs)[0].clone();
    r["network"]["direction"] = "sideways".into();
    assert!(!errors(&ecs, &r).is_empty());
    let mut r = encoded(AuditFormat::Ecs)[0].clone();
    r.as_object_mut().unwrap().remove("source");
    assert!(!errors(&ecs, &r).is_empty());
    // A json-format record is not an ECS one.
    assert!(!errors(&ecs, &recs[0]).is_empty());
}

#[test]
fn event_ids_are_unique_time_ordered_uuid7s() {
    let ids = EventIds::new();
    let other = EventIds::new();
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_237_600_123);
    let mut seen = HashSet::new();
    for _ in 0..10_000 {
        assert!(seen.insert(ids.next(t)));
        assert!(seen.insert(other.next(t)), "another process's ids differ");
    }
    let id = ids.next(t);
    assert_eq!(&id[..13], "019ac4c1-657b", "48 bits of milliseconds: {id}");
    assert_eq!(&id[14..15], "7");
    assert!("89ab".contains(&id[19..20]));
    let later = ids.next(t + std::time::Duration::from_millis(1));
    assert!(later > id, "ordered by time");
}

#[test]
fn severity_codes_are_syslogs() {
    assert_eq!(
        ["emergency", "alert", "critical", "error", "warning", "notice", "info", "debug"].map(severity_code),
        [0, 1, 2, 3, 4, 5, 6, 7]
    );
}

#[test]
fn flows_reads_ecs_records_back_as_they_were() {
    let enc = Encoder::new(AuditFormat::Ecs, "print-1".into());
    let (flows, summary) = records();
    for rec in &flows {
        let line = String::from_utf8(enc.flow(rec, SystemTime::now()).line).unwrap();
        assert_eq!(crate::flows::parse_line(&line), crate::flows::Line::Flow(Box::new(rec.clone())), "{line}");
    }
    let line = String::from_utf8(enc.summary(&summary, SystemTime::now()).line).unwrap();
    assert_eq!(crate::flows::parse_line(&line), crate::flows::Line::Other);
}

/// `pcguard flows` over a log written by every version and format: records
/// from before schema 1, schema 1 in `json` and in `ecs`, a summary and a
/// line that is no record.
#[test]
fn flows_filters_first_then_takes_the_last_n_of_every_format() {
    use crate::flows::{Filter, follow, parse_time};
    let at = |t: &str, reason: &str, port: u16| {
        let mut r = flow(reason, "dropped", if reason == "outbound_to_workstation" { "alert" } else { "warning" });
        r.ts = format!("2026-11-27T{t}.000Z");
        r.local.port = port;
        r
    };
    let json = Encoder::new(AuditFormat::Json, "print-1".into());
    let ecs = Encoder::new(AuditFormat::Ecs, "print-1".into());
    let now = SystemTime::now();
    let line = |e: Encoded| String::from_utf8(e.line).unwrap();
    let pre_v1 = serde_json::to_string(&at("09:00:00", "no_rule", 9999)).unwrap();
    let alert = line(json.flow(&at("09:30:00", "outbound_to_workstation", 445), now));
    let (_, mut summary) = records();
    summary.ts = "2026-11-27T09:31:00.000Z".into();
    let lines = [
        pre_v1.clone(),
        alert.clone(),
        line(json.summary(&summary, now)),
        "not a record".to_string(),
        line(json.flow(&at("10:00:00", "no_rule", 9998), now)),
        line(ecs.flow(&at("10:30:00", "no_rule", 9997), now)),
    ];
    let dir = std::env::temp_dir().join(format!("pcguard-flows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flows.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let run = |filter: Filter, n: usize, as_json: bool| {
        let mut out = Vec::new();
        follow(std::slice::from_ref(&path), &filter, n, false, as_json, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let no_rule = || Filter { reason: Some("no_rule".into()), ..Default::default() };
    let human = |t: &str, port: u16| {
        format!(
            "2026-11-27T{t}.000Z WARNING no_rule                  inbound  tcp 10.77.0.2:40000 -> 10.77.0.1:{port}  peer=workstations rules=- if=pcg0  [dropped]\n"
        )
    };
    // -n counts the records that match, not the lines of the file.
    assert_eq!(run(no_rule(), 1, false), human("10:30:00", 9997));
    assert_eq!(run(no_rule(), 2, false), human("10:00:00", 9998) + &human("10:30:00", 9997));
    assert_eq!(
        run(no_rule(), 20, false),
        human("09:00:00", 9999) + &human("10:00:00", 9998) + &human("10:30:00", 9997)
    );
    assert_eq!(run(no_rule(), 0, false), "");
    // --json prints the line as written.
    assert_eq!(run(Filter { severity: Some("alert".into()), ..Default::default() }, 5, true), format!("{alert}\n"));
    assert_eq!(run(Filter { port: Some(9999), ..Default::default() }, 5, true), format!("{pre_v1}\n"));
    // --since / --until, inclusive; summaries are not flows.
    let t = |s: &str| parse_time(s, now).unwrap();
    let window =
        Filter { since: Some(t("2026-11-27T09:30:00Z")), until: Some(t("2026-11-27T10:00:00Z")), ..Default::default() };
    let out = run(window, 20, false);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.starts_with("2026-11-27T09:30:00.000Z ALERT   outbound_to_workstation"), "{out}");
    assert!(out.ends_with(&human("10:00:00", 9998)), "{out}");
    let since = Filter { since: Some(t("2026-11-27T10:15:00Z")), ..no_rule() };
    assert_eq!(run(since, 20, false), human("10:30:00", 9997));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn since_and_until_take_durations_ago_or_rfc3339_times() {
    use std::time::Duration;

    use crate::flows::parse_time;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_237_600);
    assert_eq!(parse_time("2h", now), Ok(now - Duration::from_secs(7200)));
    assert_eq!(parse_time("90s", now), Ok(now - Duration::from_secs(90)));
    assert_eq!(parse_time("1d 12h", now), Ok(now - Duration::from_secs(36 * 3600)));
    assert_eq!(parse_time("2025-11-27T10:00:00Z", now), Ok(now));
    assert_eq!(parse_time("2025-11-27T10:00:00.500Z", now), Ok(now + Duration::from_millis(500)));
    let e = parse_time("yesterday", now).unwrap_err();
    assert_eq!(
        e,
        "\"yesterday\" is neither a duration (e.g. 90s, 2h, 1d) nor an RFC 3339 UTC time (e.g. 2026-11-27T10:00:00Z)"
    );
}

/// The example records of the README and docs/audit.md are records the
/// schemas accept.
#[test]
fn documented_examples_validate() {
    let json = validator("audit.schema.json");
    let ecs = validator("audit-ecs.schema.json");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for doc in ["README.md", "docs/audit.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for line in
            text.lines().filter(|l| l.starts_with('{') && (l.contains("\"schema\":1") || l.contains("\"@timestamp\"")))
        {
            let rec: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{doc}: {e}: {line}"));
            let v = if rec.get("@timestamp").is_some() { &ecs } else { &json };
            assert_eq!(errors(v, &rec), Vec::<String>::new(), "{doc}: {line}");
            checked += 1;
        }
    }
    assert_eq!(checked, 7, "README: 2 records, docs/audit.md: 5");
}

/// A reload's format and syslog socket apply to the next record; the file
/// stays the same.
#[test]
fn the_sink_takes_a_reloads_format_and_syslog() {
    let dir = std::env::temp_dir().join(format!("pcguard-sink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = Output { path: dir.join("flows.jsonl"), format: AuditFormat::Json, syslog: None };
    let mut sink = AuditSink::open(&out, None).unwrap();
    let rec = flow("no_rule", "dropped", "warning");
    sink.write(&rec).unwrap();
    let socket = dir.join("log.sock");
    let rx = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    let dropped = Counter::default();
    sink.count_syslog_drops(dropped.clone());
    let with_syslog =
        Output { format: AuditFormat::Ecs, syslog: Some((socket.clone(), Facility::Authpriv)), ..out.clone() };
    sink.configure(AuditFormat::Ecs, AuditSink::syslog(&with_syslog).unwrap());
    sink.write(&rec).unwrap();
    let text = std::fs::read_to_string(&out.path).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!((lines[0]["schema"].as_u64(), lines[0].get("@timestamp")), (Some(1), None));
    assert_eq!(lines[1]["pcguard"]["schema"], 1);
    assert_ne!(lines[0]["event_id"], lines[1]["event"]["id"]);
    let mut buf = [0u8; 8192];
    let n = rx.recv(&mut buf).unwrap();
    let msg = std::str::from_utf8(&buf[..n]).unwrap();
    // authpriv (10) * 8 + warning (4).
    let head = format!("<84>1 2026-11-27T10:00:00.123Z {} pcguard {} no_rule - ", hostname(), std::process::id());
    assert!(msg.starts_with(&head), "{msg}");
    assert_eq!(serde_json::from_str::<Value>(&msg[head.len()..]).unwrap(), lines[1]);
    // The receiver goes away: records are dropped and counted, the file
    // is still written.
    drop(rx);
    std::fs::remove_file(&socket).unwrap();
    sink.write(&rec).unwrap();
    assert_eq!(dropped.get(), 1);
    assert_eq!(std::fs::read_to_string(&out.path).unwrap().lines().count(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `flow_start` and a `flow_end` record of an inbound TCP flow, as the
/// daemon builds them from the kernel's `FlowRecord`s.
fn flow_records() -> Vec<crate::flowrec::FlowRecordOut> {
    use pcguard_common::{CT_FLAG_AUDITED, CtEntry, FAMILY_V4, FlowKey, FlowRecord, IPPROTO_TCP};
    let text = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\n\
                workstations = [\"10.77.0.0/24\"]\n[features]\nweb = true\n[audit]\nallowed = \"all\"\n";
    let policy = crate::policy::compile(&crate::config::parse(text, "t.toml").unwrap()).unwrap();
    let rule = policy.rules.iter().position(|r| !r.id.is_empty()).unwrap() as u16;
    let mut key =
        FlowKey { family: FAMILY_V4, proto: IPPROTO_TCP, local_port: 9191, remote_port: 40000, ..Default::default() };
    key.local_addr[..4].copy_from_slice(&[10, 77, 0, 1]);
    key.remote_addr[..4].copy_from_slice(&[10, 77, 0, 2]);
    let now = crate::sys::ktime_coarse_ns();
    let entry = CtEntry {
        last_seen_ns: now,
        rule,
        flow_dir: 0,
        flags: CT_FLAG_AUDITED,
        started_ns: now - 2_000_000_000,
        packets_in: 700,
        bytes_in: 1_050_000,
        packets_out: 350,
        bytes_out: 23_100,
        ..Default::default()
    };
    let start = FlowRecord {
        ts_ns: now - 2_000_000_000,
        key,
        entry: CtEntry { packets_in: 1, bytes_in: 74, packets_out: 0, bytes_out: 0, ..entry },
        ifindex: 1,
        end: 0,
        _pad: [0; 3],
    };
    let end = FlowRecord { ts_ns: now, key, entry, ifindex: 1, end: pcguard_common::FLOW_END_FIN, _pad: [0; 3] };
    let idle = crate::flowrec::FlowRecordOut::idle(&key, &entry, &policy);
    vec![
        crate::flowrec::FlowRecordOut::from_kernel(&start, &policy),
        crate::flowrec::FlowRecordOut::from_kernel(&end, &policy),
        idle,
    ]
}

#[test]
fn flow_records_validate_in_both_formats() {
    let recs = flow_records();
    let now = SystemTime::now();
    let json = Encoder::new(AuditFormat::Json, "print-1".into());
    let v = validator("audit.schema.json");
    let lines: Vec<Value> =
        recs.iter().map(|r| serde_json::from_slice(&json.flow_record(r, now).line).unwrap()).collect();
    for rec in &lines {
        assert_eq!(errors(&v, rec), Vec::<String>::new(), "{rec}");
        assert_eq!((rec["severity"].as_str(), rec["severity_code"].as_u64()), (Some("info"), Some(6)));
        assert_eq!(rec["local"]["port"], 9191);
    }
    let types: Vec<&str> = lines.iter().map(|r| r["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["flow_start", "flow_end", "flow_end"]);
    assert!(lines[0].get("bytes_in").is_none(), "a start carries no counters: {}", lines[0]);
    let end = &lines[1];
    assert_eq!((end["bytes_in"].as_u64(), end["packets_out"].as_u64()), (Some(1_050_000), Some(350)));
    assert_eq!((end["end_reason"].as_str(), end["direction"].as_str()), (Some("fin"), Some("inbound")));
    let ms = end["duration_ms"].as_u64().unwrap();
    assert!((1900..=2100).contains(&ms), "duration {ms}");
    assert_eq!((lines[2]["end_reason"].as_str(), lines[2]["interface"].as_str()), (Some("idle"), Some("")));
    // A flow_end without its counters, or with an unknown reason, is not one.
    for (field, value) in [("bytes_in", Value::Null), ("end_reason", Value::from("timeout"))] {
        let mut broken = end.clone();
        match value {
            Value::Null => {
                broken.as_object_mut().unwrap().remove(field);
            }
            v => broken[field] = v,
        }
        assert!(!errors(&v, &broken).is_empty(), "{field}: {broken}");
    }

    let ecs = Encoder::new(AuditFormat::Ecs, "print-1".into());
    let v = validator("audit-ecs.schema.json");
    let lines: Vec<Value> =
        recs.iter().map(|r| serde_json::from_slice(&ecs.flow_record(r, now).line).unwrap()).collect();
    for rec in &lines {
        assert_eq!(errors(&v, rec), Vec::<String>::new(), "{rec}");
    }
    assert_eq!(lines[0]["event"]["type"], serde_json::json!(["connection", "start"]));
    let end = &lines[1];
    assert_eq!(end["event"]["type"], serde_json::json!(["connection", "end"]));
    // Inbound: the peer is the source; it sent the bytes toward this server.
    assert_eq!((end["source"]["ip"].as_str(), end["source"]["bytes"].as_u64()), (Some("10.77.0.2"), Some(1_050_000)));
    assert_eq!(end["destination"]["bytes"], 23_100);
    assert_eq!((end["network"]["bytes"].as_u64(), end["network"]["packets"].as_u64()), (Some(1_073_100), Some(1050)));
    let mut broken = end.clone();
    broken["source"].as_object_mut().unwrap().remove("bytes");
    assert!(!errors(&v, &broken).is_empty());
}
