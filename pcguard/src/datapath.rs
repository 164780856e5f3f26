//! Loads the eBPF object, attaches it to interfaces, pins the maps and writes
//! a [`CompiledPolicy`] into them (only what changed since the last write).
//!
//! Everything kernel-facing lives here; the rest of the daemon sees
//! [`Datapath`] and the pinned maps (read by `counters`).

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, Map, MapData, MapError, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use log::{debug, info, warn};
use pcguard_common::{PortEntry, PortSlot, Settings, names};
use serde::{Deserialize, Serialize};

use crate::{
    dns::TrieUpdate,
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

/// Counts of map entries written by one [`Datapath::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub ports: usize,
    pub slots: usize,
    pub peers: usize,
}

/// The loaded and attached data path. Dropping it detaches the programs
/// (aya links are owned here); [`Datapath::shutdown`] also removes the pins.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs_dir: Option<PathBuf>,
    interfaces: Vec<AttachedInterface>,
    applied: Option<CompiledPolicy>,
}

impl Datapath {
    /// Loads the object and pins its maps under `bpffs_dir` (replacing stale
    /// pins of a previous run). Nothing is attached yet and, until
    /// [`Datapath::apply`], `SETTINGS.ready == 0` so every packet passes.
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
        let bpffs_dir = match bpffs_dir {
            Some(dir) => Some(pin_maps(&ebpf, dir)?),
            None => None,
        };
        Ok(Self { ebpf, bpffs_dir, interfaces: Vec::new(), applied: None })
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

    /// Writes `policy` into the maps, touching only entries that differ
    /// from the policy written before.
    ///
    /// Order: slots, peers, then ports, then settings. New slot contents are
    /// written before any port points at them; ports that lose their rule
    /// are cleared last among the tables so that an allowed service is never
    /// transiently unknown. Flows already in conntrack are unaffected.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<ApplyStats> {
        let old = self.applied.take().unwrap_or_default();
        let mut stats = ApplyStats::default();
        match self.write_policy(&old, policy, &mut stats) {
            Ok(()) => {
                self.applied = Some(policy.clone());
                Ok(stats)
            }
            Err(e) => {
                // Every entry that differs between the two policies may have
                // been written: writing the diff back restores the old policy.
                let mut ignored = ApplyStats::default();
                match self.write_policy(policy, &old, &mut ignored) {
                    Ok(()) => {
                        self.applied = Some(old);
                        Err(e.context("writing the policy failed; the previous policy was restored"))
                    }
                    Err(e2) => Err(e.context(format!(
                        "writing the policy failed and restoring the previous one failed too ({e2:#}); the maps are inconsistent"
                    ))),
                }
            }
        }
    }

    fn write_policy(&mut self, old: &CompiledPolicy, new: &CompiledPolicy, stats: &mut ApplyStats) -> Result<()> {
        stats.slots = self.write_slots(&old.slots, &new.slots)?;
        stats.peers = write_lpm::<4>(self.map_mut(names::PEERS_V4)?, &old.peers_v4, &new.peers_v4)?;
        stats.peers += write_lpm::<16>(self.map_mut(names::PEERS_V6)?, &old.peers_v6, &new.peers_v6)?;
        stats.ports = self.write_ports(&old.ports, &new.ports)?;
        let mut settings: Settings = new.settings;
        settings.ready = 1;
        let mut array: Array<&mut MapData, Settings> = Array::try_from(self.map_mut(names::SETTINGS)?)?;
        array.set(0, settings, 0).context("writing SETTINGS")?;
        Ok(())
    }

    fn write_slots(&mut self, old: &[PortSlot], new: &[PortSlot]) -> Result<usize> {
        let mut array: Array<&mut MapData, PortSlot> = Array::try_from(self.map_mut(names::SLOTS)?)?;
        let len = old.len().max(new.len());
        let mut written = 0;
        for i in 0..len {
            let want = new.get(i).copied().unwrap_or_default();
            if old.get(i).copied().unwrap_or_default() != want {
                array.set(i as u32, want, 0).with_context(|| format!("writing SLOTS[{i}]"))?;
                written += 1;
            }
        }
        Ok(written)
    }

    fn write_ports(&mut self, old: &[(u32, PortEntry)], new: &[(u32, PortEntry)]) -> Result<usize> {
        let mut array: Array<&mut MapData, PortEntry> = Array::try_from(self.map_mut(names::PORTS)?)?;
        let old_map: HashMap<u32, PortEntry> = old.iter().copied().collect();
        let new_map: HashMap<u32, PortEntry> = new.iter().copied().collect();
        let mut written = 0;
        for (&idx, entry) in &new_map {
            if old_map.get(&idx) != Some(entry) {
                array.set(idx, entry, 0).with_context(|| format!("writing PORTS[{idx}]"))?;
                written += 1;
            }
        }
        for idx in old_map.keys().filter(|idx| !new_map.contains_key(idx)) {
            array.set(*idx, PortEntry::default(), 0).with_context(|| format!("clearing PORTS[{idx}]"))?;
            written += 1;
        }
        Ok(written)
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from object"))
    }

    /// Takes a ring buffer (`EVENTS`, `DNS_ANSWERS`) to consume it (once).
    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(name).ok_or_else(|| anyhow!("{name} map missing or already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Writes the host prefixes of addresses learned from DNS answers.
    pub fn write_learned(&mut self, updates: &[TrieUpdate]) -> Result<()> {
        for u in updates {
            match *u {
                TrieUpdate::Set { addr: IpAddr::V4(a), mask } => self.host_entry(names::PEERS_V4, 32, a.octets(), Some(mask))?,
                TrieUpdate::Set { addr: IpAddr::V6(a), mask } => self.host_entry(names::PEERS_V6, 128, a.octets(), Some(mask))?,
                TrieUpdate::Remove { addr: IpAddr::V4(a) } => self.host_entry(names::PEERS_V4, 32, a.octets(), None)?,
                TrieUpdate::Remove { addr: IpAddr::V6(a) } => self.host_entry(names::PEERS_V6, 128, a.octets(), None)?,
            }
        }
        Ok(())
    }

    fn host_entry<const N: usize>(&mut self, map: &str, len: u32, addr: [u8; N], mask: Option<u32>) -> Result<()>
    where
        [u8; N]: aya::Pod,
    {
        let mut trie: LpmTrie<&mut MapData, [u8; N], u32> = LpmTrie::try_from(self.map_mut(map)?)?;
        let key = Key::new(len, addr);
        match mask {
            Some(m) => trie.insert(&key, m, 0).with_context(|| format!("writing learned prefix in {map}")),
            None => match trie.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing learned prefix from {map}")),
            },
        }
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

fn write_lpm<const N: usize>(map: &mut Map, old: &[PeerPrefix<N>], new: &[PeerPrefix<N>]) -> Result<usize>
where
    [u8; N]: aya::Pod,
{
    let mut trie: LpmTrie<&mut MapData, [u8; N], u32> = LpmTrie::try_from(map)?;
    let new_keys: HashSet<([u8; N], u32)> = new.iter().map(|p| (p.addr, p.prefix_len)).collect();
    let old_by_key: HashMap<([u8; N], u32), u32> = old.iter().map(|p| ((p.addr, p.prefix_len), p.mask)).collect();
    let mut written = 0;
    // Insert/update first (a more specific prefix never disappears before
    // its replacement exists), then remove prefixes no longer configured.
    for p in new {
        if old_by_key.get(&(p.addr, p.prefix_len)) != Some(&p.mask) {
            trie.insert(&Key::new(p.prefix_len, p.addr), p.mask, 0)
                .with_context(|| format!("inserting peer prefix /{}", p.prefix_len))?;
            written += 1;
        }
    }
    for p in old.iter().filter(|p| !new_keys.contains(&(p.addr, p.prefix_len))) {
        match trie.remove(&Key::new(p.prefix_len, p.addr)) {
            // Absent already (a rollback of a partial write): nothing to do.
            Ok(()) | Err(MapError::KeyNotFound) => written += 1,
            Err(e) => return Err(e).with_context(|| format!("removing peer prefix /{}", p.prefix_len)),
        }
    }
    Ok(written)
}

/// Makes sure `dir`'s parent is a bpffs mount (mounting one at /sys/fs/bpf
/// if nothing is mounted there), then pins every map under `dir`.
fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<PathBuf> {
    ensure_bpffs(dir)?;
    remove_pins(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, map) in ebpf.maps() {
        if name == names::EVENTS || name == names::DNS_ANSWERS {
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
