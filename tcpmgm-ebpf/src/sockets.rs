//! One decision per socket. The first hook that sees an outbound socket decides it and stores
//! the winning profile (or "no rule") in socket-local storage; every later hook applies the
//! stored decision. (An accepted socket meets one hook only, so it is decided there and then.)
//! So a socket is governed entirely by one rule set even when a reload lands between its
//! connect() and its establishment, and a reload never changes existing connections.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::generated::bpf_sk_storage_get,
};
use tcpmgm_common::{Profile, RuleCounters, SOCK_NO_RULE, SOCK_RULE, SOCK_UNDECIDED, SockPolicy};

use crate::decide::{Conn, decide};
use crate::maps::{TCPMGM_COUNTERS, TCPMGM_PROFILES, TCPMGM_SOCKETS};

/// The storage of `sk` (created zeroed, that is undecided, if it has none), or null when the
/// kernel has no memory for it.
#[inline(always)]
fn storage(sk: *mut bpf_sock) -> *mut SockPolicy {
    let map = core::ptr::from_ref(&TCPMGM_SOCKETS)
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: `sk` is the context's socket pointer, checked non-null by the caller.
    unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<SockPolicy>()
}

/// The profile governing `sk`, deciding it with `conn` if no hook has yet. A reference, not a
/// copy: with an `Option<Profile>` by value LLVM reads the flags of the None case from an unset
/// register, which the verifier refuses.
#[inline(always)]
pub fn policy(sk: *mut bpf_sock, conn: impl FnOnce() -> Conn) -> Option<&'static Profile> {
    let stored = storage(sk);
    if stored.is_null() {
        // No memory for the storage: decide without remembering.
        return decide_profile(&conn());
    }
    // SAFETY: non-null storage of our value type, valid for this program run.
    let stored = unsafe { &mut *stored };
    if stored.state == SOCK_UNDECIDED {
        match decide_profile(&conn()) {
            Some(p) => {
                stored.profile = *p;
                stored.state = SOCK_RULE;
            }
            None => stored.state = SOCK_NO_RULE,
        }
    }
    if stored.state == SOCK_RULE {
        Some(&stored.profile)
    } else {
        None
    }
}

/// An accepted socket meets one hook only: decide it, and remember the profile (for the
/// application that owns the socket) only when a rule matched, so that unmatched connections
/// cost no storage.
#[inline(always)]
pub fn record(sk: *mut bpf_sock, conn: &Conn) -> Option<&'static Profile> {
    let p = decide_profile(conn)?;
    let stored = storage(sk);
    if stored.is_null() {
        return Some(p);
    }
    // SAFETY: non-null storage of our value type, valid for this program run.
    let stored = unsafe { &mut *stored };
    stored.profile = *p;
    stored.state = SOCK_RULE;
    Some(&stored.profile)
}

/// The profile of the winning rule, counted as matched, without remembering it.
#[inline(always)]
pub fn decide_profile(conn: &Conn) -> Option<&'static Profile> {
    let rank = decide(conn)?;
    count(rank, |c| c.matched += 1);
    TCPMGM_PROFILES.get(rank)
}

/// Bumps one of a rule's per-CPU counters.
#[inline(always)]
pub fn count(rank: u32, bump: impl FnOnce(&mut RuleCounters)) {
    if let Some(c) = TCPMGM_COUNTERS.get_ptr_mut(rank) {
        // SAFETY: this CPU's slot of the per-CPU array; programs do not migrate mid-run.
        bump(unsafe { &mut *c });
    }
}
