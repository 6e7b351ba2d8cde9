//! DNS capture (`run --redirect-dns`), istio's way, in both modes: UDP and
//! TCP port 53 to the pod's resolvers go to the DNS proxy on 15053 (run as
//! the proxy's uid, here a small server that logs each query), its own
//! queries are exempt, replies look like the resolver's, other UDP is left
//! alone.
//!
//! The resolver (`10.77.0.2`, `fd77::2`, and `10.77.0.3`, which the pod's
//! `resolv.conf` does not name) answers `192.0.2.1`; the DNS proxy answers
//! `192.0.2.53`: the answer says who answered.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Output,
    time::{Duration, Instant},
};

use agent::inspect;
use agent_common::Counter;
use rstest::rstest;
use tests::{
    Agent, Placement, RedirectMode, Topology,
    agent_proc::run_to_end,
    clients,
    dns::{self, DnsServer, NAME, ResolvConf, Transport},
    require_root,
    topology::{SRV_IP, SRV_IP6},
};

const PROXY_A: &str = "192.0.2.53";
const PROXY_AAAA: &str = "2001:db8::53";
const RESOLVER_A: &str = "192.0.2.1";
const RESOLVER_AAAA: &str = "2001:db8::1";
/// A resolver address the pod's `resolv.conf` does not name.
const OTHER_RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const PROXY_UID: u32 = 1337;

/// A dual-stack pod, a resolver in the server namespace (port 53 on every
/// address, and 5353 on its first), and the pod's `resolv.conf`.
struct DnsPod {
    topo: Topology,
    resolver: DnsServer,
    _resolv_conf: ResolvConf,
}

impl DnsPod {
    fn new(nameserver: IpAddr, options: &str) -> Self {
        let topo = Topology::dual_stack();
        topo.srv.sh(&format!(
            "ip addr add {OTHER_RESOLVER}/24 dev {}b",
            topo.srv.name()
        ));
        let resolver = DnsServer::start(
            &topo.srv,
            None,
            None,
            "resolver",
            (RESOLVER_A, RESOLVER_AAAA),
            &[
                &format!("{SRV_IP}:53"),
                &format!("[{SRV_IP6}]:53"),
                &format!("{OTHER_RESOLVER}:53"),
                &format!("{SRV_IP}:5353"),
            ],
        );
        let resolv_conf =
            ResolvConf::write(&topo.pod, &format!("nameserver {nameserver}\n{options}"));
        Self {
            topo,
            resolver,
            _resolv_conf: resolv_conf,
        }
    }

    /// The agent, serving the pod with `extra` flags (the proxy's uid
    /// exempt, as istio's agent runs).
    fn agent(&self, mode: RedirectMode, extra: &[&str]) -> Agent {
        self.topo.run_agent(
            mode,
            Placement::Outside,
            &[&["--proxy-uid", "1337"][..], extra].concat(),
        )
    }

    /// The DNS proxy: in the pod, as the proxy's uid, on both loopbacks.
    fn dns_proxy(&self) -> DnsServer {
        DnsServer::start(
            &self.topo.pod,
            Some(&self.topo.cgroup),
            Some(PROXY_UID),
            "proxy",
            (PROXY_A, PROXY_AAAA),
            &["127.0.0.1:15053", "[::1]:15053"],
        )
    }

    /// `cmd` run in the pod's cgroup (it enters the namespace itself).
    fn run(&self, cmd: &mut std::process::Command) -> String {
        let out: Output =
            clients::run_in(cmd, None, Some(&self.topo.cgroup), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn counter(&self, c: Counter) -> u64 {
        inspect::snapshot(self.topo.cgroup.path())
            .unwrap()
            .map_or(0, |s| s.counter(c))
    }
}

/// How the app resolves.
#[derive(Debug, Clone, Copy)]
enum Resolve {
    /// `getent hosts NAME` (glibc: AAAA, then A).
    Getent,
    /// Python's `socket.getaddrinfo` (glibc: A and AAAA together).
    Getaddrinfo,
}

impl Resolve {
    fn run(self, pod: &DnsPod, uid: Option<u32>) -> String {
        match self {
            Self::Getent => pod.run(dns::netns_exec(&pod.topo.pod, "getent").args(["hosts", NAME])),
            Self::Getaddrinfo => pod.run(&mut dns::python_query(
                &pod.topo.pod,
                uid,
                &["getaddrinfo", NAME],
            )),
        }
    }
}

/// The addresses a resolver's output names.
fn addresses(out: &str) -> Vec<IpAddr> {
    out.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// With `--redirect-dns`, the app's queries to its resolver (UDP, or TCP
/// with `options use-vc`, over either family) are answered by the DNS
/// proxy and only by it; its log shows each. SIGTERM leaves nothing.
#[rstest]
#[case::getent_udp(Resolve::Getent, SRV_IP.into(), "udp")]
#[case::getaddrinfo_udp(Resolve::Getaddrinfo, SRV_IP.into(), "udp")]
#[case::getent_tcp(Resolve::Getent, SRV_IP.into(), "tcp")]
#[case::getaddrinfo_tcp(Resolve::Getaddrinfo, SRV_IP.into(), "tcp")]
#[case::getent_udp_ipv6_resolver(Resolve::Getent, SRV_IP6.into(), "udp")]
#[case::getaddrinfo_tcp_ipv6_resolver(Resolve::Getaddrinfo, SRV_IP6.into(), "tcp")]
fn queries_to_the_resolver_are_answered_by_the_dns_proxy(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[case] resolve: Resolve,
    #[case] nameserver: IpAddr,
    #[case] transport: &str,
) {
    require_root!();
    let options = if transport == "tcp" {
        "options use-vc\n"
    } else {
        ""
    };
    let pod = DnsPod::new(nameserver, options);
    let agent = pod.agent(mode, &["--redirect-dns"]);
    let proxy = pod.dns_proxy();
    let out = resolve.run(&pod, None);
    let got = addresses(&out);
    assert!(!got.is_empty(), "no address: {out}");
    let from_proxy: [IpAddr; 2] = [PROXY_A.parse().unwrap(), PROXY_AAAA.parse().unwrap()];
    assert!(
        got.iter().all(|a| from_proxy.contains(a)),
        "answered by the DNS proxy only: {out}"
    );
    let queries = proxy.queries();
    assert!(!queries.is_empty());
    for q in &queries {
        let fields: Vec<&str> = q.split(' ').collect();
        assert_eq!(fields[1], transport, "{queries:?}");
        assert_eq!(fields[2], NAME, "{queries:?}");
    }
    assert_eq!(
        pod.resolver.queries(),
        Vec::<String>::new(),
        "the resolver was asked"
    );
    if mode == RedirectMode::Ebpf {
        assert!(pod.counter(Counter::DnsRedirected) >= 1);
    }

    let cg = pod.topo.cgroup.path().to_owned();
    assert!(agent.stop_with(libc::SIGTERM).success());
    assert!(
        inspect::attached(&cg).unwrap().iter().all(|p| !p.ours),
        "programs left on the pod's cgroup"
    );
    let saved = pod
        .topo
        .pod
        .sh("iptables-legacy-save; iptables-nft-save; ip6tables-legacy-save; ip6tables-nft-save");
    assert!(!saved.contains("ISTIO"), "rules left:\n{saved}");
    // With nothing capturing, the resolver answers again.
    let again = addresses(&resolve.run(&pod, None));
    let from_resolver: [IpAddr; 2] = [RESOLVER_A.parse().unwrap(), RESOLVER_AAAA.parse().unwrap()];
    assert!(
        !again.is_empty() && again.iter().all(|a| from_resolver.contains(a)),
        "{again:?}"
    );
}

/// Without `--redirect-dns` nothing of DNS is captured; with it, the
/// proxy's own queries (its uid) still reach the resolver.
#[rstest]
fn queries_reach_the_resolver_without_the_flag_and_from_the_proxy(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[values(false, true)] redirect_dns: bool,
) {
    require_root!();
    let pod = DnsPod::new(SRV_IP.into(), "");
    let flags: &[&str] = if redirect_dns {
        &["--redirect-dns"]
    } else {
        &[]
    };
    let _agent = pod.agent(mode, flags);
    let proxy = pod.dns_proxy();
    let uid = redirect_dns.then_some(PROXY_UID);
    let out = Resolve::Getaddrinfo.run(&pod, uid);
    let got = addresses(&out);
    let from_resolver: [IpAddr; 2] = [RESOLVER_A.parse().unwrap(), RESOLVER_AAAA.parse().unwrap()];
    assert!(
        !got.is_empty() && got.iter().all(|a| from_resolver.contains(a)),
        "answered by the resolver: {out}"
    );
    assert_eq!(proxy.queries(), Vec::<String>::new());
    assert!(!pod.resolver.queries().is_empty());
}

/// A query on an unconnected UDP socket (`sendto`) to the resolver goes to
/// the DNS proxy, and its reply comes from the resolver's address and port
/// (a resolver library drops a reply from anywhere else). UDP to another
/// port, or to a resolver the pod does not name, is not captured, unless
/// `--capture-all-dns` takes every port-53 destination.
#[rstest]
#[case::resolver(SRV_IP.into(), 53, &[], PROXY_A)]
#[case::resolver_ipv6(SRV_IP6.into(), 53, &[], PROXY_A)]
#[case::another_port(SRV_IP.into(), 5353, &[], RESOLVER_A)]
#[case::another_resolver(OTHER_RESOLVER.into(), 53, &[], RESOLVER_A)]
#[case::another_resolver_capture_all(OTHER_RESOLVER.into(), 53, &["--capture-all-dns"], PROXY_A)]
#[case::another_port_capture_all(SRV_IP.into(), 5353, &["--capture-all-dns"], RESOLVER_A)]
fn unconnected_udp_is_captured_exactly_as_istio_does(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[case] server: IpAddr,
    #[case] port: u16,
    #[case] flags: &[&str],
    #[case] answer: &str,
) {
    require_root!();
    let pod = DnsPod::new(SRV_IP.into(), &format!("nameserver {SRV_IP6}\n"));
    let _agent = pod.agent(mode, &[&["--redirect-dns"][..], flags].concat());
    let _proxy = pod.dns_proxy();
    let out = pod.run(&mut dns::python_query(
        &pod.topo.pod,
        None,
        &["sendto", &server.to_string(), &port.to_string(), NAME],
    ));
    assert_eq!(
        out.trim(),
        format!("{server} {port} {answer}"),
        "reply source and answer"
    );
}

/// 1,000 queries of each kind (connected UDP, unconnected UDP, TCP; to the
/// IPv4 and the IPv6 resolver), each answered by the proxy from the
/// resolver's address; then every map is back where it started.
#[rstest]
fn maps_return_to_baseline_after_1000_queries_of_each_kind() {
    require_root!();
    let pod = DnsPod::new(SRV_IP.into(), &format!("nameserver {SRV_IP6}\n"));
    let _agent = pod.agent(RedirectMode::Ebpf, &["--redirect-dns"]);
    let _proxy = pod.dns_proxy();
    let _in_pod = pod.topo.enter_pod_cgroup();
    let snapshot = || inspect::snapshot(pod.topo.cgroup.path()).unwrap().unwrap();
    let baseline = snapshot().maps;
    let mut id = 0u16;
    for server in [IpAddr::from(SRV_IP), SRV_IP6.into()] {
        let server = SocketAddr::new(server, 53);
        for transport in [
            Transport::ConnectedUdp,
            Transport::UnconnectedUdp,
            Transport::Tcp,
        ] {
            for _ in 0..1000 {
                id = id.wrapping_add(1);
                let (answer, from) = pod.topo.pod.run(|| dns::ask(server, transport, id));
                assert_eq!(answer.to_string(), PROXY_A, "{transport:?} {server} {id}");
                assert_eq!(from, server, "{transport:?}: the reply's source");
            }
        }
    }
    assert!(snapshot().counter(Counter::DnsRedirected) >= 6000);
    assert!(snapshot().counter(Counter::DnsReplyRestored) >= 2000);
    let deadline = Instant::now() + tests::scaled(Duration::from_secs(10));
    loop {
        let now = snapshot();
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

/// `--redirect-dns` with no resolver to find is refused, naming what is
/// missing, before anything is attached or written.
#[rstest]
fn redirect_dns_without_a_resolver_is_refused_by_name(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::dual_stack();
    let _resolv_conf = ResolvConf::write(&topo.pod, "search mesh.test\n");
    let out = run_to_end(
        &[
            &["run"][..],
            &topo.agent_args(mode),
            &["--redirect-dns"][..],
        ]
        .concat(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--redirect-dns") && err.contains("--dns-servers"),
        "{err}"
    );
    assert!(inspect::attached(topo.cgroup.path()).unwrap().is_empty());
    let saved = topo
        .pod
        .sh("iptables-legacy-save; iptables-nft-save; ip6tables-legacy-save; ip6tables-nft-save");
    assert!(!saved.contains("ISTIO"), "{saved}");
}
