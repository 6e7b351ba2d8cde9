//! `sk_lookup` on the served namespace: steer incoming TCP connections for
//! the pod's own addresses to the proxy's inbound listener, without NAT. The
//! accepted socket keeps the original destination as its local address; we
//! remember the connection so `getsockopt(SO_ORIGINAL_DST)` can answer it.
//!
//! Left alone: loopback destinations, connections from the proxy's
//! passthrough source (127.0.0.6: the proxy forwarding to the app), and
//! excluded ports (istio's `ISTIO_INBOUND`: 15008 always, `-d`, not `-b`).

use agent_common::{Counter, INBOUND_PASSTHROUGH_SRC_RAW, SockKey, flags, net, ports};
use aya_ebpf::programs::SkLookupContext;

use crate::{
    INBOUND_CONFIG, INBOUND_LISTENER, INBOUND_STEERED, SK_DROP, SK_PASS, counters::bump, rules,
};

/// `ENOENT`: the listener slot is empty.
const ENOENT: i32 = 2;

#[inline(always)]
pub fn sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let lk = unsafe { &*ctx.lookup };
    if lk.family != net::AF_INET || lk.protocol != net::IPPROTO_TCP {
        return SK_PASS;
    }
    let Some(cfg) = INBOUND_CONFIG.get(0).copied() else {
        return SK_PASS;
    };
    if !cfg.has(flags::REDIRECT_INBOUND) {
        return SK_PASS;
    }
    let local_port = net::port_from_host_u32(lk.local_port);
    if net::is_loopback(lk.local_ip4)
        || lk.remote_ip4 == INBOUND_PASSTHROUGH_SRC_RAW
        || local_port == ports::HBONE
        || local_port == cfg.inbound_port
        || local_port == cfg.outbound_port
        || !rules::inbound_port(cfg.netns_cookie, cfg.has(flags::IN_ALL_PORTS), local_port)
    {
        bump(Counter::InboundBypassed);
        return SK_PASS;
    }
    match INBOUND_LISTENER.redirect_sk_lookup(ctx, 0, 0) {
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
        cfg.netns_cookie,
        lk.local_ip4,
        lk.local_port,
        lk.remote_ip4,
        u32::from(lk.remote_port),
    );
    let _ = INBOUND_STEERED.insert(key, 1u8, 0);
    bump(Counter::InboundSteered);
    SK_PASS
}
