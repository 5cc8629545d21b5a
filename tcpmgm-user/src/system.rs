//! Facts about the running system tcpmgm needs: where cgroup v2 and bpffs are mounted, the
//! cgroups of a tree, and the kernel's tick rate (the TIMEOUT_INIT reply is in jiffies).
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(
        "no cgroup v2 filesystem is mounted (tcpmgm attaches to a cgroup v2; see /proc/self/mountinfo)"
    )]
    NoCgroup2,
    #[error(
        "cgroup {0} does not exist (create it with mkdir, then move processes into its cgroup.procs)"
    )]
    NoSuchCgroup(PathBuf),
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs { path: PathBuf, source: nix::Error },
    #[error(
        "tcpmgm run needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (Linux 5.8+); this process has {0}"
    )]
    NotPrivileged(String),
    #[error("{0}, which this process lacks (add it to the unit's capabilities)")]
    OptionNotPrivileged(String),
    #[error("--api-group {group}: {reason}")]
    NoSuchGroup { group: String, reason: String },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot tell the kernel's HZ: no CONFIG_HZ in /proc/config.gz or /boot/config-*, and /proc/timer_list {0}"
    )]
    Hz(String),
}

/// Mount points of a filesystem type, from /proc/self/mountinfo.
pub(crate) fn mounts_of(fstype: &str) -> Result<Vec<PathBuf>, SystemError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| SystemError::Read {
        path: path.into(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mountpoint options [optional...] - fstype source
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            (right.split(' ').next()? == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified` on hybrid).
pub fn cgroup2_root() -> Result<PathBuf, SystemError> {
    mounts_of("cgroup2")?
        .into_iter()
        .next()
        .ok_or(SystemError::NoCgroup2)
}

/// A cgroup argument as a path: absolute below the cgroup2 root, or relative to that root.
fn cgroup_path(arg: &Path) -> Result<PathBuf, SystemError> {
    let root = cgroup2_root()?;
    Ok(if arg.is_absolute() && arg.starts_with(&root) {
        arg.to_path_buf()
    } else {
        root.join(arg.strip_prefix("/").unwrap_or(arg))
    })
}

/// Resolves a `--cgroup` argument: an existing absolute path, or a path below the cgroup2 root.
pub fn resolve_cgroup(arg: &Path) -> Result<PathBuf, SystemError> {
    let path = cgroup_path(arg)?;
    if !path.join("cgroup.procs").exists() {
        return Err(SystemError::NoSuchCgroup(path));
    }
    Ok(path)
}

/// A cgroup and every cgroup below it: what the programs attached to it govern.
#[derive(Debug, Default)]
pub struct Subtree {
    /// The cgroups' directories, the root first.
    pub dirs: Vec<PathBuf>,
    /// Their ids (the directories' inode numbers, as sock_diag and the kernel give them).
    pub ids: std::collections::HashSet<u64>,
}

impl Subtree {
    /// `cgroup` and its descendants as they are now; cgroups removed during the walk are
    /// skipped.
    pub fn of(cgroup: &Path) -> std::io::Result<Subtree> {
        use std::os::unix::fs::MetadataExt;
        let mut tree = Subtree::default();
        tree.ids.insert(std::fs::metadata(cgroup)?.ino());
        tree.dirs.push(cgroup.to_path_buf());
        let mut next = 0;
        while next < tree.dirs.len() {
            let dir = tree.dirs[next].clone();
            next += 1;
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    tree.ids.insert(meta.ino());
                    tree.dirs.push(entry.path());
                }
            }
        }
        Ok(tree)
    }

    pub fn contains(&self, cgroup_id: Option<u64>) -> bool {
        cgroup_id.is_some_and(|id| self.ids.contains(&id))
    }
}

/// Creates a cgroup below the cgroup2 root unless it exists; returns its path when it made it.
pub fn create_cgroup(arg: &Path) -> Result<Option<PathBuf>, SystemError> {
    let path = cgroup_path(arg)?;
    if path.exists() {
        return Ok(None);
    }
    std::fs::create_dir_all(&path).map_err(|source| SystemError::Read {
        path: path.clone(),
        source,
    })?;
    tracing::info!("created cgroup {}", path.display());
    Ok(Some(path))
}

/// Where bpffs is, mounting it at /sys/fs/bpf when no bpffs is mounted.
pub fn bpffs() -> Result<PathBuf, SystemError> {
    if let Some(path) = mounts_of("bpf")?.into_iter().next() {
        return Ok(path);
    }
    let path = PathBuf::from("/sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        &path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SystemError::MountBpffs {
        path: path.clone(),
        source,
    })?;
    tracing::info!("mounted bpffs at {}", path.display());
    Ok(path)
}

/// Where the control sockets of the daemons are by default.
pub const CONTROL_DIR: &str = "/run/tcpmgm";

/// What belongs to one governed cgroup: the cgroup, the pin directory of its policy and the
/// control socket of its daemon. The one place their defaults are worked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub cgroup: PathBuf,
    /// Given, else `<bpffs>/tcpmgm/<slug>`.
    pub pin_dir: PathBuf,
    /// Given, else `/run/tcpmgm/<slug>.sock`.
    pub control: PathBuf,
}

impl Paths {
    /// `cgroup` (below the cgroup2 mount, or absolute; it must exist), with the pin directory
    /// and control socket given, or their defaults.
    pub fn of(
        cgroup: &Path,
        pin_dir: Option<PathBuf>,
        control: Option<PathBuf>,
    ) -> Result<Paths, SystemError> {
        Paths::named(resolve_cgroup(cgroup)?, pin_dir, control)
    }

    /// `of` for a cgroup that may not exist now (removed, to be made again): what `status`
    /// reports on.
    pub fn of_maybe_gone(
        cgroup: &Path,
        pin_dir: Option<PathBuf>,
        control: Option<PathBuf>,
    ) -> Result<Paths, SystemError> {
        Paths::named(cgroup_path(cgroup)?, pin_dir, control)
    }

    fn named(
        cgroup: PathBuf,
        pin_dir: Option<PathBuf>,
        control: Option<PathBuf>,
    ) -> Result<Paths, SystemError> {
        let slug = cgroup_slug(&cgroup)?;
        let pin_dir = match pin_dir {
            Some(p) => p,
            None => bpffs()?.join("tcpmgm").join(&slug),
        };
        Ok(Paths {
            control: control.unwrap_or_else(|| Paths::default_control(&slug)),
            cgroup,
            pin_dir,
        })
    }

    /// The pin directories under the default root, each with its default control socket: the
    /// cgroups tcpmgm governs (`tcpmgm status` without --cgroup).
    pub fn pinned() -> Result<Vec<(PathBuf, PathBuf)>, SystemError> {
        let root = bpffs()?.join("tcpmgm");
        Ok(std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| {
                let slug = entry.file_name().to_string_lossy().into_owned();
                (entry.path(), Paths::default_control(&slug))
            })
            .collect())
    }

    fn default_control(slug: &str) -> PathBuf {
        Path::new(CONTROL_DIR).join(format!("{slug}.sock"))
    }
}

/// A cgroup's path below the cgroup2 root as one file name: `/` as `_`, `.` as `-` (bpffs
/// refuses names with a dot), `root` for the root itself.
pub fn cgroup_slug(cgroup: &Path) -> Result<String, SystemError> {
    let root = cgroup2_root()?;
    let rel = cgroup
        .strip_prefix(&root)
        .unwrap_or(cgroup)
        .to_string_lossy()
        .trim_matches('/')
        .replace('.', "-")
        .replace('/', "_");
    Ok(if rel.is_empty() {
        "root".to_owned()
    } else {
        rel
    })
}

/// The kernel's tick rate, from its config, else measured from /proc/timer_list.
pub fn kernel_hz() -> Result<u32, SystemError> {
    if let Some(hz) = config_hz() {
        return Ok(hz);
    }
    measure_hz()
}

fn config_hz() -> Option<u32> {
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open("/proc/config.gz") {
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .ok()?;
    } else {
        let release = nix::sys::utsname::uname()
            .ok()?
            .release()
            .to_string_lossy()
            .into_owned();
        text = std::fs::read_to_string(format!("/boot/config-{release}")).ok()?;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ=")?.parse().ok())
}

/// Counts jiffies over 200 ms and rounds to the nearest rate Linux offers.
fn measure_hz() -> Result<u32, SystemError> {
    let sample = || -> Result<(u64, std::time::Instant), SystemError> {
        let text = std::fs::read_to_string("/proc/timer_list")
            .map_err(|e| SystemError::Hz(format!("is unreadable: {e}")))?;
        let jiffies = text
            .lines()
            .find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())
            .ok_or_else(|| SystemError::Hz("has no jiffies line".into()))?;
        Ok((jiffies, std::time::Instant::now()))
    };
    let (j0, t0) = sample()?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (j1, t1) = sample()?;
    let rate = (j1 - j0) as f64 / (t1 - t0).as_secs_f64();
    Ok(*[100u32, 250, 300, 1000]
        .iter()
        .min_by_key(|hz| (f64::from(**hz) - rate).abs() as u64)
        .expect("non-empty"))
}
