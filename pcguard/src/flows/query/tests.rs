use std::io::Write as _;

use super::*;

/// A fresh directory under the system's temporary one.
fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcguard-flowquery-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unexpected(ts: &str, remote: &str, port: u16, direction: &str, bytes: u32, repeats: u32, rules: &[&str]) -> String {
    let rules: Vec<String> = rules.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        r#"{{"schema":1,"event_type":"unexpected_flow","event_id":"e","host":"h","severity_code":4,"ts":"{ts}","severity":"warning","reason":"no_rule","direction":"{direction}","verdict":"dropped","protocol":"tcp","local":{{"addr":"10.0.0.1","port":{port}}},"remote":{{"addr":"{remote}","port":40000}},"peer_classes":["workstations"],"port_rules":[{}],"interface":"eth0","tcp_flags":"SYN","packet_bytes":{bytes},"repeats":{repeats}}}"#,
        rules.join(",")
    )
}

fn allowed(ty: &str, ts: &str, remote: &str, rport: u16, port: u16, rule: &str) -> String {
    format!(
        r#"{{"schema":1,"event_type":"{ty}","event_id":"e","host":"h","severity":"info","severity_code":6,"ts":"{ts}","direction":"inbound","protocol":"tcp","local":{{"addr":"10.0.0.1","port":{port}}},"remote":{{"addr":"{remote}","port":{rport}}},"rule":"{rule}","peer_classes":["admins","any"],"interface":"eth0""#
    ) + "}"
}

#[allow(clippy::too_many_arguments)]
fn flow_end(ts: &str, started: &str, remote: &str, rport: u16, port: u16, rule: &str, pin: u64, bin: u64) -> String {
    let start = allowed("flow_end", ts, remote, rport, port, rule);
    let start = start.strip_suffix('}').unwrap();
    format!(
        r#"{start},"started":"{started}","duration_ms":1000,"packets_in":{pin},"bytes_in":{bin},"packets_out":{},"bytes_out":{},"end_reason":"fin"}}"#,
        pin / 2,
        bin * 3
    )
}

fn write(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    if path.extension().is_some_and(|e| e == "gz") {
        let mut gz = flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap();
    } else {
        std::fs::write(path, text).unwrap();
    }
}

/// A live log, its plain `.1` and gzipped `.2.gz` (logrotate's compress +
/// delaycompress), and a file of another log next to them.
fn rotated_set(dir: &Path) -> PathBuf {
    let live = dir.join("flows.jsonl");
    // Oldest: an SSH flow starts here and ends in `.1`.
    write(
        &dir.join("flows.jsonl.2.gz"),
        &[
            unexpected("2026-11-25T08:00:00.000Z", "192.0.2.7", 9191, "inbound", 60, 0, &["web-http"]),
            allowed("flow_start", "2026-11-25T09:00:00.000Z", "192.0.2.9", 50000, 22, "admin-ssh"),
        ],
    );
    write(
        &dir.join("flows.jsonl.1"),
        &[
            flow_end(
                "2026-11-26T09:00:00.000Z",
                "2026-11-25T09:00:00.000Z",
                "192.0.2.9",
                50000,
                22,
                "admin-ssh",
                10,
                1000,
            ),
            unexpected("2026-11-26T10:00:00.000Z", "192.0.2.7", 9191, "inbound", 60, 4, &["web-http"]),
        ],
    );
    write(
        &live,
        &[
            allowed("flow_start", "2026-11-27T10:00:00.000Z", "192.0.2.9", 50001, 22, "admin-ssh"),
            flow_end(
                "2026-11-27T10:00:02.000Z",
                "2026-11-27T10:00:00.000Z",
                "192.0.2.9",
                50001,
                22,
                "admin-ssh",
                4,
                400,
            ),
            // An end whose start is not in the set: a flow of its own.
            flow_end(
                "2026-11-27T11:00:00.000Z",
                "2026-11-27T10:59:00.000Z",
                "192.0.2.8",
                50002,
                443,
                "web-https",
                6,
                600,
            ),
            unexpected("2026-11-27T12:00:00.000Z", "192.0.2.7", 445, "outbound", 74, 0, &[]),
            // A flow still open at the end of the log.
            allowed("flow_start", "2026-11-27T12:30:00.000Z", "192.0.2.8", 50003, 443, "web-https"),
        ],
    );
    write(
        &dir.join("other.jsonl.1"),
        &[unexpected("2026-11-27T12:00:00.000Z", "198.51.100.1", 1, "inbound", 1, 0, &[])],
    );
    live
}

fn filter(kind: Kind) -> Filter {
    Filter { kind, ..Default::default() }
}

fn row(keys: &[&str], hosts: Option<u64>, c: [u64; 5], first: &str, last: &str) -> Row {
    Row {
        keys: keys.iter().map(|k| k.to_string()).collect(),
        hosts,
        counts: Counts {
            flows: c[0],
            packets_in: c[1],
            bytes_in: c[2],
            packets_out: c[3],
            bytes_out: c[4],
            first_seen: first.into(),
            last_seen: last.into(),
        },
    }
}

#[test]
fn the_set_is_the_live_log_and_its_rotated_siblings_oldest_first() {
    let dir = tempdir("set");
    let live = rotated_set(&dir);
    let set = log_set(std::slice::from_ref(&live)).unwrap();
    let names: Vec<String> = set.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["flows.jsonl.2.gz", "flows.jsonl.1", "flows.jsonl"]);
    // A rotated file alone; a glob; each file once.
    assert_eq!(log_set(&[dir.join("flows.jsonl.1")]).unwrap(), [dir.join("flows.jsonl.1")]);
    let globbed = log_set(&[dir.join("*.jsonl*"), live.clone()]).unwrap();
    let names: Vec<String> = globbed.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["flows.jsonl.2.gz", "flows.jsonl.1", "flows.jsonl", "other.jsonl.1"]);
    let err = log_set(&[dir.join("nothing*")]).unwrap_err().to_string();
    assert!(err.contains("nothing*: no file matches"), "{err}");
    // A live log that does not exist and has no siblings: opening it fails
    // with its name.
    let missing = log_set(&[dir.join("missing.jsonl")]).unwrap();
    let err = format!("{:#}", summarize(&missing, &filter(Kind::All), vec![Key::Remote]).err().unwrap());
    assert!(err.contains("missing.jsonl"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_summary_counts_flows_packets_and_bytes_across_rotated_and_gzipped_files() {
    let dir = tempdir("summary");
    let set = log_set(&[rotated_set(&dir)]).unwrap();
    let s = summarize(&set, &filter(Kind::All), Key::parse_list("by=remote,port").unwrap()).unwrap();
    assert_eq!(s.records, 9);
    let (rows, total) = s.rows();
    assert_eq!(
        rows,
        [
            // The flow that started in .2.gz and ended in .1 is one flow; its
            // first seen is its start.
            row(
                &["192.0.2.9", "22"],
                None,
                [2, 14, 1400, 7, 4200],
                "2026-11-25T09:00:00.000Z",
                "2026-11-27T10:00:02.000Z"
            ),
            // The open flow counts, without volumes yet.
            row(
                &["192.0.2.8", "443"],
                None,
                [2, 6, 600, 3, 1800],
                "2026-11-27T10:59:00.000Z",
                "2026-11-27T12:30:00.000Z"
            ),
            // Unexpected: 1 + repeats packets, packet_bytes bytes.
            row(
                &["192.0.2.7", "9191"],
                None,
                [2, 6, 120, 0, 0],
                "2026-11-25T08:00:00.000Z",
                "2026-11-26T10:00:00.000Z"
            ),
            row(&["192.0.2.7", "445"], None, [1, 0, 0, 1, 74], "2026-11-27T12:00:00.000Z", "2026-11-27T12:00:00.000Z"),
        ]
    );
    assert_eq!(
        total,
        row(&[], Some(3), [7, 26, 2120, 11, 6074], "2026-11-25T08:00:00.000Z", "2026-11-27T12:30:00.000Z")
    );
    let table = s.table();
    assert_eq!(
        table.lines().next().unwrap(),
        "remote           local_port  flows  packets_in  bytes_in  packets_out  bytes_out  first_seen                last_seen"
    );
    assert!(
        table.lines().last().unwrap().starts_with("total (3 hosts)              7      26          2120"),
        "{table}"
    );
    let json = s.to_json();
    assert_eq!(json["by"], serde_json::json!(["remote", "local_port"]));
    assert_eq!(json["rows"][0]["remote"], "192.0.2.9");
    assert_eq!(json["rows"][0]["local_port"], 22);
    assert_eq!(json["rows"][0]["bytes_out"], 4200);
    assert!(json["rows"][0].get("hosts").is_none(), "remote is a key: no hosts column");
    assert_eq!((json["total"]["flows"].as_u64(), json["total"]["hosts"].as_u64()), (Some(7), Some(3)));

    // Without remote as a key: distinct remotes per row.
    let s = summarize(&set, &filter(Kind::All), Key::parse_list("rule,event_type").unwrap()).unwrap();
    let (rows, _) = s.rows();
    let brief: Vec<(Vec<String>, Option<u64>, u64)> =
        rows.into_iter().map(|r| (r.keys, r.hosts, r.counts.flows)).collect();
    let k = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
    assert_eq!(
        brief,
        [
            // Grouped by event type, a start and its end are in different
            // groups: each counts its records. Most flows, then most bytes.
            (k("admin-ssh", "flow_end"), Some(1), 2),
            (k("web-http", "unexpected_flow"), Some(1), 2),
            (k("admin-ssh", "flow_start"), Some(1), 2),
            (k("web-https", "flow_end"), Some(1), 1),
            (k("-", "unexpected_flow"), Some(1), 1),
            (k("web-https", "flow_start"), Some(1), 1),
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn filters_select_by_type_rule_time_and_port() {
    let dir = tempdir("filters");
    let set = log_set(&[rotated_set(&dir)]).unwrap();
    let flows = |f: Filter| -> (u64, u64) {
        let s = summarize(&set, &f, vec![Key::Remote]).unwrap();
        (s.records, s.rows().1.counts.flows)
    };
    assert_eq!(flows(filter(Kind::Unexpected)), (3, 3), "the default: unexpected records only");
    assert_eq!(flows(filter(Kind::Allowed)), (6, 4));
    assert_eq!(flows(Filter { rule: Some("admin-ssh".into()), ..filter(Kind::All) }), (4, 2));
    // Globs; an unexpected record matches by its port_rules.
    assert_eq!(flows(Filter { rule: Some("web-*".into()), ..filter(Kind::All) }), (4, 4));
    assert_eq!(flows(Filter { rule: Some("web-http".into()), ..filter(Kind::Unexpected) }), (2, 2));
    let t = |s: &str| humantime::parse_rfc3339_weak(s).unwrap();
    let day = Filter { since: Some(t("2026-11-27T00:00:00Z")), ..filter(Kind::Allowed) };
    assert_eq!(flows(day.clone()), (4, 3));
    let day = Filter { until: Some(t("2026-11-27T10:30:00Z")), ..day };
    assert_eq!(flows(day), (2, 1));
    assert_eq!(flows(Filter { port: Some(443), ..filter(Kind::All) }), (2, 2));
    assert_eq!(flows(Filter { addr: Some("192.0.2.7".parse().unwrap()), ..filter(Kind::All) }), (3, 3));
    assert_eq!(flows(Filter { peer_class: Some("admins".into()), ..filter(Kind::All) }), (6, 4));
    // The listing: filter first, then the last n, across files.
    let lines = tail(&set, &Filter { rule: Some("admin-ssh".into()), ..filter(Kind::All) }, 3).unwrap();
    let ts: Vec<&str> = lines.iter().map(|l| &l[l.find("\"ts\":\"").unwrap() + 6..][..24]).collect();
    assert_eq!(ts, ["2026-11-26T09:00:00.000Z", "2026-11-27T10:00:00.000Z", "2026-11-27T10:00:02.000Z"]);
    let human = render(&lines[2], false).unwrap();
    assert!(
        human.contains("flow_end")
            && human.contains("192.0.2.9:50001 -> 10.0.0.1:22")
            && human.contains("rule=admin-ssh"),
        "{human}"
    );
    assert!(human.ends_with("[fin after 1000 ms: in 4 pkts 400 B, out 2 pkts 1200 B]"), "{human}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lines_are_read_in_every_form_the_log_has_had() {
    // Pre-schema record, an escaped string, an ECS record, a summary, junk.
    let pre = r#"{"ts":"2026-11-26T20:31:02.114Z","severity":"alert","reason":"outbound_to_workstation","direction":"outbound","verdict":"dropped","protocol":"tcp","local":{"addr":"10.77.0.1","port":41234},"remote":{"addr":"10.77.0.2","port":445},"peer_classes":["workstations"],"port_rules":[],"interface":"pcg0","tcp_flags":"SYN","packet_bytes":74}"#;
    let escaped = allowed("flow_start", "2026-11-27T10:00:00.000Z", "192.0.2.9", 1, 22, "admin\\u002dssh");
    let ecs = r#"{"@timestamp":"2026-11-27T10:00:00.123Z","destination":{"ip":"10.77.0.1","port":9999},"ecs":{"version":"8.11.0"},"log":{"level":"warning"},"observer":{"ingress":{"interface":{"name":"pcg0"}}},"pcguard":{"direction":"inbound","event_type":"unexpected_flow","packet_bytes":74,"peer_classes":["workstations"],"port_rules":[],"protocol":"tcp","reason":"no_rule","schema":1,"tcp_flags":"SYN","verdict":"dropped"},"source":{"ip":"10.77.0.2","port":40000}}"#;
    // An ECS flow_end as the flow-record writer makes it (audit.rs,
    // `ecs_flow_record`).
    let ecs_end = r#"{"@timestamp":"2026-11-27T10:00:05.000Z","ecs":{"version":"8.11.0"},"event":{"kind":"event","category":["network"],"type":["connection","end"],"action":"flow_end","outcome":"success","severity":6,"id":"x","dataset":"pcguard.audit","module":"pcguard","start":"2026-11-27T10:00:01.000Z","end":"2026-11-27T10:00:05.000Z","duration":4000000000},"log":{"level":"info"},"host":{"name":"h"},"observer":{"hostname":"h","product":"pcguard","type":"firewall","vendor":"pcguard","ingress":{"interface":{"name":"eth0"}}},"labels":{"pcguard_event_type":"flow_end"},"message":"m","source":{"ip":"192.0.2.9","port":50000,"bytes":1000,"packets":10},"destination":{"ip":"10.0.0.1","port":22,"bytes":3000,"packets":8},"network":{"transport":"tcp","type":"ipv4","direction":"ingress","bytes":4000,"packets":18},"rule":{"name":"admin-ssh","ruleset":"pcguard"},"pcguard":{"schema":1,"event_type":"flow_end","direction":"inbound","protocol":"tcp","rule":"admin-ssh","peer_classes":["admins"],"started":"2026-11-27T10:00:01.000Z","duration_ms":4000,"packets_in":10,"bytes_in":1000,"packets_out":8,"bytes_out":3000,"end_reason":"fin"}}"#;
    let summary = r#"{"event":"audit_summary","ts":"2026-11-27T10:00:00.000Z","severity":"warning"}"#;
    let dir = tempdir("forms");
    let path = dir.join("flows.jsonl");
    write(
        &path,
        &[pre.into(), escaped, ecs.into(), ecs_end.into(), summary.into(), "{\"ts\": 1".into(), String::new()],
    );
    let s =
        summarize(std::slice::from_ref(&path), &filter(Kind::All), Key::parse_list("remote,rule,event_type").unwrap())
            .unwrap();
    let (rows, total) = s.rows();
    let keys: Vec<(Vec<String>, u64)> = rows.into_iter().map(|r| (r.keys, r.counts.flows)).collect();
    let k = |a: &str, b: &str, c: &str| vec![a.to_string(), b.to_string(), c.to_string()];
    assert_eq!(
        keys,
        [
            // The record from before schema 1 and the ECS one.
            (k("10.77.0.2", "-", "unexpected_flow"), 2),
            (k("192.0.2.9", "admin-ssh", "flow_end"), 1),
            // The rule's escaped `-`, read.
            (k("192.0.2.9", "admin-ssh", "flow_start"), 1),
        ]
    );
    assert_eq!(
        (s.records, total.counts.flows, total.counts.packets_out, total.counts.bytes_in, total.counts.bytes_out),
        (4, 4, 9, 1074, 3074)
    );
    assert_eq!(total.counts.first_seen, "2026-11-26T20:31:02.114Z");
    assert_eq!(total.counts.last_seen, "2026-11-27T10:00:05.000Z");
    let human = render(ecs_end, false).unwrap();
    assert!(
        human.contains("flow_end") && human.contains("192.0.2.9:50000 -> 10.0.0.1:22") && human.contains("if=eth0"),
        "{human}"
    );
    assert!(matches!(parse(b"{\"ts\": 1"), Parsed::Invalid(_)));
    assert!(matches!(parse(summary.as_bytes()), Parsed::Other));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn summary_keys_and_globs() {
    assert_eq!(Key::parse_list("by=remote,port").unwrap(), [Key::Remote, Key::LocalPort]);
    assert_eq!(
        Key::parse_list("local_port,rule,direction,peer_class,reason,event_type,protocol,remote_port").unwrap().len(),
        8
    );
    let e = Key::parse_list("by=remote,host").unwrap_err();
    assert!(e.contains("unknown summary key \"host\"") && e.contains("peer_class"), "{e}");
    assert!(Key::parse_list("remote,remote").unwrap_err().contains("twice"));
    assert!(Key::parse_list("by=").is_err());
    assert!(glob_match("web-*", "web-https") && glob_match("*", "") && glob_match("a?c", "abc"));
    assert!(!glob_match("web-*", "admin-ssh") && !glob_match("a?c", "ac") && !glob_match("ssh", "admin-ssh"));
    assert!(Kind::parse("everything").unwrap_err().contains("unexpected, allowed, all"));
}

#[test]
fn since_skips_rotated_files_last_written_before_it_never_the_live_one() {
    let dir = tempdir("skip");
    let live = rotated_set(&dir);
    let day = std::time::Duration::from_secs(86_400);
    let now = SystemTime::now();
    for (name, age) in [("flows.jsonl.2.gz", 3), ("flows.jsonl.1", 1), ("flows.jsonl", 5)] {
        File::options().write(true).open(dir.join(name)).unwrap().set_modified(now - age * day).unwrap();
    }
    let set = skip_old(log_set(std::slice::from_ref(&live)).unwrap(), Some(now - 2 * day));
    assert_eq!(set, [dir.join("flows.jsonl.1"), live.clone()]);
    assert_eq!(skip_old(set.clone(), None), set);
    std::fs::remove_dir_all(&dir).unwrap();
}
