//! Copying bytes both ways between two connected sockets, with half-close
//! propagated (EOF on one side becomes `shutdown(SHUT_WR)` on the other) and
//! a reset on one side turned into a reset on the other.

use std::{
    io,
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use socket2::SockRef;
use tokio::{
    io::AsyncReadExt as _,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::splice::{Filled, Pipe};
use crate::socket;

/// Which socket an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

#[derive(Debug)]
pub struct RelayError {
    /// The socket that failed (its peer reset, or it could not be written).
    pub side: Side,
    pub source: io::Error,
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// One side failed; the other was set to reset.
    Failed(RelayError),
}

/// What a relay moved, and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub to_upstream: u64,
    pub to_client: u64,
    pub end: End,
}

/// When either direction of a relay last moved a byte.
struct Activity {
    start: Instant,
    /// Microseconds since `start`.
    last_us: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_us: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.store(us, Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        self.start + Duration::from_micros(self.last_us.load(Ordering::Relaxed))
    }
}

/// Smallest buffer a relay direction starts with; it doubles (up to the
/// configured size) when a read fills it.
const MIN_BUFFER: usize = 16 * 1024;

/// Which of a relay's two sources `splice(2)` may read, once a direction
/// turns out to be bulk ([`SPLICE_AFTER`]). Never a socket that may be in
/// a SOCKHASH (see [`super::splice`]). Measured (`bench`, iptables mode,
/// M1S/M1): a way from the upstream into the app's loopback socket was
/// 0.81-0.89x as fast for a 100 MB body, with 1.7x the kernel TCP memory,
/// so only a way out of the app (loopback in, to the upstream) may be
/// spliced; and even that is 0.71-0.82x at 16 KiB writes and 0.96-0.99x
/// at 128 KiB on the reference host, so it is off unless `--splice`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Splice {
    pub from_client: bool,
    pub from_upstream: bool,
}

/// How many bytes one way of a connection moves before it counts as bulk
/// and goes on through `splice(2)`: a request or a small response never
/// costs a pipe.
const SPLICE_AFTER: u64 = 256 * 1024;

/// A splice pipe is sized this many times the relay buffer: the kernel
/// counts a pipe in slots of one page each, and a slot often holds one
/// segment's fragment (about 1.4 KiB) of what a socket received, so a pipe
/// of the buffer's size would move a few KiB per call.
const PIPE_SLOTS_FOR: usize = 16;

/// Where a relay counts the bytes it moves, as it moves them (so a long
/// transfer shows in the metrics while it runs).
#[derive(Clone, Copy)]
pub struct Counted<'a> {
    pub to_upstream: &'a AtomicU64,
    pub to_client: &'a AtomicU64,
    /// Ways that went on through `splice(2)`.
    pub spliced: &'a AtomicU64,
}

/// Relays until both directions reached EOF, one side failed, or nothing
/// moved for `idle`. On a failure the *other* socket is set to reset when
/// closed, so the failure reaches its peer as a reset, not as a clean end
/// of stream.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer_size: usize,
    idle: Duration,
    counted: Counted<'_>,
    splice: Splice,
) -> Outcome {
    let last = Activity::new();
    let (to_upstream, to_client, end) = {
        let (client_rx, client_tx) = client.split();
        let (upstream_rx, upstream_tx) = upstream.split();
        let up = copy(
            client_rx,
            Side::Client,
            upstream_tx,
            Side::Upstream,
            buffer_size,
            splice.from_client,
            &last,
            counted.to_upstream,
            counted.spliced,
        );
        let down = copy(
            upstream_rx,
            Side::Upstream,
            client_tx,
            Side::Client,
            buffer_size,
            splice.from_upstream,
            &last,
            counted.to_client,
            counted.spliced,
        );
        tokio::pin!(up, down);
        let (mut to_upstream, mut to_client) = (None, None);
        let mut end = None;
        while end.is_none() && (to_upstream.is_none() || to_client.is_none()) {
            let idle_at = last.get() + idle;
            tokio::select! {
                r = &mut up, if to_upstream.is_none() => match r {
                    Ok(n) => to_upstream = Some(n),
                    Err((n, e)) => { to_upstream = Some(n); end = Some(End::Failed(e)); }
                },
                r = &mut down, if to_client.is_none() => match r {
                    Ok(n) => to_client = Some(n),
                    Err((n, e)) => { to_client = Some(n); end = Some(End::Failed(e)); }
                },
                () = tokio::time::sleep_until(idle_at.into()) => {
                    if last.get() + idle <= Instant::now() {
                        end = Some(End::Idle);
                    }
                }
            }
        }
        (to_upstream, to_client, end)
    };
    if let Some(End::Failed(e)) = &end {
        match e.side {
            Side::Client => socket::reset_on_close(upstream),
            Side::Upstream => socket::reset_on_close(client),
        }
    }
    Outcome {
        to_upstream: to_upstream.unwrap_or(0),
        to_client: to_client.unwrap_or(0),
        end: end.unwrap_or(End::Closed),
    }
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write side.
/// A buffer exists only while data is there to move: it is allocated when
/// `from` becomes readable and freed before waiting again, so an idle or
/// trickling connection holds no buffer memory. Reads go through
/// `poll_read`, which takes a short read as "drained" (edge-triggered
/// epoll), so waiting again costs no extra `read` that fails with EAGAIN.
/// What is moved is counted in `moved` as it moves. With `splice`, a
/// direction that has moved [`SPLICE_AFTER`] bytes goes on through a pipe.
#[expect(
    clippy::too_many_arguments,
    reason = "one way of a relay, all its parts"
)]
async fn copy(
    mut from: ReadHalf<'_>,
    from_side: Side,
    to: WriteHalf<'_>,
    to_side: Side,
    max_buffer: usize,
    mut splice: bool,
    last: &Activity,
    moved: &AtomicU64,
    spliced_ways: &AtomicU64,
) -> Result<u64, (u64, RelayError)> {
    let mut total: u64 = 0;
    let mut size = MIN_BUFFER.min(max_buffer);
    let fail = |side, source, total| (total, RelayError { side, source });
    loop {
        if let Err(e) = from.readable().await {
            return Err(fail(from_side, e, total));
        }
        // Uninitialised capacity, read into as it is (`read_buf`): no
        // zeroing of a buffer that is filled at once.
        let mut buf = Vec::with_capacity(size);
        loop {
            buf.clear();
            let n = match from.read_buf(&mut buf).await {
                Ok(0) => return end_of_stream(&to, to_side, total),
                Ok(n) => n,
                // A sockmap reader may be woken with nothing to read.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(fail(from_side, e, total)),
            };
            last.touch();
            if let Err(e) = write_all(to.as_ref(), &buf, last).await {
                return Err(fail(to_side, e, total));
            }
            total += n as u64;
            moved.fetch_add(n as u64, Ordering::Relaxed);
            if splice && total >= SPLICE_AFTER {
                // Bulk: the rest goes through the kernel, unless there is no
                // pipe or only a small one (a uid past pipe-user-pages-soft).
                splice = false;
                match Pipe::new(PIPE_SLOTS_FOR * max_buffer) {
                    Ok(pipe) if pipe.capacity() >= max_buffer => {
                        spliced_ways.fetch_add(1, Ordering::Relaxed);
                        let ways = (&from, from_side, &to, to_side);
                        match spliced(ways, pipe, max_buffer, total, last, moved).await {
                            Spliced::Ended(r) => return r,
                            // Read on: `recv` steps over the urgent byte.
                            Spliced::Urgent(t) => {
                                total = t;
                                break;
                            }
                        }
                    }
                    Ok(pipe) => tracing::debug!(
                        capacity = pipe.capacity(),
                        "splice pipe smaller than the buffer; copying"
                    ),
                    Err(e) => tracing::debug!(error = %e, "no pipe for splice; copying"),
                }
            }
            if n < size {
                // Drained for now: free the buffer and wait.
                break;
            }
            if size < max_buffer {
                size = (size * 2).min(max_buffer);
                buf = Vec::with_capacity(size);
            }
        }
    }
}

/// How [`spliced`] ended.
enum Spliced {
    /// As [`copy`] ends.
    Ended(Result<u64, (u64, RelayError)>),
    /// At urgent data, with this many bytes moved so far (the pipe empty).
    Urgent(u64),
}

/// The rest of [`copy`] through `pipe`: what one splice takes from `from`
/// is all in `to` before the next one. One splice takes at most `chunk`
/// bytes (the relay buffer, as one read would): the kernel grows a
/// socket's receive buffer with what is read from it per round trip, and
/// a whole pipe (16 buffers) per call grew the proxy's loopback socket to
/// 18 MiB, which the app then filled once the upstream stopped reading
/// (4.8-7.8 MiB when copying; 5.6-7.7 MiB with this cap).
async fn spliced(
    (from, from_side, to, to_side): (&ReadHalf<'_>, Side, &WriteHalf<'_>, Side),
    mut pipe: Pipe,
    chunk: usize,
    mut total: u64,
    last: &Activity,
    moved: &AtomicU64,
) -> Spliced {
    let fail = |side, source, total| Spliced::Ended(Err((total, RelayError { side, source })));
    loop {
        let n = match pipe.fill(from.as_ref(), chunk).await {
            Ok(Filled::Moved(n)) => n,
            Ok(Filled::End) => return Spliced::Ended(end_of_stream(to, to_side, total)),
            Ok(Filled::Urgent) => return Spliced::Urgent(total),
            Err(e) => return fail(from_side, e, total),
        };
        last.touch();
        if let Err(e) = pipe.drain(to.as_ref(), || last.touch()).await {
            return fail(to_side, e, total);
        }
        total += n as u64;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// `from` reached EOF: half-close `to`.
fn end_of_stream(to: &WriteHalf<'_>, to_side: Side, total: u64) -> Result<u64, (u64, RelayError)> {
    match SockRef::from(to.as_ref()).shutdown(Shutdown::Write) {
        Ok(()) => Ok(total),
        // The peer is already gone: nothing to half-close.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
        Err(source) => Err((
            total,
            RelayError {
                side: to_side,
                source,
            },
        )),
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], last: &Activity) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => {
                data = &data[n..];
                last.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// Counters that live for the test (leaked: a few bytes per test).
    fn counted() -> Counted<'static> {
        Counted {
            to_upstream: Box::leak(Box::new(AtomicU64::new(0))),
            to_client: Box::leak(Box::new(AtomicU64::new(0))),
            spliced: Box::leak(Box::new(AtomicU64::new(0))),
        }
    }

    /// A connected pair: (the end we keep, the end the relay gets).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn half_close_is_propagated_both_ways() {
        let (mut app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_upstream,
                8,
                Duration::from_mins(1),
                counted(),
                Splice::default(),
            )
            .await
        });

        app.write_all(b"request bytes").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request bytes", "server sees the request, then EOF");

        // The other direction still flows after the client's half-close.
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response");

        let outcome = relay.await.unwrap();
        assert!(matches!(outcome.end, End::Closed), "{outcome:?}");
        assert_eq!((outcome.to_upstream, outcome.to_client), (13, 8));
    }

    /// The counters move as bytes do, not when the connection ends.
    #[tokio::test]
    async fn bytes_are_counted_while_the_connection_is_open() {
        let (mut app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut server) = pair().await;
        let c = counted();
        let relay = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_upstream,
                1024,
                Duration::from_mins(1),
                c,
                Splice::default(),
            )
            .await
        });
        app.write_all(&[7u8; 5000]).await.unwrap();
        let mut got = vec![0u8; 5000];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"ok").await.unwrap();
        let mut two = [0u8; 2];
        app.read_exact(&mut two).await.unwrap();
        assert_eq!(c.to_upstream.load(Ordering::Relaxed), 5000);
        assert_eq!(c.to_client.load(Ordering::Relaxed), 2);
        assert!(!relay.is_finished(), "still open");
        drop((app, server));
        relay.await.unwrap();
    }

    /// Bulk both ways at once through splice: byte-exact, each way
    /// counted as spliced, half-close still in order after the last byte.
    #[tokio::test]
    async fn bulk_goes_through_splice_byte_exact_both_ways() {
        let (mut app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut server) = pair().await;
        let c = counted();
        let all = Splice {
            from_client: true,
            from_upstream: true,
        };
        let relay = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_upstream,
                16 * 1024,
                Duration::from_mins(1),
                c,
                all,
            )
            .await
        });
        let up: Vec<u8> = (0..6_000_000u32).map(|i| (i % 253) as u8).collect();
        let down: Vec<u8> = (0..7_000_000u32).map(|i| (i % 241) as u8).collect();
        let (mut app_rx, mut app_tx) = app.split();
        let (mut server_rx, mut server_tx) = server.split();
        let (got_up, got_down, (), ()) = tokio::join!(
            async {
                let mut v = Vec::new();
                server_rx.read_to_end(&mut v).await.unwrap();
                v
            },
            async {
                let mut v = Vec::new();
                app_rx.read_to_end(&mut v).await.unwrap();
                v
            },
            async {
                app_tx.write_all(&up).await.unwrap();
                app_tx.shutdown().await.unwrap();
            },
            async {
                server_tx.write_all(&down).await.unwrap();
                server_tx.shutdown().await.unwrap();
            },
        );
        assert!(got_up == up, "upload byte-exact ({} bytes)", got_up.len());
        assert!(
            got_down == down,
            "download byte-exact ({} bytes)",
            got_down.len()
        );
        let outcome = relay.await.unwrap();
        assert!(matches!(outcome.end, End::Closed), "{outcome:?}");
        assert_eq!(
            (outcome.to_upstream, outcome.to_client),
            (up.len() as u64, down.len() as u64)
        );
        assert_eq!(c.spliced.load(Ordering::Relaxed), 2, "both ways spliced");
    }

    /// Urgent data stops a splice for good; the way goes back to `recv`,
    /// which steps over the urgent byte as the copying relay does: every
    /// other byte arrives, in order, and the end is propagated.
    #[tokio::test]
    async fn urgent_data_in_a_spliced_way_is_stepped_over_as_when_copying() {
        let (mut app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut server) = pair().await;
        let c = counted();
        let relay = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_upstream,
                16 * 1024,
                Duration::from_mins(1),
                c,
                Splice {
                    from_client: true,
                    from_upstream: false,
                },
            )
            .await
        });
        let before: Vec<u8> = (0..600_000u32).map(|i| (i % 249) as u8).collect();
        let after: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut v = Vec::new();
            server.read_to_end(&mut v).await.unwrap();
            (v, server)
        });
        app.write_all(&before).await.unwrap();
        // Let the way turn spliced before the urgent byte.
        while c.spliced.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        SockRef::from(&app).send_out_of_band(b"!").unwrap();
        app.write_all(&after).await.unwrap();
        app.shutdown().await.unwrap();
        let (got, server) = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the way must not stall at the urgent mark")
            .unwrap();
        let want = [before, after].concat();
        assert!(got == want, "{} bytes, want {}", got.len(), want.len());
        drop((app, server));
        relay.await.unwrap();
    }

    /// Without splice allowed, nothing is spliced however bulk.
    #[tokio::test]
    async fn a_way_not_allowed_to_splice_copies() {
        let (mut app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut server) = pair().await;
        let c = counted();
        let relay = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_upstream,
                16 * 1024,
                Duration::from_mins(1),
                c,
                Splice {
                    from_client: false,
                    from_upstream: true,
                },
            )
            .await
        });
        let up = vec![9u8; 2_000_000];
        let (w, r) = tokio::join!(
            async {
                app.write_all(&up).await.unwrap();
                app.shutdown().await.unwrap();
            },
            async {
                let mut v = Vec::new();
                server.read_to_end(&mut v).await.unwrap();
                v
            }
        );
        let () = w;
        assert!(r == up);
        drop(server);
        relay.await.unwrap();
        assert_eq!(c.spliced.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_upstream_reset_resets_the_client() {
        let (mut app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, server) = pair().await;
        let relay = tokio::spawn(async move {
            let outcome = relay(
                &mut proxy_client,
                &mut proxy_upstream,
                1024,
                Duration::from_mins(1),
                counted(),
                Splice::default(),
            )
            .await;
            drop(proxy_client);
            outcome
        });
        socket::reset_on_close(&server);
        drop(server);
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&outcome.end, End::Failed(e) if e.side == Side::Upstream),
            "{outcome:?}"
        );
        let mut buf = [0u8; 8];
        let err = app.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (mut app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut server) = pair().await;
        let outcome = relay(
            &mut proxy_client,
            &mut proxy_upstream,
            1024,
            Duration::from_millis(200),
            counted(),
            Splice::default(),
        )
        .await;
        assert!(matches!(outcome.end, End::Idle), "{outcome:?}");
        drop((proxy_client, proxy_upstream));
        let mut buf = [0u8; 1];
        assert_eq!(app.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_client_reset_resets_the_upstream() {
        let (app, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let outcome = relay(
                &mut proxy_client,
                &mut proxy_upstream,
                1024,
                Duration::from_mins(1),
                counted(),
                Splice::default(),
            )
            .await;
            drop(proxy_upstream);
            outcome
        });
        socket::reset_on_close(&app);
        drop(app);
        let outcome = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&outcome.end, End::Failed(e) if e.side == Side::Client),
            "{outcome:?}"
        );
        let mut buf = [0u8; 8];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
