//! A pod and a server, each in its own network namespace, joined by a veth
//! pair; the pod's processes in their own cgroup.

use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Agent, PollStream, RedirectMode, TestCgroup, TestNetns, sh};

/// Where the agent process lives relative to the pod's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the test's own cgroup (the agent serves a pod it is not part of).
    Outside,
    /// In the pod's cgroup, like a sidecar.
    Inside,
}

/// `pod` (10.77.0.1) ↔ `srv` (10.77.0.2), plus the pod's cgroup.
/// Addresses repeat across tests: every pair lives in its own namespaces.
pub struct Topology {
    pub pod: TestNetns,
    pub srv: TestNetns,
    pub cgroup: TestCgroup,
}

pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const SRV_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The pod's and the server's IPv6 addresses, in a [`Topology::dual_stack`].
pub const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
pub const SRV_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

impl Topology {
    #[must_use]
    pub fn new() -> Self {
        let pod = TestNetns::new();
        let srv = TestNetns::new();
        let (a, b) = (format!("{}a", pod.name()), format!("{}b", srv.name()));
        sh(&format!(
            "ip link add {a} type veth peer name {b} && \
             ip link set {a} netns {p} && ip link set {b} netns {s} && \
             ip -n {p} addr add {POD_IP}/24 dev {a} && ip -n {s} addr add {SRV_IP}/24 dev {b} && \
             ip -n {p} link set {a} up && ip -n {s} link set {b} up && \
             ip -n {p} route add default via {SRV_IP}",
            p = pod.name(),
            s = srv.name()
        ));
        Self {
            pod,
            srv,
            cgroup: TestCgroup::new(),
        }
    }

    /// [`Self::new`] with IPv6 too: `fd77::1/64` in the pod, `fd77::2/64` in
    /// the server namespace (no duplicate address detection, so both are
    /// usable at once), the default IPv6 route via the server.
    #[must_use]
    pub fn dual_stack() -> Self {
        let topo = Self::new();
        let (a, b) = (
            format!("{}a", topo.pod.name()),
            format!("{}b", topo.srv.name()),
        );
        sh(&format!(
            "ip -n {p} -6 addr add {POD_IP6}/64 dev {a} nodad && \
             ip -n {s} -6 addr add {SRV_IP6}/64 dev {b} nodad && \
             ip -n {p} -6 route add default via {SRV_IP6}",
            p = topo.pod.name(),
            s = topo.srv.name()
        ));
        topo
    }

    /// Moves this test process into the pod's cgroup until the guard drops.
    /// Sockets a thread then creates inside the pod's namespace belong to
    /// the pod, exactly as an app's would.
    #[must_use]
    pub fn enter_pod_cgroup(&self) -> InCgroup {
        InCgroup::enter(self.cgroup.path())
    }

    /// What `run` needs to serve this pod: `--netns POD --cgroup CG`.
    #[must_use]
    pub fn serve_args(&self) -> Vec<&str> {
        vec![
            "--netns",
            self.pod.path_str(),
            "--cgroup",
            self.cgroup.path().to_str().expect("a UTF-8 path"),
        ]
    }

    /// `--mode M` and [`Self::serve_args`].
    #[must_use]
    pub fn agent_args(&self, mode: RedirectMode) -> Vec<&str> {
        let mut args = vec!["--mode", mode.arg()];
        args.extend(self.serve_args());
        args
    }

    /// The agent serving this pod in `mode`, [`Self::agent_args`] then
    /// `extra`, started where `placement` says.
    #[must_use]
    pub fn run_agent(&self, mode: RedirectMode, placement: Placement, extra: &[&str]) -> Agent {
        let mut args = self.agent_args(mode);
        args.extend(extra);
        let cgroup = match placement {
            Placement::Outside => None,
            Placement::Inside => Some(&self.cgroup),
        };
        Agent::run(&args, cgroup)
    }

    /// Connects from inside the pod: the socket is created in the pod's
    /// namespace, by a process in the pod's cgroup (the caller holds the
    /// [`Self::enter_pod_cgroup`] guard); blocking, with a 30 s read timeout.
    #[must_use]
    pub fn pod_connect_blocking(&self, addr: impl Into<SocketAddr>) -> TcpStream {
        let addr = addr.into();
        let s = self
            .pod
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// [`Self::pod_connect_blocking`], driven like a network app: poll, then I/O.
    #[must_use]
    pub fn pod_connect(&self, addr: impl Into<SocketAddr>) -> PollStream {
        PollStream::new(self.pod_connect_blocking(addr), Duration::from_secs(30)).unwrap()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// The whole test process in a cgroup (cgroup2 membership is per process),
/// moved back where it was on drop.
pub struct InCgroup {
    previous: PathBuf,
}

impl InCgroup {
    #[must_use]
    pub fn enter(cgroup: &Path) -> Self {
        let previous = agent::cgroup::own().expect("own cgroup");
        move_self(cgroup);
        Self { previous }
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        move_self(&self.previous);
    }
}

fn move_self(cgroup: &Path) {
    fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()))
        .unwrap_or_else(|e| panic!("moving the test process into {}: {e}", cgroup.display()));
}

/// Packets `lo` sent, in the calling thread's namespace.
/// [`lo_tx_packets`] of the namespace at `netns` (a container's pod).
#[must_use]
pub fn lo_tx_packets_in(netns: &std::path::Path) -> u64 {
    agent::netns::Netns::open(netns)
        .expect("the pod's namespace")
        .run(lo_tx_packets)
        .expect("entering the pod's namespace")
}

#[must_use]
pub fn lo_tx_packets() -> u64 {
    let dev = fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev");
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|rest| rest.split_whitespace().nth(9))
        .and_then(|v| v.parse().ok())
        .expect("lo line in net/dev")
}
