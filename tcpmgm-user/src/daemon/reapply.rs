//! `--reapply-existing`: after a reload, the established connections of the cgroup get the
//! keepalive options of the rule that now matches them, as if they had just been made.
//!
//! The kernel gives no way to set another process's socket options from outside, so the daemon
//! borrows each socket: it finds the socket's owner through /proc (the processes of the cgroup
//! and of every cgroup below it, and their `socket:[INODE]` fds), copies the fd with pidfd_getfd
//! (Linux 5.6), sets the options, and rewrites the socket's tcpmgm record so that `conns` and the application API show the new rule.
//! Which way a connection goes is read from the sockets: one whose local address and port a
//! listening socket of the cgroup holds was accepted; any other was opened.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya::maps::{Map, MapData, SkStorage};
use tcpmgm_common::{SOCK_RULE, SockPolicy, options};

use crate::kernel::diag;
use crate::policy::compile::Policy;
use crate::policy::listener::{Direction, Listeners};
use crate::policy::matcher;
use crate::system::Subtree;

/// What a re-application did.
#[derive(Debug, Default)]
pub struct Reapplied {
    pub updated: usize,
    pub unreachable: usize,
}

/// The (pid, fd) of every socket the processes of the cgroups hold, by inode.
fn socket_owners(tree: &Subtree) -> HashMap<u32, (i32, i32)> {
    let mut owners = HashMap::new();
    let pids = tree.dirs.iter().flat_map(|dir| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .collect::<Vec<_>>()
    });
    for pid in pids {
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            else {
                continue;
            };
            if let (Ok(inode), Ok(fd)) = (
                inode.parse::<u32>(),
                entry.file_name().to_string_lossy().parse::<i32>(),
            ) {
                owners.entry(inode).or_insert((pid, fd));
            }
        }
    }
    owners
}

/// A copy of another process's fd.
fn borrow_fd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned fd is new and ours.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(copy as i32))
    }
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: u32) -> std::io::Result<()> {
    let v = value as i32;
    // SAFETY: an int option on a socket fd we hold.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&v as *const i32).cast(), 4) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Applies `policy`'s keepalive options to the cgroup's established connections.
pub fn reapply(
    policy: &Policy,
    listeners: &Listeners,
    cgroup: &Path,
    sockets_pin: &Path,
) -> std::io::Result<Reapplied> {
    let tree = Subtree::of(cgroup)?;
    let data = MapData::from_pin(sockets_pin).map_err(std::io::Error::other)?;
    let sockets = diag::tcp_sockets(Some(data.fd().as_fd()))?;
    let mut records: SkStorage<MapData, SockPolicy> =
        SkStorage::try_from(Map::SkStorage(data)).map_err(std::io::Error::other)?;
    let ours: Vec<&diag::Socket> = sockets
        .iter()
        .filter(|s| tree.contains(s.cgroup_id))
        .collect();
    let listening: Vec<SocketAddr> = ours
        .iter()
        .filter(|s| s.listening())
        .map(|s| s.local)
        .collect();
    let accepted = |local: SocketAddr| {
        listening
            .iter()
            .any(|l| l.port() == local.port() && (l.ip() == local.ip() || l.ip().is_unspecified()))
    };
    let owners = socket_owners(&tree);
    let mut done = Reapplied::default();
    for s in ours.into_iter().filter(|s| s.established()) {
        let direction = if accepted(s.local) {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let key = listeners.lookup(direction, s.remote, Some(s.local));
        let Some(rank) = policy.rules.iter().position(|r| matcher::matches(r, &key)) else {
            continue;
        };
        let Some(&(pid, fd)) = owners.get(&s.inode) else {
            done.unreachable += 1;
            continue;
        };
        let sock = match borrow_fd(pid, fd) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "re-applying to {} -> {} (pid {pid}): {e}",
                    s.local,
                    s.remote
                );
                done.unreachable += 1;
                continue;
            }
        };
        let p = &policy.profiles[rank];
        // The record first: the setsockopt hook holds a socket to its recorded rule, whoever
        // calls, and would put the old values back. Established already: no handshake bound of
        // tcpmgm's is left to track.
        let record = SockPolicy {
            state: SOCK_RULE,
            marks: tcpmgm_common::settings_marks(policy.settings),
            profile: *p,
            ..SockPolicy::default()
        };
        if let Err(e) = records.insert(&sock, record, 0) {
            tracing::warn!("recording the new rule of {} -> {}: {e}", s.local, s.remote);
            continue;
        }
        let result = options::KEEPALIVE
            .iter()
            .filter_map(|&(level, name)| Some((level, name, p.held_option(level, name)?)))
            .try_for_each(|(level, name, value)| setsockopt(&sock, level, name, value));
        if let Err(e) = result {
            tracing::warn!("re-applying to {} -> {}: {e}", s.local, s.remote);
            continue;
        }
        done.updated += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use tcpmgm_common::options::*;

    #[test]
    fn the_shared_option_numbers_are_this_systems() {
        assert_eq!(
            [
                SOL_SOCKET,
                SO_KEEPALIVE,
                SOL_TCP,
                TCP_KEEPIDLE,
                TCP_KEEPINTVL,
                TCP_KEEPCNT
            ],
            [
                libc::SOL_SOCKET,
                libc::SO_KEEPALIVE,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                libc::TCP_KEEPINTVL,
                libc::TCP_KEEPCNT
            ]
        );
        assert_eq!(TCP_USER_TIMEOUT, libc::TCP_USER_TIMEOUT);
    }
}
