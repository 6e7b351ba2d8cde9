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

pub mod ingress;
pub mod relay;

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
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
    /// Where to report what is read from short-circuited sockets (the
    /// sk_msg backpressure), when the kernel cannot count it itself.
    pub ingress: Option<Arc<ingress::IngressReads>>,
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

    /// Their descriptors.
    fn raw_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
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
    phase: Arc<AtomicU8>,
    /// Workers whose accept loops still run.
    accepting: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<Stats>,
}

/// One worker: a thread with its own tokio runtime and its own descriptor
/// table (`unshare(CLONE_FILES)`), as Envoy's workers own their
/// connections: `RLIMIT_NOFILE` bounds each table, not the process, so the
/// proxy holds `workers × limit / 2` connections. A connection lives and
/// dies on the worker that accepted it; every worker accepts on the same
/// listening sockets.
///
/// The rule that keeps this sound: a descriptor number means the same file
/// in every table for everything that existed when the worker started (its
/// table is a copy), and nothing made later crosses between threads. So a
/// worker's runtime is built before it unshares (a waker from another
/// thread writes its eventfd by number), a worker may wake only runtimes
/// older than itself (tokio's signal broadcast wakes the main one), and
/// the control from [`ProxyHandle`] is an atomic it polls.
struct Worker {
    netns: Netns,
    listeners: Listeners,
    config: Arc<ProxyConfig>,
    stats: Arc<Stats>,
    limit: Arc<Semaphore>,
    phase: Arc<AtomicU8>,
    /// Held while this worker may still accept.
    accepting: Accepting,
}

/// Counts the workers that may still accept a connection: one each until
/// its accept loops have ended, so [`ProxyHandle::drain`] does not see "no
/// connection open" while one is being accepted.
struct Accepting(Arc<AtomicUsize>);

impl Accepting {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Accepting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// What the workers should be doing, set by [`ProxyHandle`] and polled by
/// each worker, so that nothing but atomics crosses into a worker.
const SERVING: u8 = 0;
const STOP_ACCEPTING: u8 = 1;
const CLOSE_ALL: u8 = 2;
/// How often a worker looks at [`ProxyHandle`]'s phase.
const PHASE_POLL: Duration = Duration::from_millis(10);

/// Descriptors a worker keeps beside two per connection: its runtime's,
/// the listeners, the copies of the table it started from, one accepted
/// socket not yet counted.
const WORKER_FD_MARGIN: u64 = 64;

impl Worker {
    /// Sets the thread up, reports how many connections its table holds
    /// (`ready`), waits for the go (`false`: another worker failed), serves.
    fn run(
        self,
        ready: &std::sync::mpsc::Sender<Result<usize, ProxyError>>,
        go: &std::sync::mpsc::Receiver<bool>,
    ) {
        let Self {
            netns,
            listeners,
            config,
            stats,
            limit,
            phase,
            accepting,
        } = self;
        // The runtime is built before the table is unshared (see
        // `Worker`): its epoll, eventfd and signal-pipe descriptors stay
        // open in the shared table too until the process exits, a few per
        // worker. Copies of everything else the process had open stay in
        // our table, but for other listening sockets: the agent's own
        // handles on the listeners must close when it says so, not when
        // this worker exits.
        let setup = (|| {
            netns.enter()?;
            drop(netns);
            let inherited = open_fds().map_err(ProxyError::Runtime)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ProxyError::Runtime)?;
            let now = open_fds().map_err(ProxyError::Runtime)?;
            isolate_thread().map_err(ProxyError::Runtime)?;
            let ours: Vec<RawFd> = listeners.raw_fds().collect();
            for fd in now {
                if inherited.contains(&fd) && !ours.contains(&fd) && is_listening(fd) {
                    // SAFETY: a copy in this thread's own table of a
                    // listening socket this thread neither owns nor uses.
                    unsafe { libc::close(fd) };
                }
            }
            Ok(rt)
        })();
        let rt = match setup {
            Ok(rt) => rt,
            Err(e) => {
                // Still the shared table: the starting thread closes these.
                std::mem::forget(listeners);
                return drop(ready.send(Err(e)));
            }
        };
        let fit = match connections_that_fit() {
            Ok(fit) => fit,
            Err(e) => return drop(ready.send(Err(ProxyError::Runtime(e)))),
        };
        let _ = ready.send(Ok(fit));
        if !go.recv().unwrap_or(false) {
            return;
        }
        rt.block_on(async move {
            // The phase, turned into this thread's own channels.
            let (accepting_tx, mut stop_accepting) = watch::channel(false);
            let (close_tx, mut close_all) = watch::channel(false);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PHASE_POLL);
                loop {
                    tick.tick().await;
                    let now = phase.load(Ordering::Relaxed);
                    accepting_tx.send_if_modified(|s| {
                        let changed = !*s && now >= STOP_ACCEPTING;
                        *s |= changed;
                        changed
                    });
                    if now >= CLOSE_ALL {
                        let _ = close_tx.send(true);
                        break;
                    }
                }
            });
            let register = |l: std::net::TcpListener| TcpListener::from_std(l);
            let (outbound, inbound) = match (
                register(listeners.outbound),
                listeners.inbound.map(register).transpose(),
            ) {
                (Ok(o), Ok(i)) => (o, i),
                (Err(e), _) | (_, Err(e)) => {
                    return warn!(error = %e, "proxy worker: cannot register its listeners");
                }
            };
            let local = Arc::new(Semaphore::new(fit));
            let serve = |l, d| {
                serve(
                    l,
                    d,
                    Shared {
                        config: Arc::clone(&config),
                        stats: Arc::clone(&stats),
                        limit: Arc::clone(&limit),
                        local: Arc::clone(&local),
                    },
                    stop_accepting.clone(),
                    close_all.clone(),
                )
            };
            let out = serve(outbound, Direction::Outbound);
            match inbound {
                Some(l) => drop(tokio::join!(out, serve(l, Direction::Inbound))),
                None => out.await,
            }
            // Accepting stopped (every connection accepted is counted open
            // by now): live connections carry on until they end or we are
            // told to close them all.
            drop(accepting);
            let _ = stop_accepting.wait_for(|s| *s).await;
            let _ = close_all.wait_for(|c| *c).await;
        });
        // Connections still open are dropped (closed) here; the rest of the
        // table goes with the thread.
        rt.shutdown_timeout(Duration::from_millis(100));
    }
}

/// Gives the calling thread its own copy of the descriptor table, and
/// blocks signals on it: they are handled on the main thread, whose table
/// the handlers' descriptors were made in.
fn isolate_thread() -> io::Result<()> {
    // SAFETY: plain syscalls on this thread's own state; the set is
    // initialised by sigfillset before use.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&raw mut all);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const all, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if libc::unshare(libc::CLONE_FILES) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The descriptors open in this thread's table (not counting the one the
/// listing itself uses).
fn open_fds() -> io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/thread-self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.starts_with("/proc/") && target.ends_with("fd") {
            continue;
        }
        fds.push(fd);
    }
    Ok(fds)
}

/// Whether `fd` is a listening socket.
fn is_listening(fd: RawFd) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt into a c_int of the given length; a descriptor that
    // is not a socket fails with ENOTSOCK.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut on).cast(),
            &raw mut len,
        )
    };
    rc == 0 && on != 0
}

/// How many connections (two descriptors each) this thread's descriptor
/// table still holds under `RLIMIT_NOFILE`.
fn connections_that_fit() -> io::Result<usize> {
    let used = std::fs::read_dir("/proc/thread-self/fd")?.count() as u64;
    // SAFETY: getrlimit with a valid struct.
    let limit = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur
    };
    let room = limit.saturating_sub(used + WORKER_FD_MARGIN) / 2;
    Ok(usize::try_from(room).unwrap_or(usize::MAX))
}

/// What a worker's accept loops share.
struct Shared {
    config: Arc<ProxyConfig>,
    stats: Arc<Stats>,
    /// `--max-connections`, across workers.
    limit: Arc<Semaphore>,
    /// What this worker's descriptor table holds.
    local: Arc<Semaphore>,
}

impl ProxyHandle {
    /// Serves `listeners` on `config.worker_threads` worker threads, each
    /// inside `netns` (so every upstream socket is created there too).
    pub fn start(
        netns: &Netns,
        config: ProxyConfig,
        listeners: Listeners,
    ) -> Result<Self, ProxyError> {
        let workers = config.worker_threads.max(1);
        let phase = Arc::new(AtomicU8::new(SERVING));
        let accepting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let config = Arc::new(config);
        // Every worker may take every connection until we know how many its
        // descriptor table holds; then the excess is forgotten below.
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let (go_tx, go_rx): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| std::sync::mpsc::channel::<bool>())
            .unzip();
        let mut threads = Vec::with_capacity(workers);
        let mut failure = None;
        for (i, go) in go_rx.into_iter().enumerate() {
            let spawned = (|| {
                let copies = listeners.try_clone().map_err(ProxyError::Runtime)?;
                let ours: Vec<RawFd> = copies.raw_fds().collect();
                let worker = Worker {
                    netns: netns.try_clone().map_err(ProxyError::Runtime)?,
                    listeners: copies,
                    config: Arc::clone(&config),
                    stats: Arc::clone(&stats),
                    limit: Arc::clone(&limit),
                    phase: Arc::clone(&phase),
                    accepting: Accepting::new(&accepting),
                };
                let (ready, ready_rx) = std::sync::mpsc::channel();
                let thread = std::thread::Builder::new()
                    .name(format!("proxy-{i}"))
                    .spawn(move || worker.run(&ready, &go))
                    .map_err(ProxyError::Runtime)?;
                // The worker has its own copy of the descriptor table now
                // (or failed): ours of its listeners go.
                let answer = ready_rx.recv();
                for fd in ours {
                    // SAFETY: these fds were created above for this worker,
                    // are owned by nothing in this table, and are closed once.
                    unsafe { libc::close(fd) };
                }
                match answer {
                    Ok(Ok(fit)) => Ok((thread, fit)),
                    Ok(Err(e)) => {
                        let _ = thread.join();
                        Err(e)
                    }
                    Err(_) => {
                        let _ = thread.join();
                        Err(ProxyError::Runtime(io::Error::other(
                            "proxy worker exited before serving",
                        )))
                    }
                }
            })();
            match spawned {
                Ok((thread, fit)) => threads.push((thread, fit)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(listeners);
        let go = failure.is_none();
        for tx in &go_tx {
            let _ = tx.send(go);
        }
        if let Some(e) = failure {
            for (t, _) in threads {
                let _ = t.join();
            }
            return Err(e);
        }
        let fits: usize = threads.iter().map(|(_, fit)| fit).sum();
        let max = config.max_connections.min(fits);
        limit.forget_permits(config.max_connections - max);
        if max < config.max_connections {
            warn!(
                max_connections = config.max_connections,
                allowed = max,
                workers,
                "proxy: RLIMIT_NOFILE holds fewer connections than --max-connections (two descriptors each, per worker); connections beyond are reset; raise the limit or --workers"
            );
        }
        info!(outbound = %config.outbound, inbound = ?config.inbound, mark = config.mark, workers, max_connections = max, "proxy: listeners up");
        Ok(Self {
            phase,
            accepting,
            threads: threads.into_iter().map(|(t, _)| t).collect(),
            stats,
        })
    }

    /// Stops accepting new connections (the proxy's copies of the listening
    /// sockets close; connections waiting to be accepted stay queued for
    /// whoever else holds them). Open connections carry on.
    pub fn stop_accepting(&self) {
        self.phase.fetch_max(STOP_ACCEPTING, Ordering::Relaxed);
    }

    /// After [`Self::stop_accepting`]: waits until every worker stopped
    /// accepting and no connection is open, or `deadline` passes; returns
    /// how many were still open.
    #[must_use = "the connections still open"]
    pub fn drain(&self, deadline: Instant) -> u64 {
        loop {
            // Accept loops first: a connection accepted is counted open
            // before its worker's loop ends.
            let accepting = self.accepting.load(Ordering::Acquire);
            let open = self.stats.open();
            if (accepting == 0 && open == 0) || Instant::now() >= deadline {
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
        self.phase.store(CLOSE_ALL, Ordering::Relaxed);
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

async fn serve(
    listener: TcpListener,
    direction: Direction,
    shared: Shared,
    mut stop_accepting: watch::Receiver<bool>,
    close_all: watch::Receiver<bool>,
) {
    let Shared {
        config,
        stats,
        limit,
        local,
    } = shared;
    let mut next_id: u64 = 0;
    loop {
        // Room in this worker's table first. When it is full the other
        // workers take new connections, unless the proxy as a whole is
        // full: then accept, to reset at once.
        let room = match Arc::clone(&local).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if limit.available_permits() == 0 => None,
            Err(_) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(5)) => continue,
                    _ = stop_accepting.wait_for(|s| *s) => break,
                }
            }
        };
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
        let (Some(room), Ok(permit)) = (room, Arc::clone(&limit).try_acquire_owned()) else {
            // Full: refuse at once rather than leave the client hanging.
            stats
                .rejected_max_connections
                .fetch_add(1, Ordering::Relaxed);
            socket::reset_on_close(&client);
            continue;
        };
        let open = OpenGuard::new(&stats, direction);
        next_id += 1;
        let span = info_span!("conn", dir = direction.name(), id = next_id, src = %peer, dst = tracing::field::Empty);
        let (config, stats, mut close_all) =
            (Arc::clone(&config), Arc::clone(&stats), close_all.clone());
        tokio::spawn(
            async move {
                let _held = (permit, room, open);
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

/// Counts a connection open from its accept for as long as it lives.
struct OpenGuard(Arc<Stats>, Direction);

impl OpenGuard {
    fn new(stats: &Arc<Stats>, direction: Direction) -> Self {
        let d = stats.direction(direction);
        d.connections_total.fetch_add(1, Ordering::Relaxed);
        d.connections_open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(stats), direction)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .direction(self.1)
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(mut client: TcpStream, direction: Direction, config: &ProxyConfig, stats: &Stats) {
    let dstats = stats.direction(direction);
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
    let mut upstream = match tokio::time::timeout(config.connect_timeout, connect).await {
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
    let outcome = relay::relay(
        &mut client,
        &mut upstream,
        config.buffer_size,
        config.idle_timeout,
        config.ingress.as_deref(),
    )
    .await;
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
