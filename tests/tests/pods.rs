//! Whole-pod scenarios: `--mode auto` and its fallback, two pods chained
//! through both their proxies, and a third-party transparent proxy
//! (HAProxy, as uid 1337) in external mode.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use agent::inspect;
use agent_common::Counter;
use rstest::rstest;
use tests::{
    Agent, PollStream, RedirectMode, TestCgroup, Topology, require_root,
    servers::{Behaviour, HTTP_BODY, Server, http_get},
    topology::{POD_IP, SRV_IP, lo_tx_packets},
};

fn run_args<'a>(mode: &'a str, netns: &'a str, cgroup: &'a str) -> Vec<&'a str> {
    vec!["--mode", mode, "--netns", netns, "--cgroup", cgroup]
}

#[rstest]
fn mode_auto_picks_ebpf_here_and_iptables_when_a_hook_is_missing() {
    require_root!();
    let topo = Topology::new();
    let netns = topo.pod.path();
    let (netns, cg) = (
        netns.to_str().unwrap(),
        topo.cgroup.path().to_str().unwrap(),
    );

    let agent = Agent::run(&run_args("auto", netns, cg), None);
    let log = agent.log_text();
    assert!(
        log.contains("every eBPF hook is available, using ebpf"),
        "{log}"
    );
    assert!(log.contains("mode=\"ebpf\""), "{log}");
    assert!(
        inspect::attached(topo.cgroup.path())
            .unwrap()
            .iter()
            .any(|p| p.ours)
    );
    assert!(agent.stop_with(libc::SIGTERM).success());

    let mut args = run_args("auto", netns, cg);
    args.extend(["--pretend-missing", "prog.sk_lookup"]);
    let agent = Agent::run(&args, None);
    let log = agent.log_text();
    assert!(log.contains("falling back to iptables"), "{log}");
    assert!(
        log.contains("sk_lookup"),
        "the reason names the missing hook: {log}"
    );
    assert!(log.contains("mode=\"iptables\""), "{log}");
    assert!(
        inspect::attached(topo.cgroup.path()).unwrap().is_empty(),
        "no eBPF program attached"
    );
    assert!(
        topo.pod
            .sh("iptables-legacy-save; iptables-nft-save")
            .contains("ISTIO_OUTPUT")
    );
    // And it captures: the connection goes through the proxy to the server.
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let conn = topo
        .pod
        .run(|| TcpStream::connect_timeout(&echo.addr, Duration::from_secs(5)))
        .unwrap();
    let mut conn = PollStream::new(conn, Duration::from_secs(10)).unwrap();
    tests::transfer::echo_round_trip(&mut conn, 1 << 20, 4096);
    assert!(agent.stop_with(libc::SIGTERM).success());
}

/// `--mode auto` asks only for the hooks the configuration uses: without
/// DNS capture a missing sendmsg hook does not matter; with it, the agent
/// falls back to iptables, naming the hook.
#[rstest]
#[case::without_dns(&[], "ebpf")]
#[case::with_dns(&["--redirect-dns", "--dns-servers", "10.77.0.2"], "iptables")]
fn mode_auto_needs_the_dns_hooks_only_for_dns_capture(
    #[case] extra: &[&str],
    #[case] chosen: &str,
) {
    require_root!();
    let topo = Topology::new();
    let (netns, cg) = (
        topo.pod.path_str().to_owned(),
        topo.cgroup.path().to_str().unwrap().to_owned(),
    );
    let mut args = run_args("auto", &netns, &cg);
    args.extend(["--pretend-missing", "object.mesh_sendmsg4"]);
    args.extend(extra);
    let agent = Agent::run(&args, None);
    let log = agent.log_text();
    assert!(log.contains(&format!("mode=\"{chosen}\"")), "{log}");
    if chosen == "iptables" {
        assert!(
            log.contains("mesh_sendmsg4"),
            "the reason names the hook: {log}"
        );
    }
    assert!(agent.stop_with(libc::SIGTERM).success());
}

/// app A → proxy A → proxy B → app B, two pods on one machine, each with
/// its own agent. In eBPF mode both pods' loopback hops are short-circuited.
#[rstest]
fn two_pods_chain_through_both_proxies(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    const REQUESTS: u32 = 200;
    require_root!();
    // Pod A is `topo.pod` (10.77.0.1), pod B is `topo.srv` (10.77.0.2).
    let topo = Topology::new();
    let cg_b = TestCgroup::new();
    let (ns_a, ns_b) = (topo.pod.path(), topo.srv.path());
    let agent_a = Agent::run(
        &run_args(
            mode.arg(),
            ns_a.to_str().unwrap(),
            topo.cgroup.path().to_str().unwrap(),
        ),
        None,
    );
    let agent_b = Agent::run(
        &run_args(
            mode.arg(),
            ns_b.to_str().unwrap(),
            cg_b.path().to_str().unwrap(),
        ),
        None,
    );
    let app_b = {
        let _in_b = tests::InCgroup::enter(cg_b.path());
        Server::start(&topo.srv, Ipv4Addr::UNSPECIFIED, 8080, Behaviour::Http)
    };
    let _in_a = topo.enter_pod_cgroup();
    let dst = SocketAddrV4::new(SRV_IP, 8080);
    let conn = topo
        .pod
        .run(|| TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5)))
        .unwrap();
    let mut conn = PollStream::new(conn, Duration::from_secs(10)).unwrap();
    assert_eq!(http_get(&mut conn, "b"), HTTP_BODY);

    let (a0, b0) = (topo.pod.run(lo_tx_packets), topo.srv.run(lo_tx_packets));
    for _ in 0..REQUESTS {
        assert_eq!(http_get(&mut conn, "b"), HTTP_BODY);
    }
    let per_request = |before: u64, now: u64| {
        f64::from(u32::try_from(now - before).unwrap()) / f64::from(REQUESTS)
    };
    let (a, b) = (
        per_request(a0, topo.pod.run(lo_tx_packets)),
        per_request(b0, topo.srv.run(lo_tx_packets)),
    );
    eprintln!("{mode:?}: lo packets per request: pod A {a:.2}, pod B {b:.2}");

    let peers = app_b.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].ip(),
        Ipv4Addr::new(127, 0, 0, 6),
        "app B is reached through proxy B"
    );
    match mode {
        RedirectMode::Ebpf => {
            // App B is a thread-per-connection server doing blocking reads
            // (its listener was blocking when it listened): where such
            // reads are unsafe in a sockmap, proxy B's hop to it stays on
            // plain TCP, counted.
            let b_short = agent_b.short_circuits_blocking();
            assert!(
                a <= 0.1 && (b <= 0.1) == b_short && (b_short || b >= 1.0),
                "loopback packets per request: A {a}, B {b} (blocking reads short-circuited: {b_short})"
            );
            let sa = inspect::snapshot(topo.cgroup.path()).unwrap().unwrap();
            let sb = inspect::snapshot(cg_b.path()).unwrap().unwrap();
            assert_eq!(
                sa.counter(Counter::ConnectRedirected),
                1,
                "app A's connect is captured by agent A"
            );
            assert_eq!(
                sb.counter(Counter::InboundSteered),
                1,
                "proxy A's connect is steered by agent B"
            );
            assert_eq!(sa.counter(Counter::MsgPassed), 0);
            assert!(sa.counter(Counter::MsgRedirected) >= u64::from(REQUESTS));
            if b_short {
                assert_eq!(sb.counter(Counter::MsgPassed), 0);
                assert!(sb.counter(Counter::MsgRedirected) >= u64::from(REQUESTS));
            } else {
                // App B's end stayed out, and proxy B's end left once it
                // found no one to short-circuit to.
                assert!(sb.counter(Counter::SockhashRefusedBlocking) >= 1);
                assert_eq!(sb.counter(Counter::MsgRedirected), 0);
                assert!(sb.counter(Counter::SockhashEvicted) >= 1);
            }
        }
        // Plain TCP on both loopbacks, which shows the measurement sees them.
        RedirectMode::Iptables => assert!(a >= 1.0 && b >= 1.0, "A {a}, B {b}"),
    }
    drop((agent_a, agent_b));
}

#[rstest]
fn an_external_third_party_proxy_works_and_fails_fast_when_stopped(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    if Command::new("haproxy").arg("-v").output().is_err() {
        tests::skip!("haproxy is not installed (cargo xtask setup installs it)");
    }
    let topo = Topology::new();
    let echo = Server::start(
        &topo.srv,
        SRV_IP,
        9000,
        Behaviour::Echo {
            write_size: 16 * 1024,
        },
    );
    let (netns, cg) = (
        topo.pod.path(),
        topo.cgroup.path().to_str().unwrap().to_owned(),
    );
    let mut args = run_args(mode.arg(), netns.to_str().unwrap(), &cg);
    args.extend([
        "--proxy",
        "external",
        "--proxy-uid",
        "1337",
        "--proxy-gid",
        "1337",
    ]);
    let agent = Agent::run(&args, None);
    let app = {
        let _in_pod = topo.enter_pod_cgroup();
        Server::start(
            &topo.pod,
            Ipv4Addr::UNSPECIFIED,
            8080,
            Behaviour::Echo {
                write_size: 16 * 1024,
            },
        )
    };
    let haproxy = tests::haproxy::Haproxy::start(&topo);
    let _in_pod = topo.enter_pod_cgroup();

    // Outbound: app → HAProxy → server, byte-exact.
    let conn = topo
        .pod
        .run(|| TcpStream::connect_timeout(&echo.addr, Duration::from_secs(5)))
        .unwrap();
    let mut conn = PollStream::new(conn, Duration::from_secs(30)).unwrap();
    let sent = tests::transfer::echo_round_trip(&mut conn, 16 << 20, 16 * 1024);
    assert_eq!(echo.seen.lock().unwrap().received_sha256, vec![sent]);
    assert_eq!(echo.peers()[0].ip(), POD_IP);

    // Inbound: client elsewhere → HAProxy → app, from 127.0.0.6, byte-exact.
    let dst = SocketAddrV4::new(POD_IP, 8080);
    let conn = topo
        .srv
        .run(|| TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5)))
        .unwrap();
    let mut conn = PollStream::new(conn, Duration::from_secs(30)).unwrap();
    let sent = tests::transfer::echo_round_trip(&mut conn, 16 << 20, 16 * 1024);
    let seen = app.seen.lock().unwrap().received_sha256.clone();
    assert_eq!(seen, vec![sent]);
    assert_eq!(app.peers()[0].ip(), Ipv4Addr::new(127, 0, 0, 6));
    if mode == RedirectMode::Ebpf {
        let s = inspect::snapshot(topo.cgroup.path()).unwrap().unwrap();
        assert_eq!(
            s.counter(Counter::InboundListenerRegistered),
            1,
            "HAProxy's listener registered itself"
        );
        assert!(
            s.counter(Counter::MsgRedirected) > 0,
            "HAProxy's hops were short-circuited"
        );
        assert_eq!(
            s.counter(Counter::GetsockoptAnswered),
            2,
            "HAProxy asked SO_ORIGINAL_DST twice"
        );
    }

    // Proxy stopped: new connects are refused at once, both ways.
    drop(haproxy);
    let start = Instant::now();
    let out = topo
        .pod
        .run(|| TcpStream::connect_timeout(&echo.addr, Duration::from_secs(5)));
    assert_eq!(
        out.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "outbound"
    );
    let inb = topo
        .srv
        .run(|| TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5)));
    assert_eq!(
        inb.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "inbound"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    drop(agent);
}
