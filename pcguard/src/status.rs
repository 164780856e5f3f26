//! `pcguard status`: what the running daemon has attached and its live
//! counters, read from the state file and the pinned maps.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, bail};
use pcguard_common::{
    ABI_VERSION, Counters, STAT_EVENTS_DROPPED, STAT_EVENTS_SENT, STAT_EVENTS_SUPPRESSED, STAT_MALFORMED, STAT_NON_IP,
    Verdict,
};
use serde_json::json;

use crate::{
    counters::{PinnedCounters, Snapshot},
    state::State,
};

/// Reads the state and counters of the daemon whose run dir is `run_dir`.
/// The counters are `None` when the pinned maps cannot be opened by this
/// user (they need root), or are of another kernel/user contract than this
/// build's (their layouts would be misread): the state is still shown.
pub fn collect(run_dir: &Path) -> Result<(State, Option<Snapshot>)> {
    let state = State::read(run_dir)?;
    if !state.is_live() {
        bail!(
            "the pcguard daemon (pid {}) is not running; stale state in {} (its last policy may still be enforced: see `pcguard detach`)",
            state.pid,
            run_dir.display()
        );
    }
    if state.abi != ABI_VERSION {
        return Ok((state, None));
    }
    let Some(dir) = state.maps_dir.as_ref().or(state.bpffs_dir.as_ref()) else { return Ok((state, None)) };
    let counters = match PinnedCounters::open(dir) {
        Ok(c) => c,
        Err(e) if is_permission_error(&e) => {
            eprintln!("note: the counters in {} need root to read", dir.display());
            return Ok((state, None));
        }
        Err(e) => return Err(e),
    };
    let mut snap = counters.snapshot(&state.labels).context("reading counters")?;
    snap.tables = Some(counters.table_sizes().context("reading the table sizes")?);
    Ok((state, Some(snap)))
}

fn is_permission_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let text = c.to_string();
        text.contains("Permission denied") || text.contains("Operation not permitted")
    })
}

pub fn to_json(state: &State, snap: Option<&Snapshot>) -> serde_json::Value {
    let counters = |c: &Counters| {
        let mut m = serde_json::Map::new();
        for v in Verdict::ALL {
            m.insert(v.as_str().to_string(), json!({"packets": c.packets[v as usize], "bytes": c.bytes[v as usize]}));
        }
        serde_json::Value::Object(m)
    };
    let snap_json = snap.map(|s| {
        json!({
            "ports": s.ports.iter().filter(|p| nonzero(&p.counters)).map(|p| json!({
                "direction": p.direction.as_str(), "protocol": p.protocol.as_str(),
                "port": p.port, "counters": counters(&p.counters)})).collect::<Vec<_>>(),
            "rules": s.rules.iter().filter(|r| nonzero(&r.counters)).map(|r| json!({
                "rule": r.rule, "direction": r.direction.as_str(), "counters": counters(&r.counters)})).collect::<Vec<_>>(),
            "conntrack_entries": s.tables.map(|t| t.conntrack()),
            "conntrack_established": s.tables.map(|t| t.established),
            "conntrack_new": s.tables.map(|t| t.new),
            "events_sent": s.stats[STAT_EVENTS_SENT as usize],
            "events_dropped": s.stats[STAT_EVENTS_DROPPED as usize],
            "events_suppressed": s.stats[STAT_EVENTS_SUPPRESSED as usize],
            "malformed_packets": s.stats[STAT_MALFORMED as usize],
            "non_ip_packets": s.stats[STAT_NON_IP as usize],
            "dns_learned_addresses": s.tables.map(|t| t.dns_learned),
            "dns_learned_entries": s.tables.map(|t| t.dns_learned_entries),
        })
    });
    json!({
        "state": state,
        "abi": {"daemon": state.abi, "pcguard": ABI_VERSION, "compatible": state.abi == ABI_VERSION},
        "counters": snap_json,
    })
}

/// The kernel/user contract of the daemon (`State::abi`), and whether this
/// build speaks it: the maps of another contract are not read.
fn abi_line(abi: u32) -> String {
    match abi {
        ABI_VERSION => format!("kernel ABI: v{abi}"),
        0 => format!(
            "ABI MISMATCH: the daemon wrote no kernel ABI version (an older pcguard); this pcguard speaks v{ABI_VERSION}: \
             its counters are not read (use the daemon's own pcguard binary, or restart the daemon with this one)"
        ),
        _ => format!(
            "ABI MISMATCH: the daemon speaks kernel ABI v{abi}, this pcguard v{ABI_VERSION}: its maps have other layouts, \
             its counters are not read (use the daemon's own pcguard binary, or restart the daemon with this one)"
        ),
    }
}

fn nonzero(c: &Counters) -> bool {
    c.packets.iter().any(|&p| p != 0)
}

/// Human-readable status.
pub fn render(state: &State, snap: Option<&Snapshot>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pcguard {} (pid {}), config {}", state.version, state.pid, state.config.display());
    let _ = writeln!(out, "{}", abi_line(state.abi));
    let _ = writeln!(
        out,
        "policy: {} rules, inbound {}, outbound {}, applied {}s ago, {} reloads",
        state.rules,
        state.mode,
        state.egress_mode,
        crate::state::unix_now().saturating_sub(state.policy_loaded_at),
        state.reloads
    );
    if let Some(until) = state.pending_confirm_until {
        let left = until.saturating_sub(crate::state::unix_now());
        let _ = writeln!(out, "PENDING CONFIRMATION: reverted in {left}s unless `pcguard confirm` is run");
    }
    if let Some(m) = &state.metrics_listen {
        let _ = writeln!(out, "metrics: http://{m}/metrics");
    }
    if let Some(a) = &state.audit_log {
        let _ = writeln!(out, "audit log: {}", a.display());
    }
    let _ = writeln!(
        out,
        "\n{:<12} {:>7} {:<12} {:>8} {:>8}  WHY",
        "INTERFACE", "IFINDEX", "INGRESS", "IN-PROG", "OUT-PROG"
    );
    for i in &state.interfaces {
        let hook = match i.xdp_mode {
            Some(m) => format!("xdp-{m:?}").to_lowercase(),
            None => i.ingress_hook.as_str().to_string(),
        };
        let _ = writeln!(
            out,
            "{:<12} {:>7} {:<12} {:>8} {:>8}  {}",
            i.name, i.ifindex, hook, i.ingress_program_id, i.egress_program_id, i.hook_reason
        );
    }
    let Some(s) = snap else {
        let why = if state.abi == ABI_VERSION { "no pinned maps" } else { "maps of another kernel ABI" };
        let _ = writeln!(out, "\n({why}: counters unavailable)");
        return out;
    };
    let header = |out: &mut String, first: &str| {
        let _ = write!(out, "\n{first}");
        for v in Verdict::ALL {
            let _ = write!(out, " {:>12} {:>12}", format!("{}-pkts", v.as_str()), "bytes");
        }
        let _ = writeln!(out);
    };
    let row = |out: &mut String, first: String, c: &Counters| {
        let _ = write!(out, "{first}");
        for v in Verdict::ALL {
            let _ = write!(out, " {:>12} {:>12}", c.packets[v as usize], c.bytes[v as usize]);
        }
        let _ = writeln!(out);
    };
    header(&mut out, &format!("{:<8} {:<6} {:<12}", "DIR", "PROTO", "PORT"));
    for p in s.ports.iter().filter(|p| nonzero(&p.counters)) {
        row(&mut out, format!("{:<8} {:<6} {:<12}", p.direction.as_str(), p.protocol.as_str(), p.port), &p.counters);
    }
    header(&mut out, &format!("{:<28} {:<8}", "RULE", "DIR"));
    for r in s.rules.iter().filter(|r| nonzero(&r.counters)) {
        row(&mut out, format!("{:<28} {:<8}", r.rule, r.direction.as_str()), &r.counters);
    }
    let t = s.tables.unwrap_or_default();
    let _ = writeln!(
        out,
        "\nconntrack entries: {} ({} established, {} new)   events sent: {}   dropped (ring full): {}   suppressed: {}   malformed: {}   non-IP: {}",
        t.conntrack(),
        t.established,
        t.new,
        s.stats[STAT_EVENTS_SENT as usize],
        s.stats[STAT_EVENTS_DROPPED as usize],
        s.stats[STAT_EVENTS_SUPPRESSED as usize],
        s.stats[STAT_MALFORMED as usize],
        s.stats[STAT_NON_IP as usize]
    );
    let _ = writeln!(out, "DNS-learned addresses: {}", t.dns_learned);
    out
}

#[cfg(test)]
mod tests {
    use pcguard_common::{PacketDir, ProtoIndex};

    use super::*;
    use crate::counters::{PortCount, RuleCount};

    fn state(abi: u32) -> State {
        State {
            pid: 1,
            version: "0.1.0".into(),
            config: "/etc/pcguard/site.toml".into(),
            bpffs_dir: None,
            maps_dir: None,
            abi,
            adopted: false,
            interfaces: Vec::new(),
            mode: "enforce".into(),
            egress_mode: "monitor".into(),
            rules: 3,
            policy_loaded_at: 0,
            reloads: 0,
            metrics_listen: None,
            audit_log: None,
            pending_confirm_until: None,
            labels: Default::default(),
            policy_generation: 1,
            last_reload: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut c = Counters::default();
        c.packets[Verdict::Allow as usize] = 5;
        c.bytes[Verdict::Allow as usize] = 500;
        c.packets[Verdict::Monitor as usize] = 2;
        c.bytes[Verdict::Monitor as usize] = 120;
        Snapshot {
            ports: vec![PortCount {
                direction: PacketDir::Egress,
                protocol: ProtoIndex::Udp,
                port: "53".into(),
                counters: c,
            }],
            rules: vec![RuleCount { direction: PacketDir::Ingress, rule: "web-http".into(), counters: c }],
            ..Default::default()
        }
    }

    #[test]
    fn status_names_the_codes_as_before() {
        let text = render(&state(ABI_VERSION), Some(&snapshot()));
        let header = format!(
            "DIR      PROTO  PORT         {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "allowed-pkts", "bytes", "dropped-pkts", "bytes", "would_drop-pkts", "bytes", "bypassed-pkts", "bytes"
        );
        assert!(text.contains(&header), "{text}");
        assert!(text.contains(&format!("egress   udp    53           {:>12} {:>12}", 5, 500)), "{text}");
        assert!(text.contains(&format!("{:<28} {:<8} {:>12}", "web-http", "ingress", 5)), "{text}");
        let json = to_json(&state(ABI_VERSION), Some(&snapshot()));
        let port = &json["counters"]["ports"][0];
        assert_eq!((port["direction"].as_str(), port["protocol"].as_str()), (Some("egress"), Some("udp")));
        assert_eq!(port["counters"]["would_drop"]["bytes"], 120);
        assert_eq!(port["counters"]["bypassed"]["packets"], 0);
        assert_eq!(json["counters"]["rules"][0]["direction"], "ingress");
    }

    #[test]
    fn status_shows_the_abi_and_says_when_it_is_not_this_builds() {
        let text = render(&state(ABI_VERSION), Some(&snapshot()));
        assert!(text.contains(&format!("kernel ABI: v{ABI_VERSION}\n")), "{text}");
        assert!(!text.contains("MISMATCH"), "{text}");
        let json = to_json(&state(ABI_VERSION), None);
        assert_eq!(json["state"]["abi"], ABI_VERSION);
        assert_eq!(json["abi"]["compatible"], true);

        let other = ABI_VERSION + 1;
        let text = render(&state(other), None);
        assert!(
            text.contains(&format!("ABI MISMATCH: the daemon speaks kernel ABI v{other}, this pcguard v{ABI_VERSION}")),
            "{text}"
        );
        assert!(text.contains("(maps of another kernel ABI: counters unavailable)"), "{text}");
        let json = to_json(&state(other), None);
        assert_eq!(
            (json["abi"]["daemon"].as_u64(), json["abi"]["compatible"].as_bool()),
            (Some(u64::from(other)), Some(false))
        );
        // A state file from before the ABI was recorded.
        assert!(render(&state(0), None).contains("ABI MISMATCH: the daemon wrote no kernel ABI version"));
    }

    #[test]
    fn counters_of_another_abi_are_not_read() {
        let dir = std::env::temp_dir().join(format!("pcguard-status-abi-{}", std::process::id()));
        let mut s = state(ABI_VERSION + 1);
        s.pid = std::process::id();
        // Maps that do not exist: reading them would fail; they are not read.
        s.maps_dir = Some(dir.join("no-such-maps"));
        s.write(&dir, None).unwrap();
        let (read, snap) = collect(&dir).unwrap();
        assert_eq!((read.abi, snap), (ABI_VERSION + 1, None));
        s.abi = ABI_VERSION;
        s.write(&dir, None).unwrap();
        assert!(collect(&dir).is_err(), "this ABI's maps are read");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
