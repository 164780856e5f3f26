//! What reaches the audit log of unexpected flows, bounded whatever the
//! traffic (docs/audit.md, "Volume"): log volume, daemon CPU and memory
//! stay bounded under a flood, and security teams still see every distinct
//! source and port up to the ceiling, with counts beyond it.
//!
//! Three stages, after the kernel's own (one event per source, destination
//! port and reason per interval, at most an event budget per CPU):
//!
//! 1. Dedup: one record per (remote address, destination port, protocol,
//!    direction, reason, verdict) per report interval — the kernel's key,
//!    again, in case its LRU forgot one early. A fixed number of keys.
//! 2. Ceiling: at most `max_records_per_second` records (a token bucket
//!    with a second's burst).
//! 3. Summary: what stages 1 and 2 held back is counted — per reason and
//!    direction, per destination port and per source (the busiest ones;
//!    bounded tables) — and written as one summary record per interval.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::flows::AuditRecord;

/// Keys the dedup stage remembers (about 100 bytes each).
pub const DEDUP_KEYS: usize = 65_536;
/// Sources and ports a summary counts individually (the rest are summed).
pub const SUMMARY_KEYS: usize = 4_096;
/// Sources and ports a summary record lists (the busiest).
pub const SUMMARY_TOP: usize = 20;

/// The dedup key of a flow record: what one record stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FlowAuditKey {
    remote: IpAddr,
    port: u16,
    protocol: String,
    direction: String,
    reason: String,
    verdict: String,
}

impl FlowAuditKey {
    fn of(r: &AuditRecord) -> Self {
        let port = if r.direction == "inbound" { r.local.port } else { r.remote.port };
        Self {
            remote: r.remote.addr,
            port,
            protocol: r.protocol.clone(),
            direction: r.direction.clone(),
            reason: r.reason.clone(),
            verdict: r.verdict.clone(),
        }
    }
}

/// Stage 1: at most one record per key per interval, in a table of at most
/// `cap` keys. A full table is pruned of expired keys at most four times
/// per interval (pruning walks it); when it is still full, a record of a
/// new key is let through unremembered: the ceiling still bounds them, and
/// memory stays fixed.
struct Dedup<K> {
    interval: Duration,
    cap: usize,
    /// Key -> (when its last record was written, records held back since).
    seen: HashMap<K, (Instant, u64)>,
    pruned: Instant,
}

impl<K: std::hash::Hash + Eq + Clone> Dedup<K> {
    fn new(interval: Duration, cap: usize, now: Instant) -> Self {
        Self { interval, cap, seen: HashMap::new(), pruned: now }
    }

    /// `Some(records held back since the key's last one)` when a record may
    /// be written; `None` when it is a repeat within the interval.
    fn admit(&mut self, key: &K, now: Instant) -> Option<u64> {
        if let Some((last, held)) = self.seen.get_mut(key) {
            if now.saturating_duration_since(*last) < self.interval {
                *held += 1;
                return None;
            }
            *last = now;
            return Some(std::mem::take(held));
        }
        if self.seen.len() >= self.cap && now.saturating_duration_since(self.pruned) >= self.interval / 4 {
            let interval = self.interval;
            self.seen.retain(|_, (t, _)| now.saturating_duration_since(*t) < interval);
            self.pruned = now;
        }
        if self.seen.len() < self.cap {
            self.seen.insert(key.clone(), (now, 0));
        }
        Some(0)
    }
}

/// A record count per item, with a cap on the items: beyond it, counts go
/// to `others`.
#[derive(Debug)]
struct BoundedCounts<K> {
    counts: HashMap<K, u64>,
    others: u64,
}

impl<K> Default for BoundedCounts<K> {
    fn default() -> Self {
        Self { counts: HashMap::new(), others: 0 }
    }
}

impl<K: std::hash::Hash + Eq + Clone + Ord> BoundedCounts<K> {
    fn add(&mut self, k: K, n: u64) {
        if let Some(c) = self.counts.get_mut(&k) {
            *c += n;
        } else if self.counts.len() < SUMMARY_KEYS {
            self.counts.insert(k, n);
        } else {
            self.others += n;
        }
    }

    /// The busiest `SUMMARY_TOP`, most first (ties by key).
    fn top(&self) -> Vec<(K, u64)> {
        let mut v: Vec<(K, u64)> = self.counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(SUMMARY_TOP);
        v
    }

    fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.others == 0
    }
}

/// One line of the audit log that sums up what was not written on its own.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SummaryRecord {
    pub ts: String,
    /// Always `audit_summary`.
    pub event: &'static str,
    pub severity: &'static str,
    /// Seconds the summary covers (since the previous one).
    pub period_seconds: u64,
    /// Records held back: by the per-source dedup, and by the ceiling.
    pub deduplicated: u64,
    pub over_ceiling: u64,
    /// Held-back records per `reason/direction`.
    pub by_reason: Vec<Count>,
    /// The busiest sources and destination ports among them.
    pub top_sources: Vec<Count>,
    pub top_ports: Vec<Count>,
    /// Distinct sources counted (up to `SUMMARY_KEYS`; `more_sources`
    /// held back records of sources past that).
    pub distinct_sources: usize,
    pub more_sources: u64,
    /// Reports the kernel did not send in the period: over its event
    /// budget, or lost to a full ring buffer.
    pub kernel_rate_limited: u64,
    pub kernel_ring_dropped: u64,
    /// `flow_start` / `flow_end` records held back by their own ceiling
    /// (`[audit] max_flow_records_per_second`); absent when none were.
    #[serde(skip_serializing_if = "is_zero")]
    pub flow_records_over_ceiling: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Count {
    pub key: String,
    pub records: u64,
}

/// The three stages.
pub struct AuditGate {
    interval: Duration,
    dedup: Dedup<FlowAuditKey>,
    /// Ceiling of unexpected-flow records.
    ceiling: Ceiling,
    // What was held back since the last summary.
    since: Instant,
    deduplicated: u64,
    over_ceiling: u64,
    by_reason: BoundedCounts<String>,
    sources: BoundedCounts<IpAddr>,
    ports: BoundedCounts<String>,
    /// The allowed-flow records' own ceiling (a second's burst), and what
    /// it held back since the last summary.
    flow_ceiling: Ceiling,
    flow_over_ceiling: u64,
}

/// A token bucket of `rate` tokens per second, a second's worth at most.
struct Ceiling {
    rate: u32,
    tokens: f64,
    refilled: Instant,
}

impl Ceiling {
    fn new(rate: u32, now: Instant) -> Self {
        Self { rate: rate.max(1), tokens: f64::from(rate.max(1)), refilled: now }
    }

    /// A new rate; the tokens already earned stay.
    fn set_rate(&mut self, rate: u32) {
        self.rate = rate.max(1);
    }

    fn take(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.rate);
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(rate);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl AuditGate {
    pub fn new(interval: Duration, max_records_per_second: u32, now: Instant) -> Self {
        Self {
            interval,
            dedup: Dedup::new(interval, DEDUP_KEYS, now),
            ceiling: Ceiling::new(max_records_per_second, now),
            since: now,
            deduplicated: 0,
            over_ceiling: 0,
            by_reason: BoundedCounts::default(),
            sources: BoundedCounts::default(),
            ports: BoundedCounts::default(),
            flow_ceiling: Ceiling::new(crate::config::DEFAULT_MAX_FLOW_RECORDS_PER_SECOND, now),
            flow_over_ceiling: 0,
        }
    }

    /// The ceiling of `flow_start` / `flow_end` records
    /// (`[audit] max_flow_records_per_second`).
    pub fn set_flow_ceiling(&mut self, max_per_second: u32) {
        self.flow_ceiling.set_rate(max_per_second);
    }

    /// Whether an allowed-flow record may be written now: no dedup (each
    /// stands for one flow), only their own ceiling; one held back is
    /// counted in the next summary.
    pub fn offer_flow_record(&mut self, now: Instant) -> bool {
        if self.flow_ceiling.take(now) {
            return true;
        }
        self.flow_over_ceiling += 1;
        false
    }

    /// A reload's new interval and ceiling.
    pub fn configure(&mut self, interval: Duration, max_records_per_second: u32) {
        self.interval = interval;
        self.dedup.interval = interval;
        self.ceiling.set_rate(max_records_per_second);
    }

    /// `rec` if it is to be written now (with `suppressed` = records of
    /// its key held back since its previous one), else `None` (counted for
    /// the summary).
    pub fn offer(&mut self, mut rec: AuditRecord, now: Instant) -> Option<AuditRecord> {
        let key = FlowAuditKey::of(&rec);
        let Some(held) = self.dedup.admit(&key, now) else {
            self.deduplicated += 1;
            self.count(&key);
            return None;
        };
        if !self.ceiling.take(now) {
            self.over_ceiling += 1;
            self.count(&key);
            return None;
        }
        if held > 0 {
            rec.suppressed = Some(held);
        }
        Some(rec)
    }

    fn count(&mut self, key: &FlowAuditKey) {
        self.by_reason.add(format!("{}/{}", key.reason, key.direction), 1);
        self.sources.add(key.remote, 1);
        self.ports.add(format!("{}/{}", key.protocol, key.port), 1);
    }

    /// The summary of what was held back, once per interval (and only if
    /// something was, or the kernel held reports back); resets the counts.
    /// `kernel` is (rate limited, ring dropped) in the period.
    pub fn summary(&mut self, now: Instant, wall: SystemTime, kernel: (u64, u64)) -> Option<SummaryRecord> {
        let period = now.saturating_duration_since(self.since);
        if period < self.interval {
            return None;
        }
        let held = self.deduplicated + self.over_ceiling;
        if held == 0 && kernel == (0, 0) && self.flow_over_ceiling == 0 {
            self.since = now;
            return None;
        }
        let counts =
            |b: &BoundedCounts<String>| b.top().into_iter().map(|(key, records)| Count { key, records }).collect();
        let rec = SummaryRecord {
            ts: humantime::format_rfc3339_millis(wall).to_string(),
            event: "audit_summary",
            severity: "warning",
            period_seconds: period.as_secs(),
            deduplicated: self.deduplicated,
            over_ceiling: self.over_ceiling,
            by_reason: counts(&self.by_reason),
            top_sources: self
                .sources
                .top()
                .into_iter()
                .map(|(a, records)| Count { key: a.to_string(), records })
                .collect(),
            top_ports: counts(&self.ports),
            distinct_sources: self.sources.counts.len(),
            more_sources: self.sources.others,
            kernel_rate_limited: kernel.0,
            kernel_ring_dropped: kernel.1,
            flow_records_over_ceiling: std::mem::take(&mut self.flow_over_ceiling),
        };
        self.since = now;
        self.deduplicated = 0;
        self.over_ceiling = 0;
        self.by_reason = BoundedCounts::default();
        self.sources = BoundedCounts::default();
        self.ports = BoundedCounts::default();
        Some(rec)
    }

    /// Whether anything waits for a summary.
    pub fn holds_anything(&self) -> bool {
        !self.by_reason.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::Endpoint;

    fn rec(src: &str, port: u16) -> AuditRecord {
        AuditRecord {
            ts: String::new(),
            severity: "warning".into(),
            reason: "no_rule".into(),
            direction: "inbound".into(),
            verdict: "dropped".into(),
            protocol: "tcp".into(),
            local: Endpoint { addr: "10.0.0.1".parse().unwrap(), port },
            remote: Endpoint { addr: src.parse().unwrap(), port: 40000 },
            peer_classes: vec![],
            port_rules: vec![],
            interface: "eth0".into(),
            tcp_flags: "SYN".into(),
            packet_bytes: 60,
            dns_name: None,
            dns_address: None,
            dns_refusal: None,
            suppressed: None,
            repeats: 0,
            malformed: None,
        }
    }

    #[test]
    fn one_record_per_source_and_port_per_interval_with_the_count_after() {
        let t0 = Instant::now();
        let mut g = AuditGate::new(Duration::from_secs(60), 100, t0);
        assert!(g.offer(rec("192.0.2.1", 22), t0).is_some());
        assert!(g.offer(rec("192.0.2.1", 22), t0).is_none());
        assert!(g.offer(rec("192.0.2.1", 23), t0).is_some());
        let later = t0 + Duration::from_secs(61);
        assert_eq!(g.offer(rec("192.0.2.1", 22), later).unwrap().suppressed, Some(1));
    }

    #[test]
    fn the_ceiling_holds_whatever_arrives_and_the_summary_counts_the_rest() {
        let t0 = Instant::now();
        let mut g = AuditGate::new(Duration::from_secs(10), 50, t0);
        let mut written = 0;
        // 100,000 distinct sources in 10 s: at most 50/s (+ a second's
        // burst) are written.
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            let src = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            if g.offer(rec(&src, 9999), now).is_some() {
                written += 1;
            }
        }
        assert!((500..=551).contains(&written), "{written} records written");
        let s = g.summary(t0 + Duration::from_secs(10), SystemTime::now(), (7, 0)).expect("a summary");
        assert_eq!(s.over_ceiling + s.deduplicated + written, 100_000);
        assert_eq!(s.distinct_sources, SUMMARY_KEYS);
        assert_eq!(s.more_sources, 100_000 - written - SUMMARY_KEYS as u64);
        assert_eq!(s.top_ports, vec![Count { key: "tcp/9999".into(), records: 100_000 - written }]);
        assert_eq!(s.kernel_rate_limited, 7);
        assert!(g.summary(t0 + Duration::from_secs(21), SystemTime::now(), (0, 0)).is_none());
    }
}
