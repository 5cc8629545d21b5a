//! tcpmgm's kernel side: look up the winning rule for a connection, then act on it.
//!
//! - `sock_ops`: keepalive options at establishment, connect timeout during the handshake.
//! - `connect`: refuse new outbound connections where the rule says no_new_conn.
//! - `sockopt`: the cgroup's own setsockopt() calls, seen beside the profile.
//! - `decide`: the shared lookup over the maps the loader compiled.
//! - `generation`: which rule set is in force, switched in one step.
//! - `sockets`: one decision per socket, kept in socket-local storage.
//! - `stats`: what each rule did, by rule id.
//! - `endings`: how each governed connection ended, by rule id.
//! - `events`: the event stream the daemon hands to `tcpmgm events`.
#![no_std]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_xadd: the BPF target has no atomic types"
)]
#![no_main]

mod connect;
mod decide;
mod endings;
mod events;
mod generation;
mod logbook;
mod maps;
mod sock_ops;
mod sockets;
mod sockopt;
mod stats;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
