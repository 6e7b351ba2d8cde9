//! What istio-iptables derives from the pod rather than from flags: the
//! proxy's uid (`$ENVOY_USER`), whether IPv6 is on (the pod's addresses),
//! and the DNS servers (/etc/resolv.conf). istio's `config.FillConfigFromEnvironment`.

use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
};

use super::ConfigError;

const PASSWD: &str = "/etc/passwd";
/// The pod's resolv.conf, as istio reads it.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The uid of `user` in /etc/passwd (istio's `user.Lookup`), if any.
pub(super) fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string(PASSWD).ok()?;
    uid_in(&passwd, user)
}

fn uid_in(passwd: &str, user: &str) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// Whether IPv6 rules are on, as istio's `getLocalIP` decides it from the
/// addresses the pod has (loopback and link-local ones ignored): without
/// `dual_stack`, when its first address is IPv6 (IPv4 addresses come first
/// in a netlink dump, so: when it has no IPv4 address); with it, when it
/// has any IPv6 address. No address at all is an error, as in istio.
pub(super) fn ipv6_enabled(
    runner: &dyn Fn(&str) -> Command,
    dual_stack: bool,
) -> Result<bool, ConfigError> {
    decide_ipv6(&addresses(runner)?, dual_stack)
}

/// Whether the pod has a global (not loopback, not link-local) IPv6
/// address: `run`'s test for IPv6 rules.
pub fn has_global_ipv6(runner: &dyn Fn(&str) -> Command) -> Result<bool, ConfigError> {
    Ok(global_addresses(&addresses(runner)?)
        .iter()
        .any(IpAddr::is_ipv6))
}

/// `ip -o addr show` in the pod.
fn addresses(runner: &dyn Fn(&str) -> Command) -> Result<String, ConfigError> {
    let out = runner("ip")
        .args(["-o", "addr", "show"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ConfigError::ListAddresses(e.to_string()))?;
    if !out.status.success() {
        return Err(ConfigError::ListAddresses(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The global addresses in `ip -o addr show` output.
fn global_addresses(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            // `2: eth0    inet 10.0.0.1/24 brd ... scope global eth0\ ...`
            let mut fields = line.split_whitespace().skip(2);
            let family = fields.next()?;
            if family != "inet" && family != "inet6" {
                return None;
            }
            let addr: IpAddr = fields.next()?.split('/').next()?.parse().ok()?;
            let addr = match addr {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
                v4 @ IpAddr::V4(_) => v4,
            };
            let link_local = match addr {
                IpAddr::V4(a) => a.is_link_local(),
                IpAddr::V6(a) => a.is_unicast_link_local(),
            };
            (!addr.is_loopback() && !link_local && !addr.is_multicast()).then_some(addr)
        })
        .collect()
}

fn decide_ipv6(text: &str, dual_stack: bool) -> Result<bool, ConfigError> {
    let addrs = global_addresses(text);
    if addrs.is_empty() {
        return Err(ConfigError::NoLocalAddress);
    }
    let any_v4 = addrs.iter().any(IpAddr::is_ipv4);
    let any_v6 = addrs.iter().any(IpAddr::is_ipv6);
    Ok(if dual_stack { any_v6 } else { !any_v4 })
}

/// The nameservers of /etc/resolv.conf, split into IPv4 and IPv6 (istio's
/// `dns.ClientConfigFromFile` and `IPsSplitV4V6`), as written.
pub(super) fn resolv_conf_servers() -> Result<(Vec<String>, Vec<String>), ConfigError> {
    resolv_conf_servers_at(Path::new(RESOLV_CONF))
}

/// The nameservers of the resolv.conf at `path`, IPv4 then IPv6.
pub fn resolv_conf_servers_at(path: &Path) -> Result<(Vec<String>, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ResolvConf {
        path: path.to_owned(),
        source,
    })?;
    Ok(servers_in(&text))
}

fn servers_in(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() != Some("nameserver") {
            continue;
        }
        let Some(server) = fields.next() else {
            continue;
        };
        match server.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => v4.push(server.to_owned()),
            Ok(IpAddr::V6(_)) => v6.push(server.to_owned()),
            Err(_) => tracing::warn!(server, "ignoring a nameserver that is not an IP address"),
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_user_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nistio-proxy:x:1337:1337::/home:/bin/false\n";
        assert_eq!(uid_in(passwd, "istio-proxy"), Some(1337));
        assert_eq!(uid_in(passwd, "root"), Some(0));
        assert_eq!(uid_in(passwd, "nobody"), None);
    }

    #[test]
    fn ipv6_from_addresses() {
        let v4_only = "1: lo    inet 127.0.0.1/8 scope host lo\n2: eth0    inet 10.0.0.5/24 scope global eth0\n2: eth0    inet6 fe80::1/64 scope link\n";
        let dual = "1: lo    inet 127.0.0.1/8 scope host lo\n2: eth0    inet 10.0.0.5/24 scope global eth0\n2: eth0    inet6 fd00::5/64 scope global\n";
        let v6_only =
            "1: lo    inet6 ::1/128 scope host\n2: eth0    inet6 fd00::5/64 scope global\n";
        let none = "1: lo    inet 127.0.0.1/8 scope host lo\n";
        assert!(!decide_ipv6(v4_only, false).unwrap());
        assert!(!decide_ipv6(v4_only, true).unwrap());
        assert!(!decide_ipv6(dual, false).unwrap());
        assert!(decide_ipv6(dual, true).unwrap());
        assert!(decide_ipv6(v6_only, false).unwrap());
        assert!(matches!(
            decide_ipv6(none, false),
            Err(ConfigError::NoLocalAddress)
        ));
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(
            servers_in(text),
            (vec!["10.96.0.10".to_owned()], vec!["fd00::a".to_owned()])
        );
    }
}
