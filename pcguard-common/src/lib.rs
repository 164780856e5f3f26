//! Types shared by the pcguard kernel programs and the userspace daemon.
//!
//! Everything here is `#[repr(C)]` plain data: map keys, map values, event
//! records, the kernel codes (below) and the constants that size and index
//! the maps. No logic lives here beyond trivial index arithmetic that both
//! sides must agree on.
//!
//! # Map layout (the contract between `pcguard-ebpf` and `pcguard::datapath`)
//!
//! | map             | kind                 | key                  | value          |
//! |-----------------|----------------------|----------------------|----------------|
//! | `ACTIVE`        | Array (1 entry)      | 0                    | generation u32 |
//! | `PORTS`         | Array                | [`ports_index`]      | [`PortEntry`]  |
//! | `SLOTS`         | Array                | [`slots_index`]      | [`PortSlot`]   |
//! | `PEERS_V4`      | LpmTrie<[u8;5]>      | [`peer_key_v4`]      | class mask u32 |
//! | `PEERS_V6`      | LpmTrie<[u8;17]>     | [`peer_key_v6`]      | class mask u32 |
//! | `SETTINGS`      | Array (2 entries)    | generation           | [`Settings`]   |
//! | `CONNTRACK`     | LruHash              | [`FlowKey`]          | [`CtEntry`]    |
//! | `CT_NEW`        | LruHash              | [`FlowKey`]          | [`CtEntry`]    |
//! | `REPORTED`      | Array (2-way sets)   | [`report_set`]       | [`ReportSlot`] |
//! | `EVENT_LIMITER` | PerCpuArray (1)      | 0                    | [`TokenBucket`]|
//! | `PORT_COUNTERS` | PerCpuArray          | [`port_counter_index`] | [`Counters`] |
//! | `RULE_COUNTERS` | PerCpuArray          | [`rule_counter_index`] | [`Counters`] |
//! | `STATS`         | PerCpuArray          | `STAT_*`             | u64            |
//! | `LEARNED`       | Hash                 | [`LearnedKey`]       | class mask u32 |
//! | `DNS_PENDING`   | LruHash              | [`DnsPendingKey`]    | u64 (ns)       |
//! | `EVENTS`        | RingBuf              | -                    | [`FlowEvent`]  |
//! | `DNS_MESSAGES`  | RingBuf              | -                    | [`DnsMessage`] |
//! | `FLOW_RECORDS`  | RingBuf              | -                    | [`FlowRecord`] |
//! | `TC_RERUN`      | ProgArray (1 entry)  | 0                    | the TC program |
//!
//! The per-packet cost is a fixed number of map lookups whatever the number
//! of rules: one `ACTIVE` lookup, one `SETTINGS` lookup, one `PORTS` lookup,
//! one `SLOTS` lookup, one LPM lookup and one conntrack lookup.
//!
//! # Policy generations
//!
//! The policy tables (`PORTS`, `SLOTS`, `PEERS_V4`, `PEERS_V6`, `SETTINGS`)
//! hold [`NUM_GENERATIONS`] complete policies side by side. `ACTIVE[0]` says
//! which one packets use: a program reads it once per packet and does every
//! policy lookup of that packet in that generation. The daemon writes a new
//! policy into the other generation, then switches with one 4-byte write to
//! `ACTIVE`, so a packet sees the old policy or the new one, never a mix.
//! `PORTS` and `SLOTS` put generation `g` at `g * PORT_TABLE_ENTRIES` and
//! `g * MAX_SLOTS`; the LPM keys start with a byte holding the generation
//! (its 8 bits are part of every prefix, see [`GEN_PREFIX_BITS`]);
//! `SETTINGS[g]` is generation `g`'s settings.
//!
//! # Kernel codes
//!
//! The small numbers the programs put in maps and records (packet
//! directions, counter protocol indexes, verdicts, modes, reasons, what was
//! malformed) are each defined once, here, as a `#[repr(u8)]` enum made by
//! `kernel_codes!`: its `as_str` is the stable name userspace shows in audit
//! records, metric labels and `status`, `TryFrom<u8>` decodes a value read
//! from the kernel (an unknown value is `Err(value)`, named [`UNKNOWN`] by
//! `name_of`), and `ALL` lists every value in numeric order.
//!
//! Values are part of the contract ([`ABI_VERSION`]): a value is never
//! renumbered or reused, and a retired value stays reserved (a comment in
//! its enum says so), as Cilium does with its drop reasons
//! (bpf/lib/drop_reasons.h). Names are part of the audit and metrics
//! interface: they never change either. The programs work on the plain
//! integers (`REASON_NO_RULE`, `VERDICT_DROP`, ...), which are derived from
//! the enums: the map fields and the codegen stay integers, the definition
//! stays one. [`PacketDir`], [`ProtoIndex`] and [`Verdict`] index tables:
//! their values are dense, from 0.
#![no_std]

/// What userspace calls a kernel value that no code of its family has (a
/// record from a newer object, or a corrupted one).
pub const UNKNOWN: &str = "unknown";

/// Defines a kernel code family: the enum, `ALL`, `as_str`, `name_of` and
/// `TryFrom<u8>` (see "Kernel codes" in the crate docs).
macro_rules! kernel_codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $value:literal => $str:literal,
            )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $(
                $(#[$vmeta])*
                $variant = $value,
            )+
        }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: [$name; [$($value),+].len()] = [$($name::$variant),+];

            /// Stable name, for audit records and metric labels.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $str,)+
                }
            }

            /// The name of kernel value `v`: [`UNKNOWN`] for a value of no
            /// code of this family.
            pub fn name_of(v: u8) -> &'static str {
                match Self::try_from(v) {
                    Ok(c) => c.as_str(),
                    Err(_) => UNKNOWN,
                }
            }
        }

        impl TryFrom<u8> for $name {
            type Error = u8;
            fn try_from(v: u8) -> Result<Self, u8> {
                match v {
                    $($value => Ok($name::$variant),)+
                    _ => Err(v),
                }
            }
        }
    };
}

kernel_codes! {
    /// Ingress or egress: for counters, events and reports the direction the
    /// packet travels at the hook that sees it; for the port table and
    /// conntrack ([`CtEntry::flow_dir`]) the direction the flow was
    /// initiated in (ingress: a peer opened it). Not the userspace policy's
    /// `Direction` (inbound/outbound), which is a rule's. Dense: indexes
    /// the port table and the counters ([`NUM_DIRS`]).
    pub enum PacketDir {
        /// Into this host (XDP, or TC ingress).
        Ingress = 0 => "ingress",
        /// Out of this host (TC egress).
        Egress = 1 => "egress",
    }
}

/// [`PacketDir`] values, as the programs use them.
pub const DIR_INGRESS: u32 = PacketDir::Ingress as u32;
pub const DIR_EGRESS: u32 = PacketDir::Egress as u32;
pub const NUM_DIRS: u32 = PacketDir::ALL.len() as u32;

kernel_codes! {
    /// Protocol indexes of the dense tables (port table, counters). ICMP and
    /// anything else that is IP but not TCP/UDP is counted under `Other`
    /// with port index 0. Dense ([`NUM_COUNTER_PROTOS`]).
    pub enum ProtoIndex {
        Tcp = 0 => "tcp",
        Udp = 1 => "udp",
        Other = 2 => "other",
    }
}

/// [`ProtoIndex`] values, as the programs use them.
pub const PROTO_IDX_TCP: u32 = ProtoIndex::Tcp as u32;
pub const PROTO_IDX_UDP: u32 = ProtoIndex::Udp as u32;
pub const PROTO_IDX_OTHER: u32 = ProtoIndex::Other as u32;
/// Protocols with a port table (TCP and UDP).
pub const NUM_PORT_PROTOS: u32 = 2;
/// Protocol indexes used by counters.
pub const NUM_COUNTER_PROTOS: u32 = ProtoIndex::ALL.len() as u32;

/// IP protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
/// IGMP (IPv4 multicast group management): handled like ICMP.
pub const IPPROTO_IGMP: u8 = 2;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Address families in [`FlowKey::family`] / [`FlowEvent::family`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Number of policy generations in the policy tables (see the crate docs).
pub const NUM_GENERATIONS: u32 = 2;

/// Entries of one generation's port table: one per (direction, port
/// protocol, port).
pub const PORT_TABLE_ENTRIES: u32 = NUM_DIRS * NUM_PORT_PROTOS * 65536;
/// Entries of `PORTS`: every generation's port table.
pub const PORTS_ENTRIES: u32 = NUM_GENERATIONS * PORT_TABLE_ENTRIES;

/// Index into one generation's port table for the service port of a flow in
/// direction `dir` (`DIR_INGRESS`: the local destination port of an inbound
/// flow; `DIR_EGRESS`: the remote destination port of an outbound flow).
#[inline(always)]
pub const fn port_table_index(dir: u32, proto_idx: u32, port: u16) -> u32 {
    (dir * NUM_PORT_PROTOS + proto_idx) * 65536 + port as u32
}

/// Index into `PORTS` of entry `idx` ([`port_table_index`]) of generation
/// `generation`.
#[inline(always)]
pub const fn ports_index(generation: u32, idx: u32) -> u32 {
    generation * PORT_TABLE_ENTRIES + idx
}

/// One entry of the `PORTS` table.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    /// Index into `SLOTS`; 0 means "no rule covers this port".
    pub slot: u16,
    /// Counter label index for this port (see [`port_counter_index`]);
    /// 0 means the `other` label.
    pub port_idx: u16,
}

/// Maximum number of peer classes, including the built-in [`CLASS_ANY`].
pub const MAX_CLASSES: usize = 32;
/// Bit index of the class every address belongs to (`any`).
pub const CLASS_ANY_BIT: u32 = 31;
pub const CLASS_ANY: u32 = 1 << CLASS_ANY_BIT;

/// Slots per generation (slot 0 is reserved: "no rule").
pub const MAX_SLOTS: u32 = 1024;
/// Entries of `SLOTS`: every generation's slots.
pub const SLOTS_ENTRIES: u32 = NUM_GENERATIONS * MAX_SLOTS;

/// Index into `SLOTS` of slot `slot` of generation `generation`.
#[inline(always)]
pub const fn slots_index(generation: u32, slot: u32) -> u32 {
    generation * MAX_SLOTS + slot
}

/// A port slot: which peer classes may use the ports pointing at it, and for
/// each class which rule allowed it (for per-rule counters and audit).
///
/// A packet is allowed when `peer_mask & allowed_mask != 0`; the rule is
/// `rule_by_class[lowest set bit of (peer_mask & allowed_mask)]`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PortSlot {
    pub allowed_mask: u32,
    pub rule_by_class: [u16; MAX_CLASSES],
}

impl Default for PortSlot {
    fn default() -> Self {
        Self { allowed_mask: 0, rule_by_class: [0; MAX_CLASSES] }
    }
}

/// Maximum number of rules; rule id 0 means "no rule".
pub const MAX_RULES: u32 = 512;
/// Maximum number of counter port labels per protocol; index 0 is `other`.
pub const MAX_PORT_LABELS: u32 = 512;

kernel_codes! {
    /// What happened to a packet: the index of its [`Counters`] entry, and
    /// [`FlowEvent::verdict`] / [`ReportKey::verdict`] (`Drop` or
    /// `Monitor`) of a report. Dense ([`NUM_VERDICTS`]).
    pub enum Verdict {
        /// Passed because a rule (or a tracked flow) allows it.
        Allow = 0 => "allowed",
        /// Dropped by policy (enforce mode) or because it is malformed.
        Drop = 1 => "dropped",
        /// Would have been dropped, passed because the direction is in
        /// monitor mode.
        Monitor = 2 => "would_drop",
        /// Not subject to the port policy (ICMP, non-first fragments).
        Bypass = 3 => "bypassed",
    }
}

/// [`Verdict`] values, as the programs use them (indexes in [`Counters`]).
pub const VERDICT_ALLOW: usize = Verdict::Allow as usize;
pub const VERDICT_DROP: usize = Verdict::Drop as usize;
pub const VERDICT_MONITOR: usize = Verdict::Monitor as usize;
pub const VERDICT_BYPASS: usize = Verdict::Bypass as usize;
pub const NUM_VERDICTS: usize = Verdict::ALL.len();
// The programs mask a verdict with `NUM_VERDICTS - 1` to prove the index
// in bounds.
const _: () = assert!(NUM_VERDICTS.is_power_of_two());

/// Packets and bytes per verdict.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: [u64; NUM_VERDICTS],
    pub bytes: [u64; NUM_VERDICTS],
}

/// Entries of `PORT_COUNTERS`.
pub const PORT_COUNTER_ENTRIES: u32 = NUM_DIRS * NUM_COUNTER_PROTOS * MAX_PORT_LABELS;

/// Index into `PORT_COUNTERS`: `dir` is the direction the packet travels,
/// `port_idx` the label of the flow's service port (0 = other).
#[inline(always)]
pub const fn port_counter_index(dir: u32, proto_idx: u32, port_idx: u16) -> u32 {
    (dir * NUM_COUNTER_PROTOS + proto_idx) * MAX_PORT_LABELS + port_idx as u32
}

/// Entries of `RULE_COUNTERS`.
pub const RULE_COUNTER_ENTRIES: u32 = NUM_DIRS * MAX_RULES;

/// Index into `RULE_COUNTERS`: `dir` is the direction the packet travels.
#[inline(always)]
pub const fn rule_counter_index(dir: u32, rule: u16) -> u32 {
    dir * MAX_RULES + rule as u32
}

/// Indexes into the per-CPU `STATS` array.
/// Non-IP frames seen at XDP (ARP, LLDP, ...), always passed.
pub const STAT_NON_IP: u32 = 0;
/// Packets whose headers were truncated or invalid.
pub const STAT_MALFORMED: u32 = 1;
/// Events that could not be reserved in the ring buffer.
pub const STAT_EVENTS_DROPPED: u32 = 2;
/// Events written to the ring buffer.
pub const STAT_EVENTS_SENT: u32 = 3;
/// Unexpected-flow events suppressed because the flow was already reported.
pub const STAT_EVENTS_SUPPRESSED: u32 = 4;
/// Conntrack entries created.
pub const STAT_CT_CREATED: u32 = 5;
/// Conntrack entries removed on FIN/RST close or found expired.
pub const STAT_CT_EXPIRED: u32 = 6;
/// Conntrack insert failures.
pub const STAT_CT_INSERT_FAILED: u32 = 7;
/// DNS answers copied to `DNS_MESSAGES`.
pub const STAT_DNS_ANSWERS: u32 = 8;
/// DNS messages (queries or answers) that could not be reserved in
/// `DNS_MESSAGES`.
pub const STAT_DNS_ANSWERS_DROPPED: u32 = 9;
/// DNS queries copied to `DNS_MESSAGES` (and recorded in `DNS_PENDING`).
pub const STAT_DNS_QUERIES: u32 = 10;
/// Packets from a resolver's port 53 to a tracked DNS flow that answer no
/// pending query (wrong transaction id, a second answer, spoofed): not
/// copied.
pub const STAT_DNS_UNSOLICITED: u32 = 11;
/// Unexpected-flow reports not sent because the CPU's event budget
/// (`Settings.event_rate`) was used up.
pub const STAT_EVENTS_RATE_LIMITED: u32 = 12;
/// Flows moved from `CT_NEW` to `CONNTRACK` (established).
pub const STAT_CT_PROMOTED: u32 = 13;
/// Starts and ends of audited flows written to `FLOW_RECORDS`.
pub const STAT_FLOW_RECORDS_SENT: u32 = 14;
/// Starts and ends of audited flows that could not be reserved in
/// `FLOW_RECORDS` (the daemon is behind).
pub const STAT_FLOW_RECORDS_DROPPED: u32 = 15;
pub const NUM_STATS: u32 = 16;

kernel_codes! {
    /// What happens to a new flow no rule allows, per direction
    /// ([`Settings::ingress_mode`], [`Settings::egress_mode`]). Also the
    /// site config's `mode` / `egress_mode` (its names are the config's
    /// values).
    #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "lowercase"))]
    pub enum Mode {
        /// Dropped (and reported).
        Enforce = 0 => "enforce",
        /// Passed and reported (dry run).
        Monitor = 1 => "monitor",
    }
}

/// The mode of a zeroed [`Settings`].
impl Default for Mode {
    fn default() -> Self {
        Mode::Enforce
    }
}

/// [`Mode`] values, as the programs use them.
pub const MODE_ENFORCE: u8 = Mode::Enforce as u8;
pub const MODE_MONITOR: u8 = Mode::Monitor as u8;

/// Global settings written by the daemon, one per generation
/// (`SETTINGS[generation]`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Mode for new inbound flows (`MODE_ENFORCE` / `MODE_MONITOR`).
    pub ingress_mode: u8,
    /// Mode for new outbound flows.
    pub egress_mode: u8,
    /// 1: ICMP/ICMPv6 and IGMP pass (counted as `VERDICT_BYPASS`); 0: dropped in
    /// enforce mode like any packet without a rule.
    pub allow_icmp: u8,
    /// 1 once the daemon has written a complete policy into this
    /// generation. `ACTIVE` starts at generation 0, whose `ready` stays 0
    /// until the daemon writes it: until its first switch every packet
    /// passes (counted as `VERDICT_BYPASS`).
    pub ready: u8,
    /// Classes the server must never initiate flows to (workstations,
    /// secondary servers): such a flow is reported with
    /// `REASON_OUTBOUND_TO_WORKSTATION`.
    pub no_initiate_mask: u32,
    /// Classes of the DNS resolvers this server uses (peers of outbound
    /// rules on UDP port 53). Their answers to this server's queries are
    /// copied to `DNS_ANSWERS` for DNS-aware egress (FQDN rules).
    pub resolver_mask: u32,
    /// Classes that DNS answers can give an address (classes with FQDNs).
    /// The kernel looks an address up in `LEARNED` only when a rule for
    /// the packet's port allows one of these classes and the static tries
    /// did not already allow the flow.
    pub learned_mask: u32,
    /// Idle timeout of an established TCP flow.
    pub tcp_timeout_ns: u64,
    /// Idle timeout of a TCP flow after FIN.
    pub tcp_closing_timeout_ns: u64,
    /// Idle timeout of a UDP flow.
    pub udp_timeout_ns: u64,
    /// A (source, destination port, reason) is reported at most once per
    /// this interval.
    pub report_interval_ns: u64,
    /// Unexpected-flow events each CPU may send per second (a token bucket
    /// of `event_burst` tokens, `EVENT_LIMITER`): beyond it, counted in
    /// `STAT_EVENTS_RATE_LIMITED`, not sent. 0: no event is sent.
    pub event_rate: u32,
    pub event_burst: u32,
    /// Rules whose allowed flows are audited (`[audit] allowed`): bit
    /// `rule % 64` of word `rule / 64` ([`rule_audited`]). A flow created
    /// by such a rule carries [`CT_FLAG_AUDITED`] and sends a
    /// [`FlowRecord`] when it starts and when it ends.
    pub audit_rules: [u64; AUDIT_RULE_WORDS],
}

/// Words of [`Settings::audit_rules`]: one bit per rule id.
pub const AUDIT_RULE_WORDS: usize = (MAX_RULES / 64) as usize;

/// Whether `rule` is set in an [`Settings::audit_rules`] bitmap.
#[inline(always)]
pub const fn rule_audited(bits: &[u64; AUDIT_RULE_WORDS], rule: u16) -> bool {
    bits[(rule as usize >> 6) & (AUDIT_RULE_WORDS - 1)] & (1 << (rule & 63)) != 0
}

/// Conntrack / event key, normalized from the server's point of view:
/// `local` is this host, `remote` the peer, whatever the packet direction.
/// IPv4 addresses are stored in the first 4 bytes of the address arrays,
/// the rest zero. Addresses are in network byte order; ports in host order.
/// Aligned to 8, so the kernel copies and compares it in u64 words.
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// Conntrack states.
pub const CT_STATE_OPEN: u8 = 0;
pub const CT_STATE_CLOSING: u8 = 1;

/// Conntrack flags.
/// The flow was not allowed by policy and passes only because its direction
/// is in monitor mode; its packets count as `VERDICT_MONITOR`.
pub const CT_FLAG_MONITORED: u8 = 1;
/// (`CT_NEW` only) a packet travelled against the flow's direction: the
/// other end answered. The flow moves to `CONNTRACK` (established) on its
/// initiator's next packet (a TCP one with ACK and without SYN), or at
/// once for a UDP flow this server opened.
pub const CT_FLAG_REPLIED: u8 = 2;
/// The rule that allowed the flow is audited (`Settings::audit_rules`):
/// the flow's start and end are sent on `FLOW_RECORDS`.
pub const CT_FLAG_AUDITED: u8 = 4;

/// Value of a conntrack entry.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub last_seen_ns: u64,
    /// Rule that allowed the flow (0 for monitored flows).
    pub rule: u16,
    /// Counter label of the flow's service port.
    pub port_idx: u16,
    /// Direction the flow was initiated in (`DIR_INGRESS` = inbound).
    pub flow_dir: u8,
    pub state: u8,
    pub flags: u8,
    pub _pad: u8,
    /// Clock (`bpf_ktime_get_coarse_ns`) when the entry was created.
    pub started_ns: u64,
    /// Packets and frame bytes that travelled toward this server
    /// (`DIR_INGRESS`) and from it, the creating packet included. Plain
    /// adds on the entry the packet's lookup returned (no atomic add in
    /// Rust for BPF): two CPUs updating one direction of one flow at the
    /// same instant may lose an increment; never over-counted.
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
}

kernel_codes! {
    /// How an audited flow ended ([`FlowRecord::end`]; 0: the record is the
    /// flow's start).
    pub enum FlowEnd {
        /// A FIN was seen (the first one of either end).
        Fin = 1 => "fin",
        /// A RST was seen.
        Rst = 2 => "rst",
        /// Idle past its conntrack timeout (found by the kernel's lookup or
        /// the daemon's walk).
        Idle = 3 => "idle",
    }
}

/// [`FlowEnd`] values, as the programs use them.
pub const FLOW_END_FIN: u8 = FlowEnd::Fin as u8;
pub const FLOW_END_RST: u8 = FlowEnd::Rst as u8;
pub const FLOW_END_IDLE: u8 = FlowEnd::Idle as u8;

/// The start or end of an audited allowed flow, sent on `FLOW_RECORDS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowRecord {
    /// `bpf_ktime_get_ns()` when the record was sent.
    pub ts_ns: u64,
    pub key: FlowKey,
    /// The entry, counters included, after the packet that started or
    /// ended the flow.
    pub entry: CtEntry,
    pub ifindex: u32,
    /// 0: start; else a [`FlowEnd`].
    pub end: u8,
    pub _pad: [u8; 3],
}

kernel_codes! {
    /// Why a flow is unexpected ([`FlowEvent::reason`],
    /// [`ReportKey::reason`]). 0 is no reason (the policy allows the flow).
    pub enum Reason {
        /// No rule covers the (protocol, port).
        NoRule = 1 => "no_rule",
        /// A rule covers the port, but not for the peer's class.
        PeerNotAllowed = 2 => "peer_not_allowed",
        /// The server initiated a flow to a workstation or secondary server.
        OutboundToWorkstation = 3 => "outbound_to_workstation",
        /// Headers truncated or invalid ([`FlowEvent::detail`] says how).
        Malformed = 4 => "malformed",
        /// A TCP packet other than a bare SYN of a flow conntrack does not
        /// hold, which would be a reply of a flow a rule allows in the other
        /// direction. pcguard never adopts such a packet as a reply (it could
        /// open or inject into a flow the policy forbids): it is dropped, and
        /// reported with this reason rather than as a new flow.
        UntrackedReply = 5 => "untracked_reply",
    }
}

/// [`Reason`] values, as the programs use them.
pub const REASON_NO_RULE: u8 = Reason::NoRule as u8;
pub const REASON_PEER_NOT_ALLOWED: u8 = Reason::PeerNotAllowed as u8;
pub const REASON_OUTBOUND_TO_WORKSTATION: u8 = Reason::OutboundToWorkstation as u8;
pub const REASON_MALFORMED: u8 = Reason::Malformed as u8;
pub const REASON_UNTRACKED_REPLY: u8 = Reason::UntrackedReply as u8;
/// One past the highest reason.
pub const NUM_REASONS: u8 = Reason::ALL[Reason::ALL.len() - 1] as u8 + 1;

kernel_codes! {
    /// What made a packet malformed ([`FlowEvent::detail`] of a
    /// `REASON_MALFORMED` report).
    pub enum Malformed {
        /// The Ethernet header or a VLAN tag is cut short.
        L2Truncated = 1 => "l2_truncated",
        /// More VLAN tags than the parser walks ([`MAX_VLAN_TAGS`]).
        TooManyVlanTags = 2 => "too_many_vlan_tags",
        /// The IP header is cut short, or its version does not match the
        /// ethertype.
        IpTruncated = 3 => "ip_truncated",
        /// IPv4 IHL below 5, or the header runs past the total length.
        BadIpHeaderLength = 4 => "bad_ip_header_length",
        /// The IPv4 total length or IPv6 payload length is beyond the frame,
        /// or below the header (IPv6 payload length 0: a jumbogram).
        BadIpLength = 5 => "bad_ip_length",
        /// More IPv6 extension headers than the parser walks.
        Ipv6ChainTooLong = 6 => "ipv6_chain_too_long",
        /// An IPv6 extension header runs past the datagram (for a first
        /// fragment: the header chain is not complete in it, RFC 7112).
        Ipv6ChainTruncated = 7 => "ipv6_chain_truncated",
        /// The TCP or UDP header is not complete inside the datagram (for a
        /// first fragment: a tiny fragment, RFC 1858).
        L4Truncated = 8 => "l4_truncated",
        /// TCP data offset below 5 words.
        BadTcpOffset = 9 => "bad_tcp_offset",
        /// A non-first fragment that would overlap the transport header of the
        /// first one (TCP fragment offset 1 or 2, RFC 1858 / RFC 3128).
        FragmentOverlap = 10 => "fragment_overlap",
        /// A second IPv6 fragment header in one chain.
        DuplicateFragmentHeader = 11 => "duplicate_fragment_header",
        /// UDP length field below 8, or (unfragmented) beyond the datagram.
        BadUdpLength = 12 => "bad_udp_length",
        /// An IPv6 hop-by-hop options header anywhere but directly after the
        /// IPv6 header (RFC 8200 section 4.1).
        Ipv6HopByHopNotFirst = 13 => "ipv6_hop_by_hop_not_first",
    }
}

/// VLAN tags (802.1Q / 802.1ad) the parser walks; a frame with more is
/// malformed.
pub const MAX_VLAN_TAGS: usize = 8;
/// IPv6 extension headers the parser walks; a chain with more is malformed.
pub const MAX_IPV6_EXT_HDRS: usize = 8;

/// One record per new unexpected flow, sent on `EVENTS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` when the packet was seen.
    pub ts_ns: u64,
    pub key: FlowKey,
    /// Peer class mask of the remote address.
    pub peer_mask: u32,
    pub ifindex: u32,
    /// Length of the packet that opened the flow.
    pub pkt_len: u32,
    /// Direction the packet travelled (`DIR_INGRESS` / `DIR_EGRESS`).
    pub direction: u8,
    /// `REASON_*`.
    pub reason: u8,
    /// `VERDICT_DROP` (enforce) or `VERDICT_MONITOR`.
    pub verdict: u8,
    /// TCP flags of the packet (0 for other protocols).
    pub tcp_flags: u8,
    /// Slot the port mapped to (0: none), for the audit record.
    pub slot: u16,
    /// For `REASON_MALFORMED`: what was wrong ([`Malformed`] as `u8`);
    /// 0 otherwise.
    pub detail: u8,
    pub _pad: u8,
    /// Packets of the same [`ReportKey`] that were not reported on their
    /// own since its previous report (0 for the first report).
    pub repeats: u32,
}

/// What one unexpected-flow report stands for — a remote address trying
/// one destination port for one reason, with one verdict — so a flood of
/// new source ports (or sequence numbers) from one address is one report
/// per interval, with a count. Aligned to 8: the kernel hashes and
/// compares it as three u64 words ([`ReportKey::words`]).
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReportKey {
    pub family: u8,
    pub proto: u8,
    /// Direction the packet travelled.
    pub direction: u8,
    pub reason: u8,
    /// The packet's destination port (the service it tried).
    pub port: u16,
    /// `VERDICT_DROP` or `VERDICT_MONITOR`: a reload that changes the mode
    /// reports again.
    pub verdict: u8,
    pub _pad: u8,
    pub remote_addr: [u8; 16],
}

impl ReportKey {
    /// The key as three native-endian u64 words (its 24 bytes in order).
    #[inline(always)]
    pub fn words(&self) -> [u64; 3] {
        // SAFETY: 24 bytes of plain data without padding, aligned to 8.
        unsafe { core::mem::transmute_copy(self) }
    }

    /// Whether this key's words are `w` (three compares, where `==` on
    /// arrays becomes a `memcmp` call in BPF).
    #[inline(always)]
    pub fn is(&self, w: &[u64; 3]) -> bool {
        let k = self.words();
        (k[0] ^ w[0]) | (k[1] ^ w[1]) | (k[2] ^ w[2]) == 0
    }
}

/// Index of the first of the two `REPORTED` slots (one set) that may hold
/// the key whose [`ReportKey::words`] are `w`: a multiply-xorshift hash
/// (Fibonacci hashing, Knuth TAOCP 6.4), a
/// few instructions in the kernel where the LRU hash map's lookup cost ~16
/// ns per dropped packet. Collisions only cost extra report attempts
/// (which the event budget bounds): a set holds its two most recently
/// reported keys.
#[inline(always)]
pub const fn report_set(w: &[u64; 3]) -> u32 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = w[0].wrapping_mul(K);
    h = (h ^ (h >> 29) ^ w[1]).wrapping_mul(K);
    h = (h ^ (h >> 29) ^ w[2]).wrapping_mul(K);
    // The top bits: the only ones every input bit reaches.
    ((h >> (64 - REPORTED_SET_BITS)) as u32) << 1
}

/// log2 of the number of `REPORTED` sets.
const REPORTED_SET_BITS: u32 = REPORTED_ENTRIES.trailing_zeros() - 1;

/// Value of `REPORTED`: a key and its last report. A zeroed slot matches
/// no key (family 0 is no family).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportSlot {
    pub key: ReportKey,
    /// `bpf_ktime_get_coarse_ns` of the last report.
    pub last_ns: u64,
    /// Packets suppressed since then (sent with the next report; counted
    /// without atomics, so concurrent CPUs may lose a few).
    pub repeats: u64,
}

/// A per-CPU token bucket (`EVENT_LIMITER`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    pub tokens: u64,
    /// Time the tokens were last counted up to.
    pub last_ns: u64,
}

/// Bytes of a DNS message copied into a [`DnsAnswer`] (longer messages
/// are cut; the parser uses what it gets).
pub const DNS_PAYLOAD_MAX: usize = 1024;

/// `DnsMessage::kind`: a query this server sent to a resolver (seen at
/// egress) or an answer a resolver sent back (seen at ingress).
pub const DNS_KIND_QUERY: u8 = 1;
pub const DNS_KIND_ANSWER: u8 = 2;

/// A DNS message between this server and one of its resolvers, sent on
/// `DNS_MESSAGES` in the order the programs saw them (one ring buffer for
/// both kinds, so a query always comes before its answer):
///
/// * a query: a UDP packet to port 53 of an address in
///   `Settings.resolver_mask`, with a DNS header whose QR bit is 0, passed
///   at egress. Its (flow, transaction id) is also recorded in
///   `DNS_PENDING`.
/// * an answer: a UDP packet from port 53 of such an address to a tracked
///   flow this server initiated, whose (flow, transaction id) was pending
///   in `DNS_PENDING` (the entry is deleted: one answer per query), seen
///   at ingress.
///
/// The daemon matches each answer with its query (resolver, server port,
/// transaction id, question) before it learns any address from it.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct DnsMessage {
    pub ts_ns: u64,
    /// Resolver address (IPv4 in the first 4 bytes).
    pub resolver: [u8; 16],
    pub family: u8,
    /// `DNS_KIND_QUERY` / `DNS_KIND_ANSWER`.
    pub kind: u8,
    /// Bytes of `payload` that hold the message (at most `DNS_PAYLOAD_MAX`).
    pub len: u16,
    /// Length of the whole UDP payload.
    pub orig_len: u16,
    /// This server's UDP port (source of the query, destination of the
    /// answer).
    pub server_port: u16,
    /// The DNS message (UDP payload).
    pub payload: [u8; DNS_PAYLOAD_MAX],
}

/// Key of `DNS_PENDING`: a query's flow and transaction id.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsPendingKey {
    pub flow: FlowKey,
    /// DNS transaction id, in network byte order as on the wire.
    pub txid: u16,
    pub _pad: [u8; 6],
}

/// Capacity of `DNS_PENDING` (LRU: the oldest outstanding queries go first).
pub const DNS_PENDING_ENTRIES: u32 = 8192;

/// Key of `LEARNED`: an address a DNS answer gave one or more FQDN
/// classes, in one policy generation.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub generation: u8,
    /// `FAMILY_V4` / `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
    /// IPv4 in the first 4 bytes, the rest 0.
    pub addr: [u8; 16],
}

/// DNS-learned addresses per generation (the daemon's cap on the total,
/// see `pcguard::dns`); `LEARNED` holds two generations.
pub const LEARNED_PER_GENERATION: u32 = 8192;
pub const LEARNED_ENTRIES: u32 = NUM_GENERATIONS * LEARNED_PER_GENERATION;

/// Size of `DNS_MESSAGES` in bytes.
pub const DNS_MESSAGES_BYTES: u32 = 1 << 18;

/// Default capacity of `CONNTRACK` (established flows); the daemon sets
/// the configured size at load (`[conntrack] max_entries`).
pub const CONNTRACK_ENTRIES: u32 = 262_144;
/// Default capacity of `CT_NEW` (flows that have not been answered yet;
/// `[conntrack] new_entries`). A flood of new flows churns this table only.
pub const CT_NEW_ENTRIES: u32 = 65_536;
/// Slots of `REPORTED` (a power of two: 32,768 sets of two).
pub const REPORTED_ENTRIES: u32 = 65_536;
/// Prefixes per address family of one policy (one generation).
pub const PEER_ENTRIES: u32 = 16_384;
/// Capacity of each LPM trie: every generation's prefixes.
pub const PEER_TRIE_ENTRIES: u32 = NUM_GENERATIONS * PEER_ENTRIES;

/// Bits of an LPM key taken by the generation byte: a prefix of length `n`
/// of generation `g` is stored as key `(GEN_PREFIX_BITS + n, [g, addr..])`,
/// and a packet looks up `(GEN_PREFIX_BITS + 32 (or 128), [g, addr..])`.
pub const GEN_PREFIX_BITS: u32 = 8;

/// `PEERS_V4` key data: the generation byte, then the address.
#[inline(always)]
pub const fn peer_key_v4(generation: u32, a: [u8; 4]) -> [u8; 5] {
    [generation as u8, a[0], a[1], a[2], a[3]]
}

/// `PEERS_V6` key data: the generation byte, then the address.
#[inline(always)]
pub const fn peer_key_v6(generation: u32, a: [u8; 16]) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = generation as u8;
    let mut i = 0;
    while i < 16 {
        k[i + 1] = a[i];
        i += 1;
    }
    k
}
/// Size of `EVENTS` in bytes (power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Size of `FLOW_RECORDS` in bytes (2340 records of 112 bytes + 8 of
/// header).
pub const FLOW_RECORDS_BYTES: u32 = 1 << 18;

/// Version of this contract (map layouts, key and value types, the
/// meaning of their fields). Bump it whenever any of them changes: a daemon
/// finding maps pinned under another version does not adopt them (it
/// creates a new set and swaps the programs), and `status` names both.
pub const ABI_VERSION: u32 = 5;

/// `TC_RERUN` entries: each TC program's own (the program runs itself again
/// after pulling headers into the skb's linear part).
pub const TC_RERUN_EGRESS: u32 = 0;
pub const TC_RERUN_INGRESS: u32 = 1;

/// The shape of one map of the contract, as the kernel reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    /// Default `max_entries` (the daemon sets `CONNTRACK` and `CT_NEW` from
    /// the config); for ring buffers, the size in bytes.
    pub max_entries: u32,
}

const fn layout<K, V>(name: &'static str, max_entries: u32) -> MapLayout {
    MapLayout {
        name,
        key_size: core::mem::size_of::<K>() as u32,
        value_size: core::mem::size_of::<V>() as u32,
        max_entries,
    }
}

/// Every map of the object, with its key and value sizes: checked against
/// the built object by a test (`pcguard/tests/object_layouts.rs`, which
/// parses it), and against pinned maps before a daemon adopts them.
pub const MAP_LAYOUTS: [MapLayout; 20] = [
    layout::<u32, u32>(names::ACTIVE, 1),
    layout::<u32, PortEntry>(names::PORTS, PORTS_ENTRIES),
    layout::<u32, PortSlot>(names::SLOTS, SLOTS_ENTRIES),
    // LPM keys: a u32 prefix length, then the data, packed.
    layout::<[u8; 4 + 5], u32>(names::PEERS_V4, PEER_TRIE_ENTRIES),
    layout::<[u8; 4 + 17], u32>(names::PEERS_V6, PEER_TRIE_ENTRIES),
    layout::<u32, Settings>(names::SETTINGS, NUM_GENERATIONS),
    layout::<FlowKey, CtEntry>(names::CONNTRACK, CONNTRACK_ENTRIES),
    layout::<FlowKey, CtEntry>(names::CT_NEW, CT_NEW_ENTRIES),
    layout::<u32, ReportSlot>(names::REPORTED, REPORTED_ENTRIES),
    layout::<u32, TokenBucket>(names::EVENT_LIMITER, 1),
    layout::<u32, Counters>(names::PORT_COUNTERS, PORT_COUNTER_ENTRIES),
    layout::<u32, Counters>(names::RULE_COUNTERS, RULE_COUNTER_ENTRIES),
    layout::<u32, u64>(names::STATS, NUM_STATS),
    layout::<LearnedKey, u32>(names::LEARNED, LEARNED_ENTRIES),
    layout::<DnsPendingKey, u64>(names::DNS_PENDING, DNS_PENDING_ENTRIES),
    MapLayout { name: names::EVENTS, key_size: 0, value_size: 0, max_entries: EVENTS_BYTES },
    MapLayout { name: names::DNS_MESSAGES, key_size: 0, value_size: 0, max_entries: DNS_MESSAGES_BYTES },
    MapLayout { name: names::FLOW_RECORDS, key_size: 0, value_size: 0, max_entries: FLOW_RECORDS_BYTES },
    layout::<u32, u32>(names::TC_RERUN, 2),
    layout::<u32, u32>(names::SCRATCH, 1),
];

/// The layout of map `name`.
pub fn map_layout(name: &str) -> Option<MapLayout> {
    let mut i = 0;
    while i < MAP_LAYOUTS.len() {
        if str_eq(MAP_LAYOUTS[i].name, name) {
            return Some(MAP_LAYOUTS[i]);
        }
        i += 1;
    }
    None
}

fn str_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.as_bytes() == b.as_bytes()
}

/// Names of the maps and programs in the object file.
pub mod names {
    pub const XDP_PROG: &str = "pcguard_ingress";
    pub const TC_PROG: &str = "pcguard_egress";
    /// The ingress pipeline on TC (tcx), for interfaces where XDP is not
    /// the right hook.
    pub const TC_INGRESS_PROG: &str = "pcguard_ingress_tc";
    pub const ACTIVE: &str = "ACTIVE";
    pub const PORTS: &str = "PORTS";
    pub const SLOTS: &str = "SLOTS";
    pub const PEERS_V4: &str = "PEERS_V4";
    pub const PEERS_V6: &str = "PEERS_V6";
    pub const SETTINGS: &str = "SETTINGS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CT_NEW: &str = "CT_NEW";
    pub const EVENT_LIMITER: &str = "EVENT_LIMITER";
    pub const REPORTED: &str = "REPORTED";
    pub const PORT_COUNTERS: &str = "PORT_COUNTERS";
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    pub const STATS: &str = "STATS";
    pub const EVENTS: &str = "EVENTS";
    pub const FLOW_RECORDS: &str = "FLOW_RECORDS";
    pub const DNS_MESSAGES: &str = "DNS_MESSAGES";
    pub const LEARNED: &str = "LEARNED";
    pub const DNS_PENDING: &str = "DNS_PENDING";
    pub const TC_RERUN: &str = "TC_RERUN";
    pub const SCRATCH: &str = "SCRATCH";

    /// The maps pinned under the daemon's bpffs directory: the policy,
    /// conntrack, counters and DNS state that outlive one daemon process.
    pub const PINNED: [&str; 15] = [
        ACTIVE,
        PORTS,
        SLOTS,
        PEERS_V4,
        PEERS_V6,
        SETTINGS,
        CONNTRACK,
        CT_NEW,
        REPORTED,
        EVENT_LIMITER,
        PORT_COUNTERS,
        RULE_COUNTERS,
        STATS,
        LEARNED,
        DNS_PENDING,
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for PortEntry {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for PortSlot {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for Counters {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for Settings {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for CtEntry {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for FlowRecord {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for ReportKey {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for ReportSlot {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for TokenBucket {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for DnsMessage {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for DnsPendingKey {}
    // SAFETY: repr(C) plain data without padding (layouts_have_no_implicit_padding).
    unsafe impl aya::Pod for LearnedKey {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn every_pinned_map_has_a_layout() {
        for name in names::PINNED {
            assert!(map_layout(name).is_some(), "{name}");
        }
        assert_eq!(map_layout(names::PEERS_V4).unwrap().key_size, 9);
        assert_eq!(map_layout(names::CONNTRACK).unwrap().key_size, 40);
        assert!(map_layout("NOPE").is_none());
    }

    #[test]
    fn malformed_codes_round_trip() {
        for m in Malformed::ALL {
            assert_eq!(Malformed::try_from(m as u8), Ok(m));
        }
        assert_eq!(Malformed::try_from(0), Err(0));
        assert_eq!(Malformed::try_from(200), Err(200));
    }

    /// Every code of a family: decodes from its value, `ALL` in numeric
    /// order without duplicates, names distinct; `name_of` a value no code
    /// has is `UNKNOWN`.
    macro_rules! check_family {
        ($family:ident) => {{
            let all = $family::ALL;
            for (i, c) in all.iter().enumerate() {
                assert_eq!($family::try_from(*c as u8), Ok(*c), "{}", stringify!($family));
                assert_eq!($family::name_of(*c as u8), c.as_str());
                assert_ne!(c.as_str(), UNKNOWN);
                if i > 0 {
                    assert!((all[i - 1] as u8) < *c as u8, "{}::ALL out of order", stringify!($family));
                }
                for other in &all[..i] {
                    assert_ne!(other.as_str(), c.as_str(), "{}: two codes named alike", stringify!($family));
                }
            }
            let past = all[all.len() - 1] as u8 + 1;
            assert_eq!($family::try_from(past), Err(past));
            assert_eq!($family::name_of(past), UNKNOWN);
            assert_eq!($family::name_of(u8::MAX), UNKNOWN);
        }};
    }

    #[test]
    fn code_families_round_trip() {
        check_family!(PacketDir);
        check_family!(ProtoIndex);
        check_family!(Verdict);
        check_family!(Mode);
        check_family!(Reason);
        check_family!(Malformed);
        // 0 is no reason, no malformation.
        assert_eq!(Reason::name_of(0), UNKNOWN);
        assert_eq!(Malformed::name_of(0), UNKNOWN);
    }

    /// The values and names are the contract (the kernel's integers, the
    /// audit records' and metric labels' strings): a change here is an ABI
    /// or interface change, not a refactoring.
    #[test]
    fn codes_keep_their_values_and_names() {
        let dirs: [(PacketDir, u8, &str); 2] = [(PacketDir::Ingress, 0, "ingress"), (PacketDir::Egress, 1, "egress")];
        for (c, v, n) in dirs {
            assert_eq!((c as u8, c.as_str()), (v, n));
        }
        let protos = [(ProtoIndex::Tcp, 0, "tcp"), (ProtoIndex::Udp, 1, "udp"), (ProtoIndex::Other, 2, "other")];
        for (c, v, n) in protos {
            assert_eq!((c as u8, c.as_str()), (v, n));
        }
        let verdicts = [
            (Verdict::Allow, 0, "allowed"),
            (Verdict::Drop, 1, "dropped"),
            (Verdict::Monitor, 2, "would_drop"),
            (Verdict::Bypass, 3, "bypassed"),
        ];
        for (c, v, n) in verdicts {
            assert_eq!((c as u8, c.as_str()), (v, n));
        }
        for (c, v, n) in [(Mode::Enforce, 0, "enforce"), (Mode::Monitor, 1, "monitor")] {
            assert_eq!((c as u8, c.as_str()), (v, n));
        }
        let reasons = [
            (Reason::NoRule, 1, "no_rule"),
            (Reason::PeerNotAllowed, 2, "peer_not_allowed"),
            (Reason::OutboundToWorkstation, 3, "outbound_to_workstation"),
            (Reason::Malformed, 4, "malformed"),
            (Reason::UntrackedReply, 5, "untracked_reply"),
        ];
        for (c, v, n) in reasons {
            assert_eq!((c as u8, c.as_str()), (v, n));
        }
        assert_eq!((Malformed::L2Truncated as u8, Malformed::Ipv6HopByHopNotFirst as u8), (1, 13));
        assert_eq!(Malformed::L4Truncated.as_str(), "l4_truncated");
        assert_eq!(NUM_REASONS, 6);
        assert_eq!(Mode::default(), Mode::Enforce, "a zeroed Settings enforces");
    }

    #[test]
    fn dense_codes_index_their_tables() {
        for (i, d) in PacketDir::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
        for (i, p) in ProtoIndex::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
        assert_eq!((NUM_DIRS, NUM_COUNTER_PROTOS, NUM_VERDICTS), (2, 3, 4));
        const { assert!(NUM_PORT_PROTOS <= NUM_COUNTER_PROTOS && PROTO_IDX_OTHER >= NUM_PORT_PROTOS) };
    }

    /// Sets taken and the fullest set's load for `keys`.
    fn spread(keys: impl Iterator<Item = ReportKey>) -> (usize, usize) {
        let mut load = [0u32; (REPORTED_ENTRIES / 2) as usize];
        for k in keys {
            let set = report_set(&k.words());
            assert_eq!(set % 2, 0, "a set starts on an even slot");
            assert!(set + 1 < REPORTED_ENTRIES);
            load[(set / 2) as usize] += 1;
        }
        (load.iter().filter(|&&n| n > 0).count(), load.iter().copied().max().unwrap_or(0) as usize)
    }

    #[test]
    fn report_sets_spread_like_random() {
        // 10,000 keys in 32,768 sets: a random function takes ~8,600 sets
        // and puts at most ~6 keys in one.
        let v4 = |i: u32, port: u16| ReportKey {
            family: FAMILY_V4,
            proto: 6,
            port,
            verdict: 1,
            remote_addr: {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&(0x0a64_0000u32 + i).to_be_bytes());
                a
            },
            ..Default::default()
        };
        let (sets, max) = spread((0..10_000).map(|i| v4(i, 9191)));
        assert!(sets > 8_300 && max <= 7, "addresses of one /16: {sets} sets, max {max}");
        let (sets, max) = spread((0..10_000).map(|p| v4(1, p as u16)));
        assert!(sets > 8_300 && max <= 7, "ports of one address: {sets} sets, max {max}");
        let v6 = |i: u32| ReportKey {
            family: FAMILY_V6,
            proto: 17,
            port: 53,
            remote_addr: {
                let mut a = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                a[12..].copy_from_slice(&i.to_be_bytes());
                a
            },
            ..Default::default()
        };
        let (sets, max) = spread((0..10_000).map(v6));
        assert!(sets > 8_300 && max <= 7, "IPv6 addresses of one /96: {sets} sets, max {max}");
    }

    #[test]
    fn report_key_words_are_its_bytes() {
        let k = ReportKey {
            family: 4,
            proto: 6,
            direction: 1,
            reason: 2,
            port: 0x1234,
            verdict: 1,
            _pad: 0,
            remote_addr: [7; 16],
        };
        let w = k.words();
        let mut bytes = [0u8; 24];
        for (i, word) in w.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_ne_bytes());
        }
        assert_eq!(&bytes[..4], &[4, 6, 1, 2]);
        assert_eq!(&bytes[4..6], &0x1234u16.to_ne_bytes());
        assert_eq!(&bytes[6..8], &[1, 0]);
        assert_eq!(&bytes[8..], &[7; 16]);
    }

    /// Size of the field `get` reads.
    fn field_size<T, F>(_get: fn(&T) -> &F) -> usize {
        size_of::<F>()
    }

    /// `fields!(T, size, f @ offset, ...)`, every field of `T` in order:
    /// each is at its offset, right after the one before, and the last
    /// ends at `size`, the size of `T`.
    macro_rules! fields {
        ($t:ty, $size:expr, $($f:ident @ $off:expr),+ $(,)?) => {{
            let mut end = 0;
            $(
                assert_eq!(core::mem::offset_of!($t, $f), $off, concat!(stringify!($t), ".", stringify!($f)));
                assert_eq!(end, $off, concat!("padding before ", stringify!($t), ".", stringify!($f)));
                end = $off + field_size(|x: &$t| &x.$f);
            )+
            assert_eq!(end, $size, concat!("padding at the end of ", stringify!($t)));
            assert_eq!(size_of::<$t>(), $size, stringify!($t));
        }};
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PortEntry>(), 4);
        assert_eq!(size_of::<PortSlot>(), 4 + 2 * MAX_CLASSES);
        assert_eq!(size_of::<FlowKey>(), 8 + 32);
        assert_eq!(size_of::<CtEntry>(), 16 + 40);
        assert_eq!(align_of::<CtEntry>(), 8);
        assert_eq!(size_of::<Settings>(), 16 + 32 + 8 + 64);
        assert_eq!(size_of::<FlowRecord>(), 8 + 40 + 56 + 8);
        assert_eq!(size_of::<ReportKey>(), 8 + 16);
        assert_eq!(size_of::<ReportSlot>(), 24 + 16);
        assert_eq!(align_of::<ReportKey>(), 8);
        assert_eq!(align_of::<FlowKey>(), 8);
        assert_eq!(size_of::<DnsMessage>(), 8 + 16 + 8 + DNS_PAYLOAD_MAX);
        assert_eq!(size_of::<FlowEvent>(), 8 + 40 + 12 + 4 + 2 + 2 + 4);
        assert_eq!(size_of::<DnsPendingKey>(), 40 + 8);
        assert_eq!(size_of::<LearnedKey>(), 20);
        assert_eq!(size_of::<Counters>(), 16 * NUM_VERDICTS);

        // Every field of every shared struct where the other side reads it,
        // and nothing between or after the fields.
        fields!(PortEntry, 4, slot @ 0, port_idx @ 2);
        fields!(PortSlot, 4 + 2 * MAX_CLASSES, allowed_mask @ 0, rule_by_class @ 4);
        fields!(Counters, 16 * NUM_VERDICTS, packets @ 0, bytes @ 8 * NUM_VERDICTS);
        fields!(
            Settings,
            120,
            ingress_mode @ 0,
            egress_mode @ 1,
            allow_icmp @ 2,
            ready @ 3,
            no_initiate_mask @ 4,
            resolver_mask @ 8,
            learned_mask @ 12,
            tcp_timeout_ns @ 16,
            tcp_closing_timeout_ns @ 24,
            udp_timeout_ns @ 32,
            report_interval_ns @ 40,
            event_rate @ 48,
            event_burst @ 52,
            audit_rules @ 56,
        );
        fields!(FlowKey, 40, family @ 0, proto @ 1, _pad @ 2, local_port @ 4, remote_port @ 6, local_addr @ 8, remote_addr @ 24);
        fields!(
            CtEntry,
            56,
            last_seen_ns @ 0,
            rule @ 8,
            port_idx @ 10,
            flow_dir @ 12,
            state @ 13,
            flags @ 14,
            _pad @ 15,
            started_ns @ 16,
            packets_in @ 24,
            bytes_in @ 32,
            packets_out @ 40,
            bytes_out @ 48,
        );
        fields!(FlowRecord, 112, ts_ns @ 0, key @ 8, entry @ 48, ifindex @ 104, end @ 108, _pad @ 109);
        fields!(
            FlowEvent,
            72,
            ts_ns @ 0,
            key @ 8,
            peer_mask @ 48,
            ifindex @ 52,
            pkt_len @ 56,
            direction @ 60,
            reason @ 61,
            verdict @ 62,
            tcp_flags @ 63,
            slot @ 64,
            detail @ 66,
            _pad @ 67,
            repeats @ 68,
        );
        fields!(ReportKey, 24, family @ 0, proto @ 1, direction @ 2, reason @ 3, port @ 4, verdict @ 6, _pad @ 7, remote_addr @ 8);
        fields!(ReportSlot, 40, key @ 0, last_ns @ 24, repeats @ 32);
        fields!(TokenBucket, 16, tokens @ 0, last_ns @ 8);
        fields!(
            DnsMessage,
            32 + DNS_PAYLOAD_MAX,
            ts_ns @ 0,
            resolver @ 8,
            family @ 24,
            kind @ 25,
            len @ 26,
            orig_len @ 28,
            server_port @ 30,
            payload @ 32,
        );
        fields!(DnsPendingKey, 48, flow @ 0, txid @ 40, _pad @ 42);
        fields!(LearnedKey, 20, generation @ 0, family @ 1, _pad @ 2, addr @ 4);
    }

    #[test]
    fn indexes_stay_in_bounds() {
        assert_eq!(port_table_index(DIR_EGRESS, PROTO_IDX_UDP, 65535), PORT_TABLE_ENTRIES - 1);
        assert_eq!(
            port_counter_index(DIR_EGRESS, PROTO_IDX_OTHER, (MAX_PORT_LABELS - 1) as u16),
            PORT_COUNTER_ENTRIES - 1
        );
        assert_eq!(rule_counter_index(DIR_EGRESS, (MAX_RULES - 1) as u16), RULE_COUNTER_ENTRIES - 1);
        assert_eq!(port_table_index(DIR_INGRESS, PROTO_IDX_TCP, 9191), 9191);
        let last_gen = NUM_GENERATIONS - 1;
        assert_eq!(ports_index(last_gen, PORT_TABLE_ENTRIES - 1), PORTS_ENTRIES - 1);
        assert_eq!(ports_index(1, 9191), PORT_TABLE_ENTRIES + 9191);
        assert_eq!(slots_index(last_gen, MAX_SLOTS - 1), SLOTS_ENTRIES - 1);
    }

    #[test]
    fn peer_keys_lead_with_the_generation() {
        assert_eq!(peer_key_v4(1, [10, 1, 2, 3]), [1, 10, 1, 2, 3]);
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = 7;
        let k = peer_key_v6(1, a);
        assert_eq!((k[0], &k[1..]), (1, &a[..]));
        // The generation never reaches the address bits of the prefix.
        const { assert!(NUM_GENERATIONS <= 1 << GEN_PREFIX_BITS) };
    }
}
