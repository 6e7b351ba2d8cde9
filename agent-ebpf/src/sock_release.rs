//! `cgroup/sock_release`: a socket closes for good; a UDP socket's resolver
//! entry (see `connect` and `sendmsg`) goes with it, so the map holds only
//! live sockets.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, programs::SockContext,
};

use crate::DNS_ORIG_BY_COOKIE;

#[inline(always)]
pub fn sock_release(ctx: &SockContext) {
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_ORIG_BY_COOKIE.remove(cookie);
}
