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

use crate::policy::compile::Enforcement;
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

    /// Whether `rule` asks for this column's enforcement.
    fn asked_by(self, rule: &Rule, enforcement: &Enforcement) -> bool {
        match self {
            Column::ConLifetime => enforcement.con_lifetime(rule.profile.con_lifetime_s),
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

/// A kernel feature tcpmgm uses, declared once: its name as `tcpmgm features` and the README's
/// kernel table show it, a short name for messages, and what provides it. The probes, the
/// report and every "needs" message take them from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeature {
    pub name: &'static str,
    pub short: &'static str,
    pub provided_by: &'static str,
}

impl KernelFeature {
    /// "SHORT, needs PROVIDER", for an error that this feature may be missing behind.
    pub fn needs(&self) -> String {
        format!("{}, needs {}", self.short, self.provided_by)
    }
}

/// The kernel release tcpmgm is tested on and after (Debian 11's); older ones may lack what the
/// programs take for granted beyond the features declared here.
pub const TESTED_FROM: &str = "Linux 5.10";

pub const SOCK_OPS: KernelFeature = KernelFeature {
    name: "BPF_PROG_TYPE_SOCK_OPS",
    short: "BPF_PROG_TYPE_SOCK_OPS",
    provided_by: "Linux 4.13",
};
pub const SETSOCKOPT_HELPER: KernelFeature = KernelFeature {
    name: "bpf_setsockopt() from sock_ops",
    short: "bpf_setsockopt()",
    provided_by: "Linux 4.13",
};
pub const SK_STORAGE: KernelFeature = KernelFeature {
    name: "BPF_MAP_TYPE_SK_STORAGE (one decision per socket)",
    short: "BPF_MAP_TYPE_SK_STORAGE",
    provided_by: "Linux 5.2",
};
pub const SOCK_OPS_STORAGE: KernelFeature = KernelFeature {
    name: "bpf_sk_storage_get() from sock_ops (the socket's record)",
    short: "bpf_sk_storage_get() from sock_ops",
    provided_by: "Linux 5.3",
};
pub const LPM_TRIE: KernelFeature = KernelFeature {
    name: "BPF_MAP_TYPE_LPM_TRIE",
    short: "BPF_MAP_TYPE_LPM_TRIE",
    provided_by: "Linux 4.11",
};
pub const ARRAY_OF_MAPS: KernelFeature = KernelFeature {
    name: "BPF_MAP_TYPE_ARRAY_OF_MAPS (switching rule sets in one step)",
    short: "BPF_MAP_TYPE_ARRAY_OF_MAPS",
    provided_by: "Linux 4.12",
};
pub const RINGBUF: KernelFeature = KernelFeature {
    name: "BPF_MAP_TYPE_RINGBUF (the programs' log events)",
    short: "BPF_MAP_TYPE_RINGBUF",
    provided_by: "Linux 5.8",
};
pub const LINK_CREATE: KernelFeature = KernelFeature {
    name: "cgroup bpf_links (BPF_LINK_CREATE)",
    short: "BPF_LINK_CREATE",
    provided_by: "Linux 5.7",
};
pub const LINK_UPDATE: KernelFeature = KernelFeature {
    name: "BPF_LINK_UPDATE (a restart adopts the pinned links)",
    short: "BPF_LINK_UPDATE",
    provided_by: "Linux 5.7",
};
pub const LINK_DETACH: KernelFeature = KernelFeature {
    name: "BPF_LINK_DETACH (tcpmgm detach)",
    short: "BPF_LINK_DETACH",
    provided_by: "Linux 5.9",
};
pub const SOCK_ADDR: KernelFeature = KernelFeature {
    name: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR (connect4, connect6: outbound sockets decided, no_new_conn)",
    short: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR",
    provided_by: "Linux 4.17",
};
pub const SOCKOPT: KernelFeature = KernelFeature {
    name: "BPF_PROG_TYPE_CGROUP_SOCKOPT (the rule's options held against the application's, connect_timeout)",
    short: "BPF_PROG_TYPE_CGROUP_SOCKOPT",
    provided_by: "Linux 5.3",
};
pub const PIDFD_GETFD: KernelFeature = KernelFeature {
    name: "pidfd_getfd()",
    short: "the pidfd_getfd system call",
    provided_by: "Linux 5.6",
};
pub const UNPRIVILEGED_BPF: KernelFeature = KernelFeature {
    name: "bpf() lookups by users without CAP_BPF",
    short: "bpf() without CAP_BPF",
    provided_by: "Linux 6.5 and some stable kernels, or kernel.unprivileged_bpf_disabled=0",
};
pub const LPM_BATCH: KernelFeature = KernelFeature {
    name: "batch updates of LPM tries",
    short: "batch updates of LPM tries",
    provided_by: "newer kernels than 5.10",
};
pub const MEMCG: KernelFeature = KernelFeature {
    name: "BPF memory charged to the cgroup",
    short: "BPF memory charged to the cgroup",
    provided_by: "Linux 5.11",
};
pub const SOCK_DESTROY: KernelFeature = KernelFeature {
    name: "SOCK_DESTROY through sock_diag",
    short: "SOCK_DESTROY",
    provided_by: "CONFIG_INET_DIAG_DESTROY",
};
pub const VERIFIED: KernelFeature = KernelFeature {
    name: "tcpmgm's programs pass the verifier",
    short: "the verifier",
    provided_by: "",
};
pub const TRACERS: KernelFeature = KernelFeature {
    name: "outcome tracers (a reset by the peer, an abort on this host and unanswered keepalive probes told apart)",
    short: "BTF tracing programs (fentry, tp_btf) that read socket storage",
    provided_by: "Linux 5.11, with the kernel's BTF in /sys/kernel/btf/vmlinux",
};

fn feature(of: &KernelFeature, need: Need, probe: Result<bool, String>) -> Feature {
    let KernelFeature {
        name, provided_by, ..
    } = *of;
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
    match super::sys::bpf(cmd, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(format!("unexpected answer: {e}")),
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
    // SAFETY: the child makes system calls only, then _exits.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        // SAFETY: raw system calls on this function's own buffers, then _exit: nothing the
        // parent's other threads held is touched.
        ForkResult::Child => unsafe {
            // _LINUX_CAPABILITY_VERSION_3, this process; then no capability in any set.
            let header: [u32; 2] = [0x2008_0522, 0];
            let data = [0u32; 6];
            if libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) != 0 {
                libc::_exit(2);
            }
            let path = c"/sys/fs/bpf/tcpmgm-probe-nonexistent";
            // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags. (`sys::bpf` is the
            // system call and its errno: nothing allocates in the child.)
            let mut attr: [u64; 2] = [path.as_ptr() as u64, 0];
            let refused = matches!(
                super::sys::bpf(BPF_OBJ_GET, &mut attr),
                Err(e) if e.raw_os_error() == Some(libc::EPERM)
            );
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
        feature(&SOCK_OPS, Core, program(ProgramType::SockOps)),
        feature(
            &SETSOCKOPT_HELPER,
            Core,
            helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_setsockopt),
        ),
        feature(&SK_STORAGE, Core, map(MapType::SkStorage)),
        feature(
            &SOCK_OPS_STORAGE,
            Core,
            helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
        ),
        feature(&LPM_TRIE, Core, map(MapType::LpmTrie)),
        feature(&ARRAY_OF_MAPS, Core, map(MapType::ArrayOfMaps)),
        feature(&RINGBUF, Core, map(MapType::RingBuf)),
        feature(&LINK_CREATE, Core, command(BPF_LINK_CREATE, 0)),
        feature(&LINK_UPDATE, Core, command(BPF_LINK_UPDATE, 0)),
        feature(&LINK_DETACH, Core, command(BPF_LINK_DETACH, 0)),
        feature(&SOCK_ADDR, Core, program(ProgramType::CgroupSockAddr)),
        feature(&SOCKOPT, Core, program(ProgramType::CgroupSockopt)),
    ];
    found.extend_from_slice(column_features());
    found.extend([
        feature(&PIDFD_GETFD, Option("--reapply-existing"), pidfd_getfd()),
        feature(&UNPRIVILEGED_BPF, Option("--api-group"), unprivileged_bpf()),
        feature(
            &LPM_BATCH,
            Speed("the prefix tries are filled one entry at a time"),
            crate::kernel::lpm_batch_supported().map_err(|e| e.to_string()),
        ),
        feature(
            &MEMCG,
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
            &SOCK_DESTROY,
            Need::Column(Column::ConLifetime),
            sock_destroy(),
        )]
    })
}

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
        feature(&VERIFIED, Need::Core, result.map(|_| true)),
        feature(
            &TRACERS,
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

/// The rules' columns that `features` cannot enforce, as `enforcement` enforces them.
pub fn unenforceable(
    rules: &[Rule],
    features: &[Feature],
    enforcement: &Enforcement,
) -> Vec<Unenforceable> {
    let mut out = Vec::new();
    for f in features.iter().filter(|f| !f.supported) {
        let Need::Column(column) = f.need else {
            continue;
        };
        for rule in rules.iter().filter(|r| column.asked_by(r, enforcement)) {
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
