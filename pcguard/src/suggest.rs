//! `pcguard suggest`: from the unexpected flows of audit logs (monitor or
//! enforce mode) to the smallest change of the site config that allows
//! them, in the config's own terms (a peer class to add addresses to, a
//! feature to turn on, a site `[[rule]]` when no catalog service matches),
//! printed as a unified diff of the TOML. Nothing is applied.
//!
//! The steps (docs/suggest.md):
//! 1. Group the `no_rule` and `peer_not_allowed` records by (direction,
//!    protocol, service port) and remote address. `outbound_to_workstation`
//!    records are never suggested: they are listed to investigate.
//! 2. Classes: an address whose classes allow none of the catalog services
//!    (or site rules) of one of its groups joins the class whose services
//!    cover most of its groups (ties: fewest features to turn on, then
//!    catalog class order). Only a service that is on (or on by role
//!    default) makes an address a member; never `admin`, and never
//!    `workstations` / `secondary_servers` for an address this server
//!    opened flows to.
//! 3. Features: the fewest that allow every (group, address) no service
//!    that is on allows (greedy set cover); a tie is a note, not a guess.
//! 4. What no service of the address's classes allows becomes a site rule
//!    with its own class of the addresses.
//! 5. Addresses are written as the smallest covering prefixes
//!    ([`covering_prefixes`]).
//!
//! The suggested config is compiled and every suggested flow checked
//! against it (the kernel's decision, [`CompiledPolicy::decide`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::BufRead as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, Value};

use crate::{
    catalog::{Catalog, Service},
    config::{self, FeatureSetting, SiteConfig},
    flows::{self, AuditRecord, Line},
    model::{Cidr, Direction, PortRange, Protocol},
    policy::{self, CompiledPolicy, RuleOrigin},
};

/// Hosts of one /24 (IPv4) or /64 (IPv6) from which the whole network is
/// suggested instead of the hosts (when nothing else is in it).
pub const MIN_HOSTS_FOR_NETWORK: usize = 4;

/// The unexpected-flow reasons a config change can allow.
const ALLOWABLE: [&str; 2] = ["no_rule", "peer_not_allowed"];
const INVESTIGATE: &str = "outbound_to_workstation";
/// The administrators' class (always-allowed SSH, the web interface).
const ADMIN: &str = "admin";
/// Classes this server must never open flows to.
const NO_INITIATE: [&str; 2] = ["workstations", "secondary_servers"];

/// What the audit logs hold, for the suggestion.
#[derive(Debug, Default)]
pub struct Observed {
    /// Unexpected-flow records (every reason).
    pub flows: Vec<AuditRecord>,
    /// Rule ids of allowed-flow records (`flow_start` / `flow_end`).
    pub rules_with_traffic: BTreeSet<String>,
    /// Allowed-flow records read.
    pub allowed_records: u64,
    /// Earliest and latest record times (RFC 3339).
    pub first: Option<String>,
    pub last: Option<String>,
}

impl Observed {
    fn note_time(&mut self, ts: &str) {
        if self.first.as_deref().is_none_or(|f| ts < f) {
            self.first = Some(ts.to_string());
        }
        if self.last.as_deref().is_none_or(|l| ts > l) {
            self.last = Some(ts.to_string());
        }
    }

    /// Adds one line of `origin` (line `n`). A line that is not a record
    /// is an error naming the file and line, except an unfinished last
    /// line (the daemon writing it).
    pub fn add_line(&mut self, line: &str, origin: &str, n: usize) -> Result<()> {
        if line.trim().is_empty() {
            return Ok(());
        }
        match flows::parse_line(line) {
            Line::Flow(r) => {
                self.note_time(&r.ts);
                self.flows.push(*r);
            }
            Line::Other => {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                let ecs = &v["pcguard"];
                let event = v["event_type"].as_str().or(ecs["event_type"].as_str());
                if matches!(event, Some("flow_start" | "flow_end")) {
                    self.allowed_records += 1;
                    let rule = v["rule"].as_str().or(ecs["rule"].as_str()).or(v["rule"]["name"].as_str());
                    match rule {
                        Some(rule) => {
                            self.rules_with_traffic.insert(rule.to_string());
                        }
                        None => bail!("{origin}:{n}: {} record without a rule", event.unwrap_or_default()),
                    }
                    if let Some(ts) = v["ts"].as_str().or(v["@timestamp"].as_str()) {
                        self.note_time(ts);
                    }
                }
            }
            Line::Invalid => bail!("{origin}:{n}: not an audit record (JSON lines of pcguard's audit log expected)"),
        }
        Ok(())
    }

    /// Reads audit logs (`json` or `ecs` format, any schema): the same
    /// forms as `pcguard flows --log` (a live log with its rotated and
    /// gzipped siblings, a rotated file, a glob; [`flows::query::log_set`]).
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        let mut obs = Observed::default();
        for path in flows::query::log_set(paths)? {
            let origin = path.display().to_string();
            let mut reader = flows::query::open(&path)?;
            let mut buf = Vec::with_capacity(1024);
            let mut n = 0;
            loop {
                buf.clear();
                if reader.read_until(b'\n', &mut buf).with_context(|| format!("{origin}: cannot read"))? == 0 {
                    break;
                }
                n += 1;
                // A last line without its newline is the daemon writing it.
                let unfinished = !buf.ends_with(b"\n");
                let r = std::str::from_utf8(buf.strip_suffix(b"\n").unwrap_or(&buf))
                    .map_err(|_| anyhow::anyhow!("{origin}:{n}: not UTF-8"))
                    .and_then(|line| obs.add_line(line, &origin, n));
                match r {
                    Err(_) if unfinished => {}
                    r => r?,
                }
            }
        }
        Ok(obs)
    }
}

/// The service end of a flow group.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub direction: Direction,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.direction.as_str(), self.protocol.as_str(), self.port)
    }
}

/// What the records say of one remote address on one service port.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// Rules that covered the port for other classes (from the records).
    port_rules: BTreeSet<String>,
}

/// What a feature is turned on for: service ids, ports, addresses.
type Use = (BTreeSet<String>, BTreeSet<Target>, BTreeSet<IpAddr>);
/// Ports and service ids of an address a class is suggested for.
type AddrUse = (BTreeSet<Target>, BTreeSet<String>);

/// One change of the config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Add these prefixes to `peers.<class>`.
    AddToClass { class: String, prefixes: Vec<Cidr> },
    /// Turn on a catalog feature through its `[features]` key.
    EnableFeature { feature: String },
    /// A new `[[rule]]` with its own class of the addresses.
    SiteRule {
        name: String,
        class: String,
        direction: Direction,
        protocol: Protocol,
        ports: Vec<u16>,
        prefixes: Vec<Cidr>,
    },
}

/// A suggestion and why: the flows it allows.
#[derive(Clone, Debug)]
pub struct Suggestion {
    pub change: Change,
    /// One line for the operator.
    pub text: String,
}

/// The result of [`suggest`].
#[derive(Debug, Default)]
pub struct Report {
    pub suggestions: Vec<Suggestion>,
    /// `outbound_to_workstation` flows: (service, remote, flows).
    pub investigate: Vec<(Target, IpAddr, u64)>,
    /// Records of other reasons (malformed, untracked replies, DNS), by reason.
    pub ignored: BTreeMap<String, u64>,
    /// The rule usage part: lines for the operator.
    pub rule_usage: Vec<String>,
    /// Rules of the config that saw no traffic (empty when it cannot tell).
    pub unused_rules: Vec<String>,
    /// Notes (what could not be written, what the check found).
    pub notes: Vec<String>,
    /// The suggested config text (with `--config`).
    pub suggested: Option<String>,
    /// Suggested flows the suggested config still does not allow.
    pub not_allowed_after: Vec<String>,
    /// Every (service, address) the suggestions are about.
    pub flows: Vec<(Target, IpAddr)>,
}

/// The current config, when given.
pub struct Current<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub cfg: &'a SiteConfig,
    pub policy: &'a CompiledPolicy,
}

/// What the suggestion works from: features on, features a role default
/// turns on as soon as its class has addresses, classes of addresses.
struct State<'a> {
    catalog: &'a Catalog,
    current: Option<&'a Current<'a>>,
    /// Catalog features on (the config's, or the ones records name).
    enabled: BTreeSet<String>,
    /// Role defaults the config does not set: on once their peers exist.
    defaults: BTreeSet<String>,
    /// Features the plan turns on.
    planned_features: BTreeSet<String>,
    /// Addresses the plan adds to a class.
    planned_classes: BTreeMap<IpAddr, String>,
    /// Classes of an address in the records (without `--config`).
    record_classes: BTreeMap<IpAddr, Vec<String>>,
}

impl State<'_> {
    fn classes(&self, addr: IpAddr) -> Vec<String> {
        let mut out = match self.current {
            Some(c) => flows::class_names(c.policy, c.policy.peer_mask(addr.to_canonical())),
            None => self.record_classes.get(&addr).cloned().unwrap_or_default(),
        };
        out.retain(|c| c != "any");
        out.extend(self.planned_classes.get(&addr).cloned());
        out
    }

    fn feature_on(&self, f: &str) -> bool {
        self.enabled.contains(f) || self.defaults.contains(f) || self.planned_features.contains(f)
    }

    /// The service's ports in this config (moved Application Server ports).
    fn ports(&self, s: &Service) -> Vec<PortRange> {
        match self.current {
            Some(c) => c.cfg.service_ports(s),
            None => s.ports.clone(),
        }
    }

    /// Catalog services a (direction, protocol, port) could be.
    fn services(&self, svc: Target) -> Vec<&Service> {
        self.catalog
            .services
            .iter()
            // An always-allowed service (admin SSH) is never a reason to put
            // an address in its class: that is the operator's decision.
            .filter(|s| !s.always_allow)
            .filter(|s| s.direction == svc.direction && s.protocol == svc.protocol)
            .filter(|s| self.ports(s).iter().any(|r| r.contains(svc.port)))
            .filter(|s| s.features.iter().any(|f| self.feature_on(f) || config::setting_for(f).is_some()))
            .collect()
    }

    /// The feature to turn on for `s` (`None`: one is on).
    fn feature_needed(&self, s: &Service) -> Option<String> {
        if s.features.iter().any(|f| self.feature_on(f)) {
            return None;
        }
        s.features.iter().find(|f| config::setting_for(f).is_some()).cloned()
    }
}

/// The smallest covering prefixes of `addrs`: the whole /24 (IPv4) or /64
/// (IPv6) when at least [`MIN_HOSTS_FOR_NETWORK`] of the addresses are in
/// it and `blocked` does not refuse that network (something that must
/// stay out is in it: another class, an address to investigate), else
/// each host.
pub fn covering_prefixes(addrs: &BTreeSet<IpAddr>, blocked: impl Fn(&Cidr) -> bool) -> Vec<Cidr> {
    let mut nets: BTreeMap<Cidr, Vec<IpAddr>> = BTreeMap::new();
    for &a in addrs {
        nets.entry(network_of(a)).or_default().push(a);
    }
    let mut out = Vec::new();
    for (net, hosts) in nets {
        if hosts.len() >= MIN_HOSTS_FOR_NETWORK && !blocked(&net) {
            out.push(net);
        } else {
            out.extend(hosts.iter().map(|&h| host_prefix(h)));
        }
    }
    out
}

/// The /24 (IPv4) or /64 (IPv6) of an address.
fn network_of(a: IpAddr) -> Cidr {
    Cidr::containing(a, if a.is_ipv4() { 24 } else { 64 })
}

/// The /32 (/128) of an address.
fn host_prefix(a: IpAddr) -> Cidr {
    Cidr::containing(a, if a.is_ipv4() { 32 } else { 128 })
}

fn parse_proto(s: &str) -> Option<Protocol> {
    match s {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    }
}

fn parse_dir(s: &str) -> Option<Direction> {
    match s {
        "inbound" => Some(Direction::Inbound),
        "outbound" => Some(Direction::Outbound),
        _ => None,
    }
}

fn ports_text(svcs: &BTreeSet<Target>) -> String {
    let items: Vec<String> = svcs.iter().map(|s| format!("{}/{}", s.protocol.as_str(), s.port)).collect();
    match items.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// `mfd = [..., "hp"]`.
fn setting_text(s: FeatureSetting) -> String {
    match s {
        FeatureSetting::Flag(k) => format!("{k} = true"),
        FeatureSetting::List(k, v) => format!("{k} = [..., \"{v}\"]"),
        FeatureSetting::One(k, v) => format!("{k} = \"{v}\""),
    }
}

/// `opened tcp/9191; was opened tcp/7627` (by this server).
fn opened_text(svcs: &BTreeSet<Target>) -> String {
    let (inbound, outbound): (BTreeSet<Target>, BTreeSet<Target>) =
        svcs.iter().partition(|s| s.direction == Direction::Inbound);
    let mut parts = Vec::new();
    if !inbound.is_empty() {
        parts.push(format!("opened {}", ports_text(&inbound)));
    }
    if !outbound.is_empty() {
        parts.push(format!("was opened {}", ports_text(&outbound)));
    }
    parts.join("; ")
}

fn prefixes_text(p: &[Cidr]) -> String {
    p.iter().map(host_or_net).collect::<Vec<_>>().join(", ")
}

/// `10.0.0.7` for a host prefix, `10.0.0.0/24` for a network.
fn host_or_net(c: &Cidr) -> String {
    if u32::from(c.prefix_len) == if c.is_v4() { 32 } else { 128 } { c.addr.to_string() } else { c.to_string() }
}

/// Builds the suggestion from what was observed and the current config.
pub fn suggest(obs: &Observed, current: Option<&Current>) -> Report {
    let catalog = Catalog::builtin();
    let mut report = Report::default();
    // (service, remote) -> seen, for the allowable reasons.
    let mut groups: BTreeMap<(Target, IpAddr), Seen> = BTreeMap::new();
    let mut investigate: BTreeMap<(Target, IpAddr), u64> = BTreeMap::new();
    let mut record_classes = BTreeMap::new();
    let mut named_rules = BTreeSet::new();
    for r in &obs.flows {
        let svc = match (parse_dir(&r.direction), parse_proto(&r.protocol)) {
            (Some(direction), Some(protocol)) => {
                let port = if direction == Direction::Inbound { r.local.port } else { r.remote.port };
                Some(Target { direction, protocol, port })
            }
            _ => None,
        };
        let n = 1 + u64::from(r.repeats);
        match svc {
            Some(svc) if r.reason == INVESTIGATE => *investigate.entry((svc, r.remote.addr)).or_default() += n,
            Some(svc) if ALLOWABLE.contains(&r.reason.as_str()) => {
                let seen = groups.entry((svc, r.remote.addr)).or_default();
                seen.port_rules.extend(r.port_rules.iter().cloned());
                named_rules.extend(r.port_rules.iter().cloned());
                record_classes.insert(r.remote.addr, r.peer_classes.clone());
            }
            _ => *report.ignored.entry(r.reason.clone()).or_default() += n,
        }
    }
    report.investigate = investigate.iter().map(|(&(s, a), &n)| (s, a, n)).collect();

    let (enabled, defaults) = match current {
        Some(c) => (c.cfg.features.clone(), role_defaults_unset(c)),
        // Without the config: the features of the rules the records name.
        None => (
            named_rules.iter().filter_map(|id| catalog.service(id)).flat_map(|s| s.features.iter().cloned()).collect(),
            BTreeSet::new(),
        ),
    };
    let mut st = State {
        catalog,
        current,
        enabled,
        defaults,
        planned_features: BTreeSet::new(),
        planned_classes: BTreeMap::new(),
        record_classes,
    };

    let site_rules = |svc: Target| site_rules(current, svc);

    // Step 2: classes for addresses whose classes allow a group of theirs
    // through no service.
    let mut by_addr: BTreeMap<IpAddr, Vec<Target>> = BTreeMap::new();
    for &(svc, a) in groups.keys() {
        by_addr.entry(a).or_default().push(svc);
    }
    let class_order = catalog.class_names();
    for (&addr, svcs) in &by_addr {
        let classes = st.classes(addr);
        let covered_by = |class: &str, svc: Target| -> bool {
            st.services(svc).iter().any(|s| s.peers.iter().any(|p| p == class) && !s.has_endpoints())
                || site_rules(svc).iter().any(|(_, peers)| peers.iter().any(|p| p == class))
        };
        let uncovered: Vec<Target> =
            svcs.iter().copied().filter(|&s| !classes.iter().any(|c| covered_by(c, s))).collect();
        if uncovered.is_empty() {
            continue;
        }
        let opened_by_server = svcs.iter().any(|s| s.direction == Direction::Outbound);
        let mut candidates: BTreeSet<String> = BTreeSet::new();
        // Only a service that is on (or on by default) makes an address a
        // member of its class: a port of a feature that is off (443 of
        // the MFD vendors, ...) says too little about who the host is.
        for &svc in &uncovered {
            for s in st.services(svc).iter().filter(|s| !s.has_endpoints() && st.feature_needed(s).is_none()) {
                candidates.extend(s.peers.iter().cloned());
            }
            for (_, peers) in site_rules(svc) {
                candidates.extend(peers.into_iter().filter(|p| p != "any"));
            }
        }
        // Who is an administrator is the operator's decision, never a
        // suggestion.
        candidates.retain(|c| c != ADMIN && !(opened_by_server && NO_INITIATE.contains(&c.as_str())));
        let best = candidates
            .iter()
            .map(|class| {
                let covered: Vec<Target> = uncovered.iter().copied().filter(|&s| covered_by(class, s)).collect();
                let features: BTreeSet<String> = covered
                    .iter()
                    .filter_map(|&svc| {
                        let all: Vec<&Service> =
                            st.services(svc).into_iter().filter(|s| s.peers.contains(class)).collect();
                        if all.iter().any(|s| st.feature_needed(s).is_none()) {
                            None
                        } else {
                            all.first().and_then(|s| st.feature_needed(s))
                        }
                    })
                    .collect();
                let order = class_order.iter().position(|c| c == class).unwrap_or(usize::MAX);
                (std::cmp::Reverse(covered.len()), features.len(), order, class.clone())
            })
            .min();
        if let Some((_, _, _, class)) = best {
            st.planned_classes.insert(addr, class);
        }
    }

    // Step 3 and 4: per (group, address), the service that allows it.
    // feature -> (services, flows); site rule key -> ports.
    let mut feature_use: BTreeMap<String, Use> = BTreeMap::new();
    let mut class_use: BTreeMap<String, BTreeMap<IpAddr, AddrUse>> = BTreeMap::new();
    let mut unmatched: BTreeMap<(Direction, Protocol, IpAddr), BTreeSet<u16>> = BTreeMap::new();
    // The features to turn on: the fewest that cover every (group,
    // address) no service with a feature on allows (greedy set cover).
    let mut needs: Vec<((Target, IpAddr), BTreeSet<String>)> = groups
        .iter()
        .map(|(&key, seen)| (key, options(&st, key.0, key.1, seen)))
        .filter(|(_, o)| !o.is_empty() && o.iter().all(|o| o.need.is_some()))
        .map(|(key, o)| (key, o.into_iter().filter_map(|o| o.need).collect()))
        .collect();
    // Flows several features would allow equally (a device on 9192: which
    // vendor?): named in a note, not guessed.
    let mut ambiguous: BTreeMap<(Target, IpAddr), BTreeSet<String>> = BTreeMap::new();
    while !needs.is_empty() {
        let mut count: BTreeMap<&String, usize> = BTreeMap::new();
        for (_, n) in &needs {
            for f in n {
                *count.entry(f).or_default() += 1;
            }
        }
        let Some(&most) = count.values().max() else { break };
        let tied: Vec<String> = count.iter().filter(|(_, c)| **c == most).map(|(f, _)| (*f).clone()).collect();
        if let [best] = tied.as_slice() {
            needs.retain(|(_, n)| !n.contains(best));
            st.planned_features.insert(best.clone());
        } else {
            needs.retain(|(key, n)| {
                let keep = !tied.iter().any(|f| n.contains(f));
                if !keep {
                    ambiguous.insert(*key, n.clone());
                }
                keep
            });
        }
    }
    for ((svc, addr), features) in &ambiguous {
        let settings: Vec<String> = features.iter().filter_map(|f| config::setting_for(f)).map(setting_text).collect();
        report.notes.push(format!(
            "{addr} {svc}: as likely one of {} as another: turn on the one that is this host's",
            settings.join(", ")
        ));
    }
    for (&(svc, addr), seen) in groups.iter().filter(|(key, _)| !ambiguous.contains_key(key)) {
        report.flows.push((svc, addr));
        match options(&st, svc, addr, seen).into_iter().next() {
            Some(o) => {
                let service = st.catalog.service(&o.id);
                if let Some(f) = service.and_then(|s| s.features.iter().find(|f| st.planned_features.contains(*f))) {
                    let e = feature_use.entry(f.clone()).or_default();
                    e.0.insert(o.id.clone());
                    e.1.insert(svc);
                    e.2.insert(addr);
                }
                if let Some(class) = st.planned_classes.get(&addr) {
                    let e = class_use.entry(class.clone()).or_default().entry(addr).or_default();
                    e.0.insert(svc);
                    e.1.insert(o.id);
                }
            }
            None => {
                unmatched.entry((svc.direction, svc.protocol, addr)).or_default().insert(svc.port);
            }
        }
    }

    // Addresses that must stay out of another class's prefixes.
    let configured: Vec<(String, Cidr)> = current
        .map(|c| c.cfg.peers.iter().flat_map(|(k, v)| v.iter().map(move |c| (k.clone(), *c))).collect())
        .unwrap_or_default();
    // Every address seen, by network, for the prefixes' check.
    let mut seen_by_net: BTreeMap<Cidr, BTreeSet<IpAddr>> = BTreeMap::new();
    for a in groups.keys().map(|&(_, a)| a).chain(investigate.keys().map(|&(_, a)| a)) {
        seen_by_net.entry(network_of(a)).or_default().insert(a);
    }
    let investigated: BTreeSet<IpAddr> = investigate.keys().map(|&(_, a)| a).collect();
    let blocked = |class: &str, mine: &BTreeSet<IpAddr>, net: &Cidr| -> bool {
        configured.iter().any(|(k, c)| k != class && (net.contains(c) || c.contains(net)))
            || seen_by_net.get(net).is_some_and(|all| all.iter().any(|a| !mine.contains(a) || investigated.contains(a)))
    };

    for (class, addrs) in &class_use {
        let mine: BTreeSet<IpAddr> = addrs.keys().copied().collect();
        let prefixes: BTreeSet<Cidr> = covering_prefixes(&mine, |net| blocked(class, &mine, net)).into_iter().collect();
        let mut by_prefix: BTreeMap<Cidr, Vec<(&IpAddr, &AddrUse)>> = BTreeMap::new();
        for (a, u) in addrs {
            let p = if prefixes.contains(&network_of(*a)) { network_of(*a) } else { host_prefix(*a) };
            by_prefix.entry(p).or_default().push((a, u));
        }
        for (p, inside) in &by_prefix {
            let svcs: BTreeSet<Target> = inside.iter().flat_map(|(_, (s, _))| s.iter().copied()).collect();
            let ids: BTreeSet<String> = inside.iter().flat_map(|(_, (_, i))| i.iter().cloned()).collect();
            let who = if inside.len() == 1 && host_or_net(p) == inside[0].0.to_string() {
                host_or_net(p)
            } else {
                format!("{}: {} hosts", host_or_net(p), inside.len())
            };
            report.suggestions.push(Suggestion {
                change: Change::AddToClass { class: class.clone(), prefixes: vec![*p] },
                text: format!(
                    "{who} {} ({}): add {} to peers.{class}",
                    opened_text(&svcs),
                    ids.into_iter().collect::<Vec<_>>().join(", "),
                    host_or_net(p)
                ),
            });
        }
    }
    for (feature, (ids, svcs, addrs)) in &feature_use {
        let setting = config::setting_for(feature).map_or_else(|| feature.clone(), setting_text);
        let who: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        report.suggestions.push(Suggestion {
            change: Change::EnableFeature { feature: feature.clone() },
            text: format!(
                "{} ({}) matched by flows of {}: turn on features.{setting}",
                ports_text(svcs),
                ids.iter().cloned().collect::<Vec<_>>().join(", "),
                who.join(", ")
            ),
        });
    }
    // Site rules: one per (direction, protocol, ports), of the addresses.
    let mut rules: BTreeMap<(Direction, Protocol, Vec<u16>), BTreeSet<IpAddr>> = BTreeMap::new();
    for ((d, p, a), ports) in unmatched {
        rules.entry((d, p, ports.into_iter().collect())).or_default().insert(a);
    }
    for ((direction, protocol, ports), addrs) in rules {
        let joined = ports.iter().map(u16::to_string).collect::<Vec<_>>().join("-");
        let name = format!("observed-{}-{}-{joined}", direction.as_str(), protocol.as_str());
        let class = name.replace('-', "_");
        let prefixes = covering_prefixes(&addrs, |net| blocked(&class, &addrs, net));
        let svcs: BTreeSet<Target> = ports.iter().map(|&port| Target { direction, protocol, port }).collect();
        // Always-allowed services (admin SSH) are never suggested: say so.
        let always: Vec<String> = catalog
            .services
            .iter()
            .filter(|s| s.always_allow && s.direction == direction && s.protocol == protocol)
            .filter(|s| svcs.iter().any(|t| st.ports(s).iter().any(|r| r.contains(t.port))))
            .map(|s| {
                format!(
                    " ({} is always allowed for peers.{}: add the hosts there instead if they are",
                    s.id,
                    s.peers.join(", peers.")
                ) + " theirs)"
            })
            .collect();
        let services: BTreeSet<String> = svcs
            .iter()
            .flat_map(|&t| st.services(t))
            .map(|s| format!("{} (peers.{})", s.id, s.peers.join("/")))
            .collect();
        let catalog_note = if services.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = services.into_iter().collect();
            format!(
                " (catalog services on these ports, for other classes: {}; if the hosts are one of them, add them to \
                 that class and turn its feature on instead)",
                list.join(", ")
            )
        };
        report.suggestions.push(Suggestion {
            text: format!(
                "{} {} {}: no catalog service of their classes matches: add [[rule]] \"{name}\" for peers.{class} = \
                 [{}]{}{catalog_note}",
                prefixes_text(&prefixes),
                if direction == Direction::Inbound { "opened" } else { "was opened" },
                ports_text(&svcs),
                prefixes_text(&prefixes),
                always.concat()
            ),
            change: Change::SiteRule { name, class, direction, protocol, ports, prefixes },
        });
    }

    rule_usage(obs, current, &mut report);
    if let Some(c) = current {
        match apply(c, &report.suggestions) {
            Ok((text, notes)) => {
                report.notes.extend(notes);
                check_suggested(c, &text, &mut report);
                report.suggested = Some(text);
            }
            Err(e) => report.notes.push(format!("the suggestion could not be written into the config: {e:#}")),
        }
    } else {
        report.notes.push("without --config: no diff, and features are judged from the records only".into());
    }
    report
}

/// Site rules of the config allowing `svc`: (rule id, peer classes).
fn site_rules(current: Option<&Current>, svc: Target) -> Vec<(String, Vec<String>)> {
    let Some(c) = current else { return vec![] };
    let catalog = Catalog::builtin();
    c.policy
        .rules
        .iter()
        .filter(|r| matches!(r.origin, RuleOrigin::Site | RuleOrigin::AlwaysAllow))
        .filter(|r| catalog.service(&r.id).is_none())
        .filter(|r| r.direction == svc.direction && r.protocol == svc.protocol)
        .filter(|r| r.ports.iter().any(|p| p.contains(svc.port)))
        .map(|r| (r.id.clone(), r.peers.clone()))
        .collect()
}

/// A way to allow a (service, address): a catalog service or a site rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Way {
    /// 1 when a feature must be turned on.
    cost: usize,
    /// Not one of the rules the records named for the port.
    unnamed: bool,
    /// Catalog order.
    order: usize,
    id: String,
    need: Option<String>,
}

/// The ways to allow `addr` on `svc` with its classes (planned ones
/// included), best first.
fn options(st: &State, svc: Target, addr: IpAddr, seen: &Seen) -> Vec<Way> {
    let classes = st.classes(addr);
    let mut out: Vec<Way> = st
        .services(svc)
        .iter()
        .filter(|s| {
            let documented_ip = s.ip_prefixes().iter().any(|c| c.contains(&Cidr::containing(addr, 128)));
            documented_ip || s.peers.iter().any(|p| classes.contains(p))
        })
        .enumerate()
        .map(|(order, s)| {
            let need = st.feature_needed(s);
            Way {
                cost: usize::from(need.is_some()),
                unnamed: !seen.port_rules.contains(&s.id),
                order,
                id: s.id.clone(),
                need,
            }
        })
        .collect();
    for (id, peers) in site_rules(st.current, svc) {
        if peers.iter().any(|p| p == "any" || classes.contains(p)) {
            out.push(Way { cost: 0, unnamed: false, order: 0, id, need: None });
        }
    }
    out.sort();
    out
}

/// Catalog features of role defaults the config does not set (they come
/// on as soon as their peer class has addresses).
fn role_defaults_unset(c: &Current) -> BTreeSet<String> {
    let doc: Option<DocumentMut> = c.text.parse().ok();
    let set = |key: &str| doc.as_ref().is_some_and(|d| d.get("features").and_then(|f| f.get(key)).is_some());
    config::default_features(c.cfg.role).into_iter().filter(|(k, _)| !set(k)).flat_map(|(_, f)| f).collect()
}

/// Which rules saw no traffic: only from allowed-flow records of rules the
/// config audits (`[audit] allowed`); counters are not in a log.
fn rule_usage(obs: &Observed, current: Option<&Current>, report: &mut Report) {
    let Some(c) = current else {
        report.rule_usage.push("rules without traffic: cannot tell without --config".into());
        return;
    };
    let counters = "rule counters (`pcguard status`, the pcguard_rule_* metrics) are not in a log and not read \
                    here: check them over the same period";
    let doc: Option<DocumentMut> = c.text.parse().ok();
    let allowed = doc.as_ref().and_then(|d| d.get("audit")).and_then(|a| a.get("allowed")).and_then(Item::as_value);
    let globs: Option<Vec<String>> = match allowed {
        Some(Value::String(s)) if s.value() == "all" => Some(vec!["*".into()]),
        Some(Value::Array(a)) => Some(a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()),
        _ => None,
    };
    let ids: Vec<&str> = c.policy.current_rules().map(|r| r.id.as_str()).collect();
    match (globs, obs.allowed_records) {
        (None, 0) => {
            report.rule_usage.push(
                "rules without traffic: cannot tell: the logs hold no allowed-flow records (flow_start/flow_end). \
                 Turn them on for a period with `[audit] allowed = \"all\"` (or a list of rule ids), then run \
                 suggest again"
                    .into(),
            );
            report.rule_usage.push(counters.into());
        }
        (globs, _) => {
            let audited = |id: &str| globs.as_ref().is_none_or(|g| g.iter().any(|g| glob_match(g, id)));
            let (tell, cannot): (Vec<&str>, Vec<&str>) = ids.iter().partition(|id| audited(id));
            let unused: Vec<String> =
                tell.iter().filter(|id| !obs.rules_with_traffic.contains(**id)).map(|s| s.to_string()).collect();
            let used = tell.len() - unused.len();
            report.rule_usage.push(format!(
                "rules with allowed-flow records: {used} of {} audited ({} records read)",
                tell.len(),
                obs.allowed_records
            ));
            if unused.is_empty() {
                report.rule_usage.push("rules without traffic in the period: none of the audited rules".into());
            } else {
                report.rule_usage.push(format!("rules without traffic in the period: {}", unused.join(", ")));
            }
            if globs.is_none() {
                report.rule_usage.push(
                    "the config has no [audit] allowed: every rule is counted as audited; a rule the daemon did not \
                     audit shows here without traffic"
                        .into(),
                );
            }
            if !cannot.is_empty() {
                report.rule_usage.push(format!("cannot tell (not in [audit] allowed): {}", cannot.join(", ")));
            }
            report.rule_usage.push(counters.into());
            report.unused_rules = unused;
        }
    }
}

/// `*` matches any run of characters; everything else itself.
pub fn glob_match(glob: &str, s: &str) -> bool {
    match glob.split_once('*') {
        None => glob == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else { return false };
            (0..=rest.len()).filter(|&i| rest.is_char_boundary(i)).any(|i| glob_match(tail, &rest[i..]))
        }
    }
}

/// Writes the changes into the config's TOML (comments and layout kept).
/// Returns the new text and notes on what could not be written.
pub fn apply(c: &Current, changes: &[Suggestion]) -> Result<(String, Vec<String>)> {
    let mut doc: DocumentMut = c.text.parse().with_context(|| format!("{}: not TOML", c.path.display()))?;
    let mut notes = Vec::new();
    for s in changes {
        match &s.change {
            Change::AddToClass { class, prefixes } => {
                let own = doc.get("peers").and_then(|p| p.get(class.as_str())).is_some();
                if !own && c.cfg.peers.contains_key(class) {
                    notes.push(format!(
                        "peers.{class} is defined in an included file: add {} there",
                        prefixes_text(prefixes)
                    ));
                    continue;
                }
                add_prefixes(&mut doc, class, prefixes)?;
            }
            Change::EnableFeature { feature } => {
                if let Some(n) = enable_feature(&mut doc, c, feature)? {
                    notes.push(n);
                }
            }
            Change::SiteRule { name, class, direction, protocol, ports, prefixes } => {
                add_prefixes(&mut doc, class, prefixes)?;
                let mut t = Table::new();
                t.insert("name", toml_edit::value(name.as_str()));
                t.insert("description", toml_edit::value("suggested by pcguard suggest from observed flows"));
                t.insert("direction", toml_edit::value(direction.as_str()));
                t.insert("protocol", toml_edit::value(protocol.as_str()));
                t.insert("ports", toml_edit::value(ports.iter().map(|&p| i64::from(p)).collect::<Array>()));
                t.insert("peers", toml_edit::value(Array::from_iter([class.as_str()])));
                let rules = doc.entry("rule").or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
                match rules.as_array_of_tables_mut() {
                    Some(a) => a.push(t),
                    None => bail!("{}: `rule` is not an array of tables", c.path.display()),
                }
            }
        }
    }
    Ok((doc.to_string(), notes))
}

fn table_mut<'d>(doc: &'d mut DocumentMut, key: &str) -> Result<&'d mut Table> {
    let item = doc.entry(key).or_insert(Item::Table(Table::new()));
    item.as_table_mut().with_context(|| format!("`{key}` is not a table"))
}

fn add_prefixes(doc: &mut DocumentMut, class: &str, prefixes: &[Cidr]) -> Result<()> {
    let peers = table_mut(doc, "peers")?;
    let item = peers.entry(class).or_insert(toml_edit::value(Array::new()));
    let arr = item.as_array_mut().with_context(|| format!("peers.{class} is not a list"))?;
    for p in prefixes {
        arr.push(host_or_net(p));
    }
    Ok(())
}

fn enable_feature(doc: &mut DocumentMut, c: &Current, feature: &str) -> Result<Option<String>> {
    let Some(setting) = config::setting_for(feature) else {
        return Ok(Some(format!("feature {feature} has no [features] key")));
    };
    let key = setting.key();
    // A list key the file does not set starts from the role's default.
    let default: Vec<String> = config::default_features(c.cfg.role)
        .into_iter()
        .filter(|(k, _)| k == key)
        .flat_map(|(_, f)| f)
        .filter_map(|f| match config::setting_for(&f) {
            Some(FeatureSetting::List(_, v)) => Some(v),
            _ => None,
        })
        .collect();
    let features = table_mut(doc, "features")?;
    match setting {
        FeatureSetting::Flag(_) => {
            features.insert(key, toml_edit::value(true));
        }
        FeatureSetting::List(_, v) => match features.get_mut(key).and_then(Item::as_array_mut) {
            Some(arr) => arr.push(v.as_str()),
            None => {
                let mut arr: Array = default.iter().map(String::as_str).collect();
                arr.push(v.as_str());
                features.insert(key, toml_edit::value(arr));
            }
        },
        FeatureSetting::One(_, v) => {
            let now = features.get(key).and_then(Item::as_str).map(str::to_string);
            match now.as_deref() {
                None | Some("none" | "internal") => {
                    features.insert(key, toml_edit::value(v.as_str()));
                }
                Some(other) => {
                    return Ok(Some(format!(
                        "features.{key} is \"{other}\": flows matched \"{v}\" too (only one can be set)"
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// Compiles the suggested config and checks every suggested flow against it.
fn check_suggested(c: &Current, text: &str, report: &mut Report) {
    let origin = c.path.display().to_string();
    let cfg = match config::parse(text, &origin) {
        Ok(cfg) => cfg,
        Err(e) => {
            report.notes.push(format!("the suggested config does not validate: {e}"));
            return;
        }
    };
    let policy = match policy::compile(&cfg) {
        Ok(p) => p,
        Err(e) => {
            report.notes.push(format!("the suggested config does not compile: {e}"));
            return;
        }
    };
    for &(svc, addr) in &report.flows {
        if policy.decide(svc.direction, svc.protocol, svc.port, addr).is_none() {
            report.not_allowed_after.push(format!("{addr} {svc}"));
        }
    }
}

/// A unified diff of two texts (3 lines of context), `---`/`+++` named.
pub fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // LCS table, from the end.
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    // Edit script: (' ' | '-' | '+', old index, new index).
    let mut ops = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', i, j));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', i, j));
            i += 1;
        } else {
            ops.push(('+', i, j));
            j += 1;
        }
    }
    let changed: Vec<usize> = ops.iter().enumerate().filter(|(_, o)| o.0 != ' ').map(|(k, _)| k).collect();
    if changed.is_empty() {
        return String::new();
    }
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    const CONTEXT: usize = 3;
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(CONTEXT);
        let mut end = changed[k];
        while k < changed.len() && changed[k] <= end + 2 * CONTEXT + 1 {
            end = changed[k];
            k += 1;
        }
        let end = (end + CONTEXT).min(ops.len() - 1);
        let hunk = &ops[start..=end];
        let old_len = hunk.iter().filter(|o| o.0 != '+').count();
        let new_len = hunk.iter().filter(|o| o.0 != '-').count();
        let (o0, n0) = (hunk[0].1, hunk[0].2);
        let from = |start: usize, len: usize| if len == 0 { start } else { start + 1 };
        let _ = writeln!(out, "@@ -{},{old_len} +{},{new_len} @@", from(o0, old_len), from(n0, new_len));
        for &(op, oi, ni) in hunk {
            let line = if op == '+' { b[ni] } else { a[oi] };
            let _ = writeln!(out, "{op}{line}");
        }
    }
    out
}

/// The report as text: suggestions, what to investigate, rule usage,
/// notes, then the diff.
pub fn render(report: &Report, obs: &Observed, current: Option<&Current>) -> String {
    let mut out = String::new();
    let unexpected = obs.flows.len();
    let _ = writeln!(
        out,
        "# pcguard suggest: {unexpected} unexpected-flow records, {} allowed-flow records{}",
        obs.allowed_records,
        match (&obs.first, &obs.last) {
            (Some(f), Some(l)) => format!(", {f} .. {l}"),
            _ => String::new(),
        }
    );
    let _ = writeln!(out, "\nSuggested changes (review; nothing is applied):");
    if report.suggestions.is_empty() {
        let _ = writeln!(out, "  none: no unexpected flow a config change should allow");
    }
    for (i, s) in report.suggestions.iter().enumerate() {
        let _ = writeln!(out, "  {}. {}", i + 1, s.text);
    }
    if !report.investigate.is_empty() {
        let _ = writeln!(
            out,
            "\nInvestigate (this server opened flows to workstations or secondary servers; never suggested):"
        );
        for (svc, addr, n) in &report.investigate {
            let _ = writeln!(out, "  {addr} {svc}: {n} flows");
        }
    }
    if !report.ignored.is_empty() {
        let list: Vec<String> = report.ignored.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(out, "\nNot about the policy (no suggestion): {}", list.join(", "));
    }
    let _ = writeln!(out, "\nRule usage:");
    for l in &report.rule_usage {
        let _ = writeln!(out, "  {l}");
    }
    if !report.notes.is_empty() || !report.not_allowed_after.is_empty() {
        let _ = writeln!(out, "\nNotes:");
        for n in &report.notes {
            let _ = writeln!(out, "  {n}");
        }
        for f in &report.not_allowed_after {
            let _ = writeln!(out, "  still not allowed by the suggested config: {f}");
        }
    }
    if let (Some(c), Some(text)) = (current, &report.suggested) {
        let name = c.path.display().to_string();
        let diff = unified_diff(c.text, text, &name, &format!("{name} (suggested)"));
        let _ = writeln!(out, "\nDiff:");
        out.push_str(if diff.is_empty() { "  (no change)\n" } else { &diff });
    }
    out
}

#[cfg(test)]
mod tests;
