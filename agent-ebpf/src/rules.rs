//! The capture decisions, in istio-iptables' order, for both families (an
//! IPv4 destination, also v4-mapped, follows the IPv4 rules; a native IPv6
//! one the IPv6 rules, as ip6tables would, and only while IPv6 capture is
//! on, as ip6tables rules are), so both redirect modes capture the same
//! connections.
//!
//! Outbound TCP (istio's `ISTIO_OUTPUT` chain):
//!
//! 1. excluded ports (`-o`): never captured;
//! 2. the proxy's own connects (mark, uid, gid): never captured;
//! 3. loopback (127.0.0.0/8, `::1`): never captured;
//! 4. excluded CIDRs (`-x`): never captured;
//! 5. included ports (`-q`): captured;
//! 6. included CIDRs (`-i`, or every destination with `-i '*'`): captured;
//! 7. anything else: not captured.
//!
//! DNS (with `--redirect-dns`, istio's `ISTIO_OUTPUT_DNS`, after the
//! excluded ports and the proxy's identities, before the loopback and CIDR
//! rules): port 53, UDP or TCP, to one of the pod's resolvers (or anywhere
//! with `--capture-all-dns`), unless the DNS proxy itself asks (mark, uid,
//! gid), goes to the DNS proxy.

use agent_common::{CidrKeyData, DnsServerKey, NetnsConfig, PortKey, PortRule, flags, net, ports};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{DNS_SERVERS, IN_PORTS, OUT_CIDR_EXCLUDE, OUT_CIDR_INCLUDE, OUT_PORTS};

/// Why a connect was, or was not, captured.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    Capture,
    /// Not ours to capture (loopback, not included): no counter.
    Ignore,
    /// Deliberately left alone (proxy identity, an exclusion): counted.
    Bypass,
}

/// What a send to port 53 is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dns {
    /// To the DNS proxy.
    Capture,
    /// The DNS proxy's own query: where it asked.
    Bypass,
    /// Not DNS we capture: the other rules decide.
    Other,
}

/// The CIDR trie key of a destination.
#[inline(always)]
fn cidr_key(netns: u64, ip: &net::IpRaw) -> Key<CidrKeyData> {
    if net::is_mapped(ip) {
        Key::new(CidrKeyData::prefix_len(32), CidrKeyData::v4(netns, ip[3]))
    } else {
        Key::new(
            CidrKeyData::prefix_len(128),
            CidrKeyData::v6(netns, net::ip6_octets(ip)),
        )
    }
}

#[inline(always)]
pub fn outbound(
    netns: u64,
    cfg: &NetnsConfig,
    dst_ip: &net::IpRaw,
    dst_port: u16,
    is_proxy: impl FnOnce() -> bool,
) -> Outbound {
    if !net::is_mapped(dst_ip) && !cfg.has(flags::CAPTURE_IPV6) {
        return Outbound::Ignore;
    }
    let port_rule = OUT_PORTS.get_ptr(PortKey::new(netns, dst_port)).map(|p| {
        // SAFETY: a u8 value read once.
        unsafe { *p }
    });
    if port_rule == Some(PortRule::EXCLUDE) || is_proxy() {
        return Outbound::Bypass;
    }
    if net::is_loopback_raw(dst_ip) {
        return Outbound::Ignore;
    }
    let key = cidr_key(netns, dst_ip);
    if OUT_CIDR_EXCLUDE.get(&key).is_some() {
        return Outbound::Bypass;
    }
    if port_rule == Some(PortRule::INCLUDE)
        || cfg.has(flags::OUT_ALL_CIDRS)
        || OUT_CIDR_INCLUDE.get(&key).is_some()
    {
        return Outbound::Capture;
    }
    Outbound::Ignore
}

#[inline(always)]
pub fn dns(
    netns: u64,
    cfg: &NetnsConfig,
    dst_ip: &net::IpRaw,
    dst_port: u16,
    is_proxy: impl FnOnce() -> bool,
) -> Dns {
    if dst_port != ports::DNS
        || !cfg.has(flags::REDIRECT_DNS)
        || (!net::is_mapped(dst_ip) && !cfg.has(flags::CAPTURE_IPV6))
    {
        return Dns::Other;
    }
    // An excluded port (`-o 53`) comes first, as in istio.
    // SAFETY: a u8 value read once.
    if OUT_PORTS
        .get_ptr(PortKey::new(netns, dst_port))
        .is_some_and(|p| unsafe { *p } == PortRule::EXCLUDE)
    {
        return Dns::Other;
    }
    let ours = cfg.has(flags::CAPTURE_ALL_DNS)
        || DNS_SERVERS
            .get_ptr(DnsServerKey {
                netns_cookie: netns,
                ip: *dst_ip,
            })
            .is_some();
    if !ours {
        return Dns::Other;
    }
    if is_proxy() {
        return Dns::Bypass;
    }
    Dns::Capture
}

/// Whether inbound connections to `port` are steered to the proxy
/// (istio's `ISTIO_INBOUND`: exclusions first, then `-b` or `-b '*'`).
#[inline(always)]
pub fn inbound_port(netns: u64, all_ports: bool, port: u16) -> bool {
    match IN_PORTS.get_ptr(PortKey::new(netns, port)).map(|p| {
        // SAFETY: a u8 value read once.
        unsafe { *p }
    }) {
        Some(PortRule::EXCLUDE) => false,
        Some(PortRule::INCLUDE) => true,
        _ => all_ports,
    }
}
