//! Binds answers to queries. The kernel copies each query this server
//! sends to a resolver and the one answer per (flow, transaction id) it
//! lets through, in the order it saw them; this table remembers the
//! outstanding queries and accepts an answer only when it answers one of
//! them exactly: same resolver, server port and transaction id, a
//! standard response (QR 1, opcode 0) not cut by the resolver (TC 0),
//! without error (RCODE 0), repeating the query's one question (name
//! case-insensitive, type, class). The query is consumed by its first
//! answer, whatever that answer says, like the kernel's pending entry.
//!
//! A spoofed answer therefore has to guess the port and the transaction id
//! of a query in flight (the kernel already drops the wrong ones) and its
//! question; what it can still teach is limited by the learner
//! (`super::learner`).

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use pcguard_common::{DNS_KIND_ANSWER, DNS_KIND_QUERY, DNS_PAYLOAD_MAX, DnsMessage, FAMILY_V4, FAMILY_V6};

use super::wire::{self, HEADER_LEN, Header, Question, Resolved};

/// Outstanding queries remembered at most (the oldest go first).
pub const MAX_QUERIES: usize = 4096;
/// An answer later than this after its query answers nothing (resolvers
/// give up long before; clients retry with a new id).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an answer teaches nothing (`pcguard_dns_answers_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    /// No outstanding query with this resolver, server port and
    /// transaction id (never sent, already answered, timed out or evicted).
    NoQuery,
    /// Not a standard response (QR 0 or opcode not 0).
    Header,
    /// TC set: the resolver cut the answer.
    Truncated,
    /// Not exactly one question.
    QuestionCount,
    /// The question is not the query's.
    QuestionMismatch,
    /// RCODE not 0 (NXDOMAIN, SERVFAIL, ...).
    Rcode,
    /// The strict reader refused the message (`wire::WireError`).
    Malformed,
}

impl Refused {
    pub const ALL: [Refused; 7] = [
        Refused::NoQuery,
        Refused::Header,
        Refused::Truncated,
        Refused::QuestionCount,
        Refused::QuestionMismatch,
        Refused::Rcode,
        Refused::Malformed,
    ];

    /// Metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refused::NoQuery => "no_query",
            Refused::Header => "header",
            Refused::Truncated => "truncated",
            Refused::QuestionCount => "question_count",
            Refused::QuestionMismatch => "question_mismatch",
            Refused::Rcode => "rcode",
            Refused::Malformed => "malformed",
        }
    }
}

/// An answer bound to its query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub resolver: IpAddr,
    pub server_port: u16,
    pub question: Question,
    pub records: Vec<Resolved>,
    /// Length of the whole message (UDP payload).
    pub msg_len: u16,
    /// When the kernel saw it (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
}

/// A `DnsMessage` as the table reads it.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    /// `DNS_KIND_QUERY` / `DNS_KIND_ANSWER`.
    pub kind: u8,
    pub resolver: IpAddr,
    pub server_port: u16,
    /// The copied bytes of the message.
    pub payload: &'a [u8],
    /// The copy holds only the start of the message.
    pub cut: bool,
    pub msg_len: u16,
    pub ts_ns: u64,
}

impl<'a> Seen<'a> {
    /// Reads a kernel record; `None` for an unknown family or kind.
    pub fn of(m: &'a DnsMessage) -> Option<Self> {
        let resolver = match m.family {
            FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(m.resolver[0], m.resolver[1], m.resolver[2], m.resolver[3])),
            FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(m.resolver)),
            _ => return None,
        };
        if m.kind != DNS_KIND_QUERY && m.kind != DNS_KIND_ANSWER {
            return None;
        }
        let len = usize::from(m.len).min(DNS_PAYLOAD_MAX);
        Some(Self {
            kind: m.kind,
            resolver,
            server_port: m.server_port,
            payload: &m.payload[..len],
            cut: len < usize::from(m.orig_len),
            msg_len: m.orig_len,
            ts_ns: m.ts_ns,
        })
    }
}

/// What became of one kernel record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// A query, now outstanding.
    Query,
    /// Something that is not a query this table can match (a second
    /// question, a response sent by this server, garbage): not recorded.
    IgnoredQuery,
    Accepted(Accepted),
    Refused(Refused),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    resolver: IpAddr,
    server_port: u16,
    txid: u16,
}

#[derive(Clone, Debug)]
struct Outstanding {
    question: Question,
    at_ns: u64,
    /// Which push onto `order` is this entry's (older ones are stale).
    seq: u64,
}

/// The outstanding queries, bounded in number and age.
#[derive(Debug)]
pub struct QueryTable {
    entries: HashMap<Key, Outstanding>,
    /// Keys in the order they were (last) recorded; entries whose `seq`
    /// no longer matches are stale and skipped.
    order: VecDeque<(u64, Key)>,
    next_seq: u64,
    cap: usize,
    timeout_ns: u64,
}

impl Default for QueryTable {
    fn default() -> Self {
        Self::new(MAX_QUERIES, QUERY_TIMEOUT)
    }
}

impl QueryTable {
    pub fn new(cap: usize, timeout: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            cap: cap.max(1),
            timeout_ns: timeout.as_nanos().try_into().unwrap_or(u64::MAX),
        }
    }

    /// Outstanding queries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Handles one record of the kernel, in ring-buffer order.
    pub fn handle(&mut self, m: &Seen) -> Handled {
        if m.kind == DNS_KIND_QUERY {
            return if self.query(m) { Handled::Query } else { Handled::IgnoredQuery };
        }
        match self.answer(m) {
            Ok(a) => Handled::Accepted(a),
            Err(r) => Handled::Refused(r),
        }
    }

    /// Records a query; false when it is not one this table can match.
    /// A query with the key of an outstanding one (a retransmission)
    /// replaces it, as the kernel's pending entry does.
    pub fn query(&mut self, m: &Seen) -> bool {
        let Some((txid, question)) = wire::parse_query(m.payload) else { return false };
        self.forget_old(m.ts_ns);
        let key = Key { resolver: m.resolver, server_port: m.server_port, txid };
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cap {
            self.evict_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(key, Outstanding { question, at_ns: m.ts_ns, seq });
        self.order.push_back((seq, key));
        if self.order.len() > 2 * self.cap {
            self.compact();
        }
        true
    }

    /// Matches an answer with its query (consumed either way) and reads it.
    pub fn answer(&mut self, m: &Seen) -> Result<Accepted, Refused> {
        let header = Header::read(m.payload).ok_or(Refused::Malformed)?;
        let key = Key { resolver: m.resolver, server_port: m.server_port, txid: header.id };
        let query = self.entries.remove(&key).ok_or(Refused::NoQuery)?;
        if m.ts_ns.saturating_sub(query.at_ns) > self.timeout_ns {
            return Err(Refused::NoQuery);
        }
        if !header.is_response() || header.opcode() != 0 {
            return Err(Refused::Header);
        }
        if header.truncated() {
            return Err(Refused::Truncated);
        }
        if header.qdcount != 1 {
            return Err(Refused::QuestionCount);
        }
        let (question, pos) = wire::read_question(m.payload, HEADER_LEN).map_err(|_| Refused::Malformed)?;
        if question != query.question {
            return Err(Refused::QuestionMismatch);
        }
        if header.rcode() != 0 {
            return Err(Refused::Rcode);
        }
        let records =
            wire::read_answers(m.payload, pos, header.ancount, &question, m.cut).map_err(|_| Refused::Malformed)?;
        Ok(Accepted {
            resolver: m.resolver,
            server_port: m.server_port,
            question,
            records,
            msg_len: m.msg_len,
            ts_ns: m.ts_ns,
        })
    }

    /// Drops queries older than the timeout (from the front: the oldest).
    fn forget_old(&mut self, now_ns: u64) {
        while let Some(&(seq, key)) = self.order.front() {
            match self.entries.get(&key) {
                Some(q) if q.seq == seq && now_ns.saturating_sub(q.at_ns) <= self.timeout_ns => break,
                Some(q) if q.seq == seq => {
                    self.entries.remove(&key);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((seq, key)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|q| q.seq == seq) {
                self.entries.remove(&key);
                return;
            }
        }
    }

    /// Drops the stale keys of `order` (queries answered, or recorded again).
    fn compact(&mut self) {
        let entries = &self.entries;
        self.order.retain(|(seq, key)| entries.get(key).is_some_and(|q| q.seq == *seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::{
        TYPE_A, TYPE_AAAA,
        build::{a, query, response},
    };

    const RESOLVER: &str = "10.0.0.53";
    const PORT: u16 = 40000;
    const S: u64 = 1_000_000_000;

    fn seen<'a>(kind: u8, resolver: &str, port: u16, payload: &'a [u8], ts_ns: u64) -> Seen<'a> {
        Seen {
            kind,
            resolver: resolver.parse().unwrap(),
            server_port: port,
            payload,
            cut: false,
            msg_len: payload.len() as u16,
            ts_ns,
        }
    }

    fn ask(t: &mut QueryTable, id: u16, name: &str, qtype: u16, ts: u64) {
        let q = query(id, name, qtype);
        assert_eq!(t.handle(&seen(DNS_KIND_QUERY, RESOLVER, PORT, &q, ts)), Handled::Query);
    }

    fn reply(t: &mut QueryTable, resolver: &str, port: u16, msg: &[u8], ts: u64) -> Result<Accepted, Refused> {
        t.answer(&seen(DNS_KIND_ANSWER, resolver, port, msg, ts))
    }

    fn good(id: u16) -> Vec<u8> {
        response(id, "mf.cloud.papercut.com", TYPE_A, &[("@", TYPE_A, 300, a("203.0.113.7"))])
    }

    #[test]
    fn an_answer_to_an_outstanding_query_is_accepted_once() {
        let mut t = QueryTable::default();
        ask(&mut t, 7, "MF.cloud.papercut.com", TYPE_A, S);
        // Case does not matter: names are compared lower-cased.
        let mut msg = good(7);
        msg[13] = b'M';
        let acc = reply(&mut t, RESOLVER, PORT, &msg, 2 * S).unwrap();
        assert_eq!(acc.question.name, "mf.cloud.papercut.com");
        assert_eq!(acc.records.len(), 1);
        assert_eq!(acc.records[0].addr.to_string(), "203.0.113.7");
        assert!(t.is_empty());
        // A second answer to the same query.
        assert_eq!(reply(&mut t, RESOLVER, PORT, &good(7), 2 * S), Err(Refused::NoQuery));
    }

    #[test]
    fn answers_that_do_not_match_their_query_exactly_are_refused() {
        type Mutation = fn(&mut Vec<u8>);
        let other = "10.0.0.54";
        let cases: [(&str, Mutation, &str, u16, Refused); 13] = [
            ("wrong txid", |m| m[1] ^= 1, RESOLVER, PORT, Refused::NoQuery),
            ("wrong server port", |_| {}, RESOLVER, PORT + 1, Refused::NoQuery),
            ("wrong resolver", |_| {}, other, PORT, Refused::NoQuery),
            ("QR clear", |m| m[2] &= 0x7f, RESOLVER, PORT, Refused::Header),
            ("opcode 2", |m| m[2] |= 0x10, RESOLVER, PORT, Refused::Header),
            ("TC set", |m| m[2] |= 0x02, RESOLVER, PORT, Refused::Truncated),
            ("QDCOUNT 2", |m| m[5] = 2, RESOLVER, PORT, Refused::QuestionCount),
            ("QDCOUNT 0", |m| m[5] = 0, RESOLVER, PORT, Refused::QuestionCount),
            ("another name", |m| m[14] = b'g', RESOLVER, PORT, Refused::QuestionMismatch),
            ("another type", |m| m[12 + 23 + 1] = TYPE_AAAA as u8, RESOLVER, PORT, Refused::QuestionMismatch),
            ("another class", |m| m[12 + 23 + 3] = 3, RESOLVER, PORT, Refused::QuestionMismatch),
            ("NXDOMAIN", |m| m[3] |= 3, RESOLVER, PORT, Refused::Rcode),
            ("a broken record", |m| m.truncate(m.len() - 1), RESOLVER, PORT, Refused::Malformed),
        ];
        for (what, mutate, resolver, port, want) in cases {
            let mut t = QueryTable::default();
            ask(&mut t, 7, "mf.cloud.papercut.com", TYPE_A, S);
            let mut msg = good(7);
            mutate(&mut msg);
            assert_eq!(reply(&mut t, resolver, port, &msg, 2 * S), Err(want), "{what}");
            // Whatever came first, the genuine answer after it is accepted
            // only if the bad one did not consume the query.
            let consumed = want != Refused::NoQuery;
            assert_eq!(
                reply(&mut t, RESOLVER, PORT, &good(7), 2 * S).is_ok(),
                !consumed,
                "{what}: genuine answer after it"
            );
        }
    }

    #[test]
    fn an_extra_question_is_refused_even_when_the_first_matches() {
        let mut t = QueryTable::default();
        ask(&mut t, 9, "mf.cloud.papercut.com", TYPE_A, S);
        // Two questions: the genuine one and another; the answer for the
        // second points at the first's name.
        let mut msg = good(9);
        msg[5] = 2;
        let first_q_end = 12 + 23 + 4;
        let extra = [&[3u8, b'e', b'v', b'l', 0, 0, 1, 0, 1][..]].concat();
        msg.splice(first_q_end..first_q_end, extra);
        assert_eq!(reply(&mut t, RESOLVER, PORT, &msg, 2 * S), Err(Refused::QuestionCount));
    }

    #[test]
    fn late_answers_and_evicted_queries_match_nothing() {
        let mut t = QueryTable::new(3, Duration::from_secs(30));
        ask(&mut t, 1, "mf.cloud.papercut.com", TYPE_A, S);
        assert_eq!(reply(&mut t, RESOLVER, PORT, &good(1), 32 * S), Err(Refused::NoQuery));
        for id in 2..=5 {
            ask(&mut t, id, "mf.cloud.papercut.com", TYPE_A, 40 * S + u64::from(id));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(reply(&mut t, RESOLVER, PORT, &good(2), 41 * S), Err(Refused::NoQuery), "the oldest was evicted");
        assert!(reply(&mut t, RESOLVER, PORT, &good(5), 41 * S).is_ok());
        // Old entries are dropped as new queries come in.
        ask(&mut t, 6, "mf.cloud.papercut.com", TYPE_A, 100 * S);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn retransmitted_queries_replace_each_other_and_the_order_stays_bounded() {
        let mut t = QueryTable::new(4, Duration::from_secs(30));
        ask(&mut t, 1, "a.example", TYPE_A, S);
        for i in 0..1000 {
            ask(&mut t, 2, "mf.cloud.papercut.com", TYPE_A, S + i);
        }
        assert_eq!(t.len(), 2);
        assert!(t.order.len() <= 8, "{}", t.order.len());
        assert!(reply(&mut t, RESOLVER, PORT, &good(2), 2 * S).is_ok());
        // A retransmission for another name replaces the question too.
        ask(&mut t, 3, "a.example", TYPE_A, S);
        ask(&mut t, 3, "mf.cloud.papercut.com", TYPE_A, S);
        assert!(reply(&mut t, RESOLVER, PORT, &good(3), 2 * S).is_ok());
    }

    #[test]
    fn records_that_are_no_standard_query_are_not_recorded() {
        let mut t = QueryTable::default();
        let mut two = query(1, "a.example", TYPE_A);
        two[5] = 2;
        for q in [two, good(1), vec![0; 5], query(1, "a.example", TYPE_A)[..20].to_vec()] {
            assert_eq!(t.handle(&seen(DNS_KIND_QUERY, RESOLVER, PORT, &q, S)), Handled::IgnoredQuery);
        }
        assert!(t.is_empty());
        assert_eq!(reply(&mut t, RESOLVER, PORT, &[0; 4], S), Err(Refused::Malformed));
    }

    #[test]
    fn kernel_records_are_read_within_their_bounds() {
        let q = query(5, "mf.cloud.papercut.com", TYPE_A);
        let mut m = DnsMessage {
            ts_ns: 9,
            resolver: [0; 16],
            family: FAMILY_V4,
            kind: DNS_KIND_QUERY,
            len: q.len() as u16,
            orig_len: q.len() as u16,
            server_port: PORT,
            payload: [0; DNS_PAYLOAD_MAX],
        };
        m.resolver[..4].copy_from_slice(&[10, 0, 0, 53]);
        m.payload[..q.len()].copy_from_slice(&q);
        let s = Seen::of(&m).unwrap();
        assert_eq!((s.resolver.to_string().as_str(), s.payload, s.cut), (RESOLVER, &q[..], false));
        m.len = u16::MAX;
        m.orig_len = 3000;
        let s = Seen::of(&m).unwrap();
        assert_eq!((s.payload.len(), s.cut), (DNS_PAYLOAD_MAX, true));
        m.family = 9;
        assert!(Seen::of(&m).is_none());
        m.family = FAMILY_V6;
        m.kind = 0;
        assert!(Seen::of(&m).is_none());
    }
}
