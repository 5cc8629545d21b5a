//! The event stream (`tcpmgm events`): the daemon reads the programs' events from their ring
//! buffer, formats each once as a JSON line, and hands it to every client of its events socket
//! (`<control socket>.events`, beside the control socket). The socket is root's (0600), or
//! root's and `--api-group`'s (0660); it carries events only and takes no request.
//!
//! What is lost is said in the stream itself: events the programs did not write (over
//! `EVENTS_PER_SECOND` a CPU, or the ring buffer full) come as a `dropped` line once a second,
//! and events a slow client missed as a `lagged` line.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use serde::{Deserialize, Serialize};
use tcpmgm_common::{Event, event, outcome};
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio::sync::broadcast;

/// Clients served at once.
const MAX_CLIENTS: usize = 16;
/// Lines a client may fall behind before it is told it lagged.
const BACKLOG: usize = 4096;

/// One line of the stream, as `tcpmgm events --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// RFC 3339, UTC.
    pub time: String,
    /// decided, refused, would_refuse, ended; or dropped, lagged (then `count` says how many);
    /// or subscribed, the first line a client gets (events from then on reach it).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    /// in (accepted) or out (opened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<SocketAddr>,
    /// The local address; port 0 and address 0.0.0.0 or :: where the socket has none yet
    /// (connect() of an unbound socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<SocketAddr>,
    /// ended: how (`tcpmgm_common::outcome::NAMES`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// ended: how long the connection lived, when tcpmgm saw it start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lived_ms: Option<u64>,
    /// dropped, lagged: how many events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl Line {
    fn notice(kind: &str, count: u64) -> Line {
        Line {
            time: now(),
            kind: kind.into(),
            rule: None,
            direction: None,
            remote: None,
            local: None,
            outcome: None,
            lived_ms: None,
            count: Some(count),
        }
    }

    /// One event of the programs; `boot_offset` turns their monotonic clock into wall time.
    pub fn of(e: &Event, boot_offset: Duration) -> Line {
        let v6 = e.flags & event::V6 != 0;
        let addr = |words: [u32; 4], port: u16| {
            let ip = if v6 {
                let mut bytes = [0u8; 16];
                for (chunk, w) in bytes.chunks_mut(4).zip(words) {
                    chunk.copy_from_slice(&w.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(bytes))
            } else {
                IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
            };
            SocketAddr::new(ip, port)
        };
        let ended = e.kind == event::ENDED;
        let wall = SystemTime::UNIX_EPOCH + boot_offset + Duration::from_nanos(e.ts_ns);
        Line {
            time: humantime::format_rfc3339_millis(wall).to_string(),
            kind: event::NAMES
                .get(e.kind as usize)
                .copied()
                .filter(|n| !n.is_empty())
                .map_or_else(|| format!("unknown{}", e.kind), str::to_owned),
            rule: Some(e.rule_id),
            direction: Some(
                if e.flags & event::INBOUND != 0 {
                    "in"
                } else {
                    "out"
                }
                .into(),
            ),
            remote: Some(addr(e.remote, e.remote_port)),
            local: Some(addr(e.local, e.local_port)),
            outcome: ended.then(|| {
                outcome::NAMES
                    .get(e.outcome as usize)
                    .map_or_else(|| format!("unknown{}", e.outcome), |n| (*n).to_owned())
            }),
            lived_ms: (ended && e.lived_ms != u64::MAX).then_some(e.lived_ms),
            count: None,
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Wall time minus the monotonic clock (which the programs' timestamps read).
fn boot_offset() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(mono)
}

/// The events socket of a daemon whose control socket is `control`.
pub fn socket_path(control: &Path) -> PathBuf {
    control.with_extension("events")
}

/// Reads the programs' events and serves them on `path` until dropped (the task is aborted).
pub struct Stream {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Stream {
    /// Binds the events socket at `path` (group `api_group` may read it too) and starts
    /// reading `ring`; `drops` is the programs' count of events they did not write.
    pub fn start(
        ring: RingBuf<MapData>,
        drops: Option<PerCpuArray<MapData, u64>>,
        path: &Path,
        api_group: Option<u32>,
    ) -> std::io::Result<Stream> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let mode = if let Some(gid) = api_group {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))?;
            // The group must reach the socket: tcpmgm's own directory lets anyone pass (not
            // list); the control socket in it stays root's.
            if let Some(dir) = path.parent()
                && dir == Path::new(crate::system::CONTROL_DIR)
            {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
            }
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        // SAFETY: the ring buffer owns its fd for as long as it lives, and the AsyncFd owns it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let (tx, _) = broadcast::channel::<Arc<str>>(BACKLOG);
        let task = tokio::spawn(serve(ring, drops, listener, tx));
        Ok(Stream {
            task,
            path: path.to_path_buf(),
        })
    }
}

fn line(l: &Line) -> Arc<str> {
    let mut s = serde_json::to_string(l).expect("a line serializes");
    s.push('\n');
    s.into()
}

async fn serve(
    mut ring: AsyncFd<RingBuf<MapData>>,
    drops: Option<PerCpuArray<MapData, u64>>,
    listener: UnixListener,
    tx: broadcast::Sender<Arc<str>>,
) {
    let offset = boot_offset();
    let dropped_total = || {
        drops
            .as_ref()
            .and_then(|d| d.get(&0, 0).ok())
            .map_or(0, |per_cpu| per_cpu.iter().sum::<u64>())
    };
    let mut reported = dropped_total();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let Ok(mut guard) = ready else { return };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() < std::mem::size_of::<Event>() {
                        continue;
                    }
                    // Without a client the events are only consumed, not formatted.
                    if tx.receiver_count() == 0 {
                        continue;
                    }
                    // SAFETY: the programs write whole `Event`s; read unaligned from the ring.
                    let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    let _ = tx.send(line(&Line::of(&e, offset)));
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let total = dropped_total();
                if total > reported {
                    let _ = tx.send(line(&Line::notice("dropped", total - reported)));
                    reported = total;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(slot) = clients.clone().try_acquire_owned() else {
                    let mut stream = stream;
                    let _ = stream
                        .write_all(format!("error busy: {MAX_CLIENTS} event clients are connected\n").as_bytes())
                        .await;
                    continue;
                };
                let mut rx = tx.subscribe();
                tokio::spawn(async move {
                    let _slot = slot;
                    let mut stream = stream;
                    if stream.write_all(line(&Line::notice("subscribed", 0)).as_bytes()).await.is_err() {
                        return;
                    }
                    loop {
                        let text = match rx.recv().await {
                            Ok(text) => text,
                            Err(broadcast::error::RecvError::Lagged(n)) => line(&Line::notice("lagged", n)),
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        if stream.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_its_addresses_rule_and_outcome() {
        let e = Event {
            ts_ns: 1_500_000_000,
            lived_ms: 3012,
            kind: event::ENDED,
            rule_id: 57,
            outcome: outcome::KEEPALIVE as u32,
            flags: 0,
            remote: [u32::from_ne_bytes([192, 0, 2, 2]), 0, 0, 0],
            local: [u32::from_ne_bytes([192, 0, 2, 1]), 0, 0, 0],
            remote_port: 7157,
            local_port: 40000,
            _pad: 0,
        };
        let l = Line::of(&e, Duration::from_secs(1_700_000_000));
        assert_eq!(l.time, "2023-11-14T22:13:21.500Z");
        assert_eq!(
            (l.kind.as_str(), l.rule, l.direction.as_deref()),
            ("ended", Some(57), Some("out"))
        );
        assert_eq!(l.remote, Some("192.0.2.2:7157".parse().unwrap()));
        assert_eq!(l.local, Some("192.0.2.1:40000".parse().unwrap()));
        assert_eq!(
            (l.outcome.as_deref(), l.lived_ms),
            (Some("keepalive"), Some(3012))
        );
        let v6 = Event {
            kind: event::DECIDED,
            flags: event::V6 | event::INBOUND,
            remote: [
                u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]),
                0,
                0,
                2u32.to_be(),
            ],
            lived_ms: u64::MAX,
            ..e
        };
        let l = Line::of(&v6, Duration::ZERO);
        assert_eq!(l.remote, Some("[2001:db8::2]:7157".parse().unwrap()));
        assert_eq!(
            (l.direction.as_deref(), l.outcome.as_deref(), l.lived_ms),
            (Some("in"), None, None)
        );
        let back: Line = serde_json::from_str(&line(&l)).unwrap();
        assert_eq!(back, l);
    }
}
