//! Per-CPU event counters (indexes in `agent_common::counter`).

use crate::COUNTERS;

/// Adds one to a counter on the current CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the slot belongs to this CPU and the program cannot be
        // preempted by another program touching the same slot mid-update.
        unsafe { *slot += 1 };
    }
}
