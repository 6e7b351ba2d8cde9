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
pub mod relay;
mod splice;
pub mod worker;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use self::drain::{Phase, PhaseSender};
use crate::netns::{Netns, NetnsError};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where captured outbound connections arrive: 127.0.0.1 and `[::1]`.
    pub outbound_port: u16,
    /// Where captured inbound connections arrive (0.0.0.0 and `[::]`), if
    /// the proxy serves inbound.
    pub inbound_port: Option<u16>,
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
    /// Whether a bulk way out of the app (its leg is the accepted socket
    /// outbound, the passthrough socket inbound) goes on through
    /// `splice(2)`. Only where no socket can be in a SOCKHASH (see
    /// `relay::Splice`); off for good once a successor has the listeners
    /// ([`ProxyHandle::stop_splicing`]): its datapath may put the sockets
    /// we accept from then on into one. Read per connection.
    pub splice_from_app: Arc<AtomicBool>,
}

impl ProxyConfig {
    /// Descriptors one connection may hold: its two sockets, and a pipe
    /// when it may splice.
    #[must_use]
    pub fn fds_per_connection(&self) -> u64 {
        if self.splice_from_app.load(Ordering::Relaxed) {
            4
        } else {
            2
        }
    }
}

/// Which way a proxied connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// App in the pod → somewhere else.
    Outbound,
    /// Somewhere else → app in the pod, forwarded from 127.0.0.6 (`::6`
    /// over IPv6).
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

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("proxy: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("proxy: starting its runtime: {0}")]
    Runtime(io::Error),
}

/// The proxy's listening sockets, bound inside the served namespace before
/// anything is attached (so a port in use fails with nothing to undo), or
/// received from the agent this one replaces: one per family (IPv6 where
/// the namespace has it).
#[derive(Debug)]
pub struct Listeners {
    /// 127.0.0.1 and `[::1]`.
    pub outbound: Vec<std::net::TcpListener>,
    /// 0.0.0.0 and `[::]` (IPv6 only): empty without inbound capture.
    pub inbound: Vec<std::net::TcpListener>,
}

/// The addresses of one direction's listeners, IPv4 first.
fn addrs(direction: Direction, port: u16) -> [SocketAddr; 2] {
    match direction {
        Direction::Outbound => [
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        ],
        Direction::Inbound => [
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
        ],
    }
}

impl Listeners {
    /// Binds the listeners of `config` inside `netns`.
    pub fn bind(netns: &Netns, config: &ProxyConfig) -> Result<Self, ProxyError> {
        let mut empty = Self {
            outbound: Vec::new(),
            inbound: Vec::new(),
        };
        empty.bind_missing(netns, config)?;
        Ok(empty)
    }

    /// Binds, inside `netns`, the listeners of `config` this set lacks
    /// (all of them, or the IPv6 ones an older agent handed over without).
    /// An IPv6 listener is skipped where the namespace has no IPv6.
    pub fn bind_missing(&mut self, netns: &Netns, config: &ProxyConfig) -> Result<(), ProxyError> {
        let wanted = [
            (Direction::Outbound, Some(config.outbound_port)),
            (Direction::Inbound, config.inbound_port),
        ];
        netns.run(|| {
            for (direction, port) in wanted {
                let Some(port) = port else { continue };
                let have = match direction {
                    Direction::Outbound => &mut self.outbound,
                    Direction::Inbound => &mut self.inbound,
                };
                for addr in addrs(direction, port) {
                    let bound = have
                        .iter()
                        .any(|l| l.local_addr().is_ok_and(|a| a.is_ipv6() == addr.is_ipv6()));
                    if bound {
                        continue;
                    }
                    match bind_std(addr) {
                        Ok(l) => have.push(l),
                        Err(ProxyError::Bind { source, .. })
                            if addr.is_ipv6() && no_ipv6(&source) =>
                        {
                            tracing::info!(%addr, "proxy: no IPv6 in the namespace, no IPv6 listener");
                        }
                        Err(e) => return Err(e),
                    }
                }
                have.sort_by_key(|l| l.local_addr().map_or(true, |a| a.is_ipv6()));
            }
            Ok(())
        })?
    }

    /// Every listener with its direction.
    pub fn all(&self) -> impl Iterator<Item = (&std::net::TcpListener, Direction)> {
        self.outbound
            .iter()
            .map(|l| (l, Direction::Outbound))
            .chain(self.inbound.iter().map(|l| (l, Direction::Inbound)))
    }

    /// Their descriptors.
    pub(super) fn raw_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.all().map(|(l, _)| l.as_raw_fd())
    }

    /// Duplicates the listening sockets (same sockets, new fds).
    pub fn try_clone(&self) -> io::Result<Self> {
        let dup = |v: &[std::net::TcpListener]| {
            v.iter()
                .map(std::net::TcpListener::try_clone)
                .collect::<io::Result<Vec<_>>>()
        };
        Ok(Self {
            outbound: dup(&self.outbound)?,
            inbound: dup(&self.inbound)?,
        })
    }
}

/// Whether binding an IPv6 address failed because the namespace has no IPv6.
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
    )
}

fn bind_std(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let bind = || -> io::Result<std::net::TcpListener> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        sock.set_reuse_address(true)?;
        if addr.is_ipv6() {
            // The IPv4 listener takes IPv4, as an AF_INET one would.
            sock.set_only_v6(true)?;
        }
        sock.set_nonblocking(true)?;
        // Inherited by every socket it accepts (see `worker::register`);
        // set before `listen`, so none established early goes without.
        sock.set_tcp_nodelay(true)?;
        sock.bind(&addr.into())?;
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
    /// Ways (client → upstream, or back) of connections that turned bulk
    /// and went on through `splice(2)`.
    pub spliced: AtomicU64,
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
    phase: PhaseSender,
    /// Workers whose accept loops still run.
    accepting: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<Stats>,
    /// `ProxyConfig::splice_from_app` of the running workers.
    splice_from_app: Arc<AtomicBool>,
}

impl ProxyHandle {
    /// Connections accepted from now on are copied, never spliced: a
    /// successor has our listeners, and its datapath may put their sockets
    /// into a SOCKHASH. Called as the listeners are handed over, seconds
    /// before the successor can attach anything.
    pub fn stop_splicing(&self) {
        self.splice_from_app.store(false, Ordering::Relaxed);
    }

    /// Serves `listeners` on `config.worker_threads` worker threads, each
    /// inside `netns` (so every upstream socket is created there too).
    pub fn start(
        netns: &Netns,
        config: ProxyConfig,
        listeners: Listeners,
    ) -> Result<Self, ProxyError> {
        let phase = PhaseSender::new().map_err(ProxyError::Runtime)?;
        let accepting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let splice_from_app = Arc::clone(&config.splice_from_app);
        let config = Arc::new(config);
        let threads = worker::start(netns, &config, listeners, &stats, &phase, &accepting)?;
        Ok(Self {
            phase,
            accepting,
            threads,
            stats,
            splice_from_app,
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
