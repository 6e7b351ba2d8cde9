//! The upstream servers (`xtask bench worker`, server job): echo, HTTP and
//! sink, on one current-thread tokio runtime in the server namespace. They
//! live outside the pods' cgroups, so no eBPF program sees their sockets.

use std::{collections::HashMap, fmt::Write as _, net::Ipv4Addr, sync::Arc};

use anyhow::{Context as _, Result};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::proto::{ECHO_PORT, HTTP_PORT, SERVER_READY, SINK_PORT, SMALL_BODY_LEN};

/// Deterministic pseudo-random bytes (xorshift): not compressible, not a
/// repeating pattern, the same on every run.
pub fn fill(rng: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let bytes = rng.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

struct Bodies {
    data: Vec<u8>,
    /// Hex SHA-256 of `data[..size]`, per prepared size.
    hashes: HashMap<usize, String>,
    /// The whole answer to `GET /`.
    small: Vec<u8>,
}

pub fn run(body_sizes: &[usize]) -> Result<()> {
    let max = body_sizes.iter().copied().max().unwrap_or(0);
    let mut data = vec![0u8; max];
    fill(&mut 0x9e37_79b9_7f4a_7c15, &mut data);
    let hashes = body_sizes
        .iter()
        .map(|&n| (n, hex(&Sha256::digest(&data[..n]))))
        .collect();
    let mut small = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {SMALL_BODY_LEN}\r\nContent-Type: text/plain\r\n\r\n"
    )
    .into_bytes();
    small.resize(small.len() + SMALL_BODY_LEN, b'a');
    let bodies = Arc::new(Bodies {
        data,
        hashes,
        small,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let bind = |port| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port));
        let echo = bind(ECHO_PORT).await.context("bind echo")?;
        let http = bind(HTTP_PORT).await.context("bind http")?;
        let sink = bind(SINK_PORT).await.context("bind sink")?;
        println!("{SERVER_READY}");
        loop {
            tokio::select! {
                Ok((s, _)) = echo.accept() => { tokio::spawn(serve_echo(s)); }
                Ok((s, _)) = http.accept() => { tokio::spawn(serve_http(s, Arc::clone(&bodies))); }
                Ok((s, _)) = sink.accept() => { tokio::spawn(serve_sink(s)); }
            }
        }
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

async fn serve_echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve_sink(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&total.to_le_bytes()).await;
    let _ = s.shutdown().await;
}

async fn serve_http(mut s: TcpStream, bodies: Arc<Bodies>) {
    let _ = s.set_nodelay(true);
    let mut pending = Vec::with_capacity(4096);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some(end) = find(&pending, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            let close = head
                .lines()
                .any(|l| l.eq_ignore_ascii_case("connection: close"));
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let ok = match path
                .strip_prefix("/bytes/")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) if n <= bodies.data.len() => {
                    let hash = bodies.hashes.get(&n).map_or("", String::as_str);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nX-Sha256: {hash}\r\n\r\n"
                    );
                    s.write_all(head.as_bytes()).await.is_ok()
                        && s.write_all(&bodies.data[..n]).await.is_ok()
                }
                Some(_) => s
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .is_ok(),
                None => s.write_all(&bodies.small).await.is_ok(),
            };
            if !ok {
                return;
            }
            if close {
                let _ = s.shutdown().await;
                return;
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
