//! The reloader: the one task that owns the enforced policy. It takes reload requests one batch
//! at a time: every request waiting when a reload starts is answered by that reload, and those
//! that arrive while it runs are folded into one more. The table is read with a timeout; the
//! compile, the switch and the re-applying to existing connections run on a blocking thread, so
//! the serve loop never waits on them. A failed automatic reload (after a table change) is
//! retried after a second, doubling up to a minute, while the last good policy stays in force.
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::apply::{self, Published};
use super::keeper::Keeper;
use super::request::Request;
use super::{DaemonError, Options, notify, read_valid};
use crate::daemon::status::{self, DaemonState, ReloadRecord};
use crate::kernel::claim::Claim;
use crate::kernel::{Enforcer, GRACE, SOCKETS_PIN};
use crate::policy::compile::Policy;
use crate::policy::listener::Listeners;
use crate::policy::patch::{Index, MAX_PATCHED};
use crate::policy::pipeline::PipelineError;

pub struct Reloader {
    /// Away only while a blocking thread works on it.
    enforcer: Option<Enforcer>,
    options: Options,
    hz: u32,
    state: DaemonState,
    published: Published,
    /// The cgroup's lock (one daemon per cgroup), taken again for a cgroup made again.
    _claim: Claim,
    keeper: Keeper,
    /// What a reload that reads only the changed rows needs (see `policy::patch`); None when
    /// the table has no change log and no notification names rows.
    index: Option<Index>,
    /// Whether notifications may name the changed rows (PostgreSQL).
    rows_notified: bool,
}

impl Reloader {
    pub fn new(
        enforcer: Enforcer,
        options: Options,
        hz: u32,
        state: DaemonState,
        published: Published,
        claim: Claim,
        keeper: Keeper,
    ) -> Reloader {
        Reloader {
            enforcer: Some(enforcer),
            options,
            hz,
            state,
            published,
            _claim: claim,
            keeper,
            index: None,
            rows_notified: false,
        }
    }

    /// The reloader of a rule set that a patch may change (see `policy::patch`); `rows_notified`
    /// when notifications may name the changed rows.
    pub fn with_index(mut self, index: Option<Index>, rows_notified: bool) -> Reloader {
        self.index = index;
        self.rows_notified = rows_notified;
        self
    }

    pub fn save_state(&self) {
        if let Some(dir) = self.state.control.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = self.state.write() {
            tracing::warn!(
                "writing {}: {e}",
                status::state_path(&self.state.control).display()
            );
        }
    }

    pub async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Request>) {
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let retry_at = retry.map(|(at, _)| at);
            let first = tokio::select! {
                request = inbox.recv() => match request {
                    Some(r) => r,
                    None => return,
                },
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    Request::Reload { reply: None, automatic: true, full: false, rows: None }
                }
            };
            // Everything waiting now is answered by this one reload.
            let mut replies = Vec::new();
            let mut automatic_only = true;
            let mut reload = false;
            let mut full = false;
            // The rows the requests named, while each named them.
            let mut named = Some(Vec::new());
            let mut rebind = false;
            let mut stop = None;
            let mut faults = Vec::new();
            let mut take = |request: Request| match request {
                Request::Reload {
                    reply,
                    automatic,
                    full: whole,
                    rows,
                } => {
                    reload = true;
                    full |= whole;
                    named = match (named.take(), rows) {
                        (Some(mut ids), Some(more)) => {
                            ids.extend(more);
                            Some(ids)
                        }
                        _ => None,
                    };
                    automatic_only &= automatic;
                    replies.extend(reply);
                }
                Request::Rebind => rebind = true,
                Request::Stop { detach, done } => stop = Some((detach, done)),
                Request::SourceFault(fault) => faults.push(fault),
            };
            take(first);
            while let Ok(request) = inbox.try_recv() {
                take(request);
            }
            for fault in &faults {
                self.state.source_health.failed(fault);
            }
            if !faults.is_empty() {
                self.save_state();
            }
            if let Some((detach, done)) = stop {
                for reply in replies {
                    let _ = reply.send(Err("the daemon is stopping".into()));
                }
                let _ = done.send(self.stop(detach).await);
                return;
            }
            if rebind {
                self.rebind().await;
            }
            if !reload {
                continue;
            }
            let result = self.reload(full, named).await;
            for reply in replies {
                let _ = reply.send(result.clone());
            }
            retry = match (&result, automatic_only) {
                (Ok(_), _) => None,
                (Err(_), true) => {
                    let wait = retry.map_or(Duration::from_secs(1), |(_, w)| {
                        (w * 2).min(Duration::from_secs(60))
                    });
                    tracing::info!("retrying in {wait:?}");
                    Some((tokio::time::Instant::now() + wait, wait))
                }
                (Err(_), false) => retry,
            };
            if result.is_ok() {
                // Free the generation the switch replaced, once no program run can still read it.
                tokio::time::sleep(GRACE).await;
                if let Some(e) = self.enforcer.as_mut() {
                    e.release_retired();
                }
            }
        }
    }

    /// Governs the cgroup made again at the governed path: its lock, then new links. On
    /// failure the keeper asks again when the cgroup changes again.
    async fn rebind(&mut self) {
        let Some(mut enforcer) = self.enforcer.take() else {
            return;
        };
        let keeper = self.keeper.clone();
        let (enforcer, result) = tokio::task::spawn_blocking(move || {
            let result = crate::system::bpffs()
                .map_err(DaemonError::from)
                .and_then(|bpffs| {
                    Ok(crate::kernel::claim::claim(
                        enforcer.cgroup(),
                        enforcer.pin_dir(),
                        &bpffs,
                    )?)
                })
                .and_then(|claim| {
                    let mut pins = keeper.hold();
                    enforcer.rebind()?;
                    if let Ok(now) = enforcer.pins() {
                        *pins = now;
                    }
                    Ok(claim)
                });
            (enforcer, result)
        })
        .await
        .expect("rebinding does not panic");
        let cgroup = enforcer.cgroup().display().to_string();
        self.enforcer = Some(enforcer);
        match result {
            Ok(claim) => {
                self.keeper.governing(claim.cgroup_id);
                self._claim = claim;
                tracing::info!(
                    "cgroup {cgroup} is governed again: {} rules (generation {})",
                    self.state.rules,
                    self.state.generation
                );
            }
            Err(e) => {
                tracing::error!("cgroup {cgroup} was made again, but governing it failed: {e}")
            }
        }
    }

    async fn stop(&mut self, detach: bool) -> Result<(), DaemonError> {
        let Some(enforcer) = self.enforcer.take() else {
            return Ok(());
        };
        if !detach {
            return Ok(());
        }
        let cgroup = enforcer.cgroup().to_path_buf();
        let keeper = self.keeper.clone();
        tokio::task::spawn_blocking(move || {
            // Held, and emptied: nothing is to be pinned again once the pins are removed.
            let mut pins = keeper.hold();
            pins.clear();
            enforcer.detach()
        })
        .await
        .expect("detaching does not panic")?;
        tracing::info!(
            "detached from {}; it is back to the system's TCP settings",
            cgroup.display()
        );
        Ok(())
    }

    /// Re-reads the table and switches the kernel to it; on error nothing changes. Logged, and
    /// recorded in the state file.
    async fn reload(&mut self, full: bool, named: Option<Vec<i64>>) -> Result<String, String> {
        self.state.reloading_since = Some(status::now());
        self.save_state();
        let started = Instant::now();
        let patched = if full || self.options.reapply_existing {
            None
        } else {
            self.try_patch(named).await
        };
        let result = match patched {
            Some(result) => result.map_err(|e| e.to_string()),
            None => {
                let whole = self.try_reload().await.map_err(|e| e.to_string());
                crate::memory::release_freed();
                whole
            }
        };
        if result.is_ok() {
            self.state.reloads_ok += 1;
        } else {
            self.state.reloads_failed += 1;
        }
        self.state.reloading_since = None;
        if let Some(e) = &self.enforcer {
            self.state.generation = e.generation();
        }
        self.state.last_reload = Some(ReloadRecord {
            at: status::now(),
            ok: result.is_ok(),
            message: match &result {
                Ok(report) => report.clone(),
                Err(e) => e.clone(),
            },
            ms: started.elapsed().as_millis() as u64,
        });
        self.save_state();
        match &result {
            Ok(report) => {
                tracing::info!("reload: {report}");
                notify(&[sd_notify::NotifyState::Status(&format!(
                    "{} rules enforced on {} (generation {})",
                    self.state.rules,
                    self.state.cgroup.display(),
                    self.state.generation
                ))]);
            }
            Err(e) => tracing::error!("reload failed, the previous policy stays in force: {e}"),
        }
        result
    }

    /// A reload that reads only the rows the table's change log names and patches the
    /// profiles of the rules they are (see `policy::patch`): Some(report) when it did (or
    /// nothing in force changed), Some(error) when the kernel refused the patch (nothing
    /// changed: a full reload is refused as well, and says the same), None when the table is
    /// to be read whole (the reason said), with nothing changed.
    async fn try_patch(&mut self, named: Option<Vec<i64>>) -> Option<Result<String, DaemonError>> {
        let index = self.index.as_ref()?;
        let started = Instant::now();
        let whole = |why: &dyn std::fmt::Display| {
            tracing::info!("reading the whole table: {why}");
            None
        };
        let enforcement = self.options.current_enforcement().ok()?;
        // The change log where the table keeps one, else the rows a notification named.
        let read = async {
            match (index.mark, named) {
                (Some(mark), _) => self.options.rules.read_changed(mark, MAX_PATCHED).await,
                (None, Some(ids)) if ids.len() <= MAX_PATCHED => {
                    self.options.rules.read_rows(ids).await.map(Ok)
                }
                (None, Some(_)) => Ok(Err(format!("more than {MAX_PATCHED} rows changed"))),
                (None, None) => Ok(Err("nothing said which rows changed".to_owned())),
            }
        };
        let changed = match tokio::time::timeout(self.options.db_timeout, read).await {
            Ok(Ok(Ok(changed))) => changed,
            Ok(Ok(Err(why))) => return whole(&why),
            // The whole read says what is wrong, as reloads without a change log do.
            Ok(Err(e)) => return whole(&format_args!("reading the change log: {e}")),
            Err(_) => return whole(&"reading the change log timed out"),
        };
        let patch = match index.patch(&changed, enforcement) {
            Ok(patch) => patch,
            Err(why) => return whole(&why),
        };
        let read_ms = started.elapsed().as_millis();
        let kernel = crate::kernel::features::column_features();
        for u in crate::kernel::features::unenforceable(
            &changed.rules,
            kernel,
            &self.options.enforcement,
        ) {
            tracing::error!("{u}; the rule's other columns are enforced");
        }
        if !patch.changes.is_empty() {
            let mut enforcer = self.enforcer.take().expect("the reloader holds the policy");
            let keeper = self.keeper.clone();
            let changes = patch.changes.clone();
            let (enforcer, result) = tokio::task::spawn_blocking(move || {
                let mut pins = keeper.hold();
                let result = enforcer.patch(&changes);
                if let Ok(true) = result {
                    match enforcer.pins() {
                        Ok(now) => *pins = now,
                        Err(e) => tracing::warn!("holding the new pins: {e}"),
                    }
                }
                (enforcer, result)
            })
            .await
            .expect("patching does not panic");
            self.enforcer = Some(enforcer);
            match result {
                Ok(true) => {}
                Ok(false) => return whole(&"the profiles map has no room left"),
                Err(e) => return Some(Err(e.into())),
            }
        }
        self.state.source_health.read();
        let index = self.index.as_mut().expect("checked above");
        index.applied(&patch);
        self.published
            .set_sweep(index.lifetimes(), &self.options.enforcement);
        let generation = self.enforcer.as_ref().map_or(0, Enforcer::generation);
        let ids: Vec<String> = patch.ids.iter().map(u32::to_string).collect();
        let what = match ids.len() {
            0 => "no rule in force changed".to_owned(),
            1 => format!("rule {}'s profile changed in place", ids[0]),
            _ => format!("the profiles of rules {} changed in place", ids.join(", ")),
        };
        Some(Ok(format!(
            "generation {generation}: {} rules enforced ({what}; {} ms, {read_ms} of them reading the changed rows)",
            self.state.rules,
            started.elapsed().as_millis()
        )))
    }

    async fn try_reload(&mut self) -> Result<String, DaemonError> {
        let started = Instant::now();
        let set = read_valid(&self.options).await;
        match &set {
            Err(e @ (DaemonError::Rules(PipelineError::Source(_)) | DaemonError::Timeout(_))) => {
                self.state.source_health.failed(&e.to_string());
            }
            // The listeners, refused before the database was opened.
            Err(DaemonError::Rules(PipelineError::Listener(_))) => {}
            _ => self.state.source_health.read(),
        }
        let set = set?;
        let read_ms = started.elapsed().as_millis();
        let mut enforcer = self.enforcer.take().expect("the reloader holds the policy");
        let hz = self.hz;
        let enforcement = self.options.current_enforcement()?;
        if enforcement.audit != self.options.enforcement.audit {
            tracing::info!(
                "{} audit mode",
                if enforcement.audit {
                    "entering"
                } else {
                    "leaving"
                }
            );
        }
        // Audit mode sets nothing, on new connections or old ones.
        let reapply = (self.options.reapply_existing && !enforcement.audit)
            .then(|| self.options.netns.clone());
        let keeper = self.keeper.clone();
        let rows_notified = self.rows_notified;
        let (enforcer, result) = tokio::task::spawn_blocking(move || {
            let result = apply::apply(set, hz, enforcement, rows_notified, |policy, listeners| {
                let mut pins = keeper.hold();
                enforcer.replace(policy)?;
                match enforcer.pins() {
                    Ok(now) => *pins = now,
                    Err(e) => tracing::warn!("holding the new pins: {e}"),
                }
                drop(pins);
                if let Some(netns) = reapply {
                    reapply_existing(&enforcer, policy, listeners, netns);
                }
                Ok(())
            });
            (enforcer, result)
        })
        .await
        .expect("reloading does not panic");
        let generation = enforcer.generation();
        self.enforcer = Some(enforcer);
        let ((), applied) = result?;
        self.published.set(&applied.policy, &enforcement);
        self.index = applied.index;
        self.options.enforcement = enforcement;
        self.state.audit = enforcement.audit;
        self.state.rules = applied.policy.rules.len();
        Ok(format!(
            "generation {generation}: {} rules enforced ({} ms, {read_ms} of them reading the table)",
            self.state.rules,
            started.elapsed().as_millis()
        ))
    }
}

/// `--reapply-existing`, in the network namespace of the cgroup's sockets (a thread of its own
/// enters it).
fn reapply_existing(
    enforcer: &Enforcer,
    policy: &Policy,
    listeners: &Listeners,
    netns: Option<std::path::PathBuf>,
) {
    let cgroup = enforcer.cgroup().to_path_buf();
    let pin = enforcer.pin_dir().join(SOCKETS_PIN);
    let result = crate::netns::run_in(netns.as_deref(), || {
        crate::daemon::reapply::reapply(policy, listeners, &cgroup, &pin)
    });
    match result {
        Ok(done) => tracing::info!(
            "re-applied the new rules to {} existing connections ({} could not be reached)",
            done.updated,
            done.unreachable
        ),
        Err(e) => tracing::warn!("re-applying the new rules to existing connections: {e}"),
    }
}
