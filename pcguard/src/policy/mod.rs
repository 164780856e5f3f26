//! The policy pipeline (pure, no I/O but [`load`] reading the config
//! file): site config + catalog -> typed [`Policy`] ([`build`]) ->
//! [`CompiledPolicy`] ([`compile_policy`]), the dense tables the kernel
//! reads (docs/datapath.md).

mod build;
mod classes;
mod compile;
pub mod compiled;
mod error;
mod lpm;
mod ports;
mod report;

pub use build::{Policy, PolicyClass, build};
pub use classes::ClassInfo;
pub use compile::compile_policy;
pub use compiled::*;
pub use error::PolicyError;
pub use report::{check_report, origin_name, rule_table, rules_json};

use crate::config::{self, SiteConfig};
use std::path::Path;

/// Compiles a validated site config.
pub fn compile(cfg: &SiteConfig) -> Result<CompiledPolicy, PolicyError> {
    compile_policy(&build(cfg))
}

/// Loads and compiles a config file: nothing touches the kernel here.
pub fn load(path: &Path) -> anyhow::Result<(SiteConfig, CompiledPolicy)> {
    let cfg = config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy = compile(&cfg).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((cfg, policy))
}

#[cfg(test)]
mod tests;
