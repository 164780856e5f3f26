use std::{collections::HashSet, net::IpAddr};

use pcguard_common::*;

use super::*;
use crate::{
    config::{self, SiteConfig},
    model::{Cidr, Direction, Protocol},
};

const LAB: &str = include_str!("../../../examples/lab.toml");
const HEAD: &str = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n";

fn cfg(body: &str) -> SiteConfig {
    config::parse(&format!("{HEAD}{body}"), "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn compiled(body: &str) -> CompiledPolicy {
    compile(&cfg(body)).unwrap()
}

fn lab() -> CompiledPolicy {
    compile(&config::parse(LAB, "lab.toml").unwrap()).unwrap()
}

/// The kernel's class lookup: the mask of the longest matching prefix.
fn peer_mask(p: &CompiledPolicy, addr: IpAddr) -> u32 {
    let matches = |octets: &[u8], len: u32| {
        let ip = match octets.len() {
            4 => IpAddr::from(<[u8; 4]>::try_from(octets).unwrap()),
            _ => IpAddr::from(<[u8; 16]>::try_from(octets).unwrap()),
        };
        Cidr::containing(addr, len as u8) == Cidr::containing(ip, len as u8) && ip.is_ipv4() == addr.is_ipv4()
    };
    let v4 = p.peers_v4.iter().filter(|e| matches(&e.addr, e.prefix_len)).map(|e| (e.prefix_len, e.mask));
    let v6 = p.peers_v6.iter().filter(|e| matches(&e.addr, e.prefix_len)).map(|e| (e.prefix_len, e.mask));
    v4.chain(v6).max_by_key(|(len, _)| *len).map_or(0, |(_, m)| m)
}

/// The kernel's `decide`: the id of the allowing rule, or None.
fn decide(p: &CompiledPolicy, dir: Direction, proto: Protocol, port: u16, peer: &str) -> Option<String> {
    let mask = peer_mask(p, peer.parse().unwrap());
    let idx = port_table_index(dir.dir_index(), proto.proto_index(), port);
    let entry = p.ports.iter().find(|(i, _)| *i == idx).map(|(_, e)| *e).unwrap_or_default();
    let slot = &p.slots[usize::from(entry.slot)];
    let m = mask & slot.allowed_mask;
    (m != 0).then(|| p.rules[usize::from(slot.rule_by_class[m.trailing_zeros() as usize])].id.clone())
}

fn inbound(p: &CompiledPolicy, port: u16, peer: &str) -> Option<String> {
    decide(p, Direction::Inbound, Protocol::Tcp, port, peer)
}

fn outbound(p: &CompiledPolicy, port: u16, peer: &str) -> Option<String> {
    decide(p, Direction::Outbound, Protocol::Tcp, port, peer)
}

fn label(p: &CompiledPolicy, dir: Direction, proto: Protocol, port: u16) -> &str {
    let idx = port_table_index(dir.dir_index(), proto.proto_index(), port);
    let entry = p.ports.iter().find(|(i, _)| *i == idx).map(|(_, e)| *e).unwrap_or_default();
    &p.port_labels[proto.proto_index() as usize][usize::from(entry.port_idx)]
}

#[test]
fn lab_verdicts() {
    let p = lab();
    let id = |s: &str| Some(s.to_string());
    assert_eq!(inbound(&p, 9191, "10.77.0.2"), id("web-http"));
    assert_eq!(inbound(&p, 9191, "fd77::2"), id("web-http"));
    assert_eq!(inbound(&p, 9193, "fd77::3"), id("device-rpc"));
    assert_eq!(inbound(&p, 22, "fd77::7"), id("admin-ssh"));
    assert_eq!(inbound(&p, 9191, "fd77::99"), None);
    assert_eq!(outbound(&p, 389, "fd77::5"), id("ldap"));
    assert_eq!(outbound(&p, 445, "fd77::2"), None);
    assert_eq!(inbound(&p, 9192, "10.77.0.4"), id("web-https"));
    assert_eq!(inbound(&p, 9193, "10.77.0.3"), id("device-rpc"));
    assert_eq!(inbound(&p, 9191, "10.77.0.3"), id("hp-inbound"));
    assert_eq!(inbound(&p, 22, "10.77.0.7"), id("admin-ssh"));
    // A port allowed for one class but not another.
    assert_eq!(inbound(&p, 9193, "10.77.0.2"), None);
    assert_eq!(inbound(&p, 22, "10.77.0.2"), None);
    assert_eq!(inbound(&p, 9191, "10.77.0.99"), None);
    assert_eq!(inbound(&p, 5432, "10.77.0.6"), None);
    assert_eq!(outbound(&p, 5432, "10.77.0.6"), id("db-postgresql"));
    assert_eq!(outbound(&p, 389, "10.77.0.5"), id("ldap"));
    assert_eq!(outbound(&p, 7627, "10.77.0.3"), id("hp-device"));
    assert_eq!(outbound(&p, 443, "10.77.0.3"), id("hp-outbound"));
    assert_eq!(outbound(&p, 5432, "10.77.0.2"), None);
    assert_eq!(outbound(&p, 443, "192.0.2.1"), None);
    assert_eq!(decide(&p, Direction::Inbound, Protocol::Udp, 9191, "10.77.0.2"), None);
}

#[test]
fn lab_settings_classes_and_limits_of_tables() {
    let p = lab();
    let s = p.settings.clone();
    assert_eq!((s.ingress_mode, s.egress_mode, s.allow_icmp), (Mode::Enforce, Mode::Enforce, true));
    assert_eq!(s.tcp_timeout, std::time::Duration::from_secs(600));
    assert_eq!(s.udp_timeout, std::time::Duration::from_secs(30));
    assert_eq!(s.report_interval, std::time::Duration::from_secs(60));
    let names: Vec<&str> = p.classes.iter().flatten().map(String::as_str).collect();
    assert_eq!(names, ["workstations", "secondary_servers", "devices", "admin", "ldap", "database", "any"]);
    assert_eq!(p.classes.len(), MAX_CLASSES);
    assert_eq!(p.class_bit("any"), Some(CLASS_ANY_BIT));
    assert_eq!(s.no_initiate_mask, 0b11);
    assert_eq!(p.rules[0].id, "none");
    assert_eq!(p.rules[1].id, "admin-ssh");
    assert_eq!(p.slots[0], PortSlot::default());
    assert_eq!(p.port_labels[PROTO_IDX_OTHER as usize], vec!["other"]);
    assert_eq!(p.port_labels[PROTO_IDX_TCP as usize][0], "other");
    assert_eq!(label(&p, Direction::Inbound, Protocol::Tcp, 9191), "9191");
    assert_eq!(label(&p, Direction::Inbound, Protocol::Tcp, 1), "other");
    assert_eq!(p.peers_v4.iter().find(|e| e.prefix_len == 0).unwrap().mask, CLASS_ANY);
    assert_eq!(p.peers_v6.iter().find(|e| e.prefix_len == 0).unwrap().mask, CLASS_ANY);
    let ws = p.peers_v4.iter().find(|e| e.addr == [10, 77, 0, 2]).unwrap();
    assert_eq!((ws.prefix_len, ws.mask), (32, CLASS_ANY | 1));
}

#[test]
fn priority_always_allow_then_site_then_catalog_order() {
    let body = "[peers]\nworkstations = [\"192.0.2.0/24\"]\nadmin = [\"198.51.100.7\"]\ndevices = [\"203.0.113.0/24\"]\n\
        [features]\nmfd = [\"hp\", \"canon\"]\n\
        [[rule]]\nname = \"site-web\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9191]\npeers = [\"workstations\", \"admin\"]\n\
        [[always_allow.rule]]\nname = \"admin-web\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9191]\npeers = [\"admin\"]\n";
    let p = compiled(body);
    let ids: Vec<&str> = p.rules.iter().skip(1).take(3).map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["admin-ssh", "admin-web", "site-web"]);
    assert_eq!(inbound(&p, 9191, "198.51.100.7").as_deref(), Some("admin-web"));
    assert_eq!(inbound(&p, 9191, "192.0.2.5").as_deref(), Some("site-web"));
    assert_eq!(inbound(&p, 9192, "192.0.2.5").as_deref(), Some("web-https"));
    // canon-inbound precedes hp-inbound in the catalog.
    assert_eq!(inbound(&p, 9191, "203.0.113.9").as_deref(), Some("canon-inbound"));
    assert_eq!(p.rules.iter().find(|r| r.id == "site-web").unwrap().origin, RuleOrigin::Site);
    assert_eq!(p.rules.iter().find(|r| r.id == "admin-web").unwrap().origin, RuleOrigin::AlwaysAllow);
    let table = rule_table(&p);
    let web_http = table.lines().find(|l| l.starts_with("web-http ")).unwrap();
    assert!(web_http.ends_with("catalog (shadowed)"), "{web_http}");
    // canon-inbound and device-rpc come first on all of hp-inbound's ports.
    let hp = table.lines().find(|l| l.starts_with("hp-inbound ")).unwrap();
    assert!(hp.ends_with("(shadowed)"), "{hp}");
    let canon = table.lines().find(|l| l.starts_with("canon-inbound ")).unwrap();
    assert!(canon.ends_with("catalog"), "{canon}");
}

#[test]
fn overlapping_cidrs_carry_every_containing_class() {
    let p = compiled("[peers]\nworkstations = [\"10.0.0.0/8\"]\nadmin = [\"10.1.2.3\"]\n");
    let admin = p.peers_v4.iter().find(|e| e.prefix_len == 32).unwrap();
    assert_eq!(admin.mask, CLASS_ANY | 0b11);
    assert_eq!(inbound(&p, 22, "10.1.2.3").as_deref(), Some("admin-ssh"));
    assert_eq!(inbound(&p, 9191, "10.1.2.3").as_deref(), Some("web-http"));
    assert_eq!(inbound(&p, 22, "10.1.2.4"), None);
    let info = p.class_info();
    let ws = info.iter().find(|c| c.name == "workstations").unwrap();
    assert_eq!(ws.cidrs, vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]);
    let admin = info.iter().find(|c| c.name == "admin").unwrap();
    assert_eq!(admin.cidrs, vec!["10.1.2.3/32".parse::<Cidr>().unwrap()]);
}

#[test]
fn ipv6_peers() {
    let p = compiled("[peers]\nworkstations = [\"2001:db8:10::/48\"]\nadmin = [\"2001:db8:10::10\", \"192.0.2.10\"]\n");
    assert_eq!(p.peers_v6.len(), 3);
    assert_eq!(inbound(&p, 9192, "2001:db8:10::99").as_deref(), Some("web-https"));
    assert_eq!(inbound(&p, 22, "2001:db8:10::10").as_deref(), Some("admin-ssh"));
    assert_eq!(inbound(&p, 22, "2001:db8:10::11"), None);
    assert_eq!(inbound(&p, 9192, "2001:db8:11::1"), None);
    assert_eq!(inbound(&p, 22, "192.0.2.10").as_deref(), Some("admin-ssh"));
}

#[test]
fn ranges_and_narrowest_labels() {
    let body = "[peers]\ndirectory = [\"192.0.2.1\"]\nadmin = [\"192.0.2.7\"]\n[features]\ndirectory = [\"active-directory\"]\n\
        [[rule]]\nname = \"agent\"\ndirection = \"outbound\"\nprotocol = \"tcp\"\nports = [50000]\npeers = [\"admin\"]\n";
    let p = compiled(body);
    let dir = Direction::Outbound;
    assert_eq!(outbound(&p, 49152, "192.0.2.1").as_deref(), Some("ad-rpc-dynamic"));
    assert_eq!(outbound(&p, 65535, "192.0.2.1").as_deref(), Some("ad-rpc-dynamic"));
    assert_eq!(outbound(&p, 49151, "192.0.2.1"), None);
    assert_eq!(outbound(&p, 50000, "192.0.2.7").as_deref(), Some("agent"));
    assert_eq!(outbound(&p, 50000, "192.0.2.1").as_deref(), Some("ad-rpc-dynamic"));
    assert_eq!(outbound(&p, 50001, "192.0.2.7"), None);
    assert_eq!(label(&p, dir, Protocol::Tcp, 49152), "49152-65535");
    assert_eq!(label(&p, dir, Protocol::Tcp, 50000), "50000");
    assert_eq!(label(&p, dir, Protocol::Tcp, 50001), "49152-65535");
    assert_eq!(label(&p, dir, Protocol::Udp, 88), "88");
    assert_eq!(decide(&p, dir, Protocol::Udp, 389, "192.0.2.1").as_deref(), Some("ad-ldap-udp"));
    let range_entries = p.ports.iter().filter(|(i, _)| {
        let base = port_table_index(DIR_EGRESS, PROTO_IDX_TCP, 0);
        (base + 49152..=base + 65535).contains(i)
    });
    assert_eq!(range_entries.count(), 16384);
}

#[test]
fn identical_slots_are_shared() {
    let p = lab();
    let distinct: HashSet<(u32, [u16; MAX_CLASSES])> =
        p.slots.iter().map(|s| (s.allowed_mask, s.rule_by_class)).collect();
    assert_eq!(distinct.len(), p.slots.len());
    let slot_of = |port: u16| {
        let idx = port_table_index(DIR_EGRESS, PROTO_IDX_TCP, port);
        p.ports.iter().find(|(i, _)| *i == idx).unwrap().1.slot
    };
    assert_eq!(slot_of(80), slot_of(443));
    assert_ne!(slot_of(80), slot_of(7627));
    let indexes: HashSet<u32> = p.ports.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes.len(), p.ports.len(), "a port table index listed twice");
}

#[test]
fn cloud_endpoints_get_a_class_with_fqdns_and_ips() {
    let p = compiled("[peers]\nworkstations = [\"192.0.2.0/24\"]\n[features]\nges = true\ncloud_services = true\n");
    let cloud = p.class_info().into_iter().find(|c| c.name == "cloud").unwrap();
    assert_eq!(cloud.cidrs, vec!["168.245.53.86/32".parse::<Cidr>().unwrap()]);
    assert!(cloud.fqdns.contains(&"mf.cloud.papercut.com".to_string()));
    assert!(cloud.fqdns.contains(&"*.papercut.com".to_string()));
    assert_eq!(outbound(&p, 443, "168.245.53.86").as_deref(), Some("ges"));
    assert_eq!(outbound(&p, 443, "192.0.2.1"), None);
}

#[test]
fn database_port_override_and_monitor_modes() {
    let text = HEAD.replace("enforce", "monitor")
        + "egress_mode = \"enforce\"\nallow_icmp = false\n[peers]\ndatabase = [\"192.0.2.6\"]\n[features]\ndatabase = \"postgresql\"\ndatabase_port = 6432\n";
    let p = compile(&config::parse(&text, "m.toml").unwrap()).unwrap();
    assert_eq!(outbound(&p, 6432, "192.0.2.6").as_deref(), Some("db-postgresql"));
    assert_eq!(outbound(&p, 5432, "192.0.2.6"), None);
    let s = p.settings;
    assert_eq!((s.ingress_mode, s.egress_mode, s.allow_icmp), (Mode::Monitor, Mode::Enforce, false));
    assert_eq!((s.mode(Direction::Inbound), s.mode(Direction::Outbound)), (Mode::Monitor, Mode::Enforce));
}

fn many_rules(n: usize, ports_per_rule: usize) -> String {
    let mut body = String::from("[peers]\nadmin = [\"192.0.2.7\"]\n");
    for i in 0..n {
        let ports: Vec<String> = (0..ports_per_rule).map(|k| (1000 + i * ports_per_rule + k).to_string()).collect();
        body.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\ndirection = \"inbound\"\nprotocol = \"udp\"\nports = [{}]\npeers = [\"admin\"]\n",
            ports.join(", ")
        ));
    }
    body
}

#[test]
fn limits() {
    // 509 site rules + admin-ssh, web-http and web-https (role defaults).
    let e = compile(&cfg(&many_rules(MAX_RULES as usize - 3, 1))).unwrap_err();
    assert_eq!(e, PolicyError::TooManyRules { count: MAX_RULES as usize, max: MAX_RULES as usize - 1 });
    assert!(e.to_string().starts_with("too many rules: 512 (at most 511)"));
    compile(&cfg(&many_rules(MAX_RULES as usize - 4, 1))).unwrap();
    let e = compile(&cfg(&many_rules(2, 300))).unwrap_err();
    assert_eq!(e, PolicyError::TooManyPortLabels { protocol: "udp", count: 601, max: MAX_PORT_LABELS as usize });
    let mut body = String::from("[peers]\n");
    let mut peers = Vec::new();
    for i in 0..32 {
        body.push_str(&format!("c{i} = [\"10.0.{i}.0/24\"]\n"));
        peers.push(format!("\"c{i}\""));
    }
    body.push_str(&format!(
        "[[rule]]\nname = \"all\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [1]\npeers = [{}]\n",
        peers.join(", ")
    ));
    let e = compile(&cfg(&body)).unwrap_err();
    assert_eq!(e, PolicyError::TooManyClasses { count: 32, max: 31 });
}

#[test]
fn rule_table_lists_rules_peers_and_classes() {
    let cfg = config::parse(LAB, "lab.toml").unwrap();
    let p = compile(&cfg).unwrap();
    let t = check_report(&cfg, &p);
    assert!(t.starts_with("lab.toml: role primary, interfaces pcg0\ningress enforce, egress enforce, ICMP allowed"));
    let row = t.lines().find(|l| l.starts_with("web-http ")).unwrap();
    for part in [
        "inbound",
        "tcp",
        "9191",
        "workstations[10.77.0.2/32 fd77::2/128]",
        "secondary_servers[10.77.0.4/32 fd77::4/128]",
        "enforce",
        "catalog",
    ] {
        assert!(row.contains(part), "{part} missing in {row}");
    }
    let ssh = t.lines().find(|l| l.starts_with("admin-ssh ")).unwrap();
    assert!(ssh.contains("always") && ssh.contains("always-allow"), "{ssh}");
    assert!(t.contains("peer classes:"));
    assert!(t.lines().any(|l| l.starts_with("31 ") && l.contains("any") && l.contains("0.0.0.0/0, ::/0")));
    assert!(t.contains("notes:\n- features.dns (default) not enabled"));
}

#[test]
fn rules_json_has_rules_modes_and_classes() {
    let p = lab();
    let j = rules_json(&p);
    assert_eq!(j["ingress_mode"], "enforce");
    assert_eq!(j["no_initiate"], serde_json::json!(["workstations", "secondary_servers"]));
    let rules = j["rules"].as_array().unwrap();
    assert_eq!(rules.len(), p.rules.len() - 1);
    let ssh = &rules[0];
    assert_eq!((ssh["id"].as_str(), ssh["rule_id"].as_u64()), (Some("admin-ssh"), Some(1)));
    assert_eq!((ssh["mode"].as_str(), ssh["origin"].as_str()), (Some("always"), Some("always_allow")));
    let hp = rules.iter().find(|r| r["id"] == "hp-inbound").unwrap();
    assert_eq!(hp["ports"], serde_json::json!(["9191", "9192", "9193"]));
    assert_eq!(hp["shadowed"], false);
    let ws = j["classes"].as_array().unwrap().iter().find(|c| c["name"] == "workstations").unwrap();
    assert_eq!(ws["cidrs"], serde_json::json!(["10.77.0.2/32", "fd77::2/128"]));
}

#[test]
fn too_many_prefixes() {
    let mut policy = build(&cfg("[peers]\nworkstations = [\"10.0.0.0/8\"]\n"));
    let hosts = (0..PEER_ENTRIES).map(|i| Cidr::containing(IpAddr::from([10, 0, (i >> 8) as u8, i as u8]), 32));
    policy.classes[0].cidrs.extend(hosts);
    let e = compile_policy(&policy, &mut StableIds::default()).unwrap_err();
    let max = PEER_ENTRIES as usize;
    assert_eq!(e, PolicyError::TooManyPrefixes { family: "IPv4", count: max + 2, max });
    policy.classes[0].cidrs.truncate(max - 1);
    assert_eq!(compile_policy(&policy, &mut StableIds::default()).unwrap().peers_v4.len(), max);
}

#[test]
fn resolvers_are_the_peers_of_outbound_dns_rules() {
    let p = compiled(
        "[peers]\nworkstations = [\"10.1.0.0/16\"]\ndns = [\"10.0.0.53\"]\ndirectory = [\"10.0.0.10\"]\n\
         [features]\ndirectory = [\"active-directory\"]\n",
    );
    let bits = |names: &[&str]| names.iter().map(|n| 1u32 << p.class_bit(n).unwrap()).fold(0, |a, b| a | b);
    assert_eq!(p.settings.resolver_mask, bits(&["dns", "directory"]));
    // No resolver configured: no DNS answers are trusted.
    assert_eq!(lab().settings.resolver_mask, 0);
}

#[test]
fn peer_mask_is_the_longest_prefix_match_like_the_kernel() {
    let p = compiled("[peers]\nworkstations = [\"10.1.0.0/16\", \"2001:db8::/32\"]\nadmin = [\"10.1.2.3\"]\n");
    for addr in ["10.1.2.3", "10.1.9.9", "10.2.0.1", "2001:db8::1", "2001:db9::1"] {
        let a: IpAddr = addr.parse().unwrap();
        assert_eq!(p.peer_mask(a), peer_mask(&p, a), "{addr}");
    }
    assert_eq!(p.peer_mask("10.2.0.1".parse().unwrap()), CLASS_ANY);
}

/// `CompiledPolicy::decide` as the rule id it names, and the port label.
fn allowed(p: &CompiledPolicy, dir: Direction, proto: Protocol, port: u16, peer: &str) -> Option<(String, String)> {
    let a = p.decide(dir, proto, port, peer.parse().unwrap())?;
    let label = p.port_labels[proto.proto_index() as usize][usize::from(a.port_idx)].clone();
    Some((p.rules[usize::from(a.rule)].id.clone(), label))
}

#[test]
fn compiled_decide_names_the_rule_and_port_label_the_kernel_would() {
    let p = lab();
    let (tcp, udp, inb, out) = (Protocol::Tcp, Protocol::Udp, Direction::Inbound, Direction::Outbound);
    let some = |rule: &str, label: &str| Some((rule.to_string(), label.to_string()));
    assert_eq!(allowed(&p, inb, tcp, 9191, "10.77.0.2"), some("web-http", "9191"));
    assert_eq!(allowed(&p, inb, tcp, 9191, "fd77::2"), some("web-http", "9191"));
    // A dual-stack socket's view of an IPv4 peer: the packets carry IPv4.
    assert_eq!(allowed(&p, inb, tcp, 9191, "::ffff:10.77.0.2"), some("web-http", "9191"));
    assert_eq!(allowed(&p, inb, tcp, 9192, "10.77.0.4"), some("web-https", "9192"));
    assert_eq!(allowed(&p, inb, tcp, 9191, "10.77.0.3"), some("hp-inbound", "9191"));
    assert_eq!(allowed(&p, inb, tcp, 22, "fd77::7"), some("admin-ssh", "22"));
    assert_eq!(allowed(&p, out, tcp, 389, "10.77.0.5"), some("ldap", "389"));
    assert_eq!(allowed(&p, out, tcp, 389, "fd77::5"), some("ldap", "389"));
    assert_eq!(allowed(&p, out, tcp, 443, "10.77.0.3"), some("hp-outbound", "443"));
    // The unclassified host, a class without the rule, a port without one,
    // the wrong direction or protocol.
    assert_eq!(allowed(&p, inb, tcp, 9191, "10.77.0.99"), None);
    assert_eq!(allowed(&p, inb, tcp, 9191, "::ffff:10.77.0.99"), None);
    assert_eq!(allowed(&p, inb, tcp, 22, "10.77.0.2"), None);
    assert_eq!(allowed(&p, inb, tcp, 9999, "10.77.0.2"), None);
    assert_eq!(allowed(&p, inb, tcp, 389, "10.77.0.5"), None);
    assert_eq!(allowed(&p, out, tcp, 9191, "10.77.0.2"), None);
    assert_eq!(allowed(&p, inb, udp, 9191, "10.77.0.2"), None);
    assert_eq!(allowed(&p, out, tcp, 445, "10.77.0.2"), None);
}

#[test]
fn compiled_decide_takes_the_rule_of_the_lowest_class_bit() {
    // 10.1.0.7 is both a workstation (bit 0) and an admin (bit 3); the
    // always-allow rule for admins comes first for the admin class only.
    let p = compiled(
        "[peers]\nworkstations = [\"10.0.0.0/8\"]\nadmin = [\"10.1.0.7\"]\n[features]\nweb = true\n\
         [[always_allow.rule]]\nname = \"admin-web\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9191]\npeers = [\"admin\"]\n",
    );
    let admin_bit = p.class_bit("admin").unwrap();
    assert!(admin_bit > p.class_bit("workstations").unwrap());
    let a = p.decide(Direction::Inbound, Protocol::Tcp, 9191, "10.1.0.7".parse().unwrap()).unwrap();
    assert_eq!(p.rules[usize::from(a.rule)].id, "web-http");
    // The admin class alone gets its own rule.
    let p2 = compiled(
        "[peers]\nworkstations = [\"10.0.0.0/8\"]\nadmin = [\"192.0.2.7\"]\n[features]\nweb = true\n\
         [[always_allow.rule]]\nname = \"admin-web\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [9191]\npeers = [\"admin\"]\n",
    );
    let a = p2.decide(Direction::Inbound, Protocol::Tcp, 9191, "192.0.2.7".parse().unwrap()).unwrap();
    assert_eq!(p2.rules[usize::from(a.rule)].id, "admin-web");
}

#[test]
fn compiled_decide_agrees_with_the_kernel_model_on_every_port() {
    let peers = ["10.77.0.2", "10.77.0.3", "10.77.0.5", "10.77.0.7", "10.77.0.99", "fd77::4", "fd77::6", "2001:db8::1"];
    for p in [
        lab(),
        compiled(
            "[peers]\nworkstations = [\"10.77.0.0/24\"]\ndevices = [\"10.77.0.3\"]\n[features]\nmfd = [\"hp\", \"canon\"]\n",
        ),
    ] {
        for dir in [Direction::Inbound, Direction::Outbound] {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                for port in 0..=u16::MAX {
                    for peer in peers {
                        let got = p
                            .decide(dir, proto, port, peer.parse().unwrap())
                            .map(|a| p.rules[usize::from(a.rule)].id.clone());
                        assert_eq!(got, decide(&p, dir, proto, port, peer), "{dir:?} {proto:?} {port} {peer}");
                    }
                }
            }
        }
    }
}

#[test]
fn compiled_decide_allows_nothing_through_a_bad_slot() {
    let any = PeerPrefix { addr: [0; 4], prefix_len: 0, mask: CLASS_ANY };
    let idx = port_table_index(DIR_INGRESS, PROTO_IDX_TCP, 80);
    let slot = PortSlot { allowed_mask: CLASS_ANY, rule_by_class: [1; MAX_CLASSES] };
    let mut p = CompiledPolicy { peers_v4: vec![any], slots: vec![PortSlot::default(), slot], ..Default::default() };
    let remote: IpAddr = "192.0.2.1".parse().unwrap();
    for (entry, want) in [(1, Some(Allowed { rule: 1, port_idx: 5 })), (0, None), (2, None), (MAX_SLOTS as u16, None)] {
        p.ports = vec![(idx, PortEntry { slot: entry, port_idx: 5 })];
        assert_eq!(p.decide(Direction::Inbound, Protocol::Tcp, 80, remote), want, "slot {entry}");
    }
    // No prefix for the family: peer mask 0.
    p.ports = vec![(idx, PortEntry { slot: 1, port_idx: 5 })];
    assert_eq!(p.decide(Direction::Inbound, Protocol::Tcp, 80, "2001:db8::1".parse().unwrap()), None);
}
