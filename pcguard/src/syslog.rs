//! Audit records to the local syslog socket as RFC 5424 messages
//! (`[audit] syslog = true`): one datagram per record, sent without
//! blocking; a record the socket does not take at once (no syslog daemon,
//! its queue full) is dropped and counted, never waited for.
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME pcguard PROCID MSGID - MSG
//! ```
//!
//! PRI is `facility * 8 + severity`; MSGID the record's kind (its reason,
//! `dns_poisoning`, `audit_summary`); no structured data (`-`); MSG the
//! record as written to the file (JSON, no BOM: RFC 5424's MSG-ANY).

use std::{
    io::ErrorKind,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::Deserialize;

/// Where records go unless `[audit] syslog_socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/dev/log";
/// APP-NAME of every message.
pub const APP_NAME: &str = "pcguard";

/// Syslog facilities (RFC 5424, table 1) a site may choose
/// (`[audit] syslog_facility`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Facility {
    User,
    #[default]
    Daemon,
    Auth,
    Authpriv,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    /// The facility's number.
    pub fn code(self) -> u8 {
        match self {
            Facility::User => 1,
            Facility::Daemon => 3,
            Facility::Auth => 4,
            Facility::Authpriv => 10,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Facility::User => "user",
            Facility::Daemon => "daemon",
            Facility::Auth => "auth",
            Facility::Authpriv => "authpriv",
            Facility::Local0 => "local0",
            Facility::Local1 => "local1",
            Facility::Local2 => "local2",
            Facility::Local3 => "local3",
            Facility::Local4 => "local4",
            Facility::Local5 => "local5",
            Facility::Local6 => "local6",
            Facility::Local7 => "local7",
        }
    }
}

/// Why a message was not sent.
#[derive(Debug)]
pub enum SendError {
    /// The socket would have blocked (the receiver's queue is full).
    Full,
    /// No receiver (no socket at the path, or nobody reads it) or another
    /// error.
    Failed(std::io::Error),
}

/// A non-blocking, unconnected datagram socket sending to `path` (each
/// send names it, so a restarted syslog daemon is found again).
pub struct Syslog {
    socket: UnixDatagram,
    path: PathBuf,
    facility: Facility,
    procid: u32,
}

impl Syslog {
    pub fn new(path: &Path, facility: Facility) -> Result<Self> {
        let socket = UnixDatagram::unbound().context("creating a unix datagram socket for syslog")?;
        socket.set_nonblocking(true).context("making the syslog socket non-blocking")?;
        Ok(Self { socket, path: path.to_path_buf(), facility, procid: std::process::id() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn facility(&self) -> Facility {
        self.facility
    }

    /// Sends one record: `severity` its numeric syslog severity, `ts` its
    /// RFC 3339 time, `msgid` its kind, `msg` the record.
    pub fn send(&self, severity: u8, ts: &str, host: &str, msgid: &str, msg: &[u8]) -> Result<(), SendError> {
        let line = format_message(self.facility, severity, ts, host, self.procid, msgid, msg);
        match self.socket.send_to(&line, &self.path) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Err(SendError::Full),
            Err(e) => Err(SendError::Failed(e)),
        }
    }
}

/// An RFC 5424 header field: printable US-ASCII without spaces, at most
/// `max` characters, `-` when empty.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if v.is_empty() { "-".into() } else { v }
}

/// The whole message (RFC 5424, section 6).
pub fn format_message(
    facility: Facility,
    severity: u8,
    ts: &str,
    host: &str,
    procid: u32,
    msgid: &str,
    msg: &[u8],
) -> Vec<u8> {
    let pri = u16::from(facility.code()) * 8 + u16::from(severity.min(7));
    let mut out = format!(
        "<{pri}>1 {} {} {APP_NAME} {procid} {} - ",
        header_field(ts, 64),
        header_field(host, 255),
        header_field(msgid, 32)
    )
    .into_bytes();
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_follow_rfc5424() {
        let m = format_message(Facility::Local3, 1, "2026-11-27T10:00:00.123Z", "srv 1", 42, "no_rule", b"{\"a\":1}");
        assert_eq!(
            String::from_utf8(m).unwrap(),
            "<153>1 2026-11-27T10:00:00.123Z srv1 pcguard 42 no_rule - {\"a\":1}"
        );
        let m = format_message(Facility::Daemon, 4, "", "", 1, &"x".repeat(40), b"");
        assert_eq!(String::from_utf8(m).unwrap(), format!("<28>1 - - pcguard 1 {} - ", "x".repeat(32)));
    }

    #[test]
    fn a_missing_receiver_is_an_error_not_a_wait() {
        let dir = std::env::temp_dir().join(format!("pcguard-syslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.sock");
        let _ = std::fs::remove_file(&path);
        let s = Syslog::new(&path, Facility::Daemon).unwrap();
        assert!(matches!(s.send(6, "t", "h", "m", b"x"), Err(SendError::Failed(_))));
        // A receiver that does not read: the queue fills, sends fail
        // with `Full` instead of blocking.
        let rx = UnixDatagram::bind(&path).unwrap();
        let mut full = false;
        for _ in 0..100_000 {
            match s.send(6, "t", "h", "m", &[b'x'; 1024]) {
                Ok(()) => {}
                Err(SendError::Full) => {
                    full = true;
                    break;
                }
                Err(SendError::Failed(e)) => panic!("{e}"),
            }
        }
        assert!(full, "the queue never filled");
        let mut buf = [0u8; 2048];
        let n = rx.recv(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"<30>1 t h pcguard "), "{:?}", String::from_utf8_lossy(&buf[..n]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
