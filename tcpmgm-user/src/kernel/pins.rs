//! The pin directory: the links an earlier run pinned (to adopt), pins of older layouts, and
//! pinning again what was removed.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use tcpmgm_common::names;

use super::{HOOKS, KernelError, fault, sys};

/// Removes pins of names this version does not use (left by an older layout), now that the
/// current ones are in place.
pub(super) fn remove_stale_pins(dir: &Path) {
    let keep = |name: &str| {
        names::POLICY_MAPS.iter().any(|(map, _)| *map == name)
            || HOOKS.iter().any(|h| h.pin == name || h.program_pin == name)
            || super::programs::shared_pins(dir)
                .iter()
                .any(|(_, pin)| pin.file_name().is_some_and(|p| p == name))
            || name == tcpmgm_common::SWEEP_STATS_PIN
            || tracer_pin(name)
    };
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("TCPMGM_") && !keep(&name) {
            tracing::info!("removing {}, a pin of an older layout", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether `name` is an outcome tracer's link pin: kept while this run's tracers are attached
/// (their pins replace an earlier run's), removed by `remove_stale_pins` otherwise.
fn tracer_pin(name: &str) -> bool {
    super::programs::TRACED.load(std::sync::atomic::Ordering::Relaxed)
        && super::tracers::TRACERS.iter().any(|t| t.pin == name)
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
        sys::obj_pin(fd.as_fd(), path)?;
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
                what: "detaching it (BPF_LINK_DETACH, needs Linux 5.9)",
                reason: e.to_string(),
            })?;
        }
    }
    remove_pins(dir);
    Ok(found)
}
