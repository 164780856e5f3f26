//! DNS answers for DNS-aware egress: at ingress, the UDP payload of a
//! resolver's reply to this server's query is copied to `DNS_ANSWERS` for
//! the daemon to read the names and addresses in it (docs/datapath.md,
//! "DNS answers").
//!
//! The pipeline decides ([`answer`]) and the XDP entry point copies
//! ([`copy`]): the copy needs the XDP context, which the pipeline, shared
//! with TC, does not hold.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::xdp_md,
    helpers::{bpf_ktime_get_ns, bpf_xdp_load_bytes},
};
use pcguard_common::{
    DIR_EGRESS, DNS_PAYLOAD_MAX, DnsAnswer, FlowKey, STAT_DNS_ANSWERS, STAT_DNS_ANSWERS_DROPPED,
    Settings,
};

use crate::{
    counters::stat,
    maps::DNS_ANSWERS,
    parse::{Addr, L4, Packet, addr_bytes},
    policy::{self, Gen},
};

const DNS_PORT: u16 = 53;

/// A DNS answer to copy: where its payload is in the frame, and who sent it.
#[derive(Clone, Copy)]
pub struct Answer {
    /// The packet's source.
    pub resolver: Addr,
    pub family: u8,
    /// Offset of the UDP payload from the start of the frame.
    pub off: u16,
    /// Length of the UDP payload (from the UDP header).
    pub len: u16,
}

/// The answer to copy if `pkt`, seen at ingress on a valid conntrack hit
/// of a flow initiated in `flow_dir` (whose key is `key`), is a DNS answer
/// from a resolver: UDP from port 53, a reply of a flow this server
/// initiated, a payload, and a source whose peer classes (in the packet's
/// generation `g`, whose settings `s` are) intersect `resolver_mask`.
///
/// The LPM lookup comes last: every other packet (the hot path of tracked
/// flows) pays only the comparisons before it.
#[inline(always)]
pub fn answer(pkt: &Packet, key: &FlowKey, flow_dir: u32, g: Gen, s: &Settings) -> Option<Answer> {
    let candidate = pkt.l4 == L4::Udp
        && pkt.sport == DNS_PORT
        && flow_dir == DIR_EGRESS
        && s.resolver_mask != 0
        && pkt.payload_len != 0;
    if !candidate || policy::peer_mask(g, key) & s.resolver_mask == 0 {
        return None;
    }
    Some(Answer {
        resolver: pkt.src,
        family: pkt.family,
        off: pkt.payload_off,
        len: pkt.payload_len,
    })
}

/// Bytes to copy of a payload of `len` bytes at `off` in a frame of
/// `frame_len` bytes: no more than the frame holds after `off` (a first
/// fragment, a truncated packet) nor than `DNS_PAYLOAD_MAX`.
///
/// 64-bit on purpose: with a `u32`, LLVM tests a zero-extended copy for
/// zero and passes the original register to the helper, and the verifier,
/// which cannot relate the two, sees a size that may be 0.
#[inline(always)]
fn copy_len(off: u16, len: u16, frame_len: u32) -> u64 {
    let in_frame = (frame_len as u64).saturating_sub(off as u64);
    (len as u64).min(in_frame).min(DNS_PAYLOAD_MAX as u64)
}

/// Copies the answer's payload into a `DnsAnswer` on `DNS_ANSWERS`. `ctx`
/// is the XDP context of a frame of `frame_len` bytes (all linear: the
/// program is not loaded with XDP frags).
///
/// The record is filled in place: at 1 KiB of payload it cannot be built on
/// the 512-byte BPF stack. Payload bytes past `len` are left as the ring
/// buffer holds them (`len` says where the message ends).
#[inline(always)]
pub fn copy(ctx: *mut xdp_md, frame_len: u32, a: &Answer) {
    let n = copy_len(a.off, a.len, frame_len);
    // The helper's size argument must be provably in 1..=DNS_PAYLOAD_MAX:
    // `copy_len`'s `min` bounds it above, this check below (a zero size is
    // rejected by the verifier, not just by the helper).
    if n == 0 {
        return;
    }
    let Some(mut entry) = DNS_ANSWERS.reserve::<DnsAnswer>(0) else {
        stat(STAT_DNS_ANSWERS_DROPPED);
        return;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` is the reserved record, `size_of::<DnsAnswer>()` bytes;
    // the helper writes `n <= DNS_PAYLOAD_MAX` bytes into `payload`.
    let copied = unsafe {
        (*rec).ts_ns = bpf_ktime_get_ns();
        (*rec).resolver = addr_bytes(a.resolver);
        (*rec).family = a.family;
        (*rec)._pad = 0;
        (*rec).len = n as u16;
        (*rec).orig_len = a.len;
        (*rec)._pad2 = [0; 2];
        let payload = addr_of_mut!((*rec).payload).cast();
        bpf_xdp_load_bytes(ctx, a.off as u32, payload, n as u32)
    };
    // Cannot fail after the bounds above, but a record with a payload the
    // helper did not write must not reach the daemon.
    if copied != 0 {
        entry.discard(0);
        stat(STAT_DNS_ANSWERS_DROPPED);
        return;
    }
    entry.submit(0);
    stat(STAT_DNS_ANSWERS);
}

#[cfg(test)]
mod tests {
    use super::copy_len;

    #[test]
    fn copy_len_is_bounded_by_the_frame_and_the_record() {
        // 14 + 20 + 8 bytes of headers.
        assert_eq!(copy_len(42, 100, 142), 100);
        // Ethernet padding after a short payload is not copied.
        assert_eq!(copy_len(42, 6, 60), 6);
        assert_eq!(copy_len(42, 1232, 1274), 1024);
        // A first fragment or truncated packet: what the frame holds.
        assert_eq!(copy_len(42, 3000, 542), 500);
        assert_eq!(copy_len(42, 3000, 1500), 1024);
        assert_eq!(copy_len(42, 100, 42), 0);
        assert_eq!(copy_len(42, 100, 10), 0);
        assert_eq!(copy_len(42, 0, 142), 0);
    }
}
