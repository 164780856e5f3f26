//! `cargo xtask package`: the Debian package, built by cargo-deb from
//! `[package.metadata.deb]` in pcguard/Cargo.toml.
//!
//! cargo-deb packages files; what is generated is staged first under
//! `target/release/pcguard-deb/` (the metadata's asset paths):
//! * `man/`: pcguard.1 and one page per subcommand, `completions/`: bash,
//!   zsh and fish, both written by the release binary itself (`pcguard
//!   generate`, hidden), so they describe exactly the CLI packaged;
//! * `systemd/pcguard.service`: `deploy/systemd/pcguard.service` with the
//!   binary at /usr/bin/pcguard instead of /usr/local/bin/pcguard (the
//!   repository copy is for the manual install of deploy/README.md).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// The packaged binary's target: statically linked, no glibc version
/// required of the installing system.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The cargo-deb `cargo xtask deps` installs.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// The staging directory, relative to the target directory (as the
/// `[package.metadata.deb]` assets name it).
const STAGE: &str = "release/pcguard-deb";

/// Builds the release binary, stages the generated assets and runs
/// cargo-deb. Returns the path of the .deb (in `target/debian/`).
pub fn build(root: &Path, target: &Path) -> Result<PathBuf> {
    ensure!(
        target == root.join("target"),
        "cargo xtask package needs the default target directory {} (pcguard/Cargo.toml's unit-scripts path), \
         not CARGO_TARGET_DIR={}",
        root.join("target").display(),
        target.display()
    );
    ensure!(
        crate::succeeds(Command::new("cargo").args(["deb", "--version"])),
        "cargo-deb is not installed: run `cargo xtask deps`"
    );
    crate::run(crate::cargo().args(["build", "--release", "-p", "pcguard", "--target", MUSL_TARGET]))?;
    let stage = target.join(STAGE);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    // Staged under the path the metadata's assets name (cargo-deb would
    // rewrite `target/release/` paths with `--target`).
    let built = target.join(MUSL_TARGET).join("release/pcguard");
    let bin = stage.join("bin/pcguard");
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::copy(&built, &bin).with_context(|| format!("copying {}", built.display()))?;
    crate::run(Command::new(&bin).arg("generate").arg("man").arg(stage.join("man")))?;
    crate::run(Command::new(&bin).arg("generate").arg("completions").arg(stage.join("completions")))?;

    let unit_src = root.join("deploy/systemd/pcguard.service");
    let unit =
        packaged_unit(&std::fs::read_to_string(&unit_src).with_context(|| format!("reading {}", unit_src.display()))?)
            .with_context(|| format!("{}", unit_src.display()))?;
    write(&stage.join("systemd/pcguard.service"), &unit)?;

    let out = crate::cargo()
        .args(["deb", "-p", "pcguard", "--no-build", "--output"])
        .arg(target.join("debian"))
        .output()
        .context("running cargo deb")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("cargo deb failed with {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout.lines().map(str::trim).rfind(|l| l.ends_with(".deb")).map(PathBuf::from);
    match deb {
        Some(deb) if deb.is_file() => Ok(deb),
        _ => bail!("cargo deb did not name the .deb it wrote:\n{stdout}"),
    }
}

/// The repository unit with the packaged binary's path. Fails if the unit
/// does not run /usr/local/bin/pcguard (the substitution would be wrong).
pub fn packaged_unit(repo_unit: &str) -> Result<String> {
    ensure!(
        repo_unit.contains("ExecStart=/usr/local/bin/pcguard "),
        "the unit's ExecStart no longer runs /usr/local/bin/pcguard: update xtask/src/package.rs"
    );
    let unit = repo_unit.replace("/usr/local/bin/pcguard", "/usr/bin/pcguard");
    ensure!(!unit.contains("/usr/local/"), "the packaged unit still names a /usr/local path");
    Ok(unit)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("a staged file has a parent"))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_unit_runs_the_packaged_binary() {
        let repo = std::fs::read_to_string(crate::workspace_root().join("deploy/systemd/pcguard.service")).unwrap();
        let unit = packaged_unit(&repo).unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/pcguard run "), "{unit}");
        assert!(unit.contains("ExecStartPre=/usr/bin/pcguard check "), "{unit}");
        assert!(unit.contains("ExecReload=/usr/bin/pcguard reload "), "{unit}");
        assert!(!unit.contains("/usr/local"));
        // Every line but the substituted ones is kept.
        assert_eq!(repo.lines().count(), unit.lines().count());
    }

    #[test]
    fn deploy_readme_shows_the_shipped_logrotate_file() {
        let root = crate::workspace_root();
        let shipped = std::fs::read_to_string(root.join("deploy/debian/logrotate")).unwrap();
        let readme = std::fs::read_to_string(root.join("deploy/README.md")).unwrap();
        let rules: Vec<&str> = shipped.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(
            readme.contains(&rules.join("\n")),
            "deploy/README.md's logrotate block differs from deploy/debian/logrotate"
        );
    }

    #[test]
    fn packaged_unit_refuses_a_unit_it_cannot_fix() {
        let err = packaged_unit("[Service]\nExecStart=/opt/pcguard run\n").unwrap_err();
        assert!(err.to_string().contains("/usr/local/bin/pcguard"), "{err}");
    }
}
