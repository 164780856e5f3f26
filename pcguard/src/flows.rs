//! Unexpected flows: decoding ring-buffer events into audit records, the
//! JSON-lines audit log, and following that log (`pcguard flows`).

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use pcguard_common::{
    DIR_INGRESS, FAMILY_V4, FlowEvent, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    REASON_MALFORMED, REASON_NO_RULE, REASON_OUTBOUND_TO_WORKSTATION, REASON_PEER_NOT_ALLOWED, REASON_UNTRACKED_REPLY,
    VERDICT_DROP,
};
use serde::{Deserialize, Serialize};

use crate::policy::{CompiledPolicy, Direction};

/// Reason labels (metrics and audit), by `REASON_*` value.
pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_NO_RULE => "no_rule",
        REASON_PEER_NOT_ALLOWED => "peer_not_allowed",
        REASON_OUTBOUND_TO_WORKSTATION => "outbound_to_workstation",
        REASON_MALFORMED => "malformed",
        REASON_UNTRACKED_REPLY => "untracked_reply",
        _ => "unknown",
    }
}

/// Every reason label, for metrics initialisation.
pub const REASONS: [&str; 5] = ["no_rule", "peer_not_allowed", "outbound_to_workstation", "malformed", "untracked_reply"];

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
}

impl AuditRecord {
    /// Builds the record for `ev` using the policy that was running.
    pub fn from_event(ev: &FlowEvent, policy: &CompiledPolicy, seen: SystemTime) -> Self {
        let k = &ev.key;
        let direction = if ev.direction as u32 == DIR_INGRESS { Direction::Inbound } else { Direction::Outbound };
        let severity = if ev.reason == REASON_OUTBOUND_TO_WORKSTATION { "alert" } else { "warning" };
        Self {
            ts: humantime::format_rfc3339_millis(seen).to_string(),
            severity: severity.into(),
            reason: reason_name(ev.reason).into(),
            direction: direction.as_str().into(),
            verdict: if ev.verdict as usize == VERDICT_DROP { "dropped" } else { "would_drop" }.into(),
            protocol: protocol_name(k.proto),
            local: Endpoint { addr: addr(k.family, &k.local_addr), port: k.local_port },
            remote: Endpoint { addr: addr(k.family, &k.remote_addr), port: k.remote_port },
            peer_classes: class_names(policy, ev.peer_mask),
            port_rules: slot_rules(policy, ev.slot),
            interface: crate::datapath::ifname(ev.ifindex).unwrap_or_else(|| ev.ifindex.to_string()),
            tcp_flags: tcp_flags(ev.tcp_flags),
            packet_bytes: ev.pkt_len,
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
    }

    fn direction_src(&self) -> &Endpoint {
        if self.direction == "inbound" { &self.remote } else { &self.local }
    }

    fn direction_dst(&self) -> &Endpoint {
        if self.direction == "inbound" { &self.local } else { &self.remote }
    }
}

fn fmt_endpoint(e: &Endpoint) -> String {
    match e.addr {
        IpAddr::V6(a) => format!("[{a}]:{}", e.port),
        IpAddr::V4(a) => format!("{a}:{}", e.port),
    }
}

fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

fn protocol_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        p => format!("ip-{p}"),
    }
}

fn tcp_flags(f: u8) -> String {
    const NAMES: [(u8, &str); 6] = [(0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x20, "URG")];
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
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer; CLOCK_MONOTONIC is what bpf_ktime_get_ns uses.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    SystemTime::now() - Duration::from_nanos(now_ns.saturating_sub(ts_ns))
}

/// Drops repeated reports of the same flow within `interval` (the kernel
/// already rate-limits; this covers its LRU evicting an entry early).
pub struct Dedup {
    interval: Duration,
    seen: HashMap<(FlowKey, u8), Instant>,
    last_prune: Instant,
}

impl Dedup {
    pub fn new(interval: Duration) -> Self {
        Self { interval, seen: HashMap::new(), last_prune: Instant::now() }
    }

    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// True when the event is new and should be recorded.
    pub fn admit(&mut self, ev: &FlowEvent, now: Instant) -> bool {
        if now.duration_since(self.last_prune) > self.interval {
            let interval = self.interval;
            self.seen.retain(|_, t| now.duration_since(*t) < interval);
            self.last_prune = now;
        }
        match self.seen.get(&(ev.key, ev.direction)) {
            Some(t) if now.duration_since(*t) < self.interval => false,
            _ => {
                self.seen.insert((ev.key, ev.direction), now);
                true
            }
        }
    }
}

pub use crate::auditlog::AuditLog;

impl AuditLog {
    /// Writes one record as one line: whole, or not at all.
    pub fn write(&mut self, rec: &AuditRecord) -> Result<()> {
        let mut line = serde_json::to_vec(rec)?;
        line.push(b'\n');
        self.write_line(&line)
    }
}

/// Filters of `pcguard flows`.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub reason: Option<String>,
    pub direction: Option<String>,
    pub peer_class: Option<String>,
    pub port: Option<u16>,
    pub addr: Option<IpAddr>,
    pub severity: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.reason.as_ref().is_none_or(|x| &r.reason == x)
            && self.direction.as_ref().is_none_or(|x| &r.direction == x)
            && self.severity.as_ref().is_none_or(|x| &r.severity == x)
            && self.peer_class.as_ref().is_none_or(|x| r.peer_classes.contains(x))
            && self.port.is_none_or(|p| r.local.port == p || r.remote.port == p)
            && self.addr.is_none_or(|a| r.local.addr == a || r.remote.addr == a)
    }
}

/// Prints matching records of the audit log at `path`: the last `tail`
/// records first, then (if `follow`) new ones as they are written, across
/// rotation.
pub fn follow(path: &Path, filter: &Filter, tail: usize, follow: bool, json: bool, mut out: impl Write) -> Result<()> {
    let print = |out: &mut dyn Write, line: &str| -> Result<()> {
        let Ok(rec) = serde_json::from_str::<AuditRecord>(line) else { return Ok(()) };
        if filter.matches(&rec) {
            if json { writeln!(out, "{}", line.trim_end())? } else { writeln!(out, "{}", rec.human())? }
            out.flush()?;
        }
        Ok(())
    };
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::new(file.try_clone()?);
    let lines: Vec<String> = (&mut reader).lines().collect::<Result<_, _>>()?;
    let start = lines.len().saturating_sub(tail);
    for line in &lines[start..] {
        print(&mut out, line)?;
    }
    if !follow {
        return Ok(());
    }
    let mut pos = file.seek(SeekFrom::End(0))?;
    let mut partial = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
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
                print(&mut out, &partial)?;
                partial.clear();
            }
        }
    }
}
