//! The vocabulary every layer shares, at the bottom of the crate: which way
//! a flow is opened ([`Direction`]) and its transport ([`Protocol`]), port
//! ranges ([`PortRange`], parsed from port specs) and address prefixes
//! ([`Cidr`]), and the aligned text tables of the command-line reports.
//! It imports nothing of the crate (only `pcguard_common`'s constants).

mod cidr;
mod flow;
mod ports;
pub mod table;

pub use cidr::Cidr;
pub use flow::{Direction, Protocol};
pub use ports::{PortRange, first_overlap, format_ports};
