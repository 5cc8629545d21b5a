//! For a program of the governed cgroup (feature `client`): the rule tcpmgm chose for one of its
//! own sockets, and that rule's whole profile as the kernel recorded it when the connection was
//! made, the columns the kernel does not act on included (msg_read_timeout, send_threshold,
//! alias_mode, parallel_read, attrs).
//!
//! The records' pin is opened read-only, so a process that runs as a member of
//! `tcpmgm run --api-group GROUP` can read them without any capability (on kernels that let
//! bpf() lookups through to such a process: `tcpmgm features` says). This part pulls in aya and
//! libc only, none of the daemon's dependencies.
//!
//! ```no_run
//! use std::net::TcpStream;
//! use std::path::Path;
//! use tcpmgm_common::client::SocketRecords;
//!
//! // The pin directory `tcpmgm status` prints for the cgroup this process runs in.
//! let records = SocketRecords::open(Path::new("/sys/fs/bpf/tcpmgm/sip-slice"))?;
//! let conn = TcpStream::connect("192.0.2.10:5060")?;
//! match records.profile(&conn)? {
//!     Some(p) => println!("rule {}: {p}", p.rule_id),
//!     None => println!("no rule: the system's settings apply"),
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
extern crate std;

use core::fmt;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::string::String;
use std::vec::Vec;

use aya::maps::{Map, MapData, MapError, SkStorage};

use crate::{Profile, SOCK_RULE, SOCKETS_PIN, SockPolicy, flags};

/// The per-socket records of one cgroup's tcpmgm, opened read-only.
pub struct SocketRecords {
    map: SkStorage<MapData, SockPolicy>,
}

impl SocketRecords {
    /// Opens the records pinned in tcpmgm's pin directory `pin_dir`.
    pub fn open(pin_dir: &Path) -> io::Result<SocketRecords> {
        SocketRecords::open_pin(&pin_dir.join(SOCKETS_PIN))
    }

    /// Opens the records pinned at `pin` (`<pin_dir>/TCPMGM_SOCKETS_V<n>`).
    pub fn open_pin(pin: &Path) -> io::Result<SocketRecords> {
        let at = |e: MapError| io::Error::other(std::format!("{}: {e}", pin.display()));
        let fd = obj_get(pin, BPF_F_RDONLY).map_err(|e| {
            io::Error::new(
                e.kind(),
                std::format!("opening {} read-only: {e}", pin.display()),
            )
        })?;
        let map = MapData::from_fd(fd).map_err(at)?;
        let map = SkStorage::try_from(Map::SkStorage(map)).map_err(at)?;
        Ok(SocketRecords { map })
    }

    /// The record of `socket`, or None: no rule matched it, or tcpmgm has not seen it (made
    /// before tcpmgm attached, or not a TCP socket of the governed cgroups).
    pub fn record(&self, socket: &impl AsRawFd) -> io::Result<Option<SockPolicy>> {
        match self.map.get(socket, 0) {
            Ok(r) => Ok(Some(r)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) => Err(e.io_error),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// The profile of `socket`, or None: no rule matched it (or tcpmgm has not seen it).
    pub fn profile(&self, socket: &impl AsRawFd) -> io::Result<Option<SocketProfile>> {
        Ok(self
            .record(socket)?
            .as_ref()
            .and_then(SocketProfile::from_record))
    }
}

/// `file_flags` of BPF_OBJ_GET: read-only access, for which a pin readable by the caller's
/// group is enough (aya's `MapData::from_pin` asks for read-write access).
pub const BPF_F_RDONLY: u32 = 1 << 3;

/// BPF_OBJ_GET: the object pinned at `pin`, opened with `file_flags` (0: read-write).
pub fn obj_get(pin: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    /// `union bpf_attr`'s `obj_get` member.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let name = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size given, `name` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            core::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A rule's profile, in the table's units.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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

impl SocketProfile {
    /// The profile in a socket's record, when a rule matched it.
    pub fn from_record(record: &SockPolicy) -> Option<SocketProfile> {
        (record.state == SOCK_RULE).then(|| SocketProfile::from(&record.profile))
    }
}

impl From<&Profile> for SocketProfile {
    fn from(p: &Profile) -> SocketProfile {
        let attrs = p
            .attrs
            .iter()
            .filter(|a| a.key[0] != 0)
            .map(|a| {
                let len = a.key.iter().position(|&b| b == 0).unwrap_or(a.key.len());
                (String::from_utf8_lossy(&a.key[..len]).into_owned(), a.value)
            })
            .collect();
        SocketProfile {
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
        }
    }
}

/// The columns, named as in the table, with their units: `connect_timeout=100ms ...
/// keepinterval=10s`, then `attrs=k=v;k=v` when the rule has attrs.
impl fmt::Display for SocketProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connect_timeout={}ms con_lifetime={}s msg_read_timeout={}s send_threshold={}us \
             no_new_conn={} alias_mode={} parallel_read={} keepalive={} keepcount={} \
             keepidle={}s keepinterval={}s",
            self.connect_timeout_ms,
            self.con_lifetime_s,
            self.msg_read_timeout_s,
            self.send_threshold_us,
            u8::from(self.no_new_conn),
            self.alias_mode,
            self.parallel_read,
            u8::from(self.keepalive),
            self.keepcount,
            self.keepidle,
            self.keepinterval,
        )?;
        for (i, (key, value)) in self.attrs.iter().enumerate() {
            let lead = if i == 0 { " attrs=" } else { ";" };
            write!(f, "{lead}{key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Attr;

    #[test]
    fn a_record_reads_back_as_the_tables_columns() {
        let mut key = [0u8; crate::MAX_ATTR_KEY];
        key[..6].copy_from_slice(b"tenant");
        let mut record = SockPolicy {
            state: SOCK_RULE,
            profile: Profile {
                rule_id: 7,
                flags: flags::KEEPALIVE_ON | flags::NO_NEW_CONN,
                keepidle: 41,
                connect_timeout_ms: 250,
                ..Profile::default()
            },
            ..SockPolicy::default()
        };
        record.profile.attrs[0] = Attr { value: 9, key };
        let p = SocketProfile::from_record(&record).unwrap();
        assert_eq!((p.rule_id, p.keepidle, p.no_new_conn), (7, 41, true));
        assert_eq!(
            std::format!("{p}"),
            "connect_timeout=250ms con_lifetime=0s msg_read_timeout=0s send_threshold=0us \
             no_new_conn=1 alias_mode=0 parallel_read=0 keepalive=1 keepcount=0 keepidle=41s \
             keepinterval=0s attrs=tenant=9"
        );
        record.state = crate::SOCK_NO_RULE;
        assert_eq!(SocketProfile::from_record(&record), None);
    }
}
