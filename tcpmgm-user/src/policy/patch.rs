//! Reloads that read only the rows that changed. Where the table keeps a change log (see
//! `source::Source::changes_since`), a reload reads the rows the log names since the last
//! read. When each of them is a rule in force whose id and match keys are unchanged, and
//! nothing else the policy depends on changed (the listeners, the enforcement, the table's row
//! count), the reload is a patch: those rules get their new profiles, every other map of the
//! generation in force is shared, and the switch is the same one-step switch as a full reload's.
//! Anything else (a rule added, removed, re-matched or invalid, more rows than a patch takes) is
//! a full reload, which gives the same maps a patch would have (a test holds the two to that).
use tcpmgm_common::Profile;

use crate::policy::compile::{Enforcement, Policy, kernel_profile};
use crate::policy::listener::Listeners;
use crate::policy::pipeline::Changed;
use crate::policy::source::Mark;

/// The most changed rows a reload patches; more are read whole.
pub const MAX_PATCHED: usize = 1_000;

/// What a patch needs to know of the rule set in force.
pub struct Index {
    /// (rule id, rank, match hash) of each rule, by id.
    rules: Vec<(u32, u32, u64)>,
    /// con_lifetime (s) by rank, for the sweeper.
    lifetimes: Vec<u32>,
    listeners: Listeners,
    enforcement: Enforcement,
    hz: u32,
    /// The table's rows (bad ones included) at the last read.
    rows: usize,
    /// The change log's position at the last read, where the table keeps one.
    pub mark: Option<Mark>,
}

/// A patch, ready for the kernel.
pub struct Patch {
    /// Each changed rule's rank and new profile.
    pub changes: Vec<(u32, Profile)>,
    /// The rule ids changed, for the report.
    pub ids: Vec<u32>,
    mark: Option<Mark>,
    lifetimes: Vec<(u32, u32)>,
}

impl Index {
    /// The index of `policy`, read from a table of `rows` rows at change log position `mark`.
    /// None when the table cannot be patched: rule ids that are not unique.
    pub fn of(
        policy: &Policy,
        listeners: &Listeners,
        enforcement: Enforcement,
        hz: u32,
        rows: usize,
        mark: Option<Mark>,
    ) -> Option<Index> {
        let mut rules: Vec<(u32, u32, u64)> = policy
            .rules
            .iter()
            .zip(0u32..)
            .map(|(r, rank)| (r.id, rank, r.match_hash()))
            .collect();
        rules.sort_unstable_by_key(|&(id, ..)| id);
        if rules.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        Some(Index {
            rules,
            lifetimes: policy.profiles.iter().map(|p| p.con_lifetime_s).collect(),
            listeners: listeners.clone(),
            enforcement,
            hz,
            rows,
            mark,
        })
    }

    /// The patch that takes the rule set in force to the table as `changed` read it, or why
    /// the table must be read whole.
    pub fn patch(&self, changed: &Changed, enforcement: Enforcement) -> Result<Patch, String> {
        if changed.listeners != self.listeners {
            return Err("the listeners changed".into());
        }
        if enforcement != self.enforcement {
            return Err("the enforcement options changed".into());
        }
        if let Some(e) = changed.errors.first() {
            return Err(format!("a changed row is not valid ({e})"));
        }
        let mut patch = Patch {
            changes: Vec::with_capacity(changed.rules.len()),
            ids: Vec::with_capacity(changed.rules.len()),
            mark: changed.mark,
            lifetimes: Vec::new(),
        };
        for &id in &changed.ids {
            let known = u32::try_from(id)
                .ok()
                .and_then(|id| self.rules.binary_search_by_key(&id, |&(id, ..)| id).ok())
                .map(|at| self.rules[at]);
            let now = changed.rules.iter().find(|r| i64::from(r.id) == id);
            match (known, now) {
                (None, None) => {} // added and removed since, or never a rule
                (None, Some(_)) => return Err(format!("rule {id} is new")),
                (Some(_), None) => return Err(format!("rule {id} was removed")),
                (Some((_, rank, hash)), Some(rule)) => {
                    if rule.match_hash() != hash {
                        return Err(format!("rule {id} matches differently"));
                    }
                    let profile = kernel_profile(rule, rank, self.hz, &self.enforcement);
                    patch.lifetimes.push((rank, profile.con_lifetime_s));
                    patch.changes.push((rank, profile));
                    patch.ids.push(rule.id);
                }
            }
        }
        // Rows the log did not name: changed with its triggers off.
        if changed.rows != self.rows {
            return Err(format!(
                "the table has {} rows, {} at the last read",
                changed.rows, self.rows
            ));
        }
        Ok(patch)
    }

    /// Takes in `patch`, once the kernel enforces it.
    pub fn applied(&mut self, patch: &Patch) {
        for &(rank, lifetime) in &patch.lifetimes {
            self.lifetimes[rank as usize] = lifetime;
        }
        self.mark = patch.mark.or(self.mark);
    }

    /// The con_lifetime of every rule, in seconds.
    pub fn lifetimes(&self) -> impl Iterator<Item = u32> + '_ {
        self.lifetimes.iter().copied()
    }
}
