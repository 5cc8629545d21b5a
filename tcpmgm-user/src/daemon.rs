//! `tcpmgm run`: enforce the table on a cgroup and keep it current. A reload (SIGHUP, or a
//! `reload` request on the control socket) re-reads the table, validates, compiles and swaps the
//! kernel to the new rule set in one step; when any of that fails, the running policy stays and
//! the caller and the log are told why.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::compile::{CompileError, Policy, compile};
use crate::kernel::{Enforcer, KernelError, SOCKETS_PIN};
use crate::lifetime::{self, Sweeper};
use crate::pipeline::{PipelineError, RuleArgs, RuleSet};
use crate::source::{Redacted, normalize_url};
use crate::status::{self, DaemonState, ReloadRecord};
use crate::system::{self, SystemError};
use crate::watch::{Change, Watcher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Rules(#[from] PipelineError),
    #[error(
        "{count} faults in the table, so nothing of it was loaded (fix them, or run with --skip-invalid):\n{list}"
    )]
    Invalid { count: usize, list: String },
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    System(#[from] SystemError),
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `run` was asked to do.
pub struct Options {
    pub rules: RuleArgs,
    pub cgroup: PathBuf,
    pub skip_invalid: bool,
    pub pin_dir: Option<PathBuf>,
    pub control: Option<PathBuf>,
    /// Detach on SIGINT/SIGTERM instead of leaving the policy in force.
    pub detach_on_exit: bool,
    /// With SQLite and MariaDB: look for table changes this often (PostgreSQL notifies).
    pub poll_interval: Option<std::time::Duration>,
    /// The network namespace the cgroup's sockets live in (for con_lifetime); None: ours.
    pub netns: Option<PathBuf>,
    /// Enforce con_lifetime also where it is OpenSIPS's default of 120 s.
    pub enforce_default_lifetime: bool,
    /// After a reload, give established connections the keepalive of the rule now matching.
    pub reapply_existing: bool,
}

/// The running daemon: what it was asked (options) and what it enforces.
pub struct Daemon {
    options: Options,
    hz: u32,
    enforcer: Enforcer,
    control: PathBuf,
    state: DaemonState,
    watcher: Option<Watcher>,
    /// The programs' log events, forwarded to this daemon's log.
    logs: Option<AsyncFd<EbpfLogger<&'static dyn log::Log>>>,
    /// Closes connections idle for longer than their con_lifetime, as often as this says.
    _sweeper: Option<Sweeper>,
    sweep_every: Arc<AtomicU64>,
}

/// Reads and validates the table, refusing it on any fault unless `skip_invalid`.
async fn read_valid(args: &RuleArgs, skip_invalid: bool) -> Result<RuleSet, DaemonError> {
    let set = args.read().await?;
    if !set.errors.is_empty() {
        for e in &set.errors {
            tracing::error!("{e}");
        }
        if !skip_invalid {
            let list: Vec<String> = set.errors.iter().map(ToString::to_string).collect();
            return Err(DaemonError::Invalid {
                count: set.errors.len(),
                list: list.join("\n"),
            });
        }
        tracing::warn!(
            "skipping the bad rows, loading {} valid rules",
            set.rules.len()
        );
    }
    Ok(set)
}

impl Daemon {
    /// Loads the table and attaches it. Nothing reaches the kernel unless every step succeeds.
    pub async fn start(options: Options) -> Result<Daemon, DaemonError> {
        let cgroup = system::resolve_cgroup(&options.cgroup)?;
        // Watch before reading, so that no change falls between the two.
        let watcher = watch(&options).await;
        let set = read_valid(&options.rules, options.skip_invalid).await?;
        let kernel = crate::features::probe();
        for u in
            crate::features::unenforceable(&set.rules, &kernel, options.enforce_default_lifetime)
        {
            tracing::error!("{u}; the rule's other columns are enforced");
        }
        let hz = system::kernel_hz()?;
        let policy = compile(set.rules, &set.listeners, hz)?;
        let pin_dir = match &options.pin_dir {
            Some(p) => p.clone(),
            None => system::default_pin_dir(&cgroup)?,
        };
        let control = match &options.control {
            Some(p) => p.clone(),
            None => system::default_control_socket(&cgroup)?,
        };
        let mut enforcer = Enforcer::attach(&policy, &cgroup, &pin_dir)?;
        let sweep_every = Arc::new(AtomicU64::new(lifetime::sweep_interval_ms(
            policy.rules.iter().map(|r| r.profile.con_lifetime_s),
            options.enforce_default_lifetime,
        )));
        let sweeper = match Sweeper::start(
            &cgroup,
            pin_dir.join(SOCKETS_PIN),
            options.netns.clone(),
            options.enforce_default_lifetime,
            sweep_every.clone(),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("con_lifetime is not enforced: {e}");
                None
            }
        };
        let logs = match enforcer.logger() {
            // SAFETY: the logger owns its ring buffer's fd for as long as it lives, and the
            // AsyncFd owns the logger.
            Ok(logger) => match unsafe {
                AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
            } {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(
                        "the programs' log events will not be shown: {}",
                        e.into_parts().1
                    );
                    None
                }
            },
            Err(e) => {
                tracing::warn!("the programs' log events will not be shown: {e}");
                None
            }
        };
        if enforcer.adopted() {
            tracing::info!(
                "took over the policy pinned in {} by an earlier run",
                pin_dir.display()
            );
        }
        for l in set.listeners.iter() {
            tracing::info!("listener {l}");
        }
        tracing::info!(
            "{} rules enforced on {}; maps pinned in {}",
            policy.rules.len(),
            cgroup.display(),
            pin_dir.display(),
        );
        tracing::info!(
            "to put a process under this policy: echo PID > {}/cgroup.procs",
            cgroup.display()
        );
        let state = DaemonState {
            cgroup: cgroup.clone(),
            pin_dir: pin_dir.clone(),
            control: control.clone(),
            pid: std::process::id(),
            source: Redacted::new(&normalize_url(options.rules.db())).to_string(),
            started_at: status::now(),
            rules: policy.rules.len(),
            generation: 1,
            last_reload: None,
        };
        let daemon = Daemon {
            options,
            hz,
            enforcer,
            control,
            state,
            watcher,
            logs,
            _sweeper: sweeper,
            sweep_every,
        };
        daemon.save_state();
        Ok(daemon)
    }

    /// `--reapply-existing`, in the network namespace of the cgroup's sockets.
    fn reapply(&self, policy: &Policy, listeners: &crate::listener::Listeners) {
        let cgroup = self.enforcer.cgroup().to_path_buf();
        let pin = self.enforcer.pin_dir().join(SOCKETS_PIN);
        let netns = self.options.netns.clone();
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(ns) = &netns {
                        let f = std::fs::File::open(ns)?;
                        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(std::io::Error::from)?;
                    }
                    crate::reapply::reapply(policy, listeners, &cgroup, &pin)
                })
                .join()
        });
        match result {
            Ok(Ok(done)) => tracing::info!(
                "re-applied the new rules to {} existing connections ({} could not be reached)",
                done.updated,
                done.unreachable
            ),
            Ok(Err(e)) => tracing::warn!("re-applying the new rules to existing connections: {e}"),
            Err(_) => tracing::warn!("re-applying the new rules to existing connections panicked"),
        }
    }

    fn save_state(&self) {
        if let Some(dir) = self.control.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = self.state.write() {
            tracing::warn!(
                "writing {}: {e}",
                status::state_path(&self.control).display()
            );
        }
    }

    /// Re-reads the table and switches the kernel to it; on error nothing changes.
    pub async fn reload(&mut self) -> Result<String, DaemonError> {
        let result = self.try_reload().await;
        self.state.generation = self.enforcer.generation();
        self.state.last_reload = Some(ReloadRecord {
            at: status::now(),
            ok: result.is_ok(),
            message: match &result {
                Ok(report) => report.clone(),
                Err(e) => e.to_string(),
            },
        });
        self.save_state();
        result
    }

    async fn try_reload(&mut self) -> Result<String, DaemonError> {
        let started = Instant::now();
        let set = read_valid(&self.options.rules, self.options.skip_invalid).await?;
        let policy: Policy = compile(set.rules, &set.listeners, self.hz)?;
        self.enforcer.replace(&policy)?;
        self.state.rules = policy.rules.len();
        if self.options.reapply_existing {
            self.reapply(&policy, &set.listeners);
        }
        self.sweep_every.store(
            lifetime::sweep_interval_ms(
                policy.rules.iter().map(|r| r.profile.con_lifetime_s),
                self.options.enforce_default_lifetime,
            ),
            Ordering::Relaxed,
        );
        Ok(format!(
            "generation {}: {} rules enforced ({} ms)",
            self.enforcer.generation(),
            policy.rules.len(),
            started.elapsed().as_millis()
        ))
    }

    /// Serves SIGHUP and the control socket until SIGINT or SIGTERM (the policy stays in force,
    /// unless `detach_on_exit`) or a `detach` request (the policy goes).
    pub async fn serve(mut self) -> Result<(), DaemonError> {
        let listener = bind_control(&self.control)?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| self.control_err(e))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| self.control_err(e))?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| self.control_err(e))?;
        let mut watcher = self.watcher.take();
        let mut logs = self.logs.take();
        // The last line of the start: tests and scripts wait for it.
        tracing::info!(
            "reload with SIGHUP or `tcpmgm reload --control {}`",
            self.control.display()
        );
        // systemd (Type=notify) starts the units ordered after tcpmgm only now: the policy is
        // in force before the SIP server opens its first socket.
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&self.status_line()),
        ]);
        // After a failed automatic reload: when to try again (doubling up to a minute), while
        // the last good policy stays in force.
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        let detach = loop {
            let retry_at = retry.map(|(at, _)| at);
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM"); break self.options.detach_on_exit; }
                _ = int.recv() => { tracing::info!("SIGINT"); break self.options.detach_on_exit; }
                ready = async { logs.as_mut().expect("guarded").readable_mut().await }, if logs.is_some() => {
                    if let Ok(mut guard) = ready {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    // Logged inside; there is no caller to answer.
                    let _ = self.log_reload().await;
                }
                change = async { watcher.as_mut().expect("guarded").changed().await }, if watcher.is_some() => {
                    match change {
                        Ok(Change::Table) => tracing::info!("the rule table changed: reloading"),
                        Ok(Change::Unknown) => tracing::info!("reconnected to the database: reloading in case changes were missed"),
                        Err(e) => {
                            tracing::warn!("watching the rule table: {e}; reconnecting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            watcher = watch(&self.options).await;
                        }
                    }
                    retry = self.auto_reload(None).await;
                }
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    if watcher.is_none() {
                        watcher = watch(&self.options).await;
                    }
                    retry = self.auto_reload(retry.map(|(_, wait)| wait)).await;
                }
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => {
                        if self.answer(stream).await == Request::Detach {
                            break true;
                        }
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                },
            }
        };
        notify(&[sd_notify::NotifyState::Stopping]);
        let _ = std::fs::remove_file(&self.control);
        if detach {
            let cgroup = self.enforcer.cgroup().to_path_buf();
            self.enforcer.detach()?;
            let _ = std::fs::remove_file(status::state_path(&self.control));
            tracing::info!(
                "detached from {}; it is back to the system's TCP settings",
                cgroup.display()
            );
        } else {
            tracing::info!(
                "exiting; the policy stays enforced (pinned in {}); `tcpmgm detach --cgroup {}` removes it",
                self.enforcer.pin_dir().display(),
                self.enforcer.cgroup().display()
            );
        }
        Ok(())
    }

    /// A reload the daemon decided on itself. On failure, returns when to try again: after
    /// `last` doubled (1 s the first time, a minute at most).
    async fn auto_reload(
        &mut self,
        last: Option<Duration>,
    ) -> Option<(tokio::time::Instant, Duration)> {
        match self.log_reload().await {
            Ok(_) => None,
            Err(_) => {
                let wait = last.map_or(Duration::from_secs(1), |w| {
                    (w * 2).min(Duration::from_secs(60))
                });
                tracing::info!("retrying in {wait:?}");
                Some((tokio::time::Instant::now() + wait, wait))
            }
        }
    }

    fn control_err(&self, source: std::io::Error) -> DaemonError {
        DaemonError::Control {
            path: self.control.clone(),
            source,
        }
    }

    /// One line for `systemctl status`.
    fn status_line(&self) -> String {
        format!(
            "{} rules enforced on {} (generation {})",
            self.state.rules,
            self.enforcer.cgroup().display(),
            self.enforcer.generation()
        )
    }

    async fn log_reload(&mut self) -> Result<String, String> {
        match self.reload().await {
            Ok(report) => {
                tracing::info!("reload: {report}");
                notify(&[sd_notify::NotifyState::Status(&self.status_line())]);
                Ok(report)
            }
            Err(e) => {
                tracing::error!("reload failed, the previous policy stays in force: {e}");
                Err(e.to_string())
            }
        }
    }

    /// One request a connection: `reload` or `detach`. The answer is `ok <report>` or
    /// `error <reason>` (which may span lines), then the connection closes.
    async fn answer(&mut self, stream: UnixStream) -> Request {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        if BufReader::new(read).read_line(&mut line).await.is_err() {
            return Request::Other;
        }
        let (request, reply) = match line.trim() {
            "reload" => match self.log_reload().await {
                Ok(report) => (Request::Reload, format!("ok {report}\n")),
                Err(e) => (Request::Reload, format!("error {e}\n")),
            },
            "detach" => (Request::Detach, "ok detaching\n".to_owned()),
            other => (
                Request::Other,
                format!("error unknown request '{other}' (expected: reload, detach)\n"),
            ),
        };
        let _ = write.write_all(reply.as_bytes()).await;
        request
    }
}

#[derive(PartialEq)]
enum Request {
    Reload,
    Detach,
    Other,
}

/// Tells systemd (when it started us with NOTIFY_SOCKET) how the service is doing.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("telling systemd: {e}");
    }
}

/// The table watcher, or None (logged) when there is none or it cannot connect now; the retry
/// timer then brings it back.
async fn watch(options: &Options) -> Option<Watcher> {
    match Watcher::new(options.rules.db(), options.poll_interval).await {
        Ok(w) => {
            tracing::info!("{}", w.describe());
            Some(w)
        }
        Err(e) => {
            tracing::warn!("cannot watch the rule table: {e}");
            None
        }
    }
}

/// A root-only unix socket: its directory is 0700 and the socket 0600.
fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    let fail = |source| DaemonError::Control {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
        if dir == Path::new("/run/tcpmgm") {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another tcpmgm run answers there (one daemon per cgroup)",
        )));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(listener)
}

/// Sends one request to the daemon at `control`: Ok(report) or Err(reason).
pub async fn request(control: &Path, what: &str) -> Result<String, String> {
    let mut stream = UnixStream::connect(control)
        .await
        .map_err(|e| format!("no tcpmgm run answers on {}: {e}", control.display()))?;
    stream
        .write_all(format!("{what}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut reply)
        .await
        .map_err(|e| e.to_string())?;
    match reply.strip_prefix("ok ") {
        Some(report) => Ok(report.trim_end().to_owned()),
        None => Err(reply
            .strip_prefix("error ")
            .unwrap_or(&reply)
            .trim_end()
            .to_owned()),
    }
}
