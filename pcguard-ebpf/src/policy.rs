//! The policy decision for an untracked flow: one `PORTS` lookup, one `SLOTS`
//! lookup and the peer class mask from one LPM lookup, whatever the number
//! of rules.

use aya_ebpf::maps::lpm_trie::Key;
use pcguard_common::{
    FAMILY_V4, FlowKey, MAX_CLASSES, REASON_NO_RULE, REASON_PEER_NOT_ALLOWED, port_table_index,
};

use crate::maps::{PEERS_V4, PEERS_V6, PORTS, SLOTS};

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
    pub const NO_RULE: Self = Self {
        reason: REASON_NO_RULE,
        rule: 0,
        port_idx: 0,
        slot: 0,
    };

    #[inline(always)]
    pub fn allowed(&self) -> bool {
        self.reason == 0
    }
}

/// Peer class mask of the remote address (0 when no prefix matches).
#[inline(always)]
pub fn peer_mask(key: &FlowKey) -> u32 {
    let a = &key.remote_addr;
    let mask = if key.family == FAMILY_V4 {
        PEERS_V4.get(Key::new(32, [a[0], a[1], a[2], a[3]]))
    } else {
        PEERS_V6.get(Key::new(128, *a))
    };
    mask.copied().unwrap_or(0)
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

/// Decides a new flow initiated in `flow_dir` to `service_port`.
#[inline(always)]
pub fn decide(flow_dir: u32, proto_idx: u32, service_port: u16, peer_mask: u32) -> Decision {
    let Some(entry) = PORTS.get(port_table_index(flow_dir, proto_idx, service_port)) else {
        return Decision::NO_RULE;
    };
    let (slot_id, port_idx) = (entry.slot, entry.port_idx);
    let not_allowed = |reason| Decision {
        reason,
        rule: 0,
        port_idx,
        slot: slot_id,
    };
    if slot_id == 0 {
        return not_allowed(REASON_NO_RULE);
    }
    // An out-of-range slot id is treated like slot 0: nothing allowed.
    let Some(slot) = SLOTS.get(slot_id as u32) else {
        return not_allowed(REASON_NO_RULE);
    };
    let m = peer_mask & slot.allowed_mask;
    if m == 0 {
        return not_allowed(REASON_PEER_NOT_ALLOWED);
    }
    // The mask keeps the index provably inside `rule_by_class` (no panic path).
    let class = lowest_bit(m) as usize & (MAX_CLASSES - 1);
    Decision {
        reason: 0,
        rule: slot.rule_by_class[class],
        port_idx,
        slot: slot_id,
    }
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
