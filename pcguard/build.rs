use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the eBPF object (pcguard-ebpf, bpfel-unknown-none, nightly + build-std)
/// into OUT_DIR so the daemon can embed it.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "pcguard-ebpf")
        .ok_or_else(|| anyhow!("pcguard-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let pkg = aya_build::Package { name: ebpf.name.as_str(), root_dir: root.as_str(), ..Default::default() };
    aya_build::build_ebpf([pkg], Toolchain::default())
}
