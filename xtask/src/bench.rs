//! `cargo xtask bench`: loads the eBPF object, writes a small policy straight
//! into its maps, and runs both programs on crafted packets with
//! `BPF_PROG_TEST_RUN`. Every case asserts the program's verdict, so this
//! doubles as a smoke test of the data path (and of the verifier: loading
//! fails loudly if either program is rejected). Needs root (or CAP_BPF +
//! CAP_NET_ADMIN + CAP_PERFMON).
//!
//! Timings are the kernel's own (`duration` of the test run: the average
//! over `repeat` runs of the program, without syscall overhead).
//!
//! The DNS cases check the messages copied to `DNS_MESSAGES`: the server's
//! queries to its resolvers, and the one answer to each pending query;
//! nothing else.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use pcguard_common::{
    CLASS_ANY, CLASS_ANY_BIT, CT_FLAG_MONITORED, CT_STATE_CLOSING, CtEntry, DIR_EGRESS,
    DIR_INGRESS, DNS_KIND_ANSWER, DNS_KIND_QUERY, DNS_PAYLOAD_MAX, DnsMessage, FAMILY_V4,
    FlowEvent, FlowKey, GEN_PREFIX_BITS, IPPROTO_TCP, IPPROTO_UDP, LearnedKey, MODE_ENFORCE,
    MODE_MONITOR, Malformed, PROTO_IDX_TCP, PROTO_IDX_UDP, PortEntry, PortSlot, REASON_MALFORMED,
    REASON_NO_RULE, REASON_OUTBOUND_TO_WORKSTATION, REASON_PEER_NOT_ALLOWED,
    REASON_UNTRACKED_REPLY, STAT_DNS_ANSWERS, STAT_DNS_ANSWERS_DROPPED, STAT_DNS_QUERIES,
    ReportKey, STAT_DNS_UNSOLICITED, STAT_EVENTS_SENT, STAT_EVENTS_SUPPRESSED, Settings, VERDICT_ALLOW,
    VERDICT_DROP, names, report_set,
    peer_key_v4, peer_key_v6, port_counter_index, port_table_index, ports_index,
    rule_counter_index, slots_index,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_PIPE: u32 = 3;

/// Peer class bit of "workstations" in the bench policy.
const WORKSTATIONS: u32 = 1 << 0;
/// Peer class bit of the DNS resolvers (`Settings.resolver_mask`).
const RESOLVERS: u32 = 1 << 1;
/// Peer class bit of a cloud service learned from DNS answers
/// (`Settings.learned_mask`).
const CLOUD: u32 = 1 << 2;
const CLOUD_HOST: [u8; 4] = [203, 0, 113, 7];
const HTTPS_PORT: u16 = 443;
const CLOUD_RULE: u16 = 5;
const SERVER: [u8; 4] = [192, 168, 1, 10];
const WORKSTATION: [u8; 4] = [10, 1, 2, 3];
const STRANGER: [u8; 4] = [172, 16, 0, 5];
const LDAP_SERVER: [u8; 4] = [10, 9, 9, 9];
const RESOLVER: [u8; 4] = [192, 168, 1, 53];

const WEB_PORT: u16 = 9191;
const LDAPS_PORT: u16 = 636;
const DNS_PORT: u16 = 53;
const CLIENT_PORT: u16 = 40000;
const WEB_RULE: u16 = 1;
const LDAPS_RULE: u16 = 2;
const DNS_RULE: u16 = 3;
const WEB_LABEL: u16 = 1;
const DNS_LABEL: u16 = 3;
/// The port and rule only `write_other_policy`'s generation has.
const OTHER_PORT: u16 = 9999;
const OTHER_RULE: u16 = 4;

/// The generation the timed cases run with: 1, so that every table is
/// read at a non-zero generation offset.
const POLICY_GEN: u32 = 1;


const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Cap on the runs of cases that need a map reset between runs (two
/// syscalls per run).
const MAX_FRESH_RUNS: u32 = 200_000;

const SEC: u64 = 1_000_000_000;

/// `CT_NEW`'s size in the bench: small, so a flood of new flows churns it
/// within a case.
const BENCH_CT_NEW_ENTRIES: u32 = 1024;

/// Keeps this thread on one CPU: test runs then share one CPU's per-CPU
/// maps (the event budget is per CPU) and timings one CPU's caches.
fn pin_to_one_cpu() -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; plain syscalls.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        ensure!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub fn run(obj_path: &Path, iterations: u32, quick: bool) -> anyhow::Result<()> {
    ensure!(iterations > 0, "iterations must be > 0");
    pin_to_one_cpu()?;
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(names::CT_NEW, BENCH_CT_NEW_ENTRIES)
        .load_file(obj_path)
        .with_context(|| format!("loading {}", obj_path.display()))?;
    load_programs(&mut ebpf)?;
    write_policy(&mut ebpf)?;
    // Owned handle so runs can delete entries between test runs (the loaded
    // programs keep their own reference to the map).
    let ct = HashMap::try_from(
        ebpf.take_map(names::CONNTRACK)
            .context("no CONNTRACK map")?,
    )?;
    let ct_new = HashMap::try_from(ebpf.take_map(names::CT_NEW).context("no CT_NEW map")?)?;
    let dns = RingBuf::try_from(
        ebpf.take_map(names::DNS_MESSAGES)
            .context("no DNS_MESSAGES map")?,
    )?;
    let mut bench = Bench {
        ebpf,
        ct,
        ct_new,
        events: Vec::new(),
        dns,
        dns_copied: 0,
        iterations,
        rows: Vec::new(),
    };
    bench.ingress_cases()?;
    bench.egress_cases()?;
    if quick {
        bench.print();
        return Ok(());
    }
    bench.dns_cases()?;
    bench.pressure_cases()?;
    bench.report_cases()?;
    bench.smoke_cases()?;
    bench.untracked_cases()?;
    bench.parse_cases()?;
    bench.learned_cases()?;
    bench.generation_cases()?;
    bench.print();
    bench.check_side_effects()
}

/// Loads both programs and prints how many instructions the verifier
/// processed for each (the kernel's limit is 1,000,000).
pub fn verifier_counts(obj_path: &Path) -> anyhow::Result<()> {
    let mut ebpf = EbpfLoader::new()
        .load_file(obj_path)
        .with_context(|| format!("loading {}", obj_path.display()))?;
    load_programs(&mut ebpf)?;
    for name in [names::XDP_PROG, names::TC_PROG, names::TC_INGRESS_PROG] {
        let info = program(&mut ebpf, name)?.info()?;
        println!(
            "{name}: {} instructions verified, {} translated bytes",
            info.verified_instruction_count().unwrap_or(0),
            info.size_translated().unwrap_or(0)
        );
        println!("  program id {}", info.id());
    }
    // Keep the programs loaded (for `bpftool prog dump xlated id N`).
    if let Some(secs) = std::env::var_os("PCGUARD_HOLD").and_then(|s| s.into_string().ok()?.parse().ok()) {
        std::thread::sleep(Duration::from_secs(secs));
    }
    Ok(())
}

fn load_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let xdp: &mut Xdp = program(ebpf, names::XDP_PROG)?.try_into()?;
    xdp.load().context("verifier rejected pcguard_ingress")?;
    for (name, index) in [
        (names::TC_PROG, pcguard_common::TC_RERUN_EGRESS),
        (names::TC_INGRESS_PROG, pcguard_common::TC_RERUN_INGRESS),
    ] {
        let tc: &mut SchedClassifier = program(ebpf, name)?.try_into()?;
        tc.load().with_context(|| format!("verifier rejected {name}"))?;
        let fd = tc.fd()?.try_clone()?;
        let mut rerun: ProgramArray<_> = ProgramArray::try_from(map(ebpf, names::TC_RERUN)?)?;
        rerun.set(index, &fd, 0)?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} not in the object"))
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} not in the object"))
}

/// Writes one policy generation's tables by hand, as the daemon's datapath
/// does: `PORTS` and `SLOTS` at the generation's offset, LPM keys led by the
/// generation byte, `SETTINGS[generation]`.
struct GenWriter<'a> {
    ebpf: &'a mut Ebpf,
    generation: u32,
}

impl GenWriter<'_> {
    fn slot(
        &mut self,
        id: u32,
        allowed_mask: u32,
        class_bit: u32,
        rule: u16,
    ) -> anyhow::Result<()> {
        let mut slot = PortSlot {
            allowed_mask,
            ..Default::default()
        };
        slot.rule_by_class[class_bit as usize] = rule;
        let mut slots: Array<_, PortSlot> = Array::try_from(map(self.ebpf, names::SLOTS)?)?;
        slots.set(slots_index(self.generation, id), slot, 0)?;
        Ok(())
    }

    fn port(
        &mut self,
        dir: u32,
        proto_idx: u32,
        port: u16,
        slot: u16,
        port_idx: u16,
    ) -> anyhow::Result<()> {
        let mut ports: Array<_, PortEntry> = Array::try_from(map(self.ebpf, names::PORTS)?)?;
        let idx = port_table_index(dir, proto_idx, port);
        ports.set(
            ports_index(self.generation, idx),
            PortEntry { slot, port_idx },
            0,
        )?;
        Ok(())
    }

    fn v4(&mut self, prefix_len: u32, addr: [u8; 4], mask: u32) -> anyhow::Result<()> {
        let mut v4: LpmTrie<_, [u8; 5], u32> = LpmTrie::try_from(map(self.ebpf, names::PEERS_V4)?)?;
        let key = Key::new(
            GEN_PREFIX_BITS + prefix_len,
            peer_key_v4(self.generation, addr),
        );
        v4.insert(&key, mask, 0)?;
        Ok(())
    }

    fn v6_any(&mut self) -> anyhow::Result<()> {
        let mut v6: LpmTrie<_, [u8; 17], u32> =
            LpmTrie::try_from(map(self.ebpf, names::PEERS_V6)?)?;
        let key = Key::new(GEN_PREFIX_BITS, peer_key_v6(self.generation, [0; 16]));
        v6.insert(&key, CLASS_ANY, 0)?;
        Ok(())
    }

    fn settings(&mut self, s: Settings) -> anyhow::Result<()> {
        let mut settings: Array<_, Settings> = Array::try_from(map(self.ebpf, names::SETTINGS)?)?;
        settings.set(self.generation, s, 0)?;
        Ok(())
    }
}

/// Points `ACTIVE` at `generation`: the daemon's switch.
fn set_active(ebpf: &mut Ebpf, generation: u32) -> anyhow::Result<()> {
    let mut active: Array<_, u32> = Array::try_from(map(ebpf, names::ACTIVE)?)?;
    active.set(0, generation, 0)?;
    Ok(())
}

fn bench_settings() -> Settings {
    Settings {
        ingress_mode: MODE_ENFORCE,
        egress_mode: MODE_ENFORCE,
        allow_icmp: 1,
        ready: 1,
        no_initiate_mask: WORKSTATIONS,
        resolver_mask: RESOLVERS,
        learned_mask: CLOUD,
        tcp_timeout_ns: 7200 * SEC,
        tcp_closing_timeout_ns: 10 * SEC,
        udp_timeout_ns: 60 * SEC,
        report_interval_ns: 60 * SEC,
        event_rate: 1000,
        event_burst: 1000,
    }
}

/// Into generation `POLICY_GEN`, made active: inbound TCP 9191 from
/// workstations (rule 1), outbound TCP 636 to anyone (rule 2), outbound UDP
/// 53 to the resolvers (rule 3), whose answers are copied, outbound TCP 443
/// to the cloud class DNS answers give (rule 5); workstations must never be
/// initiated to; enforce both ways.
fn write_policy(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut w = GenWriter {
        ebpf,
        generation: POLICY_GEN,
    };
    w.slot(1, WORKSTATIONS, 0, WEB_RULE)?;
    w.slot(2, CLASS_ANY, CLASS_ANY_BIT, LDAPS_RULE)?;
    w.slot(3, RESOLVERS, RESOLVERS.trailing_zeros(), DNS_RULE)?;
    w.port(DIR_INGRESS, PROTO_IDX_TCP, WEB_PORT, 1, WEB_LABEL)?;
    w.port(DIR_EGRESS, PROTO_IDX_TCP, LDAPS_PORT, 2, 2)?;
    w.port(DIR_EGRESS, PROTO_IDX_UDP, DNS_PORT, 3, DNS_LABEL)?;
    w.slot(4, CLOUD, CLOUD.trailing_zeros(), CLOUD_RULE)?;
    w.port(DIR_EGRESS, PROTO_IDX_TCP, HTTPS_PORT, 4, 5)?;
    w.v4(8, [10, 0, 0, 0], WORKSTATIONS | CLASS_ANY)?;
    w.v4(32, RESOLVER, RESOLVERS | CLASS_ANY)?;
    w.v4(0, [0; 4], CLASS_ANY)?;
    w.v6_any()?;
    w.settings(bench_settings())?;
    set_active(ebpf, POLICY_GEN)
}

/// Into the other generation, while `POLICY_GEN` stays active: a policy
/// that differs from `write_policy`'s in every table. Port 9191 keeps slot
/// 1, whose content now allows anyone (`SLOTS`); TCP 9999 gets slot 2,
/// workstations only (`PORTS`); workstations are 172.16.0.0/12 and
/// 10.1.0.0/16, not 10.0.0.0/8 (`PEERS_V4`); ICMP is not allowed
/// (`SETTINGS`).
fn write_other_policy(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut w = GenWriter {
        ebpf,
        generation: POLICY_GEN ^ 1,
    };
    w.slot(1, CLASS_ANY, CLASS_ANY_BIT, WEB_RULE)?;
    w.slot(2, WORKSTATIONS, 0, OTHER_RULE)?;
    w.port(DIR_INGRESS, PROTO_IDX_TCP, WEB_PORT, 1, WEB_LABEL)?;
    w.port(DIR_INGRESS, PROTO_IDX_TCP, OTHER_PORT, 2, 4)?;
    w.v4(12, [172, 16, 0, 0], WORKSTATIONS | CLASS_ANY)?;
    w.v4(16, [10, 1, 0, 0], WORKSTATIONS | CLASS_ANY)?;
    w.v4(0, [0; 4], CLASS_ANY)?;
    w.v6_any()?;
    w.settings(Settings {
        allow_icmp: 0,
        ..bench_settings()
    })
}

/// Packet builders (checksums are left zero: neither hook checks them).
mod pkt {
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const ETH_P_ARP: u16 = 0x0806;
    pub const ETH_P_8021Q: u16 = 0x8100;

    pub fn eth(ethertype: u16) -> Vec<u8> {
        let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        p.extend_from_slice(&ethertype.to_be_bytes());
        p
    }

    pub fn vlan(mut frame: Vec<u8>, vid: u16) -> Vec<u8> {
        let inner: [u8; 2] = [frame[12], frame[13]];
        frame[12..14].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        let tag = [(vid >> 8) as u8, vid as u8, inner[0], inner[1]];
        frame.splice(14..14, tag);
        frame
    }

    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    /// A UDP header (length field included) and `payload`.
    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let len = (8 + payload.len()) as u16;
        let mut u = [sport, dport, len, 0].map(u16::to_be_bytes).concat();
        u.extend_from_slice(payload);
        u
    }

    pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = eth(ETH_P_IP);
        let total = (20 + l4.len()) as u16;
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    pub fn ipv6(src: [u8; 16], dst: [u8; 16], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = eth(ETH_P_IPV6);
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[proto, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    pub fn arp() -> Vec<u8> {
        let mut p = eth(ETH_P_ARP);
        p.extend_from_slice(&[0u8; 28]);
        p
    }
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    pkt::ipv4(src, dst, IPPROTO_TCP, &pkt::tcp(sport, dport, flags))
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    pkt::ipv4(src, dst, IPPROTO_UDP, &pkt::udp(sport, dport, payload))
}

/// `len` bytes standing for a DNS message (the kernel reads only the
/// header's id and QR bit): a pattern that shows bytes out of place, with
/// transaction id `txid` and QR set for a response.
fn dns_message(len: usize, txid: u16, response: bool) -> Vec<u8> {
    let mut m: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    m[..2].copy_from_slice(&txid.to_be_bytes());
    m[2] = if response { m[2] | 0x80 } else { m[2] & 0x7f };
    m
}

fn v4_key(local: [u8; 4], remote: [u8; 4], local_port: u16, remote_port: u16) -> FlowKey {
    let mut key = FlowKey {
        family: FAMILY_V4,
        proto: IPPROTO_TCP,
        local_port,
        remote_port,
        ..Default::default()
    };
    key.local_addr[..4].copy_from_slice(&local);
    key.remote_addr[..4].copy_from_slice(&remote);
    key
}

#[derive(Clone, Copy)]
enum Hook {
    Xdp,
    /// Egress (TC).
    Tc,
    /// The ingress pipeline on TC.
    TcIngress,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
            Hook::TcIngress => "tci",
        }
    }

    fn action_name(self, ret: u32) -> &'static str {
        match (self, ret) {
            (Hook::Xdp, XDP_PASS) => "XDP_PASS",
            (Hook::Xdp, XDP_DROP) => "XDP_DROP",
            (Hook::Tc | Hook::TcIngress, TC_ACT_PIPE) => "TC_ACT_PIPE",
            (Hook::Tc | Hook::TcIngress, TC_ACT_SHOT) => "TC_ACT_SHOT",
            _ => "?",
        }
    }
}

struct Row {
    case: &'static str,
    hook: Hook,
    action: u32,
    runs: u32,
    ns: f64,
    note: String,
}

struct Bench {
    ebpf: Ebpf,
    /// Established flows (`CONNTRACK`).
    ct: HashMap<MapData, FlowKey, CtEntry>,
    /// New flows (`CT_NEW`).
    ct_new: HashMap<MapData, FlowKey, CtEntry>,
    /// Events read from `EVENTS` so far.
    events: Vec<FlowEvent>,
    dns: RingBuf<MapData>,
    /// DNS messages read from `dns` so far.
    dns_copied: u64,
    iterations: u32,
    rows: Vec<Row>,
}

impl Bench {
    fn test_run(&self, hook: Hook, data: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
        let opts = TestRunOptions {
            data_in: Some(data),
            repeat,
            ..Default::default()
        };
        let name = match hook {
            Hook::Xdp => names::XDP_PROG,
            Hook::Tc => names::TC_PROG,
            Hook::TcIngress => names::TC_INGRESS_PROG,
        };
        let prog = self.ebpf.program(name).context("program vanished")?;
        let res = match hook {
            Hook::Xdp => <&Xdp>::try_from(prog)?.test_run(opts),
            Hook::Tc | Hook::TcIngress => <&SchedClassifier>::try_from(prog)?.test_run(opts),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN on {name}"))?;
        Ok((res.return_value, res.duration))
    }

    fn expect(&self, case: &str, hook: Hook, got: u32, want: u32) -> anyhow::Result<()> {
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

    /// Runs `data` `iterations` times in one test run (the kernel's average).
    fn repeated(
        &mut self,
        case: &'static str,
        hook: Hook,
        data: &[u8],
        want: u32,
        note: &str,
    ) -> anyhow::Result<f64> {
        let (ret, avg) = self.test_run(hook, data, self.iterations)?;
        self.expect(case, hook, ret, want)?;
        let ns = avg.as_nanos() as f64;
        let row = Row {
            case,
            hook,
            action: ret,
            runs: self.iterations,
            ns,
            note: note.to_owned(),
        };
        self.rows.push(row);
        Ok(ns)
    }

    /// Runs `data` once per test run, deleting the conntrack entry of `key`
    /// before each so every run takes the new-flow path. Returns the average
    /// per run, which includes the test-run timer's own overhead.
    fn fresh_loop(
        &mut self,
        case: &str,
        hook: Hook,
        data: &[u8],
        want: u32,
        key: Option<&FlowKey>,
    ) -> anyhow::Result<(u32, f64)> {
        let runs = self.iterations.min(MAX_FRESH_RUNS);
        let mut total = Duration::ZERO;
        for _ in 0..runs {
            if let Some(key) = key {
                self.forget(key)?;
            }
            let (ret, d) = self.test_run(hook, data, 1)?;
            self.expect(case, hook, ret, want)?;
            total += d;
        }
        Ok((runs, total.as_nanos() as f64 / runs as f64))
    }

    /// Moves the records on `EVENTS` to `self.events`; returns how many.
    fn drain_events(&mut self) -> anyhow::Result<usize> {
        let mut ring = RingBuf::try_from(map(&mut self.ebpf, names::EVENTS)?)?;
        let mut n = 0;
        while let Some(item) = ring.next() {
            ensure!(item.len() == size_of::<FlowEvent>(), "event of {} bytes", item.len());
            // SAFETY: FlowEvent is plain data and the length was checked.
            self.events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            n += 1;
        }
        Ok(n)
    }

    fn stat(&mut self, idx: u32) -> anyhow::Result<u64> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(map(&mut self.ebpf, names::STATS)?)?;
        Ok(stats.get(&idx, 0)?.iter().sum())
    }

    /// Removes `key` from both conntrack tables.
    fn forget(&mut self, key: &FlowKey) -> anyhow::Result<()> {
        for table in [&mut self.ct, &mut self.ct_new] {
            match table.remove(key) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `key`'s conntrack entry and whether it is established (in
    /// `CONNTRACK`) rather than new (`CT_NEW`).
    fn ct_get(&self, key: &FlowKey) -> anyhow::Result<(CtEntry, bool)> {
        if let Ok(e) = self.ct.get(key, 0) {
            return Ok((e, true));
        }
        let e = self.ct_new.get(key, 0).with_context(|| format!("no conntrack entry for {key:?}"))?;
        Ok((e, false))
    }

    /// Overwrites `key`'s entry in the table that holds it.
    fn ct_set(&mut self, key: FlowKey, entry: CtEntry) -> anyhow::Result<()> {
        if self.ct_get(&key)?.1 {
            self.ct.insert(key, entry, 0)?;
        } else {
            self.ct_new.insert(key, entry, 0)?;
        }
        Ok(())
    }

    fn ct_has(&self, key: &FlowKey) -> bool {
        self.ct_get(key).is_ok()
    }

    /// The first packet of an allowed flow (conntrack miss, policy lookup,
    /// conntrack insert) and, as `hit`, a packet of the flow once it is
    /// established: after the first packet, `reply` (on the other hook)
    /// answers it and one `hit` (the initiator's ACK) moves it from
    /// `CT_NEW` to `CONNTRACK`.
    ///
    /// Each first-packet run needs the entry of `key` gone, hence one run per
    /// test run; the timer overhead of single runs, estimated as the `hit`
    /// packet's single-run time minus its repeated time, is subtracted.
    fn first_packet(
        &mut self,
        case: &'static str,
        hook: Hook,
        data: &[u8],
        want: u32,
        key: &FlowKey,
        (reply_hook, reply): (Hook, &[u8]),
        (hit_case, hit): (&'static str, &[u8]),
    ) -> anyhow::Result<()> {
        let (runs, fresh) = self.fresh_loop(case, hook, data, want, Some(key))?;
        ensure!(self.ct_get(key)?.1 == false, "{case}: no new conntrack entry");
        let reply_want = match reply_hook {
            Hook::Xdp => XDP_PASS,
            Hook::Tc | Hook::TcIngress => TC_ACT_PIPE,
        };
        self.once(&format!("{case}: reply"), reply_hook, reply, reply_want)?;
        self.once(&format!("{case}: the initiator's ACK"), hook, hit, want)?;
        ensure!(self.ct_get(key)?.1, "{case}: not established after the handshake");
        let (_, hit_single) = self.fresh_loop(hit_case, hook, hit, want, None)?;
        let hit_repeated = self.repeated(hit_case, hook, hit, want, "")?;
        let overhead = (hit_single - hit_repeated).max(0.0);
        self.rows.push(Row {
            case,
            hook,
            action: want,
            runs,
            ns: fresh - overhead,
            note: format!("{fresh:.1} raw, minus {overhead:.1} timer overhead"),
        });
        Ok(())
    }

    fn ingress_cases(&mut self) -> anyhow::Result<()> {
        let xdp = Hook::Xdp;
        let syn = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN);
        let key = v4_key(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT);

        let ack = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_ACK);
        let hit = ("conntrack hit (ACK, established)", &ack[..]);
        let synack = tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_SYN | TCP_ACK);
        let first = "allowed SYN, first packet (policy + ct insert)";
        self.first_packet(first, xdp, &syn, XDP_PASS, &key, (Hook::Tc, &synack), hit)?;

        let repeat_syn = "allowed SYN again (policy; ct entry exists)";
        self.repeated(repeat_syn, xdp, &syn, XDP_PASS, "")?;

        let to_9999 = tcp4(WORKSTATION, SERVER, CLIENT_PORT + 1, 9999, TCP_SYN);
        self.repeated(
            "dropped SYN, no rule (9999)",
            xdp,
            &to_9999,
            XDP_DROP,
            "1 event, rest suppressed",
        )?;

        let stranger = tcp4(STRANGER, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN);
        self.repeated(
            "dropped SYN, peer not allowed",
            xdp,
            &stranger,
            XDP_DROP,
            "",
        )?;

        let vlan_syn = pkt::vlan(
            tcp4(WORKSTATION, SERVER, CLIENT_PORT + 2, WEB_PORT, TCP_SYN),
            100,
        );
        self.repeated(
            "allowed SYN in 802.1Q tag",
            xdp,
            &vlan_syn,
            XDP_PASS,
            "first run inserts, rest hit",
        )?;

        let mut v6_src = [0u8; 16];
        v6_src[..2].copy_from_slice(&[0xfd, 0]);
        v6_src[15] = 1;
        let mut v6_dst = v6_src;
        v6_dst[15] = 2;
        let v6 = pkt::ipv6(
            v6_src,
            v6_dst,
            IPPROTO_TCP,
            &pkt::tcp(CLIENT_PORT, WEB_PORT, TCP_SYN),
        );
        self.repeated("dropped IPv6 SYN, peer not allowed", xdp, &v6, XDP_DROP, "")?;

        let mut truncated = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN);
        truncated.truncate(truncated.len() - 4);
        self.repeated("malformed (truncated TCP)", xdp, &truncated, XDP_DROP, "")?;

        let icmp = pkt::ipv4(STRANGER, SERVER, 1, &[8, 0, 0, 0, 0, 0, 0, 0]);
        self.repeated("ICMP echo (allow_icmp)", xdp, &icmp, XDP_PASS, "bypass")?;

        self.repeated("ARP (non-IP)", xdp, &pkt::arp(), XDP_PASS, "test-run floor")?;

        // The same pipeline on the TC ingress hook.
        let tci = Hook::TcIngress;
        self.repeated("conntrack hit (ACK, established)", tci, &ack, TC_ACT_PIPE, "")?;
        self.repeated("dropped SYN, no rule (9999)", tci, &to_9999, TC_ACT_SHOT, "")?;
        self.repeated("dropped SYN, peer not allowed", tci, &stranger, TC_ACT_SHOT, "")?;
        self.once("tiny fragment at TC ingress", tci, &{
            let mut tiny = tcp4(STRANGER, SERVER, CLIENT_PORT, 22, TCP_SYN);
            tiny[20] = 0x20;
            tiny[16..18].copy_from_slice(&28u16.to_be_bytes());
            tiny
        }, TC_ACT_SHOT)?;
        Ok(())
    }

    fn egress_cases(&mut self) -> anyhow::Result<()> {
        let tc = Hook::Tc;
        let reply = tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_ACK);
        self.repeated("reply to inbound flow (ct hit)", tc, &reply, TC_ACT_PIPE, "")?;
        let ldaps = tcp4(SERVER, LDAP_SERVER, CLIENT_PORT + 3, LDAPS_PORT, TCP_SYN);
        let key = v4_key(SERVER, LDAP_SERVER, CLIENT_PORT + 3, LDAPS_PORT);
        let back = tcp4(
            LDAP_SERVER,
            SERVER,
            LDAPS_PORT,
            CLIENT_PORT + 3,
            TCP_SYN | TCP_ACK,
        );
        let ack = tcp4(SERVER, LDAP_SERVER, CLIENT_PORT + 3, LDAPS_PORT, TCP_ACK);
        let hit = ("outbound flow (ct hit)", &ack[..]);
        let first = "allowed outbound SYN, first packet (ldaps)";
        self.first_packet(first, tc, &ldaps, TC_ACT_PIPE, &key, (Hook::Xdp, &back), hit)?;

        self.repeated(
            "ldaps reply at ingress (ct hit)",
            Hook::Xdp,
            &back,
            XDP_PASS,
            "",
        )?;

        let to_ws = tcp4(SERVER, WORKSTATION, CLIENT_PORT + 4, 445, TCP_SYN);
        self.repeated(
            "dropped outbound SYN to workstation",
            tc,
            &to_ws,
            TC_ACT_SHOT,
            "headline alert",
        )?;

        Ok(())
    }

    /// The records on `DNS_MESSAGES`, drained.
    fn dns_messages(&mut self) -> anyhow::Result<Vec<DnsMessage>> {
        let mut msgs = Vec::new();
        while let Some(item) = self.dns.next() {
            ensure!(
                item.len() == size_of::<DnsMessage>(),
                "DNS message of {} bytes",
                item.len()
            );
            // SAFETY: DnsMessage is plain data and the length was checked.
            msgs.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        self.dns_copied += msgs.len() as u64;
        Ok(msgs)
    }

    /// Runs `data` once at `hook`: `want` verdict, and no DNS message copied.
    fn no_dns_copy(&mut self, case: &str, hook: Hook, data: &[u8], want: u32) -> anyhow::Result<()> {
        self.once(case, hook, data, want)?;
        let n = self.dns_messages()?.len();
        ensure!(n == 0, "{case}: {n} DNS messages copied, expected none");
        Ok(())
    }

    /// Runs `data` (holding the UDP payload `msg`) once at `hook`: passed,
    /// and exactly one record of `kind` on `DNS_MESSAGES` from or to
    /// `resolver` holding the first `len` bytes of `msg`.
    fn one_dns_copy(
        &mut self,
        case: &str,
        hook: Hook,
        data: &[u8],
        kind: u8,
        (resolver, server_port): ([u8; 4], u16),
        msg: &[u8],
        len: usize,
    ) -> anyhow::Result<()> {
        let want = match hook {
            Hook::Xdp => XDP_PASS,
            Hook::Tc | Hook::TcIngress => TC_ACT_PIPE,
        };
        self.once(case, hook, data, want)?;
        let msgs = self.dns_messages()?;
        ensure!(
            msgs.len() == 1,
            "{case}: {} DNS messages copied, expected 1",
            msgs.len()
        );
        let a = &msgs[0];
        ensure!(a.kind == kind, "{case}: kind {}, expected {kind}", a.kind);
        ensure!(
            a.family == FAMILY_V4 && a.resolver[..4] == resolver && a.resolver[4..] == [0; 12],
            "{case}: resolver {:?} (family {})",
            a.resolver,
            a.family
        );
        ensure!(
            a.server_port == server_port,
            "{case}: server port {}",
            a.server_port
        );
        ensure!(
            (usize::from(a.len), usize::from(a.orig_len)) == (len, msg.len()),
            "{case}: len {} orig_len {}, expected {len} and {}",
            a.len,
            a.orig_len,
            msg.len()
        );
        ensure!(a.payload[..len] == msg[..len], "{case}: payload differs");
        ensure!(a.ts_ns != 0, "{case}: no timestamp");
        Ok(())
    }

    /// A query to the resolver and its answer, `runs` times, one test run
    /// each: the average of the answer's runs (copied), minus the timer
    /// overhead of single runs (as in [`Bench::first_packet`]).
    fn dns_timed(
        &mut self,
        case: &'static str,
        query: &[u8],
        answer: &[u8],
        len: usize,
    ) -> anyhow::Result<()> {
        let runs = self.iterations.min(MAX_FRESH_RUNS);
        let mut total = Duration::ZERO;
        for i in 0..runs {
            self.once(case, Hook::Tc, query, TC_ACT_PIPE)?;
            let (ret, d) = self.test_run(Hook::Xdp, answer, 1)?;
            self.expect(case, Hook::Xdp, ret, XDP_PASS)?;
            total += d;
            if i % 64 == 63 {
                self.dns_messages()?;
            }
        }
        let n = self.dns_messages()?.len();
        ensure!(n % 2 == 0, "{case}: an odd number of DNS records");
        let stranger = tcp4(STRANGER, SERVER, CLIENT_PORT, 9999, TCP_SYN);
        let (_, single) = self.fresh_loop(case, Hook::Xdp, &stranger, XDP_DROP, None)?;
        let repeated = self.test_run(Hook::Xdp, &stranger, self.iterations)?.1;
        let overhead = (single - repeated.as_nanos() as f64).max(0.0);
        let raw = total.as_nanos() as f64 / f64::from(runs);
        self.rows.push(Row {
            case,
            hook: Hook::Xdp,
            action: XDP_PASS,
            runs,
            ns: raw - overhead,
            note: format!("{len} B copied; {raw:.1} raw, minus {overhead:.1} timer overhead"),
        });
        Ok(())
    }

    /// DNS messages: the server's queries to a resolver and the one answer
    /// to each pending query are copied (allowed or monitored flow), nothing
    /// else; answers never keep the flow alive.
    fn dns_cases(&mut self) -> anyhow::Result<()> {
        ensure!(
            self.dns_messages()?.is_empty(),
            "DNS messages before any query"
        );
        let txid = 0x4242;
        let q = dns_message(30, txid, false);
        let query = udp4(SERVER, RESOLVER, CLIENT_PORT, DNS_PORT, &q);
        let to_resolver = (RESOLVER, CLIENT_PORT);
        let tc = Hook::Tc;
        let xdp = Hook::Xdp;
        self.one_dns_copy("DNS query", tc, &query, DNS_KIND_QUERY, to_resolver, &q, 30)?;
        let key = FlowKey {
            proto: IPPROTO_UDP,
            ..v4_key(SERVER, RESOLVER, CLIENT_PORT, DNS_PORT)
        };
        let entry = self.ct_get(&key).context("DNS query not tracked")?.0;
        ensure!(
            entry.flow_dir == DIR_EGRESS as u8,
            "DNS query tracked as inbound"
        );

        // A short answer, and one longer than DNS_PAYLOAD_MAX (EDNS's 1232).
        let answer = |msg: &[u8]| udp4(RESOLVER, SERVER, DNS_PORT, CLIENT_PORT, msg);
        let short = dns_message(100, txid, true);
        let case = "DNS answer";
        self.one_dns_copy(case, xdp, &answer(&short), DNS_KIND_ANSWER, to_resolver, &short, 100)?;
        // One answer per query: a second one is not copied.
        self.no_dns_copy("second answer to one query", xdp, &answer(&short), XDP_PASS)?;
        // Another transaction id than the pending query's.
        self.one_dns_copy("DNS query again", tc, &query, DNS_KIND_QUERY, to_resolver, &q, 30)?;
        let wrong = dns_message(100, txid + 1, true);
        self.no_dns_copy("answer with another txid", xdp, &answer(&wrong), XDP_PASS)?;
        let not_response = dns_message(100, txid, false);
        self.no_dns_copy("answer without QR", xdp, &answer(&not_response), XDP_PASS)?;
        self.one_dns_copy(case, xdp, &answer(&short), DNS_KIND_ANSWER, to_resolver, &short, 100)?;

        // Answers do not keep the flow alive; queries do.
        let (entry, established) = self.ct_get(&key)?;
        ensure!(established, "a DNS flow with an answer is not established");
        let old = entry.last_seen_ns - 5 * SEC;
        self.ct_set(key, CtEntry { last_seen_ns: old, ..entry })?;
        self.no_dns_copy("unsolicited answer", xdp, &answer(&short), XDP_PASS)?;
        ensure!(
            self.ct_get(&key)?.0.last_seen_ns == old,
            "an answer refreshed the DNS flow"
        );
        self.one_dns_copy("DNS query", tc, &query, DNS_KIND_QUERY, to_resolver, &q, 30)?;
        ensure!(
            self.ct_get(&key)?.0.last_seen_ns > old,
            "a query did not refresh the DNS flow"
        );

        let long = dns_message(1232, txid, true);
        let cut = DNS_PAYLOAD_MAX;
        let case = "long DNS answer";
        self.one_dns_copy(case, xdp, &answer(&long), DNS_KIND_ANSWER, to_resolver, &long, cut)?;
        // A first fragment: the UDP length counts bytes the datagram lacks.
        self.one_dns_copy("DNS query", tc, &query, DNS_KIND_QUERY, to_resolver, &q, 30)?;
        let mut first_frag = answer(&long);
        first_frag[20] = 0x20; // More fragments, offset 0.
        first_frag.truncate(14 + 20 + 8 + 600);
        first_frag[16..18].copy_from_slice(&((20 + 8 + 600) as u16).to_be_bytes());
        let case = "DNS answer, first fragment";
        self.one_dns_copy(case, xdp, &first_frag, DNS_KIND_ANSWER, to_resolver, &long, 600)?;

        let mut later_frag = answer(&short);
        later_frag[20..22].copy_from_slice(&[0x00, 0x10]);
        self.no_dns_copy("DNS answer, later fragment", xdp, &later_frag, XDP_PASS)?;
        self.one_dns_copy("DNS query", tc, &query, DNS_KIND_QUERY, to_resolver, &q, 30)?;
        let empty = answer(&[]);
        self.no_dns_copy("empty DNS answer", xdp, &empty, XDP_PASS)?;
        // Ethernet padding after a 4-byte payload is not read as the rest
        // of a DNS header.
        let mut padded = answer(&short[..4]);
        padded.extend_from_slice(&short[4..20]);
        self.no_dns_copy("DNS header cut by the datagram", xdp, &padded, XDP_PASS)?;
        self.update_settings(|s| s.resolver_mask = 0)?;
        self.no_dns_copy("DNS answer, no resolver_mask", xdp, &answer(&short), XDP_PASS)?;
        self.no_dns_copy("DNS query, no resolver_mask", tc, &query, TC_ACT_PIPE)?;
        self.update_settings(|s| s.resolver_mask = RESOLVERS)?;

        // From port 53 on a flow the resolver initiated: not an answer.
        let inbound = FlowKey {
            local_port: CLIENT_PORT + 1,
            ..key
        };
        let entry = CtEntry {
            flow_dir: DIR_INGRESS as u8,
            ..self.ct_get(&key)?.0
        };
        self.ct.insert(inbound, entry, 0)?;
        let to_inbound = udp4(RESOLVER, SERVER, DNS_PORT, CLIENT_PORT + 1, &short);
        self.no_dns_copy("DNS answer on an inbound flow", xdp, &to_inbound, XDP_PASS)?;
        self.forget(&inbound)?;

        // A non-resolver on a monitored flow: not copied until its class is
        // in resolver_mask (monitored flows count).
        self.update_settings(|s| s.egress_mode = MODE_MONITOR)?;
        let to_stranger = udp4(SERVER, STRANGER, CLIENT_PORT, DNS_PORT, &q);
        self.no_dns_copy("DNS query to a stranger, monitor", tc, &to_stranger, TC_ACT_PIPE)?;
        self.update_settings(|s| s.egress_mode = MODE_ENFORCE)?;
        let stranger = udp4(STRANGER, SERVER, DNS_PORT, CLIENT_PORT, &short);
        self.no_dns_copy("DNS answer from a non-resolver", xdp, &stranger, XDP_PASS)?;
        let case = "DNS answer from a non-resolver (timed)";
        self.repeated(case, xdp, &stranger, XDP_PASS, "ct hit + LPM, no copy")?;
        ensure!(self.dns_messages()?.is_empty(), "{case}: copied");
        self.update_settings(|s| s.resolver_mask = RESOLVERS | CLASS_ANY)?;
        let from_stranger = (STRANGER, CLIENT_PORT);
        let case = "DNS query on a monitored flow";
        self.one_dns_copy(case, tc, &to_stranger, DNS_KIND_QUERY, from_stranger, &q, 30)?;
        let case = "DNS answer on a monitored flow";
        self.one_dns_copy(case, xdp, &stranger, DNS_KIND_ANSWER, from_stranger, &short, 100)?;
        self.update_settings(|s| s.resolver_mask = RESOLVERS)?;

        let case = "unsolicited DNS answer (timed)";
        self.repeated(case, xdp, &answer(&short), XDP_PASS, "ct hit + LPM + pending miss")?;
        self.dns_timed("DNS answer to a pending query (copied)", &query, &answer(&short), 100)?;
        self.dns_timed("long DNS answer (copy cut at 1 KiB)", &query, &answer(&long), cut)?;

        // The ingress pipeline on TC copies answers too (bpf_skb_load_bytes).
        self.one_dns_copy("DNS query", tc, &query, DNS_KIND_QUERY, to_resolver, &q, 30)?;
        let case = "DNS answer at TC ingress";
        self.one_dns_copy(case, Hook::TcIngress, &answer(&short), DNS_KIND_ANSWER, to_resolver, &short, 100)?;

        self.forget(&key)?;
        let case = "DNS answer without the query's flow";
        self.no_dns_copy(case, xdp, &answer(&short), XDP_DROP)
    }

    /// Runs `data` once and checks the verdict.
    fn once(&self, case: &str, hook: Hook, data: &[u8], want: u32) -> anyhow::Result<()> {
        let (ret, _) = self.test_run(hook, data, 1)?;
        self.expect(case, hook, ret, want)
    }

    /// Changes the settings of the active generation in place.
    fn update_settings(&mut self, f: impl FnOnce(&mut Settings)) -> anyhow::Result<()> {
        let mut settings: Array<_, Settings> =
            Array::try_from(map(&mut self.ebpf, names::SETTINGS)?)?;
        let mut s = settings.get(&POLICY_GEN, 0)?;
        f(&mut s);
        settings.set(POLICY_GEN, s, 0)?;
        Ok(())
    }

    /// Single runs through the paths the timed cases leave out: FIN/RST,
    /// monitor mode, a policy not yet ready.
    fn smoke_cases(&mut self) -> anyhow::Result<()> {
        let (xdp, tc) = (Hook::Xdp, Hook::Tc);
        let key = v4_key(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT);
        let fin = tcp4(
            SERVER,
            WORKSTATION,
            WEB_PORT,
            CLIENT_PORT,
            TCP_FIN | TCP_ACK,
        );
        self.once("FIN on inbound flow", tc, &fin, TC_ACT_PIPE)?;
        let state = self.ct_get(&key)?.0.state;
        ensure!(
            state == CT_STATE_CLOSING,
            "FIN did not mark the flow closing"
        );
        let rst = tcp4(
            WORKSTATION,
            SERVER,
            CLIENT_PORT,
            WEB_PORT,
            TCP_RST | TCP_ACK,
        );
        self.once("RST on inbound flow", xdp, &rst, XDP_PASS)?;
        ensure!(
            !self.ct_has(&key),
            "RST left the conntrack entry"
        );

        self.update_settings(|s| s.ingress_mode = MODE_MONITOR)?;
        let port = CLIENT_PORT + 5;
        let syn = tcp4(WORKSTATION, SERVER, port, 9999, TCP_SYN);
        self.once("SYN to 9999 in monitor mode", xdp, &syn, XDP_PASS)?;
        let entry = self.ct_get(&v4_key(SERVER, WORKSTATION, 9999, port))?.0;
        ensure!(
            entry.flags & CT_FLAG_MONITORED != 0,
            "monitored flow not flagged"
        );
        let reply = tcp4(SERVER, WORKSTATION, 9999, port, TCP_SYN | TCP_ACK);
        self.once("reply of a monitored flow", tc, &reply, TC_ACT_PIPE)?;

        self.update_settings(|s| {
            s.ingress_mode = MODE_ENFORCE;
            s.ready = 0;
        })?;
        let stranger = tcp4(STRANGER, SERVER, CLIENT_PORT, 9999, TCP_SYN);
        self.once("SYN to 9999, policy not ready", xdp, &stranger, XDP_PASS)?;
        self.update_settings(|s| s.ready = 1)?;
        self.once("SYN to 9999, policy ready", xdp, &stranger, XDP_DROP)
    }

    /// A flood of new allowed flows (more than `CT_NEW` holds) churns
    /// `CT_NEW` only: the established flow keeps its entry and its packets
    /// pass.
    fn pressure_cases(&mut self) -> anyhow::Result<()> {
        let key = v4_key(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT);
        ensure!(self.ct_get(&key)?.1, "the ingress flow is not established");
        let promoted_before = self.stat(pcguard_common::STAT_CT_PROMOTED)?;
        let flood = 4 * BENCH_CT_NEW_ENTRIES;
        for i in 0..flood {
            let syn = tcp4(WORKSTATION, SERVER, 1024 + i as u16, WEB_PORT, TCP_SYN);
            self.once("flood of new allowed flows", Hook::Xdp, &syn, XDP_PASS)?;
        }
        let new = self.ct_new.keys().filter(|k| k.is_ok()).count();
        ensure!(
            new <= BENCH_CT_NEW_ENTRIES as usize,
            "CT_NEW holds {new} entries, more than its {BENCH_CT_NEW_ENTRIES}"
        );
        ensure!(self.ct_get(&key)?.1, "the flood evicted the established flow");
        let ack = tcp4(WORKSTATION, SERVER, CLIENT_PORT, WEB_PORT, TCP_ACK);
        self.once("established flow after the flood", Hook::Xdp, &ack, XDP_PASS)?;
        ensure!(
            self.stat(pcguard_common::STAT_CT_PROMOTED)? == promoted_before,
            "a SYN promoted a flow"
        );
        Ok(())
    }

    /// Reports: one per (source, destination port, reason) per interval,
    /// with the count of what it stands for; at most `event_rate` per
    /// second per CPU.
    fn report_cases(&mut self) -> anyhow::Result<()> {
        let xdp = Hook::Xdp;
        self.drain_events()?;
        let before = self.events.len();
        // 100 source ports of one address to one denied port: one report.
        for i in 0..100u16 {
            let syn = tcp4(STRANGER, SERVER, 2000 + i, 9997, TCP_SYN);
            self.once("one source, many ports", xdp, &syn, XDP_DROP)?;
        }
        ensure!(self.drain_events()? == 1, "a port scan from one address gave several reports");
        // Past the interval, the next report counts the 99 in between.
        self.update_settings(|s| s.report_interval_ns = 1)?;
        // The programs' clock is the coarse one (a tick is a few ms).
        std::thread::sleep(Duration::from_millis(20));
        let syn = tcp4(STRANGER, SERVER, 3000, 9997, TCP_SYN);
        self.once("after the interval", xdp, &syn, XDP_DROP)?;
        self.drain_events()?;
        let last = self.events.last().context("no report after the interval")?;
        ensure!(
            self.events.len() == before + 2 && last.repeats == 99,
            "second report: {} new, repeats {}",
            self.events.len() - before,
            last.repeats
        );
        // A budget of 3 events: 10 new sources, 3 reports, 7 counted.
        self.update_settings(|s| {
            s.event_rate = 3;
            s.event_burst = 3;
        })?;
        let limited = self.stat(pcguard_common::STAT_EVENTS_RATE_LIMITED)?;
        for i in 0..10u8 {
            let syn = tcp4([172, 16, 1, i], SERVER, 4000, 9996, TCP_SYN);
            self.once("ten sources, budget of three", xdp, &syn, XDP_DROP)?;
        }
        let sent = self.drain_events()?;
        let limited = self.stat(pcguard_common::STAT_EVENTS_RATE_LIMITED)? - limited;
        ensure!(
            (sent, limited) == (3, 7),
            "budget of 3: {sent} reports sent, {limited} rate-limited"
        );
        self.update_settings(|s| {
            s.event_rate = 1000;
            s.event_burst = 1000;
            s.report_interval_ns = 60 * SEC;
        })?;
        self.report_set_cases()
    }

    /// `REPORTED` holds two keys per set: three sources whose keys share a
    /// set, and the third evicts the older of the first two, which is then
    /// reported again; the other stays suppressed.
    fn report_set_cases(&mut self) -> anyhow::Result<()> {
        let xdp = Hook::Xdp;
        let port = 9995;
        let key = |addr: [u8; 4]| {
            let mut remote_addr = [0; 16];
            remote_addr[..4].copy_from_slice(&addr);
            ReportKey {
                family: FAMILY_V4,
                proto: IPPROTO_TCP,
                direction: DIR_INGRESS as u8,
                reason: REASON_NO_RULE,
                port,
                verdict: VERDICT_DROP as u8,
                _pad: 0,
                remote_addr,
            }
        };
        // Three addresses of 172.17.0.0/16 in one set (there are many).
        let mut by_set = std::collections::HashMap::<u32, Vec<[u8; 4]>>::new();
        let same = (0..=u16::MAX)
            .map(|i| [172, 17, (i >> 8) as u8, i as u8])
            .find_map(|a| {
                let v = by_set.entry(report_set(&key(a).words())).or_default();
                v.push(a);
                (v.len() == 3).then(|| v.clone())
            })
            .context("no three addresses share a set")?;
        let (a, b, c) = (same[0], same[1], same[2]);
        self.drain_events()?;
        // Tokens again after the budget of three above (1000/s).
        std::thread::sleep(Duration::from_millis(20));
        let step = |bench: &mut Self, what: &str, src: [u8; 4], want: usize| -> anyhow::Result<()> {
            let syn = tcp4(src, SERVER, 5000, port, TCP_SYN);
            bench.once(what, xdp, &syn, XDP_DROP)?;
            let got = bench.drain_events()?;
            ensure!(got == want, "{what}: {got} reports, want {want}");
            if want == 1 {
                let e = bench.events.last().context("no event")?;
                ensure!(e.key.remote_addr[..4] == src, "{what}: report of {:?}", &e.key.remote_addr[..4]);
            }
            Ok(())
        };
        step(self, "first key of a set", a, 1)?;
        step(self, "second key of the set", b, 1)?;
        step(self, "first key again (held)", a, 0)?;
        step(self, "third key evicts the older", c, 1)?;
        step(self, "second key still held", b, 0)?;
        step(self, "evicted key is reported again", a, 1)?;
        Ok(())
    }

    /// No adoption: a packet of a flow conntrack does not hold passes only
    /// if a rule allows a flow opened in its own direction.
    fn untracked_cases(&mut self) -> anyhow::Result<()> {
        let (xdp, tc) = (Hook::Xdp, Hook::Tc);
        let port = CLIENT_PORT + 20;
        // Replies of no flow pcguard tracks, from the peer of an outbound
        // rule using that rule's port as source port.
        let synack = tcp4(LDAP_SERVER, SERVER, LDAPS_PORT, port, TCP_SYN | TCP_ACK);
        self.once("untracked SYN+ACK from ldaps", xdp, &synack, XDP_DROP)?;
        let to_ssh = tcp4(LDAP_SERVER, SERVER, LDAPS_PORT, 22, TCP_ACK);
        self.once("untracked ACK from ldaps to 22", xdp, &to_ssh, XDP_DROP)?;
        ensure!(
            !self.ct_has(&v4_key(SERVER, LDAP_SERVER, port, LDAPS_PORT))
                && !self.ct_has(&v4_key(SERVER, LDAP_SERVER, 22, LDAPS_PORT)),
            "an untracked reply created a conntrack entry"
        );
        // The server's "replies" from an inbound service port.
        let to_smb = tcp4(SERVER, WORKSTATION, WEB_PORT, 445, TCP_ACK);
        self.once("untracked ACK from 9191 to a workstation's 445", tc, &to_smb, TC_ACT_SHOT)?;
        let reply = tcp4(SERVER, WORKSTATION, WEB_PORT, port, TCP_SYN | TCP_ACK);
        self.once("untracked SYN+ACK from 9191", tc, &reply, TC_ACT_SHOT)?;
        let case = "dropped untracked ACK (reverse lookup)";
        self.repeated(case, xdp, &to_ssh, XDP_DROP, "reported as untracked_reply")?;
        // Allowed in its own direction: a lost entry is re-created.
        let ack = tcp4(WORKSTATION, SERVER, port, WEB_PORT, TCP_ACK);
        self.once("ACK to 9191 without an entry", xdp, &ack, XDP_PASS)?;
        let entry = self.ct_get(&v4_key(SERVER, WORKSTATION, WEB_PORT, port))?.0;
        ensure!(entry.flow_dir == DIR_INGRESS as u8, "re-created entry not inbound");
        let out = tcp4(SERVER, LDAP_SERVER, port, LDAPS_PORT, TCP_ACK);
        self.once("ACK to ldaps without an entry", tc, &out, TC_ACT_PIPE)?;
        self.once("ldaps reply after the re-created entry", xdp, &synack, XDP_PASS)?;
        Ok(())
    }

    /// The stricter parse: what the kernel would deliver differently from a
    /// naive reading of the frame is malformed and dropped.
    fn parse_cases(&mut self) -> anyhow::Result<()> {
        let xdp = Hook::Xdp;
        let port = CLIENT_PORT + 30;
        // RFC 1858: 8 bytes of a SYN's TCP header in a first fragment, the
        // rest of an "ACK" header after the datagram's end.
        let mut tiny = tcp4(STRANGER, SERVER, port, 22, TCP_SYN);
        tiny[20] = 0x20; // More fragments.
        tiny[16..18].copy_from_slice(&28u16.to_be_bytes());
        tiny[14 + 20 + 13] = TCP_ACK;
        self.once("tiny first fragment with a fake ACK tail", xdp, &tiny, XDP_DROP)?;
        // The TCP header beyond the IP total length (padding trick).
        let mut cut = tcp4(WORKSTATION, SERVER, port, WEB_PORT, TCP_SYN);
        cut[16..18].copy_from_slice(&30u16.to_be_bytes());
        self.once("TCP header past the IP total length", xdp, &cut, XDP_DROP)?;
        // VLAN tags: as many as the parser walks pass, one more fails closed.
        let mut tagged = tcp4(WORKSTATION, SERVER, port + 1, WEB_PORT, TCP_SYN);
        for _ in 0..pcguard_common::MAX_VLAN_TAGS {
            tagged = pkt::vlan(tagged, 0);
        }
        self.once("allowed SYN in 8 priority tags", xdp, &tagged, XDP_PASS)?;
        let nine = pkt::vlan(tagged, 0);
        self.once("SYN in 9 priority tags", xdp, &nine, XDP_DROP)?;
        let case = "dropped tiny fragment (malformed)";
        self.repeated(case, xdp, &tiny, XDP_DROP, "")?;
        Ok(())
    }

    /// DNS-learned addresses (`LEARNED`, per generation): one lookup only
    /// when a rule for the port allows a learnable class.
    fn learned_cases(&mut self) -> anyhow::Result<()> {
        let tc = Hook::Tc;
        let port = CLIENT_PORT + 40;
        let syn = |p: u16| tcp4(SERVER, CLOUD_HOST, p, HTTPS_PORT, TCP_SYN);
        self.once("SYN to 443 of an unlearned address", tc, &syn(port), TC_ACT_SHOT)?;
        let key = |generation: u32| {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&CLOUD_HOST);
            LearnedKey { generation: generation as u8, family: FAMILY_V4, _pad: [0; 2], addr }
        };
        let mut learned: HashMap<_, LearnedKey, u32> =
            HashMap::try_from(map(&mut self.ebpf, names::LEARNED)?)?;
        learned.insert(key(POLICY_GEN ^ 1), CLOUD, 0)?;
        self.once("learned in the other generation only", tc, &syn(port + 1), TC_ACT_SHOT)?;
        let case = "dropped outbound SYN, learned lookup miss";
        self.repeated(case, tc, &syn(port + 1), TC_ACT_SHOT, "static miss + LEARNED miss")?;
        let mut learned: HashMap<_, LearnedKey, u32> =
            HashMap::try_from(map(&mut self.ebpf, names::LEARNED)?)?;
        learned.insert(key(POLICY_GEN), CLOUD, 0)?;
        self.once("SYN to 443 of a learned address", tc, &syn(port + 2), TC_ACT_PIPE)?;
        let entry = self.ct_get(&v4_key(SERVER, CLOUD_HOST, port + 2, HTTPS_PORT))?.0;
        ensure!(entry.rule == CLOUD_RULE, "learned flow has rule {}", entry.rule);
        let mut learned: HashMap<_, LearnedKey, u32> =
            HashMap::try_from(map(&mut self.ebpf, names::LEARNED)?)?;
        learned.remove(&key(POLICY_GEN))?;
        learned.remove(&key(POLICY_GEN ^ 1))?;
        self.once("SYN to 443 after the address is forgotten", tc, &syn(port + 3), TC_ACT_SHOT)
    }

    /// The switch between policy generations: a generation never written
    /// lets everything pass; a policy written into the inactive generation
    /// changes nothing until `ACTIVE` points at it, then every table
    /// (`PORTS`, `SLOTS`, `PEERS_V4`, `SETTINGS`) answers from it, and
    /// switching back restores the old verdicts.
    fn generation_cases(&mut self) -> anyhow::Result<()> {
        let xdp = Hook::Xdp;
        let other = POLICY_GEN ^ 1;
        let port = CLIENT_PORT + 10;
        let ws_other = tcp4(WORKSTATION, SERVER, port, OTHER_PORT, TCP_SYN);
        let stranger_web = tcp4(STRANGER, SERVER, port, WEB_PORT, TCP_SYN);
        let stranger_other = tcp4(STRANGER, SERVER, port, OTHER_PORT, TCP_SYN);
        let ldap_other = tcp4(LDAP_SERVER, SERVER, port, OTHER_PORT, TCP_SYN);
        let icmp = pkt::ipv4(STRANGER, SERVER, 1, &[8, 0, 0, 0, 0, 0, 0, 0]);
        let keys = [
            v4_key(SERVER, WORKSTATION, OTHER_PORT, port),
            v4_key(SERVER, STRANGER, WEB_PORT, port),
            v4_key(SERVER, STRANGER, OTHER_PORT, port),
            v4_key(SERVER, LDAP_SERVER, OTHER_PORT, port),
        ];
        // Each packet opens a new flow: forget what an earlier run tracked.
        let check = |bench: &mut Self, gen_name: &str, want: [u32; 5]| -> anyhow::Result<()> {
            for key in &keys {
                bench.forget(key)?;
            }
            let cases = [
                ("workstation SYN to 9999", &ws_other),
                ("stranger SYN to 9191", &stranger_web),
                ("stranger SYN to 9999", &stranger_other),
                ("10.9.9.9 SYN to 9999", &ldap_other),
                ("ICMP echo", &icmp),
            ];
            for ((case, data), want) in cases.into_iter().zip(want) {
                bench.once(&format!("{case}, {gen_name}"), xdp, data, want)?;
            }
            Ok(())
        };

        // A generation never written (`ready == 0`), like generation 0
        // before the daemon's first switch: everything passes (bypass).
        set_active(&mut self.ebpf, other)?;
        check(self, "generation not written", [XDP_PASS; 5])?;
        set_active(&mut self.ebpf, POLICY_GEN)?;

        let old = [XDP_DROP, XDP_DROP, XDP_DROP, XDP_DROP, XDP_PASS];
        check(self, "old policy", old)?;
        write_other_policy(&mut self.ebpf)?;
        check(self, "new policy written, not active", old)?;
        set_active(&mut self.ebpf, other)?;
        // 9999: the new `PORTS`; stranger to 9191: the new slot 1; 10.9.9.9
        // is no workstation in the new `PEERS_V4` (it is in the old); ICMP:
        // the new `SETTINGS`.
        check(
            self,
            "new policy active",
            [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP],
        )?;
        let rule = rule_counter_index(DIR_INGRESS, OTHER_RULE);
        let rules: PerCpuArray<_, pcguard_common::Counters> =
            PerCpuArray::try_from(map(&mut self.ebpf, names::RULE_COUNTERS)?)?;
        let n: u64 = rules
            .get(&rule, 0)?
            .iter()
            .map(|c| c.packets[VERDICT_ALLOW])
            .sum();
        ensure!(
            n == 2,
            "new policy's rule {OTHER_RULE} counted {n} allowed packets, expected 2"
        );
        set_active(&mut self.ebpf, POLICY_GEN)?;
        check(self, "switched back", old)?;
        for key in &keys {
            self.forget(key)?;
        }
        Ok(())
    }

    fn print(&self) {
        println!(
            "{:<48} {:<4} {:<12} {:>9} {:>10}  note",
            "case", "hook", "action", "runs", "ns/pkt"
        );
        for r in &self.rows {
            println!(
                "{:<48} {:<4} {:<12} {:>9} {:>10.1}  {}",
                r.case,
                r.hook.name(),
                r.hook.action_name(r.action),
                r.runs,
                r.ns,
                r.note
            );
        }
        println!(
            "ns/pkt is the kernel's average per run. The ARP row (Ethernet parse, one counter) \
             approximates BPF_PROG_TEST_RUN's own per-run cost."
        );
    }

    /// Counters and events the cases above must have produced.
    fn check_side_effects(&mut self) -> anyhow::Result<()> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(map(&mut self.ebpf, names::STATS)?)?;
        let stat = |i: u32| -> anyhow::Result<u64> { Ok(stats.get(&i, 0)?.iter().sum()) };
        let (sent, suppressed) = (stat(STAT_EVENTS_SENT)?, stat(STAT_EVENTS_SUPPRESSED)?);
        println!("events sent {sent}, suppressed {suppressed}");
        ensure!(
            sent >= 4,
            "expected at least 4 events (no rule, peer, malformed, outbound), got {sent}"
        );
        let (answers, queries) = (stat(STAT_DNS_ANSWERS)?, stat(STAT_DNS_QUERIES)?);
        let (dropped, unsolicited) = (stat(STAT_DNS_ANSWERS_DROPPED)?, stat(STAT_DNS_UNSOLICITED)?);
        println!(
            "DNS queries copied {queries}, answers copied {answers}, dropped {dropped}, unsolicited {unsolicited}"
        );
        ensure!(
            answers + queries == self.dns_copied && dropped == 0,
            "DNS stats: {queries} queries and {answers} answers copied, {dropped} dropped; {} read",
            self.dns_copied
        );
        ensure!(unsolicited > 0, "no unsolicited DNS answer counted");

        let counters: PerCpuArray<_, pcguard_common::Counters> =
            PerCpuArray::try_from(map(&mut self.ebpf, names::PORT_COUNTERS)?)?;
        let web = port_counter_index(DIR_INGRESS, PROTO_IDX_TCP, WEB_LABEL);
        let allowed: u64 = counters
            .get(&web, 0)?
            .iter()
            .map(|c| c.packets[VERDICT_ALLOW])
            .sum();
        println!("ingress tcp/{WEB_PORT} allowed packets: {allowed}");
        ensure!(
            allowed >= u64::from(self.iterations),
            "web port counter too low: {allowed}"
        );

        // Rule 1 is class bit 0 of its slot, rule 2 class bit 31: both ends
        // of the lowest-set-bit search.
        let rules: PerCpuArray<_, pcguard_common::Counters> =
            PerCpuArray::try_from(map(&mut self.ebpf, names::RULE_COUNTERS)?)?;
        for (dir, rule) in [
            (DIR_INGRESS, WEB_RULE),
            (DIR_EGRESS, LDAPS_RULE),
            (DIR_INGRESS, LDAPS_RULE),
        ] {
            let idx = rule_counter_index(dir, rule);
            let n: u64 = rules
                .get(&idx, 0)?
                .iter()
                .map(|c| c.packets[VERDICT_ALLOW])
                .sum();
            ensure!(
                n > 0,
                "rule {rule} (direction {dir}) counted no allowed packet"
            );
        }

        self.drain_events()?;
        let reasons: Vec<u8> = self.events.iter().map(|ev| ev.reason).collect();
        let details: Vec<u8> = self
            .events
            .iter()
            .filter(|ev| ev.reason == REASON_MALFORMED)
            .map(|ev| ev.detail)
            .collect();
        for want in [Malformed::L4Truncated] {
            ensure!(
                details.contains(&(want as u8)),
                "no malformed event with detail {} (got {details:?})",
                want.as_str()
            );
        }
        for want in [
            REASON_NO_RULE,
            REASON_PEER_NOT_ALLOWED,
            REASON_OUTBOUND_TO_WORKSTATION,
            REASON_UNTRACKED_REPLY,
            REASON_MALFORMED,
        ] {
            ensure!(
                reasons.contains(&want),
                "no event with reason {want} (got {reasons:?})"
            );
        }
        println!("event reasons: {reasons:?}");
        Ok(())
    }
}
