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
    CtEntry, FlowKey, GEN_PREFIX_BITS, NUM_GENERATIONS, PortEntry, PortSlot, Settings, names, peer_key_v4, peer_key_v6,
    ports_index, slots_index,
};
use serde::{Deserialize, Serialize};

use crate::{
    dns::TrieUpdate,
    policy::{CompiledPolicy, PeerPrefix},
    seed::Seed,
};

/// The eBPF object built by `build.rs` (pcguard-ebpf, bpfel-unknown-none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pcguard-ebpf"));

/// Default directory for pinned maps (on bpffs).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/pcguard";
const BPFFS_MAGIC: i64 = 0xcafe_4a11;
/// `bpf_map_update_elem` flag: fail with `EEXIST` if the key is present.
const BPF_NOEXIST: u64 = 1;

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
}

/// Map sizes chosen at load time (the config's `[conntrack]` sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapSizes {
    /// Established flows (`CONNTRACK`).
    pub conntrack: u32,
    /// New flows (`CT_NEW`).
    pub ct_new: u32,
}

impl MapSizes {
    pub fn of(cfg: &crate::config::SiteConfig) -> Self {
        Self { conntrack: cfg.conntrack.max_entries, ct_new: cfg.conntrack.new_entries }
    }
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
    /// DNS-learned host prefixes and the mask written for them in every
    /// generation, over whatever that generation's policy has there.
    learned: HashMap<IpAddr, u32>,
}

impl Datapath {
    /// Loads the object and pins its maps under `bpffs_dir` (replacing stale
    /// pins of a previous run). Nothing is attached yet and, until
    /// [`Datapath::apply`] first switches `ACTIVE`, the active generation
    /// (0) has `SETTINGS.ready == 0` so every packet passes.
    pub fn load(bpffs_dir: Option<&Path>, sizes: &MapSizes) -> Result<Self> {
        bump_memlock_rlimit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::CONNTRACK, sizes.conntrack)
            .map_max_entries(names::CT_NEW, sizes.ct_new)
            .load(OBJECT)
            .context("loading the eBPF object")?;
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
            learned: HashMap::new(),
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
    /// that differ from what that generation held, then switches `ACTIVE`
    /// to it: a packet sees the old policy or the new one, never a mix.
    ///
    /// If writing the inactive generation fails nothing is switched: the
    /// running policy was never touched. Flows already in conntrack are
    /// unaffected either way. DNS-learned host prefixes written with
    /// [`Datapath::write_learned`] are left in place in the new generation
    /// (the caller re-derives them for the new policy right after).
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<ApplyStats> {
        let generation = self.active ^ 1;
        // Packets that read the old `ACTIVE` before the last switch may
        // still be using this generation.
        if let Some(wait) = self.switched_at.and_then(|t| SWITCH_GRACE.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
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
        let mut active: Array<&mut MapData, u32> = Array::try_from(self.map_mut(names::ACTIVE)?)?;
        active
            .set(0, generation, 0)
            .with_context(|| format!("switching ACTIVE to generation {generation}; the running policy is unchanged"))?;
        self.active = generation;
        self.switched_at = Some(Instant::now());
        debug!("policy generation {generation} active");
        self.applied = Some(policy.clone());
        Ok(stats)
    }

    /// Writes the whole of `new` into `generation` (not the active one):
    /// slots, prefixes, ports, then its settings with `ready = 1`.
    fn write_generation(&mut self, generation: u32, new: &CompiledPolicy, stats: &mut ApplyStats) -> Result<()> {
        let g = generation as usize;
        let held: Vec<&CompiledPolicy> = self.held[g].iter().collect();
        let slots = slot_writes(&held.iter().map(|p| p.slots.as_slice()).collect::<Vec<_>>(), &new.slots);
        let (v4_set, v4_del) =
            prefix_writes(&held.iter().map(|p| p.peers_v4.as_slice()).collect::<Vec<_>>(), &new.peers_v4, |addr, len| {
                len == 32 && self.learned.contains_key(&IpAddr::from(*addr))
            });
        let (v6_set, v6_del) =
            prefix_writes(&held.iter().map(|p| p.peers_v6.as_slice()).collect::<Vec<_>>(), &new.peers_v6, |addr, len| {
                len == 128 && self.learned.contains_key(&IpAddr::from(*addr))
            });
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

    /// Takes a ring buffer (`EVENTS`, `DNS_MESSAGES`) to consume it (once).
    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(name).ok_or_else(|| anyhow!("{name} map missing or already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Writes the host prefixes of addresses learned from DNS answers, in
    /// every generation: in the active one they take effect now, in the
    /// other they are already there when a reload switches to it. Removing
    /// one puts back what that generation's own policy has at that prefix.
    pub fn write_learned(&mut self, updates: &[TrieUpdate]) -> Result<()> {
        for u in updates {
            let (addr, mask) = match *u {
                TrieUpdate::Set { addr, mask } => (addr, Some(mask)),
                TrieUpdate::Remove { addr } => (addr, None),
            };
            match mask {
                Some(m) => self.learned.insert(addr, m),
                None => self.learned.remove(&addr),
            };
            for generation in 0..NUM_GENERATIONS {
                // After a failed write any of the held policies is right
                // for the static entries: take the last.
                let policy = self.held[generation as usize].last();
                let want = mask.or_else(|| policy.and_then(|p| static_host_mask(p, addr)));
                match addr {
                    IpAddr::V4(a) => self.host_entry(names::PEERS_V4, 32, peer_key_v4(generation, a.octets()), want)?,
                    IpAddr::V6(a) => self.host_entry(names::PEERS_V6, 128, peer_key_v6(generation, a.octets()), want)?,
                }
            }
        }
        Ok(())
    }

    /// Writes (`Some`) or removes (`None`) the host prefix of `key` (a
    /// generation byte and an address of `len` bits).
    fn host_entry<const N: usize>(&mut self, map: &str, len: u32, key: [u8; N], mask: Option<u32>) -> Result<()>
    where
        [u8; N]: aya::Pod,
    {
        let mut trie: LpmTrie<&mut MapData, [u8; N], u32> = LpmTrie::try_from(self.map_mut(map)?)?;
        let key = Key::new(GEN_PREFIX_BITS + len, key);
        match mask {
            Some(m) => trie.insert(&key, m, 0).with_context(|| format!("writing learned prefix in {map}")),
            None => match trie.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing learned prefix from {map}")),
            },
        }
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

/// The static mask `policy` has at the host prefix of `addr` (/32, /128).
fn static_host_mask(policy: &CompiledPolicy, addr: IpAddr) -> Option<u32> {
    match addr {
        IpAddr::V4(a) => policy.peers_v4.iter().find(|p| p.prefix_len == 32 && p.addr == a.octets()).map(|p| p.mask),
        IpAddr::V6(a) => policy.peers_v6.iter().find(|p| p.prefix_len == 128 && p.addr == a.octets()).map(|p| p.mask),
    }
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
/// insert or update, then prefixes to remove. Prefixes for which `skip`
/// holds (DNS-learned host prefixes, written over the policy's) are left
/// as they are.
#[allow(clippy::type_complexity)]
fn prefix_writes<const N: usize>(
    held: &[&[PeerPrefix<N>]],
    new: &[PeerPrefix<N>],
    skip: impl Fn(&[u8; N], u32) -> bool,
) -> (Vec<PeerPrefix<N>>, Vec<([u8; N], u32)>) {
    let by_key =
        |ps: &[PeerPrefix<N>]| -> BTreeMap<([u8; N], u32), u32> { ps.iter().map(|p| ((p.addr, p.prefix_len), p.mask)).collect() };
    let held: Vec<_> = held.iter().map(|h| by_key(h)).collect();
    let new = by_key(new);
    let keys: BTreeSet<([u8; N], u32)> = held.iter().flat_map(|h| h.keys().copied()).chain(new.keys().copied()).collect();
    let (mut set, mut remove) = (Vec::new(), Vec::new());
    for key @ (addr, prefix_len) in keys {
        if skip(&addr, prefix_len) {
            continue;
        }
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
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing peer prefix /{prefix_len}")),
        }
    }
    Ok(())
}

/// Makes sure `dir`'s parent is a bpffs mount (mounting one at /sys/fs/bpf
/// if nothing is mounted there), then pins every map under `dir`.
fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<PathBuf> {
    ensure_bpffs(dir)?;
    remove_pins(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, map) in ebpf.maps() {
        // The contract's maps only: not the ring buffers (consumed by this
        // process), the program array and scratch word (tied to these
        // programs), nor sections LLVM made maps of (`.rodata`: bpffs names
        // cannot contain dots).
        if !names::PINNED.contains(&name) {
            continue;
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
        let (set, remove) =
            prefix_writes(&[&[prefix(1, 32, 1), prefix(2, 32, 2)]], &[prefix(2, 32, 3), prefix(0, 8, 4)], |_, _| false);
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
        let (set, remove) =
            prefix_writes(&[&[prefix(1, 32, 1)], &[prefix(1, 32, 2), prefix(2, 32, 2)]], &[prefix(1, 32, 1)], |_, _| false);
        assert_eq!((set, remove), (vec![prefix(1, 32, 1)], vec![([10, 0, 0, 2], 32)]));
    }

    #[test]
    fn learned_host_prefixes_are_left_to_the_learner() {
        // 10.0.0.1/32 is learned: whatever the policies say there, the
        // learned mask written over it stays.
        let learned = |a: &[u8; 4], len: u32| len == 32 && *a == [10, 0, 0, 1];
        let (set, remove) = prefix_writes(&[&[prefix(1, 32, 1), prefix(2, 32, 2)]], &[prefix(1, 32, 5)], learned);
        assert_eq!((set, remove), (vec![], vec![([10, 0, 0, 2], 32)]));
        let (set, remove) = prefix_writes(&[&[prefix(1, 32, 1)]], &[], learned);
        assert_eq!((set, remove), (vec![], vec![]));
    }

    #[test]
    fn removing_a_learned_address_restores_the_generation_s_own_host_prefix() {
        let policy = CompiledPolicy { peers_v4: vec![prefix(0, 24, 1), prefix(7, 32, 3)], ..Default::default() };
        assert_eq!(static_host_mask(&policy, "10.0.0.7".parse().unwrap()), Some(3));
        assert_eq!(static_host_mask(&policy, "10.0.0.0".parse().unwrap()), None);
        assert_eq!(static_host_mask(&policy, "::1".parse().unwrap()), None);
    }
}
