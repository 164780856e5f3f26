//! The addresses learned from accepted answers: which FQDN classes each
//! has, until when, and whether the kernel's `LEARNED` map holds it yet.
//!
//! Only names of the policy's FQDN patterns teach anything. An address the
//! [`Guard`] forbids is refused (and reported), and the caps bound what
//! answers can bring in: [`MAX_PER_NAME`] addresses per question name and
//! [`MAX_LEARNED`] in all. Beyond them answers are refused, never the
//! static policy evicted (it lives in other maps).
//!
//! The learner keeps an entry until the map agrees: an expired or dropped
//! address stays (marked for deletion) until its delete succeeds, and
//! every entry whose write failed is offered again by
//! [`Learner::pending_writes`].

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use pcguard_common::LEARNED_PER_GENERATION;

use super::{
    guard::{Forbidden, Guard},
    queries::Accepted,
};
use crate::policy::CompiledPolicy;

/// Learned addresses live at least this long, whatever the TTL: a client
/// may connect a little after the resolver's answer expired in its cache.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// And at most this long.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Addresses one question name may bring in (a CDN name has a handful).
pub const MAX_PER_NAME: usize = 32;
/// Addresses learned at most, deletions still pending included.
pub const MAX_LEARNED: usize = 4096;
/// Names kept per address (question and CNAMEs; for logs and reloads).
pub const MAX_NAMES_PER_ADDRESS: usize = 16;

const _: () = assert!(MAX_LEARNED < LEARNED_PER_GENERATION as usize);

/// The learner's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub per_name: usize,
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { min_ttl: MIN_TTL, max_ttl: MAX_TTL, per_name: MAX_PER_NAME, total: MAX_LEARNED }
    }
}

/// An FQDN of a rule: `name` exactly, or `*.domain` for any name below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(fqdn: &str) -> Self {
        Self(fqdn.trim_end_matches('.').to_ascii_lowercase())
    }

    /// `name` is in presentation form from the strict reader: its dots
    /// separate labels and nothing else, so a suffix that starts at a dot
    /// is a suffix of whole labels.
    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_prefix("*.") {
            Some(domain) => {
                name.len() > domain.len() + 1
                    && name.ends_with(domain)
                    && name[..name.len() - domain.len()].ends_with('.')
            }
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
    pub fn bits<'a>(&self, names: impl IntoIterator<Item = &'a String> + Clone) -> u32 {
        self.patterns
            .iter()
            .filter(|(p, _)| names.clone().into_iter().any(|n| p.matches(n)))
            .fold(0, |m, (_, bit)| m | bit)
    }
}

/// Why an answered address was not learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    Forbidden(Forbidden),
    /// Its question already brought [`Limits::per_name`] addresses.
    NameCap,
    /// [`Limits::total`] addresses are learned.
    TotalCap,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Forbidden(Forbidden::Special),
        Refusal::Forbidden(Forbidden::OwnAddress),
        Refusal::Forbidden(Forbidden::Resolver),
        Refusal::Forbidden(Forbidden::LocalClass),
        Refusal::NameCap,
        Refusal::TotalCap,
    ];

    /// Label in `pcguard_dns_addresses_refused_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::Forbidden(f) => f.as_str(),
            Refusal::NameCap => "name_cap",
            Refusal::TotalCap => "total_cap",
        }
    }
}

/// One address of an answer that was not learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedAddress {
    pub addr: IpAddr,
    /// The question it answered.
    pub name: String,
    pub reason: Refusal,
}

/// An address that gained classes: the names that led to it (question
/// first) and the class bits it gained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Newly {
    pub addr: IpAddr,
    pub names: Vec<String>,
    pub bits: u32,
}

/// What one answer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnReport {
    pub learned: Vec<Newly>,
    pub refused: Vec<RefusedAddress>,
}

/// What `LEARNED` must hold for one address in the active generation:
/// its class bits, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LearnedWrite {
    pub addr: IpAddr,
    pub bits: Option<u32>,
}

#[derive(Clone, Debug)]
struct Entry {
    /// Class bits wanted in `LEARNED`; 0: forgotten, delete pending.
    bits: u32,
    /// Names that led to it (capped), for logs and for reloads.
    names: Vec<String>,
    /// Question names it counts against (capped).
    questions: Vec<String>,
    expires: Instant,
    /// The map holds what `bits` says.
    synced: bool,
}

/// The learned addresses and their expiry.
#[derive(Debug, Default)]
pub struct Learner {
    limits: Limits,
    entries: HashMap<IpAddr, Entry>,
    /// Live addresses per question name.
    per_name: HashMap<String, usize>,
}

impl Learner {
    pub fn new(limits: Limits) -> Self {
        Self { limits, ..Default::default() }
    }

    /// Live learned addresses.
    pub fn len(&self) -> usize {
        self.entries.values().filter(|e| e.bits != 0).count()
    }

    /// Nothing learned and nothing left to delete.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Class bits of a live address.
    pub fn bits(&self, addr: &IpAddr) -> Option<u32> {
        self.entries.get(addr).map(|e| e.bits).filter(|&b| b != 0)
    }

    /// Takes the addresses of an accepted answer whose names match the
    /// policy's FQDNs, unless `guard` forbids them or a cap is reached.
    /// Addresses of other names are ignored: they open nothing.
    pub fn learn(
        &mut self,
        answer: &Accepted,
        classes: &FqdnClasses,
        guard: &Guard,
        policy: &CompiledPolicy,
        now: Instant,
    ) -> LearnReport {
        let mut report = LearnReport::default();
        let question = &answer.question.name;
        for r in &answer.records {
            let bits = classes.bits(&r.names);
            if bits == 0 {
                continue;
            }
            let refuse = |reason| RefusedAddress { addr: r.addr, name: question.clone(), reason };
            if let Some(f) = guard.check(r.addr, policy) {
                report.refused.push(refuse(Refusal::Forbidden(f)));
                continue;
            }
            let ttl = Duration::from_secs(r.ttl.into()).clamp(self.limits.min_ttl, self.limits.max_ttl);
            match self.admit(r.addr, question, now) {
                Err(reason) => report.refused.push(refuse(reason)),
                Ok(()) => {
                    let e = self.entries.get_mut(&r.addr).expect("admitted");
                    let before = e.bits;
                    e.bits |= bits;
                    e.expires = e.expires.max(now + ttl);
                    for n in &r.names {
                        if e.names.len() < MAX_NAMES_PER_ADDRESS && !e.names.contains(n) {
                            e.names.push(n.clone());
                        }
                    }
                    if e.bits != before {
                        e.synced = false;
                        report.learned.push(Newly { addr: r.addr, names: r.names.clone(), bits: e.bits & !before });
                    }
                }
            }
        }
        report
    }

    /// Makes room for `addr` answered for `question` (an entry exists
    /// after `Ok`), or says which cap refuses it. An address already
    /// counted for this question passes; a known address counts against a
    /// new question only while that question is under its cap.
    fn admit(&mut self, addr: IpAddr, question: &str, now: Instant) -> Result<(), Refusal> {
        let per_name = self.per_name.get(question).copied().unwrap_or(0);
        match self.entries.get(&addr) {
            Some(e) if e.questions.iter().any(|q| q == question) => return Ok(()),
            Some(_) => {}
            None if self.entries.len() >= self.limits.total => return Err(Refusal::TotalCap),
            None => {}
        }
        if per_name >= self.limits.per_name {
            return Err(Refusal::NameCap);
        }
        let e = self.entries.entry(addr).or_insert_with(|| Entry {
            bits: 0,
            names: Vec::new(),
            questions: Vec::new(),
            expires: now,
            synced: true,
        });
        if e.questions.len() < MAX_NAMES_PER_ADDRESS {
            e.questions.push(question.to_string());
            *self.per_name.entry(question.to_string()).or_default() += 1;
        }
        Ok(())
    }

    /// Forgets the addresses whose TTL ran out (their deletes are then
    /// pending).
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<IpAddr> =
            self.entries.iter().filter(|(_, e)| e.bits != 0 && e.expires <= now).map(|(a, _)| *a).collect();
        for addr in expired {
            self.forget(addr);
        }
    }

    /// Marks `addr` forgotten: no classes, out of the name counts, delete
    /// pending.
    fn forget(&mut self, addr: IpAddr) {
        let Some(e) = self.entries.get_mut(&addr) else { return };
        e.bits = 0;
        e.synced = false;
        e.names.clear();
        for q in e.questions.drain(..) {
            if let Some(n) = self.per_name.get_mut(&q) {
                *n -= 1;
                if *n == 0 {
                    self.per_name.remove(&q);
                }
            }
        }
    }

    /// The class bits each live address would have under `policy`:
    /// re-derived from its names, 0 when the guard now forbids it.
    fn rebased_bits(
        &self,
        e: &Entry,
        addr: IpAddr,
        classes: &FqdnClasses,
        guard: &Guard,
        policy: &CompiledPolicy,
    ) -> u32 {
        if e.bits == 0 || guard.check(addr, policy).is_some() {
            return 0;
        }
        classes.bits(&e.names)
    }

    /// What `LEARNED` must hold under a new policy (for the generation a
    /// reload writes before it switches). Changes nothing.
    pub fn planned(&self, classes: &FqdnClasses, guard: &Guard, policy: &CompiledPolicy) -> Vec<(IpAddr, u32)> {
        let mut v: Vec<(IpAddr, u32)> = self
            .entries
            .iter()
            .map(|(a, e)| (*a, self.rebased_bits(e, *a, classes, guard, policy)))
            .filter(|(_, bits)| *bits != 0)
            .collect();
        v.sort();
        v
    }

    /// Re-derives every address for `policy` (after a reload, or when this
    /// server's addresses changed), as [`Learner::planned`] did; addresses
    /// that lost every class or are now forbidden are forgotten and
    /// returned. Every entry is then offered again by
    /// [`Learner::pending_writes`] (the generation may differ).
    pub fn rebase(&mut self, classes: &FqdnClasses, guard: &Guard, policy: &CompiledPolicy) -> Vec<IpAddr> {
        let mut dropped = Vec::new();
        let addrs: Vec<IpAddr> = self.entries.keys().copied().collect();
        for addr in addrs {
            let e = &self.entries[&addr];
            let bits = self.rebased_bits(e, addr, classes, guard, policy);
            if bits == 0 && e.bits != 0 {
                dropped.push(addr);
                self.forget(addr);
            }
            let e = self.entries.get_mut(&addr).expect("listed");
            e.bits = bits;
            e.synced = false;
        }
        dropped.sort();
        dropped
    }

    /// The writes the map still needs: entries whose write or delete has
    /// not been confirmed.
    pub fn pending_writes(&self) -> Vec<LearnedWrite> {
        let mut v: Vec<LearnedWrite> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.synced)
            .map(|(a, e)| LearnedWrite { addr: *a, bits: (e.bits != 0).then_some(e.bits) })
            .collect();
        v.sort_by_key(|w| w.addr);
        v
    }

    /// The map now holds `w`: the entry is in sync, or, if it was
    /// forgotten, gone. A write the entry no longer wants changes nothing.
    pub fn confirm(&mut self, w: &LearnedWrite) {
        let Some(e) = self.entries.get_mut(&w.addr) else { return };
        if (e.bits != 0).then_some(e.bits) != w.bits {
            return;
        }
        if e.bits == 0 {
            self.entries.remove(&w.addr);
        } else {
            e.synced = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::{Question, Resolved, TYPE_A};

    fn policy(features: &str) -> CompiledPolicy {
        let text = format!(
            "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\nworkstations = [\"10.1.0.0/16\"]\n\
             dns = [\"10.0.0.53\"]\ncloud = [\"192.0.2.7\"]\n[features]\n{features}"
        );
        crate::policy::compile(&crate::config::parse(&text, "t.toml").unwrap()).unwrap()
    }

    fn answer(question: &str, records: &[(&str, u32, &[&str])]) -> Accepted {
        Accepted {
            resolver: "10.0.0.53".parse().unwrap(),
            server_port: 40000,
            question: Question { name: question.into(), qtype: TYPE_A, qclass: 1 },
            records: records
                .iter()
                .map(|(a, ttl, names)| Resolved {
                    addr: a.parse().unwrap(),
                    ttl: *ttl,
                    names: names.iter().map(|n| n.to_string()).collect(),
                })
                .collect(),
            msg_len: 100,
            ts_ns: 0,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Confirms every pending write, as a map that accepts them all.
    fn sync(l: &mut Learner) -> Vec<LearnedWrite> {
        let w = l.pending_writes();
        for x in &w {
            l.confirm(x);
        }
        w
    }

    const GES: &str = "mf.cloud.papercut.com";

    #[test]
    fn patterns_match_whole_labels_only() {
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

    #[test]
    fn learns_expires_and_confirms_with_the_map() {
        let p = policy("ges = true\n");
        let classes = FqdnClasses::of(&p);
        let cloud = 1u32 << p.class_bit("cloud").unwrap();
        let guard = Guard::default();
        let t0 = Instant::now();
        let mut l = Learner::default();
        let a = answer(GES, &[("203.0.113.7", 10, &[GES]), ("203.0.113.8", 600, &["evil.example.com"])]);
        let r = l.learn(&a, &classes, &guard, &p, t0);
        assert_eq!(r.learned, [Newly { addr: ip("203.0.113.7"), names: vec![GES.into()], bits: cloud }]);
        assert!(r.refused.is_empty(), "a name outside the policy is ignored, not refused");
        assert_eq!(sync(&mut l), [LearnedWrite { addr: ip("203.0.113.7"), bits: Some(cloud) }]);
        // The same answer again: nothing new for the map.
        assert!(l.learn(&a, &classes, &guard, &p, t0).learned.is_empty());
        assert!(l.pending_writes().is_empty());
        // A TTL below MIN_TTL is stretched to it.
        l.expire(t0 + Duration::from_secs(30));
        assert!(l.pending_writes().is_empty());
        l.expire(t0 + MIN_TTL);
        assert_eq!(l.len(), 0);
        assert_eq!(l.pending_writes(), [LearnedWrite { addr: ip("203.0.113.7"), bits: None }]);
        // The delete failed: still there, offered again at the next tick.
        assert!(!l.is_empty());
        l.expire(t0 + MIN_TTL + Duration::from_secs(5));
        let w = l.pending_writes();
        assert_eq!(w, [LearnedWrite { addr: ip("203.0.113.7"), bits: None }]);
        l.confirm(&w[0]);
        assert!(l.is_empty());
    }

    #[test]
    fn a_confirmation_of_a_write_no_longer_wanted_changes_nothing() {
        let p = policy("ges = true\n");
        let classes = FqdnClasses::of(&p);
        let t0 = Instant::now();
        let mut l = Learner::default();
        l.learn(&answer(GES, &[("203.0.113.7", 300, &[GES])]), &classes, &Guard::default(), &p, t0);
        let write = l.pending_writes()[0];
        l.expire(t0 + Duration::from_secs(400));
        // The insert succeeds only after the address expired: the delete
        // is still pending.
        l.confirm(&write);
        assert_eq!(l.pending_writes(), [LearnedWrite { addr: ip("203.0.113.7"), bits: None }]);
    }

    #[test]
    fn ttls_are_clamped_between_min_and_max() {
        let p = policy("ges = true\n");
        let classes = FqdnClasses::of(&p);
        let t0 = Instant::now();
        let mut l = Learner::new(Limits { min_ttl: Duration::from_secs(2), ..Limits::default() });
        let a = answer(
            GES,
            &[("203.0.113.1", 0, &[GES]), ("203.0.113.2", u32::MAX >> 1, &[GES]), ("203.0.113.3", 120, &[GES])],
        );
        l.learn(&a, &classes, &Guard::default(), &p, t0);
        sync(&mut l);
        l.expire(t0 + Duration::from_secs(2));
        assert_eq!(l.bits(&ip("203.0.113.1")), None);
        l.expire(t0 + Duration::from_secs(119));
        assert!(l.bits(&ip("203.0.113.3")).is_some());
        l.expire(t0 + Duration::from_secs(120));
        assert_eq!(l.bits(&ip("203.0.113.3")), None);
        l.expire(t0 + MAX_TTL - Duration::from_secs(1));
        assert!(l.bits(&ip("203.0.113.2")).is_some(), "a huge TTL is a day");
        l.expire(t0 + MAX_TTL);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn forbidden_addresses_are_refused_with_their_reason() {
        let p = policy("ges = true\n");
        let classes = FqdnClasses::of(&p);
        let guard = Guard::new([ip("10.9.9.1")]);
        let mut l = Learner::default();
        let a = answer(
            GES,
            &[
                ("10.1.2.3", 300, &[GES]),
                ("10.9.9.1", 300, &[GES]),
                ("10.0.0.53", 300, &[GES]),
                ("127.0.0.1", 300, &[GES]),
                ("0.0.0.0", 300, &[GES]),
                ("224.0.0.1", 300, &[GES]),
                ("::", 300, &[GES]),
                ("203.0.113.7", 300, &[GES]),
            ],
        );
        let r = l.learn(&a, &classes, &guard, &p, Instant::now());
        let reasons: Vec<(String, &str)> = r.refused.iter().map(|x| (x.addr.to_string(), x.reason.as_str())).collect();
        let want = [
            ("10.1.2.3", "local_class"),
            ("10.9.9.1", "own_address"),
            ("10.0.0.53", "resolver"),
            ("127.0.0.1", "special"),
            ("0.0.0.0", "special"),
            ("224.0.0.1", "special"),
            ("::", "special"),
        ];
        assert_eq!(reasons, want.map(|(a, r)| (a.to_string(), r)));
        assert!(r.refused.iter().all(|x| x.name == GES));
        assert_eq!(l.len(), 1);
        assert!(l.bits(&ip("203.0.113.7")).is_some());
        // An answer for a name outside the policy naming a workstation is
        // not an attack on anything: ignored, not reported.
        let intranet = answer("intranet.corp", &[("10.1.2.3", 300, &["intranet.corp"])]);
        assert_eq!(l.learn(&intranet, &classes, &guard, &p, Instant::now()), LearnReport::default());
    }

    #[test]
    fn caps_per_name_and_in_total_refuse_and_never_evict() {
        let p = policy("cloud_services = true\n");
        let classes = FqdnClasses::of(&p);
        let guard = Guard::default();
        let t0 = Instant::now();
        let mut l = Learner::new(Limits { per_name: 3, total: 5, ..Limits::default() });
        let addrs: Vec<String> = (1..=10).map(|i| format!("203.0.113.{i}")).collect();
        let many = |q: &'static str, range: std::ops::Range<usize>| {
            let names = [q];
            let recs: Vec<(&str, u32, &[&str])> = addrs[range].iter().map(|a| (a.as_str(), 300, &names[..])).collect();
            answer(q, &recs)
        };
        let r = l.learn(&many("a.papercut.com", 0..4), &classes, &guard, &p, t0);
        assert_eq!(r.learned.len(), 3);
        assert_eq!(
            r.refused,
            [RefusedAddress { addr: ip("203.0.113.4"), name: "a.papercut.com".into(), reason: Refusal::NameCap }]
        );
        // A known address answered again for its name is refreshed, not refused.
        assert!(l.learn(&many("a.papercut.com", 0..1), &classes, &guard, &p, t0).refused.is_empty());
        let r = l.learn(&many("b.papercut.com", 3..7), &classes, &guard, &p, t0);
        assert_eq!(r.learned.len(), 2);
        let reasons: Vec<Refusal> = r.refused.iter().map(|x| x.reason).collect();
        assert_eq!(reasons, [Refusal::TotalCap, Refusal::TotalCap]);
        assert_eq!(l.len(), 5);
        // Expired but not yet deleted entries still count: the map holds them.
        l.expire(t0 + Duration::from_secs(301));
        let r = l.learn(&many("c.papercut.com", 7..8), &classes, &guard, &p, t0 + Duration::from_secs(301));
        assert_eq!(r.refused[0].reason, Refusal::TotalCap);
        sync(&mut l);
        assert!(l.is_empty());
        // Once deleted, room again; the name counts were released.
        let r = l.learn(&many("a.papercut.com", 4..7), &classes, &guard, &p, t0 + Duration::from_secs(302));
        assert_eq!((r.learned.len(), r.refused.len()), (3, 0));
    }

    #[test]
    fn a_reload_rederives_classes_and_drops_what_the_new_policy_forbids() {
        let p = policy("ges = true\n");
        let classes = FqdnClasses::of(&p);
        let guard = Guard::default();
        let t0 = Instant::now();
        let mut l = Learner::default();
        l.learn(&answer(GES, &[("203.0.113.7", 300, &[GES]), ("10.2.0.9", 300, &[GES])]), &classes, &guard, &p, t0);
        sync(&mut l);
        // Same policy: planned = what is learned; a rebase changes nothing
        // but offers every entry again.
        let cloud = 1u32 << p.class_bit("cloud").unwrap();
        assert_eq!(l.planned(&classes, &guard, &p), [(ip("10.2.0.9"), cloud), (ip("203.0.113.7"), cloud)]);
        // The new policy makes 10.2.0.0/16 workstations: 10.2.0.9 goes.
        let text = "role = \"primary\"\ninterfaces = [\"eth0\"]\nmode = \"enforce\"\n[peers]\n\
                    workstations = [\"10.1.0.0/16\", \"10.2.0.0/16\"]\ndns = [\"10.0.0.53\"]\n[features]\nges = true\n";
        let q = crate::policy::compile(&crate::config::parse(text, "t.toml").unwrap()).unwrap();
        let qc = FqdnClasses::of(&q);
        let cloud_q = 1u32 << q.class_bit("cloud").unwrap();
        assert_eq!(l.planned(&qc, &guard, &q), [(ip("203.0.113.7"), cloud_q)]);
        assert_eq!(l.len(), 2, "planned changes nothing");
        assert_eq!(l.rebase(&qc, &guard, &q), [ip("10.2.0.9")]);
        assert_eq!(
            l.pending_writes(),
            [
                LearnedWrite { addr: ip("10.2.0.9"), bits: None },
                LearnedWrite { addr: ip("203.0.113.7"), bits: Some(cloud_q) }
            ]
        );
        sync(&mut l);
        // A reload that drops GES forgets what was learned for it.
        let without = policy("");
        assert!(l.planned(&FqdnClasses::of(&without), &guard, &without).is_empty());
        assert_eq!(l.rebase(&FqdnClasses::of(&without), &guard, &without), [ip("203.0.113.7")]);
        sync(&mut l);
        assert!(l.is_empty());
    }
}
