//! `pcguard flows` (the binary) on a written log set: a live log, its plain
//! `.1` and gzipped `.2.gz` siblings as logrotate leaves them. No
//! privileges needed.

use std::{io::Write as _, path::Path, process::Command};

fn pcguard(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pcguard")).args(args).output().expect("pcguard runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn end(ts: &str, remote: &str, rport: u16, port: u16, rule: &str, bytes_in: u64, bytes_out: u64) -> String {
    format!(
        r#"{{"schema":1,"event_type":"flow_end","event_id":"e","host":"h","severity":"info","severity_code":6,"ts":"{ts}","direction":"inbound","protocol":"tcp","local":{{"addr":"10.0.0.1","port":{port}}},"remote":{{"addr":"{remote}","port":{rport}}},"rule":"{rule}","peer_classes":["admins"],"interface":"eth0","started":"{ts}","duration_ms":10,"packets_in":2,"bytes_in":{bytes_in},"packets_out":3,"bytes_out":{bytes_out},"end_reason":"fin"}}"#
    )
}

fn unexpected(ts: &str, remote: &str, port: u16) -> String {
    format!(
        r#"{{"schema":1,"event_type":"unexpected_flow","event_id":"e","host":"h","severity_code":4,"ts":"{ts}","severity":"warning","reason":"no_rule","direction":"inbound","verdict":"dropped","protocol":"tcp","local":{{"addr":"10.0.0.1","port":{port}}},"remote":{{"addr":"{remote}","port":40000}},"peer_classes":["any"],"port_rules":[],"interface":"eth0","tcp_flags":"SYN","packet_bytes":60}}"#
    )
}

fn write(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    if path.extension().is_some_and(|e| e == "gz") {
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap();
    } else {
        std::fs::write(path, text).unwrap();
    }
}

#[test]
fn flows_reads_the_rotated_set_filters_and_summarizes() {
    let dir = std::env::temp_dir().join(format!("pcguard-flows-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write(
        &dir.join("flows.jsonl.2.gz"),
        &[
            end("2026-11-25T10:00:00.000Z", "192.0.2.9", 50000, 22, "admin-ssh", 100, 1000),
            unexpected("2026-11-25T11:00:00.000Z", "192.0.2.66", 23),
        ],
    );
    write(
        &dir.join("flows.jsonl.1"),
        &[end("2026-11-26T10:00:00.000Z", "192.0.2.9", 50001, 22, "admin-ssh", 200, 2000)],
    );
    write(
        &dir.join("flows.jsonl"),
        &[
            end("2026-11-27T10:00:00.000Z", "192.0.2.8", 50002, 443, "web-https", 300, 3000),
            end("2026-11-27T10:05:00.000Z", "192.0.2.7", 50003, 443, "web-https", 400, 4000),
        ],
    );
    let log = dir.join("flows.jsonl").display().to_string();

    // The default stays what it was: unexpected records only, oldest first.
    let (ok, out, err) = pcguard(&["flows", "--no-follow", "--log", &log]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("192.0.2.66:40000 -> 10.0.0.1:23") && out.contains("[dropped]"), "{out}");

    // Allowed records of one rule, across the .gz and the .1.
    let (ok, out, err) =
        pcguard(&["flows", "--no-follow", "--json", "--type", "allowed", "--rule", "admin-*", "--log", &log]);
    assert!(ok, "{err}");
    let ts: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ts"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ts, ["2026-11-25T10:00:00.000Z", "2026-11-26T10:00:00.000Z"]);

    // The summary by rule: the table, then the same as JSON.
    let (ok, out, err) = pcguard(&["flows", "--type", "allowed", "--summary", "by=rule", "--log", &log]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "rule       flows  hosts  packets_in  bytes_in  packets_out  bytes_out  first_seen                last_seen\n\
         web-https  2      2      4           700       6            7000       2026-11-27T10:00:00.000Z  2026-11-27T10:05:00.000Z\n\
         admin-ssh  2      1      4           300       6            3000       2026-11-25T10:00:00.000Z  2026-11-26T10:00:00.000Z\n\
         total      4      3      8           1000      12           10000      2026-11-25T10:00:00.000Z  2026-11-27T10:05:00.000Z\n"
    );
    let (ok, out, err) = pcguard(&["flows", "--type", "all", "--summary", "by=remote,port", "--json", "--log", &log]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["by"], serde_json::json!(["remote", "local_port"]));
    assert_eq!(v["rows"].as_array().unwrap().len(), 4);
    assert_eq!(v["rows"][0]["remote"], "192.0.2.9");
    assert_eq!(v["rows"][0]["local_port"], 22);
    assert_eq!(v["rows"][0]["flows"], 2);
    assert_eq!(
        (v["total"]["flows"].as_u64(), v["total"]["hosts"].as_u64(), v["records"].as_u64()),
        (Some(5), Some(4), Some(5))
    );
    assert_eq!((v["total"]["bytes_in"].as_u64(), v["total"]["packets_in"].as_u64()), (Some(1060), Some(9)));

    // A time window (the whole .gz and .1 before it) and a glob.
    let glob = dir.join("flows.jsonl*").display().to_string();
    let (ok, out, err) = pcguard(&[
        "flows",
        "--type",
        "all",
        "--since",
        "2026-11-27T00:00:00Z",
        "--summary",
        "port",
        "--json",
        "--log",
        &glob,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["records"].as_u64(), v["rows"][0]["local_port"].as_u64()), (Some(2), Some(443)));

    // Bad input: named, nothing printed.
    let (ok, out, err) = pcguard(&["flows", "--summary", "by=remote,host", "--log", &log]);
    assert!(!ok && out.is_empty() && err.contains("--summary: unknown summary key \"host\""), "{err}");
    let (ok, _, err) = pcguard(&["flows", "--no-follow", "--log", &dir.join("nope*").display().to_string()]);
    assert!(!ok && err.contains("nope*: no file matches"), "{err}");
    let (ok, _, err) = pcguard(&["flows", "--type", "some", "--log", &log]);
    assert!(!ok && err.contains("allowed"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
