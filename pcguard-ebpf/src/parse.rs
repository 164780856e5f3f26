//! Defensive header parsing: Ethernet, up to two VLAN tags, IPv4 (options,
//! fragments), IPv6 (extension headers), TCP/UDP/ICMP.
//!
//! Everything the rest of the program needs is copied out of the packet into
//! a [`Packet`] on the stack, so no packet pointer outlives parsing (helper
//! calls such as `bpf_skb_pull_data` invalidate them) and later stages never
//! touch packet memory.

use pcguard_common::{
    FAMILY_V4, FAMILY_V6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IGMP, IPPROTO_TCP, IPPROTO_UDP,
};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const IPV6_FRAG_HLEN: usize = 8;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT_HDRS: usize = 8;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// IPv4 fragment offset bits of `frag_off`.
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
/// IPv6 fragment offset bits of the fragment header's second 16-bit word.
const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A SYN without ACK: the first packet of a TCP connection.
#[inline(always)]
pub fn is_bare_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The frame as the hook sees it.
pub struct Frame {
    /// Start of the (linear) packet data.
    pub data: usize,
    /// End of the (linear) packet data.
    pub end: usize,
    /// Frame length counted in byte counters and events.
    pub len: u32,
    pub ifindex: u32,
}

/// What follows the IP header(s).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    /// ICMP in IPv4, ICMPv6 in IPv6.
    Icmp,
    /// Any other IP protocol (GRE, ESP, AH, no next header, ...).
    Other,
    /// A non-first fragment: no L4 header.
    Fragment,
}

/// An address as two 8-byte words holding its bytes in network order (IPv4
/// in the first 4 bytes, the rest zero): copied with two 8-byte loads and
/// stores instead of sixteen byte moves.
pub type Addr = [u64; 2];

/// The bytes of an [`Addr`], as stored in a `FlowKey`.
#[inline(always)]
pub fn addr_bytes(a: Addr) -> [u8; 16] {
    // SAFETY: same size, every bit pattern is valid for both.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(a) }
}

/// The parsed fields of an IP packet. Ports are in host order.
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    /// IP protocol of the transport header (after IPv6 extension headers).
    pub proto: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    pub l4: L4,
    /// UDP only (0 otherwise): offset of the UDP payload from the start of
    /// the frame, and its length from the UDP header's length field (0 when
    /// that field is below the header's own 8 bytes). The length is what
    /// the sender says, not checked against the frame: a first fragment or
    /// a truncated packet holds less.
    pub payload_off: u16,
    pub payload_len: u16,
}

impl Packet {
    #[inline(always)]
    fn new(family: u8, proto: u8, src: Addr, dst: Addr) -> Self {
        Self {
            src,
            dst,
            sport: 0,
            dport: 0,
            family,
            proto,
            tcp_flags: 0,
            l4: L4::Other,
            payload_off: 0,
            payload_len: 0,
        }
    }
}

pub enum Parsed {
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    NonIp,
    /// Truncated or invalid headers. `Some` when the IP addresses (and so a
    /// flow key, with ports 0) could be read.
    Malformed(Option<Packet>),
    Ip(Packet),
}

/// `N` bytes of the packet whose bounds have been checked against `data_end`.
///
/// Fields are read through the one pointer that was checked: the verifier
/// attaches the proven range to that register, so re-deriving `data + off`
/// for every field could lose it.
#[derive(Clone, Copy)]
struct Hdr<const N: usize>(*const u8);

impl<const N: usize> Hdr<N> {
    /// The `T` at byte `I` (bounds checked at compile time against `N`).
    ///
    /// A plain (aligned) load although header fields are not necessarily
    /// aligned in memory: this is what C programs do through `struct iphdr`,
    /// and it is sound for BPF, whose loads have no alignment requirement on
    /// JITs with efficient unaligned access (x86-64, arm64); elsewhere the
    /// verifier checks packet loads against NET_IP_ALIGN, which these
    /// offsets satisfy. An unaligned read instead makes LLVM split every
    /// load into byte loads (the BPF backend assumes no misaligned access).
    /// Host builds (unit tests) keep Rust's rules: an unaligned read.
    #[inline(always)]
    fn at<const I: usize, T: Copy>(self) -> T {
        const { assert!(I + size_of::<T>() <= N) };
        // SAFETY: `Bounds::hdr` checked that N bytes are inside the packet.
        unsafe {
            let p = self.0.add(I).cast::<T>();
            if cfg!(target_arch = "bpf") {
                p.read()
            } else {
                p.read_unaligned()
            }
        }
    }

    #[inline(always)]
    fn u8<const I: usize>(self) -> u8 {
        self.at::<I, u8>()
    }

    #[inline(always)]
    fn be16<const I: usize>(self) -> u16 {
        u16::from_be(self.at::<I, u16>())
    }

    /// An IPv4 address at byte `I`, widened to an [`Addr`].
    #[inline(always)]
    fn v4_addr<const I: usize>(self) -> Addr {
        let word = self.at::<I, u32>() as u64;
        // The address bytes must land in bytes 0..4 of the first word.
        [
            if cfg!(target_endian = "little") {
                word
            } else {
                word << 32
            },
            0,
        ]
    }

    /// An IPv6 address at byte `I`.
    #[inline(always)]
    fn v6_addr<const I: usize>(self) -> Addr {
        self.at::<I, Addr>()
    }
}

/// Packet bounds. Offsets stay small and bounded (every increment is at most
/// 2 KiB and the number of steps is constant), which the verifier needs
/// before it lets a variable offset be added to a packet pointer.
#[derive(Clone, Copy)]
struct Bounds {
    data: usize,
    end: usize,
}

impl Bounds {
    #[inline(always)]
    fn hdr<const N: usize>(self, off: usize) -> Option<Hdr<N>> {
        let start = self.data + off;
        if start + N > self.end {
            return None;
        }
        Some(Hdr(start as *const u8))
    }

    /// Whether `len` bytes from `off` are inside the packet (no access).
    #[inline(always)]
    fn contains(self, off: usize, len: usize) -> bool {
        self.data + off + len <= self.end
    }
}

#[inline(always)]
pub fn parse(frame: &Frame) -> Parsed {
    let pkt = Bounds {
        data: frame.data,
        end: frame.end,
    };
    match l2(pkt) {
        None => Parsed::Malformed(None),
        Some((ETH_P_IP, off)) => ipv4(pkt, off),
        Some((ETH_P_IPV6, off)) => ipv6(pkt, off),
        Some(_) => Parsed::NonIp,
    }
}

/// Ethernet and up to two VLAN tags: the inner ethertype and the L3 offset.
#[inline(always)]
fn l2(pkt: Bounds) -> Option<(u16, usize)> {
    let eth = pkt.hdr::<ETH_HLEN>(0)?;
    let mut ethertype = eth.be16::<12>();
    let mut off = ETH_HLEN;
    // Constant trip count: LLVM unrolls it, the verifier sees straight code.
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = pkt.hdr::<VLAN_HLEN>(off)?;
        ethertype = tag.be16::<2>();
        off += VLAN_HLEN;
    }
    Some((ethertype, off))
}

/// The fixed IP header at `off` if it is inside the packet and of `version`.
#[inline(always)]
fn ip_header<const N: usize>(pkt: Bounds, off: usize, version: u8) -> Option<Hdr<N>> {
    let ip = pkt.hdr::<N>(off)?;
    (ip.u8::<0>() >> 4 == version).then_some(ip)
}

#[inline(always)]
fn ipv4(pkt: Bounds, off: usize) -> Parsed {
    let Some(ip) = ip_header::<IPV4_HLEN>(pkt, off, 4) else {
        return Parsed::Malformed(None);
    };
    let (src, dst) = (ip.v4_addr::<12>(), ip.v4_addr::<16>());
    let mut p = Packet::new(FAMILY_V4, ip.u8::<9>(), src, dst);
    let hlen = ((ip.u8::<0>() & 0x0f) as usize) * 4;
    if hlen < IPV4_HLEN || !pkt.contains(off, hlen) {
        return Parsed::Malformed(Some(p));
    }
    if ip.be16::<6>() & IPV4_FRAG_OFFSET_MASK != 0 {
        p.l4 = L4::Fragment;
        return Parsed::Ip(p);
    }
    transport(pkt, off + hlen, p, IPPROTO_ICMP)
}

#[inline(always)]
fn is_ipv6_ext(nexthdr: u8) -> bool {
    matches!(
        nexthdr,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT
    )
}

#[inline(always)]
fn ipv6(pkt: Bounds, off: usize) -> Parsed {
    let Some(ip) = ip_header::<IPV6_HLEN>(pkt, off, 6) else {
        return Parsed::Malformed(None);
    };
    let (src, dst) = (ip.v6_addr::<8>(), ip.v6_addr::<24>());
    let mut p = Packet::new(FAMILY_V6, ip.u8::<6>(), src, dst);
    let mut off = off + IPV6_HLEN;
    // At most MAX_IPV6_EXT_HDRS headers: a constant bound keeps the walk
    // verifiable (and `off` bounded: each step adds at most 2 KiB).
    for _ in 0..MAX_IPV6_EXT_HDRS {
        match p.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let Some(ext) = pkt.hdr::<2>(off) else {
                    return Parsed::Malformed(Some(p));
                };
                p.proto = ext.u8::<0>();
                off += (ext.u8::<1>() as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let Some(frag) = pkt.hdr::<IPV6_FRAG_HLEN>(off) else {
                    return Parsed::Malformed(Some(p));
                };
                p.proto = frag.u8::<0>();
                off += IPV6_FRAG_HLEN;
                if frag.be16::<2>() & IPV6_FRAG_OFFSET_MASK != 0 {
                    p.l4 = L4::Fragment;
                    return Parsed::Ip(p);
                }
            }
            _ => break,
        }
    }
    if is_ipv6_ext(p.proto) {
        // More extension headers than we walk: treat as invalid rather
        // than guess at what follows.
        return Parsed::Malformed(Some(p));
    }
    transport(pkt, off, p, IPPROTO_ICMPV6)
}

/// The transport header at `off`. `icmp` is the ICMP protocol number of the
/// address family.
#[inline(always)]
fn transport(pkt: Bounds, off: usize, mut p: Packet, icmp: u8) -> Parsed {
    match p.proto {
        IPPROTO_TCP => {
            let Some(tcp) = pkt.hdr::<TCP_HLEN>(off) else {
                return Parsed::Malformed(Some(p));
            };
            if (tcp.u8::<12>() >> 4) < 5 {
                return Parsed::Malformed(Some(p));
            }
            p.l4 = L4::Tcp;
            p.sport = tcp.be16::<0>();
            p.dport = tcp.be16::<2>();
            p.tcp_flags = tcp.u8::<13>();
        }
        IPPROTO_UDP => {
            let Some(udp) = pkt.hdr::<UDP_HLEN>(off) else {
                return Parsed::Malformed(Some(p));
            };
            p.l4 = L4::Udp;
            p.sport = udp.be16::<0>();
            p.dport = udp.be16::<2>();
            // Lossless: `off` is at most a few KiB (see `Bounds`).
            p.payload_off = (off + UDP_HLEN) as u16;
            p.payload_len = udp.be16::<4>().saturating_sub(UDP_HLEN as u16);
        }
        proto if proto == icmp => p.l4 = L4::Icmp,
        // IPv4 multicast group management (router queries, reports) is
        // network control traffic like ICMP: dropping it makes switches and
        // routers prune the multicast that discovery protocols rely on.
        IPPROTO_IGMP if icmp == IPPROTO_ICMP => p.l4 = L4::Icmp,
        _ => {}
    }
    Parsed::Ip(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC4: [u8; 4] = [10, 1, 2, 3];
    const DST4: [u8; 4] = [192, 168, 1, 10];

    fn parsed(frame: &[u8]) -> Parsed {
        let data = frame.as_ptr() as usize;
        let f = Frame {
            data,
            end: data + frame.len(),
            len: frame.len() as u32,
            ifindex: 0,
        };
        parse(&f)
    }

    fn ip(frame: &[u8]) -> Packet {
        match parsed(frame) {
            Parsed::Ip(p) => p,
            Parsed::Malformed(_) => panic!("malformed"),
            Parsed::NonIp => panic!("non-IP"),
        }
    }

    fn malformed_key(frame: &[u8]) -> Option<Packet> {
        match parsed(frame) {
            Parsed::Malformed(p) => p,
            _ => panic!("not malformed"),
        }
    }

    fn eth(tags: &[u16], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        for tpid in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&[0, 100]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    /// IPv4 with `options` 4-byte words of options and `frag` as frag_off.
    fn ipv4(options: u8, frag: u16, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = eth(&[], ETH_P_IP);
        f.extend_from_slice(&[0x45 + options, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0]);
        f.extend_from_slice(&SRC4);
        f.extend_from_slice(&DST4);
        f.extend(std::iter::repeat_n(1u8, options as usize * 4));
        f.extend_from_slice(l4);
        f
    }

    /// IPv6 whose next-header chain is `chain` (each an extension header
    /// type, the last the transport protocol), with `l4` after it.
    fn ipv6(chain: &[u8], frag_off: u16, l4: &[u8]) -> Vec<u8> {
        let mut f = eth(&[], ETH_P_IPV6);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, chain[0], 64]);
        f.extend((1..=16).map(|i| i as u8));
        f.extend((1..=16).map(|i| 0xe0 + i as u8));
        for w in chain.windows(2) {
            match w[0] {
                NEXTHDR_FRAGMENT => {
                    f.extend_from_slice(&[w[1], 0]);
                    f.extend_from_slice(&frag_off.to_be_bytes());
                    f.extend_from_slice(&[0; 4]);
                }
                // hdrlen 1: 16 bytes.
                _ => f.extend([w[1], 1].into_iter().chain(std::iter::repeat_n(0, 14))),
            }
        }
        f.extend_from_slice(l4);
        f
    }

    #[test]
    fn ipv4_tcp_fields() {
        let p = ip(&ipv4(0, 0, IPPROTO_TCP, &tcp(40000, 9191, TCP_SYN)));
        assert!(p.l4 == L4::Tcp && p.family == FAMILY_V4 && p.proto == IPPROTO_TCP);
        assert_eq!((p.sport, p.dport, p.tcp_flags), (40000, 9191, TCP_SYN));
        assert_eq!(&addr_bytes(p.src)[..4], &SRC4);
        assert_eq!(&addr_bytes(p.dst)[..4], &DST4);
        assert_eq!(&addr_bytes(p.src)[4..], &[0; 12]);
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let p = ip(&ipv4(
            2,
            0,
            IPPROTO_UDP,
            &[0x1f, 0x90, 0x23, 0xe7, 0, 8, 0, 0],
        ));
        assert!(p.l4 == L4::Udp);
        assert_eq!((p.sport, p.dport), (8080, 9191));
    }

    #[test]
    fn bad_ipv4_headers_are_malformed_with_a_key() {
        let mut short_ihl = ipv4(0, 0, IPPROTO_TCP, &tcp(1, 2, 0));
        short_ihl[14] = 0x44;
        assert!(malformed_key(&short_ihl).is_some());
        let mut cut_options = ipv4(2, 0, IPPROTO_TCP, &[]);
        cut_options.truncate(14 + 24);
        assert!(malformed_key(&cut_options).is_some());
        let mut version = ipv4(0, 0, IPPROTO_TCP, &tcp(1, 2, 0));
        version[14] = 0x65;
        assert!(malformed_key(&version).is_none());
    }

    #[test]
    fn ipv4_fragments() {
        let later = ip(&ipv4(0, 185, IPPROTO_TCP, &[0; 8]));
        assert!(later.l4 == L4::Fragment && later.proto == IPPROTO_TCP);
        // More-fragments set, offset 0: the first fragment is parsed.
        let first = ip(&ipv4(0, 0x2000, IPPROTO_TCP, &tcp(1, 9191, TCP_SYN)));
        assert!(first.l4 == L4::Tcp && first.dport == 9191);
    }

    #[test]
    fn transport_headers() {
        let mut doff = tcp(1, 2, 0);
        doff[12] = 4 << 4;
        let bad = malformed_key(&ipv4(0, 0, IPPROTO_TCP, &doff)).expect("key");
        assert!(bad.proto == IPPROTO_TCP && bad.dport == 0);
        assert!(malformed_key(&ipv4(0, 0, IPPROTO_TCP, &tcp(1, 2, 0)[..19])).is_some());
        assert!(malformed_key(&ipv4(0, 0, IPPROTO_UDP, &[0; 7])).is_some());
        assert!(ip(&ipv4(0, 0, IPPROTO_ICMP, &[8, 0, 0, 0])).l4 == L4::Icmp);
        assert!(ip(&ipv4(0, 0, IPPROTO_ICMPV6, &[128, 0, 0, 0])).l4 == L4::Other);
        assert!(ip(&ipv4(0, 0, IPPROTO_IGMP, &[0x16, 0, 0, 0])).l4 == L4::Icmp);
        assert!(ip(&ipv4(0, 0, 47, &[0; 4])).l4 == L4::Other);
    }

    /// A UDP header whose length field is `len`, then `payload`.
    fn udp(sport: u16, dport: u16, len: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = [sport, dport, len, 0].map(u16::to_be_bytes).concat();
        u.extend_from_slice(payload);
        u
    }

    #[test]
    fn udp_payload_offset_and_length() {
        let dns = udp(53, 40000, 8 + 5, &[1, 2, 3, 4, 5]);
        let p = ip(&ipv4(0, 0, IPPROTO_UDP, &dns));
        assert_eq!(
            (p.sport, p.payload_off, p.payload_len),
            (53, 14 + 20 + 8, 5)
        );
        let p = ip(&ipv4(2, 0x2000, IPPROTO_UDP, &dns));
        assert_eq!((p.payload_off, p.payload_len), (14 + 28 + 8, 5));
        let mut tagged = eth(&[ETH_P_8021Q], ETH_P_IP);
        tagged.extend_from_slice(&ipv4(0, 0, IPPROTO_UDP, &dns)[14..]);
        assert_eq!(ip(&tagged).payload_off, 14 + 4 + 20 + 8);
        let chain = [NEXTHDR_HOP, NEXTHDR_FRAGMENT, IPPROTO_UDP];
        let p = ip(&ipv6(&chain, 1, &dns));
        assert_eq!((p.payload_off, p.payload_len), (14 + 40 + 16 + 8 + 8, 5));
        // The length field is reported as sent, even beyond the frame.
        assert_eq!(
            ip(&ipv4(0, 0, IPPROTO_UDP, &udp(53, 1, 1000, &[]))).payload_len,
            992
        );
        let bad = ip(&ipv4(0, 0, IPPROTO_UDP, &udp(53, 1, 7, &[0; 4])));
        assert_eq!((bad.payload_off, bad.payload_len), (14 + 20 + 8, 0));
        // No payload for other protocols, nor for non-first fragments.
        let t = ip(&ipv4(0, 0, IPPROTO_TCP, &tcp(53, 1, TCP_ACK)));
        assert_eq!((t.payload_off, t.payload_len), (0, 0));
        let later = ip(&ipv4(0, 185, IPPROTO_UDP, &dns));
        assert_eq!((later.payload_off, later.payload_len), (0, 0));
    }

    #[test]
    fn vlan_tags() {
        let mut qinq = eth(&[ETH_P_8021AD, ETH_P_8021Q], ETH_P_IP);
        qinq.extend_from_slice(&ipv4(0, 0, IPPROTO_TCP, &tcp(1, 9191, 0))[14..]);
        assert_eq!(ip(&qinq).dport, 9191);
        let mut three = eth(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q], ETH_P_IP);
        three.extend_from_slice(&ipv4(0, 0, IPPROTO_TCP, &tcp(1, 9191, 0))[14..]);
        assert!(matches!(parsed(&three), Parsed::NonIp));
        assert!(malformed_key(&eth(&[ETH_P_8021Q], ETH_P_IP)[..16]).is_none());
    }

    #[test]
    fn layer_2() {
        assert!(matches!(parsed(&eth(&[], 0x0806)), Parsed::NonIp));
        assert!(malformed_key(&[0u8; 13]).is_none());
        assert!(malformed_key(&eth(&[], ETH_P_IP)).is_none());
    }

    #[test]
    fn ipv6_extension_headers() {
        let chain = [NEXTHDR_HOP, NEXTHDR_DEST, NEXTHDR_ROUTING, IPPROTO_TCP];
        let p = ip(&ipv6(&chain, 0, &tcp(40000, 9191, TCP_SYN)));
        assert!(p.l4 == L4::Tcp && p.family == FAMILY_V6);
        assert_eq!((p.sport, p.dport), (40000, 9191));
        assert_eq!(addr_bytes(p.src)[0], 1);
        assert_eq!(addr_bytes(p.dst)[15], 0xf0);
        let icmp = ip(&ipv6(&[IPPROTO_ICMPV6], 0, &[128, 0, 0, 0]));
        assert!(icmp.l4 == L4::Icmp);
        let esp = ip(&ipv6(&[50], 0, &[0; 8]));
        assert!(esp.l4 == L4::Other && esp.proto == 50);
    }

    #[test]
    fn ipv6_fragments_and_limits() {
        let frag = [NEXTHDR_FRAGMENT, IPPROTO_UDP];
        let later = ip(&ipv6(&frag, 8 << 3, &[0; 8]));
        assert!(later.l4 == L4::Fragment && later.proto == IPPROTO_UDP);
        let first = ip(&ipv6(&frag, 1, &[0, 53, 0x23, 0xe7, 0, 8, 0, 0]));
        assert!(first.l4 == L4::Udp && first.dport == 9191);
        let eight = [[NEXTHDR_DEST; 8].as_slice(), &[IPPROTO_TCP]].concat();
        assert!(ip(&ipv6(&eight, 0, &tcp(1, 2, 0))).l4 == L4::Tcp);
        let nine = [[NEXTHDR_DEST; 9].as_slice(), &[IPPROTO_TCP]].concat();
        assert!(malformed_key(&ipv6(&nine, 0, &tcp(1, 2, 0))).is_some());
        let mut cut = ipv6(&[NEXTHDR_HOP, IPPROTO_TCP], 0, &[]);
        cut.truncate(14 + 40 + 1);
        assert!(malformed_key(&cut).is_some());
    }
}
