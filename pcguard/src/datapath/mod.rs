//! Loads the eBPF object, attaches it to interfaces, pins the maps and writes
//! a [`CompiledPolicy`] into them: into the policy generation packets do not
//! use (only what differs from what it held), then switches packets to it.
//!
//! Everything kernel-facing lives here; the rest of the daemon sees
//! [`Datapath`] and the pinned maps (read by `counters`).
//!
//! * this file: [`Datapath`], the facade: load and attach (through
//!   `crate::attach`), then everything else through the modules below;
//! * `generation`: the two policy generations, their writer and switch;
//! * `diff`: what to write into a generation (pure);
//! * `maps`: typed map access, conntrack seeding, ring-buffer records.
//!
//! Below it: `attach` (programs, links), `pins` (bpffs), `sys` (libc).

mod diff;
mod generation;
mod maps;
pub mod trace;

use std::{net::IpAddr, path::Path};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use log::debug;

use self::generation::Generations;
pub use self::{
    generation::ApplyStats,
    maps::{SeedStats, is_not_found, learned_key, read_record},
};
pub use crate::attach::{AttachedInterface, Hook, MapSizes, XdpAttachMode};
use crate::{
    attach::{self, Loaded, Pins},
    config::IngressHook,
    dns::LearnedWrite,
    policy::CompiledPolicy,
    seed::Seed,
    sys,
};

/// The eBPF object built by `build.rs` (pcguard-ebpf, bpfel-unknown-none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pcguard-ebpf"));

/// The trace object (pcguard-ebpf with its `trace` feature), built only
/// with pcguard's `trace` feature.
#[cfg(feature = "trace")]
static TRACE_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pcguard-ebpf-trace")));
#[cfg(not(feature = "trace"))]
static TRACE_OBJECT: Option<&[u8]> = None;

/// Which build of the programs [`Datapath::load_object`] loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Object {
    /// The programs as deployed.
    #[default]
    Default,
    /// The same programs with a debug record of every packet's decision
    /// (aya-log; see [`trace`]): `pcguard run --trace-datapath`.
    Trace,
}

impl Object {
    /// The object's bytes, or why this binary has none.
    pub fn bytes(self) -> Result<&'static [u8]> {
        match self {
            Object::Default => Ok(OBJECT),
            Object::Trace => TRACE_OBJECT.ok_or_else(|| {
                anyhow::anyhow!(
                    "this pcguard was built without the trace object (--trace-datapath): build it with \
                     `cargo build --features trace`"
                )
            }),
        }
    }
}

/// Default directory for pinned maps (on bpffs).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/pcguard";

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
    /// What each policy generation holds, and which one is active.
    generations: Generations,
    /// Why the XDP program could not load here (then ingress is on TC).
    xdp_unavailable: Option<String>,
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
        Self::load_object(bpffs_dir, sizes, Object::Default)
    }

    /// [`Datapath::load`] with the programs of `object`: the maps and
    /// their pins are the same either way.
    pub fn load_object(bpffs_dir: &Path, sizes: &MapSizes, object: Object) -> Result<Self> {
        let object = object.bytes()?;
        if let Err(e) = sys::raise_memlock_rlimit() {
            debug!("raising RLIMIT_MEMLOCK failed: {e}");
        }
        let Loaded { ebpf, pins, adopted, xdp_unavailable } = attach::load(object, bpffs_dir, sizes)?;
        let generations = if adopted { Generations::adopt(&ebpf)? } else { Generations::new() };
        Ok(Self { ebpf, pins, adopted, interfaces: Vec::new(), generations, xdp_unavailable })
    }

    /// Whether the maps (conntrack included) were adopted from an earlier
    /// daemon rather than created.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Attaches both programs to each interface (over the pinned links of
    /// an earlier daemon: an atomic replacement), then unpins map sets of
    /// other layouts, which only the replaced programs used.
    pub fn attach(&mut self, interfaces: &[String], hook: IngressHook, force_skb: bool) -> Result<()> {
        self.interfaces = attach::attach_all(
            &mut self.ebpf,
            &self.pins.links,
            interfaces,
            hook,
            force_skb,
            self.xdp_unavailable.as_deref(),
        )?;
        attach::retire_other_map_sets(&self.pins)
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
        self.generations.applied()
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
        self.generations.apply(&mut self.ebpf, policy, learned)
    }

    /// Applies the learner's writes to the active generation, each on its
    /// own (one failure does not stop the rest), skipping those the map
    /// already holds; returns the writes the map now agrees with. Also
    /// retries removing what a reload left in the inactive generation.
    pub fn write_learned(&mut self, writes: &[LearnedWrite]) -> Vec<LearnedWrite> {
        self.generations.write_learned(&mut self.ebpf, writes)
    }

    /// Learned addresses the active generation holds (what the kernel
    /// allows through DNS learning).
    pub fn learned_len(&self) -> usize {
        self.generations.learned_len()
    }

    /// A `STAT_*` counter, summed over the CPUs.
    pub fn stat(&self, idx: u32) -> Result<u64> {
        maps::stat(&self.ebpf, idx)
    }

    /// Removes the audited flows idle past their timeout (under the
    /// running policy's timeouts) and returns them, for their `flow_end`
    /// records (`maps::expire_audited`). Nothing when no policy is applied.
    pub fn expire_audited(&mut self) -> Result<Vec<(pcguard_common::FlowKey, pcguard_common::CtEntry)>> {
        let Some(settings) = self.applied().map(|p| p.settings.clone()) else { return Ok(Vec::new()) };
        maps::expire_audited(&mut self.ebpf, &settings)
    }

    /// Takes a ring buffer (`EVENTS`, `DNS_MESSAGES`) to consume it (once).
    pub fn take_ring(&mut self, name: &str) -> Result<RingBuf<MapData>> {
        maps::take_ring(&mut self.ebpf, name)
    }

    /// Tracks connections that were open before the programs were
    /// attached (see `crate::seed`), as the programs would have tracked
    /// them: one `CONNTRACK` entry each, last seen now on the programs'
    /// clock. `BPF_NOEXIST`: an entry conntrack already holds (the
    /// programs', once attached) is left as it is.
    pub fn seed_conntrack(&mut self, seeds: &[Seed]) -> Result<SeedStats> {
        maps::seed_conntrack(&mut self.ebpf, seeds)
    }

    /// Ends this process's hold on the data path. With `detach`, unpins
    /// the links (the programs detach) and the maps; without, everything
    /// stays pinned and attached: the last applied policy goes on being
    /// enforced until a daemon adopts it or `pcguard detach` removes it.
    pub fn shutdown(self, detach: bool) -> Result<()> {
        if detach {
            attach::unpin_all(&self.pins.dir)?;
        }
        Ok(())
    }

    /// Switches `ACTIVE` back to the generation the last apply switched
    /// away from, which still holds the policy before it (nothing rewrites
    /// it until the next apply).
    pub fn switch_back(&mut self) -> Result<()> {
        self.generations.switch_back(&mut self.ebpf)
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
