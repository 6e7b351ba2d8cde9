//! The proxy's workers: a thread each, with its own tokio runtime and its
//! own descriptor table, entered into the served namespace.

use std::{
    io,
    os::fd::RawFd,
    sync::{Arc, atomic::AtomicUsize},
    thread::JoinHandle,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tracing::{info, warn};

use super::{
    Direction, Listeners, ProxyConfig, ProxyError, Stats, accept,
    drain::{Accepting, Phase, PhaseCell, PhaseSender, PhaseWatch},
};
use crate::netns::Netns;

/// One worker: a thread with its own tokio runtime and its own descriptor
/// table (`unshare(CLONE_FILES)`), as Envoy's workers own their
/// connections: `RLIMIT_NOFILE` bounds each table, not the process, so the
/// proxy holds `workers × limit / 2` connections. A connection lives and
/// dies on the worker that accepted it; every worker accepts on the same
/// listening sockets.
///
/// The rule that keeps this sound: a worker's table starts as a copy of the
/// process's and keeps only the standard streams, the descriptors of the
/// process's own runtime (see [`main_runtime`]), its listeners and its
/// proxy's phase eventfd; its
/// runtime is built after, in its table alone. Nothing else crosses between
/// threads by descriptor number: the control from [`ProxyHandle`] is an
/// atomic and an eventfd made before the worker (the same open file in
/// every table, see [`PhaseSender`]), and no other thread wakes a worker's
/// runtime.
/// So a worker holds nothing of other pods or other workers (a node agent's
/// tables stay the same size per pod however many pods it serves), and
/// nothing of a worker is left in the process's table when it ends.
pub(super) struct Worker {
    netns: Netns,
    listeners: Listeners,
    config: Arc<ProxyConfig>,
    stats: Arc<Stats>,
    limit: Arc<Semaphore>,
    phase: Arc<PhaseCell>,
    /// The number of the phase's eventfd, in the table this thread copies.
    phase_wake: RawFd,
    /// Held while this worker may still accept.
    accepting: Accepting,
}

/// Descriptors a worker keeps beside two per connection: its runtime's,
/// the process runtime's, the listeners, the phase eventfd, one accepted
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
            phase_wake,
            accepting,
        } = self;
        let setup = (|| {
            netns.enter()?;
            drop(netns);
            isolate_thread().map_err(ProxyError::Runtime)?;
            let ours: Vec<RawFd> = listeners.raw_fds().chain([phase_wake]).collect();
            let shared = SHARED_RUNTIME_FDS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            for fd in open_fds().map_err(ProxyError::Runtime)? {
                if fd > libc::STDERR_FILENO && !ours.contains(&fd) && !shared.contains(&fd) {
                    // SAFETY: a copy in this thread's own table of a
                    // descriptor this thread neither owns nor uses.
                    unsafe { libc::close(fd) };
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ProxyError::Runtime)?;
            let phase_watch = {
                let _in = rt.enter();
                // SAFETY: this thread's own table now (above), where nothing
                // else owns the eventfd's copy.
                unsafe { PhaseWatch::adopt(phase, phase_wake) }.map_err(ProxyError::Runtime)?
            };
            Ok((rt, phase_watch))
        })();
        let (rt, phase) = match setup {
            Ok(ready) => ready,
            Err(e) => {
                // Perhaps still the shared table (a failure before
                // `isolate_thread`): the starting thread closes these. After
                // it, they go with this thread's own table.
                std::mem::forget(listeners);
                return drop(ready.send(Err(e)));
            }
        };
        let fit = match connections_that_fit(config.fds_per_connection()) {
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
                loop {
                    let now = phase.get();
                    accepting_tx.send_if_modified(|s| {
                        let changed = !*s && now >= Phase::StopAccepting;
                        *s |= changed;
                        changed
                    });
                    if now >= Phase::CloseAll {
                        let _ = close_tx.send(true);
                        break;
                    }
                    phase.changed().await;
                }
            });
            let registered = match register(listeners) {
                Ok(r) => r,
                Err(e) => return warn!(error = %e, "proxy worker: cannot register its listeners"),
            };
            let local = Arc::new(Semaphore::new(fit));
            let serve = |l, d| {
                accept::serve(
                    l,
                    d,
                    accept::Shared {
                        config: Arc::clone(&config),
                        stats: Arc::clone(&stats),
                        limit: Arc::clone(&limit),
                        local: Arc::clone(&local),
                    },
                    stop_accepting.clone(),
                    close_all.clone(),
                )
            };
            // One accept loop per listener, on this thread.
            tokio::task::LocalSet::new()
                .run_until(async {
                    let mut loops = tokio::task::JoinSet::new();
                    for (l, d) in registered {
                        loops.spawn_local(serve(l, d));
                    }
                    while loops.join_next().await.is_some() {}
                })
                .await;
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

/// The listeners, with this thread's runtime. Each has `TCP_NODELAY`,
/// which every socket it accepts inherits (one call per listener instead
/// of one per connection): set when bound, and here again for listeners
/// an older agent handed over without it (a connection it had already
/// established keeps what the listener had then).
fn register(listeners: Listeners) -> io::Result<Vec<(TcpListener, Direction)>> {
    let Listeners { outbound, inbound } = listeners;
    outbound
        .into_iter()
        .map(|l| (l, Direction::Outbound))
        .chain(inbound.into_iter().map(|l| (l, Direction::Inbound)))
        .map(|(l, d)| {
            socket2::SockRef::from(&l).set_tcp_nodelay(true)?;
            TcpListener::from_std(l).map(|l| (l, d))
        })
        .collect()
}

/// Starts `config.worker_threads` workers on `listeners` inside `netns`;
/// each reports how many connections its descriptor table holds, and the
/// proxy as a whole then allows at most that many (and at most
/// `max_connections`). Either every worker serves, or none does.
pub(super) fn start(
    netns: &Netns,
    config: &Arc<ProxyConfig>,
    listeners: Listeners,
    stats: &Arc<Stats>,
    phase: &PhaseSender,
    accepting: &Arc<AtomicUsize>,
) -> Result<Vec<JoinHandle<()>>, ProxyError> {
    if SHARED_RUNTIME_FDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_empty()
    {
        // Its workers would close the descriptors tokio's signal handling
        // writes to by number (see `Worker`).
        return Err(ProxyError::Runtime(io::Error::other(
            "the proxy's workers need the process's runtime made by proxy::worker::main_runtime",
        )));
    }
    let workers = config.worker_threads.max(1);
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
            let (cell, phase_wake) = phase.for_worker();
            let worker = Worker {
                netns: netns.try_clone().map_err(ProxyError::Runtime)?,
                listeners: copies,
                config: Arc::clone(config),
                stats: Arc::clone(stats),
                limit: Arc::clone(&limit),
                phase: cell,
                phase_wake,
                accepting: Accepting::new(accepting),
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
            "proxy: RLIMIT_NOFILE holds fewer connections than --max-connections (two descriptors each, four with --splice, per worker); connections beyond are reset; raise the limit or --workers"
        );
    }
    info!(outbound_port = config.outbound_port, inbound_port = ?config.inbound_port, mark = config.mark, workers, max_connections = max, "proxy: listeners up");
    Ok(threads.into_iter().map(|(t, _)| t).collect())
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

/// Descriptors of the runtimes made on the process's own table, which
/// every worker's table keeps: tokio reads the signal pipe on whichever
/// runtime polls it first, a worker's included, and its broadcast then
/// wakes the main runtime's tasks by descriptor number.
static SHARED_RUNTIME_FDS: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());

/// The runtime of the process's main thread, for a process that starts
/// proxies: made before any other thread, so the descriptors it (and
/// tokio's signal pipe) opened are told apart exactly, and every worker's
/// table keeps them (see [`Worker`]).
///
/// # Errors
/// When the runtime cannot be built or `/proc/thread-self/fd` read.
pub fn main_runtime() -> io::Result<tokio::runtime::Runtime> {
    let before = open_fds()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let made = open_fds()?.into_iter().filter(|fd| !before.contains(fd));
    let mut shared = SHARED_RUNTIME_FDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    shared.extend(made);
    // Its epoll, its eventfd, tokio's signal pipe (two ends) and the
    // signal driver's copy: fewer, and another runtime came first.
    if shared.len() < 4 {
        return Err(io::Error::other(format!(
            "the main runtime opened {} descriptors: it must be the process's first",
            shared.len()
        )));
    }
    Ok(rt)
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

/// How many connections (`per_connection` descriptors each) this thread's
/// descriptor table still holds under `RLIMIT_NOFILE`.
fn connections_that_fit(per_connection: u64) -> io::Result<usize> {
    let used = std::fs::read_dir("/proc/thread-self/fd")?.count() as u64;
    // SAFETY: getrlimit with a valid struct.
    let limit = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur
    };
    let room = limit.saturating_sub(used + WORKER_FD_MARGIN) / per_connection.max(1);
    Ok(usize::try_from(room).unwrap_or(usize::MAX))
}

/// Descriptors a descriptor table needs beside two per proxied connection.
const FD_OVERHEAD: u64 = 512;

/// Raises the open-file limit so each worker's descriptor table holds its
/// share of `max_connections` (`fds_per_connection` each), raising the hard
/// limit too when it is lower and we may (`CAP_SYS_RESOURCE`), else up to
/// the hard limit. The proxy then says how many connections fit.
pub fn raise_fd_limit(config: &ProxyConfig) {
    let share = config
        .max_connections
        .div_ceil(config.worker_threads.max(1)) as u64;
    let want = config.fds_per_connection() * share + FD_OVERHEAD;
    // SAFETY: getrlimit/setrlimit with valid structs.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 || lim.rlim_cur >= want {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a registered listener accepts has `TCP_NODELAY` already (the
    /// relay sets it on no accepted socket), also where the listener came
    /// without it, as from an older agent.
    #[tokio::test]
    async fn an_accepted_socket_inherits_nodelay_from_its_registered_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let listeners = Listeners {
            outbound: vec![l],
            inbound: Vec::new(),
        };
        let registered = register(listeners).unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = registered[0].0.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
