//! `cgroup/getpeername4`: an app whose connect was redirected asks who its
//! peer is, and gets the original destination, as it would under iptables
//! REDIRECT (NAT is invisible to `getpeername()`), not the proxy's address.

use agent_common::{SockKey, net};
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, programs::SockAddrContext,
};

use crate::ORIG_DST_BY_TUPLE;

#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != net::AF_INET {
        return;
    }
    // SAFETY: `sk` is the socket getpeername was called on.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: checked non-null.
    let sk = unsafe { &*sk };
    if sk.protocol != net::IPPROTO_TCP {
        return;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let app = SockKey::from_bpf_sock(netns, sk.src_ip4, sk.src_port, sa.user_ip4, sa.user_port);
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { ORIG_DST_BY_TUPLE.get(app) }.copied() {
        sa.user_ip4 = orig.ip4;
        sa.user_port = net::port_to_be_lower(orig.port);
    }
}
