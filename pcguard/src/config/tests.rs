use std::path::PathBuf;

use super::*;

const LAB: &str = include_str!("../../../examples/lab.toml");

const HEAD: &str = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n";

fn parse_with(body: &str) -> Result<SiteConfig, ConfigError> {
    parse(&format!("{HEAD}{body}"), "site.toml")
}

fn error(body: &str) -> String {
    parse_with(body).expect_err("config should be rejected").to_string()
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn lab_config_has_what_the_daemon_needs() {
    let cfg = parse(LAB, "examples/lab.toml").unwrap();
    assert_eq!(cfg.role, Role::Primary);
    assert_eq!(cfg.interfaces, vec!["pcg0"]);
    assert_eq!((cfg.mode, cfg.egress_mode), (Mode::Enforce, Mode::Enforce));
    assert!(cfg.allow_icmp);
    assert_eq!(cfg.audit_path(), Path::new("/tmp/pcguard-lab/flows.jsonl"));
    assert_eq!(cfg.report_interval(), Duration::from_secs(60));
    assert_eq!(cfg.metrics_listen(), "127.0.0.1:9750".parse().unwrap());
    assert_eq!(cfg.conntrack.tcp, Duration::from_secs(600));
    assert_eq!(cfg.conntrack.udp, Duration::from_secs(30));
    assert_eq!(cfg.conntrack.tcp_closing, DEFAULT_TCP_CLOSING_TIMEOUT);
    assert_eq!(
        cfg.peers["workstations"],
        vec!["10.77.0.2/32".parse::<Cidr>().unwrap(), "fd77::2/128".parse().unwrap()]
    );
    let features: Vec<&str> = cfg.features.iter().map(String::as_str).collect();
    assert_eq!(features, ["admin_ssh", "database:postgresql", "device_rpc", "directory:ldap", "mfd:hp", "web"]);
    assert!(cfg.notes.iter().any(|n| n.contains("features.dns")), "{:?}", cfg.notes);
}

#[test]
fn every_example_is_valid() {
    let mut n = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 4, "expected the example configs, found {n}");
}

#[test]
fn defaults() {
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.0/24\"]\n").unwrap();
    assert_eq!(cfg.egress_mode, Mode::Enforce);
    assert_eq!(cfg.audit_path(), Path::new(DEFAULT_AUDIT_PATH));
    assert_eq!(cfg.metrics_listen().to_string(), DEFAULT_METRICS_LISTEN);
    assert_eq!(cfg.report_interval(), DEFAULT_REPORT_INTERVAL);
    assert!(cfg.features.contains("web"));
    // device_rpc is a primary default, skipped (with a note) without devices.
    assert!(!cfg.features.contains("device_rpc"));
    assert!(cfg.notes.iter().any(|n| n.contains("features.device_rpc (default) not enabled: needs peers.devices")));
    // Enforce without admin: lock-out warning.
    assert!(cfg.notes.iter().any(|n| n.contains("lock") || n.contains("SSH")));
}

#[test]
fn monitor_mode_and_separate_egress_mode() {
    let text = HEAD.replace("enforce", "monitor") + "egress_mode = \"enforce\"\nallow_icmp = false\n";
    let cfg = parse(&text, "m.toml").unwrap();
    assert_eq!((cfg.mode, cfg.egress_mode, cfg.allow_icmp), (Mode::Monitor, Mode::Enforce, false));
    assert!(!cfg.notes.iter().any(|n| n.contains("SSH")));
}

#[test]
fn role_defaults_per_role() {
    let peers = "[peers]\nworkstations = [\"192.0.2.0/24\"]\ndevices = [\"198.51.100.0/24\"]\n\
                 primary_server = [\"203.0.113.1\"]\n";
    let with_role = |role: &str| parse(&(HEAD.replace("primary", role) + peers), "r").unwrap();
    let secondary = with_role("secondary");
    for f in ["upstream", "cups", "printing:raw", "printing:ipp"] {
        assert!(secondary.features.contains(f), "{f}");
    }
    assert!(!secondary.features.contains("web"));
    let site = with_role("site-server");
    for f in ["web", "device_rpc", "upstream"] {
        assert!(site.features.contains(f), "{f}");
    }
    let docproc = with_role("document-processing");
    assert!(docproc.features.contains("document_processing_server"));
    assert!(!docproc.features.contains("web"));
}

#[test]
fn explicit_false_overrides_role_default() {
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.0/24\"]\n[features]\nweb = false\n").unwrap();
    assert!(!cfg.features.contains("web"));
}

#[test]
fn invalid_cidr_names_file_line_and_key() {
    let text = format!(
        "{HEAD}\n[peers]\nadmin = [\"192.0.2.7\"]\nworkstations = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n]\n"
    );
    let e = parse(&text, "examples/bad.toml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "examples/bad.toml:9: peers.workstations: invalid CIDR \"10.0.0.0/33\": prefix length must be 0-32"
    );
    assert_eq!(e.line, Some(9));
    assert!(error("[peers]\ndevices = [\"10.1.2.3/24\"]\n").contains("did you mean 10.1.2.0/24?"));
    assert!(error("[peers]\ndevices = [\"fe80::zz\"]\n").contains("site.toml:5: peers.devices: invalid CIDR"));
}

#[test]
fn unknown_keys_are_rejected_with_their_line() {
    let e = error("[peers]\nworkstations = [\"192.0.2.0/24\"]\n\n[audit]\npath = \"/x\"\nrotate = true\n");
    assert!(e.starts_with("site.toml:9: audit.rotate: unknown field `rotate`"), "{e}");
    let e = error("colour = \"blue\"\n");
    assert!(e.starts_with("site.toml:4: colour: unknown field `colour`"), "{e}");
    let e = error("[features]\nweb = true\nprinters = true\n");
    assert!(e.starts_with("site.toml:6: features.printers: unknown feature"), "{e}");
    let e = error(
        "[[rule]]\nname = \"x\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [1]\npeers = [\"any\"]\nextra = 1\n",
    );
    assert!(e.starts_with("site.toml:10: rule[0].extra: unknown field `extra`"), "{e}");
}

#[test]
fn syntax_and_type_errors() {
    assert!(error("[peers\n").starts_with("site.toml:4"));
    let e = parse("interfaces = [\"eth0\"]\nmode = \"enforce\"\n", "x.toml").unwrap_err().to_string();
    assert!(e.contains("missing field `role`"), "{e}");
    assert!(error("egress_mode = \"log\"\n").starts_with("site.toml:4: egress_mode: unknown variant `log`"));
    let e = parse(&HEAD.replace("\"primary\"", "\"tertiary\""), "x.toml").unwrap_err().to_string();
    assert!(e.starts_with("x.toml:1: role: unknown variant `tertiary`"), "{e}");
    assert!(error("[metrics]\nlisten = \"localhost\"\n").starts_with("site.toml:5: metrics.listen:"));
    assert!(error("[conntrack]\ntcp_timeout = \"5 weeks\"\n").contains("conntrack.tcp_timeout: invalid duration"));
    assert!(
        error("[conntrack]\nudp_timeout = 0\n").contains("site.toml:5: conntrack.udp_timeout: must be greater than 0")
    );
}

#[test]
fn interfaces_are_checked() {
    let bad = |list: &str| parse(&HEAD.replace("[\"eth0\"]", list), "i.toml").unwrap_err().to_string();
    assert!(bad("[]").contains("interfaces: at least one interface"));
    assert!(bad("[\"eth0\", \"eth0\"]").contains("\"eth0\": duplicate interface"));
    assert!(bad("[\"a-very-long-interface-name\"]").contains("invalid interface name"));
}

#[test]
fn unknown_vendor_and_feature_values() {
    let e = error("[peers]\ndevices = [\"192.0.2.0/24\"]\n[features]\nmfd = [\"hp\", \"hpx\"]\n");
    assert!(e.starts_with("site.toml:7: features.mfd: unknown value \"hpx\" (known: brother, canon,"), "{e}");
    let e = error("[features]\ndatabase = \"mongodb\"\n");
    assert!(e.contains("features.database: unknown value \"mongodb\""), "{e}");
    assert!(error("[features]\nweb = \"yes\"\n").contains("features.web: expected true or false"));
    assert!(error("[features]\nmfd = \"hp\"\n").contains("features.mfd: expected a list of names"));
    let cfg = parse_with("[features]\ndatabase = \"internal\"\nweb = false\n").unwrap();
    assert!(!cfg.features.iter().any(|f| f.starts_with("database:")));
}

#[test]
fn feature_without_its_peers_is_an_error() {
    let e = error("[peers]\nworkstations = [\"192.0.2.0/24\"]\n\n[features]\nmfd = [\"konica-minolta\"]\n");
    assert_eq!(e, "site.toml:8: features.mfd: \"konica-minolta\" needs peers.devices (for konica-minolta-inbound)");
    let e = error("[features]\nweb = true\n");
    assert!(e.contains("features.web: needs one of peers.workstations, peers.secondary_servers, peers.admin"), "{e}");
    let e = error("[peers]\nworkstations = [\"192.0.2.0/24\"]\n[features]\ndirectory = [\"active-directory\"]\n");
    assert!(e.contains("needs peers.directory (for ad-smb)"), "{e}");
    // Cloud services bring their own endpoints (FQDNs / IPs).
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.0/24\"]\n[features]\nges = true\ncloud_services = true\n")
        .unwrap();
    assert!(cfg.features.contains("ges") && cfg.features.contains("cloud_services:wildcard"));
    // Universal Print's internal port is optional when there is no other connector.
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.0/24\"]\n[features]\nuniversal_print = true\n").unwrap();
    assert!(cfg.features.contains("universal_print"));
}

#[test]
fn unknown_and_custom_peer_classes() {
    let e = error("[peers]\nworkstation = [\"192.0.2.0/24\"]\n");
    assert!(
        e.starts_with(
            "site.toml:5: peers.workstation: unknown peer class \"workstation\" (built-in classes: workstations,"
        ),
        "{e}"
    );
    assert!(error("[peers]\nany = [\"192.0.2.0/24\"]\n").contains("peers.any: \"any\" is built in"));
    assert!(error("[peers]\nBackup = [\"192.0.2.0/24\"]\n").contains("lowercase"));
    let rule = "[[rule]]\nname = \"backup\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9102]\npeers = [\"backup\"]\n";
    let cfg = parse_with(&format!("[peers]\nbackup = [\"192.0.2.9\"]\n{rule}")).unwrap();
    assert_eq!(cfg.rules[0].peers, vec!["backup"]);
    let e = error(rule);
    assert!(e.starts_with("site.toml:9: rule[0].peers: unknown peer class \"backup\" (define it in [peers])"), "{e}");
    let e = error(&rule.replace("\"backup\"]", "\"devices\"]"));
    assert!(e.contains("rule[0].peers: peer class \"devices\" has no addresses in [peers]"), "{e}");
}

fn rule(name: &str, ports: &str, peers: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = {ports}\npeers = {peers}\n"
    )
}

#[test]
fn site_rules_are_validated() {
    let peers = "[peers]\nadmin = [\"192.0.2.7\"]\nworkstations = [\"192.0.2.0/24\"]\n";
    let ok = parse_with(&format!("{peers}{}", rule("backup", "[9102, \"10000-10010\"]", "[\"admin\"]"))).unwrap();
    assert_eq!(ok.rules[0].ports, vec![PortRange::single(9102), PortRange { start: 10000, end: 10010 }]);
    let e = error(&format!("{peers}{}", rule("a", "[\"100-200\", 150]", "[\"admin\"]")));
    assert!(e.contains("site.toml:11: rule[0].ports: ports 100-200 and 150 overlap"), "{e}");
    let two = format!(
        "{peers}{}{}",
        rule("a", "[\"100-200\"]", "[\"admin\"]"),
        rule("b", "[150]", "[\"workstations\", \"admin\"]")
    );
    let e = error(&two);
    assert!(
        e.contains(
            "site.toml:17: rule[1].ports: port 150 overlaps port 100-200 of rule \"a\" for peer class \"admin\""
        ),
        "{e}"
    );
    // Same ports for different classes is fine.
    parse_with(&format!(
        "{peers}{}{}",
        rule("a", "[\"100-200\"]", "[\"admin\"]"),
        rule("b", "[150]", "[\"workstations\"]")
    ))
    .unwrap();
    let dup = format!("{peers}{}{}", rule("a", "[1]", "[\"admin\"]"), rule("a", "[2]", "[\"admin\"]"));
    assert!(error(&dup).contains("rule[1].name: duplicate rule name \"a\""));
    assert!(error(&format!("{peers}{}", rule("web-http", "[1]", "[\"admin\"]"))).contains("is a catalog service id"));
    let reserved = error(&format!("{peers}{}", rule("none", "[1]", "[\"admin\"]")));
    assert!(reserved.contains("rule[0].name: \"none\" is reserved"), "{reserved}");
    assert!(error(&format!("{peers}{}", rule("a", "[]", "[\"admin\"]"))).contains("at least one port"));
    assert!(error(&format!("{peers}{}", rule("a", "[0]", "[\"admin\"]"))).contains("port 0"));
    assert!(error(&format!("{peers}{}", rule("a", "[1]", "[]"))).contains("at least one peer class"));
}

#[test]
fn always_allow_rules_and_ssh() {
    let text = "[peers]\nadmin = [\"192.0.2.7\"]\n[always_allow]\nssh_port = 2222\n\
                [[always_allow.rule]]\nname = \"monitoring\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9100]\npeers = [\"admin\"]\n";
    let cfg = parse_with(text).unwrap();
    assert!(cfg.features.contains("admin_ssh"));
    assert_eq!(cfg.port_overrides["admin-ssh"], vec![PortRange::single(2222)]);
    assert_eq!(cfg.always_allow[0].name, "monitoring");
    assert!(!cfg.notes.iter().any(|n| n.contains("SSH")));
    let cfg = parse_with("[peers]\nadmin = [\"192.0.2.7\"]\n[always_allow]\nssh = false\n").unwrap();
    assert!(!cfg.features.contains("admin_ssh"));
    let e = error("[always_allow]\nssh = true\n");
    assert!(e.contains("site.toml:5: always_allow.ssh: needs peers.admin (for admin-ssh)"), "{e}");
}

#[test]
fn database_port_and_cloud_regions() {
    let peers = "[peers]\ndatabase = [\"192.0.2.6\"]\n";
    let cfg = parse_with(&format!("{peers}[features]\ndatabase = \"sqlserver\"\ndatabase_port = 14330\n")).unwrap();
    assert_eq!(cfg.port_overrides["db-sqlserver"], vec![PortRange::single(14330)]);
    assert!(error(&format!("{peers}[features]\ndatabase_port = 5433\n")).contains("needs features.database"));
    assert!(
        error(&format!("{peers}[features]\ndatabase = \"mysql\"\ndatabase_port = 70000\n")).contains("expected a port")
    );
    let cfg = parse_with("[features]\ncloud_services = true\ncloud_regions = [\"au\", \"legacy\"]\n").unwrap();
    let cloud: Vec<&str> =
        cfg.features.iter().filter(|f| f.starts_with("cloud_services")).map(String::as_str).collect();
    assert_eq!(cloud, ["cloud_services:au", "cloud_services:legacy"]);
    assert!(error("[features]\ncloud_services = false\ncloud_regions = [\"eu\"]\n").contains("features.cloud_regions"));
    assert!(error("[features]\ncloud_regions = [\"mars\"]\n").contains("unknown value \"mars\""));
    assert!(error("[features]\ncloud_regions = [\"wildcard\"]\n").contains("unknown value \"wildcard\""));
}

#[test]
fn load_reports_unreadable_files() {
    let e = load(Path::new("/nonexistent/pcguard.toml")).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/pcguard.toml: cannot read:"), "{e}");
}

#[test]
fn syntax_errors_name_the_statement_in_progress_and_bare_crs_are_explained() {
    let unclosed = "role = \"primary\"\ninterfaces = [\"eth0\"]\n[peers]\nworkstations = [\"10.0.0.0/8\"\nadmin = [\"10.1.1.1\"]\n";
    let e = parse(unclosed, "site.toml").unwrap_err().to_string();
    assert!(e.starts_with("site.toml:5: peers.workstations: "), "{e}");
    let cr = "role = \"primary\"\rinterfaces = [\"eth0\"]\r";
    let e = parse(cr, "site.toml").unwrap_err().to_string();
    assert!(e.contains("bare carriage return"), "{e}");
    // CRLF is a line ending like LF.
    let crlf = std::fs::read_to_string(examples_dir().join("lab.toml")).unwrap().replace('\n', "\r\n");
    assert!(parse(&crlf, "lab.toml").is_ok());
}

/// Mutated configs (bytes deleted, inserted, flipped; line endings
/// changed): every error names the file and a line and says something.
#[test]
fn every_error_of_a_mutated_config_has_a_line_and_a_message() {
    let base = std::fs::read(examples_dir().join("lab.toml")).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut errors = 0;
    for _ in 0..2000 {
        let mut text = base.clone();
        if next() % 5 == 0 {
            text = String::from_utf8_lossy(&text).replace('\n', "\r").into_bytes();
        }
        for _ in 0..1 + next() % 3 {
            let at = (next() as usize) % text.len();
            match next() % 3 {
                0 => {
                    text.remove(at);
                }
                1 => text.insert(at, b"[]=\"#,.\r\n\t{}\x00"[(next() % 13) as usize]),
                _ => text[at] ^= 1 << (next() % 8),
            }
        }
        let text = String::from_utf8_lossy(&text);
        let Err(e) = parse(&text, "site.toml") else { continue };
        errors += 1;
        let shown = e.to_string();
        assert!(e.line.is_some(), "no line: {shown}");
        assert!(!e.message.trim().is_empty(), "no message: {shown:?}");
    }
    assert!(errors > 500, "only {errors} of 2000 mutations were errors");
}

#[test]
fn audit_format_and_syslog_keys() {
    use crate::{config::AuditFormat, syslog::Facility};
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.0/24\"]\n").unwrap();
    assert_eq!((cfg.audit.format, cfg.audit.syslog.clone()), (AuditFormat::Json, None));
    let cfg = parse_with(
        "[peers]\nworkstations = [\"192.0.2.0/24\"]\n[audit]\nformat = \"ecs\"\nsyslog = true\nsyslog_facility = \"local3\"\n",
    )
    .unwrap();
    assert_eq!(cfg.audit.format, AuditFormat::Ecs);
    assert_eq!(cfg.audit.syslog, Some((PathBuf::from("/dev/log"), Facility::Local3)));
    let cfg = parse_with("[audit]\nsyslog = true\nsyslog_socket = \"/run/x.sock\"\n").unwrap();
    assert_eq!(cfg.audit.syslog, Some((PathBuf::from("/run/x.sock"), Facility::Daemon)));

    let e = error("[audit]\nformat = \"xml\"\n");
    assert!(e.starts_with("site.toml:5: audit.format: unknown variant `xml`, expected `json` or `ecs`"), "{e}");
    let e = error("[audit]\nsyslog = \"yes\"\n");
    assert!(e.starts_with("site.toml:5: audit.syslog: invalid type: string \"yes\", expected a boolean"), "{e}");
    let e = error("[audit]\nsyslog = true\nsyslog_socket = \"dev/log\"\n");
    assert_eq!(e, "site.toml:6: audit.syslog_socket: \"dev/log\" is not an absolute path");
    let e = error("[audit]\nsyslog_socket = \"/dev/log\"\n");
    assert_eq!(e, "site.toml:5: audit.syslog_socket: set, but syslog is not on (add `syslog = true`)");
    let e = error("[audit]\nsyslog = false\nsyslog_facility = \"local0\"\n");
    assert_eq!(e, "site.toml:6: audit.syslog_facility: set, but syslog is not on (add `syslog = true`)");
    let e = error("[audit]\nsyslog = true\nsyslog_facility = \"kern\"\n");
    assert!(e.starts_with("site.toml:6: audit.syslog_facility: unknown variant `kern`"), "{e}");
}

#[test]
fn papercut_ports_move_the_application_server_services() {
    let ports = |cfg: &SiteConfig, id: &str| {
        let s = Catalog::builtin().service(id).unwrap();
        crate::model::format_ports(&cfg.service_ports(s))
    };
    let peers = "[peers]\nworkstations = [\"192.0.2.2\"]\ndevices = [\"192.0.2.3\"]\n";
    let moved = format!("{peers}[features]\nmfd = [\"hp\"]\n[papercut]\nhttp_port = 80\nhttps_port = 443\n");
    let cfg = parse_with(&moved).unwrap();
    assert_eq!(ports(&cfg, "web-http"), "80");
    assert_eq!(ports(&cfg, "web-https"), "443");
    assert_eq!(ports(&cfg, "hp-inbound"), "80, 443, 9193");
    assert_eq!(ports(&cfg, "device-rpc"), "9193", "device RPC is not documented as movable");
    assert_eq!(ports(&cfg, "hp-outbound"), "80, 443", "the devices' own ports stay");
    let note = cfg.notes.iter().find(|n| n.contains("Application Server ports moved")).expect("a note");
    assert!(note.contains("9191 -> 80 (papercut.http_port), 9192 -> 443 (papercut.https_port)"), "{note}");
    assert!(note.contains("web-http, web-https, hp-inbound"), "{note}");
    assert!(note.contains("sys-security-options-change-ports.html"), "{note}");
    assert!(note.contains("such as 80/ 443"), "{note}");
    // Only the HTTP port: HTTPS stays.
    let cfg = parse_with(&format!("{peers}[papercut]\nhttp_port = 8080\n")).unwrap();
    assert_eq!((ports(&cfg, "web-http"), ports(&cfg, "web-https")), ("8080".into(), "9192".into()));
    // Unchanged (the defaults written out): no note.
    let cfg = parse_with(&format!("{peers}[papercut]\nhttp_port = 9191\n")).unwrap();
    assert!(!cfg.notes.iter().any(|n| n.contains("moved")), "{:?}", cfg.notes);
    // The other side: a secondary's upstream to the moved primary.
    let secondary = "role = \"secondary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n\
                     [peers]\nprimary_server = [\"192.0.2.1\"]\n[papercut]\nhttp_port = 80\nhttps_port = 443\n";
    let cfg = parse(secondary, "sec.toml").unwrap();
    assert_eq!((ports(&cfg, "upstream-http"), ports(&cfg, "upstream-https")), ("80".into(), "443".into()));
    // Errors name the file, line and key.
    let e = error(&format!("{peers}[papercut]\nhttp_port = 0\n"));
    assert!(e.contains("site.toml:8: papercut.http_port: expected a port number"), "{e}");
    let e = error(&format!("{peers}[papercut]\nhttp_port = 70000\n"));
    assert!(e.contains("papercut.http_port: expected a port number"), "{e}");
    let e = error(&format!("{peers}[papercut]\nhttps_port = 9191\n"));
    assert!(e.contains("site.toml:8: papercut.https_port: 9191 is also the HTTP port"), "{e}");
    let e = error(&format!("{peers}[papercut]\ndevice_port = 9300\n"));
    assert!(e.contains("site.toml:8: papercut.device_port: unknown field"), "{e}");
    // The quoted sentence is the page's, verbatim.
    let page = crate::catalog::document("change-ports").unwrap();
    for part in features::MOVED_PORTS_QUOTE {
        assert!(page.text.contains(part), "{part:?}");
    }
}

#[test]
fn site_servers_both_ways_samba_and_mobility_print() {
    let enabled = |cfg: &SiteConfig| -> Vec<String> {
        cfg.enabled_services().filter(|s| !cfg.service_peers(s).is_empty()).map(|s| s.id.clone()).collect()
    };
    // A primary: its Site Servers connect to it and it connects to them,
    // as soon as they are listed.
    let cfg = parse_with("[peers]\nsite_servers = [\"192.0.2.40\"]\n").unwrap();
    let ids = enabled(&cfg);
    assert!(ids.contains(&"site-server-in".into()) && ids.contains(&"site-server-out".into()), "{ids:?}");
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.2\"]\n").unwrap();
    assert!(!enabled(&cfg).iter().any(|id| id.starts_with("site-server")));
    assert!(!cfg.notes.iter().any(|n| n.contains("site_servers")), "{:?}", cfg.notes);
    // Also in a never-connect-to class: an error at the site_servers line.
    let e = error("[peers]\nsecondary_servers = [\"192.0.2.0/24\"]\nsite_servers = [\"192.0.2.40\"]\n");
    assert!(e.contains("site.toml:6: peers.site_servers: 192.0.2.40"), "{e}");
    assert!(e.contains("overlaps 192.0.2.0/24 of peers.secondary_servers"), "{e}");
    let e = error("[peers]\nsite_servers = [\"10.0.0.0/8\"]\nworkstations = [\"10.1.0.0/16\"]\n");
    assert!(e.contains("site.toml:5: peers.site_servers") && e.contains("peers.workstations"), "{e}");
    // A Site Server: the primary connects to it (inbound) and it to the
    // primary (upstream), by default.
    let site = "role = \"site-server\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\nprimary_server = [\"192.0.2.1\"]\n";
    let cfg = parse(site, "site.toml").unwrap();
    let ids = enabled(&cfg);
    for id in ["primary-connects", "upstream-http", "upstream-https"] {
        assert!(ids.contains(&id.to_string()), "{id}: {ids:?}");
    }
    // Samba: 445 from the workstations; explicit without them is an error.
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.2\"]\n[features]\nsamba = true\n").unwrap();
    assert!(enabled(&cfg).contains(&"samba-smb".into()));
    let e = error("[features]\nsamba = true\n");
    assert!(e.contains("site.toml:5: features.samba: needs peers.workstations (for samba-smb)"), "{e}");
    // Mobility Print on the primary: discovery from the workstations; the
    // upstream only where a primary_server is configured.
    let cfg = parse_with("[peers]\nworkstations = [\"192.0.2.2\"]\n[features]\nmobility_print = true\n").unwrap();
    let ids = enabled(&cfg);
    assert!(ids.contains(&"mobility-print-mdns".into()) && !ids.contains(&"mobility-print-upstream".into()));
    let sec = "role = \"secondary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\nprimary_server = [\"192.0.2.1\"]\n\
               workstations = [\"192.0.2.0/24\"]\n[features]\nmobility_print = true\n[papercut]\nhttps_port = 443\n";
    let cfg = parse(sec, "sec.toml").unwrap();
    let up = Catalog::builtin().service("mobility-print-upstream").unwrap();
    assert!(enabled(&cfg).contains(&up.id));
    assert_eq!(crate::model::format_ports(&cfg.service_ports(up)), "443, 9191");
}

#[test]
fn include_shares_peer_classes_and_errors_name_the_included_file() {
    let dir = std::env::temp_dir().join(format!("pcguard-include-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    let main = |include: &str, body: &str| {
        let origin = dir.join("site.toml").display().to_string();
        parse(&format!("include = [{include}]\n{HEAD}{body}"), &origin)
    };
    write(
        "peers.toml",
        "# shared by every server\n[peers]\nworkstations = [\"192.0.2.0/25\"]\ndevices = [\"198.51.100.0/24\"]\n\
         admin = [\"192.0.2.10\"]\nprinters_lab = [\"203.0.113.0/28\"]\n",
    );
    // Relative to the including file; the classes work as if written there.
    let cfg = main("\"peers.toml\"", "[features]\nmfd = [\"hp\"]\n").unwrap();
    assert_eq!(cfg.peers["devices"], vec!["198.51.100.0/24".parse::<Cidr>().unwrap()]);
    assert!(cfg.features.contains("mfd:hp") && cfg.features.contains("admin_ssh"));
    let peers_toml = dir.join("peers.toml").display().to_string();
    let listed = format!("included {peers_toml}: peers admin, devices, printers_lab, workstations");
    assert!(cfg.notes.contains(&listed), "{:?}", cfg.notes);
    assert!(cfg.notes.iter().any(|n| n.contains("peers.printers_lab (custom class")), "{:?}", cfg.notes);
    // An absolute path works the same; a class of the including file too.
    let cfg = main(&format!("{peers_toml:?}"), "[peers]\ndns = [\"192.0.2.53\"]\n").unwrap();
    assert!(cfg.peers.contains_key("dns") && cfg.peers.contains_key("workstations"));
    // Errors name the included file and its line.
    write("bad.toml", "[peers]\nworkstations = [\"192.0.2.0/25\"]\ndevices = [\"10.0.0.0/33\"]\n");
    let e = main("\"bad.toml\"", "").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:3: peers.devices: invalid CIDR", dir.join("bad.toml").display())), "{e}");
    write("features.toml", "[peers]\nadmin = [\"192.0.2.10\"]\n[features]\nweb = true\n");
    let e = main("\"features.toml\"", "").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:3: ", dir.join("features.toml").display())) && e.contains("features"), "{e}");
    write("syntax.toml", "[peers]\nadmin = [\"192.0.2.10\"\n");
    let e = main("\"syntax.toml\"", "").unwrap_err().to_string();
    assert!(e.starts_with(&dir.join("syntax.toml").display().to_string()), "{e}");
    // One file per class: the second definition is the error.
    let e = main("\"peers.toml\"", "[peers]\nworkstations = [\"192.0.2.0/24\"]\n").unwrap_err().to_string();
    let site = dir.join("site.toml").display().to_string();
    assert!(e.starts_with(&format!("{peers_toml}:3: peers.workstations: also defined in {site}:6")), "{e}");
    // A file that cannot be read: the include line of the including file.
    let e = main("\"nope.toml\"", "").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{site}:1: include: cannot read {}", dir.join("nope.toml").display())), "{e}");
    // Site servers from the shared file are checked like local ones.
    write("sites.toml", "[peers]\nsite_servers = [\"192.0.2.40\"]\n");
    let e = main("\"peers.toml\", \"sites.toml\"", "").unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:2: peers.site_servers", dir.join("sites.toml").display())), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn audit_allowed_takes_all_or_rule_id_globs() {
    use crate::config::{AuditAllowed, glob_match};
    let base = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[audit]\n";
    let parse = |extra: &str| parse(&format!("{base}{extra}"), "site.toml");
    assert_eq!(parse("").unwrap().audit.allowed, AuditAllowed::None);
    assert_eq!(parse("allowed = \"all\"\n").unwrap().audit.allowed, AuditAllowed::All);
    assert_eq!(parse("allowed = []\n").unwrap().audit.allowed, AuditAllowed::None);
    let globs = parse("allowed = [\"admin-ssh\", \"web-*\"]\n").unwrap().audit.allowed;
    assert_eq!(globs, AuditAllowed::Rules(vec!["admin-ssh".into(), "web-*".into()]));
    assert!(globs.matches("web-http") && globs.matches("web-https") && globs.matches("admin-ssh"));
    assert!(!globs.matches("admin-ssh2") && !globs.matches("upstream-http") && !globs.matches("web"));
    assert_eq!(parse("").unwrap().audit.max_flow_records_per_second, super::DEFAULT_MAX_FLOW_RECORDS_PER_SECOND);
    assert_eq!(parse("max_flow_records_per_second = 5\n").unwrap().audit.max_flow_records_per_second, 5);

    // Errors name the file, the line and the key.
    for (extra, words) in [
        ("allowed = \"some\"\n", "neither \"all\""),
        ("allowed = [\"web http\"]\n", "not a rule id glob"),
        ("allowed = [\"\"]\n", "not a rule id glob"),
        ("max_flow_records_per_second = 0\n", "out of range"),
    ] {
        let e = parse(extra).unwrap_err().to_string();
        let key = if extra.starts_with("max") { "audit.max_flow_records_per_second" } else { "audit.allowed" };
        assert!(e.contains("site.toml:5") && e.contains(key) && e.contains(words), "{extra}: {e}");
    }
    assert!(parse("allowed = 3\n").unwrap_err().to_string().contains("site.toml:5"));

    assert!(glob_match("*", "") && glob_match("a*b*c", "axxbyyc") && glob_match("w?b-*", "web-http"));
    assert!(!glob_match("a*b", "acb-") && !glob_match("?", "") && !glob_match("web-http", "web-https"));
    assert!(glob_match("**a", "a") && !glob_match("*a*a*a*a*a*b", &"a".repeat(60)));
}

#[test]
fn audited_rules_become_the_kernel_s_rule_bits() {
    let text = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\nworkstations = [\"10.0.0.0/24\"]\n\
                [features]\nweb = true\n[audit]\nallowed = [\"web-https\"]\n";
    let policy = crate::policy::compile(&parse(text, "site.toml").unwrap()).unwrap();
    let bits = policy.audit_bits();
    let audited: Vec<&str> = (1..policy.rules.len())
        .filter(|&i| pcguard_common::rule_audited(&bits, i as u16))
        .map(|i| policy.rules[i].id.as_str())
        .collect();
    assert_eq!(audited, ["web-https"]);
    let none = crate::policy::compile(&parse(&text.replace("[\"web-https\"]", "[]"), "site.toml").unwrap()).unwrap();
    assert_eq!(none.audit_bits(), [0; pcguard_common::AUDIT_RULE_WORDS]);
}
