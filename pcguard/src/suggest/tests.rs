use std::path::PathBuf;

use super::*;

/// The lab's config without the workstations and devices classes and the
/// HP feature (what a first monitor-mode config often looks like).
const CONFIG: &str = r#"# monitor first
role = "primary"
interfaces = ["pcg0"]
mode = "monitor"

[peers]
secondary_servers = ["10.77.0.4"]
ldap = ["10.77.0.5"]
admin = ["10.77.0.7"]   # the admins' hosts

[features]
web = true               # 9191, 9192
directory = ["ldap"]
"#;

fn rec(reason: &str, dir: &str, proto: &str, port: u16, remote: &str, classes: &[&str], rules: &[&str]) -> String {
    let (lport, rport) = if dir == "inbound" { (port, 40000) } else { (40000, port) };
    serde_json::json!({
        "ts": "2026-11-27T10:00:00.000Z", "schema": 1, "event_type": "unexpected_flow", "event_id": "x",
        "host": "srv", "severity": if reason == INVESTIGATE { "alert" } else { "warning" }, "severity_code": 4,
        "reason": reason, "direction": dir, "verdict": "would_drop", "protocol": proto,
        "local": { "addr": "10.77.0.1", "port": lport }, "remote": { "addr": remote, "port": rport },
        "peer_classes": classes, "port_rules": rules, "interface": "pcg0", "tcp_flags": "SYN", "packet_bytes": 74
    })
    .to_string()
}

fn observe(lines: &[String]) -> Observed {
    let mut obs = Observed::default();
    for (i, l) in lines.iter().enumerate() {
        obs.add_line(l, "t.jsonl", i + 1).unwrap();
    }
    obs
}

fn run(config: &str, lines: &[String]) -> Report {
    let path = PathBuf::from("site.toml");
    let cfg = config::parse(config, "site.toml").unwrap();
    let policy = policy::compile(&cfg).unwrap();
    let current = Current { path: &path, text: config, cfg: &cfg, policy: &policy };
    suggest(&observe(lines), Some(&current))
}

fn changes(r: &Report) -> Vec<Change> {
    r.suggestions.iter().map(|s| s.change.clone()).collect()
}

fn host(s: &str) -> Cidr {
    let a: IpAddr = s.parse().unwrap();
    Cidr::containing(a, if a.is_ipv4() { 32 } else { 128 })
}

fn lab_traffic() -> Vec<String> {
    vec![
        rec("peer_not_allowed", "inbound", "tcp", 9191, "10.77.0.2", &["any"], &["web-http"]),
        rec("peer_not_allowed", "inbound", "tcp", 9192, "10.77.0.2", &["any"], &["web-https"]),
        rec("peer_not_allowed", "inbound", "tcp", 9191, "10.77.0.3", &["any"], &["web-http"]),
        rec("no_rule", "inbound", "tcp", 9193, "10.77.0.3", &["any"], &[]),
        rec("no_rule", "outbound", "tcp", 7627, "10.77.0.3", &["any"], &[]),
    ]
}

#[test]
fn lab_traffic_gives_exactly_the_missing_classes_and_feature() {
    let r = run(CONFIG, &lab_traffic());
    assert_eq!(
        changes(&r),
        vec![
            Change::AddToClass { class: "devices".into(), prefixes: vec![host("10.77.0.3")] },
            Change::AddToClass { class: "workstations".into(), prefixes: vec![host("10.77.0.2")] },
            Change::EnableFeature { feature: "mfd:hp".into() },
        ]
    );
    assert_eq!(
        r.suggestions[1].text,
        "10.77.0.2 opened tcp/9191 and tcp/9192 (web-http, web-https): add 10.77.0.2 to peers.workstations"
    );
    assert_eq!(
        r.suggestions[2].text,
        "tcp/9191 and tcp/7627 (hp-device, hp-inbound) matched by flows of 10.77.0.3: turn on features.mfd = [..., \"hp\"]"
    );
    assert!(r.not_allowed_after.is_empty(), "{:?}", r.not_allowed_after);
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    let text = r.suggested.unwrap();
    // Comments and layout kept; the new keys in their tables.
    assert!(text.contains("admin = [\"10.77.0.7\"]   # the admins' hosts"), "{text}");
    assert!(text.contains("web = true               # 9191, 9192"), "{text}");
    let cfg = config::parse(&text, "site.toml").unwrap();
    assert_eq!(cfg.peers["workstations"], vec![host("10.77.0.2")]);
    assert_eq!(cfg.peers["devices"], vec![host("10.77.0.3")]);
    assert!(cfg.features.contains("mfd:hp") && cfg.features.contains("device_rpc"));
}

#[test]
fn the_diff_shows_only_the_added_lines() {
    let r = run(CONFIG, &lab_traffic());
    let diff = unified_diff(CONFIG, r.suggested.as_deref().unwrap(), "a", "b");
    let added: Vec<&str> = diff.lines().filter(|l| l.starts_with('+') && !l.starts_with("+++")).collect();
    let removed: Vec<&str> = diff.lines().filter(|l| l.starts_with('-') && !l.starts_with("---")).collect();
    assert_eq!(added, ["+devices = [\"10.77.0.3\"]", "+workstations = [\"10.77.0.2\"]", "+mfd = [\"hp\"]"], "{diff}");
    assert!(removed.is_empty(), "{diff}");
}

#[test]
fn many_hosts_of_one_network_become_the_network_unless_another_class_is_in_it() {
    let mut lines = Vec::new();
    for h in 1..=212u8 {
        for port in [9191, 9192] {
            lines.push(rec("peer_not_allowed", "inbound", "tcp", port, &format!("10.20.0.{h}"), &["any"], &[]));
        }
    }
    // Three hosts of 10.77.0.0/24, where the admins are: hosts.
    for h in [20, 21, 22, 23] {
        lines.push(rec("peer_not_allowed", "inbound", "tcp", 9191, &format!("10.77.0.{h}"), &["any"], &[]));
    }
    let r = run(CONFIG, &lines);
    let mut want =
        vec![Change::AddToClass { class: "workstations".into(), prefixes: vec!["10.20.0.0/24".parse().unwrap()] }];
    for h in [20, 21, 22, 23] {
        want.push(Change::AddToClass { class: "workstations".into(), prefixes: vec![host(&format!("10.77.0.{h}"))] });
    }
    assert_eq!(changes(&r), want);
    assert_eq!(
        r.suggestions[0].text,
        "10.20.0.0/24: 212 hosts opened tcp/9191 and tcp/9192 (web-http, web-https): add 10.20.0.0/24 to peers.workstations"
    );
    assert!(r.not_allowed_after.is_empty());
}

#[test]
fn outbound_to_workstation_is_never_suggested_only_listed() {
    let config = CONFIG.replace("[peers]\n", "[peers]\nworkstations = [\"10.77.0.2\"]\n");
    let lines = vec![rec(INVESTIGATE, "outbound", "tcp", 445, "10.77.0.2", &["workstations"], &[])];
    let r = run(&config, &lines);
    assert!(r.suggestions.is_empty());
    assert_eq!(r.investigate.len(), 1);
    assert_eq!(r.suggested.as_deref(), Some(config.as_str()));
    let obs = observe(&lines);
    let path = PathBuf::from("site.toml");
    let cfg = config::parse(&config, "site.toml").unwrap();
    let policy = policy::compile(&cfg).unwrap();
    let out = render(&r, &obs, Some(&Current { path: &path, text: &config, cfg: &cfg, policy: &policy }));
    assert!(out.contains("Investigate") && out.contains("10.77.0.2 outbound tcp/445: 1 flows"), "{out}");
    assert!(out.contains("(no change)"), "{out}");
}

#[test]
fn an_unknown_port_becomes_a_site_rule_with_its_own_class() {
    let lines = vec![
        rec("no_rule", "inbound", "tcp", 8085, "10.77.0.50", &["any"], &[]),
        rec("no_rule", "inbound", "tcp", 8086, "10.77.0.50", &["any"], &[]),
    ];
    let r = run(CONFIG, &lines);
    assert_eq!(
        changes(&r),
        vec![Change::SiteRule {
            name: "observed-inbound-tcp-8085-8086".into(),
            class: "observed_inbound_tcp_8085_8086".into(),
            direction: Direction::Inbound,
            protocol: Protocol::Tcp,
            ports: vec![8085, 8086],
            prefixes: vec![host("10.77.0.50")],
        }]
    );
    assert!(r.not_allowed_after.is_empty() && r.notes.is_empty(), "{:?} {:?}", r.not_allowed_after, r.notes);
}

#[test]
fn a_class_member_on_a_port_of_an_off_feature_gets_the_feature_only() {
    let config = CONFIG.replace("[peers]\n", "[peers]\ndevices = [\"10.77.0.3\"]\n");
    let lines = vec![rec("no_rule", "outbound", "tcp", 7627, "10.77.0.3", &["devices"], &[])];
    let r = run(&config, &lines);
    assert_eq!(changes(&r), vec![Change::EnableFeature { feature: "mfd:hp".into() }]);
    assert!(r.not_allowed_after.is_empty());
}

#[test]
fn the_server_opening_flows_never_makes_an_address_a_workstation() {
    // 9191 outbound: a Site Server's or the primary's port, never workstations.
    let lines = vec![rec("no_rule", "outbound", "tcp", 9191, "10.77.0.60", &["any"], &[])];
    let r = run(CONFIG, &lines);
    for s in &r.suggestions {
        if let Change::AddToClass { class, .. } = &s.change {
            assert!(!NO_INITIATE.contains(&class.as_str()), "{}", s.text);
        }
    }
    assert!(!r.suggestions.is_empty());
}

#[test]
fn without_allowed_flow_records_it_cannot_tell_which_rules_are_unused() {
    let r = run(CONFIG, &lab_traffic());
    assert!(r.rule_usage[0].starts_with("rules without traffic: cannot tell"), "{:?}", r.rule_usage);
    assert!(r.rule_usage.iter().any(|l| l.contains("[audit] allowed")));
    assert!(r.rule_usage.iter().any(|l| l.contains("counters")));
    assert!(r.unused_rules.is_empty());
}

#[test]
fn allowed_flow_records_give_the_audited_rules_without_traffic() {
    let config = format!("{CONFIG}\n[audit]\nallowed = [\"web-*\"]\n");
    let mut lines = lab_traffic();
    lines.push(
        serde_json::json!({"ts": "2026-11-27T10:01:00.000Z", "schema": 1, "event_type": "flow_end",
            "rule": "web-https", "direction": "inbound", "protocol": "tcp"})
        .to_string(),
    );
    let path = PathBuf::from("site.toml");
    // `[audit] allowed` may not be known to this build's config parser:
    // the rule usage reads it from the text.
    let cfg = config::parse(CONFIG, "site.toml").unwrap();
    let policy = policy::compile(&cfg).unwrap();
    let current = Current { path: &path, text: &config, cfg: &cfg, policy: &policy };
    let obs = observe(&lines);
    assert_eq!(obs.allowed_records, 1);
    let r = suggest(&obs, Some(&current));
    assert_eq!(r.unused_rules, vec!["web-http".to_string()]);
    assert!(
        r.rule_usage.iter().any(|l| l.starts_with("cannot tell (not in [audit] allowed): ") && l.contains("admin-ssh"))
    );
}

#[test]
fn a_line_that_is_not_a_record_names_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("pcguard-suggest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, format!("{}\nnot json\n", lab_traffic()[0])).unwrap();
    let e = Observed::read(std::slice::from_ref(&bad)).unwrap_err().to_string();
    assert_eq!(e, format!("{}:2: not an audit record (JSON lines of pcguard's audit log expected)", bad.display()));
    // An unfinished last line (the daemon writing it) is skipped.
    let partial = dir.join("partial.jsonl");
    std::fs::write(&partial, format!("{}\n{{\"ts\": \"2026", lab_traffic()[0])).unwrap();
    assert_eq!(Observed::read(&[partial]).unwrap().flows.len(), 1);
    // Rotated and gzipped siblings of a live log are read with it.
    let live = dir.join("flows.jsonl");
    std::fs::write(&live, format!("{}\n", lab_traffic()[1])).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, format!("{}\n", lab_traffic()[2]).as_bytes()).unwrap();
    std::fs::write(dir.join("flows.jsonl.2.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.join("flows.jsonl.1"), format!("{}\n", lab_traffic()[3])).unwrap();
    let obs = Observed::read(&[live]).unwrap();
    let ports: Vec<u16> = obs.flows.iter().map(|r| r.local.port).collect();
    assert_eq!(ports, [9191, 9193, 9192], "oldest first: .2.gz, .1, the live log");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn glob_and_diff_basics() {
    assert!(glob_match("web-*", "web-http") && glob_match("*", "x") && glob_match("a*c", "abbc"));
    assert!(!glob_match("web-*", "admin-ssh") && !glob_match("a*c", "abcd"));
    let d = unified_diff("a\nb\nc\n", "a\nb\nx\nc\n", "old", "new");
    assert_eq!(d, "--- old\n+++ new\n@@ -1,3 +1,4 @@\n a\n b\n+x\n c\n");
    assert_eq!(unified_diff("a\n", "a\n", "o", "n"), "");
}

#[test]
fn ssh_from_a_non_admin_is_a_site_rule_never_the_admin_class() {
    let lines = vec![rec("no_rule", "inbound", "tcp", 22, "10.77.0.2", &["any"], &[])];
    let r = run(CONFIG, &lines);
    assert_eq!(r.suggestions.len(), 1);
    assert!(matches!(&r.suggestions[0].change, Change::SiteRule { ports, .. } if ports == &[22]));
    assert!(
        r.suggestions[0]
            .text
            .ends_with("(admin-ssh is always allowed for peers.admin: add the hosts there instead if they are theirs)"),
        "{}",
        r.suggestions[0].text
    );
    assert!(r.not_allowed_after.is_empty() && r.notes.is_empty(), "{:?} {:?}", r.not_allowed_after, r.notes);
}

#[test]
fn a_class_from_an_included_file_is_named_not_written() {
    let dir = std::env::temp_dir().join(format!("pcguard-suggest-inc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("peers.toml"), "[peers]\nworkstations = [\"10.9.0.0/24\"]\n").unwrap();
    let config = format!("include = [\"peers.toml\"]\n{CONFIG}");
    let path = dir.join("site.toml");
    let cfg = config::parse(&config, &path.display().to_string()).unwrap();
    let policy = policy::compile(&cfg).unwrap();
    let current = Current { path: &path, text: &config, cfg: &cfg, policy: &policy };
    let lines = vec![rec("peer_not_allowed", "inbound", "tcp", 9191, "10.77.0.2", &["any"], &["web-http"])];
    let r = suggest(&observe(&lines), Some(&current));
    assert_eq!(
        changes(&r),
        vec![Change::AddToClass { class: "workstations".into(), prefixes: vec![host("10.77.0.2")] }]
    );
    assert_eq!(r.notes, ["peers.workstations is defined in an included file: add 10.77.0.2 there"]);
    assert_eq!(r.suggested.as_deref(), Some(config.as_str()));
    assert_eq!(r.not_allowed_after, ["10.77.0.2 inbound tcp/9191"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ecs_records_give_the_same_suggestion_as_json_ones() {
    let ecs: Vec<String> = lab_traffic()
        .iter()
        .map(|l| {
            // The fields `flows` reads of an ECS document (docs/audit.md).
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let (src, dst) = if r["direction"] == "inbound" { ("remote", "local") } else { ("local", "remote") };
            serde_json::json!({
                "@timestamp": r["ts"], "log": { "level": r["severity"] },
                "source": { "ip": r[src]["addr"], "port": r[src]["port"] },
                "destination": { "ip": r[dst]["addr"], "port": r[dst]["port"] },
                "pcguard": { "event_type": "unexpected_flow", "reason": r["reason"], "direction": r["direction"],
                    "verdict": r["verdict"], "protocol": r["protocol"], "peer_classes": r["peer_classes"],
                    "port_rules": r["port_rules"] }
            })
            .to_string()
        })
        .collect();
    assert_eq!(observe(&ecs).flows.len(), 5);
    assert_eq!(changes(&run(CONFIG, &ecs)), changes(&run(CONFIG, &lab_traffic())));
}

#[test]
fn a_port_of_an_off_feature_alone_does_not_make_an_unknown_host_a_member() {
    // 443 outbound: the MFD vendors' port (features off) and the cloud
    // services' (addresses learned by name): a site rule, with the
    // services named.
    let lines = vec![rec("no_rule", "outbound", "tcp", 443, "192.0.2.10", &["any"], &[])];
    let r = run(CONFIG, &lines);
    assert_eq!(r.suggestions.len(), 1, "{:?}", r.suggestions);
    assert!(matches!(&r.suggestions[0].change, Change::SiteRule { ports, .. } if ports == &[443]));
    assert!(r.suggestions[0].text.contains("hp-outbound (peers.devices)"), "{}", r.suggestions[0].text);
    assert!(r.not_allowed_after.is_empty() && r.notes.is_empty(), "{:?} {:?}", r.not_allowed_after, r.notes);
}

#[test]
fn a_device_on_a_port_of_many_vendors_is_a_note_not_a_guess() {
    let config = CONFIG.replace("[peers]\n", "[peers]\ndevices = [\"10.77.0.3\"]\n");
    let lines = vec![rec("peer_not_allowed", "inbound", "tcp", 9192, "10.77.0.3", &["devices"], &["web-https"])];
    let r = run(&config, &lines);
    assert!(r.suggestions.is_empty(), "{:?}", r.suggestions);
    assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
    assert!(r.notes[0].starts_with("10.77.0.3 inbound tcp/9192: as likely one of "), "{}", r.notes[0]);
    assert!(
        r.notes[0].contains("mfd = [..., \"hp\"]") && r.notes[0].contains("mfd = [..., \"xerox\"]"),
        "{}",
        r.notes[0]
    );
    assert!(r.not_allowed_after.is_empty());
    assert_eq!(r.suggested.as_deref(), Some(config.as_str()));
}

#[test]
fn an_address_is_never_suggested_for_admin() {
    // The server opened 7627 to it: not a workstation; web's other class
    // is admin: never suggested. A site rule instead.
    let config = CONFIG.replace("web = true               # 9191, 9192\n", "web = true\nmfd = [\"hp\"]\n");
    let config = config.replace("[peers]\n", "[peers]\ndevices = [\"10.77.0.30\"]\n");
    let lines = vec![
        rec("peer_not_allowed", "inbound", "tcp", 9192, "10.77.0.3", &["any"], &["web-https"]),
        rec("no_rule", "outbound", "tcp", 80, "10.77.0.3", &["any"], &[]),
    ];
    let r = run(&config, &lines);
    for s in &r.suggestions {
        assert!(!matches!(&s.change, Change::AddToClass { class, .. } if class == "admin"), "{}", s.text);
    }
    // 80 and 9192 are HP's (on): the address joins devices.
    assert_eq!(changes(&r), vec![Change::AddToClass { class: "devices".into(), prefixes: vec![host("10.77.0.3")] }]);
    assert!(r.not_allowed_after.is_empty());
}

#[test]
fn a_site_rule_port_from_another_host_joins_the_rule_class() {
    let config = format!(
        "{}\n[[rule]]\nname = \"legacy\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9999]\npeers = [\"legacy_hosts\"]\n",
        CONFIG.replace("[peers]\n", "[peers]\nlegacy_hosts = [\"10.77.0.40\"]   # the old app\n")
    );
    let lines = vec![rec("peer_not_allowed", "inbound", "tcp", 9999, "10.77.0.41", &["any"], &["legacy"])];
    let r = run(&config, &lines);
    assert_eq!(
        changes(&r),
        vec![Change::AddToClass { class: "legacy_hosts".into(), prefixes: vec![host("10.77.0.41")] }]
    );
    assert_eq!(r.suggestions[0].text, "10.77.0.41 opened tcp/9999 (legacy): add 10.77.0.41 to peers.legacy_hosts");
    assert!(r.suggested.unwrap().contains("legacy_hosts = [\"10.77.0.40\", \"10.77.0.41\"]   # the old app"));
    assert!(r.not_allowed_after.is_empty());
}
