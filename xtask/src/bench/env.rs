//! The throwaway world the benchmark runs in: one server namespace, and
//! per mode a pod namespace (joined to the server's by its own veth pair)
//! with its own cgroup, agent and proxy, all up for the whole run so modes
//! can be interleaved cell by cell without restarts. Dropping [`Env`]
//! removes every process, namespace, cgroup and file it made.

use std::{
    fmt::Write as _,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Mode, ProxyWays,
    proto::{ClientJob, ClientResult, Job, SERVER_READY},
};
use crate::cmd;

/// Where each process runs: CPU numbers for `sched_setaffinity`.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// The load client and the upstream servers.
    pub app_cpu: usize,
    /// The proxy (the whole agent process, or HAProxy).
    pub proxy_cpu: usize,
}

pub const PROXY_UID: u32 = 1337;

/// One mode's pod.
pub struct Pod {
    pub mode: Mode,
    pub netns: String,
    pub cgroup: PathBuf,
    agent_cgroup: PathBuf,
    /// The server's address as this pod reaches it.
    pub server_ip: Ipv4Addr,
    agent: Option<Agent>,
    haproxy: Option<Child>,
    haproxy_config: Option<PathBuf>,
}

impl Pod {
    /// The process doing the proxy's work (the agent or HAProxy).
    pub fn proxy_pid(&self) -> Option<u32> {
        self.haproxy
            .as_ref()
            .map(Child::id)
            .or_else(|| self.agent.as_ref().map(|a| a.child.id()))
    }
}

struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

pub struct Env {
    tag: String,
    cgroup_base: PathBuf,
    srv_netns: String,
    pub pods: Vec<Pod>,
    server: Option<Child>,
    agent_bin: PathBuf,
    worker_bin: PathBuf,
    pub placement: Placement,
    proxy_workers: u16,
    /// A control-socket directory of our own, when the agent has
    /// `--control-dir`: `status` then asks only our agents (one that hangs
    /// elsewhere on the machine cannot slow every cell down).
    control_dir: Option<PathBuf>,
}

impl Env {
    pub fn new(
        modes: &[Mode],
        agent_bin: &Path,
        worker_bin: &Path,
        placement: Placement,
        proxy_workers: u16,
        body_sizes: &[usize],
    ) -> Result<Self> {
        let tag = format!("mrb{}", std::process::id() % 100_000);
        let cgroup_base = crate::host::cgroup2_root()?.join(format!("{tag}-bench"));
        let control_dir = (supports(agent_bin, "run", "--control-dir")
            && supports(agent_bin, "status", "--control-dir"))
        .then(|| PathBuf::from(format!("/run/{tag}")));
        let mut env = Self {
            srv_netns: format!("{tag}-srv"),
            tag,
            cgroup_base,
            pods: Vec::new(),
            server: None,
            agent_bin: agent_bin.to_owned(),
            worker_bin: worker_bin.to_owned(),
            placement,
            proxy_workers,
            control_dir,
        };
        if let Some(d) = &env.control_dir {
            fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        env.create_topology(modes)?;
        env.start_server(body_sizes)?;
        for i in 0..env.pods.len() {
            env.start_proxy(i)?;
        }
        Ok(env)
    }

    fn create_topology(&mut self, modes: &[Mode]) -> Result<()> {
        fs::create_dir(&self.cgroup_base)
            .with_context(|| format!("mkdir {}", self.cgroup_base.display()))?;
        let srv = self.srv_netns.clone();
        let mut script = format!(
            "set -e\nip netns add {srv}\nip -n {srv} link set lo up\n{}\n",
            sysctls(&srv)
        );
        for (i, &mode) in modes.iter().enumerate() {
            let netns = format!("{}-{}", self.tag, mode.label().to_lowercase());
            let subnet = 10 + u8::try_from(i).expect("few modes");
            let (a, b) = (format!("{}p{i}", self.tag), format!("{}s{i}", self.tag));
            let _ = write!(
                script,
                "ip netns add {netns}\nip -n {netns} link set lo up\n\
                 ip link add {a} type veth peer name {b}\n\
                 ip link set {a} netns {netns}\nip link set {b} netns {srv}\n\
                 ip -n {netns} addr add 10.99.{subnet}.1/24 dev {a}\n\
                 ip -n {srv} addr add 10.99.{subnet}.2/24 dev {b}\n\
                 ip -n {netns} link set {a} up\nip -n {srv} link set {b} up\n{}\n",
                sysctls(&netns)
            );
            let cgroup = self.cgroup_base.join(format!("pod-{}", mode.label()));
            let agent_cgroup = self.cgroup_base.join(format!("agent-{}", mode.label()));
            for c in [&cgroup, &agent_cgroup] {
                fs::create_dir(c).with_context(|| format!("mkdir {}", c.display()))?;
            }
            self.pods.push(Pod {
                mode,
                netns,
                cgroup,
                agent_cgroup,
                server_ip: Ipv4Addr::new(10, 99, subnet, 2),
                agent: None,
                haproxy: None,
                haproxy_config: None,
            });
        }
        cmd::run(Command::new("sh").args(["-c", &script]))
    }

    fn start_server(&mut self, body_sizes: &[usize]) -> Result<()> {
        let job = serde_json::to_string(&Job::Server {
            body_sizes: body_sizes.to_vec(),
        })?;
        let mut c = Command::new(&self.worker_bin);
        c.args(["bench", "worker", &job])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_in(
            &mut c,
            Some(&self.srv_netns),
            None,
            Some(self.placement.app_cpu),
        )?;
        let stdout = child.stdout.take().context("server stdout")?;
        self.server = Some(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != SERVER_READY {
            bail!("the bench server did not start (said {line:?})");
        }
        Ok(())
    }

    fn start_proxy(&mut self, i: usize) -> Result<()> {
        let pod = &self.pods[i];
        let Some(agent_args) = pod.mode.agent_args(self.proxy_workers) else {
            return Ok(());
        };
        let netns_path = format!("/var/run/netns/{}", pod.netns);
        let mut c = Command::new(&self.agent_bin);
        c.args(["run", "--netns", &netns_path, "--cgroup"])
            .arg(&pod.cgroup)
            .args(["--admin", ADMIN])
            .args(&agent_args)
            .args(
                self.control_dir
                    .iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--control-dir"), d.as_os_str()]),
            )
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_in(
            &mut c,
            None,
            Some(&pod.agent_cgroup),
            Some(self.placement.proxy_cpu),
        )?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let thread_log = Arc::clone(&log);
        let label = pod.mode.label();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("mesh-redirect ready") {
                    let _ = tx.send(());
                }
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("bench: agent {label}: {line}");
                }
                let mut l = thread_log.lock().expect("log lock");
                if l.len() < 200 {
                    l.push(line);
                }
            }
        });
        let mut agent = Agent { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                break;
            }
            if let Some(status) = agent.child.try_wait()? {
                let log = agent.log.lock().expect("log lock").join("\n");
                bail!("agent for {label} exited before ready ({status}):\n{log}");
            }
            if Instant::now() > deadline {
                let _ = agent.child.kill();
                let _ = agent.child.wait();
                bail!("agent for {label} not ready after 30 s");
            }
        }
        eprintln!(
            "bench: {label}: agent ready (pid {}): mesh-redirect run {}",
            agent.child.id(),
            agent_args.join(" ")
        );
        self.pods[i].agent = Some(agent);
        if self.pods[i].mode.haproxy() {
            self.start_haproxy(i)?;
        }
        Ok(())
    }

    fn start_haproxy(&mut self, i: usize) -> Result<()> {
        let pod = &self.pods[i];
        let config = std::env::temp_dir().join(format!("{}-{}.haproxy.cfg", self.tag, pod.netns));
        fs::write(
            &config,
            format!(
                "global\n  nbthread 1\n  uid {PROXY_UID}\n  gid {PROXY_UID}\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 listen outbound\n  bind 127.0.0.1:15001\n  server o 0.0.0.0:0\n\
                 listen inbound\n  bind 0.0.0.0:15006\n  source 127.0.0.6\n  server i 0.0.0.0:0\n"
            ),
        )?;
        self.pods[i].haproxy_config = Some(config.clone());
        let mut c = Command::new("haproxy");
        // HAProxy drops to uid/gid 1337 itself (`global`): dropping before
        // exec would leave it unable to enter the namespace and cgroup.
        c.arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let pod = &self.pods[i];
        let child = spawn_in(
            &mut c,
            Some(&pod.netns),
            Some(&pod.cgroup),
            Some(self.placement.proxy_cpu),
        )?;
        let netns = pod.netns.clone();
        self.pods[i].haproxy = Some(child);
        // Ready once both ports listen. Never by connecting: a transparent
        // proxy reached directly forwards to its own address, forever.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = cmd::stdout_of(Command::new("ip").args([
                "netns",
                "exec",
                &netns,
                "ss",
                "-Hltn",
                "( sport = :15001 or sport = :15006 )",
            ]))
            .unwrap_or_default();
            if out.lines().count() >= 2 {
                break;
            }
            if Instant::now() > deadline {
                bail!("HAProxy in {netns} did not listen within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("bench: {}: HAProxy listening", self.pods[i].mode.label());
        Ok(())
    }

    /// Fails if an agent or HAProxy has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for pod in &mut self.pods {
            if let Some(a) = &mut pod.agent
                && let Some(st) = a.child.try_wait()?
            {
                let log = a.log.lock().expect("log lock").join("\n");
                bail!("the agent of {} exited ({st}):\n{log}", pod.mode.label());
            }
            if let Some(h) = &mut pod.haproxy
                && let Some(st) = h.try_wait()?
            {
                bail!("HAProxy of {} exited ({st})", pod.mode.label());
            }
        }
        if let Some(s) = &mut self.server
            && let Some(st) = s.try_wait()?
        {
            bail!("the bench server exited ({st})");
        }
        Ok(())
    }

    /// The first line of the agent's log (as kept, ANSI colours removed)
    /// that contains `needle`.
    pub fn agent_log_line(&self, pod_index: usize, needle: &str) -> Option<String> {
        let agent = self.pods.get(pod_index)?.agent.as_ref()?;
        let log = agent.log.lock().expect("log lock");
        log.iter()
            .map(|l| strip_ansi(l))
            .find(|l| l.contains(needle))
    }

    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Runs one client job in `pod` and returns what it measured.
    pub fn run_client(&self, pod: &Pod, job: &ClientJob) -> Result<ClientResult> {
        let spec = serde_json::to_string(&Job::Client(job.clone()))?;
        let mut c = Command::new(&self.worker_bin);
        c.args(["bench", "worker", &spec])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_in(
            &mut c,
            Some(&pod.netns),
            Some(&pod.cgroup),
            Some(self.placement.app_cpu),
        )?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "client failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("client output")
    }

    /// `mesh-redirect status --json --cgroup` for the pod: the datapath's
    /// counters, or `None` when no eBPF datapath serves it.
    pub fn counters(&self, pod: &Pod) -> Result<Option<serde_json::Value>> {
        let out = cmd::output(
            Command::new(&self.agent_bin)
                .args(["status", "--json", "--cgroup"])
                .arg(&pod.cgroup)
                .args(
                    self.control_dir
                        .iter()
                        .flat_map(|d| [std::ffi::OsStr::new("--control-dir"), d.as_os_str()]),
                ),
        )?;
        if !out.status.success() {
            bail!(
                "mesh-redirect status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("mesh-redirect status --json")?;
        Ok(match &json["datapath"] {
            serde_json::Value::Null => None,
            d => Some(d["counters"].clone()),
        })
    }
}

/// Where each pod's agent serves `/metrics`, inside the pod's namespace.
const ADMIN: &str = "127.0.0.1:15000";

/// The built-in proxy's connections and spliced ways so far (its
/// `/metrics`, scraped inside the pod's namespace), or `None` when the
/// built-in proxy does not serve the pod or the scrape failed (said on
/// stderr: the cell's other numbers stand).
pub fn proxy_ways(pod: &Pod) -> Option<ProxyWays> {
    if !pod.mode.builtin_proxy() {
        return None;
    }
    let url = format!("http://{ADMIN}/metrics");
    let out = cmd::stdout_of(Command::new("ip").args([
        "netns",
        "exec",
        &pod.netns,
        "curl",
        "-sSf",
        "--max-time",
        "5",
        &url,
    ]));
    let Some(out) = out else {
        eprintln!(
            "bench: {}: scraping {url} in {} failed; no proxy ways for this cell",
            pod.mode, pod.netns
        );
        return None;
    };
    Some(ProxyWays {
        connections: metric_samples(&out, "mesh_redirect_proxy_connections_total").sum(),
        spliced: metric_samples(&out, "mesh_redirect_proxy_spliced_total").sum(),
    })
}

/// The values of a Prometheus text exposition's samples of `name` (one
/// per label set, or the one without labels).
pub fn metric_samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = u64> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(name)?;
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ")?.1,
            None => rest.strip_prefix(' ')?,
        };
        value.trim().parse::<u64>().ok()
    })
}

/// Empties the pod's conntrack table (with `conntrack -F`), if the tool is
/// there. Returns whether it did.
pub fn flush_conntrack(pod: &Pod) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &pod.netns, "conntrack", "-F"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Env {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            if let Some(mut h) = pod.haproxy.take() {
                let _ = h.kill();
                let _ = h.wait();
            }
            if let Some(mut a) = pod.agent.take() {
                stop(&mut a.child);
            }
            if let Some(c) = pod.haproxy_config.take() {
                let _ = fs::remove_file(c);
            }
        }
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in self
            .pods
            .iter()
            .map(|p| p.netns.as_str())
            .chain([self.srv_netns.as_str()])
        {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        for pod in &self.pods {
            for c in [&pod.cgroup, &pod.agent_cgroup] {
                remove_cgroup(c);
            }
        }
        remove_cgroup(&self.cgroup_base);
        if let Some(d) = &self.control_dir {
            let _ = fs::remove_dir_all(d);
        }
        eprintln!(
            "bench: cleaned up (namespaces {}-*, cgroup {})",
            self.tag,
            self.cgroup_base.display()
        );
    }
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `agent SUBCOMMAND --help` lists `flag`.
fn supports(agent: &Path, subcommand: &str, flag: &str) -> bool {
    cmd::stdout_of(Command::new(agent).args([subcommand, "--help"]))
        .is_some_and(|help| help.contains(flag))
}

/// SIGTERM, then SIGKILL after 10 s.
fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Removes a cgroup once its processes are gone (killing stragglers).
fn remove_cgroup(path: &Path) {
    if !path.exists() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse::<i32>().ok())
        {
            // SAFETY: kill(2) of a process in our own benchmark cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if fs::remove_dir(path).is_ok() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sysctls every namespace gets: a wide ephemeral port range and
/// `TIME_WAIT` reuse, so connect-per-request never runs out of ports.
fn sysctls(netns: &str) -> String {
    format!(
        "ip netns exec {netns} sysctl -qw net.ipv4.ip_local_port_range='10000 65000' net.ipv4.tcp_tw_reuse=1"
    )
}

/// Starts `cmd` inside `netns` and `cgroup`, pinned to `cpu` (each when
/// given), all before exec.
fn spawn_in(
    cmd: &mut Command,
    netns: Option<&str>,
    cgroup: Option<&Path>,
    cpu: Option<usize>,
) -> Result<Child> {
    let ns = netns
        .map(|n| File::open(format!("/var/run/netns/{n}")))
        .transpose()
        .context("opening the namespace")?;
    let procs = cgroup
        .map(|c| OpenOptions::new().write(true).open(c.join("cgroup.procs")))
        .transpose()
        .context("opening cgroup.procs")?;
    // SAFETY: the closure makes only async-signal-safe syscalls (setns,
    // write, sched_setaffinity) on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(ns) = &ns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(p) = &procs
                && libc::write(p.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", cmd::display(cmd)))
}

/// Memory the kernel holds for TCP, all namespaces together (the `mem`
/// of `TCP:` in `/proc/net/sockstat`), in KiB.
pub fn tcp_mem_kib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("TCP:"))?;
            let mut it = line.split_whitespace();
            it.find(|w| *w == "mem")?;
            it.next()?.parse::<u64>().ok()
        })
        .map_or(0, |pages| pages * page / 1024)
}

/// Samples [`tcp_mem_kib`] every 10 ms on a thread until stopped.
pub struct MemWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl MemWatch {
    pub fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = tcp_mem_kib();
            while !thread_stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                peak = peak.max(tcp_mem_kib());
            }
            peak
        });
        Self { stop, thread }
    }

    /// The highest value seen.
    pub fn peak(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Waits (up to `timeout`) until the kernel's TCP memory is back within
/// 16 MiB of `baseline_kib`, so one cell's leftovers (bytes still queued
/// in a socket) do not weigh on the next. Returns whether it got there.
pub fn settle_tcp_mem(baseline_kib: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while tcp_mem_kib() > baseline_kib + 16 * 1024 {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// CPU time all threads of `pid` spent on a CPU so far, in ns
/// (`/proc/PID/task/*/schedstat`).
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::metric_samples;

    fn metric_sum(text: &str, name: &str) -> u64 {
        metric_samples(text, name).sum()
    }

    #[test]
    fn a_metric_is_summed_over_its_label_sets_and_nothing_else() {
        let text = "# HELP mesh_redirect_proxy_spliced Ways\n\
                    # TYPE mesh_redirect_proxy_spliced counter\n\
                    mesh_redirect_proxy_spliced_total{direction=\"outbound\"} 3\n\
                    mesh_redirect_proxy_spliced_total{direction=\"inbound\"} 4\n\
                    mesh_redirect_proxy_spliced_totally 100\n\
                    mesh_redirect_proxy_connections_total 9\n";
        assert_eq!(metric_sum(text, "mesh_redirect_proxy_spliced_total"), 7);
        assert_eq!(metric_sum(text, "mesh_redirect_proxy_connections_total"), 9);
        assert_eq!(metric_sum(text, "mesh_redirect_missing"), 0);
    }
}
