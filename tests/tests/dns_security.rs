//! DNS-aware egress under attack, in the lab: an attacker on the LAN
//! (the workstation's namespace, with a packet socket) spoofs the
//! resolver's answers; the resolver itself (the LDAP host, as an AD domain
//! controller would be) answers with addresses no answer may open; a flood
//! of spoofed answers. They need root; run them with `cargo xtask test`.
//!
//! The lab's "cloud" is the unclassified host `out`: 10.77.0.99 answers
//! for `mf.cloud.papercut.com` (GES), and 10.77.0.200, an extra address
//! of the same host, is what the spoofed answers name. Both serve HTTPS
//! (443), so a learned address is one the server can connect to.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use pcguard_tests::*;
use serde_json::Value;

fn tmp() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
}

const GES: &str = "mf.cloud.papercut.com";
const TYPE_A: u16 = 1;
/// What the resolver really answers for GES.
const CLOUD: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
/// What spoofed answers name instead.
const SPOOFED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);

/// The lab policy with the LDAP host as the resolver, a `cloud` class
/// (CIDRs that are not the lab's: learning is still what opens 10.77.0.x)
/// and GES enabled.
fn config(extra: &str) -> String {
    lab_config("enforce", extra)
        .replace("[peers]\n", "[peers]\ndns = [\"10.77.0.5\", \"fd77::5\"]\ncloud = [\"192.0.2.0/24\"]\n")
        .replace("[features]\n", "[features]\nges = true\n")
}

fn resolver() -> IpAddr {
    IpAddr::V4(addr("ldap"))
}

fn m(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

/// Waits until `name{labels}` reaches `want` (metrics are read at scrape
/// time: exact, no sampling).
fn wait_metric(d: &Daemon, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    let mut last = 0.0;
    let r = wait_until(&format!("{name}{labels:?} = {want}"), Duration::from_secs(10), || {
        last = m(&d.scrape()?, name, labels);
        Ok(last == want)
    });
    r.map_err(|e| e.context(format!("last value {last}; daemon log:\n{}", d.log_text())))
}

fn learned(d: &Daemon) -> Result<f64> {
    Ok(m(&d.scrape()?, "pcguard_dns_learned_addresses", &[]))
}

/// From the server, an HTTPS-port request to `ip`: true when answered.
fn https(lab: &Lab, ip: impl Into<IpAddr>) -> Result<bool> {
    Ok(tcp_request(lab, SERVER, sa(ip, 443), "GET /", BLOCKED_TIMEOUT)? == Outcome::Answered)
}

/// `msg` with a second question for `name` after the first (for `GES`).
fn with_extra_question(mut msg: Vec<u8>, name: &str) -> Vec<u8> {
    let first_end = 12 + (GES.len() + 2) + 4;
    msg[5] = 2;
    msg.splice(first_end..first_end, dns_query(0, name, TYPE_A)[12..].to_vec());
    msg
}

/// The lab with the cloud host's two addresses serving 443, the resolver
/// answering `records`, and pcguard running with `extra` arguments.
struct Setup {
    env: TestLab,
    dns: DnsServer,
    daemon: Daemon,
    /// Ports of the DNS clients made so far.
    ports: std::cell::RefCell<Vec<u16>>,
    _https: TcpServer,
}

impl Setup {
    /// A DNS client of the server (its port remembered).
    fn client(&self) -> Result<DnsClient> {
        let c = DnsClient::new(&self.env.lab, resolver())?;
        self.ports.borrow_mut().push(c.port());
        Ok(c)
    }
}

fn setup(name: &str, records: DnsRecords, extra: &[&str]) -> Result<Setup> {
    let env = TestLab::up(name, tmp(), &config(""))?;
    env.lab.add_address("out", SPOOFED.into())?;
    let https = TcpServer::start(&env.lab, "out", sa(Ipv6Addr::UNSPECIFIED, 443))?;
    let dns = DnsServer::start(&env.lab, "ldap", records)?;
    let daemon = env.start(extra)?;
    Ok(Setup { env, dns, daemon, ports: Default::default(), _https: https })
}

/// A query of the server to the resolver that stays unanswered (the
/// resolver is silent while it is sent): pending in the kernel and the
/// daemon, waiting for an answer to `(client port, id, question)`.
fn pending_query(st: &Setup, id: u16, name: &str) -> Result<DnsClient> {
    st.dns.set_silent(true);
    let c = st.client()?;
    c.query(id, name, TYPE_A)?;
    ensure!(c.receive(Duration::from_millis(200)).is_none(), "the silent resolver answered");
    Ok(c)
}

/// Every spoofing attempt short of guessing port, transaction id and
/// question is ignored: the kernel does not copy answers to no pending
/// query, the daemon refuses answers that do not repeat their query's
/// question exactly or are truncated, and nothing reaches the spoofed
/// address. An attacker who does guess all three can still make the
/// server learn an address for the queried name (the residual risk) —
/// never a workstation's.
#[test]
fn spoofed_answers_teach_nothing_unless_they_match_a_query_exactly() -> Result<()> {
    let st = setup("pd1", vec![(GES.into(), CLOUD.into(), 300)], &[])?;
    let (lab, d) = (&st.env.lab, &st.daemon);
    let attacker = RawSender::new(lab, "ws")?;
    let from_resolver = sa(resolver(), 53);
    let to_server = |port| sa(addr(SERVER), port);
    let spoof = |port: u16, msg: &[u8]| attacker.send(&udp_packet(from_resolver, to_server(port), msg));
    let spoofed = |id| dns_response(id, GES, TYPE_A, &[(SPOOFED.into(), 300)]);
    let count = |name: &str, labels: &[(&str, &str)]| -> Result<f64> { Ok(m(&d.scrape()?, name, labels)) };
    let unsolicited = "pcguard_dns_unsolicited_answers_total";
    let refused = "pcguard_dns_answers_refused_total";
    assert!(!https(lab, SPOOFED)?, "blocked before any answer");

    // A wrong transaction id: the kernel's pending entry does not match.
    let c = pending_query(&st, 0x1001, GES)?;
    let before = count(unsolicited, &[])?;
    spoof(c.port(), &spoofed(0x1002))?;
    wait_metric(d, unsolicited, &[], before + 1.0)?;
    // The spoof is a packet the server's socket takes (checksums right).
    assert_eq!(c.receive(Duration::from_secs(2)), Some(spoofed(0x1002)), "the spoof reached the client socket");

    // Right port and id, wrong question / an extra question / TC set: the
    // kernel copies it (and consumes the query), the daemon refuses it.
    let cases: [(&str, u16, Vec<u8>); 3] = [
        ("question_mismatch", 0x2001, dns_response(0x2001, "mg.cloud.papercut.com", TYPE_A, &[(SPOOFED.into(), 300)])),
        ("question_count", 0x3001, with_extra_question(spoofed(0x3001), "evil.example.com")),
        ("truncated", 0x4001, {
            let mut m = spoofed(0x4001);
            m[2] |= 0x02;
            m
        }),
    ];
    for (reason, id, msg) in cases {
        let c = pending_query(&st, id, GES)?;
        let before = count(refused, &[("reason", reason)])?;
        spoof(c.port(), &msg)?;
        wait_metric(d, refused, &[("reason", reason)], before + 1.0)?;
    }

    // An answer after the genuine one: the query is no longer pending.
    st.dns.set_silent(false);
    let c = st.client()?;
    c.query(0x5001, GES, TYPE_A)?;
    assert!(c.receive(Duration::from_secs(3)).is_some(), "the genuine answer");
    wait_metric(d, "pcguard_dns_learned_addresses", &[], 1.0)?;
    let before = count(unsolicited, &[])?;
    spoof(c.port(), &spoofed(0x5001))?;
    // And from the resolver's address to that DNS flow with a fresh id.
    spoof(c.port(), &spoofed(0x5002))?;
    wait_metric(d, unsolicited, &[], before + 2.0)?;

    // A guessed port (no DNS flow there): dropped like any unexpected UDP.
    let c = pending_query(&st, 0x6001, GES)?;
    // A port none of this test's clients holds (they stay open to the end).
    let taken = st.ports.borrow().clone();
    let guess = (c.port()..=u16::MAX).chain(1024..c.port()).find(|p| !taken.contains(p)).expect("a free port");
    spoof(guess, &spoofed(0x6001))?;
    d.wait_audit("the guessed port dropped", |r| {
        r.iter().any(|x| x["local"]["port"] == guess && x["remote"]["port"] == 53 && s(x, "reason") == "no_rule")
    })?;
    // The right port, id and question, from the attacker's own address:
    // not a resolver, not the DNS flow.
    let own = udp_packet(sa(addr("ws"), 53), to_server(c.port()), &spoofed(0x6001));
    attacker.send(&own)?;
    d.wait_audit("the attacker's own answer dropped", |r| {
        r.iter().any(|x| x["local"]["port"] == c.port() && x["remote"]["addr"] == addr("ws").to_string())
    })?;

    std::thread::sleep(Duration::from_millis(300));
    let text = d.scrape()?;
    assert_eq!(m(&text, "pcguard_dns_learned_addresses", &[]), 1.0, "only the genuine answer taught: {text}");
    assert_eq!(m(&text, "pcguard_dns_answers_accepted_total", &[]), 1.0, "{text}");
    let status: Value = serde_json::from_str(&d.cli(&["status", "--format", "json"])?)?;
    assert_eq!(status["counters"]["dns_learned_addresses"], 1, "{status}");
    assert!(!https(lab, SPOOFED)?, "no spoofed answer opened {SPOOFED}");
    assert!(https(lab, CLOUD)?, "the genuine answer opened {CLOUD}");

    // Port, id and question all right (the query of 0x6001 is still
    // pending): the residual risk. Naming a workstation it is refused and
    // audited...
    let ws = IpAddr::V4(addr("ws"));
    spoof(c.port(), &dns_response(0x6001, GES, TYPE_A, &[(ws, 300)]))?;
    let recs = d.wait_audit("the poisoning alert", |r| r.iter().any(|x| s(x, "reason") == "dns_poisoning"))?;
    let alert = recs.iter().find(|x| s(x, "reason") == "dns_poisoning").expect("found above");
    assert_eq!(
        (s(alert, "severity"), s(alert, "dns_name"), s(alert, "dns_refusal")),
        ("alert".into(), GES.into(), "local_class".into())
    );
    assert_eq!(alert["dns_address"], ws.to_string());
    // ...naming an unclassified address, it is learned: only for the
    // classes of the name that was asked.
    let c = pending_query(&st, 0x7001, GES)?;
    spoof(c.port(), &spoofed(0x7001))?;
    wait_metric(d, "pcguard_dns_learned_addresses", &[], 2.0)?;
    assert!(https(lab, SPOOFED)?, "a spoof that guesses everything is learned (residual risk)");
    assert!(st.daemon.stop()?.success());
    Ok(())
}

/// The resolver itself answers names of the policy with a workstation,
/// the server's own addresses, itself, loopback, 0.0.0.0, a multicast
/// group and :: — each refused and reported as an alert, at most once per
/// (resolver, name, refusal) per report interval (then with the number
/// held back); only the real cloud addresses are learned.
#[test]
fn answers_naming_forbidden_addresses_are_refused_and_audited() -> Result<()> {
    let resolver6 = IpAddr::V6(addr6("ldap"));
    // (name, address, refusal): one name per special address, so that
    // each is its own alert.
    let forbidden: [(&str, IpAddr, &str); 10] = [
        (GES, addr("ws").into(), "local_class"),
        (GES, addr(SERVER).into(), "own_address"),
        (GES, resolver(), "resolver"),
        (GES, Ipv6Addr::UNSPECIFIED.into(), "special"),
        (GES, addr6("ws").into(), "local_class"),
        (GES, addr6(SERVER).into(), "own_address"),
        ("lo.papercut.com", Ipv4Addr::LOCALHOST.into(), "special"),
        ("lo.papercut.com", "::ffff:127.0.0.1".parse::<Ipv6Addr>()?.into(), "special"),
        ("zero.papercut.com", Ipv4Addr::UNSPECIFIED.into(), "special"),
        ("mcast.papercut.com", Ipv4Addr::new(224, 0, 0, 1).into(), "special"),
    ];
    let mut records: DnsRecords = forbidden.iter().map(|(n, a, _)| (n.to_string(), *a, 300)).collect();
    records.push((GES.into(), CLOUD.into(), 300));
    records.push((GES.into(), addr6("out").into(), 300));
    let env = TestLab::up(
        "pd2",
        tmp(),
        &config("")
            .replace("ges = true\n", "ges = true\ncloud_services = true\n")
            .replace("report_interval = \"60s\"", "report_interval = \"4s\""),
    )?;
    env.lab.add_address("out", SPOOFED.into())?;
    let _https = TcpServer::start(&env.lab, "out", sa(Ipv6Addr::UNSPECIFIED, 443))?;
    let _ws_https = TcpServer::start(&env.lab, "ws", sa(Ipv6Addr::UNSPECIFIED, 443))?;
    let _dns = DnsServer::start(&env.lab, "ldap", records)?;
    let d = env.start(&[])?;
    let lab = &env.lab;

    assert_eq!(resolve(lab, SERVER, resolver(), GES, false)?.len(), 4);
    assert_eq!(resolve(lab, SERVER, resolver6, GES, true)?.len(), 4);
    for (name, v6) in [
        ("lo.papercut.com", false),
        ("lo.papercut.com", true),
        ("zero.papercut.com", false),
        ("mcast.papercut.com", false),
    ] {
        assert_eq!(resolve(lab, SERVER, if v6 { resolver6 } else { resolver() }, name, v6)?.len(), 1, "{name}");
    }
    // The same answer again within the report interval: counted, not
    // written (answers are handled in order: the first one's alert is
    // written by then).
    assert_eq!(resolve(lab, SERVER, resolver(), "lo.papercut.com", false)?.len(), 1);
    wait_metric(&d, "pcguard_dns_addresses_refused_total", &[("reason", "special")], 6.0)?;
    // Both handled by now: the first one's alert is older than this.
    let interval_ends = Instant::now() + Duration::from_secs(4);
    wait_metric(&d, "pcguard_dns_learned_addresses", &[], 2.0)?;
    let poisoning = |r: &[Value]| r.iter().filter(|x| s(x, "reason") == "dns_poisoning").cloned().collect::<Vec<_>>();
    d.wait_audit("an alert per forbidden address", |r| poisoning(r).len() >= forbidden.len())?;
    std::thread::sleep(Duration::from_millis(300));
    let alerts = poisoning(&d.audit()?);
    assert_eq!(alerts.len(), forbidden.len(), "one each, the repeated one held back: {alerts:#?}");
    for (name, a, why) in forbidden {
        let rec =
            alerts.iter().find(|x| x["dns_address"] == a.to_string()).unwrap_or_else(|| panic!("no alert for {a}"));
        assert_eq!((s(rec, "dns_name"), s(rec, "dns_refusal")), (name.to_string(), why.to_string()), "{rec}");
        assert_eq!(
            (s(rec, "severity"), s(rec, "direction"), s(rec, "verdict")),
            ("alert".into(), "inbound".into(), "not_learned".into())
        );
        let from = if a.is_ipv4() { resolver() } else { resolver6 };
        assert_eq!(
            (rec["remote"]["addr"].clone(), rec["remote"]["port"].clone()),
            (Value::from(from.to_string()), Value::from(53)),
            "{rec}"
        );
        assert_eq!(rec["suppressed"], 0, "{rec}");
    }
    let before = alerts.len();

    assert!(!https(lab, addr("ws"))?, "the workstation stays closed to the server");
    assert!(!https(lab, addr6("ws"))?, "over IPv6 too");
    assert!(https(lab, CLOUD)?, "the real cloud address was learned");
    assert!(https(lab, addr6("out"))?, "over IPv6 too");
    let text = d.scrape()?;
    assert_eq!(
        m(&text, "pcguard_unexpected_flows_total", &[("reason", "dns_poisoning")]),
        forbidden.len() as f64,
        "{text}"
    );
    assert_eq!(m(&text, "pcguard_dns_addresses_refused_total", &[("reason", "local_class")]), 2.0, "{text}");

    // After the interval, written again with the number held back.
    std::thread::sleep(interval_ends.saturating_duration_since(Instant::now()));
    assert_eq!(resolve(lab, SERVER, resolver(), "lo.papercut.com", false)?.len(), 1);
    let recs = d.wait_audit("the next alert", |r| poisoning(r).len() > before)?;
    let last = poisoning(&recs).pop().expect("one more");
    assert_eq!(
        (last["dns_address"].clone(), last["suppressed"].clone()),
        (Value::from("127.0.0.1"), Value::from(1)),
        "{last}"
    );

    // `pcguard flows` filters them like any record.
    let out = std::process::Command::new(pcguard_bin()?)
        .args(["flows", "--no-follow", "--json", "--reason", "dns_poisoning", "--addr", "224.0.0.1", "--log"])
        .arg(&d.audit_log)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    lines.iter().try_for_each(validate_record)?;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["dns_name"], "mcast.papercut.com");
    assert!(d.log_text().contains("ALERT"), "{}", d.log_text());
    assert!(d.stop()?.success());
    Ok(())
}

/// A small deterministic generator for the flood (xorshift).
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 100,000 spoofed answers, half to the port of a pending query with
/// wrong transaction ids, half to random ports, as fast as one thread
/// sends them. The kernel drops them all without waking the daemon;
/// meanwhile genuine answers are learned, a short TTL expires on time and
/// reloads succeed.
#[test]
fn a_spoofed_flood_leaves_learning_expiry_and_reloads_working() -> Result<()> {
    const FLOOD: usize = 100_000;
    const MIN_TTL: Duration = Duration::from_secs(2);
    const TICK: Duration = Duration::from_secs(5);
    let st = setup("pd3", vec![(GES.into(), CLOUD.into(), 1)], &["--dns-min-ttl", "2s"])?;
    let (lab, d) = (&st.env.lab, &st.daemon);
    let pending = pending_query(&st, 0x4242, GES)?;
    st.dns.set_silent(false);
    let before = d.scrape()?;

    let attacker = RawSender::new(lab, "ws")?;
    let target = pending.port();
    let from_resolver = sa(resolver(), 53);
    let flood = std::thread::spawn(move || -> Result<(usize, Duration)> {
        let mut rng = Xorshift(0x5eed_f100d);
        let start = Instant::now();
        for i in 0..FLOOD {
            let r = rng.next();
            let mut id = r as u16;
            if id == 0x4242 {
                id ^= 1; // a lucky guess is the residual risk, not this test
            }
            let port = if i % 2 == 0 { target } else { 1024 + ((r >> 16) as u16 % 64000).max(1) };
            let port = if i % 2 == 1 && port == target { port ^ 1 } else { port };
            let msg = dns_response(id, GES, TYPE_A, &[(SPOOFED.into(), 300)]);
            attacker.send(&udp_packet(from_resolver, sa(addr(SERVER), port), &msg))?;
        }
        Ok((FLOOD, start.elapsed()))
    });

    // Genuine learning while the flood runs (a lost answer is retried, as
    // a stub resolver would).
    let mut answered = false;
    for _ in 0..5 {
        if resolve(lab, SERVER, resolver(), GES, false).is_ok() {
            answered = true;
            break;
        }
    }
    assert!(answered, "no genuine answer during the flood");
    let learned_at = Instant::now();
    wait_metric(d, "pcguard_dns_learned_addresses", &[], 1.0)?;
    let (sent, took) = flood.join().map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    eprintln!("flood: {sent} spoofed answers in {took:?}");

    let text = d.scrape()?;
    let delta = |name: &str| m(&text, name, &[]) - m(&before, name, &[]);
    let unsolicited = delta("pcguard_dns_unsolicited_answers_total");
    assert!(unsolicited >= (FLOOD / 4) as f64, "the flood reached the kernel: {unsolicited} unsolicited\n{text}");
    assert_eq!(delta("pcguard_dns_answers_refused_total"), 0.0, "nothing of the flood reached the daemon: {text}");
    assert!(!https(lab, SPOOFED)?, "the flood opened nothing");

    // Expiry: the genuine answer's TTL (1 s, stretched to the minimum)
    // runs out and the next tick forgets it.
    wait_until("the learned address to expire", MIN_TTL + TICK + Duration::from_secs(5), || Ok(learned(d)? == 0.0))?;
    let gone = learned_at.elapsed();
    assert!(gone <= MIN_TTL + TICK + Duration::from_secs(2), "forgotten after {gone:?}");
    // (`learned_at` is taken when the client got the answer, a moment
    // after the daemon may have learned it.)
    assert!(gone + Duration::from_millis(500) >= MIN_TTL, "forgotten too early, after {gone:?}");
    assert!(!https(lab, CLOUD)?, "closed again once expired");

    // Reloads: a changed policy applies, learning goes on under it, and a
    // policy without GES forgets what was learned for it at the switch.
    st.env.write_config(&config(ALLOW_9999))?;
    d.signal(libc::SIGHUP)?;
    wait_metric(d, "pcguard_reloads_total", &[("result", "success")], 1.0)?;
    assert_eq!(resolve(lab, SERVER, resolver(), GES, false)?, vec![IpAddr::V4(CLOUD)]);
    wait_metric(d, "pcguard_dns_learned_addresses", &[], 1.0)?;
    assert!(https(lab, CLOUD)?, "learned after the reload");
    st.env.write_config(&config("").replace("ges = true\n", ""))?;
    d.signal(libc::SIGHUP)?;
    wait_metric(d, "pcguard_reloads_total", &[("result", "success")], 2.0)?;
    wait_metric(d, "pcguard_dns_learned_addresses", &[], 0.0)?;
    let status: Value = serde_json::from_str(&d.cli(&["status", "--format", "json"])?)?;
    assert_eq!(status["counters"]["dns_learned_entries"], 0, "the old generation's entries were removed: {status}");
    assert!(!https(lab, CLOUD)?, "no GES rule, nothing learned");
    assert!(d.log_text().contains("reload applied"), "{}", d.log_text());
    assert!(st.daemon.stop()?.success());
    Ok(())
}
