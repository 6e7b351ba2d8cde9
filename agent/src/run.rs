//! `run`: capture a network namespace's outbound TCP for the processes of a
//! cgroup, and (by default) run the proxy that receives it.
//!
//! Everything the user gave is checked before anything is attached or
//! written: the namespace and cgroup paths, the ports, the listener (bound
//! before the programs attach, so a port in use fails cleanly).

use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use agent_common::{NetnsConfig, flags};
use anyhow::{Context as _, Result, bail};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::{
    cgroup,
    ebpf::{Datapath, Hook},
    netns::Netns,
    proxy::{ProxyConfig, ProxyHandle},
};

/// Who receives the captured connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyKind {
    /// The agent's own proxy, listening on the outbound port.
    Builtin,
    /// A proxy the user runs (Envoy, HAProxy...) on the same ports; the
    /// agent only captures and accelerates.
    External,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Network namespace to serve (a file like /var/run/netns/NAME or
    /// /proc/PID/ns/net). Default: the agent's own.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// cgroup2 directory whose processes are captured. Default: the cgroup2 root.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Port the proxy receives outbound connections on (127.0.0.1).
    #[arg(long, default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// Port of the proxy's inbound listener.
    #[arg(long, default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
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
}

/// The checked configuration of a run.
#[derive(Debug)]
pub struct Plan {
    pub netns: Netns,
    pub cgroup: PathBuf,
    pub netns_config: NetnsConfig,
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
        let netns = match &args.netns {
            Some(p) => Netns::open(p).context("--netns")?,
            None => Netns::current().context("the agent's own network namespace")?,
        };
        let cgroup = match &args.cgroup {
            Some(p) => cgroup::validate(p).context("--cgroup")?,
            None => cgroup::validate(&cgroup::cgroup2_root()?)?,
        };
        let mut f = flags::REDIRECT_OUTBOUND;
        if !args.no_sockmap {
            f |= flags::SOCKMAP;
        }
        if args.proxy_uid.is_some() {
            f |= flags::PROXY_UID;
        }
        if args.proxy_gid.is_some() {
            f |= flags::PROXY_GID;
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
            proxy,
            socket_hook_cgroups,
        })
    }
}

/// Runs until SIGTERM or SIGINT, then detaches everything it attached.
pub fn run(args: &RunArgs) -> Result<()> {
    let plan = Plan::new(args)?;
    let debug_logs = tracing::enabled!(target: "agent_ebpf", tracing::Level::DEBUG);
    let mut datapath = Datapath::load(debug_logs)?;
    let cookie = plan.netns.cookie()?;

    // The listener comes up before anything is attached: a port in use
    // fails here, with nothing to undo.
    let proxy = plan
        .proxy
        .clone()
        .map(|c| ProxyHandle::start(&plan.netns, c))
        .transpose()?;

    attach(&mut datapath, &plan, cookie)?;
    info!(
        mode = "ebpf",
        netns = %plan.netns.path().display(),
        cgroup = %plan.cgroup.display(),
        outbound_port = plan.netns_config.outbound_port,
        sockmap = plan.netns_config.has(flags::SOCKMAP),
        proxy = if proxy.is_some() { "builtin" } else { "external" },
        "mesh-redirect ready"
    );

    let logger = datapath.take_logger()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(wait_for_signal(logger))?;

    // Stop capturing first (new connects go direct), then detach, then close
    // the proxy.
    if let Err(e) = datapath.unenroll(cookie) {
        warn!(error = %e, "unenrolling the namespace");
    }
    drop(datapath);
    if let Some(p) = proxy {
        p.stop();
    }
    info!("detached and stopped");
    Ok(())
}

fn attach(datapath: &mut Datapath, plan: &Plan, cookie: u64) -> Result<()> {
    datapath.enroll(cookie, plan.netns_config)?;
    datapath.attach_cgroup(Hook::Connect4, &plan.cgroup)?;
    for cg in &plan.socket_hook_cgroups {
        if cg != &plan.cgroup {
            info!(cgroup = %cg.display(), "the proxy's sockets live outside the served cgroup: sockops and getsockopt attach here too");
        }
        datapath.attach_cgroup(Hook::SockOps, cg)?;
        datapath.attach_cgroup(Hook::GetSockopt, cg)?;
    }
    datapath.attach_sk_msg()?;
    debug!(netns_cookie = cookie, "namespace enrolled");
    Ok(())
}

/// Forwards the programs' aya-log records until SIGTERM or SIGINT.
async fn wait_for_signal(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, and
    // unchanged, for as long as it lives inside the AsyncFd.
    let mut logs =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the eBPF log ring buffer: {e}"))?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            guard = logs.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
    logs.get_mut().flush();
    Ok(())
}
