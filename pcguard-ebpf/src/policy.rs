//! The policy decision for an untracked flow: one `PORTS` lookup, one `SLOTS`
//! lookup and the peer class mask from one LPM lookup, whatever the number
//! of rules, all in the packet's policy generation ([`Gen`]); plus one
//! `LEARNED` lookup only when the static classes do not allow the flow and
//! the port's rules allow a class DNS answers can give.

use aya_ebpf::maps::lpm_trie::Key;
use pcguard_common::{
    FAMILY_V4, FlowKey, GEN_PREFIX_BITS, LearnedKey, MAX_CLASSES, MAX_SLOTS, NUM_GENERATIONS, REASON_NO_RULE,
    REASON_PEER_NOT_ALLOWED, Settings, peer_key_v4, peer_key_v6, port_table_index, ports_index, slots_index,
};

use crate::maps::{ACTIVE, LEARNED, PEERS_V4, PEERS_V6, PORTS, SETTINGS, SLOTS};

/// The policy generation of one packet: `ACTIVE` read once when the packet
/// arrives, then used for every policy lookup of the packet, so a switch
/// while it is processed cannot give it a mix of two policies.
#[derive(Clone, Copy)]
pub struct Gen(u32);

impl Gen {
    /// The generation `ACTIVE` holds now (0 if unreadable, which the
    /// 1-entry array rules out). The mask keeps every index computed from
    /// it in bounds whatever the daemon wrote.
    #[inline(always)]
    pub fn active() -> Self {
        Self(ACTIVE.get(0).copied().unwrap_or(0) & (NUM_GENERATIONS - 1))
    }

    /// This generation's settings, once the daemon has written a complete
    /// policy into it.
    #[inline(always)]
    pub fn ready_settings(self) -> Option<&'static Settings> {
        SETTINGS.get(self.0).filter(|s| s.ready != 0)
    }
}

/// Outcome of [`decide`].
#[derive(Clone, Copy)]
pub struct Decision {
    /// 0 when allowed, else `REASON_NO_RULE` / `REASON_PEER_NOT_ALLOWED`.
    pub reason: u8,
    /// Rule that allowed the flow (0 when not allowed).
    pub rule: u16,
    /// Counter label of the service port.
    pub port_idx: u16,
    /// Slot of the service port (0: no rule).
    pub slot: u16,
}

impl Decision {
    /// No rule covers the packet (protocols without a port table).
    pub const NO_RULE: Self = Self { reason: REASON_NO_RULE, rule: 0, port_idx: 0, slot: 0 };

    #[inline(always)]
    pub fn allowed(&self) -> bool {
        self.reason == 0
    }
}

/// The remote end of a flow, whose static class mask (an LPM lookup) is
/// looked up at most once, and only when something needs it: a packet to
/// a port no rule covers, whose report is suppressed, never pays for it.
pub struct Peer<'a> {
    g: Gen,
    key: &'a FlowKey,
    /// The mask once looked up, else `NOT_YET`. (Not an `Option<u32>`: its
    /// payload is undefined while `None`, and LLVM may move that undefined
    /// value through a register the verifier then finds uninitialized.)
    mask: u64,
}

const NOT_YET: u64 = u64::MAX;

impl<'a> Peer<'a> {
    #[inline(always)]
    pub fn new(g: Gen, key: &'a FlowKey) -> Self {
        Self { g, key, mask: NOT_YET }
    }

    #[inline(always)]
    pub fn mask(&mut self) -> u32 {
        if self.mask == NOT_YET {
            self.mask = peer_mask(self.g, self.key) as u64;
        }
        self.mask as u32
    }
}

/// Peer class mask of the remote address in generation `g` (0 when no
/// prefix matches).
#[inline(always)]
pub fn peer_mask(g: Gen, key: &FlowKey) -> u32 {
    let a = &key.remote_addr;
    let mask = if key.family == FAMILY_V4 {
        let v4 = peer_key_v4(g.0, [a[0], a[1], a[2], a[3]]);
        PEERS_V4.get(Key::new(GEN_PREFIX_BITS + 32, v4))
    } else {
        PEERS_V6.get(Key::new(GEN_PREFIX_BITS + 128, peer_key_v6(g.0, *a)))
    };
    mask.copied().unwrap_or(0)
}

/// Classes DNS answers gave the remote address in generation `g` (0 when
/// none).
#[inline(always)]
fn learned_mask(g: Gen, key: &FlowKey) -> u32 {
    let k = LearnedKey { generation: g.0 as u8, family: key.family, _pad: [0; 2], addr: key.remote_addr };
    // SAFETY: plain u32 value.
    unsafe { LEARNED.get(k) }.copied().unwrap_or(0)
}

/// Index of the lowest set bit of a non-zero mask, by binary search on the
/// halves: five constant steps (unrolled by LLVM), no loop for the verifier
/// to walk and no `cttz` (which BPF lacks: LLVM would lower it to a table
/// lookup in `.rodata`).
#[inline(always)]
fn lowest_bit(mut m: u32) -> u32 {
    let mut n = 0;
    for width in [16, 8, 4, 2, 1] {
        if m & ((1 << width) - 1) == 0 {
            n += width;
            m >>= width;
        }
    }
    n
}

/// Decides a new flow initiated in `flow_dir` to `service_port` with
/// generation `g`'s tables (`s` its settings), for the remote end `peer`
/// (whose classes are looked up only if a rule covers the port).
#[inline(always)]
pub fn decide(g: Gen, s: &Settings, peer: &mut Peer, flow_dir: u32, proto_idx: u32, service_port: u16) -> Decision {
    let idx = port_table_index(flow_dir, proto_idx, service_port);
    let Some(entry) = PORTS.get(ports_index(g.0, idx)) else {
        return Decision::NO_RULE;
    };
    let (slot_id, port_idx) = (entry.slot, entry.port_idx);
    let not_allowed = |reason| Decision { reason, rule: 0, port_idx, slot: slot_id };
    if slot_id == 0 {
        return not_allowed(REASON_NO_RULE);
    }
    // An out-of-range slot id is treated like slot 0: nothing allowed (one
    // past the generation's last slot would be the next generation's).
    if slot_id as u32 >= MAX_SLOTS {
        return not_allowed(REASON_NO_RULE);
    }
    let Some(slot) = SLOTS.get(slots_index(g.0, slot_id as u32)) else {
        return not_allowed(REASON_NO_RULE);
    };
    let mut m = peer.mask() & slot.allowed_mask;
    if m == 0 && slot.allowed_mask & s.learned_mask != 0 {
        m = learned_mask(g, peer.key) & slot.allowed_mask;
    }
    if m == 0 {
        return not_allowed(REASON_PEER_NOT_ALLOWED);
    }
    // The mask keeps the index provably inside `rule_by_class` (no panic path).
    let class = lowest_bit(m) as usize & (MAX_CLASSES - 1);
    Decision { reason: 0, rule: slot.rule_by_class[class], port_idx, slot: slot_id }
}

#[cfg(test)]
mod tests {
    use super::lowest_bit;

    #[test]
    fn lowest_bit_of_every_mask_shape() {
        for bit in 0..32 {
            assert_eq!(lowest_bit(1 << bit), bit);
            assert_eq!(lowest_bit(u32::MAX << bit), bit);
            assert_eq!(lowest_bit((1 << bit) | (1 << 31)), bit);
        }
    }
}
