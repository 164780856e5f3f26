//! Allowed-flow records (`[audit] allowed`, docs/audit.md "flow_start and
//! flow_end"): decoding the kernel's `FlowRecord`s — and the conntrack
//! entries the daemon's expiry walk removes — into `flow_start` /
//! `flow_end` audit records. Layer 5 (docs/architecture.md).

use std::time::{Duration, SystemTime};

use pcguard_common::{CtEntry, FlowEnd, FlowKey, FlowRecord};
use serde::{Deserialize, Serialize};

use crate::{
    flows::{Endpoint, addr, class_names, flow_direction, ktime_to_system, protocol_name},
    policy::CompiledPolicy,
};

/// One `flow_start` or `flow_end` record (field names: docs/audit.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecordOut {
    /// RFC 3339 time of the start or the end.
    pub ts: String,
    /// Always `info`.
    pub severity: String,
    /// `inbound` (the remote end opened it) or `outbound` (this server).
    pub direction: String,
    pub protocol: String,
    pub local: Endpoint,
    pub remote: Endpoint,
    /// Id of the rule that allowed the flow.
    pub rule: String,
    /// Peer classes of the remote address (`any` alone: unclassified).
    pub peer_classes: Vec<String>,
    /// Interface of the packet that started or ended it ("" when unknown:
    /// idle expiry).
    pub interface: String,
    /// `flow_end` only: its fields follow the common ones.
    #[serde(flatten)]
    pub end: Option<FlowEndFields>,
}

/// What a `flow_end` record adds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndFields {
    /// RFC 3339 time the flow started.
    pub started: String,
    pub duration_ms: u64,
    /// Toward this server.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// From this server.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// `fin`, `rst` or `idle`.
    pub end_reason: String,
}

impl FlowRecordOut {
    /// Whether this is a `flow_end` record.
    pub fn is_end(&self) -> bool {
        self.end.is_some()
    }

    /// The record of a kernel `FlowRecord` (`end` 0: a start), under the
    /// policy that is running.
    pub fn from_kernel(r: &FlowRecord, policy: &CompiledPolicy) -> Self {
        let iface = if r.ifindex == 0 { String::new() } else { crate::sys::ifname(r.ifindex).unwrap_or_default() };
        let end = (r.end != 0).then(|| FlowEnd::name_of(r.end));
        Self::of(&r.key, &r.entry, policy, ktime_to_system(r.ts_ns), iface, end)
    }

    /// The `flow_end` record (reason `idle`) of an entry the daemon's walk
    /// found idle past its timeout and removed, at `now` (wall clock).
    pub fn idle(key: &FlowKey, e: &CtEntry, policy: &CompiledPolicy) -> Self {
        Self::of(key, e, policy, SystemTime::now(), String::new(), Some(FlowEnd::Idle.as_str()))
    }

    fn of(
        k: &FlowKey,
        e: &CtEntry,
        policy: &CompiledPolicy,
        at: SystemTime,
        interface: String,
        end_reason: Option<&str>,
    ) -> Self {
        let remote = addr(k.family, &k.remote_addr);
        let rule = policy.rules.get(e.rule as usize).map(|r| r.id.clone()).unwrap_or_default();
        let end = end_reason.map(|reason| {
            let started = ktime_to_system(e.started_ns);
            FlowEndFields {
                started: humantime::format_rfc3339_millis(started).to_string(),
                duration_ms: at.duration_since(started).unwrap_or(Duration::ZERO).as_millis() as u64,
                packets_in: e.packets_in,
                bytes_in: e.bytes_in,
                packets_out: e.packets_out,
                bytes_out: e.bytes_out,
                end_reason: reason.to_string(),
            }
        });
        Self {
            ts: humantime::format_rfc3339_millis(at).to_string(),
            severity: "info".into(),
            direction: flow_direction(e.flow_dir).into(),
            protocol: protocol_name(k.proto),
            local: Endpoint { addr: addr(k.family, &k.local_addr), port: k.local_port },
            remote: Endpoint { addr: remote, port: k.remote_port },
            rule: if rule.is_empty() { format!("rule-{}", e.rule) } else { rule },
            peer_classes: class_names(policy, policy.peer_mask(remote)),
            interface,
            end,
        }
    }

    /// One-line human form (syslog MSG of nothing; `pcguard flows`).
    pub fn human(&self) -> String {
        let (src, dst) =
            if self.direction == "inbound" { (&self.remote, &self.local) } else { (&self.local, &self.remote) };
        let mut s = format!(
            "{} {} {} {} {}:{} -> {}:{} rule={} peer={}",
            self.ts,
            if self.is_end() { "flow_end" } else { "flow_start" },
            self.direction,
            self.protocol,
            src.addr,
            src.port,
            dst.addr,
            dst.port,
            self.rule,
            self.peer_classes.join(",")
        );
        if let Some(e) = &self.end {
            s += &format!(
                " {} ms in={}p/{}B out={}p/{}B end={}",
                e.duration_ms, e.packets_in, e.bytes_in, e.packets_out, e.bytes_out, e.end_reason
            );
        }
        s
    }
}
