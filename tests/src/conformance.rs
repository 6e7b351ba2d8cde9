//! The conformance suite: real clients and servers, each run through the
//! agent in eBPF mode and in iptables mode, with one expectation per cell
//! that does not depend on the mode (what plain TCP gives: iptables mode is
//! the reference). The product promise is that turning eBPF on changes
//! nothing an application can observe, only its speed.
//!
//! A cell is (client, scenario, direction, proxy); the tests in
//! `tests/tests/conformance.rs` are one per cell, each running both modes
//! and printing a line per mode:
//!
//! ```text
//! CONFORMANCE<TAB>client<TAB>scenario<TAB>direction<TAB>proxy<TAB>mode<TAB>result
//! ```
//!
//! where result is `ok`, `n/a` (the client cannot express the scenario,
//! decided by the test table, never at run time) or the difference in a
//! few words. `cargo xtask conformance` collects them into a table.
//!
//! The cells of one (scenario, direction, proxy) run together, all clients
//! at once against one agent per mode, both modes at the same time (each on
//! its own pod): see [`suite`]. The clients are the programs under
//! `tests/clients/conformance/` plus Rust's `std::net` on threads of the
//! test process ([`runners`]); the servers are blocking thread-per-connection
//! Rust servers ([`upstream`]), the app in pod A inbound and the upstream
//! outbound.

pub mod content;
pub mod fixture;
pub mod runners;
pub mod suite;
pub mod upstream;

use std::{fmt, path::Path, time::Duration};

pub use suite::{Known, TestFn, check, lacking_by_design, report, unavailable};

use crate::{RedirectMode, bulk_bytes, scaled};

const MIB: usize = 1 << 20;

/// A client program, as an application would use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Client {
    /// Python, a blocking socket, one thread.
    PySocket,
    /// Python, a blocking socket, a reader thread and a writer thread.
    PyThreads,
    /// Python's `http.client`.
    PyHttpClient,
    /// Python's `urllib.request`.
    PyUrllib,
    /// Python's asyncio streams.
    PyAsyncio,
    /// Rust `std::net::TcpStream`, blocking, `Read::read_to_end`.
    RustReadToEnd,
    /// Rust `std::net::TcpStream`, blocking, `BufRead::lines`.
    RustLines,
    /// `java.net.Socket`, a reader thread and a writer thread.
    JavaSocket,
    /// `java.net.HttpURLConnection`.
    JavaUrlConnection,
    /// `java.net.http.HttpClient`.
    JavaHttpClient,
    /// Go's `net/http`.
    GoNetHttp,
    /// Node.js's `http`.
    NodeHttp,
    Curl,
    /// `wget --tries=1`.
    Wget,
}

impl Client {
    pub const ALL: [Self; 14] = [
        Self::PySocket,
        Self::PyThreads,
        Self::PyHttpClient,
        Self::PyUrllib,
        Self::PyAsyncio,
        Self::RustReadToEnd,
        Self::RustLines,
        Self::JavaSocket,
        Self::JavaUrlConnection,
        Self::JavaHttpClient,
        Self::GoNetHttp,
        Self::NodeHttp,
        Self::Curl,
        Self::Wget,
    ];

    /// Its name in the table.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::PySocket => "python-socket",
            Self::PyThreads => "python-socket-threads",
            Self::PyHttpClient => "python-http.client",
            Self::PyUrllib => "python-urllib",
            Self::PyAsyncio => "python-asyncio",
            Self::RustReadToEnd => "rust-read_to_end",
            Self::RustLines => "rust-lines",
            Self::JavaSocket => "java-socket-threads",
            Self::JavaUrlConnection => "java-HttpURLConnection",
            Self::JavaHttpClient => "java-HttpClient",
            Self::GoNetHttp => "go-net/http",
            Self::NodeHttp => "node-http",
            Self::Curl => "curl",
            Self::Wget => "wget",
        }
    }

    /// The program that runs it, as the VM guests name what they lack
    /// (`None`: it runs in the test process).
    #[must_use]
    pub const fn program(self) -> Option<&'static str> {
        match self {
            Self::PySocket
            | Self::PyThreads
            | Self::PyHttpClient
            | Self::PyUrllib
            | Self::PyAsyncio => Some("python3"),
            Self::RustReadToEnd | Self::RustLines => None,
            Self::JavaSocket | Self::JavaUrlConnection | Self::JavaHttpClient => Some("java"),
            Self::GoNetHttp => Some("go"),
            Self::NodeHttp => Some("node"),
            Self::Curl => Some("curl"),
            Self::Wget => Some("wget"),
        }
    }

    /// Why this client cannot run here, if it cannot.
    #[must_use]
    pub fn unavailable(self) -> Option<String> {
        let program = |path: &str, package: &str| {
            (!Path::new(path).exists())
                .then(|| format!("{path} is missing (`cargo xtask setup` installs {package})"))
        };
        match self {
            Self::PySocket
            | Self::PyThreads
            | Self::PyHttpClient
            | Self::PyUrllib
            | Self::PyAsyncio => program(crate::clients::PYTHON, "python3"),
            Self::RustReadToEnd | Self::RustLines => None,
            Self::JavaSocket | Self::JavaUrlConnection | Self::JavaHttpClient => {
                crate::clients::JAVA_CLASSES.err().map(str::to_owned)
            }
            Self::GoNetHttp => runners::GO_CLIENT.err().map(str::to_owned),
            Self::NodeHttp => runners::on_path("node").err(),
            Self::Curl => runners::on_path("curl").err(),
            Self::Wget => runners::on_path("wget").err(),
        }
    }
}

/// What a cell asks of a client and its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// One small request, one small response.
    Small,
    /// 64 MiB downloaded, byte-exact.
    Download,
    /// 64 MiB uploaded, byte-exact (the server checks and says so).
    Upload,
    /// 32 MiB echoed, a writer thread and a reader thread, full duplex.
    Duplex,
    /// The client shuts down its write side; the server then replies.
    HalfClose,
    /// The upstream resets while the client is blocked reading.
    RstBlocked,
    /// The upstream resets after some MiB of a response.
    RstMid,
    /// A download read at 1 MiB/s for 20 s, byte-exact.
    SlowReader,
    /// 256 MiB downloaded by `curl --limit-rate 100M`, byte-exact.
    Download256mLimited,
}

impl Scenario {
    pub const ALL: [Self; 9] = [
        Self::Small,
        Self::Download,
        Self::Upload,
        Self::Duplex,
        Self::HalfClose,
        Self::RstBlocked,
        Self::RstMid,
        Self::SlowReader,
        Self::Download256mLimited,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Download => "download",
            Self::Upload => "upload",
            Self::Duplex => "duplex",
            Self::HalfClose => "half-close",
            Self::RstBlocked => "rst-blocked",
            Self::RstMid => "rst-mid",
            Self::SlowReader => "slow-reader",
            Self::Download256mLimited => "download-256m",
        }
    }

    /// The bytes it moves (shrunk under emulation): the body, the upload,
    /// the echo, what precedes the reset.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::Small | Self::RstBlocked => 0,
            Self::Download | Self::Upload => bulk_bytes(64 * MIB),
            Self::Duplex => bulk_bytes(32 * MIB),
            Self::HalfClose => bulk_bytes(MIB),
            Self::RstMid => bulk_bytes(8 * MIB),
            Self::SlowReader => bulk_bytes(20 * MIB),
            Self::Download256mLimited => bulk_bytes(256 * MIB),
        }
    }

    /// The reading rate in bytes per second, 0 for as fast as possible.
    #[must_use]
    pub const fn rate(self) -> u64 {
        match self {
            Self::SlowReader => MIB as u64,
            Self::Download256mLimited => 100 * MIB as u64,
            _ => 0,
        }
    }

    /// How long a cell may take before it counts as hung: the transfer at
    /// its rate, plus a margin stretched under emulation.
    #[must_use]
    pub fn deadline(self) -> Duration {
        let margin = match self {
            Self::Small | Self::HalfClose | Self::RstBlocked | Self::RstMid => 20,
            _ => 60,
        };
        let transfer = match self.rate() {
            0 => Duration::ZERO,
            rate => Duration::from_millis(self.size() as u64 * 1000 / rate),
        };
        transfer + scaled(Duration::from_secs(margin))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The client in the pod, the server elsewhere.
    Outbound,
    /// The client elsewhere ("pod B"), the server the app in the pod.
    Inbound,
}

impl Direction {
    pub const ALL: [Self; 2] = [Self::Outbound, Self::Inbound];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Outbound => "out",
            Self::Inbound => "in",
        }
    }
}

/// The proxy the agent's capture leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proxy {
    /// The agent's own (`--proxy builtin`, the default).
    Builtin,
    /// HAProxy, `--proxy external`, as uid 1337.
    Haproxy,
    /// `clients/conformance/blocking_proxy.py`: blocking sockets, a thread
    /// per direction, `--proxy external`, as uid 1337.
    BlockingPy,
}

impl Proxy {
    pub const ALL: [Self; 3] = [Self::Builtin, Self::Haproxy, Self::BlockingPy];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Haproxy => "haproxy",
            Self::BlockingPy => "blocking-py",
        }
    }
}

/// The `CONFORMANCE-AXES` lines: the names of the table's rows and
/// columns, in order, for `cargo xtask conformance`.
#[must_use]
pub fn axes_lines() -> [String; 4] {
    let line =
        |axis: &str, names: &[&str]| format!("CONFORMANCE-AXES\t{axis}\t{}", names.join("\t"));
    [
        line("clients", &Client::ALL.map(Client::name)),
        line("scenarios", &Scenario::ALL.map(Scenario::name)),
        line("directions", &Direction::ALL.map(Direction::name)),
        line("proxies", &Proxy::ALL.map(Proxy::name)),
    ]
}

/// One cell of the table, both modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    pub client: Client,
    pub scenario: Scenario,
    pub direction: Direction,
    pub proxy: Proxy,
}

impl Cell {
    /// What the client must see, in both modes: what it sees over plain
    /// TCP through that proxy (iptables mode is the reference).
    #[must_use]
    pub fn expectation(&self) -> Expect {
        match (self.scenario, self.proxy) {
            // HAProxy passes an upstream's reset on as a close (its
            // behaviour with iptables alike: it never aborts a client
            // connection because the server did).
            (Scenario::RstBlocked | Scenario::RstMid, Proxy::Haproxy) => Expect::Truncated,
            (Scenario::RstBlocked | Scenario::RstMid, _) => Expect::Reset,
            _ => Expect::Complete,
        }
    }

    /// The machine-readable line for `mode` (tabs and newlines in `result`
    /// become spaces).
    #[must_use]
    pub fn line(&self, mode: RedirectMode, result: &str) -> String {
        format!(
            "CONFORMANCE\t{}\t{}\t{}\t{}\t{}\t{}",
            self.client.name(),
            self.scenario.name(),
            self.direction.name(),
            self.proxy.name(),
            mode.arg(),
            result.replace(['\t', '\n', '\r'], " ")
        )
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} via {}",
            self.client.name(),
            self.scenario.name(),
            self.direction.name(),
            self.proxy.name()
        )
    }
}

/// What the client must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The whole exchange, byte-exact, and a clean end.
    Complete,
    /// ECONNRESET ("connection reset by peer"), never EAGAIN, never a
    /// clean end of stream.
    Reset,
    /// A clean end of stream before the end (what a proxy that turns a
    /// reset into a close gives), never EAGAIN, never a hang.
    Truncated,
}

/// How an exchange ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Complete.
    Ok,
    /// A clean end of stream before the end.
    Eof,
    /// ECONNRESET.
    Reset,
    /// EAGAIN / EWOULDBLOCK on a blocking socket.
    Eagain,
    /// Anything else (the detail says what).
    Error,
    /// No end before the cell's deadline: the client was killed (or its
    /// socket shut down).
    Hung,
}

impl End {
    /// The `STATUS` word of a client's `RESULT` line.
    #[must_use]
    pub fn parse(word: &str) -> Self {
        match word {
            "ok" => Self::Ok,
            "eof" => Self::Eof,
            "reset" => Self::Reset,
            "eagain" => Self::Eagain,
            _ => Self::Error,
        }
    }
}

/// What a client reported, or what the harness saw of it.
#[derive(Debug, Clone)]
pub struct Observation {
    pub end: End,
    /// Bytes of the body (or echo, or reply) received.
    pub bytes: u64,
    /// Whether those bytes are the expected ones (for a complete exchange).
    pub exact: bool,
    /// The failing call and error, or other context.
    pub detail: String,
}

impl Observation {
    #[must_use]
    pub fn error(detail: impl Into<String>) -> Self {
        Self {
            end: End::Error,
            bytes: 0,
            exact: false,
            detail: detail.into(),
        }
    }

    #[must_use]
    pub fn hung(limit: Duration, detail: impl Into<String>) -> Self {
        Self {
            end: End::Hung,
            bytes: 0,
            exact: false,
            detail: format!("no end within {} s: {}", limit.as_secs(), detail.into()),
        }
    }
}

/// `ok`, or the difference from the expectation in a few words.
///
/// `want` is the length a complete exchange receives; `server` is what the
/// server saw of the cell's connections.
pub fn judge(
    cell: Cell,
    obs: &Observation,
    want: u64,
    server: &upstream::Record,
) -> Result<(), String> {
    let client = client_difference(cell, obs, want);
    let server = server_difference(cell, obs, server);
    match (client, server) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(c), Ok(())) => Err(c),
        (Ok(()), Err(s)) => Err(format!("server: {s}")),
        (Err(c), Err(s)) => Err(format!("server: {s}; client: {c}")),
    }
}

fn client_difference(cell: Cell, obs: &Observation, want: u64) -> Result<(), String> {
    let got = obs.bytes;
    let failed = obs.detail.split(':').next().unwrap_or("").trim();
    let blocking = if failed.contains("write") || failed.contains("send") {
        "send"
    } else {
        "recv"
    };
    match (cell.expectation(), obs.end) {
        (_, End::Hung) => Err(format!("hung ({})", obs.detail)),
        (Expect::Truncated, End::Ok) => Err("complete instead of a clean EOF".into()),
        (Expect::Truncated, End::Reset) => Err("ECONNRESET instead of a clean EOF".into()),
        (Expect::Truncated, End::Eagain) => Err(format!(
            "EAGAIN on a blocking {blocking} instead of a clean EOF"
        )),
        (Expect::Truncated, End::Error) => {
            Err(format!("{} instead of a clean EOF", short(&obs.detail)))
        }
        (Expect::Complete, End::Ok) if got != want => Err(format!("{got} bytes, {want} expected")),
        (Expect::Complete, End::Ok) if !obs.exact => Err(format!("bytes differ ({got} of {want})")),
        (Expect::Complete, End::Ok)
        | (Expect::Reset, End::Reset)
        | (Expect::Truncated, End::Eof) => Ok(()),
        (Expect::Complete, End::Eof) => Err(format!("truncated at {got} of {want} (clean EOF)")),
        (Expect::Complete, End::Reset) => Err(format!("truncated at {got} of {want} (ECONNRESET)")),
        (Expect::Complete, End::Eagain) => Err(format!(
            "EAGAIN on a blocking {blocking} at {got} of {want}"
        )),
        (Expect::Complete, End::Error) => {
            Err(format!("error at {got} of {want}: {}", short(&obs.detail)))
        }
        (Expect::Reset, End::Ok) => Err("complete instead of ECONNRESET".into()),
        (Expect::Reset, End::Eof) => Err("clean EOF instead of ECONNRESET".into()),
        (Expect::Reset, End::Eagain) => Err(format!(
            "EAGAIN on a blocking {blocking} instead of ECONNRESET"
        )),
        (Expect::Reset, End::Error) => Err(format!("{} instead of ECONNRESET", short(&obs.detail))),
    }
}

/// What the server saw that a conforming exchange does not give: a
/// blocking call that failed with EAGAIN (the app is the server, inbound),
/// bytes it received that differ, a connection that did not come through
/// the proxy.
fn server_difference(
    cell: Cell,
    obs: &Observation,
    server: &upstream::Record,
) -> Result<(), String> {
    if let Some(call) = server.eagain.first() {
        return Err(format!("EAGAIN on a blocking {call}"));
    }
    if cell.direction == Direction::Inbound
        && let Some(peer) = server.peers.iter().find(|p| **p != upstream::PASSTHROUGH)
    {
        return Err(format!("reached from {peer}, not through the proxy"));
    }
    let uploads = matches!(
        cell.scenario,
        Scenario::Upload | Scenario::Duplex | Scenario::HalfClose
    );
    if uploads && obs.end == End::Ok {
        let sent = cell.scenario.size() as u64;
        if let Some(at) = server.mismatch_at {
            return Err(format!("received bytes differ at {at}"));
        }
        if server.received != sent {
            return Err(format!("received {} of {sent}", server.received));
        }
    }
    Ok(())
}

/// The first words of an error detail, for a table cell.
fn short(detail: &str) -> String {
    const MAX: usize = 60;
    let d = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    if d.len() <= MAX {
        d
    } else {
        let mut end = MAX;
        while !d.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &d[..end])
    }
}
