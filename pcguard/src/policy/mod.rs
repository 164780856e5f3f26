//! The policy pipeline (pure, no I/O but [`load`] reading the config
//! file): site config + catalog -> typed [`Policy`] ([`build`]) ->
//! [`CompiledPolicy`] ([`compile_policy`]), the dense tables the kernel
//! reads (docs/datapath.md).

mod build;
mod classes;
mod compile;
pub mod compiled;
mod error;
mod ids;
mod lpm;
mod ports;
mod report;
mod warnings;

use std::path::Path;

pub use build::{Policy, PolicyClass, build};
pub use classes::ClassInfo;
pub use compile::compile_policy;
pub use compiled::*;
pub use error::PolicyError;
pub use ids::StableIds;
pub use report::{check_report, origin_name, rule_table, rules_json};
pub use warnings::{Warning, warnings};

use crate::config::{self, SiteConfig};

/// Compiles a validated site config, its rules and port labels numbered
/// afresh (rule id = priority position): for what compiles once.
pub fn compile(cfg: &SiteConfig) -> Result<CompiledPolicy, PolicyError> {
    compile_with(cfg, &mut StableIds::default())
}

/// Compiles a validated site config, keeping the rule ids and port label
/// indexes `ids` gave earlier policies (new names get new numbers); `ids`
/// changes only when the policy compiles.
pub fn compile_with(cfg: &SiteConfig, ids: &mut StableIds) -> Result<CompiledPolicy, PolicyError> {
    compile_policy(&build(cfg), ids)
}

/// Loads and compiles a config file with `ids` ([`compile_with`]):
/// nothing touches the kernel here.
pub fn load(path: &Path, ids: &mut StableIds) -> anyhow::Result<(SiteConfig, CompiledPolicy)> {
    let cfg = config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy = compile_with(&cfg, ids).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((cfg, policy))
}

#[cfg(test)]
mod tests;
