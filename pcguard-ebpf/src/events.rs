//! Unexpected-flow reports on the `EVENTS` ring buffer, at most one per flow
//! key per `report_interval_ns`.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use pcguard_common::{
    FlowEvent, FlowKey, STAT_EVENTS_DROPPED, STAT_EVENTS_SENT, STAT_EVENTS_SUPPRESSED,
};

use crate::{
    counters::stat,
    maps::{EVENTS, REPORTED},
    parse::Frame,
};

/// What is reported about an unexpected flow besides its key.
pub struct Report {
    /// Direction the packet travelled.
    pub direction: u32,
    pub reason: u8,
    pub verdict: usize,
    pub peer_mask: u32,
    pub slot: u16,
    pub tcp_flags: u8,
    /// `Malformed` code for `REASON_MALFORMED`, else 0.
    pub detail: u8,
}

/// Whether `key` was reported less than `interval` ago.
#[inline(always)]
fn recently_reported(key: &FlowKey, now: u64, interval: u64) -> bool {
    // SAFETY: plain u64 value; a concurrent update only makes it newer.
    match unsafe { REPORTED.get(key) } {
        Some(last) => now.saturating_sub(*last) < interval,
        None => false,
    }
}

#[inline(always)]
pub fn report(frame: &Frame, key: &FlowKey, r: &Report, now: u64, interval: u64) {
    if recently_reported(key, now, interval) {
        stat(STAT_EVENTS_SUPPRESSED);
        return;
    }
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        // Not marked as reported: a later packet of the flow retries once the
        // daemon has drained the ring.
        stat(STAT_EVENTS_DROPPED);
        return;
    };
    // LLVM turns the runs of zero bytes (`_pad`, constant-zero fields) into
    // a small `memset` call, which aya links as a static BPF subprogram: fine
    // on this rate-limited path.
    slot.write(FlowEvent {
        // Precise, as the contract says (`now` is the coarse clock).
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        key: *key,
        peer_mask: r.peer_mask,
        ifindex: frame.ifindex,
        pkt_len: frame.len,
        direction: r.direction as u8,
        reason: r.reason,
        verdict: r.verdict as u8,
        tcp_flags: r.tcp_flags,
        slot: r.slot,
        detail: r.detail,
        _pad: [0; 5],
    });
    slot.submit(0);
    // Failure only means the flow may be reported again: nothing to do.
    let _ = REPORTED.insert(key, now, 0);
    stat(STAT_EVENTS_SENT);
}
