//! Golden tests: for each configuration, the exact `--dry-run` output (the
//! IPv4 `iptables-restore` input, then the IPv6 one when IPv6 is on).
//!
//! The configurations are istio's own (`pkg/capture/run_test.go`, on top of
//! its `constructTestConfig`, which is our `Config::default()`), plus a few
//! of ours. `MESH_REDIRECT_UPDATE_GOLDEN=1 cargo test -p agent golden`
//! rewrites the files; review the diff against istio's goldens before
//! committing one.

use clap::Parser;

use super::{
    Config, ConfigError, InterceptionMode, IpNet, IstioIptablesArgs, OwnerGroups, PortSpec,
    Selection, restore_input,
};

macro_rules! goldens {
    ($($name:literal),* $(,)?) => {
        const NAMES: &[&str] = &[$($name),*];
        fn golden(name: &str) -> &'static str {
            match name {
                $($name => include_str!(concat!("testdata/", $name, ".golden")),)*
                _ => panic!("no golden file for {name}"),
            }
        }
    };
}

goldens![
    "empty",
    "inbound-ports-include",
    "ipnets",
    "inbound-ports-wildcard",
    "inbound-ports-wildcard-exclude",
    "inbound-ports-tproxy",
    "inbound-ports-wildcard-tproxy",
    "tproxy",
    "kube-virt-interfaces",
    "ipnets-with-kube-virt-interfaces",
    "ip-range",
    "loopback-outbound-iprange",
    "dns-uid-gid",
    "dns-no-servers",
    "ipv6-capture-all-dns",
    "ipv6-empty-inbound-ports",
    "ipv6-inbound-ports",
    "ipv6-virt-interfaces",
    "ipv6-ipnets",
    "ipv6-uid-gid",
    "ipv6-outbound-ports",
    "ipv6-tproxy-dns-v4-only",
    "outbound-ports-include",
    "outbound-ports-exclude",
    "outbound-owner-groups",
    "outbound-owner-groups-exclude",
    "ipv6-dns-outbound-owner-groups-exclude",
    "ipv6-capture-all-dns-outbound-owner-groups-exclude",
    "basic-exclude-nic",
    "drop-invalid",
    "host-ipv4-loopback-cidr",
    "exempt-mark",
    "ipv6-exempt-mark",
];

fn ports(list: &[u16]) -> Vec<PortSpec> {
    list.iter().copied().map(PortSpec::Port).collect()
}

fn cidrs(list: &[&str]) -> Vec<IpNet> {
    list.iter()
        .map(|c| crate::rules::parse_cidr(c).unwrap())
        .collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// istio's `TestIptables` cases (same names), in terms of our `Config`.
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn config(name: &str) -> Config {
    let mut c = Config::default();
    match name {
        "empty" => {}
        "inbound-ports-include" => {
            c.inbound_ports_include = Selection::Only(ports(&[32000, 31000]));
        }
        "ipnets" => c.outbound_ip_ranges_include = Selection::Only(cidrs(&["10.0.0.0/8"])),
        "inbound-ports-wildcard" => c.inbound_ports_include = Selection::All,
        "inbound-ports-wildcard-exclude" => {
            c.inbound_ports_include = Selection::All;
            c.inbound_ports_exclude = ports(&[15090, 15021, 15020]);
        }
        "inbound-ports-tproxy" => {
            c.inbound_ports_include = Selection::Only(ports(&[32000, 31000]));
            c.inbound_interception_mode = InterceptionMode::Tproxy;
        }
        "inbound-ports-wildcard-tproxy" => {
            c.inbound_ports_include = Selection::All;
            c.inbound_interception_mode = InterceptionMode::Tproxy;
        }
        "tproxy" => {
            c.inbound_interception_mode = InterceptionMode::Tproxy;
            c.inbound_ports_include = Selection::All;
            c.outbound_ip_ranges_exclude = cidrs(&["1.1.0.0/16"]);
            c.outbound_ip_ranges_include = Selection::Only(cidrs(&["9.9.0.0/16"]));
            c.redirect_dns = true;
            c.dns_servers_v4 = strings(&["127.0.0.53"]);
            c.exclude_interfaces = strings(&["not-istio-nic"]);
            c.enable_ipv6 = true;
        }
        "kube-virt-interfaces" => {
            c.kube_virt_interfaces = strings(&["eth1", "eth2"]);
            c.outbound_ip_ranges_include = Selection::All;
        }
        "ipnets-with-kube-virt-interfaces" => {
            c.kube_virt_interfaces = strings(&["eth1", "eth2"]);
            c.outbound_ip_ranges_include = Selection::Only(cidrs(&["10.0.0.0/8"]));
        }
        "ip-range" => {
            c.outbound_ip_ranges_exclude = cidrs(&["1.1.0.0/16"]);
            c.outbound_ip_ranges_include = Selection::Only(cidrs(&["9.9.0.0/16"]));
            c.redirect_dns = true;
            c.proxy_gids = vec![1, 2];
            c.proxy_uids = vec![3, 4];
            c.dns_servers_v4 = strings(&["127.0.0.53"]);
        }
        "loopback-outbound-iprange" => {
            c.outbound_ip_ranges_include = Selection::Only(cidrs(&["127.1.2.3/32"]));
            c.redirect_dns = true;
            c.dns_servers_v4 = strings(&["127.0.0.53"]);
            c.proxy_gids = vec![1, 2];
            c.proxy_uids = vec![3, 4];
        }
        "dns-uid-gid" => {
            c.redirect_dns = true;
            c.dns_servers_v4 = strings(&["127.0.0.53"]);
            c.dns_servers_v6 = strings(&["::127.0.0.53"]);
            c.proxy_gids = vec![1, 2];
            c.proxy_uids = vec![3, 4];
            c.enable_ipv6 = true;
        }
        // istio's ipv6-dns-uid-gid: DNS on but no server and not all DNS,
        // which istio turns off.
        "dns-no-servers" => {
            c.enable_ipv6 = true;
            c.redirect_dns = true;
            c.proxy_gids = vec![1, 2];
            c.proxy_uids = vec![3, 4];
        }
        "ipv6-capture-all-dns" => {
            c.enable_ipv6 = true;
            c.redirect_dns = true;
            c.capture_all_dns = true;
        }
        "ipv6-empty-inbound-ports" => c.enable_ipv6 = true,
        "ipv6-inbound-ports" => {
            c.inbound_ports_include = Selection::Only(ports(&[4000, 5000]));
            c.enable_ipv6 = true;
        }
        "ipv6-virt-interfaces" => {
            c.inbound_ports_include = Selection::Only(ports(&[4000, 5000]));
            c.kube_virt_interfaces = strings(&["eth0", "eth1"]);
            c.enable_ipv6 = true;
        }
        "ipv6-ipnets" => {
            c.inbound_ports_include = Selection::Only(ports(&[4000, 5000]));
            c.inbound_ports_exclude = ports(&[6000, 7000]);
            c.kube_virt_interfaces = strings(&["eth0", "eth1"]);
            c.outbound_ip_ranges_exclude = cidrs(&["2001:db8::/32"]);
            c.outbound_ip_ranges_include = Selection::Only(cidrs(&["2001:db8::/32"]));
            c.enable_ipv6 = true;
        }
        "ipv6-uid-gid" => {
            c.inbound_ports_include = Selection::Only(ports(&[4000, 5000]));
            c.inbound_ports_exclude = ports(&[6000, 7000]);
            c.kube_virt_interfaces = strings(&["eth0", "eth1"]);
            c.proxy_gids = vec![1, 2];
            c.proxy_uids = vec![3, 4];
            c.enable_ipv6 = true;
            c.outbound_ip_ranges_exclude = cidrs(&["2001:db8::/32"]);
            c.outbound_ip_ranges_include = Selection::Only(cidrs(&["2001:db8::/32"]));
        }
        "ipv6-outbound-ports" => {
            c.outbound_ports_include = ports(&[32000, 31000]);
            c.enable_ipv6 = true;
        }
        "ipv6-tproxy-dns-v4-only" => {
            c.inbound_interception_mode = InterceptionMode::Tproxy;
            c.inbound_ports_include = Selection::Only(ports(&[8080]));
            c.redirect_dns = true;
            c.dns_servers_v4 = strings(&["10.96.0.10"]);
            c.outbound_ip_ranges_include = Selection::All;
            c.outbound_ip_ranges_exclude = cidrs(&["10.0.0.0/8", "fd00::/8"]);
            c.enable_ipv6 = true;
        }
        "outbound-ports-include" => c.outbound_ports_include = ports(&[32000, 31000]),
        "outbound-ports-exclude" => c.outbound_ports_exclude = ports(&[22, 80, 443]),
        "outbound-owner-groups" => c.owner_groups = OwnerGroups::Only(strings(&["java", "202"])),
        "outbound-owner-groups-exclude" => {
            c.owner_groups = OwnerGroups::AllExcept(strings(&["888", "ftp"]));
        }
        // istio's case: DNS capture asked for, but no DNS servers, so off.
        "ipv6-dns-outbound-owner-groups-exclude" => {
            c.enable_ipv6 = true;
            c.redirect_dns = true;
            c.owner_groups = OwnerGroups::AllExcept(strings(&["888", "ftp"]));
        }
        // Ours: the same with --capture-all-dns, so the DNS rules are there.
        "ipv6-capture-all-dns-outbound-owner-groups-exclude" => {
            c.enable_ipv6 = true;
            c.redirect_dns = true;
            c.capture_all_dns = true;
            c.owner_groups = OwnerGroups::AllExcept(strings(&["888", "ftp"]));
        }
        "basic-exclude-nic" => c.exclude_interfaces = strings(&["not-istio-nic"]),
        "drop-invalid" => c.drop_invalid = true,
        "host-ipv4-loopback-cidr" => c.host_ipv4_loopback_cidr = "127.0.0.1/8".parse().unwrap(),
        "exempt-mark" => {
            c.exempt_mark = Some(1337);
            c.outbound_ip_ranges_include = Selection::All;
            c.outbound_ports_exclude = ports(&[15020]);
        }
        "ipv6-exempt-mark" => {
            c.exempt_mark = Some(0x100);
            c.enable_ipv6 = true;
        }
        _ => panic!("unknown case {name}"),
    }
    c
}

#[test]
fn golden_files() {
    let update = std::env::var("MESH_REDIRECT_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut failed = Vec::new();
    for name in NAMES {
        let got = restore_input(&config(name)).to_string();
        if update {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/iptables/istio/testdata")
                .join(format!("{name}.golden"));
            std::fs::write(&path, &got).unwrap();
        } else if got != golden(name) {
            eprintln!("--- {name}: expected\n{}--- got\n{got}", golden(name));
            failed.push(*name);
        }
    }
    assert!(failed.is_empty(), "golden mismatch: {failed:?}");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: IstioIptablesArgs,
}

fn parse(argv: &[&str]) -> IstioIptablesArgs {
    Cli::try_parse_from(std::iter::once("istio-iptables").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .args
}

fn dry_run(argv: &[&str]) -> String {
    restore_input(&Config::try_from(&parse(argv)).unwrap()).to_string()
}

const ISTIO_TEST_DEFAULTS: &[&str] = &[
    "-p", "15001", "-z", "15006", "-e", "15008", "-u", "1337", "-g", "1337",
];

/// The three outputs of the issue, byte for byte, from the command line.
#[test]
fn cli_examples_match_istio() {
    let empty = "* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
COMMIT
";
    assert_eq!(dry_run(ISTIO_TEST_DEFAULTS), empty);
    assert_eq!(golden("empty"), empty);
    assert_eq!(dry_run(&[]), empty, "istio's defaults without flags");

    let inbound = empty.replace(
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
         -A PREROUTING -p tcp -j ISTIO_INBOUND\n\
         -A ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_IN_REDIRECT\n\
         -A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT\n",
    );
    assert_eq!(
        dry_run(&[ISTIO_TEST_DEFAULTS, &["-b", "32000,31000"]].concat()),
        inbound
    );
    assert_eq!(golden("inbound-ports-include"), inbound);

    let ipnets = empty.replace(
        "COMMIT\n",
        "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\nCOMMIT\n",
    );
    assert_eq!(
        dry_run(&[ISTIO_TEST_DEFAULTS, &["-i", "10.0.0.0/8"]].concat()),
        ipnets
    );
    assert_eq!(golden("ipnets"), ipnets);
}

/// istio's own golden at the version we follow
/// (`inbound-ports-wildcard-tproxy.golden` at commit 0098d99f), with the
/// stub's `iptables-save` lines taken out.
#[test]
fn matches_istio_golden_at_our_version() {
    let istio = "* mangle
-N ISTIO_DIVERT
-N ISTIO_TPROXY
-N ISTIO_INBOUND
-A ISTIO_DIVERT -j MARK --set-mark 1337
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark
-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark
-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN
-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN
-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN
COMMIT
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
COMMIT
";
    assert_eq!(golden("inbound-ports-wildcard-tproxy"), istio);
}

/// The exempt mark adds exactly one line per family, first in `ISTIO_OUTPUT`.
#[test]
fn exempt_mark_adds_one_rule() {
    for ipv6 in [false, true] {
        let base = Config {
            enable_ipv6: ipv6,
            inbound_ports_include: Selection::All,
            outbound_ports_exclude: vec![PortSpec::Port(15020)],
            ..Config::default()
        };
        let marked = Config {
            exempt_mark: Some(0x539),
            ..base.clone()
        };
        let want = restore_input(&base).to_string().replace(
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -m mark --mark 1337 -m comment --comment mesh-redirect -j RETURN\n",
        );
        assert_eq!(restore_input(&marked).to_string(), want);
        assert_eq!(
            want.matches("--mark 1337 -m comment --comment mesh-redirect -j RETURN")
                .count(),
            if ipv6 { 2 } else { 1 }
        );
    }
    assert_eq!(
        Config::try_from(&parse(&["--exempt-mark", "1337"]))
            .unwrap()
            .exempt_mark,
        Some(1337)
    );
}

#[test]
fn ipv6_off_has_no_ipv6_input() {
    assert_eq!(restore_input(&Config::default()).ipv6, None);
    let v6 = restore_input(&Config {
        enable_ipv6: true,
        ..Config::default()
    });
    assert!(
        v6.ipv6
            .unwrap()
            .contains("-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN\n")
    );
}

#[test]
fn flags_and_defaults() {
    let args = parse(&[
        "--istio-inbound-interception-mode=TPROXY",
        "--istio-inbound-ports=*",
        "--istio-local-exclude-ports=15090,,15021",
        "--istio-service-cidr=*",
        "--istio-service-exclude-cidr=10.0.0.0/8,fd00::/8",
        "--kube-virt-interfaces=eth1",
        "--istio-exclude-interfaces=eth9",
        "--redirect-dns",
        "--capture-all-dns=true",
        "--drop-invalid=1",
        "--ipv6",
        "--proxy-uid=101,102",
        "-t",
        "7",
        "-r",
        "99",
    ]);
    let cfg = Config::try_from(&args).unwrap();
    assert_eq!(cfg.inbound_interception_mode, InterceptionMode::Tproxy);
    assert_eq!(cfg.inbound_ports_include, Selection::All);
    assert_eq!(cfg.inbound_ports_exclude, ports(&[15090, 15021]));
    assert_eq!(cfg.outbound_ip_ranges_include, Selection::All);
    assert_eq!(cfg.outbound_ip_ranges_exclude.len(), 2);
    assert_eq!(cfg.proxy_uids, [101, 102]);
    assert_eq!(cfg.proxy_gids, [101, 102], "-g defaults to -u");
    assert!(cfg.redirect_dns && cfg.capture_all_dns && cfg.drop_invalid && cfg.enable_ipv6);
    assert_eq!(
        (cfg.inbound_tproxy_mark, cfg.inbound_tproxy_route_table),
        (7, 99)
    );
    assert!(cfg.needs_tproxy_routes());

    // As with Go's pflag, the last of a repeated flag wins.
    let again = Config::try_from(&parse(&["-p", "1", "-p", "2", "-n", "--dry-run=false"])).unwrap();
    assert_eq!(again.proxy_port, 2);

    let d = Config::try_from(&parse(&[])).unwrap();
    assert_eq!(d, Config::default());
    assert!(
        !Config::try_from(&parse(&["--redirect-dns=false"]))
            .unwrap()
            .redirect_dns
    );
    assert_eq!(
        parse(&["--iptables-backend", "legacy"]).iptables_backend,
        Some(super::Backend::Legacy)
    );
}

/// Bad input is refused, naming the flag.
#[test]
fn bad_input_names_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["-p", "0"], "-p/--envoy-port"),
        (&["-p", "65536"], "-p/--envoy-port"),
        (&["-p", "http"], "-p/--envoy-port"),
        (&["--inbound-capture-port=-1"], "-z/--inbound-capture-port"),
        (&["-e", "99999"], "-e/--inbound-tunnel-port"),
        (&["-b", "80,0"], "-b/--istio-inbound-ports"),
        (&["-b", "80,*"], "-b/--istio-inbound-ports"),
        (&["-d", "70000"], "-d/--istio-local-exclude-ports"),
        (&["-q", "x"], "-q/--istio-outbound-ports"),
        (&["-o", "9:8"], "-o/--istio-local-outbound-ports-exclude"),
        (&["-i", "10.0.0.0/33"], "-i/--istio-service-cidr"),
        (&["-i", "10.0.0.0"], "-i/--istio-service-cidr"),
        (&["-i", "10.0.0/8"], "-i/--istio-service-cidr"),
        (&["-x", "*"], "-x/--istio-service-exclude-cidr"),
        (&["-x", "fd00::/129"], "-x/--istio-service-exclude-cidr"),
        (&["-m", "tproxy"], "-m/--istio-inbound-interception-mode"),
        (&["-m", "BPF"], "-m/--istio-inbound-interception-mode"),
        (&["-u", "istio-proxy"], "-u/--proxy-uid"),
        (&["-g", "1337,x"], "-g/--proxy-gid"),
        (&["-t", "0x539"], "-t/--istio-inbound-tproxy-mark"),
        (&["-r", "main"], "-r/--istio-inbound-tproxy-route-table"),
        (&["-k", "bad iface"], "-k/--kube-virt-interfaces"),
        (
            &["-c", "averyveryverylongname"],
            "-c/--istio-exclude-interfaces",
        ),
        (
            &["--outbound-ipv4-loopback-cidr", "10.0.0.1/32"],
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        ),
        (
            &["--outbound-ipv4-loopback-cidr", "127.0.0.1/7"],
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        ),
        (&["--dns-servers-v4", "::1"], "--dns-servers-v4"),
        (&["--dns-servers-v6", "1.1.1.1"], "--dns-servers-v6"),
        (&["--exempt-mark=0x1"], "--exempt-mark"),
    ];
    for (argv, flag) in cases {
        match Config::try_from(&parse(argv)) {
            Err(e @ ConfigError::Invalid { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(flag), "{argv:?}: {msg}");
            }
            other => panic!("{argv:?} accepted: {other:?}"),
        }
    }
    let too_many = (0..65).map(|g| g.to_string()).collect::<Vec<_>>().join(",");
    let err = Config::try_from(&parse(&["--outbound-owner-groups", &too_many])).unwrap_err();
    assert!(
        err.to_string().contains("ISTIO_OUTBOUND_OWNER_GROUPS"),
        "{err}"
    );
    // Boolean flags take Go's spellings only.
    assert!(Cli::try_parse_from(["x", "--redirect-dns=yes"]).is_err());
}

/// istio's injector ends the init container's arguments with its logging
/// options: accepted, and the rules are the same as without them.
#[test]
fn istios_logging_options_are_accepted_and_change_nothing() {
    let injected = [
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
    ];
    let with_logging = [
        &injected[..],
        &["--log_output_level=default:info", "--log_as_json"],
    ]
    .concat();
    assert_eq!(dry_run(&with_logging), dry_run(&injected));
}
