//! What `tcpmgm status` reports: the daemon's record of what it was asked and did (a state file
//! beside its control socket), and what the kernel shows through the pins (programs, counters).
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::kernel::{self, Pinned};

/// The daemon's record, rewritten at start and after every reload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonState {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub control: PathBuf,
    pub pid: u32,
    /// The rule database, password hidden.
    pub source: String,
    pub started_at: u64,
    pub rules: usize,
    pub generation: u64,
    pub last_reload: Option<ReloadRecord>,
    /// When the reload under way started, if one is.
    #[serde(default)]
    pub reloading_since: Option<u64>,
    /// Reloads since the start, by result.
    #[serde(default)]
    pub reloads_ok: u64,
    #[serde(default)]
    pub reloads_failed: u64,
    /// Audit mode: decisions counted, nothing enforced.
    #[serde(default)]
    pub audit: bool,
    /// Whether the rule database can be reached and read.
    #[serde(default)]
    pub source_health: SourceHealth,
}

/// The rule database as the daemon last found it, by its reads (start, reloads) and by the
/// watcher that follows the table.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceHealth {
    /// When the table was last read whole.
    pub last_read: Option<u64>,
    /// The last failure to reach or read it; kept, no longer `ongoing`, after a read succeeds.
    pub last_error: Option<SourceFault>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceFault {
    /// The latest failure's text, shortened.
    pub message: String,
    /// When the failures began (the first since the last good read).
    pub since: u64,
    /// When the latest failure was.
    pub at: u64,
    /// No read has succeeded since.
    pub ongoing: bool,
}

/// How much of an error's text the state keeps.
const FAULT_CHARS: usize = 500;

impl SourceHealth {
    /// Just read.
    pub fn read_now() -> SourceHealth {
        SourceHealth {
            last_read: Some(now()),
            last_error: None,
        }
    }

    pub fn read(&mut self) {
        self.last_read = Some(now());
        if let Some(e) = &mut self.last_error {
            e.ongoing = false;
        }
    }

    pub fn failed(&mut self, error: &str) {
        let at = now();
        let since = match &self.last_error {
            Some(e) if e.ongoing => e.since,
            _ => at,
        };
        let message = match error.char_indices().nth(FAULT_CHARS) {
            Some((cut, _)) => format!("{}… ({} characters)", &error[..cut], error.chars().count()),
            None => error.to_owned(),
        };
        self.last_error = Some(SourceFault {
            message,
            since,
            at,
            ongoing: true,
        });
    }
}

impl std::fmt::Display for SourceHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = |t: u64| now().saturating_sub(t);
        let read = match self.last_read {
            Some(t) => format!("last read {} s ago", ago(t)),
            None => "never read".to_owned(),
        };
        match &self.last_error {
            Some(e) if e.ongoing => {
                write!(f, "FAILING for {} s ({read}): {}", ago(e.since), e.message)
            }
            Some(e) => write!(
                f,
                "ok, {read} (last error {} s ago, after {} s of errors: {})",
                ago(e.at),
                e.at.saturating_sub(e.since),
                e.message
            ),
            None => write!(f, "ok, {read}"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadRecord {
    pub at: u64,
    pub ok: bool,
    pub message: String,
    /// How long it took, in ms.
    #[serde(default)]
    pub ms: u64,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state file of the daemon whose control socket is `control`.
pub fn state_path(control: &Path) -> PathBuf {
    control.with_extension("json")
}

impl DaemonState {
    pub fn write(&self) -> std::io::Result<()> {
        let path = state_path(&self.control);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serialisable"))?;
        std::fs::rename(tmp, path)
    }

    pub fn read(control: &Path) -> Option<DaemonState> {
        serde_json::from_slice(&std::fs::read(state_path(control)).ok()?).ok()
    }
}

/// One cgroup under tcpmgm.
#[derive(Debug, Serialize)]
pub struct CgroupStatus {
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub daemon_running: bool,
    pub state: Option<DaemonState>,
    pub kernel: Option<Pinned>,
    /// Why the pins could not be read, when they could not.
    pub kernel_error: Option<String>,
    /// Whether the pinned links hold the cgroup now at the recorded path (false when it was
    /// removed, or removed and made again); None without links or a record.
    pub cgroup_governed: Option<bool>,
}

/// The status of the cgroup pinned in `pin_dir`, whose daemon (if any) listens on `control`.
pub fn of(pin_dir: &Path, control: &Path) -> CgroupStatus {
    let state = DaemonState::read(control);
    let daemon_running = state
        .as_ref()
        .is_some_and(|s| Path::new(&format!("/proc/{}", s.pid)).exists())
        && std::os::unix::net::UnixStream::connect(control).is_ok();
    let (kernel, kernel_error) = match kernel::inspect(pin_dir) {
        Ok(k) => (Some(k), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let cgroup_governed = match (&state, &kernel) {
        (Some(s), Some(k)) if !k.programs.is_empty() => {
            use std::os::unix::fs::MetadataExt as _;
            let now = std::fs::metadata(&s.cgroup).map(|m| m.ino()).ok();
            Some(k.programs.iter().all(|p| Some(p.cgroup_id) == now))
        }
        _ => None,
    };
    CgroupStatus {
        cgroup_governed,
        cgroup: state.as_ref().map(|s| s.cgroup.clone()),
        pin_dir: pin_dir.to_path_buf(),
        daemon_running,
        state,
        kernel,
        kernel_error,
    }
}

impl std::fmt::Display for CgroupStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cgroup {
            Some(c) => writeln!(f, "cgroup {}", c.display())?,
            None => writeln!(f, "pins {}", self.pin_dir.display())?,
        }
        match &self.state {
            Some(s) => {
                let run = if self.daemon_running {
                    "running"
                } else {
                    "not running; the pinned policy stays in force"
                };
                writeln!(f, "  daemon: pid {} ({run})", s.pid)?;
                if s.audit {
                    writeln!(
                        f,
                        "  audit mode: rules are decided and counted, nothing is enforced"
                    )?;
                }
                // What is enforced is read from the kernel's maps; the daemon's record is shown
                // beside it only where the two differ.
                match &self.kernel {
                    Some(k) => {
                        write!(
                            f,
                            "  rules: {} enforced (generation {}), from {}",
                            k.rules.len(),
                            k.generation,
                            s.source
                        )?;
                        if u64::from(k.generation) != s.generation || k.rules.len() != s.rules {
                            write!(
                                f,
                                "; the daemon's record says {} rules, generation {}",
                                s.rules, s.generation
                            )?;
                        }
                        writeln!(f)?;
                    }
                    None => writeln!(
                        f,
                        "  rules: {} from {}, generation {} (the daemon's record; the kernel could not be read)",
                        s.rules, s.source, s.generation
                    )?,
                }
                writeln!(f, "  source: {}", s.source_health)?;
                if let Some(since) = s.reloading_since {
                    writeln!(
                        f,
                        "  reloading: for {} s (the policy in force stays until it completes)",
                        now().saturating_sub(since)
                    )?;
                }
                match &s.last_reload {
                    Some(r) => writeln!(
                        f,
                        "  last reload: {} ({} s ago): {}",
                        if r.ok { "ok" } else { "FAILED" },
                        now().saturating_sub(r.at),
                        r.message
                    )?,
                    None => writeln!(
                        f,
                        "  last reload: none since the start, {} s ago",
                        now().saturating_sub(s.started_at)
                    )?,
                }
            }
            None => writeln!(f, "  daemon: no record")?,
        }
        match (&self.kernel, &self.kernel_error) {
            (Some(k), _) => {
                let programs: Vec<String> = k
                    .programs
                    .iter()
                    .map(|p| format!("{} (prog {}, link {})", p.hook, p.program_id, p.link_id))
                    .collect();
                if self.cgroup_governed == Some(false) {
                    writeln!(
                        f,
                        "  NOT GOVERNED: the links hold a cgroup that is no longer at this path (removed, or made again); a running daemon governs the new one"
                    )?;
                }
                writeln!(
                    f,
                    "  programs: {}",
                    if programs.is_empty() {
                        "none attached".into()
                    } else {
                        programs.join(", ")
                    }
                )?;
                writeln!(
                    f,
                    "  loaded by: tcpmgm {}",
                    k.loader
                        .as_deref()
                        .unwrap_or("unknown (a version that did not record it)")
                )?;
                let active: Vec<_> = k
                    .rules
                    .iter()
                    .filter(|r| {
                        r.matched
                            + r.refused
                            + r.would_refuse
                            + r.setsockopt_failures
                            + r.overrides_prevented
                            + r.slow
                            + r.idle_closes
                            + r.would_close
                            + r.ends()
                            > 0
                    })
                    .collect();
                writeln!(
                    f,
                    "  counters ({} of {} rules used):",
                    active.len(),
                    k.rules.len()
                )?;
                for r in active {
                    write!(
                        f,
                        "    rule {:>8}  matched {:>10}  refused {:>10}  slow sends {:>8}",
                        r.id, r.matched, r.refused, r.slow
                    )?;
                    for (what, n) in [
                        ("would refuse (audit)", r.would_refuse),
                        ("overrides prevented", r.overrides_prevented),
                        ("setsockopt failures", r.setsockopt_failures),
                        ("idle closes", r.idle_closes),
                        ("would close (audit)", r.would_close),
                    ] {
                        if n > 0 {
                            write!(f, "  {what} {n}")?;
                        }
                    }
                    writeln!(f)?;
                    if r.ends() > 0 {
                        let how: Vec<String> = r
                            .ended
                            .iter()
                            .filter(|(_, n)| **n > 0)
                            .map(|(what, n)| format!("{what} {n}"))
                            .collect();
                        let timed = r.lived_at_most_s.last().map_or(0, |(_, n)| *n);
                        write!(f, "      ended {}: {}", r.ends(), how.join(", "))?;
                        if timed > 0 {
                            let mean = r.lived_ms as f64 / timed as f64 / 1000.0;
                            write!(f, "; lived {mean:.1} s on average")?;
                        }
                        writeln!(f)?;
                    }
                }
            }
            (None, Some(e)) => writeln!(f, "  kernel: {e}")?,
            (None, None) => {}
        }
        Ok(())
    }
}
