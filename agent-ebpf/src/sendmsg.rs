//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: an unconnected UDP socket sends
//! a DNS query to a resolver (`sendto`, `sendmsg` with an address): with
//! DNS capture it goes to the DNS proxy instead, and the resolver is
//! remembered, by socket cookie, so the reply shows as the resolver's
//! (`dns_reply`). Every other datagram goes where it was sent.

use agent_common::{Counter, OrigDst, net};
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};

use crate::{
    DNS_ORIG_BY_COOKIE, NETNS_CONFIG,
    connect::{Family, destination, is_proxy, loopback_for, rewrite},
    counters::bump,
    rules::{self, Dns},
};

#[inline(always)]
pub fn sendmsg(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != net::SOCK_DGRAM {
        return;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(cfg) = (unsafe { NETNS_CONFIG.get(netns) }).copied() else {
        return;
    };
    let (dst_ip, dst_port) = destination(sa, family);
    match rules::dns(netns, &cfg, &dst_ip, dst_port, || is_proxy(sa, &cfg)) {
        Dns::Capture => {}
        Dns::Bypass => return bump(Counter::DnsBypassed),
        Dns::Other => return,
    }
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if DNS_ORIG_BY_COOKIE
        .insert(cookie, OrigDst::new(dst_ip, dst_port), 0)
        .is_err()
    {
        return bump(Counter::DnsStoreFailed);
    }
    rewrite(sa, family, loopback_for(&dst_ip), cfg.dns_port);
    bump(Counter::DnsRedirected);
}
