//! The pods a node agent serves: for each, its namespace, its entry in the
//! datapath's maps, and a built-in proxy whose listeners and upstream
//! sockets live inside that namespace (one process, many namespaces, as
//! ztunnel's in-pod mode), or the pod's own proxy.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    api::{Enrollment, PodInfo, PodRef},
    handover::{Handed, PodSockets},
};
use crate::{
    admin::metrics::NodePods,
    capture::{DnsSettings, ProxyIdentity, Settings, ebpf::EbpfCapture, passthrough},
    netns::Netns,
    proxy::{Direction, Listeners, ProxyConfig, ProxyHandle},
    rules::CaptureRules,
};

/// Why a pod could not be enrolled. Each names the thing at fault.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("netns {path}: {source}")]
    Netns {
        path: PathBuf,
        source: crate::netns::NetnsError,
    },
    #[error("rules: {0}")]
    Rules(#[from] crate::rules::RuleError),
    #[error("netns {path}: the proxy's listeners: {source}")]
    Proxy {
        path: PathBuf,
        source: crate::proxy::ProxyError,
    },
    #[error("netns {path}: the datapath's maps: {source}")]
    Maps {
        path: PathBuf,
        source: Box<crate::ebpf::EbpfError>,
    },
    #[error("netns {path}: keeping a handle on the proxy's listeners: {source}")]
    Keep {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unenroll: name the pod by netns or container id")]
    NoPod,
    #[error(
        "the pod's proxy and its DNS proxy are told apart by one {what}: --proxy-{what} {proxy} and --dns-proxy-{what} {dns} differ"
    )]
    Identity {
        what: &'static str,
        proxy: u32,
        dns: u32,
    },
    #[error(
        "DNS capture: name the pod's resolvers (--dns-servers, CNI_ARGS MESH_REDIRECT_DNS_SERVERS) or capture all DNS (--capture-all-dns, MESH_REDIRECT_DNS=all)"
    )]
    DnsServers,
    #[error("netns {path}: {source}")]
    Passthrough {
        path: PathBuf,
        source: Box<crate::capture::CaptureError>,
    },
}

/// What every pod of this node gets, whatever its rules.
#[derive(Debug, Clone)]
pub struct PodDefaults {
    pub proxy: ProxyConfig,
    pub sockmap: bool,
    pub sockmap_queue_limit: u64,
    pub short_conn_threshold: u32,
    /// The cgroup the hooks are attached to (every pod's processes are
    /// below it).
    pub cgroup: PathBuf,
    /// How long an unenrolled pod's open connections may take to finish.
    pub drain: Duration,
    /// Where the markers of the `::6` passthrough sources we put on pods'
    /// `lo` are kept.
    pub state_dir: PathBuf,
    /// Where a pod's DNS proxy listens, inside the pod.
    pub dns_port: u16,
}

impl PodDefaults {
    /// The marker saying the `::6` on this pod's `lo` is ours.
    fn marker(&self, netns_cookie: u64) -> PathBuf {
        passthrough::marker(&self.state_dir, netns_cookie)
    }
}

/// One served pod.
struct Pod {
    info: PodInfo,
    /// As asked: what a restarted agent enrolls again.
    asked: Enrollment,
    /// The built-in proxy (none: the pod runs its own).
    proxy: Option<ProxyHandle>,
    /// Our own handle on its listening sockets, for a successor.
    listeners: Option<Listeners>,
}

/// Every pod served, by netns cookie.
#[derive(Default)]
pub struct Pods {
    by_cookie: BTreeMap<u64, Pod>,
    /// The same pods, as the admin server's metrics read them.
    metrics: NodePods,
}

impl Pods {
    /// Serves the pod `e` names: its proxy starts listening inside its
    /// namespace, then the maps say to capture it. Enrolling a served
    /// namespace again answers what is in force. On any failure nothing of
    /// the pod is left (no listener, no map entry).
    pub fn enroll(
        &mut self,
        capture: &mut EbpfCapture,
        defaults: &PodDefaults,
        e: &Enrollment,
    ) -> Result<PodInfo, PodError> {
        self.enroll_with(capture, defaults, e, &mut Handed::new())
    }

    /// [`Self::enroll`], the proxy's listeners taken from `handed` (by the
    /// pod's netns cookie: a node agent we take over from handed them over)
    /// where it has them, bound afresh otherwise.
    pub fn enroll_with(
        &mut self,
        capture: &mut EbpfCapture,
        defaults: &PodDefaults,
        e: &Enrollment,
        handed: &mut Handed,
    ) -> Result<PodInfo, PodError> {
        let netns_err = |source| PodError::Netns {
            path: e.netns.clone(),
            source,
        };
        let netns = Netns::open(&e.netns).map_err(netns_err)?;
        let cookie = netns.cookie().map_err(netns_err)?;
        if let Some(p) = self.by_cookie.get_mut(&cookie) {
            if p.info.container_id.is_none() {
                p.info.container_id.clone_from(&e.container_id);
                p.asked.container_id.clone_from(&e.container_id);
            }
            return Ok(current(p));
        }
        let rules = e.rules.apply_to(&CaptureRules::default())?;
        let (identity, dns) = identity_and_dns(e, defaults)?;
        let ipv6 = netns.has_global_ipv6().map_err(netns_err)?;
        // istio's `includeInboundPorts: ""`: no inbound capture.
        let inbound = defaults.proxy.inbound_port.is_some()
            && (rules.inbound_include_ports.is_all()
                || !rules.inbound_include_ports.items().is_empty());
        // The proxy's IPv6 passthrough source, as for a pod's own agent;
        // undone on failure only if this call put it there.
        let added_v6 = inbound
            && passthrough::add_v6(&netns, &defaults.marker(cookie)).map_err(|source| {
                PodError::Passthrough {
                    path: e.netns.clone(),
                    source: Box::new(source),
                }
            })?;
        let undo_v6 = |netns: &Netns| {
            if added_v6 {
                passthrough::remove_v6(netns, &defaults.marker(cookie));
            }
        };
        // Served by an earlier agent (a restart, a takeover still under way):
        // a failure here leaves its entries alone (the old agent may serve
        // on; `forget_unserved` takes them out once we serve).
        let served_before = capture.serves(cookie);
        // The built-in proxy listens before the maps say to capture; a
        // pod's own proxy is its business.
        let (proxy, kept) = if e.external_proxy.is_some() {
            (None, None)
        } else {
            let mut config = defaults.proxy.clone();
            if !inbound {
                config.inbound_port = None;
            }
            let (proxy, kept) = start_proxy(&netns, &config, handed.remove(&cookie), &e.netns)
                .inspect_err(|_| undo_v6(&netns))?;
            (Some(proxy), Some(kept))
        };
        let settings = settings(
            netns,
            cookie,
            defaults,
            Asked {
                rules: rules.clone(),
                ipv6,
                inbound,
                proxy: identity,
                dns,
            },
        );
        let ours: Vec<&TcpListener> = kept.iter().flat_map(|k| k.all().map(|(l, _)| l)).collect();
        if let Err(source) = write_capture(capture, defaults, &settings, &ours) {
            // Nothing half-enrolled: whatever was written goes again.
            if !served_before {
                let _ = capture.unenroll(cookie);
            }
            undo_v6(&settings.netns);
            if let Some(proxy) = proxy {
                proxy.stop();
            }
            return Err(PodError::Maps {
                path: e.netns.clone(),
                source: Box::new(source),
            });
        }
        let info = PodInfo {
            netns: e.netns.clone(),
            netns_cookie: cookie,
            pod: e.pod.clone(),
            container_id: e.container_id.clone(),
            outbound_port: defaults.proxy.outbound_port,
            inbound_port: inbound.then_some(settings.inbound_port),
            rules,
            external_proxy: e.external_proxy,
            dns: e.dns.clone(),
            connections: 0,
            open: 0,
        };
        info!(
            pod = info.pod.as_deref().unwrap_or("-"),
            netns = %info.netns.display(),
            netns_cookie = cookie,
            "pod enrolled"
        );
        self.show(cookie, &info, proxy.as_ref());
        self.by_cookie.insert(
            cookie,
            Pod {
                info,
                asked: e.clone(),
                proxy,
                listeners: kept,
            },
        );
        Ok(current(&self.by_cookie[&cookie]))
    }

    /// Stops serving the pod `r` names: its map entries go first (new
    /// connects there go direct), then its proxy stops accepting and its
    /// open connections get `defaults.drain` to finish. `None`: no such pod.
    pub fn unenroll(
        &mut self,
        capture: &mut EbpfCapture,
        defaults: &PodDefaults,
        r: &PodRef,
    ) -> Result<Option<PodInfo>, PodError> {
        let cookie = match (&r.container_id, &r.netns) {
            (Some(id), _) => self
                .by_cookie
                .iter()
                .find(|(_, p)| p.info.container_id.as_ref() == Some(id))
                .map(|(c, _)| *c),
            (None, Some(path)) => self
                .by_cookie
                .iter()
                .find(|(_, p)| p.info.netns == *path)
                .map(|(c, _)| *c)
                .or_else(|| Netns::open(path).and_then(|n| n.cookie()).ok()),
            (None, None) => return Err(PodError::NoPod),
        };
        let Some(cookie) = cookie.filter(|c| self.by_cookie.contains_key(c)) else {
            return Ok(None);
        };
        // Out of the maps first; if that fails the pod stays served (its
        // connects still reach its proxy) and the caller hears why.
        if let Err(source) = capture.unenroll(cookie) {
            return Err(PodError::Maps {
                path: self.by_cookie[&cookie].info.netns.clone(),
                source: Box::new(source),
            });
        }
        let pod = self.by_cookie.remove(&cookie).expect("checked above");
        self.metrics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&cookie);
        let info = current(&pod);
        if let Some(proxy) = pod.proxy {
            retire(proxy, defaults.drain);
        }
        let marker = defaults.marker(cookie);
        match Netns::open(&info.netns) {
            Ok(ns) if ns.cookie().is_ok_and(|c| c == cookie) => {
                passthrough::remove_v6(&ns, &marker);
            }
            // Gone with its namespace.
            _ => {
                let _ = std::fs::remove_file(&marker);
            }
        }
        info!(
            pod = info.pod.as_deref().unwrap_or("-"),
            netns = %info.netns.display(),
            "pod unenrolled"
        );
        Ok(Some(info))
    }

    /// Puts a pod in the metrics.
    fn show(&self, cookie: u64, info: &PodInfo, proxy: Option<&ProxyHandle>) {
        let label = info
            .pod
            .clone()
            .unwrap_or_else(|| format!("netns:{cookie}"));
        self.metrics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(cookie, (label, proxy.map(|p| Arc::clone(&p.stats))));
    }

    /// Copies of every pod's listening sockets, by netns cookie, for the
    /// node agent that takes over from us.
    pub fn handover(&self) -> std::io::Result<PodSockets> {
        self.by_cookie
            .iter()
            .filter_map(|(cookie, p)| Some((*cookie, p.listeners.as_ref()?)))
            .filter(|(_, l)| l.all().next().is_some())
            .map(|(cookie, l)| {
                let fds = l
                    .all()
                    .map(|(l, _)| l.try_clone().map(OwnedFd::from))
                    .collect::<std::io::Result<Vec<_>>>()?;
                Ok((cookie, fds))
            })
            .collect()
    }

    /// The pods as the metrics see them (kept up to date).
    #[must_use]
    pub fn metrics(&self) -> NodePods {
        Arc::clone(&self.metrics)
    }

    /// What each pod was enrolled with, to enroll it again after a restart.
    #[must_use]
    pub fn enrollments(&self) -> Vec<Enrollment> {
        self.by_cookie.values().map(|p| p.asked.clone()).collect()
    }

    /// Whether the namespace with this cookie is served.
    #[must_use]
    pub fn serves(&self, netns_cookie: u64) -> bool {
        self.by_cookie.contains_key(&netns_cookie)
    }

    /// Every pod, with its counters now.
    #[must_use]
    pub fn list(&self) -> Vec<PodInfo> {
        self.by_cookie.values().map(current).collect()
    }

    /// The node agent stops: every proxy stops accepting and its open
    /// connections get until `deadline`; the pods stay enrolled in the maps
    /// (their connects are refused until a node agent serves them again).
    /// How many connections were still open at the deadline.
    pub fn stop_serving(&mut self, deadline: Instant) -> u64 {
        let pods = std::mem::take(&mut self.by_cookie);
        self.metrics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let proxies: Vec<ProxyHandle> = pods.into_values().filter_map(|p| p.proxy).collect();
        for p in &proxies {
            p.stop_accepting();
        }
        let mut left = 0;
        for p in proxies {
            left += p.drain(deadline);
            p.stop();
        }
        left
    }

    /// Pods whose namespace is gone from where it was enrolled (its bind
    /// mount removed, and no `DEL` came): they are unenrolled.
    pub fn collect_garbage(&mut self, capture: &mut EbpfCapture, defaults: &PodDefaults) {
        let gone: Vec<PodRef> = self
            .by_cookie
            .iter()
            .filter(|(cookie, p)| !still_there(&p.info.netns, **cookie))
            .map(|(_, p)| PodRef {
                netns: Some(p.info.netns.clone()),
                container_id: None,
            })
            .collect();
        for r in &gone {
            info!(netns = %r.netns.as_deref().unwrap_or(Path::new("")).display(), "the pod's namespace is gone: unenrolling it");
            let _ = self.unenroll(capture, defaults, r);
        }
    }
}

/// Starts a pod's built-in proxy on the sockets `handed` over for it (those
/// on its ports: others are not ours to serve, the old agent's copies stay
/// with it), binding what is missing; our own handle on its listeners.
fn start_proxy(
    netns: &Netns,
    config: &ProxyConfig,
    handed: Option<Vec<TcpListener>>,
    path: &Path,
) -> Result<(ProxyHandle, Listeners), PodError> {
    let proxy_err = |source| PodError::Proxy {
        path: path.to_owned(),
        source,
    };
    let on = |port: Option<u16>| {
        move |l: &TcpListener| l.local_addr().is_ok_and(|a| Some(a.port()) == port)
    };
    let (outbound, inbound): (Vec<TcpListener>, Vec<TcpListener>) = handed
        .unwrap_or_default()
        .into_iter()
        .filter(|l| on(Some(config.outbound_port))(l) || on(config.inbound_port)(l))
        .partition(on(Some(config.outbound_port)));
    let mut listeners = Listeners { outbound, inbound };
    listeners.bind_missing(netns, config).map_err(proxy_err)?;
    let kept = listeners.try_clone().map_err(|source| PodError::Keep {
        path: path.to_owned(),
        source,
    })?;
    let proxy = ProxyHandle::start(netns, config.clone(), listeners).map_err(proxy_err)?;
    Ok((proxy, kept))
}

/// Writes a pod's capture into the datapath: its maps, the DNS hooks if
/// it is the first to want them, its sk_lookup.
fn write_capture(
    capture: &mut EbpfCapture,
    defaults: &PodDefaults,
    settings: &Settings,
    ours: &[&TcpListener],
) -> Result<(), crate::ebpf::EbpfError> {
    capture.enroll(settings, ours)?;
    if settings.dns.is_some() {
        capture.attach_dns(&defaults.cgroup)?;
    }
    if settings.inbound {
        capture.serve_inbound(settings, ours)?;
    }
    Ok(())
}

/// Whether `path` still names the namespace with `cookie`.
fn still_there(path: &Path, cookie: u64) -> bool {
    Netns::open(path)
        .and_then(|n| n.cookie())
        .is_ok_and(|c| c == cookie)
}

/// A pod's info with its proxy's counters now.
fn current(p: &Pod) -> PodInfo {
    let mut info = p.info.clone();
    // A pod's own proxy: the agent counts nothing of it.
    if let Some(proxy) = &p.proxy {
        for d in Direction::ALL {
            let s = proxy.stats.direction(d);
            info.connections += s.connections_total.load(Ordering::Relaxed);
            info.open += s.connections_open.load(Ordering::Relaxed);
        }
    }
    info
}

/// Stops a pod's proxy in the background: no more accepts at once, open
/// connections until `drain`.
fn retire(proxy: ProxyHandle, drain: Duration) {
    proxy.stop_accepting();
    std::thread::spawn(move || {
        let left = proxy.drain(Instant::now() + drain);
        if left > 0 {
            warn!(
                connections = left,
                "unenrolled pod: drain deadline passed, closing its connections"
            );
        }
        proxy.stop();
    });
}

/// What one pod asked for, checked.
struct Asked {
    rules: CaptureRules,
    ipv6: bool,
    inbound: bool,
    proxy: ProxyIdentity,
    dns: Option<DnsSettings>,
}

/// Who is never captured in the pod (the node's proxies by their mark, the
/// pod's own proxy and DNS proxy by uid/gid: one identity each, as istio's
/// 1337), and its DNS capture; refused by name where they do not fit.
fn identity_and_dns(
    e: &Enrollment,
    d: &PodDefaults,
) -> Result<(ProxyIdentity, Option<DnsSettings>), PodError> {
    let own = e.external_proxy.unwrap_or_default();
    let dns = e.dns.clone();
    let pick = |what: &'static str, a: Option<u32>, b: Option<u32>| match (a, b) {
        (Some(x), Some(y)) if x != y => Err(PodError::Identity {
            what,
            proxy: x,
            dns: y,
        }),
        (a, b) => Ok(a.or(b)),
    };
    let proxy = ProxyIdentity {
        mark: d.proxy.mark,
        uid: pick("uid", own.uid, dns.as_ref().and_then(|d| d.uid))?,
        gid: pick("gid", own.gid, dns.as_ref().and_then(|d| d.gid))?,
    };
    let dns = match dns {
        None => None,
        Some(asked) if asked.servers.is_empty() && !asked.capture_all => {
            return Err(PodError::DnsServers);
        }
        Some(asked) => Some(DnsSettings {
            port: d.dns_port,
            capture_all: asked.capture_all,
            servers: asked.servers,
        }),
    };
    Ok((proxy, dns))
}

/// The capture settings of one pod.
fn settings(netns: Netns, netns_cookie: u64, d: &PodDefaults, asked: Asked) -> Settings {
    Settings {
        netns,
        netns_cookie,
        cgroup: d.cgroup.clone(),
        socket_hook_cgroups: vec![d.cgroup.clone()],
        outbound_port: d.proxy.outbound_port,
        inbound_port: d.proxy.inbound_port.unwrap_or(0),
        inbound: asked.inbound,
        proxy: asked.proxy,
        sockmap: d.sockmap,
        sockmap_queue_limit: d.sockmap_queue_limit,
        short_conn_threshold: d.short_conn_threshold,
        fail_open: false,
        rules: asked.rules,
        dns: asked.dns,
        ipv6: asked.ipv6,
        passthrough_marker: PathBuf::new(),
    }
}
