//! The admin server, inside the served namespace (default 127.0.0.1:15020:
//! loopback, so never captured; 15020 is excluded inbound too), on hyper:
//!
//! - `/metrics`: Prometheus text ([`metrics`]: registered once, read at
//!   each scrape from the datapath's maps and the proxy's counters);
//! - `/ready`: 200 once capture is in place and the listeners are up, 503
//!   with the reasons otherwise (and while draining); the body also names
//!   the fail policy (`fail-policy: closed`);
//! - `/healthz`: 200 while the process serves.
//!
//! `GET` and `HEAD` are answered (a query string is ignored), any other
//! method on these paths gets 405, any other path 404. [`report`] is what a
//! running agent tells `status` over its control socket.

pub mod metrics;
pub mod report;

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};

use crate::{capture::Mode, ebpf::DatapathMaps, netns::Netns, proxy};

/// What `/ready` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Programs attached (eBPF) or rules installed (iptables).
    capture: AtomicBool,
    /// The proxy's listeners are up (always true with an external proxy).
    listeners: AtomicBool,
    /// Shutting down: no new connections wanted here.
    draining: AtomicBool,
}

impl Readiness {
    pub fn set_capture(&self) {
        self.capture.store(true, Ordering::Relaxed);
    }

    pub fn set_listeners(&self) {
        self.listeners.store(true, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

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

/// What the admin server and the control socket read from.
#[derive(Debug)]
pub struct AdminState {
    pub mode: Mode,
    pub fail_open: bool,
    pub ready: Arc<Readiness>,
    /// The built-in proxy's counters (none with an external proxy).
    pub proxy: Option<Arc<proxy::Stats>>,
    /// Every metric, registered once.
    registry: Registry,
}

impl AdminState {
    /// `datapath`: the agent's own handle on its maps (eBPF mode).
    #[must_use]
    pub fn new(
        mode: Mode,
        fail_open: bool,
        ready: Arc<Readiness>,
        proxy: Option<Arc<proxy::Stats>>,
        datapath: Option<DatapathMaps>,
    ) -> Self {
        let mut registry = Registry::default();
        metrics::register(
            &mut registry,
            metrics::Agent {
                mode,
                fail_open,
                ready: Arc::clone(&ready),
            },
            datapath,
            proxy.clone().map(metrics::Proxies::One),
        );
        Self {
            mode,
            fail_open,
            ready,
            proxy,
            registry,
        }
    }

    /// A node agent's: its datapath, and each pod's proxy labelled `pod`.
    #[must_use]
    pub fn node(ready: Arc<Readiness>, datapath: DatapathMaps, pods: metrics::NodePods) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(metrics::Node(Arc::clone(&pods))));
        metrics::register(
            &mut registry,
            metrics::Agent {
                mode: Mode::Ebpf,
                fail_open: false,
                ready: Arc::clone(&ready),
            },
            Some(datapath),
            Some(metrics::Proxies::Pods(pods)),
        );
        Self {
            mode: Mode::Ebpf,
            fail_open: false,
            ready,
            proxy: None,
            registry,
        }
    }

    #[must_use]
    pub const fn fail_policy(&self) -> &'static str {
        if self.fail_open { "open" } else { "closed" }
    }

    /// The metrics, in Prometheus text format.
    #[must_use]
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "admin: encoding the metrics failed");
        }
        out
    }
}

/// Binds the admin listener inside `netns` (before anything is attached,
/// so a port in use fails cleanly). `SO_REUSEPORT`: during a handover the
/// old and the new agent both hold it for a moment.
pub fn bind(netns: &Netns, addr: SocketAddrV4) -> anyhow::Result<std::net::TcpListener> {
    let sock = reserve(netns, addr)?;
    sock.listen(128)
        .map_err(|e| anyhow::anyhow!("--admin: cannot listen on {addr}: {e}"))?;
    Ok(sock.into())
}

/// [`bind`] without listening yet: the address is ours (a bad one fails
/// here), but no connection reaches us until [`listen`].
pub fn reserve(netns: &Netns, addr: SocketAddrV4) -> anyhow::Result<socket2::Socket> {
    use anyhow::Context as _;
    netns
        .run(|| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.set_reuse_port(true)?;
            sock.set_nonblocking(true)?;
            sock.bind(&std::net::SocketAddr::V4(addr).into())?;
            Ok::<socket2::Socket, std::io::Error>(sock)
        })?
        .with_context(|| format!("--admin: cannot listen on {addr}"))
}

/// Starts listening on a [`reserve`]d address.
pub fn listen(sock: socket2::Socket) -> std::io::Result<std::net::TcpListener> {
    sock.listen(128)?;
    Ok(sock.into())
}

/// A running admin server.
pub struct AdminHandle {
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

impl AdminHandle {
    /// Serves `listener` on its own thread until dropped.
    pub fn start(listener: std::net::TcpListener, state: Arc<AdminState>) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (shutdown, mut rx) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        tokio::select! {
                            r = listener.accept() => match r {
                                Ok((stream, _)) => {
                                    tokio::spawn(serve_connection(stream, Arc::clone(&state)));
                                }
                                Err(e) => {
                                    warn!(error = %e, "admin: accept failed");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
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

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<AdminState>) {
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(respond(&req, &state)) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        debug!(error = %e, "admin: connection ended with an error");
    }
}

/// The answer to one request (hyper leaves the body out for `HEAD`).
fn respond(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/ready" | "/healthz") {
        return text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics_text(),
        ),
        "/ready" => {
            let policy = state.fail_policy();
            match state.ready.not_ready() {
                r if r.is_empty() => text(
                    StatusCode::OK,
                    "text/plain",
                    format!("ready\nfail-policy: {policy}\n"),
                ),
                r => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\nfail-policy: {policy}\n", r.join(", ")),
                ),
            }
        }
        _ => text(StatusCode::OK, "text/plain", "ok\n".into()),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reasons() {
        let r = Readiness::default();
        assert_eq!(
            r.not_ready(),
            vec!["capture not in place", "proxy listeners not up"]
        );
        r.set_capture();
        r.set_listeners();
        assert!(r.not_ready().is_empty());
        r.set_draining();
        assert_eq!(r.not_ready(), vec!["draining"]);
    }

    /// GET and HEAD with a query string, a POST, an unknown path: as HTTP says.
    #[tokio::test]
    async fn methods_and_paths_are_answered_as_http_says() {
        let state = Arc::new(AdminState::new(
            Mode::Iptables,
            false,
            Arc::new(Readiness::default()),
            None,
            None,
        ));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = AdminHandle::start(listener, Arc::clone(&state)).unwrap();
        let ask = |request: &'static str| async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let get = ask("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 200"), "{get}");
        assert!(get.contains("mesh_redirect_info"), "{get}");
        let head = ask("HEAD /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("content-length:"),
            "{head}"
        );
        assert!(
            !head.contains("mesh_redirect_info"),
            "HEAD has no body: {head}"
        );
        let ready = ask("GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("fail-policy: closed"), "{ready}");
        let post = ask(
            "POST /ready HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            post.to_ascii_lowercase().contains("allow: get, head"),
            "{post}"
        );
        let missing = ask("GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    }
}
