//! The socket options a rule holds, read the same way by every path that applies them: the
//! sock_ops program when a connection is made, the setsockopt program when the application
//! tries to change one, and `--reapply-existing` for connections made before a reload.
//!
//! Values from include/uapi/asm-generic/socket.h and include/uapi/linux/tcp.h.
use crate::{Profile, flags};

pub const SOL_SOCKET: i32 = 1;
pub const SO_KEEPALIVE: i32 = 9;
pub const SOL_TCP: i32 = 6;
pub const TCP_KEEPIDLE: i32 = 4;
pub const TCP_KEEPINTVL: i32 = 5;
pub const TCP_KEEPCNT: i32 = 6;
pub const TCP_USER_TIMEOUT: i32 = 18;

/// The keepalive options, in the order they are applied: SO_KEEPALIVE first, as the keep*
/// values only count while it is on.
pub const KEEPALIVE: [(i32, i32); 4] = [
    (SOL_SOCKET, SO_KEEPALIVE),
    (SOL_TCP, TCP_KEEPIDLE),
    (SOL_TCP, TCP_KEEPINTVL),
    (SOL_TCP, TCP_KEEPCNT),
];

/// Whether option `name` of `level` is one of `KEEPALIVE`.
#[inline(always)]
pub fn is_keepalive(level: i32, name: i32) -> bool {
    KEEPALIVE.contains(&(level, name))
}

impl Profile {
    /// The value this profile holds option `name` of `level` at, or None where the rule leaves
    /// it to the system and the application: keepalive=0 holds SO_KEEPALIVE off and nothing
    /// else; keepalive=1 holds it on, and each keep* value the rule gives (0 is "not given").
    #[inline(always)]
    pub fn held_option(&self, level: i32, name: i32) -> Option<u32> {
        let on = self.flags & flags::KEEPALIVE_ON != 0;
        match (level, name) {
            (SOL_SOCKET, SO_KEEPALIVE) if self.flags & flags::KEEPALIVE_OFF != 0 => Some(0),
            (SOL_SOCKET, SO_KEEPALIVE) if on => Some(1),
            (SOL_TCP, TCP_KEEPIDLE) if on && self.keepidle != 0 => Some(self.keepidle),
            (SOL_TCP, TCP_KEEPINTVL) if on && self.keepintvl != 0 => Some(self.keepintvl),
            (SOL_TCP, TCP_KEEPCNT) if on && self.keepcnt != 0 => Some(self.keepcnt),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(p: &Profile) -> [Option<u32>; 4] {
        KEEPALIVE.map(|(level, name)| p.held_option(level, name))
    }

    #[test]
    fn keepalive_off_holds_only_so_keepalive_and_on_holds_the_given_values() {
        let mut p = Profile {
            flags: flags::KEEPALIVE_OFF,
            keepidle: 30,
            ..Profile::default()
        };
        assert_eq!(held(&p), [Some(0), None, None, None]);
        p.flags = flags::KEEPALIVE_ON;
        p.keepcnt = 4;
        assert_eq!(held(&p), [Some(1), Some(30), None, Some(4)]);
        p.flags = 0;
        assert_eq!(held(&p), [None; 4]);
        assert_eq!(p.held_option(SOL_TCP, TCP_USER_TIMEOUT), None);
        assert!(is_keepalive(SOL_TCP, TCP_KEEPCNT) && !is_keepalive(SOL_TCP, TCP_USER_TIMEOUT));
    }
}
