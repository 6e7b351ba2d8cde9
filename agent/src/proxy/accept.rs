//! A worker's accept loop: room first (its own descriptor table, then the
//! proxy's `--max-connections`), then accept; a connection beyond either is
//! reset at once, never left hanging. Each connection gets its own task and
//! tracing span, and is counted open from its accept until it ends.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tracing::{Instrument as _, debug, info_span, warn};

use super::{Direction, ProxyConfig, Stats, connection};
use crate::socket;

/// What a worker's accept loops share.
pub(super) struct Shared {
    pub config: Arc<ProxyConfig>,
    pub stats: Arc<Stats>,
    /// `--max-connections`, across workers.
    pub limit: Arc<Semaphore>,
    /// What this worker's descriptor table holds.
    pub local: Arc<Semaphore>,
}

pub(super) async fn serve(
    listener: TcpListener,
    direction: Direction,
    shared: Shared,
    mut stop_accepting: watch::Receiver<bool>,
    close_all: watch::Receiver<bool>,
) {
    let Shared {
        config,
        stats,
        limit,
        local,
    } = shared;
    let mut next_id: u64 = 0;
    loop {
        // Room in this worker's table first. When it is full the other
        // workers take new connections, unless the proxy as a whole is
        // full: then accept, to reset at once.
        let room = match Arc::clone(&local).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if limit.available_permits() == 0 => None,
            Err(_) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(5)) => continue,
                    _ = stop_accepting.wait_for(|s| *s) => break,
                }
            }
        };
        let (client, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, direction = direction.name(), "proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop_accepting.wait_for(|s| *s) => break,
        };
        let (Some(room), Ok(permit)) = (room, Arc::clone(&limit).try_acquire_owned()) else {
            // Full: refuse at once rather than leave the client hanging.
            stats
                .rejected_max_connections
                .fetch_add(1, Ordering::Relaxed);
            socket::reset_on_close(&client);
            continue;
        };
        let open = OpenGuard::new(&stats, direction);
        next_id += 1;
        let span = info_span!("conn", dir = direction.name(), id = next_id, src = %peer, dst = tracing::field::Empty);
        let (config, stats, mut close_all) =
            (Arc::clone(&config), Arc::clone(&stats), close_all.clone());
        tokio::spawn(
            async move {
                let _held = (permit, room, open);
                tokio::select! {
                    () = connection::handle(client, peer, direction, &config, &stats) => {}
                    _ = close_all.wait_for(|c| *c) => debug!("closed at shutdown"),
                }
            }
            .instrument(span),
        );
    }
    debug!(direction = direction.name(), "proxy: stopped accepting");
}

/// Counts a connection open from its accept for as long as it lives.
struct OpenGuard(Arc<Stats>, Direction);

impl OpenGuard {
    fn new(stats: &Arc<Stats>, direction: Direction) -> Self {
        let d = stats.direction(direction);
        d.connections_total.fetch_add(1, Ordering::Relaxed);
        d.connections_open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(stats), direction)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .direction(self.1)
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}
