//! Reads the kernel's counters from the pinned maps. Shared by the metrics
//! endpoint (inside the daemon) and `pcguard status` (another process).

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use pcguard_common::{
    Counters, CtEntry, FlowKey, LearnedKey, NUM_STATS, NUM_VERDICTS, PacketDir, ProtoIndex, names, port_counter_index,
    rule_counter_index,
};
use serde::{Deserialize, Serialize};

/// What the counters need to know about the running policy to be labelled.
/// Written by the daemon into its state file so `status` can read it too.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// Port labels per counter protocol index; index 0 is `other`.
    pub port_labels: [Vec<String>; 3],
    /// Rule ids by rule index; index 0 is the "no rule" placeholder.
    pub rules: Vec<String>,
}

impl Labels {
    pub fn from_policy(p: &crate::policy::CompiledPolicy) -> Self {
        Self { port_labels: p.port_labels.clone(), rules: p.rules.iter().map(|r| r.id.clone()).collect() }
    }
}

/// Counters of one (direction, protocol, port label). Labelled with the
/// codes' names (`as_str`); a [`Counters`] is indexed by verdict
/// (`pcguard_common::Verdict`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortCount {
    pub direction: PacketDir,
    pub protocol: ProtoIndex,
    pub port: String,
    pub counters: Counters,
}

/// Counters of one (direction, rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCount {
    pub direction: PacketDir,
    pub rule: String,
    pub counters: Counters,
}

/// Everything the kernel counts, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub ports: Vec<PortCount>,
    pub rules: Vec<RuleCount>,
    pub stats: [u64; NUM_STATS as usize],
    /// Filled by [`PinnedCounters::table_sizes`] when asked for.
    pub tables: Option<TableSizes>,
}

impl Snapshot {
    /// Total packets and bytes per verdict over all ports and directions.
    pub fn totals(&self) -> Counters {
        let mut t = Counters::default();
        for p in &self.ports {
            add(&mut t, &p.counters);
        }
        t
    }
}

fn add(into: &mut Counters, c: &Counters) {
    for v in 0..NUM_VERDICTS {
        into.packets[v] += c.packets[v];
        into.bytes[v] += c.bytes[v];
    }
}

/// The pinned maps the counters live in.
pub struct PinnedCounters {
    ports: PerCpuArray<MapData, Counters>,
    rules: PerCpuArray<MapData, Counters>,
    stats: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    ct_new: HashMap<MapData, FlowKey, CtEntry>,
    /// `max_entries` of `CONNTRACK` and `CT_NEW`.
    pub capacity: (u32, u32),
    active: Array<MapData, u32>,
    learned: HashMap<MapData, LearnedKey, u32>,
}

impl PinnedCounters {
    /// Opens the maps pinned by a running daemon under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let open = |name: &str| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
            aya::maps::Map::from_map_data(data).with_context(|| format!("reading map {name}"))
        };
        let max = |name: &str| -> Result<u32> {
            let path = dir.join(name);
            Ok(MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?
                .info()?
                .max_entries())
        };
        Ok(Self {
            capacity: (max(names::CONNTRACK)?, max(names::CT_NEW)?),
            ports: PerCpuArray::try_from(open(names::PORT_COUNTERS)?)?,
            rules: PerCpuArray::try_from(open(names::RULE_COUNTERS)?)?,
            stats: PerCpuArray::try_from(open(names::STATS)?)?,
            conntrack: HashMap::try_from(open(names::CONNTRACK)?)?,
            ct_new: HashMap::try_from(open(names::CT_NEW)?)?,
            active: Array::try_from(open(names::ACTIVE)?)?,
            learned: HashMap::try_from(open(names::LEARNED)?)?,
        })
    }

    /// Reads every counter the labels name, and the stats; not the table
    /// sizes (see [`PinnedCounters::table_sizes`]): a scrape stays fast
    /// whatever the size of conntrack.
    pub fn snapshot(&self, labels: &Labels) -> Result<Snapshot> {
        let mut snap = Snapshot::default();
        for dir in PacketDir::ALL {
            for (proto, ports) in ProtoIndex::ALL.into_iter().zip(&labels.port_labels) {
                // Index 0 ("other") exists even for a policy without labels.
                let n = ports.len().max(1);
                for idx in 0..n {
                    let port = ports.get(idx).cloned().unwrap_or_else(|| "other".to_string());
                    if port.is_empty() {
                        continue; // a label of an earlier policy (see `ids`)
                    }
                    let counters = sum_cpus(&self.ports, port_counter_index(dir as u32, proto as u32, idx as u16))?;
                    snap.ports.push(PortCount { direction: dir, protocol: proto, port, counters });
                }
            }
            for (rule, id) in labels.rules.iter().enumerate().skip(1).filter(|(_, id)| !id.is_empty()) {
                let counters = sum_cpus(&self.rules, rule_counter_index(dir as u32, rule as u16))?;
                snap.rules.push(RuleCount { direction: dir, rule: id.clone(), counters });
            }
        }
        for (i, s) in snap.stats.iter_mut().enumerate() {
            *s = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(snap)
    }

    /// Entries of the conntrack tables and `LEARNED`, by walking them: a
    /// walk of a table other CPUs change meanwhile may see an entry twice
    /// or miss one, so each count is clamped to its table's capacity. Too
    /// slow for every scrape of a full table: the daemon samples it in the
    /// background.
    pub fn table_sizes(&self) -> Result<TableSizes> {
        let count = |m: &HashMap<MapData, FlowKey, CtEntry>, max: u32| {
            (m.keys().filter(|k| k.is_ok()).count() as u64).min(u64::from(max))
        };
        let mut sizes = TableSizes {
            established: count(&self.conntrack, self.capacity.0),
            new: count(&self.ct_new, self.capacity.1),
            ..Default::default()
        };
        let active = self.active.get(&0, 0)?;
        for k in self.learned.keys().filter_map(|k| k.ok()) {
            sizes.dns_learned_entries += 1;
            sizes.dns_learned += u64::from(u32::from(k.generation) == active);
        }
        Ok(sizes)
    }
}

/// Sizes of the tables that change with traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    /// Entries of `CONNTRACK` (established flows) and `CT_NEW`.
    pub established: u64,
    pub new: u64,
    /// DNS-learned addresses of the active policy generation (`LEARNED`),
    /// and entries of both generations (the inactive one's are removed
    /// right after a reload switches).
    pub dns_learned: u64,
    pub dns_learned_entries: u64,
}

impl TableSizes {
    pub fn conntrack(&self) -> u64 {
        self.established + self.new
    }
}

fn sum_cpus(map: &PerCpuArray<MapData, Counters>, index: u32) -> Result<Counters> {
    let mut total = Counters::default();
    for c in map.get(&index, 0)?.iter() {
        add(&mut total, c);
    }
    Ok(total)
}
