//! How this kernel treats the readers of a socket in a sockmap, measured
//! at start-up on a socket pair of our own (`PROBE_SOCKETS`, with a tiny
//! sk_msg program that redirects each message to the other socket), so a
//! kernel that one day gets it right is recognized by its behaviour, not
//! its version:
//!
//! - whether a *blocking* read that is woken without data (here: another
//!   thread changing `SO_SNDBUF`, which wakes the socket's waiters as write
//!   space does) returns `EAGAIN` instead of waiting on, as
//!   `tcp_bpf_recvmsg` does to this day;
//! - whether a blocking read asleep when the peer resets gets `EAGAIN`
//!   instead of `ECONNRESET`;
//! - whether redirected bytes waiting in the ingress queue are charged to
//!   the reader's receive memory (`sk_rmem_alloc`, since 6.13 and in the
//!   6.1/6.12 stable series), the measure the datapath bounds the queue by.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use agent_common::{maps as names, programs};
use aya::{EbpfLoader, maps::SockHash, programs::SkMsg};
use serde::Serialize;

use super::{EbpfError, OBJECT};

/// What the probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReadBehaviour {
    /// A blocking read woken without data returned EAGAIN.
    pub eagain_on_wakeup: bool,
    /// A blocking read asleep when the peer reset returned EAGAIN.
    pub eagain_on_reset: bool,
    /// Queued redirected bytes count in the reader's receive memory.
    pub ingress_charged: bool,
}

impl ReadBehaviour {
    /// Blocking readers must be kept out of the short-circuit.
    #[must_use]
    pub const fn blocking_reads_fail(&self) -> bool {
        self.eagain_on_wakeup || self.eagain_on_reset
    }

    /// One line for logs and `doctor`.
    #[must_use]
    pub fn describe(&self) -> String {
        let reads = match (self.eagain_on_wakeup, self.eagain_on_reset) {
            (false, false) => "blocking reads wait as on TCP".to_owned(),
            (w, r) => format!(
                "a blocking read gets EAGAIN {}: blocking sockets stay on plain TCP",
                match (w, r) {
                    (true, true) => "when woken without data and when the peer resets",
                    (true, false) => "when woken without data",
                    _ => "when the peer resets",
                }
            ),
        };
        let memory = if self.ingress_charged {
            "queued bytes count in the reader's memory"
        } else {
            "queued bytes are not charged to the reader: no bound on the queue"
        };
        format!("{reads}; {memory}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("the probe's socket pair on 127.0.0.1: {0}")]
    Socket(std::io::Error),
    #[error("the probe's reader thread {0}")]
    Reader(&'static str),
}

fn sock(e: std::io::Error) -> ProbeError {
    ProbeError::Socket(e)
}

/// How long a probe read may wait at most (it is woken well before).
const READ_LIMIT: Duration = Duration::from_secs(3);

/// Runs the probe (about a tenth of a second).
pub fn probe() -> Result<ReadBehaviour, ProbeError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject.into());
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(EbpfError::from)?;
    let map = ebpf
        .take_map(names::PROBE_SOCKETS)
        .ok_or(EbpfError::Missing {
            kind: "map",
            name: names::PROBE_SOCKETS,
        })?;
    let mut pair: SockHash<_, u32> = SockHash::try_from(map).map_err(|source| EbpfError::Map {
        name: names::PROBE_SOCKETS,
        source,
    })?;
    let prog: &mut SkMsg = ebpf
        .program_mut(programs::PROBE_MSG)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name: programs::PROBE_MSG,
        })?
        .try_into()
        .map_err(super::load::program_err(programs::PROBE_MSG))?;
    prog.load()
        .map_err(super::load::program_err(programs::PROBE_MSG))?;
    prog.attach(pair.fd())
        .map_err(super::load::program_err(programs::PROBE_MSG))?;

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(sock)?;
    let reader = TcpStream::connect(listener.local_addr().map_err(sock)?).map_err(sock)?;
    let (mut writer, _) = listener.accept().map_err(sock)?;
    for s in [&reader, &writer] {
        let port = s.local_addr().map_err(sock)?.port();
        pair.insert(u32::from(port), s.as_raw_fd(), 0)
            .map_err(|source| EbpfError::Map {
                name: names::PROBE_SOCKETS,
                source,
            })?;
    }
    reader.set_read_timeout(Some(READ_LIMIT)).map_err(sock)?;

    // Redirected bytes, then what the reader's receive memory says.
    let chunk = vec![0x5a_u8; 64 << 10];
    writer.write_all(&chunk).map_err(sock)?;
    let ingress_charged = rmem_alloc(&reader).map_err(sock)? >= chunk.len();
    let mut got = vec![0u8; chunk.len()];
    (&reader).read_exact(&mut got).map_err(sock)?;

    // A wakeup without data: SO_SNDBUF set from another thread wakes the
    // socket's waiters, as write space does.
    let eagain_on_wakeup = {
        let (done, woken) = start_read(&reader)?;
        let mut outcome = None;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            set_sndbuf(&reader).map_err(sock)?;
            if let Ok(r) = woken.recv_timeout(Duration::from_millis(20)) {
                outcome = Some(r);
                break;
            }
        }
        let outcome = if let Some(r) = outcome {
            r
        } else {
            // Still waiting, as it should: a byte ends the wait.
            writer.write_all(b"x").map_err(sock)?;
            woken
                .recv_timeout(READ_LIMIT * 2)
                .map_err(|_| ProbeError::Reader("did not return"))?
        };
        done.join().map_err(|_| ProbeError::Reader("panicked"))?;
        matches!(outcome, Outcome::Again)
    };

    // A reset while the reader sleeps.
    let eagain_on_reset = {
        let (done, woken) = start_read(&reader)?;
        std::thread::sleep(Duration::from_millis(30));
        socket2::SockRef::from(&writer)
            .set_linger(Some(Duration::ZERO))
            .map_err(sock)?;
        drop(writer);
        let outcome = woken
            .recv_timeout(READ_LIMIT * 2)
            .map_err(|_| ProbeError::Reader("did not return"))?;
        done.join().map_err(|_| ProbeError::Reader("panicked"))?;
        matches!(outcome, Outcome::Again)
    };
    Ok(ReadBehaviour {
        eagain_on_wakeup,
        eagain_on_reset,
        ingress_charged,
    })
}

/// How a probe read ended.
#[derive(Debug)]
enum Outcome {
    Data,
    /// `EAGAIN` before its timeout: woken without data.
    Again,
    Other,
}

/// A blocking read on another thread; its outcome arrives on the channel.
fn start_read(
    reader: &TcpStream,
) -> Result<(std::thread::JoinHandle<()>, mpsc::Receiver<Outcome>), ProbeError> {
    let s = reader.try_clone().map_err(sock)?;
    let (tx, rx) = mpsc::channel();
    let done = std::thread::spawn(move || {
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let outcome = match (&s).read(&mut buf) {
            Ok(n) if n > 0 => Outcome::Data,
            Err(e) if e.kind() == ErrorKind::WouldBlock && started.elapsed() < READ_LIMIT => {
                Outcome::Again
            }
            _ => Outcome::Other,
        };
        let _ = tx.send(outcome);
    });
    Ok((done, rx))
}

fn set_sndbuf(s: &TcpStream) -> std::io::Result<()> {
    let r = socket2::SockRef::from(s);
    let size = r.send_buffer_size()?;
    r.set_send_buffer_size(size / 2)
}

/// `SK_MEMINFO_RMEM_ALLOC` of `SO_MEMINFO`.
fn rmem_alloc(s: &TcpStream) -> std::io::Result<usize> {
    let mut info = [0u32; 9];
    let mut len = libc::socklen_t::try_from(std::mem::size_of_val(&info)).unwrap_or(36);
    // SAFETY: a buffer of `len` bytes and its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info[0] as usize)
}
