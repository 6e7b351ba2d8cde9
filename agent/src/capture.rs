//! Capture: what sends a namespace's connections to the proxy, in either
//! redirect mode, behind one interface. `run` says *what* to capture
//! ([`Settings`]); [`ebpf`] (the datapath: connect4, sockops, sk_msg,
//! getsockopt, sk_lookup) and [`iptables`] (istio's REDIRECT rules) say
//! *how*. Both capture the same connections: the rules' order is istio's
//! in each.
//!
//! The life of a [`Capture`]: [`Capture::prepare`] checks and loads what
//! the mode needs and attaches nothing (a failure leaves nothing behind);
//! [`Capture::install`] puts it in place; [`Capture::update_rules`] changes
//! the lists at once for new connections; then either
//! [`Capture::teardown`] removes every trace, or [`Capture::leave`] leaves
//! it all to the agent that took over.

pub mod ebpf;
pub mod iptables;

use std::{net::TcpListener, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ebpf::DatapathMaps, netns::Netns, rules::CaptureRules};

/// A redirect mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
        }
    }
}

/// The mode `run --mode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    /// eBPF when the kernel has every hook it needs (as `doctor` probes),
    /// else iptables.
    Auto,
    Ebpf,
    Iptables,
}

/// The proxy's own connects, never captured: by socket mark, uid or gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyIdentity {
    /// `SO_MARK` on the proxy's upstream sockets; 0 = none.
    pub mark: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// DNS capture (istio's `--redirect-dns`): UDP and TCP port 53 to the
/// resolvers (or to anywhere) go to the DNS proxy the user runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// The DNS proxy's port, on 127.0.0.1 and `::1` (istio-agent's 15053).
    pub port: u16,
    /// Every port-53 destination, not only `servers` (`--capture-all-dns`).
    pub capture_all: bool,
    /// The pod's resolvers.
    pub servers: Vec<std::net::IpAddr>,
}

/// What to capture in one network namespace, in either mode.
#[derive(Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "a switch each, as on the command line"
)]
pub struct Settings {
    pub netns: Netns,
    pub netns_cookie: u64,
    /// The cgroup2 directory whose processes' connects are captured (eBPF
    /// mode; iptables rules apply to the whole namespace).
    pub cgroup: PathBuf,
    /// The cgroups whose sockets get sockops and getsockopt: the served
    /// one, plus the agent's own when the built-in proxy lives outside it.
    pub socket_hook_cgroups: Vec<PathBuf>,
    /// Where the proxy receives captured outbound connections (127.0.0.1).
    pub outbound_port: u16,
    /// Where the proxy receives captured inbound connections.
    pub inbound_port: u16,
    /// Whether inbound connections are captured at all.
    pub inbound: bool,
    pub proxy: ProxyIdentity,
    /// eBPF: short-circuit app↔proxy connections through the SOCKHASH.
    pub sockmap: bool,
    /// eBPF: bytes a short-circuited reader may fall behind.
    pub sockmap_queue_limit: u64,
    /// eBPF: after how many short connections in a row to a destination
    /// new ones stay on plain TCP (0: never).
    pub short_conn_threshold: u32,
    /// While no proxy listens, let connections go where they were going.
    pub fail_open: bool,
    pub rules: CaptureRules,
    /// DNS capture, if on.
    pub dns: Option<DnsSettings>,
    /// IPv6 is in use in the namespace: native IPv6 is captured too
    /// (iptables mode installs ip6tables rules; the eBPF programs follow
    /// the IPv6 rules). Off, IPv6 goes untouched in both modes.
    pub ipv6: bool,
    /// A file that says the IPv6 passthrough source on `lo` is ours (put
    /// there by this agent or the one it took over from), next to the
    /// control socket.
    pub passthrough_marker: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "--fail-open needs the eBPF mode: iptables REDIRECT rules stay in place while the proxy is down, so it can only fail closed"
    )]
    FailOpenNeedsEbpf,
    #[error(transparent)]
    Ebpf(#[from] crate::ebpf::EbpfError),
    #[error("the IPv6 passthrough source: {0}")]
    Passthrough(String),
    #[error("{context}: {source}")]
    Iptables {
        context: &'static str,
        source: crate::iptables::apply::ApplyError,
    },
}

/// The backend of a [`Capture`].
enum Backend {
    Ebpf(ebpf::EbpfCapture),
    Iptables(iptables::IptablesCapture),
}

/// Capture in place (or ready to be put in place), in one mode.
pub struct Capture {
    backend: Backend,
}

impl Capture {
    /// Checks `settings` against `mode` and loads what it needs, attaching
    /// and writing nothing: the eBPF object, verified, its maps created or
    /// adopted from `pin_dir`; the iptables backend, chosen.
    pub fn prepare(
        mode: Mode,
        settings: &Settings,
        pin_dir: Option<PathBuf>,
    ) -> Result<Self, CaptureError> {
        let backend = match mode {
            Mode::Ebpf => Backend::Ebpf(ebpf::EbpfCapture::load(settings, pin_dir)?),
            Mode::Iptables => {
                if settings.fail_open {
                    return Err(CaptureError::FailOpenNeedsEbpf);
                }
                Backend::Iptables(iptables::IptablesCapture::prepare(settings)?)
            }
        };
        Ok(Self { backend })
    }

    #[must_use]
    pub const fn mode(&self) -> Mode {
        match self.backend {
            Backend::Ebpf(_) => Mode::Ebpf,
            Backend::Iptables(_) => Mode::Iptables,
        }
    }

    /// Puts capture in place. `proxy_listeners`: the built-in proxy's (its
    /// inbound ones for sk_lookup to steer to at once; an external proxy's
    /// register themselves when they listen). With inbound capture over
    /// IPv6, the proxy's passthrough source `::6` goes on `lo`, as
    /// istio-init does.
    pub fn install(
        &mut self,
        settings: &Settings,
        proxy_listeners: &[&TcpListener],
    ) -> Result<(), CaptureError> {
        if settings.inbound {
            passthrough::add_v6(&settings.netns, &settings.passthrough_marker)?;
        }
        match &mut self.backend {
            Backend::Ebpf(c) => Ok(c.install(settings, proxy_listeners)?),
            Backend::Iptables(c) => c.install(settings),
        }
    }

    /// Replaces the capture rules: new connections follow at once.
    pub fn update_rules(
        &mut self,
        settings: &Settings,
        rules: &CaptureRules,
    ) -> Result<(), CaptureError> {
        match &mut self.backend {
            Backend::Ebpf(c) => Ok(c.update_rules(settings.netns_cookie, rules)?),
            Backend::Iptables(c) => c.update_rules(settings, rules),
        }
    }

    /// The rules in force (eBPF: as the maps hold them, whoever wrote them).
    pub fn rules(&self, settings: &Settings) -> Result<CaptureRules, CaptureError> {
        match &self.backend {
            Backend::Ebpf(c) => Ok(c.rules(settings.netns_cookie)?),
            Backend::Iptables(c) => Ok(c.rules().clone()),
        }
    }

    /// Which sockets the short-circuit carries: `none` (iptables mode, or
    /// no short-circuit here), `nonblocking` (sockets whose reads block stay
    /// on plain TCP: this kernel's sockmap readers are unsafe for them) or
    /// `all`.
    #[must_use]
    pub const fn short_circuits(&self) -> &'static str {
        match &self.backend {
            Backend::Ebpf(c) => c.short_circuits(),
            Backend::Iptables(_) => "none",
        }
    }

    /// The datapath's maps (eBPF mode).
    #[must_use]
    pub fn maps(&self) -> Option<&DatapathMaps> {
        match &self.backend {
            Backend::Ebpf(c) => Some(c.maps()),
            Backend::Iptables(_) => None,
        }
    }

    /// Forwards the eBPF programs' log records (eBPF mode).
    pub fn logger(
        &mut self,
    ) -> Result<Option<aya_log::EbpfLogger<&'static dyn log::Log>>, CaptureError> {
        match &mut self.backend {
            Backend::Ebpf(c) => Ok(Some(c.logger()?)),
            Backend::Iptables(_) => Ok(None),
        }
    }

    /// Removes every trace: stops capturing new connections first, then
    /// detaches and unpins everything, or removes exactly the rules, and
    /// what `install` put on `lo`.
    pub fn teardown(self, settings: &Settings) {
        match self.backend {
            Backend::Ebpf(c) => c.teardown(settings.netns_cookie),
            Backend::Iptables(c) => c.teardown(settings),
        }
        let _ = passthrough::remove_v6(&settings.netns, &settings.passthrough_marker);
    }

    /// Leaves everything in place for the agent that took over.
    pub fn leave(self) {
        drop(self);
    }
}

/// The IPv6 inbound passthrough source (`::6`), which the proxy binds its
/// connections to the app to, must be a local address: istio-init puts it
/// on `lo`, and so do we, where the namespace has IPv6. A marker file says
/// it is ours, so it is removed exactly when we put it there, also by the
/// last of a chain of agents that took over from each other.
pub mod passthrough {
    use std::path::{Path, PathBuf};

    use tracing::{info, warn};

    use super::CaptureError;
    use crate::netns::Netns;

    /// The marker for the namespace with `netns_cookie`, among the control
    /// sockets.
    #[must_use]
    pub fn marker(control_dir: &Path, netns_cookie: u64) -> PathBuf {
        control_dir.join(format!("netns-{netns_cookie}.passthrough-v6"))
    }

    fn addr() -> String {
        format!("{}/128", agent_common::INBOUND_PASSTHROUGH_SRC_V6)
    }

    fn ip(netns: &Netns, args: &[&str]) -> std::io::Result<std::process::Output> {
        netns.command("ip").args(args).output()
    }

    /// Adds `::6/128` to `lo` (and writes `marker`) unless it is there or
    /// the namespace has no IPv6 (`lo` without `::1`); whether it did.
    pub fn add_v6(netns: &Netns, marker: &Path) -> Result<bool, CaptureError> {
        let err = |e: String| CaptureError::Passthrough(e);
        // The kernel's own list of lo's IPv6 addresses (no `ip` to run).
        let on_lo = netns
            .run(|| {
                std::fs::read_to_string("/proc/thread-self/net/if_inet6").map(|t| {
                    t.lines()
                        .filter(|l| l.split_whitespace().nth(5) == Some("lo"))
                        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                        .collect::<Vec<String>>()
                })
            })
            .map_err(|e| err(e.to_string()))?
            // No IPv6 in this kernel: nothing to add.
            .unwrap_or_default();
        let hex = |ip: std::net::Ipv6Addr| format!("{:032x}", u128::from(ip));
        let has = |ip| on_lo.contains(&hex(ip));
        if !has(std::net::Ipv6Addr::LOCALHOST) || has(agent_common::INBOUND_PASSTHROUGH_SRC_V6) {
            return Ok(false);
        }
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        }
        std::fs::write(marker, addr()).map_err(|e| err(format!("{}: {e}", marker.display())))?;
        let added = ip(netns, &["-6", "addr", "add", &addr(), "dev", "lo"]).map_err(|e| {
            let _ = std::fs::remove_file(marker);
            err(format!("running ip: {e}"))
        })?;
        if !added.status.success() {
            let _ = std::fs::remove_file(marker);
            return Err(err(format!(
                "ip -6 addr add {} dev lo: {}",
                addr(),
                String::from_utf8_lossy(&added.stderr).trim()
            )));
        }
        info!(address = %addr(), "added the IPv6 passthrough source to lo");
        Ok(true)
    }

    /// Removes `::6/128` from `lo` if `marker` says it is ours; whether it
    /// did.
    pub fn remove_v6(netns: &Netns, marker: &Path) -> bool {
        if std::fs::remove_file(marker).is_err() {
            return false;
        }
        match ip(netns, &["-6", "addr", "del", &addr(), "dev", "lo"]) {
            Ok(o) if o.status.success() => return true,
            Ok(o) => {
                warn!(error = %String::from_utf8_lossy(&o.stderr).trim(), "removing ::6 from lo");
            }
            Err(e) => warn!(error = %e, "removing ::6 from lo"),
        }
        false
    }
}
