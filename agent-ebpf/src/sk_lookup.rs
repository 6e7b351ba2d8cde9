//! `sk_lookup` on the served namespace: steer incoming TCP connections for
//! the pod's own addresses to the proxy's inbound listener, without NAT. The
//! accepted socket keeps the original destination as its local address; we
//! remember the connection so `getsockopt(SO_ORIGINAL_DST)` can answer it.
//!
//! Both families: an IPv4 connection goes to the IPv4 listener (or a
//! dual-stack IPv6 one), an IPv6 connection to the IPv6 listener.
//!
//! The program cannot read its namespace's cookie: each served namespace
//! has an instance of its own, whose own `SK_LOOKUP_NETNS` holds the
//! cookie, sharing the datapath's other maps.
//!
//! Left alone: loopback destinations, connections from the proxy's
//! passthrough source (127.0.0.6 or `::6`: the proxy forwarding to the app), and
//! excluded ports (istio's `ISTIO_INBOUND`: 15008 always, `-d`, not `-b`).

use agent_common::{
    Counter, INBOUND_PASSTHROUGH_SRC_RAW, INBOUND_PASSTHROUGH_SRC_V6_RAW, ListenerKey, SockKey,
    flags, net, ports,
};
use aya_ebpf::programs::SkLookupContext;

use crate::{
    INBOUND_LISTENER, INBOUND_STEERED, NETNS_CONFIG, SK_DROP, SK_PASS, counters::bump, rules,
};

/// `ENOENT`: the listener slot is empty.
const ENOENT: i32 = 2;

/// The namespace this instance serves (0 until the agent wrote it: none).
#[inline(always)]
fn served_netns() -> u64 {
    crate::SK_LOOKUP_NETNS.get(0).copied().unwrap_or(0)
}

#[inline(always)]
pub fn sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let lk = unsafe { &*ctx.lookup };
    let v4 = lk.family == net::AF_INET;
    if !(v4 || lk.family == net::AF_INET6) || lk.protocol != net::IPPROTO_TCP {
        return SK_PASS;
    }
    let netns_cookie = served_netns();
    // SAFETY: copied out at once.
    let Some(cfg) = (unsafe { NETNS_CONFIG.get(netns_cookie) }).copied() else {
        return SK_PASS;
    };
    if !cfg.has(flags::REDIRECT_INBOUND) || !(v4 || cfg.has(flags::CAPTURE_IPV6)) {
        return SK_PASS;
    }
    // Every address field read, each on its own (see `ctx`).
    let local_ip = crate::ctx::pick(
        lk.family,
        lk.local_ip4,
        crate::ctx::words(&raw const lk.local_ip6),
    );
    let remote_ip = crate::ctx::pick(
        lk.family,
        lk.remote_ip4,
        crate::ctx::words(&raw const lk.remote_ip6),
    );
    let local_port = net::port_from_host_u32(lk.local_port);
    if net::is_loopback_raw(&local_ip)
        || remote_ip == INBOUND_PASSTHROUGH_SRC_RAW
        || remote_ip == INBOUND_PASSTHROUGH_SRC_V6_RAW
        || local_port == ports::HBONE
        || local_port == cfg.inbound_port
        || local_port == cfg.outbound_port
        || !rules::inbound_port(netns_cookie, cfg.has(flags::IN_ALL_PORTS), local_port)
    {
        bump(if v4 {
            Counter::InboundBypassed
        } else {
            Counter::InboundBypassed6
        });
        return SK_PASS;
    }
    // IPv4 goes to the IPv4 listener, or to a dual-stack IPv6 one; IPv6 to
    // the IPv6 listener.
    let mut assigned = if v4 {
        INBOUND_LISTENER.redirect_sk_lookup(ctx, ListenerKey::new(netns_cookie, net::AF_INET), 0)
    } else {
        Err(-ENOENT)
    };
    if assigned == Err(-ENOENT) {
        assigned = INBOUND_LISTENER.redirect_sk_lookup(
            ctx,
            ListenerKey::new(netns_cookie, net::AF_INET6),
            0,
        );
    }
    match assigned {
        Ok(()) => {}
        Err(err) if err == -ENOENT => {
            // No proxy listening: fail open (the app gets it directly) or
            // closed (refused, as a REDIRECT to a closed port would be).
            bump(Counter::InboundNoListener);
            if cfg.has(flags::FAIL_OPEN) {
                bump(Counter::InboundFailOpen);
                return SK_PASS;
            }
            return SK_DROP;
        }
        Err(_) => {
            bump(Counter::InboundAssignFailed);
            return SK_PASS;
        }
    }
    // The accepted socket's tuple, from its own point of view.
    let key = SockKey::from_sk_lookup(
        netns_cookie,
        local_ip,
        lk.local_port,
        remote_ip,
        u32::from(lk.remote_port),
    );
    let _ = INBOUND_STEERED.insert(key, 1u8, 0);
    bump(if v4 {
        Counter::InboundSteered
    } else {
        Counter::InboundSteered6
    });
    SK_PASS
}
