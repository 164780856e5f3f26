//! Long-running traffic for the reliability tests: a steady probe stream
//! at a port the policy denies (every datagram or connection that reaches
//! the listener is counted), and a long allowed TCP flow whose round trips
//! are timed (a stall shows as a gap).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{Lab, enter_netns};

/// What reached a listener on a denied port: datagrams and accepted
/// connections. Counts only; runs until dropped.
pub struct DeniedListener {
    pub datagrams: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DeniedListener {
    /// UDP and TCP on `port` (dual-stack) in `host`'s namespace.
    pub fn start(lab: &Lab, host: &str, port: u16) -> Result<Self> {
        let bind: SocketAddr = format!("[::]:{port}").parse()?;
        let udp = lab.run_in(host, move || UdpSocket::bind(bind))??;
        let tcp = lab.run_in(host, move || TcpListener::bind(bind))??;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        tcp.set_nonblocking(true)?;
        let (datagrams, connections) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (d, s) = (datagrams.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if udp.recv_from(&mut buf).is_ok() {
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        let (c, s) = (connections.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok(_) => {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
        Ok(Self { datagrams, connections, stop, threads })
    }

    pub fn reached(&self) -> (u64, u64) {
        (self.datagrams.load(Ordering::Relaxed), self.connections.load(Ordering::Relaxed))
    }
}

impl Drop for DeniedListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A steady stream of probes from `host` to `to`: a UDP datagram every
/// `period`, and a TCP connection attempt every tenth period (non-blocking:
/// a SYN, never completed unless something lets it through).
pub struct ProbeStream {
    pub sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProbeStream {
    pub fn start(lab: &Lab, host: &str, to: SocketAddr, period: Duration) -> Result<Self> {
        let ns = lab.ns_path(host);
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (sent.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            if enter_netns(&ns).is_err() {
                return;
            }
            let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid");
            let Ok(udp) = UdpSocket::bind(bind) else { return };
            let mut next = Instant::now();
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let _ = udp.send_to(format!("probe {i}").as_bytes(), to);
                if i.is_multiple_of(10) {
                    // A SYN; the socket is dropped at once (the kernel
                    // retransmits nothing after the close).
                    let _ = TcpStream::connect_timeout(&to, Duration::from_millis(1));
                }
                n.fetch_add(1, Ordering::Relaxed);
                i += 1;
                next += period;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        });
        Ok(Self { sent, stop, thread: Some(thread) })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A long TCP connection from `host` to an echo server at `to`: a small
/// message every `period`, each echo timed. Records the longest round trip
/// and how many round trips failed.
pub struct LongFlow {
    pub round_trips: Arc<AtomicU64>,
    pub failures: Arc<AtomicU64>,
    pub slowest: Arc<Mutex<Duration>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LongFlow {
    pub fn start(lab: &Lab, host: &str, to: SocketAddr, period: Duration) -> Result<Self> {
        let ns = lab.ns_path(host);
        let stream = lab
            .run_in(host, move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))?
            .context("connecting the long flow")?;
        drop(ns);
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_nodelay(true)?;
        let round_trips = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let slowest = Arc::new(Mutex::new(Duration::ZERO));
        let stop = Arc::new(AtomicBool::new(false));
        let (rt, fail, slow, s) = (round_trips.clone(), failures.clone(), slowest.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = stream.write_all(b"ping\n").is_ok()
                    && stream.read_exact(&mut buf[..5]).is_ok()
                    && &buf[..5] == b"ping\n";
                let took = t.elapsed();
                if ok {
                    rt.fetch_add(1, Ordering::Relaxed);
                    let mut m = slow.lock().expect("not poisoned");
                    *m = (*m).max(took);
                } else {
                    fail.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(period);
            }
        });
        Ok(Self { round_trips, failures, slowest, stop, thread: Some(thread) })
    }

    /// (round trips, failures, slowest round trip).
    pub fn stats(&self) -> (u64, u64, Duration) {
        (
            self.round_trips.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            *self.slowest.lock().expect("not poisoned"),
        )
    }
}

impl Drop for LongFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An echo server that keeps each connection open and echoes every line
/// back (for [`LongFlow`]); runs until dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(lab: &Lab, host: &str, port: u16) -> Result<Self> {
        let bind: SocketAddr = format!("[::]:{port}").parse()?;
        let listener = lab.run_in(host, move || TcpListener::bind(bind))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut buf = [0u8; 512];
                            while !s.load(Ordering::Relaxed) {
                                match c.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if c.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
