//! DNS-aware egress: the documented cloud endpoints are names
//! (`mf.cloud.papercut.com`, `*.papercut.com`, `graph.microsoft.com`, ...).
//! The kernel copies the answers of the configured resolvers to this server
//! (`DNS_ANSWERS`); this module parses them, matches the names against the
//! FQDNs of the policy's peer classes, and keeps the answered addresses as
//! learned peer-trie entries until their TTL runs out.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use crate::policy::CompiledPolicy;

/// Learned addresses live at least this long, whatever the TTL: a client
/// may connect a little after the resolver's answer expired in its cache.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// And at most this long.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// One address of an answer, with every name that led to it (the question
/// and the CNAMEs in between).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub addr: IpAddr,
    pub ttl: u32,
    pub names: BTreeSet<String>,
}

/// Parses a DNS response: the A/AAAA records reachable from the questions
/// through CNAMEs. A message cut short (the kernel copies at most
/// `DNS_PAYLOAD_MAX` bytes) yields the records read before the cut. Queries,
/// errors (RCODE != 0) and garbage yield nothing.
pub fn parse_response(msg: &[u8]) -> Vec<Resolved> {
    let mut r = Reader { msg, pos: 12 };
    let Some(header) = msg.get(..12) else { return Vec::new() };
    let is_response = header[2] & 0x80 != 0;
    let rcode = header[3] & 0x0f;
    if !is_response || rcode != 0 {
        return Vec::new();
    }
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let (qd, an) = (count(4), count(6));
    let mut questions = Vec::new();
    for _ in 0..qd {
        let Some(name) = r.name() else { return Vec::new() };
        if r.skip(4).is_none() {
            return Vec::new();
        }
        questions.push(name);
    }
    let mut cnames: HashMap<String, String> = HashMap::new();
    let mut addrs: Vec<(String, IpAddr, u32)> = Vec::new();
    for _ in 0..an {
        let Some(rr) = r.record() else { break };
        if rr.class != CLASS_IN {
            continue;
        }
        match (rr.rtype, rr.data.len()) {
            (TYPE_A, 4) => addrs.push((rr.name, IpAddr::V4(Ipv4Addr::new(rr.data[0], rr.data[1], rr.data[2], rr.data[3])), rr.ttl)),
            (TYPE_AAAA, 16) => {
                let b: [u8; 16] = rr.data.try_into().expect("16 bytes");
                addrs.push((rr.name, IpAddr::V6(Ipv6Addr::from(b)), rr.ttl));
            }
            (TYPE_CNAME, _) => {
                let mut sub = Reader { msg, pos: rr.data_pos };
                if let Some(target) = sub.name() {
                    cnames.insert(rr.name, target);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for q in questions {
        // The chain question -> cname -> ... (bounded: CNAME loops).
        let mut chain = vec![q];
        while chain.len() < 16 {
            match cnames.get(chain.last().expect("non-empty")) {
                Some(next) if !chain.contains(next) => chain.push(next.clone()),
                _ => break,
            }
        }
        for (owner, addr, ttl) in &addrs {
            if chain.contains(owner) {
                out.push(Resolved { addr: *addr, ttl: *ttl, names: chain.iter().cloned().collect() });
            }
        }
    }
    out
}

struct Record<'a> {
    name: String,
    rtype: u16,
    class: u16,
    ttl: u32,
    data: &'a [u8],
    data_pos: usize,
}

struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn skip(&mut self, n: usize) -> Option<()> {
        (self.pos + n <= self.msg.len()).then(|| self.pos += n)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.msg.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        Some((u32::from(self.u16()?) << 16) | u32::from(self.u16()?))
    }

    /// A possibly compressed name, lower-cased, without the trailing dot.
    fn name(&mut self) -> Option<String> {
        let mut labels: Vec<String> = Vec::new();
        let mut pos = self.pos;
        let mut jumped = false;
        // Each pointer must go backwards (RFC 1035 compression), so this
        // terminates; the bound is a second guard.
        for _ in 0..128 {
            let len = *self.msg.get(pos)? as usize;
            match len {
                0 => {
                    if !jumped {
                        self.pos = pos + 1;
                    }
                    return Some(labels.join("."));
                }
                l if l & 0xc0 == 0xc0 => {
                    let target = ((l & 0x3f) << 8) | *self.msg.get(pos + 1)? as usize;
                    if target >= pos {
                        return None;
                    }
                    if !jumped {
                        self.pos = pos + 2;
                    }
                    jumped = true;
                    pos = target;
                }
                l if l <= 63 => {
                    let label = self.msg.get(pos + 1..pos + 1 + l)?;
                    labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
                    pos += 1 + l;
                }
                _ => return None,
            }
        }
        None
    }

    fn record(&mut self) -> Option<Record<'a>> {
        let name = self.name()?;
        let rtype = self.u16()?;
        let class = self.u16()?;
        let ttl = self.u32()?;
        let len = self.u16()? as usize;
        let data_pos = self.pos;
        let data = self.msg.get(data_pos..data_pos + len)?;
        self.pos += len;
        Some(Record { name, rtype, class, ttl, data, data_pos })
    }
}

/// An FQDN of a rule: `name` exactly, or `*.domain` for any name below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(fqdn: &str) -> Self {
        Self(fqdn.trim_end_matches('.').to_ascii_lowercase())
    }

    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_prefix("*.") {
            Some(domain) => name.len() > domain.len() + 1 && name.ends_with(domain) && name[..name.len() - domain.len()].ends_with('.'),
            None => self.0 == name,
        }
    }
}

/// The FQDN patterns of each class bit of a policy.
#[derive(Clone, Debug, Default)]
pub struct FqdnClasses {
    patterns: Vec<(Pattern, u32)>,
}

impl FqdnClasses {
    pub fn of(policy: &CompiledPolicy) -> Self {
        let patterns = policy
            .class_info()
            .into_iter()
            .filter(|c| c.bit != pcguard_common::CLASS_ANY_BIT)
            .flat_map(|c| c.fqdns.into_iter().map(move |f| (Pattern::new(&f), 1u32 << c.bit)))
            .collect();
        Self { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Class bits whose patterns match any of `names`.
    pub fn bits(&self, names: &BTreeSet<String>) -> u32 {
        self.patterns.iter().filter(|(p, _)| names.iter().any(|n| p.matches(n))).fold(0, |m, (_, bit)| m | bit)
    }
}

/// An address learned from DNS answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// Class bits it was learned for.
    pub bits: u32,
    pub names: BTreeSet<String>,
    pub expires: Instant,
}

/// What the peer tries must hold for one learned address: its static mask
/// (longest configured prefix) plus the learned bits, or nothing (remove
/// the host prefix; `restore` = the address is itself a configured host
/// prefix whose static mask must be written back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrieUpdate {
    Set { addr: IpAddr, mask: u32 },
    Remove { addr: IpAddr },
}

/// An address learned by one answer: the names that led to it and the
/// class bits it gained (for the log).
pub type NewlyLearned = (IpAddr, BTreeSet<String>, u32);

/// The learned addresses and their expiry.
#[derive(Debug, Default)]
pub struct Learner {
    entries: HashMap<IpAddr, Learned>,
}

impl Learner {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, addr: &IpAddr) -> Option<&Learned> {
        self.entries.get(addr)
    }

    /// Takes the addresses of one answer; returns the trie writes needed
    /// and, for logging, the newly learned (address, names, bits).
    pub fn learn(
        &mut self,
        answers: &[Resolved],
        classes: &FqdnClasses,
        policy: &CompiledPolicy,
        now: Instant,
    ) -> (Vec<TrieUpdate>, Vec<NewlyLearned>) {
        let mut updates = Vec::new();
        let mut new = Vec::new();
        for a in answers {
            let bits = classes.bits(&a.names);
            if bits == 0 {
                continue;
            }
            let ttl = Duration::from_secs(a.ttl.into()).clamp(MIN_TTL, MAX_TTL);
            let e = self.entries.entry(a.addr).or_insert_with(|| Learned { bits: 0, names: BTreeSet::new(), expires: now });
            let before = e.bits;
            e.bits |= bits;
            e.names.extend(a.names.iter().cloned());
            e.expires = e.expires.max(now + ttl);
            if e.bits != before {
                updates.push(TrieUpdate::Set { addr: a.addr, mask: policy.peer_mask(a.addr) | e.bits });
                new.push((a.addr, a.names.clone(), bits));
            }
        }
        (updates, new)
    }

    /// Forgets expired addresses.
    pub fn expire(&mut self, policy: &CompiledPolicy, now: Instant) -> Vec<TrieUpdate> {
        let expired: Vec<IpAddr> = self.entries.iter().filter(|(_, e)| e.expires <= now).map(|(a, _)| *a).collect();
        expired
            .into_iter()
            .map(|addr| {
                self.entries.remove(&addr);
                restore(policy, addr)
            })
            .collect()
    }

    /// After a policy change: every learned address re-derived from its
    /// names under the new policy's classes and static masks.
    pub fn rebase(&mut self, classes: &FqdnClasses, policy: &CompiledPolicy) -> Vec<TrieUpdate> {
        let mut updates = Vec::new();
        self.entries.retain(|addr, e| {
            e.bits = classes.bits(&e.names);
            if e.bits == 0 {
                updates.push(restore(policy, *addr));
                false
            } else {
                updates.push(TrieUpdate::Set { addr: *addr, mask: policy.peer_mask(*addr) | e.bits });
                true
            }
        });
        updates
    }
}

/// The trie write that forgets a learned address.
fn restore(policy: &CompiledPolicy, addr: IpAddr) -> TrieUpdate {
    if policy.has_host_prefix(addr) {
        TrieUpdate::Set { addr, mask: policy.peer_mask(addr) }
    } else {
        TrieUpdate::Remove { addr }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a response: question `q`, then `answers` as (owner, type, ttl, rdata).
    fn response(q: &str, answers: &[(&str, u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, answers.len() as u8, 0, 0, 0, 0];
        m.extend(encode(q));
        m.extend([0, 1, 0, 1]);
        for (owner, t, ttl, data) in answers {
            // Owner "@" = compression pointer to the question name.
            if *owner == "@" {
                m.extend([0xc0, 12]);
            } else {
                m.extend(encode(owner));
            }
            m.extend(t.to_be_bytes());
            m.extend(1u16.to_be_bytes());
            m.extend(ttl.to_be_bytes());
            m.extend((data.len() as u16).to_be_bytes());
            m.extend(data);
        }
        m
    }

    fn encode(name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for l in name.split('.') {
            v.push(l.len() as u8);
            v.extend(l.as_bytes());
        }
        v.push(0);
        v
    }

    #[test]
    fn parses_a_aaaa_and_cname_chains_with_compression() {
        let msg = response(
            "MF.Cloud.PaperCut.com",
            &[
                ("@", TYPE_CNAME, 300, encode("edge.example.net")),
                ("edge.example.net", TYPE_A, 60, vec![203, 0, 113, 7]),
                ("edge.example.net", TYPE_AAAA, 60, "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec()),
                ("unrelated.example.org", TYPE_A, 60, vec![198, 51, 100, 1]),
            ],
        );
        let r = parse_response(&msg);
        let addrs: Vec<String> = r.iter().map(|x| x.addr.to_string()).collect();
        assert_eq!(addrs, ["203.0.113.7", "2001:db8::7"]);
        assert!(r[0].names.contains("mf.cloud.papercut.com") && r[0].names.contains("edge.example.net"));
        assert_eq!(r[0].ttl, 60);
    }

    #[test]
    fn rejects_queries_errors_truncation_and_pointer_loops() {
        let mut q = response("a.example.com", &[("@", TYPE_A, 60, vec![192, 0, 2, 1])]);
        assert_eq!(parse_response(&q).len(), 1);
        let full = q.clone();
        q[2] &= 0x7f; // a query, not a response
        assert!(parse_response(&q).is_empty());
        let mut e = full.clone();
        e[3] |= 3; // NXDOMAIN
        assert!(parse_response(&e).is_empty());
        // Cut inside the answer: nothing half-read is used.
        assert!(parse_response(&full[..full.len() - 2]).is_empty());
        // A pointer to itself.
        let mut l = full.clone();
        let at = 12 + encode("a.example.com").len() + 4;
        l[at] = 0xc0;
        l[at + 1] = at as u8;
        assert!(parse_response(&l).is_empty());
        assert!(parse_response(&[0u8; 5]).is_empty());
    }

    #[test]
    fn patterns_match_exact_names_and_subdomains() {
        let w = Pattern::new("*.papercut.com");
        assert!(w.matches("scan.cloud.papercut.com"));
        assert!(w.matches("grows.papercut.com"));
        assert!(!w.matches("papercut.com"));
        assert!(!w.matches("evilpapercut.com"));
        assert!(!w.matches("papercut.com.evil.net"));
        let e = Pattern::new("Graph.Microsoft.com.");
        assert!(e.matches("graph.microsoft.com"));
        assert!(!e.matches("x.graph.microsoft.com"));
    }

    fn policy(features: &str) -> CompiledPolicy {
        let text = format!(
            "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\nworkstations = [\"10.1.0.0/16\"]\n\
             dns = [\"10.0.0.53\"]\ncloud = [\"192.0.2.7\"]\n[features]\n{features}"
        );
        crate::policy::compile(&crate::config::parse(&text, "t.toml").unwrap()).unwrap()
    }

    fn resolved(addr: &str, ttl: u32, names: &[&str]) -> Resolved {
        Resolved { addr: addr.parse().unwrap(), ttl, names: names.iter().map(|n| n.to_string()).collect() }
    }

    #[test]
    fn learner_adds_expires_and_rebases_learned_addresses() {
        let p = policy("ges = true\n");
        let classes = FqdnClasses::of(&p);
        let cloud = 1u32 << p.class_bit("cloud").unwrap();
        let t0 = Instant::now();
        let mut l = Learner::default();
        let answers = [
            resolved("203.0.113.7", 10, &["mf.cloud.papercut.com"]),
            resolved("203.0.113.8", 600, &["evil.example.com"]),
            resolved("192.0.2.7", 600, &["mf.cloud.papercut.com"]),
        ];
        let (updates, new) = l.learn(&answers, &classes, &p, t0);
        let any = pcguard_common::CLASS_ANY;
        assert_eq!(
            updates,
            [
                TrieUpdate::Set { addr: "203.0.113.7".parse().unwrap(), mask: any | cloud },
                // Configured and learned: the learned bit adds nothing new.
                TrieUpdate::Set { addr: "192.0.2.7".parse().unwrap(), mask: any | cloud },
            ]
        );
        assert_eq!(new.len(), 2);
        assert_eq!(l.len(), 2);
        // The same answer again changes nothing in the maps.
        assert!(l.learn(&answers, &classes, &p, t0).0.is_empty());
        // A TTL below MIN_TTL is stretched to it.
        assert!(l.expire(&p, t0 + Duration::from_secs(30)).is_empty());
        let gone = l.expire(&p, t0 + Duration::from_secs(61));
        assert_eq!(gone, [TrieUpdate::Remove { addr: "203.0.113.7".parse().unwrap() }]);
        // A configured host prefix is restored, not removed.
        let gone = l.expire(&p, t0 + Duration::from_secs(601));
        assert_eq!(gone, [TrieUpdate::Set { addr: "192.0.2.7".parse().unwrap(), mask: any | cloud }]);
        assert!(l.is_empty());

        // A reload that drops GES forgets what was learned for it.
        l.learn(&answers[..1], &classes, &p, t0);
        let without = policy("");
        let updates = l.rebase(&FqdnClasses::of(&without), &without);
        assert_eq!(updates, [TrieUpdate::Remove { addr: "203.0.113.7".parse().unwrap() }]);
        assert!(l.is_empty());
    }
}
