//! setsockopt() by the cgroup's processes, seen before the kernel acts on it. Every call still
//! succeeds, so the application does not break.
//!
//! - Authoritative profiles: on a socket whose rule sets SO_KEEPALIVE, TCP_KEEPIDLE,
//!   TCP_KEEPINTVL or TCP_KEEPCNT, the value the application passes is replaced by the rule's,
//!   so a SIP server that applies its own keepalive settings after accept() or connect() leaves
//!   the effective value (and what getsockopt reports) as the rule says. Each such call that
//!   would have changed the value is counted for the rule. Not in audit mode, nor with
//!   `--app-options allow`.
//! - TCP_USER_TIMEOUT: while tcpmgm's connect timeout holds a handshake, the application's value
//!   is kept aside and takes over at establishment; before connect(), it marks the socket so
//!   that the connect timeout leaves it alone.
use aya_ebpf::{bindings::bpf_sockopt, macros::cgroup_sockopt, programs::SockoptContext};
use tcpmgm_common::{SOCK_RULE, SockPolicy, marks};

use crate::{sockets, stats};
use tcpmgm_common::options::{self, SOL_TCP, TCP_USER_TIMEOUT};

/// Let the kernel carry on with the (possibly rewritten) option.
const PROCEED: i32 = 1;

#[cgroup_sockopt(setsockopt)]
pub fn tcpmgm_sockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: ctx field loads.
    let (level, name) = unsafe {
        (
            core::ptr::read_volatile(&(*so).level),
            core::ptr::read_volatile(&(*so).optname),
        )
    };
    if level == SOL_TCP && name == TCP_USER_TIMEOUT {
        user_timeout(so);
    } else if options::is_keepalive(level, name) {
        keepalive(so, level, name);
    }
    PROCEED
}

/// The int the application passes, and where it lies, or None when it passed less than an int.
#[inline(always)]
fn int_value(so: *mut bpf_sockopt) -> Option<*mut i32> {
    // SAFETY: ctx field loads; the verifier checks the access against optval_end below.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if start.is_null() || start.add(4) > end {
            return None;
        }
        Some(start.cast::<i32>())
    }
}

/// The socket's record, if it has one (none is made here).
#[inline(always)]
fn record(so: *mut bpf_sockopt, create: bool) -> Option<&'static mut SockPolicy> {
    // SAFETY: ctx field load; the kernel gives a full socket in this hook.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    let stored = sockets::storage(sk, create);
    // SAFETY: non-null storage of this socket, valid for this program run.
    (!stored.is_null()).then(|| unsafe { &mut *stored })
}

fn keepalive(so: *mut bpf_sockopt, level: i32, name: i32) {
    let Some(record) = record(so, false) else {
        return;
    };
    if record.state != SOCK_RULE || record.marks & (marks::AUDIT | marks::APP_OPTIONS_ALLOW) != 0 {
        return;
    }
    let p = &record.profile;
    let Some(rule) = p.held_option(level, name) else {
        return;
    };
    let Some(value) = int_value(so) else {
        return;
    };
    // SAFETY: `value` was bounds checked against optval_end.
    unsafe {
        if *value as u32 != rule {
            *value = rule as i32;
            stats::bump(p.rule_id, |s| s.overrides_prevented += 1);
        }
    }
}

fn user_timeout(so: *mut bpf_sockopt) {
    let Some(value) = int_value(so) else {
        return;
    };
    let Some(record) = record(so, true) else {
        return;
    };
    record.marks |= marks::APP_USER_TIMEOUT;
    if record.marks & marks::CONNECT_TIMEOUT != 0 {
        // SAFETY: `value` was bounds checked against optval_end.
        unsafe {
            // The handshake keeps its bound; the application's value follows at establishment.
            record.app_user_timeout_ms = *value as u32;
            *value = record.profile.connect_timeout_ms as i32;
        }
    }
}
