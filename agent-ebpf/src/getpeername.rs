//! `cgroup/getpeername4` and `cgroup/getpeername6`: an app whose connect
//! was redirected asks who its peer is, and gets the original destination
//! (a TCP connection's by its tuple, a connected UDP DNS socket's by its
//! cookie), in its socket's own form (an `AF_INET6` socket connected to a
//! v4-mapped address gets the v4-mapped address), as it would under
//! iptables REDIRECT: NAT is invisible to `getpeername()`.

use agent_common::{SockKey, net};
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};

use crate::{
    DNS_ORIG_BY_COOKIE, ORIG_DST_BY_TUPLE,
    connect::{Family, destination, rewrite},
};

#[inline(always)]
pub fn getpeername(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: `sk` is the socket getpeername was called on.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: checked non-null; each field read once, straight off the
    // socket pointer (the verifier refuses arithmetic on it).
    let (protocol, src_port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).protocol),
            core::ptr::read_volatile(&raw const (*sk).src_port),
        )
    };
    let (peer_ip, peer_port) = destination(sa, family);
    let orig = if protocol == net::IPPROTO_TCP {
        let own_ip = match family {
            // SAFETY: as above.
            Family::V4 => {
                net::mapped(unsafe { core::ptr::read_volatile(&raw const (*sk).src_ip4) })
            }
            // SAFETY: as above.
            Family::V6 => crate::ctx::words(unsafe { &raw const (*sk).src_ip6 }),
        };
        // SAFETY: helper call on our own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let app = SockKey::new(
            netns,
            own_ip,
            net::port_from_host_u32(src_port),
            peer_ip,
            peer_port,
        );
        // SAFETY: copied out at once.
        unsafe { ORIG_DST_BY_TUPLE.get(app) }.copied()
    } else if protocol == net::IPPROTO_UDP {
        // SAFETY: helper call on our own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: copied out at once.
        unsafe { DNS_ORIG_BY_COOKIE.get(cookie) }
            .copied()
            .filter(|_| net::is_loopback_raw(&peer_ip))
    } else {
        None
    };
    if let Some(orig) = orig {
        rewrite(sa, family, orig.ip, orig.port);
    }
}
