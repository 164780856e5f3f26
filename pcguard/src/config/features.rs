//! `[features]` and `[always_allow]` ssh: site-config keys -> catalog
//! feature keys, with role defaults and the check that every enabled
//! feature has the peers it needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Range,
};

use toml::Value;

use super::{ConfigError, Ctx, Role, raw::RawConfig, service_peers};
use crate::{
    catalog::{self, Catalog},
    model::{Cidr, PortRange},
};

/// How a `[features]` key's value maps to catalog feature keys.
#[derive(Copy, Clone)]
enum Kind {
    /// `key = true` enables the catalog feature.
    Flag(&'static str),
    /// `key = ["a", "b"]` enables `namespace:a`, `namespace:b`.
    List(&'static str),
    /// `key = "a"` enables `namespace:a` (`"internal"`/`"none"`: nothing).
    One(&'static str),
}

/// Every `[features]` key except `database_port`, in the order requests
/// are checked.
const FEATURES: &[(&str, Kind)] = &[
    ("web", Kind::Flag("web")),
    ("device_rpc", Kind::Flag("device_rpc")),
    ("upstream", Kind::Flag("upstream")),
    ("job_ticketing", Kind::Flag("job_ticketing")),
    ("document_processing", Kind::Flag("document_processing")),
    ("document_processing_server", Kind::Flag("document_processing_server")),
    ("directory", Kind::List("directory")),
    ("database", Kind::One("database")),
    ("mfd", Kind::List("mfd")),
    ("card_readers", Kind::List("card_reader")),
    ("ges", Kind::Flag("ges")),
    ("cloud_services", Kind::Flag("cloud_services:wildcard")),
    ("cloud_regions", Kind::List("cloud_services")),
    ("grows", Kind::Flag("grows")),
    ("sign_in", Kind::List("sign_in")),
    ("universal_print", Kind::Flag("universal_print")),
    ("spooler_redirection", Kind::Flag("spooler_redirection")),
    ("netbios", Kind::Flag("netbios")),
    ("samba", Kind::Flag("samba")),
    ("mobility_print", Kind::Flag("mobility_print")),
    ("site_servers", Kind::Flag("site_servers")),
    ("primary_connects", Kind::Flag("primary_connects")),
    ("snmp", Kind::Flag("snmp")),
    ("cups", Kind::Flag("cups")),
    ("printing", Kind::List("printing")),
    ("dns", Kind::Flag("dns")),
    ("ntp", Kind::Flag("ntp")),
    ("smtp", Kind::Flag("smtp")),
];

const DATABASE_PORT: &str = "database_port";
const NO_DATABASE: [&str; 2] = ["internal", "none"];

/// Features a role enables unless the config sets them (skipped with a
/// note when their peers are not configured).
pub fn role_defaults(role: Role) -> &'static str {
    match role {
        Role::Primary => "web = true\ndevice_rpc = true\nsite_servers = true\n",
        Role::Secondary => "upstream = true\ncups = true\nprinting = [\"raw\", \"ipp\"]\n",
        Role::SiteServer => "web = true\ndevice_rpc = true\nupstream = true\nprimary_connects = true\n",
        Role::DocumentProcessing => "document_processing_server = true\n",
    }
}

/// Defaults of every role: infrastructure services, used when their peer
/// class is configured.
pub const COMMON_DEFAULTS: &str = "dns = true\nntp = true\nsmtp = true\n";

pub struct Resolved {
    pub features: BTreeSet<String>,
    pub port_overrides: BTreeMap<String, Vec<PortRange>>,
    pub notes: Vec<String>,
}

/// One catalog feature asked for by a config key.
struct Request {
    /// `features.mfd`, `always_allow.ssh`.
    key: String,
    /// `"hp"` for list values, empty for flags.
    label: String,
    feature: String,
    span: Range<usize>,
    explicit: bool,
}

/// A `[features]` value, from the file or from the role defaults.
struct Setting<'a> {
    value: &'a Value,
    span: Range<usize>,
    explicit: bool,
}

pub fn resolve(ctx: &Ctx, raw: &RawConfig, peers: &BTreeMap<String, Vec<Cidr>>) -> Result<Resolved, ConfigError> {
    let catalog = Catalog::builtin();
    check_keys(ctx, raw)?;
    let defaults = default_table(*raw.role.get_ref());
    let setting = |key: &str| -> Option<Setting> {
        match raw.features.get_key_value(key) {
            Some((k, v)) => Some(Setting { value: v.get_ref(), span: k.span(), explicit: true }),
            None => defaults.get(key).map(|value| Setting { value, span: raw.role.span(), explicit: false }),
        }
    };
    let mut requests = Vec::new();
    for (key, kind) in FEATURES {
        if let Some(s) = setting(key) {
            requests.extend(expand(ctx, catalog, key, *kind, &s)?);
        }
    }
    apply_cloud_regions(ctx, raw, &mut requests)?;
    requests.push(ssh_request(raw));
    let mut resolved = Resolved { features: BTreeSet::new(), port_overrides: BTreeMap::new(), notes: Vec::new() };
    for r in requests {
        check_peers(ctx, catalog, peers, &r, &mut resolved)?;
    }
    database_port_override(ctx, raw, catalog, &mut resolved)?;
    ssh_port_override(raw, &mut resolved);
    app_server_ports(ctx, raw, catalog, peers, &mut resolved)?;
    Ok(resolved)
}

fn default_table(role: Role) -> toml::Table {
    let text = format!("{}{}", role_defaults(role), COMMON_DEFAULTS);
    text.parse().expect("role defaults are valid TOML")
}

fn check_keys(ctx: &Ctx, raw: &RawConfig) -> Result<(), ConfigError> {
    let known = || FEATURES.iter().map(|(k, _)| *k).chain([DATABASE_PORT]);
    match raw.features.keys().find(|k| !known().any(|n| n == k.get_ref().as_str())) {
        Some(k) => Err(ctx.error(
            Some(k.span()),
            format!("features.{}", k.get_ref()),
            format!("unknown feature (known: {})", known().collect::<Vec<_>>().join(", ")),
        )),
        None => Ok(()),
    }
}

fn expand(ctx: &Ctx, catalog: &Catalog, key: &str, kind: Kind, s: &Setting) -> Result<Vec<Request>, ConfigError> {
    let full_key = format!("features.{key}");
    let bad = |msg: String| ctx.error(Some(s.span.clone()), full_key.as_str(), msg);
    let request = |label: &str, feature: String| Request {
        key: full_key.clone(),
        label: label.to_string(),
        feature,
        span: s.span.clone(),
        explicit: s.explicit,
    };
    match kind {
        Kind::Flag(feature) => match s.value.as_bool() {
            Some(on) => Ok(if on { vec![request("", feature.to_string())] } else { vec![] }),
            None => Err(bad("expected true or false".into())),
        },
        Kind::List(ns) => {
            let items = s.value.as_array().ok_or_else(|| bad("expected a list of names".into()))?;
            items
                .iter()
                .map(|v| {
                    let name = v.as_str().ok_or_else(|| bad("expected a list of names".into()))?;
                    known_value(catalog, ns, name, &[]).map_err(bad)?;
                    Ok(request(name, format!("{ns}:{name}")))
                })
                .collect()
        }
        Kind::One(ns) => {
            let name = s.value.as_str().ok_or_else(|| bad("expected a name".into()))?;
            known_value(catalog, ns, name, &NO_DATABASE).map_err(bad)?;
            Ok(if NO_DATABASE.contains(&name) { vec![] } else { vec![request(name, format!("{ns}:{name}"))] })
        }
    }
}

fn known_value(catalog: &Catalog, ns: &str, name: &str, extra: &[&str]) -> Result<(), String> {
    let mut known = catalog.feature_values(ns);
    if ns == "cloud_services" {
        known.retain(|v| *v != "wildcard");
    }
    known.extend(extra);
    if known.contains(&name) { Ok(()) } else { Err(format!("unknown value \"{name}\" (known: {})", known.join(", "))) }
}

/// `cloud_regions` replaces the wildcard endpoint of `cloud_services` with
/// the regions' specific endpoints.
fn apply_cloud_regions(ctx: &Ctx, raw: &RawConfig, requests: &mut Vec<Request>) -> Result<(), ConfigError> {
    let Some((key, regions)) = raw.features.get_key_value("cloud_regions") else {
        return Ok(());
    };
    let disabled = raw.features.get("cloud_services").is_some_and(|v| v.get_ref().as_bool() == Some(false));
    let non_empty = regions.get_ref().as_array().is_some_and(|a| !a.is_empty());
    if disabled && non_empty {
        return Err(ctx.error(
            Some(key.span()),
            "features.cloud_regions",
            "cloud_services is false: remove cloud_regions or enable cloud_services",
        ));
    }
    requests.retain(|r| r.feature != "cloud_services:wildcard");
    Ok(())
}

fn ssh_request(raw: &RawConfig) -> Request {
    let (span, explicit, on) = match &raw.always_allow.ssh {
        Some(v) => (v.span(), true, *v.get_ref()),
        None => (raw.role.span(), false, true),
    };
    let feature = if on { "admin_ssh" } else { "" }.to_string();
    Request { key: "always_allow.ssh".into(), label: String::new(), feature, span, explicit }
}

/// Enables the feature when every (non-optional) service it brings has a
/// usable peer class; else an error (explicit) or a note (default).
fn check_peers(
    ctx: &Ctx,
    catalog: &Catalog,
    peers: &BTreeMap<String, Vec<Cidr>>,
    r: &Request,
    out: &mut Resolved,
) -> Result<(), ConfigError> {
    if r.feature.is_empty() {
        return Ok(());
    }
    let missing =
        catalog.services_with_feature(&r.feature).find(|s| !s.optional_peers && service_peers(peers, s).is_empty());
    // A default whose services all lack peers (all optional) has nothing
    // to enable: skipped without a note.
    let nothing = catalog.services_with_feature(&r.feature).all(|s| service_peers(peers, s).is_empty());
    if missing.is_none() && nothing && !r.explicit {
        return Ok(());
    }
    let Some(service) = missing else {
        out.features.insert(r.feature.clone());
        return Ok(());
    };
    let needs: Vec<String> = service.peers.iter().map(|p| format!("peers.{p}")).collect();
    let what = if r.label.is_empty() { String::new() } else { format!("\"{}\" ", r.label) };
    let message = format!("{what}needs {} (for {})", one_of(&needs), service.id);
    if r.explicit {
        return Err(ctx.error(Some(r.span.clone()), r.key.as_str(), message));
    }
    out.notes.push(format!("{} (default) not enabled: {message}", r.key));
    Ok(())
}

fn one_of(items: &[String]) -> String {
    match items {
        [one] => one.clone(),
        _ => format!("one of {}", items.join(", ")),
    }
}

fn database_port_override(
    ctx: &Ctx,
    raw: &RawConfig,
    catalog: &Catalog,
    out: &mut Resolved,
) -> Result<(), ConfigError> {
    let Some((key, value)) = raw.features.get_key_value(DATABASE_PORT) else {
        return Ok(());
    };
    let bad = |msg: &str| ctx.error(Some(key.span()), "features.database_port", msg);
    let port = value
        .get_ref()
        .as_integer()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("expected a port number (1-65535)"))?;
    let db = out.features.iter().find(|f| f.starts_with("database:")).cloned();
    let db = db.ok_or_else(|| bad("needs features.database (an external database)"))?;
    for s in catalog.services_with_feature(&db) {
        out.port_overrides.insert(s.id.clone(), vec![PortRange::single(port)]);
    }
    Ok(())
}

fn ssh_port_override(raw: &RawConfig, out: &mut Resolved) {
    if let Some(port) = &raw.always_allow.ssh_port {
        out.port_overrides.insert("admin-ssh".to_string(), vec![*port.get_ref()]);
    }
}

/// The Application Server's ports (`[papercut] http_port`, `https_port`):
/// every enabled catalog service on 9191 / 9192 marked `app_server_ports`
/// (the primary's inbound services, the upstream of secondaries and site
/// servers) uses the moved ports instead.
fn app_server_ports(
    ctx: &Ctx,
    raw: &RawConfig,
    catalog: &Catalog,
    peers: &BTreeMap<String, Vec<Cidr>>,
    out: &mut Resolved,
) -> Result<(), ConfigError> {
    let pc = &raw.papercut;
    let mut moves: Vec<(u16, u16, &str)> = Vec::new();
    for (value, default, key) in
        [(&pc.http_port, 9191, "papercut.http_port"), (&pc.https_port, 9192, "papercut.https_port")]
    {
        let Some(v) = value else { continue };
        let port = u16::try_from(*v.get_ref())
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ctx.error(Some(v.span()), key, "expected a port number (1-65535)"))?;
        moves.push((default, port, key));
    }
    let effective = |default: u16| moves.iter().find(|m| m.0 == default).map_or(default, |m| m.1);
    if let (Some(v), true) = (&pc.https_port, effective(9191) == effective(9192)) {
        let msg = format!("{} is also the HTTP port: the two ports must differ", effective(9192));
        return Err(ctx.error(Some(v.span()), "papercut.https_port", msg));
    }
    moves.retain(|(from, to, _)| from != to);
    if moves.is_empty() {
        return Ok(());
    }
    let mut moved = Vec::new();
    for s in catalog.services.iter().filter(|s| s.app_server_ports) {
        if !s.features.iter().any(|f| out.features.contains(f)) || out.port_overrides.contains_key(&s.id) {
            continue;
        }
        let ports: BTreeSet<PortRange> = s
            .ports
            .iter()
            .map(|p| match moves.iter().find(|m| p.start == p.end && p.start == m.0) {
                Some(m) => PortRange::single(m.1),
                None => *p,
            })
            .collect();
        let ports = ports.into_iter().collect();
        out.port_overrides.insert(s.id.clone(), ports);
        if !service_peers(peers, s).is_empty() {
            moved.push(s.id.as_str());
        }
    }
    let what: Vec<String> = moves.iter().map(|(from, to, key)| format!("{from} -> {to} ({key})")).collect();
    let doc = catalog::document("change-ports").expect("the change-ports page is stored");
    out.notes.push(format!(
        "Application Server ports moved: {} on {}; PaperCut, \"{}\" ({}): \"{}\"",
        what.join(", "),
        if moved.is_empty() { "no enabled service".to_string() } else { moved.join(", ") },
        doc.title,
        doc.url,
        MOVED_PORTS_QUOTE.concat(),
    ));
    Ok(())
}

/// The sentence of the "Change the Application Server ports" page that
/// `[papercut]` implements, in its two verbatim parts (the page has a
/// glossary pop-up text between them; a unit test checks both).
pub const MOVED_PORTS_QUOTE: [&str; 2] =
    ["You can change the Application Server", " port from 9191/9192 to any other value, such as 80/ 443."];
