//! Typed access to the maps of the loaded object: lookups by name, the
//! statistics and ring buffers, conntrack seeding, `LEARNED` keys, reading
//! a policy generation back, and ring-buffer records. Functions of an
//! [`Ebpf`] (the [`Datapath`](super::Datapath) owns it); no state here.

use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, RingBuf},
};
use pcguard_common::{
    CT_FLAG_AUDITED, CT_STATE_CLOSING, CT_STATE_OPEN, CtEntry, FAMILY_V4, FAMILY_V6, FlowKey, GEN_PREFIX_BITS,
    IPPROTO_TCP, LearnedKey, PortEntry, PortSlot, names, ports_index, slots_index,
};

use crate::{
    policy::{CompiledPolicy, PeerPrefix, PolicySettings},
    seed::Seed,
    sys,
};

/// `bpf_map_update_elem` flag: fail with `EEXIST` if the key is present.
const BPF_NOEXIST: u64 = 1;

/// What one [`Datapath::seed_conntrack`](super::Datapath::seed_conntrack)
/// did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedStats {
    /// Entries written.
    pub inserted: usize,
    /// Flows conntrack already held (kept as they are).
    pub existing: usize,
}

/// The map `name` of the object.
pub(super) fn map<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Map> {
    ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from object"))
}

/// The map `name` of the object, writable.
pub(super) fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from object"))
}

/// A `STAT_*` counter, summed over the CPUs.
pub(super) fn stat(ebpf: &Ebpf, idx: u32) -> Result<u64> {
    let stats: aya::maps::PerCpuArray<&MapData, u64> = aya::maps::PerCpuArray::try_from(map(ebpf, names::STATS)?)?;
    Ok(stats.get(&idx, 0)?.iter().sum())
}

/// Takes a ring buffer (`EVENTS`, `DNS_MESSAGES`) to consume it (once).
pub(super) fn take_ring(ebpf: &mut Ebpf, name: &str) -> Result<RingBuf<MapData>> {
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("{name} map missing or already taken"))?;
    Ok(RingBuf::try_from(map)?)
}

/// One `CONNTRACK` entry per seed, last seen now on the programs' clock,
/// written with `BPF_NOEXIST` (an entry conntrack holds is left as it is):
/// see [`Datapath::seed_conntrack`](super::Datapath::seed_conntrack).
pub(super) fn seed_conntrack(ebpf: &mut Ebpf, seeds: &[Seed]) -> Result<SeedStats> {
    let now = sys::ktime_coarse_ns();
    let mut map: BpfHashMap<&mut MapData, FlowKey, CtEntry> = BpfHashMap::try_from(map_mut(ebpf, names::CONNTRACK)?)?;
    let mut stats = SeedStats::default();
    for seed in seeds {
        match map.insert(seed.flow_key(), seed.entry(now), BPF_NOEXIST) {
            Ok(()) => stats.inserted += 1,
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::AlreadyExists => {
                stats.existing += 1
            }
            Err(e) => return Err(e).with_context(|| format!("seeding conntrack with {}", seed.conn)),
        }
    }
    Ok(stats)
}

/// The idle timeout (ns) the programs give an entry of protocol `proto` in
/// `state` (`pcguard-ebpf` `conntrack::idle_timeout`).
fn idle_timeout_ns(proto: u8, state: u8, s: &PolicySettings) -> u64 {
    let d = match (proto, state) {
        (IPPROTO_TCP, CT_STATE_CLOSING) => s.tcp_closing_timeout,
        (IPPROTO_TCP, _) => s.tcp_timeout,
        _ => s.udp_timeout,
    };
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Removes the open audited flows (`CT_FLAG_AUDITED`, not closed by
/// FIN/RST) of both conntrack tables that are idle past their timeout
/// under `s`, and returns them (key, entry as last read): each is one
/// `flow_end` record with reason `idle`. An entry is returned only if
/// this removal succeeded, so a flow the kernel's own expiry removed
/// (which then reported it) is never reported twice.
pub(super) fn expire_audited(ebpf: &mut Ebpf, s: &PolicySettings) -> Result<Vec<(FlowKey, CtEntry)>> {
    let now = sys::ktime_coarse_ns();
    let mut out = Vec::new();
    for name in [names::CONNTRACK, names::CT_NEW] {
        let mut map: BpfHashMap<&mut MapData, FlowKey, CtEntry> = BpfHashMap::try_from(map_mut(ebpf, name)?)?;
        let idle: Vec<(FlowKey, CtEntry)> = map
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, e)| {
                e.flags & CT_FLAG_AUDITED != 0
                    && e.state == CT_STATE_OPEN
                    && now.saturating_sub(e.last_seen_ns) >= idle_timeout_ns(k.proto, e.state, s)
            })
            .collect();
        for (k, e) in idle {
            // Read again: a packet may have refreshed it since.
            match map.get(&k, 0) {
                Ok(cur) if now.saturating_sub(cur.last_seen_ns) >= idle_timeout_ns(k.proto, cur.state, s) => {}
                _ => continue,
            }
            if map.remove(&k).is_ok() {
                out.push((k, e));
            }
        }
    }
    Ok(out)
}

/// Reads back what generation `generation` of the policy tables holds:
/// for a daemon that adopts maps another process wrote. Not its settings:
/// every write of a generation writes them whole.
pub(super) fn read_generation(ebpf: &Ebpf, generation: u32) -> Result<CompiledPolicy> {
    let mut held = CompiledPolicy::default();
    let slots: Array<&MapData, PortSlot> = Array::try_from(map(ebpf, names::SLOTS)?)?;
    for i in 0..pcguard_common::MAX_SLOTS {
        held.slots.push(slots.get(&slots_index(generation, i), 0)?);
    }
    while held.slots.len() > 1 && held.slots.last() == Some(&PortSlot::default()) {
        held.slots.pop();
    }
    let ports: Array<&MapData, PortEntry> = Array::try_from(map(ebpf, names::PORTS)?)?;
    for idx in 0..pcguard_common::PORT_TABLE_ENTRIES {
        let e = ports.get(&ports_index(generation, idx), 0)?;
        if e != PortEntry::default() {
            held.ports.push((idx, e));
        }
    }
    held.peers_v4 = read_prefixes::<5, 4>(map(ebpf, names::PEERS_V4)?, generation)?;
    held.peers_v6 = read_prefixes::<17, 16>(map(ebpf, names::PEERS_V6)?, generation)?;
    Ok(held)
}

/// The prefixes of `generation` in an LPM trie whose keys are a generation
/// byte and an `A`-byte address (`K = A + 1`).
fn read_prefixes<const K: usize, const A: usize>(map: &Map, generation: u32) -> Result<Vec<PeerPrefix<A>>>
where
    [u8; K]: aya::Pod,
{
    let trie: LpmTrie<&MapData, [u8; K], u32> = LpmTrie::try_from(map)?;
    let mut out = Vec::new();
    for key in trie.keys() {
        let key = key?;
        let data = key.data();
        if u32::from(data[0]) != generation {
            continue;
        }
        let mask = trie.get(&key, 0)?;
        let mut addr = [0u8; A];
        addr.copy_from_slice(&data[1..]);
        out.push(PeerPrefix { addr, prefix_len: key.prefix_len() - GEN_PREFIX_BITS, mask });
    }
    Ok(out)
}

/// Every entry of `LEARNED` (both generations).
pub(super) fn read_learned(ebpf: &Ebpf) -> Result<Vec<(LearnedKey, u32)>> {
    let learned: BpfHashMap<&MapData, LearnedKey, u32> = BpfHashMap::try_from(map(ebpf, names::LEARNED)?)?;
    Ok(learned.iter().collect::<Result<_, _>>()?)
}

/// The address of a `LEARNED` key.
pub(super) fn learned_addr(k: &LearnedKey) -> IpAddr {
    if k.family == FAMILY_V4 {
        IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
    } else {
        IpAddr::from(k.addr)
    }
}

/// The `LEARNED` key of `addr` in `generation` (IPv4 in the first 4 bytes,
/// as the kernel builds it from a flow key).
pub fn learned_key(generation: u32, addr: IpAddr) -> LearnedKey {
    let mut k = LearnedKey { generation: generation as u8, family: FAMILY_V4, _pad: [0; 2], addr: [0; 16] };
    match addr {
        IpAddr::V4(a) => k.addr[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => {
            k.family = FAMILY_V6;
            k.addr = a.octets();
        }
    }
    k
}

/// True when a map operation failed because the key is absent: aya
/// reports that as `KeyNotFound` for some calls and as the syscall's
/// ENOENT for a hash-map delete.
pub fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// A whole `T` read from a ring-buffer record; `None` if the record is
/// shorter than `T`.
pub fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: T is Pod (repr(C) plain data, any bit pattern valid) and the
    // slice holds size_of::<T>() bytes; read_unaligned copes with any
    // alignment of the ring-buffer slice.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_keys_are_built_like_the_kernel_s_and_read_back() {
        for addr in ["203.0.113.7", "2001:db8::7"] {
            let a: IpAddr = addr.parse().unwrap();
            assert_eq!(learned_addr(&learned_key(1, a)), a);
        }
        let k = learned_key(1, "192.0.2.7".parse().unwrap());
        assert_eq!(
            (k.generation, k.family, k.addr[..4].to_vec(), k.addr[4..].iter().all(|&b| b == 0)),
            (1, FAMILY_V4, vec![192, 0, 2, 7], true)
        );
        let k = learned_key(0, "2001:db8::7".parse().unwrap());
        assert_eq!((k.generation, k.family, k.addr[0], k.addr[15]), (0, FAMILY_V6, 0x20, 7));
    }

    #[test]
    fn a_delete_of_an_absent_key_is_done_whichever_way_aya_reports_it() {
        let syscall = |kind: std::io::ErrorKind| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::Error::from(kind),
            })
        };
        assert!(is_not_found(&MapError::KeyNotFound));
        assert!(is_not_found(&syscall(std::io::ErrorKind::NotFound)));
        assert!(!is_not_found(&syscall(std::io::ErrorKind::PermissionDenied)));
        assert!(!is_not_found(&MapError::OutOfBounds { index: 1, max_entries: 1 }));
    }
}
