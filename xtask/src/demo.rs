//! `cargo xtask demo`: the lab, pcguard enforcing the lab policy, sample
//! traffic, and what an operator would look at afterwards.

use std::{path::Path, time::Duration};

use anyhow::Result;
use pcguard_tests::{Daemon, Lab, describe, run_probe, sample_probes, start_probe_servers};

pub fn run(root: &Path, keep: bool) -> Result<()> {
    let lab = Lab::up("pcgdemo")?;
    println!("== lab namespaces{}", describe(&lab));
    for (host, _) in pcguard_tests::PEERS {
        lab.wait_reachable(host)?;
    }
    let work = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&work);
    let config = root.join("examples/lab.toml");
    println!("\n== pcguard check {}", config.display());
    print!("{}", pcguard_cli(&["check", &config.to_string_lossy()])?);

    let daemon = Daemon::start(&lab, &config, &work, &[])?;
    println!("\n== pcguard run started (pid {}), log {}", daemon.pid(), daemon.log.display());
    let probes = sample_probes();
    let _servers = start_probe_servers(&lab, &probes)?;
    println!("\n== sample traffic (enforce mode)");
    println!("{:<52} {:>5} {:>9} {:>9} {:>9}", "FLOW", "PROTO", "EXPECTED", "IPv4", "IPv6");
    for p in &probes {
        let got4 = run_probe(&lab, p, false, Duration::from_secs(1))?;
        let got6 = run_probe(&lab, p, true, Duration::from_secs(1))?;
        let word = |ok: bool| if ok { "passed" } else { "blocked" };
        let flag = if got4 == p.allowed && got6 == p.allowed { "" } else { "  <-- UNEXPECTED" };
        println!(
            "{:<52} {:>5} {:>9} {:>9} {:>9}{flag}",
            p.what,
            format!("{:?}", p.proto).to_lowercase(),
            word(p.allowed),
            word(got4),
            word(got6)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    println!("\n== pcguard status");
    print!("{}", daemon.cli(&["status"])?);
    println!("\n== metrics (non-zero pcguard_ samples)");
    for line in daemon.scrape()?.lines() {
        let zero = line.ends_with(" 0");
        if line.starts_with("pcguard_") && !zero {
            println!("{line}");
        }
    }
    println!("\n== audit log {}", daemon.audit_log.display());
    for rec in daemon.audit()? {
        println!("{rec}");
    }
    if keep {
        println!(
            "\nlab and daemon kept; enter the server with: nsenter --net=/run/netns/{}  (Enter to stop)",
            lab.ns("srv")
        );
        let mut s = String::new();
        std::io::stdin().read_line(&mut s)?;
    }
    daemon.stop()?;
    println!("\n== pcguard stopped, programs detached; lab removed");
    Ok(())
}

fn pcguard_cli(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(pcguard_tests::pcguard_bin()?).args(args).output()?;
    anyhow::ensure!(out.status.success(), "pcguard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
