//! The lab's topology: network namespaces joined by a bridge (veth pairs),
//! standing for a PaperCut server and its peers, and running code inside
//! them.
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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::daemon::pcguard_bin;

/// A peer of the lab: short name, last address byte.
pub const PEERS: [(&str, u8); 7] = [("ws", 2), ("mfd", 3), ("sec", 4), ("ldap", 5), ("db", 6), ("adm", 7), ("out", 99)];
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
            &[
                "-n",
                &lan,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
                "nf_call_ip6tables",
                "0",
                "nf_call_arptables",
                "0",
            ],
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

/// Polls `f` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

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
            &[
                "netns",
                "exec",
                &ns,
                "nft",
                "add",
                "chain",
                "inet",
                "pcgadv",
                "out",
                "{ type filter hook output priority 0; }",
            ],
        )?;
        sh(
            "ip",
            &[
                "netns", "exec", &ns, "nft", "add", "rule", "inet", "pcgadv", "out", "tcp", "flags", "&", "rst", "==",
                "rst", "drop",
            ],
        )?;
        Ok(())
    }
}
