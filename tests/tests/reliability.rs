//! Restarts without loss, the admin server, the fail policy, cleanup after a
//! crash, bad inputs, multi-attach, and abuse (heavy ones need
//! `MESH_REDIRECT_HEAVY=1`, which CI sets).

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent::{
    ebpf::{Hook, attach::attached},
    inspect,
};
use agent_common::Counter;
use aya_obj::generated::bpf_prog_type;
use rstest::rstest;
use tests::{
    Agent, RedirectMode, Topology, admin,
    agent_proc::run_to_end,
    farm::{AsyncEcho, block_on_in, runtime_in},
    haproxy::Haproxy,
    looping::LoopingClient,
    require_heavy, require_root,
    servers::{Behaviour, Server},
    topology::{POD_IP, SRV_IP},
};

/// Ours, attached on `cgroup`, per hook name.
fn ours_on(cgroup: &Path) -> Vec<String> {
    let mut v: Vec<String> = inspect::attached(cgroup)
        .unwrap()
        .into_iter()
        .filter(|p| p.ours)
        .map(|p| p.name)
        .collect();
    v.sort();
    v
}

/// The pin directories of the test pod's namespace (any layout).
fn pins_of(topo: &Topology) -> Vec<std::path::PathBuf> {
    let cookie = topo.pod.open().cookie().unwrap();
    agent::pins::all_instances(Path::new("/sys/fs/bpf"))
        .into_iter()
        .filter(|d| agent::pins::instance_cookie(d) == Some(cookie))
        .collect()
}

#[rstest]
fn admin_serves_ready_health_and_metrics_equal_to_what_the_client_did(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(
        &topo.srv,
        SRV_IP,
        9000,
        Behaviour::Echo { write_size: 4096 },
    );
    let agent = Agent::run(&topo.agent_args(mode), None);
    assert_eq!(
        admin::get(&topo, "/ready"),
        (200, "ready\nfail-policy: closed\n".to_owned())
    );
    assert_eq!(admin::get(&topo, "/healthz").0, 200);
    assert_eq!(admin::get(&topo, "/nope").0, 404);
    {
        let _in_pod = topo.enter_pod_cgroup();
        for _ in 0..5 {
            let mut c = topo.pod_connect(echo.addr);
            c.write_all(b"0123456789").unwrap();
            let mut buf = [0u8; 10];
            c.read_exact(&mut buf).unwrap();
        }
    }
    // Connections close asynchronously; wait for the proxy to count them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let (_, text) = admin::get(&topo, "/metrics");
        if admin::metric(
            &text,
            "mesh_redirect_proxy_connections_open{direction=\"outbound\"}",
        ) == Some(0)
            || Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_proxy_connections_total{direction=\"outbound\"}"
        ),
        Some(5),
        "{text}"
    );
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_proxy_bytes_total{direction=\"outbound\",flow=\"to_upstream\"}"
        ),
        Some(50)
    );
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_proxy_bytes_total{direction=\"outbound\",flow=\"to_client\"}"
        ),
        Some(50)
    );
    assert_eq!(admin::metric(&text, "mesh_redirect_ready"), Some(1));
    if mode == RedirectMode::Ebpf {
        assert_eq!(
            admin::metric(
                &text,
                "mesh_redirect_redirects_total{direction=\"outbound\",family=\"ipv4\"}"
            ),
            Some(5),
            "{text}"
        );
        assert_eq!(
            admin::metric(
                &text,
                "mesh_redirect_getsockopt_total{result=\"answered\",family=\"ipv4\"}"
            ),
            Some(5)
        );
        assert!(
            admin::metric(&text, "mesh_redirect_sk_msg_total{verdict=\"redirected\"}").unwrap()
                >= 10
        );
        assert_eq!(
            admin::metric(&text, "mesh_redirect_sk_msg_total{verdict=\"passed\"}"),
            Some(0)
        );
        assert!(
            text.contains("mesh_redirect_map_capacity{map=\"SOCKETS\"} 131072"),
            "{text}"
        );
    }
    // `status` shows the same numbers, asked of the agent itself.
    let out = run_to_end(&[
        "status",
        "--json",
        "--cgroup",
        topo.cgroup.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let report = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| (a["report"]["pid"] == agent.pid()).then(|| &a["report"]))
        .unwrap_or_else(|| panic!("our agent is not in {status:#}"));
    assert_eq!(report["mode"], mode.arg());
    assert_eq!(report["fail_policy"], "closed");
    assert_eq!(report["not_ready"].as_array().unwrap().len(), 0);
    let proxy = &report["proxy"];
    assert_eq!(proxy["connections_total"]["outbound"], 5, "{report:#}");
    assert_eq!(proxy["connections_open"]["outbound"], 0, "{report:#}");
    assert_eq!(proxy["bytes"]["outbound/to_upstream"], 50, "{report:#}");
    assert_eq!(proxy["bytes"]["outbound/to_client"], 50, "{report:#}");
    if mode == RedirectMode::Ebpf {
        assert_eq!(
            status["datapath"]["counters"]["connect_redirected"], 5,
            "{status:#}"
        );
    }
}

#[rstest]
fn sigterm_drains_open_connections_then_stops() {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(
        &topo.srv,
        SRV_IP,
        9000,
        Behaviour::Echo { write_size: 4096 },
    );
    let mut args = topo.agent_args(RedirectMode::Ebpf);
    args.extend(["--drain-timeout-secs", "3"]);
    let agent = Agent::run(&args, None);
    let _in_pod = topo.enter_pod_cgroup();
    let mut open = topo.pod_connect(echo.addr);
    open.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).unwrap();

    let pid = i32::try_from(agent.pid()).unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    // Draining: the open connection still works; /ready says no.
    open.write_all(b"during").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"during");
    assert_eq!(admin::get(&topo, "/ready").0, 503);
    // New connects are refused (fail closed) while draining.
    let refused = topo
        .pod
        .run(|| TcpStream::connect_timeout(&echo.addr, Duration::from_secs(2)));
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // After the deadline the connection is closed and everything is gone.
    let start = Instant::now();
    let status = agent.stop_with(libc::SIGTERM);
    assert!(status.success());
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "drain took {:?}",
        start.elapsed()
    );
    assert!(ours_on(topo.cgroup.path()).is_empty());
    assert!(pins_of(&topo).is_empty(), "pins left");
}

/// SIGKILL of the agent while a transfer runs through an external proxy:
/// the transfer completes byte-exact; while the agent is down new
/// connections are still captured and short-circuited; a restarted agent
/// adopts the pins without a second program on any hook.
#[rstest]
fn sigkill_with_an_external_proxy_disturbs_nothing_and_the_restart_adopts() {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(
        &topo.srv,
        SRV_IP,
        9000,
        Behaviour::Echo {
            write_size: 16 * 1024,
        },
    );
    let mut args = topo.agent_args(RedirectMode::Ebpf);
    args.extend([
        "--proxy",
        "external",
        "--proxy-uid",
        "1337",
        "--proxy-gid",
        "1337",
    ]);
    let agent = Agent::run(&args, None);
    let before = ours_on(topo.cgroup.path());
    let _haproxy = Haproxy::start(&topo);
    let _in_pod = topo.enter_pod_cgroup();

    let mut conn = topo.pod_connect(echo.addr);
    let transfer = std::thread::spawn(move || {
        tests::transfer::echo_round_trip(&mut conn, tests::bulk_bytes(256 << 20), 16 * 1024)
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = i32::try_from(agent.pid()).unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(agent);
    let sent = transfer.join().expect("the transfer survives the SIGKILL");
    assert!(echo.seen.lock().unwrap().received_sha256.contains(&sent));

    // Down: still captured and accelerated.
    let redirected = || {
        inspect::snapshot(topo.cgroup.path())
            .unwrap()
            .unwrap()
            .counter(Counter::MsgRedirected)
    };
    let r0 = redirected();
    let mut c = topo.pod_connect(echo.addr);
    c.write_all(b"agent is down").unwrap();
    let mut buf = [0u8; 13];
    c.read_exact(&mut buf).unwrap();
    assert!(
        redirected() > r0,
        "a new connection is short-circuited while the agent is down"
    );
    assert_eq!(
        ours_on(topo.cgroup.path()),
        before,
        "the hooks stay attached"
    );

    let agent = Agent::run(&args, None);
    assert!(
        agent.log_text().contains("adopting the pinned datapath"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        ours_on(topo.cgroup.path()),
        before,
        "no duplicate programs after the restart"
    );
    let mut c = topo.pod_connect(echo.addr);
    c.write_all(b"agent is back").unwrap();
    c.read_exact(&mut buf).unwrap();
    assert!(agent.stop_with(libc::SIGTERM).success());
    assert!(ours_on(topo.cgroup.path()).is_empty());
    assert!(pins_of(&topo).is_empty());
}

/// An upgrade that changes a program (here its global data, as a new
/// build would its code) never keeps the old one: after a killed (SIGKILL)
/// agent's successor adopts the pins, every hook (cgroups, the namespace's
/// sk_lookup, the SOCKHASH's sk_msg, the recvmsg fexit where tracing is
/// allowed) runs the successor's programs, and none of the old ones is
/// still loaded in the kernel.
#[rstest]
fn an_adopting_agent_replaces_every_program_of_the_old_one() {
    require_root!();
    let topo = Topology::new();
    let mut args = topo.agent_args(RedirectMode::Ebpf);
    args.extend(["--proxy", "external", "--proxy-uid", "1337"]);
    // Every program of ours attached somewhere for this pod: the cgroup
    // hooks, sk_lookup on the pod's namespace, sk_msg on the SOCKHASH.
    let attached_ids = || -> Vec<u32> {
        let netns = File::open(topo.pod.path()).unwrap();
        let [pins] = &pins_of(&topo)[..] else {
            panic!("one pin set for the pod: {:?}", pins_of(&topo));
        };
        let maps = agent::ebpf::DatapathMaps::from_pins(pins).unwrap();
        let mut ids: Vec<u32> = inspect::attached(topo.cgroup.path())
            .unwrap()
            .into_iter()
            .chain(attached(&netns, [Hook::SkLookup]).unwrap())
            .chain(maps.attached_to_sockets().unwrap())
            .filter(|p| p.ours)
            .map(|p| p.id)
            .collect();
        ids.sort_unstable();
        ids
    };
    let loaded_ours = || -> Vec<u32> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("mesh_")))
            .map(|p| p.id())
            .collect()
    };
    let before = loaded_ours();
    let old = Agent::run(&args, None);
    let old_ids = attached_ids();
    let served_hooks = Hook::cgroup_hooks()
        .filter(|h| !Hook::DNS.contains(h))
        .count();
    assert_eq!(
        old_ids.len(),
        served_hooks + 2,
        "the cgroup hooks but DNS's, sk_lookup and sk_msg: {old_ids:?}"
    );
    // Everything the old agent loaded (the recvmsg fexit too, where it runs).
    let old_loaded: Vec<u32> = loaded_ours()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert!(old_ids.iter().all(|id| old_loaded.contains(id)));
    let pid = i32::try_from(old.pid()).unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(old);
    assert_eq!(
        attached_ids(),
        old_ids,
        "a killed agent's programs stay attached"
    );

    args.extend(["--sockmap-queue-kib", "2048"]);
    let new = Agent::run(&args, None);
    assert!(new.log_text().contains("adopting the pinned datapath"));
    let new_ids = attached_ids();
    assert_eq!(
        new_ids.len(),
        old_ids.len(),
        "one program per hook: {new_ids:?}"
    );
    assert!(
        new_ids.iter().all(|id| !old_ids.contains(id)),
        "an old program is still attached: old {old_ids:?}, now {new_ids:?}"
    );
    let still = loaded_ours();
    let left: Vec<&u32> = old_loaded.iter().filter(|id| still.contains(id)).collect();
    assert!(left.is_empty(), "old programs still loaded: {left:?}");
    assert!(new.stop_with(libc::SIGTERM).success());
    assert!(pins_of(&topo).is_empty());
}

/// A new agent instance takes the built-in proxy's listeners over: a client
/// looping on new connections sees no refusal across the switch.
#[rstest]
fn a_new_agent_takes_over_without_refusing_a_connection(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let args = topo.agent_args(mode);
    let old = Agent::run(&args, None);
    let hooks_before = ours_on(topo.cgroup.path());
    // Where the old agent runs: the new one is started there too (this
    // test process moves into the pod's cgroup for its client).
    let agent_cgroup = agent::cgroup::own().unwrap();
    let _in_pod = topo.enter_pod_cgroup();
    let client = LoopingClient::start(&topo.pod, echo.addr);
    std::thread::sleep(Duration::from_millis(500));
    let new = Agent::run_in(&args, &agent_cgroup);
    assert!(
        new.log_text().contains("took_over=true"),
        "{}",
        new.log_text()
    );
    assert!(
        old.log_text()
            .contains("a new agent has the listeners and is getting ready"),
        "the old agent serves on while the new one gets ready:\n{}",
        old.log_text()
    );
    let status = old.stop_with(0);
    assert!(
        status.success(),
        "the old agent exits on its own after the handover"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = client.stop();
    eprintln!("{ok} connections, {failed} failed across the handover");
    assert!(ok > 20, "the client made only {ok} connections");
    assert_eq!(failed, 0, "connections failed across the handover");
    assert_eq!(
        ours_on(topo.cgroup.path()),
        hooks_before,
        "the same hooks, once each"
    );
    assert!(new.stop_with(libc::SIGTERM).success());
    assert!(ours_on(topo.cgroup.path()).is_empty());
}

/// A new agent that fails after it took the listeners (here: its admin
/// address is on no interface of the pod) leaves the running one serving,
/// control socket included: no connection fails, and a later takeover
/// still works.
#[rstest]
fn a_new_agent_that_fails_to_start_leaves_the_old_one_serving(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let args = topo.agent_args(mode);
    let old = Agent::run(&args, None);
    let hooks_before = ours_on(topo.cgroup.path());
    let agent_cgroup = agent::cgroup::own().unwrap();
    let _in_pod = topo.enter_pod_cgroup();
    let client = LoopingClient::start(&topo.pod, echo.addr);
    std::thread::sleep(Duration::from_millis(300));
    let mut failing = vec!["run"];
    failing.extend(&args);
    failing.extend(["--admin", "192.0.2.1:15000"]);
    let out = run_to_end(&failing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--admin"),
        "names the thing at fault: {stderr}"
    );
    let served = client.ok();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        client.ok() > served,
        "the old agent serves on after the new one failed"
    );
    assert!(
        old.log_text()
            .contains("the new agent went away before it was ready: serving on"),
        "{}",
        old.log_text()
    );
    assert_eq!(ours_on(topo.cgroup.path()), hooks_before);
    // Its control socket answers again: a takeover that works.
    let new = Agent::run_in(&args, &agent_cgroup);
    assert!(new.log_text().contains("took_over=true"));
    assert!(old.stop_with(0).success());
    let (ok, failed) = client.stop();
    eprintln!("{ok} connections, {failed} failed across both takeovers");
    assert_eq!(failed, 0, "connections failed across the takeovers");
    assert_eq!(ours_on(topo.cgroup.path()), hooks_before);
    assert!(new.stop_with(libc::SIGTERM).success());
    assert!(ours_on(topo.cgroup.path()).is_empty());
}

#[rstest]
#[case::fail_closed(&[], false)]
#[case::fail_open(&["--fail-open"], true)]
fn the_fail_policy_decides_while_no_proxy_listens(#[case] flag: &[&str], #[case] open: bool) {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let app = {
        let _in_pod = topo.enter_pod_cgroup();
        Server::start(
            &topo.pod,
            Ipv4Addr::UNSPECIFIED,
            8080,
            Behaviour::Echo { write_size: 64 },
        )
    };
    let mut args = topo.agent_args(RedirectMode::Ebpf);
    // No proxy runs: an external one that is down.
    args.extend(["--proxy", "external"]);
    args.extend(flag);
    let _agent = Agent::run(&args, None);
    let (_, text) = admin::get(&topo, "/metrics");
    assert_eq!(
        admin::metric(&text, "mesh_redirect_fail_open"),
        Some(u64::from(open)),
        "{text}"
    );
    let policy = if open { "open" } else { "closed" };
    assert!(text.contains(&format!("fail_policy=\"{policy}\"")));
    let (_, ready) = admin::get(&topo, "/ready");
    assert!(
        ready.contains(&format!("fail-policy: {policy}\n")),
        "{ready}"
    );
    let _in_pod = topo.enter_pod_cgroup();
    let out = topo
        .pod
        .run(|| TcpStream::connect_timeout(&echo.addr, Duration::from_secs(2)));
    let inb = topo.srv.run(|| {
        TcpStream::connect_timeout(
            &SocketAddrV4::new(POD_IP, 8080).into(),
            Duration::from_secs(2),
        )
    });
    if open {
        assert!(out.is_ok(), "fail open: the connect goes direct: {out:?}");
        assert!(inb.is_ok(), "fail open: inbound reaches the app: {inb:?}");
        let s = inspect::snapshot(topo.cgroup.path()).unwrap().unwrap();
        assert!(s.counter(Counter::ConnectFailOpen) >= 1);
        assert!(s.counter(Counter::InboundFailOpen) >= 1);
        let deadline = Instant::now() + Duration::from_secs(2);
        while (echo.peers().len(), app.peers().len()) != (1, 1) {
            assert!(
                Instant::now() < deadline,
                "the direct connections did not arrive"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        assert_eq!(
            out.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        assert_eq!(
            inb.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        assert!(echo.peers().is_empty() && app.peers().is_empty());
    }
}

#[rstest]
fn cleanup_after_a_sigkill_removes_pins_links_and_our_chains_only(
    #[values(RedirectMode::Ebpf, RedirectMode::Iptables)] mode: RedirectMode,
) {
    require_root!();
    let topo = Topology::dual_stack();
    // Someone else's istio chains, in another namespace: not ours.
    let other = tests::TestNetns::new();
    let agent_bin = tests::agent_bin();
    let drop_in = Command::new("ip")
        .args(["netns", "exec", other.name()])
        .arg(&agent_bin)
        .args([
            "iptables",
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-g",
            "1337",
            "-i",
            "*",
            "--ipv6=false",
        ])
        .status()
        .unwrap();
    assert!(drop_in.success());
    let other_before = other.sh("iptables-nft-save -t nat; iptables-legacy-save -t nat");

    let netns = topo.pod.path();
    let agent = Agent::run(&topo.agent_args(mode), None);
    let pid = i32::try_from(agent.pid()).unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(agent);
    let save = || {
        topo.pod.sh(
            "iptables-nft-save; iptables-legacy-save; ip6tables-nft-save; ip6tables-legacy-save",
        )
    };
    let passthrough6 = || {
        topo.pod
            .sh("ip -6 -o addr show dev lo")
            .contains(" ::6/128 ")
    };
    assert!(passthrough6(), "a killed agent leaves ::6 on lo");
    match mode {
        RedirectMode::Ebpf => {
            assert!(
                !ours_on(topo.cgroup.path()).is_empty(),
                "a killed agent leaves its hooks (by design)"
            );
            assert!(!pins_of(&topo).is_empty());
        }
        RedirectMode::Iptables => assert!(save().contains("mesh-redirect")),
    }
    let out = run_to_end(&[
        "cleanup",
        "--netns",
        netns.to_str().unwrap(),
        "--netns",
        other.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(ours_on(topo.cgroup.path()).is_empty(), "{text}");
    assert!(pins_of(&topo).is_empty(), "{text}");
    assert!(!save().contains("ISTIO"), "our chains left:\n{}", save());
    assert!(!passthrough6(), "::6 left on lo: {text}");
    assert!(text.contains("removed our ::6 from lo"), "{text}");
    assert_eq!(
        other
            .sh("iptables-nft-save -t nat; iptables-legacy-save -t nat")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        other_before
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        "istio's own chains were touched"
    );
    assert!(text.contains("not installed by mesh-redirect"), "{text}");
}

#[rstest]
fn a_read_only_bpffs_is_refused_before_anything_is_attached() {
    require_root!();
    let topo = Topology::new();
    let bin = tests::shell_quote(&tests::agent_bin().to_string_lossy());
    let netns = topo.pod.path();
    let script = format!(
        "mount --make-rprivate / && {{ umount -l /sys/fs/bpf 2>/dev/null; true; }} && mount -t bpf -o ro bpf /sys/fs/bpf && exec {bin} run --mode ebpf --netns {} --cgroup {}",
        netns.display(),
        topo.cgroup.path().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--bpffs") && err.contains("/sys/fs/bpf") && err.contains("read-only"),
        "{err}"
    );
    assert!(ours_on(topo.cgroup.path()).is_empty());
}

#[rstest]
fn an_admin_port_in_use_fails_before_anything_is_attached() {
    require_root!();
    let topo = Topology::new();
    let _taken = topo
        .pod
        .run(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 15020)).unwrap());
    let out = run_to_end(&[&["run"][..], &topo.agent_args(RedirectMode::Ebpf)].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--admin") && err.contains("127.0.0.1:15020"),
        "{err}"
    );
    assert!(ours_on(topo.cgroup.path()).is_empty());
}

/// Another tool's program on the same hooks keeps working beside ours, and
/// is never replaced.
#[rstest]
fn another_program_on_the_same_hooks_keeps_working() {
    require_root!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size: 64 });
    let cg = File::open(topo.cgroup.path()).unwrap();
    let mut foreign = Vec::new();
    for hook in [Hook::Connect4, Hook::SockOps, Hook::GetSockopt] {
        let ptype = match hook {
            Hook::Connect4 => bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            Hook::SockOps => bpf_prog_type::BPF_PROG_TYPE_SOCK_OPS,
            _ => bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCKOPT,
        };
        let prog = tests::foreign::pass_through(ptype, hook.attach_type()).unwrap();
        foreign.push((
            tests::foreign::link(&prog, &cg, hook.attach_type()).unwrap(),
            hook,
        ));
    }
    let count = |hook| attached(&cg, [hook]).unwrap().len();
    // In the pod's cgroup, so every hook of ours lands on that cgroup too.
    let agent = Agent::run(&topo.agent_args(RedirectMode::Ebpf), Some(&topo.cgroup));
    for (_, at) in &foreign {
        assert_eq!(count(*at), 2, "ours beside the foreign one");
    }
    {
        let _in_pod = topo.enter_pod_cgroup();
        let mut c = topo.pod_connect(echo.addr);
        c.write_all(b"both attached").unwrap();
        let mut buf = [0u8; 13];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"both attached");
    }
    let s = inspect::snapshot(topo.cgroup.path()).unwrap().unwrap();
    assert_eq!(
        s.counter(Counter::GetsockoptAnswered),
        1,
        "our getsockopt answered beside the foreign one"
    );
    assert!(agent.stop_with(libc::SIGTERM).success());
    for (_, at) in &foreign {
        assert_eq!(count(*at), 1, "the foreign program is still attached");
    }
}

/// 1 GiB each way through the short-circuit at three write sizes.
#[rstest]
fn heavy_one_gib_each_way_through_the_short_circuit(
    #[values(1024, 16 * 1024, 128 * 1024)] write_size: usize,
) {
    require_root!();
    require_heavy!();
    let topo = Topology::new();
    let echo = Server::start(&topo.srv, SRV_IP, 9000, Behaviour::Echo { write_size });
    let _agent = Agent::run(&topo.agent_args(RedirectMode::Ebpf), None);
    let _in_pod = topo.enter_pod_cgroup();
    let mut conn = topo.pod_connect(echo.addr);
    let sent = tests::transfer::echo_round_trip(&mut conn, 1 << 30, write_size);
    assert_eq!(echo.seen.lock().unwrap().received_sha256, vec![sent]);
    let s = inspect::snapshot(topo.cgroup.path()).unwrap().unwrap();
    // The short-circuit carried it, except messages whose reader held more
    // than the queue limit (backpressure) or that had to wait for earlier
    // bytes still in TCP (byte order): each passed message has its reason.
    let c = |k| s.counter(k);
    assert!(c(Counter::MsgRedirected) > 0, "{:?}", s.counters);
    let reasoned = c(Counter::MsgSpilled)
        + c(Counter::MsgGated)
        + c(Counter::MsgSenderBlocking)
        + c(Counter::MsgReceiverBlocking);
    assert_eq!(c(Counter::MsgPassed), reasoned, "{:?}", s.counters);
    let (redirected, passed) = (c(Counter::BytesRedirected), c(Counter::BytesPassed));
    eprintln!(
        "{write_size}-byte writes: {} messages redirected, {} passed ({} spilled, {} gated); {} of {} MiB short-circuited",
        c(Counter::MsgRedirected),
        c(Counter::MsgPassed),
        c(Counter::MsgSpilled),
        c(Counter::MsgGated),
        redirected >> 20,
        (redirected + passed) >> 20
    );
}

/// 10,000 connections held, then 1,000 new connections a second for 60 s:
/// nothing lost, every map back to baseline, metrics equal to the client's
/// counts.
#[rstest]
fn heavy_ten_thousand_held_then_a_thousand_a_second_for_a_minute() {
    require_root!();
    require_heavy!();
    tests::raise_fd_limit();
    let topo = Topology::new();
    // 60,000 connections in a minute: the proxy's upstream sockets close
    // first and sit in TIME_WAIT; let new ones reuse their ports.
    topo.pod
        .sh("sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='1024 65535'");
    let echo = AsyncEcho::start(&topo.srv, SRV_IP, 9000);
    let agent = Agent::run(&topo.agent_args(RedirectMode::Ebpf), None);
    let baseline = inspect::snapshot(topo.cgroup.path()).unwrap().unwrap().maps;
    let _in_pod = topo.enter_pod_cgroup();
    let rt = runtime_in(&topo.pod, 2);
    let addr = echo.addr;
    let (held, churned, churn_time) = block_on_in(&rt, async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let exchange = |mut s: tokio::net::TcpStream| async move {
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(s)
        };
        let mut held = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .expect("held connect");
            held.push(exchange(s).await.expect("held exchange"));
        }
        let mut churned = 0u64;
        let start = tokio::time::Instant::now();
        // 100 every 100 ms for 60 s; a batch that overruns its slot is not
        // made up for (the pace is checked below).
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..600 {
            tick.tick().await;
            let batch: Vec<_> = (0..100)
                .map(|_| {
                    tokio::spawn(async move {
                        exchange(tokio::net::TcpStream::connect(addr).await?)
                            .await
                            .map(drop)
                    })
                })
                .collect();
            for t in batch {
                t.await.expect("task").expect("a churned connection failed");
                churned += 1;
            }
        }
        // Every held connection still works.
        for s in &mut held {
            s.write_all(b"y").await.expect("held write");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("held read");
        }
        (held.len() as u64, churned, start.elapsed())
    });
    drop(rt);
    eprintln!("{held} held, {churned} churned in {churn_time:?}");
    assert_eq!(churned, 60_000);
    assert!(
        churn_time < Duration::from_secs(66),
        "1,000 a second not kept up: {churn_time:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = inspect::snapshot(topo.cgroup.path()).unwrap().unwrap();
        if now.maps == baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "maps not back to baseline: {:?} vs {baseline:?}",
            now.maps
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, text) = admin::get(&topo, "/metrics");
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_proxy_connections_total{direction=\"outbound\"}"
        ),
        Some(held + churned),
        "{text}"
    );
    assert_eq!(
        admin::metric(
            &text,
            "mesh_redirect_redirects_total{direction=\"outbound\",family=\"ipv4\"}"
        ),
        Some(held + churned)
    );
    assert_eq!(echo.accepted.load(Ordering::Relaxed), held + churned);
    assert!(agent.stop_with(libc::SIGTERM).success());
}

/// 5,000 slowloris clients (connect, then trickle a byte now and then):
/// a new client is still served at once, and the agent's memory and file
/// descriptors stay bounded.
#[rstest]
fn heavy_five_thousand_slowloris_clients_do_not_starve_new_ones() {
    require_root!();
    require_heavy!();
    tests::raise_fd_limit();
    let topo = Topology::new();
    let echo = AsyncEcho::start(&topo.srv, SRV_IP, 9000);
    let agent = Agent::run(&topo.agent_args(RedirectMode::Ebpf), None);
    let _in_pod = topo.enter_pod_cgroup();
    let rt = runtime_in(&topo.pod, 2);
    let addr = echo.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut slow = Vec::with_capacity(5000);
            for _ in 0..5000 {
                slow.push(
                    tokio::net::TcpStream::connect(addr)
                        .await
                        .expect("slowloris connect"),
                );
            }
            while !stop.load(Ordering::Relaxed) {
                for s in &mut slow {
                    let _ = s.write_all(b"x").await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            slow.len()
        })
    };
    let deadline = Instant::now() + Duration::from_mins(1);
    while echo.open.load(Ordering::Relaxed) < 5000 {
        assert!(
            Instant::now() < deadline,
            "only {} slowloris connections up",
            echo.open.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    // A new client is served at once.
    let start = Instant::now();
    let mut c = topo.pod_connect(addr);
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "a new client took {took:?}");
    // Bounded: a buffer only while data flows, two fds per connection.
    // The proxy's workers each have a descriptor table of their own: both
    // are counted.
    let (rss_kib, fds) = tests::agent_footprint(agent.pid());
    eprintln!(
        "agent with 5,000 slowloris clients: RSS {} MiB, {fds} fds",
        rss_kib / 1024
    );
    assert!(rss_kib < 256 * 1024, "RSS {rss_kib} KiB");
    // Two per connection (the app's and the upstream's ends), a few hundred
    // besides: counted right, and nothing more.
    assert!((2 * 5000..2 * 5000 + 400).contains(&fds), "{fds} fds");
    stop.store(true, Ordering::Relaxed);
    assert_eq!(rt.block_on(trickle).unwrap(), 5000);
    drop(rt);
    assert!(agent.stop_with(libc::SIGTERM).success());
}
