//! Adversarial end-to-end tests: crafted frames (tests/attacks/pcgattack.py
//! builds them byte by byte and sends them with AF_PACKET; scapy decodes
//! the victim's answers and prints the frames) against pcguard in the lab,
//! judged by what reached the victim's stack. Listeners (TCP and UDP, IPv4
//! and IPv6) on ports without a rule must accept nothing and receive
//! nothing; the victim namespace's SNMP counters (`DELIVERY_COUNTERS`) must
//! not move; the victim must not answer. Allowed traffic — crafted and the
//! kernel's own — must still get through in the same run.
//!
//! Attack classes (see the script for every case): IPv4 headers, options,
//! lengths and fragments (tiny, overlapping, split TCP headers, a fake TCP
//! header after the datagram); every TCP flag combination; IPv6
//! extension-header chains of every type and length, chains split across
//! fragments (RFC 7112), lone and duplicate fragments, bad payload lengths;
//! 1 to 12 VLAN tags; other IP protocols and tunnels; ethertypes Linux does
//! not deliver to IP; "replies" from the service port of every outbound
//! rule's peers; and the same from the server out through the TC hook.
//! Root needed.

use std::{net::IpAddr, time::Duration};

use anyhow::Result;
use pcguard_tests::*;
use serde_json::{Value, json};

fn tmp() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// Failures collected over a whole test, so that one run reports every
/// case that got through (then the test fails once, listing them).
#[derive(Default)]
struct Verdicts {
    failures: Vec<String>,
}

impl Verdicts {
    /// Attack cases: nothing may reach the victim. Prints one line per case
    /// that did, with its evidence and frames.
    fn nothing_reached(&mut self, what: &str, sinks: &Sinks, attacker: &str, outcome: AttackOutcome) {
        let AttackOutcome { cases, counters: total } = outcome;
        // The attacker is the only one talking to the victim during the run:
        // everything that reached a listener is the run's doing.
        let arrivals = sinks.arrivals();
        sinks.clear();
        let attacker_ip =
            |family: u8| -> IpAddr { if family == 4 { addr(attacker).into() } else { addr6(attacker).into() } };
        let mut breaches = 0;
        for c in &cases {
            let evidence = c.evidence(&arrivals, attacker_ip(c.family));
            if !evidence.is_empty() {
                breaches += 1;
                self.failures.push(format!("{what}: REACHED {}\n    evidence: {}", c.describe(), evidence.join("; ")));
            }
        }
        let unattributed: Vec<&Arrival> = arrivals
            .iter()
            .filter(|a| !cases.iter().any(|c| c.arrivals(std::slice::from_ref(*a), a.peer.ip()).len() == 1))
            .collect();
        if !unattributed.is_empty() {
            self.failures.push(format!("{what}: arrivals no case claims: {unattributed:?}"));
        }
        if !total.is_empty() {
            self.failures.push(format!("{what}: victim delivery counters moved over the run: {total:?}"));
        }
        eprintln!("{what}: {} cases, {breaches} reached the victim, run counters {total:?}", cases.len());
    }

    /// Control cases: each must reach its listener (a TCP opening: its
    /// handshake completed and its data arrived).
    fn all_reached(&mut self, what: &str, sinks: &Sinks, attacker: &str, cases: &[CaseResult]) {
        let ip =
            |c: &CaseResult| -> IpAddr { if c.family == 4 { addr(attacker).into() } else { addr6(attacker).into() } };
        let reached = |c: &CaseResult, arrivals: &[Arrival]| {
            c.arrivals(arrivals, ip(c)).iter().any(|a| !a.data.is_empty() && a.port == c.dport)
        };
        // The listeners' threads may lag behind on a loaded machine.
        let _ = wait_until("the allowed traffic", Duration::from_secs(3), || {
            let arrivals = sinks.arrivals();
            Ok(cases.iter().all(|c| reached(c, &arrivals)))
        });
        let arrivals = sinks.arrivals();
        sinks.clear();
        for c in cases {
            if !reached(c, &arrivals) {
                self.failures.push(format!(
                    "{what}: allowed traffic did NOT get through: {} (synack {}, answers {:?}, counters {:?})",
                    c.describe(),
                    c.synack,
                    c.answers,
                    c.delta
                ));
            }
        }
        eprintln!("{what}: {} allowed cases", cases.len());
    }

    fn check(&mut self, what: &str, ok: bool, detail: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(format!("{what}: {}", detail()));
        }
    }

    fn assert_clean(self) {
        assert!(self.failures.is_empty(), "{} failures:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

fn ports(tcp_denied: &[u16], tcp_allowed: Option<u16>, udp_allowed: Option<u16>, service: &[u16]) -> Value {
    json!({
        "tcp_denied": tcp_denied,
        "tcp_spare": [7778, 7779],
        "udp_denied": 7777,
        "tcp_allowed": tcp_allowed,
        "udp_allowed": udp_allowed,
        "service": service,
    })
}

/// Listener ports on the server: 22 (admins only), 7777-7779 (no rule),
/// 9191 (web, allowed to workstations); UDP 7777 (no rule), 7000 (allowed
/// to workstations by `ALLOW_UDP_7000`).
const SERVER_TCP: [u16; 5] = [22, 7777, 7778, 7779, 9191];
const SERVER_UDP: [u16; 2] = [7777, 7000];

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

/// Ingress, from a workstation (a peer with allowed ports, so decoys naming
/// them matter) and from an unclassified host: every class of crafted frame
/// to ports without a rule reaches nothing; crafted and kernel-made
/// allowed traffic (fragmented UDP, tagged frames, IPv6 extension headers,
/// handshakes) gets through.
#[test]
fn ingress_crafted_frames_reach_no_listener_xdp() -> Result<()> {
    ingress_crafted_frames_reach_no_listener("xdp", "pa1x")
}

#[test]
fn ingress_crafted_frames_reach_no_listener_tc() -> Result<()> {
    ingress_crafted_frames_reach_no_listener("tc", "pa1t")
}

fn ingress_crafted_frames_reach_no_listener(hook: &str, prefix: &str) -> Result<()> {
    let env = TestLab::up(prefix, tmp(), &with_hook(&lab_config("enforce", ALLOW_UDP_7000), hook))?;
    let lab = &env.lab;
    // A VXLAN endpoint on the server: what is inside the tunnel would arrive
    // on vx0, which pcguard does not watch, if the outer datagram passed.
    let srv = lab.ns(SERVER);
    sh(
        "ip",
        &[
            "-n",
            &srv,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "dstport",
            "4789",
            "local",
            "10.77.0.1",
            "dev",
            SERVER_IF,
        ],
    )?;
    sh("ip", &["-n", &srv, "addr", "add", "10.78.0.1/24", "dev", "vx0"])?;
    sh("ip", &["-n", &srv, "link", "set", "vx0", "up"])?;
    let vxlan = json!({"mac": lab.mac(SERVER, "vx0")?, "v4": "10.78.0.1", "src_v4": "10.78.0.2", "vni": 42});
    let sinks = Sinks::start(lab, SERVER, &SERVER_TCP, &SERVER_UDP)?;
    let anchor = NsAnchor::start(lab, SERVER)?;
    for host in ["ws", "out"] {
        lab.drop_own_resets(host)?;
    }
    let daemon = env.start(&[])?;
    let mut v = Verdicts::default();

    let ws_attacks = AttackRun {
        attacker: "ws",
        iface: "eth0",
        victim: SERVER,
        victim_if: SERVER_IF,
        groups: &["tcp-flags", "ipv4", "protocols-v4", "protocols-v6", "layer2", "ipv6", "vlan"],
        ports: ports(&[22, 7777], Some(9191), Some(7000), &[]),
        first_id: 0,
        handshake_wait_ms: 0,
        vxlan: Some(vxlan),
    };
    v.nothing_reached("workstation attacks", &sinks, "ws", ws_attacks.run(lab, &anchor, "a")?);

    let out_attacks = AttackRun {
        attacker: "out",
        groups: &["ipv6", "vlan", "tcp-flags"],
        ports: ports(&[22, 7777], None, None, &[]),
        first_id: 10_000,
        vxlan: None,
        ..ws_attacks
    };
    v.nothing_reached("unclassified host attacks", &sinks, "out", out_attacks.run(lab, &anchor, "a")?);

    // Allowed traffic, crafted: handshakes to 9191 (plain, tagged, with
    // IPv6 extension headers, the kernel's own with IPV6_DSTOPTS and
    // IPV6_HOPOPTS), UDP to 7000 (tagged with 1 to 8 VID-0 tags, with
    // options, trailing bytes, fragmented).
    let controls = AttackRun {
        attacker: "ws",
        groups: &["controls"],
        ports: ports(&[22, 7777], Some(9191), Some(7000), &[]),
        first_id: 20_000,
        handshake_wait_ms: 1000,
        vxlan: None,
        ..ws_attacks
    };
    let cases = controls.run(lab, &anchor, "a")?.cases;
    v.all_reached("workstation allowed traffic", &sinks, "ws", &cases);

    // Allowed traffic, the kernel's own: a datagram larger than the MTU to
    // the allowed UDP port, fragmented by the sender, reassembled by the
    // server.
    for (family, to) in [("IPv4", sa(addr(SERVER), 7000)), ("IPv6", sa(addr6(SERVER), 7000))] {
        let before = anchor.snmp()?;
        let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        lab.run_in("ws", move || -> Result<()> {
            let s = std::net::UdpSocket::bind(bind)?;
            s.send_to(&[0x5a; 3000], to)?;
            Ok(())
        })??;
        let _ = wait_until("the datagram", Duration::from_secs(3), || {
            Ok(sinks.arrivals().iter().any(|a| a.port == 7000 && a.data.len() == 3000))
        });
        let delta = delivery_delta(&before, &anchor.snmp()?);
        let arrivals = sinks.arrivals();
        sinks.clear();
        v.check(
            &format!("{family} fragmented UDP to 7000"),
            arrivals.iter().any(|a| a.port == 7000 && a.data.len() == 3000),
            || format!("the 3000-byte datagram did not arrive whole: {arrivals:?}, counters {delta:?}"),
        );
        let reasm = if to.is_ipv4() { "Ip.ReasmOKs" } else { "Ip6.ReasmOKs" };
        v.check(&format!("{family} fragmented UDP to 7000"), delta.iter().any(|(k, d)| k == reasm && *d == 1), || {
            format!("{reasm} did not count one reassembly: {delta:?}")
        });
    }

    // pcguard saw the malformed frames as such (the audit log names them).
    let recs = daemon.audit()?;
    let malformed = recs.iter().filter(|r| s(r, "reason") == "malformed").count();
    v.check("audit log", malformed >= 5, || format!("only {malformed} malformed records: {recs:#?}"));
    assert!(daemon.stop()?.success());
    v.assert_clean();
    Ok(())
}

/// Class 4: "replies" from the service port of each outbound rule's peers
/// (LDAP 389, database 5432, MFD 7627/80/443), every TCP flag combination,
/// to SSH and to ports without a rule, plus the same hosts hiding an opening
/// SYN (tiny fragment with a fake ACK tail, VLAN tags, IPv6 split chain).
/// The outbound flows themselves still work.
#[test]
fn fake_replies_from_outbound_peers_reach_no_listener_xdp() -> Result<()> {
    fake_replies_from_outbound_peers_reach_no_listener("xdp", "pa2x")
}

#[test]
fn fake_replies_from_outbound_peers_reach_no_listener_tc() -> Result<()> {
    fake_replies_from_outbound_peers_reach_no_listener("tc", "pa2t")
}

fn fake_replies_from_outbound_peers_reach_no_listener(hook: &str, prefix: &str) -> Result<()> {
    let env = TestLab::up(prefix, tmp(), &with_hook(&lab_config("enforce", ""), hook))?;
    let lab = &env.lab;
    let sinks = Sinks::start(lab, SERVER, &SERVER_TCP, &SERVER_UDP)?;
    let anchor = NsAnchor::start(lab, SERVER)?;
    let daemon = env.start(&[])?;
    let mut v = Verdicts::default();
    let peers: [(&str, &[u16]); 3] = [("ldap", &[389]), ("db", &[5432]), ("mfd", &[7627, 80, 443])];
    for (i, (host, service)) in peers.iter().enumerate() {
        lab.drop_own_resets(host)?;
        let run = AttackRun {
            attacker: host,
            iface: "eth0",
            victim: SERVER,
            victim_if: SERVER_IF,
            groups: &["fake-replies"],
            ports: ports(&[22, 7777], None, None, service),
            first_id: 1000 * i as u64,
            handshake_wait_ms: 0,
            vxlan: None,
        };
        v.nothing_reached(&format!("fake replies from {host} {service:?}"), &sinks, host, run.run(lab, &anchor, "r")?);
    }

    // The flows those rules allow, opened by the server, still work.
    for (host, port) in [("ldap", 389), ("db", 5432), ("mfd", 7627), ("mfd", 443)] {
        let _srv = TcpServer::start(lab, host, sa(std::net::Ipv6Addr::UNSPECIFIED, port))?;
        for to in [sa(addr(host), port), sa(addr6(host), port)] {
            let o = tcp_request(lab, SERVER, to, "outbound", Duration::from_secs(3))?;
            v.check(&format!("server -> {host} {to}"), o == Outcome::Answered, || {
                format!("allowed outbound flow: {o:?}")
            });
        }
    }
    let recs = daemon.audit()?;
    for host in ["ldap", "db", "mfd"] {
        let n = recs
            .iter()
            .filter(|r| s(r, "reason") == "untracked_reply" && s(&r["remote"], "addr") == addr(host).to_string())
            .count();
        v.check("audit log", n >= 1, || format!("no untracked_reply record from {host}: {recs:#?}"));
    }
    assert!(daemon.stop()?.success());
    v.assert_clean();
    Ok(())
}

/// Egress: a process on the server crafts frames and sends them out of
/// pcg0 (AF_PACKET goes through pcguard's TC egress hook). "Replies" from
/// the ports workstations may reach (9191, 9192) and from 9193 and 22, every
/// flag combination, hidden SYNs (tiny fragments, VLAN tags, split IPv6
/// chains), bad headers, other protocols: no workstation listener (TCP 445
/// and 7777-7779, UDP 7777) gets anything, nor an MFD's SSH. Crafted
/// handshakes to the LDAP server (an outbound rule) still complete.
#[test]
fn egress_frames_from_the_server_reach_no_workstation_listener_xdp() -> Result<()> {
    egress_frames_from_the_server_reach_no_workstation_listener("xdp", "pa3x")
}

#[test]
fn egress_frames_from_the_server_reach_no_workstation_listener_tc() -> Result<()> {
    egress_frames_from_the_server_reach_no_workstation_listener("tc", "pa3t")
}

fn egress_frames_from_the_server_reach_no_workstation_listener(hook: &str, prefix: &str) -> Result<()> {
    let env = TestLab::up(prefix, tmp(), &with_hook(&lab_config("enforce", ""), hook))?;
    let lab = &env.lab;
    lab.drop_own_resets(SERVER)?;
    let daemon = env.start(&[])?;
    let mut v = Verdicts::default();

    let ws_sinks = Sinks::start(lab, "ws", &[445, 7777, 7778, 7779], &[7777])?;
    let ws_anchor = NsAnchor::start(lab, "ws")?;
    let to_ws = AttackRun {
        attacker: SERVER,
        iface: SERVER_IF,
        victim: "ws",
        victim_if: "eth0",
        groups: &["tcp-flags", "fake-replies", "ipv4", "protocols-v4", "protocols-v6", "layer2", "ipv6", "vlan"],
        ports: ports(&[445, 7777], None, None, &[9191, 9192, 9193, 22]),
        first_id: 0,
        handshake_wait_ms: 0,
        vxlan: None,
    };
    v.nothing_reached("server -> workstation", &ws_sinks, SERVER, to_ws.run(lab, &ws_anchor, "e")?);

    let mfd_sinks = Sinks::start(lab, "mfd", &[22, 7777, 7778, 7779], &[7777])?;
    let mfd_anchor = NsAnchor::start(lab, "mfd")?;
    let to_mfd = AttackRun {
        victim: "mfd",
        groups: &["fake-replies"],
        ports: ports(&[22, 7777], None, None, &[9193]),
        first_id: 10_000,
        vxlan: None,
        ..to_ws
    };
    v.nothing_reached("server -> MFD", &mfd_sinks, SERVER, to_mfd.run(lab, &mfd_anchor, "e")?);

    let ldap_sinks = Sinks::start(lab, "ldap", &[389], &[])?;
    let ldap_anchor = NsAnchor::start(lab, "ldap")?;
    let controls = AttackRun {
        victim: "ldap",
        groups: &["egress-controls"],
        ports: ports(&[], Some(389), None, &[]),
        first_id: 20_000,
        handshake_wait_ms: 1000,
        vxlan: None,
        ..to_ws
    };
    let cases = controls.run(lab, &ldap_anchor, "e")?.cases;
    v.all_reached("server -> LDAP allowed traffic", &ldap_sinks, SERVER, &cases);

    // pcguard reported them for what they are: malformed frames, fake
    // replies of the web flows, and the server initiating to a workstation.
    let recs = daemon.audit()?;
    let outbound =
        |reason: &str| recs.iter().filter(|r| s(r, "direction") == "outbound" && s(r, "reason") == reason).count();
    for (reason, min) in [("malformed", 5), ("untracked_reply", 2), ("outbound_to_workstation", 2)] {
        let n = outbound(reason);
        v.check("audit log", n >= min, || format!("{n} outbound {reason} records, expected at least {min}"));
    }
    assert!(daemon.stop()?.success());
    v.assert_clean();
    Ok(())
}
