//! `cgroup/recvmsg4` and `cgroup/recvmsg6`: a UDP socket whose DNS query
//! went to the DNS proxy reads the reply; its source (the proxy's loopback
//! address and port) is shown as the resolver the app asked, as resolvers'
//! clients check (glibc drops a reply from any other source). Any other
//! datagram is left as it came.

use agent_common::{Counter, net};
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};

use crate::{
    DNS_ORIG_BY_COOKIE, NETNS_CONFIG,
    connect::{Family, destination, rewrite},
    counters::bump,
};

#[inline(always)]
pub fn recvmsg(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != net::SOCK_DGRAM {
        return;
    }
    let (src_ip, src_port) = destination(sa, family);
    if !net::is_loopback_raw(&src_ip) {
        return;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(cfg) = (unsafe { NETNS_CONFIG.get(netns) }).copied() else {
        return;
    };
    if src_port != cfg.dns_port {
        return;
    }
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { DNS_ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    rewrite(sa, family, orig.ip, orig.port);
    bump(Counter::DnsReplyRestored);
}
