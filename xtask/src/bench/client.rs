//! The load client (`xtask bench worker`, client job): one cell of the
//! benchmark, run by a process that was started inside the pod's network
//! namespace and cgroup, so the pod's redirect (iptables or eBPF) captures
//! its connections as it would an app's.
//!
//! Sockets are non-blocking and driven with poll(2), the way event-driven
//! apps drive theirs: on a socket in a sockmap a *blocking* read can be
//! woken with EAGAIN and no data (README, "Kernel behaviour under the
//! short-circuit"), which poll-then-read simply absorbs.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hdrhistogram::Histogram;
use sha2::{Digest as _, Sha256};

use super::{
    proto::{
        ClientJob, ClientResult, ECHO_PORT, HTTP_PORT, Latency, SINK_PORT, SMALL_BODY_LEN, Scenario,
    },
    server::{fill, find, hex},
};

/// No single read, write or connect may take longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(job: &ClientJob) -> Result<ClientResult> {
    // Sub-millisecond timers for the open-loop schedule.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let duration = Duration::from_millis(job.duration_ms);
    let at = |port| SocketAddrV4::new(job.server, port);
    match job.scenario {
        Scenario::PingPong => ping_pong(at(ECHO_PORT), duration),
        Scenario::HttpOpenLoop { rate, conns } => {
            http_open_loop(at(HTTP_PORT), duration, rate, conns)
        }
        Scenario::ConnectPerRequest => connect_per_request(at(HTTP_PORT), duration),
        Scenario::Upload { write_size } => upload(at(SINK_PORT), duration, write_size),
        Scenario::Download { size, count } => download(at(HTTP_PORT), size, count),
    }
}

/// Counters read at the start and end of the measured window.
struct Window {
    start: Instant,
    lo_tx: u64,
    conntrack: Option<u64>,
    cpu_ns: u64,
}

impl Window {
    fn open() -> Result<Self> {
        Ok(Self {
            lo_tx: lo_tx_packets()?,
            conntrack: conntrack_count(),
            cpu_ns: own_cpu_ns(),
            start: Instant::now(),
        })
    }

    fn close(self, ops: u64, bytes: u64) -> Result<ClientResult> {
        let elapsed = self.start.elapsed();
        Ok(ClientResult {
            ops,
            bytes,
            elapsed_s: elapsed.as_secs_f64(),
            lo_tx_packets: lo_tx_packets()? - self.lo_tx,
            conntrack_before: self.conntrack,
            conntrack_after: conntrack_count(),
            cpu_ns: own_cpu_ns().saturating_sub(self.cpu_ns),
            integrity_ok: true,
            ..ClientResult::default()
        })
    }
}

/// Packets `lo` sent in this thread's network namespace.
fn lo_tx_packets() -> Result<u64> {
    let dev = fs::read_to_string("/proc/thread-self/net/dev")?;
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|rest| rest.split_whitespace().nth(9))
        .and_then(|v| v.parse().ok())
        .context("no lo line in /proc/thread-self/net/dev")
}

/// Connections tracked in this namespace (`None`: no conntrack here).
fn conntrack_count() -> Option<u64> {
    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// CPU time this (single-threaded) process spent on a CPU, in ns.
fn own_cpu_ns() -> u64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

fn summary(h: &Histogram<u64>) -> Latency {
    // Recorded in ns, reported in µs.
    #[expect(
        clippy::cast_precision_loss,
        reason = "latencies in ns are far below 2^52"
    )]
    let us = |v: u64| v as f64 / 1000.0;
    Latency {
        p50: us(h.value_at_quantile(0.50)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
        mean: h.mean() / 1000.0,
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
}

fn connect(addr: SocketAddrV4) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Waits until `s` is ready for `events` (or the deadline passes).
fn wait(s: &TcpStream, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no progress"));
        }
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis())
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&raw mut pfd, 1, ms) } {
            0 => {}
            r if r > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// One read: waits for data with poll, retries on a spurious wake-up.
fn read_some(mut s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(s, libc::POLLIN, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn write_all(mut s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !data.is_empty() {
        match s.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(s, libc::POLLOUT, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// S1.
fn ping_pong(addr: SocketAddrV4, duration: Duration) -> Result<ClientResult> {
    let s = connect(addr)?;
    let mut b = [0u8; 1];
    // Every operation is one request and one response.
    closed_loop(
        duration,
        200,
        |ops| ops,
        || {
            write_all(&s, b"x")?;
            if read_some(&s, &mut b)? != 1 {
                bail!("the echo server closed the connection");
            }
            Ok(())
        },
    )
}

/// Runs `one` back to back: `warmup` times unmeasured, then for `duration`,
/// each timed; `bytes(ops)` is the payload those operations moved.
fn closed_loop(
    duration: Duration,
    warmup: u32,
    bytes: impl FnOnce(u64) -> u64,
    mut one: impl FnMut() -> Result<()>,
) -> Result<ClientResult> {
    for _ in 0..warmup {
        one()?;
    }
    let mut h = histogram();
    let window = Window::open()?;
    let end = window.start + duration;
    let mut ops = 0u64;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        one()?;
        record(&mut h, t.elapsed());
        ops += 1;
    }
    let mut r = window.close(ops, bytes(ops))?;
    r.latency = Some(summary(&h));
    Ok(r)
}

/// The length of a complete HTTP response at the start of `buf`, if it is
/// all there, and the value of its `X-Sha256` header.
fn http_response_len(buf: &[u8]) -> Result<Option<(usize, usize, Option<String>)>> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected response: {head}");
    }
    let mut len = None;
    let mut hash = None;
    for l in head.lines() {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("x-sha256") {
                hash = Some(v.trim().to_owned());
            }
        }
    }
    let len = len.context("no Content-Length")?;
    Ok(Some((end + 4, len, hash)))
}

const GET_KEEPALIVE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// One keep-alive connection of the open-loop client.
struct OpenConn {
    s: TcpStream,
    /// Scheduled send time of the request in flight.
    in_flight: Option<Instant>,
    /// Index (in the global timetable) of this connection's next request.
    next: u64,
    buf: Vec<u8>,
}

impl OpenConn {
    /// Connects and warms the connection with one request.
    fn open(addr: SocketAddrV4, first: u64) -> Result<Self> {
        let mut c = Self {
            s: connect(addr)?,
            in_flight: None,
            next: first,
            buf: Vec::with_capacity(4096),
        };
        write_all(&c.s, GET_KEEPALIVE)?;
        c.in_flight = Some(Instant::now());
        let mut tmp = [0u8; 4096];
        while c.in_flight.is_some() {
            wait(&c.s, libc::POLLIN, Instant::now() + IO_TIMEOUT)?;
            c.on_readable(&mut tmp)?;
        }
        Ok(c)
    }

    /// Reads what arrived; when that completes the response in flight,
    /// returns the request's scheduled time.
    fn on_readable(&mut self, tmp: &mut [u8]) -> Result<Option<Instant>> {
        let Some(sched) = self.in_flight else {
            return Ok(None);
        };
        match (&self.s).read(tmp) {
            Ok(0) => bail!("the server closed a keep-alive connection"),
            Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let Some((head, len, _)) = http_response_len(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < head + len {
            return Ok(None);
        }
        if len != SMALL_BODY_LEN || self.buf.len() != head + len {
            bail!("unexpected response framing");
        }
        self.buf.clear();
        self.in_flight = None;
        Ok(Some(sched))
    }
}

/// S2: requests on a fixed timetable (request k at `start + k / rate`, on
/// connection `k % conns`); latency runs from the scheduled time, so a
/// late response delays the next request and is charged for it.
#[expect(
    clippy::cast_precision_loss,
    reason = "request counts and rates are far below 2^52"
)]
fn http_open_loop(
    addr: SocketAddrV4,
    duration: Duration,
    rate: u32,
    conns: u32,
) -> Result<ClientResult> {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let total = (u64::from(rate).saturating_mul(millis) / 1000).max(1);
    let mut cs = (0..conns)
        .map(|i| OpenConn::open(addr, u64::from(i)))
        .collect::<Result<Vec<_>>>()?;
    let step = 1.0 / f64::from(rate);
    let mut h = histogram();
    let mut late = 0u64;
    let mut done = 0u64;
    let mut tmp = vec![0u8; 16 * 1024];
    let window = Window::open()?;
    let start = window.start;
    let due = |k: u64| start + Duration::from_secs_f64(k as f64 * step);
    let hard_end = start + duration + IO_TIMEOUT;
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(cs.len());
    while done < total {
        let now = Instant::now();
        if now > hard_end {
            bail!("S2 did not finish: {done} of {total} responses after the deadline");
        }
        // Send what is due on idle connections.
        let mut next_due: Option<Instant> = None;
        for c in &mut cs {
            if c.in_flight.is_some() || c.next >= total {
                continue;
            }
            let at = due(c.next);
            if at <= now {
                write_all(&c.s, GET_KEEPALIVE)?;
                if now - at > Duration::from_millis(1) {
                    late += 1;
                }
                c.in_flight = Some(at);
            } else {
                next_due = Some(next_due.map_or(at, |d: Instant| d.min(at)));
            }
        }
        // Wait for responses, or until the next request is due.
        pfds.clear();
        pfds.extend(cs.iter().map(|c| libc::pollfd {
            fd: c.s.as_raw_fd(),
            events: if c.in_flight.is_some() {
                libc::POLLIN
            } else {
                0
            },
            revents: 0,
        }));
        let wait_for = next_due.map_or(Duration::from_millis(10), |d| {
            d.saturating_duration_since(Instant::now())
        });
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(wait_for.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(wait_for.subsec_nanos().cast_signed()),
        };
        let nfds = libc::nfds_t::try_from(pfds.len()).expect("few fds");
        // SAFETY: `pfds` is a valid array of `nfds` pollfds; no signal mask.
        let r = unsafe { libc::ppoll(pfds.as_mut_ptr(), nfds, &raw const ts, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
            continue;
        }
        for (c, p) in cs.iter_mut().zip(&pfds) {
            if p.revents == 0 {
                continue;
            }
            if let Some(sched) = c.on_readable(&mut tmp)? {
                record(&mut h, sched.elapsed());
                c.next += u64::from(conns);
                done += 1;
            }
        }
    }
    let mut r = window.close(done, 0)?;
    r.latency = Some(summary(&h));
    r.late_sends = late;
    Ok(r)
}

/// Reads one complete HTTP response, then EOF. Returns the body's length,
/// and checks its hash when the server sent one. `on_read` sees the time
/// of every read (for stall tracking).
fn read_response_to_eof(s: &TcpStream, buf: &mut [u8], mut on_read: impl FnMut()) -> Result<bool> {
    let mut head = Vec::new();
    let (body_start, len, hash) = loop {
        let n = read_some(s, buf)?;
        on_read();
        if n == 0 {
            bail!("connection closed before the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(parsed) = http_response_len(&head)? {
            break parsed;
        }
    };
    let mut hasher = Sha256::new();
    let first = &head[body_start..];
    hasher.update(first);
    let mut got = first.len();
    while got < len {
        let n = read_some(s, buf)?;
        on_read();
        if n == 0 {
            bail!("connection closed after {got} of {len} body bytes");
        }
        hasher.update(&buf[..n]);
        got += n;
    }
    if got != len || read_some(s, buf)? != 0 {
        bail!("more bytes than Content-Length, or no EOF after the response");
    }
    Ok(match hash {
        Some(h) if !h.is_empty() => hex(&hasher.finalize()) == h,
        _ => true,
    })
}

/// S4: connect, one request with `Connection: close`, read the response
/// and EOF, close; one connection at a time.
fn connect_per_request(addr: SocketAddrV4, duration: Duration) -> Result<ClientResult> {
    let mut buf = vec![0u8; 16 * 1024];
    // Connections, not keep-alive requests: no per-request count.
    closed_loop(
        duration,
        20,
        |_| 0,
        || {
            let s = connect(addr)?;
            write_all(&s, GET_CLOSE)?;
            if !read_response_to_eof(&s, &mut buf, || {})? {
                bail!("the response body does not match its X-Sha256");
            }
            Ok(())
        },
    )
}

/// S5: writes of `write_size` for `duration`, then half-close; the sink
/// answers how many bytes it got. Throughput runs to that answer.
fn upload(addr: SocketAddrV4, duration: Duration, write_size: usize) -> Result<ClientResult> {
    let s = connect(addr)?;
    let mut chunk = vec![0u8; write_size];
    fill(&mut 0x2545_f491_4f6c_dd1d, &mut chunk);
    let window = Window::open()?;
    let end = window.start + duration;
    let mut sent = 0u64;
    let mut writes = 0u64;
    loop {
        write_all(&s, &chunk).with_context(|| {
            format!(
                "upload: writing {write_size} bytes after {sent} bytes in {:?}",
                window.start.elapsed()
            )
        })?;
        sent += write_size as u64;
        writes += 1;
        if writes.is_multiple_of(16) && Instant::now() >= end {
            break;
        }
    }
    s.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        let n = read_some(&s, &mut count[got..]).with_context(|| {
            format!(
                "upload: waiting for the sink's count after sending {sent} bytes and half-closing"
            )
        })?;
        if n == 0 {
            bail!("the sink closed before answering");
        }
        got += n;
    }
    let mut r = window.close(writes, sent)?;
    r.integrity_ok = u64::from_le_bytes(count) == sent;
    Ok(r)
}

/// S6: `count` bodies of `size` bytes, one connection each.
fn download(addr: SocketAddrV4, size: usize, count: u32) -> Result<ClientResult> {
    let mut buf = vec![0u8; 256 * 1024];
    let request = format!("GET /bytes/{size} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    let mut h = histogram();
    let mut ok = true;
    let mut stall = Duration::ZERO;
    let window = Window::open()?;
    for _ in 0..count {
        let t = Instant::now();
        let s = connect(addr)?;
        write_all(&s, request.as_bytes())?;
        let mut last = Instant::now();
        ok &= read_response_to_eof(&s, &mut buf, || {
            let now = Instant::now();
            stall = stall.max(now - last);
            last = now;
        })?;
        record(&mut h, t.elapsed());
    }
    let mut r = window.close(u64::from(count), size as u64 * u64::from(count))?;
    r.latency = Some(summary(&h));
    r.integrity_ok = ok;
    r.longest_stall_us = stall.as_secs_f64() * 1e6;
    Ok(r)
}
