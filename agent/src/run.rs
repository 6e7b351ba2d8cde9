//! `run`: capture a network namespace's TCP for the processes of a cgroup,
//! outbound and inbound, and (by default) run the proxy that receives it.
//!
//! Everything the user gave is checked before anything is attached or
//! written: the namespace and cgroup paths, the ports, the rule lists, and
//! the proxy's listeners (bound first, so a port in use fails cleanly).

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use agent_common::{InboundConfig, NetnsConfig, flags};
use anyhow::{Context as _, Result, bail};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::{
    admin::{self, AdminHandle, AdminState, Readiness},
    cgroup,
    doctor::{self, Mode},
    ebpf::{self, Datapath, Hook},
    handoff,
    netns::Netns,
    pins,
    proxy::ingress::IngressReads,
    proxy::{Listeners, ProxyConfig, ProxyHandle},
    rules::{CaptureRules, RuleArgs},
};

/// Which redirect mode `run` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// eBPF when the kernel has every hook it needs (as `doctor` probes),
    /// else iptables.
    Auto,
    Ebpf,
    Iptables,
}

/// Who receives the captured connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyKind {
    /// The agent's own proxy, listening on the outbound and inbound ports.
    Builtin,
    /// A proxy the user runs (Envoy, HAProxy...) on the same ports; the
    /// agent only captures and accelerates.
    External,
}

#[derive(Debug, Clone, clap::Args)]
#[expect(clippy::struct_excessive_bools, reason = "command-line switches")]
pub struct RunArgs {
    /// Read settings from this TOML file first: each key is one of these
    /// flags without its dashes (`outbound-port = 15001`, `no-inbound =
    /// true`, `outbound-ip-ranges-exclude = ["10.0.0.0/8"]`); flags given here
    /// override its values (a switch it turns on stays on). Expanded before
    /// parsing (see `agent::config`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Redirect mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Network namespace to serve (a file like /var/run/netns/NAME or
    /// /proc/PID/ns/net). Default: the agent's own.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// cgroup2 directory whose processes are captured (eBPF mode; iptables
    /// rules apply to the whole namespace). Default: the cgroup2 root.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Port the proxy receives outbound connections on (127.0.0.1).
    #[arg(long, default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// Port the proxy receives inbound connections on.
    #[arg(long, default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Capture outbound connections only; leave inbound ones alone.
    #[arg(long)]
    pub no_inbound: bool,
    /// `SO_MARK` the proxy sets on its upstream sockets; connects carrying
    /// it are never redirected. 0 disables the check.
    #[arg(long, default_value_t = 1337)]
    pub proxy_mark: u32,
    /// Connects by this uid are never redirected (the proxy's own).
    #[arg(long)]
    pub proxy_uid: Option<u32>,
    /// Connects by this gid are never redirected (the proxy's own).
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Who receives captured connections.
    #[arg(long, value_enum, default_value_t = ProxyKind::Builtin)]
    pub proxy: ProxyKind,
    /// Redirect with connect4 only: no SOCKHASH, no sk_msg short-circuit
    /// (plain loopback TCP between app and proxy; for comparisons).
    #[arg(long)]
    pub no_sockmap: bool,
    /// How far (KiB) a short-circuited socket's reader may fall behind
    /// before its sender switches to TCP for good (sk_msg backpressure: the
    /// kernel does not bound that queue itself).
    #[arg(long, value_name = "KIB", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub sockmap_queue_kib: u32,
    /// Proxy worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Proxy relay buffer per direction, in KiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub buffer_kib: u32,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,
    /// Connections beyond this are reset at once (never left hanging).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// A proxied connection with no byte either way for this long is closed.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,
    /// On SIGTERM/SIGINT (or a handover), how long open connections may
    /// finish before they are closed.
    #[arg(long, default_value_t = 5)]
    pub drain_timeout_secs: u64,
    /// While no proxy listens, let connections go where they were going
    /// (eBPF mode only). Default: fail closed.
    #[arg(long, overrides_with = "fail_closed")]
    pub fail_open: bool,
    /// While no proxy listens, refuse connections, as iptables REDIRECT to
    /// a closed port does (the default).
    #[arg(long)]
    pub fail_closed: bool,
    /// The bpffs mount for pins (mounted there if nothing is).
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Pin nothing: the datapath goes with the process (no restart without
    /// loss, no adoption).
    #[arg(long)]
    pub no_pin: bool,
    /// Admin server address (/metrics, /ready, /healthz), inside the served
    /// namespace.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub admin: SocketAddrV4,
    /// No admin server.
    #[arg(long)]
    pub no_admin: bool,
    /// Directory of the control sockets a new agent takes over through.
    #[arg(long, value_name = "PATH", default_value = "/run/mesh-redirect")]
    pub control_dir: PathBuf,
    #[command(flatten)]
    pub rules: RuleArgs,
    /// Test only: pretend these `doctor` probes failed (by id, e.g.
    /// `prog.sk_lookup`), to exercise `--mode auto`'s fallback.
    #[arg(
        long,
        hide = true,
        value_delimiter = ',',
        env = "MESH_REDIRECT_PRETEND_MISSING"
    )]
    pub pretend_missing: Vec<String>,
}

/// The checked configuration of a run.
#[derive(Debug)]
pub struct Plan {
    pub netns: Netns,
    pub netns_cookie: u64,
    pub cgroup: PathBuf,
    pub netns_config: NetnsConfig,
    pub rules: CaptureRules,
    pub inbound: bool,
    pub proxy: Option<ProxyConfig>,
    /// cgroups that get sockops and getsockopt: the served one, plus the
    /// agent's own when the built-in proxy's sockets live outside it.
    pub socket_hook_cgroups: Vec<PathBuf>,
    /// Bytes a short-circuited reader may fall behind.
    pub sockmap_queue_limit: u64,
}

impl Plan {
    /// Validates `args` against the host. Errors name the flag or path at fault.
    pub fn new(args: &RunArgs) -> Result<Self> {
        if args.outbound_port == args.inbound_port {
            bail!(
                "--outbound-port and --inbound-port must differ (both {})",
                args.outbound_port
            );
        }
        let rules = args.rules.apply_to(&CaptureRules::default())?;
        let netns = match &args.netns {
            Some(p) => Netns::open(p).context("--netns")?,
            None => Netns::current().context("the agent's own network namespace")?,
        };
        let cgroup = match &args.cgroup {
            Some(p) => cgroup::validate(p).context("--cgroup")?,
            None => cgroup::validate(&cgroup::cgroup2_root()?)?,
        };
        let netns_cookie = netns.cookie()?;
        let inbound = !args.no_inbound;
        let mut f = flags::REDIRECT_OUTBOUND | ebpf::rule_flags(&rules);
        for (on, bit) in [
            (args.fail_open, flags::FAIL_OPEN),
            (!args.no_sockmap, flags::SOCKMAP),
            (args.proxy_uid.is_some(), flags::PROXY_UID),
            (args.proxy_gid.is_some(), flags::PROXY_GID),
            (inbound, flags::REDIRECT_INBOUND),
        ] {
            if on {
                f |= bit;
            }
        }
        let netns_config = NetnsConfig {
            outbound_port: args.outbound_port,
            inbound_port: args.inbound_port,
            proxy_mark: args.proxy_mark,
            proxy_uid: args.proxy_uid.unwrap_or(0),
            proxy_gid: args.proxy_gid.unwrap_or(0),
            flags: f,
        };
        let (proxy, socket_hook_cgroups) = match args.proxy {
            ProxyKind::Builtin => {
                let own = cgroup::validate(&cgroup::own()?).context("the agent's own cgroup")?;
                let config = ProxyConfig {
                    outbound: SocketAddrV4::new([127, 0, 0, 1].into(), args.outbound_port),
                    inbound: inbound
                        .then(|| SocketAddrV4::new([0, 0, 0, 0].into(), args.inbound_port)),
                    mark: args.proxy_mark,
                    connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                    idle_timeout: Duration::from_secs(args.idle_timeout_secs),
                    buffer_size: args.buffer_kib as usize * 1024,
                    worker_threads: usize::from(args.workers),
                    max_connections: args.max_connections as usize,
                    ingress: None,
                };
                (Some(config), cgroup::covering_set(&cgroup, &own))
            }
            ProxyKind::External => (None, vec![cgroup.clone()]),
        };
        Ok(Self {
            netns,
            netns_cookie,
            cgroup,
            netns_config,
            rules,
            inbound,
            proxy,
            socket_hook_cgroups,
            sockmap_queue_limit: u64::from(args.sockmap_queue_kib) * 1024,
        })
    }
}

/// Picks the mode: as asked, or for `auto` the best the kernel supports.
fn resolve_mode(args: &RunArgs, plan: &Plan) -> Result<Mode> {
    match args.mode {
        ModeArg::Ebpf => return Ok(Mode::Ebpf),
        ModeArg::Iptables => return Ok(Mode::Iptables),
        ModeArg::Auto => {}
    }
    let mut report = doctor::run(&doctor::Options {
        cgroup: Some(plan.cgroup.clone()),
    });
    for id in &args.pretend_missing {
        report = report.with_failed(id, "pretended missing (--pretend-missing)");
    }
    if report.usable(Mode::Ebpf) {
        info!("mode auto: every eBPF hook is available, using ebpf");
        return Ok(Mode::Ebpf);
    }
    let missing = report
        .modes
        .iter()
        .find(|m| m.mode == Mode::Ebpf)
        .map(|m| m.missing.join(", "))
        .unwrap_or_default();
    if report.usable(Mode::Iptables) {
        warn!(missing = %missing, "mode auto: the eBPF mode is not usable here, falling back to iptables");
        return Ok(Mode::Iptables);
    }
    bail!(
        "no redirect mode is usable: eBPF lacks {missing}; iptables lacks a working nat table (see `mesh-redirect doctor`)"
    )
}

/// What was set up to capture traffic.
enum Capture {
    Ebpf(Datapath),
    Iptables(crate::iptables::Installed),
}

impl Capture {
    /// Loads (and verifies) the eBPF object, adopting pinned maps.
    fn load(plan: &Plan, pin_dir: Option<&Path>) -> Result<Datapath> {
        let opts = crate::ebpf::LoadOptions {
            debug_logs: tracing::enabled!(target: "agent_ebpf", tracing::Level::DEBUG),
            sockmap_queue_limit: plan.sockmap_queue_limit,
        };
        let datapath = Datapath::load(&opts, pin_dir)?;
        if datapath.adopted() {
            info!(pins = %pin_dir.unwrap_or(Path::new("")).display(), "adopting the pinned datapath of an earlier agent: connections and hooks carry on");
        }
        Ok(datapath)
    }

    /// Configures and attaches a loaded datapath.
    fn ebpf(
        mut datapath: Datapath,
        plan: &Plan,
        inbound_listener: Option<&std::net::TcpListener>,
    ) -> Result<Self> {
        let cookie = plan.netns_cookie;
        let config = plan.netns_config;
        // The short-circuit's backpressure needs each reader's reads counted:
        // by an fexit where the kernel allows tracing programs, else by the
        // built-in proxy for its own sockets.
        if config.has(flags::SOCKMAP) {
            match datapath.backpressure() {
                Ok(()) => datapath.attach_recvmsg()?,
                Err(why) => info!(
                    reason = why,
                    limit_kib = plan.sockmap_queue_limit / 1024,
                    "sockmap backpressure: the built-in proxy reports its reads; any other reader (apps, an external proxy) gets the queue limit short-circuited per connection and direction, then TCP"
                ),
            }
        }
        datapath.set_rules(cookie, &plan.rules)?;
        datapath.enroll(cookie, config)?;
        datapath.attach_cgroup(Hook::Connect4, &plan.cgroup)?;
        datapath.attach_cgroup(Hook::GetPeerName4, &plan.cgroup)?;
        for cg in &plan.socket_hook_cgroups {
            if cg != &plan.cgroup {
                info!(cgroup = %cg.display(), "the proxy's sockets live outside the served cgroup: sockops and getsockopt attach here too");
            }
            datapath.attach_cgroup(Hook::SockOps, cg)?;
            datapath.attach_cgroup(Hook::GetSockopt, cg)?;
        }
        datapath.attach_sk_msg()?;
        if plan.inbound {
            if let Some(l) = inbound_listener {
                datapath.set_inbound_listener(l)?;
            }
            datapath.set_inbound(InboundConfig {
                netns_cookie: cookie,
                inbound_port: config.inbound_port,
                outbound_port: config.outbound_port,
                flags: config.flags,
            })?;
            datapath.attach_sk_lookup(&plan.netns)?;
        }
        for stale in datapath.prune_unclaimed_links()? {
            info!(pin = %stale.display(), "removed a pinned link the earlier agent had and this one does not use");
        }
        debug!(netns_cookie = cookie, "namespace enrolled");
        Ok(Self::Ebpf(datapath))
    }

    fn iptables(plan: &Plan) -> Result<Self> {
        Ok(Self::Iptables(crate::iptables::install_for_run(plan)?))
    }

    fn logger(&mut self) -> Result<Option<aya_log::EbpfLogger<&'static dyn log::Log>>> {
        match self {
            Self::Ebpf(datapath) => Ok(Some(datapath.take_logger()?)),
            Self::Iptables(_) => Ok(None),
        }
    }

    /// Undoes everything: detach, unpin, remove the rules.
    fn teardown(self, plan: &Plan) {
        match self {
            Self::Ebpf(mut datapath) => {
                // Stop capturing first (new connects go direct), then detach.
                if let Err(e) = datapath.unenroll(plan.netns_cookie) {
                    warn!(error = %e, "unenrolling the namespace");
                }
                if let Err(e) = datapath.teardown() {
                    warn!(error = %e, "removing the pinned datapath");
                }
            }
            Self::Iptables(installed) => {
                if let Err(e) = crate::iptables::uninstall_for_run(plan, &installed) {
                    warn!(error = %format!("{e:#}"), "removing the iptables rules");
                }
            }
        }
    }
}

/// Why the agent stops.
enum Stop {
    Signal(&'static str),
    /// A new agent took the listeners: leave pins and rules to it.
    HandedOver,
}

/// Runs until SIGTERM or SIGINT (or a handover), then undoes what it set up.
pub fn run(args: &RunArgs) -> Result<()> {
    // Signals are caught from the very start: one that arrives while we set
    // up (or right after the ready line) still ends in a clean teardown.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _rt = rt.enter();
        Signals::new()?
    };
    let plan = Plan::new(args)?;
    if let Some(p) = &plan.proxy {
        raise_fd_limit(p.max_connections, p.worker_threads);
    }
    let mode = resolve_mode(args, &plan)?;
    if mode == Mode::Iptables && args.fail_open {
        bail!(
            "--fail-open needs the eBPF mode: iptables REDIRECT rules stay in place while the proxy is down, so it can only fail closed"
        );
    }
    let pin_dir = prepare_pins(args, mode, &plan)?;
    log_bypass(args, &plan);

    // The listeners: taken over from the agent running for this namespace,
    // or bound afresh before anything is attached (a port in use fails
    // here, with nothing to undo).
    let control_path = handoff::control_path(&args.control_dir, plan.netns_cookie);
    let taken = handoff::take_over(
        &control_path,
        plan.proxy.as_ref().map(|c| c.outbound.port()),
        plan.proxy
            .as_ref()
            .and_then(|c| c.inbound.map(|a| a.port())),
    )?;
    let took_over = taken.is_some();
    let listeners = match (taken.flatten(), &plan.proxy) {
        (Some(l), _) => Some(l),
        (None, Some(c)) => Some(Listeners::bind(&plan.netns, c)?),
        (None, None) => None,
    };
    let admin_listener = (!args.no_admin)
        .then(|| admin::bind(&plan.netns, args.admin))
        .transpose()?;
    // Our own handle on the listening sockets: for the SOCKMAP and for a
    // handover to whoever replaces us.
    let kept = listeners.as_ref().map(Listeners::try_clone).transpose()?;
    let ready = Arc::new(Readiness::default());
    // The datapath is loaded (nothing attached yet) before the proxy starts,
    // so the proxy's workers can report their reads into its map.
    let datapath = match mode {
        Mode::Ebpf => Some(Capture::load(&plan, pin_dir.as_deref())?),
        Mode::Iptables => None,
    };
    let (ingress, _ingress_owner) = match &datapath {
        Some(dp) if dp.backpressure().is_err() && plan.netns_config.has(flags::SOCKMAP) => {
            let (reporter, owner) = IngressReads::new(dp.ingress_read_map()?, plan.netns_cookie);
            (Some(Arc::new(reporter)), Some(owner))
        }
        _ => (None, None),
    };
    let proxy = match (plan.proxy.clone(), listeners) {
        (Some(mut config), Some(listeners)) => {
            config.ingress = ingress;
            Some(ProxyHandle::start(&plan.netns, config, listeners)?)
        }
        _ => None,
    };
    ready.listeners.store(true, Ordering::Relaxed);
    let mut capture = match datapath {
        Some(dp) => Capture::ebpf(dp, &plan, kept.as_ref().and_then(|l| l.inbound.as_ref()))?,
        None => Capture::iptables(&plan)?,
    };
    ready.capture.store(true, Ordering::Relaxed);
    let state = Arc::new(AdminState {
        mode,
        fail_open: args.fail_open,
        ready: Arc::clone(&ready),
        proxy: proxy.as_ref().map(|p| Arc::clone(&p.stats)),
        datapath_cgroup: (mode == Mode::Ebpf).then(|| plan.cgroup.clone()),
    });
    let _admin = admin_listener
        .map(|l| AdminHandle::start(l, Arc::clone(&state)))
        .transpose()?;
    let control = handoff::ControlServer::bind(&control_path)?;
    info!(
        mode = mode.name(),
        netns = %plan.netns.path().display(),
        cgroup = %plan.cgroup.display(),
        outbound_port = plan.netns_config.outbound_port,
        inbound_port = plan.inbound.then_some(plan.netns_config.inbound_port),
        sockmap = mode == Mode::Ebpf && plan.netns_config.has(flags::SOCKMAP),
        proxy = if proxy.is_some() { "builtin" } else { "external" },
        fail = if args.fail_open { "open" } else { "closed" },
        pinned = pin_dir.is_some(),
        took_over,
        "mesh-redirect ready"
    );

    let logger = capture.logger()?;
    let report = || serde_json::to_string(&state.report()).unwrap_or_default();
    let stop = rt.block_on(wait(signals, logger, &control, kept.as_ref(), &report));
    ready.draining.store(true, Ordering::Relaxed);
    shut_down(args, &plan, stop, capture, proxy, kept)
}

/// Where this run pins (eBPF mode, unless `--no-pin`): bpffs checked (or
/// mounted) first, pins of older layouts for this namespace removed.
fn prepare_pins(args: &RunArgs, mode: Mode, plan: &Plan) -> Result<Option<PathBuf>> {
    if mode != Mode::Ebpf || args.no_pin {
        return Ok(None);
    }
    pins::ensure_bpffs(&args.bpffs).context("--bpffs")?;
    let fingerprint = pins::layout_fingerprint(ebpf::OBJECT)?;
    for stale in pins::stale_instances(&args.bpffs, &fingerprint, plan.netns_cookie) {
        warn!(pins = %stale.display(), "removing pins of an older datapath layout");
        pins::remove_instance(&stale)?;
    }
    Ok(Some(pins::instance_dir(
        &args.bpffs,
        &fingerprint,
        plan.netns_cookie,
    )))
}

/// Logs, once, who and what bypasses capture (as istio documents it).
fn log_bypass(args: &RunArgs, plan: &Plan) {
    for line in plan.rules.describe_bypass() {
        info!("bypass: {line}");
    }
    if let Some(uid) = args.proxy_uid {
        info!("bypass: connects by uid {uid} (the proxy) are never captured");
    }
    if let Some(gid) = args.proxy_gid {
        info!("bypass: connects by gid {gid} (the proxy) are never captured");
    }
    if args.proxy_mark != 0 {
        info!(
            "bypass: connects from sockets marked {} (the proxy's upstreams) are never captured",
            args.proxy_mark
        );
    }
}

/// Stops accepting, drains, then tears down (or, after a handover, leaves
/// everything to the successor).
fn shut_down(
    args: &RunArgs,
    plan: &Plan,
    stop: Result<Stop>,
    capture: Capture,
    proxy: Option<ProxyHandle>,
    kept: Option<Listeners>,
) -> Result<()> {
    if let Some(p) = &proxy {
        p.stop_accepting();
    }
    let handed_over = matches!(stop, Ok(Stop::HandedOver));
    if !handed_over {
        // Nobody takes our listening sockets: close them, so new connects
        // are refused (fail closed) or go direct (fail open) while we drain.
        drop(kept);
    }
    if let Some(p) = &proxy {
        let deadline = Instant::now() + Duration::from_secs(args.drain_timeout_secs);
        let left = p.drain(deadline);
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed: closing the connections still open"
            );
        }
    }
    if handed_over {
        info!("handed over to a new agent: leaving the datapath, rules and listeners to it");
        drop(capture);
    } else {
        capture.teardown(plan);
    }
    if let Some(p) = proxy {
        p.stop();
    }
    match stop? {
        Stop::Signal(name) => info!(signal = name, "detached and stopped"),
        Stop::HandedOver => info!("stopped after the handover"),
    }
    Ok(())
}

/// Descriptors a descriptor table needs beside two per proxied connection.
const FD_OVERHEAD: u64 = 512;

/// Raises the open-file limit so each proxy worker's descriptor table
/// holds its share of `max_connections` (two descriptors each), raising the
/// hard limit too when it is lower and we may (`CAP_SYS_RESOURCE`), else
/// up to the hard limit. The proxy then says how many connections fit.
fn raise_fd_limit(max_connections: usize, workers: usize) {
    let share = max_connections.div_ceil(workers.max(1)) as u64;
    let want = 2 * share + FD_OVERHEAD;
    // SAFETY: getrlimit/setrlimit with valid structs.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 || lim.rlim_cur >= want {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

/// SIGTERM and SIGINT, caught.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime context.
    fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Forwards the programs' aya-log records and answers handover requests
/// until a signal or a handover.
async fn wait(
    signals: Signals,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    control: &handoff::ControlServer,
    listeners: Option<&Listeners>,
    stats: &dyn Fn() -> String,
) -> Result<Stop> {
    let Signals { mut term, mut int } = signals;
    let mut logs = match logger {
        // SAFETY: the logger owns its ring buffer's fd and keeps it open, and
        // unchanged, for as long as it lives inside the AsyncFd.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("watching the eBPF log ring buffer: {e}"))?,
        ),
        None => None,
    };
    // Readiness only: `serve_one` accepts on the original socket.
    // SAFETY: the clone is an owned listener whose fd stays open, unchanged,
    // for as long as the AsyncFd owns it.
    let control_fd = unsafe { AsyncFd::register(control.listener().try_clone()?) }
        .map_err(|e| anyhow::anyhow!("watching the control socket: {e}"))?;
    let stop = loop {
        tokio::select! {
            _ = term.recv() => break Stop::Signal("SIGTERM"),
            _ = int.recv() => break Stop::Signal("SIGINT"),
            guard = control_fd.readable() => {
                let mut guard = guard?;
                guard.clear_ready();
                // With an external proxy there are no sockets to hand over,
                // but a successor still takes the pins over.
                match control.serve_one(listeners, stats) {
                    Ok(true) => break Stop::HandedOver,
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "handover request failed"),
                }
            }
            guard = async { logs.as_mut().expect("guarded by the if").readable_mut().await }, if logs.is_some() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    };
    if let Some(l) = logs.as_mut() {
        l.get_mut().flush();
    }
    info!(
        reason = match stop {
            Stop::Signal(s) => s,
            Stop::HandedOver => "handover",
        },
        "shutting down"
    );
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::RunArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .unwrap()
            .run
    }

    /// A config file's `fail-open = true` can be overridden by
    /// `--fail-closed` on the command line (and the other way round).
    #[test]
    fn the_later_fail_policy_wins() {
        assert!(!parse(&["--fail-open", "--fail-closed"]).fail_open);
        assert!(parse(&["--fail-closed", "--fail-open"]).fail_open);
        assert!(!parse(&[]).fail_open);
    }
}
