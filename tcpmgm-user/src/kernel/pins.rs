//! The pin directory: the links an earlier run pinned (to adopt), pins of older layouts, and
//! pinning again what was removed.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use tcpmgm_common::names;

use super::{Cause, HOOKS, KernelError, fault, sys};
use crate::system::SystemError;

/// Removes pins of names this version does not use (left by an older layout), now that the
/// current ones are in place.
pub(super) fn remove_stale_pins(dir: &Path, traced: bool) {
    let keep = |name: &str| {
        names::POLICY_MAPS.iter().any(|(map, _)| *map == name)
            || HOOKS.iter().any(|h| h.pin == name || h.program_pin == name)
            || super::programs::shared_pins(dir)
                .iter()
                .any(|(_, pin)| pin.file_name().is_some_and(|p| p == name))
            || name == tcpmgm_common::SWEEP_STATS_PIN
            || (traced && super::tracers::TRACERS.iter().any(|t| t.pin == name))
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
/// (removed and perhaps made again: its programs run for nothing) is left for a new attachment,
/// whose pin replaces its own; a link that holds another cgroup is an error, as a pin directory
/// is one cgroup's.
pub(super) fn adopt_links(dir: &Path, cgroup: &Path) -> Result<Vec<Option<OwnedFd>>, KernelError> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(cgroup)
        .map_err(|source| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?
        .ino();
    let links = pinned_links(dir)?;
    let mut adopted = Vec::new();
    // Every cgroup of the tree, walked once, and only when a link names another cgroup.
    let live = std::cell::OnceCell::new();
    for (hook, link) in HOOKS.iter().zip(links) {
        let Some((fd, info)) = link else {
            adopted.push(None);
            continue;
        };
        // The kernel clears a link's cgroup when it releases the cgroup, some time after its
        // rmdir: until then the link names a cgroup no directory holds any more.
        let gone = info.cgroup_id == 0
            || (info.cgroup_id != want
                && live
                    .get_or_init(|| {
                        crate::system::cgroup2_root()
                            .ok()
                            .and_then(|root| crate::system::Subtree::of(&root).ok())
                    })
                    .as_ref()
                    .is_some_and(|all| !all.contains(Some(info.cgroup_id))));
        if gone {
            tracing::warn!(
                "the pinned {} link's cgroup is gone; attaching anew to {}",
                hook.name,
                cgroup.display()
            );
            adopted.push(None);
            continue;
        }
        if info.cgroup_id != want {
            return Err(KernelError::Pin {
                path: dir.to_path_buf(),
                source: format!(
                    "its links belong to cgroup id {}, not to {} (id {want}); each cgroup needs a pin directory of its own",
                    info.cgroup_id,
                    cgroup.display()
                )
                .into(),
            });
        }
        adopted.push(Some(fd));
    }
    Ok(adopted)
}

/// Opens the links pinned in `dir`, in `HOOKS` order, with what the kernel says of each.
pub(super) fn pinned_links(
    dir: &Path,
) -> Result<Vec<Option<(OwnedFd, sys::CgroupLink)>>, KernelError> {
    HOOKS
        .iter()
        .map(|hook| {
            let path = dir.join(hook.pin);
            if !path.exists() {
                return Ok(None);
            }
            let fail = |what: &'static str, source: Cause| KernelError::Link {
                program: hook.name,
                what,
                needs: None,
                source,
            };
            let fd = sys::obj_get(&path).map_err(|e| fail("opening its pin", e.into()))?;
            let info = sys::link_info(fd.as_fd()).map_err(|e| fail("reading it", e.into()))?;
            Ok(Some((fd, info)))
        })
        .collect()
}

/// Removes every pin of tcpmgm's in `dir`, then `dir` if empty.
pub(super) fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("TCPMGM_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Pins each object of `pins` whose path is missing (making `pin_dir` again if it is gone).
/// Returns the paths pinned again.
pub fn repin(pin_dir: &Path, pins: &[(PathBuf, OwnedFd)]) -> std::io::Result<Vec<PathBuf>> {
    let missing: Vec<&(PathBuf, OwnedFd)> = pins.iter().filter(|(p, _)| !p.exists()).collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(pin_dir)?;
    let mut done = Vec::new();
    for (path, fd) in missing {
        fault::point("repin")?;
        sys::obj_pin(fd.as_fd(), path).map_err(std::io::Error::other)?;
        done.push(path.clone());
    }
    Ok(done)
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
                what: "detaching it",
                needs: Some(super::features::LINK_DETACH),
                source: e.into(),
            })?;
        }
    }
    remove_pins(dir);
    Ok(found)
}

/// `--api-group`: the group may open the per-socket records read-only (the pin 0640, its
/// directory 0710, both of the group), and nothing else: the other pins stay root's, and the
/// directories above (up to bpffs's root) only let others pass through (o+x). Returns what
/// still keeps the group out, as warnings.
pub fn share_records(pin_dir: &Path, gid: u32) -> Result<Vec<String>, SystemError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| SystemError::Read {
            path: path.clone(),
            source: std::io::Error::from(e),
        }
    };
    let group = Some(nix::unistd::Gid::from_raw(gid));
    let pin = pin_dir.join(super::SOCKETS_PIN);
    for (path, mode) in [(pin_dir, 0o710), (pin.as_path(), 0o640)] {
        nix::unistd::chown(path, None, group).map_err(fail(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| SystemError::Read {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    let mut warnings = Vec::new();
    let root = crate::system::mounts_of("bpf")?
        .into_iter()
        .filter(|m| pin_dir.starts_with(m))
        .max_by_key(|m| m.as_os_str().len());
    for dir in pin_dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            break;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if Some(dir) == root.as_deref() {
            if mode & 0o001 == 0 {
                warnings.push(format!(
                    "bpffs's root {} is mode {mode:o}: only root passes through it (systemd \
                     mounts it 0700), so the group cannot reach the records; let others pass \
                     (chmod o+x {}, or mount bpffs with mode=0711)",
                    dir.display(),
                    dir.display()
                ));
            }
            break;
        }
        if mode & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001)).map_err(
                |source| SystemError::Read {
                    path: dir.to_path_buf(),
                    source,
                },
            )?;
        }
    }
    match super::features::unprivileged_bpf() {
        Ok(true) => {}
        Ok(false) => warnings.push(format!(
            "this kernel refuses bpf() to processes without CAP_BPF while \
             kernel.unprivileged_bpf_disabled is set: the group's members need CAP_BPF, or {}",
            super::features::UNPRIVILEGED_BPF.provided_by
        )),
        Err(e) => warnings.push(e),
    }
    Ok(warnings)
}

/// Without `--api-group`, the records are root's alone again (an earlier run may have shared
/// them).
pub fn unshare_records(pin_dir: &Path) -> Result<(), SystemError> {
    use std::os::unix::fs::PermissionsExt;
    let pin = pin_dir.join(super::SOCKETS_PIN);
    for (path, mode) in [(pin_dir, 0o700), (pin.as_path(), 0o600)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| SystemError::Read {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(())
}
