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

pub mod relay;

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::SockRef;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Semaphore, watch},
};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    netns::{Netns, NetnsError},
    socket,
};

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
}

/// Which way a proxied connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
pub const INBOUND_PASSTHROUGH_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

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
    stop_accepting: watch::Sender<bool>,
    close_all: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<Stats>,
}

impl ProxyHandle {
    /// Serves `listeners` on a new thread that enters `netns` first (so
    /// every upstream socket is created there too).
    pub fn start(
        netns: &Netns,
        config: ProxyConfig,
        listeners: Listeners,
    ) -> Result<Self, ProxyError> {
        let netns = netns.try_clone().map_err(ProxyError::Runtime)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ProxyError>>();
        let (stop_accepting, accepting_rx) = watch::channel(false);
        let (close_all, close_rx) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("proxy".into())
            .spawn(move || {
                if let Err(e) = netns.enter() {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(config.worker_threads.max(1))
                    .thread_name("proxy-worker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(ProxyError::Runtime(e)));
                        return;
                    }
                };
                let mut close_rx2 = close_rx.clone();
                rt.block_on(async move {
                    let register = |l: std::net::TcpListener| TcpListener::from_std(l).map_err(ProxyError::Runtime);
                    let outbound = match register(listeners.outbound) {
                        Ok(l) => l,
                        Err(e) => return drop(ready_tx.send(Err(e))),
                    };
                    let inbound = match listeners.inbound.map(register).transpose() {
                        Ok(l) => l,
                        Err(e) => return drop(ready_tx.send(Err(e))),
                    };
                    info!(outbound = %config.outbound, inbound = ?config.inbound, mark = config.mark, max_connections = config.max_connections, "proxy: listeners up");
                    let _ = ready_tx.send(Ok(()));
                    let limit = Arc::new(Semaphore::new(config.max_connections));
                    let config = Arc::new(config);
                    let serve = |l, d| {
                        serve(l, d, Arc::clone(&config), Arc::clone(&thread_stats), Arc::clone(&limit), accepting_rx.clone(), close_rx.clone())
                    };
                    let out = serve(outbound, Direction::Outbound);
                    match inbound {
                        Some(l) => drop(tokio::join!(out, serve(l, Direction::Inbound))),
                        None => out.await,
                    }
                    // Accepting stopped: live connections carry on until
                    // they end or we are told to close them all.
                    let _ = close_rx2.wait_for(|c| *c).await;
                });
                // Connections still open are dropped (closed) here.
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(ProxyError::Runtime)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop_accepting,
                close_all,
                thread: Some(thread),
                stats,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ProxyError::Runtime(io::Error::other(
                    "proxy thread exited before serving",
                )))
            }
        }
    }

    /// Stops accepting new connections (the proxy's copies of the listening
    /// sockets close; connections waiting to be accepted stay queued for
    /// whoever else holds them). Open connections carry on.
    pub fn stop_accepting(&self) {
        let _ = self.stop_accepting.send(true);
    }

    /// Waits until no connection is open or `deadline` passes; returns how
    /// many were still open.
    #[must_use = "the connections still open"]
    pub fn drain(&self, deadline: Instant) -> u64 {
        loop {
            let open = self.stats.open();
            if open == 0 || Instant::now() >= deadline {
                return open;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes every connection and the listeners, and waits.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.stop_accepting.send(true);
        let _ = self.close_all.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

async fn serve(
    listener: TcpListener,
    direction: Direction,
    config: Arc<ProxyConfig>,
    stats: Arc<Stats>,
    limit: Arc<Semaphore>,
    mut stop_accepting: watch::Receiver<bool>,
    close_all: watch::Receiver<bool>,
) {
    let mut next_id: u64 = 0;
    loop {
        let (client, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, direction = direction.name(), "proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop_accepting.wait_for(|s| *s) => break,
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            // Full: refuse at once rather than leave the client hanging.
            stats
                .rejected_max_connections
                .fetch_add(1, Ordering::Relaxed);
            socket::reset_on_close(&client);
            continue;
        };
        next_id += 1;
        let span = info_span!("conn", dir = direction.name(), id = next_id, src = %peer, dst = tracing::field::Empty);
        let (config, stats, mut close_all) =
            (Arc::clone(&config), Arc::clone(&stats), close_all.clone());
        tokio::spawn(
            async move {
                let _permit = permit;
                tokio::select! {
                    () = handle(client, direction, &config, &stats) => {}
                    _ = close_all.wait_for(|c| *c) => debug!("closed at shutdown"),
                }
            }
            .instrument(span),
        );
    }
    debug!(direction = direction.name(), "proxy: stopped accepting");
}

/// Counts a connection open for as long as it lives.
struct OpenGuard<'a>(&'a DirectionStats);

impl<'a> OpenGuard<'a> {
    fn new(stats: &'a DirectionStats) -> Self {
        stats.connections_total.fetch_add(1, Ordering::Relaxed);
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(client: TcpStream, direction: Direction, config: &ProxyConfig, stats: &Stats) {
    let dstats = stats.direction(direction);
    let _open = OpenGuard::new(dstats);
    let _ = client.set_nodelay(true);
    let dst = match socket::original_dst(&client) {
        Ok(dst) => dst,
        Err(e) => {
            stats.orig_dst_missing.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "no original destination (SO_ORIGINAL_DST); resetting");
            socket::reset_on_close(&client);
            return;
        }
    };
    tracing::Span::current().record("dst", tracing::field::display(dst));
    if dst.port() == config.outbound.port()
        || config.inbound.is_some_and(|i| i.port() == dst.port())
    {
        warn!("original destination is one of the proxy's own ports; resetting to avoid a loop");
        socket::reset_on_close(&client);
        return;
    }
    let source = match direction {
        Direction::Outbound => None,
        Direction::Inbound => Some(SocketAddrV4::new(INBOUND_PASSTHROUGH_SOURCE, 0)),
    };
    let connect = connect_marked(source, dst, config.mark);
    let upstream = match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if socket::is_reset(&e) {
                stats.upstream_refused.fetch_add(1, Ordering::Relaxed);
            }
            debug!(error = %e, "upstream connect failed; resetting client");
            socket::reset_on_close(&client);
            return;
        }
        Err(_) => {
            stats.upstream_timeout.fetch_add(1, Ordering::Relaxed);
            debug!(timeout = ?config.connect_timeout, "upstream connect timed out; resetting client");
            socket::reset_on_close(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    debug!("relaying");
    let outcome = relay::relay(&client, &upstream, config.buffer_size, config.idle_timeout).await;
    dstats
        .bytes_to_upstream
        .fetch_add(outcome.to_upstream, Ordering::Relaxed);
    dstats
        .bytes_to_client
        .fetch_add(outcome.to_client, Ordering::Relaxed);
    match &outcome.end {
        relay::End::Closed => debug!(
            to_upstream = outcome.to_upstream,
            to_client = outcome.to_client,
            "closed"
        ),
        relay::End::Idle => {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            debug!(timeout = ?config.idle_timeout, "closed: idle");
        }
        relay::End::Failed(e) => {
            match e.side {
                relay::Side::Upstream => stats.upstream_reset.fetch_add(1, Ordering::Relaxed),
                relay::Side::Client => stats.client_reset.fetch_add(1, Ordering::Relaxed),
            };
            debug!(side = ?e.side, error = %e.source, to_upstream = outcome.to_upstream, to_client = outcome.to_client, "reset propagated");
        }
    }
}

/// Connects to `dst` (from `source`, if given) with a socket carrying `mark`,
/// set before `connect()` so the connect4 program (and iptables) see it.
async fn connect_marked(
    source: Option<SocketAddrV4>,
    dst: SocketAddrV4,
    mark: u32,
) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if mark != 0 {
        SockRef::from(&sock).set_mark(mark)?;
    }
    if let Some(src) = source {
        sock.bind(SocketAddr::V4(src))?;
    }
    sock.connect(SocketAddr::V4(dst)).await
}
