//! `pcguard run`: load, attach, serve; SIGHUP reloads (answering `pcguard
//! reload`'s requests, `crate::reload`), SIGUSR1 confirms a policy applied
//! with a confirm window, SIGUSR2 reopens the audit log (logrotate), SIGTERM
//! stops. Under systemd it reports readiness, reloads, its status and
//! watchdog pings (`crate::notify`).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, RingBuf};
use log::{debug, error, info, warn};
use pcguard_common::{DnsMessage, FlowEvent, FlowRecord, names};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    audit::{self, AuditSink},
    config::SiteConfig,
    counters::Labels,
    datapath::{Datapath, MapSizes, Object},
    dns::{Accepted, FqdnClasses, Guard, Handled, LearnReport, Learner, Limits, QueryTable, Refusal, Seen},
    flowrec::FlowRecordOut,
    flows::{AuditRecord, DnsRefusal, KeyedLimit},
    gate::AuditGate,
    logging::ALERT_TARGET,
    metrics::{Metrics, PolicyInfo},
    notify,
    policy::{self, CompiledPolicy, StableIds},
    reload::{self, Outcome},
    state::{LastReload, State, unix_now},
};

/// Options of `pcguard run` that are not in the config file.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Where maps and links are pinned (`--bpffs-dir`).
    pub bpffs_dir: PathBuf,
    /// Detach (unpin everything) when the daemon exits. Off by default: a
    /// stopped or crashed daemon leaves the last policy enforced.
    pub detach_on_exit: bool,
    pub run_dir: PathBuf,
    /// Use generic (skb) XDP even where native XDP is available.
    pub xdp_skb: bool,
    /// Overrides the config's metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Overrides the config's audit log path.
    pub audit_log: Option<PathBuf>,
    /// Revert a newly applied policy (at start: detach and exit) unless
    /// `pcguard confirm` is run within this time.
    pub confirm_within: Option<Duration>,
    /// Shortest life of a DNS-learned address (default `dns::MIN_TTL`);
    /// for tests that watch addresses expire.
    pub dns_min_ttl: Option<Duration>,
    /// Load the trace object (`--trace-datapath`): a debug record of every
    /// packet's decision in the log.
    pub trace_datapath: bool,
}

/// How often learned addresses are expired, failed map writes retried and
/// this server's own addresses read again.
const EXPIRY_TICK: Duration = Duration::from_secs(5);
/// Distinct (resolver, name, refusal) keys of `dns_poisoning` records
/// rate-limited at once.
const DNS_AUDIT_KEYS: usize = 4096;

/// The key `dns_poisoning` records are rate-limited by.
type DnsAuditKey = (IpAddr, String, &'static str);

/// Settings the daemon takes from the site config.
struct DaemonSettings {
    interfaces: Vec<String>,
    metrics_listen: SocketAddr,
    audit_log: PathBuf,
    /// Format and syslog socket of the audit records.
    audit: audit::Output,
    /// Group that may read the audit log and state (`[audit] group`).
    group: Option<u32>,
    report_interval: Duration,
    max_records_per_second: u32,
    /// `[audit] max_flow_records_per_second`.
    max_flow_records_per_second: u32,
    info: PolicyInfo,
}

fn daemon_settings(cfg: &SiteConfig, policy: &CompiledPolicy, opts: &RunOptions) -> Result<DaemonSettings> {
    let group = match &cfg.audit.group {
        Some(name) => Some(crate::auditlog::group_id(name).with_context(|| format!("{}: audit.group", cfg.origin))?),
        None => None,
    };
    let audit_log = opts.audit_log.clone().unwrap_or_else(|| cfg.audit_path().to_path_buf());
    Ok(DaemonSettings {
        interfaces: cfg.interfaces.clone(),
        metrics_listen: opts.metrics_listen.unwrap_or_else(|| cfg.metrics_listen()),
        audit: audit::Output { path: audit_log.clone(), format: cfg.audit.format, syslog: cfg.audit.syslog.clone() },
        audit_log,
        group,
        report_interval: policy.settings.report_interval,
        max_records_per_second: cfg.audit.max_records_per_second,
        max_flow_records_per_second: cfg.audit.max_flow_records_per_second,
        info: PolicyInfo {
            labels: Labels::from_policy(policy),
            mode: policy.settings.ingress_mode.as_str().into(),
            egress_mode: policy.settings.egress_mode.as_str().into(),
            role: cfg.role.as_str().into(),
            rules: policy.rule_count(),
            interfaces: Vec::new(),
        },
    })
}

/// How the daemon's main loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// SIGTERM/SIGINT: exit, leaving the programs attached (unless
    /// `--detach-on-exit`).
    Stop,
    /// An unconfirmed first policy: remove everything.
    Detach,
}

/// A policy applied with a confirm window, and what to go back to.
struct Pending {
    deadline: Instant,
    /// `None` when the pending policy is the first one (revert = stop).
    previous: Option<(SiteConfig, CompiledPolicy)>,
}

struct Daemon {
    opts: RunOptions,
    dp: Datapath,
    cfg: SiteConfig,
    /// Group of the audit log and state file.
    group: Option<u32>,
    policy: Arc<RwLock<CompiledPolicy>>,
    metrics: Arc<Metrics>,
    audit: Arc<Mutex<AuditSink>>,
    /// Dedup, ceiling and summary of unexpected-flow records.
    gate: Arc<Mutex<AuditGate>>,
    /// Kernel report counters at the last summary (rate limited, ring
    /// dropped), for the next one's differences.
    kernel_held: (u64, u64),
    reloads: u64,
    loaded_at: u64,
    /// 1 at start, +1 for every policy installed since (reload, revert).
    generation: u64,
    last_reload: Option<LastReload>,
    pending: Option<Pending>,
    /// FQDN patterns of the running policy's classes.
    fqdns: FqdnClasses,
    learner: Learner,
    /// This server's addresses, and the checks no learned address may fail.
    guard: Guard,
    /// One `dns_poisoning` record per (resolver, name, refusal) per report
    /// interval.
    dns_audit: KeyedLimit<DnsAuditKey>,
    /// Addresses refused by the caps since the last expiry tick (logged
    /// once per tick).
    capped: u64,
    /// Where metrics are served (fixed at start).
    metrics_addr: SocketAddr,
    /// Rule ids and port labels stay the same across reloads.
    ids: StableIds,
}

pub async fn run(opts: RunOptions) -> Result<()> {
    if let Ok(other) = State::read(&opts.run_dir)
        && other.is_live()
        && other.pid != std::process::id()
    {
        bail!("pcguard is already running (pid {}, state in {})", other.pid, opts.run_dir.display());
    }
    let object = if opts.trace_datapath { Object::Trace } else { Object::Default };
    // Refused before anything is touched when this build has no trace object.
    object.bytes()?;
    let mut ids = StableIds::default();
    let (cfg, compiled) = policy::load(&opts.config, &mut ids)?;
    log_warnings(&cfg, &compiled);
    let settings = daemon_settings(&cfg, &compiled, &opts)?;
    if settings.interfaces.is_empty() {
        bail!("{}: no interfaces configured", opts.config.display());
    }
    let mut audit = AuditSink::open(&settings.audit, settings.group)?;
    // Bind before touching the kernel, so a busy port fails cleanly.
    let addr = settings.metrics_listen;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics listener {addr}"))?;

    let mut dp = Datapath::load_object(&opts.bpffs_dir, &MapSizes::of(&cfg), object)?;
    if object == Object::Trace {
        spawn_trace(&mut dp)?;
    }
    let compiled = match dp.adopted().then(|| State::read(&opts.run_dir)) {
        // Keep the numbering the running policy's conntrack entries and
        // counters carry: compile again with it.
        Some(Ok(previous)) => {
            ids = StableIds::from_names(&previous.labels.rules, &previous.labels.port_labels);
            policy::compile_with(&cfg, &mut ids).map_err(|e| anyhow::anyhow!("{}: {e}", opts.config.display()))?
        }
        Some(Err(e)) => {
            warn!("no state of the earlier daemon ({e:#}): rule ids are numbered afresh");
            compiled
        }
        None => compiled,
    };
    // The labels the metrics and the state file give rule ids are those of
    // the numbering just chosen.
    let settings = daemon_settings(&cfg, &compiled, &opts)?;
    // The policy is complete in the maps before the programs see a packet,
    // and so are the connections already open that it allows (unless the
    // conntrack of an earlier daemon was adopted: it has them).
    dp.apply(&compiled, &[]).context("writing the policy into the maps")?;
    if !dp.adopted() {
        seed_existing_connections(&mut dp, &compiled);
    }
    dp.attach(&settings.interfaces, cfg.ingress_hook, opts.xdp_skb)?;
    let events = dp.take_ring(names::EVENTS)?;
    let dns_answers = dp.take_ring(names::DNS_MESSAGES)?;
    let flow_records = dp.take_ring(names::FLOW_RECORDS)?;

    let mut info = settings.info.clone();
    info.interfaces = dp.interfaces().to_vec();
    let metrics = Arc::new(Metrics::new(Some(dp.maps_dir()), info)?);
    audit.count_syslog_drops(metrics.daemon.audit_syslog_dropped.clone());
    let loaded_at = unix_now();
    metrics.daemon.policy_loaded_time.set(loaded_at as f64);
    info!("metrics on http://{addr}/metrics");
    let m = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve_listener(listener, m).await {
            error!("metrics server stopped: {e:#}");
        }
    });

    let pending = opts.confirm_within.map(|d| Pending { deadline: Instant::now() + d, previous: None });
    let fqdns = FqdnClasses::of(&compiled);
    let mut guard = Guard::default();
    if let Err(e) = guard.refresh() {
        warn!(
            "reading this server's addresses: {e}; only the policy's classes and special addresses guard DNS learning"
        );
    }
    let limits = Limits { min_ttl: opts.dns_min_ttl.unwrap_or(crate::dns::MIN_TTL), ..Limits::default() };
    let mut daemon = Daemon {
        dp,
        cfg,
        group: settings.group,
        policy: Arc::new(RwLock::new(compiled)),
        metrics,
        audit: Arc::new(Mutex::new(audit)),
        gate: Arc::new(Mutex::new({
            let mut gate = AuditGate::new(settings.report_interval, settings.max_records_per_second, Instant::now());
            gate.set_flow_ceiling(settings.max_flow_records_per_second);
            gate
        })),
        kernel_held: (0, 0),
        reloads: 0,
        loaded_at,
        generation: 1,
        last_reload: None,
        pending,
        fqdns,
        learner: Learner::new(limits),
        guard,
        dns_audit: KeyedLimit::new(settings.report_interval, DNS_AUDIT_KEYS),
        capped: 0,
        metrics_addr: addr,
        ids,
        opts,
    };
    daemon.spawn_events(events)?;
    daemon.spawn_flow_records(flow_records)?;
    let dns_rx = spawn_dns_messages(dns_answers, daemon.metrics.clone())?;
    // Handlers before the state file exists: `pcguard reload` and `confirm`
    // signal the pid they read there (a signal without its handler would
    // kill the daemon).
    let signals = Signals::new()?;
    // Requests left by a client of an earlier daemon are nobody's now.
    let stale = reload::take_requests(&daemon.opts.run_dir);
    if !stale.ids.is_empty() || !stale.refused.is_empty() {
        warn!(
            "removed {} reload request(s) left in {} from before this start",
            stale.ids.len() + stale.refused.len(),
            daemon.opts.run_dir.display()
        );
    }
    daemon.write_state()?;
    info!(
        "pcguard running: {} rules, mode {}, egress {}, audit log {}",
        settings.info.rules,
        settings.info.mode,
        settings.info.egress_mode,
        settings.audit_log.display()
    );
    notify::ready(&daemon.status_line());
    let result = daemon.signal_loop(signals, dns_rx).await;
    notify::stopping(match &result {
        Ok(Exit::Detach) => "stopping: the first policy was not confirmed, detaching",
        Ok(Exit::Stop) => "stopping",
        Err(_) => "stopping after an error",
    });
    let detach = daemon.opts.detach_on_exit || matches!(result, Ok(Exit::Detach));
    let run_dir = daemon.opts.run_dir.clone();
    let bpffs_dir = daemon.dp.bpffs_dir().to_path_buf();
    daemon.dp.shutdown(detach)?;
    if detach {
        State::remove(&run_dir);
        info!("detached and unpinned; bye");
    } else {
        info!(
            "exiting; the last policy stays enforced (pinned in {}): `pcguard detach` removes it",
            bpffs_dir.display()
        );
    }
    result.map(|_| ())
}

/// Seeds conntrack with the connections open in this network namespace
/// that `policy` allows in the direction they were opened in, so that the
/// first packet the programs see of each (whichever end sends it) finds
/// its entry (`crate::seed`). Must run after the policy is applied and
/// before the programs are attached. Connections the policy forbids are
/// not seeded: a firewall that starts cuts what it forbids; each is
/// logged so the operator sees what will be cut.
///
/// Best effort: a socket table that cannot be read, or a failed map
/// write, is logged and the daemon starts anyway (the connections then
/// behave as if pcguard had no seeding). A daemon that adopts conntrack
/// from a previous run has its entries already and skips this step.
fn seed_existing_connections(dp: &mut Datapath, policy: &CompiledPolicy) {
    let conns = crate::sockdiag::connections();
    let plan = crate::seed::plan(policy, &conns);
    let fate = cut_fate(&policy.settings);
    for c in &plan.not_allowed {
        warn!("existing connection {c} is not allowed by the policy: {fate}");
    }
    match dp.seed_conntrack(&plan.seeds) {
        Ok(stats) => info!(
            "existing connections: {} seeded into conntrack, {} already tracked, {} not allowed",
            stats.inserted,
            stats.existing,
            plan.not_allowed.len()
        ),
        Err(e) => error!(
            "seeding conntrack with {} existing connections failed ({e:#}); their packets are judged as untracked",
            plan.seeds.len()
        ),
    }
}

/// What happens to an existing connection the policy does not allow.
fn cut_fate(s: &policy::PolicySettings) -> &'static str {
    use pcguard_common::Mode::Monitor;
    match (s.ingress_mode == Monitor, s.egress_mode == Monitor) {
        (false, false) => "it will be cut (its packets are dropped)",
        (true, true) => "monitor mode: it keeps working, and its packets are reported",
        _ => "its packets are dropped in the enforced direction (it may be cut)",
    }
}

/// Writes an allowed-flow record if the gate's ceiling lets it through.
fn write_flow_record(gate: &Mutex<AuditGate>, audit: &Mutex<AuditSink>, metrics: &Metrics, rec: &FlowRecordOut) {
    if !gate.lock().unwrap().offer_flow_record(Instant::now()) {
        metrics.daemon.audit_held_back.inc();
        return;
    }
    if let Err(e) = audit.lock().unwrap().write_flow_record(rec) {
        metrics.daemon.audit_write_errors.inc();
        error!("{e:#}");
    }
}

/// Runs `handle` on every record of `ring` as it arrives (tokio task).
fn consume_ring(ring: RingBuf<MapData>, mut handle: impl FnMut(&[u8]) + Send + 'static) -> Result<()> {
    // SAFETY: the ring buffer owns its fd, and the AsyncFd owns the ring
    // buffer, so the fd stays open as long as it is registered.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
    tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    error!("ring buffer: {e}");
                    return;
                }
            };
            // Clear readiness before draining: a record written after the
            // drain then marks the fd ready again. (Clearing after the
            // drain can lose that wakeup, and with the kernel's adaptive
            // notifications no further wakeup would come.)
            guard.clear_ready();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                handle(&item);
            }
        }
    });
    Ok(())
}

/// Logs the trace object's decision records as they arrive (tokio task).
#[cfg(feature = "trace")]
fn spawn_trace(dp: &mut Datapath) -> Result<()> {
    use crate::datapath::trace::TARGET;
    if !log::log_enabled!(target: TARGET, log::Level::Debug) {
        warn!("--trace-datapath: decision records are logged at debug level (RUST_LOG=info,{TARGET}=debug)");
    }
    let logger = dp.trace_logger(log::logger())?;
    // SAFETY: the logger owns its ring buffer's fd, and the AsyncFd owns
    // the logger, so the fd stays open as long as it is registered.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE)? };
    tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    error!("trace records: {e}");
                    return;
                }
            };
            // As in `consume_ring`: clear readiness before draining.
            guard.clear_ready();
            guard.get_inner_mut().flush();
        }
    });
    info!("--trace-datapath: the trace object is loaded; every packet's decision is logged ({TARGET}, debug)");
    Ok(())
}

/// Without the trace object `Object::Trace` is refused before loading.
#[cfg(not(feature = "trace"))]
fn spawn_trace(_dp: &mut Datapath) -> Result<()> {
    Object::Trace.bytes().map(drop)
}

/// Binds the DNS answers the kernel copies to the queries it copied
/// before them (in ring-buffer order, so in this one task) and hands the
/// accepted ones to the main loop, which owns the maps. Refused answers
/// are only counted.
fn spawn_dns_messages(ring: RingBuf<MapData>, metrics: Arc<Metrics>) -> Result<mpsc::Receiver<Accepted>> {
    let (tx, rx) = mpsc::channel(1024);
    let mut queries = QueryTable::default();
    consume_ring(ring, move |bytes| {
        let Some(msg) = crate::datapath::read_record::<DnsMessage>(bytes) else { return };
        let Some(seen) = Seen::of(&msg) else { return };
        match queries.handle(&seen) {
            Handled::Query | Handled::IgnoredQuery => {}
            Handled::Refused(r) => metrics.daemon.dns_answer_refused(r.as_str()),
            Handled::Accepted(a) => {
                if tx.try_send(a).is_ok() {
                    metrics.daemon.dns_answers_accepted.inc();
                } else {
                    metrics.daemon.dns_answer_refused("overload");
                    warn!("DNS answers arrive faster than they are applied; one was skipped");
                }
            }
        }
    })?;
    Ok(rx)
}

impl Daemon {
    fn spawn_events(&self, ring: RingBuf<MapData>) -> Result<()> {
        let policy = self.policy.clone();
        let metrics = self.metrics.clone();
        let audit = self.audit.clone();
        let gate = self.gate.clone();
        consume_ring(ring, move |bytes| {
            let Some(ev) = crate::datapath::read_record::<FlowEvent>(bytes) else { return };
            let rec = {
                let p = policy.read().unwrap();
                AuditRecord::from_event(&ev, &p, crate::flows::ktime_to_system(ev.ts_ns))
            };
            metrics.daemon.flow(&rec.reason, &rec.direction);
            let Some(rec) = gate.lock().unwrap().offer(rec, Instant::now()) else {
                metrics.daemon.audit_held_back.inc();
                return;
            };
            if rec.severity == "alert" {
                warn!(target: ALERT_TARGET, "ALERT {}", rec.human());
            }
            if let Err(e) = audit.lock().unwrap().write(&rec) {
                metrics.daemon.audit_write_errors.inc();
                error!("{e:#}");
            }
        })
    }

    /// `flow_start` / `flow_end` records from `FLOW_RECORDS`, through the
    /// gate's ceiling of allowed-flow records.
    fn spawn_flow_records(&self, ring: RingBuf<MapData>) -> Result<()> {
        let policy = self.policy.clone();
        let audit = self.audit.clone();
        let gate = self.gate.clone();
        let metrics = self.metrics.clone();
        consume_ring(ring, move |bytes| {
            let Some(r) = crate::datapath::read_record::<FlowRecord>(bytes) else { return };
            let rec = FlowRecordOut::from_kernel(&r, &policy.read().unwrap());
            write_flow_record(&gate, &audit, &metrics, &rec);
        })
    }

    /// The expiry walk's half of allowed-flow records: audited flows idle
    /// past their timeout are removed and get a `flow_end` record (reason
    /// `idle`). Walks the conntrack tables only when some rule is audited.
    fn expire_flows(&mut self) {
        if self.cfg.audit.allowed == crate::config::AuditAllowed::None {
            return;
        }
        match self.dp.expire_audited() {
            Ok(idle) => {
                let policy = self.policy.read().unwrap();
                for (k, e) in &idle {
                    let rec = FlowRecordOut::idle(k, e, &policy);
                    write_flow_record(&self.gate, &self.audit, &self.metrics, &rec);
                }
            }
            Err(e) => warn!("walking conntrack for idle audited flows: {e:#}"),
        }
    }

    async fn signal_loop(&mut self, signals: Signals, mut dns_rx: mpsc::Receiver<Accepted>) -> Result<Exit> {
        let Signals { mut hup, mut term, mut int, mut usr1, mut usr2 } = signals;
        let mut expiry = tokio::time::interval(EXPIRY_TICK);
        // `WatchdogSec=` in the unit: ping at half the interval, from this
        // loop, so a loop that hangs stops the pings.
        let mut watchdog = notify::watchdog_interval().map(|every| {
            info!("systemd watchdog: pinging every {every:?}");
            tokio::time::interval(every)
        });
        loop {
            let deadline = self.pending.as_ref().map(|p| p.deadline);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let ping = async {
                match watchdog.as_mut() {
                    Some(w) => w.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup.recv() => self.reload(),
                _ = usr1.recv() => self.confirm(),
                _ = usr2.recv() => self.reopen_audit(),
                _ = ping => notify::watchdog(),
                Some(answer) = dns_rx.recv() => self.learn(&answer),
                _ = expiry.tick() => {
                    self.expire_learned();
                    self.expire_flows();
                    self.write_summary();
                }
                _ = term.recv() => return Ok(Exit::Stop),
                _ = int.recv() => return Ok(Exit::Stop),
                _ = sleep => {
                    if let Some(exit) = self.revert()? {
                        return Ok(exit);
                    }
                }
            }
        }
    }

    /// SIGHUP: re-read the config; a config that fails to load, compile or
    /// apply leaves the running policy in place. Answers the `pcguard
    /// reload` requests waiting in the run directory with the outcome.
    fn reload(&mut self) {
        // Taken before the config is read: a request made after a config
        // change is answered by a reload that saw the change.
        let batch = reload::take_requests(&self.opts.run_dir);
        info!(
            "SIGHUP: reloading {}{}",
            self.opts.config.display(),
            match batch.confirm_within {
                Some(w) => format!(" (confirm within {w:?}, asked by `pcguard reload`)"),
                None => String::new(),
            }
        );
        notify::reloading(&format!("reloading {}", self.opts.config.display()));
        if let Err(e) = self.audit.lock().unwrap().reopen() {
            error!("reopening audit log: {e:#}");
        }
        let result = match batch.refused.first() {
            Some((_, why)) => Err(anyhow::anyhow!("{why}; nothing reloaded")),
            None => self.try_reload(batch.confirm_within),
        };
        let error = match &result {
            Ok(()) => {
                self.metrics.daemon.reload(true);
                info!("reload applied (policy generation {})", self.generation);
                None
            }
            Err(e) => {
                self.metrics.daemon.reload(false);
                error!("reload failed, keeping the running policy: {e:#}");
                Some(format!("reload failed: {e:#}; keeping the running policy (generation {})", self.generation))
            }
        };
        self.last_reload = Some(LastReload { at: unix_now(), ok: error.is_none(), error: error.clone() });
        if let Err(e) = self.write_state() {
            error!("{e:#}");
        }
        let outcome = Outcome {
            ok: error.is_none(),
            error,
            generation: self.generation,
            pending_confirm_until: self.pending_until(),
        };
        let refused = batch.refused.iter().map(|(id, why)| (id, Some(why.clone())));
        for (id, why) in batch.ids.iter().map(|id| (id, None)).chain(refused) {
            let outcome = match why {
                Some(why) => Outcome { ok: false, error: Some(why), ..outcome.clone() },
                None => outcome.clone(),
            };
            if let Err(e) = reload::write_result(&self.opts.run_dir, id, &outcome) {
                error!("answering reload request {id}: {e:#}");
            }
        }
        notify::ready(&self.status_line());
    }

    /// SIGUSR2 (logrotate's postrotate): reopen the audit log at its path;
    /// nothing else (the policy is not reloaded).
    fn reopen_audit(&mut self) {
        let mut audit = self.audit.lock().unwrap();
        match audit.reopen() {
            Ok(()) => info!("SIGUSR2: audit log reopened at {}", audit.path().display()),
            Err(e) => {
                self.metrics.daemon.audit_write_errors.inc();
                error!("SIGUSR2: reopening the audit log: {e:#}; still writing to the file open before");
            }
        }
    }

    /// The `STATUS=` line: the policy generation, a pending confirmation,
    /// the last reload's outcome.
    fn status_line(&self) -> String {
        let policy = self.policy.read().unwrap();
        let mut line = format!(
            "policy generation {}: {} rules, ingress {}, egress {}",
            self.generation,
            policy.rule_count(),
            policy.settings.ingress_mode.as_str(),
            policy.settings.egress_mode.as_str()
        );
        if let Some(p) = &self.pending {
            let left = p.deadline.saturating_duration_since(Instant::now()).as_secs();
            line.push_str(&format!("; waiting for `pcguard confirm` (reverted in {left} s)"));
        }
        match &self.last_reload {
            Some(LastReload { error: Some(e), .. }) => line.push_str(&format!("; {e}")),
            Some(LastReload { ok: true, .. }) => line.push_str("; last reload applied"),
            _ => {}
        }
        line
    }

    fn pending_until(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| unix_now() + p.deadline.saturating_duration_since(Instant::now()).as_secs())
    }

    /// Loads and applies the config; `confirm_within` (a `pcguard reload
    /// --confirm-within` request) or `--confirm-within` of `run` makes the
    /// new policy wait for `pcguard confirm`.
    fn try_reload(&mut self, confirm_within: Option<Duration>) -> Result<()> {
        let (cfg, compiled) = policy::load(&self.opts.config, &mut self.ids)?;
        log_warnings(&cfg, &compiled);
        if cfg.interfaces != self.cfg.interfaces {
            bail!(
                "interfaces changed ({:?} -> {:?}); restart pcguard to attach to a different set",
                self.cfg.interfaces,
                cfg.interfaces
            );
        }
        if cfg.ingress_hook != self.cfg.ingress_hook {
            warn!(
                "ingress_hook changed ({} -> {}); the interfaces keep their hooks until restart",
                self.cfg.ingress_hook.as_str(),
                cfg.ingress_hook.as_str()
            );
        }
        if self.opts.metrics_listen.is_none() && cfg.metrics_listen() != self.metrics_addr {
            warn!(
                "metrics.listen changed to {}; still serving on {} until restart",
                cfg.metrics_listen(),
                self.metrics_addr
            );
        }
        let previous = (self.cfg.clone(), self.policy.read().unwrap().clone());
        self.install(cfg, compiled)?;
        self.reloads += 1;
        if let Some(window) = confirm_within.or(self.opts.confirm_within) {
            // Keep the oldest confirmed policy if one is already pending.
            let previous = match self.pending.take() {
                Some(p) => p.previous,
                None => Some(previous),
            };
            self.pending = Some(Pending { deadline: Instant::now() + window, previous });
            warn!("new policy applied; run `pcguard confirm` within {window:?} or it is reverted");
        }
        self.write_state()
    }

    /// Applies a compiled policy and makes it the running one.
    ///
    /// A transaction: everything that can fail without touching the kernel
    /// (opening a new audit log) is done first; then the maps — the learned
    /// addresses re-derived for the new policy included — are written into
    /// the inactive generation and switched to in one write. An error
    /// before the switch leaves the running policy and its learned
    /// addresses whole.
    fn install(&mut self, cfg: SiteConfig, compiled: CompiledPolicy) -> Result<()> {
        let settings = daemon_settings(&cfg, &compiled, &self.opts)?;
        let new_audit = {
            let audit = self.audit.lock().unwrap();
            match audit.path() == settings.audit_log {
                true => None,
                false => {
                    let mut new = AuditSink::open(&settings.audit, settings.group)?;
                    new.count_syslog_drops(self.metrics.daemon.audit_syslog_dropped.clone());
                    Some(new)
                }
            }
        };
        let syslog = AuditSink::syslog(&settings.audit)?;
        let fqdns = FqdnClasses::of(&compiled);
        let planned = self.learner.planned(&fqdns, &self.guard, &compiled);
        let stats = self.dp.apply(&compiled, &planned)?;
        info!(
            "policy written: {} port entries, {} slots, {} prefixes changed, {} learned addresses ({} failed, retried)",
            stats.ports, stats.slots, stats.peers, stats.learned, stats.learned_failed
        );
        self.fqdns = fqdns;
        for addr in self.learner.rebase(&self.fqdns, &self.guard, &compiled) {
            info!("DNS: {addr} forgotten: the new policy does not let DNS answers open it");
        }
        self.sync_learned();
        {
            let mut audit = self.audit.lock().unwrap();
            if let Some(new) = new_audit {
                *audit = new;
            }
            audit.configure(settings.audit.format, syslog);
        }
        self.group = settings.group;
        self.gate.lock().unwrap().configure(settings.report_interval, settings.max_records_per_second);
        self.gate.lock().unwrap().set_flow_ceiling(settings.max_flow_records_per_second);
        self.dns_audit.set_interval(settings.report_interval);
        *self.policy.write().unwrap() = compiled;
        let mut info = settings.info;
        info.interfaces = self.dp.interfaces().to_vec();
        self.metrics.set_policy(info);
        self.loaded_at = unix_now();
        self.metrics.daemon.policy_loaded_time.set(self.loaded_at as f64);
        self.cfg = cfg;
        self.generation += 1;
        Ok(())
    }

    /// SIGUSR1 (`pcguard confirm`): keep the pending policy.
    fn confirm(&mut self) {
        if self.pending.take().is_some() {
            info!("policy confirmed (generation {})", self.generation);
        } else {
            info!("confirm: nothing pending");
        }
        if let Err(e) = self.write_state() {
            error!("{e:#}");
        }
        notify::status(&self.status_line());
    }

    /// The confirm window expired. Returns false when the daemon must stop
    /// (the unconfirmed policy was the first one: detach everything).
    fn revert(&mut self) -> Result<Option<Exit>> {
        let Some(p) = self.pending.take() else { return Ok(None) };
        match p.previous {
            None if self.dp.adopted() => {
                // The policy before this start is the earlier daemon's: still
                // whole in the generation this start switched away from.
                warn!(
                    "policy not confirmed in time: switching back to the policy enforced before this start, and exiting"
                );
                self.dp.switch_back()?;
                Ok(Some(Exit::Stop))
            }
            None => {
                warn!("policy not confirmed in time: detaching and exiting");
                Ok(Some(Exit::Detach))
            }
            Some((cfg, compiled)) => {
                warn!("policy not confirmed in time: reverting to the previous policy");
                self.install(cfg, compiled)?;
                self.write_state()?;
                info!("reverted (policy generation {})", self.generation);
                notify::status(&self.status_line());
                Ok(None)
            }
        }
    }

    /// Addresses of an accepted DNS answer whose names match the policy's
    /// FQDNs become peers of those classes until their TTL runs out,
    /// unless the guard forbids them (audited) or a cap is reached.
    fn learn(&mut self, answer: &Accepted) {
        if self.fqdns.is_empty() {
            return;
        }
        let running = Arc::clone(&self.policy);
        let report = {
            let policy = running.read().unwrap();
            let report = self.learner.learn(answer, &self.fqdns, &self.guard, &policy, Instant::now());
            for n in &report.learned {
                let classes = crate::flows::class_names(&policy, n.bits).join(",");
                info!("DNS: {} is {} ({classes})", n.addr, n.names.join(" -> "));
            }
            report
        };
        self.report_refusals(answer, &report);
        self.sync_learned();
    }

    /// Counts every refused address; writes a rate-limited `dns_poisoning`
    /// alert for those the guard forbids.
    fn report_refusals(&mut self, answer: &Accepted, report: &LearnReport) {
        for r in &report.refused {
            self.metrics.daemon.dns_address_refused(r.reason.as_str());
            let Refusal::Forbidden(f) = r.reason else {
                debug!("DNS: {} for {} not learned: {}", r.addr, r.name, r.reason.as_str());
                self.capped += 1;
                continue;
            };
            let key = (answer.resolver, r.name.clone(), f.as_str());
            let Some(suppressed) = self.dns_audit.admit(&key, Instant::now()) else { continue };
            let refusal = DnsRefusal {
                resolver: answer.resolver,
                server_port: answer.server_port,
                name: r.name.clone(),
                addr: r.addr,
                refusal: f.as_str(),
                msg_len: answer.msg_len,
                suppressed,
            };
            let rec = {
                let policy = self.policy.read().unwrap();
                AuditRecord::from_dns_refusal(&refusal, &policy, crate::flows::ktime_to_system(answer.ts_ns))
            };
            self.metrics.daemon.flow(&rec.reason, &rec.direction);
            warn!(target: ALERT_TARGET, "ALERT {}", rec.human());
            if let Err(e) = self.audit.lock().unwrap().write(&rec) {
                self.metrics.daemon.audit_write_errors.inc();
                error!("{e:#}");
            }
        }
    }

    /// Every expiry tick: forget expired addresses, re-check the learned
    /// ones if this server's addresses changed, retry failed map writes.
    /// Once per report interval: the summary of the records the audit
    /// gate held back and of the reports the kernel did not send.
    fn write_summary(&mut self) {
        let kernel = (
            self.dp.stat(pcguard_common::STAT_EVENTS_RATE_LIMITED).unwrap_or(self.kernel_held.0),
            self.dp.stat(pcguard_common::STAT_EVENTS_DROPPED).unwrap_or(self.kernel_held.1),
        );
        let delta = (kernel.0.saturating_sub(self.kernel_held.0), kernel.1.saturating_sub(self.kernel_held.1));
        let Some(summary) = self.gate.lock().unwrap().summary(Instant::now(), std::time::SystemTime::now(), delta)
        else {
            return;
        };
        self.kernel_held = kernel;
        warn!(
            "audit: {} unexpected-flow records held back in the last {} s ({} repeats, {} over the ceiling); kernel held back {} and lost {} reports; summary written",
            summary.deduplicated + summary.over_ceiling,
            summary.period_seconds,
            summary.deduplicated,
            summary.over_ceiling,
            summary.kernel_rate_limited,
            summary.kernel_ring_dropped
        );
        if let Err(e) = self.audit.lock().unwrap().write_summary(&summary) {
            self.metrics.daemon.audit_write_errors.inc();
            error!("{e:#}");
        }
    }

    fn expire_learned(&mut self) {
        match self.guard.refresh() {
            Ok(true) => {
                let running = Arc::clone(&self.policy);
                let policy = running.read().unwrap();
                for addr in self.learner.rebase(&self.fqdns, &self.guard, &policy) {
                    warn!("DNS: {addr} forgotten: it is now an address of this server");
                }
            }
            Ok(false) => {}
            Err(e) => debug!("reading this server's addresses: {e}"),
        }
        self.learner.expire(Instant::now());
        self.sync_learned();
        if self.capped > 0 {
            warn!(
                "DNS: {} answered addresses not learned since the last tick: caps reached ({} per name, {} in all)",
                std::mem::take(&mut self.capped),
                crate::dns::MAX_PER_NAME,
                crate::dns::MAX_LEARNED
            );
        }
    }

    /// Writes what the learner wants into the active generation; the
    /// learner forgets an entry only once the map agrees.
    fn sync_learned(&mut self) {
        let writes = self.learner.pending_writes();
        for w in self.dp.write_learned(&writes) {
            self.learner.confirm(&w);
        }
        self.metrics.daemon.dns_learned.set(self.dp.learned_len() as i64);
    }

    fn write_state(&self) -> Result<()> {
        let policy = self.policy.read().unwrap();
        let s = &policy.settings;
        let state = State {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            config: self.opts.config.canonicalize().unwrap_or_else(|_| self.opts.config.clone()),
            bpffs_dir: Some(self.dp.bpffs_dir().to_path_buf()),
            maps_dir: Some(self.dp.maps_dir().to_path_buf()),
            abi: pcguard_common::ABI_VERSION,
            adopted: self.dp.adopted(),
            interfaces: self.dp.interfaces().to_vec(),
            mode: s.ingress_mode.as_str().into(),
            egress_mode: s.egress_mode.as_str().into(),
            rules: policy.rule_count(),
            policy_loaded_at: self.loaded_at,
            reloads: self.reloads,
            metrics_listen: Some(self.metrics_addr.to_string()),
            audit_log: Some(self.audit.lock().unwrap().path().to_path_buf()),
            pending_confirm_until: self.pending_until(),
            labels: Labels::from_policy(&policy),
            policy_generation: self.generation,
            last_reload: self.last_reload.clone(),
        };
        state.write(&self.opts.run_dir, self.group)
    }
}

/// The signals the daemon handles, installed before it announces itself.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// `pcguard check`'s warnings, at warn level: the config compiles but
/// breaks something on the server.
fn log_warnings(cfg: &crate::config::SiteConfig, compiled: &policy::CompiledPolicy) {
    for w in policy::warnings(cfg, compiled) {
        warn!("{} (fix: {})", w.message, w.fix);
    }
}
