//! Per-CPU packet/byte counters and `STAT_*` event counters. Per-CPU values
//! need no atomics; userspace sums the CPUs.

use pcguard_common::{
    Counters, IPPROTO_TCP, IPPROTO_UDP, MAX_PORT_LABELS, MAX_RULES, NUM_VERDICTS, PROTO_IDX_OTHER, PROTO_IDX_TCP,
    PROTO_IDX_UDP, port_counter_index, rule_counter_index,
};

use crate::maps::{PORT_COUNTERS, RULE_COUNTERS, STATS};

/// Protocol index of an IP protocol number.
#[inline(always)]
pub fn proto_idx(proto: u8) -> u32 {
    match proto {
        IPPROTO_TCP => PROTO_IDX_TCP,
        IPPROTO_UDP => PROTO_IDX_UDP,
        _ => PROTO_IDX_OTHER,
    }
}

#[inline(always)]
pub fn stat(idx: u32) {
    if let Some(v) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU value, valid for the duration of the program.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn add(counters: Option<*mut Counters>, verdict: usize, bytes: u32) {
    let Some(c) = counters else { return };
    // NUM_VERDICTS is a power of two: the mask proves the index in bounds, so
    // no bounds-check panic path is emitted (a panic is an unverifiable loop).
    let v = verdict & (NUM_VERDICTS - 1);
    // SAFETY: per-CPU value, valid for the duration of the program.
    unsafe {
        (*c).packets[v] += 1;
        (*c).bytes[v] += bytes as u64;
    }
}

/// Counts one packet under its port counter (`dir` is the direction the
/// packet travels) and, when `rule != 0`, under the rule's counter.
///
/// Labels and rules from the maps are range-checked: an out-of-range label
/// counts as `other` (0) and an out-of-range rule is not counted, rather than
/// landing in another protocol's or direction's entries.
#[inline(always)]
pub fn count(dir: u32, proto_idx: u32, port_idx: u16, rule: u16, verdict: usize, bytes: u32) {
    let label = if (port_idx as u32) < MAX_PORT_LABELS { port_idx } else { 0 };
    add(PORT_COUNTERS.get_ptr_mut(port_counter_index(dir, proto_idx, label)), verdict, bytes);
    if rule != 0 && (rule as u32) < MAX_RULES {
        add(RULE_COUNTERS.get_ptr_mut(rule_counter_index(dir, rule)), verdict, bytes);
    }
}
