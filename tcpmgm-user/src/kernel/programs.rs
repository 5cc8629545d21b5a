//! The programs, loaded and verified once per daemon start, and the maps they read every
//! generation through.
//!
//! Installing a generation puts each of its maps into slot `number % 2` of the array of maps of
//! its kind, then writes the number into `TCPMGM_CURRENT`: one map update switches every hook to
//! the new rule set at once, and no program is loaded or verified again. The slot the previous
//! generation used is emptied (freeing its maps) only after a grace period, so that no program
//! run that started before the switch can meet a half-replaced rule set.
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{Array, Map, MapData};
use aya::{Ebpf, EbpfLoader};
use tcpmgm_common::names;

use super::generation::Generation;
use super::templates::Templates;
use super::undo::Undo;
use super::{Cause, HOOKS, KernelError, OBJECT, SOCKETS_PIN, fail, fault, load_program, sys};

/// The maps every generation and every run share, with their pins in `pin_dir`: the per-socket
/// decisions and start times, the rule statistics and outcomes, the sweeper's closing sockets
/// and the log ring buffer.
pub(crate) fn shared_pins(pin_dir: &Path) -> [(&'static str, PathBuf); 8] {
    [
        (names::SOCKETS, pin_dir.join(SOCKETS_PIN)),
        ("AYA_LOGS", pin_dir.join(tcpmgm_common::LOGS_PIN)),
        (
            names::RULE_STATS,
            pin_dir.join(tcpmgm_common::RULE_STATS_PIN),
        ),
        (names::OUTCOMES, pin_dir.join(tcpmgm_common::OUTCOMES_PIN)),
        (names::STARTS, pin_dir.join(tcpmgm_common::STARTS_PIN)),
        (names::CLOSING, pin_dir.join(tcpmgm_common::CLOSING_PIN)),
        (names::EVENTS, pin_dir.join(tcpmgm_common::EVENTS_PIN)),
        (
            names::EVENT_DROPS,
            pin_dir.join(tcpmgm_common::EVENT_DROPS_PIN),
        ),
    ]
}

/// Copies every entry `entries` gives with `insert`: how many, or which side failed.
fn copy<V>(
    entries: impl Iterator<Item = Result<(u32, V), aya::maps::MapError>>,
    mut insert: impl FnMut(u32, V) -> Result<(), aya::maps::MapError>,
) -> Result<usize, (&'static str, aya::maps::MapError)> {
    let mut copied = 0;
    for entry in entries {
        let (id, counts) = entry.map_err(|e| ("reading the smaller one", e))?;
        insert(id, counts).map_err(|e| ("copying into the larger one", e))?;
        copied += 1;
    }
    Ok(copied)
}

/// A map sized by rule ids, and its pinned predecessor when that is too small.
struct Growing {
    name: &'static str,
    pin: PathBuf,
    /// Where the larger map is pinned until it replaces the old one.
    next: PathBuf,
    old: Option<MapData>,
}

pub struct Programs {
    ebpf: Ebpf,
    pub(super) templates: Templates,
    /// What each slot of the arrays of maps holds, by policy map: an update is skipped where the
    /// slot already holds the map wanted (a map the generations share).
    slots: [HashMap<&'static str, Arc<Map>>; 2],
    stats_capacity: u32,
    /// The outcome tracers' links (see `tracers`), or why they are not attached.
    tracers: Result<Vec<OwnedFd>, String>,
}

/// How many rule ids the rule statistics hold for a table of `rules` rules: twice the table
/// (room for the rules of later reloads, and for ids a reload removed, whose counts stay), at
/// least 1,024, a power of two, at most `RULE_STATS_MAX`. The kernel sizes a hash map's
/// buckets by its maximum, even without preallocation (16 bytes each), so the maximum is what
/// the map costs: 16 KiB for a small table, 64 MiB at 4M.
pub fn stats_capacity(rules: usize) -> u32 {
    (rules.saturating_mul(2).max(1024))
        .checked_next_power_of_two()
        .unwrap_or(usize::MAX)
        .min(tcpmgm_common::RULE_STATS_MAX) as u32
}

impl Programs {
    /// Loads the object and verifies every hook's program, with rule statistics for
    /// `stats_capacity` rule ids: the pinned statistics are used when they are that large, else
    /// copied into larger ones, pinned in their place once everything else succeeded. Pins this
    /// makes are recorded in `undo`.
    pub(super) fn load(
        pin_dir: &Path,
        stats_capacity: u32,
        undo: &mut Undo,
    ) -> Result<Programs, KernelError> {
        let started = std::time::Instant::now();
        raise_memlock();
        // The maps sized by rule ids: the pinned ones are used when large enough, else copied
        // into larger ones, which are pinned aside until they replace them (bpffs refuses names
        // with a dot).
        let growing: Vec<Growing> = [
            (names::RULE_STATS, tcpmgm_common::RULE_STATS_PIN),
            (names::OUTCOMES, tcpmgm_common::OUTCOMES_PIN),
        ]
        .into_iter()
        .map(|(name, pin)| {
            let pin = pin_dir.join(pin);
            let old = MapData::from_pin(&pin).ok().filter(|m| {
                m.info()
                    .map_or(true, |info| info.max_entries() < stats_capacity)
            });
            let next = pin.with_file_name(format!(
                "{}_NEXT",
                pin.file_name().unwrap_or_default().to_string_lossy()
            ));
            Growing {
                name,
                pin,
                next,
                old,
            }
        })
        .collect();
        let mut loader = EbpfLoader::new();
        for g in &growing {
            loader.map_max_entries(g.name, stats_capacity);
        }
        for (name, pin) in shared_pins(pin_dir) {
            let pin = match growing.iter().find(|g| g.name == name && g.old.is_some()) {
                Some(g) => {
                    let _ = std::fs::remove_file(&g.next);
                    g.next.clone()
                }
                None => pin,
            };
            if !pin.exists() {
                // Made by the load below (aya pins a map it creates).
                undo.made_pin(&pin);
            }
            loader.map_pin_path(name, pin);
        }
        fault::point("load").map_err(|source| KernelError::Step {
            what: "loading the eBPF object",
            source,
        })?;
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| match super::features::memlock_bound() {
                Some(limit) => KernelError::LoadMemlock {
                    limit,
                    source: Box::new(e),
                },
                None => KernelError::Load(Box::new(e)),
            })?;
        for hook in &HOOKS {
            let t = std::time::Instant::now();
            load_program(&mut ebpf, hook)?;
            tracing::debug!(
                program = hook.name,
                ms = t.elapsed().as_millis(),
                "verified"
            );
        }
        let tracers = super::tracers::attach(&mut ebpf);
        let templates = Templates::load(tracers.is_ok())?;
        let mut programs = Programs {
            ebpf,
            templates,
            slots: Default::default(),
            stats_capacity,
            tracers,
        };
        for g in growing {
            if let Some(old) = g.old {
                programs.take_counts(g.name, old, &g.pin, undo)?;
                let _ = std::fs::remove_file(&g.next);
            }
        }
        tracing::debug!(ms = started.elapsed().as_millis(), "programs loaded");
        Ok(programs)
    }

    /// Copies the counts of the smaller map `old` (the rule statistics or the outcomes) into
    /// this load's map `name`, and pins that at `pin` in its place (put back on undo). Counts
    /// the old programs add between the copy and the switch of the links are lost: a few events
    /// at most.
    fn take_counts(
        &mut self,
        name: &'static str,
        old: MapData,
        pin: &Path,
        undo: &mut Undo,
    ) -> Result<(), KernelError> {
        use aya::maps::{HashMap as BpfHashMap, PerCpuHashMap};
        use tcpmgm_common::{Outcomes, RuleStats};
        let fail = |what: &'static str| fail::<Cause>(name, what);
        let map = self.ebpf.map_mut(name).expect("the object defines it");
        let copied = if name == names::OUTCOMES {
            let old: BpfHashMap<MapData, u32, Outcomes> =
                BpfHashMap::try_from(Map::HashMap(old))
                    .map_err(|e| fail("opening the smaller one")(e.into()))?;
            let mut new: BpfHashMap<&mut MapData, u32, Outcomes> =
                BpfHashMap::try_from(map).map_err(|e| fail("opening the larger one")(e.into()))?;
            copy(old.iter(), |id, v| new.insert(id, v, 0))
        } else {
            let old: PerCpuHashMap<MapData, u32, RuleStats> =
                PerCpuHashMap::try_from(Map::PerCpuHashMap(old))
                    .map_err(|e| fail("opening the smaller one")(e.into()))?;
            let mut new: PerCpuHashMap<&mut MapData, u32, RuleStats> = PerCpuHashMap::try_from(map)
                .map_err(|e| fail("opening the larger one")(e.into()))?;
            copy(old.iter(), |id, v| new.insert(id, v, 0))
        }
        .map_err(|(what, e)| fail(what)(e.into()))?;
        fault::point("stats-copy").map_err(|e| fail("copying into the larger one")(e.into()))?;
        let fd = self.map_fd(name).expect("the object defines it");
        undo.pin(fd, pin)?;
        let what = if name == names::OUTCOMES {
            "connection outcomes"
        } else {
            "rule statistics"
        };
        tracing::info!(
            "{what} grown to {} rule ids ({copied} rules' counts kept)",
            self.stats_capacity
        );
        Ok(())
    }

    /// The descriptor of the map `name` of the object, unless something took it out (the log
    /// reader takes its ring buffer).
    pub(super) fn map_fd(&self, name: &str) -> Option<BorrowedFd<'_>> {
        let fd = match self.ebpf.map(name)? {
            Map::PerCpuHashMap(m)
            | Map::HashMap(m)
            | Map::PerCpuArray(m)
            | Map::SkStorage(m)
            | Map::RingBuf(m)
            | Map::PerfEventArray(m) => m.fd(),
            _ => return None,
        };
        Some(fd.as_fd())
    }

    /// How many rule ids the rule statistics of these programs hold.
    pub(super) fn stats_capacity(&self) -> u32 {
        self.stats_capacity
    }

    pub(super) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(super) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(super) fn program_fd(&self, name: &str) -> BorrowedFd<'_> {
        self.ebpf
            .program(name)
            .expect("the object defines every hook")
            .fd()
            .expect("loaded")
            .as_fd()
    }

    fn outer(&self, name: &'static str) -> BorrowedFd<'_> {
        match self.ebpf.map(name) {
            Some(Map::ArrayOfMaps(m)) => m.fd().as_fd(),
            other => unreachable!("{name} is not an array of maps: {other:?}"),
        }
    }

    /// Runs `op` on the arrays of maps of the policy maps `kinds` at once, one thread each: the
    /// kernel waits for an RCU grace period after every update or delete of an array of maps (so
    /// that no program still holds the inner map it replaced), and waits that overlap share
    /// grace periods, where eleven in a row took about 100 ms. `op` is given each policy map's
    /// name and its array's descriptor. Returns the arrays `op` failed on.
    fn on_outers(
        &self,
        kinds: &[&'static str],
        op: impl Fn(&'static str, BorrowedFd<'_>) -> std::io::Result<()> + Sync,
    ) -> Vec<(&'static str, std::io::Error)> {
        std::thread::scope(|scope| {
            let running: Vec<_> = names::POLICY_MAPS
                .iter()
                .filter(|(name, _)| kinds.contains(name))
                .map(|&(name, outer)| {
                    let fd = self.outer(outer);
                    let op = &op;
                    (outer, scope.spawn(move || op(name, fd)))
                })
                .collect();
            running
                .into_iter()
                .filter_map(|(outer, t)| match t.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some((outer, e)),
                    Err(_) => Some((outer, std::io::Error::other("the update panicked"))),
                })
                .collect()
        })
    }

    /// Puts `next` in its slot (only the maps the slot does not hold already), not yet in
    /// force. On error the slot is as it was.
    pub(super) fn stage(&mut self, next: &Generation) -> Result<(), KernelError> {
        let slot = next.number % 2;
        let held = &self.slots[slot as usize];
        let changed: Vec<&'static str> = names::POLICY_MAPS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| {
                !held
                    .get(name)
                    .is_some_and(|m| Arc::ptr_eq(m, next.shared(name)))
            })
            .collect();
        let failed = self.on_outers(&changed, |name, outer| {
            fault::point(&format!("stage:{name}"))?;
            let inner = next.map(name).fd().as_fd().as_raw_fd() as u32;
            sys::map_update(outer, &slot.to_ne_bytes(), &inner.to_ne_bytes())
                .map_err(std::io::Error::other)
        });
        if let Some((outer, e)) = failed.into_iter().next() {
            self.unstage(next.number, &changed);
            return Err(fail(
                outer,
                &format!("putting generation {} in", next.number),
            )(e));
        }
        for name in changed {
            self.slots[slot as usize].insert(name, next.shared(name).clone());
        }
        Ok(())
    }

    /// Empties generation `number`'s slot of the maps `kinds`: nothing reads it yet.
    fn unstage(&mut self, number: u32, kinds: &[&'static str]) {
        let slot = number % 2;
        self.on_outers(kinds, |_, fd| {
            sys::map_delete(fd, &slot).map_err(std::io::Error::other)
        });
        for name in kinds {
            self.slots[slot as usize].remove(name);
        }
    }

    /// Takes a staged generation that will not be switched to out of its slot again.
    pub(super) fn abandon(&mut self, next: &Generation, current: Option<&Generation>) {
        let slot = (next.number % 2) as usize;
        let stale: Vec<&'static str> = self.slots[slot]
            .iter()
            .filter(|(name, map)| {
                Arc::ptr_eq(map, next.shared(name))
                    && !current.is_some_and(|c| Arc::ptr_eq(map, c.shared(name)))
            })
            .map(|(name, _)| *name)
            .collect();
        self.unstage(next.number, &stale);
    }

    /// Makes the staged generation `number` the rule set in force: one map update.
    pub(super) fn switch(&mut self, number: u32) -> Result<(), KernelError> {
        let current = self
            .ebpf
            .map_mut(names::CURRENT)
            .expect("the object defines it");
        let mut current: Array<&mut MapData, u32> =
            Array::try_from(current).map_err(|e| fail(names::CURRENT, "opening it")(e))?;
        fault::point("switch")
            .map_err(|e| fail(names::CURRENT, "switching to the new generation")(e))?;
        current
            .set(0, number, 0)
            .map_err(|e| fail(names::CURRENT, "switching to the new generation")(e))
    }

    /// Empties the slot of generation `number`, no longer in force, of the maps `current` does
    /// not share; the kernel frees them once nothing holds them.
    pub(super) fn retire(&mut self, number: u32, current: &Generation) {
        let slot = (number % 2) as usize;
        let stale: Vec<&'static str> = self.slots[slot]
            .iter()
            .filter(|(name, map)| !Arc::ptr_eq(map, current.shared(name)))
            .map(|(name, _)| *name)
            .collect();
        let failed = self.on_outers(&stale, |_, fd| {
            sys::map_delete(fd, &(slot as u32)).map_err(std::io::Error::other)
        });
        for (outer, e) in failed {
            tracing::warn!("freeing generation {number} from {outer}: {e}");
        }
        for name in stale {
            self.slots[slot].remove(name);
        }
    }

    /// Pins the programs, so that a later run can put them back without CAP_SYS_ADMIN, and the
    /// outcome tracers' links in place of an earlier run's (which detaches those).
    pub(super) fn pin(&self, dir: &Path, undo: &mut Undo) -> Result<(), KernelError> {
        for hook in &HOOKS {
            undo.pin(self.program_fd(hook.name), &dir.join(hook.program_pin))?;
        }
        for (link, tracer) in self.tracer_links().iter().zip(&super::tracers::TRACERS) {
            undo.pin(link.as_fd(), &dir.join(tracer.pin))?;
        }
        Ok(())
    }

    /// The outcome tracers' links (none when they are not attached).
    pub(super) fn tracer_links(&self) -> &[OwnedFd] {
        self.tracers.as_deref().unwrap_or_default()
    }

    /// Why the outcome tracers are not attached, if they are not.
    pub fn tracers_missing(&self) -> Option<&str> {
        self.tracers.as_ref().err().map(String::as_str)
    }
}

/// Raises RLIMIT_MEMLOCK as far as this process may: to infinity with CAP_SYS_RESOURCE (or when
/// systemd's LimitMEMLOCK= already allows it), else the soft limit to the hard one. Linux before
/// 5.11 charges BPF maps and programs to it, and its default (64 KiB to 8 MiB) is too small.
fn raise_memlock() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok() {
        return;
    }
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) {
        let _ = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard);
        if hard != RLIM_INFINITY {
            tracing::debug!(
                "RLIMIT_MEMLOCK stays at {hard} bytes: on Linux before 5.11 that bounds the BPF maps (LimitMEMLOCK=infinity in a unit)"
            );
        }
    }
}
