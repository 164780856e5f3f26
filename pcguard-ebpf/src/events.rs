//! Unexpected-flow reports on the `EVENTS` ring buffer (docs/datapath.md,
//! "Events"): at most one per (remote address, destination port, reason,
//! protocol, direction) per `report_interval_ns`, carrying how many packets
//! of it were not reported on their own since the previous report; and at
//! most `Settings.event_rate` per second per CPU, whatever arrives.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use pcguard_common::{
    DIR_INGRESS, FlowEvent, FlowKey, ReportKey, ReportSlot, STAT_EVENTS_DROPPED, STAT_EVENTS_RATE_LIMITED,
    STAT_EVENTS_SENT, STAT_EVENTS_SUPPRESSED, Settings, report_set,
};

use crate::{
    counters::stat,
    maps::{EVENT_LIMITER, EVENTS, REPORTED},
    parse::Frame,
    policy::Peer,
};

/// What is reported about an unexpected flow besides its key (and its
/// peer's classes, looked up only when a report is sent).
pub struct Report {
    /// Direction the packet travelled.
    pub direction: u32,
    pub reason: u8,
    pub verdict: usize,
    pub slot: u16,
    pub tcp_flags: u8,
    /// `Malformed` code for `REASON_MALFORMED`, else 0.
    pub detail: u8,
}

/// Nanoseconds per second.
const SEC: u64 = 1_000_000_000;
/// Highest per-CPU event rate the bucket counts in (keeps `SEC / rate`
/// at least 1 ns per token).
const MAX_RATE: u64 = 1_000_000;

/// The report key of a packet of flow `key` travelling in `dir`.
#[inline(always)]
fn report_key(key: &FlowKey, r: &Report) -> ReportKey {
    ReportKey {
        family: key.family,
        proto: key.proto,
        direction: r.direction as u8,
        reason: r.reason,
        // The destination port: the service the packet tried.
        port: if r.direction == DIR_INGRESS { key.local_port } else { key.remote_port },
        verdict: r.verdict as u8,
        _pad: 0,
        remote_addr: key.remote_addr,
    }
}

/// Takes one of this CPU's event tokens, if any: a bucket of `event_burst`
/// tokens refilled at `event_rate` per second.
#[inline(always)]
fn take_token(now: u64, s: &Settings) -> bool {
    let Some(b) = EVENT_LIMITER.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU map value, valid for the duration of the program.
    let b = unsafe { &mut *b };
    let rate = s.event_rate as u64;
    if rate == 0 {
        return false;
    }
    let per_token = SEC / rate.min(MAX_RATE);
    let earned = now.saturating_sub(b.last_ns) / per_token;
    let burst = s.event_burst as u64;
    if b.tokens + earned >= burst {
        // Full (also after a reload lowered the burst).
        b.tokens = burst;
        b.last_ns = now;
    } else if earned > 0 {
        b.tokens += earned;
        // Advance by what the tokens were worth: fractions carry over.
        b.last_ns += earned * per_token;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// The slot of `REPORTED` holding key `w`, else the one to record it in
/// (the set's older slot; an empty one is oldest), and whether it holds
/// `w`.
#[inline(always)]
fn report_slot(w: &[u64; 3]) -> Option<(*mut ReportSlot, bool)> {
    let set = report_set(w);
    let a = REPORTED.get_ptr_mut(set)?;
    let b = REPORTED.get_ptr_mut(set | 1)?;
    // SAFETY: map value pointers, valid for the duration of the program.
    let holds = |p: *mut ReportSlot| unsafe { (*p).key.is(w) };
    if holds(a) {
        return Some((a, true));
    }
    if holds(b) {
        return Some((b, true));
    }
    // SAFETY: as above.
    let older = unsafe { if (*b).last_ns < (*a).last_ns { b } else { a } };
    Some((older, false))
}

#[inline(always)]
pub fn report(frame: &Frame, key: &FlowKey, r: &Report, peer: &mut Peer, now: u64, s: &Settings) {
    let rk = report_key(key, r);
    let w = rk.words();
    let Some((slot, held)) = report_slot(&w) else {
        return;
    };
    // SAFETY: map value pointer, valid for the duration of the program.
    let st = unsafe { &mut *slot };
    let mut repeats = 0;
    if held {
        if now.saturating_sub(st.last_ns) < s.report_interval_ns {
            // Not atomic (Rust offers no atomic add on BPF): two CPUs
            // counting the same key at once may lose one; a count, not a
            // guarantee.
            st.repeats += 1;
            stat(STAT_EVENTS_SUPPRESSED);
            return;
        }
        repeats = st.repeats.min(u32::MAX as u64) as u32;
    }
    if !take_token(now, s) {
        // Not marked as reported: a later packet reports it once the CPU
        // has a token again.
        stat(STAT_EVENTS_RATE_LIMITED);
        return;
    }
    let Some(mut event) = EVENTS.reserve::<FlowEvent>(0) else {
        // Not marked as reported: a later packet retries once the daemon
        // has drained the ring.
        stat(STAT_EVENTS_DROPPED);
        return;
    };
    // LLVM turns the runs of zero bytes (`_pad`, constant-zero fields) into
    // a small `memset` call, which aya links as a static BPF subprogram: fine
    // on this rate-limited path.
    event.write(FlowEvent {
        // Precise, as the contract says (`now` is the coarse clock).
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        key: *key,
        peer_mask: peer.mask(),
        ifindex: frame.ifindex,
        pkt_len: frame.len,
        direction: r.direction as u8,
        reason: r.reason,
        verdict: r.verdict as u8,
        tcp_flags: r.tcp_flags,
        slot: r.slot,
        detail: r.detail,
        _pad: 0,
        repeats,
    });
    event.submit(0);
    // Not atomic: two CPUs recording two keys in one slot at once may leave
    // a mix of both, which matches neither (each is reported again).
    *st = ReportSlot { key: rk, last_ns: now, repeats: 0 };
    stat(STAT_EVENTS_SENT);
}
