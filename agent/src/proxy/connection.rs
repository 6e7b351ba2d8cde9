//! One proxied connection: its original destination, the upstream connect
//! (marked, so no redirect mode captures it again; inbound from the
//! passthrough source), then the relay, counted as it goes.

use std::{io, net::SocketAddr, sync::atomic::Ordering};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use agent_common::{INBOUND_PASSTHROUGH_SRC, INBOUND_PASSTHROUGH_SRC_V6};

use super::{Direction, ProxyConfig, Stats, relay};
use crate::socket;

/// `client` was accepted from `peer`; it has `TCP_NODELAY` from its
/// listener (see `worker::register`).
pub(super) async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    direction: Direction,
    config: &ProxyConfig,
    stats: &Stats,
) {
    let dstats = stats.direction(direction);
    let dst = match socket::original_dst(&client, peer) {
        Ok(dst) => dst,
        Err(e) => {
            stats.orig_dst_missing.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "no original destination (SO_ORIGINAL_DST); resetting");
            socket::reset_on_close(&client);
            return;
        }
    };
    tracing::Span::current().record("dst", tracing::field::display(dst));
    if dst.port() == config.outbound_port || config.inbound_port == Some(dst.port()) {
        warn!("original destination is one of the proxy's own ports; resetting to avoid a loop");
        socket::reset_on_close(&client);
        return;
    }
    // Inbound, the passthrough source of the destination's family.
    let source = match (direction, dst) {
        (Direction::Outbound, _) => None,
        (Direction::Inbound, SocketAddr::V4(_)) => {
            Some(SocketAddr::new(INBOUND_PASSTHROUGH_SRC.into(), 0))
        }
        (Direction::Inbound, SocketAddr::V6(_)) => {
            Some(SocketAddr::new(INBOUND_PASSTHROUGH_SRC_V6.into(), 0))
        }
    };
    let connect = connect_marked(source, dst, config.mark);
    let mut upstream = match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if socket::is_reset(&e) {
                stats.upstream_refused.fetch_add(1, Ordering::Relaxed);
            }
            debug!(error = %e, "upstream connect failed; resetting client");
            socket::reset_on_close(&client);
            return;
        }
        Err(_) => {
            stats.upstream_timeout.fetch_add(1, Ordering::Relaxed);
            debug!(timeout = ?config.connect_timeout, "upstream connect timed out; resetting client");
            socket::reset_on_close(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    // Once both sockets exist (inbound, the app's leg is the one just
    // connected): see `ProxyConfig::splice_from_app`.
    let splice = config.splice_from_app.load(Ordering::Relaxed);
    debug!("relaying");
    let outcome = relay::relay(
        &mut client,
        &mut upstream,
        config.buffer_size,
        config.idle_timeout,
        relay::Counted {
            to_upstream: &dstats.bytes_to_upstream,
            to_client: &dstats.bytes_to_client,
            spliced: &dstats.spliced,
        },
        match direction {
            Direction::Outbound => relay::Splice {
                from_client: splice,
                from_upstream: false,
            },
            Direction::Inbound => relay::Splice {
                from_client: false,
                from_upstream: splice,
            },
        },
    )
    .await;
    match &outcome.end {
        relay::End::Closed => debug!(
            to_upstream = outcome.to_upstream,
            to_client = outcome.to_client,
            "closed"
        ),
        relay::End::Idle => {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            debug!(timeout = ?config.idle_timeout, "closed: idle");
        }
        relay::End::Failed(e) => {
            match e.side {
                relay::Side::Upstream => stats.upstream_reset.fetch_add(1, Ordering::Relaxed),
                relay::Side::Client => stats.client_reset.fetch_add(1, Ordering::Relaxed),
            };
            debug!(side = ?e.side, error = %e.source, to_upstream = outcome.to_upstream, to_client = outcome.to_client, "reset propagated");
        }
    }
}

/// Connects to `dst` (from `source`, if given) with a socket of its family
/// carrying `mark`, set before `connect()` so the connect hooks (and
/// iptables) see it.
async fn connect_marked(
    source: Option<SocketAddr>,
    dst: SocketAddr,
    mark: u32,
) -> io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if mark != 0 {
        SockRef::from(&sock).set_mark(mark)?;
    }
    if let Some(src) = source {
        sock.bind(src)?;
    }
    sock.connect(dst).await
}
