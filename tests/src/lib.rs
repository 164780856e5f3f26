//! The pcguard lab: network namespaces joined by a bridge, standing for a
//! PaperCut server and its peers, plus helpers to run real TCP/UDP servers
//! and clients inside them and to drive a `pcguard run` daemon.
//!
//! Topology (all addresses exist only inside the lab's namespaces):
//!
//! ```text
//!   <p>-srv  pcg0 10.77.0.1/24 fd77::1/64   (PaperCut server; pcguard attaches here)
//!        |
//!   <p>-lan  br0 (bridge)
//!        |-- <p>-ws    eth0 10.77.0.2  fd77::2   workstation
//!        |-- <p>-mfd   eth0 10.77.0.3  fd77::3   MFD (device)
//!        |-- <p>-sec   eth0 10.77.0.4  fd77::4   secondary server
//!        |-- <p>-ldap  eth0 10.77.0.5  fd77::5   LDAP server
//!        |-- <p>-db    eth0 10.77.0.6  fd77::6   database
//!        |-- <p>-adm   eth0 10.77.0.7  fd77::7   admin workstation
//!        `-- <p>-out   eth0 10.77.0.99 fd77::99  unclassified host
//! ```

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub mod probes;
use aya::maps::{HashMap as BpfHashMap, MapData};
use pcguard_common::{CtEntry, FlowKey};

/// A peer of the lab: short name, last address byte.
pub const PEERS: [(&str, u8); 7] =
    [("ws", 2), ("mfd", 3), ("sec", 4), ("ldap", 5), ("db", 6), ("adm", 7), ("out", 99)];
pub const SERVER: &str = "srv";
pub const SERVER_IF: &str = "pcg0";

pub fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, last)
}

/// `fd77::<last>`, the decimal digits read as hex so that the address
/// reads like its IPv4 twin (`10.77.0.99` <-> `fd77::99`).
pub fn v6(last: u8) -> Ipv6Addr {
    format!("fd77::{last}").parse().expect("valid IPv6 literal")
}

/// Address of a lab host by short name (`srv`, `ws`, ...).
pub fn addr(host: &str) -> Ipv4Addr {
    v4(last_byte(host))
}

pub fn addr6(host: &str) -> Ipv6Addr {
    v6(last_byte(host))
}

fn last_byte(host: &str) -> u8 {
    if host == SERVER {
        return 1;
    }
    PEERS.iter().find(|(n, _)| *n == host).map(|(_, b)| *b).unwrap_or_else(|| panic!("unknown lab host {host}"))
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A lab of namespaces; removed on drop.
pub struct Lab {
    pub prefix: String,
}

impl Lab {
    /// Builds the topology; stale namespaces of the same prefix are removed first.
    pub fn up(prefix: &str) -> Result<Self> {
        ensure!(is_root(), "the lab needs root (network namespaces, XDP)");
        let lab = Lab { prefix: prefix.to_string() };
        lab.remove();
        let lan = lab.ns("lan");
        sh("ip", &["netns", "add", &lan])?;
        sh("ip", &["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        // A switch forwards frames as they are. With bridge netfilter on
        // (br_netfilter, on by default), the bridge hands IP frames to
        // iptables and trims the bytes after the IP datagram on the way:
        // crafted frames would not reach pcguard as they were sent. It is on
        // when either the bridge's option or the namespace's sysctl is.
        sh(
            "ip",
            &["-n", &lan, "link", "set", "br0", "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0"],
        )?;
        if Path::new("/proc/sys/net/bridge").exists() {
            for table in ["iptables", "ip6tables", "arptables"] {
                let key = format!("net.bridge.bridge-nf-call-{table}=0");
                sh("ip", &["netns", "exec", &lan, "sysctl", "-q", "-w", &key])?;
            }
        }
        sh("ip", &["-n", &lan, "link", "set", "br0", "up"])?;
        sh("ip", &["-n", &lan, "link", "set", "lo", "up"])?;
        lab.add_host(SERVER, SERVER_IF, 1)?;
        for (name, last) in PEERS {
            lab.add_host(name, "eth0", last)?;
        }
        Ok(lab)
    }

    fn add_host(&self, name: &str, ifname: &str, last: u8) -> Result<()> {
        let ns = self.ns(name);
        let lan = self.ns("lan");
        sh("ip", &["netns", "add", &ns])?;
        // Temporary names in the root namespace must be unique and at most
        // 15 bytes: a hash of the prefix and the host byte.
        let a = format!("v{:06x}h{last}a", short_hash(&self.prefix));
        let b = format!("v{:06x}h{last}b", short_hash(&self.prefix));
        sh("ip", &["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        sh("ip", &["link", "set", &a, "netns", &ns])?;
        sh("ip", &["link", "set", &b, "netns", &lan])?;
        sh("ip", &["-n", &ns, "link", "set", &a, "name", ifname])?;
        sh("ip", &["-n", &ns, "addr", "add", &format!("{}/24", v4(last)), "dev", ifname])?;
        sh("ip", &["-n", &ns, "addr", "add", &format!("{}/64", v6(last)), "dev", ifname, "nodad"])?;
        sh("ip", &["-n", &ns, "link", "set", ifname, "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        sh("ip", &["-n", &lan, "link", "set", &b, "master", "br0"])?;
        sh("ip", &["-n", &lan, "link", "set", &b, "up"])?;
        Ok(())
    }

    /// Namespace name of a lab host.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn ns_path(&self, host: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.ns(host))
    }

    /// Adds `addr` to `host`'s eth0 (in the lab's /24 or /64), so that one
    /// namespace answers for another lab address (a "cloud" host).
    pub fn add_address(&self, host: &str, addr: IpAddr) -> Result<()> {
        let ns = self.ns(host);
        match addr {
            IpAddr::V4(a) => sh("ip", &["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?,
            IpAddr::V6(a) => sh("ip", &["-n", &ns, "addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"])?,
        };
        Ok(())
    }

    /// The MAC address of `host`'s interface `ifname`, as bytes.
    pub fn mac_bytes(&self, host: &str, ifname: &str) -> Result<[u8; 6]> {
        let text = self.mac(host, ifname)?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        ensure!(parts.len() == 6, "MAC {text:?}");
        for (b, part) in mac.iter_mut().zip(parts) {
            *b = u8::from_str_radix(part, 16)?;
        }
        Ok(mac)
    }

    /// Runs `f` on a thread whose network namespace is `host`'s. Sockets
    /// created there stay in that namespace wherever they are used later.
    pub fn run_in<T: Send + 'static>(&self, host: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.ns_path(host);
        std::thread::spawn(move || -> Result<T> {
            enter_netns(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {host} panicked"))?
    }

    /// Waits until `host` can reach the server over IPv4 and IPv6 (neighbour
    /// discovery done), using ICMP, which pcguard passes.
    pub fn wait_reachable(&self, host: &str) -> Result<()> {
        let ns = self.ns(host);
        for target in [addr(SERVER).to_string(), addr6(SERVER).to_string()] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while sh("ip", &["netns", "exec", &ns, "ping", "-c1", "-W1", &target]).is_err() {
                ensure!(Instant::now() < deadline, "{host} cannot reach {target}");
            }
        }
        Ok(())
    }

    /// The bpffs directory daemons of this lab pin their maps and links in.
    pub fn bpffs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/pcguard-{}", self.prefix))
    }

    fn remove(&self) {
        // Pins outlive the daemons (that is their point): remove this
        // lab's, or every run would leave its maps' memory behind.
        if self.bpffs_dir().exists()
            && let Ok(bin) = pcguard_bin()
        {
            let _ = Command::new(bin).arg("detach").arg("--bpffs-dir").arg(self.bpffs_dir()).output();
        }
        let list = sh("ip", &["netns", "list"]).unwrap_or_default();
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{}-", self.prefix)) {
                let _ = sh("ip", &["netns", "del", name]);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("PCGUARD_KEEP_LAB").is_none() {
            self.remove();
        }
    }
}

fn short_hash(prefix: &str) -> u32 {
    // FNV-1a, 24 bits.
    prefix.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193)) & 0xff_ffff
}

/// A lab prefix unique to this process, so that concurrent test runs (two
/// checkouts, two developers) never share or delete each other's namespaces.
pub fn unique_prefix(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: f is an open namespace fd; setns affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// A thread running `step` in a loop until dropped (the servers below).
/// `step` must return within a short time (its sockets have timeouts).
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn spawn(mut step: impl FnMut() + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                step();
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server that accepts connections, reads a line and answers
/// `ok <line>`; runs until dropped.
pub struct TcpServer {
    pub addr: SocketAddr,
    _thread: Background,
}

impl TcpServer {
    pub fn start(lab: &Lab, host: &str, bind: SocketAddr) -> Result<Self> {
        let listener = lab.run_in(host, move || TcpListener::bind(bind))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let thread = Background::spawn(move || match listener.accept() {
            Ok((s, _)) => {
                std::thread::spawn(move || echo(s));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        });
        Ok(Self { addr, _thread: thread })
    }
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    if let Ok(n) = s.read(&mut buf) {
        let _ = s.write_all(b"ok ");
        let _ = s.write_all(&buf[..n]);
    }
    let _ = s.shutdown(Shutdown::Both);
}

/// A dual-stack TCP listener on `port` in `host`'s namespace.
pub fn tcp_listen(lab: &Lab, host: &str, port: u16) -> Result<TcpListener> {
    Ok(lab.run_in(host, move || TcpListener::bind(sa(Ipv6Addr::UNSPECIFIED, port)))??)
}

/// A TCP connection from `from` to `to`, accepted by `listener` (which
/// must be listening on `to`): (the client's end, the accepted end).
pub fn tcp_connection(lab: &Lab, from: &str, listener: &TcpListener, to: SocketAddr) -> Result<(TcpStream, TcpStream)> {
    let client = lab.run_in(from, move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))??;
    let (accepted, _) = listener.accept()?;
    Ok((client, accepted))
}

/// Writes `msg` on `from`; true when `to` then reads exactly `msg` within
/// `timeout`.
pub fn tcp_delivers(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8], timeout: Duration) -> Result<bool> {
    from.write_all(msg)?;
    to.set_read_timeout(Some(timeout))?;
    let mut got = vec![0u8; msg.len()];
    match to.read_exact(&mut got) {
        Ok(()) => Ok(got == msg),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Outcome of one client attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connected and got the expected answer.
    Answered,
    /// Connection refused (RST): the packet reached the host.
    Refused,
    /// Timed out: something dropped the packets.
    TimedOut,
    Other(String),
}

/// From `host`, connects to `to`, sends `msg` and expects `ok <msg>` back.
pub fn tcp_request(lab: &Lab, host: &str, to: SocketAddr, msg: &str, timeout: Duration) -> Result<Outcome> {
    let msg = msg.to_string();
    lab.run_in(host, move || {
        let mut s = match TcpStream::connect_timeout(&to, timeout) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Outcome::TimedOut,
            Err(e) => return Outcome::Other(e.to_string()),
        };
        let _ = s.set_read_timeout(Some(timeout));
        if let Err(e) = s.write_all(msg.as_bytes()) {
            return Outcome::Other(e.to_string());
        }
        let mut answer = String::new();
        match s.read_to_string(&mut answer) {
            Ok(_) if answer == format!("ok {msg}") => Outcome::Answered,
            Ok(_) => Outcome::Other(format!("unexpected answer {answer:?}")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                Outcome::TimedOut
            }
            Err(e) => Outcome::Other(e.to_string()),
        }
    })
}

/// A UDP server answering each datagram with `ok <datagram>`.
pub struct UdpServer {
    pub addr: SocketAddr,
    _thread: Background,
}

impl UdpServer {
    pub fn start(lab: &Lab, host: &str, bind: SocketAddr) -> Result<Self> {
        let sock = lab.run_in(host, move || UdpSocket::bind(bind))??;
        let addr = sock.local_addr()?;
        let thread = udp_responder(sock, |datagram| {
            let mut answer = b"ok ".to_vec();
            answer.extend_from_slice(datagram);
            Some(answer)
        })?;
        Ok(Self { addr, _thread: thread })
    }
}

/// Answers each datagram on `sock` with `answer(datagram)`, if any.
fn udp_responder(sock: UdpSocket, answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static) -> Result<Background> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 2048];
    Ok(Background::spawn(move || {
        if let Ok((n, from)) = sock.recv_from(&mut buf)
            && let Some(a) = answer(&buf[..n])
        {
            let _ = sock.send_to(&a, from);
        }
    }))
}

/// From `host`, sends `msg` to `to` over UDP; true when `ok <msg>` came back.
pub fn udp_request(lab: &Lab, host: &str, to: SocketAddr, msg: &str, timeout: Duration) -> Result<bool> {
    let msg = msg.to_string();
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    lab.run_in(host, move || -> Result<bool> {
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(msg.as_bytes(), to)?;
        let mut buf = [0u8; 2048];
        Ok(match s.recv_from(&mut buf) {
            Ok((n, _)) => &buf[..n] == format!("ok {msg}").as_bytes(),
            Err(_) => false,
        })
    })?
}

/// Path of the pcguard binary: `$PCGUARD_BIN`, else next to the test
/// executable's target directory (`target/<profile>/pcguard`).
pub fn pcguard_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PCGUARD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join("pcguard");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("pcguard binary not found near {} (build it or set PCGUARD_BIN)", exe.display())
}

/// A `pcguard run` daemon in the lab's server namespace.
pub struct Daemon {
    child: Child,
    pub run_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub audit_log: PathBuf,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    server_ns: PathBuf,
}

impl Daemon {
    /// Starts `pcguard run --config <config>` in the server namespace (via
    /// nsenter, which keeps /sys/fs/bpf visible) and waits until it has
    /// attached (its state file exists). `work` holds the run dir, logs and
    /// the audit log; `extra` are further `run` arguments.
    pub fn start(lab: &Lab, config: &Path, work: &Path, extra: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(work)?;
        let run_dir = work.join("run");
        let bpffs_dir = lab.bpffs_dir();
        let audit_log = work.join("flows.jsonl");
        let log = work.join("daemon.log");
        // `extra` may set the metrics address, or `--config-audit-log` to
        // leave the audit log to the config (no `--audit-log` override).
        let metrics: SocketAddr = match extra.iter().position(|a| *a == "--metrics-listen") {
            Some(i) => extra.get(i + 1).context("--metrics-listen without a value")?.parse()?,
            None => "127.0.0.1:9750".parse()?,
        };
        let config_audit = extra.contains(&"--config-audit-log");
        let audit_log = match extra.iter().position(|a| *a == "--audit-log") {
            Some(i) => PathBuf::from(extra.get(i + 1).context("--audit-log without a value")?),
            None => audit_log,
        };
        let own_audit = extra.contains(&"--audit-log");
        let extra: Vec<&str> = extra
            .iter()
            .enumerate()
            .filter(|(i, a)| {
                **a != "--config-audit-log"
                    && **a != "--metrics-listen"
                    && (*i == 0 || extra[*i - 1] != "--metrics-listen")
            })
            .map(|(_, a)| *a)
            .collect();
        let _ = std::fs::remove_file(run_dir.join("state.json"));
        let server_ns = lab.ns_path(SERVER);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", server_ns.display()))
            .arg(pcguard_bin()?)
            .args(["run", "--config"])
            .arg(config)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--bpffs-dir")
            .arg(&bpffs_dir)
            .arg("--metrics-listen")
            .arg(metrics.to_string());
        if !config_audit && !own_audit {
            cmd.arg("--audit-log").arg(&audit_log);
        }
        let child = cmd
            .args(&extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(File::create(&log)?))
            .stderr(Stdio::from(File::options().append(true).open(&log)?))
            .spawn()
            .context("starting pcguard")?;
        let mut d = Daemon { child, run_dir, bpffs_dir, audit_log, metrics, log, server_ns };
        d.wait_started()?;
        Ok(d)
    }

    fn wait_started(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.run_dir.join("state.json").exists() {
            if let Some(status) = self.child.try_wait()? {
                bail!("pcguard exited with {status}:\n{}", self.log_text());
            }
            ensure!(Instant::now() < deadline, "pcguard did not start:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: signalling our own child.
        ensure!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } == 0, "kill failed");
        Ok(())
    }

    /// Runs `pcguard <args>` (status, confirm, ...) against this daemon.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(pcguard_bin()?).args(args).arg("--run-dir").arg(&self.run_dir).output()?;
        ensure!(out.status.success(), "pcguard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Fetches /metrics from inside the server namespace.
    pub fn scrape(&self) -> Result<String> {
        let addr = self.metrics;
        let ns = self.server_ns.clone();
        std::thread::spawn(move || -> Result<String> {
            enter_netns(&ns)?;
            http_get(addr, "/metrics")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("scrape thread panicked"))?
    }

    /// Rule ids by rule number (a conntrack entry's `rule`), from the
    /// daemon's state file.
    pub fn rule_ids(&self) -> Result<Vec<String>> {
        let path = self.run_dir.join("state.json");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let rules = state["labels"]["rules"].as_array().with_context(|| format!("no labels.rules in {}", path.display()))?;
        Ok(rules.iter().map(|r| r.as_str().unwrap_or_default().to_string()).collect())
    }

    /// The pinned map set the daemon uses (from its state file).
    pub fn maps_dir(&self) -> Result<PathBuf> {
        let path = self.run_dir.join("state.json");
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        Ok(PathBuf::from(state["maps_dir"].as_str().with_context(|| format!("no maps_dir in {}", path.display()))?))
    }

    /// The entries of the daemon's established-flow conntrack (its pinned
    /// `CONNTRACK` map).
    pub fn conntrack(&self) -> Result<Vec<(FlowKey, CtEntry)>> {
        let path = self.maps_dir()?.join(pcguard_common::names::CONNTRACK);
        let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map: BpfHashMap<MapData, FlowKey, CtEntry> = BpfHashMap::try_from(aya::maps::Map::from_map_data(data)?)?;
        // An entry deleted between listing and reading its key is skipped.
        Ok(map.iter().filter_map(|e| e.ok()).collect())
    }

    /// The audit records written so far.
    pub fn audit(&self) -> Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(&self.audit_log) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            r => r.with_context(|| format!("reading {}", self.audit_log.display()))?,
        };
        text.lines().map(|l| serde_json::from_str(l).with_context(|| format!("audit line {l:?}"))).collect()
    }

    /// Waits until `pred` holds for the audit records.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&[serde_json::Value]) -> bool) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let recs = self.audit()?;
            if pred(&recs) {
                return Ok(recs);
            }
            ensure!(Instant::now() < deadline, "audit log never showed {what}; records: {recs:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            ensure!(Instant::now() < deadline, "pcguard did not stop on SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGKILL (a crash) and wait for it to be gone.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

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

/// `IpAddr` and port as a `SocketAddr`.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// One line per host: namespace and addresses.
pub fn describe(lab: &Lab) -> String {
    let mut hosts = vec![(SERVER, 1u8)];
    hosts.extend(PEERS);
    hosts.iter().map(|(h, b)| format!("\n  {:<12} {} {}", lab.ns(h), v4(*b), v6(*b))).collect()
}

/// Transport of a probe.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One request of the sample traffic.
#[derive(Clone, Debug)]
pub struct Probe {
    pub what: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub proto: Proto,
    pub port: u16,
    /// Expected to get through under the lab policy in enforce mode.
    pub allowed: bool,
}

/// The sample traffic of the lab policy (`examples/lab.toml`): PaperCut
/// clients, devices and admins reaching the server, the server reaching
/// its LDAP server, and the flows the policy forbids.
pub fn sample_probes() -> Vec<Probe> {
    use Proto::*;
    let p = |what, from, to, proto, port, allowed| Probe { what, from, to, proto, port, allowed };
    vec![
        p("workstation -> web (9191)", "ws", SERVER, Tcp, 9191, true),
        p("workstation -> web SSL (9192)", "ws", SERVER, Tcp, 9192, true),
        p("MFD -> web (9191)", "mfd", SERVER, Tcp, 9191, true),
        p("MFD -> device RPC (9193)", "mfd", SERVER, Tcp, 9193, true),
        p("secondary -> web SSL (9192)", "sec", SERVER, Tcp, 9192, true),
        p("admin -> SSH (22, always allowed)", "adm", SERVER, Tcp, 22, true),
        p("server -> LDAP (389)", SERVER, "ldap", Tcp, 389, true),
        p("workstation -> unlisted port 9999", "ws", SERVER, Tcp, 9999, false),
        p("workstation -> UDP 9191 (PaperCut uses no UDP)", "ws", SERVER, Udp, 9191, false),
        p("workstation -> SSH (22, admins only)", "ws", SERVER, Tcp, 22, false),
        p("unclassified host -> web (9191)", "out", SERVER, Tcp, 9191, false),
        p("server -> workstation SMB (445): never allowed", SERVER, "ws", Tcp, 445, false),
    ]
}

/// Servers for every probe target; keep them alive while probing.
pub struct ProbeServers {
    _tcp: Vec<TcpServer>,
    _udp: Vec<UdpServer>,
}

pub fn start_probe_servers(lab: &Lab, probes: &[Probe]) -> Result<ProbeServers> {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in probes {
        if !seen.insert((p.to, p.proto, p.port)) {
            continue;
        }
        let bind = sa(Ipv6Addr::UNSPECIFIED, p.port); // dual-stack: v4 and v6
        match p.proto {
            Proto::Tcp => tcp.push(TcpServer::start(lab, p.to, bind)?),
            Proto::Udp => udp.push(UdpServer::start(lab, p.to, bind)?),
        }
    }
    Ok(ProbeServers { _tcp: tcp, _udp: udp })
}

/// Runs one probe over IPv4 (or IPv6 with `v6`); true when it got an answer.
pub fn run_probe(lab: &Lab, p: &Probe, v6: bool, timeout: Duration) -> Result<bool> {
    let to = if v6 { sa(addr6(p.to), p.port) } else { sa(addr(p.to), p.port) };
    let msg = format!("{} {}", p.what, if v6 { "v6" } else { "v4" });
    Ok(match p.proto {
        Proto::Tcp => tcp_request(lab, p.from, to, &msg, timeout)? == Outcome::Answered,
        Proto::Udp => udp_request(lab, p.from, to, &msg, timeout)?,
    })
}

/// How long a probe that should be blocked waits for an answer.
pub const BLOCKED_TIMEOUT: Duration = Duration::from_millis(1200);

/// The workspace root (the tests crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `examples/lab.toml` with `mode` set, plus `extra` (TOML) appended.
pub fn lab_config(mode: &str, extra: &str) -> String {
    let text = std::fs::read_to_string(workspace_root().join("examples/lab.toml")).expect("examples/lab.toml");
    assert!(text.contains("mode = \"enforce\""), "examples/lab.toml must set mode = \"enforce\"");
    format!("{}\n{extra}\n", text.replace("mode = \"enforce\"", &format!("mode = \"{mode}\"")))
}

/// `config` with `ingress_hook` set (`"xdp"`, `"tc"`, `"auto"`): a top-level
/// key, so it goes right after `mode`.
pub fn with_hook(config: &str, hook: &str) -> String {
    let at = config.find("\nmode = ").expect("a lab config sets mode");
    let end = config[at + 1..].find('\n').map(|i| at + 1 + i).expect("a line end");
    format!("{}\ningress_hook = \"{hook}\"{}", &config[..end], &config[end..])
}

/// A site rule that opens TCP 9999 to the workstations (for reload tests).
pub const ALLOW_9999: &str = r#"
[[rule]]
name = "legacy-9999"
description = "test service"
direction = "inbound"
protocol = "tcp"
ports = [9999]
peers = ["workstations"]
"#;

/// A lab with every peer reachable, and a work dir holding the config.
pub struct TestLab {
    pub lab: Lab,
    pub work: PathBuf,
    pub config: PathBuf,
}

impl TestLab {
    /// A lab named `name` (made unique to this process) whose files live
    /// under `tmp/<prefix>`, with `config` as the pcguard config.
    pub fn up(name: &str, tmp: &Path, config: &str) -> Result<Self> {
        let prefix = unique_prefix(name);
        let lab = Lab::up(&prefix)?;
        for (host, _) in PEERS {
            lab.wait_reachable(host)?;
        }
        let work = tmp.join(&prefix);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let path = work.join("pcguard.toml");
        std::fs::write(&path, config)?;
        Ok(Self { lab, work, config: path })
    }

    /// Starts `pcguard run` on the lab with this config.
    pub fn start(&self, extra: &[&str]) -> Result<Daemon> {
        Daemon::start(&self.lab, &self.config, &self.work.join("daemon"), extra)
    }

    /// Replaces the config file (then signal the daemon to reload).
    pub fn write_config(&self, text: &str) -> Result<()> {
        Ok(std::fs::write(&self.config, text)?)
    }
}

/// From the workstation, a TCP request to the server's `port` over IPv4.
pub fn ws_reaches(lab: &Lab, port: u16) -> Result<bool> {
    let p = Probe { what: "workstation probe", from: "ws", to: SERVER, proto: Proto::Tcp, port, allowed: true };
    run_probe(lab, &p, false, BLOCKED_TIMEOUT)
}

/// Runs every sample probe over IPv4 and IPv6; returns (probe, v4, v6).
pub fn run_sample_probes(lab: &Lab) -> Result<Vec<(Probe, bool, bool)>> {
    let probes = sample_probes();
    let _servers = start_probe_servers(lab, &probes)?;
    probes
        .into_iter()
        .map(|p| Ok((p.clone(), run_probe(lab, &p, false, BLOCKED_TIMEOUT)?, run_probe(lab, &p, true, BLOCKED_TIMEOUT)?)))
        .collect()
}

/// Polls `f` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A small authoritative-style DNS server on UDP port 53 of a lab host:
/// answers A/AAAA queries for the names it was given, NXDOMAIN otherwise;
/// while silent, answers nothing (its queries stay pending).
pub struct DnsServer {
    silent: Arc<AtomicBool>,
    _thread: Background,
}

/// (name, address, ttl) records of a [`DnsServer`].
pub type DnsRecords = Vec<(String, IpAddr, u32)>;

impl DnsServer {
    pub fn start(lab: &Lab, host: &str, records: DnsRecords) -> Result<Self> {
        let sock = lab.run_in(host, || UdpSocket::bind(sa(Ipv6Addr::UNSPECIFIED, 53)))??;
        let silent = Arc::new(AtomicBool::new(false));
        let quiet = silent.clone();
        let thread = udp_responder(sock, move |query| {
            if quiet.load(Ordering::Relaxed) { None } else { dns_answer(query, &records) }
        })?;
        Ok(Self { silent, _thread: thread })
    }

    /// Stops (`true`) or resumes answering.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Relaxed);
    }
}

fn dns_name(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for l in name.split('.') {
        v.push(l.len() as u8);
        v.extend(l.as_bytes());
    }
    v.push(0);
    v
}

/// A query for `name` (type 1 = A, 28 = AAAA).
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend(dns_name(name));
    q.extend(qtype.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    q
}

/// A response to `dns_query(id, name, qtype)` naming `addrs` (A or AAAA
/// records by address family, owner a pointer to the question), with the
/// flags `0x8180` (QR, RD, RA, no error) unless changed by the caller.
pub fn dns_response(id: u16, name: &str, qtype: u16, addrs: &[(IpAddr, u32)]) -> Vec<u8> {
    let mut r = dns_query(id, name, qtype);
    r[2] = 0x81;
    r[3] = 0x80;
    r[6..8].copy_from_slice(&(addrs.len() as u16).to_be_bytes());
    for (addr, ttl) in addrs {
        dns_record(&mut r, *addr, *ttl);
    }
    r
}

/// Appends an A or AAAA record for the question's name (pointer to offset 12).
fn dns_record(r: &mut Vec<u8>, addr: IpAddr, ttl: u32) {
    let (rtype, data) = match addr {
        IpAddr::V4(a) => (1u16, a.octets().to_vec()),
        IpAddr::V6(a) => (28u16, a.octets().to_vec()),
    };
    r.extend([0xc0, 12]);
    r.extend(rtype.to_be_bytes());
    r.extend(1u16.to_be_bytes());
    r.extend(ttl.to_be_bytes());
    r.extend((data.len() as u16).to_be_bytes());
    r.extend(data);
}

fn dns_answer(query: &[u8], records: &DnsRecords) -> Option<Vec<u8>> {
    // Question: one name of plain labels after the 12-byte header.
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question = query.get(12..pos + 4)?;
    let name = labels.join(".");
    let matching: Vec<&(String, IpAddr, u32)> = records
        .iter()
        .filter(|(n, a, _)| *n == name && (qtype == 1) == a.is_ipv4() && (qtype == 1 || qtype == 28))
        .collect();
    let known = records.iter().any(|(n, _, _)| *n == name);
    let rcode = if known { 0 } else { 3 };
    let mut r = query.get(..2)?.to_vec();
    r.extend([0x81, 0x80 | rcode, 0, 1, 0, matching.len() as u8, 0, 0, 0, 0]);
    r.extend(question);
    for (_, addr, ttl) in matching {
        dns_record(&mut r, *addr, *ttl);
    }
    Some(r)
}

/// From `host`, resolves `name` (A or AAAA) with the resolver at `server`;
/// the answered addresses.
pub fn resolve(lab: &Lab, host: &str, server: IpAddr, name: &str, v6: bool) -> Result<Vec<IpAddr>> {
    let query = dns_query(0x4242, name, if v6 { 28 } else { 1 });
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let answer = lab.run_in(host, move || -> Result<Vec<u8>> {
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send_to(&query, sa(server, 53))?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).context("no DNS answer")?;
        Ok(buf[..n].to_vec())
    })??;
    let an = u16::from_be_bytes([answer[6], answer[7]]) as usize;
    let len = if v6 { 16 } else { 4 };
    // Each answer ends with its address; they are the last `an` records.
    let mut addrs = Vec::new();
    let mut end = answer.len();
    for _ in 0..an {
        let data = &answer[end - len..end];
        addrs.push(if v6 {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data)?))
        } else {
            IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3]))
        });
        end -= 12 + len;
    }
    Ok(addrs)
}

/// A DNS client socket in the server's namespace, so that a test knows
/// (and a spoofer can be told) the port and transaction id of a query.
pub struct DnsClient {
    sock: UdpSocket,
    resolver: SocketAddr,
}

impl DnsClient {
    /// A socket of the server on an ephemeral port, for `resolver`'s port 53.
    pub fn new(lab: &Lab, resolver: IpAddr) -> Result<Self> {
        let bind: SocketAddr = if resolver.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
        let sock = lab.run_in(SERVER, move || UdpSocket::bind(bind))??;
        Ok(Self { sock, resolver: sa(resolver, 53) })
    }

    /// The server's port of this client.
    pub fn port(&self) -> u16 {
        self.sock.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Sends a query (type 1 = A, 28 = AAAA).
    pub fn query(&self, id: u16, name: &str, qtype: u16) -> Result<()> {
        self.sock.send_to(&dns_query(id, name, qtype), self.resolver)?;
        Ok(())
    }

    /// The next datagram this socket receives within `timeout`.
    pub fn receive(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = [0u8; 2048];
        self.sock.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
    }
}

/// Sends hand-made IP packets from a lab host's eth0 straight to the
/// server's interface (a packet socket: any source address and port), the
/// way an attacker on the LAN spoofs a resolver.
pub struct RawSender {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
    server_mac: [u8; 6],
}

impl RawSender {
    pub fn new(lab: &Lab, host: &str) -> Result<Self> {
        let server_mac = lab.mac_bytes(SERVER, SERVER_IF)?;
        let (fd, ifindex) = lab.run_in(host, || -> Result<(std::os::fd::OwnedFd, i32)> {
            // SAFETY: plain socket(2); the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0) };
            ensure!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh fd we own.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
            ensure!(ifindex != 0, "eth0: {}", std::io::Error::last_os_error());
            Ok((fd, ifindex as i32))
        })??;
        Ok(Self { fd, ifindex, server_mac })
    }

    /// Sends one IP packet (version from its first nibble).
    pub fn send(&self, packet: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        let ethertype: u16 = if packet.first().is_some_and(|b| b >> 4 == 6) { 0x86dd } else { 0x0800 };
        to.sll_protocol = ethertype.to_be();
        to.sll_ifindex = self.ifindex;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&self.server_mac);
        // SAFETY: valid buffer and address of the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(n == packet.len() as isize, "sendto: {}", std::io::Error::last_os_error());
        Ok(())
    }
}

/// An IPv4 or IPv6 packet carrying one UDP datagram from `src` to `dst`
/// (checksums filled in).
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend(src.port().to_be_bytes());
    udp.extend(dst.port().to_be_bytes());
    udp.extend((udp_len as u16).to_be_bytes());
    udp.extend([0, 0]);
    udp.extend(payload);
    let mut pseudo = Vec::new();
    let mut ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend([0, 17]);
            pseudo.extend((udp_len as u16).to_be_bytes());
            let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
            h[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            h.extend(s.octets());
            h.extend(d.octets());
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend(s.octets());
            pseudo.extend(d.octets());
            pseudo.extend((udp_len as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, 17]);
            let mut h = vec![0x60, 0, 0, 0];
            h.extend((udp_len as u16).to_be_bytes());
            h.extend([17, 64]);
            h.extend(s.octets());
            h.extend(d.octets());
            h
        }
        _ => panic!("udp_packet: {src} and {dst} are of different families"),
    };
    pseudo.extend(&udp);
    let c = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    ip.extend(udp);
    ip
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

// ---------------------------------------------------------------------------
// Crafted frames (tests/attacks/pcgattack.py) and what reaches the victim.

/// A site rule that opens UDP 7000 to the workstations: an allowed UDP
/// service for the adversarial tests (legitimately fragmented datagrams,
/// tagged frames).
pub const ALLOW_UDP_7000: &str = r#"
[[rule]]
name = "test-udp-7000"
description = "test UDP service"
direction = "inbound"
protocol = "udp"
ports = [7000]
peers = ["workstations"]
"#;

impl Lab {
    /// The MAC address of `ifname` in lab host `host`.
    pub fn mac(&self, host: &str, ifname: &str) -> Result<String> {
        let out = sh("ip", &["-n", &self.ns(host), "-br", "link", "show", "dev", ifname])?;
        out.split_whitespace().nth(2).map(str::to_string).with_context(|| format!("no MAC in {out:?}"))
    }

    /// Drops the TCP resets `host`'s own kernel sends (nftables, in that
    /// namespace only): a process that completes handshakes with raw frames
    /// would otherwise be undercut by them (the kernel knows no such
    /// connection and resets it when the peer's SYN+ACK arrives).
    pub fn drop_own_resets(&self, host: &str) -> Result<()> {
        let ns = self.ns(host);
        sh("ip", &["netns", "exec", &ns, "nft", "add", "table", "inet", "pcgadv"])?;
        sh(
            "ip",
            &["netns", "exec", &ns, "nft", "add", "chain", "inet", "pcgadv", "out", "{ type filter hook output priority 0; }"],
        )?;
        sh("ip", &["netns", "exec", &ns, "nft", "add", "rule", "inet", "pcgadv", "out", "tcp", "flags", "&", "rst", "==", "rst", "drop"])?;
        Ok(())
    }
}

/// A process parked in a lab host's network namespace: through
/// `/proc/<pid>/net` any process can read that namespace's counters.
pub struct NsAnchor {
    child: Child,
}

impl NsAnchor {
    pub fn start(lab: &Lab, host: &str) -> Result<Self> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", lab.ns_path(host).display()))
            .args(["sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .context("starting nsenter sleep")?;
        let a = NsAnchor { child };
        // nsenter execs sleep once it has entered the namespace.
        wait_until("the anchor to enter its namespace", Duration::from_secs(5), || {
            Ok(std::fs::read_link(format!("/proc/{}/exe", a.child.id()))
                .map(|p| p.to_string_lossy().ends_with("sleep"))
                .unwrap_or(false))
        })?;
        Ok(a)
    }

    /// `/proc/<pid>/net`: snmp, snmp6, ... of the namespace.
    pub fn net_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/net", self.child.id()))
    }

    pub fn snmp(&self) -> Result<Snmp> {
        read_snmp(&self.net_dir())
    }
}

impl Drop for NsAnchor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SNMP counters by name: `Tcp.InSegs`, `Udp.NoPorts`, `Ip6.ReasmOKs`,
/// `Udp6.InDatagrams`... (the names of pcgattack.py's per-case deltas).
pub type Snmp = std::collections::BTreeMap<String, i64>;

/// The SNMP counters of a namespace (`snmp` and `snmp6` under `net_dir`).
pub fn read_snmp(net_dir: &Path) -> Result<Snmp> {
    let mut out = Snmp::new();
    let snmp = std::fs::read_to_string(net_dir.join("snmp"))?;
    let lines: Vec<&str> = snmp.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let proto = names.split(':').next().unwrap_or_default();
        for (k, v) in names.split_whitespace().skip(1).zip(values.split_whitespace().skip(1)) {
            out.insert(format!("{proto}.{k}"), v.parse()?);
        }
    }
    for line in std::fs::read_to_string(net_dir.join("snmp6"))?.lines() {
        let mut it = line.split_whitespace();
        let (Some(name), Some(v)) = (it.next(), it.next()) else { continue };
        if let Some(prefix) = ["Ip6", "Icmp6", "UdpLite6", "Udp6"].into_iter().find(|p| name.starts_with(p)) {
            out.insert(format!("{prefix}.{}", &name[prefix.len()..]), v.parse()?);
        }
    }
    Ok(out)
}

/// Counters that move only when a datagram reached a transport protocol,
/// a socket or the reassembly's end: with nothing else talking in the
/// namespace, any change means something got through. (Not `InReceives`:
/// a non-first fragment alone is passed by design and waits in the
/// reassembly queue; not ICMP or neighbour discovery counters.)
pub const DELIVERY_COUNTERS: [&str; 13] = [
    "Tcp.InSegs",
    "Tcp.PassiveOpens",
    "Tcp.OutRsts",
    "Udp.InDatagrams",
    "Udp.NoPorts",
    "Udp.InErrors",
    "Ip.ReasmOKs",
    "Ip.InUnknownProtos",
    "Udp6.InDatagrams",
    "Udp6.NoPorts",
    "Udp6.InErrors",
    "Ip6.ReasmOKs",
    "Ip6.InUnknownProtos",
];

/// Counter changes between two readings, `DELIVERY_COUNTERS` only.
pub fn delivery_delta(before: &Snmp, after: &Snmp) -> Vec<(String, i64)> {
    DELIVERY_COUNTERS
        .iter()
        .map(|k| (k.to_string(), after.get(*k).copied().unwrap_or(0) - before.get(*k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d != 0)
        .collect()
}

/// Something that reached a listener of [`Sinks`].
#[derive(Clone, Debug)]
pub struct Arrival {
    pub proto: Proto,
    /// The listener's port.
    pub port: u16,
    /// The sender (IPv4-mapped addresses unmapped).
    pub peer: SocketAddr,
    /// TCP: the bytes read from the accepted connection; UDP: the datagram.
    pub data: Vec<u8>,
}

/// Listeners on `[::]` (IPv4 and IPv6) in one lab host that accept every
/// connection, read what it sends, receive every datagram, and record it
/// all. They never answer: an accept() returning is the observable.
pub struct Sinks {
    arrivals: Arc<std::sync::Mutex<Vec<Arrival>>>,
    _threads: Vec<Background>,
}

impl Sinks {
    pub fn start(lab: &Lab, host: &str, tcp: &[u16], udp: &[u16]) -> Result<Self> {
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for &port in tcp {
            let listener = lab.run_in(host, move || TcpListener::bind(sa(Ipv6Addr::UNSPECIFIED, port)))??;
            listener.set_nonblocking(true)?;
            let arrivals = arrivals.clone();
            threads.push(Background::spawn(move || match listener.accept() {
                Ok((s, peer)) => {
                    let index = {
                        let mut a = arrivals.lock().unwrap();
                        a.push(Arrival { proto: Proto::Tcp, port, peer: unmapped(peer), data: Vec::new() });
                        a.len() - 1
                    };
                    let arrivals = arrivals.clone();
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                        let mut buf = [0u8; 512];
                        let mut s = s;
                        while let Ok(n @ 1..) = s.read(&mut buf) {
                            arrivals.lock().unwrap()[index].data.extend_from_slice(&buf[..n]);
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }));
        }
        for &port in udp {
            let sock = lab.run_in(host, move || UdpSocket::bind(sa(Ipv6Addr::UNSPECIFIED, port)))??;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let arrivals = arrivals.clone();
            let mut buf = vec![0u8; 65536];
            threads.push(Background::spawn(move || {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let a = Arrival { proto: Proto::Udp, port, peer: unmapped(peer), data: buf[..n].to_vec() };
                    arrivals.lock().unwrap().push(a);
                }
            }));
        }
        Ok(Self { arrivals, _threads: threads })
    }

    /// Everything recorded so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.arrivals.lock().unwrap().clear();
    }
}

fn unmapped(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// One run of `tests/attacks/pcgattack.py` in the namespace of `attacker`
/// (sending on `iface`) against `victim` (`victim_if`'s MAC; its counters
/// through `anchor`, an [`NsAnchor`] in the victim's namespace).
pub struct AttackRun<'a> {
    pub attacker: &'a str,
    pub iface: &'a str,
    pub victim: &'a str,
    pub victim_if: &'a str,
    pub groups: &'a [&'a str],
    /// `tcp_denied`, `udp_denied`, `tcp_allowed`, `udp_allowed`, `service`,
    /// `tcp_spare` (see the script's doc).
    pub ports: serde_json::Value,
    /// Case ids start here (markers must be unique within a lab's life).
    pub first_id: u64,
    /// How long a control waits for its handshake (0 for attacks).
    pub handshake_wait_ms: u64,
    pub vxlan: Option<serde_json::Value>,
}

/// The outcome of one crafted case, as pcgattack.py reports it.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub id: u64,
    pub group: String,
    pub name: String,
    pub family: u8,
    pub proto: String,
    pub sport: u16,
    pub dport: u16,
    pub marker: String,
    /// The victim answered a TCP opening with SYN+ACK, and the script
    /// completed the handshake.
    pub synack: bool,
    pub completed: bool,
    /// TCP, UDP and ICMP-error packets the victim sent the attacker.
    pub answers: Vec<String>,
    /// The victim's SNMP counter changes during the case.
    pub delta: Snmp,
    /// Sends that failed (from the server: ENOBUFS when pcguard's TC hook
    /// dropped the frame).
    pub send_errors: Vec<String>,
    /// The frames sent (hex) and scapy's reading of them.
    pub frames: Vec<String>,
    pub scapy: Vec<String>,
}

impl CaseResult {
    fn from_json(v: &serde_json::Value) -> Result<Self> {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let u = |k: &str| v[k].as_u64().unwrap_or_default();
        let strings = |k: &str| -> Vec<String> {
            v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
        };
        let delta = v["delta"]
            .as_object()
            .context("case without delta")?
            .iter()
            .map(|(k, n)| (k.clone(), n.as_i64().unwrap_or_default()))
            .collect();
        Ok(Self {
            id: u("id"),
            group: s("group"),
            name: s("name"),
            family: u("family") as u8,
            proto: s("proto"),
            sport: u("sport") as u16,
            dport: u("dport") as u16,
            marker: s("marker"),
            synack: v["synack"].as_bool().unwrap_or_default(),
            completed: v["completed"].as_bool().unwrap_or_default(),
            answers: strings("answers"),
            delta,
            send_errors: strings("send_errors"),
            frames: strings("frames"),
            scapy: strings("scapy"),
        })
    }

    /// The arrivals at the victim's listeners this case caused: its marker
    /// in the data, or (a TCP connection that sent nothing yet) its ports.
    pub fn arrivals<'a>(&self, all: &'a [Arrival], attacker: IpAddr) -> Vec<&'a Arrival> {
        let tag = format!("{}\n", self.marker);
        all.iter()
            .filter(|a| {
                a.data.windows(tag.len()).any(|w| w == tag.as_bytes())
                    || (a.data.is_empty()
                        && a.proto == Proto::Tcp
                        && self.proto == "tcp"
                        && a.port == self.dport
                        && a.peer.port() == self.sport
                        && a.peer.ip() == attacker)
            })
            .collect()
    }

    /// Everything that says the case reached the victim: a listener got it,
    /// a handshake completed, the victim answered, a delivery counter moved.
    pub fn evidence(&self, all: &[Arrival], attacker: IpAddr) -> Vec<String> {
        let mut e: Vec<String> = self
            .arrivals(all, attacker)
            .iter()
            .map(|a| format!("{:?} listener {} got {} bytes from {}", a.proto, a.port, a.data.len(), a.peer))
            .collect();
        if self.completed {
            e.push("handshake completed (victim sent SYN+ACK)".into());
        }
        e.extend(self.answers.iter().map(|a| format!("victim answered: {a}")));
        e.extend(
            DELIVERY_COUNTERS
                .iter()
                .filter_map(|k| self.delta.get(*k).filter(|d| **d != 0).map(|d| format!("{k} {d:+}"))),
        );
        e
    }

    /// The frames, for a report.
    pub fn describe(&self) -> String {
        let mut s = format!("#{} [{}] {}", self.id, self.group, self.name);
        if !self.send_errors.is_empty() {
            s.push_str(&format!(" (send errors: {:?})", self.send_errors));
        }
        for (hex, scapy) in self.frames.iter().zip(&self.scapy) {
            s.push_str(&format!("\n    frame {hex}\n    scapy {scapy}"));
        }
        s
    }
}

/// What an [`AttackRun`] did.
pub struct AttackOutcome {
    pub cases: Vec<CaseResult>,
    /// The victim's delivery counters that moved over the whole run.
    pub counters: Vec<(String, i64)>,
}

impl AttackRun<'_> {
    /// Sends every case of `groups`, one after another.
    pub fn run(&self, lab: &Lab, anchor: &NsAnchor, run_tag: &str) -> Result<AttackOutcome> {
        let last = |h: &str| -> (String, String) { (addr(h).to_string(), addr6(h).to_string()) };
        let (my4, my6) = last(self.attacker);
        let (v4, v6) = last(self.victim);
        let spec = serde_json::json!({
            "iface": self.iface,
            "run": run_tag,
            "first_id": self.first_id,
            "settle_ms": 25,
            "handshake_wait_ms": self.handshake_wait_ms,
            "me": {"mac": lab.mac(self.attacker, self.iface)?, "v4": my4, "v6": my6},
            "victim": {"mac": lab.mac(self.victim, self.victim_if)?, "v4": v4, "v6": v6,
                       "net_dir": anchor.net_dir()},
            "ports": self.ports,
            "vxlan": self.vxlan,
            "groups": self.groups,
        });
        let before = anchor.snmp()?;
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", lab.ns_path(self.attacker).display()))
            .arg("/usr/bin/python3")
            .arg(workspace_root().join("tests/attacks/pcgattack.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pcgattack.py (python3-scapy installed? `cargo xtask deps`)")?;
        child.stdin.take().context("stdin")?.write_all(spec.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "pcgattack.py failed: {}", String::from_utf8_lossy(&out.stderr));
        // Late effects (a handshake finishing) land before the second reading.
        std::thread::sleep(Duration::from_millis(200));
        let counters = delivery_delta(&before, &anchor.snmp()?);
        let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).context("pcgattack.py output")?;
        let cases = cases.iter().map(CaseResult::from_json).collect::<Result<Vec<_>>>()?;
        ensure!(!cases.is_empty(), "pcgattack.py ran no case for {:?}", self.groups);
        Ok(AttackOutcome { cases, counters })
    }
}
