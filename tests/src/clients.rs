//! Real client programs (Python, the JDK, curl) run inside a pod: its
//! network namespace and cgroup, as an app's process would be.

use std::{
    fs,
    io::Read as _,
    net::IpAddr,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{TestCgroup, TestNetns};

include!(concat!(env!("OUT_DIR"), "/java_classes.rs"));

/// Python's own HTTP client on a socket of the address's family.
pub const HTTP_GET_PY: &str = include_str!("../clients/http_get.py");

/// Debian's Python (`setup` installs it; the guests have it at this path).
pub const PYTHON: &str = "/usr/bin/python3";

/// A client that makes `n` keep-alive HTTP GETs on one connection and
/// writes the bodies to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpClient {
    /// Python, `socket(AF_INET6)` for an IPv6 or v4-mapped address.
    Python,
    /// `new java.net.Socket(host, port)`, default properties.
    JavaSocket,
    /// `java.net.http.HttpClient.newHttpClient()`, default properties.
    JavaHttpClient,
    /// curl, several URLs on one command line (one connection, reused).
    Curl,
}

impl HttpClient {
    /// Whether its socket does blocking reads (no timeout, no poll): where
    /// the kernel's sockmap readers are unsafe for those, it stays on plain
    /// TCP.
    #[must_use]
    pub const fn blocking_reads(self) -> bool {
        matches!(self, Self::JavaSocket)
    }

    /// The command that makes `n` GETs of `http://ip:port/`.
    ///
    /// # Panics
    /// For a Java client when the tests were built without `javac`.
    #[must_use]
    pub fn command(self, ip: IpAddr, port: u16, n: u32) -> Command {
        let host = ip.to_string();
        match self {
            Self::Python => {
                let mut c = Command::new(PYTHON);
                c.args(["-c", HTTP_GET_PY, &host, &port.to_string(), &n.to_string()]);
                c
            }
            Self::JavaSocket | Self::JavaHttpClient => {
                let kind = if self == Self::JavaSocket {
                    "socket"
                } else {
                    "httpclient"
                };
                let mut c = Command::new("java");
                c.arg("-cp").arg(java_classes()).args([
                    "Client",
                    kind,
                    &host,
                    &port.to_string(),
                    &n.to_string(),
                ]);
                c
            }
            Self::Curl => {
                let authority = match ip {
                    IpAddr::V4(_) => format!("{ip}:{port}"),
                    IpAddr::V6(_) => format!("[{ip}]:{port}"),
                };
                let mut c = Command::new("curl");
                c.args([
                    "--silent",
                    "--show-error",
                    "--fail",
                    "--globoff",
                    "--http1.1",
                ]);
                c.args((0..n).map(|_| format!("http://{authority}/")));
                c
            }
        }
    }
}

/// A directory holding the Java clients' class files, written once per
/// test process.
///
/// # Panics
/// When the tests were built without `javac`.
#[must_use]
pub fn java_classes() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let classes = JAVA_CLASSES.unwrap_or_else(|why| panic!("no Java clients: {why}"));
        let dir = crate::process_dir("mesh-redirect-java-");
        for (name, bytes) in classes {
            fs::write(dir.join(name), bytes).expect("write a Java class");
        }
        dir
    })
    .clone()
}

/// Runs `cmd` inside `netns` and `cgroup` to its end, within `limit`
/// (stretched under emulation); its output. Killed, and the test failed,
/// if it takes longer.
///
/// # Panics
/// When it cannot start or overruns.
#[must_use]
pub fn run_in_pod(
    cmd: &mut Command,
    netns: &TestNetns,
    cgroup: &TestCgroup,
    limit: Duration,
) -> Output {
    run_in(cmd, Some(netns), Some(cgroup), limit)
}

/// [`run_in_pod`], each of the namespace and the cgroup optional (a
/// command that enters the namespace itself, as `ip netns exec` does).
///
/// # Panics
/// When it cannot start or overruns.
#[must_use]
pub fn run_in(
    cmd: &mut Command,
    netns: Option<&TestNetns>,
    cgroup: Option<&TestCgroup>,
    limit: Duration,
) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = crate::spawn_in(cmd, netns, cgroup);
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + crate::scaled(limit);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a client") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {limit:?}: {}",
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}
