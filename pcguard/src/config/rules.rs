//! `[[rule]]` and `[[always_allow.rule]]`: names, ports, peers, and no two
//! rules of a table claiming the same port for the same peer class.

use std::collections::{BTreeMap, HashSet};

use super::{CLASS_ANY_NAME, ConfigError, Ctx, SiteRule, raw::RawRule};
use crate::{
    catalog::Catalog,
    model::{Cidr, first_overlap},
};

/// Names used by the compiled policy itself (rule 0, the `other` label).
const RESERVED_NAMES: [&str; 3] = ["none", "other", "any"];

/// Validates the rules of one table (`rule` or `always_allow.rule`).
/// `names` collects rule names across tables (they must be unique).
pub fn validate(
    ctx: &Ctx,
    raw: &[RawRule],
    table: &str,
    peers: &BTreeMap<String, Vec<Cidr>>,
    names: &mut HashSet<String>,
) -> Result<Vec<SiteRule>, ConfigError> {
    let mut rules = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let key = format!("{table}[{i}]");
        check_name(ctx, r, &key, names)?;
        check_ports(ctx, r, &key)?;
        check_peers(ctx, r, &key, peers)?;
        check_no_conflict(ctx, r, &key, &rules)?;
        rules.push(SiteRule {
            name: r.name.get_ref().clone(),
            description: r.description.clone().unwrap_or_default(),
            direction: r.direction,
            protocol: r.protocol,
            ports: r.ports.get_ref().clone(),
            peers: r.peers.get_ref().iter().map(|p| p.get_ref().clone()).collect(),
        });
    }
    Ok(rules)
}

fn check_name(ctx: &Ctx, r: &RawRule, key: &str, names: &mut HashSet<String>) -> Result<(), ConfigError> {
    let name = r.name.get_ref();
    let why = if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        "rule names are lowercase letters, digits, '-' and '_'".to_string()
    } else if Catalog::builtin().service(name).is_some() {
        format!("\"{name}\" is a catalog service id; choose another name")
    } else if RESERVED_NAMES.contains(&name.as_str()) {
        format!("\"{name}\" is reserved; choose another name")
    } else if !names.insert(name.clone()) {
        format!("duplicate rule name \"{name}\"")
    } else {
        return Ok(());
    };
    Err(ctx.error(Some(r.name.span()), format!("{key}.name"), why))
}

fn check_ports(ctx: &Ctx, r: &RawRule, key: &str) -> Result<(), ConfigError> {
    let ports = r.ports.get_ref();
    let why = match first_overlap(ports) {
        _ if ports.is_empty() => "at least one port is required".to_string(),
        Some((a, b)) => format!("ports {a} and {b} overlap"),
        None => return Ok(()),
    };
    Err(ctx.error(Some(r.ports.span()), format!("{key}.ports"), why))
}

fn check_peers(ctx: &Ctx, r: &RawRule, key: &str, peers: &BTreeMap<String, Vec<Cidr>>) -> Result<(), ConfigError> {
    let list = r.peers.get_ref();
    if list.is_empty() {
        return Err(ctx.error(Some(r.peers.span()), format!("{key}.peers"), "at least one peer class is required"));
    }
    let builtin = Catalog::builtin().class_names();
    for p in list {
        let name = p.get_ref().as_str();
        if name == CLASS_ANY_NAME || peers.contains_key(name) {
            continue;
        }
        let why = if builtin.contains(&name) {
            format!("peer class \"{name}\" has no addresses in [peers]")
        } else {
            format!("unknown peer class \"{name}\" (define it in [peers])")
        };
        return Err(ctx.error(Some(p.span()), format!("{key}.peers"), why));
    }
    Ok(())
}

/// Two rules of the same table, direction and protocol may not share a
/// port for the same peer class: which one counts would be ambiguous.
fn check_no_conflict(ctx: &Ctx, r: &RawRule, key: &str, earlier: &[SiteRule]) -> Result<(), ConfigError> {
    let classes: HashSet<&str> = r.peers.get_ref().iter().map(|p| p.get_ref().as_str()).collect();
    for other in earlier.iter().filter(|o| o.direction == r.direction && o.protocol == r.protocol) {
        let shared = other.peers.iter().find(|p| classes.contains(p.as_str()));
        let overlap = r.ports.get_ref().iter().find_map(|a| other.ports.iter().find(|b| a.overlaps(b)).map(|b| (a, b)));
        if let (Some(class), Some((a, b))) = (shared, overlap) {
            return Err(ctx.error(
                Some(r.ports.span()),
                format!("{key}.ports"),
                format!("port {a} overlaps port {b} of rule \"{}\" for peer class \"{class}\"", other.name),
            ));
        }
    }
    Ok(())
}
