//! A drop-in `istio-iptables`: the same flags, defaults and environment
//! variables, and for the same configuration the same `iptables-restore`
//! input, byte for byte.
//!
//! # Which istio
//!
//! The rules follow istio's `tools/istio-iptables` as of the release line
//! that writes `-A OUTPUT -j ISTIO_OUTPUT` (no `-p tcp`), starts
//! `ISTIO_OUTPUT` with `-o lo -s 127.0.0.6/32 -j RETURN`, has the
//! `ISTIO_DROP` chain, `--reconcile`/`--cleanup-only`, and no longer puts
//! owner `RETURN`s in `ISTIO_OUTPUT_DNS` (istio 1.25/1.26): the files read
//! were `pkg/capture/run.go` and `pkg/config/config.go` at commit
//! `0098d99f8e43fe516aaac5a84a131b4ce3c8b9d1` (whose rule generation is
//! identical to the later refactor that moved iptables-version detection
//! into `NewIptablesConfigurator`), `pkg/builder/iptables_builder_impl.go`
//! and `pkg/constants/constants.go` of the same line, `pkg/cmd/root.go` for
//! the flags (`pkg/flag.BindEnv`: flag `foo-bar` reads `FOO_BAR`),
//! `pkg/capture/util.go` (`VerifyIptablesState`) and
//! `pkg/dependencies/implementation.go` (backend detection). Its golden
//! file `pkg/capture/testdata/inbound-ports-wildcard-tproxy.golden` at that
//! commit is reproduced exactly by our `inbound-ports-wildcard-tproxy`
//! golden. Later istio versions fold `-o` port exclusions into one
//! `-m multiport` rule; this one writes one rule per port and protocol.
//!
//! # Where we differ, on purpose
//!
//! - Bad input is rejected, naming the flag, before anything is written:
//!   istio passes ports through unchecked, ignores malformed CIDRs ("for
//!   bug compatibility") and treats any mode other than `TPROXY` as
//!   `REDIRECT`.
//! - istio derives two inputs from the pod; both can be given explicitly
//!   (`--ipv6`, `--dns-servers-v4`/`--dns-servers-v6`) and are derived as
//!   istio does otherwise.
//! - `--exempt-mark` (and [`Config::exempt_mark`]) adds one rule, for our
//!   built-in proxy which runs as root and marks its upstream sockets.
//! - `--iptables-backend` chooses the backend; `--run-validation` is not
//!   supported.

mod generate;

pub use generate::EXEMPT_MARK_COMMENT;
pub mod pod;
#[cfg(test)]
mod tests;

use std::{fmt, net::IpAddr, path::PathBuf, process::Command, str::FromStr};

use agent_common::ports;

use super::backend::Backend;
use crate::rules::parse_cidr;
pub use crate::rules::{IpNet, Selection};

/// The `mesh-redirect iptables` command line: istio-iptables' flags, each
/// reading the environment variable istio reads for it.
///
/// Boolean flags take an optional value like Go's (`--redirect-dns`,
/// `--redirect-dns=false`); values are parsed as Go's `strconv.ParseBool`.
#[derive(Debug, Clone, clap::Args)]
// Like Go's pflag: a flag given twice takes the last value.
#[command(args_override_self = true)]
pub struct IstioIptablesArgs {
    /// Port to which all outbound TCP traffic is redirected (the proxy's
    /// outbound listener). istio reads no environment variable for this one.
    #[arg(
        short = 'p',
        long = "envoy-port",
        value_name = "PORT",
        default_value_t = ports::OUTBOUND.to_string()
    )]
    pub envoy_port: String,

    /// Port to which all inbound TCP traffic to the pod is redirected.
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        env = "INBOUND_CAPTURE_PORT",
        value_name = "PORT",
        default_value_t = ports::INBOUND.to_string()
    )]
    pub inbound_capture_port: String,

    /// The istio tunnel (HBONE) port for inbound TCP traffic; never redirected.
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        env = "INBOUND_TUNNEL_PORT",
        value_name = "PORT",
        default_value_t = ports::HBONE.to_string()
    )]
    pub inbound_tunnel_port: String,

    /// Comma separated UIDs whose traffic is not redirected (the proxy's).
    /// Default: the uid of user `$ENVOY_USER` (istio-proxy), else 1337.
    #[arg(
        short = 'u',
        long = "proxy-uid",
        env = "PROXY_UID",
        value_name = "UIDS",
        default_value = "",
        hide_default_value = true
    )]
    pub proxy_uid: String,

    /// Comma separated GIDs whose traffic is not redirected. Default: the
    /// same as -u.
    #[arg(
        short = 'g',
        long = "proxy-gid",
        env = "PROXY_GID",
        value_name = "GIDS",
        default_value = "",
        hide_default_value = true
    )]
    pub proxy_gid: String,

    /// How inbound connections reach the proxy: REDIRECT (default) or TPROXY.
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        value_name = "MODE",
        default_value = "",
        hide_default_value = true
    )]
    pub inbound_interception_mode: String,

    /// Comma separated inbound ports redirected to the proxy; "*" for all,
    /// empty for none.
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        value_name = "PORTS",
        default_value = "",
        hide_default_value = true
    )]
    pub inbound_ports: String,

    /// Comma separated inbound ports never redirected; only applies with -b "*".
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        value_name = "PORTS",
        default_value = "",
        hide_default_value = true
    )]
    pub local_exclude_ports: String,

    /// Comma separated interfaces whose traffic, in or out, is never captured.
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        value_name = "IFACES",
        default_value = "",
        hide_default_value = true
    )]
    pub exclude_interfaces: String,

    /// Comma separated CIDRs whose outbound traffic is redirected; "*" for
    /// all, empty for none.
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        env = "ISTIO_SERVICE_CIDR",
        value_name = "CIDRS",
        default_value = "",
        hide_default_value = true
    )]
    pub service_cidr: String,

    /// Comma separated CIDRs whose outbound traffic is never redirected.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        value_name = "CIDRS",
        default_value = "",
        hide_default_value = true
    )]
    pub service_exclude_cidr: String,

    /// Comma separated outbound ports always redirected, whatever the destination.
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        value_name = "PORTS",
        default_value = "",
        hide_default_value = true
    )]
    pub outbound_ports: String,

    /// Comma separated outbound ports never redirected.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        value_name = "PORTS",
        default_value = "",
        hide_default_value = true
    )]
    pub local_outbound_ports_exclude: String,

    /// Comma separated virtual interfaces whose inbound traffic (from VMs)
    /// is treated as outbound.
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        value_name = "IFACES",
        default_value = "",
        hide_default_value = true
    )]
    pub kube_virt_interfaces: String,

    /// Packet mark of inbound connections in TPROXY mode (decimal).
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        env = "ISTIO_INBOUND_TPROXY_MARK",
        value_name = "MARK",
        default_value = "1337"
    )]
    pub inbound_tproxy_mark: String,

    /// Routing table that delivers TPROXY-marked packets locally (decimal).
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        value_name = "TABLE",
        default_value = "133"
    )]
    pub inbound_tproxy_route_table: String,

    /// Print the iptables-restore input (IPv4, then IPv6 if on) on stdout
    /// and change nothing.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub dry_run: Option<bool>,

    /// Capture DNS (TCP and UDP port 53 to the pod's resolvers) to
    /// istio-agent on 15053. Also read from `ISTIO_META_DNS_CAPTURE`.
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub redirect_dns: Option<bool>,

    /// With --redirect-dns, capture DNS to any address, not only the pod's
    /// resolvers.
    #[arg(long = "capture-all-dns", env = "CAPTURE_ALL_DNS", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub capture_all_dns: Option<bool>,

    /// Drop packets conntrack considers INVALID instead of letting them
    /// reset connections. Also read from `INVALID_DROP`.
    #[arg(long = "drop-invalid", env = "DROP_INVALID", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub drop_invalid: Option<bool>,

    /// Dual-stack pod: IPv6 rules are on when the pod has any IPv6 address
    /// (without it, only when its first address is IPv6). Also read from
    /// `ISTIO_DUAL_STACK`.
    #[arg(long = "dual-stack", env = "DUAL_STACK", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub dual_stack: Option<bool>,

    /// Remove the rules (our chains and the jumps into them) and install nothing.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub cleanup_only: Option<bool>,

    /// Replace different rules already installed instead of failing.
    #[arg(long = "reconcile", env = "RECONCILE", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub reconcile: Option<bool>,

    /// Run iptables-restore even if the rules appear to be in place (it
    /// then fails if our chains exist).
    #[arg(long = "force-apply", env = "FORCE_APPLY", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub force_apply: Option<bool>,

    /// Skip applying rules (and routes) altogether.
    #[arg(long = "skip-rule-apply", env = "SKIP_RULE_APPLY", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub skip_rule_apply: Option<bool>,

    /// istio's post-install validation; not supported (fails if true).
    #[arg(long = "run-validation", env = "RUN_VALIDATION", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub run_validation: Option<bool>,

    /// Port of istio's validation listener (only used by --run-validation).
    #[arg(
        long = "iptables-probe-port",
        env = "IPTABLES_PROBE_PORT",
        value_name = "PORT",
        default_value = "15002"
    )]
    pub iptables_probe_port: String,

    /// Timeout of istio's validation (only used by --run-validation).
    #[arg(
        long = "probe-timeout",
        env = "PROBE_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s"
    )]
    pub probe_timeout: String,

    /// Network namespace to apply the rules in (a file such as
    /// /var/run/netns/NAME or /proc/PID/ns/net). Default: our own.
    #[arg(
        long = "network-namespace",
        env = "NETWORK_NAMESPACE",
        value_name = "PATH",
        default_value = "",
        hide_default_value = true
    )]
    pub network_namespace: String,

    /// istio-cni mode (pod-scoped iptables lock); accepted, no effect here:
    /// commands always run inside the target namespace.
    #[arg(long = "cni-mode", env = "CNI_MODE", value_name = "BOOL",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub cni_mode: Option<bool>,

    /// Groups whose outbound traffic is redirected: names or GIDs, "*" for
    /// all. (istio reads only the environment variable; the flag is ours.)
    #[arg(
        long = "outbound-owner-groups",
        env = "ISTIO_OUTBOUND_OWNER_GROUPS",
        value_name = "GROUPS",
        default_value = "*"
    )]
    pub outbound_owner_groups: String,

    /// Groups whose outbound traffic is never redirected; only applies when
    /// all groups are. (istio reads only the environment variable.)
    #[arg(
        long = "outbound-owner-groups-exclude",
        env = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        value_name = "GROUPS",
        default_value = "",
        hide_default_value = true
    )]
    pub outbound_owner_groups_exclude: String,

    /// IPv4 loopback CIDR of the app's own loopback traffic, /8 to /32.
    /// (istio reads only the environment variable.)
    #[arg(
        long = "outbound-ipv4-loopback-cidr",
        env = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        value_name = "CIDR",
        default_value = "127.0.0.1/32"
    )]
    pub outbound_ipv4_loopback_cidr: String,

    /// istio's logging options, which its injector passes
    /// (`--log_output_level=default:info`); accepted, no effect here: the
    /// log level is `RUST_LOG`'s.
    #[arg(long = "log_output_level", value_name = "LEVELS", hide = true)]
    pub log_output_level: Option<String>,

    /// See `--log_output_level`; accepted, no effect.
    #[arg(long = "log_as_json", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, hide = true)]
    pub log_as_json: Option<bool>,

    /// IPv6 rules on or off. Default: derived from the pod's addresses as
    /// istio does (see --dual-stack). Not an istio flag.
    #[arg(long = "ipv6", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool)]
    pub ipv6: Option<bool>,

    /// Comma separated IPv4 DNS servers whose traffic --redirect-dns
    /// captures. Default: the nameservers of /etc/resolv.conf, as istio
    /// reads them. Not an istio flag.
    #[arg(long = "dns-servers-v4", value_name = "IPS")]
    pub dns_servers_v4: Option<String>,

    /// Comma separated IPv6 DNS servers (see --dns-servers-v4). Not an
    /// istio flag.
    #[arg(long = "dns-servers-v6", value_name = "IPS")]
    pub dns_servers_v6: Option<String>,

    /// Connections whose socket carries this `SO_MARK` are never redirected:
    /// adds `-A ISTIO_OUTPUT -m mark --mark MARK -m comment --comment mesh-redirect -j RETURN` first in
    /// `ISTIO_OUTPUT`. Not an istio flag (for a proxy that runs as root).
    #[arg(
        long = "exempt-mark",
        env = "MESH_REDIRECT_EXEMPT_MARK",
        value_name = "MARK"
    )]
    pub exempt_mark: Option<String>,

    /// iptables backend: legacy, nft or plain (the unsuffixed binaries).
    /// Default: legacy if it already holds rules, else nft, else plain, as
    /// istio detects it. Not an istio flag.
    #[arg(
        long = "iptables-backend",
        alias = "force-iptables-binary",
        env = "MESH_REDIRECT_IPTABLES_BACKEND",
        value_name = "BACKEND"
    )]
    pub iptables_backend: Option<Backend>,
}

/// Parses a boolean as Go's `strconv.ParseBool` does.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true/false, 1/0, t/f)")),
    }
}

/// How inbound connections reach the proxy (`-m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterceptionMode {
    /// nat `REDIRECT` to the inbound capture port.
    #[default]
    Redirect,
    /// mangle `TPROXY`, keeping the original source address.
    Tproxy,
}

/// A port or an inclusive range, as `--dport` takes it (`80`, `8000:8080`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    Port(u16),
    Range(u16, u16),
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Port(p) => write!(f, "{p}"),
            Self::Range(a, b) => write!(f, "{a}:{b}"),
        }
    }
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| match p.parse::<u16>() {
            Ok(0) => Err(format!("port {p} is out of range 1-65535")),
            Ok(n) if p.starts_with('+') => Err(format!("{p:?} is not a port number (got {n})")),
            Ok(n) => Ok(n),
            Err(_) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                Err(format!("port {p} is out of range 1-65535"))
            }
            Err(_) => Err(format!("{p:?} is not a port number")),
        };
        match s.split_once(':') {
            None => port(s).map(Self::Port),
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(format!("port range {s} is backwards"));
                }
                Ok(Self::Range(a, b))
            }
        }
    }
}

/// Whose outbound traffic is captured by group (`ISTIO_OUTBOUND_OWNER_GROUPS`
/// and `..._EXCLUDE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    /// All groups but these (include `*`).
    AllExcept(Vec<String>),
    /// Only these groups (names or GIDs); empty captures nobody.
    Only(Vec<String>),
}

impl Default for OwnerGroups {
    fn default() -> Self {
        Self::AllExcept(Vec::new())
    }
}

/// A validated istio-iptables configuration. [`Default`] is istio-iptables'
/// own defaults (with the proxy uid and gid 1337, istio's fallback when
/// `$ENVOY_USER` does not exist, and IPv4 only).
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "istio-iptables' own switches, one field each, as in its config.Config"
)]
pub struct Config {
    /// `-p`: the proxy's outbound port.
    pub proxy_port: u16,
    /// `-z`: the proxy's inbound port.
    pub inbound_capture_port: u16,
    /// `-e`: the inbound tunnel (HBONE) port.
    pub inbound_tunnel_port: u16,
    /// `-u`: the proxy's uids.
    pub proxy_uids: Vec<u32>,
    /// `-g`: the proxy's gids.
    pub proxy_gids: Vec<u32>,
    /// `-m`.
    pub inbound_interception_mode: InterceptionMode,
    /// `-t`.
    pub inbound_tproxy_mark: u32,
    /// `-r`.
    pub inbound_tproxy_route_table: u32,
    /// `-b`.
    pub inbound_ports_include: Selection<PortSpec>,
    /// `-d` (only used with `-b *`).
    pub inbound_ports_exclude: Vec<PortSpec>,
    /// `-q`.
    pub outbound_ports_include: Vec<PortSpec>,
    /// `-o`.
    pub outbound_ports_exclude: Vec<PortSpec>,
    /// `-i`.
    pub outbound_ip_ranges_include: Selection<IpNet>,
    /// `-x`.
    pub outbound_ip_ranges_exclude: Vec<IpNet>,
    /// `-k`.
    pub kube_virt_interfaces: Vec<String>,
    /// `-c`.
    pub exclude_interfaces: Vec<String>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` / `..._EXCLUDE`.
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: an IPv4 loopback CIDR, /8 to /32.
    pub host_ipv4_loopback_cidr: IpNet,
    /// `--redirect-dns`.
    pub redirect_dns: bool,
    /// `--capture-all-dns`.
    pub capture_all_dns: bool,
    /// IPv4 DNS servers, as written (validated IP literals).
    pub dns_servers_v4: Vec<String>,
    /// IPv6 DNS servers, as written (validated IP literals).
    pub dns_servers_v6: Vec<String>,
    /// IPv6 rules on.
    pub enable_ipv6: bool,
    /// Where the DNS proxy listens (`constants.IstioAgentDNSListenerPort`,
    /// 15053; istio-iptables has no flag for it).
    pub dns_listener_port: u16,
    /// `--drop-invalid`.
    pub drop_invalid: bool,
    /// Not in istio: when set, the one change to the output is
    /// `-A ISTIO_OUTPUT -m mark --mark M -m comment --comment mesh-redirect -j RETURN` as the first rule of
    /// `ISTIO_OUTPUT` (both families), so sockets with this `SO_MARK` (our
    /// built-in proxy's upstream connections, made as root) are never
    /// redirected. `None` gives istio's output byte for byte.
    pub exempt_mark: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_port: ports::OUTBOUND,
            inbound_capture_port: ports::INBOUND,
            inbound_tunnel_port: ports::HBONE,
            proxy_uids: vec![DEFAULT_PROXY_UID],
            proxy_gids: vec![DEFAULT_PROXY_UID],
            inbound_interception_mode: InterceptionMode::Redirect,
            inbound_tproxy_mark: 1337,
            inbound_tproxy_route_table: 133,
            inbound_ports_include: Selection::default(),
            inbound_ports_exclude: Vec::new(),
            outbound_ports_include: Vec::new(),
            outbound_ports_exclude: Vec::new(),
            outbound_ip_ranges_include: Selection::default(),
            outbound_ip_ranges_exclude: Vec::new(),
            kube_virt_interfaces: Vec::new(),
            exclude_interfaces: Vec::new(),
            owner_groups: OwnerGroups::default(),
            host_ipv4_loopback_cidr: IpNet::from(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers_v4: Vec::new(),
            dns_servers_v6: Vec::new(),
            enable_ipv6: false,
            dns_listener_port: ports::DNS_PROXY,
            drop_invalid: false,
            exempt_mark: None,
        }
    }
}

/// istio's `constants.DefaultProxyUID`.
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// istio's limit on included owner groups (they all go in one rule).
const MAX_OWNER_GROUPS_INCLUDE: usize = 64;

impl Config {
    /// Whether DNS capture actually happens: istio turns it off (with a
    /// warning) when it has no server to capture and is not told to capture
    /// all DNS.
    #[must_use]
    pub fn dns_capture_enabled(&self) -> bool {
        self.redirect_dns
            && (self.capture_all_dns
                || !self.dns_servers_v4.is_empty()
                || !self.dns_servers_v6.is_empty())
    }

    /// Whether TPROXY routes are needed (istio's `configureTProxyRoutes`).
    #[must_use]
    pub fn needs_tproxy_routes(&self) -> bool {
        self.inbound_interception_mode == InterceptionMode::Tproxy
            && self.inbound_ports_include != Selection::Only(Vec::new())
    }
}

/// A configuration istio-iptables would not accept, or that we refuse.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {flag}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("reading the pod's DNS servers from {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no valid local IP address found to tell whether the pod is IPv6 (pass --ipv6=true or --ipv6=false)"
    )]
    NoLocalAddress,
    #[error("listing the pod's addresses with `ip -o addr show`: {0}")]
    ListAddresses(String),
}

fn invalid(flag: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// istio's `config.Split`: comma separated, empty items dropped.
fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|x| !x.is_empty())
}

fn port(flag: &'static str, s: &str) -> Result<u16, ConfigError> {
    match s.parse::<PortSpec>() {
        Ok(PortSpec::Port(p)) => Ok(p),
        Ok(PortSpec::Range(..)) => Err(invalid(flag, s, "expected a single port, not a range")),
        Err(e) => Err(invalid(flag, s, e)),
    }
}

fn ports(flag: &'static str, s: &str) -> Result<Vec<PortSpec>, ConfigError> {
    split(s)
        .map(|p| {
            if p == "*" {
                return Err(invalid(flag, s, "\"*\" cannot be part of a list"));
            }
            p.parse().map_err(|e| invalid(flag, s, e))
        })
        .collect()
}

fn ids(flag: &'static str, s: &str) -> Result<Vec<u32>, ConfigError> {
    let ids = split(s)
        .map(|id| {
            if id.starts_with('+') {
                return Err(invalid(flag, s, format!("{id:?} is not a number")));
            }
            id.parse::<u32>()
                .map_err(|_| invalid(flag, s, format!("{id:?} is not a numeric id")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(invalid(flag, s, "expected at least one numeric id"));
    }
    Ok(ids)
}

fn number(flag: &'static str, s: &str) -> Result<u32, ConfigError> {
    if s.starts_with('+') {
        return Err(invalid(flag, s, "expected a decimal number"));
    }
    s.parse()
        .map_err(|_| invalid(flag, s, "expected a decimal number (0-4294967295)"))
}

fn cidrs(flag: &'static str, s: &str) -> Result<Vec<IpNet>, ConfigError> {
    split(s)
        .map(|c| {
            if c == "*" {
                return Err(invalid(flag, s, "\"*\" cannot be part of a list"));
            }
            parse_cidr(c).map_err(|e| invalid(flag, s, e))
        })
        .collect()
}

fn interfaces(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    split(s)
        .map(|i| {
            // IFNAMSIZ is 16 with the NUL; iptables takes a trailing `+` wildcard.
            if i.len() > 15 || i.chars().any(|c| c.is_whitespace() || c == '/') {
                Err(invalid(flag, s, format!("{i:?} is not an interface name")))
            } else {
                Ok(i.to_owned())
            }
        })
        .collect()
}

fn groups(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    split(s)
        .map(|g| {
            if g.chars().any(char::is_whitespace) {
                Err(invalid(
                    flag,
                    s,
                    format!("{g:?} is not a group name or GID"),
                ))
            } else {
                Ok(g.to_owned())
            }
        })
        .collect()
}

fn dns_servers(flag: &'static str, s: &str, v6: bool) -> Result<Vec<String>, ConfigError> {
    split(s)
        .map(|ip| match ip.parse::<IpAddr>() {
            Ok(a) if a.is_ipv6() == v6 => Ok(ip.to_owned()),
            Ok(_) => Err(invalid(
                flag,
                s,
                format!("{ip} is not an IPv{} address", if v6 { 6 } else { 4 }),
            )),
            Err(_) => Err(invalid(flag, s, format!("{ip:?} is not an IP address"))),
        })
        .collect()
}

fn owner_groups(a: &IstioIptablesArgs) -> Result<OwnerGroups, ConfigError> {
    Ok(if a.outbound_owner_groups == "*" {
        OwnerGroups::AllExcept(groups(
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE (--outbound-owner-groups-exclude)",
            &a.outbound_owner_groups_exclude,
        )?)
    } else {
        let only = groups(FLAG_OWNER_GROUPS, &a.outbound_owner_groups)?;
        if only.len() > MAX_OWNER_GROUPS_INCLUDE {
            return Err(invalid(
                FLAG_OWNER_GROUPS,
                &a.outbound_owner_groups,
                format!("at most {MAX_OWNER_GROUPS_INCLUDE} groups (they share one rule)"),
            ));
        }
        OwnerGroups::Only(only)
    })
}

fn loopback_cidr(text: &str) -> Result<IpNet, ConfigError> {
    let loopback = parse_cidr(text).map_err(|e| invalid(FLAG_LOOPBACK, text, e))?;
    if !(loopback.addr().is_ipv4() && loopback.addr().is_loopback()) {
        return Err(invalid(
            FLAG_LOOPBACK,
            text,
            "expected an IPv4 loopback address",
        ));
    }
    if !(8..=32).contains(&loopback.prefix_len()) {
        return Err(invalid(
            FLAG_LOOPBACK,
            text,
            "expected a prefix length of 8 to 32",
        ));
    }
    Ok(loopback)
}

const FLAG_MODE: &str = "-m/--istio-inbound-interception-mode";
const FLAG_INBOUND_PORTS: &str = "-b/--istio-inbound-ports";
const FLAG_SERVICE_CIDR: &str = "-i/--istio-service-cidr";
const FLAG_EXCLUDE_CIDR: &str = "-x/--istio-service-exclude-cidr";
const FLAG_OWNER_GROUPS: &str = "ISTIO_OUTBOUND_OWNER_GROUPS (--outbound-owner-groups)";
const FLAG_LOOPBACK: &str = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR (--outbound-ipv4-loopback-cidr)";

/// Validates the explicit inputs. What istio derives from the pod and
/// `args` leaves unset takes istio's fallback here: proxy uid 1337 (not the
/// uid of `$ENVOY_USER`), IPv4 only, no DNS servers; [`Config::from_pod`]
/// derives them as istio does.
impl TryFrom<&IstioIptablesArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: &IstioIptablesArgs) -> Result<Self, ConfigError> {
        let uids = if a.proxy_uid.is_empty() {
            vec![DEFAULT_PROXY_UID]
        } else {
            ids("-u/--proxy-uid", &a.proxy_uid)?
        };
        let gids = if a.proxy_gid.is_empty() {
            uids.clone()
        } else {
            ids("-g/--proxy-gid", &a.proxy_gid)?
        };
        let inbound_interception_mode = match a.inbound_interception_mode.as_str() {
            "" | "REDIRECT" => InterceptionMode::Redirect,
            "TPROXY" => InterceptionMode::Tproxy,
            other => {
                return Err(invalid(
                    FLAG_MODE,
                    other,
                    "expected REDIRECT or TPROXY (upper case)",
                ));
            }
        };
        let inbound_ports_include = if a.inbound_ports == "*" {
            Selection::All
        } else {
            Selection::Only(ports(FLAG_INBOUND_PORTS, &a.inbound_ports)?)
        };
        let outbound_ip_ranges_include = if a.service_cidr == "*" {
            Selection::All
        } else {
            Selection::Only(cidrs(FLAG_SERVICE_CIDR, &a.service_cidr)?)
        };
        if a.service_exclude_cidr == "*" {
            return Err(invalid(
                FLAG_EXCLUDE_CIDR,
                "*",
                "the wildcard is not allowed here (istio: invalid value for OUTBOUND_IP_RANGES_EXCLUDE)",
            ));
        }
        let owner_groups = owner_groups(a)?;
        let loopback = loopback_cidr(&a.outbound_ipv4_loopback_cidr)?;
        // Only used by istio's validation, but a bad value is still bad input.
        port("--iptables-probe-port", &a.iptables_probe_port)?;
        Ok(Self {
            proxy_port: port("-p/--envoy-port", &a.envoy_port)?,
            inbound_capture_port: port("-z/--inbound-capture-port", &a.inbound_capture_port)?,
            inbound_tunnel_port: port("-e/--inbound-tunnel-port", &a.inbound_tunnel_port)?,
            proxy_uids: uids,
            proxy_gids: gids,
            inbound_interception_mode,
            inbound_tproxy_mark: number("-t/--istio-inbound-tproxy-mark", &a.inbound_tproxy_mark)?,
            inbound_tproxy_route_table: number(
                "-r/--istio-inbound-tproxy-route-table",
                &a.inbound_tproxy_route_table,
            )?,
            inbound_ports_include,
            inbound_ports_exclude: ports("-d/--istio-local-exclude-ports", &a.local_exclude_ports)?,
            outbound_ports_include: ports("-q/--istio-outbound-ports", &a.outbound_ports)?,
            outbound_ports_exclude: ports(
                "-o/--istio-local-outbound-ports-exclude",
                &a.local_outbound_ports_exclude,
            )?,
            outbound_ip_ranges_include,
            outbound_ip_ranges_exclude: cidrs(FLAG_EXCLUDE_CIDR, &a.service_exclude_cidr)?,
            kube_virt_interfaces: interfaces("-k/--kube-virt-interfaces", &a.kube_virt_interfaces)?,
            exclude_interfaces: interfaces("-c/--istio-exclude-interfaces", &a.exclude_interfaces)?,
            owner_groups,
            host_ipv4_loopback_cidr: loopback,
            redirect_dns: a.redirect_dns.unwrap_or(false),
            capture_all_dns: a.capture_all_dns.unwrap_or(false),
            dns_servers_v4: dns_servers(
                "--dns-servers-v4",
                a.dns_servers_v4.as_deref().unwrap_or_default(),
                false,
            )?,
            dns_servers_v6: dns_servers(
                "--dns-servers-v6",
                a.dns_servers_v6.as_deref().unwrap_or_default(),
                true,
            )?,
            enable_ipv6: a.ipv6.unwrap_or(false),
            dns_listener_port: ports::DNS_PROXY,
            drop_invalid: a.drop_invalid.unwrap_or(false),
            exempt_mark: a
                .exempt_mark
                .as_deref()
                .map(|m| number("--exempt-mark", m))
                .transpose()?,
        })
    }
}

impl Config {
    /// [`TryFrom`] plus what istio derives from the pod when `args` leaves
    /// it unset: the uid of `$ENVOY_USER` (default `istio-proxy`, from
    /// /etc/passwd, else 1337), `--redirect-dns`/`--drop-invalid`/
    /// `--dual-stack` from their second environment variables
    /// (`ISTIO_META_DNS_CAPTURE`, `INVALID_DROP`, `ISTIO_DUAL_STACK`),
    /// IPv6 from the addresses `runner("ip")` lists (the pod's namespace),
    /// and the DNS servers from /etc/resolv.conf.
    pub fn from_pod(
        args: &IstioIptablesArgs,
        runner: &dyn Fn(&str) -> Command,
    ) -> Result<Self, ConfigError> {
        let mut args = args.clone();
        let env_bool = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| parse_go_bool(&v).ok())
        };
        args.redirect_dns = args
            .redirect_dns
            .or_else(|| env_bool("ISTIO_META_DNS_CAPTURE"));
        args.drop_invalid = args.drop_invalid.or_else(|| env_bool("INVALID_DROP"));
        args.dual_stack = args.dual_stack.or_else(|| env_bool("ISTIO_DUAL_STACK"));
        if args.proxy_uid.is_empty() {
            let user = std::env::var("ENVOY_USER").unwrap_or_else(|_| "istio-proxy".to_owned());
            if let Some(uid) = pod::uid_of(&user) {
                args.proxy_uid = uid.to_string();
            }
        }
        let mut cfg = Self::try_from(&args)?;
        if args.ipv6.is_none() {
            cfg.enable_ipv6 = pod::ipv6_enabled(runner, args.dual_stack.unwrap_or(false))?;
        }
        if cfg.redirect_dns
            && !cfg.capture_all_dns
            && args.dns_servers_v4.is_none()
            && args.dns_servers_v6.is_none()
        {
            (cfg.dns_servers_v4, cfg.dns_servers_v6) = pod::resolv_conf_servers()?;
        }
        Ok(cfg)
    }
}

/// What `iptables-restore --noflush` is fed: the IPv4 input, and the IPv6
/// one when IPv6 is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInput {
    pub ipv4: String,
    pub ipv6: Option<String>,
}

impl fmt::Display for RestoreInput {
    /// What `--dry-run` prints: IPv4, then IPv6.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ipv4)?;
        if let Some(v6) = &self.ipv6 {
            f.write_str(v6)?;
        }
        Ok(())
    }
}

/// The `iptables-restore` input istio-iptables writes for `cfg`.
#[must_use]
pub fn restore_input(cfg: &Config) -> RestoreInput {
    let rules = generate::rules(cfg);
    RestoreInput {
        ipv4: generate::restore(&rules.v4),
        ipv6: cfg.enable_ipv6.then(|| generate::restore(&rules.v6)),
    }
}

pub(crate) use generate::{Rule, is_builtin, rules};
