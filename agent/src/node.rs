//! Node mode: one agent per host serving every pod enrolled with it.
//!
//! The datapath is loaded once and its cgroup hooks attached once, to a
//! cgroup above every pod (the cgroup2 root by default, or e.g. the
//! kubelet's pods slice); whether a socket is captured is decided per
//! network namespace by its entry in `NETNS_CONFIG`, which only enrolled
//! pods have. Each enrolled pod gets a built-in proxy of its own whose
//! listeners and upstream sockets are opened inside the pod's namespace
//! ([`pods`]), so a pod's connections only ever reach its own proxy.
//!
//! Pods are enrolled over a unix socket ([`api`]: `enroll`, `unenroll`,
//! `pods`), which answers root only (checked by the caller's credentials,
//! not only by the file's mode) and refuses, and logs, anyone else.
//!
//! The datapath is pinned (`<bpffs>/mesh-redirect/layout-*/node/`) and the
//! enrolled pods are written next to the socket ([`api::STATE_NAME`]):
//! while the agent is down its hooks stay attached, so a pod's connects are
//! still captured and, with its proxy gone, refused (nothing escapes the
//! mesh); a restarted agent adopts the pins (links updated in place, none
//! added) and enrolls every pod again. SIGTERM (a `DaemonSet` rollout) is the
//! same, after a drain: the pods stay enrolled for the next node agent.
//! `mesh-redirect cleanup` removes a node datapath whose agent is gone.
//!
//! A node agent started while another serves on the same socket takes over
//! from it ([`handover`]): it gets every pod's listening sockets, serves
//! them, and the old one drains and exits, so no pod sees a refused
//! connection across an upgrade. A pod may also run its own proxy
//! (`external_proxy`), which carries on while the node agent is away.
//!
//! Inbound, each pod's namespace gets an sk_lookup instance of its own
//! (the program cannot read its namespace's cookie), on the shared maps,
//! which steers the pod's inbound connections to its proxy's inbound
//! listener.
//!
//! A pod may ask for DNS capture (istio's `--redirect-dns`): its port-53
//! queries go to the DNS proxy it runs; the DNS hooks are attached with
//! the first such pod.

pub mod api;
pub mod cni;
pub mod handover;
pub mod install;
pub mod pods;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{Instrument as _, info, info_span, warn};

use self::{
    api::{Answer, MAX_REQUEST, Request},
    pods::{PodDefaults, Pods},
};
use crate::{
    admin::{AdminHandle, AdminState, Readiness},
    capture::ebpf::{EbpfCapture, node_pin_dir},
    cgroup,
    proxy::ProxyConfig,
    signals::Signals,
};

/// `mesh-redirect node`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// The cgroup2 directory the hooks attach to: every pod's processes
    /// must be below it (default: the cgroup2 root).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// The unix socket pods are enrolled on (root only).
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where each pod's proxy receives its captured outbound connections,
    /// on 127.0.0.1 inside the pod.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Where each pod's proxy receives its captured inbound connections
    /// (every port of the pod's own addresses but the excluded ones), inside
    /// the pod.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Capture outbound connections only; leave every pod's inbound ones
    /// alone.
    #[arg(long)]
    pub no_inbound: bool,
    /// Where the DNS proxy of a pod enrolled with DNS capture listens, on
    /// 127.0.0.1 and `[::1]` inside the pod (istio-agent's 15053).
    #[arg(long, default_value_t = agent_common::ports::DNS_PROXY, value_parser = clap::value_parser!(u16).range(1..))]
    pub dns_proxy_port: u16,
    /// `SO_MARK` on the proxies' upstream sockets (never captured).
    #[arg(long, default_value_t = 1337)]
    pub proxy_mark: u32,
    /// Worker threads of each pod's proxy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub workers_per_pod: u8,
    /// Connections each pod's proxy serves at once.
    #[arg(long, default_value_t = 4096)]
    pub max_connections_per_pod: u32,
    /// Short-circuit app↔proxy connections off (plain loopback TCP).
    #[arg(long)]
    pub no_sockmap: bool,
    /// KiB a short-circuited reader may fall behind.
    #[arg(long, default_value_t = 4096)]
    pub sockmap_queue_kib: u32,
    /// After how many short connections in a row to a destination new
    /// ones use plain TCP (0: always short-circuit).
    #[arg(long, value_name = "N", default_value_t = agent_common::globals::SHORT_CONN_THRESHOLD_DEFAULT)]
    pub short_conn_threshold: u32,
    /// The bpffs mount the datapath is pinned under.
    #[arg(long, value_name = "PATH", default_value = crate::mounts::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Where the CNI plugin queues enrollments while this agent is down
    /// (`failPolicy: open`): enrolled at start-up and as they arrive.
    #[arg(long, value_name = "PATH", default_value = cni::DEFAULT_PENDING_DIR)]
    pub pending_dir: PathBuf,
    /// Seconds an unenrolled pod's open connections get to finish.
    #[arg(long, default_value_t = 5)]
    pub drain_timeout_secs: u64,
    /// The admin server, in the agent's own (the host's) namespace:
    /// `/metrics` (each pod's proxy labelled `pod`), `/ready`, `/healthz`.
    /// A `DaemonSet`'s probes reach it on the node's address: set
    /// `0.0.0.0:15021` there.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15021")]
    pub admin: std::net::SocketAddrV4,
    /// No admin server.
    #[arg(long)]
    pub no_admin: bool,
}

/// How often pods whose namespace disappeared are looked for.
const GARBAGE_EVERY: Duration = Duration::from_secs(2);
/// How long a caller may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl NodeArgs {
    /// What every pod gets, whatever its rules.
    fn pod_defaults(&self, cgroup: PathBuf) -> PodDefaults {
        PodDefaults {
            proxy: ProxyConfig {
                outbound_port: self.outbound_port,
                inbound_port: (!self.no_inbound).then_some(self.inbound_port),
                mark: self.proxy_mark,
                connect_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_hours(1),
                buffer_size: 64 * 1024,
                worker_threads: usize::from(self.workers_per_pod),
                max_connections: self.max_connections_per_pod as usize,
                // Node mode always runs the eBPF datapath.
                splice_from_app: std::sync::Arc::new(false.into()),
            },
            sockmap: !self.no_sockmap,
            sockmap_queue_limit: u64::from(self.sockmap_queue_kib) * 1024,
            short_conn_threshold: self.short_conn_threshold,
            cgroup,
            drain: Duration::from_secs(self.drain_timeout_secs),
            dns_port: self.dns_proxy_port,
            state_dir: self
                .socket
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default(),
        }
    }
}

/// Runs the node agent until SIGTERM or SIGINT (or a successor takes
/// over), then drains and stops, leaving the pods enrolled for the next one.
pub fn run(args: &NodeArgs) -> Result<()> {
    let cgroup = match &args.cgroup {
        Some(p) => cgroup::validate(p).context("--cgroup")?,
        None => cgroup::validate(&cgroup::cgroup2_root()?)?,
    };
    if args.outbound_port == args.inbound_port {
        anyhow::bail!(
            "--outbound-port and --inbound-port must differ (both {})",
            args.inbound_port
        );
    }
    if [args.outbound_port, args.inbound_port].contains(&args.dns_proxy_port) {
        anyhow::bail!(
            "--dns-proxy-port {} is one of the proxies' own ports",
            args.dns_proxy_port
        );
    }
    let own = cgroup::validate(&cgroup::own()?).context("the agent's own cgroup")?;
    let rt = crate::proxy::worker::main_runtime()?;
    let _rt = rt.enter();
    let mut signals = Signals::new()?;
    // Reserved, not listening: during a takeover the old agent answers
    // the probes until it lets go.
    let admin = (!args.no_admin)
        .then(|| crate::admin::reserve(&crate::netns::Netns::current()?, args.admin))
        .transpose()?;
    // The datapath first (the object's parse and the kernel probes are the
    // slow part of a start): a running agent we take over from refuses
    // enrollments from our request until it lets go, so that window holds
    // only the per-pod work.
    let (pins, older) = node_pin_dir(&args.bpffs).context("--bpffs")?;
    let capture = EbpfCapture::load_with(
        !args.no_sockmap,
        u64::from(args.sockmap_queue_kib) * 1024,
        args.short_conn_threshold,
        Some(pins),
        0,
    )?;
    // A node agent serving on the socket already hands its pods' listening
    // sockets over and serves on until we do; our socket is bound beside
    // its own and moved over it then.
    let mut takeover = handover::take_over(&args.socket).context("--socket")?;
    let bound_at = match takeover {
        Some(_) => args.socket.with_file_name(format!(
            "{}.next",
            args.socket
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        )),
        None => args.socket.clone(),
    };
    let listener = bind(&bound_at)?;
    let mut node = Node {
        defaults: args.pod_defaults(cgroup.clone()),
        state: State::next_to(&args.socket),
        pending_dir: args.pending_dir.clone(),
        pods: Pods::default(),
        capture,
        socket_id: file_id(&bound_at)?,
    };
    // The agent's own proxies may live outside the pods' cgroup: their
    // sockets need sockops and getsockopt too.
    node.capture
        .attach(&cgroup, &cgroup::covering_set(&cgroup, &own), false)?;
    let mut handed = takeover
        .as_mut()
        .map(|t| std::mem::take(&mut t.handed))
        .unwrap_or_default();
    node.readopt(&mut handed);
    // Sockets of pods we no longer serve: the old agent's copies remain.
    drop(handed);
    // Nothing the old agent uses changes before it lets go.
    if let Some(t) = takeover {
        t.confirm(&args.socket).context("taking over")?;
        std::fs::rename(&bound_at, &args.socket)
            .with_context(|| format!("--socket: moving {} over", bound_at.display()))?;
        info!(
            pods = node.pods.list().len(),
            "took over from the running node agent"
        );
    }
    node.forget_unserved()?;
    // An upgrade to a new map layout: the old datapath goes only once the
    // pods are captured by the new one.
    for dir in older {
        warn!(pins = %dir.display(), "removing the node datapath of an older map layout");
        crate::pins::remove_instance(&dir)?;
    }
    let ready = Arc::new(Readiness::default());
    ready.set_capture();
    ready.set_listeners();
    let admin = match admin {
        Some(sock) => {
            let maps = node.capture.maps().reopen()?;
            let state = AdminState::node(Arc::clone(&ready), maps, node.pods.metrics());
            let listener = crate::admin::listen(sock).context("--admin")?;
            Some(AdminHandle::start(listener, Arc::new(state))?)
        }
        None => None,
    };
    info!(
        role = "node",
        cgroup = %cgroup.display(),
        socket = %args.socket.display(),
        short_circuits = node.capture.short_circuits(),
        "mesh-redirect ready"
    );
    let stop = rt.block_on(node.serve(&listener, &mut signals));
    ready.set_draining();
    drop(listener);
    if matches!(stop, Stop::HandedOver) {
        // The probes and scrapes are the successor's now.
        drop(admin);
    }
    node.stop(&stop, &args.socket);
    Ok(())
}

/// Why the node agent stops.
enum Stop {
    Signal(&'static str),
    /// A successor serves every pod.
    HandedOver,
}

/// What the callers' tasks hand the agent's loop.
enum Call {
    /// A request line, and where its answer goes.
    Request(String, tokio::sync::oneshot::Sender<Result<Answer, String>>),
    /// A successor asks for every pod's listening sockets.
    Takeover(tokio::sync::oneshot::Sender<Result<handover::PodSockets, String>>),
    /// How a takeover ended: `true`, the successor serves now.
    TakeoverEnded(bool),
}

/// The node agent's state, owned by its loop.
struct Node {
    pods: Pods,
    capture: EbpfCapture,
    defaults: PodDefaults,
    state: State,
    pending_dir: PathBuf,
    /// The node socket's file, to remove only if it is still ours.
    socket_id: (u64, u64),
}

/// A file's device and inode.
fn file_id(path: &std::path::Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).with_context(|| format!("--socket {}", path.display()))?;
    Ok((m.dev(), m.ino()))
}

impl Node {
    /// Serves callers on `listener` until a signal or a successor.
    async fn serve(&mut self, listener: &UnixListener, signals: &mut Signals) -> Stop {
        let mut garbage = tokio::time::interval(GARBAGE_EVERY);
        let (calls_tx, mut calls) = tokio::sync::mpsc::channel::<Call>(64);
        // A successor is getting ready: nothing changes meanwhile.
        let mut handing_over = false;
        // A signal that came meanwhile: we stop once the successor serves
        // or has gone (it hears within `handover::SUCCESSOR_WAIT`).
        let mut signalled = None;
        loop {
            let signal = tokio::select! {
                name = signals.recv() => Some(name),
                _ = garbage.tick(), if !handing_over => {
                    self.pods.collect_garbage(&mut self.capture, &self.defaults);
                    enroll_pending(&self.pending_dir, &mut self.pods, &mut self.capture, &self.defaults);
                    self.state.save(&self.pods);
                    None
                }
                // Each caller is read on a task of its own (a slow one
                // stalls nobody); its request is carried out here, in turn.
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream, calls_tx.clone()));
                        None
                    }
                    Err(e) => {
                        warn!(error = %e, "node socket: accept failed");
                        None
                    }
                },
                Some(call) = calls.recv() => match call {
                    Call::Request(line, reply) => {
                        let _ = reply.send(self.answer(&line, handing_over));
                        if !handing_over {
                            self.state.save(&self.pods);
                        }
                        None
                    }
                    Call::Takeover(reply) => {
                        let answer = if handing_over {
                            Err("busy: another node agent is taking over already".to_owned())
                        } else {
                            info!("a new node agent is taking over: handing it every pod's listening sockets");
                            self.state.save(&self.pods);
                            self.pods.handover().map_err(|e| e.to_string())
                        };
                        let ok = answer.is_ok();
                        handing_over |= reply.send(answer).is_ok() && ok;
                        None
                    }
                    Call::TakeoverEnded(true) => return Stop::HandedOver,
                    Call::TakeoverEnded(false) => {
                        if let Some(signal) = signalled {
                            return Stop::Signal(signal);
                        }
                        warn!("the new node agent went away before it served: serving on");
                        handing_over = false;
                        None
                    }
                },
            };
            match signal {
                Some(signal) if handing_over => {
                    info!(
                        signal,
                        "a new node agent is getting ready: stopping once it serves or gives up"
                    );
                    signalled = Some(signal);
                }
                Some(signal) => return Stop::Signal(signal),
                None => {}
            }
        }
    }

    /// Drains and stops: the pods stay enrolled (pins and the list of
    /// pods stay) and their connects are refused, not let around the mesh,
    /// until the next node agent re-adopts them (`mesh-redirect cleanup`
    /// removes everything); after a takeover the socket's path and the list
    /// are the successor's.
    fn stop(mut self, why: &Stop, socket: &std::path::Path) {
        match why {
            Stop::Signal(signal) => {
                info!(
                    signal,
                    pods = self.pods.list().len(),
                    "stopping: the pods stay enrolled for the next node agent; their open connections get --drain-timeout-secs"
                );
                if file_id(socket).is_ok_and(|id| id == self.socket_id) {
                    let _ = std::fs::remove_file(socket);
                }
            }
            Stop::HandedOver => info!(
                pods = self.pods.list().len(),
                "a new node agent serves every pod: stopping; open connections get --drain-timeout-secs"
            ),
        }
        let left = self
            .pods
            .stop_serving(std::time::Instant::now() + self.defaults.drain);
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed: closing the connections still open"
            );
        }
        info!("stopped; the datapath stays pinned");
    }

    /// What a request line gets.
    fn answer(&mut self, line: &str, handing_over: bool) -> Result<Answer, String> {
        let request: Request =
            serde_json::from_str(line.trim()).map_err(|e| format!("unreadable request: {e}"))?;
        let (pods, capture, defaults) = (&mut self.pods, &mut self.capture, &self.defaults);
        match request {
            Request::Enroll(_) | Request::Unenroll(_) if handing_over => {
                Err(api::UPGRADING.to_owned())
            }
            Request::Enroll(e) => pods
                .enroll(capture, defaults, &e)
                .map(Answer::Enrolled)
                .map_err(|e| e.to_string()),
            Request::Unenroll(r) => pods
                .unenroll(capture, defaults, &r)
                .map(Answer::Unenrolled)
                .map_err(|e| e.to_string()),
            Request::Pods => Ok(Answer::Pods(pods.list())),
            Request::Takeover => Err("takeover: only as the first request of a node agent".into()),
        }
    }

    /// After a restart or a takeover: every pod the last agent served is
    /// enrolled again (its proxy on the sockets `handed` over, else
    /// listening anew in its namespace).
    fn readopt(&mut self, handed: &mut handover::Handed) {
        for e in self.state.load() {
            match self
                .pods
                .enroll_with(&mut self.capture, &self.defaults, &e, handed)
            {
                Ok(p) => {
                    info!(pod = p.pod.as_deref().unwrap_or("-"), netns = %p.netns.display(), "re-adopted a pod the earlier node agent served");
                }
                Err(err) => warn!(error = %err, "a pod the earlier node agent served is gone"),
            }
        }
    }

    /// Namespaces in the maps that no pod of ours holds (gone meanwhile)
    /// are taken out; the list of pods is written.
    fn forget_unserved(&mut self) -> Result<()> {
        for (cookie, _) in self.capture.maps().netns_configs()? {
            if !self.pods.serves(cookie) {
                info!(
                    netns_cookie = cookie,
                    "unenrolling a namespace no pod holds any more"
                );
                self.capture.unenroll(cookie)?;
            }
        }
        // sk_lookup's links of pods gone meanwhile.
        self.capture.prune_unclaimed_links()?;
        self.state.save(&self.pods);
        Ok(())
    }
}

/// The enrolled pods, as a file next to the socket.
struct State(PathBuf);

impl State {
    fn next_to(socket: &std::path::Path) -> Self {
        Self(socket.with_file_name(api::STATE_NAME))
    }

    /// Written whole, then renamed over the old one.
    fn save(&self, pods: &Pods) {
        let tmp = self.0.with_extension("tmp");
        let body = serde_json::to_vec(&pods.enrollments()).expect("enrollments serialize");
        if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &self.0)) {
            warn!(file = %self.0.display(), error = %e, "saving the enrolled pods");
        }
    }

    fn load(&self) -> Vec<api::Enrollment> {
        match std::fs::read(&self.0) {
            Ok(body) => serde_json::from_slice(&body).unwrap_or_else(|e| {
                warn!(file = %self.0.display(), error = %e, "unreadable list of enrolled pods");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }
}

/// Enrolls what the CNI plugin queued while we were down; a queued pod
/// whose namespace is gone by now is dropped.
fn enroll_pending(
    dir: &std::path::Path,
    pods: &mut Pods,
    capture: &mut EbpfCapture,
    defaults: &PodDefaults,
) {
    for (file, e) in cni::pending(dir) {
        match pods.enroll(capture, defaults, &e) {
            Ok(p) => info!(
                pod = p.pod.as_deref().unwrap_or("-"),
                "enrolled a pod the CNI plugin queued while the node agent was down"
            ),
            Err(err) => warn!(error = %err, file = %file.display(), "dropping a queued enrollment"),
        }
        let _ = std::fs::remove_file(&file);
    }
}

/// The node socket: its directory 0700, the socket 0600, a stale file
/// replaced (a live agent there is refused).
fn bind(path: &std::path::Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "--socket {}: a node agent already answers there",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("--socket: creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("--socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("--socket {}", path.display()))?;
    Ok(listener)
}

/// Answers one caller: root only, one request line (handed to the agent's
/// loop through `calls`), one answer line; a successor's takeover goes on
/// on this connection until it says it serves or goes away.
async fn serve(stream: UnixStream, calls: tokio::sync::mpsc::Sender<Call>) {
    let cred = stream.peer_cred().ok();
    let (uid, pid) = (cred.map(|c| c.uid()), cred.and_then(|c| c.pid()));
    let span = info_span!("request", uid = ?uid, pid = ?pid);
    async move {
        let (read, mut write) = stream.into_split();
        let stopping = || Err(api::STOPPING.to_owned());
        let answer = if uid == Some(0) {
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST));
            match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
                // A takeover: the successor sends nothing more until it
                // has every pod's sockets.
                Ok(Ok(_))
                    if reader.buffer().is_empty()
                        && matches!(serde_json::from_str(line.trim()), Ok(Request::Takeover)) =>
                {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if calls.send(Call::Takeover(tx)).await.is_err() {
                        stopping()
                    } else {
                        match rx.await {
                            Ok(Ok(fds)) => {
                                let read = reader.into_inner().into_inner();
                                return hand_over(read, write, fds, calls).await;
                            }
                            Ok(Err(e)) => Err(e),
                            Err(_) => stopping(),
                        }
                    }
                }
                Ok(Ok(_)) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    match calls.send(Call::Request(line, tx)).await {
                        Ok(()) => rx.await.unwrap_or_else(|_| stopping()),
                        Err(_) => stopping(),
                    }
                }
                Ok(Err(e)) => Err(format!("reading the request: {e}")),
                Err(_) => Err(format!(
                    "no request line within {} s",
                    REQUEST_TIMEOUT.as_secs()
                )),
            }
        } else {
            warn!("refused: only root may enroll or list pods");
            Err(format!(
                "refused: only root may talk to the node agent (caller uid {})",
                uid.map_or_else(|| "unknown".to_owned(), |u| u.to_string())
            ))
        };
        let mut line = serde_json::to_string(&answer).expect("answers serialize");
        line.push('\n');
        if let Err(e) = write.write_all(line.as_bytes()).await {
            warn!(error = %e, "node socket: answering");
        }
    }
    .instrument(span)
    .await;
}

/// Sends every pod's sockets to the successor on this connection and waits
/// (on a blocking thread) for its `READY`; tells the loop how it ended.
async fn hand_over(
    read: tokio::net::unix::OwnedReadHalf,
    write: tokio::net::unix::OwnedWriteHalf,
    fds: handover::PodSockets,
    calls: tokio::sync::mpsc::Sender<Call>,
) {
    let stream = read
        .reunite(write)
        .expect("the halves of one stream")
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s));
    let served = match stream {
        Ok(stream) => tokio::task::spawn_blocking(move || {
            handover::hand_over(&stream, &fds, handover::SUCCESSOR_WAIT)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(e) => Err(e),
    };
    if let Err(e) = &served {
        warn!(error = %e, "handing the pods over");
    }
    let _ = calls
        .send(Call::TakeoverEnded(served.unwrap_or(false)))
        .await;
}
