//! `cargo xtask bench --flows-summary`: `pcguard flows --summary` on a
//! generated audit log (docs/performance.md, "Querying the audit log").
//!
//! The log is a realistic mix: allowed-flow `flow_end` records (web,
//! print, admin SSH) and `unexpected_flow` records, from about 200 remote
//! addresses to about 20 local ports, in schema 1's `json` format, as long
//! as the daemon writes them. Deterministic (a fixed-seed generator), so
//! the totals the generator counted are what `pcguard flows --summary
//! --json` must print; every run asserts them, then reports lines per
//! second. `--smoke` (in `cargo xtask test`): 100,000 lines split over a
//! live log, a plain `.1` and a gzipped `.2.gz` (as logrotate leaves them),
//! with the debug build.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

/// The totals a log should summarize to.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    records: u64,
    flows: u64,
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
    remotes: u64,
}

/// xorshift64*: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Local ports and the rule that allows each (20 ports).
const PORTS: [(u16, &str); 20] = [
    (22, "admin-ssh"),
    (80, "web-http"),
    (443, "web-https"),
    (9191, "web-http"),
    (9192, "web-https"),
    (9193, "site-server"),
    (631, "ipp"),
    (9100, "raw-print"),
    (515, "lpd"),
    (445, "smb"),
    (139, "netbios"),
    (161, "snmp"),
    (7627, "mobility-print"),
    (9163, "mobility-print"),
    (9164, "mobility-print"),
    (53, "dns"),
    (389, "ldap"),
    (636, "ldaps"),
    (5432, "db-postgresql"),
    (8080, "web-alt"),
];

const REMOTES: u64 = 200;

/// Writes `lines` records to `out`, starting at second `t0` of the day;
/// adds what they should summarize to to `totals`.
fn generate(rng: &mut Rng, lines: u64, t0: u64, out: &mut impl std::io::Write, totals: &mut Totals) -> Result<()> {
    let mut line = String::with_capacity(600);
    for i in 0..lines {
        use std::fmt::Write as _;
        line.clear();
        // Spread over one day, in order.
        let ms = (t0 * 1000 + i * 86_400_000 / lines.max(1)).min(86_399_999);
        let ts =
            format!("2026-11-26T{:02}:{:02}:{:02}.{:03}Z", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        let r = rng.below(REMOTES);
        let remote = format!("10.20.{}.{}", r / 100, r % 100 + 1);
        let (port, rule) = PORTS[rng.below(PORTS.len() as u64) as usize];
        let rport = 32768 + rng.below(28000);
        if rng.below(10) < 7 {
            let (pin, pout) = (1 + rng.below(200), 1 + rng.below(300));
            let (bin, bout) = (pin * (60 + rng.below(1400)), pout * (60 + rng.below(1400)));
            write!(
                line,
                r#"{{"schema":1,"event_type":"flow_end","event_id":"019ac1f0-0000-7000-8000-{i:012x}","host":"print-1","severity_code":6,"ts":"{ts}","severity":"info","direction":"inbound","protocol":"tcp","local":{{"addr":"10.0.0.10","port":{port}}},"remote":{{"addr":"{remote}","port":{rport}}},"rule":"{rule}","peer_classes":["workstations","any"],"interface":"eth0","started":"{ts}","duration_ms":{},"packets_in":{pin},"bytes_in":{bin},"packets_out":{pout},"bytes_out":{bout},"end_reason":"fin"}}"#,
                rng.below(600_000)
            )?;
            totals.packets_in += pin;
            totals.bytes_in += bin;
            totals.packets_out += pout;
            totals.bytes_out += bout;
        } else {
            let (bytes, repeats) = (60 + rng.below(1400), rng.below(4));
            write!(
                line,
                r#"{{"schema":1,"event_type":"unexpected_flow","event_id":"019ac1f0-0000-7000-8000-{i:012x}","host":"print-1","severity_code":4,"ts":"{ts}","severity":"warning","reason":"peer_not_allowed","direction":"inbound","verdict":"would_drop","protocol":"tcp","local":{{"addr":"10.0.0.10","port":{port}}},"remote":{{"addr":"{remote}","port":{rport}}},"peer_classes":["any"],"port_rules":["{rule}"],"interface":"eth0","tcp_flags":"SYN","packet_bytes":{bytes},"repeats":{repeats}}}"#
            )?;
            totals.packets_in += 1 + repeats;
            totals.bytes_in += bytes;
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
        totals.records += 1;
        totals.flows += 1;
    }
    Ok(())
}

/// Writes the log set under `dir`: one live file, or (`rotated`) a
/// gzipped `.2.gz`, a plain `.1` and the live file, a third each. Returns
/// the live file and the totals.
fn write_set(dir: &Path, lines: u64, rotated: bool) -> Result<(PathBuf, Totals)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let live = dir.join("flows.jsonl");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut totals = Totals::default();
    let parts: Vec<(PathBuf, u64)> = if rotated {
        let third = lines / 3;
        vec![(dir.join("flows.jsonl.2"), third), (dir.join("flows.jsonl.1"), third), (live.clone(), lines - 2 * third)]
    } else {
        vec![(live.clone(), lines)]
    };
    let mut t0 = 0;
    for (path, n) in &parts {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        generate(&mut rng, *n, t0, &mut f, &mut totals)?;
        f.flush()?;
        t0 += 86_400 / parts.len() as u64;
    }
    if rotated {
        crate::run(Command::new("gzip").arg("-f").arg(dir.join("flows.jsonl.2")))?;
    }
    totals.remotes = REMOTES;
    Ok((live, totals))
}

/// Runs `pcguard flows --summary` on the set and checks its totals;
/// returns the seconds it took.
fn summarize(pcguard: &Path, live: &Path, expect: &Totals) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new(pcguard)
        .args(["flows", "--type", "all", "--summary", "by=remote,port", "--json", "--log"])
        .arg(live)
        .output()
        .with_context(|| format!("running {}", pcguard.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("pcguard flows --summary failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    ensure!(out.stderr.is_empty(), "pcguard flows --summary complained: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("pcguard flows --summary --json")?;
    let n = |k: &str| v["total"][k].as_u64().unwrap_or(u64::MAX);
    let got = Totals {
        records: v["records"].as_u64().unwrap_or(u64::MAX),
        flows: n("flows"),
        packets_in: n("packets_in"),
        bytes_in: n("bytes_in"),
        packets_out: n("packets_out"),
        bytes_out: n("bytes_out"),
        remotes: n("hosts"),
    };
    ensure!(&got == expect, "pcguard flows --summary totals {got:?}, the generator wrote {expect:?}");
    let rows = v["rows"].as_array().map_or(0, Vec::len);
    ensure!(
        rows > 0 && rows as u64 <= REMOTES * PORTS.len() as u64,
        "{rows} rows for {REMOTES} remotes and {} ports",
        PORTS.len()
    );
    Ok(secs)
}

/// The benchmark: `lines` records in one file, then the same split into a
/// rotated set with a gzipped file; release build.
pub fn run(root: &Path, pcguard: &Path, lines: u64) -> Result<()> {
    let dir = root.join("target/flows-bench");
    println!("| log | lines | MB | seconds | lines/s |");
    println!("|---|---:|---:|---:|---:|");
    for rotated in [false, true] {
        let (live, totals) = write_set(&dir, lines, rotated)?;
        let mb =
            std::fs::read_dir(&dir)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum::<u64>() as f64 / 1e6;
        // The median of three runs (the first one also warms the page
        // cache).
        let mut secs: Vec<f64> = (0..3).map(|_| summarize(pcguard, &live, &totals)).collect::<Result<_>>()?;
        secs.sort_by(f64::total_cmp);
        let s = secs[1];
        let what = if rotated { "live + .1 + .2.gz (a third each)" } else { "one file" };
        println!("| {what} | {lines} | {mb:.0} | {s:.2} | {:.0} |", lines as f64 / s);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The short asserted version `cargo xtask test` runs: 100,000 lines over
/// a rotated set with a gzipped file, the debug build, the totals exact.
pub fn smoke(root: &Path, pcguard: &Path) -> Result<()> {
    let dir = root.join("target/flows-bench-smoke");
    let (live, totals) = write_set(&dir, 100_000, true)?;
    let secs = summarize(pcguard, &live, &totals)?;
    println!("flows --summary smoke: 100000 lines (rotated, gzipped) in {secs:.2} s, totals as generated");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
