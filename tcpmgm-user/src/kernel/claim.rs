//! One daemon per cgroup, decided before anything in the kernel changes.
//!
//! A run claims its cgroup by taking an exclusive flock on the cgroup's own directory: the lock
//! is keyed by the cgroup itself (whatever path or control socket the run was given), the
//! kernel drops it when the process ends however it ends, and a cgroup made again at the same
//! path is a new directory with a lock of its own. Then it looks at what tcpmgm has attached to
//! the cgroup from elsewhere: links pinned in another pin directory on the same cgroup belong
//! to another policy, and taking the cgroup over from there is the operator's decision (run
//! with that pin directory, or detach it first), never a side effect.
use std::fs::File;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::{HOOKS, sys};

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("opening cgroup {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another tcpmgm run{pid} governs cgroup {path} (it holds the cgroup's lock); one daemon per cgroup: reload or stop that one instead"
    )]
    Taken { path: PathBuf, pid: String },
    #[error("locking cgroup {path} (flock): {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cgroup {cgroup} already has tcpmgm's programs attached through the links pinned in {other}; run with --pin-dir {other} to take that policy over, or remove it first with `tcpmgm detach --pin-dir {other}`"
    )]
    Foreign { cgroup: PathBuf, other: PathBuf },
}

/// A cgroup claimed by this process, for as long as the value lives.
#[derive(Debug)]
pub struct Claim {
    _locked: nix::fcntl::Flock<File>,
    /// The cgroup directory's inode number: the cgroup id links report.
    pub cgroup_id: u64,
}

/// Claims `cgroup` for a run pinning in `pin_dir` under the bpffs mount `bpffs`.
pub fn claim(cgroup: &Path, pin_dir: &Path, bpffs: &Path) -> Result<Claim, ClaimError> {
    let dir = File::open(cgroup).map_err(|source| ClaimError::Open {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let cgroup_id = dir
        .metadata()
        .map_err(|source| ClaimError::Open {
            path: cgroup.to_path_buf(),
            source,
        })?
        .ino();
    let locked = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| taken_or(cgroup, cgroup_id, e))?;
    if let Some(other) = foreign_pins(bpffs, pin_dir, cgroup_id) {
        return Err(ClaimError::Foreign {
            cgroup: cgroup.to_path_buf(),
            other,
        });
    }
    Ok(Claim {
        _locked: locked,
        cgroup_id,
    })
}

fn taken_or(cgroup: &Path, cgroup_id: u64, e: nix::errno::Errno) -> ClaimError {
    if e == nix::errno::Errno::EWOULDBLOCK {
        ClaimError::Taken {
            path: cgroup.to_path_buf(),
            pid: lock_holder(cgroup_id).map_or(String::new(), |pid| format!(" (pid {pid})")),
        }
    } else {
        ClaimError::Lock {
            path: cgroup.to_path_buf(),
            source: e.into(),
        }
    }
}

/// The pid holding a flock on the inode `ino`, from /proc/locks (best effort: for the message).
fn lock_holder(ino: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; waiters carry "->" and hold nothing.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let inode = fields.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (inode == ino).then(|| fields.get(4)?.parse().ok())?
    })
}

/// A pin directory under `bpffs`, other than `own`, whose pinned links hold cgroup `cgroup_id`.
fn foreign_pins(bpffs: &Path, own: &Path, cgroup_id: u64) -> Option<PathBuf> {
    let own = std::fs::canonicalize(own).unwrap_or_else(|_| own.to_path_buf());
    let mut dirs = vec![(bpffs.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                // Pin directories are a level or two below the mount (tcpmgm/<slug>); others'
                // trees (cilium, systemd) are not walked far.
                if depth < 4 {
                    dirs.push((path, depth + 1));
                }
                continue;
            }
            if dir == own || !HOOKS.iter().any(|h| entry.file_name() == h.pin) {
                continue;
            }
            let holds = sys::obj_get(&path)
                .and_then(|fd| sys::link_info(fd.as_fd()))
                .is_ok_and(|info| info.cgroup_id == cgroup_id);
            if holds {
                return Some(dir);
            }
        }
    }
    None
}
