//! `run`: capture a network namespace's TCP for the processes of a cgroup,
//! outbound and inbound, and (by default) run the proxy that receives it.
//!
//! Everything the user gave is checked before anything is attached or
//! written: the namespace and cgroup paths, the ports, the rule lists, and
//! the proxy's listeners (bound first, so a port in use fails cleanly).

use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use agent_common::{InboundConfig, NetnsConfig, flags};
use anyhow::{Context as _, Result, bail};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::{
    cgroup,
    doctor::{self, Mode},
    ebpf::{self, Datapath, Hook},
    netns::Netns,
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
pub struct RunArgs {
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
    /// Proxy worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Proxy relay buffer per direction, in KiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub buffer_kib: u32,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,
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
    pub cgroup: PathBuf,
    pub netns_config: NetnsConfig,
    pub rules: CaptureRules,
    pub inbound: bool,
    pub proxy: Option<ProxyConfig>,
    /// cgroups that get sockops and getsockopt: the served one, plus the
    /// agent's own when the built-in proxy's sockets live outside it.
    pub socket_hook_cgroups: Vec<PathBuf>,
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
        let inbound = !args.no_inbound;
        let mut f = flags::REDIRECT_OUTBOUND | ebpf::rule_flags(&rules);
        for (on, bit) in [
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
                    buffer_size: args.buffer_kib as usize * 1024,
                    worker_threads: usize::from(args.workers),
                };
                (Some(config), cgroup::covering_set(&cgroup, &own))
            }
            ProxyKind::External => (None, vec![cgroup.clone()]),
        };
        Ok(Self {
            netns,
            cgroup,
            netns_config,
            rules,
            inbound,
            proxy,
            socket_hook_cgroups,
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

/// What was set up to capture traffic; undone by [`Capture::stop`].
enum Capture {
    Ebpf { datapath: Datapath, cookie: u64 },
    Iptables(crate::iptables::Installed),
}

impl Capture {
    fn ebpf(plan: &Plan, inbound_listener: Option<&std::net::TcpListener>) -> Result<Self> {
        let debug_logs = tracing::enabled!(target: "agent_ebpf", tracing::Level::DEBUG);
        let mut datapath = Datapath::load(debug_logs)?;
        let cookie = plan.netns.cookie()?;
        datapath.set_rules(cookie, &plan.rules)?;
        datapath.enroll(cookie, plan.netns_config)?;
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
                inbound_port: plan.netns_config.inbound_port,
                outbound_port: plan.netns_config.outbound_port,
                flags: plan.netns_config.flags,
            })?;
            datapath.attach_sk_lookup(&plan.netns)?;
        }
        debug!(netns_cookie = cookie, "namespace enrolled");
        Ok(Self::Ebpf { datapath, cookie })
    }

    fn iptables(plan: &Plan) -> Result<Self> {
        Ok(Self::Iptables(crate::iptables::install_for_run(plan)?))
    }

    fn logger(&mut self) -> Result<Option<aya_log::EbpfLogger<&'static dyn log::Log>>> {
        match self {
            Self::Ebpf { datapath, .. } => Ok(Some(datapath.take_logger()?)),
            Self::Iptables(_) => Ok(None),
        }
    }

    fn stop(self, plan: &Plan) {
        match self {
            Self::Ebpf {
                mut datapath,
                cookie,
            } => {
                // Stop capturing first (new connects go direct), then detach.
                if let Err(e) = datapath.unenroll(cookie) {
                    warn!(error = %e, "unenrolling the namespace");
                }
                drop(datapath);
            }
            Self::Iptables(installed) => {
                if let Err(e) = crate::iptables::uninstall_for_run(plan, &installed) {
                    warn!(error = %format!("{e:#}"), "removing the iptables rules");
                }
            }
        }
    }
}

/// Runs until SIGTERM or SIGINT, then undoes everything it set up.
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
    let mode = resolve_mode(args, &plan)?;
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

    // Listeners come up before anything is attached: a port in use fails
    // here, with nothing to undo.
    let listeners = plan
        .proxy
        .as_ref()
        .map(|c| Listeners::bind(&plan.netns, c))
        .transpose()?;
    let inbound_listener = listeners
        .as_ref()
        .and_then(|l| l.inbound.as_ref())
        .map(std::net::TcpListener::try_clone)
        .transpose()?;
    let proxy = match (plan.proxy.clone(), listeners) {
        (Some(config), Some(listeners)) => {
            Some(ProxyHandle::start(&plan.netns, config, listeners)?)
        }
        _ => None,
    };
    let mut capture = match mode {
        Mode::Ebpf => Capture::ebpf(&plan, inbound_listener.as_ref())?,
        Mode::Iptables => Capture::iptables(&plan)?,
    };
    drop(inbound_listener);
    info!(
        mode = mode.name(),
        netns = %plan.netns.path().display(),
        cgroup = %plan.cgroup.display(),
        outbound_port = plan.netns_config.outbound_port,
        inbound_port = plan.inbound.then_some(plan.netns_config.inbound_port),
        sockmap = mode == Mode::Ebpf && plan.netns_config.has(flags::SOCKMAP),
        proxy = if proxy.is_some() { "builtin" } else { "external" },
        "mesh-redirect ready"
    );

    let logger = capture.logger()?;
    let waited = rt.block_on(wait_for_signal(signals, logger));
    capture.stop(&plan);
    if let Some(p) = proxy {
        p.stop();
    }
    waited?;
    info!("detached and stopped");
    Ok(())
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

/// Forwards the programs' aya-log records until SIGTERM or SIGINT.
async fn wait_for_signal(
    signals: Signals,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
) -> Result<()> {
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
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            guard = async { logs.as_mut().expect("guarded by the if").readable_mut().await }, if logs.is_some() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
    if let Some(l) = logs.as_mut() {
        l.get_mut().flush();
    }
    Ok(())
}
