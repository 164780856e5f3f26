//! Prometheus/OpenMetrics endpoint.
//!
//! Kernel counters are read from the pinned maps at scrape time (a
//! [`Collector`]), so every scrape sees exact values; userspace counters
//! (unexpected flows by reason, reloads, audit errors) live in the registry.

use std::sync::{Arc, Mutex, RwLock};

use anyhow::Result;
use log::{debug, warn};
use pcguard_common::{
    Counters, STAT_CT_CREATED, STAT_CT_EXPIRED, STAT_CT_INSERT_FAILED, STAT_CT_PROMOTED, STAT_DNS_ANSWERS,
    STAT_DNS_ANSWERS_DROPPED, STAT_DNS_QUERIES, STAT_DNS_UNSOLICITED, STAT_EVENTS_DROPPED, STAT_EVENTS_RATE_LIMITED,
    STAT_EVENTS_SENT, STAT_EVENTS_SUPPRESSED, STAT_FLOW_RECORDS_DROPPED, STAT_FLOW_RECORDS_SENT, STAT_MALFORMED,
    STAT_NON_IP, Verdict,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::counters::{Labels, PinnedCounters, TableSizes};

type LabelPairs = Vec<(&'static str, String)>;

/// Userspace metrics updated by the daemon.
#[derive(Clone)]
pub struct DaemonMetrics {
    pub unexpected_flows: Family<LabelPairs, Counter>,
    pub reloads: Family<LabelPairs, Counter>,
    pub audit_write_errors: Counter,
    /// Unexpected-flow records not written on their own (repeats within the
    /// report interval, or over the ceiling): counted in summary records.
    pub audit_held_back: Counter,
    /// Audit records the syslog socket did not take at once (no syslog
    /// daemon, or its queue full): dropped, never waited for.
    pub audit_syslog_dropped: Counter,
    pub policy_loaded_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub dns_learned: Gauge,
    pub dns_answers_accepted: Counter,
    pub dns_answers_refused: Family<LabelPairs, Counter>,
    pub dns_addresses_refused: Family<LabelPairs, Counter>,
}

/// Reason labels of `pcguard_dns_answers_refused_total`: the matching
/// refusals, and `overload` (accepted, but the daemon was too far behind).
pub const DNS_ANSWER_REFUSALS: [&str; 8] = {
    let r = crate::dns::Refused::ALL;
    [
        r[0].as_str(),
        r[1].as_str(),
        r[2].as_str(),
        r[3].as_str(),
        r[4].as_str(),
        r[5].as_str(),
        r[6].as_str(),
        "overload",
    ]
};

impl DaemonMetrics {
    pub fn flow(&self, reason: &str, direction: &str) {
        self.unexpected_flows.get_or_create(&flow_labels(reason, direction)).inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&reload_labels(ok)).inc();
    }

    /// An answer that teaches nothing, by [`DNS_ANSWER_REFUSALS`] reason.
    pub fn dns_answer_refused(&self, reason: &str) {
        self.dns_answers_refused.get_or_create(&reason_labels(reason)).inc();
    }

    /// An answered address that was not learned, by `Refusal` reason.
    pub fn dns_address_refused(&self, reason: &str) {
        self.dns_addresses_refused.get_or_create(&reason_labels(reason)).inc();
    }
}

fn reason_labels(reason: &str) -> LabelPairs {
    vec![("reason", reason.to_string())]
}

fn flow_labels(reason: &str, direction: &str) -> LabelPairs {
    vec![("reason", reason.to_string()), ("flow_direction", direction.to_string())]
}

fn reload_labels(ok: bool) -> LabelPairs {
    vec![("result", if ok { "success" } else { "failure" }.to_string())]
}

/// What the kernel collector needs: the pinned maps and the current labels.
#[derive(Debug)]
struct KernelCollector {
    maps: Arc<Mutex<Option<PinnedCounters>>>,
    labels: Arc<RwLock<PolicyInfo>>,
    /// Table sizes sampled in the background (walking a full conntrack
    /// table takes too long for a scrape), with the tables' capacities.
    tables: Arc<Mutex<Option<TableSizes>>>,
    capacity: (u32, u32),
}

/// How often the table sizes are sampled.
pub const TABLE_SAMPLE_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// Samples the table sizes of the maps in `maps` (a second handle: the
/// walk never holds up a scrape) every `TABLE_SAMPLE_PERIOD`.
fn spawn_table_sampler(maps: PinnedCounters, into: Arc<Mutex<Option<TableSizes>>>) {
    std::thread::spawn(move || {
        loop {
            match maps.table_sizes() {
                Ok(t) => *into.lock().unwrap() = Some(t),
                Err(e) => warn!("sampling the table sizes: {e:#}"),
            }
            std::thread::sleep(TABLE_SAMPLE_PERIOD);
        }
    });
}

/// Labels and info of the running policy.
#[derive(Clone, Debug, Default)]
pub struct PolicyInfo {
    pub labels: Labels,
    pub mode: String,
    pub egress_mode: String,
    pub role: String,
    pub rules: usize,
    /// What is attached where (filled once the programs are attached).
    pub interfaces: Vec<crate::attach::AttachedInterface>,
}

impl std::fmt::Debug for PinnedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedCounters")
    }
}

pub struct Metrics {
    registry: Registry,
    pub daemon: DaemonMetrics,
    policy: Arc<RwLock<PolicyInfo>>,
}

impl Metrics {
    /// `maps_dir`: the pinned map set whose counters are served (`None`:
    /// only the userspace metrics).
    pub fn new(maps_dir: Option<&std::path::Path>, policy: PolicyInfo) -> anyhow::Result<Self> {
        let tables = Arc::new(Mutex::new(None));
        let (maps, capacity) = match maps_dir {
            Some(dir) => {
                let maps = PinnedCounters::open(dir)?;
                let capacity = maps.capacity;
                spawn_table_sampler(PinnedCounters::open(dir)?, tables.clone());
                (Some(maps), capacity)
            }
            None => (None, (0, 0)),
        };
        let mut registry = Registry::default();
        let daemon = DaemonMetrics {
            unexpected_flows: Family::default(),
            reloads: Family::default(),
            audit_write_errors: Counter::default(),
            audit_held_back: Counter::default(),
            audit_syslog_dropped: Counter::default(),
            policy_loaded_time: Gauge::default(),
            dns_learned: Gauge::default(),
            dns_answers_accepted: Counter::default(),
            dns_answers_refused: Family::default(),
            dns_addresses_refused: Family::default(),
        };
        registry.register(
            "pcguard_unexpected_flows",
            "Unexpected flows reported (one per flow, not per packet), by reason and flow direction (inbound: opened by the remote end; outbound: opened by this server)",
            daemon.unexpected_flows.clone(),
        );
        for reason in crate::flows::reason_labels() {
            for dir in ["inbound", "outbound"] {
                let _ = daemon.unexpected_flows.get_or_create(&flow_labels(reason, dir));
            }
        }
        registry.register("pcguard_reloads", "Policy reloads by result", daemon.reloads.clone());
        for ok in [true, false] {
            let _ = daemon.reloads.get_or_create(&reload_labels(ok));
        }
        registry.register(
            "pcguard_audit_write_errors",
            "Audit records that could not be written",
            daemon.audit_write_errors.clone(),
        );
        registry.register(
            "pcguard_audit_held_back",
            "Unexpected-flow records not written on their own (repeats, or over the records-per-second ceiling); summary records count them",
            daemon.audit_held_back.clone(),
        );
        registry.register(
            "pcguard_audit_syslog_dropped",
            "Audit records not sent to syslog ([audit] syslog = true): the socket did not take them at once (no syslog daemon, or its queue full)",
            daemon.audit_syslog_dropped.clone(),
        );
        registry.register(
            "pcguard_policy_loaded_timestamp_seconds",
            "Unix time the running policy was applied",
            daemon.policy_loaded_time.clone(),
        );
        registry.register(
            "pcguard_dns_learned_addresses",
            "Addresses learned from DNS answers for the policy's FQDNs (cloud endpoints) that the kernel holds, until their TTL runs out",
            daemon.dns_learned.clone(),
        );
        registry.register(
            "pcguard_dns_answers_accepted",
            "DNS answers bound to an outstanding query of this server and read",
            daemon.dns_answers_accepted.clone(),
        );
        registry.register(
            "pcguard_dns_answers_refused",
            "DNS answers copied by the kernel that teach nothing, by reason (no matching query, header, truncated, question count or mismatch, rcode, malformed, overload)",
            daemon.dns_answers_refused.clone(),
        );
        for reason in DNS_ANSWER_REFUSALS {
            let _ = daemon.dns_answers_refused.get_or_create(&reason_labels(reason));
        }
        registry.register(
            "pcguard_dns_addresses_refused",
            "Addresses of accepted DNS answers for the policy's FQDNs that were not learned, by reason (special, own_address, resolver, local_class, name_cap, total_cap)",
            daemon.dns_addresses_refused.clone(),
        );
        for r in crate::dns::Refusal::ALL {
            let _ = daemon.dns_addresses_refused.get_or_create(&reason_labels(r.as_str()));
        }
        let policy = Arc::new(RwLock::new(policy));
        registry.register_collector(Box::new(KernelCollector {
            maps: Arc::new(Mutex::new(maps)),
            labels: policy.clone(),
            tables,
            capacity,
        }));
        Ok(Self { registry, daemon, policy })
    }

    pub fn set_policy(&self, info: PolicyInfo) {
        *self.policy.write().unwrap() = info;
    }

    /// The OpenMetrics text of one scrape.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!("encoding metrics: {e}");
        }
        out
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = self.labels.read().unwrap().clone();
        encode_const_info(&mut encoder, &info)?;
        let guard = self.maps.lock().unwrap();
        let Some(maps) = guard.as_ref() else { return Ok(()) };
        let snap = match maps.snapshot(&info.labels) {
            Ok(s) => s,
            Err(e) => {
                warn!("reading counters: {e:#}");
                return Ok(());
            }
        };
        let port_series: Vec<(LabelPairs, &Counters)> = snap
            .ports
            .iter()
            .map(|p| {
                let labels = vec![
                    ("direction", p.direction.as_str().to_string()),
                    ("protocol", p.protocol.as_str().to_string()),
                    ("port", p.port.clone()),
                ];
                (labels, &p.counters)
            })
            .collect();
        encode_counters(
            &mut encoder,
            "pcguard_packets",
            "Packets seen by the data path, by packet direction, protocol, service port (policy ports, else other) and verdict",
            &port_series,
            |c, v| c.packets[v],
        )?;
        encode_counters(
            &mut encoder,
            "pcguard_bytes",
            "Bytes (frame length) seen by the data path, labelled like pcguard_packets_total",
            &port_series,
            |c, v| c.bytes[v],
        )?;
        let rule_series: Vec<(LabelPairs, &Counters)> = snap
            .rules
            .iter()
            .map(|r| (vec![("rule", r.rule.clone()), ("direction", r.direction.as_str().to_string())], &r.counters))
            .collect();
        encode_counters(
            &mut encoder,
            "pcguard_rule_packets",
            "Packets of flows matched by each rule (catalog id or site rule name), by packet direction and verdict",
            &rule_series,
            |c, v| c.packets[v],
        )?;
        encode_counters(
            &mut encoder,
            "pcguard_rule_bytes",
            "Bytes of flows matched by each rule, labelled like pcguard_rule_packets_total",
            &rule_series,
            |c, v| c.bytes[v],
        )?;
        let stats = [
            ("pcguard_non_ip_packets", "Non-IP frames seen at ingress (always passed)", STAT_NON_IP),
            ("pcguard_malformed_packets", "Packets with truncated or invalid headers", STAT_MALFORMED),
            (
                "pcguard_events_dropped",
                "Unexpected-flow events lost because the ring buffer was full",
                STAT_EVENTS_DROPPED,
            ),
            ("pcguard_events_sent", "Unexpected-flow events sent to the daemon", STAT_EVENTS_SENT),
            (
                "pcguard_events_suppressed",
                "Packets of already reported unexpected flows (not reported again)",
                STAT_EVENTS_SUPPRESSED,
            ),
            ("pcguard_conntrack_created", "Conntrack entries created", STAT_CT_CREATED),
            ("pcguard_conntrack_expired", "Conntrack entries removed on close or idle timeout", STAT_CT_EXPIRED),
            ("pcguard_conntrack_insert_failures", "Conntrack inserts that failed", STAT_CT_INSERT_FAILED),
            (
                "pcguard_dns_answers",
                "DNS answers of the configured resolvers to a pending query, copied for DNS-aware egress",
                STAT_DNS_ANSWERS,
            ),
            (
                "pcguard_dns_answers_dropped",
                "DNS queries and answers lost because their ring buffer was full",
                STAT_DNS_ANSWERS_DROPPED,
            ),
            (
                "pcguard_dns_queries",
                "DNS queries of this server to its resolvers, copied for DNS-aware egress",
                STAT_DNS_QUERIES,
            ),
            (
                "pcguard_dns_unsolicited_answers",
                "Packets from a resolver's port 53 to a DNS flow of this server that answer no pending query (not copied)",
                STAT_DNS_UNSOLICITED,
            ),
            (
                "pcguard_events_rate_limited",
                "Unexpected-flow reports not sent because the kernel's event budget was used up",
                STAT_EVENTS_RATE_LIMITED,
            ),
            (
                "pcguard_conntrack_promoted",
                "Flows moved from the new-flow table to the established table",
                STAT_CT_PROMOTED,
            ),
            (
                "pcguard_flow_records_sent",
                "Starts and ends of audited allowed flows ([audit] allowed) the kernel sent to the daemon",
                STAT_FLOW_RECORDS_SENT,
            ),
            (
                "pcguard_flow_records_dropped",
                "Starts and ends of audited allowed flows lost because their ring buffer was full",
                STAT_FLOW_RECORDS_DROPPED,
            ),
        ];
        for (name, help, idx) in stats {
            let c = prometheus_client::metrics::counter::ConstCounter::new(snap.stats[idx as usize]);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        drop(guard);
        if let Some(t) = *self.tables.lock().unwrap() {
            let tables = [("established", t.established, self.capacity.0), ("new", t.new, self.capacity.1)];
            let mut entries = encoder.encode_descriptor(
                "pcguard_conntrack_entries",
                "Entries of the conntrack tables (established flows; flows not answered yet), sampled every 10 s by walking them; approximate while a table churns, never above its capacity",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (table, n, _) in tables {
                let g = prometheus_client::metrics::gauge::ConstGauge::new(n as i64);
                g.encode(entries.encode_family(&vec![("table", table.to_string())])?)?;
            }
            let mut cap = encoder.encode_descriptor(
                "pcguard_conntrack_capacity",
                "Entries each conntrack table holds at most ([conntrack] max_entries, new_entries)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (table, _, c) in tables {
                let g = prometheus_client::metrics::gauge::ConstGauge::new(i64::from(c));
                g.encode(cap.encode_family(&vec![("table", table.to_string())])?)?;
            }
        }
        debug!("scrape: {} port series, {} rule series", snap.ports.len(), snap.rules.len());
        Ok(())
    }
}

/// Encodes one counter family with a `verdict` label. Series whose value is
/// zero are left out except the `allowed` one, which keeps every known
/// label set visible without multiplying idle series by four.
fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(LabelPairs, &Counters)],
    value: impl Fn(&Counters, usize) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, counters) in series {
        for verdict in Verdict::ALL {
            let n = value(counters, verdict as usize);
            if n == 0 && verdict != Verdict::Allow {
                continue;
            }
            let mut l = labels.clone();
            l.push(("verdict", verdict.as_str().to_string()));
            family.encode_family(&l)?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
    }
    Ok(())
}

fn encode_const_info(encoder: &mut DescriptorEncoder, info: &PolicyInfo) -> Result<(), std::fmt::Error> {
    let build = vec![("version", env!("CARGO_PKG_VERSION").to_string())];
    let mut m = encoder.encode_descriptor("pcguard_build", "pcguard build information", None, MetricType::Info)?;
    m.encode_info(&build)?;
    let policy: LabelPairs =
        vec![("mode", info.mode.clone()), ("egress_mode", info.egress_mode.clone()), ("role", info.role.clone())];
    let mut m = encoder.encode_descriptor("pcguard_policy", "The running policy", None, MetricType::Info)?;
    m.encode_info(&policy)?;
    let g = prometheus_client::metrics::gauge::ConstGauge::new(info.rules as i64);
    g.encode(encoder.encode_descriptor(
        "pcguard_policy_rules",
        "Rules in the running policy",
        None,
        g.metric_type(),
    )?)?;
    if !info.interfaces.is_empty() {
        let mut m = encoder.encode_descriptor(
            "pcguard_interface",
            "Where the ingress pipeline runs on each interface (xdp or tc), the XDP mode, and why",
            None,
            MetricType::Info,
        )?;
        for i in &info.interfaces {
            let mode = i.xdp_mode.map(|m| format!("{m:?}").to_lowercase()).unwrap_or_default();
            let labels: LabelPairs = vec![
                ("interface", i.name.clone()),
                ("ingress_hook", i.ingress_hook.as_str().to_string()),
                ("xdp_mode", mode),
                ("reason", i.hook_reason.clone()),
            ];
            m.encode_info(&labels)?;
        }
    }
    Ok(())
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve_listener(listener: TcpListener, metrics: Arc<Metrics>) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &metrics).await {
                debug!("metrics connection from {peer}: {e:#}");
            }
        });
    }
}

/// A minimal HTTP/1.1 responder: one request per connection.
async fn handle(mut stream: TcpStream, metrics: &Metrics) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk)).await??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        anyhow::ensure!(buf.len() <= 16 * 1024, "request head too large");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = tokio::task::block_in_place(|| metrics.encode());
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
        }
        ("GET" | "HEAD", "/" | "/healthz") => {
            ("200 OK", "text/plain; charset=utf-8", "pcguard: see /metrics\n".to_string())
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "method not allowed\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await?;
    Ok(())
}
