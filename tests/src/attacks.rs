//! Crafted frames (tests/attacks/pcgattack.py) and what reaches the
//! victim: its SNMP counters (through a process parked in its namespace)
//! and the listeners of [`crate::traffic::Sinks`].

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    daemon::workspace_root,
    lab::{Lab, addr, addr6, wait_until},
    traffic::{Arrival, Proto},
};

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
            v[k].as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
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
