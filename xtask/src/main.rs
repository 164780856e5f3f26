//! Developer tasks: `cargo xtask <task>`.
//!
//! * `deps`  — install what building and testing need (apt packages,
//!   nightly rust-src, bpf-linker, cargo-deb), mount bpffs. Idempotent.
//! * `lint`  — rustfmt check and clippy with warnings as errors (CI).
//! * `build` — build the workspace (the eBPF object is built by pcguard's build.rs).
//! * `test`  — deps + build + unit tests + the .deb (`package`) +
//!   privileged end-to-end tests.
//! * `demo`  — deps + build + a lab of network namespaces, pcguard with the
//!   lab policy, sample traffic, then status, metrics and the audit log.
//! * `lab up|down` — the lab topology alone, to experiment by hand.
//! * `package` — the Debian package (cargo-deb) in target/debian/.
//! * `bench` — ns/packet of the XDP program via BPF_PROG_TEST_RUN;
//!   `bench --compare`: pcguard side by side with no filter, nftables and
//!   xdp-filter on a veth pair (docs/performance.md);
//!   `bench --flows-summary [--lines N]`: `pcguard flows --summary` on a
//!   generated audit log of N records (lines/s).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod compare;
mod demo;
mod flowbench;
mod package;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install build and test prerequisites (needs root for apt).
    Deps,
    /// Build the workspace, eBPF object included.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests, then the end-to-end tests (root).
    Test {
        /// Do not install prerequisites first.
        #[arg(long)]
        no_deps: bool,
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Also the tests of the trace object (`pcguard run
        /// --trace-datapath`): pcguard built with its `trace` feature, a
        /// second eBPF build (~1.5-2.5 minutes on 2 cores), so not by default.
        #[arg(long)]
        trace: bool,
    },
    /// Only the tests of the trace object (what `test --trace` adds; CI
    /// runs it after `test`).
    TestTrace,
    /// Build, start a lab, run pcguard on it with sample traffic, show the results.
    Demo {
        #[arg(long)]
        no_deps: bool,
        /// Leave the lab and daemon running until Enter is pressed.
        #[arg(long)]
        keep: bool,
    },
    /// Formatting (`cargo +nightly fmt --check`, rustfmt.toml) and clippy
    /// with warnings as errors, over every crate and target: what CI checks
    /// before the tests.
    Lint,
    /// Build the Debian package (release build, man pages, completions,
    /// unit, config) into target/debian/ with cargo-deb.
    Package,
    /// Create or remove the lab network namespaces.
    Lab {
        #[arg(value_parser = ["up", "down"])]
        action: String,
        #[arg(long, default_value = "pcglab")]
        prefix: String,
    },
    /// Load both programs and print the verifier's instruction counts
    /// (limit: 1,000,000 per program).
    Verifier {
        /// The trace object instead (`pcguard run --trace-datapath`;
        /// builds pcguard with its `trace` feature).
        #[arg(long)]
        trace: bool,
    },
    /// Measure the XDP program with BPF_PROG_TEST_RUN (not a timed test).
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        iterations: u32,
        /// Only the timed ingress and egress cases (quick comparisons
        /// while optimizing); the verdict cases still assert.
        #[arg(long)]
        quick: bool,
        /// The trace object (`pcguard run --trace-datapath`), its records
        /// read and discarded before each case: aya-log's ring holds ~500
        /// records, so with more iterations most runs time a full ring.
        #[arg(long)]
        trace: bool,
        /// Instead: pcguard on each hook side by side with no filter,
        /// nftables and xdp-filter (SYN flood, connection rate, iperf3,
        /// test-run), interleaved rounds, a markdown table of medians and
        /// ratios (release build).
        #[arg(long)]
        compare: bool,
        /// With --compare or --flows-summary: the short asserted version
        /// `cargo xtask test` runs (debug build).
        #[arg(long)]
        smoke: bool,
        /// Instead: `pcguard flows --summary` on a generated audit log
        /// (flow_end and unexpected_flow records, 200 remotes, 20 ports),
        /// totals asserted, lines per second (release build).
        #[arg(long, conflicts_with = "compare")]
        flows_summary: bool,
        /// With --flows-summary: records in the generated log.
        #[arg(long, default_value_t = 1_000_000, requires = "flows_summary")]
        lines: u64,
        /// With --compare: rounds (each runs every receiver once).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// With --compare: seconds per measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Deps => deps(),
        Task::Lint => lint(),
        Task::Build { release } => build(release),
        Task::Test { no_deps, unit_only, trace } => {
            if !no_deps {
                deps()?;
            }
            test(unit_only)?;
            if trace && !unit_only {
                test_trace()?;
            }
            Ok(())
        }
        Task::TestTrace => test_trace(),
        Task::Demo { no_deps, keep } => {
            if !no_deps {
                deps()?;
            }
            build(false)?;
            demo::run(&workspace_root(), keep)
        }
        Task::Lab { action, prefix } => lab(&action, &prefix),
        Task::Package => {
            let deb = package::build(&workspace_root(), &target_dir())?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Verifier { trace: false } => {
            build(false)?;
            bench::verifier_counts(&ebpf_object("debug")?)
        }
        Task::Verifier { trace: true } => {
            run(cargo().args(["build", "-p", "pcguard", "--features", "trace"]))?;
            bench::verifier_counts(&ebpf_object_named("debug", "pcguard-ebpf-trace")?)
        }
        Task::Bench { flows_summary: true, smoke: true, .. } => {
            build(false)?;
            flowbench::smoke(&workspace_root(), &target_dir().join("debug/pcguard"))
        }
        Task::Bench { flows_summary: true, lines, .. } => {
            build(true)?;
            flowbench::run(&workspace_root(), &target_dir().join("release/pcguard"), lines)
        }
        Task::Bench { smoke: true, compare: false, .. } => bail!("--smoke goes with --compare or --flows-summary"),
        Task::Bench { compare: true, smoke: true, .. } => {
            build(false)?;
            compare::smoke(&workspace_root(), target_dir().join("debug/pcguard"))
        }
        Task::Bench { compare: true, rounds, seconds, .. } => {
            build(true)?;
            let root = workspace_root();
            let opts =
                compare::Options { rounds, seconds, ..compare::Options::full(target_dir().join("release/pcguard")) };
            let report = compare::run(&root, &opts)?;
            println!("{}", compare::render(&report, &opts));
            Ok(())
        }
        Task::Bench { iterations, quick, trace, .. } => {
            build(false)?;
            bench::run(&ebpf_object("debug")?, iterations, quick, trace)
        }
    }
}

/// The workspace root (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: LLVM 22 for bpf-linker, network tools for the lab and
/// the tests, nftables for the render oracle (and the adversarial tests'
/// handshakes), Prometheus for the scrape test, scapy (for
/// /usr/bin/python3) for the adversarial tests' crafted frames.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iputils-ping",
    "nftables",
    "util-linux",
    "prometheus",
    "python3-scapy",
    // Floods for the reliability tests and the compare bench.
    "hping3",
    "netsniff-ng",
    "iperf3",
    "xdp-tools",
    // Test-runs of attached programs in the compare bench.
    "bpftool",
    // The package test: `logrotate -d` on the shipped logrotate file, `man
    // -w` for the man pages, dpkg-shlibdeps for cargo-deb's `$auto`.
    "logrotate",
    "man-db",
    "dpkg-dev",
];

/// PATH with LLVM 22 first, for bpf-linker and everything that runs it.
fn path_env() -> String {
    format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("PATH", path_env()).current_dir(workspace_root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn deps() -> Result<()> {
    let missing: Vec<&str> =
        APT_PACKAGES.iter().copied().filter(|p| !succeeds(Command::new("dpkg").args(["-s", p]))).collect();
    if !missing.is_empty() {
        eprintln!("xtask deps: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // The packaged Prometheus starts a service on install; the tests start
    // their own on loopback.
    let _ = Command::new("systemctl").args(["disable", "--now", "prometheus"]).output();
    let _ = Command::new("pkill").args(["-x", "prometheus"]).output();
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    // The packaged binary is static (musl): it runs on every distribution's
    // userland (docs/support.md, "Userland").
    run(Command::new("rustup").args(["target", "add", package::MUSL_TARGET]))?;
    let version = Command::new("bpf-linker")
        .env("PATH", path_env())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !version.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask deps: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        run(Command::new("cargo")
            .env("PATH", path_env())
            .args(["+nightly", "install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"]))?;
    }
    let deb_version = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !deb_version.contains(package::CARGO_DEB_VERSION) {
        // About 4 minutes on 2 cores, once (cargo's bin directory).
        eprintln!("xtask deps: installing cargo-deb {}", package::CARGO_DEB_VERSION);
        run(Command::new("cargo").args(["install", "cargo-deb", "--locked", "--version", package::CARGO_DEB_VERSION]))?;
    }
    if !Path::new("/sys/fs/bpf").join(".").exists() || !is_bpffs("/sys/fs/bpf") {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// rustfmt's check, then clippy with `-D warnings` on every crate and
/// target (xtask also with its `datapath` feature, which the bench uses;
/// pcguard-ebpf also with `trace`. pcguard's `trace` code is checked by
/// `cargo clippy -p pcguard --features trace`, not here: it builds the
/// trace object).
fn lint() -> Result<()> {
    for toolchain in ["nightly", "stable"] {
        run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy", "--toolchain", toolchain]))?;
    }
    // Through rustup: $CARGO is the stable toolchain's cargo, which does
    // not take `+nightly`.
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "fmt", "--all", "--check"])
        .env("PATH", path_env())
        .current_dir(workspace_root()))
    .context("formatting differs from rustfmt.toml: run `cargo +nightly fmt --all`")?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel side of the trace object (host build: no eBPF build).
    run(cargo().args([
        "clippy",
        "-p",
        "pcguard-ebpf",
        "--features",
        "trace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["clippy", "-p", "xtask", "--features", "datapath", "--all-targets", "--", "-D", "warnings"]))
}

fn is_bpffs(path: &str) -> bool {
    Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "bpf_fs")
        .unwrap_or(false)
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    // Default members: pcguard-ebpf is built for the BPF target by
    // pcguard's build script, never for the host.
    c.arg("build");
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn test(unit_only: bool) -> Result<()> {
    build(false)?;
    run(cargo().args([
        "test",
        "-p",
        "pcguard-common",
        "-p",
        "pcguard-ebpf",
        "-p",
        "pcguard",
        "-p",
        "pcguard-testkit",
        "-p",
        "xtask",
    ]))?;
    prometheus_rules()?;
    // `pcguard flows --summary` on 100,000 generated records over a
    // rotated, gzipped log set: the totals exact (a few seconds).
    flowbench::smoke(&workspace_root(), &target_dir().join("debug/pcguard"))?;
    if unit_only {
        return Ok(());
    }
    // The side-by-side comparison, short: each hook drops a real SYN flood
    // and passes real connections next to no filter and xdp-filter.
    compare::smoke(&workspace_root(), target_dir().join("debug/pcguard"))?;
    // The .deb tests/tests/package.rs installs (release build).
    package::build(&workspace_root(), &target_dir())?;
    // The kernel tests (tests/tests/kernel: the programs on crafted packets
    // with BPF_PROG_TEST_RUN, verdicts, counters, events and conntrack of
    // every path asserted), then the end-to-end tests: one lab at a time
    // (2-core machines, shared CPU time).
    run(cargo().args(["test", "-p", "pcguard-tests", "--tests", "--", "--test-threads=1"]))
}

/// The shipped alerting rules: valid (`promtool check rules`) and doing
/// what their unit tests say on example series (`promtool test rules`).
fn prometheus_rules() -> Result<()> {
    let dir = workspace_root().join("deploy/prometheus");
    run(Command::new("promtool").current_dir(&dir).args(["check", "rules", "pcguard-rules.yml"]))?;
    run(Command::new("promtool").current_dir(&dir).args(["test", "rules", "pcguard-rules.test.yml"]))
}

/// The trace object's tests: the CLI refuses `--trace-datapath` only
/// without it; its decision records (kernel tests, root); the daemon
/// built with it logging real traffic's decisions (a lab). Leaves
/// target/debug/pcguard built with `--features trace`.
fn test_trace() -> Result<()> {
    run(cargo().args(["test", "-p", "pcguard", "--features", "trace", "--test", "trace_option"]))?;
    run(cargo().args(["build", "-p", "pcguard", "--features", "trace"]))?;
    run(cargo().args([
        "test",
        "-p",
        "pcguard-tests",
        "--features",
        "trace",
        "--test",
        "kernel",
        "--test",
        "trace_datapath",
        "trace",
        "--",
        "--test-threads=1",
    ]))
}

fn lab(action: &str, prefix: &str) -> Result<()> {
    match action {
        "up" => {
            let lab = pcguard_tests::Lab::up(prefix)?;
            println!("lab {prefix} is up: namespaces {}", pcguard_tests::describe(&lab));
            std::mem::forget(lab); // keep it; `cargo xtask lab down` removes it
            Ok(())
        }
        _ => {
            drop(pcguard_tests::Lab { prefix: prefix.to_string() });
            println!("lab {prefix} removed");
            Ok(())
        }
    }
}

/// The eBPF object pcguard's build.rs built for `profile` (aya-build always
/// optimizes it; the newest
/// `<target>/<profile>/build/pcguard-*/out/pcguard-ebpf`).
fn ebpf_object(profile: &str) -> Result<PathBuf> {
    ebpf_object_named(profile, "pcguard-ebpf")
}

/// [`ebpf_object`] of another name (`pcguard-ebpf-trace`, built with
/// pcguard's `trace` feature).
fn ebpf_object_named(profile: &str, name: &str) -> Result<PathBuf> {
    let build_dir = target_dir().join(profile).join("build");
    std::fs::read_dir(&build_dir)
        .with_context(|| format!("reading {}", build_dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("pcguard-"))
        .map(|e| e.path().join("out").join(name))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .with_context(|| format!("no eBPF object under {}", build_dir.display()))
}

/// Cargo's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}
