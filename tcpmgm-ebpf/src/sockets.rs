//! One decision per socket. The connect hook decides an outbound socket and stores the winning
//! profile in socket-local storage; every later hook applies the stored decision. A socket no
//! rule matched gets no storage (making it is most of what a hook costs): no storage means "no
//! rule". (An accepted socket meets one hook only, so it is decided there and then.) So a
//! socket is governed entirely by one rule set even when a reload lands between its connect()
//! and its establishment, and a reload never changes existing connections.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::generated::bpf_sk_storage_get,
};
use tcpmgm_common::{Profile, RuleStats, SOCK_RULE, SockPolicy, marks, settings_marks};

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
    /// The winning rule's id.
    pub rule_id: u32,
    /// Its profile: the socket's record, or (no storage) the generation's shared profile,
    /// whose own `rule_id` is not the rule's.
    pub profile: &'static Profile,
    pub marks: u32,
    /// Null when the kernel had no memory for the storage.
    pub stored: *mut SockPolicy,
}

impl Decided {
    /// Bumps one of the rule's counters.
    #[inline(always)]
    pub fn count(&self, bump: impl Fn(&mut RuleStats)) {
        stats::bump(self.rule_id, bump);
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

/// An outbound socket in a hook after connect(): the decision the connect hook stored (see
/// `record`). A socket without a decided rule in its storage is no rule's: the connect hook
/// found none, or the socket connected before tcpmgm attached (which `--reapply-existing` is
/// for). It is not decided here: a reload between connect() and this hook must not give it
/// another rule set's profile.
#[inline(always)]
pub fn stored(sk: *mut bpf_sock) -> Option<Decided> {
    let stored = storage(sk, false);
    if stored.is_null() {
        return None;
    }
    // SAFETY: non-null storage of our value type, valid for this program run.
    let record = unsafe { &*stored };
    (record.state == SOCK_RULE).then_some(Decided {
        rule_id: record.profile.rule_id,
        profile: &record.profile,
        marks: record.marks,
        stored,
    })
}

/// Decides a socket: an accepted one (which meets one hook only) or an outbound one at
/// connect(). The decision is remembered (for the later hooks and for the application that owns
/// the socket) only when a rule matched, so that unmatched connections cost no storage; storage
/// the socket already has (the application gave it options before connect(), see `sockopt`) is
/// filled in. Should the kernel have no memory for it, the rule still decides this hook.
#[inline(always)]
pub fn record(sk: *mut bpf_sock, conn: &Conn) -> Option<Decided> {
    let g = Gen::current()?;
    let rank = decide(&g, conn)?;
    let (rule_id, p) = g.rule(rank)?;
    stats::bump(rule_id, |s| s.matched += 1);
    let marks = enforcement(&g);
    let stored = storage(sk, true);
    if stored.is_null() {
        return Some(Decided {
            rule_id,
            profile: p,
            marks,
            stored,
        });
    }
    // SAFETY: non-null storage of our value type, valid for this program run.
    let record = unsafe { &mut *stored };
    record.profile = *p;
    record.profile.rule_id = rule_id;
    record.profile.rank = rank;
    record.generation = g.number;
    record.marks |= marks;
    record.state = SOCK_RULE;
    Some(Decided {
        rule_id,
        profile: &record.profile,
        marks: record.marks,
        stored,
    })
}
