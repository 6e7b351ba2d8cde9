//! `cargo xtask bench`: is the short-circuit faster, and by how much? One
//! reproducible run that interleaves every mode, cell by cell, round by
//! round, on fixed CPUs, and writes a Markdown report and an SVG chart of
//! the ratios under `target/bench/`.
//!
//! Modes (each in its own pod namespace and cgroup, all up for the whole
//! run, joined by veth to one server namespace):
//! M0 direct; M1 iptables + built-in proxy; M2 eBPF connect4 only (no
//! sockmap) + built-in proxy; M3 eBPF connect4 + sockmap + built-in proxy;
//! H1 iptables + HAProxy; H3 eBPF connect4 + sockmap + HAProxy.
//! Then node mode's cost per pod ([`node`]): enroll latency, memory and
//! descriptors of one node agent as it enrolls 110 pods (20 with --quick).
//!
//! The load client and the servers are this same binary, re-executed as
//! `xtask bench worker JOB` (built in release): the client starts inside the
//! pod's namespace and cgroup (before exec), so its sockets are the pod's.

mod chart;
mod client;
mod env;
mod node;
mod proto;
mod report;
mod server;
mod stats;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use self::{
    env::{Env, Placement, process_cpu_ns},
    proto::{ClientJob, ClientResult, Job, Scenario},
};
use crate::{build, cmd, setup};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Options {
    #[command(subcommand)]
    worker: Option<WorkerCommand>,
    /// Smoke run for CI (under 2 minutes): short cells, 2 rounds; checks
    /// that every cell produced numbers and the counters are consistent,
    /// never a speed.
    #[arg(long)]
    quick: bool,
    /// Rounds (every cell, every mode, per round). Default: 11, or 2 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
    /// CPU of the load client and the upstream servers.
    #[arg(long, default_value_t = 0)]
    app_cpu: usize,
    /// CPU of the proxy (the whole agent process, or HAProxy).
    #[arg(long, default_value_t = 1)]
    proxy_cpu: usize,
    /// S2's fixed request rate (requests/s, over --s2-conns connections).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    s2_rate: u32,
    /// S2's keep-alive connections.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    s2_conns: u32,
    /// Worker threads of the built-in proxy (HAProxy runs `nbthread 1`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    proxy_workers: u16,
    /// Only these modes (comma-separated, e.g. M1,M3); targets that need a
    /// missing mode are reported as not measured.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    modes: Vec<Mode>,
    /// Only these scenarios (comma-separated: s1,s2,s4,s5,s6).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Benchmark this agent binary instead of building one (it must embed
    /// the eBPF object, as `cargo xtask build` makes it).
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
    /// Measure nothing: write the report and chart again from the raw
    /// numbers of an earlier run (the `.json` next to its report).
    #[arg(long, value_name = "JSON")]
    rerender: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Subcommand)]
enum WorkerCommand {
    /// A load client or the servers (internal: JSON job).
    #[command(hide = true)]
    Worker { job: String },
}

/// How a pod's traffic reaches its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    M0,
    M1,
    M2,
    M3,
    H1,
    H3,
    /// M1 with `--splice`: bulk out of the app moved with splice(2).
    M1S,
}

impl Mode {
    pub const ALL: [Self; 7] = [
        Self::M0,
        Self::M1,
        Self::M2,
        Self::M3,
        Self::H1,
        Self::H3,
        Self::M1S,
    ];
    /// A run without `--modes` (the splice mode only when asked for).
    pub const DEFAULT: [Self; 6] = [Self::M0, Self::M1, Self::M2, Self::M3, Self::H1, Self::H3];

    pub const fn label(self) -> &'static str {
        match self {
            Self::M0 => "M0",
            Self::M1 => "M1",
            Self::M2 => "M2",
            Self::M3 => "M3",
            Self::H1 => "H1",
            Self::H3 => "H3",
            Self::M1S => "M1S",
        }
    }

    pub const fn describe(self) -> &'static str {
        match self {
            Self::M0 => "direct: no agent, no proxy",
            Self::M1 => "`run --mode iptables`, built-in proxy",
            Self::M2 => "`run --mode ebpf --no-sockmap` (connect4 only), built-in proxy",
            Self::M3 => "`run --mode ebpf` (connect4 + sockmap), built-in proxy",
            Self::H1 => "`run --mode iptables --proxy external`, HAProxy",
            Self::H3 => "`run --mode ebpf --proxy external` (connect4 + sockmap), HAProxy",
            Self::M1S => "M1 with `--splice`: bulk out of the app moved with splice(2)",
        }
    }

    /// `mesh-redirect run` arguments besides the namespace and cgroup.
    fn agent_args(self, workers: u16) -> Option<Vec<String>> {
        let external = [
            "--proxy",
            "external",
            "--proxy-uid",
            "1337",
            "--proxy-gid",
            "1337",
        ];
        let args: Vec<&str> = match self {
            Self::M0 => return None,
            Self::M1 => vec!["--mode", "iptables"],
            Self::M2 => vec!["--mode", "ebpf", "--no-sockmap"],
            Self::M3 => vec!["--mode", "ebpf"],
            Self::H1 => [&["--mode", "iptables"][..], &external].concat(),
            Self::H3 => [&["--mode", "ebpf"][..], &external].concat(),
            Self::M1S => vec!["--mode", "iptables", "--splice"],
        };
        let mut args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        if !self.haproxy() {
            args.extend(["--workers".to_owned(), workers.to_string()]);
        }
        Some(args)
    }

    /// The agent's built-in proxy serves the pod (its `/metrics` count
    /// what it relayed).
    pub const fn builtin_proxy(self) -> bool {
        !matches!(self, Self::M0 | Self::H1 | Self::H3)
    }

    pub const fn haproxy(self) -> bool {
        matches!(self, Self::H1 | Self::H3)
    }

    /// An eBPF datapath serves the pod (counters to read).
    pub const fn ebpf(self) -> bool {
        matches!(self, Self::M2 | Self::M3 | Self::H3)
    }

    /// The sk_msg short-circuit should carry the pod's bytes.
    pub const fn sockmap(self) -> bool {
        matches!(self, Self::M3 | Self::H3)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::ALL
        .into_iter()
        .find(|m| m.label().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| format!("unknown mode {s:?} (M0 M1 M2 M3 H1 H3 M1S)"))
}

/// One scenario at one size: a row group of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Cell {
    S1,
    S2,
    S4,
    /// Write size in bytes.
    S5(usize),
    /// Body size in bytes.
    S6(usize),
}

pub const KIB: usize = 1024;
pub const MB: usize = 1_000_000;
const S5_SIZES: [usize; 3] = [KIB, 16 * KIB, 128 * KIB];
const S6_SIZES: [usize; 2] = [MB, 100 * MB];

impl Cell {
    fn all() -> Vec<Self> {
        let mut v = vec![Self::S1, Self::S2, Self::S4];
        v.extend(S5_SIZES.map(Self::S5));
        v.extend(S6_SIZES.map(Self::S6));
        v
    }

    fn scenario_name(self) -> &'static str {
        match self {
            Self::S1 => "s1",
            Self::S2 => "s2",
            Self::S4 => "s4",
            Self::S5(_) => "s5",
            Self::S6(_) => "s6",
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::S1 => "S1 1-byte RR".into(),
            Self::S2 => "S2 HTTP open-loop".into(),
            Self::S4 => "S4 conn/request".into(),
            Self::S5(w) => format!("S5 {} KiB writes", w / KIB),
            Self::S6(b) => format!("S6 {} MB body", b / MB),
        }
    }
}

/// Durations and sizes of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub quick: bool,
    pub rounds: u32,
    pub modes: Vec<Mode>,
    pub cells: Vec<Cell>,
    pub placement: Placement,
    pub s2_rate: u32,
    pub s2_conns: u32,
    pub proxy_workers: u16,
    pub s1_ms: u64,
    pub s2_ms: u64,
    pub s4_ms: u64,
    pub s5_ms: u64,
    pub s6_small_count: u32,
}

impl Plan {
    fn new(o: &Options) -> Result<Self> {
        let modes = if o.modes.is_empty() {
            Mode::DEFAULT.to_vec()
        } else {
            let mut m = o.modes.clone();
            m.sort_unstable();
            m.dedup();
            m
        };
        let scenarios: Vec<String> = o.scenarios.iter().map(|s| s.to_lowercase()).collect();
        for s in &scenarios {
            if !["s1", "s2", "s4", "s5", "s6"].contains(&s.as_str()) {
                bail!("unknown scenario {s:?} (s1 s2 s4 s5 s6)");
            }
        }
        let cells = Cell::all()
            .into_iter()
            .filter(|c| scenarios.is_empty() || scenarios.iter().any(|s| s == c.scenario_name()))
            .collect();
        let ncpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        for cpu in [o.app_cpu, o.proxy_cpu] {
            if cpu >= ncpu {
                bail!("CPU {cpu} does not exist here ({ncpu} CPUs)");
            }
        }
        let q = o.quick;
        Ok(Self {
            quick: q,
            rounds: o.rounds.unwrap_or(if q { 2 } else { 11 }),
            modes,
            cells,
            placement: Placement {
                app_cpu: o.app_cpu,
                proxy_cpu: o.proxy_cpu,
            },
            s2_rate: o.s2_rate,
            s2_conns: o.s2_conns,
            proxy_workers: o.proxy_workers,
            // Many short rounds rather than a few long ones: on a shared
            // machine, noise comes in bursts of seconds, and the median of
            // per-round ratios shrugs off a burst that hits a few rounds.
            s1_ms: if q { 300 } else { 1000 },
            s2_ms: if q { 500 } else { 2000 },
            s4_ms: if q { 300 } else { 1000 },
            s5_ms: if q { 200 } else { 1000 },
            s6_small_count: if q { 5 } else { 10 },
        })
    }

    /// The same plan with every cell short (the warm-up round).
    fn warmup(&self) -> Self {
        Self {
            s1_ms: 200,
            s2_ms: 300,
            s4_ms: 200,
            s5_ms: 150,
            s6_small_count: 3,
            ..self.clone()
        }
    }

    fn job(&self, cell: Cell, server: std::net::Ipv4Addr) -> ClientJob {
        let (scenario, duration_ms) = match cell {
            Cell::S1 => (Scenario::PingPong, self.s1_ms),
            Cell::S2 => (
                Scenario::HttpOpenLoop {
                    rate: self.s2_rate,
                    conns: self.s2_conns,
                },
                self.s2_ms,
            ),
            Cell::S4 => (Scenario::ConnectPerRequest, self.s4_ms),
            Cell::S5(write_size) => (Scenario::Upload { write_size }, self.s5_ms),
            Cell::S6(size) => (
                Scenario::Download {
                    size,
                    count: if size >= 10 * MB {
                        1
                    } else {
                        self.s6_small_count
                    },
                },
                0,
            ),
        };
        ClientJob {
            scenario,
            server,
            duration_ms,
        }
    }
}

/// The datapath's counters that matter here (deltas over one cell).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Counters {
    pub connect_redirected: u64,
    pub msg_redirected: u64,
    pub msg_passed: u64,
    /// Messages sent over TCP because their reader held more than the
    /// sockmap queue limit (the backpressure); they count in `msg_passed`.
    #[serde(default)]
    pub msg_spilled: u64,
    /// Messages sent over TCP to keep the byte order (earlier bytes of the
    /// same direction still in TCP); they count in `msg_passed`.
    #[serde(default)]
    pub msg_gated: u64,
    /// Messages sent over TCP because the sender or the reader does
    /// blocking reads where the kernel makes those unsafe in a sockmap.
    #[serde(default)]
    pub msg_blocking: u64,
    /// Bytes of the pod's short-circuited sockets moved by the sockmap.
    #[serde(default)]
    pub bytes_redirected: u64,
    /// Bytes of the pod's short-circuited sockets sent over TCP.
    #[serde(default)]
    pub bytes_passed: u64,
    /// Sockets kept out of the short-circuit because the connections to
    /// their destination were short (`sockhash_skipped_short`): by design.
    #[serde(default)]
    pub skipped_short: u64,
}

impl Counters {
    /// Messages sent over TCP for a reason the datapath counted.
    #[must_use]
    pub const fn passed_for_a_reason(&self) -> u64 {
        self.msg_spilled + self.msg_gated + self.msg_blocking
    }

    /// The share of bytes the short-circuit carried, `None` with no bytes.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
    pub fn short_circuited_share(&self) -> Option<f64> {
        let all = self.bytes_redirected + self.bytes_passed;
        (all > 0).then(|| self.bytes_redirected as f64 / all as f64)
    }
}

/// Everything measured for one (round, cell, mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub client: ClientResult,
    pub proxy_cpu_ns: u64,
    pub server_cpu_ns: u64,
    /// `None`: no eBPF datapath serves this pod.
    pub counters: Option<Counters>,
    pub conntrack_flushed: bool,
    /// Peak of the kernel's TCP memory during the cell, above its level
    /// before (all namespaces; bytes queued in sockets).
    #[serde(default)]
    pub tcp_mem_peak_kib: u64,
    /// `None`: the built-in proxy does not serve this pod.
    #[serde(default)]
    pub proxy: Option<ProxyWays>,
}

/// How the built-in proxy moved a cell's connections (deltas of its
/// `/metrics`): each connection has two ways (to the upstream and back),
/// and a way either went on through `splice(2)` or was copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyWays {
    pub connections: u64,
    pub spliced: u64,
}

impl ProxyWays {
    /// The ways relayed by copying through the proxy.
    #[must_use]
    pub const fn copied(&self) -> u64 {
        (2 * self.connections).saturating_sub(self.spliced)
    }

    /// What `self` counted since `before`.
    #[must_use]
    pub const fn since(self, before: Self) -> Self {
        Self {
            connections: self.connections.saturating_sub(before.connections),
            spliced: self.spliced.saturating_sub(before.spliced),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub round: u32,
    pub cell: Cell,
    pub mode: Mode,
    pub result: Result<Measured, String>,
}

impl Sample {
    /// The sockmap should have carried this cell but did not: nothing was
    /// redirected, or a message went over TCP for no counted reason (a
    /// silent fallback), or, with nothing passed for a reason, fewer
    /// messages were redirected than operations completed. Messages passed
    /// for the backpressure, the byte order or a blocking reader (see
    /// [`Self::spilled`]) are the design, not a fallback, and so are
    /// connections kept on TCP because their destination's were short
    /// (then only a message passed for no reason is one).
    pub fn fell_back(&self) -> bool {
        if !self.mode.sockmap() {
            return false;
        }
        match &self.result {
            Ok(m) => m.counters.is_none_or(|c| {
                let reasoned = c.passed_for_a_reason();
                let all_carried = c.skipped_short == 0;
                c.msg_passed > reasoned
                    || (all_carried
                        && (c.msg_redirected == 0
                            || (reasoned == 0 && c.msg_redirected < m.client.ops.max(1))))
            }),
            Err(_) => false,
        }
    }

    /// Messages the sk_msg backpressure sent over TCP during this cell (0
    /// when the mode has no sockmap or the cell failed).
    pub fn spilled(&self) -> u64 {
        match &self.result {
            Ok(m) if self.mode.sockmap() => m.counters.map_or(0, |c| c.msg_spilled),
            _ => 0,
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn run(opts: &Options) -> Result<()> {
    if let Some(WorkerCommand::Worker { job }) = &opts.worker {
        return worker(job);
    }
    if let Some(raw) = &opts.rerender {
        let raw: report::Raw = serde_json::from_slice(
            &std::fs::read(raw).with_context(|| format!("reading {}", raw.display()))?,
        )
        .with_context(|| format!("parsing {}", raw.display()))?;
        let out = report::write(&raw.plan, &raw.system, &raw.samples)?;
        println!("{}", out.summary);
        println!("bench: report {}", out.markdown.display());
        println!("bench: chart  {}", out.chart.display());
        return Ok(());
    }
    if !cmd::is_root() {
        bail!("the benchmark needs root (network namespaces, cgroups, eBPF)");
    }
    let plan = Plan::new(opts)?;
    let tc = setup::ensure(&[setup::Need::Tests, setup::Need::Bench])?;
    let agent_bin = match &opts.agent_bin {
        Some(p) => p.clone(),
        None => build::build(&tc, true)?,
    };
    let worker_bin = build_worker()?;
    // Private copies: a build during the run cannot swap the binaries
    // under it (`status` and the workers are started many times).
    let bin_dir = out_dir().join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let snapshot = |from: &Path, name: &str| -> Result<PathBuf> {
        let to = bin_dir.join(name);
        // Through a temporary name: `from` may be `to` itself.
        let tmp = bin_dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::copy(from, &tmp).with_context(|| format!("copying {}", from.display()))?;
        std::fs::rename(&tmp, &to)?;
        Ok(to)
    };
    let agent_bin = snapshot(&agent_bin, "mesh-redirect")?;
    let worker_bin = snapshot(&worker_bin, "xtask-bench-worker")?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    let mut system = report::System::read(&plan);
    let body_sizes: Vec<usize> = plan
        .cells
        .iter()
        .filter_map(|c| match c {
            Cell::S6(b) => Some(*b),
            _ => None,
        })
        .collect();
    let started = Instant::now();
    let mut env = Env::new(
        &plan.modes,
        &agent_bin,
        &worker_bin,
        plan.placement,
        plan.proxy_workers,
        &body_sizes,
    )?;
    system.set_backpressure(backpressure_readers(&env));
    if !plan.quick {
        eprintln!("bench: warm-up round (not counted)");
        let warm = plan.warmup();
        run_round(&mut env, &warm, 0, None)?;
    }
    let mut samples = Vec::new();
    for round in 0..plan.rounds {
        eprintln!(
            "bench: round {}/{} ({:.0} s so far)",
            round + 1,
            plan.rounds,
            started.elapsed().as_secs_f64()
        );
        run_round(&mut env, &plan, round, Some(&mut samples))?;
    }
    drop(env);
    eprintln!("bench: node mode, the cost of a pod");
    let node = node::measure(&agent_bin, if plan.quick { 20 } else { 110 })?;
    let system = system.finish(started.elapsed());
    let out = report::write(&plan, &system, &samples)?;
    node.append_to(&out.markdown)?;
    println!("{}\n{}", out.summary, node.summary());
    println!("bench: report {}", out.markdown.display());
    println!("bench: chart  {}", out.chart.display());
    if plan.quick {
        let problems = report::consistency(&plan, &samples);
        if !problems.is_empty() {
            bail!(
                "bench --quick: {} problem(s):\n  {}",
                problems.len(),
                problems.join("\n  ")
            );
        }
        println!("bench --quick: every cell produced numbers and the counters are consistent");
    }
    Ok(())
}

/// How the kernel treats sockmap readers, per sockmap mode, from the
/// agent's start-up log (its probe decides whether blocking sockets stay
/// on plain TCP).
fn backpressure_readers(env: &Env) -> String {
    env.pods
        .iter()
        .enumerate()
        .filter(|(_, p)| p.mode.sockmap())
        .map(|(i, p)| {
            let readers = env
                .agent_log_line(i, "how this kernel treats readers")
                .as_deref()
                .and_then(|l| field(l, "readers"))
                .unwrap_or_else(|| "not logged".into());
            format!("{}: {readers}", p.mode)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The field `name=` of a log line: quoted (`name="..."`), or the rest of
/// the line (a displayed value logged last).
fn field(line: &str, name: &str) -> Option<String> {
    let (_, rest) = line.split_once(&format!("{name}="))?;
    Some(
        match rest.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"').map_or(quoted, |(v, _)| v),
            None => rest.trim_end(),
        }
        .to_owned(),
    )
}

/// One round: every cell, and within a cell every mode (the order rotated
/// by the round number, so no mode always runs first or last).
fn run_round(
    env: &mut Env,
    plan: &Plan,
    round: u32,
    mut samples: Option<&mut Vec<Sample>>,
) -> Result<()> {
    let n = plan.modes.len();
    for &cell in &plan.cells {
        for i in 0..n {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let k = (i + round as usize) % n;
            let result = measure(env, plan, k, cell);
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let mode = env.pods[k].mode;
            if let Err(e) = &result {
                eprintln!("bench: {} {mode} round {}: {e:#}", cell.name(), round + 1);
            }
            if let Some(s) = samples.as_deref_mut() {
                let sample = Sample {
                    round,
                    cell,
                    mode,
                    result: result.map_err(|e| format!("{e:#}")),
                };
                if sample.fell_back() {
                    eprintln!(
                        "bench: {} {mode} round {}: the sockmap fell back to TCP (flagged)",
                        cell.name(),
                        round + 1
                    );
                } else if sample.spilled() > 0 {
                    eprintln!(
                        "bench: {} {mode} round {}: backpressure sent {} message(s) over TCP",
                        cell.name(),
                        round + 1,
                        sample.spilled()
                    );
                }
                s.push(sample);
            }
        }
    }
    Ok(())
}

fn measure(env: &mut Env, plan: &Plan, pod_index: usize, cell: Cell) -> Result<Measured> {
    env.check_alive()?;
    let pod = &env.pods[pod_index];
    let counters = |env: &Env| -> Result<Option<Counters>> {
        if !pod.mode.ebpf() {
            return Ok(None);
        }
        let c = env
            .counters(pod)?
            .context("no eBPF datapath found for the pod's cgroup")?;
        let get = |k: &str| c[k].as_u64().unwrap_or(0);
        Ok(Some(Counters {
            connect_redirected: get("connect_redirected"),
            msg_redirected: get("msg_redirected"),
            msg_passed: get("msg_passed"),
            msg_spilled: get("msg_spilled"),
            msg_gated: get("msg_gated"),
            msg_blocking: get("msg_sender_blocking") + get("msg_receiver_blocking"),
            bytes_redirected: get("bytes_redirected"),
            bytes_passed: get("bytes_passed"),
            skipped_short: get("sockhash_skipped_short"),
        }))
    };
    let before = counters(env)?;
    let ways_before = env::proxy_ways(pod);
    let conntrack_flushed = cell == Cell::S4 && env::flush_conntrack(pod);
    let proxy_pid = pod.proxy_pid();
    let server_pid = env.server_pid();
    let cpu = |pid: Option<u32>| pid.map_or(0, process_cpu_ns);
    let (p0, s0) = (cpu(proxy_pid), cpu(server_pid));
    let mem0 = env::tcp_mem_kib();
    let watch = env::MemWatch::start();
    let client = env.run_client(pod, &plan.job(cell, pod.server_ip));
    let mem_peak = watch.peak();
    let (p1, s1) = (cpu(proxy_pid), cpu(server_pid));
    // Whatever happened, let the kernel drain what is still queued before
    // the next cell (a failed upload can leave a proxy with a full queue).
    let settle_start = Instant::now();
    let settled = env::settle_tcp_mem(mem0, Duration::from_secs(20));
    if settle_start.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "bench: {} {}: waited {:.1} s for queued bytes to drain after the cell",
            cell.name(),
            pod.mode,
            settle_start.elapsed().as_secs_f64()
        );
    }
    if !settled {
        eprintln!(
            "bench: {} {}: the kernel's TCP memory is still {} MiB above its level before the cell after 20 s",
            cell.name(),
            pod.mode,
            env::tcp_mem_kib().saturating_sub(mem0) / 1024
        );
    }
    let client = client?;
    let after = counters(env)?;
    let ways_after = env::proxy_ways(pod);
    Ok(Measured {
        proxy: ways_after.zip(ways_before).map(|(a, b)| a.since(b)),
        client,
        tcp_mem_peak_kib: mem_peak.saturating_sub(mem0),
        proxy_cpu_ns: p1.saturating_sub(p0),
        server_cpu_ns: s1.saturating_sub(s0),
        counters: before.zip(after).map(|(b, a)| Counters {
            connect_redirected: a.connect_redirected.saturating_sub(b.connect_redirected),
            msg_redirected: a.msg_redirected.saturating_sub(b.msg_redirected),
            msg_passed: a.msg_passed.saturating_sub(b.msg_passed),
            msg_spilled: a.msg_spilled.saturating_sub(b.msg_spilled),
            msg_gated: a.msg_gated.saturating_sub(b.msg_gated),
            msg_blocking: a.msg_blocking.saturating_sub(b.msg_blocking),
            skipped_short: a.skipped_short.saturating_sub(b.skipped_short),
            bytes_redirected: a.bytes_redirected.saturating_sub(b.bytes_redirected),
            bytes_passed: a.bytes_passed.saturating_sub(b.bytes_passed),
        }),
        conntrack_flushed,
    })
}

/// The load client and servers: this crate, in release (a debug build
/// would measure itself).
fn build_worker() -> Result<PathBuf> {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(build::root()).args([
        "build",
        "--release",
        "--package",
        "xtask",
        "--bin",
        "xtask",
    ]);
    cmd::run(&mut c)?;
    let bin = build::root().join("target/release/xtask");
    if !bin.exists() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// `xtask bench worker JOB`: runs one job, prints its result as JSON.
fn worker(job: &str) -> Result<()> {
    let job: Job = serde_json::from_str(job).context("bench worker job")?;
    match job {
        Job::Server { body_sizes } => server::run(&body_sizes),
        Job::Client(job) => {
            let result = client::run(&job)?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
    }
}

/// `target/bench/` under the workspace root.
pub fn out_dir() -> PathBuf {
    build::root().join("target").join("bench")
}

/// A path relative to the workspace root when it is under it.
pub fn shown(p: &Path) -> String {
    p.strip_prefix(build::root())
        .unwrap_or(p)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::{Cell, ClientResult, Counters, Measured, Mode, Sample, field};

    fn sample(mode: Mode, ops: u64, c: Counters) -> Sample {
        Sample {
            round: 0,
            cell: Cell::S5(1024),
            mode,
            result: Ok(Measured {
                client: ClientResult {
                    ops,
                    ..ClientResult::default()
                },
                proxy_cpu_ns: 0,
                server_cpu_ns: 0,
                counters: Some(c),
                conntrack_flushed: false,
                tcp_mem_peak_kib: 0,
                proxy: None,
            }),
        }
    }

    fn counters(redirected: u64, passed: u64, spilled: u64) -> Counters {
        Counters {
            connect_redirected: 1,
            msg_redirected: redirected,
            msg_passed: passed,
            msg_spilled: spilled,
            ..Counters::default()
        }
    }

    #[test]
    fn a_spill_is_not_a_fallback() {
        let all = sample(Mode::M3, 100, counters(100, 0, 0));
        assert!(!all.fell_back() && all.spilled() == 0);
        let spilled = sample(Mode::H3, 100, counters(10, 90, 90));
        assert!(!spilled.fell_back());
        assert_eq!(spilled.spilled(), 90);
        // Passed messages need a counted reason each.
        assert!(sample(Mode::M3, 100, counters(10, 90, 1)).fell_back());
        assert!(sample(Mode::M3, 100, counters(99, 1, 0)).fell_back());
        assert!(sample(Mode::M3, 100, counters(50, 0, 0)).fell_back());
        assert!(sample(Mode::M3, 100, counters(0, 100, 100)).fell_back());
        assert!(!sample(Mode::M2, 100, counters(0, 0, 0)).fell_back());
        let gated = Counters {
            msg_gated: 2,
            msg_blocking: 3,
            ..counters(95, 5, 0)
        };
        assert!(!sample(Mode::M3, 100, gated).fell_back());
        // Connections kept on TCP for being short carry nothing through
        // the sockmap, by design; a message passed for no reason is still
        // a fallback.
        let kept = Counters {
            skipped_short: 180,
            ..counters(20, 0, 0)
        };
        assert!(!sample(Mode::M3, 100, kept).fell_back());
        let none = Counters {
            skipped_short: 200,
            ..counters(0, 0, 0)
        };
        assert!(!sample(Mode::M3, 100, none).fell_back());
        let silent = Counters {
            skipped_short: 180,
            ..counters(20, 3, 0)
        };
        assert!(sample(Mode::M3, 100, silent).fell_back());
    }

    #[test]
    fn the_share_of_bytes_short_circuited() {
        let c = Counters {
            bytes_redirected: 3,
            bytes_passed: 1,
            ..Counters::default()
        };
        assert_eq!(c.short_circuited_share(), Some(0.75));
        assert_eq!(Counters::default().short_circuited_share(), None);
    }

    #[test]
    fn log_fields() {
        let line = "INFO agent::capture::ebpf: sockmap short-circuit: how this kernel treats readers readers=\"a blocking read gets EAGAIN\"";
        assert_eq!(
            field(line, "readers").as_deref(),
            Some("a blocking read gets EAGAIN")
        );
        assert_eq!(field("no field", "readers"), None);
        let displayed = "INFO agent::capture::ebpf: sockmap short-circuit: how this kernel treats readers readers=a blocking read gets EAGAIN; queued bytes count";
        assert_eq!(
            field(displayed, "readers").as_deref(),
            Some("a blocking read gets EAGAIN; queued bytes count")
        );
    }
}
