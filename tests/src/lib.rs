//! Helpers for the kernel integration tests: every test gets its own
//! network namespace and cgroup, and cleans them up on drop.
//!
//! A test that cannot run here (not root, a kernel feature missing) skips
//! with a line saying why, unless `MESH_REDIRECT_NO_SKIP=1` (CI), where a
//! skip is a failure. Tests panic rather than return errors, so a failure
//! keeps its backtrace.

use std::{
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use agent::netns::Netns;

pub mod admin;
pub mod agent_proc;
pub mod client;
pub mod clients;
pub mod conformance;
pub mod dns;
pub mod farm;
pub mod foreign;
pub mod haproxy;
pub mod looping;
pub mod podman;
pub mod servers;
pub mod topology;
pub mod transfer;

pub use agent_proc::Agent;

/// The redirect mode a shared test body runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RedirectMode {
    Ebpf,
    Iptables,
}

impl RedirectMode {
    /// `run --mode ...`
    #[must_use]
    pub const fn arg(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
        }
    }
}
pub use client::PollStream;
pub use topology::{InCgroup, Placement, Topology};

pub const NO_SKIP_ENV: &str = "MESH_REDIRECT_NO_SKIP";
pub const AGENT_BIN_ENV: &str = "MESH_REDIRECT_BIN";

/// What `cleanup` removes of a node agent that is gone: its pins (the
/// hooks detach) and its list of pods (beside its `socket`).
pub fn remove_node_datapath(socket: &Path) {
    for dir in agent::pins::all_instances(Path::new("/sys/fs/bpf")) {
        if agent::pins::is_node_instance(&dir) {
            agent::pins::remove_instance(&dir).unwrap();
        }
    }
    let _ = fs::remove_file(socket.with_file_name(agent::node::api::STATE_NAME));
}

/// The node datapath's pin directory.
#[must_use]
pub fn node_pins() -> PathBuf {
    agent::pins::all_instances(Path::new("/sys/fs/bpf"))
        .into_iter()
        .find(|d| agent::pins::is_node_instance(d))
        .expect("a node datapath is pinned")
}

/// Skips the current test with a reason, or fails it under `MESH_REDIRECT_NO_SKIP=1`.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        let reason = format!($($arg)*);
        if $crate::no_skip() {
            panic!("would skip, but {}=1: {reason}", $crate::NO_SKIP_ENV);
        }
        eprintln!("SKIPPED: {reason}");
        return;
    }};
}

/// Skips unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            $crate::skip!("needs root (network namespaces, cgroups, eBPF)");
        }
    };
}

/// Heavy tests (GiB transfers, 10,000 connections, slowloris) run only with
/// `MESH_REDIRECT_HEAVY=1` (CI sets it); otherwise they skip, with a reason.
pub const HEAVY_ENV: &str = "MESH_REDIRECT_HEAVY";
/// How many times slower than on real hardware the tests run here (10
/// under qemu's software emulation, set by `cargo xtask vm-test`; 1 when
/// unset). Wall-clock limits are multiplied by it, bulk sizes divided.
pub const TIME_SCALE_ENV: &str = "MESH_REDIRECT_TIME_SCALE";

#[must_use]
pub fn time_scale() -> u32 {
    std::env::var(TIME_SCALE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s| s >= 1)
        .unwrap_or(1)
}

/// A wall-clock limit, stretched by [`time_scale`].
#[must_use]
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    d * time_scale()
}

/// A bulk transfer's size: `full` on real hardware, an eighth under
/// emulation (still far beyond any socket buffer).
#[must_use]
pub fn bulk_bytes(full: usize) -> usize {
    if time_scale() > 1 { full / 8 } else { full }
}

/// Skips unless heavy tests are enabled.
#[macro_export]
macro_rules! require_heavy {
    () => {
        if !std::env::var($crate::HEAVY_ENV).is_ok_and(|v| v == "1") {
            $crate::skip!("a heavy test: set {}=1 to run it", $crate::HEAVY_ENV);
        }
    };
}

/// Raises this process's open-file limit (and its hard limit, to at least 131072).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            // Root may raise the hard limit too: the heavy tests hold both
            // ends of tens of thousands of connections in one process.
            lim.rlim_max = lim.rlim_max.max(1 << 17);
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

#[must_use]
pub fn no_skip() -> bool {
    std::env::var(NO_SKIP_ENV).is_ok_and(|v| v == "1")
}

#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name for this process's n-th resource.
#[must_use]
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// This test process's own directory `<prefix><pid>` under the temporary
/// directory, created if needed, for files written once per process and
/// kept in statics that are never dropped (client programs, content). The
/// directories of processes that are gone are removed first: in a guest
/// whose /tmp is memory, one process per test would otherwise fill it
/// (a Go client of several MiB per conformance cell).
///
/// # Panics
/// When the directory cannot be created.
#[must_use]
pub fn process_dir(prefix: &str) -> PathBuf {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A child cgroup of the cgroup2 root, removed on drop (its processes are
/// killed first).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    #[must_use]
    pub fn new() -> Self {
        let root = agent::cgroup::cgroup2_root().expect("cgroup2 mounted");
        let path = root.join(unique("mrt-"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// PIDs in the cgroup.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.pids() {
                // SAFETY: plain kill(2) of a process in our test cgroup.
                unsafe { libc::kill(pid.cast_signed(), libc::SIGKILL) };
            }
            if fs::remove_dir(&self.path).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A named network namespace (`ip netns add`) with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
    /// `/var/run/netns/<name>`.
    path: String,
}

impl TestNetns {
    #[must_use]
    pub fn new() -> Self {
        let name = unique("mrt");
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        let path = format!("/var/run/netns/{name}");
        Self { name, path }
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.path)
    }

    /// [`Self::path`], as an agent argument.
    #[must_use]
    pub fn path_str(&self) -> &str {
        &self.path
    }

    #[must_use]
    pub fn open(&self) -> Netns {
        Netns::open(&self.path()).expect("open test netns")
    }

    /// Runs a shell command inside the namespace; panics on failure.
    #[expect(clippy::must_use_candidate, reason = "often run for its effect alone")]
    pub fn sh(&self, script: &str) -> String {
        sh(&format!(
            "ip netns exec {} sh -c {}",
            self.name,
            shell_quote(script)
        ))
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.open().run(f).expect("enter test netns")
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a shell script on the host; panics with its output on failure.
#[expect(clippy::must_use_candidate, reason = "often run for its effect alone")]
pub fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[must_use]
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Starts `cmd` inside `netns` (if any) and `cgroup` (if any), before exec.
pub fn spawn_in(
    cmd: &mut Command,
    netns: Option<&TestNetns>,
    cgroup: Option<&TestCgroup>,
) -> Child {
    spawn_in_cgroup(cmd, netns, cgroup.map(TestCgroup::path))
}

/// [`spawn_in`] with any cgroup2 directory.
pub fn spawn_in_cgroup(
    cmd: &mut Command,
    netns: Option<&TestNetns>,
    cgroup: Option<&Path>,
) -> Child {
    enter_before_exec(cmd, netns, cgroup);
    cmd.stdin(Stdio::null())
        .spawn()
        .expect("spawn test process")
}

/// Makes `cmd` enter `netns` (if any) and `cgroup` (if any) between fork
/// and exec; its stdio stays as the caller sets it.
pub fn enter_before_exec(cmd: &mut Command, netns: Option<&TestNetns>, cgroup: Option<&Path>) {
    let ns = netns.map(TestNetns::open);
    let procs = cgroup.map(|c| c.join("cgroup.procs"));
    // SAFETY: the closure only makes async-signal-safe syscalls (setns,
    // open/write/close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(ns) = &ns {
                ns.enter().map_err(std::io::Error::other)?;
            }
            if let Some(p) = &procs {
                fs::OpenOptions::new()
                    .write(true)
                    .open(p)?
                    .write_all(b"0")?;
            }
            Ok(())
        });
    }
}

/// The agent binary: `MESH_REDIRECT_BIN`, else next to the test binaries.
#[must_use]
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os(AGENT_BIN_ENV) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> -> target/<profile>/mesh-redirect
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("mesh-redirect"))
        .expect("agent binary next to the test binaries")
}

/// Kernel memory held by the established TCP sockets in `netns` that have
/// `port` at either end (for a connection, both of its sockets there): the
/// receive and send queues and forward allocations `ss -m` shows, in KiB.
#[must_use]
pub fn socket_memory_kib(netns: &TestNetns, port: u16) -> u64 {
    let out = netns.sh("ss -tmnH state established");
    let suffix = format!(":{port}");
    let mut total = 0u64;
    let mut lines = out.lines();
    while let Some(line) = lines.next() {
        let Some(mem) = lines.next() else { break };
        let ends = line.split_whitespace().skip(2).take(2);
        if !ends.into_iter().any(|e| e.ends_with(&suffix)) {
            continue;
        }
        let inner = mem
            .trim()
            .strip_prefix("skmem:(")
            .and_then(|m| m.strip_suffix(')'))
            .unwrap_or_else(|| panic!("unexpected ss -m line: {mem}"));
        for field in inner.split(',') {
            let (name, value) =
                field.split_at(field.find(|c: char| c.is_ascii_digit()).unwrap_or(0));
            if matches!(name, "r" | "w" | "f") {
                total += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total / 1024
}

/// A running agent's resident memory (KiB) and open descriptors: its main
/// table's and each proxy worker's own (they unshare theirs), as its
/// `/metrics` count them.
#[must_use]
pub fn agent_footprint(pid: u32) -> (u64, usize) {
    let (resident, descriptors) =
        agent::admin::metrics::footprint(Path::new(&format!("/proc/{pid}")));
    assert!(resident > 0, "no VmRSS in agent {pid}'s status");
    (
        resident / 1024,
        usize::try_from(descriptors).expect("a descriptor count"),
    )
}
