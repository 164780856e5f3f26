//! Loads the eBPF object, attaches it to interfaces, pins the maps and writes
//! a [`CompiledPolicy`] into them: into the policy generation packets do not
//! use (only what differs from what it held), then switches packets to it.
//!
//! Everything kernel-facing lives here; the rest of the daemon sees
//! [`Datapath`] and the pinned maps (read by `counters`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::CString,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, RingBuf, lpm_trie::Key},
};
use log::{debug, info, warn};
use pcguard_common::{
    CtEntry, FAMILY_V4, FAMILY_V6, FlowKey, GEN_PREFIX_BITS, LearnedKey, NUM_GENERATIONS, PortEntry, PortSlot, Settings,
    names, peer_key_v4, peer_key_v6, ports_index, slots_index,
};
use crate::{
    dns::LearnedWrite,
    policy::{CompiledPolicy, PeerPrefix},
    seed::Seed,
};

/// The eBPF object built by `build.rs` (pcguard-ebpf, bpfel-unknown-none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pcguard-ebpf"));

/// Default directory for pinned maps (on bpffs).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/pcguard";
/// `bpf_map_update_elem` flag: fail with `EEXIST` if the key is present.
const BPF_NOEXIST: u64 = 1;

pub use crate::attach::{AttachedInterface, Hook, MapSizes, XdpAttachMode};
use crate::attach::Pins;

/// Counts of map entries written by one [`Datapath::apply`] (into the
/// generation it switched to).
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


/// What one [`Datapath::seed_conntrack`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedStats {
    /// Entries written.
    pub inserted: usize,
    /// Flows conntrack already held (kept as they are).
    pub existing: usize,
}

/// How long after a switch the generation packets used before it may be
/// rewritten. A packet keeps the generation it read from `ACTIVE` for the
/// rest of its run, which lasts microseconds (XDP and TC programs run to
/// completion in an RCU read-side section); two reloads are rarely closer
/// than this, and when they are, the second waits.
const SWITCH_GRACE: Duration = Duration::from_millis(10);

/// The loaded and attached data path. The programs stay attached and the
/// maps pinned when it is dropped (a crash or a stop leaves enforcement in
/// place); [`Datapath::shutdown`] with `detach` removes them.
///
/// The policy tables hold two generations (see `pcguard_common`); packets
/// use the one `ACTIVE` names. [`Datapath::apply`] writes the other one and
/// then switches `ACTIVE` to it.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    /// The maps were pinned by an earlier daemon.
    adopted: bool,
    interfaces: Vec<AttachedInterface>,
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

impl Datapath {
    /// Loads the object against the maps pinned under `bpffs_dir` (adopted
    /// from an earlier daemon when their layout is this build's), or new
    /// pinned maps. Nothing is attached by this call. With new maps, until
    /// [`Datapath::apply`] first switches `ACTIVE`, the active generation
    /// (0) has `SETTINGS.ready == 0`; with adopted ones, the running policy
    /// stays active and is read back, so the next apply writes only what
    /// differs.
    pub fn load(bpffs_dir: &Path, sizes: &MapSizes) -> Result<Self> {
        bump_memlock_rlimit();
        let crate::attach::Loaded { ebpf, pins, adopted } = crate::attach::load(OBJECT, bpffs_dir, sizes)?;
        let mut dp = Self {
            ebpf,
            pins,
            adopted,
            interfaces: Vec::new(),
            applied: None,
            active: 0,
            switched_at: None,
            // Zeroed maps: an empty policy (no rules, no prefixes).
            held: std::array::from_fn(|_| vec![CompiledPolicy::default()]),
            learned: std::array::from_fn(|_| HashMap::new()),
        };
        if adopted {
            let active: Array<&MapData, u32> = Array::try_from(dp.map(names::ACTIVE)?)?;
            dp.active = active.get(&0, 0)? & (NUM_GENERATIONS - 1);
            for generation in 0..NUM_GENERATIONS {
                dp.held[generation as usize] = vec![dp.read_generation(generation)?];
            }
            // The learned addresses of the earlier daemon: known, so that
            // the first apply removes them (this daemon's learner starts
            // empty; the next DNS answers teach it again).
            let learned: BpfHashMap<&MapData, LearnedKey, u32> = BpfHashMap::try_from(dp.map(names::LEARNED)?)?;
            let entries: Vec<(LearnedKey, u32)> = learned.iter().collect::<Result<_, _>>()?;
            for (key, bits) in entries {
                dp.learned[usize::from(key.generation & 1)].insert(learned_addr(&key), bits);
            }
            info!("adopted policy generation {} (read back from the maps)", dp.active);
        }
        Ok(dp)
    }

    /// Whether the maps (conntrack included) were adopted from an earlier
    /// daemon rather than created.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Attaches both programs to each interface (over the pinned links of
    /// an earlier daemon: an atomic replacement), then unpins map sets of
    /// other layouts, which only the replaced programs used.
    pub fn attach(&mut self, interfaces: &[String], hook: crate::config::IngressHook, force_skb: bool) -> Result<()> {
        self.interfaces = crate::attach::attach_all(&mut self.ebpf, &self.pins.links, interfaces, hook, force_skb)?;
        crate::attach::retire_other_map_sets(&self.pins)
    }

    pub fn interfaces(&self) -> &[AttachedInterface] {
        &self.interfaces
    }

    /// The pin directory (`--bpffs-dir`).
    pub fn bpffs_dir(&self) -> &Path {
        self.pins.dir.path()
    }

    /// The directory of the pinned map set in use.
    pub fn maps_dir(&self) -> &Path {
        self.pins.maps.path()
    }

    /// The policy currently in the maps.
    pub fn applied(&self) -> Option<&CompiledPolicy> {
        self.applied.as_ref()
    }

    /// Writes `policy` into the inactive generation, touching only entries
    /// that differ from what that generation held, with `learned` (the
    /// DNS-learned addresses and their classes under `policy`, see
    /// `Learner::planned`) in its part of `LEARNED`, then switches `ACTIVE`
    /// to it: a packet sees the old policy and its learned addresses or the
    /// new ones, never a mix. Then the old generation's learned entries are
    /// removed.
    ///
    /// If writing the inactive generation fails nothing is switched: the
    /// running policy was never touched. A learned address whose write
    /// fails is only missing from the new generation (fail closed: the
    /// learner writes it again); a stale learned entry that cannot be
    /// removed from it fails the apply. Flows already in conntrack are
    /// unaffected either way.
    pub fn apply(&mut self, policy: &CompiledPolicy, learned: &[(IpAddr, u32)]) -> Result<ApplyStats> {
        let generation = self.active ^ 1;
        // Packets that read the old `ACTIVE` before the last switch may
        // still be using this generation.
        self.wait_grace();
        let mut stats = ApplyStats::default();
        let g = generation as usize;
        if let Err(e) = self.write_generation(generation, policy, &mut stats) {
            // Some entries may hold the new policy's values now.
            if !self.held[g].contains(policy) {
                self.held[g].push(policy.clone());
            }
            return Err(e.context(format!(
                "writing the policy into the inactive generation {generation} failed; nothing was switched, the running policy is unchanged"
            )));
        }
        self.held[g] = vec![policy.clone()];
        self.write_learned_generation(generation, learned, &mut stats).with_context(|| {
            format!("generation {generation}: nothing was switched, the running policy is unchanged")
        })?;
        let mut active: Array<&mut MapData, u32> = Array::try_from(self.map_mut(names::ACTIVE)?)?;
        active
            .set(0, generation, 0)
            .with_context(|| format!("switching ACTIVE to generation {generation}; the running policy is unchanged"))?;
        let old = self.active;
        self.active = generation;
        self.switched_at = Some(Instant::now());
        debug!("policy generation {generation} active");
        self.applied = Some(policy.clone());
        self.wait_grace();
        self.clear_learned(old);
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
    fn write_learned_generation(&mut self, generation: u32, want: &[(IpAddr, u32)], stats: &mut ApplyStats) -> Result<()> {
        let (set, remove) = learned_writes(&self.learned[generation as usize], want);
        let remove: Vec<LearnedWrite> = remove.into_iter().map(|addr| LearnedWrite { addr, bits: None }).collect();
        if let Some((addr, e)) = self.learned_batch(generation, &remove)?.1.into_iter().next() {
            return Err(anyhow::Error::new(e).context(format!("removing the stale learned address {addr} from generation {generation}")));
        }
        let set: Vec<LearnedWrite> = set.into_iter().map(|(addr, bits)| LearnedWrite { addr, bits: Some(bits) }).collect();
        let (done, failed) = self.learned_batch(generation, &set)?;
        stats.learned = done.len();
        stats.learned_failed = failed.len();
        for (addr, e) in failed {
            warn!("writing learned address {addr} into generation {generation}: {e}");
        }
        Ok(())
    }

    /// Removes every learned entry of `generation` (not the active one);
    /// what fails stays listed and is removed by a later call.
    fn clear_learned(&mut self, generation: u32) {
        let all: Vec<LearnedWrite> =
            self.learned[generation as usize].keys().map(|&addr| LearnedWrite { addr, bits: None }).collect();
        match self.learned_batch(generation, &all) {
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
        generation: u32,
        writes: &[LearnedWrite],
    ) -> Result<(Vec<LearnedWrite>, Vec<(IpAddr, MapError)>)> {
        if writes.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // The map through its field: `self.learned` is borrowed beside it.
        let map = self.ebpf.map_mut(names::LEARNED).ok_or_else(|| anyhow!("map LEARNED missing from object"))?;
        let mut map: BpfHashMap<&mut MapData, LearnedKey, u32> = BpfHashMap::try_from(map)?;
        Ok(write_each(&mut self.learned[generation as usize], writes, |w| {
            let key = learned_key(generation, w.addr);
            match w.bits {
                Some(b) => map.insert(key, b, 0),
                None => map.remove(&key),
            }
        }))
    }

    /// Applies the learner's writes to the active generation, each on its
    /// own (one failure does not stop the rest), skipping those the map
    /// already holds; returns the writes the map now agrees with. Also
    /// retries removing what a reload left in the inactive generation.
    pub fn write_learned(&mut self, writes: &[LearnedWrite]) -> Vec<LearnedWrite> {
        let generation = self.active;
        let done = match self.learned_batch(generation, writes) {
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
            self.clear_learned(inactive);
        }
        done
    }

    /// Learned addresses the active generation holds (what the kernel
    /// allows through DNS learning).
    pub fn learned_len(&self) -> usize {
        self.learned[self.active as usize].len()
    }

    /// Writes the whole of `new` into `generation` (not the active one):
    /// slots, prefixes, ports, then its settings with `ready = 1`.
    fn write_generation(&mut self, generation: u32, new: &CompiledPolicy, stats: &mut ApplyStats) -> Result<()> {
        let g = generation as usize;
        let held: Vec<&CompiledPolicy> = self.held[g].iter().collect();
        let slots = slot_writes(&held.iter().map(|p| p.slots.as_slice()).collect::<Vec<_>>(), &new.slots);
        let (v4_set, v4_del) = prefix_writes(&held.iter().map(|p| p.peers_v4.as_slice()).collect::<Vec<_>>(), &new.peers_v4);
        let (v6_set, v6_del) = prefix_writes(&held.iter().map(|p| p.peers_v6.as_slice()).collect::<Vec<_>>(), &new.peers_v6);
        let ports = port_writes(&held.iter().map(|p| p.ports.as_slice()).collect::<Vec<_>>(), &new.ports);

        let mut array: Array<&mut MapData, PortSlot> = Array::try_from(self.map_mut(names::SLOTS)?)?;
        for &(i, slot) in &slots {
            array
                .set(slots_index(generation, i), slot, 0)
                .with_context(|| format!("writing SLOTS[{i}] of generation {generation}"))?;
        }
        stats.slots = slots.len();
        let mut trie: LpmTrie<&mut MapData, [u8; 5], u32> = LpmTrie::try_from(self.map_mut(names::PEERS_V4)?)?;
        write_prefixes(&mut trie, &v4_set, &v4_del, |a| peer_key_v4(generation, a))?;
        let mut trie: LpmTrie<&mut MapData, [u8; 17], u32> = LpmTrie::try_from(self.map_mut(names::PEERS_V6)?)?;
        write_prefixes(&mut trie, &v6_set, &v6_del, |a| peer_key_v6(generation, a))?;
        stats.peers = v4_set.len() + v4_del.len() + v6_set.len() + v6_del.len();
        let mut array: Array<&mut MapData, PortEntry> = Array::try_from(self.map_mut(names::PORTS)?)?;
        for &(idx, entry) in &ports {
            array
                .set(ports_index(generation, idx), entry, 0)
                .with_context(|| format!("writing PORTS[{idx}] of generation {generation}"))?;
        }
        stats.ports = ports.len();
        let mut settings: Settings = new.settings;
        settings.ready = 1;
        // The event budget is per CPU in the kernel (a bucket each).
        let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u32;
        settings.event_rate = new.settings.event_rate.div_ceil(cpus);
        settings.event_burst = new.settings.event_burst.div_ceil(cpus);
        let mut array: Array<&mut MapData, Settings> = Array::try_from(self.map_mut(names::SETTINGS)?)?;
        array.set(generation, settings, 0).with_context(|| format!("writing SETTINGS[{generation}]"))?;
        Ok(())
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from object"))
    }

    /// A `STAT_*` counter, summed over the CPUs.
    pub fn stat(&self, idx: u32) -> Result<u64> {
        let stats: aya::maps::PerCpuArray<&MapData, u64> = aya::maps::PerCpuArray::try_from(self.map(names::STATS)?)?;
        Ok(stats.get(&idx, 0)?.iter().sum())
    }

    /// Takes a ring buffer (`EVENTS`, `DNS_MESSAGES`) to consume it (once).
    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(name).ok_or_else(|| anyhow!("{name} map missing or already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Tracks connections that were open before the programs were
    /// attached (see `crate::seed`), as the programs would have tracked
    /// them: one `CONNTRACK` entry each, last seen now on the programs'
    /// clock. `BPF_NOEXIST`: an entry conntrack already holds (the
    /// programs', once attached) is left as it is.
    pub fn seed_conntrack(&mut self, seeds: &[Seed]) -> Result<SeedStats> {
        let now = ktime_coarse_ns();
        let mut map: BpfHashMap<&mut MapData, FlowKey, CtEntry> = BpfHashMap::try_from(self.map_mut(names::CONNTRACK)?)?;
        let mut stats = SeedStats::default();
        for seed in seeds {
            match map.insert(seed.flow_key(), seed.entry(now), BPF_NOEXIST) {
                Ok(()) => stats.inserted += 1,
                Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => stats.existing += 1,
                Err(e) => return Err(e).with_context(|| format!("seeding conntrack with {}", seed.conn)),
            }
        }
        Ok(stats)
    }

    /// Ends this process's hold on the data path. With `detach`, unpins
    /// the links (the programs detach) and the maps; without, everything
    /// stays pinned and attached: the last applied policy goes on being
    /// enforced until a daemon adopts it or `pcguard detach` removes it.
    pub fn shutdown(self, detach: bool) -> Result<()> {
        if detach {
            crate::attach::unpin_all(&self.pins.dir)?;
        }
        Ok(())
    }

    /// Switches `ACTIVE` back to the generation the last apply switched
    /// away from, which still holds the policy before it (nothing rewrites
    /// it until the next apply).
    pub fn switch_back(&mut self) -> Result<()> {
        let generation = self.active ^ 1;
        let mut active: Array<&mut MapData, u32> = Array::try_from(self.map_mut(names::ACTIVE)?)?;
        active.set(0, generation, 0).context("switching ACTIVE back")?;
        self.active = generation;
        self.switched_at = Some(Instant::now());
        self.applied = None;
        Ok(())
    }

    /// Reads back what generation `generation` of the policy tables holds:
    /// for a daemon that adopts maps another process wrote.
    fn read_generation(&self, generation: u32) -> Result<CompiledPolicy> {
        let settings: Array<&MapData, Settings> = Array::try_from(self.map(names::SETTINGS)?)?;
        let mut held = CompiledPolicy { settings: settings.get(&generation, 0)?, ..Default::default() };
        let slots: Array<&MapData, PortSlot> = Array::try_from(self.map(names::SLOTS)?)?;
        for i in 0..pcguard_common::MAX_SLOTS {
            held.slots.push(slots.get(&slots_index(generation, i), 0)?);
        }
        while held.slots.len() > 1 && held.slots.last() == Some(&PortSlot::default()) {
            held.slots.pop();
        }
        let ports: Array<&MapData, PortEntry> = Array::try_from(self.map(names::PORTS)?)?;
        for idx in 0..pcguard_common::PORT_TABLE_ENTRIES {
            let e = ports.get(&ports_index(generation, idx), 0)?;
            if e != PortEntry::default() {
                held.ports.push((idx, e));
            }
        }
        held.peers_v4 = read_prefixes::<5, 4>(self.map(names::PEERS_V4)?, generation)?;
        held.peers_v6 = read_prefixes::<17, 16>(self.map(names::PEERS_V6)?, generation)?;
        Ok(held)
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from object"))
    }

    /// The loaded object, for tests and the bench: they test-run the
    /// programs (`BPF_PROG_TEST_RUN`) on crafted packets and read or write
    /// maps the way no config can (pcguard-tests' kernel tests). The daemon
    /// never uses it; writes through it bypass what this `Datapath` knows
    /// the maps hold.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}


/// The address of a `LEARNED` key.
fn learned_addr(k: &LearnedKey) -> IpAddr {
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

/// The `LEARNED` writes that make a generation holding `held` hold
/// `want`: entries to insert or update, then addresses to remove.
fn learned_writes(held: &HashMap<IpAddr, u32>, want: &[(IpAddr, u32)]) -> (Vec<(IpAddr, u32)>, Vec<IpAddr>) {
    let wanted: HashMap<IpAddr, u32> = want.iter().copied().collect();
    let mut set: Vec<(IpAddr, u32)> = wanted.iter().filter(|(a, b)| held.get(a) != Some(b)).map(|(a, b)| (*a, *b)).collect();
    let mut remove: Vec<IpAddr> = held.keys().filter(|a| !wanted.contains_key(a)).copied().collect();
    set.sort();
    remove.sort();
    (set, remove)
}

/// The `SLOTS` writes (slot id, value) that make a generation whose every
/// slot holds its value in one of `held` hold `new`.
fn slot_writes(held: &[&[PortSlot]], new: &[PortSlot]) -> Vec<(u32, PortSlot)> {
    let len = held.iter().map(|h| h.len()).chain([new.len()]).max().unwrap_or(0);
    (0..len)
        .filter_map(|i| {
            let want = new.get(i).copied().unwrap_or_default();
            let stale = held.iter().any(|h| h.get(i).copied().unwrap_or_default() != want);
            stale.then_some((i as u32, want))
        })
        .collect()
}

/// The port-table writes (index within the generation, value) that make a
/// generation whose every entry holds its value in one of `held` hold
/// `new` (entries not listed are `PortEntry::default()`).
fn port_writes(held: &[&[(u32, PortEntry)]], new: &[(u32, PortEntry)]) -> Vec<(u32, PortEntry)> {
    let held: Vec<BTreeMap<u32, PortEntry>> = held.iter().map(|h| h.iter().copied().collect()).collect();
    let new: BTreeMap<u32, PortEntry> = new.iter().copied().collect();
    let indexes: BTreeSet<u32> = held.iter().flat_map(|h| h.keys().copied()).chain(new.keys().copied()).collect();
    indexes
        .into_iter()
        .filter_map(|idx| {
            let want = new.get(&idx).copied().unwrap_or_default();
            let stale = held.iter().any(|h| h.get(&idx).copied().unwrap_or_default() != want);
            stale.then_some((idx, want))
        })
        .collect()
}

/// Prefix writes that make a trie generation whose every prefix holds its
/// value (a mask, or absent) in one of `held` hold `new`: prefixes to
/// insert or update, then prefixes to remove.
#[allow(clippy::type_complexity)]
fn prefix_writes<const N: usize>(
    held: &[&[PeerPrefix<N>]],
    new: &[PeerPrefix<N>],
) -> (Vec<PeerPrefix<N>>, Vec<([u8; N], u32)>) {
    let by_key =
        |ps: &[PeerPrefix<N>]| -> BTreeMap<([u8; N], u32), u32> { ps.iter().map(|p| ((p.addr, p.prefix_len), p.mask)).collect() };
    let held: Vec<_> = held.iter().map(|h| by_key(h)).collect();
    let new = by_key(new);
    let keys: BTreeSet<([u8; N], u32)> = held.iter().flat_map(|h| h.keys().copied()).chain(new.keys().copied()).collect();
    let (mut set, mut remove) = (Vec::new(), Vec::new());
    for key @ (addr, prefix_len) in keys {
        let want = new.get(&key).copied();
        if held.iter().all(|h| h.get(&key).copied() == want) {
            continue;
        }
        match want {
            Some(mask) => set.push(PeerPrefix { addr, prefix_len, mask }),
            None => remove.push(key),
        }
    }
    (set, remove)
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

/// Applies `writes` to one generation of `LEARNED` one by one through `op`
/// (an insert, or a delete for `bits: None`), keeping `held` — what the
/// generation holds — in step with what succeeded. A write `held` already
/// has is not repeated; a delete of an absent key is done. A failure is
/// returned with its address and does not stop the writes after it.
#[allow(clippy::type_complexity)]
fn write_each(
    held: &mut HashMap<IpAddr, u32>,
    writes: &[LearnedWrite],
    mut op: impl FnMut(&LearnedWrite) -> Result<(), MapError>,
) -> (Vec<LearnedWrite>, Vec<(IpAddr, MapError)>) {
    let (mut done, mut failed) = (Vec::with_capacity(writes.len()), Vec::new());
    for w in writes {
        if held.get(&w.addr).copied() == w.bits {
            done.push(*w);
            continue;
        }
        match op(w) {
            Err(e) if !(w.bits.is_none() && is_not_found(&e)) => {
                failed.push((w.addr, e));
                continue;
            }
            _ => {}
        }
        match w.bits {
            Some(b) => held.insert(w.addr, b),
            None => held.remove(&w.addr),
        };
        done.push(*w);
    }
    (done, failed)
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

/// Interface index by name.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("interface {name} not found: {}", std::io::Error::last_os_error());
    }
    Ok(idx)
}

/// Interface name by index (for audit records), `None` if it is gone.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Now on the clock the programs age conntrack entries with
/// (`bpf_ktime_get_coarse_ns`: `CLOCK_MONOTONIC_COARSE`).
pub fn ktime_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer; the clock exists on every kernel that
    // runs the programs (2.6.32+).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn bump_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer. Kernels >= 5.11 account BPF
    // memory to the cgroup and ignore this limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("raising RLIMIT_MEMLOCK failed: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(mask: u32) -> PortSlot {
        PortSlot { allowed_mask: mask, ..Default::default() }
    }

    fn entry(slot: u16) -> PortEntry {
        PortEntry { slot, port_idx: slot }
    }

    fn prefix(a: u8, prefix_len: u32, mask: u32) -> PeerPrefix<4> {
        PeerPrefix { addr: [10, 0, 0, a], prefix_len, mask }
    }

    #[test]
    fn a_generation_gets_the_difference_from_what_it_held() {
        let old = [(1, entry(1)), (2, entry(2)), (3, entry(3))];
        let new = [(2, entry(2)), (3, entry(1)), (4, entry(4))];
        assert_eq!(port_writes(&[&old], &new), [(1, PortEntry::default()), (3, entry(1)), (4, entry(4))]);
        assert_eq!(port_writes(&[&new], &new), []);
        assert_eq!(slot_writes(&[&[slot(0), slot(1), slot(2)]], &[slot(0), slot(3)]), [(1, slot(3)), (2, slot(0))]);
        let (set, remove) = prefix_writes(&[&[prefix(1, 32, 1), prefix(2, 32, 2)]], &[prefix(2, 32, 3), prefix(0, 8, 4)]);
        assert_eq!(set, [prefix(0, 8, 4), prefix(2, 32, 3)]);
        assert_eq!(remove, [([10, 0, 0, 1], 32)]);
    }

    #[test]
    fn after_a_failed_write_every_entry_either_policy_left_is_rewritten() {
        // Each entry holds its value in `a` or in `b`: only entries where
        // both agree with the new policy are skipped.
        let a = [(1, entry(1)), (2, entry(2))];
        let b = [(1, entry(1)), (2, entry(3)), (5, entry(5))];
        let new = [(1, entry(1)), (2, entry(2))];
        assert_eq!(port_writes(&[&a, &b], &new), [(2, entry(2)), (5, PortEntry::default())]);
        assert_eq!(
            slot_writes(&[&[slot(0), slot(1)], &[slot(0), slot(2), slot(3)]], &[slot(0), slot(1)]),
            [(1, slot(1)), (2, slot(0))]
        );
        let (set, remove) = prefix_writes(&[&[prefix(1, 32, 1)], &[prefix(1, 32, 2), prefix(2, 32, 2)]], &[prefix(1, 32, 1)]);
        assert_eq!((set, remove), (vec![prefix(1, 32, 1)], vec![([10, 0, 0, 2], 32)]));
    }

    #[test]
    fn a_generation_s_learned_entries_get_the_difference_from_what_it_holds() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let held: HashMap<IpAddr, u32> = [(ip("192.0.2.1"), 1), (ip("192.0.2.2"), 1), (ip("2001:db8::1"), 2)].into();
        let want = [(ip("192.0.2.2"), 3), (ip("2001:db8::1"), 2), (ip("192.0.2.9"), 1)];
        let (set, remove) = learned_writes(&held, &want);
        assert_eq!(set, [(ip("192.0.2.2"), 3), (ip("192.0.2.9"), 1)]);
        assert_eq!(remove, [ip("192.0.2.1")]);
        assert_eq!(learned_writes(&held, &[]).1.len(), 3);
        assert_eq!(learned_writes(&HashMap::new(), &want).0.len(), 3);
    }

    #[test]
    fn learned_keys_are_built_like_the_kernel_s_and_read_back() {
        for addr in ["203.0.113.7", "2001:db8::7"] {
            let a: IpAddr = addr.parse().unwrap();
            assert_eq!(learned_addr(&learned_key(1, a)), a);
        }
        let k = learned_key(1, "192.0.2.7".parse().unwrap());
        assert_eq!((k.generation, k.family, k.addr[..4].to_vec(), k.addr[4..].iter().all(|&b| b == 0)), (1, FAMILY_V4, vec![192, 0, 2, 7], true));
        let k = learned_key(0, "2001:db8::7".parse().unwrap());
        assert_eq!((k.generation, k.family, k.addr[0], k.addr[15]), (0, FAMILY_V6, 0x20, 7));
    }

    #[test]
    fn one_failed_learned_write_never_stops_the_batch_and_absent_keys_count_as_deleted() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let enoent =
            || MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_delete_elem", io_error: std::io::ErrorKind::NotFound.into() });
        let eperm = || MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_update_elem", io_error: std::io::ErrorKind::PermissionDenied.into() });
        let mut held: HashMap<IpAddr, u32> =
            [(ip("192.0.2.1"), 1), (ip("192.0.2.2"), 1), (ip("192.0.2.3"), 1), (ip("192.0.2.6"), 1)].into();
        let writes = [
            LearnedWrite { addr: ip("192.0.2.1"), bits: None },     // the map lost it already: ENOENT
            LearnedWrite { addr: ip("192.0.2.2"), bits: None },     // fails
            LearnedWrite { addr: ip("192.0.2.3"), bits: Some(1) },  // held already: no call
            LearnedWrite { addr: ip("192.0.2.4"), bits: Some(2) },  // fails
            LearnedWrite { addr: ip("192.0.2.5"), bits: Some(4) },
            LearnedWrite { addr: ip("192.0.2.6"), bits: None },     // the map lost it: KeyNotFound
            LearnedWrite { addr: ip("192.0.2.8"), bits: None },     // not held: no call
        ];
        let mut calls = Vec::new();
        let (done, failed) = write_each(&mut held, &writes, |w| {
            calls.push(w.addr);
            match w.addr.to_string().as_str() {
                "192.0.2.1" => Err(enoent()),
                "192.0.2.2" | "192.0.2.4" => Err(eperm()),
                "192.0.2.6" => Err(MapError::KeyNotFound),
                _ => Ok(()),
            }
        });
        assert_eq!(calls, ["192.0.2.1", "192.0.2.2", "192.0.2.4", "192.0.2.5", "192.0.2.6"].map(ip));
        assert_eq!(done, [writes[0], writes[2], writes[4], writes[5], writes[6]]);
        assert_eq!(failed.iter().map(|(a, _)| *a).collect::<Vec<_>>(), [ip("192.0.2.2"), ip("192.0.2.4")]);
        // `held` follows the map: what failed is as it was.
        let want: HashMap<IpAddr, u32> = [(ip("192.0.2.2"), 1), (ip("192.0.2.3"), 1), (ip("192.0.2.5"), 4)].into();
        assert_eq!(held, want);
        // An insert that reports "not found" is a failure, not a success.
        let (done, failed) = write_each(&mut held, &[LearnedWrite { addr: ip("192.0.2.7"), bits: Some(1) }], |_| Err(enoent()));
        assert_eq!((done.len(), failed.len()), (0, 1));
    }

    #[test]
    fn a_delete_of_an_absent_key_is_done_whichever_way_aya_reports_it() {
        let syscall = |kind: std::io::ErrorKind| {
            MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_delete_elem", io_error: std::io::Error::from(kind) })
        };
        assert!(is_not_found(&MapError::KeyNotFound));
        assert!(is_not_found(&syscall(std::io::ErrorKind::NotFound)));
        assert!(!is_not_found(&syscall(std::io::ErrorKind::PermissionDenied)));
        assert!(!is_not_found(&MapError::OutOfBounds { index: 1, max_entries: 1 }));
    }
}
