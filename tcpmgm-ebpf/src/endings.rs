//! How each governed connection ends, counted for its rule (`TCPMGM_OUTCOMES`).
//!
//! The sock_ops program asks for state callbacks on the sockets it governs and meets each one's
//! move to TCP_CLOSE (`closed`). The state it leaves tells a normal close (FINs exchanged) from
//! a failed handshake and from an abort; marks left on the socket's record tell the aborts
//! apart:
//! - `TIMED_OUT`, from the retransmission-timeout callback whose timeout has expired: the user
//!   timeout, the connect timeout or the retransmission limit;
//! - the sweeper's cookie in `TCPMGM_CLOSING`: con_lifetime;
//! - `PEER_RESET`, `APP_CLOSED`, `DESTROYED`, left by the tracers below on kernels whose
//!   tracing programs can read socket storage (Linux 5.11). What none of these explains is a
//!   peer that stopped answering the keepalive probes. Without the tracers (`TRACED` not on the
//!   socket) a reset, an abort on this host and unanswered probes are counted together as
//!   `aborted`, never guessed.
use core::ffi::c_void;
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING,
        BPF_TCP_ESTABLISHED, BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
        BPF_TCP_SYN_RECV, BPF_TCP_SYN_SENT, BPF_TCP_TIME_WAIT, bpf_sock,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_storage_get},
    macros::{btf_tracepoint, fentry},
    programs::{BtfTracePointContext, FEntryContext, SockOpsContext},
};
use tcpmgm_common::{LIFETIME_BUCKETS_S, Outcomes, SOCK_RULE, SockPolicy, event, marks, outcome};

use crate::maps::{TCPMGM_CLOSING, TCPMGM_OUTCOMES, TCPMGM_SOCKETS, TCPMGM_STARTS};
use crate::sockets::Decided;

/// Notes when a governed connection starts (connect() or acceptance): the time in ns, its
/// lowest bit set for an accepted connection.
#[inline(always)]
pub fn started(sk: *mut bpf_sock, inbound: bool) {
    let map = core::ptr::from_ref(&TCPMGM_STARTS)
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: a full socket from the sock_ops context; the storage holds a u64.
    let start = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<u64>();
    if !start.is_null() {
        // SAFETY: this socket's storage, valid for this program run; a helper without arguments.
        unsafe { *start = (bpf_ktime_get_ns() & !1) | u64::from(inbound) };
    }
}

/// The connection moved to TCP_CLOSE from `old`: counts its outcome and lifetime for its rule.
/// Not inlined: one copy, outside the decision's path.
#[inline(never)]
pub fn closed(ctx: &SockOpsContext, sk: *mut bpf_sock, d: &Decided, old: u32) {
    let m = if d.stored.is_null() {
        d.marks
    } else {
        // SAFETY: non-null storage of this socket, valid for this program run.
        unsafe { (*d.stored).marks }
    };
    let timed_out = m & marks::TIMED_OUT != 0;
    let which = match old {
        BPF_TCP_SYN_SENT | BPF_TCP_SYN_RECV if timed_out => outcome::CONNECT_TIMEOUT,
        BPF_TCP_SYN_SENT | BPF_TCP_SYN_RECV => outcome::CONNECT_FAILED,
        BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 | BPF_TCP_CLOSING | BPF_TCP_LAST_ACK
        | BPF_TCP_TIME_WAIT
            if timed_out =>
        {
            outcome::TIMEOUT
        }
        BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 | BPF_TCP_CLOSING | BPF_TCP_LAST_ACK
        | BPF_TCP_TIME_WAIT => outcome::CLOSED,
        BPF_TCP_ESTABLISHED | BPF_TCP_CLOSE_WAIT => aborted(ctx, m),
        _ => return,
    };
    let map = core::ptr::from_ref(&TCPMGM_STARTS)
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: as in `started`, without creating.
    let start =
        unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }.cast::<u64>();
    let (lived_ms, inbound) = if start.is_null() {
        (None, false)
    } else {
        // SAFETY: non-null storage, valid for this program run.
        let start = unsafe { *start };
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        (
            Some(now.saturating_sub(start & !1) / 1_000_000),
            start & 1 != 0,
        )
    };
    count(d.rule_id, which, lived_ms.unwrap_or(u64::MAX));
    let mut conn = crate::decide::conn(ctx.ops);
    conn.passive = inbound;
    crate::events::emit(
        event::ENDED,
        d.rule_id,
        &conn,
        which as u32,
        lived_ms.unwrap_or(u64::MAX),
    );
}

/// An established connection that ended without FINs exchanged.
#[inline(always)]
fn aborted(ctx: &SockOpsContext, m: u32) -> usize {
    // SAFETY: the sock_ops context of a full socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if TCPMGM_CLOSING.get_ptr(cookie).is_some() {
        return outcome::LIFETIME;
    }
    if m & marks::TIMED_OUT != 0 {
        outcome::TIMEOUT
    } else if m & marks::TRACED == 0 {
        outcome::ABORTED
    } else if m & marks::PEER_RESET != 0 {
        outcome::RESET
    } else if m & (marks::APP_CLOSED | marks::DESTROYED) != 0 {
        outcome::LOCAL_ABORT
    } else {
        outcome::KEEPALIVE
    }
}

/// A rule's outcomes before its first end; the first end inserts it (from read-only data, not
/// from the stack, whose frames a call chain must keep under 512 bytes on Linux 5.10 and 6.1)
/// and then adds to it like every later end.
static NO_ENDS: Outcomes = Outcomes {
    ended: [0; outcome::COUNT],
    lived_ms: 0,
    lived: [0; LIFETIME_BUCKETS_S.len() + 1],
};

/// Adds one end to the rule's outcomes, making the rule's entry at its first end (an entry
/// another CPU made meanwhile is added to instead).
/// `lived_ms` is u64::MAX when the start is unknown: an `Option` would cross the call as two
/// registers, one of them unset for None, which the verifier refuses to read.
#[inline(never)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "NO_ENDS by value would be copied onto the stack; by reference it is read in place"
)]
fn count(rule_id: u32, which: usize, lived_ms: u64) {
    if which >= outcome::COUNT {
        return;
    }
    let lived_ms = (lived_ms != u64::MAX).then_some(lived_ms);
    let bucket = lived_ms.map(|ms| {
        let mut i = 0;
        while i < LIFETIME_BUCKETS_S.len() && ms > LIFETIME_BUCKETS_S[i] * 1000 {
            i += 1;
        }
        i
    });
    let o = match TCPMGM_OUTCOMES.get_ptr_mut(rule_id) {
        Some(o) => o,
        None => {
            let _ = TCPMGM_OUTCOMES.insert(rule_id, &NO_ENDS, BPF_NOEXIST.into());
            match TCPMGM_OUTCOMES.get_ptr_mut(rule_id) {
                Some(o) => o,
                // The map is full: the end goes uncounted.
                None => return,
            }
        }
    };
    add(o, which, lived_ms, bucket);
}

#[inline(always)]
fn add(o: *mut Outcomes, which: usize, lived_ms: Option<u64>, bucket: Option<usize>) {
    // SAFETY: a map value, valid for this program run, shared with other CPUs: every write is
    // an atomic add.
    unsafe {
        bump(&mut (*o).ended[which], 1);
        if let (Some(ms), Some(b)) = (lived_ms, bucket) {
            bump(&mut (*o).lived_ms, ms);
            if b < (*o).lived.len() {
                bump(&mut (*o).lived[b], 1);
            }
        }
    }
}

#[inline(always)]
fn bump(counter: &mut u64, by: u64) {
    // SAFETY: an aligned u64 of a map value. The result is unused, so this is the plain atomic
    // add every kernel takes (BPF_XADD); the BPF target has no atomic types, hence the intrinsic.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, by) };
}

/// Leaves `mark` on the record of `sk` if a rule governs it.
#[inline(always)]
fn mark(sk: *mut c_void, mark: u32) {
    if sk.is_null() {
        return;
    }
    let map = core::ptr::from_ref(&TCPMGM_SOCKETS)
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: `sk` is the traced function's socket (a BTF pointer the verifier checks).
    let record =
        unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), 0) }.cast::<SockPolicy>();
    if record.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket, valid for this program run.
    let record = unsafe { &mut *record };
    if record.state == SOCK_RULE {
        record.marks |= mark;
    }
}

/// A reset arrived (tcp_reset(), before the connection is closed).
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcpmgm_rst(ctx: BtfTracePointContext) -> i32 {
    mark(ctx.arg(0), marks::PEER_RESET);
    0
}

/// The application closes the socket (an abort when it had unread data or SO_LINGER 0).
#[fentry(function = "tcp_close")]
pub fn tcpmgm_close(ctx: FEntryContext) -> i32 {
    mark(ctx.arg(0), marks::APP_CLOSED);
    0
}

/// The socket is destroyed on this host (sock_diag's SOCK_DESTROY: `ss -K`, the sweeper).
#[fentry(function = "tcp_abort")]
pub fn tcpmgm_abort(ctx: FEntryContext) -> i32 {
    mark(ctx.arg(0), marks::DESTROYED);
    0
}
