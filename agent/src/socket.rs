//! Original-destination recovery: the one function every redirect mode uses.
//!
//! In iptables mode the kernel's conntrack answers `SO_ORIGINAL_DST`; in
//! eBPF mode our `cgroup/getsockopt` program answers the same call from its
//! map, byte for byte as netfilter would. Either way the proxy (ours or an
//! unmodified third-party one) asks the same question.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    time::Duration,
};

use socket2::SockRef;

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on an accepted connection.
pub fn original_dst(stream: &impl AsFd) -> io::Result<SocketAddrV4> {
    let addr = SockRef::from(stream).original_dst_v4()?;
    match addr.as_socket() {
        Some(SocketAddr::V4(v4)) => Ok(v4),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST returned a non-IPv4 address: {other:?}"),
        )),
    }
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
