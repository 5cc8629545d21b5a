//! Where the compiled policy is written to the kernel.
//!
//! Every rule set is a generation: the eBPF object loaded anew with each policy map sized to its
//! contents, the maps filled, and the programs loaded. The first generation is attached to the
//! cgroup as three bpf_links; a reload loads the next generation aside and swaps each link's
//! program with BPF_LINK_UPDATE. A program run uses one generation's maps only, and a socket is
//! decided once and remembers it (`TCPMGM_SOCKETS`, shared by all generations), so every
//! connection is governed by the old rule set or by the new one, never a mix. If anything fails
//! before the swap, the running generation is untouched.
//!
//! The links are pinned beside the maps, so the policy outlives the daemon (even SIGKILL). A new
//! daemon adopts the pinned links and swaps its own programs into them the same way, so the
//! cgroup never has two sets of tcpmgm programs, nor a moment without one. Only `detach` (or
//! removing the pins) takes the policy away.
mod generation;
mod sys;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};
use tcpmgm_common::names;

use crate::compile::Policy;
pub use generation::Generation;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("map {map}: {what}: {reason}")]
    Map {
        map: &'static str,
        what: String,
        reason: String,
    },
    #[error(
        "program {program}: the verifier refused it ({io_error}); last lines of its log:\n{tail}"
    )]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        tail: String,
    },
    #[error("program {program} ({kind}, needs Linux {min_kernel}): {what}: {source}")]
    Program {
        program: &'static str,
        kind: &'static str,
        min_kernel: &'static str,
        what: &'static str,
        source: Box<ProgramError>,
    },
    #[error(
        "replacing the program of the {program} link (BPF_LINK_UPDATE, needs Linux 5.7): {source}"
    )]
    LinkUpdate {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("the {program} link: {what}: {reason}")]
    Link {
        program: &'static str,
        what: &'static str,
        reason: String,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning in {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
}

/// The programs and what each needs from the kernel.
pub(crate) struct Hook {
    pub name: &'static str,
    pub kind: &'static str,
    pub min_kernel: &'static str,
    /// The link's pin name in the pin directory.
    pub pin: &'static str,
}

pub(crate) const HOOKS: [Hook; 3] = [
    Hook {
        name: names::SOCK_OPS,
        kind: "BPF_PROG_TYPE_SOCK_OPS",
        min_kernel: "5.3 (sk_storage)",
        pin: "TCPMGM_LINK_SOCK_OPS",
    },
    Hook {
        name: names::CONNECT4,
        kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect4",
        min_kernel: "5.10",
        pin: "TCPMGM_LINK_CONNECT4",
    },
    Hook {
        name: names::CONNECT6,
        kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect6",
        min_kernel: "5.10",
        pin: "TCPMGM_LINK_CONNECT6",
    },
];

/// The layout version of the shared socket map: part of its pin name, so that a pin left by an
/// incompatible build is never reused.
pub const SOCKETS_PIN: &str = "TCPMGM_SOCKETS_V2";

/// A policy enforced on a cgroup through pinned links. Dropping it leaves the policy in force;
/// `detach` removes it.
pub struct Enforcer {
    current: Generation,
    /// The cgroup links, one per hook in `HOOKS` order, and an fd of each for BPF_LINK_UPDATE.
    links: Vec<(FdLink, OwnedFd)>,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    generation: u64,
    adopted: bool,
}

impl Enforcer {
    /// Enforces `policy` on `cgroup`, pinning links and maps in `pin_dir`. Links pinned there by
    /// an earlier run are adopted: their programs are swapped for this policy's.
    pub fn attach(policy: &Policy, cgroup: &Path, pin_dir: &Path) -> Result<Enforcer, KernelError> {
        let fail_pin = |reason: String| KernelError::Pin {
            path: pin_dir.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(pin_dir).map_err(|e| fail_pin(e.to_string()))?;
        let mut next = Generation::load(policy, pin_dir)?;
        let pinned = adopt_links(pin_dir)?;
        check_cgroup(&pinned, cgroup, pin_dir)?;
        let adopted = pinned.iter().any(Option::is_some);
        // Swap the new programs into the adopted links first (undoing on failure), so that a
        // failure leaves the running policy exactly as it was.
        let old_programs: Vec<Option<u32>> = pinned
            .iter()
            .map(|l| {
                l.as_ref()
                    .and_then(|(link, _)| link.info().ok())
                    .map(|i| i.program_id())
            })
            .collect();
        for (i, (hook, link)) in HOOKS.iter().zip(&pinned).enumerate() {
            let Some((_, fd)) = link else { continue };
            if let Err(source) = sys::link_update(fd.as_fd(), next.program_fd(hook.name)) {
                restore(&pinned[..i], &old_programs[..i]);
                return Err(KernelError::LinkUpdate {
                    program: hook.name,
                    source,
                });
            }
        }
        let cgroup_file = File::open(cgroup).map_err(|source| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let mut links = Vec::new();
        for (hook, link) in HOOKS.iter().zip(pinned) {
            let link = match link {
                Some(l) => l,
                None => {
                    let (link, fd) = attach_hook(next.ebpf_mut(), hook, &cgroup_file)?;
                    let pinned = link
                        .pin(pin_dir.join(hook.pin))
                        .map_err(|e| fail_pin(format!("{}: {e}", hook.pin)))?;
                    (pinned.into(), fd)
                }
            };
            links.push(link);
        }
        next.pin_maps(pin_dir)?;
        remove_stale_pins(pin_dir);
        let enforcer = Enforcer {
            current: next,
            links,
            pin_dir: pin_dir.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            generation: 1,
            adopted,
        };
        tracing::info!(
            cgroup = %cgroup.display(),
            pins = %pin_dir.display(),
            rules = policy.rules.len(),
            adopted,
            "policy attached"
        );
        Ok(enforcer)
    }

    /// A reader of the programs' log events (aya-log), which every generation writes to.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(self.current.ebpf_mut())
    }

    /// Whether `attach` took over links an earlier run had pinned.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Switches the cgroup to `policy`. On error the running policy stays as it was.
    pub fn replace(&mut self, policy: &Policy) -> Result<(), KernelError> {
        let next = Generation::load(policy, &self.pin_dir)?;
        self.swap_to(next)
    }

    fn swap_to(&mut self, next: Generation) -> Result<(), KernelError> {
        for (i, (hook, (_, link_fd))) in HOOKS.iter().zip(&self.links).enumerate() {
            if let Err(source) = sys::link_update(link_fd.as_fd(), next.program_fd(hook.name)) {
                // Put back the hooks already switched, so the cgroup stays on one generation.
                for (back, (_, fd)) in HOOKS.iter().zip(&self.links).take(i) {
                    let _ = sys::link_update(fd.as_fd(), self.current.program_fd(back.name));
                }
                return Err(KernelError::LinkUpdate {
                    program: hook.name,
                    source,
                });
            }
        }
        self.current = next;
        self.generation += 1;
        if let Err(e) = self.current.pin_maps(&self.pin_dir) {
            tracing::warn!("the new policy is enforced, but its maps could not be pinned: {e}");
        }
        Ok(())
    }

    /// Takes the policy off the cgroup now and removes the pins: back to the system's settings.
    pub fn detach(self) -> Result<(), KernelError> {
        for (hook, (_, fd)) in HOOKS.iter().zip(&self.links) {
            sys::link_detach(fd.as_fd()).map_err(|e| KernelError::Link {
                program: hook.name,
                what: "detaching it (BPF_LINK_DETACH, needs Linux 5.9)",
                reason: e.to_string(),
            })?;
        }
        remove_pins(&self.pin_dir);
        Ok(())
    }

    /// The kernel's own accounting of each hook's current program (`kernel.bpf_stats_enabled`
    /// must be 1 for it to count): (name, total run time, run count).
    pub fn program_stats(&self) -> Vec<(&'static str, std::time::Duration, u64)> {
        HOOKS
            .iter()
            .filter_map(|h| {
                let info = self.current.ebpf().program(h.name)?.info().ok()?;
                Some((h.name, info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Kernel memory of the current policy maps, in bytes, as the kernel reports it.
    pub fn map_memory(&self) -> u64 {
        self.current.map_memory()
    }

    /// How many rule sets this enforcer has applied (1 after attach).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

/// Puts the programs `ids` back into the links (undoing a partial swap).
fn restore(links: &[Option<(FdLink, OwnedFd)>], ids: &[Option<u32>]) {
    for (link, id) in links.iter().zip(ids) {
        if let (Some((_, fd)), Some(id)) = (link, id)
            && let Ok(prog) = sys::prog_fd_by_id(*id)
        {
            let _ = sys::link_update(fd.as_fd(), prog.as_fd());
        }
    }
}

/// Refuses to adopt links that hold another cgroup: a pin directory is one cgroup's.
fn check_cgroup(
    links: &[Option<(FdLink, OwnedFd)>],
    cgroup: &Path,
    pin_dir: &Path,
) -> Result<(), KernelError> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(cgroup)
        .map_err(|source| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?
        .ino();
    for (hook, link) in HOOKS.iter().zip(links) {
        let Some((_, fd)) = link else { continue };
        let id = sys::link_cgroup_id(fd.as_fd()).map_err(|e| KernelError::Link {
            program: hook.name,
            what: "reading its cgroup",
            reason: e.to_string(),
        })?;
        if id != want {
            return Err(KernelError::Pin {
                path: pin_dir.to_path_buf(),
                reason: format!(
                    "its links belong to cgroup id {id}, not to {} (id {want}); each cgroup needs a pin directory of its own",
                    cgroup.display()
                ),
            });
        }
    }
    Ok(())
}

/// Removes pins of names this version does not use (left by an older layout), now that the
/// current ones are in place.
fn remove_stale_pins(dir: &Path) {
    let keep = |name: &str| {
        names::POLICY_MAPS.contains(&name)
            || HOOKS.iter().any(|h| h.pin == name)
            || name == SOCKETS_PIN
            || name == tcpmgm_common::LOGS_PIN
            || name == tcpmgm_common::SLOW_PIN
    };
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("TCPMGM_") && !keep(&name) {
            tracing::info!("removing {}, a pin of an older layout", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The links pinned in `dir` by an earlier run, in `HOOKS` order.
fn adopt_links(dir: &Path) -> Result<Vec<Option<(FdLink, OwnedFd)>>, KernelError> {
    HOOKS
        .iter()
        .map(|hook| {
            let path = dir.join(hook.pin);
            if !path.exists() {
                return Ok(None);
            }
            let fail = |what: &'static str, reason: String| KernelError::Link {
                program: hook.name,
                what,
                reason,
            };
            let link: FdLink = PinnedLink::from_pin(&path)
                .map_err(|e| fail("opening its pin", e.to_string()))?
                .into();
            let id = link
                .info()
                .map_err(|e| fail("reading its id", e.to_string()))?
                .id();
            let fd = sys::link_fd_by_id(id).map_err(|e| fail("opening it", e.to_string()))?;
            Ok(Some((link, fd)))
        })
        .collect()
}

/// Removes every pin of tcpmgm's in `dir`, then `dir` if empty.
fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("TCPMGM_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// `tcpmgm detach` without a daemon: detaches the links pinned in `dir` and removes its pins.
/// Returns false when there was nothing pinned.
pub fn detach_pinned(dir: &Path) -> Result<bool, KernelError> {
    let links = adopt_links(dir)?;
    let found = links.iter().any(Option::is_some);
    for (hook, link) in HOOKS.iter().zip(&links) {
        if let Some((_, fd)) = link {
            sys::link_detach(fd.as_fd()).map_err(|e| KernelError::Link {
                program: hook.name,
                what: "detaching it (BPF_LINK_DETACH, needs Linux 5.9)",
                reason: e.to_string(),
            })?;
        }
    }
    remove_pins(dir);
    Ok(found)
}

fn program_error(hook: &'static Hook, what: &'static str) -> impl Fn(ProgramError) -> KernelError {
    move |source| match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = format!("{verifier_log:?}");
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            KernelError::Verifier {
                program: hook.name,
                io_error,
                tail,
            }
        }
        source => KernelError::Program {
            program: hook.name,
            kind: hook.kind,
            min_kernel: hook.min_kernel,
            what,
            source: Box::new(source),
        },
    }
}

/// Attaches one hook as a bpf_link, takes the link out of aya's keeping (so it lives as long as
/// the enforcer, not the generation) and opens an fd of it for later program swaps.
fn attach_hook(
    ebpf: &mut aya::Ebpf,
    hook: &'static Hook,
    cgroup: &File,
) -> Result<(FdLink, OwnedFd), KernelError> {
    let program = ebpf
        .program_mut(hook.name)
        .expect("the object defines every hook");
    let fail = program_error(hook, "attach");
    // The kernel refuses link flags (EINVAL for AllowMultiple), and a link always runs beside the
    // cgroup's other programs whatever the mode.
    let mode = CgroupAttachMode::Single;
    let link: FdLink = if hook.name == names::SOCK_OPS {
        let p: &mut SockOps = program.try_into().map_err(&fail)?;
        let id = p.attach(cgroup, mode).map_err(&fail)?;
        p.take_link(id).map_err(&fail)?.try_into()
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(&fail)?;
        let id = p.attach(cgroup, mode).map_err(&fail)?;
        p.take_link(id).map_err(&fail)?.try_into()
    }
    .map_err(|e: aya::programs::links::LinkError| KernelError::Link {
        program: hook.name,
        what: "taking it",
        reason: e.to_string(),
    })?;
    let id = link
        .info()
        .map_err(|e| KernelError::Link {
            program: hook.name,
            what: "reading its id",
            reason: e.to_string(),
        })?
        .id();
    let fd = sys::link_fd_by_id(id).map_err(|source| KernelError::LinkUpdate {
        program: hook.name,
        source,
    })?;
    Ok((link, fd))
}

/// What the pins of a cgroup show: the programs on its links, and each rule's counters.
#[derive(Debug, serde::Serialize)]
pub struct Pinned {
    pub programs: Vec<PinnedProgram>,
    /// In match order.
    pub rules: Vec<RuleCount>,
}

#[derive(Debug, serde::Serialize)]
pub struct PinnedProgram {
    pub hook: &'static str,
    pub link_id: u32,
    pub program_id: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct RuleCount {
    pub id: u32,
    pub matched: u64,
    pub refused: u64,
    /// Sends slower than the rule's send_threshold (RTT samples over it, retransmission
    /// timeouts), counted since the pins were made.
    pub slow: u64,
}

/// Reads the links and counters pinned in `dir` (counters summed over CPUs).
pub fn inspect(dir: &Path) -> Result<Pinned, KernelError> {
    use aya::maps::{Array, Map, MapData, PerCpuArray};
    use tcpmgm_common::{Profile, RuleCounters};
    let mut programs = Vec::new();
    for (hook, link) in HOOKS.iter().zip(adopt_links(dir)?) {
        if let Some((link, _)) = link {
            let info = link.info().map_err(|e| KernelError::Link {
                program: hook.name,
                what: "reading it",
                reason: e.to_string(),
            })?;
            programs.push(PinnedProgram {
                hook: hook.name,
                link_id: info.id(),
                program_id: info.program_id(),
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
    let profiles: Array<MapData, Profile> = Array::try_from(Map::Array(open(names::PROFILES)?))
        .map_err(|e| fail(names::PROFILES, e))?;
    let counters: PerCpuArray<MapData, RuleCounters> =
        PerCpuArray::try_from(Map::PerCpuArray(open(names::COUNTERS)?))
            .map_err(|e| fail(names::COUNTERS, e))?;
    let slow: Option<aya::maps::PerCpuHashMap<MapData, u32, u64>> =
        MapData::from_pin(dir.join(tcpmgm_common::SLOW_PIN))
            .ok()
            .and_then(|m| aya::maps::PerCpuHashMap::try_from(Map::PerCpuHashMap(m)).ok());
    let mut rules = Vec::new();
    for rank in 0..profiles.len() {
        let profile = profiles
            .get(&rank, 0)
            .map_err(|e| fail(names::PROFILES, e))?;
        if profile.rule_id == 0 {
            // The placeholder entry of an empty rule set.
            continue;
        }
        let per_cpu = counters
            .get(&rank, 0)
            .map_err(|e| fail(names::COUNTERS, e))?;
        let (matched, refused) = per_cpu
            .iter()
            .fold((0, 0), |(m, r), c| (m + c.matched, r + c.refused));
        let slow = slow
            .as_ref()
            .and_then(|m| m.get(&profile.rule_id, 0).ok())
            .map_or(0, |per_cpu| per_cpu.iter().sum());
        rules.push(RuleCount {
            id: profile.rule_id,
            matched,
            refused,
            slow,
        });
    }
    Ok(Pinned { programs, rules })
}
