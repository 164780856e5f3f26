//! Connection tracking: an LRU hash of flow keys normalized to the server's
//! point of view (`local` = this host).

use aya_ebpf::bindings::BPF_NOEXIST;
use pcguard_common::{
    CT_STATE_CLOSING, CT_STATE_OPEN, CtEntry, DIR_EGRESS, DIR_INGRESS, FlowKey, IPPROTO_TCP,
    IPPROTO_UDP, STAT_CT_CREATED, STAT_CT_EXPIRED, STAT_CT_INSERT_FAILED, Settings,
};

use crate::{
    counters::stat,
    maps::CONNTRACK,
    parse::{DNS_PORT, Packet, TCP_FIN, TCP_RST, addr_bytes, is_bare_syn},
};

const EEXIST: i32 = 17;

/// A `FlowKey` on the stack, 8-aligned: `FlowKey` itself is only 2-aligned,
/// and LLVM would fill its address arrays with 2-byte stores.
#[repr(C, align(8))]
pub struct Key(pub FlowKey);

/// The flow key of `pkt` seen travelling in `dir`: at ingress local is the
/// destination, at egress the source.
#[inline(always)]
pub fn flow_key(pkt: &Packet, dir: u32) -> Key {
    let ingress = dir == DIR_INGRESS;
    let (local_port, remote_port) = if ingress {
        (pkt.dport, pkt.sport)
    } else {
        (pkt.sport, pkt.dport)
    };
    let (local, remote) = if ingress {
        (pkt.dst, pkt.src)
    } else {
        (pkt.src, pkt.dst)
    };
    Key(FlowKey {
        family: pkt.family,
        proto: pkt.proto,
        _pad: 0,
        local_port,
        remote_port,
        local_addr: addr_bytes(local),
        remote_addr: addr_bytes(remote),
    })
}

#[inline(always)]
fn idle_timeout(proto: u8, state: u8, s: &Settings) -> u64 {
    match (proto, state) {
        (IPPROTO_TCP, CT_STATE_CLOSING) => s.tcp_closing_timeout_ns,
        (IPPROTO_TCP, _) => s.tcp_timeout_ns,
        _ => s.udp_timeout_ns,
    }
}

/// Removes a closed or expired entry.
#[inline(always)]
fn remove(key: &FlowKey) {
    if CONNTRACK.remove(key).is_ok() {
        stat(STAT_CT_EXPIRED);
    }
}

/// The conntrack entry of `key` if it is a valid hit for a packet travelling
/// in `dir` with `tcp_flags`: not idle past its timeout (an expired entry is
/// deleted), and not a bare SYN against the flow's direction (the entry is
/// kept: a genuine reply is never a bare SYN).
#[inline(always)]
pub fn lookup(
    key: &FlowKey,
    dir: u32,
    tcp_flags: u8,
    now: u64,
    s: &Settings,
) -> Option<*mut CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: map value pointer, valid for the duration of the program.
    let e = unsafe { &*entry };
    // Saturating: another CPU may have stored a `last_seen_ns` later than our
    // `now`; that is an age of 0, not an expiry.
    if now.saturating_sub(e.last_seen_ns) >= idle_timeout(key.proto, e.state, s) {
        remove(key);
        return None;
    }
    if is_bare_syn(tcp_flags) && e.flow_dir as u32 != dir {
        return None;
    }
    Some(entry)
}

/// Whether a packet travelling in `dir` keeps a flow initiated in
/// `flow_dir` alive. Not the answers of a DNS flow this server opened: a
/// spoofed "answer" from the resolver's address and port (neither is
/// authenticated on a LAN) must not hold the flow's window open; only the
/// server's own queries do.
#[inline(always)]
pub fn refreshes(key: &FlowKey, dir: u32, flow_dir: u32) -> bool {
    !(dir == DIR_INGRESS
        && flow_dir == DIR_EGRESS
        && key.proto == IPPROTO_UDP
        && key.remote_port == DNS_PORT)
}

/// Updates a valid hit after its packet has been counted: refreshes
/// `last_seen_ns` (when `refresh`), deletes the entry on RST, marks it
/// closing on FIN.
#[inline(always)]
pub fn touch(key: &FlowKey, entry: *mut CtEntry, tcp_flags: u8, now: u64, refresh: bool) {
    if tcp_flags & TCP_RST != 0 {
        remove(key);
        return;
    }
    // SAFETY: map value pointer, valid for the duration of the program.
    let e = unsafe { &mut *entry };
    if refresh {
        e.last_seen_ns = now;
    }
    if tcp_flags & TCP_FIN != 0 {
        e.state = CT_STATE_CLOSING;
    }
}

/// Tracks a new flow initiated in `flow_dir`.
///
/// `BPF_NOEXIST`: an existing entry (one ignored because of a bare SYN
/// against its direction, or one another CPU just created) is kept.
#[inline(always)]
pub fn insert(key: &FlowKey, flow_dir: u32, rule: u16, port_idx: u16, flags: u8, now: u64) {
    let entry = CtEntry {
        last_seen_ns: now,
        rule,
        port_idx,
        flow_dir: flow_dir as u8,
        state: CT_STATE_OPEN,
        flags,
        _pad: 0,
    };
    match CONNTRACK.insert(key, entry, BPF_NOEXIST as u64) {
        Ok(()) => stat(STAT_CT_CREATED),
        Err(e) if e == -EEXIST => {}
        Err(_) => stat(STAT_CT_INSERT_FAILED),
    }
}
