//! `cargo xtask bench --compare`: pcguard side by side with what an
//! operator could run instead, measured in one run with interleaved rounds
//! (docs/performance.md). Two network namespaces joined by a veth pair;
//! the receiver runs, in turn, no filter, nftables with pcguard's own
//! rendered ruleset, xdp-filter (a stateless XDP filter, xdp-tools), and
//! pcguard on each ingress hook; the sender measures:
//!
//! * SYN flood: the packets per second trafgen reaches sending SYNs with
//!   random source ports to a port without a rule (one sender CPU);
//! * new connections per second to an allowed port (the conntrack insert
//!   path: handshake, promotion, close);
//! * iperf3 TCP throughput to an allowed port (an established flow);
//! * test-run ns per packet of the attached program on one denied SYN
//!   (`bpftool prog run`, the same harness for pcguard and xdp-filter).
//!
//! Only ratios between rows of one run mean anything: absolute figures on
//! a shared 2-core VM are noise.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

const RX: &str = "rx";
const TX: &str = "tx";
const RX_IF: &str = "cmprx";
const TX_IF: &str = "cmptx";
const RX_ADDR: &str = "10.88.0.1";
const TX_ADDR: &str = "10.88.0.2";
/// Allowed: web (9191) and iperf3 (5201) from the sender's class.
const WEB_PORT: u16 = 9191;
const IPERF_PORT: u16 = 5201;
/// No rule.
const DENIED_PORT: u16 = 9999;

/// What the receiver runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Receiver {
    None,
    Nftables,
    /// One stateless rule at the netdev ingress hook: the cheapest drop
    /// the kernel's own filters make (not an allowlist).
    NftNetdev,
    XdpFilter,
    /// xdp-filter in generic mode: what generic XDP costs any program.
    XdpFilterSkb,
    PcguardXdp,
    PcguardXdpSkb,
    PcguardTc,
    /// Native XDP with 10,000 peer prefixes and 500 rules.
    PcguardXdpLarge,
}

impl Receiver {
    fn name(self) -> &'static str {
        match self {
            Receiver::None => "no filter",
            Receiver::Nftables => "nftables (pcguard render nftables)",
            Receiver::NftNetdev => "nftables netdev ingress, 1 drop rule",
            Receiver::XdpFilter => "xdp-filter (deny + allowed ports)",
            Receiver::XdpFilterSkb => "xdp-filter, generic XDP",
            Receiver::PcguardXdp => "pcguard, native XDP",
            Receiver::PcguardXdpSkb => "pcguard, generic XDP (--xdp-skb)",
            Receiver::PcguardTc => "pcguard, TC ingress",
            Receiver::PcguardXdpLarge => "pcguard, native XDP, 10k CIDRs/500 rules",
        }
    }

    fn is_pcguard(self) -> bool {
        matches!(self, Receiver::PcguardXdp | Receiver::PcguardXdpSkb | Receiver::PcguardTc | Receiver::PcguardXdpLarge)
    }
}

pub struct Options {
    pub rounds: u32,
    /// Seconds per measurement.
    pub seconds: u32,
    pub receivers: Vec<Receiver>,
    /// The pcguard binary to run.
    pub pcguard: PathBuf,
}

impl Options {
    /// The full comparison.
    pub fn full(pcguard: PathBuf) -> Self {
        use Receiver::*;
        Self {
            rounds: 3,
            seconds: 3,
            receivers: vec![
                None,
                Nftables,
                NftNetdev,
                XdpFilter,
                XdpFilterSkb,
                PcguardXdp,
                PcguardXdpSkb,
                PcguardTc,
                PcguardXdpLarge,
            ],
            pcguard,
        }
    }

    /// The smoke version `cargo xtask test` runs: about ten seconds, every
    /// measurement once, asserted to have measured something.
    pub fn smoke(pcguard: PathBuf) -> Self {
        use Receiver::*;
        Self { rounds: 1, seconds: 1, receivers: vec![None, XdpFilter, PcguardXdp, PcguardTc], pcguard }
    }
}

/// One receiver's figures in one round.
#[derive(Clone, Debug, Default)]
struct Sample {
    syn_pps: f64,
    /// SYNs trafgen sent.
    syn_sent: f64,
    conns_per_s: f64,
    gbits: f64,
    /// Test-run ns of a denied SYN (filters with a program).
    drop_ns: Option<f64>,
    /// Packets the filter counted as dropped during the SYN flood (pcguard).
    dropped: Option<f64>,
}

/// Every round's figures, by receiver.
pub struct Report {
    samples: BTreeMap<Receiver, Vec<Sample>>,
}

pub fn run(root: &Path, opts: &Options) -> Result<Report> {
    for tool in ["trafgen", "iperf3", "xdp-filter", "bpftool", "nft"] {
        ensure!(which(tool), "{tool} is not installed (cargo xtask deps installs it)");
    }
    let topo = Topology::up()?;
    let work = root.join("target/compare");
    std::fs::create_dir_all(&work)?;
    let syn = work.join("syn.trafgen");
    std::fs::write(&syn, trafgen_syn(&topo)?)?;
    let syn_frame = work.join("syn.bin");
    std::fs::write(&syn_frame, syn_frame_bytes())?;
    let configs = Configs::write(&work)?;
    let _web = AcceptServer::start(&topo, WEB_PORT)?;
    let _iperf = topo.spawn(RX, "iperf3", &["-s", "-p", &IPERF_PORT.to_string()])?;
    std::thread::sleep(Duration::from_millis(300));

    let mut samples: BTreeMap<Receiver, Vec<Sample>> = BTreeMap::new();
    for round in 0..opts.rounds {
        for &r in &opts.receivers {
            eprintln!("compare: round {} of {}: {}", round + 1, opts.rounds, r.name());
            let filter = Filter::attach(r, &topo, &configs, &work, &opts.pcguard)?;
            let sample = measure(&topo, &filter, opts.seconds, &syn, &syn_frame)
                .with_context(|| format!("measuring {}", r.name()))?;
            filter.detach(&topo)?;
            samples.entry(r).or_default().push(sample);
        }
    }
    Ok(Report { samples })
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces and a veth pair, removed on drop.
struct Topology {
    prefix: String,
    tx_mac: String,
    rx_mac: String,
}

impl Topology {
    fn up() -> Result<Self> {
        let prefix = format!("cmp{}", std::process::id());
        let mut t = Topology { prefix, tx_mac: String::new(), rx_mac: String::new() };
        t.remove();
        for ns in [RX, TX] {
            sh(&["ip", "netns", "add", &t.ns(ns)])?;
            sh(&["ip", "-n", &t.ns(ns), "link", "set", "lo", "up"])?;
        }
        let (a, b) = (format!("{}a", t.prefix), format!("{}b", t.prefix));
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
        for (dev, ns, name, addr) in [(&a, TX, TX_IF, TX_ADDR), (&b, RX, RX_IF, RX_ADDR)] {
            sh(&["ip", "link", "set", dev, "netns", &t.ns(ns)])?;
            sh(&["ip", "-n", &t.ns(ns), "link", "set", dev, "name", name])?;
            sh(&["ip", "-n", &t.ns(ns), "addr", "add", &format!("{addr}/24"), "dev", name])?;
            sh(&["ip", "-n", &t.ns(ns), "link", "set", name, "up"])?;
        }
        let mac = |ns: &str, ifname: &str| -> Result<String> {
            let out = sh(&["ip", "-n", &t.ns(ns), "-br", "link", "show", "dev", ifname])?;
            out.split_whitespace().nth(2).map(str::to_string).context("no MAC")
        };
        let (tx_mac, rx_mac) = (mac(TX, TX_IF)?, mac(RX, RX_IF)?);
        t.tx_mac = tx_mac;
        t.rx_mac = rx_mac;
        // Static neighbours: no filter has to let ARP through for the
        // figures to mean the same.
        sh(&[
            "ip",
            "-n",
            &t.ns(TX),
            "neigh",
            "replace",
            RX_ADDR,
            "lladdr",
            &t.rx_mac,
            "dev",
            TX_IF,
            "nud",
            "permanent",
        ])?;
        sh(&[
            "ip",
            "-n",
            &t.ns(RX),
            "neigh",
            "replace",
            TX_ADDR,
            "lladdr",
            &t.tx_mac,
            "dev",
            RX_IF,
            "nud",
            "permanent",
        ])?;
        Ok(t)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn ns_path(&self, host: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.ns(host))
    }

    /// Runs `cmd args` in `host`'s namespace (nsenter: /sys/fs/bpf stays
    /// visible, which xdp-filter and pcguard need).
    fn cmd(&self, host: &str, cmd: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns_path(host).display())).arg(cmd).args(args);
        c
    }

    fn run(&self, host: &str, cmd: &str, args: &[&str]) -> Result<String> {
        let out = self.cmd(host, cmd, args).output().with_context(|| format!("running {cmd}"))?;
        if !out.status.success() {
            bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    }

    fn spawn(&self, host: &str, cmd: &str, args: &[&str]) -> Result<KillOnDrop> {
        let child = self.cmd(host, cmd, args).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        Ok(KillOnDrop(child))
    }

    fn remove(&self) {
        for ns in [RX, TX] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(ns)]).output();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.remove();
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A trafgen config: SYNs from random source ports to the denied port.
fn trafgen_syn(t: &Topology) -> Result<String> {
    Ok(format!(
        "{{\n  eth(da={}, sa={}, type=0x0800),\n  ipv4(saddr={TX_ADDR}, daddr={RX_ADDR}, ttl=64),\n  tcp(sp=drnd(), dp={DENIED_PORT}, seq=drnd(), syn),\n}}\n",
        t.rx_mac, t.tx_mac
    ))
}

/// One SYN to the denied port, for `bpftool prog run`.
fn syn_frame_bytes() -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let ip = [0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 88, 0, 2, 10, 88, 0, 1];
    f.extend(ip);
    let mut tcp = [0u8; 20];
    tcp[..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&DENIED_PORT.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    f.extend(tcp);
    f
}

/// The pcguard configs of the comparison.
struct Configs {
    small: PathBuf,
    large: PathBuf,
}

impl Configs {
    fn write(work: &Path) -> Result<Self> {
        let config = |hook: &str, extra_peers: &str, extra_rules: &str| {
            format!(
                "role = \"primary\"\ninterfaces = [\"{RX_IF}\"]\nmode = \"enforce\"\ningress_hook = \"{hook}\"\n\n\
                 [peers]\nworkstations = [\"{TX_ADDR}\"{extra_peers}]\n\n[features]\nweb = true\n\n\
                 [audit]\npath = \"{}\"\n\n\
                 [[rule]]\nname = \"iperf3\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [{IPERF_PORT}]\npeers = [\"workstations\"]\n{extra_rules}",
                work.join("flows.jsonl").display()
            )
        };
        let small = work.join("small.toml");
        std::fs::write(&small, config("HOOK", "", ""))?;
        // 10,000 /32 prefixes in the workstation class, 500 site rules.
        let peers: String =
            (0..10_000u32).map(|i| format!(", \"10.{}.{}.{}\"", 100 + i / 65536, (i >> 8) & 0xff, i & 0xff)).collect();
        let rules: String = (0..500u32)
            .map(|i| {
                format!(
                    "\n[[rule]]\nname = \"r{i}\"\ndirection = \"inbound\"\nprotocol = \"tcp\"\nports = [{}]\npeers = [\"workstations\"]\n",
                    20_000 + i
                )
            })
            .collect();
        let large = work.join("large.toml");
        std::fs::write(&large, config("HOOK", &peers, &rules))?;
        Ok(Self { small, large })
    }

    /// `path`'s config with its ingress hook set.
    fn with_hook(path: &Path, hook: &str, work: &Path) -> Result<PathBuf> {
        let text =
            std::fs::read_to_string(path)?.replace("ingress_hook = \"HOOK\"", &format!("ingress_hook = \"{hook}\""));
        let out = work.join(format!("{}-{hook}.toml", path.file_stem().unwrap_or_default().to_string_lossy()));
        std::fs::write(&out, text)?;
        Ok(out)
    }
}

/// A receiver set up: what to take down, and the program to test-run.
struct Filter {
    receiver: Receiver,
    daemon: Option<KillOnDrop>,
    run_dir: PathBuf,
    bpffs: PathBuf,
    pcguard: PathBuf,
    prog_id: Option<u32>,
}

impl Filter {
    fn attach(r: Receiver, t: &Topology, configs: &Configs, work: &Path, pcguard: &Path) -> Result<Self> {
        let run_dir = work.join("run");
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/pcguard-{}", t.prefix));
        let mut f = Filter { receiver: r, daemon: None, run_dir, bpffs, pcguard: pcguard.to_path_buf(), prog_id: None };
        match r {
            Receiver::None => {}
            Receiver::Nftables => {
                let cfg = Configs::with_hook(&configs.small, "xdp", work)?;
                let ruleset = sh(&[&pcguard.to_string_lossy(), "render", "nftables", &cfg.to_string_lossy()])?;
                let file = work.join("ruleset.nft");
                std::fs::write(&file, ruleset)?;
                t.run(RX, "nft", &["-f", &file.to_string_lossy()])?;
            }
            Receiver::NftNetdev => {
                let file = work.join("netdev.nft");
                std::fs::write(
                    &file,
                    format!(
                        "table netdev compare {{\n  chain ingress {{\n    type filter hook ingress device \"{RX_IF}\" priority -500;\n    tcp dport {DENIED_PORT} drop\n  }}\n}}\n"
                    ),
                )?;
                t.run(RX, "nft", &["-f", &file.to_string_lossy()])?;
            }
            Receiver::XdpFilter | Receiver::XdpFilterSkb => {
                let mode = if r == Receiver::XdpFilter { "native" } else { "skb" };
                t.run(RX, "xdp-filter", &["load", "--mode", mode, "--policy", "deny", RX_IF])?;
                for port in [WEB_PORT, IPERF_PORT] {
                    t.run(RX, "xdp-filter", &["port", &port.to_string(), "--mode", "dst", "--proto", "tcp"])?;
                }
                f.prog_id = Some(xdp_prog_id(t)?);
            }
            _ => {
                let (config, hook, skb) = match r {
                    Receiver::PcguardXdp => (&configs.small, "xdp", false),
                    Receiver::PcguardXdpSkb => (&configs.small, "xdp", true),
                    Receiver::PcguardTc => (&configs.small, "tc", false),
                    _ => (&configs.large, "xdp", false),
                };
                let cfg = Configs::with_hook(config, hook, work)?;
                let _ = std::fs::remove_file(f.run_dir.join("state.json"));
                let mut args = vec![
                    "run".to_string(),
                    "--config".into(),
                    cfg.to_string_lossy().into_owned(),
                    "--run-dir".into(),
                    f.run_dir.to_string_lossy().into_owned(),
                    "--bpffs-dir".into(),
                    f.bpffs.to_string_lossy().into_owned(),
                    "--metrics-listen".into(),
                    "127.0.0.1:9750".into(),
                    "--detach-on-exit".into(),
                ];
                if skb {
                    args.push("--xdp-skb".into());
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let log = std::fs::File::create(work.join("daemon.log"))?;
                let child = t.cmd(RX, &pcguard.to_string_lossy(), &args).stdout(Stdio::null()).stderr(log).spawn()?;
                f.daemon = Some(KillOnDrop(child));
                let deadline = Instant::now() + Duration::from_secs(60);
                while !f.run_dir.join("state.json").exists() {
                    ensure!(
                        Instant::now() < deadline,
                        "pcguard did not start: {}",
                        std::fs::read_to_string(work.join("daemon.log"))?
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                let state: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(f.run_dir.join("state.json"))?)?;
                f.prog_id = state["interfaces"][0]["ingress_program_id"].as_u64().map(|i| i as u32);
            }
        }
        Ok(f)
    }

    /// Packets the filter dropped at ingress so far (pcguard: from its
    /// metrics; the others have no counter to read).
    fn dropped(&self, t: &Topology) -> Result<Option<f64>> {
        if !self.receiver.is_pcguard() {
            return Ok(None);
        }
        let text = scrape(t)?;
        Ok(Some(
            text.lines()
                .filter(|l| {
                    l.starts_with("pcguard_packets_total{")
                        && l.contains("direction=\"ingress\"")
                        && l.contains("verdict=\"dropped\"")
                })
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum(),
        ))
    }

    fn detach(mut self, t: &Topology) -> Result<()> {
        match self.receiver {
            Receiver::None => {}
            Receiver::Nftables | Receiver::NftNetdev => {
                t.run(RX, "nft", &["flush", "ruleset"])?;
            }
            Receiver::XdpFilter | Receiver::XdpFilterSkb => {
                t.run(RX, "xdp-filter", &["unload", RX_IF])?;
            }
            _ => {
                if let Some(mut d) = self.daemon.take() {
                    // SIGTERM with --detach-on-exit: programs and pins go.
                    let _ = Command::new("kill").arg(d.0.id().to_string()).status();
                    let _ = d.0.wait();
                }
                let _ = Command::new(&self.pcguard)
                    .arg("detach")
                    .arg("--bpffs-dir")
                    .arg(&self.bpffs)
                    .arg("--run-dir")
                    .arg(&self.run_dir)
                    .output();
            }
        }
        Ok(())
    }
}

/// Metrics of the pcguard daemon in the receiver namespace.
fn scrape(t: &Topology) -> Result<String> {
    let ns = t.ns_path(RX);
    std::thread::spawn(move || -> Result<String> {
        pcguard_tests::enter_netns(&ns)?;
        pcguard_tests::http_get("127.0.0.1:9750".parse()?, "/metrics")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("scrape thread panicked"))?
}

/// The id of the XDP program on the receiver's interface.
fn xdp_prog_id(t: &Topology) -> Result<u32> {
    let out = t.run(RX, "ip", &["-d", "link", "show", "dev", RX_IF])?;
    let id = out.split("prog/xdp id ").nth(1).and_then(|s| s.split_whitespace().next()).context("no XDP program")?;
    Ok(id.parse()?)
}

fn measure(t: &Topology, f: &Filter, secs: u32, syn: &Path, frame: &Path) -> Result<Sample> {
    let mut s = Sample::default();
    let before = f.dropped(t)?;
    (s.syn_sent, s.syn_pps) = syn_flood(t, syn, secs)?;
    if let (Some(b), Some(a)) = (before, f.dropped(t)?) {
        s.dropped = Some(a - b);
    }
    s.conns_per_s = connection_rate(t, secs)?;
    s.gbits = iperf3(t, secs)?;
    if let Some(id) = f.prog_id {
        s.drop_ns = Some(test_run_ns(id, frame)?);
    }
    Ok(s)
}

/// trafgen for `secs` seconds on one CPU: the packets it sent, and per
/// second.
fn syn_flood(t: &Topology, conf: &Path, secs: u32) -> Result<(f64, f64)> {
    // timeout exits 124 when it stopped trafgen: read the output whatever
    // the status.
    let out = t
        .cmd(
            TX,
            "timeout",
            &[
                "-s",
                "INT",
                &secs.to_string(),
                "trafgen",
                "--dev",
                TX_IF,
                "--conf",
                &conf.to_string_lossy(),
                "--cpus",
                "1",
            ],
        )
        .output()
        .context("running trafgen")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let packets: f64 =
        field_before(&text, "packets outgoing").with_context(|| format!("trafgen printed no packet count: {text}"))?;
    let (sec, usec) = text
        .lines()
        .find(|l| l.contains(" sec, ") && l.contains("usec"))
        .and_then(|l| {
            let mut w = l.split_whitespace();
            let s: f64 = w.next()?.parse().ok()?;
            w.next();
            let u: f64 = w.next()?.parse().ok()?;
            Some((s, u))
        })
        .context("trafgen printed no duration")?;
    Ok((packets, packets / (sec + usec / 1e6)))
}

fn field_before(text: &str, what: &str) -> Option<f64> {
    text.lines().find(|l| l.contains(what)).and_then(|l| l.split_whitespace().next()).and_then(|n| n.parse().ok())
}

/// New TCP connections per second from the sender to the allowed port,
/// one after the other.
fn connection_rate(t: &Topology, secs: u32) -> Result<f64> {
    let ns = t.ns_path(TX);
    let to: SocketAddr = format!("{RX_ADDR}:{WEB_PORT}").parse()?;
    std::thread::spawn(move || -> Result<f64> {
        pcguard_tests::enter_netns(&ns)?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(u64::from(secs)) {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
            let mut b = [0u8; 1];
            // The server closes at once: a whole open/close exchange.
            let _ = s.read(&mut b);
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connection thread panicked"))?
}

/// iperf3 TCP for `secs` seconds: Gbit/s received.
fn iperf3(t: &Topology, secs: u32) -> Result<f64> {
    let out = t.run(TX, "iperf3", &["-c", RX_ADDR, "-p", &IPERF_PORT.to_string(), "-t", &secs.to_string(), "-J"])?;
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..]).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3: no sum_received")?;
    Ok(bps / 1e9)
}

/// The program's average test-run time on `frame`: the best of three
/// runs of a million (bpftool, the same harness for every program).
fn test_run_ns(prog_id: u32, frame: &Path) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let out = sh(&[
            "bpftool",
            "prog",
            "run",
            "id",
            &prog_id.to_string(),
            "data_in",
            &frame.to_string_lossy(),
            "repeat",
            "1000000",
        ])?;
        let ns: f64 = out
            .split("duration (average): ")
            .nth(1)
            .and_then(|s| s.trim().trim_end_matches("ns").trim().parse().ok())
            .context("bpftool prog run printed no duration")?;
        best = best.min(ns);
    }
    Ok(best)
}

/// An accept-and-close server on the receiver (for the connection rate).
struct AcceptServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AcceptServer {
    fn start(t: &Topology, port: u16) -> Result<Self> {
        let ns = t.ns_path(RX);
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            pcguard_tests::enter_netns(&ns)?;
            Ok(TcpListener::bind(("0.0.0.0", port))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bind thread panicked"))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.write_all(b"x");
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for AcceptServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn median(v: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// The medians, with ratios to the rows operators compare against.
pub fn render(report: &Report, opts: &Options) -> String {
    let samples = &report.samples;
    let med =
        |r: Receiver, f: &dyn Fn(&Sample) -> Option<f64>| samples.get(&r).and_then(|v| median(v.iter().filter_map(f)));
    let none_conns = med(Receiver::None, &|s| Some(s.conns_per_s));
    let none_gbits = med(Receiver::None, &|s| Some(s.gbits));
    let nft_pps = med(Receiver::Nftables, &|s| Some(s.syn_pps));
    let xf_pps = med(Receiver::XdpFilter, &|s| Some(s.syn_pps));
    let xf_ns = med(Receiver::XdpFilter, &|s| s.drop_ns);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let mut out = format!(
        "{} round(s), {} s per measurement, interleaved; medians.\n\n\
         | receiver | SYN flood pps (sender) | vs xdp-filter | vs nftables | dropped by pcguard | new conns/s | vs none | iperf3 Gbit/s | vs none | test-run drop ns | vs xdp-filter |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        opts.rounds, opts.seconds
    );
    for &r in &opts.receivers {
        let pps = med(r, &|s| Some(s.syn_pps));
        let conns = med(r, &|s| Some(s.conns_per_s));
        let gbits = med(r, &|s| Some(s.gbits));
        let ns = med(r, &|s| s.drop_ns);
        let seen = med(r, &|s| s.dropped.map(|d| 100.0 * d / s.syn_sent.max(1.0)));
        out += &format!(
            "| {} | {:.0}k | {} | {} | {} | {:.0} | {} | {:.1} | {} | {} | {} |\n",
            r.name(),
            pps.unwrap_or(0.0) / 1000.0,
            ratio(pps, xf_pps),
            ratio(pps, nft_pps),
            seen.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "-".into()),
            conns.unwrap_or(0.0),
            ratio(conns, none_conns),
            gbits.unwrap_or(0.0),
            ratio(gbits, none_gbits),
            ns.map(|n| format!("{n:.0}")).unwrap_or_else(|| "-".into()),
            ratio(ns, xf_ns),
        );
    }
    out += "\nSYN flood pps: what one trafgen CPU sent to a port without a rule (the receiver's \
             cost shows as the sender's rate: on veth both sides share the CPUs). dropped by pcguard: \
             its ingress drop counter over the SYNs sent (below 100%: the veth ring dropped frames \
             before the program). test-run: `bpftool prog run`, 1,000,000 repeats, best of three; a \
             TC program's run includes building an skb, an XDP program's does not.\n";
    out
}

/// Checks of the smoke run: every receiver measured every figure, and
/// each pcguard hook dropped the flood (its counters) while passing the
/// allowed connections and the iperf3 stream.
pub fn smoke(root: &Path, pcguard: PathBuf) -> Result<()> {
    let opts = Options::smoke(pcguard);
    let report = run(root, &opts)?;
    println!("{}", render(&report, &opts));
    for r in &opts.receivers {
        let s = report.samples.get(r).and_then(|v| v.first()).with_context(|| format!("{}: not measured", r.name()))?;
        ensure!(s.syn_sent > 0.0, "{}: the SYN flood sent nothing", r.name());
        ensure!(s.conns_per_s > 0.0, "{}: no connection to the allowed port", r.name());
        ensure!(s.gbits > 0.0, "{}: iperf3 moved nothing through the allowed port", r.name());
        if *r != Receiver::None {
            ensure!(s.drop_ns.is_some_and(|ns| ns > 0.0), "{}: no test-run time", r.name());
        }
        if r.is_pcguard() {
            // Frames the veth ring drops under the flood never reach the
            // program; most must, and the program drops every one that does.
            let dropped = s.dropped.unwrap_or(0.0);
            ensure!(
                dropped >= s.syn_sent * 0.25 && dropped <= s.syn_sent,
                "{}: {dropped} SYNs dropped by the program of {} sent",
                r.name(),
                s.syn_sent
            );
        }
    }
    Ok(())
}
