//! The kernel step of a start, an adoption and a reload: one path, all or nothing (see the
//! module documentation of `kernel`).
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::generation::Generation;
use super::pins::{adopt_links, remove_stale_pins};
use super::programs::{self, Programs};
use super::undo::Undo;
use super::{Enforcer, HOOKS, KernelError, Timings, fault, sys};
use crate::policy::compile::Policy;
use tcpmgm_common::Profile;

/// What `apply` starts from: nothing of this run's yet (a start, maybe adopting pinned links),
/// or the policy this run enforces.
pub(super) enum From<'a> {
    Start { cgroup: &'a Path, pin_dir: &'a Path },
    Running(&'a mut Enforcer),
}

/// The kernel step of a start, an adoption and a reload (see the module documentation). On
/// error, every change it made is undone.
pub(super) fn apply(
    policy: &Policy,
    from: From<'_>,
    made: &mut Option<Enforcer>,
) -> Result<(), KernelError> {
    let started = Instant::now();
    let mut undo = Undo::default();
    let wanted = programs::stats_capacity(policy.rules.len());
    match from {
        From::Start { cgroup, pin_dir } => {
            if !pin_dir.exists() {
                fault::point("pin-dir")
                    .and_then(|()| std::fs::create_dir_all(pin_dir))
                    .map_err(|e| KernelError::Pin {
                        path: pin_dir.to_path_buf(),
                        source: e.into(),
                    })?;
                undo.made_dir(pin_dir);
            }
            let pinned = adopt_links(pin_dir, cgroup)?;
            let adopted = pinned.iter().any(Option::is_some);
            let mut programs = Programs::load(pin_dir, wanted, &mut undo)?;
            if let Some(why) = programs.tracers_missing() {
                // What this kernel offers, said at every start: not a fault to act on.
                tracing::info!(
                    "connection outcomes: a reset by the peer, an abort on this host and unanswered keepalive probes are counted together as \"aborted\": the outcome tracers need {}: {why}",
                    super::features::TRACERS.needs()
                );
            }
            let loaded = started.elapsed();
            let first = Generation::build(policy, &programs.templates, 1, None)?;
            // These programs run nowhere yet: staging and switching are theirs alone.
            programs.stage(&first)?;
            programs.switch(first.number)?;
            let built = started.elapsed();
            let links = put_in_links(&programs, pinned, cgroup, pin_dir, &mut undo)?;
            programs.pin(pin_dir, &mut undo)?;
            first.pin(pin_dir, &mut undo)?;
            undo.commit();
            remove_stale_pins(pin_dir, programs.templates.traced);
            tracing::info!(
                cgroup = %cgroup.display(),
                pins = %pin_dir.display(),
                rules = policy.rules.len(),
                adopted,
                "policy attached"
            );
            *made = Some(Enforcer {
                timings: Timings {
                    programs: loaded,
                    maps: built - loaded,
                    attach: started.elapsed() - built,
                    last_switch: Duration::ZERO,
                },
                programs,
                current: first,
                retired: None,
                links,
                pin_dir: pin_dir.to_path_buf(),
                cgroup: cgroup.to_path_buf(),
                adopted,
            });
        }
        From::Running(e) => {
            e.restore_pins()?;
            let number = e.current.number + 1;
            if wanted > e.programs.stats_capacity() {
                // The table outgrew the rule statistics: programs with larger ones take over
                // the links, as a restart would.
                let mut programs = Programs::load(&e.pin_dir, wanted, &mut undo)?;
                let next =
                    Generation::build(policy, &programs.templates, number, Some(&e.current))?;
                programs.stage(&next)?;
                programs.switch(number)?;
                let links = e
                    .links
                    .iter()
                    .map(|l| l.try_clone().map(Some))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| KernelError::Step {
                        what: "holding the links",
                        source,
                    })?;
                put_in_links(&programs, links, &e.cgroup, &e.pin_dir, &mut undo)?;
                programs.pin(&e.pin_dir, &mut undo)?;
                next.pin(&e.pin_dir, &mut undo)?;
                undo.commit();
                // The old programs' maps go when nothing holds them; their slots with them.
                e.retired = None;
                e.programs = programs;
                e.current = next;
            } else {
                let next =
                    Generation::build(policy, &e.programs.templates, number, Some(&e.current))?;
                switch(e, next)?;
            }
            e.timings.last_switch = started.elapsed();
        }
    }
    Ok(())
}

/// The kernel step of a reload that changes profiles only (see `Enforcer::patch`).
pub(super) fn patch(e: &mut Enforcer, changes: &[(u32, Profile)]) -> Result<bool, KernelError> {
    let started = Instant::now();
    e.restore_pins()?;
    let number = e.current.number + 1;
    let Some(next) = e.current.patch(&e.programs.templates, number, changes)? else {
        return Ok(false);
    };
    switch(e, next)?;
    e.timings.last_switch = started.elapsed();
    Ok(true)
}

/// Stages `next`, pins its maps and makes it the generation in force; the one it replaces is
/// retired. On error the one in force stays, pins included.
fn switch(e: &mut Enforcer, next: Generation) -> Result<(), KernelError> {
    let mut undo = Undo::default();
    e.programs.stage(&next)?;
    let pinned_and_switched = next
        .pin(&e.pin_dir, &mut undo)
        .and_then(|()| e.programs.switch(next.number));
    if let Err(err) = pinned_and_switched {
        e.programs.abandon(&next, Some(&e.current));
        return Err(err);
    }
    undo.commit();
    let old = std::mem::replace(&mut e.current, next);
    e.retired = Some((old, Instant::now()));
    Ok(())
}

/// Puts `programs` into the cgroup's links: each hook's link in `links` (adopted from an
/// earlier run, or this run's) gets its program swapped; a hook without one gets a new link,
/// pinned. Recorded in `undo`.
pub(super) fn put_in_links(
    programs: &Programs,
    links: Vec<Option<OwnedFd>>,
    cgroup: &Path,
    pin_dir: &Path,
    undo: &mut Undo,
) -> Result<Vec<OwnedFd>, KernelError> {
    let cgroup_file = File::open(cgroup).map_err(|source| KernelError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (hook, link) in HOOKS.iter().zip(links) {
        let program = programs.program_fd(hook.name);
        let link = match link {
            Some(link) => {
                let old = sys::link_info(link.as_fd())
                    .and_then(|_| sys::obj_get(&pin_dir.join(hook.program_pin)))
                    .map_err(|e| KernelError::Link {
                        program: hook.name,
                        what: "opening the program it holds, to put it back on failure",
                        needs: None,
                        source: e.into(),
                    })?;
                undo.swap(&link, program, old, hook.name)?;
                link
            }
            None => {
                let link = fault::point(&format!("link-create:{}", hook.name))
                    .map_err(super::Cause::from)
                    .and_then(|()| {
                        sys::link_create(program, cgroup_file.as_fd(), hook.attach_type)
                            .map_err(super::Cause::from)
                    })
                    .map_err(|source| KernelError::LinkCreate {
                        program: hook.name,
                        needs: hook.needs,
                        source,
                    })?;
                undo.attached(&link, hook.name)
                    .map_err(|source| KernelError::Step {
                        what: "holding the new link",
                        source,
                    })?;
                undo.pin(link.as_fd(), &pin_dir.join(hook.pin))?;
                link
            }
        };
        out.push(link);
    }
    Ok(out)
}
