//! The keeper: checks, every `CHECK_EVERY`, that the policy this run enforces is where the
//! daemon says it is. Pins removed (the pin directory deleted, say) are pinned again from the
//! objects this run holds, and said; the governed cgroup removed is said once, and when a
//! cgroup is made again at its path (a slice stopped and started), the reloader governs the new
//! one. At exit it pins again what is missing, so that "the policy stays enforced" is true when
//! it is said, and says otherwise when it is not.
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use super::DaemonError;
use super::request::Request;
use crate::kernel::{self, Enforcer, KernelError};

const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Every pin of this run's, with the object it should hold.
pub type Pins = Vec<(PathBuf, OwnedFd)>;

#[derive(Clone)]
pub struct Keeper {
    inner: Arc<Inner>,
}

struct Inner {
    pin_dir: PathBuf,
    cgroup: PathBuf,
    /// Held by whoever pins: the reloader while it applies, the keeper while it pins again.
    pins: Mutex<Pins>,
    /// The id (inode) of the cgroup the links hold.
    governed: AtomicU64,
    /// The id of the last cgroup made again that the reloader was asked to govern.
    asked: AtomicU64,
    cgroup_gone: AtomicBool,
    repin_failing: AtomicBool,
}

impl Keeper {
    pub fn new(enforcer: &Enforcer, cgroup_id: u64) -> Result<Keeper, DaemonError> {
        let pins = enforcer.pins().map_err(|source| KernelError::Step {
            what: "holding the pinned objects",
            source,
        })?;
        Ok(Keeper {
            inner: Arc::new(Inner {
                pin_dir: enforcer.pin_dir().to_path_buf(),
                cgroup: enforcer.cgroup().to_path_buf(),
                pins: Mutex::new(pins),
                governed: AtomicU64::new(cgroup_id),
                asked: AtomicU64::new(cgroup_id),
                cgroup_gone: AtomicBool::new(false),
                repin_failing: AtomicBool::new(false),
            }),
        })
    }

    /// The pins, held: whoever changes pins holds them meanwhile, and writes the new ones.
    pub fn hold(&self) -> MutexGuard<'_, Pins> {
        self.inner.pins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cgroup the links hold now (after the reloader governed one made again).
    pub fn governing(&self, cgroup_id: u64) {
        self.inner.governed.store(cgroup_id, Ordering::Relaxed);
        self.inner.cgroup_gone.store(false, Ordering::Relaxed);
    }

    pub async fn run(self, requests: mpsc::UnboundedSender<Request>) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            self.check_pins().await;
            self.check_cgroup(&requests);
        }
    }

    /// Pins again what is missing: Ok(paths pinned again).
    async fn repin(&self) -> std::io::Result<Vec<PathBuf>> {
        let keeper = self.clone();
        tokio::task::spawn_blocking(move || {
            let pins = keeper.hold();
            kernel::repin(&keeper.inner.pin_dir, &pins)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    async fn check_pins(&self) {
        let dir = self.inner.pin_dir.display();
        match self.repin().await {
            Ok(done) => {
                if !done.is_empty() {
                    tracing::warn!(
                        "{} of this run's pins in {dir} were removed: pinned again, so the policy outlives this process as before",
                        done.len()
                    );
                }
                if self.inner.repin_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the pins in {dir} are back in place");
                }
            }
            Err(e) => {
                if !self.inner.repin_failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        "this run's pins in {dir} were removed and cannot be pinned again ({e}): the policy is enforced while this process runs, and ends with it"
                    );
                }
            }
        }
    }

    fn check_cgroup(&self, requests: &mpsc::UnboundedSender<Request>) {
        let inner = &self.inner;
        let cgroup = inner.cgroup.display();
        match std::fs::metadata(&inner.cgroup).map(|m| m.ino()) {
            Err(_) => {
                if !inner.cgroup_gone.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cgroup {cgroup} was removed: no process is under the policy now; it will govern a cgroup made again at that path"
                    );
                }
            }
            Ok(id) if id != inner.governed.load(Ordering::Relaxed) => {
                if inner.asked.swap(id, Ordering::Relaxed) != id {
                    tracing::info!("cgroup {cgroup} was made again: governing it");
                    let _ = requests.send(Request::Rebind);
                }
            }
            Ok(_) => {}
        }
    }

    /// What exiting leaves behind, as the exit message says it: pins missing are pinned again
    /// first.
    pub async fn on_exit(&self) -> String {
        let inner = &self.inner;
        let dir = inner.pin_dir.display();
        let cgroup = inner.cgroup.display();
        let governed = std::fs::metadata(&inner.cgroup)
            .is_ok_and(|m| m.ino() == inner.governed.load(Ordering::Relaxed));
        if !governed {
            return format!(
                "cgroup {cgroup} is not the one the policy governed (it was removed): no process is under the policy; the pins in {dir} stay until `tcpmgm detach`"
            );
        }
        match self.repin().await {
            Ok(done) if done.is_empty() => format!(
                "the policy stays enforced on {cgroup} (pinned in {dir}); `tcpmgm detach` removes it"
            ),
            Ok(done) => format!(
                "the policy stays enforced on {cgroup}: {} removed pins were pinned again in {dir}; `tcpmgm detach` removes it",
                done.len()
            ),
            Err(e) => format!(
                "the pins in {dir} were removed and cannot be pinned again ({e}): the policy on {cgroup} ends with this process"
            ),
        }
    }
}
