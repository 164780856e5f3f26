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
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, ProgramArray, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use log::{debug, info, warn};
use pcguard_common::{
    FAMILY_V4, FAMILY_V6, GEN_PREFIX_BITS, LearnedKey, NUM_GENERATIONS, PortEntry, PortSlot, Settings, names, peer_key_v4,
    peer_key_v6, ports_index, slots_index,
};
use serde::{Deserialize, Serialize};

use crate::{
    dns::LearnedWrite,
    policy::{CompiledPolicy, PeerPrefix},
};

/// The eBPF object built by `build.rs` (pcguard-ebpf, bpfel-unknown-none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pcguard-ebpf"));

/// Default directory for pinned maps (on bpffs).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/pcguard";
const BPFFS_MAGIC: i64 = 0xcafe_4a11;

/// How the XDP program is attached.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Native (driver) XDP.
    Driver,
    /// Generic (skb) XDP: works on every interface, slower.
    Skb,
}

/// What is attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedInterface {
    pub name: String,
    pub ifindex: u32,
    pub xdp_mode: XdpAttachMode,
    pub xdp_program_id: u32,
    pub tc_program_id: u32,
}

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

/// How long after a switch the generation packets used before it may be
/// rewritten. A packet keeps the generation it read from `ACTIVE` for the
/// rest of its run, which lasts microseconds (XDP and TC programs run to
/// completion in an RCU read-side section); two reloads are rarely closer
/// than this, and when they are, the second waits.
const SWITCH_GRACE: Duration = Duration::from_millis(10);

/// The loaded and attached data path. Dropping it detaches the programs
/// (aya links are owned here); [`Datapath::shutdown`] also removes the pins.
///
/// The policy tables hold two generations (see `pcguard_common`); packets
/// use the one `ACTIVE` names. [`Datapath::apply`] writes the other one and
/// then switches `ACTIVE` to it.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs_dir: Option<PathBuf>,
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
    /// Loads the object and pins its maps under `bpffs_dir` (replacing stale
    /// pins of a previous run). Nothing is attached yet and, until
    /// [`Datapath::apply`] first switches `ACTIVE`, the active generation
    /// (0) has `SETTINGS.ready == 0` so every packet passes.
    pub fn load(bpffs_dir: Option<&Path>) -> Result<Self> {
        bump_memlock_rlimit();
        let mut ebpf = EbpfLoader::new().load(OBJECT).context("loading the eBPF object")?;
        for name in [names::XDP_PROG, names::TC_PROG] {
            let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from object"))?;
            match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            }
            .with_context(|| format!("verifying program {name}"))?;
        }
        set_tc_rerun(&mut ebpf)?;
        let bpffs_dir = match bpffs_dir {
            Some(dir) => Some(pin_maps(&ebpf, dir)?),
            None => None,
        };
        Ok(Self {
            ebpf,
            bpffs_dir,
            interfaces: Vec::new(),
            applied: None,
            active: 0,
            switched_at: None,
            // Zeroed maps: an empty policy (no rules, no prefixes).
            held: std::array::from_fn(|_| vec![CompiledPolicy::default()]),
            learned: std::array::from_fn(|_| HashMap::new()),
        })
    }

    /// Attaches XDP (driver mode, falling back to skb mode) and the TC egress
    /// classifier to each interface. On error, what was attached so far stays
    /// attached until the `Datapath` is dropped.
    pub fn attach(&mut self, interfaces: &[String], force_skb: bool) -> Result<()> {
        for name in interfaces {
            let ifindex = ifindex(name)?;
            let xdp_mode = self.attach_xdp(name, force_skb)?;
            self.attach_tc(name)?;
            let xdp_program_id = self.program_id(names::XDP_PROG)?;
            let tc_program_id = self.program_id(names::TC_PROG)?;
            info!("attached to {name} (ifindex {ifindex}, XDP {xdp_mode:?} mode, TC egress)");
            self.interfaces.push(AttachedInterface { name: name.clone(), ifindex, xdp_mode, xdp_program_id, tc_program_id });
        }
        Ok(())
    }

    fn attach_xdp(&mut self, name: &str, force_skb: bool) -> Result<XdpAttachMode> {
        let prog: &mut Xdp = self.program(names::XDP_PROG)?.try_into()?;
        if !force_skb {
            match prog.attach(name, XdpMode::Driver) {
                Ok(_) => return Ok(XdpAttachMode::Driver),
                Err(e) => debug!("native XDP on {name} failed ({e}); using generic XDP"),
            }
        }
        prog.attach(name, XdpMode::Skb).with_context(|| format!("attaching XDP to {name}"))?;
        Ok(XdpAttachMode::Skb)
    }

    fn attach_tc(&mut self, name: &str) -> Result<()> {
        // Needed only for the netlink attach path of kernels < 6.6; harmless
        // (EEXIST) when the qdisc is already there.
        if let Err(e) = tc::qdisc_add_clsact(name) {
            debug!("clsact qdisc on {name}: {e}");
        }
        let prog: &mut SchedClassifier = self.program(names::TC_PROG)?.try_into()?;
        prog.attach(name, TcAttachType::Egress).with_context(|| format!("attaching TC egress to {name}"))?;
        Ok(())
    }

    fn program(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from object"))
    }

    fn program_id(&self, name: &str) -> Result<u32> {
        let prog = self.ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?;
        Ok(prog.info()?.id())
    }

    pub fn interfaces(&self) -> &[AttachedInterface] {
        &self.interfaces
    }

    pub fn bpffs_dir(&self) -> Option<&Path> {
        self.bpffs_dir.as_deref()
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
        let mut array: Array<&mut MapData, Settings> = Array::try_from(self.map_mut(names::SETTINGS)?)?;
        array.set(generation, settings, 0).with_context(|| format!("writing SETTINGS[{generation}]"))?;
        Ok(())
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from object"))
    }

    /// Takes a ring buffer (`EVENTS`, `DNS_MESSAGES`) to consume it (once).
    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(name).ok_or_else(|| anyhow!("{name} map missing or already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Detaches the programs and removes the pinned maps.
    pub fn shutdown(self) {
        let dir = self.bpffs_dir.clone();
        drop(self); // drops links: programs detach here
        if let Some(dir) = dir {
            remove_pins(&dir);
        }
    }
}

/// Points `TC_RERUN[0]` at the loaded TC program: a TC run that had to
/// pull headers into the skb's linear part runs again through it. Without
/// it such packets are judged malformed (fail closed).
pub fn set_tc_rerun(ebpf: &mut Ebpf) -> Result<()> {
    let prog: &SchedClassifier =
        ebpf.program(names::TC_PROG).ok_or_else(|| anyhow!("program {} missing", names::TC_PROG))?.try_into()?;
    let fd = prog.fd()?.try_clone()?;
    let mut rerun: ProgramArray<&mut MapData> =
        ProgramArray::try_from(ebpf.map_mut(names::TC_RERUN).ok_or_else(|| anyhow!("map TC_RERUN missing"))?)?;
    rerun.set(0, &fd, 0).context("setting TC_RERUN")?;
    Ok(())
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
    for p in set {
        trie.insert(&Key::new(GEN_PREFIX_BITS + p.prefix_len, key(p.addr)), p.mask, 0)
            .with_context(|| format!("inserting peer prefix /{}", p.prefix_len))?;
    }
    for &(addr, prefix_len) in remove {
        match trie.remove(&Key::new(GEN_PREFIX_BITS + prefix_len, key(addr))) {
            // Absent already (never written by a failed write): nothing to do.
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("removing peer prefix /{prefix_len}")),
        }
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

/// Makes sure `dir`'s parent is a bpffs mount (mounting one at /sys/fs/bpf
/// if nothing is mounted there), then pins every map under `dir`.
fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<PathBuf> {
    ensure_bpffs(dir)?;
    remove_pins(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, map) in ebpf.maps() {
        if [names::EVENTS, names::DNS_MESSAGES, names::TC_RERUN, names::SCRATCH].contains(&name) {
            continue; // consumed by this process only
        }
        map.pin(dir.join(name)).with_context(|| format!("pinning {name} under {}", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}

fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
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

/// True when `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path, st a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPFFS_MAGIC
}

fn ensure_bpffs(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent != Path::new("/sys/fs/bpf") {
        bail!("{} is not on a bpffs mount", dir.display());
    }
    warn!("no bpffs at /sys/fs/bpf; mounting one");
    let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?;
    if !status.success() || !is_bpffs(parent) {
        bail!("could not mount bpffs at /sys/fs/bpf");
    }
    Ok(())
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
    fn learned_keys_are_built_like_the_kernel_s() {
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
