//! The CNI plugin: a chained plugin (CNI spec 1.0/1.1) that enrolls each
//! pod with the node agent as the container runtime creates it.
//!
//! The runtime runs it as `mesh-redirect-cni` (a copy or link of this
//! binary; `mesh-redirect cni` is the same) with `CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` in the
//! environment and the network configuration on stdin, `prevResult`
//! included; it prints `prevResult` unchanged (or an error result) on
//! stdout.
//!
//! Configuration keys (besides the spec's `cniVersion`, `name`, `type`):
//! - `socket`: the node agent's socket (default [`DEFAULT_SOCKET`]);
//! - `failPolicy`: `closed` (default: with the node agent unreachable, `ADD`
//!   fails and the pod does not start unmeshed) or `open` (the pod starts,
//!   its enrollment is queued in `pendingDir` and the agent enrolls it when
//!   it returns);
//! - `pendingDir`: default [`DEFAULT_PENDING_DIR`];
//! - `timeoutSeconds`: how long to wait for the agent (default 5);
//! - `excludeNamespaces`: pods of these Kubernetes namespaces are left
//!   alone (istio-cni's; `install-cni` writes `kube-system`).
//!
//! Per pod, like istio's annotations, from `CNI_ARGS` (`KEY=VALUE;...`):
//! `MESH_REDIRECT=off` leaves the pod alone; `INCLUDE_OUTBOUND_IP_RANGES`,
//! `EXCLUDE_OUTBOUND_IP_RANGES`, `INCLUDE_OUTBOUND_PORTS`,
//! `EXCLUDE_OUTBOUND_PORTS`, `INCLUDE_INBOUND_PORTS` (`*` by default;
//! empty: no inbound capture), `EXCLUDE_INBOUND_PORTS` (comma-separated, as
//! `-i`/`-x`/`-q`/`-o`/`-b`/`-d`);
//! `MESH_REDIRECT_PROXY=external` with `MESH_REDIRECT_PROXY_UID`/`_GID`:
//! the pod runs its own proxy, as `run --proxy external`;
//! `MESH_REDIRECT_DNS=on` (with `MESH_REDIRECT_DNS_SERVERS`, the pod's
//! resolvers) or `=all`, with `MESH_REDIRECT_DNS_UID`/`_GID` naming its DNS
//! proxy: DNS capture, as `run --redirect-dns` (`--capture-all-dns`).
//! `K8S_POD_NAMESPACE`/`K8S_POD_NAME` name the pod.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::api::{
    self, Answer, ApiError, DEFAULT_SOCKET, Enrollment, ExternalProxy, PodDns, PodRef, Request,
};
use crate::rules::{List, RuleArgs, Selection};

/// Where enrollments wait while the node agent is down (`failPolicy: open`).
pub const DEFAULT_PENDING_DIR: &str = "/run/mesh-redirect/pending";

/// The spec versions this plugin speaks.
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's error codes we return.
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Ours (100 and up are the plugin's): the node agent refused the pod.
    pub const REFUSED: u32 = 100;
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// The plugin's part of the network configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    cni_version: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    fail_policy: FailPolicy,
    #[serde(default)]
    pending_dir: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    /// Pods of these Kubernetes namespaces (`K8S_POD_NAMESPACE`) are left
    /// alone, as istio-cni's `excludeNamespaces`.
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    #[serde(default)]
    prev_result: Option<Value>,
}

impl Config {
    /// Whether the pod these CNI args name is not ours to enroll
    /// (`MESH_REDIRECT=off`, or an excluded namespace).
    fn leaves_alone(&self, args: &BTreeMap<String, String>) -> bool {
        args.get("MESH_REDIRECT").map(String::as_str) == Some("off")
            || args
                .get("K8S_POD_NAMESPACE")
                .is_some_and(|ns| self.exclude_namespaces.contains(ns))
    }
}

/// What `ADD` does while the node agent does not answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    #[default]
    Closed,
    Open,
}

/// What the runtime gives in the environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl Env {
    #[must_use]
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// Runs one CNI command: what to print on stdout, and whether it is an
/// error (the process then exits non-zero).
pub fn main(env: &Env, stdin: &mut dyn std::io::Read) -> (String, bool) {
    match run(env, stdin) {
        Ok(out) => (out, false),
        Err(e) => (serde_json::to_string(&e).expect("errors serialize"), true),
    }
}

fn run(env: &Env, stdin: &mut dyn std::io::Read) -> Result<String, CniError> {
    let mut input = String::new();
    if env.command == "VERSION" {
        let _ = stdin.read_to_string(&mut input);
        let asked = serde_json::from_str::<Value>(&input)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
            .filter(|v| SUPPORTED.contains(&v.as_str()))
            .unwrap_or_else(|| "1.1.0".to_owned());
        return Ok(version(&asked));
    }
    stdin
        .read_to_string(&mut input)
        .map_err(|e| error("1.0.0", code::IO, "reading the network configuration", &e))?;
    let config: Config = serde_json::from_str(&input).map_err(|e| {
        error(
            "1.0.0",
            code::DECODE,
            "the network configuration is not valid CNI JSON",
            &e,
        )
    })?;
    let v = config.cni_version.clone();
    if !SUPPORTED.contains(&v.as_str()) {
        return Err(error(
            &v,
            code::INCOMPATIBLE_VERSION,
            &format!(
                "cniVersion {v} is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
            &"",
        ));
    }
    let socket = config
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let timeout = Duration::from_secs(config.timeout_seconds.unwrap_or(5));
    let newer = |min: &str| {
        error(
            &v,
            code::INCOMPATIBLE_VERSION,
            &format!("{} needs cniVersion {min} or newer, not {v}", env.command),
            &"",
        )
    };
    match env.command.as_str() {
        "ADD" => add(env, &config, &socket, timeout),
        "DEL" => del(env, &config, &socket, timeout),
        "CHECK" if !at_least(&v, "0.4.0") => Err(newer("0.4.0")),
        "STATUS" | "GC" if !at_least(&v, "1.1.0") => Err(newer("1.1.0")),
        "CHECK" => check(env, &config, &socket, timeout),
        // Nothing of ours outlives a pod's DEL but its enrollment, and the
        // node agent collects those of namespaces that are gone.
        "GC" => Ok(String::new()),
        "STATUS" => match ask_within(&socket, &Request::Pods, timeout) {
            Ok(_) => Ok(String::new()),
            // Failing open, pods may start while the agent is down.
            Err(_) if config.fail_policy == FailPolicy::Open => Ok(String::new()),
            Err(e) => Err(error(
                &v,
                code::NOT_AVAILABLE,
                "the node agent does not answer",
                &e,
            )),
        },
        other => Err(error(
            &v,
            code::INVALID_ENV,
            &format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
            &"",
        )),
    }
}

/// `DEL`: what is not there succeeds (the spec); with the agent down there
/// is nothing of the pod in it to remove, only a queued enrollment.
fn del(env: &Env, config: &Config, socket: &Path, timeout: Duration) -> Result<String, CniError> {
    let v = &config.cni_version;
    require(v, "CNI_CONTAINERID", &env.container_id)?;
    remove_pending(config, &env.container_id);
    let r = PodRef {
        netns: None,
        container_id: Some(env.container_id.clone()),
    };
    match ask_within(socket, &Request::Unenroll(r), timeout) {
        Ok(_) | Err(ApiError::Io { .. }) => Ok(String::new()),
        Err(e) => Err(error(v, code::IO, "unenrolling the pod", &e)),
    }
}

/// `CHECK`: the pod must still be enrolled (unless it opted out).
fn check(env: &Env, config: &Config, socket: &Path, timeout: Duration) -> Result<String, CniError> {
    let v = config.cni_version.as_str();
    require(v, "CNI_CONTAINERID", &env.container_id)?;
    if config.leaves_alone(&parse_args(&env.args)) {
        return Ok(String::new());
    }
    match ask_within(socket, &Request::Pods, timeout) {
        Ok(Answer::Pods(pods))
            if pods
                .iter()
                .any(|p| p.container_id.as_deref() == Some(env.container_id.as_str())) =>
        {
            Ok(String::new())
        }
        Ok(_) => Err(error(
            v,
            code::UNKNOWN_CONTAINER,
            &format!(
                "container {} is not enrolled with the node agent",
                env.container_id
            ),
            &"",
        )),
        Err(e) => Err(error(
            v,
            code::TRY_AGAIN,
            "the node agent does not answer",
            &e,
        )),
    }
}

fn add(env: &Env, config: &Config, socket: &Path, timeout: Duration) -> Result<String, CniError> {
    let v = &config.cni_version;
    require(v, "CNI_CONTAINERID", &env.container_id)?;
    require(v, "CNI_NETNS", &env.netns)?;
    let args = parse_args(&env.args);
    let result = pass_through(config);
    if config.leaves_alone(&args) {
        return Ok(result);
    }
    let enrollment = Enrollment {
        netns: PathBuf::from(&env.netns),
        pod: match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            (None, Some(name)) => Some(name.clone()),
            _ => None,
        },
        container_id: Some(env.container_id.clone()),
        rules: rules(&args).map_err(|msg| error(v, code::INVALID_CONFIG, &msg, &""))?,
        external_proxy: external_proxy(&args)
            .map_err(|msg| error(v, code::INVALID_CONFIG, &msg, &""))?,
        dns: dns(&args).map_err(|msg| error(v, code::INVALID_CONFIG, &msg, &""))?,
    };
    match ask_within(
        socket,
        &Request::Enroll(Box::new(enrollment.clone())),
        timeout,
    ) {
        Ok(_) => Ok(result),
        Err(ApiError::Io { .. }) if config.fail_policy == FailPolicy::Open => {
            queue_pending(config, &env.container_id, &enrollment)
                .map_err(|e| error(v, code::IO, "queueing the enrollment", &e))?;
            Ok(result)
        }
        Err(e @ ApiError::Io { .. }) => Err(error(
            v,
            code::TRY_AGAIN,
            "the node agent does not answer (failPolicy closed: the pod does not start unmeshed)",
            &e,
        )),
        Err(e) => Err(error(
            v,
            code::REFUSED,
            "the node agent refused the pod",
            &e,
        )),
    }
}

/// `prevResult` unchanged (at the configuration's version), or an empty
/// result when this plugin is first in the chain.
fn pass_through(config: &Config) -> String {
    let mut result = config
        .prev_result
        .clone()
        .unwrap_or_else(|| json!({"interfaces": [], "ips": []}));
    if let Some(o) = result.as_object_mut() {
        o.insert(
            "cniVersion".into(),
            Value::String(config.cni_version.clone()),
        );
    }
    serde_json::to_string(&result).expect("results serialize")
}

fn version(cni_version: &str) -> String {
    json!({"cniVersion": cni_version, "supportedVersions": SUPPORTED}).to_string()
}

/// Whether spec version `v` (one of [`SUPPORTED`]) is at least `min`.
fn at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').filter_map(|p| p.parse().ok()).collect() };
    parse(v) >= parse(min)
}

/// `KEY=VALUE;KEY=VALUE`.
fn parse_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The pod's capture rules from its CNI args.
fn rules(args: &BTreeMap<String, String>) -> Result<RuleArgs, String> {
    let get = |k: &str| args.get(k).filter(|v| !v.is_empty());
    let named = |k: &str, e: String| format!("CNI_ARGS {k}: {e}");
    Ok(RuleArgs {
        include_cidrs: get("INCLUDE_OUTBOUND_IP_RANGES")
            .map(|v| Selection::parse(v).map_err(|e| named("INCLUDE_OUTBOUND_IP_RANGES", e)))
            .transpose()?,
        exclude_cidrs: get("EXCLUDE_OUTBOUND_IP_RANGES")
            .map(|v| List::parse(v).map_err(|e| named("EXCLUDE_OUTBOUND_IP_RANGES", e)))
            .transpose()?,
        include_outbound_ports: get("INCLUDE_OUTBOUND_PORTS")
            .map(|v| List::parse(v).map_err(|e| named("INCLUDE_OUTBOUND_PORTS", e)))
            .transpose()?,
        exclude_outbound_ports: get("EXCLUDE_OUTBOUND_PORTS")
            .map(|v| List::parse(v).map_err(|e| named("EXCLUDE_OUTBOUND_PORTS", e)))
            .transpose()?,
        // Set and empty (istio's `includeInboundPorts: ""`): no inbound
        // capture.
        include_inbound_ports: args
            .get("INCLUDE_INBOUND_PORTS")
            .map(|v| Selection::parse(v).map_err(|e| named("INCLUDE_INBOUND_PORTS", e)))
            .transpose()?,
        exclude_inbound_ports: get("EXCLUDE_INBOUND_PORTS")
            .map(|v| List::parse(v).map_err(|e| named("EXCLUDE_INBOUND_PORTS", e)))
            .transpose()?,
    })
}

/// `MESH_REDIRECT_PROXY=external` (with `MESH_REDIRECT_PROXY_UID`,
/// `MESH_REDIRECT_PROXY_GID`): the pod runs its own proxy.
fn external_proxy(args: &BTreeMap<String, String>) -> Result<Option<ExternalProxy>, String> {
    let (uid, gid) = (
        id_arg(args, "MESH_REDIRECT_PROXY_UID")?,
        id_arg(args, "MESH_REDIRECT_PROXY_GID")?,
    );
    match args.get("MESH_REDIRECT_PROXY").map(String::as_str) {
        Some("external") => Ok(Some(ExternalProxy { uid, gid })),
        None | Some("" | "builtin") if uid.is_none() && gid.is_none() => Ok(None),
        None | Some("" | "builtin") => Err(
            "CNI_ARGS MESH_REDIRECT_PROXY_UID/GID name the pod's own proxy: set MESH_REDIRECT_PROXY=external".into(),
        ),
        Some(other) => Err(format!(
            "CNI_ARGS MESH_REDIRECT_PROXY: {other:?} is neither builtin nor external"
        )),
    }
}

/// A CNI arg that is an id, if set.
fn id_arg(args: &BTreeMap<String, String>, k: &str) -> Result<Option<u32>, String> {
    args.get(k)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<u32>()
                .map_err(|e| format!("CNI_ARGS {k}: {v:?} is not an id: {e}"))
        })
        .transpose()
}

/// `MESH_REDIRECT_DNS=on` (the resolvers in `MESH_REDIRECT_DNS_SERVERS`) or
/// `=all` (every port-53 destination), with `MESH_REDIRECT_DNS_UID`/`_GID`
/// naming the DNS proxy: the pod's DNS capture.
fn dns(args: &BTreeMap<String, String>) -> Result<Option<PodDns>, String> {
    let servers = args
        .get("MESH_REDIRECT_DNS_SERVERS")
        .map(|v| {
            List::<std::net::IpAddr>::parse(v)
                .map_err(|e| format!("CNI_ARGS MESH_REDIRECT_DNS_SERVERS: {e}"))
        })
        .transpose()?
        .map(|l| l.0)
        .unwrap_or_default();
    let capture_all = match args.get("MESH_REDIRECT_DNS").map(String::as_str) {
        None | Some("" | "off") => return Ok(None),
        Some("on") => false,
        Some("all") => true,
        Some(other) => {
            return Err(format!(
                "CNI_ARGS MESH_REDIRECT_DNS: {other:?} is none of on, all, off"
            ));
        }
    };
    Ok(Some(PodDns {
        servers,
        capture_all,
        uid: id_arg(args, "MESH_REDIRECT_DNS_UID")?,
        gid: id_arg(args, "MESH_REDIRECT_DNS_GID")?,
    }))
}

fn require(v: &str, name: &str, value: &str) -> Result<(), CniError> {
    if value.is_empty() {
        return Err(error(
            v,
            code::INVALID_ENV,
            &format!("{name} is not set"),
            &"",
        ));
    }
    Ok(())
}

/// Asks the node agent, within `timeout` in all: while a new node agent
/// takes over (or the old one stops with the request unanswered), it is
/// asked again until it is through.
fn ask_within(socket: &Path, request: &Request, timeout: Duration) -> Result<Answer, ApiError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let answer = api::ask_with_timeout(socket, request, left.max(Duration::from_millis(100)));
        // An agent handing over, or one that stopped with our request
        // unanswered (its successor answers on the same path).
        let again = match &answer {
            Err(ApiError::Refused(m)) => m == api::UPGRADING || m == api::STOPPING,
            Err(ApiError::Io { source, .. }) => matches!(
                source.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        };
        if !again || std::time::Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn error(version: &str, code: u32, msg: &str, details: &dyn std::fmt::Display) -> CniError {
    CniError {
        cni_version: version.to_owned(),
        code,
        msg: msg.to_owned(),
        details: details.to_string(),
    }
}

fn pending_dir(config: &Config) -> PathBuf {
    config
        .pending_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PENDING_DIR))
}

/// A container id as a file name (ids are hex, but nothing is assumed).
fn pending_file(dir: &Path, container_id: &str) -> PathBuf {
    let safe: String = container_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.json"))
}

fn queue_pending(config: &Config, container_id: &str, e: &Enrollment) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    let dir = pending_dir(config);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let file = pending_file(&dir, container_id);
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(e).expect("enrollments serialize"))?;
    std::fs::rename(tmp, file)
}

fn remove_pending(config: &Config, container_id: &str) {
    let _ = std::fs::remove_file(pending_file(&pending_dir(config), container_id));
}

/// The enrollments queued in `dir` while the node agent was down, with
/// their files. Only root's: the directory must be root's and writable by
/// no one else, each file a regular file of root's (not a link), or it is
/// ignored (enrolling is what the node socket allows root only).
pub fn pending(dir: &Path) -> Vec<(PathBuf, Enrollment)> {
    use std::os::unix::fs::MetadataExt as _;
    let trusted = |m: &std::fs::Metadata| m.uid() == 0 && m.mode() & 0o022 == 0;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && trusted(&m) => {}
        Ok(_) => {
            tracing::warn!(dir = %dir.display(), "ignoring queued enrollments: the directory is not root's alone");
            return Vec::new();
        }
        Err(_) => return Vec::new(),
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && trusted(&m)))
        .filter_map(|p| {
            let e = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a".into(),
        }
    }

    fn run_str(env: &Env, stdin: &str) -> (Value, bool) {
        let (out, failed) = main(env, &mut stdin.as_bytes());
        (serde_json::from_str(&out).unwrap_or(Value::Null), failed)
    }

    #[test]
    fn version_lists_the_spec_versions() {
        let (v, failed) = run_str(&env("VERSION"), r#"{"cniVersion":"0.4.0"}"#);
        assert!(!failed);
        assert_eq!(v["cniVersion"], "0.4.0", "the caller's version, echoed");
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED.len()
        );
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!("1.0.0"))
        );
    }

    #[test]
    fn malformed_input_gets_an_error_result_with_a_code_and_message() {
        let (v, failed) = run_str(&env("ADD"), "{not json");
        assert!(failed);
        assert_eq!(v["code"], code::DECODE);
        assert!(v["msg"].as_str().unwrap().contains("not valid CNI JSON"));
        let (v, failed) = run_str(
            &env("ADD"),
            r#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#,
        );
        assert!(failed);
        assert_eq!(v["code"], code::INCOMPATIBLE_VERSION);
        let (v, failed) = run_str(
            &env("FROB"),
            r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#,
        );
        assert!(failed);
        assert_eq!(v["code"], code::INVALID_ENV);
        let mut no_netns = env("ADD");
        no_netns.netns.clear();
        let (v, failed) = run_str(&no_netns, r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#);
        assert!(failed);
        assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"));
    }

    #[test]
    fn commands_newer_than_the_configured_version_are_refused_and_gc_succeeds() {
        let old = r#"{"cniVersion":"0.3.1","name":"n","type":"t","socket":"/nonexistent"}"#;
        for command in ["CHECK", "STATUS", "GC"] {
            let (v, failed) = run_str(&env(command), old);
            assert!(failed, "{command}");
            assert_eq!(v["code"], code::INCOMPATIBLE_VERSION, "{command}");
        }
        let new = r#"{"cniVersion":"1.1.0","name":"n","type":"t","socket":"/nonexistent"}"#;
        let (_, failed) = run_str(&env("GC"), new);
        assert!(!failed);
        let (v, failed) = run_str(&env("STATUS"), new);
        assert!(failed, "fail closed: the network is not ready");
        assert_eq!(v["code"], code::NOT_AVAILABLE);
        let open = r#"{"cniVersion":"1.1.0","name":"n","type":"t","socket":"/nonexistent","failPolicy":"open"}"#;
        let (_, failed) = run_str(&env("STATUS"), open);
        assert!(!failed, "fail open: pods may start");
    }

    #[test]
    fn an_opted_out_pod_passes_prev_result_through_unchanged() {
        let mut e = env("ADD");
        e.args.push_str(";MESH_REDIRECT=off");
        let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.88.0.5/16"}]});
        let conf = json!({"cniVersion":"1.0.0","name":"n","type":"mesh-redirect","prevResult": prev, "socket": "/nonexistent"});
        let (v, failed) = run_str(&e, &conf.to_string());
        assert!(!failed);
        assert_eq!(v, prev);
    }

    #[test]
    fn with_the_agent_down_add_fails_closed_or_queues_the_pod_when_open() {
        let conf = json!({"cniVersion":"1.0.0","name":"n","type":"mesh-redirect","socket": "/nonexistent/node.sock"});
        let (v, failed) = run_str(&env("ADD"), &conf.to_string());
        assert!(failed);
        assert_eq!(v["code"], code::TRY_AGAIN);
        let dir = std::env::temp_dir().join(format!("mr-cni-pending-{}", std::process::id()));
        let open = json!({"cniVersion":"1.0.0","name":"n","type":"mesh-redirect","socket": "/nonexistent/node.sock","failPolicy":"open","pendingDir": dir});
        let (v, failed) = run_str(&env("ADD"), &open.to_string());
        assert!(!failed, "{v}");
        let queued = pending(&dir);
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].1.pod.as_deref(), Some("default/a"));
        assert_eq!(queued[0].1.container_id.as_deref(), Some("c1"));
        // DEL with the agent down succeeds and drops the queued enrollment.
        let (_, failed) = run_str(&env("DEL"), &open.to_string());
        assert!(!failed);
        assert!(pending(&dir).is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_pod_of_an_excluded_namespace_is_left_alone() {
        // The agent is down: only leaving the pod alone can succeed.
        let conf = json!({"cniVersion":"1.0.0","name":"n","type":"mesh-redirect",
            "socket": "/nonexistent/node.sock", "excludeNamespaces": ["kube-system", "default"],
            "prevResult": {"cniVersion":"1.0.0","ips":[]}});
        for command in ["ADD", "CHECK", "DEL"] {
            let (v, failed) = run_str(&env(command), &conf.to_string());
            assert!(!failed, "{command}: {v}");
        }
        let other = json!({"cniVersion":"1.0.0","name":"n","type":"mesh-redirect",
            "socket": "/nonexistent/node.sock", "excludeNamespaces": ["kube-system"]});
        let (_, failed) = run_str(&env("ADD"), &other.to_string());
        assert!(
            failed,
            "a pod of another namespace is enrolled (and the agent is down)"
        );
    }

    #[test]
    fn rules_come_from_cni_args_and_a_bad_one_is_named() {
        let args =
            parse_args("EXCLUDE_OUTBOUND_PORTS=9000,9001;INCLUDE_OUTBOUND_IP_RANGES=10.0.0.0/8");
        let r = rules(&args).unwrap();
        let rules = r.apply_to(&crate::rules::CaptureRules::default()).unwrap();
        assert_eq!(rules.outbound_exclude_ports, vec![9000, 9001]);
        let bad = parse_args("EXCLUDE_OUTBOUND_PORTS=99999");
        assert!(rules_err(&bad).contains("EXCLUDE_OUTBOUND_PORTS"));
    }

    #[test]
    fn a_pod_with_its_own_proxy_is_named_in_cni_args() {
        let own = parse_args("MESH_REDIRECT_PROXY=external;MESH_REDIRECT_PROXY_UID=1337");
        assert_eq!(
            external_proxy(&own).unwrap(),
            Some(ExternalProxy {
                uid: Some(1337),
                gid: None
            })
        );
        assert_eq!(external_proxy(&parse_args("K8S_POD_NAME=a")).unwrap(), None);
        for (bad, named) in [
            ("MESH_REDIRECT_PROXY=sidecar", "MESH_REDIRECT_PROXY"),
            (
                "MESH_REDIRECT_PROXY=external;MESH_REDIRECT_PROXY_GID=x",
                "MESH_REDIRECT_PROXY_GID",
            ),
            (
                "MESH_REDIRECT_PROXY_UID=1337",
                "MESH_REDIRECT_PROXY=external",
            ),
        ] {
            let err = external_proxy(&parse_args(bad)).unwrap_err();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn inbound_and_dns_capture_come_from_cni_args_and_a_bad_one_is_named() {
        let none = rules(&parse_args("INCLUDE_INBOUND_PORTS=")).unwrap();
        let none = none
            .apply_to(&crate::rules::CaptureRules::default())
            .unwrap();
        assert!(
            none.inbound_include_ports.items().is_empty() && !none.inbound_include_ports.is_all()
        );
        let some = rules(&parse_args("EXCLUDE_INBOUND_PORTS=9090")).unwrap();
        let some = some
            .apply_to(&crate::rules::CaptureRules::default())
            .unwrap();
        assert!(some.inbound_include_ports.is_all());
        assert!(some.inbound_exclude_ports.contains(&9090));
        assert_eq!(dns(&parse_args("K8S_POD_NAME=a")).unwrap(), None);
        assert_eq!(
            dns(&parse_args(
                "MESH_REDIRECT_DNS=on;MESH_REDIRECT_DNS_SERVERS=10.96.0.10,fd00::a;MESH_REDIRECT_DNS_UID=1337"
            ))
            .unwrap(),
            Some(PodDns {
                servers: vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
                capture_all: false,
                uid: Some(1337),
                gid: None,
            })
        );
        assert!(
            dns(&parse_args("MESH_REDIRECT_DNS=all"))
                .unwrap()
                .unwrap()
                .capture_all
        );
        for (bad, named) in [
            ("MESH_REDIRECT_DNS=yes", "MESH_REDIRECT_DNS"),
            (
                "MESH_REDIRECT_DNS=on;MESH_REDIRECT_DNS_SERVERS=kube-dns",
                "MESH_REDIRECT_DNS_SERVERS",
            ),
            (
                "MESH_REDIRECT_DNS=on;MESH_REDIRECT_DNS_GID=x",
                "MESH_REDIRECT_DNS_GID",
            ),
            ("INCLUDE_INBOUND_PORTS=http", "INCLUDE_INBOUND_PORTS"),
        ] {
            let args = parse_args(bad);
            let err = dns(&args)
                .err()
                .or_else(|| rules(&args).err())
                .unwrap_or_default();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    fn rules_err(args: &BTreeMap<String, String>) -> String {
        rules(args).unwrap_err()
    }
}
