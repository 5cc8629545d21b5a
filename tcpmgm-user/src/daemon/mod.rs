//! `tcpmgm run`: enforce the table on a cgroup and keep it current.
//!
//! The daemon is three tasks. The serve loop (here) answers signals, the control socket and the
//! programs' log events, and never waits on slow work. The reloader (`reloader`) owns the
//! enforced policy: it re-reads the table (with a timeout), validates, compiles and switches the
//! kernel to the new rule set off the runtime's thread, answers every request that waited for
//! it, and folds requests that arrive meanwhile into one more reload. The watcher (`watch`
//! task) turns database notifications or polls into reload requests. When a reload fails, the
//! running policy stays and the caller and the log are told why.
mod apply;
pub mod control;
pub mod events;
mod keeper;
pub mod lifetime;
mod metrics;
pub mod reapply;
mod reloader;
mod request;
pub mod status;
pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use self::watch::{Change, Watcher};
use crate::kernel::claim::Claim;
use crate::kernel::{Enforcer, KernelError};
use crate::policy::compile::{CompileError, Enforcement};
use crate::policy::pipeline::{PipelineError, RuleArgs, RuleSet};
use crate::policy::source::{Redacted, TableName, normalize_url};
use crate::system::{self, SystemError};
use lifetime::Sweeper;
use status::DaemonState;

pub use control::request;
use reloader::Reloader;
use request::Request;

/// How long a read of the rule table may take, by default, before the reload gives up (the
/// policy in force stays).
pub const DB_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Rules(#[from] PipelineError),
    #[error(
        "{count} faults in the table, so nothing of it was loaded (fix them, or run with --skip-invalid):\n{list}"
    )]
    Invalid { count: usize, list: String },
    #[error("reading the rule table took longer than {0:?}; the policy in force stays")]
    Timeout(Duration),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Claim(#[from] crate::kernel::claim::ClaimError),
    #[error(transparent)]
    System(#[from] SystemError),
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
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
    /// With SQLite and MariaDB (and PostgreSQL without the change trigger): look for table
    /// changes this often.
    pub poll_interval: Option<Duration>,
    /// The network namespace the cgroup's sockets live in (for con_lifetime); None: ours.
    pub netns: Option<PathBuf>,
    /// After a reload, give established connections the keepalive of the rule now matching.
    pub reapply_existing: bool,
    /// How long reading the table (or connecting to watch it) may take.
    pub db_timeout: Duration,
    /// Audit mode, the application's own options, OpenSIPS's connect_timeout default.
    pub enforcement: Enforcement,
    /// The configuration file, read again at each reload for `audit` and `app_options` where
    /// the command line did not set them: switching between audit and enforcement is a reload.
    pub reread: Option<Reread>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// Which per-rule series the metrics carry.
    pub metrics_rules: crate::config::MetricsRules,
    /// The group whose members may read the per-socket records (`--api-group`).
    pub api_group: Option<u32>,
}

/// What a reload reads again from the configuration file.
pub struct Reread {
    pub config: PathBuf,
    /// What the command line gave, which wins over the file again.
    pub given: crate::config::RunFlags,
}

impl Options {
    /// The enforcement for the next reload: the configuration file's `audit` and `app_options`
    /// read again, where the command line did not set them.
    fn current_enforcement(&self) -> Result<Enforcement, crate::config::ConfigError> {
        let mut e = self.enforcement;
        if let Some(r) = &self.reread {
            let now = crate::config::Config::load(&r.config)?
                .overlay(&r.given)
                .enforcement();
            e.audit = now.audit;
            e.app_options_allow = now.app_options_allow;
        }
        Ok(e)
    }
}

/// The running daemon, between its start (policy attached) and its serve loop.
pub struct Daemon {
    reloader: Reloader,
    control: PathBuf,
    /// Bound before anything reached the kernel, so a second run is refused before it acts.
    listener: tokio::net::UnixListener,
    /// What this run pinned, to pin again when the pins are removed.
    keeper: keeper::Keeper,
    watched_db: String,
    watched_table: TableName,
    poll_interval: Option<Duration>,
    db_timeout: Duration,
    watcher: Option<Watcher>,
    detach_on_exit: bool,
    /// The programs' log events, forwarded to this daemon's log.
    logs: Option<AsyncFd<EbpfLogger<&'static dyn log::Log>>>,
    /// Closes connections idle for longer than their con_lifetime.
    _sweeper: Option<Sweeper>,
    /// Serves the programs' events (`tcpmgm events`).
    _events: Option<events::Stream>,
    /// The metrics endpoint, bound, to be served.
    metrics: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

/// Reads and validates the table (within `db_timeout`), refusing it on any fault unless
/// `skip_invalid`.
async fn read_valid(options: &Options) -> Result<RuleSet, DaemonError> {
    let set = tokio::time::timeout(options.db_timeout, options.rules.read())
        .await
        .map_err(|_| DaemonError::Timeout(options.db_timeout))??;
    if !set.errors.is_empty() {
        for e in &set.errors {
            tracing::error!("{e}");
        }
        if !options.skip_invalid {
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
    let kernel = crate::kernel::features::column_features();
    for u in crate::kernel::features::unenforceable(&set.rules, kernel, &options.enforcement) {
        tracing::error!("{u}; the rule's other columns are enforced");
    }
    Ok(set)
}

impl Daemon {
    /// Loads the table and attaches it. Nothing reaches the kernel unless every step succeeds,
    /// and nothing at all when another run governs the cgroup.
    pub async fn start(options: Options) -> Result<Daemon, DaemonError> {
        let paths = system::Paths::of(
            &options.cgroup,
            options.pin_dir.clone(),
            options.control.clone(),
        )?;
        // One daemon per cgroup, decided first: the cgroup's lock, then what is attached to it
        // from elsewhere, then the control socket.
        let claim = crate::kernel::claim::claim(&paths.cgroup, &paths.pin_dir, &system::bpffs()?)?;
        let listener = control::bind(&paths.control)?;
        let control = paths.control.clone();
        let started = Daemon::start_claimed(options, paths, claim, listener).await;
        if started.is_err() {
            let _ = std::fs::remove_file(&control);
        }
        started
    }

    async fn start_claimed(
        options: Options,
        paths: system::Paths,
        claim: Claim,
        listener: tokio::net::UnixListener,
    ) -> Result<Daemon, DaemonError> {
        let system::Paths {
            cgroup,
            pin_dir,
            control,
        } = paths;
        if cgroup.extension().is_some_and(|e| e == "service") {
            tracing::warn!(
                "{} is a service's own cgroup: systemd removes it at every stop of the service, and the policy with it until the service starts again (tcpmgm then governs the new cgroup); govern the slice the service runs in instead (README: \"Put your OpenSIPS or Kamailio under tcpmgm\")",
                cgroup.display()
            );
        }
        // Watch before reading, so that no change falls between the two.
        let watcher = connect_watcher(
            options.rules.db(),
            &options.rules.table(),
            options.poll_interval,
            options.db_timeout,
        )
        .await
        .ok();
        let set = read_valid(&options).await?;
        let hz = system::kernel_hz()?;
        // Bound before the kernel step, so that a taken port stops the start with nothing
        // attached (and before systemd hears READY).
        let published = apply::Published::default();
        let metrics = match options.metrics {
            Some(addr) => Some(Box::pin(
                metrics::serve(
                    addr,
                    metrics::Sources {
                        control: control.clone(),
                        pin_dir: pin_dir.clone(),
                        cgroup: cgroup.clone(),
                        netns: options.netns.clone(),
                        rules: options.metrics_rules,
                        book: published.book.clone(),
                    },
                )
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
            )
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
            None => None,
        };
        let rows_notified = watcher.as_ref().is_some_and(Watcher::names_rows);
        let logged = set.mark.is_some();
        let enforcement = options.enforcement;
        let (mut enforcer, applied) = tokio::task::spawn_blocking(move || {
            apply::apply(set, hz, enforcement, rows_notified, |policy, _| {
                Ok(Enforcer::attach(policy, &cgroup, &pin_dir)?)
            })
        })
        .await
        .expect("attaching does not panic")?;
        published.set(&applied.policy, &options.enforcement);
        if !logged && !rows_notified {
            tracing::info!(
                "each reload reads the whole table: nothing says which rows change (`tcpmgm db init` adds a change log to a SQLite table, row triggers to a PostgreSQL one)"
            );
        }
        let sweeper = match Sweeper::start(
            enforcer.cgroup(),
            enforcer.pin_dir().to_path_buf(),
            options.netns.clone(),
            options.enforcement,
            published.sweep_every.clone(),
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
        let events = enforcer
            .events()
            .map_err(|e| e.to_string())
            .and_then(|(ring, drops)| {
                let path = events::socket_path(&control);
                events::Stream::start(ring, drops, &path, options.api_group)
                    .inspect(|_| {
                        tracing::info!("events on {} (`tcpmgm events`)", path.display());
                    })
                    .map_err(|e| format!("{}: {e}", path.display()))
            });
        let events = match events {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("the event stream is not served: {e}");
                None
            }
        };
        // The last steps that can fail: on a first start, a failure takes the policy off
        // again (an adopted policy stays, with this run's programs in it).
        let shared = match options.api_group {
            Some(gid) => crate::kernel::share_records(enforcer.pin_dir(), gid).map(|warnings| {
                for warning in warnings {
                    tracing::warn!("--api-group: {warning}");
                }
                tracing::info!(
                    "group {gid} may read the per-socket records ({})",
                    enforcer
                        .pin_dir()
                        .join(crate::kernel::SOCKETS_PIN)
                        .display()
                );
            }),
            None => crate::kernel::unshare_records(enforcer.pin_dir()),
        };
        let keeper = shared
            .map_err(DaemonError::from)
            .and_then(|()| keeper::Keeper::new(&enforcer, claim.cgroup_id));
        let keeper = match keeper {
            Ok(k) => k,
            Err(e) => {
                drop(sweeper);
                if !enforcer.adopted()
                    && let Err(undo) = enforcer.detach()
                {
                    tracing::error!("taking the policy off again: {undo}");
                }
                return Err(e);
            }
        };
        if enforcer.adopted() {
            tracing::info!(
                "took over the policy pinned in {} by an earlier run",
                enforcer.pin_dir().display()
            );
        }
        for l in applied.listeners.iter() {
            tracing::info!("listener {l}");
        }
        tracing::info!(
            "{} rules enforced on {}; maps pinned in {}",
            applied.policy.rules.len(),
            enforcer.cgroup().display(),
            enforcer.pin_dir().display(),
        );
        tracing::info!(
            "to put a process under this policy: echo PID > {}/cgroup.procs",
            enforcer.cgroup().display()
        );
        let state = DaemonState {
            cgroup: enforcer.cgroup().to_path_buf(),
            pin_dir: enforcer.pin_dir().to_path_buf(),
            control: control.clone(),
            pid: std::process::id(),
            source: Redacted::new(&normalize_url(options.rules.db())).to_string(),
            started_at: status::now(),
            rules: applied.policy.rules.len(),
            generation: enforcer.generation(),
            last_reload: None,
            reloading_since: None,
            reloads_ok: 0,
            reloads_failed: 0,
            audit: options.enforcement.audit,
            source_health: status::SourceHealth::read_now(),
        };
        // The table's rules, compiled and written to the kernel, are not needed any more.
        let index = applied.index;
        drop(applied.policy);
        crate::memory::release_freed();
        let daemon = Daemon {
            metrics,
            listener,
            keeper: keeper.clone(),
            control,
            watcher,
            watched_db: options.rules.db().to_owned(),
            watched_table: options.rules.table(),
            db_timeout: options.db_timeout,
            poll_interval: options.poll_interval,
            detach_on_exit: options.detach_on_exit,
            logs,
            _sweeper: sweeper,
            _events: events,
            reloader: Reloader::new(enforcer, options, hz, state, published, claim, keeper)
                .with_index(index, rows_notified),
        };
        daemon.reloader.save_state();
        Ok(daemon)
    }

    /// Serves until SIGINT or SIGTERM (the policy stays in force, unless `detach_on_exit`) or a
    /// `detach` request (the policy goes).
    pub async fn serve(self) -> Result<(), DaemonError> {
        let Daemon {
            reloader,
            control,
            listener,
            keeper,
            watched_db,
            watched_table,
            poll_interval,
            db_timeout,
            watcher,
            detach_on_exit,
            mut logs,
            _sweeper,
            _events,
            metrics,
        } = self;
        let metrics = metrics.map(tokio::spawn);
        let fail = |source| DaemonError::Control {
            path: control.clone(),
            source,
        };
        let mut acceptor = control::Acceptor::new(listener);
        let mut term = signal(SignalKind::terminate()).map_err(fail)?;
        let mut int = signal(SignalKind::interrupt()).map_err(fail)?;
        let mut hup = signal(SignalKind::hangup()).map_err(fail)?;
        let (requests, inbox) = mpsc::unbounded_channel();
        let reloader = tokio::spawn(reloader.run(inbox));
        let watcher = tokio::spawn(watch_table(
            watcher,
            (watched_db, watched_table),
            poll_interval,
            db_timeout,
            requests.clone(),
        ));
        let (detach_tx, mut detach_rx) = mpsc::channel::<()>(1);
        let keeping = tokio::spawn(keeper.clone().run(requests.clone()));
        // The last line of the start: tests and scripts wait for it.
        tracing::info!(
            "reload with SIGHUP or `tcpmgm reload --control {}`",
            control.display()
        );
        // systemd (Type=notify) starts the units ordered after tcpmgm only now: the policy is
        // in force before the SIP server opens its first socket.
        notify(&[sd_notify::NotifyState::Ready]);
        let detach = loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM"); break detach_on_exit; }
                _ = int.recv() => { tracing::info!("SIGINT"); break detach_on_exit; }
                _ = detach_rx.recv() => break true,
                ready = async { logs.as_mut().expect("guarded").readable_mut().await }, if logs.is_some() => {
                    if let Ok(mut guard) = ready {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    let _ = requests.send(Request::Reload { reply: None, automatic: false, full: false, rows: None });
                }
                (stream, slot) = acceptor.next() => {
                    tokio::spawn(control::answer(stream, slot, requests.clone(), detach_tx.clone()));
                }
            }
        };
        notify(&[sd_notify::NotifyState::Stopping]);
        watcher.abort();
        keeping.abort();
        if let Some(m) = metrics {
            m.abort();
        }
        let _ = std::fs::remove_file(&control);
        if detach {
            // The reloader finishes what it is doing (a table read gives up after db_timeout),
            // then takes the policy off.
            let (done, result) = oneshot::channel();
            let _ = requests.send(Request::Stop { detach: true, done });
            match result.await {
                Ok(r) => r?,
                Err(_) => tracing::error!("the reloader ended before it could detach"),
            }
            let _ = std::fs::remove_file(status::state_path(&control));
        } else {
            // Whatever the reloader was doing, the pinned policy stays in force, as long as it
            // is pinned: what was unpinned meanwhile is pinned again first.
            reloader.abort();
            tracing::info!("exiting; {}", keeper.on_exit().await);
        }
        Ok(())
    }
}

/// Tells systemd (when it started us with NOTIFY_SOCKET) how the service is doing.
pub(crate) fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("telling systemd: {e}");
    }
}

/// The table watcher, or why (logged) the database cannot be reached now.
async fn connect_watcher(
    db: &str,
    table: &TableName,
    poll: Option<Duration>,
    limit: Duration,
) -> Result<Watcher, String> {
    let fault = match tokio::time::timeout(limit, Watcher::new(db, table, poll)).await {
        Ok(Ok(w)) => {
            tracing::info!("{}", w.describe());
            return Ok(w);
        }
        Ok(Err(e)) => format!("cannot watch the rule table: {e}"),
        Err(_) => format!("connecting to watch the rule table took longer than {limit:?}"),
    };
    tracing::warn!("{fault}");
    Err(fault)
}

/// Follows the rule table and asks for a reload at each change, reconnecting (after a second,
/// then doubling up to a minute) when the database goes away, and reloading after a reconnection
/// in case a change was missed meanwhile. Each failure to reach the database goes to the
/// reloader too, which keeps the state `status` reads.
async fn watch_table(
    mut watcher: Option<Watcher>,
    (db, table): (String, TableName),
    poll: Option<Duration>,
    limit: Duration,
    requests: mpsc::UnboundedSender<Request>,
) {
    let mut wait = Duration::from_secs(1);
    loop {
        let Some(w) = watcher.as_mut() else {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(60));
            watcher = match connect_watcher(&db, &table, poll, limit).await {
                Ok(w) => Some(w),
                Err(fault) => {
                    let _ = requests.send(Request::SourceFault(fault));
                    None
                }
            };
            if watcher.is_some() {
                wait = Duration::from_secs(1);
                tracing::info!(
                    "watching the rule table again: reloading in case changes were missed"
                );
                let _ = requests.send(Request::Reload {
                    reply: None,
                    automatic: true,
                    full: false,
                    rows: None,
                });
            }
            continue;
        };
        let change = w.changed().await;
        let mut rows = None;
        match change {
            Ok(Change::Table) => tracing::info!("the rule table changed: reloading"),
            Ok(Change::Rows(ids)) => {
                tracing::info!("rows of the rule table changed: reloading");
                rows = Some(ids);
            }
            Ok(Change::Unknown) => {
                tracing::info!("reconnected to the database: reloading in case changes were missed")
            }
            Err(e) => {
                let fault = format!("watching the rule table: {e}");
                tracing::warn!("{fault}; reconnecting");
                let _ = requests.send(Request::SourceFault(fault));
                watcher = None;
                continue;
            }
        }
        if requests
            .send(Request::Reload {
                reply: None,
                automatic: true,
                full: false,
                rows,
            })
            .is_err()
        {
            return;
        }
    }
}
