use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use pcguard::{
    daemon::{self, RunOptions},
    datapath::DEFAULT_BPFFS_DIR,
    flows,
    state::{DEFAULT_RUN_DIR, State},
    status, sys,
};

/// eBPF/XDP port policy enforcer and traffic monitor for PaperCut NG/MF servers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the policy, attach to the configured interfaces and serve metrics
    /// and the audit log until SIGTERM. SIGHUP reloads the config.
    Run {
        #[command(flatten)]
        config: ConfigPath,
        /// bpffs directory for the pinned maps and links (read by `pcguard
        /// status`, adopted by the next `pcguard run`).
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Remove the programs and pins when the daemon exits. Without it,
        /// a stopped or crashed daemon leaves the last policy enforced.
        #[arg(long)]
        detach_on_exit: bool,
        /// Directory of the state file.
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Attach XDP in generic (skb) mode even where native mode works.
        #[arg(long)]
        xdp_skb: bool,
        /// Override the metrics listen address of the config.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Override the audit log path of the config.
        #[arg(long)]
        audit_log: Option<PathBuf>,
        /// Revert a newly applied policy unless `pcguard confirm` is run
        /// within this time (e.g. 60s, 5m). At start, an unconfirmed policy
        /// detaches pcguard entirely.
        #[arg(long, value_parser = humantime::parse_duration)]
        confirm_within: Option<Duration>,
        /// Shortest life of a DNS-learned address (default 60s). For tests
        /// that watch learned addresses expire; not for production.
        #[arg(long, hide = true, value_parser = humantime::parse_duration)]
        dns_min_ttl: Option<Duration>,
        /// Debugging: load the trace build of the programs, which logs every
        /// packet's decision (verdict, reason, protocol, ports, rule) at
        /// debug level (RUST_LOG=info,pcguard::datapath=debug). Costs time
        /// per packet; needs a pcguard built with `--features trace`.
        #[arg(long)]
        trace_datapath: bool,
    },
    /// Validate a config and print the effective rule table.
    Check {
        #[command(flatten)]
        config: ConfigPath,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Write a starter config (monitor mode) from an installed PaperCut
    /// server's files: server.properties on an Application Server,
    /// print-provider.conf on a secondary.
    Init {
        /// PaperCut's install directory ([app-path], e.g. /home/papercut).
        #[arg(long)]
        papercut_dir: PathBuf,
        /// The interface to guard (default: the default route's).
        #[arg(long)]
        interface: Option<String>,
        /// Write here (refuses an existing file) instead of to stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the PaperCut port catalog (from the PaperCut document).
    Catalog {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show attached programs and live counters of the running daemon.
    Status {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show, follow or summarize the audit log's flow records.
    Flows {
        /// Audit log to read (default: the running daemon's), with its
        /// rotated siblings (NAME.1, NAME.2.gz, ...); a rotated file alone;
        /// or a glob (`'flows.jsonl*'`). May be given several times.
        #[arg(long)]
        log: Vec<PathBuf>,
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Print the last N matching records (after the filters) before
        /// following.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Print and exit instead of following.
        #[arg(long)]
        no_follow: bool,
        /// Print the JSON records as they are.
        #[arg(long)]
        json: bool,
        #[arg(long, value_parser = ["no_rule", "peer_not_allowed", "outbound_to_workstation", "malformed", "untracked_reply", "dns_poisoning"])]
        reason: Option<String>,
        #[arg(long, value_parser = ["inbound", "outbound"])]
        direction: Option<String>,
        #[arg(long, value_parser = ["alert", "warning", "info"])]
        severity: Option<String>,
        /// Only flows whose remote address is in this peer class.
        #[arg(long)]
        peer_class: Option<String>,
        /// Only flows with this local or remote port.
        #[arg(long)]
        port: Option<u16>,
        /// Only flows with this local or remote address.
        #[arg(long)]
        addr: Option<IpAddr>,
        /// Only records from this time on: RFC 3339 UTC (2026-11-27T10:00:00Z)
        /// or a duration ago (90s, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
        /// Only records up to this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// Which records: unexpected (unexpected_flow, dns_poisoning; the
        /// default), allowed (flow_start, flow_end) or all.
        #[arg(long = "type", value_name = "TYPE", default_value = "unexpected", value_parser = flows::query::Kind::NAMES)]
        kind: String,
        /// Only records of this rule (allowed records: `rule`; unexpected
        /// ones: one of `port_rules`); `*` and `?` glob.
        #[arg(long)]
        rule: Option<String>,
        /// Aggregate the selected records into a table instead (every
        /// group; no following, -n does not apply; --json prints it as
        /// JSON). Keys: remote,
        /// local_port (port), remote_port, protocol, rule, direction,
        /// peer_class, reason, event_type.
        #[arg(long, value_name = "by=KEY,...", num_args = 0..=1, default_missing_value = "by=remote,local_port")]
        summary: Option<String>,
    },
    /// Suggest the smallest config change that allows the unexpected flows
    /// of audit logs (monitor -> suggest -> review -> enforce): peer
    /// classes, features, site rules, as a diff of the config. Never
    /// applies anything.
    Suggest {
        /// Audit log to read (json or ecs format); repeat for more files.
        #[arg(long = "from", value_name = "FILE", required = true)]
        from: Vec<PathBuf>,
        /// The current site config: the suggestion is a diff of it.
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Write the suggested config here (refuses an existing file).
        #[arg(short, long, value_name = "FILE", requires = "config")]
        output: Option<PathBuf>,
    },
    /// Render the compiled policy in another firewall's language.
    Render {
        #[command(subcommand)]
        target: RenderTarget,
    },
    /// Keep a policy applied with --confirm-within.
    Confirm {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Remove pcguard's programs and pins: the explicit off switch (a
    /// stopped daemon leaves the last policy enforced). Refuses while a
    /// daemon runs on the directory.
    Detach {
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Ask the running daemon to reload its config (SIGHUP) and wait for the
    /// outcome: exits non-zero with the daemon's error when the reload
    /// failed (the running policy is kept). `ExecReload=` of the systemd
    /// unit, so `systemctl reload pcguard` fails too.
    Reload {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Apply the new policy in confirm-or-revert mode: it is reverted
        /// unless `pcguard confirm` is run within this time (e.g. 2m).
        #[arg(long, value_parser = humantime::parse_duration)]
        confirm_within: Option<Duration>,
        /// How long to wait for the daemon's answer.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Send the request and return without waiting for the outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Write the man pages or the shell completions into DIR (packaging:
    /// `cargo xtask package`).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
        dir: PathBuf,
    },
}

/// What `pcguard generate` writes.
#[derive(Copy, Clone, ValueEnum)]
enum Generated {
    /// pcguard.1 and one page per subcommand (pcguard-run.1, ...).
    Man,
    /// pcguard.bash, _pcguard (zsh) and pcguard.fish.
    Completions,
}

#[derive(Subcommand)]
enum RenderTarget {
    /// An nftables ruleset (`nft -f`) equivalent to the policy.
    Nftables {
        #[command(flatten)]
        config: ConfigPath,
    },
}

/// The site config, as `-c FILE`/`--config FILE` or as the argument: both
/// spellings work for every command that reads one.
#[derive(clap::Args)]
struct ConfigPath {
    /// Site config file [default: /etc/pcguard/pcguard.toml].
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    flag: Option<PathBuf>,
    /// The site config file, as an argument (same as -c FILE).
    #[arg(value_name = "CONFIG", conflicts_with = "flag")]
    positional: Option<PathBuf>,
}

impl ConfigPath {
    fn path(self) -> PathBuf {
        self.flag.or(self.positional).unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }
}

const DEFAULT_CONFIG: &str = "/etc/pcguard/pcguard.toml";

fn main() -> ExitCode {
    pcguard::logging::init();
    match real_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            bpffs_dir,
            detach_on_exit,
            run_dir,
            xdp_skb,
            metrics_listen,
            audit_log,
            confirm_within,
            dns_min_ttl,
            trace_datapath,
        } => {
            let opts = RunOptions {
                config: config.path(),
                bpffs_dir,
                detach_on_exit,
                run_dir,
                xdp_skb,
                metrics_listen,
                audit_log,
                confirm_within,
                dns_min_ttl,
                trace_datapath,
            };
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(daemon::run(opts))
        }
        Command::Check { config, format } => {
            let (cfg, policy) = pcguard::policy::load(&config.path(), &mut pcguard::policy::StableIds::default())?;
            match format {
                Format::Table => print!("{}", pcguard::policy::check_report(&cfg, &policy)),
                Format::Json => {
                    let mut json = pcguard::policy::rules_json(&policy);
                    json["warnings"] = serde_json::to_value(pcguard::policy::warnings(&cfg, &policy))?;
                    println!("{}", serde_json::to_string_pretty(&json)?)
                }
            }
            Ok(())
        }
        Command::Init { papercut_dir, interface, output } => {
            let interface = interface
                .or_else(pcguard::init::default_route_interface)
                .context("no default route: name the interface with --interface")?;
            let text = pcguard::init::starter_config(&papercut_dir, &interface).map_err(anyhow::Error::msg)?;
            match output {
                None => print!("{text}"),
                Some(path) => {
                    let mut f =
                        std::fs::OpenOptions::new().write(true).create_new(true).open(&path).with_context(|| {
                            format!("{}: cannot create (an existing file is never replaced)", path.display())
                        })?;
                    std::io::Write::write_all(&mut f, text.as_bytes())?;
                    eprintln!("wrote {}: check it with `pcguard check {}`", path.display(), path.display());
                }
            }
            Ok(())
        }
        Command::Catalog { format } => {
            let catalog = pcguard::catalog::Catalog::builtin();
            match format {
                Format::Table => print!("{}", catalog.render_table()),
                Format::Json => println!("{}", serde_json::to_string_pretty(&catalog.to_json())?),
            }
            Ok(())
        }
        Command::Status { run_dir, format } => {
            let (state, snap) = status::collect(&run_dir)?;
            match format {
                Format::Table => print!("{}", status::render(&state, snap.as_ref())),
                Format::Json => println!("{}", serde_json::to_string_pretty(&status::to_json(&state, snap.as_ref()))?),
            }
            Ok(())
        }
        Command::Flows {
            log,
            run_dir,
            lines,
            no_follow,
            json,
            reason,
            direction,
            severity,
            peer_class,
            port,
            addr,
            since,
            until,
            kind,
            rule,
            summary,
        } => {
            let now = std::time::SystemTime::now();
            let time = |flag: &str, v: Option<String>| -> Result<Option<std::time::SystemTime>> {
                v.map(|v| flows::parse_time(&v, now).map_err(|e| anyhow::anyhow!("{flag}: {e}"))).transpose()
            };
            let (since, until) = (time("--since", since)?, time("--until", until)?);
            let keys =
                summary.map(|s| flows::query::Key::parse_list(&s).map_err(|e| anyhow::anyhow!("--summary: {e}")));
            let keys = keys.transpose()?;
            let kind = flows::query::Kind::parse(&kind).map_err(|e| anyhow::anyhow!("--type: {e}"))?;
            let logs = if log.is_empty() {
                vec![State::read(&run_dir)?.audit_log.context("the running daemon has no audit log")?]
            } else {
                log
            };
            let set = flows::query::skip_old(flows::query::log_set(&logs)?, since);
            let filter =
                flows::Filter { kind, rule, reason, direction, peer_class, port, addr, severity, since, until };
            match keys {
                Some(keys) => flows::query::print_summary(&set, &filter, keys, json, std::io::stdout().lock()),
                None => flows::follow(&set, &filter, lines, !no_follow, json, std::io::stdout().lock()),
            }
        }
        Command::Suggest { from, config, output } => suggest(&from, config.as_deref(), output.as_deref()),
        Command::Render { target: RenderTarget::Nftables { config } } => {
            let (cfg, policy) = pcguard::policy::load(&config.path(), &mut pcguard::policy::StableIds::default())?;
            print!("{}", pcguard::render::nftables_on(&policy, &cfg.interfaces));
            Ok(())
        }
        Command::Confirm { run_dir } => signal_daemon(&run_dir, sys::SIGUSR1, "confirm"),
        Command::Reload { run_dir, confirm_within, timeout, no_wait } => {
            reload(&run_dir, confirm_within, (!no_wait).then_some(timeout))
        }
        Command::Generate { what, dir } => generate(what, &dir),
        Command::Detach { bpffs_dir, run_dir } => {
            if pcguard::attach::detach_dir(&bpffs_dir)? {
                State::remove(&run_dir);
                println!("pcguard detached: programs and pins under {} removed", bpffs_dir.display());
            } else {
                println!("nothing to detach: {} does not exist", bpffs_dir.display());
            }
            Ok(())
        }
    }
}

/// `pcguard suggest`: prints the report and diff; `output` gets the
/// suggested config.
fn suggest(from: &[PathBuf], config: Option<&Path>, output: Option<&Path>) -> Result<()> {
    use pcguard::suggest::{self, Current, Observed};
    let obs = Observed::read(from)?;
    let loaded = match config {
        Some(path) => {
            let (text, cfg, policy) = pcguard::policy::load_text(path, &mut pcguard::policy::StableIds::default())?;
            Some((path, text, cfg, policy))
        }
        None => None,
    };
    let current = loaded.as_ref().map(|(path, text, cfg, policy)| Current { path, text: text.as_str(), cfg, policy });
    let report = suggest::suggest(&obs, current.as_ref());
    print!("{}", suggest::render(&report, &obs, current.as_ref()));
    if let Some(path) = output {
        let text = report.suggested.as_deref().context("no suggested config to write")?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| format!("{}: cannot create (an existing file is never replaced)", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        eprintln!("wrote {}: review it, then `pcguard check {}`", path.display(), path.display());
    }
    Ok(())
}

fn reload(run_dir: &Path, confirm_within: Option<Duration>, wait: Option<Duration>) -> Result<()> {
    let confirm_within_ms = match confirm_within {
        Some(d) if d.is_zero() => bail!("--confirm-within must be longer than 0s"),
        Some(d) => Some(u64::try_from(d.as_millis()).context("--confirm-within is too long")?),
        None => None,
    };
    let req = pcguard::reload::Request { confirm_within_ms };
    match pcguard::reload::request(run_dir, &req, wait)? {
        None => println!("reload sent to pcguard"),
        Some(outcome) => {
            println!("reload applied: policy generation {}", outcome.generation);
            if let Some(until) = outcome.pending_confirm_until {
                let left = until.saturating_sub(pcguard::state::unix_now());
                println!("run `pcguard confirm` within {left} s, or the previous policy is restored");
            }
        }
    }
    Ok(())
}

/// The man pages or completions of this CLI definition, into `dir`
/// (created if missing).
fn generate(what: Generated, dir: &Path) -> Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match what {
        Generated::Man => clap_mangen::generate_to(Cli::command(), dir),
        Generated::Completions => {
            // clap_complete completes hidden subcommands too: leave them out.
            let full = Cli::command();
            let mut cmd = full
                .get_subcommands()
                .filter(|s| !s.is_hide_set())
                .cloned()
                .fold(clap::Command::new("pcguard").version(env!("CARGO_PKG_VERSION")), |c, s| c.subcommand(s));
            [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish]
                .into_iter()
                .try_for_each(|shell| clap_complete::generate_to(shell, &mut cmd, "pcguard", dir).map(drop))
        }
    }
    .with_context(|| format!("writing into {}", dir.display()))
}

fn signal_daemon(run_dir: &Path, sig: sys::Signal, what: &str) -> Result<()> {
    let state = State::read(run_dir)?;
    if !state.is_live() {
        bail!("pcguard (pid {}) is not running", state.pid);
    }
    if what == "confirm" && state.pending_confirm_until.is_none() {
        println!("nothing to confirm: the running policy is already confirmed");
        return Ok(());
    }
    // A pid read from our own state file.
    if let Err(e) = sys::kill(state.pid, sig) {
        bail!("signalling pid {}: {e}", state.pid);
    }
    println!("{what} sent to pcguard (pid {})", state.pid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_writes_man_pages_and_completions_without_the_hidden_subcommand() {
        let dir = std::env::temp_dir().join(format!("pcguard-generate-{}", std::process::id()));
        generate(Generated::Man, &dir.join("man")).unwrap();
        generate(Generated::Completions, &dir.join("completions")).unwrap();
        for page in ["pcguard.1", "pcguard-run.1", "pcguard-check.1", "pcguard-render-nftables.1"] {
            let text = std::fs::read_to_string(dir.join("man").join(page)).unwrap();
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is a man page");
        }
        assert!(!dir.join("man/pcguard-generate.1").exists());
        for file in ["pcguard.bash", "_pcguard", "pcguard.fish"] {
            let text = std::fs::read_to_string(dir.join("completions").join(file)).unwrap();
            assert!(text.contains("confirm") && text.contains("run-dir"), "{file} completes the subcommands");
            assert!(!text.contains("generate"), "{file} leaves out the hidden subcommand");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
