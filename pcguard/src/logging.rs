//! Where the daemon's and the CLI's log goes: journald with syslog
//! priorities when stderr is connected to the journal (systemd sets
//! `$JOURNAL_STREAM` to stderr's device and inode, `systemd.exec(5)`), else
//! plain lines on stderr (env_logger). `RUST_LOG` filters both (default
//! `info`).
//!
//! Priorities in the journal: errors `err` (3), warnings `warning` (4),
//! info `notice` (5), debug `info` (6), trace `debug` (7); unexpected-flow
//! and DNS poisoning alerts (logged with target [`ALERT_TARGET`]) `err` (3),
//! the highest the `log` crate's levels reach, so `journalctl -p err -u
//! pcguard` lists failures and alerts.

use log::{Level, Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

/// The target of the log lines of alert audit records (outbound to a
/// workstation, DNS poisoning).
pub const ALERT_TARGET: &str = "pcguard::alert";

fn env_builder() -> env_logger::Builder {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
}

/// Installs the logger (once, at start).
pub fn init() {
    if systemd_journal_logger::connected_to_journal() {
        match JournalLog::new() {
            Ok(journal) => {
                let filter = env_builder().build();
                log::set_max_level(filter.filter());
                let logger = Journal { journal: journal.with_syslog_identifier("pcguard".into()), filter };
                if log::set_boxed_logger(Box::new(logger)).is_ok() {
                    return;
                }
            }
            Err(e) => {
                env_builder().init();
                log::warn!("stderr is the journal but its socket does not answer ({e}): logging plain lines to stderr");
                return;
            }
        }
    }
    env_builder().init();
}

/// The level a record is sent to journald with: alerts are raised to
/// `Error`, the rest keep theirs.
pub fn journal_level(level: Level, target: &str) -> Level {
    if target == ALERT_TARGET { Level::Error } else { level }
}

/// The syslog priority journald stores for a record of `level` (the mapping
/// of systemd-journal-logger).
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 5,
        Level::Debug => 6,
        Level::Trace => 7,
    }
}

/// journald output, filtered like env_logger (`RUST_LOG`).
struct Journal {
    journal: JournalLog,
    /// Used only for its filter.
    filter: env_logger::Logger,
}

impl Log for Journal {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        let level = journal_level(record.level(), record.target());
        let sent = if level == record.level() {
            self.journal.journal_send(record)
        } else {
            self.journal.journal_send(
                &Record::builder()
                    .args(*record.args())
                    .level(level)
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            )
        };
        if sent.is_err() {
            // journald went away: stderr still reaches the journal's stream.
            eprintln!("<{}>{}", priority(level), record.args());
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_raised_and_other_levels_keep_their_priority() {
        assert_eq!(priority(journal_level(Level::Warn, ALERT_TARGET)), 3);
        assert_eq!(priority(journal_level(Level::Info, ALERT_TARGET)), 3);
        assert_eq!(priority(journal_level(Level::Warn, "pcguard::daemon")), 4);
        assert_eq!(priority(journal_level(Level::Error, "pcguard::daemon")), 3);
        assert_eq!(priority(journal_level(Level::Info, "pcguard::daemon")), 5);
        assert_eq!(priority(journal_level(Level::Debug, "pcguard::dns")), 6);
    }
}
