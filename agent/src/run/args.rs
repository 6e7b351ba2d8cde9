//! `run`'s settings: its flags, and the same settings from a TOML file
//! (`--config`), merged by where each value came from: a value given on the
//! command line wins, then the file's, then the default.
//!
//! Every switch takes an optional value (`--no-inbound`,
//! `--no-inbound=false`), so the command line can turn off a switch the
//! file turned on.

use std::{net::SocketAddrV4, path::PathBuf};

use agent_common::{globals, ports};
use clap::{ArgAction, ArgMatches, CommandFactory as _, Parser};
use serde::{Deserialize, Serialize};

use crate::{
    capture::ModeChoice,
    config::{ConfigError, ConfigFile},
    rules::{List, RuleArgs},
};

/// Who receives the captured connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    /// The agent's own proxy, listening on the outbound and inbound ports.
    Builtin,
    /// A proxy the user runs (Envoy, HAProxy...) on the same ports; the
    /// agent only captures and accelerates.
    External,
}

/// A switch: `--flag` turns it on, `--flag=false` off (so the command line
/// can undo a config file's `flag = true`).
macro_rules! switch {
    () => {
        ArgAction::Set
    };
}

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
#[expect(clippy::struct_excessive_bools, reason = "command-line switches")]
pub struct RunArgs {
    /// Read settings from this TOML file: each key is one of these flags
    /// without its dashes (`outbound-port = 15001`, `no-inbound = true`,
    /// `outbound-ip-ranges-exclude = ["10.0.0.0/8"]`); a flag given on the
    /// command line overrides the file's value.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Redirect mode.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    pub mode: ModeChoice,
    /// Network namespace to serve (a file like /var/run/netns/NAME or
    /// /proc/PID/ns/net). Default: the agent's own.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// cgroup2 directory whose processes are captured (eBPF mode; iptables
    /// rules apply to the whole namespace). Default: the cgroup2 root.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Port the proxy receives outbound connections on (127.0.0.1).
    #[arg(long, default_value_t = ports::OUTBOUND, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// Port the proxy receives inbound connections on.
    #[arg(long, default_value_t = ports::INBOUND, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Capture outbound connections only; leave inbound ones alone.
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub no_inbound: bool,
    /// `SO_MARK` the proxy sets on its upstream sockets; connects carrying
    /// it are never redirected. 0 disables the check.
    #[arg(long, default_value_t = 1337)]
    pub proxy_mark: u32,
    /// Connects by this uid are never redirected (the proxy's own).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_uid: Option<u32>,
    /// Connects by this gid are never redirected (the proxy's own).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_gid: Option<u32>,
    /// Who receives captured connections.
    #[arg(long, value_enum, default_value_t = ProxyKind::Builtin)]
    pub proxy: ProxyKind,
    /// Redirect with connect4 only: no SOCKHASH, no sk_msg short-circuit
    /// (plain loopback TCP between app and proxy; for comparisons).
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub no_sockmap: bool,
    /// How far (KiB) a short-circuited socket's reader may fall behind
    /// before its sender switches to TCP for good (sk_msg backpressure: the
    /// kernel does not bound that queue itself).
    #[arg(long, value_name = "KIB", default_value_t = globals::SOCKMAP_QUEUE_LIMIT_DEFAULT_KIB, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub sockmap_queue_kib: u32,
    /// After how many short connections in a row to a destination (neither
    /// end sent more than two messages) new ones to it use plain TCP
    /// instead of the short-circuit, until one is long again; 0: always
    /// short-circuit.
    #[arg(long, value_name = "N", default_value_t = globals::SHORT_CONN_THRESHOLD_DEFAULT)]
    pub short_conn_threshold: u32,
    /// Move bulk out of the app's loopback leg with `splice(2)` in the
    /// built-in proxy, where no short-circuit serves the pod (measured
    /// slower than copying on the reference host: off by default).
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub splice: bool,
    /// Proxy worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Proxy relay buffer per direction, in KiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub buffer_kib: u32,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,
    /// Connections beyond this are reset at once (never left hanging).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// A proxied connection with no byte either way for this long is closed.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,
    /// On SIGTERM/SIGINT (or a handover), how long open connections may
    /// finish before they are closed.
    #[arg(long, default_value_t = 5)]
    pub drain_timeout_secs: u64,
    /// While no proxy listens, let connections go where they were going
    /// (eBPF mode only). Default: fail closed.
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true", overrides_with = "fail_closed")]
    pub fail_open: bool,
    /// While no proxy listens, refuse connections, as iptables REDIRECT to
    /// a closed port does (the default).
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true", overrides_with = "fail_open")]
    pub fail_closed: bool,
    /// The bpffs mount for pins (mounted there if nothing is).
    #[arg(long, value_name = "PATH", default_value = crate::mounts::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Pin nothing: the datapath goes with the process (no restart without
    /// loss, no adoption).
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub no_pin: bool,
    /// Admin server address (/metrics, /ready, /healthz), inside the served
    /// namespace.
    #[arg(long, default_value_t = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, ports::ADMIN))]
    pub admin: SocketAddrV4,
    /// No admin server.
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub no_admin: bool,
    /// Capture DNS (istio's `--redirect-dns`): UDP and TCP port 53 to the
    /// pod's resolvers go to the DNS proxy on 127.0.0.1 / `[::1]`
    /// `--dns-proxy-port` (the DNS proxy, run as the proxy's uid or with
    /// its mark, is not captured).
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub redirect_dns: bool,
    /// With `--redirect-dns`: every port-53 destination, not only the
    /// resolvers.
    #[arg(long, action = switch!(), num_args = 0..=1, require_equals = true, default_value_t = false, default_missing_value = "true")]
    pub capture_all_dns: bool,
    /// The pod's resolvers (comma-separated IP addresses). Default: the
    /// nameservers of the pod's resolv.conf (`/etc/netns/NAME/resolv.conf`
    /// for `--netns /var/run/netns/NAME`, as `ip netns exec` uses, else
    /// /etc/resolv.conf).
    #[arg(long, value_name = "IPS", value_parser = List::<std::net::IpAddr>::parse)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<List<std::net::IpAddr>>,
    /// Where the DNS proxy listens.
    #[arg(long, default_value_t = ports::DNS_PROXY, value_parser = clap::value_parser!(u16).range(1..))]
    pub dns_proxy_port: u16,
    /// Install ip6tables rules too (iptables mode; the eBPF mode captures
    /// both families always). Default: when the namespace has a global
    /// IPv6 address.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// Directory of the control sockets a new agent takes over through.
    #[arg(long, value_name = "PATH", default_value = crate::handoff::DEFAULT_CONTROL_DIR)]
    pub control_dir: PathBuf,
    #[command(flatten)]
    #[serde(skip)]
    pub rules: RuleArgs,
    /// Test only: pretend these `doctor` probes failed (by id, e.g.
    /// `prog.sk_lookup`), to exercise `--mode auto`'s fallback.
    #[arg(
        long,
        hide = true,
        value_delimiter = ',',
        env = "MESH_REDIRECT_PRETEND_MISSING"
    )]
    #[serde(skip)]
    pub pretend_missing: Vec<String>,
}

/// `run`'s flags alone, for their defaults and parsers.
#[derive(Parser)]
#[command(name = "run")]
struct RunCommand {
    #[command(flatten)]
    args: RunArgs,
}

impl Default for RunArgs {
    /// What `run` with no flag means.
    fn default() -> Self {
        RunCommand::parse_from(["run"]).args
    }
}

/// Switches that override each other: when the command line sets one, the
/// file's values for all of them are ignored.
const EXCLUSIVE: &[&[&str]] = &[&["fail-open", "fail-closed"]];

impl RunArgs {
    /// The settings in force: `cli` (parsed from `matches`, `run`'s own)
    /// over its `--config` file's, over the defaults. Everything in the
    /// file is checked first: its syntax, its keys, the type of each value
    /// and the value itself, by the flag's own parser; errors name the file,
    /// the line and the key.
    pub fn resolve(cli: Self, matches: &ArgMatches) -> Result<Self, ConfigError> {
        let Some(path) = cli.config.clone() else {
            return Ok(cli);
        };
        let cmd = RunCommand::command();
        let file = ConfigFile::read(&path)?;
        file.check(&cmd, &["config", "pretend-missing"])?;
        let from_cli = |long: &str| {
            let given = |long: &str| {
                cmd.get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .is_some_and(|a| {
                        matches.value_source(a.get_id().as_str())
                            == Some(clap::parser::ValueSource::CommandLine)
                    })
            };
            match EXCLUSIVE.iter().find(|g| g.contains(&long)) {
                Some(group) => group.iter().any(|l| given(l)),
                None => given(long),
            }
        };
        let mut merged: Self = file.overlay(&cli, &file.typed::<Self>()?, &from_cli)?;
        merged.rules = file.overlay(&cli.rules, &file.typed::<RuleArgs>()?, &from_cli)?;
        merged.config = cli.config;
        merged.pretend_missing = cli.pretend_missing;
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use clap::FromArgMatches as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, String> {
        let words = std::iter::once("run").chain(args.iter().copied());
        let matches = RunCommand::command()
            .try_get_matches_from(words)
            .map_err(|e| e.to_string())?;
        let cli = RunCommand::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        RunArgs::resolve(cli.args, &matches).map_err(|e| e.to_string())
    }

    /// A config file in the temp directory, removed on drop.
    struct File(std::path::PathBuf);

    impl File {
        fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file(text: &str) -> File {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-redirect-run-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        File(path)
    }

    /// A config file's `fail-open = true` can be overridden by
    /// `--fail-closed` on the command line (and the other way round).
    #[test]
    fn the_later_fail_policy_wins() {
        let fail_open = |args: &[&str]| {
            let a = parse(args).unwrap();
            a.fail_open && !a.fail_closed
        };
        assert!(!fail_open(&["--fail-open", "--fail-closed"]));
        assert!(fail_open(&["--fail-closed", "--fail-open"]));
        assert!(!fail_open(&[]));
        let f = file("fail-open = true\n");
        assert!(fail_open(&["--config", f.arg()]));
        assert!(!fail_open(&["--config", f.arg(), "--fail-closed"]));
        let f = file("fail-closed = true\n");
        assert!(fail_open(&["--config", f.arg(), "--fail-open"]));
    }

    #[test]
    fn the_command_line_overrides_the_file_and_can_turn_its_switch_off() {
        let f = file(
            "mode = \"ebpf\"\noutbound-port = 15101\nno-inbound = true\n\
             outbound-ip-ranges-exclude = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\n\
             inbound-ports-exclude = [15090, 15021]\n",
        );
        let a = parse(&["--config", f.arg(), "--outbound-port", "15201"]).unwrap();
        assert_eq!(a.mode, ModeChoice::Ebpf);
        assert_eq!(a.outbound_port, 15201);
        assert!(a.no_inbound);
        assert_eq!(
            a.rules.exclude_cidrs.unwrap().to_string(),
            "10.0.0.0/8,192.168.0.0/16"
        );
        assert_eq!(a.rules.exclude_inbound_ports.unwrap().0, vec![15090, 15021]);
        let off = parse(&["--config", f.arg(), "--no-inbound=false", "-x", "1.2.3.4"]).unwrap();
        assert!(!off.no_inbound);
        assert_eq!(off.rules.exclude_cidrs.unwrap().to_string(), "1.2.3.4/32");
        // Unset keys keep their defaults; a false switch stays off.
        let f = file("no-sockmap = false\n");
        let d = parse(&["--config", f.arg()]).unwrap();
        assert!(!d.no_sockmap);
        assert_eq!(d.outbound_port, ports::OUTBOUND);
    }

    #[test]
    fn bad_files_name_the_file_the_line_and_the_key() {
        for (text, want) in [
            (
                "mode = \"ebpf\"\n\noutbund-port = 1\n",
                "line 3: unknown key `outbund-port`",
            ),
            ("mode = \"ebpf\"\noutbound-port = = 3\n", "line 2"),
            ("no-inbound = \"yes\"\n", "line 1"),
            ("outbound-port = 0\n", "line 1: `outbound-port`"),
            ("sockmap-queue-kib = 1\n", "line 1: `sockmap-queue-kib`"),
            ("mode = \"fast\"\n", "line 1"),
            ("outbound-ip-ranges-exclude = [\"10.0.0.0/33\"]\n", "line 1"),
            ("config = \"other.toml\"\n", "unknown key `config`"),
        ] {
            let f = file(text);
            let e = parse(&["--config", f.arg()]).unwrap_err();
            assert!(e.contains(f.arg()) && e.contains(want), "{text:?}: {e}");
        }
        let e = parse(&["--config", "/nonexistent/agent.toml"]).unwrap_err();
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
    }

    #[test]
    fn bad_rule_lists_name_the_flag() {
        for args in [
            &["-x", "10.0.0.0/33"][..],
            &["--outbound-ip-ranges-exclude", "*"],
            &["-d", "0"],
            &["-b", "http"],
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains("--"), "{args:?}: {e}");
        }
    }
}
