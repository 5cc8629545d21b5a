//! no_new_conn: refuse connect() to a destination whose rule forbids new connections. Both
//! hooks are needed: an AF_INET6 socket connecting to `::ffff:a.b.c.d` only runs connect6.
//! The decision is stored with the socket (see `sockets`), so sock_ops applies the same rule.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::info;
use tcpmgm_common::{event, flags};

use crate::decide::{is_v4_mapped, load_words};
use crate::logbook;
use crate::sockets;
use tcpmgm_common::decide::Conn;

const SOCK_STREAM: u32 = 1;
const ALLOW: i32 = 1;
/// connect() fails with EPERM.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn tcpmgm_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: ctx field loads; `sk` is the context's socket, never null in this hook.
    unsafe {
        if core::ptr::read_volatile(&(*sa).type_) != SOCK_STREAM {
            return ALLOW;
        }
        let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
        let conn = Conn {
            v6: false,
            remote: [core::ptr::read_volatile(&(*sa).user_ip4), 0, 0, 0],
            remote_port: port(core::ptr::read_volatile(&(*sa).user_port)),
            local: [core::ptr::read_volatile(&(*sk).src_ip4), 0, 0, 0],
            local_port: core::ptr::read_volatile(&(*sk).src_port) as u16,
            passive: false,
        };
        verdict(&ctx, sk, conn)
    }
}

#[cgroup_sock_addr(connect6)]
pub fn tcpmgm_connect6(ctx: SockAddrContext) -> i32 {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in connect4; the address fields are read with fixed-offset loads.
    unsafe {
        if core::ptr::read_volatile(&(*sa).type_) != SOCK_STREAM {
            return ALLOW;
        }
        let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
        let remote = load_words(&(*sa).user_ip6);
        let local = load_words(&(*sk).src_ip6);
        let remote_port = port(core::ptr::read_volatile(&(*sa).user_port));
        let local_port = core::ptr::read_volatile(&(*sk).src_port) as u16;
        let conn = if is_v4_mapped(&remote) {
            let local4 = if is_v4_mapped(&local) { local[3] } else { 0 };
            Conn {
                v6: false,
                remote: [remote[3], 0, 0, 0],
                remote_port,
                local: [local4, 0, 0, 0],
                local_port,
                passive: false,
            }
        } else {
            Conn {
                v6: true,
                remote,
                remote_port,
                local,
                local_port,
                passive: false,
            }
        };
        verdict(&ctx, sk, conn)
    }
}

/// `user_port` holds the port in network order in its low 16 bits (unlike sock_ops, whose
/// `remote_port` the kernel shifts into the high 16 bits).
#[inline(always)]
fn port(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// Decides the socket (see `sockets`) and refuses when its rule says no_new_conn. Every
/// outbound socket is decided here, whether or not the rule set refuses anything: deciding it
/// later, in sock_ops, could let a reload in between give the socket the profile of a rule set
/// that would have refused it.
#[inline(always)]
fn verdict(ctx: &SockAddrContext, sk: *mut bpf_sock, conn: Conn) -> i32 {
    let (v6, remote, port) = (conn.v6, conn.remote, conn.remote_port);
    let decided = sockets::record(sk, &conn);
    // Here rather than in `record`: the event's frame would add to the deciding path's stack,
    // which Linux 5.10 holds to 512 bytes across calls.
    if let Some(d) = &decided {
        crate::events::emit(event::DECIDED, d.rule_id, &conn, 0, 0);
    }
    match decided {
        Some(d) if d.profile.flags & flags::NO_NEW_CONN != 0 => {
            let audit = d.audit();
            if audit {
                d.count(|c| c.would_refuse += 1);
            } else {
                d.count(|c| c.refused += 1);
            }
            let kind = if audit {
                event::WOULD_REFUSE
            } else {
                event::REFUSED
            };
            crate::events::emit(kind, d.rule_id, &conn, 0, 0);
            if logbook::allow() {
                let rule = d.rule_id;
                let verdict = if audit {
                    "would be refused (audit mode)"
                } else {
                    "refused"
                };
                if v6 {
                    let addr = crate::decide::v6_bytes(&remote);
                    info!(
                        ctx,
                        "connect() to [{:i}]:{} {} by rule {} (no_new_conn)",
                        addr,
                        port,
                        verdict,
                        rule
                    );
                } else {
                    let addr = u32::from_be(remote[0]);
                    info!(
                        ctx,
                        "connect() to {:i}:{} {} by rule {} (no_new_conn)",
                        addr,
                        port,
                        verdict,
                        rule
                    );
                }
            }
            if audit { ALLOW } else { REFUSE }
        }
        _ => ALLOW,
    }
}
