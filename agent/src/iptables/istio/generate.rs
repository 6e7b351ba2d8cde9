//! The rules istio-iptables writes for a [`Config`], in the order it writes
//! them, and their `iptables-restore` rendering.
//!
//! A port of istio's `tools/istio-iptables/pkg/capture/run.go`
//! (`IptablesConfigurator.Run`, `SetupDNSRedir`, `addDNSConntrackZones`,
//! `handleInboundPortsInclude`, `handleOutboundIncludeRules`,
//! `handleCaptureByOwnerGroup`) and of `pkg/builder/iptables_builder_impl.go`
//! (`buildRestore`, `constructIptablesRestoreContents`), at the version
//! described in the parent module. Each step below names the istio function
//! it mirrors; the order of the steps is the order of istio's calls, which
//! is what makes the output byte-identical.

use std::collections::{BTreeMap, HashSet};

use super::{Config, InterceptionMode, OwnerGroups, Selection};

/// The comment on our exempt-mark rule: `mesh-redirect cleanup` removes only
/// chains that carry it.
pub const EXEMPT_MARK_COMMENT: &str = "mesh-redirect";
const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const ISTIO_DROP: &str = "ISTIO_DROP";

const NAT: &str = "nat";
const MANGLE: &str = "mangle";
const RAW: &str = "raw";

/// In TPROXY mode, packets from the proxy's outbound side to the app (by pod
/// IP) carry this mark so the inbound rules leave them alone (istio's
/// `constants.OutboundMark`).
const OUTBOUND_MARK: &str = "1338";
/// `127.0.0.6` is the source address of the proxy's inbound passthrough
/// connections; `::6` its IPv6 counterpart.
fn inbound_passthrough_v4() -> String {
    format!("{}/32", agent_common::INBOUND_PASSTHROUGH_SRC)
}

fn inbound_passthrough_v6() -> String {
    format!("{}/128", agent_common::INBOUND_PASSTHROUGH_SRC_V6)
}
const LOOPBACK_V6: &str = "::1/128";

/// Chains and targets that exist without `-N` (istio's
/// `constants.BuiltInChainsAndTargetsMap`).
const BUILTIN: [&str; 8] = [
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "RETURN",
    "DROP",
];

/// Stands for the family-specific address in a rule built for both
/// families (istio's `constants.IPVersionSpecific`).
const VERSIONED: &str = "\0IP_VERSION_SPECIFIC";

/// Whether `name` is one of the kernel's own chains (or a built-in target).
pub(crate) fn is_builtin(name: &str) -> bool {
    BUILTIN.contains(&name)
}

macro_rules! params {
    ($($p:expr),* $(,)?) => { vec![$($p.to_string()),*] };
}

/// One rule: the table, the chain it lives in, and its parameters as
/// istio writes them, starting with `-A CHAIN` or `-I CHAIN POS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub table: &'static str,
    pub chain: String,
    pub params: Vec<String>,
}

impl Rule {
    /// The rule's match and target, without `-A CHAIN` / `-I CHAIN POS`
    /// (what `iptables -C CHAIN ...` and `-D CHAIN ...` take).
    pub fn spec(&self) -> &[String] {
        let skip = if self.params.first().is_some_and(|p| p == "-I") {
            3
        } else {
            2
        };
        self.params.get(skip..).unwrap_or_default()
    }

    /// The jump target, if the rule ends in `-j TARGET` (istio only looks
    /// there; `-j REDIRECT --to-ports N` is not a jump to a chain).
    pub fn jump_target(&self) -> Option<&str> {
        match self.params.as_slice() {
            [.., j, target] if j == "-j" => Some(target),
            _ => None,
        }
    }
}

/// The rules of both families, in istio's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rules {
    pub v4: Vec<Rule>,
    pub v6: Vec<Rule>,
}

/// istio's `IptablesRuleBuilder`: IPv6 rules are only kept when IPv6 is on.
struct Builder {
    rules: Rules,
    ipv6: bool,
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Builder {
    fn push(&mut self, family: Family, table: &'static str, chain: &str, params: Vec<String>) {
        let rule = Rule {
            table,
            chain: chain.to_owned(),
            params,
        };
        match family {
            Family::V4 => self.rules.v4.push(rule),
            Family::V6 if self.ipv6 => self.rules.v6.push(rule),
            Family::V6 => {}
        }
    }

    fn append_family(&mut self, family: Family, chain: &str, table: &'static str, p: Vec<String>) {
        let mut params = params!["-A", chain];
        params.extend(p);
        self.push(family, table, chain, params);
    }

    fn insert_family(
        &mut self,
        family: Family,
        chain: &str,
        table: &'static str,
        position: u32,
        p: Vec<String>,
    ) {
        let mut params = params!["-I", chain, position];
        params.extend(p);
        self.push(family, table, chain, params);
    }

    fn append(&mut self, chain: &str, table: &'static str, p: Vec<String>) {
        self.append_family(Family::V4, chain, table, p.clone());
        self.append_family(Family::V6, chain, table, p);
    }

    fn append_v4(&mut self, chain: &str, table: &'static str, p: Vec<String>) {
        self.append_family(Family::V4, chain, table, p);
    }

    fn append_v6(&mut self, chain: &str, table: &'static str, p: Vec<String>) {
        self.append_family(Family::V6, chain, table, p);
    }

    fn insert(&mut self, chain: &str, table: &'static str, position: u32, p: Vec<String>) {
        self.insert_family(Family::V4, chain, table, position, p.clone());
        self.insert_family(Family::V6, chain, table, position, p);
    }

    /// istio's `AppendVersionedRule`: [`VERSIONED`] becomes `v4` in the
    /// IPv4 rule and `v6` in the IPv6 one.
    fn append_versioned(
        &mut self,
        v4: &str,
        v6: &str,
        chain: &str,
        table: &'static str,
        p: Vec<String>,
    ) {
        let for_v4 = p
            .iter()
            .map(|x| {
                if x == VERSIONED {
                    v4.to_owned()
                } else {
                    x.clone()
                }
            })
            .collect();
        let for_v6 = p
            .into_iter()
            .map(|x| if x == VERSIONED { v6.to_owned() } else { x })
            .collect();
        self.append_family(Family::V4, chain, table, for_v4);
        self.append_family(Family::V6, chain, table, for_v6);
    }
}

/// Whether an include list of destinations holds a loopback address
/// (istio's `NetworkRange.HasLoopBackIP`, either family).
fn includes_loopback(cfg: &Config) -> bool {
    match &cfg.outbound_ip_ranges_include {
        Selection::All => false,
        Selection::Only(cidrs) => cidrs.iter().any(|c| c.addr().is_loopback()),
    }
}

/// Builds every rule for `cfg` (istio's `IptablesConfigurator.Run`, minus
/// the execution).
#[expect(
    clippy::too_many_lines,
    reason = "one straight port of istio's Run(), kept in its order so the output stays byte-identical"
)]
pub(crate) fn rules(cfg: &Config) -> Rules {
    let mut b = Builder {
        rules: Rules::default(),
        ipv6: cfg.enable_ipv6,
    };
    let tproxy = cfg.inbound_interception_mode == InterceptionMode::Tproxy;
    let redirect_dns = cfg.dns_capture_enabled();
    let loopback = cfg.host_ipv4_loopback_cidr.to_string();
    let tunnel = cfg.inbound_tunnel_port.to_string();

    // shortCircuitExcludeInterfaces
    for iface in &cfg.exclude_interfaces {
        b.append("PREROUTING", NAT, params!["-i", iface, "-j", "RETURN"]);
        b.append("OUTPUT", NAT, params!["-o", iface, "-j", "RETURN"]);
    }
    if tproxy {
        for iface in &cfg.exclude_interfaces {
            b.append("PREROUTING", MANGLE, params!["-i", iface, "-j", "RETURN"]);
            b.append("OUTPUT", MANGLE, params!["-o", iface, "-j", "RETURN"]);
        }
    }

    // shortCircuitKubeInternalInterface
    for iface in &cfg.kube_virt_interfaces {
        b.insert("PREROUTING", NAT, 1, params!["-i", iface, "-j", "RETURN"]);
    }

    if cfg.drop_invalid {
        b.append(
            "PREROUTING",
            MANGLE,
            params!["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP],
        );
        b.append(ISTIO_DROP, MANGLE, params!["-j", "DROP"]);
    }

    b.append(
        ISTIO_INBOUND,
        NAT,
        params!["-p", "tcp", "--dport", tunnel, "-j", "RETURN"],
    );
    b.append(
        ISTIO_REDIRECT,
        NAT,
        params!["-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.proxy_port],
    );
    b.append(
        ISTIO_IN_REDIRECT,
        NAT,
        params![
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            cfg.inbound_capture_port
        ],
    );

    inbound_ports_include(&mut b, cfg, &loopback);

    b.append("OUTPUT", NAT, params!["-j", ISTIO_OUTPUT]);
    // Our one extension (see `Config::exempt_mark`): first in ISTIO_OUTPUT,
    // tagged so `mesh-redirect cleanup` knows these chains are ours.
    if let Some(mark) = cfg.exempt_mark {
        b.append(
            ISTIO_OUTPUT,
            NAT,
            params![
                "-m",
                "mark",
                "--mark",
                mark,
                "-m",
                "comment",
                "--comment",
                EXEMPT_MARK_COMMENT,
                "-j",
                "RETURN"
            ],
        );
    }

    for port in &cfg.outbound_ports_exclude {
        b.append(
            ISTIO_OUTPUT,
            NAT,
            params!["-p", "tcp", "--dport", port, "-j", "RETURN"],
        );
        b.append(
            ISTIO_OUTPUT,
            NAT,
            params!["-p", "udp", "--dport", port, "-j", "RETURN"],
        );
    }

    b.append_versioned(
        &inbound_passthrough_v4(),
        &inbound_passthrough_v6(),
        ISTIO_OUTPUT,
        NAT,
        params!["-o", "lo", "-s", VERSIONED, "-j", "RETURN"],
    );

    let loopback_included = includes_loopback(cfg);
    for uid in &cfg.proxy_uids {
        // App calls back to itself through a service VIP go through the
        // proxy's inbound side; with DNS capture, port 53 stays with the agent.
        let dports = if redirect_dns {
            params!["-m", "multiport", "!", "--dports", format!("53,{tunnel}")]
        } else {
            params!["!", "--dport", tunnel]
        };
        let mut p = params!["-o", "lo", "!", "-d", VERSIONED, "-p", "tcp"];
        p.extend(dports);
        p.extend(params![
            "-m",
            "owner",
            "--uid-owner",
            uid,
            "-j",
            ISTIO_IN_REDIRECT
        ]);
        b.append_versioned(&loopback, LOOPBACK_V6, ISTIO_OUTPUT, NAT, p);
        if !loopback_included {
            let p = if redirect_dns {
                params![
                    "-o",
                    "lo",
                    "-p",
                    "tcp",
                    "!",
                    "--dport",
                    "53",
                    "-m",
                    "owner",
                    "!",
                    "--uid-owner",
                    uid,
                    "-j",
                    "RETURN"
                ]
            } else {
                params![
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    "!",
                    "--uid-owner",
                    uid,
                    "-j",
                    "RETURN"
                ]
            };
            b.append(ISTIO_OUTPUT, NAT, p);
        }
        b.append(
            ISTIO_OUTPUT,
            NAT,
            params!["-m", "owner", "--uid-owner", uid, "-j", "RETURN"],
        );
    }

    for gid in &cfg.proxy_gids {
        // Unlike the uid rule, istio keeps `! --dport` here even with DNS capture.
        b.append_versioned(
            &loopback,
            LOOPBACK_V6,
            ISTIO_OUTPUT,
            NAT,
            params![
                "-o",
                "lo",
                "!",
                "-d",
                VERSIONED,
                "-p",
                "tcp",
                "!",
                "--dport",
                tunnel,
                "-m",
                "owner",
                "--gid-owner",
                gid,
                "-j",
                ISTIO_IN_REDIRECT
            ],
        );
        if !loopback_included {
            let p = if redirect_dns {
                params![
                    "-o",
                    "lo",
                    "-p",
                    "tcp",
                    "!",
                    "--dport",
                    "53",
                    "-m",
                    "owner",
                    "!",
                    "--gid-owner",
                    gid,
                    "-j",
                    "RETURN"
                ]
            } else {
                params![
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    "!",
                    "--gid-owner",
                    gid,
                    "-j",
                    "RETURN"
                ]
            };
            b.append(ISTIO_OUTPUT, NAT, p);
        }
        b.append(
            ISTIO_OUTPUT,
            NAT,
            params!["-m", "owner", "--gid-owner", gid, "-j", "RETURN"],
        );
    }

    // handleCaptureByOwnerGroup
    match &cfg.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for group in groups {
                b.append(
                    ISTIO_OUTPUT,
                    NAT,
                    params!["-m", "owner", "--gid-owner", group, "-j", "RETURN"],
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let mut p = Vec::new();
            for group in groups {
                p.extend(params!["-m", "owner", "!", "--gid-owner", group]);
            }
            p.extend(params!["-j", "RETURN"]);
            b.append(ISTIO_OUTPUT, NAT, p);
        }
    }

    if redirect_dns {
        dns_redirect(&mut b, cfg);
    }

    // Envoy-aware apps and container-to-container traffic use localhost.
    b.append_versioned(
        &loopback,
        LOOPBACK_V6,
        ISTIO_OUTPUT,
        NAT,
        params!["-d", VERSIONED, "-j", "RETURN"],
    );
    for cidr in &cfg.outbound_ip_ranges_exclude {
        let p = params!["-d", cidr, "-j", "RETURN"];
        if cidr.addr().is_ipv4() {
            b.append_v4(ISTIO_OUTPUT, NAT, p);
        } else {
            b.append_v6(ISTIO_OUTPUT, NAT, p);
        }
    }

    // handleOutboundPortsInclude
    for port in &cfg.outbound_ports_include {
        b.append(
            ISTIO_OUTPUT,
            NAT,
            params!["-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT],
        );
    }

    outbound_include(&mut b, cfg, Family::V4);
    outbound_include(&mut b, cfg, Family::V6);

    if tproxy {
        tproxy_marks(&mut b, cfg, &loopback);
    }
    b.rules
}

/// istio's `handleInboundPortsInclude`.
#[expect(
    clippy::too_many_lines,
    reason = "a straight port of one istio function, one rule per statement"
)]
fn inbound_ports_include(b: &mut Builder, cfg: &Config, loopback: &str) {
    let ports = match &cfg.inbound_ports_include {
        Selection::Only(ports) if ports.is_empty() => return,
        other => other,
    };
    let tproxy = cfg.inbound_interception_mode == InterceptionMode::Tproxy;
    let mark = cfg.inbound_tproxy_mark;
    let table = if tproxy {
        b.append(
            ISTIO_DIVERT,
            MANGLE,
            params!["-j", "MARK", "--set-mark", mark],
        );
        b.append(ISTIO_DIVERT, MANGLE, params!["-j", "ACCEPT"]);
        b.append_versioned(
            loopback,
            LOOPBACK_V6,
            ISTIO_TPROXY,
            MANGLE,
            params![
                "!",
                "-d",
                VERSIONED,
                "-p",
                "tcp",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                format!("{mark}/0xffffffff"),
                "--on-port",
                cfg.inbound_capture_port
            ],
        );
        MANGLE
    } else {
        NAT
    };
    b.append(
        "PREROUTING",
        table,
        params!["-p", "tcp", "-j", ISTIO_INBOUND],
    );

    match ports {
        Selection::All => {
            for port in &cfg.inbound_ports_exclude {
                b.append(
                    ISTIO_INBOUND,
                    table,
                    params!["-p", "tcp", "--dport", port, "-j", "RETURN"],
                );
            }
            if tproxy {
                b.append(
                    ISTIO_INBOUND,
                    MANGLE,
                    params![
                        "-p",
                        "tcp",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "RELATED,ESTABLISHED",
                        "-j",
                        ISTIO_DIVERT
                    ],
                );
                b.append(
                    ISTIO_INBOUND,
                    MANGLE,
                    params!["-p", "tcp", "-j", ISTIO_TPROXY],
                );
            } else {
                b.append(
                    ISTIO_INBOUND,
                    NAT,
                    params!["-p", "tcp", "-j", ISTIO_IN_REDIRECT],
                );
            }
        }
        Selection::Only(ports) => {
            for port in ports {
                if tproxy {
                    b.append(
                        ISTIO_INBOUND,
                        MANGLE,
                        params![
                            "-p",
                            "tcp",
                            "--dport",
                            port,
                            "-m",
                            "conntrack",
                            "--ctstate",
                            "RELATED,ESTABLISHED",
                            "-j",
                            ISTIO_DIVERT
                        ],
                    );
                    b.append(
                        ISTIO_INBOUND,
                        MANGLE,
                        params!["-p", "tcp", "--dport", port, "-j", ISTIO_TPROXY],
                    );
                } else {
                    b.append(
                        ISTIO_INBOUND,
                        NAT,
                        params!["-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT],
                    );
                }
            }
        }
    }
}

/// istio's `handleOutboundIncludeRules`, called once per family.
fn outbound_include(b: &mut Builder, cfg: &Config, family: Family) {
    match &cfg.outbound_ip_ranges_include {
        Selection::All => {
            b.append_family(family, ISTIO_OUTPUT, NAT, params!["-j", ISTIO_REDIRECT]);
            for iface in &cfg.kube_virt_interfaces {
                b.insert_family(
                    family,
                    "PREROUTING",
                    NAT,
                    1,
                    params!["-i", iface, "-j", ISTIO_REDIRECT],
                );
            }
        }
        Selection::Only(cidrs) => {
            let of_family = cidrs.iter().filter(|c| match family {
                Family::V4 => c.addr().is_ipv4(),
                Family::V6 => c.addr().is_ipv6(),
            });
            for cidr in of_family {
                for iface in &cfg.kube_virt_interfaces {
                    b.insert_family(
                        family,
                        "PREROUTING",
                        NAT,
                        1,
                        params!["-i", iface, "-d", cidr, "-j", ISTIO_REDIRECT],
                    );
                }
                b.append_family(
                    family,
                    ISTIO_OUTPUT,
                    NAT,
                    params!["-d", cidr, "-j", ISTIO_REDIRECT],
                );
            }
        }
    }
}

/// istio's `SetupDNSRedir` and `addDNSConntrackZones`.
#[expect(
    clippy::too_many_lines,
    reason = "a straight port of one istio function, one rule per statement"
)]
fn dns_redirect(b: &mut Builder, cfg: &Config) {
    let all = cfg.capture_all_dns;
    let (v4, v6) = (&cfg.dns_servers_v4, &cfg.dns_servers_v6);
    b.append("OUTPUT", RAW, params!["-j", ISTIO_OUTPUT_DNS]);
    if all || !v4.is_empty() {
        b.append_v4(ISTIO_OUTPUT, NAT, params!["-j", ISTIO_OUTPUT_DNS]);
    }
    if all || !v6.is_empty() {
        b.append_v6(ISTIO_OUTPUT, NAT, params!["-j", ISTIO_OUTPUT_DNS]);
    }
    // TCP to the agent: `--to-ports` here, `--to-port` for UDP below, as istio has it.
    for proto in ["tcp", "udp"] {
        let to = if proto == "tcp" {
            "--to-ports"
        } else {
            "--to-port"
        };
        if all {
            b.append(
                ISTIO_OUTPUT_DNS,
                NAT,
                params![
                    "-p",
                    proto,
                    "--dport",
                    "53",
                    "-j",
                    "REDIRECT",
                    to,
                    cfg.dns_listener_port
                ],
            );
        } else {
            for s in v4 {
                b.append_v4(
                    ISTIO_OUTPUT_DNS,
                    NAT,
                    params![
                        "-p",
                        proto,
                        "--dport",
                        "53",
                        "-d",
                        format!("{s}/32"),
                        "-j",
                        "REDIRECT",
                        to,
                        cfg.dns_listener_port
                    ],
                );
            }
            for s in v6 {
                b.append_v6(
                    ISTIO_OUTPUT_DNS,
                    NAT,
                    params![
                        "-p",
                        proto,
                        "--dport",
                        "53",
                        "-d",
                        format!("{s}/128"),
                        "-j",
                        "REDIRECT",
                        to,
                        cfg.dns_listener_port
                    ],
                );
            }
        }
    }

    // Conntrack zones: proxy <-> upstream resolvers in zone 1, app <-> agent in zone 2.
    let owners = cfg
        .proxy_uids
        .iter()
        .map(|uid| ("--uid-owner", uid))
        .chain(cfg.proxy_gids.iter().map(|gid| ("--gid-owner", gid)));
    for (owner, id) in owners {
        b.append(
            ISTIO_OUTPUT_DNS,
            RAW,
            params![
                "-p", "udp", "--dport", "53", "-m", "owner", owner, id, "-j", "CT", "--zone", "1"
            ],
        );
        b.append(
            ISTIO_OUTPUT_DNS,
            RAW,
            params![
                "-p",
                "udp",
                "--sport",
                cfg.dns_listener_port,
                "-m",
                "owner",
                owner,
                id,
                "-j",
                "CT",
                "--zone",
                "2"
            ],
        );
    }
    if all {
        b.append("PREROUTING", RAW, params!["-j", ISTIO_INBOUND]);
        b.append(
            ISTIO_OUTPUT_DNS,
            RAW,
            params!["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
        );
        b.append(
            ISTIO_INBOUND,
            RAW,
            params!["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
        );
        return;
    }
    for (family, servers, bits) in [(Family::V4, v4, 32), (Family::V6, v6, 128)] {
        if !servers.is_empty() {
            b.append_family(family, "PREROUTING", RAW, params!["-j", ISTIO_INBOUND]);
        }
        for s in servers {
            b.append_family(
                family,
                ISTIO_OUTPUT_DNS,
                RAW,
                params![
                    "-p",
                    "udp",
                    "--dport",
                    "53",
                    "-d",
                    format!("{s}/{bits}"),
                    "-j",
                    "CT",
                    "--zone",
                    "2"
                ],
            );
            b.append_family(
                family,
                ISTIO_INBOUND,
                RAW,
                params![
                    "-p",
                    "udp",
                    "--sport",
                    "53",
                    "-s",
                    format!("{s}/{bits}"),
                    "-j",
                    "CT",
                    "--zone",
                    "1"
                ],
            );
        }
    }
}

/// The mangle rules of TPROXY mode that keep the proxy's own connections
/// (and app-to-app ones) out of the inbound capture.
#[expect(
    clippy::too_many_lines,
    reason = "a straight port of one istio function, one rule per statement"
)]
fn tproxy_marks(b: &mut Builder, cfg: &Config, loopback: &str) {
    let mark = cfg.inbound_tproxy_mark;
    b.append(
        "PREROUTING",
        MANGLE,
        params![
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--save-mark"
        ],
    );
    b.append(
        "OUTPUT",
        MANGLE,
        params![
            "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN"
        ],
    );
    let owners = cfg
        .proxy_uids
        .iter()
        .map(|uid| ("--uid-owner", uid))
        .chain(cfg.proxy_gids.iter().map(|gid| ("--gid-owner", gid)));
    for (owner, id) in owners {
        b.append_versioned(
            loopback,
            LOOPBACK_V6,
            "OUTPUT",
            MANGLE,
            params![
                "!",
                "-d",
                VERSIONED,
                "-p",
                "tcp",
                "-o",
                "lo",
                "-m",
                "owner",
                owner,
                id,
                "-j",
                "MARK",
                "--set-mark",
                OUTBOUND_MARK
            ],
        );
    }
    b.append(
        "OUTPUT",
        MANGLE,
        params![
            "-p",
            "tcp",
            "-m",
            "connmark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--restore-mark"
        ],
    );
    b.insert(
        ISTIO_INBOUND,
        MANGLE,
        1,
        params!["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"],
    );
    b.insert_family(
        Family::V4,
        ISTIO_INBOUND,
        MANGLE,
        2,
        params![
            "-p",
            "tcp",
            "-s",
            inbound_passthrough_v4(),
            "-i",
            "lo",
            "-j",
            "RETURN"
        ],
    );
    b.insert_family(
        Family::V6,
        ISTIO_INBOUND,
        MANGLE,
        2,
        params![
            "-p",
            "tcp",
            "-s",
            inbound_passthrough_v6(),
            "-i",
            "lo",
            "-j",
            "RETURN"
        ],
    );
    b.insert(
        ISTIO_INBOUND,
        MANGLE,
        3,
        params![
            "-p",
            "tcp",
            "-i",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            OUTBOUND_MARK,
            "-j",
            "RETURN"
        ],
    );
}

/// The `iptables-restore --noflush` input for one family's rules (istio's
/// `buildRestore`): per table, `-N` for every chain the rules use or jump
/// to that is not built in, then the rules in order; tables in name order
/// (`mangle`, `nat`, `raw`), empty ones left out.
pub(crate) fn restore(rules: &[Rule]) -> String {
    let mut tables: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for r in rules {
        if seen.insert((r.chain.as_str(), r.table)) && !is_builtin(&r.chain) {
            tables
                .entry(r.table)
                .or_default()
                .push(format!("-N {}", r.chain));
        }
    }
    // Chains we only jump to get created too.
    for r in rules {
        if let Some(target) = r.jump_target()
            && seen.insert((target, r.table))
            && !is_builtin(target)
        {
            tables
                .entry(r.table)
                .or_default()
                .push(format!("-N {target}"));
        }
    }
    for r in rules {
        tables.entry(r.table).or_default().push(r.params.join(" "));
    }
    let mut out = String::new();
    for (table, lines) in tables {
        if lines.is_empty() {
            continue;
        }
        out.push_str("* ");
        out.push_str(table);
        out.push('\n');
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}
