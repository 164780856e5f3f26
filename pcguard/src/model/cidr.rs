//! IPv4/IPv6 prefixes (`10.0.0.0/8`, `2001:db8::/32`, a bare address is a
//! host prefix).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// A normalized prefix: the host bits of `addr` are zero.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// The prefix of `len` bits containing `addr` (host bits cleared).
    pub fn containing(addr: IpAddr, len: u8) -> Cidr {
        let len = len.min(max_len(&addr));
        let bits = left_aligned(&addr) & net_mask(len);
        Cidr { addr: from_left_aligned(bits, addr.is_ipv4()), prefix_len: len }
    }

    /// `0.0.0.0/0` or `::/0`.
    pub fn default_route(v4: bool) -> Cidr {
        let addr = if v4 { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
        Cidr { addr, prefix_len: 0 }
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// True when every address of `other` is in `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.is_v4() == other.is_v4()
            && self.prefix_len <= other.prefix_len
            && left_aligned(&other.addr) & net_mask(self.prefix_len) == left_aligned(&self.addr)
    }

    /// The address bytes (4 for IPv4, 16 for IPv6), network order.
    pub fn octets(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }
}

fn max_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// The address as a 128-bit number, IPv4 in the top 32 bits.
fn left_aligned(addr: &IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)) << 96,
        IpAddr::V6(a) => u128::from(*a),
    }
}

fn from_left_aligned(bits: u128, v4: bool) -> IpAddr {
    if v4 { IpAddr::V4(Ipv4Addr::from((bits >> 96) as u32)) } else { IpAddr::V6(Ipv6Addr::from(bits)) }
}

fn net_mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| format!("invalid CIDR \"{s}\": {why}");
        let (addr_text, len_text) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| invalid("not an IPv4 or IPv6 address"))?;
        let max = max_len(&addr);
        let len = match len_text {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(invalid(&format!("prefix length must be 0-{max}"))),
            },
        };
        let cidr = Cidr::containing(addr, len);
        if cidr.addr != addr {
            return Err(invalid(&format!("host bits are set (did you mean {cidr}?)")));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_prefixes_and_hosts() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("10.77.0.2").to_string(), "10.77.0.2/32");
        assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(c("2001:db8::1").prefix_len, 128);
        assert_eq!(c("0.0.0.0/0"), Cidr::default_route(true));
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>().unwrap_err(),
            "invalid CIDR \"10.0.0.0/33\": prefix length must be 0-32"
        );
        assert!("2001:db8::/129".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        assert!("10.77.0.1/24".parse::<Cidr>().unwrap_err().contains("did you mean 10.77.0.0/24?"));
    }

    #[test]
    fn containment() {
        assert!(c("10.0.0.0/8").contains(&c("10.1.0.0/16")));
        assert!(c("10.0.0.0/8").contains(&c("10.0.0.0/8")));
        assert!(!c("10.1.0.0/16").contains(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/8").contains(&c("11.0.0.0/16")));
        assert!(Cidr::default_route(true).contains(&c("192.0.2.1")));
        assert!(!Cidr::default_route(true).contains(&c("2001:db8::1")));
        assert!(c("2001:db8::/32").contains(&c("2001:db8:1::/48")));
        assert_eq!(c("192.0.2.0/24").octets(), vec![192, 0, 2, 0]);
    }
}
