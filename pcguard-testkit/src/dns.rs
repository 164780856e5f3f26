//! DNS messages: real queries and responses (the lab's resolver and
//! clients), and [`filler`] messages for the kernel, which reads only a
//! message's header.

use std::net::IpAddr;

/// Query types.
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;

/// `name` in wire format: length-prefixed labels, then the root.
pub fn name(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for l in name.split('.') {
        v.push(l.len() as u8);
        v.extend(l.as_bytes());
    }
    v.push(0);
    v
}

/// A query for `name` (type 1 = A, 28 = AAAA), recursion desired.
pub fn query(id: u16, qname: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend(name(qname));
    q.extend(qtype.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    q
}

/// A response to `query(id, name, qtype)` naming `addrs` (A or AAAA
/// records by address family, owner a pointer to the question), with the
/// flags `0x8180` (QR, RD, RA, no error) unless changed by the caller.
pub fn response(id: u16, qname: &str, qtype: u16, addrs: &[(IpAddr, u32)]) -> Vec<u8> {
    let mut r = query(id, qname, qtype);
    r[2] = 0x81;
    r[3] = 0x80;
    r[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
    for (addr, ttl) in addrs {
        record(&mut r, *addr, *ttl);
    }
    r
}

/// Appends an A or AAAA record for the question's name (pointer to offset 12).
pub fn record(r: &mut Vec<u8>, addr: IpAddr, ttl: u32) {
    let (rtype, data) = match addr {
        IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
        IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
    };
    r.extend([0xc0, 12]);
    r.extend(rtype.to_be_bytes());
    r.extend(1u16.to_be_bytes());
    r.extend(ttl.to_be_bytes());
    r.extend((data.len() as u16).to_be_bytes());
    r.extend(data);
}

/// `len` bytes standing for a DNS message (the kernel reads only the
/// header's id and QR bit): a pattern that shows bytes out of place, with
/// transaction id `txid` and QR set for a response.
pub fn filler(len: usize, txid: u16, response: bool) -> Vec<u8> {
    let mut m: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    m[..2].copy_from_slice(&txid.to_be_bytes());
    m[2] = if response { m[2] | 0x80 } else { m[2] & 0x7f };
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_repeats_the_question_and_counts_its_records() {
        let q = query(0x4242, "mf.cloud.papercut.com", TYPE_A);
        assert_eq!(q.len(), 12 + 23 + 4);
        let r = response(0x4242, "mf.cloud.papercut.com", TYPE_A, &[("203.0.113.7".parse().unwrap(), 300)]);
        assert_eq!((&r[..2], r[2] & 0x80, &r[6..8]), (&q[..2], 0x80, &[0, 1][..]));
        assert_eq!(&r[12..q.len()], &q[12..]);
        assert_eq!(&r[r.len() - 4..], &[203, 0, 113, 7]);
        let f = filler(30, 0x4242, true);
        assert_eq!((f.len(), &f[..2], f[2] & 0x80), (30, &[0x42, 0x42][..], 0x80));
    }
}
