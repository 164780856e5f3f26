//! Ethernet frames: Ethernet (with VLAN tags), IPv4 (options, fragment
//! field), IPv6 (extension-header chains), TCP, UDP, ARP.
//!
//! The small functions build the common case ([`tcp4`], [`udp4`],
//! [`ipv4`], [`ipv6`]); [`Ipv4`] and [`ipv6_chain`] build the odd ones the
//! parser tests need; the `set_*` functions break a length afterwards.

use std::net::{IpAddr, SocketAddr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 `frag_off`: don't fragment, more fragments.
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_MF: u16 = 0x2000;

/// Destination and source MAC of every frame built here.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// Offset of the IPv4 total length (IPv6 payload length at 18) in an
/// untagged frame.
const L3: usize = 14;

/// An Ethernet header of `ethertype`.
pub fn eth(ethertype: u16) -> Vec<u8> {
    eth_tagged(&[], ethertype)
}

/// An Ethernet header with one VLAN tag per TPID of `tags` (outermost
/// first, VID 100 each), then `ethertype`.
pub fn eth_tagged(tags: &[u16], ethertype: u16) -> Vec<u8> {
    let mut f = [DST_MAC, SRC_MAC].concat();
    for tpid in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&100u16.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// `frame` with an 802.1Q tag of `vid` pushed in front of its EtherType
/// (outside any tag it already has).
pub fn vlan(mut frame: Vec<u8>, vid: u16) -> Vec<u8> {
    let inner = [frame[12], frame[13]];
    frame[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
    let tag = [(vid >> 8) as u8, vid as u8, inner[0], inner[1]];
    frame.splice(14..14, tag);
    frame
}

/// A 20-byte TCP header.
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

/// A UDP header (length field `8 + payload.len()`) and `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp_with_len(sport, dport, (8 + payload.len()) as u16, payload)
}

/// A UDP header whose length field is `len`, then `payload`.
pub fn udp_with_len(sport: u16, dport: u16, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = [sport, dport, len, 0].map(u16::to_be_bytes).concat();
    u.extend_from_slice(payload);
    u
}

/// An IPv4 header. [`Ipv4::new`]: no options, DF, TTL 64.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Flags and fragment offset (8-byte units), as on the wire.
    pub frag_off: u16,
    /// Options, in 4-byte words (filled with 1, "no operation").
    pub options: u8,
}

impl Ipv4 {
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        Self { src, dst, proto, frag_off: IPV4_DF, options: 0 }
    }

    /// The header and `l4`, total length = their length.
    pub fn packet(&self, l4: &[u8]) -> Vec<u8> {
        let hlen = 20 + usize::from(self.options) * 4;
        let total = (hlen + l4.len()) as u16;
        let mut p = vec![0x45 + self.options, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.frag_off.to_be_bytes());
        p.extend_from_slice(&[64, self.proto, 0, 0]);
        p.extend_from_slice(&self.src);
        p.extend_from_slice(&self.dst);
        p.extend(std::iter::repeat_n(1u8, usize::from(self.options) * 4));
        p.extend_from_slice(l4);
        p
    }

    /// [`Ipv4::packet`] in an untagged Ethernet frame.
    pub fn frame(&self, l4: &[u8]) -> Vec<u8> {
        let mut f = eth(ETH_P_IP);
        f.extend(self.packet(l4));
        f
    }
}

/// An IPv4 frame from `src` to `dst` carrying `l4` ([`Ipv4::new`]).
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    Ipv4::new(src, dst, proto).frame(l4)
}

/// An IPv4 TCP frame (20-byte header, no payload).
pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, IPPROTO_TCP, &tcp(sport, dport, flags))
}

/// An IPv4 UDP frame carrying `payload`.
pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv4(src, dst, IPPROTO_UDP, &udp(sport, dport, payload))
}

/// An IPv4 ICMP echo request (8 bytes).
pub fn icmp4_echo(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    ipv4(src, dst, IPPROTO_ICMP, &[8, 0, 0, 0, 0, 0, 0, 0])
}

/// An IPv6 frame from `src` to `dst` carrying `l4` (next header `proto`).
pub fn ipv6(src: [u8; 16], dst: [u8; 16], proto: u8, l4: &[u8]) -> Vec<u8> {
    ipv6_chain(src, dst, &[proto], 0, l4)
}

/// An IPv6 frame whose next-header chain is `chain` (each an extension
/// header type, the last the transport protocol), with `l4` after it; the
/// payload length covers the chain and `l4`. A fragment header (44) holds
/// `frag_off` (offset in 8-byte units << 3 | M); every other extension
/// header is 16 bytes of zeros after its next-header and length bytes.
pub fn ipv6_chain(src: [u8; 16], dst: [u8; 16], chain: &[u8], frag_off: u16, l4: &[u8]) -> Vec<u8> {
    const NEXTHDR_FRAGMENT: u8 = 44;
    let mut f = eth(ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, chain[0], 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
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
    let payload = (f.len() - L3 - 40) as u16;
    set_ipv6_payload_len(f, payload)
}

/// Sets the IPv4 total length of an untagged frame.
pub fn set_ipv4_total(mut frame: Vec<u8>, total: u16) -> Vec<u8> {
    frame[L3 + 2..L3 + 4].copy_from_slice(&total.to_be_bytes());
    frame
}

/// Sets the IPv4 `frag_off` field (flags and offset) of an untagged frame.
pub fn set_ipv4_frag_off(mut frame: Vec<u8>, frag_off: u16) -> Vec<u8> {
    frame[L3 + 6..L3 + 8].copy_from_slice(&frag_off.to_be_bytes());
    frame
}

/// Sets the IPv6 payload length of an untagged frame.
pub fn set_ipv6_payload_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    frame[L3 + 4..L3 + 6].copy_from_slice(&len.to_be_bytes());
    frame
}

/// An ARP frame (28 zero bytes after the Ethernet header).
pub fn arp() -> Vec<u8> {
    let mut p = eth(ETH_P_ARP);
    p.extend_from_slice(&[0u8; 28]);
    p
}

/// An IPv4 or IPv6 packet (no Ethernet header) carrying one UDP datagram
/// from `src` to `dst`, checksums filled in: for a packet socket.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend(src.port().to_be_bytes());
    udp.extend(dst.port().to_be_bytes());
    udp.extend((udp_len as u16).to_be_bytes());
    udp.extend([0, 0]);
    udp.extend(payload);
    let mut pseudo = Vec::new();
    let mut ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, 17]);
            pseudo.extend((udp_len as u16).to_be_bytes());
            let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
            h[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            h.extend(s.octets());
            h.extend(d.octets());
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend((udp_len as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, 17]);
            let mut h = vec![0x60, 0, 0, 0];
            h.extend((udp_len as u16).to_be_bytes());
            h.extend([17, 64]);
            h.extend(s.octets());
            h.extend(d.octets());
            h
        }
        _ => panic!("udp_packet: {src} and {dst} are of different families"),
    };
    pseudo.extend(&udp);
    let c = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    ip.extend(udp);
    ip
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_fields() {
        let f = tcp4([10, 1, 2, 3], [192, 168, 1, 10], 40000, 9191, TCP_SYN);
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(&f[16..18], &40u16.to_be_bytes());
        assert_eq!(&f[20..22], &IPV4_DF.to_be_bytes());
        assert_eq!((f[23], f[14 + 20 + 13]), (IPPROTO_TCP, TCP_SYN));
        let tagged = vlan(f.clone(), 100);
        assert_eq!((&tagged[12..14], &tagged[16..18]), (&ETH_P_8021Q.to_be_bytes()[..], &ETH_P_IP.to_be_bytes()[..]));
        assert_eq!(&tagged[18..], &f[14..]);
        let u = udp4([1; 4], [2; 4], 53, 40000, &[7; 5]);
        assert_eq!(&u[14 + 20 + 4..14 + 20 + 6], &13u16.to_be_bytes());
        let o = Ipv4 { options: 2, frag_off: IPV4_MF, ..Ipv4::new([1; 4], [2; 4], IPPROTO_UDP) }.packet(&[0; 8]);
        assert_eq!((o[0], &o[2..4], o.len()), (0x47, &36u16.to_be_bytes()[..], 36));
        let v6 = ipv6_chain([1; 16], [2; 16], &[44, IPPROTO_UDP], 1, &[0; 8]);
        assert_eq!((&v6[18..20], v6[20], v6[54]), (&16u16.to_be_bytes()[..], 44, IPPROTO_UDP));
    }

    #[test]
    fn udp_packet_checksums_verify() {
        let p = udp_packet("10.0.0.1:53".parse().unwrap(), "10.0.0.2:40000".parse().unwrap(), b"abc");
        assert_eq!(checksum(&p[..20]), 0);
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend([0, 17, 0, 11]);
        pseudo.extend(&p[20..]);
        assert_eq!(checksum(&pseudo), 0);
    }
}
