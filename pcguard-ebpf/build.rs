use which::which;

/// Rebuild when the bpf-linker binary changes (the eBPF object is linked by it).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found on PATH (cargo xtask deps installs it)");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
