//! Defensive header parsing: Ethernet, up to `MAX_VLAN_TAGS` VLAN tags,
//! IPv4 (options, fragments), IPv6 (extension headers, fragments),
//! TCP/UDP/ICMP. docs/datapath.md, "Parsing", states the rules.
//!
//! Every header after the IP header is bounded by the end of the IP
//! datagram (IPv4 total length, IPv6 payload length), never by the end of
//! the frame: bytes after the datagram (Ethernet padding, or bytes an
//! attacker appends) are trimmed by the kernel and must not be read as
//! headers. A first fragment must hold its whole transport header (RFC
//! 1858) and, for IPv6, the whole extension-header chain (RFC 7112, RFC
//! 8200 section 4.5); anything the parser cannot classify with certainty is
//! [`Parse::Malformed`] and fails closed.
//!
//! Everything the rest of the program needs is copied out of the packet into
//! a [`Packet`] on the stack, so no packet pointer outlives parsing (helper
//! calls such as `bpf_skb_pull_data` invalidate them) and later stages never
//! touch packet memory.

use core::{marker::PhantomData, mem::offset_of};

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use pcguard_common::{
    FAMILY_V4, FAMILY_V6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IGMP, IPPROTO_TCP, IPPROTO_UDP, MAX_IPV6_EXT_HDRS,
    MAX_VLAN_TAGS, Malformed,
};

// Header layouts and protocol numbers: network-types' definitions (the
// structs are `repr(C)` copies of the kernel's; `LEN` is their size). Fields
// are read at `offset_of!` their struct's field (`Hdr::at`), not through the
// structs' accessors: see `Hdr`. NOTES.md, "Design-card packages".
const ETH_HLEN: usize = EthHdr::LEN;
const VLAN_HLEN: usize = VlanHdr::LEN;
const IPV4_HLEN: usize = Ipv4Hdr::LEN;
const IPV6_HLEN: usize = Ipv6Hdr::LEN;
const TCP_HLEN: usize = TcpHdr::LEN;
const UDP_HLEN: usize = UdpHdr::LEN;
const IPV6_FRAG_HLEN: usize = Ipv6FragHdr::LEN;
pub const DNS_PORT: u16 = 53;

// network-types' `EtherType` discriminants are in network byte order (the
// raw field); the parser compares host-order values.
const ETH_P_IP: u16 = u16::from_be(EtherType::Ipv4 as u16);
const ETH_P_IPV6: u16 = u16::from_be(EtherType::Ipv6 as u16);
const ETH_P_8021Q: u16 = u16::from_be(EtherType::Ieee8021q as u16);
const ETH_P_8021AD: u16 = u16::from_be(EtherType::Ieee8021ad as u16);

const NEXTHDR_HOP: u8 = IpProto::HopOpt as u8;
const NEXTHDR_ROUTING: u8 = IpProto::Ipv6Route as u8;
const NEXTHDR_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const NEXTHDR_DEST: u8 = IpProto::Ipv6Opts as u8;

// The contract's protocol numbers (pcguard-common, shared with userspace,
// which does not depend on network-types) are the same numbers.
const _: () = assert!(
    IPPROTO_ICMP == IpProto::Icmp as u8
        && IPPROTO_IGMP == IpProto::Igmp as u8
        && IPPROTO_TCP == IpProto::Tcp as u8
        && IPPROTO_UDP == IpProto::Udp as u8
        && IPPROTO_ICMPV6 == IpProto::Ipv6Icmp as u8
);

// The wire layouts the parser relies on: a network-types release that
// changed one would fail the build here, not the parse.
const _: () = assert!(
    ETH_HLEN == 14
        && offset_of!(EthHdr, ether_type) == 12
        && VLAN_HLEN == 4
        && offset_of!(VlanHdr, ether_type) == 2
        && IPV4_HLEN == 20
        && offset_of!(Ipv4Hdr, tot_len) == 2
        && offset_of!(Ipv4Hdr, frags) == 6
        && offset_of!(Ipv4Hdr, proto) == 9
        && offset_of!(Ipv4Hdr, src_addr) == 12
        && offset_of!(Ipv4Hdr, dst_addr) == 16
        && IPV6_HLEN == 40
        && offset_of!(Ipv6Hdr, payload_len) == 4
        && offset_of!(Ipv6Hdr, next_hdr) == 6
        && offset_of!(Ipv6Hdr, src_addr) == 8
        && offset_of!(Ipv6Hdr, dst_addr) == 24
        && TCP_HLEN == 20
        && TCP_DOFF == 12
        && offset_of!(TcpHdr, dest) == 2
        && UDP_HLEN == 8
        && offset_of!(UdpHdr, len) == 4
        && IPV6_FRAG_HLEN == 8
);

/// An IPv6 extension header's first two bytes, common to hop-by-hop,
/// routing and destination options (RFC 8200 section 4): network-types has
/// no extension-header structs.
#[repr(C)]
struct Ipv6ExtHdr {
    next_hdr: u8,
    /// Length in 8-byte units, not counting the first 8 bytes.
    hdr_ext_len: u8,
}

/// The IPv6 fragment header (RFC 8200 section 4.5).
#[repr(C)]
struct Ipv6FragHdr {
    next_hdr: u8,
    _reserved: u8,
    /// Offset (13 bits, 8-byte units), 2 reserved bits, the M flag.
    frag_off: [u8; 2],
    _id: [u8; 4],
}

impl Ipv6FragHdr {
    const LEN: usize = size_of::<Ipv6FragHdr>();
}

/// Byte `I` of the TCP header's data offset / flags word: network-types
/// declares the two bytes after the acknowledgment number as one bindgen
/// bitfield (`_bitfield_1`: reserved bits, data offset, flags), whose
/// accessors extract bits one field at a time.
const TCP_DOFF: usize = offset_of!(TcpHdr, _bitfield_1);
const TCP_FLAGS: usize = offset_of!(TcpHdr, _bitfield_1) + 1;

/// IPv4 fragment offset bits of `frag_off`, and the more-fragments bit.
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MF: u16 = 0x2000;
/// IPv6 fragment offset bits of the fragment header's second 16-bit word,
/// and the M (more fragments) bit.
const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;
const IPV6_MF: u16 = 0x0001;
/// A non-first TCP fragment whose offset (in 8-byte units) is below this
/// overlaps the 20-byte TCP header of the first fragment (RFC 1858 section
/// 4, RFC 3128): offsets 1 and 2.
const TCP_MIN_FRAG_OFFSET: u16 = 3;

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
    /// Frame length: counted in byte counters and events, and the bound of
    /// the IP lengths (at TC it includes the skb's non-linear part).
    pub len: u32,
    pub ifindex: u32,
}

/// What follows the IP header(s).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum L4 {
    Tcp,
    Udp,
    /// ICMP in IPv4, ICMPv6 in IPv6 (and IGMP in IPv4).
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
    /// IP protocol of the transport header (after IPv6 extension headers;
    /// for a non-first fragment, the next header of its fragment header).
    pub proto: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    pub l4: L4,
    /// UDP only (0 otherwise): offset of the UDP payload from the start of
    /// the frame, the bytes of it inside this datagram (a first fragment
    /// holds less than the whole payload), and the payload length the UDP
    /// header claims.
    pub payload_off: u16,
    pub payload_len: u16,
    pub payload_claimed: u16,
}

impl Packet {
    /// Nothing parsed yet: what [`parse_into`] fills in.
    pub const EMPTY: Self = Self {
        src: [0; 2],
        dst: [0; 2],
        sport: 0,
        dport: 0,
        family: 0,
        proto: 0,
        tcp_flags: 0,
        l4: L4::Other,
        payload_off: 0,
        payload_len: 0,
        payload_claimed: 0,
    };
}

/// What [`parse_into`] found. Small on purpose: the fields go straight
/// into the caller's [`Packet`], so every early return of the parser is a
/// constant, not a copy of the packet (which made LLVM spill the whole
/// `Packet` at every bounds check).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Parse {
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    NonIp,
    /// An IP packet; the `Packet` holds its fields.
    Ip,
    /// Truncated, inconsistent or unclassifiable headers. `keyed`: the IP
    /// addresses (and so a flow key, ports as far as they were read) are in
    /// the `Packet`.
    Malformed { kind: Malformed, keyed: bool },
}

#[inline(always)]
fn malformed(kind: Malformed, keyed: bool) -> Parse {
    Parse::Malformed { kind, keyed }
}

/// The parse of a frame as one value (host tests; the programs use
/// [`parse_into`]).
#[cfg(test)]
pub enum Parsed {
    NonIp,
    Malformed(Malformed, Option<Packet>),
    Ip(Packet),
}

#[cfg(test)]
pub fn parse(frame: &Frame) -> Parsed {
    let mut p = Packet::EMPTY;
    match parse_into(frame, &mut p) {
        Parse::NonIp => Parsed::NonIp,
        Parse::Ip => Parsed::Ip(p),
        Parse::Malformed { kind, keyed } => Parsed::Malformed(kind, keyed.then_some(p)),
    }
}

/// A header `H` in the packet (its `size_of::<H>()` bytes checked against
/// the packet's bounds).
///
/// Fields are read through the one pointer that was checked: the verifier
/// attaches the proven range to that register, so re-deriving `data + off`
/// for every field could lose it. They are read at their `offset_of!` in
/// `H` (`hdr.be16::<{ offset_of!(Ipv4Hdr, tot_len) }>()`), not through a
/// `&H` and network-types' accessors, which read multi-byte fields with
/// `read_unaligned` (split into byte loads by the BPF backend) and the TCP
/// data offset bit by bit.
struct Hdr<H>(*const u8, PhantomData<H>);

impl<H> Clone for Hdr<H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H> Copy for Hdr<H> {}

impl<H> Hdr<H> {
    /// The `T` at byte `I` (bounds checked at compile time against `H`).
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
        const { assert!(I + size_of::<T>() <= size_of::<H>()) };
        // SAFETY: `Bounds::hdr` checked that N bytes are inside the packet.
        unsafe {
            let p = self.0.add(I).cast::<T>();
            if cfg!(target_arch = "bpf") { p.read() } else { p.read_unaligned() }
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
        [if cfg!(target_endian = "little") { word } else { word << 32 }, 0]
    }

    /// An IPv6 address at byte `I`.
    #[inline(always)]
    fn v6_addr<const I: usize>(self) -> Addr {
        self.at::<I, Addr>()
    }
}

/// Packet bounds: the linear data the program can read (`data..end`), and
/// the end of the IP datagram as an offset from `data` (`ip_end`; before
/// the IP header is read, the frame length). Offsets stay small and
/// bounded (every increment is at most 2 KiB and the number of steps is
/// constant), which the verifier needs before it lets a variable offset
/// be added to a packet pointer.
#[derive(Clone, Copy)]
struct Bounds {
    data: usize,
    end: usize,
    ip_end: usize,
}

impl Bounds {
    /// The header `H` at `off`, if its bytes are inside the datagram and
    /// readable. `None` means truncated: by the datagram, or (at TC) by the
    /// linear part of the skb, which the TC program pulls and parses again.
    #[inline(always)]
    fn hdr<H>(self, off: usize) -> Option<Hdr<H>> {
        let n = size_of::<H>();
        if off + n > self.ip_end {
            return None;
        }
        let start = self.data + off;
        if start + n > self.end {
            return None;
        }
        Some(Hdr(start as *const u8, PhantomData))
    }
}

/// Parses `frame` into `p` (which starts as [`Packet::EMPTY`]).
///
/// A BPF-to-BPF call, not inlined: `p` then lives in the caller's stack
/// and every early return is just a code. Inlined, LLVM kept the packet's
/// fields in registers and, with the BPF's ten, spilled them at every
/// bounds check to feed the many exits (measured: ~10 ns per packet more
/// than the call costs).
#[inline(never)]
pub fn parse_into(frame: &Frame, p: &mut Packet) -> Parse {
    let pkt = Bounds { data: frame.data, end: frame.end, ip_end: frame.len as usize };
    let (ethertype, off) = match l2(pkt) {
        Ok((ethertype, ETH_HLEN)) => (ethertype, ETH_HLEN),
        // Tagged: at most 14 + 4 * MAX_VLAN_TAGS = 46 < 64.
        Ok((ethertype, off)) => match opaque(off, 63) {
            Some(off) => (ethertype, off),
            None => return malformed(Malformed::L2Truncated, false),
        },
        Err(m) => return malformed(m, false),
    };
    match ethertype {
        ETH_P_IP => ipv4(pkt, off, p),
        ETH_P_IPV6 => ipv6(pkt, off, p),
        _ => Parse::NonIp,
    }
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Ethernet and up to `MAX_VLAN_TAGS` VLAN tags: the inner ethertype and
/// the L3 offset. Linux strips any number of priority (VID 0) tags and
/// delivers what is inside, so a frame with more tags than are walked is
/// not passed as non-IP: it is malformed.
#[inline(always)]
fn l2(pkt: Bounds) -> Result<(u16, usize), Malformed> {
    let eth = pkt.hdr::<EthHdr>(0).ok_or(Malformed::L2Truncated)?;
    let mut ethertype = eth.be16::<{ offset_of!(EthHdr, ether_type) }>();
    let mut off = ETH_HLEN;
    // Constant trip count: LLVM unrolls it, the verifier sees straight code.
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) {
            return Ok((ethertype, off));
        }
        let tag = pkt.hdr::<VlanHdr>(off).ok_or(Malformed::L2Truncated)?;
        ethertype = tag.be16::<{ offset_of!(VlanHdr, ether_type) }>();
        off += VLAN_HLEN;
    }
    if is_vlan(ethertype) {
        return Err(Malformed::TooManyVlanTags);
    }
    Ok((ethertype, off))
}

/// `off` as a number the verifier does not know, bounded by `mask`.
///
/// Each number of VLAN tags gives the L3 offset another constant, and the
/// verifier walks everything after parsing once per constant: eight tags
/// made the programs several times larger to verify. Routed through a map
/// value (which the verifier does not track), every tagged frame shares
/// one walk. Costs a per-CPU array access, on tagged frames only.
#[inline(always)]
fn opaque(off: usize, mask: usize) -> Option<usize> {
    #[cfg(target_arch = "bpf")]
    {
        let p = crate::maps::SCRATCH.get_ptr_mut(0)?;
        // SAFETY: per-CPU map value, valid for the duration of the program.
        unsafe {
            p.write_volatile(off as u32);
            Some(p.read_volatile() as usize & mask)
        }
    }
    #[cfg(not(target_arch = "bpf"))]
    Some(off & mask)
}

/// The fixed IP header at `off` if it is inside the frame and of `version`
/// (the high nibble of the first byte, in both headers).
#[inline(always)]
fn ip_header<H>(pkt: Bounds, off: usize, version: u8) -> Option<Hdr<H>> {
    let ip = pkt.hdr::<H>(off)?;
    (ip.u8::<0>() >> 4 == version).then_some(ip)
}

#[inline(always)]
fn ipv4(pkt: Bounds, off: usize, p: &mut Packet) -> Parse {
    let Some(ip) = ip_header::<Ipv4Hdr>(pkt, off, 4) else {
        return malformed(Malformed::IpTruncated, false);
    };
    p.family = FAMILY_V4;
    p.proto = ip.u8::<{ offset_of!(Ipv4Hdr, proto) }>();
    p.src = ip.v4_addr::<{ offset_of!(Ipv4Hdr, src_addr) }>();
    p.dst = ip.v4_addr::<{ offset_of!(Ipv4Hdr, dst_addr) }>();
    let hlen = ((ip.u8::<{ offset_of!(Ipv4Hdr, vihl) }>() & 0x0f) as usize) * 4;
    let total = ip.be16::<{ offset_of!(Ipv4Hdr, tot_len) }>() as usize;
    // The kernel drops a datagram longer than the frame (ip_rcv) and trims
    // the frame to the datagram: bytes after it are not part of it.
    if off + total > pkt.ip_end {
        return malformed(Malformed::BadIpLength, true);
    }
    if hlen < IPV4_HLEN || hlen > total {
        return malformed(Malformed::BadIpHeaderLength, true);
    }
    let pkt = Bounds { ip_end: off + total, ..pkt };
    let frag = ip.be16::<{ offset_of!(Ipv4Hdr, frags) }>();
    let frag_offset = frag & IPV4_FRAG_OFFSET_MASK;
    if frag_offset != 0 {
        return later_fragment(p, frag_offset);
    }
    let fragmented = frag & IPV4_MF != 0;
    transport(pkt, off + hlen, p, IPPROTO_ICMP, fragmented)
}

/// A non-first fragment of protocol `p.proto` at `frag_offset` (8-byte
/// units). It carries no transport header and passes without policy: the
/// kernel delivers it only reassembled with a first fragment, which the
/// policy saw whole. One that would overwrite the first fragment's TCP
/// header is malformed.
#[inline(always)]
fn later_fragment(p: &mut Packet, frag_offset: u16) -> Parse {
    if p.proto == IPPROTO_TCP && frag_offset < TCP_MIN_FRAG_OFFSET {
        return malformed(Malformed::FragmentOverlap, true);
    }
    p.l4 = L4::Fragment;
    Parse::Ip
}

#[inline(always)]
fn is_ipv6_ext(nexthdr: u8) -> bool {
    matches!(nexthdr, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT)
}

#[inline(always)]
fn ipv6(pkt: Bounds, off: usize, p: &mut Packet) -> Parse {
    let Some(ip) = ip_header::<Ipv6Hdr>(pkt, off, 6) else {
        return malformed(Malformed::IpTruncated, false);
    };
    p.family = FAMILY_V6;
    p.proto = ip.u8::<{ offset_of!(Ipv6Hdr, next_hdr) }>();
    p.src = ip.v6_addr::<{ offset_of!(Ipv6Hdr, src_addr) }>();
    p.dst = ip.v6_addr::<{ offset_of!(Ipv6Hdr, dst_addr) }>();
    let payload = ip.be16::<{ offset_of!(Ipv6Hdr, payload_len) }>() as usize;
    // Payload length 0 is a jumbogram (RFC 2675), which needs a hop-by-hop
    // option this parser does not read: fail closed.
    if payload == 0 || off + IPV6_HLEN + payload > pkt.ip_end {
        return malformed(Malformed::BadIpLength, true);
    }
    let pkt = Bounds { ip_end: off + IPV6_HLEN + payload, ..pkt };
    let mut off = off + IPV6_HLEN;
    let mut fragmented = false;
    // At most MAX_IPV6_EXT_HDRS headers: a constant bound keeps the walk
    // verifiable (and `off` bounded: each step adds at most 2 KiB). Every
    // header must be inside the datagram; in a first fragment that means
    // the whole chain is in it (RFC 7112).
    for i in 0..MAX_IPV6_EXT_HDRS {
        match p.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // Hop-by-hop options only directly after the IPv6 header
                // (RFC 8200 section 4.1); Linux drops it anywhere else.
                if p.proto == NEXTHDR_HOP && i != 0 {
                    return malformed(Malformed::Ipv6HopByHopNotFirst, true);
                }
                let Some(ext) = pkt.hdr::<Ipv6ExtHdr>(off) else {
                    return malformed(Malformed::Ipv6ChainTruncated, true);
                };
                let len = (ext.u8::<{ offset_of!(Ipv6ExtHdr, hdr_ext_len) }>() as usize + 1) * 8;
                if off + len > pkt.ip_end {
                    return malformed(Malformed::Ipv6ChainTruncated, true);
                }
                p.proto = ext.u8::<{ offset_of!(Ipv6ExtHdr, next_hdr) }>();
                off += len;
            }
            NEXTHDR_FRAGMENT => {
                if fragmented {
                    return malformed(Malformed::DuplicateFragmentHeader, true);
                }
                let Some(frag) = pkt.hdr::<Ipv6FragHdr>(off) else {
                    return malformed(Malformed::Ipv6ChainTruncated, true);
                };
                p.proto = frag.u8::<{ offset_of!(Ipv6FragHdr, next_hdr) }>();
                off += IPV6_FRAG_HLEN;
                let word = frag.be16::<{ offset_of!(Ipv6FragHdr, frag_off) }>();
                let frag_offset = (word & IPV6_FRAG_OFFSET_MASK) >> 3;
                if frag_offset != 0 {
                    return later_fragment(p, frag_offset);
                }
                fragmented = word & IPV6_MF != 0;
            }
            _ => break,
        }
    }
    if is_ipv6_ext(p.proto) {
        // More extension headers than we walk: treat as invalid rather
        // than guess at what follows.
        return malformed(Malformed::Ipv6ChainTooLong, true);
    }
    transport(pkt, off, p, IPPROTO_ICMPV6, fragmented)
}

/// The transport header at `off`, inside the datagram. `icmp` is the ICMP
/// protocol number of the address family; `fragmented`: this is the first
/// fragment of a fragmented datagram (it holds part of the payload).
#[inline(always)]
fn transport(pkt: Bounds, off: usize, p: &mut Packet, icmp: u8, fragmented: bool) -> Parse {
    match p.proto {
        IPPROTO_TCP => {
            let Some(tcp) = pkt.hdr::<TcpHdr>(off) else {
                return malformed(Malformed::L4Truncated, true);
            };
            p.sport = tcp.be16::<{ offset_of!(TcpHdr, source) }>();
            p.dport = tcp.be16::<{ offset_of!(TcpHdr, dest) }>();
            p.tcp_flags = tcp.u8::<TCP_FLAGS>();
            let doff = (tcp.u8::<TCP_DOFF>() >> 4) as usize * 4;
            if doff < TCP_HLEN {
                return malformed(Malformed::BadTcpOffset, true);
            }
            // Options included: the whole header is in the datagram (a
            // first fragment that cuts it is a tiny fragment, RFC 1858).
            if off + doff > pkt.ip_end {
                return malformed(Malformed::L4Truncated, true);
            }
            p.l4 = L4::Tcp;
        }
        IPPROTO_UDP => {
            let Some(udp) = pkt.hdr::<UdpHdr>(off) else {
                return malformed(Malformed::L4Truncated, true);
            };
            p.sport = udp.be16::<{ offset_of!(UdpHdr, src) }>();
            p.dport = udp.be16::<{ offset_of!(UdpHdr, dst) }>();
            let ulen = udp.be16::<{ offset_of!(UdpHdr, len) }>() as usize;
            let in_datagram = pkt.ip_end - off;
            // Below its own header, or (unless a first fragment holds only
            // part of it) longer than the datagram: the kernel drops both.
            if ulen < UDP_HLEN || (!fragmented && ulen > in_datagram) {
                return malformed(Malformed::BadUdpLength, true);
            }
            p.l4 = L4::Udp;
            let payload_off = off + UDP_HLEN;
            // Lossless: `off` is at most a few KiB (see `Bounds`), lengths
            // are 16-bit fields.
            p.payload_off = payload_off as u16;
            p.payload_claimed = (ulen - UDP_HLEN) as u16;
            let held = in_datagram - UDP_HLEN;
            p.payload_len = if held < ulen - UDP_HLEN { held as u16 } else { (ulen - UDP_HLEN) as u16 };
        }
        proto if proto == icmp => p.l4 = L4::Icmp,
        // IPv4 multicast group management (router queries, reports) is
        // network control traffic like ICMP: dropping it makes switches and
        // routers prune the multicast that discovery protocols rely on.
        IPPROTO_IGMP if icmp == IPPROTO_ICMP => p.l4 = L4::Icmp,
        _ => {}
    }
    Parse::Ip
}

/// Differential fuzz test against the `etherparse` crate (host only).
#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    const SRC4: [u8; 4] = [10, 1, 2, 3];
    const DST4: [u8; 4] = [192, 168, 1, 10];

    fn parsed(frame: &[u8]) -> Parsed {
        let data = frame.as_ptr() as usize;
        let f = Frame { data, end: data + frame.len(), len: frame.len() as u32, ifindex: 0 };
        parse(&f)
    }

    fn ip(frame: &[u8]) -> Packet {
        match parsed(frame) {
            Parsed::Ip(p) => p,
            Parsed::Malformed(m, _) => panic!("malformed: {}", m.as_str()),
            Parsed::NonIp => panic!("non-IP"),
        }
    }

    /// The kind of a malformed frame, and whether a flow key was read.
    fn malformed(frame: &[u8]) -> (Malformed, bool) {
        match parsed(frame) {
            Parsed::Malformed(m, p) => (m, p.is_some()),
            Parsed::Ip(p) => panic!("not malformed: {:?}", p.l4),
            Parsed::NonIp => panic!("not malformed: non-IP"),
        }
    }

    // The frames: pcguard-testkit's builders, the kernel tests' and the
    // bench's too.
    use pcguard_testkit::frame as tk;

    /// Addresses of `ipv6`'s frames: 1..=16 and 0xe1..=0xf0.
    const SRC6: [u8; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
    const DST6: [u8; 16] =
        [0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee, 0xef, 0xf0];

    fn eth(tags: &[u16], ethertype: u16) -> Vec<u8> {
        tk::eth_tagged(tags, ethertype)
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        tk::tcp(sport, dport, flags)
    }

    /// IPv4 in Ethernet with `options` 4-byte words of options and `frag`
    /// as frag_off.
    fn ipv4(options: u8, frag: u16, proto: u8, l4: &[u8]) -> Vec<u8> {
        tk::Ipv4 { options, frag_off: frag, ..tk::Ipv4::new(SRC4, DST4, proto) }.frame(l4)
    }

    /// Sets the IPv4 total length of an Ethernet frame built by `ipv4`.
    fn set_total(f: Vec<u8>, total: u16) -> Vec<u8> {
        tk::set_ipv4_total(f, total)
    }

    /// IPv6 whose next-header chain is `chain` (each an extension header
    /// type, the last the transport protocol), with `l4` after it; the
    /// payload length covers the chain and `l4`.
    fn ipv6(chain: &[u8], frag_off: u16, l4: &[u8]) -> Vec<u8> {
        tk::ipv6_chain(SRC6, DST6, chain, frag_off, l4)
    }

    fn set_payload_len(f: Vec<u8>, len: u16) -> Vec<u8> {
        tk::set_ipv6_payload_len(f, len)
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
        let p = ip(&ipv4(2, 0, IPPROTO_UDP, &[0x1f, 0x90, 0x23, 0xe7, 0, 8, 0, 0]));
        assert!(p.l4 == L4::Udp);
        assert_eq!((p.sport, p.dport), (8080, 9191));
    }

    #[test]
    fn bad_ipv4_headers_are_malformed_with_a_key() {
        let mut short_ihl = ipv4(0, 0, IPPROTO_TCP, &tcp(1, 2, 0));
        short_ihl[14] = 0x44;
        assert_eq!(malformed(&short_ihl), (Malformed::BadIpHeaderLength, true));
        // Options past the total length.
        let options_past_total = set_total(ipv4(2, 0, IPPROTO_TCP, &[]), 24);
        assert_eq!(malformed(&options_past_total), (Malformed::BadIpHeaderLength, true));
        let mut version = ipv4(0, 0, IPPROTO_TCP, &tcp(1, 2, 0));
        version[14] = 0x65;
        assert_eq!(malformed(&version), (Malformed::IpTruncated, false));
        assert_eq!(malformed(&ipv4(0, 0, IPPROTO_TCP, &[])[..14 + 19]), (Malformed::IpTruncated, false));
    }

    #[test]
    fn the_ip_total_length_bounds_every_header() {
        let frame = ipv4(0, 0, IPPROTO_TCP, &tcp(40000, 22, TCP_ACK));
        // Longer than the frame: the kernel drops it.
        let long = set_total(frame.clone(), 20 + 21);
        assert_eq!(malformed(&long), (Malformed::BadIpLength, true));
        // The TCP header after the datagram's end (padding, or appended
        // bytes): never read.
        let cut = set_total(frame.clone(), 20 + 8);
        assert_eq!(malformed(&cut), (Malformed::L4Truncated, true));
        // Ethernet padding after a complete datagram is ignored.
        let mut padded = ipv4(0, 0, IPPROTO_UDP, &[0, 53, 0x23, 0xe7, 0, 8, 0, 0]);
        padded.extend([0xff; 18]);
        let p = ip(&padded);
        assert_eq!((p.dport, p.payload_len, p.payload_claimed), (9191, 0, 0));
    }

    #[test]
    fn first_fragments_hold_the_whole_transport_header() {
        // RFC 1858: a first fragment with 8 bytes of TCP header, and a
        // fake rest of the header after the datagram.
        let mut tiny = ipv4(0, IPV4_MF, IPPROTO_TCP, &tcp(40000, 22, TCP_SYN)[..8]);
        tiny.extend(&tcp(40000, 22, TCP_ACK)[8..]);
        assert_eq!(malformed(&tiny), (Malformed::L4Truncated, true));
        // TCP options cut by the fragment.
        let mut t = tcp(40000, 9191, TCP_SYN);
        t[12] = 8 << 4;
        t.extend([1, 1, 1, 1]);
        assert_eq!(malformed(&ipv4(0, IPV4_MF, IPPROTO_TCP, &t)), (Malformed::L4Truncated, true));
        t.extend([1; 8]);
        assert_eq!(ip(&ipv4(0, IPV4_MF, IPPROTO_TCP, &t)).dport, 9191);
        // A UDP first fragment holds part of the payload its header claims.
        let udp_first = ipv4(0, IPV4_MF, IPPROTO_UDP, &udp(1, 9191, 8 + 3000, &[7; 100]));
        let p = ip(&udp_first);
        assert_eq!((p.payload_len, p.payload_claimed), (100, 3000));
        // ... which an unfragmented datagram may not.
        let unfragmented = ipv4(0, 0, IPPROTO_UDP, &udp(1, 9191, 8 + 3000, &[7; 100]));
        assert_eq!(malformed(&unfragmented), (Malformed::BadUdpLength, true));
    }

    #[test]
    fn ipv4_fragments() {
        let later = ip(&ipv4(0, 185, IPPROTO_TCP, &[0; 8]));
        assert!(later.l4 == L4::Fragment && later.proto == IPPROTO_TCP);
        // More-fragments set, offset 0: the first fragment is parsed.
        let first = ip(&ipv4(0, IPV4_MF, IPPROTO_TCP, &tcp(1, 9191, TCP_SYN)));
        assert!(first.l4 == L4::Tcp && first.dport == 9191);
        // Offsets 1 and 2 overlap the TCP header (RFC 1858, RFC 3128).
        for off in [1, 2] {
            let overlap = ipv4(0, off, IPPROTO_TCP, &[0; 16]);
            assert_eq!(malformed(&overlap), (Malformed::FragmentOverlap, true));
        }
        assert!(ip(&ipv4(0, 3, IPPROTO_TCP, &[0; 8])).l4 == L4::Fragment);
        assert!(ip(&ipv4(0, 1, IPPROTO_UDP, &[0; 8])).l4 == L4::Fragment);
    }

    #[test]
    fn transport_headers() {
        let mut doff = tcp(1, 2, 0);
        doff[12] = 4 << 4;
        assert_eq!(malformed(&ipv4(0, 0, IPPROTO_TCP, &doff)), (Malformed::BadTcpOffset, true));
        assert_eq!(malformed(&ipv4(0, 0, IPPROTO_TCP, &tcp(1, 2, 0)[..19])), (Malformed::L4Truncated, true));
        assert_eq!(malformed(&ipv4(0, 0, IPPROTO_UDP, &[0; 7])), (Malformed::L4Truncated, true));
        assert_eq!(malformed(&ipv4(0, 0, IPPROTO_UDP, &udp(1, 2, 7, &[]))), (Malformed::BadUdpLength, true));
        assert!(ip(&ipv4(0, 0, IPPROTO_ICMP, &[8, 0, 0, 0])).l4 == L4::Icmp);
        assert!(ip(&ipv4(0, 0, IPPROTO_ICMPV6, &[128, 0, 0, 0])).l4 == L4::Other);
        assert!(ip(&ipv4(0, 0, IPPROTO_IGMP, &[0x16, 0, 0, 0])).l4 == L4::Icmp);
        assert!(ip(&ipv4(0, 0, 47, &[0; 4])).l4 == L4::Other);
    }

    /// A UDP header whose length field is `len`, then `payload`.
    fn udp(sport: u16, dport: u16, len: u16, payload: &[u8]) -> Vec<u8> {
        tk::udp_with_len(sport, dport, len, payload)
    }

    #[test]
    fn udp_payload_offset_and_length() {
        let dns = udp(53, 40000, 8 + 5, &[1, 2, 3, 4, 5]);
        let p = ip(&ipv4(0, 0, IPPROTO_UDP, &dns));
        assert_eq!((p.sport, p.payload_off, p.payload_len), (53, 14 + 20 + 8, 5));
        let p = ip(&ipv4(2, IPV4_MF, IPPROTO_UDP, &dns));
        assert_eq!((p.payload_off, p.payload_len), (14 + 28 + 8, 5));
        let mut tagged = eth(&[ETH_P_8021Q], ETH_P_IP);
        tagged.extend_from_slice(&ipv4(0, 0, IPPROTO_UDP, &dns)[14..]);
        assert_eq!(ip(&tagged).payload_off, 14 + 4 + 20 + 8);
        let chain = [NEXTHDR_HOP, NEXTHDR_FRAGMENT, IPPROTO_UDP];
        let p = ip(&ipv6(&chain, 1, &dns));
        assert_eq!((p.payload_off, p.payload_len), (14 + 40 + 16 + 8 + 8, 5));
        // No payload for other protocols, nor for non-first fragments.
        let t = ip(&ipv4(0, 0, IPPROTO_TCP, &tcp(53, 1, TCP_ACK)));
        assert_eq!((t.payload_off, t.payload_len), (0, 0));
        let later = ip(&ipv4(0, 185, IPPROTO_UDP, &dns));
        assert_eq!((later.payload_off, later.payload_len), (0, 0));
    }

    #[test]
    fn vlan_tags() {
        let inner = &ipv4(0, 0, IPPROTO_TCP, &tcp(1, 9191, 0))[14..];
        let mut qinq = eth(&[ETH_P_8021AD, ETH_P_8021Q], ETH_P_IP);
        qinq.extend_from_slice(inner);
        assert_eq!(ip(&qinq).dport, 9191);
        for n in 0..=MAX_VLAN_TAGS {
            let mut f = eth(&vec![ETH_P_8021Q; n], ETH_P_IP);
            f.extend_from_slice(inner);
            assert_eq!(ip(&f).dport, 9191, "{n} tags");
        }
        // One tag more than walked: not passed as non-IP.
        let mut f = eth(&[ETH_P_8021Q; MAX_VLAN_TAGS + 1], ETH_P_IP);
        f.extend_from_slice(inner);
        assert_eq!(malformed(&f), (Malformed::TooManyVlanTags, false));
        assert_eq!(malformed(&eth(&[ETH_P_8021Q], ETH_P_IP)[..16]), (Malformed::L2Truncated, false));
    }

    #[test]
    fn layer_2() {
        assert!(matches!(parsed(&eth(&[], 0x0806)), Parsed::NonIp));
        assert_eq!(malformed(&[0u8; 13]), (Malformed::L2Truncated, false));
        assert_eq!(malformed(&eth(&[], ETH_P_IP)), (Malformed::IpTruncated, false));
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
        let hop_later = [NEXTHDR_DEST, NEXTHDR_HOP, IPPROTO_TCP];
        assert_eq!(malformed(&ipv6(&hop_later, 0, &tcp(1, 2, TCP_SYN))), (Malformed::Ipv6HopByHopNotFirst, true));
    }

    #[test]
    fn ipv6_lengths_bound_the_chain() {
        let frame = ipv6(&[NEXTHDR_DEST, IPPROTO_TCP], 0, &tcp(1, 22, TCP_SYN));
        assert_eq!(malformed(&set_payload_len(frame.clone(), 0)).0, Malformed::BadIpLength);
        let payload = (frame.len() - 54) as u16;
        assert_eq!(malformed(&set_payload_len(frame.clone(), payload + 1)).0, Malformed::BadIpLength);
        // The chain ends past the payload: its next header is padding.
        assert_eq!(malformed(&set_payload_len(frame.clone(), 8)).0, Malformed::Ipv6ChainTruncated);
        assert_eq!(malformed(&set_payload_len(frame.clone(), 16 + 8)).0, Malformed::L4Truncated);
        let mut padded = frame.clone();
        padded.extend([0xee; 20]);
        assert_eq!(ip(&padded).dport, 22);
    }

    #[test]
    fn ipv6_fragments_and_limits() {
        let frag = [NEXTHDR_FRAGMENT, IPPROTO_UDP];
        let later = ip(&ipv6(&frag, 8 << 3, &[0; 8]));
        assert!(later.l4 == L4::Fragment && later.proto == IPPROTO_UDP);
        let first = ip(&ipv6(&frag, 1, &[0, 53, 0x23, 0xe7, 0, 108, 0, 0]));
        assert!(first.l4 == L4::Udp && first.dport == 9191);
        assert_eq!(first.payload_claimed, 100);
        // RFC 7112: the first fragment ends inside the chain.
        let split = [NEXTHDR_FRAGMENT, NEXTHDR_DEST, IPPROTO_UDP];
        let whole = ipv6(&split, 1, &udp(1, 7777, 8, &[]));
        assert!(ip(&whole).l4 == L4::Udp);
        let cut = set_payload_len(whole.clone(), 8 + 8);
        assert_eq!(malformed(&cut).0, Malformed::Ipv6ChainTruncated);
        let two = [NEXTHDR_FRAGMENT, NEXTHDR_FRAGMENT, IPPROTO_UDP];
        assert_eq!(malformed(&ipv6(&two, 1, &udp(1, 2, 8, &[]))).0, Malformed::DuplicateFragmentHeader);
        let tcp_overlap = ipv6(&[NEXTHDR_FRAGMENT, IPPROTO_TCP], 2 << 3, &[0; 16]);
        assert_eq!(malformed(&tcp_overlap).0, Malformed::FragmentOverlap);
        let eight = [[NEXTHDR_DEST; MAX_IPV6_EXT_HDRS].as_slice(), &[IPPROTO_TCP]].concat();
        assert!(ip(&ipv6(&eight, 0, &tcp(1, 2, 0))).l4 == L4::Tcp);
        let nine = [[NEXTHDR_DEST; MAX_IPV6_EXT_HDRS + 1].as_slice(), &[IPPROTO_TCP]].concat();
        assert_eq!(malformed(&ipv6(&nine, 0, &tcp(1, 2, 0))), (Malformed::Ipv6ChainTooLong, true));
        let mut cut = ipv6(&[NEXTHDR_HOP, IPPROTO_TCP], 0, &[]);
        cut.truncate(14 + 40 + 1);
        assert_eq!(malformed(&cut).0, Malformed::BadIpLength);
    }
}
