//! Which way a flow is opened and which transport carries it.

use serde::{Deserialize, Serialize};

/// Direction a rule's flows are initiated in.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Peers connect to this server (service port = local port).
    Inbound,
    /// This server connects to peers (service port = remote port).
    Outbound,
}

impl Direction {
    /// `pcguard_common::DIR_INGRESS` / `DIR_EGRESS`.
    pub fn dir_index(self) -> u32 {
        match self {
            Direction::Inbound => pcguard_common::DIR_INGRESS,
            Direction::Outbound => pcguard_common::DIR_EGRESS,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `pcguard_common::PROTO_IDX_TCP` / `PROTO_IDX_UDP`.
    pub fn proto_index(self) -> u32 {
        match self {
            Protocol::Tcp => pcguard_common::PROTO_IDX_TCP,
            Protocol::Udp => pcguard_common::PROTO_IDX_UDP,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}
