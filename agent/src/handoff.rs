//! Handing the proxy's listening sockets to the agent that replaces this
//! one, so an upgrade refuses no connection.
//!
//! Each running agent listens on a unix socket,
//! `<control-dir>/netns-<cookie>.sock`. A new agent for the same namespace
//! connects there first and says `TAKEOVER <ports> confirm`; the running
//! one answers `OK` with its listening sockets attached (`SCM_RIGHTS`) and
//! *keeps serving* while the successor loads, verifies and attaches (which
//! takes seconds on a slow machine). Both accept on the same sockets
//! meanwhile. When the successor is ready it says `READY` on the same
//! connection; only then does the running agent stop accepting, drain its
//! connections and exit without tearing anything down: the successor now
//! owns the listeners, the pinned datapath and the rules. If the successor
//! fails or dies before `READY` (the connection closes), the running agent
//! carries on as if nothing happened. Connections arriving at any point wait
//! in the listeners' accept queues, which never close, so none is refused
//! and none waits on an agent that is not accepting yet.
//!
//! An agent of before the confirmation (a bare `TAKEOVER <ports>`) still
//! gets the listeners, and the running agent hands over at once, as those
//! agents expected.
//!
//! `STATS` on the same socket answers one line of JSON
//! ([`crate::admin::AgentReport`]): what `status` shows of a running agent.
//! `RULES <json>` changes its capture rules (the lists given, as
//! [`RuleArgs`]), in either mode, and answers the rules now in force:
//! what `mesh-redirect rules --netns` sends.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::TcpListener,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{fs::DirBuilderExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    proxy::Listeners,
    rules::{CaptureRules, RuleArgs},
};

/// Where running agents' control sockets are, by default.
pub const DEFAULT_CONTROL_DIR: &str = "/run/mesh-redirect";

const REQUEST: &str = "TAKEOVER";
/// The successor will say [`READY`] before the running agent stops.
const CONFIRM: &str = "confirm";
const READY: &str = "READY";
const STATS: &str = "STATS";
const RULES: &str = "RULES";
const REPLY_OK: &str = "OK\n";
/// The longest request line read (a `RULES` request carries up to four
/// lists of 4096 entries).
const MAX_REQUEST: usize = 1 << 20;

/// What a running agent answers on its control socket, besides a takeover.
pub trait Requests {
    /// One line of JSON: the agent's [`crate::admin::AgentReport`].
    fn stats(&self) -> String;
    /// Applies the lists given; the rules now in force, or why not.
    fn rules(&mut self, args: &RuleArgs) -> Result<CaptureRules, String>;
}

/// `TAKEOVER <outbound-port or -> <inbound-port or ->`: what the successor
/// will serve (`-`: nothing, e.g. with an external proxy), so the running
/// agent refuses (and keeps serving) on a mismatch.
fn request(outbound: Option<u16>, inbound: Option<u16>) -> String {
    let p = |p: Option<u16>| p.map_or_else(|| "-".to_owned(), |p| p.to_string());
    format!("{REQUEST} {} {}\n", p(outbound), p(inbound))
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("control socket {path}: the running agent answered {answer:?}")]
    Refused { path: PathBuf, answer: String },
    #[error("control socket {path}: the running agent refused the rules: {reason}")]
    RulesRefused { path: PathBuf, reason: String },
    #[error(
        "control socket {path}: the running agent listens on {theirs}, not on the ports asked for ({ours}); stop it first"
    )]
    Mismatch {
        path: PathBuf,
        theirs: String,
        ours: String,
    },
}

/// The control socket of the agent serving the namespace with this cookie.
#[must_use]
pub fn control_path(dir: &Path, netns_cookie: u64) -> PathBuf {
    dir.join(format!("netns-{netns_cookie}.sock"))
}

/// A takeover under way: the running agent's listeners are ours too, and
/// it serves on until [`Takeover::confirm`] (or stays, if this is dropped
/// unconfirmed: the successor failed).
#[derive(Debug)]
pub struct Takeover {
    /// `None` when the running agent has none (an external proxy).
    pub listeners: Option<Listeners>,
    /// To the running agent; `None` for one of before the confirmation,
    /// which stopped as soon as it handed the listeners over.
    stream: Option<UnixStream>,
    path: PathBuf,
}

impl Takeover {
    /// Tells the running agent we serve now: it stops accepting, drains
    /// and exits.
    pub fn confirm(mut self) -> Result<(), HandoffError> {
        let Some(mut stream) = self.stream.take() else {
            return Ok(());
        };
        stream
            .write_all(format!("{READY}\n").as_bytes())
            .map_err(|source| HandoffError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Takes over from the agent running for `path`, if any (see [`Takeover`]).
/// `None`: nobody answers there (a stale socket file is removed).
/// The listeners must be on `outbound`/`inbound` (`None`: no listeners).
pub fn take_over(
    path: &Path,
    outbound: Option<u16>,
    inbound: Option<u16>,
) -> Result<Option<Takeover>, HandoffError> {
    match ask_takeover(path, outbound, inbound, true) {
        // An agent of before the confirmation compares the whole line.
        Err(HandoffError::Mismatch { theirs, ours, .. }) if theirs == ours => {
            ask_takeover(path, outbound, inbound, false)
        }
        other => other,
    }
}

fn ask_takeover(
    path: &Path,
    outbound: Option<u16>,
    inbound: Option<u16>,
    confirm: bool,
) -> Result<Option<Takeover>, HandoffError> {
    let io_err = |source| HandoffError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // A file without a live agent behind it.
            let _ = fs::remove_file(path);
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    let line = if confirm {
        format!("{} {CONFIRM}\n", request(outbound, inbound).trim_end())
    } else {
        request(outbound, inbound)
    };
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let (answer, fds) = recv_with_fds(&stream).map_err(io_err)?;
    let mut listeners: Vec<TcpListener> = fds.into_iter().map(TcpListener::from).collect();
    // `OK <outbound> <inbound>`: how many of the sockets are which (an
    // agent of before IPv6 sent a bare `OK`, with one of each).
    let text = String::from_utf8_lossy(&answer).trim().to_owned();
    let counts = match text.strip_prefix(REPLY_OK.trim_end()) {
        Some("") => Some((
            usize::from(outbound.is_some()),
            usize::from(inbound.is_some()),
        )),
        Some(rest) => {
            let mut n = rest.split_whitespace().map(str::parse::<usize>);
            match (n.next(), n.next(), n.next()) {
                (Some(Ok(o)), Some(Ok(i)), None) => Some((o, i)),
                _ => None,
            }
        }
        None => None,
    };
    let Some((n_out, n_in)) = counts else {
        let answer = String::from_utf8_lossy(&answer).trim().to_owned();
        return Err(match answer.strip_prefix("ERR ports ") {
            Some(theirs) => HandoffError::Mismatch {
                path: path.to_owned(),
                theirs: theirs.to_owned(),
                ours: request(outbound, inbound)
                    .trim()
                    .trim_start_matches(REQUEST)
                    .trim()
                    .to_owned(),
            },
            None => HandoffError::Refused {
                path: path.to_owned(),
                answer,
            },
        });
    };
    let plausible = (n_out == 0) == outbound.is_none() && (n_in == 0) == inbound.is_none();
    if listeners.len() != n_out + n_in || !plausible {
        return Err(HandoffError::Refused {
            path: path.to_owned(),
            answer: format!("{text} with {} sockets", listeners.len()),
        });
    }
    let listeners = outbound.is_some().then(|| {
        let inbound_listeners = listeners.split_off(n_out);
        Listeners {
            outbound: listeners,
            inbound: inbound_listeners,
        }
    });
    Ok(Some(Takeover {
        listeners,
        stream: confirm.then_some(stream),
        path: path.to_owned(),
    }))
}

/// Sends one request line to the agent behind `path`; its answer.
fn ask(path: &Path, request: &str) -> Result<String, HandoffError> {
    let io_err = |source| HandoffError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io_err)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(io_err)?;
    Ok(answer.trim().to_owned())
}

/// Asks the agent behind the control socket at `path` for its numbers
/// (one line of JSON).
pub fn query_stats(path: &Path) -> Result<String, HandoffError> {
    ask(path, STATS)
}

/// Asks the agent behind `path` to apply `args` to its capture rules.
pub fn request_rules(path: &Path, args: &RuleArgs) -> Result<CaptureRules, HandoffError> {
    let json = serde_json::to_string(args).expect("rule lists serialize");
    let answer = ask(path, &format!("{RULES} {json}"))?;
    let reply: Result<CaptureRules, String> =
        serde_json::from_str(&answer).map_err(|e| HandoffError::Refused {
            path: path.to_owned(),
            answer: format!("{answer} ({e})"),
        })?;
    reply.map_err(|reason| HandoffError::RulesRefused {
        path: path.to_owned(),
        reason,
    })
}

/// The running agent's end: the control socket, and what to hand over.
pub struct ControlServer {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
    handed_over: std::sync::atomic::AtomicBool,
}

impl ControlServer {
    /// Listens on `path` (its directory is created 0700; a file left there
    /// is replaced: [`take_over`] ran first and found nobody behind it).
    pub fn bind(path: &Path) -> Result<Self, HandoffError> {
        Ok(Self {
            path: path.to_owned(),
            listener: listen(path)?,
            handed_over: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The socket to wait on for a takeover request.
    #[must_use]
    pub fn listener(&self) -> &std::os::unix::net::UnixListener {
        &self.listener
    }

    /// Answers a pending request, if any: a takeover with `listeners`
    /// (refused while `busy`: another successor is getting ready), the
    /// others through `agent`.
    pub fn serve_one(
        &self,
        listeners: Option<&Listeners>,
        agent: &mut dyn Requests,
        busy: bool,
    ) -> Result<Served, HandoffError> {
        let io_err = |source| HandoffError::Io {
            path: self.path.clone(),
            source,
        };
        let (mut stream, _) = match self.listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Served::Idle),
            Err(e) => return Err(io_err(e)),
        };
        stream.set_nonblocking(false).map_err(io_err)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io_err)?;
        let mut req = Vec::new();
        let mut reader = io::BufReader::new(&stream).take(MAX_REQUEST as u64);
        io::BufRead::read_until(&mut reader, b'\n', &mut req).map_err(io_err)?;
        let port = |v: &[TcpListener]| {
            v.first()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.port())
        };
        let ours = request(
            listeners.and_then(|l| port(&l.outbound)),
            listeners.and_then(|l| port(&l.inbound)),
        );
        let req = String::from_utf8_lossy(&req);
        if req.trim() == STATS {
            stream
                .write_all(format!("{}\n", agent.stats()).as_bytes())
                .map_err(io_err)?;
            return Ok(Served::Answered);
        }
        if let Some(json) = req.trim().strip_prefix(RULES) {
            let reply = serde_json::from_str::<RuleArgs>(json.trim())
                .map_err(|e| format!("unreadable request: {e}"))
                .and_then(|args| agent.rules(&args));
            let reply = serde_json::to_string(&reply).expect("rules serialize");
            stream
                .write_all(format!("{reply}\n").as_bytes())
                .map_err(io_err)?;
            return Ok(Served::Answered);
        }
        if !req.starts_with(REQUEST) {
            let _ = stream.write_all(b"ERR unknown request\n");
            return Ok(Served::Answered);
        }
        if busy {
            let _ = stream.write_all(b"ERR busy: a handover to another agent is under way\n");
            return Ok(Served::Answered);
        }
        let (asked, confirm) = match req.trim().strip_suffix(CONFIRM) {
            Some(ports) => (ports.trim_end(), true),
            None => (req.trim(), false),
        };
        if asked != ours.trim() {
            let theirs = ours.trim().trim_start_matches(REQUEST).trim().to_owned();
            let _ = stream.write_all(format!("ERR ports {theirs}\n").as_bytes());
            return Ok(Served::Answered);
        }
        let fds: Vec<RawFd> = listeners
            .map(|l| l.all().map(|(s, _)| s.as_raw_fd()).collect())
            .unwrap_or_default();
        let (n_out, n_in) = listeners.map_or((0, 0), |l| (l.outbound.len(), l.inbound.len()));
        let reply = format!("{} {n_out} {n_in}\n", REPLY_OK.trim_end());
        send_with_fds(&stream, reply.as_bytes(), &fds).map_err(io_err)?;
        if confirm {
            stream.set_nonblocking(true).map_err(io_err)?;
            return Ok(Served::Pending(PendingHandover {
                stream,
                line: Vec::new(),
            }));
        }
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Served::HandedOver)
    }

    /// The successor said [`READY`]: the socket file is its now.
    pub fn handed_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Listens on the path again: a successor that gave up may have removed
    /// or replaced the file.
    pub fn rebind(&mut self) -> Result<(), HandoffError> {
        self.listener = listen(&self.path)?;
        Ok(())
    }
}

/// A nonblocking unix listener at `path` (its directory created 0700, a
/// file left there replaced).
fn listen(path: &Path) -> Result<std::os::unix::net::UnixListener, HandoffError> {
    let io_err = |source| HandoffError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
    }
    let _ = fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_err)?;
    listener.set_nonblocking(true).map_err(io_err)?;
    Ok(listener)
}

/// What [`ControlServer::serve_one`] did.
#[derive(Debug)]
pub enum Served {
    /// Nothing was waiting.
    Idle,
    /// A request answered (more may be waiting).
    Answered,
    /// An agent of before the confirmation took the listeners: stop
    /// accepting, drain and exit without tearing down.
    HandedOver,
    /// A successor has the listeners and is getting ready: serve on, and
    /// watch [`PendingHandover`].
    Pending(PendingHandover),
}

/// A successor that has our listeners and has not said [`READY`] yet.
#[derive(Debug)]
pub struct PendingHandover {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What the successor of a [`PendingHandover`] said.
#[derive(Debug, PartialEq, Eq)]
pub enum Successor {
    /// Nothing more yet.
    Preparing,
    /// It serves: stop accepting, drain and exit without tearing down.
    Ready,
    /// It went away (or said something else) before it was ready: carry on.
    GaveUp,
}

impl PendingHandover {
    /// The connection to the successor, to wait on.
    #[must_use]
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads what the successor said so far, without blocking.
    pub fn poll(&mut self) -> Successor {
        let mut buf = [0u8; 64];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => return Successor::GaveUp,
                Ok(n) => {
                    self.line.extend_from_slice(&buf[..n]);
                    if let Some(end) = self.line.iter().position(|&b| b == b'\n') {
                        return if &self.line[..end] == READY.as_bytes() {
                            Successor::Ready
                        } else {
                            Successor::GaveUp
                        };
                    }
                    if self.line.len() > buf.len() {
                        return Successor::GaveUp;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Successor::Preparing,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Successor::GaveUp,
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // After a handover the path belongs to the successor.
        if !self.handed_over.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Room for a few fds in a control message.
const CMSG_SPACE: usize = 64;

pub(crate) fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    let mut control = [0u8; CMSG_SPACE];
    if fds.is_empty() {
        return (&*stream).write_all(data);
    }
    // SAFETY: CMSG_* compute sizes and offsets within `control`, which is
    // large enough for the few fds we send (checked below).
    unsafe {
        let space = libc::CMSG_SPACE(u32::try_from(fd_bytes).map_err(io::Error::other)?) as usize;
        assert!(space <= control.len(), "too many fds for one message");
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len =
            libc::CMSG_LEN(u32::try_from(fd_bytes).map_err(io::Error::other)?) as usize;
        // As bytes: the control buffer gives no alignment guarantee.
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
        if libc::sendmsg(stream.as_raw_fd(), &raw const msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(crate) fn recv_with_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u8; CMSG_SPACE];
    let mut fds = Vec::new();
    // SAFETY: recvmsg into our buffers; every fd received is taken into an
    // OwnedFd exactly once; CMSG_* walk only the control bytes received.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        let n = libc::recvmsg(stream.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len - header) / std::mem::size_of::<RawFd>();
                let data_ptr = libc::CMSG_DATA(cmsg);
                for i in 0..count {
                    let mut raw = [0u8; std::mem::size_of::<RawFd>()];
                    std::ptr::copy_nonoverlapping(
                        data_ptr.add(i * raw.len()),
                        raw.as_mut_ptr(),
                        raw.len(),
                    );
                    fds.push(OwnedFd::from_raw_fd(RawFd::from_ne_bytes(raw)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
        usize::try_from(n).expect("non-negative")
    };
    Ok((data[..n].to_vec(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent that answers stats with a fixed line and has these rules.
    struct Fake(&'static str, CaptureRules);

    impl Requests for Fake {
        fn stats(&self) -> String {
            self.0.to_owned()
        }

        fn rules(&mut self, args: &RuleArgs) -> Result<CaptureRules, String> {
            self.1 = args.apply_to(&self.1).map_err(|e| e.to_string())?;
            Ok(self.1.clone())
        }
    }

    /// Serves `server` until a takeover arrives; what the successor then
    /// said (`None`: an agent of before the confirmation took over).
    fn serve_until_takeover(server: &ControlServer, listeners: &Listeners) -> Option<Successor> {
        let mut agent = Fake("{\"pid\":1}", CaptureRules::default());
        loop {
            match server
                .serve_one(Some(listeners), &mut agent, false)
                .unwrap()
            {
                Served::Idle | Served::Answered => std::thread::sleep(Duration::from_millis(5)),
                Served::HandedOver => return None,
                Served::Pending(mut p) => loop {
                    match p.poll() {
                        Successor::Preparing => std::thread::sleep(Duration::from_millis(5)),
                        said => return Some(said),
                    }
                },
            }
        }
    }

    fn one_listener() -> (Listeners, u16) {
        let outbound = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = outbound.local_addr().unwrap().port();
        let listeners = Listeners {
            outbound: vec![outbound],
            inbound: Vec::new(),
        };
        (listeners, port)
    }

    #[test]
    fn listeners_pass_through_a_control_socket() {
        let dir = std::env::temp_dir().join(format!("mr-handoff-{}", std::process::id()));
        let path = control_path(&dir, 7);
        assert!(
            take_over(&path, Some(1), None).unwrap().is_none(),
            "nobody there yet"
        );
        let server = ControlServer::bind(&path).unwrap();
        let (listeners, port) = one_listener();
        let said = std::thread::scope(|s| {
            let handle = s.spawn(|| serve_until_takeover(&server, &listeners));
            // A stats request is answered and hands nothing over.
            assert_eq!(query_stats(&path).unwrap(), "{\"pid\":1}");
            // So is a rules change, and a refused one says why.
            let args = RuleArgs {
                exclude_outbound_ports: Some(crate::rules::List(vec![9000])),
                ..RuleArgs::default()
            };
            let now = request_rules(&path, &args).unwrap();
            assert_eq!(now.outbound_exclude_ports, vec![9000]);
            let too_many = RuleArgs {
                exclude_outbound_ports: Some(crate::rules::List((1..=4097).collect())),
                ..RuleArgs::default()
            };
            let err = request_rules(&path, &too_many).unwrap_err();
            assert!(matches!(err, HandoffError::RulesRefused { .. }), "{err}");
            let mut taken = take_over(&path, Some(port), None)
                .unwrap()
                .expect("an agent");
            let got = taken.listeners.take().expect("listeners");
            assert_eq!(got.outbound[0].local_addr().unwrap().port(), port);
            // The same socket: a connection queued on it is accepted by the receiver.
            let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            got.outbound[0].set_nonblocking(false).unwrap();
            assert!(got.outbound[0].accept().is_ok());
            // The running agent serves on until we say we are ready.
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !handle.is_finished(),
                "handed over before the successor was ready"
            );
            taken.confirm().unwrap();
            handle.join().unwrap()
        });
        assert_eq!(said, Some(Successor::Ready));
        server.handed_over();
        drop(server);
        assert!(
            path.exists(),
            "after a handover the socket file is left to the successor"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_successor_that_gives_up_leaves_the_running_agent_serving() {
        let dir = std::env::temp_dir().join(format!("mr-handoff-gu-{}", std::process::id()));
        let path = control_path(&dir, 9);
        let mut server = ControlServer::bind(&path).unwrap();
        let (listeners, port) = one_listener();
        let said = std::thread::scope(|s| {
            let handle = s.spawn(|| serve_until_takeover(&server, &listeners));
            let taken = take_over(&path, Some(port), None)
                .unwrap()
                .expect("an agent");
            // Failed while getting ready: the connection closes unconfirmed.
            drop(taken);
            handle.join().unwrap()
        });
        assert_eq!(said, Some(Successor::GaveUp));
        // It may have replaced the socket file: the running agent listens anew.
        let _ = fs::remove_file(&path);
        server.rebind().unwrap();
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                let mut agent = Fake("{\"pid\":2}", CaptureRules::default());
                for _ in 0..400 {
                    server
                        .serve_one(Some(&listeners), &mut agent, false)
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            assert_eq!(query_stats(&path).unwrap(), "{\"pid\":2}");
            drop(handle);
        });
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_agent_of_before_the_confirmation_takes_over_at_once() {
        let dir = std::env::temp_dir().join(format!("mr-handoff-old-{}", std::process::id()));
        let path = control_path(&dir, 10);
        let server = ControlServer::bind(&path).unwrap();
        let (listeners, port) = one_listener();
        let said = std::thread::scope(|s| {
            let handle = s.spawn(|| serve_until_takeover(&server, &listeners));
            let taken = ask_takeover(&path, Some(port), None, false)
                .unwrap()
                .expect("an agent");
            assert_eq!(taken.listeners.expect("listeners").outbound.len(), 1);
            handle.join().unwrap()
        });
        assert_eq!(said, None, "handed over without waiting");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_takeover_while_one_is_pending_is_refused() {
        let dir = std::env::temp_dir().join(format!("mr-handoff-busy-{}", std::process::id()));
        let path = control_path(&dir, 11);
        let server = ControlServer::bind(&path).unwrap();
        let (listeners, port) = one_listener();
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                let mut agent = Fake("", CaptureRules::default());
                for _ in 0..400 {
                    server
                        .serve_one(Some(&listeners), &mut agent, true)
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            let err = take_over(&path, Some(port), None).unwrap_err();
            assert!(err.to_string().contains("busy"), "{err}");
            handle.join().unwrap();
        });
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_port_mismatch_is_refused() {
        let dir = std::env::temp_dir().join(format!("mr-handoff-mm-{}", std::process::id()));
        let path = control_path(&dir, 8);
        let server = ControlServer::bind(&path).unwrap();
        let listeners = Listeners {
            outbound: vec![TcpListener::bind("127.0.0.1:0").unwrap()],
            inbound: Vec::new(),
        };
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                let mut agent = Fake("", CaptureRules::default());
                for _ in 0..400 {
                    assert!(
                        matches!(
                            server
                                .serve_one(Some(&listeners), &mut agent, false)
                                .unwrap(),
                            Served::Idle | Served::Answered
                        ),
                        "handed over on a mismatch"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            let err = take_over(&path, Some(1), None).unwrap_err();
            assert!(matches!(err, HandoffError::Mismatch { .. }), "{err}");
            handle.join().unwrap();
        });
        let _ = fs::remove_dir_all(&dir);
    }
}
