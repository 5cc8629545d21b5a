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
use tcpmgm_common::{
    Profile, RuleStats, SOCK_NO_RULE, SOCK_RULE, SOCK_UNDECIDED, SockPolicy, marks, settings_marks,
};

use crate::decide::decide;
use crate::generation::Gen;
use crate::maps::TCPMGM_SOCKETS;
use crate::stats;
use tcpmgm_common::decide::Conn;

/// The storage of `sk` (created zeroed, that is undecided, if it has none and `create`), or
/// null when it has none or the kernel has no memory for it.
#[inline(always)]
pub fn storage(sk: *mut bpf_sock, create: bool) -> *mut SockPolicy {
    let map = core::ptr::from_ref(&TCPMGM_SOCKETS)
        .cast_mut()
        .cast::<c_void>();
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE.into()
    } else {
        0
    };
    // SAFETY: `sk` is the context's socket pointer, checked non-null by the caller.
    unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), flags) }.cast::<SockPolicy>()
}

/// A socket's decision: the profile that governs it, how it is enforced (`marks::AUDIT`,
/// `marks::APP_OPTIONS_ALLOW`, from the generation that decided it) and, when the socket has
/// storage, that storage (for the marks hooks leave on it).
pub struct Decided {
    pub profile: &'static Profile,
    pub marks: u32,
    /// Null when the kernel had no memory for the storage.
    pub stored: *mut SockPolicy,
}

impl Decided {
    /// Bumps one of the rule's counters.
    #[inline(always)]
    pub fn count(&self, bump: impl Fn(&mut RuleStats)) {
        stats::bump(self.profile.rule_id, bump);
    }

    /// Audit mode: decide and count, but act on nothing.
    #[inline(always)]
    pub fn audit(&self) -> bool {
        self.marks & marks::AUDIT != 0
    }
}

/// How sockets a generation decides are enforced, as socket marks.
#[inline(always)]
fn enforcement(g: &Gen) -> u32 {
    settings_marks(g.header().map_or(0, |h| h.flags))
}

/// The profile governing `sk`, deciding it with `conn` if no hook has yet. References, not
/// copies: with an `Option<Profile>` by value LLVM reads the flags of the None case from an
/// unset register, which the verifier refuses.
#[inline(always)]
pub fn policy(sk: *mut bpf_sock, conn: impl FnOnce() -> Conn) -> Option<Decided> {
    let stored = storage(sk, true);
    if stored.is_null() {
        // No memory for the storage: decide without remembering.
        let g = Gen::current()?;
        return decide_profile(&g, &conn()).map(|profile| Decided {
            profile,
            marks: enforcement(&g),
            stored,
        });
    }
    // SAFETY: non-null storage of our value type, valid for this program run.
    let record = unsafe { &mut *stored };
    if record.state == SOCK_UNDECIDED {
        // No generation yet (or one being retired): leave the socket for a later hook.
        let g = Gen::current()?;
        match decide_profile(&g, &conn()) {
            Some(p) => {
                record.profile = *p;
                record.generation = g.number;
                record.marks |= enforcement(&g);
                record.state = SOCK_RULE;
            }
            None => record.state = SOCK_NO_RULE,
        }
    }
    if record.state == SOCK_RULE {
        Some(Decided {
            profile: &record.profile,
            marks: record.marks,
            stored,
        })
    } else {
        None
    }
}

/// An accepted socket meets one hook only: decide it, and remember the profile (for the
/// application that owns the socket) only when a rule matched, so that unmatched connections
/// cost no storage.
#[inline(always)]
pub fn record(sk: *mut bpf_sock, conn: &Conn) -> Option<Decided> {
    let g = Gen::current()?;
    let p = decide_profile(&g, conn)?;
    let marks = enforcement(&g);
    let stored = storage(sk, true);
    if stored.is_null() {
        return Some(Decided {
            profile: p,
            marks,
            stored,
        });
    }
    // SAFETY: non-null storage of our value type, valid for this program run.
    let record = unsafe { &mut *stored };
    record.profile = *p;
    record.generation = g.number;
    record.marks |= marks;
    record.state = SOCK_RULE;
    Some(Decided {
        profile: &record.profile,
        marks: record.marks,
        stored,
    })
}

/// The profile of the winning rule, counted as matched, without remembering it.
#[inline(always)]
fn decide_profile(g: &Gen, conn: &Conn) -> Option<&'static Profile> {
    let p = g.profile(decide(g, conn)?)?;
    stats::bump(p.rule_id, |s| s.matched += 1);
    Some(p)
}
