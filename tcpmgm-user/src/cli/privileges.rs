//! What `run` checks of its own privileges before it acts: the capabilities it always needs,
//! those its options need, and `--api-group`'s group.
use crate::system::SystemError;

/// Capability numbers from linux/capability.h.
const CAP_CHOWN: u32 = 0;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What `run` needs in any case: loading the programs (CAP_BPF; CAP_PERFMON, without which the
/// verifier refuses their pointer arithmetic as Spectre-unsafe), attaching them to a cgroup and
/// closing sockets through sock_diag (CAP_NET_ADMIN).
const ALWAYS: [(u32, &str); 3] = [
    (CAP_BPF, "CAP_BPF"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_PERFMON, "CAP_PERFMON"),
];

/// The options of `run` that need more: entering another network namespace (`--netns`), and
/// reading the cgroup's processes' descriptors to borrow their sockets (`--reapply-existing`:
/// /proc/PID/fd of another user, pidfd_getfd).
pub fn option_capabilities(
    netns: bool,
    reapply_existing: bool,
) -> Vec<(&'static str, u32, &'static str)> {
    let mut extra = Vec::new();
    if netns {
        extra.push(("--netns", CAP_SYS_ADMIN, "CAP_SYS_ADMIN"));
    }
    if reapply_existing {
        extra.push(("--reapply-existing", CAP_SYS_PTRACE, "CAP_SYS_PTRACE"));
        extra.push((
            "--reapply-existing",
            CAP_DAC_READ_SEARCH,
            "CAP_DAC_READ_SEARCH",
        ));
    }
    extra
}

/// A group given by name or number.
pub fn group_id(group: &str) -> Result<u32, SystemError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(SystemError::NoSuchGroup {
            group: group.to_owned(),
            reason: "there is no such group".into(),
        }),
        Err(e) => Err(SystemError::NoSuchGroup {
            group: group.to_owned(),
            reason: format!("looking the group up: {e}"),
        }),
    }
}

/// `--api-group` hands the records' pin to the group: that needs CAP_CHOWN, or this process
/// being a member of the group (systemd: `SupplementaryGroups=` in the unit).
pub fn check_api_group(gid: u32) -> Result<(), SystemError> {
    let member = nix::unistd::getegid().as_raw() == gid
        || nix::unistd::getgroups()
            .unwrap_or_default()
            .iter()
            .any(|g| g.as_raw() == gid);
    if member || effective_capabilities()? & (1 << CAP_CHOWN) != 0 {
        Ok(())
    } else {
        Err(SystemError::OptionNotPrivileged(format!(
            "--api-group {gid} needs CAP_CHOWN, or this process in group {gid} \
             (SupplementaryGroups= in the unit)"
        )))
    }
}

/// This process's effective capabilities, as a bit mask.
fn effective_capabilities() -> Result<u64, SystemError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| SystemError::Read {
            path: "/proc/self/status".into(),
            source,
        })?;
    Ok(status
        .lines()
        .find_map(|l| u64::from_str_radix(l.strip_prefix("CapEff:")?.trim(), 16).ok())
        .unwrap_or(0))
}

/// Refuses early, with what is missing, when this process cannot load and attach programs, or
/// lacks what an option it was given needs (`option_capabilities`).
pub fn check_privileges(options: &[(&'static str, u32, &'static str)]) -> Result<(), SystemError> {
    let effective = effective_capabilities()?;
    let has = |bit: u32| effective & (1 << bit) != 0;
    let missing: Vec<&str> = ALWAYS
        .into_iter()
        .filter(|(bit, _)| !has(*bit))
        .map(|(_, name)| name)
        .collect();
    if !missing.is_empty() {
        return Err(SystemError::NotPrivileged(format!(
            "uid {} without {}",
            nix::unistd::Uid::effective(),
            missing.join(", ")
        )));
    }
    let mut missing: Vec<String> = options
        .iter()
        .filter(|(_, bit, _)| !has(*bit))
        .map(|(option, _, name)| format!("{option} needs {name}"))
        .collect();
    if options
        .iter()
        .any(|(option, ..)| *option == "--reapply-existing")
    {
        missing.extend(pidfd_getfd_refused());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SystemError::OptionNotPrivileged(missing.join(", ")))
    }
}

/// Why this process may not call pidfd_getfd(), if it may not.
fn pidfd_getfd_refused() -> Option<String> {
    match crate::kernel::features::pidfd_getfd_refusal()? {
        libc::ENOSYS => Some(format!(
            "--reapply-existing needs {}",
            crate::kernel::features::PIDFD_GETFD.needs()
        )),
        e => Some(format!(
            "--reapply-existing needs the pidfd_getfd system call, which a system-call filter \
             refuses ({}; under systemd add SystemCallFilter=pidfd_getfd)",
            std::io::Error::from_raw_os_error(e)
        )),
    }
}
