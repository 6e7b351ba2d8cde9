//! A client looping on new connections, as apps that reconnect do: what
//! an upgrade must never refuse.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{PollStream, TestNetns};

/// A client in the pod that connects, writes and reads its echo in a loop
/// until stopped, counting what worked and what failed.
pub struct LoopingClient {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl LoopingClient {
    /// Starts looping inside `netns`.
    #[must_use]
    pub fn start(netns: &TestNetns, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let (stop, ok, failed, pod) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
                netns.open(),
            );
            std::thread::spawn(move || {
                pod.run(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let attempt = || -> std::io::Result<()> {
                            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                            let mut s = PollStream::new(s, Duration::from_secs(5))?;
                            s.write_all(b"ping")?;
                            let mut b = [0u8; 4];
                            s.read_exact(&mut b)
                        };
                        match attempt() {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("connection failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
                .unwrap();
            })
        };
        Self {
            stop,
            ok,
            failed,
            thread,
        }
    }

    /// How many worked so far.
    #[must_use]
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops; (worked, failed).
    #[must_use]
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
