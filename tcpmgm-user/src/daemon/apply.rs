//! The one path from a table read whole to the policy in force, taken by the start and by
//! every full reload: compile, the kernel step (a first attach, or a switch of the policy in
//! force), the index a later reload of changed rows patches, and what the rules in force tell
//! the daemon's other tasks. Only the kernel step differs between the two; a failure at any
//! step leaves what was there before (nothing at a start, the previous policy at a reload).
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::DaemonError;
use super::lifetime;
use super::metrics::RuleBook;
use crate::policy::compile::{Enforcement, Policy, compile_with};
use crate::policy::listener::Listeners;
use crate::policy::patch::Index;
use crate::policy::pipeline::RuleSet;

/// What each rule set in force tells the daemon's other tasks.
#[derive(Clone, Default)]
pub struct Published {
    /// The con_lifetime sweeper's interval, in ms.
    pub sweep_every: Arc<AtomicU64>,
    /// The rules, for the metrics.
    pub book: RuleBook,
}

/// A table in force.
pub struct Applied {
    pub policy: Policy,
    pub listeners: Listeners,
    /// What a reload of the changed rows patches; None when nothing will say which rows
    /// changed (no change log, no notification that names rows).
    pub index: Option<Index>,
}

/// Compiles `set` and hands the policy to `kernel`, which takes it to the kernel and gives
/// back what the caller keeps of that (the enforcer of a first attach). `rows_notified` when
/// notifications may name the changed rows (PostgreSQL). Blocking: the caller's thread may
/// wait on the kernel's verifier and on map writes.
pub fn apply<T>(
    set: RuleSet,
    hz: u32,
    enforcement: Enforcement,
    rows_notified: bool,
    kernel: impl FnOnce(&Policy, &Listeners) -> Result<T, DaemonError>,
) -> Result<(T, Applied), DaemonError> {
    let policy = compile_with(set.rules, &set.listeners, hz, enforcement)?;
    let kept = kernel(&policy, &set.listeners)?;
    let index = (set.mark.is_some() || rows_notified)
        .then(|| Index::of(&policy, &set.listeners, enforcement, hz, set.rows, set.mark))
        .flatten();
    Ok((
        kept,
        Applied {
            policy,
            listeners: set.listeners,
            index,
        },
    ))
}

impl Published {
    /// Tells the other tasks about the rules now in force.
    pub fn set(&self, policy: &Policy, enforcement: &Enforcement) {
        self.book.set(&policy.rules);
        self.set_sweep(
            policy.rules.iter().map(|r| r.profile.con_lifetime_s),
            enforcement,
        );
    }

    /// The sweeper's interval for rules of these con_lifetimes (after a patch, which changes
    /// no rule but profiles).
    pub fn set_sweep(&self, lifetimes: impl Iterator<Item = u32>, enforcement: &Enforcement) {
        self.sweep_every.store(
            lifetime::sweep_interval_ms(lifetimes, enforcement),
            Ordering::Relaxed,
        );
    }
}
