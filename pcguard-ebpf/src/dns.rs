//! DNS-aware egress, kernel half (docs/datapath.md, "DNS messages"): the
//! queries this server sends to its resolvers (egress, TC) and the one
//! answer to each (ingress, XDP) are copied to `DNS_MESSAGES` for the
//! daemon, which matches every answer with its query before it learns an
//! address from it.
//!
//! The kernel binds answers to queries by flow and transaction id: a query
//! records `(flow, txid)` in `DNS_PENDING`, and an answer is copied only
//! if it removes that entry. Spoofed answers with another id, a second
//! answer, or answers to a port that sent no query never reach the daemon.
//!
//! The pipeline picks candidates ([`query`], [`answer`]: UDP to or from a
//! resolver's port 53 with room for a DNS header in the datagram); the
//! entry points, which hold the context the helpers need, read the header
//! and copy ([`handle`]). Reading the header there, through a helper,
//! rather than while parsing keeps the verifier's view of the pipeline
//! small (no DNS branch in every parse path).

use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use pcguard_common::{
    DIR_EGRESS, DNS_KIND_ANSWER, DNS_KIND_QUERY, DNS_PAYLOAD_MAX, DnsMessage, DnsPendingKey, FlowKey, STAT_DNS_ANSWERS,
    STAT_DNS_ANSWERS_DROPPED, STAT_DNS_QUERIES, STAT_DNS_UNSOLICITED, Settings,
};

use crate::{
    counters::stat,
    maps::{DNS_MESSAGES, DNS_PENDING},
    parse::{Addr, DNS_PORT, L4, Packet, addr_bytes},
    policy::{self, Gen},
};

/// A DNS header: id, flags, four counts.
const DNS_HLEN: u16 = 12;
/// QR, the first bit of the third header byte: set in responses.
const DNS_QR: u8 = 0x80;

/// The hook's load-bytes helper (`bpf_xdp_load_bytes`,
/// `bpf_skb_load_bytes`): copies `n` bytes at `off` of the frame to `dst`,
/// 0 on success.
pub trait Load: Fn(u32, *mut c_void, u32) -> i64 {}
impl<F: Fn(u32, *mut c_void, u32) -> i64> Load for F {}

/// A DNS message candidate: whose, and where its payload is in the frame.
#[derive(Clone, Copy)]
pub struct DnsCopy {
    /// `DNS_KIND_QUERY` / `DNS_KIND_ANSWER`.
    pub kind: u8,
    pub resolver: Addr,
    pub family: u8,
    /// This server's port.
    pub server_port: u16,
    /// Offset of the UDP payload from the start of the frame.
    pub off: u16,
    /// Bytes of the payload inside the datagram (at least a DNS header).
    pub len: u16,
    /// Payload length the UDP header claims.
    pub claimed: u16,
    /// The packet's time (coarse clock), for `DNS_PENDING`.
    pub now: u64,
}

/// `pkt` travelling to (`query`) or from the resolver port 53, UDP, with a
/// whole DNS header in the datagram, and a remote end among generation
/// `g`'s resolvers. The LPM lookup comes last: every other packet (the hot
/// path of tracked flows) pays only the comparisons before it.
#[inline(always)]
fn candidate(pkt: &Packet, key: &FlowKey, g: Gen, s: &Settings, kind: u8, now: u64) -> Option<DnsCopy> {
    let query = kind == DNS_KIND_QUERY;
    let resolver_port = if query { pkt.dport } else { pkt.sport };
    if pkt.l4 != L4::Udp
        || resolver_port != DNS_PORT
        || s.resolver_mask == 0
        || pkt.payload_len < DNS_HLEN
        || policy::peer_mask(g, key) & s.resolver_mask == 0
    {
        return None;
    }
    Some(DnsCopy {
        kind,
        resolver: if query { pkt.dst } else { pkt.src },
        family: pkt.family,
        server_port: if query { pkt.sport } else { pkt.dport },
        off: pkt.payload_off,
        len: pkt.payload_len,
        claimed: pkt.payload_claimed,
        now,
    })
}

/// At egress, for a passed packet: a possible query to a resolver.
#[inline(always)]
pub fn query(pkt: &Packet, key: &FlowKey, g: Gen, s: &Settings, now: u64) -> Option<DnsCopy> {
    candidate(pkt, key, g, s, DNS_KIND_QUERY, now)
}

/// At ingress, on a valid conntrack hit of a flow initiated in `flow_dir`:
/// a possible answer of a resolver to one of this server's queries.
#[inline(always)]
pub fn answer(pkt: &Packet, key: &FlowKey, flow_dir: u32, g: Gen, s: &Settings, now: u64) -> Option<DnsCopy> {
    if flow_dir != DIR_EGRESS {
        return None;
    }
    candidate(pkt, key, g, s, DNS_KIND_ANSWER, now)
}

#[inline(always)]
fn pending_key(key: &FlowKey, txid: u16) -> DnsPendingKey {
    DnsPendingKey { flow: *key, txid, _pad: [0; 6] }
}

/// Reads the candidate's DNS header with `load(off, dst, n)` (the hook's
/// load-bytes helper) and, for a query (QR = 0), records it as pending
/// under its flow `key`; for an answer (QR = 1), removes its pending query
/// (one answer per query: an answer that finds none is counted and not
/// copied). Then copies the message for the daemon.
#[inline(always)]
pub fn handle(frame_len: u32, c: &DnsCopy, key: &FlowKey, load: &impl Load) {
    let mut hdr = [0u8; 4];
    if load(c.off as u32, hdr.as_mut_ptr().cast(), 4) != 0 {
        return;
    }
    let txid = u16::from_ne_bytes([hdr[0], hdr[1]]);
    let response = hdr[2] & DNS_QR != 0;
    if c.kind == DNS_KIND_QUERY {
        if response {
            return;
        }
        // An LRU: a full map forgets the oldest queries, whose answers are
        // then not copied.
        let _ = DNS_PENDING.insert(pending_key(key, txid), c.now, 0);
    } else if !response || DNS_PENDING.remove(pending_key(key, txid)).is_err() {
        stat(STAT_DNS_UNSOLICITED);
        return;
    }
    copy(frame_len, c, load);
}

/// Bytes to copy of a payload of `len` bytes (inside the datagram) at
/// `off` in a frame of `frame_len` bytes: no more than the frame holds
/// after `off` nor than `DNS_PAYLOAD_MAX`.
///
/// 64-bit on purpose: with a `u32`, LLVM tests a zero-extended copy for
/// zero and passes the original register to the helper, and the verifier,
/// which cannot relate the two, sees a size that may be 0.
#[inline(always)]
fn copy_len(off: u16, len: u16, frame_len: u32) -> u64 {
    let in_frame = (frame_len as u64).saturating_sub(off as u64);
    (len as u64).min(in_frame).min(DNS_PAYLOAD_MAX as u64)
}

/// Copies the message into a `DnsMessage` on `DNS_MESSAGES`.
///
/// The record is filled in place: at 1 KiB of payload it cannot be built on
/// the 512-byte BPF stack. Payload bytes past `len` are left as the ring
/// buffer holds them (`len` says where the message ends).
#[inline(always)]
fn copy(frame_len: u32, c: &DnsCopy, load: &impl Load) {
    let n = copy_len(c.off, c.len, frame_len);
    if n == 0 {
        return;
    }
    // The helper's size argument must be provably in 1..=DNS_PAYLOAD_MAX
    // on the very register passed, and LLVM may test one copy of `n` and
    // pass another. Hidden from LLVM (a volatile read), the mask below
    // cannot be folded away, and it leaves the verifier a register in
    // [1, DNS_PAYLOAD_MAX] whatever it knew before; for `n` in that range
    // it changes nothing.
    // SAFETY: a read of a local.
    let n = unsafe { core::ptr::read_volatile(&n) };
    let n = ((n - 1) & (DNS_PAYLOAD_MAX as u64 - 1)) + 1;
    let Some(mut entry) = DNS_MESSAGES.reserve::<DnsMessage>(0) else {
        stat(STAT_DNS_ANSWERS_DROPPED);
        return;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` is the reserved record, `size_of::<DnsMessage>()` bytes;
    // the helper writes `n <= DNS_PAYLOAD_MAX` bytes into `payload`.
    let copied = unsafe {
        (*rec).ts_ns = bpf_ktime_get_ns();
        (*rec).resolver = addr_bytes(c.resolver);
        (*rec).family = c.family;
        (*rec).kind = c.kind;
        (*rec).len = n as u16;
        (*rec).orig_len = c.claimed;
        (*rec).server_port = c.server_port;
        let payload = addr_of_mut!((*rec).payload).cast();
        load(c.off as u32, payload, n as u32)
    };
    // Cannot fail after the bounds above, but a record with a payload the
    // helper did not write must not reach the daemon.
    if copied != 0 {
        entry.discard(0);
        stat(STAT_DNS_ANSWERS_DROPPED);
        return;
    }
    entry.submit(0);
    stat(if c.kind == DNS_KIND_QUERY { STAT_DNS_QUERIES } else { STAT_DNS_ANSWERS });
}

#[cfg(test)]
mod tests {
    use super::copy_len;

    #[test]
    fn copy_len_is_bounded_by_the_frame_and_the_record() {
        // 14 + 20 + 8 bytes of headers.
        assert_eq!(copy_len(42, 100, 142), 100);
        assert_eq!(copy_len(42, 1232, 1274), 1024);
        // A truncated frame: what it holds.
        assert_eq!(copy_len(42, 3000, 542), 500);
        assert_eq!(copy_len(42, 3000, 1500), 1024);
        assert_eq!(copy_len(42, 100, 42), 0);
        assert_eq!(copy_len(42, 100, 10), 0);
        assert_eq!(copy_len(42, 0, 142), 0);
    }
}
