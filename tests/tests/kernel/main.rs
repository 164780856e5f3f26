//! The kernel's verdicts on crafted packets: each test loads the programs
//! through the daemon's own path (a site config compiled and applied by
//! `Datapath`, maps pinned under a bpffs directory of its own; see
//! `rig.rs`), then runs a table of cases with `BPF_PROG_TEST_RUN`
//! (`pcguard_tests::kernel`): the packet, the program, the verdict, and
//! what it must have left behind (conntrack entries, events, DNS copies,
//! counters). Needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON); no
//! network namespace, nothing attached, so no lab lock.
//!
//! Where a case needs a map state no config produces (settings only the
//! kernel side has, an address learned in one generation only, a flow
//! the policy cannot open), a setup step writes it through the typed maps
//! after the apply, and says why.

mod dns;
mod flowrec;
mod flows;
mod policy;
mod reports;
mod rig;
#[cfg(feature = "trace")]
mod trace;

use anyhow::Result;
use pcguard_common::FlowKey;
use pcguard_testkit::frame::{TCP_ACK, TCP_SYN, tcp4};
use pcguard_tests::kernel::{self, CLIENT_PORT, Check, Hook, SERVER, Step, Verdict, WEB_PORT, WORKSTATION};
use rig::{K, Rig};

const PASS: Verdict = Verdict::Pass;
const DROP: Verdict = Verdict::Drop;
const XDP: Hook = Hook::Xdp;
const TC: Hook = Hook::Tc;
const TCI: Hook = Hook::TcIngress;

/// Runs of the timed cases of the bench (`cargo xtask test` ran it with
/// 1000 iterations): the counters they leave are checked.
const REPEAT: u32 = 1000;

type Case = kernel::Case<Rig>;

fn case(name: impl Into<String>, hook: Hook, packet: impl Into<Vec<u8>>, want: Verdict) -> Case {
    kernel::case(name, hook, packet, want)
}

fn setup(name: impl Into<String>, f: impl FnOnce(&mut K) -> Result<()> + 'static) -> Step<Rig> {
    kernel::setup(name, f)
}

/// A check between cases (a setup step that changes nothing).
fn check(name: &str, f: impl FnOnce(&mut K) -> Result<()> + 'static) -> Step<Rig> {
    kernel::setup(format!("check: {name}"), f)
}

/// The workstation's flow to the web port (`CLIENT_PORT` -> 9191).
fn web_key() -> FlowKey {
    kernel::v4_key(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT)
}

/// The handshake of the workstation's flow to the web port: the SYN
/// (allowed, a new entry), the server's SYN+ACK, the workstation's ACK
/// (established).
fn web_handshake() -> Vec<Step<Rig>> {
    let first = "allowed SYN, first packet (policy + ct insert)";
    vec![
        case(first, XDP, tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN), PASS)
            .then(Check::CtNew(web_key()))
            .into(),
        case(format!("{first}: reply"), TC, tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_SYN | TCP_ACK), PASS)
            .into(),
        case(
            format!("{first}: the initiator's ACK"),
            XDP,
            tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_ACK),
            PASS,
        )
        .then(Check::CtEstablished(web_key()))
        .into(),
    ]
}

/// Loads [`kernel::POLICY`] and runs `table`.
fn run(table: Vec<Step<Rig>>) -> Result<()> {
    run_with(kernel::POLICY, table)
}

fn run_with(config: &str, table: Vec<Step<Rig>>) -> Result<()> {
    let mut k = Rig::load(config)?;
    kernel::run(&mut k, table)
}

/// The event reasons seen so far (drains `EVENTS` first).
fn reasons(k: &mut K) -> Result<Vec<u8>> {
    k.drain_events()?;
    Ok(k.events.iter().map(|e| e.reason).collect())
}

/// `kernel::POLICY` with `line` added at the top level.
fn policy_with(line: &str) -> String {
    kernel::POLICY.replacen("mode = \"enforce\"\n", &format!("mode = \"enforce\"\n{line}\n"), 1)
}

/// `kernel::POLICY` with inbound flows monitored, outbound enforced.
fn ingress_monitor() -> String {
    kernel::POLICY.replacen("mode = \"enforce\"\n", "mode = \"monitor\"\negress_mode = \"enforce\"\n", 1)
}
