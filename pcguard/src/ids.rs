//! Stable rule ids and port label indexes across reloads.
//!
//! The kernel keys per-rule counters by rule id, per-port counters by label
//! index, and conntrack entries remember both. A freshly compiled policy
//! numbers rules by position (a site rule added before the catalog rules
//! shifts every id), which would credit established flows and past counter
//! values to other rules after a reload. The daemon therefore gives each
//! rule name and port label the same number for as long as it runs:
//! [`StableIds::stabilize`] renumbers a compiled policy accordingly. Ids of
//! rules that are gone stay reserved (their slot in `rules` is a hole with
//! an empty id, which metrics and audit skip).

use std::collections::HashMap;

use log::warn;
use pcguard_common::{MAX_PORT_LABELS, MAX_RULES, NUM_PORT_PROTOS};

use crate::model::{Direction, Protocol};
use crate::policy::{CompiledPolicy, RuleInfo, RuleOrigin};

/// Numbers handed out so far (0 is reserved: no rule / `other`).
#[derive(Debug, Default)]
pub struct StableIds {
    rules: HashMap<String, u16>,
    labels: [HashMap<String, u16>; 3],
}

impl StableIds {
    /// `p` renumbered with the ids of earlier policies; new names get new
    /// numbers. If the tables would overflow (names churned for a long
    /// time), numbering starts over from `p` alone, with a warning.
    pub fn stabilize(&mut self, p: &CompiledPolicy) -> CompiledPolicy {
        if !self.fits(p) {
            warn!("rule ids or port labels exhausted: renumbering (counters of renamed rules may be misattributed)");
            *self = Self::default();
        }
        let rule_map: Vec<u16> = p.rules.iter().enumerate().map(|(i, r)| if i == 0 { 0 } else { next_id(&mut self.rules, &r.id) }).collect();
        let label_maps: Vec<Vec<u16>> = p
            .port_labels
            .iter()
            .zip(self.labels.iter_mut())
            .map(|(labels, ids)| labels.iter().enumerate().map(|(i, l)| if i == 0 { 0 } else { next_id(ids, l) }).collect())
            .collect();

        let mut out = p.clone();
        out.rules = place(&p.rules, &rule_map, hole_rule());
        out.port_labels = std::array::from_fn(|i| place(&p.port_labels[i], &label_maps[i], String::new()));
        for slot in &mut out.slots {
            for r in &mut slot.rule_by_class {
                *r = rule_map.get(*r as usize).copied().unwrap_or(0);
            }
        }
        for (index, entry) in &mut out.ports {
            let proto = ((*index / 65536) % NUM_PORT_PROTOS) as usize;
            entry.port_idx = label_maps[proto].get(entry.port_idx as usize).copied().unwrap_or(0);
        }
        out
    }

    /// The numbering a running policy used (its `Labels`): a daemon that
    /// adopts the maps of an earlier one keeps its rule ids and port labels,
    /// which conntrack entries and counters carry.
    pub fn from_labels(labels: &crate::counters::Labels) -> Self {
        let index = |names: &[String]| -> HashMap<String, u16> {
            names.iter().enumerate().skip(1).filter(|(_, n)| !n.is_empty()).map(|(i, n)| (n.clone(), i as u16)).collect()
        };
        Self { rules: index(&labels.rules), labels: std::array::from_fn(|i| index(&labels.port_labels[i])) }
    }

    /// True when the new names of `p` still get numbers below the limits.
    fn fits(&self, p: &CompiledPolicy) -> bool {
        let top = |ids: &HashMap<String, u16>| ids.values().copied().max().unwrap_or(0) as usize;
        let new = |ids: &HashMap<String, u16>, names: &[String]| names.iter().skip(1).filter(|n| !ids.contains_key(*n)).count();
        let rule_names: Vec<String> = p.rules.iter().map(|r| r.id.clone()).collect();
        top(&self.rules) + new(&self.rules, &rule_names) < MAX_RULES as usize
            && (0..3).all(|i| top(&self.labels[i]) + new(&self.labels[i], &p.port_labels[i]) < MAX_PORT_LABELS as usize)
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
    use super::*;
    use pcguard_common::{DIR_INGRESS, PROTO_IDX_TCP, port_table_index};

    fn compile(extra: &str) -> CompiledPolicy {
        let text = format!(
            "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\nworkstations = [\"10.1.0.0/16\"]\n{extra}"
        );
        crate::policy::compile(&crate::config::parse(&text, "t.toml").unwrap()).unwrap()
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
        let a = ids.stabilize(&compile(""));
        let web = id_of(&a, "web-http");
        let web_label = label_of_port(&a, 9191);
        let extra = "[[rule]]\nname = \"legacy\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [7000]\npeers = [\"workstations\"]\n";
        let fresh = compile(extra);
        assert_ne!(id_of(&fresh, "web-http"), web, "the compiler shifts ids");
        let b = ids.stabilize(&fresh);
        assert_eq!(id_of(&b, "web-http"), web);
        assert_eq!(label_of_port(&b, 9191), web_label);
        assert_eq!(b.port_labels[0][web_label as usize], "9191");
        // Slots point at the renumbered rule.
        let legacy = id_of(&b, "legacy") as u16;
        let slot = label_slot(&b, 7000);
        assert!(b.slots[slot].rule_by_class.contains(&legacy));
        // Back to the first policy: same ids, the legacy id stays reserved.
        let c = ids.stabilize(&compile(""));
        assert_eq!(id_of(&c, "web-http"), web);
        assert!(c.rules.get(legacy as usize).is_none_or(|r| r.id.is_empty()));
        assert!(c.rules.iter().all(|r| r.id != "legacy"));
    }

    fn label_slot(p: &CompiledPolicy, port: u16) -> usize {
        let idx = port_table_index(DIR_INGRESS, PROTO_IDX_TCP, port);
        p.ports.iter().find(|(i, _)| *i == idx).unwrap().1.slot as usize
    }
}
