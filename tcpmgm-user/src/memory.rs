//! The memory this process may still use: the limits of the cgroups it runs in (cgroup v2's
//! `memory.max`, or cgroup v1's memory hierarchy), so that a table too large for them is refused
//! with a reason instead of the kernel's OOM killer ending the daemon halfway through.
use std::fmt;
use std::path::{Path, PathBuf};

/// What one rule costs, from the first row read to the policy attached: the validated rule, the
/// compiled entries, and the kernel's maps (charged to the cgroup since Linux 5.11). Measured
/// with 1M rules of one /32 each, read from SQLite: the cgroup's peak, page cache aside, was
/// 888 MB (the daemon's own peak 652 MB, the maps 396 MB), so about 890 bytes a rule; rounded
/// up for the allocator's slack.
pub const BYTES_PER_RULE: u64 = 1024;

/// Kept free besides the rules: the runtime's threads, the verifier's buffers for the programs,
/// the database driver's buffers.
pub const RESERVE: u64 = 24 << 20;

/// The tightest memory limit above this process, and where to read what is in use under it.
#[derive(Clone, Debug)]
pub struct Budget {
    /// The cgroup directory holding the limit.
    cgroup: PathBuf,
    limit: u64,
    version: Version,
}

#[derive(Clone, Copy, Debug)]
enum Version {
    V1,
    V2,
}

/// A table that does not fit.
#[derive(Debug, thiserror::Error)]
pub struct TooLarge {
    /// Rows read when the budget ran out (the table may hold more).
    pub rows: usize,
    pub needed: u64,
    pub available: u64,
    pub limit: u64,
    pub cgroup: PathBuf,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the table is too large for this process's memory limit: {} rows read would need \
             about {} MiB to compile and load, and {} MiB of the {} MiB limit of cgroup {} are \
             free (raise its memory limit, e.g. MemoryMax= of the unit, or split the table)",
            self.rows,
            mib(self.needed),
            mib(self.available),
            mib(self.limit),
            self.cgroup.display()
        )
    }
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

impl Budget {
    /// The limit of this process's cgroups, when one is set (`None`: no limit, or no memory
    /// controller).
    pub fn of_self() -> Option<Budget> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let (mount, path, version) = memory_cgroup(&own, &mounts)?;
        let mut dir = mount.join(path.trim_start_matches('/'));
        let mut tightest: Option<Budget> = None;
        // Every ancestor's limit counts; the one with the least room decides.
        loop {
            if let Some(limit) = read_limit(&dir, version) {
                let candidate = Budget {
                    cgroup: dir.clone(),
                    limit,
                    version,
                };
                let room = |b: &Budget| b.available().unwrap_or(b.limit);
                if tightest.as_ref().is_none_or(|t| room(&candidate) < room(t)) {
                    tightest = Some(candidate);
                }
            }
            if dir == mount || !dir.pop() || !dir.starts_with(&mount) {
                break;
            }
        }
        tightest
    }

    /// Bytes not yet used under the limit, page cache not counted (the kernel reclaims it).
    pub fn available(&self) -> Option<u64> {
        let (usage, stat, file) = match self.version {
            Version::V2 => ("memory.current", "memory.stat", "file"),
            Version::V1 => ("memory.usage_in_bytes", "memory.stat", "total_cache"),
        };
        let usage: u64 = std::fs::read_to_string(self.cgroup.join(usage))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cache = std::fs::read_to_string(self.cgroup.join(stat))
            .ok()
            .and_then(|s| stat_value(&s, file))
            .unwrap_or(0);
        Some(self.limit.saturating_sub(usage.saturating_sub(cache)))
    }

    /// Whether `rules` more rules (those read so far, not yet compiled) still fit.
    pub fn check(&self, rules: usize) -> Result<(), TooLarge> {
        let needed = (rules as u64)
            .saturating_mul(BYTES_PER_RULE)
            .saturating_add(RESERVE);
        let available = self.available().unwrap_or(self.limit);
        if needed > available {
            return Err(TooLarge {
                rows: rules,
                needed,
                available,
                limit: self.limit,
                cgroup: self.cgroup.clone(),
            });
        }
        Ok(())
    }
}

/// The memory controller's mount point, this process's path below it, and which version it is:
/// cgroup v2 when its tree has the controller, else the v1 hierarchy holding it.
fn memory_cgroup(own: &str, mounts: &str) -> Option<(PathBuf, String, Version)> {
    let mounts: Vec<Vec<&str>> = mounts
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let v2 = mounts.iter().find(|f| f.get(2) == Some(&"cgroup2"));
    if let Some(v2) = v2
        && let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::"))
    {
        let root = PathBuf::from(v2[1]);
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            return Some((root, path.to_owned(), Version::V2));
        }
    }
    let v1 = mounts.iter().find(|f| {
        f.get(2) == Some(&"cgroup")
            && f.get(3)
                .is_some_and(|o| o.split(',').any(|o| o == "memory"))
    })?;
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_owned())
    })?;
    Some((PathBuf::from(v1[1]), path, Version::V1))
}

/// A cgroup's own limit; `None` when it sets none. (cgroup v1 says "none" with a number near
/// 2^63.)
fn read_limit(dir: &Path, version: Version) -> Option<u64> {
    let file = match version {
        Version::V2 => "memory.max",
        Version::V1 => "memory.limit_in_bytes",
    };
    let value = std::fs::read_to_string(dir.join(file)).ok()?;
    let limit: u64 = value.trim().parse().ok()?;
    (limit < 1 << 62).then_some(limit)
}

fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Gives the memory a start or a reload freed back to the system. The allocator keeps freed
/// memory for later allocations, and a long-lived allocation made among the table's (the patch
/// index) keeps it from shrinking its heap: at a million rules the daemon then held 170 MB of
/// freed memory, four times what it uses.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_controller_is_found_in_v2_or_v1() {
        let hybrid = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,memory 0 0\n";
        let own = "12:memory:/user.slice/x\n0::/user.slice/x\n";
        // The test host's cgroup2 tree decides between the two; a v1 line is read either way.
        let (mount, path, _) = memory_cgroup(own, hybrid).unwrap();
        assert!(mount.ends_with("unified") || mount.ends_with("memory"));
        assert_eq!(path, "/user.slice/x");
        let v1_only = "cgroup /sys/fs/cgroup/memory cgroup rw,memory,nosuid 0 0\n";
        let (mount, path, version) = memory_cgroup("4:cpu:/a\n9:memory:/b/c\n", v1_only).unwrap();
        assert_eq!(
            (mount, path.as_str()),
            (PathBuf::from("/sys/fs/cgroup/memory"), "/b/c")
        );
        assert!(matches!(version, Version::V1));
        assert!(memory_cgroup("0::/a\n", "proc /proc proc rw 0 0\n").is_none());
    }

    #[test]
    fn page_cache_is_read_from_memory_stat() {
        let stat = "anon 100\nfile 4096\nkernel 7\n";
        assert_eq!(stat_value(stat, "file"), Some(4096));
        assert_eq!(stat_value(stat, "files"), None);
    }
}
