//! A run's plan: every setting checked against the host before anything is
//! attached or written, and the redirect mode chosen. Errors name the flag
//! or path at fault.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result, bail};
use tracing::{info, warn};

use super::args::{ProxyKind, RunArgs};
use crate::{
    capture::{Mode, ModeChoice, ProxyIdentity, Settings},
    cgroup, doctor,
    netns::Netns,
    proxy::ProxyConfig,
    rules::CaptureRules,
};

/// The checked configuration of a run.
#[derive(Debug)]
pub struct Plan {
    /// What to capture.
    pub capture: Settings,
    /// The built-in proxy (none with an external one).
    pub proxy: Option<ProxyConfig>,
}

impl Plan {
    /// Validates `args` against the host.
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
            capture: Settings {
                netns,
                netns_cookie,
                cgroup,
                socket_hook_cgroups,
                outbound_port: args.outbound_port,
                inbound_port: args.inbound_port,
                inbound,
                proxy: ProxyIdentity {
                    mark: args.proxy_mark,
                    uid: args.proxy_uid,
                    gid: args.proxy_gid,
                },
                sockmap: !args.no_sockmap,
                sockmap_queue_limit: u64::from(args.sockmap_queue_kib) * 1024,
                fail_open: args.fail_open && !args.fail_closed,
                rules,
            },
            proxy,
        })
    }

    /// Logs, once, who and what bypasses capture (as istio documents it).
    pub fn log_bypass(&self) {
        let s = &self.capture;
        for line in s.rules.describe_bypass() {
            info!("bypass: {line}");
        }
        if let Some(uid) = s.proxy.uid {
            info!("bypass: connects by uid {uid} (the proxy) are never captured");
        }
        if let Some(gid) = s.proxy.gid {
            info!("bypass: connects by gid {gid} (the proxy) are never captured");
        }
        if s.proxy.mark != 0 {
            info!(
                "bypass: connects from sockets marked {} (the proxy's upstreams) are never captured",
                s.proxy.mark
            );
        }
    }
}

/// Picks the mode: as asked, or for `auto` the best the kernel supports.
pub fn choose_mode(choice: ModeChoice, plan: &Plan, pretend_missing: &[String]) -> Result<Mode> {
    match choice {
        ModeChoice::Ebpf => return Ok(Mode::Ebpf),
        ModeChoice::Iptables => return Ok(Mode::Iptables),
        ModeChoice::Auto => {}
    }
    let mut report = doctor::run(&doctor::Options {
        cgroup: Some(plan.capture.cgroup.clone()),
    });
    for id in pretend_missing {
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
