//! Many connections at once: a tokio echo server and a tokio runtime for
//! clients, each on threads inside a network namespace (a new thread
//! inherits its creator's namespaces, so the runtime's workers do too).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::TestNetns;

/// A tokio runtime whose threads all live in a namespace.
#[must_use]
pub fn runtime_in(netns: &TestNetns, workers: usize) -> tokio::runtime::Runtime {
    let ns = netns.open();
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter().expect("enter netns");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .expect("tokio runtime")
        })
        .join()
        .expect("runtime thread")
    })
}

/// Runs a future to completion on one of `rt`'s workers. `block_on` would
/// poll it on the calling thread, which is outside the namespace.
pub fn block_on_in<F>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    rt.block_on(rt.spawn(fut)).expect("task in namespace")
}

/// An echo server that holds any number of connections cheaply.
pub struct AsyncEcho {
    pub addr: SocketAddrV4,
    pub accepted: Arc<AtomicU64>,
    pub open: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AsyncEcho {
    /// Serves on a thread of its own with its own descriptor table
    /// (`unshare(CLONE_FILES)`), so its connections do not count against
    /// the test process's `RLIMIT_NOFILE` (the clients' do).
    #[must_use]
    pub fn start(netns: &TestNetns, ip: Ipv4Addr, port: u16) -> Self {
        let ns = netns.open();
        let (accepted, open) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let (a, o) = (Arc::clone(&accepted), Arc::clone(&open));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            ns.enter().expect("enter netns");
            drop(ns);
            // The runtime first, so its descriptors (and tokio's global
            // signal pipe) mean the same in both tables; then a table of
            // our own.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            // SAFETY: plain syscalls on this thread's own state.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&raw mut all);
                libc::pthread_sigmask(libc::SIG_BLOCK, &raw const all, std::ptr::null_mut());
                assert_eq!(libc::unshare(libc::CLONE_FILES), 0, "unshare(CLONE_FILES)");
            }
            rt.block_on(async move {
                let listener = TcpListener::bind((ip, port)).await.expect("bind echo farm");
                let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
                    unreachable!()
                };
                addr_tx.send(addr).unwrap();
                loop {
                    let (mut s, _) = tokio::select! {
                        r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                        // Polled: nothing but atomics crosses into this thread.
                        () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                            if stop_flag.load(Ordering::Relaxed) { break } continue;
                        }
                    };
                    a.fetch_add(1, Ordering::Relaxed);
                    o.fetch_add(1, Ordering::Relaxed);
                    let o = Arc::clone(&o);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = s.shutdown().await;
                        o.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            });
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
        });
        let addr = addr_rx.recv().expect("echo farm listening");
        Self {
            addr,
            accepted,
            open,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AsyncEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
