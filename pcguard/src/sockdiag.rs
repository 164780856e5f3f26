//! The kernel's table of TCP and UDP sockets in this network namespace,
//! read the way `ss` reads it (`NETLINK_SOCK_DIAG`, inet_diag): the
//! connections that were already open when pcguard starts, so that the
//! daemon can seed conntrack with them before the programs see a packet
//! (docs/datapath.md, "Connections open before pcguard attaches").
//!
//! The netlink messages are written and parsed here with plain byte
//! reads: the structures are small and stable kernel ABI
//! (`linux/netlink.h`, `linux/inet_diag.h`), and every length is checked,
//! so a short or odd message is an error, never a panic.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use log::{debug, warn};

use crate::{
    model::{Direction, Protocol},
    sys,
};

/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`): the request and reply type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_V2_LEN: usize = 56;
/// `struct inet_diag_msg` (attributes may follow; none are asked for).
const DIAG_MSG_LEN: usize = 72;
/// Offset of `struct inet_diag_sockid` in `inet_diag_msg`.
const SOCKID_OFFSET: usize = 4;

/// TCP states (`include/net/tcp_states.h`); UDP sockets use `ESTABLISHED`
/// (connected) and `CLOSE` (not connected).
const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_SENT: u8 = 2;
const TCP_SYN_RECV: u8 = 3;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSING: u8 = 11;
/// A request socket (a handshake a listener is answering).
const TCP_NEW_SYN_RECV: u8 = 12;

/// TCP states whose connection can still carry packets in both directions
/// (TIME_WAIT cannot: it only answers a retransmitted FIN).
const TCP_CONNECTED: [u8; 9] = [
    TCP_ESTABLISHED,
    TCP_SYN_SENT,
    TCP_SYN_RECV,
    TCP_NEW_SYN_RECV,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_CLOSE_WAIT,
    TCP_LAST_ACK,
    TCP_CLOSING,
];

/// How long one dump may wait for the kernel's next reply.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// Dumps the kernel marks inconsistent (`NLM_F_DUMP_INTR`: the table
/// changed meanwhile) are tried again this many times in all.
const DUMP_ATTEMPTS: usize = 3;
/// Sockets one dump may return: bounds the memory a runaway reply takes
/// (far above what conntrack, 256 Ki entries, could be seeded with).
const MAX_SOCKETS: usize = 4 * pcguard_common::CONNTRACK_ENTRIES as usize;

/// A connection open in this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    pub protocol: Protocol,
    /// Who opened it: a peer (`Inbound`) or this host (`Outbound`).
    pub direction: Direction,
    /// This host's end; IPv4-mapped IPv6 addresses are given as IPv4, as
    /// the packets carry them.
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Connection {
    /// The port the connection was opened to: the rule's port.
    pub fn service_port(&self) -> u16 {
        match self.direction {
            Direction::Inbound => self.local.port(),
            Direction::Outbound => self.remote.port(),
        }
    }
}

impl std::fmt::Display for Connection {
    /// `inbound tcp 10.77.0.2:41234 -> 10.77.0.1:9191` (initiator first).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (from, to) = match self.direction {
            Direction::Inbound => (self.remote, self.local),
            Direction::Outbound => (self.local, self.remote),
        };
        write!(f, "{} {} {from} -> {to}", self.direction.as_str(), self.protocol.as_str())
    }
}

/// The TCP and UDP connections open in this network namespace (both
/// address families), loopback and self-connections left out: they never
/// cross an interface pcguard attaches to. A table that cannot be read
/// (e.g. the `udp_diag` module is missing) is logged and skipped: the
/// connections it holds are then not seeded.
pub fn connections() -> Vec<Connection> {
    let mut out = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let mut sockets = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            match dump(family as u8, protocol) {
                Ok(s) => sockets.extend(s),
                Err(e) => warn!(
                    "reading the {} {} socket table failed ({e:#}): its connections are not seeded into conntrack",
                    family_name(family),
                    protocol.as_str()
                ),
            }
        }
        out.extend(classify(protocol, &sockets));
    }
    out
}

fn family_name(family: libc::c_int) -> &'static str {
    if family == libc::AF_INET { "IPv4" } else { "IPv6" }
}

/// One socket of a dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DiagSocket {
    state: u8,
    local: SocketAddr,
    remote: SocketAddr,
}

/// The state mask a dump of `protocol` asks for: connections and the
/// sockets that tell accepted connections from opened ones (TCP
/// listeners, unconnected UDP sockets).
fn state_mask(protocol: Protocol) -> u32 {
    let states: &[u8] = match protocol {
        Protocol::Tcp => &TCP_CONNECTED,
        Protocol::Udp => &[TCP_ESTABLISHED, TCP_CLOSE],
    };
    let mask = states.iter().fold(0u32, |m, &s| m | 1 << s);
    if protocol == Protocol::Tcp { mask | 1 << TCP_LISTEN } else { mask }
}

/// Sorts one protocol's sockets into connections with their direction.
///
/// TCP: SYN_SENT is this host opening; SYN_RECV a peer opening; any other
/// connection is inbound when a listener holds its local port on its
/// local address or the wildcard (an accepted connection), else outbound.
/// UDP: a connected socket is inbound when an unconnected socket holds its
/// local port the same way, else outbound. A wildcard of either family
/// counts for both (a dual-stack `[::]` listener serves IPv4 too).
fn classify(protocol: Protocol, sockets: &[DiagSocket]) -> Vec<Connection> {
    let sockets: Vec<DiagSocket> = sockets.iter().map(canonical).collect();
    let listeners: HashSet<(IpAddr, u16)> =
        sockets.iter().filter(|s| is_listener(protocol, s)).map(|s| (s.local.ip(), s.local.port())).collect();
    let listens = |local: SocketAddr| {
        let wildcards = [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
        std::iter::once(local.ip()).chain(wildcards).any(|ip| listeners.contains(&(ip, local.port())))
    };
    let mut seen = HashSet::new();
    sockets
        .iter()
        .filter(|s| is_connection(protocol, s) && crosses_an_interface(s))
        .map(|s| {
            let direction = match (protocol, s.state) {
                (Protocol::Tcp, TCP_SYN_SENT) => Direction::Outbound,
                (Protocol::Tcp, TCP_SYN_RECV | TCP_NEW_SYN_RECV) => Direction::Inbound,
                _ if listens(s.local) => Direction::Inbound,
                _ => Direction::Outbound,
            };
            Connection { protocol, direction, local: s.local, remote: s.remote }
        })
        .filter(|c| seen.insert((c.local, c.remote)))
        .collect()
}

/// IPv4-mapped addresses (`::ffff:a.b.c.d`, how a dual-stack socket
/// reports an IPv4 peer) as IPv4.
fn canonical(s: &DiagSocket) -> DiagSocket {
    let c = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    DiagSocket { state: s.state, local: c(s.local), remote: c(s.remote) }
}

fn is_listener(protocol: Protocol, s: &DiagSocket) -> bool {
    match protocol {
        Protocol::Tcp => s.state == TCP_LISTEN,
        Protocol::Udp => s.remote.port() == 0,
    }
}

fn is_connection(protocol: Protocol, s: &DiagSocket) -> bool {
    let has_peer = s.remote.port() != 0 && !s.remote.ip().is_unspecified();
    match protocol {
        Protocol::Tcp => has_peer && TCP_CONNECTED.contains(&s.state),
        Protocol::Udp => has_peer,
    }
}

/// Loopback connections, and a host's connections to its own address, go
/// over `lo`: pcguard never sees their packets.
fn crosses_an_interface(s: &DiagSocket) -> bool {
    !s.local.ip().is_loopback() && !s.remote.ip().is_loopback() && s.local.ip() != s.remote.ip()
}

/// The sockets of one (family, protocol) table. A dump the kernel marks
/// interrupted is tried again; the last attempt is used as it is.
fn dump(family: u8, protocol: Protocol) -> Result<Vec<DiagSocket>> {
    let ipproto = match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP,
        Protocol::Udp => libc::IPPROTO_UDP,
    } as u8;
    let mut attempt = 1;
    loop {
        let (sockets, interrupted) = dump_once(family, ipproto, state_mask(protocol))?;
        if !interrupted {
            return Ok(sockets);
        }
        if attempt == DUMP_ATTEMPTS {
            warn!("the socket table kept changing while it was read; using the last reading");
            return Ok(sockets);
        }
        debug!("socket dump interrupted (table changed); reading it again");
        attempt += 1;
    }
}

/// One dump on a fresh netlink socket; also whether it was interrupted.
fn dump_once(family: u8, ipproto: u8, states: u32) -> Result<(Vec<DiagSocket>, bool)> {
    const SEQ: u32 = 1;
    let fd = netlink_socket()?;
    send_request(&fd, &request(family, ipproto, states, SEQ))?;
    let mut dump = Dump::default();
    let mut buf = vec![0u8; 64 * 1024];
    while !dump.done {
        let n = recv(&fd, &mut buf)?;
        parse_datagram(&buf[..n], SEQ, &mut dump)?;
        if dump.sockets.len() > MAX_SOCKETS {
            bail!("more than {MAX_SOCKETS} sockets in one dump");
        }
    }
    Ok((dump.sockets, dump.interrupted))
}

fn netlink_socket() -> Result<OwnedFd> {
    let fd = sys::netlink_socket(libc::NETLINK_SOCK_DIAG).context("opening a NETLINK_SOCK_DIAG socket")?;
    sys::set_recv_timeout(fd.as_fd(), RECV_TIMEOUT).context("setting SO_RCVTIMEO on the netlink socket")?;
    Ok(fd)
}

fn send_request(fd: &OwnedFd, req: &[u8]) -> Result<()> {
    let n = sys::netlink_send_to_kernel(fd.as_fd(), req).context("sending the socket dump request")?;
    if n != req.len() {
        bail!("socket dump request sent short ({n} of {} bytes)", req.len());
    }
    Ok(())
}

/// One datagram; an error if it did not fit `buf` (`MSG_TRUNC` makes the
/// kernel return its full length).
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize> {
    loop {
        let n = match sys::recv_datagram(fd.as_fd(), buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the socket dump"),
        };
        if n > buf.len() {
            bail!("socket dump datagram of {n} bytes truncated to {}", buf.len());
        }
        return Ok(n);
    }
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for every socket of `family`
/// and `ipproto` in one of `states` (a mask of `1 << state`), without
/// extensions.
fn request(family: u8, ipproto: u8, states: u32, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + REQ_V2_LEN);
    m.extend(((NLMSG_HDRLEN + REQ_V2_LEN) as u32).to_ne_bytes());
    m.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    m.extend(seq.to_ne_bytes());
    m.extend(0u32.to_ne_bytes()); // port id: 0, the kernel fills it in
    m.extend([family, ipproto, 0, 0]); // idiag_ext: none; pad
    m.extend(states.to_ne_bytes());
    m.resize(NLMSG_HDRLEN + REQ_V2_LEN, 0); // inet_diag_sockid: all zero, no filter
    m
}

/// What the datagrams of one dump have given so far.
#[derive(Debug, Default)]
struct Dump {
    sockets: Vec<DiagSocket>,
    /// `NLMSG_DONE` seen.
    done: bool,
    /// A message carried `NLM_F_DUMP_INTR`.
    interrupted: bool,
}

/// Reads the netlink messages of one datagram into `dump`. Messages of
/// another sequence number are skipped; a message that runs past the
/// datagram, a kernel error and a short socket record are errors.
fn parse_datagram(mut buf: &[u8], seq: u32, dump: &mut Dump) -> Result<()> {
    while !buf.is_empty() && !dump.done {
        let (Some(len), Some(kind), Some(flags), Some(msg_seq)) =
            (u32_at(buf, 0), u16_at(buf, 4), u16_at(buf, 6), u32_at(buf, 8))
        else {
            bail!("netlink message header cut short ({} bytes)", buf.len());
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            bail!("netlink message length {len} outside 16..={}", buf.len());
        }
        if msg_seq == seq {
            if flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                dump.interrupted = true;
            }
            message(kind, &buf[NLMSG_HDRLEN..len], dump)?;
        }
        // Messages are 4-byte aligned; the last one may end unpadded.
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(())
}

/// One netlink message of the dump (`payload` after its header).
fn message(kind: u16, payload: &[u8], dump: &mut Dump) -> Result<()> {
    match i32::from(kind) {
        libc::NLMSG_DONE => {
            // A dump ends with its status: 0, or a negative errno.
            if let Some(status) = i32_at(payload, 0)
                && status < 0
            {
                return Err(io::Error::from_raw_os_error(status.wrapping_neg())).context("socket dump failed");
            }
            dump.done = true;
        }
        libc::NLMSG_ERROR => {
            let Some(error) = i32_at(payload, 0) else { bail!("netlink error message cut short") };
            // 0 is an acknowledgement (not asked for): nothing to do.
            if error != 0 {
                return Err(io::Error::from_raw_os_error(error.wrapping_neg())).context("socket dump refused");
            }
        }
        libc::NLMSG_OVERRUN => bail!("netlink reported lost messages in the socket dump"),
        _ if kind == SOCK_DIAG_BY_FAMILY => {
            let Some(s) = diag_msg(payload)? else { return Ok(()) };
            dump.sockets.push(s);
        }
        _ => {} // NLMSG_NOOP and anything newer
    }
    Ok(())
}

/// An `inet_diag_msg`: `None` for a family other than IPv4/IPv6.
fn diag_msg(p: &[u8]) -> Result<Option<DiagSocket>> {
    if p.len() < DIAG_MSG_LEN {
        bail!("inet_diag_msg of {} bytes (at least {DIAG_MSG_LEN})", p.len());
    }
    let (family, state) = (p[0], p[1]);
    let id = &p[SOCKID_OFFSET..SOCKID_OFFSET + 48];
    // inet_diag_sockid: sport, dport (big-endian), src[16], dst[16], ...
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |b: &[u8]| -> Option<IpAddr> {
        match i32::from(family) {
            libc::AF_INET => Some(IpAddr::from(<[u8; 4]>::try_from(&b[..4]).ok()?)),
            libc::AF_INET6 => Some(IpAddr::from(<[u8; 16]>::try_from(&b[..16]).ok()?)),
            _ => None,
        }
    };
    let (Some(src), Some(dst)) = (addr(&id[4..20]), addr(&id[20..36])) else { return Ok(None) };
    Ok(Some(DiagSocket { state, local: SocketAddr::new(src, sport), remote: SocketAddr::new(dst, dport) }))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    u32_at(b, at).map(|v| v as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sock(state: u8, local: &str, remote: &str) -> DiagSocket {
        DiagSocket { state, local: sa(local), remote: sa(remote) }
    }

    /// A netlink message: header (`len` counts the payload) + payload.
    fn nlmsg(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend(flags.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(4242u32.to_ne_bytes());
        m.extend(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    /// An `inet_diag_msg` as the kernel writes it, plus one attribute.
    fn diag(family: u8, state: u8, src: &[u8], sport: u16, dst: &[u8], dport: u16) -> Vec<u8> {
        let mut p = vec![family, state, 0, 0];
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        let mut a = [0u8; 32];
        a[..src.len()].copy_from_slice(src);
        a[16..16 + dst.len()].copy_from_slice(dst);
        p.extend(a);
        p.extend([0u8; 12]); // if, cookie
        p.extend([0u8; 20]); // expires, rqueue, wqueue, uid, inode
        assert_eq!(p.len(), DIAG_MSG_LEN);
        // An INET_DIAG_SKV6ONLY attribute (rtattr of 5 bytes, padded): ignored.
        p.extend(5u16.to_ne_bytes());
        p.extend(11u16.to_ne_bytes());
        p.extend([1, 0, 0, 0]);
        p
    }

    fn diag_v4(state: u8, local: [u8; 4], lport: u16, remote: [u8; 4], rport: u16) -> Vec<u8> {
        nlmsg(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_MULTI as u16,
            1,
            &diag(libc::AF_INET as u8, state, &local, lport, &remote, rport),
        )
    }

    fn done(status: i32) -> Vec<u8> {
        nlmsg(libc::NLMSG_DONE as u16, libc::NLM_F_MULTI as u16, 1, &status.to_ne_bytes())
    }

    fn error(errno: i32) -> Vec<u8> {
        let mut p = (-errno).to_ne_bytes().to_vec();
        p.extend(request(2, 6, 0, 1)[..NLMSG_HDRLEN].iter()); // the request's header, echoed
        nlmsg(libc::NLMSG_ERROR as u16, 0, 1, &p)
    }

    #[test]
    fn the_request_is_a_dump_of_one_family_and_protocol() {
        let r = request(libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8, state_mask(Protocol::Tcp), 7);
        assert_eq!(r.len(), 16 + 56);
        assert_eq!(u32_at(&r, 0), Some(72));
        assert_eq!(u16_at(&r, 4), Some(20));
        assert_eq!(u16_at(&r, 6), Some(0x301)); // NLM_F_REQUEST | NLM_F_DUMP
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(&r[16..20], &[10, 6, 0, 0]);
        // ESTABLISHED..FIN_WAIT2, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING, NEW_SYN_RECV; not TIME_WAIT or CLOSE.
        assert_eq!(u32_at(&r, 20), Some(0b1_1111_0011_1110));
        assert!(r[24..].iter().all(|&b| b == 0));
        assert_eq!(state_mask(Protocol::Udp), 1 << 1 | 1 << 7);
    }

    #[test]
    fn a_multi_part_dump_is_read_until_done() {
        let mut first = diag_v4(TCP_ESTABLISHED, [10, 77, 0, 1], 40000, [10, 77, 0, 5], 389);
        first.extend(diag_v4(TCP_LISTEN, [0, 0, 0, 0], 9191, [0, 0, 0, 0], 0));
        let mut dump = Dump::default();
        parse_datagram(&first, 1, &mut dump).unwrap();
        assert!(!dump.done);
        let mut second = nlmsg(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_MULTI as u16,
            1,
            &diag(
                libc::AF_INET6 as u8,
                TCP_ESTABLISHED,
                &Ipv6Addr::from([0xfd77, 0, 0, 0, 0, 0, 0, 1]).octets(),
                9191,
                &Ipv6Addr::from([0xfd77, 0, 0, 0, 0, 0, 0, 2]).octets(),
                50000,
            ),
        );
        second.extend(done(0));
        second.extend(diag_v4(TCP_ESTABLISHED, [1, 1, 1, 1], 1, [2, 2, 2, 2], 2)); // after DONE: ignored
        parse_datagram(&second, 1, &mut dump).unwrap();
        assert!(dump.done && !dump.interrupted);
        assert_eq!(
            dump.sockets,
            [
                sock(TCP_ESTABLISHED, "10.77.0.1:40000", "10.77.0.5:389"),
                sock(TCP_LISTEN, "0.0.0.0:9191", "0.0.0.0:0"),
                sock(TCP_ESTABLISHED, "[fd77::1]:9191", "[fd77::2]:50000"),
            ]
        );
    }

    #[test]
    fn other_sequence_numbers_noop_and_unknown_families_are_skipped() {
        let mut d = nlmsg(SOCK_DIAG_BY_FAMILY, 0, 99, &diag(2, 1, &[1, 2, 3, 4], 1, &[5, 6, 7, 8], 2));
        d.extend(nlmsg(libc::NLMSG_NOOP as u16, 0, 1, &[]));
        d.extend(nlmsg(SOCK_DIAG_BY_FAMILY, 0, 1, &diag(libc::AF_UNIX as u8, 1, &[], 0, &[], 0)));
        d.extend(nlmsg(libc::NLMSG_DONE as u16, 0, 1, &[])); // DONE without a status
        let mut dump = Dump::default();
        parse_datagram(&d, 1, &mut dump).unwrap();
        assert!(dump.done);
        assert!(dump.sockets.is_empty());
    }

    #[test]
    fn an_interrupted_dump_is_flagged() {
        let mut d = nlmsg(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_MULTI | libc::NLM_F_DUMP_INTR) as u16,
            1,
            &diag(2, 1, &[1, 2, 3, 4], 1, &[5, 6, 7, 8], 2),
        );
        d.extend(done(0));
        let mut dump = Dump::default();
        parse_datagram(&d, 1, &mut dump).unwrap();
        assert!(dump.done && dump.interrupted);
        assert_eq!(dump.sockets.len(), 1);
    }

    #[test]
    fn kernel_errors_are_errors() {
        let e = parse_datagram(&error(libc::ENOENT), 1, &mut Dump::default()).unwrap_err();
        assert!(format!("{e:#}").contains("refused"), "{e:#}");
        let e = parse_datagram(&done(-libc::EINTR), 1, &mut Dump::default()).unwrap_err();
        assert!(format!("{e:#}").contains("dump failed"), "{e:#}");
        let overrun = nlmsg(libc::NLMSG_OVERRUN as u16, 0, 1, &[]);
        assert!(parse_datagram(&overrun, 1, &mut Dump::default()).is_err());
        // An acknowledgement (error 0) is not an error.
        let mut d = error(0);
        d.extend(done(0));
        let mut dump = Dump::default();
        parse_datagram(&d, 1, &mut dump).unwrap();
        assert!(dump.done);
        // i32::MIN as an "errno" does not overflow.
        let weird = nlmsg(libc::NLMSG_ERROR as u16, 0, 1, &i32::MIN.to_ne_bytes());
        assert!(parse_datagram(&weird, 1, &mut Dump::default()).is_err());
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let good = {
            let mut d = diag_v4(TCP_ESTABLISHED, [10, 0, 0, 1], 1, [10, 0, 0, 2], 2);
            d.extend(done(0));
            d
        };
        // No truncation of a good datagram reads as a finished dump.
        for cut in 0..good.len() {
            let mut dump = Dump::default();
            let r = parse_datagram(&good[..cut], 1, &mut dump);
            assert!(r.is_err() || !dump.done, "cut at {cut}");
        }
        // Any header length: an error or a reading, never a panic.
        let mut dump = Dump::default();
        parse_datagram(&good, 1, &mut dump).unwrap();
        assert!(dump.done && dump.sockets.len() == 1);
        for len in 0..=u8::MAX as u32 {
            let mut d = good.clone();
            d[..4].copy_from_slice(&len.to_ne_bytes());
            let _ = parse_datagram(&d, 1, &mut Dump::default());
        }
        let huge = {
            let mut d = good.clone();
            d[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
            d
        };
        assert!(parse_datagram(&huge, 1, &mut Dump::default()).is_err());
        assert!(parse_datagram(&[1, 2, 3], 1, &mut Dump::default()).is_err());
        // A socket record shorter than inet_diag_msg.
        let short = nlmsg(SOCK_DIAG_BY_FAMILY, 0, 1, &[2, 1, 0, 0, 0, 1]);
        assert!(parse_datagram(&short, 1, &mut Dump::default()).is_err());
        // Short error and done payloads.
        assert!(parse_datagram(&nlmsg(libc::NLMSG_ERROR as u16, 0, 1, &[1]), 1, &mut Dump::default()).is_err());
        let mut dump = Dump::default();
        parse_datagram(&nlmsg(libc::NLMSG_DONE as u16, 0, 1, &[1]), 1, &mut dump).unwrap();
        assert!(dump.done);
        // Pseudo-random bytes.
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..(x % 200) as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = parse_datagram(&bytes, 1, &mut Dump::default());
        }
    }

    fn conn(direction: Direction, local: &str, remote: &str) -> Connection {
        Connection { protocol: Protocol::Tcp, direction, local: sa(local), remote: sa(remote) }
    }

    #[test]
    fn tcp_connections_on_a_listening_port_are_inbound() {
        let sockets = [
            sock(TCP_LISTEN, "[::]:9191", "[::]:0"),         // dual-stack wildcard
            sock(TCP_LISTEN, "10.77.0.1:9192", "0.0.0.0:0"), // one address
            sock(TCP_ESTABLISHED, "[::ffff:10.77.0.1]:9191", "[::ffff:10.77.0.2]:50000"), // via [::]
            sock(TCP_ESTABLISHED, "[fd77::1]:9191", "[fd77::2]:50001"),
            sock(TCP_CLOSE_WAIT, "10.77.0.1:9192", "10.77.0.2:50002"),
            sock(TCP_ESTABLISHED, "10.77.0.9:9192", "10.77.0.2:50003"), // other address: not that listener's
            sock(TCP_ESTABLISHED, "10.77.0.1:40000", "10.77.0.5:389"),
            sock(TCP_FIN_WAIT2, "[fd77::1]:40001", "[fd77::5]:389"),
        ];
        assert_eq!(
            classify(Protocol::Tcp, &sockets),
            [
                conn(Direction::Inbound, "10.77.0.1:9191", "10.77.0.2:50000"),
                conn(Direction::Inbound, "[fd77::1]:9191", "[fd77::2]:50001"),
                conn(Direction::Inbound, "10.77.0.1:9192", "10.77.0.2:50002"),
                conn(Direction::Outbound, "10.77.0.9:9192", "10.77.0.2:50003"),
                conn(Direction::Outbound, "10.77.0.1:40000", "10.77.0.5:389"),
                conn(Direction::Outbound, "[fd77::1]:40001", "[fd77::5]:389"),
            ]
        );
    }

    #[test]
    fn handshake_states_say_who_opened_the_connection() {
        let sockets = [
            sock(TCP_LISTEN, "0.0.0.0:5000", "0.0.0.0:0"),
            // Bound to a listening port, yet this host is connecting out.
            sock(TCP_SYN_SENT, "10.0.0.1:5000", "10.0.0.2:389"),
            sock(TCP_NEW_SYN_RECV, "10.0.0.1:7000", "10.0.0.3:1234"),
            sock(TCP_SYN_RECV, "10.0.0.1:7001", "10.0.0.3:1235"),
        ];
        let dirs: Vec<Direction> = classify(Protocol::Tcp, &sockets).iter().map(|c| c.direction).collect();
        assert_eq!(dirs, [Direction::Outbound, Direction::Inbound, Direction::Inbound]);
    }

    #[test]
    fn loopback_self_closed_and_duplicate_sockets_are_left_out() {
        let sockets = [
            sock(TCP_ESTABLISHED, "127.0.0.1:5432", "127.0.0.1:40000"),
            sock(TCP_ESTABLISHED, "[::1]:5432", "[::1]:40001"),
            sock(TCP_ESTABLISHED, "[::ffff:127.0.0.1]:5432", "[::ffff:127.0.0.1]:40002"),
            sock(TCP_ESTABLISHED, "10.0.0.1:5432", "10.0.0.1:40003"), // to itself: over lo
            sock(6, "10.0.0.1:40004", "10.0.0.2:389"),                // TIME_WAIT
            sock(TCP_CLOSE, "10.0.0.1:40005", "10.0.0.2:389"),
            sock(TCP_ESTABLISHED, "10.0.0.1:40006", "10.0.0.2:389"),
            sock(TCP_ESTABLISHED, "[::ffff:10.0.0.1]:40006", "[::ffff:10.0.0.2]:389"), // the same, mapped
        ];
        assert_eq!(classify(Protocol::Tcp, &sockets), [conn(Direction::Outbound, "10.0.0.1:40006", "10.0.0.2:389")]);
    }

    #[test]
    fn connected_udp_sockets_are_inbound_only_beside_an_unconnected_one() {
        let sockets = [
            sock(TCP_CLOSE, "[::]:1812", "[::]:0"),
            sock(TCP_ESTABLISHED, "10.0.0.1:1812", "10.0.0.9:40000"),
            sock(TCP_ESTABLISHED, "10.0.0.1:45000", "10.0.0.53:53"),
            sock(TCP_CLOSE, "0.0.0.0:45001", "0.0.0.0:0"), // unconnected: not a connection
        ];
        let udp = |direction, local, remote| Connection { protocol: Protocol::Udp, ..conn(direction, local, remote) };
        assert_eq!(
            classify(Protocol::Udp, &sockets),
            [
                udp(Direction::Inbound, "10.0.0.1:1812", "10.0.0.9:40000"),
                udp(Direction::Outbound, "10.0.0.1:45000", "10.0.0.53:53"),
            ]
        );
    }

    #[test]
    fn a_connection_names_its_initiator_first_and_its_service_port() {
        let c = conn(Direction::Inbound, "10.77.0.1:9191", "10.77.0.2:50000");
        assert_eq!(c.to_string(), "inbound tcp 10.77.0.2:50000 -> 10.77.0.1:9191");
        assert_eq!(c.service_port(), 9191);
        let c = conn(Direction::Outbound, "10.77.0.1:40000", "10.77.0.5:389");
        assert_eq!(c.to_string(), "outbound tcp 10.77.0.1:40000 -> 10.77.0.5:389");
        assert_eq!(c.service_port(), 389);
    }

    /// The real table of this process's network namespace (no privilege
    /// needed): the dump reads a loopback listener and both ends of a
    /// connection to it, and `connections` leaves all of them out.
    #[test]
    fn the_kernel_table_reads_and_leaves_loopback_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let raw = dump(libc::AF_INET as u8, Protocol::Tcp).expect("inet_diag dump");
        let port = listener.local_addr().unwrap().port();
        assert!(raw.iter().any(|s| s.state == TCP_LISTEN && s.local.port() == port), "{raw:?}");
        assert!(raw.iter().filter(|s| s.local.port() == port || s.remote.port() == port).count() >= 3, "{raw:?}");
        assert!(connections().iter().all(|c| c.local.port() != port && c.remote.port() != port));
    }
}
