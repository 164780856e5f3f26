//! Flows: the ingress and egress pipelines' verdicts, conntrack (FIN, RST,
//! monitor mode, a policy not ready, a flood of new flows), untracked
//! packets, the stricter parse.

use std::{cell::Cell, rc::Rc};

use anyhow::{Context as _, ensure};
use pcguard_common::{
    CT_FLAG_MONITORED, CT_STATE_CLOSING, DIR_EGRESS, DIR_INGRESS, IPPROTO_TCP, MAX_VLAN_TAGS, Malformed, PROTO_IDX_TCP,
    REASON_MALFORMED, REASON_NO_RULE, REASON_OUTBOUND_TO_WORKSTATION, REASON_PEER_NOT_ALLOWED, REASON_UNTRACKED_REPLY,
    STAT_CT_PROMOTED, STAT_EVENTS_SENT, names, port_counter_index, port_table_index, rule_counter_index,
};
use pcguard_testkit::frame::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, arp, icmp4_echo, ipv6, tcp, tcp4, vlan};
use pcguard_tests::kernel::{
    CLIENT_PORT, CT_NEW_ENTRIES, LDAP_SERVER, LDAPS_PORT, OTHER_PORT, SERVER, STRANGER, WEB_PORT, WORKSTATION, v4_key,
};

use crate::{Check, DROP, PASS, REPEAT, TC, TCI, XDP, case, check, reasons, run, setup, web_handshake, web_key};

/// The ingress pipeline: the first packet of an allowed flow and its
/// established packets, drops (no rule, peer not allowed, IPv6, malformed),
/// what bypasses the policy; the same pipeline on TC.
#[test]
fn ingress() -> anyhow::Result<()> {
    let syn = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN);
    let ack = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_ACK);
    let to_9999 = tcp4(WORKSTATION, SERVER, CLIENT_PORT + 1, OTHER_PORT, TCP_SYN);
    let stranger = tcp4(STRANGER, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN);
    let vlan_syn = vlan(tcp4(WORKSTATION, SERVER, CLIENT_PORT + 2, WEB_PORT, TCP_SYN), 100);
    let mut v6_src = [0u8; 16];
    v6_src[..2].copy_from_slice(&[0xfd, 0]);
    v6_src[15] = 1;
    let mut v6_dst = v6_src;
    v6_dst[15] = 2;
    let v6 = ipv6(v6_src, v6_dst, IPPROTO_TCP, &tcp(CLIENT_PORT, WEB_PORT, TCP_SYN));
    let mut truncated = syn.clone();
    truncated.truncate(truncated.len() - 4);
    let mut tiny = tcp4(STRANGER, SERVER, CLIENT_PORT, 22, TCP_SYN);
    tiny[20] = 0x20; // More fragments.
    tiny[16..18].copy_from_slice(&28u16.to_be_bytes());

    let mut t = web_handshake();
    t.extend([
        case("conntrack hit (ACK, established)", XDP, ack.clone(), PASS).repeat(REPEAT).into(),
        case("allowed SYN again (policy; ct entry exists)", XDP, syn, PASS).repeat(REPEAT).into(),
        // One report, the rest suppressed.
        case("dropped SYN, no rule (9999)", XDP, to_9999.clone(), DROP).repeat(REPEAT).then(Check::Events(1)).into(),
        case("dropped SYN, peer not allowed", XDP, stranger.clone(), DROP).repeat(REPEAT).into(),
        // The first run inserts, the rest hit.
        case("allowed SYN in 802.1Q tag", XDP, vlan_syn, PASS)
            .repeat(REPEAT)
            .then(Check::CtNew(v4_key(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT + 2)))
            .into(),
        case("dropped IPv6 SYN, peer not allowed", XDP, v6, DROP).repeat(REPEAT).into(),
        case("malformed (truncated TCP)", XDP, truncated, DROP).repeat(REPEAT).into(),
        case("ICMP echo (allow_icmp)", XDP, icmp4_echo(STRANGER, SERVER), PASS).repeat(REPEAT).into(),
        case("ARP (non-IP)", XDP, arp(), PASS).repeat(REPEAT).into(),
        // The same pipeline on the TC ingress hook.
        case("conntrack hit (ACK, established)", TCI, ack, PASS).repeat(REPEAT).into(),
        case("dropped SYN, no rule (9999)", TCI, to_9999, DROP).repeat(REPEAT).into(),
        case("dropped SYN, peer not allowed", TCI, stranger, DROP).repeat(REPEAT).into(),
        case("tiny fragment at TC ingress", TCI, tiny, DROP).into(),
        check("counters and events", |k| {
            let label = k
                .target
                .policy
                .ports
                .iter()
                .find(|(i, _)| *i == port_table_index(DIR_INGRESS, PROTO_IDX_TCP, WEB_PORT))
                .context("no PORTS entry of 9191")?
                .1
                .port_idx;
            let allowed = k.allowed(names::PORT_COUNTERS, port_counter_index(DIR_INGRESS, PROTO_IDX_TCP, label))?;
            ensure!(allowed >= u64::from(REPEAT), "web port counter too low: {allowed}");
            // `site-web` is class bit 0 of its slot (site-ldaps, in `egress`, bit 31):
            // one end of the lowest-set-bit search.
            ensure!(k.target.class("workstations") == 1, "workstations are not class bit 0");
            let web = k.target.rule("site-web");
            let n = k.allowed(names::RULE_COUNTERS, rule_counter_index(DIR_INGRESS, web))?;
            ensure!(n > 0, "rule site-web (inbound) counted no allowed packet");
            let sent = k.stat(STAT_EVENTS_SENT)?;
            ensure!(sent >= 3, "expected at least 3 events (no rule, peer, malformed), got {sent}");
            let reasons = reasons(k)?;
            for want in [REASON_NO_RULE, REASON_PEER_NOT_ALLOWED, REASON_MALFORMED] {
                ensure!(reasons.contains(&want), "no event with reason {want} (got {reasons:?})");
            }
            let details: Vec<u8> = k.events.iter().filter(|e| e.reason == REASON_MALFORMED).map(|e| e.detail).collect();
            let want = Malformed::L4Truncated;
            ensure!(
                details.contains(&(want as u8)),
                "no malformed event with detail {} (got {details:?})",
                want.as_str()
            );
            Ok(())
        }),
    ]);
    run(t)
}

/// The egress pipeline: replies of an inbound flow, an allowed outbound
/// flow and its replies at ingress, the headline alert.
#[test]
fn egress() -> anyhow::Result<()> {
    let port = CLIENT_PORT + 3;
    let key = v4_key(SERVER, LDAP_SERVER, port, LDAPS_PORT);
    let ldaps = tcp4(SERVER, LDAP_SERVER, port, LDAPS_PORT, TCP_SYN);
    let back = tcp4(LDAP_SERVER, SERVER, LDAPS_PORT, port, TCP_SYN | TCP_ACK);
    let ack = tcp4(SERVER, LDAP_SERVER, port, LDAPS_PORT, TCP_ACK);
    let first = "allowed outbound SYN, first packet (ldaps)";
    let mut t = web_handshake();
    t.extend([
        case("reply to inbound flow (ct hit)", TC, tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_ACK), PASS)
            .repeat(REPEAT)
            .into(),
        case(first, TC, ldaps, PASS).then(Check::CtNew(key)).into(),
        case(format!("{first}: reply"), XDP, back.clone(), PASS).into(),
        case(format!("{first}: the initiator's ACK"), TC, ack.clone(), PASS).then(Check::CtEstablished(key)).into(),
        case("outbound flow (ct hit)", TC, ack, PASS).repeat(REPEAT).into(),
        case("ldaps reply at ingress (ct hit)", XDP, back, PASS).repeat(REPEAT).into(),
        // The headline alert.
        case("dropped outbound SYN to workstation", TC, tcp4(SERVER, WORKSTATION, CLIENT_PORT + 4, 445, TCP_SYN), DROP)
            .repeat(REPEAT)
            .into(),
        check("counters and events", |k| {
            // `site-ldaps` allows `any`, class bit 31: the other end of the
            // lowest-set-bit search. Its replies count at ingress.
            let ldaps = k.target.rule("site-ldaps");
            for dir in [DIR_EGRESS, DIR_INGRESS] {
                let n = k.allowed(names::RULE_COUNTERS, rule_counter_index(dir, ldaps))?;
                ensure!(n > 0, "rule site-ldaps (direction {dir}) counted no allowed packet");
            }
            let sent = k.stat(STAT_EVENTS_SENT)?;
            ensure!(sent >= 1, "expected at least 1 event (outbound), got {sent}");
            let reasons = reasons(k)?;
            ensure!(
                reasons.contains(&REASON_OUTBOUND_TO_WORKSTATION),
                "no outbound_to_workstation event (got {reasons:?})"
            );
            Ok(())
        }),
    ]);
    run(t)
}

/// The paths the timed cases leave out: FIN/RST, monitor mode, a policy
/// not yet ready.
#[test]
fn close_monitor_and_not_ready() -> anyhow::Result<()> {
    let key = web_key();
    let port = CLIENT_PORT + 5;
    let monitored = v4_key(SERVER, WORKSTATION, OTHER_PORT, port);
    let stranger = tcp4(STRANGER, SERVER, CLIENT_PORT, OTHER_PORT, TCP_SYN);
    let mut t = web_handshake();
    t.extend([
        case("FIN on inbound flow", TC, tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_FIN | TCP_ACK), PASS)
            .check(move |k| {
                ensure!(k.ct_get(&key)?.0.state == CT_STATE_CLOSING, "FIN did not mark the flow closing");
                Ok(())
            })
            .into(),
        case("RST on inbound flow", XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_RST | TCP_ACK), PASS)
            .then(Check::NoCt(key))
            .into(),
        setup("reload with mode = monitor (egress enforced)", |k| k.target.apply(&crate::ingress_monitor())),
        case("SYN to 9999 in monitor mode", XDP, tcp4(WORKSTATION, SERVER, port, OTHER_PORT, TCP_SYN), PASS)
            .check(move |k| {
                ensure!(k.ct_get(&monitored)?.0.flags & CT_FLAG_MONITORED != 0, "monitored flow not flagged");
                Ok(())
            })
            .into(),
        case("reply of a monitored flow", TC, tcp4(SERVER, WORKSTATION, OTHER_PORT, port, TCP_SYN | TCP_ACK), PASS)
            .into(),
        // An applied generation always has `ready = 1`: a policy not yet
        // ready exists only in the kernel (the generation before the
        // daemon's first switch), written here.
        setup("reload enforcing; ready = 0 in the maps", |k| {
            k.target.apply(pcguard_tests::kernel::POLICY)?;
            k.update_settings(|s| s.ready = 0)
        }),
        case("SYN to 9999, policy not ready", XDP, stranger.clone(), PASS).into(),
        setup("ready = 1", |k| k.update_settings(|s| s.ready = 1)),
        case("SYN to 9999, policy ready", XDP, stranger, DROP).into(),
    ]);
    run(t)
}

/// A flood of new allowed flows (more than `CT_NEW` holds) churns `CT_NEW`
/// only: the established flow keeps its entry and its packets pass.
#[test]
fn new_flow_flood() -> anyhow::Result<()> {
    let key = web_key();
    let promoted = Rc::new(Cell::new(0));
    let mut t = web_handshake();
    let before = promoted.clone();
    t.push(setup("promoted flows before the flood", move |k| {
        before.set(k.stat(STAT_CT_PROMOTED)?);
        Ok(())
    }));
    for i in 0..4 * CT_NEW_ENTRIES {
        let syn = tcp4(WORKSTATION, SERVER, 1024 + i as u16, WEB_PORT, TCP_SYN);
        t.push(case("flood of new allowed flows", XDP, syn, PASS).into());
    }
    t.extend([
        check("CT_NEW bounded, the established flow kept", move |k| {
            let new = k.ct_new_len()?;
            ensure!(new <= CT_NEW_ENTRIES as usize, "CT_NEW holds {new} entries, more than its {CT_NEW_ENTRIES}");
            ensure!(k.ct_get(&key)?.1, "the flood evicted the established flow");
            Ok(())
        }),
        case("established flow after the flood", XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_ACK), PASS)
            .check(move |k| {
                ensure!(k.stat(STAT_CT_PROMOTED)? == promoted.get(), "a SYN promoted a flow");
                Ok(())
            })
            .into(),
    ]);
    run(t)
}

/// No adoption: a packet of a flow conntrack does not hold passes only if
/// a rule allows a flow opened in its own direction.
#[test]
fn untracked() -> anyhow::Result<()> {
    let port = CLIENT_PORT + 20;
    // Replies of no flow pcguard tracks, from the peer of an outbound rule
    // using that rule's port as source port.
    let synack = tcp4(LDAP_SERVER, SERVER, LDAPS_PORT, port, TCP_SYN | TCP_ACK);
    let to_ssh = tcp4(LDAP_SERVER, SERVER, LDAPS_PORT, 22, TCP_ACK);
    let reinserted = v4_key(SERVER, WORKSTATION, WEB_PORT, port);
    run(vec![
        case("untracked SYN+ACK from ldaps", XDP, synack.clone(), DROP).into(),
        case("untracked ACK from ldaps to 22", XDP, to_ssh.clone(), DROP)
            // An untracked reply creates no conntrack entry.
            .then(Check::NoCt(v4_key(SERVER, LDAP_SERVER, port, LDAPS_PORT)))
            .then(Check::NoCt(v4_key(SERVER, LDAP_SERVER, 22, LDAPS_PORT)))
            .into(),
        // The server's "replies" from an inbound service port.
        case(
            "untracked ACK from 9191 to a workstation's 445",
            TC,
            tcp4(SERVER, WORKSTATION, WEB_PORT, 445, TCP_ACK),
            DROP,
        )
        .into(),
        case("untracked SYN+ACK from 9191", TC, tcp4(SERVER, WORKSTATION, WEB_PORT, port, TCP_SYN | TCP_ACK), DROP)
            .into(),
        // Reported as untracked_reply.
        case("dropped untracked ACK (reverse lookup)", XDP, to_ssh, DROP).repeat(REPEAT).into(),
        // Allowed in its own direction: a lost entry is re-created.
        case("ACK to 9191 without an entry", XDP, tcp4(WORKSTATION, SERVER, port, WEB_PORT, TCP_ACK), PASS)
            .check(move |k| {
                ensure!(k.ct_get(&reinserted)?.0.flow_dir == DIR_INGRESS as u8, "re-created entry not inbound");
                Ok(())
            })
            .into(),
        case("ACK to ldaps without an entry", TC, tcp4(SERVER, LDAP_SERVER, port, LDAPS_PORT, TCP_ACK), PASS).into(),
        case("ldaps reply after the re-created entry", XDP, synack, PASS).into(),
        check("events", |k| {
            let reasons = reasons(k)?;
            ensure!(reasons.contains(&REASON_UNTRACKED_REPLY), "no untracked_reply event (got {reasons:?})");
            Ok(())
        }),
    ])
}

/// The stricter parse: what the kernel would deliver differently from a
/// naive reading of the frame is malformed and dropped.
#[test]
fn parse() -> anyhow::Result<()> {
    let port = CLIENT_PORT + 30;
    // RFC 1858: 8 bytes of a SYN's TCP header in a first fragment, the rest
    // of an "ACK" header after the datagram's end.
    let mut tiny = tcp4(STRANGER, SERVER, port, 22, TCP_SYN);
    tiny[20] = 0x20; // More fragments.
    tiny[16..18].copy_from_slice(&28u16.to_be_bytes());
    tiny[14 + 20 + 13] = TCP_ACK;
    // The TCP header beyond the IP total length (padding trick).
    let mut cut = tcp4(WORKSTATION, SERVER, port, WEB_PORT, TCP_SYN);
    cut[16..18].copy_from_slice(&30u16.to_be_bytes());
    // VLAN tags: as many as the parser walks pass, one more fails closed.
    let mut tagged = tcp4(WORKSTATION, SERVER, port + 1, WEB_PORT, TCP_SYN);
    for _ in 0..MAX_VLAN_TAGS {
        tagged = vlan(tagged, 0);
    }
    let nine = vlan(tagged.clone(), 0);
    run(vec![
        case("tiny first fragment with a fake ACK tail", XDP, tiny.clone(), DROP).into(),
        case("TCP header past the IP total length", XDP, cut, DROP).into(),
        case("allowed SYN in 8 priority tags", XDP, tagged, PASS).into(),
        case("SYN in 9 priority tags", XDP, nine, DROP).into(),
        case("dropped tiny fragment (malformed)", XDP, tiny, DROP).repeat(REPEAT).into(),
    ])
}
