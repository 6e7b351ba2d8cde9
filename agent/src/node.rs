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
//! Not yet: inbound capture and DNS capture in node mode.

pub mod api;
pub mod cni;
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
                inbound_port: None,
                mark: self.proxy_mark,
                connect_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_hours(1),
                buffer_size: 64 * 1024,
                worker_threads: usize::from(self.workers_per_pod),
                max_connections: self.max_connections_per_pod as usize,
            },
            sockmap: !self.no_sockmap,
            sockmap_queue_limit: u64::from(self.sockmap_queue_kib) * 1024,
            cgroup,
            drain: Duration::from_secs(self.drain_timeout_secs),
        }
    }
}

/// Runs the node agent until SIGTERM or SIGINT, then drains and stops,
/// leaving the pods enrolled for the next one.
pub fn run(args: &NodeArgs) -> Result<()> {
    let cgroup = match &args.cgroup {
        Some(p) => cgroup::validate(p).context("--cgroup")?,
        None => cgroup::validate(&cgroup::cgroup2_root()?)?,
    };
    let own = cgroup::validate(&cgroup::own()?).context("the agent's own cgroup")?;
    let defaults = args.pod_defaults(cgroup.clone());
    let rt = crate::proxy::worker::main_runtime()?;
    let _rt = rt.enter();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let admin_listener = (!args.no_admin)
        .then(|| crate::admin::bind(&crate::netns::Netns::current()?, args.admin))
        .transpose()?;
    let listener = bind(&args.socket)?;
    let state = State::next_to(&args.socket);
    let (pins, older) = node_pin_dir(&args.bpffs).context("--bpffs")?;
    let mut capture =
        EbpfCapture::load_with(defaults.sockmap, defaults.sockmap_queue_limit, Some(pins))?;
    // The agent's own proxies may live outside the pods' cgroup: their
    // sockets need sockops and getsockopt too.
    capture.attach(&cgroup, &cgroup::covering_set(&cgroup, &own), false)?;
    let mut pods = Pods::default();
    readopt(&state, &mut pods, &mut capture, &defaults)?;
    // An upgrade to a new map layout: the old datapath goes only once the
    // pods are captured by the new one.
    for dir in older {
        warn!(pins = %dir.display(), "removing the node datapath of an older map layout");
        crate::pins::remove_instance(&dir)?;
    }
    let ready = Arc::new(Readiness::default());
    ready.set_capture();
    ready.set_listeners();
    let _admin = match admin_listener {
        Some(l) => {
            let state =
                AdminState::node(Arc::clone(&ready), capture.maps().reopen()?, pods.metrics());
            Some(AdminHandle::start(l, Arc::new(state))?)
        }
        None => None,
    };
    info!(
        role = "node",
        cgroup = %cgroup.display(),
        socket = %args.socket.display(),
        short_circuits = capture.short_circuits(),
        "mesh-redirect ready"
    );
    let mut garbage = tokio::time::interval(GARBAGE_EVERY);
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel::<Pending>(64);
    let signal = rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = garbage.tick() => {
                    pods.collect_garbage(&mut capture, &defaults);
                    enroll_pending(&args.pending_dir, &mut pods, &mut capture, &defaults);
                    state.save(&pods);
                }
                // Each caller is read on a task of its own (a slow one
                // stalls nobody); its request is carried out here, in turn.
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream, requests_tx.clone()));
                    }
                    Err(e) => warn!(error = %e, "node socket: accept failed"),
                },
                Some((line, reply)) = requests.recv() => {
                    let _ = reply.send(answer(&line, &mut pods, &mut capture, &defaults));
                    state.save(&pods);
                }
            }
        }
    });
    // Pods stay enrolled (pins and the list of pods stay): their connects
    // are refused, not let around the mesh, until the next node agent
    // re-adopts them. `mesh-redirect cleanup` removes everything.
    ready.set_draining();
    info!(
        signal,
        pods = pods.list().len(),
        "stopping: the pods stay enrolled for the next node agent; their open connections get --drain-timeout-secs"
    );
    drop(listener);
    let _ = std::fs::remove_file(&args.socket);
    let left = pods.stop_serving(std::time::Instant::now() + defaults.drain);
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline passed: closing the connections still open"
        );
    }
    drop(capture);
    info!("stopped; the datapath stays pinned");
    Ok(())
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

/// After a restart: every pod the last agent served is enrolled again (its
/// proxy listens anew in its namespace); namespaces in the maps that are
/// not (gone meanwhile) are taken out.
fn readopt(
    state: &State,
    pods: &mut Pods,
    capture: &mut EbpfCapture,
    defaults: &PodDefaults,
) -> Result<()> {
    for e in state.load() {
        match pods.enroll(capture, defaults, &e) {
            Ok(p) => {
                info!(pod = p.pod.as_deref().unwrap_or("-"), netns = %p.netns.display(), "re-adopted a pod the earlier node agent served");
            }
            Err(err) => warn!(error = %err, "a pod the earlier node agent served is gone"),
        }
    }
    for (cookie, _) in capture.maps().netns_configs()? {
        if !pods.serves(cookie) {
            info!(
                netns_cookie = cookie,
                "unenrolling a namespace no pod holds any more"
            );
            capture.unenroll(cookie)?;
        }
    }
    state.save(pods);
    Ok(())
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

/// A request line read, and where its answer goes.
type Pending = (String, tokio::sync::oneshot::Sender<Result<Answer, String>>);

/// Answers one caller: root only, one request line (handed to the agent's
/// loop through `requests`), one answer line.
async fn serve(stream: UnixStream, requests: tokio::sync::mpsc::Sender<Pending>) {
    let cred = stream.peer_cred().ok();
    let (uid, pid) = (cred.map(|c| c.uid()), cred.and_then(|c| c.pid()));
    let span = info_span!("request", uid = ?uid, pid = ?pid);
    async move {
        let (read, mut write) = stream.into_split();
        let answer = if uid == Some(0) {
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST));
            match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
                Ok(Ok(_)) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    match requests.send((line, tx)).await {
                        Ok(()) => rx
                            .await
                            .unwrap_or_else(|_| Err("the node agent is stopping".to_owned())),
                        Err(_) => Err("the node agent is stopping".to_owned()),
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

/// What a request line gets.
fn answer(
    line: &str,
    pods: &mut Pods,
    capture: &mut EbpfCapture,
    defaults: &PodDefaults,
) -> Result<Answer, String> {
    let request: Request =
        serde_json::from_str(line.trim()).map_err(|e| format!("unreadable request: {e}"))?;
    match request {
        Request::Enroll(e) => pods
            .enroll(capture, defaults, &e)
            .map(Answer::Enrolled)
            .map_err(|e| e.to_string()),
        Request::Unenroll(r) => pods
            .unenroll(capture, defaults, &r)
            .map(Answer::Unenrolled)
            .map_err(|e| e.to_string()),
        Request::Pods => Ok(Answer::Pods(pods.list())),
    }
}
