//! What gets captured: inbound capture without NAT, the include/exclude
//! lists with istio's flags and meaning, runtime rule changes, and the
//! bypass log. One body per behaviour, run over both redirect modes where
//! the behaviour must match.
//!
//! The oracle: the agent runs with `--proxy external` and the test itself
//! listens on the proxy's ports inside the pod. A captured connection lands
//! on those listeners (and `SO_ORIGINAL_DST` names where it was going); one
//! that is not captured reaches its real destination.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use agent::socket;
use rstest::rstest;
use tests::{
    Agent, Placement, RedirectMode, Topology,
    agent_proc::run_to_end,
    require_root,
    servers::{Behaviour, Server},
    topology::{POD_IP, POD_IP6, SRV_IP, SRV_IP6},
};

/// The agent for an external proxy running as uid 1337.
fn start_agent(topo: &Topology, mode: RedirectMode, extra: &[&str]) -> Agent {
    topo.run_agent(
        mode,
        Placement::Outside,
        &[&["--proxy", "external", "--proxy-uid", "1337"][..], extra].concat(),
    )
}

/// The test's stand-ins for the proxy's listeners, in the pod (created
/// while the test process is in the pod's cgroup, as a sidecar's would be),
/// one per family as a dual-stack proxy has them.
struct FakeProxy {
    outbound: TcpListener,
    outbound6: TcpListener,
    inbound: TcpListener,
    inbound6: TcpListener,
}

impl FakeProxy {
    fn new(topo: &Topology) -> Self {
        topo.pod.run(|| Self {
            outbound: listen((Ipv4Addr::LOCALHOST, 15001).into()),
            outbound6: listen((Ipv6Addr::LOCALHOST, 15001).into()),
            inbound: listen((Ipv4Addr::UNSPECIFIED, 15006).into()),
            inbound6: listen((Ipv6Addr::UNSPECIFIED, 15006).into()),
        })
    }

    /// The outbound listener a connect to `dst` lands on: a v4-mapped
    /// destination is an IPv4 one.
    fn outbound_for(&self, dst: SocketAddr) -> &TcpListener {
        if is_v4(dst.ip()) {
            &self.outbound
        } else {
            &self.outbound6
        }
    }

    fn inbound_for(&self, dst: SocketAddr) -> &TcpListener {
        if is_v4(dst.ip()) {
            &self.inbound
        } else {
            &self.inbound6
        }
    }
}

/// A non-blocking listener on `addr`, IPv6 ones IPv6-only (as a proxy with
/// a listener per family binds them).
fn listen(addr: SocketAddr) -> TcpListener {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(true).unwrap();
    }
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.listen(128).unwrap();
    s.set_nonblocking(true).unwrap();
    s.into()
}

/// IPv4, or an IPv4 address written v4-mapped.
fn is_v4(ip: IpAddr) -> bool {
    ip.to_canonical().is_ipv4()
}

/// The address netfilter (and so `SO_ORIGINAL_DST`) names for `dst`: a
/// v4-mapped one as plain IPv4.
fn canonical(dst: SocketAddr) -> SocketAddr {
    SocketAddr::new(dst.ip().to_canonical(), dst.port())
}

/// Where a connection ended up.
#[derive(Debug, PartialEq, Eq)]
enum Landed {
    /// On the proxy's listener, with this original destination.
    Proxy(SocketAddr),
    /// Not on the proxy: at the real destination (or refused there).
    Direct,
}

/// Accepts from `proxy` for a short while; `Direct` if nothing arrives.
fn landed(proxy: &TcpListener) -> Landed {
    let deadline = Instant::now() + tests::scaled(Duration::from_millis(500));
    loop {
        match proxy.accept() {
            Ok((s, peer)) => {
                return Landed::Proxy(socket::original_dst(&s, peer).expect("SO_ORIGINAL_DST"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return Landed::Direct,
        }
    }
}

/// An outbound connect from the app in the pod to `dst`; where it lands.
fn outbound(topo: &Topology, proxy: &FakeProxy, dst: impl Into<SocketAddr>) -> Landed {
    let dst = dst.into();
    let _ = topo
        .pod
        .run(|| TcpStream::connect_timeout(&dst, tests::scaled(Duration::from_millis(300))));
    landed(proxy.outbound_for(dst))
}

/// An inbound connect from the server namespace to the pod's `ip:port`.
fn inbound(topo: &Topology, proxy: &FakeProxy, ip: impl Into<IpAddr>, port: u16) -> Landed {
    let dst = SocketAddr::new(ip.into(), port);
    let _ = topo
        .srv
        .run(|| TcpStream::connect_timeout(&dst, tests::scaled(Duration::from_millis(300))));
    landed(proxy.inbound_for(dst))
}

const OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OTHER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// A loopback address other than 127.0.0.1: never captured, in either mode.
const LOOPBACK_2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const OTHER: SocketAddrV4 = SocketAddrV4::new(OTHER_IP, 80);
/// The server's IPv4 address written v4-mapped, as a dual-stack app (the
/// JDK's sockets, Python's `AF_INET6`) connects to it.
const SRV_MAPPED: Ipv6Addr = SRV_IP.to_ipv6_mapped();

/// One body for both families: each case lists outbound destinations and
/// inbound ports with whether they are captured. IPv6 CIDRs and ports
/// decide exactly as IPv4 ones do; a v4-mapped destination follows the
/// IPv4 rules; `::1` is exempt like 127.0.0.0/8; an include list of one
/// family's CIDRs captures nothing of the other (as istio's `-i` does);
/// with IPv6 off, IPv6 goes untouched (no ip6tables rules).
#[rstest]
#[case::defaults(&[], &[(SRV_IP.into(), 9000, true), (OTHER_IP.into(), 80, true), (LOOPBACK_2.into(), 9000, false)], &[(POD_IP.into(), 8080, true), (POD_IP.into(), 15021, false), (POD_IP.into(), 15008, false), (POD_IP.into(), 15090, false), (POD_IP.into(), 15020, false)])]
#[case::defaults6(&[], &[(SRV_IP6.into(), 9000, true), (OTHER_IP6.into(), 80, true), (SRV_MAPPED.into(), 9000, true), (Ipv6Addr::LOCALHOST.into(), 9000, false)], &[(POD_IP6.into(), 8080, true), (POD_IP6.into(), 15021, false), (POD_IP6.into(), 15020, false)])]
#[case::exclude_cidr(&["-x", "10.77.0.0/24"], &[(SRV_IP.into(), 9000, false), (SRV_MAPPED.into(), 9000, false), (OTHER_IP.into(), 80, true), (SRV_IP6.into(), 9000, true)], &[])]
#[case::exclude_cidr6(&["-x", "fd77::/64"], &[(SRV_IP6.into(), 9000, false), (OTHER_IP6.into(), 80, true), (SRV_IP.into(), 9000, true)], &[])]
#[case::exclude_both(&["-x", "10.77.0.0/24,fd77::/64"], &[(SRV_IP.into(), 9000, false), (SRV_IP6.into(), 9000, false), (OTHER_IP.into(), 80, true), (OTHER_IP6.into(), 80, true)], &[])]
#[case::include_cidr(&["-i", "192.0.2.0/24"], &[(SRV_IP.into(), 9000, false), (OTHER_IP.into(), 80, true), (SRV_IP6.into(), 9000, false)], &[])]
#[case::include_cidr6(&["-i", "2001:db8::/32"], &[(SRV_IP6.into(), 9000, false), (OTHER_IP6.into(), 80, true), (SRV_IP.into(), 9000, false)], &[])]
#[case::include_all(&["-i", "*"], &[(SRV_IP.into(), 9000, true), (SRV_IP6.into(), 9000, true)], &[])]
#[case::include_port(&["-i", "192.0.2.0/24", "-q", "9000"], &[(SRV_IP.into(), 9000, true), (SRV_IP.into(), 9001, false)], &[])]
#[case::include_port6(&["-i", "2001:db8::/32", "-q", "9000"], &[(SRV_IP6.into(), 9000, true), (SRV_IP6.into(), 9001, false)], &[])]
#[case::exclude_port(&["-o", "9000"], &[(SRV_IP.into(), 9000, false), (SRV_IP.into(), 9001, true), (SRV_IP6.into(), 9000, false), (SRV_IP6.into(), 9001, true)], &[])]
#[case::exclude_cidr_beats_include_port(&["-x", "10.77.0.0/24,fd77::/64", "-q", "9000"], &[(SRV_IP.into(), 9000, false), (SRV_IP6.into(), 9000, false)], &[])]
#[case::ipv6_off(&["--ipv6=false"], &[(SRV_IP6.into(), 9000, false), (SRV_MAPPED.into(), 9000, true), (SRV_IP.into(), 9000, true)], &[(POD_IP6.into(), 8080, false), (POD_IP.into(), 8080, true)])]
#[case::inbound_exclude(&["-d", "8080"], &[], &[(POD_IP.into(), 8080, false), (POD_IP.into(), 8081, true), (POD_IP6.into(), 8080, false), (POD_IP6.into(), 8081, true)])]
#[case::inbound_include(&["-b", "9090"], &[], &[(POD_IP.into(), 8080, false), (POD_IP.into(), 9090, true), (POD_IP6.into(), 8080, false), (POD_IP6.into(), 9090, true)])]
fn include_and_exclude_lists_decide_what_is_captured(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[case] flags: &[&str],
    #[case] outbound_cases: &[(IpAddr, u16, bool)],
    #[case] inbound_cases: &[(IpAddr, u16, bool)],
) {
    require_root!();
    let topo = Topology::dual_stack();
    let _agent = start_agent(&topo, mode, flags);
    let _in_pod = topo.enter_pod_cgroup();
    let proxy = FakeProxy::new(&topo);
    for &(ip, port, captured) in outbound_cases {
        let dst = SocketAddr::new(ip, port);
        let expected = if captured {
            Landed::Proxy(canonical(dst))
        } else {
            Landed::Direct
        };
        assert_eq!(
            outbound(&topo, &proxy, dst),
            expected,
            "outbound to {dst} with {flags:?}"
        );
    }
    for &(ip, port, captured) in inbound_cases {
        let expected = if captured {
            Landed::Proxy(SocketAddr::new(ip, port))
        } else {
            Landed::Direct
        };
        assert_eq!(
            inbound(&topo, &proxy, ip, port),
            expected,
            "inbound to {ip} port {port} with {flags:?}"
        );
    }
}

/// The proxy's own connects to an app of its pod (as uid 1337, to the pod's
/// address) go through inbound capture, as istio's rules send them
/// (`-o lo ! -d 127.0.0.1 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT`),
/// while its connects elsewhere are never captured.
#[rstest]
fn the_proxys_connects_to_a_local_app_are_captured_inbound(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let _agent = start_agent(&topo, mode, &[]);
    let _in_pod = topo.enter_pod_cgroup();
    let proxy = FakeProxy::new(&topo);
    let local_app = SocketAddrV4::new(POD_IP, 8080);
    connect_as(&topo, Ids::Uid1337, local_app);
    assert_eq!(landed(&proxy.inbound), Landed::Proxy(local_app.into()));
    let elsewhere = SocketAddrV4::new(SRV_IP, 9000);
    connect_as(&topo, Ids::Uid1337, elsewhere);
    assert_eq!(landed(&proxy.outbound), Landed::Direct);
}

/// Which ids a connecting thread runs with.
#[derive(Debug, Clone, Copy)]
enum Ids {
    /// uid 1337, gid unchanged (0).
    Uid1337,
    /// gid 1337, uid unchanged (0).
    Gid1337,
}

/// A connect from the pod with this thread's ids changed to `ids` (raw
/// syscalls: glibc's wrappers would change every thread's ids).
fn connect_as(topo: &Topology, ids: Ids, dst: SocketAddrV4) {
    let ns = topo.pod.open();
    let _ = std::thread::spawn(move || {
        ns.enter().expect("enter the pod's netns");
        // SAFETY: raw syscalls changing this thread's ids only; it ends here.
        let rc = unsafe {
            match ids {
                Ids::Uid1337 => libc::syscall(libc::SYS_setresuid, 1337, 1337, 1337),
                Ids::Gid1337 => libc::syscall(libc::SYS_setresgid, 1337, 1337, 1337),
            }
        };
        assert_eq!(rc, 0, "set ids {ids:?}");
        TcpStream::connect_timeout(&dst.into(), tests::scaled(Duration::from_millis(300)))
    })
    .join()
    .expect("connecting thread");
}

/// `--proxy-uid` alone exempts that uid and not the gid of the same
/// number, and `--proxy-gid` alone the other way round: each identity is
/// matched on its own, as istio's `--uid-owner`/`--gid-owner` rules do.
#[rstest]
#[case::uid_only("--proxy-uid", Ids::Uid1337, Ids::Gid1337)]
#[case::gid_only("--proxy-gid", Ids::Gid1337, Ids::Uid1337)]
fn a_bypass_identity_exempts_only_itself(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[case] flag: &str,
    #[case] exempt: Ids,
    #[case] captured: Ids,
) {
    require_root!();
    let topo = Topology::new();
    let _agent = topo.run_agent(
        mode,
        Placement::Outside,
        &["--proxy", "external", flag, "1337"],
    );
    let _in_pod = topo.enter_pod_cgroup();
    let proxy = FakeProxy::new(&topo);
    let dst = SocketAddrV4::new(SRV_IP, 9000);
    connect_as(&topo, exempt, dst);
    assert_eq!(landed(&proxy.outbound), Landed::Direct, "{exempt:?}");
    connect_as(&topo, captured, dst);
    assert_eq!(
        landed(&proxy.outbound),
        Landed::Proxy(dst.into()),
        "{captured:?}"
    );
}

/// An app that sends its request and closes before the proxy gets round
/// to accepting: the proxy still learns where it was going (conntrack keeps
/// answering under iptables; in eBPF mode the proxy's end owns the entry)
/// and still reads every byte.
#[rstest]
fn the_original_destination_outlives_an_app_that_already_closed(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let _agent = start_agent(&topo, mode, &[]);
    let _in_pod = topo.enter_pod_cgroup();
    let proxy = FakeProxy::new(&topo);
    let dst = SocketAddrV4::new(SRV_IP, 9000);
    {
        use std::io::Write as _;
        let mut app = topo
            .pod
            .run(|| TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5)))
            .expect("connect");
        app.write_all(b"request").unwrap();
    }
    // The app's socket is gone (orphaned FIN_WAIT2 becomes TIME_WAIT at
    // once) well before this accept.
    std::thread::sleep(Duration::from_millis(300));
    proxy.outbound.set_nonblocking(false).unwrap();
    let (mut s, peer) = proxy.outbound.accept().unwrap();
    assert_eq!(
        socket::original_dst(&s, peer).expect("SO_ORIGINAL_DST"),
        dst.into()
    );
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut got).unwrap();
    assert_eq!(got, b"request");
}

#[rstest]
fn rules_change_at_runtime_without_a_restart() {
    require_root!();
    let topo = Topology::new();
    let agent = start_agent(&topo, RedirectMode::Ebpf, &[]);
    let _in_pod = topo.enter_pod_cgroup();
    let proxy = FakeProxy::new(&topo);
    let dst = SocketAddrV4::new(SRV_IP, 9000);
    let cg = topo.cgroup.path().to_str().unwrap().to_owned();
    let rules = |args: &[&str]| {
        let out = run_to_end(&[&["rules", "--cgroup", &cg], args].concat());
        assert!(
            out.status.success(),
            "rules {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(outbound(&topo, &proxy, dst), Landed::Proxy(dst.into()));
    assert_eq!(
        inbound(&topo, &proxy, POD_IP, 8080),
        Landed::Proxy(SocketAddrV4::new(POD_IP, 8080).into())
    );

    let shown = rules(&["-x", "10.77.0.0/24", "-d", "8080,15021"]);
    assert!(
        shown.contains("outbound exclude (-x): 10.77.0.0/24"),
        "{shown}"
    );
    assert_eq!(
        outbound(&topo, &proxy, dst),
        Landed::Direct,
        "-x applies to new connections"
    );
    assert_eq!(
        inbound(&topo, &proxy, POD_IP, 8080),
        Landed::Direct,
        "-d applies to new connections"
    );

    let shown = rules(&["-x", "", "-i", "192.0.2.0/24", "-q", "9000"]);
    assert!(
        shown.contains("outbound include (-i): 192.0.2.0/24"),
        "{shown}"
    );
    assert_eq!(
        outbound(&topo, &proxy, dst),
        Landed::Proxy(dst.into()),
        "-q 9000 captures again"
    );
    assert_eq!(
        outbound(&topo, &proxy, SocketAddrV4::new(SRV_IP, 9001)),
        Landed::Direct
    );
    assert_eq!(outbound(&topo, &proxy, OTHER), Landed::Proxy(OTHER.into()));
    // The agent process never restarted.
    assert!(agent.log_text().contains("mesh-redirect ready"));
    assert_eq!(agent.log_text().matches("mesh-redirect ready").count(), 1);
}

#[rstest]
fn bad_rule_lists_are_named_and_nothing_is_attached(
    #[values(&["-x", "10.0.0.0/33"][..], &["-i", "ten.0.0.0/8"][..], &["-x", "fd77::/129"][..], &["-i", "10.0.0.0/8,fd77:::1/64"][..], &["-b", "0"][..], &["-o", "70000"][..], &["-d", "*"][..])]
    flags: &[&str],
) {
    require_root!();
    let topo = Topology::new();
    let netns = topo.pod.path();
    let args = [
        &[
            "run",
            "--netns",
            netns.to_str().unwrap(),
            "--cgroup",
            topo.cgroup.path().to_str().unwrap(),
        ][..],
        flags,
    ]
    .concat();
    let out = run_to_end(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let bad = flags[1].rsplit(',').next().unwrap();
    assert!(
        err.contains(flags[0]) && err.contains(bad),
        "error does not name {} {bad}: {err}",
        flags[0]
    );
    assert!(
        agent::inspect::attached(topo.cgroup.path())
            .unwrap()
            .is_empty()
    );
}

/// The eBPF lists hold their documented 4096 entries (the last one still
/// decides), and one more is refused by name at run time, changing nothing.
#[rstest]
fn rule_lists_hold_their_documented_capacity() {
    require_root!();
    let cap = agent_common::capacity::RULES;
    // 4095 /32s no test connects to, then the server's /24 last.
    let list = |n: u32| {
        let mut v: Vec<String> = (0..n - 1)
            .map(|i| format!("10.{}.{}.{}/32", 100 + i / 65_536, (i / 256) % 256, i % 256))
            .collect();
        v.push("10.77.0.0/24".to_owned());
        v.join(",")
    };
    let topo = Topology::new();
    let full = list(cap);
    let _agent = start_agent(&topo, RedirectMode::Ebpf, &["-x", &full]);
    let _in_pod = topo.enter_pod_cgroup();
    let proxy = FakeProxy::new(&topo);
    let dst = SocketAddrV4::new(SRV_IP, 9000);
    assert_eq!(outbound(&topo, &proxy, dst), Landed::Direct);
    assert_eq!(outbound(&topo, &proxy, OTHER), Landed::Proxy(OTHER.into()));

    let cg = topo.cgroup.path().to_str().unwrap().to_owned();
    let over = list(cap + 1);
    let out = run_to_end(&["rules", "--cgroup", &cg, "-x", &over]);
    assert!(!out.status.success(), "{} entries accepted", cap + 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("-x") && err.contains(&format!("at most {cap}")),
        "{err}"
    );
    assert_eq!(outbound(&topo, &proxy, dst), Landed::Direct, "rules kept");
}

/// `run --config FILE` sets the same things as the flags (here the mode,
/// the external proxy and an exclusion), the command line overrides the
/// file, and a bad file is named with its line before anything is attached.
#[rstest]
fn a_config_file_sets_runs_flags_and_a_bad_one_is_named() {
    require_root!();
    let topo = Topology::new();
    let dir = tempfile_dir();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let netns = topo.pod.path();
    let cg = topo.cgroup.path().to_str().unwrap().to_owned();
    let good = write(
        "good.toml",
        "mode = \"ebpf\"\nproxy = \"external\"\nproxy-uid = 1337\n\
         outbound-ip-ranges-exclude = [\"10.77.0.0/24\", \"10.78.0.0/16\"]\n\
         outbound-port = 15099\n",
    );
    let agent = Agent::run(
        &[
            "--config",
            &good,
            "--netns",
            netns.to_str().unwrap(),
            "--cgroup",
            &cg,
            "--outbound-port",
            "15001",
        ],
        None,
    );
    // The file's mode, not auto's choice (which would log "mode auto:").
    let log = agent.log_text();
    assert!(
        log.contains("mode=\"ebpf\"") && !log.contains("mode auto:"),
        "{log}"
    );
    assert!(
        agent.log_text().contains("outbound_port=15001"),
        "the command line wins"
    );
    {
        let _in_pod = topo.enter_pod_cgroup();
        let proxy = FakeProxy::new(&topo);
        let dst = SocketAddrV4::new(SRV_IP, 9000);
        assert_eq!(
            outbound(&topo, &proxy, dst),
            Landed::Direct,
            "excluded by the file"
        );
        assert_eq!(outbound(&topo, &proxy, OTHER), Landed::Proxy(OTHER.into()));
    }
    drop(agent);

    for (name, text, named) in [
        (
            "syntax.toml",
            "mode = \"ebpf\"\nproxy = = 1\n",
            "syntax.toml: line 2",
        ),
        (
            "unknown.toml",
            "mode = \"ebpf\"\noutbund-port = 1\n",
            "unknown key `outbund-port`",
        ),
        ("value.toml", "outbound-port = 70000\n", "--outbound-port"),
        (
            "cidr.toml",
            "outbound-ip-ranges-exclude = [\"10.0.0.0/33\"]\n",
            "-x",
        ),
    ] {
        let path = write(name, text);
        let out = run_to_end(&[
            "run",
            "--config",
            &path,
            "--netns",
            netns.to_str().unwrap(),
            "--cgroup",
            &cg,
        ]);
        assert!(!out.status.success(), "{name} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(named),
            "{name}: error does not name `{named}`: {err}"
        );
        assert!(
            agent::inspect::attached(topo.cgroup.path())
                .unwrap()
                .is_empty(),
            "{name}: something got attached"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory for a test's files.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mesh-redirect-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[rstest]
fn the_bypass_identities_are_logged_once_at_startup() {
    require_root!();
    let topo = Topology::new();
    let agent = start_agent(
        &topo,
        RedirectMode::Ebpf,
        &["-x", "10.9.0.0/16", "-o", "25"],
    );
    let log = agent.log_text();
    for line in [
        "bypass: outbound ports never captured: 25",
        "bypass: outbound destinations never captured: 10.9.0.0/16",
        "bypass: inbound ports never captured: 15008,15090,15021,15020",
        "bypass: connects by uid 1337 (the proxy) are never captured",
    ] {
        assert_eq!(
            log.matches(line).count(),
            1,
            "`{line}` not logged exactly once:\n{log}"
        );
    }
}

/// Inbound through the built-in proxy: a client elsewhere reaches the app,
/// the app sees the passthrough source (istio's 127.0.0.6, and `::6` for
/// IPv6; a dual-stack app sees an IPv4 client's as `::ffff:127.0.0.6`),
/// 64 MiB each way byte-exact.
#[rstest]
#[case::ipv4(POD_IP.into(), Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::new(127, 0, 0, 6).into())]
#[case::ipv6_to_a_dual_stack_app(POD_IP6.into(), Ipv6Addr::UNSPECIFIED.into(), "::6".parse().unwrap())]
#[case::ipv4_to_a_dual_stack_app(POD_IP.into(), Ipv6Addr::UNSPECIFIED.into(), Ipv4Addr::new(127, 0, 0, 6).to_ipv6_mapped().into())]
fn inbound_reaches_the_app_from_the_passthrough_source(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
    #[case] dst: IpAddr,
    #[case] app_bind: IpAddr,
    #[case] passthrough: IpAddr,
) {
    require_root!();
    let topo = Topology::dual_stack();
    let _agent = topo.run_agent(mode, Placement::Outside, &[]);
    let app = {
        let _in_pod = topo.enter_pod_cgroup();
        Server::start(
            &topo.pod,
            app_bind,
            8080,
            Behaviour::Echo {
                write_size: 16 * 1024,
            },
        )
    };
    let conn = topo
        .srv
        .run(|| TcpStream::connect_timeout(&SocketAddr::new(dst, 8080), Duration::from_secs(5)))
        .unwrap();
    let mut conn = tests::PollStream::new(conn, Duration::from_secs(30)).unwrap();
    let sent = tests::transfer::echo_round_trip(&mut conn, tests::bulk_bytes(64 << 20), 16 * 1024);
    let seen = app.seen.lock().unwrap();
    assert_eq!(seen.peers.len(), 1);
    assert_eq!(
        seen.peers[0].ip(),
        passthrough,
        "the app sees the passthrough source"
    );
    assert_eq!(seen.received_sha256, vec![sent], "bytes at the app differ");
}
