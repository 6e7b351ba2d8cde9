//! A run's plan: every setting checked against the host before anything is
//! attached or written, and the redirect mode chosen. Errors name the flag
//! or path at fault.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tracing::{info, warn};

use super::args::{ProxyKind, RunArgs};
use crate::{
    capture::{DnsSettings, Mode, ModeChoice, ProxyIdentity, Settings},
    cgroup, doctor,
    iptables::istio::pod,
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
        let dns = dns_settings(args, &netns)?;
        let ipv6 = match args.ipv6 {
            Some(on) => on,
            None => pod::has_global_ipv6(&|p: &str| netns.command(p))
                .context("--ipv6: telling whether the namespace has IPv6")?,
        };
        let (proxy, socket_hook_cgroups) = match args.proxy {
            ProxyKind::Builtin => {
                let own = cgroup::validate(&cgroup::own()?).context("the agent's own cgroup")?;
                let config = ProxyConfig {
                    outbound_port: args.outbound_port,
                    inbound_port: inbound.then_some(args.inbound_port),
                    mark: args.proxy_mark,
                    connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                    idle_timeout: Duration::from_secs(args.idle_timeout_secs),
                    buffer_size: args.buffer_kib as usize * 1024,
                    worker_threads: usize::from(args.workers),
                    max_connections: args.max_connections as usize,
                    // Kept only once the mode is known to have no
                    // short-circuit (`lifecycle`).
                    splice_from_app: std::sync::Arc::new(args.splice.into()),
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
                short_conn_threshold: args.short_conn_threshold,
                fail_open: args.fail_open && !args.fail_closed,
                rules,
                dns,
                ipv6,
                passthrough_marker: crate::capture::passthrough::marker(
                    &args.control_dir,
                    netns_cookie,
                ),
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

/// The resolv.conf of the namespace at `netns`: `ip netns`' own for a
/// named namespace (`/etc/netns/NAME/resolv.conf`, what `ip netns exec`
/// gives its processes) where it exists, else the host's.
fn resolv_conf(netns: &Path) -> PathBuf {
    let named = netns
        .strip_prefix("/var/run/netns")
        .or_else(|_| netns.strip_prefix("/run/netns"))
        .ok()
        .and_then(|name| name.to_str())
        .map(|name| Path::new("/etc/netns").join(name).join("resolv.conf"));
    named
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(pod::RESOLV_CONF))
}

/// DNS capture as asked: the resolvers given, or the pod's, or none with
/// `--capture-all-dns`; without any, refused by name.
fn dns_settings(args: &RunArgs, netns: &Netns) -> Result<Option<DnsSettings>> {
    if !args.redirect_dns {
        if args.capture_all_dns || args.dns_servers.is_some() {
            bail!("--capture-all-dns and --dns-servers need --redirect-dns");
        }
        return Ok(None);
    }
    let servers: Vec<IpAddr> = if let Some(list) = &args.dns_servers {
        list.0.clone()
    } else {
        let path = resolv_conf(netns.path());
        match pod::resolv_conf_servers_at(&path) {
            Ok((v4, v6)) => v4
                .iter()
                .chain(&v6)
                .filter_map(|s| s.parse().ok())
                .collect(),
            Err(e) if args.capture_all_dns => {
                warn!(error = %e, "--redirect-dns: no resolv.conf to read; capturing all DNS");
                Vec::new()
            }
            Err(e) => return Err(e).context("--redirect-dns"),
        }
    };
    if servers.is_empty() && !args.capture_all_dns {
        bail!(
            "--redirect-dns: no DNS server to capture (the pod's resolv.conf names none); give --dns-servers, or --capture-all-dns"
        );
    }
    if args.dns_proxy_port == args.outbound_port || args.dns_proxy_port == args.inbound_port {
        bail!(
            "--dns-proxy-port {} is one of the proxy's own ports",
            args.dns_proxy_port
        );
    }
    Ok(Some(DnsSettings {
        port: args.dns_proxy_port,
        capture_all: args.capture_all_dns,
        servers,
    }))
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
        dns: plan.capture.dns.is_some(),
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
