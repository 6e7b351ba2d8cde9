//! The istio-iptables mode against the kernel: rules installed in a test
//! network namespace really capture connects (with `SO_ORIGINAL_DST`
//! intact), installing is idempotent, a different install needs
//! `--reconcile`, cleanup leaves the tables as they were, and the
//! `mesh-redirect iptables` command line behaves like istio-iptables.
//! Both iptables backends where the backend matters.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::{Command, Output},
    time::Duration,
};

use agent::{
    iptables::{
        apply::{self, ApplyError, Change},
        backend::{Backend, Family},
        istio::{self, Config, InterceptionMode, OwnerGroups, PortSpec, Selection},
    },
    netns::Netns,
    socket,
};
use rstest::rstest;
use tests::{TestNetns, Topology, require_root, skip, topology::SRV_IP};

fn runner(ns: &Netns) -> impl Fn(&str) -> Command + '_ {
    move |program: &str| ns.command(program)
}

/// `iptables-save` of both families, without what changes by itself
/// (comment lines with timestamps, packet counters).
fn snapshot(ns: &Netns, backend: Backend) -> String {
    let run = runner(ns);
    let mut out = String::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        let text = apply::save(&run, backend, family).expect("iptables-save");
        let _ = writeln!(out, "## {family}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // `:CHAIN POLICY [packets:bytes]`
            let line = match line.rsplit_once(" [") {
                Some((head, _)) if line.starts_with(':') => format!("{head} [0:0]"),
                _ => line.to_owned(),
            };
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// Rules someone else (kube, the user) has in every table, both families.
fn foreign_rules(netns: &TestNetns, backend: Backend) {
    let (v4, v6) = match backend {
        Backend::Legacy => ("iptables-legacy", "ip6tables-legacy"),
        Backend::Nft => ("iptables-nft", "ip6tables-nft"),
        Backend::Plain => ("iptables", "ip6tables"),
    };
    for (bin, net) in [(v4, "192.0.2.0/24"), (v6, "2001:db8::/32")] {
        netns.sh(&format!(
            "{bin} -t nat -N KUBE-SERVICES && {bin} -t nat -A OUTPUT -j KUBE-SERVICES && \
             {bin} -t nat -A KUBE-SERVICES -d {net} -p tcp -j RETURN && \
             {bin} -t nat -A PREROUTING -p udp --dport 5353 -j RETURN && \
             {bin} -t mangle -A PREROUTING -d {net} -j MARK --set-mark 7 && \
             {bin} -t mangle -A OUTPUT -o lo -j RETURN && \
             {bin} -t raw -A OUTPUT -d {net} -j CT --notrack && \
             {bin} -t filter -A INPUT -p tcp --dport 22 -j ACCEPT"
        ));
    }
}

/// The proxy's uid: not ours, so the test's own connects are captured.
const PROXY_UID: u32 = 4242;

fn capture_all() -> Config {
    Config {
        proxy_uids: vec![PROXY_UID],
        proxy_gids: vec![PROXY_UID],
        outbound_ip_ranges_include: Selection::All,
        ..Config::default()
    }
}

/// Everything that puts rules in built-in chains: TPROXY, DNS, exclusions,
/// virtual interfaces, drop-invalid, owner groups, IPv6.
fn everything() -> Config {
    Config {
        inbound_interception_mode: InterceptionMode::Tproxy,
        inbound_ports_include: Selection::All,
        inbound_ports_exclude: vec![PortSpec::Port(15090)],
        outbound_ports_exclude: vec![PortSpec::Port(22), PortSpec::Range(9000, 9010)],
        outbound_ip_ranges_exclude: vec!["10.96.0.0/12".parse().unwrap()],
        exclude_interfaces: vec!["eth9".into()],
        kube_virt_interfaces: vec!["virt0".into()],
        owner_groups: OwnerGroups::AllExcept(vec!["4243".into()]),
        redirect_dns: true,
        dns_servers_v4: vec!["10.96.0.10".into()],
        dns_servers_v6: vec!["fd00::a".into()],
        drop_invalid: true,
        enable_ipv6: true,
        exempt_mark: Some(0x539),
        ..capture_all()
    }
}

/// A listener on the proxy port inside `netns`.
fn proxy_listener(ns: &Netns) -> TcpListener {
    ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 15001)))
        .unwrap()
        .expect("bind 127.0.0.1:15001 in the pod")
}

fn connect(ns: &Netns, addr: SocketAddrV4, mark: Option<u32>) -> std::io::Result<TcpStream> {
    ns.run(|| {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if let Some(mark) = mark {
            sock.set_mark(mark)?;
        }
        sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        Ok(sock.into())
    })
    .unwrap()
}

#[rstest]
#[case::legacy(Backend::Legacy)]
#[case::nft(Backend::Nft)]
fn redirect_lands_on_the_proxy_with_the_original_destination(#[case] backend: Backend) {
    require_root!();
    let topo = Topology::new();
    let ns = topo.pod.open();
    let cfg = Config {
        exempt_mark: Some(0x539),
        ..capture_all()
    };
    let installed = apply::install(&runner(&ns), &cfg, backend, false).expect("install");
    assert_eq!(installed.ipv4, Change::Applied);
    assert_eq!(installed.ipv6, Change::NotRequested);
    let proxy = proxy_listener(&ns);

    let target = SocketAddrV4::new(SRV_IP, 80);
    let app = connect(&ns, target, None).expect("connect is captured");
    let (accepted, peer) = proxy.accept().unwrap();
    assert_eq!(
        app.peer_addr().unwrap(),
        target.into(),
        "the app sees its destination"
    );
    assert_eq!(
        socket::original_dst(&accepted, peer).unwrap(),
        target.into()
    );

    // Marked sockets (our proxy's upstream connections) go where they were
    // going: nothing listens on the server, so the connect is refused.
    let err = connect(&ns, target, Some(0x539)).expect_err("not captured");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // Localhost is never captured.
    let err =
        connect(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9), None).expect_err("not captured");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[rstest]
#[case::legacy(Backend::Legacy)]
#[case::nft(Backend::Nft)]
fn the_same_install_twice_changes_nothing(#[case] backend: Backend) {
    require_root!();
    let netns = TestNetns::new();
    let ns = netns.open();
    for cfg in [capture_all(), everything()] {
        let first = apply::install(&runner(&ns), &cfg, backend, false).expect("install");
        assert!(
            matches!(first.ipv4, Change::Applied | Change::Reconciled),
            "{first:?}"
        );
        let before = snapshot(&ns, backend);
        let again = apply::install(&runner(&ns), &cfg, backend, false).expect("install again");
        assert_eq!(again.ipv4, Change::Unchanged);
        let v6 = if cfg.enable_ipv6 {
            Change::Unchanged
        } else {
            Change::NotRequested
        };
        assert_eq!(again.ipv6, v6);
        assert_eq!(snapshot(&ns, backend), before);
        apply::uninstall(&runner(&ns), &cfg, backend).expect("uninstall");
    }
}

#[rstest]
#[case::legacy(Backend::Legacy)]
#[case::nft(Backend::Nft)]
fn a_different_install_needs_reconcile(#[case] backend: Backend) {
    require_root!();
    let netns = TestNetns::new();
    let ns = netns.open();
    // The tables exist before (an emptied table stays; see cleanup's test).
    foreign_rules(&netns, backend);
    let a = capture_all();
    let b = Config {
        outbound_ip_ranges_include: Selection::Only(vec!["10.0.0.0/8".parse().unwrap()]),
        inbound_ports_include: Selection::Only(vec![PortSpec::Port(8080)]),
        enable_ipv6: true,
        ..capture_all()
    };
    apply::install(&runner(&ns), &a, backend, false).expect("install a");
    let with_a = snapshot(&ns, backend);

    let err = apply::install(&runner(&ns), &b, backend, false).expect_err("b over a");
    assert!(matches!(err, ApplyError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("--reconcile"), "{err}");
    assert_eq!(snapshot(&ns, backend), with_a, "nothing written");

    let done = apply::install(&runner(&ns), &b, backend, true).expect("reconcile");
    assert_eq!(done.ipv4, Change::Reconciled);
    assert_eq!(done.ipv6, Change::Applied);
    let again = apply::install(&runner(&ns), &b, backend, false).expect("b again");
    assert_eq!(
        (again.ipv4, again.ipv6),
        (Change::Unchanged, Change::Unchanged)
    );
    let with_b = snapshot(&ns, backend);
    assert!(
        with_b.contains("10.0.0.0/8") && with_b.contains("--dport 8080"),
        "{with_b}"
    );

    // Back to a: IPv6 rules of b must go too.
    let back = apply::install(&runner(&ns), &a, backend, true).expect("reconcile back");
    assert_eq!(
        (back.ipv4, back.ipv6),
        (Change::Reconciled, Change::Reconciled)
    );
    assert_eq!(snapshot(&ns, backend), with_a);
}

#[rstest]
#[case::legacy(Backend::Legacy)]
#[case::nft(Backend::Nft)]
fn cleanup_leaves_the_tables_as_they_were(#[case] backend: Backend) {
    require_root!();
    let netns = TestNetns::new();
    let ns = netns.open();
    foreign_rules(&netns, backend);
    let before = snapshot(&ns, backend);

    // Every kind of rule, removed by `--cleanup-only` (which knows the config).
    apply::install(&runner(&ns), &everything(), backend, false).expect("install");
    let installed = snapshot(&ns, backend);
    assert!(installed.contains("ISTIO_OUTPUT_DNS") && installed.contains("TPROXY"));
    apply::uninstall(&runner(&ns), &everything(), backend).expect("uninstall");
    assert_eq!(snapshot(&ns, backend), before);

    // Only chains and jumps: `cleanup` without a config.
    apply::install(&runner(&ns), &capture_all(), backend, false).expect("install");
    apply::cleanup(&runner(&ns), backend).expect("cleanup");
    assert_eq!(snapshot(&ns, backend), before);
    // Twice is fine.
    apply::cleanup(&runner(&ns), backend).expect("cleanup again");
    assert_eq!(snapshot(&ns, backend), before);
}

#[rstest]
#[case::legacy(Backend::Legacy)]
#[case::nft(Backend::Nft)]
fn a_failed_install_leaves_nothing_behind(#[case] backend: Backend) {
    require_root!();
    let netns = TestNetns::new();
    let ns = netns.open();
    foreign_rules(&netns, backend);
    let before = snapshot(&ns, backend);

    // iptables itself rejects the rules (an unknown group name).
    let cfg = Config {
        owner_groups: OwnerGroups::Only(vec!["no-such-group-mr".into()]),
        enable_ipv6: true,
        ..capture_all()
    };
    let err = apply::install(&runner(&ns), &cfg, backend, false).expect_err("unknown group");
    assert!(matches!(err, ApplyError::Failed { .. }), "{err}");
    assert!(
        err.to_string().contains("-restore"),
        "names the program: {err}"
    );
    assert!(
        err.to_string().contains("no-such-group-mr"),
        "carries its stderr: {err}"
    );
    assert_eq!(snapshot(&ns, backend), before);

    // IPv6 fails after IPv4 went in: IPv4 is taken out again.
    let failing_v6 = |program: &str| {
        if program.starts_with("ip6tables") && program.ends_with("-restore") {
            ns.command("false")
        } else {
            ns.command(program)
        }
    };
    let cfg = Config {
        enable_ipv6: true,
        ..everything()
    };
    let err = apply::install(&failing_v6, &cfg, backend, false).expect_err("IPv6 fails");
    assert!(err.to_string().contains("ip6tables"), "{err}");
    assert_eq!(snapshot(&ns, backend), before);
}

#[test]
fn tproxy_routes_are_configured_once() {
    require_root!();
    let netns = TestNetns::new();
    let ns = netns.open();
    let cfg = Config {
        inbound_interception_mode: InterceptionMode::Tproxy,
        inbound_ports_include: Selection::All,
        enable_ipv6: true,
        ..capture_all()
    };
    for _ in 0..2 {
        apply::configure_routes(&runner(&ns), &cfg).expect("routes");
    }
    for fam in ["-4", "-6"] {
        let rules = netns.sh(&format!("ip {fam} rule show"));
        assert_eq!(
            rules.matches("fwmark 0x539 lookup 133").count(),
            1,
            "{rules}"
        );
        let table = netns.sh(&format!("ip {fam} route show table 133"));
        assert!(table.contains("local default dev lo"), "{table}");
    }
    assert!(netns.sh("ip -6 addr show dev lo").contains("::6/128"));
    // REDIRECT mode needs no route.
    let other = TestNetns::new();
    apply::configure_routes(&runner(&other.open()), &capture_all()).expect("no routes");
    assert!(!other.sh("ip rule show").contains("fwmark"));
}

#[test]
fn backend_detection_prefers_legacy_rules_then_nft() {
    require_root!();
    let netns = TestNetns::new();
    let ns = netns.open();
    assert_eq!(apply::detect_backend(&runner(&ns)).unwrap(), Backend::Nft);
    netns.sh("iptables-legacy -t nat -A OUTPUT -d 192.0.2.1 -j RETURN");
    assert_eq!(
        apply::detect_backend(&runner(&ns)).unwrap(),
        Backend::Legacy
    );
}

// ---- the command line ----------------------------------------------------

/// Runs `mesh-redirect iptables ARGS` inside `netns`.
fn cli(netns: &TestNetns, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", netns.name()])
        .arg(tests::agent_bin())
        .arg("iptables")
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run the agent")
}

/// Skips when the agent binary has no `iptables` subcommand yet.
macro_rules! require_cli {
    () => {
        let help = Command::new(tests::agent_bin())
            .args(["iptables", "--help"])
            .output();
        if !help.is_ok_and(|o| o.status.success()) {
            skip!(
                "{} has no `iptables` subcommand",
                tests::agent_bin().display()
            );
        }
    };
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_dry_run_prints_exactly_the_restore_input() {
    require_root!();
    require_cli!();
    let netns = TestNetns::new();
    let cases: &[(&[&str], Config)] = &[
        (
            &[
                "-p",
                "15001",
                "-z",
                "15006",
                "-e",
                "15008",
                "-u",
                "1337",
                "-g",
                "1337",
                "--ipv6=false",
            ],
            Config::default(),
        ),
        (
            &[
                "-u",
                "1337",
                "-b",
                "32000,31000",
                "-i",
                "10.0.0.0/8",
                "--ipv6",
                "--dry-run=true",
            ],
            Config {
                inbound_ports_include: Selection::Only(vec![
                    PortSpec::Port(32000),
                    PortSpec::Port(31000),
                ]),
                outbound_ip_ranges_include: Selection::Only(vec!["10.0.0.0/8".parse().unwrap()]),
                enable_ipv6: true,
                ..Config::default()
            },
        ),
    ];
    let ns = netns.open();
    for (args, cfg) in cases {
        let before = snapshot(&ns, Backend::Nft);
        let mut argv = vec!["-n"];
        argv.extend_from_slice(args);
        let out = cli(&netns, &argv);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            istio::restore_input(cfg).to_string(),
            "{args:?}"
        );
        assert_eq!(
            snapshot(&ns, Backend::Nft),
            before,
            "dry run writes nothing"
        );
    }
    // Environment variables as istio reads them.
    let out = Command::new("ip")
        .args(["netns", "exec", netns.name()])
        .arg(tests::agent_bin())
        .args(["iptables", "-n", "-u", "1337", "--ipv6=false"])
        .env("ISTIO_SERVICE_CIDR", "*")
        .env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888")
        .env("ISTIO_META_DNS_CAPTURE", "true")
        .env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"),
        "{text}"
    );
    assert!(
        text.contains("-A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN\n"),
        "{text}"
    );
    assert!(
        text.contains("-A ISTIO_OUTPUT -d 127.0.0.1/8 -j RETURN\n"),
        "{text}"
    );
}

#[rstest]
#[case::legacy(Backend::Legacy, "legacy")]
#[case::nft(Backend::Nft, "nft")]
fn cli_install_twice_reconcile_and_cleanup(#[case] backend: Backend, #[case] name: &str) {
    require_root!();
    require_cli!();
    let topo = Topology::new();
    let ns = topo.pod.open();
    foreign_rules(&topo.pod, backend);
    let before = snapshot(&ns, backend);
    let be = format!("--iptables-backend={name}");
    // IPv6 detected from the pod's addresses (IPv4 only here).
    let install = [
        "-p",
        "15001",
        "-u",
        "4242",
        "-i",
        "*",
        "-b",
        "*",
        "-d",
        "15020",
        be.as_str(),
    ];

    let out = cli(&topo.pod, &install);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "logs go to stderr");
    let installed = snapshot(&ns, backend);
    assert_ne!(installed, before);
    let v6 = &installed[installed.find("## IPv6").unwrap()..];
    assert!(!v6.contains("ISTIO"), "IPv6 detected off: {v6}");

    // It captures.
    let proxy = proxy_listener(&ns);
    let target = SocketAddrV4::new(SRV_IP, 443);
    let _app = connect(&ns, target, None).expect("captured");
    let (accepted, peer) = proxy.accept().unwrap();
    assert_eq!(
        socket::original_dst(&accepted, peer).unwrap(),
        target.into()
    );

    let out = cli(&topo.pod, &install);
    assert!(out.status.success(), "same again: {}", stderr(&out));
    assert_eq!(snapshot(&ns, backend), installed, "same install is a no-op");

    let different = ["-u", "4242", "-i", "10.0.0.0/8", be.as_str()];
    let out = cli(&topo.pod, &different);
    assert!(!out.status.success(), "a different install must fail");
    assert!(stderr(&out).contains("--reconcile"), "{}", stderr(&out));
    assert_eq!(snapshot(&ns, backend), installed);

    let out = cli(&topo.pod, &[&different[..], &["--reconcile"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(snapshot(&ns, backend).contains("-d 10.0.0.0/8 -j ISTIO_REDIRECT"));

    let out = cli(&topo.pod, &[&different[..], &["--cleanup-only"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(snapshot(&ns, backend), before);
}

#[test]
fn cli_network_namespace_flag() {
    require_root!();
    require_cli!();
    let netns = TestNetns::new();
    let path = netns.path();
    let out = Command::new(tests::agent_bin())
        .args([
            "iptables",
            "-u",
            "4242",
            "-i",
            "*",
            "--ipv6=false",
            "--iptables-backend",
            "nft",
        ])
        .arg(format!("--network-namespace={}", path.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(snapshot(&netns.open(), Backend::Nft).contains("-A OUTPUT -j ISTIO_OUTPUT"));
}

#[test]
fn cli_bad_input_names_the_flag_and_writes_nothing() {
    require_root!();
    require_cli!();
    let netns = TestNetns::new();
    let ns = netns.open();
    let before = snapshot(&ns, Backend::Nft);
    let cases: &[(&[&str], &str)] = &[
        (&["-p", "0"], "--envoy-port"),
        (&["-p", "65536"], "--envoy-port"),
        (&["-z", "http"], "--inbound-capture-port"),
        (&["-i", "10.0.0.0/33"], "--istio-service-cidr"),
        (&["-x", "not-a-cidr"], "--istio-service-exclude-cidr"),
        (&["-m", "SPLICE"], "--istio-inbound-interception-mode"),
        (&["-u", "istio-proxy"], "--proxy-uid"),
        (&["-q", "1,2,99999"], "--istio-outbound-ports"),
        (&["--redirect-dns=maybe"], "--redirect-dns"),
        (&["--iptables-backend=iptables"], "--iptables-backend"),
    ];
    for (args, flag) in cases {
        let mut argv = args.to_vec();
        argv.push("--ipv6=false");
        if !flag.contains("backend") {
            argv.push("--iptables-backend=nft");
        }
        let out = cli(&netns, &argv);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr(&out).contains(flag), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    assert_eq!(snapshot(&ns, Backend::Nft), before, "nothing written");
}
