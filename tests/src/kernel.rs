//! The harness of the kernel verdict tests (tests/tests/kernel/) and of the
//! bench (`cargo xtask bench`): the programs of a loaded object run on
//! crafted packets with `BPF_PROG_TEST_RUN`, no interface, no namespace.
//!
//! A test is a table of [`Step`]s, after Cilium's bpf/tests (PKTGEN, SETUP,
//! CHECK): a [`Case`] says what to send (`packet`) to which program
//! (`hook`), the verdict it must return (`want`) and what it must have left
//! behind (`then`: conntrack entries, events, DNS copies, counters); a
//! setup step ([`setup`]) changes map state between cases.
//!
//! The harness needs only the loaded [`Ebpf`] ([`Target`]): the tests load
//! it through the daemon's own `Datapath` with a site config ([`POLICY`]),
//! which this crate does not depend on (xtask does, and must build before
//! `cargo xtask deps` installed what pcguard's build needs).

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use pcguard_common::{
    Counters, CtEntry, DnsMessage, FAMILY_V4, FlowEvent, FlowKey, FlowRecord, IPPROTO_TCP, LearnedKey, NUM_GENERATIONS,
    Settings, VERDICT_ALLOW, names,
};
pub use pcguard_testkit::{dns, frame};

// Return codes of the programs.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_PIPE: u32 = 3;

/// The addresses and ports of [`POLICY`]'s cases.
pub const SERVER: [u8; 4] = [192, 168, 1, 10];
/// A workstation (10.0.0.0/8).
pub const WORKSTATION: [u8; 4] = [10, 1, 2, 3];
/// In no class.
pub const STRANGER: [u8; 4] = [172, 16, 0, 5];
/// An LDAPS server (any address may be one; this one is in the
/// workstations' 10.0.0.0/8 too).
pub const LDAP_SERVER: [u8; 4] = [10, 9, 9, 9];
/// The DNS resolver (`peers.dns`).
pub const RESOLVER: [u8; 4] = [192, 168, 1, 53];
/// An address the `cloud` class may learn from DNS answers.
pub const CLOUD_HOST: [u8; 4] = [203, 0, 113, 7];

pub const WEB_PORT: u16 = 9191;
pub const LDAPS_PORT: u16 = 636;
pub const DNS_PORT: u16 = 53;
pub const HTTPS_PORT: u16 = 443;
/// A port without a rule in [`POLICY`].
pub const OTHER_PORT: u16 = 9999;
pub const CLIENT_PORT: u16 = 40000;

/// `CT_NEW`'s size in [`POLICY`] (the smallest allowed): a flood of new
/// flows churns it within a case.
pub const CT_NEW_ENTRIES: u32 = 1024;

/// The site config of the kernel cases and the bench: inbound TCP 9191
/// from the workstations (`site-web`, class bit 0), outbound TCP 636 to any
/// address (`site-ldaps`, class bit 31), outbound UDP 53 to the resolver (the
/// `dns` feature: its answers are copied), outbound TCP 443 to the `cloud`
/// class DNS answers fill (`ges`); workstations are never initiated to;
/// enforce both ways.
pub const POLICY: &str = r#"
role = "primary"
interfaces = ["ktest0"]
mode = "enforce"

[peers]
workstations = ["10.0.0.0/8"]
dns = ["192.168.1.53"]

[features]
web = false
device_rpc = false
ges = true

[[rule]]
name = "site-web"
description = "PaperCut web interface (kernel tests)"
direction = "inbound"
protocol = "tcp"
ports = [9191]
peers = ["workstations"]

[[rule]]
name = "site-ldaps"
description = "LDAPS to anyone (kernel tests)"
direction = "outbound"
protocol = "tcp"
ports = [636]
peers = ["any"]

[conntrack]
tcp_timeout = "2h"
tcp_closing_timeout = 10
udp_timeout = 60
new_entries = 1024

[audit]
report_interval = 60
max_records_per_second = 1000
"#;

/// Keeps this thread on the CPU it runs on: test runs then share one CPU's
/// per-CPU maps (the event budget is per CPU) and timings one CPU's caches.
pub fn pin_to_one_cpu() -> Result<()> {
    // SAFETY: plain syscalls; a zeroed cpu_set_t is a valid empty set.
    unsafe {
        let cpu = libc::sched_getcpu();
        ensure!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        ensure!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The flow key of an IPv4 TCP flow as the programs store it.
pub fn v4_key(local: [u8; 4], remote: [u8; 4], local_port: u16, remote_port: u16) -> FlowKey {
    let mut key = FlowKey { family: FAMILY_V4, proto: IPPROTO_TCP, local_port, remote_port, ..Default::default() };
    key.local_addr[..4].copy_from_slice(&local);
    key.remote_addr[..4].copy_from_slice(&remote);
    key
}

/// The program a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The ingress pipeline on XDP.
    Xdp,
    /// Egress (TC).
    Tc,
    /// The ingress pipeline on TC.
    TcIngress,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
            Hook::TcIngress => "tci",
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Hook::Xdp => names::XDP_PROG,
            Hook::Tc => names::TC_PROG,
            Hook::TcIngress => names::TC_INGRESS_PROG,
        }
    }

    pub fn action_name(self, ret: u32) -> &'static str {
        match (self, ret) {
            (Hook::Xdp, XDP_PASS) => "XDP_PASS",
            (Hook::Xdp, XDP_DROP) => "XDP_DROP",
            (Hook::Tc | Hook::TcIngress, TC_ACT_PIPE) => "TC_ACT_PIPE",
            (Hook::Tc | Hook::TcIngress, TC_ACT_SHOT) => "TC_ACT_SHOT",
            _ => "?",
        }
    }
}

/// What a program decides on a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `XDP_PASS`, `TC_ACT_PIPE`.
    Pass,
    /// `XDP_DROP`, `TC_ACT_SHOT`.
    Drop,
}

impl Verdict {
    /// The return code of `hook`'s program.
    pub fn code(self, hook: Hook) -> u32 {
        match (hook, self) {
            (Hook::Xdp, Verdict::Pass) => XDP_PASS,
            (Hook::Xdp, Verdict::Drop) => XDP_DROP,
            (_, Verdict::Pass) => TC_ACT_PIPE,
            (_, Verdict::Drop) => TC_ACT_SHOT,
        }
    }
}

/// What holds the loaded object: an [`Ebpf`] itself, or (in the tests and
/// the bench) a wrapper of the daemon's `Datapath`.
pub trait Target {
    fn ebpf(&mut self) -> &mut Ebpf;
}

impl Target for Ebpf {
    fn ebpf(&mut self) -> &mut Ebpf {
        self
    }
}

/// The loaded programs and maps of one test, and what they have sent so
/// far on their ring buffers.
pub struct Kernel<T> {
    pub target: T,
    event_ring: RingBuf<MapData>,
    dns_ring: RingBuf<MapData>,
    flow_ring: RingBuf<MapData>,
    /// Every event read from `EVENTS` so far.
    pub events: Vec<FlowEvent>,
    /// How many messages were read from `DNS_MESSAGES` so far.
    pub dns_copied: u64,
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).with_context(|| format!("map {name} not in the object"))
}

impl<T: Target> Kernel<T> {
    /// Takes the ring buffers (`EVENTS`, `DNS_MESSAGES`) out of `target`'s
    /// object to read them.
    pub fn new(mut target: T) -> Result<Self> {
        let ebpf = target.ebpf();
        let event_ring = RingBuf::try_from(ebpf.take_map(names::EVENTS).context("no EVENTS map")?)?;
        let dns_ring = RingBuf::try_from(ebpf.take_map(names::DNS_MESSAGES).context("no DNS_MESSAGES map")?)?;
        let flow_ring = RingBuf::try_from(ebpf.take_map(names::FLOW_RECORDS).context("no FLOW_RECORDS map")?)?;
        Ok(Self { target, event_ring, dns_ring, flow_ring, events: Vec::new(), dns_copied: 0 })
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        self.target.ebpf()
    }

    /// Runs `hook`'s program on `data` `repeat` times in one test run: its
    /// return code and the kernel's average time per run.
    pub fn test_run(&mut self, hook: Hook, data: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let opts = TestRunOptions { data_in: Some(data), repeat, ..Default::default() };
        let name = hook.program();
        let prog = self.ebpf().program(name).with_context(|| format!("program {name} not in the object"))?;
        let res = match hook {
            Hook::Xdp => <&Xdp>::try_from(prog)?.test_run(opts),
            Hook::Tc | Hook::TcIngress => <&SchedClassifier>::try_from(prog)?.test_run(opts),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN on {name}"))?;
        Ok((res.return_value, res.duration))
    }

    /// Fails unless `got` is `want` at `hook`.
    pub fn expect(&self, case: &str, hook: Hook, got: u32, want: Verdict) -> Result<()> {
        let want = want.code(hook);
        if got != want {
            bail!(
                "{case}: {} returned {got} ({}), expected {want} ({})",
                hook.name(),
                hook.action_name(got),
                hook.action_name(want)
            );
        }
        Ok(())
    }

    /// Runs `data` once at `hook` and checks the verdict.
    pub fn once(&mut self, case: &str, hook: Hook, data: &[u8], want: Verdict) -> Result<()> {
        let (ret, _) = self.test_run(hook, data, 1)?;
        self.expect(case, hook, ret, want)
    }

    /// Moves the records on `EVENTS` to `self.events`; returns how many.
    pub fn drain_events(&mut self) -> Result<usize> {
        let mut n = 0;
        while let Some(item) = self.event_ring.next() {
            ensure!(item.len() == size_of::<FlowEvent>(), "event of {} bytes", item.len());
            // SAFETY: FlowEvent is plain data and the length was checked.
            self.events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            n += 1;
        }
        Ok(n)
    }

    /// The records on `FLOW_RECORDS` (audited flows' starts and ends),
    /// drained.
    pub fn flow_records(&mut self) -> Result<Vec<FlowRecord>> {
        let mut recs = Vec::new();
        while let Some(item) = self.flow_ring.next() {
            ensure!(item.len() == size_of::<FlowRecord>(), "flow record of {} bytes", item.len());
            // SAFETY: FlowRecord is plain data and the length was checked.
            recs.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        Ok(recs)
    }

    /// The records on `DNS_MESSAGES`, drained.
    pub fn dns_messages(&mut self) -> Result<Vec<DnsMessage>> {
        let mut msgs = Vec::new();
        while let Some(item) = self.dns_ring.next() {
            ensure!(item.len() == size_of::<DnsMessage>(), "DNS message of {} bytes", item.len());
            // SAFETY: DnsMessage is plain data and the length was checked.
            msgs.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        self.dns_copied += msgs.len() as u64;
        Ok(msgs)
    }

    /// A `STAT_*` counter, summed over the CPUs.
    pub fn stat(&mut self, idx: u32) -> Result<u64> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(map_mut(self.ebpf(), names::STATS)?)?;
        Ok(stats.get(&idx, 0)?.iter().sum())
    }

    /// Allowed packets at `index` of `RULE_COUNTERS` (`rule_counter_index`)
    /// or `PORT_COUNTERS` (`port_counter_index`), summed over the CPUs.
    pub fn allowed(&mut self, map: &str, index: u32) -> Result<u64> {
        let counters: PerCpuArray<_, Counters> = PerCpuArray::try_from(map_mut(self.ebpf(), map)?)?;
        Ok(counters.get(&index, 0)?.iter().map(|c| c.packets[VERDICT_ALLOW]).sum())
    }

    fn ct(&mut self, name: &str) -> Result<HashMap<&mut MapData, FlowKey, CtEntry>> {
        Ok(HashMap::try_from(map_mut(self.ebpf(), name)?)?)
    }

    /// Removes `key` from both conntrack tables.
    pub fn forget(&mut self, key: &FlowKey) -> Result<()> {
        for table in [names::CONNTRACK, names::CT_NEW] {
            match self.ct(table)?.remove(key) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `key`'s conntrack entry and whether it is established (in
    /// `CONNTRACK`) rather than new (`CT_NEW`).
    pub fn ct_get(&mut self, key: &FlowKey) -> Result<(CtEntry, bool)> {
        if let Ok(e) = self.ct(names::CONNTRACK)?.get(key, 0) {
            return Ok((e, true));
        }
        let e = self.ct(names::CT_NEW)?.get(key, 0).with_context(|| format!("no conntrack entry for {key:?}"))?;
        Ok((e, false))
    }

    pub fn ct_has(&mut self, key: &FlowKey) -> bool {
        self.ct_get(key).is_ok()
    }

    /// Writes `key`'s entry into `CONNTRACK` (`established`) or `CT_NEW`.
    pub fn ct_insert(&mut self, key: FlowKey, entry: CtEntry, established: bool) -> Result<()> {
        let table = if established { names::CONNTRACK } else { names::CT_NEW };
        self.ct(table)?.insert(key, entry, 0)?;
        Ok(())
    }

    /// Overwrites `key`'s entry in the table that holds it.
    pub fn ct_set(&mut self, key: FlowKey, entry: CtEntry) -> Result<()> {
        let established = self.ct_get(&key)?.1;
        self.ct_insert(key, entry, established)
    }

    /// How many entries `CT_NEW` holds.
    pub fn ct_new_len(&mut self) -> Result<usize> {
        Ok(self.ct(names::CT_NEW)?.keys().filter(|k| k.is_ok()).count())
    }

    /// The generation `ACTIVE` names.
    pub fn active_generation(&mut self) -> Result<u32> {
        let active: Array<_, u32> = Array::try_from(map_mut(self.ebpf(), names::ACTIVE)?)?;
        Ok(active.get(&0, 0)? & (NUM_GENERATIONS - 1))
    }

    /// Changes the settings of the active generation in place.
    pub fn update_settings(&mut self, f: impl FnOnce(&mut Settings)) -> Result<()> {
        let generation = self.active_generation()?;
        let mut settings: Array<_, Settings> = Array::try_from(map_mut(self.ebpf(), names::SETTINGS)?)?;
        let mut s = settings.get(&generation, 0)?;
        f(&mut s);
        settings.set(generation, s, 0)?;
        Ok(())
    }

    /// The settings of the active generation.
    pub fn settings(&mut self) -> Result<Settings> {
        let generation = self.active_generation()?;
        let settings: Array<_, Settings> = Array::try_from(map_mut(self.ebpf(), names::SETTINGS)?)?;
        Ok(settings.get(&generation, 0)?)
    }

    /// Writes (`Some(bits)`) or removes an IPv4 address of `LEARNED` in
    /// `generation`.
    pub fn learned(&mut self, generation: u32, addr: [u8; 4], bits: Option<u32>) -> Result<()> {
        let mut key = LearnedKey { generation: generation as u8, family: FAMILY_V4, _pad: [0; 2], addr: [0; 16] };
        key.addr[..4].copy_from_slice(&addr);
        let mut learned: HashMap<_, LearnedKey, u32> = HashMap::try_from(map_mut(self.ebpf(), names::LEARNED)?)?;
        match bits {
            Some(b) => learned.insert(key, b, 0)?,
            None => learned.remove(&key)?,
        }
        Ok(())
    }
}

/// A DNS message the programs must have copied to `DNS_MESSAGES`.
#[derive(Clone, Debug)]
pub struct DnsCopy {
    /// `DNS_KIND_QUERY` or `DNS_KIND_ANSWER`.
    pub kind: u8,
    /// The resolver's address and the server's port.
    pub resolver: [u8; 4],
    pub server_port: u16,
    /// The whole UDP payload sent, and how much of it the copy holds.
    pub msg: Vec<u8>,
    pub len: usize,
}

/// CHECK: what a case must have left behind.
pub enum Check<T> {
    /// The flow is tracked in `CT_NEW` (not answered yet).
    CtNew(FlowKey),
    /// The flow is tracked in `CONNTRACK`.
    CtEstablished(FlowKey),
    /// Conntrack holds no entry of the flow.
    NoCt(FlowKey),
    /// Exactly this many events since the last drain (drains them).
    Events(usize),
    /// Nothing copied to `DNS_MESSAGES` (drains it).
    NoDns,
    /// Exactly this one message copied (drains it).
    Dns(DnsCopy),
    /// Anything else.
    With(CheckFn<T>),
}

impl<T: Target> Check<T> {
    fn check(&self, k: &mut Kernel<T>) -> Result<()> {
        match self {
            Check::CtNew(key) => {
                ensure!(!k.ct_get(key).context("no new conntrack entry")?.1, "the entry is established, not new")
            }
            Check::CtEstablished(key) => {
                ensure!(k.ct_get(key).context("not established")?.1, "not established (still new)")
            }
            Check::NoCt(key) => ensure!(!k.ct_has(key), "a conntrack entry for {key:?}"),
            Check::Events(want) => {
                let got = k.drain_events()?;
                ensure!(got == *want, "{got} events, expected {want}");
            }
            Check::NoDns => {
                let n = k.dns_messages()?.len();
                ensure!(n == 0, "{n} DNS messages copied, expected none");
            }
            Check::Dns(want) => check_dns_copy(&k.dns_messages()?, want)?,
            Check::With(f) => f(k)?,
        }
        Ok(())
    }
}

fn check_dns_copy(msgs: &[DnsMessage], want: &DnsCopy) -> Result<()> {
    ensure!(msgs.len() == 1, "{} DNS messages copied, expected 1", msgs.len());
    let a = &msgs[0];
    ensure!(a.kind == want.kind, "kind {}, expected {}", a.kind, want.kind);
    ensure!(
        a.family == FAMILY_V4 && a.resolver[..4] == want.resolver && a.resolver[4..] == [0; 12],
        "resolver {:?} (family {})",
        a.resolver,
        a.family
    );
    ensure!(a.server_port == want.server_port, "server port {}", a.server_port);
    let len = want.len;
    ensure!(
        (usize::from(a.len), usize::from(a.orig_len)) == (len, want.msg.len()),
        "len {} orig_len {}, expected {len} and {}",
        a.len,
        a.orig_len,
        want.msg.len()
    );
    ensure!(a.payload[..len] == want.msg[..len], "payload differs");
    ensure!(a.ts_ns != 0, "no timestamp");
    Ok(())
}

/// PKTGEN and CHECK: one packet, its verdict, what it left behind.
pub struct Case<T> {
    pub name: String,
    pub hook: Hook,
    pub packet: Vec<u8>,
    pub want: Verdict,
    /// Runs of the packet in one test run (the checks see them all).
    pub repeat: u32,
    pub then: Vec<Check<T>>,
}

/// A case run once.
pub fn case<T>(name: impl Into<String>, hook: Hook, packet: impl Into<Vec<u8>>, want: Verdict) -> Case<T> {
    Case { name: name.into(), hook, packet: packet.into(), want, repeat: 1, then: Vec::new() }
}

impl<T: Target> Case<T> {
    /// Runs the packet `n` times in one test run.
    pub fn repeat(mut self, n: u32) -> Self {
        self.repeat = n;
        self
    }

    pub fn then(mut self, check: Check<T>) -> Self {
        self.then.push(check);
        self
    }

    /// A check of anything (`Check::With`).
    pub fn check(self, f: impl Fn(&mut Kernel<T>) -> Result<()> + 'static) -> Self {
        self.then(Check::With(Box::new(f)))
    }

    pub fn run(&self, k: &mut Kernel<T>) -> Result<()> {
        let (ret, _) = k.test_run(self.hook, &self.packet, self.repeat)?;
        k.expect(&self.name, self.hook, ret, self.want)?;
        for check in &self.then {
            check.check(k).with_context(|| format!("{} ({})", self.name, self.hook.name()))?;
        }
        Ok(())
    }
}

/// One row of a table: a case, or SETUP (map state for the next cases).
/// A check of what a case left behind.
pub type CheckFn<T> = Box<dyn Fn(&mut Kernel<T>) -> Result<()>>;
/// A change of map state between cases.
pub type SetupFn<T> = Box<dyn FnOnce(&mut Kernel<T>) -> Result<()>>;

pub enum Step<T> {
    Case(Case<T>),
    Setup(String, SetupFn<T>),
}

impl<T> From<Case<T>> for Step<T> {
    fn from(c: Case<T>) -> Self {
        Step::Case(c)
    }
}

/// A setup step.
pub fn setup<T>(name: impl Into<String>, f: impl FnOnce(&mut Kernel<T>) -> Result<()> + 'static) -> Step<T> {
    Step::Setup(name.into(), Box::new(f))
}

/// Runs a table in order; the first failure ends it.
pub fn run<T: Target>(k: &mut Kernel<T>, table: Vec<Step<T>>) -> Result<()> {
    for step in table {
        match step {
            Step::Case(c) => c.run(k)?,
            Step::Setup(name, f) => f(k).with_context(|| format!("setup: {name}"))?,
        }
    }
    Ok(())
}
