//! `pcguard check`: the effective rules of a compiled policy as text.

use std::collections::HashSet;

use super::{
    classes::ClassInfo,
    compiled::{CompiledPolicy, RuleInfo, RuleOrigin},
};
use crate::{
    config::SiteConfig,
    model::{Direction, format_ports, table},
};

/// CIDRs shown per class in the rule table before "+N more".
const CIDRS_INLINE: usize = 3;

/// The effective rules (id, direction, protocol, ports, peers with their
/// CIDRs, mode, origin), the peer classes and the notes.
pub fn rule_table(p: &CompiledPolicy) -> String {
    let effective = effective_rules(p);
    let classes = p.class_info();
    let rows: Vec<Vec<String>> =
        p.rules.iter().enumerate().skip(1).map(|(id, r)| rule_row(p, &classes, r, effective.contains(&id))).collect();
    let mut out = format!(
        "ingress {}, egress {}, ICMP {}\n\n",
        p.settings.ingress_mode.as_str(),
        p.settings.egress_mode.as_str(),
        if p.settings.allow_icmp { "allowed" } else { "subject to policy" }
    );
    out.push_str(&table::aligned(&["ID", "DIR", "PROTO", "PORTS", "PEERS", "MODE", "ORIGIN"], &rows));
    out.push_str("\npeer classes:\n");
    let class_rows: Vec<Vec<String>> = classes.iter().map(class_row).collect();
    out.push_str(&table::aligned(&["BIT", "CLASS", "CIDRS", "FQDNS (resolved at run time)"], &class_rows));
    out
}

/// `pcguard check`: the site, the rule table and the config's notes.
pub fn check_report(cfg: &SiteConfig, p: &CompiledPolicy) -> String {
    let mut out = format!("{}: role {}, interfaces {}\n", cfg.origin, cfg.role.as_str(), cfg.interfaces.join(", "));
    out.push_str(&rule_table(p));
    if !cfg.notes.is_empty() {
        out.push_str("\nnotes:\n");
        cfg.notes.iter().for_each(|n| out.push_str(&format!("- {n}\n")));
    }
    let warnings = super::warnings(cfg, p);
    if !warnings.is_empty() {
        out.push_str("\nwarnings:\n");
        for w in warnings {
            out.push_str(&format!("- {}\n  fix: {}\n", w.message, w.fix));
        }
    }
    out
}

/// Rule ids referenced by at least one slot: the others are shadowed by
/// higher-priority rules on all their ports and classes.
fn effective_rules(p: &CompiledPolicy) -> HashSet<usize> {
    p.slots.iter().flat_map(|s| s.rule_by_class.iter().map(|id| usize::from(*id))).filter(|id| *id != 0).collect()
}

fn rule_row(p: &CompiledPolicy, classes: &[ClassInfo], r: &RuleInfo, effective: bool) -> Vec<String> {
    let origin = origin_name(r.origin);
    vec![
        r.id.clone(),
        r.direction.as_str().to_string(),
        r.protocol.as_str().to_string(),
        format_ports(&r.ports),
        r.peers.iter().map(|c| peer_cell(classes, c)).collect::<Vec<_>>().join(", "),
        rule_mode(p, r).to_string(),
        if effective { origin.to_string() } else { format!("{origin} (shadowed)") },
    ]
}

/// `always` for always-allowed rules, else the mode of the direction.
fn rule_mode(p: &CompiledPolicy, r: &RuleInfo) -> &'static str {
    match (r.origin, r.direction) {
        (RuleOrigin::AlwaysAllow, _) => "always",
        (_, Direction::Inbound) => p.settings.ingress_mode.as_str(),
        (_, Direction::Outbound) => p.settings.egress_mode.as_str(),
    }
}

/// `pcguard check --format json`: modes, the rules (as [`RuleInfo`] plus
/// `rule_id`, `mode`, `shadowed`; ports as strings) and the peer classes.
pub fn rules_json(p: &CompiledPolicy) -> serde_json::Value {
    let effective = effective_rules(p);
    let rules: Vec<serde_json::Value> = p
        .rules
        .iter()
        .enumerate()
        .skip(1)
        .map(|(id, r)| {
            let mut v = serde_json::to_value(r).expect("a rule serializes");
            let ports: Vec<String> = r.ports.iter().map(|x| x.to_string()).collect();
            v["rule_id"] = id.into();
            v["ports"] = ports.into();
            v["mode"] = rule_mode(p, r).into();
            v["shadowed"] = (!effective.contains(&id)).into();
            v
        })
        .collect();
    let no_initiate: Vec<&str> = p
        .classes
        .iter()
        .zip(0..)
        .filter(|(_, bit)| p.settings.no_initiate_mask & (1u32 << bit) != 0)
        .filter_map(|(name, _)| name.as_deref())
        .collect();
    serde_json::json!({
        "ingress_mode": p.settings.ingress_mode.as_str(),
        "egress_mode": p.settings.egress_mode.as_str(),
        "allow_icmp": p.settings.allow_icmp,
        "no_initiate": no_initiate,
        "rules": rules,
        "classes": p.class_info(),
    })
}

pub fn origin_name(o: RuleOrigin) -> &'static str {
    match o {
        RuleOrigin::Catalog => "catalog",
        RuleOrigin::CatalogExtra => "catalog (not in document)",
        RuleOrigin::Site => "site",
        RuleOrigin::AlwaysAllow => "always-allow",
    }
}

fn peer_cell(classes: &[ClassInfo], class: &str) -> String {
    let Some(info) = classes.iter().find(|c| c.name == class) else {
        return class.to_string();
    };
    let mut items: Vec<String> = info.cidrs.iter().take(CIDRS_INLINE).map(|c| c.to_string()).collect();
    if info.cidrs.len() > CIDRS_INLINE {
        items.push(format!("+{} more", info.cidrs.len() - CIDRS_INLINE));
    }
    if !info.fqdns.is_empty() {
        items.push("fqdns".to_string());
    }
    format!("{class}[{}]", items.join(" "))
}

fn class_row(c: &ClassInfo) -> Vec<String> {
    let cidrs: Vec<String> = c.cidrs.iter().map(|c| c.to_string()).collect();
    vec![c.bit.to_string(), c.name.clone(), cidrs.join(", "), c.fqdns.join(", ")]
}
