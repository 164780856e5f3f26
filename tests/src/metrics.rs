//! Reading the daemon's Prometheus endpoint.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

/// A minimal HTTP GET; returns the body of a 200 answer. HTTP/1.0, so the
/// answer is never chunked.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.lines().next().unwrap_or("");
    ensure!(status.starts_with("HTTP/1.") && status[8..].starts_with(" 200"), "GET {path}: {status}");
    Ok(body.to_string())
}

/// Value of the sample `name{labels}` in an OpenMetrics/Prometheus text,
/// where every `k="v"` of `labels` must be present (others may be too).
/// Sums over matching series.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, lbl) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if labels.iter().all(|(k, v)| lbl.split(',').any(|kv| kv == format!("{k}=\"{v}\""))) {
            *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    total
}
