//! The event stream (`tcpmgm events`): decisions, refusals and ends, written into the ring
//! buffer `TCPMGM_EVENTS` for the daemon to hand to its subscribers. At most
//! `EVENTS_PER_SECOND` a CPU a second are written; the rest, and those the ring buffer has no
//! room for, are counted in `TCPMGM_EVENT_DROPS`, which the stream reports.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use tcpmgm_common::decide::Conn;
use tcpmgm_common::{EVENTS_PER_SECOND, event};

use crate::maps::{TCPMGM_EVENT_BUDGET, TCPMGM_EVENT_DROPS, TCPMGM_EVENTS};

/// Writes one event; not inlined, so that its stack stays off the deciding path's.
#[inline(never)]
pub fn emit(kind: u32, rule_id: u32, conn: &Conn, outcome: u32, lived_ms: u64) {
    if !allow() {
        dropped();
        return;
    }
    let Some(mut entry) = TCPMGM_EVENTS.reserve(0) else {
        dropped();
        return;
    };
    let mut flags = 0;
    if conn.v6 {
        flags |= event::V6;
    }
    if conn.passive {
        flags |= event::INBOUND;
    }
    // Field by field into the ring buffer's memory: an `Event` built on the stack first would
    // add its size to the stack of the hooks that call this.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry, an `Event`'s size, 8-byte aligned; every field is
    // written before the submit.
    unsafe {
        (*e).ts_ns = bpf_ktime_get_ns();
        (*e).lived_ms = lived_ms;
        (*e).kind = kind;
        (*e).rule_id = rule_id;
        (*e).outcome = outcome;
        (*e).flags = flags;
        (*e).remote = conn.remote;
        (*e).local = conn.local;
        (*e).remote_port = conn.remote_port;
        (*e).local_port = conn.local_port;
        (*e)._pad = 0;
    }
    entry.submit(0);
}

#[inline(always)]
fn dropped() {
    if let Some(n) = TCPMGM_EVENT_DROPS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *n += 1 };
    }
}

/// Whether this CPU may write one more event this second.
#[inline(always)]
fn allow() -> bool {
    crate::logbook::within(&TCPMGM_EVENT_BUDGET, EVENTS_PER_SECOND)
}
