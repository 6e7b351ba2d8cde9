//! The node agent's requests and answers, one line of JSON each way on its
//! unix socket, and the client that `enroll`, `unenroll` and `pods` use.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::rules::{CaptureRules, RuleArgs};

/// Where the node agent listens, by default: [`SOCKET_NAME`] in the
/// control directory (`cleanup` looks there to tell a live node agent's
/// pins from a dead one's).
pub const DEFAULT_SOCKET: &str = "/run/mesh-redirect/node.sock";
/// The node socket's file name.
pub const SOCKET_NAME: &str = "node.sock";
/// The enrolled pods, next to the socket: what a restarted agent re-adopts.
pub const STATE_NAME: &str = "node-pods.json";

/// The longest request line the agent reads (a rule list of 4096 ports or
/// CIDRs fits many times over).
pub const MAX_REQUEST: u64 = 1 << 20;

/// What `enroll` and `unenroll` get while a new node agent takes over
/// (the CNI plugin asks again).
pub const UPGRADING: &str = "a new node agent is taking over: retry in a moment";

/// What a request gets from an agent that is stopping.
pub const STOPPING: &str = "the node agent is stopping";

/// How long a client waits for the agent's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to the node agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Serve a pod: capture its namespace's connects with a proxy of its
    /// own inside it. Enrolling an enrolled namespace again answers what is
    /// in force (idempotent).
    Enroll(Box<Enrollment>),
    /// Stop serving a pod, found by namespace or container; an unknown one
    /// is not an error (it may never have been enrolled).
    Unenroll(PodRef),
    /// Every pod served.
    Pods,
    /// A new node agent takes over (see [`super::handover`]).
    Takeover,
}

/// Which pod, and what to capture of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Enrollment {
    /// The pod's network namespace (a bind mount such as
    /// `/var/run/netns/NAME`, or `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// `namespace/name` of a Kubernetes pod, for `pods` and the logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The runtime's container (sandbox) id, to unenroll by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The capture rules, as `run` takes them (istio's pod annotations).
    #[serde(default)]
    pub rules: RuleArgs,
    /// The pod runs its own proxy (as `run --proxy external`): the agent
    /// opens no listener there, and captured connects reach whatever
    /// listens on the outbound port inside the pod. It keeps serving them
    /// while the node agent is down or restarting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_proxy: Option<ExternalProxy>,
    /// DNS capture (istio's `--redirect-dns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<PodDns>,
}

/// A pod's DNS capture, istio's way: UDP and TCP port 53 to its resolvers
/// (or to any address) go to the DNS proxy the pod runs on 127.0.0.1 /
/// `[::1]` (the node's `--dns-proxy-port`, istio-agent's 15053), whose own
/// queries are not captured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDns {
    /// The pod's resolvers (its `resolv.conf`'s nameservers); the node
    /// agent cannot see the pod's files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<std::net::IpAddr>,
    /// Every port-53 destination (istio's `--capture-all-dns`).
    #[serde(default)]
    pub capture_all: bool,
    /// The DNS proxy runs as this uid (istio-agent's 1337).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The DNS proxy runs with this gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// `enroll`: which pod, and what to capture of it.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// The pod's network namespace.
    #[arg(long, value_name = "PATH")]
    pub netns: PathBuf,
    /// `namespace/name`, for `pods` and the logs.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub pod: Option<String>,
    /// The runtime's container (sandbox) id, to unenroll by.
    #[arg(long, value_name = "ID")]
    pub container_id: Option<String>,
    #[command(flatten)]
    pub rules: RuleArgs,
    /// The pod runs its own proxy on the outbound port: the agent opens
    /// none there.
    #[arg(long)]
    pub external_proxy: bool,
    /// The pod's own proxy runs as this uid (its connects are not
    /// captured).
    #[arg(long, value_name = "UID", requires = "external_proxy")]
    pub proxy_uid: Option<u32>,
    /// The pod's own proxy runs with this gid (its connects are not
    /// captured).
    #[arg(long, value_name = "GID", requires = "external_proxy")]
    pub proxy_gid: Option<u32>,
    #[command(flatten)]
    pub dns: DnsArgs,
}

impl EnrollArgs {
    /// The request's body.
    #[must_use]
    pub fn enrollment(self) -> Enrollment {
        Enrollment {
            netns: self.netns,
            pod: self.pod,
            container_id: self.container_id,
            rules: self.rules,
            external_proxy: self.external_proxy.then_some(ExternalProxy {
                uid: self.proxy_uid,
                gid: self.proxy_gid,
            }),
            dns: self.dns.pod_dns(),
        }
    }
}

/// `enroll`'s DNS switches, as `run` has them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DnsArgs {
    /// Capture the pod's DNS (istio's `--redirect-dns`): UDP and TCP port
    /// 53 to `--dns-servers` go to the DNS proxy the pod runs on 127.0.0.1 /
    /// `[::1]` (the node's `--dns-proxy-port`).
    #[arg(long)]
    pub redirect_dns: bool,
    /// With `--redirect-dns`: every port-53 destination, not only the
    /// resolvers.
    #[arg(long, requires = "redirect_dns")]
    pub capture_all_dns: bool,
    /// The pod's resolvers (comma-separated IP addresses; the nameservers of
    /// its resolv.conf).
    #[arg(long, value_name = "IPS", requires = "redirect_dns", value_parser = crate::rules::List::<std::net::IpAddr>::parse)]
    pub dns_servers: Option<crate::rules::List<std::net::IpAddr>>,
    /// The DNS proxy runs as this uid: its own queries are not captured.
    #[arg(long, value_name = "UID", requires = "redirect_dns")]
    pub dns_proxy_uid: Option<u32>,
    /// The DNS proxy runs with this gid: its own queries are not captured.
    #[arg(long, value_name = "GID", requires = "redirect_dns")]
    pub dns_proxy_gid: Option<u32>,
}

impl DnsArgs {
    /// The enrollment's DNS capture, if asked.
    #[must_use]
    pub fn pod_dns(self) -> Option<PodDns> {
        self.redirect_dns.then(|| PodDns {
            servers: self.dns_servers.map(|l| l.0).unwrap_or_default(),
            capture_all: self.capture_all_dns,
            uid: self.dns_proxy_uid,
            gid: self.dns_proxy_gid,
        })
    }
}

/// How a pod's own proxy is told apart: its connections are never
/// captured (nor are those with the node's proxy mark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalProxy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A pod, by namespace or by container id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// A pod the node agent serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub netns: PathBuf,
    pub netns_cookie: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Where its proxy listens, inside its namespace (127.0.0.1).
    pub outbound_port: u16,
    /// Where its proxy receives inbound connections, inside its namespace;
    /// none: inbound connections are not captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_port: Option<u16>,
    pub rules: CaptureRules,
    /// Its own proxy, if it runs one (the counters are then the agent's
    /// none: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_proxy: Option<ExternalProxy>,
    /// Its DNS capture, if asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<PodDns>,
    /// Connections its proxy has accepted so far.
    pub connections: u64,
    /// Of those, still open.
    pub open: u64,
}

impl PodInfo {
    /// One line for a table.
    #[must_use]
    pub fn render_line(&self) -> String {
        let served = match self.external_proxy {
            Some(_) => "its own proxy".to_owned(),
            None => format!("{} connections ({} open)", self.connections, self.open),
        };
        format!(
            "{:<24} {:<40} netns {:<12} {served}",
            self.pod.as_deref().unwrap_or("-"),
            self.netns.display(),
            self.netns_cookie,
        )
    }
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    /// The pod enrolled (or already enrolled) and what is in force.
    Enrolled(PodInfo),
    /// The pod unenrolled; `None`: it was not enrolled.
    Unenrolled(Option<PodInfo>),
    Pods(Vec<PodInfo>),
}

impl Answer {
    /// As lines for a terminal.
    #[must_use]
    pub fn render(&self) -> String {
        match self {
            Self::Enrolled(p) => format!("enrolled {}\n", p.render_line()),
            Self::Unenrolled(Some(p)) => format!("unenrolled {}\n", p.render_line()),
            Self::Unenrolled(None) => "not enrolled: nothing to do\n".to_owned(),
            Self::Pods(pods) if pods.is_empty() => "no pods enrolled\n".to_owned(),
            Self::Pods(pods) => pods.iter().map(|p| p.render_line() + "\n").collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("node agent socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node agent socket {path}: unreadable answer {answer:?}: {reason}")]
    Unreadable {
        path: PathBuf,
        answer: String,
        reason: String,
    },
    /// The agent refused the request, saying why.
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` to the node agent at `socket`; its answer.
pub fn ask(socket: &Path, request: &Request) -> Result<Answer, ApiError> {
    ask_with_timeout(socket, request, ANSWER_TIMEOUT)
}

/// [`ask`], waiting at most `timeout` for the answer.
pub fn ask_with_timeout(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Answer, ApiError> {
    let io_err = |source| ApiError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let line = serde_json::to_string(request).expect("requests serialize");
    // An agent that refuses the caller answers without reading: its answer
    // says why, even if our request could not be written.
    let sent = stream.write_all(format!("{line}\n").as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(io_err(e)),
        (Ok(()), Ok(_)) => {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without an answer",
            )));
        }
    }
    let reply: Result<Answer, String> =
        serde_json::from_str(answer.trim()).map_err(|e| ApiError::Unreadable {
            path: socket.to_owned(),
            answer: answer.trim().to_owned(),
            reason: e.to_string(),
        })?;
    reply.map_err(ApiError::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_tagged_json_line() {
        let r = Request::Enroll(Box::new(Enrollment {
            netns: "/var/run/netns/a".into(),
            pod: Some("default/a".into()),
            ..Enrollment::default()
        }));
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.starts_with(r#"{"op":"enroll","netns":"/var/run/netns/a""#),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let back: Request = serde_json::from_str(&line).unwrap();
        assert!(matches!(back, Request::Enroll(e) if e.pod.as_deref() == Some("default/a")));
        let pods: Request = serde_json::from_str(r#"{"op":"pods"}"#).unwrap();
        assert!(matches!(pods, Request::Pods));
        let by_id: Request =
            serde_json::from_str(r#"{"op":"unenroll","container_id":"abc"}"#).unwrap();
        assert!(matches!(by_id, Request::Unenroll(p) if p.container_id.as_deref() == Some("abc")));
        // Rules as `run` takes them.
        let with_rules: Request = serde_json::from_str(
            r#"{"op":"enroll","netns":"/x","rules":{"outbound-ports-exclude":"9000"}}"#,
        )
        .unwrap();
        let Request::Enroll(e) = with_rules else {
            panic!("an enrollment")
        };
        let rules = e.rules.apply_to(&CaptureRules::default()).unwrap();
        assert_eq!(rules.outbound_exclude_ports, vec![9000]);
    }
}
