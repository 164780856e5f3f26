//! Connections open before pcguard starts (docs/datapath.md, "Connections
//! open before pcguard attaches"): the daemon seeds conntrack with those
//! the policy allows, so the first packet of either end passes, and cuts
//! (and names) those it forbids. Needs root; run with `cargo xtask test`.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::Result;
use pcguard_common::{CT_STATE_OPEN, DIR_EGRESS, DIR_INGRESS, FAMILY_V4, FAMILY_V6, FlowKey, IPPROTO_TCP, IPPROTO_UDP};
use pcguard_tests::*;

fn tmp() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// An outbound UDP service on the LDAP host, for a connected UDP socket.
const DIRECTORY_UDP: &str = r#"
[[rule]]
name = "directory-udp"
description = "test: outbound UDP to the LDAP host"
direction = "outbound"
protocol = "udp"
ports = [1812]
peers = ["ldap"]
"#;

/// How long an allowed message may take.
const DELIVERY: Duration = Duration::from_secs(3);

/// A connection's conntrack key as the programs form it: local = the
/// server's end (`server_end` is the server's socket).
fn key(proto: u8, server_end: SocketAddr, peer: SocketAddr) -> FlowKey {
    let bytes = |a: SocketAddr| match a.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, b)
        }
        std::net::IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    };
    let (family, local_addr) = bytes(server_end);
    FlowKey {
        family,
        proto,
        _pad: 0,
        local_port: server_end.port(),
        remote_port: peer.port(),
        local_addr,
        remote_addr: bytes(peer).1,
    }
}

fn tcp_key(server_end: &TcpStream) -> Result<FlowKey> {
    Ok(key(IPPROTO_TCP, server_end.local_addr()?, server_end.peer_addr()?))
}

/// CLOCK_MONOTONIC_COARSE, the programs' conntrack clock.
fn ktime_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn connections_open_before_start_keep_working_and_forbidden_ones_are_cut() -> Result<()> {
    let env = TestLab::up("px1", tmp(), &lab_config("enforce", DIRECTORY_UDP))?;
    let lab = &env.lab;
    // Listeners stay open while the daemon starts: an accepted connection
    // is told from an opened one by its listener.
    let ldap_listener = tcp_listen(lab, "ldap", 389)?;
    let web_listener = tcp_listen(lab, SERVER, 9191)?;
    let legacy_listener = tcp_listen(lab, SERVER, 9999)?;

    // (a) server -> LDAP:389, IPv4 and IPv6: (server's end, LDAP's end).
    let mut ldap4 = tcp_connection(lab, SERVER, &ldap_listener, sa(addr("ldap"), 389))?;
    let mut ldap6 = tcp_connection(lab, SERVER, &ldap_listener, sa(addr6("ldap"), 389))?;
    // (b) workstation -> server:9191, IPv4 (a dual-stack listener: the
    // server's socket has IPv4-mapped addresses) and IPv6:
    // (workstation's end, server's end).
    let mut web4 = tcp_connection(lab, "ws", &web_listener, sa(addr(SERVER), 9191))?;
    let mut web6 = tcp_connection(lab, "ws", &web_listener, sa(addr6(SERVER), 9191))?;
    // (c) workstation -> server:9999: no rule.
    let mut legacy = tcp_connection(lab, "ws", &legacy_listener, sa(addr(SERVER), 9999))?;
    // (d) a connected UDP socket of the server to LDAP:1812.
    let ldap_udp = lab.run_in("ldap", || UdpSocket::bind(sa(std::net::Ipv6Addr::UNSPECIFIED, 1812)))??;
    let to = sa(addr("ldap"), 1812);
    let server_udp = lab.run_in(SERVER, move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(to)?;
        Ok(s)
    })??;

    let daemon = env.start(&[])?;
    let log = daemon.log_text();

    // Conntrack holds exactly the allowed connections, each as the
    // programs would have tracked its opening packet.
    let ids = daemon.rule_ids()?;
    let now = ktime_coarse_ns();
    let mut seeded = BTreeMap::new();
    for (k, e) in daemon.conntrack()? {
        assert_eq!((e.state, e.flags), (CT_STATE_OPEN, 0), "{k:?}");
        let age = now.saturating_sub(e.last_seen_ns);
        assert!(age < 30_000_000_000, "seeded {age} ns ago: not on the programs' clock ({k:?})");
        seeded.insert(format!("{k:?}"), (e.flow_dir as u32, ids[usize::from(e.rule)].clone()));
    }
    let udp_key = key(IPPROTO_UDP, server_udp.local_addr()?, server_udp.peer_addr()?);
    let want: BTreeMap<String, (u32, String)> = [
        (tcp_key(&ldap4.0)?, DIR_EGRESS, "ldap"),
        (tcp_key(&ldap6.0)?, DIR_EGRESS, "ldap"),
        (tcp_key(&web4.1)?, DIR_INGRESS, "web-http"),
        (tcp_key(&web6.1)?, DIR_INGRESS, "web-http"),
        (udp_key, DIR_EGRESS, "directory-udp"),
    ]
    .into_iter()
    .map(|(k, dir, rule)| (format!("{k:?}"), (dir, rule.to_string())))
    .collect();
    assert_eq!(seeded, want, "daemon log:\n{log}");
    assert!(log.contains("existing connections: 5 seeded into conntrack, 0 already tracked, 1 not allowed"), "{log}");

    // (a) The LDAP side sends first (nothing from the server since the
    // programs attached) and the server gets it; then the server answers.
    for (i, (server_end, ldap_end)) in [&mut ldap4, &mut ldap6].into_iter().enumerate() {
        assert!(
            tcp_delivers(ldap_end, server_end, b"ldap speaks first", DELIVERY)?,
            "LDAP -> server, connection {i}\n{log}"
        );
        assert!(tcp_delivers(server_end, ldap_end, b"server answers", DELIVERY)?, "server -> LDAP, connection {i}");
    }
    // (b) The server pushes on the idle web connections.
    for (i, (ws_end, server_end)) in [&mut web4, &mut web6].into_iter().enumerate() {
        assert!(
            tcp_delivers(server_end, ws_end, b"server push", DELIVERY)?,
            "server -> workstation, connection {i}\n{log}"
        );
        assert!(tcp_delivers(ws_end, server_end, b"thanks", DELIVERY)?, "workstation -> server, connection {i}");
    }
    // (d) The LDAP host's datagram reaches the server's connected socket.
    ldap_udp.send_to(b"udp from ldap", server_udp.local_addr()?)?;
    server_udp.set_read_timeout(Some(DELIVERY))?;
    let mut buf = [0u8; 64];
    let n = server_udp.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"udp from ldap");

    // (c) Neither direction of the forbidden connection gets through, and
    // the daemon named it when it started.
    let (ws_end, server_end) = &mut legacy;
    assert!(!tcp_delivers(ws_end, server_end, b"to 9999", BLOCKED_TIMEOUT)?, "workstation -> server:9999 passed");
    assert!(!tcp_delivers(server_end, ws_end, b"from 9999", BLOCKED_TIMEOUT)?, "server:9999 -> workstation passed");
    let cut = format!(
        "existing connection inbound tcp {} -> {} is not allowed by the policy: it will be cut",
        ws_end.local_addr()?,
        sa(addr(SERVER), 9999)
    );
    assert!(log.contains(&cut), "the log must name {cut:?}:\n{log}");
    assert!(daemon.stop()?.success());
    Ok(())
}
