//! Node mode: one `mesh-redirect node` serving several pods (plain network
//! namespaces and cgroups here), enrolled and unenrolled over its socket
//! with `mesh-redirect enroll|unenroll|pods`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agent::inspect;
use agent::node::api::{self, Enrollment, Request};
use agent_common::Counter;
use rstest::rstest;
use tests::{
    Agent, InCgroup, PollStream, TestCgroup, TestNetns, Topology, agent_bin,
    agent_proc::run_to_end,
    dns::{self, DnsServer, NAME, ResolvConf, Transport},
    haproxy::Haproxy,
    looping::LoopingClient,
    node_pins,
    podman::Podman,
    remove_node_datapath, require_root,
    servers::{Behaviour, Server},
    topology::{POD_IP, POD_IP6, SRV_IP, lo_tx_packets, lo_tx_packets_in},
    unique,
};

/// Round trips per connection, for the loopback packet count.
const ROUND_TRIPS: u32 = 200;

/// A node agent on a socket of its own, attached at the cgroup2 root. A
/// stopped node agent leaves its pods enrolled (pinned): dropped, this one
/// is stopped and its datapath removed, as `cleanup` does.
struct Node {
    agent: Option<Agent>,
    socket: PathBuf,
    /// Its admin server, on the host.
    admin: SocketAddrV4,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(a) = self.agent.take() {
            let _ = a.stop_with(libc::SIGTERM);
        }
        remove_node_datapath(&self.socket);
    }
}

impl Node {
    fn start() -> Self {
        Self::start_on(
            std::env::temp_dir()
                .join(unique("mr-node"))
                .join("node.sock"),
        )
    }

    fn start_on(socket: PathBuf) -> Self {
        Self::start_with(socket, &[])
    }

    /// [`Self::start_on`] with more arguments.
    fn start_with(socket: PathBuf, more: &[&str]) -> Self {
        // A port of its own (a port 0 could not be scraped).
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let SocketAddr::V4(admin) = admin else {
            unreachable!("bound on 127.0.0.1")
        };
        let admin_arg = admin.to_string();
        let mut args = vec![
            "node",
            "--socket",
            socket.to_str().unwrap(),
            "--admin",
            &admin_arg,
        ];
        args.extend(more);
        let agent = Agent::start(&args, None, "info");
        assert!(
            agent.log_text().contains("role=\"node\""),
            "{}",
            agent.log_text()
        );
        Self {
            agent: Some(agent),
            socket,
            admin,
        }
    }

    /// Its `/metrics`.
    fn metrics(&self) -> String {
        let (code, text) = tests::admin::get_at(self.admin, "/metrics");
        assert_eq!(code, 200, "{text}");
        text
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("running")
    }

    /// Sends `signal` and waits for the agent to exit; its datapath stays.
    fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        self.agent.take().expect("running").stop_with(signal)
    }

    /// `mesh-redirect <command> --socket S <args> --json`, which must work;
    /// its JSON answer.
    fn ask(&self, command: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec![command, "--socket", self.socket.to_str().unwrap(), "--json"];
        all.extend(args);
        let out = run_to_end(&all);
        assert!(
            out.status.success(),
            "mesh-redirect {}: {}",
            all.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn enroll(&self, topo: &Topology, pod: &str) -> serde_json::Value {
        self.ask("enroll", &["--netns", topo.pod.path_str(), "--pod", pod])["enrolled"].clone()
    }

    /// Connections each pod's proxy accepted, by pod name (sorted).
    fn connections(&self) -> Vec<(String, u64)> {
        let pods = self.ask("pods", &[]);
        let mut v: Vec<(String, u64)> = pods["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["pod"].as_str().unwrap().to_owned(),
                    p["connections"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }
}

/// From inside `topo`'s pod (its namespace and cgroup): one connection to
/// `dst`, `ROUND_TRIPS` echoes of 64 bytes, each byte-exact. The loopback
/// packets the pod's namespace sent meanwhile, per round trip.
fn echo_from_pod(topo: &Topology, dst: SocketAddr) -> f64 {
    echo_in(&topo.pod, topo.cgroup.path(), dst, ROUND_TRIPS)
}

/// [`echo_from_pod`] from any namespace and cgroup, `round_trips` echoes.
fn echo_in(netns: &TestNetns, cgroup: &Path, dst: SocketAddr, round_trips: u32) -> f64 {
    let _in_pod = InCgroup::enter(cgroup);
    netns.run(|| {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
        let mut s = PollStream::new(s, Duration::from_secs(10)).unwrap();
        let mut buf = [0u8; 64];
        // The first exchange sets the connection up (both halves in the
        // SOCKHASH); the count starts after it.
        s.write_all(&[0xa5; 64]).unwrap();
        s.read_exact(&mut buf).unwrap();
        let before = lo_tx_packets();
        for i in 0..round_trips {
            let msg = [u8::try_from(i % 251).unwrap(); 64];
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf).unwrap();
            assert_eq!(buf, msg, "round trip {i}: not byte-exact");
        }
        let packets = lo_tx_packets() - before;
        f64::from(u32::try_from(packets).unwrap()) / f64::from(round_trips)
    })
}

/// Ours, attached on the cgroup2 root, sorted.
fn ours_on_root() -> Vec<String> {
    let root = agent::cgroup::cgroup2_root().unwrap();
    let mut ours: Vec<String> = inspect::attached(&root)
        .unwrap()
        .into_iter()
        .filter(|p| p.ours)
        .map(|p| p.name)
        .collect();
    ours.sort();
    ours
}

#[rstest]
fn one_node_agent_serves_each_enrolled_pod_through_its_own_proxy_and_nothing_else() {
    require_root!();
    let (a, b, outside) = (Topology::new(), Topology::new(), Topology::new());
    let echo =
        |t: &Topology| Server::start(&t.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let (echo_a, echo_b, echo_out) = (echo(&a), echo(&b), echo(&outside));
    let node = Node::start();
    assert!(!ours_on_root().is_empty(), "the hooks attach at the root");
    let enrolled_a = node.enroll(&a, "default/a");
    let enrolled_b = node.enroll(&b, "default/b");
    assert_ne!(enrolled_a["netns_cookie"], enrolled_b["netns_cookie"]);
    // Enrolling again is idempotent: the same pod, nothing added.
    assert_eq!(
        node.enroll(&a, "default/a")["netns_cookie"],
        enrolled_a["netns_cookie"]
    );
    assert_eq!(
        node.connections(),
        vec![("default/a".to_owned(), 0), ("default/b".to_owned(), 0)]
    );

    let short_circuit = node.agent().short_circuits() != "none";
    let lo_a = echo_from_pod(&a, echo_a.addr);
    assert_eq!(
        node.connections(),
        vec![("default/a".to_owned(), 1), ("default/b".to_owned(), 0)],
        "pod A's connection went through pod A's proxy only"
    );
    let lo_b = echo_from_pod(&b, echo_b.addr);
    assert_eq!(
        node.connections(),
        vec![("default/a".to_owned(), 1), ("default/b".to_owned(), 1)]
    );
    eprintln!("loopback packets per round trip: pod A {lo_a:.2}, pod B {lo_b:.2}");
    if short_circuit {
        for (pod, lo) in [("A", lo_a), ("B", lo_b)] {
            assert!(
                lo < 0.1,
                "pod {pod}: {lo:.2} loopback packets per round trip: not short-circuited"
            );
        }
    }
    // The proxy's upstream leaves from the pod: the server sees the pod.
    assert_eq!(echo_a.peers().len(), 1);
    assert_eq!(echo_b.peers().len(), 1);

    // A namespace that is not enrolled, and the host, go direct.
    let lo_out = echo_from_pod(&outside, echo_out.addr);
    assert!(
        lo_out < 0.01,
        "an unenrolled pod used loopback: {lo_out:.2}"
    );
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_addr = host.local_addr().unwrap();
    let c = TcpStream::connect(host_addr).unwrap();
    let (s, peer) = host.accept().unwrap();
    assert_eq!(
        peer,
        c.local_addr().unwrap(),
        "the host's connect went direct"
    );
    drop((c, s));
    assert_eq!(
        node.connections(),
        vec![("default/a".to_owned(), 1), ("default/b".to_owned(), 1)],
        "neither the unenrolled pod nor the host was captured"
    );
    // The node's admin server: each pod's proxy labelled by pod.
    assert_eq!(tests::admin::get_at(node.admin, "/ready").0, 200);
    let text = node.metrics();
    for pod in ["default/a", "default/b"] {
        let series = format!(
            "mesh_redirect_proxy_connections_total{{pod=\"{pod}\",direction=\"outbound\"}}"
        );
        assert_eq!(tests::admin::metric(&text, &series), Some(1), "{text}");
    }
    assert_eq!(
        tests::admin::metric(&text, "mesh_redirect_node_pods{proxy=\"builtin\"}"),
        Some(2),
        "{text}"
    );

    // Unenrolled, pod A goes direct; pod B is still served.
    let gone = node.ask("unenroll", &["--netns", a.pod.path_str()]);
    assert_eq!(gone["unenrolled"]["pod"], "default/a");
    let again = node.ask("unenroll", &["--netns", a.pod.path_str()]);
    assert!(
        again["unenrolled"].is_null(),
        "an unknown pod is not an error"
    );
    let lo_a = echo_from_pod(&a, echo_a.addr);
    assert!(lo_a < 0.01, "an unenrolled pod used loopback: {lo_a:.2}");
    echo_from_pod(&b, echo_b.addr);
    assert_eq!(node.connections(), vec![("default/b".to_owned(), 2)]);
    let text = node.metrics();
    assert!(
        !text.contains("pod=\"default/a\""),
        "an unenrolled pod's series go: {text}"
    );
    assert_eq!(
        tests::admin::metric(&text, "mesh_redirect_node_pods{proxy=\"builtin\"}"),
        Some(1)
    );

    let mut node = node;
    assert!(node.stop_with(libc::SIGTERM).success());
    assert!(!node.socket.exists(), "the socket file goes");
    // A stopped node agent leaves its pods captured for the next one;
    // `cleanup` removes everything once none is coming.
    assert!(!ours_on_root().is_empty(), "the pods stay enrolled");
    let out = run_to_end(&[
        "cleanup",
        "--control-dir",
        node.socket.parent().unwrap().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ours_on_root().is_empty(), "cleanup detaches everything");
    assert!(
        !node.socket.with_file_name(api::STATE_NAME).exists(),
        "and forgets the pods"
    );
}

/// One echo exchange from `from` (not enrolled) to `dst`: byte-exact, or
/// the connect's error.
fn exchange_from(from: &TestNetns, dst: SocketAddr) -> std::io::Result<()> {
    from.run(|| {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        let mut s = PollStream::new(s, Duration::from_secs(10))?;
        let mut buf = [0u8; 64];
        s.write_all(&[0x5a; 64])?;
        s.read_exact(&mut buf)?;
        assert_eq!(buf, [0x5a; 64], "not byte-exact");
        Ok(())
    })
}

/// The sk_lookup programs attached to `netns`.
fn sk_lookup_on(netns: &TestNetns) -> Vec<String> {
    let ns = std::fs::File::open(netns.path()).unwrap();
    agent::ebpf::attach::attached(&ns, [agent::ebpf::Hook::SkLookup])
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// Inbound: each enrolled pod's incoming connections reach its own
/// proxy's inbound listener, though every pod here has the same address
/// (each namespace gets an sk_lookup instance of its own); IPv6 too, from
/// the `::6` passthrough source. A pod that opts out of inbound capture
/// (istio's `includeInboundPorts: ""`) and a pod that is not enrolled
/// are left alone; while the node agent is down a pod's
/// inbound connections are refused (as iptables REDIRECT to a closed port
/// would), and the next agent serves them again with one program attached.
#[rstest]
fn each_pod_receives_its_inbound_connections_through_its_own_proxy() {
    require_root!();
    let (a, b, opted_out, outside) = (
        Topology::dual_stack(),
        Topology::new(),
        Topology::new(),
        Topology::new(),
    );
    let app = |t: &Topology| {
        Server::start(
            &t.pod,
            std::net::Ipv6Addr::UNSPECIFIED,
            8080,
            Behaviour::Echo { write_size: 64 },
        )
    };
    let apps = [app(&a), app(&b), app(&opted_out), app(&outside)];
    let v4 = SocketAddr::from((POD_IP, 8080));
    let v6 = SocketAddr::from((POD_IP6, 8080));
    let node = Node::start();
    node.enroll(&a, "default/a");
    node.enroll(&b, "default/b");
    let enrolled = node.ask(
        "enroll",
        &[
            "--netns",
            opted_out.pod.path_str(),
            "--pod",
            "default/opted-out",
            "-b",
            "",
        ],
    )["enrolled"]
        .clone();
    assert!(enrolled["inbound_port"].is_null(), "{enrolled}");
    assert_eq!(sk_lookup_on(&a.pod), vec!["mesh_sk_lookup".to_owned()]);
    assert_eq!(sk_lookup_on(&b.pod), vec!["mesh_sk_lookup".to_owned()]);
    assert!(sk_lookup_on(&opted_out.pod).is_empty());
    assert!(sk_lookup_on(&outside.pod).is_empty());

    for t in [&a, &b, &opted_out, &outside] {
        exchange_from(&t.srv, v4).unwrap();
    }
    exchange_from(&a.srv, v6).unwrap();
    assert_eq!(
        node.connections(),
        vec![
            ("default/a".to_owned(), 2),
            ("default/b".to_owned(), 1),
            ("default/opted-out".to_owned(), 0),
        ],
        "each pod's inbound connections reached its own proxy only"
    );
    let peers: Vec<Vec<std::net::IpAddr>> = apps
        .iter()
        .map(|s| s.peers().iter().map(|p| p.ip().to_canonical()).collect())
        .collect();
    let (passthrough, passthrough6) = (
        std::net::IpAddr::from(agent_common::INBOUND_PASSTHROUGH_SRC),
        std::net::IpAddr::from(agent_common::INBOUND_PASSTHROUGH_SRC_V6),
    );
    assert_eq!(
        peers[0],
        vec![passthrough, passthrough6],
        "pod A's app, through its proxy"
    );
    assert_eq!(
        peers[1],
        vec![passthrough],
        "pod B's app, through its proxy"
    );
    let srv = std::net::IpAddr::from(SRV_IP);
    assert_eq!(peers[2], vec![srv], "the pod that opted out: direct");
    assert_eq!(peers[3], vec![srv], "the unenrolled pod: direct");
    let text = node.metrics();
    let inbound = |pod: &str| {
        tests::admin::metric(
            &text,
            &format!(
                "mesh_redirect_proxy_connections_total{{pod=\"{pod}\",direction=\"inbound\"}}"
            ),
        )
    };
    assert_eq!(
        (inbound("default/a"), inbound("default/b")),
        (Some(2), Some(1)),
        "{text}"
    );

    // Unenrolled, pod B's program goes and its app is reached directly.
    node.ask("unenroll", &["--netns", b.pod.path_str()]);
    assert!(
        sk_lookup_on(&b.pod).is_empty(),
        "pod B's sk_lookup detached"
    );
    exchange_from(&b.srv, v4).unwrap();
    assert_eq!(
        apps[1].peers().last().map(|p| p.ip().to_canonical()),
        Some(srv)
    );

    // Down, pod A's inbound connections are refused; the next agent
    // serves them again, on the same single program.
    let mut node = node;
    node.stop_with(libc::SIGKILL);
    let refused = exchange_from(&a.srv, v4).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    let node = Node::start_on(node.socket.clone());
    assert_eq!(sk_lookup_on(&a.pod), vec!["mesh_sk_lookup".to_owned()]);
    exchange_from(&a.srv, v4).unwrap();
    exchange_from(&a.srv, v6).unwrap();
    assert_eq!(
        node.connections(),
        vec![
            ("default/a".to_owned(), 2),
            ("default/opted-out".to_owned(), 0)
        ]
    );
    assert_eq!(pod_links().len(), 1, "one pinned link: pod A's");
    let passthrough_on_lo = || a.pod.sh("ip -6 -o addr show dev lo").contains(" ::6/128 ");
    assert!(
        passthrough_on_lo(),
        "the IPv6 passthrough source is on pod A's lo"
    );
    node.ask("unenroll", &["--netns", a.pod.path_str()]);
    assert!(!passthrough_on_lo(), "and goes with the pod's enrollment");
    assert!(pod_links().is_empty());
}

/// DNS in node mode, istio's way: a pod enrolled with DNS capture has its
/// queries to its resolver (connected and unconnected UDP, TCP) answered
/// by the DNS proxy it runs, the replies from the resolver's address; the
/// DNS proxy's own queries (its uid) reach the resolver; a pod enrolled
/// without it is left alone. The DNS hooks attach with the first such pod;
/// DNS capture without a resolver is refused by name.
#[rstest]
fn a_pod_enrolled_with_dns_capture_has_its_queries_answered_by_its_dns_proxy() {
    require_root!();
    let (with, without) = (Topology::new(), Topology::new());
    let resolver = |t: &Topology| {
        DnsServer::start(
            &t.srv,
            None,
            None,
            "resolver",
            ("192.0.2.1", "2001:db8::1"),
            &[&format!("{SRV_IP}:53")],
        )
    };
    let (resolver_with, _resolver_without) = (resolver(&with), resolver(&without));
    let proxy = DnsServer::start(
        &with.pod,
        None,
        Some(1337),
        "proxy",
        ("192.0.2.53", "2001:db8::53"),
        &["127.0.0.1:15053", "[::1]:15053"],
    );
    let _resolv_conf = ResolvConf::write(&with.pod, &format!("nameserver {SRV_IP}\n"));
    let node = Node::start();
    let dns_hooks = || {
        ours_on_root()
            .into_iter()
            .filter(|n| n.starts_with("mesh_sendmsg") || n.starts_with("mesh_recvmsg"))
            .count()
    };
    assert_eq!(dns_hooks(), 0, "no pod asked for DNS capture yet");
    let refused = run_to_end(&[
        "enroll",
        "--socket",
        node.socket.to_str().unwrap(),
        "--netns",
        with.pod.path_str(),
        "--redirect-dns",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("name the pod's resolvers"), "{err}");
    assert!(node.connections().is_empty(), "nothing enrolled: {err}");

    node.enroll(&without, "default/without");
    let enrolled = node.ask(
        "enroll",
        &[
            "--netns",
            with.pod.path_str(),
            "--pod",
            "default/with",
            "--redirect-dns",
            "--dns-servers",
            &SRV_IP.to_string(),
            "--dns-proxy-uid",
            "1337",
        ],
    )["enrolled"]
        .clone();
    assert_eq!(
        enrolled["dns"]["servers"][0],
        SRV_IP.to_string(),
        "{enrolled}"
    );
    assert_eq!(dns_hooks(), 4, "sendmsg and recvmsg, both families");
    let resolver_addr = SocketAddr::from((SRV_IP, 53));
    for (i, transport) in [
        Transport::ConnectedUdp,
        Transport::UnconnectedUdp,
        Transport::Tcp,
    ]
    .into_iter()
    .enumerate()
    {
        let id = u16::try_from(i).unwrap() + 1;
        let (answer, from) = with.pod.run(|| dns::ask(resolver_addr, transport, id));
        assert_eq!(
            answer,
            Ipv4Addr::new(192, 0, 2, 53),
            "{transport:?}: by the DNS proxy"
        );
        assert_eq!(
            from, resolver_addr,
            "{transport:?}: the reply is the resolver's"
        );
        let (answer, _) = without.pod.run(|| dns::ask(resolver_addr, transport, id));
        assert_eq!(
            answer,
            Ipv4Addr::new(192, 0, 2, 1),
            "{transport:?}: not captured"
        );
    }
    assert_eq!(proxy.queries().len(), 3, "{:?}", proxy.queries());
    assert!(
        resolver_with.queries().is_empty(),
        "{:?}",
        resolver_with.queries()
    );
    // The DNS proxy's own queries reach the resolver.
    let out = dns::python_query(&with.pod, Some(1337), &["getaddrinfo", NAME])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("192.0.2.1"), "{text}");
    assert!(!resolver_with.queries().is_empty());
    // Unenrolled, the pod asks its resolver again.
    node.ask("unenroll", &["--netns", with.pod.path_str()]);
    let (answer, _) = with
        .pod
        .run(|| dns::ask(resolver_addr, Transport::UnconnectedUdp, 9));
    assert_eq!(answer, Ipv4Addr::new(192, 0, 2, 1));
}

#[rstest]
fn only_root_may_talk_to_the_node_agent() {
    require_root!();
    let node = Node::start();
    // Even with the file's mode opened up, the caller's credentials decide.
    let dir = node.socket.parent().unwrap();
    for (path, mode) in [(dir, 0o755), (node.socket.as_path(), 0o666)] {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = Command::new(agent_bin())
        .args(["pods", "--socket", node.socket.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("only root may talk to the node agent (caller uid 65534)"),
        "{stderr}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        node.agent().log_text().contains("refused: only root"),
        "the refusal is logged:\n{}",
        node.agent().log_text()
    );
    assert!(node.ask("pods", &[])["pods"].as_array().unwrap().is_empty());
}

#[rstest]
#[case::missing_netns(&["enroll", "--netns", "/nonexistent/netns"], "netns /nonexistent/netns")]
#[case::bad_rule(&["enroll", "--netns", "/proc/self/ns/net", "-o", "99999"], "-o/--outbound-ports-exclude")]
fn bad_enrollments_are_refused_by_name_and_leave_nothing(
    #[case] args: &[&str],
    #[case] names: &str,
) {
    require_root!();
    let node = Node::start();
    let mut all = args.to_vec();
    all.extend(["--socket", node.socket.to_str().unwrap()]);
    let out = run_to_end(&all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(names), "names {names}: {stderr}");
    assert!(node.ask("pods", &[])["pods"].as_array().unwrap().is_empty());
}

#[rstest]
fn a_malformed_request_gets_an_error_naming_it() {
    use std::io::BufRead as _;
    require_root!();
    let node = Node::start();
    let mut s = std::os::unix::net::UnixStream::connect(&node.socket).unwrap();
    s.write_all(b"{\"op\":\"enrol\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("unreadable request"), "{line}");
    assert!(line.contains("enrol"), "{line}");
    assert!(node.ask("pods", &[])["pods"].as_array().unwrap().is_empty());
}

/// Runs the CNI plugin (`mesh-redirect cni`) as a runtime does; its stdout
/// as JSON (`Null` when empty) and whether it succeeded.
fn cni(
    command: &str,
    container: &str,
    netns: &str,
    args: &str,
    config: &serde_json::Value,
) -> (serde_json::Value, bool) {
    use std::process::Stdio;
    let mut child = Command::new(agent_bin())
        .arg("cni")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = if stdout.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    (value, out.status.success())
}

fn cni_config(socket: &std::path::Path, extra: &serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "podman",
        "type": "mesh-redirect",
        "socket": socket,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.77.0.1/24", "interface": 0}],
        },
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[rstest]
fn the_cni_plugin_enrolls_on_add_checks_and_removes_on_del() {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let node = Node::start();
    let config = cni_config(&node.socket, &serde_json::json!({}));
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1";
    let netns = topo.pod.path_str();
    for _ in 0..2 {
        let (out, ok) = cni("ADD", "sandbox-1", netns, args, &config);
        assert!(ok, "{out}");
        assert_eq!(
            out, config["prevResult"],
            "prevResult passes through unchanged"
        );
    }
    assert_eq!(node.connections(), vec![("default/web-1".to_owned(), 0)]);
    echo_from_pod(&topo, echo.addr);
    assert_eq!(
        node.connections(),
        vec![("default/web-1".to_owned(), 1)],
        "the pod's first connection is captured"
    );
    let (out, ok) = cni("CHECK", "sandbox-1", netns, args, &config);
    assert!(ok, "{out}");
    // Removed behind the plugin's back: CHECK says so.
    node.ask("unenroll", &["--container-id", "sandbox-1"]);
    let (out, ok) = cni("CHECK", "sandbox-1", netns, args, &config);
    assert!(!ok);
    assert_eq!(out["code"], 3, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("sandbox-1"), "{out}");
    cni("ADD", "sandbox-1", netns, args, &config);
    // DEL of a container never enrolled succeeds, as the spec says.
    let (out, ok) = cni("DEL", "never-seen", "", args, &config);
    assert!(ok, "{out}");
    let (out, ok) = cni("DEL", "sandbox-1", "", args, &config);
    assert!(ok, "{out}");
    assert!(node.connections().is_empty());
    // Malformed input: an error result with a code and a message.
    let mut child_cfg = config.clone();
    child_cfg["cniVersion"] = serde_json::json!(42);
    let (out, ok) = cni("ADD", "sandbox-2", netns, args, &child_cfg);
    assert!(!ok);
    assert_eq!(out["code"], 6, "{out}");
    assert!(!out["msg"].as_str().unwrap().is_empty());
    assert!(node.connections().is_empty(), "nothing half-enrolled");
    // An opted-out pod is left alone.
    let (out, ok) = cni(
        "ADD",
        "sandbox-3",
        netns,
        &format!("{args};MESH_REDIRECT=off"),
        &config,
    );
    assert!(ok, "{out}");
    assert!(node.connections().is_empty());
}

#[rstest]
fn with_the_node_agent_down_add_fails_closed_or_the_pod_is_enrolled_when_it_returns() {
    require_root!();
    let topo = Topology::new();
    let dir = std::env::temp_dir().join(unique("mr-node-down"));
    let socket = dir.join("node.sock");
    let pending = dir.join("pending");
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=late";
    let closed = cni_config(&socket, &serde_json::json!({}));
    let (out, ok) = cni("ADD", "sandbox-late", topo.pod.path_str(), args, &closed);
    assert!(!ok, "fail closed by default: {out}");
    assert_eq!(out["code"], 11, "{out}");
    let open = cni_config(
        &socket,
        &serde_json::json!({"failPolicy": "open", "pendingDir": pending}),
    );
    let (out, ok) = cni("ADD", "sandbox-late", topo.pod.path_str(), args, &open);
    assert!(ok, "fail open: the pod starts: {out}");
    let node = Node::start_with(socket, &["--pending-dir", pending.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while node.connections().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued pod was not enrolled:\n{}",
            node.agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(node.connections(), vec![("default/late".to_owned(), 0)]);
    assert_eq!(std::fs::read_dir(&pending).unwrap().count(), 0);
}

#[rstest]
fn a_pod_whose_namespace_disappears_is_unenrolled_without_a_del() {
    require_root!();
    let node = Node::start();
    let name = unique("mrgc");
    tests::sh(&format!(
        "ip netns add {name} && ip -n {name} link set lo up"
    ));
    let path = format!("/var/run/netns/{name}");
    node.ask("enroll", &["--netns", &path, "--pod", "default/gone"]);
    assert_eq!(node.connections().len(), 1);
    tests::sh(&format!("ip netns del {name}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !node.connections().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still enrolled:\n{}",
            node.agent().log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        node.agent()
            .log_text()
            .contains("the pod's namespace is gone")
    );
}

#[rstest]
fn after_a_sigkill_pods_stay_captured_and_a_new_node_agent_readopts_them() {
    require_root!();
    let (a, b) = (Topology::new(), Topology::new());
    let echo =
        |t: &Topology| Server::start(&t.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let (echo_a, echo_b) = (echo(&a), echo(&b));
    let node = Node::start();
    let hooks = ours_on_root();
    node.enroll(&a, "default/a");
    node.enroll(&b, "default/b");
    echo_from_pod(&a, echo_a.addr);
    let mut node = node;
    let _ = node.stop_with(libc::SIGKILL);
    // Down: the pinned hooks still capture, and with no proxy listening the
    // connect is refused. Nothing goes around the mesh.
    let refused = {
        let _in_pod = a.enter_pod_cgroup();
        a.pod
            .run(|| TcpStream::connect_timeout(&echo_a.addr, Duration::from_secs(5)))
            .unwrap_err()
    };
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    assert_eq!(
        echo_a.peers().len(),
        1,
        "no connection reached the server directly"
    );

    let node = Node::start_on(node.socket.clone());
    let log = node.agent().log_text();
    assert!(log.contains("adopting the pinned datapath"), "{log}");
    assert_eq!(log.matches("re-adopted a pod").count(), 2, "{log}");
    assert_eq!(
        node.connections(),
        vec![("default/a".to_owned(), 0), ("default/b".to_owned(), 0)]
    );
    let short_circuit = node.agent().short_circuits() != "none";
    for (t, e) in [(&a, &echo_a), (&b, &echo_b)] {
        let lo = echo_from_pod(t, e.addr);
        if short_circuit {
            assert!(
                lo < 0.1,
                "{lo:.2} loopback packets per round trip after the restart"
            );
        }
    }
    assert_eq!(
        node.connections(),
        vec![("default/a".to_owned(), 1), ("default/b".to_owned(), 1)]
    );
    assert_eq!(
        ours_on_root(),
        hooks,
        "the same hooks, once each: no duplicate links"
    );
    // A planned restart (SIGTERM, as a DaemonSet rollout sends) is the
    // same: the pods stay enrolled and the next agent re-adopts them.
    let mut node = node;
    assert!(node.stop_with(libc::SIGTERM).success());
    let node = Node::start_on(node.socket.clone());
    assert_eq!(
        node.agent().log_text().matches("re-adopted a pod").count(),
        2,
        "{}",
        node.agent().log_text()
    );
    echo_from_pod(&a, echo_a.addr);
    assert_eq!(ours_on_root(), hooks);
}

/// An upgrade of the node agent, the new one started while the old one
/// serves (a `DaemonSet` with `maxSurge`): the old one hands every pod's
/// listening sockets over, so a client looping on connects in each pod
/// sees no refused or failed connection; the old agent exits by itself and
/// the new one serves every pod, with each hook attached once. A successor
/// that fails halfway leaves the old one serving.
#[rstest]
fn a_new_node_agent_takes_over_without_refusing_a_connection() {
    require_root!();
    let (a, b) = (Topology::new(), Topology::new());
    let echo =
        |t: &Topology| Server::start(&t.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let (echo_a, echo_b) = (echo(&a), echo(&b));
    let mut old = Node::start();
    let hooks = ours_on_root();
    old.enroll(&a, "default/a");
    old.enroll(&b, "default/b");
    let clients = [
        LoopingClient::start(&a.pod, echo_a.addr),
        LoopingClient::start(&b.pod, echo_b.addr),
    ];
    let wait_for = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let at: Vec<u64> = clients.iter().map(LoopingClient::ok).collect();
        while clients.iter().zip(&at).any(|(c, at)| c.ok() < at + n) {
            assert!(std::time::Instant::now() < deadline, "the clients stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(20);
    // A successor that fails after it got the sockets (here: a bpffs that
    // is a plain file) leaves the old agent serving, enrollments included.
    let not_bpffs = old.socket.with_file_name("not-a-bpffs");
    std::fs::write(&not_bpffs, b"").unwrap();
    let failed = run_to_end(&[
        "node",
        "--socket",
        old.socket.to_str().unwrap(),
        "--no-admin",
        "--bpffs",
        not_bpffs.to_str().unwrap(),
    ]);
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("--bpffs"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    wait_for(20);
    old.enroll(&a, "default/a");
    let new = Node::start_on(old.socket.clone());
    let status = old
        .agent
        .take()
        .expect("running")
        .wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the old agent exits by itself: {status}");
    let log = new.agent().log_text();
    assert!(
        log.contains("took over from the running node agent"),
        "{log}"
    );
    assert_eq!(log.matches("re-adopted a pod").count(), 2, "{log}");
    // Served by the new agent alone now.
    wait_for(20);
    let served = new.connections();
    for [worked, failed] in clients.map(|c| {
        let (w, f) = c.stop();
        [w, f]
    }) {
        assert_eq!(
            failed, 0,
            "{failed} connections failed across the upgrade ({worked} worked)"
        );
    }
    assert!(
        served.iter().all(|(_, n)| *n > 0),
        "each pod's connections reach the new agent's proxies: {served:?}"
    );
    assert_eq!(ours_on_root(), hooks, "the same hooks, once each");
    assert!(new.socket.exists(), "the socket is the new agent's");
}

/// SIGKILL of the node agent while 10 pods, each running its own proxy
/// (HAProxy as uid 1337, enrolled with `--external-proxy`), transfer: every
/// transfer completes byte-exact, as the pinned datapath and the pods'
/// proxies carry on without the agent; the next agent re-adopts every pod
/// with each hook attached once, and their connects are still captured.
#[rstest]
fn a_sigkilled_node_agent_loses_no_byte_of_ten_pods_with_their_own_proxies() {
    const PODS: usize = 10;
    require_root!();
    let farm = Farm::new();
    let bulk = Server::start(
        &farm.srv,
        FARM_SRV,
        9002,
        Behaviour::Echo {
            write_size: 16 * 1024,
        },
    );
    let node = Node::start();
    let hooks = ours_on_root();
    let pods: Vec<TestNetns> = (0..PODS).map(|i| farm.pod(i)).collect();
    for (i, ns) in pods.iter().enumerate() {
        let enrolled = node.ask(
            "enroll",
            &[
                "--netns",
                ns.path_str(),
                "--pod",
                &format!("default/t{i}"),
                "--external-proxy",
                "--proxy-uid",
                "1337",
            ],
        );
        assert_eq!(enrolled["enrolled"]["external_proxy"]["uid"], 1337);
    }
    let _proxies: Vec<Haproxy> = pods
        .iter()
        .map(|ns| Haproxy::start_in(ns, farm.cgroup.path()))
        .collect();
    let counter = |c: Counter| {
        inspect::snapshot_from_pins(&node_pins())
            .unwrap()
            .counter(c)
    };
    let redirected = counter(Counter::ConnectRedirected);
    let _in_pods = InCgroup::enter(farm.cgroup.path());
    let transfers: Vec<_> = pods
        .iter()
        .map(|ns| {
            let s = ns
                .run(|| TcpStream::connect_timeout(&bulk.addr, Duration::from_secs(5)))
                .unwrap();
            let mut s = PollStream::new(s, Duration::from_secs(30)).unwrap();
            std::thread::spawn(move || {
                tests::transfer::echo_round_trip(&mut s, tests::bulk_bytes(32 << 20), 16 * 1024)
            })
        })
        .collect();
    assert_eq!(
        counter(Counter::ConnectRedirected) - redirected,
        PODS as u64,
        "each pod's connect was captured"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        transfers.iter().all(|t| !t.is_finished()),
        "every transfer is still running when the agent is killed"
    );
    let mut node = node;
    let _ = node.stop_with(libc::SIGKILL);
    for t in transfers {
        let sent = t.join().expect("a transfer survives the SIGKILL");
        assert!(
            bulk.seen.lock().unwrap().received_sha256.contains(&sent),
            "byte-exact"
        );
    }
    assert_eq!(bulk.peers().len(), PODS, "one upstream connection per pod");

    let node = Node::start_on(node.socket.clone());
    let log = node.agent().log_text();
    assert_eq!(log.matches("re-adopted a pod").count(), PODS, "{log}");
    assert_eq!(
        ours_on_root(),
        hooks,
        "the same hooks, once each: no duplicate links"
    );
    let listed = node.ask("pods", &[]);
    let listed = listed["pods"].as_array().unwrap();
    assert_eq!(listed.len(), PODS);
    assert!(listed.iter().all(|p| p["external_proxy"]["uid"] == 1337));
    assert_eq!(
        tests::admin::metric(
            &node.metrics(),
            "mesh_redirect_node_pods{proxy=\"external\"}"
        ),
        Some(PODS as u64)
    );
    let redirected = counter(Counter::ConnectRedirected);
    for ns in &pods {
        echo_in(ns, farm.cgroup.path(), farm.echo.addr, 1);
    }
    assert_eq!(
        counter(Counter::ConnectRedirected) - redirected,
        PODS as u64,
        "every pod is captured after the restart"
    );
}

/// Pods on one bridge: a server namespace with `br0` (10.99.255.254/16)
/// and an echo server on it; each pod a namespace with a veth on the
/// bridge, 10.99.x.y/16, routed via the server.
struct Farm {
    srv: TestNetns,
    echo: Server,
    cgroup: TestCgroup,
    /// Veth names on the bridge are never reused (a gone pod's may linger).
    links: std::sync::atomic::AtomicUsize,
}

const FARM_SRV: Ipv4Addr = Ipv4Addr::new(10, 99, 255, 254);

impl Farm {
    fn new() -> Self {
        let srv = TestNetns::new();
        srv.sh(&format!(
            "ip link add br0 type bridge && ip addr add {FARM_SRV}/16 dev br0 && ip link set br0 up"
        ));
        let echo = Server::start(&srv, FARM_SRV, 9000, Behaviour::Echo { write_size: 64 });
        Self {
            srv,
            echo,
            cgroup: TestCgroup::new(),
            links: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Pod `i`'s namespace, on the bridge as 10.99.(i/250).(i%250+1).
    fn pod(&self, i: usize) -> TestNetns {
        let ns = TestNetns::new();
        let link = self
            .links
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ip = Ipv4Addr::new(
            10,
            99,
            u8::try_from(i / 250).unwrap(),
            u8::try_from(i % 250 + 1).unwrap(),
        );
        tests::sh(&format!(
            "ip -n {p} link add a0 type veth peer name v{link} netns {s} && \
             ip -n {s} link set v{link} master br0 && ip -n {s} link set v{link} up && \
             ip -n {p} addr add {ip}/16 dev a0 && ip -n {p} link set a0 up && \
             ip -n {p} route add default via {FARM_SRV}",
            p = ns.name(),
            s = self.srv.name()
        ));
        ns
    }
}

/// Kubernetes' default maximum per node: 110 pods on one node agent, each
/// captured and short-circuited through its own proxy, the agent's
/// descriptors linear in the pods. (Enroll latency and memory per pod are
/// the benchmark's: `cargo xtask bench`.)
#[rstest]
fn one_node_agent_serves_110_pods() {
    const PODS: usize = 110;
    require_root!();
    tests::raise_fd_limit();
    let farm = Farm::new();
    let node = Node::start();
    let pid = node.agent().pid();
    let (rss0, fds0) = tests::agent_footprint(pid);
    let mut pods = Vec::new();
    for i in 0..PODS {
        let ns = farm.pod(i);
        api::ask(
            &node.socket,
            &Request::Enroll(Box::new(Enrollment {
                netns: ns.path(),
                pod: Some(format!("default/p{i:03}")),
                ..Enrollment::default()
            })),
        )
        .unwrap();
        pods.push(ns);
    }
    let (rss1, fds1) = tests::agent_footprint(pid);
    let short_circuit = node.agent().short_circuits() != "none";
    let lo: Vec<f64> = pods
        .iter()
        .map(|ns| echo_in(ns, farm.cgroup.path(), farm.echo.addr, 20))
        .collect();
    let worst = lo.iter().copied().fold(0f64, f64::max);
    let connections = node.connections();
    assert_eq!(connections.len(), PODS);
    assert!(
        connections.iter().all(|(_, n)| *n == 1),
        "each pod's connection went through its own proxy: {connections:?}"
    );
    assert_eq!(farm.echo.peers().len(), PODS);
    #[expect(clippy::cast_precision_loss, reason = "a report")]
    let per_pod_kib = rss1.saturating_sub(rss0) as f64 / PODS as f64;
    #[expect(clippy::cast_precision_loss, reason = "a report")]
    let fds_per_pod = (fds1 - fds0) as f64 / PODS as f64;
    eprintln!(
        "{PODS} pods: agent RSS {rss0} -> {rss1} KiB ({per_pod_kib:.0} KiB per pod); \
         descriptors {fds0} -> {fds1} ({fds_per_pod:.1} per pod); worst loopback packets per round trip {worst:.2}"
    );
    if short_circuit {
        let missed: Vec<(usize, f64)> = lo
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, l)| *l >= 0.1)
            .collect();
        assert!(
            missed.is_empty(),
            "{} pod(s) not short-circuited (pod, loopback packets per round trip): {missed:?}; \
             datapath counters {:?}",
            missed.len(),
            inspect::snapshot_from_pins(&node_pins()).map(|s| s.counters)
        );
    }
    // Memory is a figure to report here, not a gate; descriptors are not a
    // speed: a pod's cost must not grow with the number of pods (each proxy
    // worker's table holds its own pod's listeners and runtime, nothing of
    // the others).
    assert!(
        fds_per_pod < 24.0,
        "descriptors {fds0} -> {fds1}: {fds_per_pod:.1} per pod"
    );
}

/// 200 pod create/delete cycles, addresses reused: a connection always
/// reaches the destination it asked for (the original destination is never
/// a stale one), and the maps are back to where they started.
#[rstest]
fn pod_churn_never_returns_a_stale_destination_and_leaves_the_maps_as_they_were() {
    const CYCLES: usize = 200;
    require_root!();
    let farm = Farm::new();
    // A second server on the bridge, on another port: half the cycles go there.
    let other = Server::start(
        &farm.srv,
        FARM_SRV,
        9001,
        Behaviour::Echo { write_size: 64 },
    );
    let node = Node::start();
    let maps = node_map_usage;
    let before = maps();
    let pid = node.agent().pid();
    let (_, fds_before) = tests::agent_footprint(pid);
    for i in 0..CYCLES {
        // The same address every cycle (pod 0 of the bridge).
        let ns = farm.pod(0);
        node.ask(
            "enroll",
            &["--netns", ns.path_str(), "--pod", "default/churn"],
        );
        let dst = if i % 2 == 0 {
            farm.echo.addr
        } else {
            other.addr
        };
        echo_in(&ns, farm.cgroup.path(), dst, 1);
        node.ask("unenroll", &["--netns", ns.path_str()]);
        drop(ns);
    }
    assert_eq!(
        farm.echo.peers().len(),
        CYCLES / 2,
        "every connection reached the server it asked for"
    );
    assert_eq!(other.peers().len(), CYCLES / 2);
    assert!(node.connections().is_empty());
    // Connections close asynchronously: give the maps a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while maps() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(maps(), before, "the maps are back to baseline");
    // Nothing of a pod is left open in the agent once it is gone.
    let fds = || tests::agent_footprint(pid).1;
    while fds() != fds_before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        fds(),
        fds_before,
        "the agent's descriptors are back to baseline"
    );
}

/// The entries of each of the node datapath's maps.
fn node_map_usage() -> Vec<(&'static str, usize)> {
    let mut usage: Vec<(&str, usize)> = agent::ebpf::DatapathMaps::from_pins(&node_pins())
        .unwrap()
        .usage()
        .unwrap()
        .into_iter()
        .map(|u| (u.name, u.entries))
        .collect();
    usage.sort_unstable();
    usage
}

/// A real container runtime: podman with its CNI backend, our plugin
/// chained after `bridge`. Pods created after the node agent started are
/// enrolled by the plugin; an app container's download from a server in
/// another pod is captured by its pod's own proxy from the first
/// connection, short-circuited and byte-exact; `podman pod rm` takes every
/// trace of a pod away (maps, pins, the agent's list).
#[rstest]
fn podman_pods_are_enrolled_by_the_cni_plugin_and_leave_no_trace() {
    require_root!();
    let node = Node::start();
    let podman = Podman::new(&node.socket);
    let before = node_map_usage();
    let (up, up_ip, want) = podman.blob_server("up");
    let app = podman.pod("app");
    assert_eq!(
        node.connections(),
        vec![("app".to_owned(), 0), ("up".to_owned(), 0)],
        "both pods enrolled by the plugin, by their podman names"
    );
    let lo = || lo_tx_packets_in(&app);
    let up_lo = || lo_tx_packets_in(&up);
    let (lo0, up_lo0) = (lo(), up_lo());
    let got = podman.download_blob("app", &up_ip);
    let (packets, up_packets) = (lo() - lo0, up_lo() - up_lo0);
    assert_eq!(got, want, "byte-exact");
    assert_eq!(
        node.connections(),
        vec![("app".to_owned(), 1), ("up".to_owned(), 1)],
        "the app's first connection went out through its own pod's proxy \
         and in through the upstream pod's"
    );
    let snap = inspect::snapshot_from_pins(&node_pins()).unwrap();
    let counter = |c: Counter| snap.counters.get(c.name()).copied().unwrap_or(0);
    assert_eq!(counter(Counter::InboundSteered), 1, "{:?}", snap.counters);
    assert_eq!(
        counter(Counter::GetsockoptAnswered),
        2,
        "{:?}",
        snap.counters
    );
    // 3 MiB stays under the queue limit (4 MiB) however slowly curl
    // writes its file: a reader that falls further behind is rightly
    // carried over TCP. Over TCP these bytes take at least 48 packets of
    // 64 KiB on the loopback, plus acknowledgements.
    eprintln!(
        "podman: 3 MiB downloaded by curl in a pod; loopback packets: {packets} in the app's pod, \
         {up_packets} in the upstream's"
    );
    let short_circuits = node.agent().short_circuits();
    if short_circuits != "none" {
        assert!(
            packets < 24,
            "{packets} loopback packets for 3 MiB: not short-circuited: {:?}",
            snap.counters
        );
    }
    // Inbound, the proxy hands the bytes to httpd, whose socket blocks:
    // short-circuited only where this kernel's blocking readers are safe,
    // on plain TCP (and counted) elsewhere.
    match short_circuits.as_str() {
        "all" => assert!(
            up_packets < 24,
            "inbound: {up_packets} loopback packets for 3 MiB: not short-circuited: {:?}",
            snap.counters
        ),
        "nonblocking" => assert!(
            counter(Counter::SockhashRefusedBlocking) + counter(Counter::SockhashEvicted) >= 1,
            "inbound went over TCP without a counted reason: {:?}",
            snap.counters
        ),
        _ => {}
    }
    podman.ok(&["pod", "rm", "--force", "--time", "0", "app"]);
    assert_eq!(node.connections(), vec![("up".to_owned(), 1)]);
    podman.ok(&["pod", "rm", "--force", "--time", "0", "up"]);
    assert!(
        node.connections().is_empty(),
        "podman pod rm unenrolled both"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while node_map_usage() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(node_map_usage(), before, "the maps are back to baseline");
    assert_eq!(
        agent::pins::all_instances(Path::new("/sys/fs/bpf")),
        vec![node_pins()],
        "no pins but the node datapath's"
    );
    assert_eq!(
        pod_links(),
        Vec::<String>::new(),
        "no pod's sk_lookup link is left"
    );
    let chained = podman.conflist();
    assert_eq!(
        chained["plugins"][1]["type"], "mesh-redirect-cni",
        "{chained}"
    );
    podman.uninstall_cni();
    let plugins = podman.conflist()["plugins"].clone();
    assert_eq!(
        plugins.as_array().map(Vec::len),
        Some(1),
        "only bridge is left: {plugins}"
    );
    assert_eq!(plugins[0], chained["plugins"][0]);
}

/// The node datapath's pinned sk_lookup links, one per pod served inbound.
fn pod_links() -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(node_pins())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link-mesh_sk_lookup-netns-"))
        .collect();
    links.sort();
    links
}

#[rstest]
fn a_caller_that_sends_nothing_stalls_nobody() {
    require_root!();
    let node = Node::start();
    let _silent = std::os::unix::net::UnixStream::connect(&node.socket).unwrap();
    let t0 = std::time::Instant::now();
    assert!(node.ask("pods", &[])["pods"].as_array().unwrap().is_empty());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "answered only after {:?}",
        t0.elapsed()
    );
}
