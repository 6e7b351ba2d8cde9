//! Moving a relay direction's bytes through a pipe with `splice(2)`: the
//! kernel hands the pages on, so a bulk transfer is not copied into the
//! proxy and out again.
//!
//! Only a socket whose bytes all sit in its TCP receive queue may be read
//! this way. A socket in a SOCKHASH (the app's end and the proxy's end of a
//! short-circuited connection) gets redirected bytes on a queue of its own,
//! which `recvmsg` reads and `splice` does not see: the relay never splices
//! *from* such a socket. Writing into one is fine (it goes through its
//! `sendmsg`, so sk_msg sees every byte, as with `write`).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// What one [`Pipe::fill`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// This many bytes are in the pipe.
    Moved(usize),
    /// The stream ended.
    End,
    /// The next byte is TCP urgent data: `splice` stops in front of it for
    /// good, where `recv` steps over it (no `SO_OOBINLINE`), so the rest is
    /// to be read with `recv`.
    Urgent,
}

/// A non-blocking pipe that holds what one `splice` from a socket moved
/// until it is spliced on.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds at most.
    capacity: usize,
    /// Bytes in it now.
    held: usize,
}

impl Pipe {
    /// A pipe of about `size` bytes (what the kernel grants; at least a
    /// page).
    pub fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own. A refusal (above
        // pipe-max-size) keeps the default size, read back below.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        // SAFETY: as above.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        Ok(Self {
            read,
            write,
            capacity,
            held: 0,
        })
    }

    /// What the pipe holds at most.
    pub const fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves what `from` has (up to `most` bytes and the pipe's room) into
    /// the pipe, once `from` is readable. At the urgent mark `from` stays
    /// readable.
    pub async fn fill(&mut self, from: &TcpStream, most: usize) -> io::Result<Filled> {
        let room = (self.capacity - self.held).min(most);
        let (r, w) = (from.as_raw_fd(), self.write.as_raw_fd());
        let filled = from
            .async_io(Interest::READABLE, || match splice(r, w, room) {
                // Only a stop that is not an error (reading an error
                // clears it: it must reach the relay).
                Ok(0) if at_urgent_mark(r) => Ok(Filled::Urgent),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && at_urgent_mark(r) => {
                    Ok(Filled::Urgent)
                }
                Ok(0) => Ok(Filled::End),
                Ok(n) => Ok(Filled::Moved(n)),
                Err(e) => Err(e),
            })
            .await?;
        if let Filled::Moved(n) = filled {
            self.held += n;
        }
        Ok(filled)
    }

    /// Moves what the pipe holds into `to`, waiting while `to` is full.
    /// `on_progress` runs after each partial move.
    pub async fn drain(&mut self, to: &TcpStream, mut on_progress: impl FnMut()) -> io::Result<()> {
        let r = self.read.as_raw_fd();
        while self.held > 0 {
            let held = self.held;
            let n = to
                .async_io(Interest::WRITABLE, || splice(r, to.as_raw_fd(), held))
                .await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "splice into the socket moved nothing",
                ));
            }
            self.held -= n;
            on_progress();
        }
        Ok(())
    }
}

/// `ioctl(SIOCATMARK)`: whether the next byte of `fd` is urgent data.
fn at_urgent_mark(fd: RawFd) -> bool {
    /// From `<linux/sockios.h>`.
    const SIOCATMARK: libc::Ioctl = 0x8905;
    let mut at: libc::c_int = 0;
    // SAFETY: the ioctl writes one int to `at`.
    unsafe { libc::ioctl(fd, SIOCATMARK, &raw mut at) == 0 && at != 0 }
}

/// One non-blocking `splice(2)` of up to `len` bytes.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call; no offsets (both
    // are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Bytes go through the pipe in order and whole; EOF reads as 0.
    #[tokio::test]
    async fn a_pipe_moves_a_stream_in_order_then_reports_its_end() {
        let (mut src, from) = pair().await;
        let (to, mut dst) = pair().await;
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            src.write_all(&sent).await.unwrap();
            src.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            dst.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut pipe = Pipe::new(64 * 1024).unwrap();
        assert!(pipe.capacity >= 4096);
        let mut moved = 0;
        loop {
            let n = match pipe.fill(&from, usize::MAX).await.unwrap() {
                Filled::Moved(n) => n,
                Filled::End => break,
                Filled::Urgent => panic!("no urgent data was sent"),
            };
            pipe.drain(&to, || {}).await.unwrap();
            assert_eq!(pipe.held, 0);
            moved += n;
        }
        drop(to);
        writer.await.unwrap();
        assert_eq!(moved, body.len());
        assert!(reader.await.unwrap() == body, "byte-exact");
    }
}
