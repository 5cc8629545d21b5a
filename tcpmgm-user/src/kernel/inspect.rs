//! What the pins of a cgroup show, for `tcpmgm status` and the metrics: the programs on its
//! links, and each rule's counters.
use std::path::Path;

use tcpmgm_common::names;

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
#[derive(Debug, serde::Serialize)]
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
}

/// Reads the links and counters pinned in `dir` (counters summed over CPUs).
pub fn inspect(dir: &Path) -> Result<Pinned, KernelError> {
    use aya::maps::{Array, Map, MapData, PerCpuHashMap};
    use tcpmgm_common::{Profile, RankEntry, RuleStats};
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
            reason: e.to_string(),
        })
    };
    let fail = |name: &'static str, e: aya::maps::MapError| KernelError::Map {
        map: name,
        what: "reading".into(),
        reason: e.to_string(),
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
    let stats: PerCpuHashMap<MapData, u32, RuleStats> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(open(tcpmgm_common::RULE_STATS_PIN)?))
            .map_err(|e| fail(names::RULE_STATS, e))?;
    let sweeps = crate::daemon::lifetime::stats_map(dir, false).ok();
    let mut rules = Vec::new();
    for rule_id in rule_ids {
        if rule_id == 0 {
            // The placeholder entry of an empty rule set.
            continue;
        }
        // A rule gets its entry with its first event.
        let total = match stats.get(&rule_id, 0) {
            Ok(per_cpu) => per_cpu.iter().fold(RuleStats::default(), |t, c| RuleStats {
                matched: t.matched + c.matched,
                refused: t.refused + c.refused,
                would_refuse: t.would_refuse + c.would_refuse,
                setsockopt_failures: t.setsockopt_failures + c.setsockopt_failures,
                overrides_prevented: t.overrides_prevented + c.overrides_prevented,
                slow_sends: t.slow_sends + c.slow_sends,
            }),
            Err(aya::maps::MapError::KeyNotFound) => RuleStats::default(),
            Err(e) => return Err(fail(names::RULE_STATS, e)),
        };
        let swept = sweeps
            .as_ref()
            .and_then(|m| m.get(&rule_id, 0).ok())
            .unwrap_or_default();
        rules.push(RuleCount {
            id: rule_id,
            matched: total.matched,
            refused: total.refused,
            would_refuse: total.would_refuse,
            setsockopt_failures: total.setsockopt_failures,
            overrides_prevented: total.overrides_prevented,
            slow: total.slow_sends,
            idle_closes: swept.idle_closes,
            would_close: swept.would_close,
        });
    }
    Ok(Pinned {
        programs,
        generation,
        loader,
        rules,
    })
}

/// The pinned header's generation and loader; the header of an older version is its first 8
/// bytes only (generation, flags), without a loader.
fn header(dir: &Path) -> Result<(u32, Option<String>), KernelError> {
    use aya::maps::{Array, Map, MapData, MapError};
    let open = || {
        MapData::from_pin(dir.join(names::HEADER)).map_err(|e| KernelError::Map {
            map: names::HEADER,
            what: "opening its pin".into(),
            reason: e.to_string(),
        })
    };
    let fail = |e: MapError| KernelError::Map {
        map: names::HEADER,
        what: "reading".into(),
        reason: e.to_string(),
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
