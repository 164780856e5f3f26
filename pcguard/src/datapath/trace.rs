//! The trace object's decision records (`pcguard run --trace-datapath`).
//!
//! With its `trace` feature, pcguard-ebpf writes one aya-log record per
//! packet at its final verdict (`pcguard-ebpf/src/trace.rs`), with the
//! kernel's integer codes:
//!
//! `decision dir=0 verdict=1 reason=1 proto=6 sport=40000 dport=9999 rule=0`
//!
//! [`name_codes`] names them as audit records do (the `pcguard-common`
//! code enums), and with the `trace` feature [`Datapath::trace_logger`]
//! reads the records (aya-log's `EbpfLogger`) into a `log` logger at debug
//! level, target `pcguard::datapath`:
//!
//! `decision dir=ingress verdict=dropped reason=no_rule proto=tcp sport=40000 dport=9999 rule=0`

use pcguard_common::{PacketDir, Reason, Verdict};

/// The `log` target of the decision records.
pub const TARGET: &str = "pcguard::datapath";

/// `msg` with the codes of a decision record named: `dir`, `verdict`,
/// `reason` (0: `none`) and `proto`; other words unchanged. A value that
/// is not a number stays as it is.
pub fn name_codes(msg: &str) -> String {
    let words: Vec<String> = msg
        .split(' ')
        .map(|word| {
            let Some((key, value)) = word.split_once('=') else { return word.to_string() };
            let Ok(v) = value.parse::<u8>() else { return word.to_string() };
            let name = match key {
                "dir" => PacketDir::name_of(v).to_string(),
                "verdict" => Verdict::name_of(v).to_string(),
                "reason" if v == 0 => "none".to_string(),
                "reason" => Reason::name_of(v).to_string(),
                "proto" => crate::flows::protocol_name(v),
                _ => return word.to_string(),
            };
            format!("{key}={name}")
        })
        .collect();
    words.join(" ")
}

#[cfg(feature = "trace")]
mod logger {
    use anyhow::{Context as _, Result};
    use aya_log::EbpfLogger;
    use log::{Log, Metadata, Record};

    use super::name_codes;
    use crate::datapath::Datapath;

    /// A `log` logger that names the codes of decision records
    /// ([`name_codes`]) and hands every record on to `L`.
    pub struct Named<L>(pub L);

    impl<L: Log> Log for Named<L> {
        fn enabled(&self, metadata: &Metadata) -> bool {
            self.0.enabled(metadata)
        }

        fn log(&self, record: &Record) {
            let msg = name_codes(&record.args().to_string());
            self.0.log(
                &Record::builder()
                    .args(format_args!("{msg}"))
                    .level(record.level())
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            );
        }

        fn flush(&self) {
            self.0.flush()
        }
    }

    impl Datapath {
        /// The reader of the trace object's records (aya-log's ring buffer,
        /// taken from the object: once), logging them to `sink` with their
        /// codes named. Its fd becomes readable when records arrive;
        /// `flush` logs them. Fails for the default object, which has no
        /// records.
        pub fn trace_logger<L: Log>(&mut self, sink: L) -> Result<EbpfLogger<Named<L>>> {
            EbpfLogger::init_with_logger(&mut self.ebpf, Named(sink))
                .context("reading the trace object's records (loaded with --trace-datapath?)")
        }
    }
}

#[cfg(feature = "trace")]
pub use logger::Named;

#[cfg(test)]
mod tests {
    use super::name_codes;

    #[test]
    fn codes_are_named() {
        assert_eq!(
            name_codes("decision dir=0 verdict=1 reason=1 proto=6 sport=40000 dport=9999 rule=0"),
            "decision dir=ingress verdict=dropped reason=no_rule proto=tcp sport=40000 dport=9999 rule=0"
        );
        assert_eq!(
            name_codes("decision dir=1 verdict=0 reason=0 proto=17 sport=5353 dport=53 rule=3"),
            "decision dir=egress verdict=allowed reason=none proto=udp sport=5353 dport=53 rule=3"
        );
        // Unknown codes, and words that are not codes.
        assert_eq!(
            name_codes("verdict=9 reason=77 proto=99 x=1 y"),
            "verdict=unknown reason=unknown proto=ip-99 x=1 y"
        );
        assert_eq!(name_codes("verdict=drop dir=300"), "verdict=drop dir=300");
    }
}
