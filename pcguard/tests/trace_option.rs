//! `pcguard run --trace-datapath` without the trace object: refused with
//! an error that says how to build it, before anything else is read or
//! touched (the config is not even opened). With pcguard's `trace`
//! feature the option passes that check and the run fails on the missing
//! config instead. Unprivileged: nothing reaches the kernel.

use std::process::Command;

#[test]
fn trace_datapath_needs_the_trace_object() {
    let dir = std::env::temp_dir().join(format!("pcguard-trace-option-{}", std::process::id()));
    let (bpffs, run_dir) = (dir.join("bpf"), dir.join("run"));
    let out = Command::new(env!("CARGO_BIN_EXE_pcguard"))
        .args(["run", "--trace-datapath", "--config", "/nonexistent/pcguard.toml", "--bpffs-dir"])
        .arg(&bpffs)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .expect("running pcguard");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pcguard run succeeded: {stderr}");
    if cfg!(feature = "trace") {
        assert!(stderr.contains("/nonexistent/pcguard.toml"), "{stderr}");
    } else {
        assert!(
            stderr.contains("built without the trace object") && stderr.contains("cargo build --features trace"),
            "{stderr}"
        );
    }
    assert!(!bpffs.exists() && !run_dir.exists(), "pcguard created {} or {}", bpffs.display(), run_dir.display());
}
