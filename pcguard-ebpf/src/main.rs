//! pcguard kernel programs: `pcguard_ingress` (XDP) and `pcguard_egress`
//! (TC classifier, clsact egress). See docs/datapath.md.
//!
//! Everything is `#[inline(always)]` into the two entry points: one BPF
//! function per program, no BPF-to-BPF calls to pass packet pointers or stack
//! through, and a stack frame the verifier sizes at once.
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

use aya_ebpf::{
    bindings::{TC_ACT_PIPE, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use pcguard_common::{DIR_EGRESS, DIR_INGRESS};

use crate::{
    parse::{Frame, Parsed, parse},
    pipeline::{Action, run},
};

/// Bytes pulled into the linear area of a non-linear skb whose headers
/// straddle it: Ethernet + 2 VLAN tags + IPv6 + a few extension headers + TCP.
const TC_PULL_LEN: u32 = 256;

#[xdp]
pub fn pcguard_ingress(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let frame = Frame {
        data,
        end,
        len: (end - data) as u32,
        ifindex: ctx.ingress_ifindex() as u32,
    };
    match run(&frame, DIR_INGRESS, parse(&frame)) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::PassDnsAnswer(answer) => {
            dns::copy(ctx.ctx, frame.len, &answer);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn tc_frame(ctx: &TcContext) -> Frame {
    // SAFETY: the context pointer is valid for the duration of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Frame {
        data: ctx.data(),
        end: ctx.data_end(),
        len: ctx.len(),
        ifindex,
    }
}

#[classifier]
pub fn pcguard_egress(ctx: TcContext) -> i32 {
    let mut frame = tc_frame(&ctx);
    let mut parsed = parse(&frame);
    // Direct packet access sees only the skb's linear part. Pull and parse
    // again only when the headers were cut short by it: pulling up front
    // would copy payload out of the frags of every GSO skb.
    if matches!(parsed, Parsed::Malformed(_)) && frame.data + (frame.len as usize) > frame.end {
        let want = if frame.len < TC_PULL_LEN {
            frame.len
        } else {
            TC_PULL_LEN
        };
        if ctx.pull_data(want).is_ok() {
            // The helper invalidates every packet pointer: re-read them.
            frame = tc_frame(&ctx);
            parsed = parse(&frame);
        }
    }
    match run(&frame, DIR_EGRESS, parsed) {
        // `run` flags DNS answers at ingress only: the arm folds away.
        Action::Pass | Action::PassDnsAnswer(_) => TC_ACT_PIPE,
        Action::Drop => TC_ACT_SHOT,
    }
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
