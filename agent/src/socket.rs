//! Original-destination recovery: the one function every redirect mode uses.
//!
//! In iptables mode the kernel's conntrack answers `SO_ORIGINAL_DST`; in
//! eBPF mode our `cgroup/getsockopt` program answers the same call from its
//! map, byte for byte as netfilter would. Either way the proxy (ours or an
//! unmodified third-party one) asks the same question.

use std::{io, net::SocketAddr, os::fd::AsFd, time::Duration};

use socket2::SockRef;

/// The original destination of a connection accepted from `peer` (as
/// `accept` returned it: no `getpeername` per connection): for an IPv4
/// connection (an `AF_INET` socket, or a dual-stack one with a v4-mapped
/// peer) `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, for an IPv6 one
/// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`, as Envoy asks.
pub fn original_dst(stream: &impl AsFd, peer: SocketAddr) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let v4 = match peer {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(p) => p.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if v4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the original destination is not an IP address: {addr:?}"),
        )
    })
}

/// Makes the next close of `stream` send a RST instead of a FIN.
pub fn reset_on_close(stream: &impl AsFd) {
    // Best effort: a socket that is already dead needs no reset.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Whether an I/O error means the peer reset (or refused) the connection.
#[must_use]
pub fn is_reset(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
