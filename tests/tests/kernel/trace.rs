//! The trace object (`pcguard run --trace-datapath`): a debug record per
//! packet decision through aya-log, read by `Datapath::trace_logger` with
//! the kernel codes named; the default object has none.

use std::sync::{Arc, Mutex};

use anyhow::{Result, ensure};
use log::{Level, Log, Metadata, Record};
use pcguard::datapath::{Object, trace::TARGET};
use pcguard_testkit::frame::{TCP_SYN, tcp4};
use pcguard_tests::kernel::{self, CLIENT_PORT, OTHER_PORT, SERVER, WEB_PORT, WORKSTATION};

use crate::{DROP, PASS, XDP, case, rig::Rig};

/// The records a logger received: (level, target, message).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(Level, String, String)>>>);

impl Log for Capture {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        self.0.lock().unwrap().push((record.level(), record.target().to_string(), record.args().to_string()));
    }

    fn flush(&self) {}
}

#[test]
fn trace_object_logs_each_decision() -> Result<()> {
    let mut k = Rig::load_object(kernel::POLICY, Object::Trace)?;
    let site_web = k.target.rule("site-web");
    let capture = Capture::default();
    let mut records = k.target.dp().trace_logger(capture.clone())?;
    let table = vec![
        case("no rule: dropped", XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT, OTHER_PORT, TCP_SYN), DROP).into(),
        case("site-web: allowed", XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN), PASS).into(),
    ];
    kernel::run(&mut k, table)?;
    records.flush();
    let got = capture.0.lock().unwrap().clone();
    let want = [
        format!(
            "decision dir=ingress verdict=dropped reason=no_rule proto=tcp sport={CLIENT_PORT} dport={OTHER_PORT} rule=0"
        ),
        format!(
            "decision dir=ingress verdict=allowed reason=none proto=tcp sport={CLIENT_PORT} dport={WEB_PORT} \
             rule={site_web}"
        ),
    ];
    ensure!(got.len() == want.len(), "{} records, want {}: {got:?}", got.len(), want.len());
    for ((level, target, msg), want) in got.iter().zip(&want) {
        ensure!(*level == Level::Debug && target == TARGET, "record {msg:?}: level {level}, target {target}");
        ensure!(msg == want, "record {msg:?}, want {want:?}");
    }
    Ok(())
}

/// The default object writes no records: it has no aya-log ring buffer.
#[test]
fn default_object_has_no_trace_records() -> Result<()> {
    let mut k = Rig::load(kernel::POLICY)?;
    ensure!(k.target.dp().trace_logger(Capture::default()).is_err(), "the default object has a trace ring buffer");
    Ok(())
}
