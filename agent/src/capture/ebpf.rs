//! The eBPF capture: the datapath serving one namespace. Loading verifies
//! every program and creates (or adopts) the maps; installing writes the
//! namespace's configuration and rules, then attaches: connect4 and
//! getpeername4 to the served cgroup, sockops and getsockopt to every
//! cgroup the app's and the proxy's sockets live in, sk_msg to the
//! SOCKHASH, sk_lookup to the namespace.
//!
//! The short-circuit needs two facts about the running kernel, found once
//! at load: where its socket fields are (its BTF) and how it treats a
//! blocking reader of a socket in a sockmap (a probe). Without them, or on
//! a kernel that cannot bound the queue, connections are redirected but
//! not short-circuited (plain loopback TCP), and the log says why.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
};

use agent_common::{KernelLayout, NetnsConfig, flags};
use tracing::{debug, info, warn};

use super::Settings;
use crate::{
    ebpf::{
        Datapath, DatapathMaps, EbpfError, Hook, LoadOptions, OBJECT, kernel, reads,
        rules::rule_flags,
    },
    pins,
    rules::CaptureRules,
};

/// The namespace's entry in `NETNS_CONFIG`.
#[must_use]
pub fn netns_config(s: &Settings) -> NetnsConfig {
    let mut f = flags::REDIRECT_OUTBOUND | rule_flags(&s.rules);
    for (on, bit) in [
        (s.fail_open, flags::FAIL_OPEN),
        (s.sockmap, flags::SOCKMAP),
        (s.proxy.uid.is_some(), flags::PROXY_UID),
        (s.proxy.gid.is_some(), flags::PROXY_GID),
        (s.inbound, flags::REDIRECT_INBOUND),
        (s.dns.is_some(), flags::REDIRECT_DNS),
        (s.ipv6, flags::CAPTURE_IPV6),
        (
            s.dns.as_ref().is_some_and(|d| d.capture_all),
            flags::CAPTURE_ALL_DNS,
        ),
    ] {
        if on {
            f |= bit;
        }
    }
    NetnsConfig {
        outbound_port: s.outbound_port,
        inbound_port: s.inbound_port,
        proxy_mark: s.proxy.mark,
        proxy_uid: s.proxy.uid.unwrap_or(0),
        proxy_gid: s.proxy.gid.unwrap_or(0),
        flags: f,
        dns_port: s.dns.as_ref().map_or(0, |d| d.port),
        pad: 0,
    }
}

/// Where a namespace's datapath is pinned under `bpffs` (mounted there if
/// nothing is): pins of older map layouts for this namespace are removed
/// first.
pub fn pin_dir(bpffs: &Path, netns_cookie: u64) -> Result<PathBuf, EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    pins::ensure_bpffs(bpffs)?;
    let fingerprint = pins::layout_fingerprint(OBJECT)?;
    for stale in pins::stale_instances(bpffs, &fingerprint, netns_cookie) {
        warn!(pins = %stale.display(), "removing pins of an older datapath layout");
        pins::remove_instance(&stale)?;
    }
    Ok(pins::instance_dir(bpffs, &fingerprint, netns_cookie))
}

/// Where the node agent's datapath is pinned under `bpffs` (mounted there
/// if nothing is), and the node datapaths of older map layouts, to remove
/// once the new one is in place.
pub fn node_pin_dir(bpffs: &Path) -> Result<(PathBuf, Vec<PathBuf>), EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    pins::ensure_bpffs(bpffs)?;
    let fingerprint = pins::layout_fingerprint(OBJECT)?;
    Ok((
        pins::node_dir(bpffs, &fingerprint),
        pins::stale_node_instances(bpffs, &fingerprint),
    ))
}

/// A loaded datapath for one namespace.
pub struct EbpfCapture {
    datapath: Datapath,
    /// The short-circuit can run here (asked for, and the kernel allows it).
    short_circuit: bool,
    /// Sockets whose reads block stay on plain TCP (this kernel's sockmap
    /// readers are not safe for them).
    guard_blocking: bool,
    /// The DNS hooks are attached.
    dns_attached: bool,
}

/// The kernel facts the short-circuit needs, or why it cannot run here.
pub fn short_circuit_layout() -> Result<KernelLayout, String> {
    let mut layout = kernel::layout().map_err(|e| e.to_string())?;
    let behaviour = reads::probe().map_err(|e| format!("probing sockmap reads: {e}"))?;
    if !behaviour.ingress_charged {
        return Err(format!(
            "this kernel does not bound a short-circuited reader's queue ({})",
            behaviour.describe()
        ));
    }
    if behaviour.blocking_reads_fail() {
        layout.flags |= KernelLayout::GUARD_BLOCKING;
    }
    info!(
        readers = %behaviour.describe(),
        "sockmap short-circuit: how this kernel treats readers"
    );
    Ok(layout)
}

impl EbpfCapture {
    /// Loads (and verifies) the object, adopting pinned maps in `pin_dir`.
    pub fn load(settings: &Settings, pin_dir: Option<PathBuf>) -> Result<Self, EbpfError> {
        Self::load_with(
            settings.sockmap,
            settings.sockmap_queue_limit,
            settings.short_conn_threshold,
            pin_dir,
            settings.netns_cookie,
        )
    }

    /// [`Self::load`] for any number of namespaces (node mode): whether to
    /// short-circuit, how far a reader may fall behind, after how many
    /// short connections in a row new ones stay on TCP, and the namespace
    /// the object's own sk_lookup serves (0: none; the others get an
    /// instance each).
    pub fn load_with(
        sockmap: bool,
        sockmap_queue_limit: u64,
        short_conn_threshold: u32,
        pin_dir: Option<PathBuf>,
        sk_lookup_netns: u64,
    ) -> Result<Self, EbpfError> {
        let layout = if sockmap {
            short_circuit_layout()
                .inspect_err(|why| {
                    warn!(reason = %why, "no short-circuit: captured connections use plain loopback TCP");
                })
                .ok()
        } else {
            None
        };
        let opts = LoadOptions {
            debug_logs: tracing::enabled!(target: "agent_ebpf", tracing::Level::DEBUG),
            sockmap_queue_limit,
            short_conn_threshold,
            layout: layout.unwrap_or_default(),
            sk_lookup_netns,
        };
        let datapath = Datapath::load(&opts, pin_dir.as_deref())?;
        if datapath.adopted() {
            info!(pins = %pin_dir.unwrap_or_default().display(), "adopting the pinned datapath of an earlier agent: connections and hooks carry on");
        }
        Ok(Self {
            datapath,
            short_circuit: layout.is_some(),
            guard_blocking: layout.is_some_and(|l| l.flags & KernelLayout::GUARD_BLOCKING != 0),
            dns_attached: false,
        })
    }

    /// Which sockets the short-circuit carries here: `none`, `nonblocking`
    /// (blocking ones stay on plain TCP) or `all`.
    #[must_use]
    pub const fn short_circuits(&self) -> &'static str {
        match (self.short_circuit, self.guard_blocking) {
            (false, _) => "none",
            (true, true) => "nonblocking",
            (true, false) => "all",
        }
    }

    /// Configures and attaches. `proxy_listeners`: the built-in proxy's.
    pub fn install(
        &mut self,
        s: &Settings,
        proxy_listeners: &[&TcpListener],
    ) -> Result<(), EbpfError> {
        self.enroll(s, proxy_listeners)?;
        self.attach(&s.cgroup, &s.socket_hook_cgroups, s.dns.is_some())?;
        if s.inbound {
            self.serve_inbound(s, proxy_listeners)?;
        }
        self.prune_unclaimed_links()?;
        debug!(netns_cookie = s.netns_cookie, "namespace enrolled");
        Ok(())
    }

    /// Steers the namespace's inbound connections to its inbound listener
    /// (the built-in proxy's, among `proxy_listeners`, or the one an
    /// external proxy registers on listen(2)): sk_lookup attached to the
    /// namespace, its link pinned with the datapath's.
    pub fn serve_inbound(
        &mut self,
        s: &Settings,
        proxy_listeners: &[&TcpListener],
    ) -> Result<(), EbpfError> {
        let dp = &mut self.datapath;
        for l in proxy_listeners
            .iter()
            .filter(|l| l.local_addr().is_ok_and(|a| a.port() == s.inbound_port))
        {
            dp.maps_mut().set_inbound_listener(s.netns_cookie, l)?;
        }
        dp.attach_sk_lookup(&s.netns, s.netns_cookie)
    }

    /// Removes pinned links an earlier agent left that this one has not
    /// claimed (a hook attached elsewhere now, a pod gone meanwhile).
    pub fn prune_unclaimed_links(&mut self) -> Result<(), EbpfError> {
        for stale in self.datapath.prune_unclaimed_links()? {
            info!(pin = %stale.display(), "removed a pinned link the earlier agent had and this one does not use");
        }
        Ok(())
    }

    /// Writes one namespace's configuration, rules and proxy listeners into
    /// the maps (its connects are captured from here on, by hooks attached
    /// to a cgroup covering its processes); the configuration written.
    pub fn enroll(
        &mut self,
        s: &Settings,
        proxy_listeners: &[&TcpListener],
    ) -> Result<NetnsConfig, EbpfError> {
        let cookie = s.netns_cookie;
        let mut config = netns_config(s);
        if !self.short_circuit {
            config.flags &= !flags::SOCKMAP;
        }
        let maps = self.datapath.maps_mut();
        // The built-in proxy's listeners opened before sockops could see
        // them listen: the sockets they accept never block.
        for l in proxy_listeners {
            if let Ok(addr) = l.local_addr() {
                maps.set_listener_nonblocking(cookie, addr.port())?;
            }
        }
        maps.set_rules(cookie, &s.rules)?;
        let servers = s
            .dns
            .as_ref()
            .map(|d| d.servers.as_slice())
            .unwrap_or_default();
        maps.set_dns_servers(cookie, servers)?;
        maps.set_netns_config(cookie, config)?;
        Ok(config)
    }

    /// Whether the maps serve the namespace with this cookie (an earlier
    /// agent may have enrolled it).
    #[must_use]
    pub fn serves(&self, netns_cookie: u64) -> bool {
        self.datapath
            .maps()
            .netns_configs()
            .is_ok_and(|c| c.iter().any(|(cookie, _)| *cookie == netns_cookie))
    }

    /// Takes a namespace out of the maps (new connects there go direct):
    /// its configuration first, then its rules, resolvers and listeners.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), EbpfError> {
        // While its entries stay, so does its inbound capture.
        self.datapath.maps_mut().forget_netns(netns_cookie)?;
        self.datapath.detach_sk_lookup(netns_cookie)
    }

    /// Attaches the cgroup hooks (connect, sendmsg, getpeername to `cgroup`;
    /// sockops and getsockopt to each of `socket_cgroups`) and sk_msg to the
    /// SOCKHASH. `dns`: the DNS hooks too.
    pub fn attach(
        &mut self,
        cgroup: &Path,
        socket_cgroups: &[PathBuf],
        dns: bool,
    ) -> Result<(), EbpfError> {
        let dp = &mut self.datapath;
        for hook in Hook::cgroup_hooks() {
            if hook.on_socket_cgroups() || (Hook::DNS.contains(&hook) && !dns) {
                continue;
            }
            dp.attach_cgroup(hook, cgroup)?;
        }
        self.dns_attached |= dns;
        for cg in socket_cgroups {
            if cg != cgroup {
                info!(cgroup = %cg.display(), "the proxy's sockets live outside the served cgroup: sockops and getsockopt attach here too");
            }
            for hook in Hook::cgroup_hooks().filter(|h| h.on_socket_cgroups()) {
                dp.attach_cgroup(hook, cg)?;
            }
        }
        dp.attach_sk_msg()
    }

    /// Attaches the DNS hooks (sendmsg and recvmsg) to `cgroup` too, once:
    /// a node agent does so for its first pod with DNS capture.
    pub fn attach_dns(&mut self, cgroup: &Path) -> Result<(), EbpfError> {
        if self.dns_attached {
            return Ok(());
        }
        for hook in Hook::DNS {
            self.datapath.attach_cgroup(hook, cgroup)?;
        }
        self.dns_attached = true;
        Ok(())
    }

    pub fn update_rules(
        &mut self,
        netns_cookie: u64,
        rules: &CaptureRules,
    ) -> Result<(), EbpfError> {
        self.datapath.maps_mut().set_rules(netns_cookie, rules)
    }

    /// The namespace's rules, as the maps hold them.
    pub fn rules(&self, netns_cookie: u64) -> Result<CaptureRules, EbpfError> {
        let maps = self.datapath.maps();
        let config = maps
            .netns_configs()?
            .into_iter()
            .find(|(c, _)| *c == netns_cookie)
            .map(|(_, c)| c)
            .ok_or(EbpfError::Missing {
                kind: "served namespace",
                name: "NETNS_CONFIG entry",
            })?;
        maps.rules(netns_cookie, &config)
    }

    #[must_use]
    pub fn maps(&self) -> &DatapathMaps {
        self.datapath.maps()
    }

    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, EbpfError> {
        self.datapath.take_logger()
    }

    /// Stops capturing first (new connects go direct), then detaches and
    /// unpins everything.
    /// Whether the maps were adopted from an earlier agent's pins.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.datapath.adopted()
    }

    pub fn teardown(mut self, netns_cookie: u64) {
        if let Err(e) = self.datapath.maps_mut().remove_netns_config(netns_cookie) {
            warn!(error = %e, "unenrolling the namespace");
        }
        if let Err(e) = self.datapath.teardown() {
            warn!(error = %e, "removing the pinned datapath");
        }
    }
}
