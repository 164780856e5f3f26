//! Site config + catalog -> typed [`Policy`]: the enabled rules in priority
//! order and the peer classes with their addresses.

use std::collections::BTreeSet;

use super::{
    classes::unique,
    compiled::{PolicySettings, RuleInfo, RuleOrigin},
};
use crate::{
    catalog::{Catalog, Service},
    config::{SiteConfig, SiteRule},
    model::Cidr,
};

/// The typed policy, before it is compiled into tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Rules in priority order: always-allow, site rules, catalog order.
    /// Rule id = index + 1.
    pub rules: Vec<RuleInfo>,
    /// Classes with addresses or endpoints, in bit order: catalog classes,
    /// then custom classes by name.
    pub classes: Vec<PolicyClass>,
    /// Modes, ICMP, timeouts and report interval; the class masks are set
    /// by the compiler.
    pub settings: PolicySettings,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyClass {
    pub name: String,
    pub cidrs: Vec<Cidr>,
    pub fqdns: Vec<String>,
}

/// Builds the typed policy of a validated config.
pub fn build(cfg: &SiteConfig) -> Policy {
    let services: Vec<&Service> = cfg.enabled_services().filter(|s| !cfg.service_peers(s).is_empty()).collect();
    let (always, regular): (Vec<&Service>, Vec<&Service>) = services.iter().partition(|s| s.always_allow);
    let rules = always
        .iter()
        .map(|s| service_rule(cfg, s, RuleOrigin::AlwaysAllow))
        .chain(cfg.always_allow.iter().map(|r| site_rule(r, RuleOrigin::AlwaysAllow)))
        .chain(cfg.rules.iter().map(|r| site_rule(r, RuleOrigin::Site)))
        .chain(regular.iter().map(|s| service_rule(cfg, s, catalog_origin(s))))
        .collect();
    Policy { rules, classes: classes(cfg, &services), settings: settings(cfg), notes: cfg.notes.clone() }
}

fn catalog_origin(s: &Service) -> RuleOrigin {
    if s.from_document { RuleOrigin::Catalog } else { RuleOrigin::CatalogExtra }
}

fn service_rule(cfg: &SiteConfig, s: &Service, origin: RuleOrigin) -> RuleInfo {
    RuleInfo {
        id: s.id.clone(),
        description: s.name.clone(),
        direction: s.direction,
        protocol: s.protocol,
        ports: cfg.service_ports(s),
        peers: cfg.service_peers(s),
        fqdns: s.fqdns.clone(),
        origin,
    }
}

fn site_rule(r: &SiteRule, origin: RuleOrigin) -> RuleInfo {
    RuleInfo {
        id: r.name.clone(),
        description: r.description.clone(),
        direction: r.direction,
        protocol: r.protocol,
        ports: r.ports.clone(),
        peers: r.peers.clone(),
        fqdns: Vec::new(),
        origin,
    }
}

/// Every class that has configured CIDRs, or documented IPs / FQDNs of an
/// enabled service.
fn classes(cfg: &SiteConfig, services: &[&Service]) -> Vec<PolicyClass> {
    let builtin = Catalog::builtin().class_names();
    let custom = cfg.peers.keys().map(String::as_str).filter(|n| !builtin.contains(n));
    builtin
        .iter()
        .copied()
        .chain(custom)
        .map(|name| class_of(cfg, services, name))
        .filter(|c| !c.cidrs.is_empty() || !c.fqdns.is_empty())
        .collect()
}

fn class_of(cfg: &SiteConfig, services: &[&Service], name: &str) -> PolicyClass {
    let serving: Vec<&&Service> = services.iter().filter(|s| s.peers.iter().any(|p| p == name)).collect();
    let mut cidrs: BTreeSet<Cidr> = cfg.peers.get(name).into_iter().flatten().copied().collect();
    cidrs.extend(serving.iter().flat_map(|s| s.ip_prefixes()));
    let fqdns = unique(serving.iter().flat_map(|s| &s.fqdns));
    PolicyClass { name: name.to_string(), cidrs: cidrs.into_iter().collect(), fqdns }
}

fn settings(cfg: &SiteConfig) -> PolicySettings {
    PolicySettings {
        ingress_mode: cfg.mode,
        egress_mode: cfg.egress_mode,
        allow_icmp: cfg.allow_icmp,
        no_initiate_mask: 0,
        resolver_mask: 0,
        learned_mask: 0,
        tcp_timeout: cfg.conntrack.tcp,
        tcp_closing_timeout: cfg.conntrack.tcp_closing,
        udp_timeout: cfg.conntrack.udp,
        report_interval: cfg.audit.report_interval,
        audit_allowed: cfg.audit.allowed.clone(),
        // The whole machine's budget: the datapath divides it between the
        // CPUs when it writes the settings. Twice the records the daemon
        // writes, so that its own dedup and ceiling have room to work.
        event_rate: cfg.audit.max_records_per_second.saturating_mul(2),
        event_burst: cfg.audit.max_records_per_second.saturating_mul(2),
    }
}
