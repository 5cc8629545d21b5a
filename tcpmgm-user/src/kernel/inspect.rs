//! What the pins of a cgroup show, for `tcpmgm status` and the metrics: the programs on its
//! links, and each rule's counters.
use std::path::Path;

use tcpmgm_common::{LIFETIME_BUCKETS_S, names, outcome};

use super::{HOOKS, KernelError, pinned_links};

/// The programs on a cgroup's links, and each rule's counters.
#[derive(Debug, serde::Serialize)]
pub struct Pinned {
    pub programs: Vec<PinnedProgram>,
    /// The generation the pinned policy maps are, from their header.
    pub generation: u32,
    /// The version of the tcpmgm that loaded the programs, from the same header; None for
    /// pins of a version that did not record it.
    pub loader: Option<String>,
    /// In match order.
    pub rules: Vec<RuleCount>,
}

#[derive(Debug, serde::Serialize)]
pub struct PinnedProgram {
    pub hook: &'static str,
    pub link_id: u32,
    pub program_id: u32,
    /// The cgroup the link holds (its directory's inode number); 0 once that cgroup is gone.
    pub cgroup_id: u64,
}

/// What a rule did, summed over CPUs, since its first event (a reload keeps the counts).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RuleCount {
    pub id: u32,
    pub matched: u64,
    pub refused: u64,
    /// connect() calls refused in audit mode's stead.
    pub would_refuse: u64,
    pub setsockopt_failures: u64,
    /// Application setsockopt() calls that would have changed an option the rule sets.
    pub overrides_prevented: u64,
    /// Sends slower than the rule's send_threshold (RTT samples over it, retransmission
    /// timeouts).
    pub slow: u64,
    /// Idle connections closed by con_lifetime.
    pub idle_closes: u64,
    /// Idle connections left open in audit mode that con_lifetime would have closed.
    pub would_close: u64,
    /// How the rule's connections ended, by outcome (`tcpmgm_common::outcome::NAMES`), since
    /// tcpmgm first counted them (pins of versions before 2026-12 have none).
    pub ended: std::collections::BTreeMap<&'static str, u64>,
    /// The ended connections' lifetimes summed, in ms.
    pub lived_ms: u64,
    /// (seconds, ended connections that lived at most that long), cumulative; the last bound is
    /// u64::MAX (every connection whose start tcpmgm saw).
    pub lived_at_most_s: Vec<(u64, u64)>,
}

/// How many hooks have a link pinned in `dir` that holds the cgroup at `cgroup` now (the
/// directory's inode, so a cgroup removed and made again at the path is not it), of
/// `HOOKS.len()`: what the kernel enforces there, read from the kernel.
pub fn hooks_attached(dir: &Path, cgroup: &Path) -> Result<usize, KernelError> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(inode) = std::fs::metadata(cgroup).map(|m| m.ino()) else {
        return Ok(0);
    };
    Ok(pinned_links(dir)?
        .iter()
        .flatten()
        .filter(|(_, link)| link.cgroup_id == inode)
        .count())
}

/// Reads the links and counters pinned in `dir` (counters summed over CPUs).
pub fn inspect(dir: &Path) -> Result<Pinned, KernelError> {
    use aya::maps::{Array, Map, MapData};
    use tcpmgm_common::{Profile, RankEntry};
    let mut programs = Vec::new();
    for (hook, link) in HOOKS.iter().zip(pinned_links(dir)?) {
        if let Some((_, info)) = link {
            programs.push(PinnedProgram {
                hook: hook.name,
                link_id: info.id,
                program_id: info.program_id,
                cgroup_id: info.cgroup_id,
            });
        }
    }
    let open = |name: &'static str| {
        MapData::from_pin(dir.join(name)).map_err(|e| KernelError::Map {
            map: name,
            what: "opening its pin".into(),
            source: e.into(),
        })
    };
    let fail = |name: &'static str, e: aya::maps::MapError| KernelError::Map {
        map: name,
        what: "reading".into(),
        source: e.into(),
    };
    let (generation, loader) = header(dir)?;
    // Each rank's rule id: from the ranks, or, in pins of a version before them, from the
    // profiles, which were one a rank.
    let rule_ids: Vec<u32> = if dir.join(names::RANKS).exists() {
        let ranks: Array<MapData, RankEntry> =
            Array::try_from(Map::Array(open(names::RANKS)?)).map_err(|e| fail(names::RANKS, e))?;
        ranks
            .iter()
            .map(|r| r.map(|r| r.rule_id))
            .collect::<Result<_, _>>()
            .map_err(|e| fail(names::RANKS, e))?
    } else {
        let profiles: Array<MapData, Profile> = Array::try_from(Map::Array(open(names::PROFILES)?))
            .map_err(|e| fail(names::PROFILES, e))?;
        profiles
            .iter()
            .map(|p| p.map(|p| p.rule_id))
            .collect::<Result<_, _>>()
            .map_err(|e| fail(names::PROFILES, e))?
    };
    let counted = counted(dir)?;
    let rules: Vec<RuleCount> = rule_ids
        .into_iter()
        // 0: the placeholder entry of an empty rule set.
        .filter(|&id| id != 0)
        .map(|id| {
            counted
                .get(&id)
                .cloned()
                .unwrap_or_else(|| RuleCount::none(id))
        })
        .collect();
    Ok(Pinned {
        programs,
        generation,
        loader,
        rules,
    })
}

/// What each rule that counted something did, by rule id, summed over CPUs. The statistics
/// hold an entry only from a rule's first event (and keep those of rules a reload removed), so
/// they are walked whole: a scrape or a `status` costs what the rules did, not what the table
/// holds (a lookup per rule took a second at a million rules).
pub fn counted(dir: &Path) -> Result<std::collections::HashMap<u32, RuleCount>, KernelError> {
    use aya::maps::{Map, MapData, PerCpuHashMap};
    use tcpmgm_common::RuleStats;
    let fail = |name: &'static str, what: &str, e: super::Cause| KernelError::Map {
        map: name,
        what: what.into(),
        source: e,
    };
    let pin = MapData::from_pin(dir.join(tcpmgm_common::RULE_STATS_PIN))
        .map_err(|e| fail(names::RULE_STATS, "opening its pin", e.into()))?;
    let stats: PerCpuHashMap<MapData, u32, RuleStats> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(pin))
            .map_err(|e| fail(names::RULE_STATS, "reading", e.into()))?;
    let mut out = std::collections::HashMap::new();
    for entry in stats.iter() {
        let (id, per_cpu) = entry.map_err(|e| fail(names::RULE_STATS, "reading", e.into()))?;
        let mut r = RuleCount::none(id);
        for c in per_cpu.iter() {
            r.matched += c.matched;
            r.refused += c.refused;
            r.would_refuse += c.would_refuse;
            r.setsockopt_failures += c.setsockopt_failures;
            r.overrides_prevented += c.overrides_prevented;
            r.slow += c.slow_sends;
        }
        out.insert(id, r);
    }
    if let Ok(pin) = MapData::from_pin(dir.join(tcpmgm_common::OUTCOMES_PIN)) {
        let ends: aya::maps::HashMap<MapData, u32, tcpmgm_common::Outcomes> =
            aya::maps::HashMap::try_from(Map::HashMap(pin))
                .map_err(|e| fail(names::OUTCOMES, "reading", e.into()))?;
        for entry in ends.iter() {
            let (id, o) = entry.map_err(|e| fail(names::OUTCOMES, "reading", e.into()))?;
            out.entry(id)
                .or_insert_with(|| RuleCount::none(id))
                .set_outcomes(&o);
        }
    }
    if let Ok(sweeps) = super::sweep_stats::open(dir, false) {
        for entry in sweeps.iter() {
            let (id, swept) = entry.map_err(|e| fail("sweep statistics", "reading", e.into()))?;
            let r = out.entry(id).or_insert_with(|| RuleCount::none(id));
            r.idle_closes = swept.idle_closes;
            r.would_close = swept.would_close;
        }
    }
    Ok(out)
}

impl RuleCount {
    /// A rule that counted nothing yet.
    fn none(id: u32) -> RuleCount {
        RuleCount {
            id,
            matched: 0,
            refused: 0,
            would_refuse: 0,
            setsockopt_failures: 0,
            overrides_prevented: 0,
            slow: 0,
            idle_closes: 0,
            would_close: 0,
            ended: outcome::NAMES.iter().map(|&n| (n, 0)).collect(),
            lived_ms: 0,
            lived_at_most_s: Vec::new(),
        }
    }

    fn set_outcomes(&mut self, o: &tcpmgm_common::Outcomes) {
        for (name, n) in outcome::NAMES.iter().zip(o.ended) {
            self.ended.insert(name, n);
        }
        self.lived_ms = o.lived_ms;
        let mut below = 0;
        self.lived_at_most_s = LIFETIME_BUCKETS_S
            .iter()
            .chain(&[u64::MAX])
            .zip(o.lived)
            .map(|(&s, n)| {
                below += n;
                (s, below)
            })
            .collect();
    }

    /// How many of its connections ended (every outcome).
    pub fn ends(&self) -> u64 {
        self.ended.values().sum()
    }

    /// Its counters, in the metrics' order (see `daemon::metrics`).
    pub fn values(&self) -> [u64; 8] {
        [
            self.matched,
            self.refused,
            self.would_refuse,
            self.slow,
            self.idle_closes,
            self.would_close,
            self.setsockopt_failures,
            self.overrides_prevented,
        ]
    }
}

/// The pinned header's generation and loader; the header of an older version is its first 8
/// bytes only (generation, flags), without a loader.
fn header(dir: &Path) -> Result<(u32, Option<String>), KernelError> {
    use aya::maps::{Array, Map, MapData, MapError};
    let open = || {
        MapData::from_pin(dir.join(names::HEADER)).map_err(|e| KernelError::Map {
            map: names::HEADER,
            what: "opening its pin".into(),
            source: e.into(),
        })
    };
    let fail = |e: MapError| KernelError::Map {
        map: names::HEADER,
        what: "reading".into(),
        source: e.into(),
    };
    match Array::<MapData, tcpmgm_common::Header>::try_from(Map::Array(open()?)) {
        Ok(header) => {
            let h = header.get(&0, 0).map_err(fail)?;
            let text = h.loader.split(|&b| b == 0).next().unwrap_or_default();
            let loader = String::from_utf8_lossy(text).into_owned();
            Ok((h.generation, Some(loader).filter(|l| !l.is_empty())))
        }
        Err(MapError::InvalidValueSize { .. }) => {
            let old: Array<MapData, [u32; 2]> =
                Array::try_from(Map::Array(open()?)).map_err(fail)?;
            Ok((old.get(&0, 0).map_err(fail)?[0], None))
        }
        Err(e) => Err(fail(e)),
    }
}
