//! Traffic in the lab: TCP and UDP servers and clients, the sample probes
//! of the lab policy, raw frames from a packet socket, listeners that
//! record what reaches them; [`probes`]: long-running streams and floods.

use std::{
    io::{Read, Write},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Result, ensure};

use crate::lab::{Lab, SERVER, SERVER_IF, addr, addr6, sa};

pub mod probes;

/// The frame builders' IP/UDP packet with checksums, for [`RawSender`].
pub use pcguard_testkit::frame::udp_packet;

/// A thread running `step` in a loop until dropped (the servers below).
/// `step` must return within a short time (its sockets have timeouts).
pub(crate) struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    pub(crate) fn spawn(mut step: impl FnMut() + Send + 'static) -> Self {
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
pub(crate) fn udp_responder(
    sock: UdpSocket,
    answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
) -> Result<Background> {
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
        .map(|p| {
            Ok((p.clone(), run_probe(lab, &p, false, BLOCKED_TIMEOUT)?, run_probe(lab, &p, true, BLOCKED_TIMEOUT)?))
        })
        .collect()
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
