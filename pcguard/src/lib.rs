//! pcguard: eBPF/XDP port policy enforcer and traffic monitor for PaperCut
//! NG/MF servers. See DESIGN.md in the steering docs and docs/ here.
//!
//! Pipeline: `catalog` -> `config` -> `policy` (pure, unit-tested) ->
//! `datapath` (BPF maps) ; `flows` (audit log) ; `metrics` (Prometheus).
//! Under them all, `model`: the vocabulary they share (directions,
//! protocols, port ranges, CIDRs).

pub mod attach;
pub mod auditlog;
pub mod catalog;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod flows;
pub mod gate;
pub mod metrics;
pub mod model;
pub mod pins;
pub mod policy;
pub mod render;
pub mod seed;
pub mod sockdiag;
pub mod state;
pub mod status;
pub mod sys;
