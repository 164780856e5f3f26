//! Addresses no DNS answer may open, whoever sent it: an answer that made
//! the server connect to one of its own workstations, to itself, to a
//! resolver, to loopback or to a multicast group would turn the cloud
//! rules into a way around the local ones. Such an answer is refused and
//! audited as an attack (`dns_poisoning`).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use pcguard_common::CLASS_ANY;

use crate::policy::CompiledPolicy;
pub use crate::sys::local_addresses;

/// Why an answered address may not be learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Forbidden {
    /// Unspecified, loopback, link-local, multicast, broadcast or reserved
    /// ([`is_special`]).
    Special,
    /// One of this server's own addresses.
    OwnAddress,
    /// A configured resolver.
    Resolver,
    /// In a configured local peer class (workstations, devices, ...).
    LocalClass,
}

impl Forbidden {
    pub const ALL: [Forbidden; 4] =
        [Forbidden::Special, Forbidden::OwnAddress, Forbidden::Resolver, Forbidden::LocalClass];

    /// Label in metrics and audit records.
    pub const fn as_str(self) -> &'static str {
        match self {
            Forbidden::Special => "special",
            Forbidden::OwnAddress => "own_address",
            Forbidden::Resolver => "resolver",
            Forbidden::LocalClass => "local_class",
        }
    }
}

/// The IPv4 address an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) stands
/// for, so that it is judged like that address; others unchanged.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses that never name a cloud endpoint: 0.0.0.0/8, 127.0.0.0/8,
/// 169.254.0.0/16, 224.0.0.0/4 (multicast), 240.0.0.0/4 (reserved, with
/// 255.255.255.255), ::, ::1, fe80::/10, ff00::/8, and the IPv4-mapped
/// forms of the IPv4 ones.
pub fn is_special(addr: IpAddr) -> bool {
    match canonical(addr) {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => special_v6(a),
    }
}

fn special_v4(a: Ipv4Addr) -> bool {
    let [first, second, ..] = a.octets();
    first == 0 || first == 127 || (first == 169 && second == 254) || first >= 224
}

fn special_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    a.is_unspecified() || a.is_loopback() || s[0] & 0xffc0 == 0xfe80 || s[0] & 0xff00 == 0xff00
}

/// The addresses of this server and the checks against the policy.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    own: HashSet<IpAddr>,
}

impl Guard {
    pub fn new(own: impl IntoIterator<Item = IpAddr>) -> Self {
        Self { own: own.into_iter().map(canonical).collect() }
    }

    /// Reads this server's addresses again (they can change while it
    /// runs); true when they changed. On error the old set is kept.
    pub fn refresh(&mut self) -> std::io::Result<bool> {
        let own: HashSet<IpAddr> = local_addresses()?.into_iter().map(canonical).collect();
        let changed = own != self.own;
        self.own = own;
        Ok(changed)
    }

    /// Why `addr` may not be learned under `policy`, if it may not.
    ///
    /// Local class: its static mask (longest configured prefix) has a bit
    /// other than `any` and the classes DNS answers may give
    /// (`Settings.learned_mask`). A `peers.cloud` CIDR therefore does not
    /// forbid learning, a workstation range does.
    pub fn check(&self, addr: IpAddr, policy: &CompiledPolicy) -> Option<Forbidden> {
        let addr = canonical(addr);
        if is_special(addr) {
            return Some(Forbidden::Special);
        }
        if self.own.contains(&addr) {
            return Some(Forbidden::OwnAddress);
        }
        let s = &policy.settings;
        let mask = policy.peer_mask(addr);
        if mask & s.resolver_mask != 0 {
            return Some(Forbidden::Resolver);
        }
        if mask & !(CLASS_ANY | s.learned_mask) != 0 {
            return Some(Forbidden::LocalClass);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy() -> CompiledPolicy {
        let text = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\n\
                    workstations = [\"10.1.0.0/16\", \"2001:db8:1::/48\"]\ndns = [\"10.0.0.53\"]\n\
                    cloud = [\"192.0.2.0/24\"]\n[features]\nges = true\n";
        crate::policy::compile(&crate::config::parse(text, "t.toml").unwrap()).unwrap()
    }

    #[test]
    fn special_addresses_are_never_learned() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.1.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "ff0e::fb",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
            "::ffff:169.254.9.9",
            "::ffff:255.255.255.255",
        ] {
            assert!(is_special(ip(a)), "{a}");
            assert_eq!(Guard::default().check(ip(a), &policy()), Some(Forbidden::Special), "{a}");
        }
        for a in [
            "203.0.113.7",
            "10.2.3.4",
            "169.253.0.1",
            "223.255.255.255",
            "2001:db8::7",
            "fec0::1",
            "::ffff:203.0.113.7",
            "::2",
        ] {
            assert!(!is_special(ip(a)), "{a}");
        }
    }

    #[test]
    fn own_resolver_and_local_class_addresses_are_refused() {
        let p = policy();
        let g = Guard::new([ip("10.9.9.1"), ip("2001:db8:9::1")]);
        assert_eq!(g.check(ip("10.9.9.1"), &p), Some(Forbidden::OwnAddress));
        assert_eq!(g.check(ip("::ffff:10.9.9.1"), &p), Some(Forbidden::OwnAddress));
        assert_eq!(g.check(ip("2001:db8:9::1"), &p), Some(Forbidden::OwnAddress));
        assert_eq!(g.check(ip("10.0.0.53"), &p), Some(Forbidden::Resolver));
        assert_eq!(g.check(ip("10.1.2.3"), &p), Some(Forbidden::LocalClass));
        assert_eq!(g.check(ip("::ffff:10.1.2.3"), &p), Some(Forbidden::LocalClass));
        assert_eq!(g.check(ip("2001:db8:1::5"), &p), Some(Forbidden::LocalClass));
        // Unclassified, or in a learnable class (peers.cloud): allowed.
        assert_eq!(g.check(ip("203.0.113.7"), &p), None);
        assert_eq!(g.check(ip("192.0.2.7"), &p), None);
        assert_eq!(g.check(ip("2001:db8:2::5"), &p), None);
    }

    #[test]
    fn this_namespace_has_addresses() {
        // Every namespace has loopback once it is up; the test host's does.
        let own = local_addresses().unwrap();
        assert!(own.iter().any(|a| a.is_loopback()), "{own:?}");
        let mut g = Guard::default();
        assert!(g.refresh().unwrap());
        assert!(!g.refresh().unwrap(), "unchanged on a second read");
    }
}
