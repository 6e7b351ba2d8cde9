//! What the orchestrator and its worker processes (the load client and the
//! servers, both re-executions of the xtask binary) say to each other: the
//! ports, the job a client runs, and the numbers it hands back, as JSON.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Echoes every byte back (S1).
pub const ECHO_PORT: u16 = 9001;
/// HTTP/1.1: `/` answers a small body (S2, S4), `/bytes/N` N bytes with
/// their SHA-256 in `X-Sha256` (S6); `Connection: close` is honoured.
pub const HTTP_PORT: u16 = 9002;
/// Reads until EOF, then answers the byte count (u64, little endian) (S5).
pub const SINK_PORT: u16 = 9003;

/// Body of `GET /`.
pub const SMALL_BODY_LEN: usize = 128;

/// The line the server prints once it listens.
pub const SERVER_READY: &str = "bench-server ready";

/// A job for a worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Job {
    /// The servers, in the server namespace, until killed. Bodies of these
    /// sizes are prepared (and hashed) before the ready line.
    Server { body_sizes: Vec<usize> },
    /// One cell of the benchmark, in a pod's namespace and cgroup.
    Client(ClientJob),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientJob {
    pub scenario: Scenario,
    pub server: Ipv4Addr,
    /// How long the measured part runs (`Download`: ignored, see `count`).
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Scenario {
    /// S1: 1-byte request, 1-byte response, one persistent connection,
    /// closed loop.
    PingPong,
    /// S2: HTTP/1.1 keep-alive over `conns` connections, requests on a
    /// fixed timetable of `rate` per second; latency from the scheduled
    /// send time (no coordinated omission).
    HttpOpenLoop { rate: u32, conns: u32 },
    /// S4: one connection per request (`Connection: close`), one at a time.
    ConnectPerRequest,
    /// S5: writes of `write_size` bytes for the duration, then half-close
    /// and wait for the sink's byte count.
    Upload { write_size: usize },
    /// S6: `count` downloads of `size` bytes, one connection each, every
    /// body hashed and checked.
    Download { size: usize, count: u32 },
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// What a client measured over its measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientResult {
    /// Transactions, requests, connections or bodies completed.
    pub ops: u64,
    /// Payload bytes moved (S5 sent, S6 received).
    pub bytes: u64,
    pub elapsed_s: f64,
    pub latency: Option<Latency>,
    /// Packets `lo` sent in the pod's namespace during the window.
    pub lo_tx_packets: u64,
    /// `nf_conntrack_count` in the pod's namespace before and after the
    /// window (`None`: no conntrack table in this kernel).
    pub conntrack_before: Option<u64>,
    pub conntrack_after: Option<u64>,
    /// The client's own CPU time during the window (schedstat).
    pub cpu_ns: u64,
    /// Longest gap between two reads of a body (S6), microseconds.
    pub longest_stall_us: f64,
    /// Every body hash / byte count matched.
    pub integrity_ok: bool,
    /// S2: requests sent later than scheduled because their connection
    /// was still waiting for the previous response.
    pub late_sends: u64,
}
