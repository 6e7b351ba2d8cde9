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

/// What to capture in one network namespace, in either mode.
#[derive(Debug)]
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
    /// While no proxy listens, let connections go where they were going.
    pub fail_open: bool,
    pub rules: CaptureRules,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "--fail-open needs the eBPF mode: iptables REDIRECT rules stay in place while the proxy is down, so it can only fail closed"
    )]
    FailOpenNeedsEbpf,
    #[error(transparent)]
    Ebpf(#[from] crate::ebpf::EbpfError),
    #[error("{context}: {source}")]
    Iptables {
        context: &'static str,
        source: crate::iptables::apply::ApplyError,
    },
}

/// Capture in place (or ready to be put in place), in one mode.
pub enum Capture {
    Ebpf(ebpf::EbpfCapture),
    Iptables(iptables::IptablesCapture),
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
        Ok(match mode {
            Mode::Ebpf => Self::Ebpf(ebpf::EbpfCapture::load(settings, pin_dir)?),
            Mode::Iptables => {
                if settings.fail_open {
                    return Err(CaptureError::FailOpenNeedsEbpf);
                }
                Self::Iptables(iptables::IptablesCapture::prepare(settings)?)
            }
        })
    }

    #[must_use]
    pub const fn mode(&self) -> Mode {
        match self {
            Self::Ebpf(_) => Mode::Ebpf,
            Self::Iptables(_) => Mode::Iptables,
        }
    }

    /// Puts capture in place. `inbound_listener`: the built-in proxy's, for
    /// sk_lookup to steer to at once (an external proxy's registers itself
    /// when it listens).
    pub fn install(
        &mut self,
        settings: &Settings,
        inbound_listener: Option<&TcpListener>,
    ) -> Result<(), CaptureError> {
        match self {
            Self::Ebpf(c) => Ok(c.install(settings, inbound_listener)?),
            Self::Iptables(c) => c.install(settings),
        }
    }

    /// Replaces the capture rules: new connections follow at once.
    pub fn update_rules(
        &mut self,
        settings: &Settings,
        rules: &CaptureRules,
    ) -> Result<(), CaptureError> {
        match self {
            Self::Ebpf(c) => Ok(c.update_rules(settings.netns_cookie, rules)?),
            Self::Iptables(c) => c.update_rules(settings, rules),
        }
    }

    /// The rules in force (eBPF: as the maps hold them, whoever wrote them).
    pub fn rules(&self, settings: &Settings) -> Result<CaptureRules, CaptureError> {
        match self {
            Self::Ebpf(c) => Ok(c.rules(settings.netns_cookie)?),
            Self::Iptables(c) => Ok(c.rules().clone()),
        }
    }

    /// The datapath's maps (eBPF mode).
    #[must_use]
    pub fn maps(&self) -> Option<&DatapathMaps> {
        match self {
            Self::Ebpf(c) => Some(c.maps()),
            Self::Iptables(_) => None,
        }
    }

    /// Forwards the eBPF programs' log records (eBPF mode).
    pub fn logger(
        &mut self,
    ) -> Result<Option<aya_log::EbpfLogger<&'static dyn log::Log>>, CaptureError> {
        match self {
            Self::Ebpf(c) => Ok(Some(c.logger()?)),
            Self::Iptables(_) => Ok(None),
        }
    }

    /// Removes every trace: stops capturing new connections first, then
    /// detaches and unpins everything, or removes exactly the rules.
    pub fn teardown(self, settings: &Settings) {
        match self {
            Self::Ebpf(c) => c.teardown(settings.netns_cookie),
            Self::Iptables(c) => c.teardown(settings),
        }
    }

    /// Leaves everything in place for the agent that took over.
    pub fn leave(self) {
        match self {
            Self::Ebpf(c) => drop(c),
            Self::Iptables(c) => drop(c),
        }
    }
}
