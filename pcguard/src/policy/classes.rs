//! Peer classes of a compiled policy, derived from its tables: the CIDRs
//! of a class are the outermost LPM prefixes carrying its bit (masks of
//! nested prefixes include the bits of the prefixes containing them), its
//! FQDNs those of the rules allowing it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;

use super::compiled::{CompiledPolicy, PeerPrefix};
use crate::model::Cidr;

/// One peer class: for `check`, nftables and DNS-aware egress (the daemon
/// writes the addresses it learns for `fqdns` into the kernel's `LEARNED`
/// map with `1 << bit` in their mask).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClassInfo {
    pub name: String,
    /// Bit index in the class masks (`CLASS_ANY_BIT` for `any`).
    pub bit: u32,
    /// The class's prefixes (configured CIDRs and documented IPs).
    pub cidrs: Vec<Cidr>,
    /// Documented endpoint names of the enabled rules allowing this class
    /// (`*.papercut.com` matches any subdomain).
    pub fqdns: Vec<String>,
}

impl CompiledPolicy {
    /// Bit index of a class name.
    pub fn class_bit(&self, name: &str) -> Option<u32> {
        self.classes.iter().position(|c| c.as_deref() == Some(name)).map(|i| i as u32)
    }

    /// Every class with a bit, in bit order (`any` last).
    pub fn class_info(&self) -> Vec<ClassInfo> {
        let prefixes = self.prefix_masks();
        let classes = self.classes.iter().zip(0u32..).filter_map(|(n, bit)| n.as_ref().map(|n| (n, bit)));
        classes
            .map(|(name, bit)| ClassInfo {
                name: name.clone(),
                bit,
                cidrs: outermost(&prefixes, bit),
                fqdns: self.class_fqdns(name),
            })
            .collect()
    }

    /// FQDNs of the rules whose peers include `name`, first seen first.
    pub fn class_fqdns(&self, name: &str) -> Vec<String> {
        let rules = self.rules.iter().filter(|r| r.peers.iter().any(|p| p == name));
        unique(rules.flat_map(|r| &r.fqdns))
    }

    fn prefix_masks(&self) -> BTreeMap<Cidr, u32> {
        let v4 = self.peers_v4.iter().map(|p| entry(p, |a: [u8; 4]| IpAddr::V4(Ipv4Addr::from(a))));
        let v6 = self.peers_v6.iter().map(|p| entry(p, |a: [u8; 16]| IpAddr::V6(Ipv6Addr::from(a))));
        v4.chain(v6).collect()
    }
}

fn entry<const N: usize>(p: &PeerPrefix<N>, ip: impl Fn([u8; N]) -> IpAddr) -> (Cidr, u32) {
    (Cidr::containing(ip(p.addr), p.prefix_len as u8), p.mask)
}

/// Prefixes with `bit` not contained in another prefix with `bit`.
fn outermost(prefixes: &BTreeMap<Cidr, u32>, bit: u32) -> Vec<Cidr> {
    let has = |c: &Cidr| prefixes.get(c).is_some_and(|m| m & (1 << bit) != 0);
    prefixes
        .keys()
        .filter(|c| has(c) && !(0..c.prefix_len).any(|len| has(&Cidr::containing(c.addr, len))))
        .copied()
        .collect()
}

/// The distinct items, in first-seen order.
pub(super) fn unique<'a>(items: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if !out.contains(item) {
            out.push(item.clone());
        }
    }
    out
}
