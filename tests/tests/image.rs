//! The agent's image (`cargo xtask image`, loaded from its OCI archive)
//! under Debian's podman, in the roles an operator gives it: the report of
//! what the host offers, the eBPF sidecar of a pod, the istio-init drop-in,
//! the node agent serving the pods the CNI plugin enrolls.
//!
//! Each container gets exactly the capabilities the manifests under deploy/
//! list (`SYS_ADMIN` and `NET_ADMIN` for the agent, `NET_ADMIN` and
//! `NET_RAW` for the init drop-in), never `--privileged`, and the host's
//! cgroup2 mount (a hostPath in Kubernetes).

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use agent::inspect;
use tests::{
    admin,
    podman::{AGENT_IMAGE_ENV, Podman},
    require_root, sh, skip,
    topology::lo_tx_packets_in,
};

/// The agent container's capabilities, and no others (podman's default
/// set is dropped): `SYS_ADMIN` loads the programs and mounts bpffs,
/// `NET_ADMIN` attaches them, installs iptables rules and sets the proxy's
/// socket mark.
const AGENT_CAPS: &str = "SYS_ADMIN,NET_ADMIN";

/// The host's cgroup2 mount, bound at the same path in the container.
fn cgroup2_volume() -> String {
    let root = agent::cgroup::cgroup2_root().expect("a cgroup2 mount");
    format!("{0}:{0}", root.display())
}

/// podman with the agent's image loaded; `None` (after the skip) when the
/// test run was given no image.
macro_rules! podman_with_image {
    () => {{
        require_root!();
        let podman = Podman::plain();
        let Some(image) = podman.load_agent_image() else {
            skip!("no image: {AGENT_IMAGE_ENV} names none (`cargo xtask test` builds and sets it)");
        };
        (podman, image)
    }};
}

#[test]
fn the_image_reports_both_modes_usable() {
    let (podman, image) = podman_with_image!();
    let volume = cgroup2_volume();
    // No arguments: the image's command, `doctor`.
    let out = podman.run(&[
        "run",
        "--rm",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--cap-add",
        AGENT_CAPS,
        "-v",
        &volume,
        &image,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor in the image: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    for mode in ["ebpf    ", "iptables"] {
        assert!(
            stdout.contains(&format!("mode {mode} usable")),
            "mode {mode} not usable in the image:\n{stdout}"
        );
    }
}

/// A pod as a sidecar injector makes it: the app's container and the
/// agent's (`run`, eBPF mode). The app's download from a server in another
/// pod goes through the sidecar's proxy, byte-exact, short-circuited on the
/// pod's loopback; stopping the container detaches everything it attached.
#[test]
fn a_sidecar_container_captures_and_short_circuits_its_pods_traffic() {
    let (podman, image) = podman_with_image!();
    let root = agent::cgroup::cgroup2_root().unwrap();
    let ours = || {
        inspect::attached(&root)
            .unwrap()
            .into_iter()
            .filter(|p| p.ours)
            .count()
    };
    assert_eq!(ours(), 0, "nothing of ours attached before the test");
    let (_up, up_ip, want) = podman.blob_server("up");
    let app = podman.pod("app");
    let volume = cgroup2_volume();
    podman.ok(&[
        "run",
        "-d",
        // As Kubernetes runs it: a read-only root with no tmpfs of
        // podman's, the emptyDir for the control socket.
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs",
        "/run/mesh-redirect",
        "--pod",
        "app",
        "--name",
        "app-mesh",
        "--cap-drop",
        "ALL",
        "--cap-add",
        AGENT_CAPS,
        "-v",
        &volume,
        "-e",
        "NO_COLOR=1",
        &image,
        // deploy/sidecar/ebpf.yaml's command (the image's entry point),
        // and a short drain.
        "run",
        "--mode=ebpf",
        "--no-pin",
        "--admin=0.0.0.0:15020",
        "--drain-timeout-secs",
        "1",
    ]);
    let ready = wait_for_log(&podman, "app-mesh", "mesh-redirect ready");
    let short_circuits = ready
        .split("short_circuits=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no short_circuits in {ready}"))
        .to_owned();
    assert!(ours() > 0, "the sidecar attached its hooks");
    // Nothing mounted (AppArmor's default profile would refuse it).
    let mounts = podman.stdout(&["exec", "app-mesh", "cat", "/proc/self/mountinfo"]);
    assert!(
        !mounts.contains(" bpf "),
        "the sidecar mounted bpffs:\n{mounts}"
    );

    let lo = || lo_tx_packets_in(&app);
    let lo0 = lo();
    let got = podman.download_blob("app", &up_ip);
    let packets = lo() - lo0;
    assert_eq!(got, want, "byte-exact");
    assert_eq!(
        proxied(&app),
        1,
        "the app's connection went through the sidecar's proxy"
    );
    eprintln!("image: 3 MiB by curl through the sidecar; loopback packets in the pod: {packets}");
    // curl's socket does not block: short-circuited on every kernel that
    // short-circuits at all. Over TCP, 3 MiB takes at least 48 packets.
    if short_circuits != "none" {
        assert!(
            packets < 24,
            "{packets} loopback packets for 3 MiB: not short-circuited"
        );
    }

    podman.ok(&["stop", "--time", "20", "app-mesh"]);
    let code = podman.stdout(&["inspect", "app-mesh", "--format", "{{.State.ExitCode}}"]);
    let logs = logs(&podman, "app-mesh");
    assert_eq!(code, "0", "the sidecar's exit on SIGTERM:\n{logs}");
    assert!(!logs.contains("ERROR"), "{logs}");
    assert_eq!(
        ours(),
        0,
        "the stopped sidecar left hooks attached:\n{logs}"
    );
    // Its pod runs on, uncaptured, as it would after a sidecar's removal.
    assert_eq!(podman.download_blob("app", &up_ip), want);
    podman.ok(&["pod", "rm", "--force", "--time", "0", "app"]);
}

/// The image in istio-init's place, with the arguments istio's injector
/// gives it: the pod's namespace gets the same rules the host's binary
/// writes for the same arguments in a namespace of the test's.
#[test]
fn the_image_is_a_drop_in_for_istio_init() {
    let (podman, image) = podman_with_image!();
    let app = podman.pod("app");
    // deploy/sidecar/istio-init.yaml's, as istio's injector writes them.
    let istio_args = [
        "istio-iptables",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "--log_output_level=default:info",
    ];
    let mut args = vec!["run", "--rm", "--pod", "app", "--cap-drop", "ALL"];
    args.extend(["--cap-add", "NET_ADMIN,NET_RAW", &image]);
    args.extend(istio_args);
    podman.ok(&args);
    let in_pod = nat_rules(&app);
    assert!(in_pod.contains("-A ISTIO_OUTPUT"), "{in_pod}");

    // Like istio-iptables, the drop-in works on the namespace it runs in:
    // the host's binary in a second pod's.
    let reference = podman.pod("reference");
    sh(&format!(
        "nsenter --net={} {} {}",
        reference.display(),
        tests::agent_bin().display(),
        istio_args.map(tests::shell_quote).join(" ")
    ));
    assert_eq!(
        in_pod,
        nat_rules(&reference),
        "the same rules as the host's binary"
    );
}

/// The nat table of the namespace at `netns`, as `iptables-save` prints it
/// for whichever backend holds rules, without counters and comments.
fn nat_rules(netns: &Path) -> String {
    let mut rules = String::new();
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let text = sh(&format!("nsenter --net={} {save} -t nat", netns.display()));
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with('-') || l.starts_with(':'))
            .map(|l| l.split(" [").next().unwrap_or(l))
            .collect();
        if kept.iter().any(|l| l.starts_with("-A")) {
            let _ = writeln!(rules, "{save}:\n{}", kept.join("\n"));
        }
    }
    rules
}

/// The outbound connections the sidecar's proxy accepted (from its
/// `/metrics`, inside the pod).
fn proxied(pod: &Path) -> u64 {
    let name = "mesh_redirect_proxy_connections_total{direction=\"outbound\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = admin::get_in(pod, "/metrics");
        let n = admin::metric(&text, name).unwrap_or(0);
        if n >= 1 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn logs(podman: &Podman, container: &str) -> String {
    let out = podman.run(&["logs", container]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits (20 s) for a line containing `want` in the container's log; the line.
fn wait_for_log(podman: &Podman, container: &str, want: &str) -> String {
    let deadline = Instant::now() + tests::scaled(Duration::from_secs(20));
    loop {
        let text = logs(podman, container);
        if let Some(line) = text.lines().find(|l| l.contains(want)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no `{want}` in {container}'s log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node agent as its daemon set runs it: the plugin put in place by
/// the image's `install-cni` (no capability), then the image's `node` in a
/// container on the host's network with the host's bpffs, cgroup2
/// hierarchy and network namespaces mounted, and the directory of its
/// socket shared with the host, where the plugin reaches it. Two podman pods are enrolled by the plugin;
/// the app's download from the other pod goes out through its own pod's
/// proxy and in through the server's, byte-exact and short-circuited.
#[test]
fn the_node_agent_container_serves_the_pods_the_cni_plugin_enrolls() {
    require_root!();
    let node = NodeDir::new();
    let (podman, image) = podman_with_image!();
    podman.install_cni_from(&image, &node.socket);
    let shared = format!("{0}:{0}", node.dir.display());
    let cgroup = format!("{}:ro", cgroup2_volume());
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    podman.ok(&[
        "run",
        "-d",
        "--name",
        "mesh-node",
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--cap-add",
        AGENT_CAPS,
        "-v",
        "/sys/fs/bpf:/sys/fs/bpf",
        "-v",
        &cgroup,
        "-v",
        "/run/netns:/run/netns:rslave",
        "-v",
        &shared,
        "-e",
        "NO_COLOR=1",
        &image,
        "node",
        "--socket",
        node.socket.to_str().unwrap(),
        "--admin",
        &admin,
    ]);
    let ready = wait_for_log(&podman, "mesh-node", "mesh-redirect ready");
    assert!(ready.contains("role=\"node\""), "{ready}");

    let (_up, up_ip, want) = podman.blob_server("up");
    let app = podman.pod("app");
    assert_eq!(
        node.connections(),
        vec![("app".to_owned(), 0), ("up".to_owned(), 0)],
        "both pods enrolled by the plugin"
    );
    let lo = || lo_tx_packets_in(&app);
    let lo0 = lo();
    let got = podman.download_blob("app", &up_ip);
    let packets = lo() - lo0;
    assert_eq!(got, want, "byte-exact");
    assert_eq!(
        node.connections(),
        vec![("app".to_owned(), 1), ("up".to_owned(), 1)],
        "out through the app's pod's proxy, in through the server's"
    );
    eprintln!(
        "image: 3 MiB by curl through the node container; loopback packets in the app's pod: {packets}"
    );
    if !ready.contains("short_circuits=\"none\"") {
        assert!(
            packets < 24,
            "{packets} loopback packets for 3 MiB: not short-circuited"
        );
    }
    podman.ok(&["pod", "rm", "--force", "--time", "0", "app"]);
    podman.ok(&["pod", "rm", "--force", "--time", "0", "up"]);
    assert!(
        node.connections().is_empty(),
        "podman pod rm unenrolled both"
    );
    podman.ok(&["stop", "--time", "20", "mesh-node"]);
    let code = podman.stdout(&["inspect", "mesh-node", "--format", "{{.State.ExitCode}}"]);
    let logs = logs(&podman, "mesh-node");
    assert_eq!(code, "0", "the node agent's exit on SIGTERM:\n{logs}");
    assert!(!logs.contains("ERROR"), "{logs}");
}

/// The node socket's directory, shared by the host and the node agent's
/// container; dropped, the node datapath the agent left pinned goes too.
struct NodeDir {
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl NodeDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(tests::unique("mr-nodectr"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("node.sock");
        Self { dir, socket }
    }

    /// Connections each pod's proxy accepted, by pod name (sorted), as
    /// `mesh-redirect pods` on the host says.
    fn connections(&self) -> Vec<(String, u64)> {
        let out = tests::agent_proc::run_to_end(&[
            "pods",
            "--socket",
            self.socket.to_str().unwrap(),
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pods: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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

impl Drop for NodeDir {
    fn drop(&mut self) {
        tests::remove_node_datapath(&self.socket);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
