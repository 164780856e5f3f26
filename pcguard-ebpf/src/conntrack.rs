//! Connection tracking: LRU hashes of flow keys normalized to the server's
//! point of view (`local` = this host), in two tables (docs/datapath.md,
//! "Flow key and conntrack"):
//!
//! * `CT_NEW`: every new flow starts here, and stays until the other end
//!   has answered and (for TCP) the initiator acknowledged the answer.
//! * `CONNTRACK`: established flows. Only other established flows can
//!   evict one, so a flood of new flows (spoofed SYNs, scans, churn from
//!   random source ports) cannot push out the connections that work.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::LruHashMap};
use pcguard_common::{
    CT_FLAG_AUDITED, CT_FLAG_REPLIED, CT_STATE_CLOSING, CT_STATE_OPEN, CtEntry, DIR_EGRESS, DIR_INGRESS, FLOW_END_FIN,
    FLOW_END_IDLE, FLOW_END_RST, FlowKey, FlowRecord, IPPROTO_TCP, IPPROTO_UDP, STAT_CT_CREATED, STAT_CT_EXPIRED,
    STAT_CT_INSERT_FAILED, STAT_CT_PROMOTED, STAT_FLOW_RECORDS_DROPPED, STAT_FLOW_RECORDS_SENT, Settings,
};

use crate::{
    counters::stat,
    maps::{CONNTRACK, CT_NEW, FLOW_RECORDS},
    parse::{DNS_PORT, Frame, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, addr_bytes},
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
    let (local_port, remote_port) = if ingress { (pkt.dport, pkt.sport) } else { (pkt.sport, pkt.dport) };
    let (local, remote) = if ingress { (pkt.dst, pkt.src) } else { (pkt.src, pkt.dst) };
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

/// Which table an entry is in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    New,
    Established,
}

impl Table {
    #[inline(always)]
    fn map(self) -> &'static LruHashMap<FlowKey, CtEntry> {
        match self {
            Table::New => &CT_NEW,
            Table::Established => &CONNTRACK,
        }
    }
}

/// A valid conntrack hit.
#[derive(Clone, Copy)]
pub struct Hit {
    pub entry: *mut CtEntry,
    pub table: Table,
}

#[inline(always)]
fn idle_timeout(proto: u8, state: u8, s: &Settings) -> u64 {
    match (proto, state) {
        (IPPROTO_TCP, CT_STATE_CLOSING) => s.tcp_closing_timeout_ns,
        (IPPROTO_TCP, _) => s.tcp_timeout_ns,
        _ => s.udp_timeout_ns,
    }
}

/// Removes a closed or expired entry; whether it was there.
#[inline(always)]
fn remove(key: &FlowKey, table: Table) -> bool {
    let removed = table.map().remove(key).is_ok();
    if removed {
        stat(STAT_CT_EXPIRED);
    }
    removed
}

/// Sends the start (`end` 0) or end of an audited flow on `FLOW_RECORDS`
/// with a copy of its entry. Only for entries with `CT_FLAG_AUDITED`, on
/// a flow's creation and close: never per packet.
#[inline(never)]
fn flow_record(key: &FlowKey, e: &CtEntry, ifindex: u32, end: u8) {
    let Some(mut r) = FLOW_RECORDS.reserve::<FlowRecord>(0) else {
        stat(STAT_FLOW_RECORDS_DROPPED);
        return;
    };
    r.write(FlowRecord {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        key: *key,
        entry: *e,
        ifindex,
        end,
        _pad: [0; 3],
    });
    r.submit(0);
    stat(STAT_FLOW_RECORDS_SENT);
}

/// Removes an audited entry found idle past its timeout and sends its end
/// record (reason idle). Copied first: the removal frees the value. Only
/// the CPU whose removal succeeded reports it (the daemon's walk, which
/// also removes idle audited entries, follows the same rule). A
/// subprogram: one copy for both tables' lookups.
#[inline(never)]
fn expire_audited(key: &FlowKey, established: bool, e: &CtEntry) {
    let copy = *e;
    let table = if established { Table::Established } else { Table::New };
    if remove(key, table) {
        flow_record(key, &copy, 0, FLOW_END_IDLE);
    }
}

/// `key`'s entry in `table` if it is a valid hit: not idle past its
/// timeout (an expired entry is deleted).
#[inline(always)]
fn lookup_in(table: Table, key: &FlowKey, now: u64, s: &Settings) -> Option<Hit> {
    let entry = table.map().get_ptr_mut(key)?;
    // SAFETY: map value pointer, valid for the duration of the program.
    let e = unsafe { &*entry };
    // Saturating: another CPU may have stored a `last_seen_ns` later than our
    // `now`; that is an age of 0, not an expiry.
    if now.saturating_sub(e.last_seen_ns) >= idle_timeout(key.proto, e.state, s) {
        // An open audited flow's end (a flow closed by FIN was reported
        // then).
        if e.flags & CT_FLAG_AUDITED != 0 && e.state == CT_STATE_OPEN {
            expire_audited(key, table == Table::Established, e);
        } else {
            remove(key, table);
        }
        return None;
    }
    Some(Hit { entry, table })
}

/// The valid hit of a packet: established flows first (one lookup for
/// the packets of working connections), then new ones. Never asked for a
/// bare TCP SYN: the policy decides those (`pipeline::ip`), so a SYN can
/// never ride on an entry, whichever way it was opened.
#[inline(always)]
pub fn lookup(key: &FlowKey, now: u64, s: &Settings) -> Option<Hit> {
    if let Some(hit) = lookup_in(Table::Established, key, now, s) {
        return Some(hit);
    }
    lookup_in(Table::New, key, now, s)
}

/// Whether a packet travelling in `dir` keeps a flow initiated in
/// `flow_dir` alive. Not the answers of a DNS flow this server opened: a
/// spoofed "answer" from the resolver's address and port (neither is
/// authenticated on a LAN) must not hold the flow's window open; only the
/// server's own queries do.
#[inline(always)]
pub fn refreshes(key: &FlowKey, dir: u32, flow_dir: u32) -> bool {
    !(dir == DIR_INGRESS && flow_dir == DIR_EGRESS && key.proto == IPPROTO_UDP && key.remote_port == DNS_PORT)
}

/// Whether a `CT_NEW` flow is established once a packet travelling in
/// `dir` with `tcp_flags` has been seen: TCP when the initiator sends an
/// ACK (not a SYN) after the other end answered (the handshake's third
/// packet, which a spoofed source never sees the answer to send); UDP on
/// the answer to a flow this server opened, or the initiator's next packet
/// after an answer to one a peer opened. `replied`: the answer came
/// earlier; `reply`: this packet is it.
#[inline(always)]
fn established(key: &FlowKey, flow_dir: u32, replied: bool, reply: bool, tcp_flags: u8) -> bool {
    if key.proto == IPPROTO_TCP {
        !reply && replied && tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK
    } else if reply {
        flow_dir == DIR_EGRESS
    } else {
        replied
    }
}

/// Adds a packet of `len` frame bytes travelling in `dir` to the flow's
/// counters: the allowed path's only cost for per-flow volumes (the entry
/// is the one the packet's lookup returned).
#[inline(always)]
fn count_packet(e: &mut CtEntry, dir: u32, len: u32) {
    if dir == DIR_INGRESS {
        e.packets_in += 1;
        e.bytes_in += len as u64;
    } else {
        e.packets_out += 1;
        e.bytes_out += len as u64;
    }
}

/// Updates a valid hit after its packet has been counted: adds the packet
/// (its frame) to the entry's counters, refreshes
/// `last_seen_ns` (when `refresh`), deletes the entry on RST, marks it
/// closing on FIN, and moves a `CT_NEW` flow to `CONNTRACK` once it is
/// established. An audited flow's RST or first FIN sends its end record.
#[inline(always)]
pub fn touch(key: &FlowKey, hit: Hit, dir: u32, tcp_flags: u8, now: u64, refresh: bool, frame: &Frame) {
    // SAFETY: map value pointer, valid for the duration of the program.
    let e = unsafe { &mut *hit.entry };
    count_packet(e, dir, frame.len);
    // One call site for both ends (a smaller program for the verifier).
    if tcp_flags & (TCP_RST | TCP_FIN) != 0 && e.flags & CT_FLAG_AUDITED != 0 && e.state == CT_STATE_OPEN {
        let end = if tcp_flags & TCP_RST != 0 { FLOW_END_RST } else { FLOW_END_FIN };
        flow_record(key, e, frame.ifindex, end);
    }
    if tcp_flags & TCP_RST != 0 {
        // Both tables: a bare SYN of an established 5-tuple (a duplicate,
        // or a new connection reusing it) may have left a `CT_NEW` entry
        // beside it.
        remove(key, Table::Established);
        remove(key, Table::New);
        return;
    }
    if refresh {
        e.last_seen_ns = now;
    }
    if tcp_flags & TCP_FIN != 0 {
        e.state = CT_STATE_CLOSING;
    }
    if hit.table == Table::Established {
        return;
    }
    let flow_dir = e.flow_dir as u32;
    let reply = dir != flow_dir;
    if established(key, flow_dir, e.flags & CT_FLAG_REPLIED != 0, reply, tcp_flags) {
        promote(key, e);
    } else if reply {
        e.flags |= CT_FLAG_REPLIED;
    }
}

/// Moves a flow from `CT_NEW` to `CONNTRACK`. If the insert fails the
/// entry stays where it is (and is tried again on its next packet).
#[inline(always)]
fn promote(key: &FlowKey, e: &CtEntry) {
    let entry = CtEntry { flags: e.flags & !CT_FLAG_REPLIED, ..*e };
    if CONNTRACK.insert(key, entry, 0).is_ok() {
        let _ = CT_NEW.remove(key);
        stat(STAT_CT_PROMOTED);
    } else {
        stat(STAT_CT_INSERT_FAILED);
    }
}

/// Tracks a new flow initiated in `flow_dir` (in `CT_NEW`), counting its
/// first packet (its frame). An audited flow
/// (`CT_FLAG_AUDITED` in `flags`) sends its start record once the entry
/// is created.
///
/// `BPF_NOEXIST`: an existing entry (one ignored because of a bare SYN
/// against its direction, or one another CPU just created) is kept.
#[inline(always)]
pub fn insert(key: &FlowKey, flow_dir: u32, rule: u16, port_idx: u16, flags: u8, now: u64, frame: &Frame) {
    let mut entry = CtEntry {
        last_seen_ns: now,
        rule,
        port_idx,
        flow_dir: flow_dir as u8,
        state: CT_STATE_OPEN,
        flags,
        _pad: 0,
        started_ns: now,
        packets_in: 0,
        bytes_in: 0,
        packets_out: 0,
        bytes_out: 0,
    };
    count_packet(&mut entry, flow_dir, frame.len);
    match CT_NEW.insert(key, entry, BPF_NOEXIST as u64) {
        Ok(()) => {
            stat(STAT_CT_CREATED);
            if flags & CT_FLAG_AUDITED != 0 {
                flow_record(key, &entry, frame.ifindex, 0);
            }
        }
        Err(e) if e == -EEXIST => {}
        Err(_) => stat(STAT_CT_INSERT_FAILED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8) -> FlowKey {
        FlowKey { proto, ..Default::default() }
    }

    #[test]
    fn tcp_is_established_by_the_initiators_ack_after_an_answer() {
        let tcp = key(IPPROTO_TCP);
        // The SYN+ACK (a reply) does not establish; it marks the answer.
        assert!(!established(&tcp, DIR_INGRESS, false, true, TCP_SYN | TCP_ACK));
        // The initiator's ACK after it does.
        assert!(established(&tcp, DIR_INGRESS, true, false, TCP_ACK));
        // Not before an answer, not a retransmitted SYN, not a reply.
        assert!(!established(&tcp, DIR_INGRESS, false, false, TCP_ACK));
        assert!(!established(&tcp, DIR_INGRESS, true, false, TCP_SYN));
        assert!(!established(&tcp, DIR_INGRESS, true, true, TCP_ACK));
    }

    #[test]
    fn udp_is_established_by_an_answer_to_the_server_or_a_peer_s_second_packet() {
        let udp = key(IPPROTO_UDP);
        assert!(established(&udp, DIR_EGRESS, false, true, 0));
        assert!(!established(&udp, DIR_INGRESS, false, true, 0));
        assert!(established(&udp, DIR_INGRESS, true, false, 0));
        assert!(!established(&udp, DIR_INGRESS, false, false, 0));
    }
}
