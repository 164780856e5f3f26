//! `pcguard flows` over what was recorded: a set of audit logs (the live
//! file and its rotated, possibly gzipped siblings), the filters
//! (`--type`, `--rule`, ...) and the summary (`--summary by=...`).
//!
//! Lines are read into [`Fields`], a struct of only the fields the filters
//! and the summary need, borrowing its strings from the line (no
//! `serde_json::Value` per line); a line with escapes in one of those
//! strings is read again into owned strings, an ECS line through
//! [`super::from_ecs`]. docs/audit.md, "Querying the log".

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs::File,
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{AuditRecord, Filter};

/// Which records `--type` selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// `unexpected_flow` and `dns_poisoning` records (the default, as
    /// before allowed-flow records existed).
    #[default]
    Unexpected,
    /// `flow_start` and `flow_end` records.
    Allowed,
    /// Both.
    All,
}

impl Kind {
    pub const NAMES: [&'static str; 3] = ["unexpected", "allowed", "all"];

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "unexpected" => Ok(Kind::Unexpected),
            "allowed" => Ok(Kind::Allowed),
            "all" => Ok(Kind::All),
            _ => Err(format!("unknown record type \"{s}\" (one of: {})", Self::NAMES.join(", "))),
        }
    }
}

/// What a record is, for the filters and the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `unexpected_flow` or `dns_poisoning` (schema 1 or earlier).
    Unexpected,
    FlowStart,
    FlowEnd,
}

#[derive(Debug, Deserialize, Serialize, Default, Clone, PartialEq, Eq)]
#[serde(bound(deserialize = "S: Deserialize<'de>"))]
pub struct EndpointFields<S> {
    pub addr: S,
    pub port: u16,
}

/// The fields of a record `pcguard flows` reads; `S` is `&str` (borrowed
/// from the line) or `String`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(bound(deserialize = "S: Deserialize<'de>"))]
pub struct Fields<S> {
    pub ts: Option<S>,
    pub event_type: Option<S>,
    /// Summaries from before schema 1 (`"event": "audit_summary"`); an
    /// object in ECS records.
    pub event: Option<serde::de::IgnoredAny>,
    pub severity: Option<S>,
    pub reason: Option<S>,
    pub direction: Option<S>,
    pub protocol: Option<S>,
    pub local: Option<EndpointFields<S>>,
    pub remote: Option<EndpointFields<S>>,
    pub peer_classes: Option<Vec<S>>,
    /// Unexpected records: the rules covering the port.
    pub port_rules: Option<Vec<S>>,
    /// Allowed records: the rule that allowed the flow.
    pub rule: Option<S>,
    pub interface: Option<S>,
    pub packet_bytes: Option<u64>,
    pub repeats: Option<u64>,
    pub dns_address: Option<S>,
    /// `flow_end`.
    pub started: Option<S>,
    pub duration_ms: Option<u64>,
    pub packets_in: Option<u64>,
    pub bytes_in: Option<u64>,
    pub packets_out: Option<u64>,
    pub bytes_out: Option<u64>,
    pub end_reason: Option<S>,
    /// Only present in ECS records.
    #[serde(rename = "@timestamp")]
    pub ecs_timestamp: Option<serde::de::IgnoredAny>,
}

fn opt<S: AsRef<str>>(s: &Option<S>) -> &str {
    s.as_ref().map_or("", AsRef::as_ref)
}

impl<S: AsRef<str>> Fields<S> {
    /// What the record is; `None` for summaries and event types
    /// `pcguard flows` does not show.
    pub fn kind(&self) -> Option<RecordKind> {
        match self.event_type.as_ref().map(AsRef::as_ref) {
            None if self.event.is_some() => None,
            None | Some("unexpected_flow" | "dns_poisoning") => Some(RecordKind::Unexpected),
            Some("flow_start") => Some(RecordKind::FlowStart),
            Some("flow_end") => Some(RecordKind::FlowEnd),
            Some(_) => None,
        }
    }

    /// The event type, also for records from before schema 1.
    pub fn event_type(&self) -> &str {
        match self.event_type.as_ref() {
            Some(t) => t.as_ref(),
            None if opt(&self.reason) == super::DNS_POISONING => "dns_poisoning",
            None => "unexpected_flow",
        }
    }

    fn has_rule(&self, pattern: &str) -> bool {
        match &self.rule {
            Some(r) => glob_match(pattern, r.as_ref()),
            None => self.port_rules.iter().flatten().any(|r| glob_match(pattern, r.as_ref())),
        }
    }

    fn has_addr(&self, a: IpAddr) -> bool {
        let is = |s: &str| s.parse::<IpAddr>() == Ok(a);
        self.local.as_ref().is_some_and(|e| is(e.addr.as_ref()))
            || self.remote.as_ref().is_some_and(|e| is(e.addr.as_ref()))
            || self.dns_address.as_ref().is_some_and(|s| is(s.as_ref()))
    }

    /// The owned copy of these fields.
    pub fn to_owned_fields(&self) -> Fields<String> {
        let s = |x: &Option<S>| x.as_ref().map(|v| v.as_ref().to_string());
        let e = |x: &Option<EndpointFields<S>>| {
            x.as_ref().map(|e| EndpointFields { addr: e.addr.as_ref().to_string(), port: e.port })
        };
        let v = |x: &Option<Vec<S>>| x.as_ref().map(|v| v.iter().map(|s| s.as_ref().to_string()).collect());
        Fields {
            ts: s(&self.ts),
            event_type: s(&self.event_type),
            event: self.event,
            severity: s(&self.severity),
            reason: s(&self.reason),
            direction: s(&self.direction),
            protocol: s(&self.protocol),
            local: e(&self.local),
            remote: e(&self.remote),
            peer_classes: v(&self.peer_classes),
            port_rules: v(&self.port_rules),
            rule: s(&self.rule),
            interface: s(&self.interface),
            packet_bytes: self.packet_bytes,
            repeats: self.repeats,
            dns_address: s(&self.dns_address),
            started: s(&self.started),
            duration_ms: self.duration_ms,
            packets_in: self.packets_in,
            bytes_in: self.bytes_in,
            packets_out: self.packets_out,
            bytes_out: self.bytes_out,
            end_reason: s(&self.end_reason),
            ecs_timestamp: None,
        }
    }

    /// One-line human form of an allowed-flow record (unexpected ones use
    /// [`AuditRecord::human`]).
    pub fn human_allowed(&self) -> String {
        let ep = |e: &Option<EndpointFields<S>>| match e {
            Some(e) if e.addr.as_ref().contains(':') => format!("[{}]:{}", e.addr.as_ref(), e.port),
            Some(e) => format!("{}:{}", e.addr.as_ref(), e.port),
            None => "?".into(),
        };
        let inbound = opt(&self.direction) == "inbound";
        let (src, dst) = if inbound { (&self.remote, &self.local) } else { (&self.local, &self.remote) };
        let classes: Vec<&str> = self.peer_classes.iter().flatten().map(AsRef::as_ref).collect();
        let mut line = format!(
            "{} INFO    {:24} {:8} {:3} {} -> {}  peer={} rule={} if={}",
            opt(&self.ts),
            self.event_type(),
            opt(&self.direction),
            opt(&self.protocol),
            ep(src),
            ep(dst),
            classes.join(","),
            opt(&self.rule),
            opt(&self.interface),
        );
        if self.kind() == Some(RecordKind::FlowEnd) {
            line += &format!(
                "  [{} after {} ms: in {} pkts {} B, out {} pkts {} B]",
                opt(&self.end_reason),
                self.duration_ms.unwrap_or(0),
                self.packets_in.unwrap_or(0),
                self.bytes_in.unwrap_or(0),
                self.packets_out.unwrap_or(0),
                self.bytes_out.unwrap_or(0)
            );
        }
        line
    }
}

impl Fields<String> {
    /// The fields of an unexpected-flow record.
    fn from_record(r: &AuditRecord, event_type: &str) -> Self {
        let ep = |e: &super::Endpoint| EndpointFields { addr: e.addr.to_string(), port: e.port };
        Fields {
            ts: Some(r.ts.clone()),
            event_type: Some(event_type.into()),
            severity: Some(r.severity.clone()),
            reason: Some(r.reason.clone()),
            direction: Some(r.direction.clone()),
            protocol: Some(r.protocol.clone()),
            local: Some(ep(&r.local)),
            remote: Some(ep(&r.remote)),
            peer_classes: Some(r.peer_classes.clone()),
            port_rules: Some(r.port_rules.clone()),
            interface: Some(r.interface.clone()),
            packet_bytes: Some(r.packet_bytes.into()),
            repeats: Some(r.repeats.into()),
            dns_address: r.dns_address.map(|a| a.to_string()),
            ..Default::default()
        }
    }

    /// An ECS line: unexpected records through [`super::from_ecs`];
    /// allowed ones from `pcguard.*` (the `json` format's names) and
    /// `source`/`destination`.
    fn from_ecs(v: &serde_json::Value) -> Option<Self> {
        let p = v.get("pcguard")?;
        let ty = p.get("event_type")?.as_str()?;
        if let Some(r) = super::from_ecs(v) {
            return Some(Self::from_record(&r, ty));
        }
        if !matches!(ty, "flow_start" | "flow_end") {
            return None;
        }
        let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
        let n = |k: &str| p.get(k).and_then(serde_json::Value::as_u64);
        let endpoint = |e: &serde_json::Value| {
            Some(EndpointFields {
                addr: e.get("ip")?.as_str()?.to_string(),
                port: u16::try_from(e.get("port")?.as_u64()?).ok()?,
            })
        };
        let direction = s(&p["direction"])?;
        let (src, dst) = (endpoint(&v["source"])?, endpoint(&v["destination"])?);
        let side = if direction == "inbound" { "ingress" } else { "egress" };
        let (local, remote) = if direction == "inbound" { (dst, src) } else { (src, dst) };
        let names = |v: &serde_json::Value| v.as_array().map(|a| a.iter().filter_map(s).collect());
        Some(Fields {
            ts: s(&v["@timestamp"]),
            event_type: Some(ty.into()),
            severity: s(&v["log"]["level"]),
            direction: Some(direction),
            protocol: s(&p["protocol"]),
            local: Some(local),
            remote: Some(remote),
            peer_classes: names(&p["peer_classes"]),
            rule: s(&p["rule"]),
            interface: s(&v["observer"][side]["interface"]["name"]),
            started: s(&p["started"]),
            duration_ms: n("duration_ms"),
            packets_in: n("packets_in"),
            bytes_in: n("bytes_in"),
            packets_out: n("packets_out"),
            bytes_out: n("bytes_out"),
            end_reason: s(&p["end_reason"]),
            ..Default::default()
        })
    }
}

/// `*` (any run of characters) and `?` (one character) globs, as in
/// `[audit] allowed` and `--rule web-*`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Filter {
    /// Whether a record with these fields is selected.
    pub fn matches_fields<S: AsRef<str>>(&self, f: &Fields<S>, kind: RecordKind) -> bool {
        let kind_ok = match self.kind {
            Kind::All => true,
            Kind::Unexpected => kind == RecordKind::Unexpected,
            Kind::Allowed => kind != RecordKind::Unexpected,
        };
        kind_ok
            && self.reason.as_ref().is_none_or(|x| opt(&f.reason) == x)
            && self.direction.as_ref().is_none_or(|x| opt(&f.direction) == x)
            && self.severity.as_ref().is_none_or(|x| opt(&f.severity) == x)
            && self.peer_class.as_ref().is_none_or(|x| f.peer_classes.iter().flatten().any(|c| c.as_ref() == x))
            && self.port.is_none_or(|p| {
                f.local.as_ref().is_some_and(|e| e.port == p) || f.remote.as_ref().is_some_and(|e| e.port == p)
            })
            && self.addr.is_none_or(|a| f.has_addr(a))
            && self.rule.as_ref().is_none_or(|r| f.has_rule(r))
            && self.in_window(f.ts.as_ref().map(AsRef::as_ref))
    }

    fn in_window(&self, ts: Option<&str>) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        // A record whose time does not parse is outside every window.
        let Some(Ok(t)) = ts.map(humantime::parse_rfc3339_weak) else { return false };
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
    }
}

/// One line of a log, read. The borrowed fields (the common case, one per
/// line) stay on the stack; the rare owned ones are boxed.
#[allow(clippy::large_enum_variant)]
pub enum Parsed<'a> {
    Borrowed(Fields<&'a str>),
    Owned(Box<Fields<String>>),
    /// A summary or an event type `pcguard flows` does not show.
    Other,
    /// Not a record: why.
    Invalid(String),
}

impl Parsed<'_> {
    /// Applies `f` to the fields of a record.
    pub fn with<R>(&self, f: impl FnOnce(&dyn FieldsView) -> R) -> Option<R> {
        match self {
            Parsed::Borrowed(x) => Some(f(x)),
            Parsed::Owned(x) => Some(f(x.as_ref())),
            Parsed::Other | Parsed::Invalid(_) => None,
        }
    }
}

/// Object-safe access to [`Fields`] of either string type.
pub trait FieldsView {
    fn kind(&self) -> Option<RecordKind>;
    fn matches(&self, filter: &Filter) -> bool;
    fn add_to(&self, summary: &mut Summary);
    fn human_allowed(&self) -> String;
}

impl<S: AsRef<str>> FieldsView for Fields<S> {
    fn kind(&self) -> Option<RecordKind> {
        Fields::kind(self)
    }

    fn matches(&self, filter: &Filter) -> bool {
        Fields::kind(self).is_some_and(|k| filter.matches_fields(self, k))
    }

    fn add_to(&self, summary: &mut Summary) {
        summary.add(self)
    }

    fn human_allowed(&self) -> String {
        Fields::human_allowed(self)
    }
}

/// Reads one line (without its newline).
pub fn parse(line: &[u8]) -> Parsed<'_> {
    let checked = |f: Fields<String>| -> Parsed<'_> {
        match f.kind() {
            None => Parsed::Other,
            Some(_) if f.ts.is_none() || f.local.is_none() || f.remote.is_none() || f.direction.is_none() => {
                Parsed::Invalid("a flow record without ts, direction, local or remote".into())
            }
            Some(_) => Parsed::Owned(Box::new(f)),
        }
    };
    // Why the line is not a record of the `json` format, if it is not.
    let why = match serde_json::from_slice::<Fields<&str>>(line) {
        Ok(f) if f.ecs_timestamp.is_some() => String::new(),
        Ok(f) => {
            return match f.kind() {
                None => Parsed::Other,
                Some(_) if f.ts.is_none() || f.local.is_none() || f.remote.is_none() || f.direction.is_none() => {
                    Parsed::Invalid("a flow record without ts, direction, local or remote".into())
                }
                Some(_) => Parsed::Borrowed(f),
            };
        }
        // An escaped string in a borrowed field: owned strings instead.
        // (ECS records have other types under some of the same names.)
        Err(e) if e.is_data() => match serde_json::from_slice::<Fields<String>>(line) {
            Ok(f) if f.ecs_timestamp.is_none() => return checked(f),
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        },
        Err(e) => return Parsed::Invalid(e.to_string()),
    };
    // ECS.
    match serde_json::from_slice::<serde_json::Value>(line) {
        Ok(v) if v.get("@timestamp").is_some() => {
            Fields::<String>::from_ecs(&v).map_or(Parsed::Other, |f| Parsed::Owned(Box::new(f)))
        }
        Ok(_) => Parsed::Invalid(why),
        Err(e) => Parsed::Invalid(e.to_string()),
    }
}

/// The rotation number of a log file's name: `flows.jsonl.3.gz` ->
/// (`flows.jsonl`, Some(3)); `flows.jsonl` -> (`flows.jsonl`, None).
fn rotation(name: &str) -> (&str, Option<u32>) {
    let stem = name.strip_suffix(".gz").unwrap_or(name);
    if let Some((base, n)) = stem.rsplit_once('.')
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = n.parse()
    {
        return (base, Some(n));
    }
    (name, None)
}

/// Oldest first: the highest rotation number first, the live file last.
fn rotation_order(p: &Path) -> (PathBuf, String, std::cmp::Reverse<u64>) {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (base, n) = rotation(&name);
    let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
    (dir, base.to_string(), std::cmp::Reverse(n.map_or(0, |n| u64::from(n) + 1)))
}

fn dir_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn names_in(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))? {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// The files `--log` names, oldest first: a path without a rotation
/// suffix is the live log plus its rotated siblings (`NAME.1`,
/// `NAME.2.gz`, ... as logrotate's `compress` + `delaycompress` leave
/// them); a rotated file alone; a name with `*`/`?` every file of its
/// directory it matches. Each file once.
pub fn log_set(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for path in given {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = dir_of(path);
        let mut set: Vec<PathBuf> = if name.contains(['*', '?']) {
            let set: Vec<PathBuf> =
                names_in(dir)?.into_iter().filter(|n| glob_match(&name, n)).map(|n| dir.join(n)).collect();
            if set.is_empty() {
                bail!("--log {}: no file matches", path.display());
            }
            set
        } else if rotation(&name).1.is_some() {
            vec![path.clone()]
        } else {
            let mut set: Vec<PathBuf> = match names_in(dir) {
                Ok(names) => names
                    .into_iter()
                    .filter(|n| {
                        let (base, num) = rotation(n);
                        num.is_some() && base == name
                    })
                    .map(|n| dir.join(n))
                    .collect(),
                Err(_) => Vec::new(),
            };
            if path.exists() || set.is_empty() {
                set.push(path.clone());
            }
            set
        };
        set.sort_by_key(|p| rotation_order(p));
        for p in set {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// Whether `p` is a rotated file (not followed).
pub fn is_rotated(p: &Path) -> bool {
    p.file_name().is_some_and(|n| rotation(&n.to_string_lossy()).1.is_some())
}

/// Opens a log file, gunzipping `*.gz`.
pub fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::with_capacity(1 << 16, flate2::read::MultiGzDecoder::new(BufReader::new(file))))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, file))
    })
}

/// Lines that are not records, reported once per file after reading.
#[derive(Default)]
pub struct Invalid {
    pub count: u64,
    pub first: Option<(u64, String)>,
}

impl Invalid {
    fn note(&mut self, line_no: u64, why: String) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some((line_no, why));
        }
    }

    fn report(&self, path: &Path) {
        if let Some((line, why)) = &self.first {
            eprintln!(
                "pcguard flows: {}: {} line(s) skipped, not audit records (first: line {line}: {why})",
                path.display(),
                self.count
            );
        }
    }
}

/// Reads every line of `path` (uncompressing `.gz`), calling `each` with
/// the line (no newline) and what it holds. Lines that are not records
/// are skipped and reported on stderr with the file and line number.
pub fn scan(path: &Path, mut each: impl FnMut(&[u8], &Parsed<'_>) -> Result<()>) -> Result<()> {
    let mut reader = open(path)?;
    let mut buf = Vec::with_capacity(1024);
    let mut invalid = Invalid::default();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = parse(line);
        if let Parsed::Invalid(why) = &parsed {
            invalid.note(line_no, why.clone());
            continue;
        }
        each(line, &parsed)?;
    }
    invalid.report(path);
    Ok(())
}

/// Files of `set` that may hold records at or after `since`: a rotated
/// file last written before it holds none (every record is written after
/// its `ts`). Live files are kept (they may be followed).
pub fn skip_old(set: Vec<PathBuf>, since: Option<SystemTime>) -> Vec<PathBuf> {
    let Some(since) = since else { return set };
    set.into_iter()
        .filter(|p| !is_rotated(p) || std::fs::metadata(p).and_then(|m| m.modified()).map_or(true, |t| t >= since))
        .collect()
}

/// The last `n` matching lines of `set` (oldest first), reading the
/// newest files first and stopping once `n` are found.
pub fn tail(set: &[PathBuf], filter: &Filter, n: usize) -> Result<Vec<String>> {
    let mut found: VecDeque<String> = VecDeque::new();
    if n == 0 {
        return Ok(Vec::new());
    }
    for path in set.iter().rev() {
        let mut last: VecDeque<String> = VecDeque::new();
        let want = n - found.len();
        scan(path, |line, parsed| {
            if parsed.with(|f| f.matches(filter)) == Some(true) {
                if last.len() == want {
                    last.pop_front();
                }
                last.push_back(String::from_utf8_lossy(line).into_owned());
            }
            Ok(())
        })?;
        for l in last.into_iter().rev() {
            found.push_front(l);
        }
        if found.len() >= n {
            break;
        }
    }
    Ok(found.into())
}

/// How a selected line is printed: as it is (`--json`) or in the human
/// form.
pub fn render(line: &str, json: bool) -> Option<String> {
    if json {
        return Some(line.trim_end().to_string());
    }
    match parse(line.trim_end().as_bytes()) {
        Parsed::Borrowed(f) if f.kind() == Some(RecordKind::Unexpected) => unexpected_human(line),
        Parsed::Owned(f) if f.kind() == Some(RecordKind::Unexpected) => unexpected_human(line),
        p => p.with(|f| f.human_allowed()),
    }
}

fn unexpected_human(line: &str) -> Option<String> {
    match super::parse_line(line) {
        super::Line::Flow(r) => Some(r.human()),
        _ => None,
    }
}

/// A summary key (`--summary by=...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Remote,
    LocalPort,
    RemotePort,
    Protocol,
    Rule,
    Direction,
    PeerClass,
    Reason,
    EventType,
}

impl Key {
    pub const ALL: [Key; 9] = [
        Key::Remote,
        Key::LocalPort,
        Key::RemotePort,
        Key::Protocol,
        Key::Rule,
        Key::Direction,
        Key::PeerClass,
        Key::Reason,
        Key::EventType,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Key::Remote => "remote",
            Key::LocalPort => "local_port",
            Key::RemotePort => "remote_port",
            Key::Protocol => "protocol",
            Key::Rule => "rule",
            Key::Direction => "direction",
            Key::PeerClass => "peer_class",
            Key::Reason => "reason",
            Key::EventType => "event_type",
        }
    }

    fn from_name(s: &str) -> Option<Key> {
        if s == "port" {
            return Some(Key::LocalPort);
        }
        Key::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// `by=remote,port` (or `remote,port`).
    pub fn parse_list(s: &str) -> Result<Vec<Key>, String> {
        let list = s.strip_prefix("by=").unwrap_or(s);
        let mut keys = Vec::new();
        for name in list.split(',').map(str::trim) {
            let Some(k) = Key::from_name(name) else {
                let names: Vec<&str> = Key::ALL.iter().map(|k| k.as_str()).collect();
                return Err(format!(
                    "unknown summary key \"{name}\" in \"{s}\" (keys: {}; port = local_port)",
                    names.join(", ")
                ));
            };
            if keys.contains(&k) {
                return Err(format!("summary key \"{name}\" given twice in \"{s}\""));
            }
            keys.push(k);
        }
        Ok(keys)
    }

    fn push_value<S: AsRef<str>>(self, f: &Fields<S>, out: &mut String) {
        use std::fmt::Write as _;
        let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
        match self {
            Key::Remote => out.push_str(f.remote.as_ref().map_or("-", |e| e.addr.as_ref())),
            Key::LocalPort => {
                let _ = write!(out, "{}", f.local.as_ref().map_or(0, |e| e.port));
            }
            Key::RemotePort => {
                let _ = write!(out, "{}", f.remote.as_ref().map_or(0, |e| e.port));
            }
            Key::Protocol => out.push_str(&dash(opt(&f.protocol))),
            Key::Rule => match &f.rule {
                Some(r) => out.push_str(r.as_ref()),
                None => {
                    let rules: Vec<&str> = f.port_rules.iter().flatten().map(AsRef::as_ref).collect();
                    out.push_str(&dash(&rules.join(",")));
                }
            },
            Key::Direction => out.push_str(&dash(opt(&f.direction))),
            Key::PeerClass => out.push_str(f.peer_classes.as_ref().and_then(|c| c.first()).map_or("-", AsRef::as_ref)),
            Key::Reason => out.push_str(&dash(opt(&f.reason))),
            Key::EventType => out.push_str(f.event_type()),
        }
    }

    fn is_number(self) -> bool {
        matches!(self, Key::LocalPort | Key::RemotePort)
    }
}

/// Separates key values in a group's key.
const SEP: char = '\u{1f}';

/// The counts of one group (or of all records: the total).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub flows: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Earliest and latest time seen (RFC 3339 strings of one format
    /// compare as times).
    pub first_seen: String,
    pub last_seen: String,
}

impl Counts {
    fn seen(&mut self, first: &str, last: &str) {
        if self.first_seen.is_empty() || first < self.first_seen.as_str() {
            self.first_seen = first.to_string();
        }
        if last > self.last_seen.as_str() {
            self.last_seen = last.to_string();
        }
    }
}

#[derive(Default)]
struct Group {
    counts: Counts,
    /// Distinct remote addresses (when `remote` is not a key).
    hosts: HashSet<Box<str>>,
}

/// The aggregation of `--summary`.
pub struct Summary {
    keys: Vec<Key>,
    groups: HashMap<Box<str>, Group>,
    /// Open `flow_start`s per group and flow (its end counts no new flow).
    open: HashMap<Box<str>, u32>,
    total: Counts,
    remotes: HashSet<Box<str>>,
    /// Records counted.
    pub records: u64,
    key_buf: String,
    flow_buf: String,
}

/// One row of the summary, as printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The key values, in `by`'s order.
    pub keys: Vec<String>,
    /// Distinct remote addresses (`None` when `remote` is a key).
    pub hosts: Option<u64>,
    pub counts: Counts,
}

impl Summary {
    pub fn new(keys: Vec<Key>) -> Self {
        Self {
            keys,
            groups: HashMap::new(),
            open: HashMap::new(),
            total: Counts::default(),
            remotes: HashSet::new(),
            records: 0,
            key_buf: String::new(),
            flow_buf: String::new(),
        }
    }

    /// Counts one selected record.
    ///
    /// A `flow_end` adds its packets and bytes; it counts as a flow unless
    /// the same group saw the flow's `flow_start` (same protocol, direction,
    /// local and remote end). An unexpected record is one flow with `1 +
    /// repeats` packets and `packet_bytes` bytes (the reported packet's;
    /// the repeats' sizes are not recorded) toward this server when
    /// inbound, from it when outbound.
    pub fn add<S: AsRef<str>>(&mut self, f: &Fields<S>) {
        let Some(kind) = f.kind() else { return };
        self.records += 1;
        self.key_buf.clear();
        for (i, k) in self.keys.iter().enumerate() {
            if i > 0 {
                self.key_buf.push(SEP);
            }
            k.push_value(f, &mut self.key_buf);
        }
        let mut c = Counts::default();
        let ts = opt(&f.ts);
        let mut first = ts;
        match kind {
            RecordKind::Unexpected => {
                c.flows = 1;
                let (p, b) = (1 + f.repeats.unwrap_or(0), f.packet_bytes.unwrap_or(0));
                if opt(&f.direction) == "outbound" {
                    (c.packets_out, c.bytes_out) = (p, b);
                } else {
                    (c.packets_in, c.bytes_in) = (p, b);
                }
            }
            RecordKind::FlowStart | RecordKind::FlowEnd => {
                self.flow_buf.clear();
                self.flow_buf.push_str(&self.key_buf);
                for part in [opt(&f.protocol), opt(&f.direction)] {
                    self.flow_buf.push(SEP);
                    self.flow_buf.push_str(part);
                }
                for e in [&f.local, &f.remote].into_iter().flatten() {
                    self.flow_buf.push(SEP);
                    self.flow_buf.push_str(e.addr.as_ref());
                    self.flow_buf.push(SEP);
                    self.flow_buf.push_str(&e.port.to_string());
                }
                if kind == RecordKind::FlowStart {
                    c.flows = 1;
                    match self.open.get_mut(self.flow_buf.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            self.open.insert(self.flow_buf.as_str().into(), 1);
                        }
                    }
                } else {
                    c.flows = match self.open.get_mut(self.flow_buf.as_str()) {
                        Some(n) => {
                            *n -= 1;
                            if *n == 0 {
                                self.open.remove(self.flow_buf.as_str());
                            }
                            0
                        }
                        None => 1,
                    };
                    c.packets_in = f.packets_in.unwrap_or(0);
                    c.bytes_in = f.bytes_in.unwrap_or(0);
                    c.packets_out = f.packets_out.unwrap_or(0);
                    c.bytes_out = f.bytes_out.unwrap_or(0);
                    if let Some(s) = &f.started {
                        first = s.as_ref().min(ts);
                    }
                }
            }
        }
        let remote = f.remote.as_ref().map_or("-", |e| e.addr.as_ref());
        if !self.groups.contains_key(self.key_buf.as_str()) {
            self.groups.insert(self.key_buf.as_str().into(), Group::default());
        }
        let Some(group) = self.groups.get_mut(self.key_buf.as_str()) else { return };
        add_counts(&mut group.counts, &c, first, ts);
        add_counts(&mut self.total, &c, first, ts);
        if !self.keys.contains(&Key::Remote) && !group.hosts.contains(remote) {
            group.hosts.insert(remote.into());
        }
        if !self.remotes.contains(remote) {
            self.remotes.insert(remote.into());
        }
    }

    /// The rows, most flows first (then most bytes, then by key), and the
    /// total (its `hosts`: distinct remote addresses of all rows).
    pub fn rows(&self) -> (Vec<Row>, Row) {
        let with_hosts = !self.keys.contains(&Key::Remote);
        let mut rows: Vec<Row> = self
            .groups
            .iter()
            .map(|(k, g)| Row {
                keys: k.split(SEP).map(str::to_string).collect(),
                hosts: with_hosts.then_some(g.hosts.len() as u64),
                counts: g.counts.clone(),
            })
            .collect();
        let num = |r: &Row| -> Vec<(u64, String)> {
            r.keys
                .iter()
                .zip(&self.keys)
                .map(|(v, k)| if k.is_number() { (v.parse().unwrap_or(0), String::new()) } else { (0, v.clone()) })
                .collect()
        };
        rows.sort_by(|a, b| {
            b.counts
                .flows
                .cmp(&a.counts.flows)
                .then((b.counts.bytes_in + b.counts.bytes_out).cmp(&(a.counts.bytes_in + a.counts.bytes_out)))
                .then_with(|| num(a).cmp(&num(b)))
        });
        let total = Row { keys: Vec::new(), hosts: Some(self.remotes.len() as u64), counts: self.total.clone() };
        (rows, total)
    }

    /// The aligned table (with a `total` line), as `pcguard flows
    /// --summary` prints it.
    pub fn table(&self) -> String {
        let (rows, total) = self.rows();
        let with_hosts = !self.keys.contains(&Key::Remote);
        let mut headers: Vec<&str> = self.keys.iter().map(|k| k.as_str()).collect();
        headers.push("flows");
        if with_hosts {
            headers.push("hosts");
        }
        headers.extend(["packets_in", "bytes_in", "packets_out", "bytes_out", "first_seen", "last_seen"]);
        let cells = |keys: Vec<String>, r: &Row| -> Vec<String> {
            let c = &r.counts;
            let mut v = keys;
            v.push(c.flows.to_string());
            if with_hosts {
                v.push(r.hosts.unwrap_or(0).to_string());
            }
            v.extend([c.packets_in, c.bytes_in, c.packets_out, c.bytes_out].map(|n| n.to_string()));
            v.extend([c.first_seen.clone(), c.last_seen.clone()]);
            v
        };
        let mut table: Vec<Vec<String>> = rows.iter().map(|r| cells(r.keys.clone(), r)).collect();
        let mut total_keys = vec![String::new(); self.keys.len()];
        total_keys[0] = "total".into();
        let mut t = cells(total_keys, &total);
        if !with_hosts {
            // The total's distinct remotes go in the remote column.
            let i = self.keys.iter().position(|k| *k == Key::Remote).unwrap_or(0);
            t[i] = if i == 0 {
                format!("total ({} hosts)", total.hosts.unwrap_or(0))
            } else {
                format!("({} hosts)", total.hosts.unwrap_or(0))
            };
        }
        table.push(t);
        crate::model::table::aligned(&headers, &table)
    }

    /// The same as JSON: `{"by": [...], "rows": [{key: value, ...,
    /// "flows", ["hosts",] "packets_in", ...}], "total": {...},
    /// "records": n}`.
    pub fn to_json(&self) -> serde_json::Value {
        let (rows, total) = self.rows();
        let counts = |m: &mut serde_json::Map<String, serde_json::Value>, r: &Row| {
            let c = &r.counts;
            m.insert("flows".into(), c.flows.into());
            if let Some(h) = r.hosts {
                m.insert("hosts".into(), h.into());
            }
            for (k, v) in [
                ("packets_in", c.packets_in),
                ("bytes_in", c.bytes_in),
                ("packets_out", c.packets_out),
                ("bytes_out", c.bytes_out),
            ] {
                m.insert(k.into(), v.into());
            }
            m.insert("first_seen".into(), c.first_seen.clone().into());
            m.insert("last_seen".into(), c.last_seen.clone().into());
        };
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let mut m = serde_json::Map::new();
                for (k, v) in self.keys.iter().zip(&r.keys) {
                    let value = match v.parse::<u64>() {
                        Ok(n) if k.is_number() => n.into(),
                        _ => v.clone().into(),
                    };
                    m.insert(k.as_str().into(), value);
                }
                counts(&mut m, r);
                serde_json::Value::Object(m)
            })
            .collect();
        let mut t = serde_json::Map::new();
        counts(&mut t, &total);
        serde_json::json!({
            "by": self.keys.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            "rows": rows,
            "total": t,
            "records": self.records,
        })
    }
}

fn add_counts(c: &mut Counts, add: &Counts, first: &str, last: &str) {
    c.flows += add.flows;
    c.packets_in += add.packets_in;
    c.bytes_in += add.bytes_in;
    c.packets_out += add.packets_out;
    c.bytes_out += add.bytes_out;
    c.seen(first, last);
}

/// Summarizes the selected records of `set` (oldest file first).
pub fn summarize(set: &[PathBuf], filter: &Filter, keys: Vec<Key>) -> Result<Summary> {
    let mut summary = Summary::new(keys);
    for path in set {
        scan(path, |_, parsed| {
            parsed.with(|f| {
                if f.matches(filter) {
                    f.add_to(&mut summary);
                }
            });
            Ok(())
        })?;
    }
    Ok(summary)
}

/// `pcguard flows --summary`: the table or (`json`) the JSON document.
pub fn print_summary(set: &[PathBuf], filter: &Filter, keys: Vec<Key>, json: bool, mut out: impl Write) -> Result<()> {
    let summary = summarize(set, filter, keys)?;
    if json {
        writeln!(out, "{}", summary.to_json())?;
    } else {
        write!(out, "{}", summary.table())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
