//! Stopping the proxy in two steps, as typed phases: stop accepting (the
//! listeners' copies close; open connections carry on), then close what is
//! still open. The [`ProxyHandle`](super::ProxyHandle) sets the phase; each
//! worker polls it (nothing but atomics crosses into a worker, see
//! `worker`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// What the workers should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Serving = 0,
    /// Accept nothing more; open connections carry on.
    StopAccepting = 1,
    /// Close every connection.
    CloseAll = 2,
}

/// The phase, shared by the handle and every worker. It only moves forward.
#[derive(Debug, Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    /// Moves to `phase` unless a later one was set already.
    pub fn advance(&self, phase: Phase) {
        self.0.fetch_max(phase as u8, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            0 => Phase::Serving,
            1 => Phase::StopAccepting,
            _ => Phase::CloseAll,
        }
    }
}

/// How often a worker looks at the phase.
pub const PHASE_POLL: Duration = Duration::from_millis(10);

/// Counts the workers that may still accept a connection: one each until
/// its accept loops have ended, so [`wait`] does not see "no connection
/// open" while one is being accepted.
#[derive(Debug)]
pub struct Accepting(Arc<AtomicUsize>);

impl Accepting {
    pub fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Accepting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// After the accept loops were told to stop: waits until every worker
/// stopped accepting and `open()` is 0, or `deadline` passes; returns how
/// many connections were still open.
pub fn wait(accepting: &AtomicUsize, open: impl Fn() -> u64, deadline: Instant) -> u64 {
    loop {
        // Accept loops first: a connection accepted is counted open before
        // its worker's loop ends.
        let accepting = accepting.load(Ordering::Acquire);
        let open = open();
        if (accepting == 0 && open == 0) || Instant::now() >= deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
