//! Differential fuzz test of the packet parser (host only; docs/fuzzing.md,
//! "Packet parser").
//!
//! Frames of every kind the parser meets (Ethernet with 0-9 VLAN tags of
//! both TPIDs; IPv4 with options, IPv6 with extension-header chains; TCP,
//! UDP, ICMP, IGMP and other protocols; unfragmented, first, non-first and
//! atomic fragments; padding after the datagram) are built valid, then
//! mutated (bit flips, length fields, next-header values, truncation,
//! appended, inserted and deleted bytes). Each is classified by [`parse`]
//! and by a reference built from the `etherparse` crate, and:
//!
//! * pcguard must agree with the reference (family, addresses, protocol,
//!   ports, TCP flags, UDP payload bounds, non-first fragment or not), or
//!   say `Malformed` where the reference parses, for one of the reasons in
//!   [`stricter`] only. Saying `Ip` where the reference says malformed, or
//!   disagreeing on a field, fails the test with the frame in hex.
//! * Bytes after the IP datagram (its length field) never change the
//!   verdict: the frame trimmed to the datagram, and the datagram with other
//!   bytes after it, parse the same ([`check_trailer`]).
//! * No read outside the frame: every frame is parsed again ending right
//!   before a `PROT_NONE` page and starting right after one; and a frame
//!   with bytes after its datagram is parsed with only the datagram mapped,
//!   the claimed rest of the frame in the guard page ([`Guarded`]). A read
//!   there crashes the test process with the frame in hex.
//!
//! The reference is `etherparse` layer by layer (`Ethernet2Slice`,
//! `SingleVlanSlice`, `Ipv4Slice`, `Ipv6Slice`, `TcpSlice`, `UdpSlice`,
//! the pieces `SlicedPacket::from_ethernet` is made of), because
//! `SlicedPacket` itself stops after 3 VLAN tags and does not slice the
//! transport header of a first fragment; where `SlicedPacket`'s own
//! conventions apply, the composition is checked against it
//! ([`check_against_sliced_packet`]). Where etherparse's conventions differ
//! from what the kernel, and so pcguard, does, the frame is translated
//! before the reference sees it; each translation is documented where it
//! is made ([`reference`], [`ipv6_stop`]).
//!
//! `PCGUARD_FUZZ_ITERS` (default 100,000), `PCGUARD_FUZZ_SEED` and
//! `PCGUARD_FUZZ_THREADS` set the run; frame `i` of a run depends only on
//! the seed and `i`.

use std::{cell::Cell, fmt::Write as _, sync::OnceLock};

use etherparse::{
    EtherType, Ethernet2Slice, Ipv4Slice, Ipv6ExtensionSlice, Ipv6FragmentHeaderSlice, Ipv6HeaderSlice,
    Ipv6RawExtHeaderSlice, Ipv6Slice, SingleVlanSlice, SlicedPacket, TcpSlice, TransportSlice, UdpHeaderSlice,
    UdpSlice, err,
};

use super::*;

const DEFAULT_ITERS: u64 = 100_000;
const DEFAULT_SEED: u64 = 0x7063_6775_6172_6431; // "pcguard1"
/// Below this many frames a run is too short to be expected to reach every
/// verdict, and [`Stats::check_coverage`] is skipped.
const COVERAGE_MIN_ITERS: u64 = 50_000;
/// Failures printed in full (the count of all of them is reported).
const MAX_REPORTED: usize = 20;

const IPPROTO_AH: u8 = 51;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_NONE: u8 = 59;
/// What the reference is told a header pcguard does not walk is followed
/// by: reserved (IANA), neither an extension header nor a transport etherparse
/// knows, so etherparse stops there.
const OPAQUE: u8 = 255;

// ---------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------

/// xorshift64*, seeded through splitmix64: frame `i` of seed `s` is the same
/// on every machine and run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(z | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// An index into `weights`, with probability proportional to its weight.
    fn weighted(&mut self, weights: &[usize]) -> usize {
        let mut x = self.below(weights.iter().sum());
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        unreachable!()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    /// `lo..=hi` random bytes.
    fn bytes_in(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.range(lo, hi);
        self.bytes(n)
    }
}

// ---------------------------------------------------------------------------
// Frame generator
// ---------------------------------------------------------------------------

/// Fields the mutator aims at (length fields, protocol numbers, ...).
#[derive(Clone, Copy, PartialEq, Debug)]
enum FieldKind {
    /// A TPID or the ethertype (16 bits).
    EtherType,
    /// IPv4 version and IHL.
    Ipv4VersionIhl,
    Ipv4TotalLen,
    /// IPv4 flags and fragment offset.
    Ipv4Frag,
    /// The first byte of the IPv6 header (version, traffic class).
    Ipv6Version,
    Ipv6PayloadLen,
    /// An IPv4 protocol, IPv6 next header or extension header next header.
    NextHeader,
    /// An IPv6 extension header length (8-byte units) or AH length (4-byte
    /// units).
    ExtLen,
    /// The offset / flags word of an IPv6 fragment header.
    Ipv6FragWord,
    /// TCP data offset (high nibble) and reserved bits.
    TcpDataOffset,
    TcpFlags,
    UdpLen,
}

#[derive(Clone, Copy, Debug)]
struct Field {
    off: usize,
    kind: FieldKind,
}

#[derive(Default)]
struct Built {
    frame: Vec<u8>,
    fields: Vec<Field>,
}

impl Built {
    fn mark(&mut self, kind: FieldKind) {
        self.fields.push(Field { off: self.frame.len(), kind });
    }

    fn put(&mut self, bytes: &[u8]) {
        self.frame.extend_from_slice(bytes);
    }

    fn put16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.frame[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// How the datagram is fragmented.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Frag {
    None,
    /// Offset 0, more fragments.
    First,
    /// A non-zero offset (8-byte units).
    Later(u16),
    /// IPv4: DF, no offset. IPv6: a fragment header with offset 0 and no M
    /// flag (RFC 6946).
    Atomic,
}

/// Protocol numbers worth putting in next-header fields: the transports
/// pcguard reads, IPv6 extension headers (walked or not), and others.
const PROTOS: [u8; 20] = [
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_IGMP,
    NEXTHDR_HOP,
    NEXTHDR_ROUTING,
    NEXTHDR_FRAGMENT,
    NEXTHDR_DEST,
    IPPROTO_AH,
    IPPROTO_ESP,
    IPPROTO_NONE,
    4,   // IPv4 in IP
    41,  // IPv6 in IP
    47,  // GRE
    132, // SCTP
    135, // mobility header (an extension header etherparse does not walk)
    139, // HIP
    253, // experimental
    255,
];

fn port(rng: &mut Rng) -> u16 {
    if rng.chance(50) { rng.pick(&[0, 1, 22, 53, 80, 443, 9191, 40000, 65535]) } else { rng.u16() }
}

fn gen_frame(rng: &mut Rng) -> Built {
    let mut b = Built::default();
    if rng.chance(3) {
        // Noise, sometimes with an IP ethertype.
        b.frame = rng.bytes_in(0, 128);
        if b.frame.len() > 14 && rng.chance(50) {
            let et: u16 = rng.pick(&[ETH_P_IP, ETH_P_IPV6]);
            b.set16(12, et);
            if rng.chance(50) {
                b.frame[14] = if et == ETH_P_IP { 0x45 } else { 0x60 };
            }
        }
        return b;
    }
    let mac = rng.bytes(12);
    b.put(&mac);
    let tags = rng.weighted(&[40, 15, 10, 5, 4, 4, 4, 4, 8, 6]);
    for _ in 0..tags {
        b.mark(FieldKind::EtherType);
        let tpid = rng.pick(&[ETH_P_8021Q, ETH_P_8021AD]);
        b.put16(tpid);
        let tci = rng.u16();
        b.put16(tci);
    }
    b.mark(FieldKind::EtherType);
    match rng.weighted(&[45, 45, 10]) {
        0 => {
            b.put16(ETH_P_IP);
            gen_ipv4(rng, &mut b);
        }
        1 => {
            b.put16(ETH_P_IPV6);
            gen_ipv6(rng, &mut b);
        }
        _ => {
            // ARP, LLDP, old QinQ, MACsec, MPLS, anything.
            let any = rng.u16();
            let et = rng.pick(&[0x0806, 0x88cc, 0x9100, 0x88e5, 0x8847, any]);
            b.put16(et);
            let body = rng.bytes_in(0, 63);
            b.put(&body);
        }
    }
    // Bytes after the datagram: Ethernet padding to 60 bytes, or anything.
    match rng.weighted(&[70, 15, 15]) {
        0 => {}
        1 => {
            while b.frame.len() < 60 {
                b.frame.push(0);
            }
        }
        _ => {
            let extra = rng.bytes_in(1, 40);
            b.put(&extra);
        }
    }
    b
}

fn gen_frag(rng: &mut Rng) -> Frag {
    match rng.weighted(&[55, 18, 17, 10]) {
        0 => Frag::None,
        1 => Frag::First,
        2 => Frag::Later(if rng.chance(50) { rng.range(1, 4) as u16 } else { rng.range(1, 0x1fff) as u16 }),
        _ => Frag::Atomic,
    }
}

fn gen_proto(rng: &mut Rng, icmp: u8) -> u8 {
    match rng.weighted(&[35, 30, 8, 3, 24]) {
        0 => IPPROTO_TCP,
        1 => IPPROTO_UDP,
        2 => icmp,
        3 => IPPROTO_IGMP,
        _ => {
            if rng.chance(80) {
                rng.pick(&PROTOS)
            } else {
                rng.u8()
            }
        }
    }
}

/// The transport header and payload of `proto` at the end of `b`. A later
/// fragment carries arbitrary data; a first fragment sometimes ends inside
/// its transport header (a tiny fragment).
fn gen_l4(rng: &mut Rng, b: &mut Built, proto: u8, frag: Frag) {
    let start = b.frame.len();
    if let Frag::Later(_) = frag {
        let data = rng.bytes_in(0, 64);
        b.put(&data);
        return;
    }
    match proto {
        IPPROTO_TCP => {
            let (sport, dport) = (port(rng), port(rng));
            b.put16(sport);
            b.put16(dport);
            let seq = rng.bytes(8);
            b.put(&seq);
            let words = if rng.chance(70) { 5 } else { rng.range(6, 15) };
            b.mark(FieldKind::TcpDataOffset);
            b.put(&[(words as u8) << 4]);
            b.mark(FieldKind::TcpFlags);
            let flags = if rng.chance(70) {
                rng.pick(&[TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST])
            } else {
                rng.u8()
            };
            b.put(&[flags]);
            let rest = rng.bytes(6 + (words - 5) * 4);
            b.put(&rest);
            let payload = rng.bytes_in(0, 40);
            b.put(&payload);
        }
        IPPROTO_UDP => {
            let (sport, dport) = (port(rng), port(rng));
            b.put16(sport);
            b.put16(dport);
            let n = rng.below(41);
            let len = match rng.weighted(&[85, 5, 10]) {
                0 if frag == Frag::First => 8 + n + rng.below(3000),
                0 => 8 + n,
                1 => rng.below(8),
                _ => rng.u16() as usize,
            };
            b.mark(FieldKind::UdpLen);
            b.put16(len as u16);
            let csum = rng.u16();
            b.put16(csum);
            let payload = rng.bytes(n);
            b.put(&payload);
        }
        _ => {
            // ICMP, IGMP, anything: sometimes shorter than an ICMP header.
            let body = if rng.chance(85) { rng.bytes_in(8, 48) } else { rng.bytes_in(0, 7) };
            b.put(&body);
        }
    }
    if frag == Frag::First && rng.chance(25) {
        let keep = start + rng.below(b.frame.len() - start + 1);
        b.frame.truncate(keep);
        b.fields.retain(|f| f.off + 2 <= keep);
    }
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn gen_ipv4(rng: &mut Rng, b: &mut Built) {
    let start = b.frame.len();
    let options = if rng.chance(75) { 0 } else { rng.range(1, 10) };
    b.mark(FieldKind::Ipv4VersionIhl);
    b.put(&[0x45 + options as u8, rng.u8()]);
    b.mark(FieldKind::Ipv4TotalLen);
    b.put16(0);
    let id = rng.u16();
    b.put16(id);
    let frag = gen_frag(rng);
    let df = if rng.chance(50) { 0x4000 } else { 0 };
    let word = match frag {
        Frag::None => df,
        Frag::First => IPV4_MF,
        Frag::Later(off) => off | if rng.chance(50) { IPV4_MF } else { 0 },
        Frag::Atomic => 0x4000,
    };
    b.mark(FieldKind::Ipv4Frag);
    b.put16(word);
    let proto = gen_proto(rng, IPPROTO_ICMP);
    b.put(&[rng.u8()]);
    b.mark(FieldKind::NextHeader);
    b.put(&[proto, 0, 0]);
    let addrs = rng.bytes(8);
    b.put(&addrs);
    let opts = rng.bytes(options * 4);
    b.put(&opts);
    let csum = checksum(&b.frame[start..]);
    b.set16(start + 10, csum);
    gen_l4(rng, b, proto, frag);
    let total = (b.frame.len() - start) as u16;
    b.set16(start + 2, total);
}

/// Length of an IPv6 extension header, as the `hdrlen` byte: mostly small,
/// sometimes up to the 2 KiB maximum.
fn ext_len(rng: &mut Rng) -> u8 {
    match rng.weighted(&[70, 20, 8, 2]) {
        0 => 0,
        1 => rng.range(1, 3) as u8,
        2 => rng.range(4, 31) as u8,
        _ => rng.u8(),
    }
}

fn gen_ipv6(rng: &mut Rng, b: &mut Built) {
    let start = b.frame.len();
    let frag = gen_frag(rng);
    let proto = gen_proto(rng, IPPROTO_ICMPV6);
    // The chain: extension header types, then `proto`.
    let mut chain: Vec<u8> = Vec::new();
    let n = match rng.weighted(&[45, 35, 15, 5]) {
        0 => 0,
        1 => rng.range(1, 3),
        2 => rng.range(4, 8),
        _ => rng.range(9, 10),
    };
    for i in 0..n {
        let t = match rng.weighted(&[10, 35, 30, 10, 5, 5, 5]) {
            // Hop-by-hop belongs first; elsewhere is a test of the rule.
            0 if i == 0 || rng.chance(20) => NEXTHDR_HOP,
            0 | 1 => NEXTHDR_DEST,
            2 => NEXTHDR_ROUTING,
            3 => NEXTHDR_FRAGMENT,
            4 => IPPROTO_AH,
            5 => NEXTHDR_HOP,
            _ => rng.pick(&[135, 139, 140, 253]),
        };
        chain.push(t);
    }
    if frag != Frag::None && !chain.contains(&NEXTHDR_FRAGMENT) {
        let at = rng.below(chain.len() + 1);
        chain.insert(at, NEXTHDR_FRAGMENT);
    }
    chain.push(proto);

    b.mark(FieldKind::Ipv6Version);
    b.put(&[0x60 | (rng.u8() & 0x0f), rng.u8(), rng.u8(), rng.u8()]);
    b.mark(FieldKind::Ipv6PayloadLen);
    b.put16(0);
    b.mark(FieldKind::NextHeader);
    b.put(&[chain[0], rng.u8()]);
    let addrs = rng.bytes(32);
    b.put(&addrs);
    // The headers up to the first one neither parser walks (135, 139, ...:
    // its bytes are the "transport"), then the transport.
    let mut transport = proto;
    for w in chain.windows(2) {
        let (t, next) = (w[0], w[1]);
        match t {
            NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING => {
                b.mark(FieldKind::NextHeader);
                b.put(&[next]);
                b.mark(FieldKind::ExtLen);
                let len = ext_len(rng);
                b.put(&[len]);
                let body = rng.bytes((len as usize + 1) * 8 - 2);
                b.put(&body);
            }
            NEXTHDR_FRAGMENT => {
                b.mark(FieldKind::NextHeader);
                b.put(&[next, rng.u8()]);
                let word = match frag {
                    Frag::First => 1,
                    Frag::Later(off) => (off << 3) | rng.below(2) as u16,
                    // Atomic, or a second fragment header in the chain.
                    _ => 0,
                } | (rng.below(4) as u16) << 1;
                b.mark(FieldKind::Ipv6FragWord);
                b.put16(word);
                let id = rng.bytes(4);
                b.put(&id);
            }
            IPPROTO_AH => {
                // Length in 4-byte units, minus 2.
                b.mark(FieldKind::NextHeader);
                b.put(&[next]);
                b.mark(FieldKind::ExtLen);
                let enc = rng.range(1, 6) as u8;
                b.put(&[enc]);
                let body = rng.bytes((enc as usize + 2) * 4 - 2);
                b.put(&body);
            }
            _ => {
                transport = t;
                break;
            }
        }
    }
    gen_l4(rng, b, transport, frag);
    let payload = (b.frame.len() - start - IPV6_HLEN) as u16;
    b.set16(start + 4, payload);
}

// ---------------------------------------------------------------------------
// Mutator
// ---------------------------------------------------------------------------

fn mutate_len(rng: &mut Rng, v: u16) -> u16 {
    match rng.below(6) {
        0 => v.wrapping_add(rng.range(1, 9) as u16),
        1 => v.wrapping_sub(rng.range(1, 9) as u16),
        2 => 0,
        3 => 0xffff,
        4 => v / 2,
        _ => rng.u16(),
    }
}

fn mutate_field(rng: &mut Rng, b: &mut Built, f: Field) {
    let others: Vec<usize> = b
        .fields
        .iter()
        .filter(|g| g.kind == FieldKind::NextHeader && g.off != f.off && g.off < b.frame.len())
        .map(|g| g.off)
        .collect();
    let fr = &mut b.frame;
    let get16 = |fr: &[u8]| u16::from_be_bytes([fr[f.off], fr[f.off + 1]]);
    let v16 = if f.off + 2 <= fr.len() { get16(fr) } else { 0 };
    let new16 = |rng: &mut Rng| -> Option<u16> {
        Some(match f.kind {
            FieldKind::EtherType => {
                let any = rng.u16();
                rng.pick(&[ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, 0x9100, 0x0806, 0x88e5, any])
            }
            FieldKind::Ipv4TotalLen | FieldKind::Ipv6PayloadLen | FieldKind::UdpLen => mutate_len(rng, v16),
            FieldKind::Ipv4Frag => match rng.below(5) {
                0 => v16 ^ IPV4_MF,
                1 => (v16 & !IPV4_FRAG_OFFSET_MASK) | rng.range(1, 3) as u16,
                2 => v16 & !IPV4_FRAG_OFFSET_MASK,
                3 => 0,
                _ => rng.u16(),
            },
            FieldKind::Ipv6FragWord => match rng.below(5) {
                0 => v16 ^ IPV6_MF,
                1 => (v16 & !IPV6_FRAG_OFFSET_MASK) | (rng.range(1, 3) as u16) << 3,
                2 => v16 & !IPV6_FRAG_OFFSET_MASK,
                3 => 0,
                _ => rng.u16(),
            },
            _ => return None,
        })
    };
    if let Some(v) = new16(rng) {
        if f.off + 2 <= fr.len() {
            fr[f.off..f.off + 2].copy_from_slice(&v.to_be_bytes());
        }
        return;
    }
    if f.off >= fr.len() {
        return;
    }
    let old = fr[f.off];
    fr[f.off] = match f.kind {
        FieldKind::Ipv4VersionIhl | FieldKind::Ipv6Version => match rng.below(3) {
            0 => (old & 0xf0) | rng.below(16) as u8,
            1 => (rng.pick(&[4u8, 6, 0, 15]) << 4) | (old & 0x0f),
            _ => rng.u8(),
        },
        FieldKind::NextHeader => {
            // Swap with another next-header field, or a protocol of note.
            if !others.is_empty() && rng.chance(30) {
                let o = rng.pick(&others);
                let v = fr[o];
                fr[o] = old;
                v
            } else if rng.chance(80) {
                rng.pick(&PROTOS)
            } else {
                rng.u8()
            }
        }
        FieldKind::ExtLen => match rng.below(3) {
            0 => old.wrapping_add(1),
            1 => old.wrapping_sub(1),
            _ => rng.u8(),
        },
        FieldKind::TcpDataOffset => ((rng.below(16) as u8) << 4) | (old & 0x0f),
        FieldKind::TcpFlags => rng.u8(),
        _ => unreachable!(),
    };
}

/// 0 to 4 mutations. Field mutations first: the positions recorded for
/// them hold until bytes are inserted or deleted.
fn mutate(rng: &mut Rng, b: &mut Built) {
    let n = rng.weighted(&[30, 35, 20, 10, 5]);
    let mut ops: Vec<usize> = (0..n).map(|_| rng.weighted(&[45, 20, 8, 10, 5, 6, 6])).collect();
    ops.sort_unstable();
    for op in ops {
        let len = b.frame.len();
        match op {
            0 if !b.fields.is_empty() => {
                let f = rng.pick(&b.fields);
                mutate_field(rng, b, f);
            }
            // A bit flip, mostly in the headers.
            0 | 1 if len > 0 => {
                let at = if rng.chance(70) { rng.below(len.min(120)) } else { rng.below(len) };
                b.frame[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let at = rng.below(len);
                let any = rng.u8();
                b.frame[at] = rng.pick(&[0, 0xff, 0x80, 0x45, 0x60, any]);
            }
            3 => {
                let keep = if rng.chance(50) { len.saturating_sub(rng.range(1, 16)) } else { rng.below(len + 1) };
                b.frame.truncate(keep);
            }
            4 => {
                let extra = rng.bytes_in(1, 64);
                b.put(&extra);
            }
            5 => {
                let at = rng.below(len + 1);
                let ins = rng.bytes_in(1, 8);
                b.frame.splice(at..at, ins);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = rng.range(1, 8).min(len - at);
                b.frame.drain(at..at + n);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// pcguard's verdict, comparable
// ---------------------------------------------------------------------------

/// Every field of a [`Packet`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Key {
    family: u8,
    proto: u8,
    l4: L4,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    payload_off: u16,
    payload_len: u16,
    payload_claimed: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

impl From<&Packet> for Key {
    fn from(p: &Packet) -> Self {
        Key {
            family: p.family,
            proto: p.proto,
            l4: p.l4,
            sport: p.sport,
            dport: p.dport,
            tcp_flags: p.tcp_flags,
            payload_off: p.payload_off,
            payload_len: p.payload_len,
            payload_claimed: p.payload_claimed,
            src: addr_bytes(p.src),
            dst: addr_bytes(p.dst),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    NonIp,
    Malformed(Malformed, Option<Key>),
    Ip(Key),
}

impl From<Parsed> for Verdict {
    fn from(p: Parsed) -> Self {
        match p {
            Parsed::NonIp => Verdict::NonIp,
            Parsed::Malformed(m, p) => Verdict::Malformed(m, p.as_ref().map(Key::from)),
            Parsed::Ip(p) => Verdict::Ip(Key::from(&p)),
        }
    }
}

/// `parse` of a frame of `len` bytes at `data` whose first `linear` bytes
/// are said to be readable (at TC, the skb's linear part; of those, only
/// the mapped ones are).
fn parse_at(data: *const u8, linear: usize, len: usize) -> Verdict {
    let data = data as usize;
    Verdict::from(parse(&Frame { data, end: data + linear, len: len as u32, ifindex: 0 }))
}

fn pcguard(frame: &[u8]) -> Verdict {
    parse_at(frame.as_ptr(), frame.len(), frame.len())
}

// ---------------------------------------------------------------------------
// The reference
// ---------------------------------------------------------------------------

/// What follows the IP header(s), as the reference sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RefL4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
        /// Offset of the payload in the frame, its bytes in this datagram,
        /// and the length the header claims.
        payload_off: usize,
        held: usize,
        claimed: usize,
    },
    /// ICMP (IPv4), ICMPv6 (IPv6), IGMP (IPv4): protocols of which pcguard
    /// reads no field.
    Icmp,
    /// Any other protocol.
    Other,
    /// A non-first fragment at this offset (8-byte units).
    Fragment {
        offset: u16,
    },
    /// A first fragment that does not hold its whole TCP header (options
    /// included) or its 8-byte UDP header. etherparse has no verdict on it:
    /// it never slices the transport header of a fragment, and reassembly
    /// could complete it.
    TinyFirstFragment,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct RefPacket {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    /// The transport protocol: the last next header etherparse reads, or
    /// for a header pcguard does not walk (AH; what follows a non-first
    /// IPv6 fragment header), the protocol number that names it.
    proto: u8,
    l4: RefL4,
    /// Offset 0 with more fragments to come (and not a non-first fragment).
    first_fragment: bool,
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum RefVerdict {
    NonIp,
    Malformed(String),
    Ip(RefPacket),
}

/// The reference's verdict, and the facts [`stricter`] needs.
#[derive(Clone, Debug)]
struct Ref {
    verdict: RefVerdict,
    /// VLAN tags before the inner ethertype.
    vlan_tags: usize,
    /// Family and addresses, when the fixed IP header is readable.
    addrs: Option<(u8, [u8; 16], [u8; 16])>,
    /// Where the IP datagram ends in the frame by its length field (at least
    /// the end of the fixed header, which pcguard reads before checking the
    /// length), when the fixed header is readable and of its ethertype's
    /// version.
    datagram_end: Option<usize>,
    /// IPv6 payload length 0.
    jumbogram: bool,
    /// IPv6 extension headers of the kinds pcguard walks (hop-by-hop,
    /// routing, destination options, fragment), up to where it stops.
    ext_headers: usize,
    /// IPv6 fragment headers among them.
    frag_headers: usize,
    /// UDP length field 0.
    udp_len_zero: bool,
    /// `verdict` came from etherparse's own composition of the layers
    /// ([`check_against_sliced_packet`] applies).
    plain: bool,
}

impl Ref {
    fn new() -> Self {
        Ref {
            verdict: RefVerdict::NonIp,
            vlan_tags: 0,
            addrs: None,
            datagram_end: None,
            jumbogram: false,
            ext_headers: 0,
            frag_headers: 0,
            udp_len_zero: false,
            plain: true,
        }
    }

    fn malformed(mut self, why: impl std::fmt::Display) -> Self {
        self.verdict = RefVerdict::Malformed(why.to_string());
        self
    }
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut x = [0; 16];
    x[..4].copy_from_slice(&a);
    x
}

/// Offset of `inner` (a subslice of `outer`) in `outer`.
fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

/// etherparse's verdict on `frame`, translated to the kernel's (and so
/// pcguard's) conventions where they differ:
///
/// * VLAN tags: etherparse's `SlicedPacket` stops after 3 link extensions
///   (returning the rest unparsed); Linux strips any number. The tags are
///   walked here one by one with `SingleVlanSlice`, without limit (pcguard
///   stops at [`MAX_VLAN_TAGS`]: see [`stricter`]).
/// * etherparse also walks 0x9100 (old QinQ) tags and MACsec headers;
///   Linux delivers neither to IP from the device pcguard is attached to
///   (only 802.1Q 0x8100 and 802.1ad 0x88a8 are VLAN protocols to it), so
///   for the reference, as for pcguard, an inner ethertype other than IPv4
///   or IPv6 is not IP.
/// * IPv4 AH: etherparse walks it as an extension header; to pcguard (and
///   to the kernel's IP layer) it is a transport protocol with no ports,
///   classified by its number. The reference is given the datagram with
///   protocol [`OPAQUE`] instead of 51, and the protocol compared is 51.
///   IPv6 likewise, see [`ipv6_stop`].
/// * ICMP, ICMPv6, IGMP: etherparse rejects a message shorter than its
///   header (and parses ICMP in IPv6 and ICMPv6 in IPv4 too); pcguard reads
///   no byte of these headers (only the protocol number, which decides), so
///   their length cannot change what it does, and the kernel's ICMP and
///   IGMP handlers drop a short one themselves. The reference does not
///   slice them: they are [`RefL4::Icmp`] or [`RefL4::Other`] by family
///   and protocol.
/// * First fragments: etherparse slices no transport header in a fragment.
///   The reference slices the first fragment's with `TcpSlice` /
///   `UdpHeaderSlice` (a UDP length beyond the fragment is expected there:
///   the rest is in later fragments); one not complete in the fragment is
///   [`RefL4::TinyFirstFragment`].
fn reference(frame: &[u8]) -> Ref {
    let r = Ref::new();
    let eth = match Ethernet2Slice::from_slice_without_fcs(frame) {
        Ok(e) => e,
        Err(e) => return r.malformed(format!("ethernet: {e}")),
    };
    let mut r = r;
    let mut inner = eth.payload();
    while matches!(inner.ether_type, EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING) {
        match SingleVlanSlice::from_slice(inner.payload) {
            Ok(tag) => {
                inner = tag.payload();
                r.vlan_tags += 1;
            }
            Err(e) => {
                let n = r.vlan_tags + 1;
                return r.malformed(format!("vlan tag {n}: {e}"));
            }
        }
    }
    let off = offset_in(frame, inner.payload);
    match inner.ether_type {
        EtherType::IPV4 => ref_ipv4(frame, off, r),
        EtherType::IPV6 => ref_ipv6(frame, off, r),
        _ => r,
    }
}

fn ref_ipv4(frame: &[u8], off: usize, mut r: Ref) -> Ref {
    let data = &frame[off..];
    if data.len() >= IPV4_HLEN && data[0] >> 4 == 4 {
        let total = u16::from_be_bytes([data[2], data[3]]) as usize;
        r.datagram_end = Some(off + total.max(IPV4_HLEN));
        // For the flow key of a malformed packet: the addresses are at fixed
        // offsets of the fixed header, which pcguard reads before it checks
        // the IHL and lengths; etherparse's header slice refuses the whole
        // header when its IHL is below 5 or its options are cut.
        let addr = |at: usize| v4(data[at..at + 4].try_into().unwrap());
        r.addrs = Some((FAMILY_V4, addr(12), addr(16)));
    }
    let ah = data.get(9) == Some(&IPPROTO_AH);
    let patched;
    let view = if ah {
        let mut v = data.to_vec();
        v[9] = OPAQUE;
        patched = v;
        r.plain = false;
        &patched[..]
    } else {
        data
    };
    let ip = match Ipv4Slice::from_slice(view) {
        Ok(ip) => ip,
        Err(e) => return r.malformed(format!("ipv4: {e}")),
    };
    let h = ip.header();
    let (src, dst) = (v4(h.source()), v4(h.destination()));
    let proto = if ah { IPPROTO_AH } else { h.protocol().0 };
    let offset = h.fragments_offset().value();
    let payload = ip.payload().payload;
    let first_fragment = offset == 0 && h.more_fragments();
    if first_fragment {
        r.plain = false;
    }
    let l4 = if offset != 0 {
        Ok(RefL4::Fragment { offset })
    } else {
        let at = off + offset_in(view, payload);
        transport(&mut r, FAMILY_V4, proto, payload, at, first_fragment)
    };
    match l4 {
        Ok(l4) => {
            r.verdict = RefVerdict::Ip(RefPacket { family: FAMILY_V4, src, dst, proto, l4, first_fragment });
            r
        }
        Err(e) => r.malformed(e),
    }
}

/// Where pcguard stops walking an IPv6 chain before its end, and etherparse
/// would go on.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// An AH header, named by the next-header byte at `at` (of the IPv6
    /// header or of the header before it): etherparse walks AH as an
    /// extension header; pcguard classifies the packet as protocol 51 (no
    /// ports), as the kernel's IP layer hands AH to its xfrm handler.
    Ah { at: usize },
    /// A fragment header with a non-zero offset at `at`: what follows it is
    /// fragment data, not headers. etherparse walks on through it (a
    /// destination-options "header" made of payload bytes can make it
    /// report an error); pcguard stops with its next header as the
    /// protocol.
    Later { at: usize, proto: u8 },
}

/// The first [`Stop`] in the IPv6 datagram `data` (its 40-byte header
/// readable), walking the chain with etherparse's header slices. (Not by
/// iterating the headers `Ipv6ExtensionsSlice::from_slice_lax` walked:
/// when that walk ends in an error, etherparse 0.21's iterator reads past
/// the walked part, an unchecked out-of-bounds access.)
fn ipv6_stop(data: &[u8], h: &Ipv6HeaderSlice) -> Option<Stop> {
    let payload_len = h.payload_length() as usize;
    let end = if payload_len == 0 { data.len() } else { (IPV6_HLEN + payload_len).min(data.len()) };
    let mut next = h.next_header().0;
    // The byte naming the current header, and where that header starts.
    let (mut at, mut off) = (6, IPV6_HLEN);
    // Each step reads at least 8 bytes, so this ends.
    while off < end {
        let rest = &data[off..end];
        match next {
            IPPROTO_AH => return Some(Stop::Ah { at }),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = Ipv6RawExtHeaderSlice::from_slice(rest).ok()?;
                (at, next, off) = (off, ext.next_header().0, off + ext.slice().len());
            }
            NEXTHDR_FRAGMENT => {
                let f = Ipv6FragmentHeaderSlice::from_slice(rest).ok()?;
                if f.fragment_offset().value() != 0 {
                    return Some(Stop::Later { at: off, proto: f.next_header().0 });
                }
                (at, next, off) = (off, f.next_header().0, off + f.slice().len());
            }
            _ => return None,
        }
    }
    (next == IPPROTO_AH).then_some(Stop::Ah { at })
}

fn ref_ipv6(frame: &[u8], off: usize, mut r: Ref) -> Ref {
    let data = &frame[off..];
    let h = match Ipv6HeaderSlice::from_slice(data) {
        Ok(h) => h,
        Err(e) => return r.malformed(format!("ipv6: {e}")),
    };
    let (src, dst) = (h.source(), h.destination());
    r.addrs = Some((FAMILY_V6, src, dst));
    r.datagram_end = Some(off + IPV6_HLEN + h.payload_length() as usize);
    // etherparse reads payload length 0 as a jumbogram whose datagram is
    // the rest of the frame (see `stricter`).
    r.jumbogram = h.payload_length() == 0;
    let stop = ipv6_stop(data, &h);
    let mut view = data.to_vec();
    let mut proto = None;
    match stop {
        Some(Stop::Ah { at }) => {
            view[at] = OPAQUE;
            proto = Some(IPPROTO_AH);
        }
        Some(Stop::Later { at, proto: p }) => {
            view[at] = OPAQUE;
            proto = Some(p);
        }
        None => {}
    }
    r.plain = stop.is_none();
    let ip = match Ipv6Slice::from_slice(&view) {
        Ok(ip) => ip,
        Err(e) => return r.malformed(format!("ipv6: {e}")),
    };
    let mut first = false;
    let mut later = None;
    for ext in ip.extensions().clone() {
        r.ext_headers += 1;
        if let Ipv6ExtensionSlice::Fragment(f) = ext {
            r.frag_headers += 1;
            let offset = f.fragment_offset().value();
            if offset != 0 {
                later = Some(offset);
            } else if f.more_fragments() {
                first = true;
            }
        }
    }
    let first_fragment = first && later.is_none();
    if first_fragment {
        r.plain = false;
    }
    let payload = ip.payload().payload;
    let proto = proto.unwrap_or(ip.payload().ip_number.0);
    let l4 = match later {
        Some(offset) => Ok(RefL4::Fragment { offset }),
        None => {
            let at = off + offset_in(&view, payload);
            transport(&mut r, FAMILY_V6, proto, payload, at, first_fragment)
        }
    };
    match l4 {
        Ok(l4) => {
            r.verdict = RefVerdict::Ip(RefPacket { family: FAMILY_V6, src, dst, proto, l4, first_fragment });
            r
        }
        Err(e) => r.malformed(e),
    }
}

/// The transport header of `proto` in `payload` (the datagram's, or the
/// first fragment's), at `payload_off` in the frame.
fn transport(
    r: &mut Ref,
    family: u8,
    proto: u8,
    payload: &[u8],
    payload_off: usize,
    first_fragment: bool,
) -> Result<RefL4, String> {
    match proto {
        IPPROTO_TCP => match TcpSlice::from_slice(payload) {
            Ok(t) => Ok(RefL4::Tcp { sport: t.source_port(), dport: t.destination_port(), flags: tcp_flags(&t) }),
            Err(err::tcp::HeaderSliceError::Len(_)) if first_fragment => Ok(RefL4::TinyFirstFragment),
            Err(e) => Err(format!("tcp: {e}")),
        },
        IPPROTO_UDP if first_fragment => match UdpHeaderSlice::from_slice(payload) {
            Err(_) => Ok(RefL4::TinyFirstFragment),
            Ok(u) => {
                // `UdpSlice`'s rules without its length-vs-slice check.
                let len = u.length() as usize;
                if len == 0 {
                    r.udp_len_zero = true;
                } else if len < 8 {
                    return Err(format!("udp: length {len} below its header"));
                }
                let claimed = len.saturating_sub(8);
                Ok(RefL4::Udp {
                    sport: u.source_port(),
                    dport: u.destination_port(),
                    payload_off: payload_off + 8,
                    held: (payload.len() - 8).min(claimed),
                    claimed,
                })
            }
        },
        IPPROTO_UDP => match UdpSlice::from_slice(payload) {
            Ok(u) => {
                r.udp_len_zero = u.length() == 0;
                Ok(RefL4::Udp {
                    sport: u.source_port(),
                    dport: u.destination_port(),
                    payload_off: payload_off + 8,
                    held: u.payload().len(),
                    claimed: u.payload().len(),
                })
            }
            Err(e) => Err(format!("udp: {e}")),
        },
        IPPROTO_ICMP | IPPROTO_IGMP if family == FAMILY_V4 => Ok(RefL4::Icmp),
        IPPROTO_ICMPV6 if family == FAMILY_V6 => Ok(RefL4::Icmp),
        _ => Ok(RefL4::Other),
    }
}

fn tcp_flags(t: &TcpSlice) -> u8 {
    [t.fin(), t.syn(), t.rst(), t.psh(), t.ack(), t.urg(), t.ece(), t.cwr()]
        .iter()
        .enumerate()
        .map(|(i, &set)| (set as u8) << i)
        .sum()
}

/// The harness's layer-by-layer composition must say what etherparse's own
/// `SlicedPacket` says, where `SlicedPacket`'s conventions are the
/// reference's: at most 3 VLAN tags, no AH, no fragment, TCP or UDP.
fn check_against_sliced_packet(frame: &[u8], r: &Ref) -> Result<(), String> {
    if !r.plain || r.vlan_tags > SlicedPacket::LINK_EXTS_CAP {
        return Ok(());
    }
    let sliced = SlicedPacket::from_ethernet(frame);
    match (&r.verdict, &sliced) {
        (RefVerdict::Ip(p), Ok(s)) => match (p.l4, &s.transport) {
            (RefL4::Tcp { sport, dport, .. }, Some(TransportSlice::Tcp(t)))
                if (t.source_port(), t.destination_port()) == (sport, dport) =>
            {
                Ok(())
            }
            (RefL4::Udp { sport, dport, .. }, Some(TransportSlice::Udp(u)))
                if (u.source_port(), u.destination_port()) == (sport, dport) =>
            {
                Ok(())
            }
            (RefL4::Tcp { .. } | RefL4::Udp { .. }, _) => Err(format!("SlicedPacket disagrees: {:?}", s.transport)),
            _ => Ok(()),
        },
        (RefVerdict::Ip(p), Err(e)) if matches!(p.l4, RefL4::Tcp { .. } | RefL4::Udp { .. }) => {
            Err(format!("SlicedPacket says malformed: {e}"))
        }
        (RefVerdict::Malformed(_), Ok(s)) if s.net.is_some() => {
            Err(format!("SlicedPacket parses it: {:?}", s.transport))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------

/// Why pcguard may say malformed where the reference parses: the classes
/// of verdicts in which pcguard is stricter than etherparse, each for a
/// reason. `None`: no such reason applies, and the verdict is a
/// disagreement.
fn stricter(kind: Malformed, r: &Ref) -> Option<&'static str> {
    let l4 = match &r.verdict {
        RefVerdict::Ip(p) => Some((p.proto, p.l4)),
        _ => None,
    };
    match kind {
        // The VLAN walk is constant-bounded for the verifier; a frame with
        // more tags is not passed as non-IP (Linux would strip them all and
        // deliver what is inside).
        Malformed::TooManyVlanTags if r.vlan_tags > MAX_VLAN_TAGS => Some("more than 8 VLAN tags"),
        // etherparse takes payload length 0 as a jumbogram and the rest of
        // the frame as its datagram; its real length is in a hop-by-hop
        // option (RFC 2675) pcguard does not read: it fails closed.
        Malformed::BadIpLength if r.jumbogram => Some("IPv6 jumbogram (payload length 0)"),
        // Same bound as VLAN tags, for the extension-header walk;
        // etherparse walks any number.
        Malformed::Ipv6ChainTooLong if r.ext_headers > MAX_IPV6_EXT_HDRS => Some("more than 8 IPv6 extension headers"),
        // RFC 8200 section 4.1: each extension header at most once (but
        // destination options); etherparse accepts several fragment headers.
        Malformed::DuplicateFragmentHeader if r.frag_headers >= 2 => Some("two IPv6 fragment headers"),
        // RFC 1858 / RFC 3128: a first fragment too small to hold the whole
        // TCP header (or the UDP header) could have its ports or flags
        // rewritten by an overlapping later fragment; etherparse has no
        // verdict on a fragment's transport.
        Malformed::L4Truncated if matches!(l4, Some((_, RefL4::TinyFirstFragment))) => {
            Some("tiny first fragment (RFC 1858)")
        }
        // RFC 1858 / RFC 3128: a TCP fragment at offset 8 or 16 bytes
        // overlaps the first fragment's TCP header.
        Malformed::FragmentOverlap if matches!(l4, Some((IPPROTO_TCP, RefL4::Fragment { offset: 1 | 2 }))) => {
            Some("TCP fragment overlapping the TCP header (RFC 1858)")
        }
        // etherparse reads UDP length 0 as "the rest of the datagram" (the
        // jumbogram convention of RFC 2675); without jumbograms it is below
        // the 8-byte minimum of RFC 768, and Linux drops it.
        Malformed::BadUdpLength if r.udp_len_zero => Some("UDP length 0"),
        _ => None,
    }
}

/// How a frame's verdicts compared, for the statistics.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
enum Outcome {
    NonIp,
    BothMalformed,
    Agree(&'static str),
    Stricter(&'static str),
}

fn l4_name(l4: RefL4, first_fragment: bool) -> &'static str {
    match (l4, first_fragment) {
        (RefL4::Tcp { .. }, false) => "tcp",
        (RefL4::Tcp { .. }, true) => "tcp first fragment",
        (RefL4::Udp { .. }, false) => "udp",
        (RefL4::Udp { .. }, true) => "udp first fragment",
        (RefL4::Icmp, _) => "icmp/igmp",
        (RefL4::Other, _) => "other protocol",
        (RefL4::Fragment { .. }, _) => "non-first fragment",
        (RefL4::TinyFirstFragment, _) => "tiny first fragment",
    }
}

/// pcguard's verdict against the reference's.
fn compare(got: &Verdict, r: &Ref) -> Result<Outcome, String> {
    // A flow key read from a malformed packet holds the packet's addresses.
    if let Verdict::Malformed(_, Some(k)) = got {
        match r.addrs {
            Some((family, src, dst)) if (k.family, k.src, k.dst) == (family, src, dst) => {}
            Some(_) => {
                return Err("the flow key of the malformed packet has other addresses".into());
            }
            None => return Err("a flow key from an IP header the reference cannot read".into()),
        }
    }
    match (got, &r.verdict) {
        (Verdict::NonIp, RefVerdict::NonIp) => Ok(Outcome::NonIp),
        (Verdict::NonIp, _) => Err("pcguard passes as non-IP a frame the reference parses as IP".into()),
        (Verdict::Malformed(..), RefVerdict::Malformed(_)) => Ok(Outcome::BothMalformed),
        (Verdict::Malformed(kind, _), _) => match stricter(*kind, r) {
            Some(class) => Ok(Outcome::Stricter(class)),
            None => Err(format!("pcguard says malformed ({}) for no accepted reason", kind.as_str())),
        },
        (Verdict::Ip(_), RefVerdict::NonIp) => Err("pcguard parses as IP a non-IP frame".into()),
        (Verdict::Ip(_), RefVerdict::Malformed(_)) => {
            Err("LESS STRICT: pcguard passes as IP a packet the reference finds malformed".into())
        }
        (Verdict::Ip(k), RefVerdict::Ip(p)) => compare_ip(k, p),
    }
}

fn compare_ip(k: &Key, p: &RefPacket) -> Result<Outcome, String> {
    let mut diffs = Vec::new();
    if (k.family, k.src, k.dst) != (p.family, p.src, p.dst) {
        diffs.push("family or addresses");
    }
    if k.proto != p.proto {
        diffs.push("protocol");
    }
    // Fields pcguard fills for TCP only, UDP only.
    let (ports, flags) = ((k.sport, k.dport), k.tcp_flags);
    let payload = (k.payload_off as usize, k.payload_len as usize, k.payload_claimed as usize);
    let no_payload = payload == (0, 0, 0);
    match p.l4 {
        RefL4::Tcp { sport, dport, flags: f } => {
            if k.l4 != L4::Tcp {
                diffs.push("transport");
            }
            if ports != (sport, dport) {
                diffs.push("ports");
            }
            if flags != f {
                diffs.push("TCP flags");
            }
            if !no_payload {
                diffs.push("UDP payload of a TCP packet");
            }
        }
        RefL4::Udp { sport, dport, payload_off, held, claimed } => {
            if k.l4 != L4::Udp {
                diffs.push("transport");
            }
            if ports != (sport, dport) {
                diffs.push("ports");
            }
            if flags != 0 {
                diffs.push("TCP flags of a UDP packet");
            }
            if payload != (payload_off, held, claimed) {
                diffs.push("UDP payload offset or lengths");
            }
        }
        RefL4::TinyFirstFragment => {
            diffs.push("LESS STRICT: pcguard reads a transport header the first fragment does not hold")
        }
        l4 => {
            let want = match l4 {
                RefL4::Icmp => L4::Icmp,
                RefL4::Other => L4::Other,
                _ => L4::Fragment,
            };
            if k.l4 != want {
                diffs.push("transport or fragment status");
            }
            if ports != (0, 0) || flags != 0 || !no_payload {
                diffs.push("ports, flags or payload of a packet without them");
            }
        }
    }
    if diffs.is_empty() {
        Ok(Outcome::Agree(l4_name(p.l4, p.first_fragment)))
    } else {
        Err(format!("fields differ: {}", diffs.join(", ")))
    }
}

// ---------------------------------------------------------------------------
// Reads outside the datagram
// ---------------------------------------------------------------------------

/// Bytes after the datagram (by its length field) do not change the
/// verdict: the frame trimmed to the datagram, and the datagram followed by
/// other bytes, parse as the frame does.
fn check_trailer(rng: &mut Rng, frame: &[u8], r: &Ref, got: &Verdict) -> Result<(), String> {
    let Some(end) = r.datagram_end.filter(|&e| e <= frame.len()) else {
        return Ok(());
    };
    let trimmed = &frame[..end];
    let v = pcguard(trimmed);
    if v != *got {
        return Err(format!("trimmed to the datagram ({end} bytes): {v:?}"));
    }
    let mut other = trimmed.to_vec();
    if end < frame.len() && rng.chance(50) {
        // The same number of bytes, changed.
        other.extend(frame[end..].iter().map(|b| b ^ (1 + rng.below(255)) as u8));
    } else {
        other.extend(rng.bytes_in(1, 64));
    }
    let v = pcguard(&other);
    if v != *got {
        return Err(format!("other bytes after the datagram ({}): {v:?}", hex(&other[end..])));
    }
    Ok(())
}

/// Readable pages with a `PROT_NONE` page on each side, for parsing a frame
/// that ends right before, or starts right after, memory that cannot be
/// read. A read there raises SIGSEGV, which [`on_segv`] reports.
struct Guarded {
    base: *mut u8,
    page: usize,
    /// Readable bytes, between the two guard pages.
    size: usize,
}

const GUARDED_SIZE: usize = 128 * 1024;

thread_local! {
    /// The frame being parsed next to a guard page: start and length.
    static GUARDED_FRAME: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// SIGSEGV handler installed before the first guarded parse, and the one it
/// replaced.
static PREVIOUS_SEGV: OnceLock<libc::sigaction> = OnceLock::new();

/// Exit code of a process whose parser read a guard page.
const GUARD_HIT_EXIT: i32 = 86;

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let (start, len) = GUARDED_FRAME.with(|c| c.get());
    if len != 0 {
        // Only async-signal-safe calls: write(2) and _exit(2). The frame's
        // bytes are readable (only the guard pages are not).
        // SAFETY: write(2) of a valid slice to stderr.
        let say = |s: &[u8]| unsafe {
            libc::write(2, s.as_ptr().cast(), s.len());
        };
        say(b"\nparse fuzz: parse() read a guard page (outside the frame, the datagram or the linear part). Frame hex:\n");
        let digits = b"0123456789abcdef";
        let mut buf = [0u8; 128];
        let mut i = 0;
        while i < len {
            let mut n = 0;
            while n < buf.len() && i < len {
                // SAFETY: inside the frame, which is mapped readable.
                let b = unsafe { *((start + i) as *const u8) };
                buf[n] = digits[(b >> 4) as usize];
                buf[n + 1] = digits[(b & 15) as usize];
                n += 2;
                i += 1;
            }
            say(&buf[..n]);
        }
        say(b"\n");
        // SAFETY: _exit(2) has no preconditions.
        unsafe { libc::_exit(GUARD_HIT_EXIT) };
    }
    // Not ours (a stack overflow in another test, a bug): put the previous
    // handler back and let the fault happen again under it.
    let _ = (sig, info, ctx);
    match PREVIOUS_SEGV.get() {
        // SAFETY: `prev` is the sigaction the kernel gave back when this
        // handler was installed.
        Some(prev) => unsafe { libc::sigaction(libc::SIGSEGV, prev, std::ptr::null_mut()) },
        // SAFETY: a null action only reads the current one.
        None => unsafe { libc::sigaction(libc::SIGSEGV, std::ptr::null(), std::ptr::null_mut()) },
    };
}

fn install_segv_handler() {
    // SAFETY: a plain sigaction call with a zeroed, then filled, struct.
    PREVIOUS_SEGV.get_or_init(|| unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGSEGV, &sa, &mut old), 0);
        old
    });
}

impl Guarded {
    fn new() -> Self {
        install_segv_handler();
        // SAFETY: sysconf and an anonymous private mapping; the guard pages
        // are made PROT_NONE before any use.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let total = GUARDED_SIZE + 2 * page;
            let base = libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(base, libc::MAP_FAILED, "mmap");
            let base = base.cast::<u8>();
            assert_eq!(libc::mprotect(base.cast(), page, libc::PROT_NONE), 0);
            assert_eq!(libc::mprotect(base.add(page + GUARDED_SIZE).cast(), page, libc::PROT_NONE), 0);
            Guarded { base, page, size: GUARDED_SIZE }
        }
    }

    /// Copies `bytes` to end right before the upper guard page (`at_end`)
    /// or to start right after the lower one, and returns where.
    fn place(&mut self, bytes: &[u8], at_end: bool) -> *const u8 {
        assert!(bytes.len() <= self.size);
        let off = if at_end { self.size - bytes.len() } else { 0 };
        // SAFETY: inside the readable, writable part of the mapping.
        unsafe {
            let p = self.base.add(self.page + off);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            p
        }
    }

    /// [`parse_at`] of a frame whose first `bytes` are placed against a
    /// guard page: the frame's other bytes, if any, are in it.
    fn parse(&mut self, bytes: &[u8], linear: usize, len: usize, at_end: bool) -> Verdict {
        let p = self.place(bytes, at_end);
        GUARDED_FRAME.with(|c| c.set((p as usize, bytes.len())));
        let v = parse_at(p, linear, len);
        GUARDED_FRAME.with(|c| c.set((0, 0)));
        v
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), self.size + 2 * self.page) };
    }
}

/// The frame parsed against both guard pages gives the same verdict; with
/// bytes after its datagram, it does when only the datagram is readable
/// (the frame still claiming the rest).
///
/// And with a linear part of `k` random bytes (at TC, headers can straddle
/// the end of the skb's head; the program pulls and parses again when the
/// verdict is malformed): nothing past the `k` bytes is read, and the
/// verdict is the whole frame's, or malformed.
fn check_guarded(rng: &mut Rng, g: &mut Guarded, frame: &[u8], r: &Ref, got: &Verdict) -> Result<(), String> {
    let len = frame.len();
    if len > g.size {
        return Ok(());
    }
    for at_end in [true, false] {
        let v = g.parse(frame, len, len, at_end);
        if v != *got {
            return Err(format!("next to a guard page: {v:?}"));
        }
    }
    if let Some(end) = r.datagram_end.filter(|&e| e < len) {
        let v = g.parse(&frame[..end], len, len, true);
        if v != *got {
            return Err(format!("with only the datagram readable: {v:?}"));
        }
    }
    let k = rng.below(len + 1);
    let v = g.parse(&frame[..k], k, len, true);
    if v != *got && !matches!(v, Verdict::Malformed(..)) {
        return Err(format!("with a linear part of {k} bytes: {v:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[derive(Default)]
struct Stats {
    frames: u64,
    outcomes: std::collections::BTreeMap<Outcome, u64>,
    /// pcguard's malformed verdicts by kind.
    kinds: std::collections::BTreeMap<&'static str, u64>,
    failures: u64,
    reports: Vec<String>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.frames += other.frames;
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        for (k, v) in other.kinds {
            *self.kinds.entry(k).or_default() += v;
        }
        self.failures += other.failures;
        for r in other.reports {
            if self.reports.len() < MAX_REPORTED {
                self.reports.push(r);
            }
        }
    }

    fn fail(&mut self, report: String) {
        self.failures += 1;
        if self.reports.len() < MAX_REPORTED {
            self.reports.push(report);
        }
    }

    fn summary(&self) -> String {
        let mut s = format!("{} frames\n", self.frames);
        for (k, v) in &self.outcomes {
            let _ = writeln!(s, "  {v:>10}  {k:?}");
        }
        s.push_str("  pcguard malformed kinds:\n");
        for (k, v) in &self.kinds {
            let _ = writeln!(s, "  {v:>10}  {k}");
        }
        s
    }

    /// The generator reaches every verdict the comparison distinguishes:
    /// a generator that stopped producing some kind of frame would let the
    /// test pass without testing it.
    fn check_coverage(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        for m in Malformed::ALL {
            if !self.kinds.contains_key(m.as_str()) {
                missing.push(format!("malformed {}", m.as_str()));
            }
        }
        let agree = [
            "tcp",
            "tcp first fragment",
            "udp",
            "udp first fragment",
            "icmp/igmp",
            "other protocol",
            "non-first fragment",
        ];
        for a in agree {
            if !self.outcomes.contains_key(&Outcome::Agree(a)) {
                missing.push(format!("agreement on {a}"));
            }
        }
        let stricter = [
            "more than 8 VLAN tags",
            "IPv6 jumbogram (payload length 0)",
            "more than 8 IPv6 extension headers",
            "two IPv6 fragment headers",
            "tiny first fragment (RFC 1858)",
            "TCP fragment overlapping the TCP header (RFC 1858)",
            "UDP length 0",
        ];
        for s in stricter {
            if !self.outcomes.contains_key(&Outcome::Stricter(s)) {
                missing.push(format!("stricter: {s}"));
            }
        }
        for o in [Outcome::NonIp, Outcome::BothMalformed] {
            if !self.outcomes.contains_key(&o) {
                missing.push(format!("{o:?}"));
            }
        }
        if missing.is_empty() { Ok(()) } else { Err(format!("never reached: {}", missing.join("; "))) }
    }
}

/// Every check on one frame; `Err` describes the first that failed.
fn check_frame(rng: &mut Rng, g: &mut Guarded, frame: &[u8], stats: &mut Stats) -> Result<(), String> {
    let got = pcguard(frame);
    let r = reference(frame);
    if let Verdict::Malformed(m, _) = got {
        *stats.kinds.entry(m.as_str()).or_default() += 1;
    }
    check_against_sliced_packet(frame, &r).map_err(|e| format!("harness: {e}"))?;
    let outcome = compare(&got, &r)?;
    *stats.outcomes.entry(outcome).or_default() += 1;
    check_trailer(rng, frame, &r, &got)?;
    check_guarded(rng, g, frame, &r, &got)
}

fn run(seed: u64, from: u64, to: u64) -> Stats {
    let mut stats = Stats::default();
    let mut g = Guarded::new();
    for i in from..to {
        let mut rng = Rng::new(seed, i);
        let mut b = gen_frame(&mut rng);
        mutate(&mut rng, &mut b);
        stats.frames += 1;
        // A panic (an arithmetic overflow in `parse`, in this debug build)
        // is a failure of this frame like any other.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_frame(&mut rng, &mut g, &b.frame, &mut stats)
        }));
        let why = match checked {
            Ok(Ok(())) => continue,
            Ok(Err(why)) => why,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("?");
                stats.fail(format!(
                    "frame {i} (PCGUARD_FUZZ_SEED={seed:#x}): panicked: {msg}\n  frame ({} bytes): {}",
                    b.frame.len(),
                    hex(&b.frame),
                ));
                continue;
            }
        };
        stats.fail(format!(
            "frame {i} (PCGUARD_FUZZ_SEED={seed:#x}): {why}\n  frame ({} bytes): {}\n  pcguard:    {:?}\n  etherparse: {:?}",
            b.frame.len(),
            hex(&b.frame),
            pcguard(&b.frame),
            reference(&b.frame).verdict,
        ));
    }
    stats
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim().replace('_', "");
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        }
        Err(_) => default,
    }
}

/// The fuzz run: `PCGUARD_FUZZ_ITERS` frames of seed `PCGUARD_FUZZ_SEED`
/// on `PCGUARD_FUZZ_THREADS` threads (default: the available cores).
#[test]
fn parse_agrees_with_etherparse() {
    let iters = env_u64("PCGUARD_FUZZ_ITERS", DEFAULT_ITERS);
    let seed = env_u64("PCGUARD_FUZZ_SEED", DEFAULT_SEED);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let threads = env_u64("PCGUARD_FUZZ_THREADS", cores).clamp(1, 64);
    let started = std::time::Instant::now();
    let mut stats = Stats::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (from, to) = (iters * t / threads, iters * (t + 1) / threads);
                s.spawn(move || run(seed, from, to))
            })
            .collect();
        for w in workers {
            stats.merge(w.join().expect("fuzz worker panicked"));
        }
    });
    println!("parse fuzz: seed {seed:#x}, {:.1} s\n{}", started.elapsed().as_secs_f64(), stats.summary());
    assert!(
        stats.failures == 0,
        "{} of {} frames failed; the first {}:\n\n{}",
        stats.failures,
        stats.frames,
        stats.reports.len(),
        stats.reports.join("\n\n")
    );
    if iters >= COVERAGE_MIN_ITERS
        && let Err(e) = stats.check_coverage()
    {
        panic!("{e}\n{}", stats.summary());
    }
}

// ---------------------------------------------------------------------------
// Tests of the harness: it can tell a disagreement
// ---------------------------------------------------------------------------

fn frame_of(hexstr: &str) -> Vec<u8> {
    (0..hexstr.len()).step_by(2).map(|i| u8::from_str_radix(&hexstr[i..i + 2], 16).unwrap()).collect()
}

/// Ethernet, IPv4, TCP 40000 -> 22 SYN.
const TCP_SYN_FRAME: &str = concat!(
    "000000000000000000000000",
    "0800",
    "45000028000000004006000a0a0102030a010204",
    "9c40001600000000000000005002000000000000"
);

#[test]
fn the_comparison_catches_disagreements() {
    let frame = frame_of(TCP_SYN_FRAME);
    let r = reference(&frame);
    let good = pcguard(&frame);
    assert_eq!(compare(&good, &r), Ok(Outcome::Agree("tcp")));
    let Verdict::Ip(k) = good else { panic!("{good:?}") };
    // Each field pcguard reports, wrong.
    let wrong = [
        Key { dport: 23, ..k },
        Key { sport: 1, ..k },
        Key { tcp_flags: TCP_ACK, ..k },
        Key { proto: IPPROTO_UDP, ..k },
        Key { l4: L4::Fragment, ..k },
        Key { family: FAMILY_V6, ..k },
        Key { payload_len: 3, ..k },
        Key { src: [9; 16], ..k },
    ];
    for w in wrong {
        assert!(compare(&Verdict::Ip(w), &r).is_err(), "{w:?}");
    }
    // Malformed for no reason, and non-IP.
    assert!(compare(&Verdict::Malformed(Malformed::L4Truncated, Some(k)), &r).is_err());
    assert!(compare(&Verdict::NonIp, &r).is_err());
    // IP where the reference finds the packet malformed: TCP data offset 4.
    let mut bad = frame.clone();
    bad[14 + 20 + 12] = 0x40;
    assert!(matches!(reference(&bad).verdict, RefVerdict::Malformed(_)));
    assert!(compare(&Verdict::Ip(k), &reference(&bad)).is_err());
}

#[test]
fn the_reference_knows_the_stricter_classes() {
    // A first fragment holding 8 bytes of the TCP header: no verdict from
    // etherparse, L4Truncated from pcguard, accepted as RFC 1858.
    let mut tiny = frame_of(TCP_SYN_FRAME);
    tiny.truncate(14 + 20 + 8);
    tiny[14 + 3] = 28; // total length
    tiny[14 + 6] = 0x20; // MF
    let r = reference(&tiny);
    assert!(matches!(r.verdict, RefVerdict::Ip(RefPacket { l4: RefL4::TinyFirstFragment, .. })));
    let got = pcguard(&tiny);
    assert_eq!(compare(&got, &r), Ok(Outcome::Stricter("tiny first fragment (RFC 1858)")));
    // Unfragmented, the same datagram is malformed for both.
    tiny[14 + 6] = 0;
    assert_eq!(compare(&pcguard(&tiny), &reference(&tiny)), Ok(Outcome::BothMalformed));
}

#[test]
fn ipv6_stops_are_translated() {
    // IPv6, fragment header at offset 16 bytes (non-first) naming
    // destination options, then bytes that are not a valid header: pcguard
    // sees a non-first fragment of protocol 60, and so must the reference.
    let mut f = frame_of("00000000000000000000000086dd");
    f.extend([0x60, 0, 0, 0, 0, 16, NEXTHDR_FRAGMENT, 64]);
    f.extend([1u8; 32]);
    f.extend([NEXTHDR_DEST, 0, 0, 2 << 3, 0, 0, 0, 1]);
    f.extend([6, 200, 0, 0, 0, 0, 0, 0]);
    let r = reference(&f);
    assert!(
        matches!(r.verdict, RefVerdict::Ip(RefPacket { proto: NEXTHDR_DEST, l4: RefL4::Fragment { offset: 2 }, .. })),
        "{r:?}"
    );
    assert_eq!(compare(&pcguard(&f), &r), Ok(Outcome::Agree("non-first fragment")));
}

/// A read past the frame's end is caught: a child process reads the byte
/// after a frame placed against the guard page and exits through the
/// SIGSEGV handler with its code.
#[test]
fn the_guard_page_catches_a_read_past_the_frame() {
    let mut g = Guarded::new();
    let frame = frame_of(TCP_SYN_FRAME);
    // SAFETY: fork in a test process; the child only reads memory and
    // exits (the read faults into the handler, which calls _exit).
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // Quiet: the handler's report is expected here.
            libc::close(2);
            let p = g.place(&frame, true);
            GUARDED_FRAME.with(|c| c.set((p as usize, frame.len())));
            let past = std::ptr::read_volatile(p.add(frame.len()));
            libc::_exit(past as i32 & 1);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), GUARD_HIT_EXIT);
    }
    // And the frame itself reads fine there.
    assert_eq!(g.parse(&frame, frame.len(), frame.len(), true), pcguard(&frame));
}
