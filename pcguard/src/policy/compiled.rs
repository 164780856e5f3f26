//! The compiled policy: dense tables ready to be written into the BPF maps.
//!
//! Produced by `policy::compile` (pure), consumed by `datapath` (writes the
//! maps), `metrics` (labels), `render` (nftables) and `check` (rule table).

use std::time::Duration;

use pcguard_common::{MAX_SLOTS, Mode, PortEntry, PortSlot, port_table_index};
use serde::Serialize;

use crate::model::{Direction, PortRange, Protocol};

/// Where a compiled rule came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleOrigin {
    /// A catalog entry enabled by a feature (from the PaperCut document).
    Catalog,
    /// A catalog entry that is not from the document (marked in the catalog).
    CatalogExtra,
    /// An `[[rule]]` of the site config.
    Site,
    /// An always-allow entry (admin access); never dropped.
    AlwaysAllow,
}

/// One compiled rule. Rule ids are indexes into `CompiledPolicy::rules`;
/// index 0 is a placeholder for "no rule" and is never matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleInfo {
    /// Catalog id (e.g. `web-http`) or the site rule's name. Used as the
    /// `rule` label of per-rule metrics, so it is bounded and stable.
    pub id: String,
    pub description: String,
    pub direction: Direction,
    pub protocol: Protocol,
    pub ports: Vec<PortRange>,
    /// Peer class names allowed by this rule (`any` for every address).
    pub peers: Vec<String>,
    /// Documented FQDNs of the endpoint, for the operator (not enforced by
    /// the kernel; see notes on DNS-aware egress).
    pub fqdns: Vec<String>,
    pub origin: RuleOrigin,
}

/// One LPM trie entry: prefix -> class bitmask. Masks already include the
/// bits of every shorter prefix that contains this one, and `CLASS_ANY`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerPrefix<const N: usize> {
    #[serde(skip)]
    pub addr: [u8; N],
    pub prefix_len: u32,
    pub mask: u32,
}

/// What a rule allows a new flow with: the values of its conntrack entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// Rule id (index into `CompiledPolicy::rules`, never 0).
    pub rule: u16,
    /// Counter label of the flow's service port (0: `other`).
    pub port_idx: u16,
}

/// The policy's global settings, typed. Only the datapath encodes them
/// into the kernel's `pcguard_common::Settings` (modes as their codes,
/// durations in nanoseconds, the event budget per CPU, `ready = 1`), when
/// it writes the `SETTINGS` entry of the generation it applies the policy
/// to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySettings {
    /// Mode for new inbound flows.
    pub ingress_mode: Mode,
    /// Mode for new outbound flows.
    pub egress_mode: Mode,
    /// ICMP/ICMPv6 and IGMP pass (counted as bypassed); else they are
    /// subject to the policy like any packet without a rule.
    pub allow_icmp: bool,
    /// Classes the server must never initiate flows to (reported as
    /// `outbound_to_workstation`).
    pub no_initiate_mask: u32,
    /// Classes of the DNS resolvers this server uses.
    pub resolver_mask: u32,
    /// Classes DNS answers can give an address (classes with FQDNs).
    pub learned_mask: u32,
    /// Idle timeouts of conntrack entries.
    pub tcp_timeout: Duration,
    pub tcp_closing_timeout: Duration,
    pub udp_timeout: Duration,
    /// A (source, destination port, reason) is reported at most once per
    /// this interval.
    pub report_interval: Duration,
    /// Unexpected-flow events the whole machine may send per second, and
    /// its burst (the datapath divides both between the CPUs).
    pub event_rate: u32,
    pub event_burst: u32,
    /// Rules whose allowed flows get start and end records
    /// ([`CompiledPolicy::audit_bits`]).
    pub audit_allowed: crate::config::AuditAllowed,
}

impl PolicySettings {
    /// The mode of new flows initiated in `direction`.
    pub fn mode(&self, direction: Direction) -> Mode {
        match direction {
            Direction::Inbound => self.ingress_mode,
            Direction::Outbound => self.egress_mode,
        }
    }
}

/// The compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Written to the `SETTINGS` entry of the generation it is applied to.
    pub settings: PolicySettings,
    /// Sparse `PORTS` content: (index from `port_table_index`, entry). Every
    /// index not listed is `PortEntry::default()` (no rule).
    pub ports: Vec<(u32, PortEntry)>,
    /// `SLOTS` content, index = slot id; `slots[0]` is the empty slot.
    pub slots: Vec<PortSlot>,
    pub peers_v4: Vec<PeerPrefix<4>>,
    pub peers_v6: Vec<PeerPrefix<16>>,
    /// Index = rule id; `rules[0]` is the "no rule" placeholder.
    pub rules: Vec<RuleInfo>,
    /// Counter port labels per protocol index (`PROTO_IDX_TCP`, `PROTO_IDX_UDP`,
    /// `PROTO_IDX_OTHER`); `port_labels[p][0] == "other"`.
    pub port_labels: [Vec<String>; 3],
    /// Peer class names by bit index (`None` = unused bit); bit 31 is `any`.
    pub classes: Vec<Option<String>>,
}

impl CompiledPolicy {
    /// Number of rules (without the "no rule" placeholder and the holes a
    /// daemon keeps for rules of earlier policies).
    pub fn rule_count(&self) -> usize {
        self.current_rules().count()
    }

    /// The rules of this policy: without the "no rule" placeholder and the
    /// holes a daemon keeps for rules of earlier policies.
    pub fn current_rules(&self) -> impl Iterator<Item = &RuleInfo> {
        self.rules.iter().skip(1).filter(|r| !r.id.is_empty())
    }

    /// `Settings::audit_rules`: the bit of every rule id whose rule
    /// `[audit] allowed` names.
    pub fn audit_bits(&self) -> [u64; pcguard_common::AUDIT_RULE_WORDS] {
        let mut bits = [0u64; pcguard_common::AUDIT_RULE_WORDS];
        for (id, r) in self.rules.iter().enumerate().skip(1) {
            if !r.id.is_empty() && id < pcguard_common::MAX_RULES as usize && self.settings.audit_allowed.matches(&r.id)
            {
                bits[id / 64] |= 1 << (id % 64);
            }
        }
        bits
    }

    /// The class mask the kernel finds for `addr` in the static peer tries:
    /// the mask of the longest configured prefix containing it.
    pub fn peer_mask(&self, addr: std::net::IpAddr) -> u32 {
        match addr {
            std::net::IpAddr::V4(a) => longest_match(&self.peers_v4, &a.octets()).map_or(0, |p| p.mask),
            std::net::IpAddr::V6(a) => longest_match(&self.peers_v6, &a.octets()).map_or(0, |p| p.mask),
        }
    }

    /// The kernel's decision on a new flow initiated in `direction` to
    /// `service_port`, with `remote` at the other end
    /// (`pcguard-ebpf/src/policy.rs` `decide`): the `PORTS` entry of the
    /// port, its slot, and the rule of the lowest class bit in
    /// `peer_mask & allowed_mask`. `None` when the policy does not allow it.
    ///
    /// For userspace to judge flows the kernel has not seen (connections
    /// open before pcguard attached) exactly as the programs would. Only
    /// the static peer classes count: DNS-learned addresses are not
    /// considered (the daemon has learned none when it seeds conntrack).
    /// IPv4-mapped IPv6 addresses are looked up as IPv4, as their packets
    /// carry them.
    pub fn decide(
        &self,
        direction: Direction,
        protocol: Protocol,
        service_port: u16,
        remote: std::net::IpAddr,
    ) -> Option<Allowed> {
        let idx = port_table_index(direction.dir_index(), protocol.proto_index(), service_port);
        let entry = self.ports.iter().find(|(i, _)| *i == idx).map_or_else(PortEntry::default, |(_, e)| *e);
        // Slot 0 is "no rule"; like the kernel, an id past the slots
        // allows nothing.
        if entry.slot == 0 || u32::from(entry.slot) >= MAX_SLOTS {
            return None;
        }
        let slot = self.slots.get(usize::from(entry.slot))?;
        let m = self.peer_mask(remote.to_canonical()) & slot.allowed_mask;
        (m != 0).then(|| Allowed { rule: slot.rule_by_class[m.trailing_zeros() as usize], port_idx: entry.port_idx })
    }
}

fn longest_match<'a, const N: usize>(prefixes: &'a [PeerPrefix<N>], addr: &[u8; N]) -> Option<&'a PeerPrefix<N>> {
    prefixes.iter().filter(|p| prefix_contains(&p.addr, p.prefix_len, addr)).max_by_key(|p| p.prefix_len)
}

fn prefix_contains<const N: usize>(net: &[u8; N], len: u32, addr: &[u8; N]) -> bool {
    let full = (len / 8) as usize;
    let rest = len % 8;
    if net[..full] != addr[..full] {
        return false;
    }
    rest == 0 || {
        let m = 0xffu8 << (8 - rest);
        net[full] & m == addr[full] & m
    }
}
