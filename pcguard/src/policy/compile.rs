//! Typed [`Policy`] -> [`CompiledPolicy`]: class bits, LPM prefixes, port
//! tables, counter labels and settings, within the map limits; rule ids and
//! port label indexes from the [`StableIds`] of earlier policies.

use pcguard_common::{CLASS_ANY, CLASS_ANY_BIT, MAX_CLASSES, MAX_PORT_LABELS, MAX_RULES, PEER_ENTRIES};

use super::{
    build::{Policy, PolicyClass},
    compiled::{CompiledPolicy, RuleInfo, RuleOrigin},
    error::PolicyError,
    ids::StableIds,
    lpm, ports,
    ports::{Labels, tables},
};
use crate::{
    config::CLASS_ANY_NAME,
    model::{Direction, Protocol},
};

/// Compiles a typed policy, numbering its rules and port labels with `ids`
/// (fresh ids: rule id = priority position). `ids` keeps the numbers of
/// the policy only when it compiles.
pub fn compile_policy(p: &Policy, ids: &mut StableIds) -> Result<CompiledPolicy, PolicyError> {
    check_limit(p.rules.len(), MAX_RULES as usize - 1, |count, max| PolicyError::TooManyRules { count, max })?;
    check_limit(p.classes.len(), CLASS_ANY_BIT as usize, |count, max| PolicyError::TooManyClasses { count, max })?;
    let masks: Vec<u32> = p.rules.iter().map(|r| rule_mask(p, r)).collect();
    let (peers_v4, peers_v6) = lpm::prefixes(p.classes.iter().zip(0..).map(|(c, bit)| (c.cidrs.as_slice(), bit)));
    for (family, count) in [("IPv4", peers_v4.len()), ("IPv6", peers_v6.len())] {
        check_limit(count, PEER_ENTRIES as usize, |count, max| PolicyError::TooManyPrefixes { family, count, max })?;
    }
    let labels = ports::PROTOCOLS.map(|proto| Labels::of(&p.rules, proto));
    for (proto, l) in ports::PROTOCOLS.iter().zip(&labels) {
        let protocol = proto.as_str();
        check_limit(l.len(), MAX_PORT_LABELS as usize, |count, max| PolicyError::TooManyPortLabels {
            protocol,
            count,
            max,
        })?;
    }
    let rules: Vec<RuleInfo> = std::iter::once(placeholder_rule()).chain(p.rules.iter().cloned()).collect();
    let port_labels = [labels[0].names(), labels[1].names(), vec!["other".to_string()]];
    let numbers = ids.number(&rules, &port_labels);
    let t = tables(&p.rules, &masks, &labels, &numbers)?;
    let mut settings = p.settings.clone();
    settings.no_initiate_mask = class_mask(p, &crate::config::NO_INITIATE_CLASSES);
    settings.resolver_mask = resolver_mask(p);
    settings.learned_mask = learned_mask(p);
    let compiled = CompiledPolicy {
        settings,
        ports: t.ports,
        slots: t.slots,
        peers_v4,
        peers_v6,
        rules: numbers.place_rules(&rules),
        port_labels: numbers.place_labels(&port_labels),
        classes: class_names(&p.classes),
    };
    ids.keep(numbers);
    Ok(compiled)
}

fn check_limit(count: usize, max: usize, err: impl Fn(usize, usize) -> PolicyError) -> Result<(), PolicyError> {
    if count > max { Err(err(count, max)) } else { Ok(()) }
}

/// Bit of a class name in `p` (`any` = bit 31).
fn class_bit(p: &Policy, name: &str) -> Option<u32> {
    if name == CLASS_ANY_NAME {
        return Some(CLASS_ANY_BIT);
    }
    p.classes.iter().position(|c| c.name == name).map(|i| i as u32)
}

fn class_mask(p: &Policy, names: &[impl AsRef<str>]) -> u32 {
    names.iter().filter_map(|n| class_bit(p, n.as_ref())).fold(0, |m, bit| m | (1 << bit))
}

/// Classes this server sends DNS queries to: the peers of outbound rules on
/// UDP port 53. Their answers feed DNS-aware egress. `any` is left out:
/// answers are only trusted from configured resolvers.
fn resolver_mask(p: &Policy) -> u32 {
    p.rules
        .iter()
        .filter(|r| r.direction == Direction::Outbound && r.protocol == Protocol::Udp)
        .filter(|r| r.ports.iter().any(|range| range.contains(53)))
        .fold(0, |m, r| m | rule_mask(p, r))
        & !CLASS_ANY
}

/// Classes DNS answers can give an address: the peers of rules with FQDNs
/// (DNS-aware egress). `any` is left out: every address has it already.
fn learned_mask(p: &Policy) -> u32 {
    p.rules.iter().filter(|r| !r.fqdns.is_empty()).fold(0, |m, r| m | rule_mask(p, r)) & !CLASS_ANY
}

fn rule_mask(p: &Policy, r: &RuleInfo) -> u32 {
    class_mask(p, &r.peers)
}

fn placeholder_rule() -> RuleInfo {
    RuleInfo {
        id: "none".to_string(),
        description: "no rule".to_string(),
        direction: Direction::Inbound,
        protocol: Protocol::Tcp,
        ports: Vec::new(),
        peers: Vec::new(),
        fqdns: Vec::new(),
        origin: RuleOrigin::Site,
    }
}

fn class_names(classes: &[PolicyClass]) -> Vec<Option<String>> {
    let mut names: Vec<Option<String>> = vec![None; MAX_CLASSES];
    for (slot, c) in names.iter_mut().zip(classes) {
        *slot = Some(c.name.clone());
    }
    names[CLASS_ANY_BIT as usize] = Some(CLASS_ANY_NAME.to_string());
    names
}
