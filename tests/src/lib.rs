//! The pcguard lab: network namespaces joined by a bridge, standing for a
//! PaperCut server and its peers (`lab`), real TCP/UDP traffic inside them
//! (`traffic`), a `pcguard run` daemon driven by the tests (`daemon`), DNS
//! (`dns`), the metrics endpoint (`metrics`), crafted frames (`attacks`),
//! the audit records' schema check (`audit`);
//! and `kernel`, the harness of the kernel verdict tests (the programs
//! test-run on crafted packets, no lab).
//!
//! Everything but `kernel` is re-exported here: tests `use
//! pcguard_tests::*;`.

pub mod attacks;
pub mod audit;
pub mod daemon;
pub mod dns;
pub mod kernel;
pub mod lab;
pub mod metrics;
pub mod traffic;

pub use attacks::*;
pub use audit::*;
pub use daemon::*;
pub use dns::*;
pub use lab::*;
pub use metrics::*;
pub use traffic::*;
