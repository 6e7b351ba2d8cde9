//! The built-in proxy: listens on the outbound and inbound ports inside the
//! served network namespace, recovers each connection's original
//! destination, connects there with its mark (so it is never captured
//! again; inbound from 127.0.0.6), and relays bytes both ways.
//!
//! It runs on its own thread and tokio runtime; that thread enters the
//! served namespace first, and the runtime's worker threads inherit it, so
//! every socket the proxy creates lives in the pod's namespace even when the
//! agent itself does not (like ztunnel's in-pod mode).
//!
//! Limits: a maximum number of connections (beyond it, new ones are reset at
//! once, never left hanging), connect and idle timeouts, and relay buffers
//! that exist only while data flows, so idle or trickling clients cost no
//! buffer memory. Stopping is two-step: stop accepting, then drain open
//! connections until a deadline.

mod accept;
mod connection;
pub mod drain;
pub mod ingress;
pub mod relay;
pub mod worker;

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use self::drain::{Phase, PhaseCell};
use crate::netns::{Netns, NetnsError};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where captured outbound connections arrive (127.0.0.1:<outbound-port>).
    pub outbound: SocketAddrV4,
    /// Where captured inbound connections arrive (0.0.0.0:<inbound-port>),
    /// if the proxy serves inbound.
    pub inbound: Option<SocketAddrV4>,
    /// `SO_MARK` on upstream sockets, so no redirect mode captures them (0 = none).
    pub mark: u32,
    pub connect_timeout: Duration,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Largest relay buffer per direction; buffers exist only while data flows.
    pub buffer_size: usize,
    pub worker_threads: usize,
    /// Connections beyond this are reset as soon as they are accepted.
    pub max_connections: usize,
    /// Where to report what is read from short-circuited sockets (the
    /// sk_msg backpressure), when the kernel cannot count it itself.
    pub ingress: Option<Arc<ingress::IngressReads>>,
}

/// Which way a proxied connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// App in the pod → somewhere else.
    Outbound,
    /// Somewhere else → app in the pod, forwarded from 127.0.0.6.
    Inbound,
}

impl Direction {
    pub const ALL: [Self; 2] = [Self::Outbound, Self::Inbound];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::Outbound => 0,
            Self::Inbound => 1,
        }
    }
}

/// Envoy's inbound passthrough source: connections from it to the app are
/// never captured again (both modes).
pub const INBOUND_PASSTHROUGH_SOURCE: Ipv4Addr = agent_common::INBOUND_PASSTHROUGH_SRC;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("proxy: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddrV4,
        source: io::Error,
    },
    #[error("proxy: starting its runtime: {0}")]
    Runtime(io::Error),
}

/// The proxy's listening sockets, bound inside the served namespace before
/// anything is attached (so a port in use fails with nothing to undo), or
/// received from the agent this one replaces.
#[derive(Debug)]
pub struct Listeners {
    pub outbound: std::net::TcpListener,
    pub inbound: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds the listeners of `config` inside `netns`.
    pub fn bind(netns: &Netns, config: &ProxyConfig) -> Result<Self, ProxyError> {
        netns.run(|| {
            let outbound = bind_std(config.outbound)?;
            let inbound = config.inbound.map(bind_std).transpose()?;
            Ok(Self { outbound, inbound })
        })?
    }

    /// Their descriptors.
    pub(super) fn raw_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        std::iter::once(self.outbound.as_raw_fd())
            .chain(self.inbound.as_ref().map(AsRawFd::as_raw_fd))
    }

    /// Duplicates the listening sockets (same sockets, new fds).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            outbound: self.outbound.try_clone()?,
            inbound: self
                .inbound
                .as_ref()
                .map(std::net::TcpListener::try_clone)
                .transpose()?,
        })
    }
}

fn bind_std(addr: SocketAddrV4) -> Result<std::net::TcpListener, ProxyError> {
    let bind = || -> io::Result<std::net::TcpListener> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.set_nonblocking(true)?;
        sock.bind(&SocketAddr::V4(addr).into())?;
        sock.listen(4096)?;
        Ok(sock.into())
    };
    bind().map_err(|source| ProxyError::Bind { addr, source })
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct DirectionStats {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    /// Client → upstream.
    pub bytes_to_upstream: AtomicU64,
    /// Upstream → client.
    pub bytes_to_client: AtomicU64,
}

/// What the proxy counts (read by the metrics and the tests).
#[derive(Debug, Default)]
pub struct Stats {
    directions: [DirectionStats; 2],
    pub orig_dst_missing: AtomicU64,
    pub upstream_refused: AtomicU64,
    pub upstream_timeout: AtomicU64,
    pub upstream_reset: AtomicU64,
    pub client_reset: AtomicU64,
    pub idle_closed: AtomicU64,
    pub rejected_max_connections: AtomicU64,
}

impl Stats {
    #[must_use]
    pub fn direction(&self, d: Direction) -> &DirectionStats {
        &self.directions[d.index()]
    }

    /// Connections open in both directions.
    #[must_use]
    pub fn open(&self) -> u64 {
        self.directions
            .iter()
            .map(|d| d.connections_open.load(Ordering::Relaxed))
            .sum()
    }
}

/// A running proxy.
pub struct ProxyHandle {
    phase: Arc<PhaseCell>,
    /// Workers whose accept loops still run.
    accepting: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<Stats>,
}

impl ProxyHandle {
    /// Serves `listeners` on `config.worker_threads` worker threads, each
    /// inside `netns` (so every upstream socket is created there too).
    pub fn start(
        netns: &Netns,
        config: ProxyConfig,
        listeners: Listeners,
    ) -> Result<Self, ProxyError> {
        let phase = Arc::new(PhaseCell::default());
        let accepting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let config = Arc::new(config);
        let threads = worker::start(netns, &config, listeners, &stats, &phase, &accepting)?;
        Ok(Self {
            phase,
            accepting,
            threads,
            stats,
        })
    }

    /// Stops accepting new connections (the proxy's copies of the listening
    /// sockets close; connections waiting to be accepted stay queued for
    /// whoever else holds them). Open connections carry on.
    pub fn stop_accepting(&self) {
        self.phase.advance(Phase::StopAccepting);
    }

    /// After [`Self::stop_accepting`]: waits until every worker stopped
    /// accepting and no connection is open, or `deadline` passes; returns
    /// how many were still open.
    #[must_use = "the connections still open"]
    pub fn drain(&self, deadline: Instant) -> u64 {
        drain::wait(&self.accepting, || self.stats.open(), deadline)
    }

    /// Closes every connection and the listeners, and waits.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.phase.advance(Phase::CloseAll);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
