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
pub mod diag;
pub mod features;
mod generation;
mod inspect;
mod programs;
pub mod socket;
mod sys;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SockOps};
use tcpmgm_common::names;

use crate::policy::compile::Policy;
pub use generation::Generation;
pub use inspect::{Pinned, PinnedProgram, RuleCount, inspect};
pub use programs::Programs;

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

/// The program type of a hook, for loading and attaching it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    SockOps,
    SockAddr,
    Sockopt,
}

/// The programs and what each needs from the kernel.
pub(crate) struct Hook {
    pub name: &'static str,
    pub kind: Kind,
    /// The program type as the kernel names it, for messages.
    pub kernel_kind: &'static str,
    pub min_kernel: &'static str,
    /// `enum bpf_attach_type` of the link.
    pub attach_type: u32,
    /// The link's pin name in the pin directory.
    pub pin: &'static str,
    /// The program's pin name, so that a later run can put it back without CAP_SYS_ADMIN.
    pub program_pin: &'static str,
}

pub(crate) const HOOKS: [Hook; 4] = [
    Hook {
        name: names::SOCK_OPS,
        kind: Kind::SockOps,
        kernel_kind: "BPF_PROG_TYPE_SOCK_OPS",
        min_kernel: "5.3 (sk_storage)",
        attach_type: 3,
        pin: "TCPMGM_LINK_SOCK_OPS",
        program_pin: "TCPMGM_PROG_SOCK_OPS",
    },
    Hook {
        name: names::CONNECT4,
        kind: Kind::SockAddr,
        kernel_kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect4",
        min_kernel: "5.10",
        attach_type: 10,
        pin: "TCPMGM_LINK_CONNECT4",
        program_pin: "TCPMGM_PROG_CONNECT4",
    },
    Hook {
        name: names::CONNECT6,
        kind: Kind::SockAddr,
        kernel_kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect6",
        min_kernel: "5.10",
        attach_type: 11,
        pin: "TCPMGM_LINK_CONNECT6",
        program_pin: "TCPMGM_PROG_CONNECT6",
    },
    Hook {
        name: names::SETSOCKOPT,
        kind: Kind::Sockopt,
        kernel_kind: "BPF_PROG_TYPE_CGROUP_SOCKOPT setsockopt",
        min_kernel: "5.3",
        attach_type: 22,
        pin: "TCPMGM_LINK_SETSOCKOPT",
        program_pin: "TCPMGM_PROG_SETSOCKOPT",
    },
];

/// The pin name of the shared socket map: its layout version is part of it, so that a pin left
/// by an incompatible build is never reused (and the application ABI names it).
pub use tcpmgm_common::SOCKETS_PIN;

/// How long a generation that is no longer in force stays in its slot before its maps are
/// freed: far longer than any program run that may have read the old generation's number.
pub const GRACE: Duration = Duration::from_millis(50);

/// Where the time of attaching, and of the last switch, went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Loading the object and verifying the programs (once per start).
    pub programs: Duration,
    /// Making and filling the first generation's maps.
    pub maps: Duration,
    /// Installing it, attaching or adopting the links, pinning.
    pub attach: Duration,
    /// The last `replace`: making and filling the new maps, then switching to them.
    pub last_switch: Duration,
}

/// A policy enforced on a cgroup through pinned links. Dropping it leaves the policy in force;
/// `detach` removes it.
pub struct Enforcer {
    timings: Timings,
    programs: Programs,
    current: Generation,
    /// The generation the last switch replaced, with when it was replaced; freed once `GRACE`
    /// has passed.
    retired: Option<(Generation, Instant)>,
    /// The cgroup links, one per hook in `HOOKS` order, opened through their pins.
    links: Vec<OwnedFd>,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    adopted: bool,
}

impl Enforcer {
    /// Enforces `policy` on `cgroup`, pinning links and maps in `pin_dir`. Links pinned there by
    /// an earlier run are adopted: their programs are swapped for this run's.
    pub fn attach(policy: &Policy, cgroup: &Path, pin_dir: &Path) -> Result<Enforcer, KernelError> {
        let fail_pin = |reason: String| KernelError::Pin {
            path: pin_dir.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(pin_dir).map_err(|e| fail_pin(e.to_string()))?;
        let started = Instant::now();
        let mut programs = Programs::load(pin_dir)?;
        let loaded = started.elapsed();
        let first = Generation::build(policy, &programs.templates, 1, None)?;
        let built = started.elapsed();
        programs.install(&first)?;
        let pinned = adopt_links(pin_dir, cgroup)?;
        let adopted = pinned.iter().any(Option::is_some);
        // Swap this run's programs into the adopted links first (undoing on failure), so that a
        // failure leaves the running policy exactly as it was.
        let old_programs: Vec<Option<OwnedFd>> = HOOKS
            .iter()
            .map(|h| sys::obj_get(&pin_dir.join(h.program_pin)).ok())
            .collect();
        for (i, (hook, link)) in HOOKS.iter().zip(&pinned).enumerate() {
            let Some(fd) = link else { continue };
            if let Err(source) = sys::link_update(fd.as_fd(), programs.program_fd(hook.name)) {
                put_back(&pinned[..i], &old_programs[..i]);
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
                Some(fd) => fd,
                None => attach_hook(&programs, hook, &cgroup_file, &pin_dir.join(hook.pin))?,
            };
            links.push(link);
        }
        programs.pin(pin_dir)?;
        first.pin(pin_dir)?;
        remove_stale_pins(pin_dir);
        tracing::info!(
            cgroup = %cgroup.display(),
            pins = %pin_dir.display(),
            rules = policy.rules.len(),
            adopted,
            "policy attached"
        );
        Ok(Enforcer {
            timings: Timings {
                programs: loaded,
                maps: built - loaded,
                attach: started.elapsed() - built,
                last_switch: Duration::ZERO,
            },
            programs,
            current: first,
            retired: None,
            links,
            pin_dir: pin_dir.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            adopted,
        })
    }

    /// A reader of the programs' log events (aya-log).
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(self.programs.ebpf_mut())
    }

    /// Whether `attach` took over links an earlier run had pinned.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Switches the cgroup to `policy`: its maps are built and filled aside, then every hook
    /// moves to them in one step. On error the running policy stays as it was.
    pub fn replace(&mut self, policy: &Policy) -> Result<(), KernelError> {
        // The slot the new generation takes is the retired one's.
        self.release_retired();
        let started = Instant::now();
        let next = Generation::build(
            policy,
            &self.programs.templates,
            self.current.number + 1,
            Some(&self.current),
        )?;
        self.programs.install(&next)?;
        self.timings.last_switch = started.elapsed();
        let old = std::mem::replace(&mut self.current, next);
        self.retired = Some((old, Instant::now()));
        if let Err(e) = self.current.pin(&self.pin_dir) {
            tracing::warn!("the new policy is enforced, but its maps could not be pinned: {e}");
        }
        Ok(())
    }

    /// Frees the generation the last switch replaced, once `GRACE` has passed since (waiting
    /// out the rest of it).
    pub fn release_retired(&mut self) {
        if let Some((old, since)) = self.retired.take() {
            std::thread::sleep(GRACE.saturating_sub(since.elapsed()));
            self.programs.retire(old.number, &self.current);
        }
    }

    /// Takes the policy off the cgroup now and removes the pins: back to the system's settings.
    pub fn detach(self) -> Result<(), KernelError> {
        for (hook, fd) in HOOKS.iter().zip(&self.links) {
            sys::link_detach(fd.as_fd()).map_err(|e| KernelError::Link {
                program: hook.name,
                what: "detaching it (BPF_LINK_DETACH, needs Linux 5.9)",
                reason: e.to_string(),
            })?;
        }
        remove_pins(&self.pin_dir);
        Ok(())
    }

    /// The kernel's own accounting of each hook's program (`kernel.bpf_stats_enabled` must be 1
    /// for it to count): (name, total run time, run count).
    pub fn program_stats(&self) -> Vec<(&'static str, std::time::Duration, u64)> {
        HOOKS
            .iter()
            .filter_map(|h| {
                let info = self.programs.ebpf().program(h.name)?.info().ok()?;
                Some((h.name, info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Kernel memory of the current policy maps, in bytes, as the kernel reports it.
    pub fn map_memory(&self) -> u64 {
        self.current.map_memory()
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The generation in force: 1 after attach, one more for every switch.
    pub fn generation(&self) -> u64 {
        u64::from(self.current.number)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

/// Puts the programs of an earlier run back into the links (undoing a partial swap at adoption).
fn put_back(links: &[Option<OwnedFd>], programs: &[Option<OwnedFd>]) {
    for ((hook, link), program) in HOOKS.iter().zip(links).zip(programs) {
        let Some(link) = link else { continue };
        let result = match program {
            Some(program) => sys::link_update(link.as_fd(), program.as_fd()),
            None => Err(std::io::Error::other("its program was not pinned")),
        };
        if let Err(e) = result {
            tracing::error!(
                "putting the earlier run's program back into the {} link failed: {e}",
                hook.name
            );
        }
    }
}

/// Removes pins of names this version does not use (left by an older layout), now that the
/// current ones are in place.
fn remove_stale_pins(dir: &Path) {
    let keep = |name: &str| {
        names::POLICY_MAPS.iter().any(|(map, _)| *map == name)
            || HOOKS.iter().any(|h| h.pin == name || h.program_pin == name)
            || name == SOCKETS_PIN
            || name == tcpmgm_common::LOGS_PIN
            || name == tcpmgm_common::RULE_STATS_PIN
            || name == tcpmgm_common::SWEEP_STATS_PIN
    };
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("TCPMGM_") && !keep(&name) {
            tracing::info!("removing {}, a pin of an older layout", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The links pinned in `dir` by an earlier run, in `HOOKS` order. A link whose cgroup is gone
/// (removed and perhaps made again: its programs run for nothing) is unpinned and left for a
/// new attachment; a link that holds another cgroup is an error, as a pin directory is one
/// cgroup's.
fn adopt_links(dir: &Path, cgroup: &Path) -> Result<Vec<Option<OwnedFd>>, KernelError> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(cgroup)
        .map_err(|source| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?
        .ino();
    let links = pinned_links(dir)?;
    let mut adopted = Vec::new();
    for (hook, link) in HOOKS.iter().zip(links) {
        let Some((fd, info)) = link else {
            adopted.push(None);
            continue;
        };
        if info.cgroup_id == 0 {
            tracing::warn!(
                "the pinned {} link's cgroup is gone; attaching anew to {}",
                hook.name,
                cgroup.display()
            );
            let _ = std::fs::remove_file(dir.join(hook.pin));
            adopted.push(None);
            continue;
        }
        if info.cgroup_id != want {
            return Err(KernelError::Pin {
                path: dir.to_path_buf(),
                reason: format!(
                    "its links belong to cgroup id {}, not to {} (id {want}); each cgroup needs a pin directory of its own",
                    info.cgroup_id,
                    cgroup.display()
                ),
            });
        }
        adopted.push(Some(fd));
    }
    Ok(adopted)
}

/// Opens the links pinned in `dir`, in `HOOKS` order, with what the kernel says of each.
fn pinned_links(dir: &Path) -> Result<Vec<Option<(OwnedFd, sys::CgroupLink)>>, KernelError> {
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
            let fd = sys::obj_get(&path).map_err(|e| fail("opening its pin", e.to_string()))?;
            let info = sys::link_info(fd.as_fd()).map_err(|e| fail("reading it", e.to_string()))?;
            Ok(Some((fd, info)))
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
    let links = pinned_links(dir)?;
    let found = links.iter().any(Option::is_some);
    for (hook, link) in HOOKS.iter().zip(&links) {
        if let Some((fd, _)) = link {
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
            kind: hook.kernel_kind,
            min_kernel: hook.min_kernel,
            what,
            source: Box::new(source),
        },
    }
}

/// Loads (verifies) one hook's program.
pub(crate) fn load_program(ebpf: &mut aya::Ebpf, hook: &'static Hook) -> Result<(), KernelError> {
    let program = ebpf
        .program_mut(hook.name)
        .expect("the object defines every hook");
    let fail = program_error(hook, "load");
    match hook.kind {
        Kind::SockOps => {
            let p: &mut SockOps = program.try_into().map_err(&fail)?;
            p.load().map_err(&fail)
        }
        Kind::SockAddr => {
            let p: &mut CgroupSockAddr = program.try_into().map_err(&fail)?;
            p.load().map_err(&fail)
        }
        Kind::Sockopt => {
            let p: &mut CgroupSockopt = program.try_into().map_err(&fail)?;
            p.load().map_err(&fail)
        }
    }
}

/// Attaches one hook's program to the cgroup as a bpf_link and pins the link at `pin`: the link
/// lives as long as its pin, not as long as this run.
fn attach_hook(
    programs: &Programs,
    hook: &'static Hook,
    cgroup: &File,
    pin: &Path,
) -> Result<OwnedFd, KernelError> {
    let fail = |what: &'static str| {
        move |e: std::io::Error| KernelError::Link {
            program: hook.name,
            what,
            reason: e.to_string(),
        }
    };
    let link = sys::link_create(
        programs.program_fd(hook.name),
        cgroup.as_fd(),
        hook.attach_type,
    )
    .map_err(|e| KernelError::Link {
        program: hook.name,
        what: "attaching it to the cgroup (BPF_LINK_CREATE, needs Linux 5.7)",
        reason: format!(
            "{e} ({}, needs Linux {})",
            hook.kernel_kind, hook.min_kernel
        ),
    })?;
    sys::obj_pin(link.as_fd(), pin).map_err(fail("pinning it"))?;
    Ok(link)
}

/// Whether this kernel batch-updates LPM tries (tried on a map of one entry).
pub fn lpm_batch_supported() -> std::io::Result<bool> {
    use aya::maps::IterableMap as _;
    use aya::maps::lpm_trie::LpmTrie;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let trie = LpmTrie::<aya::maps::MapData, [u8; 4], u32>::create(1, BPF_F_NO_PREALLOC)
        .map_err(std::io::Error::other)?;
    let key = [8u32.to_ne_bytes(), [10, 0, 0, 0]].concat();
    sys::update_batch(trie.map().fd().as_fd(), &key, &1u32.to_ne_bytes(), 1, 8, 4)
}
