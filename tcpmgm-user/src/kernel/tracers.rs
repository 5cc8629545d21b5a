//! The outcome tracers (tcpmgm-ebpf's `endings`): BTF tracing programs that leave a mark on a
//! governed socket's record when a reset arrives, when the application closes the socket and
//! when it is destroyed, so that the state callbacks tell a reset by the peer, an abort on this
//! host and unanswered keepalive probes apart. They run for every TCP socket of the host and act
//! only on sockets with a record in this cgroup's `TCPMGM_SOCKETS`.
//!
//! They need tracing programs that may read socket storage (Linux 5.11) and the kernel's BTF.
//! Without them the connections still end counted, with those three outcomes together as
//! `aborted`; `tcpmgm features` and the daemon's log say so.
use std::os::fd::{AsFd, OwnedFd};

use aya::Ebpf;
use aya::programs::{BtfTracePoint, FEntry, ProgramError};
use tcpmgm_common::names;

use super::sys;

enum Kind {
    FEntry,
    TpBtf,
}

pub(crate) struct Tracer {
    pub name: &'static str,
    kind: Kind,
    /// The kernel function or tracepoint.
    pub target: &'static str,
    /// The link's pin name in the pin directory.
    pub pin: &'static str,
}

pub(crate) const TRACERS: [Tracer; 3] = [
    Tracer {
        name: names::END_RESET,
        kind: Kind::TpBtf,
        target: "tcp_receive_reset",
        pin: "TCPMGM_LINK_END_RESET",
    },
    Tracer {
        name: names::END_CLOSE,
        kind: Kind::FEntry,
        target: "tcp_close",
        pin: "TCPMGM_LINK_END_CLOSE",
    },
    Tracer {
        name: names::END_ABORT,
        kind: Kind::FEntry,
        target: "tcp_abort",
        pin: "TCPMGM_LINK_END_ABORT",
    },
];

/// Loads and attaches every tracer: their links, in `TRACERS` order, or why they could not be
/// (none is attached then).
pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Vec<OwnedFd>, String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("reading the kernel's BTF: {e}"))?;
    let mut links = Vec::new();
    for t in &TRACERS {
        let fail = |e: ProgramError| format!("loading {} ({}): {}", t.name, t.target, reason(e));
        let program = ebpf
            .program_mut(t.name)
            .expect("the object defines every tracer");
        let fd = match t.kind {
            Kind::FEntry => {
                let p: &mut FEntry = program.try_into().map_err(fail)?;
                p.load(t.target, &btf).map_err(fail)?;
                p.fd().map_err(fail)?.as_fd().try_clone_to_owned()
            }
            Kind::TpBtf => {
                let p: &mut BtfTracePoint = program.try_into().map_err(fail)?;
                p.load(t.target, &btf).map_err(fail)?;
                p.fd().map_err(fail)?.as_fd().try_clone_to_owned()
            }
        }
        .map_err(|e| format!("{}: {e}", t.name))?;
        let link = sys::tracing_attach(fd.as_fd())
            .map_err(|e| format!("attaching {} to {}: {e}", t.name, t.target))?;
        links.push(link);
    }
    Ok(links)
}

/// The verifier's last words, or the error.
fn reason(e: ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = format!("{verifier_log:?}");
            // The reason, not the statistics the verifier ends with.
            let last = log
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| {
                    !l.is_empty()
                        && !l.starts_with("processed ")
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                })
                .unwrap_or("");
            format!("{io_error}; the verifier said: {last}")
        }
        e => e.to_string(),
    }
}
