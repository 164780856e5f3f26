//! Floods: what an attacker's traffic may not do to pcguard — fill the
//! disk with audit lines, blow up the daemon's memory, stall its metrics,
//! push established flows out of conntrack. Each test asserts the figure.
//! Root; run with `cargo xtask test` (hping3 is installed by its deps).

use std::{
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use pcguard_tests::{probes::*, *};

fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn m(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

/// hping3 in `host`'s namespace for `secs` seconds, as fast as it can.
fn flood(lab: &Lab, host: &str, secs: u64, args: &[&str]) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns(host), "timeout", &secs.to_string(), "hping3", "--flood", "-q"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting hping3 (cargo xtask deps installs it)")
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

fn audit_lines(d: &Daemon) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(&d.audit_log).unwrap_or_default();
    parse_audit_text(&text)
}

/// The lab config with extra keys in its `[audit]` and `[conntrack]`
/// tables, and `extra` appended.
fn config(audit: &str, conntrack: &str, extra: &str) -> String {
    let base = lab_config("enforce", extra);
    assert!(
        base.contains("report_interval = \"60s\"") && base.contains("udp_timeout = 30\n"),
        "the lab config changed"
    );
    base.replace("report_interval = \"60s\"", &format!("report_interval = \"60s\"\n{audit}"))
        .replace("udp_timeout = 30\n", &format!("udp_timeout = 30\n{conntrack}\n"))
}

/// The records-per-second ceiling under test.
const CEILING: u64 = 50;
/// What the daemon's resident memory may reach under the flood
/// (documented in docs/audit.md, "Volume").
const RSS_BOUND_KIB: u64 = 96 * 1024;

/// 20 s of SYNs from random spoofed sources to a port without a rule, as
/// fast as the lab goes: audit lines stay under the ceiling (plus one
/// second's burst and the summaries), the daemon's memory under its bound,
/// every scrape under a second, and legitimate connections all succeed.
#[test]
fn a_spoofed_syn_flood_keeps_audit_memory_and_scrapes_bounded() -> Result<()> {
    let cfg = config(&format!("max_records_per_second = {CEILING}\n"), "", "");
    let cfg = cfg.replace("report_interval = \"60s\"", "report_interval = \"10s\"");
    let env = TestLab::up("pf1", tmp(), &cfg)?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9192))?;
    let daemon = env.start(&[])?;
    let before = audit_lines(&daemon)?.len();
    let dropped_before =
        m(&daemon.scrape()?, "pcguard_packets_total", &[("direction", "ingress"), ("verdict", "dropped")]);
    let secs = 20;
    let mut hping = flood(&env.lab, "out", secs, &["-S", "-p", "9999", "--rand-source", &addr(SERVER).to_string()])?;
    let start = Instant::now();
    let (mut slowest_scrape, mut legit, mut legit_ok, mut max_rss) = (Duration::ZERO, 0, 0, 0);
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        daemon.scrape()?;
        slowest_scrape = slowest_scrape.max(t.elapsed());
        let p = Probe { what: "legit web", from: "sec", to: SERVER, proto: Proto::Tcp, port: 9192, allowed: true };
        legit += 1;
        legit_ok += usize::from(run_probe(&env.lab, &p, false, Duration::from_secs(2))?);
        max_rss = max_rss.max(rss_kib(daemon.pid())?);
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = hping.wait();
    let elapsed = start.elapsed().as_secs_f64();
    // The summaries of the flood's held-back records (one per interval).
    std::thread::sleep(Duration::from_secs(12));
    let text = daemon.scrape()?;
    let dropped =
        m(&text, "pcguard_packets_total", &[("direction", "ingress"), ("verdict", "dropped")]) - dropped_before;
    let recs = audit_lines(&daemon)?;
    let new = &recs[before..];
    let flows = new.iter().filter(|r| r["event"].is_null()).count() as u64;
    let summaries: Vec<&serde_json::Value> = new.iter().filter(|r| r["event"] == "audit_summary").collect();
    println!(
        "flood: {dropped} packets dropped in {elapsed:.1} s ({:.0} pps); {flows} flow records ({:.1}/s), {} summaries; \
         slowest scrape {slowest_scrape:?}; max RSS {max_rss} KiB; legit {legit_ok}/{legit}",
        dropped / elapsed,
        flows as f64 / elapsed,
        summaries.len()
    );
    assert!(dropped > 20_000.0, "the flood did not arrive ({dropped} packets dropped)");
    assert!(
        flows <= CEILING * (secs + 12) + CEILING,
        "{flows} flow records in {elapsed:.0} s: over the ceiling of {CEILING}/s"
    );
    assert!(flows >= CEILING * secs / 2, "only {flows} flow records: the ceiling is not what holds them back");
    assert!(!summaries.is_empty(), "no summary of the held-back records");
    let held: u64 = summaries
        .iter()
        .map(|s| {
            s["deduplicated"].as_u64().unwrap_or(0)
                + s["over_ceiling"].as_u64().unwrap_or(0)
                + s["kernel_rate_limited"].as_u64().unwrap_or(0)
        })
        .sum();
    assert!(held > 1000, "the summaries count only {held} held-back reports");
    // A summary lists the ports of the records it held back: the flood's
    // (one whose period held back only kernel rate-limited reports, which
    // carry no port, lists none).
    let ports: Vec<&serde_json::Value> = summaries.iter().filter_map(|s| s["top_ports"].as_array()?.first()).collect();
    assert!(!ports.is_empty() && ports.iter().all(|p| p["key"] == "tcp/9999"), "{summaries:?}");
    assert!(slowest_scrape < Duration::from_secs(1), "a scrape took {slowest_scrape:?}");
    assert!(max_rss < RSS_BOUND_KIB, "daemon RSS reached {max_rss} KiB");
    assert_eq!(legit_ok, legit, "legitimate connections failed during the flood");
    Ok(())
}

/// A flood of new allowed flows (SYNs to 9191 from ever new source
/// ports, ten times what the new-flow table holds) next to an established
/// TCP flow (the server's LDAP connection) and a UDP request/response flow:
/// neither loses anything or stalls, scrapes stay under a second.
#[test]
fn a_conntrack_flood_does_not_touch_established_flows() -> Result<()> {
    let udp_rule = "\n[[rule]]\nname = \"test-udp-7000\"\ndescription = \"test UDP service\"\ndirection = \"inbound\"\nprotocol = \"udp\"\nports = [7000]\npeers = [\"devices\"]\n";
    let cfg = config("", "max_entries = 4096\nnew_entries = 1024", udp_rule);
    let env = TestLab::up("pf2", tmp(), &cfg)?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9191))?;
    let _ldap = EchoServer::start(&env.lab, "ldap", 389)?;
    let _udp = UdpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 7000))?;
    // The lab's veths get the TC ingress hook (auto): native XDP on a veth
    // queues frames in a 256-entry ring of its own, which a flood at the
    // veth's full rate overflows whatever the program does (measured: LDAP
    // replies seconds late, UDP replies lost, with native XDP; nothing
    // with TC or generic XDP). docs/performance.md, "Which ingress hook".
    let daemon = env.start(&[])?;
    let created_before = m(&daemon.scrape()?, "pcguard_conntrack_created_total", &[]);
    let ldap = LongFlow::start(&env.lab, SERVER, sa(addr("ldap"), 389), Duration::from_millis(10))?;
    let udp = UdpLoop::start(&env.lab, "mfd", sa(addr(SERVER), 7000), Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_secs(1));
    let secs = 15;
    let mut hping = flood(&env.lab, "ws", secs, &["-S", "-p", "9191", "-s", "1024", &addr(SERVER).to_string()])?;
    let start = Instant::now();
    let mut slowest_scrape = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        daemon.scrape()?;
        slowest_scrape = slowest_scrape.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = hping.wait();
    std::thread::sleep(Duration::from_millis(500));
    let created = m(&daemon.scrape()?, "pcguard_conntrack_created_total", &[]) - created_before;
    let (round_trips, failures, slowest) = ldap.stats();
    let (sent, lost, slowest_udp) = udp.stats();
    drop((ldap, udp));
    println!(
        "conntrack flood: {created} flows created; LDAP {round_trips} round trips, {failures} failed, slowest {slowest:?}; \
         UDP {sent} sent, {lost} lost, slowest {slowest_udp:?}; slowest scrape {slowest_scrape:?}"
    );
    assert!(created > 10.0 * 1024.0, "the flood created only {created} flows: it did not churn the new-flow table");
    assert_eq!(failures, 0, "the established LDAP flow failed");
    assert!(slowest < Duration::from_millis(200), "an LDAP reply was late: {slowest:?}");
    assert_eq!(lost, 0, "UDP replies were lost ({lost} of {sent})");
    assert!(slowest_udp < Duration::from_millis(200), "a UDP reply was late: {slowest_udp:?}");
    assert!(slowest_scrape < Duration::from_secs(1), "a scrape took {slowest_scrape:?}");
    Ok(())
}

/// A UDP request every `period` from a lab host, each answer awaited
/// (500 ms): counts requests, losses, and the slowest answer.
struct UdpLoop {
    sent: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    slowest: Arc<std::sync::Mutex<Duration>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpLoop {
    fn start(lab: &Lab, host: &str, to: SocketAddr, period: Duration) -> Result<Self> {
        let sock = lab.run_in(host, || UdpSocket::bind("0.0.0.0:0"))??;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, l, w, st) = (sent.clone(), lost.clone(), slowest.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut i = 0u64;
            while !st.load(Ordering::Relaxed) {
                let msg = format!("req {i}");
                let t = Instant::now();
                let _ = sock.send_to(msg.as_bytes(), to);
                s.fetch_add(1, Ordering::Relaxed);
                // Answers to earlier (late) requests do not count for this one.
                let mut answered = false;
                while let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if &buf[..n] == format!("ok {msg}").as_bytes() {
                        answered = true;
                        break;
                    }
                }
                if answered {
                    let mut m = w.lock().unwrap();
                    *m = (*m).max(t.elapsed());
                } else {
                    l.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                std::thread::sleep(period);
            }
        });
        Ok(Self { sent, lost, slowest, stop, thread: Some(thread) })
    }

    fn stats(&self) -> (u64, u64, Duration) {
        (self.sent.load(Ordering::Relaxed), self.lost.load(Ordering::Relaxed), *self.slowest.lock().unwrap())
    }
}

impl Drop for UdpLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The audit log on a tiny file system: filled while records keep coming
/// (writes fail and are counted), then space is freed: every line in the
/// file is a whole JSON record, and records are written again.
#[test]
fn the_audit_log_on_a_full_file_system_keeps_whole_lines() -> Result<()> {
    let cfg = config("max_records_per_second = 1000\n", "", "");
    let env = TestLab::up("pf3", tmp(), &cfg)?;
    let fs = env.work.join("tinyfs");
    std::fs::create_dir_all(&fs)?;
    sh("mount", &["-t", "tmpfs", "-o", "size=64k", "tmpfs", &fs.to_string_lossy()])?;
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(fs.clone());
    // Leave about 8 KiB: a handful of records fit, the rest does not.
    std::fs::write(fs.join("filler"), vec![0u8; 56 * 1024])?;
    let log = fs.join("flows.jsonl");
    let daemon =
        Daemon::start(&env.lab, &env.config, &env.work.join("daemon"), &["--audit-log", &log.to_string_lossy()])?;
    let mut hping =
        flood(&env.lab, "out", 3, &["-S", "-p", "9999", "--rand-source", "-i", "u2000", &addr(SERVER).to_string()])?;
    let _ = hping.wait();
    std::thread::sleep(Duration::from_secs(1));
    let errors = m(&daemon.scrape()?, "pcguard_audit_write_errors_total", &[]);
    std::fs::remove_file(fs.join("filler"))?;
    let lines_when_full = std::fs::read_to_string(&log)?.lines().count();
    let mut hping =
        flood(&env.lab, "out", 2, &["-S", "-p", "9998", "--rand-source", "-i", "u5000", &addr(SERVER).to_string()])?;
    let _ = hping.wait();
    std::thread::sleep(Duration::from_secs(1));
    let text = std::fs::read_to_string(&log)?;
    for (i, line) in text.lines().enumerate() {
        let rec = serde_json::from_str::<serde_json::Value>(line)
            .with_context(|| format!("line {} is not a whole record: {line:?}", i + 1))?;
        validate_record(&rec)?;
    }
    assert!(text.ends_with('\n'), "the file ends inside a record");
    let lines = text.lines().count();
    println!(
        "full file system: {lines_when_full} records fit, {errors} writes failed; {lines} records after space returned"
    );
    assert!(errors > 0.0, "the file system never filled up (no write failed)");
    assert!(lines > lines_when_full, "no record was written after space returned");
    assert!(text.lines().any(|l| l.contains("\"port\":9998")), "the records after space returned are missing");
    drop(daemon);
    Ok(())
}
