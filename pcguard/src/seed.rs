//! Conntrack entries for the connections that were open before pcguard
//! attached (docs/datapath.md, "Connections open before pcguard
//! attaches"). The programs pass a packet of a flow conntrack does not
//! hold only if a rule allows a flow opened in the packet's own direction,
//! so without an entry the first packet the *other* end sends on an idle
//! connection (the LDAP server's answer, a push to a browser) is dropped.
//!
//! [`plan`] judges each connection as the kernel would judge its opening
//! packet ([`CompiledPolicy::decide`]); `Datapath::seed_conntrack` writes
//! the entries of those the policy allows.

use std::net::{IpAddr, SocketAddr};

use pcguard_common::{CT_STATE_OPEN, CtEntry, FAMILY_V4, FAMILY_V6, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    model::Protocol,
    policy::{Allowed, CompiledPolicy},
    sockdiag::Connection,
};

/// An existing connection the policy allows, and what allowed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed {
    pub conn: Connection,
    pub allowed: Allowed,
}

impl Seed {
    /// The connection's key as the programs form it (`pcguard-ebpf`
    /// `conntrack::flow_key`): local = this host.
    pub fn flow_key(&self) -> FlowKey {
        flow_key(&self.conn)
    }

    /// The entry the programs would have created for the connection's
    /// opening packet, last seen at `now_ns` (`CLOCK_MONOTONIC`).
    pub fn entry(&self, now_ns: u64) -> CtEntry {
        CtEntry {
            last_seen_ns: now_ns,
            rule: self.allowed.rule,
            port_idx: self.allowed.port_idx,
            flow_dir: self.conn.direction.dir_index() as u8,
            state: CT_STATE_OPEN,
            flags: 0,
            _pad: 0,
            // Seeded: started before pcguard saw it, counted from now on,
            // never audited (its start was not seen).
            started_ns: now_ns,
            packets_in: 0,
            bytes_in: 0,
            packets_out: 0,
            bytes_out: 0,
        }
    }
}

/// Existing connections sorted by the policy.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Allowed in the direction they were opened in: to be seeded.
    pub seeds: Vec<Seed>,
    /// Not allowed: not seeded, so the programs treat their packets like
    /// any untracked packet (dropped in enforce mode).
    pub not_allowed: Vec<Connection>,
}

/// Judges each connection as the kernel judges a new flow: initiated in
/// its own direction, to its service port, with the remote end's classes.
pub fn plan(policy: &CompiledPolicy, conns: &[Connection]) -> Plan {
    let mut plan = Plan::default();
    for c in conns {
        match policy.decide(c.direction, c.protocol, c.service_port(), c.remote.ip()) {
            Some(allowed) => plan.seeds.push(Seed { conn: *c, allowed }),
            None => plan.not_allowed.push(*c),
        }
    }
    plan
}

/// The programs' flow key of a connection: IPv4 (mapped addresses too) in
/// the first 4 address bytes, ports in host order.
pub fn flow_key(c: &Connection) -> FlowKey {
    let (family, local_addr) = addr_bytes(c.local);
    let (_, remote_addr) = addr_bytes(c.remote);
    FlowKey {
        family,
        proto: match c.protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        },
        _pad: 0,
        local_port: c.local.port(),
        remote_port: c.remote.port(),
        local_addr,
        remote_addr,
    }
}

fn addr_bytes(a: SocketAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match a.ip().to_canonical() {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, bytes)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use pcguard_common::{DIR_EGRESS, DIR_INGRESS};

    use super::*;
    use crate::{config, model::Direction};

    const LAB: &str = include_str!("../../examples/lab.toml");

    fn lab() -> CompiledPolicy {
        crate::policy::compile(&config::parse(LAB, "lab.toml").unwrap()).unwrap()
    }

    fn conn(protocol: Protocol, direction: Direction, local: &str, remote: &str) -> Connection {
        Connection { protocol, direction, local: local.parse().unwrap(), remote: remote.parse().unwrap() }
    }

    #[test]
    fn connections_the_policy_allows_are_seeded_the_rest_reported() {
        let p = lab();
        let (tcp, inb, out) = (Protocol::Tcp, Direction::Inbound, Direction::Outbound);
        let ldap = conn(tcp, out, "10.77.0.1:40000", "10.77.0.5:389");
        let web = conn(tcp, inb, "[fd77::1]:9191", "[fd77::2]:50000");
        let legacy = conn(tcp, inb, "10.77.0.1:9999", "10.77.0.2:50001");
        let outsider = conn(tcp, inb, "10.77.0.1:9191", "10.77.0.99:50002");
        // Right port, wrong direction: the LDAP server did not open it.
        let reversed = conn(tcp, inb, "10.77.0.1:389", "10.77.0.5:40001");
        let plan = plan(&p, &[ldap, web, legacy, outsider, reversed]);
        let rule = |s: &Seed| p.rules[usize::from(s.allowed.rule)].id.as_str();
        assert_eq!(
            plan.seeds.iter().map(|s| (s.conn, rule(s))).collect::<Vec<_>>(),
            [(ldap, "ldap"), (web, "web-http")]
        );
        assert_eq!(plan.not_allowed, [legacy, outsider, reversed]);
    }

    #[test]
    fn seeds_are_keyed_and_valued_as_the_programs_track_flows() {
        let p = lab();
        let c = conn(Protocol::Tcp, Direction::Outbound, "10.77.0.1:40000", "10.77.0.5:389");
        let seed = plan(&p, &[c]).seeds[0];
        let key = seed.flow_key();
        assert_eq!((key.family, key.proto, key.local_port, key.remote_port), (FAMILY_V4, IPPROTO_TCP, 40000, 389));
        assert_eq!(key.local_addr, [10, 77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(key.remote_addr[..4], [10, 77, 0, 5]);
        let e = seed.entry(123);
        assert_eq!((e.last_seen_ns, e.flow_dir as u32, e.state, e.flags), (123, DIR_EGRESS, CT_STATE_OPEN, 0));
        assert_eq!(p.rules[usize::from(e.rule)].id, "ldap");
        assert_eq!(p.port_labels[0][usize::from(e.port_idx)], "389");

        let c = conn(Protocol::Udp, Direction::Inbound, "[fd77::1]:1812", "[fd77::2]:40000");
        let key = flow_key(&c);
        assert_eq!((key.family, key.proto, key.local_port), (FAMILY_V6, IPPROTO_UDP, 1812));
        assert_eq!(key.remote_addr, "fd77::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        // IPv4-mapped addresses are keyed as the IPv4 packets they send.
        let mapped = conn(Protocol::Tcp, Direction::Inbound, "[::ffff:10.77.0.1]:9191", "[::ffff:10.77.0.2]:5");
        let plain = conn(Protocol::Tcp, Direction::Inbound, "10.77.0.1:9191", "10.77.0.2:5");
        assert_eq!(flow_key(&mapped), flow_key(&plain));
        let web = plan(&p, &[plain]).seeds[0];
        assert_eq!(web.entry(0).flow_dir as u32, DIR_INGRESS);
    }
}
