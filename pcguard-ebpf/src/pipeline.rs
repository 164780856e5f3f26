//! The per-packet pipeline shared by both hooks (docs/datapath.md): parse
//! result -> policy generation and readiness -> bypass -> conntrack ->
//! policy decision -> verdict.
//! `dir` is the direction the packet travels (`DIR_INGRESS` at XDP,
//! `DIR_EGRESS` at TC): a constant once inlined, so each hook's DNS half
//! (answers at ingress, queries at egress) is compiled out of the other.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use pcguard_common::{
    CT_FLAG_AUDITED, CT_FLAG_MONITORED, DIR_INGRESS, FlowKey, MODE_MONITOR, Malformed, PROTO_IDX_OTHER,
    REASON_MALFORMED, REASON_OUTBOUND_TO_WORKSTATION, REASON_UNTRACKED_REPLY, STAT_MALFORMED, STAT_NON_IP, Settings,
    VERDICT_ALLOW, VERDICT_BYPASS, VERDICT_DROP, VERDICT_MONITOR, rule_audited,
};

use crate::{
    conntrack::{self, Hit},
    counters::{count, proto_idx, stat},
    dns::{self, Load},
    events::{self, Report},
    parse::{Frame, L4, Packet, Parse, is_bare_syn},
    policy::{self, Decision, Gen, Peer},
    trace,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
}

/// CLOCK_MONOTONIC at the last tick, for conntrack ages and report
/// intervals (seconds): same timeline as `bpf_ktime_get_ns`, but it reads
/// no clocksource, which costs ~18 ns per packet on a VM's TSC.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn opposite(dir: u32) -> u32 {
    dir ^ 1
}

/// Verdict for a packet policy does not allow: drop in enforce mode (any
/// mode value other than monitor fails closed), monitor otherwise.
#[inline(always)]
fn unexpected_verdict(s: &Settings, dir: u32) -> usize {
    let mode = if dir == DIR_INGRESS { s.ingress_mode } else { s.egress_mode };
    if mode == MODE_MONITOR { VERDICT_MONITOR } else { VERDICT_DROP }
}

#[inline(always)]
fn action(verdict: usize) -> Action {
    if verdict == VERDICT_DROP { Action::Drop } else { Action::Pass }
}

/// The verdict for a frame parsed (`parsed`) into `pkt`. `load` is the
/// hook's load-bytes helper, for DNS messages.
#[inline(always)]
pub fn run(frame: &Frame, dir: u32, parsed: Parse, pkt: &Packet, load: &impl Load) -> Action {
    match parsed {
        Parse::NonIp => {
            // `STAT_NON_IP` counts non-IP frames seen at ingress (the
            // contract); at egress they pass uncounted.
            if dir == DIR_INGRESS {
                stat(STAT_NON_IP);
            }
            Action::Pass
        }
        Parse::Malformed { kind, keyed } => {
            stat(STAT_MALFORMED);
            let g = Gen::active();
            match g.ready_settings() {
                Some(s) => malformed(frame, dir, g, s, kind, keyed.then_some(pkt)),
                None => bypass(frame, dir, PROTO_IDX_OTHER, pkt),
            }
        }
        Parse::Ip => {
            // The one read of `ACTIVE` for this packet: every lookup below
            // uses `g`.
            let g = Gen::active();
            match g.ready_settings() {
                Some(s) => ip(frame, dir, g, s, pkt, load),
                None => bypass(frame, dir, proto_idx(pkt.proto), pkt),
            }
        }
    }
}

/// Passed without policy (not ready, ICMP allowed, non-first fragment).
/// `pkt`: for the trace record only.
#[inline(always)]
#[cfg_attr(not(feature = "trace"), allow(unused_variables))]
fn bypass(frame: &Frame, dir: u32, proto_idx: u32, pkt: &Packet) -> Action {
    count(dir, proto_idx, 0, 0, VERDICT_BYPASS, frame.len);
    trace::decision!(dir, VERDICT_BYPASS, 0, pkt, 0);
    Action::Pass
}

#[inline(always)]
fn malformed(frame: &Frame, dir: u32, g: Gen, s: &Settings, kind: Malformed, pkt: Option<&Packet>) -> Action {
    let verdict = unexpected_verdict(s, dir);
    count(dir, PROTO_IDX_OTHER, 0, 0, verdict, frame.len);
    trace::decision!(dir, verdict, REASON_MALFORMED, pkt.unwrap_or(&Packet::EMPTY), 0);
    if let Some(pkt) = pkt {
        let key = &conntrack::flow_key(pkt, dir).0;
        let r = Report {
            direction: dir,
            reason: REASON_MALFORMED,
            verdict,
            slot: 0,
            tcp_flags: pkt.tcp_flags,
            detail: kind as u8,
        };
        events::report(frame, key, &r, &mut Peer::new(g, key), now(), s);
    }
    action(verdict)
}

/// A tracked or trackable packet: what the stages after parsing share.
struct Flow<'a> {
    frame: &'a Frame,
    /// Direction the packet travels.
    dir: u32,
    /// The packet's policy generation and its settings.
    g: Gen,
    s: &'a Settings,
    pkt: &'a Packet,
    proto_idx: u32,
    key: &'a FlowKey,
    now: u64,
}

impl Flow<'_> {
    #[inline(always)]
    fn count(&self, port_idx: u16, rule: u16, verdict: usize) {
        count(self.dir, self.proto_idx, port_idx, rule, verdict, self.frame.len);
    }

    /// A new flow initiated in `flow_dir` to `service_port`.
    #[inline(always)]
    fn decide(&self, peer: &mut Peer, flow_dir: u32, service_port: u16) -> Decision {
        policy::decide(self.g, self.s, peer, flow_dir, self.proto_idx, service_port)
    }
}

#[inline(always)]
fn ip(frame: &Frame, dir: u32, g: Gen, s: &Settings, pkt: &Packet, load: &impl Load) -> Action {
    let proto_idx = proto_idx(pkt.proto);
    match pkt.l4 {
        L4::Fragment => return bypass(frame, dir, proto_idx, pkt),
        L4::Icmp if s.allow_icmp == 1 => return bypass(frame, dir, PROTO_IDX_OTHER, pkt),
        _ => {}
    }
    let key = &conntrack::flow_key(pkt, dir).0;
    let flow = Flow { frame, dir, g, s, pkt, proto_idx, key, now: now() };
    // A bare SYN opens a connection: the policy decides it, whatever
    // conntrack holds (a retransmission of an allowed SYN is allowed again;
    // its insert finds the entry). A SYN flood pays no conntrack lookup.
    let hit = if pkt.l4 == L4::Tcp && is_bare_syn(pkt.tcp_flags) { None } else { conntrack::lookup(key, flow.now, s) };
    // One call site each: inlined twice, `untracked` doubled the program.
    let action = match hit {
        Some(hit) => tracked(&flow, hit, load),
        None => untracked(&flow),
    };
    // At egress, a passed query to a resolver is also recorded and copied
    // (one place for every way a packet passes: one walk for the verifier).
    if dir != DIR_INGRESS
        && action == Action::Pass
        && let Some(q) = dns::query(pkt, key, g, s, flow.now)
    {
        dns::handle(frame.len, &q, key, load);
    }
    action
}

#[inline(always)]
fn tracked(flow: &Flow, hit: Hit, load: &impl Load) -> Action {
    // SAFETY: map value pointer, valid for the duration of the program.
    // Read before `touch`, which may delete the entry.
    let (port_idx, rule, flags, flow_dir) = unsafe {
        let e = &*hit.entry;
        (e.port_idx, e.rule, e.flags, e.flow_dir as u32)
    };
    let verdict = if flags & CT_FLAG_MONITORED != 0 { VERDICT_MONITOR } else { VERDICT_ALLOW };
    flow.count(port_idx, rule, verdict);
    trace::decision!(flow.dir, verdict, 0, flow.pkt, rule);
    let refresh = conntrack::refreshes(flow.key, flow.dir, flow_dir);
    conntrack::touch(flow.key, hit, flow.dir, flow.pkt.tcp_flags, flow.now, refresh, flow.frame);
    if flow.dir == DIR_INGRESS
        && let Some(answer) = dns::answer(flow.pkt, flow.key, flow_dir, flow.g, flow.s, flow.now)
    {
        dns::handle(flow.frame.len, &answer, flow.key, load);
    }
    Action::Pass
}

/// Tracks a new flow initiated in `flow_dir` and passes the packet.
#[inline(always)]
fn track(flow: &Flow, flow_dir: u32, d: &Decision, verdict: usize) -> Action {
    // An allowed flow of an audited rule (a bit of the generation's
    // settings: no lookup) sends start and end records.
    let flags = if verdict == VERDICT_MONITOR {
        CT_FLAG_MONITORED
    } else if rule_audited(&flow.s.audit_rules, d.rule) {
        CT_FLAG_AUDITED
    } else {
        0
    };
    conntrack::insert(flow.key, flow_dir, d.rule, d.port_idx, flags, flow.now, flow.frame);
    flow.count(d.port_idx, d.rule, verdict);
    Action::Pass
}

/// A packet of a flow conntrack does not hold passes only if a rule allows
/// a flow opened in the packet's own direction to its destination port.
/// Nothing is ever adopted as a reply of a flow the other way: a lost
/// entry of an outbound flow is re-created by the server's next packet,
/// which its rule allows (docs/datapath.md).
#[inline(always)]
fn untracked(flow: &Flow) -> Action {
    let dir = flow.dir;
    let pkt = flow.pkt;
    let s = flow.s;
    let mut peer = Peer::new(flow.g, flow.key);
    let has_ports = pkt.l4 == L4::Tcp || pkt.l4 == L4::Udp;
    let first = if has_ports { flow.decide(&mut peer, dir, pkt.dport) } else { Decision::NO_RULE };
    if first.allowed() {
        trace::decision!(dir, VERDICT_ALLOW, 0, pkt, first.rule);
        return track(flow, dir, &first, VERDICT_ALLOW);
    }
    // Unexpected. A TCP packet that is not an opening SYN and would be a
    // reply of a flow allowed the other way is dropped like the rest, but
    // reported as such rather than as a new flow (or an alert).
    let reason = if pkt.l4 == L4::Tcp
        && !is_bare_syn(pkt.tcp_flags)
        && flow.decide(&mut peer, opposite(dir), pkt.sport).allowed()
    {
        REASON_UNTRACKED_REPLY
    } else if dir != DIR_INGRESS && peer.mask() & s.no_initiate_mask != 0 {
        REASON_OUTBOUND_TO_WORKSTATION
    } else {
        first.reason
    };
    let verdict = unexpected_verdict(s, dir);
    let r = Report { direction: dir, reason, verdict, slot: first.slot, tcp_flags: pkt.tcp_flags, detail: 0 };
    events::report(flow.frame, flow.key, &r, &mut peer, flow.now, s);
    trace::decision!(dir, verdict, reason, pkt, 0);
    if verdict == VERDICT_DROP {
        flow.count(first.port_idx, 0, VERDICT_DROP);
        return Action::Drop;
    }
    // Monitor: the entry (rule 0: `first` allowed nothing) makes the rest of
    // the flow and its replies known.
    track(flow, dir, &first, VERDICT_MONITOR)
}
