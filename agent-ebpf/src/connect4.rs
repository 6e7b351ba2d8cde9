//! `cgroup/connect4`: rewrite outbound TCP connects of served namespaces to
//! the proxy's outbound port, remembering the original destination by socket
//! cookie. sockops moves it to the connection's tuple once established.

use agent_common::{Counter, NetnsConfig, OrigDst, flags, net};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{
        bpf_get_current_uid_gid,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
        },
    },
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;

use crate::{
    NETNS_CONFIG, ORIG_DST_BY_COOKIE,
    counters::bump,
    rules::{self, Outbound},
};

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands us a valid context for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != net::AF_INET || sa.type_ != net::SOCK_STREAM {
        return;
    }
    // SAFETY: helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(cfg) = (unsafe { NETNS_CONFIG.get(netns) }).copied() else {
        return;
    };
    if !cfg.has(flags::REDIRECT_OUTBOUND) {
        return;
    }
    let dst_ip4 = sa.user_ip4;
    let dst_port = net::port_from_be_lower(sa.user_port);
    match rules::outbound(netns, &cfg, dst_ip4, dst_port, || is_proxy(sa, &cfg)) {
        Outbound::Capture => {}
        Outbound::Ignore => return,
        Outbound::Bypass => {
            bump(Counter::ConnectBypassed);
            return;
        }
    }
    if cfg.has(flags::FAIL_OPEN) && !proxy_listening(ctx, cfg.outbound_port) {
        bump(Counter::ConnectFailOpen);
        return;
    }
    // SAFETY: helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst::new(dst_ip4, dst_port);
    if ORIG_DST_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without the original destination the proxy could not forward:
        // leave the connect alone rather than break it.
        bump(Counter::ConnectStoreFailed);
        return;
    }
    sa.user_ip4 = net::LOCALHOST;
    sa.user_port = net::port_to_be_lower(cfg.outbound_port);
    bump(Counter::ConnectRedirected);
    debug!(
        ctx,
        "connect4: {:i}:{} redirected to 127.0.0.1:{}",
        u32::from_be(dst_ip4),
        dst_port,
        cfg.outbound_port
    );
}

/// The IPv4 part of `bpf_sock_tuple`.
const TUPLE4_SIZE: u32 = 12;
const _: () = assert!(
    core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() == TUPLE4_SIZE as usize
);

/// Whether a socket listens on 127.0.0.1:`port` in this namespace.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, port: u16) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: 0,
                daddr: net::LOCALHOST,
                sport: 0,
                dport: port.to_be(),
            },
        },
    };
    // BPF_F_CURRENT_NETNS is -1 as a u64.
    let current_netns = u64::from_ne_bytes(i64::from(BPF_F_CURRENT_NETNS).to_ne_bytes());
    // SAFETY: a valid IPv4 tuple of the size given; the socket found, if
    // any, is released at once.
    unsafe {
        let sk = bpf_sk_lookup_tcp(ctx.as_ptr(), &raw mut tuple, TUPLE4_SIZE, current_netns, 0);
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// The proxy's own connects (by socket mark, uid or gid) go where they asked.
#[inline(always)]
fn is_proxy(sa: &aya_ebpf::bindings::bpf_sock_addr, cfg: &NetnsConfig) -> bool {
    if cfg.proxy_mark != 0 {
        // SAFETY: `sk` is the connecting socket, valid for the program's duration.
        let sk = unsafe { sa.__bindgen_anon_1.sk };
        // SAFETY: checked non-null; `mark` is readable on a full socket.
        if !sk.is_null() && unsafe { (*sk).mark } == cfg.proxy_mark {
            return true;
        }
    }
    let uid_gid = bpf_get_current_uid_gid();
    #[expect(clippy::cast_possible_truncation, reason = "the low half is the uid")]
    let uid = uid_gid as u32;
    let gid = (uid_gid >> 32) as u32;
    (cfg.has(flags::PROXY_UID) && uid == cfg.proxy_uid)
        || (cfg.has(flags::PROXY_GID) && gid == cfg.proxy_gid)
}
