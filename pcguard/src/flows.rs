//! Unexpected flows: decoding ring-buffer events into audit records, the
//! JSON-lines audit log, and following that log (`pcguard flows`).

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use pcguard_common::{
    FAMILY_V4, FlowEvent, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Malformed, PacketDir, Reason,
    UNKNOWN, Verdict,
};
use serde::{Deserialize, Serialize};

use crate::{model::Direction, policy::CompiledPolicy};

/// Reason of an audit record for an address a DNS answer gave one of the
/// policy's names but that no answer may open (a workstation, this server,
/// a resolver, loopback, multicast, ...): not learned (`pcguard::dns::guard`).
/// The kernel's reasons are [`Reason`]s.
pub const DNS_POISONING: &str = "dns_poisoning";

/// Every reason label (the kernel's, then `dns_poisoning`), for metrics
/// initialisation.
pub fn reason_labels() -> impl Iterator<Item = &'static str> {
    Reason::ALL.into_iter().map(Reason::as_str).chain([DNS_POISONING])
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

/// One line of the audit log: one unexpected flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 time the flow's first packet was seen.
    pub ts: String,
    /// `alert` for a server-initiated flow to a workstation or secondary
    /// server (the document's key invariant), `warning` otherwise.
    pub severity: String,
    pub reason: String,
    /// `inbound` (a peer opened it) or `outbound` (this server opened it).
    pub direction: String,
    /// `dropped` (enforce) or `would_drop` (monitor: passed and reported).
    pub verdict: String,
    pub protocol: String,
    pub local: Endpoint,
    pub remote: Endpoint,
    /// Peer classes of the remote address (`any` alone: unclassified).
    pub peer_classes: Vec<String>,
    /// Rules that cover this (direction, protocol, port) for other peers;
    /// empty when no rule covers the port.
    pub port_rules: Vec<String>,
    pub interface: String,
    pub tcp_flags: String,
    pub packet_bytes: u32,
    /// `dns_poisoning`: the question the answer was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// `dns_poisoning`: the address that was not learned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_address: Option<IpAddr>,
    /// `dns_poisoning`: why (`special`, `own_address`, `resolver`,
    /// `local_class`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_refusal: Option<String>,
    /// Records of the same kind held back by the rate limit since the last
    /// one written (`dns_poisoning`: same resolver, name and refusal; flows:
    /// same source, destination port and reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// Packets from the same source to the same destination port for the
    /// same reason that the kernel did not report on their own since its
    /// previous report (a port scan from one address is one record with a
    /// count, not one per source port).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeats: u32,
    /// `malformed`: what was wrong (`l4_truncated`, `too_many_vlan_tags`,
    /// ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An answered address refused by the DNS guard, for its audit record.
#[derive(Clone, Debug)]
pub struct DnsRefusal {
    pub resolver: IpAddr,
    /// This server's port the answer came to.
    pub server_port: u16,
    pub name: String,
    pub addr: IpAddr,
    /// `Forbidden::as_str`.
    pub refusal: &'static str,
    /// Length of the DNS message.
    pub msg_len: u16,
    /// Records for the same (resolver, name, refusal) not written since the
    /// last one.
    pub suppressed: u64,
}

impl AuditRecord {
    /// Builds the record for `ev` using the policy that was running.
    pub fn from_event(ev: &FlowEvent, policy: &CompiledPolicy, seen: SystemTime) -> Self {
        let k = &ev.key;
        let reason = Reason::try_from(ev.reason);
        let severity = if reason == Ok(Reason::OutboundToWorkstation) { "alert" } else { "warning" };
        Self {
            ts: humantime::format_rfc3339_millis(seen).to_string(),
            severity: severity.into(),
            reason: Reason::name_of(ev.reason).into(),
            direction: flow_direction(ev.direction).into(),
            // `dropped` (enforce) or `would_drop` (monitor).
            verdict: Verdict::name_of(ev.verdict).into(),
            protocol: protocol_name(k.proto),
            local: Endpoint { addr: addr(k.family, &k.local_addr), port: k.local_port },
            remote: Endpoint { addr: addr(k.family, &k.remote_addr), port: k.remote_port },
            peer_classes: class_names(policy, ev.peer_mask),
            port_rules: slot_rules(policy, ev.slot),
            interface: crate::sys::ifname(ev.ifindex).unwrap_or_else(|| ev.ifindex.to_string()),
            tcp_flags: tcp_flags(ev.tcp_flags),
            packet_bytes: ev.pkt_len,
            dns_name: None,
            dns_address: None,
            dns_refusal: None,
            suppressed: None,
            repeats: ev.repeats,
            malformed: (reason == Ok(Reason::Malformed)).then(|| {
                Malformed::try_from(ev.detail)
                    .map(|m| m.as_str().to_string())
                    .unwrap_or_else(|v| format!("{UNKNOWN}_{v}"))
            }),
        }
    }

    /// The record of an answered address the DNS guard refused: an alert,
    /// inbound from the resolver's port 53 (the resolver is the remote
    /// end; the local address is not in the kernel's record, so it is the
    /// unspecified address). Nothing was dropped: the address was
    /// `not_learned`.
    pub fn from_dns_refusal(r: &DnsRefusal, policy: &CompiledPolicy, seen: SystemTime) -> Self {
        let local =
            if r.resolver.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
        Self {
            ts: humantime::format_rfc3339_millis(seen).to_string(),
            severity: "alert".into(),
            reason: DNS_POISONING.into(),
            direction: Direction::Inbound.as_str().into(),
            verdict: "not_learned".into(),
            protocol: "udp".into(),
            local: Endpoint { addr: local, port: r.server_port },
            remote: Endpoint { addr: r.resolver, port: 53 },
            peer_classes: class_names(policy, policy.peer_mask(r.resolver)),
            port_rules: Vec::new(),
            interface: String::new(),
            tcp_flags: String::new(),
            packet_bytes: r.msg_len.into(),
            dns_name: Some(r.name.clone()),
            dns_address: Some(r.addr),
            dns_refusal: Some(r.refusal.into()),
            suppressed: Some(r.suppressed),
            repeats: 0,
            malformed: None,
        }
    }

    /// One-line human form for `pcguard flows`.
    pub fn human(&self) -> String {
        format!(
            "{} {:7} {:24} {:8} {:3} {} -> {}  peer={} rules={} if={}",
            self.ts,
            self.severity.to_uppercase(),
            self.reason,
            self.direction,
            self.protocol,
            fmt_endpoint(self.direction_src()),
            fmt_endpoint(self.direction_dst()),
            self.peer_classes.join(","),
            if self.port_rules.is_empty() { "-".to_string() } else { self.port_rules.join(",") },
            self.interface,
        ) + &format!("  [{}]", self.verdict)
            + &self.dns_human()
    }

    /// The DNS part of a `dns_poisoning` record, for `human`.
    fn dns_human(&self) -> String {
        match (&self.dns_name, &self.dns_address) {
            (Some(name), Some(addr)) => format!(
                "  dns: {name} -> {addr} ({}){}",
                self.dns_refusal.as_deref().unwrap_or("refused"),
                self.suppressed.filter(|&n| n > 0).map(|n| format!(", {n} more suppressed")).unwrap_or_default()
            ),
            _ => String::new(),
        }
    }

    fn direction_src(&self) -> &Endpoint {
        if self.direction == "inbound" { &self.remote } else { &self.local }
    }

    fn direction_dst(&self) -> &Endpoint {
        if self.direction == "inbound" { &self.local } else { &self.remote }
    }
}

/// The audit direction of a report of a packet that travelled `dir`
/// ([`PacketDir`]): a flow a peer opens is reported at ingress, one this
/// server opens at egress.
pub(crate) fn flow_direction(dir: u8) -> &'static str {
    match PacketDir::try_from(dir) {
        Ok(PacketDir::Ingress) => Direction::Inbound.as_str(),
        Ok(PacketDir::Egress) => Direction::Outbound.as_str(),
        Err(_) => UNKNOWN,
    }
}

fn fmt_endpoint(e: &Endpoint) -> String {
    match e.addr {
        IpAddr::V6(a) => format!("[{a}]:{}", e.port),
        IpAddr::V4(a) => format!("{a}:{}", e.port),
    }
}

pub(crate) fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

pub(crate) fn protocol_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        p => format!("ip-{p}"),
    }
}

fn tcp_flags(f: u8) -> String {
    const NAMES: [(u8, &str); 6] =
        [(0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x20, "URG")];
    NAMES.iter().filter(|(bit, _)| f & bit != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
}

/// Names of the classes in `mask` (most specific first; `any` last).
pub fn class_names(policy: &CompiledPolicy, mask: u32) -> Vec<String> {
    let mut names: Vec<String> = (0..32u32)
        .filter(|bit| mask & (1 << bit) != 0)
        .filter_map(|bit| policy.classes.get(bit as usize).cloned().flatten())
        .collect();
    if names.is_empty() {
        names.push("any".into());
    }
    names
}

fn slot_rules(policy: &CompiledPolicy, slot: u16) -> Vec<String> {
    let Some(s) = policy.slots.get(slot as usize).filter(|_| slot != 0) else { return Vec::new() };
    let mut ids: Vec<String> = s
        .rule_by_class
        .iter()
        .filter(|&&r| r != 0)
        .filter_map(|&r| policy.rules.get(r as usize).map(|r| r.id.clone()))
        .filter(|id| !id.is_empty())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Converts a `bpf_ktime_get_ns()` timestamp to wall-clock time.
pub fn ktime_to_system(ts_ns: u64) -> SystemTime {
    let now_ns = crate::sys::monotonic_ns();
    SystemTime::now() - Duration::from_nanos(now_ns.saturating_sub(ts_ns))
}

/// At most one record per key per interval, for records that do not come
/// with the kernel's per-flow rate limit (`dns_poisoning`); counts what it
/// holds back. Holds at most `cap` keys: when full, records of new keys
/// are held back (and not counted) until the interval frees room.
pub struct KeyedLimit<K> {
    interval: Duration,
    cap: usize,
    /// Key -> (when a record was last written, records held back since).
    seen: HashMap<K, (Instant, u64)>,
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLimit<K> {
    pub fn new(interval: Duration, cap: usize) -> Self {
        Self { interval, cap, seen: HashMap::new() }
    }

    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// `Some(held back since the last one)` when a record for `key` may be
    /// written now; `None` when it is held back.
    pub fn admit(&mut self, key: &K, now: Instant) -> Option<u64> {
        if let Some((last, held)) = self.seen.get_mut(key) {
            if now.duration_since(*last) < self.interval {
                *held += 1;
                return None;
            }
            let n = std::mem::take(held);
            *last = now;
            return Some(n);
        }
        if self.seen.len() >= self.cap {
            let interval = self.interval;
            self.seen.retain(|_, (t, _)| now.duration_since(*t) < interval);
            if self.seen.len() >= self.cap {
                return None;
            }
        }
        self.seen.insert(key.clone(), (now, 0));
        Some(0)
    }
}

pub mod query;

/// Filters of `pcguard flows`.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `--type`: unexpected (default), allowed or all records.
    pub kind: query::Kind,
    /// `--rule`: the rule of an allowed record, one of the `port_rules` of
    /// an unexpected one (`*` and `?` globs).
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub direction: Option<String>,
    pub peer_class: Option<String>,
    pub port: Option<u16>,
    pub addr: Option<IpAddr>,
    pub severity: Option<String>,
    /// Records at or after this time (`--since`).
    pub since: Option<SystemTime>,
    /// Records at or before this time (`--until`).
    pub until: Option<SystemTime>,
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.reason.as_ref().is_none_or(|x| &r.reason == x)
            && self.direction.as_ref().is_none_or(|x| &r.direction == x)
            && self.severity.as_ref().is_none_or(|x| &r.severity == x)
            && self.peer_class.as_ref().is_none_or(|x| r.peer_classes.contains(x))
            && self.port.is_none_or(|p| r.local.port == p || r.remote.port == p)
            && self.addr.is_none_or(|a| r.local.addr == a || r.remote.addr == a || r.dns_address == Some(a))
            && self.in_time(r)
    }

    fn in_time(&self, r: &AuditRecord) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        // A record whose time does not parse is outside every window.
        let Ok(t) = humantime::parse_rfc3339_weak(&r.ts) else { return false };
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
    }
}

/// `--since` / `--until`: an RFC 3339 time (UTC, `Z`), or a duration
/// (`90s`, `2h`, `1d 12h`) meaning that long before `now`.
pub fn parse_time(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return now.checked_sub(d).ok_or_else(|| format!("\"{s}\" reaches before the epoch"));
    }
    humantime::parse_rfc3339_weak(s).map_err(|_| {
        format!("\"{s}\" is neither a duration (e.g. 90s, 2h, 1d) nor an RFC 3339 UTC time (e.g. 2026-11-27T10:00:00Z)")
    })
}

/// What a line of the audit log holds, for `pcguard flows`.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A flow or `dns_poisoning` record: schema 1 (`json` or `ecs`
    /// format), or from before schema 1.
    Flow(Box<AuditRecord>),
    /// A summary or a record of another event type (not shown).
    Other,
    /// Not a record.
    Invalid,
}

/// Reads one line of the audit log.
pub fn parse_line(line: &str) -> Line {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { return Line::Invalid };
    if v.get("@timestamp").is_some() {
        return from_ecs(&v).map_or(Line::Other, |r| Line::Flow(Box::new(r)));
    }
    match v.get("event_type").and_then(|t| t.as_str()) {
        None | Some("unexpected_flow" | "dns_poisoning") => {}
        Some(_) => return Line::Other,
    }
    if v.get("event").is_some() {
        return Line::Other;
    }
    serde_json::from_value::<AuditRecord>(v).map_or(Line::Invalid, |r| Line::Flow(Box::new(r)))
}

/// A flow record of the `ecs` format, back in pcguard's own fields
/// (`crate::audit::ecs_flow` in reverse); `None` for other records.
fn from_ecs(v: &serde_json::Value) -> Option<AuditRecord> {
    let p = v.get("pcguard")?;
    if !matches!(p.get("event_type")?.as_str()?, "unexpected_flow" | "dns_poisoning") {
        return None;
    }
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let names = |v: &serde_json::Value| -> Option<Vec<String>> { v.as_array()?.iter().map(s).collect() };
    let endpoint = |e: &serde_json::Value| -> Option<Endpoint> {
        Some(Endpoint {
            addr: e.get("ip")?.as_str()?.parse().ok()?,
            port: u16::try_from(e.get("port")?.as_u64()?).ok()?,
        })
    };
    let direction = s(&p["direction"])?;
    let (src, dst) = (endpoint(&v["source"])?, endpoint(&v["destination"])?);
    let (local, remote) = if direction == "inbound" { (dst, src) } else { (src, dst) };
    let side = if direction == "inbound" { "ingress" } else { "egress" };
    Some(AuditRecord {
        ts: s(&v["@timestamp"])?,
        severity: s(&v["log"]["level"])?,
        reason: s(&p["reason"])?,
        direction,
        verdict: s(&p["verdict"])?,
        protocol: s(&p["protocol"])?,
        local,
        remote,
        peer_classes: names(&p["peer_classes"])?,
        port_rules: names(&p["port_rules"])?,
        interface: s(&v["observer"][side]["interface"]["name"]).unwrap_or_default(),
        tcp_flags: s(&p["tcp_flags"]).unwrap_or_default(),
        packet_bytes: p["packet_bytes"].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        dns_name: s(&v["dns"]["question"]["name"]),
        dns_address: v["dns"]["resolved_ip"][0].as_str().and_then(|a| a.parse().ok()),
        dns_refusal: s(&p["dns_refusal"]),
        suppressed: p["suppressed"].as_u64(),
        repeats: p["repeats"].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        malformed: s(&p["malformed"]),
    })
}

/// Prints matching records of the audit logs `set` (oldest first, as
/// [`query::log_set`] orders them): the last `tail` records that match
/// (filter first, then count), then (if `follow`) new matching ones as they
/// are written to the live log (the last file of `set`, unless it is a
/// rotated one), across rotation. Reads both formats (`json`, `ecs`),
/// records from before schema 1 and gzipped rotated files; summaries are
/// not shown.
pub fn follow(
    set: &[std::path::PathBuf],
    filter: &Filter,
    tail: usize,
    follow: bool,
    json: bool,
    mut out: impl Write,
) -> Result<()> {
    let print = |out: &mut dyn Write, line: &str| -> Result<()> {
        if let Some(text) = query::render(line, json) {
            writeln!(out, "{text}")?;
            out.flush()?;
        }
        Ok(())
    };
    for line in query::tail(set, filter, tail)? {
        print(&mut out, &line)?;
    }
    let Some(path) = set.last().filter(|p| follow && !query::is_rotated(p)) else { return Ok(()) };
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pos = file.seek(SeekFrom::End(0))?;
    let mut partial = String::new();
    loop {
        // Rotated (new inode) or truncated: start over on the new file.
        let rotated = std::fs::metadata(path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino() != file.metadata().map(|f| f.ino()).unwrap_or(0) || m.len() < pos
        });
        if rotated == Some(true) {
            file = File::open(path)?;
            pos = 0;
            partial.clear();
        }
        file.seek(SeekFrom::Start(pos))?;
        let mut r = BufReader::new(&file);
        loop {
            let n = r.read_line(&mut partial)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            if partial.ends_with('\n') {
                let selected = query::parse(partial.trim_end().as_bytes()).with(|f| f.matches(filter));
                if selected == Some(true) {
                    print(&mut out, &partial)?;
                }
                partial.clear();
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CompiledPolicy {
        let text = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\n\
                    dns = [\"10.0.0.53\"]\n[features]\nges = true\n";
        crate::policy::compile(&crate::config::parse(text, "t.toml").unwrap()).unwrap()
    }

    fn refusal() -> DnsRefusal {
        DnsRefusal {
            resolver: "10.0.0.53".parse().unwrap(),
            server_port: 40000,
            name: "mf.cloud.papercut.com".into(),
            addr: "10.1.2.3".parse().unwrap(),
            refusal: "local_class",
            msg_len: 80,
            suppressed: 2,
        }
    }

    #[test]
    fn dns_poisoning_records_carry_the_name_address_and_refusal() {
        let rec = AuditRecord::from_dns_refusal(&refusal(), &policy(), SystemTime::now());
        let json: serde_json::Value = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["severity"], "alert");
        assert_eq!(json["reason"], DNS_POISONING);
        assert_eq!(json["dns_name"], "mf.cloud.papercut.com");
        assert_eq!(json["dns_address"], "10.1.2.3");
        assert_eq!(json["dns_refusal"], "local_class");
        assert_eq!(json["suppressed"], 2);
        assert_eq!((json["remote"]["addr"].as_str(), json["remote"]["port"].as_u64()), (Some("10.0.0.53"), Some(53)));
        assert!(json["peer_classes"].as_array().unwrap().iter().any(|c| c == "dns"), "{json}");
        assert!(
            rec.human().contains("dns: mf.cloud.papercut.com -> 10.1.2.3 (local_class), 2 more suppressed"),
            "{}",
            rec.human()
        );
        // `pcguard flows --addr` finds it by the refused address too.
        let filter = Filter {
            addr: Some("10.1.2.3".parse().unwrap()),
            reason: Some(DNS_POISONING.into()),
            ..Default::default()
        };
        assert!(filter.matches(&rec));
        // Round trip through the log.
        assert_eq!(serde_json::from_value::<AuditRecord>(json).unwrap(), rec);
    }

    #[test]
    fn flow_records_keep_their_format() {
        let line = r#"{"ts":"2026-11-26T20:31:02.114Z","severity":"alert","reason":"outbound_to_workstation","direction":"outbound","verdict":"dropped","protocol":"tcp","local":{"addr":"10.77.0.1","port":41234},"remote":{"addr":"10.77.0.2","port":445},"peer_classes":["workstations"],"port_rules":[],"interface":"pcg0","tcp_flags":"SYN","packet_bytes":74}"#;
        let rec: AuditRecord = serde_json::from_str(line).unwrap();
        assert_eq!((rec.dns_name.as_ref(), rec.suppressed), (None, None));
        assert_eq!(serde_json::to_string(&rec).unwrap(), line, "no new keys in flow records");
        assert!(!rec.human().contains("dns:"));
    }

    fn event(direction: u8, reason: u8, verdict: u8, detail: u8) -> FlowEvent {
        let mut key = pcguard_common::FlowKey {
            family: FAMILY_V4,
            proto: IPPROTO_TCP,
            local_port: 9999,
            remote_port: 40000,
            ..Default::default()
        };
        key.local_addr[..4].copy_from_slice(&[10, 77, 0, 1]);
        key.remote_addr[..4].copy_from_slice(&[10, 77, 0, 2]);
        FlowEvent { key, direction, reason, verdict, detail, tcp_flags: 0x02, ..Default::default() }
    }

    #[test]
    fn flow_records_name_the_kernel_codes() {
        use pcguard_common::*;
        let p = policy();
        let rec = |ev: FlowEvent| AuditRecord::from_event(&ev, &p, SystemTime::now());
        let r = rec(event(DIR_INGRESS as u8, REASON_NO_RULE, VERDICT_DROP as u8, 0));
        assert_eq!(
            (r.severity.as_str(), r.reason.as_str(), r.direction.as_str(), r.verdict.as_str(), r.malformed),
            ("warning", "no_rule", "inbound", "dropped", None)
        );
        let r = rec(event(DIR_EGRESS as u8, REASON_OUTBOUND_TO_WORKSTATION, VERDICT_MONITOR as u8, 0));
        assert_eq!(
            (r.severity.as_str(), r.reason.as_str(), r.direction.as_str(), r.verdict.as_str()),
            ("alert", "outbound_to_workstation", "outbound", "would_drop")
        );
        let r = rec(event(DIR_INGRESS as u8, REASON_MALFORMED, VERDICT_DROP as u8, Malformed::L4Truncated as u8));
        assert_eq!((r.reason.as_str(), r.malformed.as_deref()), ("malformed", Some("l4_truncated")));
        for reason in Reason::ALL {
            assert_eq!(rec(event(0, reason as u8, 1, 0)).reason, reason.as_str());
        }
        // Values this build does not know are named so, never taken for
        // another code.
        let r = rec(event(7, 200, 9, 0));
        assert_eq!(
            (r.severity.as_str(), r.reason.as_str(), r.direction.as_str(), r.verdict.as_str()),
            ("warning", UNKNOWN, UNKNOWN, UNKNOWN)
        );
        let r = rec(event(0, REASON_MALFORMED, 1, 99));
        assert_eq!(r.malformed.as_deref(), Some("unknown_99"));
        assert_eq!(
            reason_labels().collect::<Vec<_>>(),
            ["no_rule", "peer_not_allowed", "outbound_to_workstation", "malformed", "untracked_reply", "dns_poisoning"]
        );
    }

    #[test]
    fn keyed_limit_writes_one_record_per_key_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = KeyedLimit::new(Duration::from_secs(60), 2);
        assert_eq!(l.admit(&"a", t0), Some(0));
        assert_eq!(l.admit(&"a", t0 + s), None);
        assert_eq!(l.admit(&"a", t0 + 2 * s), None);
        assert_eq!(l.admit(&"b", t0), Some(0));
        // Full: a third key waits until the interval frees room.
        assert_eq!(l.admit(&"c", t0 + s), None);
        assert_eq!(l.admit(&"a", t0 + 60 * s), Some(2), "the two held back");
        assert_eq!(l.admit(&"c", t0 + 61 * s), Some(0));
        assert_eq!(l.seen.len(), 2);
    }
}
