//! DNS messages: the server's queries to a resolver and the one answer to
//! each pending query are copied to `DNS_MESSAGES` (allowed or monitored
//! flow), nothing else; answers never keep the flow alive.

use std::{cell::Cell, rc::Rc};

use anyhow::{Context as _, ensure};
use pcguard_common::{
    CLASS_ANY, CtEntry, DIR_EGRESS, DIR_INGRESS, DNS_KIND_ANSWER, DNS_KIND_QUERY, DNS_PAYLOAD_MAX, FlowKey,
    IPPROTO_UDP, STAT_DNS_ANSWERS, STAT_DNS_ANSWERS_DROPPED, STAT_DNS_QUERIES, STAT_DNS_UNSOLICITED,
};
use pcguard_testkit::{
    dns::filler,
    frame::{TCP_SYN, tcp4, udp4},
};
use pcguard_tests::kernel::{CLIENT_PORT, DNS_PORT, DnsCopy, OTHER_PORT, RESOLVER, SERVER, STRANGER, v4_key};

use crate::{Check, DROP, Hook, PASS, REPEAT, TC, TCI, XDP, case, check, policy_with, run, setup};

const SEC: u64 = 1_000_000_000;

/// Runs of a query and its answer, one test run each.
const PAIRS: u32 = 1000;

#[test]
fn dns_copies() -> anyhow::Result<()> {
    let txid = 0x4242;
    let q = filler(30, txid, false);
    let query = udp4(SERVER, RESOLVER, CLIENT_PORT, DNS_PORT, &q);
    let key = FlowKey { proto: IPPROTO_UDP, ..v4_key(SERVER, RESOLVER, CLIENT_PORT, DNS_PORT) };
    // A short answer, and one longer than DNS_PAYLOAD_MAX (EDNS's 1232).
    let answer = |msg: &[u8]| udp4(RESOLVER, SERVER, DNS_PORT, CLIENT_PORT, msg);
    let short = filler(100, txid, true);
    let long = filler(1232, txid, true);
    let copy = |kind, (resolver, server_port): ([u8; 4], u16), msg: &[u8], len| {
        Check::Dns(DnsCopy { kind, resolver, server_port, msg: msg.to_vec(), len })
    };
    let to_resolver = (RESOLVER, CLIENT_PORT);
    let query_copied = || copy(DNS_KIND_QUERY, to_resolver, &q, 30);
    let dns_query = |name: &str| case(name, TC, query.clone(), PASS).then(query_copied());
    let answer_copied = |msg: &Vec<u8>, len| copy(DNS_KIND_ANSWER, to_resolver, msg, len);
    let not_copied = |name: &str, hook, packet: Vec<u8>| case(name, hook, packet, PASS).then(Check::NoDns);

    // A first fragment: the UDP length counts bytes the datagram lacks.
    let mut first_frag = answer(&long);
    first_frag[20] = 0x20; // More fragments, offset 0.
    first_frag.truncate(14 + 20 + 8 + 600);
    first_frag[16..18].copy_from_slice(&((20 + 8 + 600) as u16).to_be_bytes());
    let mut later_frag = answer(&short);
    later_frag[20..22].copy_from_slice(&[0x00, 0x10]);
    // Ethernet padding after a 4-byte payload is not read as the rest of
    // a DNS header.
    let mut padded = answer(&short[..4]);
    padded.extend_from_slice(&short[4..20]);
    // From port 53 on a flow the resolver initiated: not an answer.
    let inbound = FlowKey { local_port: CLIENT_PORT + 1, ..key };
    let to_stranger = udp4(SERVER, STRANGER, CLIENT_PORT, DNS_PORT, &q);
    let from_stranger = udp4(STRANGER, SERVER, DNS_PORT, CLIENT_PORT, &short);
    let resolvers = Rc::new(Cell::new(0));
    let old = Rc::new(Cell::new(0));
    let (old_set, old_kept, old_refreshed) = (old.clone(), old.clone(), old);

    let mut t = vec![
        check("no DNS message before any query", |k| {
            ensure!(k.dns_messages()?.is_empty(), "DNS messages before any query");
            Ok(())
        }),
        dns_query("DNS query")
            .check(move |k| {
                let entry = k.ct_get(&key).context("DNS query not tracked")?.0;
                ensure!(entry.flow_dir == DIR_EGRESS as u8, "DNS query tracked as inbound");
                Ok(())
            })
            .into(),
        case("DNS answer", XDP, answer(&short), PASS).then(answer_copied(&short, 100)).into(),
        // One answer per query: a second one is not copied.
        not_copied("second answer to one query", XDP, answer(&short)).into(),
        // Another transaction id than the pending query's.
        dns_query("DNS query again").into(),
        not_copied("answer with another txid", XDP, answer(&filler(100, txid + 1, true))).into(),
        not_copied("answer without QR", XDP, answer(&filler(100, txid, false))).into(),
        case("DNS answer", XDP, answer(&short), PASS).then(answer_copied(&short, 100)).into(),
        // Answers do not keep the flow alive; queries do.
        setup("the DNS flow last seen 5 s ago", move |k| {
            let (entry, established) = k.ct_get(&key)?;
            ensure!(established, "a DNS flow with an answer is not established");
            old_set.set(entry.last_seen_ns - 5 * SEC);
            k.ct_set(key, CtEntry { last_seen_ns: old_set.get(), ..entry })
        }),
        not_copied("unsolicited answer", XDP, answer(&short))
            .check(move |k| {
                ensure!(k.ct_get(&key)?.0.last_seen_ns == old_kept.get(), "an answer refreshed the DNS flow");
                Ok(())
            })
            .into(),
        dns_query("DNS query")
            .check(move |k| {
                ensure!(k.ct_get(&key)?.0.last_seen_ns > old_refreshed.get(), "a query did not refresh the DNS flow");
                Ok(())
            })
            .into(),
        case("long DNS answer", XDP, answer(&long), PASS).then(answer_copied(&long, DNS_PAYLOAD_MAX)).into(),
        dns_query("DNS query").into(),
        case("DNS answer, first fragment", XDP, first_frag, PASS).then(answer_copied(&long, 600)).into(),
        not_copied("DNS answer, later fragment", XDP, later_frag).into(),
        dns_query("DNS query").into(),
        not_copied("empty DNS answer", XDP, answer(&[])).into(),
        not_copied("DNS header cut by the datagram", XDP, padded).into(),
    ];
    // `resolver_mask` follows the UDP/53 rules of a config: no config has
    // such a rule without resolvers (or the `any` class as one, below).
    let saved = resolvers.clone();
    t.extend([
        setup("resolver_mask = 0 in the maps", move |k| {
            saved.set(k.settings()?.resolver_mask);
            k.update_settings(|s| s.resolver_mask = 0)
        }),
        not_copied("DNS answer, no resolver_mask", XDP, answer(&short)).into(),
        not_copied("DNS query, no resolver_mask", TC, query.clone()).into(),
    ]);
    let saved = resolvers.clone();
    t.extend([
        setup("resolver_mask restored", move |k| k.update_settings(|s| s.resolver_mask = saved.get())),
        // The policy cannot open this flow (no inbound rule for the
        // resolver): written into conntrack.
        setup("a flow the resolver opened to the server", move |k| {
            let entry = CtEntry { flow_dir: DIR_INGRESS as u8, ..k.ct_get(&key)?.0 };
            k.ct_insert(inbound, entry, true)
        }),
        not_copied("DNS answer on an inbound flow", XDP, udp4(RESOLVER, SERVER, DNS_PORT, CLIENT_PORT + 1, &short))
            .into(),
        setup("forget the inbound flow", move |k| k.forget(&inbound)),
        // A non-resolver on a monitored flow: not copied until its class
        // is in resolver_mask (monitored flows count).
        setup("reload with egress_mode = monitor", |k| k.target.apply(&policy_with("egress_mode = \"monitor\""))),
        not_copied("DNS query to a stranger, monitor", TC, to_stranger.clone()).into(),
        setup("reload enforcing", |k| k.target.apply(pcguard_tests::kernel::POLICY)),
        not_copied("DNS answer from a non-resolver", XDP, from_stranger.clone()).into(),
        // ct hit + LPM, no copy.
        not_copied("DNS answer from a non-resolver (timed)", XDP, from_stranger.clone()).repeat(REPEAT).into(),
    ]);
    let saved = resolvers.clone();
    let from = (STRANGER, CLIENT_PORT);
    t.extend([
        setup("resolver_mask with the `any` class in the maps", move |k| {
            k.update_settings(|s| s.resolver_mask = saved.get() | CLASS_ANY)
        }),
        case("DNS query on a monitored flow", TC, to_stranger, PASS).then(copy(DNS_KIND_QUERY, from, &q, 30)).into(),
        case("DNS answer on a monitored flow", XDP, from_stranger, PASS)
            .then(copy(DNS_KIND_ANSWER, from, &short, 100))
            .into(),
    ]);
    let saved = resolvers;
    t.extend([
        setup("resolver_mask restored", move |k| k.update_settings(|s| s.resolver_mask = saved.get())),
        // ct hit + LPM + pending miss.
        case("unsolicited DNS answer (timed)", XDP, answer(&short), PASS).repeat(REPEAT).into(),
        pairs("DNS answer to a pending query (copied)", query.clone(), answer(&short)),
        pairs("long DNS answer (copy cut at 1 KiB)", query.clone(), answer(&long)),
        case("stranger SYN to 9999", XDP, tcp4(STRANGER, SERVER, CLIENT_PORT, OTHER_PORT, TCP_SYN), DROP)
            .repeat(REPEAT)
            .into(),
        // The ingress pipeline on TC copies answers too (bpf_skb_load_bytes).
        dns_query("DNS query").into(),
        case("DNS answer at TC ingress", TCI, answer(&short), PASS).then(answer_copied(&short, 100)).into(),
        setup("forget the query's flow", move |k| k.forget(&key)),
        case("DNS answer without the query's flow", XDP, answer(&short), DROP).then(Check::NoDns).into(),
        check("DNS counters", |k| {
            k.dns_messages()?;
            let (answers, queries) = (k.stat(STAT_DNS_ANSWERS)?, k.stat(STAT_DNS_QUERIES)?);
            let (dropped, unsolicited) = (k.stat(STAT_DNS_ANSWERS_DROPPED)?, k.stat(STAT_DNS_UNSOLICITED)?);
            ensure!(
                answers + queries == k.dns_copied && dropped == 0,
                "DNS stats: {queries} queries and {answers} answers copied, {dropped} dropped; {} read",
                k.dns_copied
            );
            ensure!(unsolicited > 0, "no unsolicited DNS answer counted");
            Ok(())
        }),
    ]);
    run(t)
}

/// A query to the resolver and its answer, `PAIRS` times: both pass and
/// both are copied.
fn pairs(name: &'static str, query: Vec<u8>, answer: Vec<u8>) -> pcguard_tests::kernel::Step<crate::rig::Rig> {
    check(name, move |k| {
        k.dns_messages()?;
        let mut n = 0;
        for i in 0..PAIRS {
            k.once(name, Hook::Tc, &query, PASS)?;
            k.once(name, Hook::Xdp, &answer, PASS)?;
            if i % 64 == 63 {
                n += k.dns_messages()?.len();
            }
        }
        n += k.dns_messages()?.len();
        ensure!(n == 2 * PAIRS as usize, "{name}: {n} DNS records for {PAIRS} queries and answers");
        Ok(())
    })
}
