//! What the running kernel offers of what tcpmgm uses (`tcpmgm features`), found by probing it
//! (loading tiny programs, creating maps, calling the syscalls) rather than from its version.
//!
//! Each feature says what it is for: tcpmgm itself (without it, `run` cannot start), a column
//! of the table (rules that set it cannot be enforced: `check` and `run` name them), an option
//! of `run`, or a faster path with a slower one in its place. `run` and `check` ask only the
//! cheap probes; `tcpmgm features` also loads the programs themselves.
use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};
use serde::Serialize;

use crate::policy::rule::Rule;

/// Who needs a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// tcpmgm cannot run without it.
    Core,
    /// Rules whose column asks for it (see `Column`).
    Column(Column),
    /// An option of `run`.
    Option(&'static str),
    /// A faster way; without it tcpmgm takes a slower one.
    Speed(&'static str),
    /// What tcpmgm can tell; without it, it tells less (what, then).
    Insight(&'static str),
}

/// The columns whose enforcement depends on more than the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Column {
    ConLifetime,
}

impl Column {
    pub fn name(self) -> &'static str {
        match self {
            Column::ConLifetime => "con_lifetime",
        }
    }

    /// Whether `rule` asks for this column's enforcement (`enforce_default_lifetime`: also
    /// where it keeps OpenSIPS's default).
    fn asked_by(self, rule: &Rule, enforce_default_lifetime: bool) -> bool {
        match self {
            Column::ConLifetime => crate::daemon::lifetime::enforced(
                rule.profile.con_lifetime_s,
                enforce_default_lifetime,
            ),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// What provides it: a kernel version, a configuration option.
    pub provided_by: &'static str,
    pub need: Need,
    pub supported: bool,
    /// Why not, or what else was learnt.
    pub detail: String,
}

fn feature(
    name: &'static str,
    provided_by: &'static str,
    need: Need,
    probe: Result<bool, String>,
) -> Feature {
    let (supported, detail) = match probe {
        Ok(ok) => (ok, String::new()),
        Err(e) => (false, e),
    };
    Feature {
        name,
        provided_by,
        need,
        supported,
        detail,
    }
}

fn program(t: ProgramType) -> Result<bool, String> {
    is_program_supported(t).map_err(|e| e.to_string())
}

fn map(t: MapType) -> Result<bool, String> {
    is_map_supported(t).map_err(|e| e.to_string())
}

fn helper(t: ProgramType, h: BpfHelper) -> Result<bool, String> {
    is_helper_supported(t, h).map_err(|e| e.to_string())
}

/// A bpf(2) command the kernel knows: called with a descriptor that is never valid (at word
/// `fd_word` of an otherwise zero bpf_attr), it answers EBADF, where an unknown command answers
/// EINVAL.
fn command(cmd: bpf_cmd, fd_word: usize) -> Result<bool, String> {
    let mut attr = [0u32; 16];
    attr[fd_word] = u32::MAX;
    // SAFETY: a bpf_attr-sized buffer the kernel only reads.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    match std::io::Error::last_os_error().raw_os_error() {
        _ if r >= 0 => Ok(true),
        Some(libc::EBADF) => Ok(true),
        Some(libc::EINVAL) => Ok(false),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Whether this process may call pidfd_getfd() (Linux 5.6): None when it may, else the errno
/// it gets. Called on a descriptor that is never valid, the system call answers EBADF when it
/// runs at all; ENOSYS where the kernel lacks it; a seccomp filter (systemd's
/// `SystemCallFilter=@system-service` leaves it out up to systemd 252 at least) answers first.
pub fn pidfd_getfd_refusal() -> Option<i32> {
    // SAFETY: pidfd_getfd on a descriptor that is never valid changes nothing.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0) };
    match std::io::Error::last_os_error().raw_os_error() {
        _ if r >= 0 => None,
        Some(libc::EBADF) | None => None,
        Some(e) => Some(e),
    }
}

fn pidfd_getfd() -> Result<bool, String> {
    match pidfd_getfd_refusal() {
        None => Ok(true),
        Some(libc::ENOSYS) => Ok(false),
        Some(e) => Err(format!(
            "refused to tcpmgm by a system-call filter: {}",
            std::io::Error::from_raw_os_error(e)
        )),
    }
}

/// SOCK_DESTROY through sock_diag, tried on a listening socket of our own.
fn sock_destroy() -> Result<bool, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let sockets = crate::kernel::diag::tcp_sockets(None)
        .map_err(|e| format!("sock_diag (inet_diag and tcp_diag loaded?): {e}"))?;
    let Some(ours) = sockets.iter().find(|s| s.local == local) else {
        return Err("sock_diag did not list a socket just opened".into());
    };
    match crate::kernel::diag::destroy(ours) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> Result<(u32, u32), String> {
    let release = nix::sys::utsname::uname()
        .map_err(|e| e.to_string())?
        .release()
        .to_string_lossy()
        .into_owned();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

/// Whether BPF memory is charged to the cgroup (Linux 5.11) rather than to RLIMIT_MEMLOCK.
fn memcg_accounting() -> Result<bool, String> {
    Ok(kernel_version()? >= (5, 11))
}

/// The RLIMIT_MEMLOCK that bounds this process's BPF maps: Some(bytes) on a kernel that charges
/// them to it (before 5.11) while the limit is finite, None otherwise.
pub(crate) fn memlock_bound() -> Option<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    if memcg_accounting().ok()? {
        return None;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).ok()?;
    (soft != RLIM_INFINITY).then_some(soft)
}

/// Whether a process without CAP_BPF may open a pinned map and look it up (what the members of
/// `--api-group` do). Older kernels refuse every bpf() command to such processes while
/// kernel.unprivileged_bpf_disabled is set (Debian sets it); Linux 6.5, and stable kernels that
/// took the change, refuse only the commands that create programs and maps. Tried: a child
/// drops every capability and asks for a pin that does not exist (EPERM: refused; ENOENT: let
/// through).
pub fn unprivileged_bpf() -> Result<bool, String> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    // SAFETY: the child makes raw system calls only, then _exits.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => unsafe {
            // _LINUX_CAPABILITY_VERSION_3, this process; then no capability in any set.
            let header: [u32; 2] = [0x2008_0522, 0];
            let data = [0u32; 6];
            if libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) != 0 {
                libc::_exit(2);
            }
            let path = c"/sys/fs/bpf/tcpmgm-probe-nonexistent";
            // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
            let attr: [u64; 2] = [path.as_ptr() as u64, 0];
            let r = libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET as libc::c_long,
                attr.as_ptr(),
                16,
            );
            let refused = r < 0 && *libc::__errno_location() == libc::EPERM;
            libc::_exit(i32::from(refused));
        },
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(true),
            Ok(WaitStatus::Exited(_, 1)) => Ok(false),
            other => Err(format!("the probe ended as {other:?}")),
        },
    }
}

// The command numbers of `enum bpf_cmd`, from aya's bindings of include/uapi/linux/bpf.h.
use aya_obj::generated::bpf_cmd::{
    self, BPF_LINK_CREATE, BPF_LINK_DETACH, BPF_LINK_UPDATE, BPF_OBJ_GET,
};

/// Probes everything but the programs themselves (see `programs_load`).
pub fn probe() -> Vec<Feature> {
    use Need::*;
    let mut found = vec![
        feature(
            "BPF_PROG_TYPE_SOCK_OPS",
            "Linux 4.13",
            Core,
            program(ProgramType::SockOps),
        ),
        feature(
            "bpf_setsockopt() from sock_ops",
            "Linux 4.13",
            Core,
            helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_setsockopt),
        ),
        feature(
            "BPF_MAP_TYPE_SK_STORAGE (one decision per socket)",
            "Linux 5.2",
            Core,
            map(MapType::SkStorage),
        ),
        feature(
            "BPF_MAP_TYPE_LPM_TRIE",
            "Linux 4.11",
            Core,
            map(MapType::LpmTrie),
        ),
        feature(
            "BPF_MAP_TYPE_ARRAY_OF_MAPS (switching rule sets in one step)",
            "Linux 4.12",
            Core,
            map(MapType::ArrayOfMaps),
        ),
        feature(
            "BPF_MAP_TYPE_RINGBUF (the programs' log events)",
            "Linux 5.8",
            Core,
            map(MapType::RingBuf),
        ),
        feature(
            "cgroup bpf_links (BPF_LINK_CREATE)",
            "Linux 5.7",
            Core,
            command(BPF_LINK_CREATE, 0),
        ),
        feature(
            "BPF_LINK_UPDATE (a restart adopts the pinned links)",
            "Linux 5.7",
            Core,
            command(BPF_LINK_UPDATE, 0),
        ),
        feature(
            "BPF_LINK_DETACH (tcpmgm detach)",
            "Linux 5.9",
            Core,
            command(BPF_LINK_DETACH, 0),
        ),
        feature(
            "BPF_PROG_TYPE_CGROUP_SOCK_ADDR (connect4, connect6: outbound sockets decided, no_new_conn)",
            "Linux 4.17",
            Core,
            program(ProgramType::CgroupSockAddr),
        ),
        feature(
            "BPF_PROG_TYPE_CGROUP_SOCKOPT (the rule's options held against the application's, connect_timeout)",
            "Linux 5.3",
            Core,
            program(ProgramType::CgroupSockopt),
        ),
    ];
    found.extend_from_slice(column_features());
    found.extend([
        feature(
            "pidfd_getfd()",
            "Linux 5.6",
            Option("--reapply-existing"),
            pidfd_getfd(),
        ),
        feature(
            "bpf() lookups by users without CAP_BPF",
            "Linux 6.5 and some stable kernels, or kernel.unprivileged_bpf_disabled=0",
            Option("--api-group"),
            unprivileged_bpf(),
        ),
        feature(
            "batch updates of LPM tries",
            "newer kernels than 5.10",
            Speed("the prefix tries are filled one entry at a time"),
            crate::kernel::lpm_batch_supported().map_err(|e| e.to_string()),
        ),
        feature(
            "BPF memory charged to the cgroup",
            "Linux 5.11",
            Speed(
                "BPF memory counts against RLIMIT_MEMLOCK, which tcpmgm raises as far as allowed",
            ),
            memcg_accounting(),
        ),
    ]);
    found
}

/// The features some rules' columns need (what `unenforceable` reads), probed once a process:
/// the kernel does not change under a running daemon, and a reload need not probe again.
pub fn column_features() -> &'static [Feature] {
    static FOUND: std::sync::OnceLock<Vec<Feature>> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        vec![feature(
            "SOCK_DESTROY through sock_diag",
            "CONFIG_INET_DIAG_DESTROY",
            Need::Column(Column::ConLifetime),
            sock_destroy(),
        )]
    })
}

/// Loads and verifies the programs (in a pin directory of its own, removed after).
/// Loads the programs themselves (in a pin directory of its own, removed again): whether they
/// pass the verifier, and whether the outcome tracers load and attach.
pub fn programs_load() -> Vec<Feature> {
    let result = crate::system::bpffs()
        .map_err(|e| e.to_string())
        .and_then(|bpffs| {
            let dir = bpffs.join(format!("tcpmgm-features-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let mut undo = super::undo::Undo::default();
            let loaded = super::Programs::load(&dir, super::stats_capacity(0), &mut undo)
                .map(|p| p.tracers_missing().map(str::to_owned));
            drop(undo);
            let _ = std::fs::remove_dir_all(&dir);
            loaded.map_err(|e| e.to_string())
        });
    let tracers = match &result {
        Ok(None) => Ok(true),
        Ok(Some(why)) => Err(why.clone()),
        Err(_) => Err("the programs did not load".into()),
    };
    vec![
        feature(
            "tcpmgm's programs pass the verifier",
            "",
            Need::Core,
            result.map(|_| true),
        ),
        feature(
            "outcome tracers (a reset by the peer, an abort on this host and unanswered keepalive probes told apart)",
            super::tracers::NEEDS,
            Need::Insight(
                "the three are counted together as \"aborted\"; closed, timeout, connect_timeout, connect_failed and lifetime are told apart on every kernel",
            ),
            tracers,
        ),
    ]
}

#[derive(Clone, Debug)]
pub struct Unenforceable {
    pub rule_id: u32,
    pub column: Column,
    pub missing: &'static str,
    pub provided_by: &'static str,
}

impl std::fmt::Display for Unenforceable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "id {}: {}: this kernel cannot enforce it: it lacks {} ({})",
            self.rule_id,
            self.column.name(),
            self.missing,
            self.provided_by
        )
    }
}

/// Which of OpenSIPS's column defaults are enforced (see `compile::Enforcement` and
/// `lifetime::enforced`).
/// The rules' columns that `features` cannot enforce (`enforce_default_lifetime`: as
/// `run --enforce-default-lifetime`).
pub fn unenforceable(
    rules: &[Rule],
    features: &[Feature],
    enforce_default_lifetime: bool,
) -> Vec<Unenforceable> {
    let mut out = Vec::new();
    for f in features.iter().filter(|f| !f.supported) {
        let Need::Column(column) = f.need else {
            continue;
        };
        for rule in rules
            .iter()
            .filter(|r| column.asked_by(r, enforce_default_lifetime))
        {
            out.push(Unenforceable {
                rule_id: rule.id,
                column,
                missing: f.name,
                provided_by: f.provided_by,
            });
        }
    }
    out
}

/// The report `tcpmgm features` prints.
pub fn report(kernel: &str, features: &[Feature]) -> String {
    let mut out = format!("tcpmgm features of Linux {kernel}\n");
    for f in features {
        let need = match f.need {
            Need::Core => "needed by tcpmgm".to_owned(),
            Need::Column(c) => format!("needed by rules that set {}", c.name()),
            Need::Option(o) => format!("needed by {o}"),
            Need::Speed(instead) => format!("optional: without it {instead}"),
            Need::Insight(instead) => format!("optional: without it {instead}"),
        };
        let provided = if f.provided_by.is_empty() {
            String::new()
        } else {
            format!(" [{}]", f.provided_by)
        };
        out.push_str(&format!(
            "  {:<3}  {}{provided}: {need}{}\n",
            if f.supported { "yes" } else { "no" },
            f.name,
            if f.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", f.detail)
            }
        ));
    }
    let core_missing: Vec<&str> = features
        .iter()
        .filter(|f| !f.supported && f.need == Need::Core)
        .map(|f| f.name)
        .collect();
    if core_missing.is_empty() {
        let partial: Vec<String> = features
            .iter()
            .filter(|f| !f.supported)
            .filter_map(|f| match f.need {
                Need::Column(c) => Some(c.name().to_owned()),
                Need::Option(o) => Some(o.to_owned()),
                _ => None,
            })
            .collect();
        let untold = features
            .iter()
            .any(|f| !f.supported && matches!(f.need, Need::Insight(_)));
        if untold {
            out.push_str(
                "Connection outcomes: \"aborted\" stands for a reset by the peer, an abort on this host or unanswered keepalive probes, which this kernel does not let tcpmgm tell apart.\n",
            );
        }
        if partial.is_empty() {
            out.push_str("tcpmgm enforces every column of the table on this kernel.\n");
        } else {
            out.push_str(&format!(
                "tcpmgm runs on this kernel, without: {}.\n",
                partial.join(", ")
            ));
        }
    } else {
        out.push_str(&format!(
            "tcpmgm cannot run on this kernel: it lacks {}.\n",
            core_missing.join(", ")
        ));
    }
    out
}
