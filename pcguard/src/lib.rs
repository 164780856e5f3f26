//! pcguard: eBPF/XDP port policy enforcer and traffic monitor for PaperCut
//! NG/MF servers. docs/architecture.md describes the layers below (each
//! imports only layers under it) and the data flows; docs/datapath.md the
//! kernel side.
//!
//! From the bottom: `model`, `sys`, `notify` and `logging` -> `catalog`, `pins`,
//! `auditlog`, `syslog`, `sockdiag` -> `config` -> `policy`, `attach` ->
//! `render`, `seed`, `counters`, `flows`, `dns` -> `datapath`, `gate`,
//! `metrics`, `suggest` -> `audit`, `state` -> `status`, `reload` -> `daemon`.

pub mod attach;
pub mod audit;
pub mod auditlog;
pub mod catalog;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod flowrec;
pub mod flows;
pub mod gate;
pub mod init;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pins;
pub mod policy;
pub mod reload;
pub mod render;
pub mod seed;
pub mod sockdiag;
pub mod state;
pub mod status;
pub mod suggest;
pub mod support;
pub mod sys;
pub mod syslog;
