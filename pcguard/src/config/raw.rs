//! The site config as written (serde, `deny_unknown_fields`), before
//! validation. Values that semantic errors point at are `Spanned`.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{
    Deserialize,
    de::{self, Deserializer, Visitor},
};
use toml::Spanned;

use super::{Mode, Role};
use crate::model::{Direction, PortRange, Protocol};

pub type SpannedList = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Files of shared peer classes (`[peers]` only).
    #[serde(default)]
    pub include: Option<SpannedList>,
    pub role: Spanned<Role>,
    pub interfaces: SpannedList,
    pub mode: Spanned<Mode>,
    #[serde(default)]
    pub egress_mode: Option<Mode>,
    #[serde(default)]
    pub allow_icmp: Option<bool>,
    #[serde(default)]
    pub ingress_hook: Option<super::IngressHook>,
    #[serde(default)]
    pub peers: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    /// Checked against the feature table in `features.rs`.
    #[serde(default)]
    pub features: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub always_allow: RawAlwaysAllow,
    #[serde(default)]
    pub conntrack: RawConntrack,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub papercut: RawPapercut,
}

/// A file named by `include`: peer classes shared by several servers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInclude {
    #[serde(default)]
    pub peers: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub direction: Direction,
    pub protocol: Protocol,
    pub ports: Spanned<Vec<PortRange>>,
    pub peers: SpannedList,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlwaysAllow {
    #[serde(default)]
    pub ssh: Option<Spanned<bool>>,
    #[serde(default)]
    pub ssh_port: Option<Spanned<PortRange>>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConntrack {
    pub tcp_timeout: Option<Spanned<Seconds>>,
    pub tcp_closing_timeout: Option<Spanned<Seconds>>,
    pub udp_timeout: Option<Spanned<Seconds>>,
    pub max_entries: Option<Spanned<u64>>,
    pub new_entries: Option<Spanned<u64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: Option<PathBuf>,
    pub report_interval: Option<Spanned<Seconds>>,
    pub max_records_per_second: Option<Spanned<u64>>,
    pub group: Option<Spanned<String>>,
    #[serde(default)]
    pub format: Option<super::AuditFormat>,
    #[serde(default)]
    pub syslog: Option<bool>,
    #[serde(default)]
    pub syslog_socket: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub syslog_facility: Option<Spanned<crate::syslog::Facility>>,
    /// `"all"` or a list of rule-id globs (`[audit] allowed`).
    #[serde(default)]
    pub allowed: Option<Spanned<toml::Value>>,
    pub max_flow_records_per_second: Option<Spanned<u64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<SocketAddr>,
}

/// `[papercut]`: how this PaperCut installation differs from the defaults.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPapercut {
    /// The Application Server's HTTP port (`server.port`), default 9191.
    pub http_port: Option<Spanned<i64>>,
    /// Its HTTPS port (`server.ssl.port`), default 9192.
    pub https_port: Option<Spanned<i64>>,
}

/// A duration: an integer number of seconds or a string with a unit
/// (`"90s"`, `"5m"`, `"2h"`, `"1d"`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Seconds(pub Duration);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration \"{s}\" (e.g. 30, \"90s\", \"5m\", \"2h\")"))?;
    let scale = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        u => {
            return Err(format!("invalid duration unit \"{u}\" in \"{s}\" (s, m, h or d)"));
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(scale)))
}

struct SecondsVisitor;

impl Visitor<'_> for SecondsVisitor {
    type Value = Seconds;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number of seconds or a duration such as \"5m\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
        u64::try_from(v).map(|s| Seconds(Duration::from_secs(s))).map_err(|_| E::custom("negative duration"))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
        Ok(Seconds(Duration::from_secs(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
        parse_duration(v).map(Seconds).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SecondsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }
}
