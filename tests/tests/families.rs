//! Every address family an app may use is captured: IPv4, IPv6, and IPv4
//! reached through an `AF_INET6` socket (`::ffff:a.b.c.d`, what the JDK
//! and dual-stack apps do), by real clients, in both modes. What the proxy
//! sees of each (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`), what the app
//! sees, and that nothing stays behind.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use agent::inspect;
use agent_common::Counter;
use rstest::rstest;
use tests::{
    Placement, RedirectMode, Topology, admin,
    clients::{self, HttpClient},
    require_root,
    servers::{Behaviour, Server, http_get, pattern},
    topology::{POD_IP6, SRV_IP, SRV_IP6, lo_tx_packets},
};

const SRV_MAPPED: Ipv6Addr = SRV_IP.to_ipv6_mapped();

fn snapshot(topo: &Topology) -> inspect::Snapshot {
    inspect::snapshot(topo.cgroup.path())
        .unwrap()
        .expect("our programs on the pod cgroup")
}

/// Whether two bodies are equal, saying where they first differ if not
/// (without printing megabytes).
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes, {} expected; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// A real client in the pod makes keep-alive GETs to a dual-stack server:
/// it is captured (the built-in proxy's outbound count moves by one, the
/// server sees one connection: the proxy's), every body is byte-exact, and
/// in eBPF mode the keep-alive requests put next to nothing on the pod's
/// loopback (the short-circuit carries them; a client doing blocking reads
/// stays on TCP where those are unsafe in a sockmap), as for IPv4. The eBPF
/// counter that moves says which family's path the connect took.
#[rstest]
#[case::python_v4_mapped(HttpClient::Python, SRV_MAPPED.into(), Counter::ConnectRedirectedMapped)]
#[case::python_ipv6(HttpClient::Python, SRV_IP6.into(), Counter::ConnectRedirected6)]
#[case::java_socket(HttpClient::JavaSocket, SRV_IP.into(), Counter::ConnectRedirectedMapped)]
#[case::java_http_client(HttpClient::JavaHttpClient, SRV_IP.into(), Counter::ConnectRedirectedMapped)]
#[case::curl_ipv6(HttpClient::Curl, SRV_IP6.into(), Counter::ConnectRedirected6)]
#[case::curl_ipv4(HttpClient::Curl, SRV_IP.into(), Counter::ConnectRedirected)]
fn every_familys_client_is_captured_byte_exact_and_short_circuited(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[case] client: HttpClient,
    #[case] dst: IpAddr,
    #[case] path: Counter,
) {
    const REQUESTS: u32 = 100;
    const BODY: usize = 16 * 1024;
    require_root!();
    let topo = Topology::dual_stack();
    let server = Server::start(
        &topo.srv,
        Ipv6Addr::UNSPECIFIED,
        8080,
        Behaviour::HttpBody { bytes: BODY },
    );
    let agent = topo.run_agent(mode, Placement::Outside, &[]);
    let before = (mode == RedirectMode::Ebpf).then(|| snapshot(&topo));
    let lo_before = topo.pod.run(lo_tx_packets);
    let out = clients::run_in_pod(
        &mut client.command(dst, 8080, REQUESTS),
        &topo.pod,
        &topo.cgroup,
        Duration::from_mins(1),
    );
    let lo = topo.pod.run(lo_tx_packets) - lo_before;
    assert!(
        out.status.success(),
        "{client:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_bytes(
        &out.stdout,
        &pattern(BODY).repeat(REQUESTS as usize),
        &format!("{client:?} to {dst}"),
    );
    assert_eq!(
        admin::proxied(&topo, "outbound", 1),
        1,
        "one connection through the proxy"
    );
    assert_eq!(server.peers().len(), 1, "the server saw only the proxy's");
    let per_request = f64::from(u32::try_from(lo).unwrap()) / f64::from(REQUESTS);
    eprintln!("{mode:?} {client:?} to {dst}: {lo} packets on lo, {per_request:.2}/request");
    match before {
        Some(before) => {
            let after = snapshot(&topo);
            let moved = |c| after.counter(c) - before.counter(c);
            assert_eq!(moved(path), 1, "{path:?}: {:?}", after.counters);
            if client.blocking_reads() && !agent.short_circuits_blocking() {
                // Captured, but kept on plain TCP: this kernel's sockmap
                // readers are unsafe for blocking reads.
                assert_eq!(
                    moved(Counter::SockhashRefusedBlocking),
                    1,
                    "{:?}",
                    after.counters
                );
                assert!(per_request >= 1.0, "{per_request} packets/request on lo");
            } else {
                assert!(
                    moved(Counter::MsgRedirected) >= u64::from(REQUESTS),
                    "short-circuited: {:?}",
                    after.counters
                );
                // The handshakes and closes of the app↔proxy connection only.
                assert!(per_request < 0.25, "{per_request} packets/request on lo");
            }
        }
        None => assert!(
            per_request >= 1.0,
            "plain TCP shows on lo in iptables mode: {per_request}"
        ),
    }
}

/// A listener per family, for the proxy's end of each kind of socket.
struct Listeners {
    outbound: std::net::TcpListener,
    outbound6: std::net::TcpListener,
    /// Dual-stack `[::]:15006`: an IPv4 client lands v4-mapped.
    inbound: std::net::TcpListener,
}

/// `getsockopt(level, name)` of `fd`: the bytes, or the errno.
fn raw_getsockopt(fd: &impl std::os::fd::AsRawFd, level: i32, name: i32) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; 256];
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap();
    // SAFETY: a valid buffer of `len` bytes and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        buf.truncate(len as usize);
        Ok(buf)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// A `sockaddr_in` / `sockaddr_in6` as the kernel wrote it.
fn sockaddr(bytes: &[u8]) -> SocketAddr {
    let family = u16::from_ne_bytes([bytes[0], bytes[1]]);
    let port = u16::from_be_bytes([bytes[2], bytes[3]]);
    match i32::from(family) {
        libc::AF_INET => SocketAddr::new(
            Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[4..8]).unwrap()).into(),
            port,
        ),
        libc::AF_INET6 => SocketAddr::new(
            Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[8..24]).unwrap()).into(),
            port,
        ),
        f => panic!("family {f}"),
    }
}

const SO_ORIGINAL_DST: i32 = 80;

/// Options with fixed answers for a socket of a family, asked on the
/// proxy's end of a captured connection and on the same kind of socket
/// nobody captured: the answers must be the same.
const PASSED_OPTIONS: &[(i32, i32, &str)] = &[
    (libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE"),
    (libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN"),
    (libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL"),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
    (libc::SOL_SOCKET, libc::SO_ERROR, "SO_ERROR"),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY"),
    (libc::IPPROTO_TCP, libc::TCP_CONGESTION, "TCP_CONGESTION"),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY"),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_UNICAST_HOPS,
        "IPV6_UNICAST_HOPS",
    ),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS"),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVPKTINFO,
        "IPV6_RECVPKTINFO",
    ),
    (libc::IPPROTO_IP, libc::IP_TOS, "IP_TOS"),
    (libc::IPPROTO_IP, libc::IP_TTL, "IP_TTL"),
];

/// Every option of [`PASSED_OPTIONS`] on `s`.
fn options(s: &TcpStream) -> Vec<(&'static str, Result<Vec<u8>, i32>)> {
    PASSED_OPTIONS
        .iter()
        .map(|&(level, name, what)| (what, raw_getsockopt(s, level, name)))
        .collect()
}

/// Each kind of socket a proxy accepts a captured connection on answers
/// the original destination to the option netfilter answers for it, and
/// fails the other one as netfilter does: `SOL_IP` for an IPv4 connection
/// (on an `AF_INET` socket, or v4-mapped on a dual-stack one), `SOL_IPV6`
/// for an IPv6 one. Every other option reads as on a socket nobody
/// captured; the app's socket sees the original destination as its peer.
#[rstest]
#[case::ipv4_outbound("outbound", SRV_IP.into(), 9000, SRV_IP.into())]
#[case::v4_mapped_outbound("outbound", SRV_MAPPED.into(), 9000, SRV_IP.into())]
#[case::ipv6_outbound("outbound", SRV_IP6.into(), 9000, SRV_IP6.into())]
#[case::ipv4_inbound_on_a_dual_stack_listener("inbound", tests::topology::POD_IP.into(), 8080, tests::topology::POD_IP.into())]
#[case::ipv6_inbound("inbound", POD_IP6.into(), 8080, POD_IP6.into())]
fn the_original_destination_answers_for_each_socket_kind(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[case] direction: &str,
    #[case] dst: IpAddr,
    #[case] port: u16,
    #[case] original: IpAddr,
) {
    require_root!();
    let topo = Topology::dual_stack();
    let _agent = topo.run_agent(
        mode,
        Placement::Outside,
        &["--proxy", "external", "--proxy-uid", "1337"],
    );
    let _in_pod = topo.enter_pod_cgroup();
    let proxy = topo.pod.run(|| Listeners {
        outbound: std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 15001)).unwrap(),
        outbound6: std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 15001)).unwrap(),
        inbound: std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, 15006)).unwrap(),
    });
    let target = SocketAddr::new(dst, port);
    let (app, listener) = match direction {
        "outbound" => (
            topo.pod_connect_blocking(target),
            if original.is_ipv4() {
                &proxy.outbound
            } else {
                &proxy.outbound6
            },
        ),
        _ => (
            topo.srv
                .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
                .unwrap(),
            &proxy.inbound,
        ),
    };
    let (accepted, _) = listener.accept().unwrap();
    let want = SocketAddr::new(original, port);
    let (v4, v6) = (
        raw_getsockopt(&accepted, libc::SOL_IP, SO_ORIGINAL_DST),
        raw_getsockopt(&accepted, libc::SOL_IPV6, SO_ORIGINAL_DST),
    );
    // The other option fails as on a socket nobody captured (below): no
    // conntrack entry (ENOENT), or, on an AF_INET socket, no SOL_IPV6 at all.
    let other = if original.is_ipv4() {
        assert_eq!(v4.map(|b| sockaddr(&b)), Ok(want), "SOL_IP");
        (libc::SOL_IPV6, v6)
    } else {
        assert_eq!(v6.map(|b| sockaddr(&b)), Ok(want), "SOL_IPV6");
        (libc::SOL_IP, v4)
    };
    if accepted.local_addr().unwrap().is_ipv6() {
        assert_eq!(other.1, Err(libc::ENOENT), "the other option");
    }
    if direction == "outbound" {
        // The app sees where it connected to (its getpeername is rewritten
        // back, as NAT shows it).
        assert_eq!(app.peer_addr().unwrap(), target, "the app's peer");
    }

    // The same kind of connection, nobody capturing: every other option
    // reads the same.
    let plain = Topology::dual_stack();
    let control_listener = plain.pod.run(|| {
        std::net::TcpListener::bind(SocketAddr::new(
            listener.local_addr().unwrap().ip(),
            listener.local_addr().unwrap().port(),
        ))
        .unwrap()
    });
    let loopback = match accepted.local_addr().unwrap().ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some() => {
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())
        }
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let control_port = control_listener.local_addr().unwrap().port();
    let _control_app = plain.pod.run(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(loopback, control_port),
            Duration::from_secs(5),
        )
        .unwrap()
    });
    let (control, _) = control_listener.accept().unwrap();
    assert_eq!(
        accepted.local_addr().unwrap().is_ipv4(),
        control.local_addr().unwrap().is_ipv4(),
        "the control is the same kind of socket"
    );
    assert_eq!(options(&accepted), options(&control), "other options");
    assert_eq!(
        other.1,
        raw_getsockopt(&control, other.0, SO_ORIGINAL_DST),
        "the other original-destination option"
    );
    // Nobody's connection: no conntrack entry, whether or not conntrack
    // is loaded (eBPF mode needs none).
    assert_eq!(
        raw_getsockopt(&control, libc::SOL_IP, SO_ORIGINAL_DST),
        Err(libc::ENOENT),
        "SO_ORIGINAL_DST on a socket nobody captured"
    );
}

/// After 1,000 connections of each family's kind (IPv4, v4-mapped, IPv6
/// outbound; IPv4 and IPv6 inbound) every map is back where it started.
#[rstest]
fn maps_return_to_baseline_after_1000_connections_of_each_family() {
    require_root!();
    let topo = Topology::dual_stack();
    let echo = Server::start(
        &topo.srv,
        Ipv6Addr::UNSPECIFIED,
        9000,
        Behaviour::HttpBody { bytes: 64 },
    );
    // Every one short-circuited, however short (see `--short-conn-threshold`).
    let _agent = topo.run_agent(
        RedirectMode::Ebpf,
        Placement::Outside,
        &["--short-conn-threshold", "0"],
    );
    let _in_pod = topo.enter_pod_cgroup();
    let app = Server::start(
        &topo.pod,
        Ipv6Addr::UNSPECIFIED,
        8080,
        Behaviour::HttpBody { bytes: 64 },
    );
    let baseline = snapshot(&topo).maps;
    let port = echo.addr.port();
    for dst in [IpAddr::from(SRV_IP), SRV_MAPPED.into(), SRV_IP6.into()] {
        for i in 0..1000 {
            let mut c = topo.pod_connect(SocketAddr::new(dst, port));
            assert_eq!(http_get(&mut c, "x"), pattern(64), "outbound {dst} {i}");
        }
    }
    for dst in [IpAddr::from(tests::topology::POD_IP), POD_IP6.into()] {
        for i in 0..1000 {
            let c = topo
                .srv
                .run(|| {
                    TcpStream::connect_timeout(&SocketAddr::new(dst, 8080), Duration::from_secs(5))
                })
                .unwrap_or_else(|e| panic!("inbound {dst} {i}: {e}"));
            let mut c = tests::PollStream::new(c, Duration::from_secs(10)).unwrap();
            assert_eq!(http_get(&mut c, "x"), pattern(64), "inbound {dst} {i}");
        }
    }
    drop(app);
    let now = snapshot(&topo);
    for (counter, at_least) in [
        (Counter::ConnectRedirected, 1000),
        (Counter::ConnectRedirectedMapped, 1000),
        (Counter::ConnectRedirected6, 1000),
        (Counter::InboundSteered, 1000),
        (Counter::InboundSteered6, 1000),
    ] {
        assert!(
            now.counter(counter) >= at_least,
            "{counter:?}: {:?}",
            now.counters
        );
    }
    let deadline = Instant::now() + tests::scaled(Duration::from_secs(10));
    loop {
        let now = snapshot(&topo);
        if now.maps == baseline {
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
