//! con_lifetime: a connection of the cgroup on which no data has moved either way for longer than
//! its rule's con_lifetime is closed (SOCK_DESTROY: the owner sees ECONNABORTED, the peer a
//! reset). A sweeper thread lists the namespace's TCP sockets through sock_diag, with each
//! socket's tcpmgm record (its rule's profile, as recorded when it was made), and closes the idle
//! ones of the cgroup. Sockets without a rule are never touched. It sweeps every quarter of the
//! shortest enforced con_lifetime of the rule set, between 250 ms and 1 s (so a connection is
//! closed within con_lifetime + 1 s), and not at all while no rule has one.
//!
//! In audit mode (the socket was decided in audit mode) an idle connection is left open, and
//! counted and logged once as one that would have been closed. What the sweeper did is counted
//! per rule id in a map pinned beside the others (`SWEEP_STATS_PIN`), for `status` and the
//! metrics.
//!
//! OpenSIPS tables carry con_lifetime on every row (default 120 s), and OpenSIPS applies it to
//! SIP connections itself. Enforced in the kernel for every process of the cgroup, that default
//! would close idle connections users never meant to limit (database pools, say). So a rule's
//! con_lifetime is enforced when it differs from the column default, or for every rule with
//! `--enforce-default-lifetime`; 0 never closes.
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::collections::HashSet;

use aya::maps::{HashMap, MapData};
use tcpmgm_common::{SOCK_RULE, SweepStats, marks};

use crate::kernel::{diag, sweep_stats};
use crate::policy::compile::Enforcement;

/// How often to sweep for a rule set, in ms; 0 when no rule has an enforced con_lifetime.
pub fn sweep_interval_ms(
    lifetimes: impl IntoIterator<Item = u32>,
    enforcement: &Enforcement,
) -> u64 {
    lifetimes
        .into_iter()
        .filter(|&l| enforcement.con_lifetime(l))
        .min()
        .map_or(0, |l| (u64::from(l) * 1000 / 4).clamp(250, 1000))
}

/// The sweeper; stops when dropped.
pub struct Sweeper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where the sweeper finds things and how it acts.
pub struct SweepSetup {
    /// The governed cgroup; its descendants are swept too, read again at each pass.
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub enforcement: Enforcement,
}

impl Sweeper {
    /// Starts sweeping the sockets of `cgroup`, whose records are pinned in `pin_dir`, in the
    /// network namespace `netns` (None: this process's). `every_ms` (see `sweep_interval_ms`)
    /// may be changed while it runs, at a reload.
    pub fn start(
        cgroup: &Path,
        pin_dir: PathBuf,
        netns: Option<PathBuf>,
        enforcement: Enforcement,
        every_ms: Arc<AtomicU64>,
    ) -> std::io::Result<Sweeper> {
        let setup = SweepSetup {
            cgroup: cgroup.to_path_buf(),
            pin_dir,
            enforcement,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("con_lifetime".into())
            .spawn(move || {
                // Only this thread enters the namespace; sock_diag answers for the caller's.
                if let Some(ns) = &netns
                    && let Err(e) = crate::netns::enter(ns)
                {
                    tracing::error!(
                        "con_lifetime: cannot enter {}: {e}; idle connections are not closed",
                        ns.display()
                    );
                    return;
                }
                let mut audited = HashSet::new();
                while !flag.load(Ordering::Relaxed) {
                    let every = every_ms.load(Ordering::Relaxed);
                    if every == 0 {
                        std::thread::sleep(Duration::from_millis(250));
                        continue;
                    }
                    // A cgroup removed has no connections to sweep; the keeper says it once.
                    if setup.cgroup.exists()
                        && let Err(e) = sweep(&setup, &mut audited)
                    {
                        tracing::warn!("con_lifetime sweep: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(every));
                }
            })?;
        Ok(Sweeper {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One pass: closes the idle connections of the cgroup (in audit mode, counts those it would
/// close, each once: `audited` keeps their inodes between passes); returns how many it closed.
pub fn sweep(setup: &SweepSetup, audited: &mut HashSet<u32>) -> std::io::Result<usize> {
    let map = MapData::from_pin(setup.pin_dir.join(crate::kernel::SOCKETS_PIN))
        .map_err(std::io::Error::other)?;
    let mut stats = sweep_stats::open(&setup.pin_dir, true).map_err(std::io::Error::other)?;
    // The sockets being closed, so that the programs count their end as con_lifetime's (absent
    // from the pins of an older version's programs).
    let mut closing: Option<HashMap<MapData, u64, u32>> =
        MapData::from_pin(setup.pin_dir.join(tcpmgm_common::CLOSING_PIN))
            .ok()
            .and_then(|m| HashMap::try_from(aya::maps::Map::HashMap(m)).ok());
    let mut closed = 0;
    let tree = crate::system::Subtree::of(&setup.cgroup)?;
    let sockets = diag::tcp_sockets(Some(map.fd().as_fd()))?;
    audited.retain(|inode| sockets.iter().any(|s| s.inode == *inode));
    for s in sockets {
        let Some(record) = s.record.filter(|r| r.state == SOCK_RULE) else {
            continue;
        };
        let lifetime = record.profile.con_lifetime_s;
        if !tree.contains(s.cgroup_id)
            || !s.established()
            || !setup.enforcement.con_lifetime(lifetime)
            || u64::from(s.idle_ms()) <= u64::from(lifetime) * 1000
        {
            continue;
        }
        let rule = record.profile.rule_id;
        let mut count = |bump: fn(&mut SweepStats)| {
            if let Err(e) = sweep_stats::count(&setup.pin_dir, &mut stats, rule, bump) {
                tracing::warn!("counting for rule {rule}: {e}");
            }
        };
        if record.marks & marks::AUDIT != 0 {
            if audited.insert(s.inode) {
                count(|n| n.would_close += 1);
                tracing::info!(
                    "would close {} -> {} (audit mode): idle {} ms, rule {rule} con_lifetime {lifetime} s",
                    s.local,
                    s.remote,
                    s.idle_ms()
                );
            }
            continue;
        }
        let cookie = s.cookie();
        if let Some(c) = closing.as_mut()
            && let Err(e) = c.insert(cookie, rule, 0)
        {
            tracing::warn!(
                "noting {} -> {} as closed by con_lifetime: {e}",
                s.local,
                s.remote
            );
        }
        let destroyed = diag::destroy(&s);
        // The socket's end was counted within the destroy.
        if let Some(c) = closing.as_mut() {
            let _ = c.remove(&cookie);
        }
        match destroyed {
            Ok(()) => {
                closed += 1;
                count(|n| n.idle_closes += 1);
                tracing::info!(
                    "closed {} -> {}: idle {} ms, rule {rule} con_lifetime {lifetime} s",
                    s.local,
                    s.remote,
                    s.idle_ms(),
                );
            }
            Err(e) => tracing::warn!("closing {} -> {}: {e}", s.local, s.remote),
        }
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_keeps_within_a_second_of_the_shortest_lifetime() {
        let opensips = Enforcement::default();
        let every = Enforcement {
            default_lifetime: true,
            ..Enforcement::default()
        };
        assert_eq!(sweep_interval_ms([2], &opensips), 500);
        assert_eq!(sweep_interval_ms([120, 600], &opensips), 1000);
        assert_eq!(sweep_interval_ms([120], &opensips), 0);
        assert_eq!(sweep_interval_ms([120], &every), 1000);
        assert_eq!(sweep_interval_ms([0, 0], &every), 0);
        assert_eq!(sweep_interval_ms([1], &opensips), 250);
    }
}
