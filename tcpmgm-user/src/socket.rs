//! For the application that owns a socket: the rule tcpmgm chose for it and that rule's whole
//! profile, as the kernel recorded it when the connection was made, including the columns the
//! kernel does not act on (msg_read_timeout, send_threshold, alias_mode, parallel_read, attrs).
//!
//! ```no_run
//! use std::net::TcpStream;
//! use std::path::Path;
//!
//! // In a process of the cgroup that `tcpmgm run --cgroup opensips` governs:
//! let profiles = tcpmgm::socket::SocketProfiles::for_cgroup(Path::new("opensips"))?;
//! let conn = TcpStream::connect("192.0.2.10:5060")?;
//! match profiles.get(&conn)? {
//!     Some(p) => println!("rule {}: read timeout {} s, attrs {:?}", p.rule_id, p.msg_read_timeout_s, p.attrs),
//!     None => println!("no rule: the system's settings apply"),
//! }
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```
use std::os::fd::AsRawFd;
use std::path::Path;

use aya::maps::{Map, MapData, MapError, SkStorage};
use tcpmgm_common::{SOCK_RULE, SockPolicy, flags};

use crate::kernel::KernelError;
pub use crate::kernel::SOCKETS_PIN;
use crate::system;

/// A socket's profile, in the table's units.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SocketProfile {
    pub rule_id: u32,
    pub connect_timeout_ms: u32,
    pub con_lifetime_s: u32,
    pub msg_read_timeout_s: u32,
    pub send_threshold_us: u32,
    pub no_new_conn: bool,
    pub alias_mode: u8,
    pub parallel_read: u8,
    pub keepalive: bool,
    pub keepcount: u32,
    pub keepidle: u32,
    pub keepinterval: u32,
    pub attrs: Vec<(String, i64)>,
}

/// The per-socket records of one cgroup's tcpmgm.
pub struct SocketProfiles {
    map: SkStorage<MapData, SockPolicy>,
}

impl SocketProfiles {
    /// Opens the records pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<SocketProfiles, KernelError> {
        let fail = |what: &str, e: String| KernelError::Map {
            map: "TCPMGM_SOCKETS",
            what: what.into(),
            reason: e,
        };
        let data = MapData::from_pin(pin_dir.join(SOCKETS_PIN))
            .map_err(|e| fail("opening its pin", e.to_string()))?;
        let map = SkStorage::try_from(Map::SkStorage(data))
            .map_err(|e| fail("opening", e.to_string()))?;
        Ok(SocketProfiles { map })
    }

    /// Opens the records of the cgroup tcpmgm governs at its default pin directory.
    pub fn for_cgroup(
        cgroup: &Path,
    ) -> Result<SocketProfiles, Box<dyn std::error::Error + Send + Sync>> {
        let cgroup = system::resolve_cgroup(cgroup)?;
        Ok(SocketProfiles::open(&system::default_pin_dir(&cgroup)?)?)
    }

    /// The profile of `socket`, or None: no rule matched it (or it was made before tcpmgm).
    pub fn get(&self, socket: &impl AsRawFd) -> Result<Option<SocketProfile>, MapError> {
        let record = match self.map.get(socket, 0) {
            Ok(r) => r,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(SocketProfile::from_record(&record))
    }
}

impl SocketProfile {
    /// The profile in a socket's record, when a rule matched it.
    pub fn from_record(record: &SockPolicy) -> Option<SocketProfile> {
        if record.state != SOCK_RULE {
            return None;
        }
        let p = record.profile;
        let attrs = p
            .attrs
            .iter()
            .filter(|a| a.key[0] != 0)
            .map(|a| {
                let len = a.key.iter().position(|&b| b == 0).unwrap_or(a.key.len());
                (String::from_utf8_lossy(&a.key[..len]).into_owned(), a.value)
            })
            .collect();
        Some(SocketProfile {
            rule_id: p.rule_id,
            connect_timeout_ms: p.connect_timeout_ms,
            con_lifetime_s: p.con_lifetime_s,
            msg_read_timeout_s: p.msg_read_timeout_s,
            send_threshold_us: p.send_threshold_us,
            no_new_conn: p.flags & flags::NO_NEW_CONN != 0,
            alias_mode: p.alias_mode,
            parallel_read: p.parallel_read,
            keepalive: p.flags & flags::KEEPALIVE_ON != 0,
            keepcount: p.keepcnt,
            keepidle: p.keepidle,
            keepinterval: p.keepintvl,
            attrs,
        })
    }
}

/// A connection of the cgroup, as `tcpmgm conns` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Connection {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub established: bool,
    /// Milliseconds since data last moved either way.
    pub idle_ms: u32,
    /// None: no rule, the system's settings apply.
    pub profile: Option<SocketProfile>,
}

/// The TCP connections of `cgroup` and the cgroups below it in this network namespace, with their profiles (from the
/// records in the socket map pinned at `sockets_pin`).
pub fn connections(cgroup: &Path, sockets_pin: &Path) -> std::io::Result<Vec<Connection>> {
    use std::os::fd::AsFd;
    let tree = crate::system::Subtree::of(cgroup)?;
    let map = MapData::from_pin(sockets_pin).map_err(std::io::Error::other)?;
    Ok(crate::diag::tcp_sockets(Some(map.fd().as_fd()))?
        .into_iter()
        .filter(|s| tree.contains(s.cgroup_id))
        .map(|s| Connection {
            local: s.local,
            remote: s.remote,
            established: s.established(),
            idle_ms: s.idle_ms(),
            profile: s.record.as_ref().and_then(SocketProfile::from_record),
        })
        .collect())
}
