//! The policy pipeline (pure, no I/O): site config + catalog -> typed
//! [`Policy`] ([`build`]) -> [`CompiledPolicy`] ([`compile_policy`]), the
//! dense tables the kernel reads (docs/datapath.md).

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

use crate::config::SiteConfig;

/// Compiles a validated site config.
pub fn compile(cfg: &SiteConfig) -> Result<CompiledPolicy, PolicyError> {
    compile_policy(&build(cfg))
}

#[cfg(test)]
mod tests;
