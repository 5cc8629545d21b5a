//! What each rule did, counted per CPU by rule id in `TCPMGM_RULE_STATS`, which every generation
//! and every run shares: counters a reload does not reset, as a metrics scraper expects.
use aya_ebpf::bindings::BPF_NOEXIST;
use tcpmgm_common::RuleStats;

use crate::maps::TCPMGM_RULE_STATS;

/// Bumps one of a rule's counters. A rule's entry is made by its first event: an entry another
/// CPU made meanwhile is bumped instead, so no event is lost.
#[inline(always)]
pub fn bump(rule_id: u32, f: impl Fn(&mut RuleStats)) {
    if let Some(s) = TCPMGM_RULE_STATS.get_ptr_mut(rule_id) {
        // SAFETY: this CPU's value; programs do not migrate mid-run.
        f(unsafe { &mut *s });
        return;
    }
    let mut first = RuleStats::default();
    f(&mut first);
    if TCPMGM_RULE_STATS
        .insert(rule_id, first, BPF_NOEXIST.into())
        .is_err()
        && let Some(s) = TCPMGM_RULE_STATS.get_ptr_mut(rule_id)
    {
        // SAFETY: as above.
        f(unsafe { &mut *s });
    }
}
