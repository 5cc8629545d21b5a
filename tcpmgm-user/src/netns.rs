//! Network namespaces: sock_diag answers for the namespace of the thread that asks, so what
//! reads or closes the governed cgroup's sockets runs in theirs (`netns`, config `netns`).
//! Only a thread of its own enters one: the daemon's other threads stay where they are.
use std::io;
use std::path::Path;

/// Moves the calling thread into the network namespace at `path` (`/var/run/netns/NAME`).
pub fn enter(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` in the network namespace at `ns` on a thread of its own, or here when `ns` is None.
/// A panic of `f` is an error.
pub fn run_in<T: Send>(
    ns: Option<&Path>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let Some(ns) = ns else {
        return f();
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(ns)?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("a thread in the network namespace panicked"))?
    })
}
