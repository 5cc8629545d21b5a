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
//!
//! A start, an adoption and a reload are one kernel step (`Enforcer::apply`): load the programs
//! when there are none yet or they are too small for the table, build and stage the generation,
//! put the programs into the links (adopted, this run's, or new ones), pin, switch. Every change
//! is recorded (`undo`) and undone when a later one fails, so a failure at any hook or pin
//! leaves what was there before: nothing, or the policy in force.
mod apply;
pub mod claim;
pub mod diag;
pub mod fault;
pub mod features;
use features::KernelFeature;
mod generation;
mod inspect;
mod pins;
pub use pins::{share_records, unshare_records};
mod programs;
pub mod socket;
pub mod sweep_stats;
mod sys;
mod templates;
pub(crate) mod tracers;
mod undo;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SockOps};
use tcpmgm_common::{Profile, names};

use crate::policy::compile::Policy;
use apply::{From, apply, put_in_links};
pub use generation::Generation;
pub use inspect::{Pinned, PinnedProgram, RuleCount, counted, hooks_attached, inspect};
pub use pins::{detach_pinned, repin};
use pins::{pinned_links, remove_pins};
use programs::Programs;

/// The eBPF object, built by tcpmgm-user's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpmgm"));
pub use programs::stats_capacity;
use undo::Undo;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "loading the eBPF object: {source}; Linux before 5.11 charges BPF maps to RLIMIT_MEMLOCK, \
         {limit} bytes for this process: run as root, with CAP_SYS_RESOURCE, or under \
         LimitMEMLOCK=infinity"
    )]
    LoadMemlock {
        limit: u64,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("map {map}: {what}: {source}")]
    Map {
        map: &'static str,
        what: String,
        source: Cause,
    },
    #[error(
        "program {program}: the verifier refused it ({io_error}); last lines of its log:\n{tail}"
    )]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        tail: String,
    },
    #[error("program {program} ({kind}; {}): {what}: {source}", needs_all(.needs))]
    Program {
        program: &'static str,
        kind: &'static str,
        needs: &'static [KernelFeature],
        what: &'static str,
        source: Box<ProgramError>,
    },
    #[error(
        "replacing the program of the {program} link ({}): {source}", features::LINK_UPDATE.needs()
    )]
    LinkUpdate {
        program: &'static str,
        source: std::io::Error,
    },
    /// Attaching a program: the link's own needs, and the program's (which the kernel may
    /// check only now, at the attach).
    #[error(
        "the {program} link: attaching it to the cgroup ({}; {}): {source}",
        features::LINK_CREATE.needs(),
        needs_all(.needs)
    )]
    LinkCreate {
        program: &'static str,
        needs: &'static [KernelFeature],
        source: Cause,
    },
    #[error("the {program} link: {what}{}: {source}", .needs.map(|f| format!(" ({})", f.needs())).unwrap_or_default())]
    Link {
        program: &'static str,
        what: &'static str,
        /// The kernel feature the step takes, when its failure may mean the kernel lacks it.
        needs: Option<KernelFeature>,
        source: Cause,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinning in {path}: {source}")]
    Pin { path: PathBuf, source: Cause },
    #[error("{what}: {source}")]
    Step {
        what: &'static str,
        source: std::io::Error,
    },
}

/// What a step failed on: the syscall's or aya's error, kept as the error's source (so that its
/// errno survives), or a reason of tcpmgm's own.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// The programs' event stream (see `Enforcer::events`), and their count of events not written.
pub type EventRing = aya::maps::RingBuf<aya::maps::MapData>;
pub type EventDrops = aya::maps::PerCpuArray<aya::maps::MapData, u64>;

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
    /// What the program takes from the kernel beyond the core (named in its load errors).
    pub needs: &'static [KernelFeature],
    /// The link's attach type.
    pub attach_type: bpf_attach_type,
    /// The link's pin name in the pin directory.
    pub pin: &'static str,
    /// The program's pin name, so that a later run can put it back without CAP_SYS_ADMIN.
    pub program_pin: &'static str,
}

use aya_obj::generated::bpf_attach_type;

/// What a program needs, feature by feature, and the release tcpmgm is tested from.
fn needs_all(needs: &[KernelFeature]) -> String {
    let mut all: Vec<String> = needs.iter().map(KernelFeature::needs).collect();
    all.push(format!("tested from {}", features::TESTED_FROM));
    all.join("; ")
}

pub(crate) const HOOKS: [Hook; 4] = [
    Hook {
        name: names::SOCK_OPS,
        kind: Kind::SockOps,
        kernel_kind: "BPF_PROG_TYPE_SOCK_OPS",
        needs: &[
            features::SOCK_OPS,
            features::SOCK_OPS_STORAGE,
            features::RINGBUF,
        ],
        attach_type: bpf_attach_type::BPF_CGROUP_SOCK_OPS,
        pin: "TCPMGM_LINK_SOCK_OPS",
        program_pin: "TCPMGM_PROG_SOCK_OPS",
    },
    Hook {
        name: names::CONNECT4,
        kind: Kind::SockAddr,
        kernel_kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect4",
        needs: &[features::SOCK_ADDR, features::RINGBUF],
        attach_type: bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        pin: "TCPMGM_LINK_CONNECT4",
        program_pin: "TCPMGM_PROG_CONNECT4",
    },
    Hook {
        name: names::CONNECT6,
        kind: Kind::SockAddr,
        kernel_kind: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR connect6",
        needs: &[features::SOCK_ADDR, features::RINGBUF],
        attach_type: bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
        pin: "TCPMGM_LINK_CONNECT6",
        program_pin: "TCPMGM_PROG_CONNECT6",
    },
    Hook {
        name: names::SETSOCKOPT,
        kind: Kind::Sockopt,
        kernel_kind: "BPF_PROG_TYPE_CGROUP_SOCKOPT setsockopt",
        needs: &[features::SOCKOPT],
        attach_type: bpf_attach_type::BPF_CGROUP_SETSOCKOPT,
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
    /// an earlier run are adopted: their programs are swapped for this run's. On error nothing
    /// was changed: the cgroup has what it had (an earlier run's policy, or none) and no pin of
    /// this run's is left.
    pub fn attach(policy: &Policy, cgroup: &Path, pin_dir: &Path) -> Result<Enforcer, KernelError> {
        let mut made = None;
        apply(policy, From::Start { cgroup, pin_dir }, &mut made)?;
        Ok(made.expect("a start makes the enforcer"))
    }

    /// Switches the cgroup to `policy`: its maps are built and filled aside, then every hook
    /// moves to them in one step. On error the running policy stays as it was.
    pub fn replace(&mut self, policy: &Policy) -> Result<(), KernelError> {
        // The slot the new generation takes is the retired one's.
        self.release_retired();
        apply(policy, From::Running(self), &mut None)
    }

    /// Switches the cgroup to the policy in force with the rules at the ranks of `changes`
    /// given their new profiles: a generation that shares every map but the header and the
    /// ranks with the one in force, installed in one step as `replace` does. Ok(false), with
    /// nothing changed, when the profiles map has no room left (`replace` then).
    pub fn patch(&mut self, changes: &[(u32, Profile)]) -> Result<bool, KernelError> {
        self.release_retired();
        apply::patch(self, changes)
    }

    /// Every pin of this run's with the object it should hold: the links, the programs, the
    /// maps all generations share and the policy maps in force. What `repin` puts back.
    pub fn pins(&self) -> std::io::Result<Vec<(PathBuf, OwnedFd)>> {
        let mut pins = Vec::new();
        for (hook, link) in HOOKS.iter().zip(&self.links) {
            pins.push((self.pin_dir.join(hook.pin), link.try_clone()?));
            pins.push((
                self.pin_dir.join(hook.program_pin),
                self.programs.program_fd(hook.name).try_clone_to_owned()?,
            ));
        }
        for (link, tracer) in self.programs.tracer_links().iter().zip(&tracers::TRACERS) {
            pins.push((self.pin_dir.join(tracer.pin), link.try_clone()?));
        }
        for (name, path) in programs::shared_pins(&self.pin_dir) {
            // The log ring buffer belongs to the log reader once it runs.
            if let Some(fd) = self.programs.map_fd(name) {
                pins.push((path, fd.try_clone_to_owned()?));
            }
        }
        for (name, _) in names::POLICY_MAPS {
            pins.push((
                self.pin_dir.join(name),
                self.current.map(name).fd().as_fd().try_clone_to_owned()?,
            ));
        }
        Ok(pins)
    }

    /// Pins again what was unpinned since (the pin directory removed, say), before a reload
    /// pins anything new.
    fn restore_pins(&self) -> Result<(), KernelError> {
        let fail = |e: std::io::Error| KernelError::Pin {
            path: self.pin_dir.clone(),
            source: e.into(),
        };
        let restored = repin(&self.pin_dir, &self.pins().map_err(fail)?).map_err(fail)?;
        if !restored.is_empty() {
            tracing::warn!(
                "{} of this run's pins in {} were gone: pinned again",
                restored.len(),
                self.pin_dir.display()
            );
        }
        Ok(())
    }

    /// Governs the cgroup made again at this enforcer's path (the one it governed is gone, and
    /// its links with it): new links with the programs in force, pinned in place of the old
    /// ones. On error nothing changed.
    pub fn rebind(&mut self) -> Result<(), KernelError> {
        let mut undo = Undo::default();
        let none = HOOKS.iter().map(|_| None).collect();
        let links = put_in_links(&self.programs, none, &self.cgroup, &self.pin_dir, &mut undo)?;
        undo.commit();
        for old in std::mem::replace(&mut self.links, links) {
            // Defunct already (their cgroup is gone); detaching only frees them sooner.
            let _ = sys::link_detach(old.as_fd());
        }
        Ok(())
    }

    /// A reader of the programs' log events (aya-log).
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(self.programs.ebpf_mut())
    }

    /// The event stream's ring buffer (taken: one reader), and the programs' count of the
    /// events they did not write.
    pub fn events(&mut self) -> Result<(EventRing, Option<EventDrops>), aya::maps::MapError> {
        let map = self
            .programs
            .ebpf_mut()
            .take_map(tcpmgm_common::names::EVENTS)
            .ok_or_else(|| aya::maps::MapError::InvalidName {
                name: tcpmgm_common::names::EVENTS.into(),
            })?;
        let ring = aya::maps::RingBuf::try_from(map)?;
        let drops = aya::maps::MapData::from_pin(self.pin_dir.join(tcpmgm_common::EVENT_DROPS_PIN))
            .ok()
            .and_then(|m| aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(m)).ok());
        Ok((ring, drops))
    }

    /// Why the outcome tracers are not attached (see `tracers`), if they are not.
    pub fn tracers_missing(&self) -> Option<&str> {
        self.programs.tracers_missing()
    }

    /// Whether `attach` took over links an earlier run had pinned.
    pub fn adopted(&self) -> bool {
        self.adopted
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
                what: "detaching it",
                needs: Some(features::LINK_DETACH),
                source: e.into(),
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
            needs: hook.needs,
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

/// Whether this kernel batch-updates LPM tries (tried on a map of one entry).
pub fn lpm_batch_supported() -> std::io::Result<bool> {
    use aya::maps::IterableMap as _;
    use aya::maps::lpm_trie::LpmTrie;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let trie = LpmTrie::<aya::maps::MapData, [u8; 4], u32>::create(1, BPF_F_NO_PREALLOC)
        .map_err(std::io::Error::other)?;
    let key = [8u32.to_ne_bytes(), [10, 0, 0, 0]].concat();
    sys::update_batch(trie.map().fd().as_fd(), &key, &1u32.to_ne_bytes(), 1, 8, 4)
        .map_err(std::io::Error::other)
}

/// A `KernelError::Map` about `map`, doing `what`, for the cause it is given.
fn fail<E: Into<Cause>>(map: &'static str, what: &str) -> impl FnOnce(E) -> KernelError {
    let what = what.to_owned();
    move |e| KernelError::Map {
        map,
        what,
        source: e.into(),
    }
}
