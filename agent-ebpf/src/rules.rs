//! The outbound capture decision, in istio-iptables' order (its `ISTIO_OUTPUT`
//! chain), so both redirect modes capture the same connections:
//!
//! 1. excluded ports (`-o`): never captured;
//! 2. the proxy's own connects (mark, uid, gid): never captured;
//! 3. 127.0.0.0/8: never captured;
//! 4. excluded CIDRs (`-x`): never captured;
//! 5. included ports (`-q`): captured;
//! 6. included CIDRs (`-i`, or every destination with `-i '*'`): captured;
//! 7. anything else: not captured.

use agent_common::{CidrKeyData, NetnsConfig, PortKey, PortRule, flags, net};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{IN_PORTS, OUT_CIDR_EXCLUDE, OUT_CIDR_INCLUDE, OUT_PORTS};

/// Why a connect was, or was not, captured.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    Capture,
    /// Not ours to capture (loopback, not included): no counter.
    Ignore,
    /// Deliberately left alone (proxy identity, an exclusion): counted.
    Bypass,
}

#[inline(always)]
pub fn outbound(
    netns: u64,
    cfg: &NetnsConfig,
    dst_ip4: u32,
    dst_port: u16,
    is_proxy: impl FnOnce() -> bool,
) -> Outbound {
    let port_rule = OUT_PORTS.get_ptr(PortKey::new(netns, dst_port)).map(|p| {
        // SAFETY: a u8 value read once.
        unsafe { *p }
    });
    if port_rule == Some(PortRule::EXCLUDE) || is_proxy() {
        return Outbound::Bypass;
    }
    if net::is_loopback(dst_ip4) {
        return Outbound::Ignore;
    }
    let key = Key::new(CidrKeyData::prefix_len(32), CidrKeyData::v4(netns, dst_ip4));
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
