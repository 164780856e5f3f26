//! The two generations of the policy tables (see `pcguard_common`) as
//! this process knows them: which one `ACTIVE` names, what each holds, and
//! the writer that puts a [`CompiledPolicy`] and the DNS-learned addresses
//! into the inactive one (only what differs, see `diff`), then switches
//! `ACTIVE` to it.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use log::{debug, info, warn};
use pcguard_common::{
    GEN_PREFIX_BITS, LearnedKey, NUM_GENERATIONS, PortEntry, PortSlot, Settings, names, peer_key_v4, peer_key_v6,
    ports_index, slots_index,
};

use super::{
    diff::{learned_writes, port_writes, prefix_writes, slot_writes, write_each},
    maps::{self, is_not_found, learned_addr, learned_key},
};
use crate::{
    dns::LearnedWrite,
    policy::{CompiledPolicy, PeerPrefix, PolicySettings},
};

/// Counts of map entries written by one
/// [`Datapath::apply`](super::Datapath::apply) (into the generation it
/// switched to).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub ports: usize,
    pub slots: usize,
    pub peers: usize,
    /// DNS-learned addresses written into the new generation.
    pub learned: usize,
    /// ... and those whose write failed (missing from it until the
    /// learner's next retry writes them into the active generation).
    pub learned_failed: usize,
}

/// How long after a switch the generation packets used before it may be
/// rewritten. A packet keeps the generation it read from `ACTIVE` for the
/// rest of its run, which lasts microseconds (XDP and TC programs run to
/// completion in an RCU read-side section); two reloads are rarely closer
/// than this, and when they are, the second waits.
const SWITCH_GRACE: Duration = Duration::from_millis(10);

/// The policy generations: the [`Datapath`](super::Datapath)'s record of
/// what the policy tables and `LEARNED` hold, and their writer.
pub(super) struct Generations {
    /// The policy of the active generation.
    applied: Option<CompiledPolicy>,
    /// The generation `ACTIVE` holds.
    active: u32,
    /// When `ACTIVE` last changed.
    switched_at: Option<Instant>,
    /// Per generation, what its static entries (`PORTS`, `SLOTS`, the
    /// prefixes of the policy) hold: one policy after a complete write;
    /// after a failed write each entry holds its value in one of these.
    held: [Vec<CompiledPolicy>; NUM_GENERATIONS as usize],
    /// Per generation, the DNS-learned addresses `LEARNED` holds and their
    /// class bits: only writes the kernel confirmed. An entry whose delete
    /// failed stays listed (and is deleted again later).
    learned: [HashMap<IpAddr, u32>; NUM_GENERATIONS as usize],
}

impl Generations {
    /// New maps: until [`Generations::apply`] first switches `ACTIVE`, the
    /// active generation (0) has `SETTINGS.ready == 0`.
    pub(super) fn new() -> Self {
        Self {
            applied: None,
            active: 0,
            switched_at: None,
            // Zeroed maps: an empty policy (no rules, no prefixes).
            held: std::array::from_fn(|_| vec![CompiledPolicy::default()]),
            learned: std::array::from_fn(|_| HashMap::new()),
        }
    }

    /// Maps adopted from an earlier daemon: the running policy stays
    /// active and is read back, so the next apply writes only what differs.
    pub(super) fn adopt(ebpf: &Ebpf) -> Result<Self> {
        let mut gens = Self::new();
        let active: Array<&MapData, u32> = Array::try_from(maps::map(ebpf, names::ACTIVE)?)?;
        gens.active = active.get(&0, 0)? & (NUM_GENERATIONS - 1);
        for generation in 0..NUM_GENERATIONS {
            gens.held[generation as usize] = vec![maps::read_generation(ebpf, generation)?];
        }
        // The learned addresses of the earlier daemon: known, so that
        // the first apply removes them (this daemon's learner starts
        // empty; the next DNS answers teach it again).
        for (key, bits) in maps::read_learned(ebpf)? {
            gens.learned[usize::from(key.generation & 1)].insert(learned_addr(&key), bits);
        }
        info!("adopted policy generation {} (read back from the maps)", gens.active);
        Ok(gens)
    }

    /// The policy of the active generation, if this process applied it.
    pub(super) fn applied(&self) -> Option<&CompiledPolicy> {
        self.applied.as_ref()
    }

    /// Writes `policy` and `learned` into the inactive generation (only
    /// what differs from what it held), switches `ACTIVE` to it, then
    /// removes the old generation's learned entries: see
    /// [`Datapath::apply`](super::Datapath::apply).
    pub(super) fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        policy: &CompiledPolicy,
        learned: &[(IpAddr, u32)],
    ) -> Result<ApplyStats> {
        let generation = self.active ^ 1;
        // Packets that read the old `ACTIVE` before the last switch may
        // still be using this generation.
        self.wait_grace();
        let mut stats = ApplyStats::default();
        let g = generation as usize;
        if let Err(e) = write_generation(ebpf, generation, &self.held[g], policy, &mut stats) {
            // Some entries may hold the new policy's values now.
            if !self.held[g].contains(policy) {
                self.held[g].push(policy.clone());
            }
            return Err(e.context(format!(
                "writing the policy into the inactive generation {generation} failed; nothing was switched, the running policy is unchanged"
            )));
        }
        self.held[g] = vec![policy.clone()];
        self.write_learned_generation(ebpf, generation, learned, &mut stats).with_context(|| {
            format!("generation {generation}: nothing was switched, the running policy is unchanged")
        })?;
        let mut active: Array<&mut MapData, u32> = Array::try_from(maps::map_mut(ebpf, names::ACTIVE)?)?;
        active
            .set(0, generation, 0)
            .with_context(|| format!("switching ACTIVE to generation {generation}; the running policy is unchanged"))?;
        let old = self.active;
        self.active = generation;
        self.switched_at = Some(Instant::now());
        debug!("policy generation {generation} active");
        self.applied = Some(policy.clone());
        self.wait_grace();
        self.clear_learned(ebpf, old);
        Ok(stats)
    }

    /// Sleeps until `SWITCH_GRACE` has passed since the last switch.
    fn wait_grace(&self) {
        if let Some(wait) = self.switched_at.and_then(|t| SWITCH_GRACE.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
    }

    /// Makes `generation`'s part of `LEARNED` hold exactly `want`:
    /// removes what it should not hold (an error if that fails: the
    /// generation must not allow more than the learner does), then writes
    /// the rest (failures only counted).
    fn write_learned_generation(
        &mut self,
        ebpf: &mut Ebpf,
        generation: u32,
        want: &[(IpAddr, u32)],
        stats: &mut ApplyStats,
    ) -> Result<()> {
        let (set, remove) = learned_writes(&self.learned[generation as usize], want);
        let remove: Vec<LearnedWrite> = remove.into_iter().map(|addr| LearnedWrite { addr, bits: None }).collect();
        if let Some((addr, e)) = self.learned_batch(ebpf, generation, &remove)?.1.into_iter().next() {
            return Err(anyhow::Error::new(e)
                .context(format!("removing the stale learned address {addr} from generation {generation}")));
        }
        let set: Vec<LearnedWrite> =
            set.into_iter().map(|(addr, bits)| LearnedWrite { addr, bits: Some(bits) }).collect();
        let (done, failed) = self.learned_batch(ebpf, generation, &set)?;
        stats.learned = done.len();
        stats.learned_failed = failed.len();
        for (addr, e) in failed {
            warn!("writing learned address {addr} into generation {generation}: {e}");
        }
        Ok(())
    }

    /// Removes every learned entry of `generation` (not the active one);
    /// what fails stays listed and is removed by a later call.
    fn clear_learned(&mut self, ebpf: &mut Ebpf, generation: u32) {
        let all: Vec<LearnedWrite> =
            self.learned[generation as usize].keys().map(|&addr| LearnedWrite { addr, bits: None }).collect();
        match self.learned_batch(ebpf, generation, &all) {
            Ok((_, failed)) if failed.is_empty() => {}
            Ok((_, failed)) => warn!(
                "{} learned addresses could not be removed from the inactive generation {generation} ({}); retrying later",
                failed.len(),
                failed[0].1
            ),
            Err(e) => warn!("{e:#}"),
        }
    }

    /// [`write_each`] on `generation`'s part of `LEARNED`.
    #[allow(clippy::type_complexity)]
    fn learned_batch(
        &mut self,
        ebpf: &mut Ebpf,
        generation: u32,
        writes: &[LearnedWrite],
    ) -> Result<(Vec<LearnedWrite>, Vec<(IpAddr, MapError)>)> {
        if writes.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut map: BpfHashMap<&mut MapData, LearnedKey, u32> =
            BpfHashMap::try_from(maps::map_mut(ebpf, names::LEARNED)?)?;
        Ok(write_each(&mut self.learned[generation as usize], writes, |w| {
            let key = learned_key(generation, w.addr);
            match w.bits {
                Some(b) => map.insert(key, b, 0),
                None => map.remove(&key),
            }
        }))
    }

    /// The learner's writes into the active generation: see
    /// [`Datapath::write_learned`](super::Datapath::write_learned).
    pub(super) fn write_learned(&mut self, ebpf: &mut Ebpf, writes: &[LearnedWrite]) -> Vec<LearnedWrite> {
        let generation = self.active;
        let done = match self.learned_batch(ebpf, generation, writes) {
            Ok((done, failed)) => {
                if let Some((addr, e)) = failed.first() {
                    warn!(
                        "{} of {} learned-address updates failed (first: {addr}: {e}); retrying at the next expiry tick",
                        failed.len(),
                        writes.len()
                    );
                }
                done
            }
            Err(e) => {
                warn!("{e:#}");
                Vec::new()
            }
        };
        let inactive = generation ^ 1;
        if !self.learned[inactive as usize].is_empty() && self.switched_at.is_none_or(|t| t.elapsed() >= SWITCH_GRACE) {
            self.clear_learned(ebpf, inactive);
        }
        done
    }

    /// Learned addresses the active generation holds.
    pub(super) fn learned_len(&self) -> usize {
        self.learned[self.active as usize].len()
    }

    /// Switches `ACTIVE` back to the generation the last apply switched
    /// away from, which still holds the policy before it (nothing rewrites
    /// it until the next apply).
    pub(super) fn switch_back(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let generation = self.active ^ 1;
        let mut active: Array<&mut MapData, u32> = Array::try_from(maps::map_mut(ebpf, names::ACTIVE)?)?;
        active.set(0, generation, 0).context("switching ACTIVE back")?;
        self.active = generation;
        self.switched_at = Some(Instant::now());
        self.applied = None;
        Ok(())
    }
}

/// Writes the whole of `new` into `generation` (not the active one):
/// slots, prefixes, ports, then its settings with `ready = 1`.
fn write_generation(
    ebpf: &mut Ebpf,
    generation: u32,
    held: &[CompiledPolicy],
    new: &CompiledPolicy,
    stats: &mut ApplyStats,
) -> Result<()> {
    let slots = slot_writes(&held.iter().map(|p| p.slots.as_slice()).collect::<Vec<_>>(), &new.slots);
    let (v4_set, v4_del) =
        prefix_writes(&held.iter().map(|p| p.peers_v4.as_slice()).collect::<Vec<_>>(), &new.peers_v4);
    let (v6_set, v6_del) =
        prefix_writes(&held.iter().map(|p| p.peers_v6.as_slice()).collect::<Vec<_>>(), &new.peers_v6);
    let ports = port_writes(&held.iter().map(|p| p.ports.as_slice()).collect::<Vec<_>>(), &new.ports);

    let mut array: Array<&mut MapData, PortSlot> = Array::try_from(maps::map_mut(ebpf, names::SLOTS)?)?;
    for &(i, slot) in &slots {
        array
            .set(slots_index(generation, i), slot, 0)
            .with_context(|| format!("writing SLOTS[{i}] of generation {generation}"))?;
    }
    stats.slots = slots.len();
    let mut trie: LpmTrie<&mut MapData, [u8; 5], u32> = LpmTrie::try_from(maps::map_mut(ebpf, names::PEERS_V4)?)?;
    write_prefixes(&mut trie, &v4_set, &v4_del, |a| peer_key_v4(generation, a))?;
    let mut trie: LpmTrie<&mut MapData, [u8; 17], u32> = LpmTrie::try_from(maps::map_mut(ebpf, names::PEERS_V6)?)?;
    write_prefixes(&mut trie, &v6_set, &v6_del, |a| peer_key_v6(generation, a))?;
    stats.peers = v4_set.len() + v4_del.len() + v6_set.len() + v6_del.len();
    let mut array: Array<&mut MapData, PortEntry> = Array::try_from(maps::map_mut(ebpf, names::PORTS)?)?;
    for &(idx, entry) in &ports {
        array
            .set(ports_index(generation, idx), entry, 0)
            .with_context(|| format!("writing PORTS[{idx}] of generation {generation}"))?;
    }
    stats.ports = ports.len();
    // The event budget is per CPU in the kernel (a bucket each).
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u32;
    let settings = Settings { audit_rules: new.audit_bits(), ..kernel_settings(&new.settings, cpus) };
    let mut array: Array<&mut MapData, Settings> = Array::try_from(maps::map_mut(ebpf, names::SETTINGS)?)?;
    array.set(generation, settings, 0).with_context(|| format!("writing SETTINGS[{generation}]"))?;
    Ok(())
}

/// The kernel's encoding of `s` for `SETTINGS` (marked ready): modes as
/// their codes, durations in nanoseconds, the event budget divided between
/// `cpus` (a bucket each).
fn kernel_settings(s: &PolicySettings, cpus: u32) -> Settings {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Settings {
        ingress_mode: s.ingress_mode as u8,
        egress_mode: s.egress_mode as u8,
        allow_icmp: u8::from(s.allow_icmp),
        ready: 1,
        no_initiate_mask: s.no_initiate_mask,
        resolver_mask: s.resolver_mask,
        learned_mask: s.learned_mask,
        tcp_timeout_ns: ns(s.tcp_timeout),
        tcp_closing_timeout_ns: ns(s.tcp_closing_timeout),
        udp_timeout_ns: ns(s.udp_timeout),
        report_interval_ns: ns(s.report_interval),
        event_rate: s.event_rate.div_ceil(cpus),
        event_burst: s.event_burst.div_ceil(cpus),
        audit_rules: [0; pcguard_common::AUDIT_RULE_WORDS],
    }
}

/// Applies [`prefix_writes`] to one generation of a trie; `key` makes the
/// generation's key data of an address.
fn write_prefixes<const N: usize, const K: usize>(
    trie: &mut LpmTrie<&mut MapData, [u8; K], u32>,
    set: &[PeerPrefix<N>],
    remove: &[([u8; N], u32)],
    key: impl Fn([u8; N]) -> [u8; K],
) -> Result<()>
where
    [u8; K]: aya::Pod,
{
    // Removals first: the trie holds both generations, and the running
    // one's prefixes plus this one's new ones always fit (each generation
    // is at most PEER_ENTRIES, the trie twice that); its old ones on top
    // might not.
    for &(addr, prefix_len) in remove {
        match trie.remove(&Key::new(GEN_PREFIX_BITS + prefix_len, key(addr))) {
            // Absent already (never written by a failed write): done.
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("removing peer prefix /{prefix_len}")),
        }
    }
    for p in set {
        trie.insert(&Key::new(GEN_PREFIX_BITS + p.prefix_len, key(p.addr)), p.mask, 0)
            .with_context(|| format!("inserting peer prefix /{}", p.prefix_len))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pcguard_common::{MODE_ENFORCE, MODE_MONITOR, Mode, Settings};

    use super::kernel_settings;
    use crate::policy::PolicySettings;

    #[test]
    fn settings_are_encoded_for_the_kernel_only_here() {
        let s = PolicySettings {
            ingress_mode: Mode::Monitor,
            egress_mode: Mode::Enforce,
            allow_icmp: true,
            no_initiate_mask: 0b11,
            resolver_mask: 0b100,
            learned_mask: 0b1000,
            tcp_timeout: Duration::from_secs(600),
            tcp_closing_timeout: Duration::from_millis(1500),
            udp_timeout: Duration::MAX,
            report_interval: Duration::from_secs(60),
            event_rate: 1000,
            event_burst: 999,
            audit_allowed: crate::config::AuditAllowed::All,
        };
        let k = kernel_settings(&s, 4);
        assert_eq!(
            k,
            Settings {
                ingress_mode: MODE_MONITOR,
                egress_mode: MODE_ENFORCE,
                allow_icmp: 1,
                ready: 1,
                no_initiate_mask: 0b11,
                resolver_mask: 0b100,
                learned_mask: 0b1000,
                tcp_timeout_ns: 600_000_000_000,
                tcp_closing_timeout_ns: 1_500_000_000,
                udp_timeout_ns: u64::MAX,
                report_interval_ns: 60_000_000_000,
                event_rate: 250,
                event_burst: 250,
                // Set from the rules by `write_generation`
                // (`CompiledPolicy::audit_bits`).
                audit_rules: [0; pcguard_common::AUDIT_RULE_WORDS],
            }
        );
        let k = kernel_settings(&PolicySettings::default(), 1);
        assert_eq!((k.ingress_mode, k.egress_mode, k.allow_icmp, k.ready), (MODE_ENFORCE, MODE_ENFORCE, 0, 1));
    }
}
