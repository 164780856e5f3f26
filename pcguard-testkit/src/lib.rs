//! Test frames and DNS messages, shared by every test that builds packets:
//! the parser's host tests (pcguard-ebpf), the kernel verdict tests and the
//! lab helpers (pcguard-tests), and the bench (xtask).
//!
//! Host only and without dependencies: it is a dev-dependency of
//! pcguard-ebpf, whose BPF build never sees it, and adds nothing to the
//! host tests' feature set.
//!
//! Checksums are left zero by the frame builders (neither hook checks them;
//! `BPF_PROG_TEST_RUN` does not either), except in [`frame::udp_packet`],
//! which real sockets send.

pub mod dns;
pub mod frame;
