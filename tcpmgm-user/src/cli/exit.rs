//! The exit status says what failed, in sysexits(3)'s numbers, so that systemd (and a script)
//! can tell a fault no restart will mend from one that may pass: the unit's
//! `RestartPreventExitStatus=` lists the permanent ones (64, 65, 77, 78) and restarts on the
//! others, a database outage (69) first of all.
//!
//! The status is read from the error values, never from their text: from the outermost cause
//! in, the first whose type says what it means decides. Wrappers that only add context say
//! nothing and pass on to their cause; an `io::Error` (or errno) deep in a kernel error says
//! EPERM or EACCES when that is what a syscall answered.
use std::error::Error;
use std::process::ExitCode;

use crate::config::ConfigError;
use crate::daemon::DaemonError;
use crate::policy::listener::ListenerError;
use crate::policy::opensips_cfg::CfgError;
use crate::policy::pipeline::PipelineError;
use crate::policy::source::SourceError;
use crate::system::SystemError;

/// What a command's failure was, as its exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 1: anything the others do not name (a kernel refusal, another daemon on the cgroup).
    Other = 1,
    /// 64, EX_USAGE: the command line (clap's errors).
    Usage = 64,
    /// 65, EX_DATAERR: the table: a bad row (without --skip-invalid), no tcp_mgm table, or
    /// more rules than the daemon's memory limit holds.
    Data = 65,
    /// 69, EX_UNAVAILABLE: the database did not answer, or not in time; it may come back.
    Unavailable = 69,
    /// 77, EX_NOPERM: missing privileges (capabilities, or EPERM/EACCES from the kernel).
    NoPermission = 77,
    /// 78, EX_CONFIG: the configuration: the TOML file, opensips.cfg, a listener, a value.
    Config = 78,
}

impl Failure {
    /// What `e` means for the exit status.
    pub fn of(e: &anyhow::Error) -> Failure {
        e.chain().find_map(classify).unwrap_or(Failure::Other)
    }

    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }
}

/// What one cause says, if its type says anything.
fn classify(e: &(dyn Error + 'static)) -> Option<Failure> {
    if let Some(e) = e.downcast_ref::<DaemonError>() {
        daemon(e)
    } else if let Some(e) = e.downcast_ref::<PipelineError>() {
        Some(pipeline(e))
    } else if let Some(e) = e.downcast_ref::<SourceError>() {
        Some(source(e))
    } else if let Some(e) = e.downcast_ref::<SystemError>() {
        system(e)
    } else if e.is::<ConfigError>() || e.is::<CfgError>() || e.is::<ListenerError>() {
        Some(Failure::Config)
    } else if let Some(e) = e.downcast_ref::<std::io::Error>() {
        e.raw_os_error().and_then(errno)
    } else if let Some(e) = e.downcast_ref::<nix::errno::Errno>() {
        errno(*e as i32)
    } else {
        None
    }
}

/// The daemon's own errors; its transparent variants hand their source to the chain without
/// appearing in it, so they are opened here.
fn daemon(e: &DaemonError) -> Option<Failure> {
    match e {
        DaemonError::Rules(e) => Some(pipeline(e)),
        DaemonError::Invalid { .. } => Some(Failure::Data),
        DaemonError::Timeout(_) => Some(Failure::Unavailable),
        DaemonError::System(e) => system(e),
        DaemonError::Config(_) => Some(Failure::Config),
        // Said by their causes, if at all (an io::Error's errno).
        DaemonError::Compile(_)
        | DaemonError::Kernel(_)
        | DaemonError::Claim(_)
        | DaemonError::Control { .. }
        | DaemonError::Metrics { .. } => None,
    }
}

fn pipeline(e: &PipelineError) -> Failure {
    match e {
        PipelineError::Source(e) => source(e),
        PipelineError::Listener(_) => Failure::Config,
        // What must change is the table (or the memory limit): a restart reads the same.
        PipelineError::Memory(_) => Failure::Data,
    }
}

fn source(e: &SourceError) -> Failure {
    match e {
        SourceError::Connect {
            source: sqlx::Error::Configuration(_),
            ..
        } => Failure::Config,
        // Refused, unreachable, still starting, a role or file not there yet: all may pass.
        SourceError::Connect { .. } => Failure::Unavailable,
        SourceError::Query { source, .. } if lost_connection(source) => Failure::Unavailable,
        SourceError::Query { source, .. } if not_in_the_table(source) => Failure::Data,
        SourceError::Query { .. } => Failure::Other,
        SourceError::MissingColumn { .. } | SourceError::NoTable { .. } => Failure::Data,
        SourceError::Unsupported { .. } => Failure::Config,
    }
}

/// A query that failed because the connection did, not because of what it asked.
fn lost_connection(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// A query the table's shape refused: a column (a renamed one, say) or the table not there.
/// PostgreSQL's SQLSTATE 42703/42P01, MariaDB's errors 1054/1146, SQLite's message (its error
/// code for both is the generic 1).
fn not_in_the_table(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    matches!(
        db.code().as_deref(),
        Some("42703" | "42P01" | "42S22" | "42S02" | "1054" | "1146")
    ) || db.message().starts_with("no such column")
        || db.message().starts_with("no such table")
}

fn system(e: &SystemError) -> Option<Failure> {
    match e {
        SystemError::NotPrivileged(_) | SystemError::OptionNotPrivileged(_) => {
            Some(Failure::NoPermission)
        }
        SystemError::NoSuchGroup { .. } => Some(Failure::Config),
        SystemError::Read { source, .. } => source.raw_os_error().and_then(errno),
        SystemError::MountBpffs { source, .. } => errno(*source as i32),
        // A cgroup may appear when its slice starts; the others are the host's.
        SystemError::NoCgroup2 | SystemError::NoSuchCgroup(_) | SystemError::Hz(_) => None,
    }
}

fn errno(errno: i32) -> Option<Failure> {
    (errno == libc::EPERM || errno == libc::EACCES).then_some(Failure::NoPermission)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::source::Redacted;

    #[test]
    fn the_first_cause_that_says_decides() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect = SourceError::Connect {
            url: Redacted::new("postgres://u:p@127.0.0.1:1/x"),
            source: sqlx::Error::Io(refused),
        };
        let e = anyhow::Error::new(DaemonError::Rules(PipelineError::Source(connect)))
            .context("starting");
        assert_eq!(Failure::of(&e), Failure::Unavailable);

        let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
        let e = anyhow::Error::new(eperm).context("attaching the sock_ops link");
        assert_eq!(Failure::of(&e), Failure::NoPermission);

        let e = anyhow::anyhow!("EPERM in the text alone says nothing");
        assert_eq!(Failure::of(&e), Failure::Other);

        let e = anyhow::Error::new(ConfigError::Missing {
            key: "cgroup",
            flag: "cgroup",
        });
        assert_eq!((Failure::of(&e) as u8), 78);
    }
}
