//! Per-packet decision records of the trace object (`--features trace`,
//! `pcguard run --trace-datapath`): one aya-log record per packet at its
//! final verdict, through aya-log's `AYA_LOGS` ring buffer, which the
//! daemon reads into its `log` output at debug level.
//!
//! Codes, not names: the record carries the kernel's integer codes
//! (`dir`, `verdict`, `reason`, the IP protocol), and the daemon names them
//! with the `pcguard-common` enums (`pcguard::datapath::trace`), so the
//! kernel copies no strings.
//!
//! A macro, not a function: without the feature it expands to nothing and
//! its arguments are never mentioned, so the default object is
//! instruction-for-instruction the object without these call sites. (An
//! empty `#[inline(always)]` function still changed the code LLVM made:
//! the debug info of an argument that is computed alters its choices.)

/// The record of one packet's decision: `decision!(dir, verdict, reason,
/// pkt, rule)`: the direction it travels, the verdict (`VERDICT_*`), the
/// reason it was unexpected (`REASON_*`, 0 when allowed or bypassed), its
/// protocol and ports as parsed (`pkt: &Packet`), and the rule that
/// allowed it (0: none).
#[cfg(feature = "trace")]
macro_rules! decision {
    ($dir:expr, $verdict:expr, $reason:expr, $pkt:expr, $rule:expr) => {
        $crate::trace::emit($dir as u32, $verdict as u32, $reason as u32, $pkt, $rule as u32)
    };
}

#[cfg(not(feature = "trace"))]
macro_rules! decision {
    ($($arg:tt)*) => {
        ()
    };
}

pub(crate) use decision;

/// Writes the record: one BPF-to-BPF call (like the parser), so the
/// record's fields take stack in its frame, not in the entry point's: the
/// verifier limits the frames of a call chain to 512 bytes together, and
/// the TC programs' own frame is ~320 (inlined at each decision, aya-log's
/// fields took it past the limit).
#[cfg(feature = "trace")]
#[inline(never)]
pub fn emit(dir: u32, verdict: u32, reason: u32, pkt: &crate::parse::Packet, rule: u32) {
    aya_log_ebpf::debug!(
        &(),
        target: "pcguard::datapath",
        "decision dir={} verdict={} reason={} proto={} sport={} dport={} rule={}",
        dir,
        verdict,
        reason,
        pkt.proto,
        pkt.sport,
        pkt.dport,
        rule
    )
}
