//! The node agent's cost per pod: one `mesh-redirect node` enrolls `pods`
//! fresh network namespaces over its socket, one after another; the
//! latency of each enrollment (request to answer, as the CNI plugin sees
//! it), the agent's own resident memory and descriptors (its `/metrics`)
//! before and after, and the CPU it uses idle with every pod enrolled (a
//! node agent that wakes per pod costs the node even when no pod talks).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct NodeFigures {
    pub pods: usize,
    pub enroll_p50: Duration,
    pub enroll_p99: Duration,
    pub enroll_max: Duration,
    pub memory_per_pod_kib: f64,
    pub descriptors_per_pod: f64,
    pub memory_mib: (f64, f64),
    pub descriptors: (u64, u64),
    /// CPU time of the idle agent with every pod enrolled, in percent of
    /// one core.
    pub idle_cpu_percent: f64,
}

impl NodeFigures {
    /// The report's section.
    #[must_use]
    pub fn markdown(&self) -> String {
        format!(
            "\n## Node mode: the cost of a pod\n\n\
             One `mesh-redirect node` enrolling {pods} network namespaces over its socket, one after another \
             (targets: under 50 ms per enroll, under 1 MiB per pod); then the agent's CPU over {idle} s, every pod enrolled and none talking.\n\n\
             | enroll p50 | enroll p99 | enroll max | memory per pod | descriptors per pod | agent memory | agent descriptors | idle CPU |\n\
             |---|---|---|---|---|---|---|---|\n\
             | {p50:.1} ms | {p99:.1} ms | {max:.1} ms | {mem:.0} KiB | {fds:.1} | {m0:.1} → {m1:.1} MiB | {d0} → {d1} | {cpu:.1}% of a core |\n",
            idle = IDLE.as_secs(),
            pods = self.pods,
            p50 = ms(self.enroll_p50),
            p99 = ms(self.enroll_p99),
            max = ms(self.enroll_max),
            mem = self.memory_per_pod_kib,
            fds = self.descriptors_per_pod,
            m0 = self.memory_mib.0,
            m1 = self.memory_mib.1,
            d0 = self.descriptors.0,
            d1 = self.descriptors.1,
            cpu = self.idle_cpu_percent,
        )
    }
}

impl NodeFigures {
    /// One line for the terminal.
    #[must_use]
    pub fn summary(&self) -> String {
        format!(
            "node mode: {} pods, enroll p50 {:.1} ms p99 {:.1} ms, {:.0} KiB and {:.1} descriptors per pod, idle CPU {:.1}% of a core",
            self.pods,
            ms(self.enroll_p50),
            ms(self.enroll_p99),
            self.memory_per_pod_kib,
            self.descriptors_per_pod,
            self.idle_cpu_percent
        )
    }

    /// Adds [`Self::markdown`] to the report at `path`.
    pub fn append_to(&self, path: &Path) -> Result<()> {
        let mut md = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("appending to {}", path.display()))?;
        md.write_all(self.markdown().as_bytes())?;
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How long the idle agent's CPU is measured.
const IDLE: Duration = Duration::from_secs(3);

/// Percent of one core that process `pid` used over [`IDLE`].
fn idle_cpu(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let ticks = || -> Result<u64> {
        super::report::stat_cpu(&std::fs::read_to_string(&path)?)
            .map(|(_, t)| t)
            .with_context(|| format!("no utime and stime in {path}"))
    };
    let t0 = ticks()?;
    let start = Instant::now();
    std::thread::sleep(IDLE);
    let used = ticks()? - t0;
    #[expect(clippy::cast_precision_loss, reason = "a report")]
    Ok(used as f64 / super::report::ticks_per_second() / start.elapsed().as_secs_f64() * 100.0)
}

/// Network namespaces of our own, deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The node agent, stopped on drop and its pinned datapath removed.
struct NodeAgent {
    child: Child,
    bin: PathBuf,
    dir: PathBuf,
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
        let _ = self.child.wait();
        // A stopped node agent leaves its pods captured for the next one:
        // none is coming.
        let _ = Command::new(&self.bin)
            .arg("cleanup")
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Enrolls `pods` namespaces with a node agent run from `agent_bin`.
pub fn measure(agent_bin: &Path, pods: usize) -> Result<NodeFigures> {
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("mr-bench-node-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("node.sock");
    let admin = {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, l.local_addr()?.port())
    };
    let log = dir.join("agent.log");
    let child = Command::new(agent_bin)
        .args(["node", "--socket"])
        .arg(&socket)
        .args(["--admin", &admin.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting the node agent")?;
    let agent = NodeAgent {
        child,
        bin: agent_bin.to_owned(),
        dir: dir.clone(),
    };
    let deadline = Instant::now() + Duration::from_mins(1);
    while !std::fs::read_to_string(&log)?.contains("mesh-redirect ready") {
        if Instant::now() > deadline {
            bail!(
                "the node agent did not get ready:\n{}",
                std::fs::read_to_string(&log)?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let names = Namespaces(
        (0..pods)
            .map(|i| format!("mrb-node-{tag}-{i}"))
            .collect::<Vec<_>>(),
    );
    for ns in &names.0 {
        crate::cmd::run(Command::new("ip").args(["netns", "add", ns]))?;
        crate::cmd::run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
    }
    let before = footprint(admin)?;
    let mut took = Vec::with_capacity(pods);
    for ns in &names.0 {
        let t0 = Instant::now();
        enroll(&socket, ns).with_context(|| format!("enrolling {ns}"))?;
        took.push(t0.elapsed());
    }
    let after = footprint(admin)?;
    let idle_cpu_percent = idle_cpu(agent.child.id())?;
    took.sort_unstable();
    let at = |p: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a short list"
        )]
        let i = ((took.len() - 1) as f64 * p).round() as usize;
        took[i]
    };
    #[expect(clippy::cast_precision_loss, reason = "a report")]
    let per_pod = |a: u64, b: u64| b.saturating_sub(a) as f64 / pods as f64;
    #[expect(clippy::cast_precision_loss, reason = "a report")]
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    Ok(NodeFigures {
        pods,
        enroll_p50: at(0.5),
        enroll_p99: at(0.99),
        enroll_max: took[took.len() - 1],
        memory_per_pod_kib: per_pod(before.0, after.0) / 1024.0,
        descriptors_per_pod: per_pod(before.1, after.1),
        memory_mib: (mib(before.0), mib(after.0)),
        descriptors: (before.1, after.1),
        idle_cpu_percent,
    })
}

/// One enrollment on the node socket (its wire format: a JSON line each
/// way), as the CNI plugin makes it.
fn enroll(socket: &Path, ns: &str) -> Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request =
        serde_json::json!({"op": "enroll", "netns": format!("/var/run/netns/{ns}"), "pod": ns});
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    let v: serde_json::Value = serde_json::from_str(&answer)
        .with_context(|| format!("the node agent answered {answer:?}"))?;
    if v.get("Ok").is_none() {
        bail!("the node agent refused: {answer}");
    }
    Ok(())
}

/// The agent's resident bytes and descriptors, from its `/metrics`.
fn footprint(admin: SocketAddrV4) -> Result<(u64, u64)> {
    let mut s = TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let metric = |name: &str| -> Result<u64> {
        super::env::metric_samples(&text, name)
            .next()
            .with_context(|| format!("no {name} in the node agent's /metrics"))
    };
    Ok((
        metric("mesh_redirect_resident_memory_bytes")?,
        metric("mesh_redirect_open_descriptors")?,
    ))
}
