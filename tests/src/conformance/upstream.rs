//! The servers of the conformance cells: plain blocking Rust servers, a
//! thread per connection, as many apps are written. Outbound they are the
//! upstream (in the server namespace); inbound they are the app in the pod
//! (started while the test process is in the pod's cgroup, so their
//! sockets are the pod's), where their own blocking calls meet the
//! short-circuit too.
//!
//! Every request names its cell, so what the server saw of it (bytes
//! received, the calls that failed, the peers) is kept per cell:
//!
//! - HTTP/1.1 on [`HTTP_PORT`], `Connection: close` after each response:
//!   `GET /c/CELL/small` ([`HTTP_BODY`]), `GET /c/CELL/download/N` (`N`
//!   bytes of the pattern), `GET /c/CELL/text/N` (`N` bytes of text lines),
//!   `POST /c/CELL/upload` (checked against the pattern; the answer is
//!   [`reply`]), `GET /c/CELL/reset-idle` (nothing, then a reset once the
//!   client is asleep reading), `GET /c/CELL/reset-mid/N` (the head of a
//!   longer body and `N` bytes of it, then a reset);
//! - an echo on [`ECHO_PORT`]: a line `CELL`, then every byte back; at the
//!   end of the client's stream, the end of ours;
//! - a half-close responder on [`HALF_CLOSE_PORT`]: a line `CELL`, then
//!   bytes until the client shuts down its write side, then [`reply`].

use std::{
    collections::HashMap,
    io::{self, ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::content::{Content, first_difference, reply};
use crate::{TestNetns, scaled, servers::HTTP_BODY};

pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 9000;
pub const HALF_CLOSE_PORT: u16 = 9001;
/// Where a proxy reaches the app from (Envoy's inbound passthrough source).
pub const PASSTHROUGH: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

/// What a server saw of one cell's connections.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub peers: Vec<IpAddr>,
    /// Bytes received (an upload's body, an echo's or a half-close's stream).
    pub received: u64,
    /// Where those first differ from the pattern.
    pub mismatch_at: Option<u64>,
    /// Blocking calls that failed with EAGAIN.
    pub eagain: Vec<String>,
    /// Every call that failed (the client may have gone: not a difference
    /// by itself).
    pub errors: Vec<String>,
}

type Records = Arc<Mutex<HashMap<String, Record>>>;

/// The three listeners of a namespace and their connections.
pub struct Upstream {
    records: Records,
    stop: Arc<AtomicBool>,
    /// A handle on every open connection, to wake its thread on drop.
    live: Arc<Mutex<HashMap<u64, TcpStream>>>,
    accept_threads: Vec<JoinHandle<()>>,
}

struct Ctx {
    records: Records,
    content: Arc<Content>,
}

impl Ctx {
    fn update(&self, cell: &str, f: impl FnOnce(&mut Record)) {
        f(self
            .records
            .lock()
            .unwrap()
            .entry(cell.to_owned())
            .or_default());
    }

    /// Records a failed call (and whether it was EAGAIN on this blocking
    /// socket).
    fn failed(&self, cell: &str, what: &str, e: &io::Error) {
        self.update(cell, |r| {
            if e.kind() == ErrorKind::WouldBlock {
                r.eagain.push(what.to_owned());
            }
            r.errors.push(format!("{what}: {e}"));
        });
    }
}

impl Upstream {
    /// Listens on `ip` (the three ports) inside `netns`. The sockets belong
    /// to the cgroup the test process is in now.
    #[must_use]
    pub fn start(netns: &TestNetns, ip: Ipv4Addr, content: Arc<Content>) -> Self {
        let listeners: Vec<(u16, TcpListener)> = netns.run(|| {
            [HTTP_PORT, ECHO_PORT, HALF_CLOSE_PORT]
                .into_iter()
                .map(|port| {
                    let l = TcpListener::bind((ip, port))
                        .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
                    l.set_nonblocking(true).unwrap();
                    (port, l)
                })
                .collect()
        });
        let records: Records = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let ctx = Arc::new(Ctx {
            records: Arc::clone(&records),
            content,
        });
        let next = Arc::new(AtomicU64::new(0));
        let accept_threads = listeners
            .into_iter()
            .map(|(port, listener)| {
                let (stop, live, ctx, next) = (
                    Arc::clone(&stop),
                    Arc::clone(&live),
                    Arc::clone(&ctx),
                    Arc::clone(&next),
                );
                std::thread::spawn(move || {
                    accept_loop(&listener, port, &stop, &live, &ctx, &next);
                })
            })
            .collect();
        Self {
            records,
            stop,
            live,
            accept_threads,
        }
    }

    /// What the server saw of `cell` so far.
    #[must_use]
    pub fn record(&self, cell: &str) -> Record {
        self.records
            .lock()
            .unwrap()
            .get(cell)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.accept_threads.drain(..) {
            let _ = t.join();
        }
        for conn in self.live.lock().unwrap().values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    port: u16,
    stop: &AtomicBool,
    live: &Arc<Mutex<HashMap<u64, TcpStream>>>,
    ctx: &Arc<Ctx>,
    next: &AtomicU64,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                conn.set_nonblocking(false).unwrap();
                let id = next.fetch_add(1, Ordering::Relaxed);
                if let Ok(handle) = conn.try_clone() {
                    live.lock().unwrap().insert(id, handle);
                }
                let (live, ctx) = (Arc::clone(live), Arc::clone(ctx));
                std::thread::spawn(move || {
                    match port {
                        HTTP_PORT => serve_http(conn, peer, &ctx),
                        ECHO_PORT => serve_echo(conn, peer, &ctx),
                        _ => serve_half_close(conn, peer, &ctx),
                    }
                    // The last handle: the connection closes here.
                    live.lock().unwrap().remove(&id);
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("conformance server accept: {e}"),
        }
    }
}

/// Resets the connection: `SO_LINGER` 0, then close.
fn reset(conn: TcpStream) {
    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
    drop(conn);
}

/// The request head, and the bytes after it.
fn read_head(conn: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(ErrorKind::InvalidData, "head over 64 KiB"));
        }
    }
}

/// The `CELL` line of the echo and half-close protocols, read byte by byte
/// (nothing of the data after it).
fn read_preamble(conn: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 128 {
        if conn.read(&mut byte)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Err(io::Error::new(ErrorKind::InvalidData, "no preamble"))
}

fn serve_http(mut conn: TcpStream, peer: SocketAddr, ctx: &Ctx) {
    let Ok((head, rest)) = read_head(&mut conn) else {
        return;
    };
    let mut lines = head.lines();
    let target = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let parts: Vec<&str> = target.trim_start_matches('/').split('/').collect();
    let (cell, action, n) = match parts.as_slice() {
        ["c", cell, action] => (*cell, *action, 0),
        ["c", cell, action, n] => (*cell, *action, n.parse().unwrap_or(0)),
        _ => {
            let _ = respond(&mut conn, "404 Not Found", b"no such cell\n");
            return;
        }
    };
    ctx.update(cell, |r| r.peers.push(peer.ip()));
    let sent = match action {
        "small" => respond(&mut conn, "200 OK", HTTP_BODY),
        "download" => respond(&mut conn, "200 OK", ctx.content.pattern(n)),
        "text" => respond(&mut conn, "200 OK", ctx.content.text(n)),
        "upload" => {
            let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) else {
                let _ = respond(&mut conn, "411 Length Required", b"");
                return;
            };
            if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                let _ = conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            match receive(&mut conn, &rest, Some(len), cell, ctx) {
                Ok(got) => respond(&mut conn, "200 OK", answer(got, cell, ctx).as_bytes()),
                Err(e) => Err(e),
            }
        }
        "reset-idle" => {
            // The client has sent its request and sleeps in its read.
            std::thread::sleep(scaled(Duration::from_millis(500)));
            reset(conn);
            return;
        }
        "reset-mid" => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                4 * n
            );
            let r = conn
                .write_all(head.as_bytes())
                .and_then(|()| conn.write_all(ctx.content.text(n)));
            if let Err(e) = r {
                ctx.failed(cell, "write", &e);
            }
            std::thread::sleep(scaled(Duration::from_millis(200)));
            reset(conn);
            return;
        }
        _ => respond(&mut conn, "404 Not Found", b"no such action\n"),
    };
    if let Err(e) = sent {
        ctx.failed(cell, "write", &e);
    }
}

fn respond(conn: &mut TcpStream, status: &str, body: &[u8]) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

/// The answer to `got` bytes received: [`reply`] if they were the pattern.
fn answer(got: usize, cell: &str, ctx: &Ctx) -> String {
    let records = ctx.records.lock().unwrap();
    match records.get(cell).and_then(|r| r.mismatch_at) {
        Some(at) => format!("{got} differ at {at}\n"),
        None => reply(got),
    }
}

/// Reads `len` bytes (or to the end of stream, if `None`) after `first`,
/// checking them against the pattern; records what arrived. The count, or
/// the read error (recorded).
fn receive(
    conn: &mut TcpStream,
    first: &[u8],
    len: Option<usize>,
    cell: &str,
    ctx: &Ctx,
) -> io::Result<usize> {
    let want = ctx.content.pattern(super::Scenario::Upload.size());
    let mut got = 0usize;
    let mut mismatch = None;
    let mut check = |bytes: &[u8], got: &mut usize| {
        if mismatch.is_none() {
            mismatch = first_difference(want, *got, bytes);
        }
        *got += bytes.len();
    };
    check(first, &mut got);
    let mut buf = vec![0u8; 256 * 1024];
    let result = loop {
        if len.is_some_and(|l| got >= l) {
            break Ok(got);
        }
        let room = len.map_or(buf.len(), |l| (l - got).min(buf.len()));
        match conn.read(&mut buf[..room]) {
            Ok(0) if len.is_none() => break Ok(got),
            Ok(0) => break Err(io::Error::from(ErrorKind::UnexpectedEof)),
            Ok(n) => check(&buf[..n], &mut got),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    ctx.update(cell, |r| {
        r.received += got as u64;
        r.mismatch_at = r.mismatch_at.or(mismatch.map(|m| m as u64));
    });
    if let Err(e) = &result {
        ctx.failed(cell, "read", e);
    }
    result
}

fn serve_echo(mut conn: TcpStream, peer: SocketAddr, ctx: &Ctx) {
    let Ok(cell) = read_preamble(&mut conn) else {
        return;
    };
    ctx.update(&cell, |r| r.peers.push(peer.ip()));
    let want = ctx.content.pattern(super::Scenario::Upload.size());
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let mut mismatch = None;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if mismatch.is_none() {
                    mismatch = first_difference(want, got, &buf[..n]);
                }
                got += n;
                if let Err(e) = conn.write_all(&buf[..n]) {
                    ctx.failed(&cell, "write", &e);
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                ctx.failed(&cell, "read", &e);
                break;
            }
        }
    }
    ctx.update(&cell, |r| {
        r.received += got as u64;
        r.mismatch_at = r.mismatch_at.or(mismatch.map(|m| m as u64));
    });
    let _ = conn.shutdown(Shutdown::Write);
}

fn serve_half_close(mut conn: TcpStream, peer: SocketAddr, ctx: &Ctx) {
    let Ok(cell) = read_preamble(&mut conn) else {
        return;
    };
    ctx.update(&cell, |r| r.peers.push(peer.ip()));
    let Ok(got) = receive(&mut conn, &[], None, &cell, ctx) else {
        return;
    };
    if let Err(e) = conn.write_all(answer(got, &cell, ctx).as_bytes()) {
        ctx.failed(&cell, "write", &e);
    }
}
