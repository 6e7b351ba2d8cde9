//! The outbound datapath, end to end: an app in a pod (its own network
//! namespace and cgroup) connects to a server in another namespace; the
//! agent captures the connect and its proxy forwards it.

use std::{
    fmt::Write as _,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use agent::{inspect, socket};
use agent_common::Counter;
use rstest::rstest;
use tests::{
    Agent, Placement, PollStream, RedirectMode, Topology, admin, require_root,
    servers::{Behaviour, HTTP_BODY, Server, http_get},
    topology::{POD_IP, POD_IP6, SRV_IP, lo_tx_packets},
};

fn snapshot(topo: &Topology) -> inspect::Snapshot {
    inspect::snapshot(topo.cgroup.path())
        .unwrap()
        .expect("our programs on the pod cgroup")
}

#[rstest]
fn http_and_raw_tcp_reach_the_intended_upstream(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[values(Placement::Outside, Placement::Inside)] placement: Placement,
) {
    require_root!();
    let topo = Topology::new();
    let http = Server::start(&topo.srv, SRV_IP, 8080, Behaviour::Http);
    let echo = Server::start(
        &topo.srv,
        SRV_IP,
        9000,
        Behaviour::Echo { write_size: 4096 },
    );
    let _agent = topo.run_agent(mode, placement, &[]);
    let _in_pod = topo.enter_pod_cgroup();

    let mut conn = topo.pod_connect(http.addr);
    // The app sees the server as its peer, not the proxy, as under NAT.
    assert_eq!(conn.peer_addr().unwrap(), http.addr);
    assert_eq!(http_get(&mut conn, "upstream"), HTTP_BODY);
    drop(conn);

    let mut raw = topo.pod_connect(echo.addr);
    raw.write_all(b"ping over raw tcp").unwrap();
    let mut buf = [0u8; 17];
    raw.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping over raw tcp");

    for server in [&http, &echo] {
        let peers = server.peers();
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(peers[0].ip(), POD_IP, "the upstream sees the pod's address");
    }
    // Both went through the proxy (a direct connection would pass the
    // checks above too).
    assert_eq!(admin::proxied(&topo, "outbound", 2), 2);
    if mode == RedirectMode::Ebpf {
        let s = snapshot(&topo);
        assert_eq!(s.counter(Counter::ConnectRedirected), 2);
        assert_eq!(s.counter(Counter::GetsockoptAnswered), 2);
    }
}

#[rstest]
fn bulk_64_mib_each_way_is_byte_exact(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[values(1024, 16 * 1024, 256 * 1024)] write_size: usize,
) {
    require_root!();
    let total = tests::bulk_bytes(64 << 20);
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size });
    let _agent = topo.run_agent(mode, Placement::Outside, &["--splice"]);
    let _in_pod = topo.enter_pod_cgroup();
    let mut conn = topo.pod_connect(echo.addr);
    let sent_hash = tests::transfer::echo_round_trip(&mut conn, total, write_size);
    let seen = echo.seen.lock().unwrap();
    assert_eq!(seen.received_bytes, vec![total as u64]);
    assert_eq!(
        seen.received_sha256,
        vec![sent_hash],
        "bytes at the upstream differ"
    );
    assert_eq!(admin::proxied(&topo, "outbound", 1), 1, "through the proxy");
    // With `--splice` the upload went on through splice(2) in iptables
    // mode; in eBPF mode the app's leg may be in the SOCKHASH, where splice
    // cannot read. The download (into the app's loopback socket) is copied
    // in both.
    let text = admin::get(&topo, "/metrics").1;
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_proxy_spliced_total{direction=\"outbound\"}"
        ),
        Some(u64::from(mode == RedirectMode::Iptables)),
        "{text}"
    );
}

/// Which side pushes while the other does not read.
#[derive(Debug, Clone, Copy)]
enum Pusher {
    /// The app uploads; the upstream server does not read.
    App,
    /// The upstream server sends; the app does not read.
    Server,
}

/// Writes as fast as `w` takes bytes for `secs` (non-blocking), hashing
/// them; returns how many went in and their hash.
fn push_for(w: &mut TcpStream, secs: u64) -> (u64, [u8; 32]) {
    use sha2::Digest as _;
    w.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let (mut n, mut hash) = (0u64, sha2::Sha256::new());
    let deadline = Instant::now() + tests::scaled(Duration::from_secs(secs));
    while Instant::now() < deadline {
        match w.write(&chunk) {
            Ok(k) => {
                hash.update(&chunk[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("write after {n} bytes: {e}"),
        }
    }
    w.set_nonblocking(false).unwrap();
    (n, hash.finalize().into())
}

/// Reads `r` to the end; returns how many bytes and their hash.
fn drain(r: &mut TcpStream) -> (u64, [u8; 32]) {
    use sha2::Digest as _;
    let (mut n, mut hash, mut buf) = (0u64, sha2::Sha256::new(), vec![0u8; 256 * 1024]);
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (n, hash.finalize().into()),
            Ok(k) => {
                hash.update(&buf[..k]);
                n += k as u64;
            }
            // A sockmap reader may see EAGAIN with nothing read (see the
            // README's kernel notes): retry.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => panic!("read after {n} bytes: {e}"),
        }
    }
}

/// A fast writer and a reader that does not read: the writer is held back
/// (as TCP holds it back), instead of queueing into kernel memory without
/// bound (the kernel's TCP memory for the pair under 16 MiB); once the
/// reader reads, every byte arrives in order. Under the short-circuit a
/// message goes over TCP when its reader holds too much, or at once when
/// the reader does blocking reads where those are unsafe in a sockmap.
/// With `--splice` as without (one splice as large as a whole pipe once
/// let the proxy's loopback socket grow to 23 MiB here).
#[rstest]
fn a_reader_that_does_not_read_holds_the_writer_back(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[values(Pusher::App, Pusher::Server)] pusher: Pusher,
    #[values(false, true)] splice: bool,
) {
    require_root!();
    let topo = Topology::new();
    let listener = topo
        .srv
        .run(|| TcpListener::bind((SRV_IP, 9000)))
        .expect("bind");
    let args: &[&str] = if splice { &["--splice"] } else { &[] };
    let agent = topo.run_agent(mode, Placement::Outside, args);
    let mut app = {
        let _in_pod = topo.enter_pod_cgroup();
        topo.pod_connect_blocking(SocketAddrV4::new(SRV_IP, 9000))
    };
    let (mut server, _) = listener.accept().unwrap();
    app.set_read_timeout(None).unwrap();
    let app_port = app.local_addr().unwrap().port();
    let (writer, reader) = match pusher {
        Pusher::App => (&mut app, &mut server),
        Pusher::Server => (&mut server, &mut app),
    };
    let (pushed, hash) = push_for(writer, 3);
    // The app↔proxy pair (both its sockets live in the pod): what the
    // kernel holds for it while nobody reads, queued bytes and the
    // short-circuit's ingress queue included.
    let held_kib = tests::socket_memory_kib(&topo.pod, app_port);
    eprintln!(
        "{mode:?} {pusher:?}: {} KiB went in while nobody read; the app↔proxy pair holds {held_kib} KiB",
        pushed / 1024
    );
    assert!(
        held_kib < 16 * 1024,
        "the app↔proxy pair holds {held_kib} KiB for a stalled reader"
    );
    // Bounded by socket buffers along the way (a few MiB each) and the
    // short-circuit's queue limit (4 MiB): far from what 3 s of writing
    // into an unbounded queue reaches (gigabytes).
    assert!(
        pushed < 64 << 20,
        "{pushed} bytes went in while nobody read"
    );
    writer.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(drain(reader), (pushed, hash), "what the reader got");
    if mode == RedirectMode::Ebpf {
        let s = snapshot(&topo);
        eprintln!("{:?}", s.counters);
        // The app reads with a blocking read(2): where that is unsafe in a
        // sockmap, what the proxy sends it goes over TCP from the first
        // byte; otherwise the sender switches to TCP once its reader's
        // queue is full.
        let over_tcp = match pusher {
            Pusher::Server if !agent.short_circuits_blocking() => Counter::MsgReceiverBlocking,
            _ => Counter::MsgSpilled,
        };
        assert!(
            s.counter(over_tcp) >= 1,
            "the writer's sender did not switch to TCP ({over_tcp:?}): {:?}",
            s.counters
        );
    }
}

/// Keep-alive requests after the connection is up: the short-circuit puts
/// no packets on the pod's loopback; plain loopback TCP (connect4 redirect
/// only) puts at least one per request there, which shows the measurement
/// can see them.
#[rstest]
#[case::sockmap(RedirectMode::Ebpf, &[], Placement::Outside, false)]
#[case::sockmap_agent_in_pod(RedirectMode::Ebpf, &[], Placement::Inside, false)]
#[case::connect4_only(RedirectMode::Ebpf, &["--no-sockmap"], Placement::Outside, true)]
#[case::iptables(RedirectMode::Iptables, &[], Placement::Outside, true)]
fn keep_alive_requests_and_loopback_packets(
    #[case] mode: RedirectMode,
    #[case] extra: &[&str],
    #[case] placement: Placement,
    #[case] expect_packets: bool,
) {
    const REQUESTS: u32 = 200;
    require_root!();
    let topo = Topology::new();
    let http = Server::start(&topo.srv, SRV_IP, 8080, Behaviour::Http);
    let _agent = topo.run_agent(mode, placement, extra);
    let _in_pod = topo.enter_pod_cgroup();
    let mut conn = topo.pod_connect(http.addr);
    assert_eq!(http_get(&mut conn, "warmup"), HTTP_BODY);

    let redirected_now = || match mode {
        RedirectMode::Ebpf => snapshot(&topo).counter(Counter::MsgRedirected),
        RedirectMode::Iptables => 0,
    };
    let before = topo.pod.run(lo_tx_packets);
    let redirected_before = redirected_now();
    for _ in 0..REQUESTS {
        assert_eq!(http_get(&mut conn, "upstream"), HTTP_BODY);
    }
    let packets = topo.pod.run(lo_tx_packets) - before;
    let redirected = redirected_now() - redirected_before;
    let per_request = f64::from(u32::try_from(packets).unwrap()) / f64::from(REQUESTS);
    eprintln!(
        "{packets} packets on lo for {REQUESTS} requests ({per_request:.2}/request), \
         {redirected} messages redirected"
    );
    if expect_packets {
        assert!(
            per_request >= 1.0,
            "plain TCP should show on lo: {per_request}"
        );
        assert_eq!(redirected, 0);
    } else {
        let counters = snapshot(&topo);
        eprintln!(
            "in all: {} messages passed, {} spilled",
            counters.counter(Counter::MsgPassed),
            counters.counter(Counter::MsgSpilled),
        );
        assert!(
            per_request <= 0.1,
            "{per_request} packets per request on lo"
        );
        assert!(
            redirected >= u64::from(REQUESTS),
            "only {redirected} messages redirected"
        );
        assert_eq!(
            counters.counter(Counter::MsgPassed),
            0,
            "a message fell back to TCP"
        );
    }
}

/// A run of short connections to one destination (each end sent at most
/// two messages) moves the next connections to it to plain TCP, counted,
/// byte-exact; the first long one (it is on TCP too) ends the run, and the
/// connection after it is short-circuited again.
#[rstest]
fn a_run_of_short_connections_moves_the_next_ones_to_tcp() {
    const THRESHOLD: u64 = 3;
    require_root!();
    let topo = Topology::new();
    let http = Server::start(&topo.srv, SRV_IP, 8080, Behaviour::Http);
    let _agent = topo.run_agent(
        RedirectMode::Ebpf,
        Placement::Outside,
        &["--short-conn-threshold", &THRESHOLD.to_string()],
    );
    let _in_pod = topo.enter_pod_cgroup();
    let counter = |c| snapshot(&topo).counter(c);
    let mut opened = 0;
    // `requests` on one connection, then closed; back once the proxy's end
    // closed too (it counts the connection, then drops its entry), with
    // the packets the connection put on the pod's loopback.
    let mut connection = |requests: u32| {
        let lo = topo.pod.run(lo_tx_packets);
        let mut conn = topo.pod_connect(http.addr);
        for i in 0..requests {
            assert_eq!(http_get(&mut conn, "short"), HTTP_BODY, "request {i}");
        }
        drop(conn);
        opened += 1;
        let deadline = Instant::now() + tests::scaled(Duration::from_secs(10));
        while counter(Counter::SocketsClosed) < opened {
            assert!(
                Instant::now() < deadline,
                "connection {opened} did not close"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        topo.pod.run(lo_tx_packets) - lo
    };
    let mut short_circuited = 0;
    for _ in 0..THRESHOLD {
        short_circuited = connection(1);
    }
    assert_eq!(counter(Counter::SockhashInserted), 2 * THRESHOLD);
    assert_eq!(counter(Counter::SockhashSkippedShort), 0);

    // The run is long enough: both ends of the next one stay out.
    let redirected = counter(Counter::MsgRedirected);
    let plain = connection(1);
    assert_eq!(counter(Counter::SockhashSkippedShort), 2);
    assert_eq!(counter(Counter::SockhashInserted), 2 * THRESHOLD);
    assert_eq!(
        counter(Counter::MsgRedirected),
        redirected,
        "nothing redirected"
    );
    eprintln!("loopback packets: {short_circuited} short-circuited, {plain} on TCP");
    assert!(
        plain >= short_circuited + 2,
        "the request and response went over loopback TCP"
    );

    // A long one, on TCP as well, ends the run.
    connection(10);
    assert_eq!(counter(Counter::SockhashSkippedShort), 4);
    let redirected = counter(Counter::MsgRedirected);
    connection(5);
    assert_eq!(
        counter(Counter::SockhashInserted),
        2 * THRESHOLD + 2,
        "short-circuited again after a long connection"
    );
    assert!(counter(Counter::MsgRedirected) >= redirected + 10);
    assert_eq!(
        counter(Counter::MsgPassed),
        0,
        "{:?}",
        snapshot(&topo).counters
    );
}

#[rstest]
fn an_unmodified_listener_gets_the_original_destination(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let _agent = topo.run_agent(mode, Placement::Outside, &["--proxy", "external"]);
    let _in_pod = topo.enter_pod_cgroup();
    // "Some other proxy" on the outbound port, in the pod, using plain
    // getsockopt(SOL_IP, SO_ORIGINAL_DST) as it would under iptables.
    let listener = topo
        .pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 15001)).unwrap());
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 4242);
    let app = std::thread::spawn({
        let pod = topo.pod.open();
        move || {
            pod.run(|| TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5)))
                .unwrap()
        }
    });
    let _app = app.join().unwrap().expect("app connect");
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (accepted, peer) = loop {
        match listener.accept() {
            Ok(a) => break a,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("the redirected connection never arrived: {e}"),
        }
    };
    assert_eq!(socket::original_dst(&accepted, peer).unwrap(), dst.into());
    // Raw bytes, as netfilter's getorigdst() writes them.
    let raw = raw_original_dst(&accepted).expect("raw SO_ORIGINAL_DST");
    assert_eq!(
        raw,
        [2, 0, 0x10, 0x92, 198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` into a 16-byte buffer.
fn raw_original_dst(s: &TcpStream) -> Result<[u8; 16], std::io::Error> {
    use std::os::fd::AsRawFd as _;
    let mut buf = [0xAAu8; 16];
    let mut len: libc::socklen_t = 16;
    // SAFETY: valid fd, 16-byte buffer and its length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            80,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    assert_eq!(len, 16);
    Ok(buf)
}

/// `SO_ORIGINAL_DST` on a socket nobody redirected fails with ENOENT, as
/// under iptables (no conntrack entry), even where no conntrack module is
/// loaded to say so (the kernel alone would say ENOPROTOOPT there).
#[rstest]
fn getsockopt_on_a_socket_we_do_not_know_fails_as_under_iptables() {
    require_root!();
    let topo = Topology::new();
    let listener = topo
        .pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let _agent = topo.run_agent(RedirectMode::Ebpf, Placement::Outside, &[]);
    let _in_pod = topo.enter_pod_cgroup();
    let _c = topo.pod.run(|| TcpStream::connect(addr).unwrap());
    let (s, _) = listener.accept().unwrap();
    assert_eq!(
        raw_original_dst(&s).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert!(snapshot(&topo).counter(Counter::GetsockoptMissed) >= 1);
}

#[rstest]
fn upstream_refusal_resets_the_client_within_a_second(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let _agent = topo.run_agent(mode, Placement::Outside, &[]);
    let _in_pod = topo.enter_pod_cgroup();
    let start = Instant::now();
    let dst = SocketAddrV4::new(SRV_IP, 1);
    // The reset may already be there when connect(2) completes (the proxy
    // accepts, is refused upstream and resets before the app looks).
    let r = topo
        .pod
        .run(|| TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5)))
        .and_then(|s| {
            let mut conn = PollStream::new(s, Duration::from_secs(30))?;
            let mut buf = [0u8; 16];
            conn.read(&mut buf)
        });
    let elapsed = start.elapsed();
    match r {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
            ) => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    // The proxy was refused upstream and reset the app (not a direct
    // connection refused by the server's kernel).
    assert_eq!(admin::proxied(&topo, "outbound", 1), 1);
    let (_, text) = admin::get(&topo, "/metrics");
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_proxy_errors_total{kind=\"upstream_refused\"}"
        ),
        Some(1),
        "{text}"
    );
}

#[rstest]
fn upstream_reset_midstream_reaches_the_client_as_a_reset(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let server = Server::start(
        &topo.srv,
        SRV_IP,
        9100,
        Behaviour::ResetAfter { bytes: 1000 },
    );
    let _agent = topo.run_agent(mode, Placement::Outside, &[]);
    let _in_pod = topo.enter_pod_cgroup();
    let mut conn = topo.pod_connect(server.addr);
    let mut buf = [0u8; 4096];
    let mut got = 0;
    let end = loop {
        match conn.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got += n,
            Err(e) => break Err(e),
        }
    };
    match end {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "expected a reset after {got} bytes, got {other:?} (a clean EOF hides the upstream's failure)"
        ),
    }
    // The proxy passed the upstream's reset on (not a direct connection).
    assert_eq!(admin::proxied(&topo, "outbound", 1), 1);
    let (_, text) = admin::get(&topo, "/metrics");
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_proxy_errors_total{kind=\"upstream_reset\"}"
        ),
        Some(1),
        "{text}"
    );
}

/// A *blocking* reader (a blocking socket from `connect(2)` on, as Python's
/// `create_connection`, Java's `Socket` and C programs make them) asleep in
/// read(2) when the upstream resets gets `ECONNRESET`, as over plain TCP:
/// never `EAGAIN` (which blocking code treats as fatal), never a clean end
/// of stream.
#[rstest]
fn a_blocking_reader_never_sees_a_reset_as_a_clean_end() {
    require_root!();
    let topo = Topology::new();
    let server = Server::start(&topo.srv, SRV_IP, 9100, Behaviour::ResetAfter { bytes: 0 });
    let _agent = topo.run_agent(RedirectMode::Ebpf, Placement::Outside, &[]);
    let _in_pod = topo.enter_pod_cgroup();
    let mut conn = topo
        .pod
        .run(|| TcpStream::connect(server.addr))
        .expect("blocking connect");
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the reset (ECONNRESET) on the first read, got {other:?}"),
    }
}

/// 10 bytes there and back on `c`.
fn round_trip(mut c: impl std::io::Read + std::io::Write, what: &str) {
    c.write_all(b"0123456789").unwrap();
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// 1000 outbound and 500 inbound connections, each short-circuited (and
/// the inbound ones steered by `sk_lookup`): every map, `INBOUND_STEERED`
/// included, is back to where it started once they are closed.
#[rstest]
fn maps_return_to_baseline_after_1000_short_connections() {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    // Every one short-circuited, however short (by default a run of short
    // connections to one destination moves the next ones to plain TCP).
    let agent = topo.run_agent(
        RedirectMode::Ebpf,
        Placement::Outside,
        &["--short-conn-threshold", "0"],
    );
    let _in_pod = topo.enter_pod_cgroup();
    let app = Server::start(
        &topo.pod,
        Ipv4Addr::UNSPECIFIED,
        8080,
        Behaviour::Echo { write_size: 64 },
    );
    let baseline = snapshot(&topo).maps;
    for i in 0..1000 {
        round_trip(topo.pod_connect(echo.addr), &format!("outbound {i}"));
    }
    let inbound_to = SocketAddrV4::new(POD_IP, app.addr.port());
    for i in 0..500 {
        let c = topo
            .srv
            .run(|| TcpStream::connect_timeout(&inbound_to.into(), Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("inbound connect {i}: {e}"));
        round_trip(c, &format!("inbound {i}"));
    }
    assert!(
        snapshot(&topo).counter(Counter::InboundSteered) >= 500,
        "inbound connections were not steered"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = snapshot(&topo);
        if now.maps == baseline {
            // The app's accepted sockets come from a blocking listener:
            // short-circuited only where blocking reads are safe there.
            let carried = now.counter(Counter::SockhashInserted)
                + now.counter(Counter::SockhashRefusedBlocking);
            assert!(carried >= 3000, "{:?}", now.counters);
            if agent.short_circuits_blocking() {
                assert!(now.counter(Counter::SockhashInserted) >= 3000);
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "maps did not return to baseline: {:?} vs {baseline:?}",
            now.maps
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[rstest]
fn a_signal_detaches_everything(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[values(libc::SIGTERM, libc::SIGINT)] signal: i32,
) {
    require_root!();
    let topo = Topology::dual_stack();
    // The agent (outside the pod) attaches sockops/getsockopt to its own
    // cgroup too, which may hold other agents' programs: compare ids.
    let own = agent::cgroup::own().unwrap();
    let ids = |cg: &std::path::Path| -> Vec<u32> {
        inspect::attached(cg)
            .unwrap()
            .into_iter()
            .filter(|p| p.ours)
            .map(|p| p.id)
            .collect()
    };
    let before = ids(&own);
    let agent = topo.run_agent(mode, Placement::Outside, &[]);
    let iptables_save = || {
        topo.pod.sh(
            "iptables-legacy-save; iptables-nft-save; ip6tables-legacy-save; ip6tables-nft-save",
        )
    };
    let passthrough6 = || {
        topo.pod
            .sh("ip -6 -o addr show dev lo")
            .contains(" ::6/128 ")
    };
    let sk_lookup = || {
        let ns = std::fs::File::open(topo.pod.path()).unwrap();
        agent::ebpf::attach::attached(&ns, [agent::ebpf::Hook::SkLookup])
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
    };
    match mode {
        RedirectMode::Ebpf => {
            assert!(!ids(topo.cgroup.path()).is_empty());
            assert!(ids(&own).len() > before.len(), "on the agent's cgroup");
            assert_eq!(sk_lookup(), vec!["mesh_sk_lookup".to_owned()]);
        }
        RedirectMode::Iptables => {
            let saved = iptables_save();
            assert!(saved.contains("ISTIO_OUTPUT"), "{saved}");
            assert!(
                topo.pod
                    .sh("ip6tables-legacy-save; ip6tables-nft-save")
                    .contains("ISTIO_OUTPUT"),
                "the pod has IPv6: ip6tables rules too"
            );
        }
    }
    assert!(passthrough6(), "the IPv6 passthrough source is on lo");
    let status = agent.stop_with(signal);
    assert!(status.success(), "agent exit: {status}");
    assert!(
        ids(topo.cgroup.path()).is_empty(),
        "left on the pod's cgroup"
    );
    assert_eq!(ids(&own), before, "left on the agent's cgroup");
    assert!(sk_lookup().is_empty(), "sk_lookup left on the netns");
    assert!(!passthrough6(), "::6 left on lo");
    for addr in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, 15001)),
        SocketAddr::from((POD_IP, 15006)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 15020)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, 15001)),
        SocketAddr::from((POD_IP6, 15006)),
    ] {
        let refused = topo.pod.run(|| TcpStream::connect(addr));
        assert_eq!(
            refused.unwrap_err().kind(),
            ErrorKind::ConnectionRefused,
            "listener {addr} left open"
        );
    }
    let cookie = topo.pod.open().cookie().unwrap();
    let pins: Vec<_> = agent::pins::all_instances(std::path::Path::new("/sys/fs/bpf"))
        .into_iter()
        .filter(|d| agent::pins::instance_cookie(d) == Some(cookie))
        .collect();
    assert!(pins.is_empty(), "pins left behind: {pins:?}");
    let left = iptables_save();
    assert!(
        !left.contains("ISTIO"),
        "chains of ours left behind:\n{left}"
    );
}

#[rstest]
fn large_getsockopt_replies_pass_through_untouched() {
    require_root!();
    let topo = Topology::new();
    // Enough legacy nat rules that IPT_SO_GET_ENTRIES needs more than a page.
    let rules = (0..80).fold(String::new(), |mut acc, i| {
        let _ = writeln!(
            acc,
            "-A OUTPUT -d 192.0.2.{i}/32 -p tcp --dport {} -j RETURN",
            1000 + i
        );
        acc
    });
    topo.pod.sh(&format!(
        "printf '*nat\\n{}COMMIT\\n' | iptables-legacy-restore",
        rules.replace('\n', "\\n")
    ));
    let _agent = topo.run_agent(RedirectMode::Ebpf, Placement::Outside, &[]);
    let mut cmd = std::process::Command::new("iptables-legacy");
    cmd.args(["-w", "-t", "nat", "-S"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tests::spawn_in(&mut cmd, Some(&topo.pod), Some(&topo.cgroup))
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "iptables -S in the served cgroup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("-A OUTPUT")).count(),
        80,
        "{text}"
    );
}

#[rstest]
fn ebpf_log_lines_reach_the_agents_tracing_output() {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let netns = topo.pod.path();
    let agent = Agent::start(
        &[
            "run",
            "--netns",
            netns.to_str().unwrap(),
            "--cgroup",
            topo.cgroup.path().to_str().unwrap(),
        ],
        None,
        "info,agent_ebpf=debug",
    );
    {
        let _in_pod = topo.enter_pod_cgroup();
        let mut c = topo.pod_connect(echo.addr);
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = format!("connect4: {SRV_IP}:9000 redirected to 127.0.0.1:15001");
    while !agent.log_text().contains(&want) {
        assert!(
            Instant::now() < deadline,
            "no eBPF log line `{want}` in:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.log_text().contains("DEBUG"), "logged at debug level");
}

#[rstest]
#[case::cgroup_not_cgroup2(&["--cgroup", "/proc"], "/proc")]
#[case::netns_missing(&["--netns", "/nonexistent/netns"], "/nonexistent/netns")]
#[case::netns_not_a_netns(&["--netns", "/etc/hostname"], "/etc/hostname")]
#[case::same_ports(&["--outbound-port", "15006"], "--outbound-port")]
#[case::port_zero(&["--outbound-port", "0"], "--outbound-port")]
#[case::port_too_big(&["--inbound-port", "70000"], "--inbound-port")]
fn bad_input_is_named_and_nothing_is_attached(#[case] args: &[&str], #[case] named: &str) {
    require_root!();
    let topo = Topology::new();
    let root = agent::cgroup::cgroup2_root().unwrap();
    // Everything else points at throwaway resources, should validation fail
    // to stop the agent.
    let netns = topo.pod.path();
    let mut full = vec!["run"];
    if !args.contains(&"--netns") {
        full.extend(["--netns", netns.to_str().unwrap()]);
    }
    if !args.contains(&"--cgroup") {
        full.extend(["--cgroup", topo.cgroup.path().to_str().unwrap()]);
    }
    full.extend(args);
    let out = tests::agent_proc::run_to_end(&full);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(named), "error does not name {named}: {err}");
    assert!(
        !inspect::attached(&root).unwrap().iter().any(|p| p.ours),
        "something got attached"
    );
}

#[rstest]
fn a_port_in_use_fails_before_anything_is_attached() {
    require_root!();
    let topo = Topology::new();
    let _taken = topo
        .pod
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 15001)).unwrap());
    let netns = topo.pod.path();
    let out = tests::agent_proc::run_to_end(&[
        "run",
        "--netns",
        netns.to_str().unwrap(),
        "--cgroup",
        topo.cgroup.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:15001"), "{err}");
    assert!(inspect::attached(topo.cgroup.path()).unwrap().is_empty());
}
