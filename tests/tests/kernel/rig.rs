//! A loaded data path for one test, through the daemon's own path: site
//! config -> `pcguard::config` -> `pcguard::policy::compile` ->
//! `Datapath::load` (maps pinned under a bpffs directory of this test
//! alone, removed on drop) -> `Datapath::apply`. Nothing is attached.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use pcguard::{
    datapath::{Datapath, MapSizes, Object},
    policy::CompiledPolicy,
};
use pcguard_tests::kernel::{Kernel, Target, pin_to_one_cpu};

pub struct Rig {
    dp: Option<Datapath>,
    dir: PathBuf,
    /// The policy last applied.
    pub policy: CompiledPolicy,
}

pub type K = Kernel<Rig>;

/// Parses and compiles a site config as the daemon does.
pub fn compile(config: &str) -> Result<(pcguard::config::SiteConfig, CompiledPolicy)> {
    let cfg = pcguard::config::parse(config, "kernel-test.toml")?;
    let policy = pcguard::policy::compile(&cfg)?;
    Ok((cfg, policy))
}

impl Rig {
    /// Loads the programs against new maps (sized by `config`), applies
    /// `config`'s policy, and pins this thread to its CPU.
    pub fn load(config: &str) -> Result<K> {
        Self::load_object(config, Object::Default)
    }

    /// [`Rig::load`] with the programs of `object`.
    pub fn load_object(config: &str, object: Object) -> Result<K> {
        static N: AtomicU32 = AtomicU32::new(0);
        pin_to_one_cpu()?;
        let (cfg, policy) = compile(config)?;
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/pcguard-ktest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut dp =
            Datapath::load_object(&dir, &MapSizes::of(&cfg), object).context("loading the data path (root needed)")?;
        dp.apply(&policy, &[])?;
        Kernel::new(Rig { dp: Some(dp), dir, policy })
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("the data path lives until drop")
    }

    /// Applies another config, as a reload does: into the inactive
    /// generation, then switched to.
    pub fn apply(&mut self, config: &str) -> Result<()> {
        let (_, policy) = compile(config)?;
        self.dp().apply(&policy, &[])?;
        self.policy = policy;
        Ok(())
    }

    /// The rule id of `id` (a site rule's name or a catalog id).
    pub fn rule(&self, id: &str) -> u16 {
        self.policy.rules.iter().position(|r| r.id == id).unwrap_or_else(|| panic!("no rule {id}")) as u16
    }

    /// The class bit (as a mask) of class `name`.
    pub fn class(&self, name: &str) -> u32 {
        let bit = self
            .policy
            .classes
            .iter()
            .position(|c| c.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no class {name}"));
        1 << bit
    }
}

impl Target for Rig {
    fn ebpf(&mut self) -> &mut Ebpf {
        self.dp().ebpf_mut()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            let _ = dp.shutdown(true);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
