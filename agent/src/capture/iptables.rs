//! The iptables capture: istio-init's rules in the served namespace (istio's
//! backend choice), plus one rule that exempts the proxy's mark, removed
//! exactly on exit.

use tracing::info;

use super::{CaptureError, Settings};
use crate::{
    iptables::{
        apply::{self, ApplyError},
        backend::Backend,
        istio::{self, PortSpec},
    },
    rules::{CaptureRules, Selection},
};

/// istio-iptables' configuration for `s` with `rules`: the same ports, the
/// same lists, the proxy's uid/gid, and its mark (the built-in proxy runs
/// as root and marks its upstream sockets).
#[must_use]
pub fn config(s: &Settings, rules: &CaptureRules) -> istio::Config {
    let ports = |v: &[u16]| v.iter().map(|&p| PortSpec::Port(p)).collect::<Vec<_>>();
    istio::Config {
        proxy_port: s.outbound_port,
        inbound_capture_port: s.inbound_port,
        proxy_uids: s.proxy.uid.into_iter().collect(),
        proxy_gids: s.proxy.gid.into_iter().collect(),
        inbound_ports_include: match (&rules.inbound_include_ports, s.inbound) {
            (_, false) => Selection::Only(Vec::new()),
            (Selection::All, true) => Selection::All,
            (Selection::Only(v), true) => Selection::Only(ports(v)),
        },
        inbound_ports_exclude: ports(&rules.inbound_exclude_ports),
        outbound_ports_include: ports(&rules.outbound_include_ports),
        outbound_ports_exclude: ports(&rules.outbound_exclude_ports),
        outbound_ip_ranges_include: rules.outbound_include_cidrs.clone(),
        // Loopback destinations are never captured, as in eBPF mode.
        // istio leaves an app's loopback connects alone through its
        // `-o lo -m owner ! --uid-owner` rule, which needs a proxy uid; the
        // built-in proxy is known by its mark instead, so say it plainly.
        outbound_ip_ranges_exclude: LOOPBACK
            .iter()
            .map(|n| n.parse().expect("a CIDR"))
            .chain(rules.outbound_exclude_cidrs.iter().copied())
            .collect(),
        exempt_mark: (s.proxy.mark != 0).then_some(s.proxy.mark),
        enable_ipv6: s.ipv6,
        redirect_dns: s.dns.is_some(),
        capture_all_dns: s.dns.as_ref().is_some_and(|d| d.capture_all),
        dns_servers_v4: dns_servers(s, true),
        dns_servers_v6: dns_servers(s, false),
        dns_listener_port: s
            .dns
            .as_ref()
            .map_or(agent_common::ports::DNS_PROXY, |d| d.port),
        ..istio::Config::default()
    }
}

/// Loopback, never captured, in both families.
const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// The resolvers of one family, as istio takes them.
fn dns_servers(s: &Settings, v4: bool) -> Vec<String> {
    s.dns
        .iter()
        .flat_map(|d| &d.servers)
        .filter(|ip| ip.is_ipv4() == v4)
        .map(ToString::to_string)
        .collect()
}

/// The backend chosen, and what is (or will be) installed.
#[derive(Debug)]
pub struct IptablesCapture {
    backend: Backend,
    rules: CaptureRules,
    config: Box<istio::Config>,
}

fn err(context: &'static str) -> impl FnOnce(ApplyError) -> CaptureError {
    move |source| CaptureError::Iptables { context, source }
}

impl IptablesCapture {
    /// Chooses the backend as istio does; writes nothing.
    pub fn prepare(s: &Settings) -> Result<Self, CaptureError> {
        let runner = |p: &str| s.netns.command(p);
        let backend =
            apply::detect_backend(&runner).map_err(err("choosing the iptables backend"))?;
        Ok(Self {
            backend,
            rules: s.rules.clone(),
            config: Box::new(config(s, &s.rules)),
        })
    }

    /// Installs the rules (refusing to overwrite different ones already there).
    pub fn install(&mut self, s: &Settings) -> Result<(), CaptureError> {
        let runner = |p: &str| s.netns.command(p);
        let installed = apply::install(&runner, &self.config, self.backend, false)
            .map_err(err("installing the iptables rules"))?;
        info!(backend = ?installed.backend, ipv4 = ?installed.ipv4, "iptables rules installed");
        Ok(())
    }

    /// Replaces our rules with those for `rules` (istio's `--reconcile`).
    pub fn update_rules(&mut self, s: &Settings, rules: &CaptureRules) -> Result<(), CaptureError> {
        let runner = |p: &str| s.netns.command(p);
        let config = config(s, rules);
        apply::install(&runner, &config, self.backend, true)
            .map_err(err("replacing the iptables rules"))?;
        *self.config = config;
        self.rules = rules.clone();
        Ok(())
    }

    /// The rules installed.
    #[must_use]
    pub const fn rules(&self) -> &CaptureRules {
        &self.rules
    }

    /// Removes what was installed: our chains and jumps, nothing else.
    pub fn teardown(self, s: &Settings) {
        let runner = |p: &str| s.netns.command(p);
        match apply::uninstall(&runner, &self.config, self.backend) {
            Ok(()) => info!("iptables rules removed"),
            Err(e) => tracing::warn!(error = %e, "removing the iptables rules"),
        }
    }
}
