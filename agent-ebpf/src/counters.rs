//! Per-CPU event counters (`agent_common::Counter`).

use agent_common::Counter;

use crate::COUNTERS;

/// Adds one to a counter on the current CPU.
#[inline(always)]
pub fn bump(counter: Counter) {
    add(counter, 1);
}

/// Adds `n` to a counter on the current CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the slot belongs to this CPU and the program cannot be
        // preempted by another program touching the same slot mid-update.
        unsafe { *slot += n };
    }
}
