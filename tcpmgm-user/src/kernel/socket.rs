//! The per-socket records: the application API (`tcpmgm_common::client`, re-exported here, which
//! a SIP server written in Rust uses without this crate's dependencies), and the connections of
//! a cgroup with the profile each carries, as `tcpmgm conns` lists them.
use std::path::Path;

pub use tcpmgm_common::SOCKETS_PIN;
pub use tcpmgm_common::client::{SocketProfile, SocketRecords};

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
    let map = aya::maps::MapData::from_pin(sockets_pin).map_err(std::io::Error::other)?;
    Ok(crate::kernel::diag::tcp_sockets(Some(map.fd().as_fd()))?
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
