//! pcguard kernel programs: `pcguard_ingress` (XDP) and `pcguard_egress`
//! (TC classifier, clsact egress). See docs/datapath.md.
//!
//! Everything is `#[inline(always)]` into the two entry points except the
//! parser (`parse::parse_into`), one BPF-to-BPF call that fills a `Packet`
//! on the entry point's stack: inlined, its many early exits made LLVM
//! spill the packet's fields at every bounds check (see its docs). No
//! packet pointer crosses back from it.
// The programs are BPF only. Host builds (`cargo test --workspace`) compile
// them with std and run the unit tests of the pure parts (parsing, policy
// arithmetic).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod conntrack;
mod counters;
mod dns;
mod events;
mod maps;
mod parse;
mod pipeline;
mod policy;
mod trace;

use aya_ebpf::{
    bindings::{TC_ACT_PIPE, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use pcguard_common::{DIR_EGRESS, DIR_INGRESS};

use crate::{
    maps::TC_RERUN,
    parse::{Frame, Packet, Parse, parse_into},
    pipeline::{Action, run},
};

/// Bytes pulled into the linear area of a non-linear skb whose headers
/// straddle it: Ethernet + VLAN tags + IPv6 + extension headers + TCP.
const TC_PULL_LEN: u32 = 512;

#[xdp]
pub fn pcguard_ingress(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let frame = Frame { data, end, len: (end - data) as u32, ifindex: ctx.ingress_ifindex() as u32 };
    let mut pkt = Packet::EMPTY;
    let parsed = parse_into(&frame, &mut pkt);
    // SAFETY: the XDP context of this run; `dns::handle` bounds the ranges
    // by the frame.
    let load = |off, dst, n| unsafe { bpf_xdp_load_bytes(ctx.ctx, off, dst, n) };
    match run(&frame, DIR_INGRESS, parsed, &pkt, &load) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn tc_frame(ctx: &TcContext) -> Frame {
    // SAFETY: the context pointer is valid for the duration of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Frame { data: ctx.data(), end: ctx.data_end(), len: ctx.len(), ifindex }
}

/// The TC programs' body, for packets travelling in `dir`; `rerun` is
/// this program's entry in `TC_RERUN`.
#[inline(always)]
fn tc_run(ctx: &TcContext, dir: u32, rerun: u32) -> i32 {
    let frame = tc_frame(ctx);
    let mut pkt = Packet::EMPTY;
    let parsed = parse_into(&frame, &mut pkt);
    // Direct packet access sees only the skb's linear part. When headers
    // were cut short by it, pull them in and run the program again from the
    // start (a tail call into itself through `TC_RERUN`): after the pull the
    // linear part holds `min(len, TC_PULL_LEN)` bytes, so the rerun does not
    // come back here. Pulling up front would copy payload out of the frags
    // of every GSO skb (and unclone every TCP skb). If the pull or the tail
    // call fails, the packet is judged as parsed: malformed, which fails
    // closed.
    let linear = (frame.end - frame.data) as u32;
    let want = if frame.len < TC_PULL_LEN { frame.len } else { TC_PULL_LEN };
    if matches!(parsed, Parse::Malformed { .. }) && linear < want && ctx.pull_data(want).is_ok() {
        // SAFETY: a tail call with the program's own context; on failure
        // it returns and the program continues.
        unsafe { TC_RERUN.tail_call(ctx, rerun) };
    }
    // SAFETY: the skb of this run; `dns::handle` bounds the ranges by the
    // skb's length.
    let load = |off, dst, n| unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, off, dst, n) };
    match run(&frame, dir, parsed, &pkt, &load) {
        Action::Pass => TC_ACT_PIPE,
        Action::Drop => TC_ACT_SHOT,
    }
}

/// Egress: every interface.
#[classifier]
pub fn pcguard_egress(ctx: TcContext) -> i32 {
    tc_run(&ctx, DIR_EGRESS, pcguard_common::TC_RERUN_EGRESS)
}

/// Ingress through TC (tcx) instead of XDP, the same pipeline: for
/// interfaces where native XDP costs more than it saves (a veth segments
/// GSO traffic for XDP and queues it in a small ring of its own; a
/// virtio-net guest must turn its offloads off). At TC ingress the skb
/// starts at the Ethernet header, like an XDP frame; an outer VLAN tag the
/// stack already took off is in the skb's metadata, not in the frame.
#[classifier]
pub fn pcguard_ingress_tc(ctx: TcContext) -> i32 {
    tc_run(&ctx, DIR_INGRESS, pcguard_common::TC_RERUN_INGRESS)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
