//! What the reloader is asked, by the control socket, the table's watcher, the cgroup's keeper
//! and the signal handlers: its one inbox, so that none of them depends on the reloader.
use tokio::sync::oneshot;

use super::DaemonError;

/// What the reloader is asked.
pub enum Request {
    /// Reload the table; `reply` (if any) gets the report or the reason it failed. `automatic`:
    /// nobody asked (a table change), so a failure is retried.
    Reload {
        reply: Option<oneshot::Sender<Result<String, String>>>,
        automatic: bool,
        /// Read the whole table, whatever its change log says.
        full: bool,
        /// The rows a notification named (each changed, added or removed, and nothing else);
        /// None when nobody said which.
        rows: Option<Vec<i64>>,
    },
    /// Govern the cgroup made again at the governed cgroup's path (see `keeper`).
    Rebind,
    /// Stop, taking the policy off the cgroup when `detach`.
    Stop {
        detach: bool,
        done: oneshot::Sender<Result<(), DaemonError>>,
    },
    /// The watcher could not reach the database: recorded for `status`, nothing reloaded.
    SourceFault(String),
}
