use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the eBPF object (pcguard-ebpf, bpfel-unknown-none, nightly + build-std)
/// into OUT_DIR so the daemon can embed it. With pcguard's `trace` feature,
/// first the trace object (pcguard-ebpf's `trace` feature: aya-log records
/// at the decision points) into `OUT_DIR/pcguard-ebpf-trace`: a second
/// eBPF build that only `--features trace` builds pay for.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "pcguard-ebpf")
        .ok_or_else(|| anyhow!("pcguard-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let pkg = |features| aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root.as_str(),
        features,
        ..Default::default()
    };
    if env::var_os("CARGO_FEATURE_TRACE").is_some() {
        // aya-build copies the object to OUT_DIR/pcguard-ebpf whatever the
        // features: move it aside before the default build.
        aya_build::build_ebpf([pkg(&["trace"])], Toolchain::default())?;
        let out = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
        let (built, trace) = (out.join("pcguard-ebpf"), out.join("pcguard-ebpf-trace"));
        // AYA_BUILD_SKIP builds nothing.
        if built.exists() {
            fs::rename(&built, &trace)
                .with_context(|| format!("renaming {} to {}", built.display(), trace.display()))?;
        }
    }
    aya_build::build_ebpf([pkg(&[])], Toolchain::default())
}
