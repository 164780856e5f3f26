//! The maps shared with userspace. Names and sizes are the contract in
//! `pcguard_common` (see `pcguard_common::names`): the static's identifier is
//! the map's name in the object file.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use pcguard_common::{
    CONNTRACK_ENTRIES, CT_NEW_ENTRIES, Counters, CtEntry, DNS_MESSAGES_BYTES, DNS_PENDING_ENTRIES, DnsPendingKey,
    EVENTS_BYTES, FLOW_RECORDS_BYTES, FlowKey, LEARNED_ENTRIES, LearnedKey, NUM_GENERATIONS, NUM_STATS,
    PEER_TRIE_ENTRIES, PORT_COUNTER_ENTRIES, PORTS_ENTRIES, PortEntry, PortSlot, REPORTED_ENTRIES,
    RULE_COUNTER_ENTRIES, ReportSlot, SLOTS_ENTRIES, Settings, TokenBucket,
};

/// The policy generation packets use (0 or 1), one entry: read once per
/// packet, written by the daemon to switch policies.
#[map]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// (generation, direction, protocol, port) -> slot and counter label.
#[map]
pub static PORTS: Array<PortEntry> = Array::with_max_entries(PORTS_ENTRIES, 0);

/// (generation, slot) -> allowed peer classes and the rule per class.
#[map]
pub static SLOTS: Array<PortSlot> = Array::with_max_entries(SLOTS_ENTRIES, 0);

/// (generation byte, IPv4 prefix) -> peer class mask. `LpmTrie` always adds
/// `BPF_F_NO_PREALLOC` (the kernel requires it for LPM tries).
#[map]
pub static PEERS_V4: LpmTrie<[u8; 5], u32> = LpmTrie::with_max_entries(PEER_TRIE_ENTRIES, 0);

/// (generation byte, IPv6 prefix) -> peer class mask.
#[map]
pub static PEERS_V6: LpmTrie<[u8; 17], u32> = LpmTrie::with_max_entries(PEER_TRIE_ENTRIES, 0);

/// Global settings, one entry per generation.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(NUM_GENERATIONS, 0);

/// Normalized flow key -> conntrack entry, for established flows (both
/// ends spoke): only other established flows can evict one.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> = LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

/// Normalized flow key -> conntrack entry, for flows not answered yet. A
/// flood of new flows (spoofed SYNs, scans) churns this table only. One
/// LRU list per CPU (`BPF_F_NO_COMMON_LRU`): under a flood, every insert
/// evicts, and a list shared by the CPUs serializes them on its lock.
#[map]
pub static CT_NEW: LruHashMap<FlowKey, CtEntry> = LruHashMap::with_max_entries(CT_NEW_ENTRIES, BPF_F_NO_COMMON_LRU);

/// The last report of each recently reported key (remote address,
/// destination port, reason, ...): sets of two slots, the set chosen by
/// `report_set` (an array lookup and a hash of a few instructions, where
/// an LRU hash map's lookup cost ~16 ns per dropped packet).
#[map]
pub static REPORTED: Array<ReportSlot> = Array::with_max_entries(REPORTED_ENTRIES, 0);

/// Per-CPU budget of unexpected-flow events (`Settings.event_rate`).
#[map]
pub static EVENT_LIMITER: PerCpuArray<TokenBucket> = PerCpuArray::with_max_entries(1, 0);

/// Packets/bytes per (packet direction, protocol, port label) and verdict.
#[map]
pub static PORT_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(PORT_COUNTER_ENTRIES, 0);

/// Packets/bytes per (packet direction, rule) and verdict.
#[map]
pub static RULE_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(RULE_COUNTER_ENTRIES, 0);

/// `STAT_*` event counters.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_STATS, 0);

/// Unexpected-flow records (`FlowEvent`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Starts and ends of audited allowed flows (`FlowRecord`).
#[map]
pub static FLOW_RECORDS: RingBuf = RingBuf::with_byte_size(FLOW_RECORDS_BYTES, 0);

/// (generation, address) -> FQDN class mask learned from DNS answers.
/// Separate from the static peer tries, so that the policy always has its
/// room whatever DNS brings; written by the daemon only.
#[map]
pub static LEARNED: HashMap<LearnedKey, u32> = HashMap::with_max_entries(LEARNED_ENTRIES, 0);

/// (query flow, transaction id) -> time of the query: the DNS queries this
/// server sent that have not been answered yet. An answer is copied only
/// if it removes its query's entry (one answer per query).
#[map]
pub static DNS_PENDING: LruHashMap<DnsPendingKey, u64> = LruHashMap::with_max_entries(DNS_PENDING_ENTRIES, 0);

/// DNS queries to and answers from resolvers (`DnsMessage`), in order.
#[map]
pub static DNS_MESSAGES: RingBuf = RingBuf::with_byte_size(DNS_MESSAGES_BYTES, 0);

/// Each TC program at its `TC_RERUN_*` index. A TC run whose headers are
/// not in the skb's linear part pulls them in and runs the program again
/// from the start through this (a tail call), so the verifier sees one
/// parse, not a parse after every failed one.
#[map]
pub static TC_RERUN: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// One per-CPU word the programs store a value into and read back, so the
/// verifier sees it as an unknown (bounded) number rather than one of a
/// few constants: see `parse::opaque`. Internal, not pinned.
#[map]
pub static SCRATCH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
