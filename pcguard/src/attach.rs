//! Loading the programs against pinned maps, and attaching them through
//! pinned links (docs/datapath.md, "Pins"): what makes enforcement outlive
//! the daemon.
//!
//! * Load: the contract's maps are opened from the pin directory when a
//!   set of this contract version and these sizes is pinned there (adopted:
//!   conntrack, counters, the running policy and the DNS state carry over),
//!   else created and pinned.
//! * Attach: an interface whose XDP or TC link is pinned gets the new
//!   program by an atomic link update (`bpf_link_update`): packets go from
//!   the old program to the new one with nothing in between. Otherwise the
//!   program is attached and the link pinned.
//! * After the programs are on the links, map sets of other layouts (an
//!   older version) are unpinned: only the old programs used them.
//! * Detach (`pcguard detach`, or a daemon run with `--detach-on-exit`):
//!   unpinning the links detaches the programs.
//!
//! Below `datapath` (which drives it): imports `pins` and `sys`, never
//! `datapath`.

use std::{collections::BTreeSet, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, ProgramArray},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
        xdp::XdpLink,
    },
};
use log::{debug, info, warn};
use pcguard_common::{ABI_VERSION, names};
use serde::{Deserialize, Serialize};

use crate::{
    config::IngressHook,
    pins::{LINKS_DIR, PinDir, ensure_bpffs, maps_dir_name},
};

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

    /// `max_entries` the map `name` must have.
    fn max_entries(&self, name: &str) -> Option<u32> {
        match name {
            names::CONNTRACK => Some(self.conntrack),
            names::CT_NEW => Some(self.ct_new),
            _ => pcguard_common::map_layout(name).map(|l| l.max_entries),
        }
    }
}

/// How the XDP program is attached.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Native (driver) XDP.
    Driver,
    /// Generic (skb) XDP: works on every interface, slower.
    Skb,
    /// Taken over from a pinned link of an earlier daemon, in the mode it
    /// was attached with.
    Adopted,
}

/// Where the ingress pipeline runs on one interface.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// What is attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedInterface {
    pub name: String,
    pub ifindex: u32,
    /// The hook of the ingress pipeline, and why it was chosen.
    pub ingress_hook: Hook,
    pub hook_reason: String,
    /// With `ingress_hook = xdp`.
    pub xdp_mode: Option<XdpAttachMode>,
    pub ingress_program_id: u32,
    pub egress_program_id: u32,
}

/// The daemon's pin directory, locked, with its map set and links.
pub struct Pins {
    /// The directory given with `--bpffs-dir` (locked while this lives).
    pub dir: PinDir,
    /// The map set of this contract version and these sizes.
    pub maps: PinDir,
    pub links: PinDir,
}

/// The loaded programs and their maps.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub pins: Pins,
    /// The maps were pinned by an earlier daemon (and are in use by the
    /// programs on its links, if they are still attached).
    pub adopted: bool,
    /// Why the XDP ingress program could not load on this kernel (a helper
    /// it lacks): ingress then runs on the TC hook.
    pub xdp_unavailable: Option<String>,
}

/// A load error with what this kernel lacks in front, when the kernel's
/// answer names it (`support::explain_load_error`).
fn explained(e: anyhow::Error) -> anyhow::Error {
    match crate::support::explain_load_error(&format!("{e:#}")).or_else(crate::support::old_kernel_note) {
        Some(why) => e.context(format!("{why}; pcguard needs the kernel features listed in docs/support.md")),
        None => e,
    }
}

/// Opens and locks the pin directory, then loads the object against the
/// map set pinned there (adopted), or a new one it pins.
pub fn load(object: &[u8], bpffs_dir: &Path, sizes: &MapSizes) -> Result<Loaded> {
    ensure_bpffs(bpffs_dir)?;
    let dir = PinDir::open(bpffs_dir)?;
    dir.lock()?;
    let set = maps_dir_name(ABI_VERSION, sizes.conntrack, sizes.ct_new);
    let adopted = match dir.existing_subdir(&set)? {
        Some(maps) if names::PINNED.iter().all(|m| maps.contains(m)) => true,
        Some(_) => {
            warn!("{}: incomplete map set {set} (an earlier start failed): replacing it", dir.path().display());
            dir.remove_subdir(&set)?;
            false
        }
        None => false,
    };
    let maps = dir.subdir(&set)?;
    let links = dir.subdir(LINKS_DIR)?;
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(names::CONNTRACK, sizes.conntrack).map_max_entries(names::CT_NEW, sizes.ct_new);
    let paths: Vec<(&str, std::path::PathBuf)> = names::PINNED.iter().map(|&m| (m, maps.pin_path(m))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(object).map_err(|e| explained(anyhow!(e).context("loading the eBPF object")))?;
    check_layouts(&ebpf, sizes)?;
    let mut xdp_unavailable = None;
    for name in [names::TC_PROG, names::TC_INGRESS_PROG, names::XDP_PROG] {
        let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from object"))?;
        let result = match prog {
            aya::programs::Program::Xdp(p) => p.load(),
            aya::programs::Program::SchedClassifier(p) => p.load(),
            _ => bail!("program {name} has an unexpected type"),
        };
        let Err(e) = result else { continue };
        let text = format!("{e:#}");
        // The XDP program alone needs bpf_xdp_load_bytes (Linux 5.18): on
        // a kernel without it the TC ingress program does its work
        // (docs/support.md).
        if name == names::XDP_PROG
            && let Some(why) =
                crate::support::refused_helper(&text).and_then(|_| crate::support::explain_load_error(&text))
        {
            warn!("{why}: the XDP ingress program cannot load; ingress runs on the TC hook");
            xdp_unavailable = Some(why);
            continue;
        }
        return Err(explained(anyhow!(e).context(format!("verifying program {name}"))));
    }
    set_tc_rerun(&mut ebpf)?;
    if adopted {
        info!("adopted the maps pinned in {} (conntrack, counters and policy carry over)", maps.path().display());
    } else {
        info!("pinned new maps in {}", maps.path().display());
    }
    Ok(Loaded { ebpf, pins: Pins { dir, maps, links }, adopted, xdp_unavailable })
}

/// Every pinned map has the layout this build expects: the set's name says
/// so, but a map is used by the programs only after this check.
fn check_layouts(ebpf: &Ebpf, sizes: &MapSizes) -> Result<()> {
    for name in names::PINNED {
        let map = ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from object"))?;
        let info = map_info(map)?;
        let want = pcguard_common::map_layout(name).ok_or_else(|| anyhow!("no layout for {name}"))?;
        let got = (info.key_size(), info.value_size(), info.max_entries());
        let expected = (want.key_size, want.value_size, sizes.max_entries(name).unwrap_or(want.max_entries));
        if got != expected {
            bail!(
                "pinned map {name} has key/value size and capacity {got:?}, this build expects {expected:?}: \
                 the pins are not of this version (run `pcguard detach` to remove them)"
            );
        }
    }
    Ok(())
}

fn map_info(map: &Map) -> Result<aya::maps::MapInfo> {
    let data: &MapData = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::LpmTrie(d)
        | Map::PerCpuArray(d)
        | Map::RingBuf(d)
        | Map::ProgramArray(d) => d,
        _ => bail!("unexpected map type"),
    };
    Ok(data.info()?)
}

/// Points each TC program's `TC_RERUN` entry at it: a TC run that had to
/// pull headers into the skb's linear part runs again through it. Without
/// it such packets are judged malformed (fail closed).
pub fn set_tc_rerun(ebpf: &mut Ebpf) -> Result<()> {
    for (name, index) in
        [(names::TC_PROG, pcguard_common::TC_RERUN_EGRESS), (names::TC_INGRESS_PROG, pcguard_common::TC_RERUN_INGRESS)]
    {
        let prog: &SchedClassifier = ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?;
        let fd = prog.fd()?.try_clone()?;
        let mut rerun: ProgramArray<&mut MapData> =
            ProgramArray::try_from(ebpf.map_mut(names::TC_RERUN).ok_or_else(|| anyhow!("map TC_RERUN missing"))?)?;
        rerun.set(index, &fd, 0).with_context(|| format!("setting TC_RERUN[{index}]"))?;
    }
    Ok(())
}

/// An interface name as part of a pin name: bpffs refuses names with a
/// dot (`eth0.100` is a valid interface name), so dots (and the escape
/// character) are percent-encoded.
fn pin_safe(ifname: &str) -> String {
    ifname.replace('%', "%25").replace('.', "%2e")
}

fn xdp_pin(ifname: &str) -> String {
    format!("xdp-{}", pin_safe(ifname))
}

fn tc_pin(ifname: &str) -> String {
    format!("tc-{}", pin_safe(ifname))
}

fn tc_ingress_pin(ifname: &str) -> String {
    format!("tci-{}", pin_safe(ifname))
}

/// Attaches the ingress pipeline (XDP or TC, see [`choose_hook`]) and the
/// egress program to every interface: over a pinned link when there is one
/// (an atomic replacement), else freshly, pinning the link. Links pinned
/// for what is no longer wanted (an interface gone from the config, the
/// other ingress hook) are unpinned after everything wanted is attached,
/// so an interface is never without its ingress pipeline.
pub fn attach_all(
    ebpf: &mut Ebpf,
    links: &PinDir,
    interfaces: &[String],
    hook: IngressHook,
    force_skb: bool,
    xdp_unavailable: Option<&str>,
) -> Result<Vec<AttachedInterface>> {
    if let Some(why) = xdp_unavailable
        && (hook == IngressHook::Xdp || force_skb)
    {
        bail!(
            "{why}: XDP ingress is not possible on this kernel; set ingress_hook = \"auto\" or \"tc\" (and drop --xdp-skb)"
        );
    }
    let mut attached = Vec::new();
    let mut wanted = BTreeSet::new();
    for name in interfaces {
        let ifindex = wait_for_interface(name, INTERFACE_WAIT)?;
        let (mut ingress, mut reason) = match xdp_unavailable {
            Some(why) => (Hook::Tc, why.to_string()),
            None => choose_hook(name, hook, force_skb),
        };
        let mut xdp_mode = None;
        if ingress == Hook::Xdp {
            match attach_xdp(ebpf, links, name, force_skb, hook == IngressHook::Xdp) {
                Ok(mode) => xdp_mode = Some(mode),
                Err(e) if hook == IngressHook::Auto => {
                    warn!("native XDP on {name} failed ({e:#}): using the TC ingress hook");
                    (ingress, reason) = (Hook::Tc, format!("native XDP failed: {e}"));
                }
                Err(e) => return Err(e),
            }
        }
        if ingress == Hook::Tc {
            attach_tc(ebpf, links, name, TcAttachType::Ingress, names::TC_INGRESS_PROG, &tc_ingress_pin(name))?;
        }
        attach_tc(ebpf, links, name, TcAttachType::Egress, names::TC_PROG, &tc_pin(name))?;
        wanted.insert(tc_pin(name));
        wanted.insert(match ingress {
            Hook::Xdp => xdp_pin(name),
            Hook::Tc => tc_ingress_pin(name),
        });
        let ingress_prog = match ingress {
            Hook::Xdp => names::XDP_PROG,
            Hook::Tc => names::TC_INGRESS_PROG,
        };
        let ingress_program_id = program_id(ebpf, ingress_prog)?;
        let egress_program_id = program_id(ebpf, names::TC_PROG)?;
        info!("attached to {name} (ifindex {ifindex}): ingress on {} ({reason}), egress on TC", ingress.as_str());
        attached.push(AttachedInterface {
            name: name.clone(),
            ifindex,
            ingress_hook: ingress,
            hook_reason: reason,
            xdp_mode,
            ingress_program_id,
            egress_program_id,
        });
    }
    for stale in links.entries()?.into_iter().filter(|e| !wanted.contains(e)) {
        info!("unpinning link {stale}: no longer wanted (its program detaches)");
        links.remove(&stale)?;
    }
    Ok(attached)
}

/// Drivers whose native XDP costs more than it saves, and why.
const TC_DRIVERS: [(&str, &str); 2] = [
    ("veth", "veth: native XDP segments GSO traffic and queues frames in a 256-entry ring of its own"),
    ("virtio_net", "virtio-net: native XDP needs the guest's receive offloads (LRO) off"),
];

/// The ingress hook for interface `name`: the configured one, or (auto)
/// by driver. `force_skb` (`--xdp-skb`) asks for generic XDP.
fn choose_hook(name: &str, hook: IngressHook, force_skb: bool) -> (Hook, String) {
    match hook {
        IngressHook::Tc => (Hook::Tc, "configured".into()),
        IngressHook::Xdp => (Hook::Xdp, "configured".into()),
        IngressHook::Auto if force_skb => (Hook::Xdp, "--xdp-skb".into()),
        IngressHook::Auto => {
            let driver = crate::sys::driver_name(name).unwrap_or_default();
            match TC_DRIVERS.iter().find(|(d, _)| *d == driver) {
                Some((_, why)) => (Hook::Tc, (*why).into()),
                None => (Hook::Xdp, format!("driver {}", if driver.is_empty() { "unknown" } else { &driver })),
            }
        }
    }
}

/// How long a daemon started early at boot waits for an interface udev has
/// not created yet.
const INTERFACE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The interface's index, waiting up to `wait` for it to appear.
fn wait_for_interface(name: &str, wait: std::time::Duration) -> Result<u32> {
    let deadline = std::time::Instant::now() + wait;
    let mut warned = false;
    loop {
        match crate::sys::ifindex(name) {
            Ok(i) => return Ok(i),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => {
                if !warned {
                    warn!("interface {name} does not exist (yet): waiting up to {} s for it", wait.as_secs());
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
}

fn program_id(ebpf: &Ebpf, name: &str) -> Result<u32> {
    let prog = ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing"))?;
    Ok(prog.info()?.id())
}

/// The pinned link `pin`, if there is one.
fn pinned_link(links: &PinDir, pin: &str) -> Result<Option<FdLink>> {
    if !links.contains(pin) {
        return Ok(None);
    }
    let link = PinnedLink::from_pin(links.pin_path(pin))
        .with_context(|| format!("opening pinned link {}", links.path().join(pin).display()))?;
    Ok(Some(FdLink::from(link)))
}

/// Attaches XDP: over a pinned link, or native; generic (skb) mode when
/// `force_skb`, and (with `allow_skb`) when native fails — with a warning.
fn attach_xdp(
    ebpf: &mut Ebpf,
    links: &PinDir,
    ifname: &str,
    force_skb: bool,
    allow_skb: bool,
) -> Result<XdpAttachMode> {
    let pin = xdp_pin(ifname);
    let prog: &mut Xdp = program_mut(ebpf, names::XDP_PROG)?.try_into()?;
    if let Some(link) = pinned_link(links, &pin)? {
        let link = XdpLink::try_from(link).context("pinned XDP link")?;
        let id = prog.attach_to_link(link).with_context(|| format!("replacing the XDP program on {ifname}"))?;
        // The pin keeps the link; the program stays attached when this
        // process drops its handle.
        let _ = prog.take_link(id)?;
        return Ok(XdpAttachMode::Adopted);
    }
    let (id, mode) = if force_skb {
        (prog.attach(ifname, XdpMode::Skb).with_context(|| format!("attaching XDP to {ifname}"))?, XdpAttachMode::Skb)
    } else {
        match prog.attach(ifname, XdpMode::Driver) {
            Ok(id) => (id, XdpAttachMode::Driver),
            Err(e) if allow_skb => {
                warn!("native XDP on {ifname} failed ({e}); attaching generic (skb) XDP, which is slower");
                (
                    prog.attach(ifname, XdpMode::Skb).with_context(|| format!("attaching XDP to {ifname}"))?,
                    XdpAttachMode::Skb,
                )
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("native XDP on {ifname}"))),
        }
    };
    let link = prog.take_link(id)?;
    let fd = FdLink::try_from(link).context("XDP attached without a bpf link (kernel < 5.9?): cannot pin it")?;
    fd.pin(links.pin_path(&pin)).with_context(|| format!("pinning the XDP link of {ifname}"))?;
    Ok(mode)
}

/// Attaches the TC program `prog` at `at` (egress, or ingress): over the
/// pinned link `pin`, or freshly (tcx), pinning the link.
fn attach_tc(ebpf: &mut Ebpf, links: &PinDir, ifname: &str, at: TcAttachType, prog: &str, pin: &str) -> Result<()> {
    let prog: &mut SchedClassifier = program_mut(ebpf, prog)?.try_into()?;
    if let Some(link) = pinned_link(links, pin)? {
        let link = tc::SchedClassifierLink::try_from(link).context("pinned TC link")?;
        let id = prog.attach_to_link(link).with_context(|| format!("replacing the TC program on {ifname}"))?;
        let _ = prog.take_link(id)?;
        return Ok(());
    }
    // Needed only for the netlink attach path of kernels < 6.6; harmless
    // (EEXIST) when the qdisc is already there.
    if let Err(e) = tc::qdisc_add_clsact(ifname) {
        debug!("clsact qdisc on {ifname}: {e}");
    }
    let id = prog.attach(ifname, at).with_context(|| format!("attaching TC {at:?} to {ifname}"))?;
    let link = prog.take_link(id)?;
    match FdLink::try_from(link) {
        Ok(fd) => {
            fd.pin(links.pin_path(pin)).with_context(|| format!("pinning the TC link of {ifname}"))?;
        }
        Err(e) => {
            // A netlink filter (no tcx): the kernel keeps it attached after
            // this process exits, but it cannot be pinned or replaced
            // atomically by the next daemon.
            warn!("TC {at:?} on {ifname} is a netlink filter (kernel without tcx): not pinned ({e})");
        }
    }
    Ok(())
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from object"))
}

/// Unpins the map sets other than this one: once the links carry the new
/// programs, nothing uses them.
pub fn retire_other_map_sets(pins: &Pins) -> Result<()> {
    let this = pins.maps.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for name in pins.dir.entries()? {
        if name.starts_with("maps-") && name != this {
            info!("unpinning the map set {name} of an earlier layout");
            pins.dir.remove_subdir(&name)?;
        }
    }
    Ok(())
}

/// Removes every pin in `pins`: links (their programs detach), map sets.
pub fn unpin_all(dir: &PinDir) -> Result<()> {
    for name in dir.entries()? {
        dir.remove_subdir(&name)?;
    }
    Ok(())
}

/// `pcguard detach`: removes the programs and pins under `bpffs_dir`.
/// Refuses while a daemon holds the directory: stop it first.
pub fn detach_dir(bpffs_dir: &Path) -> Result<bool> {
    if !bpffs_dir.exists() {
        return Ok(false);
    }
    let dir = PinDir::open(bpffs_dir)?;
    if dir.is_locked_by_other() {
        bail!(
            "a pcguard daemon is running on {}: stop it first (systemctl stop pcguard), then run pcguard detach",
            bpffs_dir.display()
        );
    }
    dir.lock()?;
    unpin_all(&dir)?;
    drop(dir);
    // The top directory itself; another process may have made it again.
    let _ = std::fs::remove_dir(bpffs_dir);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_have_no_dots() {
        assert_eq!(xdp_pin("eth0.100"), "xdp-eth0%2e100");
        assert_eq!(tc_pin("a%b"), "tc-a%25b");
    }
}
