//! Stable rule ids and port label indexes across reloads.
//!
//! The kernel keys per-rule counters by rule id, per-port counters by label
//! index, and conntrack entries remember both. Numbered by position, a site
//! rule added before the catalog rules would shift every id, which would
//! credit established flows and past counter values to other rules after a
//! reload. The compiler therefore numbers with the daemon's [`StableIds`]:
//! each rule name and port label keeps the number it was given for as long
//! as the daemon runs, new names get new numbers. Ids of rules that are
//! gone stay reserved (their slot in `rules` is a hole with an empty id,
//! which metrics and audit skip). Fresh ids (`StableIds::default()`) number
//! by position: rule id = priority order.

use std::collections::HashMap;

use log::warn;
use pcguard_common::{MAX_PORT_LABELS, MAX_RULES};

use super::compiled::{RuleInfo, RuleOrigin};
use crate::model::{Direction, Protocol};

/// Numbers handed out so far (0 is reserved: no rule / `other`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StableIds {
    rules: HashMap<String, u16>,
    labels: [HashMap<String, u16>; 3],
}

/// The numbers of one policy's rules and port labels, with the ids that
/// gave them, which [`StableIds::keep`] keeps once the policy compiles.
pub(super) struct Numbering {
    /// Rule id by priority position; `rules[0] == 0` (the "no rule"
    /// placeholder).
    pub rules: Vec<u16>,
    /// Label index by protocol index and label position; `labels[p][0] == 0`
    /// (`other`).
    pub labels: [Vec<u16>; 3],
    next: StableIds,
    /// The earlier numbers left no room: numbering started over.
    restarted: bool,
}

impl StableIds {
    /// The numbering a running policy used (its rule ids by rule number and
    /// its port labels by protocol and label index, as the daemon's state
    /// records them): a daemon that adopts the maps of an earlier one keeps
    /// its rule ids and port labels, which conntrack entries and counters
    /// carry.
    pub fn from_names(rules: &[String], port_labels: &[Vec<String>; 3]) -> Self {
        let index = |names: &[String]| -> HashMap<String, u16> {
            names
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, n)| !n.is_empty())
                .map(|(i, n)| (n.clone(), i as u16))
                .collect()
        };
        Self { rules: index(rules), labels: std::array::from_fn(|i| index(&port_labels[i])) }
    }

    /// Numbers for `rules` (in priority order, the placeholder first) and
    /// `labels` (port label names by protocol index, `other` first): those
    /// of earlier policies; new names get new numbers. If the tables would
    /// overflow (names churned for a long time), numbering starts over from
    /// these names alone. `self` is left as it is.
    pub(super) fn number(&self, rules: &[RuleInfo], labels: &[Vec<String>; 3]) -> Numbering {
        let rule_names: Vec<String> = rules.iter().map(|r| r.id.clone()).collect();
        let restarted = !self.fits(&rule_names, labels);
        let mut next = if restarted { Self::default() } else { self.clone() };
        let rules =
            rule_names.iter().enumerate().map(|(i, r)| if i == 0 { 0 } else { next_id(&mut next.rules, r) }).collect();
        let labels = std::array::from_fn(|p| {
            let ids = &mut next.labels[p];
            labels[p].iter().enumerate().map(|(i, l)| if i == 0 { 0 } else { next_id(ids, l) }).collect()
        });
        Numbering { rules, labels, next, restarted }
    }

    /// Keeps the numbers of a policy that compiled.
    pub(super) fn keep(&mut self, n: Numbering) {
        if n.restarted {
            warn!("rule ids or port labels exhausted: renumbering (counters of renamed rules may be misattributed)");
        }
        *self = n.next;
    }

    /// True when the new names still get numbers below the limits.
    fn fits(&self, rules: &[String], labels: &[Vec<String>; 3]) -> bool {
        let top = |ids: &HashMap<String, u16>| ids.values().copied().max().unwrap_or(0) as usize;
        let new = |ids: &HashMap<String, u16>, names: &[String]| {
            names.iter().skip(1).filter(|n| !ids.contains_key(*n)).count()
        };
        top(&self.rules) + new(&self.rules, rules) < MAX_RULES as usize
            && (0..3).all(|i| top(&self.labels[i]) + new(&self.labels[i], &labels[i]) < MAX_PORT_LABELS as usize)
    }
}

impl Numbering {
    /// `rules` (the placeholder first) at their ids; ids that no rule has
    /// are holes.
    pub fn place_rules(&self, rules: &[RuleInfo]) -> Vec<RuleInfo> {
        place(rules, &self.rules, hole_rule())
    }

    /// `labels` (by protocol index, `other` first) at their indexes; indexes
    /// that no label has are empty names.
    pub fn place_labels(&self, labels: &[Vec<String>; 3]) -> [Vec<String>; 3] {
        std::array::from_fn(|p| place(&labels[p], &self.labels[p], String::new()))
    }
}

fn next_id(ids: &mut HashMap<String, u16>, name: &str) -> u16 {
    // Past the highest in use: restored numbering may have holes.
    let next = ids.values().copied().max().unwrap_or(0) + 1;
    *ids.entry(name.to_string()).or_insert(next)
}

/// `items[i]` moved to index `map[i]`; indexes nobody maps to are `hole`.
fn place<T: Clone>(items: &[T], map: &[u16], hole: T) -> Vec<T> {
    let len = map.iter().copied().max().map_or(1, |m| m as usize + 1);
    let mut out = vec![hole; len];
    for (item, &to) in items.iter().zip(map) {
        out[to as usize] = item.clone();
    }
    out
}

/// The rule of an id that is not in the running policy.
fn hole_rule() -> RuleInfo {
    RuleInfo {
        id: String::new(),
        description: String::new(),
        direction: Direction::Inbound,
        protocol: Protocol::Tcp,
        ports: Vec::new(),
        peers: Vec::new(),
        fqdns: Vec::new(),
        origin: RuleOrigin::Site,
    }
}

#[cfg(test)]
mod tests {
    use pcguard_common::{DIR_INGRESS, PROTO_IDX_TCP, port_table_index};

    use super::*;
    use crate::policy::CompiledPolicy;

    const HEAD: &str =
        "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\nworkstations = [\"10.1.0.0/16\"]\n";
    const LEGACY: &str = "[[rule]]\nname = \"legacy\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [7000]\npeers = [\"workstations\"]\n";

    fn config(extra: &str) -> crate::config::SiteConfig {
        crate::config::parse(&format!("{HEAD}{extra}"), "t.toml").unwrap()
    }

    fn compile(extra: &str, ids: &mut StableIds) -> CompiledPolicy {
        crate::policy::compile_with(&config(extra), ids).unwrap()
    }

    fn id_of(p: &CompiledPolicy, name: &str) -> usize {
        p.rules.iter().position(|r| r.id == name).unwrap()
    }

    fn label_of_port(p: &CompiledPolicy, port: u16) -> u16 {
        let idx = port_table_index(DIR_INGRESS, PROTO_IDX_TCP, port);
        p.ports.iter().find(|(i, _)| *i == idx).unwrap().1.port_idx
    }

    #[test]
    fn ids_survive_a_rule_inserted_before_them() {
        let mut ids = StableIds::default();
        let a = compile("", &mut ids);
        let web = id_of(&a, "web-http");
        let web_label = label_of_port(&a, 9191);
        let fresh = compile(LEGACY, &mut StableIds::default());
        assert_ne!(id_of(&fresh, "web-http"), web, "fresh ids number by position");
        let b = compile(LEGACY, &mut ids);
        assert_eq!(id_of(&b, "web-http"), web);
        assert_eq!(label_of_port(&b, 9191), web_label);
        assert_eq!(b.port_labels[0][web_label as usize], "9191");
        // Slots point at the stable rule id.
        let legacy = id_of(&b, "legacy") as u16;
        let slot = label_slot(&b, 7000);
        assert!(b.slots[slot].rule_by_class.contains(&legacy));
        // Back to the first policy: same ids, the legacy id stays reserved.
        let c = compile("", &mut ids);
        assert_eq!(id_of(&c, "web-http"), web);
        assert!(c.rules.get(legacy as usize).is_none_or(|r| r.id.is_empty()));
        assert!(c.rules.iter().all(|r| r.id != "legacy"));
    }

    fn label_slot(p: &CompiledPolicy, port: u16) -> usize {
        let idx = port_table_index(DIR_INGRESS, PROTO_IDX_TCP, port);
        p.ports.iter().find(|(i, _)| *i == idx).unwrap().1.slot as usize
    }

    #[test]
    fn fresh_ids_number_rules_by_priority() {
        let cfg = config(LEGACY);
        let p = crate::policy::compile(&cfg).unwrap();
        let names: Vec<&str> = p.rules.iter().skip(1).map(|r| r.id.as_str()).collect();
        let built = crate::policy::build(&cfg);
        assert_eq!(names, built.rules.iter().map(|r| r.id.as_str()).collect::<Vec<_>>());
        assert_eq!(p.port_labels[0][0], "other");
        assert!(p.port_labels.iter().flatten().all(|l| !l.is_empty()));
    }

    #[test]
    fn an_adopting_daemon_numbers_as_the_earlier_one() {
        let mut earlier = StableIds::default();
        compile("", &mut earlier);
        let running = compile(LEGACY, &mut earlier);
        let names: Vec<String> = running.rules.iter().map(|r| r.id.clone()).collect();
        let mut restored = StableIds::from_names(&names, &running.port_labels);
        assert_eq!(compile(LEGACY, &mut restored), running);
    }

    #[test]
    fn a_policy_that_does_not_compile_leaves_the_ids_alone() {
        let mut ids = StableIds::default();
        compile("", &mut ids);
        let before = ids.clone();
        let mut many = String::new();
        for i in 0..MAX_RULES {
            many.push_str(&format!("[[rule]]\nname = \"r{i}\"\ndirection = \"inbound\"\nprotocol = \"udp\"\nports = [{}]\npeers = [\"workstations\"]\n", 1000 + i));
        }
        assert!(crate::policy::compile_with(&config(&many), &mut ids).is_err());
        assert_eq!(ids, before);
    }

    #[test]
    fn exhausted_ids_start_over() {
        let fresh = crate::policy::compile(&config("")).unwrap();
        let n = fresh.rule_count();
        // An earlier numbering up to `top`, all of other names.
        let earlier = |top: usize| {
            let names: Vec<String> = (0..=top).map(|i| format!("old{i}")).collect();
            StableIds::from_names(&names, &Default::default())
        };
        // Room for the new names: they are numbered past the old ones.
        let mut ids = earlier(MAX_RULES as usize - n - 1);
        let p = compile("", &mut ids);
        assert_eq!(p.rules.len(), MAX_RULES as usize);
        assert_eq!(p.rule_count(), n);
        // No room: numbering starts over from the new names alone.
        let mut ids = earlier(MAX_RULES as usize - n);
        assert_eq!(compile("", &mut ids), fresh);
        assert!(ids.rules.keys().all(|k| !k.starts_with("old")));
    }
}
