//! The app side of the tests: a TCP stream driven the way network apps
//! drive theirs (Envoy, Go, Java NIO, curl, Python with timeouts): wait
//! with poll(2), then read or write without blocking.
//!
//! Why not plain blocking reads: on sockets in a sockmap, the kernel's
//! `tcp_bpf_recvmsg` returns EAGAIN to a *blocked* reader woken without data
//! (a peer reset; rarely, a race under full-duplex load). Event-driven code
//! just polls again; see README ("Kernel behaviour under the short-circuit").
//! `blocking_reader_*` tests cover the blocking case on its own.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

/// A non-blocking stream with poll-based, time-limited reads and writes.
#[derive(Debug)]
pub struct PollStream {
    inner: TcpStream,
    timeout: Duration,
}

impl PollStream {
    /// Wraps a connected stream (made non-blocking). I/O fails with
    /// `TimedOut` after `timeout` without progress.
    pub fn new(inner: TcpStream, timeout: Duration) -> io::Result<Self> {
        inner.set_nonblocking(true)?;
        Ok(Self { inner, timeout })
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            inner: self.inner.try_clone()?,
            timeout: self.timeout,
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    #[must_use]
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no progress before the timeout",
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.inner.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis())
                .unwrap_or(libc::c_int::MAX)
                .max(1);
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            match r {
                0 => {}
                r if r > 0 => return Ok(()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl Read for PollStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                other => return other,
            }
        }
    }
}

impl Write for PollStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.inner.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
