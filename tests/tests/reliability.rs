//! Reliability end to end: enforcement outlives the daemon (crash, stop,
//! restart), reloads are all-or-nothing, the pin directory is not a way in.
//! Root; run with `cargo xtask test`.

use std::{net::Ipv6Addr, path::Path, time::Duration};

use anyhow::{Result, ensure};
use pcguard_tests::{probes::*, *};

fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn m(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or(0.0)
}

/// Allowed web packets counted at ingress so far.
fn web_packets(d: &Daemon) -> Result<f64> {
    let text = d.scrape()?;
    Ok(m(&text, "pcguard_packets_total", &[("direction", "ingress"), ("port", "9191"), ("verdict", "allowed")]))
}

/// A 1 kHz probe stream at a denied port and a long allowed TCP flow run
/// through a kill -9, a restart that adopts, and a SIGTERM + start: no
/// probe ever reaches the listener, the flow never fails or stalls, and
/// the restarted daemon carries conntrack and the counters over.
#[test]
fn crash_and_restarts_let_nothing_through_and_keep_flows() -> Result<()> {
    let env = TestLab::up("pr1", tmp(), &lab_config("enforce", ""))?;
    let denied = DeniedListener::start(&env.lab, SERVER, 9999)?;
    let _echo = EchoServer::start(&env.lab, SERVER, 9191)?;
    let daemon = env.start(&[])?;
    let flow = LongFlow::start(&env.lab, "ws", sa(addr(SERVER), 9191), Duration::from_millis(20))?;
    let probes = ProbeStream::start(&env.lab, "ws", sa(addr(SERVER), 9999), Duration::from_millis(1))?;
    std::thread::sleep(Duration::from_secs(1));
    let established_before = daemon.conntrack()?.len();
    ensure!(established_before >= 1, "the long flow is not in the established table");
    let before_kill = web_packets(&daemon)?;

    // A crash: nothing of the daemon runs, the pinned programs enforce.
    daemon.kill()?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(denied.reached(), (0, 0), "probes reached the listener while the daemon was dead");

    // A restart adopts the maps and links of the dead daemon.
    let daemon = env.start(&[])?;
    let log = daemon.log_text();
    assert!(log.contains("adopted the maps pinned in"), "{log}");
    let after = daemon.conntrack()?;
    assert!(after.len() >= established_before, "conntrack not carried over: {} -> {}", established_before, after.len());
    let after_restart = web_packets(&daemon)?;
    assert!(after_restart >= before_kill, "counters not carried over: {before_kill} -> {after_restart}");
    std::thread::sleep(Duration::from_millis(500));

    // A stop and start while the probes run.
    assert!(daemon.stop()?.success());
    let daemon = env.start(&[])?;
    std::thread::sleep(Duration::from_secs(1));

    let sent = probes.sent();
    drop(probes);
    let (round_trips, failures, slowest) = flow.stats();
    drop(flow);
    assert!(sent >= 2000, "the probe stream sent only {sent}");
    assert_eq!(denied.reached(), (0, 0), "of {sent} probes, some reached the listener");
    assert_eq!(failures, 0, "the long flow failed ({round_trips} round trips)");
    assert!(round_trips >= 100, "the long flow made only {round_trips} round trips");
    assert!(slowest < Duration::from_millis(500), "the long flow stalled: slowest round trip {slowest:?}");
    drop(daemon);
    Ok(())
}

/// A daemon restarted after a reload (whose site rule, listed first, would
/// renumber every rule of a fresh compile) adopts the dead daemon's
/// numbering, and its metrics name the rules as the kernel counts them.
#[test]
fn a_restart_after_a_reload_labels_rules_as_the_kernel_counts_them() -> Result<()> {
    let env = TestLab::up("pr6", tmp(), &lab_config("enforce", ""))?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9191))?;
    let daemon = env.start(&[])?;
    env.write_config(&lab_config("enforce", ALLOW_9999))?;
    daemon.signal(libc::SIGHUP)?;
    wait_until("the reload to apply", Duration::from_secs(10), || Ok(daemon.log_text().contains("reload applied")))?;
    daemon.kill()?;
    let daemon = env.start(&[])?;
    let log = daemon.log_text();
    assert!(log.contains("adopted the maps pinned in"), "{log}");
    let rule = |text: &str, id| m(text, "pcguard_rule_packets_total", &[("rule", id), ("direction", "ingress")]);
    let before = daemon.scrape()?;
    for _ in 0..3 {
        assert!(ws_reaches(&env.lab, 9191)?, "web blocked after the restart");
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = daemon.scrape()?;
    assert!(
        rule(&after, "web-http") - rule(&before, "web-http") >= 6.0,
        "web traffic not counted as web-http:\n{after}"
    );
    assert_eq!(
        rule(&after, "legacy-9999"),
        rule(&before, "legacy-9999"),
        "web traffic counted as legacy-9999:\n{after}"
    );
    Ok(())
}

/// A reload whose last step fails (the audit log cannot be created)
/// changes nothing: the would-be new port stays closed; the next valid
/// reload applies.
#[test]
fn a_failed_reload_changes_nothing_and_the_next_one_applies() -> Result<()> {
    let env = TestLab::up("pr2", tmp(), &lab_config("enforce", ""))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9999))?;
    let daemon = env.start(&["--config-audit-log"])?;
    assert!(!ws_reaches(&env.lab, 9999)?);
    let broken = lab_config("enforce", ALLOW_9999)
        .replace("path = \"/tmp/pcguard-lab/flows.jsonl\"", "path = \"/proc/pcguard-cannot-be-created/flows.jsonl\"");
    assert!(broken.contains("/proc/pcguard-cannot-be-created"), "the lab config's audit path moved");
    env.write_config(&broken)?;
    daemon.signal(libc::SIGHUP)?;
    wait_until("the reload to fail", Duration::from_secs(10), || Ok(daemon.log_text().contains("reload failed")))?;
    for _ in 0..10 {
        assert!(!ws_reaches(&env.lab, 9999)?, "a failed reload opened 9999");
    }
    env.write_config(&lab_config("enforce", ALLOW_9999))?;
    daemon.signal(libc::SIGHUP)?;
    wait_until("the reload to apply", Duration::from_secs(10), || Ok(daemon.log_text().contains("reload applied")))?;
    assert!(ws_reaches(&env.lab, 9999)?, "the valid reload did not open 9999");
    Ok(())
}

/// Reloads between two configs whose peer prefixes fill a generation's
/// share of the tries, each way and back: every one applies (the inactive
/// generation is emptied before it is filled), and verdicts follow.
#[test]
fn reloads_between_full_peer_tables_never_overflow() -> Result<()> {
    // 16,000 /32 prefixes per config, disjoint between the two; the lab's
    // own workstation is in both.
    let many = |second: u8| -> String {
        let cidrs: Vec<String> =
            (0..16_000u32).map(|i| format!("\"10.{}.{}.{}\"", 100 + second, (i >> 8) & 0xff, i & 0xff)).collect();
        lab_config("enforce", "").replace(
            "workstations = [\"10.77.0.2\", \"fd77::2\"]",
            &format!("workstations = [\"10.77.0.2\", \"fd77::2\", {}]", cidrs.join(", ")),
        )
    };
    let (a, b) = (many(0), many(1));
    assert!(a.contains("10.100.0.1"), "the lab config's workstations line moved");
    let env = TestLab::up("pr3", tmp(), &a)?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9191))?;
    let daemon = env.start(&[])?;
    for (i, cfg) in [&b, &a, &b].into_iter().enumerate() {
        env.write_config(cfg)?;
        daemon.signal(libc::SIGHUP)?;
        let want = i + 1;
        wait_until("the reload", Duration::from_secs(30), || {
            Ok(daemon.log_text().matches("reload applied").count() >= want
                || daemon.log_text().contains("reload failed"))
        })?;
        assert!(!daemon.log_text().contains("reload failed"), "reload {want} failed:\n{}", daemon.log_text());
    }
    env.write_config(&lab_config("enforce", ""))?;
    daemon.signal(libc::SIGHUP)?;
    wait_until("the reload to the lab config", Duration::from_secs(30), || {
        Ok(daemon.log_text().matches("reload applied").count() >= 4)
    })?;
    assert!(ws_reaches(&env.lab, 9191)?);
    Ok(())
}

/// A symlink planted at the pin path: the daemon refuses to start and the
/// directory it points to keeps its files.
#[test]
fn a_symlink_at_the_pin_path_is_refused_and_nothing_is_deleted() -> Result<()> {
    let env = TestLab::up("pr4", tmp(), &lab_config("enforce", ""))?;
    let victim = env.work.join("victim");
    std::fs::create_dir_all(&victim)?;
    std::fs::write(victim.join("precious"), "keep me")?;
    let pin = env.lab.bpffs_dir();
    let _ = std::fs::remove_dir_all(&pin);
    std::os::unix::fs::symlink(&victim, &pin)?;
    let started = env.start(&[]);
    let _ = std::fs::remove_file(&pin);
    let err = format!("{:#}", started.err().expect("the daemon started on a symlinked pin path"));
    assert!(err.contains("symlink"), "{err}");
    assert_eq!(std::fs::read_to_string(victim.join("precious"))?, "keep me");
    Ok(())
}

/// A second daemon on the same pin directory (another run dir) is refused
/// and leaves the running one's pins and counters as they are.
#[test]
fn a_second_daemon_on_the_same_pins_is_refused() -> Result<()> {
    let env = TestLab::up("pr5", tmp(), &lab_config("enforce", ""))?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9191))?;
    let daemon = env.start(&[])?;
    assert!(ws_reaches(&env.lab, 9191)?);
    let before = web_packets(&daemon)?;
    assert!(before > 0.0);
    let other = Daemon::start(&env.lab, &env.config, &env.work.join("other"), &["--metrics-listen", "127.0.0.1:9751"]);
    let err = format!("{:#}", other.err().expect("a second daemon started on the same pins"));
    assert!(err.contains("another pcguard daemon is running"), "{err}");
    assert!(web_packets(&daemon)? >= before, "the second daemon reset the counters");
    assert!(ws_reaches(&env.lab, 9191)?);
    Ok(())
}

/// Pinned maps of another kernel/user contract are never adopted: a daemon
/// that finds only a map set named for another ABI version (here this
/// build's set, renamed as an older pcguard would have named it) pins a
/// set of its own, moves the links to its programs, then unpins the other
/// set. Its counters start over; enforcement goes on throughout.
#[test]
fn a_map_set_of_another_abi_is_not_adopted() -> Result<()> {
    use pcguard_common::ABI_VERSION;
    let env = TestLab::up("pr6", tmp(), &lab_config("enforce", ""))?;
    let _web = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9191))?;
    let _srv = TcpServer::start(&env.lab, SERVER, sa(Ipv6Addr::UNSPECIFIED, 9999))?;
    let daemon = env.start(&[])?;
    assert!(ws_reaches(&env.lab, 9191)?);
    ensure!(web_packets(&daemon)? > 0.0, "no allowed web packets counted");
    let maps = daemon.maps_dir()?;
    assert!(daemon.stop()?.success());

    let name = maps.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let this = format!("maps-v{ABI_VERSION}-");
    ensure!(name.starts_with(&this), "map set {name} is not named for ABI {ABI_VERSION}");
    let older_name = name.replacen(&this, &format!("maps-v{}-", ABI_VERSION - 1), 1);
    let older = maps.with_file_name(&older_name);
    std::fs::rename(&maps, &older)?;
    assert!(!ws_reaches(&env.lab, 9999)?, "enforcement went away with the renamed pins");

    let daemon = env.start(&[])?;
    let log = daemon.log_text();
    assert!(!log.contains("adopted the maps"), "maps of ABI {} adopted:\n{log}", ABI_VERSION - 1);
    assert!(log.contains("pinned new maps in"), "{log}");
    assert!(log.contains(&format!("unpinning the map set {older_name} of an earlier layout")), "{log}");
    assert!(!older.exists(), "the other ABI's set is still pinned");
    assert_eq!(daemon.maps_dir()?, maps);
    assert_eq!(web_packets(&daemon)?, 0.0, "counters carried over from the other ABI's maps");
    assert!(ws_reaches(&env.lab, 9191)?);
    assert!(!ws_reaches(&env.lab, 9999)?);
    let status = daemon.cli(&["status"])?;
    assert!(status.contains(&format!("kernel ABI: v{ABI_VERSION}\n")), "{status}");
    Ok(())
}
