//! Positions in the config text: byte offsets to line numbers, and the
//! dotted key in effect at an offset (for TOML parse errors, which carry a
//! span but no key path).

use std::{collections::HashMap, ops::Range};

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// 1-based line of the start of a span, if any.
pub fn line_of_span(text: &str, span: Option<Range<usize>>) -> Option<usize> {
    span.map(|s| line_of(text, s.start))
}

/// The table in effect at `offset` (`features`, `rule[1]`, or empty for
/// the top level) and the last key assigned at or before it (empty on a
/// table header line).
pub fn key_at(text: &str, offset: usize) -> (String, String) {
    keys_before(text, |start| start <= offset)
}

/// For a syntax error found at `offset`: the table and key of the
/// statement in progress there, the last one that *started before* the
/// offset. (An unclosed array is noticed on the next line, whose key is
/// not the culprit.)
pub fn statement_at(text: &str, offset: usize) -> (String, String) {
    keys_before(text, |start| start < offset)
}

/// Table and key of the last statement whose first character's offset
/// satisfies `include`.
fn keys_before(text: &str, include: impl Fn(usize) -> bool) -> (String, String) {
    let mut table = String::new();
    let mut key = String::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let mut line_start = 0;
    for l in text.split_inclusive('\n') {
        let start = line_start + (l.len() - l.trim_start().len());
        line_start += l.len();
        if !include(start) {
            break;
        }
        let t = l.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = arrays.entry(name.clone()).and_modify(|n| *n += 1).or_insert(0);
            table = format!("{name}[{n}]");
            key.clear();
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
            key.clear();
        } else if let Some(k) = assigned_key(t) {
            key = k;
        }
    }
    (table, key)
}

/// `table.key`, or whichever of the two is not empty.
pub fn join_key(table: &str, key: &str) -> String {
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => table.to_string(),
        (false, false) => format!("{table}.{key}"),
    }
}

fn assigned_key(line: &str) -> Option<String> {
    if line.starts_with('#') {
        return None;
    }
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    let is_key = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
    is_key.then(|| k.replace(['"', '\''], ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "role = \"primary\"\n[peers]\nworkstations = [\n  \"10.0.0.0/8\",\n]\n[[rule]]\nname = \"a\"\n[[rule]]\nname = \"b\"\nports = [1]\n";

    #[test]
    fn lines_and_keys() {
        assert_eq!(line_of(TEXT, 0), 1);
        let cidr = TEXT.find("10.0.0.0").unwrap();
        assert_eq!(line_of(TEXT, cidr), 4);
        assert_eq!(key_at(TEXT, cidr), ("peers".to_string(), "workstations".to_string()));
        let ports = TEXT.find("ports").unwrap();
        assert_eq!(key_at(TEXT, ports), ("rule[1]".to_string(), "ports".to_string()));
        assert_eq!(key_at(TEXT, TEXT.find("[peers]").unwrap()), ("peers".to_string(), String::new()));
        // A syntax error noticed at the start of the next statement belongs
        // to the one before.
        let unclosed = "[peers]\nworkstations = [\"10.0.0.0/8\"\nadmin = [\"10.1.1.1\"]\n";
        let at = unclosed.find("admin").unwrap();
        assert_eq!(statement_at(unclosed, at), ("peers".to_string(), "workstations".to_string()));
        assert_eq!(key_at(unclosed, at), ("peers".to_string(), "admin".to_string()));
        assert_eq!(join_key("peers", "x"), "peers.x");
        assert_eq!(join_key("", "role"), "role");
        assert_eq!(line_of_span(TEXT, None), None);
    }
}
