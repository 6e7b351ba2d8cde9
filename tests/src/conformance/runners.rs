//! How each client runs a cell: a program in the client's namespace and
//! cgroup (Python, Go, Node, curl, wget), a request to the Java driver that
//! serves all of a side's Java cells from one JVM, or Rust's `std::net` on a
//! thread of the test process. Every way has the cell's deadline: a
//! program is killed, a JVM that missed one is replaced, a Rust socket is
//! shut down under its blocked call; the cell then reads `hung`.

use std::{
    collections::HashMap,
    io::{self, BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use super::{
    Client, End, Observation, Scenario,
    content::{Content, first_difference},
    upstream::{ECHO_PORT, HALF_CLOSE_PORT, HTTP_PORT},
};
use crate::{InCgroup, TestNetns, clients};

include!(concat!(env!("OUT_DIR"), "/go_client.rs"));

/// The Python clients (`clients/conformance/client.py`).
pub const CLIENT_PY: &str = include_str!("../../clients/conformance/client.py");
/// The Node.js client.
pub const CLIENT_JS: &str = include_str!("../../clients/conformance/http_client.js");

/// Serializes every moment the test process spends in a pod's cgroup to
/// create a socket there: sockets belong to the cgroup their creator is in
/// when it creates them, and the whole process moves.
static CGROUP_LOCK: Mutex<()> = Mutex::new(());

/// Where a cell's client runs and what it connects to.
pub struct Side<'a> {
    pub netns: &'a TestNetns,
    /// The cgroup its processes and sockets belong to: the pod's for an
    /// outbound client, the test's own for an inbound one.
    pub cgroup: &'a Path,
    /// Whether `cgroup` is a pod's (the test process must enter it to make
    /// a socket there).
    pub in_pod: bool,
    /// The address the client connects to.
    pub host: Ipv4Addr,
    /// The Java driver of this side, started on first use.
    pub java: &'a Mutex<Option<JavaDriver>>,
}

/// `program` on `PATH`, or why not.
pub fn on_path(program: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| format!("`{program}` is not on PATH (`cargo xtask setup` installs it)"))
}

/// A file written once per test process.
fn temp_file(name: &str, bytes: &[u8], mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = crate::process_dir("mesh-redirect-conformance-bin-");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write a client");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod a client");
    path
}

/// Writes the client programs out (those this build has) before any cell
/// runs.
pub fn prepare() {
    if GO_CLIENT.is_ok() {
        go_binary();
    }
    node_script();
    if clients::JAVA_CLASSES.is_ok() {
        let _ = clients::java_classes();
    }
}

fn go_binary() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let bytes = GO_CLIENT.unwrap_or_else(|why| panic!("no Go client: {why}"));
        temp_file("conformance-go", bytes, 0o755)
    })
}

fn node_script() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| temp_file("http_client.js", CLIENT_JS.as_bytes(), 0o644))
}

/// The port a scenario's server listens on.
fn port(scenario: Scenario) -> u16 {
    match scenario {
        Scenario::Duplex => ECHO_PORT,
        Scenario::HalfClose => HALF_CLOSE_PORT,
        _ => HTTP_PORT,
    }
}

/// The arguments every client program takes after its kind:
/// `SCENARIO HOST PORT CELL N FILE RATE`.
fn common_args(scenario: Scenario, side: &Side, cell: &str, content: &Content) -> Vec<String> {
    vec![
        scenario.name().to_owned(),
        side.host.to_string(),
        port(scenario).to_string(),
        cell.to_owned(),
        scenario.size().to_string(),
        content.data_file().display().to_string(),
        scenario.rate().to_string(),
    ]
}

/// Runs `client`'s cell `cell` (the id in its requests) of `scenario`.
pub fn run(
    client: Client,
    scenario: Scenario,
    side: &Side,
    cell: &str,
    content: &Content,
) -> Observation {
    let args = common_args(scenario, side, cell, content);
    let limit = scenario.deadline();
    let python = |kind: &str| {
        let mut c = Command::new(clients::PYTHON);
        c.args(["-c", CLIENT_PY, kind]).args(&args);
        result_line(&run_program(c, side, limit, None), content, scenario)
    };
    match client {
        Client::PySocket => python("socket"),
        Client::PyThreads => python("threads"),
        Client::PyHttpClient => python("http.client"),
        Client::PyUrllib => python("urllib"),
        Client::PyAsyncio => python("asyncio"),
        Client::GoNetHttp => {
            let mut c = Command::new(go_binary());
            c.args(&args);
            result_line(&run_program(c, side, limit, None), content, scenario)
        }
        Client::NodeHttp => {
            let mut c = Command::new("node");
            c.arg(node_script()).args(&args);
            result_line(&run_program(c, side, limit, None), content, scenario)
        }
        Client::Curl | Client::Wget => {
            let expected = content.expected(scenario);
            let ran = run_program(
                http_tool(client, scenario, side, cell, content),
                side,
                limit,
                Some(expected.as_deref().unwrap_or(&[])),
            );
            tool_observation(client, &ran, expected.is_some())
        }
        Client::JavaSocket => java(side, "socket", &args, limit, content, scenario),
        Client::JavaUrlConnection => java(side, "urlconnection", &args, limit, content, scenario),
        Client::JavaHttpClient => java(side, "httpclient", &args, limit, content, scenario),
        Client::RustReadToEnd | Client::RustLines => {
            rust(client, scenario, side, cell, content, limit)
        }
    }
}

// --- programs ---

/// What a program did.
struct Ran {
    /// Why it could not start, if it could not.
    spawn_error: Option<String>,
    /// `None`: killed at the deadline.
    status: Option<ExitStatus>,
    /// Its stdout, unless it was checked as a body.
    stdout: Vec<u8>,
    /// The body on its stdout: bytes, and the first difference from the
    /// expected one.
    body: (u64, Option<usize>),
    stderr: String,
    limit: Duration,
}

/// Runs `cmd` in the side's namespace and cgroup until it exits or
/// `limit` passes (then kills it). With `body`, its stdout is compared with
/// it as it streams (a download of hundreds of MiB is never held).
fn run_program(mut cmd: Command, side: &Side, limit: Duration, body: Option<&[u8]>) -> Ran {
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::enter_before_exec(&mut cmd, Some(side.netns), Some(side.cgroup));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ran {
                spawn_error: Some(format!("spawn {}: {e}", cmd.get_program().display())),
                status: None,
                stdout: Vec::new(),
                body: (0, None),
                stderr: String::new(),
                limit,
            };
        }
    };
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let deadline = Instant::now() + limit;
    std::thread::scope(|s| {
        let stdout = s.spawn(move || {
            let mut kept = Vec::new();
            let (mut n, mut diff) = (0usize, None);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(r) => {
                        match body {
                            Some(want) => {
                                if diff.is_none() {
                                    diff = first_difference(want, n, &buf[..r]);
                                }
                            }
                            None => kept.extend_from_slice(&buf[..r]),
                        }
                        n += r;
                    }
                }
            }
            (kept, n as u64, diff)
        });
        let stderr = s.spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            String::from_utf8_lossy(&b).into_owned()
        });
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for a client") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (stdout, n, diff) = stdout.join().expect("stdout reader");
        Ran {
            spawn_error: None,
            status,
            stdout,
            body: (n, diff),
            stderr: stderr.join().expect("stderr reader"),
            limit,
        }
    })
}

/// The last line of `text`, for a detail.
fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// A client program's `RESULT STATUS BYTES SHA256 DETAIL` line.
fn result_line(ran: &Ran, content: &Content, scenario: Scenario) -> Observation {
    if let Some(why) = &ran.spawn_error {
        return Observation::error(why.clone());
    }
    let stdout = String::from_utf8_lossy(&ran.stdout);
    let Some(line) = stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")) else {
        return if ran.status.is_none() {
            Observation::hung(ran.limit, last_line(&ran.stderr))
        } else {
            Observation::error(format!(
                "no result ({}): {}",
                ran.status.map(|s| s.to_string()).unwrap_or_default(),
                last_line(&ran.stderr)
            ))
        };
    };
    parse_result(line, content, scenario)
}

/// `STATUS BYTES SHA256 DETAIL`, the SHA-256 checked against what a
/// complete exchange receives.
fn parse_result(line: &str, content: &Content, scenario: Scenario) -> Observation {
    let mut f = line.splitn(4, ' ');
    let end = End::parse(f.next().unwrap_or(""));
    let bytes = f.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    let sha = f.next().unwrap_or("");
    let detail = f.next().unwrap_or("-").to_owned();
    let exact = content
        .expected_sha256(scenario)
        .is_none_or(|want| want == sha);
    Observation {
        end,
        bytes,
        exact,
        detail,
    }
}

/// The curl or wget command for a cell; the body goes to stdout.
fn http_tool(
    client: Client,
    scenario: Scenario,
    side: &Side,
    cell: &str,
    content: &Content,
) -> Command {
    let n = scenario.size();
    let base = format!("http://{}:{HTTP_PORT}/c/{cell}/", side.host);
    let url = match scenario {
        Scenario::Small => format!("{base}small"),
        Scenario::Upload => format!("{base}upload"),
        Scenario::RstBlocked => format!("{base}reset-idle"),
        Scenario::RstMid => format!("{base}reset-mid/{n}"),
        _ => format!("{base}download/{n}"),
    };
    let data = content.data_file().display().to_string();
    let mut c;
    if client == Client::Curl {
        c = Command::new("curl");
        c.args(["--silent", "--show-error", "--noproxy", "*", "--http1.1"]);
        c.args(["--output", "-"]);
        if scenario == Scenario::Upload {
            c.arg("--data-binary").arg(format!("@{data}"));
            c.args(["--header", "Content-Type: application/octet-stream"]);
        }
        match scenario {
            Scenario::SlowReader => c.args(["--limit-rate", "1M"]),
            Scenario::Download256mLimited => c.args(["--limit-rate", "100M"]),
            _ => &mut c,
        };
    } else {
        c = Command::new("wget");
        // Not --no-verbose: that hides why a transfer failed. A dot per MiB.
        c.args(["--tries=1", "--no-proxy", "--progress=dot:mega"]);
        c.arg("--output-document=-");
        if scenario == Scenario::Upload {
            c.arg(format!("--post-file={data}"));
            c.arg("--header=Content-Type: application/octet-stream");
        }
        if scenario == Scenario::SlowReader {
            c.arg("--limit-rate=1m");
        }
    }
    c.arg(url);
    c
}

/// How curl or wget ended, from its exit status and its message.
fn tool_observation(client: Client, ran: &Ran, checked: bool) -> Observation {
    if let Some(why) = &ran.spawn_error {
        return Observation::error(why.clone());
    }
    let (bytes, diff) = ran.body;
    let message = last_line(&ran.stderr);
    let Some(status) = ran.status else {
        return Observation {
            bytes,
            ..Observation::hung(ran.limit, message)
        };
    };
    let m = ran.stderr.to_ascii_lowercase();
    let end = if status.success() {
        End::Ok
    } else if m.contains("connection reset by peer") {
        End::Reset
    } else if m.contains("resource temporarily unavailable") {
        End::Eagain
    } else if match client {
        // 18: a body shorter than its length; 52: no reply at all.
        Client::Curl => matches!(status.code(), Some(18 | 52)),
        _ => {
            m.contains("connection closed at byte")
                || m.contains("no data received")
                || m.contains("read error at byte") && m.contains("(success)")
        }
    } {
        End::Eof
    } else {
        End::Error
    };
    Observation {
        end,
        bytes,
        exact: !checked || diff.is_none(),
        detail: format!("{status}: {message}"),
    }
}

// --- Java ---

/// One JVM in a side's namespace and cgroup running
/// `clients/conformance/Conformance.java`: a line per cell on its stdin, a
/// result line per cell on its stdout.
pub struct JavaDriver {
    child: Child,
    stdin: ChildStdin,
    waiting: Arc<Mutex<HashMap<u64, mpsc::Sender<String>>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    next: u64,
    /// A cell missed its deadline: the JVM is replaced after the batch.
    pub hung: bool,
}

impl JavaDriver {
    fn start(side: &Side) -> io::Result<Self> {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(clients::java_classes())
            .arg("Conformance")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::enter_before_exec(&mut cmd, Some(side.netns), Some(side.cgroup));
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let waiting: Arc<Mutex<HashMap<u64, mpsc::Sender<String>>>> = Arc::default();
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let w = Arc::clone(&waiting);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some((id, result)) = line.split_once(' ') else {
                    continue;
                };
                let tx = id.parse().ok().and_then(|id| w.lock().unwrap().remove(&id));
                if let Some(tx) = tx {
                    let _ = tx.send(result.to_owned());
                }
            }
            // The JVM is gone: every cell still waiting learns it.
            w.lock().unwrap().clear();
        });
        let e = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                eprintln!("[java] {line}");
                e.lock().unwrap().push(line);
            }
        });
        Ok(Self {
            child,
            stdin,
            waiting,
            stderr,
            next: 0,
            hung: false,
        })
    }

    fn submit(&mut self, kind: &str, args: &[String]) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        let id = self.next;
        self.next += 1;
        self.waiting.lock().unwrap().insert(id, tx);
        let line = format!("{id} {kind} {}\n", args.join(" "));
        if self.stdin.write_all(line.as_bytes()).is_err() {
            self.waiting.lock().unwrap().remove(&id);
        }
        rx
    }
}

impl Drop for JavaDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn java(
    side: &Side,
    kind: &str,
    args: &[String],
    limit: Duration,
    content: &Content,
    scenario: Scenario,
) -> Observation {
    let rx = {
        let mut driver = side.java.lock().unwrap();
        if driver.is_none() {
            match JavaDriver::start(side) {
                Ok(d) => *driver = Some(d),
                Err(e) => return Observation::error(format!("java: {e}")),
            }
        }
        driver.as_mut().expect("started").submit(kind, args)
    };
    match rx.recv_timeout(limit) {
        Ok(line) => match line.strip_prefix("RESULT ") {
            Some(result) => parse_result(result, content, scenario),
            None => Observation::error(format!("java: {line}")),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            if let Some(d) = side.java.lock().unwrap().as_mut() {
                d.hung = true;
            }
            Observation::hung(limit, "the JVM will be replaced")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let why = side
                .java
                .lock()
                .unwrap()
                .as_ref()
                .map(|d| d.stderr.lock().unwrap().last().cloned().unwrap_or_default())
                .unwrap_or_default();
            if let Some(d) = side.java.lock().unwrap().as_mut() {
                d.hung = true;
            }
            Observation::error(format!("the JVM exited: {why}"))
        }
    }
}

// --- Rust std::net, on threads of the test process ---

/// A blocking `TcpStream` to `host:port` from the side's namespace,
/// created while the test process is in the side's cgroup.
fn rust_connect(side: &Side, port: u16) -> io::Result<TcpStream> {
    let socket = side.netns.run(|| {
        // Also outside the pod: not while another thread has the whole
        // process in a pod's cgroup.
        let _only_us = CGROUP_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _in_pod = side.in_pod.then(|| InCgroup::enter(side.cgroup));
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
    })?;
    socket.connect(&SocketAddr::from((side.host, port)).into())?;
    Ok(socket.into())
}

/// Shuts a stream down when its cell's deadline passes (a blocked read or
/// write then returns), and says whether it did.
struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn arm(stream: &TcpStream, limit: Duration) -> io::Result<Self> {
        let stream = stream.try_clone()?;
        let (tx, rx) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fired);
        let thread = std::thread::spawn(move || {
            if rx.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
                f.store(true, Ordering::SeqCst);
                let _ = stream.shutdown(Shutdown::Both);
            }
        });
        Ok(Self {
            cancel: Some(tx),
            fired,
            thread: Some(thread),
        })
    }

    fn disarm(mut self) -> bool {
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.load(Ordering::SeqCst)
    }
}

/// An `io::Error` as the end of an exchange.
fn io_end(e: &io::Error) -> End {
    match e.kind() {
        ErrorKind::ConnectionReset => End::Reset,
        ErrorKind::WouldBlock => End::Eagain,
        ErrorKind::UnexpectedEof => End::Eof,
        _ => End::Error,
    }
}

/// The request the Rust clients send, `lines` asking for text.
fn rust_request(scenario: Scenario, cell: &str, host: Ipv4Addr, lines: bool) -> Vec<u8> {
    let n = scenario.size();
    let path = match scenario {
        Scenario::Small => format!("/c/{cell}/small"),
        Scenario::RstBlocked => format!("/c/{cell}/reset-idle"),
        Scenario::RstMid => format!("/c/{cell}/reset-mid/{n}"),
        Scenario::Upload => format!("/c/{cell}/upload"),
        _ if lines => format!("/c/{cell}/text/{n}"),
        _ => format!("/c/{cell}/download/{n}"),
    };
    let method = if scenario == Scenario::Upload {
        format!("POST {path} HTTP/1.1\r\nContent-Length: {n}\r\n")
    } else {
        format!("GET {path} HTTP/1.1\r\n")
    };
    format!("{method}Host: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

fn rust(
    client: Client,
    scenario: Scenario,
    side: &Side,
    cell: &str,
    content: &Content,
    limit: Duration,
) -> Observation {
    let stream = match rust_connect(side, port(scenario)) {
        Ok(s) => s,
        Err(e) => {
            return Observation {
                end: io_end(&e),
                detail: format!("connect: {e}"),
                ..Observation::error("")
            };
        }
    };
    let watchdog = match Watchdog::arm(&stream, limit) {
        Ok(w) => w,
        Err(e) => return Observation::error(format!("try_clone: {e}")),
    };
    let obs = if client == Client::RustLines {
        rust_lines(stream, scenario, side.host, cell, content)
    } else {
        rust_read_to_end(stream, scenario, side.host, cell, content)
    };
    if watchdog.disarm() {
        Observation {
            bytes: obs.bytes,
            ..Observation::hung(limit, "the socket was shut down under it")
        }
    } else {
        obs
    }
}

/// `write_all` of the request (and of the data, for an upload, an echo or
/// a half-close: from a writer thread for the echo), then `read_to_end`.
fn rust_read_to_end(
    mut stream: TcpStream,
    scenario: Scenario,
    host: Ipv4Addr,
    cell: &str,
    content: &Content,
) -> Observation {
    let raw = matches!(scenario, Scenario::Duplex | Scenario::HalfClose);
    let (head, data): (Vec<u8>, &[u8]) = if raw {
        (
            format!("{cell}\n").into_bytes(),
            content.pattern(scenario.size()),
        )
    } else if scenario == Scenario::Upload {
        (
            rust_request(scenario, cell, host, false),
            content.pattern(scenario.size()),
        )
    } else {
        (rust_request(scenario, cell, host, false), &[])
    };
    let mut buf = Vec::new();
    let (written, read) = std::thread::scope(|s| {
        let w = stream.try_clone();
        let writer = move || -> io::Result<()> {
            let mut w = w?;
            w.write_all(&head)?;
            for chunk in data.chunks(256 * 1024) {
                w.write_all(chunk)?;
            }
            if raw {
                w.shutdown(Shutdown::Write)?;
            }
            Ok(())
        };
        if scenario == Scenario::Duplex {
            let writer = s.spawn(writer);
            let read = stream.read_to_end(&mut buf);
            (writer.join().expect("writer thread"), read)
        } else {
            let written = writer();
            let read = if written.is_ok() {
                stream.read_to_end(&mut buf)
            } else {
                Ok(0)
            };
            (written, read)
        }
    });
    let (body, length) = if raw {
        (&buf[..], None)
    } else {
        split_response(&buf)
    };
    let bytes = body.len() as u64;
    let expected = content.expected(scenario);
    let exact = expected.as_deref().is_none_or(|want| want == body);
    let (end, detail) = match (&written, &read) {
        (Err(e), _) => (io_end(e), format!("write_all: {e}")),
        (_, Err(e)) => (io_end(e), format!("read_to_end: {e}")),
        _ if length.is_some_and(|l| bytes < l) || (!raw && length.is_none()) => (
            End::Eof,
            format!("read_to_end: clean EOF after {bytes} of {length:?} body bytes"),
        ),
        _ => (End::Ok, "-".to_owned()),
    };
    Observation {
        end,
        bytes,
        exact,
        detail,
    }
}

/// An HTTP response's body and `Content-Length` (`None` for the body when
/// the head is incomplete: nothing of it counts).
fn split_response(buf: &[u8]) -> (&[u8], Option<u64>) {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (&[], None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    (&buf[end + 4..], length)
}

/// `BufRead::lines` over the response, the body's lines checked against
/// the text; paced for the slow reader.
fn rust_lines(
    mut stream: TcpStream,
    scenario: Scenario,
    host: Ipv4Addr,
    cell: &str,
    content: &Content,
) -> Observation {
    let n = scenario.size();
    let want: &[u8] = match scenario {
        Scenario::Small => crate::servers::HTTP_BODY,
        Scenario::RstBlocked => &[],
        _ => content.text(n),
    };
    let checked = !matches!(scenario, Scenario::RstBlocked | Scenario::RstMid);
    if let Err(e) = stream.write_all(&rust_request(scenario, cell, host, true)) {
        return Observation {
            end: io_end(&e),
            detail: format!("write_all: {e}"),
            ..Observation::error("")
        };
    }
    let mut lines = BufReader::new(stream).lines();
    let mut in_body = false;
    let mut length = None;
    let mut got = 0usize;
    let mut exact = true;
    let start = Instant::now();
    let rate = scenario.rate();
    let end = loop {
        match lines.next() {
            None => break None,
            Some(Err(e)) => break Some(e),
            Some(Ok(line)) if !in_body => {
                if line.is_empty() {
                    in_body = true;
                } else if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse::<u64>().ok();
                }
            }
            Some(Ok(line)) => {
                let mut with_newline = line.into_bytes();
                with_newline.push(b'\n');
                if checked && first_difference(want, got, &with_newline).is_some() {
                    exact = false;
                }
                got += with_newline.len();
                if let Some(micros) = (got as u64 * 1_000_000).checked_div(rate)
                    && let Some(ahead) = (start + Duration::from_micros(micros))
                        .checked_duration_since(Instant::now())
                    && ahead > Duration::from_millis(1)
                {
                    std::thread::sleep(ahead);
                }
            }
        }
    };
    let bytes = got as u64;
    let (end, detail) = match end {
        Some(e) => (io_end(&e), format!("lines: {e}")),
        None if length.is_none_or(|l| bytes < l) => (
            End::Eof,
            format!("lines: clean EOF after {bytes} of {length:?} body bytes"),
        ),
        None => (End::Ok, "-".to_owned()),
    };
    Observation {
        end,
        bytes,
        exact: exact && (!checked || got == want.len()),
        detail,
    }
}
