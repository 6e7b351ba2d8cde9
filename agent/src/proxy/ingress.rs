//! What the proxy read from each of its short-circuited sockets, reported
//! to the datapath for the sk_msg backpressure where the kernel cannot
//! count it itself (tracing programs refused, e.g. under lockdown): a
//! sender's sk_msg compares what it redirected into our socket with this,
//! and switches to TCP when we fall too far behind (see the eBPF `sk_msg`).
//!
//! The map descriptor is opened before the proxy's workers copy their
//! descriptor tables, so its number means the same map in every table;
//! each worker thread opens its own handle on it (a duplicate, in its own
//! table) the first time it reports. The owner returned by
//! [`IngressReads::new`] closes the starting thread's copy, after the
//! workers are gone.

use std::{
    cell::RefCell,
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
};

use agent_common::SockKey;
use tokio::net::TcpStream;
use tracing::debug;

use crate::ebpf::maps::IngressReadMap;

/// Report at least every this many bytes read: a sender may see us at most
/// this much further behind than we are.
pub const REPORT_EVERY: u64 = 256 * 1024;

/// The `INGRESS_READ` map and the namespace the proxy's sockets live in.
#[derive(Debug)]
pub struct IngressReads {
    map: RawFd,
    netns_cookie: u64,
}

thread_local! {
    /// This worker's own handle on the map.
    static MAP: RefCell<Option<IngressReadMap>> = const { RefCell::new(None) };
}

impl IngressReads {
    /// `map` must stay open (in the starting thread's table) for as long as
    /// the proxy runs: the returned owner holds it.
    #[must_use]
    pub fn new(map: OwnedFd, netns_cookie: u64) -> (Self, OwnedFd) {
        (
            Self {
                map: map.as_raw_fd(),
                netns_cookie,
            },
            map,
        )
    }

    /// A tracker for the reads of one socket.
    #[must_use]
    pub const fn tracker(&self) -> ReadTracker<'_> {
        ReadTracker {
            reads: self,
            key: None,
            reported: 0,
            live: true,
        }
    }

    /// Sets the socket's bytes read through this thread's handle on the map.
    fn update(&self, key: SockKey, total: u64) -> std::io::Result<()> {
        MAP.with_borrow_mut(|map| {
            if map.is_none() {
                // SAFETY: the descriptor stays open for the proxy's lifetime
                // (see `new`), with the same number in every worker's table;
                // the duplicate is this thread's own.
                let fd = unsafe { BorrowedFd::borrow_raw(self.map) }.try_clone_to_owned()?;
                *map = Some(IngressReadMap::from_fd(fd).map_err(std::io::Error::other)?);
            }
            map.as_mut().expect("opened above").set_read(key, total)
        })
    }
}

/// Counts one socket's reads and reports them every [`REPORT_EVERY`] bytes.
pub struct ReadTracker<'a> {
    reads: &'a IngressReads,
    key: Option<SockKey>,
    reported: u64,
    /// False once the socket turned out not to be short-circuited.
    live: bool,
}

impl ReadTracker<'_> {
    /// `total`: bytes read from `stream` (always the same socket) so far.
    pub fn read(&mut self, stream: &TcpStream, total: u64) {
        if !self.live || total - self.reported < REPORT_EVERY {
            return;
        }
        if self.key.is_none() {
            self.key = self.own_key(stream);
        }
        let Some(key) = self.key else {
            self.live = false;
            return;
        };
        match self.reads.update(key, total) {
            Ok(()) => self.reported = total,
            Err(e) => {
                // ENOENT: not short-circuited (or closed already).
                if e.raw_os_error() != Some(libc::ENOENT) {
                    debug!(error = %e, "reporting ingress reads failed");
                }
                self.live = false;
            }
        }
    }

    /// The socket's own tuple, as the datapath keys it.
    fn own_key(&self, stream: &TcpStream) -> Option<SockKey> {
        let (local, peer) = (stream.local_addr().ok()?, stream.peer_addr().ok()?);
        Some(SockKey::from_addrs(self.reads.netns_cookie, local, peer))
    }
}
