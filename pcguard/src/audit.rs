//! Audit records as SIEMs take them (docs/audit.md): schema 1 — every
//! record carries `schema`, `event_type`, a unique `event_id`, the `host`
//! and a numeric `severity_code` — in one of two formats (`[audit] format`:
//! pcguard's own `json`, or Elastic Common Schema `ecs`), written to the
//! audit log file and, with `[audit] syslog = true`, sent to the local
//! syslog socket (`crate::syslog`).
//!
//! The records themselves ([`AuditRecord`], [`SummaryRecord`]) stay what
//! they were before schema 1; the envelope is added here, on the way out.
//! Layer 7 (docs/architecture.md): above `gate`, whose summaries it writes.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use log::{error, info};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde_json::{Value, json};

pub use crate::config::AuditFormat;
use crate::{
    auditlog::AuditLog,
    flowrec::FlowRecordOut,
    flows::{AuditRecord, DNS_POISONING},
    gate::SummaryRecord,
    syslog::{Facility, SendError, Syslog},
};

/// The version of the record layout (`schema`). Within a version, fields
/// are only ever added, never renamed, retyped or removed.
pub const SCHEMA_VERSION: u32 = 1;
/// The ECS version the `ecs` format follows (`ecs.version`).
pub const ECS_VERSION: &str = "8.11.0";
/// `event.dataset` of the `ecs` format.
pub const ECS_DATASET: &str = "pcguard.audit";

/// What a record is about (`event_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// A flow no rule allows (reported by the kernel).
    UnexpectedFlow,
    /// A DNS answer naming an address no answer may open.
    DnsPoisoning,
    /// What the audit gate held back in a report interval.
    AuditSummary,
    /// An allowed flow of an audited rule (`[audit] allowed`) started.
    FlowStart,
    /// It ended (FIN, RST or idle expiry), with its counters.
    FlowEnd,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::UnexpectedFlow => "unexpected_flow",
            EventType::DnsPoisoning => "dns_poisoning",
            EventType::AuditSummary => "audit_summary",
            EventType::FlowStart => "flow_start",
            EventType::FlowEnd => "flow_end",
        }
    }

    /// The type of a flow record.
    pub fn of(rec: &AuditRecord) -> Self {
        if rec.reason == DNS_POISONING { EventType::DnsPoisoning } else { EventType::UnexpectedFlow }
    }
}

/// Syslog's numeric severity (RFC 5424) of a severity name; an unknown
/// name is `notice` (5).
pub fn severity_code(name: &str) -> u8 {
    match name {
        "emergency" => 0,
        "alert" => 1,
        "critical" => 2,
        "error" => 3,
        "warning" => 4,
        "info" => 6,
        "debug" => 7,
        _ => 5,
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`), `localhost`
/// when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Event ids: UUID version 7 (RFC 9562) — the Unix time in milliseconds,
/// then 74 bits that are a bijection of a per-process counter keyed by 64
/// random bits read at start. Ordered by time, unique within a process
/// (the counter) and across restarts (the key, and the time).
pub struct EventIds {
    key: u64,
    counter: AtomicU64,
}

impl EventIds {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        let random = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        let key = match random {
            Ok(()) => u64::from_le_bytes(seed),
            // No /dev/urandom: the clock and the pid still differ between
            // runs.
            Err(_) => {
                let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
            }
        };
        Self { key, counter: AtomicU64::new(0) }
    }

    /// A new id for a record written at `now`.
    pub fn next(&self, now: SystemTime) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let ms = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64 & 0xffff_ffff_ffff;
        // splitmix64 of the keyed counter: a bijection of n, so no two
        // records of a process share the bits; the key makes another
        // process's sequence another one.
        let mut z = n.wrapping_add(self.key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let extra = (self.key >> 52) as u16 & 0x0fff;
        let b: u128 = (u128::from(ms) << 80)
            | (0x7u128 << 76)
            | (u128::from(extra) << 64)
            | (0b10u128 << 62)
            | u128::from(z & 0x3fff_ffff_ffff_ffff);
        let h = format!("{b:032x}");
        format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}

impl Default for EventIds {
    fn default() -> Self {
        Self::new()
    }
}

/// The envelope schema 1 adds in the `json` format.
#[derive(Serialize)]
struct V1<'a, T: Serialize> {
    schema: u32,
    event_type: &'static str,
    event_id: &'a str,
    host: &'a str,
    severity_code: u8,
    #[serde(flatten)]
    record: &'a T,
}

/// Where and how records go (`[audit]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub path: PathBuf,
    pub format: AuditFormat,
    /// `[audit] syslog`: the socket and the facility.
    pub syslog: Option<(PathBuf, Facility)>,
}

/// One record, ready to go out: its line (no newline) and what syslog's
/// header needs.
pub struct Encoded {
    pub line: Vec<u8>,
    pub severity: u8,
    pub ts: String,
    /// Syslog's MSGID: the reason of a flow record, else the event type.
    pub msgid: String,
}

/// Encodes records in a format with schema 1's envelope.
pub struct Encoder {
    pub format: AuditFormat,
    pub host: String,
    ids: EventIds,
}

impl Encoder {
    pub fn new(format: AuditFormat, host: String) -> Self {
        Self { format, host, ids: EventIds::new() }
    }

    pub fn flow(&self, rec: &AuditRecord, now: SystemTime) -> Encoded {
        let ty = EventType::of(rec);
        self.encode(ty, rec, &rec.severity, &rec.ts, &rec.reason, now, |id| ecs_flow(rec, ty, id, &self.host))
    }

    /// A `flow_start` or `flow_end` record.
    pub fn flow_record(&self, rec: &FlowRecordOut, now: SystemTime) -> Encoded {
        let ty = if rec.is_end() { EventType::FlowEnd } else { EventType::FlowStart };
        self.encode(ty, rec, &rec.severity, &rec.ts, ty.as_str(), now, |id| ecs_flow_record(rec, ty, id, &self.host))
    }

    pub fn summary(&self, rec: &SummaryRecord, now: SystemTime) -> Encoded {
        let ty = EventType::AuditSummary;
        self.encode(ty, rec, rec.severity, &rec.ts, ty.as_str(), now, |id| ecs_summary(rec, id, &self.host))
    }

    /// One record in the configured format: `record` inside schema 1's
    /// envelope (`json`), or what `ecs` builds from the record and its id.
    #[allow(clippy::too_many_arguments)]
    fn encode<R: Serialize, E: Serialize>(
        &self,
        ty: EventType,
        record: &R,
        severity: &str,
        ts: &str,
        msgid: &str,
        now: SystemTime,
        ecs: impl FnOnce(&str) -> E,
    ) -> Encoded {
        let id = self.ids.next(now);
        let code = severity_code(severity);
        let line = match self.format {
            AuditFormat::Json => serde_json::to_vec(&V1 {
                schema: SCHEMA_VERSION,
                event_type: ty.as_str(),
                event_id: &id,
                host: &self.host,
                severity_code: code,
                record,
            }),
            AuditFormat::Ecs => serde_json::to_vec(&ecs(&id)),
        }
        .expect("audit records serialize");
        Encoded { line, severity: code, ts: ts.to_string(), msgid: msgid.to_string() }
    }
}

/// ECS `network.transport` (IANA protocol keyword, lowercase).
fn ecs_transport(protocol: &str) -> &str {
    match protocol {
        "icmpv6" => "ipv6-icmp",
        p => p,
    }
}

/// The fields every ECS record has.
#[allow(clippy::too_many_arguments)]
fn ecs_base(
    ts: &str,
    ty: EventType,
    id: &str,
    host: &str,
    severity: &str,
    kind: &str,
    category: &[&str],
    types: &[&str],
    action: &str,
    outcome: &str,
) -> serde_json::Map<String, Value> {
    let v = json!({
        "@timestamp": ts,
        "ecs": { "version": ECS_VERSION },
        "event": {
            "kind": kind,
            "category": category,
            "type": types,
            "action": action,
            "outcome": outcome,
            "severity": severity_code(severity),
            "id": id,
            "dataset": ECS_DATASET,
            "module": "pcguard",
        },
        "log": { "level": severity },
        "host": { "name": host },
        "observer": { "hostname": host, "product": "pcguard", "type": "firewall", "vendor": "pcguard" },
        "labels": { "pcguard_event_type": ty.as_str() },
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// A flow record in ECS (docs/audit.md, "ECS").
pub fn ecs_flow(rec: &AuditRecord, ty: EventType, id: &str, host: &str) -> Value {
    let inbound = rec.direction == "inbound";
    let (src, dst) = if inbound { (&rec.remote, &rec.local) } else { (&rec.local, &rec.remote) };
    let (types, outcome): (&[&str], &str) = match (ty, rec.verdict.as_str()) {
        (EventType::DnsPoisoning, _) => (&["protocol", "denied"], "failure"),
        (_, "would_drop") => (&["connection", "allowed"], "success"),
        (_, "dropped") => (&["connection", "denied"], "failure"),
        _ => (&["connection"], "unknown"),
    };
    let category: &[&str] =
        if ty == EventType::DnsPoisoning { &["network", "intrusion_detection"] } else { &["network"] };
    let mut m = ecs_base(&rec.ts, ty, id, host, &rec.severity, "alert", category, types, &rec.reason, outcome);
    m.insert("message".into(), rec.human().into());
    m.insert("source".into(), json!({ "ip": src.addr, "port": src.port }));
    m.insert("destination".into(), json!({ "ip": dst.addr, "port": dst.port }));
    let direction = match rec.direction.as_str() {
        "inbound" => "ingress",
        "outbound" => "egress",
        _ => "unknown",
    };
    m.insert(
        "network".into(),
        json!({
            "transport": ecs_transport(&rec.protocol),
            "type": if rec.remote.addr.is_ipv4() { "ipv4" } else { "ipv6" },
            "direction": direction,
        }),
    );
    m.insert("rule".into(), json!({ "name": rec.reason, "ruleset": "pcguard" }));
    if !rec.interface.is_empty() {
        let side = if inbound { "ingress" } else { "egress" };
        m["observer"][side] = json!({ "interface": { "name": rec.interface } });
    }
    if let (Some(name), Some(addr)) = (&rec.dns_name, &rec.dns_address) {
        m.insert("dns".into(), json!({ "question": { "name": name }, "resolved_ip": [addr] }));
    }
    let mut p = json!({
        "schema": SCHEMA_VERSION,
        "event_type": ty.as_str(),
        "reason": rec.reason,
        "verdict": rec.verdict,
        "direction": rec.direction,
        "protocol": rec.protocol,
        "peer_classes": rec.peer_classes,
        "port_rules": rec.port_rules,
        "tcp_flags": rec.tcp_flags,
        "packet_bytes": rec.packet_bytes,
    });
    if rec.repeats > 0 {
        p["repeats"] = rec.repeats.into();
    }
    if let Some(n) = rec.suppressed {
        p["suppressed"] = n.into();
    }
    if let Some(x) = &rec.malformed {
        p["malformed"] = x.clone().into();
    }
    if let Some(x) = &rec.dns_refusal {
        p["dns_refusal"] = x.clone().into();
    }
    m.insert("pcguard".into(), p);
    Value::Object(m)
}

/// A `flow_start` / `flow_end` record in ECS: an `event` of category
/// `network`, type `connection` + `start` / `end`; an end carries ECS's
/// byte and packet counts (`source.*` = the initiator's side,
/// `destination.*` = the responder's, `network.*` = both).
pub fn ecs_flow_record(rec: &FlowRecordOut, ty: EventType, id: &str, host: &str) -> Value {
    let inbound = rec.direction == "inbound";
    let (src, dst) = if inbound { (&rec.remote, &rec.local) } else { (&rec.local, &rec.remote) };
    let phase = if ty == EventType::FlowEnd { "end" } else { "start" };
    let mut m = ecs_base(
        &rec.ts,
        ty,
        id,
        host,
        &rec.severity,
        "event",
        &["network"],
        &["connection", phase],
        ty.as_str(),
        "success",
    );
    m.insert("message".into(), rec.human().into());
    let mut source = json!({ "ip": src.addr, "port": src.port });
    let mut destination = json!({ "ip": dst.addr, "port": dst.port });
    let mut network = json!({
        "transport": ecs_transport(&rec.protocol),
        "type": if rec.remote.addr.is_ipv4() { "ipv4" } else { "ipv6" },
        "direction": if inbound { "ingress" } else { "egress" },
    });
    let mut p = json!({
        "schema": SCHEMA_VERSION,
        "event_type": ty.as_str(),
        "direction": rec.direction,
        "protocol": rec.protocol,
        "rule": rec.rule,
        "peer_classes": rec.peer_classes,
    });
    if let Some(e) = &rec.end {
        // Bytes "in" travel toward this server: from the initiator of an
        // inbound flow, from the responder of an outbound one.
        let (src_side, dst_side) = if inbound {
            ((e.bytes_in, e.packets_in), (e.bytes_out, e.packets_out))
        } else {
            ((e.bytes_out, e.packets_out), (e.bytes_in, e.packets_in))
        };
        source["bytes"] = src_side.0.into();
        source["packets"] = src_side.1.into();
        destination["bytes"] = dst_side.0.into();
        destination["packets"] = dst_side.1.into();
        network["bytes"] = (e.bytes_in + e.bytes_out).into();
        network["packets"] = (e.packets_in + e.packets_out).into();
        m["event"]["start"] = e.started.clone().into();
        m["event"]["end"] = rec.ts.clone().into();
        m["event"]["duration"] = (e.duration_ms.saturating_mul(1_000_000)).into();
        for (k, v) in [
            ("started", Value::from(e.started.clone())),
            ("duration_ms", e.duration_ms.into()),
            ("packets_in", e.packets_in.into()),
            ("bytes_in", e.bytes_in.into()),
            ("packets_out", e.packets_out.into()),
            ("bytes_out", e.bytes_out.into()),
            ("end_reason", e.end_reason.clone().into()),
        ] {
            p[k] = v;
        }
    }
    m.insert("source".into(), source);
    m.insert("destination".into(), destination);
    m.insert("network".into(), network);
    m.insert("rule".into(), json!({ "name": rec.rule, "ruleset": "pcguard" }));
    if !rec.interface.is_empty() {
        let side = if inbound { "ingress" } else { "egress" };
        m["observer"][side] = json!({ "interface": { "name": rec.interface } });
    }
    m.insert("pcguard".into(), p);
    Value::Object(m)
}

/// A summary record in ECS: a metric event, its counts under
/// `pcguard.summary`.
pub fn ecs_summary(rec: &SummaryRecord, id: &str, host: &str) -> Value {
    let ty = EventType::AuditSummary;
    let mut m =
        ecs_base(&rec.ts, ty, id, host, rec.severity, "metric", &["network"], &["info"], ty.as_str(), "unknown");
    m.insert(
        "message".into(),
        format!(
            "{} unexpected-flow records held back in {} s ({} repeats, {} over the ceiling); kernel held back {}, lost {}",
            rec.deduplicated + rec.over_ceiling,
            rec.period_seconds,
            rec.deduplicated,
            rec.over_ceiling,
            rec.kernel_rate_limited,
            rec.kernel_ring_dropped
        )
        .into(),
    );
    let mut summary = serde_json::to_value(rec).expect("summary records serialize");
    if let Value::Object(s) = &mut summary {
        for k in ["ts", "event", "severity"] {
            s.remove(k);
        }
    }
    m.insert("pcguard".into(), json!({ "schema": SCHEMA_VERSION, "event_type": ty.as_str(), "summary": summary }));
    Value::Object(m)
}

/// The audit log file and, when configured, syslog: every record goes to
/// both, encoded once.
pub struct AuditSink {
    log: AuditLog,
    encoder: Encoder,
    syslog: Option<Syslog>,
    /// Records syslog did not take (`pcguard_audit_syslog_dropped_total`).
    syslog_dropped: Counter,
    /// Whether the last send failed (errors are logged when this changes,
    /// not per record).
    syslog_failing: bool,
}

impl AuditSink {
    /// Opens the log file (0640, group `gid`) and the syslog socket.
    pub fn open(out: &Output, gid: Option<u32>) -> Result<Self> {
        let log = AuditLog::open(&out.path, gid)?;
        let syslog = Self::syslog(out)?;
        Ok(Self {
            log,
            encoder: Encoder::new(out.format, hostname()),
            syslog,
            syslog_dropped: Counter::default(),
            syslog_failing: false,
        })
    }

    /// The syslog socket `out` asks for.
    pub fn syslog(out: &Output) -> Result<Option<Syslog>> {
        out.syslog.as_ref().map(|(path, facility)| Syslog::new(path, *facility)).transpose()
    }

    /// Counts syslog's dropped records in `c` (a metric).
    pub fn count_syslog_drops(&mut self, c: Counter) {
        self.syslog_dropped = c;
    }

    pub fn path(&self) -> &Path {
        self.log.path()
    }

    /// Reopens the file (after rotation).
    pub fn reopen(&mut self) -> Result<()> {
        self.log.reopen()
    }

    /// A reload's format and syslog socket (opened by [`AuditSink::syslog`]
    /// before anything changed); the host name is looked up again.
    pub fn configure(&mut self, format: AuditFormat, syslog: Option<Syslog>) {
        self.encoder.format = format;
        self.encoder.host = hostname();
        if let Some(s) = &syslog
            && self.syslog.as_ref().is_none_or(|old| old.path() != s.path())
        {
            info!("audit records also go to syslog at {} ({})", s.path().display(), s.facility().as_str());
        }
        self.syslog = syslog;
        self.syslog_failing = false;
    }

    /// Writes an unexpected-flow or `dns_poisoning` record.
    pub fn write(&mut self, rec: &AuditRecord) -> Result<()> {
        let e = self.encoder.flow(rec, SystemTime::now());
        self.emit(e)
    }

    /// Writes a `flow_start` or `flow_end` record.
    pub fn write_flow_record(&mut self, rec: &FlowRecordOut) -> Result<()> {
        let e = self.encoder.flow_record(rec, SystemTime::now());
        self.emit(e)
    }

    /// Writes a summary record.
    pub fn write_summary(&mut self, rec: &SummaryRecord) -> Result<()> {
        let e = self.encoder.summary(rec, SystemTime::now());
        self.emit(e)
    }

    fn emit(&mut self, mut e: Encoded) -> Result<()> {
        if let Some(s) = &self.syslog {
            match s.send(e.severity, &e.ts, &self.encoder.host, &e.msgid, &e.line) {
                Ok(()) => {
                    if std::mem::take(&mut self.syslog_failing) {
                        info!("syslog at {} takes audit records again", s.path().display());
                    }
                }
                Err(err) => {
                    self.syslog_dropped.inc();
                    if !std::mem::replace(&mut self.syslog_failing, true) {
                        let why = match err {
                            SendError::Full => "its queue is full".to_string(),
                            SendError::Failed(e) => e.to_string(),
                        };
                        error!(
                            "syslog at {} does not take audit records ({why}); they are dropped and counted in pcguard_audit_syslog_dropped_total until it does",
                            s.path().display()
                        );
                    }
                }
            }
        }
        e.line.push(b'\n');
        self.log.write_line(&e.line)
    }
}

#[cfg(test)]
mod tests;
