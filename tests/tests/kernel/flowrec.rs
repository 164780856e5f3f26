//! Per-flow counters in the conntrack entry and the records of audited
//! flows (`[audit] allowed`): a start record when the entry is created,
//! an end record on FIN or RST with the counters, nothing for a rule that
//! is not audited, nothing per packet.

use std::{cell::RefCell, rc::Rc};

use anyhow::ensure;
use pcguard_common::{
    CT_FLAG_AUDITED, CtEntry, FLOW_END_FIN, FLOW_END_IDLE, FLOW_END_RST, FlowRecord, STAT_FLOW_RECORDS_SENT,
};
use pcguard_testkit::frame::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, tcp4};
use pcguard_tests::kernel::{self, CLIENT_PORT, LDAP_SERVER, LDAPS_PORT, SERVER, WEB_PORT, WORKSTATION, v4_key};

use crate::{K, PASS, TC, XDP, case, check, run_with, setup, web_handshake, web_key};

/// `kernel::POLICY` with the allowed flows of `site-web` (inbound 9191)
/// audited; `site-ldaps` (outbound 636) is not.
fn audited_policy() -> String {
    format!("{}allowed = [\"site-*web\"]\n", kernel::POLICY)
}

/// Drains `FLOW_RECORDS` into `seen`.
fn drain(k: &mut K, seen: &Rc<RefCell<Vec<FlowRecord>>>) -> anyhow::Result<()> {
    seen.borrow_mut().extend(k.flow_records()?);
    Ok(())
}

#[test]
fn counters_and_records_of_an_audited_flow() -> anyhow::Result<()> {
    // Data the workstation sends and the server's answers, after the
    // handshake: N and M packets.
    const N: u32 = 20;
    const M: u32 = 7;
    let syn = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN);
    let synack = tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_SYN | TCP_ACK);
    let ack = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_ACK);
    let answer = tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_ACK);
    let fin = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_FIN | TCP_ACK);
    let after_fin = tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_FIN | TCP_ACK);
    let (len_in, len_out) = (ack.len() as u64, answer.len() as u64);
    // The packets toward the server before the FIN: SYN, ACK, N data.
    let want_in = (2 + u64::from(N), syn.len() as u64 + len_in * (1 + u64::from(N)));
    let want_out = (1 + u64::from(M), synack.len() as u64 + len_out * u64::from(M));

    let seen = Rc::new(RefCell::new(Vec::new()));
    let ldaps_key = v4_key(SERVER, LDAP_SERVER, CLIENT_PORT, LDAPS_PORT);
    let mut t = web_handshake();
    let (s1, s2, s3, s4, s5) = (seen.clone(), seen.clone(), seen.clone(), seen.clone(), seen.clone());
    t.extend([
        check("one start record, sent when the entry was created", move |k| {
            drain(k, &s1)?;
            let recs = s1.borrow();
            ensure!(recs.len() == 1, "{} records after the handshake, want 1 (the start)", recs.len());
            let r = recs[0];
            ensure!(r.key == web_key() && r.end == 0, "not the web flow's start: {r:?}");
            ensure!(r.entry.packets_in == 1 && r.entry.bytes_in == syn.len() as u64, "start counts: {:?}", r.entry);
            ensure!(r.entry.flags & CT_FLAG_AUDITED != 0, "start record without the audited flag");
            Ok(())
        }),
        case("data toward the server", XDP, ack.clone(), PASS).repeat(N).into(),
        case("answers from the server", TC, answer, PASS).repeat(M).into(),
        check("the entry counts every packet each way, and no record was sent per packet", move |k| {
            let (e, established): (CtEntry, bool) = k.ct_get(&web_key())?;
            ensure!(established, "the web flow is not established");
            ensure!(
                (e.packets_in, e.bytes_in, e.packets_out, e.bytes_out)
                    == (want_in.0, want_in.1, want_out.0, want_out.1),
                "counters in {}/{} out {}/{}, want in {}/{} out {}/{}",
                e.packets_in,
                e.bytes_in,
                e.packets_out,
                e.bytes_out,
                want_in.0,
                want_in.1,
                want_out.0,
                want_out.1
            );
            ensure!(
                e.started_ns > 0 && e.started_ns <= e.last_seen_ns,
                "started {} last seen {}",
                e.started_ns,
                e.last_seen_ns
            );
            drain(k, &s2)?;
            ensure!(s2.borrow().len() == 1, "{} records, want still 1", s2.borrow().len());
            Ok(())
        }),
        case("the workstation's FIN", XDP, fin.clone(), PASS).into(),
        case("the server's FIN", TC, after_fin, PASS).into(),
        check("one end record (fin) with the counters, the FIN included", move |k| {
            drain(k, &s3)?;
            let recs = s3.borrow();
            ensure!(recs.len() == 2, "{} records, want start + end", recs.len());
            let r = recs[1];
            ensure!(r.key == web_key() && r.end == FLOW_END_FIN, "not a fin end: {r:?}");
            ensure!(
                r.entry.packets_in == want_in.0 + 1 && r.entry.bytes_in == want_in.1 + fin.len() as u64,
                "end in {}/{}",
                r.entry.packets_in,
                r.entry.bytes_in
            );
            ensure!(r.entry.packets_out == want_out.0, "end out {}", r.entry.packets_out);
            Ok(())
        }),
        // Not audited: counted, no record.
        case("outbound LDAPS SYN (not audited)", TC, tcp4(SERVER, LDAP_SERVER, CLIENT_PORT, LDAPS_PORT, TCP_SYN), PASS)
            .into(),
        case("its RST", TC, tcp4(SERVER, LDAP_SERVER, CLIENT_PORT, LDAPS_PORT, TCP_RST | TCP_ACK), PASS).into(),
        check("no record for a rule that is not audited", move |k| {
            drain(k, &s4)?;
            ensure!(s4.borrow().len() == 2, "{} records", s4.borrow().len());
            ensure!(!k.ct_has(&ldaps_key), "the RST left the LDAPS entry");
            Ok(())
        }),
        // An audited flow reset: start, then an end with reason rst.
        case("second web SYN", XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT + 1, WEB_PORT, TCP_SYN), PASS).into(),
        case("its RST", XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT + 1, WEB_PORT, TCP_RST), PASS).into(),
        // A third one found idle by the kernel's lookup: its entry aged
        // past the timeout, then a packet.
        case("third web SYN", XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT + 2, WEB_PORT, TCP_SYN), PASS).into(),
        setup("age the third flow past the TCP timeout", |k| {
            let key = v4_key(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT + 2);
            let (e, _) = k.ct_get(&key)?;
            k.ct_set(key, CtEntry { last_seen_ns: e.last_seen_ns.saturating_sub(3 * 3600 * 1_000_000_000), ..e })
        }),
        case(
            "a packet of the aged flow (expired: judged anew, allowed: a new flow)",
            XDP,
            tcp4(WORKSTATION, SERVER, CLIENT_PORT + 2, WEB_PORT, TCP_ACK),
            PASS,
        )
        .into(),
        check("rst and idle ends (the idle one with its counters: the SYN)", move |k| {
            drain(k, &s5)?;
            let recs = s5.borrow();
            let idle = recs.iter().find(|r| r.end == FLOW_END_IDLE).copied();
            ensure!(idle.is_some_and(|r| r.entry.packets_in == 1), "idle end {idle:?}");
            let kinds: Vec<(u16, u8)> = recs[2..].iter().map(|r| (r.key.remote_port, r.end)).collect();
            ensure!(
                kinds
                    == [
                        (CLIENT_PORT + 1, 0),
                        (CLIENT_PORT + 1, FLOW_END_RST),
                        (CLIENT_PORT + 2, 0),
                        (CLIENT_PORT + 2, FLOW_END_IDLE),
                        (CLIENT_PORT + 2, 0)
                    ],
                "records {kinds:?}"
            );
            ensure!(k.stat(STAT_FLOW_RECORDS_SENT)? == 7, "STAT_FLOW_RECORDS_SENT {}", k.stat(STAT_FLOW_RECORDS_SENT)?);
            Ok(())
        }),
    ]);
    run_with(&audited_policy(), t)
}
