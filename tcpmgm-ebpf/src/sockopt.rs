//! setsockopt() by the cgroup's processes. While tcpmgm's connect timeout holds a handshake
//! (TCP_USER_TIMEOUT set at TCP_CONNECT_CB), an application's own TCP_USER_TIMEOUT is kept aside
//! and takes over at establishment; before connect(), it marks the socket so that the connect
//! timeout leaves it alone. Every call still succeeds.
use aya_ebpf::{bindings::bpf_sockopt, macros::cgroup_sockopt, programs::SockoptContext};
use tcpmgm_common::marks;

use crate::options::{SOL_TCP, TCP_USER_TIMEOUT};
use crate::sockets;

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

fn user_timeout(so: *mut bpf_sockopt) {
    // SAFETY: ctx field load; the kernel gives a full socket in this hook.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    let Some(value) = int_value(so) else {
        return;
    };
    if sk.is_null() {
        return;
    }
    let stored = sockets::storage(sk, true);
    if stored.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket, valid for this program run; `value` was bounds
    // checked against optval_end.
    unsafe {
        let record = &mut *stored;
        record.marks |= marks::APP_USER_TIMEOUT;
        if record.marks & marks::CONNECT_TIMEOUT != 0 {
            // The handshake keeps its bound; the application's value follows at establishment.
            record.app_user_timeout_ms = *value as u32;
            *value = record.profile.connect_timeout_ms as i32;
        }
    }
}
