//! Events for the daemon's log (through aya-log), rate-limited per CPU so that a storm of
//! connections cannot flood the log: at most `LOG_EVENTS_PER_SECOND` a CPU a second.
use aya_ebpf::btf_maps::PerCpuArray;
use aya_ebpf::helpers::bpf_ktime_get_ns;
use tcpmgm_common::{LOG_EVENTS_PER_SECOND, LogBudget};

use crate::maps::TCPMGM_LOG_BUDGET;

/// Whether one more event may be logged now.
#[inline(always)]
pub fn allow() -> bool {
    within(&TCPMGM_LOG_BUDGET, LOG_EVENTS_PER_SECOND)
}

/// Whether this CPU may spend one more of `per_second` from `budget` this second (the log's,
/// the event stream's).
#[inline(always)]
pub fn within(budget: &PerCpuArray<LogBudget, 1>, per_second: u32) -> bool {
    let Some(budget) = budget.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU array; programs do not migrate mid-run.
    let budget = unsafe { &mut *budget };
    // SAFETY: a helper without arguments.
    let second = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    if budget.second != second {
        budget.second = second;
        budget.used = 0;
    }
    if budget.used >= per_second {
        return false;
    }
    budget.used += 1;
    true
}
