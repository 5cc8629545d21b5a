//! Events for the daemon's log (through aya-log), rate-limited per CPU so that a storm of
//! connections cannot flood the log: at most `LOG_EVENTS_PER_SECOND` a CPU a second.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use tcpmgm_common::LOG_EVENTS_PER_SECOND;

use crate::maps::TCPMGM_LOG_BUDGET;

/// Whether one more event may be logged now.
#[inline(always)]
pub fn allow() -> bool {
    let Some(budget) = TCPMGM_LOG_BUDGET.get_ptr_mut(0) else {
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
    if budget.used >= LOG_EVENTS_PER_SECOND {
        return false;
    }
    budget.used += 1;
    true
}
