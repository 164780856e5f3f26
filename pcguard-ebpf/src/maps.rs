//! The maps shared with userspace. Names and sizes are the contract in
//! `pcguard_common` (see `pcguard_common::names`): the static's identifier is
//! the map's name in the object file.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use pcguard_common::{
    CONNTRACK_ENTRIES, Counters, CtEntry, DNS_ANSWERS_BYTES, EVENTS_BYTES, FlowKey,
    NUM_GENERATIONS, NUM_STATS, PEER_TRIE_ENTRIES, PORT_COUNTER_ENTRIES, PORTS_ENTRIES, PortEntry,
    PortSlot, REPORTED_ENTRIES, RULE_COUNTER_ENTRIES, SLOTS_ENTRIES, Settings,
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

/// Normalized flow key -> conntrack entry.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(CONNTRACK_ENTRIES, 0);

/// Flow key -> time of its last unexpected-flow report.
#[map]
pub static REPORTED: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(REPORTED_ENTRIES, 0);

/// Packets/bytes per (packet direction, protocol, port label) and verdict.
#[map]
pub static PORT_COUNTERS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(PORT_COUNTER_ENTRIES, 0);

/// Packets/bytes per (packet direction, rule) and verdict.
#[map]
pub static RULE_COUNTERS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(RULE_COUNTER_ENTRIES, 0);

/// `STAT_*` event counters.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_STATS, 0);

/// Unexpected-flow records (`FlowEvent`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// DNS answers from resolvers (`DnsAnswer`), seen at ingress.
#[map]
pub static DNS_ANSWERS: RingBuf = RingBuf::with_byte_size(DNS_ANSWERS_BYTES, 0);
