#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, bindings::TC_ACT_PIPE, macros::{classifier, xdp}, programs::{TcContext, XdpContext}};

#[xdp]
pub fn pcguard_ingress(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn pcguard_egress(_ctx: TcContext) -> i32 {
    TC_ACT_PIPE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
