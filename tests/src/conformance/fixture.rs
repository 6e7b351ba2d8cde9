//! One pod per (mode, proxy): its agent, its proxy, the upstream servers
//! and the app, serving every cell of that mode and proxy in turn (the
//! agent's and the JVM's start-up are paid once, not per cell).

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use agent_common::Counter;

use super::{
    Client, Direction, Observation, Proxy, Scenario,
    content::Content,
    runners::{self, JavaDriver, Side},
    upstream::{Record, Upstream},
};
use crate::{
    Agent, RedirectMode, Topology, clients,
    haproxy::Haproxy,
    scaled,
    topology::{POD_IP, SRV_IP},
};

/// `clients/conformance/blocking_proxy.py`.
pub const BLOCKING_PROXY_PY: &str = include_str!("../../clients/conformance/blocking_proxy.py");
/// The uid the external proxies run as (`--proxy-uid`).
const PROXY_UID: &str = "1337";

/// A transparent proxy of our own choosing in external mode.
enum External {
    Haproxy(#[expect(dead_code, reason = "held for its Drop")] Haproxy),
    Blocking(#[expect(dead_code, reason = "held for its Drop")] BlockingProxy),
}

/// Fields drop in order: the clients' JVMs and the proxy, then the
/// servers, the agent (which detaches everything) and the namespaces.
pub struct Fixture {
    /// The Java drivers of the outbound and the inbound side.
    java: [Mutex<Option<JavaDriver>>; 2],
    _external: Option<External>,
    /// The upstream, in the server namespace.
    upstream: Upstream,
    /// The app, in the pod.
    app: Upstream,
    _agent: Agent,
    topo: Topology,
    /// The test process's own cgroup (where inbound clients run).
    home: PathBuf,
    mode: RedirectMode,
    seq: AtomicU64,
}

impl Fixture {
    /// A pod served in `mode`, its traffic through `proxy`.
    #[must_use]
    pub fn new(mode: RedirectMode, proxy: Proxy, content: &Arc<Content>, home: &Path) -> Self {
        let topo = Topology::new();
        let upstream = Upstream::start(&topo.srv, SRV_IP, Arc::clone(content));
        let mut args = topo.agent_args(mode);
        if proxy != Proxy::Builtin {
            args.extend([
                "--proxy",
                "external",
                "--proxy-uid",
                PROXY_UID,
                "--proxy-gid",
                PROXY_UID,
            ]);
        }
        // Started from our own cgroup, as `Placement::Outside`.
        let agent = Agent::run_in(&args, home);
        let app = {
            let _in_pod = topo.enter_pod_cgroup();
            Upstream::start(&topo.pod, Ipv4Addr::UNSPECIFIED, Arc::clone(content))
        };
        // External proxies after the agent: in eBPF mode their inbound
        // listener registers itself when it calls listen(2).
        let external = match proxy {
            Proxy::Builtin => None,
            Proxy::Haproxy => Some(External::Haproxy(Haproxy::start(&topo))),
            Proxy::BlockingPy => Some(External::Blocking(BlockingProxy::start(&topo))),
        };
        Self {
            java: [Mutex::new(None), Mutex::new(None)],
            _external: external,
            upstream,
            app,
            _agent: agent,
            topo,
            home: home.to_owned(),
            mode,
            seq: AtomicU64::new(0),
        }
    }

    fn side(&self, direction: Direction) -> (Side<'_>, &Upstream) {
        match direction {
            Direction::Outbound => (
                Side {
                    netns: &self.topo.pod,
                    cgroup: self.topo.cgroup.path(),
                    in_pod: true,
                    host: SRV_IP,
                    java: &self.java[0],
                },
                &self.upstream,
            ),
            Direction::Inbound => (
                Side {
                    netns: &self.topo.srv,
                    cgroup: &self.home,
                    in_pod: false,
                    host: POD_IP,
                    java: &self.java[1],
                },
                &self.app,
            ),
        }
    }

    /// What the short-circuit did so far, in eBPF mode.
    fn short_circuit(&self) -> Option<ShortCircuit> {
        (self.mode == RedirectMode::Ebpf).then(|| {
            let s = agent::inspect::snapshot(self.topo.cgroup.path())
                .ok()
                .flatten();
            let c = |counter| s.as_ref().map_or(0, |s| s.counter(counter));
            ShortCircuit {
                inserted: c(Counter::SockhashInserted),
                refused_blocking: c(Counter::SockhashRefusedBlocking),
                redirected: c(Counter::MsgRedirected),
            }
        })
    }

    /// Runs `scenario` for every client at once: what each saw, and what
    /// its server saw.
    #[must_use]
    pub fn run_batch(
        &self,
        scenario: Scenario,
        direction: Direction,
        clients: &[Client],
        content: &Content,
    ) -> Batch {
        let before = self.short_circuit();
        let (side, server) = self.side(direction);
        let mode = &self.mode.arg()[..1];
        let cells: Vec<(Client, String)> = clients
            .iter()
            .map(|&c| {
                (
                    c,
                    format!("{mode}{}", self.seq.fetch_add(1, Ordering::Relaxed)),
                )
            })
            .collect();
        let observations: Vec<Observation> = std::thread::scope(|s| {
            let running: Vec<_> = cells
                .iter()
                .map(|(client, id)| {
                    let side = &side;
                    s.spawn(move || runners::run(*client, scenario, side, id, content))
                })
                .collect();
            running
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Observation::error("the cell's thread panicked"))
                })
                .collect()
        });
        // A JVM that missed a deadline still runs that cell: start afresh.
        let mut java = side.java.lock().unwrap();
        if java.as_ref().is_some_and(|d| d.hung) {
            *java = None;
        }
        drop(java);
        // What the server records after the client's end (a failed call
        // of its own, say) has a moment to land.
        std::thread::sleep(scaled(Duration::from_millis(100)));
        Batch {
            cells: cells
                .into_iter()
                .zip(observations)
                .map(|((client, id), obs)| (client, obs, server.record(&id)))
                .collect(),
            short_circuit: before.zip(self.short_circuit()).map(|(b, a)| a.since(b)),
        }
    }
}

/// What a batch of one mode gave.
pub struct Batch {
    /// Each client's observation and what its server saw.
    pub cells: Vec<(Client, Observation, Record)>,
    /// In eBPF mode, what the short-circuit did meanwhile.
    pub short_circuit: Option<ShortCircuit>,
}

/// The datapath's counters of the short-circuit (for the log: whether a
/// cell's sockets were short-circuited is the datapath's choice, e.g. not
/// for blocking sockets, and no application can tell).
#[derive(Debug, Clone, Copy)]
pub struct ShortCircuit {
    /// Sockets put into the SOCKHASH.
    pub inserted: u64,
    /// Sockets left out because their reads block.
    pub refused_blocking: u64,
    /// Messages moved socket to socket.
    pub redirected: u64,
}

impl ShortCircuit {
    fn since(self, before: Self) -> Self {
        Self {
            inserted: self.inserted.saturating_sub(before.inserted),
            refused_blocking: self
                .refused_blocking
                .saturating_sub(before.refused_blocking),
            redirected: self.redirected.saturating_sub(before.redirected),
        }
    }
}

/// `clients/conformance/blocking_proxy.py` in the pod's namespace and
/// cgroup, as uid 1337.
pub struct BlockingProxy {
    child: Child,
}

impl BlockingProxy {
    /// Starts it; returns once it listens.
    ///
    /// # Panics
    /// If it does not come up within 10 s.
    #[must_use]
    pub fn start(topo: &Topology) -> Self {
        let mut cmd = Command::new(clients::PYTHON);
        cmd.args(["-c", BLOCKING_PROXY_PY, PROXY_UID])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::enter_before_exec(&mut cmd, Some(&topo.pod), Some(topo.cgroup.path()));
        let mut child = cmd.spawn().expect("start the blocking proxy");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[blocking-proxy] {line}");
            }
        });
        let proxy = Self { child };
        match rx.recv_timeout(scaled(Duration::from_secs(10))) {
            Ok(line) if line == "listening" => proxy,
            other => panic!("the blocking proxy did not come up: {other:?}"),
        }
    }
}

impl Drop for BlockingProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
