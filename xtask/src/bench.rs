//! `cargo xtask bench`: ns per packet of each program path, from
//! `BPF_PROG_TEST_RUN` on the kernel tests' packets, with the kernel tests'
//! policy (`pcguard_tests::kernel::POLICY`) loaded through the daemon's own
//! path (site config, compile, `Datapath::load` under a bpffs directory of
//! its own, `Datapath::apply`). Needs root (or CAP_BPF + CAP_NET_ADMIN +
//! CAP_PERFMON).
//!
//! Timing only: the verdict cases, with their counters, events, conntrack
//! entries and DNS copies, are the kernel tests (tests/tests/kernel,
//! `cargo test -p pcguard-tests --test kernel`). Each timed row still
//! checks its verdict, so that it times the path it names.
//!
//! Timings are the kernel's own (`duration` of the test run: the average
//! over `repeat` runs of the program, without syscall overhead).
//!
//! xtask itself must build before `cargo xtask deps` installed what
//! pcguard's build script needs, so it depends on pcguard only with the
//! `datapath` feature: `cargo xtask bench` runs itself again with it.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{SchedClassifier, Xdp},
};
use pcguard_common::names;

/// Without the `datapath` feature: this task again, with it.
#[cfg(not(feature = "datapath"))]
pub fn run(_obj_path: &Path, iterations: u32, quick: bool, trace: bool) -> anyhow::Result<()> {
    let mut c = crate::cargo();
    let features = if trace { "trace" } else { "datapath" };
    c.args(["run", "--quiet", "--package", "xtask", "--features", features, "--", "bench", "--iterations"])
        .arg(iterations.to_string());
    if quick {
        c.arg("--quick");
    }
    if trace {
        c.arg("--trace");
    }
    crate::run(&mut c)
}

/// The timed cases (`quick`: the ingress and egress ones only), printed as
/// a table. The object is pcguard's own (the `Datapath`'s).
#[cfg(feature = "datapath")]
pub fn run(_obj_path: &Path, iterations: u32, quick: bool, trace: bool) -> anyhow::Result<()> {
    timed::run(iterations, quick, trace)
}

/// Loads both programs and prints how many instructions the verifier
/// processed for each (the kernel's limit is 1,000,000).
pub fn verifier_counts(obj_path: &Path) -> anyhow::Result<()> {
    let mut ebpf = EbpfLoader::new().load_file(obj_path).with_context(|| format!("loading {}", obj_path.display()))?;
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
    for (name, index) in
        [(names::TC_PROG, pcguard_common::TC_RERUN_EGRESS), (names::TC_INGRESS_PROG, pcguard_common::TC_RERUN_INGRESS)]
    {
        let tc: &mut SchedClassifier = program(ebpf, name)?.try_into()?;
        tc.load().with_context(|| format!("verifier rejected {name}"))?;
        let fd = tc.fd()?.try_clone()?;
        let mut rerun: ProgramArray<_> = ProgramArray::try_from(map(ebpf, names::TC_RERUN)?)?;
        rerun.set(index, &fd, 0)?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).with_context(|| format!("program {name} not in the object"))
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name).with_context(|| format!("map {name} not in the object"))
}

#[cfg(feature = "datapath")]
mod timed {
    use std::{path::PathBuf, time::Duration};

    use anyhow::{Context as _, ensure};
    use aya::Ebpf;
    use pcguard::datapath::{Datapath, MapSizes, Object};
    use pcguard_common::{IPPROTO_TCP, MODE_MONITOR};
    use pcguard_testkit::{
        dns::filler,
        frame::{TCP_ACK, TCP_SYN, arp, icmp4_echo, ipv6, tcp, tcp4, udp4, vlan},
    };
    use pcguard_tests::kernel::{
        CLIENT_PORT, CLOUD_HOST, DNS_PORT, HTTPS_PORT, Hook, Kernel, LDAP_SERVER, LDAPS_PORT, OTHER_PORT, POLICY,
        RESOLVER, SERVER, STRANGER, Target, Verdict, WEB_PORT, WORKSTATION, pin_to_one_cpu, v4_key,
    };

    const PASS: Verdict = Verdict::Pass;
    const DROP: Verdict = Verdict::Drop;

    /// Cap on the runs of cases that need a map reset between runs (two
    /// syscalls per run).
    const MAX_FRESH_RUNS: u32 = 200_000;

    /// The data path, loaded and applied; its pins removed on drop.
    struct Loaded {
        dp: Option<Datapath>,
        dir: PathBuf,
        cloud: u32,
    }

    impl Target for Loaded {
        fn ebpf(&mut self) -> &mut Ebpf {
            self.dp.as_mut().expect("loaded until drop").ebpf_mut()
        }
    }

    impl Drop for Loaded {
        fn drop(&mut self) {
            if let Some(dp) = self.dp.take() {
                let _ = dp.shutdown(true);
            }
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    impl Loaded {
        fn dp(&mut self) -> &mut Datapath {
            self.dp.as_mut().expect("loaded until drop")
        }

        /// Applies `config`, as a reload does.
        fn apply(&mut self, config: &str) -> anyhow::Result<()> {
            let cfg = pcguard::config::parse(config, "bench.toml")?;
            self.dp().apply(&pcguard::policy::compile(&cfg)?, &[])?;
            Ok(())
        }
    }

    fn load(object: Object) -> anyhow::Result<Kernel<Loaded>> {
        let cfg = pcguard::config::parse(POLICY, "bench.toml")?;
        let policy = pcguard::policy::compile(&cfg)?;
        let cloud = policy.classes.iter().position(|c| c.as_deref() == Some("cloud")).context("no cloud class")?;
        let dir = PathBuf::from(format!("/sys/fs/bpf/pcguard-bench-{}", std::process::id()));
        let mut dp =
            Datapath::load_object(&dir, &MapSizes::of(&cfg), object).context("loading the data path (root needed)")?;
        dp.apply(&policy, &[])?;
        Kernel::new(Loaded { dp: Some(dp), dir, cloud: 1 << cloud })
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
        k: Kernel<Loaded>,
        iterations: u32,
        rows: Vec<Row>,
        /// With the trace object: reads (and discards) its records.
        drain: Option<Box<dyn FnMut()>>,
    }

    pub fn run(iterations: u32, quick: bool, trace: bool) -> anyhow::Result<()> {
        ensure!(iterations > 0, "iterations must be > 0");
        pin_to_one_cpu()?;
        let object = if trace { Object::Trace } else { Object::Default };
        let mut bench = Bench { k: load(object)?, iterations, rows: Vec::new(), drain: None };
        if trace {
            bench.drain = Some(trace_drain(bench.k.target.dp())?);
        }
        bench.ingress_cases()?;
        bench.egress_cases()?;
        if !quick {
            bench.dns_cases()?;
            bench.untracked_cases()?;
            bench.parse_cases()?;
            bench.learned_cases()?;
        }
        bench.print();
        Ok(())
    }

    /// Reads the trace object's records into a logger that keeps none.
    #[cfg(feature = "trace")]
    fn trace_drain(dp: &mut Datapath) -> anyhow::Result<Box<dyn FnMut()>> {
        struct Discard;
        impl log::Log for Discard {
            fn enabled(&self, _: &log::Metadata) -> bool {
                true
            }
            fn log(&self, _: &log::Record) {}
            fn flush(&self) {}
        }
        let mut records = dp.trace_logger(Discard)?;
        Ok(Box::new(move || records.flush()))
    }

    #[cfg(not(feature = "trace"))]
    fn trace_drain(_: &mut Datapath) -> anyhow::Result<Box<dyn FnMut()>> {
        anyhow::bail!("the bench of the trace object needs xtask's `trace` feature")
    }

    impl Bench {
        /// Runs `data` `iterations` times in one test run (the kernel's
        /// average).
        fn repeated(
            &mut self,
            case: &'static str,
            hook: Hook,
            data: &[u8],
            want: Verdict,
            note: &str,
        ) -> anyhow::Result<f64> {
            if let Some(drain) = &mut self.drain {
                drain();
            }
            let (ret, avg) = self.k.test_run(hook, data, self.iterations)?;
            self.k.expect(case, hook, ret, want)?;
            let ns = avg.as_nanos() as f64;
            self.rows.push(Row { case, hook, action: ret, runs: self.iterations, ns, note: note.to_owned() });
            Ok(ns)
        }

        /// Runs `data` once per test run, deleting the conntrack entry of
        /// `key` before each so every run takes the new-flow path. Returns
        /// the average per run, which includes the test-run timer's own
        /// overhead.
        fn fresh_loop(
            &mut self,
            case: &str,
            hook: Hook,
            data: &[u8],
            want: Verdict,
            key: Option<&pcguard_common::FlowKey>,
        ) -> anyhow::Result<(u32, f64)> {
            let runs = self.iterations.min(MAX_FRESH_RUNS);
            let mut total = Duration::ZERO;
            for _ in 0..runs {
                if let Some(key) = key {
                    self.k.forget(key)?;
                }
                if let Some(drain) = &mut self.drain {
                    drain();
                }
                let (ret, d) = self.k.test_run(hook, data, 1)?;
                self.k.expect(case, hook, ret, want)?;
                total += d;
            }
            Ok((runs, total.as_nanos() as f64 / runs as f64))
        }

        /// The first packet of an allowed flow (conntrack miss, policy
        /// lookup, conntrack insert) and, as `hit`, a packet of the flow once
        /// it is established: after the first packet, `reply` (on the other
        /// hook) answers it and one `hit` (the initiator's ACK) moves it
        /// from `CT_NEW` to `CONNTRACK`.
        ///
        /// Each first-packet run needs the entry of `key` gone, hence one
        /// run per test run; the timer overhead of single runs, estimated as
        /// the `hit` packet's single-run time minus its repeated time, is
        /// subtracted.
        #[allow(clippy::too_many_arguments)]
        fn first_packet(
            &mut self,
            case: &'static str,
            hook: Hook,
            data: &[u8],
            key: &pcguard_common::FlowKey,
            (reply_hook, reply): (Hook, &[u8]),
            (hit_case, hit): (&'static str, &[u8]),
        ) -> anyhow::Result<()> {
            let (runs, fresh) = self.fresh_loop(case, hook, data, PASS, Some(key))?;
            self.k.once(&format!("{case}: reply"), reply_hook, reply, PASS)?;
            self.k.once(&format!("{case}: the initiator's ACK"), hook, hit, PASS)?;
            let (_, hit_single) = self.fresh_loop(hit_case, hook, hit, PASS, None)?;
            let hit_repeated = self.repeated(hit_case, hook, hit, PASS, "")?;
            let overhead = (hit_single - hit_repeated).max(0.0);
            self.rows.push(Row {
                case,
                hook,
                action: PASS.code(hook),
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
            self.first_packet(first, xdp, &syn, &key, (Hook::Tc, &synack), hit)?;
            self.repeated("allowed SYN again (policy; ct entry exists)", xdp, &syn, PASS, "")?;
            let to_9999 = tcp4(WORKSTATION, SERVER, CLIENT_PORT + 1, OTHER_PORT, TCP_SYN);
            self.repeated("dropped SYN, no rule (9999)", xdp, &to_9999, DROP, "1 event, rest suppressed")?;
            let stranger = tcp4(STRANGER, SERVER, CLIENT_PORT, WEB_PORT, TCP_SYN);
            self.repeated("dropped SYN, peer not allowed", xdp, &stranger, DROP, "")?;
            let vlan_syn = vlan(tcp4(WORKSTATION, SERVER, CLIENT_PORT + 2, WEB_PORT, TCP_SYN), 100);
            self.repeated("allowed SYN in 802.1Q tag", xdp, &vlan_syn, PASS, "first run inserts, rest hit")?;
            let mut v6_src = [0u8; 16];
            v6_src[..2].copy_from_slice(&[0xfd, 0]);
            v6_src[15] = 1;
            let mut v6_dst = v6_src;
            v6_dst[15] = 2;
            let v6 = ipv6(v6_src, v6_dst, IPPROTO_TCP, &tcp(CLIENT_PORT, WEB_PORT, TCP_SYN));
            self.repeated("dropped IPv6 SYN, peer not allowed", xdp, &v6, DROP, "")?;
            let mut truncated = syn.clone();
            truncated.truncate(truncated.len() - 4);
            self.repeated("malformed (truncated TCP)", xdp, &truncated, DROP, "")?;
            self.repeated("ICMP echo (allow_icmp)", xdp, &icmp4_echo(STRANGER, SERVER), PASS, "bypass")?;
            self.repeated("ARP (non-IP)", xdp, &arp(), PASS, "test-run floor")?;
            // The same pipeline on the TC ingress hook.
            let tci = Hook::TcIngress;
            self.repeated("conntrack hit (ACK, established)", tci, &ack, PASS, "")?;
            self.repeated("dropped SYN, no rule (9999)", tci, &to_9999, DROP, "")?;
            self.repeated("dropped SYN, peer not allowed", tci, &stranger, DROP, "")?;
            Ok(())
        }

        fn egress_cases(&mut self) -> anyhow::Result<()> {
            let tc = Hook::Tc;
            let reply = tcp4(SERVER, WORKSTATION, WEB_PORT, CLIENT_PORT, TCP_ACK);
            self.repeated("reply to inbound flow (ct hit)", tc, &reply, PASS, "")?;
            let port = CLIENT_PORT + 3;
            let ldaps = tcp4(SERVER, LDAP_SERVER, port, LDAPS_PORT, TCP_SYN);
            let key = v4_key(SERVER, LDAP_SERVER, port, LDAPS_PORT);
            let back = tcp4(LDAP_SERVER, SERVER, LDAPS_PORT, port, TCP_SYN | TCP_ACK);
            let ack = tcp4(SERVER, LDAP_SERVER, port, LDAPS_PORT, TCP_ACK);
            let hit = ("outbound flow (ct hit)", &ack[..]);
            let first = "allowed outbound SYN, first packet (ldaps)";
            self.first_packet(first, tc, &ldaps, &key, (Hook::Xdp, &back), hit)?;
            self.repeated("ldaps reply at ingress (ct hit)", Hook::Xdp, &back, PASS, "")?;
            let to_ws = tcp4(SERVER, WORKSTATION, CLIENT_PORT + 4, 445, TCP_SYN);
            self.repeated("dropped outbound SYN to workstation", tc, &to_ws, DROP, "headline alert")?;
            Ok(())
        }

        /// A query to the resolver and its answer, `runs` times, one test
        /// run each: the average of the answer's runs (copied), minus the
        /// timer overhead of single runs (as in [`Bench::first_packet`]).
        fn dns_timed(&mut self, case: &'static str, query: &[u8], answer: &[u8], len: usize) -> anyhow::Result<()> {
            let runs = self.iterations.min(MAX_FRESH_RUNS);
            let mut total = Duration::ZERO;
            for i in 0..runs {
                self.k.once(case, Hook::Tc, query, PASS)?;
                let (ret, d) = self.k.test_run(Hook::Xdp, answer, 1)?;
                self.k.expect(case, Hook::Xdp, ret, PASS)?;
                total += d;
                if i % 64 == 63 {
                    self.k.dns_messages()?;
                }
            }
            self.k.dns_messages()?;
            let stranger = tcp4(STRANGER, SERVER, CLIENT_PORT, OTHER_PORT, TCP_SYN);
            let (_, single) = self.fresh_loop(case, Hook::Xdp, &stranger, DROP, None)?;
            let repeated = self.k.test_run(Hook::Xdp, &stranger, self.iterations)?.1;
            let overhead = (single - repeated.as_nanos() as f64).max(0.0);
            let raw = total.as_nanos() as f64 / f64::from(runs);
            self.rows.push(Row {
                case,
                hook: Hook::Xdp,
                action: PASS.code(Hook::Xdp),
                runs,
                ns: raw - overhead,
                note: format!("{len} B copied; {raw:.1} raw, minus {overhead:.1} timer overhead"),
            });
            Ok(())
        }

        /// DNS: answers from a non-resolver on a monitored flow, an
        /// unsolicited answer, answers to pending queries (copied).
        fn dns_cases(&mut self) -> anyhow::Result<()> {
            let (tc, xdp) = (Hook::Tc, Hook::Xdp);
            let txid = 0x4242;
            let q = filler(30, txid, false);
            let query = udp4(SERVER, RESOLVER, CLIENT_PORT, DNS_PORT, &q);
            let answer = |msg: &[u8]| udp4(RESOLVER, SERVER, DNS_PORT, CLIENT_PORT, msg);
            let short = filler(100, txid, true);
            let long = filler(1232, txid, true);
            // The resolver's flow, its pending query answered.
            self.k.once("DNS query", tc, &query, PASS)?;
            self.k.once("DNS answer", xdp, &answer(&short), PASS)?;
            // A flow to a stranger's port 53, opened in monitor mode.
            self.k.target.apply(&POLICY.replacen(
                "mode = \"enforce\"\n",
                "mode = \"enforce\"\negress_mode = \"monitor\"\n",
                1,
            ))?;
            ensure!(self.k.settings()?.egress_mode == MODE_MONITOR, "the reload did not monitor egress");
            self.k.once(
                "DNS query to a stranger, monitor",
                tc,
                &udp4(SERVER, STRANGER, CLIENT_PORT, DNS_PORT, &q),
                PASS,
            )?;
            self.k.target.apply(POLICY)?;
            let stranger = udp4(STRANGER, SERVER, DNS_PORT, CLIENT_PORT, &short);
            self.repeated("DNS answer from a non-resolver (timed)", xdp, &stranger, PASS, "ct hit + LPM, no copy")?;
            self.repeated("unsolicited DNS answer (timed)", xdp, &answer(&short), PASS, "ct hit + LPM + pending miss")?;
            self.dns_timed("DNS answer to a pending query (copied)", &query, &answer(&short), 100)?;
            self.dns_timed(
                "long DNS answer (copy cut at 1 KiB)",
                &query,
                &answer(&long),
                pcguard_common::DNS_PAYLOAD_MAX,
            )?;
            self.k.dns_messages()?;
            Ok(())
        }

        fn untracked_cases(&mut self) -> anyhow::Result<()> {
            let to_ssh = tcp4(LDAP_SERVER, SERVER, LDAPS_PORT, 22, TCP_ACK);
            let case = "dropped untracked ACK (reverse lookup)";
            self.repeated(case, Hook::Xdp, &to_ssh, DROP, "reported as untracked_reply")?;
            Ok(())
        }

        fn parse_cases(&mut self) -> anyhow::Result<()> {
            // RFC 1858: 8 bytes of a SYN's TCP header in a first fragment.
            let mut tiny = tcp4(STRANGER, SERVER, CLIENT_PORT + 30, 22, TCP_SYN);
            tiny[20] = 0x20; // More fragments.
            tiny[16..18].copy_from_slice(&28u16.to_be_bytes());
            tiny[14 + 20 + 13] = TCP_ACK;
            self.repeated("dropped tiny fragment (malformed)", Hook::Xdp, &tiny, DROP, "")?;
            Ok(())
        }

        /// A rule for 443 allows a learnable class: one `LEARNED` lookup
        /// after the static miss. The address is learned in the inactive
        /// generation only (written into the map: the daemon never does),
        /// so the lookup misses.
        fn learned_cases(&mut self) -> anyhow::Result<()> {
            let syn = tcp4(SERVER, CLOUD_HOST, CLIENT_PORT + 41, HTTPS_PORT, TCP_SYN);
            let cloud = self.k.target.cloud;
            let other = self.k.active_generation()? ^ 1;
            self.k.learned(other, CLOUD_HOST, Some(cloud))?;
            let case = "dropped outbound SYN, learned lookup miss";
            self.repeated(case, Hook::Tc, &syn, DROP, "static miss + LEARNED miss")?;
            self.k.learned(other, CLOUD_HOST, None)
        }

        fn print(&self) {
            println!("{:<48} {:<4} {:<12} {:>9} {:>10}  note", "case", "hook", "action", "runs", "ns/pkt");
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
    }
}
