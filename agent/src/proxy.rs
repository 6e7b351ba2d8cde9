//! The built-in proxy: listens on the outbound port inside the served
//! network namespace, recovers each connection's original destination,
//! connects there with its mark (so it is never captured again), and relays
//! bytes both ways.
//!
//! It runs on its own thread and tokio runtime; that thread enters the
//! served namespace first, and the runtime's worker threads inherit it, so
//! every socket the proxy creates lives in the pod's namespace even when the
//! agent itself does not (like ztunnel's in-pod mode).

pub mod relay;

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::SockRef;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
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
    /// Per-direction relay buffer, allocated when a connection first has data.
    pub buffer_size: usize,
    pub worker_threads: usize,
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
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// The proxy's listening sockets, bound inside the served namespace before
/// anything is attached (so a port in use fails with nothing to undo).
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

/// Counters the proxy keeps (read by the metrics and the tests).
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub orig_dst_missing: AtomicU64,
    pub upstream_refused: AtomicU64,
    pub upstream_timeout: AtomicU64,
    pub upstream_reset: AtomicU64,
    pub client_reset: AtomicU64,
}

/// A running proxy. Stopping it closes the listener and every connection.
pub struct ProxyHandle {
    shutdown: watch::Sender<bool>,
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
        let (shutdown, shutdown_rx) = watch::channel(false);
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
                    info!(outbound = %config.outbound, inbound = ?config.inbound, mark = config.mark, "proxy: listeners up");
                    let _ = ready_tx.send(Ok(()));
                    let config = Arc::new(config);
                    let out = serve(outbound, Direction::Outbound, Arc::clone(&config), Arc::clone(&thread_stats), shutdown_rx.clone());
                    match inbound {
                        Some(l) => {
                            let inb = serve(l, Direction::Inbound, config, thread_stats, shutdown_rx);
                            tokio::join!(out, inb);
                        }
                        None => out.await,
                    }
                });
                // Connections still open are dropped (closed) here.
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(ProxyError::Runtime)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                shutdown,
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

    /// Stops accepting, closes every connection and the listener, and waits.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.shutdown.send(true);
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
    mut shutdown: watch::Receiver<bool>,
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
            _ = shutdown.changed() => break,
        };
        next_id += 1;
        let span = info_span!("conn", dir = direction.name(), id = next_id, src = %peer, dst = tracing::field::Empty);
        let config = Arc::clone(&config);
        let stats = Arc::clone(&stats);
        tokio::spawn(handle(client, direction, config, stats).instrument(span));
    }
    debug!(direction = direction.name(), "proxy: listener closed");
}

/// Decrements the open-connection gauge on every exit path.
struct OpenGuard<'a>(&'a Stats);

impl<'a> OpenGuard<'a> {
    fn new(stats: &'a Stats) -> Self {
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

async fn handle(
    client: TcpStream,
    direction: Direction,
    config: Arc<ProxyConfig>,
    stats: Arc<Stats>,
) {
    let _open = OpenGuard::new(&stats);
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
    let outcome = relay::relay(&client, &upstream, config.buffer_size).await;
    stats
        .bytes_to_upstream
        .fetch_add(outcome.to_upstream, Ordering::Relaxed);
    stats
        .bytes_to_client
        .fetch_add(outcome.to_client, Ordering::Relaxed);
    match &outcome.error {
        None => debug!(
            to_upstream = outcome.to_upstream,
            to_client = outcome.to_client,
            "closed"
        ),
        Some(e) => {
            match e.side {
                relay::Side::Upstream => stats.upstream_reset.fetch_add(1, Ordering::Relaxed),
                relay::Side::Client => stats.client_reset.fetch_add(1, Ordering::Relaxed),
            };
            debug!(side = ?e.side, error = %e.source, to_upstream = outcome.to_upstream, to_client = outcome.to_client, "reset propagated");
        }
    }
}

/// Envoy's inbound passthrough source: connections from it to the app are
/// never captured again (both modes).
pub const INBOUND_PASSTHROUGH_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

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
