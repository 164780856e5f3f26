//! `pcguard run --trace-datapath` on the lab (feature `trace` of
//! pcguard-tests, and a pcguard binary built with `--features trace`:
//! `cargo xtask test --trace` builds both): the real daemon loads the trace
//! object and logs the decision of each packet of real traffic, an allowed
//! connection to the web port and a dropped one to a port without a rule.
//! Root and a lab (`flock /tmp/pcguard-e2e.lock`).
#![cfg(feature = "trace")]

use std::{net::Ipv6Addr, path::Path, time::Duration};

use anyhow::Result;
use pcguard_tests::*;

fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// The decision records of the daemon's log with `verdict` and `dport`.
fn records<'a>(log: &'a str, verdict: &str, dport: u16) -> Vec<&'a str> {
    let (verdict, dport) = (format!(" verdict={verdict} "), format!(" dport={dport} "));
    log.lines().filter(|l| l.contains("decision dir=") && l.contains(&verdict) && l.contains(&dport)).collect()
}

#[test]
fn trace_datapath_logs_the_decisions_of_real_traffic() -> Result<()> {
    let env = TestLab::up("ptr1", tmp(), &lab_config("enforce", ""))?;
    let any = |port| sa(Ipv6Addr::UNSPECIFIED, port);
    let _web = TcpServer::start(&env.lab, SERVER, any(9191))?;
    let _other = TcpServer::start(&env.lab, SERVER, any(9999))?;
    let daemon = env.start(&["--trace-datapath"])?;
    assert!(ws_reaches(&env.lab, 9191)?, "the web port is allowed");
    assert!(!ws_reaches(&env.lab, 9999)?, "9999 has no rule");
    wait_until("the decision records in the daemon's log", Duration::from_secs(5), || {
        let log = daemon.log_text();
        Ok(!records(&log, "allowed", 9191).is_empty() && !records(&log, "dropped", 9999).is_empty())
    })
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", daemon.log_text()))?;
    let log = daemon.log_text();
    let allowed = records(&log, "allowed", 9191);
    let dropped = records(&log, "dropped", 9999);
    // The workstation's SYN to 9191: a new flow its rule allows.
    assert!(
        allowed
            .iter()
            .any(|l| l.contains("dir=ingress") && l.contains("reason=none proto=tcp") && !l.ends_with(" rule=0")),
        "{allowed:#?}"
    );
    // Each SYN to 9999 (and its retransmissions): dropped, no rule; at
    // debug level, target pcguard::datapath (env_logger's format).
    assert!(
        dropped.iter().all(|l| l.contains("DEBUG pcguard::datapath")
            && l.contains("decision dir=ingress verdict=dropped reason=no_rule proto=tcp")
            && l.ends_with(" dport=9999 rule=0")),
        "{dropped:#?}"
    );
    assert!(daemon.stop()?.success());
    Ok(())
}
