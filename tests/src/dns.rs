//! DNS in the lab: a resolver answering from a record list, resolving
//! from a lab host, and a client socket of the server. The messages are
//! pcguard-testkit's.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use pcguard_testkit::dns;

use crate::{
    lab::{Lab, SERVER, sa},
    traffic::{Background, udp_responder},
};

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
        let thread =
            udp_responder(
                sock,
                move |query| {
                    if quiet.load(Ordering::Relaxed) { None } else { dns_answer(query, &records) }
                },
            )?;
        Ok(Self { silent, _thread: thread })
    }

    /// Stops (`true`) or resumes answering.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Relaxed);
    }
}

/// A query for `name` (type 1 = A, 28 = AAAA).
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    dns::query(id, name, qtype)
}

/// A response to `dns_query(id, name, qtype)` naming `addrs` (A or AAAA
/// records by address family, owner a pointer to the question), with the
/// flags `0x8180` (QR, RD, RA, no error) unless changed by the caller.
pub fn dns_response(id: u16, name: &str, qtype: u16, addrs: &[(IpAddr, u32)]) -> Vec<u8> {
    dns::response(id, name, qtype, addrs)
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
        dns::record(&mut r, *addr, *ttl);
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
