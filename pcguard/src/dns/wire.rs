//! A strict reader of DNS messages (RFC 1035 wire format), for the queries
//! this server sends and the answers its resolvers send back.
//!
//! Everything it reads comes from the network, so it refuses rather than
//! guesses: a label over 63 bytes, a '.' or NUL byte inside a label, a name
//! over 255 bytes in wire form, a compression pointer that does not point
//! strictly backwards (below where the name, or the part it jumped to,
//! started), a record cut short or with the wrong data length, a CNAME loop
//! or a chain longer than [`MAX_CNAMES`] make the whole message yield
//! nothing. Every loop is bounded by the message length and a fixed count.
//!
//! Names come out lower-cased, without the trailing dot, in presentation
//! form: bytes outside printable ASCII and `\` are written `\DDD`, and no
//! label holds a '.', so two different wire names never read as the same
//! string and a name never splits into labels other than its own.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Bytes of a DNS header: id, flags, four counts.
pub const HEADER_LEN: usize = 12;
/// Longest label (RFC 1035 section 2.3.4).
pub const MAX_LABEL: usize = 63;
/// Longest name in wire form, length bytes and the root included.
pub const MAX_NAME_WIRE: usize = 255;
/// Compression pointers followed in one name: one per label of the
/// longest name is all an encoder ever needs.
const MAX_POINTERS: usize = 128;
/// CNAMEs followed from the question to the addresses.
pub const MAX_CNAMES: usize = 8;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const CLASS_IN: u16 = 1;

/// Why a message yields nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireError {
    /// The message ends inside a field.
    Short,
    /// A label of a reserved type (0x40, 0x80), or holding '.' or NUL.
    BadLabel,
    /// A name over [`MAX_NAME_WIRE`] bytes.
    NameTooLong,
    /// A compression pointer that does not point strictly backwards, into
    /// the header, or one too many.
    BadPointer,
    /// An A record whose data is not 4 bytes, AAAA not 16, a CNAME whose
    /// target does not fill its data exactly.
    BadData,
    /// Two CNAMEs for one name, a CNAME loop, or a chain over [`MAX_CNAMES`].
    BadChain,
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
}

impl Header {
    /// The header of `msg`; `None` when it is shorter than a header.
    pub fn read(msg: &[u8]) -> Option<Self> {
        let h = msg.get(..HEADER_LEN)?;
        let word = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        Some(Self { id: word(0), flags: word(2), qdcount: word(4), ancount: word(6) })
    }

    /// QR: a response.
    pub fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    /// OPCODE (0: a standard query).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }

    /// TC: the resolver cut the answer (the client retries over TCP).
    pub fn truncated(&self) -> bool {
        self.flags & 0x0200 != 0
    }

    /// RCODE (0: no error).
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// One question: what a query asked, and what its answer repeats.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Question {
    /// Lower-cased presentation form, no trailing dot ("" is the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// One address of an answer, with the names that led to it: the question
/// first, then each CNAME target in chain order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub addr: IpAddr,
    /// Seconds: the smallest TTL along the chain ([`ttl`] applied).
    pub ttl: u32,
    pub names: Vec<String>,
}

/// RFC 2181 section 8: a TTL with the most significant bit set is 0.
pub fn ttl(raw: u32) -> u32 {
    if raw & 0x8000_0000 != 0 { 0 } else { raw }
}

/// Reads the name at `start`; returns it and the offset after it (after
/// its first pointer, if compressed).
pub fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), WireError> {
    let mut name = String::new();
    let mut wire_len = 0usize;
    let mut pos = start;
    // A pointer must point below where the current run of labels started:
    // every jump lowers this, so a name cannot revisit its own bytes.
    let mut floor = start;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *msg.get(pos).ok_or(WireError::Short)?;
        match len & 0xc0 {
            0x00 => {
                let len = usize::from(len);
                wire_len += 1 + len;
                if wire_len > MAX_NAME_WIRE {
                    return Err(WireError::NameTooLong);
                }
                if len == 0 {
                    return Ok((name, end.unwrap_or(pos + 1)));
                }
                let label = msg.get(pos + 1..pos + 1 + len).ok_or(WireError::Short)?;
                push_label(&mut name, label)?;
                pos += 1 + len;
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or(WireError::Short)?;
                let target = (usize::from(len & 0x3f) << 8) | usize::from(low);
                pointers += 1;
                if target < HEADER_LEN || target >= floor || pointers > MAX_POINTERS {
                    return Err(WireError::BadPointer);
                }
                end.get_or_insert(pos + 2);
                floor = target;
                pos = target;
            }
            _ => return Err(WireError::BadLabel),
        }
    }
}

/// Appends one label (at most 63 bytes: the length byte's top bits are
/// clear) in presentation form.
fn push_label(name: &mut String, label: &[u8]) -> Result<(), WireError> {
    debug_assert!(label.len() <= MAX_LABEL);
    if label.iter().any(|&b| b == b'.' || b == 0) {
        return Err(WireError::BadLabel);
    }
    if !name.is_empty() {
        name.push('.');
    }
    for &b in label {
        match b {
            b'\\' => name.push_str("\\092"),
            0x21..=0x7e => name.push(char::from(b.to_ascii_lowercase())),
            _ => name.push_str(&format!("\\{b:03}")),
        }
    }
    Ok(())
}

/// Reads a question at `pos`; returns it and the offset after it.
pub fn read_question(msg: &[u8], pos: usize) -> Result<(Question, usize), WireError> {
    let (name, pos) = read_name(msg, pos)?;
    let qtype = read_u16(msg, pos)?;
    let qclass = read_u16(msg, pos + 2)?;
    Ok((Question { name, qtype, qclass }, pos + 4))
}

fn read_u16(msg: &[u8], pos: usize) -> Result<u16, WireError> {
    let b = msg.get(pos..pos + 2).ok_or(WireError::Short)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn read_u32(msg: &[u8], pos: usize) -> Result<u32, WireError> {
    let b = msg.get(pos..pos + 4).ok_or(WireError::Short)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A standard query as this server sends it: QR 0, opcode 0, exactly one
/// question of class IN. Returns its transaction id and question; `None`
/// for anything else (its answer then matches no query).
pub fn parse_query(msg: &[u8]) -> Option<(u16, Question)> {
    let h = Header::read(msg)?;
    if h.is_response() || h.opcode() != 0 || h.qdcount != 1 {
        return None;
    }
    let (q, _) = read_question(msg, HEADER_LEN).ok()?;
    (q.qclass == CLASS_IN).then_some((h.id, q))
}

/// What one answer record says, as far as learning goes.
enum Data {
    Addr(IpAddr),
    Cname(String),
    Other,
}

struct Record {
    owner: String,
    rtype: u16,
    class: u16,
    ttl: u32,
    data: Data,
}

/// Reads one resource record at `pos`; returns it and the offset after it.
fn read_record(msg: &[u8], pos: usize) -> Result<(Record, usize), WireError> {
    let (owner, pos) = read_name(msg, pos)?;
    let rtype = read_u16(msg, pos)?;
    let class = read_u16(msg, pos + 2)?;
    let ttl = ttl(read_u32(msg, pos + 4)?);
    let len = usize::from(read_u16(msg, pos + 8)?);
    let start = pos + 10;
    let rdata = msg.get(start..start + len).ok_or(WireError::Short)?;
    let data = match (class, rtype) {
        (CLASS_IN, TYPE_A) => {
            Data::Addr(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(rdata).map_err(|_| WireError::BadData)?)))
        }
        (CLASS_IN, TYPE_AAAA) => {
            Data::Addr(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(rdata).map_err(|_| WireError::BadData)?)))
        }
        (CLASS_IN, TYPE_CNAME) => {
            // The target may be compressed, but it must end exactly where
            // the record's data ends.
            let (target, end) = read_name(&msg[..start + len], start).map_err(|e| match e {
                WireError::Short => WireError::BadData,
                e => e,
            })?;
            if end != start + len {
                return Err(WireError::BadData);
            }
            Data::Cname(target)
        }
        _ => Data::Other,
    };
    Ok((Record { owner, rtype, class, ttl, data }, start + len))
}

/// Reads the answer section (`ancount` records from `pos`, just after the
/// question) and returns the addresses of type `question.qtype` reached
/// from the question's name through CNAMEs.
///
/// `cut`: the copy holds only the start of the message (the kernel copies
/// at most `DNS_PAYLOAD_MAX` bytes): the records complete before the cut
/// are used. Otherwise a record running past the end is an error.
/// Records of other classes and types, and records of names off the
/// chain, are skipped.
pub fn read_answers(
    msg: &[u8],
    mut pos: usize,
    ancount: u16,
    question: &Question,
    cut: bool,
) -> Result<Vec<Resolved>, WireError> {
    let mut records = Vec::new();
    for _ in 0..ancount {
        match read_record(msg, pos) {
            Ok((r, next)) => {
                records.push(r);
                pos = next;
            }
            Err(WireError::Short) if cut => break,
            Err(e) => return Err(e),
        }
    }
    resolve(question, &records)
}

/// Follows the chain question -> CNAME -> ... and collects the addresses
/// of its last name.
fn resolve(question: &Question, records: &[Record]) -> Result<Vec<Resolved>, WireError> {
    let mut cnames: HashMap<&str, (&str, u32)> = HashMap::new();
    for r in records {
        if let Data::Cname(target) = &r.data
            && cnames.insert(&r.owner, (target, r.ttl)).is_some()
        {
            return Err(WireError::BadChain);
        }
    }
    let mut chain = vec![question.name.clone()];
    let mut chain_ttl = u32::MAX;
    while let Some(&(target, ttl)) = cnames.get(chain.last().expect("never empty").as_str()) {
        if chain.len() > MAX_CNAMES || chain.iter().any(|n| n == target) {
            return Err(WireError::BadChain);
        }
        chain.push(target.to_string());
        chain_ttl = chain_ttl.min(ttl);
    }
    let end = chain.last().expect("never empty");
    let mut out: Vec<Resolved> = Vec::new();
    for r in records.iter().filter(|r| r.class == CLASS_IN && r.rtype == question.qtype && r.owner == *end) {
        let Data::Addr(addr) = r.data else { continue };
        let ttl = chain_ttl.min(r.ttl);
        match out.iter_mut().find(|x| x.addr == addr) {
            Some(x) => x.ttl = x.ttl.max(ttl),
            None => out.push(Resolved { addr, ttl, names: chain.clone() }),
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod build {
    //! Builders of DNS messages for the tests (and the fuzzer's seeds).

    use super::*;

    pub fn name(n: &str) -> Vec<u8> {
        let mut v = Vec::new();
        if !n.is_empty() {
            for l in n.split('.') {
                v.push(l.len() as u8);
                v.extend(l.as_bytes());
            }
        }
        v.push(0);
        v
    }

    pub fn query(id: u16, qname: &str, qtype: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend(name(qname));
        m.extend(qtype.to_be_bytes());
        m.extend(CLASS_IN.to_be_bytes());
        m
    }

    /// An answer record: owner ("@" = a pointer to the question name),
    /// type, TTL, data.
    pub type Rr<'a> = (&'a str, u16, u32, Vec<u8>);

    /// A response to `query(id, qname, qtype)` with `answers`.
    pub fn response(id: u16, qname: &str, qtype: u16, answers: &[Rr]) -> Vec<u8> {
        let mut m = query(id, qname, qtype);
        m[2] = 0x81;
        m[3] = 0x80;
        m[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for (owner, t, ttl, data) in answers {
            if *owner == "@" {
                m.extend([0xc0, HEADER_LEN as u8]);
            } else {
                m.extend(name(owner));
            }
            m.extend(t.to_be_bytes());
            m.extend(CLASS_IN.to_be_bytes());
            m.extend(ttl.to_be_bytes());
            m.extend((data.len() as u16).to_be_bytes());
            m.extend(data);
        }
        m
    }

    pub fn a(addr: &str) -> Vec<u8> {
        addr.parse::<Ipv4Addr>().unwrap().octets().to_vec()
    }

    pub fn aaaa(addr: &str) -> Vec<u8> {
        addr.parse::<Ipv6Addr>().unwrap().octets().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::{build::*, *};

    /// The question and addresses of a whole response.
    fn answers(msg: &[u8]) -> Result<Vec<Resolved>, WireError> {
        let h = Header::read(msg).ok_or(WireError::Short)?;
        let (q, pos) = read_question(msg, HEADER_LEN)?;
        read_answers(msg, pos, h.ancount, &q, false)
    }

    fn addrs(r: &[Resolved]) -> Vec<String> {
        r.iter().map(|x| x.addr.to_string()).collect()
    }

    #[test]
    fn reads_a_chain_of_cnames_to_the_addresses_of_the_question_type() {
        let msg = response(
            7,
            "MF.Cloud.PaperCut.com",
            TYPE_A,
            &[
                ("@", TYPE_CNAME, 300, name("edge.example.net")),
                ("edge.example.net", TYPE_CNAME, 120, name("e1.cdn.example.net")),
                ("e1.cdn.example.net", TYPE_A, 200, a("203.0.113.7")),
                ("e1.cdn.example.net", TYPE_A, 50, a("203.0.113.8")),
                // Wrong type for an A question, a name off the chain, a
                // name in the middle of the chain: none of them counts.
                ("e1.cdn.example.net", TYPE_AAAA, 60, aaaa("2001:db8::7")),
                ("unrelated.example.org", TYPE_A, 60, a("198.51.100.1")),
                ("edge.example.net", TYPE_A, 60, a("198.51.100.2")),
            ],
        );
        let r = answers(&msg).unwrap();
        assert_eq!(addrs(&r), ["203.0.113.7", "203.0.113.8"]);
        assert_eq!(r[0].names, ["mf.cloud.papercut.com", "edge.example.net", "e1.cdn.example.net"]);
        // The smallest TTL along the chain.
        assert_eq!((r[0].ttl, r[1].ttl), (120, 50));
    }

    #[test]
    fn a_ttl_with_the_top_bit_set_is_zero() {
        assert_eq!(ttl(0x8000_0000), 0);
        assert_eq!(ttl(u32::MAX), 0);
        assert_eq!(ttl(0x7fff_ffff), 0x7fff_ffff);
        assert_eq!(ttl(300), 300);
        let msg = response(1, "a.example", TYPE_A, &[("@", TYPE_A, 0x8000_0e10, a("192.0.2.1"))]);
        assert_eq!(answers(&msg).unwrap()[0].ttl, 0);
        // Through a CNAME with such a TTL as well.
        let msg = response(
            1,
            "a.example",
            TYPE_A,
            &[("@", TYPE_CNAME, 0xffff_ffff, name("b.example")), ("b.example", TYPE_A, 600, a("192.0.2.1"))],
        );
        assert_eq!(answers(&msg).unwrap()[0].ttl, 0);
    }

    #[test]
    fn labels_holding_a_dot_or_nul_or_too_long_are_refused() {
        // One label "x.papercut" then "com": not x.papercut.com.
        let mut q = query(1, "", TYPE_A);
        q.truncate(HEADER_LEN);
        q.extend([10]);
        q.extend(b"x.papercut");
        q.extend([3]);
        q.extend(b"com");
        q.extend([0, 0, 1, 0, 1]);
        assert_eq!(read_question(&q, HEADER_LEN), Err(WireError::BadLabel));
        assert_eq!(parse_query(&q), None);
        assert_eq!(read_name(&[3, b'a', 0, b'b', 0], 0), Err(WireError::BadLabel));
        // Length bytes 0x40..0xbf are no labels (64..191 bytes, or the
        // reserved extended label types).
        for len in [64u8, 0x41, 0x80, 0xbf] {
            let mut m = vec![len];
            m.extend([b'a'; 200]);
            m.push(0);
            assert_eq!(read_name(&m, 0), Err(WireError::BadLabel), "{len:#x}");
        }
        // 63 bytes is fine.
        let mut m = vec![63];
        m.extend([b'a'; 63]);
        m.push(0);
        assert_eq!(read_name(&m, 0).unwrap().0.len(), 63);
    }

    #[test]
    fn names_over_255_wire_bytes_are_refused() {
        // 4 labels of 63 bytes = 256 bytes with the length bytes, 257 with the root.
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(read_name(&name(&long), 0), Err(WireError::NameTooLong));
        // 3 x 63 + 61 = 250 + 4 length bytes + root = 255: the longest name.
        let longest = format!("{}.{}", vec!["b".repeat(63); 3].join("."), "c".repeat(61));
        let (n, end) = read_name(&name(&longest), 0).unwrap();
        assert_eq!((n.len(), end), (253, 255));
        // The same limit holds across compression pointers.
        let mut m = query(1, &vec!["d".repeat(63); 3].join("."), TYPE_A);
        let at = m.len();
        m.extend([63]);
        m.extend([b'e'; 63]);
        m.extend([0xc0, HEADER_LEN as u8]);
        assert_eq!(read_name(&m, at), Err(WireError::NameTooLong));
    }

    #[test]
    fn odd_bytes_are_escaped_so_names_stay_distinct() {
        let m = [3, b'A', 0xff, b'\\', 3, b'c', b'o', b'm', 0];
        assert_eq!(read_name(&m, 0).unwrap().0, "a\\255\\092.com");
        let m = [2, b'a', b' ', 0];
        assert_eq!(read_name(&m, 0).unwrap().0, "a\\032");
    }

    #[test]
    fn pointers_must_point_strictly_backwards_and_outside_the_header() {
        let q = query(1, "a.example", TYPE_A);
        let end = q.len();
        // A pointer to itself, forwards, into the header.
        for target in [end, end + 2, 4] {
            let mut m = q.clone();
            m.extend([0xc0 | (target >> 8) as u8, target as u8, 0]);
            assert_eq!(read_name(&m, end), Err(WireError::BadPointer), "{target}");
        }
        // A pointer back into the name it belongs to: a loop through
        // earlier bytes ("x" then a pointer to "x").
        let mut m = q.clone();
        m.extend([1, b'x', 0xc0, end as u8]);
        assert_eq!(read_name(&m, end), Err(WireError::BadPointer));
        // Two names pointing at each other.
        let mut m = q.clone();
        let second = end + 2;
        m.extend([0xc0, second as u8, 0xc0, end as u8]);
        assert_eq!(read_name(&m, second), Err(WireError::BadPointer));
        // A backwards pointer to the question's name is fine.
        let mut m = q.clone();
        m.extend([1, b'w', 0xc0, HEADER_LEN as u8]);
        assert_eq!(read_name(&m, end), Ok(("w.a.example".to_string(), end + 4)));
        // A chain of backwards pointers, each to the one before.
        let mut m = q.clone();
        for i in 0..20 {
            let prev = if i == 0 { HEADER_LEN } else { m.len() - 2 };
            m.extend([0xc0, prev as u8]);
        }
        assert_eq!(read_name(&m, m.len() - 2).unwrap().0, "a.example");
    }

    #[test]
    fn broken_records_make_the_whole_answer_yield_nothing() {
        let good = ("@", TYPE_A, 60, a("192.0.2.1"));
        assert_eq!(answers(&response(1, "a.example", TYPE_A, std::slice::from_ref(&good))).unwrap().len(), 1);
        for bad in [
            ("@", TYPE_A, 60, vec![192, 0, 2]),
            ("@", TYPE_AAAA, 60, vec![0; 15]),
            // The CNAME target runs past its data / stops short of it.
            ("@", TYPE_CNAME, 60, name("b.example")[..4].to_vec()),
            ("@", TYPE_CNAME, 60, [name("b.example"), vec![0]].concat()),
        ] {
            let msg = response(1, "a.example", TYPE_A, &[good.clone(), bad.clone()]);
            assert_eq!(answers(&msg), Err(WireError::BadData), "{bad:?}");
        }
        // Cut inside the last record: an error, unless the copy is known to be cut.
        let msg = response(1, "a.example", TYPE_A, &[good.clone(), good.clone()]);
        assert_eq!(answers(&msg[..msg.len() - 1]), Err(WireError::Short));
        let h = Header::read(&msg).unwrap();
        let (q, pos) = read_question(&msg, HEADER_LEN).unwrap();
        assert_eq!(read_answers(&msg[..msg.len() - 1], pos, h.ancount, &q, true).unwrap().len(), 1);
        assert_eq!(answers(&msg[..5]), Err(WireError::Short));
    }

    #[test]
    fn cname_loops_forks_and_long_chains_yield_nothing() {
        let looped = response(
            1,
            "a.example",
            TYPE_A,
            &[("@", TYPE_CNAME, 60, name("b.example")), ("b.example", TYPE_CNAME, 60, name("a.example"))],
        );
        assert_eq!(answers(&looped), Err(WireError::BadChain));
        let forked = response(
            1,
            "a.example",
            TYPE_A,
            &[("@", TYPE_CNAME, 60, name("b.example")), ("@", TYPE_CNAME, 60, name("c.example"))],
        );
        assert_eq!(answers(&forked), Err(WireError::BadChain));
        let chain = |n: usize| {
            let names: Vec<String> = (0..=n).map(|i| format!("n{i}.example")).collect();
            let mut rrs: Vec<Rr> = (0..n).map(|i| (names[i].as_str(), TYPE_CNAME, 60, name(&names[i + 1]))).collect();
            rrs.push((names[n].as_str(), TYPE_A, 60, a("192.0.2.9")));
            answers(&response(1, &names[0], TYPE_A, &rrs))
        };
        assert_eq!(chain(MAX_CNAMES).unwrap()[0].names.len(), MAX_CNAMES + 1);
        assert_eq!(chain(MAX_CNAMES + 1), Err(WireError::BadChain));
    }

    #[test]
    fn queries_are_standard_queries_with_one_question_of_class_in() {
        let q = query(0x1234, "Graph.Microsoft.com", TYPE_AAAA);
        let (id, question) = parse_query(&q).unwrap();
        assert_eq!(id, 0x1234);
        assert_eq!(question, Question { name: "graph.microsoft.com".into(), qtype: TYPE_AAAA, qclass: CLASS_IN });
        let with = |i: usize, v: u8| {
            let mut m = q.clone();
            m[i] = v;
            parse_query(&m)
        };
        assert_eq!(with(2, 0x81), None, "a response");
        assert_eq!(with(2, 0x09), None, "opcode 1");
        assert_eq!(with(5, 2), None, "two questions");
        assert_eq!(with(5, 0), None, "no question");
        assert_eq!(with(q.len() - 1, 3), None, "class CH");
        assert_eq!(parse_query(&q[..q.len() - 1]), None);
    }
}
