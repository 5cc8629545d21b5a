//! Socket options on matching connections, set from the TCP state machine's own callbacks.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
        bpf_sock,
    },
    helpers::generated::bpf_setsockopt,
    macros::sock_ops,
    programs::SockOpsContext,
};
use tcpmgm_common::{Profile, event, flags, marks};

use aya_log_ebpf::info;

use crate::decide::conn;
use crate::endings;
use crate::events;
use crate::logbook;
use crate::sockets::{self, Decided};
use crate::stats;
use tcpmgm_common::options::{self, SOL_TCP, TCP_USER_TIMEOUT};

/// The kernel ignores `reply` unless a sock_ops program returns 1, so every path returns 1.
///
/// The policy is looked up in one place, and `op` is read again afterwards rather than carried
/// across the lookup: the verifier walks the lookup once per distinct known value it carries, so
/// holding `op` (or an inlined lookup per callback) multiplied the time a reload spends in it.
#[sock_ops]
pub fn tcpmgm_sock_ops(ctx: SockOpsContext) -> u32 {
    let wanted = match op(&ctx) {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        | BPF_SOCK_OPS_TCP_CONNECT_CB
        | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => true,
        // Only governed sockets ask for these (see `watch_end` and `established`).
        BPF_SOCK_OPS_RTT_CB | BPF_SOCK_OPS_RTO_CB => true,
        BPF_SOCK_OPS_STATE_CB => ctx.arg(1) == BPF_TCP_CLOSE,
        // Passive request sockets come here too: only active opens get a shorter SYN timeout.
        BPF_SOCK_OPS_TIMEOUT_INIT => state(&ctx) == BPF_TCP_SYN_SENT,
        _ => false,
    };
    if !wanted {
        return 1;
    }
    // SAFETY: ctx field load; the kernel gives a socket pointer or null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    let Some(d) = policy(&ctx, sk) else {
        return 1;
    };
    match op(&ctx) {
        BPF_SOCK_OPS_TIMEOUT_INIT => timeout_init(&ctx, &d),
        BPF_SOCK_OPS_TCP_CONNECT_CB => connect_started(&ctx, sk, &d),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx, &d, false),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            accepted(&ctx, sk, d.rule_id);
            established(&ctx, &d, true)
        }
        BPF_SOCK_OPS_STATE_CB => endings::closed(&ctx, sk, &d, ctx.arg(0)),
        BPF_SOCK_OPS_RTO_CB => retransmission_timeout(&ctx, &d),
        _ => slow_send(&ctx, d.rule_id, d.profile, false),
    }
    1
}

/// An accepted connection was decided: its event (not in `sockets::record`: see
/// `connect::verdict`), and the callbacks of its end. Not inlined, like every step below that
/// is not on every callback's path: what an inlined step keeps on the stack adds to the
/// program's own frame, and Linux 5.10 and 6.1 hold the frames of a call chain to 512 bytes.
#[inline(never)]
fn accepted(ctx: &SockOpsContext, sk: *mut bpf_sock, rule_id: u32) {
    events::emit(event::DECIDED, rule_id, &conn(ctx.ops), 0, 0);
    watch_end(ctx, sk, true);
}

/// Asks for the callbacks that tell how the connection ends (`endings`), and notes its start.
#[inline(always)]
fn watch_end(ctx: &SockOpsContext, sk: *mut bpf_sock, inbound: bool) {
    let wanted = BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;
    let _ = ctx.set_cb_flags((ctx.cb_flags() | wanted) as i32);
    endings::started(sk, inbound);
}

/// A retransmission timeout: when it has expired (args[2]) the kernel gives the connection up
/// next, which `endings` counts as a timeout. Slow for send_threshold either way.
#[inline(never)]
fn retransmission_timeout(ctx: &SockOpsContext, d: &Decided) {
    if ctx.arg(2) != 0 && !d.stored.is_null() {
        // SAFETY: non-null storage of this socket, valid for this program run.
        unsafe { (*d.stored).marks |= marks::TIMED_OUT };
    }
    if d.profile.send_threshold_us != 0 {
        slow_send(ctx, d.rule_id, d.profile, true);
    }
}

#[inline(always)]
fn state(ctx: &SockOpsContext) -> u32 {
    // SAFETY: plain ctx field load.
    unsafe { core::ptr::read_volatile(&(*ctx.ops).state) }
}

/// The callback, read from the context each time it is needed.
#[inline(always)]
fn op(ctx: &SockOpsContext) -> u32 {
    // SAFETY: plain ctx field load.
    unsafe { core::ptr::read_volatile(&(*ctx.ops).op) }
}

/// The decision of this socket (see `sockets`), or None: no rule, or no full socket.
#[inline(always)]
fn policy(ctx: &SockOpsContext, sk: *mut bpf_sock) -> Option<Decided> {
    if op(ctx) == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // An accepted socket meets this program once.
        return sockets::record(sk, &conn(ctx.ops));
    }
    sockets::stored(sk)
}

/// Sets an int option; a failure (the kernel refusing the option) is counted for the rule.
#[inline(always)]
fn set(ctx: &SockOpsContext, d: &Decided, level: i32, name: i32, value: u32) {
    let mut v = value as i32;
    // SAFETY: a full socket in a sock_ops callback; the option value is a 4-byte int on the stack.
    let r = unsafe {
        bpf_setsockopt(
            ctx.ops as *mut c_void,
            level,
            name,
            &mut v as *mut i32 as *mut c_void,
            4,
        )
    };
    if r != 0 {
        d.count(|s| s.setsockopt_failures += 1);
    }
}

/// Whether tcpmgm bounds this socket's handshake: its rule's connect_timeout is enforced, and
/// not in audit mode.
#[inline(always)]
fn bounds_handshake(d: &Decided) -> bool {
    d.profile.flags & flags::CONNECT_TIMEOUT != 0 && d.profile.connect_timeout_ms != 0 && !d.audit()
}

/// The SYN's first retransmission timeout, so that the connect timeout is not held back by the
/// default 1 s RTO.
fn timeout_init(ctx: &SockOpsContext, d: &Decided) {
    if bounds_handshake(d) && d.profile.syn_rto_jiffies != 0 {
        ctx.set_reply(d.profile.syn_rto_jiffies);
    }
}

/// TCP_USER_TIMEOUT bounds the whole handshake; `established` lifts it again. An application
/// that set its own TCP_USER_TIMEOUT (the setsockopt hook marks the socket) keeps it. The
/// marks stand in for reading the option back, which bpf_getsockopt cannot do before Linux 6.0.
#[inline(never)]
fn connect_started(ctx: &SockOpsContext, sk: *mut bpf_sock, d: &Decided) {
    watch_end(ctx, sk, false);
    if !bounds_handshake(d) || d.stored.is_null() {
        // Without storage the bound could never be lifted again: leave the handshake alone.
        return;
    }
    // SAFETY: non-null storage of this socket, valid for this program run.
    let record = unsafe { &mut *d.stored };
    if record.marks & marks::APP_USER_TIMEOUT == 0 {
        set(
            ctx,
            d,
            SOL_TCP,
            TCP_USER_TIMEOUT,
            d.profile.connect_timeout_ms,
        );
        record.marks |= marks::CONNECT_TIMEOUT;
    }
}

fn established(ctx: &SockOpsContext, d: &Decided, passive: bool) {
    let p = d.profile;
    // Lift the handshake bound, or it would keep cutting the connection whenever data stays
    // unacknowledged that long. What the application asked for meanwhile takes over.
    if !passive && !d.stored.is_null() {
        // SAFETY: non-null storage of this socket, valid for this program run.
        let record = unsafe { &mut *d.stored };
        if record.marks & marks::CONNECT_TIMEOUT != 0 {
            record.marks &= !marks::CONNECT_TIMEOUT;
            let after = if record.marks & marks::APP_USER_TIMEOUT != 0 {
                record.app_user_timeout_ms
            } else {
                0
            };
            set(ctx, d, SOL_TCP, TCP_USER_TIMEOUT, after);
        }
    }
    if !d.audit() {
        apply_keepalive(ctx, d);
    }
    if p.send_threshold_us != 0 {
        // Per-ACK callbacks for this socket only: connections that do not ask pay nothing. They
        // only observe, so audit mode asks for them too.
        let wanted = BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;
        let _ = ctx.set_cb_flags((ctx.cb_flags() | wanted) as i32);
    }
}

/// send_threshold: data stayed unacknowledged longer than the rule allows. An RTT sample whose
/// smoothed RTT is over the threshold, or a retransmission timeout, is counted for the rule and
/// logged (rate-limited). Not inlined: the log event's arguments would otherwise add to the
/// stack of the path that decides, which Linux 5.10 and 6.1 hold to 512 bytes across calls.
#[inline(never)]
fn slow_send(ctx: &SockOpsContext, rule: u32, p: &Profile, timeout: bool) {
    // SAFETY: plain ctx field load; the kernel keeps the smoothed RTT << 3, in µs.
    let srtt_us = unsafe { core::ptr::read_volatile(&(*ctx.ops).srtt_us) } >> 3;
    if !timeout && srtt_us <= p.send_threshold_us {
        return;
    }
    stats::bump(rule, |s| s.slow_sends += 1);
    if logbook::allow() {
        let threshold = p.send_threshold_us;
        if timeout {
            info!(
                ctx,
                "retransmission timeout on a connection of rule {} (send_threshold {} us)",
                rule,
                threshold
            );
        } else {
            info!(
                ctx,
                "smoothed RTT {} us over rule {}'s send_threshold of {} us",
                srtt_us,
                rule,
                threshold
            );
        }
    }
}

fn apply_keepalive(ctx: &SockOpsContext, d: &Decided) {
    for (level, name) in options::KEEPALIVE {
        if let Some(value) = d.profile.held_option(level, name) {
            set(ctx, d, level, name, value);
        }
    }
}
