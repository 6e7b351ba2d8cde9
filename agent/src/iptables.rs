//! The iptables REDIRECT mode: istio-iptables compatible rule generation,
//! and installing/removing the rules in a network namespace.

pub mod apply;
pub mod istio;

use anyhow::{Context as _, Result};
use tracing::info;

use crate::{
    rules::{self, CaptureRules},
    run::Plan,
};

/// The rules `run --mode iptables` installed, to remove on exit.
#[derive(Debug)]
pub struct Installed {
    backend: apply::Backend,
    config: istio::Config,
}

/// istio-iptables' configuration equivalent to a `run` plan: the same
/// ports, the same include/exclude lists, the proxy's uid/gid, and its mark
/// (our built-in proxy runs as root and marks its upstream sockets).
#[must_use]
pub fn config_for_run(plan: &Plan) -> istio::Config {
    let r: &CaptureRules = &plan.rules;
    let ports = |v: &[u16]| {
        v.iter()
            .map(|&p| istio::PortSpec::Port(p))
            .collect::<Vec<_>>()
    };
    let cidr = |n: &rules::Ipv4Net| istio::Cidr {
        addr: std::net::IpAddr::V4(n.addr),
        prefix_len: n.prefix,
    };
    let c = &plan.netns_config;
    istio::Config {
        proxy_port: c.outbound_port,
        inbound_capture_port: c.inbound_port,
        proxy_uids: c
            .has(agent_common::flags::PROXY_UID)
            .then_some(c.proxy_uid)
            .into_iter()
            .collect(),
        proxy_gids: c
            .has(agent_common::flags::PROXY_GID)
            .then_some(c.proxy_gid)
            .into_iter()
            .collect(),
        inbound_ports_include: match (&r.inbound_include_ports, plan.inbound) {
            (_, false) => istio::Selection::Only(Vec::new()),
            (rules::Selection::All, true) => istio::Selection::All,
            (rules::Selection::Some(v), true) => istio::Selection::Only(ports(v)),
        },
        inbound_ports_exclude: ports(&r.inbound_exclude_ports),
        outbound_ports_include: ports(&r.outbound_include_ports),
        outbound_ports_exclude: ports(&r.outbound_exclude_ports),
        outbound_ip_ranges_include: match &r.outbound_include_cidrs {
            rules::Selection::All => istio::Selection::All,
            rules::Selection::Some(v) => istio::Selection::Only(v.iter().map(cidr).collect()),
        },
        // Loopback destinations are never captured, as in eBPF mode.
        // istio leaves an app's 127.0.0.0/8 connects alone through its
        // `-o lo -m owner ! --uid-owner` rule, which needs a proxy uid; the
        // built-in proxy is known by its mark instead, so say it plainly.
        outbound_ip_ranges_exclude: std::iter::once(istio::Cidr {
            addr: std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)),
            prefix_len: 8,
        })
        .chain(r.outbound_exclude_cidrs.iter().map(cidr))
        .collect(),
        exempt_mark: (c.proxy_mark != 0).then_some(c.proxy_mark),
        ..istio::Config::default()
    }
}

/// Installs the rules of `plan` in its network namespace (istio's backend
/// choice; refuses to overwrite different rules already there).
pub fn install_for_run(plan: &Plan) -> Result<Installed> {
    let runner = |p: &str| plan.netns.command(p);
    let config = config_for_run(plan);
    let backend = apply::Backend::detect(&runner).context("choosing the iptables backend")?;
    let installed = apply::install(&runner, &config, backend, false)
        .context("installing the iptables rules")?;
    info!(backend = ?installed.backend, ipv4 = ?installed.ipv4, "iptables rules installed");
    Ok(Installed { backend, config })
}

/// Removes what [`install_for_run`] installed: our chains and jumps, nothing else.
pub fn uninstall_for_run(plan: &Plan, installed: &Installed) -> Result<()> {
    let runner = |p: &str| plan.netns.command(p);
    apply::uninstall(&runner, &installed.config, installed.backend)
        .context("removing the iptables rules")?;
    info!("iptables rules removed");
    Ok(())
}
