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

/// The profile governing `sk`, deciding it with `conn` if no hook has yet. A reference, not a
/// copy: with an `Option<Profile>` by value LLVM reads the flags of the None case from an unset
/// register, which the verifier refuses.
#[inline(always)]
pub fn policy(sk: *mut bpf_sock, conn: impl FnOnce() -> Conn) -> Option<&'static Profile> {
    let map = core::ptr::from_ref(&TCPMGM_SOCKETS)
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: `sk` is the context's socket pointer, checked non-null by the caller; the storage
    // (zeroed when created) stays valid for this program run, which is all the caller uses.
    let stored = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<SockPolicy>();
    if stored.is_null() {
        // No memory for the storage: decide without remembering.
        return decide_profile(&conn());
    }
    // SAFETY: non-null storage of our value type.
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
