//! Port ranges, and parsing port specifications (`9191`, `"9191"`,
//! `"49152-65535"`) into them, for the catalog and the site config.

use std::{fmt, str::FromStr};

use serde::{
    Serialize,
    de::{self, Deserialize, Deserializer, Visitor},
};

/// Inclusive port range; a single port has `start == end`.
/// Deserializes from a port number (`9191`) or a string (`"9191"`,
/// `"49152-65535"`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(p: u16) -> Self {
        Self { start: p, end: p }
    }
    pub fn contains(&self, p: u16) -> bool {
        self.start <= p && p <= self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end { write!(f, "{}", self.start) } else { write!(f, "{}-{}", self.start, self.end) }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (parse_port(a)?, parse_port(b)?),
            None => {
                let p = parse_port(s)?;
                (p, p)
            }
        };
        if start > end {
            return Err(format!("invalid port range \"{s}\": start is greater than end"));
        }
        Ok(PortRange { start, end })
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    let t = s.trim();
    match t.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid service port".to_string()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("invalid port \"{t}\" (expected 1-65535)")),
    }
}

fn port_from_int(v: i64) -> Result<PortRange, String> {
    match u16::try_from(v) {
        Ok(p) if p > 0 => Ok(PortRange::single(p)),
        _ => Err(format!("invalid port {v} (expected 1-65535)")),
    }
}

struct PortRangeVisitor;

impl Visitor<'_> for PortRangeVisitor {
    type Value = PortRange;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a port number or a range such as \"49152-65535\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
        port_from_int(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
        port_from_int(i64::try_from(v).unwrap_or(i64::MAX)).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortRangeVisitor)
    }
}

impl PortRange {
    /// True when the two ranges share at least one port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// Number of ports in the range.
    pub fn port_count(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }
}

/// The first pair of overlapping ranges in `ranges`, if any.
pub fn first_overlap(ranges: &[PortRange]) -> Option<(PortRange, PortRange)> {
    ranges.iter().enumerate().find_map(|(i, a)| ranges[i + 1..].iter().find(|b| a.overlaps(b)).map(|b| (*a, *b)))
}

/// Comma-separated display of port ranges (`9191, 9192, 49152-65535`).
pub fn format_ports(ranges: &[PortRange]) -> String {
    ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_ports_and_ranges() {
        assert_eq!("9191".parse::<PortRange>(), Ok(PortRange::single(9191)));
        assert_eq!("49152-65535".parse::<PortRange>(), Ok(PortRange { start: 49152, end: 65535 }));
        assert!("0".parse::<PortRange>().is_err());
        assert!("65536".parse::<PortRange>().is_err());
        assert!("10-5".parse::<PortRange>().unwrap_err().contains("start is greater"));
        assert!("http".parse::<PortRange>().is_err());
    }

    #[test]
    fn deserializes_numbers_and_strings() {
        #[derive(serde::Deserialize)]
        struct T {
            p: Vec<PortRange>,
        }
        let t: T = toml::from_str(r#"p = [22, "80", "1000-2000"]"#).unwrap();
        assert_eq!(t.p, vec![PortRange::single(22), PortRange::single(80), PortRange { start: 1000, end: 2000 }]);
        assert!(toml::from_str::<T>("p = [70000]").is_err());
        assert!(toml::from_str::<T>("p = [-1]").is_err());
    }

    #[test]
    fn finds_overlaps() {
        let r = |a, b| PortRange { start: a, end: b };
        assert_eq!(first_overlap(&[r(1, 5), r(6, 9)]), None);
        assert_eq!(first_overlap(&[r(1, 5), r(6, 9), r(9, 9)]), Some((r(6, 9), r(9, 9))));
        assert_eq!(r(49152, 65535).port_count(), 16384);
        assert_eq!(format_ports(&[r(22, 22), r(1, 3)]), "22, 1-3");
    }
}
