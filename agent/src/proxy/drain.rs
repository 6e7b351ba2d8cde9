//! Stopping the proxy in two steps, as typed phases: stop accepting (the
//! listeners' copies close; open connections carry on), then close what is
//! still open. The [`ProxyHandle`](super::ProxyHandle) sets the phase and
//! rings an eventfd each worker waits on; nothing else crosses into a
//! worker (see `worker`), and an idle worker does not wake at all.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{Interest, unix::AsyncFd};

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
    /// Moves to `phase` unless a later one was set already; whether it
    /// moved.
    fn advance(&self, phase: Phase) -> bool {
        self.0.fetch_max(phase as u8, Ordering::AcqRel) < phase as u8
    }

    #[must_use]
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::StopAccepting,
            _ => Phase::CloseAll,
        }
    }
}

/// The handle's side: the phase and the eventfd that tells the workers it
/// moved. The eventfd is made in the process's descriptor table before any
/// worker exists, so each worker's table (a copy, `unshare(CLONE_FILES)`)
/// holds the same open file at the same number: a write here wakes them
/// all, and no thread touches another's table. It is never read: once
/// rung it stays readable, and each ring is a new edge for every worker's
/// edge-triggered epoll (mio's, as tokio's own eventfd waker relies on;
/// at most two rings: the phases only move forward). The handle that owns
/// this lives on threads of the process's table, never on a worker.
#[derive(Debug)]
pub struct PhaseSender {
    cell: Arc<PhaseCell>,
    wake: OwnedFd,
}

impl PhaseSender {
    /// # Errors
    /// When the eventfd cannot be made.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) with valid flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            cell: Arc::default(),
            // SAFETY: a descriptor just made, owned by nothing else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Moves every worker to `phase` (unless a later one was set already).
    pub fn advance(&self, phase: Phase) {
        if self.cell.advance(phase) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write from a live buffer to our eventfd.
            let n = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            // Only an overflowing counter fails it, which two rings never
            // reach; a worker that missed a ring would never stop.
            if n != 8 {
                tracing::error!(error = %io::Error::last_os_error(), "proxy: the drain eventfd could not be rung");
            }
        }
    }

    /// What a worker needs to watch the phase from its own table: the cell,
    /// and the eventfd's number (see [`PhaseWatch::adopt`]).
    #[must_use]
    pub fn for_worker(&self) -> (Arc<PhaseCell>, RawFd) {
        (Arc::clone(&self.cell), self.wake.as_raw_fd())
    }
}

/// A worker's side, in its own descriptor table and runtime.
pub struct PhaseWatch {
    cell: Arc<PhaseCell>,
    wake: AsyncFd<OwnedFd>,
}

impl PhaseWatch {
    /// Takes the worker table's copy of the eventfd `fd` (the number
    /// [`PhaseSender::for_worker`] gave) into this thread's runtime.
    ///
    /// # Safety
    /// The calling thread has its own descriptor table, copied from the
    /// process's while the sender was alive, and nothing else in it owns
    /// `fd`. Must run inside a tokio runtime.
    pub unsafe fn adopt(cell: Arc<PhaseCell>, fd: RawFd) -> io::Result<Self> {
        // SAFETY: the caller's promise: `fd` is this table's own copy.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an `OwnedFd` keeps its one descriptor open, unchanged,
        // until it is dropped with the `AsyncFd`.
        let wake = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }?;
        Ok(Self { cell, wake })
    }

    #[must_use]
    pub fn get(&self) -> Phase {
        self.cell.get()
    }

    /// Waits until the phase may have moved (the sender rang since the
    /// last call). `readable` fails only once the runtime's I/O driver is
    /// gone; then it looks again after a while rather than spin.
    pub async fn changed(&self) {
        match self.wake.readable().await {
            Ok(mut ready) => ready.clear_ready(),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

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
