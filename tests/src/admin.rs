//! The agent's admin server, as a test reads it (inside the pod's
//! namespace, at its default address).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use crate::Topology;

/// GET `path` from the admin server inside the pod (one request, then the
/// connection closes: HTTP/1.1 keeps it open unless asked).
#[must_use]
pub fn get(topo: &Topology, path: &str) -> (u16, String) {
    let s = topo
        .pod
        .run(|| TcpStream::connect((Ipv4Addr::LOCALHOST, 15020)))
        .expect("admin listens");
    request(s, path)
}

/// [`get`] from an admin server at `addr` in the test's own namespace (a
/// node agent's).
#[must_use]
pub fn get_at(addr: SocketAddrV4, path: &str) -> (u16, String) {
    request(TcpStream::connect(addr).expect("admin listens"), path)
}

/// [`get`] from an admin server at its default address inside the
/// namespace at `netns` (a container's pod).
#[must_use]
pub fn get_in(netns: &std::path::Path, path: &str) -> (u16, String) {
    let s = agent::netns::Netns::open(netns)
        .expect("the pod's namespace")
        .run(|| TcpStream::connect((Ipv4Addr::LOCALHOST, 15020)))
        .expect("entering the pod's namespace")
        .expect("admin listens");
    request(s, path)
}

fn request(mut s: TcpStream, path: &str) -> (u16, String) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of a metric line (exact name with labels) in Prometheus text.
#[must_use]
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Proxied connections the built-in proxy accepted, by direction
/// (`outbound`/`inbound`), once the count has reached at least `at_least`
/// or 5 s passed (the admin server reads the count asynchronously).
#[must_use]
pub fn proxied(topo: &Topology, direction: &str, at_least: u64) -> u64 {
    let name = format!("mesh_redirect_proxy_connections_total{{direction=\"{direction}\"}}");
    let deadline = Instant::now() + crate::scaled(Duration::from_secs(5));
    loop {
        let (_, text) = get(topo, "/metrics");
        let n = metric(&text, &name).unwrap_or(0);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
