//! Upstream servers for the tests, on threads inside a namespace. Each
//! records the peers it saw and a hash of what it received.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use sha2::{Digest as _, Sha256};

use crate::TestNetns;

/// What a server saw, per connection.
#[derive(Debug, Default)]
pub struct Seen {
    pub peers: Vec<SocketAddr>,
    pub received_sha256: Vec<[u8; 32]>,
    pub received_bytes: Vec<u64>,
}

pub struct Server {
    /// Where it listens (for `[::]`, both families: connect to either).
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How a server treats each connection.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Echo everything back in writes of at most this many bytes; on EOF, half-close.
    Echo { write_size: usize },
    /// HTTP/1.1 keep-alive: answer every request with [`HTTP_BODY`].
    Http,
    /// HTTP/1.1 keep-alive: answer every request with [`pattern`]`(bytes)`.
    HttpBody { bytes: usize },
    /// Send this many bytes, then reset the connection.
    ResetAfter { bytes: usize },
}

pub const HTTP_BODY: &[u8] = b"hello from upstream\n";

impl Server {
    /// Listens on `ip:port` inside `netns` (port 0: any; `[::]`: both
    /// families).
    #[must_use]
    pub fn start(
        netns: &TestNetns,
        ip: impl Into<IpAddr>,
        port: u16,
        behaviour: Behaviour,
    ) -> Self {
        let ip = ip.into();
        let listener = netns.run(|| TcpListener::bind((ip, port)).expect("bind test server"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_seen, thread_stop) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        conn.set_nonblocking(false).unwrap();
                        thread_seen.lock().unwrap().peers.push(peer);
                        let seen = Arc::clone(&thread_seen);
                        std::thread::spawn(move || serve(conn, behaviour, &seen));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("test server accept: {e}"),
                }
            }
        });
        Self {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Peers seen so far.
    #[must_use]
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.seen.lock().unwrap().peers.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, behaviour: Behaviour, seen: &Mutex<Seen>) {
    conn.set_read_timeout(Some(Duration::from_mins(1))).unwrap();
    match behaviour {
        Behaviour::Echo { write_size } => {
            let mut buf = vec![0u8; write_size];
            let mut hash = Sha256::new();
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        total += n as u64;
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            // Record before half-closing: the client checks once it sees EOF.
            {
                let mut s = seen.lock().unwrap();
                s.received_sha256.push(hash.finalize().into());
                s.received_bytes.push(total);
            }
            let _ = conn.shutdown(Shutdown::Write);
        }
        Behaviour::Http => serve_http(&mut conn, HTTP_BODY),
        Behaviour::HttpBody { bytes } => serve_http(&mut conn, &pattern(bytes)),
        Behaviour::ResetAfter { bytes } => {
            let _ = conn.write_all(&vec![b'x'; bytes]);
            std::thread::sleep(Duration::from_millis(50));
            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
        }
    }
}

/// `len` bytes of every value, in an order that no shift or repeat of a
/// block matches: a body whose corruption shows.
#[must_use]
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let [.., a, _] = (i.wrapping_mul(2_654_435_761) >> 5).to_be_bytes();
            let [.., b, _] = i.to_be_bytes();
            a ^ b
        })
        .collect()
}

/// HTTP/1.1 keep-alive: every request is answered with `body`.
fn serve_http(conn: &mut TcpStream, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        body.len()
    );
    let response = [head.as_bytes(), body].concat();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
        while let Some(end) = find(&pending, b"\r\n\r\n") {
            pending.drain(..end + 4);
            if conn.write_all(&response).is_err() {
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 request on a keep-alive connection; returns the body.
pub fn http_get(conn: &mut (impl Read + Write), host: &str) -> Vec<u8> {
    conn.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).expect("read HTTP response");
        assert!(n > 0, "connection closed mid-response");
        resp.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&resp, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&resp[..end]).to_string();
            assert!(head.starts_with("HTTP/1.1 200"), "bad status: {head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if resp.len() >= end + 4 + len {
                return resp[end + 4..end + 4 + len].to_vec();
            }
        }
    }
}
