//! The site config (TOML): what this server is, which peers it talks to and
//! which PaperCut features it uses. `parse` validates everything (syntax,
//! unknown keys, CIDRs, feature values against the catalog, peers a
//! feature needs, site rules) and reports the first problem with the file,
//! line and key. See docs/config.md for every key.

mod features;
mod raw;
mod rules;
mod span;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

pub use features::{FeatureSetting, default_features, setting_for};
pub use raw::parse_duration;
use raw::{RawConfig, RawInclude, Seconds, SpannedList};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    catalog::{Catalog, Service},
    model::{Cidr, Direction, PortRange, Protocol},
};

pub const DEFAULT_AUDIT_PATH: &str = "/var/log/pcguard/flows.jsonl";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9750";
pub const DEFAULT_TCP_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// Unexpected-flow records the daemon writes per second at most; beyond,
/// one summary record per report interval counts what was left out.
pub const DEFAULT_MAX_RECORDS_PER_SECOND: u32 = 100;
/// Allowed-flow records (`flow_start`, `flow_end`) the daemon writes per
/// second at most (`[audit] max_flow_records_per_second`); beyond, they
/// are counted in the summary record.
pub const DEFAULT_MAX_FLOW_RECORDS_PER_SECOND: u32 = 200;
/// Conntrack table sizes (`[conntrack] max_entries`, `new_entries`).
pub const CONNTRACK_ENTRIES_RANGE: (u64, u64) = (1024, 16_777_216);
/// The pseudo peer class every address belongs to.
pub const CLASS_ANY_NAME: &str = "any";

/// What this server is in the PaperCut deployment.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The primary Application Server.
    Primary,
    /// A secondary (print) server.
    Secondary,
    /// A site server.
    SiteServer,
    /// A self-hosted Document Processing server.
    DocumentProcessing,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::SiteServer => "site-server",
            Role::DocumentProcessing => "document-processing",
        }
    }
}

/// Where the ingress pipeline runs on each interface (docs/performance.md,
/// "Which ingress hook").
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngressHook {
    /// Per interface, by driver: TC where native XDP costs throughput or
    /// needs offloads off (veth, virtio-net), native XDP elsewhere, TC if
    /// native XDP cannot attach.
    #[default]
    Auto,
    /// XDP: native, or generic (skb) mode where native fails (a warning).
    Xdp,
    /// TC ingress (tcx), after GRO.
    Tc,
}

impl IngressHook {
    pub fn as_str(self) -> &'static str {
        match self {
            IngressHook::Auto => "auto",
            IngressHook::Xdp => "xdp",
            IngressHook::Tc => "tc",
        }
    }
}

/// What happens to a new flow no rule allows (`mode`, `egress_mode`): the
/// kernel's code, whose names are the config's values.
pub use pcguard_common::Mode;

/// A `[[rule]]` or `[[always_allow.rule]]` of the site config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteRule {
    pub name: String,
    pub description: String,
    pub direction: Direction,
    pub protocol: Protocol,
    pub ports: Vec<PortRange>,
    /// Peer class names, or `any`.
    pub peers: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    /// Idle timeout of an open TCP flow.
    pub tcp: Duration,
    /// Idle timeout of a TCP flow after FIN.
    pub tcp_closing: Duration,
    /// Idle timeout of a UDP flow.
    pub udp: Duration,
    /// Entries of the established-flows table (`CONNTRACK`).
    pub max_entries: u32,
    /// Entries of the new-flows table (`CT_NEW`).
    pub new_entries: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// JSON-lines flow audit log.
    pub path: PathBuf,
    /// A flow is reported at most once per this interval.
    pub report_interval: Duration,
    /// Unexpected-flow records written per second at most.
    pub max_records_per_second: u32,
    /// Group that may read the audit log and the state file (a log
    /// shipper's); `None`: root only.
    pub group: Option<String>,
    /// Record format (file and syslog).
    pub format: AuditFormat,
    /// `syslog = true`: records also go to this socket, with this facility.
    pub syslog: Option<(PathBuf, crate::syslog::Facility)>,
    /// Rules whose allowed flows get `flow_start` / `flow_end` records.
    pub allowed: AuditAllowed,
    /// Those records written per second at most.
    pub max_flow_records_per_second: u32,
}

/// Which rules' allowed flows are recorded (`[audit] allowed`): none (the
/// default), all, or the rules whose id matches one of the globs (`*`: any
/// run of characters, `?`: one character).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AuditAllowed {
    #[default]
    None,
    All,
    Rules(Vec<String>),
}

impl AuditAllowed {
    /// Whether the flows of rule `id` are recorded.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            AuditAllowed::None => false,
            AuditAllowed::All => true,
            AuditAllowed::Rules(globs) => globs.iter().any(|g| glob_match(g, id)),
        }
    }
}

/// Whether `text` matches `pattern` as a whole (`*`: any run of characters,
/// `?`: any one character, anything else itself). Linear backtracking on
/// the last `*`, so no pattern is exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The audit records' format (`[audit] format`, docs/audit.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    /// pcguard's own fields (schema 1).
    #[default]
    Json,
    /// Elastic Common Schema 8.x field names.
    Ecs,
}

impl AuditFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditFormat::Json => "json",
            AuditFormat::Ecs => "ecs",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint.
    pub listen: SocketAddr,
}

/// A validated site config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteConfig {
    /// The file it was read from (for messages).
    pub origin: String,
    pub role: Role,
    pub interfaces: Vec<String>,
    /// Mode for new inbound flows.
    pub mode: Mode,
    /// Mode for new outbound flows (defaults to `mode`).
    pub egress_mode: Mode,
    pub allow_icmp: bool,
    /// Where the ingress pipeline runs.
    pub ingress_hook: IngressHook,
    /// Peer classes with at least one address: name -> CIDRs (normalized,
    /// deduplicated, sorted).
    pub peers: BTreeMap<String, Vec<Cidr>>,
    /// Enabled catalog feature keys (`web`, `mfd:hp`, `database:postgresql`, ...).
    pub features: BTreeSet<String>,
    /// Catalog service id -> ports replacing the documented ones
    /// (`features.database_port`, `always_allow.ssh_port`).
    pub port_overrides: BTreeMap<String, Vec<PortRange>>,
    pub rules: Vec<SiteRule>,
    pub always_allow: Vec<SiteRule>,
    pub conntrack: ConntrackTimeouts,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    /// Warnings for the operator (defaults skipped, lock-out risk, ...).
    pub notes: Vec<String>,
}

impl SiteConfig {
    pub fn report_interval(&self) -> Duration {
        self.audit.report_interval
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit.path
    }

    pub fn metrics_listen(&self) -> SocketAddr {
        self.metrics.listen
    }

    /// Catalog services enabled by the features, in catalog order.
    pub fn enabled_services(&self) -> impl Iterator<Item = &'static Service> + '_ {
        Catalog::builtin().services.iter().filter(|s| s.features.iter().any(|f| self.features.contains(f)))
    }

    /// The classes of `service` this site can use (see [`service_peers`]).
    pub fn service_peers(&self, service: &Service) -> Vec<String> {
        service_peers(&self.peers, service)
    }

    /// The ports of an enabled service, after overrides.
    pub fn service_ports(&self, service: &Service) -> Vec<PortRange> {
        self.port_overrides.get(&service.id).cloned().unwrap_or_else(|| service.ports.clone())
    }
}

/// The peer classes of `service` that have addresses: configured in
/// `peers`, or, for a service with documented endpoints (cloud FQDNs /
/// IPs), its own class.
pub fn service_peers(peers: &BTreeMap<String, Vec<Cidr>>, service: &Service) -> Vec<String> {
    service.peers.iter().filter(|c| peers.contains_key(*c) || service.has_endpoints()).cloned().collect()
}

/// A config problem: `file:line: key: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub line: Option<usize>,
    /// Dotted key (`peers.workstations`, `rule[0].ports`); may be empty.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates a site config file.
pub fn load(path: &Path) -> Result<SiteConfig, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        origin: origin.clone(),
        line: None,
        key: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, &origin)
}

/// Validates a site config; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<SiteConfig, ConfigError> {
    let ctx = Ctx { text, origin };
    check_line_endings(&ctx)?;
    // Syntax first, on its own: its errors point at where the parser gave
    // up, and are named after the statement in progress there.
    if let Err(e) = text.parse::<toml::Table>() {
        return Err(ctx.toml_error(&e, true));
    }
    let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.toml_error(&e, false))?;
    let mut places = BTreeMap::new();
    let mut peers = parse_peers(&ctx, &raw.peers, &mut places)?;
    let included = include_peers(&ctx, &raw, &mut peers, &mut places)?;
    check_site_servers(&peers, &places)?;
    let mut names = HashSet::new();
    let rules = rules::validate(&ctx, &raw.rules, "rule", &peers, &mut names)?;
    let always_allow = rules::validate(&ctx, &raw.always_allow.rules, "always_allow.rule", &peers, &mut names)?;
    check_custom_classes(&ctx, &raw, &rules, &always_allow)?;
    let resolved = features::resolve(&ctx, &raw, &peers)?;
    let mode = *raw.mode.get_ref();
    let egress_mode = raw.egress_mode.unwrap_or(mode);
    let mut notes = included;
    notes.extend(resolved.notes);
    notes.extend(lockout_note(mode, &resolved.features, &always_allow));
    Ok(SiteConfig {
        origin: origin.to_string(),
        role: *raw.role.get_ref(),
        interfaces: parse_interfaces(&ctx, &raw.interfaces)?,
        mode,
        egress_mode,
        allow_icmp: raw.allow_icmp.unwrap_or(true),
        ingress_hook: raw.ingress_hook.unwrap_or_default(),
        peers,
        features: resolved.features,
        port_overrides: resolved.port_overrides,
        rules,
        always_allow,
        conntrack: ConntrackTimeouts {
            tcp: ctx.duration(&raw.conntrack.tcp_timeout, "conntrack.tcp_timeout", DEFAULT_TCP_TIMEOUT)?,
            tcp_closing: ctx.duration(
                &raw.conntrack.tcp_closing_timeout,
                "conntrack.tcp_closing_timeout",
                DEFAULT_TCP_CLOSING_TIMEOUT,
            )?,
            udp: ctx.duration(&raw.conntrack.udp_timeout, "conntrack.udp_timeout", DEFAULT_UDP_TIMEOUT)?,
            max_entries: ctx.count(
                &raw.conntrack.max_entries,
                "conntrack.max_entries",
                CONNTRACK_ENTRIES_RANGE,
                pcguard_common::CONNTRACK_ENTRIES,
            )?,
            new_entries: ctx.count(
                &raw.conntrack.new_entries,
                "conntrack.new_entries",
                CONNTRACK_ENTRIES_RANGE,
                pcguard_common::CT_NEW_ENTRIES,
            )?,
        },
        audit: AuditConfig {
            path: raw.audit.path.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_AUDIT_PATH)),
            report_interval: ctx.duration(
                &raw.audit.report_interval,
                "audit.report_interval",
                DEFAULT_REPORT_INTERVAL,
            )?,
            max_records_per_second: ctx.count(
                &raw.audit.max_records_per_second,
                "audit.max_records_per_second",
                (1, 100_000),
                DEFAULT_MAX_RECORDS_PER_SECOND,
            )?,
            group: match &raw.audit.group {
                None => None,
                Some(g) => {
                    let name = g.get_ref();
                    let valid = !name.is_empty()
                        && name.len() <= 32
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
                    if !valid {
                        return Err(ctx.error(
                            Some(g.span()),
                            "audit.group",
                            format!("\"{name}\" is not a group name"),
                        ));
                    }
                    Some(name.clone())
                }
            },
            format: raw.audit.format.unwrap_or_default(),
            syslog: match (raw.audit.syslog, &raw.audit.syslog_socket) {
                (Some(true), socket) => {
                    let path = socket
                        .as_ref()
                        .map(|s| s.get_ref().clone())
                        .unwrap_or_else(|| PathBuf::from(crate::syslog::DEFAULT_SOCKET));
                    if !path.is_absolute() {
                        return Err(ctx.error(
                            socket.as_ref().map(|s| s.span()),
                            "audit.syslog_socket",
                            format!("\"{}\" is not an absolute path", path.display()),
                        ));
                    }
                    Some((path, raw.audit.syslog_facility.as_ref().map(|f| *f.get_ref()).unwrap_or_default()))
                }
                (_, Some(socket)) => {
                    return Err(ctx.error(
                        Some(socket.span()),
                        "audit.syslog_socket",
                        "set, but syslog is not on (add `syslog = true`)",
                    ));
                }
                (_, None) => match &raw.audit.syslog_facility {
                    Some(f) => {
                        return Err(ctx.error(
                            Some(f.span()),
                            "audit.syslog_facility",
                            "set, but syslog is not on (add `syslog = true`)",
                        ));
                    }
                    None => None,
                },
            },
            allowed: audit_allowed(&ctx, &raw.audit.allowed)?,
            max_flow_records_per_second: ctx.count(
                &raw.audit.max_flow_records_per_second,
                "audit.max_flow_records_per_second",
                (1, 100_000),
                DEFAULT_MAX_FLOW_RECORDS_PER_SECOND,
            )?,
        },
        metrics: MetricsConfig {
            listen: raw.metrics.listen.unwrap_or_else(|| DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
        },
        notes,
    })
}

/// `[audit] allowed`: `"all"`, or globs of rule ids (letters, digits,
/// `-`, `_`, `.`, `*`, `?`).
fn audit_allowed(ctx: &Ctx, value: &Option<Spanned<toml::Value>>) -> Result<AuditAllowed, ConfigError> {
    let Some(v) = value else { return Ok(AuditAllowed::None) };
    let err = |message: String| ctx.error(Some(v.span()), "audit.allowed", message);
    let expected = "expected \"all\" or a list of rule ids (e.g. [\"admin-ssh\", \"web-*\"])";
    match v.get_ref() {
        toml::Value::String(w) if w == "all" => Ok(AuditAllowed::All),
        toml::Value::String(w) => Err(err(format!("\"{w}\" is neither \"all\" nor a list: {expected}"))),
        toml::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                let Some(s) = item.as_str() else {
                    return Err(err(format!("{item} is not a rule id: {expected}")));
                };
                if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.*?".contains(c)) {
                    return Err(err(format!(
                        "\"{s}\" is not a rule id glob (letters, digits, '-', '_', '.', '*', '?')"
                    )));
                }
                out.push(s.to_string());
            }
            Ok(if out.is_empty() { AuditAllowed::None } else { AuditAllowed::Rules(out) })
        }
        other => Err(err(format!("{other} is not {expected}"))),
    }
}

/// Where errors point: the config text and its name.
struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Ctx<'_> {
    fn error(&self, span: Option<Range<usize>>, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.origin.to_string(),
            line: span::line_of_span(self.text, span),
            key: key.into(),
            message: message.into(),
        }
    }

    /// A TOML error: `syntax` for one of the parser (named after the
    /// statement in progress), else one of the config's shape (named after
    /// the key at the error).
    fn toml_error(&self, e: &toml::de::Error, syntax: bool) -> ConfigError {
        let start = e.span().map(|s| s.start).unwrap_or(0);
        let (table, key) = if syntax { span::statement_at(self.text, start) } else { span::key_at(self.text, start) };
        let mut message = e.message().trim().replace('\n', "; ");
        if message.is_empty() {
            message = "invalid TOML".to_string();
        }
        // A missing field is reported on its table, not on the last key.
        let key = if message.starts_with("missing field") { table } else { span::join_key(&table, &key) };
        self.error(e.span(), key, message)
    }

    /// A whole number in `range` (inclusive), or `default`.
    fn count(
        &self,
        value: &Option<Spanned<u64>>,
        key: &str,
        (min, max): (u64, u64),
        default: u32,
    ) -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if (min..=max).contains(v.get_ref()) => Ok(*v.get_ref() as u32),
            Some(v) => {
                Err(self.error(Some(v.span()), key, format!("{} is out of range ({min} to {max})", v.get_ref())))
            }
        }
    }

    fn duration(
        &self,
        value: &Option<Spanned<Seconds>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if v.get_ref().0.is_zero() => Err(self.error(Some(v.span()), key, "must be greater than 0")),
            Some(v) => Ok(v.get_ref().0),
        }
    }
}

/// TOML ends lines with LF or CRLF; a bare CR (old Mac line endings) is
/// not a line break, and the TOML parser reports it without a message.
fn check_line_endings(ctx: &Ctx) -> Result<(), ConfigError> {
    let bytes = ctx.text.as_bytes();
    let bare_cr = (0..bytes.len()).find(|&i| bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n'));
    match bare_cr {
        None => Ok(()),
        Some(i) => Err(ctx.error(
            Some(i..i + 1),
            "",
            "a line ends with a bare carriage return (CR); save the file with LF (or CRLF) line endings",
        )),
    }
}

fn parse_interfaces(ctx: &Ctx, list: &SpannedList) -> Result<Vec<String>, ConfigError> {
    if list.get_ref().is_empty() {
        return Err(ctx.error(Some(list.span()), "interfaces", "at least one interface is required"));
    }
    let mut seen = HashSet::new();
    for name in list.get_ref() {
        let n = name.get_ref();
        let valid = !n.is_empty()
            && n.len() <= 15
            && n != "."
            && n != ".."
            && !n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
        let why = if !valid {
            "invalid interface name (1-15 characters, no '/', ':' or spaces)"
        } else if !seen.insert(n.as_str()) {
            "duplicate interface"
        } else {
            continue;
        };
        return Err(ctx.error(Some(name.span()), "interfaces", format!("\"{n}\": {why}")));
    }
    Ok(list.get_ref().iter().map(|n| n.get_ref().clone()).collect())
}

/// Where a peer class is defined: (file, line).
type Places = BTreeMap<String, (String, Option<usize>)>;

fn parse_peers(
    ctx: &Ctx,
    table: &BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    places: &mut Places,
) -> Result<BTreeMap<String, Vec<Cidr>>, ConfigError> {
    let mut peers = BTreeMap::new();
    for (name, cidrs) in table {
        places
            .insert(name.get_ref().clone(), (ctx.origin.to_string(), span::line_of_span(ctx.text, Some(name.span()))));
        let key = format!("peers.{}", name.get_ref());
        check_class_name(ctx, name, &key)?;
        let mut parsed = BTreeSet::new();
        for c in cidrs {
            let cidr = c.get_ref().parse::<Cidr>().map_err(|e| ctx.error(Some(c.span()), key.as_str(), e))?;
            parsed.insert(cidr);
        }
        if !parsed.is_empty() {
            peers.insert(name.get_ref().clone(), parsed.into_iter().collect());
        }
    }
    Ok(peers)
}

/// `include = [...]`: reads each file's `[peers]` into `peers`. A class
/// is defined in one file only; errors name the included file and line
/// (or, for a file that cannot be read, the `include` line). Returns notes
/// saying which classes came from where, and which custom classes no rule
/// of this config uses.
fn include_peers(
    ctx: &Ctx,
    raw: &RawConfig,
    peers: &mut BTreeMap<String, Vec<Cidr>>,
    places: &mut Places,
) -> Result<Vec<String>, ConfigError> {
    let Some(list) = &raw.include else {
        return Ok(Vec::new());
    };
    let base = Path::new(ctx.origin).parent().unwrap_or(Path::new(""));
    let used: HashSet<&str> = raw
        .rules
        .iter()
        .chain(&raw.always_allow.rules)
        .flat_map(|r| r.peers.get_ref().iter().map(|p| p.get_ref().as_str()))
        .collect();
    let builtin = Catalog::builtin().class_names();
    let mut notes = Vec::new();
    for entry in list.get_ref() {
        let path = base.join(entry.get_ref());
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ctx.error(Some(entry.span()), "include", format!("cannot read {}: {e}", path.display())))?;
        let origin = path.display().to_string();
        let inc = Ctx { text: &text, origin: &origin };
        check_line_endings(&inc)?;
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(inc.toml_error(&e, true));
        }
        let file: RawInclude = toml::from_str(&text).map_err(|e| inc.toml_error(&e, false))?;
        for name in file.peers.keys() {
            if let Some((other, line)) = places.get(name.get_ref()) {
                let at = line.map_or(String::new(), |l| format!(":{l}"));
                return Err(inc.error(
                    Some(name.span()),
                    format!("peers.{}", name.get_ref()),
                    format!("also defined in {other}{at}: define each class in one file only"),
                ));
            }
        }
        let found = parse_peers(&inc, &file.peers, places)?;
        let names: Vec<&str> = file.peers.keys().map(|k| k.get_ref().as_str()).collect();
        notes.push(format!(
            "included {origin}: peers {}",
            if names.is_empty() { "(none)".into() } else { names.join(", ") }
        ));
        for n in names.iter().filter(|n| !builtin.contains(n) && !used.contains(*n)) {
            notes.push(format!("peers.{n} (custom class from {origin}) is used by no rule of this config"));
        }
        peers.extend(found);
    }
    Ok(notes)
}

/// Site Servers connect to and from the primary: an address in
/// `site_servers` and in a class the server never connects to
/// (`workstations`, `secondary_servers`) would make the primary's
/// connections to it `outbound_to_workstation`.
fn check_site_servers(peers: &BTreeMap<String, Vec<Cidr>>, places: &Places) -> Result<(), ConfigError> {
    let Some(sites) = peers.get(SITE_SERVERS) else {
        return Ok(());
    };
    for class in NO_INITIATE_CLASSES {
        for (a, b) in sites.iter().flat_map(|a| peers.get(class).into_iter().flatten().map(move |b| (a, b))) {
            if a.contains(b) || b.contains(a) {
                let (origin, line) = places.get(SITE_SERVERS).cloned().unwrap_or_default();
                return Err(ConfigError {
                    origin,
                    line,
                    key: "peers.site_servers".into(),
                    message: format!(
                        "{a} overlaps {b} of peers.{class}: this server never connects to {class}, and it connects \
                         to its Site Servers; list a Site Server in site_servers only"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The peer class of Site Servers (both directions with the primary).
pub const SITE_SERVERS: &str = "site_servers";
/// Classes this server never opens a flow to (the kernel's
/// `no_initiate_mask`).
pub const NO_INITIATE_CLASSES: [&str; 2] = ["workstations", "secondary_servers"];

fn check_class_name(ctx: &Ctx, name: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let n = name.get_ref();
    let well_formed = n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if n == CLASS_ANY_NAME {
        Err(ctx.error(Some(name.span()), key, "\"any\" is built in (every address) and takes no CIDRs"))
    } else if !well_formed {
        Err(ctx.error(Some(name.span()), key, "class names are lowercase letters, digits and '_'"))
    } else {
        Ok(())
    }
}

/// A class in `[peers]` that is not built in must be used by a site rule
/// (so a misspelt built-in class is reported, not silently ignored).
fn check_custom_classes(
    ctx: &Ctx,
    raw: &RawConfig,
    rules: &[SiteRule],
    always: &[SiteRule],
) -> Result<(), ConfigError> {
    let builtin = Catalog::builtin().class_names();
    let used: HashSet<&str> = rules.iter().chain(always).flat_map(|r| r.peers.iter().map(String::as_str)).collect();
    for name in raw.peers.keys() {
        let n = name.get_ref().as_str();
        if !builtin.contains(&n) && !used.contains(n) {
            return Err(ctx.error(
                Some(name.span()),
                format!("peers.{n}"),
                format!(
                    "unknown peer class \"{n}\" (built-in classes: {}; a custom class must be used by a [[rule]])",
                    builtin.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn lockout_note(mode: Mode, features: &BTreeSet<String>, always: &[SiteRule]) -> Option<String> {
    let protected = features.contains("admin_ssh") || !always.is_empty();
    (mode == Mode::Enforce && !protected).then(|| {
        "mode is enforce and nothing is always allowed (no peers.admin): SSH to this server is dropped \
         unless a rule allows it; try mode = \"monitor\" first"
            .to_string()
    })
}

#[cfg(test)]
mod tests;
