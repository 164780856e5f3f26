//! LPM trie content: every class prefix plus the default routes, each with
//! the bits of every prefix that contains it (an LPM lookup returns only
//! the longest match, so that match must carry all the classes the address
//! belongs to).

use std::collections::BTreeMap;

use pcguard_common::CLASS_ANY;

use super::compiled::PeerPrefix;
use crate::model::Cidr;

/// `(prefixes, class bit)` pairs -> (IPv4 entries, IPv6 entries), sorted.
pub fn prefixes<'a>(classes: impl IntoIterator<Item = (&'a [Cidr], u32)>) -> (Vec<PeerPrefix<4>>, Vec<PeerPrefix<16>>) {
    let mut own: BTreeMap<Cidr, u32> = BTreeMap::new();
    for v4 in [true, false] {
        own.insert(Cidr::default_route(v4), CLASS_ANY);
    }
    for (cidrs, bit) in classes {
        for c in cidrs {
            *own.entry(*c).or_insert(CLASS_ANY) |= 1 << bit;
        }
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for cidr in own.keys() {
        let mask = containing_mask(&own, cidr);
        let octets = cidr.octets();
        let prefix_len = u32::from(cidr.prefix_len);
        if cidr.is_v4() {
            v4.push(PeerPrefix { addr: octets.try_into().expect("4 bytes"), prefix_len, mask });
        } else {
            v6.push(PeerPrefix { addr: octets.try_into().expect("16 bytes"), prefix_len, mask });
        }
    }
    (v4, v6)
}

/// OR of the bits of `cidr` and of every listed prefix containing it.
fn containing_mask(own: &BTreeMap<Cidr, u32>, cidr: &Cidr) -> u32 {
    (0..=cidr.prefix_len).filter_map(|len| own.get(&Cidr::containing(cidr.addr, len))).fold(0, |m, b| m | b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_prefixes_inherit_containing_bits() {
        let wide = [c("10.0.0.0/8")];
        let narrow = [c("10.1.0.0/16"), c("2001:db8::/32")];
        let host = [c("10.1.2.3")];
        let (v4, v6) = prefixes([(&wide[..], 0), (&narrow[..], 1), (&host[..], 2)]);
        let mask_of = |len: u32| v4.iter().find(|p| p.prefix_len == len).unwrap().mask;
        assert_eq!(v4.len(), 4);
        assert_eq!(mask_of(0), CLASS_ANY);
        assert_eq!(mask_of(8), CLASS_ANY | 0b001);
        assert_eq!(mask_of(16), CLASS_ANY | 0b011);
        assert_eq!(mask_of(32), CLASS_ANY | 0b111);
        assert_eq!(v4.iter().find(|p| p.prefix_len == 32).unwrap().addr, [10, 1, 2, 3]);
        assert_eq!(v6.len(), 2);
        assert_eq!(v6[0].prefix_len, 0);
        assert_eq!(v6[1].mask, CLASS_ANY | 0b010);
    }

    #[test]
    fn same_prefix_in_two_classes_is_one_entry() {
        let a = [c("192.0.2.0/24")];
        let (v4, _) = prefixes([(&a[..], 3), (&a[..], 5)]);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[1].mask, CLASS_ANY | (1 << 3) | (1 << 5));
    }
}
