//! `PORTS` / `SLOTS` content and counter port labels.
//!
//! For each (direction, protocol) the port space is cut at every rule and
//! label boundary; inside a segment every port has the same slot and label,
//! so the work is per segment, not per port. A slot records, per class bit,
//! the first rule (in priority order) that allows that class; identical
//! slots are shared.

use std::collections::{BTreeSet, HashMap};

use pcguard_common::{MAX_CLASSES, MAX_SLOTS, PortEntry, PortSlot, port_table_index};

use super::{compiled::RuleInfo, error::PolicyError, ids::Numbering};
use crate::model::{Direction, PortRange, Protocol};

pub const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
pub const DIRECTIONS: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

/// Counter label ranges of one protocol, sorted; label index = position + 1
/// (0 is `other`).
pub struct Labels(Vec<PortRange>);

impl Labels {
    /// One label per distinct port range of the rules of `proto`.
    pub fn of(rules: &[RuleInfo], proto: Protocol) -> Labels {
        let set: BTreeSet<PortRange> =
            rules.iter().filter(|r| r.protocol == proto).flat_map(|r| r.ports.iter().copied()).collect();
        Labels(set.into_iter().collect())
    }

    pub fn len(&self) -> usize {
        self.0.len() + 1
    }

    pub fn names(&self) -> Vec<String> {
        std::iter::once("other".to_string()).chain(self.0.iter().map(PortRange::to_string)).collect()
    }

    /// The position of the narrowest label containing `port` (lowest start
    /// on ties), or 0 (`other`).
    pub fn index(&self, port: u16) -> u16 {
        let best = self.0.iter().enumerate().filter(|(_, r)| r.contains(port)).min_by_key(|(_, r)| r.port_count());
        best.map_or(0, |(i, _)| (i + 1) as u16)
    }
}

/// The compiled `PORTS` entries and `SLOTS`.
pub struct Tables {
    pub ports: Vec<(u32, PortEntry)>,
    pub slots: Vec<PortSlot>,
}

/// Builds the tables. `rules[i]` has class mask `masks[i]` and rule id
/// `numbers.rules[i + 1]`; `labels` is indexed by protocol index, label
/// position `l` of protocol `p` has index `numbers.labels[p][l]`.
pub fn tables(
    rules: &[RuleInfo],
    masks: &[u32],
    labels: &[Labels; 2],
    numbers: &Numbering,
) -> Result<Tables, PolicyError> {
    let mut t = Tables { ports: Vec::new(), slots: vec![PortSlot::default()] };
    let mut dedup: HashMap<(u32, [u16; MAX_CLASSES]), u16> = HashMap::new();
    for dir in DIRECTIONS {
        for proto in PROTOCOLS {
            let members: Vec<(u16, &RuleInfo, u32)> = rules
                .iter()
                .zip(masks)
                .enumerate()
                .filter(|(_, (r, _))| r.direction == dir && r.protocol == proto)
                .map(|(i, (r, m))| (numbers.rules[i + 1], r, *m))
                .collect();
            let label_ids = &numbers.labels[proto.proto_index() as usize];
            let labels = &labels[proto.proto_index() as usize];
            for seg in segments(&members, labels) {
                let slot = slot_for(&members, seg.start);
                if slot.allowed_mask == 0 {
                    continue;
                }
                let slot_id = intern(&mut t.slots, &mut dedup, slot)?;
                let entry = PortEntry { slot: slot_id, port_idx: label_ids[usize::from(labels.index(seg.start))] };
                let base = port_table_index(dir.dir_index(), proto.proto_index(), 0);
                t.ports.extend((seg.start..=seg.end).map(|p| (base + u32::from(p), entry)));
            }
        }
    }
    Ok(t)
}

/// Maximal port ranges with no rule or label boundary inside.
fn segments(members: &[(u16, &RuleInfo, u32)], labels: &Labels) -> Vec<PortRange> {
    let ranges = members.iter().flat_map(|(_, r, _)| r.ports.iter()).chain(labels.0.iter());
    let cuts: BTreeSet<u32> = ranges.flat_map(|r| [u32::from(r.start), u32::from(r.end) + 1]).collect();
    let cuts: Vec<u32> = cuts.into_iter().collect();
    cuts.windows(2).map(|w| PortRange { start: w[0] as u16, end: (w[1] - 1) as u16 }).collect()
}

/// The slot of `port`: for each class, the first rule allowing it.
fn slot_for(members: &[(u16, &RuleInfo, u32)], port: u16) -> PortSlot {
    let mut slot = PortSlot::default();
    for (id, rule, mask) in members {
        if !rule.ports.iter().any(|r| r.contains(port)) {
            continue;
        }
        for bit in 0..MAX_CLASSES {
            let b = 1u32 << bit;
            if mask & b != 0 && slot.allowed_mask & b == 0 {
                slot.rule_by_class[bit] = *id;
                slot.allowed_mask |= b;
            }
        }
    }
    slot
}

/// The id of an identical slot, or of `slot` appended.
fn intern(
    slots: &mut Vec<PortSlot>,
    dedup: &mut HashMap<(u32, [u16; MAX_CLASSES]), u16>,
    slot: PortSlot,
) -> Result<u16, PolicyError> {
    let key = (slot.allowed_mask, slot.rule_by_class);
    if let Some(id) = dedup.get(&key) {
        return Ok(*id);
    }
    if slots.len() >= MAX_SLOTS as usize {
        return Err(PolicyError::TooManySlots { max: MAX_SLOTS as usize - 1 });
    }
    let id = slots.len() as u16;
    slots.push(slot);
    dedup.insert(key, id);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{RuleOrigin, StableIds};

    fn rule(id: String, ports: Vec<PortRange>) -> RuleInfo {
        RuleInfo {
            id,
            description: String::new(),
            direction: Direction::Inbound,
            protocol: Protocol::Tcp,
            ports,
            peers: Vec::new(),
            fqdns: Vec::new(),
            origin: RuleOrigin::Site,
        }
    }

    #[test]
    fn too_many_distinct_slots() {
        // Rule a_i covers block i, rule b_j every port j of each block: each
        // port has its own (a_i, b_j) pair, so every slot is distinct.
        let blocks = 40u16;
        let a = (0..blocks)
            .map(|i| rule(format!("a{i}"), vec![PortRange { start: 1 + i * blocks, end: (i + 1) * blocks }]));
        let b = (0..blocks)
            .map(|j| rule(format!("b{j}"), (0..blocks).map(|i| PortRange::single(1 + i * blocks + j)).collect()));
        let rules: Vec<RuleInfo> = a.chain(b).collect();
        let masks: Vec<u32> = (0..rules.len()).map(|i| if i < usize::from(blocks) { 1 } else { 2 }).collect();
        let labels = [Labels(Vec::new()), Labels(Vec::new())];
        // Fresh ids: rule id = position, after the placeholder.
        let numbered: Vec<RuleInfo> =
            std::iter::once(rule("none".into(), Vec::new())).chain(rules.iter().cloned()).collect();
        let no_labels = std::array::from_fn(|_| vec!["other".to_string()]);
        let numbers = StableIds::default().number(&numbered, &no_labels);
        let Err(e) = tables(&rules, &masks, &labels, &numbers) else { panic!("1600 slots fit in {MAX_SLOTS}") };
        assert_eq!(e, PolicyError::TooManySlots { max: MAX_SLOTS as usize - 1 });
        let fits = tables(&rules[..usize::from(blocks) + 20], &masks, &labels, &numbers).unwrap();
        // 40 blocks x (20 ports with a b rule + the rest sharing one slot).
        assert_eq!(fits.slots.len(), 1 + 40 * 20 + 40);
    }
}
