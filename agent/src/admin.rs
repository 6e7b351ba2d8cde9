//! The admin server, inside the served namespace (default 127.0.0.1:15020:
//! loopback, so never captured; 15020 is excluded inbound too):
//!
//! - `/metrics`: Prometheus text (prometheus-client), read fresh from the
//!   datapath's maps and the proxy's counters at every scrape;
//! - `/ready`: 200 once capture is in place and the listeners are up, 503
//!   with the reasons otherwise (and while draining); the body also names
//!   the fail policy (`fail-policy: closed`);
//! - `/healthz`: 200 while the process serves.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddrV4,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use agent_common::counter;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, warn};

use crate::{
    doctor::Mode,
    inspect::{self, Snapshot},
    netns::Netns,
    proxy::{self, Direction},
};

/// What `/ready` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Programs attached (eBPF) or rules installed (iptables).
    pub capture: AtomicBool,
    /// The proxy's listeners are up (always true with an external proxy).
    pub listeners: AtomicBool,
    /// Shutting down: no new connections wanted here.
    pub draining: AtomicBool,
}

impl Readiness {
    /// Why not ready; empty when ready.
    #[must_use]
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.capture.load(Ordering::Relaxed) {
            out.push("capture not in place");
        }
        if !self.listeners.load(Ordering::Relaxed) {
            out.push("proxy listeners not up");
        }
        if self.draining.load(Ordering::Relaxed) {
            out.push("draining");
        }
        out
    }
}

/// What the admin server reads from.
pub struct AdminState {
    pub mode: Mode,
    pub fail_open: bool,
    pub ready: Arc<Readiness>,
    /// The built-in proxy's counters (none with an external proxy).
    pub proxy: Option<Arc<proxy::Stats>>,
    /// eBPF mode: the served cgroup, to find the datapath's maps.
    pub datapath_cgroup: Option<PathBuf>,
}

/// Binds the admin listener inside `netns` (before anything is attached,
/// so a port in use fails cleanly). `SO_REUSEPORT`: during a handover the
/// old and the new agent both hold it for a moment.
pub fn bind(netns: &Netns, addr: SocketAddrV4) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context as _;
    netns
        .run(|| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.set_reuse_port(true)?;
            sock.set_nonblocking(true)?;
            sock.bind(&std::net::SocketAddr::V4(addr).into())?;
            sock.listen(128)?;
            Ok::<std::net::TcpListener, std::io::Error>(sock.into())
        })?
        .with_context(|| format!("--admin: cannot listen on {addr}"))
}

/// A running admin server.
pub struct AdminHandle {
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminHandle {
    /// Serves `listener` on its own thread until dropped.
    pub fn start(listener: std::net::TcpListener, state: Arc<AdminState>) -> std::io::Result<Self> {
        let (shutdown, mut rx) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new().name("admin".into()).spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else { return };
                loop {
                    tokio::select! {
                        r = listener.accept() => match r {
                            Ok((s, _)) => { tokio::spawn(serve(s, Arc::clone(&state))); }
                            Err(e) => { warn!(error = %e, "admin: accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; }
                        },
                        _ = rx.wait_for(|s| *s) => break,
                    }
                }
            });
        })?;
        Ok(Self {
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(mut s: TcpStream, state: Arc<AdminState>) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(5), read).await,
        Ok(true)
    ) {
        return;
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = match path {
        "/metrics" => {
            let snapshot = state
                .datapath_cgroup
                .as_ref()
                .and_then(|cg| inspect::snapshot(cg).ok().flatten());
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render_metrics(&state, snapshot.as_ref()),
            )
        }
        "/ready" => match state.ready.not_ready() {
            r if r.is_empty() => (
                "200 OK",
                "text/plain",
                format!("ready\nfail-policy: {}\n", state.fail_policy()),
            ),
            r => (
                "503 Service Unavailable",
                "text/plain",
                format!(
                    "not ready: {}\nfail-policy: {}\n",
                    r.join(", "),
                    state.fail_policy()
                ),
            ),
        },
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if let Err(e) = s.write_all(format!("{head}{body}").as_bytes()).await {
        debug!(error = %e, "admin: write failed");
    }
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Registers a counter family and fills it.
fn counters(reg: &mut Registry, name: &str, help: &str, values: &[(Labels, u64)]) {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in values {
        f.get_or_create(l).inc_by(*v);
    }
    reg.register(name, help, f);
}

/// Registers a gauge family and fills it.
fn gauges(reg: &mut Registry, name: &str, help: &str, values: &[(Labels, i64)]) {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        f.get_or_create(l).set(*v);
    }
    reg.register(name, help, f);
}

/// The datapath's counters and map usage.
fn datapath_metrics(reg: &mut Registry, s: &Snapshot) {
    let c = |i| s.counter(i);
    counters(
        reg,
        "mesh_redirect_redirects",
        "Connections captured by the datapath, by direction",
        &[
            (
                labels(&[("direction", "outbound")]),
                c(counter::CONNECT_REDIRECTED),
            ),
            (
                labels(&[("direction", "inbound")]),
                c(counter::INBOUND_STEERED),
            ),
        ],
    );
    counters(
        reg,
        "mesh_redirect_sk_msg",
        "sk_msg verdicts: redirected to the peer socket, or passed over TCP",
        &[
            (
                labels(&[("verdict", "redirected")]),
                c(counter::MSG_REDIRECTED),
            ),
            (labels(&[("verdict", "passed")]), c(counter::MSG_PASSED)),
        ],
    );
    counters(
        reg,
        "mesh_redirect_getsockopt",
        "getsockopt(SO_ORIGINAL_DST) answered from the datapath, or not ours",
        &[
            (
                labels(&[("result", "answered")]),
                c(counter::GETSOCKOPT_ANSWERED),
            ),
            (
                labels(&[("result", "missed")]),
                c(counter::GETSOCKOPT_MISSED),
            ),
        ],
    );
    counters(
        reg,
        "mesh_redirect_fail_open_passed",
        "Connections that went direct because no proxy listened (fail open)",
        &[
            (
                labels(&[("direction", "outbound")]),
                c(counter::CONNECT_FAIL_OPEN),
            ),
            (
                labels(&[("direction", "inbound")]),
                c(counter::INBOUND_FAIL_OPEN),
            ),
        ],
    );
    let events: Vec<(Labels, u64)> = counter::NAMES
        .iter()
        .map(|&name| {
            (
                labels(&[("event", name)]),
                s.counters.get(name).copied().unwrap_or(0),
            )
        })
        .collect();
    counters(
        reg,
        "mesh_redirect_datapath_events",
        "Every datapath counter, by name",
        &events,
    );
    let entries: Vec<(Labels, i64)> = s
        .maps
        .iter()
        .map(|m| {
            (
                labels(&[("map", m.name)]),
                i64::try_from(m.entries).unwrap_or(i64::MAX),
            )
        })
        .collect();
    gauges(
        reg,
        "mesh_redirect_map_entries",
        "Entries held by each bounded map",
        &entries,
    );
    let capacity: Vec<(Labels, i64)> = s
        .maps
        .iter()
        .map(|m| (labels(&[("map", m.name)]), i64::from(m.capacity)))
        .collect();
    gauges(
        reg,
        "mesh_redirect_map_capacity",
        "Capacity of each bounded map",
        &capacity,
    );
}

/// The built-in proxy's counters.
fn proxy_metrics(reg: &mut Registry, p: &proxy::Stats) {
    use std::sync::atomic::Ordering::Relaxed;

    let per_dir = |f: &dyn Fn(&proxy::DirectionStats) -> u64| -> Vec<(Labels, u64)> {
        Direction::ALL
            .iter()
            .map(|&d| (labels(&[("direction", d.name())]), f(p.direction(d))))
            .collect()
    };
    let open: Vec<(Labels, i64)> = per_dir(&|d| d.connections_open.load(Relaxed))
        .into_iter()
        .map(|(l, v)| (l, i64::try_from(v).unwrap_or(i64::MAX)))
        .collect();
    gauges(
        reg,
        "mesh_redirect_proxy_connections_open",
        "Proxied connections open, by direction",
        &open,
    );
    counters(
        reg,
        "mesh_redirect_proxy_connections",
        "Proxied connections accepted, by direction",
        &per_dir(&|d| d.connections_total.load(Relaxed)),
    );
    let mut bytes = Vec::new();
    for d in Direction::ALL {
        let s = p.direction(d);
        bytes.push((
            labels(&[("direction", d.name()), ("flow", "to_upstream")]),
            s.bytes_to_upstream.load(Relaxed),
        ));
        bytes.push((
            labels(&[("direction", d.name()), ("flow", "to_client")]),
            s.bytes_to_client.load(Relaxed),
        ));
    }
    counters(
        reg,
        "mesh_redirect_proxy_bytes",
        "Bytes relayed, by direction and flow",
        &bytes,
    );
    let errors: Vec<(Labels, u64)> = proxy_errors(p)
        .into_iter()
        .map(|(kind, v)| (labels(&[("kind", kind)]), v))
        .collect();
    counters(
        reg,
        "mesh_redirect_proxy_errors",
        "Connections that ended in an error, by kind",
        &errors,
    );
}

/// The proxy's error counters, by kind (the metric's `kind` label).
fn proxy_errors(p: &proxy::Stats) -> [(&'static str, u64); 7] {
    use std::sync::atomic::Ordering::Relaxed;
    [
        ("upstream_refused", p.upstream_refused.load(Relaxed)),
        ("upstream_timeout", p.upstream_timeout.load(Relaxed)),
        ("upstream_reset", p.upstream_reset.load(Relaxed)),
        ("client_reset", p.client_reset.load(Relaxed)),
        ("orig_dst_missing", p.orig_dst_missing.load(Relaxed)),
        ("idle_timeout", p.idle_closed.load(Relaxed)),
        ("max_connections", p.rejected_max_connections.load(Relaxed)),
    ]
}

/// What a running agent tells `status` over its control socket: the
/// numbers only the process knows (the kernel's are read from the maps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub pid: u32,
    pub mode: String,
    pub fail_policy: String,
    /// Why `/ready` is not 200; empty when ready.
    pub not_ready: Vec<String>,
    /// The built-in proxy (none with an external proxy).
    pub proxy: Option<ProxyReport>,
}

/// The built-in proxy's counters, keyed as the metrics' labels are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// By direction.
    pub connections_open: BTreeMap<String, u64>,
    /// By direction.
    pub connections_total: BTreeMap<String, u64>,
    /// By `direction/flow` (`outbound/to_upstream`...).
    pub bytes: BTreeMap<String, u64>,
    /// By kind.
    pub errors: BTreeMap<String, u64>,
}

impl AdminState {
    #[must_use]
    pub fn report(&self) -> AgentReport {
        use std::sync::atomic::Ordering::Relaxed;
        let proxy = self.proxy.as_ref().map(|p| {
            let mut r = ProxyReport::default();
            for d in Direction::ALL {
                let s = p.direction(d);
                let name = d.name().to_owned();
                r.connections_open
                    .insert(name.clone(), s.connections_open.load(Relaxed));
                r.connections_total
                    .insert(name.clone(), s.connections_total.load(Relaxed));
                r.bytes.insert(
                    format!("{name}/to_upstream"),
                    s.bytes_to_upstream.load(Relaxed),
                );
                r.bytes
                    .insert(format!("{name}/to_client"), s.bytes_to_client.load(Relaxed));
            }
            r.errors = proxy_errors(p)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            r
        });
        AgentReport {
            pid: std::process::id(),
            mode: self.mode.name().to_owned(),
            fail_policy: self.fail_policy().to_owned(),
            not_ready: self
                .ready
                .not_ready()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            proxy,
        }
    }

    const fn fail_policy(&self) -> &'static str {
        if self.fail_open { "open" } else { "closed" }
    }
}

/// Registers one unlabeled gauge.
fn gauge(reg: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    reg.register(name, help, g);
}

/// The metrics, in Prometheus text format.
#[must_use]
pub fn render_metrics(state: &AdminState, snapshot: Option<&Snapshot>) -> String {
    let mut reg = Registry::default();
    let policy = state.fail_policy();
    gauges(
        &mut reg,
        "mesh_redirect_info",
        "The agent: redirect mode, fail policy, version",
        &[(
            labels(&[
                ("mode", state.mode.name()),
                ("fail_policy", policy),
                ("version", env!("CARGO_PKG_VERSION")),
            ]),
            1,
        )],
    );
    gauge(
        &mut reg,
        "mesh_redirect_ready",
        "1 when /ready answers 200",
        i64::from(state.ready.not_ready().is_empty()),
    );
    gauge(
        &mut reg,
        "mesh_redirect_fail_open",
        "1 when connections go direct while no proxy listens",
        i64::from(state.fail_open),
    );
    if let Some(s) = snapshot {
        datapath_metrics(&mut reg, s);
    }
    if let Some(p) = &state.proxy {
        proxy_metrics(&mut reg, p);
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ebpf::MapUsage;

    fn state(proxy: Option<Arc<proxy::Stats>>) -> AdminState {
        AdminState {
            mode: Mode::Ebpf,
            fail_open: false,
            ready: Arc::new(Readiness::default()),
            proxy,
            datapath_cgroup: None,
        }
    }

    #[test]
    fn readiness_reasons() {
        let r = Readiness::default();
        assert_eq!(
            r.not_ready(),
            vec!["capture not in place", "proxy listeners not up"]
        );
        r.capture.store(true, Ordering::Relaxed);
        r.listeners.store(true, Ordering::Relaxed);
        assert!(r.not_ready().is_empty());
        r.draining.store(true, Ordering::Relaxed);
        assert_eq!(r.not_ready(), vec!["draining"]);
    }

    #[test]
    fn metrics_carry_datapath_and_proxy_numbers() {
        let stats = Arc::new(proxy::Stats::default());
        stats
            .direction(Direction::Inbound)
            .bytes_to_client
            .store(42, Ordering::Relaxed);
        stats.upstream_refused.store(3, Ordering::Relaxed);
        let mut counters: HashMap<&'static str, u64> =
            counter::NAMES.iter().map(|&n| (n, 0)).collect();
        counters.insert("msg_redirected", 7);
        counters.insert("connect_redirected", 2);
        let snap = Snapshot {
            counters,
            maps: vec![MapUsage {
                name: "SOCKETS",
                entries: 4,
                capacity: 131_072,
            }],
        };
        let text = render_metrics(&state(Some(stats)), Some(&snap));
        for line in [
            "mesh_redirect_sk_msg_total{verdict=\"redirected\"} 7",
            "mesh_redirect_redirects_total{direction=\"outbound\"} 2",
            "mesh_redirect_map_entries{map=\"SOCKETS\"} 4",
            "mesh_redirect_map_capacity{map=\"SOCKETS\"} 131072",
            "mesh_redirect_proxy_bytes_total{direction=\"inbound\",flow=\"to_client\"} 42",
            "mesh_redirect_proxy_errors_total{kind=\"upstream_refused\"} 3",
            "mesh_redirect_ready 0",
            "mesh_redirect_info{mode=\"ebpf\",fail_policy=\"closed\",version=",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn no_datapath_no_datapath_metrics() {
        let text = render_metrics(&state(None), None);
        assert!(!text.contains("sk_msg"));
        assert!(text.contains("mesh_redirect_info"));
    }
}
